"""Debian's ``gem`` and ``bundle`` through a real pkgproxy, against a gem repository on
127.0.0.1.

Why this test exists: the unit tests show pkgproxy does what we read the compact index
to say; only the clients can show they accept it: RubyGems choosing the compact index by
the server root, bundler updating ``versions`` with a ``Range`` and checking the result
against the ETag, the ``.gem`` files checked against ``info/<gem>``. The upstream is
``python3 -m http.server`` over a repository the test builds
(tests/support/gemrepo.py); ``gem`` reads the source from the file ``pkgproxy-config
gem`` makes, bundler its mirror setting from the one ``pkgproxy-config bundler`` makes.
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import time

from twisted.trial.unittest import SkipTest, TestCase

from pkgproxy.clientconfig import Target, bundler, gem
from pkgproxy.config import BUILTIN_ROUTES
from tests.support import gemrepo
from tests.support.gemrepo import APP, DEP, DEP_NEXT
from tests.support.procs import HOST, clean_env, start_pkgproxy, start_static_server

TIMEOUT = 120.0
#: The Gemfile's source: a name that cannot resolve, so that only the mirror setting
#: can make bundler fetch anything.
SOURCE = "http://rubygems.pkgproxy.test/"


def _get(port: int, path: str) -> int:
    """Status of a GET through pkgproxy; 0 for a connection cut before the end."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


class GemsThroughPkgproxyTests(TestCase):
    def setUp(self) -> None:
        missing = [t for t in ("gem", "bundle", "ruby") if shutil.which(t) is None]
        if missing:
            raise SkipTest(f"needs {', '.join(missing)} (Debian's ruby and ruby-bundler)")
        self.root = os.path.abspath(self.mktemp())
        gemrepo.write_repo(self.root, [APP, DEP])
        self.upstream = start_static_server(self, self.root)
        self.proxy = start_pkgproxy(
            self,
            f'[routes.rubygems]\nupstream = "{self.upstream.url("/")}"\nindex_ttl = "1s"\n',
        )
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        target = Target(self.proxy.url("").rstrip("/"), {r.name: r for r in BUILTIN_ROUTES})
        self.gemrc = os.path.join(self.work, "gemrc")
        with open(self.gemrc, "w") as f:
            f.write(gem(target).text)
        # bundler's snippet, for the Gemfile's source instead of rubygems.org's.
        self.bundle_config = os.path.join(self.work, "bundle-config")
        with open(self.bundle_config, "w") as f:
            f.write(
                bundler(target).text.replace(
                    "HTTPS://RUBYGEMS__ORG/", "HTTP://RUBYGEMS__PKGPROXY__TEST/"
                )
            )
        self.app = os.path.join(self.work, "app")
        os.makedirs(self.app)
        with open(os.path.join(self.app, "Gemfile"), "w") as f:
            f.write(f'source "{SOURCE}"\n\ngem "{APP.name}"\n')
        self.homes = 0

    def _home(self) -> str:
        self.homes += 1
        home = os.path.join(self.work, f"home{self.homes}")
        os.makedirs(home)
        return home

    def run_tool(
        self, argv: list[str], home: str | None = None, ok: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the app directory with fresh (or the given) home and gem dirs."""
        home = home or self._home()
        env = {k: v for k, v in clean_env().items() if not k.startswith(("GEM", "BUNDLE", "RUBY"))}
        env.update(
            {
                "HOME": home,
                "GEMRC": self.gemrc,
                "GEM_HOME": os.path.join(home, "gems"),
                "GEM_PATH": os.path.join(home, "gems"),
                "GEM_SPEC_CACHE": os.path.join(home, "specs"),
                "BUNDLE_USER_CONFIG": self.bundle_config,
                "BUNDLE_USER_HOME": os.path.join(home, "bundle"),
                "BUNDLE_APP_CONFIG": os.path.join(home, "app-config"),
                "BUNDLE_PATH": os.path.join(home, "vendor"),
                "BUNDLE_GEMFILE": os.path.join(self.app, "Gemfile"),
            }
        )
        result = subprocess.run(
            argv, cwd=self.app, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
        if ok and result.returncode != 0:
            self.fail(
                f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}\n"
                f"{result.stderr}\n{self.proxy.logs()}"
            )
        return result

    def _gem_installs(self, name: str, version: str, home: str | None = None) -> None:
        home = home or self._home()
        self.run_tool(["gem", "install", "--no-document", name], home)
        self.assertTrue(
            os.path.isdir(os.path.join(home, "gems", "gems", f"{name}-{version}")),
            self.proxy.logs(),
        )

    def _locked(self) -> str:
        with open(os.path.join(self.app, "Gemfile.lock")) as f:
            return f.read()

    def _upstream_gets(self, path: str) -> int:
        with open(self.upstream.output_path, encoding="utf-8", errors="replace") as f:
            return f.read().count(f'"GET {path} ')

    def test_install_warm_new_version_offline(self) -> None:
        """gem install and bundle install, cold and warm; a new version seen after the
        TTL (bundler through a Range on versions); then the same from the cache alone."""
        self._gem_installs(APP.name, APP.version)
        self.assertTrue(os.path.exists(os.path.join(self.root, "versions")))
        bundle_home = self._home()
        self.run_tool(["bundle", "install"], bundle_home)
        self.assertIn(f"{DEP.name} ({DEP.version})", self._locked())
        self.assertIn(f"remote: {SOURCE}", self._locked())

        # Warm: other machines, the lockfile given; every .gem fetched upstream once.
        self.run_tool(["bundle", "install"])
        self._gem_installs(APP.name, APP.version)
        self.assertEqual(self._upstream_gets(f"/gems/{DEP.filename}"), 1)

        # A new version, published by appending to versions, once the indexes are past
        # their TTL (and a second later: the upstream's Last-Modified has 1 s steps).
        time.sleep(1.2)
        gemrepo.write_repo(self.root, [APP, DEP, DEP_NEXT])
        self._gem_installs(DEP.name, DEP_NEXT.version)
        self.run_tool(["bundle", "update", DEP.name], bundle_home)
        self.assertIn(f"{DEP.name} ({DEP_NEXT.version})", self._locked())
        # bundler asked for the end of versions (a part of the cached copy, or the
        # whole while it was being fetched again), and took it the first time.
        log = self.proxy.logs()
        self.assertRegex(log, r'"GET /rubygems/versions" (?:206|200) \d+ MISS .*command/update')
        self.assertNotRegex(log, r'"GET /rubygems/versions" 200 \d+ COALESCED')

        # Offline: the upstream stopped and every index expired.
        self.upstream.stop()
        time.sleep(1.2)
        self._gem_installs(APP.name, APP.version)
        self.run_tool(["bundle", "install"])
        self.run_tool(["bundle", "update", DEP.name], bundle_home)
        self.assertIn(f"{DEP.name} ({DEP_NEXT.version})", self._locked())

    def test_corrupt_gem_refused(self) -> None:
        """A .gem that is not what the cached info/<gem> says never reaches the client
        complete, and is not kept; once the upstream has the right one, it installs."""
        self.assertEqual(_get(self.proxy.port, f"/rubygems/info/{DEP.name}"), 200)
        path = os.path.join(self.root, "gems", DEP.filename)
        with open(path, "wb") as f:
            f.write(DEP_NEXT.gem)
        result = self.run_tool(["gem", "install", "--no-document", DEP.name], ok=False)
        self.assertNotEqual(result.returncode, 0, result.stdout)
        self.assertIn("sha256 mismatch", self.proxy.logs())
        # The metrics count the refusal under the family.
        metrics = self.proxy.metrics().decode()
        self.assertRegex(
            metrics, r'pkgproxy_verification_failures_total{[^}]*family="rubygems"[^}]*} [1-9]'
        )
        self.assertEqual(_get(self.proxy.port, f"/rubygems/gems/{DEP.filename}"), 0)
        with open(path, "wb") as f:
            f.write(DEP.gem)
        self._gem_installs(DEP.name, DEP.version)

    def test_full_index_only(self) -> None:
        """A mirror made with ``gem generate_index`` alone: bundler finds no compact index
        and no dependency API, and installs from specs.4.8.gz and quick/Marshal.4.8
        through pkgproxy; then again with the mirror stopped."""
        root = os.path.abspath(self.mktemp())
        gemrepo.write_repo(root, [APP, DEP], compact=False)
        self.upstream.stop()
        self.upstream = start_static_server(self, root, port=self.upstream.port)
        self.run_tool(["bundle", "install"])
        self.assertIn(f"{DEP.name} ({DEP.version})", self._locked())
        log = self.proxy.logs()
        self.assertRegex(log, r'"GET /rubygems/api/v1/dependencies[^"]*" 404 ')
        self.assertRegex(log, r'"GET /rubygems/specs.4.8.gz" 200 ')
        self.upstream.stop()
        time.sleep(1.2)
        self.run_tool(["bundle", "install"])
