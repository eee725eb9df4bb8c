"""Build a tiny, signed Debian repository with Debian's own tools, for end-to-end tests.

Why Debian's tools and not hand-written index files: the point of the end-to-end tests is to
prove that a real ``apt-get`` works through pkgproxy, so the fixture must look exactly like what
real archives publish (``dpkg-deb`` packages, ``apt-ftparchive`` indexes, a clear-signed
``InRelease``, a detached ``Release.gpg`` and ``by-hash`` copies). Anything hand-rolled would
only prove that the proxy agrees with our own idea of the format.

The layout mirrors a modern Debian mirror, scaled down::

    <base>/www/<mount>/                         the archive root (serve <base>/www over HTTP)
        dists/<suite>/InRelease, Release, Release.gpg
        dists/<suite>/main/binary-{amd64,all}/Packages{,.gz,.xz}
        dists/<suite>/main/binary-{amd64,all}/by-hash/SHA256/<hex>
        pool/main/<p>/<name>/<name>_<version>_all.deb
    <base>/keys/keyring.gpg                     public key, for ``[signed-by=...]``
    <base>/keys/secret.asc                      throwaway secret key, for re-publishing

Like Debian, the Release files list only SHA256, so apt asks for ``by-hash/SHA256/<hex>``
(apt uses the strongest hash a Release names). The .deb files are bit-for-bit reproducible
(fixed ``SOURCE_DATE_EPOCH``, fixed modes, root ownership); the key and therefore the
signatures are new on every build.

Everything runs in well under a second: an ed25519 key instead of RSA (RSA key generation
can take seconds on an idle VM), gzip-compressed members and a few hundred KiB of payload.
"""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import lzma
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

#: Timestamp for every file inside the .deb packages, so rebuilding yields identical bytes.
SOURCE_DATE_EPOCH = 1700000000

#: Tools this module runs; a test should skip (not fail) when one is missing.
REQUIRED_TOOLS = ("dpkg-deb", "apt-ftparchive", "gpg", "gpgconf")

_TIMEOUT = 60


@dataclass(frozen=True)
class PackageSpec:
    """What to put into one test package.

    ``payload_size`` adds ``/usr/share/<name>/blob.bin`` with that many deterministic,
    incompressible bytes, so a download spans many TCP segments and proxy write calls.
    """

    name: str
    version: str
    payload_size: int = 0
    description: str = "pkgproxy end-to-end test package"


#: The default set: a plain one, one whose version holds ``+`` and ``~`` (apt sends those
#: percent-encoded as ``%2b``/``%7e`` in the pool URL), and a larger one (~256 KiB).
DEFAULT_PACKAGES: tuple[PackageSpec, ...] = (
    PackageSpec("pkgproxy-hello", "1.0-1"),
    PackageSpec("pkgproxy-tilde", "2.0+dfsg~rc1-1"),
    PackageSpec("pkgproxy-blob", "0.3-2", payload_size=256 * 1024),
)


@dataclass(frozen=True)
class BuiltPackage:
    """One published .deb: what apt will be told about it and what it must receive."""

    name: str
    version: str
    architecture: str
    filename: str  # path relative to the archive root, as in the Packages ``Filename:`` field
    size: int
    sha256: str

    @property
    def basename(self) -> str:
        """The file name ``apt-get download`` saves it under (no epoch in these versions)."""
        return os.path.basename(self.filename)


@dataclass(frozen=True)
class DebRepo:
    """A built repository. Serve :attr:`serve_dir`; the archive is then at ``/<mount>/``."""

    base_dir: str
    serve_dir: str
    mount: str
    root: str  # archive root: holds dists/ and pool/
    keyring: str  # binary OpenPGP public keyring, for ``deb [signed-by=<keyring>] ...``
    secret_key: str  # armored secret key, so :func:`republish` can sign a new Release
    fingerprint: str
    suite: str
    codename: str
    component: str
    architectures: tuple[str, ...]
    packages: tuple[BuiltPackage, ...]
    #: ``path relative to dists/<suite>/`` -> sha256, for every index the Release lists.
    release_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def dists_dir(self) -> str:
        """``<root>/dists/<suite>``: where InRelease and the indexes live."""
        return os.path.join(self.root, "dists", self.suite)

    def package(self, name: str) -> BuiltPackage:
        """The published package called ``name``; KeyError if there is none."""
        for p in self.packages:
            if p.name == name:
                return p
        raise KeyError(name)

    def sources_line(self, base_url: str, keyring: str | None = None) -> str:
        """A one-line-style ``sources.list`` entry for this repository at ``base_url``.

        ``base_url`` is where apt should look for the archive root, e.g. pkgproxy's
        ``http://127.0.0.1:PORT/debian/`` or the static server's own URL.
        """
        return (
            f"deb [signed-by={keyring or self.keyring}] {base_url} {self.suite} {self.component}\n"
        )


def missing_tools(tools: Iterable[str] = REQUIRED_TOOLS) -> list[str]:
    """The tools from ``tools`` that are not on PATH (for ``SkipTest`` messages)."""
    return [t for t in tools if shutil.which(t) is None]


def _run(
    args: Sequence[str],
    *,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    stdout_path: str | None = None,
) -> str:
    """Run a tool; on failure raise with its stderr, so a broken fixture says why."""
    proc = subprocess.run(
        list(args),
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} exited {proc.returncode}:\n"
            f"{proc.stderr.decode(errors='replace')}"
            + (proc.stdout.decode(errors="replace") if proc.stdout else "")
        )
    if stdout_path is not None:
        with open(stdout_path, "wb") as f:
            f.write(proc.stdout)
        return ""
    return proc.stdout.decode(errors="replace")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


class _GnuPG:
    """A private GNUPGHOME in a short /tmp path, removed (agent included) on close.

    Short path because gpg-agent's socket lives in the home directory when there is no
    /run/user/<uid>, and a Unix socket path must stay under ~107 bytes: trial temp dirs are
    much deeper than that.
    """

    def __init__(self) -> None:
        self.home = tempfile.mkdtemp(prefix="pkgproxy-gpg-")
        os.chmod(self.home, 0o700)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "GNUPGHOME": self.home,
            "LC_ALL": "C",
        }

    def gpg(self, *args: str, stdout_path: str | None = None) -> str:
        return _run(
            [
                "gpg",
                "--batch",
                "--yes",
                "--no-tty",
                "--pinentry-mode",
                "loopback",
                "--passphrase",
                "",
                *args,
            ],
            env=self.env,
            stdout_path=stdout_path,
        )

    def close(self) -> None:
        # gpg starts a gpg-agent daemon per home; leaving it would leak a process per build.
        subprocess.run(
            ["gpgconf", "--homedir", self.home, "--kill", "all"],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=_TIMEOUT,
            check=False,
        )
        shutil.rmtree(self.home, ignore_errors=True)


def _fingerprint(gnupg: _GnuPG) -> str:
    for line in gnupg.gpg("--with-colons", "--list-secret-keys").splitlines():
        if line.startswith("fpr:"):
            return line.split(":")[9]
    raise RuntimeError("gpg made no key")


def _payload(name: str, size: int) -> bytes:
    """Deterministic, incompressible bytes (so gzip does not shrink the .deb to nothing)."""
    return hashlib.shake_256(name.encode()).digest(size)


def _build_deb(spec: PackageSpec, pool_dir: str, scratch: str) -> str:
    """Build ``spec`` with dpkg-deb under ``pool_dir``; return the .deb path."""
    tree = os.path.join(scratch, f"{spec.name}_{spec.version}")
    shutil.rmtree(tree, ignore_errors=True)
    debian = os.path.join(tree, "DEBIAN")
    doc = os.path.join(tree, "usr", "share", "doc", spec.name)
    os.makedirs(debian)
    os.makedirs(doc)
    files: dict[str, bytes] = {
        os.path.join(doc, "README"): (
            f"{spec.name} {spec.version}: built by pkgproxy's tests/support/debrepo.py.\n"
            "It contains nothing useful; never install it on a real system.\n"
        ).encode(),
    }
    if spec.payload_size:
        blob_dir = os.path.join(tree, "usr", "share", spec.name)
        os.makedirs(blob_dir)
        files[os.path.join(blob_dir, "blob.bin")] = _payload(spec.name, spec.payload_size)
    installed_kib = max(1, sum(len(b) for b in files.values()) // 1024)
    files[os.path.join(debian, "control")] = (
        f"Package: {spec.name}\n"
        f"Version: {spec.version}\n"
        "Architecture: all\n"
        "Maintainer: pkgproxy tests <tests@example.invalid>\n"
        f"Installed-Size: {installed_kib}\n"
        "Section: misc\n"
        "Priority: optional\n"
        f"Description: {spec.description}\n"
        " Built by pkgproxy's test suite to exercise a caching proxy with real apt.\n"
    ).encode()
    for path, data in files.items():
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o644)
    # Fixed modes and mtimes everywhere: with --root-owner-group and SOURCE_DATE_EPOCH
    # dpkg-deb then produces the same bytes on every run and every machine.
    for dirpath, dirnames, filenames in os.walk(tree):
        os.chmod(dirpath, 0o755)
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))
    os.utime(tree, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))

    prefix = spec.name[:4] if spec.name.startswith("lib") else spec.name[0]
    out_dir = os.path.join(pool_dir, prefix, spec.name)
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"{spec.name}_{spec.version}_all.deb")
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH),
        "LC_ALL": "C",
    }
    _run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-z6", "--build", tree, out], env=env)
    return out


def _write_indexes(root: str, suite: str, component: str, arch_dirs: Sequence[str]) -> None:
    """Packages, Packages.gz, Packages.xz for each ``binary-<arch>`` (same content: all ``all``).

    Compressed with Python's gzip (mtime 0) and lzma so the indexes are reproducible too.
    """
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C"}
    packages = _run(
        [
            "apt-ftparchive",
            "-o",
            "APT::FTPArchive::Packages::SHA1=false",
            "-o",
            "APT::FTPArchive::Packages::SHA512=false",
            "packages",
            f"pool/{component}",
        ],
        cwd=root,
        env=env,
    ).encode()
    if not packages.strip():
        raise RuntimeError("apt-ftparchive found no packages")
    for arch_dir in arch_dirs:
        d = os.path.join(root, "dists", suite, component, arch_dir)
        os.makedirs(d, exist_ok=True)
        for name, data in (
            ("Packages", packages),
            ("Packages.gz", gzip.compress(packages, compresslevel=9, mtime=0)),
            ("Packages.xz", lzma.compress(packages, format=lzma.FORMAT_XZ)),
        ):
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)


def _write_release(
    root: str, suite: str, codename: str, component: str, architectures: Sequence[str]
) -> dict[str, str]:
    """Write ``dists/<suite>/Release`` (SHA256 only, Acquire-By-Hash) and return its hashes."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C"}
    dists = os.path.join(root, "dists", suite)
    fields = {
        "Origin": "pkgproxy-tests",
        "Label": "pkgproxy-tests",
        "Suite": suite,
        "Codename": codename,
        "Version": "1.0",
        "Architectures": " ".join(architectures),
        "Components": component,
        "Description": "pkgproxy end-to-end test repository",
        "Acquire-By-Hash": "yes",
    }
    args = ["apt-ftparchive"]
    for k, v in fields.items():
        args += ["-o", f"APT::FTPArchive::Release::{k}={v}"]
    for algo in ("MD5", "SHA1", "SHA512"):
        args += ["-o", f"APT::FTPArchive::Release::{algo}=false"]
    release = _run([*args, "release", "."], cwd=dists, env=env)
    # Debian's own Release files carry this field: the arch:all packages are also listed in
    # every binary-<arch>/Packages, so apt needs no binary-all index (it may still fetch one).
    release = release.replace(
        "\nSHA256:", "\nNo-Support-for-Architecture-all: Packages\nSHA256:", 1
    )
    with open(os.path.join(dists, "Release"), "w", encoding="utf-8") as f:
        f.write(release)
    hashes: dict[str, str] = {}
    in_sha256 = False
    for line in release.splitlines():
        if line.startswith("SHA256:"):
            in_sha256 = True
            continue
        if in_sha256 and line.startswith(" "):
            hexdigest, _size, rel = line.split()
            hashes[rel] = hexdigest
        elif in_sha256:
            in_sha256 = False
    if not hashes:
        raise RuntimeError(f"apt-ftparchive wrote a Release without SHA256 lines:\n{release}")
    return hashes


def _write_by_hash(dists: str, hashes: dict[str, str]) -> None:
    """Copy every listed index to ``<dir>/by-hash/SHA256/<hex>``, as dak does.

    Old by-hash files are kept (like a real archive's grace period), so a client holding an
    older InRelease still gets matching indexes after :func:`republish`.
    """
    for rel, hexdigest in hashes.items():
        src = os.path.join(dists, rel)
        if not os.path.isfile(src):
            continue
        by_hash = os.path.join(os.path.dirname(src), "by-hash", "SHA256")
        os.makedirs(by_hash, exist_ok=True)
        dst = os.path.join(by_hash, hexdigest)
        if not os.path.exists(dst):
            shutil.copyfile(src, dst)


def _sign(gnupg: _GnuPG, fingerprint: str, dists: str) -> None:
    release = os.path.join(dists, "Release")
    for out in ("InRelease", "Release.gpg"):
        p = os.path.join(dists, out)
        if os.path.exists(p):
            os.unlink(p)
    gnupg.gpg(
        "--local-user",
        fingerprint,
        "--digest-algo",
        "SHA256",
        "--armor",
        "--detach-sign",
        "--output",
        os.path.join(dists, "Release.gpg"),
        release,
    )
    gnupg.gpg(
        "--local-user",
        fingerprint,
        "--digest-algo",
        "SHA256",
        "--clearsign",
        "--output",
        os.path.join(dists, "InRelease"),
        release,
    )


def _publish(
    gnupg: _GnuPG,
    *,
    base_dir: str,
    serve_dir: str,
    mount: str,
    root: str,
    keyring: str,
    secret_key: str,
    fingerprint: str,
    suite: str,
    codename: str,
    component: str,
    architectures: Sequence[str],
    packages: Sequence[PackageSpec],
) -> DebRepo:
    pool = os.path.join(root, "pool", component)
    scratch = os.path.join(base_dir, "build")
    os.makedirs(scratch, exist_ok=True)
    built: list[BuiltPackage] = []
    for spec in packages:
        deb = _build_deb(spec, pool, scratch)
        built.append(
            BuiltPackage(
                name=spec.name,
                version=spec.version,
                architecture="all",
                filename=os.path.relpath(deb, root),
                size=os.path.getsize(deb),
                sha256=sha256_file(deb),
            )
        )
    arch_dirs = [f"binary-{a}" for a in architectures]
    _write_indexes(root, suite, component, arch_dirs)
    hashes = _write_release(root, suite, codename, component, architectures)
    dists = os.path.join(root, "dists", suite)
    _write_by_hash(dists, hashes)
    _sign(gnupg, fingerprint, dists)
    return DebRepo(
        base_dir=base_dir,
        serve_dir=serve_dir,
        mount=mount,
        root=root,
        keyring=keyring,
        secret_key=secret_key,
        fingerprint=fingerprint,
        suite=suite,
        codename=codename,
        component=component,
        architectures=tuple(architectures),
        packages=tuple(built),
        release_sha256=hashes,
    )


def build_debian_repo(
    base_dir: str,
    *,
    mount: str = "debian",
    suite: str = "stable",
    codename: str = "pkgtest",
    component: str = "main",
    architectures: Sequence[str] = ("all", "amd64"),
    packages: Sequence[PackageSpec] = DEFAULT_PACKAGES,
) -> DebRepo:
    """Build a signed repository under ``base_dir`` (created if needed); see the module doc.

    Serve ``repo.serve_dir`` with a plain HTTP file server: the archive root is then at
    ``http://HOST:PORT/<mount>/``, the same shape as ``deb.debian.org/debian/``.
    Raises RuntimeError with the tool's stderr if a Debian tool fails.
    """
    base_dir = os.path.abspath(base_dir)
    serve_dir = os.path.join(base_dir, "www")
    root = os.path.join(serve_dir, mount)
    keys = os.path.join(base_dir, "keys")
    os.makedirs(root, exist_ok=True)
    os.makedirs(keys, exist_ok=True)
    keyring = os.path.join(keys, "keyring.gpg")
    secret_key = os.path.join(keys, "secret.asc")
    gnupg = _GnuPG()
    try:
        gnupg.gpg(
            "--quick-gen-key",
            "pkgproxy test archive <archive@example.invalid>",
            "ed25519",
            "sign",
            "never",
        )
        fingerprint = _fingerprint(gnupg)
        gnupg.gpg("--export", fingerprint, stdout_path=keyring)
        gnupg.gpg("--armor", "--export-secret-keys", fingerprint, stdout_path=secret_key)
        os.chmod(secret_key, 0o600)
        return _publish(
            gnupg,
            base_dir=base_dir,
            serve_dir=serve_dir,
            mount=mount,
            root=root,
            keyring=keyring,
            secret_key=secret_key,
            fingerprint=fingerprint,
            suite=suite,
            codename=codename,
            component=component,
            architectures=architectures,
            packages=packages,
        )
    finally:
        gnupg.close()


def _wait_past_release_date(release_path: str) -> None:
    """Sleep until the clock is past the ``Date:`` of an existing Release (<= ~1 s).

    The Date has one-second resolution; a republish within the same second would produce an
    InRelease that a "never go back in time" check in the proxy cannot order.
    """
    try:
        with open(release_path, encoding="utf-8") as f:
            date = next((ln[5:].strip() for ln in f if ln.startswith("Date:")), None)
    except OSError:
        return
    if not date:
        return
    deadline = email.utils.parsedate_to_datetime(date).timestamp() + 1.0
    delay = deadline - time.time()
    if delay > 0:
        time.sleep(min(delay, 2.0))


def republish(
    repo: DebRepo, packages: Sequence[PackageSpec], *, keep_old_debs: bool = True
) -> DebRepo:
    """Publish a new state of ``repo`` (e.g. a newer version) with the same key and URLs.

    Index files and InRelease are rewritten in place and get a later ``Date``; old by-hash
    files stay, as on a real mirror. The Packages index lists every .deb in the pool: with
    ``keep_old_debs`` (the default) the old versions stay listed and downloadable (apt picks
    the newest), without it the .debs not in ``packages`` are deleted first. For tests of
    index refresh: the returned object describes the new state (its ``packages`` are the
    ones built by this call); ``repo`` keeps describing the old one.
    """
    if not keep_old_debs:
        for p in repo.packages:
            path = os.path.join(repo.root, p.filename)
            if os.path.exists(path):
                os.unlink(path)
    _wait_past_release_date(os.path.join(repo.dists_dir, "Release"))
    signed = [os.path.join(repo.dists_dir, n) for n in ("InRelease", "Release", "Release.gpg")]
    before = {path: os.stat(path).st_mtime for path in signed if os.path.exists(path)}
    gnupg = _GnuPG()
    try:
        gnupg.gpg("--import", repo.secret_key)
        new = _publish(
            gnupg,
            base_dir=repo.base_dir,
            serve_dir=repo.serve_dir,
            mount=repo.mount,
            root=repo.root,
            keyring=repo.keyring,
            secret_key=repo.secret_key,
            fingerprint=repo.fingerprint,
            suite=repo.suite,
            codename=repo.codename,
            component=repo.component,
            architectures=repo.architectures,
            packages=packages,
        )
    finally:
        gnupg.close()
    # The stand-in mirror (http.server) answers If-Modified-Since by whole seconds of the
    # file's mtime: a new InRelease written within the second of the old one would be
    # "not modified" to a cache revalidating it.
    for path, mtime in before.items():
        if os.path.exists(path) and int(os.stat(path).st_mtime) <= int(mtime):
            os.utime(path, (mtime + 1, mtime + 1))
    return new
