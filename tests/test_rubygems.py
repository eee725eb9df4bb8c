"""The RubyGems family: compact and full index paths, info files' checksums, and the
proxy serving them (an in-memory proxy against a scripted upstream)."""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed

from pkgproxy import clientconfig
from pkgproxy.config import BUILTIN_ROUTES, Route
from pkgproxy.families import FAMILIES, CacheClass, Expect, rubygems
from pkgproxy.testing import MemoryProxy

ROUTE = Route("rubygems", "rubygems", "/rubygems/", "https://rubygems.org/", index_ttl=300)
UP = "http://upstream.test/rubygems/"

GEM = b"a .gem is a tar archive; these bytes stand in for one"
GEM_SHA = hashlib.sha256(GEM).hexdigest()
INFO = (
    "---\n"
    f"1.0.0 |checksum:{'0' * 64}\n"
    f"1.1.0 other:>= 1.0&< 3,more:~> 2.0|checksum:{GEM_SHA},ruby:>= 2.7\n"
    f"1.1.0-java other:>= 1.0|checksum:{'1' * 64}\n"
    "1.2.0 |ruby:>= 3\n"
).encode()
VERSIONS = b"created_at: 2024-01-01T00:00:00Z\n---\nfix 1.0.0,1.1.0 abc\n"


def header(resp: Any, name: str) -> str | None:
    values = resp.headers.getRawHeaders(name)
    return values[-1] if values else None


class RubyGemsPolicyTests(SynchronousTestCase):
    def test_classes(self) -> None:
        """Gems and gemspecs are immutable; every index is revalidated after index_ttl and
        served with its MD5 as ETag; the dependency API is answered 404 here."""
        for path in ("gems/rails-7.1.0.gem", "gems/nokogiri-1.16.0-x86_64-linux.gem"):
            self.assertEqual(rubygems.classify(ROUTE, path).cache_class, CacheClass.IMMUTABLE)
        spec = "quick/Marshal.4.8/rails-7.1.0.gemspec.rz"
        self.assertEqual(rubygems.classify(ROUTE, spec).cache_class, CacheClass.IMMUTABLE)
        for path in (
            "",
            "versions",
            "names",
            "info/rails",
            "specs.4.8.gz",
            "latest_specs.4.8.gz",
            "prerelease_specs.4.8.gz",
            "specs.4.8",
        ):
            d = rubygems.classify(ROUTE, path)
            self.assertEqual(
                (d.cache_class, d.ttl, d.etag_digest), (CacheClass.MUTABLE, 300, "md5")
            )
        d = rubygems.classify(ROUTE, "api/v1/dependencies")
        assert d.local is not None
        self.assertEqual(d.local.status, 404)
        self.assertEqual(
            rubygems.classify(ROUTE, "api/v1/gems/rails.json").cache_class, CacheClass.PASS
        )

    def test_info_teaches_checksums(self) -> None:
        """Each version line's checksum: is the sha256 of its .gem (platform in the name)."""
        self.assertEqual(
            rubygems.parse_info("fix", INFO.decode().splitlines()),
            [
                ("fix-1.0.0.gem", "0" * 64),
                ("fix-1.1.0.gem", GEM_SHA),
                ("fix-1.1.0-java.gem", "1" * 64),
            ],
        )
        pieces = [INFO[i : i + 5] for i in range(0, len(INFO), 5)]
        items = rubygems.learn("info/fix", pieces, ROUTE.upstream + "info/fix")
        self.assertIn(
            (ROUTE.upstream + "gems/fix-1.1.0.gem", Expect(None, {"sha256": GEM_SHA})), items
        )
        self.assertTrue(rubygems.learns("info/fix"))
        self.assertFalse(rubygems.learns("versions"))

    def test_registered(self) -> None:
        self.assertIs(FAMILIES["rubygems"], rubygems.FAMILY)
        [route] = [r for r in BUILTIN_ROUTES if r.family == "rubygems"]
        self.assertEqual((route.prefix, route.upstream), ("/rubygems/", "https://rubygems.org/"))

    def test_snippets(self) -> None:
        """``gem``: the route as the only source; ``bundler``: a mirror of rubygems.org."""
        target = clientconfig.Target("http://cache:3142", {r.name: r for r in BUILTIN_ROUTES})
        gem = clientconfig.gem(target)
        self.assertIn(":sources:\n- http://cache:3142/rubygems/\n", gem.text)
        bundler = clientconfig.bundler(target)
        self.assertIn(
            'BUNDLE_MIRROR__HTTPS://RUBYGEMS__ORG/: "http://cache:3142/rubygems/"', bundler.text
        )


class RubyGemsProxyTests(SynchronousTestCase):
    """The RubyGems route through the in-memory proxy."""

    def setUp(self) -> None:
        self.proxy = MemoryProxy(
            {"routes": {"rubygems": {"upstream": UP, "index_ttl": "60s"}}},
            cache_dir=self.mktemp(),
        )
        self.addCleanup(self.proxy.close)
        self.up = self.proxy.upstream

    def test_versions_ranges_and_etag(self) -> None:
        """bundler's update of /versions: a Range and If-None-Match answered from the
        stored copy, whose ETag is the MD5 bundler checks its own copy against."""
        self.up.add("/rubygems/versions", VERSIONS, etag=b'"upstream-etag"')
        resp, body = self.proxy.get("/rubygems/versions")
        self.assertEqual(body, VERSIONS)
        self.assertIsNone(header(resp, "etag"))  # not known until the body is complete
        md5 = f'"{hashlib.md5(VERSIONS).hexdigest()}"'
        resp, body = self.proxy.get("/rubygems/versions", {"Range": "bytes=10-"})
        self.assertEqual((resp.code, body, header(resp, "etag")), (206, VERSIONS[10:], md5))
        self.assertEqual(header(resp, "x-cache"), "HIT")
        resp, _ = self.proxy.get("/rubygems/versions", {"If-None-Match": md5, "Range": "bytes=5-"})
        self.assertEqual(resp.code, 304)
        self.assertEqual(self.up.count("/rubygems/versions"), 1)
        # Revalidated as an index: a longer file after the TTL; stale when down.
        longer = VERSIONS + b"fix 1.2.0 def\n"
        self.up.add("/rubygems/versions", longer, etag=b'"upstream-2"')
        self.proxy.clock.advance(61)
        # While it is fetched again a Range gets the whole body, without an ETag (which
        # bundler takes as "start again"); from the new stored copy, the part.
        tail = {"Range": f"bytes={len(VERSIONS) - 1}-"}
        resp, body = self.proxy.get("/rubygems/versions", tail)
        self.assertEqual((resp.code, body, header(resp, "etag")), (200, longer, None))
        resp, body = self.proxy.get("/rubygems/versions", tail)
        self.assertEqual((resp.code, body), (206, longer[len(VERSIONS) - 1 :]))
        self.assertEqual(header(resp, "etag"), f'"{hashlib.md5(longer).hexdigest()}"')
        self.proxy.clock.advance(61)
        self.up.down = True
        resp, body = self.proxy.get("/rubygems/versions")
        self.assertEqual((resp.code, body), (200, longer))

    def test_gem_checked_against_info(self) -> None:
        """Once info/<gem> is cached, a .gem that is not its checksum is refused and not
        kept; the right one is."""
        self.up.add("/rubygems/info/fix", INFO)
        self.proxy.get("/rubygems/info/fix")
        self.up.add("/rubygems/gems/fix-1.1.0.gem", GEM + b"!")
        self.assertRaises(ResponseFailed, self.proxy.get, "/rubygems/gems/fix-1.1.0.gem")
        self.assertIsNone(self.proxy.store.peek("rubygems:gems/fix-1.1.0.gem"))
        self.up.add("/rubygems/gems/fix-1.1.0.gem", GEM)
        resp, body = self.proxy.get("/rubygems/gems/fix-1.1.0.gem")
        self.assertEqual((resp.code, body), (200, GEM))
        self.proxy.clock.advance(10**6)
        resp, body = self.proxy.get("/rubygems/gems/fix-1.1.0.gem")
        self.assertEqual((body, header(resp, "x-cache")), (GEM, "HIT"))

    def test_dependency_api_not_asked(self) -> None:
        resp, _ = self.proxy.get("/rubygems/api/v1/dependencies?gems=fix")
        self.assertEqual(resp.code, 404)
        self.assertEqual(self.up.seen, [])

    def test_root_head_stored(self) -> None:
        """RubyGems' HEAD of the root (is there a compact index?) is fetched as a GET and
        stored, so that it is answered when the upstream is down."""
        self.up.add("/rubygems/", b"<html>rubygems</html>")
        resp, _ = self.proxy.get("/rubygems/", method="HEAD")
        self.assertEqual(resp.code, 200)
        self.assertEqual(self.up.count("/rubygems/", b"GET"), 1)
        self.proxy.clock.advance(61)
        self.up.down = True
        resp, _ = self.proxy.get("/rubygems/", method="HEAD")
        self.assertEqual((resp.code, header(resp, "x-cache")), (200, "STALE"))
        self.assertEqual(self.up.count("/rubygems/", b"HEAD"), 0)
