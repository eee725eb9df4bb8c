"""The route table in both modes, and the requests a cache must refuse."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from pkgproxy.config import config_from_dict
from pkgproxy.testing import MemoryProxy
from pkgproxy.web.routing import RouteTable

CONFIG = {
    "routes": {
        "debian": {
            "upstream": "http://upstream.test/debian/",
            "forward": ["http://deb.debian.org/debian/", "http://ftp.debian.org/debian/"],
        },
        "ubuntu": {"upstream": "http://upstream.test/ubuntu/"},
    }
}


class RouteTableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.table = RouteTable(config_from_dict(CONFIG).enabled_routes())

    def resolve(self, target: str) -> tuple[str, str]:
        route, rest = self.table.resolve(target)
        return route.name, rest

    def test_reverse_and_forward_meet(self) -> None:
        """A path prefix and an absolute URI name the same route and path."""
        self.assertEqual(self.resolve("/debian/pool/a.deb"), ("debian", "pool/a.deb"))
        self.assertEqual(
            self.resolve("http://deb.debian.org/debian/pool/a.deb"), ("debian", "pool/a.deb")
        )
        self.assertEqual(
            self.resolve("http://DEB.Debian.ORG:80/debian/pool/a.deb"), ("debian", "pool/a.deb")
        )

    def test_builtin_forward_hosts(self) -> None:
        """Built-in routes answer their public hosts, country mirrors included."""
        self.assertEqual(
            self.resolve("http://de.archive.ubuntu.com/ubuntu/dists/noble/InRelease"),
            ("ubuntu", "dists/noble/InRelease"),
        )
        self.assertEqual(
            self.resolve("http://security.ubuntu.com/ubuntu/pool/x.deb"),
            ("ubuntu-security", "pool/x.deb"),
        )
        self.assertEqual(
            self.resolve("http://ports.ubuntu.com/ubuntu-ports/pool/x.deb"),
            ("ubuntu-ports", "pool/x.deb"),
        )
        self.assertEqual(
            self.resolve("http://security.debian.org/debian-security/dists/x/InRelease"),
            ("debian-security", "dists/x/InRelease"),
        )
        self.assertEqual(
            self.resolve("http://dl-cdn.alpinelinux.org/alpine/v3.20/main/x86_64/APKINDEX.tar.gz"),
            ("alpine", "v3.20/main/x86_64/APKINDEX.tar.gz"),
        )

    def test_query_kept(self) -> None:
        """A query string stays with the path."""
        self.assertEqual(self.resolve("http://deb.debian.org/debian/x?a=1"), ("debian", "x?a=1"))


#: Request targets that must be refused, with the status, and never fetched.
REFUSED = [
    ("http://example.org/debian/pool/a.deb", 403),  # unknown host
    ("http://127.0.0.1/debian/pool/a.deb", 403),  # literal IP
    ("http://169.254.169.254/latest/meta-data/", 403),  # cloud metadata
    ("http://deb.debian.org:8080/debian/pool/a.deb", 403),  # another port
    ("http://deb.debian.org/other/pool/a.deb", 403),  # outside the mapped path
    ("http://user:pw@deb.debian.org/debian/pool/a.deb", 403),  # userinfo
    ("http://deb.debian.org@evil.example/debian/pool/a.deb", 403),  # userinfo trick
    ("https://deb.debian.org/debian/pool/a.deb", 403),  # no route has it (http only here)
    ("https://upstream.test:8443/debian/pool/a.deb", 403),  # not the upstream's port
    ("https://evil.example/debian/pool/a.deb", 403),  # unknown https host
    ("ftp://deb.debian.org/debian/pool/a.deb", 400),  # another scheme
    ("http://deb.debian.org:99999/debian/", 400),  # bad port
    ("http:///debian/pool/a.deb", 400),  # no host
    ("/unknown/pool/a.deb", 404),  # unknown reverse prefix
    ("/debian/pool/%2e%2e/%2e%2e/x", 400),  # dot segments
    ("/debian/pool/a%2fb.deb", 400),  # encoded slash
]


class RefusalTests(SynchronousTestCase):
    def test_refused_without_upstream_contact(self) -> None:
        """Each refused target gets its status and a one-line reason; nothing is fetched."""
        proxy = MemoryProxy(CONFIG, cache_dir=self.mktemp())
        self.addCleanup(proxy.close)
        for target, status in REFUSED:
            raw = proxy.raw(f"GET {target} HTTP/1.1\r\nHost: deb.debian.org\r\n\r\n".encode())
            head, _, body = raw.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(f"HTTP/1.1 {status} ".encode()), (target, head))
            self.assertTrue(body.startswith(b"pkgproxy: "), (target, body))
            self.assertEqual(body.count(b"\n"), 1, (target, body))
        self.assertEqual(proxy.upstream.seen, [])
        self.assertEqual(len(proxy.inflight), 0)

    def test_connect_refused(self) -> None:
        """CONNECT gets 405 with a text telling what to use instead."""
        proxy = MemoryProxy(CONFIG, cache_dir=self.mktemp())
        self.addCleanup(proxy.close)
        raw = proxy.raw(b"CONNECT deb.debian.org:443 HTTP/1.1\r\nHost: deb.debian.org\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 405 "), raw)
        self.assertIn(b"http:// sources", raw)
        self.assertEqual(proxy.upstream.seen, [])

    def test_forward_and_reverse_share_one_entry(self) -> None:
        """A file fetched by path is a hit by absolute URI; the Host header is ignored."""
        proxy = MemoryProxy(CONFIG, cache_dir=self.mktemp())
        self.addCleanup(proxy.close)
        proxy.upstream.add("/debian/pool/main/a/a_1_all.deb", b"A")
        proxy.get("/debian/pool/main/a/a_1_all.deb")
        raw = proxy.raw(
            b"GET http://deb.debian.org/debian/pool/main/a/a_1_all.deb HTTP/1.1\r\n"
            b"Host: example.org\r\nProxy-Authorization: Basic dTpw\r\n\r\n"
        )
        self.assertIn(b"X-Cache: HIT", raw)
        self.assertTrue(raw.endswith(b"\r\n\r\nA"), raw)
        self.assertEqual(proxy.upstream.count("/debian/pool/main/a/a_1_all.deb"), 1)

    def test_upstream_urls_share_the_entry(self) -> None:
        """An absolute ``https://`` URI of a route's upstream (what a branch pkgproxy asks
        its parent for), sent in plain HTTP, is the same entry as by path and by an http
        forward prefix: one fetch, whichever way comes first."""
        config = {
            "routes": {
                "mirror": {
                    "family": "generic",
                    "immutable": True,
                    "upstream": "https://upstream.test/mirror/",
                    "forward": ["http://mirror.example/m/"],
                }
            }
        }
        proxy = MemoryProxy(config, cache_dir=self.mktemp())
        self.addCleanup(proxy.close)
        proxy.upstream.add("/mirror/a.bin", b"A")
        proxy.upstream.add("/mirror/b.bin", b"B")
        first = proxy.raw(b"GET https://upstream.test/mirror/a.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"X-Cache: MISS", first)
        self.assertTrue(first.endswith(b"\r\n\r\nA"), first)
        response, body = proxy.get("/mirror/a.bin")
        self.assertEqual((body, response.headers.getRawHeaders("x-cache")), (b"A", ["HIT"]))
        proxy.get("/mirror/b.bin")
        for target in (b"https://UPSTREAM.test:443/mirror/b.bin", b"http://mirror.example/m/b.bin"):
            raw = proxy.raw(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertIn(b"X-Cache: HIT", raw)
            self.assertTrue(raw.endswith(b"\r\n\r\nB"), raw)
        self.assertEqual(proxy.upstream.count("/mirror/a.bin"), 1)
        self.assertEqual(proxy.upstream.count("/mirror/b.bin"), 1)

    def test_loop_through_via_refused(self) -> None:
        """A request whose Via already names this node (its parent leads back to it) is
        a one-line 508, and nothing is fetched; another node's name passes."""
        config = {"node_name": "branch-1", **CONFIG}
        proxy = MemoryProxy(config, cache_dir=self.mktemp())
        self.addCleanup(proxy.close)
        proxy.upstream.add("/debian/pool/c.deb", b"C")
        target = b"GET http://deb.debian.org/debian/pool/c.deb HTTP/1.1\r\nHost: x\r\n"
        raw = proxy.raw(target + b"Via: 1.0 fred, 1.1 Branch-1\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 508 "), head)
        self.assertIn(b"branch-1", body)
        self.assertEqual(body.count(b"\n"), 1, body)
        self.assertEqual(proxy.upstream.seen, [])
        raw = proxy.raw(target + b"Via: 1.1 branch-10, 1.1 parent-1 (x)\r\n\r\n")
        self.assertTrue(raw.endswith(b"\r\n\r\nC"), raw)

    def test_client_credentials_not_forwarded(self) -> None:
        """Authorization and Proxy-* headers from clients never reach the upstream."""
        proxy = MemoryProxy(CONFIG, cache_dir=self.mktemp())
        self.addCleanup(proxy.close)
        proxy.upstream.add("/debian/pool/main/b/b_1_all.deb", b"B")
        proxy.raw(
            b"GET http://deb.debian.org/debian/pool/main/b/b_1_all.deb HTTP/1.1\r\n"
            b"Host: deb.debian.org\r\nAuthorization: Basic dTpw\r\n"
            b"Proxy-Authorization: Basic dTpw\r\nProxy-Connection: keep-alive\r\n"
            b"Cookie: c=1\r\n\r\n"
        )
        sent = proxy.upstream.seen[-1].headers
        for name in (b"authorization", b"proxy-authorization", b"proxy-connection", b"cookie"):
            self.assertNotIn(name, sent)


class FamilyRoutingHookTests(SynchronousTestCase):
    """The table routes by a family's ``route_request`` under its ``prefix_root``,
    knowing nothing of the family (here a made-up one)."""

    def setUp(self) -> None:
        from dataclasses import replace

        from pkgproxy.config.model import Route
        from pkgproxy.families import FAMILIES, Refused

        def route_request(path: str, query: str, routes: dict[str, Route]) -> object:
            if not query.startswith("at="):
                return None
            name = query[3:]
            if name not in routes:
                raise Refused(f"no mirror {name}")
            return routes[name], path[len("/box/") :]

        family = replace(FAMILIES["generic"], prefix_root="/box/", route_request=route_request)
        FAMILIES["box-test"] = family
        self.addCleanup(FAMILIES.pop, "box-test")
        self.one = Route("one", "box-test", "/box/", "http://one.test/")
        self.two = Route("two", "box-test", "/box/two/", "http://two.test/")
        self.table = RouteTable((self.one, self.two))

    def test_hook_names_the_route(self) -> None:
        self.assertEqual(self.table.resolve("/box/a/b?at=two"), (self.two, "a/b"))
        self.assertEqual(self.table.resolve("/box/a/b"), (self.one, "a/b"))
        self.assertEqual(self.table.resolve("/box/two/a"), (self.two, "a"))

    def test_refusal_is_a_403_in_the_family(self) -> None:
        from pkgproxy.web.routing import RouteError

        with self.assertRaises(RouteError) as caught:
            self.table.resolve("/box/a?at=three")
        self.assertEqual(
            (caught.exception.code, caught.exception.family, str(caught.exception)),
            (403, "box-test", "no mirror three"),
        )
