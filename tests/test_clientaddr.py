"""The client's address behind a load balancer: PROXY protocol and X-Forwarded-For."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from pkgproxy.config import ConfigError, config_from_dict
from pkgproxy.web.clientaddr import ProxyHeader, TrustedProxies, TrustingSite

LB = "10.0.0.5"
V2_PREFIX = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(source: str, port: int, local: bool = False) -> bytes:
    """A PROXY v2 header for TCP over IPv4 (or a LOCAL one, as health checks send)."""
    if local:
        return V2_PREFIX + b"\x20\x00\x00\x00"
    addresses = bytes(int(p) for p in source.split(".")) + bytes([10, 0, 0, 9])
    addresses += port.to_bytes(2, "big") + (3142).to_bytes(2, "big")
    return V2_PREFIX + b"\x21\x11" + len(addresses).to_bytes(2, "big") + addresses


class _Who(Resource):
    isLeaf = True
    last: Request | None = None

    def render_GET(self, request: Request) -> bytes:
        _Who.last = request
        peer: Any = request.getClientAddress()
        channel: Any = request.channel
        return f"{peer.host} {channel.pkgproxy_peer}".encode()


def _serve(peer: str, data: list[bytes], trusted: tuple[str, ...] = (LB,)) -> bytes:
    """What a :class:`TrustingSite` answers ``data`` (sent in those pieces) from ``peer``."""
    site = TrustingSite(_Who(), TrustedProxies(trusted), reactor=Clock(), timeout=None)
    channel = site.buildProtocol(IPv4Address("TCP", peer, 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
    channel.makeConnection(transport)
    for piece in data:
        channel.dataReceived(piece)
    return transport.value() if not transport.disconnecting else b"CLOSED" + transport.value()


def _body(answer: bytes) -> str:
    return answer.rpartition(b"\r\n\r\n")[2].decode()


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


class TrustedProxiesTests(SynchronousTestCase):
    def test_networks_and_addresses(self) -> None:
        t = TrustedProxies(["10.0.0.0/24", "::1"])
        self.assertTrue(t.trusts("10.0.0.7"))
        self.assertTrue(t.trusts("::ffff:10.0.0.7"))
        self.assertTrue(t.trusts("::1"))
        self.assertFalse(t.trusts("10.0.1.7"))
        self.assertFalse(t.trusts("not an address"))
        self.assertFalse(t.trusts(None))
        self.assertFalse(TrustedProxies([]))

    def test_forwarded_for_right_most_untrusted(self) -> None:
        t = TrustedProxies(["10.0.0.0/24"])
        # A client's own X-Forwarded-For (left) is never believed over what proxies added.
        self.assertEqual(t.forwarded_client([b"6.6.6.6, 192.0.2.7"]), "192.0.2.7")
        self.assertEqual(t.forwarded_client([b"192.0.2.7", b"10.0.0.8"]), "192.0.2.7")
        self.assertEqual(t.forwarded_client([b"10.0.0.8"]), "10.0.0.8")
        self.assertEqual(t.forwarded_client([b"192.0.2.7, junk"]), None)
        self.assertEqual(t.forwarded_client([b"junk, 192.0.2.7"]), "192.0.2.7")

    def test_config_keys(self) -> None:
        cfg = config_from_dict({"trusted_proxies": ["10.0.0.5"], "node_name": "cache-a"})
        self.assertEqual(cfg.trusted_proxies, ("10.0.0.5",))
        self.assertEqual(cfg.node_name, "cache-a")
        self.assertTrue(config_from_dict({}).node_name)
        e = self.assertRaises(ConfigError, config_from_dict, {"trusted_proxies": ["10.0.0.x"]})
        self.assertEqual(e.key, "trusted_proxies[0]")
        e = self.assertRaises(ConfigError, config_from_dict, {"node_name": "a b"})
        self.assertEqual(e.key, "node_name")


class ProxyHeaderTests(SynchronousTestCase):
    def test_v1_in_pieces(self) -> None:
        h = ProxyHeader()
        self.assertIsNone(h.feed(b"PRO"))
        self.assertIsNone(h.feed(b"XY TCP4 192.0.2.7 10.0.0.9 5000 "))
        self.assertEqual(h.feed(b"3142\r\nGET"), b"GET")
        assert h.client is not None
        self.assertEqual((h.client.host, h.client.port), ("192.0.2.7", 5000))

    def test_v2_and_local(self) -> None:
        h = ProxyHeader()
        self.assertIsNone(h.feed(v2_header("192.0.2.7", 5000)[:10]))
        self.assertEqual(h.feed(v2_header("192.0.2.7", 5000)[10:] + b"GET"), b"GET")
        assert h.client is not None
        self.assertEqual(h.client.host, "192.0.2.7")
        h = ProxyHeader()
        self.assertEqual(h.feed(v2_header("", 0, local=True)), b"")
        self.assertIsNone(h.client)

    def test_v1_ipv6_in_its_usual_spelling(self) -> None:
        h = ProxyHeader()
        self.assertEqual(h.feed(b"PROXY TCP6 2001:DB8:0:0::7 ::1 5000 3142\r\n"), b"")
        assert h.client is not None
        self.assertEqual(h.client.host, "2001:db8::7")

    def test_no_header(self) -> None:
        h = ProxyHeader()
        self.assertEqual(h.feed(GET), GET)
        self.assertIsNone(h.client)

    def test_malformed(self) -> None:
        self.assertRaises(ValueError, ProxyHeader().feed, b"PROXY TCP4 nonsense\r\n")
        self.assertRaises(ValueError, ProxyHeader().feed, b"PROXY " + b"x" * 200)


class TrustingSiteTests(SynchronousTestCase):
    def test_proxy_protocol_from_trusted_peer(self) -> None:
        header = b"PROXY TCP4 192.0.2.7 10.0.0.9 5000 3142\r\n"
        self.assertEqual(_body(_serve(LB, [header, GET])), "192.0.2.7 192.0.2.7")
        self.assertEqual(
            _body(_serve(LB, [v2_header("192.0.2.7", 1) + GET])), "192.0.2.7 192.0.2.7"
        )

    def test_local_or_no_header_from_trusted_peer(self) -> None:
        self.assertEqual(_body(_serve(LB, [GET])), f"{LB} {LB}")
        self.assertEqual(_body(_serve(LB, [v2_header("", 0, local=True), GET])), f"{LB} {LB}")

    def test_proxy_header_from_anyone_else_is_not_believed(self) -> None:
        answer = _serve("192.0.2.66", [b"PROXY TCP4 10.0.0.1 10.0.0.9 5000 3142\r\n" + GET])
        self.assertNotIn(b"10.0.0.1", answer)
        self.assertIn(b"400", answer.split(b"\r\n")[0])

    def test_malformed_header_closes(self) -> None:
        with capturedLogs() as events:
            answer = _serve(LB, [b"PROXY TCP4 junk\r\n" + GET])
        self.assertEqual(answer, b"CLOSED")
        self.assertEqual(len(events), 1)
        self.assertIn("malformed PROXY protocol header", formatEvent(events[0]))

    def test_forwarded_for(self) -> None:
        xff = b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6, 192.0.2.7\r\n\r\n"
        self.assertEqual(_body(_serve(LB, [xff])), f"192.0.2.7 {LB}")
        # Still so after the request is done, when the access log asks.
        assert _Who.last is not None and _Who.last.finished
        self.assertEqual(getattr(_Who.last.getClientAddress(), "host", None), "192.0.2.7")
        self.assertEqual(_body(_serve("192.0.2.66", [xff])), "192.0.2.66 192.0.2.66")
