"""The real npm through a real pkgproxy, against a real registry (verdaccio) on 127.0.0.1.

Why this test exists: the unit tests show pkgproxy does what we read the protocol to say;
only npm can show that npm accepts it: the abbreviated packuments, the rewritten tarball
URLs (npm records them in package-lock.json), the integrity checks npm makes itself,
scoped names sent as ``@scope%2fname``, and how npm reports what pkgproxy refuses.
verdaccio (tests/support/npmenv.py) serves packages the test builds
(tests/support/npmrepo.py); npm runs isolated, with a fresh cache each time.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import time

from twisted.trial.unittest import TestCase

from tests.support import npmenv
from tests.support.npmenv import IsolatedNpm, NpmResult
from tests.support.npmrepo import APP, DEP, DEP_NEXT, SCOPED
from tests.support.procs import HOST, start_pkgproxy

NPM_TIMEOUT = 60.0
#: A host name that cannot resolve: should npm ever bypass the proxy in forward mode, it
#: fails at once instead of reaching a public registry.
FORWARD_HOST = "registry.npmjs.test"


def _request(
    port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, http.client.HTTPMessage, bytes, float]:
    """One request to 127.0.0.1:``port``: status, headers, body and seconds taken."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read(), time.monotonic() - started
    finally:
        conn.close()


def _cached(port: int, path: str) -> tuple[int, str | None]:
    """Status and X-Cache of a GET for something a client just downloaded: its commit
    follows the download, so a request at once may still join it (COALESCED)."""
    deadline = time.monotonic() + 10
    while True:
        status, headers, _, _ = _request(port, "GET", path)
        x_cache = headers.get("X-Cache")
        if x_cache != "COALESCED" or time.monotonic() > deadline:
            return status, x_cache
        time.sleep(0.05)


class NpmThroughPkgproxyTests(TestCase):
    """npm install through pkgproxy's npm route, then again with the registry stopped."""

    def setUp(self) -> None:
        self.registry = npmenv.start_fixture_registry(self)
        # A short TTL, so that the second install finds every packument expired and
        # pkgproxy must serve it stale while the registry is down.
        self.proxy = start_pkgproxy(
            self,
            f'[routes.npm]\nupstream = "{self.registry.url("/")}"\nindex_ttl = "1s"\n'
            f'forward = ["http://{FORWARD_HOST}/"]\n',
        )
        self.npm = IsolatedNpm(self.mktemp(), self.proxy.url("/npm/"))

    def _context(self) -> str:
        """Logs of pkgproxy and verdaccio, for failure messages."""
        return f"{self.proxy.logs()}\n{self.registry.logs()}"

    def _ok(self, result: NpmResult) -> NpmResult:
        """Fail with npm's output and both logs unless npm succeeded in time."""
        if result.timed_out or result.returncode != 0:
            self.fail(f"npm failed:\n{result.report()}\n{self._context()}")
        return result

    def _installed(self, npm: IsolatedNpm, want_resolved_prefix: str) -> None:
        """The right versions are installed, each runs, and the lockfile names pkgproxy."""
        modules = os.path.join(npm.project, "node_modules")
        for p in (APP, DEP, SCOPED):
            with open(os.path.join(modules, *p.name.split("/"), "package.json")) as f:
                self.assertEqual(json.load(f)["version"], p.version, p.name)
        out = subprocess.run(
            ["node", "-e", f"console.log(require({json.dumps(SCOPED.name)}))"],
            cwd=npm.project,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        self.assertEqual(out, f"{SCOPED.name}@{SCOPED.version}")
        with open(os.path.join(npm.project, "package-lock.json")) as f:
            lock = json.load(f)["packages"]
        for p in (APP, DEP, SCOPED):
            entry = lock[f"node_modules/{p.name}"]
            self.assertEqual(entry["resolved"], want_resolved_prefix + p.tarball_path, p.name)
            self.assertEqual(entry["integrity"], p.integrity, p.name)

    def test_install_then_offline(self) -> None:
        """A dependency chain and a scoped package install through pkgproxy, with npm's
        audit on (relayed to the registry, uncached); then, registry stopped and npm's
        cache empty, the
        same install is served by pkgproxy alone (packuments stale, tarballs cached)."""
        self.npm.write_package_json({APP.name: "^1.0.0", SCOPED.name: SCOPED.version})
        result = self._ok(self.npm.run(["install", "--audit=true"], timeout=NPM_TIMEOUT))
        self._installed(self.npm, self.proxy.url("/npm/"))
        # The audit POST went on to the registry (whatever it answered), not refused.
        self.assertRegex(
            self.proxy.logs(), r'"POST /npm/-/npm/v1/security/[^"]+" (?!405)\d{3} .* route=npm'
        )
        self.assertEqual(
            _cached(self.proxy.port, f"/npm/{DEP.tarball_path}"), (200, "HIT"), result.output
        )

        self.registry.stop()
        time.sleep(1.2)  # every packument is now past its TTL
        self.npm.wipe_install()
        self.npm.new_cache()
        self._ok(self.npm.run(["install", "--audit=false"], timeout=NPM_TIMEOUT))
        self._installed(self.npm, self.proxy.url("/npm/"))
        # npm (11) asked for the full documents, scoped as @scope%2fname; the entries are
        # found by the raw-slash spelling too, and served stale.
        for path in (f"/npm/{APP.name}", "/npm/@pkgproxy-fixture/scoped"):
            status, headers, body, _ = _request(
                self.proxy.port, "GET", path, {"Accept": "application/json"}
            )
            self.assertEqual((status, headers.get("X-Cache")), (200, "STALE"), f"{path}: {body!r}")
        self._ok(self.npm.run(["ping"], timeout=NPM_TIMEOUT))

    def test_full_packument_for_npm_view(self) -> None:
        """npm view asks for the full document, a variant of its own: its readme (absent
        from the abbreviated form) and the rewritten tarball URL of the latest version."""
        result = self._ok(self.npm.run(["view", DEP.name, "--json"], timeout=NPM_TIMEOUT))
        view = json.loads(result.output[result.output.index("{") :])
        self.assertEqual(view["version"], DEP_NEXT.version)
        self.assertEqual(view["dist"]["tarball"], self.proxy.url(f"/npm/{DEP_NEXT.tarball_path}"))
        result = self._ok(self.npm.run(["view", DEP.name, "readme"], timeout=NPM_TIMEOUT))
        self.assertIn("ünïcödé", result.output)

    def test_writes_are_refused(self) -> None:
        """npm publish fails at once with npm's E405; login, adduser, dist-tag and
        unpublish are refused with 405 and a one-line reason, fast. The audit endpoints
        are relayed to the registry instead (see test_install_then_offline)."""
        package = os.path.join(self.npm.root, "to-publish")
        os.makedirs(package)
        with open(os.path.join(package, "package.json"), "w") as f:
            json.dump({"name": "pkgproxy-fixture-published", "version": "1.0.0"}, f)
        registry = self.proxy.url("/npm/")
        with open(self.npm.userconfig, "w") as f:
            f.write(f"//{registry.split('://', 1)[1]}:_authToken=not-a-real-token\n")
        result = self.npm.run(["publish"], timeout=NPM_TIMEOUT, cwd=package)
        self.assertNotEqual(result.returncode, 0, result.report())
        self.assertIn("E405", result.output, result.report())
        self.assertLess(result.seconds, 30, result.report())

        for method, path in (
            ("PUT", "/npm/-/user/org.couchdb.user:someone"),  # adduser, legacy login
            ("POST", "/npm/-/v1/login"),  # web login
            ("PUT", f"/npm/{APP.name}"),  # publish
            ("PUT", f"/npm/-/package/{APP.name}/dist-tags/beta"),  # dist-tag add
            ("DELETE", f"/npm/-/package/{APP.name}/dist-tags/beta"),  # dist-tag rm
            ("DELETE", f"/npm/{APP.name}/-rev/1-0000000000000001"),  # unpublish
        ):
            status, headers, body, seconds = _request(
                self.proxy.port, method, path, {"Content-Type": "application/json"}, b"{}"
            )
            self.assertEqual(status, 405, (method, path))
            self.assertEqual(headers.get("Allow"), "GET, HEAD")
            text = body.decode()
            self.assertEqual(len(text.splitlines()), 1, text)
            self.assertIn(method, text)
            self.assertLess(seconds, 1.0)
        status, _, body, _ = _request(self.proxy.port, "GET", "/npm/-/whoami")
        self.assertEqual(status, 403, body)

    def test_forward_mode(self) -> None:
        """npm keeps its http:// registry and uses pkgproxy as its HTTP proxy: packuments
        and tarballs both come through pkgproxy, and are cached."""
        npm = IsolatedNpm(self.mktemp(), f"http://{FORWARD_HOST}/", proxy=self.proxy.url("/"))
        npm.write_package_json({APP.name: "^1.0.0", SCOPED.name: SCOPED.version})
        self._ok(npm.run(["install", "--audit=false"], timeout=NPM_TIMEOUT))
        self._installed(npm, f"http://{FORWARD_HOST}/")
        self.assertEqual(_cached(self.proxy.port, f"/npm/{DEP.tarball_path}"), (200, "HIT"))

    def test_https_registry_through_intercepting_proxy(self) -> None:
        """npm with an ``https://`` registry and pkgproxy as its HTTPS proxy, trusting
        pkgproxy's CA; then, registry stopped and npm's cache empty, again from the cache."""
        tls_proxy = start_pkgproxy(
            self,
            "[tls_intercept]\nenabled = true\n"
            f'[routes.npm]\nupstream = "{self.registry.url("/")}"\nindex_ttl = "1s"\n'
            f'forward = ["https://{FORWARD_HOST}/"]\n',
        )
        ca = os.path.join(tls_proxy.cache_dir, "tls", "ca.crt")
        npm = IsolatedNpm(self.mktemp(), f"https://{FORWARD_HOST}/")
        npm.write_package_json({APP.name: "^1.0.0", SCOPED.name: SCOPED.version})
        tls = ["--https-proxy", tls_proxy.url("/"), "--cafile", ca, "--audit=false"]
        self._ok(npm.run(["install", *tls], timeout=NPM_TIMEOUT))
        self._installed(npm, f"https://{FORWARD_HOST}/")
        self.registry.stop()
        time.sleep(1.2)
        npm.wipe_install()
        npm.new_cache()
        self._ok(npm.run(["install", *tls], timeout=NPM_TIMEOUT))
        self._installed(npm, f"https://{FORWARD_HOST}/")
        self.assertIn(f'"CONNECT {FORWARD_HOST}:443"', tls_proxy.logs())
