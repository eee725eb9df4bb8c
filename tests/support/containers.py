"""Build and run container images with buildah, on a Debian base made here, for e2e tests.

What works on the machines these tests run on (root, no Docker daemon, no registry):

* ``buildah bud --isolation chroot --network host`` builds, given a containers.conf with
  ``[containers] default_ulimits = []`` (setrlimit is refused otherwise);
* ``podman run`` does not start containers (crun: "cgroups in hybrid mode not
  supported"), so a built image is run with ``buildah run --isolation chroot --network
  host``: the container's processes share the host's network, and a server inside listens
  on a port the test picked on 127.0.0.1;
* no registry is reachable, so the base is made with ``debootstrap --variant=minbase`` from
  the Debian mirror this machine's apt uses, and imported with ``podman import``. That
  takes about a minute, so the root file system is kept as a tar file under
  ``~/.cache/pkgproxy-tests/`` and the image stays in the machine's container storage,
  both named by a key of everything that shapes them: a changed recipe or mirror makes a
  new base, never a stale one.

Images the tests build are tagged ``localhost/pkgproxy-test/...`` with the test process's
pid and removed by the test's cleanup, as are the containers made from them.
"""

from __future__ import annotations

import atexit
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.support.procs import Run, ServerProcess, clean_env, run_client, tail

#: Tools the container tests run.
REQUIRED_TOOLS = ("buildah", "podman", "debootstrap")

SUITE = "bookworm"
#: Debian's packages in the base: what the pkgproxy image and the client images need, so
#: that their builds install nothing from Debian (and so reach no Debian mirror).
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
#: Bump when the way the base is made changes: the key changes, so the base is remade.
BASE_RECIPE = 1
BASE_REPOSITORY = "localhost/pkgproxy-test/debian"

BUILD_TIMEOUT = 600.0
RUN_TIMEOUT = 120.0


def cache_root() -> str:
    """``~/.cache/pkgproxy-tests``, where test fixtures slow to make are kept between runs."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "pkgproxy-tests")


def missing_requirements() -> list[str]:
    """What the container tests need and this machine lacks (for SkipTest messages)."""
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if os.geteuid() != 0:
        missing.append("root (debootstrap and buildah's chroot isolation)")
    return missing


class Engine:
    """buildah and podman, with the configuration this machine kind needs.

    ``CONTAINERS_CONF`` points at a file of the tests' own (no default ulimits); proxy
    variables are dropped from the environment unless a call passes its own.
    """

    def __init__(self) -> None:
        root = cache_root()
        os.makedirs(root, exist_ok=True)
        conf = os.path.join(root, "containers.conf")
        text = "[containers]\n# setrlimit is refused in these sandboxes\ndefault_ulimits = []\n"
        try:
            with open(conf, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = ""
        if current != text:
            _write_atomic(conf, text.encode())
        self.env = clean_env({"CONTAINERS_CONF": conf})

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = RUN_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> Run:
        """Run one engine command to its end (bounded by ``timeout``); never raises for a
        non-zero exit: the caller asserts on the :class:`~tests.support.procs.Run`."""
        return run_client(argv, {**self.env, **(env or {})}, timeout)

    def check(self, argv: Sequence[str], **kwargs: Any) -> Run:
        """:meth:`run`, raising AssertionError with the output if it fails."""
        result = self.run(argv, **kwargs)
        if result.returncode != 0:
            raise AssertionError(result.report())
        return result

    def image_exists(self, name: str) -> bool:
        """Whether ``name`` is an image in the machine's container storage."""
        return self.run(["buildah", "inspect", "--type", "image", name]).returncode == 0

    def inspect_image(self, name: str) -> dict[str, Any]:
        """``buildah inspect`` of an image, parsed (``["Docker"]["config"]`` etc.)."""
        out = self.check(["buildah", "inspect", "--type", "image", name]).output
        return dict(json.loads(out))

    def build(
        self,
        testcase: SynchronousTestCase,
        context: str,
        *,
        dockerfile: str | None = None,
        build_args: Mapping[str, str] | None = None,
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        name: str = "image",
        shared: bool = False,
        layers: bool = False,
    ) -> tuple[str, Run]:
        """Build ``context`` as a Docker-format image (ONBUILD, SHELL and HEALTHCHECK are
        Docker-format only) on the host's network; remove it when the test ends, or, if
        ``shared`` (one image for several tests), when the test process exits. With
        ``layers``, each step's result is kept and reused by a later build, as a
        developer's or a CI's builder does.

        Returns its tag and the build's output. A failed build fails the test.
        """
        tag = f"localhost/pkgproxy-test/{name}:{os.getpid()}-{_next_id()}"
        argv = ["buildah", "bud", "--isolation", "chroot", "--network", "host"]
        argv += ["--format", "docker", f"--layers={str(layers).lower()}", "--pull=never"]
        argv += ["-t", tag]
        for key, value in (build_args or {}).items():
            argv += ["--build-arg", f"{key}={value}"]
        if dockerfile:
            argv += ["-f", dockerfile]
        argv += [*extra, context]
        if shared:
            atexit.register(self.run, ["buildah", "rmi", "-f", tag])
        else:
            testcase.addCleanup(self.run, ["buildah", "rmi", "-f", tag])
        result = self.run(argv, timeout=BUILD_TIMEOUT, env=env)
        if result.returncode != 0:
            testcase.fail(f"the build of {name} failed\n{result.report()}")
        return tag, result

    def container(self, testcase: SynchronousTestCase, image: str) -> str:
        """A working container of ``image`` (``buildah from``), removed when the test ends."""
        name = f"pkgproxy-test-{os.getpid()}-{_next_id()}"
        self.check(["buildah", "from", "--pull=never", "--name", name, image])
        testcase.addCleanup(self.run, ["buildah", "rm", name])
        return name

    def run_argv(
        self,
        container: str,
        argv: Sequence[str],
        *,
        volumes: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> list[str]:
        """The ``buildah run`` command line that runs ``argv`` in ``container`` as its
        image's user, on the host's network."""
        cmd = ["buildah", "run", "--isolation", "chroot", "--network", "host"]
        for volume in volumes:
            cmd += ["-v", volume]
        for key, value in (env or {}).items():
            cmd += ["--env", f"{key}={value}"]
        return [*cmd, container, "--", *argv]

    def exec(self, container: str, argv: Sequence[str], **kwargs: Any) -> Run:
        """Run ``argv`` in ``container`` to its end (see :meth:`run_argv`)."""
        return self.run(self.run_argv(container, argv, **kwargs))

    def start(
        self,
        testcase: SynchronousTestCase,
        container: str,
        argv: Sequence[str],
        port: int,
        *,
        volumes: Sequence[str] = (),
        name: str = "container",
    ) -> ServerProcess:
        """Run a server in ``container`` until the test ends (its own process group, so a
        SIGTERM to the group reaches the server inside as well as ``buildah run``)."""
        log_dir = os.path.abspath(testcase.mktemp())
        os.makedirs(log_dir)
        server = ServerProcess(
            name,
            self.run_argv(container, argv, volumes=volumes),
            port,
            os.path.join(log_dir, f"{name}.log"),
            self.env,
        )
        testcase.addCleanup(server.stop)
        return server


_ids = iter(range(1, 1 << 30))


def _next_id() -> int:
    return next(_ids)


def _write_atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# -- the Debian base ------------------------------------------------------------------


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses for ``SUITE``.

    ``PKGPROXY_TEST_DEBIAN_MIRROR`` overrides; otherwise the first ``URIs:`` (deb822) or
    ``deb`` line (one-line style) in /etc/apt/sources.list* naming the suite, not a
    security archive; deb.debian.org if there is none.
    """
    override = os.environ.get("PKGPROXY_TEST_DEBIAN_MIRROR")
    if override:
        return override
    files = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        if path.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.M))
                if (
                    SUITE in fields.get("Suites", "").split()
                    and "deb" in fields.get("Types", "").split()
                ):
                    for uri in fields.get("URIs", "").split():
                        if uri.startswith("http") and "security" not in uri:
                            return str(uri)
        elif path.endswith(".list"):
            for line in text.splitlines():
                m = re.match(r"deb\s+(?:\[[^\]]*\]\s+)?(http\S+)\s+(\S+)", line)
                if m and m[2] == SUITE and "security" not in m[1]:
                    return m[1]
    return "http://deb.debian.org/debian"


def _apt_proxy() -> str | None:
    """``Acquire::http::Proxy`` of this machine's apt, if any: debootstrap gets it too."""
    try:
        out = subprocess.run(
            ["apt-config", "shell", "P", "Acquire::http::Proxy"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            timeout=30,
            check=False,
        ).stdout.decode()
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.match(r"P='(.*)'", out.strip())
    return m[1] if m and m[1] and m[1] != "DIRECT" else None


def _debootstrap_version() -> str:
    out = subprocess.run(
        ["debootstrap", "--version"], stdout=subprocess.PIPE, timeout=30, check=False
    ).stdout
    return out.decode().strip()


def base_key(mirror: str) -> str:
    """What names a base: the recipe, the suite, the packages, the mirror, debootstrap."""
    parts = [str(BASE_RECIPE), SUITE, ",".join(BASE_PACKAGES), mirror, _debootstrap_version()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def debian_base(engine: Engine) -> str:
    """The Debian base image (``localhost/pkgproxy-test/debian:bookworm-<key>``), made if
    it is missing; a lock keeps two test processes from making it at once.

    Kept between runs: the image in the container storage and its root file system as a
    tar under :func:`cache_root` (re-imported in seconds if the image was removed).
    """
    mirror = debian_mirror()
    key = base_key(mirror)
    image = f"{BASE_REPOSITORY}:{SUITE}-{key}"
    root = cache_root()
    os.makedirs(root, exist_ok=True)
    tarball = os.path.join(root, f"debian-{SUITE}-{key}.tar")
    with open(os.path.join(root, "debian-base.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if engine.image_exists(image):
            return image
        if not os.path.exists(tarball):
            _debootstrap(mirror, tarball)
        engine.check(
            ["podman", "import", "--change", "CMD=/bin/bash", tarball, image],
            timeout=300,
        )
        # Stale bases (another key): their file systems and their images.
        for old in glob.glob(os.path.join(root, f"debian-{SUITE}-*.tar")):
            if old != tarball:
                os.unlink(old)
        names = engine.check(["buildah", "images", "--format", "{{.Name}}:{{.Tag}}"]).output
        for name in names.split():
            if name.startswith(BASE_REPOSITORY + ":") and name != image:
                engine.run(["buildah", "rmi", name])
        return image


def _debootstrap(mirror: str, tarball: str) -> None:
    """debootstrap the base into a scratch directory, tidy it, and tar it to ``tarball``."""
    scratch = tempfile.mkdtemp(prefix="debootstrap-", dir=os.path.dirname(tarball))
    target = os.path.join(scratch, "root")
    env = clean_env()
    proxy = _apt_proxy()
    if proxy:
        env["http_proxy"] = proxy
    try:
        argv = [
            "debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
            SUITE, target, mirror,
        ]  # fmt: skip
        log = os.path.join(scratch, "debootstrap.log")
        with open(log, "wb") as out:
            done = subprocess.run(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=900, check=False
            )
        if done.returncode != 0:
            raise AssertionError(f"debootstrap failed (exit {done.returncode})\n{tail(log)}")
        # Nothing of this machine in the image: its resolv.conf and hostname, apt's lists.
        for name in ("etc/resolv.conf", "etc/hostname"):
            path = os.path.join(target, name)
            if os.path.lexists(path):
                os.unlink(path)
        for pattern in ("var/lib/apt/lists/*", "var/cache/apt/archives/*.deb", "var/log/*"):
            for path in glob.glob(os.path.join(target, pattern)):
                if os.path.isfile(path) or os.path.islink(path):
                    os.unlink(path)
        tmp = tarball + ".tmp"
        subprocess.run(
            ["tar", "--numeric-owner", "-C", target, "-cf", tmp, "."], check=True, timeout=300
        )
        os.replace(tmp, tarball)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- pip's way to PyPI, for a build -----------------------------------------------------

#: pip settings that say how to reach an index (what a build needs of this machine's).
_NETWORK_KEYS = ("index-url", "extra-index-url", "trusted-host", "proxy", "cert")


def host_pip_settings() -> dict[str, str]:
    """How this machine's pip reaches PyPI: ``pip config list`` (files, then ``PIP_*``
    variables) reduced to the network settings, without local paths (``file:`` indexes,
    find-links, constraints), which mean nothing inside an image."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        timeout=60,
        check=False,
    ).stdout.decode()
    settings: dict[str, str] = {}
    env_settings: dict[str, str] = {}
    for line in out.splitlines():
        m = re.match(r"^([^.]*)\.([a-z-]+)='(.*)'$", line)
        if not m or m[2] not in _NETWORK_KEYS or m[1] not in ("global", "install", ":env:"):
            continue
        value = m[3]
        if m[2].endswith("index-url"):
            value = " ".join(u for u in value.split() if u.startswith(("http://", "https://")))
            if not value:
                continue
        (env_settings if m[1] == ":env:" else settings)[m[2]] = value
    settings.update(env_settings)
    return settings


def pip_build_secrets(workdir: str) -> list[str]:
    """``--secret`` options that give a build this machine's way to PyPI (see the
    Dockerfile): its CA bundle as ``ca-bundle`` and, if pip is told more than that, a
    pip.conf of those settings as ``pip.conf``. Secrets are mounted for a build step only;
    nothing of them is stored in the image."""
    settings = host_pip_settings()
    secrets: list[str] = []
    cert = settings.pop("cert", "")
    if cert and os.path.isfile(cert):
        secrets += ["--secret", f"id=ca-bundle,src={cert}"]
    if settings:
        path = os.path.join(workdir, "build-pip.conf")
        with open(path, "w", encoding="utf-8") as f:
            f.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        secrets += ["--secret", f"id=pip.conf,src={path}"]
    return secrets
