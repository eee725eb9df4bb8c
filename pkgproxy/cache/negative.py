"""Remembering briefly that an index does not exist upstream.

apt asks for InRelease, then Release; PyPI and npm clients ask for names that are not
there. A fleet asking together would send every such request upstream; a short memory
of the 404 answers them here. Only mutable paths are remembered (an immutable file that
is missing now may be published later under that very name, and is cheap to ask for
once), never for long, and in memory only: a restart forgets.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Absent:
    """A remembered upstream 404."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes
    fetched: float
    expires: float


class NegativeCache:
    """At most ``limit`` remembered 404s, the oldest dropped first."""

    def __init__(self, ttl: float = 60.0, limit: int = 10_000) -> None:
        self.ttl = ttl
        self._limit = limit
        self._items: OrderedDict[str, Absent] = OrderedDict()

    def get(self, key: str, now: float) -> Absent | None:
        """The remembered 404 for ``key``, if it is still current."""
        item = self._items.get(key)
        if item is None:
            return None
        if now >= item.expires:
            del self._items[key]
            return None
        return item

    def put(
        self,
        key: str,
        status: int,
        headers: dict[bytes, bytes],
        body: bytes,
        now: float,
        ttl: float | None = None,
    ) -> None:
        """Remember an upstream 404 for ``min(ttl, self.ttl)`` seconds."""
        life = self.ttl if ttl is None else min(ttl, self.ttl)
        if life <= 0:
            return
        self._items[key] = Absent(status, headers, body, now, now + life)
        self._items.move_to_end(key)
        while len(self._items) > self._limit:
            self._items.popitem(last=False)

    def forget(self, key: str) -> None:
        """Drop what is remembered for ``key``."""
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)
