"""Reading committed indexes so later downloads can be checked against them.

When a family says a committed body is an index (a Debian Packages file, an Alpine
APKINDEX), the stored file is read here, in the disk pool, and its bytes handed to the
family's ``learn`` (which opens no file); what it lists goes into :class:`Facts`.
A document the proxy rewrites (a PyPI page, a packument) is learned from while it is
rewritten, from the upstream's own bytes. Either way the facts are filed under the
document's upstream URL, whichever client base a rewritten copy was made for, and go
when its last cached copy goes. On start the cached indexes are read again (links of
rewritten copies mapped back to upstream URLs), so the checks survive a restart.

A family that can read one file's entry of a document (:attr:`Family.lookup`: PyPI's
JSON pages, npm's packuments) is not learned from when a document arrives, if it was
rewritten by its bytes alone: the document is filed under the package it describes, and
a request for one of that package's files with no facts yet waits while the stored copy
is searched for that file's entry, mapped in a thread of its own (a millisecond, where
reading all of a large page's 15,000 entries takes a fraction of a second). Where the
entry cannot be told apart, the whole document is read then. Such documents already in
the cache at start are filed the same way: a restart reads none of them.

A family is "busy" from the moment one of its indexes is verified (its client is about
to see the whole index and ask for what it lists) until what the index lists is in the
facts; requests of a busy family wait for that, so none slips through unchecked. The
unit is the family, not the route, because an index may list files another route of
the family serves.
"""

from __future__ import annotations

import mmap
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


def read_and_look_up(
    family: Family, docs: list[tuple[str | bytes, str, str]], url: str
) -> tuple[str, list[tuple[str, Expect]] | None]:
    """In the lookup threads: what the first of ``docs`` (``(stored file, or the bytes
    of one not committed yet, path, upstream URL)``) that has the file at ``url`` says
    of it, as ``(document URL, learned)``; ``learned`` is ``None`` where an entry could
    not be told apart (then the whole document it came from is to be read). A stored
    file is mapped, not read."""
    assert family.lookup is not None
    for source, path, doc_url in docs:
        if isinstance(source, bytes):
            found = family.lookup(source, url, path, doc_url)
        else:
            try:
                with (
                    open(source, "rb") as f,
                    mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as data,
                ):
                    found = family.lookup(data, url, path, doc_url)
            except (OSError, ValueError):  # gone, or empty
                continue
        if found is None or found:
            return doc_url, found
    return "", []


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
        #: Documents learned from one file at a time (:attr:`Family.lookup`), by family
        #: and package: ``{upstream URL: (cache key of a stored copy, path, bytes)}``;
        #: from its verification until its commit, a document is its bytes (no key).
        self._lazy: dict[str, dict[str, dict[str, tuple[str, str, bytes | None]]]] = {}
        #: Lookups under way, by file URL: the requests waiting for each.
        self._looking: dict[str, list[Deferred[None]]] = {}

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
        family = FAMILIES[route.family]
        owns = family.owns
        if owns is None:
            return True
        if family.file_owners is not None:
            # The few packages the file may belong to, not every index being read.
            return any(o in pending and owns(o, path) for o in family.file_owners(path))
        return any(owns(owner, path) for owner in pending if owner is not None)

    def idle(self, route: Route, path: str | None = None) -> Deferred[None]:
        """Fires once no index that may list ``path`` (below ``route``) is being read."""
        d: Deferred[None] = Deferred()
        if self.busy(route, path):
            self._idle_waiters.setdefault(route.family, []).append((path, route, d))
        else:
            d.callback(None)
        return d

    def ready_for(self, route: Route, path: str) -> Deferred[None] | None:
        """``None`` if what is known of the file at ``path`` (below ``route``) may be used
        now; else fires once it may: no index that may list it is being read, and a
        document learned one file at a time has been searched for it."""
        if self.busy(route, path):
            d = self.idle(route, path)
            d.addCallback(lambda _: self.look_up(route, path))
            return d
        return self.look_up(route, path)

    def look_up(self, route: Route, path: str) -> Deferred[None] | None:
        """Read what a document learned one file at a time says of the file at ``path``,
        if nothing is known of it yet (see :meth:`ready_for`)."""
        lazy = self._lazy.get(route.family)
        if not lazy:
            return None
        url = route.upstream + path
        if self.facts.get(url) is not None:
            return None
        family = FAMILIES[route.family]
        assert family.file_owners is not None
        docs: list[tuple[Entry | bytes, str, str]] = []
        for owner in family.file_owners(path):
            for doc_url, (key, doc_path, data) in lazy.get(owner, {}).items():
                held = data if data is not None else self._store.peek(key)
                if held is not None:
                    docs.append((held, doc_path, doc_url))
        if not docs:
            return None
        d: Deferred[None] = Deferred()
        waiting = self._looking.get(url)
        if waiting is not None:
            waiting.append(d)
            return d
        self._looking[url] = [d]
        pinned = [e for e, _, _ in docs if isinstance(e, Entry)]
        for entry in pinned:
            self._store.pin(entry)
        work = self._pool.run_quick(
            read_and_look_up,
            family,
            [(e if isinstance(e, bytes) else self._store.path_of(e), p, u) for e, p, u in docs],
            url,
        )

        def found(result: tuple[str, list[tuple[str, Expect]] | None]) -> Deferred[None] | None:
            doc_url, items = result
            if items is not None:
                mapped = self._upstream(items)
                if any(u == url for u, _ in mapped):
                    self.facts.add(mapped, source=doc_url, more=True)
                    return None
            # Not told apart: read the whole document, as any other index.
            if not doc_url:
                return None
            for held, doc_path, u in docs:
                if u == doc_url:
                    return self._whole(route.family, held, doc_path, doc_url)
            return None

        def failed(f: Failure) -> None:
            log.warn("cannot look up {url}: {e}", url=url, e=f.getErrorMessage())

        def done(_: object) -> None:
            for entry in pinned:
                self._store.unpin(entry)
            for waiter in self._looking.pop(url, []):
                waiter.callback(None)

        work.addCallback(found).addErrback(failed).addBoth(done)
        return d

    def _whole(self, family: str, held: Entry | bytes, path: str, url: str) -> Deferred[None]:
        """Learn from all of a document that was to be learned one file at a time."""
        if isinstance(held, Entry):
            self._forget_lazy(family, url)
            return self.committed(held).addCallback(lambda _: None)
        # Not committed yet: its bytes, read in the index thread; it stays filed, so its
        # commit makes it a stored document like any other.
        learn = FAMILIES[family].learn
        assert learn is not None
        parsed = self._pool.run_cpu(learn, path, [held], url)

        def learned(items: list[tuple[str, Expect]]) -> None:
            self.facts.add(self._upstream(items), source=url)

        return parsed.addCallback(learned)

    def _lazily(self, route: Route, owner: str, entry: Entry, fresh: bool = True) -> None:
        """File a document to be learned from one file at a time (with ``fresh``, its
        new copy's facts replace what an older copy taught)."""
        if self._store.peek(entry.key) is not entry:
            return
        if fresh:
            self.facts.forget(entry.url)
        self.facts.generation += 1
        self._copies.setdefault(entry.url, set()).add(entry.key)
        _, path = split_key(entry.key)
        self._lazy.setdefault(route.family, {}).setdefault(owner, {})[entry.url] = (
            entry.key,
            path,
            None,
        )

    def _provisional(self, family: str, owner: str, url: str, path: str, data: bytes) -> None:
        """File a relinked document by its bytes from its verification (its client is
        about to ask for its files) until it is committed or not."""
        self.facts.forget(url)
        self.facts.generation += 1
        self._lazy.setdefault(family, {}).setdefault(owner, {})[url] = ("", path, data)

    def _forget_lazy(self, family: str, url: str) -> None:
        by_owner = self._lazy.get(family)
        if not by_owner:
            return
        for owner, docs in list(by_owner.items()):
            if docs.pop(url, None) is not None and not docs:
                del by_owner[owner]

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

    def hooks(
        self, route: Route, path: str
    ) -> tuple[Callable[[Fetch], None], Callable[[Fetch], None]]:
        """``(on_verified, on_settled)`` for the fetch of the index at ``path`` of ``route``."""
        began = False
        family = FAMILIES[route.family]
        index_owner = family.index_owner
        owner = index_owner(path) if index_owner is not None else None
        # A document rewritten by its bytes is read one file's entry at a time.
        lazy_ok = family.lookup is not None and family.file_owners is not None

        provisional = False

        def on_verified(fetch: Fetch) -> None:
            nonlocal began, provisional
            if lazy_ok and owner is not None and fetch.document is not None:
                # Nothing to read now: its files are looked up in its bytes meanwhile.
                provisional = True
                self._provisional(route.family, owner, fetch.request.url, path, fetch.document)
                return
            began = True
            self._begin(route.family, owner)

        def on_settled(fetch: Fetch) -> None:
            if provisional:
                assert owner is not None
                url = fetch.request.url
                docs = self._lazy.get(route.family, {}).get(owner, {})
                if docs.get(url, ("", "", None))[2] is fetch.document:
                    del docs[url]  # still this fetch's: the stored copy takes its place
                if fetch.entry is not None:
                    self._lazily(route, owner, fetch.entry, fresh=False)
                elif url not in self._copies:
                    self.facts.forget(url)  # not stored: what it taught goes with it
                return
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
            return self._learned(entry, self._upstream(items))

        def failed(f: Failure) -> int:
            log.warn("cannot read index {key}: {e}", key=entry.key, e=f.getErrorMessage())
            return 0

        def done(n: int) -> int:
            self._store.unpin(entry)
            return n

        return parsed.addCallbacks(learned, failed).addBoth(done)

    def _upstream(self, items: list[tuple[str, Expect]]) -> list[tuple[str, Expect]]:
        """What a stored copy teaches, keyed by upstream URL (its links may lead
        through this proxy, as one client reached it)."""
        return [(self.upstream_url(u), e) for u, e in items]

    def _learned(self, entry: Entry, items: list[tuple[str, Expect]]) -> int:
        """Record what the document stored as ``entry`` teaches, under its upstream URL
        (the same for every client base), for as long as a copy of it is cached."""
        if self._store.peek(entry.key) is not entry:
            return 0  # gone already
        self._forget_lazy(self._routes[split_key(entry.key)[0]].family, entry.url)
        n = self.facts.add(items, source=entry.url)
        self._copies.setdefault(entry.url, set()).add(entry.key)
        log.debug("learned {n} entries from {key}", n=n, key=entry.key)
        return n

    def _dropped(self, entry: Entry) -> None:
        copies = self._copies.get(entry.url)
        if copies is None:
            return
        copies.discard(entry.key)
        route = self._routes.get(split_key(entry.key)[0])
        if not copies:
            del self._copies[entry.url]
            self.facts.forget(entry.url)
            if route is not None:
                self._forget_lazy(route.family, entry.url)
        elif route is not None:
            # Another copy (for another client base) stands in for this one.
            for docs in self._lazy.get(route.family, {}).values():
                held = docs.get(entry.url)
                if held is not None and held[0] == entry.key:
                    docs[entry.url] = (next(iter(copies)), held[1], None)

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
            log.info(
                "learned {n} artifact checks from cached indexes; {lazy} more indexes are "
                "read as their files are asked for",
                n=len(self.facts),
                lazy=sum(len(d) for by in self._lazy.values() for d in by.values()),
            )
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
            family = FAMILIES[route.family]
            owner = family.index_owner(split_key(e.key)[1]) if family.index_owner else None
            if family.lookup is not None and family.file_owners is not None and owner:
                # Read when one of its files is asked for (and wholly, if need be).
                self._lazily(route, owner, e)
                one_done(None)
                return
            self._begin(route.family, None)
            learned = self.committed(e)
            learned.addBoth(lambda _: self._end(route.family, None))
            learned.addBoth(one_done)

        for route, e in entries:
            relearn_one(route, e)
        return d
