"""Hostile upstream answers through the real server: redirects, lengths, heads.

Each test drives pkgproxy over real sockets against fake upstreams on 127.0.0.1.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor, ssl
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.internet.protocol import Factory, Protocol
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from zope.interface import implementer

from pkgproxy.upstream.client import MAX_RESPONSE_HEAD
from tests.integration.harness import (
    IntegrationTestCase,
    ProxyUnderTest,
    RawResponse,
    Result,
    UpstreamConnection,
    UpstreamRequest,
    parse_responses,
    raw_get,
    response_head,
    static,
)
from tests.support.tlsserver import make_tls_files


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


class _Names:
    """A name resolver for the test's own host names, all on 127.0.0.1 (others go to
    the resolver it is put over)."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.asked: list[str] = []

    def over(self, fallback: Any) -> Any:
        names = self

        @implementer(IHostnameResolver)
        class Resolver:
            def resolveHostName(  # type: ignore[no-untyped-def]
                self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"
            ):
                if hostName not in names.names:
                    return fallback.resolveHostName(
                        receiver, hostName, portNumber, addressTypes, transportSemantics
                    )
                names.asked.append(hostName)
                resolution = _Resolution(hostName)
                receiver.resolutionBegan(resolution)
                receiver.addressResolved(IPv4Address("TCP", "127.0.0.1", portNumber))
                receiver.resolutionComplete()
                return resolution

        return Resolver()


def redirect(location: bytes, status: int = 302):  # type: ignore[no-untyped-def]
    return static(b"", [(b"location", location)], status=status)


class RedirectTests(IntegrationTestCase):
    async def _setup(self, redirect_hosts: list[str] | None = None):  # type: ignore[no-untyped-def]
        up = await self.start_upstream()
        other = await self.start_upstream()
        route = {"family": "generic", "immutable": True, "upstream": up.url("/")}
        if redirect_hosts is not None:
            route["redirect_hosts"] = redirect_hosts
        proxy = await self.start_proxy({"routes": {"files": route}})
        return up, other, proxy

    async def test_redirect_to_unnamed_local_host_is_502_and_not_stored(self) -> None:
        """A 302 to another server on loopback that no route names is not followed:
        502 naming the host, nothing stored, the other server never asked."""
        up, other, proxy = await self._setup()
        other.handlers[b"/secret"] = static(b"secret")
        up.handlers[b"/x"] = redirect(other.url("/secret").encode())
        client = self.client()
        for _ in range(2):
            result = await client.get(proxy.url("/files/x"))
            self.assertEqual(result.status, 502)
            self.assertIn(b"127.0.0.1", result.body or b"")
        self.assertEqual(other.count(b"/secret"), 0)
        self.assertEqual(up.count(b"/x"), 2)  # nothing was stored

    async def test_redirect_to_pkgproxy_admin_pages_refused(self) -> None:
        """A redirect to pkgproxy's own /_pkgproxy/ pages is refused, even on the
        upstream's own origin."""
        up, _, proxy = await self._setup()
        up.handlers[b"/x"] = redirect(proxy.url("/_pkgproxy/status").encode())
        up.handlers[b"/y"] = redirect(b"/_pkgproxy/admin/offline?enabled=true")
        client = self.client()
        for path in ("/files/x", "/files/y"):
            result = await client.get(proxy.url(path))
            self.assertEqual(result.status, 502, path)

    async def test_redirect_within_origin_and_to_listed_host_followed(self) -> None:
        """Same origin is followed; another host only when redirect_hosts names it."""
        up, other, proxy = await self._setup(redirect_hosts=["localhost"])
        up.handlers[b"/a"] = redirect(b"/real-a")
        up.handlers[b"/real-a"] = static(b"A" * 100)
        other.handlers[b"/blob"] = static(b"B" * 100)
        up.handlers[b"/b"] = redirect(f"http://localhost:{other.port_number}/blob".encode())
        client = self.client()
        result = await client.get(proxy.url("/files/a"))
        self.assertEqual((result.status, result.body), (200, b"A" * 100))
        result = await client.get(proxy.url("/files/b"))
        self.assertEqual((result.status, result.body), (200, b"B" * 100))

    async def test_listed_host_resolving_to_loopback_is_not_connected(self) -> None:
        """A host that only a redirect names (listed in redirect_hosts) is connected to at
        its external addresses only: one whose name resolves to loopback, while the
        route's own upstream is not internal by its name, is refused (502, nothing
        asked there). The route's own host may resolve anywhere."""
        names = _Names({"origin.test", "cdn.test"})
        previous = reactor.installNameResolver(names.over(reactor.nameResolver))
        self.addCleanup(reactor.installNameResolver, previous)
        up = await self.start_upstream()
        other = await self.start_upstream()
        route = {
            "family": "generic",
            "immutable": True,
            "upstream": f"http://origin.test:{up.port_number}/",
            "redirect_hosts": ["cdn.test"],
        }
        proxy = await self.start_proxy({"routes": {"files": route}})
        other.handlers[b"/blob"] = static(b"B" * 100)
        up.handlers[b"/x"] = redirect(f"http://cdn.test:{other.port_number}/blob".encode())
        up.handlers[b"/y"] = redirect(b"/real-y")
        up.handlers[b"/real-y"] = static(b"Y" * 10)
        client = self.client()
        result = await client.get(proxy.url("/files/x"))
        self.assertEqual(result.status, 502, result.body)
        self.assertEqual(other.count(b"/blob"), 0)
        self.assertIn("cdn.test", names.asked)
        result = await client.get(proxy.url("/files/y"))
        self.assertEqual((result.status, result.body), (200, b"Y" * 10))

    async def test_refused_redirect_does_not_open_the_circuit(self) -> None:
        """Refused redirects are not upstream failures: after many, the origin still
        answers."""
        up, other, proxy = await self._setup()
        up.handlers[b"/x"] = redirect(other.url("/secret").encode())
        up.handlers[b"/ok"] = static(b"fine")
        client = self.client()
        for _ in range(8):
            self.assertEqual((await client.get(proxy.url("/files/x"))).status, 502)
        result = await client.get(proxy.url("/files/ok"))
        self.assertEqual((result.status, result.body), (200, b"fine"))


class AnswerTests(IntegrationTestCase):
    async def test_huge_response_head_is_refused(self) -> None:
        """A response head over 64 KiB (many short headers) fails the request with a
        502 instead of growing without bound."""
        up, proxy = await self.files_setup()

        def handle(request: UpstreamRequest, conn: UpstreamConnection) -> None:
            filler = [(b"x-filler-%d" % i, b"y" * 100) for i in range(MAX_RESPONSE_HEAD // 100)]
            conn.write(response_head(200, [(b"content-length", b"2"), *filler]) + b"ok")
            conn.done()

        up.handlers[b"/big-head"] = handle
        result = await self.client().get(proxy.url("/files/big-head"))
        self.assertEqual(result.status, 502)

    async def test_bytes_after_content_length_close_the_connection(self) -> None:
        """A body longer than its Content-Length: the announced bytes are the response,
        the connection is not used again (the extra bytes are not read as the next
        answer)."""
        up, proxy = await self.files_setup()

        def liar(request: UpstreamRequest, conn: UpstreamConnection) -> None:
            smuggled = response_head(200, [(b"content-length", b"4")]) + b"EVIL"
            conn.write(response_head(200, [(b"content-length", b"5")]) + b"hello" + smuggled)
            conn.done()

        up.handlers[b"/liar"] = liar
        up.handlers[b"/next"] = static(b"honest")
        client = self.client()
        result = await client.get(proxy.url("/files/liar"))
        self.assertEqual((result.status, result.body), (200, b"hello"))
        result = await client.get(proxy.url("/files/next"))
        self.assertEqual((result.status, result.body), (200, b"honest"))
        self.assertEqual(up.count(b"/next"), 1)

    async def test_close_delimited_body_cut_by_reset_fails(self) -> None:
        """A body with no length that ends in a reset is a failed transfer for the
        client (framed by the end of its connection, which ends in a reset too), and
        is not stored."""
        up, proxy = await self.files_setup()

        def reset(request: UpstreamRequest, conn: UpstreamConnection) -> None:
            conn.write(response_head(200, []) + b"partial" * 1000)
            conn.later(0.05, conn.abort)

        up.handlers[b"/cut"] = reset
        head, _, was_reset = await raw_get(proxy.port_number, b"/files/cut")
        self.assertIn(b"connection: close", head.lower())
        self.assertTrue(was_reset, "a clean close would say the body is whole")
        await proxy.settled()
        self.assertFalse(proxy.stored("files:cut"))


class _CloseDelimited(Protocol):
    """Answers any request with a body of unknown length, then closes: with TLS's
    close_notify (``clean``) or by closing the TCP connection under TLS."""

    clean = True

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 1000)
        if self.clean:
            self.transport.loseConnection()
        else:
            self.transport.transport.loseConnection()  # type: ignore[attr-defined]


class TlsTruncationTests(IntegrationTestCase):
    async def _serve(self, clean: bool) -> Result:
        tls = make_tls_files(self.mktemp())
        with open(tls.cert, "rb") as c, open(tls.key, "rb") as k:
            cert = ssl.PrivateCertificate.loadPEM(c.read() + k.read())
        factory = Factory.forProtocol(type("P", (_CloseDelimited,), {"clean": clean}))
        port = reactor.listenSSL(0, factory, cert.options(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        upstream = f"https://127.0.0.1:{port.getHost().port}/"
        proxy = await self.start_proxy(
            {
                "upstream": {"ca_bundle": tls.ca_cert},
                "routes": {"files": {"family": "generic", "upstream": upstream}},
            }
        )
        return await self.client().get(proxy.url("/files/doc"))

    async def test_close_notify_ends_a_body_of_unknown_length(self) -> None:
        """A TLS upstream that ends a body of unknown length with close_notify: the
        client gets the whole body."""
        result = await self._serve(clean=True)
        self.assertEqual((result.status, result.body, result.error), (200, b"x" * 1000, None))

    async def test_tls_close_without_close_notify_is_a_failed_transfer(self) -> None:
        """The same body cut by a TCP close without close_notify (a truncation attack's
        shape): the client never sees it complete (a failed transfer, or no answer at
        all when it failed before the answer started), and it is not stored."""
        try:
            result = await self._serve(clean=False)
        except (ResponseNeverReceived, ResponseFailed):
            return
        if result.status == 200:
            self.assertFailedTransfer(result)
        else:
            self.assertEqual(result.status, 502)


class HostileTargetTests(IntegrationTestCase):
    """Request targets twisted.web accepts but an upstream request line may not carry."""

    async def _raw_get(self, proxy: ProxyUnderTest, target: bytes) -> RawResponse:
        client = await self.raw_client(proxy)
        client.send(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await client.wait_closed()
        responses, _ = parse_responses(bytes(client.received))
        return responses[0]

    async def test_non_ascii_targets_do_not_wedge_the_upstream(self) -> None:
        """Sixteen targets with a byte over 0x7f (more than the per-host limit) are sent
        percent-encoded; a normal miss afterwards is answered at once."""
        up, proxy = await self.files_setup({"max_connections_per_host": 2})
        for n in range(16):
            up.handlers[b"/gen/x?%d%%80" % n] = static(b"enc")
            response = await self._raw_get(proxy, b"/files/gen/x?%d\x80" % n)
            self.assertEqual((response.status, response.body), (200, b"enc"))
        up.handlers[b"/ok"] = static(b"fine")
        result = await self.client().get(proxy.url("/files/ok"))
        self.assertEqual((result.status, result.body), (200, b"fine"))

    async def test_control_bytes_do_not_trip_the_breaker(self) -> None:
        """Ten targets with a DEL: each a 400 for that client, none sent upstream, and
        the upstream's circuit stays closed for everyone else."""
        up, proxy = await self.files_setup({"failure_threshold": 2})
        for n in range(10):
            response = await self._raw_get(proxy, b"/files/gen/x?%d\x7f" % n)
            self.assertEqual(response.status, 400)
        self.assertEqual(up.requests, [])
        up.handlers[b"/ok"] = static(b"fine")
        result = await self.client().get(proxy.url("/files/ok"))
        self.assertEqual((result.status, result.body), (200, b"fine"))
