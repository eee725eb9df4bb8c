"""The real apt-get through a real pkgproxy, against a real (tiny, signed) Debian repository.

Why this test exists: unit tests prove pkgproxy's pieces agree with our reading of the
protocol; only apt itself can prove that apt accepts what pkgproxy serves: the InRelease
signature, by-hash indexes, percent-encoded pool names (``+`` -> ``%2b``, ``~`` -> ``%7e``),
pipelining, and the ``Hash Sum mismatch`` checks. The upstream is ``python3 -m http.server``
over a repository built with dpkg-deb, apt-ftparchive and gpg (tests/support/debrepo.py), and
apt runs fully isolated from the machine's own apt (tests/support/aptenv.py).
"""

from __future__ import annotations

import hashlib
import os

from twisted.trial.unittest import SkipTest, TestCase

from tests.support import debrepo
from tests.support.aptenv import AptResult, IsolatedApt
from tests.support.procs import start_pkgproxy, start_static_server

TOOLS = ("apt-get", "apt-ftparchive", "dpkg-deb", "gpg", "gpgconf")
APT_TIMEOUT = 60.0


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


class AptThroughPkgproxyTests(TestCase):
    """apt-get update and apt-get download through pkgproxy's ``/debian/`` route."""

    def setUp(self) -> None:
        missing = debrepo.missing_tools(TOOLS)
        if missing:
            raise SkipTest(
                f"needs {', '.join(missing)} (Debian packages listed in .ci/apt-packages.txt)"
            )
        self.repo = debrepo.build_debian_repo(self.mktemp())
        self.upstream = start_static_server(self, self.repo.serve_dir)
        upstream_url = self.upstream.url(f"/{self.repo.mount}/")
        self.proxy = start_pkgproxy(self, f'[routes.debian]\nupstream = "{upstream_url}"\n')
        self.apt = IsolatedApt(self.mktemp(), self.repo.sources_line(self.proxy.url("/debian/")))
        self.names = [p.name for p in self.repo.packages]

    def _context(self) -> str:
        """Logs of both servers, appended to every failure message."""
        return f"{self.proxy.logs()}\n{self.upstream.logs()}"

    def _ok(self, result: AptResult) -> AptResult:
        """Assert apt exited 0 and printed no E:/W:/Err: line and no Hash Sum mismatch."""
        if result.timed_out or result.returncode != 0 or result.problems():
            problems = "\n".join(result.problems())
            self.fail(
                f"apt did not succeed cleanly:\n{problems}\n{result.report()}\n{self._context()}"
            )
        return result

    def _download_and_verify(self, dest: str) -> None:
        """``apt-get download`` every package; each file must be byte-identical to upstream's."""
        self._ok(self.apt.download(self.names, dest, timeout=APT_TIMEOUT))
        got = sorted(n for n in os.listdir(dest) if n.endswith(".deb"))
        want = sorted(p.basename for p in self.repo.packages)
        self.assertEqual(got, want, f"downloaded files differ\n{self._context()}")
        for p in self.repo.packages:
            self.assertEqual(
                _sha256(os.path.join(dest, p.basename)),
                p.sha256,
                f"{p.basename}: sha256 differs from the repository's\n{self._context()}",
            )

    def test_update_download_then_serve_offline(self) -> None:
        """Everything apt fetched once is served again from the cache with upstream gone."""
        self._ok(self.apt.update(timeout=APT_TIMEOUT))
        self.assertTrue(
            any(n.endswith("_InRelease") for n in self.apt.list_files()),
            f"apt stored no InRelease: {self.apt.list_files()}",
        )
        self._download_and_verify(self.mktemp())

        # Upstream gone; apt forgets everything, so each byte must come from pkgproxy's cache.
        self.upstream.stop()
        self.apt.wipe()
        self.assertEqual(self.apt.list_files(), [])
        self._ok(self.apt.update(timeout=APT_TIMEOUT))
        self._download_and_verify(self.mktemp())

    def test_repeated_update_has_no_hash_sum_mismatch(self) -> None:
        """Back-to-back updates (conditional requests, then a cold apt) stay consistent."""
        for _ in range(2):
            result = self._ok(self.apt.update(timeout=APT_TIMEOUT))
            self.assertNotIn("Hash Sum mismatch", result.output)
        # A cold apt against a warm proxy: every index comes out of the cache.
        self.apt.wipe()
        result = self._ok(self.apt.update(timeout=APT_TIMEOUT))
        self.assertNotIn("Hash Sum mismatch", result.output)
        self._download_and_verify(self.mktemp())
