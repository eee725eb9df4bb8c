"""The real pip (and uv) installing through a real pkgproxy from a pypi.org look-alike.

Why this test exists: unit tests show the rewritten pages keep every attribute and field
by our reading of the PEPs; only the clients can show they accept what pkgproxy serves:
the negotiated JSON, the rewritten file URLs, the ``#sha256`` hashes they check, the
requires-python and yanked markers they choose versions by, and the PEP 658 metadata
files. The upstream is tests/support/pypirepo.py: an index origin that negotiates by
``Accept`` and a second origin for the files, linked absolutely, as on pypi.org.

Every client runs in a fresh venv with no cache and no configuration of the machine's
own (``PIP_CONFIG_FILE=/dev/null``, ``--isolated``, ``--no-config``), against 127.0.0.1
only, and every server is stopped when the test ends.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import time

from twisted.trial.unittest import SkipTest, TestCase

from tests.support import pypirepo
from tests.support.procs import (
    HOST,
    PkgProxy,
    Run,
    ServerProcess,
    clean_env,
    free_port,
    run_client,
    start_pkgproxy,
    start_static_server,
    tail,
)

CLIENT_TIMEOUT = 120.0
APP = "pkgproxy-demo-app"


def _run(argv: list[str], env: dict[str, str]) -> Run:
    return run_client(argv, env, CLIENT_TIMEOUT)


def _count(server: ServerProcess, needle: str) -> int:
    """How many lines of a server's request log contain ``needle``."""
    with open(server.log_path, encoding="utf-8", errors="replace") as f:
        return sum(1 for line in f if needle in line)


class PipTestCase(TestCase):
    """A PyPI look-alike on two origins, and pkgproxy's two PyPI routes pointed at it."""

    html_only = False

    def setUp(self) -> None:
        work = os.path.abspath(self.mktemp())
        files_port = free_port()
        files_url = f"http://{HOST}:{files_port}/"
        self.repo = pypirepo.build_pypi_repo(work, files_url)
        self.files = start_static_server(self, self.repo.files_dir, port=files_port)
        self.index = pypirepo.start_index_server(
            self, self.repo.index_dir, html_only=self.html_only
        )
        self.proxy = self.start_proxy()

    def start_proxy(self) -> PkgProxy:
        """pkgproxy with both PyPI routes on the look-alike; pages stale after 1 s."""
        return start_pkgproxy(
            self,
            f'[routes.pypi]\nupstream = "{self.index.url("/")}"\nindex_ttl = "1s"\n'
            f'[routes.pypi-files]\nupstream = "{self.files.url("/")}"\n',
        )

    def context(self) -> str:
        """Every server's log, for failure messages."""
        return "\n".join([self.proxy.logs(), self.index.logs(), self.files.logs()])

    def venv(self) -> str:
        """A fresh venv (without its own pip: the machine's pip installs into it)."""
        path = os.path.abspath(self.mktemp())
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", path], check=True, timeout=60
        )
        return os.path.join(path, "bin", "python")

    def pip(self, python: str, *args: str, proxy: str | None = None) -> Run:
        """The real pip installing into ``python``'s venv, isolated from this machine."""
        argv = [
            sys.executable, "-m", "pip", "--python", python, "--isolated",
            "--disable-pip-version-check", "--no-input", "install", "--no-cache-dir",
            "--retries", "0", "--timeout", "30", "--progress-bar", "off",
        ]  # fmt: skip
        if proxy is not None:
            argv += ["--proxy", proxy]
        # requests lets these override --cert; only the command line should decide.
        ignored = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
        env = {
            k: v for k, v in clean_env().items() if not k.startswith("PIP_") and k not in ignored
        }
        return _run(argv + list(args), {**env, "PIP_CONFIG_FILE": os.devnull})

    def installed(self, python: str) -> str:
        """What the app imports: proof both packages are installed and importable."""
        code = "import pkgproxy_demo_app as a, pkgproxy_demo_lib as b; print(a.VERSION, b.VERSION)"
        done = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, timeout=30, check=False
        )
        return done.stdout.strip() or done.stderr

    def fetch_ok(self, path: str) -> bool:
        """Whether a GET of ``path`` through pkgproxy ends as a complete 200.

        A download that fails verification is never a clean response: the proxy answers
        an error if it knows before it starts, or cuts the transfer short.
        """
        conn = http.client.HTTPConnection(HOST, self.proxy.port, timeout=30)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()
        return resp.status == 200

    def ok(self, run: Run) -> None:
        """Fail with the client's output and every log unless the command succeeded."""
        if run.returncode != 0:
            self.fail(f"client failed:\n{run.report()}\n{self.context()}")


class PipReverseTests(PipTestCase):
    """pip with ``--index-url http://cache/pypi/simple/``."""

    def test_install_then_offline(self) -> None:
        """pip installs a package and its dependency through pkgproxy (lib 1.0: 1.1 is
        yanked, 2.0 needs Python 4), fetching each file once; then, with both upstream
        origins stopped, a fresh venv installs the same pinned, hash-checked set from the
        cache alone."""
        index_url = self.proxy.url("/pypi/simple/")
        python = self.venv()
        self.ok(self.pip(python, "--index-url", index_url, APP))
        self.assertEqual(self.installed(python), "1.0 1.0", self.context())
        app, lib = self.repo.dist(APP, "1.0"), self.repo.dist("pkgproxy-demo-lib", "1.0")
        for dist in (app, lib):
            self.assertEqual(_count(self.files, f"GET /{dist.path} "), 1, self.context())
        # pip asked for JSON, and pkgproxy asked the index for exactly that.
        self.assertGreater(_count(self.index, "vnd.pypi.simple.v1+json' "), 0, self.context())

        self.files.stop()
        self.index.stop()
        time.sleep(1.2)  # the pages are past their 1 s TTL: served stale, not fresh
        requirements = os.path.join(os.path.abspath(self.mktemp()) + "-requirements.txt")
        with open(requirements, "w", encoding="utf-8") as f:
            f.write(f"{APP}==1.0 --hash=sha256:{app.sha256}\n")
            f.write(f"pkgproxy-demo-lib==1.0 --hash=sha256:{lib.sha256}\n")
        python = self.venv()
        self.ok(self.pip(python, "--index-url", index_url, "--require-hashes", "-r", requirements))
        self.assertEqual(self.installed(python), "1.0 1.0", self.context())
        self.assertIn("stale", tail(self.proxy.log_path, 200_000).lower(), self.context())

    def test_tampered_file_refused_and_not_stored(self) -> None:
        """A file whose bytes differ from the hash its page gives fails pip's download and
        is not stored: asking for it again goes upstream again, and fails again."""
        python = self.venv()
        run = self.pip(
            python, "--index-url", self.proxy.url("/pypi/simple/"), "pkgproxy-demo-tampered"
        )
        self.assertNotEqual(run.returncode, 0, run.report())
        dist = self.repo.dist("pkgproxy-demo-tampered", "1.0")
        before = _count(self.files, f"GET /{dist.path} ")
        self.assertGreaterEqual(before, 1, self.context())
        self.assertFalse(self.fetch_ok(f"/pypi/files/{dist.path}"), self.context())
        self.assertEqual(_count(self.files, f"GET /{dist.path} "), before + 1, self.context())

    def test_unnormalised_name_redirected(self) -> None:
        """``/pypi/simple/PkgProxy_Demo.App/`` answers 301 to the normalised name, without
        asking the index."""
        conn = http.client.HTTPConnection(HOST, self.proxy.port, timeout=30)
        self.addCleanup(conn.close)
        conn.request("GET", "/pypi/simple/PkgProxy_Demo.App/")
        resp = conn.getresponse()
        resp.read()
        self.assertEqual((resp.status, resp.getheader("location")), (301, "../pkgproxy-demo-app/"))
        self.assertEqual(_count(self.index, "PkgProxy_Demo"), 0)


class PipHtmlOnlyUpstreamTests(PipTestCase):
    """An index that ignores ``Accept`` (a static HTML tree): pip is still served JSON."""

    html_only = True

    def test_install(self) -> None:
        """pip negotiates JSON; the index answers HTML; pkgproxy converts it, with the
        links rewritten and the hashes, requires-python and yanked markers carried over."""
        python = self.venv()
        self.ok(self.pip(python, "--index-url", self.proxy.url("/pypi/simple/"), APP))
        self.assertEqual(self.installed(python), "1.0 1.0", self.context())


class PipForwardTests(PipTestCase):
    """pip with ``--proxy``, talking to ``http://pypi.org/simple/`` as it thinks."""

    def test_install(self) -> None:
        """The page's file links become ``http://files.pythonhosted.org/...``, which pip
        fetches through the proxy too; neither host is ever resolved or contacted."""
        python = self.venv()
        run = self.pip(
            python,
            "--index-url", "http://pypi.org/simple/",
            "--trusted-host", "pypi.org",
            "--trusted-host", "files.pythonhosted.org",
            APP,
            proxy=self.proxy.url("/"),
        )  # fmt: skip
        self.ok(run)
        self.assertEqual(self.installed(python), "1.0 1.0", self.context())
        dist = self.repo.dist("pkgproxy-demo-lib", "1.0")
        self.assertEqual(_count(self.files, f"GET /{dist.path} "), 1, self.context())


class UvTests(PipTestCase):
    """uv, the other installer in wide use, with its own requests (metadata, ranges)."""

    def test_install(self) -> None:
        """uv installs the app and its dependency through pkgproxy into a fresh venv."""
        try:
            import uv
        except ImportError:
            raise SkipTest("needs uv (pip install uv; it is in the test extra)") from None
        python = self.venv()
        argv = [
            uv.find_uv_bin(), "pip", "install", "--no-config", "--no-cache",
            "--python", python, "--index-url", self.proxy.url("/pypi/simple/"), APP,
        ]  # fmt: skip
        env = {k: v for k, v in clean_env().items() if not k.startswith("UV_")}
        env.update({"UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"})
        self.ok(_run(argv, env))
        self.assertEqual(self.installed(python), "1.0 1.0", self.context())


class PipThroughInterceptedTLSTests(PipTestCase):
    """pip with an ``https://`` index through pkgproxy as its HTTPS proxy (interception)."""

    def start_proxy(self) -> PkgProxy:
        return start_pkgproxy(
            self,
            "[tls_intercept]\nenabled = true\n"
            f'[routes.pypi]\nupstream = "{self.index.url("/")}"\nindex_ttl = "1s"\n'
            f'[routes.pypi-files]\nupstream = "{self.files.url("/")}"\n',
        )

    def test_install_then_offline(self) -> None:
        """pip trusts pkgproxy's CA for pypi.org and files.pythonhosted.org; with both
        upstreams stopped, a second install is served from the cache."""
        ca = os.path.join(self.proxy.cache_dir, "tls", "ca.crt")
        args = ("--index-url", "https://pypi.org/simple/", "--cert", ca, APP)
        for round_ in ("online", "offline"):
            if round_ == "offline":
                self.index.stop()
                self.files.stop()
                time.sleep(1.2)  # past index_ttl: the pages are served stale
            python = self.venv()
            self.ok(self.pip(python, *args, proxy=self.proxy.url("/")))
            self.assertEqual(self.installed(python), "1.0 1.0", self.context())
        self.assertIn('"CONNECT files.pythonhosted.org:443"', self.proxy.logs())
