"""Relaying an upstream body straight to one client, without the cache.

Used when the cache disk cannot take a download (full, read-only): the client still
gets its file, streamed with back-pressure both ways, and nothing is stored. There is
no single flight on this path: each client is its own upstream request, which is the
price of a full disk, not the normal way of working.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.server import Request
from zope.interface import implementer

from pkgproxy.upstream.client import UpstreamResponse
from pkgproxy.web.producer import abort_response


@implementer(IPushProducer)
class Relay(Protocol):
    """Receives the upstream body and writes it to the client request.

    It is the upstream's body protocol and the client's producer at once: the client's
    back-pressure pauses the upstream connection, and a client that leaves stops it.
    """

    def __init__(
        self, request: Request, upstream: UpstreamResponse, clock: IReactorTime, idle: float
    ) -> None:
        self._request: Request | None = request
        self._upstream = upstream
        self._clock = clock
        self._idle = idle
        self._timer: IDelayedCall | None = None
        self._received = 0
        self._length = upstream.response.length

    def connectionMade(self) -> None:
        assert self._request is not None
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle)
        else:
            self._timer = self._clock.callLater(self._idle, self.stopProducing)

    def dataReceived(self, data: bytes) -> None:
        self._arm()
        self._received += len(data)
        if self._request is not None:
            self._request.write(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._upstream.release()
        request, self._request = self._request, None
        if request is None:
            return
        request.unregisterProducer()
        complete = reason.check(ResponseDone) is not None or (
            reason.check(PotentialDataLoss) is not None and not isinstance(self._length, int)
        )
        if complete:
            request.finish()
        else:
            abort_response(request)

    # IPushProducer, for the client side

    def pauseProducing(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]
