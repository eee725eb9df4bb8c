"""The operator's interface: one TOML file read into frozen dataclasses.

Every key is optional; built-in routes cover every family, and a file overrides a route
by name. Every error names the key and what is wrong, so a typo never starts a
half-configured server. No Twisted imports here: this is plain data.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from pkgproxy.families import FAMILIES


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object, key: str = "") -> int:
    """Parse ``"10GiB"``, ``"500MB"`` or a plain number of bytes."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a size like '10GiB', got {value!r}")
    if isinstance(value, int):
        number, unit = float(value), ""
    elif isinstance(value, str) and (m := _QUANTITY.match(value)):
        number, unit = float(m.group(1)), m.group(2).lower()
    else:
        raise ConfigError(key, f"expected a size like '10GiB', got {value!r}")
    if unit not in _SIZE_UNITS:
        raise ConfigError(
            key, f"unknown size unit {unit!r} in {value!r} (use B, KiB, MiB, GiB, TiB)"
        )
    size = int(number * _SIZE_UNITS[unit])
    if size <= 0:
        raise ConfigError(key, f"must be greater than zero, got {value!r}")
    return size


def _size_or_off(value: object, key: str) -> int:
    """A size where ``0`` means "off" (which :func:`parse_size` refuses)."""
    return 0 if value in (0, "0") else parse_size(value, key)


def parse_duration(value: object, key: str = "") -> float:
    """Parse ``"60s"``, ``"10m"``, ``"1h"`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration like '60s', got {value!r}")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    elif isinstance(value, str) and (m := _QUANTITY.match(value)):
        number, unit = float(m.group(1)), m.group(2).lower()
    else:
        raise ConfigError(key, f"expected a duration like '60s' or '10m', got {value!r}")
    if unit not in _DURATION_UNITS:
        raise ConfigError(key, f"unknown duration unit {unit!r} in {value!r} (use ms, s, m, h, d)")
    return number * _DURATION_UNITS[unit]


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


BUILTIN_ROUTES: tuple[Route, ...] = (
    Route(
        name="debian",
        family="debian",
        prefix="/debian/",
        upstream="https://deb.debian.org/debian/",
        forward=(
            "http://deb.debian.org/debian/",
            "http://ftp.debian.org/debian/",
            "https://deb.debian.org/debian/",
            "https://ftp.debian.org/debian/",
        ),
    ),
    Route(
        name="debian-security",
        family="debian",
        prefix="/debian-security/",
        upstream="https://deb.debian.org/debian-security/",
        forward=(
            "http://deb.debian.org/debian-security/",
            "http://security.debian.org/debian-security/",
            "http://security.debian.org/",
            "https://deb.debian.org/debian-security/",
            "https://security.debian.org/debian-security/",
            "https://security.debian.org/",
        ),
    ),
    # Ubuntu's archive is plain HTTP upstream too; apt checks the signed indexes.
    Route(
        name="ubuntu",
        family="debian",
        prefix="/ubuntu/",
        upstream="http://archive.ubuntu.com/ubuntu/",
        forward=(
            "http://archive.ubuntu.com/ubuntu/",
            "http://*.archive.ubuntu.com/ubuntu/",
            "https://archive.ubuntu.com/ubuntu/",
        ),
    ),
    Route(
        name="ubuntu-security",
        family="debian",
        prefix="/ubuntu-security/",
        upstream="http://security.ubuntu.com/ubuntu/",
        share_pool="ubuntu",
        forward=(
            "http://security.ubuntu.com/ubuntu/",
            "https://security.ubuntu.com/ubuntu/",
        ),
    ),
    Route(
        name="ubuntu-ports",
        family="debian",
        prefix="/ubuntu-ports/",
        upstream="http://ports.ubuntu.com/ubuntu-ports/",
        forward=(
            "http://ports.ubuntu.com/ubuntu-ports/",
            "http://*.ports.ubuntu.com/ubuntu-ports/",
            "https://ports.ubuntu.com/ubuntu-ports/",
        ),
    ),
    Route(
        name="alpine",
        family="alpine",
        prefix="/alpine/",
        upstream="https://dl-cdn.alpinelinux.org/alpine/",
        forward=(
            "http://dl-cdn.alpinelinux.org/alpine/",
            "https://dl-cdn.alpinelinux.org/alpine/",
        ),
        index_ttl=300.0,
    ),
    # RPM (dnf, yum, zypper). Fedora and EPEL from Fedora's master host, which serves every
    # release and update; MirrorManager's metalink answers name this proxy as the one mirror
    # (revalidated as often as repomd.xml, so the checksums they carry keep up with it).
    Route(
        name="fedora",
        family="rpm",
        prefix="/fedora/",
        upstream="https://dl.fedoraproject.org/pub/fedora/linux/",
        forward=(
            "http://dl.fedoraproject.org/pub/fedora/linux/",
            "https://dl.fedoraproject.org/pub/fedora/linux/",
            "http://download.fedoraproject.org/pub/fedora/linux/",
            "https://download.fedoraproject.org/pub/fedora/linux/",
        ),
    ),
    Route(
        name="epel",
        family="rpm",
        prefix="/epel/",
        upstream="https://dl.fedoraproject.org/pub/epel/",
        forward=(
            "http://dl.fedoraproject.org/pub/epel/",
            "https://dl.fedoraproject.org/pub/epel/",
            "http://download.fedoraproject.org/pub/epel/",
            "https://download.fedoraproject.org/pub/epel/",
        ),
    ),
    Route(
        name="fedora-metalink",
        family="rpm",
        prefix="/fedora-metalink/",
        upstream="https://mirrors.fedoraproject.org/",
        forward=(
            "http://mirrors.fedoraproject.org/",
            "https://mirrors.fedoraproject.org/",
        ),
    ),
    Route(
        name="rocky",
        family="rpm",
        prefix="/rocky/",
        upstream="https://dl.rockylinux.org/pub/rocky/",
        forward=(
            "http://dl.rockylinux.org/pub/rocky/",
            "https://dl.rockylinux.org/pub/rocky/",
            "http://download.rockylinux.org/pub/rocky/",
            "https://download.rockylinux.org/pub/rocky/",
        ),
    ),
    Route(
        name="almalinux",
        family="rpm",
        prefix="/almalinux/",
        upstream="https://repo.almalinux.org/almalinux/",
        forward=(
            "http://repo.almalinux.org/almalinux/",
            "https://repo.almalinux.org/almalinux/",
        ),
    ),
    Route(
        name="centos-stream",
        family="rpm",
        prefix="/centos-stream/",
        upstream="https://mirror.stream.centos.org/",
        forward=(
            "http://mirror.stream.centos.org/",
            "https://mirror.stream.centos.org/",
        ),
    ),
    Route(
        name="opensuse",
        family="rpm",
        prefix="/opensuse/",
        upstream="https://download.opensuse.org/",
        forward=(
            "http://download.opensuse.org/",
            "https://download.opensuse.org/",
            "http://cdn.opensuse.org/",
            "https://cdn.opensuse.org/",
        ),
    ),
    # Packuments revalidate after 5 minutes, the registry's own max-age.
    Route(
        name="npm",
        family="npm",
        prefix="/npm/",
        upstream="https://registry.npmjs.org/",
        forward=(
            "http://registry.npmjs.org/",
            "https://registry.npmjs.org/",
        ),
        index_ttl=300.0,
    ),
    # PyPI: the index and the files host are two routes; /pypi/files/ is the longer
    # prefix. Project pages revalidate after 10 minutes, PyPI's own max-age.
    Route(
        name="pypi",
        family="pypi",
        prefix="/pypi/",
        upstream="https://pypi.org/",
        forward=(
            "http://pypi.org/",
            "https://pypi.org/",
        ),
        index_ttl=600.0,
    ),
    Route(
        name="pypi-files",
        family="pypi",
        prefix="/pypi/files/",
        upstream="https://files.pythonhosted.org/",
        forward=(
            "http://files.pythonhosted.org/",
            "https://files.pythonhosted.org/",
        ),
        index_ttl=600.0,
    ),
    # Go modules and RubyGems: released versions never change; module lists, @latest
    # and the gem indexes revalidate after 5 minutes.
    Route(
        name="go",
        family="go",
        prefix="/go/",
        upstream="https://proxy.golang.org/",
        forward=(
            "http://proxy.golang.org/",
            "https://proxy.golang.org/",
        ),
        index_ttl=300.0,
    ),
    Route(
        name="rubygems",
        family="rubygems",
        prefix="/rubygems/",
        upstream="https://rubygems.org/",
        forward=(
            "http://rubygems.org/",
            "https://rubygems.org/",
            "http://index.rubygems.org/",
            "https://index.rubygems.org/",
        ),
        index_ttl=300.0,
    ),
    # OCI registries live under /v2/ (a Docker mirror must be a host root): Docker Hub
    # at /v2/ itself, others at /v2/<registry>/ or by containerd's ?ns=<registry>. The
    # route name is the registry's name. index_ttl is how long a tag is trusted.
    Route(
        name="docker.io",
        family="oci",
        prefix="/v2/",
        upstream="https://registry-1.docker.io/v2/",
        index_ttl=300.0,
        # Blobs are 307-redirected to Docker's CDNs (docs.docker.com, allow-list).
        redirect_hosts=(
            "production.cloudflare.docker.com",
            "production.cloudfront.docker.com",
            "docker-images-prod.6aa30f8b08e16409b46e0173d6de2f56.r2.cloudflarestorage.com",
            "docker-images-prod.r2.cloudflarestorage.com",
        ),
    ),
    Route(
        name="ghcr.io",
        family="oci",
        prefix="/v2/ghcr.io/",
        upstream="https://ghcr.io/v2/",
        index_ttl=300.0,
        redirect_hosts=(
            "pkg-containers.githubusercontent.com",
            "github-production-container-registry.s3.amazonaws.com",
        ),
    ),
    Route(
        name="quay.io",
        family="oci",
        prefix="/v2/quay.io/",
        upstream="https://quay.io/v2/",
        index_ttl=300.0,
        redirect_hosts=("cdn.quay.io", "*.quay.io"),  # cdn01..cdn03.quay.io
    ),
)


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a table, got {type(value).__name__}")
    return value


def _check_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for k in data:
        if k not in allowed:
            known = ", ".join(sorted(allowed))
            raise ConfigError(f"{where}{k}", f"unknown key (known keys: {known})")


def _str(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be a non-empty string, got {value!r}")
    return value


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value


def _str_list(value: object, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(key, f"must be a list of strings, got {value!r}")
    return tuple(value)


def _networks(value: object, key: str) -> tuple[str, ...]:
    """A list of networks (``10.0.0.0/8``) or single addresses, each checked now."""
    nets = _str_list(value, key)
    for i, n in enumerate(nets):
        try:
            ipaddress.ip_network(n, strict=False)
        except ValueError as e:
            raise ConfigError(f"{key}[{i}]", str(e)) from None
    return nets


#: A node name goes into a metric label and the status page: keep it plain.
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _positive_int(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(key, f"must be a whole number greater than zero, got {value!r}")
    return value


def _non_negative(seconds: float, key: str) -> float:
    """``seconds`` if it is not negative: for windows where 0 means "off"."""
    if seconds < 0:
        raise ConfigError(key, f"must not be negative, got {seconds:g}s")
    return seconds


def check_url(value: str, key: str) -> str:
    """Return ``value`` if it is an absolute http(s) URL ending in ``/``."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"must be an http:// or https:// URL, got {value!r}")
    if parts.username or parts.password:
        raise ConfigError(key, "credentials in the URL are not supported")
    if parts.query or parts.fragment:
        raise ConfigError(key, "must not have a query or fragment")
    if not value.endswith("/"):
        raise ConfigError(key, f"must end with '/', got {value!r} (try {value + '/'!r})")
    return value


def _ca_file(value: object, key: str) -> str:
    """A readable PEM file with at least one certificate, checked now: a bad path found at
    the first upstream request would be a 502 for every client instead of a start error."""
    from cryptography import x509

    path = _str(value, key)
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}") from None
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ConfigError(key, f"{path} holds no PEM certificate") from None
    return path


def _tunnel_entries(value: object, key: str) -> tuple[tuple[str, int], ...]:
    """``["host:port", "[::1]:443"]`` as ``(host, port)`` pairs, host in lower case.

    Exact names only: a wildcard or a missing port would open tunnels nobody listed.
    """
    out = []
    for i, entry in enumerate(_str_list(value, key)):
        where = f"{key}[{i}]"
        host, sep, port = entry.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(where, f"must be 'host:port' like 'git.example:443', got {entry!r}")
        if any(c in host for c in "*/@[]"):
            raise ConfigError(where, f"must name exactly one host, got {entry!r}")
        out.append((host.lower(), int(port)))
    return tuple(out)


_ROUTE_KEYS = {
    "family",
    "prefix",
    "upstream",
    "forward",
    "index_ttl",
    "stale_while_revalidate",
    "immutable",
    "enabled",
    "username",
    "password",
    "password_file",
    "ca_file",
    "share_pool",
    "redirect_hosts",
}
_ROUTE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_REDIRECT_HOST = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


def _route(name: str, data: Mapping[str, Any], base: Route | None) -> Route:
    where = f"routes.{name}."
    if not _ROUTE_NAME.match(name):
        raise ConfigError(f"routes.{name}", "route names are lower-case letters, digits, . _ -")
    _check_keys(data, _ROUTE_KEYS, where)
    if base is None:
        for required in ("family", "upstream"):
            if required not in data:
                raise ConfigError(where + required, "required for a new route")
        base = Route(name=name, family="", prefix=f"/{name}/", upstream="")
    changes: dict[str, Any] = {}
    if "family" in data:
        family = _str(data["family"], where + "family")
        if family not in FAMILIES:
            known = ", ".join(sorted(FAMILIES))
            raise ConfigError(where + "family", f"unknown family {family!r} (known: {known})")
        changes["family"] = family
    if "prefix" in data:
        prefix = _str(data["prefix"], where + "prefix")
        if not (prefix.startswith("/") and prefix.endswith("/")) or prefix == "/":
            raise ConfigError(where + "prefix", f"must look like '/name/', got {prefix!r}")
        if prefix.startswith("/_pkgproxy/"):
            raise ConfigError(where + "prefix", f"{prefix!r} is reserved")
        changes["prefix"] = prefix
    if "upstream" in data:
        changes["upstream"] = check_url(
            _str(data["upstream"], where + "upstream"), where + "upstream"
        )
    if "forward" in data:
        forward = _str_list(data["forward"], where + "forward")
        for i, f in enumerate(forward):
            check_url(f, f"{where}forward[{i}]")
            # https:// prefixes are reached through CONNECT, and only with
            # [tls_intercept] enabled; they are harmless otherwise.
        changes["forward"] = forward
    if "index_ttl" in data:
        changes["index_ttl"] = parse_duration(data["index_ttl"], where + "index_ttl")
    if "stale_while_revalidate" in data:
        key = where + "stale_while_revalidate"
        seconds = parse_duration(data["stale_while_revalidate"], key)
        changes["stale_while_revalidate"] = _non_negative(seconds, key)
    if "immutable" in data:
        changes["immutable"] = _bool(data["immutable"], where + "immutable")
    if "enabled" in data:
        changes["enabled"] = _bool(data["enabled"], where + "enabled")
    if "share_pool" in data:
        changes["share_pool"] = _str(data["share_pool"], where + "share_pool")
    if "username" in data:
        changes["username"] = _str(data["username"], where + "username")
    if "password" in data and "password_file" in data:
        raise ConfigError(where + "password_file", "give password or password_file, not both")
    if "password" in data:
        changes["password"] = _str(data["password"], where + "password")
    if "password_file" in data:
        path = _str(data["password_file"], where + "password_file")
        try:
            with open(path, encoding="utf-8") as fh:
                changes["password"] = fh.read().strip()
        except OSError as e:
            raise ConfigError(
                where + "password_file", f"cannot read {path}: {e.strerror}"
            ) from None
    if "ca_file" in data:
        changes["ca_file"] = _ca_file(data["ca_file"], where + "ca_file")
    if "redirect_hosts" in data:
        hosts = _str_list(data["redirect_hosts"], where + "redirect_hosts")
        for i, h in enumerate(hosts):
            if not _REDIRECT_HOST.match(h):
                raise ConfigError(
                    f"{where}redirect_hosts[{i}]",
                    f"must be a host name, optionally starting with '*.', got {h!r}",
                )
        changes["redirect_hosts"] = tuple(h.lower() for h in hosts)
    route = replace(base, **changes)
    if (route.username is None) != (route.password is None):
        raise ConfigError(where + "username", "give both username and password, or neither")
    if route.family == "oci" and "prefix" not in data and not route.prefix.startswith("/v2/"):
        route = replace(route, prefix=f"/v2/{name}/")
    if (route.family == "oci") != route.prefix.startswith("/v2/"):
        raise ConfigError(
            where + "prefix",
            "/v2/ is where OCI registries live: an oci route's prefix starts with /v2/ "
            "(e.g. /v2/ghcr.io/), and no other route's does",
        )
    return route


def _check_route_table(routes: tuple[Route, ...]) -> None:
    seen_prefix: dict[str, str] = {}
    seen_forward: dict[str, str] = {}
    by_name = {r.name: r for r in routes}
    for r in routes:
        if r.share_pool is None:
            continue
        other = by_name.get(r.share_pool)
        if other is None or other.family != r.family or other is r:
            raise ConfigError(
                f"routes.{r.name}.share_pool",
                f"must name another route of family {r.family!r}, got {r.share_pool!r}",
            )
    for r in routes:
        if not r.enabled:
            continue
        if r.prefix in seen_prefix:
            raise ConfigError(
                f"routes.{r.name}.prefix",
                f"{r.prefix!r} is already the prefix of route {seen_prefix[r.prefix]!r}",
            )
        seen_prefix[r.prefix] = r.name
        for f in r.forward:
            if f in seen_forward:
                raise ConfigError(
                    f"routes.{r.name}.forward",
                    f"{f!r} is already a forward prefix of route {seen_forward[f]!r}",
                )
            seen_forward[f] = r.name


_TOP_KEYS = {
    "listen",
    "admin_networks",
    "admin_token",
    "admin_token_file",
    "offline",
    "access_log",
    "limits",
    "cache",
    "upstream",
    "routes",
    "tls_intercept",
    "trusted_proxies",
    "node_name",
}
_TLS_KEYS = {"enabled", "ca_cert", "ca_key", "tunnel"}
_ACCESS_LOG_KEYS = {"enabled", "format", "file"}
_ACCESS_LOG_FORMATS = ("text", "json")
#: A token shorter than this is too easy to guess from inside an admin network.
MIN_TOKEN_LENGTH = 16


def _token(value: object, key: str) -> str:
    """A bearer token: printable ASCII without spaces (it travels in a header)."""
    token = _str(value, key).strip()
    if not all("!" <= c <= "~" for c in token):
        raise ConfigError(key, "must be printable ASCII without spaces")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            key,
            f"must be at least {MIN_TOKEN_LENGTH} characters (try: openssl rand -hex 24)",
        )
    return token


def _token_file(value: object, key: str) -> str:
    """The token kept in a file of its own (e.g. a systemd credential), not in the config."""
    path = _str(value, key)
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not a text file") from None
    try:
        return _token(content, key)
    except ConfigError as e:
        raise ConfigError(key, f"{e.message} (in {path})") from None


_CACHE_KEYS = {
    "dir",
    "max_size",
    "sync_read_max",
    "memory",
    "disk_retry_after",
    "revalidate_window",
}
_LIMITS_KEYS = {
    "max_header_bytes",
    "max_headers",
    "client_idle_timeout",
    "request_head_timeout",
    "disk_error_memory",
}
_UPSTREAM_KEYS = {
    "connect_timeout",
    "header_timeout",
    "idle_timeout",
    "keepalive_timeout",
    "max_connections_per_host",
    "max_redirects",
    "ca_bundle",
    "failure_threshold",
    "retry_after",
    "proxy",
    "no_proxy",
    "parent",
    "parent_only",
}


def _proxy_url(value: object, key: str) -> str:
    """An outbound proxy URL: ``http://[user:pass@]host[:port]``, or ``""`` for none."""
    url = _str(value, key).strip()
    if not url:
        return ""
    p = urlsplit(url if "://" in url else "http://" + url)
    try:
        _ = p.port
    except ValueError:
        raise ConfigError(key, f"bad port in {p.netloc.rpartition('@')[2]!r}") from None
    if p.scheme != "http" or not p.hostname:
        raise ConfigError(key, f"must look like 'http://proxy.example:3128', got {p.scheme}://...")
    return url


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from parsed TOML, over the built-in defaults."""
    _check_keys(data, _TOP_KEYS, "")
    cfg = Config(routes=BUILTIN_ROUTES)
    if "listen" in data:
        listen = _str_list(data["listen"], "listen")
        if not listen:
            raise ConfigError("listen", "needs at least one strports description")
        cfg = replace(cfg, listen=listen)
    if "admin_networks" in data:
        cfg = replace(cfg, admin_networks=_networks(data["admin_networks"], "admin_networks"))
    if "trusted_proxies" in data:
        cfg = replace(cfg, trusted_proxies=_networks(data["trusted_proxies"], "trusted_proxies"))
    if "node_name" in data:
        name = _str(data["node_name"], "node_name")
        if not _NODE_NAME.match(name):
            raise ConfigError("node_name", f"letters, digits, . _ - only, got {name!r}")
        cfg = replace(cfg, node_name=name)
    if "admin_token" in data and "admin_token_file" in data:
        raise ConfigError("admin_token_file", "give admin_token or admin_token_file, not both")
    if "admin_token" in data:
        cfg = replace(cfg, admin_token=_token(data["admin_token"], "admin_token"))
    if "admin_token_file" in data:
        cfg = replace(cfg, admin_token=_token_file(data["admin_token_file"], "admin_token_file"))
    if "offline" in data:
        cfg = replace(cfg, offline=_bool(data["offline"], "offline"))
    alog = _table(data, "access_log")
    _check_keys(alog, _ACCESS_LOG_KEYS, "access_log.")
    ac = cfg.access_log
    if "enabled" in alog:
        ac = replace(ac, enabled=_bool(alog["enabled"], "access_log.enabled"))
    if "format" in alog:
        fmt = _str(alog["format"], "access_log.format")
        if fmt not in _ACCESS_LOG_FORMATS:
            raise ConfigError("access_log.format", f"must be 'text' or 'json', got {fmt!r}")
        ac = replace(ac, format=fmt)
    if "file" in alog:
        ac = replace(ac, file=_str(alog["file"], "access_log.file") or None)
    cfg = replace(cfg, access_log=ac)

    cache = _table(data, "cache")
    _check_keys(cache, _CACHE_KEYS, "cache.")
    cc = cfg.cache
    if "dir" in cache:
        cc = replace(cc, dir=_str(cache["dir"], "cache.dir"))
    if "max_size" in cache:
        cc = replace(cc, max_size=parse_size(cache["max_size"], "cache.max_size"))
    if "sync_read_max" in cache:
        cc = replace(cc, sync_read_max=_size_or_off(cache["sync_read_max"], "cache.sync_read_max"))
    if "memory" in cache:
        cc = replace(cc, memory=_size_or_off(cache["memory"], "cache.memory"))
    if "disk_retry_after" in cache:
        seconds = parse_duration(cache["disk_retry_after"], "cache.disk_retry_after")
        cc = replace(cc, disk_retry_after=seconds)
    if "revalidate_window" in cache:
        key = "cache.revalidate_window"
        seconds = parse_duration(cache["revalidate_window"], key)
        cc = replace(cc, revalidate_window=_non_negative(seconds, key))
    cfg = replace(cfg, cache=cc)

    limits = _table(data, "limits")
    _check_keys(limits, _LIMITS_KEYS, "limits.")
    lc = cfg.limits
    if "max_header_bytes" in limits:
        size = parse_size(limits["max_header_bytes"], "limits.max_header_bytes")
        lc = replace(lc, max_header_bytes=size)
    if "max_headers" in limits:
        lc = replace(lc, max_headers=_positive_int(limits["max_headers"], "limits.max_headers"))
    for name in ("client_idle_timeout", "request_head_timeout"):
        if name in limits:
            seconds = parse_duration(limits[name], f"limits.{name}")
            if seconds <= 0:
                raise ConfigError(f"limits.{name}", "must be greater than zero")
            timeout: dict[str, Any] = {name: seconds}
            lc = replace(lc, **timeout)
    if "disk_error_memory" in limits:
        size = parse_size(limits["disk_error_memory"], "limits.disk_error_memory")
        lc = replace(lc, disk_error_memory=size)
    cfg = replace(cfg, limits=lc)

    up = _table(data, "upstream")
    _check_keys(up, _UPSTREAM_KEYS, "upstream.")
    uchanges: dict[str, Any] = {}
    for k in (
        "connect_timeout",
        "header_timeout",
        "idle_timeout",
        "keepalive_timeout",
        "retry_after",
    ):
        if k in up:
            seconds = parse_duration(up[k], f"upstream.{k}")
            if seconds <= 0:
                raise ConfigError(f"upstream.{k}", "must be greater than zero")
            uchanges[k] = seconds
    for k in ("max_connections_per_host", "max_redirects", "failure_threshold"):
        if k in up:
            uchanges[k] = _positive_int(up[k], f"upstream.{k}")
    if "ca_bundle" in up:
        uchanges["ca_bundle"] = _str(up["ca_bundle"], "upstream.ca_bundle")
    if "proxy" in up:
        uchanges["proxy"] = _proxy_url(up["proxy"], "upstream.proxy")
    if "no_proxy" in up:
        uchanges["no_proxy"] = _str_list(up["no_proxy"], "upstream.no_proxy")
    if "parent" in up:
        uchanges["parent"] = _proxy_url(up["parent"], "upstream.parent") or None
        if uchanges["parent"] and uchanges.get("proxy"):
            raise ConfigError("upstream.parent", "give parent or proxy, not both")
    if "parent_only" in up:
        uchanges["parent_only"] = _bool(up["parent_only"], "upstream.parent_only")
    cfg = replace(cfg, upstream=replace(cfg.upstream, **uchanges))

    routes = {r.name: r for r in cfg.routes}
    for name, rdata in _table(data, "routes").items():
        if not isinstance(rdata, dict):
            raise ConfigError(f"routes.{name}", "must be a table")
        routes[name] = _route(name, rdata, routes.get(name))
    cfg = replace(cfg, routes=tuple(routes.values()))
    _check_route_table(cfg.routes)

    tls = _table(data, "tls_intercept")
    _check_keys(tls, _TLS_KEYS, "tls_intercept.")
    tc = TlsInterceptConfig(
        enabled=_bool(tls.get("enabled", False), "tls_intercept.enabled"),
        ca_cert=_str(tls["ca_cert"], "tls_intercept.ca_cert") if "ca_cert" in tls else None,
        ca_key=_str(tls["ca_key"], "tls_intercept.ca_key") if "ca_key" in tls else None,
        tunnel=_tunnel_entries(tls.get("tunnel", []), "tls_intercept.tunnel"),
    )
    if (tc.ca_cert is None) != (tc.ca_key is None):
        raise ConfigError("tls_intercept.ca_key", "give both ca_cert and ca_key, or neither")
    return replace(cfg, tls_intercept=tc)


def load_config(path: str | None) -> Config:
    """Read the TOML file at ``path`` (or nothing: the defaults)."""
    if path is None:
        return config_from_dict({})
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError("", f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{path} is not valid TOML: {e}") from None
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(e.key, f"{e.message} (in {path})") from None
