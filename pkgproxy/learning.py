"""Reading committed indexes so later downloads can be checked against them.

When a family says a committed body is an index (a Debian Packages file, an Alpine
APKINDEX), the stored file is read here, in the disk pool, and its bytes handed to the
family's ``learn`` (which opens no file); what it lists goes into :class:`Facts`.
A document the proxy rewrites (a PyPI page, a packument) is learned from while it is
rewritten, from the upstream's own bytes. Either way the facts are filed under the
document's upstream URL, whichever client base a rewritten copy was made for, and go
when its last cached copy goes. On start the cached indexes are read again (links of
rewritten copies mapped back to upstream URLs), so the checks survive a restart.

A family is "busy" from the moment one of its indexes is verified (its client is about
to see the whole index and ask for what it lists) until what the index lists is in the
facts; requests of a busy family wait for that, so none slips through unchecked. The
unit is the family, not the route, because an index may list files another route of
the family serves.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pkgproxy.cache.keys import PACKED, split_key
from pkgproxy.cache.keys import cache_key as cache_key
from pkgproxy.cache.store import CacheStore, Entry
from pkgproxy.config.model import Route
from pkgproxy.diskpool import DiskPool
from pkgproxy.families import FAMILIES, Expect, Facts, Family
from pkgproxy.fetch.fetch import Fetch

log = Logger()

#: A stored index is handed to its family in pieces of this size.
CHUNK = 1 << 20


def read_and_learn(
    family: Family, path: str, local_file: str, url: str
) -> list[tuple[str, Expect]]:
    """In the disk pool: what the index stored in ``local_file`` lists, by its family
    (given the file's bytes, read here a :data:`CHUNK` at a time as it parses them)."""
    assert family.learn is not None
    with open(local_file, "rb") as f:
        return family.learn(path, iter(partial(f.read, CHUNK), b""), url)


class UpstreamLinks:
    """Maps a link of a stored document to the upstream URL facts are filed under.

    A rewritten document links through the proxy (``http://cache:3142/pypi/files/...``
    as one client reached it, or a forward prefix); such links are mapped back by the
    route prefix, so what is learned is the same whoever the copy was made for.
    """

    def __init__(self, routes: tuple[Route, ...]) -> None:
        #: ``(public prefix, upstream base)``, longest first.
        self._back = sorted(
            [(f, r.upstream) for r in routes for f in r.forward]
            + [(r.prefix, r.upstream) for r in routes],
            key=lambda pair: -len(pair[0]),
        )
        self._upstreams = tuple(r.upstream for r in routes)

    def __call__(self, url: str) -> str:
        if url.startswith(self._upstreams):
            return url
        scheme, sep, rest = url.partition("://")
        path = "/" + rest.partition("/")[2] if sep else url
        for public, upstream in self._back:
            if public.startswith("/"):
                if path.startswith(public):
                    return upstream + path[len(public) :]
            elif url.startswith(public):
                return upstream + url[len(public) :]
        return url


class Learner:
    """Feeds :class:`Facts` from the indexes the cache holds."""

    def __init__(
        self, facts: Facts, store: CacheStore, pool: DiskPool, routes: tuple[Route, ...]
    ) -> None:
        self.facts = facts
        self._store = store
        self._pool = pool
        self._routes = {r.name: r for r in routes}
        self.upstream_url = UpstreamLinks(routes)
        #: The cache keys of the stored copies of each learned document (one per client
        #: base for a rewritten one): its facts go with the last of them.
        self._copies: dict[str, set[str]] = {}
        store.on_drop.append(self._dropped)
        #: Indexes being read, by family and by the package each describes (``None``:
        #: one that may list any file of its family).
        self._pending: dict[str, dict[str | None, int]] = {}
        self._idle_waiters: dict[str, list[tuple[str | None, Route, Deferred[None]]]] = {}
        #: False until the indexes already in the cache have been read again.
        self.ready = False

    def wants(self, route: Route, path: str) -> bool:
        """Whether a body at ``path`` of ``route`` is an index to learn from."""
        return FAMILIES[route.family].learns(path)

    def busy(self, route: Route, path: str | None = None) -> bool:
        """Whether an index that may list ``path`` (below ``route``) is being read now.

        An index whose family names the package it describes (:attr:`Family.owns`) only
        holds back requests for that package's files; any other index of the family, or
        a request whose path is not given, is held back by every index of the family.
        """
        pending = self._pending.get(route.family)
        if not pending:
            return False
        if path is None or None in pending:
            return True
        owns = FAMILIES[route.family].owns
        return owns is None or any(owns(owner, path) for owner in pending if owner is not None)

    def idle(self, route: Route, path: str | None = None) -> Deferred[None]:
        """Fires once no index that may list ``path`` (below ``route``) is being read."""
        d: Deferred[None] = Deferred()
        if self.busy(route, path):
            self._idle_waiters.setdefault(route.family, []).append((path, route, d))
        else:
            d.callback(None)
        return d

    def _begin(self, family: str, owner: str | None) -> None:
        pending = self._pending.setdefault(family, {})
        pending[owner] = pending.get(owner, 0) + 1

    def _end(self, family: str, owner: str | None) -> None:
        pending = self._pending[family]
        pending[owner] -= 1
        if pending[owner] <= 0:
            del pending[owner]
        if not pending:
            del self._pending[family]
        waiters = self._idle_waiters.pop(family, [])
        for path, route, d in waiters:
            if self.busy(route, path):
                self._idle_waiters.setdefault(family, []).append((path, route, d))
            else:
                d.callback(None)

    def hooks(self, route: Route, path: str) -> tuple[Callable[[], None], Callable[[Fetch], None]]:
        """``(on_verified, on_settled)`` for the fetch of the index at ``path`` of ``route``."""
        began = False
        index_owner = FAMILIES[route.family].index_owner
        owner = index_owner(path) if index_owner is not None else None

        def on_verified() -> None:
            nonlocal began
            began = True
            self._begin(route.family, owner)

        def on_settled(fetch: Fetch) -> None:
            if not began:
                return
            if fetch.entry is not None and fetch.learned is not None:
                # Learned from the upstream's own document while it was rewritten.
                self._learned(fetch.entry, fetch.learned)
                self._end(route.family, owner)
            elif fetch.entry is None:
                self._end(route.family, owner)
            else:
                self.committed(fetch.entry).addBoth(lambda _: self._end(route.family, owner))

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
        parsed: Deferred[list[tuple[str, Expect]]] = self._pool.run_cpu(
            read_and_learn, family, path, self._store.path_of(entry), entry.url
        )

        def learned(items: list[tuple[str, Expect]]) -> int:
            return self._learned(entry, [(self.upstream_url(u), e) for u, e in items])

        def failed(f: Failure) -> int:
            log.warn("cannot read index {key}: {e}", key=entry.key, e=f.getErrorMessage())
            return 0

        def done(n: int) -> int:
            self._store.unpin(entry)
            return n

        return parsed.addCallbacks(learned, failed).addBoth(done)

    def _learned(self, entry: Entry, items: list[tuple[str, Expect]]) -> int:
        """Record what the document stored as ``entry`` teaches, under its upstream URL
        (the same for every client base), for as long as a copy of it is cached."""
        if self._store.peek(entry.key) is not entry:
            return 0  # gone already
        n = self.facts.add(items, source=entry.url)
        self._copies.setdefault(entry.url, set()).add(entry.key)
        log.debug("learned {n} entries from {key}", n=n, key=entry.key)
        return n

    def _dropped(self, entry: Entry) -> None:
        copies = self._copies.get(entry.url)
        if copies is None:
            return
        copies.discard(entry.key)
        if not copies:
            del self._copies[entry.url]
            self.facts.forget(entry.url)

    def relearn(self) -> Deferred[None]:
        """Read every cached index again (at start)."""
        entries = []
        for e in self._store.entries():
            if e.key.endswith(PACKED):
                continue  # the gzip form of a document, read as the document itself
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
            self._begin(route.family, None)
            learned = self.committed(e)
            learned.addBoth(lambda _: self._end(route.family, None))
            learned.addBoth(one_done)

        for route, e in entries:
            relearn_one(route, e)
        return d
