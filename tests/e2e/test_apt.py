"""The real apt-get through a real pkgproxy, against a real (tiny, signed) Debian repository.

Why this test exists: unit tests prove pkgproxy's pieces agree with our reading of the
protocol; only apt itself can prove that apt accepts what pkgproxy serves: the InRelease
signature, by-hash indexes, percent-encoded pool names (``+`` -> ``%2b``, ``~`` -> ``%7e``),
pipelining, and the ``Hash Sum mismatch`` checks. The upstream is ``python3 -m http.server``
over a repository built with dpkg-deb, apt-ftparchive and gpg (tests/support/debrepo.py), and
apt runs fully isolated from the machine's own apt (tests/support/aptenv.py).
"""

from __future__ import annotations

from tests.support.aptcase import APT_TIMEOUT, AptTestCase
from tests.support.aptenv import IsolatedApt
from tests.support.procs import start_pkgproxy


class AptThroughPkgproxyTests(AptTestCase):
    """apt-get update and apt-get download through pkgproxy's ``/debian/`` route."""

    def setUp(self) -> None:
        upstream_url = self.start_repo()
        self.proxy = start_pkgproxy(self, f'[routes.debian]\nupstream = "{upstream_url}"\n')
        self.apt = IsolatedApt(self.mktemp(), self.repo.sources_line(self.proxy.url("/debian/")))

    def test_update_download_then_serve_offline(self) -> None:
        """Everything apt fetched once is served again from the cache with upstream gone."""
        self.ok(self.apt.update(timeout=APT_TIMEOUT))
        self.assertTrue(
            any(n.endswith("_InRelease") for n in self.apt.list_files()),
            f"apt stored no InRelease: {self.apt.list_files()}",
        )
        self.download_and_verify(self.mktemp())

        # Upstream gone; apt forgets everything, so each byte must come from pkgproxy's cache.
        self.upstream.stop()
        self.apt.wipe()
        self.assertEqual(self.apt.list_files(), [])
        self.ok(self.apt.update(timeout=APT_TIMEOUT))
        self.download_and_verify(self.mktemp())

    def test_repeated_update_has_no_hash_sum_mismatch(self) -> None:
        """Back-to-back updates (conditional requests, then a cold apt) stay consistent."""
        for _ in range(2):
            result = self.ok(self.apt.update(timeout=APT_TIMEOUT))
            self.assertNotIn("Hash Sum mismatch", result.output)
        # A cold apt against a warm proxy: every index comes out of the cache.
        self.apt.wipe()
        result = self.ok(self.apt.update(timeout=APT_TIMEOUT))
        self.assertNotIn("Hash Sum mismatch", result.output)
        self.download_and_verify(self.mktemp())
