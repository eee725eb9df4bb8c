"""``twistd pkgproxy``: command-line options and the service tree.

The only module that touches the global reactor: everything below receives it.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.python import usage

from pkgproxy import __version__
from pkgproxy.admin import Operations
from pkgproxy.config import Config, ConfigError, load_config, parse_size
from pkgproxy.diskpool import DiskPool
from pkgproxy.families import Facts
from pkgproxy.fetch.registry import InFlight
from pkgproxy.gcpolicy import HeapFreeze
from pkgproxy.learning import Learner
from pkgproxy.service import OrderedMultiService
from pkgproxy.tlsca import CAError, CertificateAuthority
from pkgproxy.upstream.client import UpstreamService, require_service_identity, route_ca_files
from pkgproxy.web.root import ProxyResource
from pkgproxy.web.site import ProxySite
from pkgproxy.web.tunnel import Connector


class Options(usage.Options):
    """Options override the config file, which overrides the built-in defaults."""

    synopsis = "[options]"
    longdesc = (
        "Caching proxy for Debian, Ubuntu, Alpine, PyPI, npm and OCI registries. "
        "Every option is optional: with none, it listens on tcp:3142 and caches in "
        "./pkgproxy-cache."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (see etc/pkgproxy.toml)."],
        ["cache-dir", "d", None, "Cache directory (overrides cache.dir)."],
        ["max-size", "m", None, "Cache size budget, e.g. 10GiB (overrides cache.max_size)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Listen on a strports description, e.g. tcp:3142 (repeatable)."""
        self["listen"].append(description)

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"pkgproxy {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            cfg = load_config(self["config"])
            if self["cache-dir"]:
                cfg = replace(cfg, cache=replace(cfg.cache, dir=self["cache-dir"]))
            if self["max-size"]:
                size = parse_size(self["max-size"], "--max-size")
                cfg = replace(cfg, cache=replace(cfg.cache, max_size=size))
            if self["listen"]:
                cfg = replace(cfg, listen=tuple(self["listen"]))
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        from twisted.internet import reactor
        from twisted.internet.endpoints import serverFromString

        for desc in cfg.listen:
            try:
                endpoint = serverFromString(reactor, desc)
            except (ValueError, KeyError, TypeError) as e:
                raise usage.UsageError(f"listen: bad description {desc!r}: {e}") from None
            port = getattr(endpoint, "_port", None)
            if isinstance(port, int) and not 0 <= port <= 65535:
                raise usage.UsageError(f"listen: bad description {desc!r}: port must be 0-65535")
        if os.path.exists(cfg.cache.dir) and not os.path.isdir(cfg.cache.dir):
            raise usage.UsageError(f"cache.dir: {cfg.cache.dir} exists and is not a directory")
        if cfg.access_log.enabled and cfg.access_log.file is not None:
            try:
                os.close(
                    os.open(cfg.access_log.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                )
            except OSError as e:
                raise usage.UsageError(
                    f"access_log.file: cannot write {cfg.access_log.file}: {e.strerror}"
                ) from None
        try:
            require_service_identity()
        except ImportError:
            raise usage.UsageError(
                "service_identity is not installed: TLS host names cannot be checked "
                "(pip install service-identity)"
            ) from None
        if cfg.tls_intercept.enabled:
            try:
                _certificate_authority(cfg)
            except CAError as e:
                raise usage.UsageError(f"tls_intercept: {e}") from None
        self.config = cfg


def build_service(cfg: Config, reactor: Any) -> MultiService:
    """The service tree: disk pool, cache, upstream pool, then the listeners.

    Listeners are added last so that they stop first on shutdown.
    """
    from pkgproxy.cache.store import CacheStore

    top = OrderedMultiService()
    heap = HeapFreeze()
    heap.setServiceParent(top)
    pool = DiskPool(reactor)
    pool.setServiceParent(top)
    store = CacheStore(
        cfg.cache.dir,
        cfg.cache.max_size,
        pool,
        reactor,
        disk_retry_after=cfg.cache.disk_retry_after,
    )
    store.setServiceParent(top)
    upstream = UpstreamService(
        reactor,
        cfg.upstream,
        cfg.upstream_credentials(),
        ca_files=route_ca_files(cfg.enabled_routes()),
        routes=cfg.enabled_routes(),
        environ=os.environ,
    )
    upstream.setServiceParent(top)
    learner = Learner(Facts(), store, pool, cfg.routes)
    ready = store.when_ready().addCallback(lambda _: learner.relearn())
    ready.addCallback(lambda _: heap.freeze())
    inflight = InFlight()
    ops = Operations(cfg, store, inflight, reactor, pool)
    if isinstance(ops.access_log, Service):
        ops.access_log.setServiceParent(top)  # after the pool: flushed before it stops
    root = ProxyResource(
        cfg,
        store,
        inflight,
        upstream.client,
        pool,
        reactor,
        cfg.upstream.idle_timeout,
        learner,
        sync_read_max=cfg.cache.sync_read_max,
        observer=ops.observer,
        admin=ops.resource,
        ca=_certificate_authority(cfg),
        tunnel_connector=_tunnel_connector(cfg, reactor),
        revalidate_window=cfg.cache.revalidate_window,
    )
    ops.attach(root)
    site = ProxySite(root, reactor=reactor)
    site.hit_path = root.hit_path
    site.displayTracebacks = False
    # A client connection idle this long between requests is closed (Twisted's default
    # is 12 hours); a client that stops reading mid-body is cut off by the producers.
    site.timeOut = cfg.limits.client_idle_timeout
    site.max_header_bytes = cfg.limits.max_header_bytes
    site.max_headers = cfg.limits.max_headers
    for desc in cfg.listen:
        strports.service(desc, site, reactor=reactor).setServiceParent(top)
    return top


def _certificate_authority(cfg: Config) -> CertificateAuthority | None:
    """pkgproxy's CA when TLS interception is on (created on first start)."""
    tls = cfg.tls_intercept
    if not tls.enabled:
        return None
    directory = os.path.join(cfg.cache.dir, "tls")
    return CertificateAuthority(
        tls.ca_cert or os.path.join(directory, "ca.crt"),
        tls.ca_key or os.path.join(directory, "ca.key"),
    )


def _tunnel_connector(cfg: Config, reactor: Any) -> Connector | None:
    """How blind tunnels reach their ``host:port``, when any are listed."""
    if not cfg.tls_intercept.tunnel:
        return None
    from twisted.internet.endpoints import HostnameEndpoint

    timeout = cfg.upstream.connect_timeout
    return lambda host, port: HostnameEndpoint(reactor, host, port, timeout=timeout)


def raise_open_file_limit() -> None:
    """Use the whole hard limit on open files: each client and each download holds one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def makeService(options: Options) -> IService:
    """Called by twistd with parsed :class:`Options`."""
    from twisted.internet import reactor

    raise_open_file_limit()

    return build_service(options.config, reactor)
