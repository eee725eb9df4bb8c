"""The disk cache: content files, a durable index, LRU eviction to a byte budget.

Layout under the cache directory::

    index.sqlite   one row per complete, verified entry (WAL mode: survives kill -9)
    data/ab/<sha256 of key>.<first 16 hex of content sha256>   the bodies
    tmp/           downloads in progress; emptied on start

A body is written to ``tmp/``, fsynced, renamed into ``data/`` and only then recorded in
the index, so a row always names a complete file; a crash anywhere leaves at worst an
unreferenced file, which recovery deletes. Each version of a mutable entry has its own
file name, so a client that opened the old version keeps reading exactly the bytes its
headers describe. The whole index also lives in memory (an ordered dict in LRU order),
so a hit costs no database access; access times reach the database in batches.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pkgproxy.diskpool import DiskPool
from pkgproxy.service import os_reason

log = Logger()


def directory_problem(directory: str, create: bool = False) -> str | None:
    """Why the cache directory cannot be used, as one line naming it; ``None`` if it can.

    It must be a directory with ``data/`` and ``tmp/`` (made here with ``create``: at
    start, never later, when a missing directory means a disk that went away), on a
    writable file system, a file must be creatable in ``tmp/`` (a full disk passes),
    and an existing index must be a database. Blocking: call it before the reactor
    runs, or in the disk pool.
    """
    data = os.path.join(directory, "data")
    tmp = os.path.join(directory, "tmp")
    try:
        if create:
            if os.path.exists(directory) and not os.path.isdir(directory):
                return f"cache directory {directory}: not a directory"
            os.makedirs(data, exist_ok=True)
            os.makedirs(tmp, exist_ok=True)
        for path in (directory, data, tmp):
            if not stat.S_ISDIR(os.stat(path).st_mode):
                return f"cache directory {directory}: {path} is not a directory"
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return f"cache directory {directory}: read-only file system"
        probe = os.path.join(tmp, f".probe-{os.getpid()}")
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            os.unlink(probe)
        except OSError as e:
            # A full disk is not an unusable cache: hits are served and misses relayed
            # until there is room again (see CacheStore.disk_error).
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
        index = os.path.join(directory, "index.sqlite")
        if create and os.path.exists(index):
            db = sqlite3.connect(index)
            try:
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            finally:
                db.close()
    except OSError as e:
        where = f" ({e.filename})" if e.filename and e.filename != directory else ""
        return f"cache directory {directory}: {os_reason(e)}{where}"
    except sqlite3.Error as e:
        return f"cache directory {directory}: index.sqlite: {e}"
    return None


@dataclass
class Entry:
    """One complete, verified object in the cache.

    :ivar headers: response headers worth replaying (Content-Type and the like).
    :ivar etag: the upstream's validator, sent back on revalidation.
    :ivar last_modified: the upstream's Last-Modified, also used for ``If-Range``.
    :ivar expires: when the entry stops being fresh; ``None`` for immutable content.
    """

    key: str
    url: str
    file: str
    size: int
    sha256: str
    headers: dict[str, str]
    etag: str | None
    last_modified: str | None
    fetched: float
    expires: float | None
    last_access: float
    #: Other digests computed while it was downloaded (``sha256`` is its own field).
    digests: dict[str, str] = field(default_factory=dict)
    readers: int = field(default=0, compare=False)
    obsolete: bool = field(default=False, compare=False)

    def is_fresh(self, now: float) -> bool:
        """True while the entry may be served without asking upstream."""
        return self.expires is None or now < self.expires


def key_digest(key: str) -> str:
    """The file-name stem of a key: never a client-controlled path on disk."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    file TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    headers TEXT NOT NULL,
    etag TEXT,
    last_modified TEXT,
    fetched REAL NOT NULL,
    expires REAL,
    last_access REAL NOT NULL,
    digests TEXT NOT NULL DEFAULT '{}'
)
"""
_COLUMNS = (
    "key, url, file, size, sha256, headers, etag, last_modified, fetched, expires, last_access,"
    " digests"
)


class _Database:
    """The sqlite index, used only from DiskPool threads (one lock serialises them)."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)

    def load(self) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM entries ORDER BY last_access"
            ).fetchall()
        return [
            Entry(
                key=r[0],
                url=r[1],
                file=r[2],
                size=r[3],
                sha256=r[4],
                headers=json.loads(r[5]),
                etag=r[6],
                last_modified=r[7],
                fetched=r[8],
                expires=r[9],
                last_access=r[10],
                digests=json.loads(r[11]),
            )
            for r in rows
        ]

    def put(self, e: Entry) -> None:
        with self._lock:
            self._db.execute(
                f"INSERT OR REPLACE INTO entries ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    e.key,
                    e.url,
                    e.file,
                    e.size,
                    e.sha256,
                    json.dumps(e.headers),
                    e.etag,
                    e.last_modified,
                    e.fetched,
                    e.expires,
                    e.last_access,
                    json.dumps(e.digests),
                ),
            )

    def delete(self, keys: Iterable[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM entries WHERE key=?", [(k,) for k in keys])

    def touch(self, updates: Sequence[tuple[object, ...]]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "UPDATE entries SET last_access=?, expires=?, fetched=?, etag=?, "
                "last_modified=? WHERE key=?",
                updates,
            )
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CacheStore(Service):
    """The cache: lookup, temp files for downloads, atomic commit, eviction, recovery.

    :param flush_interval: seconds between batched writes of access times.
    :param check_interval: seconds between checks that the directory is still usable.
    :ivar failure: why the cache cannot be used (recovery failed, or the directory
        failed its last check), as one line naming the directory; ``None`` while it can.
    """

    def __init__(
        self,
        directory: str,
        max_size: int,
        diskpool: DiskPool,
        clock: IReactorTime,
        flush_interval: float = 30.0,
        disk_retry_after: float = 30.0,
        check_interval: float = 10.0,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.max_size = max_size
        self._pool = diskpool
        self._clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._db: _Database | None = None
        self._dirty: set[str] = set()
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = clock
        self._flush_interval = flush_interval
        self.total_bytes = 0
        self.evictions = 0
        self.ready = False
        self._ready_waiters: list[Deferred[None]] = []
        self.disk_retry_after = disk_retry_after
        self.disk_errors = 0
        self._disk_trouble_until = 0.0
        self.failure: str | None = None
        self._failed_waiters: list[Deferred[str]] = []
        self._checker = LoopingCall(self.check)
        self._checker.clock = clock
        self._check_interval = check_interval
        #: Called with each entry removed or evicted (not with one a commit replaces).
        self.on_drop: list[Callable[[Entry], object]] = []

    # -- lifecycle -------------------------------------------------------------------

    @property
    def tmp_dir(self) -> str:
        return os.path.join(self.directory, "tmp")

    def startService(self) -> None:
        super().startService()
        d = self._pool.run(self._recover)
        d.addCallback(self._loaded)
        d.addErrback(self._recovery_failed)

    def _recovery_failed(self, f):  # type: ignore[no-untyped-def]
        error = f.value
        why = os_reason(error) if isinstance(error, OSError) else str(error)
        self.failure = f"cache directory {self.directory}: {why}"
        log.critical("{problem}", problem=self.failure)
        waiters, self._failed_waiters = self._failed_waiters, []
        for d in waiters:
            d.callback(self.failure)

    def when_failed(self) -> Deferred[str]:
        """Fires with the reason if recovery at start fails (the cache cannot be used)."""
        d: Deferred[str] = Deferred()
        self._failed_waiters.append(d)
        return d

    def check(self) -> Deferred[None]:
        """Check in the pool that the directory is still usable; keep :attr:`failure`.

        Runs every ``check_interval`` once the cache is ready, so that a disk that went
        away or turned read-only makes ``/_pkgproxy/health`` fail, and one that came
        back makes it pass again.
        """
        d: Deferred[Any] = self._pool.run(directory_problem, self.directory)

        def checked(problem: str | None) -> None:
            if problem != self.failure:
                if problem is not None:
                    log.critical("{problem}", problem=problem)
                else:
                    log.info("cache directory {dir} is usable again", dir=self.directory)
            self.failure = problem

        d.addCallback(checked)
        d.addErrback(lambda f: log.failure("checking the cache directory", f))
        return d

    def when_ready(self) -> Deferred[None]:
        """Fires once the index is loaded and recovery is done."""
        if self.ready:
            return _fired()
        d: Deferred[None] = Deferred()
        self._ready_waiters.append(d)
        return d

    def _recover(self) -> tuple[_Database, list[Entry], int, int]:
        """Runs in the pool: make the directories, drop leftovers, load the index."""
        data = os.path.join(self.directory, "data")
        os.makedirs(data, exist_ok=True)
        os.makedirs(self.tmp_dir, exist_ok=True)
        temps = 0
        for name in os.listdir(self.tmp_dir):
            try:
                os.unlink(os.path.join(self.tmp_dir, name))
                temps += 1
            except OSError:
                pass
        db = _Database(os.path.join(self.directory, "index.sqlite"))
        kept: list[Entry] = []
        gone: list[Entry] = []
        for e in db.load():
            try:
                ok = os.stat(os.path.join(data, e.file)).st_size == e.size
            except OSError:
                ok = False
            (kept if ok else gone).append(e)
        if gone:
            db.delete(e.key for e in gone)
        wanted = {e.file for e in kept}
        strays = 0
        for sub in os.listdir(data):
            subdir = os.path.join(data, sub)
            if not os.path.isdir(subdir):
                continue
            for name in os.listdir(subdir):
                if f"{sub}/{name}" not in wanted:
                    try:
                        os.unlink(os.path.join(subdir, name))
                        strays += 1
                    except OSError:
                        pass
        return db, kept, temps + strays, len(gone)

    def _loaded(self, result: tuple[_Database, list[Entry], int, int]) -> None:
        self._db, entries, removed, lost = result
        for e in entries:
            self._entries[e.key] = e
            self.total_bytes += e.size
        log.info(
            "cache {dir}: {n} entries, {bytes} bytes; removed {removed} leftover files, "
            "{lost} index rows without a complete file",
            dir=self.directory,
            n=len(entries),
            bytes=self.total_bytes,
            removed=removed,
            lost=lost,
        )
        self.ready = True
        self._flusher.start(self._flush_interval, now=False)
        self._checker.start(self._check_interval, now=False)
        self._evict()
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(None)

    @inlineCallbacks
    def stopService(self):  # type: ignore[no-untyped-def]
        super().stopService()
        if self._flusher.running:
            self._flusher.stop()
        if self._checker.running:
            self._checker.stop()
        if self._db is not None:
            yield self.flush()
            db, self._db = self._db, None
            yield self._pool.run_durable(db.close)

    # -- lookups ---------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        """The entry for ``key``, marked as just used; ``None`` on a miss."""
        e = self._entries.get(key)
        if e is not None:
            self._entries.move_to_end(key)
            e.last_access = self._clock.seconds()
            self._dirty.add(key)
        return e

    def peek(self, key: str) -> Entry | None:
        """The entry for ``key`` without counting a use."""
        return self._entries.get(key)

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Entry]:
        """Every entry, least recently used first."""
        return list(self._entries.values())

    def path_of(self, entry: Entry) -> str:
        """Where the entry's body is on disk."""
        return os.path.join(self.directory, "data", entry.file)

    def pin(self, entry: Entry) -> None:
        """Keep the entry's file while a client reads it."""
        entry.readers += 1

    def unpin(self, entry: Entry) -> None:
        """Release a :meth:`pin`; a replaced or evicted file goes once nobody reads it."""
        entry.readers -= 1
        if entry.readers <= 0 and entry.obsolete:
            self._unlink(self.path_of(entry))

    # -- writing ---------------------------------------------------------------------

    def disk_error(self, why: str) -> None:
        """The cache disk refused a write (full, read-only, gone): stop writing a while.

        Until ``disk_retry_after`` has passed, misses are relayed from upstream without
        being stored, and hits are served as usual; then writing is tried again.
        """
        now = self._clock.seconds()
        if now >= self._disk_trouble_until:
            log.critical(
                "cache disk error in {dir}: {why}; relaying misses without storing them "
                "for {s:.0f}s",
                dir=self.directory,
                why=why,
                s=self.disk_retry_after,
            )
        self.disk_errors += 1
        self._disk_trouble_until = now + self.disk_retry_after

    def disk_trouble(self) -> bool:
        """Whether misses should bypass the disk now."""
        return self._clock.seconds() < self._disk_trouble_until

    def temp_name(self, key: str) -> str:
        """A fresh temp path for a download of ``key``."""
        stem = key_digest(key)[:16]
        return os.path.join(self.tmp_dir, f"{stem}.{os.urandom(6).hex()}")

    def commit(self, entry: Entry, temp_path: str, body: bytes | None = None) -> Deferred[Entry]:
        """Move a complete, verified temp file into the cache and index it.

        ``entry.file`` is filled in here. The entry is visible to :meth:`get` from the
        moment the returned Deferred fires. With ``body`` (a small download held in
        memory), the temp file is written here first, out of the reactor thread.
        """
        stem = key_digest(entry.key)
        entry.file = f"{stem[:2]}/{stem}.{entry.sha256[:16]}"
        final = self.path_of(entry)
        db = self._db

        def work() -> None:
            if body is None:
                fd = os.open(temp_path, os.O_RDONLY)
            else:
                fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                if body is not None:
                    view = memoryview(body)
                    while view:
                        view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(temp_path, final)
            dfd = os.open(os.path.dirname(final), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            if db is None:
                raise RuntimeError("cache is not open")
            db.put(entry)

        d = self._pool.run_durable(work)

        def done(_: None) -> Entry:
            self._install(entry)
            return entry

        def failed(f):  # type: ignore[no-untyped-def]
            self.disk_error(f.getErrorMessage())
            self._unlink(temp_path)
            return f

        return d.addCallbacks(done, failed)  # type: ignore[return-value]

    def _install(self, entry: Entry) -> None:
        old = self._entries.pop(entry.key, None)
        if old is not None:
            self.total_bytes -= old.size
            self._dirty.discard(old.key)
            if old.file != entry.file:
                self._retire(old)
        self._entries[entry.key] = entry
        self.total_bytes += entry.size
        self._evict(keep=entry.key)

    def update(self, entry: Entry) -> None:
        """Record changed freshness or validators of an entry (after a 304)."""
        self._dirty.add(entry.key)

    def discard(self, temp_path: str) -> None:
        """Remove a temp file that will not be committed."""
        self._unlink(temp_path)

    def remove(self, key: str) -> bool:
        """Drop ``key`` from the cache; True if it was there."""
        e = self._entries.pop(key, None)
        if e is None:
            return False
        self.total_bytes -= e.size
        self._dirty.discard(key)
        self._retire(e)
        self._dropped(e)
        if self._db is not None:
            self._pool.run_durable(self._db.delete, [key]).addErrback(
                lambda f: log.failure("index delete failed", f)
            )
        return True

    # -- housekeeping ----------------------------------------------------------------

    def _dropped(self, e: Entry) -> None:
        for f in self.on_drop:
            f(e)

    def _retire(self, e: Entry) -> None:
        e.obsolete = True
        if e.readers <= 0:
            self._unlink(self.path_of(e))

    def _unlink(self, path: str) -> None:
        def work() -> None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

        self._pool.run(work).addErrback(lambda f: log.failure("unlink {path}", f, path=path))

    def _evict(self, keep: str | None = None) -> None:
        """Remove least recently used entries until the cache fits its budget again.

        Goes down to 90% of the budget so that eviction runs in batches, and never
        removes an entry a client is reading.
        """
        if self.total_bytes <= self.max_size:
            return
        target = self.max_size * 0.9
        victims = []
        for key, e in self._entries.items():
            if self.total_bytes <= target:
                break
            if e.readers > 0 or key == keep:
                continue
            victims.append(e)
            self.total_bytes -= e.size
        for e in victims:
            del self._entries[e.key]
            self._dirty.discard(e.key)
            self._retire(e)
            self._dropped(e)
        self.evictions += len(victims)
        if victims and self._db is not None:
            log.info("evicted {n} entries to fit {max} bytes", n=len(victims), max=self.max_size)
            self._pool.run_durable(self._db.delete, [e.key for e in victims]).addErrback(
                lambda f: log.failure("index delete failed", f)
            )

    def flush(self) -> Deferred[None]:
        """Write batched access times and freshness changes to the index."""
        if not self._dirty or self._db is None:
            return _fired()
        updates = [
            (e.last_access, e.expires, e.fetched, e.etag, e.last_modified, e.key)
            for k in self._dirty
            if (e := self._entries.get(k)) is not None
        ]
        self._dirty.clear()
        d = self._pool.run_durable(self._db.touch, updates)
        d.addErrback(lambda f: log.failure("index flush failed", f))
        return d


def _fired() -> Deferred[None]:
    d: Deferred[None] = Deferred()
    d.callback(None)
    return d
