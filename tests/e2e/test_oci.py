"""skopeo through a real pkgproxy, against a real registry (CNCF distribution 2.8).

Why this test exists: tests/test_oci.py proves the OCI family against our reading of the
distribution spec; only a real registry and a real client can prove that they agree: the
``/v2/`` ping, HEAD and GET of tags with the client's Accept list, manifests and blobs by
digest, ``Docker-Content-Digest`` checks, Docker Hub's ``library/`` names, containerd's
``?ns=`` parameter, and Bearer tokens from a token service. There is no Docker daemon or
containerd on CI machines; skopeo speaks the same registry protocol (and is a Go client,
which never sends loopback traffic through an HTTP proxy, so everything goes by path).

The images are OCI layouts written by hand (tests/support/ociregistry.py), pushed to the
registry with skopeo, and pulled through pkgproxy into ``dir:`` copies whose every file is
checked against the digests the test computed itself.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.request
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from tests.support import ociregistry as oci
from tests.support.procs import HOST, PkgProxy, ServerProcess, start_pkgproxy

NAME = "pkgproxy-e2e"
TAG = "1.0"
HTTP_TIMEOUT = 10.0


def _require_tools() -> None:
    missing = [t for t in ("docker-registry", "skopeo") if shutil.which(t) is None]
    if missing:
        raise SkipTest(
            f"needs {', '.join(missing)} (Debian packages listed in .ci/apt-packages.txt)"
        )


def _http(url: str, method: str = "GET", accept: str | None = None) -> tuple[int, Any, bytes]:
    """``(status, headers, body)`` of one request, never through an environment proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, method=method)
    if accept is not None:
        request.add_header("Accept", accept)
    try:
        with opener.open(request, timeout=HTTP_TIMEOUT) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()


class OCITestCase(TestCase):
    """Shared set-up: skopeo, and helpers to push images and pull them back."""

    def setUp(self) -> None:
        _require_tools()
        self.skopeo = oci.Skopeo(self)
        self.servers: list[ServerProcess] = []
        self._pulls = 0

    def _context(self) -> str:
        """Logs of every server the test started, appended to every failure message."""
        return "\n".join(s.logs() for s in self.servers)

    def _registry(self, **kwargs: Any) -> oci.Registry:
        registry = oci.start_registry(self, **kwargs)
        self.servers.append(registry)
        return registry

    def _proxy(self, config_toml: str) -> PkgProxy:
        proxy = start_pkgproxy(self, config_toml)
        self.servers.insert(0, proxy)
        return proxy

    def _push(
        self, registry: oci.Registry, label: str, architectures: tuple[str, ...] = ("amd64",)
    ) -> oci.Layout:
        """Write a layout of one image per architecture and push it as library/NAME:TAG."""
        images = [oci.build_image(label, arch) for arch in architectures]
        layout = oci.write_layout(self.skopeo.path(f"layout-{label}"), TAG, images)
        self.skopeo.push(layout, registry.hostport, f"library/{NAME}", self._context())
        return layout

    def _pull_and_verify(
        self, reference: str, layout: oci.Layout, *extra: str, platform: str | None = None
    ) -> None:
        """skopeo-copy ``reference`` to a fresh ``dir:`` and check every file's sha256.

        Without ``platform`` the copy must be the whole tag (an index with ``--all``);
        with it, the one platform's manifest, config and layers.
        """
        self._pulls += 1
        dest = self.skopeo.path(f"pull-{self._pulls}")
        if platform is None:
            top, images = layout.top, layout.images
        else:
            image = layout.image(platform)
            top, images = image.manifest, (image,)
            extra += ("--override-arch", platform)
        self.skopeo.pull(reference, dest, *extra, context=self._context())
        problems = oci.dir_copy_problems(dest, top, images)
        if problems:
            self.fail(f"{reference}: " + "\n".join(problems) + "\n" + self._context())


class DockerHubRouteTests(OCITestCase):
    """The ``docker.io`` route (prefix ``/v2/``) pointed at a local registry."""

    def setUp(self) -> None:
        super().setUp()
        self.registry = self._registry()
        self.layout = self._push(self.registry, "hub")
        # index_ttl 0: every tag request revalidates, so the offline pull below proves
        # that a failed revalidation serves the stale tag.
        self.proxy = self._proxy(
            f'[routes."docker.io"]\nupstream = "{self.registry.url("/v2/")}"\nindex_ttl = "0s"\n'
        )
        self.ref = f"{HOST}:{self.proxy.port}/library/{NAME}:{TAG}"

    def test_pull_verified_then_served_with_registry_gone(self) -> None:
        """A pulled image's manifest, config and layers are byte-exact, and with the
        registry stopped the same pull succeeds from pkgproxy's cache: the tag's
        revalidation fails and the cached tag is served stale."""
        self._pull_and_verify(self.ref, self.layout)
        self.registry.stop()
        self._pull_and_verify(self.ref, self.layout)
        # skopeo's tag request was answered from the cache, marked stale in the access log.
        line = f'"GET /v2/library/{NAME}/manifests/{TAG}" 200'
        deadline = time.monotonic() + 5.0
        while True:
            with open(self.proxy.log_path, encoding="utf-8", errors="replace") as f:
                answers = [x for x in f.read().splitlines() if line in x]
            if (answers and " STALE " in answers[-1]) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertIn(" STALE ", answers[-1] if answers else "", self._context())

    def test_head_by_tag_served_from_cache_with_registry_gone(self) -> None:
        """containerd and the Docker daemon resolve a tag with HEAD, then fetch the
        manifest by digest: the tag itself is never GET. With the registry stopped, a
        HEAD of that tag is answered from the cache as a GET is (stale), with
        ``Docker-Content-Digest``, ``Content-Type`` and the ``Content-Length`` of the
        body, so an offline pull by tag starts.

        (Found failing: a HEAD on a miss asked the registry for headers only, so the tag
        was never stored, and offline the same HEAD answered 502.)"""
        path = f"/v2/library/{NAME}/manifests/{TAG}"
        url = self.proxy.url(path)
        top = self.layout.top
        accepts = (oci.CONTAINERD_ACCEPT, None)
        for accept in accepts:
            status, online, body = _http(url, "HEAD", accept=accept)
            self.assertEqual(status, 200, f"HEAD online: {body[:300]!r}\n{self._context()}")
            self.assertEqual(online["Docker-Content-Digest"], top.digest)
        # Each HEAD stored its variant of the tag just after answering: wait for both
        # commits, or a HEAD at once may still join its download (COALESCED).
        self.proxy.wait_for_entries(len(accepts))
        self.registry.stop()
        for accept in accepts:
            status, headers, body = _http(url, "HEAD", accept=accept)
            where = f"HEAD {path} (Accept {accept}) offline: {body[:300]!r}\n{self._context()}"
            self.assertEqual(status, 200, where)
            self.assertEqual(body, b"", where)
            self.assertEqual(headers["Docker-Content-Digest"], top.digest, where)
            self.assertEqual(headers["Content-Type"], top.media_type, where)
            self.assertEqual(headers["Content-Length"], str(len(top.data)), where)
            self.assertEqual(headers["X-Cache"], "STALE", where)
            status, got_headers, got = _http(url, accept=accept)
            self.assertEqual((status, got), (200, top.data), where)
            for name in ("Docker-Content-Digest", "Content-Type", "Content-Length", "ETag"):
                self.assertEqual(headers[name], got_headers[name], f"{name}: {where}")

    def test_accept_over_several_header_lines(self) -> None:
        """A client that sends each media type on its own ``Accept`` line (skopeo,
        podman and the Docker daemon do: Go's ``Header.Add``) is served as if they were
        one list: here the OCI manifest named on the first of three lines."""
        conn = http.client.HTTPConnection(HOST, self.proxy.port, timeout=HTTP_TIMEOUT)
        self.addCleanup(conn.close)
        conn.putrequest("GET", f"/v2/library/{NAME}/manifests/{TAG}")
        for media_type in (oci.OCI_MANIFEST, oci.DOCKER_MANIFEST, oci.OCI_INDEX):
            conn.putheader("Accept", media_type)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        self.assertEqual(resp.status, 200, f"{body[:300]!r}\n{self._context()}")
        self.assertEqual(resp.getheader("Docker-Content-Digest"), self.layout.top.digest)
        self.assertEqual(body, self.layout.top.data)

    def test_inspect_and_one_component_name(self) -> None:
        """``skopeo inspect`` through pkgproxy reports the pushed digest, layers and
        architecture; a name without ``library/`` (``NAME:TAG``, as tools other than the
        Docker daemon send it) reaches ``library/NAME`` on the registry."""
        image = self.layout.images[0]
        for ref in (self.ref, f"{HOST}:{self.proxy.port}/{NAME}:{TAG}"):
            info = self.skopeo.inspect(ref, context=self._context())
            self.assertEqual(info["Digest"], image.manifest.digest, ref)
            self.assertEqual(info["Layers"], [b.digest for b in image.layers], ref)
            self.assertEqual(info["Architecture"], "amd64", ref)
            self.assertEqual(info["Labels"], {"pkgproxy.test": "hub"}, ref)


class RegistryChoiceTests(OCITestCase):
    """Two registries hold different images under the same name; the path or containerd's
    ``?ns=`` chooses which one answers."""

    def setUp(self) -> None:
        super().setUp()
        self.hub = self._registry()
        self.other = self._registry()
        self.hub_layout = self._push(self.hub, "hub")
        self.other_layout = self._push(self.other, "other")
        self.proxy = self._proxy(
            f'[routes."docker.io"]\nupstream = "{self.hub.url("/v2/")}"\n\n'
            f'[routes."registry.test"]\nfamily = "oci"\n'
            f'upstream = "{self.other.url("/v2/")}"\n'
        )

    def _manifest(self, path: str, method: str = "GET") -> tuple[int, Any, bytes]:
        """A manifest request with containerd's Accept list."""
        return _http(self.proxy.url(path), method, accept=oci.CONTAINERD_ACCEPT)

    def _assert_manifest(self, path: str, want: oci.Blob) -> None:
        """HEAD then GET ``path`` (containerd resolves with HEAD first) give ``want``."""
        status, headers, body = self._manifest(path, "HEAD")
        self.assertEqual(status, 200, f"HEAD {path}: {body[:300]!r}\n{self._context()}")
        self.assertEqual(headers["Docker-Content-Digest"], want.digest, f"HEAD {path}")
        status, headers, body = self._manifest(path)
        self.assertEqual(status, 200, f"GET {path}: {body[:300]!r}\n{self._context()}")
        self.assertEqual(headers["Docker-Content-Digest"], want.digest, f"GET {path}")
        self.assertEqual(headers["Content-Type"], want.media_type, f"GET {path}")
        self.assertEqual(body, want.data, f"GET {path}")

    def test_containerd_ns_chooses_the_registry(self) -> None:
        """containerd's requests (``?ns=<registry>`` and its Accept list) for the same
        repository reach the registry ``ns`` names, for manifests and blobs alike."""
        for ns, layout in (("docker.io", self.hub_layout), ("registry.test", self.other_layout)):
            self._assert_manifest(f"/v2/library/{NAME}/manifests/{TAG}?ns={ns}", layout.top)
            # containerd then fetches what the tag resolved to by digest.
            top = layout.top
            self._assert_manifest(f"/v2/library/{NAME}/manifests/{top.digest}?ns={ns}", top)
            config = layout.images[0].config
            path = f"/v2/library/{NAME}/blobs/{config.digest}?ns={ns}"
            status, _, body = _http(self.proxy.url(path))
            self.assertEqual(status, 200, f"GET {path}: {body[:300]!r}\n{self._context()}")
            self.assertEqual(hashlib.sha256(body).hexdigest(), config.hex, path)

    def test_second_registry_by_path(self) -> None:
        """``/v2/registry.test/...`` reaches the second registry: containerd-style requests
        get its manifest, and skopeo pulls its image byte-exact; ``/v2/library/...`` still
        reaches the first."""
        self._assert_manifest(
            f"/v2/registry.test/library/{NAME}/manifests/{TAG}", self.other_layout.top
        )
        port = self.proxy.port
        self._pull_and_verify(
            f"{HOST}:{port}/registry.test/library/{NAME}:{TAG}", self.other_layout
        )
        self._pull_and_verify(f"{HOST}:{port}/library/{NAME}:{TAG}", self.hub_layout)


class MultiArchTests(OCITestCase):
    """An image index over linux/amd64 and linux/arm64 through the ``docker.io`` route."""

    def setUp(self) -> None:
        super().setUp()
        self.registry = self._registry()
        self.layout = self._push(self.registry, "multi", ("amd64", "arm64"))
        self.proxy = self._proxy(
            f'[routes."docker.io"]\nupstream = "{self.registry.url("/v2/")}"\n'
        )
        self.ref = f"{HOST}:{self.proxy.port}/library/{NAME}:{TAG}"

    def test_index_and_every_platform(self) -> None:
        """``copy --all`` gets the index, both platform manifests (by digest) and every
        blob byte-exact; then a single-platform pull picks arm64 out of the cached index."""
        self._pull_and_verify(self.ref, self.layout, "--all")
        self._pull_and_verify(self.ref, self.layout, platform="arm64")


class TokenAuthTests(OCITestCase):
    """A registry that demands Bearer tokens from a token service, as Docker Hub does."""

    def setUp(self) -> None:
        super().setUp()
        try:
            self.auth = oci.make_token_auth(self.mktemp())
        except ImportError as e:
            raise SkipTest(f"needs the cryptography package: {e}") from None
        self.tokens = oci.start_token_server(self, self.auth)
        self.servers.append(self.tokens)
        self.registry = self._registry(auth=self.auth)
        self.layout = self._push(self.registry, "token")
        self.proxy = self._proxy(
            f'[routes."docker.io"]\nupstream = "{self.registry.url("/v2/")}"\n'
        )

    def test_pkgproxy_gets_a_token_and_never_challenges(self) -> None:
        """The registry refuses anonymous requests with a Bearer challenge; pkgproxy asks
        the token service, anonymously, for a pull token of the repository and pulls the
        image byte-exact, while its own ``/v2/`` answers 200 without a challenge."""
        path = f"/v2/library/{NAME}/manifests/{TAG}"
        status, headers, _ = _http(self.registry.url(path))
        self.assertEqual(status, 401)
        self.assertIn(f'realm="{self.auth.realm}"', headers["WWW-Authenticate"])

        status, headers, _ = _http(self.proxy.url("/v2/"))
        self.assertEqual(status, 200)
        self.assertIsNone(headers["WWW-Authenticate"])

        before = len(self.tokens.requests())
        self._pull_and_verify(f"{HOST}:{self.proxy.port}/library/{NAME}:{TAG}", self.layout)
        asked = self.tokens.requests()[before:]
        scopes = {s for r in asked for s in r["scope"]}
        self.assertIn(f"repository:library/{NAME}:pull", scopes, f"{asked}\n{self._context()}")
        self.assertTrue(all(not r["authorization"] for r in asked), asked)


class PlainPortTests(TestCase):
    """What pkgproxy's plain-HTTP port does with a TLS handshake."""

    def test_tls_client_hello_is_refused_at_once(self) -> None:
        """A TLS ClientHello on the plain port gets an immediate answer (an HTTP error, or
        the connection closed), not silence. Go registry clients told not to verify TLS
        (skopeo ``--tls-verify=false``, podman and buildah with an ``insecure`` mirror)
        try ``https://`` first and fall back to ``http://`` only when that attempt fails:
        silence costs every pull Go's 10 s TLS handshake timeout."""
        proxy = start_pkgproxy(self, "")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection((HOST, proxy.port), timeout=HTTP_TIMEOUT) as sock:
            sock.settimeout(3.0)
            started = time.monotonic()
            try:
                context.wrap_socket(sock, server_hostname=HOST).close()
            except TimeoutError:
                self.fail(f"no answer to a TLS ClientHello within 3 s\n{proxy.logs()}")
            except (ssl.SSLError, OSError):
                pass  # refused: what a Go client needs to fall back to http:// at once
            self.assertLess(time.monotonic() - started, 3.0)
