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
import subprocess
import time

from twisted.trial.unittest import TestCase

import pkgproxy
from tests.support.procs import (
    HOST,
    REPO_ROOT,
    PkgProxy,
    _fail_start,
    _wait_health,
    clean_env,
    free_port,
    pkgproxy_argv,
    start_pkgproxy,
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
        argv = _twistd_prefix(os.path.join(self.work, "twistd.log")) + args
        started = time.monotonic()
        try:
            result = subprocess.run(
                argv,
                cwd=self.work,
                env=_child_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=CLI_TIMEOUT,
            )
        except subprocess.TimeoutExpired as e:
            self.fail(f"pkgproxy did not exit within {CLI_TIMEOUT} s: {argv}\n{e.output}")
        return result, time.monotonic() - started

    def _config_file(self, toml: str) -> str:
        path = os.path.join(self.work, "pkgproxy.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(toml)
        return path

    def _assert_rejected(self, args: list[str], names: str) -> str:
        """Run pkgproxy with ``args``; it must fail fast with one line naming ``names``.

        The line is the last one printed (twistd prints its usage text above it) and is
        the only line containing ``names``; no traceback on the terminal or in the log
        file; neither the cache
        directory nor the default ``./pkgproxy-cache`` is created. Returns that line.
        """
        args = [*args, "--cache-dir", self.cache_dir]
        if "--listen" not in args:
            args += ["--listen", f"tcp:{free_port()}:interface={HOST}"]
        result, elapsed = self._twistd(args)
        out = result.stdout
        log = tail(os.path.join(self.work, "twistd.log"))
        where = (
            f"pkgproxy {' '.join(args)} (exit {result.returncode}):\n{out}\n"
            f"--- twistd.log ---\n{log}"
        )
        self.assertNotEqual(result.returncode, 0, where)
        self.assertLess(elapsed, QUICK, f"took {elapsed:.1f} s to reject: {where}")
        self.assertNotIn("Traceback", out + log, where)
        lines = [line for line in out.splitlines() if line.strip()]
        self.assertTrue(lines, f"printed nothing: {where}")
        naming = [line for line in lines if names in line]
        self.assertEqual(naming, [lines[-1]], f"want one last line naming {names!r}: {where}")
        self.assertFalse(os.path.exists(self.cache_dir), f"created the cache dir: {where}")
        self.assertFalse(
            os.path.exists(os.path.join(self.work, "pkgproxy-cache")),
            f"created ./pkgproxy-cache: {where}",
        )
        return lines[-1]

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
