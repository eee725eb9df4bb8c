"""One bounded thread pool for every disk operation that can block.

Kept apart from the reactor's own pool, which also resolves host names: a burst of
fsyncs must not delay DNS. A synchronous mode runs the work inline so unit tests stay
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
    """

    def __init__(self, reactor: IReactorFromThreads | None, threads: int = 4) -> None:
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        if reactor is not None:
            self._pool = ThreadPool(minthreads=1, maxthreads=threads, name="pkgproxy-disk")

    @property
    def synchronous(self) -> bool:
        """True when work runs inline (tests)."""
        return self._pool is None

    def startService(self) -> None:
        super().startService()
        if self._pool is not None and not self._pool.started:
            self._pool.start()

    def stopService(self) -> None:
        super().stopService()
        if self._pool is not None:
            self._pool.stop()

    def run(self, f: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """Call ``f(*args, **kwargs)`` in the pool; the result arrives on the reactor."""
        if self._pool is None or self._reactor is None:
            try:
                return succeed(f(*args, **kwargs))
            except BaseException:
                return fail()
        if not self.running:
            return fail(RuntimeError("the disk pool is stopped"))
        d: Deferred[Any] = deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)  # type: ignore[arg-type]
        return d
