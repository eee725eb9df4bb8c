"""Upstream connections are kept alive and reused, over TLS as over plain http.

A cold install asks an upstream for a hundred files in a row: one TLS handshake per
file would cost more than the files. These tests count the TCP connections a local
upstream accepted.
"""

from __future__ import annotations

import time

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore

from tests.integration.harness import (
    IntegrationTestCase,
    UpstreamConnection,
    UpstreamRequest,
    response_head,
    static,
)
from tests.support.procs import file_tree
from tests.support.stallrelay import StallingRelay
from tests.support.tlsserver import make_tls_files, start_tls_server

FILES = 200
LIMIT = 4


class TlsReuseTests(IntegrationTestCase):
    timeout = 120

    async def test_misses_over_tls_reuse_at_most_the_per_host_limit(self) -> None:
        """200 misses one after another, then 200 more 16 at a time, from an https
        upstream: at most ``max_connections_per_host`` TCP connections were accepted."""
        root = file_tree(self, {f"f/{n}.bin": b"%d" % n * 100 for n in range(2 * FILES)})
        tls = make_tls_files(self.mktemp())
        server = start_tls_server(self, root, tls, keepalive=True)
        proxy = await self.start_proxy(
            {
                "upstream": {"ca_bundle": tls.ca_cert, "max_connections_per_host": LIMIT},
                "routes": {
                    "files": {
                        "family": "generic",
                        "immutable": True,
                        "upstream": server.url("/f/"),
                    }
                },
            }
        )
        client = self.client()
        for n in range(FILES):
            result = await client.get(proxy.url(f"/files/{n}.bin"))
            self.assertEqual((result.status, result.body), (200, b"%d" % n * 100))
        self.assertEqual(server.connections(), 1)
        gate = DeferredSemaphore(16)

        async def one(n: int) -> None:
            result = await client.get(proxy.url(f"/files/{n}.bin"))
            self.assertEqual((result.status, result.body), (200, b"%d" % n * 100))

        results = await DeferredList(
            [gate.run(lambda n=n: one(n)) for n in range(FILES, 2 * FILES)],
            fireOnOneErrback=True,
            consumeErrors=True,
        )
        self.assertTrue(all(ok for ok, _ in results))
        self.assertLessEqual(server.connections(), LIMIT)


class RetryTests(IntegrationTestCase):
    async def test_kept_connection_closed_by_upstream_is_retried_once(self) -> None:
        """The upstream drops a kept connection when the next request arrives on it,
        without answering: the GET is sent again on a new connection and succeeds."""
        up, proxy = await self.files_setup()
        answered: set[UpstreamConnection] = set()

        def once_per_connection(request: UpstreamRequest, conn: UpstreamConnection) -> None:
            if conn in answered:
                conn.abort()
                return
            answered.add(conn)
            body = request.path
            conn.write(response_head(200, [(b"content-length", b"%d" % len(body))]) + body)
            conn.done()

        up.handlers[b"/a"] = up.handlers[b"/b"] = once_per_connection
        up.handlers[b"/c"] = static(b"c")
        client = self.client()
        for path in (b"/a", b"/b"):
            result = await client.get(proxy.url("/files" + path.decode()))
            self.assertEqual((result.status, result.body), (200, path))
        self.assertEqual((up.count(b"/a"), up.count(b"/b")), (1, 2))


class HedgeTests(IntegrationTestCase):
    timeout = 120

    async def _burst(self, stall: float) -> tuple[float, float, StallingRelay]:
        """100 misses, 16 at a time, from an https upstream reached through a relay that
        stalls every fifth new connection by ``stall`` seconds: ``(total seconds,
        slowest request's seconds, relay)``."""
        root = file_tree(self, {f"f/{n}.bin": b"%d" % n * 200 for n in range(100)})
        tls = make_tls_files(self.mktemp())
        server = start_tls_server(self, root, tls, keepalive=True)
        relay = StallingRelay(every=5, stall=stall)
        port = relay.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(relay.stop()))
        proxy = await self.start_proxy(
            {
                "upstream": {"ca_bundle": tls.ca_cert, "proxy": f"http://127.0.0.1:{port}"},
                "routes": {
                    "files": {"family": "generic", "immutable": True, "upstream": server.url("/f/")}
                },
            }
        )
        client = self.client()
        gate = DeferredSemaphore(16)
        slowest = 0.0

        async def one(n: int) -> None:
            nonlocal slowest
            started = time.monotonic()
            result = await client.get(proxy.url(f"/files/{n}.bin"))
            slowest = max(slowest, time.monotonic() - started)
            self.assertEqual((result.status, result.body), (200, b"%d" % n * 200))

        started = time.monotonic()
        await DeferredList(
            [gate.run(lambda n=n: Deferred.fromCoroutine(one(n))) for n in range(100)],
            fireOnOneErrback=True,
            consumeErrors=True,
        )
        return time.monotonic() - started, slowest, relay

    async def test_stalled_connects_do_not_hold_requests(self) -> None:
        """With every fifth new connection stalled 5 s, no request waits for a stalled
        connect and the burst takes about as long as without stalls."""
        baseline, _, _ = await self._burst(stall=0.0)
        total, slowest, relay = await self._burst(stall=5.0)
        self.assertGreater(relay.stalled, 0)
        self.assertLess(slowest, 4.0, f"a request waited {slowest:.1f}s")
        self.assertLess(total, 1.3 * baseline + 1.0, f"{total:.1f}s against {baseline:.1f}s")
