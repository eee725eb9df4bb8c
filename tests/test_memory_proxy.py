"""The in-memory proxy is the server as twistd runs it: its site, hit path, limits and
upstream client, with connections made in memory on a fake clock."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from pkgproxy.testing import MemoryProxy
from pkgproxy.web.site import ProxySite

BODY = b"deb" * 1000
PATH = "/debian/pool/main/a/a_1_all.deb"


class MemoryProxyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = MemoryProxy(
            {"routes": {"debian": {"upstream": "http://upstream.test/debian/"}}},
            cache_dir=self.mktemp(),
        )
        self.addCleanup(self.proxy.close)
        self.proxy.upstream.add(PATH, BODY)

    def test_repeated_hit_takes_the_hit_path(self) -> None:
        """The first hit is twisted.web's and recorded; the next one on the kept
        connection is answered by the hit path (web/fast.py), with the same bytes."""
        hits = self.proxy.root.hit_path
        answers = [self.proxy.get(PATH) for _ in range(3)]
        self.assertEqual([body for _, body in answers], [BODY] * 3)
        cache = [r.headers.getRawHeaders("x-cache") for r, _ in answers]
        self.assertEqual(cache, [["MISS"], ["HIT"], ["HIT"]])
        self.assertEqual(hits.answered, 1)
        self.assertEqual(self.proxy.upstream.count(PATH), 1)
        self.assertEqual(len(self.proxy.observed.requests), 3)

    def test_site_limits_apply(self) -> None:
        """Requests meet :class:`ProxySite`'s framing rules: no Host in HTTP/1.1 is a 400."""
        self.assertIsInstance(self.proxy.site, ProxySite)
        out = self.proxy.raw(b"GET " + PATH.encode() + b" HTTP/1.1\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out)
        self.assertIn(b"Host header", out)
        self.assertEqual(self.proxy.upstream.seen, [])

    def test_upstream_connection_kept(self) -> None:
        """The upstream client's pool keeps its connection: two misses, one connection."""
        self.proxy.upstream.add("/debian/pool/main/b/b_1_all.deb", b"b")
        self.proxy.get(PATH)
        self.proxy.get("/debian/pool/main/b/b_1_all.deb")
        self.assertEqual(len(self.proxy.upstream.seen), 2)
        upstream = [
            port for reactor, port in self.proxy.network.made if reactor is self.proxy.clock
        ]
        self.assertEqual(upstream, [80])

    def test_parsed_heads_kept_and_bounded(self) -> None:
        """A head the hit path parsed is kept for its next hit, yet a site allowing fewer
        header lines than it has still leaves it to twisted.web, and no more than
        ``MAX_HEADS`` heads are kept."""
        from pkgproxy.web import fast

        hits = self.proxy.root.hit_path
        head = b"GET %s HTTP/1.1\r\nHost: proxy.test\r\n" % PATH.encode()
        many = head + b"".join(b"Accept-Language: l%d\r\n" % i for i in range(5)) + b"\r\n"
        self.proxy.get(PATH)  # MISS
        first = self.proxy.raw(many)  # recorded by twisted.web
        second = self.proxy.raw(many)
        self.assertTrue(second.startswith(b"HTTP/1.1 200 OK\r\n"), second)
        self.assertTrue(second.endswith(b"\r\n\r\n" + BODY))
        self.assertTrue(first.endswith(b"\r\n\r\n" + BODY))
        self.assertEqual(hits.answered, 1)
        self.assertIn(many[:-4], hits._heads)
        self.proxy.site.max_headers = 5
        refused = self.proxy.raw(many)
        self.assertTrue(refused.startswith(b"HTTP/1.1 400 "), refused)
        self.assertEqual(hits.answered, 1)
        self.patch(fast, "MAX_HEADS", 3)
        self.proxy.site.max_headers = 100
        for i in range(7):
            self.proxy.raw(head + b"User-Agent: a%d\r\n\r\n" % i)
        self.assertLessEqual(len(hits._heads), 3)
        self.assertEqual(hits.answered, 8)
