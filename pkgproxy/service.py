"""A parent service that stops its children one at a time, last added first.

Twisted's MultiService starts every child's stop at once; pkgproxy's children depend
on each other (the cache flushes its index through the disk pool, fetches finish
through the upstream pool), so each must be stopped before the one it depends on.
"""

from __future__ import annotations

from twisted.application.service import MultiService, Service
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.logger import Logger

log = Logger()


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
