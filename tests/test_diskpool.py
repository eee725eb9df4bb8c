"""The disk pool's scheduling of work on whole documents."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pkgproxy import diskpool
from pkgproxy.diskpool import DiskPool


class RunDocumentTests(SynchronousTestCase):
    def test_large_documents_one_at_a_time(self) -> None:
        """Work on a document past LARGE_DOCUMENT waits for the one before it; smaller
        ones start at once (peak memory stays about one large document's worth)."""
        pool = DiskPool(Clock())  # type: ignore[arg-type]
        started: list[str] = []
        pending: dict[str, Deferred[Any]] = {}

        def run_cpu(f: Any) -> Deferred[Any]:
            name = f()
            started.append(name)
            d: Deferred[Any] = Deferred()
            pending[name] = d
            return d

        self.patch(pool, "run_cpu", run_cpu)
        big = diskpool.LARGE_DOCUMENT + 1
        first = pool.run_document(big, lambda: "big-1")
        second = pool.run_document(big, lambda: "big-2")
        pool.run_document(diskpool.LARGE_DOCUMENT, lambda: "small")
        self.assertEqual(started, ["big-1", "small"])
        pending["big-1"].callback("one")
        self.assertEqual(self.successResultOf(first), "one")
        self.assertEqual(started, ["big-1", "small", "big-2"])
        pending["big-2"].errback(RuntimeError("boom"))
        self.failureResultOf(second, RuntimeError)
        third = pool.run_document(big, lambda: "big-3")
        self.assertEqual(started[-1], "big-3")
        pending["big-3"].callback(3)
        self.assertEqual(self.successResultOf(third), 3)

    def test_synchronous_mode_runs_inline(self) -> None:
        pool = DiskPool(None)
        big = diskpool.LARGE_DOCUMENT + 1
        self.assertEqual(self.successResultOf(pool.run_document(big, lambda: 7)), 7)
