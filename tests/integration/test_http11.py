"""The upstream HTTP/1.1 client against a scripted server on 127.0.0.1.

Each test scripts the server's answers byte for byte, so the client meets what real
upstreams send: chunked and close-delimited bodies, bare LF heads, 1xx answers, bodies
where none belongs, kept-alive connections closed under it, and answers that are not
HTTP at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from pkgproxy.upstream.client import _BytesBody
from pkgproxy.upstream.http11 import Http11Agent, ProtocolError
from tests.integration.harness import sleep, wait_until

Reply = bytes | Callable[[Protocol], None] | None


class _Script(Protocol):
    def connectionMade(self) -> None:
        self.factory.connections.append(self)  # type: ignore[attr-defined]
        self._buf = b""

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        factory: Any = self.factory
        while b"\r\n\r\n" in self._buf:
            head, _, rest = self._buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            factory.requests.append(head + b"\r\n\r\n" + rest[:length])
            self._buf = rest[length:]
            reply = factory.replies.pop(0) if factory.replies else None
            if callable(reply):
                reply(self)
            elif reply is not None:
                self.transport.write(reply)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.lost.append(self)  # type: ignore[attr-defined]


class _Endpoints:
    def __init__(self, port: int) -> None:
        self.port = port
        self.asked = 0

    def endpointForURI(self, uri: Any) -> TCP4ClientEndpoint:
        self.asked += 1
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[list[Failure]] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback([reason])  # a list: a Failure itself would fail the Deferred


class Http11AgentTests(unittest.TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.factory: Any = Factory.forProtocol(_Script)
        self.factory.replies = []
        self.factory.requests = []
        self.factory.connections = []
        self.factory.lost = []
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.endpoints = _Endpoints(self.port.getHost().port)
        self.agent = Http11Agent(reactor, self.endpoints, max_idle=4, idle_timeout=30)
        self.addCleanup(self._close)

    async def _close(self) -> None:
        await self.agent.closeCachedConnections()
        for conn in self.factory.connections:
            conn.transport.abortConnection()
        await wait_until(
            lambda: len(self.factory.lost) == len(self.factory.connections), 5, "closes"
        )

    def url(self, path: str = "/f") -> bytes:
        return b"http://127.0.0.1:%d%s" % (self.port.getHost().port, path.encode())

    async def get(
        self, path: str = "/f", method: bytes = b"GET", **kw: Any
    ) -> tuple[Any, bytes, Failure]:
        response = await self.agent.request(method, self.url(path), **kw)
        body = _Collect()
        response.deliverBody(body)
        (reason,) = await body.done
        return response, body.data, reason

    async def test_length_bodies_on_one_kept_connection(self) -> None:
        """Two answers with Content-Length arrive whole, on one connection; the request
        names the host and port and carries the given headers."""
        self.factory.replies = [
            b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\nETag: "a"\r\n\r\nhello',
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye",
        ]
        r1, b1, why1 = await self.get("/a?x=1", headers=Headers({b"accept": [b"*/*"]}))
        r2, b2, why2 = await self.get("/b")
        self.assertEqual((r1.code, r1.length, b1), (200, 5, b"hello"))
        self.assertEqual(r1.headers.getRawHeaders(b"etag"), [b'"a"'])
        self.assertEqual((r2.code, b2), (200, b"bye"))
        self.assertTrue(why1.check(ResponseDone) and why2.check(ResponseDone))
        self.assertEqual(len(self.factory.connections), 1)
        first = self.factory.requests[0]
        self.assertTrue(first.startswith(b"GET /a?x=1 HTTP/1.1\r\n"), first)
        self.assertIn(b"\r\nHost: 127.0.0.1:%d\r\n" % self.port.getHost().port, first)
        self.assertIn(b"\r\nAccept: */*\r\n", first)
        self.assertEqual(self.endpoints.asked, 1)

    async def test_chunked_body_split_anywhere(self) -> None:
        """A chunked body, its bytes sent one at a time, with an extension and a
        trailer, is decoded whole and the connection kept."""
        body = b"4;ext=1\r\nWiki\r\n6\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\n"

        def dribble(proto: Protocol) -> None:
            proto.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(len(body)):
                reactor.callLater(0.001 * i, proto.transport.write, body[i : i + 1])

        self.factory.replies = [dribble, b"HTTP/1.1 204 No Content\r\n\r\n"]
        response, data, why = await self.get()
        self.assertEqual(data, b"Wikipedia in \r\n\r\nchunks.")
        self.assertIs(response.length, UNKNOWN_LENGTH)
        self.assertTrue(why.check(ResponseDone))
        response, data, why = await self.get()
        self.assertEqual((response.code, data), (204, b""))
        self.assertEqual(len(self.factory.connections), 1)

    async def test_bad_chunk_size_fails_the_body(self) -> None:
        """Only hex digits make a chunk size (not what int() would also take); a chunk's
        data must end its line."""
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        for bad in (b"zz\r\n", b"0x5\r\n", b"+5\r\n", b"5_0\r\n", b"\r\n", b"1\r\nab\r\n"):
            self.factory.replies = [head + bad]
            _, data, why = await self.get()
            self.assertEqual(data[:5], b"hello", bad)
            self.assertTrue(why.check(ResponseFailed), bad)
            self.assertIsInstance(why.value.reasons[0].value, ProtocolError)

    async def test_close_delimited_body_is_potential_data_loss(self) -> None:
        """No length and no chunking: the body ends with the connection, which is not
        reused."""

        def reply(proto: Protocol) -> None:
            proto.transport.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")
            proto.transport.loseConnection()

        self.factory.replies = [reply, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
        response, data, why = await self.get()
        self.assertEqual((response.length, data), (UNKNOWN_LENGTH, b"all of it"))
        self.assertTrue(why.check(PotentialDataLoss))
        _, data, _ = await self.get()
        self.assertEqual(data, b"ok")
        self.assertEqual(len(self.factory.connections), 2)

    async def test_truncated_length_body_fails(self) -> None:
        def reply(proto: Protocol) -> None:
            proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
            proto.transport.loseConnection()

        self.factory.replies = [reply]
        _, data, why = await self.get()
        self.assertEqual(data, b"short")
        self.assertTrue(why.check(ResponseFailed))

    async def test_head_and_304_have_no_body(self) -> None:
        """HEAD's answer announces a length but carries no body; a 304 neither; a 1xx
        before the real answer is skipped; a bare-LF head is read."""
        self.factory.replies = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
            b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n',
            b"HTTP/1.1 200 OK\nContent-Length: 2\nX-Folded: a\n b\n\nok",
        ]
        response, data, why = await self.get(method=b"HEAD")
        self.assertEqual((response.code, response.length, data), (200, 0, b""))
        self.assertTrue(why.check(ResponseDone))
        response, data, _ = await self.get()
        self.assertEqual((response.code, data), (304, b""))
        response, data, _ = await self.get()
        self.assertEqual((response.code, data), (200, b"ok"))
        self.assertEqual(response.headers.getRawHeaders(b"x-folded"), [b"a b"])
        self.assertEqual(len(self.factory.connections), 1)

    async def test_connection_close_and_http10_are_not_reused(self) -> None:
        self.factory.replies = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\na",
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nb",
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\nc",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nd",
        ]
        bodies = [(await self.get())[1] for _ in range(4)]
        self.assertEqual(bodies, [b"a", b"b", b"c", b"d"])
        self.assertEqual(len(self.factory.connections), 3)

    async def test_kept_connection_closed_by_upstream_is_retried_once(self) -> None:
        """A GET on a kept connection the upstream closed without answering is sent
        again on a new connection; a POST is not."""

        def hang_up(proto: Protocol) -> None:
            proto.transport.loseConnection()

        self.factory.replies = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na",
            hang_up,
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nc",
            hang_up,
        ]
        self.assertEqual((await self.get())[1], b"a")
        self.assertEqual((await self.get())[1], b"b")
        self.assertEqual(len(self.factory.connections), 2)
        self.assertEqual((await self.get())[1], b"c")
        with self.assertRaises(ResponseNeverReceived):
            await self.agent.request(b"POST", self.url(), bodyProducer=_BytesBody(b"xy"))
        self.assertTrue(self.factory.requests[-1].endswith(b"Content-Length: 2\r\n\r\nxy"))

    async def test_request_line_cannot_be_injected(self) -> None:
        """A method or target that would end the request line early is refused before
        anything is sent."""
        for method, path in ((b"GET", "/a b"), (b"GET", "/a\r\nX: 1"), (b"GE T", "/a")):
            with self.assertRaises(ValueError):
                await self.agent.request(method, self.url(path))
        self.assertEqual(self.factory.requests, [])

    async def test_fresh_connection_closed_before_answer_fails(self) -> None:
        def hang_up(proto: Protocol) -> None:
            proto.transport.loseConnection()

        self.factory.replies = [hang_up]
        with self.assertRaises(ResponseNeverReceived):
            await self.agent.request(b"GET", self.url())
        self.assertEqual(len(self.factory.requests), 1)

    async def test_not_http_and_bad_heads_fail(self) -> None:
        self.factory.replies = [
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000,
            b"HTTP/1.1 200 OK\r\nBad(Name): 1\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        ]
        for _ in range(6):
            with self.assertRaises(ResponseFailed) as caught:
                await self.agent.request(b"GET", self.url())
            self.assertIsInstance(caught.exception.reasons[0].value, ProtocolError)

    async def test_body_where_none_belongs_closes_the_connection(self) -> None:
        self.factory.replies = [
            b"HTTP/1.1 304 Not Modified\r\n\r\njunk",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxEXTRA",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\ny",
        ]
        self.assertEqual((await self.get())[1], b"")
        self.assertEqual((await self.get())[1], b"x")
        self.assertEqual((await self.get())[1], b"y")
        self.assertEqual(len(self.factory.connections), 3)

    async def test_cancel_while_waiting_for_the_head(self) -> None:
        self.factory.replies = [None]
        d = self.agent.request(b"GET", self.url())
        await wait_until(lambda: self.factory.requests, 5, "the request")
        d.cancel()
        with self.assertRaises(CancelledError):
            await d
        await wait_until(lambda: self.factory.lost, 5, "the connection to close")

    async def test_cancel_while_connecting(self) -> None:
        """A connect that never completes (a port nobody answers on a black-holed
        address is not available here, so the connect Deferred is held) is cancelled."""
        held: Deferred[Any] = Deferred()

        class Held:
            def connect(self, factory: Any) -> Deferred[Any]:
                return held

        class HeldEndpoints:
            def endpointForURI(self, uri: Any) -> Held:
                return Held()

        agent = Http11Agent(reactor, HeldEndpoints())  # type: ignore[arg-type]
        d = agent.request(b"GET", b"http://example.invalid/x")
        d.cancel()
        with self.assertRaises(CancelledError):
            await d
        self.assertTrue(held.called)  # the connect attempt itself was cancelled
        held.addErrback(lambda f: None)

    async def test_body_flow_control_and_stop(self) -> None:
        """Pausing the body stops reading; resuming goes on; stopping it drops the
        connection and ends the body as failed."""
        big = b"x" * (4 << 20)

        def reply(proto: Protocol) -> None:
            proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big))
            proto.transport.write(big)

        self.factory.replies = [reply]
        response = await self.agent.request(b"GET", self.url())

        class Reader(_Collect):
            paused_at = -1
            stop_after = -1

            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                transport: Any = self.transport
                if self.paused_at < 0 and len(self.data) > 64 * 1024:
                    self.paused_at = len(self.data)
                    transport.pauseProducing()
                elif 0 <= self.stop_after < len(self.data):
                    self.stop_after = -1
                    transport.stopProducing()  # mid-body: the rest is never read

        reader = Reader()
        response.deliverBody(reader)
        await wait_until(lambda: reader.paused_at >= 0, 5, "a pause")
        await sleep(0.2)
        self.assertLess(len(reader.data) - reader.paused_at, 1 << 20)  # one read more at most
        reader.stop_after = len(reader.data) + (1 << 20)
        reader.transport.resumeProducing()  # type: ignore[union-attr]
        (why,) = await reader.done
        self.assertTrue(why.check(ResponseFailed))
        self.assertGreater(len(reader.data), reader.paused_at + (1 << 20))
        self.assertLess(len(reader.data), len(big))

    async def test_body_read_later_is_held(self) -> None:
        """A body that arrives before anyone reads it is kept and handed over whole."""
        self.factory.replies = [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate"]
        response = await self.agent.request(b"GET", self.url())
        await sleep(0.05)
        body = _Collect()
        response.deliverBody(body)
        (why,) = await body.done
        self.assertEqual(body.data, b"late")
        self.assertTrue(why.check(ResponseDone))

    async def test_idle_connections_are_capped_and_closed_at_stop(self) -> None:
        """At most max_idle connections are kept; the rest are closed as they free up;
        closeCachedConnections closes the kept ones."""
        self.factory.replies = [None] * 6
        pending = [self.agent.request(b"GET", self.url(f"/{i}")) for i in range(6)]
        await wait_until(lambda: len(self.factory.requests) == 6, 5, "six requests")
        for conn in self.factory.connections:
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        for d in pending:
            response = await d
            self.assertEqual(response.code, 200)
        await wait_until(lambda: len(self.factory.lost) == 2, 5, "two closes")
        await self.agent.closeCachedConnections()
        await wait_until(lambda: len(self.factory.lost) == 6, 5, "all closed")
