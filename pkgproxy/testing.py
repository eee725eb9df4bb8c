"""Test doubles shipped with the package: a scriptable upstream and an in-memory proxy.

The in-memory proxy is the real resource, store and fetch code, wired to a fake clock, a
synchronous disk pool and an upstream reached through treq's RequestTraversalAgent, so a
whole request/response cycle runs deterministically with no sockets and no threads.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from pkgproxy.cache.store import CacheStore
from pkgproxy.config import Config, Route, config_from_dict
from pkgproxy.diskpool import DiskPool
from pkgproxy.families import Facts
from pkgproxy.fetch.fetch import Fetch
from pkgproxy.fetch.registry import InFlight
from pkgproxy.learning import Learner
from pkgproxy.observe import Observer, RequestRecord
from pkgproxy.upstream.client import UpstreamClient
from pkgproxy.web.root import ProxyResource


@dataclass
class Seen:
    """One request the fake upstream received."""

    method: bytes
    path: bytes
    headers: dict[bytes, bytes]


@dataclass
class FakeFile:
    """What the fake upstream answers for one path.

    :ivar hold: when set, GET bodies are not sent until :meth:`FakeUpstream.release`.
    :ivar partial: with ``hold``, send this many bytes of the body at once, the rest
        on release (a transfer that stalls in the middle).
    :ivar location: answer with this redirect target.
    """

    body: bytes
    status: int = 200
    headers: dict[bytes, bytes] = field(default_factory=dict)
    etag: bytes | None = None
    last_modified: bytes | None = None
    hold: bool = False
    partial: int = 0
    location: bytes | None = None


class FakeUpstream(Resource):
    """A scriptable origin: files by path, conditional requests, held responses."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[bytes, FakeFile] = {}
        self.seen: list[Seen] = []
        self.down = False
        self._held: list[tuple[Request, FakeFile]] = []

    def add(self, path: str, body: bytes, **kw: Any) -> FakeFile:
        """Serve ``body`` at ``path``."""
        f = FakeFile(body, **kw)
        self.files[path.encode()] = f
        return f

    def count(self, path: str, method: bytes = b"GET") -> int:
        """How many requests for ``path`` arrived."""
        return sum(1 for s in self.seen if s.path == path.encode() and s.method == method)

    def render(self, request: Request) -> bytes | int:
        self.seen.append(
            Seen(
                request.method,
                request.uri,
                {k.lower(): v[-1] for k, v in request.requestHeaders.getAllRawHeaders()},
            )
        )
        if self.down:
            request.setResponseCode(503)
            return b"down"
        f = self.files.get(request.uri)
        if f is None:
            request.setResponseCode(404)
            return b"not found"
        request.setResponseCode(f.status)
        if f.location is not None:
            request.setHeader(b"location", f.location)
        for k, v in f.headers.items():
            request.setHeader(k, v)
        if f.etag:
            request.setHeader(b"etag", f.etag)
            if request.getHeader(b"if-none-match") == f.etag:
                request.setResponseCode(304)
                return b""
        if f.last_modified:
            request.setHeader(b"last-modified", f.last_modified)
            if request.getHeader(b"if-modified-since") == f.last_modified and not f.etag:
                request.setResponseCode(304)
                return b""
        request.setHeader(b"content-length", str(len(f.body)).encode())
        if request.method == b"HEAD":
            return b""
        if f.hold:
            self._held.append((request, f))
            if f.partial:
                request.write(f.body[: f.partial])
            return NOT_DONE_YET
        return f.body

    def release(self) -> None:
        """Send the bodies of held responses."""
        held, self._held = self._held, []
        for request, f in held:
            if request._disconnected:  # the proxy gave up on it
                continue
            request.write(f.body[f.partial :])
            request.finish()


class Recorder(Observer):
    """Keeps every report, for tests to read."""

    def __init__(self) -> None:
        self.requests: list[RequestRecord] = []
        self.fetches: list[tuple[Route, Fetch]] = []

    def request_done(self, record: RequestRecord) -> None:
        self.requests.append(record)

    def fetch_settled(self, route: Route, fetch: Fetch) -> None:
        self.fetches.append((route, fetch))


class MemoryProxy:
    """The proxy with a fake clock, synchronous disk work and a :class:`FakeUpstream`.

    Upstream URLs of routes must use the host ``upstream.test``.
    """

    def __init__(self, config: dict[str, Any] | None = None, cache_dir: str | None = None) -> None:
        data = dict(config or {})
        data.setdefault("cache", {})
        data["cache"].setdefault("dir", cache_dir or tempfile.mkdtemp(prefix="pkgproxy-test-"))
        self.config: Config = config_from_dict(data)
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.upstream = FakeUpstream()
        self.pool = DiskPool(None)
        self.store = CacheStore(
            self.config.cache.dir, self.config.cache.max_size, self.pool, self.clock
        )
        self.store.startService()
        self.inflight = InFlight()
        self.upstream_agent = RequestTraversalAgent(self.upstream)
        self.client = UpstreamClient(
            self.upstream_agent,
            self.clock,
            self.config.upstream,
            self.config.upstream_credentials(),
            self.config.enabled_routes(),
        )
        self.observed = Recorder()
        self.facts = Facts()
        self.learner = Learner(self.facts, self.store, self.pool, self.config.routes)
        self.learner.relearn()
        self.root = ProxyResource(
            self.config,
            self.store,
            self.inflight,
            self.client,
            self.pool,
            self.clock,
            self.config.upstream.idle_timeout,
            self.learner,
            observer=self.observed,
            revalidate_window=self.config.cache.revalidate_window,
        )
        self.stub = StubTreq(self.root)

    def get(
        self, path: str, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> tuple[Any, bytes]:
        """One request through the proxy: ``(response, body)``; raises on a failed one."""
        return self.start(path, headers, method)()

    def start(
        self, path: str, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> Callable[[], tuple[Any, bytes]]:
        """Begin a request; the returned function completes it as :meth:`get` does."""
        results: list[Any] = []
        failures: list[Any] = []
        d = self.stub.request(method, "http://proxy.test" + path, headers=headers)

        def body(resp: Any) -> Any:
            results.append(resp)
            return self.stub.content(resp)

        d.addCallback(body).addCallbacks(results.append, failures.append)
        self.flush()

        def finish() -> tuple[Any, bytes]:
            self.flush()
            if failures:
                failures[0].raiseException()
            if len(results) != 2:
                raise AssertionError("request did not complete")
            return results[0], results[1]

        return finish

    def raw(self, data: bytes) -> bytes:
        """Feed raw request bytes to one server connection; return what it wrote.

        For what a client library hides: HEAD's Content-Length, pipelining order.
        """
        site = Site(self.root, reactor=self.clock)
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(data)
        self.flush()
        out: bytes = transport.value()
        channel.connectionLost(Failure(ConnectionDone()))
        return out

    def flush(self) -> None:
        """Deliver everything pending on both sides of the proxy."""
        for _ in range(20):
            self.upstream_agent.flush()
            self.stub.flush()

    def close(self) -> None:
        """Write pending index updates and close the index."""
        self.store.stopService()
