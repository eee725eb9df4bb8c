"""pkgproxy-warm against a real pkgproxy and real local upstreams, then the real clients
with the upstreams stopped.

Why this test exists: a warm-up is only worth something if what it fetched is exactly what
the clients later ask for. Each test warms the cache from a file the users already have (a
hashed requirements file, a package-lock.json, a Debian package list, an image list), stops
the upstream, and runs the real client (pip, npm, apt-get, skopeo) through the cache: it
must succeed from the cache alone. A second warm-up fetches nothing; a lock file that
disagrees with the index fails the warm-up with one clear line and stores nothing.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import urllib.request

from twisted.trial.unittest import SkipTest, TestCase

from pkgproxy.warm import cli
from tests.support import npmenv, npmrepo, pypirepo
from tests.support import ociregistry as oci
from tests.support.aptcase import APT_TIMEOUT, AptTestCase
from tests.support.aptenv import IsolatedApt
from tests.support.npmenv import IsolatedNpm
from tests.support.npmrepo import APP, DEP
from tests.support.procs import HOST, PkgProxy, free_port, start_pkgproxy, start_static_server

CLIENT_TIMEOUT = 120.0


def warm(proxy: PkgProxy, *args: str) -> tuple[int, str, str]:
    """Run pkgproxy-warm against ``proxy``: exit status, stdout and stderr."""
    argv = [
        sys.executable, "-c", "from pkgproxy.warm.cli import main; raise SystemExit(main())",
        proxy.url(""), *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    done = subprocess.run(
        argv, capture_output=True, timeout=CLIENT_TIMEOUT, check=False, env=env, cwd=os.getcwd()
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def warm_on_a_terminal(proxy: PkgProxy, *args: str) -> tuple[int, str]:
    """Run pkgproxy-warm with its stderr on a pseudo-terminal: exit status, and what the
    terminal was shown."""
    argv = [
        sys.executable, "-c", "from pkgproxy.warm.cli import main; raise SystemExit(main())",
        proxy.url(""), *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        child = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=slave, env=env, cwd=os.getcwd()
        )
    finally:
        os.close(slave)
    shown = bytearray()
    try:
        while True:
            try:
                piece = os.read(master, 65536)
            except OSError:  # the terminal's other end is closed: the command is done
                break
            if not piece:
                break
            shown += piece
    finally:
        os.close(master)
    return child.wait(timeout=CLIENT_TIMEOUT), shown.decode(errors="replace")


def write(path: str, text: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return os.path.abspath(path)


class PypiWarmTests(TestCase):
    """A hashed requirements file warms the pages and wheels pip later installs offline."""

    def setUp(self) -> None:
        work = os.path.abspath(self.mktemp())
        files_port = free_port()
        self.repo = pypirepo.build_pypi_repo(work, f"http://{HOST}:{files_port}/")
        self.files = start_static_server(self, self.repo.files_dir, port=files_port)
        self.index = pypirepo.start_index_server(self, self.repo.index_dir)
        self.proxy = start_pkgproxy(
            self,
            f'[routes.pypi]\nupstream = "{self.index.url("/")}"\n'
            f'[routes.pypi-files]\nupstream = "{self.files.url("/")}"\n',
        )

    def requirements(self, *pins: tuple[str, str, str]) -> str:
        lines = [f"{p}=={v} \\\n    --hash=sha256:{h}\n" for p, v, h in pins]
        return write(self.mktemp() + "-requirements.txt", "".join(lines))

    def test_warm_then_pip_installs_with_the_upstream_gone(self) -> None:
        app = self.repo.dist("pkgproxy-demo-app", "1.0")
        lib = self.repo.dist("pkgproxy-demo-lib", "1.0")
        reqs = self.requirements(
            ("pkgproxy-demo-app", "1.0", app.sha256), ("PkgProxy_Demo.Lib", "1.0", lib.sha256)
        )
        status, out, err = warm(self.proxy, "--tag", "nightly <ci>", reqs)
        context = f"{out}\n{err}\n{self.proxy.logs()}"
        self.assertEqual(status, 0, context)
        self.assertIn("fetched 4 files", out, context)  # two wheels and their .metadata
        self.assertIn("0 failed", out)
        self.assertIn(app.filename, out)
        # The status page shows the warm-up under its tag: 2 pages, 4 HEADs, 4 GETs.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self.proxy.url("/_pkgproxy/"), timeout=10) as resp:
            page = resp.read().decode()
        self.assertIn("nightly &lt;ci&gt;", page)
        row = page[page.index("nightly &lt;ci&gt;") :].split("</tr>", 1)[0]
        self.assertIn('<td class="num">10</td>', row)
        self.index.stop()
        self.files.stop()
        venv = os.path.abspath(self.mktemp())
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
        pip = subprocess.run(
            [
                sys.executable, "-m", "pip", "--python", os.path.join(venv, "bin", "python"),
                "--isolated", "--disable-pip-version-check", "install", "--no-cache-dir",
                "--retries", "0", "--require-hashes", "-r", reqs,
                "--index-url", self.proxy.url("/pypi/simple/"), "--trusted-host", HOST,
            ],
            capture_output=True, timeout=CLIENT_TIMEOUT, check=False,
            env={**os.environ, "PIP_CONFIG_FILE": os.devnull},
        )  # fmt: skip
        self.assertEqual(pip.returncode, 0, pip.stdout.decode() + pip.stderr.decode() + context)
        # A second warm-up finds everything cached and fetches nothing.
        status, out, _ = warm(self.proxy, reqs)
        self.assertEqual(status, 0, out)
        self.assertIn("fetched 0 files", out)
        self.assertIn("4 already cached", out)

    def test_progress_bar_on_a_terminal(self) -> None:
        """On a terminal the warm-up shows a progress bar: the files planned, each one
        counted as it is done, the bytes and the rate."""
        app = self.repo.dist("pkgproxy-demo-app", "1.0")
        reqs = self.requirements(("pkgproxy-demo-app", "1.0", app.sha256))
        status, shown = warm_on_a_terminal(self.proxy, reqs)
        self.assertEqual(status, 0, shown + self.proxy.logs())
        self.assertIn("2/2", shown)  # the wheel and its .metadata
        self.assertIn("file/s", shown)
        self.assertIn("B/s", shown)

    def test_a_lock_that_disagrees_fails_and_stores_nothing(self) -> None:
        """A pinned hash no file on the page has, and a file whose bytes the upstream
        tampered with: both fail with one line each, and neither is stored."""
        tampered = self.repo.dist("pkgproxy-demo-tampered", "1.0")
        reqs = self.requirements(
            ("pkgproxy-demo-lib", "1.0", "0" * 64),
            ("pkgproxy-demo-tampered", "1.0", tampered.sha256),
        )
        status, out, err = warm(self.proxy, "--jobs", "2", reqs)
        self.assertEqual(status, 1, out + err)
        self.assertIn("2 failed", out)
        self.assertIn(
            "pkgproxy-demo-lib==1.0: no file on the index page has a hash the lock file gives", err
        )
        self.assertIn(f"pkgproxy-demo-tampered==1.0 {tampered.filename}", err)
        # Nothing of either was stored: the tampered wheel is still to be fetched (its
        # metadata, which is intact, is cached).
        status, out, _ = warm(self.proxy, "--dry-run", reqs)
        self.assertIn("would fetch 1 files", out)
        [line] = [x for x in out.splitlines() if x.endswith(tampered.filename)]
        self.assertTrue(line.startswith("planned"), out)

    def test_bad_input_is_one_line(self) -> None:
        status, out, err = warm(self.proxy, write(self.mktemp() + "-requirements.txt", "x>=1\n"))
        self.assertEqual(status, 2)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("not pinned with ==", err)


class NpmWarmTests(TestCase):
    """A package-lock.json warms packuments and tarballs; npm ci then needs no registry."""

    def setUp(self) -> None:
        self.registry = npmenv.start_fixture_registry(self)
        self.proxy = start_pkgproxy(self, f'[routes.npm]\nupstream = "{self.registry.url("/")}"\n')

    def lock(self, app_integrity: str | None = None) -> dict[str, object]:
        # As npm writes it when it installed through the cache: tarballs at the cache.
        registry = self.proxy.url("/npm/")

        def entry(p: npmrepo.NpmPackage, integrity: str | None = None) -> dict[str, object]:
            return {
                "version": p.version,
                "resolved": f"{registry}{p.name}/-/{p.filename}",
                "integrity": integrity or p.integrity,
                "dependencies": dict(p.dependencies),
            }

        return {
            "name": "warm-app",
            "version": "1.0.0",
            "lockfileVersion": 3,
            "requires": True,
            "packages": {
                "": {"name": "warm-app", "version": "1.0.0", "dependencies": {APP.name: "1.0.0"}},
                f"node_modules/{APP.name}": entry(APP, app_integrity),
                f"node_modules/{DEP.name}": entry(DEP),
            },
        }

    def test_warm_then_npm_ci_with_the_registry_gone(self) -> None:
        npm = IsolatedNpm(self.mktemp(), self.proxy.url("/npm/"))
        npm.write_package_json({APP.name: "1.0.0"})
        lock_path = os.path.join(npm.project, "package-lock.json")
        write(lock_path, json.dumps(self.lock()))
        status, out, err = warm(self.proxy, lock_path)
        context = f"{out}\n{err}\n{self.proxy.logs()}"
        self.assertEqual(status, 0, context)
        self.assertIn("fetched 2 files", out, context)
        self.registry.stop()
        result = npm.run(["ci", "--no-audit", "--no-fund"], timeout=CLIENT_TIMEOUT)
        self.assertEqual(result.returncode, 0, result.report() + context)
        self.assertTrue(
            os.path.isdir(os.path.join(npm.project, "node_modules", DEP.name)), result.report()
        )

    def test_integrity_the_registry_does_not_confirm_fetches_nothing(self) -> None:
        bad = "sha512-" + "A" * 86 + "=="
        work = self.mktemp()
        os.makedirs(work)
        lock_path = write(os.path.join(work, "package-lock.json"), json.dumps(self.lock(bad)))
        status, out, err = warm(self.proxy, lock_path)
        self.assertEqual(status, 1, out + err)
        self.assertIn(f"{APP.name}@1.0.0: the lock file's sha512 integrity differs", err)
        self.assertIn("fetched 1 files", out)  # the dependency, whose integrity is right


class DebianWarmTests(AptTestCase):
    """A package list warms InRelease, the indexes and every .deb; apt-get works offline."""

    def setUp(self) -> None:
        upstream_url = self.start_repo()
        self.proxy = start_pkgproxy(self, f'[routes.debian]\nupstream = "{upstream_url}"\n')
        self.apt = IsolatedApt(self.mktemp(), self.repo.sources_line(self.proxy.url("/debian/")))

    def test_warm_then_apt_with_the_upstream_gone(self) -> None:
        listing = write(
            self.mktemp(), f"{self.repo.suite} amd64 {' '.join(self.names)}  # everything\n"
        )
        status, out, err = warm(
            self.proxy, "--family", "debian", "--keyring", self.repo.keyring, listing
        )
        self.assertEqual(status, 0, f"{out}\n{err}\n{self.context()}")
        self.assertIn(f"fetched {len(self.repo.packages)} files", out)
        self.upstream.stop()
        self.ok(self.apt.update(timeout=APT_TIMEOUT))
        self.download_and_verify(self.mktemp())


class OciWarmTests(TestCase):
    """An image list warms the tag, the platform's manifest, config and layers."""

    def setUp(self) -> None:
        for tool in ("docker-registry", "skopeo"):
            if not any(
                os.access(os.path.join(d, tool), os.X_OK) for d in os.environ["PATH"].split(":")
            ):
                raise SkipTest(f"needs {tool}")
        self.skopeo = oci.Skopeo(self)
        self.registry = oci.start_registry(self)
        images = [oci.build_image("warm", arch) for arch in ("amd64", "arm64")]
        self.layout = oci.write_layout(self.skopeo.path("layout"), "1.0", images)
        self.skopeo.push(self.layout, self.registry.hostport, "library/warmed")
        self.proxy = start_pkgproxy(
            self, f'[routes."docker.io"]\nupstream = "{self.registry.url("/v2/")}"\n'
        )

    def test_warm_then_pull_with_the_registry_gone(self) -> None:
        images = write(self.mktemp(), "docker.io/library/warmed:1.0\n")
        status, out, err = warm(self.proxy, "--family", "oci", "--platform", "linux/arm64", images)
        self.assertEqual(status, 0, f"{out}\n{err}\n{self.proxy.logs()}")
        image = self.layout.image("arm64")
        self.assertIn(f"fetched {len(image.blobs)} files", out)
        self.registry.stop()
        dest = self.skopeo.path("pull")
        self.skopeo.pull(
            f"{HOST}:{self.proxy.port}/library/warmed:1.0", dest, "--override-arch", "arm64",
            context=self.proxy.logs(),
        )  # fmt: skip
        self.assertEqual(oci.dir_copy_problems(dest, image.manifest, (image,)), [])


class InProcessTests(TestCase):
    """The command's summary and exit status, run in this process against a plain server."""

    def test_no_route_is_one_line(self) -> None:
        work = self.mktemp()
        os.makedirs(work)
        lock = write(os.path.join(work, "requirements.txt"), f"a==1 --hash=sha256:{'0' * 64}\n")
        config = write(
            os.path.join(work, "c.toml"),
            "[routes.pypi]\nenabled = false\n[routes.pypi-files]\nenabled = false\n",
        )
        out = io.StringIO()
        err = io.StringIO()
        old = sys.stderr
        sys.stderr = err
        try:
            status = cli.main(["http://127.0.0.1:9", "--config", config, lock], out=out)
        finally:
            sys.stderr = old
        self.assertEqual(status, 1)
        self.assertIn("no enabled pypi route", err.getvalue())
