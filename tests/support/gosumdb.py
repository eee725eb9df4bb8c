"""A stand-in for proxy.golang.org with its checksum database, on 127.0.0.1.

Why: with its defaults, ``go`` checks every module it downloads against sum.golang.org,
asked through the module proxy (``<GOPROXY>/sumdb/sum.golang.org/...``). Only a real
checksum database shows that ``go`` accepts what pkgproxy relays and caches: signed tree
heads, hash tiles and lookups. This one is golang.org/x/mod's own ``sumdb.TestServer``
behind ``sumdb.NewServer``, built from the copy of golang.org/x/mod that the Go toolchain
vendors (``$GOROOT/src/cmd/vendor``), so nothing is downloaded. It signs with a key made
at start; ``go`` is told its verifier key through ``GOSUMDB=<name>+<key>``.

The same server is the module proxy: it serves a GOPROXY tree (tests/support/goproxy.py)
from its root, and answers each lookup with the go.sum lines written by
:func:`write_sums`. Every request is logged as ``GET <path>``, one line each.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.support.goproxy import GoModule
from tests.support.procs import (
    HOST,
    ServerProcess,
    _fail_start,
    _wait_tcp,
    clean_env,
    free_port,
)

#: The stand-in: ``standin <addr> <root> <name> <key file>``.
SOURCE = """package main

import (
	"crypto/rand"
	"fmt"
	"log"
	"net/http"
	"os"
	"path/filepath"

	"golang.org/x/mod/sumdb"
	"golang.org/x/mod/sumdb/note"
)

func main() {
	addr, root, name, keyFile := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
	signer, verifier, err := note.GenerateKey(rand.Reader, name)
	if err != nil {
		log.Fatal(err)
	}
	gosum := func(path, vers string) ([]byte, error) {
		return os.ReadFile(filepath.Join(root, "sums", path+"@"+vers))
	}
	db := sumdb.NewServer(sumdb.NewTestServer(signer, gosum))
	prefix := "/sumdb/" + name
	mux := http.NewServeMux()
	mux.HandleFunc(prefix+"/supported", func(w http.ResponseWriter, r *http.Request) {})
	mux.Handle(prefix+"/", http.StripPrefix(prefix, db))
	mux.Handle("/", http.FileServer(http.Dir(root)))
	logged := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Printf("%s %s\\n", r.Method, r.URL.Path)
		mux.ServeHTTP(w, r)
	})
	if err := os.WriteFile(keyFile, []byte(verifier), 0o644); err != nil {
		log.Fatal(err)
	}
	log.Fatal(http.ListenAndServe(addr, logged))
}
"""

_built: str | None = None


def _vendored() -> tuple[str, str]:
    """The Go toolchain's vendor directory and the ``modules.txt`` sections of
    golang.org/x/mod and golang.org/x/crypto in it; SkipTest where it has none."""
    goroot = subprocess.run(
        ["go", "env", "GOROOT"], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    vendor = os.path.join(goroot, "src", "cmd", "vendor")
    try:
        with open(os.path.join(vendor, "modules.txt"), encoding="utf-8") as f:
            listing = f.read()
    except OSError:
        raise SkipTest(f"the Go toolchain at {goroot} vendors no golang.org/x/mod") from None
    sections = re.findall(r"^# golang\.org/x/(?:mod|crypto) .*?(?=^# |\Z)", listing, re.M | re.S)
    if len(sections) != 2 or "golang.org/x/mod/sumdb/note" not in listing:
        raise SkipTest(f"the Go toolchain at {goroot} vendors no golang.org/x/mod/sumdb")
    return vendor, "".join(sections)


def build() -> str:
    """The stand-in's binary, built once per test process (offline, ``-mod=vendor``)."""
    global _built
    if _built is not None and os.path.exists(_built):
        return _built
    if shutil.which("go") is None:
        raise SkipTest("needs go (Debian's golang-go)")
    vendor, modules = _vendored()
    work = tempfile.mkdtemp(prefix="pkgproxy-gosumdb-")
    for name in ("mod", "crypto"):
        shutil.copytree(
            os.path.join(vendor, "golang.org", "x", name),
            os.path.join(work, "vendor", "golang.org", "x", name),
        )
    with open(os.path.join(work, "vendor", "modules.txt"), "w", encoding="utf-8") as f:
        f.write(modules)
    requires = re.findall(r"^# (golang\.org/x/\w+) (\S+)", modules, re.M)
    with open(os.path.join(work, "go.mod"), "w", encoding="utf-8") as f:
        f.write("module standin\n\ngo 1.17\n\nrequire (\n")
        f.writelines(f"\t{path} {version}\n" for path, version in requires)
        f.write(")\n")
    with open(os.path.join(work, "main.go"), "w", encoding="utf-8") as f:
        f.write(SOURCE)
    env = {k: v for k, v in clean_env().items() if not k.startswith(("GO", "CGO"))}
    env.update(
        GOFLAGS="-mod=vendor",
        GOPROXY="off",
        GOTOOLCHAIN="local",
        CGO_ENABLED="0",
        GOCACHE=os.path.join(work, "gocache"),
        GOPATH=os.path.join(work, "gopath"),
        HOME=work,
    )
    out = subprocess.run(
        ["go", "build", "-o", "standin", "."],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError(f"building the checksum database stand-in failed:\n{out.stderr}")
    fd, binary = tempfile.mkstemp(prefix="pkgproxy-gosumdb-")
    os.close(fd)
    os.replace(os.path.join(work, "standin"), binary)
    shutil.rmtree(work, ignore_errors=True)
    atexit.register(os.unlink, binary)
    _built = binary
    return _built


def write_sums(root: str, modules: Iterable[GoModule]) -> None:
    """The go.sum lines the checksum database gives for each of ``modules``."""
    for m in modules:
        path = os.path.join(root, "sums", f"{m.path}@{m.version}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"{m.path} {m.version} {m.h1}\n{m.path} {m.version}/go.mod {m.mod_h1}\n")


class SumdbProxy(ServerProcess):
    """The running stand-in; :attr:`verifier` is its checksum database's key."""

    verifier = ""

    def requests(self, prefix: str) -> list[str]:
        """The paths asked for that start with ``prefix``, in order."""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return [
                line.split(" ", 1)[1]
                for line in f.read().splitlines()
                if line.startswith("GET ") and line[4:].startswith(prefix)
            ]


def start_sumdb_proxy(
    testcase: SynchronousTestCase, root: str, name: str = "sum.golang.org", timeout: float = 10.0
) -> SumdbProxy:
    """Serve the GOPROXY tree ``root`` and a checksum database ``name`` until the test ends."""
    binary = build()
    logs = os.path.abspath(testcase.mktemp())
    os.makedirs(logs)
    key = os.path.join(logs, "verifier")
    port = free_port()
    server = SumdbProxy(
        "gosumdb",
        [binary, f"{HOST}:{port}", root, name, key],
        port,
        os.path.join(logs, "gosumdb.log"),
        clean_env(),
    )
    testcase.addCleanup(server.stop)
    error = _wait_tcp(server, timeout)
    if error:
        _fail_start(testcase, server, error)
    deadline = time.monotonic() + timeout
    while not os.path.exists(key) and time.monotonic() < deadline:
        time.sleep(0.05)  # written before it listens: present once the port is open
    with open(key, encoding="utf-8") as f:
        server.verifier = f.read()
    return server
