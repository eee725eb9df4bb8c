"""Operations in memory: metrics, access log, status page, admin access control and actions.

The proxy is :class:`pkgproxy.testing.MemoryProxy` (the real site, resource, store and
fetch code on a fake clock) with the operations surface of
:class:`pkgproxy.admin.Operations` wired in as ``twistd pkgproxy`` wires it. Requests
through its client come from 127.0.0.1; requests from other addresses are fed byte by
byte to a server connection whose peer is that address.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed

from pkgproxy.admin import Operations
from pkgproxy.admin.accesslog import NAMESPACE, AccessLog, escape
from pkgproxy.admin.metrics import ErrorRecord, FamilyStats
from pkgproxy.admin.status import DownloadView, human_bytes, human_duration, render_status
from pkgproxy.config import ConfigError, config_from_dict
from pkgproxy.observe import Hit, Observer, Observers, RequestRecord
from pkgproxy.testing import MemoryProxy
from pkgproxy.web.root import ProxyResource
from pkgproxy.web.site import MAX_REQUEST_BODY, ProxySite

UP = "http://upstream.test/debian/"
LM = "Wed, 25 Nov 2026 22:33:12 GMT"
TOKEN = "s3cret-token-0123456789"
OUTSIDER = IPv4Address("TCP", "192.0.2.7", 40000)
DEB = "/debian/pool/main/a/a_1_all.deb"


def header(resp: Any, name: str) -> str | None:
    values = resp.headers.getRawHeaders(name)
    return values[-1] if values else None


class OpsTestCase(SynchronousTestCase):
    """A memory proxy with metrics, access log and admin pages, as ``build_service`` wires."""

    config: dict[str, Any] = {}

    def setUp(self) -> None:
        data: dict[str, Any] = {"routes": {"debian": {"upstream": UP, "index_ttl": "60s"}}}
        data.update(self.config)
        self.proxy = self.make_proxy(data)
        self.up = self.proxy.upstream

    def make_proxy(self, data: dict[str, Any]) -> MemoryProxy:
        proxy = MemoryProxy(data, cache_dir=self.mktemp())
        self.addCleanup(proxy.close)
        self.ops = Operations(proxy.config, proxy.store, proxy.inflight, proxy.clock)
        self.events: list[dict[str, Any]] = []
        if self.ops.access_log is not None:
            self.ops.access_log.log = Logger(namespace=NAMESPACE, observer=self.events.append)
        proxy.root = ProxyResource(
            proxy.config,
            proxy.store,
            proxy.inflight,
            proxy.client,
            proxy.pool,
            proxy.clock,
            proxy.config.upstream.idle_timeout,
            proxy.learner,
            observer=Observers(proxy.observed, self.ops.observer),
            admin=self.ops.resource,
        )
        self.ops.attach(proxy.root)
        return proxy

    def raw(self, data: bytes, peer: Any = OUTSIDER) -> bytes:
        """Feed one connection from ``peer`` through :class:`ProxySite`; return its output."""
        site = ProxySite(self.proxy.root, reactor=self.proxy.clock)
        channel = site.buildProtocol(peer)
        assert channel is not None
        transport = StringTransport(peerAddress=peer)
        channel.makeConnection(transport)
        channel.dataReceived(data)
        self.proxy.flush()
        out: bytes = transport.value()
        self.disconnecting = transport.disconnecting
        channel.connectionLost(Failure(ConnectionDone()))
        return out

    def raw_status(self, method: str, path: str, peer: Any = OUTSIDER, extra: str = "") -> int:
        out = self.raw(
            f"{method} {path} HTTP/1.1\r\nHost: proxy.test\r\n{extra}"
            f"Content-Length: 0\r\nConnection: close\r\n\r\n".encode(),
            peer,
        )
        return int(out.split(b" ", 2)[1])

    def post(self, path: str, headers: dict[str, str] | None = None) -> tuple[Any, bytes]:
        return self.proxy.get(path, headers=headers, method="POST")

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """``GET /_pkgproxy/metrics``, parsed: ``{(sample name, sorted labels): value}``."""
        resp, body = self.proxy.get("/_pkgproxy/metrics")
        self.assertEqual(resp.code, 200)
        self.assertIn("text/plain", header(resp, "content-type") or "")
        samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (never incremented)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class MetricsTests(OpsTestCase):
    def test_scripted_sequence(self) -> None:
        """After hit, miss, coalesced, revalidated, stale and failed requests the counters
        hold exactly what happened, per family and route."""
        deb = self.up.add(DEB, b"a" * 1000)
        self.proxy.get(DEB)  # MISS
        self.proxy.get(DEB)  # HIT
        self.up.add("/debian/pool/main/b/b_1_all.deb", b"b" * 5000, hold=True)
        first = self.proxy.start("/debian/pool/main/b/b_1_all.deb")
        second = self.proxy.start("/debian/pool/main/b/b_1_all.deb")
        self.up.release()
        first(), second()  # MISS + COALESCED
        index = "/debian/dists/stable/InRelease"
        self.up.add(index, b"v1", etag=b'"e1"', last_modified=LM.encode())
        self.proxy.get(index)  # MISS
        self.proxy.clock.advance(61)
        self.proxy.get(index)  # REVALIDATED
        self.up.down = True
        self.proxy.clock.advance(61)
        resp, _ = self.proxy.get(index)  # STALE (the upstream answered 503)
        self.assertEqual(header(resp, "x-cache"), "STALE")
        self.up.down = False
        good = b"Package: a\n"
        by_hash = (
            f"/debian/dists/s/main/binary-amd64/by-hash/SHA256/{hashlib.sha256(good).hexdigest()}"
        )
        self.up.add(by_hash, b"Package: EVIL\n")
        self.assertRaises(ResponseFailed, self.proxy.get, by_hash)  # verification fails
        self.proxy.get("/nowhere/x")  # no route: 404

        m = self.scrape()
        d = {"family": "debian", "route": "debian"}
        ok = {**d, "code": "2xx"}
        self.assertEqual(value(m, "pkgproxy_requests_total", **ok, cache="hit"), 1)
        # a.deb, b.deb, InRelease, and the by-hash body that was cut off
        self.assertEqual(value(m, "pkgproxy_requests_total", **ok, cache="miss"), 4)
        self.assertEqual(value(m, "pkgproxy_requests_total", **ok, cache="coalesced"), 1)
        self.assertEqual(value(m, "pkgproxy_requests_total", **ok, cache="revalidated"), 1)
        self.assertEqual(value(m, "pkgproxy_requests_total", **ok, cache="stale"), 1)
        self.assertEqual(
            value(m, "pkgproxy_requests_total", family="", route="", cache="none", code="4xx"),
            1,
        )
        self.assertEqual(value(m, "pkgproxy_incomplete_requests_total", **d), 1)
        self.assertEqual(value(m, "pkgproxy_served_bytes_total", **d, cache="hit"), 1000)
        self.assertEqual(value(m, "pkgproxy_served_bytes_total", **d, cache="coalesced"), 5000)
        self.assertEqual(value(m, "pkgproxy_served_bytes_total", **d, cache="stale"), 2)
        self.assertEqual(value(m, "pkgproxy_served_bytes_total", **d, cache="revalidated"), 2)
        fetched = 1000 + 5000 + 2 + len(b"down") + len(b"Package: EVIL\n")
        self.assertEqual(value(m, "pkgproxy_upstream_fetched_bytes_total", **d), fetched)
        self.assertEqual(value(m, "pkgproxy_upstream_fetches_total", **d, result="stored"), 3)
        self.assertEqual(value(m, "pkgproxy_upstream_fetches_total", **d, result="not_modified"), 1)
        self.assertEqual(value(m, "pkgproxy_upstream_fetches_total", **d, result="relayed"), 1)
        self.assertEqual(value(m, "pkgproxy_upstream_fetches_total", **d, result="rejected"), 1)
        self.assertEqual(value(m, "pkgproxy_upstream_errors_total", **d, kind="http_5xx"), 1)
        self.assertEqual(value(m, "pkgproxy_verification_failures_total", **d), 1)
        self.assertEqual(value(m, "pkgproxy_upstream_response_seconds_count", **d), 6)
        self.assertEqual(value(m, "pkgproxy_cache_entries"), 3)
        self.assertEqual(value(m, "pkgproxy_cache_bytes"), 1000 + 5000 + 2)
        self.assertEqual(value(m, "pkgproxy_cache_route_bytes", **d), 1000 + 5000 + 2)
        self.assertEqual(value(m, "pkgproxy_cache_route_entries", **d), 3)
        self.assertEqual(value(m, "pkgproxy_cache_evictions_total"), 0)
        self.assertEqual(value(m, "pkgproxy_inflight_fetches", **d), 0)
        self.assertEqual(value(m, "pkgproxy_ready"), 1)
        self.assertEqual(value(m, "pkgproxy_offline"), 0)
        self.assertEqual(deb.body, b"a" * 1000)

    def test_upstream_error_kinds(self) -> None:
        """An unreachable upstream is counted under its error kind (here a timeout)."""
        self.up.add("/debian/pool/main/s/s_1_all.deb", b"s", hold=True)
        pending = self.proxy.start("/debian/pool/main/s/s_1_all.deb")
        self.proxy.clock.advance(31)  # past upstream.header_timeout
        resp, _ = pending()
        self.assertEqual(resp.code, 504)
        m = self.scrape()
        errors = value(
            m, "pkgproxy_upstream_errors_total", family="debian", route="debian", kind="timeout"
        )
        self.assertEqual(errors, 1)
        self.assertEqual([e.kind for e in self.ops.metrics.recent_errors], ["timeout"])

    def test_inflight_gauges(self) -> None:
        """A download in progress shows as one in-flight fetch with its subscribers."""
        self.up.add("/debian/pool/main/h/h_1_all.deb", b"h" * 4000, hold=True, partial=1000)
        pending = self.proxy.start("/debian/pool/main/h/h_1_all.deb")
        m = self.scrape()
        d = {"family": "debian", "route": "debian"}
        self.assertEqual(value(m, "pkgproxy_inflight_fetches", **d), 1)
        self.assertEqual(value(m, "pkgproxy_inflight_subscribers", **d), 1)
        self.up.release()
        pending()
        m = self.scrape()
        self.assertEqual(value(m, "pkgproxy_inflight_fetches", **d), 0)

    def test_evictions(self) -> None:
        """Entries evicted to keep the byte budget are counted."""
        self.proxy = self.make_proxy(
            {"routes": {"debian": {"upstream": UP}}, "cache": {"max_size": 2500}}
        )
        self.up = self.proxy.upstream
        for name in "abc":
            path = f"/debian/pool/main/{name}/{name}_1_all.deb"
            self.up.add(path, name.encode() * 1000)
            self.proxy.get(path)
        m = self.scrape()
        self.assertEqual(value(m, "pkgproxy_cache_evictions_total"), self.proxy.store.evictions)
        self.assertGreaterEqual(value(m, "pkgproxy_cache_evictions_total"), 1)
        self.assertEqual(value(m, "pkgproxy_cache_bytes"), self.proxy.store.total_bytes)

    def test_own_registry(self) -> None:
        """Metrics live in the proxy's own registry, never in prometheus_client's global one."""
        from prometheus_client import REGISTRY

        self.proxy.get("/nowhere")
        self.assertIsNone(REGISTRY.get_sample_value("pkgproxy_cache_entries"))
        self.assertIsNotNone(self.ops.metrics.registry.get_sample_value("pkgproxy_cache_entries"))

    def test_openmetrics_negotiated(self) -> None:
        """A scraper that asks for OpenMetrics gets it."""
        resp, body = self.proxy.get(
            "/_pkgproxy/metrics", headers={"Accept": "application/openmetrics-text"}
        )
        self.assertIn("openmetrics", header(resp, "content-type") or "")
        self.assertTrue(body.rstrip().endswith(b"# EOF"))

    def test_family_stats(self) -> None:
        """The status page's per-family figures: hit ratio and bytes saved."""
        self.up.add(DEB, b"a" * 1000)
        for _ in range(4):
            self.proxy.get(DEB)
        [stats] = self.ops.metrics.family_stats()
        self.assertEqual((stats.family, stats.requests), ("debian", {"miss": 1, "hit": 3}))
        self.assertEqual((stats.hit_ratio, stats.served, stats.fetched), (0.75, 4000, 1000))
        self.assertEqual(stats.saved, 3000)
        self.assertIsNone(FamilyStats("x").hit_ratio)


class ReplayedHitMetricsTests(SynchronousTestCase):
    def test_same_counts_as_request_records(self) -> None:
        """A hit reported by the hit path counts exactly as its request record would,
        a HEAD (no body) and a warm-up's hit included."""
        proxy = MemoryProxy({"routes": {"debian": {"upstream": UP}}}, cache_dir=self.mktemp())
        self.addCleanup(proxy.close)
        by_hit = Operations(proxy.config, proxy.store, proxy.inflight, proxy.clock).metrics
        by_record = Operations(proxy.config, proxy.store, proxy.inflight, proxy.clock).metrics
        hits = [
            Hit("GET", DEB, 1000, "debian", "debian", "apt"),
            Hit("HEAD", DEB, 0, "debian", "debian", "apt"),
            Hit("GET", DEB, 1000, "debian", "", "pkgproxy-warm/1 (tag=t)"),
        ]
        for hit in hits * 3:
            by_hit.hit_done(hit, "10.0.0.7", 0.0001)
            by_record.request_done(hit.record("10.0.0.7", 0.0001))

        def samples(metrics: Any) -> dict[Any, float]:
            return {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in metrics.registry.collect()
                if family.name.startswith(("pkgproxy_requests", "pkgproxy_served"))
                for s in family.samples
                if not s.name.endswith("_created")
            }

        self.assertEqual(samples(by_hit), samples(by_record))
        ok = {"family": "debian", "route": "debian", "code": "2xx", "cache": "hit"}
        self.assertEqual(value(samples(by_hit), "pkgproxy_requests_total", **ok), 9)
        self.assertEqual(
            [(w.tag, w.requests, w.cached) for w in by_hit.warmups()],
            [(w.tag, w.requests, w.cached) for w in by_record.warmups()],
        )
        self.assertEqual(by_hit.warmups()[0].requests, 3)
        self.assertEqual(by_hit.family_stats(), by_record.family_stats())
        by_hit.hit_done(hits[0], "10.0.0.7", 0.0001)
        self.assertEqual(by_hit.family_stats()[0].requests, {"hit": 10})

    def test_unsettled_hits_bounded(self) -> None:
        """Replayed hits are added to the counters when read, or once this many distinct
        ones wait, whichever comes first."""
        from pkgproxy.admin import metrics as metrics_module

        self.patch(metrics_module, "MAX_UNSETTLED", 3)
        proxy = MemoryProxy({"routes": {"debian": {"upstream": UP}}}, cache_dir=self.mktemp())
        self.addCleanup(proxy.close)
        metrics = Operations(proxy.config, proxy.store, proxy.inflight, proxy.clock).metrics
        for i in range(7):
            hit = Hit("GET", f"{DEB}{i}", 10, "debian", "debian", "apt")
            metrics.hit_done(hit, "10.0.0.7", 0.0001)
            metrics.hit_done(hit, "10.0.0.7", 0.0001)
            self.assertLess(len(metrics._unsettled), 3)
        self.assertEqual(
            metrics.registry.get_sample_value(
                "pkgproxy_requests_total",
                {"family": "debian", "route": "debian", "cache": "hit", "code": "2xx"},
            ),
            14,
        )

    def test_default_is_the_request_record(self) -> None:
        """An observer that does nothing special for hits gets their request records."""
        seen: list[RequestRecord] = []

        class Listener(Observer):
            def request_done(self, record: RequestRecord) -> None:
                seen.append(record)

        hit = Hit("GET", DEB, 1000, "debian", "debian", "apt")
        Observers(Listener()).hit_done(hit, "10.0.0.7", 0.25)
        self.assertEqual(
            seen,
            [
                RequestRecord(
                    "10.0.0.7",
                    "GET",
                    DEB,
                    200,
                    1000,
                    "HIT",
                    "debian",
                    "debian",
                    0.25,
                    None,
                    "apt",
                    True,
                )
            ],
        )


class AccessLogTests(OpsTestCase):
    def test_one_line_per_request(self) -> None:
        """Each request gives exactly one access event with client, request, result, times."""
        self.up.add(DEB, b"a" * 1000)
        self.proxy.get(DEB, headers={"User-Agent": "Debian APT-HTTP/1.3 (2.6.1)"})
        self.proxy.get(DEB)
        self.assertEqual(len(self.events), 2)
        first, second = (formatEvent(e) for e in self.events)
        self.assertTrue(
            first.startswith(f'127.0.0.1 "GET {DEB}" 200 1000 MISS upstream=0.000s '), first
        )
        self.assertIn('route=debian agent="Debian APT-HTTP/1.3 (2.6.1)"', first)
        self.assertIn(" HIT upstream=- ", second)
        self.assertEqual(self.events[0]["log_namespace"], "pkgproxy.access")
        self.assertEqual(self.events[0]["log_level"], LogLevel.info)
        self.assertEqual(self.events[0]["access"]["bytes"], 1000)

    def test_head_on_a_miss_has_its_upstream_time(self) -> None:
        """A HEAD answered by asking upstream for headers logs that upstream's time."""
        self.up.add(DEB, b"a" * 1000)
        self.proxy.get(DEB, method="HEAD")
        line = formatEvent(self.events[-1])
        self.assertIn(f'"HEAD {DEB}" 200 0 MISS upstream=0.000s ', line)

    def test_hostile_text_escaped(self) -> None:
        """Quotes and control characters from the client cannot forge or split a line."""
        self.proxy.get("/nowhere", headers={"User-Agent": 'x" 200 9999 HIT\x1b[2J'})
        line = formatEvent(self.events[-1])
        self.assertIn('agent="x\\" 200 9999 HIT\\x1b[2J"', line)
        self.assertEqual(escape("a\\b\n"), "a\\\\b\\x0a")

    def test_aborted_marked(self) -> None:
        """A transfer that failed is marked ABORTED."""
        self.up.add(
            "/debian/dists/s/main/binary-amd64/by-hash/SHA256/" + "0" * 64, b"not what it names"
        )
        self.assertRaises(
            ResponseFailed,
            self.proxy.get,
            "/debian/dists/s/main/binary-amd64/by-hash/SHA256/" + "0" * 64,
        )
        self.assertTrue(formatEvent(self.events[-1]).endswith(" ABORTED"))

    def test_json_lines(self) -> None:
        """With format = "json" each line is one JSON object with the same fields."""
        events: list[dict[str, Any]] = []
        log = AccessLog(json_lines=True, logger=Logger(namespace=NAMESPACE, observer=events.append))
        log.request_done(
            RequestRecord(
                "10.0.0.7",
                "GET",
                '/a?"b',
                200,
                10,
                "HIT",
                "debian",
                "debian",
                0.5,
                None,
                "ua",
                True,
            )  # fmt: skip
        )
        data = json.loads(formatEvent(events[0]))
        self.assertEqual(
            data,
            {
                "client": "10.0.0.7",
                "method": "GET",
                "uri": '/a?"b',
                "status": 200,
                "bytes": 10,
                "cache": "HIT",
                "route": "debian",
                "family": "debian",
                "upstream_seconds": None,
                "duration_seconds": 0.5,
                "user_agent": "ua",
                "completed": True,
            },
        )

    def test_disabled(self) -> None:
        """``access_log.enabled = false`` leaves no access observer at all."""
        ops = Operations(
            config_from_dict({"access_log": {"enabled": False}}),
            self.proxy.store,
            self.proxy.inflight,
            self.proxy.clock,
        )
        self.assertIsNone(ops.access_log)
        self.assertEqual(len(ops.observer.observers), 1)

    def test_site_writes_no_log_of_its_own(self) -> None:
        """The Site neither opens Twisted's access log nor arms its per-second timer."""
        path = self.mktemp()
        site = ProxySite(self.proxy.root, logPath=path, reactor=self.proxy.clock)
        before = len(self.proxy.clock.getDelayedCalls())
        site.doStart()
        self.addCleanup(site.doStop)
        self.assertEqual(len(self.proxy.clock.getDelayedCalls()), before)
        self.raw(b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertFalse(os.path.exists(path))
        self.assertEqual(len(self.events), 1)


def _record(uri: str = "/files/a", cache: str = "HIT") -> RequestRecord:
    return RequestRecord(
        "10.0.0.7", "GET", uri, 200, 10, cache, "files", "generic", 0.001, None, "t", True
    )


class AccessLogFileTests(SynchronousTestCase):
    """The file access log: batches, the timer, the flush on stop, and failing writes."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        from pkgproxy.diskpool import DiskPool

        self.clock = Clock()
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "access.log")
        self.pool = DiskPool(None)  # runs inline

    def lines(self) -> list[str]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            return f.read().splitlines()

    def test_buffered_until_the_timer_or_the_batch(self) -> None:
        from pkgproxy.admin.accesslog import AccessLogFile

        alog = AccessLogFile(self.path, self.pool, self.clock)
        alog.startService()
        alog.request_done(_record())
        self.assertEqual(self.lines(), [])
        self.clock.advance(alog.DELAY)
        self.assertEqual(len(self.lines()), 1)
        self.assertIn('10.0.0.7 "GET /files/a" 200 10 HIT upstream=- ', self.lines()[0])
        for i in range(alog.BATCH // 80 + 1):
            alog.request_done(_record(f"/files/{i:060d}"))
        self.assertGreater(len(self.lines()), 1, "a full batch is written at once")
        alog.request_done(_record("/last"))
        alog.stopService()
        self.assertIn('"GET /last"', self.lines()[-1])
        self.assertEqual(alog.dropped, 0)

    def test_replayed_hits_same_lines(self) -> None:
        """A hit reported by the hit path writes the line its request record would, in
        text and in JSON, at the second it was answered."""
        from twisted.internet.task import Clock

        from pkgproxy.admin.accesslog import AccessLogFile

        hits = [
            Hit("GET", "/files/a", 10, "files", "generic", "apt"),
            Hit("HEAD", '/we"ird\\\x7f', 0, "", "", 'x" 200\x1b[2J'),
        ]
        for json_lines in (False, True):
            written = []
            for report in ("hit", "record"):
                path = os.path.join(self.dir, f"{report}-{json_lines}.log")
                clock = Clock()
                clock.advance(1_764_000_000.25)
                alog = AccessLogFile(path, self.pool, clock, json_lines)
                alog.startService()
                for i, hit in enumerate(hits * 2):
                    duration = 0.0001 * i
                    if report == "hit":
                        alog.hit_done(hit, f"10.0.0.{i}", duration)
                    else:
                        alog.request_done(hit.record(f"10.0.0.{i}", duration))
                    clock.advance(0.5)  # a new second every other line
                alog.stopService()
                with open(path, encoding="utf-8") as f:
                    written.append(f.read())
            self.assertEqual(written[0], written[1])
            self.assertEqual(len(written[0].splitlines()), 4)
            if not json_lines:
                self.assertEqual(len({line[:19] for line in written[0].splitlines()}), 2)

    def test_json_lines(self) -> None:
        from pkgproxy.admin.accesslog import AccessLogFile

        alog = AccessLogFile(self.path, self.pool, self.clock, json_lines=True)
        alog.startService()
        alog.request_done(_record())
        alog.stopService()
        entry = json.loads(self.lines()[0])
        self.assertEqual((entry["uri"], entry["cache"]), ("/files/a", "HIT"))
        self.assertIn("time", entry)

    def test_failing_writes_drop_lines_and_say_so_once(self) -> None:
        from pkgproxy.admin.accesslog import AccessLogFile

        missing = os.path.join(self.dir, "no-such-dir", "access.log")
        alog = AccessLogFile(missing, self.pool, self.clock)
        alog.startService()
        alog.request_done(_record())
        alog.flush()
        alog.request_done(_record())
        alog.flush()
        self.assertEqual(alog.dropped, 2)
        errors = self.flushLoggedErrors()
        self.assertEqual(errors, [])  # reported as a log line, not a traceback

    def test_config(self) -> None:
        cfg = config_from_dict({"access_log": {"file": "/var/log/pkgproxy/access.log"}})
        self.assertEqual(cfg.access_log.file, "/var/log/pkgproxy/access.log")
        with self.assertRaises(ConfigError) as e:
            config_from_dict({"access_log": {"file": 3}})
        self.assertEqual(e.exception.key, "access_log.file")


class AccessControlTests(OpsTestCase):
    def test_loopback_allowed(self) -> None:
        """From loopback the status page, metrics and actions answer."""
        resp, body = self.proxy.get("/_pkgproxy/")
        self.assertEqual(resp.code, 200)
        self.assertIn(b"<title>pkgproxy status</title>", body)
        self.assertEqual(self.proxy.get("/_pkgproxy/metrics")[0].code, 200)
        self.assertEqual(self.post("/_pkgproxy/admin/offline?enabled=false")[0].code, 200)
        self.assertEqual(self.raw_status("GET", "/_pkgproxy/", IPv6Address("TCP", "::1", 1)), 200)
        mapped = IPv6Address("TCP", "::ffff:127.0.0.1", 1)
        self.assertEqual(self.raw_status("GET", "/_pkgproxy/", mapped), 200)

    def test_other_network_denied(self) -> None:
        """Outside admin_networks every admin page and action is 403, and nothing happens."""
        self.up.add(DEB, b"a")
        self.proxy.get(DEB)
        for method, path in [
            ("GET", "/_pkgproxy/"),
            ("GET", "/_pkgproxy/metrics"),
            ("GET", "/_pkgproxy/nonexistent"),
            ("POST", "/_pkgproxy/admin/purge?prefix=debian:"),
            ("POST", "/_pkgproxy/admin/offline?enabled=true"),
        ]:
            self.assertEqual(self.raw_status(method, path), 403, path)
        self.assertEqual(len(self.proxy.store), 1)
        self.assertFalse(self.proxy.root.offline)

    def test_probes_open_to_all(self) -> None:
        """Liveness and readiness answer any client: orchestrators probe from anywhere."""
        self.assertEqual(self.raw_status("GET", "/_pkgproxy/health"), 200)
        self.assertEqual(self.raw_status("GET", "/_pkgproxy/ready"), 200)

    def test_configured_network(self) -> None:
        """admin_networks replaces loopback: its clients are allowed, loopback is not."""
        self.proxy = self.make_proxy(
            {"routes": {"debian": {"upstream": UP}}, "admin_networks": ["192.0.2.0/24"]}
        )
        self.assertEqual(self.raw_status("GET", "/_pkgproxy/"), 200)
        self.assertEqual(self.proxy.get("/_pkgproxy/")[0].code, 403)

    def test_token(self) -> None:
        """With admin_token, actions need the bearer token; reading pages does not."""
        self.proxy = self.make_proxy({"routes": {"debian": {"upstream": UP}}, "admin_token": TOKEN})
        url = "/_pkgproxy/admin/offline?enabled=true"
        self.assertEqual(self.post(url)[0].code, 403)
        self.assertEqual(
            self.post(url, {"Authorization": "Bearer wrong-token-0123456789"})[0].code, 403
        )
        self.assertEqual(self.post(url, {"Authorization": f"Basic {TOKEN}"})[0].code, 403)
        self.assertFalse(self.proxy.root.offline)
        resp, body = self.post(url, {"Authorization": f"Bearer {TOKEN}"})
        self.assertEqual((resp.code, json.loads(body)), (200, {"offline": True}))
        self.assertTrue(self.proxy.root.offline)
        self.assertEqual(self.proxy.get("/_pkgproxy/")[0].code, 200)
        auth = f"Authorization: Bearer {TOKEN}\r\n"
        self.assertEqual(self.raw_status("POST", url, extra=auth), 403)  # still the network

    def test_cross_site_refused(self) -> None:
        """A POST a browser made for a page of another origin is refused; same origin works."""
        url = "/_pkgproxy/admin/offline?enabled=true"
        self.assertEqual(self.post(url, {"Origin": "http://evil.example"})[0].code, 403)
        self.assertEqual(self.post(url, {"Sec-Fetch-Site": "cross-site"})[0].code, 403)
        self.assertFalse(self.proxy.root.offline)
        self.assertEqual(self.post(url, {"Origin": "http://proxy.test"})[0].code, 200)

    def test_methods(self) -> None:
        """Pages are GET/HEAD, actions POST; others get 405 with Allow; unknown pages 404."""
        resp, _ = self.proxy.get("/_pkgproxy/admin/purge")
        self.assertEqual((resp.code, header(resp, "allow")), (405, "POST"))
        self.assertEqual(self.post("/_pkgproxy/metrics")[0].code, 405)
        self.assertEqual(self.proxy.get("/_pkgproxy/nope")[0].code, 404)
        resp, body = self.proxy.get("/_pkgproxy/", method="HEAD")
        self.assertEqual((resp.code, body), (200, b""))
        self.assertGreater(int(header(resp, "content-length") or 0), 1000)

    def test_body_cap(self) -> None:
        """A request body over the cap gets 413 and the connection closes, unread."""
        big = MAX_REQUEST_BODY + 1
        out = self.raw(
            f"POST /_pkgproxy/admin/purge HTTP/1.1\r\nHost: x\r\nContent-Length: {big}\r\n"
            "Expect: 100-continue\r\n\r\n".encode(),
            IPv4Address("TCP", "127.0.0.1", 1),
        )
        self.assertTrue(out.startswith(b"HTTP/1.1 413 "), out)
        self.assertNotIn(b"100 Continue", out)
        self.assertTrue(self.disconnecting)
        chunk = b"%x\r\n%s\r\n" % (40000, b"k" * 40000)
        out = self.raw(
            b"POST /_pkgproxy/admin/purge HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + chunk * (MAX_REQUEST_BODY // 40000 + 2)
            + b"0\r\n\r\n",
            IPv4Address("TCP", "127.0.0.1", 1),
        )
        self.assertTrue(out.startswith(b"HTTP/1.1 413 "), out)
        self.assertEqual(out.count(b"HTTP/1.1 "), 1)

    def test_form_body_accepted(self) -> None:
        """A small urlencoded form body carries an action's arguments."""
        body = b"enabled=true"
        out = self.raw(
            b"POST /_pkgproxy/admin/offline HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
            IPv4Address("TCP", "127.0.0.1", 1),
        )
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)
        self.assertTrue(self.proxy.root.offline)


class PurgeTests(OpsTestCase):
    def setUp(self) -> None:
        super().setUp()
        for path in (DEB, "/debian/pool/main/b/b_1_all.deb", "/debian/dists/s/InRelease"):
            self.up.add(path, b"x" * 100)
            self.proxy.get(path)

    def test_key(self) -> None:
        """Purging a key drops that entry; the next request fetches it again."""
        resp, body = self.post("/_pkgproxy/admin/purge?key=debian:pool/main/a/a_1_all.deb")
        self.assertEqual(
            json.loads(body),
            {"purged": 1, "bytes": 100, "keys": ["debian:pool/main/a/a_1_all.deb"]},
        )
        self.assertIsNone(self.proxy.store.peek("debian:pool/main/a/a_1_all.deb"))
        self.assertEqual(header(self.proxy.get(DEB)[0], "x-cache"), "MISS")
        self.assertEqual(self.up.count(DEB), 2)

    def test_prefix(self) -> None:
        """Purging a prefix drops every key that starts with it, and only those."""
        _, body = self.post("/_pkgproxy/admin/purge?prefix=debian:pool/")
        self.assertEqual(json.loads(body)["purged"], 2)
        self.assertEqual([e.key for e in self.proxy.store.entries()], ["debian:dists/s/InRelease"])

    def test_path(self) -> None:
        """A client path names the key it is cached under."""
        _, body = self.post("/_pkgproxy/admin/purge?path=/debian/pool/main/b/b_1_all.deb")
        self.assertEqual(json.loads(body)["keys"], ["debian:pool/main/b/b_1_all.deb"])
        resp, body = self.post("/_pkgproxy/admin/purge?path=/nowhere/x")
        self.assertEqual(resp.code, 400)

    def test_bad_arguments(self) -> None:
        """No argument, two arguments or an empty one: 400 and nothing purged."""
        for query in ("", "?key=a&prefix=b", "?prefix="):
            resp, _ = self.post("/_pkgproxy/admin/purge" + query)
            self.assertEqual(resp.code, 400, query)
        self.assertEqual(len(self.proxy.store), 3)


class OfflineTests(OpsTestCase):
    index = "/debian/dists/stable/InRelease"

    def setUp(self) -> None:
        super().setUp()
        self.up.add(DEB, b"a" * 100)
        self.up.add(self.index, b"v1", etag=b'"e1"', last_modified=LM.encode())
        self.proxy.get(DEB)
        self.proxy.get(self.index)
        resp, body = self.post("/_pkgproxy/admin/offline?enabled=on")
        self.assertEqual(json.loads(body), {"offline": True})
        self.seen = len(self.up.seen)

    def test_cached_served(self) -> None:
        """Offline, cached files are served as usual and nothing reaches the upstream."""
        resp, got = self.proxy.get(DEB)
        self.assertEqual((resp.code, got, header(resp, "x-cache")), (200, b"a" * 100, "HIT"))
        self.assertEqual(len(self.up.seen), self.seen)

    def test_stale_served_with_warning(self) -> None:
        """Offline, an index past its TTL is served stale with a Warning, not revalidated."""
        self.proxy.clock.advance(3600)
        resp, got = self.proxy.get(self.index)
        self.assertEqual((resp.code, got, header(resp, "x-cache")), (200, b"v1", "STALE"))
        self.assertIn("110", header(resp, "warning") or "")
        self.assertEqual(len(self.up.seen), self.seen)

    def test_miss_is_503(self) -> None:
        """Offline, a miss (GET or HEAD) is a clear 503 and no upstream request."""
        self.up.add("/debian/pool/main/n/n_1_all.deb", b"n")
        resp, body = self.proxy.get("/debian/pool/main/n/n_1_all.deb")
        self.assertEqual(resp.code, 503)
        self.assertIn(b"offline mode", body)
        resp, _ = self.proxy.get("/debian/pool/main/n/n_1_all.deb", method="HEAD")
        self.assertEqual(resp.code, 503)
        self.assertEqual(len(self.up.seen), self.seen)

    def test_back_online(self) -> None:
        """Switching offline mode off fetches again; the state shows in GET and metrics."""
        self.assertEqual(value(self.scrape(), "pkgproxy_offline"), 1)
        _, body = self.proxy.get("/_pkgproxy/admin/offline")
        self.assertEqual(json.loads(body), {"offline": True})
        self.post("/_pkgproxy/admin/offline?enabled=false")
        self.up.add("/debian/pool/main/n/n_1_all.deb", b"n")
        resp, _ = self.proxy.get("/debian/pool/main/n/n_1_all.deb")
        self.assertEqual((resp.code, header(resp, "x-cache")), (200, "MISS"))
        self.assertEqual(value(self.scrape(), "pkgproxy_offline"), 0)

    def test_bad_value(self) -> None:
        """An unclear switch value is 400 and changes nothing."""
        resp, _ = self.post("/_pkgproxy/admin/offline?enabled=maybe")
        self.assertEqual(resp.code, 400)
        self.assertTrue(self.proxy.root.offline)

    def test_config_starts_offline(self) -> None:
        """``offline = true`` in the configuration starts the proxy offline."""
        self.proxy = self.make_proxy({"routes": {"debian": {"upstream": UP}}, "offline": True})
        self.proxy.upstream.add(DEB, b"a")
        self.assertEqual(self.proxy.get(DEB)[0].code, 503)
        self.assertEqual(self.proxy.upstream.seen, [])


class StatusPageTests(OpsTestCase):
    config = {"admin_token": TOKEN}

    def test_content(self) -> None:
        """The page shows usage, families, downloads with progress, errors and the config,
        and never the admin token."""
        self.up.add(DEB, b"a" * 1000)
        self.proxy.get(DEB)
        self.proxy.get(DEB)
        self.up.add("/debian/pool/main/h/h_1_all.deb", b"h" * 4000, hold=True, partial=1000)
        pending = self.proxy.start("/debian/pool/main/h/h_1_all.deb")
        self.up.down = True
        self.proxy.get("/debian/pool/main/e/e_1_all.deb")
        resp, body = self.proxy.get("/_pkgproxy/")
        page = body.decode()
        self.assertEqual(header(resp, "content-type"), "text/html; charset=utf-8")
        self.assertIn("default-src 'none'", header(resp, "content-security-policy") or "")
        self.assertEqual(header(resp, "cache-control"), "no-store")
        self.assertIn("33.3%", page)  # debian's hit ratio: one hit, two misses (one a 503)
        self.assertIn("http://upstream.test/debian/pool/main/h/h_1_all.deb", page)
        self.assertIn("25%", page)  # 1000 of 4000 bytes
        self.assertIn("http_5xx", page)
        self.assertIn("http://upstream.test/debian/pool/main/e/e_1_all.deb", page)
        self.assertIn("[routes.debian]", page)
        self.assertIn("admin_token = &quot;(set, not shown)&quot;", page)
        self.assertNotIn(TOKEN, page)
        self.assertNotIn("src=", page)  # no external assets of any kind
        self.assertNotIn("<link", page)
        self.up.down = False
        self.up.release()
        pending()

    def test_escaped(self) -> None:
        """Text from outside (URLs, upstream messages, config values) cannot inject markup."""
        evil = '<script>alert("x")</script>'
        view = self.ops.resource.view("http://cache.example:3142")
        view = replace(
            view,
            errors=[ErrorRecord(view.now, "debian", f"http://u/{evil}", "protocol", evil)],
            downloads=[DownloadView("k", f"http://u/{evil}", evil, 1, 2, 1, 0.0)],
            config_text=evil,
            cache_dir=evil,
        )
        page = render_status(view)
        self.assertNotIn("<script", page)
        self.assertIn("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;", page)

    def test_starting(self) -> None:
        """While the cache recovers the page says so, and /ready fails but /health does not."""
        self.proxy.store.ready = False
        self.assertIn(b"starting: cache recovering", self.proxy.get("/_pkgproxy/")[1])
        self.assertEqual(self.proxy.get("/_pkgproxy/ready")[0].code, 503)
        self.assertEqual(self.proxy.get("/_pkgproxy/health")[0].code, 200)
        self.proxy.store.ready = True
        self.assertEqual(self.proxy.get("/_pkgproxy/ready")[0].code, 200)

    def test_human_units(self) -> None:
        """Sizes and durations are written the way operators read them."""
        self.assertEqual(
            [human_bytes(n) for n in (0, 1023, 1536, 10 * 1024**3)],
            ["0 B", "1023 B", "1.5 KiB", "10.0 GiB"],
        )
        self.assertEqual(
            [human_duration(s) for s in (5, 60, 3725, 90000)],
            ["5 s", "1 min", "1 h 2 min", "1 d 1 h"],
        )


class ConfigKeyTests(SynchronousTestCase):
    def assertConfigError(self, data: dict[str, Any], key: str) -> str:
        e = self.assertRaises(ConfigError, config_from_dict, data)
        self.assertEqual(e.key, key)
        return str(e)

    def test_defaults(self) -> None:
        """No token, online, text access log on."""
        cfg = config_from_dict({})
        self.assertEqual(
            (cfg.admin_token, cfg.offline, cfg.access_log.enabled, cfg.access_log.format),
            (None, False, True, "text"),
        )

    def test_values(self) -> None:
        """Each new key is read; the token stays out of the config's repr."""
        cfg = config_from_dict(
            {
                "admin_token": TOKEN,
                "offline": True,
                "access_log": {"enabled": False, "format": "json"},
            }
        )
        self.assertEqual(
            (cfg.admin_token, cfg.offline, cfg.access_log.enabled, cfg.access_log.format),
            (TOKEN, True, False, "json"),
        )
        self.assertNotIn(TOKEN, repr(cfg))

    def test_token_file(self) -> None:
        """admin_token_file reads the token from a file (a systemd credential, say)."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(TOKEN + "\n")
        self.assertEqual(config_from_dict({"admin_token_file": path}).admin_token, TOKEN)

    def test_errors_name_the_key(self) -> None:
        """Bad values are refused with the key they are under."""
        self.assertIn(
            "at least 16", self.assertConfigError({"admin_token": "short"}, "admin_token")
        )
        self.assertConfigError({"admin_token": "has a space in it ok"}, "admin_token")
        self.assertConfigError({"admin_token_file": "/nonexistent/tok"}, "admin_token_file")
        self.assertConfigError({"admin_token": TOKEN, "admin_token_file": "/x"}, "admin_token_file")
        self.assertConfigError({"offline": "yes"}, "offline")
        self.assertConfigError({"access_log": {"format": "xml"}}, "access_log.format")
        self.assertConfigError({"access_log": {"enabled": 1}}, "access_log.enabled")
        self.assertConfigError({"access_log": {"path": "/x"}}, "access_log.path")


class AccessLogBatchTests(SynchronousTestCase):
    """The default access log, when the normal log is twistd's text log: the same lines
    as one event per request would write, written in batches (from the disk pool when
    the log is an OS file)."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        from pkgproxy.diskpool import DiskPool

        self.clock = Clock()
        self.clock.advance(1_764_000_000)
        self.pool = DiskPool(None)  # runs inline

    def one_event_per_request(self, records: list[RequestRecord]) -> str:
        """What Twisted's text log writes for the same requests, one event each (with
        the timestamps of this test's clock)."""
        from io import StringIO

        from twisted.logger import LogPublisher, formatTime, textFileLogObserver

        out = StringIO()
        publisher = LogPublisher(textFileLogObserver(out))
        log = AccessLog(logger=Logger(namespace=NAMESPACE, observer=publisher))
        for r in records:
            log.request_done(r)
        stamp = formatTime(self.clock.seconds())
        return "".join(
            stamp + " " + line.split(" ", 1)[1] for line in out.getvalue().splitlines(True)
        )

    def test_same_lines_batched_through_the_file_object(self) -> None:
        from io import StringIO

        from twisted.logger import LogPublisher, textFileLogObserver

        out = StringIO()
        publisher = LogPublisher(textFileLogObserver(out))
        alog = AccessLog(clock=self.clock, pool=self.pool, publisher=publisher)
        alog.startService()
        records = [_record(f"/files/{i}") for i in range(3)] + [_record('/we"ird\n')]
        for r in records:
            alog.request_done(r)
        self.assertEqual(out.getvalue(), "", "nothing written per request")
        self.clock.advance(alog.DELAY)
        self.assertEqual(out.getvalue(), self.one_event_per_request(records))
        alog.request_done(_record("/last"))
        alog.stopService()
        self.assertIn('"GET /last"', out.getvalue().splitlines()[-1])

    def test_replayed_hits_same_lines(self) -> None:
        """A hit reported by the hit path writes the line its request record would, odd
        text escaped the same way; the fixed parts are made once per hit."""
        from io import StringIO

        from twisted.logger import LogPublisher, textFileLogObserver

        out = StringIO()
        publisher = LogPublisher(textFileLogObserver(out))
        alog = AccessLog(clock=self.clock, pool=self.pool, publisher=publisher)
        alog.startService()
        hits = [
            Hit("GET", "/files/a", 10, "files", "generic", "apt"),
            Hit("HEAD", '/we"ird\\\x7f', 0, "files", "generic", 'x" 200\x1b[2J'),
            Hit("GET", "/files/\xe9", 12_000_000, "", "", ""),
        ]
        calls = [
            (hit, client, duration)
            for hit in hits
            for client, duration in (("10.0.0.7", 0.0001), ("::1", 0.0006), ('f"e\n', 12.3456))
        ]
        for hit, client, duration in calls:
            alog.hit_done(hit, client, duration)
        self.assertEqual(out.getvalue(), "", "nothing written per request")
        self.clock.advance(alog.DELAY)
        self.assertTrue(all(alog in hit.memo for hit in hits))
        records = [hit.record(client, duration) for hit, client, duration in calls]
        self.assertEqual(out.getvalue(), self.one_event_per_request(records))
        alog.stopService()

    def test_replayed_hits_in_order_at_their_time(self) -> None:
        """A replayed hit's line keeps its place among other lines and the time it was
        answered, though it is made when the batch is written."""
        from io import StringIO

        from twisted.logger import LogPublisher, formatTime, textFileLogObserver

        out = StringIO()
        alog = AccessLog(
            clock=self.clock, pool=self.pool, publisher=LogPublisher(textFileLogObserver(out))
        )
        alog.startService()
        answered = self.clock.seconds()
        alog.request_done(_record("/before"))
        alog.hit_done(Hit("GET", "/hit", 10, "files", "generic", "apt"), "10.0.0.7", 0.0001)
        alog.request_done(_record("/after"))
        self.clock.advance(2.5)  # the batch is written now, seconds later
        alog.stopService()
        lines = out.getvalue().splitlines()
        self.assertEqual(
            [line.split('"')[1] for line in lines], ["GET /before", "GET /hit", "GET /after"]
        )
        self.assertTrue(lines[1].startswith(formatTime(answered) + " "), lines[1])

    def test_replayed_hits_fill_a_batch(self) -> None:
        """Replayed hits count towards the batch size: a full batch is written at once."""
        from io import StringIO

        from twisted.logger import LogPublisher, textFileLogObserver

        out = StringIO()
        alog = AccessLog(
            clock=self.clock, pool=self.pool, publisher=LogPublisher(textFileLogObserver(out))
        )
        alog.BATCH = 1000
        alog.startService()
        hit = Hit("GET", "/hit", 10, "files", "generic", "apt")
        for _ in range(5):
            alog.hit_done(hit, "10.0.0.7", 0.0001)
        self.assertEqual(len(out.getvalue().splitlines()), 5, "written without the timer")
        alog.stopService()

    def test_replayed_hits_as_events(self) -> None:
        """Where lines go as events (JSON lines here), a replayed hit is its record's event."""
        from io import StringIO

        from twisted.logger import LogPublisher, textFileLogObserver

        out = StringIO()
        alog = AccessLog(
            json_lines=True,
            clock=self.clock,
            pool=self.pool,
            publisher=LogPublisher(textFileLogObserver(out)),
        )
        alog.startService()
        alog.hit_done(Hit("GET", "/files/a", 10, "files", "generic", "apt"), "10.0.0.7", 0.5)
        self.clock.advance(alog.DELAY)
        alog.stopService()
        line = json.loads(out.getvalue().split("] ", 1)[1])
        self.assertEqual(
            (line["uri"], line["cache"], line["bytes"], line["duration_seconds"]),
            ("/files/a", "HIT", 10, 0.5),
        )

    def test_batched_behind_the_log_level_filter(self) -> None:
        """twistd's text log behind pkgproxy's --log-level filter (the default setup) is
        still written in batches; a filter that drops info lines drops them here too."""
        from io import StringIO

        from twisted.logger import (
            FilteringLogObserver,
            LogLevelFilterPredicate,
            LogPublisher,
            textFileLogObserver,
        )

        for level, written in ((LogLevel.info, True), (LogLevel.warn, False)):
            out = StringIO()
            filtered = FilteringLogObserver(
                textFileLogObserver(out), [LogLevelFilterPredicate(defaultLogLevel=level)]
            )
            publisher = LogPublisher(filtered)
            alog = AccessLog(clock=self.clock, pool=self.pool, publisher=publisher)
            alog.startService()
            records = [_record(f"/files/{i}") for i in range(3)]
            for r in records:
                alog.request_done(r)
            if written:
                self.assertEqual(out.getvalue(), "", "nothing written per request")
                self.clock.advance(alog.DELAY)
                self.assertEqual(out.getvalue(), self.one_event_per_request(records))
            else:
                self.clock.advance(alog.DELAY)
                self.assertEqual(out.getvalue(), "")
            alog.stopService()

    def test_os_file_written_from_the_pool(self) -> None:
        from twisted.logger import LogPublisher, textFileLogObserver

        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as out:
            publisher = LogPublisher(textFileLogObserver(out))
            ran: list[object] = []
            run = self.pool.run

            def counted(f: Any, *a: Any) -> Any:
                ran.append(f)
                return run(f, *a)

            self.patch(self.pool, "run", counted)
            alog = AccessLog(clock=self.clock, pool=self.pool, publisher=publisher)
            alog.startService()
            records = [_record(f"/files/{i:0100d}") for i in range(AccessLog.BATCH // 150)]
            for r in records:
                alog.request_done(r)
            alog.stopService()
        self.assertTrue(ran, "written by the disk pool")
        with open(path, encoding="utf-8") as f:
            self.assertEqual(f.read(), self.one_event_per_request(records))

    def test_other_observers_get_events(self) -> None:
        """A JSON log (or any observer that is not a text file) gets one event each."""
        from io import StringIO

        from twisted.logger import LogPublisher, jsonFileLogObserver

        out = StringIO()
        publisher = LogPublisher(jsonFileLogObserver(out))
        alog = AccessLog(clock=self.clock, pool=self.pool, publisher=publisher)
        alog.log = Logger(namespace=NAMESPACE, observer=publisher)
        alog._own_log = alog.log  # the default logger, on this publisher
        alog.request_done(_record())
        self.assertIn('"access"', out.getvalue())
