"""Request limits on the real server: header caps and the idle timeout, through sockets.

The server is the service tree ``twistd pkgproxy`` runs (:func:`pkgproxy.tap.build_service`,
so its ``ProxySite`` with the ``[limits]`` of the config), listening on 127.0.0.1.
"""

from __future__ import annotations

import time

from pkgproxy.config import config_from_dict
from tests.integration.harness import (
    IntegrationTestCase,
    RawClient,
    parse_responses,
    raw_connect,
    sleep,
    start_service_tree,
    wait_until,
)

HEALTH = b"GET /_pkgproxy/health HTTP/1.1\r\nHost: cache.test\r\n"


def status_of(data: bytes) -> int:
    """The status code of the first response in ``data`` (0 if there is none)."""
    line = bytes(data).split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


class LimitsTests(IntegrationTestCase):
    """Default header caps (16 KiB, 100 headers) and ``client_idle_timeout = "1s"``."""

    async def _serve(self, **limits: str) -> int:
        """Start the service tree; return its port."""
        config = config_from_dict(
            {
                "listen": ["tcp:0:interface=127.0.0.1"],
                "cache": {"dir": self.mktemp(), "max_size": "1GiB"},
                "limits": {"client_idle_timeout": "1s", **limits},
            }
        )
        return (await start_service_tree(self, config))[2]

    async def _client(self, port: int) -> RawClient:
        client = await raw_connect(port)
        self.addCleanup(client.abort)
        return client

    async def _refused(self, request: bytes, statuses: tuple[int, ...]) -> None:
        """``request`` is answered with one of ``statuses`` and the connection closed."""
        client = await self._client(await self._serve())
        client.send(request)
        await client.wait_closed(5.0)
        self.assertIn(status_of(client.received), statuses, bytes(client.received[:200]))
        self.assertNotIn(b"ok\n", bytes(client.received))

    async def test_oversized_header_block_refused(self) -> None:
        """40 headers of 500 bytes (20 KB, each line small): 400, connection closed."""
        headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 500) for i in range(40))
        await self._refused(HEALTH + headers + b"\r\n", (400, 431))

    async def test_overlong_header_line_refused(self) -> None:
        """One 20 KB header line: 431 with a reason (not a silent close), connection closed."""
        await self._refused(HEALTH + b"X-Big: " + b"b" * 20_000 + b"\r\n\r\n", (431,))

    async def test_too_many_headers_refused(self) -> None:
        """150 small headers (limit 100): 400, connection closed."""
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
        await self._refused(HEALTH + headers + b"\r\n", (400, 431))

    async def test_normal_client_served_then_idle_disconnected(self) -> None:
        """A usual request (30 headers, 2 KB) is served twice on one connection; then the
        server closes the connection after the 1 s idle timeout, not before.
        """
        client = await self._client(await self._serve())
        headers = b"".join(b"X-Normal-%d: %s\r\n" % (i, b"n" * 60) for i in range(30))
        for n in (1, 2):
            client.send(HEALTH + headers + b"\r\n")
            await wait_until(
                lambda n=n: len(parse_responses(bytes(client.received))[0]) == n, 5.0, "a response"
            )
        answered = time.monotonic()
        responses, rest = parse_responses(bytes(client.received))
        self.assertEqual([(r.status, r.body) for r in responses], [(200, b"ok\n")] * 2)
        self.assertEqual(rest, b"")
        await client.wait_closed(5.0)
        assert client.closed_at is not None
        idle = client.closed_at - answered
        self.assertGreater(idle, 0.7, "closed before the idle timeout")
        self.assertLess(idle, 4.0)

    async def test_slowloris_cut_at_the_request_deadline(self) -> None:
        """A head trickled a byte every 0.2 s (so never idle for 1 s) is answered 408 and
        closed at ``request_head_timeout = "1.5s"``, long before its headers run out.
        """
        client = await self._client(await self._serve(request_head_timeout="1.5s"))
        head = HEALTH + b"X-Slow: " + b"s" * 200 + b"\r\n\r\n"
        started = time.monotonic()
        for byte in range(len(head)):
            if client.closed:
                break
            client.send(head[byte : byte + 1])
            await sleep(0.2)
        self.assertTrue(client.closed, "still open after the whole head trickled in")
        assert client.closed_at is not None
        self.assertLess(client.closed_at - started, 4.0)
        self.assertGreater(client.closed_at - started, 1.2)
        self.assertEqual(status_of(client.received), 408)
