"""Family policies: pure functions that say how each URL of a repository is cached.

A family classifies a path (already relative to its route's upstream base) into a
:class:`Decision`. It does no network I/O and imports nothing from Twisted, so each
family is tested as plain functions. A new family is one module and one entry in
:data:`FAMILIES`.

Indexes teach the cache what the files they list must be: a family may ``learn`` from a
committed index (a Debian ``Packages`` file, an Alpine ``APKINDEX``) the size and digests
of artifacts, which :class:`Facts` keeps and ``classify`` turns into checks made before
an artifact is stored. ``learn`` is given the index's bytes; a family opens no file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING

from pkgproxy import digests, httputil
from pkgproxy.digests import Hasher
from pkgproxy.rewrite.context import RewriteContext as RewriteContext
from pkgproxy.rewrite.prefix import Document

if TYPE_CHECKING:
    from pkgproxy.config.model import Route


class CacheClass(Enum):
    """How a URL is cached."""

    #: Content never changes: cached forever, never revalidated, verified before commit.
    IMMUTABLE = "immutable"
    #: An index: stored with validators and revalidated after a TTL.
    MUTABLE = "mutable"
    #: Forwarded, never stored.
    PASS = "pass"


def on_both_schemes(*locations: str) -> tuple[str, ...]:
    """``http://`` and ``https://`` of each ``host/path/`` in turn: the forward-proxy
    prefixes of a built-in route, whose clients may name its upstream either way."""
    return tuple(f"{scheme}://{loc}" for loc in locations for scheme in ("http", "https"))


@dataclass(frozen=True)
class Expect:
    """What an index says one artifact must be.

    :ivar alternate: an upstream URL serving exactly these bytes under a name that never
        changes (Debian's by-hash), to fetch instead of the listed name.
    :ivar not_after: a time after which the document must not be served at all, even
        stale (an InRelease past its Valid-Until, which apt would refuse anyway).
    """

    size: int | None = None
    digests: Mapping[str, str] = field(default_factory=dict)
    alternate: str | None = None
    not_after: float | None = None


#: What to ask for a document that is rewritten: gzip, as direct clients take it (a
#: fraction of the bytes); the fetch decompresses it after checking it, to rewrite it.
REWRITTEN_CODING = {"Accept-Encoding": "gzip"}
#: A rewritten document is served gzip-compressed to clients that take it.
VARY_CODING = "Accept-Encoding"

#: What a document teaches: ``(artifact upstream URL, Expect)`` pairs.
Learned = list[tuple[str, "Expect"]]
#: ``(raw file, output file, context)``: writes the representation clients are served,
#: and returns what the upstream's document teaches (learned in the same pass), or
#: ``None`` where the document is not learned from.
Rewriter = Callable[[str, str, RewriteContext], Learned | None]
#: ``(document, context) -> served bytes | None``: the rewrite done on the bytes alone,
#: where they prove it exact (``None``: the :data:`Rewriter` does it). Nothing is learned
#: on the way: what the served document says of a file is read when that file is asked
#: for (:attr:`Family.lookup`).
Relinker = Callable[[bytes, RewriteContext], bytes | None]


@dataclass(frozen=True)
class LocalAnswer:
    """A response the proxy gives itself, without asking upstream (a redirect, a 404).

    An error's ``message`` is a one-line reason; a 2xx answer's is its whole body, sent
    with ``content_type``.
    """

    status: int
    message: str
    location: str | None = None
    content_type: str = "text/plain; charset=utf-8"
    headers: Mapping[str, str] = field(default_factory=dict)


#: How much of the start of a body :attr:`Decision.version_of` is given.
VERSION_HEAD = 16 * 1024


@dataclass(frozen=True)
class Decision:
    """What a family says about one URL.

    :ivar ttl: seconds a stored copy is fresh without asking upstream; ``None`` means
        "as the upstream's Cache-Control/Expires/Last-Modified say" (RFC 9111).
    :ivar digests: digests the body must match, by algorithm name (a :mod:`hashlib`
        name, or one of :data:`pkgproxy.digests.SPECIAL`), in that algorithm's usual
        text form (lower-case hex for hashlib).
    :ivar named_digests: digests the URL itself names (a content-addressed path) that
        are not checked because ``digests`` holds one an index gave: the index, checked,
        vouches for the bytes behind the URL. They are recorded with the stored copy as
        named, so a later request that knows only the URL finds it (one hash per body
        instead of two).
    :ivar size: the byte count the body must have, when the family knows it.
    :ivar variant: which representation of the URL this is (from ``Accept``); part of
        the cache key, so one client's variant is never served to another.
    :ivar upstream_headers: headers to send upstream (the negotiated ``Accept``).
    :ivar response_headers: headers to add to the response (``Vary``, a content type).
    :ivar rewrite: turns the verified upstream body into what clients are served.
    :ivar relink: the same, on a document the family can rewrite from its bytes alone
        (tried first; see :data:`Relinker`).
    :ivar local: answer this without contacting upstream.
    :ivar upstream_url: fetch this URL instead of the one the path maps to (the same
        content under a name that cannot be out of step, such as a by-hash URL); the
        entry is still stored under the requested path.
    :ivar digest_header: a response header naming the body's digest as
        ``algorithm:hex`` (OCI's ``Docker-Content-Digest``), checked before storing.
    :ivar head_revalidate: revalidate a stale copy with HEAD, comparing
        ``digest_header`` (a registry counts GETs against pull limits, not HEADs).
    :ivar revalidate_also: paths of the same route whose stored copies are revalidated
        before they are served again once this one comes back changed from upstream
        (the detached signature of a file that is signed).
    :ivar version_of: reads the version stamp of a body (a Release file's ``Date``) from
        its first :data:`VERSION_HEAD` bytes; ``None`` if it has none. A revalidation
        that brings a body older than the stored one keeps the stored one and serves
        it: a mirror that lags behind another must not take the cache back in time.
    :ivar query_consumed: the request's query was for the family (PEP 691's
        ``?format=``, already turned into ``variant`` and ``upstream_headers``): it is
        neither part of the cache key nor sent upstream.
    """

    cache_class: CacheClass
    ttl: float | None = None
    digests: Mapping[str, str] = field(default_factory=dict)
    named_digests: Mapping[str, str] = field(default_factory=dict)
    size: int | None = None
    variant: str = ""
    upstream_headers: Mapping[str, str] = field(default_factory=dict)
    response_headers: Mapping[str, str] = field(default_factory=dict)
    rewrite: Rewriter | None = None
    relink: Relinker | None = None
    local: LocalAnswer | None = None
    upstream_url: str | None = None
    digest_header: str | None = None
    head_revalidate: bool = False
    query_consumed: bool = False
    revalidate_also: tuple[str, ...] = ()
    version_of: Callable[[bytes], float | None] | None = None
    #: Store under this route name instead of the request's (content shared by routes).
    key_scope: str | None = None
    #: Seconds an upstream 404 or 410 for this path is remembered, for a path that is
    #: not an index (GOPROXY's "no such version", an answer clients rely on); an
    #: index's is remembered for its ``ttl`` anyway.
    absent_ttl: float | None = None
    #: A :mod:`hashlib` digest of the body, computed as it is stored, whose quoted hex
    #: is the stored copy's ETag in place of the upstream's (bundler takes a compact
    #: index file's ETag for the MD5 of its content and checks its copy against it).
    etag_digest: str | None = None
    #: A HEAD with nothing stored fetches and stores the body as a GET would, so that
    #: later HEADs are answered from the stored copy, stale when the upstream is down
    #: (RubyGems tells a compact index from a full one by a HEAD of the root).
    head_fetches: bool = False

    @property
    def remembers_absence(self) -> bool:
        """Whether an upstream 404 or 410 for this path is remembered for a while."""
        return self.cache_class is CacheClass.MUTABLE or self.absent_ttl is not None

    def with_expect(self, expect: Expect | None) -> Decision:
        """This decision, also checking what an index said."""
        if expect is None:
            return self
        return replace(
            self,
            digests={**expect.digests, **self.digests},
            size=self.size if self.size is not None else expect.size,
        )


class Facts:
    """What cached indexes say, by upstream URL: the checks for later downloads.

    Keyed by URL because an index may describe files another route serves (a PyPI page
    lists files on the files host). What a document teaches is filed under its own
    upstream URL (its source): learning a document again replaces what it taught
    before, and :meth:`forget` drops it with the document's last cached copy, so the
    table is as large as the documents the cache holds, whoever asked for them.
    """

    def __init__(self) -> None:
        self._known: dict[str, Expect] = {}
        #: The document, or documents, that taught each URL (one, nearly always).
        self._sources_of: dict[str, str | tuple[str, ...]] = {}
        self._taught: dict[str, list[str]] = {}
        #: Changes whenever something is learned: a decision made under an older
        #: generation may no longer hold (the cache's hit path checks it).
        self.generation = 0

    def get(self, url: str) -> Expect | None:
        """What must be true of the file at ``url``, if an index said."""
        return self._known.get(url)

    def add(
        self, items: Iterable[tuple[str, Expect]], source: str | None = None, more: bool = False
    ) -> int:
        """Record what an index lists; returns how many items it had.

        :param source: the index's upstream URL; what it taught before is replaced,
            unless ``more`` (then these are more of what the same copy teaches, read
            from it one file at a time).
        """
        if source is not None and not more:
            self._drop(source)
        taught = self._taught.get(source, []) if source is not None and more else []
        sources = self._sources_of
        for url, expect in items:
            self._known[url] = expect
            taught.append(url)
            if source is None:
                sources.pop(url, None)  # never forgotten
                continue
            had = sources.get(url)
            if had is None:
                sources[url] = source
            elif had != source and not (isinstance(had, tuple) and source in had):
                sources[url] = (had, source) if isinstance(had, str) else (*had, source)
        if source is not None:
            self._taught[source] = taught
        self.generation += 1
        return len(taught)

    def forget(self, source: str) -> None:
        """Drop what the index at ``source`` taught (its last cached copy is gone); a
        URL another cached index also lists stays."""
        if source in self._taught:
            self._drop(source)
            self.generation += 1

    def _drop(self, source: str) -> None:
        sources = self._sources_of
        for url in self._taught.pop(source, ()):
            had = sources.get(url)
            if had == source:
                del sources[url]
                del self._known[url]
            elif isinstance(had, tuple) and source in had:
                rest = tuple(s for s in had if s != source)
                sources[url] = rest[0] if len(rest) == 1 else rest

    def sources(self) -> int:
        """How many documents the facts come from."""
        return len(self._taught)

    def __len__(self) -> int:
        return len(self._known)


def listed(facts: Facts | None, route: Route, path: str) -> Expect | None:
    """What a cached index said of the file at ``path`` of ``route``, if one did."""
    return facts.get(route.upstream + path) if facts is not None else None


def upstream_base(url: str, path: str) -> str | None:
    """The route's upstream base, from an index's path below it and its upstream URL."""
    return url[: len(url) - len(path)] if url.endswith(path) else None


def _never(path: str) -> bool:
    return False


@dataclass(frozen=True)
class Request:
    """What a family may know of the client's request besides its path."""

    accept: str = ""
    #: The query string, without its ``?`` (empty when there is none).
    query: str = ""


class Refused(Exception):
    """A request target a family's own routing refuses (answered 403, in its format)."""


@dataclass(frozen=True)
class Family:
    """One repository format.

    :ivar classify: ``(route, path, facts, request) -> Decision``; pure. ``path`` is
        canonical, below the route's upstream base, without the query (which is in
        the request).
    :ivar learns: whether the body at ``path`` is an index worth reading; pure.
    :ivar learn: ``(path, body, url) -> [(artifact URL, Expect)]``: what the index at
        ``path`` lists, given its bytes (``body``: its chunks in order, read once; see
        :mod:`pkgproxy.families.compressed`). It opens no file, but parsing is CPU work,
        so it runs in the disk pool. ``url`` is the index's own upstream URL.
    :ivar encoded_slash_ok: an encoded slash (``%2F``) in a request path is part of a
        name and is taken as a real ``/`` (npm's ``@scope%2fname``), so every spelling is
        one path; without it such a path is refused, since a segment hiding a ``/``
        could name something outside its route.
    :ivar error_body: ``(status, message) -> (content type, body)`` for errors the
        proxy itself answers on this family's routes, where the clients expect a format
        of their own (OCI's JSON error list); plain text otherwise.
    """

    classify: Callable[[Route, str, Facts, Request], Decision]
    learns: Callable[[str], bool] = _never
    learn: Callable[[str, Iterable[bytes], str], list[tuple[str, Expect]]] | None = None
    encoded_slash_ok: bool = False
    error_body: Callable[[int, str], tuple[str, bytes]] | None = None
    #: Paths at the server's root that also belong to this family's first route (npm 9+
    #: moves registry.npmjs.org tarball URLs onto the registry's host, dropping /npm).
    root_alias: re.Pattern[str] | None = None
    #: Paths (below the route) whose POSTs are relayed upstream uncached, as they are
    #: (npm's audit); every other POST is refused.
    post_through: re.Pattern[str] | None = None
    #: The routes this family brings built in (a configuration file overrides one by name).
    routes: tuple[Route, ...] = ()
    #: A path root where every route of this family lives, and no other route (OCI's
    #: ``/v2/``): a route of it given no prefix is ``<root><route name>/``.
    prefix_root: str | None = None
    #: The one-line error for a route prefix that breaks :attr:`prefix_root`.
    prefix_root_error: str = ""
    #: File name suffixes of this family's package formats, whose bytes are already
    #: compressed (never served as content-coded; see ``httputil.COMPRESSED_SUFFIXES``).
    compressed: tuple[str, ...] = ()
    #: Digests of this family's formats beyond :mod:`hashlib`'s, by the name a
    #: :class:`Decision` gives them (Alpine's ``apk-control``, Go's ``h1:``).
    hashers: Mapping[str, Callable[[], Hasher]] = field(default_factory=dict)
    #: The package an index at a path (below its route) describes, when an index
    #: teaches only of its own package's files: then a request waits only for the
    #: indexes of its own package (:attr:`owns`), not for every index of the family
    #: being read. ``None`` (or a ``None`` answer): any file may be listed by it.
    index_owner: Callable[[str], str | None] | None = None
    #: ``(package, path) -> bool``: whether the file at ``path`` belongs to ``package``
    #: by the same rule ``learn`` keeps to.
    owns: Callable[[str, str], bool] | None = None
    #: ``path -> packages``: the packages whose indexes may list the file at ``path``
    #: (below its route), by the rule of :attr:`owns`; with :attr:`lookup`.
    file_owners: Callable[[str], tuple[str, ...]] | None = None
    #: ``(document, url, document path, document url) -> learned | None``: what a stored
    #: document says of the file at upstream ``url`` (and its companions), read from
    #: that file's own entry, as ``learn`` would (keys are links as the document writes
    #: them). ``None``: the entry cannot be told apart, so ``learn`` reads the whole
    #: document instead. A family with it learns its documents when a file is asked for,
    #: not when they arrive (see :mod:`pkgproxy.learning`).
    lookup: Callable[[Document, str, str, str], Learned | None] | None = None
    #: ``(path, query, routes) -> (route, rest) | None``: where a reverse-mode target
    #: under :attr:`prefix_root` goes when more than its path names the route
    #: (containerd's ``?ns=<registry>``); ``routes`` are this family's configured ones,
    #: by name; ``rest`` is below the route, with what is left of the query. ``None``
    #: routes it by prefix as usual; :class:`Refused` refuses it (a route not
    #: configured).
    route_request: Callable[[str, str, Mapping[str, Route]], tuple[Route, str] | None] | None = None
    #: ``path -> area``: the part of a path (below the route's upstream) that one
    #: upstream bearer token covers (an OCI repository: a token's scope names one);
    #: the upstream client keeps a token per area. Without it, a URL's directory.
    auth_scope: Callable[[str], str] | None = None


def _families() -> dict[str, Family]:
    from pkgproxy.families import alpine, debian, generic, go, npm, oci, pypi, rpm, rubygems

    # The order is the order of the built-in routes.
    return {
        "debian": debian.FAMILY,
        "alpine": alpine.FAMILY,
        "generic": generic.FAMILY,
        "npm": npm.FAMILY,
        "pypi": pypi.FAMILY,
        "go": go.FAMILY,
        "rubygems": rubygems.FAMILY,
        "rpm": rpm.FAMILY,
        "oci": oci.FAMILY,
    }


FAMILIES: dict[str, Family] = _families()
#: File name suffixes whose bytes are already compressed: the general formats and every
#: family's package formats.
COMPRESSED_SUFFIXES: tuple[str, ...] = httputil.COMPRESSED_SUFFIXES + tuple(
    s for f in FAMILIES.values() for s in f.compressed
)
#: Every family's digests beyond hashlib's.
HASHERS: dict[str, Callable[[], Hasher]] = {
    name: h for f in FAMILIES.values() for name, h in f.hashers.items()
}

#: Every family's :attr:`Family.auth_scope`, by family name (for the upstream client).
AUTH_SCOPES: dict[str, Callable[[str], str]] = {
    name: f.auth_scope for name, f in FAMILIES.items() if f.auth_scope is not None
}


def new_hasher(name: str) -> Hasher:
    """A fresh incremental digest for ``name``, a family's or :mod:`hashlib`'s."""
    return digests.new_hasher(name, HASHERS)


#: Every family's built-in routes, in registry order.
BUILTIN_ROUTES: tuple[Route, ...] = tuple(r for f in FAMILIES.values() for r in f.routes)
