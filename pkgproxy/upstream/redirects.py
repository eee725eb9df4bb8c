"""Where an upstream redirect may lead: pure policy, no I/O.

A redirect is followed inside pkgproxy (clients never leave the cache), so a hostile or
hijacked upstream (one plain-http hop is enough) could otherwise point pkgproxy at any
host it can reach: its own admin pages, a service on loopback, a cloud metadata
address. A redirect is followed only to

- the origin the request started at (the route's own upstream),
- the upstream of another configured route,
- a host in the route's ``redirect_hosts`` (a registry's blob CDN),

never to a ``/_pkgproxy/`` path, and never to a loopback, link-local, private or
unspecified address (or ``localhost``) unless the route's own upstream is one. A host
name is checked again by what it resolves to: one only a redirect (or a registry's token
challenge) leads to is never connected to at an internal address unless a route that
names it has an internal upstream (:meth:`RedirectPolicy.may_resolve_internal`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from pkgproxy.config.model import Route


def _host_port(url: str) -> tuple[str, int]:
    p = urlsplit(url)
    return (p.hostname or "").lower(), p.port or (443 if p.scheme == "https" else 80)


def is_internal(host: str) -> bool:
    """Whether ``host`` names this machine or a private network: loopback, link-local
    (169.254.0.0/16, fe80::/10), private, unspecified or multicast, or ``localhost``."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return (
        addr.is_loopback
        or addr.is_link_local
        or addr.is_private
        or addr.is_unspecified
        or addr.is_multicast
        or addr.is_reserved
    )


def _matches(host: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


class RedirectPolicy:
    """Decides whether a redirect from a route's upstream may be followed."""

    def __init__(self, routes: Iterable[Route]) -> None:
        routes = [r for r in routes if r.enabled and r.upstream]
        #: (host, port) of every route's upstream.
        self._origins = {_host_port(r.upstream) for r in routes}
        #: Extra host patterns by the (host, port) of the route upstreams naming them.
        self._extra: dict[tuple[str, int], tuple[str, ...]] = {}
        for r in routes:
            key = _host_port(r.upstream)
            self._extra[key] = (*self._extra.get(key, ()), *r.redirect_hosts)

    def may_resolve_internal(self, host: str) -> bool:
        """Whether a connection to the host name ``host`` may go to an internal address:
        the host of a route's upstream (the operator named it), or a ``redirect_hosts``
        entry of a route whose own upstream is internal."""
        host = host.lower().rstrip(".")
        if any(h == host for h, _ in self._origins):
            return True
        return any(
            is_internal(origin[0]) and any(_matches(host, pat) for pat in patterns)
            for origin, patterns in self._extra.items()
        )

    def refusal(self, start: str, target: str) -> str | None:
        """Why a redirect to ``target`` of a request that started at ``start`` may not
        be followed, or ``None`` if it may."""
        p = urlsplit(target)
        if p.path.startswith("/_pkgproxy/") or p.path == "/_pkgproxy":
            return f"upstream redirected to pkgproxy's own pages ({p.hostname})"
        own = _host_port(start)
        there = _host_port(target)
        if there == own:
            return None
        if is_internal(there[0]) and not is_internal(own[0]):
            return f"upstream redirected to an internal address {there[0]}"
        if there in self._origins:
            return None
        if any(_matches(there[0], pat) for pat in self._extra.get(own, ())):
            return None
        return (
            f"upstream redirected to {there[0]}, which neither a route nor this "
            "route's redirect_hosts names"
        )
