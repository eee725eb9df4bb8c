"""Twisted's persistent connection pool, with slow connects hedged.

Real networks drop SYNs: one new connection in fifteen may stall for seconds in connect
while the others take milliseconds. A request waiting for a new connection therefore
takes whichever comes first (as Go's net/http transport does):

- the connection it started,
- an idle connection another request gives back to the pool meanwhile,
- one more connection attempt, started when the first has not completed after a hedge
  delay: a few times the host's recent median connect time, between
  :data:`HEDGE_FLOOR` and :data:`HEDGE_CEILING`.

An attempt that completes after its request was served goes to the pool as an idle
connection (or to the next waiting request). ``connect_timeout`` bounds the whole wait.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Hashable
from typing import Any

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, _RetryingHTTP11ClientProtocol

HEDGE_FLOOR = 0.25
HEDGE_CEILING = 2.0
#: The hedge delay before a host has any connect times: a first burst is hedged too.
HEDGE_INITIAL = 0.5
HEDGE_FACTOR = 3.0
_SAMPLES = 16


class HedgingPool(HTTPConnectionPool):  # type: ignore[misc]
    """``HTTPConnectionPool`` whose new connections are raced as described above.

    :ivar connect_timeout: the bound on one request's wait for a connection.
    """

    connect_timeout = 10.0

    def __init__(self, reactor: Any, persistent: bool = True) -> None:
        super().__init__(reactor, persistent)
        self._waiting: dict[Hashable, list[_Race]] = {}
        self._times: dict[Hashable, deque[float]] = {}
        #: Connect attempts started, and hedges among them (for tests and metrics).
        self.attempts = 0
        self.hedges = 0
        self._connecting: set[Deferred[Any]] = set()

    def hedge_delay(self, key: Hashable) -> float:
        """How long a connect attempt to ``key`` may take before another starts."""
        times = self._times.get(key)
        if not times:
            return HEDGE_INITIAL
        return min(HEDGE_CEILING, max(HEDGE_FLOOR, HEDGE_FACTOR * statistics.median(times)))

    def _connected_in(self, key: Hashable, seconds: float) -> None:
        times = self._times.get(key)
        if times is None:
            if len(self._times) > 1024:
                self._times.clear()
            times = self._times[key] = deque(maxlen=_SAMPLES)
        times.append(seconds)

    def _newConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        race = _Race(self, key, endpoint)
        self._waiting.setdefault(key, []).append(race)
        race.attempt()
        return race.result

    def _attempt(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        self.attempts += 1
        d: Deferred[Any] = super()._newConnection(key, endpoint)
        self._connecting.add(d)
        return d.addBoth(self._settled, d)

    def _settled(self, result: object, d: Deferred[Any]) -> object:
        self._connecting.discard(d)
        return result

    def closeCachedConnections(self) -> Deferred[None]:
        """Close idle connections and give up attempts still connecting (shutdown)."""
        for d in list(self._connecting):
            d.cancel()
        result: Deferred[None] = super().closeCachedConnections()
        return result

    def _putConnection(self, key: Hashable, connection: Any) -> None:
        super()._putConnection(key, connection)
        if self._waiting.get(key):
            # Not now: this runs inside the connection's own response handling, which
            # must finish before the connection takes another request.
            self._reactor.callLater(0, self._serve_waiting, key)

    def _serve_waiting(self, key: Hashable) -> None:
        waiting = self._waiting.get(key)
        while waiting:
            connection = self._take_idle(key)
            if connection is None:
                return
            waiting[0].done(connection)

    def _take_idle(self, key: Hashable) -> Any:
        """An idle connection to ``key`` out of the pool, as ``getConnection`` takes it."""
        connections = self._connections.get(key)
        while connections:
            connection = connections.pop(0)
            self._timeouts.pop(connection).cancel()
            if connection.state == "QUIESCENT":
                if self.retryAutomatically:
                    endpoint = getattr(connection, "_pkgproxy_endpoint", None)
                    if endpoint is not None:
                        connection = _RetryingHTTP11ClientProtocol(
                            connection, lambda e=endpoint: self._newConnection(key, e)
                        )
                return connection
        return None

    def _left(self, race: _Race) -> None:
        waiting = self._waiting.get(race.key)
        if waiting and race in waiting:
            waiting.remove(race)
            if not waiting:
                del self._waiting[race.key]


class _Race:
    """One request's wait for a connection."""

    def __init__(self, pool: HedgingPool, key: Hashable, endpoint: IStreamClientEndpoint) -> None:
        self.pool = pool
        self.key = key
        self.endpoint = endpoint
        self.result: Deferred[Any] = Deferred(self._cancel)
        self._pending: list[Deferred[Any]] = []
        self._cancelled = False
        clock = pool._reactor
        self._started = clock.seconds()
        self._hedge: IDelayedCall | None = clock.callLater(pool.hedge_delay(key), self._hedged)
        self._deadline: IDelayedCall | None = clock.callLater(pool.connect_timeout, self._timed_out)

    def attempt(self) -> None:
        started = self.pool._reactor.seconds()
        d = self.pool._attempt(self.key, self.endpoint)
        self._pending.append(d)
        d.addCallbacks(self._connected, self._failed, callbackArgs=(d, started), errbackArgs=(d,))

    def _hedged(self) -> None:
        self._hedge = None
        if not self.result.called:
            self.pool.hedges += 1
            self.attempt()

    def _connected(self, connection: Any, d: Deferred[Any], started: float) -> None:
        self._pending.remove(d)
        self.pool._connected_in(self.key, self.pool._reactor.seconds() - started)
        connection._pkgproxy_endpoint = self.endpoint
        if self.result.called:
            # Served meanwhile: this one is an idle connection for whoever asks next.
            self.pool._putConnection(self.key, connection)
            return
        self.done(connection)

    def _failed(self, f: Failure, d: Deferred[Any]) -> None:
        self._pending.remove(d)
        if not self._pending and not self.result.called and not self._cancelled:
            if self._hedge is not None and self._hedge.active():
                # The only attempt failed at once (refused): no point in waiting.
                self._hedge.cancel()
                self._hedge = None
            self._finish()
            self.result.errback(f)

    def done(self, connection: Any) -> None:
        self._finish()
        self.result.callback(connection)

    def _finish(self) -> None:
        self.pool._left(self)
        for timer in (self._hedge, self._deadline):
            if timer is not None and timer.active():
                timer.cancel()
        self._hedge = self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if not self.result.called:
            self._finish()
            self.result.errback(
                net_error.TimeoutError(f"no connection within {self.pool.connect_timeout:g}s")
            )
            for d in list(self._pending):
                d.cancel()

    def _cancel(self, result: Deferred[Any]) -> None:
        self._cancelled = True
        self._finish()
        for d in list(self._pending):
            d.cancel()
