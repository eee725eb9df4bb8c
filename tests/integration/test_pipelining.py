"""HTTP/1.1 pipelining on one raw connection: responses come back in request order."""

from __future__ import annotations

from tests.integration.harness import (
    IntegrationTestCase,
    RawResponse,
    SlowBody,
    parse_responses,
    pattern,
    static,
    wait_until,
)

FILES = {
    "one.bin": pattern(1536 * 1024, b"one"),  # large enough to make the producer pause
    "two.bin": pattern(10, b"two"),
    "three.bin": pattern(600 * 1024, b"three"),
}


def pipelined(names: list[str]) -> bytes:
    """Three GETs in one buffer; the last asks the server to close afterwards."""
    out = b""
    for i, name in enumerate(names):
        close = b"Connection: close\r\n" if i == len(names) - 1 else b""
        out += b"GET /files/%s HTTP/1.1\r\nHost: proxy\r\n%s\r\n" % (name.encode(), close)
    return out


class PipeliningTests(IntegrationTestCase):
    """Several requests written at once on one connection."""

    async def _read(self, raw: object, count: int) -> list[RawResponse]:
        parsed: list[RawResponse] = []

        def complete() -> bool:
            nonlocal parsed
            parsed, _rest = parse_responses(bytes(raw.received))  # type: ignore[attr-defined]
            return len(parsed) >= count or raw.closed  # type: ignore[attr-defined]

        await wait_until(complete, 20, f"{count} pipelined responses")
        return parsed

    async def test_pipelined_hits_in_order(self) -> None:
        """Three cached files requested in one write come back complete, in request order."""
        upstream, proxy = await self.files_setup()
        for name, body in FILES.items():
            upstream.handlers[b"/" + name.encode()] = static(body)
        client = self.client()
        for name in FILES:
            warm = await client.get(proxy.url("/files/" + name))
            self.assertEqual(warm.x_cache, b"MISS")
        await proxy.settled()

        raw = await self.raw_client(proxy)
        order = ["three.bin", "one.bin", "two.bin"]
        raw.send(pipelined(order))
        responses = await self._read(raw, 3)

        self.assertEqual(len(responses), 3)
        for name, resp in zip(order, responses, strict=True):
            self.assertEqual(resp.status, 200)
            self.assertEqual(resp.headers.get(b"x-cache"), b"HIT")
            self.assertEqual(resp.body, FILES[name], f"body of {name}")
        await raw.wait_closed()
        self.assertEqual(parse_responses(bytes(raw.received))[1], b"")
        self.assertEqual(len(upstream.requests), 3)

    async def test_pipelined_misses_in_order(self) -> None:
        """Uncached files pipelined come back in request order, even if a later one is faster.

        The first file downloads slowly, the second instantly: the second response must
        still follow the first, each complete.
        """
        upstream, proxy = await self.files_setup()
        upstream.handlers[b"/one.bin"] = SlowBody(FILES["one.bin"], 128 * 1024, 0.01)
        upstream.handlers[b"/two.bin"] = static(FILES["two.bin"])
        upstream.handlers[b"/three.bin"] = static(FILES["three.bin"])
        raw = await self.raw_client(proxy)
        order = ["one.bin", "two.bin", "three.bin"]
        raw.send(pipelined(order))
        responses = await self._read(raw, 3)

        self.assertEqual(len(responses), 3)
        for name, resp in zip(order, responses, strict=True):
            self.assertEqual(resp.status, 200)
            self.assertEqual(resp.body, FILES[name], f"body of {name}")
        await raw.wait_closed()
