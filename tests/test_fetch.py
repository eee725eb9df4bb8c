"""The fetch state machine (pkgproxy/fetch/fetch.py), driven by hand.

A fake upstream client answers with a response whose body the test delivers piece by
piece; the store is real, on a temp directory, with a synchronous disk pool and a
``Clock``. Each test sees what subscribers see (outcome, ``available``, ``wait``, the
body they read) and what ends up stored.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from pkgproxy.cache.store import CacheStore
from pkgproxy.diskpool import DiskPool
from pkgproxy.families import CacheClass, Decision
from pkgproxy.fetch import body as fetch_body
from pkgproxy.fetch import finish
from pkgproxy.fetch.fetch import Fetch, FetchRequest, Outcome, State
from pkgproxy.upstream.client import UpstreamError, UpstreamResponse
from tests.support.diskfaults import refusing_writes

URL = "http://upstream.test/files/a.bin"
KEY = "files:a.bin"


class FakeTransport:
    """The upstream connection under a body: records flow control."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


class FakeResponse:
    """An IResponse whose body the test delivers with :meth:`send` and :meth:`end`."""

    def __init__(self, length: int | None) -> None:
        self.length: Any = UNKNOWN_LENGTH if length is None else length
        self.protocol: Any = None
        self.transport = FakeTransport()

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def end(self, reason: Exception | None = None) -> None:
        self.protocol.connectionLost(Failure(reason or ResponseDone()))


class FakeClient:
    """Answers every request with the next scripted response (or error)."""

    def __init__(self) -> None:
        self.answers: list[UpstreamResponse | UpstreamError] = []
        self.requests: list[tuple[bytes, str, dict[bytes, bytes]]] = []
        self.released = 0

    def respond(
        self,
        status: int = 200,
        length: int | None = None,
        headers: dict[bytes, bytes] | None = None,
    ) -> FakeResponse:
        response = FakeResponse(length)
        raw = Headers({k: [v] for k, v in (headers or {}).items()})

        def release() -> None:
            self.released += 1

        self.answers.append(UpstreamResponse(URL, status, raw, response, release))  # type: ignore[arg-type]
        return response

    def request(
        self, method: bytes, url: str, headers: dict[bytes, bytes] | None = None
    ) -> Deferred[UpstreamResponse]:
        self.requests.append((method, url, dict(headers or {})))
        answer = self.answers.pop(0)
        if isinstance(answer, UpstreamError):
            d: Deferred[UpstreamResponse] = Deferred()
            d.errback(answer)
            return d
        return succeed(answer)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FetchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.pool = DiskPool(None)
        self.store = CacheStore(self.mktemp(), 1 << 30, self.pool, self.clock)
        self.store.startService()
        self.addCleanup(self.store.stopService)
        self.client = FakeClient()

    def fetch(self, decision: Decision | None = None, inline_max: int = 0) -> Fetch:
        request = FetchRequest(KEY, URL, decision or Decision(CacheClass.IMMUTABLE))
        fetch = Fetch(
            request,
            self.client,  # type: ignore[arg-type]
            self.store,
            self.pool,
            self.clock,
            idle_timeout=30.0,
            inline_max=inline_max,
        )
        self.settled: list[Fetch] = []
        fetch.when_settled(self.settled.append)
        return fetch

    def read_all(self, fetch: Fetch, ref: Any) -> bytes:
        """What a subscriber may send now, read as the producer does (a read stops where
        the disk's part of the body ends)."""
        out = b""
        while len(out) < fetch.available():
            out += ref.read(fetch.available() - len(out), len(out))
        return out

    def temp_files(self) -> list[str]:
        return os.listdir(self.store.tmp_dir)

    def test_success(self) -> None:
        """A 200 whose length and digest check out: streamed from the first byte (the
        last byte held back until it is verified), then committed."""
        body = b"x" * 1000 + b"y" * 1000
        response = self.client.respond(length=len(body))
        fetch = self.fetch(Decision(CacheClass.IMMUTABLE, digests={"sha256": _digest(body)}))
        answered: list[Fetch] = []
        fetch.answered().addCallback(answered.append)
        fetch.start()
        self.assertEqual((answered, fetch.outcome), ([fetch], Outcome.STREAM))
        self.assertIs(fetch.state, State.STREAMING)
        ref = fetch.open_body()
        assert ref is not None
        response.send(body[:1000])
        self.assertEqual((fetch.written, fetch.available()), (1000, 1000))
        progress = fetch.wait()
        response.send(body[1000:])
        self.assertTrue(progress.called)
        self.assertEqual(fetch.available(), len(body) - 1)  # whole, not yet verified
        self.assertFalse(fetch.complete)
        response.end()
        self.assertTrue(fetch.complete)
        self.assertEqual(fetch.available(), len(body))
        self.assertEqual(ref.read(len(body), 0), body)
        ref.release()
        self.assertEqual(self.settled, [fetch])
        assert fetch.entry is not None
        self.assertEqual((fetch.entry.size, fetch.entry.sha256), (len(body), _digest(body)))
        self.assertIs(self.store.get(KEY), fetch.entry)
        with open(self.store.path_of(fetch.entry), "rb") as f:
            self.assertEqual(f.read(), body)
        self.assertEqual(self.temp_files(), [])
        self.assertEqual(self.client.released, 1)

    def test_small_body_in_memory(self) -> None:
        """A body announced below ``inline_max`` is held in memory and stored with its
        commit."""
        response = self.client.respond(length=5)
        fetch = self.fetch(inline_max=64)
        fetch.start()
        ref = fetch.open_body()
        assert ref is not None
        self.assertEqual(ref.fd, -1)
        response.send(b"hello")
        response.end()
        self.assertEqual(ref.read(5, 0), b"hello")
        self.assertTrue(fetch.complete)
        assert fetch.entry is not None
        with open(self.store.path_of(fetch.entry), "rb") as f:
            self.assertEqual(f.read(), b"hello")

    def test_transfer_failure(self) -> None:
        """A body cut short: subscribers see a failed transfer, nothing is stored and
        the temp file is gone."""
        response = self.client.respond(length=100)
        fetch = self.fetch()
        fetch.start()
        ref = fetch.open_body()
        assert ref is not None
        waited = fetch.wait()
        response.send(b"z" * 40)
        self.assertTrue(waited.called)
        waited = fetch.wait()
        response.end(PotentialDataLoss())
        self.assertTrue(waited.called)
        self.assertTrue(fetch.failed)
        self.assertFalse(fetch.complete)
        assert fetch.error is not None
        self.assertEqual(fetch.error.kind, "transfer")
        self.assertIn("got 40 bytes, upstream announced 100", str(fetch.error))
        ref.release()
        self.assertIsNone(self.store.get(KEY))
        self.assertEqual(self.temp_files(), [])
        self.assertEqual(self.settled, [fetch])
        self.flushLoggedErrors()

    def test_verify_failure(self) -> None:
        """A whole body with the wrong digest: a verify failure, nothing stored."""
        response = self.client.respond(length=4)
        fetch = self.fetch(Decision(CacheClass.IMMUTABLE, digests={"sha256": "0" * 64}))
        fetch.start()
        response.send(b"evil")
        self.assertEqual(fetch.available(), 3)
        response.end()
        self.assertTrue(fetch.failed)
        assert fetch.error is not None
        self.assertEqual(fetch.error.kind, "verify")
        self.assertIn("sha256 mismatch", str(fetch.error))
        self.assertIsNone(self.store.get(KEY))
        self.assertEqual(self.temp_files(), [])

    def test_announced_length_differs_from_the_index(self) -> None:
        """An announced length other than the index's: refused before any body."""
        self.client.respond(length=10)
        fetch = self.fetch(Decision(CacheClass.IMMUTABLE, size=11))
        fetch.start()
        self.assertEqual(fetch.outcome, Outcome.UNREACHABLE)
        assert fetch.error is not None
        self.assertEqual(fetch.error.kind, "verify")
        self.assertEqual(self.temp_files(), [])

    def test_subscriber_joins_midway(self) -> None:
        """A second subscriber joining mid-download reads the whole body from byte 0."""
        body = bytes(range(256)) * 40
        response = self.client.respond(length=len(body))
        fetch = self.fetch()
        first_done = fetch.subscribe()
        fetch.start()
        first = fetch.open_body()
        assert first is not None
        response.send(body[:4000])
        joined: list[Fetch] = []
        fetch.answered().addCallback(joined.append)  # already answered: fires at once
        self.assertEqual(joined, [fetch])
        second_done = fetch.subscribe()
        self.assertEqual(fetch.subscribers, 2)
        second = fetch.open_body()
        assert second is not None
        self.assertEqual(second.read(fetch.available(), 0), body[:4000])
        response.send(body[4000:])
        response.end()
        self.assertEqual(first.read(len(body), 0), body)
        self.assertEqual(second.read(len(body), 0), body)
        first.release()
        second.release()
        first_done()
        first_done()  # once only
        second_done()
        self.assertEqual(fetch.subscribers, 0)
        self.assertIsNotNone(self.store.get(KEY))
        self.assertIsNone(fetch.open_body())  # settled: the entry holds the result

    def test_not_modified(self) -> None:
        """A 304 to a revalidation refreshes the stale entry; no body is read."""
        body = b"index"
        response = self.client.respond(length=len(body), headers={b"etag": b'"1"'})
        mutable = Decision(CacheClass.MUTABLE, ttl=60.0)
        first = self.fetch(mutable)
        first.start()
        response.send(body)
        response.end()
        stale = first.entry
        assert stale is not None
        self.clock.advance(120)
        self.client.respond(304, headers={b"etag": b'"2"'})
        request = FetchRequest(KEY, URL, mutable, stale=stale)
        again = Fetch(request, self.client, self.store, self.pool, self.clock, 30.0)  # type: ignore[arg-type]
        again.start()
        self.assertEqual(self.client.requests[-1][2][b"if-none-match"], b'"1"')
        self.assertEqual(again.outcome, Outcome.NOT_MODIFIED)
        self.assertIs(again.entry, stale)
        self.assertEqual((stale.etag, stale.fetched), ('"2"', self.clock.seconds()))

    def test_error_status_is_relayed(self) -> None:
        """A 404 is collected and relayed, never stored."""
        response = self.client.respond(404, headers={b"content-type": b"text/plain"})
        fetch = self.fetch()
        fetch.start()
        response.send(b"no such file")
        response.end()
        self.assertEqual((fetch.outcome, fetch.status), (Outcome.RESPONSE, 404))
        self.assertEqual(fetch.error_body, b"no such file")
        self.assertIsNone(self.store.get(KEY))

    def test_unreachable(self) -> None:
        """No answer at all: every subscriber is told why."""
        self.client.answers.append(UpstreamError("connect", "connection refused", 502))
        fetch = self.fetch()
        fetch.start()
        self.assertEqual(fetch.outcome, Outcome.UNREACHABLE)
        assert fetch.error is not None
        self.assertEqual(fetch.error.kind, "connect")
        self.assertEqual(self.settled, [fetch])

    def test_idle_upstream_times_out(self) -> None:
        """An upstream that goes silent mid-body is cut off after the idle timeout."""
        response = self.client.respond(length=None)
        fetch = self.fetch()
        fetch.start()
        response.send(b"abc")
        self.clock.advance(31)
        self.assertTrue(response.transport.stopped)
        response.end(PotentialDataLoss())  # what the connection's end would look like
        self.assertTrue(fetch.failed)
        assert fetch.error is not None
        self.assertIn("went silent", str(fetch.error))

    def test_upstream_paused_while_the_disk_lags(self) -> None:
        """Above HIGH_WATER bytes waiting for the disk the upstream is paused, below
        LOW_WATER resumed."""
        self.patch(fetch_body, "HIGH_WATER", 10)
        self.patch(fetch_body, "LOW_WATER", 5)
        pending: list[tuple[Deferred[int], Any, tuple[Any, ...]]] = []

        def slow_run(f: Any, *args: Any) -> Deferred[int]:
            if f is not fetch_body.write_and_hash:
                return succeed(f(*args))
            d: Deferred[int] = Deferred()
            pending.append((d, f, args))
            return d

        self.patch(self.pool, "run", slow_run)
        response = self.client.respond(length=30)
        fetch = self.fetch()
        fetch.start()
        response.send(b"a" * 8)  # being written
        response.send(b"b" * 8)  # waiting: 16 > 10
        self.assertTrue(response.transport.paused)
        d, f, args = pending.pop(0)
        d.callback(f(*args))  # 8 still waiting, being written now
        self.assertTrue(response.transport.paused)
        d, f, args = pending.pop(0)
        d.callback(f(*args))
        self.assertFalse(response.transport.paused)
        response.send(b"c" * 14)
        d, f, args = pending.pop(0)
        response.end()
        d.callback(f(*args))
        self.assertTrue(fetch.complete)
        self.assertEqual(fetch.written, 30)

    def refuse_writes_after(self, n: int) -> None:
        self.patch(fetch_body, "write_and_hash", refusing_writes(n))

    def test_disk_refuses_a_write_memory_fallback(self) -> None:
        """The disk refuses a write midway: the rest is held in memory within the
        budget, the clients get the whole verified body, nothing is stored, and the
        reservation comes back when the last reader lets go."""
        budget = fetch_body.SpillBudget(1000)
        self.patch(fetch_body, "SPILL_BUDGET", budget)
        self.refuse_writes_after(1)
        body = b"0123456789" * 50
        response = self.client.respond(length=len(body))
        fetch = self.fetch(Decision(CacheClass.IMMUTABLE, digests={"sha256": _digest(body)}))
        fetch.start()
        ref = fetch.open_body()
        assert ref is not None
        response.send(body[:100])  # on disk
        response.send(body[100:250])  # refused: from here on in memory
        self.assertEqual(budget.held, len(body) - 100)
        self.assertTrue(self.store.disk_trouble())
        response.send(body[250:])
        response.end()
        self.assertTrue(fetch.complete)
        self.assertEqual(self.read_all(fetch, ref), body)
        self.assertEqual(ref.read(50, 80), body[80:100])  # a read stops at the disk's end
        self.assertEqual(ref.read(50, 100), body[100:150])
        self.assertIsNone(self.store.get(KEY))
        ref.release()
        self.assertEqual(budget.held, 0)
        self.assertEqual(self.temp_files(), [])

    def test_disk_refuses_a_write_beyond_the_budget(self) -> None:
        """With no room left in the budget, the download fails cleanly."""
        budget = fetch_body.SpillBudget(100)
        self.patch(fetch_body, "SPILL_BUDGET", budget)
        self.refuse_writes_after(0)
        response = self.client.respond(length=500)
        fetch = self.fetch()
        fetch.start()
        response.send(b"a" * 10)
        self.assertTrue(fetch.failed)
        self.assertTrue(response.transport.stopped)
        assert fetch.error is not None
        self.assertIn("cache disk error: no memory left", str(fetch.error))
        self.assertEqual(budget.held, 0)
        self.assertEqual(self.temp_files(), [])

    def test_older_body_keeps_the_stored_one(self) -> None:
        """Never back in time: a revalidation bringing an older version keeps the stored
        copy, fresh again, and drops the new body."""
        version = {b"new": 2.0, b"old": 1.0}

        def version_of(head: bytes) -> float | None:
            return version.get(head[:3])

        decision = Decision(CacheClass.MUTABLE, ttl=60.0, version_of=version_of)
        response = self.client.respond(length=3)
        first = self.fetch(decision)
        first.start()
        response.send(b"new")
        response.end()
        stored = first.entry
        assert stored is not None
        self.clock.advance(120)
        response = self.client.respond(length=3)
        request = FetchRequest(KEY, URL, decision, stale=stored)
        again = Fetch(request, self.client, self.store, self.pool, self.clock, 30.0)  # type: ignore[arg-type]
        again.start()
        self.assertIsNone(again.outcome)  # not answered before the versions are compared
        response.send(b"old")
        response.end()
        self.assertEqual(again.outcome, Outcome.NOT_MODIFIED)
        self.assertIs(self.store.get(KEY), stored)
        self.assertEqual(stored.expires, self.clock.seconds() + 60.0)
        self.assertEqual(self.temp_files(), [])
        self.flushLoggedErrors()


class StorableTests(SynchronousTestCase):
    def test_table(self) -> None:
        """Which verified bodies are kept (pkgproxy/fetch/finish.py)."""
        immutable = Decision(CacheClass.IMMUTABLE)
        mutable = Decision(CacheClass.MUTABLE)
        checked = Decision(CacheClass.IMMUTABLE, size=3)
        table = (
            ("immutable", immutable, False, None, False, True),
            ("pass-through", Decision(CacheClass.PASS), False, None, False, False),
            ("part held in memory", immutable, True, None, False, False),
            ("mutable, no-store", mutable, False, b"no-store", False, False),
            ("mutable, private", mutable, False, b"private", False, False),
            ("mutable, max-age", mutable, False, b"max-age=60", False, True),
            ("immutable ignores no-store", immutable, False, b"no-store", False, True),
            ("cut by the connection, nothing to check", immutable, False, None, True, False),
            ("cut by the connection, size checked", checked, False, None, True, True),
        )
        for name, decision, spilled, cache_control, open_ended, want in table:
            got = finish.storable(
                decision, spilled=spilled, cache_control=cache_control, open_ended=open_ended
            )
            self.assertEqual(got, want, name)
