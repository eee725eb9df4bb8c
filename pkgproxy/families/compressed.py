"""Reading an index's bytes whatever its compression, told by its first bytes (a
content-addressed or by-hash name does not always say). Shared by the families that learn
from indexes.

A family is handed a document as an iterable of byte chunks (:data:`Chunks`), read by
the caller; these helpers turn them into a binary stream, decompressed on the way, for
parsers that read streams (``tarfile``, ``xml.etree``). Nothing here opens a file.
"""

from __future__ import annotations

import bz2
import gzip
import io
import itertools
import lzma
from collections.abc import Iterable, Iterator
from typing import IO

import zstandard

#: A document as its reader hands it over: its bytes, in pieces, in order, read once.
Chunks = Iterable[bytes]

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAGIC_LENGTH = 6


class _ChunkReader(io.RawIOBase):
    """A readable raw stream over byte chunks (copies each byte once)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._view = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._view:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._view = memoryview(chunk)
        n = min(len(buffer), len(self._view))
        buffer[:n] = self._view[:n]
        self._view = self._view[n:]
        return n


def stream(chunks: Chunks) -> IO[bytes]:
    """The bytes of ``chunks`` as a buffered binary stream, as they are."""
    return io.BufferedReader(_ChunkReader(chunks), 1 << 16)


def head(chunks: Chunks, limit: int) -> bytes:
    """The first ``limit`` bytes of ``chunks`` (fewer if it is shorter)."""
    out = bytearray()
    for chunk in chunks:
        out += chunk[: limit - len(out)]
        if len(out) >= limit:
            break
    return bytes(out)


def open_index(chunks: Chunks) -> IO[bytes]:
    """A binary stream of the decompressed bytes of ``chunks`` (gzip, xz, bzip2, zstd,
    or none)."""
    rest = iter(chunks)
    magic = b""
    while len(magic) < _MAGIC_LENGTH:
        chunk = next(rest, None)
        if chunk is None:
            break
        magic += chunk
    raw = stream(itertools.chain((magic,), rest))
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if magic.startswith(_ZSTD_MAGIC):
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)  # type: ignore[return-value]
    return raw
