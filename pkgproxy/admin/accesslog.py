"""The access log: one line per finished request, through ``twisted.logger``.

It replaces Twisted's own ``Site`` log line (see :mod:`pkgproxy.web.site`), because that
one cannot say what matters here: whether the cache answered, and how long the upstream
took. Lines go to the ``pkgproxy.access`` namespace of the normal twistd log, so they reach
journald or ``docker logs`` with everything else and carry their fields as structured
event keys for any JSON log observer.

Text lines look like::

    10.0.0.7 "GET /debian/pool/main/h/hello/hello_2.10-3_amd64.deb" 200 53140 MISS
        upstream=0.084s time=0.412s route=debian agent="Debian APT-HTTP/1.3 (2.6.1)"

(on one line). Client-controlled text (the URL, the user agent) is escaped so that a line
can never be split or forged.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from select import PIPE_BUF
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    formatTime,
    globalLogPublisher,
)

from pkgproxy.diskpool import DiskPool
from pkgproxy.observe import Hit, Observer, RequestRecord

NAMESPACE = "pkgproxy.access"


def escape(text: str) -> str:
    """Backslash-escape quotes, backslashes and control characters for a quoted field."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text  # the common case, without a loop per character
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c < " " or "\x7f" <= c <= "\x9f":
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    return "".join(out)


def record_fields(record: RequestRecord) -> dict[str, Any]:
    """The structured fields of one access-log line (the JSON object, too)."""
    return {
        "client": record.client,
        "method": record.method,
        "uri": record.uri,
        "status": record.status,
        "bytes": record.bytes_sent,
        "cache": record.cache or None,
        "route": record.route or None,
        "family": record.family or None,
        "upstream_seconds": (
            round(record.upstream_seconds, 6) if record.upstream_seconds is not None else None
        ),
        "duration_seconds": round(record.duration, 6),
        "user_agent": record.user_agent,
        "completed": record.completed,
    }


def text_line(record: RequestRecord) -> str:
    """The text line of one request, as the module docstring shows it (written out in one
    expression: a format string and its dictionary cost more than the rest of a hit's
    line)."""
    upstream = record.upstream_seconds
    return (
        f'{escape(record.client)} "{escape(record.method)} {escape(record.uri)}" '
        f"{record.status} {record.bytes_sent} {record.cache or '-'} "
        f"upstream={'-' if upstream is None else f'{upstream:.3f}s'} "
        f"time={record.duration:.3f}s route={record.route or '-'} "
        f'agent="{escape(record.user_agent)}"{"" if record.completed else " ABORTED"}'
    )


def hit_parts(hit: Hit) -> tuple[str, str]:
    """The text line of a replayed hit around its client and its duration:
    ``escape(client) + before + f"{duration:.3f}" + after`` is :func:`text_line` of
    ``hit.record(client, duration)``."""
    return (
        f' "{escape(hit.method)} {escape(hit.uri)}" 200 {hit.bytes_sent} HIT upstream=- time=',
        f's route={hit.route or "-"} agent="{escape(hit.user_agent)}"',
    )


def _hit_line(stamp: str, hit: Hit, client: str, duration: float, owner: object) -> str:
    """A replayed hit's text line after ``stamp``, from :func:`hit_parts` (made once per
    hit and kept in ``hit.memo[owner]``)."""
    parts: tuple[str, str] | None = hit.memo.get(owner)
    if parts is None:
        before, after = hit_parts(hit)
        parts = hit.memo[owner] = (before, after + "\n")
    return f"{stamp}{escape(client)}{parts[0]}{duration:.3f}{parts[1]}"


#: What a replayed hit's line is counted as towards :attr:`_Batch.BATCH` until it is made.
_HIT_LINE = 200


class _Batch:
    """Lines buffered until :attr:`BATCH` bytes or :attr:`DELAY` seconds, then
    :meth:`flush`-ed (by the access log classes below)."""

    BATCH = 64 * 1024
    DELAY = 1.0
    _lines: list[Any]
    _size: int
    _timer: IDelayedCall | None
    _clock: IReactorTime | None

    def flush(self) -> Deferred[None]:
        raise NotImplementedError

    def _add(self, line: Any, size: int | None = None) -> None:
        self._lines.append(line)
        self._size += len(line) if size is None else size
        if self._size >= self.BATCH:
            self.flush()
        elif self._timer is None and self._clock is not None:
            self._timer = self._clock.callLater(self.DELAY, self.flush)


class _Direct:
    """Where the normal log writes text lines, for access lines written in batches.

    Found among the global log publisher's observers when every one of them is a
    :class:`~twisted.logger.FileLogObserver` that writes an access event exactly as
    the batch would (twistd's text log, to stdout or a file): then a batch of lines is
    the same bytes in the same place as one event per line, at a fraction of the cost.
    """

    def __init__(self, files: list[Any]) -> None:
        self.files = files

    @classmethod
    def find(cls, observers: list[Any], prefix: Callable[[float], str]) -> _Direct | None:
        files = []
        probe_time = 1_700_000_000.5
        for observer in observers:
            probe = {
                "log_format": "{access_line}",
                "access_line": 'probe "x"',
                "log_namespace": NAMESPACE,
                "log_level": LogLevel.info,
                "log_time": probe_time,
            }
            # pkgproxy's own --log-level filter in front of the text log: an access
            # line goes through it whenever every predicate lets the probe pass.
            while isinstance(observer, FilteringLogObserver):
                passes = getattr(observer, "_shouldLogEvent", None)
                inner = getattr(observer, "_observer", None)
                if passes is None or inner is None or not passes(dict(probe)):
                    return None
                observer = inner
            out = getattr(observer, "_outFile", None)
            if not isinstance(observer, FileLogObserver) or out is None:
                return None
            try:
                text = observer.formatEvent(probe)
            except Exception:
                return None
            if text != prefix(probe_time) + 'probe "x"\n' or getattr(observer, "_encoding", None):
                return None
            files.append(out)
        return cls(files) if files else None

    def write(self, pool: DiskPool | None, data: str) -> Deferred[None]:
        """Write ``data`` (whole lines) to every file: off the reactor thread where the
        file is an OS file (in pieces no larger than a pipe writes atomically, split at
        line ends, so a line never mixes with another writer's), else through it."""
        work = []
        for out in self.files:
            fd = _fileno(out)
            if fd is None or pool is None:
                out.write(data)
                out.flush()
            else:
                work.append(fd)
        if not work:
            return succeed(None)
        raw = data.encode("utf-8", "backslashreplace")
        assert pool is not None
        return pool.run(_write_lines, work, raw)


def _fileno(out: Any) -> int | None:
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return fd if isinstance(fd, int) else None


def _write_lines(fds: list[int], data: bytes) -> None:
    start = 0
    while start < len(data):
        end = start + PIPE_BUF
        if end < len(data):
            cut = data.rfind(b"\n", start, end)
            end = cut + 1 if cut >= start else data.find(b"\n", end) + 1 or len(data)
        for fd in fds:
            view = memoryview(data)[start:end]
            while view:
                view = view[os.write(fd, view) :]
        start = end


class AccessLog(_Batch, Service, Observer):
    """One ``info`` line per finished request in the ``pkgproxy.access`` namespace of the
    normal log.

    One ``twisted.logger`` event per request costs tens of µs on the reactor thread
    (the event, every observer, the timestamp, a write and a flush). So where the normal
    log is twistd's text log (every observer a text file observer, checked by having
    each format a probe event), lines are formatted here, the timestamp once a second,
    and written in batches, the lines of one reactor turn (or :attr:`BATCH` bytes) at a
    time, from the disk pool when the log is an OS file: the same lines, in the same
    place. Any
    other log setup (JSON, syslog, a test's observer) gets one event per request, which
    also carries the fields as the ``access`` key.

    :param json_lines: write each line as one JSON object instead of text.
    :param logger: where to emit events (tests pass their own; then always events).
    """

    #: At the end of the reactor turn: a busy server's turn ends many requests, one
    #: write takes them all; an idle one's line is in the log at once.
    DELAY = 0.0

    def __init__(
        self,
        json_lines: bool = False,
        logger: Logger | None = None,
        clock: IReactorTime | None = None,
        pool: DiskPool | None = None,
        publisher: LogPublisher | None = None,
    ) -> None:
        self._json = json_lines
        self.log = logger or Logger(namespace=NAMESPACE)
        self._own_log = self.log if logger is None and clock is not None else None
        self._clock = clock
        self._pool = pool
        self._publisher = publisher if publisher is not None else globalLogPublisher
        self._seen: list[Any] | None = None
        self._seen_count = -1
        self._direct: _Direct | None = None
        #: Text lines, and replayed hits to be made lines: ``(time, hit, client,
        #: duration)``, formatted together when the batch is written.
        self._lines: list[str | tuple[float, Hit, str, float]] = []
        self._size = 0
        self._timer: IDelayedCall | None = None
        self._writing: Deferred[None] | None = None
        self._second = -1
        self._stamp = ""

    def _prefix(self, when: float) -> str:
        """``<time> [pkgproxy.access#info] ``, as Twisted's text log starts the line."""
        second = int(when)
        if second != self._second:
            self._second, self._stamp = second, formatTime(second) + f" [{NAMESPACE}#info] "
        return self._stamp

    def _destination(self) -> _Direct | None:
        observers: list[Any] = getattr(self._publisher, "_observers", [])
        if observers is not self._seen or len(observers) != self._seen_count:
            self._seen, self._seen_count = observers, len(observers)
            self._direct = _Direct.find(list(observers), self._prefix)
        return self._direct

    def request_done(self, record: RequestRecord) -> None:
        direct = self._destination() if self.log is self._own_log else None
        if direct is None:
            self._emit(record)
            return
        assert self._clock is not None
        if self._json:
            text = json.dumps(record_fields(record), separators=(",", ":"), ensure_ascii=True)
        else:
            text = text_line(record)
        self._add(self._prefix(self._clock.seconds()) + text + "\n")

    def hit_done(self, hit: Hit, client: str, duration: float) -> None:
        """:meth:`request_done` of ``hit.record(client, duration)``; its line is made
        when the batch is written (in one loop for the whole batch, which costs less
        than one line at a time between requests), from fixed parts made once per hit
        (in ``hit.memo``)."""
        direct = self._destination() if self.log is self._own_log else None
        if direct is None or self._json:
            self.request_done(hit.record(client, duration))
            return
        assert self._clock is not None
        self._add((self._clock.seconds(), hit, client, duration), _HIT_LINE)

    def _text(self, lines: list[str | tuple[float, Hit, str, float]]) -> list[str]:
        """The batch's lines, those of replayed hits made now."""
        out = []
        prefix = self._prefix
        for line in lines:
            if isinstance(line, tuple):
                when, hit, client, duration = line
                line = _hit_line(prefix(when), hit, client, duration, self)
            out.append(line)
        return out

    def _emit(self, record: RequestRecord) -> None:
        fields = record_fields(record)
        if self._json:
            line = json.dumps(fields, separators=(",", ":"), ensure_ascii=True)
            self.log.info("{access_json}", access_json=line, access=fields)
        else:
            # Formatted here, once: Twisted's own formatting of a ten-field format
            # string costs more than the rest of the line's trip through the log.
            line = text_line(record)
            self.log.info("{access_line}", access_line=line, access=fields)

    def flush(self) -> Deferred[None]:
        """Write the buffered lines (the text log may have changed meanwhile: then
        they go as events, each with its own line)."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._writing is not None:
            return self._writing  # the lines wait for it: batches stay in order
        batch, self._lines, self._size = self._lines, [], 0
        if not batch:
            return succeed(None)
        lines = self._text(batch)
        direct = self._direct
        if direct is None:
            for line in lines:
                self.log.info("{access_line}", access_line=line.split("] ", 1)[-1].rstrip("\n"))
            return succeed(None)
        d = direct.write(self._pool, "".join(lines))
        self._writing = d  # before the callbacks: with an inline pool they run at once

        def done(_: object) -> Deferred[None] | None:
            self._writing = None
            if self._lines and (self._size >= self.BATCH or not self.running):
                return self.flush()
            if self._lines and self._timer is None and self._clock is not None:
                self._timer = self._clock.callLater(self.DELAY, self.flush)
            return None

        d.addErrback(lambda f: self.log.failure("cannot write access log lines", f))
        d.addCallback(done)
        return d

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        super().stopService()
        return self.flush()


class AccessLogFile(_Batch, Service, Observer):
    """The access log written to a file of its own, in batches, off the reactor thread.

    A line through ``twisted.logger`` costs about 100 µs (the event, every observer, the
    log file's own formatting), more than a cache hit itself. Here a line is formatted
    once and appended to a buffer; the buffer is written by the disk pool when it holds
    :attr:`BATCH` bytes or :attr:`DELAY` seconds after its first line, and when the
    server stops. The file is opened for each write (``O_APPEND``), so after logrotate
    moves it the next write creates a new one. A write that fails is reported once in
    the normal log and its lines are counted in :attr:`dropped`.
    """

    def __init__(
        self, path: str, pool: DiskPool, clock: IReactorTime, json_lines: bool = False
    ) -> None:
        self.path = path
        self._pool = pool
        self._clock = clock
        self._json = json_lines
        self._lines: list[str] = []
        self._size = 0
        self._timer: IDelayedCall | None = None
        self._writing: Deferred[None] | None = None
        self._failing = False
        #: Lines lost to failed writes.
        self.dropped = 0
        self._log = Logger(namespace=NAMESPACE)
        self._second = -1
        self._stamp = ""

    def _time(self) -> str:
        """The line's timestamp, now (made once a second)."""
        assert self._clock is not None
        now = self._clock.seconds()
        if int(now) != self._second:
            self._second = int(now)
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now))
        return self._stamp

    def hit_done(self, hit: Hit, client: str, duration: float) -> None:
        """:meth:`request_done` of ``hit.record(client, duration)``, from the line's
        fixed parts made once per hit (in ``hit.memo``)."""
        if self._json:
            self.request_done(hit.record(client, duration))
            return
        self._add(_hit_line(self._time() + " ", hit, client, duration, self))

    def request_done(self, record: RequestRecord) -> None:
        stamp = self._time()
        if self._json:
            fields = record_fields(record)
            fields["time"] = stamp
            line = json.dumps(fields, separators=(",", ":"), ensure_ascii=True) + "\n"
        else:
            line = stamp + " " + text_line(record) + "\n"
        self._add(line)

    def flush(self) -> Deferred[None]:
        """Write what is buffered; fires once it is written (or dropped)."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._writing is not None or not self._lines:
            return self._writing or succeed(None)
        data = "".join(self._lines).encode("utf-8", "backslashreplace")
        count = len(self._lines)
        self._lines, self._size = [], 0
        d = self._pool.run(_append, self.path, data)
        self._writing = d  # before the callbacks: with an inline pool they run at once

        def written(_: object) -> None:
            self._failing = False

        def failed(f: Any) -> None:
            self.dropped += count
            if not self._failing:
                self._failing = True
                self._log.error(
                    "cannot write the access log {path}: {e}; lines are dropped until it works",
                    path=self.path,
                    e=f.getErrorMessage(),
                )

        def done(_: object) -> Deferred[None] | None:
            self._writing = None
            if self._size >= self.BATCH or (self._lines and not self.running):
                return self.flush()
            if self._lines and self._timer is None and self._clock is not None:
                self._timer = self._clock.callLater(self.DELAY, self.flush)
            return None

        d.addCallbacks(written, failed)
        d.addCallback(done)
        return d

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        super().stopService()
        return self.flush()


def _append(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
