"""Misbehaving upstreams: nothing broken is stored, and the client is not told otherwise.

Each test breaks one upstream response in one way, checks what the client saw, checks that
nothing was committed (no entry, no temp file left, the next request goes upstream again)
and, where it helps, that a good answer afterwards is fetched and cached normally.
"""

from __future__ import annotations

import errno
import hashlib
import time
from collections.abc import Callable
from typing import Any

from tests.integration.harness import (
    FakeUpstream,
    HTTPTestClient,
    IntegrationTestCase,
    ProxyUnderTest,
    SlowBody,
    UpstreamConnection,
    UpstreamRequest,
    pattern,
    raw_get,
    response_head,
    static,
    wait_until,
)

BY_HASH_DIR = "dists/stable/main/binary-amd64/by-hash/SHA256/"


class FaultTestCase(IntegrationTestCase):
    """Helpers shared by the fault tests.

    The upstream gets one connection slot (``max_connections_per_host = 1``): a fault
    path that forgot to give its slot back would make the refetch after it hang.
    """

    async def files_setup(
        self, upstream_config: dict[str, Any] | None = None
    ) -> tuple[FakeUpstream, ProxyUnderTest]:
        return await super().files_setup({"max_connections_per_host": 1, **(upstream_config or {})})

    async def assertNotStoredAndRefetched(
        self,
        upstream: FakeUpstream,
        proxy: ProxyUnderTest,
        client: HTTPTestClient,
        url: str,
        upstream_path: bytes,
        key: str,
        good_body: bytes,
    ) -> None:
        """Nothing is cached for ``key``; the next request goes upstream and is cached."""
        await proxy.settled()
        await proxy.no_temp_files()
        self.assertFalse(proxy.stored(key), f"{key} was stored")
        before = upstream.count(upstream_path)
        upstream.handlers[upstream_path] = static(good_body)
        again = await client.get(url)
        self.assertEqual(upstream.count(upstream_path), before + 1)
        self.assertEqual(again.status, 200)
        self.assertEqual(again.x_cache, b"MISS")
        self.assertIsNone(again.error)
        self.assertEqual(again.body, good_body)
        await proxy.settled()
        self.assertTrue(proxy.stored(key))
        hit = await client.get(url)
        self.assertEqual(hit.x_cache, b"HIT")
        self.assertEqual(hit.body, good_body)
        self.assertEqual(upstream.count(upstream_path), before + 1)


class TruncationTests(FaultTestCase):
    """Bodies that end before they should."""

    async def test_chunked_body_cut_short(self) -> None:
        """A chunked body whose connection closes mid-chunk is a failed transfer.

        pkgproxy does not know the length, so it streams what it has; the client must
        still see the response end without its final chunk, and nothing is stored.
        """
        body = pattern(600 * 1024, b"chunked")
        upstream, proxy = await self.files_setup()

        def cut(request: UpstreamRequest, conn: UpstreamConnection) -> None:
            conn.write(response_head(200, [(b"transfer-encoding", b"chunked")]))
            conn.write(b"%x\r\n" % len(body) + body[: len(body) // 2])
            conn.close()

        upstream.handlers[b"/cut.bin"] = cut
        client = self.client()
        url = proxy.url("/files/cut.bin")
        result = await client.get(url)
        self.assertEqual(result.status, 200)
        self.assertFailedTransfer(result)
        self.assertLessEqual(result.received, len(body) // 2)
        await self.assertNotStoredAndRefetched(
            upstream, proxy, client, url, b"/cut.bin", "files:cut.bin", body
        )

    async def test_content_length_larger_than_body(self) -> None:
        """An upstream that announces more than it sends, then closes: failed transfer.

        The client is given the announced length and must see the connection end
        before it is complete; nothing is stored.
        """
        body = pattern(1024 * 1024, b"short")
        upstream, proxy = await self.files_setup()

        def liar(request: UpstreamRequest, conn: UpstreamConnection) -> None:
            conn.write(response_head(200, [(b"content-length", b"%d" % len(body))]))
            conn.write(body[: len(body) - 1000])
            conn.close()

        upstream.handlers[b"/short.bin"] = liar
        client = self.client()
        url = proxy.url("/files/short.bin")
        result = await client.get(url)
        self.assertEqual(result.status, 200)
        self.assertEqual(result.announced, len(body))
        self.assertFailedTransfer(result)
        self.assertLess(result.received, len(body))
        await self.assertNotStoredAndRefetched(
            upstream, proxy, client, url, b"/short.bin", "files:short.bin", body
        )

    async def test_close_delimited_body_is_relayed_but_not_stored(self) -> None:
        """A body without length or chunking ends with the connection: served, not kept.

        Such a body cannot be told apart from a truncated one, so pkgproxy passes it on
        (it says so in its design) but does not commit it.
        """
        body = pattern(300 * 1024, b"eof")
        upstream, proxy = await self.files_setup()

        def until_close(request: UpstreamRequest, conn: UpstreamConnection) -> None:
            conn.write(response_head(200, [(b"connection", b"close")]) + body)
            conn.close()

        upstream.handlers[b"/eof.bin"] = until_close
        client = self.client()
        url = proxy.url("/files/eof.bin")
        result = await client.get(url)
        self.assertEqual(result.status, 200)
        self.assertIsNone(result.error)
        self.assertEqual(result.body, body)
        await self.assertNotStoredAndRefetched(
            upstream, proxy, client, url, b"/eof.bin", "files:eof.bin", body
        )

    async def test_close_delimited_body_is_relayed_close_delimited(self) -> None:
        """issue 15: a body that ended with its connection, cut short by a clean close
        or not, reaches the client framed the same way: no length, no chunks (whose
        last one would promise it whole), ``Connection: close``, the connection closed
        at its end. The client is promised no more than the upstream promised."""
        body = pattern(200 * 1024, b"fin")
        upstream, proxy = await self.files_setup()

        def until_close(cut: int) -> Any:
            def handler(request: UpstreamRequest, conn: UpstreamConnection) -> None:
                conn.write(response_head(200, [(b"connection", b"close")]) + body[:cut])
                conn.close()

            return handler

        upstream.handlers[b"/whole.bin"] = until_close(len(body))
        upstream.handlers[b"/cut.bin"] = until_close(len(body) // 3)
        for name, want in ((b"whole.bin", body), (b"cut.bin", body[: len(body) // 3])):
            raw = await self.raw_client(proxy)
            raw.send(b"GET /files/%s HTTP/1.1\r\nHost: x\r\n\r\n" % name)
            await raw.wait_closed()
            head, _, got = bytes(raw.received).partition(b"\r\n\r\n")
            lines = head.lower().split(b"\r\n")
            self.assertEqual(lines[0], b"http/1.1 200 ok")
            self.assertIn(b"connection: close", lines)
            self.assertFalse([h for h in lines if h.startswith(b"transfer-encoding")], head)
            self.assertFalse([h for h in lines if h.startswith(b"content-length")], head)
            self.assertEqual(got, want)
            self.assertFalse(raw.reset, "the upstream's clean end is passed on as one")
            await proxy.settled()
            self.assertFalse(proxy.stored("files:" + name.decode()))

    async def test_relayed_close_delimited_body_is_framed_the_same(self) -> None:
        """The same rule where a miss is relayed uncached (the cache disk in trouble):
        a body that ended with its connection goes out framed so, and one cut by a reset
        ends in a reset."""
        body = pattern(100 * 1024, b"relay")
        upstream, proxy = await self.files_setup()

        def until_close(request: UpstreamRequest, conn: UpstreamConnection) -> None:
            conn.write(response_head(200, [(b"connection", b"close")]) + body)
            conn.close()

        def reset(request: UpstreamRequest, conn: UpstreamConnection) -> None:
            conn.write(response_head(200, []) + body[:7000])
            conn.later(0.05, conn.abort)

        upstream.handlers[b"/whole.bin"] = until_close
        upstream.handlers[b"/cut.bin"] = reset
        proxy.store.disk_error("test: the disk refuses writes")
        head, got, was_reset = await raw_get(proxy.port_number, b"/files/whole.bin")
        lines = head.lower().split(b"\r\n")
        self.assertIn(b"x-cache: miss", lines)
        self.assertIn(b"connection: close", lines)
        self.assertFalse([h for h in lines if h.startswith(b"transfer-encoding")], head)
        self.assertEqual((got, was_reset), (body, False))
        head, _, was_reset = await raw_get(proxy.port_number, b"/files/cut.bin")
        self.assertIn(b"connection: close", head.lower())
        self.assertTrue(was_reset, "a clean close would say the body is whole")
        self.assertFalse(proxy.stored("files:whole.bin"))

    async def test_chunked_and_verified_bodies_stay_chunked(self) -> None:
        """Only an unverifiable close-delimited body is relayed so: a chunked upstream
        body is still relayed chunked, on a connection that stays open."""
        body = pattern(100 * 1024, b"chunk")
        upstream, proxy = await self.files_setup()

        def chunked(request: UpstreamRequest, conn: UpstreamConnection) -> None:
            conn.write(response_head(200, [(b"transfer-encoding", b"chunked")]))
            conn.write(b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")

        upstream.handlers[b"/chunked.bin"] = chunked
        raw = await self.raw_client(proxy)
        raw.send(b"GET /files/chunked.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_until(lambda: raw.received.endswith(b"0\r\n\r\n"), 10, "the last chunk")
        self.assertIn(b"transfer-encoding: chunked", bytes(raw.received).lower())
        self.assertFalse(raw.closed)
        raw.abort()


class OverrunTests(FaultTestCase):
    """An upstream that sends more than its Content-Length."""

    async def test_content_length_smaller_than_body(self) -> None:
        """Bytes past the announced length are ignored, and do not leak into another answer.

        Observed behaviour (Twisted's client stops at Content-Length and drops the rest
        of that read): the client gets exactly Content-Length bytes, ending cleanly, and
        that same prefix is what is stored and served as a HIT. The extra bytes are
        shaped like a second response; a following request for another file on the
        same upstream gets its own body, not them.
        """
        body = pattern(200 * 1024, b"overrun")
        announced = 100 * 1024
        smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"
        upstream, proxy = await self.files_setup()

        def overrun(request: UpstreamRequest, conn: UpstreamConnection) -> None:
            head = response_head(200, [(b"content-length", b"%d" % announced)])
            conn.write(head + body + smuggled)
            conn.done()

        other = pattern(4096, b"other")
        upstream.handlers[b"/over.bin"] = overrun
        upstream.handlers[b"/other.bin"] = static(other)
        client = self.client()
        url = proxy.url("/files/over.bin")
        result = await client.get(url)
        self.assertEqual(result.status, 200)
        self.assertEqual(result.announced, announced)
        self.assertIsNone(result.error)
        self.assertEqual(result.body, body[:announced])
        await proxy.settled()

        following = await client.get(proxy.url("/files/other.bin"))
        self.assertEqual(following.status, 200)
        self.assertEqual(following.body, other)
        self.assertEqual(upstream.count(b"/other.bin"), 1)

        entry = proxy.store.peek("files:over.bin")
        if entry is not None:
            self.assertEqual(entry.size, announced)
            self.assertEqual(entry.sha256, hashlib.sha256(body[:announced]).hexdigest())
            hit = await client.get(url)
            self.assertEqual(hit.x_cache, b"HIT")
            self.assertEqual(hit.body, body[:announced])
            self.assertEqual(upstream.count(b"/over.bin"), 1)


class ErrorStatusTests(FaultTestCase):
    """Upstream error answers."""

    async def test_500_is_relayed_and_not_stored(self) -> None:
        """A 500 with a body reaches the client as a 500 with that body; nothing is stored."""
        upstream, proxy = await self.files_setup()
        error_body = b"<html>upstream is on fire</html>\n"
        upstream.handlers[b"/err.bin"] = static(
            error_body, [(b"content-type", b"text/html")], status=500
        )
        client = self.client()
        url = proxy.url("/files/err.bin")
        result = await client.get(url)
        self.assertEqual(result.status, 500)
        self.assertIsNone(result.error)
        self.assertEqual(result.body, error_body)
        second = await client.get(url)
        self.assertEqual(second.status, 500)
        self.assertEqual(upstream.count(b"/err.bin"), 2)
        await self.assertNotStoredAndRefetched(
            upstream, proxy, client, url, b"/err.bin", "files:err.bin", pattern(5000, b"fixed")
        )


class StallTests(FaultTestCase):
    """An upstream that stops sending mid-body, past ``upstream.idle_timeout``."""

    async def _stall_setup(self, headers: Callable[[bytes], list[tuple[bytes, bytes]]]) -> Any:
        """A handler that sends ``headers(body)`` and 64 KiB of the body, then nothing."""
        body = pattern(512 * 1024, b"stall")
        upstream, proxy = await self.files_setup({"idle_timeout": "1s"})
        stalled: list[UpstreamConnection] = []

        def stall(request: UpstreamRequest, conn: UpstreamConnection) -> None:
            conn.write(response_head(200, headers(body)))
            conn.write(body[: 64 * 1024])
            stalled.append(conn)  # and say nothing more

        upstream.handlers[b"/stall.bin"] = stall
        return body, upstream, proxy, stalled

    async def test_stall_with_content_length(self) -> None:
        """A stall longer than idle_timeout (1 s) ends the transfer as failed; nothing stored."""
        body, upstream, proxy, stalled = await self._stall_setup(
            lambda b: [(b"content-length", b"%d" % len(b))]
        )
        client = self.client()
        url = proxy.url("/files/stall.bin")
        started = time.monotonic()
        result = await client.get(url, timeout=10)
        self.assertEqual(result.status, 200)
        self.assertFailedTransfer(result)
        self.assertGreaterEqual(time.monotonic() - started, 0.9)
        self.assertLess(result.received, len(body))
        self.assertEqual(len(stalled), 1)
        self.assertFalse(stalled[0].open, "pkgproxy should have closed the stalled connection")
        await self.assertNotStoredAndRefetched(
            upstream, proxy, client, url, b"/stall.bin", "files:stall.bin", body
        )

    async def test_stall_of_close_delimited_body(self) -> None:
        """A stall past idle_timeout on a body without length is a failed transfer too.

        pkgproxy itself cut the upstream off, so it knows the body is incomplete: the
        client must not get a clean end of a truncated body. Such a body reaches the
        client framed by the end of its connection, so that end is a reset.
        """
        body, upstream, proxy, stalled = await self._stall_setup(
            lambda b: [(b"connection", b"close")]
        )
        head, got, reset = await raw_get(proxy.port_number, b"/files/stall.bin")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertLess(len(got), len(body))
        self.assertTrue(reset, "a clean close would say the body is whole")
        await self.assertNotStoredAndRefetched(
            upstream,
            proxy,
            self.client(),
            proxy.url("/files/stall.bin"),
            b"/stall.bin",
            "files:stall.bin",
            body,
        )


class HeaderTimeoutTests(FaultTestCase):
    """An upstream that accepts the request and never answers it."""

    async def test_no_headers_within_header_timeout(self) -> None:
        """No status line within ``upstream.header_timeout`` (1 s): the client gets a 504.

        pkgproxy gives up on the upstream connection, answers 504 Gateway Timeout (the
        status its own error mapping gives a timeout), and stores nothing.
        """
        upstream, proxy = await self.files_setup({"header_timeout": "1s"})
        silent: list[UpstreamConnection] = []

        def never(request: UpstreamRequest, conn: UpstreamConnection) -> None:
            silent.append(conn)

        upstream.handlers[b"/silent.bin"] = never
        client = self.client()
        url = proxy.url("/files/silent.bin")
        started = time.monotonic()
        result = await client.get(url, timeout=10)
        self.assertGreaterEqual(time.monotonic() - started, 0.9)
        self.assertEqual(len(silent), 1)
        self.assertEqual(result.status, 504, f"body: {result.body!r}")
        self.assertIsNone(result.error)
        await self.assertNotStoredAndRefetched(
            upstream, proxy, client, url, b"/silent.bin", "files:silent.bin", b"late but fine"
        )


class ByHashTests(FaultTestCase):
    """Debian by-hash URLs name the SHA-256 their body must have."""

    async def _debian(self) -> tuple[FakeUpstream, ProxyUnderTest]:
        upstream = await self.start_upstream()
        proxy = await self.start_proxy(
            {
                "upstream": {"max_connections_per_host": 1},
                "routes": {"debian": {"upstream": upstream.url("/debian/")}},
            }
        )
        return upstream, proxy

    async def _mismatch(self, chunked: bool) -> None:
        good = pattern(256 * 1024, b"packages")
        bad = good[:-32] + b"tampered record in the index!!!\n"
        self.assertEqual(len(bad), len(good))
        digest = hashlib.sha256(good).hexdigest()
        upstream, proxy = await self._debian()
        path = BY_HASH_DIR + digest
        up_path = b"/debian/" + path.encode()

        def tampered(request: UpstreamRequest, conn: UpstreamConnection) -> None:
            if chunked:
                conn.write(response_head(200, [(b"transfer-encoding", b"chunked")]))
                conn.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(bad), bad))
            else:
                conn.write(response_head(200, [(b"content-length", b"%d" % len(bad))]) + bad)
            conn.done()

        upstream.handlers[up_path] = tampered
        client = self.client()
        url = proxy.url("/debian/" + path)
        result = await client.get(url)
        self.assertEqual(result.status, 200)
        self.assertFailedTransfer(result)
        if not chunked:
            self.assertLess(result.received, len(bad))
        again = await client.get(url)
        self.assertFailedTransfer(again)
        self.assertEqual(upstream.count(up_path), 2)
        await self.assertNotStoredAndRefetched(
            upstream, proxy, client, url, up_path, "debian:" + path, good
        )

    async def test_by_hash_mismatch(self) -> None:
        """A by-hash body that does not match its hex is a failed transfer, never stored.

        Every request for it goes upstream again; once the upstream sends the right
        body, it is stored and served as a HIT.
        """
        await self._mismatch(chunked=False)

    async def test_by_hash_mismatch_chunked(self) -> None:
        """As above with a chunked upstream body: the client never gets the final chunk."""
        await self._mismatch(chunked=True)

    async def test_by_hash_match_is_stored(self) -> None:
        """A by-hash body that matches its hex is stored and then served as a HIT."""
        body = pattern(100 * 1024, b"release")
        path = BY_HASH_DIR + hashlib.sha256(body).hexdigest()
        upstream, proxy = await self._debian()
        up_path = b"/debian/" + path.encode()
        upstream.handlers[up_path] = static(body)
        client = self.client()
        url = proxy.url("/debian/" + path)
        first = await client.get(url)
        self.assertEqual((first.status, first.x_cache, first.error), (200, b"MISS", None))
        self.assertEqual(first.body, body)
        await proxy.settled()
        self.assertTrue(proxy.stored("debian:" + path))
        hit = await client.get(url)
        self.assertEqual((hit.status, hit.x_cache, hit.body), (200, b"HIT", body))
        self.assertEqual(upstream.count(up_path), 1)


class LearnedChecksTests(FaultTestCase):
    """A cached Debian ``Packages`` index says what its pool files must be."""

    POOL = "pool/main/h/hello/hello_1.0_amd64.deb"

    async def _debian_with_packages(self, deb: bytes) -> tuple[FakeUpstream, ProxyUnderTest]:
        upstream = await self.start_upstream()
        proxy = await self.start_proxy(
            {
                "upstream": {"max_connections_per_host": 1},
                "routes": {"debian": {"upstream": upstream.url("/debian/")}},
            }
        )
        packages = (
            b"Package: hello\nVersion: 1.0\nArchitecture: amd64\n"
            b"Filename: %s\nSize: %d\nSHA256: %s\n\n"
            % (self.POOL.encode(), len(deb), hashlib.sha256(deb).hexdigest().encode())
        )
        index = "dists/stable/main/binary-amd64/Packages"
        upstream.handlers[b"/debian/" + index.encode()] = static(packages)
        got = await self.client().get(proxy.url("/debian/" + index))
        self.assertEqual((got.status, got.x_cache, got.body), (200, b"MISS", packages))
        await proxy.settled()
        await wait_until(
            lambda: proxy.learner.facts.get(upstream.url("/debian/") + self.POOL) is not None,
            5,
            "the Packages index to be learned",
        )
        return upstream, proxy

    async def test_pool_file_must_match_packages(self) -> None:
        """A pool file whose body differs from its Packages SHA256 is a failed transfer.

        Same size, other bytes: the client's response is aborted, nothing is stored;
        the right body afterwards is stored and served as a HIT.
        """
        deb = pattern(150 * 1024, b"deb")
        upstream, proxy = await self._debian_with_packages(deb)
        up_path = b"/debian/" + self.POOL.encode()
        upstream.handlers[up_path] = static(deb[:-6] + b"EVIL!\n")
        client = self.client()
        url = proxy.url("/debian/" + self.POOL)
        result = await client.get(url)
        self.assertEqual(result.status, 200)
        self.assertFailedTransfer(result)
        self.assertLess(result.received, len(deb))
        await self.assertNotStoredAndRefetched(
            upstream, proxy, client, url, up_path, "debian:" + self.POOL, deb
        )

    async def test_pool_file_length_must_match_packages(self) -> None:
        """A pool file announced with another length than its Packages Size is refused.

        pkgproxy does not start the download: the client gets a 502 at once, and
        nothing is stored.
        """
        deb = pattern(150 * 1024, b"deb")
        upstream, proxy = await self._debian_with_packages(deb)
        up_path = b"/debian/" + self.POOL.encode()
        upstream.handlers[up_path] = static(deb + b"trailing junk\n")
        client = self.client()
        url = proxy.url("/debian/" + self.POOL)
        result = await client.get(url)
        self.assertEqual(result.status, 502)
        self.assertIsNone(result.error)
        await self.assertNotStoredAndRefetched(
            upstream, proxy, client, url, up_path, "debian:" + self.POOL, deb
        )


class DiskRefusesWriteTests(FaultTestCase):
    """The cache disk refuses a download's write midway (ENOSPC, EIO): its clients still
    get the whole body, from memory, and nothing is stored."""

    def refuse_writes_after(self, n: int) -> None:
        from pkgproxy.fetch import body as fetch_body
        from tests.support.diskfaults import refusing_writes

        self.patch(fetch_body, "write_and_hash", refusing_writes(n))

    async def test_clients_get_the_rest_from_memory(self) -> None:
        """Two clients of one download (the second joins it) get every byte; the body is
        not stored, no temp file is left, and the log says why."""
        upstream, proxy = await self.files_setup()
        body = pattern(3 * 1024 * 1024, b"spill")
        # Slow enough for the second client to join the download on a busy host.
        upstream.handlers[b"/big.bin"] = SlowBody(body, 256 * 1024, 0.03)
        self.refuse_writes_after(2)
        client, other = HTTPTestClient(), HTTPTestClient()
        self.addCleanup(client.close)
        self.addCleanup(other.close)
        first = client.get(proxy.url("/files/big.bin"))
        await wait_until(lambda: upstream.count(b"/big.bin") == 1)
        second = await other.get(proxy.url("/files/big.bin"))
        got = await first
        self.assertEqual((got.status, got.error, got.x_cache), (200, None, b"MISS"))
        self.assertEqual(hashlib.sha256(got.body or b"").digest(), hashlib.sha256(body).digest())
        self.assertEqual((second.status, second.error, second.body == body), (200, None, True))
        self.assertEqual(second.x_cache, b"COALESCED")
        await proxy.settled()
        await proxy.no_temp_files()
        self.assertFalse(proxy.stored("files:big.bin"))
        self.assertEqual(upstream.count(b"/big.bin"), 1)
        self.assertTrue(proxy.store.disk_trouble())

    async def test_memory_for_refused_downloads_is_bounded_in_total(self) -> None:
        """issue 15: three downloads the disk refuses at once, with room in memory for
        one. The first is finished from memory; the newcomers fail cleanly (a failed
        transfer, or, before their first byte, a 503 saying why; nothing stored, no
        temp file) instead of each holding up to 64 MiB;
        the reservations never pass the budget and all come back; a retry is relayed.
        """
        from pkgproxy.fetch import body as fetch_body

        peaks: list[int] = []

        class Recorded(fetch_body.SpillBudget):
            def take(self, size: int) -> bool:
                taken = super().take(size)
                peaks.append(self.held)
                return taken

        budget = Recorded(4 * 1024 * 1024)
        self.patch(fetch_body, "SPILL_BUDGET", budget)
        upstream, proxy = await self.files_setup({"max_connections_per_host": 4})
        body = pattern(3 * 1024 * 1024, b"spill")
        names = [b"/a.bin", b"/b.bin", b"/c.bin"]
        for name in names:
            upstream.handlers[name] = SlowBody(body, 256 * 1024, 0.05)
        refuse = [False]
        real = fetch_body.write_and_hash

        def write(fd: int, data: bytes, offset: int, hashers: dict[str, Any]) -> int:
            if refuse[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data, offset, hashers)

        self.patch(fetch_body, "write_and_hash", write)
        clients = [HTTPTestClient() for _ in names]
        for c in clients:
            self.addCleanup(c.close)
        gets = [
            c.get(proxy.url("/files" + n.decode())) for c, n in zip(clients, names, strict=True)
        ]
        await wait_until(lambda: all(upstream.count(n) == 1 for n in names))
        refuse[0] = True  # every download is under way: the disk now refuses them all
        results = [await g for g in gets]
        whole = [r for r in results if r.status == 200 and r.error is None]
        self.assertEqual(len(whole), 1, results)
        self.assertEqual(whole[0].body, body)
        for r in results:
            if r.status == 503:
                self.assertIsNone(r.error)
                self.assertIn(b"cache disk error", r.body)
                self.assertEqual(r.body.count(b"\n"), 1, r.body)
            elif r.error is not None:
                self.assertFailedTransfer(r)
        self.assertEqual(len(peaks), 3)
        self.assertLessEqual(max(peaks), budget.limit)
        await proxy.settled()
        await proxy.no_temp_files()
        for name in names:
            self.assertFalse(proxy.stored("files:" + name.decode()[1:]))
        for c in clients:
            await c.close()
        await wait_until(lambda: budget.held == 0, 5, "the reservations returned")
        # A retry while the disk is in trouble is relayed, whole, and not stored.
        retry = HTTPTestClient()
        self.addCleanup(retry.close)
        failed = names[[r.status == 200 and r.error is None for r in results].index(False)]
        again = await retry.get(proxy.url("/files" + failed.decode()))
        self.assertEqual((again.status, again.error, again.body == body), (200, None, True))
        self.assertFalse(proxy.stored("files:" + failed.decode()[1:]))

    async def test_failure_before_the_first_byte_is_a_response(self) -> None:
        """issue 15: a download the disk refuses at its first write, with no memory left
        to finish it: its client gets a 503 saying why, not a closed connection."""
        from pkgproxy.fetch import body as fetch_body

        self.patch(fetch_body, "SPILL_BUDGET", fetch_body.SpillBudget(0))
        upstream, proxy = await self.files_setup()
        body = pattern(1024 * 1024, b"first")
        upstream.handlers[b"/first.bin"] = SlowBody(body, 256 * 1024, 0.05)
        self.refuse_writes_after(0)
        client = HTTPTestClient()
        self.addCleanup(client.close)
        r = await client.get(proxy.url("/files/first.bin"))
        self.assertEqual((r.status, r.error), (503, None))
        self.assertTrue(r.body.startswith(b"pkgproxy: cache disk error"), r.body)
        self.assertEqual(r.body.count(b"\n"), 1, r.body)
        await proxy.settled()
        await proxy.no_temp_files()
        self.assertFalse(proxy.stored("files:first.bin"))

    async def test_too_much_left_for_memory_fails_the_transfer(self) -> None:
        """Beyond SPILL_MAX left to hold, the clients see a failed transfer, as before."""
        from pkgproxy.fetch import body as fetch_body

        self.patch(fetch_body, "SPILL_MAX", 512 * 1024)
        upstream, proxy = await self.files_setup()
        body = pattern(3 * 1024 * 1024, b"spill")
        upstream.handlers[b"/big.bin"] = SlowBody(body, 256 * 1024, 0.01)
        self.refuse_writes_after(1)
        client = HTTPTestClient()
        self.addCleanup(client.close)
        got = await client.get(proxy.url("/files/big.bin"))
        self.assertFailedTransfer(got)
        await proxy.settled()
        await proxy.no_temp_files()
        self.assertFalse(proxy.stored("files:big.bin"))
