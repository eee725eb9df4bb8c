"""The container image and the cache-ready client images, built and run with buildah.

Everything is built on a Debian base made here with debootstrap (tests/support/containers.py:
no registry is reachable), with ``buildah bud --isolation chroot --network host``, and run
with ``buildah run`` (podman cannot start containers on these machines). The containers
share the host's network, so a server inside listens on a port the test picked on
127.0.0.1, and a build reaches servers the test started there.

* The pkgproxy image (the Dockerfile at the top): it builds from this checkout (pip reaches
  PyPI as this machine's pip does, given as build secrets that the image must not keep),
  runs as its non-root user, answers ``/_pkgproxy/health``, keeps a file it fetched from a
  local upstream on its volume across a new container, and its HEALTHCHECK passes.
* examples/: the Debian and Python cache-ready images, built with ``PKGPROXY`` set in a
  child image; apt (forward mode, to a signed local repository) and pip (to the local
  PyPI look-alike) inside the build see pkgproxy in their configuration, install through
  a pkgproxy the test started (its access log has their requests), and leave nothing of
  it in the image. Node and Alpine need bases from a registry: built only when
  ``node:20-slim`` / ``alpine:3.20`` are already in the machine's container storage.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import subprocess
import time
from typing import ClassVar

from twisted.trial.unittest import SkipTest, TestCase

from tests.support import containers, debrepo, pypirepo
from tests.support.procs import (
    HOST,
    PROXY_ENV_VARS,
    REPO_ROOT,
    PkgProxy,
    Run,
    ServerProcess,
    _wait_health,
    file_tree,
    free_port,
    start_pkgproxy,
    start_static_server,
)

EXAMPLES = os.path.join(REPO_ROOT, "examples")
#: The image's user (Dockerfile: useradd --uid 10001).
IMAGE_UID = 10001
#: Where the tests mount the cache volume (see ContainerTestCase.start_server).
CACHE_MOUNT = "/srv/pkgproxy-cache"
#: apt's sources in the Debian client image: a host nobody resolves, so only the proxy can
#: answer for it (pkgproxy's debian route takes it as a forward prefix).
FORWARD_BASE = "http://deb.example.test/debian/"


def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` from 127.0.0.1:``port`` directly (no proxy)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


class ContainerTestCase(TestCase):
    """The engine and the Debian base, made (or found in the cache) before each test."""

    def setUp(self) -> None:
        missing = containers.missing_requirements()
        if missing:
            raise SkipTest(f"container image tests need {', '.join(missing)}")
        self.engine = containers.Engine()
        self.base = containers.debian_base(self.engine)

    def image_config(self, image: str) -> dict[str, object]:
        config = self.engine.inspect_image(image)["Docker"]["config"]
        assert isinstance(config, dict)
        return config


class PkgproxyImageTest(ContainerTestCase):
    """The Dockerfile at the top, on the Debian base: built once, by the first test."""

    #: The image, shared by this class's tests (removed when the test process exits).
    built: ClassVar[str | None] = None

    def image(self) -> str:
        """The image, built now if no test of this class has built it yet."""
        if PkgproxyImageTest.built is None:
            PkgproxyImageTest.built, _ = self.build_image()
        return PkgproxyImageTest.built

    def build_image(
        self, context: str = REPO_ROOT, name: str = "pkgproxy", layers: bool = False
    ) -> tuple[str, Run]:
        """The image of the Dockerfile in ``context`` (this checkout: one image, shared by
        the class's tests), and the build's output."""
        work = os.path.abspath(self.mktemp())
        os.makedirs(work, exist_ok=True)
        # pip inside the build reaches PyPI as this machine's pip does: its CA bundle (and
        # index settings, if any) as build secrets; the machine's proxy variables too.
        proxies = {k: v for k, v in os.environ.items() if k in PROXY_ENV_VARS}
        return self.engine.build(
            self,
            context,
            build_args={"BASE": self.base},
            extra=containers.pip_build_secrets(work),
            env=proxies,
            name=name,
            shared=context == REPO_ROOT,
            layers=layers,
        )

    def test_a_change_to_the_code_keeps_the_dependencies_layer(self) -> None:
        """Built with layers kept, a change to pkgproxy's code rebuilds only the steps
        from ``COPY . /src``: the step that installs the dependencies (downloading them)
        is taken from the builder's cache."""
        work = os.path.abspath(self.mktemp())
        context = os.path.join(work, "context")
        shutil.copytree(
            REPO_ROOT,
            context,
            ignore=shutil.ignore_patterns(
                ".git",
                "_trial_temp*",
                "bench-results",
                "docs",
                "examples",
                "*.egg-info",
                "__pycache__",
                ".venv",
                "build",
                "dist",
            ),
        )

        def steps() -> dict[str, str]:
            """The build's output by step, named by each step's first words."""
            _, run = self.build_image(context, "pkgproxy-layers", layers=True)
            parts = re.split(r"^STEP \d+/\d+: ", run.output, flags=re.M)[1:]
            return {part[:40]: part for part in parts}

        steps()
        with open(os.path.join(context, "pkgproxy", "__init__.py"), "a", encoding="utf-8") as f:
            f.write("# a change to the code\n")
        again = steps()
        (dependencies,) = [s for s in again.values() if "pip install -r" in s.split("\n")[0]]
        (code,) = [s for s in again.values() if s.startswith("COPY . /src")]
        self.assertIn("Using cache", dependencies)
        self.assertNotIn("Using cache", code)

    def start_server(
        self, image: str, config: str, volume: str, port: int, name: str
    ) -> ServerProcess:
        """A new container of ``image`` running its own CMD, with ``config`` and
        ``volume`` mounted as the README says; waits for /_pkgproxy/ready."""
        ctr = self.engine.container(self, image)
        cmd = self.image_config(image)["Cmd"]
        assert isinstance(cmd, list)
        server = self.engine.start(
            self,
            ctr,
            cmd,
            port,
            # Not at the image's VOLUME path itself: buildah's chroot runs mount the image's
            # anonymous volume there too, and in an order of their own (now and then over
            # the bind mount). Docker and podman let a -v at that path replace it.
            volumes=[f"{volume}:{CACHE_MOUNT}", f"{config}:/etc/pkgproxy/pkgproxy.toml:ro"],
            name=name,
        )
        error = _wait_health(server, "/_pkgproxy/ready", 60.0)
        if error:
            self.fail(f"{error}\n{server.logs()}")
        return server

    def server_processes(self, server: ServerProcess) -> dict[int, int]:
        """pid -> real uid of the twistd processes in the server's process group."""
        found = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    pgid = int(f.read().rsplit(")", 1)[1].split()[2])
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                status = read(f"/proc/{pid}/status")
            except (OSError, IndexError, ValueError):
                continue
            if pgid == server.pid and argv[0].endswith(b"python3") and b"pkgproxy" in argv:
                uid = re.search(r"^Uid:\s+(\d+)", status, re.M)
                assert uid is not None
                found[int(pid)] = int(uid[1])
        return found

    def stop_server(self, server: ServerProcess) -> None:
        """What ``docker stop`` does: SIGTERM to the server (PID 1 of a container), then
        wait for it to end (``buildah run`` ends with it)."""
        for pid in self.server_processes(server):
            os.kill(pid, signal.SIGTERM)
        try:
            server.process.wait(20)
        except subprocess.TimeoutExpired:
            self.fail(f"the server did not stop on SIGTERM\n{server.logs()}")

    def test_built_as_documented(self) -> None:
        """The image builds; it runs as pkgproxy (uid 10001) with its own CMD, a volume
        and a HEALTHCHECK, and keeps nothing of the build's pip settings."""
        image = self.image()
        config = self.image_config(image)
        self.assertEqual(config["User"], "pkgproxy")
        self.assertEqual(config["Volumes"], {"/var/cache/pkgproxy": {}})
        self.assertIn("--pidfile=", config["Cmd"])  # type: ignore[operator]
        healthcheck = config["Healthcheck"]
        assert isinstance(healthcheck, dict)
        self.assertEqual(healthcheck["Test"][0], "CMD")

        # Nothing of the build's pip settings stayed: no pip.conf, empty /run/secrets.
        probe = self.engine.container(self, image)
        leftovers = self.engine.exec(
            probe,
            ["/bin/sh", "-c", "id -u; ls -A /run/secrets 2>/dev/null; test ! -e /etc/pip.conf"],
        )
        self.assertEqual(leftovers.returncode, 0, leftovers.report())
        self.assertEqual(leftovers.output.strip(), str(IMAGE_UID), leftovers.report())

    def test_run_restart_healthcheck(self) -> None:
        """The image runs as pkgproxy with its own CMD, serves a file from a local
        upstream, serves it again from the volume in a new container with the upstream
        gone, and its HEALTHCHECK passes while it runs and fails once it stops."""
        image = self.image()
        healthcheck = self.image_config(image)["Healthcheck"]
        assert isinstance(healthcheck, dict)

        payload = os.urandom(200_000)
        upstream = start_static_server(self, file_tree(self, {"tool-1.0.tar.gz": payload}))
        port = free_port()
        conf = os.path.abspath(self.mktemp())
        with open(conf, "w", encoding="utf-8") as f:
            f.write(
                f'listen = ["tcp:{port}:interface={HOST}"]\n'
                f'[cache]\ndir = "{CACHE_MOUNT}"\n'
                f'[routes.releases]\nfamily = "generic"\nimmutable = true\n'
                f'upstream = "{upstream.url("/")}"\n'
            )
        volume = os.path.abspath(self.mktemp())
        os.makedirs(volume)
        os.chown(volume, IMAGE_UID, IMAGE_UID)  # as an operator prepares a host directory

        server = self.start_server(image, conf, volume, port, "pkgproxy-1")
        self.assertEqual(set(self.server_processes(server).values()), {IMAGE_UID}, server.logs())
        status, headers, body = http_get(port, "/releases/tool-1.0.tar.gz")
        self.assertEqual((status, body == payload), (200, True), server.logs())
        self.assertEqual(headers.get("x-cache"), "MISS")
        # Committed once its download is complete: wait for a HIT.
        deadline = time.monotonic() + 20
        while http_get(port, "/releases/tool-1.0.tar.gz")[1].get("x-cache") != "HIT":
            self.assertLess(time.monotonic(), deadline, f"never a HIT\n{server.logs()}")
            time.sleep(0.2)
        owners = {
            os.lstat(os.path.join(d, n)).st_uid
            for d, dirs, files in os.walk(volume)
            for n in dirs + files
        }
        self.assertEqual(owners, {IMAGE_UID})

        # The HEALTHCHECK's own command, in the container, with the URL of this port.
        check = healthcheck["Test"][1:]
        ctr = self.engine.container(self, image)
        health_env = {"PKGPROXY_HEALTH_URL": f"http://{HOST}:{port}/_pkgproxy/health"}
        ok = self.engine.exec(ctr, check, env=health_env)
        self.assertEqual(ok.returncode, 0, ok.report())

        self.stop_server(server)
        self.assertIn("Server Shut Down", read(server.log_path), server.logs())
        failing = self.engine.exec(ctr, check, env=health_env)
        self.assertNotEqual(failing.returncode, 0, failing.report())

        # A new container on the same volume, the upstream gone: served from the cache.
        upstream.stop()
        again = self.start_server(image, conf, volume, port, "pkgproxy-2")
        status, headers, body = http_get(port, "/releases/tool-1.0.tar.gz")
        self.assertEqual((status, body == payload), (200, True), again.logs())
        self.assertEqual(headers.get("x-cache"), "HIT", again.logs())


class ClientImageTest(ContainerTestCase):
    """examples/: a cache-ready base, then a child image built FROM it with PKGPROXY."""

    def build_child(
        self,
        base_dockerfile: str,
        base_arg: str | None,
        child: str,
        pkgproxy_url: str,
        files: dict[str, bytes] | None = None,
    ) -> tuple[str, str]:
        """Build ``examples/<base_dockerfile>`` (on ``base_arg``, or its default base), then
        the child Dockerfile text ``child`` FROM it with ``--build-arg PKGPROXY``.

        Returns the child image and its build output."""
        parent, _ = self.engine.build(
            self,
            EXAMPLES,
            dockerfile=os.path.join(EXAMPLES, base_dockerfile),
            build_args={"BASE": base_arg} if base_arg else None,
            name="cache-ready",
        )
        context = file_tree(
            self, {"Dockerfile": f"FROM {parent}\n{child}".encode(), **(files or {})}
        )
        image, built = self.engine.build(
            self, context, build_args={"PKGPROXY": pkgproxy_url}, name="client"
        )
        self.assertEqual(self.image_config(image).get("OnBuild") or [], [])
        return image, built.output

    def shell(self, image: str, script: str) -> Run:
        """Run a shell script in a new container of ``image``."""
        return self.engine.exec(self.engine.container(self, image), ["/bin/sh", "-c", script])

    def assertRequested(self, proxy: PkgProxy, build_output: str, *needles: str) -> None:
        """pkgproxy's access log has a line with each of ``needles``."""
        log = read(proxy.log_path)
        for needle in needles:
            self.assertIn(needle, log, f"{build_output[-4000:]}\n{proxy.logs()}")

    def assertNoProxyLeft(self, image: str) -> None:
        """The finished image has no proxy in its configuration or environment."""
        env = self.image_config(image).get("Env") or []
        self.assertEqual([e for e in env if "PKGPROXY" in e or "PIP_" in e], [])  # type: ignore[attr-defined]

    def test_debian_apt_through_pkgproxy(self) -> None:
        """apt in a child of the Debian image runs with pkgproxy as its HTTP proxy, installs
        a package from a signed local repository through it, and keeps no proxy."""
        missing = debrepo.missing_tools()
        if missing:
            raise SkipTest(f"needs {', '.join(missing)}")
        repo = debrepo.build_debian_repo(self.mktemp())
        upstream = start_static_server(self, repo.serve_dir)
        proxy = start_pkgproxy(
            self,
            f'[routes.debian]\nupstream = "{upstream.url("/debian/")}"\n'
            f'forward = ["{FORWARD_BASE}"]\n',
        )
        with open(repo.keyring, "rb") as f:
            keyring = f.read()
        child = (
            "COPY keyring.gpg /usr/share/keyrings/pkgproxy-test.gpg\n"
            "RUN rm -f /etc/apt/sources.list.d/* && echo "
            f'"deb [signed-by=/usr/share/keyrings/pkgproxy-test.gpg] {FORWARD_BASE} stable main"'
            " > /etc/apt/sources.list\n"
            'RUN echo "probe: $(apt-config dump Acquire::http::Proxy)" '
            "&& apt-get update && apt-get install -y --no-install-recommends pkgproxy-hello "
            "&& rm -rf /var/lib/apt/lists/*\n"
        )
        image, output = self.build_child(
            "debian/Dockerfile", self.base, child, proxy.url(""), {"keyring.gpg": keyring}
        )
        self.assertIn(f'probe: Acquire::http::Proxy "{proxy.url("/")}";', output)
        deb = repo.package("pkgproxy-hello").filename
        self.assertRequested(
            proxy, output, f"GET {FORWARD_BASE}dists/stable/InRelease", f"GET {FORWARD_BASE}{deb}"
        )
        installed = self.shell(
            image, "dpkg-query -W pkgproxy-hello; apt-config dump | grep -i proxy"
        )
        self.assertIn("pkgproxy-hello\t1.0-1", installed.output, installed.report())
        self.assertNotIn("Acquire::http::Proxy", installed.output)
        self.assertNoProxyLeft(image)

    def test_python_pip_through_pkgproxy(self) -> None:
        """pip in a child of the Python image has pkgproxy's /pypi/simple/ as its index,
        installs a project and its dependency from the local PyPI look-alike through it,
        and keeps no index setting."""
        work = os.path.abspath(self.mktemp())
        files_port = free_port()
        repo = pypirepo.build_pypi_repo(work, f"http://{HOST}:{files_port}/")
        files = start_static_server(self, repo.files_dir, port=files_port)
        # HTML pages: Debian 12's pip (23.0.1) fails on the object-valued
        # "dist-info-metadata" of PEP 691 JSON pages ("unhashable type: 'dict'").
        index = pypirepo.start_index_server(self, repo.index_dir, html_only=True)
        proxy = start_pkgproxy(
            self,
            f'[routes.pypi]\nupstream = "{index.url("/")}"\n'
            f'[routes.pypi-files]\nupstream = "{files.url("/")}"\n',
        )
        # Debian's python3 (the local base) has pip in a venv only.
        child = (
            "RUN python3 -m venv /opt/app\n"
            "RUN /opt/app/bin/pip config list && /opt/app/bin/pip install --no-cache-dir "
            "pkgproxy-demo-app\n"
        )
        image, output = self.build_child("python/Dockerfile", self.base, child, proxy.url(""))
        self.assertIn(f":env:.index-url='{proxy.url('/pypi/simple/')}'", output)
        wheel = repo.dist("pkgproxy-demo-lib", "1.0").filename
        self.assertRequested(
            proxy, output, "GET /pypi/simple/pkgproxy-demo-app/", "/pypi/files/packages/"
        )
        self.assertRequested(proxy, output, wheel)
        installed = self.shell(image, "/opt/app/bin/pip list; /opt/app/bin/pip config list")
        self.assertIn("pkgproxy-demo-lib", installed.output, installed.report())
        self.assertNotIn("index-url", installed.output)
        self.assertNoProxyLeft(image)

    def present_base(self, image: str) -> str:
        if not self.engine.image_exists(image):
            raise SkipTest(
                f"{image} is not in this machine's container storage (no registry here); "
                f"`podman pull {image}` (or `podman load`) first to build this example"
            )
        return image

    def test_node_npm_config(self) -> None:
        """npm in a child of the Node image has pkgproxy's /npm/ as its registry."""
        base = self.present_base("docker.io/library/node:20-slim")
        url = f"http://{HOST}:{free_port()}"
        image, output = self.build_child(
            "node/Dockerfile", base, 'RUN echo "probe: $(npm config get registry)"\n', url
        )
        self.assertIn(f"probe: {url}/npm/", output)
        self.assertNoProxyLeft(image)

    def test_alpine_apk_repositories(self) -> None:
        """apk's repositories in a RUN of a child of the Alpine image name pkgproxy's
        /alpine/ route, and are Alpine's own again in the finished image."""
        base = self.present_base("docker.io/library/alpine:3.20")
        url = f"http://{HOST}:{free_port()}"
        image, output = self.build_child(
            "alpine/Dockerfile", base, 'RUN echo "probe: $(head -n1 /etc/apk/repositories)"\n', url
        )
        self.assertIn(f"probe: {url}/alpine/", output)
        repos = self.shell(image, "cat /etc/apk/repositories")
        self.assertIn("dl-cdn.alpinelinux.org", repos.output, repos.report())
        self.assertNoProxyLeft(image)
