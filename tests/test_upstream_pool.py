"""Hedged connects in the upstream pool, with fake endpoints and a fake clock."""

from __future__ import annotations

from typing import Any

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pkgproxy.upstream.pool import HEDGE_CEILING, HEDGE_FLOOR, HEDGE_INITIAL, HedgingPool

KEY = (b"https", b"up.test", 443)


class ScriptedEndpoint:
    """Each connect takes the next outcome: ``"now"`` or ``"stall"`` (never, until
    :meth:`finish` is called for it)."""

    def __init__(self, *outcomes: str) -> None:
        self.outcomes = list(outcomes)
        self.stalled: list[tuple[Deferred[Any], Any]] = []
        self.connects = 0

    def _connected(self, factory: Any) -> Any:
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        return protocol

    def connect(self, factory: Any) -> Deferred[Any]:
        self.connects += 1
        if self.outcomes.pop(0) == "now":
            return succeed(self._connected(factory))
        d: Deferred[Any] = Deferred()
        self.stalled.append((d, factory))
        return d

    def finish(self, n: int = 0) -> None:
        d, factory = self.stalled.pop(n)
        d.callback(self._connected(factory))


class HedgeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = HedgingPool(self.clock)
        self.pool.maxPersistentPerHost = 4
        self.pool.connect_timeout = 10.0

    def test_stalled_connect_is_hedged_and_late_one_pooled(self) -> None:
        """A connect still pending after the hedge delay starts one more; the request
        takes the second, and the first, when it completes, waits in the pool."""
        endpoint = ScriptedEndpoint("stall", "now")
        got: list[Any] = []
        self.pool.getConnection(KEY, endpoint).addCallback(got.append)
        self.clock.advance(HEDGE_INITIAL - 0.01)
        self.assertEqual((got, endpoint.connects), ([], 1))
        self.clock.advance(0.02)
        self.assertEqual((len(got), endpoint.connects, self.pool.hedges), (1, 2, 1))
        endpoint.finish()
        self.assertEqual(len(self.pool._connections[KEY]), 1)
        self.assertIsNot(self.pool._connections[KEY][0], got[0])

    def test_idle_connection_returned_meanwhile_is_taken(self) -> None:
        """While a connect stalls, a connection given back to the pool serves the
        waiting request at once."""
        busy = ScriptedEndpoint("now")
        first: list[Any] = []
        self.pool.getConnection(KEY, busy).addCallback(first.append)
        endpoint = ScriptedEndpoint("stall", "stall")
        got: list[Any] = []
        self.pool.getConnection(KEY, endpoint).addCallback(got.append)
        self.pool._putConnection(KEY, first[0])  # the first request is done with it
        self.clock.advance(0)
        self.assertEqual(len(got), 1)
        self.assertIs(got[0]._clientProtocol, first[0])  # wrapped for the one retry

    def test_hedge_delay_follows_the_host(self) -> None:
        """A few times the median connect time, within the floor and the ceiling."""
        self.assertEqual(self.pool.hedge_delay(KEY), HEDGE_INITIAL)
        for t in (0.001, 0.002, 0.001):
            self.pool._connected_in(KEY, t)
        self.assertEqual(self.pool.hedge_delay(KEY), HEDGE_FLOOR)
        for t in (0.3, 0.3, 0.3, 0.3):
            self.pool._connected_in(KEY, t)
        self.assertAlmostEqual(self.pool.hedge_delay(KEY), 0.9)
        for _ in range(16):
            self.pool._connected_in(KEY, 5.0)
        self.assertEqual(self.pool.hedge_delay(KEY), HEDGE_CEILING)

    def test_connect_timeout_bounds_the_whole_wait(self) -> None:
        """Every attempt stalling: the request fails after connect_timeout, and the
        attempts are given up."""
        endpoint = ScriptedEndpoint("stall", "stall")
        failures: list[Any] = []
        self.pool.getConnection(KEY, endpoint).addErrback(failures.append)
        self.clock.advance(10.0)
        self.assertEqual(len(failures), 1)
        self.assertIsInstance(failures[0].value, net_error.TimeoutError)
        self.assertEqual(endpoint.connects, 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
