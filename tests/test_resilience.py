"""Revalidation window and stale-while-revalidate, in memory with a fake clock.

Plus the configuration of both and of ``[limits]`` (the limits themselves are exercised
through real sockets in ``tests/integration/test_limits.py``).
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pkgproxy.config import ConfigError, config_from_dict
from pkgproxy.testing import MemoryProxy

UP = "http://upstream.test/debian/"
LM = "Wed, 25 Nov 2026 22:33:12 GMT"
INDEX = "/debian/dists/stable/InRelease"


def header(resp: Any, name: str) -> str | None:
    values = resp.headers.getRawHeaders(name)
    return values[-1] if values else None


class _IndexTestCase(SynchronousTestCase):
    """A Debian route with ``index_ttl = 60s``; the InRelease fetched once (MISS)."""

    route: dict[str, Any] = {}
    cache: dict[str, Any] = {}

    def setUp(self) -> None:
        self.proxy = MemoryProxy(
            {
                "routes": {"debian": {"upstream": UP, "index_ttl": "60s", **self.route}},
                "cache": dict(self.cache),
            },
            cache_dir=self.mktemp(),
        )
        self.addCleanup(self.proxy.close)
        self.up = self.proxy.upstream
        self.file = self.up.add(INDEX, b"v1", etag=b'"e1"', last_modified=LM.encode())
        resp, _ = self.proxy.get(INDEX)
        self.assertEqual(header(resp, "x-cache"), "MISS")

    def change_upstream(self, hold: bool = False) -> None:
        """Upstream now has v2 (a new ETag); with ``hold`` its body waits for release."""
        self.file.body, self.file.etag, self.file.hold = b"v2", b'"e2"', hold


class StaleWhileRevalidateTests(_IndexTestCase):
    """``stale_while_revalidate = "30s"``: 30 s after expiry, stale answers come at once."""

    route = {"stale_while_revalidate": "30s"}

    def test_stale_at_once_and_one_background_check(self) -> None:
        """Within the window every request is STALE at once; upstream is asked once.

        The revalidation is held upstream, so it is still in flight while ten more
        requests arrive: each is answered from the stored copy with ``Warning: 110``,
        none asks upstream again. Once the new version arrives it is committed with no
        client attached, and the next request is a HIT with it.
        """
        self.change_upstream(hold=True)
        self.proxy.clock.advance(61)
        for _ in range(11):
            resp, body = self.proxy.get(INDEX)
            self.assertEqual((resp.code, body, header(resp, "x-cache")), (200, b"v1", "STALE"))
            self.assertIn("110", header(resp, "warning") or "")
        self.assertEqual(self.up.count(INDEX), 2)
        self.assertEqual(self.up.seen[-1].headers.get(b"if-none-match"), b'"e1"')
        self.assertEqual(len(self.proxy.inflight), 1)
        self.up.release()
        self.proxy.flush()
        self.assertEqual(len(self.proxy.inflight), 0)
        resp, body = self.proxy.get(INDEX)
        self.assertEqual((body, header(resp, "x-cache")), (b"v2", "HIT"))
        self.assertIsNone(header(resp, "warning"))
        self.assertEqual(self.up.count(INDEX), 2)

    def test_background_304_refreshes_the_entry(self) -> None:
        """A 304 to the background check makes the stored copy fresh again: next is a HIT."""
        self.proxy.clock.advance(61)
        resp, body = self.proxy.get(INDEX)
        self.assertEqual((body, header(resp, "x-cache")), (b"v1", "STALE"))
        self.assertEqual(self.up.count(INDEX), 2)
        self.assertEqual(len(self.proxy.inflight), 0)
        self.proxy.clock.advance(59)
        resp, body = self.proxy.get(INDEX)
        self.assertEqual((body, header(resp, "x-cache")), (b"v1", "HIT"))
        self.assertEqual(self.up.count(INDEX), 2)

    def test_past_the_window_revalidates_synchronously(self) -> None:
        """Later than 30 s after expiry the client waits for upstream, as without the key."""
        self.change_upstream(hold=True)
        self.proxy.clock.advance(60 + 30 + 1)
        pending = self.proxy.start(INDEX)
        self.assertRaises(AssertionError, pending)  # waiting for the upstream's answer
        self.up.release()
        resp, body = pending()
        self.assertEqual((body, header(resp, "x-cache")), (b"v2", "MISS"))

    def test_max_age_zero_past_the_revalidate_window_is_synchronous(self) -> None:
        """apt's ``max-age=0``, last check more than 30 s ago: revalidated, never STALE."""
        self.proxy.clock.advance(61)
        resp, body = self.proxy.get(INDEX, headers={"Cache-Control": "max-age=0"})
        self.assertEqual((body, header(resp, "x-cache")), (b"v1", "REVALIDATED"))
        resp, _ = self.proxy.get(INDEX, headers={"Pragma": "no-cache"})
        self.assertEqual(header(resp, "x-cache"), "HIT")

    def test_failed_background_check_only_logs(self) -> None:
        """Upstream failing behind a stale answer changes nothing: the copy stays, no error."""
        self.up.down = True
        self.proxy.clock.advance(61)
        resp, body = self.proxy.get(INDEX)
        self.assertEqual((resp.code, body, header(resp, "x-cache")), (200, b"v1", "STALE"))
        self.assertEqual(len(self.proxy.inflight), 0)
        self.assertEqual(self.up.count(INDEX), 2)
        self.assertIsNotNone(self.proxy.store.get("debian:dists/stable/InRelease"))
        self.assertEqual(self.flushLoggedErrors(), [])
        self.up.down = False
        resp, body = self.proxy.get(INDEX)
        self.assertEqual((body, header(resp, "x-cache")), (b"v1", "STALE"))
        resp, body = self.proxy.get(INDEX)
        self.assertEqual((body, header(resp, "x-cache")), (b"v1", "HIT"))

    def test_immutable_files_unaffected(self) -> None:
        """A pool file is a HIT days later, with or without ``max-age=0``: never STALE."""
        self.up.add("/debian/pool/main/a/a_1_all.deb", b"a")
        self.proxy.get("/debian/pool/main/a/a_1_all.deb")
        self.proxy.clock.advance(5 * 86400)
        for headers in ({}, {"Cache-Control": "max-age=0"}):
            resp, _ = self.proxy.get("/debian/pool/main/a/a_1_all.deb", headers=headers)
            self.assertEqual(header(resp, "x-cache"), "HIT")
        self.assertEqual(self.up.count("/debian/pool/main/a/a_1_all.deb"), 1)


class StaleWhileRevalidateOffTests(_IndexTestCase):
    """No ``stale_while_revalidate``: the default."""

    def test_off_by_default(self) -> None:
        """An expired index is revalidated while the client waits: apt sees new data at once."""
        route = {r.name: r for r in self.proxy.config.routes}["debian"]
        self.assertEqual(route.stale_while_revalidate, 0.0)
        self.change_upstream(hold=True)
        self.proxy.clock.advance(61)
        pending = self.proxy.start(INDEX)
        self.assertRaises(AssertionError, pending)  # waiting for the upstream's answer
        self.up.release()
        resp, body = pending()
        self.assertEqual((body, header(resp, "x-cache")), (b"v2", "MISS"))


class RevalidateWindowTests(_IndexTestCase):
    """``cache.revalidate_window = "5s"``."""

    cache = {"revalidate_window": "5s"}

    def test_window_from_config(self) -> None:
        """``max-age=0`` within 5 s of the last check is a HIT; after 5 s it is checked."""
        self.proxy.clock.advance(4)
        resp, _ = self.proxy.get(INDEX, headers={"Cache-Control": "max-age=0"})
        self.assertEqual(header(resp, "x-cache"), "HIT")
        self.proxy.clock.advance(2)
        resp, _ = self.proxy.get(INDEX, headers={"Cache-Control": "no-cache"})
        self.assertEqual(header(resp, "x-cache"), "REVALIDATED")
        self.assertEqual(self.up.count(INDEX), 2)
        resp, _ = self.proxy.get(INDEX, headers={"Cache-Control": "max-age=0"})
        self.assertEqual(header(resp, "x-cache"), "HIT")

    def test_negative_answers_share_the_window(self) -> None:
        """A remembered 404 is also re-asked only once the 5 s window has passed."""
        self.proxy.get("/debian/dists/stable/Release")
        self.proxy.clock.advance(4)
        self.proxy.get("/debian/dists/stable/Release", headers={"Cache-Control": "max-age=0"})
        self.assertEqual(self.up.count("/debian/dists/stable/Release"), 1)
        self.proxy.clock.advance(2)
        self.proxy.get("/debian/dists/stable/Release", headers={"Cache-Control": "max-age=0"})
        self.assertEqual(self.up.count("/debian/dists/stable/Release"), 2)


class ConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """Defaults: a 30 s window, no stale-while-revalidate, 16 KiB / 100 headers, 75 s."""
        cfg = config_from_dict({})
        self.assertEqual(cfg.cache.revalidate_window, 30.0)
        self.assertEqual({r.stale_while_revalidate for r in cfg.routes}, {0.0})
        limits = cfg.limits
        self.assertEqual(
            (limits.max_header_bytes, limits.max_headers, limits.client_idle_timeout),
            (16 * 1024, 100, 75.0),
        )

    def test_values(self) -> None:
        """Durations and sizes take their usual units; a window of 0 is allowed."""
        cfg = config_from_dict(
            {
                "cache": {"revalidate_window": "0s"},
                "routes": {"debian": {"stale_while_revalidate": "2m"}},
                "limits": {
                    "max_header_bytes": "32KiB",
                    "max_headers": 50,
                    "client_idle_timeout": "1s",
                },
            }
        )
        self.assertEqual(cfg.cache.revalidate_window, 0.0)
        self.assertEqual({r.name: r for r in cfg.routes}["debian"].stale_while_revalidate, 120.0)
        self.assertEqual(
            (cfg.limits.max_header_bytes, cfg.limits.max_headers, cfg.limits.client_idle_timeout),
            (32 * 1024, 50, 1.0),
        )

    def test_errors_name_the_key(self) -> None:
        """Every bad value is refused with an error that names its key."""
        cases = [
            ({"cache": {"revalidate_window": "soon"}}, "cache.revalidate_window"),
            ({"cache": {"revalidate_window": -1}}, "cache.revalidate_window"),
            (
                {"routes": {"debian": {"stale_while_revalidate": "1 week"}}},
                "routes.debian.stale_while_revalidate",
            ),
            (
                {"routes": {"debian": {"stale_while_revalidate": -5}}},
                "routes.debian.stale_while_revalidate",
            ),
            ({"limits": {"max_header_bytes": "big"}}, "limits.max_header_bytes"),
            ({"limits": {"max_header_bytes": 0}}, "limits.max_header_bytes"),
            ({"limits": {"max_headers": 0}}, "limits.max_headers"),
            ({"limits": {"max_headers": "100"}}, "limits.max_headers"),
            ({"limits": {"client_idle_timeout": 0}}, "limits.client_idle_timeout"),
            ({"limits": {"idle": "1s"}}, "limits.idle"),
            ({"limits": "none"}, "limits"),
        ]
        for data, key in cases:
            with self.subTest(key=key, data=data):
                e = self.assertRaises(ConfigError, config_from_dict, data)
                self.assertEqual(e.key, key)
                self.assertTrue(str(e).startswith(key + ":"), str(e))
