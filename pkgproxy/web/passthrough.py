"""Answers relayed from upstream and never stored.

- a POST a family passes through (npm's audit), relayed as it is;
- a miss while the cache disk is in trouble (full, read-only): streamed to the client,
  stale if upstream fails and a stored copy exists;
- a HEAD on a miss: upstream is asked for headers only, no body is downloaded.

There is no single flight here: each client is its own upstream request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from pkgproxy import httputil
from pkgproxy.cache.keys import cache_key
from pkgproxy.cache.store import CacheStore, Entry
from pkgproxy.families import FAMILIES, CacheClass, Decision
from pkgproxy.upstream.client import UpstreamClient, UpstreamError, UpstreamResponse
from pkgproxy.web.exchange import Exchange, Trace
from pkgproxy.web.producer import frame_as_upstream
from pkgproxy.web.relay import Relay
from pkgproxy.web.respond import VIA, Error, internal_error
from pkgproxy.web.routing import RouteError, RouteTable

#: Headers of a relayed answer the client gets (the rest are the upstream's business).
_RELAYED = (b"content-type", b"content-length", b"last-modified", b"etag")
#: Headers of a POST passed on upstream.
_FORWARDED = ("content-type", "content-encoding", "accept")


class Passthrough:
    """Relays requests upstream without the cache.

    :param serve_stale: ``(exchange, entry, why)``: answer a stored copy because upstream
        failed (root's rule, with its ``Valid-Until`` check).
    """

    def __init__(
        self,
        table: RouteTable,
        store: CacheStore,
        client: UpstreamClient,
        clock: IReactorTime,
        idle_timeout: float,
        serve_stale: Callable[[Exchange, Entry, str], None],
    ) -> None:
        self._table = table
        self._store = store
        self._client = client
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._serve_stale = serve_stale

    def post(self, request: Request, uri: str, trace: Trace) -> int | None:
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
            for name in _FORWARDED
            if (value := request.getHeader(name.encode())) is not None
        }
        query = rest.partition("?")[2]
        trace.route, trace.family = route.name, route.family
        ex = Exchange(
            request,
            trace,
            route,
            path,
            cache_key(route.name, path),
            route.upstream + path + (f"?{query}" if query else ""),
            Decision(CacheClass.PASS, upstream_headers=forwarded),
        )
        ex.watch()
        content: Any = request.content
        body = b""
        if content is not None:  # spooled by Twisted, at most the site's body cap
            content.seek(0)
            body = content.read()
        self.relay(ex, None, body)
        return NOT_DONE_YET

    def relay(self, ex: Exchange, stale: Entry | None, body: bytes | None = None) -> None:
        """Stream an answer from upstream to this client and store nothing.

        For a miss while the cache disk is in trouble, and for the few POSTs a family
        passes through (npm's audit); ``body`` is the POST's body.
        """
        method = ex.request.method if ex.request.method in (b"HEAD", b"POST") else b"GET"
        headers = {k.encode(): v.encode("latin-1") for k, v in ex.decision.upstream_headers.items()}
        d = self._client.request(method, ex.url, headers, body)

        def got(resp: UpstreamResponse) -> None:
            if ex.gone:
                resp.discard()
                return
            if resp.status >= 500 and stale is not None:
                resp.discard()
                self._serve_stale(ex, stale, f"upstream answered {resp.status}")
                return
            req = ex.request
            req.setResponseCode(resp.status)
            for name in (*_RELAYED, b"docker-content-digest"):
                value = resp.header(name)
                if value is not None:
                    req.setHeader(name, value)
            for k, v in ex.decision.response_headers.items():
                req.setHeader(k.encode(), v.encode("latin-1"))
            req.setHeader(b"via", VIA)
            req.setHeader(b"x-cache", b"MISS")
            if method == b"HEAD":
                resp.discard()
                req.finish()
                return
            frame_as_upstream(req, resp, proven=False)
            resp.response.deliverBody(Relay(req, resp, self._clock, self._idle_timeout))

        def failed(f: Failure) -> None:
            err = f.value if isinstance(f.value, UpstreamError) else None
            if stale is not None and err is not None:
                self._serve_stale(ex, stale, str(err))
            elif err is not None:
                Error(err.gateway_status, f"upstream {ex.url}: {err}").respond(ex)
            else:
                internal_error(f, ex)

        d.addCallbacks(got, failed)

    def head(self, ex: Exchange) -> None:
        """A HEAD on a miss asks upstream for headers only: no body is downloaded.

        It is negotiated like the GET would be (containerd resolves tags with HEAD), and
        answers with the headers the GET would carry.
        """
        decision = ex.decision
        headers = {k.encode(): v.encode("latin-1") for k, v in decision.upstream_headers.items()}
        asked = self._clock.seconds()
        d = self._client.request(b"HEAD", ex.url, headers)

        def got(resp: UpstreamResponse) -> None:
            resp.discard()
            ex.trace.upstream_seconds = self._clock.seconds() - asked
            if ex.gone:
                return
            req = ex.request
            req.setResponseCode(resp.status)
            names = list(_RELAYED)
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
            req.setHeader(b"via", VIA)
            req.setHeader(b"x-cache", b"MISS")
            req.finish()

        def failed(f: Failure) -> None:
            err = f.value
            if isinstance(err, UpstreamError):
                Error(err.gateway_status, f"upstream {ex.url}: {err}").respond(ex)
            else:
                internal_error(f, ex)

        d.addCallbacks(got, failed)
