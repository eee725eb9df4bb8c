"""OCI registries in memory: ping, blobs and manifests by digest, tags, tokens, refusals."""

from __future__ import annotations

import hashlib
import json

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed

from pkgproxy.testing import FakeUpstream, MemoryProxy

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def header(resp, name: str) -> str | None:
    values = resp.headers.getRawHeaders(name)
    return values[-1] if values else None


def digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


class TokenRegistry(FakeUpstream):
    """A registry that challenges for a Bearer token, like Docker Hub."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens_issued = 0
        self.token_lifetime = 300

    #: ``Authorization`` the token service demands, if any.
    token_auth: bytes | None = None

    def render(self, request):
        if request.uri.startswith(b"/token?"):
            if self.token_auth and request.getHeader(b"authorization") != self.token_auth:
                request.setResponseCode(401)
                return b"{}"
            self.tokens_issued += 1
            request.setHeader(b"content-type", b"application/json")
            body = {"token": f"tok{self.tokens_issued}", "expires_in": self.token_lifetime}
            return json.dumps(body).encode()
        want = f"Bearer tok{self.tokens_issued}".encode()
        if request.uri.startswith(b"/v2/") and request.getHeader(b"authorization") != want:
            request.setResponseCode(401)
            request.setHeader(
                b"www-authenticate",
                b'Bearer realm="http://upstream.test/token",service="reg",'
                b'scope="repository:library/alpine:pull"',
            )
            return b'{"errors":[{"code":"UNAUTHORIZED"}]}'
        return super().render(request)


class OCITestCase(SynchronousTestCase):
    upstream_class = FakeUpstream

    def setUp(self) -> None:
        self.proxy = MemoryProxy(
            {
                "routes": {
                    "docker.io": {"upstream": "http://upstream.test/v2/", "index_ttl": "5m"},
                    "registry.local": {
                        "family": "oci",
                        "upstream": "http://upstream.test/local/v2/",
                    },
                }
            },
            cache_dir=self.mktemp(),
            upstream=self.upstream_class(),
        )
        self.addCleanup(self.proxy.close)
        self.up = self.proxy.upstream

    def manifest(self, tag: str, body: bytes, path: str = "/v2/library/alpine") -> None:
        headers = {
            b"content-type": MANIFEST_TYPE.encode(),
            b"docker-content-digest": digest(body).encode(),
        }
        self.up.add(f"{path}/manifests/{tag}", body, headers=headers)
        self.up.add(f"{path}/manifests/{digest(body)}", body, headers=headers)


class PingAndRefusalTests(OCITestCase):
    def test_ping_never_challenges(self) -> None:
        """/v2/ answers 200 {} locally: a daemon is never asked for credentials."""
        resp, body = self.proxy.get("/v2/")
        self.assertEqual((resp.code, body), (200, b"{}"))
        self.assertEqual(header(resp, "docker-distribution-api-version"), "registry/2.0")
        self.assertIsNone(header(resp, "www-authenticate"))
        self.assertEqual(self.up.seen, [])

    def test_writes_refused_with_oci_error(self) -> None:
        """Pushes and deletes get 405 with an OCI error document."""
        for method in ("PUT", "POST", "DELETE", "PATCH"):
            resp, body = self.proxy.get("/v2/library/alpine/manifests/3.20", method=method)
            self.assertEqual(resp.code, 405)
            self.assertEqual(json.loads(body)["errors"][0]["code"], "UNSUPPORTED")
        self.assertEqual(self.up.seen, [])

    def test_unknown_namespace(self) -> None:
        """containerd's ?ns= naming an unconfigured registry: 403, OCI error, no fetch."""
        resp, body = self.proxy.get("/v2/library/alpine/manifests/3.20?ns=evil.example")
        self.assertEqual(resp.code, 403)
        self.assertEqual(json.loads(body)["errors"][0]["code"], "DENIED")
        self.assertEqual(self.up.seen, [])

    def test_not_a_registry_path(self) -> None:
        """Paths outside the distribution API get an OCI 404."""
        resp, body = self.proxy.get("/v2/_catalog")
        self.assertEqual(resp.code, 404)
        self.assertIn("errors", json.loads(body))


class BlobTests(OCITestCase):
    def test_blob_verified_and_kept(self) -> None:
        """A blob is checked against its digest, stored, and served with Range."""
        blob = bytes(range(256)) * 100
        path = f"/v2/library/alpine/blobs/{digest(blob)}"
        self.up.add(path, blob, headers={b"content-type": b"application/octet-stream"})
        resp, body = self.proxy.get(path)
        self.assertEqual((body, header(resp, "docker-content-digest")), (blob, digest(blob)))
        resp, body = self.proxy.get(path, headers={"Range": "bytes=100-"})
        self.assertEqual((resp.code, body, header(resp, "x-cache")), (206, blob[100:], "HIT"))

    def test_blob_with_wrong_bytes_refused(self) -> None:
        """Bytes that do not hash to the digest fail the transfer and are not stored."""
        blob = b"layer" * 1000
        path = f"/v2/library/alpine/blobs/{digest(blob)}"
        self.up.add(path, b"x" * len(blob))
        self.assertRaises(ResponseFailed, self.proxy.get, path)
        self.assertEqual(len(self.proxy.store), 0)

    def test_one_component_name_means_library(self) -> None:
        """``alpine`` on Docker Hub is ``library/alpine`` upstream."""
        blob = b"official"
        self.up.add(f"/v2/library/alpine/blobs/{digest(blob)}", blob)
        _, body = self.proxy.get(f"/v2/alpine/blobs/{digest(blob)}")
        self.assertEqual(body, blob)

    def test_other_registries(self) -> None:
        """Another registry by path (/v2/<name>/...) or by containerd's ?ns=."""
        blob = b"elsewhere"
        self.up.add(f"/local/v2/team/app/blobs/{digest(blob)}", blob)
        _, body = self.proxy.get(f"/v2/registry.local/team/app/blobs/{digest(blob)}")
        self.assertEqual(body, blob)
        resp, body = self.proxy.get(f"/v2/team/app/blobs/{digest(blob)}?ns=registry.local")
        self.assertEqual(body, blob)
        self.assertEqual(self.up.seen[-1].path, f"/local/v2/team/app/blobs/{digest(blob)}".encode())


class ManifestTests(OCITestCase):
    def test_tag_cached_and_revalidated_with_head(self) -> None:
        """A tag is fetched once; after its TTL a HEAD (not a GET) confirms it."""
        body = b'{"schemaVersion":2,"mediaType":"%s"}' % MANIFEST_TYPE.encode()
        self.manifest("3.20", body)
        resp, got = self.proxy.get("/v2/library/alpine/manifests/3.20")
        self.assertEqual((got, header(resp, "docker-content-digest")), (body, digest(body)))
        self.assertEqual(header(resp, "content-type"), MANIFEST_TYPE)
        self.proxy.clock.advance(301)
        resp, got = self.proxy.get("/v2/library/alpine/manifests/3.20")
        self.assertEqual((got, header(resp, "x-cache")), (body, "REVALIDATED"))
        self.assertEqual(self.up.count("/v2/library/alpine/manifests/3.20", b"GET"), 1)
        self.assertEqual(self.up.count("/v2/library/alpine/manifests/3.20", b"HEAD"), 1)

    def test_moved_tag(self) -> None:
        """When the tag moves, the new manifest is fetched and served."""
        self.manifest("latest", b'{"v":1}')
        self.proxy.get("/v2/library/alpine/manifests/latest")
        self.manifest("latest", b'{"v":2}')
        self.proxy.clock.advance(301)
        _, got = self.proxy.get("/v2/library/alpine/manifests/latest")
        self.assertEqual(got, b'{"v":2}')

    def test_body_must_match_named_digest(self) -> None:
        """A tag whose body does not match Docker-Content-Digest is refused."""
        self.up.add(
            "/v2/library/alpine/manifests/bad",
            b'{"v":3}',
            headers={b"docker-content-digest": digest(b"other").encode()},
        )
        self.assertRaises(ResponseFailed, self.proxy.get, "/v2/library/alpine/manifests/bad")
        self.assertEqual(len(self.proxy.store), 0)

    def test_accept_variants(self) -> None:
        """Clients accepting different manifest types get separate cache entries."""
        self.manifest("v", b'{"v":1}')
        self.proxy.get("/v2/library/alpine/manifests/v", headers={"Accept": MANIFEST_TYPE})
        resp, _ = self.proxy.get(
            "/v2/library/alpine/manifests/v",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        )
        self.assertEqual(header(resp, "x-cache"), "MISS")
        self.assertEqual(
            self.up.seen[-1].headers[b"accept"],
            b"application/vnd.docker.distribution.manifest.v2+json",
        )
        resp, _ = self.proxy.get(
            "/v2/library/alpine/manifests/v", headers={"Accept": MANIFEST_TYPE}
        )
        self.assertEqual(header(resp, "x-cache"), "HIT")
        self.assertEqual(header(resp, "vary"), "Accept")

    def test_stale_tag_when_registry_fails(self) -> None:
        """A tag past its TTL is served stale when the registry is down."""
        self.manifest("3.19", b'{"v":19}')
        self.proxy.get("/v2/library/alpine/manifests/3.19")
        self.up.down = True
        self.proxy.clock.advance(301)
        resp, got = self.proxy.get("/v2/library/alpine/manifests/3.19")
        self.assertEqual((got, header(resp, "x-cache")), (b'{"v":19}', "STALE"))


class TokenTests(OCITestCase):
    upstream_class = TokenRegistry

    def test_challenge_answered_with_cached_token(self) -> None:
        """The proxy gets a token on a challenge, reuses it, and renews it on expiry."""
        blobs = [b"one", b"two", b"three"]
        for b in blobs:
            self.up.add(f"/v2/library/alpine/blobs/{digest(b)}", b)
        for b in blobs[:2]:
            _, got = self.proxy.get(f"/v2/library/alpine/blobs/{digest(b)}")
            self.assertEqual(got, b)
        self.assertEqual(self.up.tokens_issued, 1)
        self.proxy.clock.advance(400)
        _, got = self.proxy.get(f"/v2/library/alpine/blobs/{digest(blobs[2])}")
        self.assertEqual((got, self.up.tokens_issued), (blobs[2], 2))


class CredentialTests(OCITestCase):
    upstream_class = TokenRegistry

    def setUp(self) -> None:
        registry = TokenRegistry()
        registry.token_auth = b"Basic cHVsbGVyOnMzY3JldA=="
        self.proxy = MemoryProxy(
            {
                "routes": {
                    "docker.io": {
                        "upstream": "http://upstream.test/v2/",
                        "username": "puller",
                        "password": "s3cret",
                    },
                }
            },
            cache_dir=self.mktemp(),
            upstream=registry,
        )
        self.addCleanup(self.proxy.close)
        self.up = self.proxy.upstream

    def test_configured_credentials_go_to_the_token_service(self) -> None:
        """A registry route's own credentials are sent to its token service, never a
        client's; with them the token is granted."""
        self.up.add(f"/v2/library/alpine/blobs/{digest(b'x')}", b"x")
        resp, got = self.proxy.get(
            f"/v2/library/alpine/blobs/{digest(b'x')}",
            headers={"Authorization": "Basic Y2xpZW50OnNlY3JldA=="},
        )
        self.assertEqual((resp.code, got), (200, b"x"))
        self.assertEqual(self.up.tokens_issued, 1)


class FamilyHookTests(SynchronousTestCase):
    """What the OCI family declares for the rooms that route and authenticate."""

    def test_route_request_by_ns(self) -> None:
        """containerd's ?ns= names the registry (Docker Hub by any of its names); the
        parameter is dropped, the rest of the query kept; an unconfigured one refused."""
        from pkgproxy.config.model import Route
        from pkgproxy.families import Refused, oci

        hub = Route("docker.io", "oci", "/v2/", "http://hub.test/v2/")
        other = Route("registry.local", "oci", "/v2/registry.local/", "http://r.test/v2/")
        routes = {"docker.io": hub, "registry.local": other}
        route = oci.route_request
        self.assertEqual(
            route("/v2/team/app/tags/list", "ns=registry.local&n=5", routes),
            (other, "team/app/tags/list?n=5"),
        )
        for name in ("docker.io", "index.docker.io", "Registry-1.Docker.IO"):
            self.assertEqual(route("/v2/alpine/manifests/3", f"ns={name}", routes)[0], hub)
        self.assertIsNone(route("/v2/alpine/manifests/3", "", routes))
        self.assertIsNone(route("/v2", "ns=docker.io", routes))
        self.assertIsNone(route("/debian/x", "ns=docker.io", routes))
        with self.assertRaises(Refused):
            route("/v2/a/blobs/x", "ns=evil.example", routes)

    def test_auth_scope_is_the_repository(self) -> None:
        """One token covers one repository, whatever of it is asked."""
        from pkgproxy.families import AUTH_SCOPES, FAMILIES, oci

        for path in (
            "library/alpine/manifests/3.20",
            f"library/alpine/blobs/{digest(b'x')}",
            "library/alpine/tags/list",
            f"library/alpine/referrers/{digest(b'x')}",
        ):
            self.assertEqual(oci.auth_scope(path), "library/alpine")
        self.assertIs(AUTH_SCOPES["oci"], FAMILIES["oci"].auth_scope)
        self.assertEqual(set(AUTH_SCOPES), {"oci"})


class UpstreamClientAsksTheFamilyTests(SynchronousTestCase):
    """The upstream client keeps a token per area its route's family names."""

    def fetch(self, auth_scopes: dict[str, object] | None) -> TokenRegistry:
        from treq.testing import RequestTraversalAgent
        from twisted.internet.task import Clock

        from pkgproxy.config.model import Route, UpstreamConfig
        from pkgproxy.upstream.client import UpstreamClient

        registry = TokenRegistry()
        body = b"{}"
        registry.add("/v2/library/alpine/manifests/3.20", body)
        registry.add(f"/v2/library/alpine/blobs/{digest(b'layer')}", b"layer")
        route = Route("docker.io", "oci", "/v2/", "http://upstream.test/v2/")
        client = UpstreamClient(
            RequestTraversalAgent(registry),
            Clock(),
            UpstreamConfig(),
            routes=[route],
            auth_scopes=auth_scopes,  # type: ignore[arg-type]
        )
        for path in ("library/alpine/manifests/3.20", f"library/alpine/blobs/{digest(b'layer')}"):
            got: list[object] = []
            client.request(b"GET", route.upstream + path).addBoth(got.append)
            self.assertEqual(getattr(got[0], "status", got[0]), 200)
            got[0].discard()  # type: ignore[attr-defined]
        return registry

    def test_one_token_for_a_repository(self) -> None:
        """A manifest and a blob of one repository: one challenge, one token."""
        from pkgproxy.families import AUTH_SCOPES

        registry = self.fetch(AUTH_SCOPES)  # type: ignore[arg-type]
        self.assertEqual(registry.tokens_issued, 1)

    def test_without_the_family_a_token_per_directory(self) -> None:
        """Without the family's word the client knows no repository: each directory is
        challenged on its own (what the family's scope saves)."""
        registry = self.fetch(None)
        self.assertEqual(registry.tokens_issued, 2)
