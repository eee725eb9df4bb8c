"""Incremental digests of a body as it is written.

Format-specific digests (Alpine's control checksum, Go's ``h1:``, PyPI's BLAKE2b-256) are
defined by their families (``Family.hashers``) and given to :func:`new_hasher`.

Every check that a family asks for is computed while the download streams to disk, in
the disk pool's writer thread, so verifying costs no second read and no reactor time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Protocol


class Hasher(Protocol):
    """The part of :mod:`hashlib`'s interface the fetch uses."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


def new_hasher(name: str, special: Mapping[str, Callable[[], Hasher]] | None = None) -> Hasher:
    """A fresh incremental digest for ``name``: one of ``special`` (the format-specific
    digests the families define), else :mod:`hashlib`'s."""
    make = (special or {}).get(name)
    if make is not None:
        return make()
    h: Hasher = hashlib.new(name)
    return h
