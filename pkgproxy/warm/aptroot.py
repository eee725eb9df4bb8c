"""Which ``.deb`` files apt would fetch for a package list, asked of the real ``apt-get``.

apt resolves dependencies; pkgproxy-warm does not write a resolver of its own. An apt
configuration rooted in a temporary directory (none of the machine's sources, state or
``apt.conf.d``, an empty dpkg status) is pointed at the server's Debian route; ``apt-get
update`` reads the indexes through the server (so they are cached too), and ``apt-get
install --print-uris`` lists every file with its size and SHA-256.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass


class AptError(RuntimeError):
    """apt-get is missing or failed; the message is its last error line."""


@dataclass(frozen=True)
class DebFile:
    """One file apt would download: its URL on the server, size, and the digest apt
    prints for it (``hashlib`` name and hex)."""

    url: str
    size: int
    algorithm: str
    digest: str


_URI = re.compile(r"^'([^']+)'\s+(\S+)\s+(\d+)\s+(MD5Sum|SHA1|SHA256|SHA512):([0-9a-f]+)\s*$")
_ALGORITHMS = {"MD5Sum": "md5", "SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}


def parse_print_uris(output: str) -> list[DebFile]:
    """The lines of ``apt-get install --print-uris``: ``'URL' file size ALG:hex`` (apt
    prints one of the index's digests, MD5Sum on Debian's own archives)."""
    files = []
    for line in output.splitlines():
        m = _URI.match(line)
        if m is not None:
            files.append(DebFile(m.group(1), int(m.group(3)), _ALGORITHMS[m.group(4)], m.group(5)))
    return files


def resolve(
    base_url: str,
    suite: str,
    architecture: str,
    packages: Sequence[str],
    *,
    components: Sequence[str] = ("main",),
    keyring: str | None = None,
    user_agent: str = "pkgproxy-warm",
    timeout: float = 300.0,
) -> list[DebFile]:
    """The files apt would fetch to install ``packages`` on an empty system.

    ``base_url`` is the server's URL of the Debian route (``http://cache:3142/debian/``).
    Without ``keyring`` the source is marked trusted: nothing is installed, and apt on each
    client still checks the signature of what the cache serves.
    """
    if shutil.which("apt-get") is None:
        raise AptError(
            "apt-get is not installed: Debian package lists need it to resolve dependencies"
        )
    with tempfile.TemporaryDirectory(prefix="pkgproxy-warm-apt-") as root:
        etc, state, cache = (os.path.join(root, d) for d in ("etc", "state", "cache"))
        for d in (
            os.path.join(etc, "apt.conf.d"),
            os.path.join(etc, "sources.list.d"),
            os.path.join(etc, "trusted.gpg.d"),
            os.path.join(etc, "preferences.d"),
            os.path.join(state, "lists", "partial"),
            os.path.join(cache, "archives", "partial"),
        ):
            os.makedirs(d)
        open(os.path.join(state, "status"), "w").close()
        option = f"signed-by={os.path.abspath(keyring)}" if keyring else "trusted=yes"
        with open(os.path.join(etc, "sources.list"), "w", encoding="utf-8") as f:
            f.write(
                f"deb [arch={architecture} {option}] {base_url} {suite} {' '.join(components)}\n"
            )
        settings = {
            "Dir": f"{root}/",
            "Dir::State": f"{state}/",
            "Dir::State::status": f"{state}/status",
            "Dir::Cache": f"{cache}/",
            "Dir::Etc": f"{etc}/",
            "Dir::Etc::main": f"{etc}/main.conf",
            "Dir::Etc::parts": f"{etc}/apt.conf.d/",
            "Dir::Etc::trustedparts": f"{etc}/trusted.gpg.d/",
            "Dir::Log": f"{root}/",
            "APT::Architecture": architecture,
            "APT::Sandbox::User": "root" if os.geteuid() == 0 else "",
            "Acquire::Languages": "none",
            "Acquire::http::Proxy": "DIRECT",
            "Acquire::http::User-Agent": user_agent,
        }
        conf = os.path.join(etc, "apt.conf")
        with open(conf, "w", encoding="utf-8") as f:
            f.writelines(f'{k} "{v}";\n' for k, v in settings.items() if v)
            f.write(f'APT::Architectures {{ "{architecture}"; }};\n')
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "APT_CONFIG": conf,
            "LC_ALL": "C.UTF-8",
            "DEBIAN_FRONTEND": "noninteractive",
        }
        _run(["apt-get", "-q", "update"], env, root, timeout)
        out = _run(
            ["apt-get", "-qq", "install", "-y", "--print-uris", *packages], env, root, timeout
        )
        return parse_print_uris(out)


def _run(argv: list[str], env: dict[str, str], cwd: str, timeout: float) -> str:
    try:
        done = subprocess.run(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
            timeout=timeout, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise AptError(f"{' '.join(argv[:2])} timed out after {timeout:.0f} s") from None
    out = done.stdout.decode("utf-8", "replace")
    err = done.stderr.decode("utf-8", "replace")
    problems = [line for line in (out + err).splitlines() if line.startswith(("E:", "Err:"))]
    if done.returncode != 0 or problems:
        last = problems[-1] if problems else (err.strip().splitlines() or ["(no output)"])[-1]
        raise AptError(f"{' '.join(argv[:2])} failed: {last}")
    return out
