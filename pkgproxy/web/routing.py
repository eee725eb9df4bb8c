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
from urllib.parse import parse_qsl, urlencode, urlsplit

from pkgproxy.config.model import Route
from pkgproxy.families import FAMILIES


class RouteError(Exception):
    """The request target is refused; ``code`` is the HTTP status to answer with.

    :ivar family: the family whose clients asked (to answer in their error format).
    """

    def __init__(self, code: int, message: str, family: str | None = None) -> None:
        self.code = code
        self.family = family
        super().__init__(message)


#: Other names containerd and the daemon use for Docker Hub.
_REGISTRY_ALIASES = {"index.docker.io": "docker.io", "registry-1.docker.io": "docker.io"}


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
        self._registries = {r.name: r for r in routes if r.family == "oci"}
        self._aliases = []
        for family in sorted({r.family for r in routes}):
            pattern = FAMILIES[family].root_alias if family in FAMILIES else None
            if pattern is not None:
                first = next(r for r in routes if r.family == family)
                self._aliases.append((pattern, first))
        self._by_upstream = sorted(routes, key=lambda r: -len(r.upstream))
        forwards = []
        for r in routes:
            # The upstream prefix too: what a branch pkgproxy asks its parent for.
            for prefix in dict.fromkeys((*r.forward, r.upstream)):
                p = urlsplit(prefix)
                port = p.port or (443 if p.scheme == "https" else 80)
                host = (p.hostname or "").lower()
                upstream = prefix not in r.forward
                forwards.append(_Forward(p.scheme, host, port, p.path, r, upstream))
        # Longer paths first; an exact host before a wildcard of the same path length.
        self._forwards = sorted(
            forwards,
            key=lambda f: (-len(f.path), f.host.startswith("*."), -len(f.host), f.upstream),
        )

    def _registry(self, target: str) -> tuple[Route, str] | None:
        """containerd names the registry in ``?ns=``; the parameter is not forwarded."""
        path, _, query = target.partition("?")
        if "ns=" not in query:
            return None
        params = parse_qsl(query, keep_blank_values=True)
        ns = [v for k, v in params if k == "ns"]
        rest_query = urlencode([(k, v) for k, v in params if k != "ns"])
        name = ns[0].lower()
        route = self._registries.get(_REGISTRY_ALIASES.get(name, name))
        if route is None:
            raise RouteError(403, f"registry {ns[0]!r} is not configured on this mirror", "oci")
        rest = path[len("/v2/") :] if path.startswith("/v2/") else ""
        return route, f"{rest}?{rest_query}" if rest_query else rest

    def public_url(self, url: str, base: str | None, scheme: str = "http") -> str | None:
        """The URL a client uses for an upstream URL, or ``None`` if no route has it.

        :param base: ``http://host:port`` as a reverse-mode client reached the proxy;
            ``None`` for a forward-mode client, which is given the route's first forward
            prefix of ``scheme`` (https through an intercepted tunnel), if it has one.
        """
        for r in self._by_upstream:
            if url.startswith(r.upstream):
                rest = url[len(r.upstream) :]
                return self._client_url(r, rest, base, scheme)
        # A URL under a route's forward prefix is that route's too (a metalink names
        # mirrors by the public hosts' layout, whatever upstream the route was given).
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return None
        host = (parts.hostname or "").lower()
        for f in self._forwards:
            if not f.host.startswith("*.") and f.matches(parts.scheme, host, port, parts.path):
                rest = parts.path[len(f.path) :] + (f"?{parts.query}" if parts.query else "")
                return self._client_url(f.route, rest, base, scheme)
        return None

    @staticmethod
    def _client_url(r: Route, rest: str, base: str | None, scheme: str) -> str | None:
        if base is not None:
            return base + r.prefix + rest
        for f in r.forward:
            if f.startswith(scheme + "://"):
                return f + rest
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
                    for o in self.routes
                ):
                    return None
                public = self.public_url(r.upstream, base, scheme)
                return None if public is None else (r.upstream, public)
        return None

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
        if target.startswith("/v2/") or target in ("/v2", "/v2?"):
            found = self._registry(target)
            if found is not None:
                return found
        if target.startswith("/"):
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
