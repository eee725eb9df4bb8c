"""The real ``go`` command through a real pkgproxy, against a GOPROXY tree on 127.0.0.1.

Why this test exists: the unit tests show pkgproxy does what we read the protocol to
say; only ``go`` can show that ``go`` accepts it: case-encoded paths, the version list,
the zip layout and its ``h1:`` (``go`` writes its own into go.sum, which must equal the
one pkgproxy's hasher computes), and how ``go`` reports a download pkgproxy cuts short.
The upstream is ``python3 -m http.server`` over a tree the test writes
(tests/support/goproxy.py). ``go`` runs with its environment file made by
``pkgproxy-config go``, the checksum database off (the modules are the test's own) and
every cache in temporary directories.
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import time

from twisted.trial.unittest import SkipTest, TestCase

from pkgproxy.clientconfig import Target, go
from pkgproxy.config import BUILTIN_ROUTES
from tests.support import goproxy, gosumdb
from tests.support.goproxy import LIB, LIB_NEXT, UPPER, GoModule
from tests.support.procs import (
    HOST,
    ServerProcess,
    clean_env,
    start_pkgproxy,
    start_static_server,
)

GO_TIMEOUT = 180.0

MAIN = """package main

import (
	"fmt"

	"pkgproxy.test/Upper"
	"pkgproxy.test/lib"
)

func main() { fmt.Println(lib.Name(), "/", upper.Name()) }
"""


#: Writes a zip of (name, file) argument pairs to stdout with archive/zip's Create.
ZIPPER = """package main

import (
	"archive/zip"
	"os"
)

func main() {
	w := zip.NewWriter(os.Stdout)
	for i := 1; i+1 < len(os.Args); i += 2 {
		f, err := w.Create(os.Args[i])
		if err != nil {
			panic(err)
		}
		data, err := os.ReadFile(os.Args[i+1])
		if err != nil {
			panic(err)
		}
		if _, err := f.Write(data); err != nil {
			panic(err)
		}
	}
	if err := w.Close(); err != nil {
		panic(err)
	}
}
"""


def _get(port: int, path: str) -> tuple[int, str | None, bytes]:
    """Status, X-Cache and body of a GET; status 0 for a connection cut before the end.

    A download is committed just after its client has it: a request at once may still
    join it (COALESCED), so that is asked again for a while.
    """
    deadline = time.monotonic() + 10
    while True:
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            answer = resp.status, resp.headers.get("X-Cache"), resp.read()
        except (OSError, http.client.HTTPException):
            return 0, None, b""
        finally:
            conn.close()
        if answer[1] != "COALESCED" or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)


class _GoCase(TestCase):
    """An application, a GOPROXY tree upstream, pkgproxy, and ``go`` run against it."""

    #: ``GOSUMDB`` as go is given it (``off``: the modules are the test's own).
    gosumdb = "off"

    def start_upstream(self) -> ServerProcess:
        """The upstream serving :attr:`root`."""
        return start_static_server(self, self.root)

    def setUp(self) -> None:
        if shutil.which("go") is None:
            raise SkipTest("needs go (Debian's golang-go)")
        self.root = os.path.abspath(self.mktemp())
        goproxy.write_tree(self.root, [LIB, UPPER])
        self.upstream = self.start_upstream()
        self.proxy = start_pkgproxy(
            self, f'[routes.go]\nupstream = "{self.upstream.url("/")}"\nindex_ttl = "1s"\n'
        )
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        # The environment file pkgproxy-config writes, as go reads it (GOENV).
        snippet = go(Target(self.proxy.url("").rstrip("/"), {r.name: r for r in BUILTIN_ROUTES}))
        self.goenv = os.path.join(self.work, "goenv")
        with open(self.goenv, "w") as f:
            f.write(snippet.text)
        self.app = os.path.join(self.work, "app")
        os.makedirs(self.app)
        self._write_app(LIB.version)
        self.caches = 0

    def _write_app(self, lib_version: str) -> None:
        with open(os.path.join(self.app, "go.mod"), "w") as f:
            f.write(
                "module pkgproxy.test/app\n\ngo 1.19\n\nrequire (\n"
                f"\tpkgproxy.test/Upper {UPPER.version}\n\tpkgproxy.test/lib {lib_version}\n)\n"
            )
        with open(os.path.join(self.app, "main.go"), "w") as f:
            f.write(MAIN)

    def _env(self) -> dict[str, str]:
        """A fresh module cache each time: every module comes through pkgproxy."""
        self.caches += 1
        home = os.path.join(self.work, f"home{self.caches}")
        os.makedirs(home)
        env = {k: v for k, v in clean_env().items() if not k.startswith(("GO", "CGO", "XDG_"))}
        if self.gosumdb == "off":
            env["GONOSUMDB"] = "pkgproxy.test"
        env.update(
            {
                "HOME": home,
                "GOENV": self.goenv,
                "GOFLAGS": "-mod=mod",
                "GOSUMDB": self.gosumdb,
                "GOTOOLCHAIN": "local",
                "GO111MODULE": "on",
                "GOPATH": os.path.join(home, "gopath"),
                "GOMODCACHE": os.path.join(home, "modcache"),
                "GOCACHE": os.path.join(home, "gocache"),
                "CGO_ENABLED": "0",
            }
        )
        return env

    def go(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["go", *args],
            cwd=self.app,
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=GO_TIMEOUT,
        )
        if ok and result.returncode != 0:
            self.fail(
                f"go {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n"
                f"{result.stderr}\n{self.proxy.logs()}"
            )
        return result

    def _run_app(self) -> str:
        self.go("build", "-o", "app", ".")
        return subprocess.run(
            [os.path.join(self.app, "app")], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    def _upstream_gets(self, path: str) -> int:
        with open(self.upstream.output_path, encoding="utf-8", errors="replace") as f:
            return f.read().count(f'"GET {path} ')


class GoThroughPkgproxyTests(_GoCase):
    """``go build`` of a module with dependencies: cold, warm, a new version, offline;
    and a zip that does not match the hash a lookup gave, refused."""

    def test_build_warm_new_version_offline(self) -> None:
        """Cold and warm builds; go's go.sum hashes are pkgproxy's; a published version
        is seen after index_ttl; with the upstream stopped the cache alone serves."""
        self.assertEqual(self._run_app(), "lib one / upper")
        with open(os.path.join(self.app, "go.sum")) as f:
            sums = f.read()
        for m in (LIB, UPPER):
            self.assertIn(f"{m.path} {m.version} {m.h1}\n", sums)
            self.assertIn(f"{m.path} {m.version}/go.mod {m.mod_h1}\n", sums)
        zip_path = f"/{UPPER.base()}.zip"
        self.assertEqual(_get(self.proxy.port, "/go" + zip_path)[:2], (200, "HIT"))

        # Warm: a machine with an empty module cache is served from pkgproxy's.
        self.assertEqual(self._run_app(), "lib one / upper")
        self.assertEqual(self._upstream_gets(zip_path), 1)

        # A new version: seen once the list is past its TTL. (Published a second later:
        # the upstream's Last-Modified has one-second steps.)
        versions = self.go("list", "-m", "-versions", LIB.path).stdout.split()
        self.assertEqual(versions, [LIB.path, LIB.version])
        time.sleep(1.2)
        goproxy.write_tree(self.root, [LIB, LIB_NEXT])
        versions = self.go("list", "-m", "-versions", LIB.path).stdout.split()
        self.assertEqual(versions, [LIB.path, LIB.version, LIB_NEXT.version])
        self.go("get", f"{LIB.path}@latest")
        self.assertEqual(self._run_app(), "lib two / upper")

        # Offline: the upstream stopped and every index expired.
        self.upstream.stop()
        time.sleep(1.2)
        self.assertEqual(self._run_app(), "lib two / upper")
        versions = self.go("list", "-m", "-versions", LIB.path).stdout.split()
        self.assertEqual(versions, [LIB.path, LIB.version, LIB_NEXT.version])
        # An unknown version is still "not found" for go, not a proxy failure.
        missing = self.go("mod", "download", f"{LIB.path}@v9.0.0", ok=False)
        self.assertNotEqual(missing.returncode, 0)

    def _go_zip(self, files: dict[str, bytes]) -> bytes:
        """A zip of ``files`` made by Go's archive/zip."""
        src = os.path.join(self.work, "zipper")
        os.makedirs(src)
        argv = []
        for i, (name, data) in enumerate(files.items()):
            with open(os.path.join(src, f"member{i}"), "wb") as f:
                f.write(data)
            argv += [name, os.path.join(src, f"member{i}")]
        with open(os.path.join(src, "zipper.go"), "w") as f:
            f.write(ZIPPER)
        out = subprocess.run(
            ["go", "run", "zipper.go", *argv],
            cwd=src,
            env=self._env(),
            capture_output=True,
            timeout=GO_TIMEOUT,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout[6:8], b"\x08\x00")  # the data descriptor flag
        return out.stdout

    def test_corrupt_zip_refused_when_hash_known(self) -> None:
        """Once a checksum database lookup through pkgproxy gave a version's h1:, a zip
        that does not match it never reaches go complete, and is not kept."""
        lookup = f"sumdb/sum.golang.org/lookup/{UPPER.base().replace('/@v/', '@')}"
        path = os.path.join(self.root, lookup)
        os.makedirs(os.path.dirname(path))
        with open(path, "wb") as f:
            f.write(UPPER.lookup())
        status, _, body = _get(self.proxy.port, f"/go/{lookup}")
        self.assertEqual((status, body), (200, UPPER.lookup()))
        tampered = GoModule(UPPER.path, UPPER.version, says="tampered")
        with open(os.path.join(self.root, UPPER.base() + ".zip"), "wb") as f:
            f.write(tampered.zip)

        result = self.go("mod", "download", f"{UPPER.path}@{UPPER.version}", ok=False)
        self.assertNotEqual(result.returncode, 0, result.stdout)
        self.assertIn("go-h1-zip mismatch", self.proxy.logs())
        # The metrics count the refusal under the family.
        metrics = self.proxy.metrics().decode()
        self.assertRegex(
            metrics, r'pkgproxy_verification_failures_total{[^}]*family="go"[^}]*} [1-9]'
        )
        # Asked again, it is fetched again and cut short again: nothing was kept.
        before = self._upstream_gets(f"/{UPPER.base()}.zip")
        self.assertEqual(_get(self.proxy.port, f"/go/{UPPER.base()}.zip")[0], 0)
        self.assertEqual(self._upstream_gets(f"/{UPPER.base()}.zip"), before + 1)

        # The upstream repaired, with a zip written by Go's own archive/zip (deflated,
        # each member's sizes in a data descriptor after it, as proxy.golang.org's):
        # fetched, its hash computed as it streams, checked, kept.
        with open(os.path.join(self.root, UPPER.base() + ".zip"), "wb") as f:
            f.write(self._go_zip(UPPER.files))
        result = self.go("mod", "download", "-json", f"{UPPER.path}@{UPPER.version}")
        self.assertIn(UPPER.h1, result.stdout)
        self.assertEqual(_get(self.proxy.port, f"/go/{UPPER.base()}.zip")[:2], (200, "HIT"))


class GoChecksumDatabaseTests(_GoCase):
    """``go`` with its checksum database on, asked through pkgproxy as go asks
    proxy.golang.org: a real signed tree (golang.org/x/mod's sumdb.TestServer) behind
    the upstream module proxy (tests/support/gosumdb.py). Its name resolves nowhere, so
    a go that did not use the proxy for it would fail instead of reaching the internet."""

    NAME = "sum.pkgproxy.test"

    def start_upstream(self) -> ServerProcess:
        gosumdb.write_sums(self.root, [LIB, UPPER])
        self.sumdb = gosumdb.start_sumdb_proxy(self, self.root, self.NAME)
        self.gosumdb = self.sumdb.verifier
        return self.sumdb

    def test_verified_cold_then_offline(self) -> None:
        """go verifies both modules against the database through pkgproxy (lookups,
        tiles, the signed tree head) and writes their hashes to go.sum; then, with the
        upstream stopped and every cache of go's empty, it verifies them again from
        pkgproxy's cache alone."""
        self.assertTrue(self.gosumdb.startswith(f"{self.NAME}+"), self.gosumdb)
        self.assertEqual(self._run_app(), "lib one / upper")
        with open(os.path.join(self.app, "go.sum")) as f:
            sums = f.read()
        for m in (LIB, UPPER):
            self.assertIn(f"{m.path} {m.version} {m.h1}\n", sums)
        db = f"/sumdb/{self.NAME}/"
        asked = self.sumdb.requests(db)
        self.assertEqual(
            sorted({p.split("/")[3] for p in asked}), ["lookup", "supported", "tile"], asked
        )
        self.assertIn(f"{db}lookup/{LIB.path}@{LIB.version}", asked)

        self.sumdb.stop()
        time.sleep(1.2)  # past index_ttl: offline, the cached answers must do
        os.unlink(os.path.join(self.app, "go.sum"))
        self.assertEqual(self._run_app(), "lib one / upper")
        with open(self.proxy.log_path, encoding="utf-8") as f:
            log = f.read()
        self.assertEqual(log.count(f'"GET /go/sumdb/{self.NAME}/lookup/{LIB.path}@'), 2, log)

    def test_database_disagreeing_with_the_zip(self) -> None:
        """The database gives another hash than the module's zip has: go refuses the
        module, and pkgproxy, told the hash by the lookup it relayed, keeps no zip."""
        tampered = GoModule(LIB.path, LIB.version, says="tampered")
        with open(os.path.join(self.root, LIB.base() + ".zip"), "wb") as f:
            f.write(tampered.zip)
        result = self.go("build", "-o", "app", ".", ok=False)
        self.assertNotEqual(result.returncode, 0, result.stdout)
        self.assertIn("SECURITY ERROR", result.stderr + result.stdout)
        status, _, _ = _get(self.proxy.port, f"/go/{LIB.base()}.zip")
        self.assertNotEqual(status, 200)
