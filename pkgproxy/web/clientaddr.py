"""The client's real address when a load balancer stands in front of pkgproxy.

Behind HAProxy every connection comes from the balancer, so the access log and
``admin_networks`` would see only its address. A balancer listed in ``trusted_proxies``
may say who the client is, in one of two ways:

* the PROXY protocol (v1 or v2, HAProxy's ``send-proxy``/``send-proxy-v2``): one header
  at the start of the connection. The connection's peer becomes the client for every
  request on it, the hit path included. This is the cheaper way and the recommended one.
* ``X-Forwarded-For`` (HAProxy's ``option forwardfor``): per request; the client is the
  right-most address in it that is not itself a trusted proxy. A request carrying it is
  answered by twisted.web, not by the hit path (which replays only plain requests).

Only a peer whose own address is in ``trusted_proxies`` is believed; from anyone else a
PROXY header is a malformed request and ``X-Forwarded-For`` is ignored. From a trusted
peer the PROXY header is optional (a balancer's own plain health check has none); a
malformed one closes the connection, as Twisted's PROXY endpoint does. The header
itself is parsed by Twisted's parsers; this module only decides whom to believe.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

from pkgproxy.netaddr import Networks, parse_ip
from pkgproxy.web.site import CappedRequest, ProxyChannel, ProxySite

_log = Logger("pkgproxy.clientaddr")
_V1 = b"PROXY "
_V2 = V2Parser.PREFIX


def address_of(host: object, port: int = 0) -> IPv4Address | IPv6Address | None:
    """A TCP address for ``host``, in its usual spelling, or ``None`` if it is none."""
    ip = parse_ip(host)
    if ip is None:
        return None
    return (IPv4Address if ip.version == 4 else IPv6Address)("TCP", str(ip), port)


class TrustedProxies(Networks):
    """The networks whose connections may name the real client."""

    def trusts(self, host: object) -> bool:
        """Whether ``host`` (an address string) is a trusted proxy."""
        return host in self

    def forwarded_client(self, values: Iterable[bytes]) -> str | None:
        """The client an ``X-Forwarded-For`` from a trusted peer names, or ``None``.

        Each proxy appends the address it received the request from, so the list is read
        from the right: the first address that is not a trusted proxy is the client (one
        a client wrote itself further left is never believed). An entry that is not an
        address ends the walk: the last good one is all that can be trusted.
        """
        hops = [h for v in values for h in v.decode("latin-1").split(",")]
        client = None
        for hop in reversed(hops):
            ip = parse_ip(hop)
            if ip is None:
                break
            client = str(ip)
            if not self.trusts(client):
                break
        return client


class ProxyHeader:
    """Reads the optional PROXY header at the start of a trusted peer's connection."""

    def __init__(self) -> None:
        self._buffer = b""
        self._parser: V1Parser | V2Parser | None = None
        #: The client the header named (``None``: no header, or ``LOCAL``/``UNKNOWN``).
        self.client: IPv4Address | IPv6Address | None = None

    def feed(self, data: bytes) -> bytes | None:
        """Consume ``data``; the HTTP bytes after the header once it is done, else None.

        :raise ValueError: the header is malformed (the connection should be closed).
        """
        if self._parser is None:
            self._buffer += data
            head = self._buffer[: len(_V2)]
            if head.startswith(_V1) or (len(head) == len(_V2) and head == _V2):
                self._parser = V1Parser() if head.startswith(_V1) else V2Parser()
                data, self._buffer = self._buffer, b""
            elif _V1.startswith(head) or _V2.startswith(head):
                return None  # too short yet to tell
            else:
                return self._buffer  # plain HTTP: no header
        try:
            info, rest = self._parser.feed(data)
        except InvalidProxyHeader as e:
            raise ValueError("malformed PROXY protocol header") from e
        if info is None:
            return None
        source = info.source
        if isinstance(source, IPv4Address | IPv6Address):
            self.client = address_of(source.host, source.port)
            if self.client is None:
                raise ValueError("PROXY protocol header with a source that is no address")
        return rest or b""


class TrustingChannel(ProxyChannel):
    """A :class:`ProxyChannel` that believes its ``trusted_proxies`` about the client."""

    _header: ProxyHeader | None = None
    _client: IPv4Address | IPv6Address | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.factory.trusted_proxies.trusts(self.pkgproxy_peer):
            self._header = ProxyHeader()

    def dataReceived(self, data: bytes) -> None:
        header = self._header
        if header is not None:
            try:
                rest = header.feed(data)
            except ValueError as e:
                _log.warn("{peer}: {error}; connection closed", peer=self.pkgproxy_peer, error=e)
                self._header = None
                if self.transport is not None:
                    self.transport.loseConnection()
                return
            if rest is None:
                return
            self._header = None
            if header.client is not None:
                self._client = header.client
                self.pkgproxy_peer = header.client.host
            if not rest:
                return
            data = rest
        super().dataReceived(data)

    def getPeer(self) -> Any:
        """The client the balancer named, else the connection's own peer."""
        return self._client or super().getPeer()


class TrustingRequest(CappedRequest):
    """A request whose client is the one a trusted peer's ``X-Forwarded-For`` names."""

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        trusted = self.channel.factory.trusted_proxies
        values = self.requestHeaders.getRawHeaders(b"x-forwarded-for")
        if values and trusted.trusts(getattr(self.client, "host", None)):
            client = address_of(trusted.forwarded_client(values))
            if client is not None:
                self.client = client
        super().requestReceived(command, path, version)


class TrustingSite(ProxySite):
    """pkgproxy's site when ``trusted_proxies`` is set: a balancer may name the client."""

    protocol = TrustingChannel  # type: ignore[assignment]
    requestFactory = TrustingRequest

    def __init__(self, resource: Any, trusted_proxies: TrustedProxies, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.trusted_proxies = trusted_proxies
