"""Build a tiny RPM repository (noarch rpms, createrepo_c metadata) for end-to-end tests.

The packages are real rpms made by ``rpmbuild`` from a generated spec: one file each, with
a deterministic payload derived from the name (incompressible, so a ``payload_size`` of a
few MiB makes a large rpm), gzip level 0 payload compression so building stays fast.
``createrepo_c`` writes ``repodata/`` with content-addressed metadata names, compressed
with ``compress`` (gz, xz, bz2, or zstd recompressed here from gz), and ``--revision`` set
explicitly, so a republished repository is always newer than the one before it.

Layout (serve :attr:`RpmRepo.serve_dir`; the repository root is then ``/<mount>/``)::

    <base>/www/<mount>/repodata/repomd.xml
    <base>/www/<mount>/Packages/<name>-<version>-1.noarch.rpm

``repodata/repomd.xml.asc`` is signed with a throwaway key (:attr:`RpmRepo.public_key`)
at every publication, so dnf can run with ``repo_gpgcheck=1``.

Tools: ``rpmbuild`` (Debian's ``rpm``), ``createrepo_c`` (``createrepo-c``), ``gpg``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import zstandard

from tests.support.debrepo import _fingerprint, _GnuPG

REQUIRED_TOOLS = ("rpmbuild", "createrepo_c", "dnf", "gpg")

#: The revision of the first publication; each republication adds one.
FIRST_REVISION = 1700000000


@dataclass(frozen=True)
class RpmSpec:
    """One test package: ``payload_size`` bytes of incompressible data in one file."""

    name: str
    version: str = "1.0"
    payload_size: int = 64


@dataclass(frozen=True)
class BuiltRpm:
    """One published rpm."""

    name: str
    path: str  # relative to the repository root: Packages/<file>
    local: str  # where it is on disk, under serve_dir

    @property
    def basename(self) -> str:
        return os.path.basename(self.path)

    def data(self) -> bytes:
        with open(self.local, "rb") as f:
            return f.read()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data()).hexdigest()


@dataclass
class RpmRepo:
    """A built repository; :func:`republish` adds packages to it."""

    base_dir: str
    serve_dir: str
    mount: str
    compress: str
    packages: list[BuiltRpm]
    revision: int = FIRST_REVISION
    #: The armoured public key that signs ``repodata/repomd.xml.asc`` (``gpgkey=file://``).
    public_key: str = ""

    @property
    def root(self) -> str:
        """The repository root directory (holds ``repodata/``)."""
        return os.path.join(self.serve_dir, self.mount)

    def package(self, name: str) -> BuiltRpm:
        for p in self.packages:
            if p.name == name:
                return p
        raise KeyError(name)


def missing_tools(tools: Iterable[str] = REQUIRED_TOOLS) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def _run(argv: Sequence[str], cwd: str | None = None) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({done.returncode}):\n"
            f"{done.stdout.decode(errors='replace')}{done.stderr.decode(errors='replace')}"
        )


def _payload(name: str, size: int) -> bytes:
    out = bytearray()
    block = hashlib.sha256(name.encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


_SPEC = """\
Name: {name}
Version: {version}
Release: 1
Summary: pkgproxy end-to-end test package {name}
License: MIT
BuildArch: noarch
%description
pkgproxy end-to-end test package.
%install
mkdir -p %{{buildroot}}/usr/share/{name}
cp {payload} %{{buildroot}}/usr/share/{name}/data
%files
/usr/share/{name}/data
"""


def _build_rpm(spec: RpmSpec, scratch: str, dest: str) -> str:
    payload = os.path.join(scratch, f"{spec.name}.payload")
    with open(payload, "wb") as f:
        f.write(_payload(spec.name, spec.payload_size))
    spec_path = os.path.join(scratch, f"{spec.name}.spec")
    with open(spec_path, "w", encoding="utf-8") as f:
        f.write(_SPEC.format(name=spec.name, version=spec.version, payload=payload))
    topdir = os.path.join(scratch, "top")
    _run(
        [
            "rpmbuild", "--quiet", "-bb", spec_path,
            "--define", f"_topdir {topdir}",
            "--define", "_binary_payload w0.gzdio",
            "--define", "__os_install_post %{nil}",
            "--define", "_build_id_links none",
            "--define", "source_date_epoch_from_changelog 0",
        ]
    )  # fmt: skip
    name = f"{spec.name}-{spec.version}-1.noarch.rpm"
    built = os.path.join(topdir, "RPMS", "noarch", name)
    shutil.move(built, os.path.join(dest, name))
    return name


def _zstd(repodata: str) -> None:
    """Recompress the gzip metadata to zstd, as Fedora publishes it (createrepo_c 0.17 in
    Debian 12 cannot), renaming each file by its new checksum and fixing repomd.xml."""
    repomd_path = os.path.join(repodata, "repomd.xml")
    with open(repomd_path, encoding="utf-8") as f:
        repomd = f.read()
    for name in os.listdir(repodata):
        if not name.endswith(".xml.gz"):
            continue
        with gzip.open(os.path.join(repodata, name), "rb") as f:
            data = zstandard.ZstdCompressor().compress(f.read())
        digest = hashlib.sha256(data).hexdigest()
        new = f"{digest}-{name.split('-', 1)[1][: -len('.gz')]}.zst"
        with open(os.path.join(repodata, new), "wb") as f:
            f.write(data)
        os.remove(os.path.join(repodata, name))
        start = repomd.index(f'<location href="repodata/{name}"/>')
        begin, end = repomd.rindex("<data ", 0, start), repomd.index("</data>", start)
        block = repomd[begin:end].replace(name, new).replace(name.split("-", 1)[0], digest)
        block = re.sub(r"<size>\d+</size>", f"<size>{len(data)}</size>", block)
        repomd = repomd[:begin] + block + repomd[end:]
    with open(repomd_path, "w", encoding="utf-8") as f:
        f.write(repomd)


def _createrepo(repo: RpmRepo) -> None:
    _run(
        [
            "createrepo_c", "--quiet", "--no-database",
            "--general-compress-type", "gz" if repo.compress == "zstd" else repo.compress,
            "--revision", str(repo.revision),
            "--retain-old-md", "0",
            repo.root,
        ]
    )  # fmt: skip
    if repo.compress == "zstd":
        _zstd(os.path.join(repo.root, "repodata"))
    _sign(repo)


def _secret_key(repo: RpmRepo) -> str:
    return os.path.join(repo.base_dir, "keys", "secret.asc")


def stop_gpg_agents(dnf_cachedir: str) -> None:
    """Stop the gpg-agent dnf (librepo, through gpgme) leaves running in each repository's
    ``pubring`` under its cachedir after checking ``repo_gpgcheck`` signatures."""
    if not os.path.isdir(dnf_cachedir):
        return
    for entry in os.listdir(dnf_cachedir):
        pubring = os.path.join(dnf_cachedir, entry, "pubring")
        if os.path.isdir(pubring):
            subprocess.run(
                ["gpgconf", "--homedir", pubring, "--kill", "all"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
                check=False,
            )


def _make_key(repo: RpmRepo) -> None:
    """A throwaway signing key, as Fedora's for repomd.xml.asc (the Debian fixture's way)."""
    keys = os.path.join(repo.base_dir, "keys")
    os.makedirs(keys)
    repo.public_key = os.path.join(keys, "public.asc")
    gnupg = _GnuPG()
    try:
        gnupg.gpg("--quick-gen-key", "pkgproxy test rpms <rpm@example.invalid>",
                  "ed25519", "sign", "never")  # fmt: skip
        fingerprint = _fingerprint(gnupg)
        gnupg.gpg("--armor", "--export", fingerprint, stdout_path=repo.public_key)
        gnupg.gpg("--armor", "--export-secret-keys", fingerprint, stdout_path=_secret_key(repo))
    finally:
        gnupg.close()


def _sign(repo: RpmRepo) -> None:
    """``repodata/repomd.xml.asc``: a detached armoured signature of repomd.xml."""
    repomd = os.path.join(repo.root, "repodata", "repomd.xml")
    gnupg = _GnuPG()
    try:
        gnupg.gpg("--import", _secret_key(repo))
        gnupg.gpg("--armor", "--detach-sign", "--output", f"{repomd}.asc", repomd)
    finally:
        gnupg.close()


def _add(repo: RpmRepo, specs: Iterable[RpmSpec]) -> None:
    packages_dir = os.path.join(repo.root, "Packages")
    os.makedirs(packages_dir, exist_ok=True)
    scratch = os.path.join(repo.base_dir, "build")
    os.makedirs(scratch, exist_ok=True)
    for spec in specs:
        name = _build_rpm(spec, scratch, packages_dir)
        repo.packages.append(
            BuiltRpm(spec.name, f"Packages/{name}", os.path.join(packages_dir, name))
        )


def build_rpm_repo(
    base_dir: str, specs: Sequence[RpmSpec], mount: str = "repo", compress: str = "gz"
) -> RpmRepo:
    """Build rpms for ``specs`` and publish them with createrepo_c under ``base_dir``."""
    serve_dir = os.path.join(base_dir, "www")
    repo = RpmRepo(base_dir, serve_dir, mount, compress, [])
    os.makedirs(repo.root)
    _make_key(repo)
    _add(repo, specs)
    _createrepo(repo)
    return repo


def republish(repo: RpmRepo, specs: Sequence[RpmSpec]) -> None:
    """Add packages and publish new metadata with a newer revision (old repodata removed).

    Waits until the second after the old repomd.xml and its signature were written: an
    upstream answering ``If-Modified-Since`` from whole-second mtimes would call the new
    one unmodified, and a signature made in the same second as the old one would not be
    newer than it (the cache orders signatures by their whole-second creation time).
    """
    repodata = os.path.join(repo.root, "repodata")
    written = max(
        os.stat(os.path.join(repodata, name)).st_mtime
        for name in ("repomd.xml", "repomd.xml.asc")
        if os.path.exists(os.path.join(repodata, name))
    )
    wait = int(written) + 1.05 - time.time()
    if wait > 0:
        time.sleep(wait)
    _add(repo, specs)
    repo.revision += 1
    _createrepo(repo)
