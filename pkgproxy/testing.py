"""Test doubles shipped with the package: a scriptable upstream and an in-memory proxy.

The in-memory proxy is the server as :func:`pkgproxy.tap.build_service` wires it (the
:class:`~pkgproxy.web.site.ProxySite` with its hit path and request limits, the resource,
store and fetch code, the :class:`~pkgproxy.upstream.client.UpstreamService` with its
``Agent`` and connection pool) on a ``MemoryReactorClock``, a synchronous disk pool, and
connections completed in memory by :class:`MemoryNetwork` (``twisted.test.iosim``): a
whole request/response cycle runs deterministically with no sockets and no threads.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import treq
from treq.client import HTTPClient
from treq.testing import _SynchronousProducer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from pkgproxy.cache.store import CacheStore
from pkgproxy.config import Config, Route, config_from_dict
from pkgproxy.diskpool import DiskPool
from pkgproxy.families import AUTH_SCOPES, Facts
from pkgproxy.fetch.fetch import Fetch
from pkgproxy.fetch.registry import InFlight
from pkgproxy.learning import Learner
from pkgproxy.observe import Observer, RequestRecord
from pkgproxy.tlsca import CertificateAuthority
from pkgproxy.upstream.client import UpstreamService, route_ca_files
from pkgproxy.web.root import ProxyResource
from pkgproxy.web.site import ProxySite


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


@dataclass
class _Listener:
    factory: Any
    address: IPv4Address


class MemoryNetwork:
    """Connections made with ``connectTCP`` on memory reactors, completed in memory.

    Each reactor's ``connectTCP`` only records a connection attempt (``MemoryReactor``);
    :meth:`flush` hands each one to the factory listening on its port, over a pair of
    ``iosim.FakeTransport`` joined by an ``IOPump``, and pumps every open connection until
    nothing moves. An attempt to a port nobody listens on is refused.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.reactors: list[tuple[MemoryReactor, dict[int, _Listener]]] = []
        self.pumps: list[IOPump] = []
        #: Every connection made: the connecting reactor and the port it reached.
        self.made: list[tuple[MemoryReactor, int]] = []
        self._client_port = 40000

    def join(self, reactor: MemoryReactor, listeners: dict[int, Any]) -> None:
        """Complete ``reactor``'s connections: to ``listeners[port]``, a server factory."""
        address = {p: IPv4Address("TCP", "127.0.0.1", p) for p in listeners}
        self.reactors.append((reactor, {p: _Listener(f, address[p]) for p, f in listeners.items()}))

    def _connect_pending(self) -> bool:
        made = False
        for reactor, listeners in self.reactors:
            while reactor.tcpClients:
                _host, port, factory, _timeout, _bind = reactor.tcpClients.pop(0)
                connector = reactor.connectors.pop(0)
                listener = listeners.get(port)
                if listener is None:
                    factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
                    continue
                self._client_port += 1
                here = IPv4Address("TCP", "127.0.0.1", self._client_port)
                server = listener.factory.buildProtocol(here)
                client = factory.buildProtocol(listener.address)
                self._clock_tls(client)
                self.made.append((reactor, port))
                self.pumps.append(
                    connect(
                        server,
                        FakeTransport(server, True, listener.address, here),
                        client,
                        FakeTransport(client, False, here, listener.address),
                        greet=False,
                        clock=self.clock,
                    )
                )
                made = True
        return made

    def _clock_tls(self, protocol: Any) -> None:
        """Give a client's TLS layer this network's clock.

        ``wrapClientTLS`` builds its TLS factory with no clock, so the TLS layer would
        gather small writes for a turn of the global reactor, which never turns here.
        """
        while protocol is not None:
            aggregator = getattr(protocol, "_aggregator", None)
            if aggregator is not None and hasattr(aggregator, "_clock"):
                aggregator._clock = self.clock
            protocol = getattr(protocol, "_wrappedProtocol", None) or getattr(
                protocol, "wrappedProtocol", None
            )

    def flush(self) -> None:
        """Connect what is waiting and move bytes until nothing moves."""
        for _ in range(1000):
            moved = self._connect_pending()
            for pump in self.pumps:
                moved = pump.pump() or moved
            self.pumps = [
                p for p in self.pumps if not (p.clientIO.disconnected and p.serverIO.disconnected)
            ]
            if not moved:
                return
        raise AssertionError("the memory network did not settle")


class MemoryProxy:
    """The proxy in memory, on a fake clock, in front of a :class:`FakeUpstream`.

    Upstream URLs of routes must use the host ``upstream.test``, served by ``upstream`` (a
    :class:`FakeUpstream` or a subclass) on port 80, and on 443 for ``https://`` (a test
    CA, made on demand, signs its certificate, and the upstream client trusts that CA for
    that host). Requests reach the proxy through a real ``Agent`` (treq's client) on a
    persistent pool of its own, so a second request may take the same connection and
    the hit path. Not covered in memory: what needs a real socket (``tcpwrite``'s direct
    sends, ``sendfile``); the integration tests cover those.
    """

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        upstream: FakeUpstream | None = None,
    ) -> None:
        data = dict(config or {})
        data.setdefault("cache", {})
        data["cache"].setdefault("dir", cache_dir or tempfile.mkdtemp(prefix="pkgproxy-test-"))
        self.config: Config = config_from_dict(data)
        self.clock = MemoryReactorClock()
        self.clock.advance(1_800_000_000)
        self.network = MemoryNetwork(self.clock)
        self.upstream = upstream if upstream is not None else FakeUpstream()
        upstreams: dict[int, Any] = {80: Site(self.upstream, reactor=self.clock)}
        ca_files = route_ca_files(self.config.enabled_routes())
        if any(r.upstream.startswith("https://") for r in self.config.enabled_routes()):
            ca_file, context = _upstream_tls(self.config.cache.dir)
            ca_files[("upstream.test", 443)] = (*ca_files.get(("upstream.test", 443), ()), ca_file)
            upstreams[443] = TLSMemoryBIOFactory(context, False, upstreams[80], self.clock)
        self.network.join(self.clock, upstreams)
        self.pool = DiskPool(None)
        self.store = CacheStore(
            self.config.cache.dir, self.config.cache.max_size, self.pool, self.clock
        )
        self.store.startService()
        self.inflight = InFlight()
        self.upstream_service = UpstreamService(
            self.clock,
            self.config.upstream,
            self.config.upstream_credentials(),
            ca_files=ca_files,
            routes=self.config.enabled_routes(),
            node_name=self.config.node_name,
            auth_scopes=AUTH_SCOPES,
        )
        self.upstream_service.startService()
        self.client = self.upstream_service.client
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
        self.site = ProxySite(self.root, reactor=self.clock)
        self.site.displayTracebacks = False
        self.site.timeOut = self.config.limits.client_idle_timeout
        self.site.max_header_bytes = self.config.limits.max_header_bytes
        self.site.max_headers = self.config.limits.max_headers
        self.site.request_timeout = self.config.limits.request_head_timeout
        self.site.hit_path = self.root.hit_path
        # The clients' side: a reactor of their own (their pool's timers never fire).
        self.client_reactor = MemoryReactorClock()
        self.network.join(self.client_reactor, {80: self.site})
        self.client_pool = HTTPConnectionPool(self.client_reactor, persistent=True)
        self.stub = _Client(
            Agent(self.client_reactor, pool=self.client_pool),
            data_to_body_producer=_SynchronousProducer,
        )

    @property
    def root(self) -> ProxyResource:
        """The resource the site serves; assign another (with admin pages) to mount it."""
        return self._root

    @root.setter
    def root(self, root: ProxyResource) -> None:
        self._root = root
        site: ProxySite | None = getattr(self, "site", None)
        if site is not None:
            site.resource = root
            site.hit_path = root.hit_path

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

    def raw(self, data: bytes, site: Site | None = None) -> bytes:
        """Feed raw request bytes to one server connection; return what it wrote.

        For what a client library hides: HEAD's Content-Length, pipelining order.
        ``site``: another site than the proxy's (a plain ``Site`` over :attr:`root`
        tests the resource's own guards for what a different front lets through).
        """
        channel = (site or self.site).buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(data)
        self.flush()
        out: bytes = transport.value()
        channel.connectionLost(Failure(ConnectionDone()))
        return out

    def flush(self) -> None:
        """Deliver everything pending on both sides of the proxy."""
        self.network.flush()

    def close(self) -> None:
        """Close the kept connections, write pending index updates and close the index."""
        self.client_pool.closeCachedConnections()
        self.upstream_service.stopService()
        self.network.flush()
        self.store.stopService()


class _Client(HTTPClient):  # type: ignore[misc]
    """treq's client, with ``content`` as ``StubTreq`` has it."""

    def content(self, response: Any) -> Deferred[bytes]:
        body: Deferred[bytes] = treq.content(response)
        return body


def _upstream_tls(directory: str) -> tuple[str, Any]:
    """A test CA's certificate file in ``directory``, and a server TLS context whose
    certificate it signed for ``upstream.test``."""
    ca = CertificateAuthority(
        os.path.join(directory, "upstream-ca.pem"), os.path.join(directory, "upstream-ca.key")
    )
    cert_pem, key_pem = ca.issue(["upstream.test"])
    options = PrivateCertificate.loadPEM(key_pem + cert_pem).options()
    return os.path.join(directory, "upstream-ca.pem"), options
