"""Rewriting documents by replacing the file prefix in their bytes, and what they teach.

The prefix path must give what rewriting the parsed links one by one gives (PyPI JSON:
the same bytes; npm: the same JSON, with the upstream's own bytes kept), fall back to
that parsing path whenever a link does not fit, and learn the same checks from the
upstream's own document in the same pass. Then, through the server: a document teaches
checks only for its own files (issue 15, 5), and learning is per upstream document,
whatever Host the clients use (issue 15, 3).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from pkgproxy.config import config_from_dict
from pkgproxy.families import Expect, Facts, Learned, RewriteContext, debian, npm, pypi
from pkgproxy.fetch.fetch import PACKED
from pkgproxy.rewrite import jsondoc, npm_packument, prefix
from pkgproxy.rewrite.pypi_simple import V1_JSON
from pkgproxy.testing import MemoryProxy
from pkgproxy.web.routing import RouteTable
from tests.support import npmrepo
from tests.support.npmrepo import DEP, DEP_OLD, SCOPED, NpmPackage

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "pypi")
TABLE = RouteTable(config_from_dict({}).enabled_routes())
FILES = "https://files.pythonhosted.org/"
REGISTRY = "https://registry.npmjs.org/"
BASE = "http://cache:3142"


def data(name: str) -> bytes:
    with open(os.path.join(DATA, name), "rb") as f:
        return f.read()


def context(page_url: str, fast: bool = True, base: str = BASE) -> RewriteContext:
    """The context the server passes: with ``fast``, the prefix mapping too."""
    return RewriteContext(
        page_url,
        lambda url: TABLE.public_url(url, base),
        (lambda url: TABLE.public_prefix(url, base)) if fast else None,
    )


def through_files(
    case: SynchronousTestCase, raw: bytes, rewrite: Callable[[str, str], Learned]
) -> tuple[bytes, Learned]:
    """Rewrite ``raw`` from one file into another, as the fetch does: ``(out, learned)``."""
    work = case.mktemp()
    os.makedirs(work)
    src, out = os.path.join(work, "raw"), os.path.join(work, "out")
    with open(src, "wb") as f:
        f.write(raw)
    learned = rewrite(src, out)
    with open(out, "rb") as f:
        return f.read(), learned


def sha(n: int) -> str:
    return hashlib.sha256(b"%d" % n).hexdigest()


def simple_page(project: str, n: int, indent: int | None = None) -> bytes:
    """A PEP 691 project page shaped like pypi.org's (compact unless ``indent``)."""
    files = []
    for i in range(n):
        for name in (f"{project}-1.{i}-py3-none-any.whl", f"{project}-1.{i}.tar.gz"):
            files.append(
                {
                    "core-metadata": {"sha256": sha(-i)} if name.endswith(".whl") else False,
                    "data-dist-info-metadata": False,
                    "filename": name,
                    "hashes": {"sha256": sha(i)},
                    "requires-python": ">=3.8",
                    "size": 1000 + i,
                    "upload-time": "2024-12-04T17:35:26.475808Z",
                    "url": f"{FILES}packages/ab/cd/{sha(i)[:60]}/{name}",
                    "yanked": False,
                }
            )
    doc = {
        "files": files,
        "meta": {"_last-serial": 1, "api-version": "1.3"},
        "name": project,
        "versions": [f"1.{i}" for i in range(n)],
    }
    sep = (",", ":") if indent is None else None
    return json.dumps(doc, indent=indent, separators=sep).encode()


class PypiJsonTests(SynchronousTestCase):
    """PEP 691 pages and the JSON API: byte-for-byte what the parsing path writes."""

    def run_both(
        self, raw: bytes, rewriter: Callable[..., Learned], page_url: str, fast: bool
    ) -> tuple[bytes, Learned]:
        """Rewrite ``raw`` both ways; assert the results agree and that the prefix path
        was taken (``fast``) or not; return the bytes and what was learned."""
        calls: list[object] = []
        walk = jsondoc.replace_strings

        def counted(*a: Any, **kw: Any) -> int:
            calls.append(a)
            return walk(*a, **kw)

        self.patch(jsondoc, "replace_strings", counted)
        results = [
            through_files(
                self, raw, lambda src, out, f=fast: rewriter(src, out, context(page_url, f))
            )
            for fast in (False, True)
        ]
        self.assertEqual(len(calls), 1 if fast else 2)
        self.assertEqual(results[0], results[1])
        return results[1]

    def simple(self, raw: bytes, project: str, fast: bool) -> tuple[bytes, Learned]:
        def rewriter(src: str, out: str, ctx: RewriteContext) -> Learned:
            return pypi._rewrite_simple(src, out, ctx, want_json=True, root=False)

        return self.run_both(raw, rewriter, f"https://pypi.org/simple/{project}/", fast)

    def test_compact_page(self) -> None:
        """pypi.org's compact page: every file URL to the proxy, all else as it was."""
        raw = simple_page("demo", 50)
        body, learned = self.simple(raw, "demo", fast=True)
        self.assertEqual(
            body, raw.replace(b'"' + FILES.encode(), b'"' + BASE.encode() + b"/pypi/files/")
        )
        self.assertEqual(len(learned), 150)  # 100 files and 50 metadata files
        self.assertTrue(all(url.startswith(FILES) for url, _ in learned))

    def test_indented_page(self) -> None:
        """Whitespace around the members does not matter."""
        body, _ = self.simple(simple_page("demo", 3, indent=2), "demo", fast=True)
        self.assertIn(b'"url": "http://cache:3142/pypi/files/packages/', body)

    def test_six_page(self) -> None:
        """The six page of the fixtures has every shape the prefix does not cover (a
        files-host URL in ``meta`` and in a nested member, escaped slashes, a relative
        link): the parsing path gives the page it always gave."""
        body, learned = self.simple(data("six.json"), "six", fast=False)
        self.assertEqual(body, data("six.rewritten.json"))
        self.assertEqual(len(learned), 4)

    def test_json_api(self) -> None:
        """The JSON API, as PyPI serves it (a files URL under ``info`` too): same result."""
        raw = data("six-api.json")
        body, learned = self.run_both(
            raw, pypi.rewrite_api, "https://pypi.org/pypi/six/json", False
        )
        self.assertEqual(body, data("six-api.rewritten.json"))
        trap = json.loads(raw)["info"]["project_urls"]["url"]
        clean = raw.replace(trap.encode(), b"https://example.org/")
        _, again = self.run_both(clean, pypi.rewrite_api, "https://pypi.org/pypi/six/json", True)
        self.assertEqual(again, learned)

    def test_links_that_do_not_fit(self) -> None:
        """Any link the prefix does not cover sends the page down the parsing path."""
        raw = simple_page("demo", 3)
        one = f"{FILES}packages/ab/cd/{sha(1)[:60]}/demo-1.1.tar.gz".encode()
        cases = {
            "relative": b"../../packages/x/demo-1.1.tar.gz",
            "escaped slashes": one.replace(b"/", b"\\/"),
            "escaped letter": b"\\u0068" + one[1:],
            "dot segment": one.replace(b"/ab/", b"/ab/../ab/"),
            "another routed host": b"https://pypi.org/packages/demo-1.1.tar.gz",
        }
        for why, link in cases.items():
            changed = raw.replace(one, link)
            self.assertNotEqual(changed, raw, why)
            self.simple(changed, "demo", fast=False)
        # A link to a host no route serves is left alone by both: no obstacle.
        self.simple(raw.replace(one, b"https://elsewhere.example/demo-1.1.tar.gz"), "demo", True)

    def test_hostile_member_order(self) -> None:
        """A duplicated ``url`` member, or an escaped key standing for ``url``: the bytes
        cannot be trusted to say which value the parser keeps."""
        raw = simple_page("demo", 2)
        dup = raw.replace(b'"url":', b'"url":"' + FILES.encode() + b'x","url":', 1)
        self.simple(dup, "demo", fast=False)
        escaped = raw.replace(b'"url":', b'"\\u0075rl":', 1)
        self.simple(escaped, "demo", fast=False)


class NpmTests(SynchronousTestCase):
    """Packuments: the same JSON as the parsing path writes, the upstream's bytes kept."""

    def run_both(self, raw: bytes, name: str, fast: bool) -> tuple[bytes, Learned]:
        written: list[int] = []
        write_json = npm_packument.write_json

        def counted(*a: Any) -> None:
            written.append(1)
            write_json(*a)

        self.patch(npm_packument, "write_json", counted)
        url = REGISTRY + name.replace("/", "%2f")
        out_docs = [
            through_files(
                self,
                raw,
                lambda src, out, f=fast: npm._rewrite(
                    src, out, context(url, f), base=REGISTRY, owner=name
                ),
            )
            for fast in (False, True)
        ]
        self.assertEqual(len(written), 1 if fast else 2)
        (slow, slow_learned), (body, learned) = out_docs
        self.assertEqual(json.loads(body), json.loads(slow))
        self.assertEqual(learned, slow_learned)
        return body, learned

    def check_fast(self, versions: list[NpmPackage], abbreviated: bool) -> None:
        doc = npmrepo.packument(versions, REGISTRY, abbreviated=abbreviated)
        raw = json.dumps(doc, ensure_ascii=False).encode()  # spaces: not as the parser writes
        body, learned = self.run_both(raw, versions[0].name, fast=True)
        public = f"{BASE}/npm/".encode()
        self.assertEqual(body, raw.replace(b'"' + REGISTRY.encode(), b'"' + public))
        self.assertEqual({url for url, _ in learned}, {REGISTRY + p.tarball_path for p in versions})

    def test_full_packument(self) -> None:
        self.check_fast([DEP_OLD, DEP], abbreviated=False)

    def test_abbreviated_packument(self) -> None:
        self.check_fast([DEP_OLD, DEP], abbreviated=True)

    def test_scoped_packument(self) -> None:
        self.check_fast([SCOPED], abbreviated=False)
        self.check_fast([SCOPED], abbreviated=True)

    def test_links_that_do_not_fit(self) -> None:
        """A registry URL elsewhere, an escaped or other-scheme tarball: parsing path."""
        doc = npmrepo.packument([DEP_OLD, DEP], REGISTRY)
        raw = json.dumps(doc).encode()
        one = (REGISTRY + DEP.tarball_path).encode()
        cases = {
            "escaped slashes": raw.replace(one, one.replace(b"/", b"\\/")),
            "other scheme": raw.replace(one, one.replace(b"https:", b"http:")),
            "registry URL in another field": raw.replace(
                b'"main": "index.js"', b'"main": "' + REGISTRY.encode() + b'x"', 1
            ),
            "tarball key elsewhere": raw.replace(
                b'"main": "index.js"', b'"tarball": "' + REGISTRY.encode() + b'x"', 1
            ),
        }
        for why, changed in cases.items():
            self.assertNotEqual(changed, raw, why)
            self.run_both(changed, DEP.name, fast=False)

    def test_owns_only_its_tarballs(self) -> None:
        """``evil``'s packument listing ``good``'s tarball teaches nothing about it."""
        good = NpmPackage("good", "1.0.0")
        evil = NpmPackage("evil", "1.0.0")
        doc = npmrepo.packument([evil], REGISTRY)
        doc["versions"]["2.0.0"] = {
            "name": "good",
            "dist": {"tarball": REGISTRY + good.tarball_path, "shasum": "0" * 40},
        }
        _, learned = self.run_both(json.dumps(doc).encode(), "evil", fast=True)
        self.assertEqual([url for url, _ in learned], [REGISTRY + evil.tarball_path])


class PrefixCheckTests(SynchronousTestCase):
    def test_unsafe_public_prefix(self) -> None:
        """A public prefix that would need escaping in JSON is never spliced in."""
        link = FILES + "a.whl"
        data = b'{"url":"' + link.encode() + b'"}'
        self.assertTrue(prefix.exact(data, "url", [link], [link], FILES, "http://h/"))
        self.assertFalse(prefix.exact(data, "url", [link], [link], FILES, 'http://h"/'))

    def test_plain_parse_only_without_backslashes(self) -> None:
        """A small document with no backslash is parsed without the per-object hook,
        and its bytes alone prove the replacement; any backslash (or a large document)
        takes the hook, and a missing record is never taken for an empty one."""
        link = FILES + "a.whl"
        plain = b'{"files":[{"url":"' + link.encode() + b'"}]}'
        seen = prefix.KeyedStrings("url")
        self.assertEqual(prefix.loads(plain, seen), json.loads(plain))
        self.assertIsNone(seen.seen())
        self.assertTrue(prefix.exact(plain, "url", None, [link], FILES, "http://h/"))
        escaped = plain.replace(b"a.whl", b"\\u0061.whl")
        seen = prefix.KeyedStrings("url")
        prefix.loads(escaped, seen)
        self.assertEqual(seen.seen(), [link])
        self.assertFalse(prefix.exact(escaped, "url", None, [link], FILES, "http://h/"))
        self.patch(prefix, "PLAIN_MAX", len(plain) - 1)
        seen = prefix.KeyedStrings("url")
        prefix.loads(plain, seen)
        self.assertEqual(seen.seen(), [link])

    def test_written_in_pieces(self) -> None:
        data = b'["P/a","P/b", "x"]'.replace(b"P/", b"http://u/")
        want = b'["https://pub/x/a","https://pub/x/b", "x"]'
        for copy_max in (prefix.COPY_MAX, 0):
            self.patch(prefix, "COPY_MAX", copy_max)
            out: list[bytes] = []
            prefix.write_replaced(data, "http://u/", "https://pub/x/", out.append, chunk=4)
            self.assertGreater(len(out), 1)
            self.assertEqual(b"".join(out), want)


ROUTES = {
    "routes": {
        "npm": {"upstream": "http://upstream.test/npm/"},
        "pypi": {"upstream": "http://upstream.test/index/"},
        "pypi-files": {"upstream": "http://upstream.test/files/"},
    }
}


class ProxyCase(SynchronousTestCase):
    """A memory proxy with npm and PyPI routes on one fake upstream."""

    def setUp(self) -> None:
        self.proxy = MemoryProxy(ROUTES, cache_dir=self.mktemp())
        self.addCleanup(self.proxy.close)
        self.up = self.proxy.upstream


class ServerTests(ProxyCase):
    """Through the server: ownership of checks, and learning per upstream document."""

    def test_evil_packument_cannot_block_good(self) -> None:
        """The issue's example: ``evil`` lists ``good``'s tarball with another integrity;
        ``good``'s cached tarball, and a new download of it, still verify."""
        up = "http://upstream.test/npm/"
        good = NpmPackage("good", "1.0.0")
        evil_doc = npmrepo.packument([NpmPackage("evil", "1.0.0")], up)
        evil_doc["versions"]["1.0.0"]["dist"].update(
            tarball=up + good.tarball_path,
            integrity="sha512-" + "A" * 86 + "==",
            shasum="0" * 40,
        )
        self.up.add("/npm/good", json.dumps(npmrepo.packument([good], up)).encode())
        self.up.add("/npm/evil", json.dumps(evil_doc).encode())
        self.up.add("/npm/" + good.tarball_path, good.tarball)
        self.proxy.get("/npm/good")
        resp, body = self.proxy.get("/npm/" + good.tarball_path)
        self.assertEqual((resp.code, body), (200, good.tarball))
        _, listed = self.proxy.get("/npm/evil")
        tarball = json.loads(listed)["versions"]["1.0.0"]["dist"]["tarball"]
        self.assertEqual(tarball, "http://proxy.test/npm/" + good.tarball_path)
        expect = self.proxy.facts.get(up + good.tarball_path)
        assert expect is not None
        self.assertEqual(expect.digests["sha1"], good.sha1)
        resp, body = self.proxy.get("/npm/" + good.tarball_path)
        self.assertEqual((resp.code, body), (200, good.tarball))
        # Nothing learned from good yet: evil still teaches nothing about it.
        self.proxy.store.remove("npm:" + good.tarball_path)
        self.proxy.store.remove("npm:good#full#@http://proxy.test")
        self.assertIsNone(self.proxy.facts.get(up + good.tarball_path))
        self.proxy.get("/npm/evil", headers={"Accept": "application/json", "Host": "other"})
        self.assertIsNone(self.proxy.facts.get(up + good.tarball_path))
        resp, body = self.proxy.get("/npm/" + good.tarball_path)
        self.assertEqual((resp.code, body), (200, good.tarball))

    def test_evil_page_cannot_block_good_file(self) -> None:
        """A PyPI page linking another project's file (even naming it as its own) does
        not decide what that file must be."""
        whl = b"the good wheel"
        path = "packages/good-1.0-py3-none-any.whl"
        self.up.add("/files/" + path, whl)
        link = f"http://upstream.test/files/{path}"
        evil = f'<a href="{link}#sha256={"0" * 64}">evil-1.0-py3-none-any.whl</a>'
        self.up.add("/index/simple/evil/", evil.encode())
        self.proxy.get("/pypi/simple/evil/")
        self.assertIsNone(self.proxy.facts.get(link))
        resp, body = self.proxy.get("/pypi/files/" + path)
        self.assertEqual((resp.code, body), (200, whl))

    def test_learned_once_per_document_whatever_the_host(self) -> None:
        """Many Host headers for one page: one set of facts, filed by upstream URL, that
        goes when the last stored copy goes."""
        doc = simple_page("demo", 20).replace(FILES.encode(), b"http://upstream.test/files/")
        self.up.add("/index/simple/demo/", doc)
        accept = {"Accept": "application/vnd.pypi.simple.v1+json"}
        for i in range(30):
            resp, body = self.proxy.get("/pypi/simple/demo/", headers={**accept, "Host": f"h{i}"})
            self.assertIn(f'"url":"http://h{i}/pypi/files/packages/'.encode(), body)
        # Learned when a file is asked for, from that file's entry alone.
        self.assertEqual(len(self.proxy.facts), 0)
        wheel = f"packages/ab/cd/{sha(3)[:60]}/demo-1.3-py3-none-any.whl"
        self.proxy.get("/pypi/files/" + wheel)
        self.assertEqual(len(self.proxy.facts), 2)  # the wheel and its metadata
        self.assertEqual(self.proxy.facts.sources(), 1)
        self.assertEqual(
            self.proxy.facts.get("http://upstream.test/files/" + wheel),
            Expect(1003, {"sha256": sha(3)}),
        )
        keys = [
            e.key
            for e in self.proxy.store.entries()
            if "simple/demo" in e.key and not e.key.endswith(PACKED)
        ]
        self.assertEqual(len(keys), 30)
        for key in keys[:-1]:
            self.proxy.store.remove(key)
        self.assertEqual(len(self.proxy.facts), 2)
        self.proxy.store.remove(keys[-1])
        self.assertEqual(len(self.proxy.facts), 0)

    def test_hostile_page_fails_cleanly(self) -> None:
        """A document that is not JSON where JSON was promised: 502, nothing stored."""
        self.up.add("/index/simple/demo/", b'{"files": [')
        accept = {"Accept": "application/vnd.pypi.simple.v1+json"}
        resp, _ = self.proxy.get("/pypi/simple/demo/", headers=accept)
        self.assertEqual(resp.code, 502)
        self.assertEqual(len(self.proxy.store), 0)


class IndexOwnershipTests(SynchronousTestCase):
    """Debian indexes teach only what lies below the directory they describe."""

    def write(self, text: str) -> list[bytes]:
        """The index's bytes, as the learner hands them over."""
        return [text.encode()]

    def test_packages(self) -> None:
        stanza = "Package: {n}\nFilename: {f}\nSize: 3\nSHA256: " + "a" * 64 + "\n\n"
        text = "".join(
            stanza.format(n=i, f=f)
            for i, f in enumerate(["pool/main/a/a.deb", "../other/pool/b.deb", "/etc/c.deb"])
        )
        url = "http://deb.test/debian/dists/stable/main/binary-amd64/Packages"
        learned = debian.learn_packages(self.write(text), url)
        self.assertEqual([u for u, _ in learned], ["http://deb.test/debian/pool/main/a/a.deb"])

    def test_release(self) -> None:
        lines = [f" {'b' * 64} 10 {rel}" for rel in ("main/binary-amd64/Packages", "../x/Packages")]
        url = "http://deb.test/debian/dists/stable/Release"
        learned = debian.learn_release(self.write("SHA256:\n" + "\n".join(lines) + "\n"), url)
        self.assertEqual(
            [u for u, _ in learned],
            ["http://deb.test/debian/dists/stable/main/binary-amd64/Packages"],
        )


class GzipUpstreamTests(ProxyCase):
    """Rewritten documents are asked for gzip-compressed and served as themselves."""

    def test_pypi_page_taken_compressed(self) -> None:
        doc = simple_page("demo", 5).replace(FILES.encode(), b"http://upstream.test/files/")
        self.up.add(
            "/index/simple/demo/",
            gzip.compress(doc),
            headers={b"content-encoding": b"gzip", b"content-type": V1_JSON.encode()},
        )
        resp, body = self.proxy.get("/pypi/simple/demo/", headers={"Accept": V1_JSON})
        self.assertEqual(self.up.seen[-1].headers[b"accept-encoding"], b"gzip")
        self.assertFalse(any(resp.headers.getRawHeaders(b"content-encoding") or []))
        self.assertEqual(body, doc.replace(b"upstream.test/files/", b"proxy.test/pypi/files/"))
        self.proxy.get(f"/pypi/files/packages/ab/cd/{sha(4)[:60]}/demo-1.4.tar.gz")
        self.assertEqual(
            self.proxy.facts.get(
                f"http://upstream.test/files/packages/ab/cd/{sha(4)[:60]}/demo-1.4.tar.gz"
            ),
            Expect(1004, {"sha256": sha(4)}),
        )
        resp, again = self.proxy.get("/pypi/simple/demo/", headers={"Accept": V1_JSON})
        self.assertEqual((again, resp.headers.getRawHeaders(b"x-cache")), (body, [b"HIT"]))

    def test_packument_taken_compressed(self) -> None:
        up = "http://upstream.test/npm/"
        doc = json.dumps(npmrepo.packument([DEP_OLD, DEP], up)).encode()
        self.up.add(f"/npm/{DEP.name}", gzip.compress(doc), headers={b"content-encoding": b"gzip"})
        resp, body = self.proxy.get(f"/npm/{DEP.name}", headers={"Accept": "application/json"})
        self.assertEqual(self.up.seen[-1].headers[b"accept-encoding"], b"gzip")
        self.assertFalse(any(resp.headers.getRawHeaders(b"content-encoding") or []))
        self.assertEqual(body, doc.replace(up.encode(), b"http://proxy.test/npm/"))
        self.assertEqual(len(self.proxy.facts), 2)

    def test_bad_gzip_is_refused(self) -> None:
        """A body that says gzip and is not: 502, nothing stored, nothing learned."""
        self.up.add("/index/simple/demo/", b"not gzip", headers={b"content-encoding": b"gzip"})
        resp, _ = self.proxy.get("/pypi/simple/demo/", headers={"Accept": V1_JSON})
        self.assertEqual(resp.code, 502)
        self.assertEqual((len(self.proxy.store), len(self.proxy.facts)), (0, 0))


class GzipClientTests(ProxyCase):
    """A rewritten document is stored with its gzip form beside it: a client that takes
    gzip gets that, one that does not gets the document, in either order, on the raw
    wire (no client library decoding in between)."""

    def wire(self, path: str, *headers: str) -> tuple[dict[bytes, bytes], bytes]:
        head = f"GET {path} HTTP/1.1\r\nHost: proxy.test\r\n" + "".join(h + "\r\n" for h in headers)
        raw = self.proxy.raw(head.encode() + b"\r\n")
        top, _, body = raw.partition(b"\r\n\r\n")
        fields = dict(
            (k.strip().lower(), v.strip())
            for k, _, v in (line.partition(b":") for line in top.split(b"\r\n")[1:])
        )
        self.assertEqual(len(body), int(fields[b"content-length"]))
        return fields, body

    def publish(self) -> bytes:
        doc = simple_page("demo", 20).replace(FILES.encode(), b"http://upstream.test/files/")
        self.up.add("/index/simple/demo/", doc)
        return doc.replace(b"upstream.test/files/", b"proxy.test/pypi/files/")

    def test_gzip_client_after_identity_client(self) -> None:
        want = self.publish()
        accept = f"Accept: {V1_JSON}"
        first, body = self.wire("/pypi/simple/demo/", accept)
        self.assertEqual((body, first.get(b"content-encoding")), (want, None))
        self.assertEqual(first[b"vary"], b"Accept, Accept-Encoding")
        gz, packed = self.wire("/pypi/simple/demo/", accept, "Accept-Encoding: gzip, deflate")
        self.assertEqual((gz[b"content-encoding"], gz[b"x-cache"]), (b"gzip", b"HIT"))
        self.assertEqual(gzip.decompress(packed), want)
        self.assertLess(len(packed), len(want) // 2)
        self.assertNotEqual(gz[b"etag"], first[b"etag"])
        self.assertEqual(gz[b"vary"], b"Accept, Accept-Encoding")
        # And back: identity again (also from the hit path), gzip again.
        for _ in range(2):
            again, body = self.wire("/pypi/simple/demo/", accept)
            self.assertEqual((body, again.get(b"content-encoding")), (want, None))
            gz, packed = self.wire("/pypi/simple/demo/", accept, "Accept-Encoding: gzip")
            self.assertEqual(gzip.decompress(packed), want)
        no, body = self.wire("/pypi/simple/demo/", accept, "Accept-Encoding: gzip;q=0")
        self.assertEqual((body, no.get(b"content-encoding")), (want, None))
        self.assertEqual(self.up.count("/index/simple/demo/"), 1)

    def test_identity_client_after_gzip_client(self) -> None:
        want = self.publish()
        accept = f"Accept: {V1_JSON}"
        first, body = self.wire("/pypi/simple/demo/", accept, "Accept-Encoding: gzip")
        # The first client waited for the rewrite and is streamed the document itself.
        self.assertEqual(
            body if not first.get(b"content-encoding") else gzip.decompress(body), want
        )
        plain, body = self.wire("/pypi/simple/demo/", accept)
        self.assertEqual((body, plain.get(b"content-encoding")), (want, None))
        gz, packed = self.wire("/pypi/simple/demo/", accept, "Accept-Encoding: gzip")
        self.assertEqual((gz[b"content-encoding"], gzip.decompress(packed)), (b"gzip", want))
        self.assertEqual(self.up.count("/index/simple/demo/"), 1)

    def test_stale_gzip_form_is_not_served(self) -> None:
        """A gzip form that is not of the stored document (left from an older one) is
        never served: the document is."""
        want = self.publish()
        accept = f"Accept: {V1_JSON}"
        self.wire("/pypi/simple/demo/", accept)
        key = next(e.key for e in self.proxy.store.entries() if e.key.endswith(PACKED))
        sibling = self.proxy.store.peek(key)
        assert sibling is not None
        sibling.etag = "0" * 64
        plain, body = self.wire("/pypi/simple/demo/", accept, "Accept-Encoding: gzip")
        self.assertEqual((body, plain.get(b"content-encoding")), (want, None))


class HostTests(ProxyCase):
    def test_non_ascii_host_is_not_a_base(self) -> None:
        """A Host that is not an ASCII name (``isalnum`` takes any script) is refused by
        the site (400); behind a front that let it through, it is not put in rewritten
        links: the address the client connected to is."""
        doc = simple_page("demo", 2).replace(FILES.encode(), b"http://upstream.test/files/")
        self.up.add("/index/simple/demo/", doc)
        request = (
            b"GET /pypi/simple/demo/ HTTP/1.1\r\nHost: \xe9xample\r\n"
            b"Accept: " + V1_JSON.encode() + b"\r\n\r\n"
        )
        self.assertIn(b" 400 ", self.proxy.raw(request).split(b"\r\n", 1)[0])
        raw = self.proxy.raw(request, Site(self.proxy.root, reactor=self.proxy.clock))
        self.assertIn(b"200 OK", raw.split(b"\r\n", 1)[0])
        body = raw.partition(b"\r\n\r\n")[2]
        self.assertNotIn(b"xample/pypi/files/", body)
        self.assertIn(b"/pypi/files/packages/", body)


class RestartTests(ProxyCase):
    def test_relearned_from_the_document_not_its_gzip_form(self) -> None:
        """After a restart, what a page taught is read again from its stored copy (the
        links mapped back to the upstream), never from the gzip form beside it."""
        doc = simple_page("demo", 20).replace(FILES.encode(), b"http://upstream.test/files/")
        self.up.add("/index/simple/demo/", doc)
        self.proxy.get("/pypi/simple/demo/", headers={"Accept": V1_JSON, "Host": "h1"})
        path = f"packages/ab/cd/{sha(0)[:60]}/demo-1.0.tar.gz"
        url = "http://upstream.test/files/" + path
        self.proxy.get("/pypi/files/" + path)
        expect = self.proxy.facts.get(url)
        self.assertEqual(expect, Expect(1000, {"sha256": sha(0)}))
        self.assertTrue(any(e.key.endswith(PACKED) for e in self.proxy.store.entries()))
        self.proxy.close()
        again = MemoryProxy(ROUTES, cache_dir=self.proxy.config.cache.dir)
        self.addCleanup(again.close)
        self.assertEqual(len(again.facts), 0)  # read when a file is asked for
        again.get("/pypi/files/" + path)
        self.assertEqual((len(again.facts), again.facts.sources()), (1, 1))
        self.assertEqual(again.facts.get(url), expect)

    def test_gzip_form_goes_with_its_document(self) -> None:
        doc = simple_page("demo", 20).replace(FILES.encode(), b"http://upstream.test/files/")
        self.up.add("/index/simple/demo/", doc)
        self.proxy.get("/pypi/simple/demo/", headers={"Accept": V1_JSON})
        keys = sorted(e.key for e in self.proxy.store.entries())
        self.assertEqual([k.endswith(PACKED) for k in keys], [False, True])
        self.proxy.store.remove(keys[0])
        self.assertEqual(len(self.proxy.store), 0)


class OwnsTests(SynchronousTestCase):
    def test_file_names(self) -> None:
        """Which files a project's page may teach checks for, by the name in the URL."""
        base = "https://files.pythonhosted.org/packages/ab/cd/ef/"
        cases = {
            ("six", "six-1.17.0-py2.py3-none-any.whl"): True,
            ("six", "six-1.17.0.tar.gz"): True,
            ("six", "six-1.17.0-py2.py3-none-any.whl.metadata"): True,
            ("zope-interface", "zope.interface-5.0.tar.gz"): True,
            ("zope-interface", "zope_interface-5.0-cp311-none-any.whl"): True,
            ("typing-extensions", "typing_extensions-4.0-py3-none-any.whl"): True,
            ("foo-bar", "Foo__Bar-1.0.tar.gz"): True,
            ("foo-bar", "foo-bar-v2.zip"): True,
            ("foo", "foo-bar-1.0.tar.gz"): False,
            ("foo", "foo_bar-1.0-py3-none-any.whl"): False,
            ("evil", "good-1.0-py3-none-any.whl"): False,
            ("evil", "evil%2F..%2Fgood-1.0.tar.gz"): False,
            ("good", "good-1.0.tar.gz#sha256=00"): True,
        }
        for (project, name), want in cases.items():
            self.assertEqual(pypi.owns(project, base + name), want, (project, name))


class FactsTests(SynchronousTestCase):
    def test_a_url_two_documents_list_stays_with_either(self) -> None:
        """A file both a project page and its JSON API list keeps its check until the
        last of the two goes; learning a document again replaces what it taught."""
        facts = Facts()
        a, b = Expect(1, {"sha256": "a"}), Expect(None, {"sha256": "a"})
        facts.add([("f", a), ("g", a)], source="page")
        facts.add([("f", b)], source="api")
        facts.forget("api")
        self.assertEqual((facts.get("f"), facts.get("g")), (b, a))
        facts.add([("f", a)], source="api")
        facts.add([("h", a)], source="page")  # the page no longer lists f and g
        self.assertEqual((facts.get("f"), facts.get("g"), facts.get("h")), (a, None, a))
        facts.forget("api")
        self.assertEqual((len(facts), facts.sources()), (1, 1))
        facts.forget("page")
        self.assertEqual(len(facts), 0)
