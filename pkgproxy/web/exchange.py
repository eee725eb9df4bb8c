"""One client request as the proxy understands it, and what is recorded of it.

Everything the proxy keeps about a request while answering it lives in an
:class:`Exchange` (or, before routing, in its :class:`Trace`); nothing is set on the
twisted ``Request`` beyond its response.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.web.server import Request

from pkgproxy.config.model import Route
from pkgproxy.families import CacheClass, Decision
from pkgproxy.observe import RequestRecord

#: Before the family has classified the path.
UNDECIDED = Decision(CacheClass.PASS)


@dataclass
class Trace:
    """What the access log and metrics need to know of a request beyond its response.

    Made when a request arrives (every request has one, routed or not); ``route`` and
    ``family`` are filled in once it is routed, ``upstream_seconds`` once upstream
    answered it.
    """

    started: float
    route: str = ""
    family: str = ""
    upstream_seconds: float | None = None

    def record(self, request: Request, now: float, completed: bool) -> RequestRecord:
        """What the observer is told of ``request`` when it ends at ``now``."""
        peer = request.getClientAddress()
        return RequestRecord(
            client=getattr(peer, "host", "-"),
            method=request.method.decode("latin-1"),
            uri=request.uri.decode("latin-1"),
            status=request.code,
            bytes_sent=request.sentLength,
            cache=(request.responseHeaders.getRawHeaders(b"x-cache") or [b""])[-1].decode(),
            route=self.route,
            family=self.family,
            duration=now - self.started,
            upstream_seconds=self.upstream_seconds,
            user_agent=(request.getHeader(b"user-agent") or b"").decode("latin-1"),
            completed=completed,
        )


@dataclass
class Exchange:
    """A routed request and what has been decided about it so far.

    :ivar request: the client's request; only its response is written.
    :ivar trace: what the access log is told.
    :ivar route: the route it belongs to.
    :ivar path: canonical, below the route's upstream base, without the query.
    :ivar key: the cache key its answer is stored under (scoped, variant, per client
        base for a rewritten document).
    :ivar url: the upstream URL asked for it, query included.
    :ivar decision: what the family said of the path.
    :ivar learn: its body is an index the cache learns from.
    :ivar base: ``scheme://host[:port]`` as a reverse-mode client named the proxy, for
        the links of a rewritten document; ``None`` in forward mode.
    :ivar scheme: how a forward-mode client asked (``https`` through an intercepted
        tunnel or an absolute ``https://`` target).
    :ivar gone: the client left; nothing more is written.
    :ivar retried: asked once more already (a cache file unreadable, a fetch finished
        before it could be joined, a disk failure relayed): never a second time.
    """

    request: Request
    trace: Trace
    route: Route
    path: str
    key: str
    url: str
    decision: Decision = UNDECIDED
    learn: bool = False
    base: str | None = None
    scheme: str = "http"
    gone: bool = False
    retried: bool = False

    def watch(self) -> None:
        """Mark the exchange ``gone`` when its client leaves before the answer ends."""
        self.request.notifyFinish().addErrback(self._left)

    def _left(self, _: object) -> None:
        self.gone = True
