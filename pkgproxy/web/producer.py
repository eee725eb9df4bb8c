"""Sending a body from disk: one push producer for complete files and downloads alike.

A complete cache file is just a source whose every byte is available and verified; an
in-flight download is a source that grows. The producer reads only while its client is
not paused, through the disk pool, from its own offset: a slow client never holds memory
and never slows the upstream or the other clients.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from pkgproxy.diskpool import DiskPool
from pkgproxy.tcpwrite import flush, plain_tcp, unsent

log = Logger()

CHUNK = 256 * 1024
#: A client that stops reading for this long is cut off, so it cannot pin an fd forever.
STALL_TIMEOUT = 300.0


class FileRef(Protocol):
    """An open file shared by readers (see ``pkgproxy.fetch.body.SharedFile``).

    A small download held in memory has no fd (``-1``) and is only ever :meth:`read`.
    """

    fd: int

    def read(self, size: int, offset: int) -> bytes: ...

    def recent(self, size: int, offset: int) -> bytes | None:
        """The bytes if they are still in memory (just written), else ``None``."""
        ...

    def release(self) -> None: ...


class Source(Protocol):
    """What the producer needs to know about the bytes it sends."""

    def available(self) -> int: ...

    @property
    def complete(self) -> bool: ...

    @property
    def failed(self) -> bool: ...

    def wait(self) -> Deferred[None]: ...


class CompleteSource:
    """A verified file of known size: everything is available at once."""

    complete = True
    failed = False

    def __init__(self, size: int) -> None:
        self._size = size

    def available(self) -> int:
        return self._size

    def wait(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d


class OwnedFile:
    """An fd that belongs to one reader."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def recent(self, size: int, offset: int) -> bytes | None:
        return None

    def release(self) -> None:
        os.close(self.fd)


def reset_on_close(transport: Any) -> None:
    """Make closing ``transport``'s TCP socket send a reset rather than a FIN."""
    handle = getattr(transport, "getHandle", None)
    sock = handle() if handle is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def abort_response(request: Request) -> None:
    """End ``request``'s response as a failed transfer: its connection is reset, so even
    a body framed by the connection's end (:func:`frame_as_upstream`) is not taken as
    whole."""
    transport: Any = request.channel.transport if request.channel else None
    if transport is not None:
        reset_on_close(transport)
        transport.abortConnection()


def frame_as_upstream(request: Request, upstream: Any, proven: bool) -> None:
    """Before the first write: send a body the way the upstream framed it when it ends
    with its connection (``UpstreamResponse.close_delimited``) and nothing proves it
    whole (``proven``: an index's size or digest checks it). Nothing can tell such a body
    cut by a clean close from a complete one, so the client is promised no more than the
    upstream promised (a chunked response's last chunk would say it is whole)."""
    if upstream is not None and upstream.close_delimited and not proven:
        close_delimited = getattr(request, "close_delimited", None)
        if close_delimited is not None:
            close_delimited()


class _ResponseBody:
    """What both body producers share: the request, the file, and how a response ends.

    A response ends exactly once: finished cleanly, or aborted so the client sees a
    failed transfer; either way the file is released and ``on_close`` runs. A client
    that stops reading for :data:`STALL_TIMEOUT` is cut off.
    """

    def __init__(
        self,
        request: Request,
        file: FileRef,
        clock: IReactorTime,
        on_close: Callable[[], None] | None,
    ) -> None:
        self._request: Request | None = request
        self._file: FileRef | None = file
        self._clock = clock
        self._on_close = on_close
        self._stall: IDelayedCall | None = None

    def _register(self) -> None:
        assert self._request is not None
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())

    def stopProducing(self) -> None:
        self._close()

    def _watch_stall(self) -> None:
        if self._stall is None and self._request is not None:
            self._stall = self._clock.callLater(STALL_TIMEOUT, self._stalled)

    def _unwatch_stall(self) -> None:
        if self._stall is not None:
            if self._stall.active():
                self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        log.info("client stopped reading for {t}s; closing its connection", t=STALL_TIMEOUT)
        self._abort()

    def _finish(self) -> None:
        request = self._request
        self._close()
        if request is not None:
            request.unregisterProducer()
            request.finish()

    def _abort(self) -> None:
        """End the response as a failed transfer: the client must not see a clean end."""
        request = self._request
        self._close()
        if request is not None:
            request.unregisterProducer()
            abort_response(request)

    def _close(self) -> None:
        self._unwatch_stall()
        self._request = None
        if self._file is not None:
            self._file.release()
            self._file = None
        if self._on_close is not None:
            cb, self._on_close = self._on_close, None
            cb()


@implementer(IPushProducer)
class BodyProducer(_ResponseBody):
    """Writes ``[start, end)`` of a source to a request, then finishes or aborts it.

    :param end: exclusive end, or ``None`` when the length is unknown (then the body
        ends when the source completes).
    :param on_close: called once, however the response ends.
    :param unstarted: answers the request instead when the source fails before any
        byte of the response was written.
    """

    def __init__(
        self,
        request: Request,
        file: FileRef,
        source: Source,
        start: int,
        end: int | None,
        pool: DiskPool,
        clock: IReactorTime,
        on_close: Callable[[], None] | None = None,
        sync_read: int = 0,
        unstarted: Callable[[Request], None] | None = None,
    ) -> None:
        super().__init__(request, file, clock, on_close)
        self._sync_read = sync_read
        self._unstarted = unstarted
        self._source = source
        self._offset = start
        self._end = end
        self._pool = pool
        self._paused = False
        self._busy = False  # a read or a wait is outstanding
        self._pumping = False
        self._again = False

    def start(self) -> None:
        """Register with the request and begin sending."""
        self._register()
        self._pump()

    # IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True
        self._watch_stall()

    def resumeProducing(self) -> None:
        self._paused = False
        self._unwatch_stall()
        self._pump()

    # the loop

    def _pump(self) -> None:
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._step()
        finally:
            self._pumping = False

    def _step(self) -> None:
        if self._request is None or self._paused or self._busy:
            return
        src = self._source
        limit = src.available() if self._end is None else min(src.available(), self._end)
        if self._offset < limit:
            n = min(CHUNK, limit - self._offset)
            self._busy = True
            assert self._file is not None
            recent = self._file.recent(n, self._offset)
            if recent is not None:
                self._got(recent)
                return
            if n <= self._sync_read or self._file.fd < 0:
                # A few KiB just written by the download are in the page cache (or in
                # memory): reading them here costs less than two trips through the pool.
                try:
                    data = self._file.read(n, self._offset)
                except OSError:
                    self._read_failed(Failure())
                    return
                self._got(data)
                return
            d = self._pool.run(self._file.read, n, self._offset)
            d.addCallbacks(self._got, self._read_failed)
            return
        # available() holds back a download's last byte until it is verified, so
        # reaching the end here means the bytes sent are the ones promised.
        if self._end is not None and self._offset >= self._end:
            self._finish()
            return
        if self._end is None and src.complete and self._offset >= src.available():
            self._finish()
            return
        if src.failed:
            request = self._request
            if self._unstarted is not None and not request.startedWriting:
                # Nothing of the response has left yet: the client can still be told
                # why, in a response of its own, rather than see its connection closed.
                answer = self._unstarted
                self._close()
                request.unregisterProducer()
                answer(request)
                return
            self._abort()
            return
        self._busy = True
        src.wait().addCallback(self._waited)

    def _waited(self, _: object) -> None:
        self._busy = False
        self._pump()

    def _got(self, data: bytes) -> None:
        self._busy = False
        if self._request is None:
            return
        if not data:
            self._read_failed(Failure(OSError("short read from cache file")))
            return
        self._offset += len(data)
        self._request.write(data)
        self._pump()

    def _read_failed(self, f: Failure) -> None:
        self._busy = False
        log.failure("reading a cached body failed", f)
        self._abort()


@implementer(IPushProducer)
class SendfileProducer(_ResponseBody):
    """Sends ``[start, end)`` of a complete file with ``os.sendfile``, kernel to socket.

    Used for cache hits on plain TCP connections: the bytes never enter Python, so a
    large hit costs a few system calls instead of a copy per chunk. It works with
    Twisted's own flow control rather than around it: while the transport still holds
    buffered bytes (the response headers, or an earlier pipelined response) it waits,
    and when the socket is full it asks the transport to report writability, which
    resumes the channel and so this producer.
    """

    #: Bytes sent per turn before yielding to the reactor, so one fast client on
    #: loopback cannot starve the others.
    TURN = 8 * 1024 * 1024

    def __init__(
        self,
        request: Request,
        file: FileRef,
        start: int,
        end: int,
        clock: IReactorTime,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(request, file, clock, on_close)
        self._transport: Any = request.channel.transport
        self._offset = start
        self._end = end
        self._paused = False

    @staticmethod
    def usable(request: Request) -> bool:
        """Whether the request's connection is a plain TCP socket that sendfile can feed."""
        t = getattr(request.channel, "transport", None)
        return hasattr(os, "sendfile") and plain_tcp(t)

    def start(self) -> None:
        """Send the headers, then the body."""
        self._register()
        assert self._request is not None
        self._request.write(b"")  # the status line and headers, into the transport
        flush(self._transport)  # so the body can follow them now, not a reactor turn later
        self._pump()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def _pending(self) -> int:
        return unsent(self._transport)

    def _wait_for_transport(self) -> None:
        """Be resumed once the transport's buffer is empty and the socket writable."""
        t = self._transport
        t.producerPaused = True
        t.startWriting()
        self._watch_stall()

    def _pump(self) -> None:
        if self._request is None or self._paused or self._file is None:
            return
        self._unwatch_stall()
        if self._pending():
            self._wait_for_transport()
            return
        sock = self._transport.socket.fileno()
        sent_this_turn = 0
        while self._offset < self._end:
            count = min(self._end - self._offset, self.TURN - sent_this_turn)
            if count <= 0:
                self._wait_for_transport()
                return
            try:
                n = os.sendfile(sock, self._file.fd, self._offset, count)
            except BlockingIOError:
                self._wait_for_transport()
                return
            except OSError as e:
                log.info("sendfile to client failed: {e}", e=e)
                self._abort()
                return
            if n == 0:
                log.warn("cached file ended early at {offset}", offset=self._offset)
                self._abort()
                return
            self._offset += n
            sent_this_turn += n
            # The body bypasses Request.write; keep its byte count true for the log.
            self._request.sentLength += n
        self._finish()
