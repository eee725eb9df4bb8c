"""A cache disk that refuses writes: a stand-in for :func:`pkgproxy.fetch.body.write_and_hash`."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from pkgproxy.fetch import body

Write = Callable[[int, bytes, int, dict[str, Any]], int]


def refusing_writes(after: int, real: Write = body.write_and_hash) -> Write:
    """A body write that succeeds ``after`` times, then fails as a full disk does."""
    calls = [0]

    def write(fd: int, data: bytes, offset: int, hashers: dict[str, Any]) -> int:
        calls[0] += 1
        if calls[0] > after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset, hashers)

    return write
