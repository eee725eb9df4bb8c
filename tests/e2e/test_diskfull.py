"""A full cache disk: hits go on, misses are served uncached, storing resumes with space.

The cache lives on a small tmpfs the test mounts (root only), nearly filled by a file of
the test's own; removing that file is "space returns".
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import urllib.error
import urllib.request

from twisted.trial.unittest import SkipTest, TestCase

from tests.support.procs import clean_env, start_pkgproxy, start_static_server

SMALL = os.urandom(100 * 1024)
BIG = os.urandom(1024 * 1024)


def fetch(url: str) -> tuple[int, bytes, str]:
    """``(status, body, X-Cache)``; a broken transfer raises."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=20) as resp:
        return resp.status, resp.read(), resp.headers.get("X-Cache", "")


class DiskFullTests(TestCase):
    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("mounting a small tmpfs needs root")
        self.cache = os.path.abspath(self.mktemp())
        os.makedirs(self.cache)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", self.cache],
            capture_output=True,
            timeout=20,
            env=clean_env(),
        )
        if mounted.returncode != 0:
            raise SkipTest(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
        self.addCleanup(
            subprocess.run, ["umount", "-l", self.cache], capture_output=True, timeout=20
        )
        root = self.mktemp()
        os.makedirs(root)
        for name, body in (("small.bin", SMALL), ("big.bin", BIG)):
            with open(os.path.join(root, name), "wb") as f:
                f.write(body)
        self.upstream = start_static_server(self, root)
        self.proxy = start_pkgproxy(
            self,
            '[cache]\nmax_size = "1GiB"\ndisk_retry_after = "2s"\n'
            '[routes.files]\nfamily = "generic"\nimmutable = true\n'
            f'upstream = "{self.upstream.url("/")}"\n',
            cache_dir=self.cache,
        )

    def fill(self) -> str:
        """Leave less free space on the cache disk than the big file needs."""
        st = os.statvfs(self.cache)
        free = st.f_bavail * st.f_frsize
        filler = os.path.join(self.cache, "filler")
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, free - 200 * 1024))
        return filler

    def test_disk_full(self) -> None:
        """Hits are served, misses relayed whole, and storing resumes once space is back."""
        url_small, url_big = self.proxy.url("/files/small.bin"), self.proxy.url("/files/big.bin")
        self.assertEqual(fetch(url_small)[2], "MISS")
        filler = self.fill()

        # The download that meets the full disk is finished from memory for its
        # client; the next one is relayed without trying the disk.
        for _ in range(2):
            status, body, cache = fetch(url_big)
            self.assertEqual((status, cache), (200, "MISS"))
            self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(BIG).digest())
        self.assertEqual(fetch(url_small)[1:], (SMALL, "HIT"))
        self.assertIn("cache disk error", self.proxy.logs())

        os.unlink(filler)
        time.sleep(2.5)  # past disk_retry_after
        self.assertEqual(fetch(url_big)[2], "MISS")
        # The first client has its body before the copy is committed (fsync, rename):
        # until then a second one joins that download; after, it is a hit.
        deadline = time.monotonic() + 20
        while True:
            status, body, cache = fetch(url_big)
            self.assertEqual((status, body == BIG), (200, True))
            if cache != "COALESCED" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.assertEqual(cache, "HIT")
