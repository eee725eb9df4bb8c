"""RPM policy, repomd.xml and primary.xml learning, as plain functions."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import xml.etree.ElementTree as ET

import zstandard
from twisted.trial.unittest import SynchronousTestCase

from pkgproxy.config import Route
from pkgproxy.families import FAMILIES, CacheClass, Expect, Facts, RewriteContext, rpm
from pkgproxy.rewrite.metalink import MetalinkError, rewrite_metalink
from pkgproxy.web.routing import RouteTable
from tests.support import pgp

ROUTE = Route("fedora", "rpm", "/fedora/", "https://mirror.test/fedora/linux/", index_ttl=300)
REPO = "releases/40/Everything/x86_64/os/"
SHA = hashlib.sha256(b"primary").hexdigest()

REPOMD = f"""<?xml version="1.0" encoding="UTF-8"?>
<repomd xmlns="http://linux.duke.edu/metadata/repo" xmlns:rpm="http://linux.duke.edu/metadata/rpm">
  <revision>1713868000</revision>
  <data type="primary">
    <checksum type="sha256">{SHA}</checksum>
    <open-checksum type="sha256">{"0" * 64}</open-checksum>
    <location href="repodata/{SHA}-primary.xml.zst"/>
    <timestamp>1713867000</timestamp>
    <size>534</size>
    <open-size>1011</open-size>
  </data>
  <data type="group">
    <checksum type="sha">{"a" * 40}</checksum>
    <location href="repodata/comps.xml"/>
    <timestamp>1713867500</timestamp>
    <size>12</size>
  </data>
  <data type="bad"><checksum type="sha256">{"b" * 64}</checksum>
    <location href="../../etc/passwd"/><size>1</size></data>
</repomd>
""".encode()

PRIMARY = f"""<?xml version="1.0" encoding="UTF-8"?>
<metadata xmlns="http://linux.duke.edu/metadata/common"
  xmlns:rpm="http://linux.duke.edu/metadata/rpm" packages="3">
<package type="rpm">
  <name>hello</name><arch>noarch</arch>
  <checksum type="sha256" pkgid="YES">{"c" * 64}</checksum>
  <size package="6022" installed="3" archive="300"/>
  <location href="Packages/h/hello-1.0-1.noarch.rpm"/>
  <format><rpm:license>MIT</rpm:license>
    <rpm:provides><rpm:entry name="hello"/></rpm:provides></format>
</package>
<package type="rpm">
  <name>big</name><arch>x86_64</arch>
  <checksum type="sha512" pkgid="YES">{"d" * 128}</checksum>
  <size package="99" installed="3" archive="300"/>
  <location xml:base="https://other.test/repo/" href="Packages/b/big-2-1.x86_64.rpm"/>
</package>
<package type="rpm">
  <name>bad</name><checksum type="sha256">{"e" * 64}</checksum>
  <size package="1"/><location href="/abs.rpm"/>
</package>
</metadata>
""".encode()

COMPRESSORS = {
    "": lambda b: b,
    ".gz": gzip.compress,
    ".xz": lzma.compress,
    ".bz2": bz2.compress,
    ".zst": lambda b: zstandard.ZstdCompressor().compress(b),
}


class RpmPolicyTests(SynchronousTestCase):
    def test_registered(self) -> None:
        """``family = "rpm"`` names this module."""
        self.assertIs(FAMILIES["rpm"], rpm.FAMILY)

    def test_classes(self) -> None:
        """Packages and content-addressed metadata are kept forever; the rest is revalidated."""
        for path in (
            REPO + "Packages/h/hello-1.0-1.noarch.rpm",
            "updates/40/Everything/x86_64/Packages/a/a-1-1.x86_64.rpm",
            "tumbleweed/repo/oss/x86_64/a-1-1.1.x86_64.rpm",
            REPO + "drpms/a-1_2.x86_64.drpm",
            REPO + f"repodata/{SHA}-primary.xml.zst",
            REPO + f"repodata/{SHA}-comps-Everything.x86_64.xml",
        ):
            self.assertEqual(rpm.classify(ROUTE, path).cache_class, CacheClass.IMMUTABLE, path)
        for path in (
            REPO + "repodata/repomd.xml",
            REPO + "repodata/repomd.xml.asc",
            REPO + "repodata/primary.xml.gz",
            REPO + ".treeinfo",
            REPO + "images/pxeboot/vmlinuz",
        ):
            d = rpm.classify(ROUTE, path)
            self.assertEqual((d.cache_class, d.ttl), (CacheClass.MUTABLE, 300), path)

    def test_repomd_pairs_with_signature(self) -> None:
        """repomd.xml brings its .asc along when it changes; neither goes back in time."""
        d = rpm.classify(ROUTE, REPO + "repodata/repomd.xml")
        self.assertEqual(d.revalidate_also, (REPO + "repodata/repomd.xml.asc",))
        assert d.version_of is not None
        self.assertEqual(d.version_of(REPOMD), 1713868000.0)
        no_revision = REPOMD.replace(b"<revision>1713868000</revision>", b"<revision>x</revision>")
        self.assertEqual(d.version_of(no_revision), 1713867500.0)
        self.assertIsNone(d.version_of(b"<html>mirror error</html>"))
        asc = rpm.classify(ROUTE, REPO + "repodata/repomd.xml.asc").version_of
        assert asc is not None
        self.assertEqual(asc(pgp.armour(pgp.sig_v4(1713868001))), 1713868001.0)
        for path in (REPO + "Packages/a.rpm", REPO + "repodata/repomd.xml.asc"):
            self.assertEqual(rpm.classify(ROUTE, path).revalidate_also, (), path)

    def _chunks(self, data: bytes, size: int = 7) -> list[bytes]:
        """``data`` in small pieces, as a reader may hand them over."""
        return [data[i : i + size] for i in range(0, len(data), size)]

    def test_learn_repomd(self) -> None:
        """repomd lists each metadata file's size and checksum; hrefs leaving the repo
        are ignored; the listed files are then checked."""
        url = ROUTE.upstream + REPO + "repodata/repomd.xml"
        self.assertTrue(rpm.learns(REPO + "repodata/repomd.xml"))
        items = rpm.learn(REPO + "repodata/repomd.xml", self._chunks(REPOMD), url)
        root = ROUTE.upstream + REPO
        self.assertEqual(
            items,
            [
                (f"{root}repodata/{SHA}-primary.xml.zst", Expect(534, {"sha256": SHA})),
                (f"{root}repodata/comps.xml", Expect(12, {"sha1": "a" * 40})),
            ],
        )
        facts = Facts()
        facts.add(items)
        d = rpm.classify(ROUTE, REPO + f"repodata/{SHA}-primary.xml.zst", facts)
        self.assertEqual(
            (d.cache_class, d.size, dict(d.digests)), (CacheClass.IMMUTABLE, 534, {"sha256": SHA})
        )
        d = rpm.classify(ROUTE, REPO + "repodata/comps.xml", facts)
        self.assertEqual((d.cache_class, d.size), (CacheClass.MUTABLE, 12))

    def test_learn_primary_every_compression(self) -> None:
        """primary.xml, plain or gz/xz/bz2/zst (told by magic, not name), gives each
        package's size and checksum at its location."""
        root = ROUTE.upstream + REPO
        want = [
            (root + "Packages/h/hello-1.0-1.noarch.rpm", Expect(6022, {"sha256": "c" * 64})),
            (
                "https://other.test/repo/Packages/b/big-2-1.x86_64.rpm",
                Expect(99, {"sha512": "d" * 128}),
            ),
        ]
        for suffix, compress in COMPRESSORS.items():
            path = REPO + f"repodata/{SHA}-primary.xml{suffix}"
            self.assertTrue(rpm.learns(path), path)
            body = self._chunks(compress(PRIMARY))
            self.assertEqual(rpm.learn(path, body, ROUTE.upstream + path), want, suffix)
            self.assertEqual(rpm.learn(path, [compress(PRIMARY)], ROUTE.upstream + path), want)
        facts = Facts()
        facts.add(want)
        d = rpm.classify(ROUTE, REPO + "Packages/h/hello-1.0-1.noarch.rpm", facts)
        self.assertEqual((d.size, dict(d.digests)), (6022, {"sha256": "c" * 64}))

    def test_learns_only_indexes(self) -> None:
        """Filelists, other and the sqlite databases are not read."""
        for path in (
            REPO + f"repodata/{SHA}-filelists.xml.gz",
            REPO + f"repodata/{SHA}-primary.sqlite.bz2",
            REPO + "Packages/h/hello-1.0-1.noarch.rpm",
        ):
            self.assertFalse(rpm.learns(path), path)

    def test_truncated_primary(self) -> None:
        """A primary cut short is an error for the learner to log, not a partial success."""
        body = self._chunks(gzip.compress(PRIMARY)[:-40])
        path = REPO + "repodata/primary.xml.gz"
        self.assertRaises((EOFError, ET.ParseError), rpm.learn, path, body, ROUTE.upstream + path)


UPSTREAM_METALINK = f"""<?xml version="1.0" encoding="utf-8"?>
<metalink version="3.0" xmlns="http://www.metalinker.org/" type="dynamic"
  pubdate="Thu, 03 Dec 2026 09:00:00 GMT" generator="mirrormanager"
  xmlns:mm0="http://fedorahosted.org/mirrormanager">
 <files>
  <file name="repomd.xml">
   <mm0:timestamp>1713868000</mm0:timestamp>
   <size>4321</size>
   <verification>
    <hash type="md5">{"1" * 32}</hash>
    <hash type="sha256">{"2" * 64}</hash>
   </verification>
   <mm0:alternates><mm0:alternate>
     <mm0:timestamp>1713800000</mm0:timestamp><size>4300</size>
     <verification><hash type="sha256">{"3" * 64}</hash></verification>
   </mm0:alternate></mm0:alternates>
   <resources maxconnections="1">
    <url protocol="https" type="https" location="DE" preference="100"
      >https://ftp.example.de/pub/linux/fedora/linux/releases/40/Everything/x86_64/os/repodata/repomd.xml</url>
    <url protocol="rsync" type="rsync" location="DE" preference="99"
      >rsync://ftp.example.de/fedora/linux/releases/40/Everything/x86_64/os/repodata/repomd.xml</url>
   </resources>
  </file>
 </files>
</metalink>
""".encode()


class MetalinkTests(SynchronousTestCase):
    def _rewrite(self, raw: bytes, public: dict[str, str]) -> ET.Element:
        src, out = self.mktemp(), self.mktemp()
        with open(src, "wb") as f:
            f.write(raw)
        ctx = RewriteContext("https://mirrors.fedoraproject.org/metalink?repo=x", public.get)
        rewrite_metalink(src, out, ctx)
        return ET.parse(out).getroot()

    def test_metalink_is_a_rewritten_index(self) -> None:
        """``metalink`` (its query is the repo and arch) is revalidated and rewritten."""
        d = rpm.classify(ROUTE, "metalink")
        self.assertEqual((d.cache_class, d.rewrite), (CacheClass.MUTABLE, rewrite_metalink))

    def test_points_at_the_proxy_with_upstream_checksums(self) -> None:
        """The one mirror is this proxy, found by the tree the mirror URL names; the
        checksums, size, timestamp and alternates of repomd.xml are the upstream's."""
        master = "https://dl.fedoraproject.org/pub/fedora/linux/releases/40/Everything/"
        public = {master + "x86_64/os/repodata/repomd.xml": "http://cache/fedora/r/repomd.xml"}
        root = self._rewrite(UPSTREAM_METALINK, public)
        ns = {"m": "http://www.metalinker.org/", "mm0": "http://fedorahosted.org/mirrormanager"}
        file = root.find("m:files/m:file", ns)
        assert file is not None
        self.assertEqual(file.get("name"), "repomd.xml")
        urls = [u.text for u in file.iterfind("m:resources/m:url", ns)]
        self.assertEqual(urls, ["http://cache/fedora/r/repomd.xml"])
        hashes = {h.get("type"): h.text for h in file.iterfind("m:verification/m:hash", ns)}
        self.assertEqual(hashes, {"md5": "1" * 32, "sha256": "2" * 64})
        self.assertEqual(file.findtext("m:size", namespaces=ns), "4321")
        self.assertEqual(file.findtext("mm0:timestamp", namespaces=ns), "1713868000")
        alt = file.find("mm0:alternates/mm0:alternate", ns)
        assert alt is not None
        self.assertEqual(alt.findtext("m:verification/m:hash", namespaces=ns), "3" * 64)

    def test_unusable_metalinks_are_errors(self) -> None:
        """Not XML, no repomd.xml, or no mirror a route serves: a clear error each."""
        for raw, words in (
            (b"<html>oops", "not XML"),
            (b'<metalink xmlns="http://www.metalinker.org/"><files/></metalink>', "no repomd"),
            (UPSTREAM_METALINK, "no route"),
        ):
            with self.assertRaises(MetalinkError) as e:
                self._rewrite(raw, {})
            self.assertIn(words, str(e.exception))

    def test_public_url_by_forward_prefix(self) -> None:
        """A URL under a route's forward prefix maps to that route, whatever its upstream."""
        local = Route(
            "fedora", "rpm", "/fedora/", "http://127.0.0.1:9/f/",
            forward=("http://dl.test/pub/fedora/linux/", "https://dl.test/pub/fedora/linux/"),
        )  # fmt: skip
        table = RouteTable((local,))
        url = "https://dl.test/pub/fedora/linux/releases/1/repodata/repomd.xml"
        self.assertEqual(
            table.public_url(url, "http://cache:3142"),
            "http://cache:3142/fedora/releases/1/repodata/repomd.xml",
        )
        self.assertEqual(
            table.public_url(url, None),
            "http://dl.test/pub/fedora/linux/releases/1/repodata/repomd.xml",
        )
        self.assertIsNone(table.public_url("https://other.test/pub/fedora/linux/x", None))
