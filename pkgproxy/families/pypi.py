"""PyPI and indexes like it (pip, uv, poetry): the simple API, the JSON API, the files.

Two routes share this family: ``pypi`` (the index, ``https://pypi.org/``) and
``pypi-files`` (``https://files.pythonhosted.org/``); a private index or devpi is either
one upstream for both (files on the index host) or two. One classify serves both and
tells the URLs apart by their shape, so any route of the family works with any layout.

* ``simple/`` and ``simple/<project>/``: the index. Changes, so it is revalidated after
  the route's ``index_ttl``. Clients choose HTML or JSON by ``Accept`` (PEP 691); the
  proxy negotiates as PyPI does, fetches the chosen type, and keeps each type as its own
  variant. Every file link is rewritten to come back through the proxy
  (:mod:`pkgproxy.rewrite.pypi_simple`). An unnormalised project name is redirected to
  its PEP 503 form, as PyPI does, instead of being fetched and stored twice.
* ``pypi/<project>[/<version>]/json``: the JSON API, revalidated like the index, file
  URLs rewritten.
* Files (wheels, sdists, PEP 658 ``.metadata``): never change under their names, so they
  are kept forever, but only after they match what the project page that linked them
  says (sha256, and the size where the JSON says it). On the files host the path holds
  the file's own BLAKE2b-256 (``packages/aa/bb/<60 hex>/name``), which is checked always,
  with no page needed. A ``.metadata`` file is checked against the page's core-metadata
  hash: the path's digest is its wheel's.

PROTOCOLS.md section 4 gives the details.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from functools import partial
from urllib.parse import unquote, urlsplit

from pkgproxy import httputil
from pkgproxy.config.model import Route
from pkgproxy.digests import Hasher
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
from pkgproxy.httputil import BadPath, canonical_path
from pkgproxy.rewrite import prefix, pypi_simple
from pkgproxy.rewrite.links import Linker
from pkgproxy.rewrite.pypi_simple import HTML, V1_HTML, V1_JSON, normalize

#: The root project list is tens of megabytes and changes only by new projects, which
#: pip never looks for there: it is revalidated this many times less often than pages.
ROOT_TTL_FACTOR = 6

_SIMPLE = r"\+?simple"  # devpi spells it +simple
_ROOT = re.compile(rf"^{_SIMPLE}/$")
_ROOT_BARE = re.compile(rf"^{_SIMPLE}$")
_PROJECT = re.compile(rf"^{_SIMPLE}/(?P<name>[^/]+)/$")
_PROJECT_BARE = re.compile(rf"^{_SIMPLE}/(?P<name>[^/]+)$")
_API = re.compile(r"^pypi/(?P<name>[^/]+)(?:/(?P<version>[^/]+))?/json$")
#: A project name as PEP 508 allows its characters; anything else cannot exist.
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
#: files.pythonhosted.org's content-addressed layout: the BLAKE2b-256 of the file.
_HOSTED = re.compile(r"^packages/(?P<a>[0-9a-f]{2})/(?P<b>[0-9a-f]{2})/(?P<c>[0-9a-f]{60})/[^/]+$")
#: Files whose path digest belongs to the file they describe, not to themselves.
_SIDECAR = (".metadata", ".asc")
#: What a file an index links to is called: distributions and their PEP 658 metadata.
_FILE = re.compile(
    r"[^/]\.(?:whl|tar\.gz|tgz|tar\.bz2|tbz|tar\.xz|txz|tar|zip|egg|exe|msi|rpm|dmg"
    r"|metadata|asc)$",
    re.IGNORECASE,
)

#: The types a simple page comes in, in the order that breaks ties (PROTOCOLS.md 4.3).
OFFERS = (HTML, V1_HTML, V1_JSON)
_ALIASES = {
    "application/vnd.pypi.simple.latest+html": V1_HTML,
    "application/vnd.pypi.simple.latest+json": V1_JSON,
}


def _parse_accept(accept: str) -> Iterator[tuple[str, float]]:
    """``(media range, q)`` of each acceptable element, with PyPI's type aliases."""
    for media, q in httputil.parse_accept(accept):
        yield _ALIASES.get(media, media), q


def negotiate(accept: str) -> str:
    """The simple API type to serve for an ``Accept`` header, as PyPI chooses it.

    Each type takes the q of the most specific range that matches it (``*/*`` <
    ``type/*`` < the type itself); the highest q wins and ties go to the earlier of
    :data:`OFFERS`. No header, or nothing acceptable, gives ``text/html``: PyPI does not
    answer 406, and neither does the proxy.
    """
    ranges = list(_parse_accept(accept))
    best, best_q = HTML, 0.0
    for offer in OFFERS:
        major = offer.split("/", 1)[0]
        q, specificity = 0.0, -1
        for media, mq in ranges:
            if media == offer:
                rank = 2
            elif media == f"{major}/*":
                rank = 1
            elif media == "*/*":
                rank = 0
            else:
                continue
            if rank > specificity:
                q, specificity = mq, rank
        if q > best_q:
            best, best_q = offer, q
    return best


def requested_format(query: str) -> str | None:
    """The type PEP 691's ``?format=`` names, if it names one of :data:`OFFERS`.

    The parameter holds one content type, without q-values or wildcards; the
    ``latest`` aliases mean v1. Anything else is ignored, as PyPI ignores it, and the
    ``Accept`` header decides.
    """
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name == "format":
            # unquote, not parse_qsl: a '+' left unescaped in the type is a '+'.
            media = unquote(value).strip().lower()
            media = _ALIASES.get(media, media)
            return media if media in OFFERS else None
    return None


def _index_page(route: Route, request: Request | None, root: bool) -> Decision:
    """A simple page in the negotiated type: its own variant, rewritten, revalidated.

    A ``?format=`` naming a type overrides ``Accept``; the page is then the same
    variant as when ``Accept`` chose that type (one key, one upstream request with
    ``Accept``), and the query goes no further.
    """
    chosen = requested_format(request.query) if request is not None else None
    consumed = chosen is not None
    if chosen is None:
        chosen = negotiate(request.accept if request is not None else "")
    return Decision(
        CacheClass.MUTABLE,
        ttl=route.index_ttl * (ROOT_TTL_FACTOR if root else 1),
        variant=chosen,
        upstream_headers={"Accept": chosen, **REWRITTEN_CODING},
        response_headers={"Vary": f"Accept, {VARY_CODING}", "Content-Type": chosen},
        rewrite=partial(_rewrite_simple, want_json=chosen == V1_JSON, root=root),
        relink=relink if chosen == V1_JSON and not root else None,
        query_consumed=consumed,
    )


def _redirect(name: str, location: str) -> Decision:
    return Decision(
        CacheClass.PASS,
        local=LocalAnswer(301, f"the project's normalised name is {normalize(name)}", location),
    )


def _not_found(why: str) -> Decision:
    return Decision(CacheClass.PASS, local=LocalAnswer(404, why))


def _known(route: Route, path: str, facts: Facts | None) -> Expect | None:
    """What a page of the file's own project said of the file at ``path``."""
    return facts.get(route.upstream + path) if facts is not None else None


def _file(route: Route, path: str, facts: Facts | None) -> Decision:
    """A distribution or metadata file: forever, once it matches what is known of it.

    A files-host path names the file's BLAKE2b-256. It is checked when no page says
    what the file is; when one does, its sha256 is checked instead and the path's
    digest recorded as named (the page listed the URL: one hash of the body, not two).
    """
    known = _known(route, path, facts)
    m = _HOSTED.match(path)
    if m is None or path.endswith(_SIDECAR):
        return Decision(CacheClass.IMMUTABLE).with_expect(known)
    named = {"blake2b-256": m["a"] + m["b"] + m["c"]}
    if known is not None and known.digests:
        return Decision(CacheClass.IMMUTABLE, named_digests=named).with_expect(known)
    return Decision(CacheClass.IMMUTABLE, digests=named).with_expect(known)


def classify(
    route: Route, path: str, facts: Facts | None = None, request: Request | None = None
) -> Decision:
    """Classify ``path`` (below the route's upstream base, no query) of a PyPI route."""
    if _ROOT.match(path):
        return _index_page(route, request, root=True)
    if _ROOT_BARE.match(path):
        return _redirect("", f"{path}/")
    m = _PROJECT.match(path) or _PROJECT_BARE.match(path)
    if m is not None:
        name = m["name"]
        if not _NAME.match(name):
            return _not_found(f"{name!r} is not a valid project name")
        bare = not path.endswith("/")
        if bare or normalize(name) != name:
            # Relative, so it holds in reverse and forward mode alike.
            return _redirect(name, f"{normalize(name)}/" if bare else f"../{normalize(name)}/")
        return _index_page(route, request, root=False)
    if _API.match(path):
        return Decision(
            CacheClass.MUTABLE,
            ttl=route.index_ttl,
            rewrite=rewrite_api,
            relink=relink,
            upstream_headers=REWRITTEN_CODING,
            response_headers={"Vary": VARY_CODING},
        )
    if _HOSTED.match(path) or _FILE.search(path):
        return _file(route, path, facts)
    if path.startswith("integrity/"):
        return Decision(CacheClass.PASS)  # PEP 740 provenance: small, not worth keeping
    return _not_found(
        "not a PyPI URL: this route serves simple/, simple/<project>/, "
        "pypi/<project>/json and distribution files"
    )


#: The JSON API as the learner names it: the cache key of a rewritten document without a
#: variant still ends in ``@<client base>``, which the learner's key split leaves on.
_API_KEY = re.compile(r"^pypi/[^/]+(?:/[^/]+)?/json(?:@.*)?$")


def learns(path: str) -> bool:
    """Project pages and the JSON API list the files' hashes; the root list does not."""
    return bool(_PROJECT.match(path) or _API_KEY.match(path))


#: An absolute URL's origin and path; and a path that is canonical already (no escapes,
#: no dot segments), for which :func:`canonical_path`'s work per segment can be skipped.
_ORIGIN_PATH = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/?#]*)(/[^?#]*)")
_PLAIN_PATH = re.compile(r"^[A-Za-z0-9/!$&'()*+,;=:@._~-]*$")
_PLAIN_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*/[A-Za-z0-9/!$&'()*+,;=:@._~-]*$")


def _key(url: str) -> str | None:
    """The :class:`Facts` key of a listed file's URL: the URL with its path in the form
    request paths take, so that a link written with ``%2B`` and a client asking with
    ``+`` meet at one key."""
    if "/." not in url and _PLAIN_URL.match(url):
        return url  # the usual link: canonical already, nothing after its path
    m = _ORIGIN_PATH.match(url)
    if m is None:
        return None
    origin, path = m.groups()
    if "/." in path or not _PLAIN_PATH.match(path):
        try:
            path = canonical_path(path)
        except BadPath:
            return None
    return origin + path


#: The project a document describes, from its upstream URL's path.
_PROJECT_OF = re.compile(r"/\+?simple/(?P<a>[^/]+)/?$|/pypi/(?P<b>[^/]+)(?:/[^/]+)?/json$")
_VERSION_START = re.compile(r"v?[0-9]")
_DASHES = str.maketrans("_.", "--")


def project_of(page_url: str) -> str | None:
    """The normalised project of a project page or JSON API document, by its URL."""
    m = _PROJECT_OF.search(urlsplit(page_url).path)
    if m is None:
        return None
    return normalize(unquote(m["a"] or m["b"]))


def owns(project: str, url: str) -> bool:
    """Whether the file at ``url`` belongs to ``project``, by the file name in the URL
    (what a client asks for, not the name the document gives it).

    A wheel names its project before the first ``-``; an sdist (or egg, zip, ...) is
    ``<project>-<version>...`` with a version that starts with a digit.
    """
    if "#" in url or "?" in url:
        url = url.split("#", 1)[0].split("?", 1)[0]
    name = url[url.rfind("/") + 1 :]
    if "%" in name:
        name = unquote(name)
    n = len(project)
    head = name[:n]
    if name[n : n + 1] == "-" and "-" not in head and head.lower().translate(_DASHES) == project:
        # The usual spelling, one separator at a time: no regex needed.
        return name.lower().endswith(".whl") or bool(_VERSION_START.match(name, n + 1))
    for sidecar in _SIDECAR:
        name = name.removesuffix(sidecar)
    if name.lower().endswith(".whl"):
        return normalize(name.split("-", 1)[0]) == project
    flat = normalize(name)
    return flat.startswith(project + "-") and bool(_VERSION_START.match(flat[len(project) + 1 :]))


def index_owner(path: str) -> str | None:
    """The project a project page or JSON API document at ``path`` describes."""
    return project_of("/" + path)


def teach(page_url: str, items: Iterable[pypi_simple.Listed]) -> Learned:
    """What a project's document says of each of its own files.

    Only sha256 is taken (and the size where the JSON gives it): it is the hash every
    stored file has, so a stored file is never refetched for want of a weaker digest.
    The PEP 658 metadata file is filed under the file's URL plus ``.metadata``. A file
    of another project (by its name) is not taught: one project's page must never
    decide what another's files are.
    """
    project = project_of(page_url)
    out: Learned = []
    if project is None:
        return out
    for item in items:
        if not owns(project, item.url):
            continue
        key = _key(item.url)
        if key is None:
            continue
        sha = item.hashes.get("sha256")
        if sha or item.size is not None:
            out.append((key, Expect(item.size, {"sha256": sha} if sha else {})))
        meta = item.metadata_hashes.get("sha256")
        if meta:
            out.append((key + ".metadata", Expect(None, {"sha256": meta})))
    return out


def learn(path: str, body: Iterable[bytes], url: str) -> Learned:
    """What a stored project page or JSON API document teaches, given its bytes (in the
    disk pool).

    Keys are the URLs as the stored document links them; the learner maps links that
    lead through this proxy back to their upstream URLs.
    """
    return teach(url, pypi_simple.listed(b"".join(body), url))


def _rewrite_simple(
    raw_path: str, out_path: str, context: RewriteContext, *, want_json: bool, root: bool
) -> Learned:
    items = pypi_simple.rewrite_simple(raw_path, out_path, context, want_json=want_json, root=root)
    return [] if root else teach(context.page_url, items)


def rewrite_api(raw_path: str, out_path: str, context: RewriteContext) -> Learned:
    """The JSON API's rewriter, which learns from the upstream's document as it goes."""
    return teach(context.page_url, pypi_simple.rewrite_api(raw_path, out_path, context))


def relink(data: bytes, context: RewriteContext) -> bytes | None:
    """A PEP 691 page or JSON API document whose file URLs all start with the files
    route's upstream prefix, with that prefix replaced in its bytes (see
    :func:`pkgproxy.rewrite.prefix.relink`); ``None`` for any other."""
    first = prefix.first_value(data, "url")
    if first is None or context.public_prefix is None:
        return None
    found = context.public_prefix(first)
    return None if found is None else prefix.relink(data, "url", *found)


def file_owners(path: str) -> tuple[str, ...]:
    """The projects whose pages may list the file at ``path``, by the rule of
    :func:`owns`: a wheel's one, or each name an sdist's file name can be cut into
    (``foo-bar-1.0.tar.gz``: ``foo-bar``, or ``foo`` with version ``bar-1.0``? only
    where a version starts)."""
    name = path[path.rfind("/") + 1 :]
    if "%" in name:
        name = unquote(name)
    for sidecar in _SIDECAR:
        name = name.removesuffix(sidecar)
    if name.lower().endswith(".whl"):
        return (normalize(name.split("-", 1)[0]),)
    flat = normalize(name)
    return tuple(
        flat[:i] for i, c in enumerate(flat) if c == "-" and _VERSION_START.match(flat, i + 1)
    )


def lookup(data: prefix.Document, url: str, path: str, page_url: str) -> Learned | None:
    """What a stored PEP 691 page or JSON API document says of the file at ``url``
    (a distribution, or its ``.metadata``), read from that file's own entry.

    ``None`` when the document is not JSON, or the file's link is not found in it as
    the URL spells it: then the whole page is read.
    """
    if data[:1] != b"{":
        return None
    url = url.removesuffix(".metadata")
    name = url[url.rfind("/") + 1 :]
    entries = prefix.objects_at(data, b"/" + name.encode() + b'"')
    if entries is None and "+" in name:  # a local version, as the index may write it
        entries = prefix.objects_at(data, b"/" + name.replace("+", "%2B").encode() + b'"')
    if entries is None:
        return None
    return teach(page_url, pypi_simple.listed_in_json({"files": entries}, Linker(page_url)))


def _blake2b_256() -> Hasher:
    """BLAKE2b with a 32-byte digest: the one files.pythonhosted.org paths are made of
    (``hashlib.new("blake2b")`` gives the 64-byte one)."""
    return hashlib.blake2b(digest_size=32)


#: The built-in routes of this family (a configuration file overrides one by name).
ROUTES: tuple[Route, ...] = (
    # PyPI: the index and the files host are two routes; /pypi/files/ is the longer
    # prefix. Project pages revalidate after 10 minutes, PyPI's own max-age.
    Route(
        name="pypi",
        family="pypi",
        prefix="/pypi/",
        upstream="https://pypi.org/",
        forward=on_both_schemes("pypi.org/"),
        index_ttl=600.0,
    ),
    Route(
        name="pypi-files",
        family="pypi",
        prefix="/pypi/files/",
        upstream="https://files.pythonhosted.org/",
        forward=on_both_schemes("files.pythonhosted.org/"),
        index_ttl=600.0,
    ),
)

FAMILY = Family(
    classify,
    learns,
    learn,
    routes=ROUTES,
    compressed=(".whl",),
    hashers={"blake2b-256": _blake2b_256},
    index_owner=index_owner,
    owns=owns,
    file_owners=file_owners,
    lookup=lookup,
)
