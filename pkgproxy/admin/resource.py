"""The admin pages under ``/_pkgproxy/``: status page, metrics and admin actions.

Who may use them:

* everything here answers only clients whose address is in ``admin_networks`` (loopback
  by default); anyone else gets 403, whatever the path;
* admin actions (``POST /_pkgproxy/admin/...``) also need ``Authorization: Bearer
  <admin_token>`` when a token is configured, and are refused when a browser says the
  request comes from another site, so that a page on the internet cannot make an
  operator's browser purge the cache (a form POST needs no CORS preflight).

The liveness and readiness probes (``/_pkgproxy/health``, ``/_pkgproxy/ready``) are not
here: they are answered by the proxy resource for anyone, as orchestrators need.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request

from pkgproxy import __version__, httputil
from pkgproxy.admin.metrics import ProxyMetrics, Switch
from pkgproxy.admin.status import CSP, DownloadView, StatusView, config_text, render_status
from pkgproxy.cache.keys import cache_key, names
from pkgproxy.cache.store import CacheStore
from pkgproxy.config.model import Config
from pkgproxy.fetch.registry import InFlight
from pkgproxy.netaddr import IP, Networks, parse_ip
from pkgproxy.web.routing import RouteError, RouteTable, valid_host

log = Logger()

STATUS_PATHS = (b"/_pkgproxy/", b"/_pkgproxy/status")
METRICS_PATH = b"/_pkgproxy/metrics"
PURGE_PATH = b"/_pkgproxy/admin/purge"
OFFLINE_PATH = b"/_pkgproxy/admin/offline"
#: How many purged keys a purge answer lists (the count is always complete).
LISTED_KEYS = 100
_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no"}


def _plain(request: Request, code: int, message: str) -> bytes:
    """A one-line plain-text answer."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    body = f"pkgproxy: {message}\n".encode()
    request.setHeader(b"content-length", str(len(body)).encode())
    return b"" if request.method == b"HEAD" else body


def _json(request: Request, data: dict[str, Any], code: int = http.OK) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    body = (json.dumps(data, indent=2) + "\n").encode()
    request.setHeader(b"content-length", str(len(body)).encode())
    return b"" if request.method == b"HEAD" else body


def client_ip(request: Request) -> IP | None:
    """The client's IP address; an IPv4-mapped IPv6 address as the IPv4 one it is."""
    return parse_ip(getattr(request.getClientAddress(), "host", None))


def cross_site(request: Request) -> bool:
    """True when a browser says this request was started by a page of another origin."""
    fetch_site = request.getHeader(b"sec-fetch-site")
    if fetch_site is not None and fetch_site.lower() not in (b"same-origin", b"none"):
        return True
    origin = request.getHeader(b"origin")
    if origin is None:
        return False  # not a browser's cross-origin request (curl, scripts)
    host = request.getHeader(b"host") or b""
    return urlsplit(origin.decode("latin-1")).netloc.lower() != host.decode("latin-1").lower()


class AdminResource(Resource):
    """Answers every ``/_pkgproxy/`` request the proxy resource hands over."""

    isLeaf = True

    def __init__(
        self,
        config: Config,
        store: CacheStore,
        inflight: InFlight,
        metrics: ProxyMetrics,
        clock: IReactorTime,
    ) -> None:
        super().__init__()
        self._config = config
        self._store = store
        self._inflight = inflight
        self._metrics = metrics
        self._clock = clock
        self._networks = Networks(config.admin_networks)
        self._token = config.admin_token.encode() if config.admin_token else None
        self._table = RouteTable(config.enabled_routes())
        self._config_text = config_text(config)
        self._switch: Switch | None = None
        self._pages: dict[bytes, tuple[tuple[bytes, ...], Callable[[Request], bytes]]] = {
            **{p: ((b"GET", b"HEAD"), self._status) for p in STATUS_PATHS},
            METRICS_PATH: ((b"GET", b"HEAD"), self._metrics_page),
            OFFLINE_PATH: ((b"GET", b"HEAD", b"POST"), self._offline),
            PURGE_PATH: ((b"POST",), self._purge),
        }

    def attach(self, switch: Switch) -> None:
        """The object whose ``offline`` flag the offline action switches (the proxy)."""
        self._switch = switch
        self._metrics.attach(switch)

    # -- access ------------------------------------------------------------------------

    def allowed_client(self, request: Request) -> bool:
        """Whether the client's address is in ``admin_networks``."""
        ip = client_ip(request)
        return ip is not None and ip in self._networks

    def _token_ok(self, request: Request) -> bool:
        if self._token is None:
            return True
        scheme, _, given = (request.getHeader(b"authorization") or b"").strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._token)

    def render(self, request: Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", CSP.encode())
        if not self.allowed_client(request):
            return _plain(request, http.FORBIDDEN, "admin pages are open only to admin_networks")
        page = self._pages.get(request.path)
        if page is None:
            return _plain(request, http.NOT_FOUND, "no such admin page")
        methods, handler = page
        if request.method not in methods:
            request.setHeader(b"allow", b", ".join(methods))
            return _plain(request, http.NOT_ALLOWED, f"{request.method.decode()} is not allowed")
        if request.method == b"POST":
            if cross_site(request):
                return _plain(request, http.FORBIDDEN, "cross-site admin requests are refused")
            if not self._token_ok(request):
                return _plain(
                    request, http.FORBIDDEN, "admin actions need 'Authorization: Bearer <token>'"
                )
        return handler(request)

    # -- pages -------------------------------------------------------------------------

    def _status(self, request: Request) -> bytes:
        body = render_status(self.view(_base_url(request))).encode()
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-length", str(len(body)).encode())
        return b"" if request.method == b"HEAD" else body

    def view(self, base_url: str) -> StatusView:
        """A snapshot of everything the status page shows.

        :param base_url: how the client reached this server, for the example commands.
        """
        now = self._clock.seconds()
        store = self._store
        downloads = [
            DownloadView(
                key=f.key,
                url=f.request.url,
                route=f.key.partition(":")[0],
                written=f.written,
                length=f.length,
                subscribers=f.subscribers,
                age=now - f.started_at,
            )
            for f in self._inflight
        ]
        return StatusView(
            version=__version__,
            now=now,
            uptime=now - self._metrics.started,
            ready=store.ready,
            offline=self._switch.offline if self._switch is not None else self._config.offline,
            cache_dir=store.directory,
            cache_bytes=store.total_bytes,
            cache_max=store.max_size,
            cache_entries=len(store),
            evictions=store.evictions,
            usage=self._metrics.route_usage(),
            families=self._metrics.family_stats(),
            downloads=downloads,
            errors=list(self._metrics.recent_errors),
            config_text=self._config_text,
            base_url=base_url,
            token_required=self._token is not None,
            warmups=self._metrics.warmups(),
            node=self._config.node_name,
        )

    def _metrics_page(self, request: Request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        body: bytes = encoder(self._metrics.registry)
        request.setHeader(b"content-type", content_type.encode())
        request.setHeader(b"content-length", str(len(body)).encode())
        return b"" if request.method == b"HEAD" else body

    # -- actions -----------------------------------------------------------------------

    def _offline(self, request: Request) -> bytes:
        if self._switch is None:
            return _plain(request, http.SERVICE_UNAVAILABLE, "the proxy is not running")
        if request.method == b"POST":
            value = _arg(request, "enabled")
            if value is None or value.lower() not in _TRUE | _FALSE:
                return _plain(request, http.BAD_REQUEST, "give enabled=true or enabled=false")
            offline = value.lower() in _TRUE
            if offline != self._switch.offline:
                log.info(
                    "offline mode {state} by {client}",
                    state="on" if offline else "off",
                    client=str(client_ip(request)),
                )
            self._switch.offline = offline
        return _json(request, {"offline": self._switch.offline})

    def _purge(self, request: Request) -> bytes:
        given = {n: v for n in ("key", "prefix", "path") if (v := _arg(request, n)) is not None}
        if len(given) != 1:
            return _plain(request, http.BAD_REQUEST, "give one of key=, prefix= or path=")
        [(kind, value)] = given.items()
        if not value:
            return _plain(request, http.BAD_REQUEST, f"{kind}= must not be empty")
        if kind == "path":
            try:
                value = self._key_of(value)
            except (RouteError, httputil.BadPath) as e:
                return _plain(request, http.BAD_REQUEST, f"path: {e}")
        if kind == "prefix":
            matches = lambda k: k.startswith(value)  # noqa: E731
        else:
            # A key also names its variants: representations (#) and rewritten copies (@).
            matches = lambda k: names(k, value)  # noqa: E731
        victims = [e for e in self._store.entries() if matches(e.key)]
        freed = 0
        for entry in victims:
            if self._store.remove(entry.key):
                freed += entry.size
        log.info(
            "purged {n} entries ({bytes} bytes) for {kind}={value!r} at the request of {client}",
            n=len(victims),
            bytes=freed,
            kind=kind,
            value=value,
            client=str(client_ip(request)),
        )
        keys = [e.key for e in victims[:LISTED_KEYS]]
        return _json(request, {"purged": len(victims), "bytes": freed, "keys": keys})

    def _key_of(self, path: str) -> str:
        """The cache key a client path (``/debian/dists/...``) is stored under."""
        route, rest = self._table.resolve(path)
        rest_path, sep, query = rest.partition("?")
        rest_path = httputil.canonical_path(rest_path)
        return cache_key(route.name, f"{rest_path}{sep}{query}")


def _arg(request: Request, name: str) -> str | None:
    """One query or form argument, decoded; ``None`` when absent."""
    values = (request.args or {}).get(name.encode())
    if not values:
        return None
    return bytes(values[0]).decode("utf-8", "replace").strip()


def _base_url(request: Request) -> str:
    """``http://host:port`` as the client reached this server, for copy-paste examples."""
    scheme = "https" if request.isSecure() else "http"
    host = (request.getHeader(b"host") or b"").strip(b" \t")
    if host and valid_host(host):
        return f"{scheme}://{host.decode('ascii')}"
    addr = request.getHost()
    return f"{scheme}://{getattr(addr, 'host', 'localhost')}:{getattr(addr, 'port', 80)}"
