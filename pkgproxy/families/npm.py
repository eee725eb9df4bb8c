"""The npm registry (npm, yarn, pnpm): packuments, tarballs and the ``/-/`` endpoints.

PROTOCOLS.md section 5. Clients point at the route (``--registry http://cache:3142/npm/``)
or, in forward mode, keep ``http://registry.npmjs.org/`` and use pkgproxy as their proxy.

- A packument (``/<name>``, ``/@scope/name``) changes whenever a version is published:
  it is an index, revalidated after the route's ``index_ttl``. Clients ask for one of
  two representations by ``Accept``: the abbreviated "corgi" document
  (``application/vnd.npm.install-v1+json``), which pnpm, yarn and older npm install
  from, or the full one (``npm view``, and npm 11 even to install). They are different
  bodies under one URL, so each is its own variant, and responses say ``Vary: Accept``.
  The served document is rewritten so that every ``dist.tarball`` leads back to this
  proxy (:mod:`pkgproxy.rewrite.npm_packument`).
- A scoped name arrives as ``@scope%2fname`` (npm), ``@scope%2Fname`` or ``@scope/name``
  (other clients); the family sets ``encoded_slash_ok`` so all three are one path and
  one cache entry, ``@scope/name``. The document is fetched as npm asks for it,
  ``@scope%2fname``; scoped tarball paths have a raw slash everywhere.
- A tarball (``/<name>/-/<file>.tgz``) never changes once published: it is kept forever,
  and stored only if it matches the ``dist.integrity`` (SRI, usually sha512) and
  ``dist.shasum`` (sha1) of a packument the cache has read. With no packument read yet
  (a lockfile-driven install) it is checked for length only, and fetched again if a
  packument read later contradicts it.
- ``/-/ping`` is answered here; the registry's read endpoints that install does not use
  pass through uncached; account endpoints are refused (pkgproxy never forwards a
  client's credentials). Writes (publish, login, dist-tag changes) never reach a
  family: the server answers every method but GET and HEAD with 405.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from functools import partial
from urllib.parse import unquote, urlsplit

from pkgproxy import httputil
from pkgproxy.config.model import Route
from pkgproxy.families import (
    REWRITTEN_CODING,
    VARY_CODING,
    CacheClass,
    Decision,
    Expect,
    Facts,
    Family,
    Learned,
    LocalAnswer,
    Request,
    RewriteContext,
    on_both_schemes,
)
from pkgproxy.rewrite import prefix
from pkgproxy.rewrite.npm_packument import (
    JSONObject,
    dists,
    document,
    rewrite_packument,
)

#: The abbreviated ("corgi") packument's media type.
CORGI = "application/vnd.npm.install-v1+json"
#: What pkgproxy asks the registry for, per variant. The corgi request also admits the
#: full document, as npm's own does: a registry that has no abbreviated form sends that.
UPSTREAM_ACCEPT = {
    "corgi": f"{CORGI}; q=1.0, application/json; q=0.8, */*",
    "full": "application/json",
}

_NAME = r"(?:@[^/]+/[^/@][^/]*|[^/@.][^/]*)"
_PACKUMENT = re.compile(rf"^(?P<name>{_NAME})$")
_VERSION_DOC = re.compile(rf"^(?P<name>{_NAME})/(?P<spec>[^/-][^/]*)$")
_TARBALL = re.compile(rf"^(?P<name>{_NAME})/-/(?P<file>[^/]+\.tgz)$")

#: Service endpoints that pass through uncached (reads install does not depend on).
_PASS_ENDPOINTS = re.compile(r"^-/(?:v1/search|package/[^?]+/dist-tags|npm/v1/security/)")
#: The registry's signing keys (``npm audit signatures``): change rarely.
_KEYS = "-/npm/v1/keys"
#: Account endpoints: pkgproxy neither forwards credentials nor has accounts.
_ACCOUNT = re.compile(r"^-/(?:whoami|user/|v1/login|npm/v1/user|npm/v1/tokens|org/|team/)")
_KEYS_TTL = 86400.0

#: A tarball file name that is canonical as it is (no escapes, no dot segment).
_PLAIN_FILE = re.compile(r"[A-Za-z0-9!$&'()*+,;=:@_~-][A-Za-z0-9!$&'()*+,;=:@._~-]*\.tgz$")

_SRI_ALGOS = ("sha512", "sha384", "sha256", "sha1")
_HEX40 = re.compile(r"^[0-9a-fA-F]{40}$")


def wants_corgi(accept: str) -> bool:
    """Whether an ``Accept`` header admits the abbreviated packument (with ``q`` > 0).

    npm sends ``application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8,
    */*`` for installs and ``application/json`` when it needs the full document (``npm
    view``, ``--before``). A malformed ``q`` counts as 0: the full document always
    works, the abbreviated one only for a client that asked for it.
    """
    return any(media == CORGI and q > 0 for media, q in httputil.parse_accept(accept))


def variant(request: Request | None) -> str:
    """``"corgi"`` or ``"full"``: which packument representation a request gets."""
    return "corgi" if request is not None and wants_corgi(request.accept) else "full"


def _document(route: Route, bare: str, request: Request | None) -> Decision:
    """A packument or version document: revalidated, negotiated, rewritten.

    A scoped name is sent upstream as npm itself sends it, ``@scope%2fname``: the
    public registry also answers a raw slash, but a registry behind a stricter router
    may not.
    """
    which = variant(request)
    upstream_url = None
    if bare.startswith("@"):
        scope, _, rest = bare.partition("/")
        upstream_url = f"{route.upstream}{scope}%2f{rest}"
    return Decision(
        CacheClass.MUTABLE,
        ttl=route.index_ttl,
        variant=which,
        upstream_headers={"Accept": UPSTREAM_ACCEPT[which], **REWRITTEN_CODING},
        response_headers={"Vary": f"Accept, {VARY_CODING}"},
        rewrite=partial(_rewrite, base=route.upstream, owner=_owner(bare)),
        relink=relink,
        upstream_url=upstream_url,
    )


def _endpoint(path: str) -> Decision:
    """A registry service endpoint (``/-/...``), GET or HEAD."""
    bare = path.split("?", 1)[0]
    if bare == "-/ping":
        # npm ping and npm doctor: the proxy is the registry these clients talk to.
        return Decision(
            CacheClass.PASS, local=LocalAnswer(200, "{}\n", content_type="application/json")
        )
    if bare == _KEYS:
        return Decision(CacheClass.MUTABLE, ttl=_KEYS_TTL)
    if _PASS_ENDPOINTS.match(bare):
        return Decision(CacheClass.PASS)
    if _ACCOUNT.match(bare):
        return Decision(
            CacheClass.PASS,
            local=LocalAnswer(
                403,
                f"/{bare} is an account endpoint: pkgproxy is a read-only cache and never "
                "forwards credentials; log in to the registry itself",
            ),
        )
    return Decision(
        CacheClass.PASS,
        local=LocalAnswer(404, f"/{bare} is not offered through pkgproxy"),
    )


def classify(
    route: Route, path: str, facts: Facts | None = None, request: Request | None = None
) -> Decision:
    """Classify ``path`` (below the registry root, scoped names with a real ``/``)."""
    bare = path.split("?", 1)[0]
    if bare.startswith("-/"):
        return _endpoint(path)
    if _TARBALL.match(bare):
        known = facts.get(route.upstream + bare) if facts is not None else None
        return Decision(CacheClass.IMMUTABLE).with_expect(known)
    if _PACKUMENT.match(bare) or _VERSION_DOC.match(bare):
        return _document(route, bare, request)
    # The registry root, odd paths: nothing to keep, nothing to rewrite.
    return Decision(CacheClass.PASS)


def learns(path: str) -> bool:
    """Packuments and version documents list the digests of their tarballs."""
    bare = path.split("?", 1)[0]
    if bare.startswith("-/"):
        return False
    return bool(_PACKUMENT.match(bare) or _VERSION_DOC.match(bare))


def sri_digests(integrity: str) -> dict[str, str]:
    """Hex digests by :mod:`hashlib` name from an SRI string (``sha512-<base64> ...``).

    Tokens of unknown algorithms, bad base64 or the wrong length are skipped. An
    algorithm listed with two different values is dropped: SRI lets either match, and
    a check can only require one.
    """
    seen: dict[str, set[str]] = {}
    for token in integrity.split():
        algo, sep, value = token.partition("-")
        algo = algo.lower()
        if not sep or algo not in _SRI_ALGOS:
            continue
        value = value.split("?", 1)[0]  # SRI options
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(raw) != hashlib.new(algo).digest_size:
            continue
        seen.setdefault(algo, set()).add(raw.hex())
    return {algo: next(iter(values)) for algo, values in seen.items() if len(values) == 1}


def expect_of(dist: dict[str, object]) -> Expect | None:
    """What a version's ``dist`` says its tarball must be, or ``None`` if nothing usable.

    ``integrity`` wins over ``shasum`` for sha1, as in npm itself. ``unpackedSize`` is
    the size of the unpacked files, not of the tarball, so no size is expected.
    """
    integrity = dist.get("integrity")
    digests = sri_digests(integrity) if isinstance(integrity, str) else {}
    shasum = dist.get("shasum")
    if isinstance(shasum, str) and _HEX40.match(shasum):
        digests.setdefault("sha1", shasum.lower())
    return Expect(None, digests) if digests else None


def _registry_base(path: str, url: str) -> str | None:
    """The route's upstream base, from a document's path below it and its upstream URL.

    The path has a scoped name's slash as a real one; the URL as it was fetched
    (``@scope%2fname``).
    """
    bare_url = url.split("?", 1)[0].replace("%2f", "/").replace("%2F", "/")
    bare_path = path.split("?", 1)[0]
    if bare_path and bare_url.endswith(bare_path):
        return bare_url[: len(bare_url) - len(bare_path)]
    return None


def tarball_url(base: str | None, tarball: str) -> str | None:
    """The upstream URL that a client's request for ``tarball`` is checked against.

    The stored document is the rewritten one, whose tarball URLs name the proxy as one
    client reached it, not the registry. What the client requests below the route is
    the part of the URL from the package name on (``<name>/-/<file>``, the name scoped
    or not), so that part, in the canonical form a request path takes, is appended to
    the registry's base. A URL of another shape (no ``/-/``) is taken as it is.
    """
    parts = urlsplit(tarball)
    segments = parts.path.split("/")
    if base is None or len(segments) < 3 or segments[-2] != "-":
        return tarball if parts.scheme in ("http", "https") else None
    name = unquote(segments[-3])
    if len(segments) >= 4 and segments[-4].startswith("@") and "/" not in name:
        name = f"{unquote(segments[-4])}/{name}"
    try:
        return base + httputil.canonical_path(f"{name}/-/{unquote(segments[-1])}")
    except httputil.BadPath:
        return None


def _owner(path: str) -> str | None:
    """The package a packument or version document at ``path`` describes."""
    bare = path.split("?", 1)[0]
    m = _PACKUMENT.match(bare) or _VERSION_DOC.match(bare)
    return m["name"] if m is not None else None


def owns(name: str, path: str) -> bool:
    """Whether the file at ``path`` is one of package ``name``'s tarballs (the only
    files its documents teach of)."""
    return path.startswith(name) and path.startswith("/-/", len(name))


def learn(path: str, body: Iterable[bytes], url: str) -> Learned:
    """``tarball URL -> digests`` from a stored packument's bytes (runs in the disk pool).

    A document that cannot be read teaches nothing (its fetch already failed it).
    """
    try:
        with document(b"".join(body)) as doc:
            return _learn_document(doc, _registry_base(path, url), _owner(path))
    except ValueError:
        return []


def _rewrite(
    raw_path: str, out_path: str, context: RewriteContext, *, base: str, owner: str | None
) -> Learned:
    """The packument rewriter, learning from the registry's document in the same pass."""
    learned = rewrite_packument(
        raw_path, out_path, context, partial(_learn_document, base=base, owner=owner)
    )
    return learned if learned is not None else []


def relink(data: bytes, context: RewriteContext) -> bytes | None:
    """A document whose tarballs are all under the registry's own prefix, with that
    prefix replaced in its bytes (see :func:`pkgproxy.rewrite.prefix.relink`); ``None``
    for any other."""
    if context.public_prefix is None:
        return None
    found = context.public_prefix(context.page_url)
    return None if found is None else prefix.relink(data, "tarball", *found)


def file_owners(path: str) -> tuple[str, ...]:
    """The package whose documents may list the tarball at ``path``."""
    name, sep, _ = path.partition("/-/")
    return (name,) if sep else ()


def lookup(data: prefix.Document, url: str, path: str, page_url: str) -> Learned | None:
    """What a stored document says of the tarball at ``url``, read from its ``dist``.

    ``None`` when the tarball is not found in it as the URL spells it: then the whole
    document is read.
    """
    file = url[url.rfind("/-/") :]
    dists = prefix.objects_at(data, file.encode() + b'"') if file.startswith("/-/") else None
    if dists is None:
        return None
    base, owner = _registry_base(path, page_url), _owner(path)
    return [item for dist in dists for item in _learn_document({"dist": dist}, base, owner)]


def _learn_document(doc: JSONObject, base: str | None, owner: str | None) -> Learned:
    """The checks of each version's tarball, by the upstream URL requests map to.

    Only the tarballs of the document's own package (``owner``, from the document's
    path, not from what the document says) are taught: a packument of ``evil`` must not
    decide what ``good``'s tarballs are.
    """
    out: Learned = []
    if base is None or owner is None:
        return out
    own = base + owner + "/-/"
    for _name, dist in dists(doc):
        tarball = dist.get("tarball")
        expect = expect_of(dist)
        if not isinstance(tarball, str) or expect is None:
            continue
        if tarball.startswith(own) and _PLAIN_FILE.match(tarball, len(own)):
            out.append((tarball, expect))  # the registry's own URL, already canonical
            continue
        target = tarball_url(base, tarball)
        if target is not None and target.startswith(own):
            out.append((target, expect))
    return out


#: The built-in routes of this family (a configuration file overrides one by name).
ROUTES: tuple[Route, ...] = (
    # Packuments revalidate after 5 minutes, the registry's own max-age.
    Route(
        name="npm",
        family="npm",
        prefix="/npm/",
        upstream="https://registry.npmjs.org/",
        forward=on_both_schemes("registry.npmjs.org/"),
        index_ttl=300.0,
    ),
)

FAMILY = Family(
    classify,
    learns,
    learn,
    encoded_slash_ok=True,
    root_alias=re.compile(r"^/(?:@[^/]+/)?[^/@][^/]*/-/[^/]+\.tgz$"),
    # npm install's audit: answered by the registry, never cached.
    post_through=re.compile(r"^-/npm/v1/security/(?:advisories/bulk|audits(?:/quick)?)$"),
    routes=ROUTES,
    index_owner=_owner,
    owns=owns,
    file_owners=file_owners,
    lookup=lookup,
)
