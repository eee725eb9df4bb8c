"""https:// upstreams with a private CA (route ``ca_file``) and blind tunnels
(``[tls_intercept] tunnel``), through a real ``twistd -n pkgproxy``.

The upstreams are https static servers on 127.0.0.1 whose certificates a throwaway CA
made by the test signed; no system store trusts it, so whether a connection verifies
says exactly which trust root pkgproxy used.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import subprocess
import urllib.error
import urllib.request

from twisted.trial.unittest import SkipTest, TestCase

from tests.support.procs import HOST, PkgProxy, clean_env, file_tree, free_port, start_pkgproxy
from tests.support.tlsserver import TlsServer, make_tls_files, start_tls_server

HTTP_TIMEOUT = 20.0
BODY = b"internal mirror file\n" * 500


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    """One GET with no proxy from the environment: ``(status, headers, body)``."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=HTTP_TIMEOUT) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def connect(proxy: PkgProxy, authority: str) -> tuple[int, bytes]:
    """A bare ``CONNECT authority`` to the proxy: its status and body (an error's)."""
    conn = http.client.HTTPConnection(HOST, proxy.port, timeout=HTTP_TIMEOUT)
    try:
        conn.request("CONNECT", authority)
        resp = conn.getresponse()
        return resp.status, resp.read() if resp.status != 200 else b""
    finally:
        conn.close()


class UpstreamCaFileTests(TestCase):
    """A route's ``ca_file`` verifies its upstream; other hosts keep the usual trust."""

    def setUp(self) -> None:
        root = file_tree(self, {"files/tool.tar": BODY})
        self.tls = make_tls_files(self.mktemp())
        # The same CA signed both; only the first route is told about it.
        self.trusted = start_tls_server(self, root, self.tls)
        self.untrusted = start_tls_server(self, root, self.tls)
        self.proxy = start_pkgproxy(
            self,
            "[routes.internal]\n"
            'family = "generic"\nimmutable = true\n'
            f'upstream = "{self.trusted.url("/files/")}"\n'
            f'ca_file = "{self.tls.ca_cert}"\n'
            "[routes.other]\n"
            'family = "generic"\nimmutable = true\n'
            f'upstream = "{self.untrusted.url("/files/")}"\n',
        )

    def test_route_ca_file_verifies_and_caches(self) -> None:
        """The upstream signed by the route's CA is fetched over verified TLS and cached:
        a second GET is a HIT, and so is a third after the upstream is gone."""
        status, headers, body = get(self.proxy.url("/internal/tool.tar"))
        self.assertEqual(status, 200, body[:300].decode(errors="replace") + self.proxy.logs())
        self.assertEqual((body, headers.get("X-Cache")), (BODY, "MISS"))
        self.proxy.wait_for_entries(1)
        status, headers, body = get(self.proxy.url("/internal/tool.tar"))
        self.assertEqual((status, body, headers.get("X-Cache")), (200, BODY, "HIT"))
        self.trusted.stop()
        status, headers, body = get(self.proxy.url("/internal/tool.tar"))
        self.assertEqual((status, body, headers.get("X-Cache")), (200, BODY, "HIT"))
        self.assertEqual(self.proxy.cache_entries(), 1)

    def test_without_ca_file_tls_fails_and_nothing_is_stored(self) -> None:
        """The same CA's server on another port, for a route without ``ca_file``, fails
        verification against the usual trust root: a 502 naming TLS, and no entry."""
        status, _, body = get(self.proxy.url("/other/tool.tar"))
        self.assertEqual(status, 502, body.decode(errors="replace"))
        self.assertIn(b"TLS failure", body)
        self.assertIn(b"certificate", body.lower())
        self.assertEqual(self.proxy.cache_entries(), 0)
        # The upstream saw the attempt: it is the trust, not the connection, that failed.
        self.assertGreaterEqual(self.untrusted.connections(), 1)


class BlindTunnelTests(TestCase):
    """``[tls_intercept] tunnel``: CONNECT to a listed host:port only, bytes relayed."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        with open(os.path.join(self.root, "big.bin"), "wb") as f:
            f.write(os.urandom(1024 * 1024) * 8)  # 8 MiB: many write-buffer fills
        with open(os.path.join(self.root, "hello.txt"), "wb") as f:
            f.write(b"hello through the tunnel\n")
        self.tls = make_tls_files(self.mktemp())
        self.listed = start_tls_server(self, self.root, self.tls)
        self.unlisted = start_tls_server(self, self.root, self.tls)
        self.dead_port = free_port()  # listed, but nothing listens there
        self.proxy = start_pkgproxy(
            self,
            "[tls_intercept]\nenabled = false\n"
            f'tunnel = ["{HOST}:{self.listed.port}", "{HOST}:{self.dead_port}"]\n',
        )

    def curl(self, url: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
        if shutil.which("curl") is None:
            raise SkipTest("needs curl")
        return subprocess.run(
            ["curl", "-sS", "--max-time", "20", "--proxy", self.proxy.url("/")]
            + ["--cacert", self.tls.ca_cert, *extra, url],
            capture_output=True,
            timeout=30,
            env=clean_env(),
        )

    def test_listed_host_tunnelled_end_to_end(self) -> None:
        """curl reaches the listed https server through the proxy, verifying the server's
        own certificate (nothing of pkgproxy's in between); 8 MiB arrive intact."""
        small = self.curl(self.listed.url("/hello.txt"), "--fail")
        self.assertEqual(small.returncode, 0, small.stderr.decode() + self.proxy.logs())
        self.assertEqual(small.stdout, b"hello through the tunnel\n")
        big = self.curl(self.listed.url("/big.bin"), "--fail")
        self.assertEqual(big.returncode, 0, big.stderr.decode() + self.proxy.logs())
        with open(os.path.join(self.root, "big.bin"), "rb") as f:
            want = hashlib.sha256(f.read()).hexdigest()
        self.assertEqual(hashlib.sha256(big.stdout).hexdigest(), want)
        self.assertEqual(self.listed.connections(), 2)
        with open(self.proxy.log_path, encoding="utf-8") as f:
            log = f.read()
        self.assertEqual(log.count(f'"CONNECT {HOST}:{self.listed.port}" 200'), 2, log)
        # The cache saw none of it: a tunnel is never cached.
        self.assertEqual(self.proxy.cache_entries(), 0)

    def test_unlisted_host_refused_without_connecting(self) -> None:
        """A host:port not on the list gets 403, and the server there sees no connection."""
        status, body = connect(self.proxy, f"{HOST}:{self.unlisted.port}")
        self.assertEqual(status, 403, body)
        result = self.curl(self.unlisted.url("/hello.txt"))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b"403", result.stderr)
        self.assertEqual(self.unlisted.connections(), 0)

    def test_refused_upstream_is_502_with_reason(self) -> None:
        """A listed host:port that refuses the connection gets a 502 with one line why."""
        status, body = connect(self.proxy, f"{HOST}:{self.dead_port}")
        self.assertEqual(status, 502)
        self.assertTrue(body.startswith(b"pkgproxy: cannot open a tunnel to "), body)
        self.assertIn(b"refused", body)
        self.assertEqual(body.count(b"\n"), 1)
        # The proxy is still fine afterwards.
        status, _ = connect(self.proxy, f"{HOST}:{self.listed.port}")
        self.assertEqual(status, 200)


class InterceptBeforeTunnelTests(TestCase):
    """A host both routed (intercepted) and listed for a tunnel is intercepted."""

    def setUp(self) -> None:
        root = file_tree(self, {"files/tool.tar": BODY})
        self.tls = make_tls_files(self.mktemp())
        self.upstream: TlsServer = start_tls_server(self, root, self.tls)
        self.cache = os.path.abspath(self.mktemp())
        front = f"https://{HOST}:{self.upstream.port}/files/"
        self.proxy = start_pkgproxy(
            self,
            "[tls_intercept]\nenabled = true\n"
            f'tunnel = ["{HOST}:{self.upstream.port}"]\n'
            "[routes.internal]\n"
            'family = "generic"\nimmutable = true\n'
            f'upstream = "{front}"\nforward = ["{front}"]\n'
            f'ca_file = "{self.tls.ca_cert}"\n',
            cache_dir=self.cache,
        )

    def test_intercepted_and_cached_not_tunnelled(self) -> None:
        """curl trusting only pkgproxy's CA gets the file (so pkgproxy ended the TLS),
        and the second time from the cache."""
        if shutil.which("curl") is None:
            raise SkipTest("needs curl")
        ca = os.path.join(self.cache, "tls", "ca.crt")
        for n, want in enumerate((b"X-Cache: MISS", b"X-Cache: HIT")):
            self.proxy.wait_for_entries(n)
            result = subprocess.run(
                ["curl", "-sS", "--fail", "--max-time", "20", "--proxy", self.proxy.url("/")]
                + ["--cacert", ca, "-D", "-", "-o", os.devnull]
                + [self.upstream.url("/files/tool.tar")],
                capture_output=True,
                timeout=30,
                env=clean_env(),
            )
            self.assertEqual(result.returncode, 0, result.stderr.decode() + self.proxy.logs())
            self.assertIn(want, result.stdout)
        self.assertEqual(self.proxy.cache_entries(), 1)
