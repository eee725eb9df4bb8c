"""The cache store: atomic commit, durable index, recovery, LRU eviction, pins."""

from __future__ import annotations

import errno
import hashlib
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pkgproxy.cache.store import CacheStore, Entry, directory_problem
from pkgproxy.diskpool import DiskPool


class StoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = self.open(max_size=1000)

    def open(self, max_size: int = 1000) -> CacheStore:
        store = CacheStore(self.dir, max_size, DiskPool(None), self.clock)
        store.startService()
        self.addCleanup(lambda: store.running and store.stopService())
        self.assertTrue(store.ready)
        return store

    def put(self, key: str, body: bytes, store: CacheStore | None = None) -> Entry:
        store = store or self.store
        temp = store.temp_name(key)
        with open(temp, "wb") as f:
            f.write(body)
        now = self.clock.seconds()
        e = Entry(
            key,
            "http://u/" + key,
            "",
            len(body),
            hashlib.sha256(body).hexdigest(),
            {},
            None,
            None,
            now,
            None,
            now,
        )
        result = self.successResultOf(store.commit(e, temp))
        return result

    def read(self, e: Entry, store: CacheStore | None = None) -> bytes:
        with open((store or self.store).path_of(e), "rb") as f:
            return f.read()

    def test_commit_and_get(self) -> None:
        """A committed entry is found, its file holds the body, and tmp/ is empty."""
        e = self.put("a", b"hello")
        self.assertIs(self.store.get("a"), e)
        self.assertEqual(self.read(e), b"hello")
        self.assertEqual(os.listdir(self.store.tmp_dir), [])
        self.assertEqual(self.store.total_bytes, 5)

    def test_survives_restart(self) -> None:
        """The index is durable: a new store on the same directory has the entry."""
        self.put("a", b"hello")
        self.store.stopService()
        again = self.open()
        e = again.get("a")
        assert e is not None
        self.assertEqual(self.read(e, again), b"hello")

    def test_recovery_removes_leftovers(self) -> None:
        """Temp files, unindexed data files and rows without a complete file are dropped."""
        keep = self.put("keep", b"kept")
        gone = self.put("gone", b"truncated later")
        self.store.stopService()
        with open(os.path.join(self.dir, "tmp", "partial"), "wb") as f:
            f.write(b"half a download")
        os.makedirs(os.path.join(self.dir, "data", "zz"), exist_ok=True)
        with open(os.path.join(self.dir, "data", "zz", "stray"), "wb") as f:
            f.write(b"?")
        with open(os.path.join(self.dir, "data", gone.file), "r+b") as f:
            f.truncate(3)
        again = self.open()
        self.assertEqual(os.listdir(again.tmp_dir), [])
        self.assertFalse(os.path.exists(os.path.join(self.dir, "data", "zz", "stray")))
        self.assertIsNone(again.get("gone"))
        self.assertFalse(os.path.exists(os.path.join(self.dir, "data", gone.file)))
        e = again.get("keep")
        assert e is not None
        self.assertEqual((e.file, self.read(e, again)), (keep.file, b"kept"))

    def test_lru_eviction(self) -> None:
        """Over budget, the least recently used entries go first."""
        self.put("a", b"a" * 400)
        self.put("b", b"b" * 400)
        self.clock.advance(1)
        self.store.get("a")
        self.put("c", b"c" * 400)
        self.assertIsNotNone(self.store.peek("a"))
        self.assertIsNone(self.store.peek("b"))
        self.assertIsNotNone(self.store.peek("c"))
        self.assertLessEqual(self.store.total_bytes, 1000)
        self.assertEqual(self.store.evictions, 1)

    def test_pinned_entry_not_evicted(self) -> None:
        """An entry a client is reading is never evicted."""
        a = self.put("a", b"a" * 400)
        self.store.pin(a)
        self.put("b", b"b" * 400)
        self.put("c", b"c" * 400)
        self.assertIsNotNone(self.store.peek("a"))
        self.assertIsNone(self.store.peek("b"))
        self.store.unpin(a)

    def test_replaced_version_kept_while_read(self) -> None:
        """A client reading an old version keeps its file until it is done."""
        old = self.put("idx", b"version 1")
        self.store.pin(old)
        new = self.put("idx", b"version 2")
        self.assertNotEqual(old.file, new.file)
        self.assertEqual(self.read(old), b"version 1")
        self.assertEqual(self.read(new), b"version 2")
        self.store.unpin(old)
        self.assertFalse(os.path.exists(self.store.path_of(old)))
        self.assertEqual(self.store.total_bytes, len(b"version 2"))

    def test_access_times_flushed(self) -> None:
        """Access times reach the index in batches, so LRU order survives a restart."""
        self.put("a", b"a" * 300)
        self.put("b", b"b" * 300)
        self.clock.advance(10)
        self.store.get("a")
        self.store.stopService()
        again = self.open(max_size=1000)
        again.max_size = 500
        self.clock.advance(1)
        self.put("c", b"c" * 100, store=again)
        self.assertIsNotNone(again.peek("a"))
        self.assertIsNone(again.peek("b"))


class DirectoryTests(SynchronousTestCase):
    """The cache directory at start and while running: usable, or one line saying why."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.clock = Clock()

    def test_usable_directory_is_made(self) -> None:
        self.assertIsNone(directory_problem(self.dir, create=True))
        for sub in ("data", "tmp"):
            self.assertTrue(os.path.isdir(os.path.join(self.dir, sub)))
        self.assertEqual(os.listdir(os.path.join(self.dir, "tmp")), [])

    def test_a_file_is_not_a_directory(self) -> None:
        with open(self.dir, "w") as f:
            f.write("x")
        self.assertEqual(
            directory_problem(self.dir, create=True), f"cache directory {self.dir}: not a directory"
        )

    def test_missing_is_not_created_while_running(self) -> None:
        """Later checks never make the directory: a missing one is a disk gone away."""
        problem = directory_problem(self.dir)
        self.assertEqual(problem, f"cache directory {self.dir}: no such file or directory")
        self.assertFalse(os.path.exists(self.dir))

    def test_data_replaced_by_a_file(self) -> None:
        os.makedirs(os.path.join(self.dir, "tmp"))
        with open(os.path.join(self.dir, "data"), "w") as f:
            f.write("x")
        problem = directory_problem(self.dir)
        self.assertEqual(problem, f"cache directory {self.dir}: {self.dir}/data is not a directory")

    def test_corrupt_index(self) -> None:
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "index.sqlite"), "wb") as f:
            f.write(b"garbage" * 1000)
        problem = directory_problem(self.dir, create=True)
        assert problem is not None
        self.assertTrue(problem.startswith(f"cache directory {self.dir}: index.sqlite: "))

    def test_failed_recovery_is_reported(self) -> None:
        """Recovery that fails sets ``failure`` and fires ``when_failed``; never ready."""
        with open(self.dir, "w") as f:
            f.write("x")
        store = CacheStore(self.dir, 1000, DiskPool(None), self.clock)
        failed: list[str] = []
        store.when_failed().addCallback(failed.append)
        store.startService()
        self.addCleanup(store.stopService)
        self.assertFalse(store.ready)
        self.assertEqual(len(failed), 1)
        self.assertEqual(store.failure, failed[0])
        self.assertTrue(failed[0].startswith(f"cache directory {self.dir}: "), failed[0])

    def test_checked_while_running(self) -> None:
        """Every ``check_interval`` the directory is checked; failure follows it both ways."""
        store = CacheStore(self.dir, 1000, DiskPool(None), self.clock, check_interval=5)
        store.startService()
        self.addCleanup(store.stopService)
        self.assertIsNone(store.failure)
        os.rename(self.dir, self.dir + ".gone")
        self.clock.advance(5)
        self.assertEqual(store.failure, f"cache directory {self.dir}: no such file or directory")
        os.rename(self.dir + ".gone", self.dir)
        self.clock.advance(5)
        self.assertIsNone(store.failure)

    def test_full_disk_is_usable(self) -> None:
        """A full disk is not a failed cache: misses are relayed until there is room."""
        real_open = os.open

        def full(path: str, flags: int, mode: int = 0o777) -> int:
            if ".probe-" in path:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            return real_open(path, flags, mode)

        self.patch(os, "open", full)
        self.assertIsNone(directory_problem(self.dir, create=True))
