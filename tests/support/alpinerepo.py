"""Build a tiny Alpine-shaped repository (APKINDEX.tar.gz and .apk files) for end-to-end tests.

Debian has no ``apk`` and no ``abuild``, so the fixture is written here with the standard
library, byte for byte in the shape abuild publishes (PROTOCOLS.md section 3.4):

* a ``.apk`` (v2) is three concatenated gzip streams: a tar segment holding the signature
  ``.SIGN.RSA.<key>.rsa.pub``, a tar segment holding ``.PKGINFO`` (the control segment),
  and a complete tar of the package's files (the data segment). Like abuild, the first
  two segments have no end-of-archive blocks, so the three decompress to one tar;
* ``APKINDEX.tar.gz`` is two concatenated gzip streams: the signature segment (again
  without end-of-archive blocks, unless ``signature_end_marker`` asks for them), then a
  tar with ``DESCRIPTION`` and ``APKINDEX``;
* each ``APKINDEX`` record has ``P:`` name, ``V:`` version, ``A:`` arch, ``S:`` the size of
  the ``.apk`` file and ``C:`` = ``Q1`` + base64(SHA-1 of the raw bytes of the .apk's
  second gzip stream), plus the usual descriptive fields.

The signatures are dummy bytes: nothing here checks them, and pkgproxy must not either (it
checks only ``S:`` and ``C:``). Everything is deterministic: fixed mtimes in tar headers and
gzip headers, and payloads derived from the package name.

Two ways to make the index lie, for the verification tests:

* ``size_mismatch``: the file served is the real package with a fourth gzip stream
  appended, so its size disagrees with ``S:`` (its control stream, and so ``C:``, still
  matches);
* ``checksum_mismatch``: the file served differs from the indexed one only in the gzip
  header's MTIME of its control stream, so it has exactly the indexed size but another
  ``C:`` (a package rebuilt under the same name, as a stale index would describe it).

Layout (serve ``repo.serve_dir``; the mirror root is then ``/<mount>/``)::

    <base>/www/<mount>/<branch>/<repo>/<arch>/APKINDEX.tar.gz
    <base>/www/<mount>/<branch>/<repo>/<arch>/<name>-<version>.apk
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import tarfile
import zlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass

#: mtime of every tar member and gzip header, so rebuilding yields identical bytes.
SOURCE_DATE_EPOCH = 1700000000

#: Name of the (dummy) signing key, as in ``.SIGN.RSA.<key>`` of real packages.
KEY_NAME = "test.rsa.pub"


@dataclass(frozen=True)
class ApkSpec:
    """What to put into one test package; ``payload_size`` incompressible bytes of data."""

    name: str
    version: str
    payload_size: int = 0
    description: str = "pkgproxy end-to-end test package"


#: Default packages: a tiny one, one with a larger (~200 KiB) data stream, and a third.
DEFAULT_PACKAGES: tuple[ApkSpec, ...] = (
    ApkSpec("pkgproxy-hello", "1.0-r0"),
    ApkSpec("pkgproxy-blob", "0.3-r2", payload_size=200 * 1024),
    ApkSpec("pkgproxy-extra", "2.1.4-r1", payload_size=3000),
)


@dataclass(frozen=True)
class BuiltApk:
    """One published .apk: what the index says about it and what the server holds."""

    name: str
    version: str
    path: str  # relative to the mirror root: <branch>/<repo>/<arch>/<name>-<version>.apk
    size: int  # the ``S:`` the index gives
    checksum: str  # the ``C:`` the index gives
    data: bytes  # the bytes the server actually serves (== the indexed package unless lying)
    lies: str = ""  # "", "size" or "checksum": how the served file disagrees with the index

    @property
    def basename(self) -> str:
        """``<name>-<version>.apk``."""
        return os.path.basename(self.path)

    @property
    def sha256(self) -> str:
        """SHA-256 of the served bytes."""
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class AlpineRepo:
    """A built repository. Serve :attr:`serve_dir`; the mirror root is then ``/<mount>/``."""

    base_dir: str
    serve_dir: str
    mount: str
    root: str  # the mirror root: holds <branch>/
    branch: str
    repo: str
    arch: str
    index: bytes  # the bytes of APKINDEX.tar.gz
    apkindex_text: str  # the APKINDEX file inside it
    packages: tuple[BuiltApk, ...]

    @property
    def index_path(self) -> str:
        """``<branch>/<repo>/<arch>/APKINDEX.tar.gz``, relative to the mirror root."""
        return f"{self.branch}/{self.repo}/{self.arch}/APKINDEX.tar.gz"

    def package(self, name: str) -> BuiltApk:
        """The published package called ``name``; KeyError if there is none."""
        for p in self.packages:
            if p.name == name:
                return p
        raise KeyError(name)

    def files(self) -> dict[str, bytes]:
        """Every served file: path relative to the mirror root -> bytes."""
        out = {self.index_path: self.index}
        out.update({p.path: p.data for p in self.packages})
        return out


def _gzip(data: bytes, mtime: int = 0) -> bytes:
    """One gzip stream (fixed mtime, so the bytes are reproducible)."""
    return gzip.compress(data, compresslevel=9, mtime=mtime)


def tar_segment(members: Sequence[tuple[str, bytes]], *, end_marker: bool) -> bytes:
    """A ustar archive of regular files; without ``end_marker``, no end-of-archive blocks.

    abuild cuts the end-of-archive blocks off the signature and control segments so that
    the concatenation of all segments decompresses to a single valid tar.
    """
    out = io.BytesIO()
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = SOURCE_DATE_EPOCH
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        out.write(info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict"))
        out.write(data)
        out.write(b"\0" * (-len(data) % tarfile.BLOCKSIZE))
    if end_marker:
        out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    return out.getvalue()


def gzip_members(blob: bytes) -> list[bytes]:
    """Split concatenated gzip streams into their raw bytes (an independent reading of
    the format, used by the tests to check the fixture itself)."""
    members: list[bytes] = []
    rest = blob
    for _ in range(64):  # bounded: a fixture never has more members than this
        if not rest:
            return members
        d = zlib.decompressobj(wbits=31)
        d.decompress(rest)
        if not d.eof:
            raise ValueError("truncated gzip stream")
        used = len(rest) - len(d.unused_data)
        members.append(rest[:used])
        rest = d.unused_data
    raise ValueError("too many gzip members")


def apk_checksum(control_stream: bytes) -> str:
    """``C:`` for a package whose control gzip stream is ``control_stream``."""
    return "Q1" + base64.b64encode(hashlib.sha1(control_stream).digest()).decode()


def _payload(name: str, size: int) -> bytes:
    """Deterministic, incompressible bytes."""
    return hashlib.shake_256(name.encode()).digest(size)


def build_apk(spec: ApkSpec, arch: str, *, control_mtime: int = 0) -> tuple[bytes, bytes]:
    """``(apk bytes, control gzip stream)`` of one package.

    ``control_mtime`` goes into the gzip header of the control stream only: a different
    value gives a file of the same size whose ``C:`` differs.
    """
    files: list[tuple[str, bytes]] = [
        (f"usr/share/doc/{spec.name}/README", f"{spec.name} {spec.version}\n".encode()),
    ]
    if spec.payload_size:
        files.append((f"usr/share/{spec.name}/blob.bin", _payload(spec.name, spec.payload_size)))
    data_tar = tar_segment(files, end_marker=True)
    installed = sum(len(b) for _, b in files)
    datahash = hashlib.sha256(data_tar).hexdigest()
    pkginfo = (
        "# Generated by tests/support/alpinerepo.py\n"
        f"pkgname = {spec.name}\n"
        f"pkgver = {spec.version}\n"
        f"pkgdesc = {spec.description}\n"
        "url = https://example.invalid/\n"
        f"builddate = {SOURCE_DATE_EPOCH}\n"
        "packager = pkgproxy tests <tests@example.invalid>\n"
        f"size = {installed}\n"
        f"arch = {arch}\n"
        "origin = pkgproxy-tests\n"
        "license = MIT\n"
        f"datahash = {datahash}\n"
    ).encode()
    signature = tar_segment(
        [(f".SIGN.RSA.{KEY_NAME}", _payload(f"sig:{spec.name}", 256))], end_marker=False
    )
    control = _gzip(tar_segment([(".PKGINFO", pkginfo)], end_marker=False), mtime=control_mtime)
    apk = _gzip(signature) + control + _gzip(data_tar)
    return apk, control


def index_record(spec: ApkSpec, arch: str, size: int, checksum: str) -> str:
    """One APKINDEX record (no trailing blank line) for ``spec`` with ``S:`` and ``C:``."""
    return (
        f"C:{checksum}\n"
        f"P:{spec.name}\n"
        f"V:{spec.version}\n"
        f"A:{arch}\n"
        f"S:{size}\n"
        f"I:{max(1, spec.payload_size)}\n"
        f"T:{spec.description}\n"
        "U:https://example.invalid/\n"
        "L:MIT\n"
        "o:pkgproxy-tests\n"
        "m:pkgproxy tests <tests@example.invalid>\n"
        f"t:{SOURCE_DATE_EPOCH}\n"
        "D:\n"
    )


def build_index(apkindex_text: str, *, signature_end_marker: bool = False) -> bytes:
    """``APKINDEX.tar.gz``: signature segment, then a tar with DESCRIPTION and APKINDEX."""
    signature = tar_segment(
        [(f".SIGN.RSA.{KEY_NAME}", _payload("sig:APKINDEX", 256))],
        end_marker=signature_end_marker,
    )
    body = tar_segment(
        [
            ("DESCRIPTION", b"pkgproxy-tests v3.x\n"),
            ("APKINDEX", apkindex_text.encode()),
        ],
        end_marker=True,
    )
    return _gzip(signature) + _gzip(body)


def build_alpine_repo(
    base_dir: str,
    *,
    mount: str = "alpine",
    branch: str = "v3.20",
    repo: str = "main",
    arch: str = "x86_64",
    packages: Sequence[ApkSpec] = DEFAULT_PACKAGES,
    size_mismatch: Collection[str] = (),
    checksum_mismatch: Collection[str] = (),
    signature_end_marker: bool = False,
) -> AlpineRepo:
    """Write the repository under ``base_dir`` (created if needed); see the module doc.

    Package names in ``size_mismatch`` / ``checksum_mismatch`` are served with bytes that
    disagree with their index record in that way.
    """
    base_dir = os.path.abspath(base_dir)
    serve_dir = os.path.join(base_dir, "www")
    root = os.path.join(serve_dir, mount)
    arch_dir = os.path.join(root, branch, repo, arch)
    os.makedirs(arch_dir, exist_ok=True)
    built: list[BuiltApk] = []
    records: list[str] = []
    for spec in packages:
        apk, control = build_apk(spec, arch)
        checksum = apk_checksum(control)
        served, lies = apk, ""
        if spec.name in size_mismatch:
            served, lies = apk + _gzip(_payload(f"junk:{spec.name}", 100)), "size"
        elif spec.name in checksum_mismatch:
            served, _ = build_apk(spec, arch, control_mtime=SOURCE_DATE_EPOCH)
            lies = "checksum"
            if len(served) != len(apk) or apk_checksum(gzip_members(served)[1]) == checksum:
                raise RuntimeError("checksum_mismatch fixture must keep the size, change C:")
        records.append(index_record(spec, arch, len(apk), checksum))
        basename = f"{spec.name}-{spec.version}.apk"
        with open(os.path.join(arch_dir, basename), "wb") as f:
            f.write(served)
        built.append(
            BuiltApk(
                name=spec.name,
                version=spec.version,
                path=f"{branch}/{repo}/{arch}/{basename}",
                size=len(apk),
                checksum=checksum,
                data=served,
                lies=lies,
            )
        )
    text = "\n".join(records) + "\n"
    index = build_index(text, signature_end_marker=signature_end_marker)
    with open(os.path.join(arch_dir, "APKINDEX.tar.gz"), "wb") as f:
        f.write(index)
    return AlpineRepo(
        base_dir=base_dir,
        serve_dir=serve_dir,
        mount=mount,
        root=root,
        branch=branch,
        repo=repo,
        arch=arch,
        index=index,
        apkindex_text=text,
        packages=tuple(built),
    )
