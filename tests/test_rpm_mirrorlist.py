"""dnf's ``mirrorlist=`` answers (Rocky's, AlmaLinux's) rewritten to name this proxy."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from twisted.trial.unittest import SynchronousTestCase

from pkgproxy.config import Route
from pkgproxy.families import CacheClass, RewriteContext, rpm
from pkgproxy.rewrite.metalink import rewrite_metalink
from pkgproxy.rewrite.mirrorlist import MAX_MIRRORLIST, MirrorlistError, rewrite_mirrorlist
from pkgproxy.testing import MemoryProxy
from pkgproxy.web.routing import RouteTable

BASE = "http://cache:3142"
ROCKY_PAGE = "https://mirrors.rockylinux.org/mirrorlist?arch=x86_64&repo=BaseOS-9"
ALMA_PAGE = "https://mirrors.almalinux.org/mirrorlist/9/baseos"

#: As MirrorManager answers Rocky's ``mirrorlist?arch=x86_64&repo=BaseOS-9``: a comment
#: naming the repo, then mirrors by preference. The first one names no tree this proxy
#: knows (at the root of its host), the second is reachable by the ``/rocky/`` tree.
ROCKY = b"""# repo = rocky-BaseOS-9.5 arch = x86_64 country = DE country = AT country = CH
https://ftp.example.de/9.5/BaseOS/x86_64/os/
https://mirror.example.at/pub/rocky/9.5/BaseOS/x86_64/os/
http://rocky.mirror.example.ch/9.5/BaseOS/x86_64/os/
"""

#: As AlmaLinux answers ``mirrorlist/9/baseos``: no comments, ``$basearch`` left for dnf.
ALMA = b"""https://almalinux.mirror.example.nl/9.5/BaseOS/$basearch/os/
https://mirror.example.se/almalinux/9.5/BaseOS/$basearch/os/
https://repo.almalinux.org/almalinux/9.5/BaseOS/$basearch/os/
"""


class MirrorlistTests(SynchronousTestCase):
    def _rewrite(self, raw: bytes, base: str | None = BASE, page: str = ROCKY_PAGE) -> str:
        """The rewritten answer for ``raw``, named for a client reaching the proxy at
        ``base`` (``None``: as an HTTP proxy) through the RPM family's built-in routes."""
        src, out = self.mktemp(), self.mktemp()
        with open(src, "wb") as f:
            f.write(raw)
        table = RouteTable(rpm.ROUTES)
        rewrite_mirrorlist(src, out, RewriteContext(page, lambda u: table.public_url(u, base)))
        with open(out, encoding="utf-8") as f:
            return f.read()

    def test_classified_as_rewritten_index(self) -> None:
        """Rocky's ``mirrorlist`` (its query is the repo and arch) and AlmaLinux's
        ``mirrorlist/<release>/<repo>`` are revalidated after the route's TTL and
        rewritten; other paths named so are not."""
        route = Route("r", "rpm", "/r/", "https://mirrors.test/", index_ttl=300)
        for path in ("mirrorlist", "mirrorlist/9/baseos", "mirrorlist/10-kitten/appstream"):
            d = rpm.classify(route, path)
            self.assertEqual(
                (d.cache_class, d.ttl, d.rewrite),
                (CacheClass.MUTABLE, 300, rewrite_mirrorlist),
                path,
            )
        for path in ("mirrorlist/9", "mirrorlist/9/baseos/x", "9/mirrorlist", "mirrorlist.txt"):
            self.assertIsNone(rpm.classify(route, path).rewrite, path)

    def test_builtin_routes(self) -> None:
        """The mirrorlist hosts have built-in routes, by path and as an HTTP proxy."""
        table = RouteTable(rpm.ROUTES)
        for url, want in (
            ("http://mirrors.rockylinux.org/mirrorlist?arch=x86_64&repo=BaseOS-9", "rocky"),
            ("http://mirrors.almalinux.org/mirrorlist/9/baseos", "almalinux"),
        ):
            route, rest = table.resolve(url)
            self.assertEqual(route.name, f"{want}-mirrorlist")
            self.assertEqual(route.upstream + rest, "https" + url[4:])
            route, rest = table.resolve(f"/{want}-mirrorlist/{rest}")
            self.assertEqual(route.name, f"{want}-mirrorlist")

    def test_rocky_first_mirror_a_route_serves_by_its_tree(self) -> None:
        """The first mirror whose path names a tree of a route (``/rocky/``, the master
        host's ``/pub/rocky/``) is the one: the answer is this proxy's URL alone."""
        self.assertEqual(self._rewrite(ROCKY), f"{BASE}/rocky/9.5/BaseOS/x86_64/os/\n")

    def test_rockylinux_tree(self) -> None:
        """Many Rocky mirrors keep the tree as ``/rockylinux/``: the same layout."""
        raw = b"https://mirror.example.fr/pub/linux/rockylinux/9.5/BaseOS/x86_64/os/\n"
        self.assertEqual(self._rewrite(raw), f"{BASE}/rocky/9.5/BaseOS/x86_64/os/\n")

    def test_doubled_slashes_in_a_tree(self) -> None:
        """A mirror that writes ``/pub/rocky//9.5/`` maps to the master host's one-slash
        path, the same URL (and cache entry) as every other mirror's."""
        raw = b"https://mirror.example.us/pub/rocky//9.5//BaseOS/x86_64/os/\n"
        self.assertEqual(self._rewrite(raw), f"{BASE}/rocky/9.5/BaseOS/x86_64/os/\n")

    def test_almalinux_keeps_basearch_for_dnf(self) -> None:
        """AlmaLinux's path-style answer, with ``$basearch`` left as dnf fills it in."""
        self.assertEqual(
            self._rewrite(ALMA, page=ALMA_PAGE),
            f"{BASE}/almalinux/9.5/BaseOS/$basearch/os/\n",
        )

    def test_master_host_served_directly(self) -> None:
        """A mirror that is a route's upstream maps directly; as an HTTP proxy the client
        is given the route's forward prefix."""
        raw = b"http://unknown.example/x/\nhttps://dl.rockylinux.org/pub/rocky/9/AppStream/x86_64/os/\n"
        self.assertEqual(self._rewrite(raw), f"{BASE}/rocky/9/AppStream/x86_64/os/\n")
        self.assertEqual(
            self._rewrite(raw, base=None),
            "http://dl.rockylinux.org/pub/rocky/9/AppStream/x86_64/os/\n",
        )

    def test_comments_blank_lines_crlf_bom(self) -> None:
        """Comments (anywhere), blank and indented lines, CRLF and a UTF-8 BOM are fine."""
        raw = (
            b"\xef\xbb\xbf# repo = rocky-AppStream-9.5 arch = aarch64\r\n\r\n"
            b"  # some more words\r\n\t\r\n"
            b"  https://mirror.example.at/pub/rocky/9.5/AppStream/aarch64/os/  \r\n"
            b"# trailer\r\n"
        )
        self.assertEqual(self._rewrite(raw), f"{BASE}/rocky/9.5/AppStream/aarch64/os/\n")

    def test_dot_segments_are_not_followed(self) -> None:
        """A mirror whose path climbs out of its tree is passed over, for the next one."""
        raw = (
            b"https://mirror.example.at/pub/rocky/../../npm/x/\n"
            b"https://repo.almalinux.org/almalinux/./9.5/\n"
            b"https://mirror.example.at/pub/rocky/9.5/BaseOS/x86_64/os/\n"
        )
        self.assertEqual(self._rewrite(raw), f"{BASE}/rocky/9.5/BaseOS/x86_64/os/\n")

    def test_release_tree_at_the_root_of_a_mirror(self) -> None:
        """Only mirrors that keep the release tree at the root of their host: the master
        host's tree of the mirrorlist service's distribution (Rocky's for Rocky's
        service, AlmaLinux's for AlmaLinux's), through its route."""
        raw = b"https://a.example/linux/\nhttps://b.example//9.5/BaseOS/x86_64/os/\n"
        self.assertEqual(self._rewrite(raw), f"{BASE}/rocky/9.5/BaseOS/x86_64/os/\n")
        raw = b"https://almalinux.mirror.example.nl/10-kitten/AppStream/$basearch/os/\n"
        self.assertEqual(
            self._rewrite(raw, page=ALMA_PAGE),
            f"{BASE}/almalinux/10-kitten/AppStream/$basearch/os/\n",
        )
        self.assertEqual(
            self._rewrite(raw, base=None, page=ALMA_PAGE),
            "http://repo.almalinux.org/almalinux/10-kitten/AppStream/$basearch/os/\n",
        )

    def test_nothing_served_is_an_error(self) -> None:
        """No listed mirror is a route's, as it is, by a tree, or at the root of its host
        for a mirrorlist service this proxy knows: a clear error."""
        for raw, page in (
            (b"https://a.example/9/BaseOS/x86_64/os/\n", "https://mirrors.example/mirrorlist"),
            (b"https://a.example/BaseOS/9/\nrsync://b.example/linux/9/\n", ROCKY_PAGE),
            (b"https://a.example/9/../../npm/x/\n", ROCKY_PAGE),
        ):
            with self.assertRaises(MirrorlistError) as e:
                self._rewrite(raw, page=page)
            self.assertIn("no route of this proxy serves any mirror", str(e.exception))

    def test_not_a_mirrorlist_is_an_error(self) -> None:
        """Empty, only comments, binary, an HTML error page: one line saying which."""
        for raw, words in (
            (b"", "is empty"),
            (b" \n\n", "is empty"),
            (b"# repo = rocky-Nope-9 arch = x86_64 error: invalid repo\n", "lists no mirror"),
            (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xff", "not text"),
            (b"https://ok.example/rocky/\x00\n", "not text"),
            (b"<!DOCTYPE html>\n<html><body>502</body></html>\n", "line 1 "),
            (b"# ok\nhttps://a.example/rocky/ https://b.example/rocky/\n", "line 2 "),
            (b"https:///rocky/9/\n", "not a URL"),
        ):
            with self.assertRaises(MirrorlistError) as e:
                self._rewrite(raw)
            message = str(e.exception)
            self.assertIn(words, message, raw)
            self.assertNotIn("\n", message)
            self.assertIsInstance(e.exception, ValueError)

    def test_size_bound(self) -> None:
        """A document over :data:`MAX_MIRRORLIST` bytes is refused, even if its first
        line is good; one just under the bound is read."""
        line = b"https://mirror.example.at/pub/rocky/9.5/BaseOS/x86_64/os/\n"
        comment = b"#" * 99 + b"\n"
        fits = line + comment * ((MAX_MIRRORLIST - len(line)) // len(comment))
        self.assertLessEqual(len(fits), MAX_MIRRORLIST)
        self.assertEqual(self._rewrite(fits), f"{BASE}/rocky/9.5/BaseOS/x86_64/os/\n")
        with self.assertRaises(MirrorlistError) as e:
            self._rewrite(fits + comment * 20)
        self.assertIn("over 256 KiB", str(e.exception))

    def test_metalink_shares_the_trees(self) -> None:
        """Rocky's metalink (MirrorManager serves both forms) finds the proxy by the same
        trees."""
        raw = b"""<?xml version="1.0" encoding="utf-8"?>
<metalink version="3.0" xmlns="http://www.metalinker.org/" type="dynamic">
 <files><file name="repomd.xml"><verification><hash type="sha256">aa</hash></verification>
  <resources>
   <url protocol="https" type="https">https://mirror.example.at/pub/rocky/9.5/BaseOS/x86_64/os/repodata/repomd.xml</url>
  </resources></file></files>
</metalink>
"""
        src, out = self.mktemp(), self.mktemp()
        with open(src, "wb") as f:
            f.write(raw)
        table = RouteTable(rpm.ROUTES)
        rewrite_metalink(src, out, RewriteContext("", lambda u: table.public_url(u, BASE)))
        urls = [u.text for u in ET.parse(out).getroot().iter("{http://www.metalinker.org/}url")]
        self.assertEqual(urls, [f"{BASE}/rocky/9.5/BaseOS/x86_64/os/repodata/repomd.xml"])


class MirrorlistThroughProxyTests(SynchronousTestCase):
    """The built-in ``rocky-mirrorlist`` route, in front of a fake MirrorManager."""

    QUERY = "mirrorlist?arch=x86_64&repo=BaseOS-9"

    def setUp(self) -> None:
        self.proxy = MemoryProxy(
            {"routes": {"rocky-mirrorlist": {"upstream": "http://upstream.test/mm/"}}},
            cache_dir=self.mktemp(),
        )
        self.addCleanup(self.proxy.close)
        self.up = self.proxy.upstream

    def test_answer_cached_and_a_bad_one_never_replaces_it(self) -> None:
        """The rewritten answer is cached per query; once stale, an upstream answer that
        is not a mirrorlist leaves the cached one in place (served stale); a new query
        answered so is a 502 saying why, and nothing is stored."""
        self.up.add(f"/mm/{self.QUERY}", ROCKY)
        resp, body = self.proxy.get(f"/rocky-mirrorlist/{self.QUERY}")
        self.assertEqual(resp.code, 200)
        lines = body.decode().splitlines()
        self.assertEqual(len(lines), 1, body)
        self.assertTrue(lines[0].endswith("/rocky/9.5/BaseOS/x86_64/os/"), body)
        self.assertEqual(len(self.proxy.store), 1)

        self.up.add(f"/mm/{self.QUERY}", b"<html><body>maintenance</body></html>")
        self.proxy.clock.advance(24 * 3600)
        resp, again = self.proxy.get(f"/rocky-mirrorlist/{self.QUERY}")
        self.assertEqual((resp.code, again), (200, body))
        self.assertEqual(self.up.count(f"/mm/{self.QUERY}"), 2)
        self.assertEqual(len(self.proxy.store), 1)

        other = "mirrorlist?arch=x86_64&repo=Nope-9"
        self.up.add(f"/mm/{other}", b"<html><body>maintenance</body></html>")
        resp, error = self.proxy.get(f"/rocky-mirrorlist/{other}")
        self.assertEqual(resp.code, 502)
        self.assertIn(b"cannot rewrite", error)
        self.assertIn(b"not a URL", error)
        self.assertEqual(len(self.proxy.store), 1)
