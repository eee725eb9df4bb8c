"""The body producers (pkgproxy/web/producer.py) against a real twisted.web request on a
``StringTransport``: a complete file, a range, a download that grows, fails or stalls, a
client that pauses or goes away; every way a response ends releases its file once."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from pkgproxy.diskpool import DiskPool
from pkgproxy.fetch.body import BodyWriter, MemoryBody, SharedFile
from pkgproxy.web import producer
from pkgproxy.web.producer import (
    CHUNK,
    STALL_TIMEOUT,
    BodyProducer,
    CompleteSource,
    OwnedFile,
    SendfileProducer,
)

BODY = bytes(range(256)) * (CHUNK // 128 + 3)  # a little over two chunks


class GrowingSource:
    """A download in progress, as the producer sees a fetch."""

    def __init__(self) -> None:
        self.size = 0
        self.complete = False
        self.failed = False
        self._waiters: list[Deferred[None]] = []

    def available(self) -> int:
        return self.size

    def wait(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def grow(self, size: int, complete: bool = False, failed: bool = False) -> None:
        self.size, self.complete, self.failed = size, complete, failed
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


class Serve(Resource):
    """Answers with whatever producer ``make`` starts for the request."""

    isLeaf = True

    def __init__(self, make: Callable[[Request], Any], length: int | None) -> None:
        super().__init__()
        self._make = make
        self._length = length
        self.producer: Any = None

    def render_GET(self, request: Request) -> object:
        if self._length is not None:
            request.setHeader(b"content-length", str(self._length).encode())
        self.producer = self._make(request)
        self.producer.start()
        return NOT_DONE_YET


class ProducerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = DiskPool(None)
        self.closed = 0
        self.released: list[str] = []

    def on_close(self) -> None:
        self.closed += 1

    def temp_file(self, data: bytes) -> OwnedFile:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        fd = os.open(path, os.O_RDONLY)
        self.addCleanup(self._close_quietly, fd)
        return OwnedFile(fd)

    @staticmethod
    def _close_quietly(fd: int) -> None:
        try:
            os.close(fd)
        except OSError:
            pass

    def serve(self, make: Callable[[Request], Any], length: int | None) -> tuple[Any, Any]:
        """Send one GET through a real channel; ``(transport, channel)``."""
        self.resource = Serve(make, length)
        site = Site(self.resource, reactor=self.clock)
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: test\r\n\r\n")
        self.addCleanup(lambda: channel.connectionLost(Failure(ConnectionError())))
        return transport, channel

    @staticmethod
    def body_of(transport: StringTransport) -> bytes:
        """The response body so far (nothing before the head is written)."""
        parts = transport.value().split(b"\r\n\r\n", 1)
        return parts[1] if len(parts) == 2 else b""

    def body_producer(
        self, file: Any, source: Any, start: int = 0, end: int | None = None, sync_read: int = 0
    ) -> Callable[[Request], BodyProducer]:
        def make(request: Request) -> BodyProducer:
            return BodyProducer(
                request, file, source, start, end, self.pool, self.clock, self.on_close, sync_read
            )

        return make

    def test_following_subscriber_reads_the_last_piece_from_memory(self) -> None:
        """The bytes a download just wrote are sent from memory: a subscriber at the
        front never reads them back from the file (where a read can wait for the next
        write). Bytes before the last piece still come from the file."""
        path = self.mktemp()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        body = SharedFile(fd)
        self.addCleanup(body.release)
        reads: list[int] = []
        real = body.read
        body.read = lambda size, offset: reads.append(offset) or real(size, offset)  # type: ignore[method-assign,func-returns-value]
        hashers: dict[str, Any] = {}
        source = GrowingSource()
        writer = BodyWriter(
            body,
            hashers,
            self.pool,
            url="http://up.test/x",
            length=None,
            may_spill=False,
            on_written=lambda n: source.grow(writer.written),
            on_finished=lambda _: source.grow(writer.written, complete=True),
            on_refused=lambda why: None,
            disk_error=lambda why: None,
        )
        transport, _ = self.serve(self.body_producer(body.acquire(), source), None)
        for piece in (b"a" * 1000, b"b" * 2000, b"c" * 10):
            writer.add(piece)
        writer.end(Failure(ConnectionDone()))
        sent = transport.value()
        for piece in (b"a" * 1000, b"b" * 2000, b"c" * 10 + b"\r\n0\r\n\r\n"):
            self.assertIn(piece, sent)
        self.assertEqual(reads, [])
        self.assertEqual(body.recent(10, 3000), b"c" * 10)
        self.assertIsNone(body.recent(10, 2990))
        self.assertEqual(body.read(10, 2990), b"b" * 10)

    def test_complete_file(self) -> None:
        """A complete file is sent whole, the response finished, the fd closed once."""
        file = self.temp_file(BODY)
        transport, _ = self.serve(self.body_producer(file, CompleteSource(len(BODY))), len(BODY))
        self.assertEqual(self.body_of(transport), BODY)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"))
        self.assertFalse(transport.disconnecting)  # kept alive for the next request
        self.assertEqual(self.closed, 1)
        self.assertRaises(OSError, os.fstat, file.fd)

    def test_range(self) -> None:
        """``[start, end)`` of the file, nothing more."""
        file = self.temp_file(BODY)
        make = self.body_producer(file, CompleteSource(len(BODY)), 10, CHUNK + 20)
        transport, _ = self.serve(make, CHUNK + 10)
        self.assertEqual(self.body_of(transport), BODY[10 : CHUNK + 20])
        self.assertEqual(self.closed, 1)

    def test_growing_download(self) -> None:
        """A download is sent as it grows and ends when it is complete."""
        body = MemoryBody()
        source = GrowingSource()
        transport, _ = self.serve(self.body_producer(body, source), None)
        self.assertEqual(self.body_of(transport), b"")
        body.data += b"abc"
        source.grow(3)
        self.assertIn(b"abc", self.body_of(transport))
        body.data += b"defg"
        source.grow(7, complete=True)
        self.assertTrue(self.body_of(transport).endswith(b"0\r\n\r\n"))  # chunked, ended
        self.assertIn(b"defg", self.body_of(transport))
        self.assertEqual(self.closed, 1)

    def test_failed_download_aborts(self) -> None:
        """A download that fails ends the response as a failed transfer: the
        connection is aborted, never finished cleanly."""
        body = MemoryBody()
        source = GrowingSource()
        transport, _ = self.serve(self.body_producer(body, source), 10)
        body.data += b"abc"
        source.grow(3)
        source.grow(3, failed=True)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.body_of(transport), b"abc")
        self.assertEqual(self.closed, 1)

    def test_paused_client_reads_nothing(self) -> None:
        """While paused nothing is read; resumed, the rest is sent."""
        body = MemoryBody()
        source = GrowingSource()
        transport, _ = self.serve(self.body_producer(body, source), 6)
        prod = self.resource.producer
        prod.pauseProducing()
        body.data += b"abcdef"
        source.grow(6, complete=True)
        self.assertEqual(self.body_of(transport), b"")
        self.clock.advance(STALL_TIMEOUT - 1)
        prod.resumeProducing()
        self.assertEqual(self.body_of(transport), b"abcdef")
        self.assertEqual(self.closed, 1)

    def test_stall_timeout(self) -> None:
        """A client paused for STALL_TIMEOUT is cut off and its file released."""
        body = MemoryBody()
        source = GrowingSource()
        transport, _ = self.serve(self.body_producer(body, source), 6)
        self.resource.producer.pauseProducing()
        self.clock.advance(STALL_TIMEOUT)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.closed, 1)

    def test_client_goes_away(self) -> None:
        """A client that disconnects mid-body releases the file at once, once."""
        file = self.temp_file(BODY)
        source = GrowingSource()
        transport, channel = self.serve(self.body_producer(file, source), len(BODY))
        channel.connectionLost(Failure(ConnectionError()))
        self.assertEqual(self.closed, 1)
        self.assertRaises(OSError, os.fstat, file.fd)
        source.grow(len(BODY), complete=True)  # nothing more happens
        self.assertEqual(self.closed, 1)

    def test_short_read_aborts(self) -> None:
        """A cache file shorter than its entry says is a failed transfer, not a hang."""
        file = self.temp_file(b"abc")
        transport, _ = self.serve(self.body_producer(file, CompleteSource(10)), 10)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.closed, 1)
        self.flushLoggedErrors(OSError)

    def test_small_reads_inline(self) -> None:
        """Reads up to ``sync_read`` bytes are made in the reactor, not the pool."""
        file = self.temp_file(b"hello")
        ran: list[object] = []
        real = self.pool.run

        def counting(f: Any, *args: Any) -> Any:
            ran.append(f)
            return real(f, *args)

        self.patch(self.pool, "run", counting)
        make = self.body_producer(file, CompleteSource(5), sync_read=16)
        transport, _ = self.serve(make, 5)
        self.assertEqual((self.body_of(transport), ran), (b"hello", []))
        make = self.body_producer(self.temp_file(b"hello"), CompleteSource(5))
        transport, _ = self.serve(make, 5)
        self.assertEqual((self.body_of(transport), len(ran)), (b"hello", 1))


class SendfileTests(SynchronousTestCase):
    def test_not_usable_on_a_string_transport(self) -> None:
        """Only a plain TCP socket can be fed by sendfile."""
        request: Any = type("Req", (), {})()
        request.channel = type("Channel", (), {"transport": StringTransport()})()
        self.assertFalse(SendfileProducer.usable(request))

    def test_sends_the_range_to_the_socket(self) -> None:
        """Over a socket the range goes kernel to socket and the response is finished."""
        left, right = socket.socketpair()
        self.addCleanup(left.close)
        self.addCleanup(right.close)
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(BODY)
        fd = os.open(path, os.O_RDONLY)

        class Transport(StringTransport):
            """Enough of a TCP transport: its buffer is empty, its socket real."""

            TLS = False
            dataBuffer = b""
            offset = 0
            _tempDataLen = 0
            producerPaused = False

            def __init__(self) -> None:
                super().__init__()
                self.socket = left

            def startWriting(self) -> None:
                pass

        transport = Transport()
        finished: list[bool] = []

        class Req:
            channel: Any = type("Channel", (), {"transport": transport})()
            sentLength = 0

            def registerProducer(self, p: Any, streaming: bool) -> None:
                pass

            def unregisterProducer(self) -> None:
                pass

            def notifyFinish(self) -> Deferred[None]:
                return Deferred()

            def write(self, data: bytes) -> None:
                transport.write(data)

            def finish(self) -> None:
                finished.append(True)

        request: Any = Req()
        self.patch(producer, "flush", lambda t: None)
        closed: list[bool] = []
        SendfileProducer(
            request, OwnedFile(fd), 5, 5 + 1000, Clock(), lambda: closed.append(True)
        ).start()
        self.assertEqual(right.recv(4096), BODY[5:1005])
        self.assertEqual((finished, closed, request.sentLength), ([True], [True], 1000))
        self.assertRaises(OSError, os.fstat, fd)
