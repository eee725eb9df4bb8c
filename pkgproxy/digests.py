"""Incremental digests of a body as it is written, including format-specific ones.

Every check that a family asks for is computed while the download streams to disk, in
the disk pool's writer thread, so verifying costs no second read and no reactor time.
"""

from __future__ import annotations

import base64
import hashlib
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


def _blake2b_256() -> Hasher:
    """BLAKE2b with a 32-byte digest: the one files.pythonhosted.org paths are made of
    (``hashlib.new("blake2b")`` gives the 64-byte one)."""
    return hashlib.blake2b(digest_size=32)


#: Digest names beyond :mod:`hashlib`'s.
SPECIAL: dict[str, Callable[[], Hasher]] = {
    "apk-control": ApkControlHasher,
    "blake2b-256": _blake2b_256,
}


def new_hasher(name: str) -> Hasher:
    """A fresh incremental digest for ``name``."""
    special = SPECIAL.get(name)
    if special is not None:
        return special()
    h: Hasher = hashlib.new(name)
    return h
