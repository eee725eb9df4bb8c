"""Stale-while-revalidate through real sockets: the stale answer does not wait for upstream."""

from __future__ import annotations

import time

from tests.integration.harness import (
    IntegrationTestCase,
    SlowBody,
    pattern,
    static,
    wait_until,
)

OLD = pattern(4000, b"old")
NEW = pattern(4000, b"new")
PATH = b"/debian/dists/stable/InRelease"


class StaleWhileRevalidateTests(IntegrationTestCase):
    """A Debian route with ``index_ttl = "1s"`` and ``stale_while_revalidate = "60s"``."""

    async def test_stale_answer_before_slow_upstream_finishes(self) -> None:
        """An expired index is answered STALE at once while a slow new version arrives.

        The upstream sends the new InRelease in 10 pieces 0.2 s apart (2 s in all). The
        client's request, made after the TTL, is complete with the old body, X-Cache
        STALE and a Warning while that transfer is still running; the background fetch
        then commits the new version with no client attached, and the next request is a
        HIT with it. The upstream sees two requests in all.
        """
        upstream = await self.start_upstream()
        upstream.handlers[PATH] = static(OLD, [(b"etag", b'"old"')])
        proxy = await self.start_proxy(
            {
                "routes": {
                    "debian": {
                        "upstream": upstream.url("/debian/"),
                        "index_ttl": "1s",
                        "stale_while_revalidate": "60s",
                    }
                }
            }
        )
        client = self.client()
        url = proxy.url(PATH.decode())
        first = await client.get(url)
        self.assertEqual((first.status, first.x_cache, first.body), (200, b"MISS", OLD))
        await proxy.settled()
        await wait_until(lambda: proxy.stored("debian:dists/stable/InRelease"), 5.0, "a commit")

        slow = SlowBody(NEW, chunk=400, delay=0.2, headers=[(b"etag", b'"new"')])
        upstream.handlers[PATH] = slow
        proxy.clock.advance(1.2)  # past the 1 s TTL
        stale = await client.get(url, timeout=5.0)
        answered_at = time.monotonic()
        self.assertEqual((stale.status, stale.x_cache, stale.error), (200, b"STALE", None))
        self.assertEqual(stale.body, OLD)
        self.assertIn(b"110", stale.header(b"warning") or b"")
        self.assertIsNone(slow.finished_at, "the stale answer waited for the upstream")

        await wait_until(lambda: slow.finished_at is not None, 10.0, "the slow upstream")
        assert slow.finished_at is not None
        self.assertLess(answered_at, slow.finished_at)
        await proxy.settled()
        fresh = await client.get(url)
        self.assertEqual((fresh.status, fresh.x_cache, fresh.body), (200, b"HIT", NEW))
        self.assertEqual(upstream.count(PATH), 2)
        self.assertEqual(upstream.requests[-1].headers.get(b"if-none-match"), b'"old"')
