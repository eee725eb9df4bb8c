"""The Go family: GOPROXY and checksum database paths, the zip's h1: hash, and the
proxy serving them (an in-memory proxy against a scripted upstream)."""

from __future__ import annotations

import io
import warnings
import zipfile
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed

from pkgproxy import clientconfig
from pkgproxy.config import BUILTIN_ROUTES, Route
from pkgproxy.families import FAMILIES, CacheClass, Expect, Facts, go
from pkgproxy.families.go import GoModHasher, GoZipHasher
from pkgproxy.testing import MemoryProxy
from tests.support.goproxy import LIB, LIB_NEXT, UPPER, GoModule, tree

ROUTE = Route("go", "go", "/go/", "https://proxy.golang.org/", index_ttl=300)
UP = "http://upstream.test/go/"


def header(resp: Any, name: str) -> str | None:
    values = resp.headers.getRawHeaders(name)
    return values[-1] if values else None


def hashed(data: bytes, step: int) -> str:
    h = GoZipHasher()
    for i in range(0, len(data), step):
        h.update(data[i : i + step])
    return h.hexdigest()


class _Unseekable(io.RawIOBase):
    """A sink zipfile cannot seek in: it writes data descriptors, as Go's writer does."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.data += b
        return len(b)


def streamed_zip(files: dict[str, bytes]) -> bytes:
    out = _Unseekable()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return bytes(out.data)


class GoPolicyTests(SynchronousTestCase):
    def classify(self, path: str, facts: Facts | None = None) -> Any:
        return go.classify(ROUTE, path, facts)

    def test_version_files_are_immutable(self) -> None:
        """A released version's .info, .mod and .zip never change; a 404 for one is
        remembered briefly."""
        for ext in ("info", "mod", "zip"):
            for version in ("v1.2.3", "v0.0.0-20240101000000-abcdefabcdef", "v2.0.0+incompatible"):
                d = self.classify(f"github.com/!burnt!sushi/toml/@v/{version}.{ext}")
                self.assertEqual((d.cache_class, d.absent_ttl), (CacheClass.IMMUTABLE, 300))
                self.assertTrue(d.remembers_absence)

    def test_indexes_and_queries(self) -> None:
        """The version list, @latest and a query's .info are revalidated after index_ttl."""
        for path in (
            "golang.org/x/mod/@v/list",
            "golang.org/x/mod/@latest",
            "golang.org/x/mod/@v/master.info",
            "golang.org/x/mod/@v/v1.2.info",
        ):
            d = self.classify(path)
            self.assertEqual((d.cache_class, d.ttl), (CacheClass.MUTABLE, 300), path)

    def test_case_encoding(self) -> None:
        """Paths are case-encoded: an upper-case letter is refused here, not fetched."""
        d = self.classify("github.com/BurntSushi/toml/@v/list")
        assert d.local is not None
        self.assertEqual(d.local.status, 404)
        self.assertIn("case-encoded", d.local.message)
        self.assertEqual(go.escape("github.com/BurntSushi/toml"), "github.com/!burnt!sushi/toml")
        self.assertEqual(go.escape("v1.0.0-RC1"), "v1.0.0-!r!c1")

    def test_sumdb_paths(self) -> None:
        """Tiles are immutable (full and partial); latest, supported and lookups are not."""
        for rest in ("tile/8/0/x001/234", "tile/8/1/005.p/12", "tile/8/data/000"):
            d = self.classify(f"sumdb/sum.golang.org/{rest}")
            self.assertEqual(d.cache_class, CacheClass.IMMUTABLE, rest)
        for rest in ("latest", "supported", "lookup/github.com/!burnt!sushi/toml@v1.2.3"):
            d = self.classify(f"sumdb/sum.golang.org/{rest}")
            self.assertEqual((d.cache_class, d.ttl), (CacheClass.MUTABLE, 300), rest)
        self.assertTrue(go.learns("sumdb/sum.golang.org/lookup/golang.org/x/mod@v0.1.0"))
        self.assertFalse(go.learns("sumdb/sum.golang.org/latest"))
        self.assertFalse(go.learns("golang.org/x/mod/@v/list"))
        for bad in ("sumdb/sum.golang.org/tile/8/0/../x", "sumdb/sum.golang.org/other", "x/y"):
            d = self.classify(bad)
            self.assertEqual(d.cache_class, CacheClass.PASS, bad)
            assert d.local is not None
            self.assertEqual(d.local.status, 404)

    def test_zip_checked_against_lookup(self) -> None:
        """A lookup teaches the h1: of the zip and of the go.mod of its version."""
        lookup = "sumdb/sum.golang.org/lookup/pkgproxy.test/!upper@v0.1.0"
        self.assertEqual(
            go.parse_lookup(UPPER.lookup().decode()),
            [
                ("pkgproxy.test/Upper", "v0.1.0", False, UPPER.h1),
                ("pkgproxy.test/Upper", "v0.1.0", True, UPPER.mod_h1),
            ],
        )
        items = go.learn(lookup, [UPPER.lookup()], ROUTE.upstream + lookup)
        self.assertEqual(
            items,
            [
                (ROUTE.upstream + UPPER.base() + ".zip", Expect(None, {"go-h1-zip": UPPER.h1})),
                (ROUTE.upstream + UPPER.base() + ".mod", Expect(None, {"go-h1-mod": UPPER.mod_h1})),
            ],
        )
        facts = Facts()
        facts.add(items)
        d = self.classify(UPPER.base() + ".zip", facts)
        self.assertEqual(dict(d.digests), {"go-h1-zip": UPPER.h1})

    def test_registered(self) -> None:
        """The family is registered and has a built-in route at /go/."""
        self.assertIs(FAMILIES["go"], go.FAMILY)
        [route] = [r for r in BUILTIN_ROUTES if r.family == "go"]
        self.assertEqual((route.prefix, route.upstream), ("/go/", "https://proxy.golang.org/"))


class GoHashTests(SynchronousTestCase):
    def test_zip_h1(self) -> None:
        """The zip's h1: is the dirhash of its files, however the body is cut, with or
        without data descriptors, stored or deflated."""
        files = LIB.files
        variants = [LIB.zip, streamed_zip(files)]
        stored = io.BytesIO()
        with zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as z:
            for name, data in files.items():
                z.writestr(name, data)
        variants.append(stored.getvalue())
        for data in variants:
            for step in (1, 5, 64, 4096, len(data)):
                self.assertEqual(hashed(data, step), LIB.h1)

    def test_mod_h1(self) -> None:
        h = GoModHasher()
        h.update(LIB.go_mod)
        self.assertEqual(h.hexdigest(), LIB.mod_h1)

    def test_not_a_module_zip(self) -> None:
        """Damage anywhere, a second copy of a name, or a central directory that lists
        something else gives no hash at all."""
        good = LIB.zip
        flipped = bytearray(good)
        flipped[60] ^= 0x40
        cut = good[:-5]
        trailing = good + b"x"
        twice = io.BytesIO()
        with warnings.catch_warnings(), zipfile.ZipFile(twice, "w") as z:
            warnings.simplefilter("ignore")
            z.writestr("m@v1.0.0/a", b"1")
            z.writestr("m@v1.0.0/a", b"2")
        # Another member's name in the central directory than in its local header.
        renamed = bytearray(good)
        at = renamed.rfind(b"lib.go")
        renamed[at : at + 6] = b"lix.go"
        for bad in (bytes(flipped), cut, trailing, twice.getvalue(), bytes(renamed), b"not a zip"):
            self.assertTrue(hashed(bad, 7).startswith("(not a module zip"), bad[:20])


class GoProxyTests(SynchronousTestCase):
    """The Go route through the in-memory proxy."""

    def setUp(self) -> None:
        self.proxy = MemoryProxy(
            {"routes": {"go": {"upstream": UP, "index_ttl": "60s"}}}, cache_dir=self.mktemp()
        )
        self.addCleanup(self.proxy.close)
        self.up = self.proxy.upstream

    def publish(self, *modules: GoModule) -> None:
        for name, data in tree(modules).items():
            self.up.add(f"/go/{name}", data)

    def test_version_files_kept_forever(self) -> None:
        """.info, .mod and .zip: one upstream fetch each, then hits."""
        self.publish(LIB)
        for ext, want in (("info", LIB.info), ("mod", LIB.go_mod), ("zip", LIB.zip)):
            path = f"/go/{LIB.base()}.{ext}"
            resp, body = self.proxy.get(path)
            self.assertEqual((resp.code, body), (200, want))
            self.proxy.clock.advance(10**6)
            resp, body = self.proxy.get(path)
            self.assertEqual((body, header(resp, "x-cache")), (want, "HIT"))
            self.assertEqual(self.up.count(path), 1)

    def test_list_revalidated(self) -> None:
        """@v/list is an index: a new version is seen once index_ttl has passed, and the
        stored list is served when the upstream is down."""
        self.publish(LIB)
        path = "/go/pkgproxy.test/lib/@v/list"
        self.assertEqual(self.proxy.get(path)[1], b"v1.0.0\n")
        self.publish(LIB, LIB_NEXT)
        self.assertEqual(self.proxy.get(path)[1], b"v1.0.0\n")
        self.proxy.clock.advance(61)
        self.assertEqual(self.proxy.get(path)[1], b"v1.0.0\nv1.1.0\n")
        self.proxy.clock.advance(61)
        self.up.down = True
        resp, body = self.proxy.get(path)
        self.assertEqual((resp.code, body), (200, b"v1.0.0\nv1.1.0\n"))

    def test_not_found_remembered_briefly(self) -> None:
        """A version that does not exist: go's "not found" is answered from memory for a
        while, then asked again; 410 alike."""
        path = f"/go/{LIB_NEXT.base()}.info"
        self.up.add(path, b"not found: unknown revision v1.1.0", status=410)
        for _ in range(2):
            resp, body = self.proxy.get(path)
            self.assertEqual((resp.code, body), (410, b"not found: unknown revision v1.1.0"))
        self.assertEqual(self.up.count(path), 1)
        self.proxy.clock.advance(61)
        self.publish(LIB_NEXT)
        resp, body = self.proxy.get(path)
        self.assertEqual((resp.code, body), (200, LIB_NEXT.info))
        self.assertEqual(len(self.proxy.store), 1)

    def test_zip_verified_after_lookup(self) -> None:
        """After a checksum database lookup through the proxy, a zip or go.mod that does
        not hash to what it says is refused and not kept; the right one is."""
        lookup = f"/go/sumdb/sum.golang.org/lookup/{UPPER.base().replace('/@v/', '@')}"
        self.up.add(lookup, UPPER.lookup())
        self.publish(UPPER)
        resp, body = self.proxy.get(lookup)
        self.assertEqual((resp.code, body), (200, UPPER.lookup()))
        zip_path, mod_path = f"/go/{UPPER.base()}.zip", f"/go/{UPPER.base()}.mod"
        other = GoModule(UPPER.path, UPPER.version, says="tampered")
        self.up.add(zip_path, other.zip)
        self.up.add(mod_path, UPPER.go_mod + b"// extra\n")
        for path in (zip_path, mod_path):
            self.assertRaises(ResponseFailed, self.proxy.get, path)
        self.assertEqual(len(self.proxy.store), 1)  # the lookup only
        self.publish(UPPER)
        for path, want in ((zip_path, UPPER.zip), (mod_path, UPPER.go_mod)):
            resp, body = self.proxy.get(path)
            self.assertEqual((resp.code, body, header(resp, "x-cache")), (200, want, "MISS"))
        entry = self.proxy.store.peek(f"go:{UPPER.base()}.zip")
        assert entry is not None
        self.assertEqual(entry.digests, {"go-h1-zip": UPPER.h1})

    def test_zip_before_lookup_fetched_again(self) -> None:
        """A zip kept before any lookup named its hash is fetched again once a lookup
        says it is something else."""
        zip_path = f"/go/{UPPER.base()}.zip"
        other = GoModule(UPPER.path, UPPER.version, says="tampered")
        self.up.add(zip_path, other.zip)
        self.assertEqual(self.proxy.get(zip_path)[1], other.zip)
        lookup = f"/go/sumdb/sum.golang.org/lookup/{UPPER.base().replace('/@v/', '@')}"
        self.up.add(lookup, UPPER.lookup())
        self.proxy.get(lookup)
        self.publish(UPPER)
        resp, body = self.proxy.get(zip_path)
        self.assertEqual((body, header(resp, "x-cache")), (UPPER.zip, "MISS"))
        self.assertEqual(self.up.count(zip_path), 2)

    def test_tiles_immutable_latest_not(self) -> None:
        tile = "/go/sumdb/sum.golang.org/tile/8/0/000"
        latest = "/go/sumdb/sum.golang.org/latest"
        self.up.add(tile, b"\x00" * 32)
        self.up.add(latest, b"go.sum database tree\n1\n")
        for path in (tile, latest):
            self.proxy.get(path)
        self.proxy.clock.advance(61)
        self.up.add(latest, b"go.sum database tree\n2\n")
        self.assertEqual(self.proxy.get(tile)[1], b"\x00" * 32)
        self.assertEqual(self.proxy.get(latest)[1], b"go.sum database tree\n2\n")
        self.assertEqual((self.up.count(tile), self.up.count(latest)), (1, 2))


class GoClientConfigTests(SynchronousTestCase):
    def test_snippet(self) -> None:
        """``pkgproxy-config go``: GOPROXY through the route, then direct (go reads the
        file as GOENV in tests/e2e/test_go.py)."""
        routes = {r.name: r for r in BUILTIN_ROUTES}
        snippet = clientconfig.go(clientconfig.Target("http://cache:3142", routes))
        lines = [x for x in snippet.text.splitlines() if not x.startswith("#")]
        self.assertEqual(lines, ["GOPROXY=http://cache:3142/go/,direct"])
        self.assertIn("go", clientconfig.TOOLS)
