"""HEAD is answered exactly as GET would be, headers and all, in every family.

containerd and the Docker daemon resolve a tag with HEAD before anything else, curl -I
and monitoring probes use it too: a HEAD that a GET would answer from the cache (fresh,
stale with the upstream down, or in offline mode) must be answered from the cache with
the same status and headers, the body left out. And a HEAD by OCI tag on a miss stores
the tag, as containerd never GETs it (it fetches the manifest by digest next).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from twisted.trial.unittest import SynchronousTestCase

from pkgproxy.testing import MemoryProxy

UP = "http://upstream.test"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
#: Headers that must be the same on a HEAD and on the GET of the same URL.
COMPARED = (
    "content-type",
    "etag",
    "last-modified",
    "docker-content-digest",
    "x-cache",
    "warning",
    "vary",
    "accept-ranges",
)


def header(resp, name: str) -> str | None:
    values = resp.headers.getRawHeaders(name)
    return values[-1] if values else None


def head(
    proxy: MemoryProxy, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """``HEAD path`` on a raw connection: ``(status, headers, what followed them)``.

    Raw, because a client library hides what a HEAD answer says its length is.
    """
    lines = [f"HEAD {path} HTTP/1.1", "Host: proxy.test"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    raw = proxy.raw(("\r\n".join(lines) + "\r\n\r\n").encode())
    top, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *fields = top.decode("latin-1").split("\r\n")
    found = {}
    for f in fields:
        k, _, v = f.partition(":")
        found[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), found, rest


@dataclass
class Case:
    """One family: its route, one URL of it (the same path upstream), what is served there."""

    routes: dict[str, dict[str, str]]
    path: str
    body: bytes
    headers: dict[bytes, bytes] = field(default_factory=dict)
    request_headers: dict[str, str] = field(default_factory=dict)


_MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST}).encode()
_MANIFEST_DIGEST = "sha256:" + hashlib.sha256(_MANIFEST).hexdigest()
_LM = b"Wed, 25 Nov 2026 22:33:12 GMT"

CASES = {
    "debian": Case(
        {"debian": {"upstream": f"{UP}/debian/", "index_ttl": "60s"}},
        "/debian/dists/stable/InRelease",
        b"Origin: Debian\nSuite: stable\n",
        {b"content-type": b"text/plain", b"last-modified": _LM},
    ),
    "debian-immutable": Case(
        {"debian": {"upstream": f"{UP}/debian/"}},
        "/debian/pool/main/h/hello/hello_1.0_all.deb",
        b"!<arch>\n" + b"d" * 5000,
        {b"content-type": b"application/vnd.debian.binary-package"},
    ),
    "alpine": Case(
        {"alpine": {"upstream": f"{UP}/alpine/", "index_ttl": "60s"}},
        "/alpine/v3.20/main/x86_64/APKINDEX.tar.gz",
        b"not really a tarball",
        {b"content-type": b"application/octet-stream"},
    ),
    "pypi": Case(
        {"pypi": {"upstream": f"{UP}/pypi/", "index_ttl": "60s"}},
        "/pypi/simple/x/",
        b'<html><body><a href="https://files.example/x-1.0.tar.gz">x-1.0.tar.gz</a></body></html>',
        {b"content-type": b"text/html"},
    ),
    "npm": Case(
        {"npm": {"upstream": f"{UP}/npm/", "index_ttl": "60s"}},
        "/npm/x",
        json.dumps({"name": "x", "versions": {}}).encode(),
        {b"content-type": b"application/json"},
    ),
    "oci": Case(
        {"docker.io": {"upstream": f"{UP}/v2/", "index_ttl": "60s"}},
        "/v2/library/alpine/manifests/3.20",
        _MANIFEST,
        {
            b"content-type": OCI_MANIFEST.encode(),
            b"docker-content-digest": _MANIFEST_DIGEST.encode(),
        },
        {"Accept": OCI_MANIFEST},
    ),
    "generic": Case(
        {"files": {"family": "generic", "upstream": f"{UP}/files/"}},
        "/files/a/b.txt",
        b"generic file\n",
        {b"content-type": b"text/plain", b"cache-control": b"max-age=60", b"last-modified": _LM},
    ),
}


class HeadAsGetTests(SynchronousTestCase):
    """For each family: cached by GET, then HEAD and GET compared, upstream up and down."""

    def _proxy(self, case: Case) -> MemoryProxy:
        proxy = MemoryProxy({"routes": case.routes}, cache_dir=self.mktemp())
        self.addCleanup(proxy.close)
        proxy.upstream.add(case.path, case.body, headers=dict(case.headers))
        return proxy

    def _head_and_get(self, proxy: MemoryProxy, case: Case, where: str) -> None:
        """HEAD then GET of ``case.path``: same status and headers, HEAD without a body."""
        status, headers, rest = head(proxy, case.path, case.request_headers)
        get, get_body = proxy.get(case.path, dict(case.request_headers))
        self.assertEqual(rest, b"", where)
        self.assertEqual(status, get.code, where)
        self.assertEqual(get.code, 200, f"{where}: {get_body!r}")
        for name in COMPARED:
            self.assertEqual(headers.get(name), header(get, name), f"{where}: {name}")
        # (Twisted's client keeps a GET's Content-Length as ``length``.)
        self.assertEqual(headers.get("content-length"), str(len(get_body)), where)
        self.assertEqual(get.length, len(get_body), where)

    def _check(self, name: str) -> None:
        case = CASES[name]
        proxy = self._proxy(case)
        _, body = proxy.get(case.path, dict(case.request_headers))
        self.assertTrue(body, name)
        self._head_and_get(proxy, case, f"{name} fresh")
        proxy.clock.advance(3600)
        proxy.upstream.down = True
        self._head_and_get(proxy, case, f"{name} upstream down")
        proxy.root.offline = True
        self._head_and_get(proxy, case, f"{name} offline mode")

    def test_debian_index(self) -> None:
        self._check("debian")

    def test_debian_package(self) -> None:
        self._check("debian-immutable")

    def test_alpine(self) -> None:
        self._check("alpine")

    def test_pypi(self) -> None:
        self._check("pypi")

    def test_npm(self) -> None:
        self._check("npm")

    def test_oci_tag(self) -> None:
        self._check("oci")
        case = CASES["oci"]
        _, headers, _ = head(self._proxy(case), case.path, case.request_headers)
        self.assertEqual(headers.get("docker-content-digest"), _MANIFEST_DIGEST)
        self.assertEqual(headers.get("content-type"), OCI_MANIFEST)

    def test_generic(self) -> None:
        self._check("generic")


class HeadMissTests(SynchronousTestCase):
    def test_oci_tag_head_miss_stores_the_tag(self) -> None:
        """containerd's HEAD of a tag, then the registry gone: HEAD answers from the cache.

        (Found failing: a HEAD on a miss asked upstream for headers only; offline the
        next HEAD answered 502.)
        """
        case = CASES["oci"]
        proxy = MemoryProxy({"routes": case.routes}, cache_dir=self.mktemp())
        self.addCleanup(proxy.close)
        proxy.upstream.add(case.path, case.body, headers=dict(case.headers))
        status, headers, rest = head(proxy, case.path, case.request_headers)
        self.assertEqual((status, rest), (200, b""))
        self.assertEqual(headers.get("content-length"), str(len(case.body)))
        self.assertEqual(headers.get("docker-content-digest"), _MANIFEST_DIGEST)
        self.assertEqual(len(proxy.store), 1)
        proxy.clock.advance(3600)
        proxy.upstream.down = True
        status, headers, rest = head(proxy, case.path, case.request_headers)
        self.assertEqual((status, rest, headers.get("x-cache")), (200, b"", "STALE"))
        self.assertEqual(headers.get("docker-content-digest"), _MANIFEST_DIGEST)
        self.assertEqual(headers.get("content-type"), OCI_MANIFEST)
        self.assertEqual(headers.get("content-length"), str(len(case.body)))

    def test_oci_blob_head_miss_downloads_nothing(self) -> None:
        """A HEAD of a blob on a miss stays a HEAD upstream: a layer can be gigabytes."""
        blob = b"layer" * 1000
        path = "/v2/library/alpine/blobs/sha256:" + hashlib.sha256(blob).hexdigest()
        proxy = MemoryProxy({"routes": CASES["oci"].routes}, cache_dir=self.mktemp())
        self.addCleanup(proxy.close)
        proxy.upstream.add(path, blob)
        status, _, _ = head(proxy, path)
        self.assertEqual(status, 200)
        self.assertEqual(proxy.upstream.count(path, b"GET"), 0)
        self.assertEqual(len(proxy.store), 0)
