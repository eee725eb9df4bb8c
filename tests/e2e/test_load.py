"""1,000 concurrent client connections on loopback for 30 s: no errors, bounded memory.

The clients are raw keep-alive connections in this process, each sending one request
after another (a fleet of apt clients hitting the cache); the server is the real
pkgproxy process, whose resident memory is sampled throughout.
"""

from __future__ import annotations

import os
import resource
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.support.procs import file_tree, start_pkgproxy, start_static_server

CONNECTIONS = 1000
DURATION = 30.0
FILES = 50
#: Resident memory the server may reach under this load.
RSS_LIMIT_MB = 300


class _Client(Protocol):
    """Sends a GET, reads one response (Content-Length framed), repeats until the end."""

    def __init__(self, paths: list[bytes], deadline: float, index: int) -> None:
        self.paths = paths
        self.deadline = deadline
        self.index = index
        self.done: Deferred[None] = Deferred()
        self.ok = 0
        self.errors: list[str] = []
        self._buf = b""

    def connectionMade(self) -> None:
        self._send()

    def _send(self) -> None:
        if time.monotonic() >= self.deadline:
            assert self.transport is not None
            self.transport.loseConnection()
            return
        path = self.paths[(self.index + self.ok) % len(self.paths)]
        assert self.transport is not None
        self.transport.write(b"GET " + path + b" HTTP/1.1\r\nHost: cache\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self._buf[:end].split(b"\r\n")
            if not head[0].startswith(b"HTTP/1.1 200"):
                self.errors.append(head[0].decode("latin-1"))
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self._buf) < end + 4 + length:
                return
            self._buf = self._buf[end + 4 + length :]
            self.ok += 1
            self._send()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if time.monotonic() < self.deadline - 1:
            self.errors.append(f"connection lost early: {reason.getErrorMessage()}")
        if not self.done.called:
            self.done.callback(None)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class ThousandConnectionsTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 4 * CONNECTIONS:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * CONNECTIONS), hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        root = file_tree(
            self, {f"files/f{i}.deb": os.urandom(2000 + 300 * i) for i in range(FILES)}
        )
        self.upstream = start_static_server(self, root)
        self.proxy = start_pkgproxy(
            self,
            '[routes.files]\nfamily = "generic"\nimmutable = true\n'
            f'upstream = "{self.upstream.url("/files/")}"\n',
        )

    async def test_thousand_connections(self) -> None:
        """1,000 keep-alive clients for 30 s: every response a 200, memory bounded."""
        paths = [f"/files/f{i}.deb".encode() for i in range(FILES)]
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.port, timeout=30)
        deadline = time.monotonic() + DURATION
        peak = [0.0]

        def sample() -> None:
            peak[0] = max(peak[0], _rss_mb(self.proxy.pid))

        sampler = LoopingCall(sample)
        sampler.start(0.5)
        clients = []
        try:
            for i in range(CONNECTIONS):
                client = _Client(paths, deadline, i)
                clients.append(client)
                await connectProtocol(endpoint, client)
                if i % 100 == 99:
                    await deferLater(reactor, 0.01, lambda: None)
            await DeferredList([c.done for c in clients])
        finally:
            sampler.stop()
        errors = [e for c in clients for e in c.errors]
        total = sum(c.ok for c in clients)
        self.assertEqual(errors[:5], [], f"{len(errors)} errors, {total} responses")
        self.assertGreater(total, CONNECTIONS, "every client got at least one answer")
        self.assertLess(peak[0], RSS_LIMIT_MB, f"server RSS peaked at {peak[0]:.0f} MiB")
        print(
            f"\n{total} responses in {DURATION:.0f}s over {CONNECTIONS} connections, "
            f"server peak RSS {peak[0]:.0f} MiB"
        )
