"""Documents rewritten by their bytes alone, and learned from one file's entry at a time.

A PyPI JSON page or an npm packument whose links all start with the upstream prefix is
served with that prefix replaced, without a parse (``prefix.relink``): the result must
be exactly the parsed rewrite, and anything the bytes cannot prove is refused (the
parsing rewriter then runs). What such a document says of a file is read when the file
is asked for, from its own entry (``Family.lookup``), and must be what reading the whole
document teaches. Through the server: a file that does not match its entry is refused,
a new copy of a page replaces what the old one taught, and a file the entry search
cannot find makes the whole page be read.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed

from pkgproxy import deflate
from pkgproxy.cache.keys import PACKED
from pkgproxy.cache.store import CacheStore, Entry
from pkgproxy.config import Route
from pkgproxy.diskpool import DiskPool
from pkgproxy.families import Expect, Facts, npm, pypi
from pkgproxy.fetch import body as fetch_body
from pkgproxy.fetch import fetch
from pkgproxy.learning import Learner
from pkgproxy.rewrite import npm_packument, prefix
from pkgproxy.rewrite.links import Linker
from pkgproxy.rewrite.pypi_simple import V1_JSON
from pkgproxy.testing import MemoryProxy
from tests.support import npmrepo
from tests.support.entries import commit
from tests.support.npmrepo import DEP, SCOPED, NpmPackage
from tests.test_prefix_rewrite import FILES, REGISTRY, context, simple_page
from tests.test_pypi import header

COMPACT = (",", ":")
PAGE_URL = "https://pypi.org/simple/demo/"
PUBLIC_FILES = "http://cache:3142/pypi/files/"


def compact(doc: Any) -> bytes:
    return json.dumps(doc, separators=COMPACT, ensure_ascii=False).encode()


def parsed_pypi_rewrite(data: bytes) -> Any:
    """What the parser makes of a PEP 691 page: every file URL mapped, nothing else."""
    doc = json.loads(data)
    linker = Linker.of(context(PAGE_URL))
    for entry in doc.get("files", []):
        mapped = linker.map(entry["url"])
        if mapped is not None:
            entry["url"] = mapped
    return doc


def parsed_npm_rewrite(data: bytes, page_url: str) -> Any:
    doc = json.loads(data)
    npm_packument.rewrite_document(doc, context(page_url))
    return doc


def full_packument(*versions: NpmPackage) -> dict[str, Any]:
    doc = npmrepo.packument(list(versions), REGISTRY)
    doc["readme"] = 'Use it:\n\n```js\nconst x = require("dep"); // \\o/ \u00e9\n```\n'
    return doc


class RelinkTests(SynchronousTestCase):
    """The bytes alone, or nothing."""

    def test_pypi_page_is_the_parsed_rewrite(self) -> None:
        data = simple_page("demo", 30)
        out = pypi.relink(data, context(PAGE_URL))
        assert out is not None
        self.assertEqual(json.loads(out), parsed_pypi_rewrite(data))
        self.assertIn(b'"url":"' + PUBLIC_FILES.encode() + b"packages/", out)

    def test_json_api_is_rewritten(self) -> None:
        entry = {"filename": "demo-1.0.tar.gz", "url": FILES + "packages/a/demo-1.0.tar.gz"}
        doc = {
            "info": {"name": "demo", "project_url": "https://pypi.org/project/demo/"},
            "urls": [entry],
            "releases": {"1.0": [entry]},
        }
        out = pypi.relink(compact(doc), context("https://pypi.org/pypi/demo/json"))
        assert out is not None
        self.assertEqual(out.count(PUBLIC_FILES.encode()), 2)
        self.assertIn(b"https://pypi.org/project/demo/", out)

    def test_packuments_with_escapes_are_the_parsed_rewrite(self) -> None:
        """A full packument (a readme full of escapes), an abbreviated one, a scoped one."""
        for doc, page in (
            (full_packument(DEP), REGISTRY + DEP.name),
            (npmrepo.packument([DEP], REGISTRY, abbreviated=True), REGISTRY + DEP.name),
            (full_packument(SCOPED), REGISTRY + SCOPED.name.replace("/", "%2f")),
        ):
            data = compact(doc)
            out = npm.relink(data, context(page))
            assert out is not None, page
            self.assertEqual(json.loads(out), parsed_npm_rewrite(data, page))

    def test_refused_where_the_bytes_do_not_prove_it(self) -> None:
        """Each of these takes the parsing rewriter."""
        tarball = REGISTRY + "dep/-/dep-1.0.0.tgz"
        page = REGISTRY + "dep"
        good = {"name": "dep", "versions": {"1.0.0": {"dist": {"tarball": tarball}}}}
        self.assertIsNotNone(npm.relink(compact(good), context(page)))

        def variant(**changes: Any) -> bytes:
            doc = json.loads(compact(good))
            doc["versions"]["1.0.0"]["dist"].update(changes)
            return compact(doc)

        cases = {
            "not compact": json.dumps(good).encode(),
            "a tarball elsewhere": variant(tarball="https://elsewhere.test/dep-1.0.0.tgz"),
            "a relative tarball": variant(tarball="dep/-/dep-1.0.0.tgz"),
            "the prefix in another field": variant(_resolved=tarball),
            "an escaped slash": compact(good).replace(b"/-/", b"\\/-\\/"),
            "a dot segment": variant(tarball=REGISTRY + "dep/-/../evil/-/evil-1.0.0.tgz"),
            "a name spelled with an escape": compact(
                {"name": "dep", "x": {"t\u0061rball": "y"}, **good}
            ).replace(b'"tarball":"y"', b'"t\\u0061rball":"https://elsewhere.test/x.tgz"'),
            "the prefix after an escaped quote": compact(
                {**good, "readme": 'see "' + tarball + '"'}
            ),
            "not an object": b"[" + compact(good) + b"]",
            "no link at all": compact({"name": "dep", "versions": {}}),
        }
        for why, data in cases.items():
            self.assertIsNone(npm.relink(data, context(page)), why)

    def test_escapes_cost_linear_time(self) -> None:
        """A readme of escaped characters (a CJK one, or a hostile registry's) is checked
        in time linear in its length: 400,000 escapes in well under a second (a search
        that rescanned the string from each escape took seconds for 8,000)."""
        tarball = REGISTRY + "dep/-/dep-1.0.0.tgz"
        good = {"name": "dep", "versions": {"1.0.0": {"dist": {"tarball": tarball}}}}
        data = compact(good)[:-1] + b',"readme":"' + b"\\u00e9" * 400_000 + b'"}'
        started = time.process_time()
        out = npm.relink(data, context(REGISTRY + "dep"))
        self.assertLess(time.process_time() - started, 1.0)
        assert out is not None
        self.assertEqual(json.loads(out), parsed_npm_rewrite(data, REGISTRY + "dep"))

    def test_names_spelled_with_escapes(self) -> None:
        for data, key, spelled in (
            (b'{"t\\u0061rball":"x"}', "tarball", True),
            (b'{"\\u0074\\u0061\\u0072\\u0062\\u0061\\u006c\\u006C" :"x"}', "tarball", True),
            (b'{"u\\u0072l":"x"}', "url", True),
            (b'{"t\\u0061rbal":"x"}', "tarball", False),
            (b'{"a":"\\u0074arball","tarball":1}', "tarball", False),
            (b'{"tarball":"\\u0074"}', "tarball", False),
        ):
            self.assertEqual(prefix._spelled_with_escapes(data, key), spelled, data)

    def test_a_page_with_a_link_elsewhere_is_refused(self) -> None:
        doc = json.loads(simple_page("demo", 2))
        doc["files"][0]["url"] = "https://mirror.test/demo-1.0.tar.gz"
        self.assertIsNone(pypi.relink(compact(doc), context(PAGE_URL)))

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["tarball", "readme", "t\u0061rball", "url", "_resolved"]),
                st.one_of(
                    st.text(max_size=12),
                    st.sampled_from(
                        [
                            REGISTRY + "dep/-/dep-1.0.0.tgz",
                            '"' + REGISTRY + "x",
                            "\\" + REGISTRY,
                            REGISTRY + "a/../b",
                            'q":"' + REGISTRY + "x",
                        ]
                    ),
                ),
            ),
            max_size=6,
        ),
        st.booleans(),
    )
    def test_never_other_than_the_parsed_rewrite(
        self, members: list[tuple[str, str]], escape_names: bool
    ) -> None:
        """Whatever the members and their spelling: refused, or the parsed rewrite."""
        page = REGISTRY + "dep"
        versions = {f"1.0.{i}": {"dist": {name: value}} for i, (name, value) in enumerate(members)}
        doc = {"name": "dep", "versions": versions}
        data = json.dumps(doc, separators=COMPACT, ensure_ascii=escape_names).encode()
        out = npm.relink(data, context(page))
        if out is not None:
            self.assertEqual(json.loads(out), parsed_npm_rewrite(data, page))


class EntryTests(SynchronousTestCase):
    """One file's entry, found in the bytes, teaches what the whole document does."""

    def test_every_file_of_a_page(self) -> None:
        data = pypi.relink(simple_page("demo", 12), context(PAGE_URL))
        assert data is not None
        whole = dict(pypi.learn("simple/demo/", [data], PAGE_URL))
        self.assertEqual(len(whole), 36)
        for entry in json.loads(data)["files"]:
            url = entry["url"]
            found = pypi.lookup(data, url, "simple/demo/", PAGE_URL)
            assert found is not None
            self.assertIn(url, dict(found))
            for key, expect in found:
                self.assertEqual(whole[key], expect)

    def test_every_tarball_of_a_packument_with_escapes(self) -> None:
        versions = [NpmPackage(DEP.name, f"2.{i}.0") for i in range(5)]
        page, path = REGISTRY + DEP.name, DEP.name
        data = compact(full_packument(*versions))
        whole = dict(npm.learn(path, [data], page))
        self.assertEqual(len(whole), 5)
        for package in versions:
            url = REGISTRY + package.tarball_path
            found = npm.lookup(data, url, path, page)
            self.assertEqual(found, [(url, whole[url])])

    def test_scoped_tarball(self) -> None:
        page = REGISTRY + SCOPED.name.replace("/", "%2f")
        data = compact(npmrepo.packument([SCOPED], REGISTRY, abbreviated=True))
        url = REGISTRY + SCOPED.tarball_path
        self.assertEqual(
            npm.lookup(data, url, SCOPED.name, page), npm.learn(SCOPED.name, [data], page)
        )

    def test_objects_in_strings_and_arrays(self) -> None:
        data = (
            b'{"a":[{"u":"x{[}]","url":"http://h/p/x.whl","h":{"s":["}"]}},'
            b'"http://h/p/y.whl"],"z":{"url":"http://h/p/z.whl"}}'
        )
        self.assertEqual(
            prefix.entry_at(data, b'/p/x.whl"'),
            [b'{"u":"x{[}]","url":"http://h/p/x.whl","h":{"s":["}"]}}'],
        )
        self.assertEqual(prefix.entry_at(data, b'/p/y.whl"'), [])  # an array holds it
        self.assertEqual(prefix.entry_at(data, b'/p/z.whl"'), [b'{"url":"http://h/p/z.whl"}'])
        self.assertEqual(prefix.entry_at(data, b'x.whl"'), [])  # not surely in a string

    def test_escapes(self) -> None:
        """Escaped quotes and backslashes before and after the link; an escaped
        backslash ending a string."""
        data = (
            b'{"r":"say \\"hi\\" {","dist":{"s":"\\"}\\\\","tarball":"http://h/d/-/d.tgz",'
            b'"t":"\\\\"}}'
        )
        self.assertEqual(
            prefix.entry_at(data, b'/-/d.tgz"'),
            [b'{"s":"\\"}\\\\","tarball":"http://h/d/-/d.tgz","t":"\\\\"}'],
        )
        self.assertEqual(json.loads(prefix.entry_at(data, b'/-/d.tgz"')[0])["s"], '"}\\')
        # The needle inside a string, after an escaped quote: no object is made up.
        fake = b'{"r":"x \\"http://h/d/-/d.tgz","tarball":"http://h/e/-/e.tgz"}'
        for text in prefix.entry_at(fake, b'/-/d.tgz"'):
            self.assertNotIn("http://h/d/-/d.tgz", json.loads(text).values())

    @settings(max_examples=300, deadline=None)
    @given(
        st.dictionaries(
            st.text(max_size=6), st.text(alphabet='"\\{}[],:/ab', max_size=8), max_size=4
        ),
        st.lists(st.text(alphabet='"\\{}[]/ab', max_size=8), max_size=4),
    )
    def test_the_object_around_a_link_whatever_its_neighbours(
        self, siblings: dict[str, str], before: list[str]
    ) -> None:
        link = "http://h/d/-/d.tgz"
        entry = {**siblings, "tarball": link, "nested": {"k": list(siblings.values())}}
        doc = {"before": before, "versions": {"1": {"dist": entry}}, "after": siblings}
        data = compact(doc)
        found = [json.loads(t) for t in prefix.entry_at(data, b'/-/d.tgz"')]
        self.assertIn(entry, found)
        for other in found:
            self.assertEqual(other, entry)

    def test_unclosed_strings_cost_linear_time(self) -> None:
        """Escaped quotes that open no whole string within reach stop the reading; it
        never searches on from each of them."""
        after = b'{"dist":{"tarball":"http://h/d/-/d.tgz",' + b'\\"' * 30_000
        before = b'\\"' * 30_000 + b'{"tarball":"http://h/d/-/d.tgz"}'
        started = time.process_time()
        self.assertEqual(prefix.entry_at(after, b'/-/d.tgz"'), [])
        self.assertEqual(
            prefix.entry_at(before, b'/-/d.tgz"'), [b'{"tarball":"http://h/d/-/d.tgz"}']
        )
        self.assertLess(time.process_time() - started, 0.5)

    def test_file_owners(self) -> None:
        cases = {
            "packages/a/b/Foo_Bar-1.0-py3-none-any.whl": ("foo-bar",),
            "packages/a/b/Foo_Bar-1.0-py3-none-any.whl.metadata": ("foo-bar",),
            "packages/a/b/foo-bar-1.0.tar.gz": ("foo-bar", "foo-bar-1"),
            "packages/a/b/foo-2-1.0.tar.gz": ("foo", "foo-2", "foo-2-1"),
            "packages/a/b/zope.interface-5.0.tar.gz": ("zope-interface", "zope-interface-5"),
        }
        for path, owners in cases.items():
            # Every name the file could belong to by :func:`pypi.owns`, and no other.
            self.assertEqual(pypi.file_owners(path), owners, path)
            for owner in owners:
                self.assertTrue(pypi.owns(owner, path), (owner, path))
        self.assertEqual(npm.file_owners("@s/n/-/n-1.0.0.tgz"), ("@s/n",))
        self.assertEqual(npm.file_owners("n"), ())

    def test_gzip_form_reads_as_gzip(self) -> None:
        data = simple_page("demo", 50)
        self.assertEqual(gzip.decompress(deflate.compress(data)), data)
        packed = gzip.compress(data)
        self.assertEqual(deflate.inflate_whole(packed, len(data)), data)

    def test_only_one_whole_member_within_the_limit_is_inflated(self) -> None:
        data = simple_page("demo", 50)
        packed = gzip.compress(data)
        self.assertIsNone(deflate.inflate_whole(packed, len(data) - 1))
        self.assertIsNone(deflate.inflate_whole(packed[:-9], len(data)))
        self.assertIsNone(deflate.inflate_whole(packed + packed, 2 * len(data)))
        self.assertIsNone(deflate.inflate_whole(packed + b"x", len(data)))
        for at in (-8, -2):  # its CRC, its length
            bad = bytearray(packed)
            bad[at] ^= 1
            with self.assertRaises(deflate.ERRORS):
                deflate.inflate_whole(bytes(bad), len(data))
        bomb = gzip.compress(b"\0" * (4 << 20))
        self.assertIsNone(deflate.inflate_whole(bomb, 1 << 20))


ROUTES = {
    "routes": {
        "npm": {"upstream": "http://upstream.test/npm/"},
        "pypi": {"upstream": "http://upstream.test/index/"},
        "pypi-files": {"upstream": "http://upstream.test/files/"},
    }
}
UP_FILES = "http://upstream.test/files/"
GZIP_JSON = {b"content-encoding": b"gzip", b"content-type": V1_JSON.encode()}


def hashlib_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Counted(fetch_body.SpillBudget):
    """A budget that counts the reservations it granted."""

    taken = 0

    def take(self, size: int) -> bool:
        granted = super().take(size)
        self.taken += granted
        return granted


class ServerTests(SynchronousTestCase):
    def refused(self, path: str) -> None:
        """The download is refused: a 502 before its body, or a failed transfer."""
        try:
            resp, _ = self.proxy.get(path)
        except ResponseFailed:
            return
        self.assertEqual(resp.code, 502)

    def setUp(self) -> None:
        self.proxy = MemoryProxy(ROUTES, cache_dir=self.mktemp())
        self.addCleanup(self.proxy.close)
        self.up = self.proxy.upstream

    def page(self, files: dict[str, bytes], metadata: bytes | None = None) -> bytes:
        entries = []
        for name, body in files.items():
            entry: dict[str, Any] = {
                "filename": name,
                "hashes": {"sha256": hashlib_sha256(body)},
                "size": len(body),
                "url": f"{UP_FILES}packages/ab/{name}",
            }
            if metadata is not None and name.endswith(".whl"):
                entry["core-metadata"] = {"sha256": hashlib_sha256(metadata)}
            entries.append(entry)
        return compact({"files": entries, "meta": {"api-version": "1.1"}, "name": "demo"})

    def test_files_are_checked_against_their_entries(self) -> None:
        good, meta = b"the wheel", b"Metadata-Version: 2.1\n"
        self.up.add("/index/simple/demo/", self.page({"demo-1.0-py3-none-any.whl": good}, meta))
        resp, body = self.proxy.get("/pypi/simple/demo/", headers={"Accept": V1_JSON})
        self.assertIn(b'"url":"http://proxy.test/pypi/files/packages/ab/', body)
        self.assertEqual(len(self.proxy.facts), 0)
        self.up.add("/files/packages/ab/demo-1.0-py3-none-any.whl", b"not the wheel")
        self.up.add("/files/packages/ab/demo-1.0-py3-none-any.whl.metadata", b"forged")
        self.refused("/pypi/files/packages/ab/demo-1.0-py3-none-any.whl")
        self.refused("/pypi/files/packages/ab/demo-1.0-py3-none-any.whl.metadata")
        self.assertEqual([e.key for e in self.proxy.store.entries() if "files" in e.key], [])
        self.up.add("/files/packages/ab/demo-1.0-py3-none-any.whl", good)
        resp, body = self.proxy.get("/pypi/files/packages/ab/demo-1.0-py3-none-any.whl")
        self.assertEqual((resp.code, body), (200, good))

    def test_a_new_page_replaces_what_the_old_one_taught(self) -> None:
        name = "demo-1.0.tar.gz"
        self.up.add("/index/simple/demo/", self.page({name: b"one"}))
        self.proxy.get("/pypi/simple/demo/", headers={"Accept": V1_JSON})
        self.proxy.get(f"/pypi/files/packages/ab/{name}")
        url = f"{UP_FILES}packages/ab/{name}"
        self.assertEqual(self.proxy.facts.get(url), Expect(3, {"sha256": hashlib_sha256(b"one")}))
        self.up.add("/index/simple/demo/", self.page({name: b"two!"}))
        self.proxy.clock.advance(3600)  # past the page's TTL: revalidated, changed
        self.proxy.get("/pypi/simple/demo/", headers={"Accept": V1_JSON})
        self.assertIsNone(self.proxy.facts.get(url))
        self.proxy.store.remove(f"pypi-files:packages/ab/{name}")
        self.up.add(f"/files/packages/ab/{name}", b"two!")
        resp, body = self.proxy.get(f"/pypi/files/packages/ab/{name}")
        self.assertEqual(body, b"two!")
        self.assertEqual(self.proxy.facts.get(url), Expect(4, {"sha256": hashlib_sha256(b"two!")}))

    def test_a_file_not_found_by_its_entry_reads_the_whole_page(self) -> None:
        """A link written another way (``%2B``) than the client asks for it (``+``)."""
        body = b"local version"
        doc = self.page({"demo-1.0%2Blocal.tar.gz": body})
        self.up.add("/index/simple/demo/", doc)
        self.proxy.get("/pypi/simple/demo/", headers={"Accept": V1_JSON})
        self.assertEqual(len(self.proxy.facts), 0)
        self.up.add("/files/packages/ab/demo-1.0+local.tar.gz", b"forged")
        self.refused("/pypi/files/packages/ab/demo-1.0+local.tar.gz")
        self.assertEqual(len(self.proxy.facts), 1)  # all the page teaches
        self.up.add("/files/packages/ab/demo-1.0+local.tar.gz", body)
        _, got = self.proxy.get("/pypi/files/packages/ab/demo-1.0+local.tar.gz")
        self.assertEqual(got, body)

    def test_packument_with_escapes_checks_its_tarballs(self) -> None:
        up = "http://upstream.test/npm/"
        doc = npmrepo.packument([DEP], up)
        doc["readme"] = 'say "hi"\n\\o/'
        self.up.add(f"/npm/{DEP.name}", compact(doc))
        resp, body = self.proxy.get(f"/npm/{DEP.name}")
        self.assertIn(b'"tarball":"http://proxy.test/npm/', body)
        self.assertEqual(json.loads(body)["readme"], doc["readme"])
        self.assertEqual(len(self.proxy.facts), 0)
        self.up.add(f"/npm/{DEP.tarball_path}", b"\x1f\x8b not the tarball")
        self.refused(f"/npm/{DEP.tarball_path}")
        self.up.add(f"/npm/{DEP.tarball_path}", DEP.tarball)
        _, got = self.proxy.get(f"/npm/{DEP.tarball_path}")
        self.assertEqual(got, DEP.tarball)

    def test_gzip_client_of_a_relinked_page(self) -> None:
        doc = self.page({f"demo-1.{i}.tar.gz": b"x" for i in range(30)})
        self.up.add(
            "/index/simple/demo/",
            gzip.compress(doc),
            headers={b"content-encoding": b"gzip", b"content-type": V1_JSON.encode()},
        )
        _, plain = self.proxy.get("/pypi/simple/demo/", headers={"Accept": V1_JSON})
        self.assertEqual(plain, doc.replace(b"upstream.test/files/", b"proxy.test/pypi/files/"))
        (packed,) = [e for e in self.proxy.store.entries() if e.key.endswith(PACKED)]
        with open(self.proxy.store.path_of(packed), "rb") as f:
            self.assertEqual(gzip.decompress(f.read()), plain)

    def test_both_forms_of_a_relinked_page_are_stored(self) -> None:
        """A relinked page and its gzip form are stored, each the bytes its entry's
        sha256 names, and later clients of either form are hits from them."""
        doc = self.page({f"demo-1.{i}.tar.gz": b"x" for i in range(30)})
        self.up.add("/index/simple/demo/", doc, headers={b"content-type": V1_JSON.encode()})
        resp, plain = self.proxy.get("/pypi/simple/demo/", headers={"Accept": V1_JSON})
        self.assertEqual(header(resp, "x-cache"), "MISS")
        self.assertEqual(plain, doc.replace(b"upstream.test/files/", b"proxy.test/pypi/files/"))
        entries = self.proxy.store.entries()
        (packed,) = [e for e in entries if e.key.endswith(PACKED)]
        (page,) = [e for e in entries if "/simple/" in e.url and e is not packed]
        for e in (page, packed):
            with open(self.proxy.store.path_of(e), "rb") as f:
                self.assertEqual(hashlib.sha256(f.read()).hexdigest(), e.sha256)
        with open(self.proxy.store.path_of(packed), "rb") as f:
            self.assertEqual(gzip.decompress(f.read()), plain)
        resp, again = self.proxy.get("/pypi/simple/demo/", headers={"Accept": V1_JSON})
        self.assertEqual((again, header(resp, "x-cache")), (plain, "HIT"))
        # (treq inflates what it is sent gzip)
        resp, inflated = self.proxy.get(
            "/pypi/simple/demo/", headers={"Accept": V1_JSON, "Accept-Encoding": "gzip"}
        )
        self.assertEqual((inflated, header(resp, "x-cache")), (plain, "HIT"))
        self.assertEqual(self.up.count("/index/simple/demo/"), 1)

    def test_documents_received_in_memory_within_a_budget(self) -> None:
        """A document to relink is received in memory (no temp file), within a budget
        shared by all downloads and given back once it is rewritten or has failed;
        past the budget it comes through a temp file. Either way, and where its bytes
        do not prove the rewrite (a link elsewhere: the parser), clients get the same."""
        files = {f"demo-1.{i}.tar.gz": b"x" for i in range(30)}
        foreign = compact(
            {
                "files": [{"filename": "a.tar.gz", "hashes": {}, "url": "http://elsewhere.test/a"}],
                "meta": {"api-version": "1.1"},
                "name": "other",
            }
        )
        self.up.add("/index/simple/demo/", gzip.compress(self.page(files)), headers=GZIP_JSON)
        self.up.add("/index/simple/other/", gzip.compress(foreign), headers=GZIP_JSON)
        self.up.add("/index/simple/bad/", b"not gzip", headers=GZIP_JSON)
        served = {}
        for budget in (_Counted(fetch_body.DOCUMENT_BUDGET.limit), _Counted(0)):
            self.patch(fetch, "DOCUMENT_BUDGET", budget)
            for name in ("demo", "other"):
                self.proxy.store.remove(f"pypi:simple/{name}/#{V1_JSON}#@http://proxy.test")
                _, got = self.proxy.get(f"/pypi/simple/{name}/", headers={"Accept": V1_JSON})
                self.assertEqual(served.setdefault(name, got), got)
            resp, _ = self.proxy.get("/pypi/simple/bad/", headers={"Accept": V1_JSON})
            self.assertEqual(resp.code, 502)
            self.assertEqual(budget.held, 0)
            self.assertEqual(budget.taken, 3 if budget.limit else 0)
        self.assertIn(b'"url":"http://proxy.test/pypi/files/', served["demo"])
        self.assertIn(b'"url":"http://elsewhere.test/a"', served["other"])
        self.assertEqual(len(os.listdir(self.proxy.store.tmp_dir)), 0)


class WindowTests(SynchronousTestCase):
    """From a relinked page's verification (its client is about to ask for its files)
    until its commit, its files are looked up in its bytes: nothing waits for the
    commit's fsyncs, and nothing slips through unchecked."""

    ROUTE = Route(name="pypi", family="pypi", prefix="/pypi/", upstream="http://up.test/")

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = CacheStore(self.mktemp(), 1 << 30, DiskPool(None), self.clock)
        self.store.startService()
        self.addCleanup(self.store.stopService)
        self.learner = Learner(Facts(), self.store, DiskPool(None), (self.ROUTE,))
        page = self.page()
        self.fetch: Any = SimpleNamespace(
            document=page,
            learned=None,
            entry=None,
            request=SimpleNamespace(url="http://up.test/simple/demo/"),
        )
        self.wheel = "packages/ab/demo-1.0-py3-none-any.whl"

    @staticmethod
    def page(digest: str = "a" * 64) -> bytes:
        entry = {
            "filename": "demo-1.0-py3-none-any.whl",
            "hashes": {"sha256": digest},
            "url": "http://up.test/packages/ab/demo-1.0-py3-none-any.whl",
        }
        return compact({"files": [entry], "name": "demo"})

    def commit(self, body: bytes) -> Entry:
        key = "pypi:simple/demo/#application/vnd.pypi.simple.v1+json#@http://c"
        url = "http://up.test/simple/demo/"
        return commit(self.store, key, url, body, self.clock.seconds(), 600)

    def test_looked_up_in_the_bytes_before_the_commit(self) -> None:
        on_verified, on_settled = self.learner.hooks(self.ROUTE, "simple/demo/")
        on_verified(self.fetch)
        self.assertFalse(self.learner.busy(self.ROUTE, self.wheel))
        waiting = self.learner.ready_for(self.ROUTE, self.wheel)
        self.assertIsNotNone(waiting)
        url = "http://up.test/" + self.wheel
        self.assertEqual(self.learner.facts.get(url), Expect(None, {"sha256": "a" * 64}))
        # Committed: the stored copy takes the bytes' place; what they taught stays.
        self.fetch.entry = self.commit(self.page())
        on_settled(self.fetch)
        self.assertEqual(self.learner.facts.get(url), Expect(None, {"sha256": "a" * 64}))
        self.learner.facts.forget("http://up.test/simple/demo/")
        self.assertIsNotNone(self.learner.ready_for(self.ROUTE, self.wheel))
        self.assertEqual(self.learner.facts.get(url), Expect(None, {"sha256": "a" * 64}))

    def test_not_stored_teaches_nothing_after(self) -> None:
        on_verified, on_settled = self.learner.hooks(self.ROUTE, "simple/demo/")
        on_verified(self.fetch)
        self.learner.ready_for(self.ROUTE, self.wheel)
        self.assertEqual(len(self.learner.facts), 1)
        on_settled(self.fetch)  # no entry: not stored
        self.assertEqual(len(self.learner.facts), 0)
        self.assertIsNone(self.learner.ready_for(self.ROUTE, self.wheel))
