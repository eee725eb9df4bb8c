"""Incremental digests of a body as it is written, including format-specific ones.

Every check that a family asks for is computed while the download streams to disk, in
the disk pool's writer thread, so verifying costs no second read and no reactor time.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from collections.abc import Callable
from typing import Protocol


class Hasher(Protocol):
    """The part of :mod:`hashlib`'s interface the fetch uses."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


class ApkControlHasher:
    """Alpine's ``C:`` checksum: ``Q1`` + base64 of the SHA-1 of the second gzip member.

    An ``.apk`` is three concatenated gzip streams (signature, control, data); the index
    checksums the raw bytes of the control stream. The streams are found by inflating
    only the first two; the large data stream is not decompressed.
    """

    def __init__(self) -> None:
        self._member = 0
        self._inflater = zlib.decompressobj(wbits=31)
        self._sha1 = hashlib.sha1()
        self._done = False
        self._error = False

    def update(self, data: bytes, /) -> None:
        while data and not self._done and not self._error:
            try:
                self._inflater.decompress(data, 1 << 16)
            except zlib.error:
                self._error = True
                return
            tail = self._inflater.unconsumed_tail
            used = len(data) - len(tail) - len(self._inflater.unused_data)
            if self._member == 1:
                self._sha1.update(data[:used])
            if self._inflater.eof:
                rest = self._inflater.unused_data
                self._member += 1
                if self._member == 2:
                    self._done = True
                    return
                self._inflater = zlib.decompressobj(wbits=31)
                data = rest + tail if tail else rest
            else:
                data = tail

    def hexdigest(self) -> str:
        if not self._done or self._error:
            return "(no control stream)"
        return "Q1" + base64.b64encode(self._sha1.digest()).decode()


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


def _blake2b_256() -> Hasher:
    """BLAKE2b with a 32-byte digest: the one files.pythonhosted.org paths are made of
    (``hashlib.new("blake2b")`` gives the 64-byte one)."""
    return hashlib.blake2b(digest_size=32)


#: Digest names beyond :mod:`hashlib`'s.
SPECIAL: dict[str, Callable[[], Hasher]] = {
    "apk-control": ApkControlHasher,
    "blake2b-256": _blake2b_256,
    "go-h1-mod": GoModHasher,
    "go-h1-zip": GoZipHasher,
}


def new_hasher(name: str) -> Hasher:
    """A fresh incremental digest for ``name``."""
    special = SPECIAL.get(name)
    if special is not None:
        return special()
    h: Hasher = hashlib.new(name)
    return h
