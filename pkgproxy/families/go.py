"""Go modules (the GOPROXY protocol, ``go help goproxy``) and the checksum database.

Clients use the route as ``GOPROXY=http://cache:3142/go/,direct``.

- ``<module>/@v/<version>.info``, ``.mod`` and ``.zip`` of a canonical semantic version
  never change once published: kept forever. An ``.info`` of anything else (a branch or
  a commit prefix, which the proxy resolves) is an index.
- ``<module>/@v/list`` and ``<module>/@latest`` are indexes, revalidated after the
  route's ``index_ttl`` and served stale when the upstream is down.
- Module paths and versions arrive case-encoded (``!`` and the lower-case letter for an
  upper-case one); a path with an upper-case letter is not a GOPROXY URL.
- A 404 or 410 means "no such module or version", an answer ``go`` relies on to try
  the next proxy; it is remembered briefly, for version files too.
- ``sumdb/<db>/supported``, ``latest`` (the signed tree head: an index), ``lookup/``
  (an index, read for the ``h1:`` hashes it gives) and ``tile/`` (immutable) proxy the
  checksum database, so ``GOSUMDB`` keeps working through pkgproxy.
- Where a lookup made through pkgproxy gave the hashes of a version, its ``.zip`` is
  stored only if its ``h1:`` directory hash matches, its ``.mod`` only if the
  ``/go.mod`` hash does (:class:`pkgproxy.digests.GoZipHasher`). With no lookup seen
  (``GOSUMDB=off``, a private module) nothing is checked here; ``go`` checks against
  its go.sum itself.
"""

from __future__ import annotations

import re

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
    upstream_base,
)

_MODULE = r"(?P<module>[^@]+?)"
_VERSION_FILE = re.compile(rf"^{_MODULE}/@v/(?P<version>[^/]+)\.(?P<ext>info|mod|zip)$")
_INDEX = re.compile(rf"^{_MODULE}/(?:@v/list|@latest)$")
#: A canonical semantic version (golang.org/x/mod/semver), case-encoded: the versions
#: whose files never change.
_CANONICAL = re.compile(
    r"^v(?:0|[1-9][0-9]*)\.(?:0|[1-9][0-9]*)\.(?:0|[1-9][0-9]*)"
    r"(?:-[0-9a-z!.-]+)?(?:\+incompatible)?$"
)
_SUMDB = re.compile(r"^sumdb/(?P<db>[^/]+)/(?P<rest>.*)$")
_TILE = re.compile(r"^tile/[0-9]+/(?:[0-9]+|data)/(?:x[0-9]{3}/)*[0-9]{3}(?:\.p/[0-9]+)?$")
_LOOKUP = re.compile(r"^lookup/(?P<module>[^@]+)@(?P<version>[^/@]+)$")
#: A go.sum line: module, version (``/go.mod`` for the go.mod's hash), hash.
_SUM_LINE = re.compile(r"^(?P<module>\S+) (?P<version>[^\s/]+)(?P<mod>/go\.mod)? (?P<h1>h1:\S+)$")


def escape(path: str) -> str:
    """A module path or version case-encoded as the proxy protocol wants it."""
    return re.sub(r"[A-Z]", lambda m: "!" + m.group().lower(), path)


def _not_found(why: str) -> Decision:
    return Decision(CacheClass.PASS, local=LocalAnswer(404, why))


def _sumdb(route: Route, rest: str) -> Decision:
    """A checksum database path below ``sumdb/<db>/``."""
    if _TILE.match(rest):
        return Decision(CacheClass.IMMUTABLE)
    if rest in ("supported", "latest") or _LOOKUP.match(rest):
        return Decision(CacheClass.MUTABLE, ttl=route.index_ttl)
    return _not_found("not a checksum database URL: supported, latest, lookup/ and tile/ are")


def classify(
    route: Route, path: str, facts: Facts | None = None, request: Request | None = None
) -> Decision:
    """Classify ``path`` (below the GOPROXY base) of a Go route."""
    m = _SUMDB.match(path)
    if m is not None:
        return _sumdb(route, m["rest"])
    if any(c.isupper() for c in path):
        return _not_found("a GOPROXY path is case-encoded: !x for an upper-case X")
    m = _VERSION_FILE.match(path)
    if m is not None:
        if not _CANONICAL.match(m["version"]):
            # A query (a branch, a commit) the upstream resolves: its answer moves.
            return Decision(CacheClass.MUTABLE, ttl=route.index_ttl)
        decision = Decision(CacheClass.IMMUTABLE, absent_ttl=route.index_ttl)
        return decision.with_expect(listed(facts, route, path))
    if _INDEX.match(path):
        return Decision(CacheClass.MUTABLE, ttl=route.index_ttl)
    return _not_found(
        "not a GOPROXY URL: <module>/@v/list, <module>/@latest, <module>/@v/<version>"
        ".info|.mod|.zip and sumdb/ are"
    )


def learns(path: str) -> bool:
    """A checksum database lookup gives the hashes of one version's zip and go.mod."""
    m = _SUMDB.match(path)
    return m is not None and _LOOKUP.match(m["rest"]) is not None


def parse_lookup(text: str) -> list[tuple[str, str, bool, str]]:
    """``(module, version, is go.mod, h1 hash)`` of each go.sum line of a lookup answer.

    The answer is the record (its number, then go.sum lines), a blank line and the
    signed tree head; the signature is ``go``'s to check, not pkgproxy's.
    """
    out = []
    for line in text.splitlines():
        m = _SUM_LINE.match(line)
        if m is not None:
            out.append((m["module"], m["version"], bool(m["mod"]), m["h1"]))
    return out


def learn(path: str, local_file: str, url: str) -> list[tuple[str, Expect]]:
    """The expected ``h1:`` of the ``.zip`` and ``.mod`` a lookup names (disk pool)."""
    base = upstream_base(url, path)
    if base is None:
        return []
    with open(local_file, "rb") as f:
        text = f.read(64 * 1024).decode("utf-8", "replace")
    out = []
    for module, version, is_mod, h1 in parse_lookup(text):
        ext, algo = ("mod", "go-h1-mod") if is_mod else ("zip", "go-h1-zip")
        target = f"{base}{escape(module)}/@v/{escape(version)}.{ext}"
        out.append((target, Expect(None, {algo: h1})))
    return out


#: The built-in routes of this family (a configuration file overrides one by name).
ROUTES: tuple[Route, ...] = (
    # Go modules and RubyGems: released versions never change; module lists, @latest
    # and the gem indexes revalidate after 5 minutes.
    Route(
        name="go",
        family="go",
        prefix="/go/",
        upstream="https://proxy.golang.org/",
        forward=(
            "http://proxy.golang.org/",
            "https://proxy.golang.org/",
        ),
        index_ttl=300.0,
    ),
)

FAMILY = Family(classify, learns, learn, routes=ROUTES)
