"""The service tree of ``twistd pkgproxy`` itself: built by ``build_service``, on a socket."""

from __future__ import annotations

import gc
import threading
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import maybeDeferred

from pkgproxy.cache.store import CacheStore
from pkgproxy.config import config_from_dict
from tests.integration.harness import (
    HTTPTestClient,
    IntegrationTestCase,
    bounded,
    pattern,
    sleep,
    start_service_tree,
    static,
)


def _disk_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if "pkgproxy-disk" in t.name]


class ServiceTreeTests(IntegrationTestCase):
    """``pkgproxy.tap.build_service`` with ``listen = ["tcp:0:interface=127.0.0.1"]``."""

    async def _start_tree(self) -> tuple[MultiService, CacheStore, int, Any]:
        upstream = await self.start_upstream()
        config = config_from_dict(
            {
                "listen": ["tcp:0:interface=127.0.0.1"],
                "cache": {"dir": self.mktemp(), "max_size": "1GiB"},
                "routes": {
                    "files": {"family": "generic", "immutable": True, "upstream": upstream.url()}
                },
            }
        )
        top, store, port = await start_service_tree(self, config)
        return top, store, port, upstream

    async def test_serves_then_stops_cleanly(self) -> None:
        """The tree serves a MISS and a HIT, then stopService succeeds for every service.

        A HIT leaves an access time for the index, so stopping has work for the disk pool
        (flush, then close the index). Every child's stop must succeed, the index must be
        closed, and no disk-pool thread may be left behind.

        Once the cache is loaded, what is alive is frozen out of garbage collection
        (``pkgproxy.gcpolicy``); stopping the tree gives it back to the collector.
        """
        top, store, port, upstream = await self._start_tree()
        body = pattern(100 * 1024, b"tree")
        upstream.handlers[b"/tree.bin"] = static(body)
        client = HTTPTestClient()
        try:
            url = f"http://127.0.0.1:{port}/files/tree.bin"
            first = await client.get(url)
            self.assertEqual((first.status, first.x_cache, first.body), (200, b"MISS", body))
            for _ in range(100):
                if store.peek("files:tree.bin") is not None:
                    break
                await sleep(0.02)
            hit = await client.get(url)
            self.assertEqual((hit.status, hit.x_cache, hit.body), (200, b"HIT", body))
            for _ in range(100):
                if gc.get_freeze_count():
                    break
                await sleep(0.02)
            self.assertGreater(gc.get_freeze_count(), 0)
        finally:
            await client.close()
        await sleep(0.05)  # let the server side see the client's connection close

        result = await bounded(maybeDeferred(top.stopService), 10)
        # MultiService reports a child's failure in its DeferredList result; that child's
        # Deferred also still holds the failure and logs it as "Unhandled error in
        # Deferred" when collected: collect it now, inside this test, so it is not blamed
        # on whichever test runs next (and so that a failure is seen however it shows).
        failures = [
            f.getTraceback(elideFrameworkCode=True)
            for ok, f in (result if isinstance(result, list) else [])
            if not ok
        ]
        del result
        gc.collect()
        logged = [f.getTraceback(elideFrameworkCode=True) for f in self.flushLoggedErrors()]
        failures = failures or logged
        if failures:
            self.fail("stopping the service tree failed:\n" + "\n".join(failures))
        self.assertIsNone(store._db, "the cache index was not closed")
        self.assertEqual(_disk_threads(), [])
        self.assertEqual(gc.get_freeze_count(), 0)
