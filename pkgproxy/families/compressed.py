"""Opening an index whatever its compression, told by its first bytes (a content-addressed
or by-hash name does not always say). Shared by the families that learn from indexes."""

from __future__ import annotations

import bz2
import gzip
import lzma
from typing import IO

import zstandard

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def open_index(local_file: str) -> IO[bytes]:
    """A binary stream of the decompressed bytes of ``local_file`` (gzip, xz, bzip2,
    zstd, or none)."""
    with open(local_file, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(local_file, "rb")  # type: ignore[return-value]
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(local_file, "rb")
    if magic.startswith(b"BZh"):
        return bz2.open(local_file, "rb")
    if magic.startswith(_ZSTD_MAGIC):
        raw = open(local_file, "rb")  # noqa: SIM115 - closed with the reader
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)  # type: ignore[return-value]
    return open(local_file, "rb")
