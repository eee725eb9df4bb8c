"""``pkgproxy-config ca`` against a real ``twistd -n pkgproxy`` with interception on.

The certificate it prints must be byte for byte the one the server made and serves, by
each way of finding it: from the running server, from the cache directory, and from the
server's configuration file. A server with interception off is a clear error.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import TestCase

from tests.support.procs import REPO_ROOT, clean_env, start_pkgproxy


def pkgproxy_config(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``pkgproxy-config`` as a program, with no proxy in its environment."""
    return subprocess.run(
        [sys.executable, "-m", "pkgproxy.clientconfig", *args],
        capture_output=True,
        env=clean_env({"PYTHONPATH": REPO_ROOT}),
        timeout=60,
    )


class CaCommandTests(TestCase):
    def setUp(self) -> None:
        self.cache = os.path.abspath(self.mktemp())
        self.proxy = start_pkgproxy(self, "[tls_intercept]\nenabled = true\n", cache_dir=self.cache)
        with open(os.path.join(self.cache, "tls", "ca.crt"), "rb") as f:
            self.ca = f.read()

    def test_from_the_running_server(self) -> None:
        """``--server`` prints the CA the server serves at /_pkgproxy/ca.crt, and only it
        (the install hint goes to stderr)."""
        result = pkgproxy_config("ca", "--server", self.proxy.url("/"))
        self.assertEqual(result.returncode, 0, result.stderr.decode() + self.proxy.logs())
        self.assertEqual(result.stdout, self.ca)
        self.assertIn(b"update-ca-certificates", result.stderr)

    def test_from_the_cache_directory(self) -> None:
        """``--cache-dir`` reads DIR/tls/ca.crt, as the server made it."""
        result = pkgproxy_config("ca", "--cache-dir", self.cache)
        self.assertEqual((result.returncode, result.stdout), (0, self.ca), result.stderr)

    def test_from_the_config_file(self) -> None:
        """``--config`` finds the CA where the server's configuration puts it: under its
        ``cache.dir``, or at ``tls_intercept.ca_cert`` when that is given."""
        config = os.path.abspath(self.mktemp())
        with open(config, "w", encoding="utf-8") as f:
            f.write(f'[cache]\ndir = "{self.cache}"\n[tls_intercept]\nenabled = true\n')
        result = pkgproxy_config("ca", "--config", config)
        self.assertEqual((result.returncode, result.stdout), (0, self.ca), result.stderr)
        elsewhere = os.path.abspath(self.mktemp())
        os.makedirs(elsewhere)
        with open(os.path.join(elsewhere, "operator-ca.crt"), "wb") as f:
            f.write(self.ca)
        with open(config, "w", encoding="utf-8") as f:
            f.write(
                "[tls_intercept]\nenabled = true\n"
                f'ca_cert = "{elsewhere}/operator-ca.crt"\nca_key = "{elsewhere}/ca.key"\n'
            )
        result = pkgproxy_config("ca", "--config", config)
        self.assertEqual((result.returncode, result.stdout), (0, self.ca), result.stderr)

    def test_interception_off_is_a_clear_error(self) -> None:
        """A server without interception answers 404 there: the command says why, prints
        nothing on stdout and exits non-zero."""
        plain = start_pkgproxy(self, "")
        result = pkgproxy_config("ca", "--server", plain.url("/"))
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, b"")
        self.assertIn(b"TLS interception is off", result.stderr)

    def test_missing_source_and_unreadable_dir(self) -> None:
        """No source is a usage error; a cache directory without a CA names the file."""
        self.assertEqual(pkgproxy_config("ca").returncode, 2)
        empty = os.path.abspath(self.mktemp())
        os.makedirs(empty)
        result = pkgproxy_config("ca", "--cache-dir", empty)
        self.assertEqual(result.returncode, 1)
        self.assertIn(os.path.join(empty, "tls", "ca.crt").encode(), result.stderr)
