"""Many clients, one upstream fetch: coalescing, streaming while downloading, disconnects."""

from __future__ import annotations

from twisted.internet.defer import DeferredList, gatherResults

from tests.integration.harness import (
    IntegrationTestCase,
    Result,
    SlowBody,
    bounded,
    pattern,
    sha256,
    wait_until,
)

BIG_SIZE = 32 * 1024 * 1024
_big: bytes | None = None


def big_file() -> bytes:
    """The stampede's 32 MiB file, built once per run."""
    global _big
    if _big is None:
        _big = pattern(BIG_SIZE, b"stampede")
    return _big


class StampedeTests(IntegrationTestCase):
    """Twenty clients ask for one uncached 32 MiB file that takes seconds to download."""

    async def test_twenty_clients_one_upstream_fetch(self) -> None:
        """Twenty concurrent GETs of one uncached file make exactly one upstream request.

        Every client receives the exact file; all of them get their first byte while the
        upstream is still sending (they stream from the download, they do not wait for
        it); one response is a MISS and nineteen are COALESCED; a later request is a HIT
        and goes nowhere near the upstream.
        """
        body = big_file()
        want = sha256(body)
        upstream, proxy = await self.files_setup()
        # 128 pieces of 256 KiB, 20 ms apart: about 2.6 s upstream.
        slow = SlowBody(body, 256 * 1024, 0.02)
        upstream.handlers[b"/big.bin"] = slow
        client = self.client()
        url = proxy.url("/files/big.bin")

        results: list[Result] = await bounded(
            gatherResults([client.get(url, keep_body=False, timeout=35) for _ in range(20)]),
            40,
        )

        self.assertEqual(upstream.count(b"/big.bin"), 1)
        self.assertIsNotNone(slow.finished_at)
        for r in results:
            self.assertEqual(r.status, 200)
            self.assertIsNone(r.error)
            self.assertEqual(r.announced, BIG_SIZE)
            self.assertEqual(r.received, BIG_SIZE)
            self.assertEqual(r.digest, want)
        self.assertEqual(sorted(r.x_cache or b"" for r in results), [b"COALESCED"] * 19 + [b"MISS"])
        last_first_byte = max(r.first_byte_at or float("inf") for r in results)
        assert slow.finished_at is not None
        self.assertLess(
            last_first_byte,
            slow.finished_at,
            "a client got its first byte only after the upstream had sent everything",
        )

        await proxy.settled()
        self.assertTrue(proxy.stored("files:big.bin"))
        after = await client.get(url, keep_body=False)
        self.assertEqual(after.status, 200)
        self.assertEqual(after.x_cache, b"HIT")
        self.assertEqual(after.digest, want)
        self.assertEqual(upstream.count(b"/big.bin"), 1)


class DisconnectTests(IntegrationTestCase):
    """A client that goes away does not take the download with it."""

    async def test_disconnecting_client_does_not_stop_the_fetch(self) -> None:
        """The client that started a fetch hangs up midway; the others get the whole file.

        The fetch goes on, the two coalesced clients receive the exact file, the file is
        committed, and the next request is a HIT without a second upstream request.
        """
        body = pattern(8 * 1024 * 1024, b"disconn")
        upstream, proxy = await self.files_setup()
        slow = SlowBody(body, 128 * 1024, 0.02)  # 64 pieces: about 1.3 s
        upstream.handlers[b"/mid.bin"] = slow
        quitter = await self.raw_client(proxy)
        quitter.send(b"GET /files/mid.bin HTTP/1.1\r\nHost: proxy\r\n\r\n")
        await wait_until(lambda: upstream.count(b"/mid.bin") == 1, 5, "the upstream request")

        client = self.client()
        url = proxy.url("/files/mid.bin")
        others = [client.get(url, keep_body=False), client.get(url, keep_body=False)]
        await wait_until(lambda: len(quitter.received) > 1024 * 1024, 10, "1 MiB at the quitter")
        self.assertIn(b"\r\nx-cache: miss\r\n", bytes(quitter.received[:1024]).lower())
        quitter.abort()
        self.assertIsNone(slow.finished_at, "the quitter should leave before the end")

        results = await bounded(DeferredList(others, fireOnOneErrback=True), 20)
        for _ok, r in results:
            self.assertIsNone(r.error)
            self.assertEqual(r.x_cache, b"COALESCED")
            self.assertEqual(r.digest, sha256(body))
        await proxy.settled()
        self.assertTrue(proxy.stored("files:mid.bin"))
        after = await client.get(url)
        self.assertEqual(after.x_cache, b"HIT")
        self.assertEqual(after.body, body)
        self.assertEqual(upstream.count(b"/mid.bin"), 1)

    async def test_sole_client_disconnecting_still_commits(self) -> None:
        """With its only client gone midway, the download still completes and is cached."""
        body = pattern(4 * 1024 * 1024, b"alone")
        upstream, proxy = await self.files_setup()
        slow = SlowBody(body, 128 * 1024, 0.02)
        upstream.handlers[b"/alone.bin"] = slow
        quitter = await self.raw_client(proxy)
        quitter.send(b"GET /files/alone.bin HTTP/1.1\r\nHost: proxy\r\n\r\n")
        await wait_until(lambda: len(quitter.received) > 256 * 1024, 10, "256 KiB")
        quitter.abort()
        self.assertIsNone(slow.finished_at, "the client should leave before the end")
        await wait_until(lambda: slow.finished_at is not None, 10, "the upstream to finish")
        await proxy.settled()
        self.assertTrue(proxy.stored("files:alone.bin"))
        after = await self.client().get(proxy.url("/files/alone.bin"))
        self.assertEqual(after.x_cache, b"HIT")
        self.assertEqual(after.body, body)
        self.assertEqual(upstream.count(b"/alone.bin"), 1)
