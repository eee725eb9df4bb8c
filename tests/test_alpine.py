"""Alpine policy, APKINDEX parsing and the ``C:`` checksum, as plain functions."""

from __future__ import annotations

import base64
import gzip
import hashlib

from twisted.trial.unittest import SynchronousTestCase

from pkgproxy.config import Route
from pkgproxy.families import CacheClass, Expect, Facts, alpine
from pkgproxy.families.alpine import ApkControlHasher

ROUTE = Route(
    "alpine", "alpine", "/alpine/", "https://dl-cdn.alpinelinux.org/alpine/", index_ttl=300
)


class AlpineTests(SynchronousTestCase):
    def test_classes(self) -> None:
        """Packages and versioned release files are immutable; indexes are revalidated."""
        imm = ("v3.20/main/x86_64/musl-1.2.5-r0.apk", "v3.20/releases/x86_64/alpine-3.20.0.iso")
        for path in imm:
            self.assertEqual(alpine.classify(ROUTE, path).cache_class, CacheClass.IMMUTABLE)
        for path in (
            "v3.20/main/x86_64/APKINDEX.tar.gz",
            "latest-stable/releases/x86_64/latest-releases.yaml",
            "v3.20/releases/x86_64/latest-releases.yaml",
            "MIRRORS.txt",
        ):
            d = alpine.classify(ROUTE, path)
            self.assertEqual((d.cache_class, d.ttl), (CacheClass.MUTABLE, 300), path)

    def test_package_checked_against_index(self) -> None:
        """A package listed in a cached index must have its size and checksum."""
        facts = Facts()
        url = ROUTE.upstream + "v3.20/main/x86_64/a-1-r0.apk"
        facts.add([(url, Expect(10, {"apk-control": "Q1x"}))])
        d = alpine.classify(ROUTE, "v3.20/main/x86_64/a-1-r0.apk", facts)
        self.assertEqual((d.size, dict(d.digests)), (10, {"apk-control": "Q1x"}))
        self.assertTrue(alpine.learns("v3.20/main/x86_64/APKINDEX.tar.gz"))
        self.assertFalse(alpine.learns("v3.20/main/x86_64/a-1-r0.apk"))

    def test_parse_apkindex(self) -> None:
        """Records give file names P-V.apk with S: and C:."""
        text = "C:Q1abc=\nP:musl\nV:1.2.5-r0\nA:x86_64\nS:411\nI:100\n\nP:nosize\nV:1\n\n"
        self.assertEqual(
            alpine.parse_apkindex(text),
            [("musl-1.2.5-r0.apk", 411, "Q1abc="), ("nosize-1.apk", None, None)],
        )

    def test_control_checksum(self) -> None:
        """C: is the SHA-1 of the second gzip stream's raw bytes, whatever the chunking."""
        sig, control = gzip.compress(b"sig" * 50), gzip.compress(b"pkginfo" * 300)
        data = gzip.compress(bytes(range(256)) * 2000)
        whole = sig + control + data
        want = "Q1" + base64.b64encode(hashlib.sha1(control).digest()).decode()
        for step in (1, 13, 4096, len(whole)):
            h = ApkControlHasher()
            for i in range(0, len(whole), step):
                h.update(whole[i : i + step])
            self.assertEqual(h.hexdigest(), want, step)
        h = ApkControlHasher()
        h.update(b"not gzip at all")
        self.assertNotEqual(h.hexdigest(), want)
