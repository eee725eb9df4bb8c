"""The command line an operator types: ``twistd -n pkgproxy [options]``, as a real subprocess.

Why this test exists: a typo in the config file or on the command line must stop pkgproxy
before it starts, quickly, with one line that names the offending key (``cache.max_size``,
``routes.x.upstream``, ``--max-size``) and without side effects such as creating the cache
directory. A server that starts half-configured, or a traceback instead of a reason, costs
an operator far more than a unit test of :mod:`pkgproxy.config` can show. The same
invocation with no options at all must start and answer plain, one-line errors to requests
it cannot serve.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import time
from collections.abc import Sequence

from twisted.trial.unittest import TestCase

import pkgproxy
from tests.support.procs import (
    HOST,
    REPO_ROOT,
    PkgProxy,
    _fail_start,
    _wait_health,
    clean_env,
    file_tree,
    free_port,
    pkgproxy_argv,
    start_pkgproxy,
    start_static_server,
    tail,
)

#: Bound on every pkgproxy subprocess that is expected to exit on its own.
CLI_TIMEOUT = 20.0
#: A rejected configuration must be rejected at least this fast (parsing only, no I/O).
QUICK = 10.0
HTTP_TIMEOUT = 10.0


def _child_env() -> dict[str, str]:
    pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return clean_env({"PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"})


def _run_twistd(
    testcase: TestCase, work: str, args: list[str], wrapper: Sequence[str] = ()
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``[wrapper...] twistd -n pkgproxy args`` in ``work``; stdout and stderr apart."""
    argv = [*wrapper, *_twistd_prefix(os.path.join(work, "twistd.log")), *args]
    started = time.monotonic()
    try:
        result = subprocess.run(
            argv,
            cwd=work,
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
        )
    except subprocess.TimeoutExpired as e:
        testcase.fail(f"pkgproxy did not exit within {CLI_TIMEOUT} s: {argv}\n{e.output!r}")
    return result, time.monotonic() - started


def _assert_one_line(
    testcase: TestCase, result: subprocess.CompletedProcess[str], args: list[str], log: str
) -> str:
    """pkgproxy failed with exactly one line on stderr, ``pkgproxy: ...``, and nothing
    else: no usage text on stdout, no traceback anywhere. Returns the line."""
    where = (
        f"pkgproxy {' '.join(args)} (exit {result.returncode}):\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}\n"
        f"--- twistd.log ---\n{tail(log)}"
    )
    testcase.assertNotEqual(result.returncode, 0, where)
    testcase.assertEqual(result.stdout, "", where)
    testcase.assertNotIn("Traceback", result.stderr + tail(log), where)
    lines = result.stderr.splitlines()
    testcase.assertEqual(len(lines), 1, where)
    testcase.assertTrue(result.stderr.endswith("\n"), where)
    testcase.assertTrue(lines[0].startswith("pkgproxy: "), where)
    return lines[0]


def _twistd_prefix(log_path: str) -> list[str]:
    """``python -c 'twistd run()' -n --pidfile= --logfile=LOG pkgproxy``, as procs.py runs it."""
    argv = pkgproxy_argv("unused.toml", 1, "unused-cache", log_path)
    return argv[: argv.index("pkgproxy") + 1]


class RejectedConfigurationTests(TestCase):
    """Every bad setting stops pkgproxy at once with one line naming the key."""

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.cache_dir = os.path.join(self.work, "cache")

    def _twistd(self, args: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
        return _run_twistd(self, self.work, args)

    def _config_file(self, toml: str) -> str:
        path = os.path.join(self.work, "pkgproxy.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(toml)
        return path

    def _assert_rejected(self, args: list[str], names: str) -> str:
        """Run pkgproxy with ``args``; it must fail fast with one line naming ``names``.

        Exit status 2 (as argparse's), nothing on stdout (no usage text), exactly one
        line on stderr, ``pkgproxy: ...``, naming ``names``; no traceback in the log
        file; neither the cache directory nor the default ``./pkgproxy-cache`` is
        created. Returns that line.
        """
        args = [*args, "--cache-dir", self.cache_dir]
        if "--listen" not in args:
            args += ["--listen", f"tcp:{free_port()}:interface={HOST}"]
        result, elapsed = self._twistd(args)
        line = _assert_one_line(self, result, args, os.path.join(self.work, "twistd.log"))
        where = f"pkgproxy {' '.join(args)}: {line}"
        self.assertEqual(result.returncode, 2, where)
        self.assertLess(elapsed, QUICK, f"took {elapsed:.1f} s to reject: {where}")
        self.assertIn(names, line, where)
        self.assertFalse(os.path.exists(self.cache_dir), f"created the cache dir: {where}")
        self.assertFalse(
            os.path.exists(os.path.join(self.work, "pkgproxy-cache")),
            f"created ./pkgproxy-cache: {where}",
        )
        return line

    def _assert_config_rejected(self, toml: str, key: str) -> str:
        path = self._config_file(toml)
        line = self._assert_rejected(["--config", path], f"{key}:")
        self.assertIn(path, line, "the error does not name the config file")
        return line

    def test_unknown_top_level_key(self) -> None:
        """An unknown top-level key is named, with the known keys listed."""
        line = self._assert_config_rejected("lisen = 'tcp:3142'\n", "lisen")
        self.assertIn("listen", line.split("lisen:", 1)[1])

    def test_unknown_cache_key(self) -> None:
        """A misspelt key in ``[cache]`` is named with its table: ``cache.size``."""
        self._assert_config_rejected('[cache]\nsize = "1GiB"\n', "cache.size")

    def test_unknown_route_key(self) -> None:
        """A misspelt key in a route is named with its route: ``routes.x.upstrem``."""
        self._assert_config_rejected(
            '[routes.x]\nfamily = "generic"\nupstrem = "http://example.org/x/"\n',
            "routes.x.upstrem",
        )

    def test_bad_size(self) -> None:
        """``max_size = "lots"`` names ``cache.max_size`` and quotes the value."""
        line = self._assert_config_rejected('[cache]\nmax_size = "lots"\n', "cache.max_size")
        self.assertIn("lots", line)

    def test_upstream_without_trailing_slash(self) -> None:
        """An upstream URL without the trailing ``/`` names ``routes.x.upstream``."""
        self._assert_config_rejected(
            '[routes.x]\nfamily = "generic"\nupstream = "http://example.org/x"\n',
            "routes.x.upstream",
        )

    def test_upstream_ftp(self) -> None:
        """An ``ftp://`` upstream names ``routes.x.upstream``."""
        self._assert_config_rejected(
            '[routes.x]\nfamily = "generic"\nupstream = "ftp://example.org/x/"\n',
            "routes.x.upstream",
        )

    def test_unknown_family(self) -> None:
        """An unknown family names ``routes.x.family`` and the value."""
        line = self._assert_config_rejected(
            '[routes.x]\nfamily = "conda"\nupstream = "http://example.org/x/"\n',
            "routes.x.family",
        )
        self.assertIn("conda", line)

    def test_duplicate_prefix(self) -> None:
        """Two routes on one prefix name the second route's prefix and the first route."""
        line = self._assert_config_rejected(
            '[routes.a]\nfamily = "generic"\nupstream = "http://example.org/a/"\n'
            'prefix = "/same/"\n'
            '[routes.b]\nfamily = "generic"\nupstream = "http://example.org/b/"\n'
            'prefix = "/same/"\n',
            "routes.b.prefix",
        )
        self.assertIn("'a'", line)

    def test_prefix_of_a_builtin_route(self) -> None:
        """Taking a built-in route's prefix (``/debian/``) is a duplicate too."""
        self._assert_config_rejected(
            '[routes.x]\nfamily = "generic"\nupstream = "http://example.org/x/"\n'
            'prefix = "/debian/"\n',
            "routes.x.prefix",
        )

    def test_invalid_toml(self) -> None:
        """A file that is not TOML is rejected with its path and the parser's position."""
        path = self._config_file("[routes.x\nfamily = \n")
        line = self._assert_rejected(["--config", path], "is not valid TOML")
        self.assertIn(path, line)
        self.assertIn("line 1", line)

    def test_missing_config_file(self) -> None:
        """A config path that does not exist is named, with the OS's reason."""
        path = os.path.join(self.work, "nowhere.toml")
        line = self._assert_rejected(["--config", path], path)
        self.assertIn("No such file", line)

    def test_bad_listen_type(self) -> None:
        """An unknown endpoint type in ``--listen`` names ``listen`` and the description."""
        line = self._assert_rejected(["--listen", "bogus:1234"], "listen:")
        self.assertIn("bogus:1234", line)

    def test_bad_listen_port(self) -> None:
        """A port that is not a number in ``--listen`` names ``listen``."""
        line = self._assert_rejected(["--listen", "tcp:notaport"], "listen:")
        self.assertIn("notaport", line)

    def test_listen_port_out_of_range(self) -> None:
        """A port above 65535 in ``--listen`` is a bad description too: one line, no traceback.

        (Found failing: ``serverFromString`` accepts it, so ``Options.postOptions`` in
        pkgproxy/tap.py lets it through; ``bind()`` then raises ``OverflowError`` at
        start-up: exit 1, nothing on the terminal, a traceback in the log file.)
        """
        line = self._assert_rejected(["--listen", f"tcp:99999:interface={HOST}"], "listen:")
        self.assertIn("99999", line)

    def test_bad_max_size_option(self) -> None:
        """``--max-size lots`` names ``--max-size``."""
        line = self._assert_rejected(["--max-size", "lots"], "--max-size:")
        self.assertIn("lots", line)

    def test_zero_max_size_option(self) -> None:
        """``--max-size 0`` is rejected: a cache of no bytes is a mistake, not a setting."""
        self._assert_rejected(["--max-size", "0"], "--max-size:")

    def test_unknown_option(self) -> None:
        """A misspelt option (``--cache-directory``) is named: one line, status 2."""
        line = self._assert_rejected(["--cache-directory", "/tmp/x"], "--cache-directory")
        self.assertIn("not recognized", line)

    def test_option_without_value(self) -> None:
        """An option that needs a value and has none is named: one line, status 2."""
        result, _ = self._twistd(["--listen", f"tcp:{free_port()}", "--max-size"])
        line = _assert_one_line(self, result, ["--max-size"], os.path.join(self.work, "x"))
        self.assertEqual(result.returncode, 2)
        self.assertIn("max-size", line)

    def test_bad_log_level(self) -> None:
        """``--log-level loud`` names ``--log-level`` and the levels there are."""
        line = self._assert_rejected(["--log-level", "loud"], "--log-level:")
        self.assertIn("debug", line)

    def test_version(self) -> None:
        """``--version`` prints ``pkgproxy <version>`` and exits 0 without starting."""
        result, elapsed = self._twistd(["--version"])
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertEqual(result.stdout.strip(), f"pkgproxy {pkgproxy.__version__}")
        self.assertFalse(os.path.exists(os.path.join(self.work, "pkgproxy-cache")))

    def test_help(self) -> None:
        """``--help`` lists every option and exits 0 without starting."""
        result, _ = self._twistd(["--help"])
        self.assertEqual(result.returncode, 0, result.stdout)
        for option in ("--config", "--cache-dir", "--max-size", "--listen", "--version"):
            self.assertIn(option, result.stdout)
        self.assertFalse(os.path.exists(os.path.join(self.work, "pkgproxy-cache")))


#: Run a child without the root capabilities that ignore file permissions, so that a
#: directory's mode bits apply to it as to the unprivileged user pkgproxy runs as.
WITHOUT_DAC = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--")
#: Run a child without the capability to bind ports below 1024.
WITHOUT_LOW_PORTS = ("setpriv", "--bounding-set", "-net_bind_service", "--")


class UnusableCacheTests(TestCase):
    """A cache directory pkgproxy cannot use stops it at once, in one line.

    (Found failing: the server logged "cache recovery failed" with a traceback and kept
    running, ``/_pkgproxy/health`` 200 and every request 503 "the cache is still
    starting", for ever.)
    """

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)

    def _assert_refused(self, cache_dir: str, reason: str, wrapper: Sequence[str] = ()) -> None:
        args = ["--cache-dir", cache_dir, "--listen", f"tcp:{free_port()}:interface={HOST}"]
        result, elapsed = _run_twistd(self, self.work, args, wrapper)
        line = _assert_one_line(self, result, args, os.path.join(self.work, "twistd.log"))
        self.assertEqual(result.returncode, 1, line)
        self.assertLess(elapsed, QUICK, line)
        self.assertIn(cache_dir, line)
        self.assertIn(reason, line)

    def test_not_a_directory(self) -> None:
        """The cache path is a file."""
        path = os.path.join(self.work, "file")
        with open(path, "w") as f:
            f.write("x")
        self._assert_refused(path, "not a directory")

    def test_inside_a_file(self) -> None:
        """The cache path's parent is a file: it cannot be created."""
        path = os.path.join(self.work, "file")
        with open(path, "w") as f:
            f.write("x")
        self._assert_refused(os.path.join(path, "cache"), "not a directory")

    def test_not_writable(self) -> None:
        """A directory pkgproxy may read but not write (mode 0555)."""
        path = os.path.join(self.work, "cache")
        os.makedirs(path)
        os.chmod(path, 0o555)
        self.addCleanup(os.chmod, path, 0o755)
        self._assert_refused(path, "permission denied", WITHOUT_DAC)

    def test_existing_cache_not_writable(self) -> None:
        """A cache made earlier whose ``tmp/`` pkgproxy can no longer write."""
        path = os.path.join(self.work, "cache")
        os.makedirs(os.path.join(path, "data"))
        os.makedirs(os.path.join(path, "tmp"))
        for sub in ("", "data", "tmp"):
            os.chmod(os.path.join(path, sub), 0o555)
            self.addCleanup(os.chmod, os.path.join(path, sub), 0o755)
        self._assert_refused(path, "permission denied", WITHOUT_DAC)

    def test_not_writable_by_the_user_twistd_switches_to(self) -> None:
        """``twistd --uid``: checked as root, the cache is opened as another user, who
        cannot write it; recovery fails while running, and that stops pkgproxy in one
        line too (exit 1), instead of leaving a server that answers 503 for ever."""
        path = os.path.join(self.work, "cache")
        os.makedirs(path)
        args = ["--cache-dir", path, "--listen", f"tcp:{free_port()}:interface={HOST}"]
        argv = _twistd_prefix(os.path.join(self.work, "twistd.log"))
        at = argv.index("pkgproxy")
        wrapper_argv = [*argv[:at], "--uid=65534", "--gid=65534", *argv[at:], *args]
        started = time.monotonic()
        result = subprocess.run(
            wrapper_argv,
            cwd=self.work,
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
        )
        line = _assert_one_line(self, result, args, os.path.join(self.work, "twistd.log"))
        self.assertEqual(result.returncode, 1, line)
        self.assertLess(time.monotonic() - started, QUICK, line)
        self.assertTrue(line.startswith(f"pkgproxy: cache directory {path}: "), line)

    def test_read_only_file_system(self) -> None:
        """The cache directory is a read-only mount (in a mount namespace of its own)."""
        path = os.path.join(self.work, "cache")
        os.makedirs(path)
        wrapper = (
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs -o ro,size=1m tmpfs "{path}" && exec "$@"', "sh",
        )  # fmt: skip
        self._assert_refused(path, "read-only file system", wrapper)

    def test_corrupt_index(self) -> None:
        """An ``index.sqlite`` that is not a database (not deleted: it is the operator's)."""
        path = os.path.join(self.work, "cache")
        os.makedirs(path)
        with open(os.path.join(path, "index.sqlite"), "wb") as f:
            f.write(b"this is not a database" * 100)
        self._assert_refused(path, "index.sqlite")


class ListenFailureTests(TestCase):
    """A port pkgproxy cannot listen on is one line and a non-zero exit, no traceback.

    (Found failing: ``CannotListenError`` was a 39-line traceback.)
    """

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)

    def _assert_refused(self, listen: str, reason: str, wrapper: Sequence[str] = ()) -> None:
        cache_dir = os.path.join(self.work, "cache")
        args = ["--cache-dir", cache_dir, "--listen", listen]
        result, elapsed = _run_twistd(self, self.work, args, wrapper)
        line = _assert_one_line(self, result, args, os.path.join(self.work, "twistd.log"))
        self.assertEqual(line, f"pkgproxy: cannot listen on {listen}: {reason}")
        self.assertEqual(result.returncode, 1, line)
        self.assertLess(elapsed, QUICK, line)
        self.assertNotIn("Traceback", tail(os.path.join(self.work, "twistd.log")))

    def test_port_in_use(self) -> None:
        """Another process listens on the port."""
        with socket.socket() as busy:
            busy.bind((HOST, 0))
            busy.listen()
            port = busy.getsockname()[1]
            self._assert_refused(f"tcp:{port}:interface={HOST}", "address already in use")

    def test_low_port_without_privilege(self) -> None:
        """Port 81 without the capability to bind ports below 1024."""
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            if int(f.read()) <= 81:
                self.skipTest("this kernel lets anyone bind port 81")
        self._assert_refused(f"tcp:81:interface={HOST}", "permission denied", WITHOUT_LOW_PORTS)


class RunningHealthTests(TestCase):
    """What a supervisor sees once pkgproxy runs: health follows the cache."""

    def test_cache_failing_later_fails_health(self) -> None:
        """The cache directory goes away (a disk unmounted): ``/_pkgproxy/health`` and
        ``/ready`` answer 503 with one line naming it; back again, 200. (Checked every
        half second here, every 10 s by default.)"""
        proxy = start_pkgproxy(self, '[cache]\ncheck_interval = "0.5s"\n')
        self.assertEqual(_request(proxy.port, "GET", "/_pkgproxy/health")[0], 200)
        moved = proxy.cache_dir + ".gone"
        os.rename(proxy.cache_dir, moved)
        deadline = time.monotonic() + CLI_TIMEOUT
        while True:
            status, _, body = _request(proxy.port, "GET", "/_pkgproxy/health")
            if status != 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.assertEqual(status, 503, proxy.logs())
        text = body.decode()
        self.assertEqual(len(text.splitlines()), 1, text)
        self.assertTrue(text.startswith("pkgproxy: cache directory "), text)
        self.assertIn(proxy.cache_dir, text)
        self.assertIn("no such file or directory", text)
        self.assertEqual(_request(proxy.port, "GET", "/_pkgproxy/ready")[0], 503)
        os.rename(moved, proxy.cache_dir)
        deadline = time.monotonic() + CLI_TIMEOUT
        while _request(proxy.port, "GET", "/_pkgproxy/health")[0] != 200:
            self.assertLess(time.monotonic(), deadline, proxy.logs())
            time.sleep(0.2)


class LogLevelTests(TestCase):
    """The default log shows what an operator acts on; ``--log-level debug`` the rest.

    (Found failing: a few minutes of use wrote 232 ``learning#debug`` lines.)
    """

    def _learn_once(self, args: Sequence[str] = ()) -> str:
        """Fetch one npm packument through pkgproxy (it learns from it); the log text."""
        root = file_tree(self, {"x": b'{"name": "x", "versions": {}}'})
        upstream = start_static_server(self, root)
        proxy = start_pkgproxy(self, f'[routes.npm]\nupstream = "{upstream.url("/")}"\n', args=args)
        status, _, body = _request(proxy.port, "GET", "/npm/x")
        self.assertEqual(status, 200, proxy.logs())
        proxy.wait_for_entries(1)
        proxy.stop()
        with open(proxy.log_path, encoding="utf-8") as f:
            return f.read()

    def test_default_hides_debug(self) -> None:
        text = self._learn_once()
        self.assertIn('"GET /npm/x" 200', text)  # access lines stay
        self.assertIn("[pkgproxy.tap#info] pkgproxy ", text)  # and the summary at start
        self.assertIn("routes ", text)
        self.assertNotIn("#debug]", text)
        self.assertNotIn(" entries from ", text)

    def test_debug_on_request(self) -> None:
        text = self._learn_once(["--log-level", "debug"])
        self.assertIn("[pkgproxy.learning#debug] learned 0 entries from npm:x", text)


def _request(port: int, method: str, target: str) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=HTTP_TIMEOUT)
    try:
        conn.request(method, target)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


class StartWithoutConfigTests(TestCase):
    """``twistd -n pkgproxy`` with no config file starts on the built-in defaults."""

    def _start(self, args: list[str], port: int) -> PkgProxy:
        """Run pkgproxy with ``args`` (no ``--config``) until the test ends; wait for health."""
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        log_path = os.path.join(work, "twistd.log")
        server = PkgProxy(
            [*_twistd_prefix(log_path), *args],
            port,
            log_path,
            os.path.join(work, "twistd.stdio"),
            "",
            "",
            _child_env(),
            cwd=work,
        )
        self.addCleanup(server.stop)
        error = _wait_health(server, "/_pkgproxy/health", CLI_TIMEOUT)
        if error:
            _fail_start(self, server, error)
        self.work = work
        return server

    def _wait_ready(self, server: PkgProxy) -> None:
        deadline = time.monotonic() + CLI_TIMEOUT
        while time.monotonic() < deadline:
            if _request(server.port, "GET", "/_pkgproxy/ready")[0] == 200:
                return
            time.sleep(0.05)
        self.fail(f"/_pkgproxy/ready not 200 within {CLI_TIMEOUT} s\n{server.logs()}")

    def test_starts_without_config(self) -> None:
        """No ``--config``: it starts, answers health, and creates the cache directory."""
        cache_dir = os.path.join(os.path.abspath(self.mktemp()), "cache")
        port = free_port()
        server = self._start(
            ["--listen", f"tcp:{port}:interface={HOST}", "--cache-dir", cache_dir], port
        )
        self._wait_ready(server)
        status, headers, body = _request(port, "GET", "/_pkgproxy/health")
        self.assertEqual((status, body), (200, b"ok\n"))
        for name in ("index.sqlite", "data", "tmp"):
            self.assertTrue(os.path.exists(os.path.join(cache_dir, name)), server.logs())

    def test_default_cache_dir_is_in_cwd(self) -> None:
        """No ``--config`` and no ``--cache-dir``: the cache is ``./pkgproxy-cache``."""
        port = free_port()
        server = self._start(["--listen", f"tcp:{port}:interface={HOST}"], port)
        self._wait_ready(server)
        self.assertTrue(
            os.path.isfile(os.path.join(self.work, "pkgproxy-cache", "index.sqlite")),
            server.logs(),
        )

    def test_unknown_path_names_builtin_prefixes(self) -> None:
        """With only the built-in routes, a 404 names ``/debian/`` and ``/debian-security/``."""
        cache_dir = os.path.join(os.path.abspath(self.mktemp()), "cache")
        port = free_port()
        server = self._start(
            ["--listen", f"tcp:{port}:interface={HOST}", "--cache-dir", cache_dir], port
        )
        self._wait_ready(server)
        status, headers, body = _request(port, "GET", "/nope/thing")
        self.assertEqual(status, 404, server.logs())
        text = body.decode()
        self.assertEqual(len(text.splitlines()), 1, text)
        self.assertIn("/debian/", text)
        self.assertIn("/debian-security/", text)


class RequestErrorTests(TestCase):
    """Requests pkgproxy cannot serve get a status and a one-line plain-text reason."""

    def setUp(self) -> None:
        self.proxy = start_pkgproxy(
            self,
            '[routes.files]\nfamily = "generic"\nupstream = "http://127.0.0.1:9/files/"\n',
        )

    def _one_line(self, headers: http.client.HTTPMessage, body: bytes) -> str:
        self.assertTrue(headers.get("Content-Type", "").startswith("text/plain"), headers)
        text = body.decode("utf-8")
        self.assertEqual(len(text.splitlines()), 1, f"not one line: {text!r}")
        self.assertTrue(text.endswith("\n"), repr(text))
        return text

    def test_unknown_path_is_404_naming_prefixes(self) -> None:
        """GET of a path no route covers: 404, one line naming the path and every prefix."""
        status, headers, body = _request(self.proxy.port, "GET", "/nope/thing")
        self.assertEqual(status, 404)
        text = self._one_line(headers, body)
        for part in ("/nope/thing", "/files/", "/debian/", "/debian-security/"):
            self.assertIn(part, text)

    def test_post_is_405(self) -> None:
        """POST to a route: 405 with ``Allow: GET, HEAD`` and a one-line reason."""
        status, headers, body = _request(self.proxy.port, "POST", "/files/x")
        self.assertEqual(status, 405)
        self.assertEqual(headers.get("Allow"), "GET, HEAD")
        self.assertIn("POST", self._one_line(headers, body))

    def test_connect_is_405_with_text(self) -> None:
        """CONNECT (a TLS tunnel request): 405 with a plain-text reason, not a tunnel."""
        status, headers, body = _request(self.proxy.port, "CONNECT", "example.org:443")
        self.assertEqual(status, 405)
        self.assertIn("CONNECT", self._one_line(headers, body))

    def test_connect_405_has_allow(self) -> None:
        """The CONNECT 405 carries ``Allow: GET, HEAD`` like every 405 (RFC 9110 15.5.6).

        (Found failing: the CONNECT branch of ``ProxyResource.render`` in
        pkgproxy/web/root.py returns before the ``allow`` header is set.)
        """
        status, headers, _ = _request(self.proxy.port, "CONNECT", "example.org:443")
        self.assertEqual(status, 405)
        self.assertEqual(headers.get("Allow"), "GET, HEAD")
