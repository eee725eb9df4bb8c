"""The hit path: answering a repeated cache hit without twisted.web's request machinery.

A small cache hit costs about 150 µs of CPU through twisted.web (the ``Request``
object, header parsing and encoding, ``notifyFinish``, the resource) and about a third
of that when the answer is written straight to the transport. So the first time the
resource answers a plain ``GET`` with a complete cache hit, it records the answer's
header block here (:meth:`HitPath.remember`); the next identical request (same target,
``Host`` and ``Accept``, nothing else that could change the answer) is answered from
that record by :class:`ProxyChannel` before twisted.web parses it. Request heads are
kept parsed by their bytes (clients ask again in the same bytes), and a replayed hit is
reported to the observer as a :class:`~pkgproxy.observe.Hit` made once per head and
record, so a repeated hit costs little more than a dictionary lookup and a ``send``.

Nothing is decided here: the resource decides, and this replays only its decision, and
only while it still holds. A record is dropped as soon as its cache entry is no longer
the current one (evicted, purged, replaced), an index taught the family something new
(the entry might no longer match it), an index of its family is being read, or, for an
index with a lifetime, the entry is no longer fresh. Anything else (a ``Range``, a
condition, ``Cache-Control``, a body, ``Connection: close``, HTTP/1.0, a request in an
intercepted tunnel) goes to twisted.web as before. Both paths report to the same
observer, so the access log and the metrics cannot tell them apart.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.server import Request

from pkgproxy.cache.keys import split_key
from pkgproxy.cache.store import CacheStore, Entry
from pkgproxy.config.model import Route
from pkgproxy.learning import Learner
from pkgproxy.observe import Hit, Observer
from pkgproxy.tcpwrite import plain_tcp, send_now
from pkgproxy.web.routing import valid_host

#: Request headers that cannot change a hit's answer. ``Accept`` can (the PyPI, npm and
#: OCI families answer by it) and is part of a record's key; anything not named here
#: sends the request to twisted.web.
_NEUTRAL = frozenset(
    {b"host", b"user-agent", b"accept", b"accept-encoding", b"accept-language", b"connection"}
)

#: Records kept; past this the oldest half is forgotten (a record is cheap to remake).
MAX_RECORDS = 20_000

#: Request heads kept parsed (the hits of recent clients), and the longest one kept: a
#: client asks for the same file in the same bytes again. Past this many, all are
#: forgotten.
MAX_HEADS = 4096
MAX_HEAD_BYTES = 1024

#: ``(target, host, accept, accept-encoding)``: a rewritten document's gzip form is
#: its own answer.
_Key = tuple[bytes, bytes, bytes, bytes]


@dataclass(eq=False)
class _Record:
    """One hit's answer, as the resource gave it."""

    entry: Entry
    head: bytes  # status line and headers, Date excepted, each line ending in CRLF
    path: str
    route: Route
    #: The facts' generation the decision was made in.
    generation: int
    #: An index with a lifetime: the answer holds only while its entry is fresh (read
    #: from the entry each time: a 304 extends it, a companion's change ends it).
    fresh_only: bool
    #: The body, when it is kept in memory.
    body: bytes | None
    #: The path below the route (what an index being read may list).
    route_path: str
    #: Tells this record from any other made before or after it.
    serial: int = field(default_factory=itertools.count().__next__)


class HitPath:
    """Records of recent hits, and the replay of them."""

    def __init__(
        self,
        store: CacheStore,
        learner: Learner,
        observer: Observer,
        clock: IReactorTime,
        memory: int = 16 * 1024**2,
    ) -> None:
        self._memory = memory
        #: Bytes of bodies held by records.
        self.kept = 0
        self._store = store
        self._learner = learner
        self._observer = observer
        self._clock = clock
        self._records: dict[_Key, _Record] = {}
        self._heads: dict[bytes, _Head] = {}
        self._date_second = -1
        self._date = b""
        #: Requests answered here since start.
        self.answered = 0

    def __len__(self) -> int:
        return len(self._records)

    # -- recording (the resource) ------------------------------------------------------

    def remember(
        self, request: Request, entry: Entry, route: Route, fresh_only: bool, body: bytes
    ) -> None:
        """Keep the answer ``request`` is about to get, if it can be replayed.

        Called with every header set and before ``body`` (the entry's whole content) is
        written. ``fresh_only`` is for an index, whose decision holds only while its
        entry is fresh; other content stays valid as long as its entry does.
        The body is kept too while :attr:`kept` allows; the longest-kept records go
        first to make room (a record still in use is made again by its next hit).
        """
        key = _request_key(request)
        if key is None or request.code != http.OK:
            return
        lines = [b"HTTP/1.1 200 OK\r\n"]
        for name, values in request.responseHeaders.getAllRawHeaders():
            if name.lower() == b"date":
                continue
            for value in values:
                lines.append(name + b": " + value + b"\r\n")
        self._drop(key)
        if len(self._records) >= MAX_RECORDS:
            for old in list(self._records)[: MAX_RECORDS // 2]:
                self._drop(old)
        keep = len(body) <= self._memory
        if keep:
            while self.kept + len(body) > self._memory:
                self._drop(next(iter(self._records)))
            self.kept += len(body)
        self._records[key] = _Record(
            entry,
            b"".join(lines),
            self._store.path_of(entry),
            route,
            self._learner.facts.generation,
            fresh_only,
            body if keep else None,
            split_key(entry.key)[1],
        )

    def _drop(self, key: _Key) -> None:
        record = self._records.pop(key, None)
        if record is not None and record.body is not None:
            self.kept -= len(record.body)

    # -- replay (the channel) ----------------------------------------------------------

    def answer(self, channel: Any, head: bytes) -> bool:
        """Answer one request head (without its final blank line) if a record holds.

        :return: False to leave the request to twisted.web, untouched.
        """
        parsed = self._heads.get(head)
        if parsed is None:
            parsed = _Head.parse(head)
            if parsed is None:
                return False
            if len(head) <= MAX_HEAD_BYTES:
                if len(self._heads) >= MAX_HEADS:
                    self._heads.clear()
                self._heads[head] = parsed
        if parsed.lines > getattr(channel, "maxHeaders", 100):
            return False
        key = parsed.key
        record = self._records.get(key)
        if record is None:
            return False
        now = self._clock.seconds()
        entry = record.entry
        if (
            record.generation != self._learner.facts.generation
            or (record.fresh_only and (entry.expires is None or now >= entry.expires))
            or self._store.get(entry.key) is not entry
            or self._learner.busy(record.route, record.route_path)
        ):
            self._drop(key)
            return False
        body = b""
        if parsed.get:
            body = record.body  # type: ignore[assignment]
            if body is None:
                try:
                    body = _read_whole(record.path, entry.size)
                except OSError:
                    # The resource decides what an unreadable cache file means.
                    self._drop(key)
                    return False
        second = int(now)
        if second != self._date_second:
            self._date_second = second
            self._date = b"Date: " + http.datetimeToString(second) + b"\r\n\r\n"
        transport = channel.transport
        data = b"".join((record.head, self._date, body))
        if plain_tcp(transport):
            send_now(transport, data)
        else:
            transport.write(data)
        self.answered += 1
        hit = parsed.hit
        if hit is None or parsed.hit_of != record.serial:
            hit = parsed.hit_for(record, len(body))
        self._observer.hit_done(hit, channel.pkgproxy_peer, self._clock.seconds() - now)
        return True


class _Head:
    """A request head the hit path may answer, parsed (kept per head: a client asks
    again in the same bytes)."""

    __slots__ = ("get", "hit", "hit_of", "key", "lines", "method", "target", "agent")

    def __init__(self, method: bytes, target: bytes, key: _Key, agent: bytes, lines: int) -> None:
        self.get = method == b"GET"
        self.method = method
        self.target = target
        self.agent = agent
        self.key = key
        #: Header lines: a channel allowing fewer leaves the request to twisted.web.
        self.lines = lines
        #: What the last answer reported, and the record it answered from.
        self.hit: Hit | None = None
        self.hit_of = -1

    @classmethod
    def parse(cls, head: bytes) -> _Head | None:
        parsed = _parse_head(head, len(head))  # the channel's cap is checked per answer
        if parsed is None:
            return None
        method, target, host, accept, agent, coding = parsed
        return cls(method, target, (target, host, accept, coding), agent, head.count(b"\r\n"))

    def hit_for(self, record: _Record, sent: int) -> Hit:
        """What an answer from ``record`` reports."""
        self.hit_of = record.serial
        self.hit = Hit(
            self.method.decode("latin-1"),
            self.target.decode("latin-1"),
            sent,
            record.route.name,
            record.route.family,
            self.agent.decode("latin-1"),
        )
        return self.hit


def _request_key(request: Request) -> _Key | None:
    """A twisted.web request's record key, or ``None`` if its answer is not replayable."""
    if request.method != b"GET" or request.clientproto != b"HTTP/1.1":
        return None
    if getattr(request.channel, "pkgproxy_tunnel", None) is not None:
        return None
    host = accept = coding = b""
    for name, values in request.requestHeaders.getAllRawHeaders():
        lower = name.lower()
        if lower not in _NEUTRAL:
            return None
        if lower == b"connection":
            if any(v.strip().lower() != b"keep-alive" for v in values):
                return None
        elif lower == b"host":
            if len(values) != 1:
                return None
            host = values[0]
        elif lower == b"accept":
            accept = b", ".join(values)
        elif lower == b"accept-encoding":
            coding = b", ".join(values)
    return (request.uri, host, accept, coding)


#: What the hit path accepts, byte for byte: a request line ``GET|HEAD SP target SP
#: HTTP/1.1`` with a target of visible ASCII, then header lines whose names are tokens
#: and whose values are visible ASCII, spaces and tabs, every line ending in CRLF. A
#: bare CR or LF, a NUL or other control byte, obs-text, a folded line, a space before
#: the colon, anything after the version: not this path's to judge (twisted.web's).
_REQUEST_LINE = re.compile(rb"(GET|HEAD) ([\x21-\x7e]+) HTTP/1\.1")
_HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*((?:[\x21-\x7e][\x20-\x7e\t]*)?)")


def _parse_head(
    head: bytes, max_headers: int = 100
) -> tuple[bytes, bytes, bytes, bytes, bytes, bytes] | None:
    """``(method, target, host, accept, user agent, accept-encoding)`` of a plain GET or
    HEAD, else None.

    Strict on purpose: the hit path takes only a subset of what twisted.web parses the
    same way (one request, no body, ending at the blank line); whatever is unusual
    (another method or version, a header not known to be neutral, a folded line, a
    body, a byte RFC 9112 does not allow where it is) is twisted.web's to parse and
    refuse.
    """
    lines = head.split(b"\r\n")
    first = _REQUEST_LINE.fullmatch(lines[0])
    if first is None or len(lines) - 1 > max_headers:
        return None
    method, target = first.groups()
    host: bytes | None = None
    agent = b""
    accepts: list[bytes] = []
    codings: list[bytes] = []
    for line in lines[1:]:
        header = _HEADER_LINE.fullmatch(line)
        if header is None:
            return None
        name, value = header.groups()
        lower = name.lower()
        if lower not in _NEUTRAL:
            return None
        value = value.rstrip(b" \t")
        if lower == b"host":
            if host is not None or not valid_host(value):
                return None
            host = value
        elif lower == b"accept":
            accepts.append(value)
        elif lower == b"accept-encoding":
            codings.append(value)
        elif lower == b"user-agent":
            agent = value
        elif lower == b"connection" and value.lower() != b"keep-alive":
            return None
    if not host:
        return None
    return method, target, host, b", ".join(accepts), agent, b", ".join(codings)


def _read_whole(path: str, size: int) -> bytes:
    """A small cache file, all of it; a short read is an error, never a short body."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    if len(data) != size:
        raise OSError(f"short read: {len(data)} of {size} bytes")
    return data
