"""RubyGems repositories (gem, bundler): the compact index, the full index, the gems.

Clients use the route as ``gem sources --add http://cache:3142/rubygems/`` or
``bundle config mirror.https://rubygems.org http://cache:3142/rubygems/``.

- The compact index, which bundler and RubyGems 3 install from: ``versions`` (every
  gem's versions, large and append-only: bundler asks for its new end with ``Range``
  and ``If-None-Match``, both answered from the stored copy), ``names`` and
  ``info/<gem>`` (one line per version, with its sha256 as ``checksum:``). All are
  indexes, revalidated after the route's ``index_ttl``. bundler takes a file's ETag
  for the MD5 of its content, so the stored copies are served with exactly that.
- The full index that ``gem generate_index`` makes and older clients read:
  ``specs.4.8.gz``, ``latest_specs.4.8.gz``, ``prerelease_specs.4.8.gz`` (indexes)
  and ``quick/Marshal.4.8/<gem>-<version>.gemspec.rz`` (never change).
- ``gems/<gem>-<version>[-<platform>].gem`` never changes once pushed: kept forever,
  and stored only if it matches the sha256 of a cached ``info/<gem>`` that lists it.
- The server root, whose HEAD tells RubyGems whether there is a compact index, is an
  index too, fetched and stored on a HEAD, so that the answer holds when the upstream
  is down.
- ``api/v1/dependencies`` (retired on rubygems.org) is answered 404 here, which sends
  bundler to the compact index; the rest of ``api/`` passes through uncached.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from dataclasses import replace

from pkgproxy.config.model import Route
from pkgproxy.families import (
    CacheClass,
    Decision,
    Expect,
    Facts,
    Family,
    LocalAnswer,
    Request,
    listed,
    on_both_schemes,
    upstream_base,
)
from pkgproxy.families.compressed import Chunks, stream

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_INFO = re.compile(rf"^info/(?P<name>{_NAME})$")
_GEM = re.compile(rf"^gems/{_NAME}\.gem$")
_GEMSPEC = re.compile(rf"^quick/Marshal\.4\.8/{_NAME}\.gemspec\.rz$")
_FULL_INDEX = re.compile(
    r"^(?:(?:latest_|prerelease_)?specs\.4\.8(?:\.gz)?|Marshal\.4\.8(?:\.Z)?|yaml(?:\.Z)?)$"
)
_DEPENDENCIES = re.compile(r"^api/v1/dependencies(?:\.json)?$")
#: One version line of an info file: version (with its platform), dependencies,
#: requirements (``checksum:<sha256>`` among them).
_INFO_LINE = re.compile(r"^(?P<version>[^ |]+) [^|]*\|(?P<requirements>.*)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _index(route: Route) -> Decision:
    return Decision(CacheClass.MUTABLE, ttl=route.index_ttl, etag_digest="md5")


def classify(
    route: Route, path: str, facts: Facts | None = None, request: Request | None = None
) -> Decision:
    """Classify ``path`` (below the repository root) of a RubyGems route."""
    if _GEM.match(path):
        return Decision(CacheClass.IMMUTABLE).with_expect(listed(facts, route, path))
    if _GEMSPEC.match(path):
        return Decision(CacheClass.IMMUTABLE)
    if path == "":
        return replace(_index(route), head_fetches=True)
    if path in ("versions", "names") or _INFO.match(path) or _FULL_INDEX.match(path):
        return _index(route)
    if _DEPENDENCIES.match(path):
        return Decision(
            CacheClass.PASS,
            local=LocalAnswer(404, "the dependency API is retired: use the compact index"),
        )
    # The rest of the API and odd paths: nothing to keep.
    return Decision(CacheClass.PASS)


def learns(path: str) -> bool:
    """An info file gives the sha256 of each version's .gem."""
    return _INFO.match(path) is not None


def parse_info(name: str, lines: Iterable[str]) -> list[tuple[str, str]]:
    """``(gem file name, sha256)`` of each version line of ``info/<name>``."""
    out = []
    for line in lines:
        m = _INFO_LINE.match(line.rstrip("\n"))
        if m is None:
            continue
        for requirement in m["requirements"].split(","):
            key, _, value = requirement.partition(":")
            if key == "checksum" and _SHA256.match(value):
                out.append((f"{name}-{m['version']}.gem", value))
    return out


def learn(path: str, body: Chunks, url: str) -> list[tuple[str, Expect]]:
    """The sha256 each ``.gem`` an info file lists must have (in the disk pool)."""
    m = _INFO.match(path)
    base = upstream_base(url, path)
    if m is None or base is None:
        return []
    with io.TextIOWrapper(stream(body), encoding="utf-8", errors="replace") as f:
        return [
            (f"{base}gems/{file}", Expect(None, {"sha256": sha}))
            for file, sha in parse_info(m["name"], f)
        ]


#: The built-in routes of this family (a configuration file overrides one by name).
ROUTES: tuple[Route, ...] = (
    Route(
        name="rubygems",
        family="rubygems",
        prefix="/rubygems/",
        upstream="https://rubygems.org/",
        forward=on_both_schemes("rubygems.org/", "index.rubygems.org/"),
        index_ttl=300.0,
    ),
)

FAMILY = Family(classify, learns, learn, routes=ROUTES)
