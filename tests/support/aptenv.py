"""A private apt for end-to-end tests: the real ``apt-get``, none of the machine's apt state.

Why so many ``Dir::`` settings: apt reads ``APT_CONFIG`` first and then the ``apt.conf.d`` of
whatever ``Dir::Etc::parts`` resolves to, reads dpkg's status file, and keeps lists,
caches, locks and logs under ``/var``. Every one of those is pointed into the test's own
directory here, so a test neither sees the host's sources, proxies or hooks
(``apt.conf.d`` snippets such as auto-apt-proxy) nor changes anything the host's apt uses.

Why ``APT::Sandbox::User "root"``: the tests run as root, and apt would otherwise drop to
the ``_apt`` user for downloads, which cannot read or write files in the test's temp dirs.

Why ``Acquire::Retries "0"``: apt 2.x retries failed downloads with growing delays; a test
must see the first failure, fast.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tests.support.procs import clean_env

#: Tools this module runs; a test should skip (not fail) when one is missing.
REQUIRED_TOOLS = ("apt-get",)


@dataclass(frozen=True)
class AptResult:
    """The outcome of one apt command, with everything a failure message needs."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def output(self) -> str:
        """stdout and stderr together (apt prints errors to both)."""
        return self.stdout + self.stderr

    def report(self) -> str:
        """A readable account of the command, for assertion messages."""
        status = "timed out" if self.timed_out else f"exited {self.returncode}"
        return (
            f"$ {' '.join(self.args)}\n{status}\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )

    def problems(self) -> list[str]:
        """Lines in which apt reports an error or warning (``E:``, ``W:``, ``Err:``).

        ``apt-get update`` exits 0 even when an index failed and it fell back to an old one,
        so tests that want a clean run check this list too.
        """
        return [
            line
            for line in self.output.splitlines()
            if line.startswith(("E:", "W:", "Err:")) or "Hash Sum mismatch" in line
        ]

    def check(self, *, clean: bool = False) -> AptResult:
        """Raise AssertionError with :meth:`report` unless it exited 0 (and, if ``clean``,
        printed no errors or warnings); return self for chaining."""
        if self.timed_out or self.returncode != 0:
            raise AssertionError(f"apt failed:\n{self.report()}")
        if clean and self.problems():
            lines = "\n".join(self.problems())
            raise AssertionError(f"apt reported problems:\n{lines}\n{self.report()}")
        return self


class IsolatedApt:
    """An apt configuration rooted in ``base_dir``; run apt-get through :meth:`run`.

    ``sources`` is the full text of its ``sources.list``. ``proxy`` sets
    ``Acquire::http::Proxy`` (forward-proxy mode); without it apt connects directly
    (``DIRECT``), whatever the environment says. ``extra_config`` adds ``apt.conf`` lines
    as ``{"Acquire::http::Pipeline-Depth": "0"}``; ``debug`` (or the environment variable
    ``PKGPROXY_APT_DEBUG=1``) turns on apt's HTTP and acquire debug output.
    """

    def __init__(
        self,
        base_dir: str,
        sources: str,
        *,
        proxy: str | None = None,
        architecture: str = "amd64",
        extra_config: Mapping[str, str] | None = None,
        debug: bool | None = None,
    ) -> None:
        self.root = os.path.abspath(base_dir)
        self.etc = os.path.join(self.root, "etc")
        self.state = os.path.join(self.root, "state")
        self.lists = os.path.join(self.state, "lists")
        self.cache = os.path.join(self.root, "cache")
        self.archives = os.path.join(self.cache, "archives")
        self.log_dir = os.path.join(self.root, "log")
        self.conf_path = os.path.join(self.etc, "apt.conf")
        for d in (
            os.path.join(self.etc, "apt.conf.d"),
            os.path.join(self.etc, "sources.list.d"),
            os.path.join(self.etc, "trusted.gpg.d"),
            os.path.join(self.etc, "preferences.d"),
            os.path.join(self.etc, "auth.conf.d"),
            os.path.join(self.lists, "partial"),
            os.path.join(self.archives, "partial"),
            self.log_dir,
        ):
            os.makedirs(d, exist_ok=True)
        # An empty dpkg status: nothing is installed in this private world.
        with open(os.path.join(self.state, "status"), "w", encoding="utf-8"):
            pass
        with open(os.path.join(self.etc, "sources.list"), "w", encoding="utf-8") as f:
            f.write(sources if sources.endswith("\n") else sources + "\n")
        if debug is None:
            debug = os.environ.get("PKGPROXY_APT_DEBUG", "") not in ("", "0")

        r = self.root
        settings: dict[str, str] = {
            "Dir": f"{r}/",
            "Dir::State": f"{self.state}/",
            "Dir::State::lists": f"{self.lists}/",
            "Dir::State::status": f"{self.state}/status",
            "Dir::Cache": f"{self.cache}/",
            "Dir::Cache::archives": f"{self.archives}/",
            "Dir::Etc": f"{self.etc}/",
            "Dir::Etc::main": f"{self.etc}/main.conf",  # never created: nothing more to read
            "Dir::Etc::parts": f"{self.etc}/apt.conf.d/",
            "Dir::Etc::sourcelist": f"{self.etc}/sources.list",
            "Dir::Etc::sourceparts": f"{self.etc}/sources.list.d/",
            "Dir::Etc::trusted": f"{self.etc}/trusted.gpg",
            "Dir::Etc::trustedparts": f"{self.etc}/trusted.gpg.d/",
            "Dir::Etc::preferences": f"{self.etc}/preferences",
            "Dir::Etc::preferencesparts": f"{self.etc}/preferences.d/",
            "Dir::Etc::netrc": f"{self.etc}/auth.conf",
            "Dir::Etc::netrcparts": f"{self.etc}/auth.conf.d/",
            "Dir::Log": f"{self.log_dir}/",
            "APT::Architecture": architecture,
            "APT::Sandbox::User": "root",
            "Acquire::Languages": "none",
            "Acquire::Retries": "0",
            "Acquire::http::Timeout": "20",
            "Acquire::http::Proxy": proxy or "DIRECT",
            "Debug::Acquire::http": "true" if debug else "false",
            "Debug::pkgAcquire::Worker": "true" if debug else "false",
        }
        settings.update(extra_config or {})
        lines = [f'{k} "{v}";' for k, v in settings.items()]
        # A list, not a scalar: an explicit architecture list also keeps apt from asking
        # the host's dpkg for foreign architectures.
        lines.append(f'APT::Architectures {{ "{architecture}"; }};')
        with open(self.conf_path, "w", encoding="utf-8") as f:
            f.write("// Written by tests/support/aptenv.py: an apt that only sees this dir.\n")
            f.write("\n".join(lines) + "\n")
        self.env = clean_env(
            {"APT_CONFIG": self.conf_path, "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
        )

    def run(
        self, args: Sequence[str], *, cwd: str | None = None, timeout: float = 60.0
    ) -> AptResult:
        """Run an apt command (e.g. ``["apt-get", "update"]``) with this configuration.

        Never raises for apt's own failures: check the result. On timeout the whole process
        group (apt and its method children) is killed and ``timed_out`` is set.
        """
        proc = subprocess.Popen(
            list(args),
            cwd=cwd or self.root,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
        return AptResult(
            args=tuple(args),
            returncode=proc.returncode,
            stdout=out.decode("utf-8", errors="replace"),
            stderr=err.decode("utf-8", errors="replace"),
            timed_out=timed_out,
        )

    def update(self, timeout: float = 60.0) -> AptResult:
        """``apt-get update``."""
        return self.run(["apt-get", "update"], timeout=timeout)

    def download(self, packages: Sequence[str], dest_dir: str, timeout: float = 60.0) -> AptResult:
        """``apt-get download PKG...`` into ``dest_dir`` (apt saves into its cwd)."""
        os.makedirs(dest_dir, exist_ok=True)
        return self.run(["apt-get", "download", *packages], cwd=dest_dir, timeout=timeout)

    def wipe(self) -> None:
        """Forget every downloaded list, cache and archive, so apt must fetch everything again.

        Without this apt would send ``If-Modified-Since`` for lists it has, or reuse .debs in
        its archive cache, and a test could pass without asking the proxy for the bytes.
        """
        for d in (self.lists, self.archives):
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(os.path.join(d, "partial"))
        for name in os.listdir(self.cache):
            if name.endswith(".bin"):
                os.unlink(os.path.join(self.cache, name))

    def list_files(self) -> list[str]:
        """Names of the index files apt has stored (``*_InRelease``, ``*_Packages``...)."""
        return sorted(
            n
            for n in os.listdir(self.lists)
            if os.path.isfile(os.path.join(self.lists, n)) and n != "lock"
        )
