"""Family policies: pure functions that say how each URL of a repository is cached.

A family classifies a path (already relative to its route's upstream base) into a
:class:`Decision`. It does no network I/O and imports nothing from Twisted, so each
family is tested as plain functions. A new family is one module and one entry in
:data:`FAMILIES`.

Indexes teach the cache what the files they list must be: a family may ``learn`` from a
committed index (a Debian ``Packages`` file, an Alpine ``APKINDEX``) the size and digests
of artifacts, which :class:`Facts` keeps and ``classify`` turns into checks made before
an artifact is stored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pkgproxy.config import Route


class CacheClass(Enum):
    """How a URL is cached."""

    #: Content never changes: cached forever, never revalidated, verified before commit.
    IMMUTABLE = "immutable"
    #: An index: stored with validators and revalidated after a TTL.
    MUTABLE = "mutable"
    #: Forwarded, never stored.
    PASS = "pass"


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


@dataclass(frozen=True)
class RewriteContext:
    """What a rewriter needs to know besides the document.

    :ivar page_url: the upstream URL the document came from (for relative links).
    :ivar public_url: maps an upstream URL to the URL a client uses for it through this
        proxy, as that client reached the proxy (``http://cache:3142/pypi/files/...``,
        or in forward mode the route's forward prefix); ``None`` for a URL no route
        serves. A rewritten document is cached per client base for this reason.
    """

    page_url: str
    public_url: Callable[[str], str | None]


#: ``(raw file, output file, context)``: writes the representation clients are served.
Rewriter = Callable[[str, str, RewriteContext], None]


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
    :ivar size: the byte count the body must have, when the family knows it.
    :ivar variant: which representation of the URL this is (from ``Accept``); part of
        the cache key, so one client's variant is never served to another.
    :ivar upstream_headers: headers to send upstream (the negotiated ``Accept``).
    :ivar response_headers: headers to add to the response (``Vary``, a content type).
    :ivar rewrite: turns the verified upstream body into what clients are served.
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
    size: int | None = None
    variant: str = ""
    upstream_headers: Mapping[str, str] = field(default_factory=dict)
    response_headers: Mapping[str, str] = field(default_factory=dict)
    rewrite: Rewriter | None = None
    local: LocalAnswer | None = None
    upstream_url: str | None = None
    digest_header: str | None = None
    head_revalidate: bool = False
    query_consumed: bool = False
    revalidate_also: tuple[str, ...] = ()
    version_of: Callable[[bytes], float | None] | None = None
    #: Store under this route name instead of the request's (content shared by routes).
    key_scope: str | None = None

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
    lists files on the files host).
    """

    def __init__(self) -> None:
        self._known: dict[str, Expect] = {}
        #: Changes whenever something is learned: a decision made under an older
        #: generation may no longer hold (the cache's hit path checks it).
        self.generation = 0

    def get(self, url: str) -> Expect | None:
        """What must be true of the file at ``url``, if an index said."""
        return self._known.get(url)

    def add(self, items: Iterable[tuple[str, Expect]]) -> int:
        """Record what an index lists; returns how many items it had."""
        n = 0
        for url, expect in items:
            self._known[url] = expect
            n += 1
        self.generation += 1
        return n

    def __len__(self) -> int:
        return len(self._known)


def _never(path: str) -> bool:
    return False


@dataclass(frozen=True)
class Request:
    """What a family may know of the client's request besides its path."""

    accept: str = ""
    #: The query string, without its ``?`` (empty when there is none).
    query: str = ""


@dataclass(frozen=True)
class Family:
    """One repository format.

    :ivar classify: ``(route, path, facts, request) -> Decision``; pure. ``path`` is
        canonical, below the route's upstream base, without the query (which is in
        the request).
    :ivar learns: whether the body at ``path`` is an index worth reading; pure.
    :ivar learn: ``(path, local_file, url) -> [(artifact URL, Expect)]``; reads a file,
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
    learn: Callable[[str, str, str], list[tuple[str, Expect]]] | None = None
    encoded_slash_ok: bool = False
    error_body: Callable[[int, str], tuple[str, bytes]] | None = None
    #: Paths at the server's root that also belong to this family's first route (npm 9+
    #: moves registry.npmjs.org tarball URLs onto the registry's host, dropping /npm).
    root_alias: re.Pattern[str] | None = None
    #: Paths (below the route) whose POSTs are relayed upstream uncached, as they are
    #: (npm's audit); every other POST is refused.
    post_through: re.Pattern[str] | None = None


def _families() -> dict[str, Family]:
    from pkgproxy.families import alpine, debian, generic, npm, oci, pypi, rpm

    return {
        "oci": oci.FAMILY,
        "debian": debian.FAMILY,
        "alpine": alpine.FAMILY,
        "generic": generic.FAMILY,
        "npm": npm.FAMILY,
        "pypi": pypi.FAMILY,
        "rpm": rpm.FAMILY,
    }


FAMILIES: dict[str, Family] = _families()
