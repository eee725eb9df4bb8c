"""The operator's interface: one TOML file read into frozen dataclasses.

Every key is optional; built-in routes cover every family, and a file overrides a route
by name. Every error names the key and what is wrong, so a typo never starts a
half-configured server. No Twisted imports here: this is plain data.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pkgproxy.config.model import (
    AccessLogConfig,
    CacheConfig,
    Config,
    LimitsConfig,
    Route,
    TlsInterceptConfig,
    UpstreamConfig,
)

__all__ = [
    "AccessLogConfig",
    "BUILTIN_ROUTES",
    "CacheConfig",
    "Config",
    "ConfigError",
    "LimitsConfig",
    "Route",
    "TlsInterceptConfig",
    "UpstreamConfig",
    "check_url",
    "config_from_dict",
    "load_config",
    "parse_duration",
    "parse_size",
]


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


if TYPE_CHECKING:
    #: Every family's built-in routes (:data:`pkgproxy.families.BUILTIN_ROUTES`).
    BUILTIN_ROUTES: tuple[Route, ...]


def __getattr__(name: str) -> object:
    # The families are read when first needed: they import pkgproxy.config.model, and
    # this package's __init__ runs first.
    if name == "BUILTIN_ROUTES":
        from pkgproxy.families import BUILTIN_ROUTES

        return BUILTIN_ROUTES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    from pkgproxy.families import FAMILIES

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
    root = FAMILIES[route.family].prefix_root
    if root is not None and "prefix" not in data and not route.prefix.startswith(root):
        route = replace(route, prefix=f"{root}{name}/")
    for family_name, owner in FAMILIES.items():
        root = owner.prefix_root
        if root is not None and (route.family == family_name) != route.prefix.startswith(root):
            raise ConfigError(where + "prefix", owner.prefix_root_error)
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
    "check_interval",
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
    from pkgproxy.families import BUILTIN_ROUTES

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
    if "check_interval" in cache:
        seconds = parse_duration(cache["check_interval"], "cache.check_interval")
        if seconds <= 0:
            raise ConfigError("cache.check_interval", f"must be greater than zero, got {seconds}")
        cc = replace(cc, check_interval=seconds)
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
