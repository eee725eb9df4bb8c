"""Complete messages leave at once: a finished response, an upstream request head.

Twisted sends what a transport holds on the next reactor turn, after every other socket
that became readable meanwhile was handled; :func:`pkgproxy.tcpwrite.flush` sends it
when the message is complete. These tests look at the transport right after the
message was written, through the real server and real sockets.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol

from pkgproxy.tcpwrite import flush, no_delay, unsent
from pkgproxy.upstream import client as upstream_client
from pkgproxy.web.site import ProxyChannel
from tests.integration.harness import (
    HTTPTestClient,
    IntegrationTestCase,
    pattern,
    sleep,
    static,
    wait_until,
)


class FlushTests(IntegrationTestCase):
    async def test_miss_response_and_upstream_request_are_on_the_socket_at_once(self) -> None:
        """Through the server: when a response is finished and when an upstream request
        has been written, the transport holds nothing unsent."""
        after_response: list[int] = []
        after_request: list[int] = []
        original_done = ProxyChannel.requestDone
        original_request = upstream_client._ClientProtocol.request

        def request_done(channel: ProxyChannel, request: Any) -> None:
            original_done(channel, request)
            after_response.append(unsent(channel.transport))

        def request(protocol: Any, req: Any) -> Any:
            d = original_request(protocol, req)
            after_request.append(unsent(protocol.transport))
            return d

        self.patch(ProxyChannel, "requestDone", request_done)
        self.patch(upstream_client._ClientProtocol, "request", request)
        upstream, proxy = await self.files_setup()
        for n in range(3):
            upstream.handlers[b"/f%d" % n] = static(pattern(20_000, b"f%d" % n))
        client = HTTPTestClient()
        self.addCleanup(client.close)
        for n in range(3):
            result = await client.get(proxy.url(f"/files/f{n}"))
            self.assertEqual((result.status, result.body), (200, pattern(20_000, b"f%d" % n)))
        self.assertEqual(after_response, [0, 0, 0])
        self.assertEqual(after_request, [0, 0, 0])

    async def test_flush_keeps_order_and_leaves_a_closing_transport_alone(self) -> None:
        """Bytes flushed after earlier buffered ones arrive after them; a transport that
        is closing keeps its bytes for the reactor, which delivers them and closes."""
        received = bytearray()
        closed: list[bool] = []

        class Sink(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.extend(data)

            def connectionLost(self, reason: Any = None) -> None:
                closed.append(True)

        port = reactor.listenTCP(0, Factory.forProtocol(Sink), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        sender = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol()
        )
        transport: Any = sender.transport
        self.addCleanup(lambda: transport.connected and transport.abortConnection())
        transport.write(b"one ")
        transport.write(b"two ")
        flush(transport)
        self.assertEqual(unsent(transport), 0)
        await wait_until(lambda: bytes(received) == b"one two ", 5)

        transport.write(b"three")
        transport.loseConnection()
        flush(transport)
        self.assertEqual(unsent(transport), 5)  # left for the reactor
        await wait_until(lambda: bool(closed), 5)
        self.assertEqual(bytes(received), b"one two three")

    async def test_flush_ignores_what_is_not_plain_tcp(self) -> None:
        """A transport that is not a plain TCP socket (TLS, a test double) is left as is."""

        class NotTCP:
            written = b""

            def write(self, data: bytes) -> None:
                self.written += data

        t = NotTCP()
        flush(t)
        flush(None)
        await sleep(0)
        self.assertEqual(t.written, b"")


class NoDelayTests(IntegrationTestCase):
    async def test_client_and_upstream_sockets_send_small_segments_at_once(self) -> None:
        """Through the server: the client's connection and the upstream connection have
        TCP_NODELAY set. Without it, a response whose last verified byte leaves in a send
        of its own waited for the client's delayed acknowledgement (30-40 ms a miss)."""
        channels: list[bool] = []
        upstreams: list[bool] = []
        original_done = ProxyChannel.requestDone
        original_request = upstream_client._ClientProtocol.request

        def request_done(channel: ProxyChannel, request: Any) -> None:
            channels.append(bool(channel.transport.getTcpNoDelay()))  # type: ignore[attr-defined]
            original_done(channel, request)

        def request(protocol: Any, req: Any) -> Any:
            upstreams.append(bool(protocol.transport.getTcpNoDelay()))
            return original_request(protocol, req)

        self.patch(ProxyChannel, "requestDone", request_done)
        self.patch(upstream_client._ClientProtocol, "request", request)
        upstream, proxy = await self.files_setup()
        upstream.handlers[b"/small"] = static(pattern(5_000, b"s"))
        client = HTTPTestClient()
        self.addCleanup(client.close)
        result = await client.get(proxy.url("/files/small"))
        self.assertEqual((result.status, result.body), (200, pattern(5_000, b"s")))
        self.assertEqual((channels, upstreams), ([True], [True]))

    def test_beneath_tls_and_on_what_is_not_tcp(self) -> None:
        class Tcp:
            nodelay = False

            def setTcpNoDelay(self, on: bool) -> None:
                self.nodelay = on

        class Tls:
            def __init__(self, below: Any) -> None:
                self.transport = below

        tcp = Tcp()
        no_delay(Tls(tcp))
        self.assertTrue(tcp.nodelay)
        no_delay(object())  # a transport that is not TCP: nothing to set
        no_delay(None)
