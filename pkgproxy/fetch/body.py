"""Where a download's body waits for its readers: a temp file, or memory.

The upstream's bytes arrive in the reactor; :class:`BodyWriter` writes them in order,
hashing them on the way, into a :class:`SharedFile` (in the disk pool, one write at a
time) or, for a small body, a :class:`MemoryBody`. Every subscriber reads the buffer at
its own offset. The upstream is paused above :data:`HIGH_WATER` bytes waiting for the
disk and resumed below :data:`LOW_WATER`.

When the disk refuses a write, the rest of the body is held in memory (its clients still
get it whole; it is not stored), within :data:`SPILL_MAX` per download and the process's
:data:`SPILL_BUDGET`; beyond either, the download fails cleanly. Nothing here decides
whether a body is good: that is :mod:`pkgproxy.fetch.verify`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol as _Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from pkgproxy.upstream.client import UpstreamError

if TYPE_CHECKING:
    from pkgproxy.diskpool import DiskPool

log = Logger()

#: Upstream is paused when this much is waiting for the disk, resumed below the low mark.
HIGH_WATER = 8 * 1024 * 1024
LOW_WATER = 2 * 1024 * 1024
#: When the cache disk refuses a download's write, up to this much of the rest of its
#: body is held in memory so that its clients still get it whole (it is not stored).
SPILL_MAX = 64 * 1024 * 1024

_DONE = Failure(ResponseDone())


class SpillBudget:
    """The memory all downloads together may hold after the cache disk refused writes
    (and, as :data:`DOCUMENT_BUDGET`, the documents received in memory to be relinked).

    A download the disk fails reserves what it still needs (its announced remainder, or
    :data:`SPILL_MAX` when no length was announced) before it holds any of it; when the
    budget cannot cover that, this newcomer fails cleanly (its clients see a failed
    transfer and a retry is relayed, as every miss is while the disk is in trouble),
    and the downloads already held in memory go on undisturbed. A reservation is
    returned when the last reader of that body lets go of it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: Bytes reserved now.
        self.held = 0

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes, if the budget has them."""
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


#: Shared by every download of the process (``limits.disk_error_memory``).
SPILL_BUDGET = SpillBudget(256 * 1024 * 1024)
#: Documents to be relinked in memory are received there too (no temp file, no disk
#: write to wait for between their last byte and their rewrite), up to this much of
#: them at once; past it, through a temp file as any other body.
DOCUMENT_BUDGET = SpillBudget(48 * 1024 * 1024)


class SharedFile:
    """An fd read by several subscribers with ``pread``; closed by its last user.

    After the disk refused a write, the rest of the body is held in memory instead
    (:attr:`spill`, from byte :attr:`spill_at` on): subscribers read below that point
    from the file and above it from memory, unaware of the change.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._refs = 1
        self.spill_at = -1
        self.spill: bytearray | None = None
        #: What :attr:`spill` may grow to, reserved from :attr:`budget`.
        self.reserved = 0
        self.budget: SpillBudget | None = None
        #: ``(offset, bytes)``: the last piece written, kept so that the subscribers
        #: following the download read it from memory, not back from the file (where
        #: a read may wait for the next write to the same file).
        self.tail: tuple[int, bytes] | None = None

    def acquire(self) -> SharedFile:
        self._refs += 1
        return self

    def recent(self, size: int, offset: int) -> bytes | None:
        """The ``size`` bytes at ``offset`` if they are of the last piece written."""
        tail = self.tail
        if tail is None:
            return None
        start = offset - tail[0]
        data = tail[1]
        if start < 0 or start + size > len(data):
            return None
        return data if start == 0 and size == len(data) else data[start : start + size]

    def read(self, size: int, offset: int) -> bytes:
        spill = self.spill
        if spill is not None:
            if offset >= self.spill_at:
                start = offset - self.spill_at
                return bytes(spill[start : start + size])
            size = min(size, self.spill_at - offset)
        return os.pread(self.fd, size, offset)

    def release(self) -> None:
        self._refs -= 1
        if self._refs == 0:
            os.close(self.fd)
            self.spill = None
            self.tail = None
            if self.budget is not None:
                self.budget.give(self.reserved)
                self.budget = None


class MemoryBody:
    """A small download's body held in memory, read by subscribers like the temp file.

    Subscribers read it with :meth:`read`; there is no fd to share or close.
    """

    fd = -1

    def __init__(self) -> None:
        self.data = bytearray()

    def acquire(self) -> MemoryBody:
        return self

    def release(self) -> None:
        pass

    def recent(self, size: int, offset: int) -> bytes | None:
        return self.read(size, offset)

    def read(self, size: int, offset: int) -> bytes:
        return bytes(self.data[offset : offset + size])


#: What a download's body is buffered in.
Body = SharedFile | MemoryBody


class Flow(Protocol):
    """The upstream body's flow control."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class BodyWriter:
    """Writes a body into its buffer in arrival order, hashing it on the way.

    :param on_written: ``n`` more bytes are in the buffer, readable by subscribers.
    :param on_finished: the upstream body is over and every byte of it is written.
    :param on_refused: the disk refused a write and the rest cannot be held in memory
        (the reason, one line); nothing more is written.
    :param disk_error: told of every write the disk refused (the store's disk trouble).
    :param may_spill: after the disk refused a write, the rest may be held in memory.
    """

    def __init__(
        self,
        body: Body,
        hashers: dict[str, Any],
        pool: DiskPool,
        *,
        url: str,
        length: int | None,
        may_spill: bool,
        on_written: Callable[[int], None],
        on_finished: Callable[[Failure], None],
        on_refused: Callable[[str], None],
        disk_error: Callable[[str], None],
    ) -> None:
        self.body = body
        self.hashers = hashers
        self._pool = pool
        self._url = url
        self._length = length
        self._may_spill = may_spill
        self._on_written = on_written
        self._on_finished = on_finished
        self._on_refused = on_refused
        self._disk_error = disk_error
        #: Pauses and resumes the upstream (set once the body is being delivered).
        self.flow: Flow | None = None
        #: Bytes in the buffer.
        self.written = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._writing = False
        #: The bytes of the disk write in progress, written again to memory if it fails.
        self._in_write = b""
        self._ended: Failure | None = None
        self._stopped = False

    def stop(self) -> None:
        """Nothing more is written (the download failed)."""
        self._stopped = True

    def add(self, data: bytes) -> None:
        """The upstream's next bytes."""
        if self._stopped:
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > HIGH_WATER and self.flow is not None:
            self.flow.pause()
        self._write_next()

    def end(self, reason: Failure) -> None:
        """The upstream body is over, for ``reason``."""
        self._ended = reason
        self._write_next()

    def _write_next(self) -> None:
        if self._writing or self._stopped:
            return
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._writing = True
            body = self.body
            if isinstance(body, MemoryBody):
                d = succeed(append_and_hash(body.data, data, self.hashers))
            elif body.spill is not None:
                if len(body.spill) + len(data) > body.reserved:
                    self._writing = False
                    self._give_up_spill()
                    return
                # Hashed in the pool, as a disk write would be: up to HIGH_WATER at once.
                d = self._pool.run(append_and_hash, body.spill, data, self.hashers)
            else:
                self._in_write = data
                d = self._pool.run(write_and_hash, body.fd, data, self.written, self.hashers)
            d.addCallbacks(self._wrote, self._write_failed)
            return
        if self._ended is not None:
            self._on_finished(self._ended)

    def _wrote(self, n: int) -> None:
        self._writing = False
        if isinstance(self.body, SharedFile) and self.body.spill is None:
            self.body.tail = (self.written, self._in_write)
        self._in_write = b""
        self._pending_bytes -= n
        self.written += n
        if self._pending_bytes < LOW_WATER and self.flow is not None:
            self.flow.resume()
        self._on_written(n)
        self._write_next()

    def _write_failed(self, f: Failure) -> None:
        self._writing = False
        why = f.getErrorMessage()
        self._disk_error(why)
        body = self.body
        if (
            isinstance(body, SharedFile)
            and body.spill is None
            and not self._stopped
            and self._may_spill
        ):
            # The clients of this download still get it whole: what is left of it is
            # held in memory (up to SPILL_MAX, within the budget shared by all
            # downloads), checked as before, and not stored.
            length = self._length
            need = SPILL_MAX if length is None else max(0, length - self.written)
            if need > SPILL_MAX:
                self._give_up_spill()
                return
            budget = SPILL_BUDGET
            if not budget.take(need):
                log.warn(
                    "cache disk error writing {url} ({why}); the memory for downloads "
                    "the disk refused is spent ({held} of {limit} MiB), so this one fails",
                    url=self._url,
                    why=why,
                    held=budget.held >> 20,
                    limit=budget.limit >> 20,
                )
                self._on_refused("no memory left to finish it after a cache disk error")
                return
            body.reserved = need
            body.budget = budget
            log.warn(
                "cache disk error writing {url} ({why}); its clients get the rest "
                "from memory and it is not stored",
                url=self._url,
                why=why,
            )
            body.spill_at = self.written
            body.spill = bytearray()
            self._pending.insert(0, self._in_write)
            self._write_next()
            return
        self._on_refused(why)

    def _give_up_spill(self) -> None:
        log.warn(
            "{url}: more than {n} MiB left to hold in memory after a cache disk error",
            url=self._url,
            n=SPILL_MAX >> 20,
        )
        self._on_refused("the rest of the body is too large to hold in memory")


def append_and_hash(body: bytearray, data: bytes, hashers: dict[str, Any]) -> int:
    """A body's next piece, kept in memory: a small download's, or the rest of one the
    disk refused (then run in the pool, one piece at a time)."""
    body += data
    for h in hashers.values():
        h.update(data)
    return len(data)


def write_and_hash(fd: int, data: bytes, offset: int, hashers: dict[str, Any]) -> int:
    """Runs in the disk pool: one writer per fetch at a time, so order is kept."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        offset += n
        view = view[n:]
    for h in hashers.values():
        h.update(data)
    return len(data)


class BodyReceiver(_Protocol):
    """Receives the upstream body; enforces the idle timeout; is its :class:`Flow`.

    :param receive: called with each piece of the body.
    :param lost: called once, when the body is over (complete or not).
    """

    def __init__(
        self,
        receive: Callable[[bytes], None],
        lost: Callable[[Failure], None],
        clock: IReactorTime,
        idle_timeout: float,
    ) -> None:
        self._receive = receive
        self._lost = lost
        self._clock = clock
        self._timeout = idle_timeout
        self._timer: IDelayedCall | None = None
        self._paused = False
        self._timed_out = False

    def connectionMade(self) -> None:
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._timeout)
        else:
            self._timer = self._clock.callLater(self._timeout, self._idle)

    def _idle(self) -> None:
        log.warn("upstream went silent for {t}s", t=self._timeout)
        self._timed_out = True
        self.abort()

    def dataReceived(self, data: bytes) -> None:
        if not self._paused:
            self._arm()
        self._receive(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._timed_out:
            # A body delimited by the connection's end would look complete after the
            # abort: it was cut off here, so it is a failure whatever Twisted says.
            reason = Failure(UpstreamError("timeout", "upstream went silent mid-body", 504))
        self._lost(reason)

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self._arm()
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]
