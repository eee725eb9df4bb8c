"""The proxy's resource: route a request, answer from the cache or join a fetch.

Routing is done here rather than by ``Site`` traversal because a forward-proxy request
carries an absolute URI, which Twisted keeps whole in ``request.path``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
from pkgproxy.config.model import Config, Route
from pkgproxy.diskpool import DiskPool
from pkgproxy.families import (
    FAMILIES,
    CacheClass,
    Decision,
    Facts,
    LocalAnswer,
    RewriteContext,
)
from pkgproxy.families import Request as FamilyRequest
from pkgproxy.fetch.fetch import Fetch, FetchRequest, Outcome
from pkgproxy.fetch.registry import InFlight
from pkgproxy.learning import Learner
from pkgproxy.observe import Observer, RequestRecord
from pkgproxy.tlsca import CertificateAuthority
from pkgproxy.upstream.client import UpstreamClient, UpstreamError, UpstreamResponse
from pkgproxy.upstream.proxy import via_names
from pkgproxy.web import conditional, connect
from pkgproxy.web.fast import HitPath
from pkgproxy.web.producer import (
    BodyProducer,
    CompleteSource,
    FileRef,
    OwnedFile,
    SendfileProducer,
)
from pkgproxy.web.relay import Relay
from pkgproxy.web.respond import reason as _reason
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


_UNDECIDED = Decision(CacheClass.PASS)
_PROBES = (b"/_pkgproxy/health", b"/_pkgproxy/ready", b"/_pkgproxy/ca.crt")


@dataclass
class _Trace:
    """What the access log and metrics need to know of a request beyond its response."""

    started: float
    route: str = ""
    family: str = ""
    upstream_seconds: float | None = None


@dataclass
class _Ctx:
    """One client request, as the proxy understands it."""

    request: Request
    route: Route
    path: str
    key: str
    url: str
    decision: Decision = _UNDECIDED
    learn: bool = False
    base: str | None = None
    scheme: str = "http"
    gone: bool = False
    retried: bool = False


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
        self._sync_read_max = sync_read_max
        self._learner = learner or Learner(Facts(), store, diskpool, config.routes)
        self._table = RouteTable(config.enabled_routes())
        self._node_name = config.node_name
        self._store = store
        self._inflight = inflight
        self._client = client
        self._pool = diskpool
        self._clock = clock
        self._idle_timeout = idle_timeout
        #: Serve only from the cache, stale entries too; a miss is a 503, never a fetch.
        self.offline = config.offline
        #: Repeated hits answered below twisted.web (the site's channels use it).
        self.hit_path = HitPath(store, self._learner, self._observer, clock, config.cache.memory)
        store.on_drop.append(self._drop_packed)

    def _drop_packed(self, entry: Entry) -> None:
        """A document's gzip form goes with it (purged, evicted)."""
        if not entry.key.endswith(PACKED):
            self._store.remove(entry.key + PACKED)

    def render(self, request: Request) -> bytes | int:
        # Twisted would label a body without a type text/html; unknown stays unknown.
        request.defaultContentType = None
        trace = _Trace(self._clock.seconds())
        request.pkgproxy_trace = trace  # type: ignore[attr-defined]
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
            passed = self._post_through(request, uri)
            if passed is not None:
                return passed
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            if request.method == b"CONNECT" and (self._ca is not None or self._tunnels is not None):
                return self._connect(request)
            if request.method == b"CONNECT":
                return _reason(
                    request,
                    http.NOT_ALLOWED,
                    "CONNECT tunnels are not offered: a tunnel cannot be cached. Use "
                    "http:// sources through this proxy, or its reverse paths such as "
                    "/debian/.",
                )
            return _reason(
                request,
                http.NOT_ALLOWED,
                f"{request.method.decode()} is not allowed: this is a read-only cache",
                self._family_of(uri),
            )
        if request.path.startswith(ADMIN_PREFIX):
            return self._admin(request)
        if not self._store.ready:
            request.setHeader(b"retry-after", b"5")
            return _reason(request, http.SERVICE_UNAVAILABLE, "the cache is still starting")
        if via_names(request.requestHeaders.getRawHeaders(b"via", []), self._node_name):
            return _reason(
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
            return _reason(request, e.code, str(e), e.family)
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
            return _reason(request, http.BAD_REQUEST, str(e), route.family)
        suffix = f"{path}?{query}" if sep else path
        ctx = _Ctx(request, route, path, cache_key(route.name, suffix), route.upstream + suffix)
        request.notifyFinish().addErrback(lambda _: setattr(ctx, "gone", True))
        if self._learner.busy(route, path):
            # An index of this route was just verified and is being read: what this
            # request fetches may be listed there, so wait for its checks.
            self._learner.idle(route, path).addCallback(lambda _: self._classify(ctx))
        else:
            self._classify(ctx)
        return NOT_DONE_YET

    def _classify(self, ctx: _Ctx) -> None:
        if ctx.gone:
            return
        route = ctx.route
        # Clients may send Accept as several header lines (skopeo: one per media type).
        accept = b", ".join(ctx.request.requestHeaders.getRawHeaders(b"accept", [])).decode(
            "latin-1"
        )
        query = ctx.url.partition("?")[2]
        decision = FAMILIES[route.family].classify(
            route, ctx.path, self._learner.facts, FamilyRequest(accept=accept, query=query)
        )
        ctx.decision = decision
        if decision.local is not None:
            self._local(ctx, decision.local)
            return
        if decision.query_consumed:
            ctx.key = cache_key(route.name, ctx.path)
            ctx.url = ctx.url.partition("?")[0]
        if decision.key_scope is not None:
            ctx.key = keys.scoped(ctx.key, route.name, decision.key_scope)
        if decision.variant:
            ctx.key = keys.variant(ctx.key, decision.variant)
        if decision.upstream_url is not None:
            query = ctx.url.partition("?")[2]
            ctx.url = decision.upstream_url + (f"?{query}" if query else "")
        if decision.rewrite is not None:
            # The rewritten links name the proxy as this client reached it.
            tunneled = getattr(ctx.request.channel, "pkgproxy_tunnel", None) is not None
            if ctx.request.uri.startswith(b"/") and not tunneled:
                ctx.base = _client_base(ctx.request)
            absolute_https = ctx.request.uri[:8].lower() == b"https://"
            ctx.scheme = "https" if tunneled or absolute_https else "http"
            ctx.key = keys.rewritten(ctx.key, ctx.base or "forward-" + ctx.scheme)
        ctx.learn = self._learner.wants(route, ctx.path)
        self._handle(ctx)

    def _local(self, ctx: _Ctx, answer: LocalAnswer) -> None:
        req = ctx.request
        for k, v in answer.headers.items():
            req.setHeader(k.encode(), v.encode("latin-1"))
        if answer.location is not None:
            req.setHeader(b"location", answer.location.encode("latin-1"))
        if answer.status >= 300:
            self._write_error(ctx, answer.status, answer.message)
            return
        body = answer.message.encode()
        req.setResponseCode(answer.status)
        req.setHeader(b"content-type", answer.content_type.encode("latin-1"))
        req.setHeader(b"content-length", str(len(body)).encode())
        req.setHeader(b"via", b"1.1 pkgproxy")
        if req.method != b"HEAD":
            req.write(body)
        req.finish()

    def _connect(self, request: Request) -> bytes | int:
        return connect.answer(request, self._table, self._ca, self._tunnels)

    def _post_through(self, request: Request, uri: str) -> int | None:
        """Relay a POST a family passes through (uncached), or ``None`` to refuse it."""
        try:
            route, rest = self._table.resolve(uri)
            path = httputil.canonical_path(rest.partition("?")[0])
        except (RouteError, httputil.BadPath):
            return None
        pattern = FAMILIES[route.family].post_through
        if pattern is None or not pattern.match(path) or not self._store.ready:
            return None
        forwarded = {
            name: value.decode("latin-1")
            for name in ("content-type", "content-encoding", "accept")
            if (value := request.getHeader(name.encode())) is not None
        }
        query = rest.partition("?")[2]
        ctx = _Ctx(
            request,
            route,
            path,
            cache_key(route.name, path),
            route.upstream + path + (f"?{query}" if query else ""),
            Decision(CacheClass.PASS, upstream_headers=forwarded),
        )
        request.pkgproxy_trace.route = route.name  # type: ignore[attr-defined]
        request.pkgproxy_trace.family = route.family  # type: ignore[attr-defined]
        request.notifyFinish().addErrback(lambda _: setattr(ctx, "gone", True))
        content: Any = request.content
        body = b""
        if content is not None:  # spooled by Twisted, at most the site's body cap
            content.seek(0)
            body = content.read()
        self._relay_direct(ctx, None, body)
        return NOT_DONE_YET

    def _family_of(self, uri: str) -> str | None:
        """The family a request target belongs to, if any (for the error format)."""
        try:
            return self._table.resolve(uri)[0].family
        except RouteError as e:
            return e.family

    def _report(self, request: Request, trace: _Trace, completed: bool) -> None:
        """Tell the observer how a request ended (the access log and metrics)."""
        peer = request.getClientAddress()
        self._observer.request_done(
            RequestRecord(
                client=getattr(peer, "host", "-"),
                method=request.method.decode("latin-1"),
                uri=request.uri.decode("latin-1"),
                status=request.code,
                bytes_sent=request.sentLength,
                cache=(request.responseHeaders.getRawHeaders(b"x-cache") or [b""])[-1].decode(),
                route=trace.route,
                family=trace.family,
                duration=self._clock.seconds() - trace.started,
                upstream_seconds=trace.upstream_seconds,
                user_agent=(request.getHeader(b"user-agent") or b"").decode("latin-1"),
                completed=completed,
            )
        )

    def _admin(self, request: Request) -> bytes:
        if request.path in (b"/_pkgproxy/health", b"/_pkgproxy/ready"):
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            failure = self._store.failure
            if failure is not None:
                # Alive but useless: a cache it cannot use (a disk gone, read-only) is
                # a failed health check, so a supervisor restarts or replaces it.
                request.setResponseCode(http.SERVICE_UNAVAILABLE)
                return f"pkgproxy: {failure}\n".encode()
            ready = (self._store.ready and self._learner.ready) or (
                request.path == b"/_pkgproxy/health"
            )
            request.setResponseCode(200 if ready else 503)
            return b"ok\n" if ready else b"starting\n"
        if request.path == b"/_pkgproxy/ca.crt" and self._ca is not None:
            # Public by nature: clients install it to trust intercepted https sources.
            request.setHeader(b"content-type", b"application/x-pem-file")
            return self._ca.cert_pem
        return _reason(request, http.NOT_FOUND, "no such admin page")

    # -- the decision ---------------------------------------------------------------

    def _handle(self, ctx: _Ctx) -> None:
        req = ctx.request
        entry = self._store.get(ctx.key)
        now = self._clock.seconds()
        if entry is not None and not satisfies(entry, ctx.decision):
            # Stored before an index said what it must be, and it is not that (or it
            # cannot be told): fetch it again, and let the new copy replace it.
            log.warn("cached {key} does not match its index; fetching again", key=ctx.key)
            entry = None
        decision = ctx.decision
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
                stale_grace=ctx.route.stale_while_revalidate,
            )
            if action is Action.SERVE:
                self._serve_entry(ctx, entry, b"HIT")
                return
        if entry is None and decision.remembers_absence:
            absent = self._negative.get(ctx.key, now)
            if absent is not None and not freshness.check_due(
                absent.fetched, now, wants_check, self._revalidate_window
            ):
                self._send_small(ctx, absent.status, absent.headers, absent.body, b"HIT")
                return
        fetch = self._inflight.get(ctx.key)
        if self.offline and fetch is None:
            self._offline(ctx, entry, now)
            return
        if entry is not None and self._may_serve_stale(action, entry, now):
            # Stale-while-revalidate: this client gets the stored copy at once; the
            # upstream check runs without it, shared like any fetch, and the next
            # request sees its result.
            req.setHeader(b"warning", _STALE_WARNING)
            self._serve_entry(ctx, entry, b"STALE")
            if fetch is None:
                self._revalidate_in_background(ctx, entry)
            return
        if fetch is None and self._store.disk_trouble() and decision.rewrite is None:
            self._relay_direct(ctx, entry if decision.cache_class is not CacheClass.PASS else None)
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
            self._head_upstream(ctx)
            return
        stale = entry if ctx.decision.cache_class is not CacheClass.PASS else None
        fetch, started = self._join(ctx, stale)
        d = fetch.answered()
        d.addCallback(self._answered, ctx, started)
        d.addErrback(self._internal_error, ctx)
        if started and decision.revalidate_also:
            expire = fetch.answered().addCallback(self._expire_companions, ctx)
            expire.addErrback(lambda f: log.failure("expiring companions of {key}", f, key=ctx.key))
        if started:
            fetch.start()

    def _expire_companions(self, fetch: Fetch, ctx: _Ctx) -> None:
        """A new body came from upstream: what goes with it is checked before its next use.

        Done when the answer arrives, before this client has the whole body, so the
        companion it asks for next is already due for revalidation. An expiry time of 0
        is past any stale-while-revalidate grace too; stale-if-error still holds.
        """
        if fetch.outcome is not Outcome.STREAM:
            return
        for path in ctx.decision.revalidate_also:
            companion = self._store.peek(cache_key(ctx.route.name, path))
            if companion is not None and companion.expires is not None:
                companion.expires = 0.0
                self._store.update(companion)

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

    def _revalidate_in_background(self, ctx: _Ctx, entry: Entry) -> None:
        """Start the upstream check of a stale entry that no client waits for.

        It is an ordinary fetch in the single-flight registry, so requests arriving
        meanwhile join it instead of asking again, and it stores or refreshes the entry
        as any fetch does. A failure changes nothing: the stored copy stays, and the
        next request past the stale window revalidates (or serves stale-if-error).
        """
        fetch, started = self._join(ctx, entry)
        if not started:
            return
        key = ctx.key

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

    def _join(self, ctx: _Ctx, stale: Entry | None) -> tuple[Fetch, bool]:
        """The fetch in flight for the request's key, or a new one, not started yet.

        :return: the fetch, and True if it was made here: the caller then subscribes
            and calls ``start()`` (see :meth:`InFlight.join`).
        """
        on_settled = None

        def factory() -> Fetch:
            nonlocal on_settled
            on_verified = None
            if ctx.learn:
                on_verified, on_settled = self._learner.hooks(ctx.route, ctx.path)
            return Fetch(
                FetchRequest(
                    ctx.key,
                    ctx.url,
                    ctx.decision,
                    stale,
                    extra_headers={
                        k.encode(): v.encode("latin-1")
                        for k, v in ctx.decision.upstream_headers.items()
                    },
                    on_verified=on_verified,
                    rewrite_context=RewriteContext(
                        ctx.url,
                        lambda url: self._table.public_url(url, ctx.base, ctx.scheme),
                        lambda url: self._table.public_prefix(url, ctx.base, ctx.scheme),
                    ),
                ),
                self._client,
                self._store,
                self._pool,
                self._clock,
                self._idle_timeout,
                self._sync_read_max,
            )

        fetch, started = self._inflight.join(ctx.key, factory)
        if on_settled is not None:
            fetch.when_settled(on_settled)
        if started:
            route = ctx.route
            fetch.when_settled(lambda f: self._observer.fetch_settled(route, f))
        return fetch, started

    def _answered(self, fetch: Fetch, ctx: _Ctx, started: bool) -> None:
        trace: _Trace = ctx.request.pkgproxy_trace  # type: ignore[attr-defined]
        trace.upstream_seconds = fetch.answered_at - fetch.started_at
        if ctx.gone:
            return
        stale = fetch.request.stale
        if fetch.outcome is Outcome.STREAM:
            x_cache = b"MISS" if started else b"COALESCED"
            file = fetch.open_body()
            if file is not None:
                self._serve_stream(ctx, fetch, file, x_cache)
            elif fetch.entry is not None:
                self._serve_entry(ctx, fetch.entry, x_cache)
            elif fetch.failed or ctx.retried:
                err = fetch.error or UpstreamError("transfer", "download failed")
                self._write_error(ctx, http.BAD_GATEWAY, f"upstream {ctx.url}: {err}")
            else:
                ctx.retried = True  # finished before this client could join; ask again
                self._handle(ctx)
        elif fetch.outcome is Outcome.NOT_MODIFIED:
            entry = fetch.entry or stale
            assert entry is not None
            self._serve_entry(ctx, entry, b"REVALIDATED")
        elif fetch.outcome is Outcome.RESPONSE:
            if stale is not None and fetch.status >= 500:
                self._serve_stale(ctx, stale, f"upstream answered {fetch.status}")
            else:
                if fetch.status in (404, 410) and ctx.decision.remembers_absence:
                    self._negative.put(
                        ctx.key,
                        fetch.status,
                        fetch.headers,
                        fetch.error_body,
                        fetch.answered_at,
                        ctx.decision.absent_ttl
                        if ctx.decision.absent_ttl is not None
                        else ctx.decision.ttl,
                    )
                self._send_small(ctx, fetch.status, fetch.headers, fetch.error_body, b"MISS")
        else:
            err = fetch.error or UpstreamError("protocol", "no answer")
            if err.kind == "disk" and ctx.decision.rewrite is None and not ctx.retried:
                ctx.retried = True
                self._relay_direct(ctx, stale)
                return
            if stale is not None:
                self._serve_stale(ctx, stale, str(err))
            else:
                self._write_error(ctx, err.gateway_status, f"upstream {ctx.url}: {err}")

    def _internal_error(self, f: Failure, ctx: _Ctx) -> None:
        log.failure("request for {url} failed", f, url=ctx.url)
        self._write_error(ctx, http.INTERNAL_SERVER_ERROR, "internal error")

    def _write_error(self, ctx: _Ctx, code: int, message: str) -> None:
        if ctx.gone:
            return
        body = _reason(ctx.request, code, message, ctx.route.family)
        if body:
            ctx.request.write(body)
        ctx.request.finish()

    # -- answers ----------------------------------------------------------------------

    def _past_valid_until(self, entry: Entry, now: float) -> bool:
        """Whether an index is past the ``Valid-Until`` it states (apt refuses it then)."""
        known = self._learner.facts.get(entry.url)
        return known is not None and known.not_after is not None and now >= known.not_after

    def _serve_stale(self, ctx: _Ctx, entry: Entry, why: str) -> None:
        if self._past_valid_until(entry, self._clock.seconds()):
            self._write_error(
                ctx,
                http.GATEWAY_TIMEOUT,
                f"upstream failed ({why}) and the cached copy is past its Valid-Until",
            )
            return
        log.warn("serving stale {key}: {why}", key=ctx.key, why=why)
        ctx.request.setHeader(b"warning", _STALE_WARNING)
        self._serve_entry(ctx, entry, b"STALE")

    def _offline(self, ctx: _Ctx, entry: Entry | None, now: float) -> None:
        """Offline mode: answer from the cache (stale with a Warning), or 503."""
        if entry is None or ctx.decision.cache_class is CacheClass.PASS:
            self._write_error(
                ctx,
                http.SERVICE_UNAVAILABLE,
                f"offline mode: {ctx.url} is not in the cache and upstreams are not contacted",
            )
        elif entry.is_fresh(now):
            self._serve_entry(ctx, entry, b"HIT")
        else:
            ctx.request.setHeader(b"warning", b'110 pkgproxy "Response is Stale"')
            self._serve_entry(ctx, entry, b"STALE")

    def _serve_entry(self, ctx: _Ctx, entry: Entry, x_cache: bytes) -> None:
        req = ctx.request
        if ctx.decision.rewrite is not None and conditional.takes_gzip(
            req.getHeader(b"accept-encoding")
        ):
            # The gzip form stored beside a rewritten document, if it is of this one.
            sibling = self._store.get(entry.key + PACKED)
            if sibling is not None and sibling.etag == entry.sha256:
                entry = sibling
        etag = f'"{entry.sha256}"'
        own = entry.digests.get(ctx.decision.etag_digest or "")
        if own is not None:
            etag = f'"{own}"'
        elif entry.etag and ctx.decision.rewrite is None:
            etag = entry.etag
        self._set_headers(
            req, entry.headers, ctx.decision.response_headers, x_cache, etag, entry.last_modified
        )
        if conditional.not_modified(req, etag, entry.last_modified):
            req.setResponseCode(http.NOT_MODIFIED)
            req.finish()
            return
        span = conditional.choose_range(req, entry.size, etag, entry.last_modified)
        if span is None:
            return
        start, end = span
        if req.method == b"HEAD":
            req.finish()
            return
        path = self._store.path_of(entry)
        if entry.size <= self._sync_read_max:
            # A small file from a local disk is cheaper to read here than to hand to a
            # thread and back; most package files and every index hit are small.
            try:
                data = _read_span(path, start, end)
            except OSError as e:
                self._unreadable(ctx, entry, str(e))
                return
            if x_cache == b"HIT" and end - start == entry.size:
                self._remember_hit(ctx, entry, data)
            req.write(data)
            req.finish()
            return
        self._store.pin(entry)
        d = self._pool.run(_open_read, path)

        def opened(fd: int) -> None:
            unpin = lambda: self._store.unpin(entry)  # noqa: E731
            if ctx.gone:
                OwnedFile(fd).release()
                unpin()
                return
            if SendfileProducer.usable(req):
                SendfileProducer(req, OwnedFile(fd), start, end, self._clock, unpin).start()
                return
            BodyProducer(
                req,
                OwnedFile(fd),
                CompleteSource(entry.size),
                start,
                end,
                self._pool,
                self._clock,
                on_close=unpin,
            ).start()

        def missing(f: Failure) -> None:
            self._store.unpin(entry)
            self._unreadable(ctx, entry, f.getErrorMessage())

        d.addCallbacks(opened, missing)

    def _remember_hit(self, ctx: _Ctx, entry: Entry, body: bytes) -> None:
        """Let the hit path replay this answer to the next identical request.

        Content pinned by the family (immutable, or named by an index) is answered the
        same way while the entry lasts; an index only while it is fresh.
        """
        decision = ctx.decision
        if (
            decision.cache_class is CacheClass.IMMUTABLE
            or decision.digests
            or decision.size is not None
        ):
            self.hit_path.remember(ctx.request, entry, ctx.route, False, body)
        elif entry.expires is not None:
            self.hit_path.remember(ctx.request, entry, ctx.route, True, body)

    def _unreadable(self, ctx: _Ctx, entry: Entry, why: str) -> None:
        """A cache file went missing or unreadable: drop the entry and fetch again once."""
        req = ctx.request
        log.warn("cache file of {key} is unreadable ({e}); fetching again", key=ctx.key, e=why)
        self._store.remove(entry.key)
        if ctx.gone:
            return
        if ctx.retried:
            self._write_error(ctx, http.SERVICE_UNAVAILABLE, "cache file unreadable")
            return
        ctx.retried = True
        for h in (b"content-length", b"content-range", b"etag", b"last-modified", b"warning"):
            req.responseHeaders.removeHeader(h)
        req.setResponseCode(http.OK)
        self._handle(ctx)

    def _serve_stream(self, ctx: _Ctx, fetch: Fetch, file: FileRef, x_cache: bytes) -> None:
        req = ctx.request
        up = fetch.upstream
        etag_b = up.header(b"etag") if up is not None else None
        lm_b = up.header(b"last-modified") if up is not None else None
        etag = etag_b.decode("latin-1") if etag_b else None
        lm = lm_b.decode("latin-1") if lm_b else None
        headers = {k.decode(): v.decode("latin-1") for k, v in fetch.headers.items()}
        if ctx.decision.rewrite is not None:
            etag = f'"{fetch.sha256}"'  # this is our representation, not the upstream's
        # A part is sent only with the ETag it belongs to; a body whose own ETag is
        # known once it is complete goes out whole, without one.
        ranges = fetch.length is not None and ctx.decision.etag_digest is None
        if ctx.decision.etag_digest is not None:
            etag = None
        self._set_headers(
            req,
            headers,
            ctx.decision.response_headers,
            x_cache,
            etag,
            lm,
            ranges=ranges,
        )
        if etag is not None and conditional.not_modified(req, etag, lm):
            # The client's copy is current even though the cache had to fetch (an
            # upstream that answers If-None-Match with a full 200, as npm's does).
            file.release()
            req.setResponseCode(http.NOT_MODIFIED)
            req.finish()
            return
        start, end = 0, fetch.length
        if ranges:
            assert fetch.length is not None
            span = conditional.choose_range(req, fetch.length, etag, lm)
            if span is None:
                file.release()
                return
            start, end = span
        if req.method == b"HEAD":
            file.release()
            req.finish()
            return
        want = fetch.request.decision
        if up is not None and up.close_delimited and want.size is None and not want.digests:
            # The upstream's body ends with its connection and nothing here can tell a
            # cut from the end: the client gets it framed the same way, not promised
            # whole by a last chunk (nor is it stored: Fetch._storable).
            close_delimited = getattr(req, "close_delimited", None)
            if close_delimited is not None:
                close_delimited()
        closed = fetch.subscribe()

        def unstarted(_: Request) -> None:
            # The fetch failed before the first byte was sent (a download the disk
            # refused and memory could not take on): a response of its own.
            err = fetch.error
            why = str(err) if err is not None else "the download failed"
            code = err.gateway_status if err is not None else 502
            for name in list(req.responseHeaders.getAllRawHeaders()):
                req.responseHeaders.removeHeader(name[0])
            self._write_error(ctx, code, why)

        BodyProducer(
            req,
            file,
            fetch,
            start,
            end,
            self._pool,
            self._clock,
            closed,
            self._sync_read_max,
            unstarted,
        ).start()

    def _send_small(
        self, ctx: _Ctx, status: int, headers: dict[bytes, bytes], body: bytes, x_cache: bytes
    ) -> None:
        """Relay a small upstream answer held in memory (a 404, a 500 and its page)."""
        req = ctx.request
        req.setResponseCode(status)
        for k, v in headers.items():
            req.setHeader(k, v)
        req.setHeader(b"via", b"1.1 pkgproxy")
        req.setHeader(b"x-cache", x_cache)
        req.setHeader(b"content-length", str(len(body)).encode())
        if req.method != b"HEAD":
            req.write(body)
        req.finish()

    def _relay_direct(self, ctx: _Ctx, stale: Entry | None, body: bytes | None = None) -> None:
        """Stream an answer from upstream to this client and store nothing.

        For a miss while the cache disk is in trouble, and for the few POSTs a family
        passes through (npm's audit); ``body`` is the POST's body.
        """
        method = ctx.request.method if ctx.request.method in (b"HEAD", b"POST") else b"GET"
        headers = {
            k.encode(): v.encode("latin-1") for k, v in ctx.decision.upstream_headers.items()
        }
        d = self._client.request(method, ctx.url, headers, body)

        def got(resp: UpstreamResponse) -> None:
            if ctx.gone:
                resp.discard()
                return
            if resp.status >= 500 and stale is not None:
                resp.discard()
                self._serve_stale(ctx, stale, f"upstream answered {resp.status}")
                return
            req = ctx.request
            req.setResponseCode(resp.status)
            for name in (
                b"content-type",
                b"content-length",
                b"last-modified",
                b"etag",
                b"docker-content-digest",
            ):
                value = resp.header(name)
                if value is not None:
                    req.setHeader(name, value)
            for k, v in ctx.decision.response_headers.items():
                req.setHeader(k.encode(), v.encode("latin-1"))
            req.setHeader(b"via", b"1.1 pkgproxy")
            req.setHeader(b"x-cache", b"MISS")
            if method == b"HEAD":
                resp.discard()
                req.finish()
                return
            resp.response.deliverBody(Relay(req, resp, self._clock, self._idle_timeout))

        def failed(f: Failure) -> None:
            err = f.value if isinstance(f.value, UpstreamError) else None
            if stale is not None and err is not None:
                self._serve_stale(ctx, stale, str(err))
            elif err is not None:
                self._write_error(ctx, err.gateway_status, f"upstream {ctx.url}: {err}")
            else:
                self._internal_error(f, ctx)

        d.addCallbacks(got, failed)

    def _head_upstream(self, ctx: _Ctx) -> None:
        """A HEAD on a miss asks upstream for headers only: no body is downloaded.

        It is negotiated like the GET would be (containerd resolves tags with HEAD), and
        answers with the headers the GET would carry.
        """
        decision = ctx.decision
        headers = {k.encode(): v.encode("latin-1") for k, v in decision.upstream_headers.items()}
        trace: _Trace = ctx.request.pkgproxy_trace  # type: ignore[attr-defined]
        asked = self._clock.seconds()
        d = self._client.request(b"HEAD", ctx.url, headers)

        def got(resp: UpstreamResponse) -> None:
            resp.discard()
            trace.upstream_seconds = self._clock.seconds() - asked
            if ctx.gone:
                return
            req = ctx.request
            req.setResponseCode(resp.status)
            names = [b"content-type", b"content-length", b"last-modified", b"etag"]
            if decision.digest_header:
                names.append(decision.digest_header.lower().encode())
            for name in names:
                value = resp.header(name)
                if value is not None:
                    req.setHeader(name, value)
            if resp.status == 200:
                for k, v in decision.response_headers.items():
                    req.setHeader(k.encode(), v.encode("latin-1"))
                req.setHeader(b"accept-ranges", b"bytes")
            req.setHeader(b"via", b"1.1 pkgproxy")
            req.setHeader(b"x-cache", b"MISS")
            req.finish()

        def failed(f: Failure) -> None:
            err = f.value
            if isinstance(err, UpstreamError):
                self._write_error(ctx, err.gateway_status, f"upstream {ctx.url}: {err}")
            else:
                self._internal_error(f, ctx)

        d.addCallbacks(got, failed)

    # -- header helpers -----------------------------------------------------------------

    @staticmethod
    def _set_headers(
        req: Request,
        headers: dict[str, str],
        extra: Mapping[str, str],
        x_cache: bytes,
        etag: str | None,
        last_modified: str | None,
        ranges: bool = True,
    ) -> None:
        for k, v in headers.items():
            req.setHeader(k.encode(), v.encode("latin-1"))
        for k, v in extra.items():
            req.setHeader(k.encode(), v.encode("latin-1"))
        if etag:
            req.setHeader(b"etag", etag.encode("latin-1"))
        if last_modified:
            req.setHeader(b"last-modified", last_modified.encode("latin-1"))
        if ranges:
            req.setHeader(b"accept-ranges", b"bytes")
        req.setHeader(b"via", b"1.1 pkgproxy")
        req.setHeader(b"x-cache", x_cache)


#: A Host header usable as the base of rewritten links: an ASCII name or address, port.


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


def satisfies(entry: Entry, decision: Decision) -> bool:
    """Whether a stored entry is known to be what the family now expects."""
    if decision.size is not None and entry.size != decision.size:
        return False
    for algo, want in decision.digests.items():
        have = entry.sha256 if algo == "sha256" else entry.digests.get(algo)
        if have != want:
            return False
    return True


def _read_span(path: str, start: int, end: int) -> bytes:
    """``[start, end)`` of a small file; a short read is an error, never a short body."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, end - start, start)
    finally:
        os.close(fd)
    if len(data) != end - start:
        raise OSError(f"short read: {len(data)} of {end - start} bytes")
    return data


def _open_read(path: str) -> int:
    return os.open(path, os.O_RDONLY)
