"""Limits on talking to an upstream, as an agent that wraps an agent.

Per upstream origin: a circuit breaker (after ``failure_threshold`` failures of the
upstream in a row, requests fail fast for ``retry_after``), a bounded number of requests
in flight (``max_connections_per_host``; a request holds its slot until its caller
releases the response, i.e. has read the body; waiting for a slot is bounded too), and a
timeout for the response head. Only the upstream's own failures count for the breaker:
connect, DNS, TLS, a timeout, a broken answer; never a request refused locally.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web._newclient import RequestTransmissionFailed
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from pkgproxy import httputil
from pkgproxy.config.model import UpstreamConfig
from pkgproxy.upstream.errors import UpstreamError

log = Logger()

_origins: dict[str, tuple[str, str, int | None]] = {}


def _origin(url: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of a URL, remembered by its ``scheme://authority`` part
    (every miss asks it for a new URL of one of a few upstreams)."""
    prefix = httputil.split_origin(url)[0]
    found = _origins.get(prefix)
    if found is None:
        p = urlsplit(prefix)
        port = p.port or (443 if p.scheme == "https" else 80)
        found = (p.scheme, (p.hostname or "").lower(), port)
        if len(_origins) >= 1024:
            _origins.clear()
        _origins[prefix] = found
    return found


@dataclass
class _Breaker:
    """Consecutive connection failures of one upstream origin."""

    failures: int = 0
    open_until: float = 0.0


class HeldResponse(proxyForInterface(IResponse)):  # type: ignore[misc]
    """A response holding its origin's slot until :attr:`release` is called."""

    def __init__(self, original: IResponse, release: Callable[[], None]) -> None:
        super().__init__(original)
        self.release = release


@implementer(IAgent)
class LimitedAgent:
    """Wraps ``agent`` with the per-origin breaker, slots and head timeout."""

    def __init__(self, agent: IAgent, clock: IReactorTime, config: UpstreamConfig) -> None:
        #: The agent wrapped.
        self.agent = agent
        self._clock = clock
        self._config = config
        self._slots: dict[tuple[str, str, int | None], DeferredSemaphore] = {}
        self._breakers: dict[tuple[str, str, int | None], _Breaker] = {}

    def active(self) -> int:
        """How many requests hold a slot now."""
        return sum(s.limit - s.tokens for s in self._slots.values())

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        origin = _origin(uri.decode("ascii"))
        breaker = self._breakers.get(origin)
        if breaker is None:
            breaker = self._breakers[origin] = _Breaker()
        now = self._clock.seconds()
        if now < breaker.open_until:
            return fail(
                UpstreamError(
                    "circuit",
                    f"{origin[1]} failed {breaker.failures} times in a row; not asked again "
                    f"for {breaker.open_until - now:.0f}s",
                    503,
                )
            )
        sem = self._slots.get(origin)
        if sem is None:
            sem = self._slots[origin] = DeferredSemaphore(self._config.max_connections_per_host)
        if sem.tokens:
            sem.tokens -= 1  # what acquire() does, without a Deferred per request
            return self._send(origin, breaker, sem, method, uri, headers, bodyProducer)
        d: Deferred[Any] = sem.acquire()
        wait = self._config.header_timeout
        timer = self._clock.callLater(wait, d.cancel)

        def acquired(_: object) -> Deferred[IResponse]:
            if timer.active():
                timer.cancel()
            return self._send(origin, breaker, sem, method, uri, headers, bodyProducer)

        def not_acquired(f: Failure) -> Failure:
            if timer.active():
                timer.cancel()
            if f.check(CancelledError):
                return Failure(
                    UpstreamError(
                        "busy",
                        f"all {sem.limit} connections to {origin[1]} stayed busy for {wait:.0f}s",
                        503,
                    )
                )
            return f

        return d.addCallbacks(acquired, not_acquired)

    def _send(
        self,
        origin: tuple[str, str, int | None],
        breaker: _Breaker,
        sem: DeferredSemaphore,
        method: bytes,
        uri: bytes,
        headers: Headers | None,
        bodyProducer: IBodyProducer | None,
    ) -> Deferred[IResponse]:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                sem.release()

        timed_out = False

        def time_out() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        try:
            d = self.agent.request(method, uri, headers, bodyProducer)
        except Exception:
            # Refused before anything was sent (Twisted checks method and target).
            release()
            return fail(UpstreamError("request", f"request not sent: {Failure().value}", 400))
        timer = self._clock.callLater(self._config.header_timeout, time_out)

        def answered(response: IResponse) -> IResponse:
            if timer.active():
                timer.cancel()
            breaker.failures = 0
            return HeldResponse(response, release)

        def failed(f: Failure) -> Failure:
            if timer.active():
                timer.cancel()
            release()
            if _upstream_fault(f, timed_out):
                self._failed(origin, breaker)
            return f

        return d.addCallbacks(answered, failed)

    def _failed(self, origin: tuple[str, str, int | None], breaker: _Breaker) -> None:
        """Count a failure of the upstream; open the circuit after too many in a row.

        An upstream that is down then costs clients a fast 503 (or a stale copy) instead
        of a connect timeout each, well before their own timeouts (pip: 15 s,
        containerd: 30 s), and is not hammered while it recovers.
        """
        breaker.failures += 1
        if breaker.failures >= self._config.failure_threshold:
            breaker.open_until = self._clock.seconds() + self._config.retry_after
            log.warn(
                "upstream {host} failed {n} times in a row; pausing requests to it for {s}s",
                host=origin[1],
                n=breaker.failures,
                s=self._config.retry_after,
            )


def _upstream_fault(f: Failure, timed_out: bool) -> bool:
    """Whether a failed request is the upstream's failure (connect, DNS, TLS, a timeout,
    a broken answer) rather than a local one (a request Twisted refused to write, a
    request cancelled because nobody wants the answer any more)."""
    e = f.value
    if isinstance(e, CancelledError | net_error.ConnectingCancelledError):
        return timed_out
    if isinstance(e, net_error.ConnectError | net_error.DNSLookupError | net_error.TimeoutError):
        return True
    if isinstance(e, ResponseFailed | ResponseNeverReceived | RequestTransmissionFailed):
        inner = [r.value for r in e.reasons]
        if any(isinstance(i, CancelledError | net_error.ConnectionAborted) for i in inner):
            return timed_out
        return True
    return type(e).__module__.startswith("OpenSSL")
