"""The configuration's data: frozen dataclasses, plain values, nothing else.

This module imports nothing of pkgproxy, so every room may depend on it; reading and
checking the TOML file is :mod:`pkgproxy.config`'s job.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Route:
    """One upstream repository and the client-facing names it is reached by."""

    name: str
    family: str
    prefix: str
    upstream: str
    forward: tuple[str, ...] = ()
    index_ttl: float = 60.0
    immutable: bool = False
    enabled: bool = True
    #: Seconds after an index expires during which a request is answered at once from
    #: the stored copy (``STALE``) while one revalidation runs in the background; 0 is
    #: off, so a client always gets the upstream's current answer after the TTL.
    stale_while_revalidate: float = 0.0
    #: Credentials pkgproxy itself uses upstream when challenged (a registry's token
    #: service, or HTTP Basic); a client's own credentials are never forwarded.
    #: Another route whose pool/ files are the very same (Ubuntu's security host and
    #: archive): such files are one cache entry, whichever host they came from.
    share_pool: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: A PEM file of CAs the upstream's TLS must chain to, instead of the global trust
    #: root (an internal mirror with a private CA); applies to its whole host:port.
    ca_file: str | None = None
    #: Hosts an upstream redirect may lead to besides this route's own origin and the
    #: other routes' upstreams (a registry's blob CDN); ``*.example.com`` matches below.
    redirect_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class CacheConfig:
    """Where the cache lives and how large it may grow."""

    dir: str = "pkgproxy-cache"
    max_size: int = 10 * 1024**3
    #: Hits up to this size are read in the reactor thread (cheaper than a thread hop on
    #: a local disk); 0 sends every read to the disk pool (a slow or network disk).
    sync_read_max: int = 64 * 1024
    #: Bodies of recently repeated small hits kept in memory (0: always read the disk).
    memory: int = 16 * 1024**2
    #: After the cache disk refuses a write, misses bypass it for this long.
    disk_retry_after: float = 30.0
    #: Seconds between checks that the cache directory is still usable (health follows).
    check_interval: float = 10.0
    #: A client's ``max-age=0``/``no-cache`` on an index checked upstream less than this
    #: long ago is answered from the cache, so a fleet's ``apt update`` makes one check.
    revalidate_window: float = 30.0


@dataclass(frozen=True)
class LimitsConfig:
    """Caps on what one client connection may cost the server.

    Twisted's own defaults allow 500 headers and keep an idle connection for 12 hours;
    a package client sends a dozen headers and reconnects cheaply.
    """

    #: Request line and header block together; beyond it: 400/431, connection closed.
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    #: A connection idle this long between requests is closed (nginx's keep-alive).
    client_idle_timeout: float = 75.0
    #: A request's head (and body) must arrive within this long of its first byte,
    #: however slowly it trickles in; past it: 408, connection closed.
    request_head_timeout: float = 30.0
    #: Memory all downloads together may hold to finish for their clients after the
    #: cache disk refused their writes (each at most 64 MiB); past it, such a download
    #: fails (its clients retry, and are relayed while the disk is in trouble).
    disk_error_memory: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class UpstreamConfig:
    """How pkgproxy talks to upstreams: timeouts and connection limits."""

    connect_timeout: float = 10.0
    header_timeout: float = 30.0
    idle_timeout: float = 60.0
    max_connections_per_host: int = 16
    #: How long an idle kept-alive upstream connection stays open for the next request.
    keepalive_timeout: float = 60.0
    max_redirects: int = 5
    ca_bundle: str | None = None
    #: Outbound HTTP proxy for every upstream (``http://[user:pass@]host:port``); ``""``:
    #: none. With neither this nor ``no_proxy`` set, ``https_proxy``/``http_proxy``/
    #: ``no_proxy`` from the environment apply, as curl reads them.
    proxy: str | None = None
    #: Hosts, domains (``.example.com``), addresses and CIDR ranges reached directly.
    no_proxy: tuple[str, ...] | None = None
    #: A parent cache (another pkgproxy) asked for every upstream URL, https included,
    #: as an absolute URI; unreachable: direct, unless ``parent_only``.
    parent: str | None = None
    parent_only: bool = False
    #: Connection failures in a row after which an upstream is not asked for a while.
    failure_threshold: int = 5
    retry_after: float = 15.0


@dataclass(frozen=True)
class AccessLogConfig:
    """The access log: one line per request, in the ``pkgproxy.access`` log namespace.

    It can be switched off because formatting a line per request costs CPU on a busy
    cache; JSON is for log shippers that should not parse text.
    """

    enabled: bool = True
    format: str = "text"
    #: Write the lines to this file, buffered, instead of the normal log: far cheaper
    #: per request on a busy cache. Reopened at every write, so logrotate needs no signal.
    file: str | None = None


@dataclass(frozen=True)
class TlsInterceptConfig:
    """Answering CONNECT for the https:// hosts routes name, with pkgproxy's own CA.

    :ivar ca_cert: the CA certificate; ``None``: ``<cache.dir>/tls/ca.crt``, created
        with its key on first start.
    """

    enabled: bool = False
    ca_cert: str | None = None
    ca_key: str | None = None
    #: ``(host, port)`` pairs a CONNECT may open a blind, uncached tunnel to (with
    #: interception off too); every other CONNECT not intercepted is refused.
    tunnel: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Config:
    """The whole effective configuration."""

    listen: tuple[str, ...] = ("tcp:3142",)
    cache: CacheConfig = field(default_factory=CacheConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    admin_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    routes: tuple[Route, ...] = ()
    #: Bearer token admin actions must also present; ``None``: the network check only.
    admin_token: str | None = field(default=None, repr=False)
    #: Serve only from the cache: never contact an upstream (switchable at run time).
    offline: bool = False
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    tls_intercept: TlsInterceptConfig = field(default_factory=lambda: TlsInterceptConfig())
    #: Load balancers whose PROXY protocol header or ``X-Forwarded-For`` names the real
    #: client (for the access log and ``admin_networks``); nobody else is believed.
    trusted_proxies: tuple[str, ...] = ()
    #: This node's name in a cluster: on the status page and in ``pkgproxy_info``.
    node_name: str = field(default_factory=socket.gethostname)

    def enabled_routes(self) -> tuple[Route, ...]:
        """The routes that serve requests."""
        return tuple(r for r in self.routes if r.enabled)

    def upstream_credentials(self) -> dict[str, tuple[str, str]]:
        """``(username, password)`` by route upstream URL, for routes that have them."""
        return {
            r.upstream: (r.username, r.password)
            for r in self.enabled_routes()
            if r.username is not None and r.password is not None
        }
