"""What a lock file or a package list pins, read into :class:`Want` records (pure).

Each reader takes the file's text and returns what it names: a PyPI project version and
the digests of the files it pins, an npm package version and its integrity, a Debian
package list, an image reference. Where a file's type cannot be told from its name,
``--family`` names it. Every error is a :class:`SourceError` naming the file and line.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


class SourceError(ValueError):
    """A file that cannot be read as what it claims to be."""


@dataclass(frozen=True)
class Want:
    """One thing a file pins.

    :ivar family: ``pypi``, ``npm``, ``debian`` or ``oci``.
    :ivar name: the project, package or image repository (OCI: ``registry/repository``).
    :ivar version: the version (OCI: the tag or ``sha256:`` digest; Debian: empty).
    :ivar digests: ``(algorithm, hex)`` pairs the pinned files must match (PyPI: one per
        file the lock allows; npm: the tarball's).
    :ivar url: the file's URL as the lock file gives it, when it gives one.
    :ivar extra: Debian: ``(suite, architecture)``; OCI: ``(platform,)``.
    """

    family: str
    name: str
    version: str = ""
    digests: tuple[tuple[str, str], ...] = ()
    url: str = ""
    extra: tuple[str, ...] = field(default=())


FAMILIES = ("pypi", "npm", "debian", "oci")


def family_of(path: str) -> str | None:
    """The family a file's name tells, or None."""
    base = os.path.basename(path).lower()
    if base.endswith(".txt") and ("requirements" in base or base.startswith("constraints")):
        return "pypi"
    if base in ("uv.lock", "poetry.lock") or (base.startswith("pylock") and base.endswith(".toml")):
        return "pypi"
    if base in ("package-lock.json", "npm-shrinkwrap.json", "yarn.lock", "pnpm-lock.yaml"):
        return "npm"
    return None


def read(path: str, text: str, family: str | None = None) -> list[Want]:
    """Everything ``path`` (whose content is ``text``) pins."""
    base = os.path.basename(path).lower()
    family = family or family_of(path)
    if family is None:
        raise SourceError(
            f"{path}: cannot tell what this file is from its name; "
            f"name its family with --family ({', '.join(FAMILIES)})"
        )
    reader: Callable[[str, str], list[Want]]
    if family == "pypi":
        if base == "uv.lock":
            reader = uv_lock
        elif base == "poetry.lock":
            reader = poetry_lock
        elif base.endswith(".toml"):
            reader = pylock
        else:
            reader = requirements
    elif family == "npm":
        reader = {"yarn.lock": yarn_lock, "pnpm-lock.yaml": pnpm_lock}.get(base, package_lock)
    elif family == "debian":
        reader = debian_list
    elif family == "oci":
        reader = image_list
    else:
        raise SourceError(f"{path}: unknown family {family!r} (use {', '.join(FAMILIES)})")
    return reader(path, text)


# -- PyPI ---------------------------------------------------------------------------------

_NORMALISE = re.compile(r"[-_.]+")
_HASH_OPT = re.compile(r"--hash[=\s]+([A-Za-z0-9]+):([0-9A-Fa-f]+)")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*===?\s*([^\s;\\]+)")


def normalise(name: str) -> str:
    """PEP 503's normalised project name."""
    return _NORMALISE.sub("-", name).lower()


def _logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """Lines joined over trailing backslashes, with their first line number."""
    start, parts = 0, list[str]()
    for number, line in enumerate(text.splitlines(), 1):
        if not parts:
            start = number
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            parts.append(stripped[:-1])
            continue
        parts.append(stripped)
        yield start, " ".join(parts)
        parts = []
    if parts:
        yield start, " ".join(parts)


def requirements(path: str, text: str) -> list[Want]:
    """``requirements.txt`` with hashes, as pip-compile and ``uv pip compile`` write it."""
    wants: list[Want] = []
    for number, line in _logical_lines(text):
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            # Options (--index-url, -c, -e ...) and lone --hash continuations.
            continue
        pin = _PIN.match(line)
        if pin is None:
            raise SourceError(
                f"{path}:{number}: {line.split()[0]!r} is not pinned with == "
                "(pkgproxy-warm needs the exact versions and hashes of a lock file)"
            )
        digests = tuple((alg.lower(), hexa.lower()) for alg, hexa in _HASH_OPT.findall(line))
        if not digests:
            raise SourceError(
                f"{path}:{number}: {pin.group(1)}=={pin.group(2)} has no --hash "
                "(pkgproxy-warm fetches the exact files a lock file pins; "
                "make it with pip-compile --generate-hashes or uv pip compile --generate-hashes)"
            )
        wants.append(Want("pypi", normalise(pin.group(1)), pin.group(2), digests))
    return wants


def _toml(path: str, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SourceError(f"{path}: not valid TOML: {e}") from None


def _hash_pair(value: object, where: str) -> tuple[str, str]:
    if not isinstance(value, str) or ":" not in value:
        raise SourceError(f"{where}: a hash must be 'algorithm:hex', not {value!r}")
    alg, _, hexa = value.partition(":")
    return alg.lower(), hexa.lower()


def _toml_locks(
    path: str,
    text: str,
    table: str,
    digests_of: Callable[[dict[str, Any], str], tuple[tuple[str, str], ...]],
) -> list[Want]:
    """One :class:`Want` for each entry of the array of tables ``table`` whose
    ``digests_of`` names any digest (entries it gives none are not from an index)."""
    wants = []
    for i, pkg in enumerate(_list(_toml(path, text).get(table), f"{path}: {table}")):
        where = f"{path}: {table}[{i}]"
        digests = digests_of(pkg, where)
        if digests:
            name, version = _s(pkg, "name", where), _s(pkg, "version", where)
            wants.append(Want("pypi", normalise(name), version, digests))
    return wants


def _files(pkg: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """A package's sdist and wheels (uv.lock and pylock.toml spell them alike)."""
    files = [pkg["sdist"]] if isinstance(pkg.get("sdist"), dict) else []
    return files + _list(pkg.get("wheels", []), f"{where}.wheels")


def _uv_digests(pkg: dict[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    source = pkg.get("source") or {}
    if not isinstance(source, dict) or "registry" not in source:
        return ()  # the project itself, a path or git dependency: nothing to fetch
    return tuple(_hash_pair(f.get("hash"), where) for f in _files(pkg, where) if f.get("hash"))


def _pylock_digests(pkg: dict[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        (alg.lower(), str(hexa).lower())
        for f in _files(pkg, where)
        for alg, hexa in (f.get("hashes") or {}).items()
    )


def _poetry_digests(pkg: dict[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    source = pkg.get("source")
    if isinstance(source, dict) and source.get("type") in ("git", "directory", "file", "url"):
        return ()
    files = _list(pkg.get("files", []), f"{where}.files")
    return tuple(_hash_pair(f.get("hash"), where) for f in files if f.get("hash"))


def uv_lock(path: str, text: str) -> list[Want]:
    """``uv.lock``: every package from a registry, with its sdist's and wheels' hashes."""
    return _toml_locks(path, text, "package", _uv_digests)


def pylock(path: str, text: str) -> list[Want]:
    """PEP 751 ``pylock.toml``: each package's wheels and sdist with their hashes."""
    return _toml_locks(path, text, "packages", _pylock_digests)


def poetry_lock(path: str, text: str) -> list[Want]:
    """``poetry.lock``: each package's files (by name) with their hashes."""
    return _toml_locks(path, text, "package", _poetry_digests)


# -- npm ----------------------------------------------------------------------------------


def integrity_digests(sri: str) -> tuple[tuple[str, str], ...]:
    """npm's Subresource Integrity string (``sha512-<base64>`` ...) as ``(alg, hex)`` pairs."""
    pairs = []
    for item in sri.split():
        alg, sep, b64 = item.partition("-")
        if not sep or alg not in ("sha1", "sha256", "sha384", "sha512"):
            continue
        try:
            pairs.append((alg, base64.b64decode(b64, validate=True).hex()))
        except (binascii.Error, ValueError):
            raise SourceError(f"integrity {item!r} is not base64") from None
    return tuple(pairs)


def _npm_name_from_path(key: str) -> str:
    # "node_modules/a/node_modules/@s/b" -> "@s/b"
    tail = key.rsplit("node_modules/", 1)[-1]
    return tail


def package_lock(path: str, text: str) -> list[Want]:
    """``package-lock.json`` (lockfileVersion 2 and 3; 1's ``dependencies`` tree too)."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise SourceError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: not a package-lock.json (no top-level object)")
    seen: dict[tuple[str, str], Want] = {}
    packages = data.get("packages")
    if isinstance(packages, dict):
        for key, meta in packages.items():
            if not key or not isinstance(meta, dict) or meta.get("link") or meta.get("bundled"):
                continue
            name = meta.get("name") or _npm_name_from_path(key)
            _npm_want(seen, path, name, meta)
    else:
        stack = [data.get("dependencies") or {}]
        while stack:
            deps = stack.pop()
            for name, meta in deps.items() if isinstance(deps, dict) else ():
                if isinstance(meta, dict):
                    _npm_want(seen, path, name, meta)
                    stack.append(meta.get("dependencies") or {})
    return list(seen.values())


def _npm_want(
    seen: dict[tuple[str, str], Want], path: str, name: str, meta: dict[str, object]
) -> None:
    version, resolved, integrity = meta.get("version"), meta.get("resolved"), meta.get("integrity")
    if not isinstance(version, str) or not isinstance(resolved, str):
        return
    if not resolved.startswith(("http://", "https://")):
        return  # file:, git+, a workspace: not from a registry
    digests = integrity_digests(integrity) if isinstance(integrity, str) else ()
    seen.setdefault((name, version), Want("npm", name, version, digests, resolved))


_YARN_ENTRY = re.compile(r"^(\S.*):\s*$")


def yarn_lock(path: str, text: str) -> list[Want]:
    """``yarn.lock`` version 1 (yarn 2+ writes YAML with ``resolution`` keys: not read)."""
    seen: dict[tuple[str, str], Want] = {}
    name = ""
    fields: dict[str, str] = {}

    def flush() -> None:
        if name and "version" in fields and "resolved" in fields:
            resolved = fields["resolved"].split("#", 1)[0]
            digests = integrity_digests(fields["integrity"]) if "integrity" in fields else ()
            if not digests and "#" in fields["resolved"]:
                digests = (("sha1", fields["resolved"].split("#", 1)[1]),)
            if resolved.startswith(("http://", "https://")):
                seen.setdefault(
                    (name, fields["version"]),
                    Want("npm", name, fields["version"], digests, resolved),
                )

    if "__metadata:" in text:
        raise SourceError(f"{path}: a yarn 2+ lock file (YAML); only yarn 1's yarn.lock is read")
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        entry = _YARN_ENTRY.match(line)
        if entry is not None and not line.startswith(" "):
            flush()
            first = entry.group(1).split(",")[0].strip().strip('"')
            name = first[: first.rindex("@")] if first.rfind("@") > 0 else first
            fields = {}
        elif line.startswith("  ") and not line.startswith("    "):
            key, _, value = line.strip().partition(" ")
            fields[key] = value.strip().strip('"')
    flush()
    return list(seen.values())


_PNPM_KEY = re.compile(r"^  '?/?((?:@[^/@\s]+/)?[^/@\s]+)[@/]([0-9][^(':\s]*)(?:\([^']*\))?'?:\s*$")
_PNPM_INTEGRITY = re.compile(r"^    resolution: \{.*integrity: ([A-Za-z0-9+/=-]+)")


def pnpm_lock(path: str, text: str) -> list[Want]:
    """``pnpm-lock.yaml`` (lockfile versions 5 to 9): the ``packages:`` section's
    ``name@version`` keys and their ``resolution.integrity``. Read line by line in the
    shape pnpm writes; a key it does not recognise (a git or tarball dependency) is
    passed over, since the tarball comes from the packument either way."""
    seen: dict[tuple[str, str], Want] = {}
    in_packages = False
    key: tuple[str, str] | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            in_packages = line.rstrip() == "packages:"
            key = None
            continue
        if not in_packages:
            continue
        m = _PNPM_KEY.match(line)
        if m is not None:
            key = (m.group(1), m.group(2))
            seen.setdefault(key, Want("npm", key[0], key[1]))
            continue
        integrity = _PNPM_INTEGRITY.match(line)
        if integrity is not None and key is not None:
            seen[key] = Want("npm", key[0], key[1], integrity_digests(integrity.group(1)))
    if not seen and "lockfileVersion" not in text:
        raise SourceError(f"{path}: not a pnpm lock file (no lockfileVersion)")
    return list(seen.values())


# -- Debian -------------------------------------------------------------------------------


def debian_list(path: str, text: str) -> list[Want]:
    """Lines of ``SUITE ARCH PACKAGE...`` (``bookworm amd64 curl git``).

    ``dpkg --get-selections`` output (``name<TAB>install``) is read too, when the suite
    and architecture are given on the command line (they arrive in ``extra``).
    """
    wants = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) == 2 and words[1] in ("install", "hold", "deinstall", "purge"):
            if words[1] in ("install", "hold"):
                wants.append(Want("debian", words[0].split(":", 1)[0]))
            continue
        if len(words) < 3:
            raise SourceError(
                f"{path}:{number}: expected 'SUITE ARCH PACKAGE...' "
                f"(e.g. 'bookworm amd64 curl git'), got {line.strip()!r}"
            )
        suite, arch, *names = words
        wants.extend(Want("debian", n, extra=(suite, arch)) for n in names)
    return wants


# -- OCI ----------------------------------------------------------------------------------

_REF = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$")


def parse_image(ref: str) -> tuple[str, str, str]:
    """``docker.io/library/python:3.12-slim`` -> (registry, repository, tag or digest)."""
    if "@" in ref:
        name, _, reference = ref.partition("@")
    else:
        slash = ref.rfind("/")
        colon = ref.rfind(":")
        name, reference = (ref[:colon], ref[colon + 1 :]) if colon > slash else (ref, "latest")
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
    else:
        registry, repository = "docker.io", name
    if registry in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        registry = "docker.io"
        if "/" not in repository:
            repository = "library/" + repository
    if not _REF.match(repository) or not reference:
        raise SourceError(f"{ref!r} is not an image reference (registry/repository:tag)")
    return registry, repository, reference


def image_list(path: str, text: str) -> list[Want]:
    """One image reference a line (``docker.io/library/python:3.12-slim``)."""
    wants = []
    for number, line in enumerate(text.splitlines(), 1):
        ref = line.split("#", 1)[0].strip()
        if not ref:
            continue
        try:
            registry, repository, reference = parse_image(ref)
        except SourceError as e:
            raise SourceError(f"{path}:{number}: {e}") from None
        wants.append(Want("oci", f"{registry}/{repository}", reference))
    return wants


# -- helpers ------------------------------------------------------------------------------


def _list(value: object, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise SourceError(f"{where}: expected a list of tables")
    return value


def _s(table: dict[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str):
        raise SourceError(f"{where}: {key!r} missing or not a string")
    return value
