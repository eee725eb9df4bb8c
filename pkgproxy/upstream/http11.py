"""A small HTTP/1.1 client for upstreams: an ``IAgent`` with its own keep-alive pool.

Twisted's ``Agent`` costs about a third of a miss's time in the reactor: a URI parse
and an endpoint and pool lookup per request, a line-by-line parser with a state machine
per header, several layers of Deferreds between the socket and the response, and the
same again for the body. A cache talks to a handful of upstreams, asks only GET and
HEAD (and passes on a small POST now and then), and wants raw bytes; this client does
exactly that: one parse of the head, one callback, and the body handed on as it comes.

What it keeps from Twisted's client, because caches meet all of it: bare-LF heads,
1xx answers skipped, HEAD/204/304 without a body, ``Content-Length``, chunked and
close-delimited bodies, ``Connection: close`` and HTTP/1.0, a retry (GET and HEAD only)
when a kept-alive connection turns out to be closed before any answer, cancellation at
any point, and the failure types the rest of pkgproxy reads (``ResponseDone``,
``PotentialDataLoss``, ``ResponseFailed``, ``ResponseNeverReceived``).
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IAgentEndpointFactory, IResponse
from zope.interface import implementer

from pkgproxy.httputil import split_origin
from pkgproxy.tcpwrite import plain_tcp, send_now

#: A response head larger than this is refused (Twisted's client allows about the same).
MAX_HEAD = 64 * 1024
_NO_BODY_CODES = (204, 304)
_RETRYABLE = (b"GET", b"HEAD")


class ProtocolError(Exception):
    """The upstream's answer is not HTTP/1.x as this client understands it."""


class _Origin:
    """What every request to one ``scheme://host:port`` shares: endpoint, Host value."""

    __slots__ = ("key", "endpoint", "host")

    def __init__(self, key: bytes, endpoint: IStreamClientEndpoint, host: bytes) -> None:
        self.key = key
        self.endpoint = endpoint
        self.host = host


@implementer(IAgent)
class Http11Agent:
    """Sends each request on an idle kept-alive connection to its origin, or a new one.

    :param endpoints: makes the endpoint of an origin (TCP, TLS), asked once per origin.
    :param max_idle: connections kept open per origin between requests.
    :param idle_timeout: seconds an unused kept connection stays open.
    """

    MAX_ORIGINS = 1024

    def __init__(
        self,
        clock: IReactorTime,
        endpoints: IAgentEndpointFactory,
        max_idle: int = 16,
        idle_timeout: float = 120.0,
    ) -> None:
        self._clock = clock
        self._endpoints = endpoints
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._origins: dict[bytes, _Origin] = {}
        self._idle: dict[bytes, list[_Connection]] = {}
        self._stopped = False

    # -- IAgent --------------------------------------------------------------------

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> Deferred[IResponse]:
        """Send one request; the Deferred fires with the response once its head is in."""
        try:
            origin, target = self._split(uri)
            head = _request_head(method, target, origin.host, headers, bodyProducer)
        except Exception:
            return fail()
        exchange = _Exchange(self, origin, method, head, bodyProducer)
        exchange.start()
        return exchange.result

    # -- pool ----------------------------------------------------------------------

    def _split(self, uri: bytes) -> tuple[_Origin, bytes]:
        """The origin of an absolute URI and its request target (path and query)."""
        key, rest = split_origin(uri)
        target = rest.split(b"#", 1)[0]
        if not target.startswith(b"/"):
            target = b"/" + target
        origin = self._origins.get(key)
        if origin is None:
            origin = self._new_origin(key)
        return origin, target

    def _new_origin(self, key: bytes) -> _Origin:
        parsed = URI.fromBytes(key + b"/")
        if parsed.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"Unsupported scheme: {parsed.scheme!r}")
        netloc = key[len(parsed.scheme) + 3 :].rpartition(b"@")[2]
        default = b":443" if parsed.scheme == b"https" else b":80"
        host = netloc[: -len(default)] if netloc.endswith(default) else netloc
        endpoint = self._endpoints.endpointForURI(parsed)
        if len(self._origins) >= self.MAX_ORIGINS:
            self._origins.clear()
        origin = self._origins[key] = _Origin(key, endpoint, host)
        return origin

    def _take(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin.key)
        while idle:
            conn = idle.pop()
            conn.leave_pool()
            if conn.usable():
                return conn
        return None

    def _give_back(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.origin.key, [])
        if self._stopped or len(idle) >= self.max_idle or not conn.usable():
            conn.close()
            return
        idle.append(conn)
        conn.enter_pool(self._clock.callLater(self.idle_timeout, conn.close))

    def _forget(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.origin.key)
        if idle and conn in idle:
            idle.remove(conn)

    def closeCachedConnections(self) -> Deferred[Any]:
        """Close every idle connection; fires once they are closed. Used at shutdown."""
        self._stopped = True
        lost = []
        for idle in self._idle.values():
            for conn in list(idle):
                lost.append(conn.lost)
                conn.close()
        self._idle.clear()
        return gatherResults(lost) if lost else succeed(None)


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(rb"[\x00-\x20\x7f]")


def _request_head(
    method: bytes, target: bytes, host: bytes, headers: Headers | None, body: Any
) -> bytes:
    # Nothing a client sent may end the request line early or add a line of its own.
    if not _TOKEN.fullmatch(method):
        raise ValueError(f"invalid method {method[:20]!r}")
    if _CONTROL.search(target) or _CONTROL.search(host):
        raise ValueError(f"control character or space in {target[:80]!r} or {host[:80]!r}")
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    has_host = False
    if headers is not None:
        for name, values in headers.getAllRawHeaders():
            if name.lower() == b"host":
                has_host = True
            for value in values:
                lines += (name, b": ", value, b"\r\n")
    if not has_host:
        lines += (b"Host: ", host, b"\r\n")
    if body is not None:
        if not isinstance(body.length, int):
            raise ValueError("a request body of unknown length is not supported")
        lines += (b"Content-Length: ", str(body.length).encode(), b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


class _Exchange:
    """One request and its response, across at most two connections (one retry)."""

    def __init__(
        self, agent: Http11Agent, origin: _Origin, method: bytes, head: bytes, body: Any
    ) -> None:
        self.agent = agent
        self.origin = origin
        self.method = method
        self.head = head
        self.body = body
        self.retryable = body is None and method in _RETRYABLE
        self.result: Deferred[IResponse] = Deferred(self._cancel)
        self._connecting: Deferred[Any] | None = None
        self._cancelled = False
        self.conn: _Connection | None = None

    def start(self) -> None:
        conn = self.agent._take(self.origin)
        if conn is not None:
            conn.send(self, reused=True)
        else:
            self._connect()

    def _connect(self) -> None:
        d = self.origin.endpoint.connect(_ConnectionFactory(self.agent, self.origin))
        self._connecting = d
        d.addCallbacks(self._connected, self._not_connected)

    def _connected(self, conn: _Connection) -> None:
        self._connecting = None
        if self.result.called:
            conn.close()  # cancelled meanwhile
            return
        conn.send(self, reused=False)

    def _not_connected(self, f: Failure) -> None:
        self._connecting = None
        if not self.result.called and not self._cancelled:
            self.result.errback(f)

    def lost_before_answer(self, conn: _Connection, reason: Failure, reused: bool) -> None:
        """The connection ended before a whole response head came."""
        self.conn = None
        if self.result.called:
            return
        if reused and self.retryable and not conn.got_bytes:
            # A kept connection the upstream had closed meanwhile: ask again, once.
            self.retryable = False
            self._connect()
            return
        if conn.got_bytes:
            self.result.errback(Failure(ResponseFailed([reason])))
        else:
            self.result.errback(Failure(ResponseNeverReceived([reason])))

    def _cancel(self, d: Deferred[IResponse]) -> None:
        # The result then fails with CancelledError, whatever the connect attempt says.
        self._cancelled = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self.conn is not None:
            self.conn.abort()


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, agent: Http11Agent, origin: _Origin) -> None:
        self._agent = agent
        self._origin = origin

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self._agent, self._origin)


# Where a connection is in its exchange.
_IDLE, _HEAD, _BODY = 0, 1, 2
# How a body ends.
_LENGTH, _CHUNKED, _CLOSE, _NONE = 0, 1, 2, 3


class _Connection(Protocol):
    """One connection to an upstream: sends a request head, parses the answer."""

    def __init__(self, agent: Http11Agent, origin: _Origin) -> None:
        self.agent = agent
        self.origin = origin
        self.lost: Deferred[None] = Deferred()
        self._state = _IDLE
        self._exchange: _Exchange | None = None
        self._response: _Response | None = None
        self._reused = False
        self._buf = b""
        self._mode = _NONE
        self._left = 0
        self._chunk_state = 0
        self._keep = True
        self._closed = False
        self._aborted = False
        self._idle_timer: IDelayedCall | None = None
        self._plain = False
        self.got_bytes = False

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self._plain = plain_tcp(transport)
        set_nodelay = getattr(transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            try:
                set_nodelay(True)
            except OSError:
                pass

    # -- pool bookkeeping ------------------------------------------------------------

    def usable(self) -> bool:
        return not self._closed and self._state == _IDLE and self._keep

    def enter_pool(self, timer: IDelayedCall) -> None:
        self._idle_timer = timer

    def leave_pool(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None

    def close(self) -> None:
        self.leave_pool()
        if not self._closed and self.transport is not None:
            self._closed = True
            self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection now: a cancelled request, a stopped body."""
        if not self._closed and self.transport is not None:
            self._closed = True
            self._aborted = True
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- request -------------------------------------------------------------------

    def send(self, exchange: _Exchange, reused: bool) -> None:
        self._exchange = exchange
        exchange.conn = self
        self._reused = reused
        self._state = _HEAD
        self._buf = b""
        self.got_bytes = False
        transport: Any = self.transport
        if self._plain:
            send_now(transport, exchange.head)
        else:
            transport.write(exchange.head)
        if exchange.body is not None:
            exchange.body.startProducing(transport)

    # -- response ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._state == _BODY:
            self._body(data)
            return
        if self._state == _IDLE or self._exchange is None:
            # Nothing was asked: an upstream that talks out of turn is not reused.
            self._keep = False
            self.agent._forget(self)
            self.close()
            return
        self.got_bytes = True
        self._buf += data
        while self._state == _HEAD:
            end, skip = _head_end(self._buf)
            if end < 0:
                if len(self._buf) > MAX_HEAD:
                    self._protocol_error("response head too large")
                return
            block, self._buf = self._buf[:end], self._buf[end + skip :]
            try:
                self._head(block)
            except (ProtocolError, ValueError) as e:  # Headers refuses a bad name too
                self._protocol_error(str(e) or type(e).__name__)
                return
        if self._state == _BODY and self._buf:
            rest, self._buf = self._buf, b""
            self._body(rest)

    def _head(self, block: bytes) -> None:
        exchange = self._exchange
        assert exchange is not None
        if exchange.result.called:  # cancelled: nobody waits for this answer
            self._keep = False
            self.abort()
            self._state = _IDLE
            return
        version, code, phrase, headers = _parse_head(block)
        if 100 <= code < 200:
            return  # 100 Continue, 103 Early Hints: the real answer follows
        length: int | object
        if exchange.method == b"HEAD" or code in _NO_BODY_CODES:
            mode, length = _NONE, 0
        else:
            mode, length = _body_mode(headers)
        tokens = b",".join(headers.getRawHeaders(b"connection", [])).lower()
        if b"close" in tokens or (version < (1, 1) and b"keep-alive" not in tokens):
            self._keep = False
        if mode == _CLOSE:
            self._keep = False
        self._mode = mode
        self._left = length if isinstance(length, int) else 0
        self._chunk_state = 0
        response = _Response(self, version, code, phrase, headers, length)
        self._response = response
        self._state = _BODY
        exchange.conn = None  # the request is answered: cancelling it does nothing now
        exchange.result.callback(response)
        if self._state == _BODY and (mode == _NONE or (mode == _LENGTH and self._left == 0)):
            if self._buf:
                self._keep = False  # a body where none belongs: do not reuse
            self._complete()

    def _body(self, data: bytes) -> None:
        response = self._response
        assert response is not None
        mode = self._mode
        if mode == _LENGTH:
            if len(data) < self._left:
                self._left -= len(data)
                response.deliver(data)
                return
            part, extra = data[: self._left], data[self._left :]
            self._left = 0
            if part:
                response.deliver(part)
            if extra:
                self._keep = False  # bytes nobody asked for: do not trust this connection
            if self._state == _BODY:
                self._complete()
        elif mode == _CLOSE:
            response.deliver(data)
        elif mode == _CHUNKED:
            self._chunks(data)
        else:
            self._keep = False

    def _chunks(self, data: bytes) -> None:
        """Chunked transfer coding (RFC 9112 §7.1), delivering data as it comes."""
        response = self._response
        assert response is not None
        buf = self._buf + data
        self._buf = b""
        pos = 0
        try:
            while self._state == _BODY:
                if self._chunk_state == 1:  # data
                    if pos >= len(buf):
                        break
                    take = buf[pos : pos + self._left]
                    pos += len(take)
                    self._left -= len(take)
                    response.deliver(take)
                    if self._left == 0:
                        self._chunk_state = 2
                    continue
                # A line: a chunk's size, the line end after its data, or a trailer.
                found = _line(buf, pos, _LINE_LIMITS[self._chunk_state])
                if found is None:
                    break
                line, pos = found
                if self._chunk_state == 0:
                    hex_size = line.split(b";", 1)[0].strip()
                    if not hex_size or hex_size.strip(_HEX):
                        raise ProtocolError(f"bad chunk size {hex_size[:20]!r}")
                    self._left = int(hex_size, 16)
                    self._chunk_state = 1 if self._left else 3
                elif self._chunk_state == 2:
                    if line:
                        raise ProtocolError("junk after chunk data")
                    self._chunk_state = 0
                elif not line:  # the empty line that ends the trailer
                    if pos < len(buf):
                        self._keep = False
                    self._complete()
                    return
        except ProtocolError as e:
            self._protocol_error(str(e))
            return
        self._buf = buf[pos:]

    def _complete(self) -> None:
        """The whole response is in: give the connection back, then end the body."""
        response = self._response
        assert response is not None
        self._state = _IDLE
        self._exchange = None
        self._response = None
        self._buf = b""
        if self._keep and not self._closed:
            self.agent._give_back(self)
        else:
            self.close()
        response.finished(Failure(ResponseDone()))

    def _protocol_error(self, why: str) -> None:
        reason = Failure(ProtocolError(why))
        exchange, response = self._exchange, self._response
        self._exchange = self._response = None
        self._state = _IDLE
        self._keep = False
        self.abort()
        if response is not None:
            response.finished(Failure(ResponseFailed([reason])))
        elif exchange is not None and not exchange.result.called:
            exchange.conn = None
            exchange.result.errback(Failure(ResponseFailed([reason])))

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self._closed = True
        self.leave_pool()
        self.agent._forget(self)
        exchange, response = self._exchange, self._response
        self._exchange = self._response = None
        state, self._state = self._state, _IDLE
        if state == _HEAD and exchange is not None:
            exchange.lost_before_answer(self, reason, self._reused)
        elif state == _BODY and response is not None:
            if self._mode == _CLOSE and not self._aborted:
                response.finished(Failure(PotentialDataLoss()))
            else:
                if self._aborted:
                    reason = Failure(ConnectionAborted())
                response.finished(Failure(ResponseFailed([reason])))
        self.lost.callback(None)

    # -- flow control for the body's reader ----------------------------------------

    def pause(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.resumeProducing()  # type: ignore[attr-defined]


_HEX = b"0123456789abcdefABCDEF"
#: How long each line of the chunked coding may get, by the state that reads it: a
#: chunk's size (with extensions), the line end after its data, a trailer line.
_LINE_LIMITS = {0: 1024, 2: 2, 3: MAX_HEAD}


def _line(buf: bytes, pos: int, limit: int) -> tuple[bytes, int] | None:
    """The line at ``pos`` (line end stripped) and where the next starts; ``None`` if
    it is not complete yet. A line longer than ``limit`` is a protocol error."""
    eol = buf.find(b"\n", pos)
    if eol < 0:
        if len(buf) - pos > limit:
            raise ProtocolError("chunked coding line too long")
        return None
    return buf[pos:eol].rstrip(b"\r").strip(), eol + 1


def _head_end(buf: bytes) -> tuple[int, int]:
    """Where a response head ends in ``buf`` (bare LF tolerated), and its terminator's
    length; ``(-1, 0)`` if it has not yet."""
    crlf = buf.find(b"\r\n\r\n")
    lf = buf.find(b"\n\n")
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf, 2
    if crlf >= 0:
        return crlf, 4
    lfcrlf = buf.find(b"\n\r\n")
    if lfcrlf >= 0:
        return lfcrlf, 3
    return -1, 0


def _parse_head(block: bytes) -> tuple[tuple[int, int], int, bytes, Headers]:
    lines = block.split(b"\n")
    status = lines[0].rstrip(b"\r")
    parts = status.split(b" ", 2)
    proto = parts[0]
    if len(parts) < 2 or not proto.startswith(b"HTTP/1.") or len(proto) != 8:
        raise ProtocolError(f"bad status line {status[:80]!r}")
    if not proto[7:8].isdigit() or len(parts[1]) != 3 or not parts[1].isdigit():
        raise ProtocolError(f"bad status line {status[:80]!r}")
    version = (1, int(proto[7:8]))
    code = int(parts[1])
    phrase = parts[2] if len(parts) > 2 else b""
    raw: dict[bytes, list[bytes]] = {}
    last: list[bytes] | None = None
    for line in lines[1:]:
        line = line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t"):
            if last is None:
                raise ProtocolError("header continuation without a header")
            last[-1] = last[-1] + b" " + line.strip()
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ProtocolError(f"bad header line {line[:80]!r}")
        last = raw.setdefault(name.lower(), [])
        last.append(value.strip())
    return version, code, phrase, Headers(raw)


def _body_mode(headers: Headers) -> tuple[int, int | object]:
    """How the body is delimited, and its length (or ``UNKNOWN_LENGTH``)."""
    te = headers.getRawHeaders(b"transfer-encoding")
    if te:
        if headers.hasHeader(b"content-length"):
            # Both: an attempt at request smuggling or a broken server (RFC 9112 §6.1).
            raise ProtocolError("both Transfer-Encoding and Content-Length")
        codings = [c.strip().lower() for c in b",".join(te).split(b",") if c.strip()]
        if codings and codings[-1] == b"chunked":
            return _CHUNKED, UNKNOWN_LENGTH
        return _CLOSE, UNKNOWN_LENGTH
    cl = headers.getRawHeaders(b"content-length")
    if cl:
        values = {v.strip() for v in b",".join(cl).split(b",")}
        if len(values) != 1:
            raise ProtocolError("conflicting Content-Length values")
        value = values.pop()
        if not value.isdigit():
            raise ProtocolError(f"bad Content-Length {value[:20]!r}")
        return _LENGTH, int(value)
    return _CLOSE, UNKNOWN_LENGTH


@implementer(IResponse)
class _Response:
    """A response whose body is handed to one protocol, buffered until it is asked for."""

    request = None
    previousResponse = None

    def __init__(
        self,
        conn: _Connection,
        version: tuple[int, int],
        code: int,
        phrase: bytes,
        headers: Headers,
        length: int | object,
    ) -> None:
        self._conn: _Connection | None = conn
        self.version = (b"HTTP", version[0], version[1])
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._reader: Protocol | None = None
        self._held: list[bytes] = []
        self._end: Failure | None = None
        self._delivered_end = False

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: Protocol) -> None:
        """Hand the body to ``protocol``: what came already at once, the rest as it comes."""
        if self._reader is not None:
            raise RuntimeError("the body of a response can be delivered once")
        self._reader = protocol
        protocol.makeConnection(self)  # type: ignore[arg-type]
        held, self._held = self._held, []
        for data in held:
            protocol.dataReceived(data)
        if self._end is not None:
            self._finish_reader()

    def deliver(self, data: bytes) -> None:
        if self._reader is None:
            self._held.append(data)
        else:
            self._reader.dataReceived(data)

    def finished(self, reason: Failure) -> None:
        self._end = reason
        self._conn = None
        if self._reader is not None:
            self._finish_reader()

    def _finish_reader(self) -> None:
        if self._delivered_end:
            return
        self._delivered_end = True
        assert self._reader is not None and self._end is not None
        self._reader.connectionLost(self._end)

    # -- the body reader's transport: flow control over the connection until the body is
    # whole (after that the connection may already be serving another request)

    def pauseProducing(self) -> None:
        if self._conn is not None:
            self._conn.pause()

    def resumeProducing(self) -> None:
        if self._conn is not None:
            self._conn.resume()

    def stopProducing(self) -> None:
        if self._conn is not None:
            self._conn.abort()

    loseConnection = stopProducing
