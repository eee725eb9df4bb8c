"""The HTTP ``Site``: Twisted's, without its access log, with a cap on request bodies.

* Twisted's ``Site`` writes its own combined-log line per request. pkgproxy's access log
  (:mod:`pkgproxy.admin.accesslog`) says more (cache result, upstream time), so the
  ``Site`` keeps quiet and each request is logged exactly once, or not at all when the
  access log is switched off.
* Twisted spools every request body, of any size, to memory or a temp file before a
  resource sees the request. pkgproxy accepts bodies only for small admin actions, so a
  larger one is answered with 413 and the connection closed as soon as its length is
  known (or, when chunked, as soon as it passes the cap).
* Twisted accepts 500 headers per request; every channel here gets the caps of
  ``[limits]`` instead, and a header line longer than the whole header budget is
  refused with a 431 rather than Twisted's silent disconnect.
* Twisted restarts its idle timer on every byte, so a client trickling a byte a second
  could hold a connection for hours; here a request (head and body) must arrive within
  ``limits.request_head_timeout`` of its first byte, or it is answered 408 and closed.
* Framing that twisted.web would take but RFC 9112 refuses is answered 400 and the
  connection closed: a ``Transfer-Encoding`` other than one ``chunked``, no ``Host`` in
  an HTTP/1.1 request (CONNECT aside: its target is the authority), more than one
  ``Host``, or a ``Host`` that is not an ASCII host name and port.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from pkgproxy.config.model import LimitsConfig
from pkgproxy.tcpwrite import flush, no_delay
from pkgproxy.web.fast import HitPath
from pkgproxy.web.routing import valid_host

#: The largest request body accepted: admin actions send a few form fields, and the only
#: POSTs relayed upstream are npm's audit requests (a compressed list of packages).
MAX_REQUEST_BODY = 1024 * 1024

_TOO_LARGE = (
    b"HTTP/1.1 413 Content Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\n"
    b"content-length: %d\r\n"
    b"\r\n"
    b"%s"
)


class CappedRequest(Request):
    """A ``Request`` that refuses a body larger than :data:`MAX_REQUEST_BODY`, and can
    answer with a body that ends with the connection (:meth:`close_delimited`)."""

    _refused = False
    _body_left = MAX_REQUEST_BODY
    _close_delimited = False

    def close_delimited(self) -> None:
        """Send this response's body with neither a length nor chunks, ending it by
        closing the connection.

        For an upstream body that ended so: nothing proves it complete, so the client
        is promised no more than the upstream promised (a chunked response's last chunk
        would say it is whole). Call before the first write.
        """
        self._close_delimited = True

    def write(self, data: bytes) -> None:
        if self._close_delimited and not self.startedWriting and not self.finished:
            channel: Any = self.channel
            if channel is not None and not self._disconnected:
                self.startedWriting = 1
                self.responseHeaders.setRawHeaders(b"connection", [b"close"])
                channel.persistent = False
                channel.writeHeaders(
                    self.clientproto, b"%d" % self.code, self.code_message, self.responseHeaders
                )
                if self.method == b"HEAD":
                    return
        super().write(data)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_REQUEST_BODY:
            # Not even a temp file for it; and no "100 Continue" invitation either.
            self.requestHeaders.removeHeader(b"expect")
            super().gotLength(0)
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_left -= len(data)
        if self._body_left < 0:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return  # answered already; the connection is closing
        super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self._refused = True
        message = b"pkgproxy: request bodies are limited to %d bytes\n" % MAX_REQUEST_BODY
        channel = self.channel
        if channel is not None and channel.transport is not None:
            channel.transport.write(_TOO_LARGE % (len(message), message))
            channel.loseConnection()


class ProxyChannel(HTTPChannel):
    """Twisted's HTTP/1.1 channel, with the hit path in front and TLS refused out loud.

    While the channel is between requests (nothing buffered, nothing being answered),
    each complete request head that arrives is first offered to the
    :class:`~pkgproxy.web.fast.HitPath`; what it does not answer, and everything after
    it, goes through twisted.web unchanged. Pipelined requests keep their order: the
    hit path answers them one after the other from the start of the data at hand, and
    only while no earlier answer is pending; the first one it cannot answer is
    twisted.web's, with all that follows it.

    A client that speaks TLS to this plain-HTTP port (Go's registry clients try https://
    first when told to skip verification) would otherwise wait for its handshake to
    time out; a plain 400 makes it fall back to http:// at once.
    """

    hit_path: HitPath | None = None
    pkgproxy_peer = "-"
    #: The origin (``https://host[:port]``) of the intercepted tunnel this connection
    #: carries, once a CONNECT to a routed host made it one (:mod:`pkgproxy.web.connect`);
    #: requests inside it name that origin, and the hit path leaves them alone.
    pkgproxy_tunnel: str | None = None
    _first_data = True
    #: Seconds a request may take to arrive, from its first byte; ``None``: no limit.
    request_timeout: float | None = LimitsConfig.request_head_timeout
    _request_deadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        transport: Any = self.transport
        self.pkgproxy_peer = getattr(transport.getPeer(), "host", "-")
        no_delay(transport)

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        if self._first_data and data:
            self._first_data = False
            if data[:1] == b"\x16":  # a TLS record: the start of a ClientHello
                transport.write(_TLS_ON_PLAIN_PORT)
                transport.loseConnection()
                return
        hits = self.hit_path
        if hits is not None and self._between_requests():
            limit = self.totalHeadersSize
            while True:
                end = data.find(b"\r\n\r\n", 0, limit + 4)
                if end < 0 or not hits.answer(self, data[:end]):
                    break
                self.resetTimeout()
                data = data[end + 4 :]
                if not data or self._waitingForTransport or transport.disconnecting:
                    break
            if not data:
                return
        super().dataReceived(data)
        self._watch_request()

    def _watch_request(self) -> None:
        """Arm the request deadline while a request is arriving; disarm it otherwise."""
        transport: Any = self.transport
        arriving = (
            _CHANNEL_STATE_KNOWN
            and not self._handlingRequest
            and transport is not None
            and not transport.disconnecting
            and (
                bool(self._buffer)
                or not self.line_mode
                or getattr(self, "_HTTPChannel__first_line", 1) == 0
            )
        )
        deadline = self._request_deadline
        if arriving and deadline is None and self.request_timeout:
            self._request_deadline = self.callLater(self.request_timeout, self._too_slow)
        elif not arriving and deadline is not None:
            self._request_deadline = None
            if deadline.active():
                deadline.cancel()

    def _too_slow(self) -> None:
        """The request did not arrive in time: 408, and the connection closed."""
        self._request_deadline = None
        transport: Any = self.transport
        if transport is None or transport.disconnecting:
            return
        transport.write(_REQUEST_TIMEOUT)
        self.timeoutConnection()  # closes, and aborts if the client does not let go

    def allHeadersReceived(self) -> None:
        request = self.requests[-1]
        problem = _framing_problem(request.requestHeaders, self._command, self._version)
        if problem is None:
            super().allHeadersReceived()
            return
        # Answered here; the request object is never run (the connection is closing).
        request._refused = True
        self.length = 0
        message = b"pkgproxy: %s\n" % problem
        transport: Any = self.transport
        transport.write(_BAD_REQUEST % (len(message), message))
        self.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        deadline, self._request_deadline = self._request_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()
        super().connectionLost(reason)

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        flush(self.transport)
        self._watch_request()

    def _between_requests(self) -> bool:
        """Whether twisted.web holds nothing of this connection: no request, no bytes."""
        return bool(
            _CHANNEL_STATE_KNOWN
            and not self.requests
            and not self._handlingRequest
            and self.line_mode
            and not self._buffer
            and not self._busyReceiving
            and self.persistent
            and not self._waitingForTransport
            and getattr(self, "_HTTPChannel__first_line", 0) == 1
            and self.pkgproxy_tunnel is None
        )


def _framing_problem(headers: Any, method: bytes, version: bytes) -> bytes | None:
    """Why a request head's framing or ``Host`` is refused (RFC 9112), or ``None``.

    twisted.web has already refused a ``Content-Length`` that is not digits, two of
    them, and a ``Content-Length`` with a ``Transfer-Encoding``; it lets through a
    ``Transfer-Encoding: identity`` (alone or after ``chunked``), which a front proxy
    may read differently.
    """
    codings = headers.getRawHeaders(b"transfer-encoding")
    if codings is not None and (len(codings) != 1 or codings[0].lower() != b"chunked"):
        return b"Transfer-Encoding must be exactly 'chunked'"
    hosts = headers.getRawHeaders(b"host")
    if hosts is None:
        if version == b"HTTP/1.1" and method != b"CONNECT":
            return b"an HTTP/1.1 request needs a Host header"
        return None
    if len(hosts) != 1:
        return b"more than one Host header"
    if not valid_host(hosts[0]):
        return b"Host is not an ASCII host name and port"
    return None


#: The hit path reads a few of HTTPChannel's attributes to know the channel is idle; a
#: Twisted without them gets no hit path rather than a wrong one.
_CHANNEL_STATE_KNOWN = all(
    hasattr(HTTPChannel(), name)
    for name in (
        "requests",
        "_handlingRequest",
        "line_mode",
        "_buffer",
        "_busyReceiving",
        "persistent",
        "_waitingForTransport",
        "_HTTPChannel__first_line",
    )
)


class ProxySite(Site):
    """pkgproxy's ``Site``: no Twisted access log, request bodies and headers capped.

    :ivar max_header_bytes: the request line and header block together; more is
        answered with 400 (431 for one over-long line) and the connection closed.
    :ivar max_headers: header lines per request; more is a 400 and a closed connection.
    """

    requestFactory = CappedRequest
    protocol = ProxyChannel  # type: ignore[assignment]
    #: Replays repeated cache hits below twisted.web; ``None`` turns that off.
    hit_path: HitPath | None = None
    max_header_bytes = LimitsConfig.max_header_bytes
    max_headers = LimitsConfig.max_headers
    #: Seconds from a request's first byte to its last; ``None``: no limit.
    request_timeout: float | None = LimitsConfig.request_head_timeout

    def startFactory(self) -> None:
        """Skip Twisted's log file and its once-a-second log-timestamp timer."""

    def log(self, request: object) -> None:
        """Nothing: the access log observer writes the request's one line."""

    def buildProtocol(self, addr: Any) -> Any:
        """A :class:`ProxyChannel` with this site's caps and hit path."""
        channel = super().buildProtocol(addr)
        if channel is None:
            return None
        self._limit(channel)
        channel.hit_path = self.hit_path
        return channel

    def _limit(self, channel: Any) -> None:
        """Give one ``HTTPChannel`` this site's header caps.

        Twisted checks ``totalHeadersSize`` and ``maxHeaders`` itself (a bare 400, then
        close). A single line longer than its ``MAX_LENGTH`` would instead be dropped
        with the connection and no answer, so that limit is the whole budget and the
        answer a 431 that says why.
        """
        channel.totalHeadersSize = self.max_header_bytes
        channel.request_timeout = self.request_timeout
        channel.maxHeaders = self.max_headers
        channel.MAX_LENGTH = self.max_header_bytes

        def line_too_long(line: bytes) -> None:
            if channel.transport is not None:
                channel.transport.write(_HEADERS_TOO_LARGE)
                channel.transport.loseConnection()

        channel.lineLengthExceeded = line_too_long


_HEADERS_MESSAGE = b"pkgproxy: request header line too long\n"
_HEADERS_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_HEADERS_MESSAGE), _HEADERS_MESSAGE)
)
_BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)
_TIMEOUT_MESSAGE = b"pkgproxy: the request did not arrive in time\n"
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_TIMEOUT_MESSAGE), _TIMEOUT_MESSAGE)
)
_TLS_MESSAGE = b"pkgproxy: this port speaks plain HTTP, not TLS\n"
_TLS_ON_PLAIN_PORT = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_TLS_MESSAGE), _TLS_MESSAGE)
)
