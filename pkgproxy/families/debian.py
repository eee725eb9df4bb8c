"""Debian and Ubuntu archives (apt).

``pool/`` files and ``by-hash/`` indexes never change under their names, so they are kept
forever and a client's ``max-age=0`` does not send them upstream again; a by-hash URL
names its own digest, which the body must match before it is stored, and a pool file
must match the ``Size`` and ``SHA256`` of its ``Packages`` stanza once that index has
been cached. Release files and the indexes under ``dists/`` change and are revalidated
after the route's ``index_ttl``. PROTOCOLS.md section 2.2 gives the classes, checked in
this order.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from dataclasses import replace
from typing import IO

from pkgproxy.config.model import Route
from pkgproxy.families import CacheClass, Decision, Expect, Facts, Family, Request, on_both_schemes
from pkgproxy.families.compressed import Chunks, open_index
from pkgproxy.httputil import parse_http_date

_BY_HASH = re.compile(
    r"(?:^|/)dists/.+/by-hash/(?P<algo>MD5Sum|SHA1|SHA256|SHA512)/(?P<hex>[0-9a-f]{32,128})$"
)
_HASH_ALGOS = {
    "MD5Sum": ("md5", 32),
    "SHA1": ("sha1", 40),
    "SHA256": ("sha256", 64),
    "SHA512": ("sha512", 128),
}
_POOL = re.compile(
    r"(?:^|/)pool/.+/[^/]+\.(?:u?deb|ddeb|dsc|tar\.(?:gz|xz|bz2|lzma|zst)|diff\.gz"
    r"|buildinfo|changes|asc)$"
)
_PDIFF = re.compile(r"(?:^|/)dists/.+\.diff/(?!Index$)[^/]+$")
_PACKAGES = re.compile(r"(?:^|/)dists/.+/binary-[^/]+/Packages(?:\.(?:gz|xz|bz2))?$")
_RELEASE = re.compile(r"(?:^|/)dists/.+/(?:InRelease|Release)$")
_RELEASE_SIGNED = re.compile(r"(?:^|/)dists/.+/Release$")
_RELEASE_FILES = re.compile(r"(?:^|/)dists/.+/(?:InRelease|Release|Release\.gpg)$")
_PACKAGES_BY_HASH = re.compile(r"(?:^|/)dists/.+/binary-[^/]+/by-hash/SHA256/[0-9a-f]{64}$")


def classify(
    route: Route, path: str, facts: Facts | None = None, request: Request | None = None
) -> Decision:
    """Classify ``path`` (relative to the archive root, no query) of a Debian route."""
    m = _BY_HASH.search(path)
    if m:
        algo, length = _HASH_ALGOS[m.group("algo")]
        if len(m.group("hex")) == length:
            return Decision(CacheClass.IMMUTABLE, digests={algo: m.group("hex")})
        return Decision(CacheClass.PASS)
    if _POOL.search(path):
        known = facts.get(route.upstream + path) if facts is not None else None
        return replace(
            Decision(CacheClass.IMMUTABLE).with_expect(known), key_scope=route.share_pool
        )
    if _PDIFF.search(path):
        return Decision(CacheClass.IMMUTABLE)
    decision = Decision(CacheClass.MUTABLE, ttl=route.index_ttl)
    if facts is not None and "dists/" in path and not _RELEASE_FILES.search(path):
        # An index the cached Release file lists: serve exactly the bytes it names, and
        # fetch them by hash, so a mirror in mid-sync cannot cause a Hash Sum mismatch.
        known = facts.get(route.upstream + path)
        if known is not None:
            return replace(decision.with_expect(known), upstream_url=known.alternate)
    if _RELEASE.search(path):
        # A mirror behind a round-robin name may lag behind the one asked last time:
        # its older Release must not replace the newer one clients may already have.
        decision = replace(decision, version_of=release_date)
    elif path.endswith("/Release.gpg") and "dists/" in path:
        # Nor may its older signature replace the one that signs the kept Release.
        decision = replace(decision, version_of=signature_time)
    if _RELEASE_SIGNED.search(path):
        # Release and its detached Release.gpg are one pair: apt asks for Release first,
        # and a signature from before a change of Release fails its check.
        return replace(decision, revalidate_also=(f"{path}.gpg",))
    # Release files, the other indexes, the rest of dists/ and the odd file outside it
    # (README, project/trace) are all revalidated after the route's TTL.
    return decision


def release_date(head: bytes) -> float | None:
    """The ``Date`` of a Release or InRelease file, from its first lines (the field
    comes before the index lists; a clearsigned file's armour header does not have it)."""
    for line in head.split(b"\n"):
        if line.startswith(b"Date:"):
            return parse_http_date(line[5:].strip())
    return None


def signature_time(head: bytes) -> float | None:
    """When the newest OpenPGP signature in a detached signature (``Release.gpg``,
    armoured or not) was made: its creation-time subpacket (RFC 9580 §5.2.3.11), or the
    time field of a version 3 signature. ``None`` for anything else."""
    data = _dearmor(head) if head.startswith(b"-----BEGIN PGP") else head
    if data is None:
        return None
    newest: float | None = None
    pos = 0
    try:
        while pos < len(data):
            tag, body, pos = _pgp_packet(data, pos)
            if tag == 2:
                made = _signature_made(body)
                if made is not None and (newest is None or made > newest):
                    newest = made
    except (IndexError, ValueError):
        pass  # a cut-off or foreign packet: what was read so far stands
    return newest


def _dearmor(text: bytes) -> bytes | None:
    body = text.split(b"-----END PGP", 1)[0].split(b"\n")[1:]
    while body and body[0].strip():  # armour headers (Version:, Comment:) end at a blank
        body = body[1:]
    lines = [line.strip() for line in body if line.strip() and not line.startswith(b"=")]
    try:
        return base64.b64decode(b"".join(lines), validate=True)
    except (binascii.Error, ValueError):
        return None


def _pgp_packet(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """``(tag, body, next position)`` of the OpenPGP packet at ``pos``."""
    first = data[pos]
    if not first & 0x80:
        raise ValueError("not an OpenPGP packet")
    if first & 0x40:  # new format
        tag, o = first & 0x3F, data[pos + 1]
        if o < 192:
            length, start = o, pos + 2
        elif o < 224:
            length, start = ((o - 192) << 8) + data[pos + 2] + 192, pos + 3
        elif o == 255:
            length, start = int.from_bytes(data[pos + 2 : pos + 6], "big"), pos + 6
        else:
            raise ValueError("partial body lengths are not used for signatures")
    else:
        tag, kind = (first >> 2) & 0x0F, first & 3
        if kind == 3:
            raise ValueError("indeterminate length")
        size = (1, 2, 4)[kind]
        length, start = int.from_bytes(data[pos + 1 : pos + 1 + size], "big"), pos + 1 + size
    end = start + length
    if end > len(data):
        raise ValueError("packet cut off")
    return tag, data[start:end], end


def _signature_made(sig: bytes) -> float | None:
    version = sig[0]
    if version == 3:
        return float(int.from_bytes(sig[3:7], "big"))
    if version not in (4, 5, 6):
        return None
    width = 4 if version == 6 else 2
    count = int.from_bytes(sig[4 : 4 + width], "big")
    sub, end = 4 + width, 4 + width + count
    while sub < end:
        o = sig[sub]
        if o < 192:
            length, sub = o, sub + 1
        elif o < 255:
            length, sub = ((o - 192) << 8) + sig[sub + 1] + 192, sub + 2
        else:
            length, sub = int.from_bytes(sig[sub + 1 : sub + 5], "big"), sub + 5
        if length and sig[sub] & 0x7F == 2 and length == 5:
            return float(int.from_bytes(sig[sub + 1 : sub + 5], "big"))
        sub += length
    return None


def learns(path: str) -> bool:
    """Release files list the indexes; Packages indexes list the pool files."""
    return bool(_RELEASE.search(path) or _PACKAGES.search(path) or _PACKAGES_BY_HASH.search(path))


def stanzas(stream: IO[bytes]) -> Iterator[dict[str, str]]:
    """The fields of each stanza of a deb822 file, continuation lines dropped."""
    fields: dict[str, str] = {}
    for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if not line.strip():
            if fields:
                yield fields
                fields = {}
            continue
        if line[0] in " \t":
            continue
        name, sep, value = line.partition(":")
        if sep:
            fields[name] = value.strip()
    if fields:
        yield fields


def learn(path: str, body: Chunks, url: str) -> list[tuple[str, Expect]]:
    """What the index at ``path`` lists, given its bytes (runs in the disk pool)."""
    if _RELEASE.search(path):
        return learn_release(body, url)
    return learn_packages(body, url)


def learn_release(body: Chunks, url: str) -> list[tuple[str, Expect]]:
    """Every index a Release file lists, with its size, SHA256 and by-hash URL.

    Paths in the ``SHA256:`` field are relative to the suite directory (where the
    Release file is). With ``Acquire-By-Hash: yes`` each index also exists, with the
    same bytes, at ``<its directory>/by-hash/SHA256/<hex>``.
    """
    suite = url.rsplit("/", 1)[0] + "/"
    text = b"".join(body).decode("utf-8", "replace")  # a Release file is small
    if text.startswith("-----BEGIN PGP SIGNED MESSAGE-----"):
        # The signed text starts after the armour headers' blank line and ends at the
        # signature; the signature itself is apt's to check.
        text = text.split("\n\n", 1)[-1].split("-----BEGIN PGP SIGNATURE-----", 1)[0]
    by_hash = False
    valid_until: float | None = None
    out = []
    in_sha256 = False
    for line in text.splitlines():
        if not line[:1].isspace():
            name, _, value = line.partition(":")
            in_sha256 = name == "SHA256"
            if name == "Acquire-By-Hash":
                by_hash = value.strip().lower() == "yes"
            elif name == "Valid-Until":
                valid_until = parse_http_date(value.strip())
            continue
        if not in_sha256:
            continue
        parts = line.split()
        if len(parts) != 3 or not parts[1].isdigit() or len(parts[0]) != 64:
            continue
        hexd, size, rel = parts[0].lower(), int(parts[1]), parts[2]
        if _owned(rel):
            out.append((suite + rel, Expect(size, {"sha256": hexd})))
    if valid_until is not None:
        out.append((url, Expect(not_after=valid_until)))
    if by_hash:
        out = [
            (u, replace(e, alternate=f"{u.rsplit('/', 1)[0]}/by-hash/SHA256/{e.digests['sha256']}"))
            if "sha256" in e.digests
            else (u, e)
            for u, e in out
        ]
    return out


def _owned(rel: str) -> bool:
    """Whether a path an index lists stays below the directory it is relative to: an
    index teaches checks only for its own suite's indexes and its archive's pool."""
    return "://" not in rel and not rel.startswith("/") and ".." not in rel.split("/")


def learn_packages(body: Chunks, url: str) -> list[tuple[str, Expect]]:
    """``Filename -> (Size, SHA256)`` from a Packages index.

    Anything that is not a Packages file (a by-hash name may hide a Translation) gives
    nothing: its stanzas have no ``Filename``.
    """
    # Filename is relative to the archive root, which is above dists/.
    root = url[: url.index("dists/")] if "dists/" in url else url.rsplit("/", 1)[0] + "/"
    out = []
    with open_index(body) as stream:
        for st in stanzas(stream):
            filename, size, sha = st.get("Filename"), st.get("Size"), st.get("SHA256")
            if not filename or not size or not size.isdigit() or not _owned(filename):
                continue
            digests = {"sha256": sha.lower()} if sha and len(sha) == 64 else {}
            out.append((root + filename, Expect(int(size), digests)))
    return out


#: The built-in routes of this family (a configuration file overrides one by name).
ROUTES: tuple[Route, ...] = (
    Route(
        name="debian",
        family="debian",
        prefix="/debian/",
        upstream="https://deb.debian.org/debian/",
        forward=(
            "http://deb.debian.org/debian/",
            "http://ftp.debian.org/debian/",
            "https://deb.debian.org/debian/",
            "https://ftp.debian.org/debian/",
        ),
    ),
    Route(
        name="debian-security",
        family="debian",
        prefix="/debian-security/",
        upstream="https://deb.debian.org/debian-security/",
        forward=(
            "http://deb.debian.org/debian-security/",
            "http://security.debian.org/debian-security/",
            "http://security.debian.org/",
            "https://deb.debian.org/debian-security/",
            "https://security.debian.org/debian-security/",
            "https://security.debian.org/",
        ),
    ),
    # Ubuntu's archive is plain HTTP upstream too; apt checks the signed indexes.
    Route(
        name="ubuntu",
        family="debian",
        prefix="/ubuntu/",
        upstream="http://archive.ubuntu.com/ubuntu/",
        forward=(
            "http://archive.ubuntu.com/ubuntu/",
            "http://*.archive.ubuntu.com/ubuntu/",
            "https://archive.ubuntu.com/ubuntu/",
        ),
    ),
    Route(
        name="ubuntu-security",
        family="debian",
        prefix="/ubuntu-security/",
        upstream="http://security.ubuntu.com/ubuntu/",
        share_pool="ubuntu",
        forward=on_both_schemes("security.ubuntu.com/ubuntu/"),
    ),
    Route(
        name="ubuntu-ports",
        family="debian",
        prefix="/ubuntu-ports/",
        upstream="http://ports.ubuntu.com/ubuntu-ports/",
        forward=(
            "http://ports.ubuntu.com/ubuntu-ports/",
            "http://*.ports.ubuntu.com/ubuntu-ports/",
            "https://ports.ubuntu.com/ubuntu-ports/",
        ),
    ),
)

FAMILY = Family(classify, learns, learn, routes=ROUTES, compressed=(".deb", ".udeb"))
