"""The request deadline: a request must arrive within ``limits.request_head_timeout``.

Twisted's idle timer restarts on every byte, so before this deadline a client trickling
one byte a second held its connection until the header budget ran out (hours). Driven
with a ``Clock`` over a ``StringTransport`` through the real ``ProxySite``.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from pkgproxy.config import LimitsConfig, config_from_dict
from pkgproxy.web.site import ProxySite

HEAD = b"GET /a HTTP/1.1\r\nHost: cache.test\r\nUser-Agent: slow/1\r\n" + b"X: y\r\n" * 50


class Ok(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return b"ok"


class DeadlineTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        site = ProxySite(Ok(), reactor=self.clock)
        limits = LimitsConfig()
        site.timeOut = limits.client_idle_timeout
        site.request_timeout = limits.request_head_timeout
        self.channel = site.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        self.addCleanup(self._close)

    def _close(self) -> None:
        self.channel.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [], "no timer left behind")

    def trickle(self, data: bytes, seconds: float) -> int:
        """Send ``data`` a byte every second until closed or ``seconds`` pass; bytes sent."""
        sent = 0
        while sent < len(data) and sent < seconds and not self.transport.disconnecting:
            self.channel.dataReceived(data[sent : sent + 1])
            sent += 1
            self.clock.advance(1)
        return sent

    def test_defaults(self) -> None:
        """30 s for a request to arrive; 75 s idle between requests (nginx's keep-alive)."""
        limits = config_from_dict({}).limits
        self.assertEqual((limits.request_head_timeout, limits.client_idle_timeout), (30, 75))

    def test_byte_a_second_head_is_cut_at_the_deadline(self) -> None:
        """A head trickled a byte a second: 408 and closed after 30 s, not hours."""
        sent = self.trickle(HEAD, 3600)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(sent, 30)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 408 "))

    def test_byte_a_second_body_is_cut_too(self) -> None:
        """The deadline covers a body as well: a head, then a trickled body."""
        self.channel.dataReceived(
            b"POST /a HTTP/1.1\r\nHost: cache.test\r\nContent-Length: 1000\r\n\r\n"
        )
        sent = self.trickle(b"b" * 1000, 3600)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(sent, 30)
        self.assertIn(b"408 Request Timeout", self.transport.value())

    def test_prompt_requests_then_keep_alive_idle(self) -> None:
        """Requests that arrive in time are served; a later idle connection lasts 75 s."""
        for _ in range(3):
            self.channel.dataReceived(HEAD[:40])
            self.clock.advance(20)  # slow, but within the deadline
            self.channel.dataReceived(HEAD[40:] + b"\r\n")
            self.clock.advance(20)
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 200 OK"), 3)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(54)  # 74 s since the last answer
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)
        self.assertNotIn(b"408", self.transport.value(), "idle is not a late request")

    def test_pipelined_partial_head_is_timed(self) -> None:
        """A whole request and the start of another in one read: the second is timed."""
        self.channel.dataReceived(HEAD + b"\r\n" + b"GET /b HTTP/1.1\r\n")
        self.assertEqual(self.transport.value().count(b"200 OK"), 1)
        self.clock.advance(29)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)
        self.assertIn(b"408 Request Timeout", self.transport.value())
