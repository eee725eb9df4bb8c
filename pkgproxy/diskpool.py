"""Bounded thread pools for every disk operation that can block.

Kept apart from the reactor's own pool, which also resolves host names: a burst of
fsyncs must not delay DNS. Durable writes (fsync, rename, index rows) have a pool of
their own, so that a client's read or a download's next write never queues behind
another download's fsync; and work that is mostly CPU (rewriting and reading an index)
has a third, so that a large document being rewritten never holds up the small writes
and reads of every other transfer. A synchronous mode runs the work inline so unit tests stay
deterministic and thread-free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

P = ParamSpec("P")
T = TypeVar("T")


class DiskPool(Service):
    """Runs blocking disk calls off the reactor thread.

    :param reactor: the reactor results are delivered to; ``None`` for synchronous mode.
    :param threads: threads for reads and writes.
    :param durable_threads: threads for fsync, rename and index writes: one by default.
        Each of their calls lets the GIL go and takes it back, so a second thread made
        the reactor and the index thread wait more for it than it gained in overlapped
        fsyncs in one workload-harness run (uv's cold install 1.51 s with two, 1.38 with
        one); a second run, on a slower machine, put the two within each other's spread
        in every workload (docs/performance.md).
    :param cpu_threads: threads for rewriting and reading indexes: one by default, as
        such work holds the GIL (more threads gain no time, only memory: measured with
        the workload harness, uv's fan-out peaked at 141 MiB with one, 147-178 with more).
    :param quick_threads: threads for short reads a request waits for before it can go
        on (one file's entry in a stored index): never queued behind body writes.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads | None,
        threads: int = 4,
        durable_threads: int = 1,
        cpu_threads: int = 1,
        quick_threads: int = 2,
    ) -> None:
        self._reactor = reactor
        self._pools: list[ThreadPool] = []
        self._io: ThreadPool | None = None
        self._durable: ThreadPool | None = None
        self._cpu: ThreadPool | None = None
        self._quick: ThreadPool | None = None
        if reactor is not None:
            self._io = ThreadPool(minthreads=1, maxthreads=threads, name="pkgproxy-disk")
            self._durable = ThreadPool(
                minthreads=1, maxthreads=durable_threads, name="pkgproxy-commit"
            )
            self._cpu = ThreadPool(minthreads=1, maxthreads=cpu_threads, name="pkgproxy-index")
            self._quick = ThreadPool(minthreads=1, maxthreads=quick_threads, name="pkgproxy-lookup")
            self._pools = [self._io, self._durable, self._cpu, self._quick]

    @property
    def synchronous(self) -> bool:
        """True when work runs inline (tests)."""
        return self._io is None

    def startService(self) -> None:
        super().startService()
        for pool in self._pools:
            if not pool.started:
                pool.start()

    def stopService(self) -> None:
        super().stopService()
        for pool in self._pools:
            pool.stop()

    def run(self, f: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """Call ``f(*args, **kwargs)`` in the I/O pool; the result arrives on the reactor."""
        return self._run(self._io, f, *args, **kwargs)

    def run_durable(self, f: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """Like :meth:`run`, in the pool for fsync-heavy work (commits, index writes)."""
        return self._run(self._durable, f, *args, **kwargs)

    def run_cpu(self, f: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """Like :meth:`run`, in the pool for CPU-heavy work (rewriting, reading indexes)."""
        return self._run(self._cpu, f, *args, **kwargs)

    def run_quick(self, f: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """Like :meth:`run`, for short reads a request waits for (never behind writes)."""
        return self._run(self._quick, f, *args, **kwargs)

    def _run(
        self, pool: ThreadPool | None, f: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> Deferred[T]:
        if pool is None or self._reactor is None:
            try:
                return succeed(f(*args, **kwargs))
            except BaseException:
                return fail()
        if not self.running:
            return fail(RuntimeError("the disk pool is stopped"))
        d: Deferred[Any] = deferToThreadPool(self._reactor, pool, f, *args, **kwargs)  # type: ignore[arg-type]
        return d
