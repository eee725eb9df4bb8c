"""gzip for the documents the cache rewrites: taken compressed from the upstream,
served compressed to clients that accept it.

Intel's ISA-L (the ``isal`` package) where it is installed: it inflates about 2.5 times
and deflates about 5 times as fast as zlib, to a smaller result than zlib's fastest
level. zlib otherwise (a platform with no ``isal`` wheel). Either writes and reads
plain gzip; the member header has no name and no time, so one document always gives
the same bytes (and the same ETag).
"""

from __future__ import annotations

import zlib
from typing import Protocol, cast


class _Deflate(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self, mode: int = ..., /) -> bytes: ...


try:
    from isal import igzip_lib, isal_zlib

    #: What a corrupt stream raises.
    # (Its stub types the exception class as an instance.)
    ERRORS: tuple[type[Exception], ...] = (
        zlib.error,
        cast("type[Exception]", isal_zlib.error),
        cast("type[Exception]", igzip_lib.IsalError),
    )
    ENGINE = "isal"

    def deflater() -> _Deflate:
        """A gzip member's compressor, fastest level."""
        return isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)

    def inflate_whole(data: bytes | bytearray, limit: int) -> bytes | None:
        """``data``, one whole gzip member, decompressed (its CRC and length checked);
        ``None`` if it holds anything else, or more than ``limit`` bytes."""
        # One call with its limit as the output's size, so the GIL is let go for the
        # whole of it (a decompressobj takes it back each time its output grows).
        inflate = igzip_lib.IgzipDecompressor(igzip_lib.DECOMP_GZIP)
        plain = inflate.decompress(data, limit + 1)
        if not inflate.eof or inflate.unused_data or len(plain) > limit:
            return None
        return plain

except ImportError:  # pragma: no cover - where ISA-L has no build
    ERRORS = (zlib.error,)
    ENGINE = "zlib"

    def deflater() -> _Deflate:
        """A gzip member's compressor, fastest level."""
        return zlib.compressobj(1, zlib.DEFLATED, 31)

    def inflate_whole(data: bytes | bytearray, limit: int) -> bytes | None:
        """``data``, one whole gzip member, decompressed (its CRC and length checked);
        ``None`` if it holds anything else, or more than ``limit`` bytes."""
        inflate = zlib.decompressobj(wbits=31)
        plain = inflate.decompress(data, limit + 1)
        if not inflate.eof or inflate.unconsumed_tail or inflate.unused_data:
            return None
        return plain if len(plain) <= limit else None


def compress(data: bytes) -> bytes:
    """``data`` as one gzip member."""
    d = deflater()
    return d.compress(data) + d.flush()
