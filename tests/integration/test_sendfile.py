"""Large cache hits sent with sendfile: complete under back-pressure, never blocking others."""

from __future__ import annotations

import time

from pkgproxy.web.producer import SendfileProducer
from tests.integration.harness import (
    IntegrationTestCase,
    parse_responses,
    pattern,
    sha256,
    sleep,
    static,
    wait_until,
)

BIG = pattern(24 * 1024 * 1024, b"big")


class SendfileTests(IntegrationTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.sendfile_responses = 0
        original = SendfileProducer.start

        def counting(producer: SendfileProducer) -> None:
            self.sendfile_responses += 1
            original(producer)

        self.patch(SendfileProducer, "start", counting)

    async def test_slow_reader_gets_every_byte(self) -> None:
        """A client that stops reading mid-body, then resumes, gets the exact file.

        The socket fills while it is paused, so the sender must wait for writability and
        continue where it stopped; meanwhile other clients are served at once.
        """
        upstream, proxy = await self.files_setup()
        upstream.handlers[b"/big.bin"] = static(BIG)
        upstream.handlers[b"/small.bin"] = static(b"small")
        client = self.client()
        self.assertEqual((await client.get(proxy.url("/files/big.bin"))).x_cache, b"MISS")
        await client.get(proxy.url("/files/small.bin"))
        await proxy.settled()

        raw = await self.raw_client(proxy)
        raw.send(b"GET /files/big.bin HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        await wait_until(lambda: len(raw.received) > 0, 10, "the first bytes")
        assert raw.transport is not None
        raw.transport.pauseProducing()  # type: ignore[attr-defined]
        await sleep(0.3)
        received_while_paused = len(raw.received)
        self.assertLess(received_while_paused, len(BIG))

        started = time.monotonic()
        other = await client.get(proxy.url("/files/small.bin"))
        self.assertEqual((other.body, other.x_cache), (b"small", b"HIT"))
        self.assertLess(time.monotonic() - started, 1.0)

        raw.transport.resumeProducing()  # type: ignore[attr-defined]
        await raw.wait_closed(20)
        responses, rest = parse_responses(bytes(raw.received))
        self.assertEqual((len(responses), rest), (1, b""))
        self.assertEqual(responses[0].headers[b"x-cache"], b"HIT")
        self.assertEqual(sha256(responses[0].body), sha256(BIG))
        self.assertEqual(self.sendfile_responses, 1)

    async def test_range_and_keep_alive_after_large_hit(self) -> None:
        """A ranged large hit ends exactly, and the connection serves the next request."""
        upstream, proxy = await self.files_setup()
        upstream.handlers[b"/big.bin"] = static(BIG)
        await self.client().get(proxy.url("/files/big.bin"))
        await proxy.settled()
        raw = await self.raw_client(proxy)
        start = 5 * 1024 * 1024 + 3
        raw.send(
            b"GET /files/big.bin HTTP/1.1\r\nHost: p\r\nRange: bytes=%d-\r\n\r\n"
            b"GET /files/big.bin HTTP/1.1\r\nHost: p\r\nRange: bytes=0-99\r\n"
            b"Connection: close\r\n\r\n" % start
        )
        await raw.wait_closed(20)
        responses, rest = parse_responses(bytes(raw.received))
        self.assertEqual([r.status for r in responses], [206, 206])
        self.assertEqual(sha256(responses[0].body), sha256(BIG[start:]))
        self.assertEqual(responses[1].body, BIG[:100])
        self.assertEqual(rest, b"")
        self.assertEqual(self.sendfile_responses, 2)
