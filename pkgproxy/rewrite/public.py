"""The URL a client uses, through this proxy, for an upstream URL: plain data, pure functions.

:class:`PublicMap` is made once from the routes (their upstream, prefix and forward
prefixes, as strings); :meth:`PublicMap.names` gives the mapping for one client (how it
named the proxy), frozen, which a rewriter may use from any thread: nothing of the web
server is called back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from pkgproxy.rewrite.context import RewriteContext


@dataclass(frozen=True)
class PublicRoute:
    """What of a route names its URLs: the upstream prefix, the reverse-mode prefix, and
    the forward-mode prefixes (absolute URLs)."""

    upstream: str
    prefix: str
    forward: tuple[str, ...] = ()


def split_prefix(prefix: str) -> tuple[str, str, int, str]:
    """``(scheme, lower-case host, port, path)`` of an absolute URL prefix."""
    p = urlsplit(prefix)
    return (
        p.scheme,
        (p.hostname or "").lower(),
        p.port or (443 if p.scheme == "https" else 80),
        p.path,
    )


class PublicMap:
    """Upstream URL to client URL, for every route (see :meth:`public_url`)."""

    def __init__(self, routes: Iterable[PublicRoute]) -> None:
        self._routes = tuple(routes)
        self._by_upstream = tuple(sorted(self._routes, key=lambda r: -len(r.upstream)))
        forwards = []
        for r in self._routes:
            for prefix in dict.fromkeys((*r.forward, r.upstream)):
                scheme, host, port, path = split_prefix(prefix)
                if not host.startswith("*."):
                    forwards.append((scheme, host, port, path, r, prefix not in r.forward))
        # As the route table orders them: longer paths, then longer hosts, first; a
        # forward prefix before the same route's upstream one.
        forwards.sort(key=lambda f: (-len(f[3]), -len(f[1]), f[5]))
        self._forwards = tuple(f[:5] for f in forwards)

    def names(self, base: str | None, scheme: str = "http") -> ClientNames:
        """The mapping for one client (see :class:`ClientNames`)."""
        return ClientNames(self, base, scheme)

    def public_url(self, url: str, base: str | None, scheme: str = "http") -> str | None:
        """The URL a client uses for an upstream URL, or ``None`` if no route has it.

        :param base: ``http://host:port`` as a reverse-mode client reached the proxy;
            ``None`` for a forward-mode client, which is given the route's first forward
            prefix of ``scheme`` (https through an intercepted tunnel), if it has one.
        """
        for r in self._by_upstream:
            if url.startswith(r.upstream):
                return _client_url(r, url[len(r.upstream) :], base, scheme)
        # A URL under a route's forward prefix is that route's too (a metalink names
        # mirrors by the public hosts' layout, whatever upstream the route was given).
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return None
        host = (parts.hostname or "").lower()
        for f_scheme, f_host, f_port, f_path, route in self._forwards:
            if (
                parts.path.startswith(f_path)
                and f_scheme == parts.scheme
                and f_port == port
                and f_host == host
            ):
                rest = parts.path[len(f_path) :] + (f"?{parts.query}" if parts.query else "")
                return _client_url(route, rest, base, scheme)
        return None

    def public_prefix(
        self, url: str, base: str | None, scheme: str = "http"
    ) -> tuple[str, str] | None:
        """``(upstream prefix, public prefix)`` for the route serving ``url``, such that
        :meth:`public_url` of every URL under the one is the other plus the rest.

        ``None`` when no route serves ``url``, when no public URL exists, or when another
        route's upstream lies below this one's (then the mapping is not one prefix).
        """
        for r in self._by_upstream:
            if url.startswith(r.upstream):
                if any(
                    o.upstream != r.upstream and o.upstream.startswith(r.upstream)
                    for o in self._routes
                ):
                    return None
                public = self.public_url(r.upstream, base, scheme)
                return None if public is None else (r.upstream, public)
        return None


def _client_url(r: PublicRoute, rest: str, base: str | None, scheme: str) -> str | None:
    if base is not None:
        return base + r.prefix + rest
    for f in r.forward:
        if f.startswith(scheme + "://"):
            return f + rest
    return None


@dataclass(frozen=True)
class ClientNames:
    """How one client names upstream URLs through the proxy: the routes, and how it
    reached the proxy (``base`` in reverse mode; ``scheme`` in forward mode)."""

    map: PublicMap
    base: str | None
    scheme: str = "http"

    def public_url(self, url: str) -> str | None:
        return self.map.public_url(url, self.base, self.scheme)

    def public_prefix(self, url: str) -> tuple[str, str] | None:
        return self.map.public_prefix(url, self.base, self.scheme)

    def context(self, page_url: str) -> RewriteContext:
        """What a rewriter of the document at ``page_url`` is given."""
        return RewriteContext(page_url, self.public_url, self.public_prefix)
