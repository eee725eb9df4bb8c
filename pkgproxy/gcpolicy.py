"""Python's cyclic garbage collector and a long-running server.

Left as it is, the collector's oldest generation walks every tracked object in the
process: the modules, Twisted, the cache index as loaded at start. In a fan-out of small
misses each such collection held the reactor for about 30 ms, at whatever point of a
request the allocation that crossed the threshold happened to be. What is alive once the
server is ready (code, configuration, the index loaded from disk) lives as long as the
process, so it is frozen out of every later collection (``gc.freeze``, after one
collection so that nothing already unreachable is kept): the oldest generation then holds
only what came since, and its collections took about 9 ms in the same run. The younger
generations and the thresholds stay as Python sets them.

While a thread holds a huge parsed document, no collection runs at all (:func:`quiet`).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.application.service import Service

_lock = threading.Lock()
_quiet_holders = 0
_was_enabled = False


@contextmanager
def quiet() -> Iterator[None]:
    """No cyclic garbage collection while the block runs (nestable, threadsafe).

    A parsed packument is hundreds of thousands of containers; every full collection
    walks all of them holding the GIL, which stalls the reactor thread. Parsed JSON has
    no reference cycles, so nothing is lost by waiting: the collector's state from before
    the first holder is restored when the last one leaves.
    """
    global _quiet_holders, _was_enabled
    with _lock:
        if _quiet_holders == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _quiet_holders += 1
    try:
        yield
    finally:
        with _lock:
            _quiet_holders -= 1
            if _quiet_holders == 0 and _was_enabled:
                gc.enable()


class HeapFreeze(Service):
    """Freezes what is alive once the server is ready; unfreezes it when stopped."""

    frozen = False

    def freeze(self) -> None:
        """Collect once, then keep everything alive now out of every later collection."""
        if not self.running or self.frozen:
            return
        gc.collect()
        gc.freeze()
        self.frozen = True

    def stopService(self) -> Any:
        if self.frozen:
            gc.unfreeze()
            self.frozen = False
        return super().stopService()
