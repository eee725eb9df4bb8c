"""Plain file mirrors: no knowledge of the repository format.

With ``immutable = true`` every 200 is kept forever (a mirror of versioned files, or a
benchmark origin); otherwise freshness follows the upstream's own headers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pkgproxy.families import CacheClass, Decision, Facts, Family, Request

if TYPE_CHECKING:
    from pkgproxy.config.model import Route


def classify(
    route: Route, path: str, facts: Facts | None = None, request: Request | None = None
) -> Decision:
    """Classify ``path`` of a generic route."""
    if route.immutable:
        return Decision(CacheClass.IMMUTABLE)
    return Decision(CacheClass.MUTABLE, ttl=None)


FAMILY = Family(classify)
