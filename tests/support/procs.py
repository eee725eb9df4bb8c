"""Start and stop real server processes from trial tests: upstream stand-ins and pkgproxy.

Why subprocesses and not in-reactor servers: the end-to-end tests run real clients (apt-get,
pip, npm, skopeo) as blocking subprocesses from synchronous test methods, so the servers they
talk to cannot share the test's reactor. A subprocess also gives pkgproxy the exact start-up
path operators use (``twistd -n pkgproxy``), and lets a test kill it hard or stop an upstream
mid-test to prove the cache serves offline.

Rules every helper here keeps:

* everything listens on 127.0.0.1, on a port picked by :func:`free_port`;
* every child runs in its own session/process group, and the whole group is stopped by a
  cleanup registered with ``testcase.addCleanup`` *before* waiting for readiness, so a server
  never outlives its test, not even when start-up fails;
* every wait is bounded, and a failure message carries the tail of the child's log.

Typical use::

    upstream = start_static_server(self, repo.serve_dir)
    proxy = start_pkgproxy(self, f'[routes.debian]\\nupstream = "{upstream.url("/debian/")}"\\n')
    ...  # run a client against proxy.url("/debian/")
    upstream.stop()  # from here on only pkgproxy's cache can answer
"""

from __future__ import annotations

import http.client
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from twisted.trial.unittest import SynchronousTestCase

#: The repository checkout these tests belong to (tests/support/procs.py -> ../..). Put on
#: PYTHONPATH of pkgproxy so a fresh clone works without ``pip install``.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Environment variables that would silently route a child's HTTP through some other proxy.
PROXY_ENV_VARS = (
    "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
    "no_proxy", "NO_PROXY", "ftp_proxy", "FTP_PROXY", "PROXY", "proxy",
)  # fmt: skip

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to 0, read it back, close).

    There is a small window before the child binds it; tests accept that instead of
    parsing "listening on" lines out of every kind of server.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def file_tree(testcase: SynchronousTestCase, files: Mapping[str, bytes]) -> str:
    """A new directory holding ``files`` (relative path -> content): an upstream's root."""
    root = os.path.abspath(testcase.mktemp())
    for name, content in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)
    return root


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` without proxy variables, plus ``extra``.

    A stray ``http_proxy`` in CI would turn a reverse-mode test into a forward-mode one, or
    send loopback traffic somewhere else entirely.
    """
    env = {k: v for k, v in os.environ.items() if k not in PROXY_ENV_VARS}
    env.update(extra or {})
    return env


def pkgproxy_config_text(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``pkgproxy-config`` as a program (``python -m pkgproxy.clientconfig``) with no
    proxy in its environment; its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "pkgproxy.clientconfig", *args],
        capture_output=True,
        text=True,
        env=clean_env({"PYTHONPATH": REPO_ROOT}),
        timeout=60,
        check=False,
    )


def tail(path: str, max_bytes: int = 8000) -> str:
    """The last ``max_bytes`` of a text file, or a note that it is missing."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError as e:
        return f"<{path}: {e.strerror}>"
    text = data.decode("utf-8", errors="replace")
    return ("...\n" if size > max_bytes else "") + text


@dataclass(frozen=True)
class Run:
    """What a client command did."""

    argv: list[str]
    returncode: int
    output: str

    def report(self) -> str:
        """The command and its output, for failure messages."""
        return f"$ {' '.join(self.argv)}\n(exit {self.returncode})\n{self.output[-8000:]}"


def run_client(argv: Sequence[str], env: Mapping[str, str], timeout: float) -> Run:
    """Run a client command to its end, stdout and stderr together; bounded by ``timeout``
    (then its output so far, and exit -1). Never raises for a non-zero exit."""
    argv = list(argv)
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else ""
        return Run(argv, -1, f"{out}\n(timed out after {timeout} s)")
    return Run(argv, done.returncode, done.stdout.decode(errors="replace"))


class ServerProcess:
    """A server child in its own process group. Stop it with :meth:`stop` or :meth:`kill9`.

    Both are idempotent; the cleanup registered at start calls :meth:`stop` again, which is
    then a no-op.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        output_path: str,
        env: Mapping[str, str],
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        #: Where the child's stdout and stderr go.
        self.output_path = output_path
        #: The server's main log (for the static server: its request log, i.e. its output).
        self.log_path = output_path
        with open(output_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,  # own session and process group: killpg reaches all
            )
        self.pid = self.process.pid

    @property
    def running(self) -> bool:
        """True while the group leader has not exited."""
        return self.process.poll() is None

    def url(self, path: str = "/") -> str:
        """``http://127.0.0.1:PORT`` + ``path`` (``path`` should start with ``/``)."""
        return f"http://{HOST}:{self.port}{path}"

    def logs(self) -> str:
        """Tail of everything the server logged, for failure messages."""
        return f"--- {self.name} log {self.log_path} ---\n{tail(self.log_path)}"

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, wait up to ``timeout`` s, then SIGKILL it.

        Graceful on purpose: pkgproxy gets the chance to shut down as an operator's
        ``systemctl stop`` would make it.
        """
        if self.process.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait(timeout)
        # Any grandchildren left in the group (the group id stays ours while they live).
        self._signal_group(signal.SIGKILL)

    def kill9(self, timeout: float = 10.0) -> None:
        """SIGKILL the whole group at once, like a crash or the OOM killer, and reap it."""
        if self.process.returncode is None:
            self._signal_group(signal.SIGKILL)
            self.process.wait(timeout)
        self._signal_group(signal.SIGKILL)


class StaticServer(ServerProcess):
    """``python3 -m http.server`` serving :attr:`root`: a stand-in upstream mirror.

    It speaks HTTP/1.0 and closes every connection, sends ``Last-Modified`` but no ETag,
    and ignores ``Range``; simple on purpose, like many real mirrors behind odd middleboxes.
    """

    def __init__(self, root: str, port: int, log_path: str) -> None:
        self.root = root
        super().__init__(
            "static-server",
            [
                sys.executable,
                "-u",
                "-m",
                "http.server",
                "--bind",
                HOST,
                str(port),
                "--directory",
                root,
            ],
            port,
            log_path,
            clean_env(),
        )


class PkgProxy(ServerProcess):
    """A running ``twistd -n pkgproxy``.

    :attr:`log_path` is twistd's ``--logfile``; :attr:`stdio_path` catches anything printed
    before logging starts (import errors, config errors, tracebacks).
    """

    def __init__(
        self,
        argv: Sequence[str],
        port: int,
        log_path: str,
        stdio_path: str,
        config_path: str,
        cache_dir: str,
        env: Mapping[str, str],
        cwd: str,
    ) -> None:
        self.config_path = config_path
        self.cache_dir = cache_dir
        self.stdio_path = stdio_path
        super().__init__("pkgproxy", argv, port, stdio_path, env, cwd=cwd)
        self.log_path = log_path  # twistd's --logfile, not the stdio capture

    def logs(self) -> str:
        """Tails of twistd's log file and of the process's stdout/stderr."""
        return (
            f"--- pkgproxy log {self.log_path} ---\n{tail(self.log_path)}\n"
            f"--- pkgproxy stdout/stderr {self.stdio_path} ---\n{tail(self.stdio_path, 4000)}"
        )

    def metrics(self) -> bytes:
        """The server's Prometheus text (``/_pkgproxy/metrics``)."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            conn.request("GET", "/_pkgproxy/metrics")
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        assert resp.status == 200, body
        return body

    def cache_entries(self) -> int:
        """Complete entries in the cache, from the server's own metrics."""
        body = self.metrics()
        found = re.search(rb"^pkgproxy_cache_entries ([0-9.e+]+)$", body, re.M)
        assert found is not None, body
        return int(float(found.group(1)))

    def wait_for_entries(self, n: int, timeout: float = 10.0) -> None:
        """Wait until the cache holds ``n`` entries: a download is committed just after
        its client has it, so a request right after may still join that download."""
        deadline = time.monotonic() + timeout
        while self.cache_entries() < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"the cache never held {n} entries\n{self.logs()}")
            time.sleep(0.05)


def _wait_tcp(server: ServerProcess, timeout: float) -> str | None:
    """Wait until ``server`` accepts TCP connections; return an error text or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.running:
            return f"{server.name} exited with status {server.process.returncode}"
        try:
            with socket.create_connection((HOST, server.port), timeout=0.5):
                return None
        except OSError:
            time.sleep(0.05)
    return f"{server.name} did not accept connections on port {server.port} within {timeout} s"


def _wait_health(server: ServerProcess, path: str, timeout: float) -> str | None:
    """Wait until ``GET path`` answers 200; return an error text or None."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not server.running:
            return f"{server.name} exited with status {server.process.returncode}"
        conn = http.client.HTTPConnection(HOST, server.port, timeout=2.0)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                return None
            last = f"{resp.status} {resp.reason}"
        except (OSError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {e}"
        finally:
            conn.close()
        time.sleep(0.1)
    return f"{server.name}: GET {path} gave no 200 within {timeout} s (last: {last})"


def _fail_start(testcase: SynchronousTestCase, server: ServerProcess, error: str) -> NoReturn:
    server.kill9()
    testcase.fail(f"{error}\ncommand: {shlex.join(server.argv)}\n{server.logs()}")
    raise AssertionError(error)  # unreachable with trial; keeps type checkers honest


def start_static_server(
    testcase: SynchronousTestCase, root_dir: str, *, port: int | None = None, timeout: float = 10.0
) -> StaticServer:
    """Serve ``root_dir`` over plain HTTP on 127.0.0.1 until the test ends.

    Returns the :class:`StaticServer` (``.port``, ``.url(path)``, ``.stop()``, ``.logs()``);
    call ``.stop()`` to take the "upstream" away mid-test. ``port`` lets a test bring an
    upstream back on the port the proxy's config already names. Fails the test (with the
    server's output) if it does not accept connections within ``timeout`` seconds.
    """
    log_dir = os.path.abspath(testcase.mktemp())
    os.makedirs(log_dir)
    server = StaticServer(
        os.path.abspath(root_dir), port or free_port(), os.path.join(log_dir, "static-server.log")
    )
    testcase.addCleanup(server.stop)
    error = _wait_tcp(server, timeout)
    if error:
        _fail_start(testcase, server, error)
    return server


def pkgproxy_argv(config_path: str, port: int, cache_dir: str, log_path: str) -> list[str]:
    """The command line of ``twistd -n pkgproxy`` as the tests run it (the CLI contract).

    ``python -m twisted.scripts.twistd`` would be the obvious spelling, but that module has
    no ``__main__`` block: it imports and exits 0 without starting anything. Calling
    ``run()`` through ``-c`` is the same code path as the ``twistd`` console script, and
    uses the interpreter running the tests instead of whatever ``twistd`` is on PATH.
    """
    return [
        sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
        "-n", "--pidfile=", f"--logfile={log_path}",
        "pkgproxy",
        "--config", config_path,
        "--listen", f"tcp:{port}:interface={HOST}",
        "--cache-dir", cache_dir,
    ]  # fmt: skip


def start_pkgproxy(
    testcase: SynchronousTestCase,
    config_toml: str,
    cache_dir: str | None = None,
    *,
    port: int | None = None,
    timeout: float = 20.0,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
) -> PkgProxy:
    """Run ``twistd -n pkgproxy`` with ``config_toml`` until the test ends; return its handle.

    The handle has ``.port``, ``.cache_dir``, ``.url(path)``, ``.stop()`` (SIGTERM, then
    SIGKILL after 10 s), ``.kill9()``, ``.log_path`` (twistd's log) and ``.logs()`` (tails
    for failure messages). Pass the ``cache_dir`` (and ``port``) of an earlier handle to
    restart on the same cache, e.g. after ``kill9()``. ``env`` adds environment variables,
    ``args`` options after the usual ones (``["--log-level", "debug"]``).

    The repository root goes first on PYTHONPATH, so the code under test is this checkout's
    even without ``pip install``, and so is its ``twisted/plugins`` entry for ``pkgproxy``.
    Waits until ``GET /_pkgproxy/ready`` answers 200 (the cache is open and its indexes
    read); fails the test with the log tails if that takes longer than ``timeout``
    seconds or the process exits.
    """
    work = os.path.abspath(testcase.mktemp())
    os.makedirs(work)
    config_path = os.path.join(work, "pkgproxy.toml")
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(config_toml)
    if cache_dir is None:
        cache_dir = os.path.join(work, "cache")
        os.makedirs(cache_dir)
    cache_dir = os.path.abspath(cache_dir)
    port = port or free_port()
    log_path = os.path.join(work, "twistd.log")
    pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    child_env = clean_env({"PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", **(env or {})})
    server = PkgProxy(
        [*pkgproxy_argv(config_path, port, cache_dir, log_path), *args],
        port,
        log_path,
        os.path.join(work, "twistd.stdio"),
        config_path,
        cache_dir,
        child_env,
        cwd=work,  # twistd may drop files (dropin caches, pid files) in its cwd
    )
    testcase.addCleanup(server.stop)
    error = _wait_health(server, "/_pkgproxy/ready", timeout)
    if error:
        _fail_start(testcase, server, error)
    return server
