"""Blind ``CONNECT`` tunnels, only to the ``host:port`` pairs an operator listed.

Some clients need an https:// host pkgproxy cannot cache (a git server a build also
clones from, a license check) and can only have one proxy setting. For exactly those
hosts (``[tls_intercept] tunnel``) pkgproxy relays bytes both ways without looking at
them: nothing is cached, nothing is decrypted, and no certificate of pkgproxy's is
involved. Any other host is still refused; pkgproxy does not become an open proxy.

Once the upstream connection is up, the client's HTTP channel is taken over: its
``dataReceived`` and ``connectionLost`` go to the relay (as Twisted's own websocket
upgrade does), and each transport is registered as the producer of the other, so a
slow reader on one side pauses reading on the other (the flow control of
``twisted.protocols.portforward``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import NOT_DONE_YET, Request

log = Logger()

#: Makes the endpoint a tunnel connects through: ``HostnameEndpoint`` in production
#: (built in :mod:`pkgproxy.tap`, which owns the reactor).
Connector = Callable[[str, int], IStreamClientEndpoint]


class _Side(Protocol):
    """One end of a tunnel: what it receives is written to the other end.

    Bytes that arrive before the other end is attached (a server that speaks first) are
    held until it is.
    """

    def __init__(self) -> None:
        self.peer: _Side | None = None
        self.closed = False
        self._early: list[bytes] = []
        #: Told of every byte relayed and of the end (the tunnel's idle watch).
        self.watch: _IdleWatch | None = None

    def attach(self, peer: _Side) -> None:
        """Start relaying to ``peer``, first what arrived before."""
        self.peer = peer
        early, self._early = self._early, []
        for data in early:
            self.dataReceived(data)
        if self.closed:
            self._close_peer()

    def dataReceived(self, data: bytes) -> None:
        peer = self.peer
        if self.watch is not None:
            self.watch.active()
        if peer is None:
            self._early.append(data)
        elif peer.transport is not None and not peer.closed:
            peer.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        if self.watch is not None:
            self.watch.stop()
        self._close_peer()

    def _close_peer(self) -> None:
        # loseConnection, not abort: what one side sent before closing is still delivered.
        peer = self.peer
        if peer is not None and not peer.closed and peer.transport is not None:
            peer.transport.loseConnection()


class _IdleWatch:
    """Closes both ends of a tunnel that relayed nothing either way for ``idle`` seconds.

    A tunnel holds two connections and two file descriptors; one abandoned by a client
    that vanished without a FIN would hold them for good.
    """

    def __init__(self, clock: IReactorTime, idle: float, ends: tuple[_Side, _Side]) -> None:
        self._clock = clock
        self._idle = idle
        self._ends = ends
        self._last = clock.seconds()
        self._timer: IDelayedCall | None = clock.callLater(idle, self._check)

    def active(self) -> None:
        """Bytes went through (cheap: the timer is moved only when it fires)."""
        self._last = self._clock.seconds()

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _check(self) -> None:
        quiet = self._clock.seconds() - self._last
        if quiet < self._idle:
            self._timer = self._clock.callLater(self._idle - quiet, self._check)
            return
        self._timer = None
        log.info("closing a tunnel idle for {idle:.0f}s", idle=quiet)
        for end in self._ends:
            transport: Any = end.transport
            if transport is not None and not end.closed:
                transport.abortConnection()


class _OneProtocol(Factory):
    """Builds the one protocol made before connecting (so a cancel can reach it)."""

    noisy = False  # no "Starting factory" log lines for every tunnel

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


class BlindTunnels:
    """Opens tunnels to the listed ``(host, port)`` pairs; see the module docstring.

    :param allowed: ``(host, port)``, host in lower case (as the config gives them).
    :param connector: makes the endpoint of one ``(host, port)``.
    :param idle: a tunnel that relays nothing either way this long is closed (with a
        ``clock`` to tell the time; without one, never).
    """

    def __init__(
        self,
        allowed: Iterable[tuple[str, int]],
        connector: Connector,
        clock: IReactorTime | None = None,
        idle: float = 600.0,
    ) -> None:
        self._allowed = frozenset(allowed)
        self._connector = connector
        self._clock = clock
        self._idle = idle

    def allowed(self, host: str, port: int) -> bool:
        """Whether ``host:port`` is on the operator's list (exact match only)."""
        return (host.lower(), port) in self._allowed

    def open(self, request: Request, host: str, port: int) -> int:
        """Connect to ``host:port``, then answer 200 and relay; 502 if it cannot connect.

        The HTTP channel buffers anything the client sends meanwhile; that is relayed
        first.
        """
        upstream = _Side()
        d = self._connector(host, port).connect(_OneProtocol(upstream))
        gone: list[bool] = []

        def client_gone(_: object) -> None:
            gone.append(True)
            d.cancel()

        request.notifyFinish().addErrback(client_gone)

        def connected(_: object) -> None:
            if gone:
                if upstream.transport is not None:
                    upstream.transport.loseConnection()
                return
            self._relay(request, upstream)

        def failed(f: Failure) -> None:
            if gone:
                return
            reason = " ".join(f.getErrorMessage().split())
            log.info("tunnel to {host}:{port} failed: {why}", host=host, port=port, why=reason)
            _answer(request, http.BAD_GATEWAY, f"cannot open a tunnel to {host}:{port}: {reason}")

        d.addCallbacks(connected, failed)
        return NOT_DONE_YET

    def _relay(self, request: Request, upstream: _Side) -> None:
        channel: Any = request.channel
        client_transport: Any = channel.transport
        upstream_transport: Any = upstream.transport
        client = _Side()
        client_transport.write(b"HTTP/1.1 200 Connection established\r\nVia: 1.1 pkgproxy\r\n\r\n")
        request.startedWriting = 1  # answered above, outside the Request's own framing
        # What the client sent after its CONNECT: buffered by the channel while the
        # request was handled, or (when the connection came up at once) still unparsed
        # in its line buffer. Private to Twisted's HTTPChannel and LineReceiver, as the
        # websocket upgrade's own takeover is.
        pending = b"".join(channel._dataBuffer) + channel._buffer
        channel._dataBuffer = []
        channel._buffer = b""
        # From here on the channel's bytes are the tunnel's. requestDone (below) calls
        # self.dataReceived for what it buffered, which is now the relay too.
        channel.dataReceived = client.dataReceived
        channel.connectionLost = client.connectionLost
        client.makeConnection(client_transport)
        # The channel was the client transport's producer; the upstream transport takes
        # its place, and the client transport becomes the upstream's: a full write
        # buffer on either side pauses reading on the other.
        client_transport.unregisterProducer()
        client_transport.registerProducer(upstream_transport, True)
        upstream_transport.registerProducer(client_transport, True)
        if self._clock is not None:
            client.watch = upstream.watch = _IdleWatch(self._clock, self._idle, (client, upstream))
        client.attach(upstream)
        upstream.attach(client)
        channel.persistent = True  # else finishing the request closes the connection
        request.finish()  # the access log sees the 200; the channel stays quiet
        channel.setTimeout(None)  # a tunnel may idle longer than an HTTP connection
        if pending:
            client.dataReceived(pending)


def _answer(request: Request, code: int, message: str) -> None:
    """A one-line plain-text error, and the end of the request."""
    body = f"pkgproxy: {message}\n".encode()
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"content-length", str(len(body)).encode())
    request.setHeader(b"via", b"1.1 pkgproxy")
    request.write(body)
    request.finish()
