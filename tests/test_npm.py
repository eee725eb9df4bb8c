"""The npm family: policy, packument rewriting, tarball checks, and the whole cycle in memory.

The last class runs a 30 MB packument through the real reactor and a real disk pool and
measures how long the reactor is ever held while it is parsed and rewritten.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import time
from typing import Any

from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed

from pkgproxy.config import BUILTIN_ROUTES
from pkgproxy.families import FAMILIES, CacheClass, Expect, Facts, Request, RewriteContext, npm
from pkgproxy.rewrite import npm_packument
from pkgproxy.testing import MemoryProxy, Seen
from tests.integration.harness import IntegrationTestCase, sleep, static
from tests.support import npmrepo
from tests.support.npmrepo import APP, CORGI, DEP, DEP_NEXT, DEP_OLD, SCOPED

REGISTRY = "https://registry.npmjs.org/"
NPM_ACCEPT = f"{CORGI}; q=1.0, application/json; q=0.8, */*"
ROUTE = next(r for r in BUILTIN_ROUTES if r.name == "npm")
UP = "http://upstream.test/npm/"


def header(resp: Any, name: str) -> str | None:
    values = resp.headers.getRawHeaders(name)
    return values[-1] if values else None


def reverse_context(base: str = "http://cache:3142") -> RewriteContext:
    """What the proxy passes a rewriter for a reverse-mode client of the built-in route."""

    def public(url: str) -> str | None:
        return base + "/npm/" + url[len(REGISTRY) :] if url.startswith(REGISTRY) else None

    return RewriteContext(REGISTRY + "left-pad", public)


class AcceptTests(SynchronousTestCase):
    """Which packument representation an Accept header gets."""

    def test_npm_install_header_is_corgi(self) -> None:
        """npm's install Accept (pacote's corgi header) selects the abbreviated document."""
        self.assertTrue(npm.wants_corgi(NPM_ACCEPT))
        self.assertEqual(npm.variant(Request(NPM_ACCEPT)), "corgi")

    def test_full_document_requests(self) -> None:
        """application/json, */*, no header at all: the full document."""
        for accept in ("application/json", "*/*", "", "text/html, application/json;q=0.9"):
            self.assertEqual(npm.variant(Request(accept)), "full", accept)
        self.assertEqual(npm.variant(None), "full")

    def test_quality_and_case(self) -> None:
        """q=0 refuses the corgi; a malformed q is not a yes; media types ignore case."""
        self.assertFalse(npm.wants_corgi(f"{CORGI};q=0, application/json"))
        self.assertFalse(npm.wants_corgi(f"{CORGI}; q=0.0"))
        self.assertFalse(npm.wants_corgi(f"{CORGI}; q=abc"))
        self.assertTrue(npm.wants_corgi(f"application/json;q=0.5, {CORGI.upper()} ; q=0.1"))
        self.assertTrue(npm.wants_corgi(f"{CORGI};charset=utf-8"))


class ClassifyTests(SynchronousTestCase):
    """Cache classes of the registry's URLs (PROTOCOLS.md 5.1, 5.5)."""

    def classify(self, path: str, accept: str = "", facts: Facts | None = None) -> Any:
        """The built-in route's decision for ``path``."""
        return npm.classify(ROUTE, path, facts or Facts(), Request(accept))

    def test_builtin_route(self) -> None:
        """The built-in route: /npm/ on registry.npmjs.org, forward mode, 5-minute TTL."""
        self.assertEqual(
            (ROUTE.family, ROUTE.prefix, ROUTE.upstream, ROUTE.forward, ROUTE.index_ttl),
            (
                "npm",
                "/npm/",
                REGISTRY,
                ("http://registry.npmjs.org/", "https://registry.npmjs.org/"),
                300.0,
            ),
        )
        self.assertTrue(FAMILIES["npm"].encoded_slash_ok)
        self.assertFalse(FAMILIES["debian"].encoded_slash_ok)

    def test_packuments_are_negotiated_indexes(self) -> None:
        """Plain and scoped packuments: mutable, TTL, variant by Accept, rewritten, Vary."""
        for path in ("left-pad", "@isaacs/string-locale-compare", "JSONStream", "a.b-c_d"):
            for accept, which in ((NPM_ACCEPT, "corgi"), ("application/json", "full")):
                d = self.classify(path, accept)
                self.assertEqual(d.cache_class, CacheClass.MUTABLE, path)
                self.assertEqual(d.ttl, 300.0)
                self.assertEqual(d.variant, which)
                want_headers = {"Accept": npm.UPSTREAM_ACCEPT[which], "Accept-Encoding": "gzip"}
                self.assertEqual(d.upstream_headers, want_headers)
                self.assertEqual(d.response_headers, {"Vary": "Accept, Accept-Encoding"})
                self.assertIsNotNone(d.rewrite)
                # Scoped names go upstream as npm sends them; others as they are.
                want = REGISTRY + path.replace("/", "%2f") if path.startswith("@") else None
                self.assertEqual(d.upstream_url, want)
        self.assertIn(CORGI, npm.UPSTREAM_ACCEPT["corgi"])
        self.assertEqual(npm.UPSTREAM_ACCEPT["full"], "application/json")

    def test_version_documents_are_rewritten_too(self) -> None:
        """/<name>/<version> and dist-tag documents carry a dist.tarball: rewritten."""
        for path in ("left-pad/1.3.0", "left-pad/latest", "@s/n/1.0.0"):
            d = self.classify(path)
            self.assertEqual((d.cache_class, d.variant), (CacheClass.MUTABLE, "full"), path)
            self.assertIsNotNone(d.rewrite)

    def test_tarballs_are_immutable_and_checked_when_known(self) -> None:
        """A tarball is kept forever; the digests a packument gave are required."""
        path = "left-pad/-/left-pad-1.3.0.tgz"
        d = self.classify(path)
        self.assertEqual(
            (d.cache_class, dict(d.digests), d.rewrite), (CacheClass.IMMUTABLE, {}, None)
        )
        facts = Facts()
        facts.add([(REGISTRY + path, Expect(None, {"sha512": "ab", "sha1": "cd"}))])
        d = self.classify(path, facts=facts)
        self.assertEqual(dict(d.digests), {"sha512": "ab", "sha1": "cd"})
        scoped = "@isaacs/string-locale-compare/-/string-locale-compare-1.1.0.tgz"
        self.assertEqual(self.classify(scoped).cache_class, CacheClass.IMMUTABLE)

    def test_ping_is_answered_locally(self) -> None:
        """/-/ping (also ?write=true) is a local 200 ``{}`` in JSON."""
        for path in ("-/ping", "-/ping?write=true"):
            local = self.classify(path).local
            assert local is not None
            self.assertEqual(
                (local.status, json.loads(local.message), local.content_type),
                (200, {}, "application/json"),
            )

    def test_service_endpoints(self) -> None:
        """Search and dist-tag reads pass uncached; keys are kept a day; accounts refused."""
        self.assertEqual(self.classify("-/v1/search?text=x").cache_class, CacheClass.PASS)
        self.assertIsNone(self.classify("-/v1/search?text=x").local)
        self.assertEqual(self.classify("-/package/@s/n/dist-tags").cache_class, CacheClass.PASS)
        keys = self.classify("-/npm/v1/keys")
        self.assertEqual((keys.cache_class, keys.ttl), (CacheClass.MUTABLE, 86400.0))
        for path in ("-/whoami", "-/user/org.couchdb.user:me", "-/npm/v1/tokens"):
            local = self.classify(path).local
            assert local is not None
            self.assertEqual(local.status, 403, path)
            self.assertIn("read-only", local.message)
        for path in ("-/all", "-/v1/unknown"):
            local = self.classify(path).local
            assert local is not None
            self.assertEqual(local.status, 404, path)

    def test_learns_from_documents_only(self) -> None:
        """Packuments and version documents are read for checks; tarballs and /-/ are not."""
        self.assertTrue(npm.learns("left-pad"))
        self.assertTrue(npm.learns("@s/n"))
        self.assertTrue(npm.learns("left-pad/1.3.0"))
        self.assertFalse(npm.learns("left-pad/-/left-pad-1.3.0.tgz"))
        self.assertFalse(npm.learns("-/ping"))
        self.assertFalse(npm.learns(""))


class SriTests(SynchronousTestCase):
    """dist.integrity and dist.shasum turned into the hex digests the fetch compares."""

    def test_left_pad_sample(self) -> None:
        """PROTOCOLS.md 8.3's left-pad dist: sha512 from the SRI, sha1 from shasum."""
        integrity = (
            "sha512-XI5MPzVNApjAyhQzphX8BkmKsKUxD4LdyK24iZeQGinBN9yTQT3bFlCBy/aVx2HrNcqQGsdot"
            "8ghrjyrvMCoEA=="
        )
        expect = npm.expect_of(
            {"integrity": integrity, "shasum": "5B8A3A7765DFE001261DDE915589E782F8C94D1E"}
        )
        assert expect is not None
        self.assertEqual(
            dict(expect.digests),
            {
                "sha512": base64.b64decode(integrity[7:]).hex(),
                "sha1": "5b8a3a7765dfe001261dde915589e782f8c94d1e",
            },
        )
        self.assertEqual(len(expect.digests["sha512"]), 128)
        self.assertIsNone(expect.size)

    def test_odd_integrity_strings(self) -> None:
        """Unknown algorithms, bad base64, wrong lengths and options are coped with."""
        data = b"x"
        b512 = base64.b64encode(hashlib.sha512(data).digest()).decode()
        b1 = base64.b64encode(hashlib.sha1(data).digest()).decode()
        self.assertEqual(
            npm.sri_digests(f"md5-AAAA sha512-{b512}?opt sha1-{b1}  sha256-!!notbase64"),
            {"sha512": hashlib.sha512(data).hexdigest(), "sha1": hashlib.sha1(data).hexdigest()},
        )
        self.assertEqual(npm.sri_digests("sha512-AAAA"), {})
        self.assertEqual(npm.sri_digests(""), {})
        other = base64.b64encode(hashlib.sha512(b"y").digest()).decode()
        self.assertEqual(npm.sri_digests(f"sha512-{b512} sha512-{other}"), {})

    def test_missing_or_odd_dist_fields(self) -> None:
        """No integrity: shasum alone; neither, or malformed: nothing to check."""
        expect = npm.expect_of({"shasum": "a" * 40})
        assert expect is not None
        self.assertEqual(dict(expect.digests), {"sha1": "a" * 40})
        self.assertIsNone(npm.expect_of({}))
        self.assertIsNone(npm.expect_of({"shasum": "xyz", "integrity": 5}))
        # integrity's sha1 wins over a disagreeing shasum, as in npm.
        b1 = base64.b64encode(hashlib.sha1(b"x").digest()).decode()
        expect = npm.expect_of({"integrity": f"sha1-{b1}", "shasum": "b" * 40})
        assert expect is not None
        self.assertEqual(dict(expect.digests), {"sha1": hashlib.sha1(b"x").hexdigest()})


class RewriterTests(SynchronousTestCase):
    """rewrite_packument: every dist.tarball to the proxy, everything else as it was."""

    def rewrite(
        self, doc: Any, context: RewriteContext | None = None, raw: bytes | None = None
    ) -> Any:
        """Rewrite ``doc`` (or the bytes ``raw``) through files, as the fetch does."""
        work = self.mktemp()
        os.makedirs(work)
        src, out = os.path.join(work, "raw"), os.path.join(work, "out")
        with open(src, "wb") as f:
            f.write(raw if raw is not None else json.dumps(doc).encode())
        npm_packument.rewrite_packument(src, out, context or reverse_context())
        with open(out, "rb") as f:
            return json.loads(f.read())

    def test_full_packument(self) -> None:
        """Tarball URLs point at the proxy; integrity, shasum and all else are unchanged."""
        doc = npmrepo.packument([DEP_OLD, DEP, DEP_NEXT], REGISTRY)
        got = self.rewrite(doc)
        for p in (DEP_OLD, DEP, DEP_NEXT):
            dist = got["versions"][p.version]["dist"]
            self.assertEqual(dist["tarball"], f"http://cache:3142/npm/{p.tarball_path}")
            self.assertEqual((dist["integrity"], dist["shasum"]), (p.integrity, p.sha1))
            dist["tarball"] = REGISTRY + p.tarball_path
        self.assertEqual(got, doc)

    def test_scoped_packument(self) -> None:
        """A scoped tarball path keeps its raw slash: /npm/@scope/name/-/name-v.tgz."""
        got = self.rewrite(npmrepo.packument([SCOPED], REGISTRY))
        self.assertEqual(
            got["versions"]["0.3.0"]["dist"]["tarball"],
            "http://cache:3142/npm/@pkgproxy-fixture/scoped/-/scoped-0.3.0.tgz",
        )

    def test_abbreviated_packument(self) -> None:
        """The corgi form (no _id, time or readme; has modified) is rewritten the same way."""
        doc = npmrepo.packument([APP], REGISTRY, abbreviated=True)
        got = self.rewrite(doc)
        self.assertEqual(
            got["versions"]["1.0.0"]["dist"]["tarball"],
            "http://cache:3142/npm/pkgproxy-fixture-app/-/pkgproxy-fixture-app-1.0.0.tgz",
        )
        self.assertEqual(got["modified"], doc["modified"])
        self.assertEqual(list(got), list(doc))  # key order kept

    def test_escaped_slashes_and_unicode(self) -> None:
        """``https:\\/\\/`` is understood; non-ASCII text and lone surrogates survive."""
        raw = (
            b'{"name":"x","readme":"\\u00fcn\\u00efc\\u00f6d\\u00e9 \\ud800 \xe2\x9c\x93",'
            b'"versions":{"1.0.0":{"dist":{"tarball":'
            b'"https:\\/\\/registry.npmjs.org\\/x\\/-\\/x-1.0.0.tgz"}}}}'
        )
        got = self.rewrite(None, raw=raw)
        self.assertEqual(
            got["versions"]["1.0.0"]["dist"]["tarball"], "http://cache:3142/npm/x/-/x-1.0.0.tgz"
        )
        self.assertEqual(got["readme"], "ünïcödé \ud800 ✓")

    def test_missing_or_odd_dist_fields(self) -> None:
        """Versions without dist, with odd dists or tarballs are left alone, no failure."""
        doc = {
            "name": "odd",
            "versions": {
                "1": {"name": "odd"},
                "2": {"dist": None},
                "3": {"dist": {"shasum": "a" * 40}},
                "4": {"dist": {"tarball": 42}},
                "5": "not an object",
                "6": {"dist": {"tarball": "ftp://registry.npmjs.org/odd/-/odd-6.tgz"}},
                "7": {"dist": {"tarball": "https://elsewhere.example/odd-7.tgz"}},
                "8": {"dist": {"tarball": "/odd/-/odd-8.tgz"}},
                "9": {"dist": {"tarball": "http://registry.npmjs.org/odd/-/odd-9.tgz"}},
            },
        }
        got = self.rewrite(doc)
        for v in ("1", "2", "3", "4", "5", "6", "7"):
            self.assertEqual(got["versions"][v], doc["versions"][v], v)
        # Relative to the document, and http:// for an https:// route: the same file.
        self.assertEqual(
            got["versions"]["8"]["dist"]["tarball"], "http://cache:3142/npm/odd/-/odd-8.tgz"
        )
        self.assertEqual(
            got["versions"]["9"]["dist"]["tarball"], "http://cache:3142/npm/odd/-/odd-9.tgz"
        )
        self.assertEqual(self.rewrite({"name": "x", "versions": []}), {"name": "x", "versions": []})
        self.assertEqual(self.rewrite({}), {})

    def test_version_document(self) -> None:
        """A single version document's own dist is rewritten."""
        got = self.rewrite(DEP.manifest(REGISTRY))
        self.assertEqual(got["dist"]["tarball"], f"http://cache:3142/npm/{DEP.tarball_path}")

    def test_forward_mode(self) -> None:
        """For a forward-proxy client the tarball stays on http://registry.npmjs.org/."""
        context = RewriteContext(
            REGISTRY + "x",
            lambda url: (
                "http://registry.npmjs.org/" + url[len(REGISTRY) :]
                if url.startswith(REGISTRY)
                else None
            ),
        )
        got = self.rewrite(npmrepo.packument([DEP], REGISTRY), context)
        self.assertEqual(
            got["versions"]["2.1.0"]["dist"]["tarball"],
            f"http://registry.npmjs.org/{DEP.tarball_path}",
        )

    def test_not_a_packument_fails(self) -> None:
        """An HTML error page or a JSON array is refused (so nothing is cached)."""
        self.assertRaises(ValueError, self.rewrite, None, None, b"<html>oops</html>")
        self.assertRaises(ValueError, self.rewrite, None, None, b"[1, 2]")
        self.assertRaises(ValueError, self.rewrite, None, None, b"\xff\xfe\x00garbage")

    def test_gzip_body_stays_gzip(self) -> None:
        """A gzip body (upstream ignored identity) is rewritten and written back gzip'd,
        byte-identically on every run (no name or time in the gzip header)."""
        raw = gzip.compress(json.dumps(npmrepo.packument([DEP], REGISTRY)).encode())
        outs = []
        for _ in range(2):
            work = self.mktemp()
            os.makedirs(work)
            src, out = os.path.join(work, "raw"), os.path.join(work, "out")
            with open(src, "wb") as f:
                f.write(raw)
            npm_packument.rewrite_packument(src, out, reverse_context())
            with open(out, "rb") as f:
                outs.append(f.read())
        self.assertEqual(outs[0], outs[1])
        doc = json.loads(gzip.decompress(outs[0]))
        self.assertTrue(doc["versions"]["2.1.0"]["dist"]["tarball"].startswith("http://cache"))

    def test_huge_document(self) -> None:
        """A 30 MB packument of 25,000 versions: every tarball rewritten, nothing else."""
        doc = npmrepo.huge_packument(30_000_000, REGISTRY)
        got = self.rewrite(doc)
        self.assertEqual(len(got["versions"]), len(doc["versions"]))
        for version, manifest in got["versions"].items():
            tarball = manifest["dist"]["tarball"]
            self.assertEqual(tarball, f"http://cache:3142/npm/huge/-/huge-{version}.tgz")
            manifest["dist"]["tarball"] = doc["versions"][version]["dist"]["tarball"]
        self.assertEqual(got, doc)

    def test_writer_matches_json(self) -> None:
        """The piecewise writer gives what json.loads reads back as the same value."""
        value = {"a": [1, 2.5, None, True, {"b": ["c", {"d": "é"}]}], "e": {}, "f": [], "": 0}
        chunks: list[bytes] = []
        npm_packument.write_json(value, chunks.append)
        self.assertEqual(json.loads(b"".join(chunks)), value)
        chunks.clear()
        npm_packument.write_json([], chunks.append)
        self.assertEqual(b"".join(chunks), b"[]")


class LearnTests(SynchronousTestCase):
    """learn(): reading the stored (rewritten) packument back into tarball checks."""

    def learn(self, doc: Any, path: str, url: str) -> dict[str, Expect]:
        """What learn() reads from ``doc`` stored for ``path``, fetched from ``url``."""
        return dict(npm.learn(path, [json.dumps(doc).encode()], url))

    def test_rewritten_document_gives_upstream_urls(self) -> None:
        """Tarball URLs naming the proxy are mapped back to the registry's URLs."""
        doc = npmrepo.packument([DEP_OLD, DEP], "http://cache:3142/npm/")
        learned = self.learn(doc, DEP.name, REGISTRY + DEP.name)
        self.assertEqual(
            learned,
            {
                REGISTRY + p.tarball_path: Expect(None, {"sha512": p.sha512, "sha1": p.sha1})
                for p in (DEP_OLD, DEP)
            },
        )

    def test_scoped_and_encoded(self) -> None:
        """A scoped tarball, with a raw or an encoded slash, maps to one canonical URL."""
        want = REGISTRY + SCOPED.tarball_path
        fetched = REGISTRY + "@pkgproxy-fixture%2fscoped"  # the URL the document came from
        doc = npmrepo.packument([SCOPED], "http://cache:3142/npm/")
        self.assertEqual(list(self.learn(doc, SCOPED.name, fetched)), [want])
        tarball = doc["versions"]["0.3.0"]["dist"]["tarball"]
        doc["versions"]["0.3.0"]["dist"]["tarball"] = tarball.replace(
            "@pkgproxy-fixture/scoped", "@pkgproxy-fixture%2fscoped"
        )
        self.assertEqual(list(self.learn(doc, SCOPED.name, fetched)), [want])
        self.assertEqual(list(self.learn(doc, SCOPED.name, REGISTRY + SCOPED.name)), [want])

    def test_forward_and_odd_shapes(self) -> None:
        """Forward-mode URLs, query strings, odd tarballs and bad documents."""
        doc = npmrepo.packument([DEP], "http://registry.npmjs.org/")
        doc["versions"]["9"] = {
            "dist": {"tarball": "https://cdn.example/blob/9", "shasum": "a" * 40}
        }
        doc["versions"]["10"] = {"dist": {"tarball": "relative.tgz", "shasum": "a" * 40}}
        doc["versions"]["11"] = {"dist": {"tarball": REGISTRY + "x/-/x-11.tgz"}}
        learned = self.learn(
            doc, DEP.name + "/2.1.0?write=true", REGISTRY + DEP.name + "/2.1.0?write=true"
        )
        # Only the package's own tarballs: not one elsewhere, not another package's.
        self.assertEqual(set(learned), {REGISTRY + DEP.tarball_path})
        self.assertEqual(npm.learn(DEP.name, [b"<html>"], REGISTRY + DEP.name), [])


# -- the whole cycle in memory ---------------------------------------------------------------


class NpmProxyTests(SynchronousTestCase):
    """The npm route end to end in memory: MemoryProxy and a registry that negotiates."""

    def setUp(self) -> None:
        self.proxy = MemoryProxy(
            {"routes": {"npm": {"upstream": UP, "index_ttl": "60s"}}}, cache_dir=self.mktemp()
        )
        self.addCleanup(self.proxy.close)
        self.up = self.proxy.upstream
        self.corgi: dict[bytes, bytes] = {}
        plain = self.up.render

        def render(request: Any) -> Any:
            # A registry that answers the corgi Accept with the abbreviated document.
            body = self.corgi.get(request.uri)
            if body is not None and CORGI.encode() in (request.getHeader(b"accept") or b""):
                self.up.seen.append(Seen(request.method, request.uri, {}))
                request.setHeader(b"content-type", CORGI.encode())
                request.setHeader(b"content-length", b"%d" % len(body))
                return body
            return plain(request)

        self.up.render = render  # type: ignore[method-assign]

    def publish(self, *versions: npmrepo.NpmPackage, etag: bytes | None = None) -> str:
        """Serve a package's packuments (both forms) and tarballs; returns its path."""
        name = versions[0].name
        upstream_path = f"/npm/{name.replace('/', '%2f')}"  # as npm itself asks
        full = json.dumps(npmrepo.packument(versions, UP)).encode()
        self.up.add(upstream_path, full, headers={b"content-type": b"application/json"}, etag=etag)
        self.corgi[upstream_path.encode()] = json.dumps(
            npmrepo.packument(versions, UP, abbreviated=True)
        ).encode()
        for p in versions:
            self.up.add(f"/npm/{p.tarball_path}", p.tarball)
        return f"/npm/{name}"

    def test_install_flow(self) -> None:
        """Corgi packument, then the tarball its rewritten URL names: verified and kept."""
        self.publish(DEP_OLD, DEP)
        resp, body = self.proxy.get(f"/npm/{DEP.name}", headers={"Accept": NPM_ACCEPT})
        self.assertEqual(resp.code, 200)
        self.assertEqual(header(resp, "content-type"), CORGI)
        self.assertEqual(header(resp, "vary"), "Accept, Accept-Encoding")
        self.assertEqual(header(resp, "etag"), f'"{hashlib.sha256(body).hexdigest()}"')
        doc = json.loads(body)
        self.assertIn("modified", doc)
        tarball = doc["versions"]["2.1.0"]["dist"]["tarball"]
        self.assertEqual(tarball, f"http://proxy.test/npm/{DEP.tarball_path}")
        self.assertEqual(len(self.proxy.facts), 2)
        resp, got = self.proxy.get(tarball[len("http://proxy.test") :])
        self.assertEqual((resp.code, got, header(resp, "x-cache")), (200, DEP.tarball, "MISS"))
        entry = self.proxy.store.peek(f"npm:{DEP.tarball_path}")
        assert entry is not None
        self.assertEqual(entry.digests, {"sha512": DEP.sha512, "sha1": DEP.sha1})
        resp, got = self.proxy.get(f"/npm/{DEP.tarball_path}")
        self.assertEqual((got, header(resp, "x-cache")), (DEP.tarball, "HIT"))
        self.assertEqual(self.up.count(f"/npm/{DEP.tarball_path}"), 1)

    def test_tarball_stored_before_its_packument(self) -> None:
        """A tarball fetched first (a lockfile install asks no packument), its packument
        after: the stored copy is hashed once with the digests the packument gives,
        which it matches, and it stays a hit, the upstream gone too. A tarball whose
        packument says otherwise is fetched again."""
        self.publish(DEP)
        resp, got = self.proxy.get(f"/npm/{DEP.tarball_path}")
        self.assertEqual((got, header(resp, "x-cache")), (DEP.tarball, "MISS"))
        entry = self.proxy.store.peek(f"npm:{DEP.tarball_path}")
        assert entry is not None
        self.assertEqual(entry.digests, {})
        self.proxy.get(f"/npm/{DEP.name}", headers={"Accept": NPM_ACCEPT})
        self.up.down = True
        for _ in range(2):
            resp, got = self.proxy.get(f"/npm/{DEP.tarball_path}")
            self.assertEqual((got, header(resp, "x-cache")), (DEP.tarball, "HIT"))
        self.assertEqual(entry.digests, {"sha512": DEP.sha512, "sha1": DEP.sha1})
        self.assertEqual(self.up.count(f"/npm/{DEP.tarball_path}"), 1)

        self.up.down = False
        other = npmrepo.NpmPackage(DEP_OLD.name, DEP_OLD.version, {"other": "1.0.0"})
        self.up.add(f"/npm/{DEP_OLD.tarball_path}", other.tarball)
        resp, got = self.proxy.get(f"/npm/{DEP_OLD.tarball_path}")
        self.assertEqual((resp.code, got), (200, other.tarball))
        self.publish(DEP_OLD, DEP)
        self.proxy.clock.advance(61)
        self.proxy.get(f"/npm/{DEP.name}", headers={"Accept": NPM_ACCEPT})
        resp, got = self.proxy.get(f"/npm/{DEP_OLD.tarball_path}")
        self.assertEqual((got, header(resp, "x-cache")), (DEP_OLD.tarball, "MISS"))
        self.assertEqual(self.up.count(f"/npm/{DEP_OLD.tarball_path}"), 2)

    def test_variants_are_separate(self) -> None:
        """Corgi and full Accept: two upstream fetches, two entries, each its own type."""
        path = self.publish(DEP)
        corgi, corgi_body = self.proxy.get(path, headers={"Accept": NPM_ACCEPT})
        full, full_body = self.proxy.get(path, headers={"Accept": "application/json"})
        self.assertEqual(header(corgi, "content-type"), CORGI)
        self.assertEqual(header(full, "content-type"), "application/json")
        self.assertNotEqual(corgi_body, full_body)
        self.assertIn("readme", json.loads(full_body))
        self.assertNotIn("readme", json.loads(corgi_body))
        self.assertEqual(self.up.seen[-1].headers[b"accept"], b"application/json")
        for accept, body in ((NPM_ACCEPT, corgi_body), ("application/json", full_body)):
            resp, again = self.proxy.get(path, headers={"Accept": accept})
            self.assertEqual((again, header(resp, "x-cache")), (body, "HIT"))
        self.assertEqual(len(self.up.seen), 2)

    def test_scoped_spellings_share_one_entry(self) -> None:
        """@scope%2fname, @scope%2Fname and @scope/name: one upstream fetch, one entry."""
        self.publish(SCOPED)
        first, body = self.proxy.get("/npm/@pkgproxy-fixture%2fscoped")
        self.assertEqual((first.code, header(first, "x-cache")), (200, "MISS"))
        for spelling in ("@pkgproxy-fixture%2Fscoped", "@pkgproxy-fixture/scoped"):
            resp, again = self.proxy.get(f"/npm/{spelling}")
            self.assertEqual((again, header(resp, "x-cache")), (body, "HIT"), spelling)
        self.assertEqual(self.up.count("/npm/@pkgproxy-fixture%2fscoped"), 1)
        self.assertEqual(len(self.up.seen), 1)
        tarball = json.loads(body)["versions"]["0.3.0"]["dist"]["tarball"]
        resp, got = self.proxy.get(tarball[len("http://proxy.test") :])
        self.assertEqual(got, SCOPED.tarball)
        entry = self.proxy.store.peek(f"npm:{SCOPED.tarball_path}")
        assert entry is not None
        self.assertEqual(entry.digests["sha512"], SCOPED.sha512)

    def test_encoded_slash_cannot_climb(self) -> None:
        """An encoded slash is a real one: ``..%2f`` is still a refused dot segment."""
        resp, body = self.proxy.get("/npm/@x%2f..%2f..%2fetc")
        self.assertEqual(resp.code, 400)
        self.assertEqual(self.up.seen, [])

    def test_tarball_mismatch_is_never_stored(self) -> None:
        """A tarball whose bytes contradict the packument fails and is not kept."""
        path = self.publish(DEP)
        self.proxy.get(path, headers={"Accept": NPM_ACCEPT})
        tarball = f"/npm/{DEP.tarball_path}"
        self.up.add(tarball, DEP_NEXT.tarball)  # another package's bytes under this name
        self.assertRaises(ResponseFailed, self.proxy.get, tarball)
        self.assertIsNone(self.proxy.store.peek(f"npm:{DEP.tarball_path}"))
        flipped = bytearray(DEP.tarball)
        flipped[len(flipped) // 2] ^= 1
        self.up.add(tarball, bytes(flipped))  # same length, one bit off
        self.assertRaises(ResponseFailed, self.proxy.get, tarball)
        self.assertIsNone(self.proxy.store.peek(f"npm:{DEP.tarball_path}"))
        self.up.add(tarball, DEP.tarball)
        resp, got = self.proxy.get(tarball)
        self.assertEqual((got, header(resp, "x-cache")), (DEP.tarball, "MISS"))

    def test_tarball_before_packument(self) -> None:
        """With no packument read, a tarball is kept unverified; once a packument says
        otherwise, the stored copy is fetched again."""
        tarball = f"/npm/{DEP.tarball_path}"
        self.up.add(tarball, b"\x1f\x8b not the real tarball")
        resp, got = self.proxy.get(tarball)
        self.assertEqual((resp.code, got), (200, b"\x1f\x8b not the real tarball"))
        self.publish(DEP)
        self.proxy.get(f"/npm/{DEP.name}", headers={"Accept": NPM_ACCEPT})
        resp, got = self.proxy.get(tarball)
        self.assertEqual((got, header(resp, "x-cache")), (DEP.tarball, "MISS"))
        self.assertEqual(self.up.count(tarball), 2)

    def test_checks_survive_restart(self) -> None:
        """The stored packument is read again when the cache reopens."""
        self.publish(DEP)
        self.proxy.get(f"/npm/{DEP.name}", headers={"Accept": NPM_ACCEPT})
        self.proxy.close()
        again = MemoryProxy(
            {"routes": {"npm": {"upstream": UP}}}, cache_dir=self.proxy.config.cache.dir
        )
        self.addCleanup(again.close)
        again.upstream.add(f"/npm/{DEP.tarball_path}", b"\x1f\x8b not the real tarball")
        self.assertRaises(ResponseFailed, again.get, f"/npm/{DEP.tarball_path}")
        self.assertEqual(
            again.facts.get(UP + DEP.tarball_path),
            Expect(None, {"sha512": DEP.sha512, "sha1": DEP.sha1}),
        )

    def test_stale_when_upstream_fails(self) -> None:
        """A packument past its TTL is served stale (with a Warning) when upstream is down."""
        path = self.publish(DEP)
        _, body = self.proxy.get(path)
        self.up.down = True
        self.proxy.clock.advance(61)
        resp, again = self.proxy.get(path)
        self.assertEqual((resp.code, again, header(resp, "x-cache")), (200, body, "STALE"))
        self.assertIn("110", header(resp, "warning") or "")

    def test_upstream_ignoring_if_none_match(self) -> None:
        """A registry that answers If-None-Match with 200 (as npm's does): the proxy's own
        ETag is a hash of what it serves, so an unchanged document still gives its
        clients a 304, and a changed one a new body."""
        path = self.publish(DEP)  # no ETag upstream: every request is answered 200
        resp, body = self.proxy.get(path)
        etag = header(resp, "etag")
        assert etag is not None
        self.proxy.clock.advance(61)
        resp, again = self.proxy.get(path, headers={"If-None-Match": etag})
        self.assertEqual(resp.code, 304)
        self.assertEqual(self.up.count(path), 2)
        self.publish(DEP, DEP_NEXT)
        self.proxy.clock.advance(61)
        resp, changed = self.proxy.get(path, headers={"If-None-Match": etag})
        self.assertEqual(resp.code, 200)
        self.assertIn("3.0.0", json.loads(changed)["versions"])
        self.assertNotEqual(header(resp, "etag"), etag)

    def test_not_found_passes(self) -> None:
        """An unknown package: the registry's 404 and its JSON error reach the client."""
        self.up.add("/npm/nope", b'{"error":"Not found"}', status=404)
        for _ in range(2):
            resp, body = self.proxy.get("/npm/nope")
            self.assertEqual((resp.code, json.loads(body)), (404, {"error": "Not found"}))
        self.assertEqual(len(self.proxy.store), 0)

    def test_bad_upstream_document_is_not_cached(self) -> None:
        """A 200 that is not JSON (a captive portal page) fails and is not kept; the log
        says so in one line, with no traceback."""
        self.up.add("/npm/portal", b"<html>log in to the wifi</html>")
        with capturedLogs() as events:
            resp, body = self.proxy.get("/npm/portal")
        self.assertEqual(resp.code, 502)
        self.assertIn(b"cannot rewrite", body)
        self.assertEqual(len(self.proxy.store), 0)
        said = [formatEvent(e) for e in events if "cannot rewrite" in formatEvent(e)]
        self.assertEqual(len(said), 1, said)
        self.assertRegex(said[0], r"^cannot rewrite http://\S+/npm/portal: not a JSON document")
        self.assertEqual([e for e in events if "log_failure" in e], [])

    def test_audit_passed_through_uncached(self) -> None:
        """npm's audit POST reaches the registry with its body, every time; the answer
        is relayed, not stored. With the registry unreachable the client learns at once."""
        self.up.add(
            "/npm/-/npm/v1/security/advisories/bulk",
            b'{"left-pad":[]}',
            headers={b"content-type": b"application/json"},
        )
        for _ in range(2):
            results: list[Any] = []

            def keep(r: Any, results: list[Any] = results) -> Any:
                results.append(r)
                return self.proxy.stub.content(r)

            d = self.proxy.stub.request(
                "POST",
                "http://proxy.test/npm/-/npm/v1/security/advisories/bulk",
                data=b'{"left-pad":["1.3.0"]}',
                headers={"Content-Type": "application/json", "Authorization": "Bearer x"},
            )
            d.addCallback(keep)
            d.addCallback(results.append)
            self.proxy.flush()
            self.assertEqual((results[0].code, results[1]), (200, b'{"left-pad":[]}'))
        posts = [s for s in self.up.seen if s.method == b"POST"]
        self.assertEqual(len(posts), 2)
        self.assertNotIn(b"authorization", posts[-1].headers)
        self.assertEqual(len(self.proxy.store), 0)
        self.up.down = True
        resp, _ = self.proxy.get("/npm/-/npm/v1/security/audits/quick", method="POST")
        self.assertEqual(resp.code, 503)

    def test_ping_and_refusals(self) -> None:
        """/-/ping answers {} here; writes are 405 with a reason; nothing goes upstream."""
        resp, body = self.proxy.get("/npm/-/ping?write=true")
        self.assertEqual((resp.code, json.loads(body)), (200, {}))
        self.assertEqual(header(resp, "content-type"), "application/json")
        resp, body = self.proxy.get("/npm/-/whoami")
        self.assertEqual(resp.code, 403)
        for method, path in (
            ("PUT", "/npm/some-package"),
            ("PUT", "/npm/-/user/org.couchdb.user:me"),
            ("POST", "/npm/-/v1/login"),
            ("DELETE", "/npm/some-package/-/some-package-1.0.0.tgz/-rev/1"),
            ("PUT", "/npm/-/package/some-package/dist-tags/latest"),
        ):
            resp, body = self.proxy.get(path, method=method)
            self.assertEqual(resp.code, 405, (method, path))
            self.assertEqual(header(resp, "allow"), "GET, HEAD")
            self.assertIn(method.encode(), body)
        self.assertEqual(self.up.seen, [])

    def test_root_tarball_alias(self) -> None:
        """npm 9+ moves a registry.npmjs.org tarball URL (from a lockfile, or a packument
        it did not get from pkgproxy) onto the configured registry's host with the path
        kept, dropping /npm: /<name>/-/<file>.tgz at the root must serve the tarball.
        """
        self.publish(DEP)
        self.proxy.get(f"/npm/{DEP.name}")
        resp, got = self.proxy.get(f"/{DEP.tarball_path}")
        self.assertEqual((resp.code, got), (200, DEP.tarball))
        resp, got = self.proxy.get(f"/{SCOPED.tarball_path}")
        self.assertEqual(resp.code, 404)  # not published here: the registry's answer

    def test_forward_mode(self) -> None:
        """A client using pkgproxy as its proxy for http://registry.npmjs.org/ gets
        tarball URLs on that host, which come back through the proxy too."""
        self.publish(DEP)
        raw = self.proxy.raw(
            b"GET http://registry.npmjs.org/pkgproxy-fixture-dep HTTP/1.1\r\n"
            b"Host: registry.npmjs.org\r\nAccept: application/json\r\n\r\n"
        )
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        tarball = json.loads(body)["versions"]["2.1.0"]["dist"]["tarball"]
        self.assertEqual(tarball, f"http://registry.npmjs.org/{DEP.tarball_path}")
        raw = self.proxy.raw(f"GET {tarball} HTTP/1.1\r\nHost: registry.npmjs.org\r\n\r\n".encode())
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw[:200])
        self.assertTrue(raw.endswith(DEP.tarball))
        self.assertIsNotNone(self.proxy.store.peek(f"npm:{DEP.tarball_path}"))


# -- a large packument over sockets ----------------------------------------------------------


class LargePackumentTests(IntegrationTestCase):
    """A large packument through real sockets, a real disk pool and the real reactor.

    How long the 30 MB case could hold the reactor is measured by
    ``docs/bench/rewrite.py npm-huge``; here, what is served and learned.
    """

    async def test_large_packument_served_and_learned(self) -> None:
        """A 3 MB packument of thousands of versions is downloaded, rewritten, stored,
        learned and served: every tarball link names the proxy, every version is checked."""
        upstream = await self.start_upstream()
        doc = npmrepo.huge_packument(3_000_000, upstream.url("/"), name="huge")
        body = json.dumps(doc).encode()
        versions = len(doc["versions"])
        del doc
        upstream.handlers[b"/huge"] = static(body, [(b"content-type", b"application/json")])
        proxy = await self.start_proxy({"routes": {"npm": {"upstream": upstream.url("/")}}})
        result = await self.client().get(proxy.url("/npm/huge"), timeout=30)
        await proxy.settled()
        await proxy.no_temp_files()
        deadline = time.monotonic() + 20
        while len(proxy.learner.facts) < versions and time.monotonic() < deadline:
            await sleep(0.05)

        self.assertEqual((result.status, result.error), (200, None))
        assert result.body is not None
        served = json.loads(result.body)
        self.assertEqual(len(served["versions"]), versions)
        for manifest in served["versions"].values():
            self.assertTrue(manifest["dist"]["tarball"].startswith(proxy.url("/npm/huge/-/")))
        self.assertEqual(len(proxy.learner.facts), versions)


class RevalidationOverSocketsTests(IntegrationTestCase):
    """Revalidating a packument against a registry that ignores If-None-Match, for real."""

    async def test_unchanged_document_gives_304_to_the_revalidating_client(self) -> None:
        """The client whose request finds the packument expired sends the proxy's ETag;
        the registry answers the conditional request with a full 200 of the same
        document, so the client should get a 304.
        """
        upstream = await self.start_upstream()
        body = json.dumps(npmrepo.packument([DEP], upstream.url("/"))).encode()
        upstream.handlers[b"/" + DEP.name.encode()] = static(
            body, [(b"etag", b'"registry-etag"'), (b"content-type", b"application/json")]
        )
        proxy = await self.start_proxy(
            {"routes": {"npm": {"upstream": upstream.url("/"), "index_ttl": "1s"}}}
        )
        client = self.client()
        first = await client.get(proxy.url(f"/npm/{DEP.name}"))
        etag = first.header(b"etag")
        assert etag is not None
        await proxy.settled()
        proxy.clock.advance(1.2)
        again = await client.get(proxy.url(f"/npm/{DEP.name}"), headers={b"if-none-match": etag})
        self.assertEqual(upstream.requests[-1].headers.get(b"if-none-match"), b'"registry-etag"')
        self.assertEqual(again.header(b"etag"), etag)
        self.assertEqual(again.status, 304)
