"""Reading committed indexes so later downloads can be checked against them.

When a family says a committed body is an index (a Debian Packages file, an Alpine
APKINDEX), it is parsed in the disk pool and what it lists goes into :class:`Facts`.
On start the cached indexes are read again, so the checks survive a restart.
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
        self._pending: dict[str, int] = {}
        #: False until the indexes already in the cache have been read again.
        self.ready = False
        self._idle_waiters: dict[str, list[Deferred[None]]] = {}

    # A route is "busy" from the moment one of its indexes is verified (its client is
    # about to see the whole index and ask for what it lists) until what it lists is in
    # the facts; requests of a busy route wait, so none slips through unchecked.

    def busy(self, route: str) -> bool:
        """Whether an index of ``route`` is being read now."""
        return self._pending.get(route, 0) > 0

    def idle(self, route: str) -> Deferred[None]:
        """Fires once no index of ``route`` is being read."""
        d: Deferred[None] = Deferred()
        if self.busy(route):
            self._idle_waiters.setdefault(route, []).append(d)
        else:
            d.callback(None)
        return d

    def _begin(self, route: str) -> None:
        self._pending[route] = self._pending.get(route, 0) + 1

    def _end(self, route: str) -> None:
        self._pending[route] -= 1
        if self._pending[route] <= 0:
            del self._pending[route]
            for d in self._idle_waiters.pop(route, []):
                d.callback(None)

    def hooks(self, route: str) -> tuple[Callable[[], None], Callable[[Fetch], None]]:
        """``(on_verified, on_settled)`` for the fetch of an index of ``route``."""
        began = False

        def on_verified() -> None:
            nonlocal began
            began = True
            self._begin(route)

        def on_settled(fetch: Fetch) -> None:
            if not began:
                return
            if fetch.entry is None:
                self._end(route)
            else:
                self.committed(fetch.entry).addBoth(lambda _: self._end(route))

        return on_verified, on_settled

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
            self.ready = True
            d.callback(None)
            return d

        def one_done(_: object) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                log.info("learned {n} artifact checks from cached indexes", n=len(self.facts))
                self.ready = True
                d.callback(None)

        def relearn_one(e: Entry) -> None:
            route = split_key(e.key)[0]
            self._begin(route)
            learned = self.committed(e)
            learned.addBoth(lambda _: self._end(route))
            learned.addBoth(one_done)

        for e in entries:
            relearn_one(e)
        return d

    def _indexlike(self, e: Entry) -> bool:
        name, path = split_key(e.key)
        route = self._routes.get(name)
        return route is not None and self.wants(route, path)
