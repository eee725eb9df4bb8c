"""What an operator sees and does: metrics, the access log, the status page, admin actions.

:class:`Operations` builds them from the configuration and hands the proxy resource the
two things it takes: one observer (metrics and access log) and the admin resource.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from pkgproxy.admin.accesslog import AccessLog, AccessLogFile
from pkgproxy.admin.metrics import ProxyMetrics, Switch
from pkgproxy.admin.resource import AdminResource
from pkgproxy.cache.store import CacheStore
from pkgproxy.config.model import Config
from pkgproxy.diskpool import DiskPool
from pkgproxy.fetch.registry import InFlight
from pkgproxy.observe import Observer, Observers

__all__ = ["AccessLog", "AdminResource", "Operations", "ProxyMetrics"]


class Operations:
    """The operations surface of one proxy.

    :ivar observer: pass to ``ProxyResource(observer=...)``.
    :ivar resource: pass to ``ProxyResource(admin=...)``; then call :meth:`attach`.
    """

    def __init__(
        self,
        config: Config,
        store: CacheStore,
        inflight: InFlight,
        clock: IReactorTime,
        pool: DiskPool | None = None,
    ) -> None:
        self.metrics = ProxyMetrics(config, store, inflight, clock)
        observers: list[Observer] = [self.metrics]
        self.access_log: AccessLog | AccessLogFile | None = None
        alog = config.access_log
        if alog.enabled and alog.file is not None and pool is not None:
            # A Service: the caller adds it to the service tree, so it is flushed on stop.
            self.access_log = AccessLogFile(alog.file, pool, clock, alog.format == "json")
            observers.append(self.access_log)
        elif alog.enabled:
            # A Service too: its last batch is written when the server stops.
            self.access_log = AccessLog(alog.format == "json", clock=clock, pool=pool)
            observers.append(self.access_log)
        self.observer = Observers(*observers)
        self.resource = AdminResource(config, store, inflight, self.metrics, clock)

    def attach(self, proxy: Switch) -> None:
        """Give the admin actions and the metrics the proxy whose offline flag they use.

        The proxy resource is built with this object's parts, so it exists only after.
        """
        self.resource.attach(proxy)
