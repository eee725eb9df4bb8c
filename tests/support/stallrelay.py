"""A CONNECT relay on 127.0.0.1 that stalls every Nth new connection, in-process.

Stands in for a network where some new connections hang in connect (dropped SYNs):
pkgproxy reaches its upstreams through it as through an outbound proxy, and a tunnel
it stalls is one whose "connect" (the relay's ``200``) comes ``stall`` seconds late.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure


class _Pipe(Protocol):
    def __init__(self, peer: _Client) -> None:
        self.peer = peer

    def connectionMade(self) -> None:
        self.peer.upstream_ready(self)

    def dataReceived(self, data: bytes) -> None:
        if self.peer.transport is not None:
            self.peer.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.peer.transport is not None:
            self.peer.transport.loseConnection()


class _PipeFactory(ClientFactory):
    noisy = False

    def __init__(self, peer: _Client) -> None:
        self.peer = peer

    def buildProtocol(self, addr: Any) -> _Pipe:
        return _Pipe(self.peer)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if self.peer.transport is not None:
            self.peer.transport.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
            self.peer.transport.loseConnection()


class _Client(Protocol):
    def __init__(self, relay: StallingRelay) -> None:
        self.relay = relay
        self.buf = b""
        self.upstream: _Pipe | None = None
        self.timer: IDelayedCall | None = None
        self.connector: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self.upstream is not None:
            assert self.upstream.transport is not None
            self.upstream.transport.write(data)
            return
        self.buf += data
        if self.timer is not None or b"\r\n\r\n" not in self.buf:
            return
        line = self.buf.split(b"\r\n", 1)[0]
        self.buf = self.buf.split(b"\r\n\r\n", 1)[1]
        host, _, port = line.split(b" ")[1].decode().rpartition(":")
        self.relay.tunnels += 1
        delay = self.relay.stall if self.relay.tunnels % self.relay.every == 0 else 0.0
        if delay:
            self.relay.stalled += 1
        self.timer = reactor.callLater(delay, self._connect, host, int(port))

    def _connect(self, host: str, port: int) -> None:
        self.connector = reactor.connectTCP(host, port, _PipeFactory(self))

    def upstream_ready(self, pipe: _Pipe) -> None:
        self.upstream = pipe
        assert self.transport is not None and pipe.transport is not None
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if self.buf:
            pipe.transport.write(self.buf)
            self.buf = b""

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseConnection()


class StallingRelay(Factory):
    """Listens on 127.0.0.1; every ``every``-th CONNECT waits ``stall`` seconds."""

    noisy = False

    def __init__(self, every: int = 5, stall: float = 5.0) -> None:
        self.every = every
        self.stall = stall
        self.tunnels = 0
        self.stalled = 0
        self.port: Any = None
        self.clients: list[_Client] = []

    def buildProtocol(self, addr: Any) -> _Client:
        client = _Client(self)
        self.clients.append(client)
        return client

    async def stop(self) -> None:
        """Stop listening, cancel stalled connects and drop every connection."""
        if self.port is not None:
            await self.port.stopListening()
        for client in self.clients:
            if client.timer is not None and client.timer.active():
                client.timer.cancel()
            if client.connector is not None and client.connector.state == "connecting":
                client.connector.stopConnecting()
            for t in (client.transport, client.upstream and client.upstream.transport):
                if t is not None:
                    t.abortConnection()  # type: ignore[attr-defined]

    def listen(self) -> int:
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        return int(self.port.getHost().port)
