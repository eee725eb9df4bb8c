"""Service-tree pieces of our own: ordered stop, listeners that fail in one line.

Twisted's MultiService starts every child's stop at once; pkgproxy's children depend
on each other (the cache flushes its index through the disk pool, fetches finish
through the upstream pool), so each must be stopped before the one it depends on.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

log = Logger()


class StartupError(Exception):
    """pkgproxy cannot start; ``str()`` is the one line an operator reads."""


def os_reason(e: OSError) -> str:
    """An OS error as a short lower-case phrase: ``address already in use``."""
    text = e.strerror or str(e)
    return text[:1].lower() + text[1:]


class OrderedMultiService(MultiService):
    """Children stop in reverse order of addition, each after the previous one is done."""

    @inlineCallbacks
    def stopService(self):  # type: ignore[no-untyped-def]
        Service.stopService(self)
        for child in reversed(list(self)):
            try:
                yield maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {child} failed", child=child)


#: Listen backlog when a description names none and the kernel's limit is unknown.
#: Twisted's own default, 50, makes a burst of connections (a CI farm starting its jobs)
#: wait out one-second SYN retries.
DEFAULT_BACKLOG = 1024
_BACKLOG_TYPES = ("tcp", "tcp6", "ssl")


def kernel_backlog_limit() -> int:
    """The kernel's cap on a listen backlog (``somaxconn``), or :data:`DEFAULT_BACKLOG`."""
    try:
        with open("/proc/sys/net/core/somaxconn", encoding="ascii") as f:
            return max(DEFAULT_BACKLOG, int(f.read().strip()))
    except (OSError, ValueError):
        return DEFAULT_BACKLOG


def with_backlog(description: str, backlog: int) -> str:
    """``description`` with ``backlog=`` added when it is a TCP one that names none."""
    kind = description.partition(":")[0].strip().lower()
    if kind not in _BACKLOG_TYPES or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


class Listener(StreamServerEndpointService):
    """Listens on a strports description; a port it cannot have stops the start.

    The failure is a :class:`StartupError` naming the description and the reason
    (``cannot listen on tcp:3142: address already in use``), raised while twistd
    starts the services, before the reactor runs. A TCP description without a
    ``backlog=`` gets ``backlog`` (see :func:`with_backlog`).
    """

    def __init__(
        self, reactor: Any, description: str, factory: Any, backlog: int = DEFAULT_BACKLOG
    ) -> None:
        endpoint = serverFromString(reactor, with_backlog(description, backlog))
        super().__init__(endpoint, factory)
        self.description = description
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            error = e.socketError
            why = os_reason(error) if isinstance(error, OSError) else str(error)
            message = f"cannot listen on {self.description}: {why}"
            log.critical("{message}", message=message)
            raise StartupError(message) from None
