"""The floor of a Twisted proxy on misses: what no cache written on this reactor can beat.

Relays ``GET /origin/<path>`` to the harness's origin over pooled keep-alive
connections and nothing else: no HTTP framework, no routing, no checks, no single
flight, no index. With ``--store DIR`` every body is also hashed (SHA-256) and written
durably (temporary file, fsync, rename, directory fsync) in one thread, after its client
has it, as a cache must before it can serve the file again.

Only for the benchmark's fan-out: it trusts its clients and its origin completely (one
request per connection at a time, ``Content-Length`` bodies only) and holds each body
whole in memory, so its memory and CPU over a harness run (which also fetches the
200 MiB files once) mean nothing. ``docs/bench/run.sh`` runs
it next to pkgproxy when ``FLOOR=1``.

    python3 docs/bench/floor.py PORT [--store DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import queue
import threading
from typing import Any

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import protocol, reactor  # noqa: E402

ORIGIN = ("127.0.0.1", int(os.environ.get("ORIGIN_PORT", "28080")))
_idle: list[_Upstream] = []
_names = itertools.count()
_store_dir: str | None = None
_to_store: queue.SimpleQueue[bytes] = queue.SimpleQueue()


def _storer() -> None:
    """One thread writes every body, in order (a pool of them would only contend)."""
    while True:
        _store(_to_store.get())


def _store(body: bytes) -> None:
    """Hash and write one body durably, as a cache's commit does."""
    assert _store_dir is not None
    digest = hashlib.sha256(body).hexdigest()
    temp = f"{_store_dir}/tmp/{os.getpid()}.{next(_names)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temp, f"{_store_dir}/data/{digest}")
    dfd = os.open(f"{_store_dir}/data", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class _Upstream(protocol.Protocol):
    client: _Client | None = None

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]

    def send(self, client: _Client, path: bytes) -> None:
        self.client, self._head, self._left, self._body = client, b"", -1, []
        self.transport.write(  # type: ignore[union-attr]
            b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nAccept-Encoding: identity\r\n\r\n"
            % (path, ORIGIN[0].encode(), ORIGIN[1])
        )

    def dataReceived(self, data: bytes) -> None:
        assert self.client is not None
        if self._left < 0:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self._head[: end + 4], self._head[end + 4 :]
            self._left = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    self._left = int(value)
            self.client.transport.write(head)  # type: ignore[union-attr]
        self._left -= len(data)
        self.client.transport.write(data)  # type: ignore[union-attr]
        if _store_dir is not None:
            self._body.append(data)
        if self._left <= 0:
            client, self.client = self.client, None
            _idle.append(self)
            client.done()
            if _store_dir is not None:
                _to_store.put(b"".join(self._body))

    def connectionLost(self, reason: Any = None) -> None:
        if self in _idle:
            _idle.remove(self)


class _Client(protocol.Protocol):
    def connectionMade(self) -> None:
        self._buf, self._busy = b"", False

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        self._next()

    def _next(self) -> None:
        end = self._buf.find(b"\r\n\r\n")
        if self._busy or end < 0:
            return
        head, self._buf = self._buf[:end], self._buf[end + 4 :]
        path = head.split(b" ", 2)[1]
        if path.startswith(b"/origin/"):
            path = path[len(b"/origin") :]
        self._busy = True
        if _idle:
            _idle.pop().send(self, path)
        else:
            creator = protocol.ClientCreator(reactor, _Upstream)
            creator.connectTCP(*ORIGIN).addCallback(lambda up: up.send(self, path))

    def done(self) -> None:
        self._busy = False
        self._next()


def main() -> None:
    global _store_dir
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--store", metavar="DIR", help="write every body durably here")
    args = parser.parse_args()
    if args.store:
        _store_dir = args.store
        os.makedirs(f"{_store_dir}/tmp", exist_ok=True)
        os.makedirs(f"{_store_dir}/data", exist_ok=True)
        threading.Thread(target=_storer, daemon=True).start()
    factory = protocol.Factory.forProtocol(_Client)
    reactor.listenTCP(args.port, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
