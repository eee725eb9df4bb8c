"""apt through pkgproxy while the upstream mirror is in mid-sync: no Hash Sum mismatch.

A mirror that has published a new InRelease but still serves the old canonical index
files makes a direct apt fail with "Hash Sum mismatch". pkgproxy serves a listed index
by the bytes its cached InRelease names, fetched by hash, so apt through it succeeds.
"""

from __future__ import annotations

import glob
import os
import shutil
import time

from tests.support import debrepo
from tests.support.aptcase import AptTestCase
from tests.support.aptenv import IsolatedApt
from tests.support.procs import start_pkgproxy

#: apt asks for canonical index names only, as it does against a mirror without by-hash.
CANONICAL = {"Acquire::By-Hash": "no"}


class MidSyncMirrorTests(AptTestCase):
    def setUp(self) -> None:
        url = self.start_repo()
        self.proxy = start_pkgproxy(
            self, f'[routes.debian]\nupstream = "{url}"\nindex_ttl = "1s"\n'
        )

    def apt_for(self, base: str) -> IsolatedApt:
        return IsolatedApt(self.mktemp(), self.repo.sources_line(base), extra_config=CANONICAL)

    def mid_sync(self) -> debrepo.DebRepo:
        """Publish a new version, then put the old canonical index files back."""
        binary = os.path.join(self.repo.dists_dir, self.repo.component, "binary-amd64")
        saved = self.mktemp()
        os.makedirs(saved)
        for path in glob.glob(os.path.join(binary, "Packages*")):
            shutil.copy2(path, saved)
        newer = [debrepo.PackageSpec(p.name, p.version + ".1") for p in debrepo.DEFAULT_PACKAGES]
        new = debrepo.republish(self.repo, newer)
        for path in glob.glob(os.path.join(saved, "Packages*")):
            shutil.copy2(path, binary)
        return new

    def test_mid_sync_mirror(self) -> None:
        """Direct apt sees a Hash Sum mismatch; apt through pkgproxy gets the new state."""
        through = self.apt_for(self.proxy.url("/debian/"))
        first = through.update(timeout=60)
        self.assertEqual(first.problems(), [], first.report())
        new = self.mid_sync()
        time.sleep(1.2)  # past index_ttl: pkgproxy revalidates InRelease

        direct = self.apt_for(self.upstream.url(f"/{self.repo.mount}/"))
        broken = direct.update(timeout=60)
        self.assertTrue(
            any(
                "Hash Sum mismatch" in line or "File has unexpected size" in line
                for line in broken.report().splitlines()
            ),
            "the scenario must break a direct apt\n" + broken.report(),
        )

        result = through.update(timeout=60)
        self.assertEqual(result.problems(), [], result.report() + self.proxy.logs())
        dest = self.mktemp()
        names = [p.name for p in new.packages]
        got = through.download(names, dest, timeout=60)
        self.assertEqual(got.problems(), [], got.report())
        self.assertEqual(
            sorted(os.listdir(dest)), sorted(p.basename for p in new.packages), got.report()
        )
