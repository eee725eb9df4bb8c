"""Crash safety: ``kill -9`` pkgproxy in the middle of downloads, restart it on the same cache.

Why this test exists: the cache's promise (pkgproxy/cache/store.py) is that an index row
always names a complete file, because a body is written to ``tmp/``, fsynced, renamed into
``data/`` and only then indexed, and that start-up empties ``tmp/`` and drops rows whose
file is missing or of the wrong size. Unit tests can only simulate a crash; here a real
process is killed with SIGKILL while a rate-limited upstream (tests/support/slowserver.py)
is still sending, and the restarted server must never serve a truncated body as a hit,
must have cleaned ``tmp/``, and must still serve everything it had completed before.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from twisted.trial.unittest import TestCase

from tests.support.procs import HOST, PkgProxy, start_pkgproxy
from tests.support.slowserver import SlowServer, start_slow_server

#: Upstream bytes per second, per response.
RATE = 5_000_000
HTTP_TIMEOUT = 30.0
#: Bound on every wait for the proxy, the cache or a client thread.
WAIT = 20.0


def _config(upstream: SlowServer) -> str:
    return (
        f'[routes.files]\nfamily = "generic"\nimmutable = true\nupstream = "{upstream.url("/")}"\n'
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _make_files(root: str, sizes: dict[str, int]) -> dict[str, bytes]:
    """Write random files of the given sizes under ``root``; return name -> content."""
    os.makedirs(root, exist_ok=True)
    files = {}
    for name, size in sizes.items():
        data = os.urandom(size)
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        files[name] = data
    return files


@dataclass
class Reply:
    """One complete HTTP exchange."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def x_cache(self) -> str | None:
        return self.headers.get("X-Cache")


def _request(proxy: PkgProxy, method: str, path: str) -> Reply:
    conn = http.client.HTTPConnection(HOST, proxy.port, timeout=HTTP_TIMEOUT)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


class Download(threading.Thread):
    """A GET in a thread that counts the bytes it has received, so a test can watch it."""

    def __init__(self, port: int, path: str) -> None:
        super().__init__(name=f"download {path}", daemon=True)
        self.port = port
        self.path = path
        self.received = 0
        self.status: int | None = None
        self.x_cache: str | None = None
        self.length: int | None = None
        self.error: str | None = None
        self.digest: str | None = None

    def run(self) -> None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=HTTP_TIMEOUT)
        try:
            conn.request("GET", self.path)
            resp = conn.getresponse()
            self.status = resp.status
            self.x_cache = resp.headers.get("X-Cache")
            cl = resp.headers.get("Content-Length")
            self.length = int(cl) if cl is not None else None
            h = hashlib.sha256()
            while True:  # bounded: ends at EOF, on a reset, or after HTTP_TIMEOUT of silence
                chunk = resp.read1(64 * 1024)
                if not chunk:
                    break
                h.update(chunk)
                self.received += len(chunk)
            self.digest = h.hexdigest()
        except (OSError, http.client.HTTPException) as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            conn.close()


def _tmp_files(cache_dir: str) -> dict[str, int]:
    """Name -> size of every file in the cache's ``tmp/`` (empty if there is no ``tmp/``)."""
    tmp = os.path.join(cache_dir, "tmp")
    out = {}
    try:
        names = os.listdir(tmp)
    except FileNotFoundError:
        return {}
    for name in names:
        try:
            out[name] = os.stat(os.path.join(tmp, name)).st_size
        except FileNotFoundError:
            pass
    return out


def _index_rows(cache_dir: str) -> list[tuple[str, str, int, str]]:
    """``(url, file, size, sha256)`` of every index row, read through a read-only handle."""
    path = os.path.join(cache_dir, "index.sqlite")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=WAIT)
    try:
        return db.execute("SELECT url, file, size, sha256 FROM entries").fetchall()
    finally:
        db.close()


def _data_files(cache_dir: str) -> dict[str, int]:
    """``ab/name`` -> size of every file under the cache's ``data/``."""
    data = os.path.join(cache_dir, "data")
    out = {}
    for sub in sorted(os.listdir(data)):
        subdir = os.path.join(data, sub)
        if os.path.isdir(subdir):
            for name in os.listdir(subdir):
                out[f"{sub}/{name}"] = os.stat(os.path.join(subdir, name)).st_size
    return out


class KillDuringDownloadTests(TestCase):
    """pkgproxy killed with SIGKILL during slow downloads, restarted on the same cache."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())

    def _context(self) -> str:
        """Logs of both servers, appended to failure messages."""
        return f"{self.proxy.logs()}\n{self.upstream.logs()}"

    def _start_proxy(self, *, cache_dir: str | None = None, port: int | None = None) -> None:
        self.proxy = start_pkgproxy(self, _config(self.upstream), cache_dir, port=port)
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Wait (bounded) until ``/_pkgproxy/ready`` says the cache has been recovered."""
        deadline = time.monotonic() + WAIT
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                reply = _request(self.proxy, "GET", "/_pkgproxy/ready")
                if reply.status == 200:
                    return
                last = str(reply.status)
            except (OSError, http.client.HTTPException) as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.05)
        self.fail(f"/_pkgproxy/ready not 200 within {WAIT} s ({last})\n{self._context()}")

    def _wait_for(self, what: str, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.02)
        self.fail(f"timed out after {WAIT} s waiting for {what}\n{self._context()}")

    def _wait_hit(self, name: str) -> None:
        """Wait until a HEAD of ``name`` is a cache hit (the commit follows the last byte)."""
        self._wait_for(
            f"{name} to be committed",
            lambda: _request(self.proxy, "HEAD", f"/files/{name}").x_cache == "HIT",
        )

    def _kill_and_join(self, downloads: list[Download]) -> None:
        self.proxy.kill9()
        for d in downloads:
            d.join(WAIT)
            self.assertFalse(d.is_alive(), f"client {d.path} still running {WAIT} s after kill")

    def _assert_recovered(self) -> list[tuple[str, str, int, str]]:
        """``tmp/`` is empty and every index row names a file of exactly its size and hash.

        Called right after a restart, before any request could start a new download.
        Returns the index rows.
        """
        cache = self.proxy.cache_dir
        self.assertEqual(_tmp_files(cache), {}, f"tmp/ not emptied at start\n{self._context()}")
        rows = _index_rows(cache)
        files = _data_files(cache)
        for url, file, size, sha in rows:
            self.assertIn(file, files, f"index row {url} names missing file {file}")
            self.assertEqual(files[file], size, f"{url}: data/{file} size differs from index")
            with open(os.path.join(cache, "data", file), "rb") as f:
                self.assertEqual(_sha256(f.read()), sha, f"{url}: data/{file} hash differs")
        self.assertEqual(
            sorted(files), sorted(r[1] for r in rows), "data/ files and index rows differ"
        )
        return rows

    def _assert_served(self, name: str, content: bytes, x_cache: str | None) -> Reply:
        reply = _request(self.proxy, "GET", f"/files/{name}")
        where = f"GET /files/{name}: status {reply.status}, X-Cache {reply.x_cache}"
        self.assertEqual(reply.status, 200, f"{where}\n{self._context()}")
        self.assertEqual(len(reply.body), len(content), f"{where}: wrong length")
        self.assertEqual(_sha256(reply.body), _sha256(content), f"{where}: wrong bytes")
        if x_cache is not None:
            self.assertEqual(reply.x_cache, x_cache, f"{where}\n{self._context()}")
        return reply

    def test_interrupted_download_is_fetched_again_and_earlier_entries_survive(self) -> None:
        """A download cut by kill -9 is never a hit; completed entries are hits after restart.

        After the restart ``tmp/`` is empty, the index and ``data/`` agree, the cut file
        is fetched again in full from upstream (MISS, a second upstream request), and the
        small files completed before the crash are served from the cache (HIT, correct
        bytes) with the upstream stopped.
        """
        small = _make_files(self.root, {"a.bin": 1, "b.bin": 40_000, "c.bin": 300_000})
        big = _make_files(self.root, {"big.bin": 20 * 1000 * 1000})["big.bin"]
        self.upstream = start_slow_server(self, self.root, rate=RATE)
        self._start_proxy()
        for name, content in small.items():
            self._assert_served(name, content, "MISS")
            self._wait_hit(name)

        download = Download(self.proxy.port, "/files/big.bin")
        download.start()
        self._wait_for(
            "1 MB of big.bin in tmp/ and at the client",
            lambda: (
                download.received > 0
                and any(s >= 1_000_000 for s in _tmp_files(self.proxy.cache_dir).values())
            ),
        )
        self._kill_and_join([download])
        self.assertEqual(download.status, 200)
        self.assertEqual(download.x_cache, "MISS")
        self.assertLess(download.received, len(big), "the download was not interrupted")
        leftovers = _tmp_files(self.proxy.cache_dir)
        self.assertTrue(leftovers, "kill -9 left no partial download in tmp/")
        self.assertTrue(all(s < len(big) for s in leftovers.values()), leftovers)
        self.assertNotIn(
            self.upstream.url("/big.bin"), [r[0] for r in _index_rows(self.proxy.cache_dir)]
        )

        self._start_proxy(cache_dir=self.proxy.cache_dir, port=self.proxy.port)
        rows = self._assert_recovered()
        self.assertEqual(
            sorted(r[0] for r in rows), sorted(self.upstream.url(f"/{n}") for n in small)
        )
        self._assert_served("big.bin", big, "MISS")
        self.assertEqual(self.upstream.requests("/big.bin"), 2, self.upstream.logs())
        self._wait_hit("big.bin")

        self.upstream.stop()
        for name, content in small.items():
            self._assert_served(name, content, "HIT")
        self._assert_served("big.bin", big, "HIT")

    def test_repeated_kills_during_concurrent_downloads(self) -> None:
        """Ten kill -9s during concurrent downloads never leave a wrong or partial hit.

        Each round adds four files (48 KB to 8 MB), downloads them and the previous
        round's at once, kills pkgproxy after a different delay, and restarts it. After every
        restart: ``tmp/`` is empty, index rows and ``data/`` agree in size and hash, a file
        is a HIT exactly when it has an index row, and every HIT is the complete file.
        Finally every file is served correctly (all asked at once), then again with the
        upstream stopped.
        """
        sizes = (48_000, 700_000, 3_000_000, 8_000_000)
        # After the first bytes reach tmp/; each < 8 MB / RATE, so a download is always cut.
        delays = (0.0, 0.25, 0.6, 1.0, 0.4, 0.1, 0.8, 0.05, 0.5, 0.3)
        files: dict[str, bytes] = {}
        self.upstream = start_slow_server(self, self.root, rate=RATE)
        self._start_proxy()
        hits = 0
        for round_, delay in enumerate(delays):
            files.update(
                _make_files(self.root, {f"r{round_}-{i}.bin": s for i, s in enumerate(sizes)})
            )
            recent = [n for n in sorted(files) if n.startswith((f"r{round_}-", f"r{round_ - 1}-"))]
            downloads = [Download(self.proxy.port, f"/files/{n}") for n in recent]
            for d in downloads:
                d.start()
            self._wait_for(
                f"round {round_}: bytes in tmp/",
                lambda: any(_tmp_files(self.proxy.cache_dir).values()),
            )
            time.sleep(delay)
            self._kill_and_join(downloads)
            self.assertTrue(
                _tmp_files(self.proxy.cache_dir), f"round {round_}: no download was cut"
            )
            for d in downloads:
                if d.error is None and d.status == 200 and d.received == d.length:
                    name = d.path.rsplit("/", 1)[1]
                    self.assertEqual(d.digest, _sha256(files[name]), f"{d.path}: wrong bytes")

            self._start_proxy(cache_dir=self.proxy.cache_dir, port=self.proxy.port)
            rows = self._assert_recovered()
            indexed = {url.rsplit("/", 1)[1] for url, *_ in rows}
            for name, content in sorted(files.items()):
                head = _request(self.proxy, "HEAD", f"/files/{name}")
                self.assertEqual(
                    head.x_cache == "HIT",
                    name in indexed,
                    f"round {round_}: {name} X-Cache {head.x_cache}, indexed: {name in indexed}",
                )
                if name in indexed:
                    hits += 1
                    self._assert_served(name, content, "HIT")
        self.assertGreater(hits, 0, "no download ever completed before a kill")

        # The slow upstream sends each response at RATE: ask for every file at once.
        fetches = [Download(self.proxy.port, f"/files/{n}") for n in sorted(files)]
        for d in fetches:
            d.start()
        for d in fetches:
            d.join(WAIT)
            self.assertFalse(d.is_alive(), f"client {d.path} still running after {WAIT} s")
            name = d.path.rsplit("/", 1)[1]
            where = f"GET {d.path}: status {d.status}, error {d.error}"
            self.assertEqual((d.status, d.error), (200, None), f"{where}\n{self._context()}")
            self.assertEqual(d.digest, _sha256(files[name]), f"{where}: wrong bytes")
        for name in sorted(files):
            self._wait_hit(name)
        self.upstream.stop()
        for name, content in sorted(files.items()):
            self._assert_served(name, content, "HIT")
