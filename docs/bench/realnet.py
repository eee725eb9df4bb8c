#!/usr/bin/env python3
"""Real-network cold/warm installs through pkgproxy against going direct (issue 16, item 5).

Times, each with a fresh client cache:

- ``npm install`` of a fixed package set: direct to registry.npmjs.org, then through
  pkgproxy with an empty cache (cold), then again (warm);
- ``pip download`` of a fixed requirement set: direct to pypi.org, then through pkgproxy
  with an empty cache (cold), then again (warm);

and prints TCP connections opened during each run (``nstat`` TcpActiveOpens; for the
runs through pkgproxy also ActiveOpens minus PassiveOpens, i.e. without the clients'
own loopback connections to pkgproxy: the upstream connections pkgproxy opened).

Needs the registries (it is not part of CI), npm, pip and nstat (iproute2). pkgproxy
runs with its default routes; upstream TLS is verified against this machine's CA bundle
(``upstream.ca_bundle``), which is also what npm and pip are given when going direct:
by default pip's configured ``cert`` (``pip config list``), else
/etc/ssl/certs/ca-certificates.crt; override with ``--ca-bundle``.

Run alone on the machine (nstat counts every connection on it):

    python3 docs/bench/realnet.py [--rounds 2] [--ca-bundle FILE] [--port 3142]

The result goes, with its date, into docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

NPM_PACKAGES = {"express": "4.21.1", "lodash": "4.17.21", "react": "18.3.1"}
PIP_REQUIREMENTS = [
    "requests==2.32.3",
    "flask==3.0.3",
    "numpy==2.1.3",
    "rich==13.9.4",
    "pydantic==2.9.2",
]


def ca_bundle_default() -> str:
    """pip's configured ``cert`` (this machine's trust), else Debian's bundle."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.cert"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        out = ""
    return out or os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"


def nstat() -> dict[str, int]:
    """Absolute TCP counters (``nstat -az``, not its since-last-call deltas)."""
    out = subprocess.run(["nstat", "-az", "--json"], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    counters = data.get("kernel", data)
    return {k: int(counters.get(k, 0)) for k in ("TcpActiveOpens", "TcpPassiveOpens")}


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without proxy or pip/npm settings that would change the test."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "proxy", "all_proxy")
        and not k.startswith(("PIP_", "NPM_CONFIG_", "npm_config_"))
    }
    env.update(extra or {})
    return env


def timed(argv: list[str], env: dict[str, str], cwd: str) -> tuple[float, dict[str, int]]:
    """Run ``argv``; ``(wall seconds, counter deltas)``. Fails loudly if it fails."""
    before = nstat()
    start = time.monotonic()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.monotonic() - start
    after = nstat()
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, {k: after[k] - before[k] for k in before}


def npm_install(registry: str, ca: str, work: str) -> tuple[float, dict[str, int]]:
    """A fresh project and npm cache: ``npm install`` of :data:`NPM_PACKAGES`."""
    project = tempfile.mkdtemp(dir=work, prefix="npm-")
    with open(os.path.join(project, "package.json"), "w") as f:
        json.dump({"name": "bench", "version": "1.0.0", "dependencies": NPM_PACKAGES}, f)
    userconfig = os.path.join(project, ".npmrc")
    open(userconfig, "w").close()
    argv = [
        "npm", "install", "--no-audit", "--no-fund", "--no-package-lock",
        "--registry", registry, "--cache", os.path.join(project, "cache"),
        "--userconfig", userconfig, "--cafile", ca, "--replace-registry-host=never",
    ]  # fmt: skip
    return timed(argv, clean_env({"NODE_EXTRA_CA_CERTS": ca}), project)


def pip_download(index: str, ca: str, work: str) -> tuple[float, dict[str, int]]:
    """A fresh destination, no pip cache, no pip config: ``pip download``."""
    dest = tempfile.mkdtemp(dir=work, prefix="pip-")
    argv = [
        sys.executable, "-m", "pip", "--isolated", "download", "--no-cache-dir",
        "--disable-pip-version-check", "--cert", ca, "--index-url", index,
        "--only-binary", ":all:", "--python-version", "3.11", "-d", dest,
        *PIP_REQUIREMENTS,
    ]  # fmt: skip
    return timed(argv, clean_env({"PIP_CONFIG_FILE": os.devnull}), dest)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Pkgproxy:
    """pkgproxy with its default routes, a fresh cache, upstream TLS trusting ``ca``."""

    def __init__(self, ca: str, port: int, work: str) -> None:
        self.dir = tempfile.mkdtemp(dir=work, prefix="pkgproxy-")
        self.port = port
        conf = os.path.join(self.dir, "pkgproxy.toml")
        with open(conf, "w") as f:
            f.write(f'[upstream]\nca_bundle = "{ca}"\n[access_log]\nenabled = false\n')
        argv = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", f"--logfile={os.path.join(self.dir, 'twistd.log')}",
            "pkgproxy", "--config", conf,
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--cache-dir", os.path.join(self.dir, "cache"),
        ]  # fmt: skip
        env = clean_env({"PYTHONPATH": REPO})
        self.proc = subprocess.Popen(argv, env=env, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                url = f"http://127.0.0.1:{port}/_pkgproxy/ready"
                with urllib.request.urlopen(url, timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    sys.exit(f"pkgproxy did not start; see {self.dir}/twistd.log")
                time.sleep(0.2)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def row(name: str, wall: float, counts: dict[str, int], through_proxy: bool) -> str:
    opens = counts["TcpActiveOpens"]
    upstream = opens - counts["TcpPassiveOpens"] if through_proxy else opens
    return f"| {name} | {wall:.1f} | {opens} | {upstream} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="repeats of each cold/warm pair")
    p.add_argument("--ca-bundle", default=None, help="CA bundle the registries' TLS chains to")
    p.add_argument("--port", type=int, default=0, help="pkgproxy's port (default: a free one)")
    args = p.parse_args()
    for tool in ("npm", "nstat"):
        if shutil.which(tool) is None:
            sys.exit(f"needs {tool}")
    ca = args.ca_bundle or ca_bundle_default()
    work = tempfile.mkdtemp(prefix="pkgproxy-realnet-")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CA bundle: {ca}")
    print("| run | wall s | TcpActiveOpens | upstream connections |")
    print("|---|---|---|---|")
    clients = (
        ("npm", npm_install, "https://registry.npmjs.org/", "/npm/"),
        ("pip", pip_download, "https://pypi.org/simple/", "/pypi/simple/"),
    )
    try:
        for name, run, direct, path in clients:
            for n in range(args.rounds):
                wall, counts = run(direct, ca, work)
                print(row(f"{name} direct #{n + 1}", wall, counts, False), flush=True)
                proxy = Pkgproxy(ca, args.port or free_port(), work)
                try:
                    for label in ("cold", "warm"):
                        wall, counts = run(proxy.url(path), ca, work)
                        print(
                            row(f"{name} pkgproxy {label} #{n + 1}", wall, counts, True), flush=True
                        )
                finally:
                    proxy.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
