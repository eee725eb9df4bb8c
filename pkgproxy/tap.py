"""``twistd pkgproxy``: command-line options and the service tree.

The only module that touches the global reactor (and the other process-wide state:
stderr, the exit status, twistd's log observer): everything below receives it.

Whatever stops pkgproxy from starting is one line on stderr, ``pkgproxy: <reason>``:
a bad option or configuration value exits with status 2 (as argparse does), a cache
directory or a port it cannot use with status 1.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from types import TracebackType
from typing import Any, NoReturn

from twisted.application.service import IService, MultiService, Service
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
)
from twisted.python import usage

from pkgproxy import __version__
from pkgproxy.admin import Operations
from pkgproxy.config import Config, ConfigError, load_config, parse_size
from pkgproxy.diskpool import DiskPool
from pkgproxy.families import AUTH_SCOPES, Facts
from pkgproxy.fetch import fetch as fetch_module
from pkgproxy.fetch.registry import InFlight
from pkgproxy.gcpolicy import HeapFreeze
from pkgproxy.learning import Learner
from pkgproxy.service import (
    Listener,
    OrderedMultiService,
    StartupError,
    kernel_backlog_limit,
)
from pkgproxy.tlsca import CAError, CertificateAuthority
from pkgproxy.upstream.client import UpstreamService, require_service_identity, route_ca_files
from pkgproxy.web.clientaddr import TrustedProxies, TrustingSite
from pkgproxy.web.root import ProxyResource
from pkgproxy.web.site import ProxySite
from pkgproxy.web.tunnel import Connector

log = Logger()

#: Exit status of a bad option or configuration value (argparse's).
USAGE_ERROR = 2
#: ``--log-level`` names; ``info`` shows what an operator acts on (start, the cache
#: summary, warnings, access lines), ``debug`` adds what pkgproxy learns from indexes.
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


def fail(message: str, status: int) -> NoReturn:
    """Print ``pkgproxy: message`` on the process's own stderr and exit with ``status``.

    ``sys.__stderr__``: once twistd's logging has begun, ``sys.stderr`` goes to the log.
    """
    stderr = sys.__stderr__ or sys.stderr
    stderr.write(f"pkgproxy: {message}\n")
    stderr.flush()
    raise SystemExit(status)


def _startup_excepthook(
    previous: Callable[[type[BaseException], BaseException, TracebackType | None], Any],
) -> Callable[[type[BaseException], BaseException, TracebackType | None], Any]:
    """An excepthook that prints a :class:`StartupError` as its one line.

    A listener that cannot listen raises while twistd starts the services; twistd
    removes its pid file and lets the exception end the process (status 1), and this
    prints it instead of a traceback.
    """

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> Any:
        if isinstance(value, StartupError):
            stderr = sys.__stderr__ or sys.stderr
            stderr.write(f"pkgproxy: {value}\n")
            stderr.flush()
            return None
        return previous(kind, value, tb)

    return hook


def stop_failed(reactor: Any, message: str) -> None:
    """A fatal error once running (the cache failed its recovery): one line, status 1.

    twistd has no exit status of its own: the reactor stops (services flush and close),
    twistd removes its pid file, and the exit status is set at interpreter exit.
    """
    stderr = sys.__stderr__ or sys.stderr
    stderr.write(f"pkgproxy: {message}\n")
    stderr.flush()
    atexit.register(os._exit, 1)
    if reactor.running:
        reactor.stop()


class _LogSetup:
    """The level for twistd's log observer, set by ``--log-level`` (see :func:`log_observer`).

    twistd builds its observer after the options are parsed, from a ``--logger`` name;
    pkgproxy names :func:`log_observer` there unless the operator named another.
    """

    level = LogLevel.info
    options: Any = None


def log_observer() -> ILogObserver:
    """twistd's usual log observer (file, stdout or syslog), showing ``--log-level`` and up."""
    from twisted.scripts import twistd

    runner: Any = getattr(twistd, "_SomeApplicationRunner")  # noqa: B009
    observer: Any = runner.loggerFactory(_LogSetup.options)._getLogObserver()
    if not ILogObserver.providedBy(observer):
        observer = LegacyLogObserverWrapper(observer)
    return FilteringLogObserver(
        observer, [LogLevelFilterPredicate(defaultLogLevel=_LogSetup.level)]
    )


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
        [
            "log-level",
            None,
            "info",
            "Lowest level logged: debug, info, warn, error or critical. debug adds what "
            "pkgproxy learns from every index.",
        ],
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

    def parseOptions(self, options: Any = None) -> None:
        """Parse. Under twistd, an error is one line on stderr and exit status 2.

        (twistd itself would print its usage text on stdout, then the error, and exit 1.)
        Without twistd (``parent``), the :class:`usage.UsageError` is raised as usual.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise
            fail(str(e), USAGE_ERROR)

    def postOptions(self) -> None:
        level = str(self["log-level"]).lower()
        if level not in LOG_LEVELS:
            raise usage.UsageError(
                f"--log-level: {self['log-level']!r} is not one of {', '.join(LOG_LEVELS)}"
            )
        parent = getattr(self, "parent", None)
        if parent is not None and not parent.get("logger"):
            # twistd turns this name into its log observer after all options are parsed.
            _LogSetup.level = LogLevel.levelWithName(level)
            _LogSetup.options = parent
            parent["logger"] = f"{__name__}.log_observer"
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


def build_service(
    cfg: Config, reactor: Any, on_cache_failed: Callable[[str], object] | None = None
) -> MultiService:
    """The service tree: disk pool, cache, upstream pool, then the listeners.

    Listeners are added last so that they stop first on shutdown.

    :param on_cache_failed: called with the one-line reason if the cache's recovery at
        start fails (twistd's process then stops: see :func:`makeService`).
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
        check_interval=cfg.cache.check_interval,
    )
    store.setServiceParent(top)
    if on_cache_failed is not None:
        store.when_failed().addCallback(on_cache_failed)
    upstream = UpstreamService(
        reactor,
        cfg.upstream,
        cfg.upstream_credentials(),
        ca_files=route_ca_files(cfg.enabled_routes()),
        routes=cfg.enabled_routes(),
        environ=os.environ,
        node_name=cfg.node_name,
        auth_scopes=AUTH_SCOPES,
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
    site = (
        TrustingSite(root, TrustedProxies(cfg.trusted_proxies), reactor=reactor)
        if cfg.trusted_proxies
        else ProxySite(root, reactor=reactor)
    )
    site.hit_path = root.hit_path
    site.displayTracebacks = False
    # A client connection idle this long between requests is closed (Twisted's default
    # is 12 hours); a client that stops reading mid-body is cut off by the producers.
    site.timeOut = cfg.limits.client_idle_timeout
    site.max_header_bytes = cfg.limits.max_header_bytes
    site.max_headers = cfg.limits.max_headers
    backlog = kernel_backlog_limit()
    site.request_timeout = cfg.limits.request_head_timeout
    fetch_module.SPILL_BUDGET.limit = cfg.limits.disk_error_memory
    for desc in cfg.listen:
        Listener(reactor, desc, site, backlog).setServiceParent(top)
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
    """Called by twistd with parsed :class:`Options`, before it starts logging.

    A cache directory that cannot be used stops the start here, in one line.
    """
    from twisted.internet import reactor

    from pkgproxy.cache.store import directory_problem

    sys.excepthook = _startup_excepthook(sys.excepthook)
    problem = directory_problem(os.path.abspath(options.config.cache.dir), create=True)
    if problem is not None:
        fail(problem, 1)
    raise_open_file_limit()
    reactor.callWhenRunning(log_summary, options.config)
    return build_service(options.config, reactor, lambda why: stop_failed(reactor, why))


def log_summary(cfg: Config) -> None:
    """One line at start with what an operator checks first: where, which cache, routes."""
    from pkgproxy.admin.status import human_bytes

    log.info(
        "pkgproxy {version}: listening on {listen}; cache {dir} up to {size}; routes {routes}",
        version=__version__,
        listen=", ".join(cfg.listen),
        dir=os.path.abspath(cfg.cache.dir),
        size=human_bytes(cfg.cache.max_size),
        routes=", ".join(r.name for r in cfg.enabled_routes()),
    )
