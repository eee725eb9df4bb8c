"""The PyPI family: names, negotiation, the rewriters, learned checks, and the whole cycle.

The golden files in tests/data/pypi/ are built from PROTOCOLS.md 8.2 (six's project page
and JSON as PyPI serves them) plus a page of hostile HTML; each ``*.rewritten.*`` was
made from its source by plain text substitution of the file links only, so it is an
oracle independent of the rewriter.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from html.parser import HTMLParser
from urllib.parse import urljoin

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed

from pkgproxy.config import config_from_dict
from pkgproxy.families import CacheClass, Facts, RewriteContext, pypi
from pkgproxy.families import Request as FamilyRequest
from pkgproxy.families.pypi import (
    OFFERS,
    classify,
    learn,
    learns,
    negotiate,
    requested_format,
)
from pkgproxy.learning import UpstreamLinks
from pkgproxy.rewrite import htmldoc, pypi_simple
from pkgproxy.rewrite.pypi_simple import HTML, V1_HTML, V1_JSON, normalize
from pkgproxy.testing import MemoryProxy
from pkgproxy.web.routing import RouteTable
from tests.support import pypirepo

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "pypi")
PIP_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, "
    "text/html; q=0.01"
)
UV_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, "
    "text/html;q=0.01"
)
ROUTES = {r.name: r for r in config_from_dict({}).routes}
PYPI, FILES = ROUTES["pypi"], ROUTES["pypi-files"]
TABLE = RouteTable(config_from_dict({}).enabled_routes())


def header(resp, name: str) -> str | None:
    values = resp.headers.getRawHeaders(name)
    return values[-1] if values else None


def context(page_url: str, base: str | None = "http://cache:3142") -> RewriteContext:
    """What the proxy hands a rewriter, with the built-in routes and a client's base."""
    return RewriteContext(page_url, lambda url: TABLE.public_url(url, base))


def data(name: str) -> bytes:
    with open(os.path.join(DATA, name), "rb") as f:
        return f.read()


class _Anchors(HTMLParser):
    """pip's view of a page: the attributes of every ``<a>``, as html.parser gives them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.anchors: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.anchors.append(dict(attrs))


def anchors(page: bytes) -> list[dict[str, str | None]]:
    parser = _Anchors()
    parser.feed(page.decode())
    parser.close()
    return parser.anchors


class NameTests(SynchronousTestCase):
    def test_normalisation_table(self) -> None:
        """PEP 503: case folded, every run of - _ . becomes one -."""
        for name in ("Zope.Interface", "zope_interface", "ZOPE--interface", "zope-._interface"):
            self.assertEqual(normalize(name), "zope-interface", name)
        self.assertEqual(normalize("six"), "six")

    def test_unnormalised_project_redirected(self) -> None:
        """An unnormalised name answers 301 locally, relative, so it holds in both modes."""
        decision = classify(PYPI, "simple/Zope.Interface/")
        assert decision.local is not None
        self.assertEqual(
            (decision.local.status, decision.local.location), (301, "../zope-interface/")
        )
        for page in (
            "http://cache:3142/pypi/simple/Zope.Interface/",
            "http://pypi.org/simple/Zope.Interface/",
        ):
            self.assertTrue(
                urljoin(page, decision.local.location).endswith("/simple/zope-interface/"), page
            )

    def test_missing_slash_redirected(self) -> None:
        """A project or the root without its trailing slash is sent to the slashed URL."""
        for path, location in (
            ("simple/six", "six/"),
            ("simple/Six", "six/"),
            ("simple", "simple/"),
        ):
            decision = classify(PYPI, path)
            assert decision.local is not None, path
            self.assertEqual((decision.local.status, decision.local.location), (301, location))
        target = urljoin("http://cache/pypi/simple/Six", "six/")
        self.assertEqual(target, "http://cache/pypi/simple/six/")

    def test_impossible_name_not_found(self) -> None:
        """A name no project can have is answered 404 without asking upstream."""
        decision = classify(PYPI, "simple/a%20b/")
        assert decision.local is not None
        self.assertEqual(decision.local.status, 404)

    def test_normalised_name_is_a_page(self) -> None:
        """The normalised name is fetched, mutable with the route's TTL, with its rewriter."""
        decision = classify(PYPI, "simple/zope-interface/")
        self.assertIsNone(decision.local)
        self.assertEqual((decision.cache_class, decision.ttl), (CacheClass.MUTABLE, 600.0))
        self.assertIsNotNone(decision.rewrite)


class NegotiationTests(SynchronousTestCase):
    def test_matrix(self) -> None:
        """PyPI's choice (PROTOCOLS.md 4.3): highest q, ties in the order html, v1+html,
        json; no or unsatisfiable Accept gives text/html; "latest" means v1."""
        cases = {
            PIP_ACCEPT: V1_JSON,
            UV_ACCEPT: V1_JSON,
            "": HTML,
            "text/html": HTML,
            "application/vnd.pypi.simple.latest+json": V1_JSON,
            "application/vnd.pypi.simple.latest+html": V1_HTML,
            "application/vnd.pypi.simple.v1+html": V1_HTML,
            "*/*": HTML,
            "application/*": V1_HTML,
            "application/vnd.pypi.simple.v1+json;q=0, */*": HTML,
            "application/json, image/png": HTML,
            "text/html;q=0.5, application/vnd.pypi.simple.v1+json;q=0.5": HTML,
            "APPLICATION/VND.PYPI.SIMPLE.V1+JSON": V1_JSON,
            "application/vnd.pypi.simple.v1+json;q=2, text/html;q=0.1": HTML,
            "garbage;;;,,": HTML,
        }
        for accept, want in cases.items():
            self.assertEqual(negotiate(accept), want, accept)
        self.assertEqual(OFFERS, (HTML, V1_HTML, V1_JSON))

    def test_decision_for_the_chosen_type(self) -> None:
        """The chosen type is the variant, the Accept sent upstream, and the Content-Type
        served, with Vary: Accept."""
        decision = classify(PYPI, "simple/six/", Facts(), FamilyRequest(accept=PIP_ACCEPT))
        self.assertEqual(decision.variant, V1_JSON)
        self.assertEqual(
            dict(decision.upstream_headers), {"Accept": V1_JSON, "Accept-Encoding": "gzip"}
        )
        self.assertEqual(
            dict(decision.response_headers),
            {"Vary": "Accept, Accept-Encoding", "Content-Type": V1_JSON},
        )

    def test_format_parameter(self) -> None:
        """PEP 691's ?format= names one type and overrides Accept; the query is then
        the family's (not in the key, not sent upstream). A value that names no type
        is ignored, as PyPI ignores it, and Accept decides."""
        self.assertEqual(requested_format(f"format={V1_JSON}"), V1_JSON)
        self.assertEqual(
            requested_format("format=application/vnd.pypi.simple.latest+html"), V1_HTML
        )
        self.assertEqual(requested_format("x=1&format=TEXT/HTML"), HTML)
        self.assertEqual(
            requested_format("format=application%2Fvnd.pypi.simple.v1%2Bjson"), V1_JSON
        )
        for ignored in ("", "format=", "format=application/json", "format=*/*", "fmt=text/html"):
            self.assertIsNone(requested_format(ignored), ignored)
        d = classify(
            PYPI,
            "simple/six/",
            Facts(),
            FamilyRequest(accept="text/html", query=f"format={V1_JSON}"),
        )
        self.assertEqual((d.variant, d.query_consumed), (V1_JSON, True))
        self.assertEqual(dict(d.upstream_headers), {"Accept": V1_JSON, "Accept-Encoding": "gzip"})
        d = classify(
            PYPI, "simple/six/", Facts(), FamilyRequest(accept=PIP_ACCEPT, query="format=x")
        )
        self.assertEqual((d.variant, d.query_consumed), (V1_JSON, False))

    def test_root_list(self) -> None:
        """The root list is negotiated and rewritten too, revalidated less often."""
        decision = classify(PYPI, "simple/", Facts(), FamilyRequest(accept="text/html"))
        self.assertEqual((decision.variant, decision.cache_class), (HTML, CacheClass.MUTABLE))
        self.assertEqual(decision.ttl, 3600.0)
        self.assertIsNotNone(decision.rewrite)
        self.assertFalse(learns("simple/"))


class HtmlRewriteTests(SynchronousTestCase):
    def rewrite(
        self, source: bytes, page_url: str, base: str | None = "http://cache:3142"
    ) -> bytes:
        raw, out = self.mktemp(), self.mktemp()
        with open(raw, "wb") as f:
            f.write(source)
        pypi_simple.rewrite_simple(raw, out, context(page_url, base), want_json=False, root=False)
        with open(out, "rb") as f:
            return f.read()

    def test_golden_six(self) -> None:
        """PyPI's page for six: every file href leads to /pypi/files/, every other byte
        (fragments, requires-python with &gt;, metadata hashes, yanked reasons, the
        provenance URL, the trailing serial comment) is as PyPI wrote it."""
        got = self.rewrite(data("six.html"), "https://pypi.org/simple/six/")
        self.assertEqual(got, data("six.rewritten.html"))

    def test_golden_hostile(self) -> None:
        """Unquoted, single-quoted and upper-case attributes, entities in URLs, a quoted
        '>', a <base>, relative and absolute-path links, duplicates, a lone '<',
        comments and script bodies (left alone), a foreign host (left alone), and an
        unterminated tag at the end."""
        got = self.rewrite(data("hostile.html"), "https://pypi.org/simple/demo/")
        self.assertEqual(got, data("hostile.rewritten.html"))

    def test_parsers_see_the_same_attributes(self) -> None:
        """As html.parser (pip's parser) reads them, the rewritten pages have the same
        anchors with the same attributes; only the href changed, and its fragment not."""
        for name, page in (
            ("six", "https://pypi.org/simple/six/"),
            ("hostile", "https://pypi.org/simple/demo/"),
        ):
            before = anchors(data(f"{name}.html"))
            after = anchors(self.rewrite(data(f"{name}.html"), page))
            self.assertEqual(len(before), len(after), name)
            for old, new in zip(before, after, strict=True):
                self.assertEqual(
                    {k: v for k, v in old.items() if k != "href"},
                    {k: v for k, v in new.items() if k != "href"},
                )
                if old.get("href") is not None:
                    self.assertEqual(old["href"].partition("#")[2], new["href"].partition("#")[2])

    def test_forward_mode_links(self) -> None:
        """For a forward-mode client the links name the files host over http://, which
        it then asks the proxy for."""
        got = self.rewrite(data("six.html"), "https://pypi.org/simple/six/", base=None)
        self.assertEqual(
            got,
            data("six.html").replace(
                b'href="https://files.pythonhosted.org/', b'href="http://files.pythonhosted.org/'
            ),
        )

    def test_root_list(self) -> None:
        """The root list's absolute paths (/simple/<name>/) are rewritten under /pypi/."""
        page = (
            b'<html><body>\n<a href="/simple/six/">six</a>\n'
            b'<a href="/simple/zope-interface/">zope.interface</a>\n</body></html>\n'
        )
        raw, out = self.mktemp(), self.mktemp()
        with open(raw, "wb") as f:
            f.write(page)
        pypi_simple.rewrite_simple(
            raw, out, context("https://pypi.org/simple/"), want_json=False, root=True
        )
        with open(out, "rb") as f:
            got = f.read()
        self.assertEqual(
            got, page.replace(b'href="/simple/', b'href="http://cache:3142/pypi/simple/')
        )

    def test_large_root_page(self) -> None:
        """A root list of 30,000 links, rewritten in a worker thread as the disk pool
        does: every link rewritten. (How long it takes and how long it could hold the
        reactor is measured by ``docs/bench/rewrite.py pypi-large``, at 20 MB.)"""
        lines = [b"<!DOCTYPE html>\n<html><body>\n"]
        n = 30_000
        lines += [
            b'    <a href="/simple/project-%07d/">project-%07d</a>\n' % (i, i) for i in range(n)
        ]
        lines.append(b"</body></html>\n")
        raw, out = self.mktemp(), self.mktemp()
        with open(raw, "wb") as f:
            f.write(b"".join(lines))
        errors: list[BaseException] = []

        def work() -> None:
            try:
                pypi_simple.rewrite_simple(
                    raw, out, context("https://pypi.org/simple/"), want_json=False, root=True
                )
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        worker = threading.Thread(target=work)
        worker.start()
        worker.join(60)
        self.assertFalse(worker.is_alive())
        self.assertEqual(errors, [])
        with open(out, "rb") as f:
            self.assertEqual(f.read().count(b'href="http://cache:3142/pypi/simple/project-'), n)

    def test_pathological_pages_are_unchanged(self) -> None:
        """Pages built to make a scanner backtrack or re-read (an unterminated quote after
        many tags, endless '<', an attribute name of 100 KB, an unclosed comment or
        script) are handled unchanged: their links lead nowhere the proxy serves. (That
        their CPU time grows linearly with their size is measured by
        ``docs/bench/rewrite.py pypi-linear``.)"""
        for page in pypirepo.pathological_pages(100_000):
            self.assertEqual(self.rewrite(page, "https://pypi.org/simple/demo/"), page, page[:30])


class JsonRewriteTests(SynchronousTestCase):
    def rewrite(self, source: bytes, page_url: str, api: bool = False) -> bytes:
        raw, out = self.mktemp(), self.mktemp()
        with open(raw, "wb") as f:
            f.write(source)
        if api:
            pypi_simple.rewrite_api(raw, out, context(page_url))
        else:
            pypi_simple.rewrite_simple(raw, out, context(page_url), want_json=True, root=False)
        with open(out, "rb") as f:
            return f.read()

    def test_golden_six(self) -> None:
        """PEP 691: each files[].url is rewritten (an escaped-slash one and a relative one
        too), keeping its spacing; no other byte changes: not ``url`` keys elsewhere, not
        unknown fields, not escapes in other strings."""
        got = self.rewrite(data("six.json"), "https://pypi.org/simple/six/")
        self.assertEqual(got, data("six.rewritten.json"))

    def test_golden_json_api(self) -> None:
        """The JSON API: ``urls[].url`` and ``releases[*][].url``, not ``project_urls``."""
        got = self.rewrite(data("six-api.json"), "https://pypi.org/pypi/six/json", api=True)
        self.assertEqual(got, data("six-api.rewritten.json"))

    def test_broken_json_refused(self) -> None:
        """A document that is not one JSON value is not served (the fetch fails)."""
        for bad in (b'{"files": [', b'{"files": []} trailing', b'{"files": [{"url": 1,}]}', b"{"):
            self.assertRaises(ValueError, self.rewrite, bad, "https://pypi.org/simple/x/")

    def test_byte_order_mark_and_odd_values(self) -> None:
        """A BOM is kept; a non-string url, a files value that is not a list, are left."""
        doc = '\ufeff{"files": [{"url": 5}, {"url": null}], "meta": {}}'.encode()
        self.assertEqual(self.rewrite(doc, "https://pypi.org/simple/x/"), doc)
        doc = b'{"files": {"url": "https://files.pythonhosted.org/packages/a.whl"}}'
        self.assertEqual(self.rewrite(doc, "https://pypi.org/simple/x/"), doc)

    def test_json_where_html_was_asked_is_refused(self) -> None:
        """An index that sends JSON to a client promised HTML fails the fetch."""
        raw, out = self.mktemp(), self.mktemp()
        with open(raw, "wb") as f:
            f.write(b'{"files": []}')
        self.assertRaises(
            ValueError,
            pypi_simple.rewrite_simple,
            raw,
            out,
            context("https://pypi.org/simple/x/"),
            want_json=False,
            root=False,
        )


class ConversionTests(SynchronousTestCase):
    """An index that ignores Accept: its HTML becomes the JSON the client was promised."""

    def convert(self, page: bytes, page_url: str, root: bool = False) -> dict:
        raw, out = self.mktemp(), self.mktemp()
        with open(raw, "wb") as f:
            f.write(page)
        pypi_simple.rewrite_simple(raw, out, context(page_url), want_json=True, root=root)
        with open(out, "rb") as f:
            return json.load(f)

    def test_project_page(self) -> None:
        """Every anchor becomes a PEP 691 file: rewritten url, hashes from the fragment,
        requires-python unescaped, yanked (reason or true), core-metadata also under
        pypi.org's old JSON name (never PEP 658's, which old pip cannot read), gpg-sig and
        provenance."""
        doc = self.convert(data("six.html"), "https://pypi.org/simple/six/")
        self.assertEqual((doc["meta"], doc["name"]), ({"api-version": "1.0"}, "six"))
        first, sdist, yanked, bare = doc["files"]
        self.assertEqual(first["filename"], "six-1.17.0-py2.py3-none-any.whl")
        self.assertEqual(
            first["url"],
            "http://cache:3142/pypi/files/packages/b7/ce/149a00dd41f10bc29e5921b496af8b574d8413afcd5e30dfa0ed46c2cc5e/six-1.17.0-py2.py3-none-any.whl",
        )
        self.assertEqual(
            first["hashes"],
            {"sha256": "4721f391ed90541fddacab5acf947aa0d3dc7d27b2e1e8eda2be8970586c3274"},
        )
        self.assertEqual(first["requires-python"], "!=3.0.*,!=3.1.*,!=3.2.*,>=2.7")
        meta = {"sha256": "562042078c2752549f6d8a7c86dbc5dd708088a7be6d80672ec7b07100b72468"}
        self.assertEqual((first["core-metadata"], first["data-dist-info-metadata"]), (meta, meta))
        # PEP 714: pip 22.3 to 23.1 fail on any object under this key.
        self.assertNotIn("dist-info-metadata", first)
        self.assertEqual(
            first["provenance"],
            "https://pypi.org/integrity/six/1.17.0/six-1.17.0-py2.py3-none-any.whl/provenance",
        )
        self.assertNotIn("yanked", first)
        self.assertIs(sdist["gpg-sig"], False)
        self.assertEqual(yanked["yanked"], "broken & replaced by 1.17.0")
        self.assertIs(bare["yanked"], True)

    def test_root_list(self) -> None:
        """The root list becomes PEP 691's project list."""
        page = (
            b'<html><body><a href="/simple/six/">six</a>'
            b'<a href="/simple/zope-interface/">zope.interface</a></body></html>'
        )
        doc = self.convert(page, "https://pypi.org/simple/", root=True)
        self.assertEqual(
            doc,
            {
                "meta": {"api-version": "1.0"},
                "projects": [{"name": "six"}, {"name": "zope.interface"}],
            },
        )


class LearnTests(SynchronousTestCase):
    SIX_WHL = (
        "packages/b7/ce/149a00dd41f10bc29e5921b496af8b574d8413afcd5e30dfa0ed46c2cc5e/"
        "six-1.17.0-py2.py3-none-any.whl"
    )
    SIX_SHA = "4721f391ed90541fddacab5acf947aa0d3dc7d27b2e1e8eda2be8970586c3274"
    META_SHA = "562042078c2752549f6d8a7c86dbc5dd708088a7be6d80672ec7b07100b72468"

    def facts_from(self, body: bytes, url: str, path: str = "simple/six/") -> Facts:
        self.assertTrue(learns(path))
        facts = Facts()
        links = UpstreamLinks(tuple(ROUTES.values()))
        facts.add([(links(u), e) for u, e in learn(path, [body], url)])
        return facts

    def check(self, facts: Facts, size: int | None) -> None:
        """The files route's classify finds what the page said, for the file and its
        metadata; the path's own BLAKE2b-256 is then recorded as named, not computed."""
        d = classify(FILES, self.SIX_WHL, facts)
        self.assertEqual(d.cache_class, CacheClass.IMMUTABLE)
        self.assertEqual(dict(d.digests), {"sha256": self.SIX_SHA})
        self.assertEqual(
            dict(d.named_digests),
            {"blake2b-256": "b7ce149a00dd41f10bc29e5921b496af8b574d8413afcd5e30dfa0ed46c2cc5e"},
        )
        self.assertEqual(d.size, size)
        m = classify(FILES, self.SIX_WHL + ".metadata", facts)
        self.assertEqual(dict(m.digests), {"sha256": self.META_SHA})

    def test_from_upstream_html(self) -> None:
        """An HTML page as upstream wrote it: filed under the upstream URLs."""
        facts = self.facts_from(data("six.html"), "https://pypi.org/simple/six/")
        self.assertIsNotNone(facts.get("https://files.pythonhosted.org/" + self.SIX_WHL))
        self.check(facts, None)

    def test_from_rewritten_html(self) -> None:
        """A page as it was stored, rewritten for a reverse-mode client: its links are
        mapped back to the upstream URLs, whatever host the client used."""
        facts = self.facts_from(data("six.rewritten.html"), "https://pypi.org/simple/six/")
        self.assertIsNotNone(facts.get("https://files.pythonhosted.org/" + self.SIX_WHL))
        self.check(facts, None)

    def test_from_forward_mode_page(self) -> None:
        """A page rewritten for a forward-mode client: found by the forward URL."""
        page = data("six.html").replace(b"https://files.", b"http://files.")
        self.check(self.facts_from(page, "https://pypi.org/simple/six/"), None)

    def test_from_json(self) -> None:
        """PEP 691 JSON also gives the size, which is then checked too."""
        self.check(
            self.facts_from(data("six.rewritten.json"), "https://pypi.org/simple/six/"), 11050
        )

    def test_from_json_api(self) -> None:
        """The JSON API: digests.sha256, size and core-metadata."""
        facts = self.facts_from(
            data("six-api.json"), "https://pypi.org/pypi/six/json", "pypi/six/json"
        )
        self.check(facts, 11050)

    def test_weak_or_malformed_hashes_ignored(self) -> None:
        """Only well-formed sha256 is learned: an md5 fragment or a short hex adds no
        check (a stored file is never refetched for want of a digest it lacks)."""
        page = (
            b'<a href="https://files.pythonhosted.org/packages/a.tar.gz#md5=0123456789abcdef0123456789abcdef">a</a>'
            b'<a href="https://files.pythonhosted.org/packages/b.tar.gz#sha256=abc">b</a>'
        )
        self.assertEqual(len(self.facts_from(page, "https://pypi.org/simple/x/", "simple/x/")), 0)


class FileClassifyTests(SynchronousTestCase):
    def test_hosted_file_checks_its_path_digest(self) -> None:
        """A files-host path names the file's BLAKE2b-256, checked with no page at all."""
        path = (
            "packages/b7/ce/149a00dd41f10bc29e5921b496af8b574d8413afcd5e30dfa0ed46c2cc5e/"
            "six-1.17.0.tar.gz"
        )
        d = classify(FILES, path, Facts())
        self.assertEqual(d.cache_class, CacheClass.IMMUTABLE)
        self.assertEqual(
            dict(d.digests),
            {"blake2b-256": "b7ce149a00dd41f10bc29e5921b496af8b574d8413afcd5e30dfa0ed46c2cc5e"},
        )
        self.assertEqual(dict(classify(FILES, path + ".metadata", Facts()).digests), {})

    def test_other_files(self) -> None:
        """Legacy paths and files on the index's own host are kept forever too."""
        for route, path in (
            (FILES, "packages/source/s/six/six-1.16.0.tar.gz"),
            (PYPI, "packages/six-1.16.0-py2.py3-none-any.whl"),
            (PYPI, "root/pypi/+f/0ab/cdef0123/six-1.16.0.tar.gz"),
        ):
            self.assertEqual(classify(route, path, Facts()).cache_class, CacheClass.IMMUTABLE, path)

    def test_json_api_and_the_rest(self) -> None:
        """The JSON API is mutable and rewritten; provenance passes; anything else is a
        local 404."""
        d = classify(PYPI, "pypi/six/json", Facts())
        self.assertEqual((d.cache_class, d.ttl), (CacheClass.MUTABLE, 600.0))
        self.assertIs(d.rewrite, pypi.rewrite_api)
        self.assertTrue(learns("pypi/six/1.17.0/json"))
        self.assertEqual(
            classify(PYPI, "integrity/six/1.17.0/x.whl/provenance").cache_class, CacheClass.PASS
        )
        local = classify(PYPI, "project/six/").local
        assert local is not None
        self.assertEqual(local.status, 404)


def _wheel(name: str) -> tuple[bytes, str, str]:
    """Bytes of a fake file, its files-host path, and its sha256."""
    body = f"PK\x03\x04 {name} ".encode() * 50
    b2 = hashlib.blake2b(body, digest_size=32).hexdigest()
    return body, f"packages/{b2[:2]}/{b2[2:4]}/{b2[4:]}/{name}", hashlib.sha256(body).hexdigest()


class ProxyTests(SynchronousTestCase):
    """The family in the real request cycle (pkgproxy.testing.MemoryProxy)."""

    def setUp(self) -> None:
        self.proxy = MemoryProxy(
            {
                "routes": {
                    "pypi": {"upstream": "http://upstream.test/index/"},
                    "pypi-files": {"upstream": "http://upstream.test/files/"},
                }
            },
            cache_dir=self.mktemp(),
        )
        self.addCleanup(self.proxy.close)
        self.up = self.proxy.upstream
        self.whl, self.path, self.sha = _wheel("demo-1.0-py3-none-any.whl")
        self.meta = b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n"
        self.meta_sha = hashlib.sha256(self.meta).hexdigest()
        self.page = (
            '<!DOCTYPE html>\n<html><body>\n<a href="http://upstream.test/files/'
            f'{self.path}#sha256={self.sha}" data-requires-python="&gt;=3.8" '
            f'data-core-metadata="sha256={self.meta_sha}">demo-1.0-py3-none-any.whl</a><br />\n'
            "</body></html>\n"
        ).encode()
        self.up.add("/index/simple/demo/", self.page, etag=b'"v1"')
        self.up.add("/files/" + self.path, self.whl)
        self.up.add("/files/" + self.path + ".metadata", self.meta)

    def test_negotiated_variants(self) -> None:
        """pip is served JSON (converted here from an index that only has HTML) with
        Vary, its Content-Type and our ETag; a browser's HTML is a variant of its own;
        each is fetched with the chosen Accept and then a hit."""
        resp, body = self.proxy.get("/pypi/simple/demo/", headers={"Accept": PIP_ACCEPT})
        self.assertEqual(self.up.seen[-1].headers[b"accept"], V1_JSON.encode())
        self.assertEqual(
            (header(resp, "content-type"), header(resp, "vary")),
            (V1_JSON, "Accept, Accept-Encoding"),
        )
        self.assertEqual(header(resp, "etag"), f'"{hashlib.sha256(body).hexdigest()}"')
        doc = json.loads(body)
        self.assertEqual(doc["files"][0]["url"], f"http://proxy.test/pypi/files/{self.path}")
        self.assertEqual(doc["files"][0]["requires-python"], ">=3.8")
        resp, html_body = self.proxy.get("/pypi/simple/demo/")
        self.assertEqual((header(resp, "content-type"), header(resp, "x-cache")), (HTML, "MISS"))
        self.assertEqual(
            html_body,
            self.page.replace(b"http://upstream.test/files/", b"http://proxy.test/pypi/files/"),
        )
        resp, again = self.proxy.get("/pypi/simple/demo/", headers={"Accept": PIP_ACCEPT})
        self.assertEqual((again, header(resp, "x-cache")), (body, "HIT"))

    def test_format_parameter_through_the_proxy(self) -> None:
        """?format= gets the type it names whatever Accept says; upstream is asked with
        Accept and without the query, and the page is the same cache entry as the one
        Accept chooses."""
        resp, body = self.proxy.get(
            f"/pypi/simple/demo/?format={V1_JSON}", headers={"Accept": "text/html"}
        )
        self.assertEqual((resp.code, header(resp, "content-type")), (200, V1_JSON))
        self.assertEqual(json.loads(body)["name"], "demo")
        seen = self.up.seen[-1]
        self.assertEqual(seen.headers[b"accept"], V1_JSON.encode())
        self.assertNotIn(b"?", seen.path)
        asked = len(self.up.seen)
        resp, again = self.proxy.get("/pypi/simple/demo/", headers={"Accept": PIP_ACCEPT})
        self.assertEqual((again, header(resp, "x-cache")), (body, "HIT"))
        resp, html = self.proxy.get(
            f"/pypi/simple/demo/?format={HTML}", headers={"Accept": V1_JSON}
        )
        self.assertEqual((header(resp, "content-type"), header(resp, "x-cache")), (HTML, "MISS"))
        self.assertTrue(html.startswith(b"<!DOCTYPE html>"))
        self.assertEqual(len(self.up.seen), asked + 1)

    def test_json_upstream(self) -> None:
        """An index that speaks PEP 691 is served through with its file URLs rewritten."""
        doc = {
            "meta": {"api-version": "1.1"},
            "name": "demo",
            "files": [
                {
                    "filename": "x",
                    "url": f"http://upstream.test/files/{self.path}",
                    "hashes": {"sha256": self.sha},
                    "size": len(self.whl),
                }
            ],
        }
        self.up.add("/index/simple/demo/", json.dumps(doc).encode())
        _, body = self.proxy.get("/pypi/simple/demo/", headers={"Accept": V1_JSON})
        self.assertEqual(
            json.loads(body)["files"][0]["url"], f"http://proxy.test/pypi/files/{self.path}"
        )
        self.assertEqual(self.proxy.get("/pypi/files/" + self.path)[1], self.whl)

    def test_links_follow_the_host_the_client_used(self) -> None:
        """The same page asked for under another host name links to that host."""
        raw = self.proxy.raw(b"GET /pypi/simple/demo/ HTTP/1.1\r\nHost: cache:3142\r\n\r\n")
        self.assertIn(
            f'href="http://cache:3142/pypi/files/{self.path}#sha256={self.sha}"'.encode(), raw
        )

    def test_redirect(self) -> None:
        """An unnormalised name is redirected by the proxy itself."""
        raw = self.proxy.raw(b"GET /pypi/simple/Demo_/ HTTP/1.1\r\nHost: p\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 301 "), raw)
        self.assertIn(b"\r\nLocation: ../demo-/\r\n", raw)
        self.assertEqual(self.up.seen, [])

    def test_forward_mode(self) -> None:
        """A client using pkgproxy as its HTTP proxy for http://pypi.org gets links to
        http://files.pythonhosted.org, and the file through the proxy, verified."""
        raw = self.proxy.raw(b"GET http://pypi.org/simple/demo/ HTTP/1.1\r\nHost: pypi.org\r\n\r\n")
        self.assertIn(f'href="http://files.pythonhosted.org/{self.path}#sha256='.encode(), raw)
        raw = self.proxy.raw(
            f"GET http://files.pythonhosted.org/{self.path} HTTP/1.1\r\n"
            "Host: files.pythonhosted.org\r\n\r\n".encode()
        )
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(self.whl), raw[:300])

    def test_verified_files_kept(self) -> None:
        """With the page cached, the wheel and its metadata match what it says: stored,
        then served from the cache."""
        self.proxy.get("/pypi/simple/demo/", headers={"Accept": PIP_ACCEPT})
        for path, body in ((self.path, self.whl), (self.path + ".metadata", self.meta)):
            resp, got = self.proxy.get("/pypi/files/" + path)
            self.assertEqual((got, header(resp, "x-cache")), (body, "MISS"))
            resp, got = self.proxy.get("/pypi/files/" + path)
            self.assertEqual((got, header(resp, "x-cache")), (body, "HIT"))

    def test_sha256_mismatch_refused_and_not_stored(self) -> None:
        """A file that does not match the page's sha256 (its path digest being right)
        fails the client's transfer and is not stored; a good copy later is."""
        other = b"PK\x03\x04 something else entirely " * 40
        b2 = hashlib.blake2b(other, digest_size=32).hexdigest()
        path = f"packages/{b2[:2]}/{b2[2:4]}/{b2[4:]}/evil-1.0-py3-none-any.whl"
        page = f'<a href="http://upstream.test/files/{path}#sha256={self.sha}">evil</a>'
        self.up.add("/index/simple/evil/", page.encode())
        self.up.add("/files/" + path, other)
        self.proxy.get("/pypi/simple/evil/")
        entries = len(self.proxy.store)
        self.assertRaises(ResponseFailed, self.proxy.get, "/pypi/files/" + path)
        self.assertEqual(len(self.proxy.store), entries)
        self.assertRaises(ResponseFailed, self.proxy.get, "/pypi/files/" + path)
        self.assertEqual(self.up.count("/files/" + path), 2)

    def test_blake2b_mismatch_refused_without_any_page(self) -> None:
        """With no page ever seen, a files-host path still checks its own digest."""
        self.up.add("/files/" + self.path, self.whl[:-1] + b"X")
        self.assertRaises(ResponseFailed, self.proxy.get, "/pypi/files/" + self.path)
        self.assertEqual(len(self.proxy.store), 0)
        self.up.add("/files/" + self.path, self.whl)
        self.assertEqual(self.proxy.get("/pypi/files/" + self.path)[1], self.whl)

    def test_metadata_mismatch_refused(self) -> None:
        """A PEP 658 metadata file must match the page's core-metadata hash."""
        self.proxy.get("/pypi/simple/demo/")
        self.up.add("/files/" + self.path + ".metadata", self.meta + b"Requires-Dist: evil\n")
        self.assertRaises(ResponseFailed, self.proxy.get, "/pypi/files/" + self.path + ".metadata")
        self.assertEqual(len(self.proxy.store), 1)

    def test_json_size_checked(self) -> None:
        """The size a JSON page gives is checked before any byte is stored."""
        doc = {
            "meta": {"api-version": "1.1"},
            "name": "demo",
            "files": [
                {
                    "filename": "x",
                    "url": f"http://upstream.test/files/{self.path}",
                    "hashes": {"sha256": self.sha},
                    "size": len(self.whl) + 1,
                }
            ],
        }
        self.up.add("/index/simple/demo/", json.dumps(doc).encode())
        self.proxy.get("/pypi/simple/demo/", headers={"Accept": V1_JSON})
        resp, _ = self.proxy.get("/pypi/files/" + self.path)
        self.assertEqual(resp.code, 502)
        self.assertEqual(len(self.proxy.store), 1)

    def test_json_api(self) -> None:
        """The JSON API is passed through with file URLs rewritten, cached, and learned."""
        api = {
            "info": {"name": "demo"},
            "urls": [
                {
                    "url": f"http://upstream.test/files/{self.path}",
                    "digests": {"sha256": self.sha},
                    "size": len(self.whl),
                }
            ],
            "releases": {},
        }
        self.up.add("/index/pypi/demo/json", json.dumps(api).encode())
        _, body = self.proxy.get("/pypi/pypi/demo/json")
        self.assertEqual(
            json.loads(body)["urls"][0]["url"], f"http://proxy.test/pypi/files/{self.path}"
        )
        self.assertEqual(header(self.proxy.get("/pypi/pypi/demo/json")[0], "x-cache"), "HIT")
        self.assertEqual(
            self.proxy.facts.get(f"http://upstream.test/files/{self.path}").size, len(self.whl)
        )

    def reopened(self) -> MemoryProxy:
        """The proxy closed, and a new one on its cache directory."""
        self.proxy.close()
        again = MemoryProxy(
            {
                "routes": {
                    "pypi": {"upstream": "http://upstream.test/index/"},
                    "pypi-files": {"upstream": "http://upstream.test/files/"},
                }
            },
            cache_dir=self.proxy.config.cache.dir,
        )
        self.addCleanup(again.close)
        return again

    def test_checks_survive_restart(self) -> None:
        """The stored (rewritten) page is read again when the cache reopens, and what it
        says is checked as before."""
        self.proxy.get("/pypi/simple/demo/", headers={"Accept": PIP_ACCEPT})
        again = self.reopened()
        again.upstream.add("/files/" + self.path + ".metadata", b"Metadata-Version: 2.1\n")
        self.assertRaises(ResponseFailed, again.get, "/pypi/files/" + self.path + ".metadata")
        self.assertEqual(
            again.facts.get(f"http://upstream.test/files/{self.path}.metadata").digests,
            {"sha256": self.meta_sha},
        )
        self.assertEqual(len(again.store), 1)

    def test_listed_file_hashed_once_and_found_by_its_path_alone(self) -> None:
        """A file its page lists is checked against the page's sha256 only; the digest
        its path names is recorded with it, so that after the page is gone (evicted,
        and the cache reopened) the stored file still satisfies a request that knows
        only the path: a hit, with no second download."""
        self.proxy.get("/pypi/simple/demo/", headers={"Accept": PIP_ACCEPT})
        resp, got = self.proxy.get("/pypi/files/" + self.path)
        self.assertEqual((got, header(resp, "x-cache")), (self.whl, "MISS"))
        (stored,) = [e for e in self.proxy.store.entries() if e.url.endswith(self.path)]
        named = self.path.split("/")
        self.assertEqual(stored.digests, {"blake2b-256": "".join(named[1:4])})
        self.assertEqual(stored.sha256, self.sha)
        for e in self.proxy.store.entries():
            if "/simple/" in e.url:
                self.proxy.store.remove(e.key)
        again = self.reopened()
        again.upstream.add("/files/" + self.path, b"not asked for")
        self.assertIsNone(again.facts.get(f"http://upstream.test/files/{self.path}"))
        resp, got = again.get("/pypi/files/" + self.path)
        self.assertEqual((got, header(resp, "x-cache")), (self.whl, "HIT"))
        self.assertEqual(again.upstream.count("/files/" + self.path), 0)

    def test_revalidation(self) -> None:
        """pip's max-age=0 within the shared window is a hit; after the TTL the page is
        revalidated (304 from upstream); with the upstream down it is served stale."""
        self.proxy.get("/pypi/simple/demo/")
        self.proxy.clock.advance(5)
        resp, _ = self.proxy.get("/pypi/simple/demo/", headers={"Cache-Control": "max-age=0"})
        self.assertEqual(header(resp, "x-cache"), "HIT")
        self.assertEqual(self.up.count("/index/simple/demo/"), 1)
        self.proxy.clock.advance(601)
        resp, _ = self.proxy.get("/pypi/simple/demo/")
        self.assertEqual(header(resp, "x-cache"), "REVALIDATED")
        self.assertEqual(self.up.seen[-1].headers.get(b"if-none-match"), b'"v1"')
        self.proxy.clock.advance(601)
        self.up.down = True
        resp, body = self.proxy.get("/pypi/simple/demo/")
        self.assertEqual(header(resp, "x-cache"), "STALE")
        self.assertIn(b"http://proxy.test/pypi/files/", body)


class ScannerTests(SynchronousTestCase):
    def test_attribute_spans(self) -> None:
        """Each attribute's value span covers its quotes, so splicing keeps the rest."""
        page = b'<a b=\'1\' C="2" d=3 e f = "">'
        (tag,) = htmldoc.tags(page)
        got = [(a.name, a.raw, page[a.start : a.end]) for a in tag.attrs]
        self.assertEqual(
            got,
            [
                (b"b", b"1", b"'1'"),
                (b"c", b"2", b'"2"'),
                (b"d", b"3", b"3"),
                (b"e", None, b""),
                (b"f", b"", b'""'),
            ],
        )
