"""An upstream that is slow on purpose: files with Content-Length, sent at a limited rate.

Why: to kill pkgproxy in the middle of a download, a download has to last long enough to be
caught in the middle. ``python3 -m http.server`` sends a file as fast as loopback allows;
this server sends it in chunks, sleeping between them so that each response goes out at
about ``--rate`` bytes per second, with a correct ``Content-Length`` up front (so a cut
transfer is detectably short).

Run it as a program::

    python3 -m tests.support.slowserver --port P --root DIR --rate 5000000

or from a trial test with :func:`start_slow_server`, which also stops it in cleanup. It
speaks HTTP/1.1 with keep-alive (like a real mirror), answers GET and HEAD, ignores
``Range``, and serves ``/_slowserver/ready`` (200) for the readiness check. Every request
is logged on stdout as one line, which tests count::

    GET /big.bin 200 start 20000000
    GET /big.bin 200 done 20000000
    GET /big.bin 200 aborted 3276800

Every loop is bounded: a response loop by the file's size, the server itself by
``--lifetime`` seconds (it exits on its own even if nobody stops it).
"""

from __future__ import annotations

import argparse
import os
import posixpath
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from twisted.trial.unittest import SynchronousTestCase

from tests.support.procs import (
    HOST,
    REPO_ROOT,
    ServerProcess,
    _fail_start,
    _wait_health,
    clean_env,
    free_port,
)

READY_PATH = "/_slowserver/ready"
#: Bytes per write; the rate limit sleeps between chunks.
CHUNK = 64 * 1024


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _SlowServer

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the one-line-per-request log is written by :meth:`_log`."""

    def _log(self, status: int, what: str, n: int) -> None:
        with self.server.log_lock:
            sys.stdout.write(f"{self.command} {self.path} {status} {what} {n}\n")
            sys.stdout.flush()

    def _local_path(self) -> str | None:
        """The file under the root that the request names, or None (never outside root)."""
        path = unquote(urlsplit(self.path).path)
        parts = [p for p in posixpath.normpath(path).split("/") if p not in ("", ".", "..")]
        full = os.path.join(self.server.root, *parts)
        return full if parts and os.path.isfile(full) else None

    def _simple(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._log(status, "done", len(body))

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if self.path == READY_PATH:
            self._simple(200, b"ready\n")
            return
        full = self._local_path()
        if full is None:
            self._simple(404, b"not found\n")
            return
        size = os.path.getsize(full)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self._log(200, "start", size)
        if self.command == "HEAD":
            return
        sent = 0
        began = time.monotonic()
        try:
            with open(full, "rb") as f:
                while sent < size:  # bounded: every pass sends at least one byte or breaks
                    chunk = f.read(min(CHUNK, size - sent))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    sent += len(chunk)
                    ahead = sent / self.server.rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(min(ahead, 1.0))
        except OSError:
            self.close_connection = True
            self._log(200, "aborted", sent)
            return
        self._log(200, "done" if sent == size else "short", sent)


class _SlowServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], root: str, rate: float) -> None:
        super().__init__(address, _Handler)
        self.root = os.path.abspath(root)
        self.rate = rate
        self.log_lock = threading.Lock()


def main(argv: list[str] | None = None) -> None:
    """Serve ``--root`` on ``--host:--port`` at ``--rate`` bytes/s until ``--lifetime`` ends."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default=HOST)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--rate", type=float, default=5_000_000, help="bytes per second")
    p.add_argument("--lifetime", type=float, default=600.0, help="exit after this many s")
    args = p.parse_args(argv)
    if args.rate <= 0:
        p.error("--rate must be positive")
    server = _SlowServer((args.host, args.port), args.root, args.rate)
    timer = threading.Timer(args.lifetime, server.shutdown)
    timer.daemon = True
    timer.start()
    sys.stdout.write(f"listening on {args.host}:{args.port} rate {args.rate:.0f} B/s\n")
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


class SlowServer(ServerProcess):
    """A running slow upstream (see the module docstring)."""

    def __init__(self, root: str, port: int, rate: float, log_path: str, lifetime: float) -> None:
        self.root = root
        self.rate = rate
        pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
        super().__init__(
            "slow-server",
            [
                sys.executable, "-u", "-m", "tests.support.slowserver",
                "--port", str(port), "--root", root, "--rate", str(rate),
                "--lifetime", str(lifetime),
            ],
            port,
            log_path,
            clean_env({"PYTHONPATH": pythonpath}),
            cwd=REPO_ROOT,
        )  # fmt: skip

    def requests(self, path: str, what: str = "start") -> int:
        """How many ``GET`` requests for ``path`` reached ``what`` (start, done, aborted)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return 0
        return sum(1 for line in lines if line.split()[:4] == ["GET", path, "200", what])


def start_slow_server(
    testcase: SynchronousTestCase,
    root_dir: str,
    *,
    rate: float = 5_000_000,
    port: int | None = None,
    timeout: float = 10.0,
    lifetime: float = 600.0,
) -> SlowServer:
    """Serve ``root_dir`` at ``rate`` bytes/s per response on 127.0.0.1 until the test ends.

    Returns the :class:`SlowServer` (``.port``, ``.url(path)``, ``.stop()``, ``.logs()``,
    ``.requests(path)``). The cleanup that stops it is registered before the readiness
    wait; the test fails with the server's output if it is not ready within ``timeout`` s.
    """
    log_dir = os.path.abspath(testcase.mktemp())
    os.makedirs(log_dir)
    server = SlowServer(
        os.path.abspath(root_dir),
        port or free_port(),
        rate,
        os.path.join(log_dir, "slow-server.log"),
        lifetime,
    )
    testcase.addCleanup(server.stop)
    error = _wait_health(server, READY_PATH, timeout)
    if error:
        _fail_start(testcase, server, error)
    return server


if __name__ == "__main__":
    main()
