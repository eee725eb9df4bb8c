"""Prometheus metrics, counted from the proxy's observer hook.

Counters are bumped as requests finish and fetches settle; what is a state rather than
an event (cache size, entries, downloads in progress, offline mode) is read from the live
objects when Prometheus scrapes, so it can never drift from the truth. Everything lives in
a :class:`~prometheus_client.CollectorRegistry` of its own: the process-global registry
is shared by every library in the process and by every test in a trial run.

Every per-request metric is labelled with the route and its family, so ``sum by
(family)`` answers the questions operators ask of one package ecosystem.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IReactorTime

from pkgproxy import __version__
from pkgproxy.fetch.fetch import Outcome, State
from pkgproxy.observe import Hit, Observer, RequestRecord

if TYPE_CHECKING:
    from pkgproxy.cache.store import CacheStore
    from pkgproxy.config.model import Config, Route
    from pkgproxy.fetch.fetch import Fetch
    from pkgproxy.fetch.registry import InFlight
    from pkgproxy.upstream.client import UpstreamError

#: ``X-Cache`` values, as metric label values.
CACHE_RESULTS = ("hit", "miss", "coalesced", "revalidated", "stale")
#: Results that did not download the body for this request: what "hit ratio" counts.
FROM_CACHE = frozenset({"hit", "coalesced", "revalidated", "stale"})
#: Label value of answers that did not involve the cache (errors, refusals, admin pages).
NO_CACHE = "none"
#: How many upstream errors the status page keeps.
RECENT_ERRORS = 20
#: Per-route cache usage is a scan of every entry; scrapes closer than this reuse it.
USAGE_MAX_AGE = 10.0
#: How the fetch words a body that arrived whole but was not what it had to be.
_VERIFY_MESSAGES = (" mismatch: got ", "the index says")
_UPSTREAM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Switch(Protocol):
    """What holds the run-time offline flag (the proxy resource)."""

    offline: bool


@dataclass(frozen=True)
class ErrorRecord:
    """One failed upstream fetch, for the status page."""

    at: float
    route: str
    url: str
    kind: str
    message: str


#: The User-Agent product of ``pkgproxy-warm``; its comment (``(tag)``) names the warm-up.
WARM_AGENT = "pkgproxy-warm/"
#: Warm-ups the status page lists: the newest, and none idle for longer than an hour.
RECENT_WARMUPS = 10
WARMUP_FORGET_SECONDS = 3600.0


@dataclass
class WarmupStats:
    """One ``pkgproxy-warm`` run, as the server saw its requests."""

    tag: str
    started: float
    last: float
    requests: int = 0
    fetched: int = 0  # requests this warm-up downloaded from upstream (MISS)
    cached: int = 0  # requests answered from the cache
    failed: int = 0  # 4xx/5xx answers and cut-off transfers
    bytes: int = 0


def warmup_tag(user_agent: str) -> str | None:
    """The tag of a ``pkgproxy-warm/<version> (<tag>)`` User-Agent, else None."""
    if not user_agent.startswith(WARM_AGENT):
        return None
    _, _, rest = user_agent.partition("(")
    return rest.rstrip(")").strip()[:100] or "(untagged)"


@dataclass
class FamilyStats:
    """What one family's requests did since start, from the counters.

    :ivar requests: requests by cache result (``hit``, ``miss``, ... and ``none``).
    :ivar served: body bytes sent to clients.
    :ivar fetched: body bytes received from upstreams.
    """

    family: str
    requests: dict[str, int] = field(default_factory=dict)
    served: int = 0
    fetched: int = 0
    upstream_errors: int = 0
    verification_failures: int = 0

    @property
    def cache_requests(self) -> int:
        """Requests the cache answered one way or another (not errors or refusals)."""
        return sum(n for result, n in self.requests.items() if result != NO_CACHE)

    @property
    def hits(self) -> int:
        """Cache requests that downloaded nothing of their own."""
        return sum(self.requests.get(r, 0) for r in FROM_CACHE)

    @property
    def hit_ratio(self) -> float | None:
        """Share of cache requests that downloaded nothing of their own; None if none."""
        total = self.cache_requests
        return self.hits / total if total else None

    @property
    def saved(self) -> int:
        """Bytes clients received that did not have to come from an upstream."""
        return max(0, self.served - self.fetched)


@dataclass(frozen=True)
class RouteUsage:
    """How much of the cache one route holds."""

    route: str
    family: str
    entries: int
    bytes: int


def fetch_result(fetch: Fetch) -> tuple[str, UpstreamError | None]:
    """How a settled fetch ended, as a metric label, and the error behind it, if any.

    ``stored``, ``not_stored`` (complete but not cacheable), ``not_modified`` (a 304),
    ``relayed`` (an upstream status such as 404 passed on), ``unreachable`` (no usable
    answer), ``failed`` (the body broke off) or ``rejected`` (it failed verification).
    """
    if fetch.state is State.FAILED:
        return ("rejected" if is_verification_failure(fetch.error) else "failed"), fetch.error
    if fetch.outcome is Outcome.NOT_MODIFIED:
        return "not_modified", None
    if fetch.outcome is Outcome.RESPONSE:
        return "relayed", None
    if fetch.outcome is Outcome.UNREACHABLE:
        verify = is_verification_failure(fetch.error)
        return ("rejected" if verify else "unreachable"), fetch.error
    return ("stored" if fetch.entry is not None else "not_stored"), None


def is_verification_failure(error: UpstreamError | None) -> bool:
    """Whether a fetch error means the upstream's bytes did not match what they must be.

    A length announced by an index, or a digest, that the body does not match. The fetch
    reports these as kind ``verify`` before the body, and as ``transfer`` after it (with
    a message saying what did not match), so both are recognised here.
    """
    if error is None:
        return False
    if error.kind == "verify":
        return True
    message = str(error)
    return error.kind == "transfer" and any(m in message for m in _VERIFY_MESSAGES)


class ProxyMetrics(Observer):
    """Counts what the proxy reports and exposes it, with live gauges, in :attr:`registry`.

    :ivar switch: what holds the offline flag, once it exists (see :meth:`attach`).
    :ivar recent_errors: the last upstream errors, newest first.
    """

    def __init__(
        self, config: Config, store: CacheStore, inflight: InFlight, clock: IReactorTime
    ) -> None:
        self.registry = CollectorRegistry()
        #: Replayed hits counted here and added to the counters in one go before they
        #: are read (a counter's ``inc`` takes a lock, twice per hit otherwise).
        self._unsettled: list[_HitCount] = []
        self.registry.register(_Settle(self))  # first: collected before the counters
        self.started = clock.seconds()
        self.recent_errors: deque[ErrorRecord] = deque(maxlen=RECENT_ERRORS)
        self._clock = clock
        self.node = config.node_name
        self._families = {r.name: r.family for r in config.routes}
        self._store = store
        self._inflight = inflight
        self.switch: Switch | None = None
        self._by_kind: dict[tuple[str, str, str, int], list[Any]] = {}
        reg = self.registry
        route_labels = ("family", "route")
        self.requests = Counter(
            "pkgproxy_requests",
            "Finished client requests, by cache result and status class.",
            (*route_labels, "cache", "code"),
            registry=reg,
        )
        self.incomplete = Counter(
            "pkgproxy_incomplete_requests",
            "Client requests whose response was cut off (client gone or transfer failed).",
            route_labels,
            registry=reg,
        )
        self.served_bytes = Counter(
            "pkgproxy_served_bytes",
            "Body bytes sent to clients, by cache result.",
            (*route_labels, "cache"),
            registry=reg,
        )
        self.fetched_bytes = Counter(
            "pkgproxy_upstream_fetched_bytes",
            "Body bytes received from upstreams.",
            route_labels,
            registry=reg,
        )
        self.fetches = Counter(
            "pkgproxy_upstream_fetches",
            "Upstream fetches by how they ended (stored, not_stored, not_modified, "
            "relayed, unreachable, failed, rejected).",
            (*route_labels, "result"),
            registry=reg,
        )
        self.upstream_errors = Counter(
            "pkgproxy_upstream_errors",
            "Upstream fetches that failed, by kind (connect, dns, timeout, tls, redirect, "
            "protocol, transfer, disk, http_5xx).",
            (*route_labels, "kind"),
            registry=reg,
        )
        self.verification_failures = Counter(
            "pkgproxy_verification_failures",
            "Downloads refused because their size or digest did not match.",
            route_labels,
            registry=reg,
        )
        self.upstream_seconds = Histogram(
            "pkgproxy_upstream_response_seconds",
            "Time from sending an upstream request to its answer (headers or error).",
            route_labels,
            buckets=_UPSTREAM_BUCKETS,
            registry=reg,
        )
        reg.register(_LiveCollector(self))
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        self._usage: tuple[float, list[RouteUsage]] | None = None
        self._warmups: dict[str, WarmupStats] = {}

    def attach(self, switch: Switch) -> None:
        """Name the object whose ``offline`` flag the ``pkgproxy_offline`` gauge shows."""
        self.switch = switch

    def family_of(self, route: str) -> str:
        """The family of a route name; ``""`` for no route."""
        return self._families.get(route, "")

    # -- the observer ----------------------------------------------------------------

    def request_done(self, record: RequestRecord) -> None:
        # The two counters of one kind of request, looked up once: ``labels()`` costs
        # microseconds (a lock, a tuple, a dict) on every request of a busy cache.
        kind = (record.family, record.route, record.cache, record.status // 100)
        counters = self._by_kind.get(kind)
        if counters is None:
            if len(self._by_kind) >= 10_000:
                self._by_kind.clear()
            cache = record.cache.lower() or NO_CACHE
            family = record.family or self.family_of(record.route)
            code = f"{record.status // 100}xx"
            counters = self._by_kind[kind] = [
                self.requests.labels(family, record.route, cache, code),
                None,
            ]
        counters[0].inc()
        if record.bytes_sent:
            served = counters[1]
            if served is None:
                cache = record.cache.lower() or NO_CACHE
                family = record.family or self.family_of(record.route)
                served = counters[1] = self.served_bytes.labels(family, record.route, cache)
            served.inc(record.bytes_sent)
        if not record.completed or record.user_agent.startswith(WARM_AGENT):
            self._rare_request(record)

    def hit_done(self, hit: Hit, client: str, duration: float) -> None:
        """:meth:`request_done` of ``hit.record(client, duration)``, with the counters
        looked up once per hit (in ``hit.memo``)."""
        count = hit.memo.get(self)
        if count is None:
            count = hit.memo[self] = self._hit_count(hit)
        if count is _WARM_UP:
            self.request_done(hit.record(client, duration))
            return
        count.count += 1
        if count.count == 1:
            self._unsettled.append(count)
            if len(self._unsettled) >= MAX_UNSETTLED:
                self.settle()

    def _hit_count(self, hit: Hit) -> _HitCount:
        if hit.user_agent.startswith(WARM_AGENT):
            return _WARM_UP  # a warm-up's requests are also its statistics
        family = hit.family or self.family_of(hit.route)
        return _HitCount(
            self.requests.labels(family, hit.route, "hit", "2xx"),
            self.served_bytes.labels(family, hit.route, "hit") if hit.bytes_sent else None,
            hit.bytes_sent,
        )

    def settle(self) -> None:
        """Add the replayed hits counted since the last call to the counters."""
        unsettled, self._unsettled = self._unsettled, []
        for c in unsettled:
            count, c.count = c.count, 0
            c.requests.inc(count)
            if c.served is not None:
                c.served.inc(count * c.bytes)

    def _rare_request(self, record: RequestRecord) -> None:
        cache = record.cache.lower() or NO_CACHE
        family = record.family or self.family_of(record.route)
        if not record.completed:
            self.incomplete.labels(family, record.route).inc()
        if record.user_agent.startswith(WARM_AGENT):
            self._warmup_request(record, cache)

    def _warmup_request(self, record: RequestRecord, cache: str) -> None:
        tag = warmup_tag(record.user_agent) or ""
        now = self._clock.seconds()
        w = self._warmups.get(tag)
        if w is None:
            w = self._warmups[tag] = WarmupStats(tag, now, now)
            if len(self._warmups) > RECENT_WARMUPS:
                oldest = min(self._warmups.values(), key=lambda x: x.last)
                del self._warmups[oldest.tag]
        w.last = now
        w.requests += 1
        w.bytes += record.bytes_sent
        if record.status >= 400 or not record.completed:
            w.failed += 1
        elif cache == "miss":
            w.fetched += 1
        elif cache != NO_CACHE:
            w.cached += 1

    def warmups(self) -> list[WarmupStats]:
        """Recent warm-ups, newest first (none idle for over an hour)."""
        now = self._clock.seconds()
        recent = [w for w in self._warmups.values() if now - w.last < WARMUP_FORGET_SECONDS]
        return sorted(recent, key=lambda w: -w.started)

    def fetch_settled(self, route: Route, fetch: Fetch) -> None:
        labels = (route.family, route.name)
        result, error = fetch_result(fetch)
        self.fetches.labels(*labels, result).inc()
        received = len(fetch.error_body) if fetch.outcome is Outcome.RESPONSE else fetch.written
        if received:
            self.fetched_bytes.labels(*labels).inc(received)
        if fetch.outcome is not None:
            self.upstream_seconds.labels(*labels).observe(
                max(0.0, fetch.answered_at - fetch.started_at)
            )
        if result == "rejected":
            self.verification_failures.labels(*labels).inc()
            kind = "verify"
        elif error is not None:
            kind = error.kind
            self.upstream_errors.labels(*labels, kind).inc()
        elif result == "relayed" and fetch.status >= 500:
            kind = "http_5xx"
            self.upstream_errors.labels(*labels, kind).inc()
        else:
            return
        message = str(error) if error is not None else f"upstream answered {fetch.status}"
        self.recent_errors.appendleft(
            ErrorRecord(self._clock.seconds(), route.name, fetch.request.url, kind, message)
        )

    # -- reading ---------------------------------------------------------------------

    def family_stats(self) -> list[FamilyStats]:
        """Per-family totals since start, read back from the counters."""
        self.settle()
        stats: dict[str, FamilyStats] = {}

        def get(family: str) -> FamilyStats:
            if family not in stats:
                stats[family] = FamilyStats(family)
            return stats[family]

        for labels, value in _totals(self.requests):
            s = get(labels["family"])
            s.requests[labels["cache"]] = s.requests.get(labels["cache"], 0) + int(value)
        for labels, value in _totals(self.served_bytes):
            get(labels["family"]).served += int(value)
        for labels, value in _totals(self.fetched_bytes):
            get(labels["family"]).fetched += int(value)
        for labels, value in _totals(self.upstream_errors):
            get(labels["family"]).upstream_errors += int(value)
        for labels, value in _totals(self.verification_failures):
            get(labels["family"]).verification_failures += int(value)
        stats.pop("", None)  # admin pages and unrouted requests are nobody's family
        return sorted(stats.values(), key=lambda s: s.family)

    def route_usage(self) -> list[RouteUsage]:
        """Entries and bytes per route; a scan of the index, reused for a few seconds."""
        now = self._clock.seconds()
        if self._usage is not None and now - self._usage[0] < USAGE_MAX_AGE:
            return self._usage[1]
        tally: dict[str, list[int]] = {}
        for entry in self._store.entries():
            route = entry.key.partition(":")[0]
            counts = tally.setdefault(route, [0, 0])
            counts[0] += 1
            counts[1] += entry.size
        usage = [
            RouteUsage(route, self.family_of(route), n, size)
            for route, (n, size) in sorted(tally.items())
        ]
        self._usage = (now, usage)
        return usage


def _totals(counter: Counter) -> Iterator[tuple[dict[str, str], float]]:
    """The ``_total`` samples of a labelled counter, with their labels."""
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                yield sample.labels, sample.value


#: Distinct replayed hits counted before they are added to the counters regardless.
MAX_UNSETTLED = 1024


class _HitCount:
    """One replayed hit's counters, and its answers not yet added to them."""

    __slots__ = ("bytes", "count", "requests", "served")

    def __init__(self, requests: Any, served: Any, size: int) -> None:
        self.requests = requests
        self.served = served
        self.bytes = size
        self.count = 0


#: A warm-up's hit: counted through :meth:`ProxyMetrics.request_done`.
_WARM_UP = _HitCount(None, None, 0)


class _Settle(Collector):
    """Yields nothing; collected before the counters, it brings them up to date."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterable[Metric]:
        self._m.settle()
        return ()


class _LiveCollector(Collector):
    """Gauges read from the live cache, fetch registry and switch at each scrape."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterable[Metric]:
        m = self._m
        store = m._store
        labels = ["family", "route"]
        info = GaugeMetricFamily(
            "pkgproxy_info", "The running pkgproxy and its node name.", labels=["version", "node"]
        )
        info.add_metric([__version__, m.node], 1)
        yield info
        yield GaugeMetricFamily(
            "pkgproxy_ready", "1 once the cache index is loaded.", value=int(store.ready)
        )
        offline = m.switch.offline if m.switch is not None else False
        yield GaugeMetricFamily(
            "pkgproxy_offline", "1 while offline mode is on.", value=int(offline)
        )
        yield GaugeMetricFamily(
            "pkgproxy_cache_max_bytes", "The cache's byte budget.", value=store.max_size
        )
        yield GaugeMetricFamily(
            "pkgproxy_cache_bytes", "Bytes of complete entries in the cache.", store.total_bytes
        )
        yield GaugeMetricFamily(
            "pkgproxy_cache_entries", "Complete entries in the cache.", value=len(store)
        )
        route_bytes = GaugeMetricFamily(
            "pkgproxy_cache_route_bytes",
            f"Bytes in the cache per route (recounted at most every {USAGE_MAX_AGE:g} s).",
            labels=labels,
        )
        route_entries = GaugeMetricFamily(
            "pkgproxy_cache_route_entries",
            f"Entries in the cache per route (recounted at most every {USAGE_MAX_AGE:g} s).",
            labels=labels,
        )
        for u in m.route_usage():
            route_bytes.add_metric([u.family, u.route], u.bytes)
            route_entries.add_metric([u.family, u.route], u.entries)
        yield route_bytes
        yield route_entries
        yield CounterMetricFamily(
            "pkgproxy_cache_evictions",
            "Entries evicted to stay within the byte budget.",
            value=store.evictions,
        )
        fetches = GaugeMetricFamily(
            "pkgproxy_inflight_fetches", "Upstream downloads in progress.", labels=labels
        )
        subscribers = GaugeMetricFamily(
            "pkgproxy_inflight_subscribers",
            "Clients streaming a download in progress.",
            labels=labels,
        )
        counts: dict[str, list[int]] = {}
        for fetch in m._inflight:
            c = counts.setdefault(fetch.key.partition(":")[0], [0, 0])
            c[0] += 1
            c[1] += fetch.subscribers
        for route, (n, subs) in sorted(counts.items()):
            fetches.add_metric([m.family_of(route), route], n)
            subscribers.add_metric([m.family_of(route), route], subs)
        yield fetches
        yield subscribers
