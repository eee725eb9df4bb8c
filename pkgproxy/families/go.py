"""Go modules (the GOPROXY protocol, ``go help goproxy``) and the checksum database.

Clients use the route as ``GOPROXY=http://cache:3142/go/,direct``.

- ``<module>/@v/<version>.info``, ``.mod`` and ``.zip`` of a canonical semantic version
  never change once published: kept forever. An ``.info`` of anything else (a branch or
  a commit prefix, which the proxy resolves) is an index.
- ``<module>/@v/list`` and ``<module>/@latest`` are indexes, revalidated after the
  route's ``index_ttl`` and served stale when the upstream is down.
- Module paths and versions arrive case-encoded (``!`` and the lower-case letter for an
  upper-case one); a path with an upper-case letter is not a GOPROXY URL.
- A 404 or 410 means "no such module or version", an answer ``go`` relies on to try
  the next proxy; it is remembered briefly, for version files too.
- ``sumdb/<db>/supported``, ``latest`` (the signed tree head: an index), ``lookup/``
  (an index, read for the ``h1:`` hashes it gives) and ``tile/`` (immutable) proxy the
  checksum database, so ``GOSUMDB`` keeps working through pkgproxy.
- Where a lookup made through pkgproxy gave the hashes of a version, its ``.zip`` is
  stored only if its ``h1:`` directory hash matches, its ``.mod`` only if the
  ``/go.mod`` hash does (:class:`GoZipHasher`). With no lookup seen
  (``GOSUMDB=off``, a private module) nothing is checked here; ``go`` checks against
  its go.sum itself.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
import zlib

from pkgproxy.config.model import Route
from pkgproxy.families import (
    CacheClass,
    Decision,
    Expect,
    Facts,
    Family,
    LocalAnswer,
    Request,
    listed,
    on_both_schemes,
    upstream_base,
)
from pkgproxy.families.compressed import Chunks, head

_MODULE = r"(?P<module>[^@]+?)"
_VERSION_FILE = re.compile(rf"^{_MODULE}/@v/(?P<version>[^/]+)\.(?P<ext>info|mod|zip)$")
_INDEX = re.compile(rf"^{_MODULE}/(?:@v/list|@latest)$")
#: A canonical semantic version (golang.org/x/mod/semver), case-encoded: the versions
#: whose files never change.
_CANONICAL = re.compile(
    r"^v(?:0|[1-9][0-9]*)\.(?:0|[1-9][0-9]*)\.(?:0|[1-9][0-9]*)"
    r"(?:-[0-9a-z!.-]+)?(?:\+incompatible)?$"
)
_SUMDB = re.compile(r"^sumdb/(?P<db>[^/]+)/(?P<rest>.*)$")
_TILE = re.compile(r"^tile/[0-9]+/(?:[0-9]+|data)/(?:x[0-9]{3}/)*[0-9]{3}(?:\.p/[0-9]+)?$")
_LOOKUP = re.compile(r"^lookup/(?P<module>[^@]+)@(?P<version>[^/@]+)$")
#: A go.sum line: module, version (``/go.mod`` for the go.mod's hash), hash.
_SUM_LINE = re.compile(r"^(?P<module>\S+) (?P<version>[^\s/]+)(?P<mod>/go\.mod)? (?P<h1>h1:\S+)$")


def escape(path: str) -> str:
    """A module path or version case-encoded as the proxy protocol wants it."""
    return re.sub(r"[A-Z]", lambda m: "!" + m.group().lower(), path)


def _not_found(why: str) -> Decision:
    return Decision(CacheClass.PASS, local=LocalAnswer(404, why))


def _sumdb(route: Route, rest: str) -> Decision:
    """A checksum database path below ``sumdb/<db>/``."""
    if _TILE.match(rest):
        return Decision(CacheClass.IMMUTABLE)
    if rest in ("supported", "latest") or _LOOKUP.match(rest):
        return Decision(CacheClass.MUTABLE, ttl=route.index_ttl)
    return _not_found("not a checksum database URL: supported, latest, lookup/ and tile/ are")


def classify(
    route: Route, path: str, facts: Facts | None = None, request: Request | None = None
) -> Decision:
    """Classify ``path`` (below the GOPROXY base) of a Go route."""
    m = _SUMDB.match(path)
    if m is not None:
        return _sumdb(route, m["rest"])
    if any(c.isupper() for c in path):
        return _not_found("a GOPROXY path is case-encoded: !x for an upper-case X")
    m = _VERSION_FILE.match(path)
    if m is not None:
        if not _CANONICAL.match(m["version"]):
            # A query (a branch, a commit) the upstream resolves: its answer moves.
            return Decision(CacheClass.MUTABLE, ttl=route.index_ttl)
        decision = Decision(CacheClass.IMMUTABLE, absent_ttl=route.index_ttl)
        return decision.with_expect(listed(facts, route, path))
    if _INDEX.match(path):
        return Decision(CacheClass.MUTABLE, ttl=route.index_ttl)
    return _not_found(
        "not a GOPROXY URL: <module>/@v/list, <module>/@latest, <module>/@v/<version>"
        ".info|.mod|.zip and sumdb/ are"
    )


def learns(path: str) -> bool:
    """A checksum database lookup gives the hashes of one version's zip and go.mod."""
    m = _SUMDB.match(path)
    return m is not None and _LOOKUP.match(m["rest"]) is not None


def parse_lookup(text: str) -> list[tuple[str, str, bool, str]]:
    """``(module, version, is go.mod, h1 hash)`` of each go.sum line of a lookup answer.

    The answer is the record (its number, then go.sum lines), a blank line and the
    signed tree head; the signature is ``go``'s to check, not pkgproxy's.
    """
    out = []
    for line in text.splitlines():
        m = _SUM_LINE.match(line)
        if m is not None:
            out.append((m["module"], m["version"], bool(m["mod"]), m["h1"]))
    return out


def learn(path: str, body: Chunks, url: str) -> list[tuple[str, Expect]]:
    """The expected ``h1:`` of the ``.zip`` and ``.mod`` a lookup names (disk pool)."""
    base = upstream_base(url, path)
    if base is None:
        return []
    text = head(body, 64 * 1024).decode("utf-8", "replace")
    out = []
    for module, version, is_mod, h1 in parse_lookup(text):
        ext, algo = ("mod", "go-h1-mod") if is_mod else ("zip", "go-h1-zip")
        target = f"{base}{escape(module)}/@v/{escape(version)}.{ext}"
        out.append((target, Expect(None, {algo: h1})))
    return out


def go_h1(files: list[tuple[bytes, str]]) -> str:
    """Go's ``h1:`` directory hash from ``(name, hex sha256 of content)`` pairs.

    golang.org/x/mod/sumdb/dirhash's Hash1: one line ``<hex>  <name>\n`` per file, in
    byte order of the names, and the base64 of that summary's SHA-256.
    """
    summary = hashlib.sha256()
    for name, hexdigest in sorted(files):
        summary.update(hexdigest.encode() + b"  " + name + b"\n")
    return "h1:" + base64.b64encode(summary.digest()).decode()


class GoModHasher:
    """The ``h1:`` of a module's ``.mod`` file, as go.sum's ``/go.mod`` lines give it:
    the directory hash of one file named ``go.mod``."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def update(self, data: bytes, /) -> None:
        self._sha.update(data)

    def hexdigest(self) -> str:
        return go_h1([(b"go.mod", self._sha.hexdigest())])


class _BadZip(Exception):
    """The body is not a zip file whose hash can be told."""


_LOCAL = b"PK\x03\x04"
_CENTRAL = b"PK\x01\x02"
_DESCRIPTOR = b"PK\x07\x08"
_END = b"PK\x05\x06"
#: A module zip is at most 500 MiB with 500 KiB of names at most; its central
#: directory is kept to check it against what was hashed.
_MAX_CENTRAL = 16 * 1024 * 1024


class GoZipHasher:
    """The ``h1:`` of a Go module zip (``dirhash.HashZip``), computed as it streams.

    Each member is inflated and hashed as it goes by (its local header, its data, its
    data descriptor); the central directory, which is what ``go`` reads the zip by, is
    kept and must list exactly those members at those offsets, with those CRCs and
    sizes, so that the hash is the one of what ``go`` will extract. Anything else
    (encryption, other methods, duplicate names, bytes after the end record) gives
    no hash, which no expected one matches.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._offset = 0  # of the start of _buf in the body
        self._member: tuple[int, bytes, int, int, int] | None = None
        self._inflater: zlib._Decompress | None = None
        self._remaining = 0  # stored bytes left (method 0)
        self._data_start = 0
        self._content = hashlib.sha256()
        self._crc = 0
        self._raw = 0  # compressed bytes of the current member
        self._size = 0
        self._descriptor = False
        self._members: dict[int, tuple[bytes, int, int, int]] = {}
        self._files: list[tuple[bytes, str]] = []
        self._names: set[bytes] = set()
        self._central: int | None = None
        self._error: str | None = None

    def update(self, data: bytes, /) -> None:
        if self._error is not None:
            return
        self._buf += data
        try:
            self._advance()
        except (_BadZip, zlib.error, struct.error) as e:
            self._error = str(e) or type(e).__name__
            self._buf = bytearray()

    def _consume(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._offset += n
        return out

    def _advance(self) -> None:
        while True:
            if self._central is not None:
                if len(self._buf) > _MAX_CENTRAL:
                    raise _BadZip("central directory too large")
                return
            if self._member is not None:
                if not self._data():
                    return
                continue
            if len(self._buf) < 4:
                return
            sig = bytes(self._buf[:4])
            if sig == _CENTRAL:
                self._central = self._offset
                continue
            if sig != _LOCAL:
                raise _BadZip("not a zip member")
            if not self._header():
                return

    def _header(self) -> bool:
        if len(self._buf) < 30:
            return False
        (_, _, flags, method, _, _, crc, csize, usize, nlen, xlen) = struct.unpack(
            "<IHHHHHIIIHH", self._buf[:30]
        )
        if len(self._buf) < 30 + nlen + xlen:
            return False
        start = self._offset
        header = self._consume(30 + nlen + xlen)
        name = header[30 : 30 + nlen]
        if flags & 1 or method not in (0, 8):
            raise _BadZip("encrypted or unknown compression")
        if b"\n" in name or name in self._names:
            raise _BadZip("a name twice or with a newline")
        self._descriptor = bool(flags & 8)
        if method == 0 and self._descriptor:
            raise _BadZip("stored member of unknown length")
        if 0xFFFFFFFF in (csize, usize):
            raise _BadZip("zip64 member")
        self._names.add(name)
        self._member = (start, name, crc, csize, usize)
        self._inflater = zlib.decompressobj(-15) if method == 8 else None
        self._data_start, self._remaining = self._offset, csize
        self._content, self._crc, self._raw, self._size = hashlib.sha256(), 0, 0, 0
        return True

    def _take(self, piece: bytes) -> None:
        self._content.update(piece)
        self._crc = zlib.crc32(piece, self._crc)
        self._size += len(piece)

    def _data(self) -> bool:
        """Move through the current member's data; True once it is complete."""
        assert self._member is not None
        if self._inflater is None:
            n = min(self._remaining, len(self._buf))
            self._take(self._consume(n))
            self._remaining -= n
            if self._remaining:
                return False
        elif not self._inflater.eof:
            chunk = self._consume(len(self._buf))
            while chunk and not self._inflater.eof:
                self._take(self._inflater.decompress(chunk, 1 << 20))
                chunk = self._inflater.unconsumed_tail
            if not self._inflater.eof:
                return False
            back = self._inflater.unused_data + chunk
            self._buf[:0] = back
            self._offset -= len(back)
        self._raw = self._offset - self._data_start
        start, name, crc, csize, usize = self._member
        if self._descriptor:
            if len(self._buf) < 16:
                return False
            skip = 4 if bytes(self._buf[:4]) == _DESCRIPTOR else 0
            crc, csize, usize = struct.unpack("<III", self._buf[skip : skip + 12])
            self._consume(skip + 12)
        if (crc, csize, usize) != (self._crc, self._raw, self._size):
            raise _BadZip(f"member {name!r} does not match its CRC or sizes")
        self._members[start] = (name, crc, csize, usize)
        self._files.append((name, self._content.hexdigest()))
        self._member = None
        return True

    def hexdigest(self) -> str:
        if self._error is None and self._member is None:
            try:
                self._check_central()
            except (_BadZip, struct.error) as e:
                self._error = str(e) or type(e).__name__
        if self._error is not None:
            return f"(not a module zip: {self._error})"
        return go_h1(self._files)

    def _check_central(self) -> None:
        """The central directory lists what was hashed, and nothing follows its end."""
        if self._central is None:
            raise _BadZip("no central directory")
        buf, pos, seen = bytes(self._buf), 0, 0
        while buf[pos : pos + 4] == _CENTRAL:
            (crc, csize, usize, nlen, xlen, clen) = struct.unpack(
                "<IIIHHH", buf[pos + 16 : pos + 34]
            )
            (offset,) = struct.unpack("<I", buf[pos + 42 : pos + 46])
            name = buf[pos + 46 : pos + 46 + nlen]
            if self._members.get(offset) != (name, crc, csize, usize):
                raise _BadZip(f"central directory entry {name!r} does not match its member")
            seen += 1
            pos += 46 + nlen + xlen + clen
        if seen != len(self._members):
            raise _BadZip("central directory does not list every member")
        if buf[pos : pos + 4] != _END or len(buf) < pos + 22:
            raise _BadZip("no end of central directory")
        (_, _, _, _, total, size, offset, clen) = struct.unpack("<IHHHHIIH", buf[pos : pos + 22])
        if (total, size, offset) != (seen, pos, self._central) or len(buf) != pos + 22 + clen:
            raise _BadZip("end of central directory does not match")


#: The built-in routes of this family (a configuration file overrides one by name).
ROUTES: tuple[Route, ...] = (
    # Go modules and RubyGems: released versions never change; module lists, @latest
    # and the gem indexes revalidate after 5 minutes.
    Route(
        name="go",
        family="go",
        prefix="/go/",
        upstream="https://proxy.golang.org/",
        forward=on_both_schemes("proxy.golang.org/"),
        index_ttl=300.0,
    ),
)

FAMILY = Family(
    classify,
    learns,
    learn,
    routes=ROUTES,
    hashers={"go-h1-mod": GoModHasher, "go-h1-zip": GoZipHasher},
)
