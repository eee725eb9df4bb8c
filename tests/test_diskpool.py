"""The disk pool's index thread."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pkgproxy.diskpool import DiskPool


class IndexThreadTests(SynchronousTestCase):
    def test_one_index_thread_by_default(self) -> None:
        """Index work holds the GIL: one thread, so one document in memory at a time."""
        pool = DiskPool(Clock())  # type: ignore[arg-type]
        cpu = pool._cpu
        assert cpu is not None
        self.assertEqual(cpu.max, 1)

    def test_synchronous_mode_runs_inline(self) -> None:
        pool = DiskPool(None)
        self.assertEqual(self.successResultOf(pool.run_cpu(lambda: 7)), 7)
