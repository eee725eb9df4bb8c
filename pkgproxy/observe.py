"""What the proxy reports about its work: one record per request, one call per fetch.

The access log and the metrics both listen here, so the request path has one hook and
no knowledge of who listens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pkgproxy.config.model import Route
    from pkgproxy.fetch.fetch import Fetch


@dataclass
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


class Observer:
    """Listens to the proxy; this base class ignores everything."""

    def request_done(self, record: RequestRecord) -> None:
        """A client request has ended."""

    def fetch_settled(self, route: Route, fetch: Fetch) -> None:
        """An upstream fetch has ended (stored, refused, failed or answered)."""


class Observers(Observer):
    """Passes every report to each of several observers."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = list(observers)

    def request_done(self, record: RequestRecord) -> None:
        for o in self.observers:
            o.request_done(record)

    def fetch_settled(self, route: Route, fetch: Fetch) -> None:
        for o in self.observers:
            o.fetch_settled(route, fetch)
