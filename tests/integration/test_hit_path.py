"""The hit path: repeated hits answered below twisted.web, exactly as twisted.web would.

Every test runs the real server on 127.0.0.1 and talks to it over TCP; the hit path's
``answered`` counter tells which path answered.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred

from pkgproxy.config import Route
from pkgproxy.fetch.fetch import Fetch
from pkgproxy.observe import Observer, RequestRecord
from pkgproxy.web.fast import HitPath
from tests.integration.harness import (
    IntegrationTestCase,
    ProxyUnderTest,
    RawResponse,
    SlowBody,
    parse_responses,
    pattern,
    static,
    wait_until,
)

SMALL = pattern(12_000, b"small")
OTHER = pattern(3_000, b"other")


def get(path: str, *headers: bytes, method: bytes = b"GET", version: bytes = b"HTTP/1.1") -> bytes:
    """One request head, as a client writes it."""
    head = b"%s %s %s\r\nHost: proxy\r\n" % (method, path.encode(), version)
    return head + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


class Recorder(Observer):
    """Keeps every request record."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def request_done(self, record: RequestRecord) -> None:
        self.records.append(record)

    def fetch_settled(self, route: Route, fetch: Fetch) -> None:
        pass


class HitPathTests(IntegrationTestCase):
    async def _exchange(
        self, proxy: ProxyUnderTest, data: bytes, count: int = 1
    ) -> tuple[list[RawResponse], bytes]:
        """Send ``data`` on a new connection; the first ``count`` responses, and the raw bytes."""
        raw = await self.raw_client(proxy)
        raw.send(data)

        def complete() -> bool:
            return len(parse_responses(bytes(raw.received))[0]) >= count or raw.closed

        await wait_until(complete, 10, f"{count} responses")
        received = bytes(raw.received)
        raw.abort()
        return parse_responses(received)[0], received

    async def _warm(
        self, *names: str, memory: str = "16MiB", **bodies: bytes
    ) -> tuple[Any, ProxyUnderTest]:
        """An immutable route with ``names`` fetched once (a MISS) and committed."""
        upstream = await self.start_upstream()
        proxy = await self.start_proxy(
            {
                "routes": {
                    "files": {"family": "generic", "immutable": True, "upstream": upstream.url()}
                },
                "cache": {"dir": self.mktemp(), "max_size": "1GiB", "memory": memory},
            }
        )
        for name, body in bodies.items():
            upstream.handlers[b"/" + name.encode()] = static(
                body, [(b"content-type", b"application/octet-stream")]
            )
        client = self.client()
        for name in names:
            self.assertEqual((await client.get(proxy.url("/files/" + name))).x_cache, b"MISS")
        await proxy.settled()
        return upstream, proxy

    @staticmethod
    def _hits(proxy: ProxyUnderTest) -> HitPath:
        hits = proxy.site.hit_path
        assert hits is not None
        return hits

    async def _recorded(self) -> tuple[Any, ProxyUnderTest, HitPath]:
        """``a.bin`` cached, and its first hit answered by twisted.web and recorded."""
        upstream, proxy = await self._warm("a.bin", **{"a.bin": SMALL})
        await self._exchange(proxy, get("/files/a.bin"))
        return upstream, proxy, self._hits(proxy)

    async def test_second_hit_is_replayed_byte_for_byte(self) -> None:
        """twisted.web answers the first hit; the next one gets the same bytes (Date aside)."""
        upstream, proxy = await self._warm("a.bin", **{"a.bin": SMALL})
        hits = self._hits(proxy)

        _, first = await self._exchange(proxy, get("/files/a.bin"))
        self.assertEqual(hits.answered, 0)
        _, second = await self._exchange(proxy, get("/files/a.bin", b"User-Agent: t/1"))
        self.assertEqual(hits.answered, 1)

        def without_date(raw: bytes) -> bytes:
            head, _, body = raw.partition(b"\r\n\r\n")
            lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"date:")]
            return b"\r\n".join(lines) + b"\r\n\r\n" + body

        self.assertEqual(without_date(second), without_date(first))
        self.assertIn(b"\r\nDate: ", second)
        response = parse_responses(second)[0][0]
        self.assertEqual((response.status, response.body), (200, SMALL))
        self.assertEqual(response.headers[b"x-cache"], b"HIT")
        self.assertEqual(len(upstream.requests), 1)

    async def test_pipelined_mix_keeps_order(self) -> None:
        """Replayed hits and a slow miss on one connection answer in request order."""
        upstream, proxy = await self._warm("a.bin", "b.bin", **{"a.bin": SMALL, "b.bin": OTHER})
        slow = pattern(300_000, b"slow")
        upstream.handlers[b"/c.bin"] = SlowBody(slow, 64 * 1024, 0.02)
        for name in ("a.bin", "b.bin"):  # twisted.web answers these hits and records them
            await self._exchange(proxy, get("/files/" + name))
        hits = self._hits(proxy)
        data = (
            get("/files/a.bin")
            + get("/files/c.bin")
            + get("/files/b.bin")
            + get("/files/a.bin", b"Connection: close")
        )
        responses, _ = await self._exchange(proxy, data, 4)
        self.assertEqual([r.status for r in responses], [200] * 4)
        self.assertEqual([r.body for r in responses], [SMALL, slow, OTHER, SMALL], "in order")
        self.assertEqual(
            [r.headers[b"x-cache"] for r in responses], [b"HIT", b"MISS", b"HIT", b"HIT"]
        )
        self.assertGreaterEqual(hits.answered, 1)

    async def test_head_is_replayed_without_body(self) -> None:
        """A HEAD after a recorded GET gets the GET's headers and no body."""
        _, proxy, hits = await self._recorded()
        raw = await self.raw_client(proxy)
        raw.send(get("/files/a.bin", method=b"HEAD") + get("/files/b.bin", method=b"HEAD"))
        await wait_until(lambda: raw.received.count(b"\r\n\r\n") >= 2, 5, "two answers")
        first, _, rest = bytes(raw.received).partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: %d" % len(SMALL), first)
        self.assertTrue(rest.startswith(b"HTTP/1.1 "), "no body after a HEAD answer")
        self.assertEqual(hits.answered, 1)

    async def test_requests_that_could_differ_go_to_twisted_web(self) -> None:
        """Ranges, conditions, Cache-Control, HTTP/1.0 and other Accepts are not replayed."""
        _, proxy, hits = await self._recorded()

        (r,), _ = await self._exchange(proxy, get("/files/a.bin", b"Range: bytes=0-9"))
        self.assertEqual((r.status, r.body), (206, SMALL[:10]))
        etag = r.headers[b"etag"]
        (r,), _ = await self._exchange(proxy, get("/files/a.bin", b"If-None-Match: " + etag))
        self.assertEqual(r.status, 304)
        (r,), _ = await self._exchange(proxy, get("/files/a.bin", b"Cache-Control: no-cache"))
        self.assertEqual((r.status, r.body), (200, SMALL))
        (r,), _ = await self._exchange(proxy, get("/files/a.bin", version=b"HTTP/1.0"))
        self.assertEqual((r.status, r.body), (200, SMALL))
        (r,), _ = await self._exchange(proxy, get("/files/a.bin", b"Accept: text/html"))
        self.assertEqual((r.status, r.body), (200, SMALL))
        (r,), _ = await self._exchange(proxy, get("/files/a.bin", b"X-Other: 1"))
        self.assertEqual((r.status, r.body), (200, SMALL))
        self.assertEqual(hits.answered, 0)

        # Twisted's answer to a malformed request is not pre-empted either.
        (r,), _ = await self._exchange(proxy, b"GET /files/a.bin HTTP/1.1\r\nHost : x\r\n\r\n")
        self.assertEqual(r.status, 400)
        self.assertEqual(hits.answered, 0)

    async def test_purged_entry_is_not_replayed(self) -> None:
        """Once an entry leaves the cache, its record is dropped and the file fetched again."""
        upstream, proxy, hits = await self._recorded()
        self.assertTrue(proxy.store.remove("files:a.bin"))
        (r,), _ = await self._exchange(proxy, get("/files/a.bin"))
        self.assertEqual((r.body, r.headers[b"x-cache"]), (SMALL, b"MISS"))
        self.assertEqual((hits.answered, len(upstream.requests)), (0, 2))

    async def test_missing_cache_file_goes_to_twisted_web(self) -> None:
        """A cache file gone from disk is the resource's to handle (it fetches again)."""
        upstream, proxy = await self._warm("a.bin", memory="0", **{"a.bin": SMALL})
        await self._exchange(proxy, get("/files/a.bin"))
        entry = proxy.store.peek("files:a.bin")
        assert entry is not None
        os.unlink(proxy.store.path_of(entry))
        (r,), _ = await self._exchange(proxy, get("/files/a.bin"))
        self.assertEqual((r.status, r.body), (200, SMALL))
        self.assertEqual(len(upstream.requests), 2)

    async def test_bodies_in_memory_stay_within_budget(self) -> None:
        """``cache.memory`` bounds the bodies kept; past it the oldest records go."""
        names = {f"{i}.bin": pattern(8_000, b"%d" % i) for i in range(5)}
        _, proxy = await self._warm(*names, memory="20000", **names)
        hits = self._hits(proxy)
        for _round in range(3):
            for name, body in names.items():
                (r,), _ = await self._exchange(proxy, get("/files/" + name))
                self.assertEqual((r.status, r.body), (200, body))
                self.assertLessEqual(hits.kept, 20_000)
        self.assertGreater(hits.kept, 0)
        # A file on disk answers the same once its body is not in memory.
        for name in names:
            entry = proxy.store.peek("files:" + name)
            assert entry is not None
            with open(proxy.store.path_of(entry), "rb") as f:
                self.assertEqual(f.read(), names[name])

    async def test_new_facts_end_every_record(self) -> None:
        """When an index teaches something, no earlier decision is replayed unchecked."""
        _, proxy, hits = await self._recorded()
        proxy.learner.facts.add([])
        await self._exchange(proxy, get("/files/a.bin"))  # decided again, recorded again
        self.assertEqual(hits.answered, 0)
        await self._exchange(proxy, get("/files/a.bin"))
        self.assertEqual(hits.answered, 1)

    async def test_index_replayed_only_while_fresh(self) -> None:
        """An entry with a lifetime is replayed until it expires, then revalidated."""
        upstream = await self.start_upstream()
        upstream.handlers[b"/index"] = static(
            OTHER, [(b"cache-control", b"max-age=1"), (b"etag", b'"v1"')]
        )
        proxy = await self.start_proxy(
            {"routes": {"files": {"family": "generic", "upstream": upstream.url()}}}
        )
        hits = self._hits(proxy)
        (r,), _ = await self._exchange(proxy, get("/files/index"))
        self.assertEqual(r.headers[b"x-cache"], b"MISS")
        await proxy.settled()
        await self._exchange(proxy, get("/files/index"))
        (r,), _ = await self._exchange(proxy, get("/files/index"))
        self.assertEqual((r.body, hits.answered), (OTHER, 1))
        proxy.clock.advance(1.2)
        (r,), _ = await self._exchange(proxy, get("/files/index"))
        self.assertEqual(r.body, OTHER)
        self.assertNotEqual(r.headers[b"x-cache"], b"HIT")
        self.assertEqual((hits.answered, len(upstream.requests)), (1, 2))

    async def test_signature_made_due_by_a_new_release_is_not_replayed(self) -> None:
        """A Release.gpg whose Release came back changed is revalidated, even while the
        hit path holds a record of it that has not reached its own expiry."""
        upstream = await self.start_upstream()
        bodies = {b"/dists/old/Release": b"Release v1\n", b"/dists/old/Release.gpg": b"sig v1\n"}
        for path, body in bodies.items():
            upstream.handlers[path] = static(body, [(b"etag", b'"1"')])
        proxy = await self.start_proxy(
            {"routes": {"debian": {"upstream": upstream.url(), "index_ttl": "2s"}}}
        )
        hits = self._hits(proxy)
        await self._exchange(proxy, get("/debian/dists/old/Release"))
        await proxy.settled()
        proxy.clock.advance(1.0)
        for _ in range(3):  # recorded, then replayed
            (r,), _ = await self._exchange(proxy, get("/debian/dists/old/Release.gpg"))
        await proxy.settled()
        self.assertEqual((r.body, r.headers[b"x-cache"], hits.answered), (b"sig v1\n", b"HIT", 1))
        proxy.clock.advance(1.2)  # Release is due; its signature, fetched later, is not yet
        upstream.handlers[b"/dists/old/Release"] = static(b"Release v2\n", [(b"etag", b'"2"')])
        upstream.handlers[b"/dists/old/Release.gpg"] = static(b"sig v2\n", [(b"etag", b'"2"')])
        (r,), _ = await self._exchange(proxy, get("/debian/dists/old/Release"))
        self.assertEqual(r.body, b"Release v2\n")
        (r,), _ = await self._exchange(proxy, get("/debian/dists/old/Release.gpg"))
        self.assertEqual((r.body, r.headers[b"x-cache"], hits.answered), (b"sig v2\n", b"MISS", 1))

    async def test_replayed_hits_are_reported(self) -> None:
        """The access log and metrics see a replayed hit like any other."""
        _, proxy = await self._warm("a.bin", **{"a.bin": SMALL})
        recorder = Recorder()
        hits = self._hits(proxy)
        hits._observer = recorder
        proxy.resource._observer = recorder
        await self._exchange(proxy, get("/files/a.bin"))
        await self._exchange(proxy, get("/files/a.bin", b"User-Agent: apt/2"))
        await wait_until(lambda: len(recorder.records) == 2, 5, "two records")
        slow, fast = recorder.records
        self.assertEqual(fast.uri, "/files/a.bin")
        self.assertEqual(fast.user_agent, "apt/2")
        self.assertEqual(fast.client, "127.0.0.1")
        for record in (slow, fast):
            self.assertEqual(
                (record.status, record.cache, record.route, record.family, record.bytes_sent),
                (200, "HIT", "files", "generic", len(SMALL)),
            )

    async def test_idle_connection_still_times_out(self) -> None:
        """A connection answered only by the hit path keeps twisted.web's idle timeout."""
        _, proxy = await self._warm("a.bin", **{"a.bin": SMALL})
        proxy.site.timeOut = 0.5
        await self._exchange(proxy, get("/files/a.bin"))
        raw = await self.raw_client(proxy)
        raw.send(get("/files/a.bin"))
        await wait_until(lambda: len(parse_responses(bytes(raw.received))[0]) == 1, 5, "hit")
        await Deferred.fromCoroutine(raw.wait_closed(5.0))

    async def test_bare_lf_on_a_hit_is_one_bad_request(self) -> None:
        """issue 15: a bare LF, bare CR or NUL before a Content-Length, or junk after the
        version, hides no second request on a hit.

        Before, the hit path answered the head and then the "body" as a second request;
        now both paths agree: one 400, the connection closed, nothing replayed.
        """
        _, proxy, hits = await self._recorded()
        smuggled = get("/files/a.bin", b"X-Pad: " + b"p" * 10)
        head = (
            b"GET /files/a.bin HTTP/1.1\r\nHost: proxy\r\nUser-Agent: a\n"
            b"Content-Length: %d\r\n\r\n" % len(smuggled)
        )
        for junk in (
            head,
            head.replace(b"a\n", b"a\r"),
            head.replace(b"a\n", b"a\x00\r\n"),
            head.replace(b"a\n", b"a\r\n").replace(b"HTTP/1.1\r\n", b"HTTP/1.1 junk\r\n", 1),
        ):
            raw = await self.raw_client(proxy)
            raw.send(junk + smuggled)
            await raw.wait_closed(5.0)
            responses, _ = parse_responses(bytes(raw.received))
            self.assertEqual([r.status for r in responses], [400], bytes(raw.received))
        self.assertEqual(hits.answered, 0)

    async def test_host_must_be_an_ascii_host_name(self) -> None:
        """A Host with Unicode digits, two Hosts, or none: 400 on either path, no replay."""
        _, proxy, hits = await self._recorded()
        for head in (
            b"GET /files/a.bin HTTP/1.1\r\nHost: \xd9\xa1\xd9\xa2\r\n\r\n",
            b"GET /files/a.bin HTTP/1.1\r\nHost: proxy\r\nHost: proxy\r\n\r\n",
            b"GET /files/a.bin HTTP/1.1\r\nUser-Agent: a\r\n\r\n",
        ):
            raw = await self.raw_client(proxy)
            raw.send(head)
            await raw.wait_closed(5.0)
            responses, _ = parse_responses(bytes(raw.received))
            self.assertEqual([r.status for r in responses], [400], head)
        self.assertEqual(hits.answered, 0)
        (r,), _ = await self._exchange(proxy, get("/files/a.bin"))
        self.assertEqual((r.status, r.body, hits.answered), (200, SMALL, 1))


class GzipHitTests(IntegrationTestCase):
    """A rewritten document's gzip form, on the hit path too: what a client is replayed
    depends on its Accept-Encoding, in either order."""

    _exchange = HitPathTests._exchange

    async def test_gzip_and_identity_replays(self) -> None:
        await self._replays(compact=False)

    async def test_gzip_and_identity_replays_of_a_relinked_page(self) -> None:
        """A compact page is rewritten by its bytes and compressed in memory."""
        await self._replays(compact=True)

    async def test_first_clients_of_a_relinked_page_get_its_gzip_form(self) -> None:
        """The clients of the fetch itself, not only later hits, are sent the gzip form
        when they take it (a quarter of the bytes), and it is the identity document's."""
        import gzip

        proxy = await self._page_proxy(compact=True)
        accept = b"Accept: application/vnd.pypi.simple.v1+json"
        (first,), _ = await self._exchange(
            proxy, get("/pypi/simple/demo/", accept, b"Accept-Encoding: gzip")
        )
        self.assertEqual(first.headers.get(b"x-cache"), b"MISS")
        self.assertEqual(first.headers.get(b"content-encoding"), b"gzip")
        self.assertIn(b"accept-encoding", first.headers.get(b"vary", b"").lower())
        await proxy.settled()
        (plain,), _ = await self._exchange(proxy, get("/pypi/simple/demo/", accept))
        self.assertEqual(gzip.decompress(first.body), plain.body)
        self.assertIn(b'"url":"http://proxy/pypi/files/demo-1.0.tar.gz"', plain.body)
        (again,), _ = await self._exchange(
            proxy, get("/pypi/simple/demo/", accept, b"Accept-Encoding: gzip")
        )
        self.assertEqual(
            (again.body, again.headers.get(b"etag")), (first.body, first.headers.get(b"etag"))
        )

    async def _page_proxy(self, compact: bool) -> Any:
        """A proxy whose PyPI routes lead to a 100-file PEP 691 page, written compactly
        (relinked in memory) or with spaces (rewritten through the parser)."""
        import json

        upstream = await self.start_upstream()
        files = upstream.url("/files/")
        doc = json.dumps(
            {
                "meta": {"api-version": "1.1"},
                "name": "demo",
                "files": [
                    {"filename": f"demo-1.{i}.tar.gz", "url": f"{files}demo-1.{i}.tar.gz"}
                    for i in range(100)
                ],
            },
            separators=(",", ":") if compact else None,
        ).encode()
        upstream.handlers[b"/index/simple/demo/"] = static(
            doc, [(b"content-type", b"application/vnd.pypi.simple.v1+json")]
        )
        return await self.start_proxy(
            {
                "routes": {
                    "pypi": {"upstream": upstream.url("/index/")},
                    "pypi-files": {"upstream": files},
                }
            }
        )

    async def _replays(self, compact: bool) -> None:
        import gzip

        proxy = await self._page_proxy(compact)
        accept = b"Accept: application/vnd.pypi.simple.v1+json"
        gz = b"Accept-Encoding: gzip"
        raw = await self.raw_client(proxy)
        raw.send(get("/pypi/simple/demo/", accept))
        await wait_until(lambda: len(parse_responses(bytes(raw.received))[0]) >= 1, 10, "miss")
        raw.abort()
        want = parse_responses(bytes(raw.received))[0][0].body
        sep = b":" if compact else b": "
        self.assertIn(b'"url"' + sep + b'"http://proxy/pypi/files/demo-1.0.tar.gz"', want)
        await proxy.settled()
        hits = proxy.site.hit_path
        assert hits is not None
        order = [(), (gz,), (), (gz,), (b"Accept-Encoding: gzip;q=0",), (gz,)]
        for extra in order:
            (response,), _ = await self._exchange(proxy, get("/pypi/simple/demo/", accept, *extra))
            self.assertEqual(response.headers[b"x-cache"], b"HIT")
            if response.headers.get(b"content-encoding") == b"gzip":
                self.assertEqual(extra, (gz,))
                self.assertEqual(gzip.decompress(response.body), want)
            else:
                self.assertNotEqual(extra, (gz,))
                self.assertEqual(response.body, want)
        self.assertGreaterEqual(hits.answered, 3, "replayed by the hit path")
