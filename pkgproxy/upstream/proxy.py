"""Reaching upstreams through an outbound HTTP proxy (a corporate proxy, a parent cache).

- Which upstreams go through which proxy: ``[upstream] proxy`` and ``no_proxy``, or,
  with neither set, the ``https_proxy``/``http_proxy``/``no_proxy`` environment variables
  as curl reads them (``http_proxy`` lower-case only; ``HTTPS_PROXY`` and ``NO_PROXY``
  in either case). :func:`proxy_settings` decides, :class:`ProxySettings` answers per
  origin.
- plain-http upstreams: the request goes to the proxy with its absolute URI
  (:class:`ProxyingAgent`), pooled on the proxy's connections.
- https upstreams: a ``CONNECT host:port`` tunnel (:class:`TunnelEndpoint`) with TLS
  to the upstream inside it, its certificate checked against the upstream's name as on
  a direct connection, pooled per upstream origin.

Proxy credentials come from the proxy URL (``http://user:pass@proxy:3128``) and are
sent as ``Proxy-Authorization: Basic``. A proxy that refuses (a CONNECT answered with
anything but 2xx, or 407 to a request) is an :class:`~pkgproxy.upstream.client
.UpstreamError` of kind ``proxy`` that names the proxy: a clear 502.

A parent cache tier (``[upstream] parent``, another pkgproxy) is asked for every
upstream URL, https ones included, as an absolute URI on kept connections to it, so that
it caches under the real upstream URLs; when it cannot be connected to, requests go
direct (and the parent is left alone for ``retry_after``), unless ``parent_only``.
Those requests carry ``Via: 1.1 <node_name>``; a pkgproxy that receives a request
already naming it there (:func:`via_names`) refuses it: its parent leads back to it.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import _ensureValidURI
from twisted.web.client import URI, Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from pkgproxy.upstream.errors import UpstreamError

log = Logger()

#: A proxy's answer to CONNECT larger than this is refused.
MAX_CONNECT_HEAD = 16 * 1024


class ProxyConfigError(ValueError):
    """A proxy URL or no_proxy entry pkgproxy cannot use."""


@dataclass(frozen=True)
class Proxy:
    """One outbound HTTP proxy."""

    host: str
    port: int
    #: ``Proxy-Authorization`` value, from the URL's user and password.
    authorization: bytes | None = None

    @property
    def name(self) -> str:
        """``host:port``, for messages (never the credentials)."""
        return f"{self.host}:{self.port}"


def parse_proxy(url: str) -> Proxy:
    """A :class:`Proxy` from ``http://[user:pass@]host[:port]`` (a bare ``host:port``
    is taken as http, as curl does)."""
    if "://" not in url:
        url = "http://" + url
    p = urlsplit(url)
    if p.scheme != "http":
        raise ProxyConfigError(f"only http:// proxies are supported, got {p.scheme}://")
    try:
        port = p.port or 80
    except ValueError:
        raise ProxyConfigError(f"bad port in proxy URL {p.netloc.rpartition('@')[2]!r}") from None
    if not p.hostname:
        raise ProxyConfigError("proxy URL has no host")
    auth = None
    if p.username is not None:
        creds = f"{unquote(p.username)}:{unquote(p.password or '')}"
        auth = b"Basic " + base64.b64encode(creds.encode("utf-8"))
    return Proxy(p.hostname.lower(), port, auth)


class NoProxy:
    """curl's ``no_proxy``: ``*``, host names and domain suffixes (``example.com`` and
    ``.example.com`` both match ``a.example.com``), IP addresses and CIDR ranges."""

    def __init__(self, entries: Sequence[str]) -> None:
        self.all = False
        self._names: list[str] = []
        self._nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for raw in entries:
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "*":
                self.all = True
                continue
            try:
                self._nets.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            self._names.append(entry.lstrip(".").rstrip("."))

    def matches(self, host: str) -> bool:
        """Whether ``host`` is reached directly."""
        if self.all:
            return True
        host = host.lower().rstrip(".")
        try:
            addr = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return any(host == n or host.endswith("." + n) for n in self._names)
        return any(addr in net for net in self._nets) or host in self._names


@dataclass(frozen=True)
class ProxySettings:
    """Which proxy, if any, each upstream origin is reached through."""

    http: Proxy | None = None
    https: Proxy | None = None
    no_proxy: NoProxy = NoProxy(())
    #: A parent cache asked for every upstream URL as an absolute URI, https included.
    parent: Proxy | None = None
    #: Never go direct when the parent cannot be reached.
    parent_only: bool = False

    def for_origin(self, scheme: str, host: str) -> Proxy | None:
        """The proxy for ``scheme://host``, or ``None`` to connect directly."""
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or self.no_proxy.matches(host):
            return None
        return proxy

    @property
    def active(self) -> bool:
        return self.http is not None or self.https is not None or self.parent is not None


def proxy_settings(
    proxy: str | None,
    no_proxy: Sequence[str] | None,
    environ: Mapping[str, str],
    parent: str | None = None,
    parent_only: bool = False,
) -> ProxySettings:
    """The settings from ``[upstream] parent``, or ``proxy``/``no_proxy``, or, with none
    of them set, from the environment as curl reads it."""
    if parent:
        return ProxySettings(
            no_proxy=NoProxy(no_proxy or ()), parent=parse_proxy(parent), parent_only=parent_only
        )
    if proxy is not None or no_proxy is not None:
        p = parse_proxy(proxy) if proxy else None
        return ProxySettings(p, p, NoProxy(no_proxy or ()))

    def env(*names: str) -> str | None:
        for n in names:
            value = environ.get(n)
            if value:
                return value
        return None

    http = env("http_proxy")  # not HTTP_PROXY: a CGI sets that from a request header
    https = env("https_proxy", "HTTPS_PROXY")
    entries = (env("no_proxy", "NO_PROXY") or "").split(",")
    return ProxySettings(
        parse_proxy(http) if http else None,
        parse_proxy(https) if https else None,
        NoProxy(entries),
    )


def via_names(values: Sequence[bytes], node_name: str) -> bool:
    """Whether ``Via`` header ``values`` name ``node_name`` as a hop (RFC 9110 7.6.3:
    ``protocol received-by [comment]``, comma-separated)."""
    name = node_name.lower().encode("ascii", "replace")
    for value in values:
        for hop in value.split(b","):
            parts = hop.split(None, 2)
            if len(parts) >= 2 and parts[1].lower() == name:
                return True
    return False


class ProxyRefused(Exception):
    """The proxy did not open a tunnel (its status line is in the message)."""


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """Connects through ``proxy`` with ``CONNECT host:port``; the protocol built by the
    factory given to :meth:`connect` then speaks to ``host:port`` over the tunnel (wrap
    this endpoint with ``wrapClientTLS`` for TLS inside it)."""

    def __init__(
        self, proxy_endpoint: IStreamClientEndpoint, proxy: Proxy, host: str, port: int
    ) -> None:
        self._proxy_endpoint = proxy_endpoint
        self._proxy = proxy
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        head = "\r\n".join(lines).encode("ascii") + b"\r\n"
        if proxy.authorization:
            head += b"Proxy-Authorization: " + proxy.authorization + b"\r\n"
        self._head = head + b"\r\n"
        self._authority = authority

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        ready: Deferred[Any] = Deferred(lambda d: tunnel.abort())
        tunnel = _Tunnel(self._head, protocolFactory, ready, self._proxy, self._authority)
        connecting = self._proxy_endpoint.connect(_OneProtocol(tunnel))

        def failed(f: Failure) -> None:
            if not ready.called:
                ready.errback(f)

        connecting.addErrback(failed)
        tunnel.connecting = connecting
        return ready


class _OneProtocol(Factory):
    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


class _Tunnel(Protocol):
    """Sends CONNECT, reads the proxy's answer, then hands the connection over."""

    connecting: Deferred[Any] | None = None

    def __init__(
        self, head: bytes, factory: Any, ready: Deferred[Any], proxy: Proxy, authority: str
    ) -> None:
        self._head = head
        self._factory = factory
        self._ready = ready
        self._proxy = proxy
        self._authority = authority
        self._buf = b""
        self._inner: Any = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._head)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_CONNECT_HEAD:
                self._refuse("an answer too large to be one")
            return
        head, rest = self._buf[:end], self._buf[end + 4 :]
        self._buf = b""
        status = head.split(b"\r\n", 1)[0]
        parts = status.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            self._refuse(f"a bad status line {status[:80]!r}")
            return
        if not 200 <= int(parts[1]) < 300:
            self._refuse(status.decode("latin-1")[:120])
            return
        try:
            inner = self._factory.buildProtocol(self.transport.getPeer())  # type: ignore[union-attr]
        except Exception:
            self.transport.abortConnection()  # type: ignore[union-attr]
            self._ready.errback(Failure())
            return
        self._inner = inner
        inner.makeConnection(self.transport)
        self._ready.callback(inner)
        if rest:
            inner.dataReceived(rest)

    def _refuse(self, what: str) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]
        if not self._ready.called:
            self._ready.errback(
                UpstreamError(
                    "proxy",
                    f"proxy {self._proxy.name} refused CONNECT to {self._authority}: {what}",
                )
            )

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        elif self.connecting is not None:
            self.connecting.cancel()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._inner is not None:
            self._inner.connectionLost(reason)
        elif not self._ready.called:
            self._ready.errback(
                UpstreamError(
                    "proxy",
                    f"proxy {self._proxy.name} closed the connection before opening a "
                    f"tunnel to {self._authority}",
                )
            )


class ProxyingAgent(Agent):  # type: ignore[misc]
    """Twisted's ``Agent``, sending requests for origins whose :class:`ProxySettings`
    name a proxy to that proxy as absolute URIs (https ones go through the endpoint
    factory's CONNECT tunnels), and every request to a parent cache if there is one."""

    _settings: ProxySettings
    _proxy_endpoints: Any
    #: Until when the parent is not asked (it could not be connected to).
    _parent_down_until = 0.0
    parent_retry_after = 15.0
    #: ``Via`` sent to the parent (``1.1 <node_name>``), so that a loop is refused.
    via: bytes | None = None

    @classmethod
    def create(
        cls, reactor: Any, endpoints: Any, pool: Any, settings: ProxySettings
    ) -> ProxyingAgent:
        agent: ProxyingAgent = cls.usingEndpointFactory(reactor, endpoints, pool=pool)
        agent._settings = settings
        agent._proxy_endpoints = endpoints
        return agent

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        settings = self._settings
        if settings.parent is None and uri[:5].lower() == b"https":
            return super().request(method, uri, headers, bodyProducer)  # CONNECT, if any
        uri = _ensureValidURI(uri.strip())
        parsed = URI.fromBytes(uri)
        host = parsed.host.decode("ascii", "replace")
        parent = settings.parent
        if parent is not None:
            if settings.no_proxy.matches(host):
                return super().request(method, uri, headers, bodyProducer)
            if settings.parent_only or self._reactor.seconds() >= self._parent_down_until:
                to_parent = headers.copy() if headers is not None else Headers()
                if self.via is not None:
                    to_parent.addRawHeader(b"via", self.via)
                d = self._via(parent, method, uri, parsed, to_parent, bodyProducer)
                if not settings.parent_only:
                    d.addErrback(self._parent_failed, method, uri, headers, bodyProducer)
                return d
            return super().request(method, uri, headers, bodyProducer)
        proxy = settings.for_origin(parsed.scheme.decode("ascii"), host)
        if proxy is None:
            return super().request(method, uri, headers, bodyProducer)
        return self._via(proxy, method, uri, parsed, headers, bodyProducer)

    def _via(
        self,
        proxy: Proxy,
        method: bytes,
        uri: bytes,
        parsed: URI,
        headers: Headers | None,
        bodyProducer: IBodyProducer | None,
    ) -> Deferred[IResponse]:
        """The request sent to ``proxy`` with its absolute URI."""
        headers = headers.copy() if headers is not None else Headers()
        if proxy.authorization:
            headers.setRawHeaders(b"proxy-authorization", [proxy.authorization])
        key = (b"http-proxy", proxy.host.encode(), proxy.port)
        endpoint = self._proxy_endpoints.proxy_endpoint(proxy)
        d: Deferred[IResponse] = self._requestWithEndpoint(
            key, endpoint, method, parsed, headers, bodyProducer, uri
        )
        return d.addCallbacks(
            _proxy_answer, _proxy_unreachable, callbackArgs=(proxy,), errbackArgs=(proxy,)
        )

    def _parent_failed(
        self,
        f: Failure,
        method: bytes,
        uri: bytes,
        headers: Headers | None,
        bodyProducer: IBodyProducer | None,
    ) -> Deferred[IResponse] | Failure:
        """The parent could not be connected to: go direct, and leave it alone a while.
        Anything else (an answer, a broken one) is the request's result."""
        if not f.check(net_error.ConnectError, net_error.DNSLookupError, net_error.TimeoutError):
            return f
        self._parent_down_until = self._reactor.seconds() + self.parent_retry_after
        log.warn(
            "parent {parent} unreachable ({why}); going direct for {s:.0f}s",
            parent=self._settings.parent.name if self._settings.parent else "",
            why=f.getErrorMessage(),
            s=self.parent_retry_after,
        )
        return super().request(method, uri, headers, bodyProducer)


def _proxy_unreachable(f: Failure, proxy: Proxy) -> Failure:
    """A failure to connect to ``proxy``, saying so (it is not the upstream's)."""
    e = f.value
    if isinstance(e, net_error.ConnectError | net_error.DNSLookupError) and not isinstance(
        e, net_error.ConnectingCancelledError
    ):
        return Failure(net_error.ConnectError(string=f"proxy {proxy.name}: {f.getErrorMessage()}"))
    return f


def _proxy_answer(response: IResponse, proxy: Proxy) -> IResponse:
    if response.code == 407:
        response.deliverBody(Protocol())  # nothing reads it: the connection is dropped
        raise UpstreamError(
            "proxy", f"proxy {proxy.name} wants credentials (407); give them in its URL"
        )
    return response
