"""Reading committed indexes so later downloads can be checked against them.

When a family says a committed body is an index (a Debian Packages file, an Alpine
APKINDEX), it is parsed in the disk pool and what it lists goes into :class:`Facts`.
On start the cached indexes are read again, so the checks survive a restart.

A family is "busy" from the moment one of its indexes is verified (its client is about
to see the whole index and ask for what it lists) until what the index lists is in the
facts; requests of a busy family wait for that, so none slips through unchecked. The
unit is the family, not the route, because an index may list files another route of
the family serves.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pkgproxy.cache.store import CacheStore, Entry
from pkgproxy.config import Route
from pkgproxy.diskpool import DiskPool
from pkgproxy.families import FAMILIES, Expect, Facts
from pkgproxy.fetch.fetch import Fetch

log = Logger()


def cache_key(route: str, path: str) -> str:
    """The cache key of ``path`` (canonical, with its ``?query`` if any) on a route."""
    return f"{route}:{path}"


def split_key(key: str) -> tuple[str, str]:
    """``(route name, path)`` of a cache key made by the proxy resource."""
    route, _, rest = key.partition(":")
    return route, rest.split("?", 1)[0].split("#", 1)[0]


class Learner:
    """Feeds :class:`Facts` from the indexes the cache holds."""

    def __init__(
        self, facts: Facts, store: CacheStore, pool: DiskPool, routes: tuple[Route, ...]
    ) -> None:
        self.facts = facts
        self._store = store
        self._pool = pool
        self._routes = {r.name: r for r in routes}
        self._pending: dict[str, int] = {}
        self._idle_waiters: dict[str, list[Deferred[None]]] = {}
        #: False until the indexes already in the cache have been read again.
        self.ready = False

    def wants(self, route: Route, path: str) -> bool:
        """Whether a body at ``path`` of ``route`` is an index to learn from."""
        return FAMILIES[route.family].learns(path)

    def busy(self, route: Route) -> bool:
        """Whether an index of ``route``'s family is being read now."""
        return self._pending.get(route.family, 0) > 0

    def idle(self, route: Route) -> Deferred[None]:
        """Fires once no index of ``route``'s family is being read."""
        d: Deferred[None] = Deferred()
        if self.busy(route):
            self._idle_waiters.setdefault(route.family, []).append(d)
        else:
            d.callback(None)
        return d

    def _begin(self, family: str) -> None:
        self._pending[family] = self._pending.get(family, 0) + 1

    def _end(self, family: str) -> None:
        self._pending[family] -= 1
        if self._pending[family] <= 0:
            del self._pending[family]
            for d in self._idle_waiters.pop(family, []):
                d.callback(None)

    def hooks(self, route: Route) -> tuple[Callable[[], None], Callable[[Fetch], None]]:
        """``(on_verified, on_settled)`` for the fetch of an index of ``route``."""
        began = False

        def on_verified() -> None:
            nonlocal began
            began = True
            self._begin(route.family)

        def on_settled(fetch: Fetch) -> None:
            if not began:
                return
            if fetch.entry is None:
                self._end(route.family)
            else:
                self.committed(fetch.entry).addBoth(lambda _: self._end(route.family))

        return on_verified, on_settled

    def committed(self, entry: Entry) -> Deferred[int]:
        """Learn from a committed entry (a no-op for what is not an index)."""
        name, path = split_key(entry.key)
        route = self._routes.get(name)
        family = FAMILIES[route.family] if route is not None else None
        if family is None or family.learn is None or not family.learns(path):
            d: Deferred[int] = Deferred()
            d.callback(0)
            return d
        self._store.pin(entry)
        parsed: Deferred[list[tuple[str, Expect]]] = self._pool.run(
            family.learn, path, self._store.path_of(entry), entry.url
        )

        def learned(items: list[tuple[str, Expect]]) -> int:
            n = self.facts.add(items)
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
        entries = []
        for e in self._store.entries():
            name, path = split_key(e.key)
            route = self._routes.get(name)
            if route is not None and self.wants(route, path):
                entries.append((route, e))
        d: Deferred[None] = Deferred()
        remaining = len(entries)

        def finished() -> None:
            log.info("learned {n} artifact checks from cached indexes", n=len(self.facts))
            self.ready = True
            d.callback(None)

        if remaining == 0:
            finished()
            return d

        def one_done(_: object) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                finished()

        def relearn_one(route: Route, e: Entry) -> None:
            self._begin(route.family)
            learned = self.committed(e)
            learned.addBoth(lambda _: self._end(route.family))
            learned.addBoth(one_done)

        for route, e in entries:
            relearn_one(route, e)
        return d
