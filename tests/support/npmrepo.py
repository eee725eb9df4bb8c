"""Tiny npm packages and the registry documents that describe them, built by the tests.

Why not packages from the public registry: tests must not depend on the network, and a
package built here has digests the test knows. Each tarball is a real npm tarball (a
gzip'd ustar archive with ``package/package.json``), built byte for byte the same on
every run (fixed mtimes, owners and gzip header), so its ``integrity`` is stable.

The names are prefixed ``pkgproxy-fixture``: should a client ever reach the public
registry by mistake, the install fails instead of quietly taking someone else's package.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

CORGI = "application/vnd.npm.install-v1+json"


def make_tarball(name: str, version: str, dependencies: Mapping[str, str]) -> bytes:
    """A deterministic npm tarball: ``package/package.json`` and ``package/index.js``."""
    manifest = {
        "name": name,
        "version": version,
        "main": "index.js",
        "dependencies": dict(dependencies),
    }
    files = {
        "package/package.json": json.dumps(manifest, indent=2).encode() + b"\n",
        "package/index.js": f"module.exports = {json.dumps(f'{name}@{version}')};\n".encode(),
    }
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mtime = 499162500  # npm's own fixed date, 1985-10-26
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


@dataclass(frozen=True)
class NpmPackage:
    """One version of one package, with its tarball bytes."""

    name: str
    version: str
    dependencies: Mapping[str, str] = field(default_factory=dict)

    @property
    def tarball(self) -> bytes:
        """The tarball bytes (built again on each use; they are the same each time)."""
        return make_tarball(self.name, self.version, self.dependencies)

    @property
    def filename(self) -> str:
        """The tarball's file name: the scope is not part of it."""
        return f"{self.name.rsplit('/', 1)[-1]}-{self.version}.tgz"

    @property
    def tarball_path(self) -> str:
        """Where the tarball lives below the registry root (scoped names unescaped)."""
        return f"{self.name}/-/{self.filename}"

    @property
    def sha1(self) -> str:
        """Hex SHA-1 of the tarball: ``dist.shasum``."""
        return hashlib.sha1(self.tarball).hexdigest()

    @property
    def sha512(self) -> str:
        """Hex SHA-512 of the tarball: what pkgproxy checks ``dist.integrity`` as."""
        return hashlib.sha512(self.tarball).hexdigest()

    @property
    def integrity(self) -> str:
        """The SRI string npm records: ``sha512-`` and the base64 of the raw digest."""
        return "sha512-" + base64.b64encode(hashlib.sha512(self.tarball).digest()).decode()

    def dist(self, registry: str) -> dict[str, Any]:
        """The ``dist`` object a registry at ``registry`` (ending in ``/``) publishes."""
        return {
            "integrity": self.integrity,
            "shasum": self.sha1,
            "tarball": registry + self.tarball_path,
        }

    def manifest(self, registry: str, abbreviated: bool = False) -> dict[str, Any]:
        """This version's entry in ``versions`` of a packument."""
        doc: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "dependencies": dict(self.dependencies),
            "dist": self.dist(registry),
        }
        if not abbreviated:
            doc.update(
                {
                    "main": "index.js",
                    "description": f"pkgproxy test fixture {self.name}",
                    "_id": f"{self.name}@{self.version}",
                }
            )
        return doc


def packument(
    versions: Iterable[NpmPackage], registry: str, abbreviated: bool = False
) -> dict[str, Any]:
    """The packument of one package from its versions (all of one name)."""
    items = list(versions)
    name = items[0].name
    latest = items[-1].version
    doc: dict[str, Any] = {
        "name": name,
        "dist-tags": {"latest": latest},
        "versions": {p.version: p.manifest(registry, abbreviated) for p in items},
    }
    if abbreviated:
        doc["modified"] = "2024-01-01T00:00:00.000Z"
    else:
        doc["_id"] = name
        doc["time"] = {
            "created": "2024-01-01T00:00:00.000Z",
            "modified": "2024-01-01T00:00:00.000Z",
            **{p.version: "2024-01-01T00:00:00.000Z" for p in items},
        }
        doc["readme"] = f"# {name}\n\nA package pkgproxy's tests build — ünïcödé kept.\n"
    return doc


#: The packages the end-to-end tests install: one with a dependency (resolved from a
#: range, with a newer version the range excludes), and one scoped package.
APP = NpmPackage("pkgproxy-fixture-app", "1.0.0", {"pkgproxy-fixture-dep": "^2.0.0"})
DEP_OLD = NpmPackage("pkgproxy-fixture-dep", "2.0.0")
DEP = NpmPackage("pkgproxy-fixture-dep", "2.1.0")
DEP_NEXT = NpmPackage("pkgproxy-fixture-dep", "3.0.0")
SCOPED = NpmPackage("@pkgproxy-fixture/scoped", "0.3.0")
FIXTURES: dict[str, list[NpmPackage]] = {
    APP.name: [APP],
    DEP.name: [DEP_OLD, DEP, DEP_NEXT],
    SCOPED.name: [SCOPED],
}


def write_verdaccio_storage(storage: str, packages: Mapping[str, list[NpmPackage]]) -> None:
    """Lay out verdaccio's local storage as if each package had been published to it.

    verdaccio reads ``<storage>/<name>/package.json`` (its stored packument) and the
    tarballs beside it; it rewrites ``dist.tarball`` onto its own address when it
    serves, so the URL written here is a placeholder. Writing the files directly is
    much faster than ``npm publish`` and needs no account.
    """
    for name, versions in packages.items():
        directory = os.path.join(storage, *name.split("/"))
        os.makedirs(directory, exist_ok=True)
        doc = packument(versions, "http://localhost:4873/")
        doc["_rev"] = "1-0000000000000001"
        doc["_attachments"] = {p.filename: {"shasum": p.sha1} for p in versions}
        doc["_distfiles"] = {}
        doc["_uplinks"] = {}
        with open(os.path.join(directory, "package.json"), "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, ensure_ascii=False)
        for p in versions:
            with open(os.path.join(directory, p.filename), "wb") as f:
                f.write(p.tarball)


def huge_packument(size: int, registry: str, name: str = "huge") -> dict[str, Any]:
    """A packument of about ``size`` bytes of JSON made of many small objects.

    Shaped like the packuments of busy packages: thousands of versions, each with a
    dependency map, scripts and a ``dist``; small objects are the slow case for a JSON
    parser, so this is the honest worst case for holding a thread.
    """
    versions: dict[str, Any] = {}
    i = 0
    approx = 0
    while approx < size:
        version = f"{i // 1000}.{i // 10 % 100}.{i % 10}"
        digest = hashlib.sha512(version.encode()).digest()
        manifest = {
            "name": name,
            "version": version,
            "description": "a package with very many versions",
            "dependencies": {f"dep-{j}": f"^{j}.0.0" for j in range(30)},
            "scripts": {"test": "node test.js", "build": "tsc -p ."},
            "keywords": ["a", "b", "c", "d"],
            "maintainers": [{"name": "someone", "email": "someone@example.org"}],
            "dist": {
                "integrity": "sha512-" + base64.b64encode(digest).decode(),
                "shasum": hashlib.sha1(version.encode()).hexdigest(),
                "tarball": f"{registry}{name}/-/{name}-{version}.tgz",
                "fileCount": 3,
                "unpackedSize": 1000 + i,
            },
        }
        versions[version] = manifest
        approx += len(json.dumps(manifest))
        i += 1
    return {
        "_id": name,
        "name": name,
        "dist-tags": {"latest": version},
        "versions": versions,
        "time": {v: "2024-01-01T00:00:00.000Z" for v in versions},
    }
