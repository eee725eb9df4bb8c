"""The pieces behind route ``ca_file`` and ``[tls_intercept] tunnel``, in memory.

Config validation (every error names its key), the per-host TLS policy, and the blind
tunnel's relay on a real ``HTTPChannel`` over in-memory transports: what is relayed, in
which order, which transport throttles which, and how either end closing ends both.
The same features run through a real server in tests/e2e/test_tls_upstreams.py.
"""

from __future__ import annotations

from dataclasses import replace

from twisted.internet._sslverify import ClientTLSOptions
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from pkgproxy.config import ConfigError, config_from_dict
from pkgproxy.upstream.client import RouteTrustPolicy, route_ca_files
from pkgproxy.web.site import ProxySite
from pkgproxy.web.tunnel import BlindTunnels
from tests.support.tlsserver import make_tls_files


def route(**keys: object) -> dict[str, object]:
    return {"routes": {"internal": {"family": "generic", "upstream": "https://m.test/", **keys}}}


class ConfigTests(SynchronousTestCase):
    def test_ca_file_checked_at_load(self) -> None:
        """``ca_file`` must be readable and hold a certificate; errors name the key."""
        files = make_tls_files(self.mktemp())
        self.assertEqual(
            config_from_dict(route(ca_file=files.ca_cert)).routes[-1].ca_file, files.ca_cert
        )
        with self.assertRaises(ConfigError) as missing:
            config_from_dict(route(ca_file="/nonexistent/ca.pem"))
        self.assertEqual(missing.exception.key, "routes.internal.ca_file")
        with self.assertRaises(ConfigError) as not_pem:
            config_from_dict(route(ca_file=files.key))
        self.assertEqual(not_pem.exception.key, "routes.internal.ca_file")
        self.assertIn("no PEM certificate", str(not_pem.exception))

    def test_tunnel_entries(self) -> None:
        """``tunnel`` takes exact ``host:port`` entries (also with interception off);
        anything else is refused naming the entry."""
        cfg = config_from_dict(
            {"tls_intercept": {"enabled": False, "tunnel": ["Git.Example:443", "[::1]:8443"]}}
        )
        self.assertEqual(cfg.tls_intercept.tunnel, (("git.example", 443), ("::1", 8443)))
        for i, bad in enumerate(["git.example", "git.example:0", "*.example:443", "a/b:443"]):
            with self.assertRaises(ConfigError) as e:
                config_from_dict({"tls_intercept": {"tunnel": ["ok.example:443", bad]}})
            self.assertEqual(e.exception.key, "tls_intercept.tunnel[1]", i)
        with self.assertRaises(ConfigError) as e:
            config_from_dict({"tls_intercept": {"tunnel": [443]}})
        self.assertEqual(e.exception.key, "tls_intercept.tunnel")


class RecordingPolicy:
    """A default policy that records what it was asked for."""

    def __init__(self) -> None:
        self.asked: list[tuple[bytes, int]] = []

    def creatorForNetloc(self, hostname: bytes, port: int) -> object:
        self.asked.append((hostname, port))
        return "default"


class PolicyTests(SynchronousTestCase):
    def test_ca_file_host_gets_its_own_trust_root_others_the_default(self) -> None:
        """Only the host:port of a route with ``ca_file`` is verified with it; every
        other connection is the default policy's."""
        files = make_tls_files(self.mktemp())
        cfg = config_from_dict(
            {
                "routes": {
                    "a": {"family": "generic", "upstream": "https://m.test/a/"},
                    "b": {"family": "generic", "upstream": "https://M.test/b/"},
                    "c": {"family": "generic", "upstream": "http://m.test/c/"},
                    "d": {"family": "generic", "upstream": "https://m.test:8443/"},
                }
            }
        )
        routes = tuple(
            replace(r, ca_file=files.ca_cert) if r.name in ("a", "b", "c") else r
            for r in cfg.routes
        )
        self.assertEqual(route_ca_files(routes), {("m.test", 443): (files.ca_cert,)})
        default = RecordingPolicy()
        policy = RouteTrustPolicy(default, route_ca_files(routes))  # type: ignore[arg-type]
        creator = policy.creatorForNetloc(b"M.test", 443)
        self.assertIsInstance(creator, ClientTLSOptions)
        self.assertEqual(policy.creatorForNetloc(b"m.test", 8443), "default")
        self.assertEqual(policy.creatorForNetloc(b"other.test", 443), "default")
        self.assertEqual(default.asked, [(b"m.test", 8443), (b"other.test", 443)])


class EndpointTests(SynchronousTestCase):
    def test_one_endpoint_and_one_tls_creator_per_origin(self) -> None:
        """Requests to one upstream reuse its endpoint; TLS options are made once."""
        from twisted.web.client import URI
        from twisted.web.error import SchemeNotSupported

        from pkgproxy.upstream.client import _Endpoints

        policy = RecordingPolicy()
        endpoints = _Endpoints(Clock(), policy, 5.0)  # type: ignore[arg-type]
        a = endpoints.endpointForURI(URI.fromBytes(b"https://m.test/a"))
        b = endpoints.endpointForURI(URI.fromBytes(b"https://m.test/b?x=1"))
        other = endpoints.endpointForURI(URI.fromBytes(b"https://m.test:8443/a"))
        plain = endpoints.endpointForURI(URI.fromBytes(b"http://m.test/a"))
        self.assertIs(a, b)
        self.assertIsNot(a, other)
        self.assertIsNot(a, plain)
        self.assertEqual(policy.asked, [(b"m.test", 443), (b"m.test", 8443)])
        with self.assertRaises(SchemeNotSupported):
            endpoints.endpointForURI(URI.fromBytes(b"ftp://m.test/a"))

    def test_addresses_are_not_resolved(self) -> None:
        """An upstream given as an IPv4 or IPv6 address is connected to directly; only
        a name goes through the resolver (and happy eyeballs)."""
        from twisted.internet.endpoints import (
            HostnameEndpoint,
            TCP4ClientEndpoint,
            TCP6ClientEndpoint,
        )
        from twisted.web.client import URI

        from pkgproxy.upstream.client import _Endpoints

        endpoints = _Endpoints(Clock(), RecordingPolicy(), 5.0)  # type: ignore[arg-type]

        def of(url: bytes) -> object:
            return endpoints.endpointForURI(URI.fromBytes(url))

        self.assertIsInstance(of(b"http://127.0.0.1:8080/a"), TCP4ClientEndpoint)
        self.assertIsInstance(of(b"http://[::1]:8080/a"), TCP6ClientEndpoint)
        self.assertIsInstance(of(b"http://m.test/a"), HostnameEndpoint)
        # TLS is the same wrapping whatever connects underneath.
        self.assertNotIsInstance(of(b"https://127.0.0.1/a"), TCP4ClientEndpoint)


class FakeEndpoint:
    """Connects at once over a StringTransport, or fails as told."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.transport = StringTransport()
        self.protocol: Protocol | None = None
        #: Connect only when the test fires this (``None``: at once).
        self.later: Deferred[None] | None = None

    def connect(self, factory: object) -> Deferred[Protocol]:
        if self.error is not None:
            return fail(self.error)

        def made(_: object) -> Protocol:
            proto = factory.buildProtocol(None)  # type: ignore[attr-defined]
            proto.makeConnection(self.transport)
            self.protocol = proto
            return proto  # type: ignore[no-any-return]

        if self.later is not None:
            return self.later.addCallback(made)
        return succeed(made(None))


class TunnelResource(Resource):
    isLeaf = True

    def __init__(self, tunnels: BlindTunnels) -> None:
        super().__init__()
        self.tunnels = tunnels

    def render(self, request: Request) -> int:
        host, _, port = request.uri.decode().rpartition(":")
        return self.tunnels.open(request, host, int(port))


class TunnelRelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        # The channels' idle timers run on this clock, never on the global reactor.
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.asked: list[tuple[str, int]] = []

        def connector(host: str, port: int) -> FakeEndpoint:
            self.asked.append((host, port))
            return self.endpoint

        self.tunnels = BlindTunnels([("git.example", 443)], connector)  # type: ignore[arg-type]
        site = ProxySite(TunnelResource(self.tunnels), reactor=self.clock)
        self.channel = site.buildProtocol(None)
        self.client = StringTransport()
        self.channel.makeConnection(self.client)

    def test_relays_both_ways_with_flow_control(self) -> None:
        """After 200, bytes the client sent early and later reach the upstream in order,
        the upstream's reach the client, and each transport is the other's producer."""
        self.assertTrue(self.tunnels.allowed("GIT.example", 443))
        self.assertFalse(self.tunnels.allowed("git.example", 22))
        self.channel.dataReceived(
            b"CONNECT git.example:443 HTTP/1.1\r\nHost: git.example:443\r\n\r\n\x16early"
        )
        self.assertEqual(self.asked, [("git.example", 443)])
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 200 Connection established"))
        self.channel.dataReceived(b"-later")
        upstream = self.endpoint.transport
        self.assertEqual(upstream.value(), b"\x16early-later")
        self.client.clear()
        assert self.endpoint.protocol is not None
        self.endpoint.protocol.dataReceived(b"server bytes")
        self.assertEqual(self.client.value(), b"server bytes")
        self.assertIs(self.client.producer, upstream)
        self.assertIs(upstream.producer, self.client)
        self.assertTrue(self.client.streaming and upstream.streaming)
        # HTTP is over on this connection: bytes that look like a request are relayed.
        self.channel.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(upstream.value().endswith(b"GET / HTTP/1.1\r\n\r\n"))
        self.assertEqual(self.client.value(), b"server bytes")

    def test_either_end_closing_closes_the_other(self) -> None:
        """The upstream closing closes the client's connection, and the other way."""
        self.channel.dataReceived(b"CONNECT git.example:443 HTTP/1.1\r\n\r\n")
        assert self.endpoint.protocol is not None
        self.endpoint.protocol.connectionLost(Failure(ConnectionRefusedError()))
        self.assertTrue(self.client.disconnecting)
        self.endpoint = FakeEndpoint()  # a second tunnel, closed from the client's end
        second = ProxySite(TunnelResource(self.tunnels), reactor=self.clock).buildProtocol(None)
        second.makeConnection(StringTransport())
        second.dataReceived(b"CONNECT git.example:443 HTTP/1.1\r\n\r\n")
        second.connectionLost(Failure(ConnectionRefusedError()))
        self.assertTrue(self.endpoint.transport.disconnecting)

    def test_client_bytes_kept_while_connecting_and_leaving_cancels(self) -> None:
        """Nothing is answered until the upstream is connected; what the client sends
        meanwhile reaches it first. A client that leaves first cancels the connect."""
        self.endpoint.later = Deferred()
        self.channel.dataReceived(b"CONNECT git.example:443 HTTP/1.1\r\n\r\n")
        self.channel.dataReceived(b"\x16hello")
        self.assertEqual(self.client.value(), b"")
        self.endpoint.later.callback(None)
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 200 "))
        self.assertEqual(self.endpoint.transport.value(), b"\x16hello")

        cancelled: list[bool] = []
        self.endpoint.later = Deferred(lambda _: cancelled.append(True))
        second = ProxySite(TunnelResource(self.tunnels), reactor=self.clock).buildProtocol(None)
        client = StringTransport()
        second.makeConnection(client)
        second.dataReceived(b"CONNECT git.example:443 HTTP/1.1\r\n\r\n")
        second.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual((cancelled, client.value()), ([True], b""))

    def test_idle_tunnel_is_closed_and_a_busy_one_is_not(self) -> None:
        """A tunnel that relays nothing either way for its idle time loses both ends."""
        tunnels = BlindTunnels(
            [("git.example", 443)],
            lambda host, port: self.endpoint,  # type: ignore[arg-type,return-value]
            self.clock,
            idle=100.0,
        )
        channel = ProxySite(TunnelResource(tunnels), reactor=self.clock).buildProtocol(None)
        client = StringTransport()
        channel.makeConnection(client)
        channel.dataReceived(b"CONNECT git.example:443 HTTP/1.1\r\n\r\n")
        upstream = self.endpoint.transport
        assert self.endpoint.protocol is not None
        for _ in range(5):  # traffic every 60 s, one way or the other: kept open
            self.clock.advance(60)
            self.endpoint.protocol.dataReceived(b"ping")
        self.assertFalse(client.disconnecting or upstream.disconnecting)
        self.assertFalse(getattr(client, "aborted", False))
        self.clock.advance(100)
        self.assertTrue(getattr(client, "aborted", False) or client.disconnecting)
        self.assertTrue(getattr(upstream, "aborted", False) or upstream.disconnecting)
        channel.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connect_failure_is_502_with_one_line(self) -> None:
        """A refused connection answers 502 and a one-line reason; nothing is relayed."""
        self.endpoint.error = ConnectionRefusedError()
        self.channel.dataReceived(b"CONNECT git.example:443 HTTP/1.1\r\n\r\n")
        head, _, body = self.client.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "), head)
        self.assertTrue(body.startswith(b"pkgproxy: cannot open a tunnel to git.example:443"))
        self.assertEqual(body.count(b"\n"), 1)
