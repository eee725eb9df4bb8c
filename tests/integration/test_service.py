"""The service tree of ``twistd pkgproxy`` itself: built by ``build_service``, on a socket."""

from __future__ import annotations

import gc
import subprocess
import threading
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import maybeDeferred

from pkgproxy.cache.store import CacheStore
from pkgproxy.config import config_from_dict
from pkgproxy.service import DEFAULT_BACKLOG, kernel_backlog_limit, with_backlog
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


def _listen_backlog(port: int) -> int:
    """The backlog of the socket listening on 127.0.0.1:``port``, as the kernel has it.

    For a listening socket, ``ss`` reports the backlog in the Send-Q column.
    """
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    fields = out.split()
    assert fields and fields[0] == "LISTEN", out
    return int(fields[2])


class ListenBacklogTests(IntegrationTestCase):
    """A TCP listener gets a backlog the size of the kernel's limit, not Twisted's 50.

    (Found failing: with the backlog of 50, a burst of connections waited out one-second
    SYN retries.)
    """

    async def _backlog_of(self, listen: str) -> int:
        config = config_from_dict(
            {"listen": [listen], "cache": {"dir": self.mktemp(), "max_size": "1GiB"}}
        )
        _, _, port = await start_service_tree(self, config)
        return _listen_backlog(port)

    async def test_default_backlog(self) -> None:
        """``tcp:0`` with no ``backlog=`` listens with the kernel's ``somaxconn``."""
        want = kernel_backlog_limit()
        self.assertGreaterEqual(want, DEFAULT_BACKLOG)
        self.assertEqual(await self._backlog_of("tcp:0:interface=127.0.0.1"), want)

    async def test_backlog_named_in_the_description_is_kept(self) -> None:
        self.assertEqual(await self._backlog_of("tcp:0:interface=127.0.0.1:backlog=7"), 7)

    def test_with_backlog(self) -> None:
        """Only TCP descriptions without a backlog get one."""
        self.assertEqual(with_backlog("tcp:3142", 9), "tcp:3142:backlog=9")
        self.assertEqual(with_backlog("ssl:443:privateKey=k", 9), "ssl:443:privateKey=k:backlog=9")
        self.assertEqual(with_backlog("tcp:3142:backlog=3", 9), "tcp:3142:backlog=3")
        self.assertEqual(
            with_backlog("systemd:domain=INET:index=0", 9), "systemd:domain=INET:index=0"
        )
        self.assertEqual(with_backlog("unix:/run/p.sock", 9), "unix:/run/p.sock")
