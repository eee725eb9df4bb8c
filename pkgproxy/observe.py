"""What the proxy reports about its work: one record per request, one call per fetch.

The access log and the metrics both listen here, so the request path has one hook and
no knowledge of who listens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pkgproxy.config.model import Route
    from pkgproxy.fetch.fetch import Fetch


@dataclass(slots=True)
class RequestRecord:
    """One finished client request.

    :ivar cache: the ``X-Cache`` value sent (``HIT``, ``MISS``, ...), or ``""`` for an
        answer that did not involve the cache (an error, a refusal, an admin page).
    :ivar route: the route name, or ``""`` when no route matched.
    :ivar upstream_seconds: time from starting the upstream request to its answer, for
        a request that waited on one.
    :ivar completed: False when the connection was lost or the transfer aborted.
    """

    client: str
    method: str
    uri: str
    status: int
    bytes_sent: int
    cache: str
    route: str
    family: str
    duration: float
    upstream_seconds: float | None
    user_agent: str
    completed: bool


@dataclass(slots=True, eq=False)
class Hit:
    """A repeated cache hit answered by the hit path (:mod:`pkgproxy.web.fast`): what
    its :class:`RequestRecord` says that is the same for every answer to one request
    head from one cache entry, that is, everything but the client and the duration.

    :ivar memo: what observers derive from these fields once (an access-log line's
        fixed parts, the counters to add to), each under a key of its own.
    """

    method: str
    uri: str
    bytes_sent: int
    route: str
    family: str
    user_agent: str
    memo: dict[object, Any] = field(default_factory=dict)

    def record(self, client: str, duration: float) -> RequestRecord:
        """The request record of one answer."""
        return RequestRecord(
            client,
            self.method,
            self.uri,
            200,
            self.bytes_sent,
            "HIT",
            self.route,
            self.family,
            duration,
            None,
            self.user_agent,
            True,
        )


class Observer:
    """Listens to the proxy; this base class ignores everything."""

    def request_done(self, record: RequestRecord) -> None:
        """A client request has ended."""

    def hit_done(self, hit: Hit, client: str, duration: float) -> None:
        """A repeated hit has been answered: the same as
        ``request_done(hit.record(client, duration))``, which is what this does; an
        observer may do it faster with what it keeps in ``hit.memo``."""
        self.request_done(hit.record(client, duration))

    def fetch_settled(self, route: Route, fetch: Fetch) -> None:
        """An upstream fetch has ended (stored, refused, failed or answered)."""


class Observers(Observer):
    """Passes every report to each of several observers."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = list(observers)

    def request_done(self, record: RequestRecord) -> None:
        for o in self.observers:
            o.request_done(record)

    def hit_done(self, hit: Hit, client: str, duration: float) -> None:
        for o in self.observers:
            o.hit_done(hit, client, duration)

    def fetch_settled(self, route: Route, fetch: Fetch) -> None:
        for o in self.observers:
            o.fetch_settled(route, fetch)
