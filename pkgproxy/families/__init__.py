"""Family policies: pure functions that say how each URL of a repository is cached.

A family classifies a path (already relative to its route's upstream base) into a
:class:`Decision`. It does no I/O and imports nothing from Twisted's network side, so
each family is tested as plain functions. A new family is one module and one entry in
:data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable
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
class Decision:
    """What a family says about one URL.

    :ivar ttl: seconds a stored copy is fresh without asking upstream; ``None`` means
        "as the upstream's Cache-Control/Expires/Last-Modified say" (RFC 9111).
    :ivar digests: hex digests the body must match, by hashlib algorithm name.
    :ivar size: the byte count the body must have, when the family knows it.
    """

    cache_class: CacheClass
    ttl: float | None = None
    digests: dict[str, str] = field(default_factory=dict)
    size: int | None = None


Policy = Callable[["Route", str], Decision]


def _families() -> dict[str, Policy]:
    from pkgproxy.families import debian, generic

    return {"debian": debian.classify, "generic": generic.classify}


FAMILIES: dict[str, Policy] = _families()
