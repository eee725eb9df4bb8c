"""Shared wiring for the integration tests: real sockets, one real reactor, one process.

- :class:`ProxyUnderTest` builds the objects :func:`pkgproxy.tap.build_service` builds
  (DiskPool, CacheStore, UpstreamService, InFlight, Learner, ProxyResource, Site),
  listens on 127.0.0.1 port 0, and stops them one after the other so that the reactor
  is left clean. Its store and resource read the time from a :class:`ServerClock`,
  which a test advances to let an entry expire instead of sleeping.
- :class:`FakeUpstream` is an HTTP/1.1 server written on a raw :class:`Protocol`: its
  handlers write whatever bytes a test wants, broken ones included, and it records every
  request it receives.
- :class:`HTTPTestClient` is an ``Agent`` on its own connection pool that reads bodies as
  they stream (``treq.collect``); :class:`RawClient` is a bare TCP connection for
  pipelining and abrupt disconnects.
- :class:`IntegrationTestCase` ties them to a trial test and to its cleanups.

Every wait is bounded: a hung test fails with a message instead of hanging the run.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import treq
from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from zope.interface import implementer

from pkgproxy.cache.store import CacheStore
from pkgproxy.config import Config, config_from_dict
from pkgproxy.diskpool import DiskPool
from pkgproxy.families import AUTH_SCOPES, Facts
from pkgproxy.fetch.registry import InFlight
from pkgproxy.learning import Learner
from pkgproxy.upstream.client import UpstreamService
from pkgproxy.web.root import ProxyResource
from pkgproxy.web.site import ProxySite

#: The real reactor; typed loosely because its interfaces are provided dynamically.
reactor: Any = _global_reactor

T = TypeVar("T")


# -- time ------------------------------------------------------------------------------


def sleep(seconds: float) -> Deferred[None]:
    """A Deferred that fires after ``seconds`` of real time."""
    return deferLater(reactor, seconds, lambda: None)


@implementer(IReactorTime)
class ServerClock:
    """The server's clock: the reactor's time, moved forward by :meth:`advance`.

    Timers are the reactor's own (a delay is a delay), so everything keeps running; only
    what the server reads as "now" (freshness, expiry, the hit path's records) jumps, so
    a test lets an entry expire without waiting for it.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.offset = 0.0

    def advance(self, seconds: float) -> None:
        """Move the server's "now" ``seconds`` forward."""
        self.offset += seconds

    def seconds(self) -> float:
        return float(self._reactor.seconds()) + self.offset

    def callLater(self, delay: float, f: Callable[..., object], *a: object, **kw: object) -> Any:
        return self._reactor.callLater(delay, f, *a, **kw)

    def getDelayedCalls(self) -> Any:
        return self._reactor.getDelayedCalls()


def bounded(work: Deferred[T] | Coroutine[Any, Any, T], seconds: float) -> Deferred[T]:
    """``work`` as a Deferred that fails with ``TimeoutError`` after ``seconds``."""
    d = work if isinstance(work, Deferred) else Deferred.fromCoroutine(work)
    return d.addTimeout(seconds, reactor)


async def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "a condition"
) -> None:
    """Poll ``predicate`` every 10 ms; fail the test if it is not true within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await sleep(0.01)


def pattern(size: int, tag: bytes = b"data") -> bytes:
    """``size`` deterministic bytes: 32-byte records naming ``tag`` and their own index.

    A block that arrives at the wrong offset, twice, or not at all changes the digest and
    is visible by eye in a dump.
    """
    records = -(-size // 32)
    return b"".join(b"%-8s%023d\n" % (tag[:8], i) for i in range(records))[:size]


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


# -- fake upstream ---------------------------------------------------------------------


@dataclass
class UpstreamRequest:
    """One request as the fake upstream received it (header names lower-cased)."""

    method: bytes
    path: bytes
    headers: dict[bytes, bytes]
    at: float


Handler = Callable[[UpstreamRequest, "UpstreamConnection"], None]


def response_head(status: int, headers: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """The status line and header block of an HTTP/1.1 response."""
    lines = [b"HTTP/1.1 %d %s" % (status, RESPONSES.get(status, b"Unknown"))]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class UpstreamConnection(Protocol):
    """One server-side connection of :class:`FakeUpstream`.

    Requests are handled one at a time; a handler writes its response with :meth:`write`
    and calls :meth:`done` to read the next request on the connection, or ends the
    connection with :meth:`close` or :meth:`abort`.
    """

    def __init__(self, server: FakeUpstream) -> None:
        self.server = server
        self.open = False
        self._buffer = b""
        self._busy = False
        self._timers: list[IDelayedCall] = []

    def connectionMade(self) -> None:
        self.open = True
        self.server.connections.add(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.open = False
        self.server.connections.discard(self)
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        self._next_request()

    def _next_request(self) -> None:
        while self.open and not self._busy:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
            lines = head.split(b"\r\n")
            method, path, _version = lines[0].split(b" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            request = UpstreamRequest(method, path, headers, time.monotonic())
            self.server.requests.append(request)
            self._busy = True
            self.server.handler_for(path)(request, self)

    # for handlers

    def write(self, data: bytes) -> None:
        """Send bytes, if the connection is still open."""
        if self.open and self.transport is not None:
            self.transport.write(data)

    def done(self) -> None:
        """The response is complete: keep the connection and read the next request."""
        self._busy = False
        self._next_request()

    def close(self) -> None:
        """Close the connection after what was written is sent."""
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection at once (RST)."""
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def later(self, delay: float, f: Callable[..., object], *args: object) -> None:
        """Call ``f(*args)`` after ``delay``, unless the connection is lost first."""
        self._timers = [t for t in self._timers if t.active()]
        self._timers.append(reactor.callLater(delay, f, *args))


def _not_found(request: UpstreamRequest, conn: UpstreamConnection) -> None:
    body = b"not found\n"
    conn.write(response_head(404, [(b"content-length", b"%d" % len(body))]) + body)
    conn.done()


def static(body: bytes, headers: Iterable[tuple[bytes, bytes]] = (), status: int = 200) -> Handler:
    """A handler that answers every request with one complete response (keep-alive)."""
    extra = list(headers)

    def handle(request: UpstreamRequest, conn: UpstreamConnection) -> None:
        head = response_head(status, [(b"content-length", b"%d" % len(body)), *extra])
        conn.write(head + (b"" if request.method == b"HEAD" else body))
        conn.done()

    return handle


class SlowBody:
    """A handler that sends ``body`` with its Content-Length in timed pieces.

    :ivar finished_at: ``time.monotonic()`` when the last piece was handed to the socket.
    :ivar aborted: True if the connection was lost before everything was sent.
    """

    def __init__(
        self,
        body: bytes,
        chunk: int,
        delay: float,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        self.body = body
        self.chunk = chunk
        self.delay = delay
        self.headers = list(headers)
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.sent = 0
        self.aborted = False

    def __call__(self, request: UpstreamRequest, conn: UpstreamConnection) -> None:
        self.started_at = time.monotonic()
        self.sent = 0
        self.finished_at = None
        conn.write(response_head(200, [(b"content-length", b"%d" % len(self.body)), *self.headers]))
        self._send(conn)

    def _send(self, conn: UpstreamConnection) -> None:
        if not conn.open:
            self.aborted = True
            return
        piece = self.body[self.sent : self.sent + self.chunk]
        conn.write(piece)
        self.sent += len(piece)
        if self.sent >= len(self.body):
            self.finished_at = time.monotonic()
            conn.done()
            return
        conn.later(self.delay, self._send, conn)


class FakeUpstream(Factory):
    """An upstream HTTP server on 127.0.0.1 whose answers the test writes byte by byte.

    :ivar handlers: request path (with query) to handler; unknown paths get a 404.
    :ivar requests: every request received, in order.
    """

    noisy = False

    def __init__(self) -> None:
        self.handlers: dict[bytes, Handler] = {}
        self.requests: list[UpstreamRequest] = []
        self.connections: set[UpstreamConnection] = set()
        self.port_number = 0
        self._port: Any = None

    def buildProtocol(self, addr: object) -> UpstreamConnection:
        return UpstreamConnection(self)

    def handler_for(self, path: bytes) -> Handler:
        return self.handlers.get(path, _not_found)

    def count(self, path: bytes) -> int:
        """How many requests for ``path`` arrived."""
        return sum(1 for r in self.requests if r.path == path)

    def url(self, path: str = "/") -> str:
        """An absolute URL on this server."""
        return f"http://127.0.0.1:{self.port_number}{path}"

    def listen(self) -> None:
        """Listen on a fresh port, or on the previous one after :meth:`stop_listening`."""
        self._port = reactor.listenTCP(self.port_number, self, interface="127.0.0.1")
        self.port_number = self._port.getHost().port

    async def stop_listening(self) -> None:
        """Refuse new connections (the port number is kept for :meth:`listen`)."""
        port, self._port = self._port, None
        if port is not None:
            await port.stopListening()

    async def drop_connections(self) -> None:
        """Abort every open connection and wait until they are gone."""
        for conn in list(self.connections):
            conn.abort()
        await wait_until(lambda: not self.connections, 5.0, "upstream connections to close")

    async def stop(self) -> None:
        """Stop listening and drop every connection."""
        await self.stop_listening()
        await self.drop_connections()


# -- pkgproxy ----------------------------------------------------------------------------


def _transport_of(channel: Any) -> Any:
    # Site builds a _GenericHTTPChannelProtocol, a proxy that hides the HTTPChannel.
    return getattr(channel, "_channel", channel).transport


class TrackingSite(ProxySite):
    """A :class:`Site` that knows its open connections, so cleanup can close them."""

    noisy = False

    def __init__(self, resource: Any, reactor: Any) -> None:
        super().__init__(resource, reactor=reactor)
        self.open_channels: set[Any] = set()

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        self.open_channels.add(channel)
        lost = channel.connectionLost

        def connectionLost(reason: Failure) -> None:
            self.open_channels.discard(channel)
            lost(reason)

        channel.connectionLost = connectionLost
        return channel


class ProxyUnderTest:
    """pkgproxy wired as :func:`pkgproxy.tap.build_service` does, on 127.0.0.1 port 0."""

    def __init__(self, config: Config) -> None:
        self.config = config
        #: What the store and the resource read the time from; a test may advance it.
        self.clock = ServerClock(reactor)
        self.diskpool = DiskPool(reactor)
        self.store = CacheStore(config.cache.dir, config.cache.max_size, self.diskpool, self.clock)
        self.upstream = UpstreamService(
            reactor,
            config.upstream,
            routes=config.enabled_routes(),
            node_name=config.node_name,
            auth_scopes=AUTH_SCOPES,
        )
        self.inflight = InFlight()
        self.learner = Learner(Facts(), self.store, self.diskpool, config.routes)
        self.store.when_ready().addCallback(lambda _: self.learner.relearn())
        self.resource = ProxyResource(
            config,
            self.store,
            self.inflight,
            self.upstream.client,
            self.diskpool,
            self.clock,
            config.upstream.idle_timeout,
            self.learner,
            revalidate_window=config.cache.revalidate_window,
        )
        self.site = TrackingSite(self.resource, reactor)
        self.site.hit_path = self.resource.hit_path
        self.site.displayTracebacks = False
        self.port_number = 0
        self._port: Any = None

    async def start(self) -> None:
        """Start the services, wait for the cache index, then listen."""
        self.diskpool.startService()
        self.store.startService()
        self.upstream.startService()
        await bounded(self.store.when_ready(), 10.0)
        self._port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.port_number = self._port.getHost().port

    def url(self, path: str) -> str:
        """The URL of ``path`` on the proxy."""
        return f"http://127.0.0.1:{self.port_number}{path}"

    def stored(self, key: str) -> bool:
        """True if the cache holds a committed entry for ``key`` (``route:path``)."""
        return self.store.peek(key) is not None

    def temp_files(self) -> list[str]:
        """Names of the download temp files now on disk."""
        try:
            return os.listdir(self.store.tmp_dir)
        except FileNotFoundError:
            return []

    async def settled(self, timeout: float = 10.0) -> None:
        """Wait until no fetch is in flight (each one committed or discarded)."""
        await wait_until(lambda: len(self.inflight) == 0, timeout, "in-flight fetches to settle")

    async def no_temp_files(self, timeout: float = 5.0) -> None:
        """Wait until every discarded download's temp file has been deleted."""
        await wait_until(lambda: not self.temp_files(), timeout, "temp files to be removed")

    async def stop(self) -> None:
        """Stop listening, drop client connections, then stop the services in order.

        The order matters: the store needs the disk pool to flush and close its index, and
        ``MultiService`` would stop them all at once.
        """
        port, self._port = self._port, None
        if port is not None:
            await port.stopListening()
        try:
            await wait_until(lambda: len(self.inflight) == 0, 5.0)
        except AssertionError:
            pass  # a test that failed midway; the connections are dropped below
        for channel in list(self.site.open_channels):
            _transport_of(channel).abortConnection()
        await wait_until(lambda: not self.site.open_channels, 5.0, "proxy connections to close")
        await self.upstream.stopService()
        await self.store.stopService()
        self.diskpool.stopService()


# -- clients -----------------------------------------------------------------------------


@dataclass
class Result:
    """One response as a client saw it.

    :ivar error: the exception that ended the body early, if it did not end cleanly.
    :ivar first_byte_at: ``time.monotonic()`` when the first body byte arrived.
    """

    status: int
    headers: Headers
    announced: int | None
    received: int = 0
    digest: str = ""
    body: bytes | None = field(default=None, repr=False)
    error: BaseException | None = None
    first_byte_at: float | None = None
    done_at: float | None = None
    chunks: list[bytes] = field(default_factory=list, repr=False)

    def header(self, name: bytes) -> bytes | None:
        """The last value of a response header."""
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None

    @property
    def x_cache(self) -> bytes | None:
        return self.header(b"x-cache")


class HTTPTestClient:
    """An :class:`Agent` on its own connection pool, bodies read with :func:`treq.collect`.

    Not ``treq.get``: treq wraps its agent in a gzip ``ContentDecoderAgent`` (it asks for
    gzip and rewrites ``Content-Encoding``), and these tests compare the exact bytes and
    headers pkgproxy sends.
    """

    def __init__(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.agent = Agent(reactor, pool=self.pool)

    def get(
        self,
        url: str,
        headers: dict[bytes, bytes] | None = None,
        keep_body: bool = True,
        timeout: float = 20.0,
    ) -> Deferred[Result]:
        """GET ``url`` and read the body as it streams.

        The body is hashed on the way; it is also kept when ``keep_body``. A body that
        does not end cleanly is reported in :attr:`Result.error`, not raised.
        """
        return bounded(self._get(url, headers, keep_body), timeout)

    async def _get(self, url: str, headers: dict[bytes, bytes] | None, keep_body: bool) -> Result:
        hdrs = Headers({k: [v] for k, v in (headers or {}).items()})
        response = await self.agent.request(b"GET", url.encode("ascii"), hdrs)
        result = Result(
            status=response.code,
            headers=response.headers,
            announced=response.length if isinstance(response.length, int) else None,
        )
        hasher = hashlib.sha256()

        def collect(data: bytes) -> None:
            if result.first_byte_at is None:
                result.first_byte_at = time.monotonic()
            result.received += len(data)
            hasher.update(data)
            if keep_body:
                result.chunks.append(data)

        try:
            await treq.collect(response, collect)
        except Exception as e:
            result.error = e
        result.done_at = time.monotonic()
        result.digest = hasher.hexdigest()
        if keep_body:
            result.body = b"".join(result.chunks)
            result.chunks.clear()
        return result

    async def close(self) -> None:
        await self.pool.closeCachedConnections()


class RawClient(Protocol):
    """A bare TCP client: the test writes request bytes and reads what comes back."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed = False
        self.closed_at: float | None = None
        #: The connection ended in a reset (a failed transfer), not a clean close.
        self.reset = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        self.closed_at = time.monotonic()
        self.reset = reason is not None and not reason.check(ConnectionDone)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def abort(self) -> None:
        """Drop the connection at once (RST)."""
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    async def wait_closed(self, timeout: float = 10.0) -> None:
        await wait_until(lambda: self.closed, timeout, "the server to close the connection")


async def raw_connect(port: int) -> RawClient:
    """A :class:`RawClient` connected to 127.0.0.1:``port``."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    client: RawClient = await bounded(connectProtocol(endpoint, RawClient()), 5.0)
    return client


async def raw_get(port: int, path: bytes, timeout: float = 10.0) -> tuple[bytes, bytes, bool]:
    """``GET path`` on a connection of its own, read until the server ends it:
    ``(head, body as received, ended in a reset)``. For bodies framed by the end of the
    connection, which an HTTP client library cannot report as failed."""
    raw = await raw_connect(port)
    raw.send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
    await raw.wait_closed(timeout)
    head, _, body = bytes(raw.received).partition(b"\r\n\r\n")
    return head, body, raw.reset


@dataclass
class RawResponse:
    """A response parsed from raw bytes."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes


def parse_responses(data: bytes) -> tuple[list[RawResponse], bytes]:
    """Parse complete HTTP/1.1 responses (Content-Length or chunked) from ``data``.

    :return: the complete responses, and the bytes after the last one.
    """
    out: list[RawResponse] = []
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return out, data
        lines = data[:end].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        rest = data[end + 4 :]
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = bytearray()
            while True:
                eol = rest.find(b"\r\n")
                if eol < 0:
                    return out, data
                size = int(rest[:eol].split(b";")[0], 16)
                if len(rest) < eol + 2 + size + 2:
                    return out, data
                body += rest[eol + 2 : eol + 2 + size]
                rest = rest[eol + 2 + size + 2 :]
                if size == 0:
                    break
            out.append(RawResponse(status, headers, bytes(body)))
        else:
            length = int(headers.get(b"content-length", b"0"))
            if len(rest) < length:
                return out, data
            out.append(RawResponse(status, headers, rest[:length]))
            rest = rest[length:]
        data = rest


async def start_service_tree(
    case: unittest.TestCase, config: Config
) -> tuple[Any, CacheStore, int]:
    """pkgproxy's whole service tree as twistd runs it: ``(top service, store, port)``.

    Stopped when the test ends; returns once it listens and the cache index is loaded.
    """
    from twisted.application.internet import StreamServerEndpointService

    from pkgproxy.tap import build_service

    top = build_service(config, reactor)
    top.startService()
    case.addCleanup(lambda: top.stopService() if top.running else None)
    store = next(s for s in top if isinstance(s, CacheStore))
    listener = next(s for s in top if isinstance(s, StreamServerEndpointService))
    # No public accessor for the port a strports service got: this Deferred is it.
    waiting = listener._waitingForPort
    assert waiting is not None
    port = await bounded(waiting, 5)
    await bounded(store.when_ready(), 10)
    return top, store, int(port.getHost().port)


# -- the test case -------------------------------------------------------------------------


class IntegrationTestCase(unittest.TestCase):
    """Starts fake upstreams, pkgproxy and clients, and tears them down in reverse order."""

    timeout = 45

    async def start_upstream(self) -> FakeUpstream:
        upstream = FakeUpstream()
        upstream.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(upstream.stop()))
        return upstream

    async def start_proxy(self, data: dict[str, Any]) -> ProxyUnderTest:
        """pkgproxy with the config ``data`` (parsed TOML), caching in a fresh directory."""
        data = dict(data)
        data.setdefault("cache", {"dir": self.mktemp(), "max_size": "1GiB"})
        proxy = ProxyUnderTest(config_from_dict(data))
        await proxy.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.stop()))
        return proxy

    def client(self) -> HTTPTestClient:
        c = HTTPTestClient()
        self.addCleanup(lambda: Deferred.fromCoroutine(c.close()))
        return c

    async def raw_client(self, proxy: ProxyUnderTest) -> RawClient:
        c = await raw_connect(proxy.port_number)
        self.addCleanup(c.abort)
        return c

    async def files_setup(
        self, upstream_config: dict[str, Any] | None = None
    ) -> tuple[FakeUpstream, ProxyUnderTest]:
        """A fake upstream behind an immutable generic route at ``/files/``."""
        upstream = await self.start_upstream()
        data: dict[str, Any] = {
            "routes": {
                "files": {"family": "generic", "immutable": True, "upstream": upstream.url()}
            }
        }
        if upstream_config:
            data["upstream"] = upstream_config
        proxy = await self.start_proxy(data)
        return upstream, proxy

    def assertFailedTransfer(self, result: Result) -> None:
        """The client saw its response end early, as a failed transfer."""
        self.assertIsInstance(
            result.error, ResponseFailed, f"expected a failed transfer, got {result!r}"
        )
