"""A request that needs upstream joins the one fetch for its cache key (single flight).

:class:`Fetches` makes the fetch when none runs (with what the request's family decided,
the learner's hooks for an index, and the names a rewritten document's links get), starts
the background revalidation of a stale entry, and expires a changed document's
companions. What a joined client is answered is root's business.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pkgproxy.cache.keys import cache_key
from pkgproxy.cache.store import CacheStore, Entry
from pkgproxy.diskpool import DiskPool
from pkgproxy.fetch.fetch import Fetch, FetchRequest, Outcome
from pkgproxy.fetch.registry import InFlight
from pkgproxy.learning import Learner
from pkgproxy.observe import Observer
from pkgproxy.rewrite.public import PublicMap
from pkgproxy.upstream.client import UpstreamClient
from pkgproxy.web.exchange import Exchange

log = Logger()


class Fetches:
    """The fetches requests join, made here when none runs for a key."""

    def __init__(
        self,
        inflight: InFlight,
        client: UpstreamClient,
        store: CacheStore,
        pool: DiskPool,
        clock: IReactorTime,
        idle_timeout: float,
        sync_read_max: int,
        learner: Learner,
        observer: Observer,
        public: PublicMap,
    ) -> None:
        self._inflight = inflight
        self._client = client
        self._store = store
        self._pool = pool
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._sync_read_max = sync_read_max
        self._learner = learner
        self._observer = observer
        self._public = public

    def join(self, ex: Exchange, stale: Entry | None) -> tuple[Fetch, bool]:
        """The fetch in flight for the request's key, or a new one, not started yet.

        :return: the fetch, and True if it was made here: the caller then subscribes
            and calls ``start()`` (see :meth:`InFlight.join`).
        """
        on_settled = None

        def factory() -> Fetch:
            nonlocal on_settled
            on_verified = None
            if ex.learn:
                on_verified, on_settled = self._learner.hooks(ex.route, ex.path)
            decision = ex.decision
            return Fetch(
                FetchRequest(
                    ex.key,
                    ex.url,
                    decision,
                    stale,
                    extra_headers={
                        k.encode(): v.encode("latin-1")
                        for k, v in decision.upstream_headers.items()
                    },
                    on_verified=on_verified,
                    # Plain data: the rewriter runs in the disk pool.
                    rewrite_context=self._public.names(ex.base, ex.scheme).context(ex.url)
                    if decision.rewrite is not None
                    else None,
                ),
                self._client,
                self._store,
                self._pool,
                self._clock,
                self._idle_timeout,
                self._sync_read_max,
            )

        fetch, started = self._inflight.join(ex.key, factory)
        if on_settled is not None:
            fetch.when_settled(on_settled)
        if started:
            route = ex.route
            fetch.when_settled(lambda f: self._observer.fetch_settled(route, f))
        return fetch, started

    def revalidate_in_background(self, ex: Exchange, entry: Entry) -> None:
        """Start the upstream check of a stale entry that no client waits for.

        It is an ordinary fetch in the single-flight registry, so requests arriving
        meanwhile join it instead of asking again, and it stores or refreshes the entry
        as any fetch does. A failure changes nothing: the stored copy stays, and the
        next request past the stale window revalidates (or serves stale-if-error).
        """
        fetch, started = self.join(ex, entry)
        if not started:
            return
        key = ex.key

        def answered(f: Fetch) -> None:
            if f.outcome is Outcome.UNREACHABLE:
                log.warn(
                    "background revalidation of {key} failed ({error}); keeping the stored copy",
                    key=key,
                    error=str(f.error),
                )
            elif f.outcome is Outcome.RESPONSE:
                log.warn(
                    "background revalidation of {key}: upstream answered {status}; "
                    "keeping the stored copy",
                    key=key,
                    status=f.status,
                )

        d = fetch.answered()
        d.addCallback(answered)
        d.addErrback(lambda f: log.failure("background revalidation of {key}", f, key=key))
        fetch.start()

    def expire_companions(self, fetch: Fetch, ex: Exchange) -> None:
        """A new body came from upstream: what goes with it is checked before its next use.

        Done when the answer arrives, before this client has the whole body, so the
        companion it asks for next is already due for revalidation. An expiry time of 0
        is past any stale-while-revalidate grace too; stale-if-error still holds.
        """
        if fetch.outcome is not Outcome.STREAM:
            return
        for path in ex.decision.revalidate_also:
            companion = self._store.peek(cache_key(ex.route.name, path))
            if companion is not None and companion.expires is not None:
                companion.expires = 0.0
                self._store.update(companion)
