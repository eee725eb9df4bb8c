"""Family policies: pure functions that say how each URL of a repository is cached.

A family classifies a path (already relative to its route's upstream base) into a
:class:`Decision`. It does no network I/O and imports nothing from Twisted, so each
family is tested as plain functions. A new family is one module and one entry in
:data:`FAMILIES`.

Indexes teach the cache what the files they list must be: a family may ``learn`` from a
committed index (a Debian ``Packages`` file, an Alpine ``APKINDEX``) the size and digests
of artifacts, which :class:`Facts` keeps and ``classify`` turns into checks made before
an artifact is stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pkgproxy.config import Route


class CacheClass(Enum):
    """How a URL is cached."""

    #: Content never changes: cached forever, never revalidated, verified before commit.
    IMMUTABLE = "immutable"
    #: An index: stored with validators and revalidated after a TTL.
    MUTABLE = "mutable"
    #: Forwarded, never stored.
    PASS = "pass"


@dataclass(frozen=True)
class Expect:
    """What an index says one artifact must be."""

    size: int | None = None
    digests: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """What a family says about one URL.

    :ivar ttl: seconds a stored copy is fresh without asking upstream; ``None`` means
        "as the upstream's Cache-Control/Expires/Last-Modified say" (RFC 9111).
    :ivar digests: digests the body must match, by algorithm name (a :mod:`hashlib`
        name, or one of :data:`pkgproxy.digests.SPECIAL`), in that algorithm's usual
        text form (lower-case hex for hashlib).
    :ivar size: the byte count the body must have, when the family knows it.
    """

    cache_class: CacheClass
    ttl: float | None = None
    digests: Mapping[str, str] = field(default_factory=dict)
    size: int | None = None

    def with_expect(self, expect: Expect | None) -> Decision:
        """This decision, also checking what an index said."""
        if expect is None:
            return self
        return Decision(
            self.cache_class,
            self.ttl,
            {**expect.digests, **self.digests},
            self.size if self.size is not None else expect.size,
        )


class Facts:
    """What cached indexes say, by route name and path: the checks for later downloads."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], Expect] = {}

    def get(self, route: str, path: str) -> Expect | None:
        """What must be true of ``path`` under ``route``, if an index said."""
        return self._known.get((route, path))

    def add(self, route: str, items: Iterable[tuple[str, Expect]]) -> int:
        """Record what an index lists; returns how many items it had."""
        n = 0
        for path, expect in items:
            self._known[(route, path)] = expect
            n += 1
        return n

    def __len__(self) -> int:
        return len(self._known)


def _never(path: str) -> bool:
    return False


@dataclass(frozen=True)
class Family:
    """One repository format.

    :ivar classify: ``(route, path, facts) -> Decision``; pure.
    :ivar learns: whether the body at ``path`` is an index worth reading; pure.
    :ivar learn: ``(path, local_file) -> [(artifact path, Expect)]``; reads a file, so
        it runs in the disk pool.
    """

    classify: Callable[[Route, str, Facts], Decision]
    learns: Callable[[str], bool] = _never
    learn: Callable[[str, str], list[tuple[str, Expect]]] | None = None


def _families() -> dict[str, Family]:
    from pkgproxy.families import alpine, debian, generic

    return {"debian": debian.FAMILY, "alpine": alpine.FAMILY, "generic": generic.FAMILY}


FAMILIES: dict[str, Family] = _families()
