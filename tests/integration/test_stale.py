"""Mutable indexes: served stale while the upstream is down, revalidated when it is back."""

from __future__ import annotations

from typing import Any

from tests.integration.harness import (
    IntegrationTestCase,
    UpstreamConnection,
    UpstreamRequest,
    pattern,
    response_head,
    static,
)
from tests.support.pgp import armour, sig_v4

IN_RELEASE = pattern(5000, b"inrel")
ETAG = b'"inrelease-v1"'
LAST_MODIFIED = b"Sat, 01 Nov 2025 12:00:00 GMT"


def in_release(request: UpstreamRequest, conn: UpstreamConnection) -> None:
    """An InRelease with validators, honouring If-None-Match and If-Modified-Since."""
    validators = [(b"etag", ETAG), (b"last-modified", LAST_MODIFIED)]
    inm = request.headers.get(b"if-none-match")
    ims = request.headers.get(b"if-modified-since")
    if (inm is not None and ETAG in inm.split(b", ")) or (inm is None and ims == LAST_MODIFIED):
        conn.write(response_head(304, validators))
    else:
        head = response_head(200, [(b"content-length", b"%d" % len(IN_RELEASE)), *validators])
        conn.write(head + IN_RELEASE)
    conn.done()


class StaleTests(IntegrationTestCase):
    """A Debian route with ``index_ttl = "1s"``."""

    async def test_stale_when_down_then_revalidated(self) -> None:
        """An expired index is served STALE while the upstream is down, REVALIDATED after.

        First fetch: MISS. Upstream stops listening, TTL passes: 200, X-Cache STALE, a
        Warning, the same body. Upstream back and answering 304 to the conditional
        request pkgproxy sends (with the stored validators): 200, X-Cache REVALIDATED,
        the same body, and no second full download.
        """
        upstream = await self.start_upstream()
        upstream.handlers[b"/debian/dists/stable/InRelease"] = in_release
        proxy = await self.start_proxy(
            {"routes": {"debian": {"upstream": upstream.url("/debian/"), "index_ttl": "1s"}}}
        )
        client = self.client()
        url = proxy.url("/debian/dists/stable/InRelease")

        first = await client.get(url)
        self.assertEqual((first.status, first.x_cache, first.error), (200, b"MISS", None))
        self.assertEqual(first.body, IN_RELEASE)
        await proxy.settled()
        self.assertTrue(proxy.stored("debian:dists/stable/InRelease"))

        await upstream.stop()
        proxy.clock.advance(1.2)
        stale = await client.get(url)
        self.assertEqual((stale.status, stale.x_cache, stale.error), (200, b"STALE", None))
        self.assertEqual(stale.body, IN_RELEASE)
        self.assertIsNotNone(stale.header(b"warning"))
        self.assertEqual(len(upstream.requests), 1)

        upstream.listen()
        again = await client.get(url)
        self.assertEqual((again.status, again.error), (200, None))
        self.assertEqual(again.x_cache, b"REVALIDATED")
        self.assertEqual(again.body, IN_RELEASE)
        self.assertEqual(len(upstream.requests), 2)
        conditional = upstream.requests[-1].headers
        self.assertEqual(conditional.get(b"if-none-match"), ETAG)
        self.assertEqual(conditional.get(b"if-modified-since"), LAST_MODIFIED)

    async def test_stale_when_upstream_answers_500(self) -> None:
        """An expired index whose upstream answers 500 is served STALE, not as the 500."""
        upstream = await self.start_upstream()
        upstream.handlers[b"/debian/dists/stable/InRelease"] = in_release
        proxy = await self.start_proxy(
            {"routes": {"debian": {"upstream": upstream.url("/debian/"), "index_ttl": "1s"}}}
        )
        client = self.client()
        url = proxy.url("/debian/dists/stable/InRelease")
        first = await client.get(url)
        self.assertEqual(first.x_cache, b"MISS")
        await proxy.settled()

        def broken(request: UpstreamRequest, conn: UpstreamConnection) -> None:
            body = b"internal error\n"
            conn.write(response_head(500, [(b"content-length", b"%d" % len(body))]) + body)
            conn.done()

        upstream.handlers[b"/debian/dists/stable/InRelease"] = broken
        proxy.clock.advance(1.2)
        stale = await client.get(url)
        self.assertEqual((stale.status, stale.x_cache), (200, b"STALE"))
        self.assertEqual(stale.body, IN_RELEASE)
        self.assertEqual(len(upstream.requests), 2)


def _release(date: bytes, label: bytes) -> bytes:
    return b"Origin: Debian\nLabel: %s\nSuite: stable\nDate: %s\nSHA256:\n" % (label, date)


class LaggingMirrorTests(IntegrationTestCase):
    """Two mirrors behind one name, one of them a week behind."""

    async def _cached_then_lagging(self, path: str, newer: bytes, older: bytes) -> Any:
        """``path`` is fetched and cached as ``newer``; once it is due, the upstream
        answers ``older``: the client gets the newer copy back (REVALIDATED)."""
        upstream = await self.start_upstream()
        upstream.handlers[path.encode()] = static(newer, [(b"etag", b'"current"')])
        proxy = await self.start_proxy(
            {"routes": {"debian": {"upstream": upstream.url("/debian/"), "index_ttl": "1s"}}}
        )
        client = self.client()
        first = await client.get(proxy.url(path))
        self.assertEqual((first.x_cache, first.body), (b"MISS", newer))
        await proxy.settled()
        proxy.clock.advance(1.2)
        upstream.handlers[path.encode()] = static(older, [(b"etag", b'"lagging"')])
        kept = await client.get(proxy.url(path))
        self.assertEqual((kept.status, kept.x_cache, kept.body), (200, b"REVALIDATED", newer))
        await proxy.settled()
        return upstream, proxy, client

    async def test_older_inrelease_does_not_replace_the_cached_one(self) -> None:
        """The lagging mirror's InRelease is fetched whole, found older than the cached
        one, and dropped: the client gets the newer copy (REVALIDATED), which stays
        cached; a still newer one replaces it as usual."""
        newer = _release(b"Sat, 10 Feb 2024 09:24:50 UTC", b"current")
        older = _release(b"Sat, 03 Feb 2024 09:24:50 UTC", b"lagging")
        newest = _release(b"Sat, 17 Feb 2024 09:24:50 UTC", b"next")
        path = "/debian/dists/stable/InRelease"
        upstream, proxy, client = await self._cached_then_lagging(path, newer, older)
        again = await client.get(proxy.url(path))
        self.assertEqual((again.x_cache, again.body), (b"HIT", newer))

        proxy.clock.advance(1.2)
        upstream.handlers[path.encode()] = static(newest, [(b"etag", b'"next"')])
        moved = await client.get(proxy.url(path))
        self.assertEqual((moved.x_cache, moved.body), (b"MISS", newest))
        self.assertEqual(len(upstream.requests), 3)

    async def test_older_release_signature_does_not_replace_the_cached_one(self) -> None:
        """For a repository without InRelease: the lagging mirror's Release.gpg (made
        before the cached one) is dropped too, so the kept Release keeps its signature."""
        newer, older = armour(sig_v4(1_707_557_090)), armour(sig_v4(1_706_952_290))
        await self._cached_then_lagging("/debian/dists/stable/Release.gpg", newer, older)
