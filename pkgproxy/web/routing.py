"""The route table: which route a request target belongs to, in either proxy mode.

Reverse mode: ``/debian/pool/...`` by path prefix. Forward mode: an absolute URI
(``http://deb.debian.org/debian/pool/...``) by the route's ``forward`` prefixes or its
``upstream`` prefix, ``https://`` ones included (a branch pkgproxy asks its parent for
upstream URLs so); the Host header is ignored (RFC 9112 3.2.2). All name the same route
and the same path below it, so all reach one cache entry. Nothing outside the table is
ever fetched: this is not an open proxy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from pkgproxy.config.model import Route
from pkgproxy.families import FAMILIES, Refused
from pkgproxy.rewrite.public import PublicMap, PublicRoute, split_prefix


class RouteError(Exception):
    """The request target is refused; ``code`` is the HTTP status to answer with.

    :ivar family: the family whose clients asked (to answer in their error format).
    """

    def __init__(self, code: int, message: str, family: str | None = None) -> None:
        self.code = code
        self.family = family
        super().__init__(message)


@dataclass(frozen=True)
class _Forward:
    scheme: str
    host: str  # lower case; "*.example.org" matches any subdomain
    port: int
    path: str
    route: Route
    #: The route's upstream prefix, not one of its forward prefixes (which win a tie).
    upstream: bool = False

    def matches_host(self, scheme: str, host: str, port: int) -> bool:
        if scheme != self.scheme or port != self.port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host

    def matches(self, scheme: str, host: str, port: int, path: str) -> bool:
        return path.startswith(self.path) and self.matches_host(scheme, host, port)


class RouteTable:
    """Longest prefix wins, in both modes."""

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self.routes = sorted(routes, key=lambda r: -len(r.prefix))
        #: Families that route some targets below their prefix root by more than the
        #: path: ``(root, hook, their routes by name, family)``.
        self._own = []
        self._aliases = []
        for family in sorted({r.family for r in routes}):
            pattern = FAMILIES[family].root_alias if family in FAMILIES else None
            if pattern is not None:
                first = next(r for r in routes if r.family == family)
                self._aliases.append((pattern, first))
            family_of = FAMILIES.get(family)
            if family_of is not None and family_of.route_request is not None:
                root = (family_of.prefix_root or "/").rstrip("/")
                named = {r.name: r for r in routes if r.family == family}
                self._own.append((root, family_of.route_request, named, family))
        #: Upstream URLs to the URLs clients use for them (rewritten documents).
        self.public = PublicMap(PublicRoute(r.upstream, r.prefix, r.forward) for r in routes)
        forwards = []
        for r in routes:
            # The upstream prefix too: what a branch pkgproxy asks its parent for.
            for prefix in dict.fromkeys((*r.forward, r.upstream)):
                scheme, host, port, path = split_prefix(prefix)
                forwards.append(_Forward(scheme, host, port, path, r, prefix not in r.forward))
        # Longer paths first; an exact host before a wildcard of the same path length.
        self._forwards = sorted(
            forwards,
            key=lambda f: (-len(f.path), f.host.startswith("*."), -len(f.host), f.upstream),
        )

    def public_url(self, url: str, base: str | None, scheme: str = "http") -> str | None:
        """The URL a client uses for an upstream URL (see :meth:`PublicMap.public_url`)."""
        return self.public.public_url(url, base, scheme)

    def public_prefix(
        self, url: str, base: str | None, scheme: str = "http"
    ) -> tuple[str, str] | None:
        """``(upstream prefix, public prefix)`` (see :meth:`PublicMap.public_prefix`)."""
        return self.public.public_prefix(url, base, scheme)

    def interceptable(self, host: str, port: int) -> bool:
        """Whether a route names ``https://host:port`` (a CONNECT pkgproxy may answer)."""
        host = host.lower()
        return any(f.matches_host("https", host, port) for f in self._forwards)

    def resolve(self, target: str, tunneled: bool = False) -> tuple[Route, str]:
        """``(route, rest)`` for a request target, ``rest`` still percent-encoded.

        :param tunneled: the target came through an intercepted CONNECT tunnel (it is
            routed as an absolute ``https://`` URI sent in plain HTTP is).
        :raises RouteError: not a target this proxy serves.
        """
        if target.startswith("/"):
            for root, hook, named, family in self._own:
                if target.startswith(root):
                    path, _, query = target.partition("?")
                    try:
                        found = hook(path, query, named)
                    except Refused as e:
                        raise RouteError(403, str(e), family) from None
                    if found is not None:
                        return found
            path = target.split("?", 1)[0]
            for pattern, alias in self._aliases:
                if pattern.match(path):
                    return alias, target[1:]
            for r in self.routes:
                if target.startswith(r.prefix):
                    return r, target[len(r.prefix) :]
            known = ", ".join(r.prefix for r in self.routes)
            raise RouteError(404, f"no route for {target.split('?')[0]}; routes: {known}")
        try:
            parts = urlsplit(target)
            port = parts.port
        except ValueError:
            raise RouteError(400, f"malformed request target {target[:200]!r}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise RouteError(400, f"malformed request target {target[:200]!r}")
        if parts.username is not None or parts.password is not None:
            raise RouteError(403, "credentials in proxied URLs are refused")
        host = parts.hostname.lower()
        path = parts.path or "/"
        default_port = 443 if scheme == "https" else 80
        for f in self._forwards:
            if f.matches(scheme, host, port or default_port, path):
                rest = path[len(f.path) :]
                return f.route, f"{rest}?{parts.query}" if parts.query else rest
        shown = parts.netloc.rpartition("@")[2]
        raise RouteError(
            403, f"{scheme}://{shown}{path} is not a configured upstream of this proxy"
        )


#: A ``Host`` value: an ASCII host name (letters, digits, ``-``, ``_``, dot-separated
#: labels of at most 63), an IPv4 address, or an IPv6 literal in brackets; then an
#: optional ``:port``. Nothing else: no Unicode look-alikes, no spaces, no user info.
_HOST = re.compile(
    rb"(?:[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?|\[[0-9A-Fa-f:.]{2,45}\])"
    rb"(?::([0-9]{1,5}))?"
)


def valid_host(value: bytes) -> bool:
    """Whether ``value`` (a ``Host`` header, stripped) is an ASCII host name and port.

    An empty value is valid (RFC 9112 3.2: a target without an authority).
    """
    if not value:
        return True
    if len(value) > 261:
        return False
    match = _HOST.fullmatch(value)
    if match is None:
        return False
    port = match.group(1)
    return port is None or 0 < int(port) <= 65535
