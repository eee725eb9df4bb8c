"""What the apt end-to-end tests share: a signed test repository, its upstream, checks.

A test case builds the repository and its upstream with :meth:`AptTestCase.start_repo`,
starts pkgproxy and an :class:`~tests.support.aptenv.IsolatedApt` its own way (by path
or as a proxy), and then asserts with :meth:`AptTestCase.ok` and
:meth:`AptTestCase.download_and_verify`.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SkipTest, TestCase

from tests.support import debrepo
from tests.support.aptenv import AptResult, IsolatedApt
from tests.support.procs import PkgProxy, StaticServer, start_static_server

TOOLS = ("apt-get", "apt-ftparchive", "dpkg-deb", "gpg", "gpgconf")
APT_TIMEOUT = 60.0


class AptTestCase(TestCase):
    """Holds ``repo``, ``upstream``, and (set by the test) ``proxy`` and ``apt``."""

    repo: debrepo.DebRepo
    upstream: StaticServer
    proxy: PkgProxy
    apt: IsolatedApt

    def start_repo(self, tools: tuple[str, ...] = TOOLS) -> str:
        """Build the repository, serve it, and return its upstream URL (skip without tools)."""
        missing = debrepo.missing_tools(tools)
        if missing:
            raise SkipTest(
                f"needs {', '.join(missing)} (Debian packages listed in .ci/apt-packages.txt)"
            )
        self.repo = debrepo.build_debian_repo(self.mktemp())
        self.upstream = start_static_server(self, self.repo.serve_dir)
        return self.upstream.url(f"/{self.repo.mount}/")

    @property
    def names(self) -> list[str]:
        """The repository's package names."""
        return [p.name for p in self.repo.packages]

    def context(self) -> str:
        """Logs of both servers, appended to every failure message."""
        return f"{self.proxy.logs()}\n{self.upstream.logs()}"

    def ok(self, result: AptResult) -> AptResult:
        """Assert apt exited 0 and printed no E:/W:/Err: line and no Hash Sum mismatch."""
        if result.timed_out or result.returncode != 0 or result.problems():
            problems = "\n".join(result.problems())
            self.fail(
                f"apt did not succeed cleanly:\n{problems}\n{result.report()}\n{self.context()}"
            )
        return result

    def download_and_verify(self, dest: str) -> None:
        """``apt-get download`` every package; each must be byte-identical to upstream's."""
        self.ok(self.apt.download(self.names, dest, timeout=APT_TIMEOUT))
        got = sorted(n for n in os.listdir(dest) if n.endswith(".deb"))
        want = sorted(p.basename for p in self.repo.packages)
        self.assertEqual(got, want, f"downloaded files differ\n{self.context()}")
        for p in self.repo.packages:
            self.assertEqual(
                debrepo.sha256_file(os.path.join(dest, p.basename)),
                p.sha256,
                f"{p.basename}: sha256 differs from the repository's\n{self.context()}",
            )
