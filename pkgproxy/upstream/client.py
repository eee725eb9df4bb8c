"""The upstream side: Twisted's ``Agent`` over one persistent connection pool, bounded
per host, raw bytes, redirects inside.

The layers, outermost first: :class:`UpstreamClient` (targets checked, redirects by the
route's policy, Bearer/Basic challenges answered), :class:`~pkgproxy.upstream.limits
.LimitedAgent` (circuit breaker, slots per origin, head timeout), the ``Agent`` (or the
:class:`~pkgproxy.upstream.proxy.ProxyingAgent` when a proxy or parent is configured),
the :class:`~pkgproxy.upstream.pool.HedgingPool` and :class:`_Endpoints` (TCP, TLS with
the route's trust, CONNECT tunnels).

Why not treq here: treq always wraps its agent in a gzip ContentDecoderAgent, and a
cache must store the bytes exactly as the repository signed them. Why redirects inside:
apt, pip and Docker clients must never be sent away from the cache (and apt refuses
https-to-http redirects anyway).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

from twisted.application.service import Service
from twisted.internet import error as net_error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    fail,
    inlineCallbacks,
)
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import (  # type: ignore[attr-defined]
    HTTP11ClientProtocol,
    _IdentityTransferDecoder,
)
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    ResponseFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IPolicyForHTTPS,
    IResponse,
)
from zope.interface import implementer

from pkgproxy.config.model import Route, UpstreamConfig
from pkgproxy.tcpwrite import flush, no_delay
from pkgproxy.upstream.errors import UpstreamError as UpstreamError
from pkgproxy.upstream.limits import HeldResponse, LimitedAgent, _origin
from pkgproxy.upstream.pool import HedgingPool
from pkgproxy.upstream.proxy import (
    Proxy,
    ProxyingAgent,
    ProxySettings,
    TunnelEndpoint,
    proxy_settings,
)
from pkgproxy.upstream.redirects import RedirectPolicy, is_internal

log = Logger()
_REDIRECTS = (301, 302, 303, 307, 308)
_SENSITIVE = (b"authorization", b"cookie", b"proxy-authorization")


@dataclass
class UpstreamResponse:
    """An upstream answer whose body has not been read yet.

    The caller must either deliver the body (``response.deliverBody``) or call
    :meth:`discard`, and call ``release`` when done, which frees the per-host slot.
    """

    url: str
    status: int
    headers: Headers
    response: IResponse
    release: Callable[[], None]

    @property
    def close_delimited(self) -> bool:
        """The body has neither a length nor chunked framing: it ends with the
        connection, so a clean close cannot be told from one that cut it short."""
        inner = getattr(self.response, "original", self.response)
        return bool(getattr(inner, "pkgproxy_close_delimited", False))

    def header(self, name: bytes) -> bytes | None:
        """The last value of one response header."""
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None

    def discard(self) -> None:
        """Drop the body and release the slot.

        A small body (a redirect, a HEAD answer) is read to its end so the connection
        goes back to the pool; a large one closes the connection.
        """
        self.response.deliverBody(_Discard())
        self.release()


class _Discard(Protocol):
    _left = 64 * 1024

    def dataReceived(self, data: bytes) -> None:
        self._left -= len(data)
        if self._left < 0 and self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


def origin_key(url: str) -> str:
    """``scheme://host:port`` of a URL, the unit credentials are configured for."""
    scheme, host, port = _origin(url)
    return f"{scheme}://{host}:{port}"


def _basic(creds: tuple[str, str]) -> bytes:
    return b"Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode())


def _directory(url: str) -> str:
    """A URL without its query and last segment: the token area of a URL no family scopes."""
    return url.split("?", 1)[0].rsplit("/", 1)[0]


def _challenge_params(value: str) -> dict[str, str]:
    """The ``key="value"`` parameters of a ``WWW-Authenticate: Bearer`` challenge."""
    return {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in re.finditer(r'([A-Za-z_]+)\s*=\s*(?:"([^"]*)"|([^,\s]*))', value[6:])
    }


async def read_small(resp: UpstreamResponse, cap: int) -> bytes:
    """Read a small body whole (a token, an error page), at most ``cap`` bytes (a larger
    one is cut off there and its connection closed); free the slot."""
    done: Deferred[None] = Deferred()
    collector = _Small(done, cap)
    resp.response.deliverBody(collector)
    try:
        await done
    finally:
        resp.release()
    return b"".join(collector.chunks)


class _Small(Protocol):
    def __init__(self, done: Deferred[None], cap: int) -> None:
        self.chunks: list[bytes] = []
        self._left = cap
        self._done = done

    def dataReceived(self, data: bytes) -> None:
        if self._left > 0:
            self.chunks.append(data[: self._left])
        self._left -= len(data)
        if self._left < 0 and self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self._done.called:
            self._done.callback(None)


def _describe(f: Failure) -> UpstreamError:
    """Map a Twisted failure to an :class:`UpstreamError` an operator can read."""
    e = f.value
    if isinstance(e, UpstreamError):
        return e
    if isinstance(e, CancelledError | net_error.TimeoutError):
        return UpstreamError("timeout", "upstream did not answer in time", 504)
    if isinstance(e, net_error.DNSLookupError):
        return UpstreamError("dns", f"upstream host name did not resolve: {e}")
    if isinstance(e, net_error.ConnectionRefusedError):
        return UpstreamError("connect", "upstream refused the connection")
    if isinstance(e, net_error.ConnectError):
        return UpstreamError("connect", f"cannot connect to upstream: {e}")
    if isinstance(e, ResponseFailed | ResponseNeverReceived):
        inner = e.reasons[0].value if e.reasons else e
        if isinstance(inner, CancelledError | net_error.TimeoutError):
            return UpstreamError("timeout", "upstream did not answer in time", 504)
        if "SSL" in type(inner).__name__ or "certificate" in str(inner).lower():
            return UpstreamError("tls", f"TLS failure talking to upstream: {inner}")
        return UpstreamError("protocol", f"upstream connection failed: {inner!r}")
    return UpstreamError("protocol", f"upstream request failed: {e!r}")


@implementer(IBodyProducer)
class _BytesBody:
    """A small request body, written at once (no cooperator, no global reactor)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._body)
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class UpstreamClient:
    """Sends requests upstream through one agent wrapped in its limits, following the
    redirects the route allows and answering auth challenges.

    :param agent: production: an ``Agent`` over a persistent pool; tests: any
        ``IAgent``.
    """

    def __init__(
        self,
        agent: IAgent,
        clock: IReactorTime,
        config: UpstreamConfig,
        credentials: Mapping[str, tuple[str, str]] | None = None,
        routes: Iterable[Route] = (),
        auth_scopes: Mapping[str, Callable[[str], str]] | None = None,
    ) -> None:
        """:param auth_scopes: by family name, the part of a path below a route's
        upstream that one bearer token covers (``Family.auth_scope``, given by the
        caller: this room knows no family)."""
        routes = tuple(routes)
        self._limited = LimitedAgent(agent, clock, config)
        self._redirects = RedirectPolicy(routes)
        #: ``(upstream prefix, scope)`` of the routes whose family scopes its tokens,
        #: longest prefix first.
        scopes = auth_scopes or {}
        self._scoped = sorted(
            ((r.upstream, scopes[r.family]) for r in routes if r.family in scopes),
            key=lambda s: -len(s[0]),
        )
        #: (username, password) by upstream origin (``scheme://host:port``).
        self._credentials = {origin_key(k): v for k, v in (credentials or {}).items()}
        self._clock = clock
        self._config = config
        #: Bearer tokens by (realm, service, scope), with their expiry time.
        self._tokens: dict[tuple[str, str, str], tuple[bytes, float]] = {}
        #: The token scope last asked for by each area of an upstream (see _auth_area).
        self._scopes: dict[str, tuple[str, str, str]] = {}

    @property
    def _agent(self) -> IAgent:
        """The agent the limits wrap (tests swap it)."""
        return self._limited.agent

    @_agent.setter
    def _agent(self, agent: IAgent) -> None:
        self._limited.agent = agent

    def active(self) -> int:
        """How many upstream requests hold a connection slot now."""
        return self._limited.active()

    def request(
        self,
        method: bytes,
        url: str,
        headers: dict[bytes, bytes] | None = None,
        body: bytes | None = None,
    ) -> Deferred[UpstreamResponse]:
        """Send one request, following redirects; errors arrive as :class:`UpstreamError`.

        :param body: a small request body (a relayed POST), sent again on a retry.
        """
        hdrs = dict(headers or {})
        # The common answer (no redirect, no challenge) takes plain callbacks; the rest
        # continues in _request from that first answer.
        d = self._one(method, url, self._with_token(url, hdrs), body)
        d.addCallback(self._first_answer, method, url, hdrs, body)
        return d.addErrback(lambda f: Failure(_describe(f)))

    def _first_answer(
        self,
        resp: UpstreamResponse,
        method: bytes,
        url: str,
        headers: dict[bytes, bytes],
        body: bytes | None,
    ) -> UpstreamResponse | Deferred[UpstreamResponse]:
        if resp.status not in _REDIRECTS and resp.status != 401:
            return resp
        return Deferred.fromCoroutine(self._request(method, url, headers, body, resp))

    async def _request(
        self,
        method: bytes,
        url: str,
        headers: dict[bytes, bytes],
        body: bytes | None = None,
        first: UpstreamResponse | None = None,
    ) -> UpstreamResponse:
        start = url
        for _hop in range(self._config.max_redirects + 1):
            resp = await self._authorized(method, url, headers, body, first)
            first = None
            if resp.status not in _REDIRECTS:
                return resp
            location = resp.header(b"location")
            resp.discard()
            if not location:
                raise UpstreamError("redirect", f"upstream sent {resp.status} without Location")
            if body is not None or method not in (b"GET", b"HEAD"):
                # A body is never sent again, to anywhere: a 307 to a POST is not followed.
                raise UpstreamError("redirect", f"upstream redirected a {method.decode()}")
            try:
                target = safe_target(urljoin(url, location.decode("latin-1")))
            except UpstreamError:
                raise UpstreamError("redirect", "upstream redirected to a bad Location") from None
            if urlsplit(target).scheme not in ("http", "https"):
                raise UpstreamError("redirect", f"upstream redirected to {target[:200]!r}")
            if urlsplit(url).scheme == "https" and urlsplit(target).scheme == "http":
                raise UpstreamError("redirect", f"refusing https to http redirect to {target}")
            why = self._redirects.refusal(start, target)
            if why is not None:
                raise UpstreamError("redirect", why)
            if _origin(target) != _origin(url):
                headers = {k: v for k, v in headers.items() if k.lower() not in _SENSITIVE}
            url = target
        raise UpstreamError("redirect", f"more than {self._config.max_redirects} redirects")

    def _auth_area(self, url: str) -> str:
        """The part of a URL one token covers, as the family of its route says."""
        base = url.split("?", 1)[0]
        for upstream, scope in self._scoped:
            if base.startswith(upstream):
                return upstream + scope(base[len(upstream) :])
        return _directory(base)

    def _with_token(self, url: str, headers: dict[bytes, bytes]) -> dict[bytes, bytes]:
        """``headers`` with the Bearer token last handed out for this URL's area, if any."""
        if not self._tokens:
            return headers
        token = self._tokens.get(self._scopes.get(self._auth_area(url), ("", "", "")))
        if token is not None and token[1] > self._clock.seconds():
            return {**headers, b"authorization": b"Bearer " + token[0]}
        return headers

    async def _authorized(
        self,
        method: bytes,
        url: str,
        headers: dict[bytes, bytes],
        body: bytes | None = None,
        first: UpstreamResponse | None = None,
    ) -> UpstreamResponse:
        """One request, answering a Bearer challenge (RFC 6750) with a token once.

        Registries (Docker Hub, ghcr.io, a local distribution) challenge anonymous pulls
        with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...``; the token
        service hands out a short-lived token for that scope, cached here until shortly
        before it expires. Client credentials are never used: the proxy pulls
        anonymously.
        """
        area = self._auth_area(url)
        headers = self._with_token(url, headers)
        resp = first if first is not None else await self._one(method, url, headers, body)
        challenge = resp.header(b"www-authenticate") if resp.status == 401 else None
        creds = self._credentials.get(origin_key(url))
        if challenge is not None and challenge.lower().startswith(b"basic") and creds:
            resp.discard()
            return await self._one(method, url, {**headers, b"authorization": _basic(creds)}, body)
        if challenge is None or not challenge.lower().startswith(b"bearer"):
            return resp
        params = _challenge_params(challenge.decode("latin-1"))
        realm = params.get("realm", "")
        if urlsplit(realm).scheme not in ("http", "https"):
            return resp
        if is_internal(urlsplit(realm).hostname or "") and not is_internal(_origin(url)[1]):
            resp.discard()
            raise UpstreamError("auth", f"token realm {realm[:200]} is an internal address")
        resp.discard()
        key = (realm, params.get("service", ""), params.get("scope", ""))
        value, expires = await self._token(key, creds)
        self._tokens[key] = (value, expires)
        self._scopes[area] = key
        return await self._one(method, url, {**headers, b"authorization": b"Bearer " + value}, body)

    async def _token(
        self, key: tuple[str, str, str], creds: tuple[str, str] | None
    ) -> tuple[bytes, float]:
        """Ask a token service for a token: ``(token, expiry time)``.

        With credentials configured for the registry, they go to its token service as
        HTTP Basic (the token service is often another host: auth.docker.io).
        """
        realm, service, scope = key
        query = urlencode([(k, v) for k, v in (("service", service), ("scope", scope)) if v])
        url = realm + ("&" if "?" in realm else "?") + query if query else realm
        resp = await self._one(b"GET", url, {b"authorization": _basic(creds)} if creds else {})
        body = await read_small(resp, 256 * 1024)
        if resp.status != 200:
            raise UpstreamError("auth", f"token service {realm} answered {resp.status}")
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
            lifetime = float(data.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            raise UpstreamError("auth", f"token service {realm} sent no token") from None
        if not isinstance(token, str) or not token:
            raise UpstreamError("auth", f"token service {realm} sent no token")
        return token.encode("latin-1"), self._clock.seconds() + max(0.0, lifetime - 10)

    def _one(
        self, method: bytes, url: str, headers: dict[bytes, bytes], body: bytes | None = None
    ) -> Deferred[UpstreamResponse]:
        # Everything a client could get wrong is checked before a slot is taken or the
        # breaker is looked at: a bad target is the client's fault, never the upstream's.
        try:
            url = safe_target(url)
            _check_method(method)
        except UpstreamError:
            return fail()
        hdrs = Headers({k: [v] for k, v in headers.items()})
        if not hdrs.hasHeader(b"accept-encoding"):
            # Raw bytes unless a family asked for a coding it undoes itself (an index
            # it rewrites, taken gzip-compressed as direct clients take it).
            hdrs.setRawHeaders(b"accept-encoding", [b"identity"])
        producer = _BytesBody(body) if body is not None else None
        d = self._limited.request(method, url.encode("ascii"), hdrs, producer)
        return d.addCallback(_answer, url)


def _answer(response: IResponse, url: str) -> UpstreamResponse:
    assert isinstance(response, HeldResponse)
    return UpstreamResponse(url, response.code, response.headers, response, response.release)


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET_OK = re.compile(r"[\x21-\x7e]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_method(method: bytes) -> None:
    if not _TOKEN.fullmatch(method):
        raise UpstreamError("request", f"invalid method {method[:20]!r}", 400)


def safe_target(url: str) -> str:
    """``url`` as it may go on a request line: spaces and non-ASCII characters
    percent-encoded (a target arrives decoded as latin-1, one character per byte);
    a control character is refused with an :class:`UpstreamError` (kind ``request``)."""
    if _TARGET_OK.fullmatch(url):
        return url
    if _CONTROL.search(url):
        raise UpstreamError("request", f"control character in upstream target {url[:80]!r}", 400)
    out = []
    for c in url:
        if "!" <= c <= "~":
            out.append(c)
        else:
            data = c.encode("latin-1") if c <= "\xff" else c.encode("utf-8")
            out.append("".join(f"%{b:02X}" for b in data))
    return "".join(out)


def route_ca_files(routes: Iterable[Route]) -> dict[tuple[str, int], tuple[str, ...]]:
    """The ``ca_file`` of routes by their https upstream's ``(host, port)``.

    TLS is per connection, and connections are pooled per host and port, so a CA file
    applies to its upstream's whole host:port; two routes there trust both files.
    """
    out: dict[tuple[str, int], tuple[str, ...]] = {}
    for r in routes:
        scheme, host, port = _origin(r.upstream)
        if r.ca_file is not None and scheme == "https" and port is not None:
            files = out.get((host, port), ())
            out[(host, port)] = files if r.ca_file in files else (*files, r.ca_file)
    return out


@implementer(IPolicyForHTTPS)
class RouteTrustPolicy:
    """TLS verification with a route's own CA for its upstream, the default elsewhere.

    An internal mirror signed by a private CA should not need that CA trusted for every
    host (``upstream.ca_bundle``): only its ``host:port`` is verified against it, and
    against it alone; host names are still checked (service-identity). Every other host
    goes to ``default`` (the browser-like policy over the global trust root).
    """

    def __init__(
        self, default: IPolicyForHTTPS, ca_files: Mapping[tuple[str, int], Sequence[str]]
    ) -> None:
        self._default = default
        # Read once, at start: the config check made sure each file holds a certificate.
        self._roots = {key: _trust_root_of(paths) for key, paths in ca_files.items()}

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """Client TLS options for one upstream connection."""
        name = hostname.decode("ascii")
        root = self._roots.get((name.lower(), port))
        if root is None:
            creator: IOpenSSLClientConnectionCreator = self._default.creatorForNetloc(
                hostname, port
            )
            return creator
        return optionsForClientTLS(name, trustRoot=root)


class UpstreamService(Service):
    """Owns the upstream agent and its kept-alive connections, closed when the server stops."""

    def __init__(
        self,
        reactor: Any,
        config: UpstreamConfig,
        credentials: Mapping[str, tuple[str, str]] | None = None,
        ca_files: Mapping[tuple[str, int], Sequence[str]] | None = None,
        routes: Iterable[Route] = (),
        environ: Mapping[str, str] | None = None,
        node_name: str | None = None,
        auth_scopes: Mapping[str, Callable[[str], str]] | None = None,
    ) -> None:
        """:param environ: where ``https_proxy``/``http_proxy``/``no_proxy`` are read
        when the config names no proxy (the process environment, given by the caller).
        :param node_name: named in ``Via`` on requests to a parent.
        :param auth_scopes: see :class:`UpstreamClient`."""
        self._reactor = reactor
        self._config = config
        policy: IPolicyForHTTPS = BrowserLikePolicyForHTTPS(trustRoot=_trust_root(config.ca_bundle))
        if ca_files:
            policy = RouteTrustPolicy(policy, ca_files)
        proxies = proxy_settings(
            config.proxy, config.no_proxy, environ or {}, config.parent, config.parent_only
        )
        endpoints = _Endpoints(
            reactor,
            policy,
            config.connect_timeout,
            proxies,
            internal_ok=RedirectPolicy(routes).may_resolve_internal,
        )
        self.pool = _Pool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = config.max_connections_per_host
        self.pool.cachedConnectionTimeout = config.keepalive_timeout  # type: ignore[assignment]
        self.pool.retryAutomatically = True  # GET and HEAD without a body, once
        self.pool.connect_timeout = config.connect_timeout
        self.agent: IAgent
        if proxies.active:
            agent = ProxyingAgent.create(reactor, endpoints, self.pool, proxies)
            agent.parent_retry_after = config.retry_after
            if node_name:
                agent.via = b"1.1 " + node_name.encode("ascii")
            self.agent = agent
        else:
            self.agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self.pool)
        self.client = UpstreamClient(self.agent, reactor, config, credentials, routes, auth_scopes)

    @inlineCallbacks
    def stopService(self):  # type: ignore[no-untyped-def]
        super().stopService()
        yield self.pool.closeCachedConnections()


#: A response head (status line and headers) larger than this fails the response.
MAX_RESPONSE_HEAD = 64 * 1024


class ResponseHeadTooLarge(Exception):
    """The upstream's response head is larger than :data:`MAX_RESPONSE_HEAD`."""


class _ClientProtocol(HTTP11ClientProtocol):  # type: ignore[misc]
    """Twisted's HTTP/1.1 client protocol, with what a cache needs on top.

    - The request head leaves at once rather than on the next reactor turn (see
      :func:`pkgproxy.tcpwrite.flush`); under TLS, the TCP socket beneath is flushed.
    - A response head is bounded (Twisted bounds each line, not their number).
    - Bytes after a response whose length was announced (a ``Content-Length`` smaller
      than the body) mean the connection cannot be trusted: it is closed, not reused.
    - A close-delimited body cut by a reset (not a clean close) fails as a broken
      transfer instead of ending as a possibly complete one; a response with such a
      body says so (``pkgproxy_close_delimited``), as a clean close proves nothing.
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        no_delay(self.transport)

    def request(self, request: Any) -> Deferred[Any]:
        d: Deferred[Any] = super().request(request)
        parser = self._parser
        if parser is not None:
            parser.lineReceived = _bounded_lines(parser.lineReceived)  # type: ignore[method-assign]

            def framing(response: Any) -> Any:
                decoder = getattr(parser, "bodyDecoder", None)
                response.pkgproxy_close_delimited = (
                    isinstance(decoder, _IdentityTransferDecoder) and decoder.contentLength is None
                )
                return response

            d.addCallback(framing)
        transport: Any = self.transport
        # A TLS transport writes its records to the TCP transport beneath at once.
        if hasattr(transport, "_tlsConnection"):
            transport = getattr(transport, "transport", None)
        flush(transport)
        return d

    def _finishResponse_WAITING(self, rest: bytes) -> None:
        if rest and self._currentRequest is not None:
            self._currentRequest.persistent = False  # so the connection is closed
        super()._finishResponse_WAITING(rest)

    _finishResponse_TRANSMITTING = _finishResponse_WAITING

    def _connectionLost_WAITING(self, reason: Failure) -> None:
        parser = self._parser
        decoder = getattr(parser, "bodyDecoder", None) if parser is not None else None
        if (
            decoder is not None
            and getattr(decoder, "contentLength", 0) is None
            and not reason.check(net_error.ConnectionDone)
        ):
            # Twisted reports any end of a close-delimited body as PotentialDataLoss;
            # one cut by a reset, or by a TLS close without close_notify (Twisted's TLS
            # says ConnectionLost), is a failed transfer (the decoder: _DataLoss).
            decoder.contentLength = -1
        super()._connectionLost_WAITING(reason)


def _bounded_lines(received: Any) -> Any:
    """A parser's ``lineReceived`` that refuses more than :data:`MAX_RESPONSE_HEAD`
    bytes of lines (the parser reads lines only for heads; bodies come raw)."""
    total = 0

    def line_received(line: bytes) -> None:
        nonlocal total
        total += len(line) + 1
        if total > MAX_RESPONSE_HEAD:
            raise ResponseHeadTooLarge(f"response head over {MAX_RESPONSE_HEAD} bytes")
        received(line)

    return line_received


class _ClientFactory(_HTTP11ClientFactory):  # type: ignore[misc]
    # Twisted logs "Starting factory"/"Stopping factory" for every upstream connection.
    noisy = False

    def buildProtocol(self, addr: Any) -> _ClientProtocol:
        return _ClientProtocol(self._quiescentCallback)


class _Pool(HedgingPool):
    """The persistent pool with hedged connects, making :class:`_ClientProtocol`
    connections."""

    _factory = _ClientFactory


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """TCP for http://, TCP+TLS for https://, as Twisted's ``Agent`` makes them, kept.

    ``Agent`` otherwise builds a new endpoint for every request (with IDNA checks of the
    host) and, for https, new TLS options with a new OpenSSL context: work a cache
    repeats thousands of times a minute for the same few upstreams. An endpoint holds
    no connection state, so one per ``(scheme, host, port)`` serves every request.
    """

    MAX = 1024

    def __init__(
        self,
        reactor: Any,
        policy: IPolicyForHTTPS,
        connect_timeout: float,
        proxies: ProxySettings | None = None,
        internal_ok: Callable[[str], bool] | None = None,
    ) -> None:
        """:param internal_ok: whether a host name may resolve to an internal address
        (see :meth:`RedirectPolicy.may_resolve_internal`); by default every one may."""
        self._reactor = reactor
        self._policy = policy
        self._timeout = connect_timeout
        self._proxies = proxies or ProxySettings()
        self._internal_ok = internal_ok
        self._kept: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}
        self._proxy_kept: dict[Proxy, IStreamClientEndpoint] = {}

    def _tcp(self, host: str, port: int, guard: bool = True) -> IStreamClientEndpoint:
        """A TCP endpoint; ``guard``: a host name that may not resolve to an internal
        address (``internal_ok``) is connected to at its external addresses only."""
        if isIPAddress(host):
            # An address needs no resolving: HostnameEndpoint would still ask getaddrinfo
            # in a thread (one thread hop per new connection) and race one attempt.
            return TCP4ClientEndpoint(self._reactor, host, port, timeout=self._timeout)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(self._reactor, host, port, timeout=self._timeout)
        if guard and self._internal_ok is not None and not self._internal_ok(host):
            return _ExternalHostnameEndpoint(self._reactor, host, port, timeout=self._timeout)
        return HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)

    def proxy_endpoint(self, proxy: Proxy) -> IStreamClientEndpoint:
        """The (kept) endpoint of an outbound proxy."""
        endpoint = self._proxy_kept.get(proxy)
        if endpoint is None:
            endpoint = self._proxy_kept[proxy] = self._tcp(proxy.host, proxy.port, guard=False)
        return endpoint

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._kept.get(key)
        if endpoint is not None:
            return endpoint
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"upstream host {uri.host!r} is not ASCII") from None
        proxy = self._proxies.for_origin(uri.scheme.decode(), host)
        if uri.scheme == b"https" and proxy is not None:
            endpoint = TunnelEndpoint(self.proxy_endpoint(proxy), proxy, host, uri.port)
        else:
            endpoint = self._tcp(host, uri.port)
        if uri.scheme == b"https":
            creator = self._policy.creatorForNetloc(uri.host, uri.port)
            endpoint = wrapClientTLS(creator, endpoint)
        if len(self._kept) >= self.MAX:
            self._kept.clear()
        self._kept[key] = endpoint
        return endpoint


class _ExternalHostnameEndpoint(HostnameEndpoint):
    """A ``HostnameEndpoint`` that connects to external addresses only (:class:`ExternalOnly`)."""

    def _getNameResolverAndMaybeWarn(self, reactor: object) -> IHostnameResolver:
        # Where HostnameEndpoint takes the reactor's resolver, at each connect.
        return ExternalOnly(super()._getNameResolverAndMaybeWarn(reactor))


@implementer(IHostnameResolver)
class ExternalOnly:
    """A name resolver that passes on only the addresses outside this machine and its
    private networks (:func:`~pkgproxy.upstream.redirects.is_internal`): for a host that
    only a redirect or a token challenge leads to, so that its name cannot stand for a
    loopback, link-local or private address the redirect rules refuse."""

    def __init__(self, resolver: IHostnameResolver) -> None:
        self._resolver = resolver

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[Any] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        return self._resolver.resolveHostName(
            _ExternalAddresses(resolutionReceiver, hostName),
            hostName,
            portNumber,
            addressTypes,
            transportSemantics,
        )


@implementer(IResolutionReceiver)
class _ExternalAddresses:
    def __init__(self, receiver: IResolutionReceiver, host: str) -> None:
        self._receiver = receiver
        self._host = host
        self._refused: list[str] = []

    def resolutionBegan(self, resolutionInProgress: Any) -> None:
        self._receiver.resolutionBegan(resolutionInProgress)

    def addressResolved(self, address: Any) -> None:
        if is_internal(str(getattr(address, "host", ""))):
            self._refused.append(address.host)
            return
        self._receiver.addressResolved(address)

    def resolutionComplete(self) -> None:
        if self._refused:
            log.warn(
                "not connecting to {host} at {addresses}: a host only a redirect or token "
                "challenge names may not be an internal address",
                host=self._host,
                addresses=", ".join(self._refused),
            )
        self._receiver.resolutionComplete()


def _trust_root(ca_bundle: str | None) -> Any:
    """The platform's trust store, or the operator's CA bundle."""
    if ca_bundle is None:
        return None
    return _trust_root_of((ca_bundle,))


def _trust_root_of(paths: Iterable[str]) -> Any:
    """A trust root of every certificate in these PEM files (and nothing else)."""
    from twisted.internet.ssl import Certificate, trustRootFromCertificates

    certs = []
    marker = b"-----END CERTIFICATE-----"
    for path in paths:
        with open(path, "rb") as f:
            pem = f.read()
        for block in pem.split(marker):
            if b"-----BEGIN CERTIFICATE-----" in block:
                certs.append(Certificate.loadPEM(block + marker))
    return trustRootFromCertificates(certs)


def require_service_identity() -> None:
    """Refuse to run without service_identity: Twisted would only warn and then check
    host names rudimentarily, which is not good enough for a cache others trust."""
    import service_identity  # noqa: F401
