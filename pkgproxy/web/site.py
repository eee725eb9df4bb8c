"""The HTTP ``Site``: Twisted's, without its access log, with a cap on request bodies.

* Twisted's ``Site`` writes its own combined-log line per request. pkgproxy's access log
  (:mod:`pkgproxy.admin.accesslog`) says more (cache result, upstream time), so the
  ``Site`` keeps quiet and each request is logged exactly once, or not at all when the
  access log is switched off.
* Twisted spools every request body, of any size, to memory or a temp file before a
  resource sees the request. pkgproxy accepts bodies only for small admin actions, so a
  larger one is answered with 413 and the connection closed as soon as its length is
  known (or, when chunked, as soon as it passes the cap).
"""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request, Site

#: The largest request body accepted (admin actions send a few form fields at most).
MAX_REQUEST_BODY = 64 * 1024

_TOO_LARGE = (
    b"HTTP/1.1 413 Content Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\n"
    b"content-length: %d\r\n"
    b"\r\n"
    b"%s"
)


class CappedRequest(Request):
    """A ``Request`` that refuses a body larger than :data:`MAX_REQUEST_BODY`."""

    _refused = False
    _body_left = MAX_REQUEST_BODY

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


class ProxySite(Site):
    """pkgproxy's ``Site``: no Twisted access log, request bodies capped."""

    requestFactory = CappedRequest

    def startFactory(self) -> None:
        """Skip Twisted's log file and its once-a-second log-timestamp timer."""

    def log(self, request: object) -> None:
        """Nothing: the access log observer writes the request's one line."""

    def buildProtocol(self, addr: Any) -> Any:
        """The usual HTTP channel, which first refuses a TLS handshake out loud.

        A client that speaks TLS to this plain-HTTP port (Go's registry clients try
        https:// first when told to skip verification) would otherwise wait for its
        handshake to time out; a plain 400 makes it fall back to http:// at once.
        """
        protocol = super().buildProtocol(addr)
        if protocol is None:
            return None
        original = protocol.dataReceived
        state = {"first": True}

        def data_received(data: bytes) -> None:
            if state["first"] and data:
                state["first"] = False
                if data[:1] == b"\x16":  # a TLS record: the start of a ClientHello
                    protocol.transport.write(_TLS_ON_PLAIN_PORT)
                    protocol.transport.loseConnection()
                    return
            original(data)

        protocol.dataReceived = data_received
        return protocol


_TLS_MESSAGE = b"pkgproxy: this port speaks plain HTTP, not TLS\n"
_TLS_ON_PLAIN_PORT = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_TLS_MESSAGE), _TLS_MESSAGE)
)
