"""Family policies and the shared HTTP rules, as plain functions."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from pkgproxy import httputil
from pkgproxy.config import Route
from pkgproxy.families import CacheClass, debian, generic
from tests.support.pgp import armour as _armour
from tests.support.pgp import sig_v3 as _sig_v3
from tests.support.pgp import sig_v4 as _sig_v4

ROUTE = Route("debian", "debian", "/debian/", "https://deb.debian.org/debian/", index_ttl=60)
HEX = "87e7e94047fb7fb6f4ceecc7022d4bee55b66031cc2a7666d3196f3e0aabb846"


class DebianTests(SynchronousTestCase):
    def test_immutable(self) -> None:
        """Pool files, by-hash indexes and PDiff patches are immutable."""
        for path in (
            "pool/main/c/ca-certificates/ca-certificates_20230311+deb12u1_all.deb",
            "pool/main/h/hello/hello_2.10.orig.tar.gz",
            "pool/main/h/hello/hello_2.10-3.dsc",
            "dists/bookworm/main/binary-amd64/Packages.diff/T-2026-11-26-0200.00-F-2026.gz",
        ):
            self.assertEqual(debian.classify(ROUTE, path).cache_class, CacheClass.IMMUTABLE, path)

    def test_by_hash_names_its_digest(self) -> None:
        """A by-hash URL carries the digest its body must have."""
        d = debian.classify(ROUTE, f"dists/bookworm-updates/main/binary-amd64/by-hash/SHA256/{HEX}")
        self.assertEqual((d.cache_class, d.digests), (CacheClass.IMMUTABLE, {"sha256": HEX}))
        d = debian.classify(ROUTE, "dists/x/main/by-hash/SHA256/abcd")
        self.assertNotEqual(d.cache_class, CacheClass.IMMUTABLE)

    def test_indexes_are_mutable(self) -> None:
        """Release files and indexes are revalidated after the route's TTL."""
        for path in (
            "dists/bookworm/InRelease",
            "dists/bookworm/Release.gpg",
            "dists/bookworm/main/binary-amd64/Packages.xz",
            "dists/bookworm/main/binary-amd64/Packages.diff/Index",
            "dists/bookworm/main/i18n/Translation-en.bz2",
            "README",
        ):
            d = debian.classify(ROUTE, path)
            self.assertEqual((d.cache_class, d.ttl), (CacheClass.MUTABLE, 60), path)

    def test_release_and_its_signature_are_a_pair(self) -> None:
        """A new Release makes its detached Release.gpg due; InRelease signs itself."""
        d = debian.classify(ROUTE, "dists/bookworm/Release")
        self.assertEqual(d.revalidate_also, ("dists/bookworm/Release.gpg",))
        for path in ("dists/bookworm/InRelease", "dists/bookworm/Release.gpg", "README"):
            self.assertEqual(debian.classify(ROUTE, path).revalidate_also, (), path)

    def test_release_files_carry_their_date(self) -> None:
        """InRelease and Release are compared by their Date field (Release.gpg by its
        signature's time, below); the other indexes are not compared."""
        signed = (
            b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\nOrigin: Debian\n"
            b"Suite: stable\nDate: Sat, 10 Feb 2024 09:24:50 UTC\n"
            b"Valid-Until: Sat, 17 Feb 2024 09:24:50 UTC\nSHA256:\n abc 1 main/x\n"
        )
        for path in ("dists/bookworm/InRelease", "dists/bookworm/Release"):
            version_of = debian.classify(ROUTE, path).version_of
            assert version_of is not None, path
            self.assertEqual(version_of(signed), 1707557090.0)
            self.assertIsNone(version_of(b"Origin: Debian\nSuite: stable\n"))
            self.assertIsNone(version_of(b"Date: not a date\n"))
        for path in ("dists/bookworm/main/binary-all/Packages", "README"):
            self.assertIsNone(debian.classify(ROUTE, path).version_of, path)

    def test_release_signature_carries_its_time(self) -> None:
        """A detached Release.gpg is compared by its newest signature's creation time,
        armoured or not, old or new packet format, version 4 or 3."""
        t1, t2 = 1_700_000_000, 1_700_600_000
        armoured = _armour(_sig_v4(t1) + _sig_v4(t2, old_format=True))
        version_of = debian.classify(ROUTE, "dists/bookworm/Release.gpg").version_of
        assert version_of is not None
        self.assertEqual(version_of(armoured), float(t2))
        self.assertEqual(version_of(_sig_v4(t1)), float(t1))
        self.assertEqual(version_of(_sig_v3(t2) + _sig_v4(t1)), float(t2))
        for junk in (b"", b"garbage", _armour(b"\x01\x02"), _sig_v4(t1)[:-3], b"-----BEGIN PGP"):
            self.assertIsNone(version_of(junk), junk)
        self.assertIsNone(debian.classify(ROUTE, "dists/bookworm/README.gpg").version_of)

    def test_generic(self) -> None:
        """A generic route is immutable only when configured so."""
        r = Route("f", "generic", "/f/", "http://h/")
        self.assertEqual(generic.classify(r, "x").cache_class, CacheClass.MUTABLE)
        self.assertIsNone(generic.classify(r, "x").ttl)
        r = Route("f", "generic", "/f/", "http://h/", immutable=True)
        self.assertEqual(generic.classify(r, "x").cache_class, CacheClass.IMMUTABLE)


class HttpRuleTests(SynchronousTestCase):
    def test_split_origin(self) -> None:
        """The origin part of an absolute URL ends at its first / ? or #, str or bytes."""
        split = httputil.split_origin
        self.assertEqual(split("http://h:8/a?b"), ("http://h:8", "/a?b"))
        self.assertEqual(split("https://h?q=/x"), ("https://h", "?q=/x"))
        self.assertEqual(split(b"http://[::1]:80#f"), (b"http://[::1]:80", b"#f"))
        self.assertEqual(split(b"http://h"), (b"http://h", b""))
        with self.assertRaises(ValueError):
            split("/relative")

    def test_ranges(self) -> None:
        """Single ranges resolve; malformed or multiple ones mean the whole body."""
        self.assertEqual(httputil.parse_range(b"bytes=0-9", 100), (0, 10))
        self.assertEqual(httputil.parse_range(b"bytes=90-200", 100), (90, 100))
        self.assertEqual(httputil.parse_range(b"bytes=-200", 100), (0, 100))
        self.assertIsNone(httputil.parse_range(b"bytes=0-1,5-6", 100))
        self.assertIsNone(httputil.parse_range(b"items=0-1", 100))
        self.assertIsNone(httputil.parse_range(b"bytes=5-1", 100))
        self.assertRaises(httputil.Unsatisfiable, httputil.parse_range, b"bytes=100-", 100)
        self.assertRaises(httputil.Unsatisfiable, httputil.parse_range, b"bytes=-0", 100)

    def test_client_revalidation(self) -> None:
        """max-age=0, no-cache and Pragma: no-cache ask for an end-to-end check."""
        self.assertTrue(httputil.client_wants_revalidation(b"max-age=0", None))
        self.assertTrue(httputil.client_wants_revalidation(b"no-cache", None))
        self.assertTrue(httputil.client_wants_revalidation(None, b"no-cache"))
        self.assertFalse(httputil.client_wants_revalidation(b"max-age=60", None))
        self.assertFalse(httputil.client_wants_revalidation(None, None))

    def test_freshness(self) -> None:
        """RFC 9111: max-age, then Expires, then 10% of the Last-Modified age."""
        now = 1_800_000_000.0
        date = httputil.http_date(now).encode()
        self.assertEqual(httputil.freshness_lifetime(b"max-age=300", None, date, None, now), 300)
        self.assertEqual(
            httputil.freshness_lifetime(b"s-maxage=5, max-age=300", None, date, None, now), 5
        )
        exp = httputil.http_date(now + 120).encode()
        self.assertEqual(httputil.freshness_lifetime(None, exp, date, None, now), 120)
        lm = httputil.http_date(now - 1000).encode()
        self.assertEqual(httputil.freshness_lifetime(None, None, date, lm, now), 100)
        self.assertEqual(httputil.freshness_lifetime(None, None, date, None, now), 0)
        self.assertEqual(httputil.freshness_lifetime(b"no-cache", exp, date, lm, now), 0)
        self.assertFalse(httputil.storable(b"no-store"))
        self.assertFalse(httputil.storable(b"private, max-age=5"))

    def test_canonical_path(self) -> None:
        """Each segment is decoded and re-encoded one way; dot segments are refused."""
        self.assertEqual(httputil.canonical_path("a/b_1.0%2b2%7e1.deb"), "a/b_1.0+2~1.deb")
        self.assertEqual(httputil.canonical_path("a b/%41"), "a%20b/A")
        for bad in ("a/../b", "a/%2e%2e/b", "a/%2F/b", "a/%00"):
            self.assertRaises(httputil.BadPath, httputil.canonical_path, bad)
