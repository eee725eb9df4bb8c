"""The proxy's resource: dispatch a request, decide its answer, pick its responder.

Here: admin pages and probes, CONNECT, a POST passed through, routing, the family's
classification, the cache decision, and what a fetch's answer becomes. The work is done
by the rooms named for it: :mod:`~pkgproxy.web.respond` writes every answer (one
``Responder`` each), :mod:`~pkgproxy.web.passthrough` relays what is not cached,
:mod:`~pkgproxy.web.joining` joins a request to its fetch, and
:func:`pkgproxy.cache.freshness.decide` says whether a stored copy is fresh.

Routing is done here rather than by ``Site`` traversal because a forward-proxy request
carries an absolute URI, which Twisted keeps whole in ``request.path``.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from pkgproxy import httputil
from pkgproxy.cache import freshness, keys
from pkgproxy.cache.freshness import Action
from pkgproxy.cache.keys import PACKED, cache_key
from pkgproxy.cache.negative import NegativeCache
from pkgproxy.cache.store import CacheStore, Entry
from pkgproxy.config.model import Config
from pkgproxy.diskpool import DiskPool
from pkgproxy.families import FAMILIES, CacheClass, Decision, Facts
from pkgproxy.families import Request as FamilyRequest
from pkgproxy.fetch.fetch import Fetch, Outcome
from pkgproxy.fetch.finish import digest_file
from pkgproxy.fetch.registry import InFlight
from pkgproxy.learning import Learner
from pkgproxy.observe import Observer
from pkgproxy.tlsca import CertificateAuthority
from pkgproxy.upstream.client import UpstreamClient, UpstreamError
from pkgproxy.upstream.proxy import via_names
from pkgproxy.web import connect, probes
from pkgproxy.web.exchange import Exchange, Trace
from pkgproxy.web.fast import HitPath
from pkgproxy.web.joining import Fetches
from pkgproxy.web.passthrough import Passthrough
from pkgproxy.web.respond import (
    Error,
    Local,
    Means,
    Responder,
    Small,
    Stored,
    Streamed,
    internal_error,
    reason,
)
from pkgproxy.web.routing import RouteError, RouteTable, valid_host
from pkgproxy.web.tunnel import BlindTunnels, Connector

log = Logger()

#: A client's ``max-age=0`` on an index revalidated less than this long ago is answered
#: from the cache: a fleet running ``apt update`` together makes one upstream check.
#: The default of ``cache.revalidate_window``.
REVALIDATE_WINDOW = 30.0
_STALE_WARNING = b'110 pkgproxy "Response is Stale"'
#: A blind tunnel relaying nothing either way for this long (or the client idle timeout,
#: if longer) is closed: git and TLS keep-alives come more often than that.
TUNNEL_IDLE = 600.0
ADMIN_PREFIX = b"/_pkgproxy/"
_PROBES = (b"/_pkgproxy/health", b"/_pkgproxy/ready", b"/_pkgproxy/ca.crt")


class ProxyResource(Resource):
    """Every request lands here; see the module docstring."""

    isLeaf = True

    def __init__(
        self,
        config: Config,
        store: CacheStore,
        inflight: InFlight,
        client: UpstreamClient,
        diskpool: DiskPool,
        clock: IReactorTime,
        idle_timeout: float,
        learner: Learner | None = None,
        sync_read_max: int = 64 * 1024,
        observer: Observer | None = None,
        admin: Resource | None = None,
        ca: CertificateAuthority | None = None,
        tunnel_connector: Connector | None = None,
        revalidate_window: float = REVALIDATE_WINDOW,
    ) -> None:
        super().__init__()
        self._revalidate_window = revalidate_window
        self._ca = ca
        #: Blind tunnels to the hosts [tls_intercept] tunnel lists, if any (and a way
        #: to reach them: the server's reactor, given by tap.py).
        self._tunnels = (
            BlindTunnels(
                config.tls_intercept.tunnel,
                tunnel_connector,
                clock,
                max(config.limits.client_idle_timeout, TUNNEL_IDLE),
            )
            if tunnel_connector is not None and config.tls_intercept.tunnel
            else None
        )
        self._negative = NegativeCache()
        self._observer = observer or Observer()
        self._admin_resource = admin
        self._learner = learner or Learner(Facts(), store, diskpool, config.routes)
        self._table = RouteTable(config.enabled_routes())
        self._node_name = config.node_name
        self._store = store
        self._pool = diskpool
        #: Requests waiting for a stored copy to be hashed (:meth:`_digest_stored`).
        self._digesting: dict[str, list[Exchange]] = {}
        self._inflight = inflight
        self._clock = clock
        #: Serve only from the cache, stale entries too; a miss is a 503, never a fetch.
        self.offline = config.offline
        #: Repeated hits answered below twisted.web (the site's channels use it).
        self.hit_path = HitPath(store, self._learner, self._observer, clock, config.cache.memory)
        self._means = Means(store, diskpool, clock, sync_read_max, self.hit_path, self._unreadable)
        self._passthrough = Passthrough(
            self._table, store, client, clock, idle_timeout, self._serve_stale
        )
        self._fetches = Fetches(
            inflight,
            client,
            store,
            diskpool,
            clock,
            idle_timeout,
            sync_read_max,
            self._learner,
            self._observer,
            self._table.public,
        )
        store.on_drop.append(self._drop_packed)

    def _drop_packed(self, entry: Entry) -> None:
        """A document's gzip form goes with it (purged, evicted)."""
        if not entry.key.endswith(PACKED):
            self._store.remove(entry.key + PACKED)

    def render(self, request: Request) -> bytes | int:
        # Twisted would label a body without a type text/html; unknown stays unknown.
        request.defaultContentType = None
        trace = Trace(self._clock.seconds())
        request.notifyFinish().addCallbacks(
            lambda _: self._report(request, trace, True),
            lambda _: self._report(request, trace, False),
        )
        uri = request.uri.decode("latin-1")
        if (
            self._admin_resource is not None
            and request.path.startswith(ADMIN_PREFIX)
            and request.path not in _PROBES
        ):
            # Admin actions are POSTs: the admin resource checks methods and access.
            result: bytes | int = self._admin_resource.render(request)
            return result
        if request.method == b"POST" and not request.path.startswith(ADMIN_PREFIX):
            passed = self._passthrough.post(request, uri, trace)
            if passed is not None:
                return passed
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            if request.method == b"CONNECT" and (self._ca is not None or self._tunnels is not None):
                return self._connect(request)
            if request.method == b"CONNECT":
                return reason(
                    request,
                    http.NOT_ALLOWED,
                    "CONNECT tunnels are not offered: a tunnel cannot be cached. Use "
                    "http:// sources through this proxy, or its reverse paths such as "
                    "/debian/.",
                )
            return reason(
                request,
                http.NOT_ALLOWED,
                f"{request.method.decode()} is not allowed: this is a read-only cache",
                self._family_of(uri),
            )
        if request.path.startswith(ADMIN_PREFIX):
            return probes.answer(request, self._store, self._learner, self._ca)
        if not self._store.ready:
            request.setHeader(b"retry-after", b"5")
            return reason(request, http.SERVICE_UNAVAILABLE, "the cache is still starting")
        if via_names(request.requestHeaders.getRawHeaders(b"via", []), self._node_name):
            return reason(
                request,
                508,
                f"loop: this request already passed through {self._node_name} (its Via); "
                "a parent must not lead back to its child, and each node needs its own "
                "node_name",
            )
        tunnel = getattr(request.channel, "pkgproxy_tunnel", None)
        if tunnel is not None and uri.startswith("/"):
            uri = tunnel + uri  # a request inside an intercepted CONNECT
        try:
            found = self._table.resolve(uri, tunneled=tunnel is not None)
        except RouteError as e:
            return reason(request, e.code, str(e), e.family)
        route, rest = found
        trace.route, trace.family = route.name, route.family
        path, sep, query = rest.partition("?")
        if FAMILIES[route.family].encoded_slash_ok:
            # npm's @scope%2fname: the slash is part of the name, so it becomes a real
            # one (every spelling, one key), and each segment is still checked below.
            path = path.replace("%2f", "/").replace("%2F", "/")
        try:
            path = httputil.canonical_path(path)
        except httputil.BadPath as e:
            return reason(request, http.BAD_REQUEST, str(e), route.family)
        suffix = f"{path}?{query}" if sep else path
        ex = Exchange(
            request, trace, route, path, cache_key(route.name, suffix), route.upstream + suffix
        )
        ex.watch()
        waiting = self._learner.ready_for(route, path)
        if waiting is not None:
            # An index that may list what this request fetches is being read, or is to
            # be searched for it: wait for its checks.
            waiting.addCallback(lambda _: self._classify(ex))
        else:
            self._classify(ex)
        return NOT_DONE_YET

    def _classify(self, ex: Exchange) -> None:
        if ex.gone:
            return
        route = ex.route
        # Clients may send Accept as several header lines (skopeo: one per media type).
        accept = b", ".join(ex.request.requestHeaders.getRawHeaders(b"accept", [])).decode(
            "latin-1"
        )
        query = ex.url.partition("?")[2]
        decision = FAMILIES[route.family].classify(
            route, ex.path, self._learner.facts, FamilyRequest(accept=accept, query=query)
        )
        ex.decision = decision
        if decision.local is not None:
            Local(decision.local).respond(ex)
            return
        if decision.query_consumed:
            ex.key = cache_key(route.name, ex.path)
            ex.url = ex.url.partition("?")[0]
        if decision.key_scope is not None:
            ex.key = keys.scoped(ex.key, route.name, decision.key_scope)
        if decision.variant:
            ex.key = keys.variant(ex.key, decision.variant)
        if decision.upstream_url is not None:
            query = ex.url.partition("?")[2]
            ex.url = decision.upstream_url + (f"?{query}" if query else "")
        if decision.rewrite is not None:
            # The rewritten links name the proxy as this client reached it.
            tunneled = getattr(ex.request.channel, "pkgproxy_tunnel", None) is not None
            if ex.request.uri.startswith(b"/") and not tunneled:
                ex.base = _client_base(ex.request)
            absolute_https = ex.request.uri[:8].lower() == b"https://"
            ex.scheme = "https" if tunneled or absolute_https else "http"
            ex.key = keys.rewritten(ex.key, ex.base or "forward-" + ex.scheme)
        ex.learn = self._learner.wants(route, ex.path)
        self._handle(ex)

    def _connect(self, request: Request) -> bytes | int:
        return connect.answer(request, self._table, self._ca, self._tunnels)

    def _family_of(self, uri: str) -> str | None:
        """The family a request target belongs to, if any (for the error format)."""
        try:
            return self._table.resolve(uri)[0].family
        except RouteError as e:
            return e.family

    def _report(self, request: Request, trace: Trace, completed: bool) -> None:
        """Tell the observer how a request ended (the access log and metrics)."""
        self._observer.request_done(trace.record(request, self._clock.seconds(), completed))

    # -- the decision ---------------------------------------------------------------

    def _handle(self, ex: Exchange) -> None:
        entry = self._store.get(ex.key)
        if entry is not None:
            if unrecorded(entry, ex.decision) and satisfies(entry, ex.decision, known=True):
                self._digest_stored(ex, entry)
                return
            if not satisfies(entry, ex.decision):
                # Stored before an index said what it must be, and it is not that: fetch
                # it again, and let the new copy replace it.
                log.warn("cached {key} does not match its index; fetching again", key=ex.key)
                entry = None
        self._decide(ex, entry)

    def _digest_stored(self, ex: Exchange, entry: Entry) -> None:
        """An entry stored before an index said what it must be, by a digest it was not
        hashed with (a Go module zip fetched before go looked its hash up, an npm tarball
        fetched from a lockfile before any packument named it): the stored copy is hashed
        once (in the disk pool; the requests for it meanwhile wait for that), the digests
        are recorded with it, and each waiting request is decided again."""
        waiting = self._digesting.get(entry.key)
        if waiting is not None:
            waiting.append(ex)
            return
        self._digesting[entry.key] = [ex]
        algos = unrecorded(entry, ex.decision)
        self._store.pin(entry)
        d = self._pool.run(digest_file, self._store.path_of(entry), algos)

        def recorded(found: dict[str, str]) -> None:
            entry.digests.update(found)
            self._store.update(entry)

        def unreadable(f: Failure) -> None:
            log.warn("cannot hash cached {key}: {why}", key=entry.key, why=f.getErrorMessage())
            if self._store.peek(entry.key) is entry:
                self._store.remove(entry.key)

        def again(_: None) -> None:
            self._store.unpin(entry)
            for one in self._digesting.pop(entry.key, []):
                if not one.gone:
                    self._handle(one)

        d.addCallbacks(recorded, unreadable).addCallback(again)

    def _decide(self, ex: Exchange, entry: Entry | None) -> None:
        req = ex.request
        now = self._clock.seconds()
        decision = ex.decision
        wants_check = httputil.client_wants_revalidation(
            req.getHeader(b"cache-control"), req.getHeader(b"pragma")
        )
        action = Action.ASK
        if entry is not None and decision.cache_class is not CacheClass.PASS:
            # Immutable content, or an index whose content a cached index names (and the
            # entry matched it above): nothing to ask upstream.
            pinned = bool(decision.digests) or decision.size is not None
            action = freshness.decide(
                immutable=decision.cache_class is CacheClass.IMMUTABLE or pinned,
                expires=entry.expires,
                fetched=entry.fetched,
                now=now,
                wants_check=wants_check,
                revalidate_window=self._revalidate_window,
                stale_grace=ex.route.stale_while_revalidate,
            )
            if action is Action.SERVE:
                Stored(self._means, entry, b"HIT").respond(ex)
                return
        if entry is None and decision.remembers_absence:
            absent = self._negative.get(ex.key, now)
            if absent is not None and not freshness.check_due(
                absent.fetched, now, wants_check, self._revalidate_window
            ):
                Small(absent.status, absent.headers, absent.body, b"HIT").respond(ex)
                return
        fetch = self._inflight.get(ex.key)
        if self.offline and fetch is None:
            self._offline(ex, entry, now)
            return
        if entry is not None and self._may_serve_stale(action, entry, now):
            # Stale-while-revalidate: this client gets the stored copy at once; the
            # upstream check runs without it, shared like any fetch, and the next
            # request sees its result.
            req.setHeader(b"warning", _STALE_WARNING)
            Stored(self._means, entry, b"STALE").respond(ex)
            if fetch is None:
                self._fetches.revalidate_in_background(ex, entry)
            return
        if fetch is None and self._store.disk_trouble() and decision.rewrite is None:
            self._passthrough.relay(
                ex, entry if decision.cache_class is not CacheClass.PASS else None
            )
            return
        if (
            fetch is None
            and entry is None
            and req.method == b"HEAD"
            and not (decision.rewrite or decision.head_fetches)
        ):
            # A rewritten document's headers are its own, and a document clients
            # resolve with HEAD (an OCI tag: containerd HEADs it, then GETs by digest; the
            # RubyGems root) must be in the cache to be answered offline: those a HEAD
            # fetches like a GET. Anything else, a HEAD on a miss only asks upstream for
            # the headers.
            self._passthrough.head(ex)
            return
        stale = entry if ex.decision.cache_class is not CacheClass.PASS else None
        fetch, started = self._fetches.join(ex, stale)
        d = fetch.answered()
        d.addCallback(self._answered, ex, started)
        d.addErrback(internal_error, ex)
        if started and decision.revalidate_also:
            expire = fetch.answered().addCallback(self._fetches.expire_companions, ex)
            expire.addErrback(lambda f: log.failure("expiring companions of {key}", f, key=ex.key))
        if started:
            fetch.start()

    def _may_serve_stale(self, action: Action, entry: Entry, now: float) -> bool:
        """Whether an expired index may be answered at once while it is revalidated.

        Only within the route's ``stale_while_revalidate`` after expiry, and never for a
        client that demands a check (``max-age=0``) the last one is too old for: apt
        asks that for every index and must see a new ``InRelease`` at once (both
        :func:`~pkgproxy.cache.freshness.decide`). Nor when the cache disk is in trouble
        (a new copy could not be stored), nor for an ``InRelease`` past its
        ``Valid-Until``.
        """
        return (
            action is Action.SERVE_STALE
            and not self._store.disk_trouble()
            and not self._past_valid_until(entry, now)
        )

    def _answered(self, fetch: Fetch, ex: Exchange, started: bool) -> None:
        ex.trace.upstream_seconds = fetch.answered_at - fetch.started_at
        if ex.gone:
            return
        responder = self._answer_of(fetch, ex, started)
        if responder is not None:
            responder.respond(ex)

    def _answer_of(self, fetch: Fetch, ex: Exchange, started: bool) -> Responder | None:
        """What a client of a fetch that answered gets; ``None`` when it is taken
        elsewhere (asked again, relayed, served stale)."""
        stale = fetch.request.stale
        if fetch.outcome is Outcome.STREAM:
            x_cache = b"MISS" if started else b"COALESCED"
            file = fetch.open_body()
            if file is not None:
                return Streamed(self._means, fetch, file, x_cache)
            if fetch.entry is not None:
                return Stored(self._means, fetch.entry, x_cache)
            if fetch.failed or ex.retried:
                err = fetch.error or UpstreamError("transfer", "download failed")
                return Error(http.BAD_GATEWAY, f"upstream {ex.url}: {err}")
            ex.retried = True  # finished before this client could join; ask again
            self._handle(ex)
            return None
        if fetch.outcome is Outcome.NOT_MODIFIED:
            entry = fetch.entry or stale
            assert entry is not None
            return Stored(self._means, entry, b"REVALIDATED")
        if fetch.outcome is Outcome.RESPONSE:
            if stale is not None and fetch.status >= 500:
                self._serve_stale(ex, stale, f"upstream answered {fetch.status}")
                return None
            decision = ex.decision
            if fetch.status in (404, 410) and decision.remembers_absence:
                ttl = decision.absent_ttl if decision.absent_ttl is not None else decision.ttl
                self._negative.put(
                    ex.key, fetch.status, fetch.headers, fetch.error_body, fetch.answered_at, ttl
                )
            return Small(fetch.status, fetch.headers, fetch.error_body, b"MISS")
        err = fetch.error or UpstreamError("protocol", "no answer")
        if err.kind == "disk" and ex.decision.rewrite is None and not ex.retried:
            ex.retried = True
            self._passthrough.relay(ex, stale)
            return None
        if stale is not None:
            self._serve_stale(ex, stale, str(err))
            return None
        return Error(err.gateway_status, f"upstream {ex.url}: {err}")

    # -- answers ----------------------------------------------------------------------

    def _past_valid_until(self, entry: Entry, now: float) -> bool:
        """Whether an index is past the ``Valid-Until`` it states (apt refuses it then)."""
        known = self._learner.facts.get(entry.url)
        return known is not None and known.not_after is not None and now >= known.not_after

    def _serve_stale(self, ex: Exchange, entry: Entry, why: str) -> None:
        if self._past_valid_until(entry, self._clock.seconds()):
            Error(
                http.GATEWAY_TIMEOUT,
                f"upstream failed ({why}) and the cached copy is past its Valid-Until",
            ).respond(ex)
            return
        log.warn("serving stale {key}: {why}", key=ex.key, why=why)
        ex.request.setHeader(b"warning", _STALE_WARNING)
        Stored(self._means, entry, b"STALE").respond(ex)

    def _offline(self, ex: Exchange, entry: Entry | None, now: float) -> None:
        """Offline mode: answer from the cache (stale with a Warning), or 503."""
        if entry is None or ex.decision.cache_class is CacheClass.PASS:
            Error(
                http.SERVICE_UNAVAILABLE,
                f"offline mode: {ex.url} is not in the cache and upstreams are not contacted",
            ).respond(ex)
        elif entry.is_fresh(now):
            Stored(self._means, entry, b"HIT").respond(ex)
        else:
            ex.request.setHeader(b"warning", _STALE_WARNING)
            Stored(self._means, entry, b"STALE").respond(ex)

    def _unreadable(self, ex: Exchange, entry: Entry, why: str) -> None:
        """A cache file went missing or unreadable: drop the entry and fetch again once."""
        req = ex.request
        log.warn("cache file of {key} is unreadable ({e}); fetching again", key=ex.key, e=why)
        self._store.remove(entry.key)
        if ex.gone:
            return
        if ex.retried:
            Error(http.SERVICE_UNAVAILABLE, "cache file unreadable").respond(ex)
            return
        ex.retried = True
        for h in (b"content-length", b"content-range", b"etag", b"last-modified", b"warning"):
            req.responseHeaders.removeHeader(h)
        req.setResponseCode(http.OK)
        self._handle(ex)


def _client_base(request: Request) -> str:
    """``scheme://host[:port]`` as the client named the proxy (its Host header)."""
    scheme = "https" if request.isSecure() else "http"
    host = request.getHeader(b"host")
    if host:
        name = host.strip(b" \t")
        if name and valid_host(name):
            return f"{scheme}://{name.decode('ascii')}"
    addr = request.getHost()
    return f"{scheme}://{getattr(addr, 'host', 'localhost')}:{getattr(addr, 'port', 80)}"


def satisfies(entry: Entry, decision: Decision, known: bool = False) -> bool:
    """Whether a stored entry is known to be what the family now expects; with
    ``known``, whether nothing recorded of it says otherwise (a digest it was never
    hashed with is not counted against it)."""
    if decision.size is not None and entry.size != decision.size:
        return False
    for algo, want in decision.digests.items():
        have = entry.sha256 if algo == "sha256" else entry.digests.get(algo)
        if have != want and not (known and have is None):
            return False
    return True


def unrecorded(entry: Entry, decision: Decision) -> tuple[str, ...]:
    """The digests ``decision`` expects that ``entry`` was never hashed with."""
    return tuple(sorted(a for a in decision.digests if a != "sha256" and a not in entry.digests))
