"""A real npm registry (verdaccio) and a real, isolated npm client for end-to-end tests.

verdaccio is installed by ``tests/run.sh`` with npm into a cache folder outside the
checkout (:func:`verdaccio_entry` says where), pinned to 6.8.0 with ``node-fetch``
overridden to 2.7.0 so it runs on Node 20. It serves packages the test writes straight
into its storage (:func:`tests.support.npmrepo.write_verdaccio_storage`), with no
uplink: nothing leaves 127.0.0.1.

npm runs with a fresh ``--cache``, empty user and global config files, a HOME of its
own, and no proxy variables (npm takes even a variable named ``PROXY`` as its proxy),
so the machine's npm setup cannot leak in and the test's cannot leak out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from twisted.trial.unittest import SynchronousTestCase

from tests.support.procs import (
    HOST,
    ServerProcess,
    _fail_start,
    _wait_health,
    clean_env,
    free_port,
)

VERDACCIO_VERSION = "6.8.0"


def verdaccio_dir() -> str:
    """Where ``tests/run.sh`` installs verdaccio (``PKGPROXY_VERDACCIO_DIR`` overrides)."""
    default = os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
        "pkgproxy-tests",
        f"verdaccio-{VERDACCIO_VERSION}",
    )
    return os.environ.get("PKGPROXY_VERDACCIO_DIR", default)


def verdaccio_entry() -> str | None:
    """verdaccio's start script, if it is installed."""
    path = os.path.join(verdaccio_dir(), "node_modules", "verdaccio", "bin", "verdaccio")
    return path if os.path.isfile(path) else None


def missing_tools() -> list[str]:
    """What the npm end-to-end tests need and this machine lacks."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if verdaccio_entry() is None:
        missing.append(f"verdaccio {VERDACCIO_VERSION} in {verdaccio_dir()} (tests/run.sh)")
    return missing


def _npm_free_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without proxy variables and without any ``npm_config_*``."""
    env = {k: v for k, v in clean_env().items() if not k.lower().startswith("npm_config_")}
    env.update(extra or {})
    return env


def start_fixture_registry(testcase: SynchronousTestCase) -> ServerProcess:
    """verdaccio serving :data:`npmrepo.FIXTURES` until the test ends (the test is
    skipped where npm or verdaccio is missing)."""
    from twisted.trial.unittest import SkipTest

    from tests.support import npmrepo

    missing = missing_tools()
    if missing:
        raise SkipTest(f"needs {', '.join(missing)}")
    storage = os.path.abspath(testcase.mktemp())
    npmrepo.write_verdaccio_storage(storage, npmrepo.FIXTURES)
    return start_verdaccio(testcase, storage)


def start_verdaccio(
    testcase: SynchronousTestCase, storage: str, timeout: float = 30.0
) -> ServerProcess:
    """Run verdaccio on 127.0.0.1 over ``storage``, with no uplinks, until the test ends."""
    entry = verdaccio_entry()
    assert entry is not None, "check missing_tools() first"
    work = os.path.abspath(testcase.mktemp())
    os.makedirs(work)
    config = os.path.join(work, "config.yaml")
    with open(config, "w", encoding="utf-8") as f:
        f.write(
            f"storage: {os.path.abspath(storage)}\n"
            "uplinks: {}\n"
            "packages:\n"
            "  '**':\n"
            "    access: $all\n"
            "    publish: $authenticated\n"
            "web:\n"
            "  enable: false\n"
            "log: { type: stdout, format: pretty, level: http }\n"
        )
    port = free_port()
    server = ServerProcess(
        "verdaccio",
        ["node", entry, "--config", config, "--listen", f"{HOST}:{port}"],
        port,
        os.path.join(work, "verdaccio.log"),
        _npm_free_env({"HOME": work}),
        cwd=work,
    )
    testcase.addCleanup(server.stop)
    error = _wait_health(server, "/-/ping", timeout)
    if error:
        _fail_start(testcase, server, error)
    return server


@dataclass
class NpmResult:
    """One npm run."""

    argv: list[str]
    returncode: int
    output: str
    seconds: float
    timed_out: bool = False

    def report(self) -> str:
        """Everything about the run, for failure messages."""
        return (
            f"$ {' '.join(self.argv)}\nexit {self.returncode} after {self.seconds:.1f} s"
            f"{' (timed out)' if self.timed_out else ''}\n{self.output}"
        )


class IsolatedNpm:
    """npm in a project folder of its own, talking to ``registry`` only.

    :ivar project: the folder npm installs into (``package.json``, ``node_modules``).
    """

    def __init__(self, root: str, registry: str, proxy: str | None = None) -> None:
        self.root = os.path.abspath(root)
        self.registry = registry
        self.proxy = proxy
        self.project = os.path.join(self.root, "project")
        self.home = os.path.join(self.root, "home")
        self.userconfig = os.path.join(self.root, "npmrc")
        self.globalconfig = os.path.join(self.root, "global-npmrc")
        self._caches = 0
        for d in (self.project, self.home):
            os.makedirs(d, exist_ok=True)
        for f in (self.userconfig, self.globalconfig):
            with open(f, "w", encoding="utf-8"):
                pass
        self.new_cache()

    def new_cache(self) -> str:
        """Start over with an empty npm cache; returns its folder."""
        self._caches += 1
        self.cache = os.path.join(self.root, f"cache-{self._caches}")
        os.makedirs(self.cache)
        return self.cache

    def write_package_json(self, dependencies: Mapping[str, str]) -> None:
        """A private project that depends on ``dependencies``."""
        with open(os.path.join(self.project, "package.json"), "w", encoding="utf-8") as f:
            json.dump(
                {"name": "pkgproxy-e2e", "version": "1.0.0", "private": True,
                 "dependencies": dict(dependencies)},
                f,
            )  # fmt: skip

    def wipe_install(self) -> None:
        """Forget what was installed: node_modules and the lockfile."""
        shutil.rmtree(os.path.join(self.project, "node_modules"), ignore_errors=True)
        lock = os.path.join(self.project, "package-lock.json")
        if os.path.exists(lock):
            os.remove(lock)

    def run(self, args: Sequence[str], timeout: float = 60.0, cwd: str | None = None) -> NpmResult:
        """``npm <args>`` with the isolation described in the module docstring."""
        argv = [
            "npm", *args,
            "--registry", self.registry,
            "--cache", self.cache,
            "--userconfig", self.userconfig,
            "--globalconfig", self.globalconfig,
            "--replace-registry-host=never",
            "--update-notifier=false",
            "--fund=false",
            "--loglevel=http",
            "--fetch-retries=0",
            "--fetch-timeout=20000",
        ]  # fmt: skip
        if self.proxy is not None:
            argv += ["--proxy", self.proxy, "--noproxy", ""]
        env = _npm_free_env({"HOME": self.home, "NO_COLOR": "1", "CI": "true"})
        started = time.monotonic()
        proc = subprocess.Popen(
            argv,
            cwd=cwd or self.project,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: a timeout stops npm and its children
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            timed_out = True
        return NpmResult(
            argv,
            proc.returncode,
            out.decode("utf-8", "replace"),
            time.monotonic() - started,
            timed_out,
        )
