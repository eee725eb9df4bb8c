"""Go modules built by the tests, laid out as a GOPROXY serves them.

Why not modules from proxy.golang.org: tests must not depend on the network, and a
module built here has hashes the test knows. Each version's zip has the layout the
proxy protocol requires (every file below ``<module>@<version>/``, ``go.mod`` at its
top), and its ``h1:`` is computed from the files themselves (the dirhash definition),
not from the zip, so pkgproxy's zip hasher is checked against an independent answer.

The module paths are under ``pkgproxy.test``, a name that cannot resolve: should ``go``
ever try to fetch one directly, it fails instead of reaching someone else's code.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pkgproxy.families.go import escape

#: The fixed time every version claims (the zip's own dates are fixed too).
TIME = "2024-01-01T00:00:00Z"


def dirhash(files: Mapping[str, bytes]) -> str:
    """golang.org/x/mod/sumdb/dirhash.Hash1 of ``name -> content``."""
    summary = b"".join(
        hashlib.sha256(files[name]).hexdigest().encode() + b"  " + name.encode() + b"\n"
        for name in sorted(files)
    )
    return "h1:" + base64.b64encode(hashlib.sha256(summary).digest()).decode()


@dataclass(frozen=True)
class GoModule:
    """One version of one module: its go.mod requirements and one Go source file."""

    path: str
    version: str
    requires: Mapping[str, str] = field(default_factory=dict)
    #: The body of the package's one function, ``Name() string``.
    says: str = ""

    @property
    def package(self) -> str:
        return re.sub(r"[^a-z0-9]", "", self.path.rsplit("/", 1)[-1].lower()) or "m"

    @property
    def go_mod(self) -> bytes:
        lines = [f"module {self.path}\n", "\ngo 1.19\n"]
        if self.requires:
            lines.append("\nrequire (\n")
            lines += [f"\t{m} {v}\n" for m, v in sorted(self.requires.items())]
            lines.append(")\n")
        return "".join(lines).encode()

    @property
    def source(self) -> bytes:
        text = self.says or f"{self.path}@{self.version}"
        return (
            f"package {self.package}\n\n"
            f"// Name says which module and version this is.\n"
            f"func Name() string {{ return {json.dumps(text)} }}\n"
        ).encode()

    @property
    def files(self) -> dict[str, bytes]:
        """The zip's members, by their names in the zip."""
        top = f"{self.path}@{self.version}/"
        return {top + "go.mod": self.go_mod, top + f"{self.package}.go": self.source}

    @property
    def zip(self) -> bytes:
        """The module zip, made the same way each time (fixed dates, deflated)."""
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in self.files.items():
                info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                z.writestr(info, data)
        return out.getvalue()

    @property
    def h1(self) -> str:
        """The zip's hash as go.sum records it."""
        return dirhash(self.files)

    @property
    def mod_h1(self) -> str:
        """The go.mod's hash as go.sum's ``/go.mod`` line records it."""
        return dirhash({"go.mod": self.go_mod})

    @property
    def info(self) -> bytes:
        return json.dumps({"Version": self.version, "Time": TIME}).encode() + b"\n"

    def base(self) -> str:
        """``<escaped module>/@v/<escaped version>``: the three files' common path."""
        return f"{escape(self.path)}/@v/{escape(self.version)}"

    def lookup(self, record: int = 1) -> bytes:
        """A checksum database lookup answer for this version (the note left unsigned:
        pkgproxy reads the hashes, ``go`` checks the signature)."""
        return (
            f"{record}\n{self.path} {self.version} {self.h1}\n"
            f"{self.path} {self.version}/go.mod {self.mod_h1}\n\n"
            f"go.sum database tree\n{record + 1}\nAAAA\n\n— sum.pkgproxy.test xyz=\n"
        ).encode()


def tree(modules: Iterable[GoModule]) -> dict[str, bytes]:
    """A GOPROXY file tree (relative path -> content) serving ``modules``."""
    files: dict[str, bytes] = {}
    versions: dict[str, list[str]] = {}
    for m in modules:
        files[m.base() + ".info"] = m.info
        files[m.base() + ".mod"] = m.go_mod
        files[m.base() + ".zip"] = m.zip
        versions.setdefault(m.path, []).append(m.version)
    for path, vs in versions.items():
        files[f"{escape(path)}/@v/list"] = "".join(f"{v}\n" for v in vs).encode()
    return files


def write_tree(root: str, modules: Iterable[GoModule]) -> None:
    """Write (or add to) a GOPROXY tree below ``root``."""
    for name, data in tree(modules).items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


#: An application's dependency (two versions: the app needs the older; a newer one is
#: published during a test), and a module with an upper-case letter in its path.
LIB = GoModule("pkgproxy.test/lib", "v1.0.0", says="lib one")
LIB_NEXT = GoModule("pkgproxy.test/lib", "v1.1.0", says="lib two")
UPPER = GoModule("pkgproxy.test/Upper", "v0.1.0", says="upper")
