"""Reading committed indexes so later downloads can be checked against them.

When a family says a committed body is an index (a Debian Packages file, an Alpine
APKINDEX), it is parsed in the disk pool and what it lists goes into :class:`Facts`.
On start the cached indexes are read again, so the checks survive a restart.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pkgproxy.cache.store import CacheStore, Entry
from pkgproxy.config import Route
from pkgproxy.diskpool import DiskPool
from pkgproxy.families import FAMILIES, Expect, Facts

log = Logger()


def split_key(key: str) -> tuple[str, str]:
    """``(route name, path)`` of a cache key made by the proxy resource."""
    route, _, rest = key.partition(":")
    return route, rest.split("?", 1)[0]


class Learner:
    """Feeds :class:`Facts` from the indexes the cache holds."""

    def __init__(
        self, facts: Facts, store: CacheStore, pool: DiskPool, routes: tuple[Route, ...]
    ) -> None:
        self.facts = facts
        self._store = store
        self._pool = pool
        self._routes = {r.name: r for r in routes}

    def wants(self, route: Route, path: str) -> bool:
        """Whether a body at ``path`` of ``route`` is an index to learn from."""
        return FAMILIES[route.family].learns(path)

    def committed(self, entry: Entry) -> Deferred[int]:
        """Learn from a just-committed entry (a no-op for what is not an index)."""
        name, path = split_key(entry.key)
        route = self._routes.get(name)
        family = FAMILIES[route.family] if route is not None else None
        if family is None or family.learn is None or not family.learns(path):
            d: Deferred[int] = Deferred()
            d.callback(0)
            return d
        self._store.pin(entry)
        parsed: Deferred[list[tuple[str, Expect]]] = self._pool.run(
            family.learn, path, self._store.path_of(entry)
        )

        def learned(items: list[tuple[str, Expect]]) -> int:
            n = self.facts.add(name, items)
            log.debug("learned {n} entries from {key}", n=n, key=entry.key)
            return n

        def failed(f: Failure) -> int:
            log.warn("cannot read index {key}: {e}", key=entry.key, e=f.getErrorMessage())
            return 0

        def done(n: int) -> int:
            self._store.unpin(entry)
            return n

        return parsed.addCallbacks(learned, failed).addBoth(done)

    def relearn(self) -> Deferred[None]:
        """Read every cached index again (at start)."""
        entries = [e for e in self._store.entries() if self._indexlike(e)]
        d: Deferred[None] = Deferred()
        remaining = len(entries)
        if remaining == 0:
            d.callback(None)
            return d

        def one_done(_: object) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                log.info("learned {n} artifact checks from cached indexes", n=len(self.facts))
                d.callback(None)

        for e in entries:
            self.committed(e).addBoth(one_done)
        return d

    def _indexlike(self, e: Entry) -> bool:
        name, path = split_key(e.key)
        route = self._routes.get(name)
        return route is not None and self.wants(route, path)
