"""TLS interception: https:// sources through pkgproxy as an HTTPS proxy, cached.

The client sends ``CONNECT host:443``; pkgproxy answers with a certificate for that host
signed by its own CA (which the client is told to trust) and serves the requests inside
from its cache. A host no route names is refused before any TLS.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

from tests.support.aptcase import TOOLS, AptTestCase
from tests.support.aptenv import IsolatedApt
from tests.support.procs import clean_env, start_pkgproxy

HOST = "deb.example.test"


class InterceptTests(AptTestCase):
    def setUp(self) -> None:
        url = self.start_repo((*TOOLS, "curl"))
        self.cache = os.path.abspath(self.mktemp())
        self.proxy = start_pkgproxy(
            self,
            "[tls_intercept]\nenabled = true\n"
            f'[routes.debian]\nupstream = "{url}"\nforward = ["https://{HOST}/debian/"]\n',
            cache_dir=self.cache,
        )
        self.ca = os.path.join(self.cache, "tls", "ca.crt")

    def curl(self, url: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [
                "curl",
                "-sS",
                "--fail",
                "--max-time",
                "20",
                "--proxy",
                self.proxy.url("/"),
                "--cacert",
                self.ca,
                "-D",
                "-",
                *extra,
                url,
            ],
            capture_output=True,
            timeout=30,
            env=clean_env(),
        )

    def test_curl_through_the_tunnel_is_cached(self) -> None:
        """A file fetched over https through the proxy is cached, one entry for all paths."""
        pkg = self.repo.packages[0]
        url = f"https://{HOST}/debian/{pkg.filename}"
        before = self.proxy.cache_entries()
        first = self.curl(url, "-o", os.devnull)
        self.assertEqual(first.returncode, 0, first.stderr.decode() + self.proxy.logs())
        self.assertIn(b"X-Cache: MISS", first.stdout)
        self.proxy.wait_for_entries(before + 1)
        second = self.curl(url, "-o", os.devnull)
        self.assertIn(b"X-Cache: HIT", second.stdout)
        reverse = subprocess.run(
            ["curl", "-sS", "-D", "-", "-o", os.devnull, self.proxy.url(f"/debian/{pkg.filename}")],
            capture_output=True,
            timeout=30,
            env=clean_env(),
        )
        self.assertIn(b"X-Cache: HIT", reverse.stdout)
        ca = subprocess.run(
            ["curl", "-sS", self.proxy.url("/_pkgproxy/ca.crt")],
            capture_output=True,
            timeout=30,
            env=clean_env(),
        )
        with open(self.ca, "rb") as f:
            self.assertEqual(ca.stdout, f.read())

    def test_unconfigured_host_refused_before_tls(self) -> None:
        """CONNECT to a host no route names gets 403; no certificate is made."""
        result = self.curl("https://example.org/")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b"403", result.stdout + result.stderr)

    def test_apt_with_https_source(self) -> None:
        """Real apt with an https:// source and Acquire::https::Proxy, then offline."""
        apt = IsolatedApt(
            self.mktemp(),
            self.repo.sources_line(f"https://{HOST}/debian/"),
            extra_config={
                "Acquire::https::Proxy": self.proxy.url("/"),
                "Acquire::https::CaInfo": self.ca,
            },
        )
        names = [p.name for p in self.repo.packages]
        for round_ in ("online", "offline"):
            if round_ == "offline":
                self.upstream.stop()
                apt.wipe()
            result = apt.update(timeout=60)
            self.assertEqual(result.problems(), [], result.report() + self.proxy.logs())
            dest = self.mktemp()
            got = apt.download(names, dest, timeout=60)
            self.assertEqual(got.problems(), [], got.report())
            for p in self.repo.packages:
                with open(os.path.join(dest, p.basename), "rb") as f:
                    self.assertEqual(hashlib.sha256(f.read()).hexdigest(), p.sha256)
            shutil.rmtree(dest)
