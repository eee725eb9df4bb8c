"""The route table: which route a request target belongs to, in either proxy mode.

Reverse mode: ``/debian/pool/...`` by path prefix. Forward mode: an absolute URI
(``http://deb.debian.org/debian/pool/...``) by the route's ``forward`` prefixes; the Host
header is ignored (RFC 9112 3.2.2). Both name the same route and the same path below it,
so both reach one cache entry. Nothing outside the table is ever fetched: this is not an
open proxy.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

from pkgproxy.config import Route


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
    host: str  # lower case; "*.example.org" matches any subdomain
    port: int
    path: str
    route: Route

    def matches(self, host: str, port: int, path: str) -> bool:
        if port != self.port or not path.startswith(self.path):
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host


class RouteTable:
    """Longest prefix wins, in both modes."""

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self.routes = sorted(routes, key=lambda r: -len(r.prefix))
        self._registries = {r.name: r for r in routes if r.family == "oci"}
        self._by_upstream = sorted(routes, key=lambda r: -len(r.upstream))
        forwards = []
        for r in routes:
            for prefix in r.forward:
                p = urlsplit(prefix)
                forwards.append(_Forward((p.hostname or "").lower(), p.port or 80, p.path, r))
        # Longer paths first; an exact host before a wildcard of the same path length.
        self._forwards = sorted(
            forwards, key=lambda f: (-len(f.path), f.host.startswith("*."), -len(f.host))
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

    def public_url(self, url: str, base: str | None) -> str | None:
        """The URL a client uses for an upstream URL, or ``None`` if no route has it.

        :param base: ``http://host:port`` as a reverse-mode client reached the proxy;
            ``None`` for a forward-mode client, which is given the route's first forward
            prefix (and, for a route without one, nothing).
        """
        for r in self._by_upstream:
            if url.startswith(r.upstream):
                rest = url[len(r.upstream) :]
                if base is not None:
                    return base + r.prefix + rest
                return r.forward[0] + rest if r.forward else None
        return None

    def resolve(self, target: str) -> tuple[Route, str]:
        """``(route, rest)`` for a request target, ``rest`` still percent-encoded.

        :raises RouteError: not a target this proxy serves.
        """
        if target.startswith("/v2/") or target in ("/v2", "/v2?"):
            found = self._registry(target)
            if found is not None:
                return found
        if target.startswith("/"):
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
        if scheme == "https":
            raise RouteError(
                403,
                "https:// URLs cannot be cached through a proxy; use an http:// source or "
                "the reverse paths such as /debian/",
            )
        if scheme != "http" or not parts.hostname:
            raise RouteError(400, f"malformed request target {target[:200]!r}")
        if parts.username is not None or parts.password is not None:
            raise RouteError(403, "credentials in proxied URLs are refused")
        host = parts.hostname.lower()
        path = parts.path or "/"
        for f in self._forwards:
            if f.matches(host, port or 80, path):
                rest = path[len(f.path) :]
                return f.route, f"{rest}?{parts.query}" if parts.query else rest
        shown = parts.netloc.rpartition("@")[2]
        raise RouteError(403, f"http://{shown}{path} is not a configured upstream of this proxy")
