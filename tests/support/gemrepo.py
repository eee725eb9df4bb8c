"""Tiny gems and the repository that serves them, built by the tests with RubyGems itself.

Why not gems from rubygems.org: tests must not depend on the network, and a gem built
here has a sha256 the test knows. Each gem is made by ``gem build`` from a gemspec
written here (with ``SOURCE_DATE_EPOCH`` fixed, so the bytes are the same each run);
the full index (``specs.4.8.gz``, ``quick/Marshal.4.8/``) is ``gem generate_index``'s,
and the compact index (``versions``, ``info/<gem>``, ``names``) is written here as its
format says (https://guides.rubygems.org/rubygems-org-compact-index-api/), since
Debian's RubyGems has no command that makes one.

The names are prefixed ``pkgproxy-fixture``: should a client ever reach rubygems.org by
mistake, the install fails instead of quietly taking someone else's gem.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from tests.support.procs import clean_env

#: 2024-01-01T00:00:00Z: every gem's build date.
EPOCH = "1704067200"


@dataclass(frozen=True)
class GemFixture:
    """One version of one gem, built on first use."""

    name: str
    version: str
    dependencies: Mapping[str, str] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}.gem"

    @property
    def module(self) -> str:
        return "".join(p.capitalize() for p in self.name.replace("-", "_").split("_"))

    @cached_property
    def gem(self) -> bytes:
        """The .gem file, made by ``gem build``."""
        with tempfile.TemporaryDirectory(prefix="pkgproxy-gem-") as d:
            lib = self.name.replace("-", "_")
            os.makedirs(os.path.join(d, "lib"))
            with open(os.path.join(d, "lib", f"{lib}.rb"), "w") as f:
                f.write(f"module {self.module}\n  SAYS = {f'{self.name} {self.version}'!r}\nend\n")
            deps = "".join(
                f"  s.add_dependency {n!r}, {r!r}\n" for n, r in sorted(self.dependencies.items())
            )
            with open(os.path.join(d, "fixture.gemspec"), "w") as f:
                f.write(
                    "Gem::Specification.new do |s|\n"
                    f"  s.name = {self.name!r}\n  s.version = {self.version!r}\n"
                    "  s.summary = 'a pkgproxy test fixture'\n  s.authors = ['pkgproxy']\n"
                    f"  s.license = 'MIT'\n  s.files = ['lib/{lib}.rb']\n{deps}end\n"
                )
            subprocess.run(
                ["gem", "build", "fixture.gemspec"],
                cwd=d,
                env=clean_env({"SOURCE_DATE_EPOCH": EPOCH}),
                capture_output=True,
                check=True,
                timeout=60,
            )
            with open(os.path.join(d, self.filename), "rb") as f:
                return f.read()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.gem).hexdigest()

    def info_line(self) -> str:
        """This version's line in ``info/<name>``."""
        deps = ",".join(f"{n}:{r}" for n, r in sorted(self.dependencies.items()))
        return f"{self.version} {deps}|checksum:{self.sha256}\n"


def info(versions: Iterable[GemFixture]) -> bytes:
    """``info/<name>`` of one gem's versions."""
    return ("---\n" + "".join(g.info_line() for g in versions)).encode()


def write_repo(root: str, gems: Iterable[GemFixture], compact: bool = True) -> None:
    """Write (or bring up to date) a repository of ``gems`` below ``root``.

    ``versions`` is appended to, as rubygems.org does between its rebuilds: a line for
    each gem whose versions changed, naming only the new versions and the MD5 of the
    gem's new info file. Without ``compact``, only what ``gem generate_index`` makes.
    """
    by_name: dict[str, list[GemFixture]] = {}
    for g in gems:
        by_name.setdefault(g.name, []).append(g)
    os.makedirs(os.path.join(root, "gems"), exist_ok=True)
    if not compact:
        for g in by_name.values():
            for item in g:
                with open(os.path.join(root, "gems", item.filename), "wb") as f:
                    f.write(item.gem)
        _generate_index(root)
        return
    os.makedirs(os.path.join(root, "info"), exist_ok=True)
    versions_path = os.path.join(root, "versions")
    if os.path.exists(versions_path):
        with open(versions_path, "rb") as f:
            versions = f.read()
    else:
        versions = b"created_at: 2024-01-01T00:00:00Z\n---\n"
    for name, items in sorted(by_name.items()):
        info_path = os.path.join(root, "info", name)
        body = info(items)
        old = b""
        if os.path.exists(info_path):
            with open(info_path, "rb") as f:
                old = f.read()
        if old == body:
            continue
        known = {line.split(b" ", 1)[0] for line in old.splitlines()[1:]}
        new = [g.version for g in items if g.version.encode() not in known]
        with open(info_path, "wb") as f:
            f.write(body)
        md5 = hashlib.md5(body).hexdigest()
        versions += f"{name} {','.join(new)} {md5}\n".encode()
        for g in items:
            with open(os.path.join(root, "gems", g.filename), "wb") as f:
                f.write(g.gem)
    with open(versions_path, "wb") as f:
        f.write(versions)
    with open(os.path.join(root, "names"), "wb") as f:
        f.write(("---\n" + "".join(f"{n}\n" for n in sorted(by_name))).encode())
    _generate_index(root)


def _generate_index(root: str) -> None:
    """The full index of the gems in ``root``/gems, by RubyGems itself."""
    subprocess.run(
        ["gem", "generate_index", "--directory", root],
        env=clean_env(),
        capture_output=True,
        check=True,
        timeout=60,
    )


#: An application gem with a dependency (resolved from a range), a newer dependency
#: published during a test.
DEP = GemFixture("pkgproxy-fixture-dep", "2.0.0")
DEP_NEXT = GemFixture("pkgproxy-fixture-dep", "2.1.0")
APP = GemFixture("pkgproxy-fixture-app", "1.0.0", {"pkgproxy-fixture-dep": "~> 2.0"})
