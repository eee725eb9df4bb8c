"""One upstream fetch of one cache key, shared by every client that wants it.

The body goes to a temp file as it arrives, hashed on the way (in the disk pool, so the
reactor never hashes); every subscriber reads that file at its own pace through
:class:`~pkgproxy.web.producer.BodyProducer`. The temp file is the buffer, so a slow
client costs disk reads, not memory, and never slows the others. Only a complete 200
whose length and digests check out is committed; anything else is discarded and every
subscriber's response ends as a failed transfer.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from pkgproxy import httputil
from pkgproxy.cache.keys import PACKED as PACKED
from pkgproxy.families import (
    COMPRESSED_SUFFIXES,
    VERSION_HEAD,
    CacheClass,
    Decision,
    Learned,
    RewriteContext,
    new_hasher,
)
from pkgproxy.upstream.client import (
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
    read_small,
)

if TYPE_CHECKING:
    from pkgproxy.cache.store import CacheStore, Entry
    from pkgproxy.diskpool import DiskPool

log = Logger()

#: Upstream response headers replayed to clients from the cache.
STORED_HEADERS = (
    b"content-type",
    b"content-encoding",
    b"content-language",
    b"content-disposition",
    b"docker-content-digest",
)
#: Error bodies are relayed from memory, so they are capped.
MAX_ERROR_BODY = 64 * 1024
#: Upstream is paused when this much is waiting for the disk, resumed below the low mark.
HIGH_WATER = 8 * 1024 * 1024
LOW_WATER = 2 * 1024 * 1024
#: When the cache disk refuses a download's write, up to this much of the rest of its
#: body is held in memory so that its clients still get it whole (it is not stored).
SPILL_MAX = 64 * 1024 * 1024
#: Rewritten documents smaller than this are not worth a gzip form.
PACK_MIN = 1024
#: A gzip-compressed document to rewrite may expand to this much, no more.
MAX_DOCUMENT = 1024 * 1024 * 1024


class SpillBudget:
    """The memory all downloads together may hold after the cache disk refused writes.

    A download the disk fails reserves what it still needs (its announced remainder, or
    :data:`SPILL_MAX` when no length was announced) before it holds any of it; when the
    budget cannot cover that, this newcomer fails cleanly (its clients see a failed
    transfer and a retry is relayed, as every miss is while the disk is in trouble),
    and the downloads already held in memory go on undisturbed. A reservation is
    returned when the last reader of that body lets go of it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: Bytes reserved now.
        self.held = 0

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes, if the budget has them."""
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


#: Shared by every download of the process (``limits.disk_error_memory``).
SPILL_BUDGET = SpillBudget(256 * 1024 * 1024)
_DONE = Failure(ResponseDone())


class State(Enum):
    """Where a fetch is in its life."""

    HEADERS = "headers"  # waiting for the upstream's status line
    STREAMING = "streaming"  # 200: the body is arriving into the temp file
    DONE = "done"  # body complete and verified (committed, or not storable)
    FAILED = "failed"  # the transfer or its verification failed
    ANSWERED = "answered"  # not a body to stream: 304, an error status, no connection


class Outcome(Enum):
    """What subscribers are told once the upstream has answered."""

    STREAM = "stream"  # read the body from the fetch
    NOT_MODIFIED = "not_modified"  # the stale entry is good again; serve it
    RESPONSE = "response"  # relay an upstream status and small body (404, 500, ...)
    UNREACHABLE = "unreachable"  # no usable answer; ``error`` says why


@dataclass
class FetchRequest:
    """Everything a fetch needs to know about the client-independent request."""

    key: str
    url: str
    decision: Decision
    stale: Entry | None = None
    extra_headers: dict[bytes, bytes] = field(default_factory=dict)
    #: Called once the body is complete and verified, before any client sees its end.
    on_verified: Callable[[], object] | None = None
    #: Passed to the decision's rewriter, if it has one.
    rewrite_context: RewriteContext | None = None


class _SharedFile:
    """An fd read by several subscribers with ``pread``; closed by its last user.

    After the disk refused a write, the rest of the body is held in memory instead
    (:attr:`spill`, from byte :attr:`spill_at` on): subscribers read below that point
    from the file and above it from memory, unaware of the change.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._refs = 1
        self.spill_at = -1
        self.spill: bytearray | None = None
        #: What :attr:`spill` may grow to, reserved from :attr:`budget`.
        self.reserved = 0
        self.budget: SpillBudget | None = None

    def acquire(self) -> _SharedFile:
        self._refs += 1
        return self

    def read(self, size: int, offset: int) -> bytes:
        spill = self.spill
        if spill is not None:
            if offset >= self.spill_at:
                start = offset - self.spill_at
                return bytes(spill[start : start + size])
            size = min(size, self.spill_at - offset)
        return os.pread(self.fd, size, offset)

    def release(self) -> None:
        self._refs -= 1
        if self._refs == 0:
            os.close(self.fd)
            self.spill = None
            if self.budget is not None:
                self.budget.give(self.reserved)
                self.budget = None


class _MemoryBody:
    """A small download's body held in memory, read by subscribers like the temp file.

    Subscribers read it with :meth:`read`; there is no fd to share or close.
    """

    fd = -1

    def __init__(self) -> None:
        self.data = bytearray()

    def acquire(self) -> _MemoryBody:
        return self

    def release(self) -> None:
        pass

    def read(self, size: int, offset: int) -> bytes:
        return bytes(self.data[offset : offset + size])


class Fetch:
    """A single upstream download with any number of subscribers.

    :ivar written: bytes of the body safely in the temp file.
    :ivar length: the body length the upstream announced, if any.
    """

    def __init__(
        self,
        request: FetchRequest,
        client: UpstreamClient,
        store: CacheStore,
        diskpool: DiskPool,
        clock: IReactorTime,
        idle_timeout: float,
        inline_max: int = 0,
    ) -> None:
        self.request = request
        self.key = request.key
        #: A body announced at most this long is held in memory: its clients are served
        #: from there at once, and it reaches the disk only with its commit, in the
        #: pool, so a small miss costs no thread hop before its first byte. 0 sends
        #: every body through a temp file.
        self._inline_max = inline_max
        self._client = client
        self._store = store
        self._pool = diskpool
        self._clock = clock
        self._idle_timeout = idle_timeout
        self.state = State.HEADERS
        self.outcome: Outcome | None = None
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.error: UpstreamError | None = None
        self.error_body = b""
        self.length: int | None = None
        self.written = 0
        self.entry: Entry | None = None
        self.sha256: str | None = None
        #: What the upstream's document taught, read while it was rewritten (``None``
        #: where it was not: the learner then reads the stored copy).
        self.learned: Learned | None = None
        #: The gzip form of a rewritten document, committed beside it.
        self._packed: _Packed | None = None
        self._subscribers = 0
        self.started_at = clock.seconds()
        #: When the upstream's answer was known (headers, or the error).
        self.answered_at = self.started_at
        self._file: _SharedFile | _MemoryBody | None = None
        self._temp: str | None = None
        self._hashers: dict[str, Any] = {}
        #: Digests the body must have: the family's, and one a response header names.
        self._expected: dict[str, str] = dict(request.decision.digests)
        self._answer_waiters: list[Deferred[Fetch]] = []
        self._progress_waiters: list[Deferred[None]] = []
        self._settled_callbacks: list[Callable[[Fetch], None]] = []
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._writing = False
        #: The bytes of the disk write in progress, written again to memory if it fails.
        self._in_write = b""
        self._body_ended: Failure | None = None
        self._sink: _BodySink | None = None
        self.upstream: UpstreamResponse | None = None

    # -- what subscribers see ------------------------------------------------------

    def answered(self) -> Deferred[Fetch]:
        """A new Deferred for this caller, fired once :attr:`outcome` is known."""
        d: Deferred[Fetch] = Deferred()
        if self.outcome is not None:
            d.callback(self)
        else:
            self._answer_waiters.append(d)
        return d

    def open_body(self) -> _SharedFile | _MemoryBody | None:
        """A reference to the temp file for one subscriber; release it when done.

        ``None`` once the fetch has settled: then :attr:`entry` holds the result, if it
        was stored.
        """
        return self._file.acquire() if self._file is not None else None

    def available(self) -> int:
        """Bytes a subscriber may send now.

        While the body is unverified the last byte is held back when the length is known,
        so no client sees a complete response that then fails verification.
        """
        if self.state is State.DONE:
            return self.written
        if self.length is not None and self.written >= self.length:
            return self.length - 1
        return self.written

    @property
    def complete(self) -> bool:
        """The body is whole and verified."""
        return self.state is State.DONE

    @property
    def failed(self) -> bool:
        """The transfer failed; subscribers must abort their responses."""
        return self.state is State.FAILED

    def wait(self) -> Deferred[None]:
        """Fires when more bytes are written or the fetch ends."""
        d: Deferred[None] = Deferred()
        if self.state in (State.DONE, State.FAILED):
            d.callback(None)
        else:
            self._progress_waiters.append(d)
        return d

    @property
    def subscribers(self) -> int:
        """Clients being sent this fetch's body now."""
        return self._subscribers

    def subscribe(self) -> Callable[[], None]:
        """Count one client sent the body; call the result once, when its response ends."""
        self._subscribers += 1
        done = False

        def unsubscribe() -> None:
            nonlocal done
            if not done:
                done = True
                self._subscribers -= 1

        return unsubscribe

    def when_settled(self, f: Callable[[Fetch], None]) -> None:
        """Call ``f(self)`` once the fetch has nothing more to do with the cache."""
        self._settled_callbacks.append(f)

    # -- the work ------------------------------------------------------------------

    def start(self) -> None:
        """Send the upstream request."""
        stale = self.request.stale
        decision = self.request.decision
        if stale is not None and decision.head_revalidate and decision.digest_header:
            d = self._client.request(b"HEAD", self.request.url, dict(self.request.extra_headers))
            d.addCallbacks(self._got_head, self._unreachable)
            d.addErrback(self._bug)
            return
        self._get()

    def _get(self) -> None:
        headers = dict(self.request.extra_headers)
        stale = self.request.stale
        if stale is not None:
            if stale.etag:
                headers[b"if-none-match"] = stale.etag.encode("latin-1")
            if stale.last_modified:
                headers[b"if-modified-since"] = stale.last_modified.encode("latin-1")
        d = self._client.request(b"GET", self.request.url, headers)
        d.addCallbacks(self._got_response, self._unreachable)
        d.addErrback(self._bug)

    def _got_head(self, resp: UpstreamResponse) -> None:
        """A HEAD revalidation: the same digest means the stale copy is current."""
        resp.discard()
        stale = self.request.stale
        name = self.request.decision.digest_header
        assert stale is not None and name is not None
        now_digest = resp.header(name.encode())
        had = stale.headers.get(name.lower())
        if resp.status == 200 and now_digest and had and now_digest.decode("latin-1") == had:
            self.upstream = resp
            self._refresh(stale, resp)
            self.state = State.ANSWERED
            self._answer(Outcome.NOT_MODIFIED)
            self._settle()
            return
        # Changed, or the HEAD was not conclusive: the GET decides (and reports errors).
        self._get()

    def _bug(self, f: Failure) -> None:
        log.failure("fetch of {url} failed unexpectedly", f, url=self.request.url)
        if self.outcome is None:
            self._answer(Outcome.UNREACHABLE, error=UpstreamError("protocol", "internal error"))
        elif self.state is State.STREAMING:
            self._fail("internal error")

    def _unreachable(self, f: Failure) -> None:
        err = f.value if isinstance(f.value, UpstreamError) else UpstreamError("protocol", str(f))
        log.warn("upstream {url}: {error}", url=self.request.url, error=str(err))
        self.state = State.ANSWERED
        self._answer(Outcome.UNREACHABLE, error=err)
        self._settle()

    def _got_response(self, resp: UpstreamResponse) -> None:
        self.upstream = resp
        self.status = resp.status
        if resp.status == 304 and self.request.stale is not None:
            resp.discard()
            self._refresh(self.request.stale, resp)
            self.state = State.ANSWERED
            self._answer(Outcome.NOT_MODIFIED)
            self._settle()
            return None
        if resp.status != 200:
            self._relay(resp)
            return None
        self.headers = _stored_headers(resp, self.request.url)
        header = self.request.decision.digest_header
        if header is not None:
            named = (resp.header(header.encode()) or b"").decode("latin-1")
            algo, _, hexd = named.partition(":")
            if algo in ("sha256", "sha512") and hexd:
                # Verified like any other digest, before anything is stored.
                self._expected[algo] = hexd.lower()
                self.headers[header.lower().encode()] = named.encode("latin-1")
        length = resp.response.length
        self.length = length if isinstance(length, int) else None
        known = self.request.decision.size
        if known is not None and self.length is not None and known != self.length:
            resp.discard()
            self.state = State.ANSWERED
            msg = f"upstream length {self.length} differs from the expected {known}"
            log.warn("{url}: {msg}", url=self.request.url, msg=msg)
            self._answer(Outcome.UNREACHABLE, error=UpstreamError("verify", msg))
            self._settle()
            return None
        self._temp = self._store.temp_name(self.key)
        temp = self._temp
        small = self.length is not None and self.length <= self._inline_max
        if small and self.request.decision.rewrite is None:
            # A small file is held in memory and streamed from there at once; it is
            # written to disk with its commit, in the pool, after its clients have it.
            self._file = _MemoryBody()
            self._start_body(resp)
            return None
        # Creating a file costs a journal update: never in the reactor thread.
        d = self._pool.run(os.open, temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)

        def opened(fd: int) -> None:
            self._file = _SharedFile(fd)
            self._start_body(resp)

        def not_opened(f: Failure) -> None:
            resp.discard()
            self._store.disk_error(f.getErrorMessage())
            self.state = State.ANSWERED
            self._answer(Outcome.UNREACHABLE, error=UpstreamError("disk", "cache disk error", 503))
            self._settle()

        d.addCallbacks(opened, not_opened)

    def _start_body(self, resp: UpstreamResponse) -> None:
        algos = {"sha256", *self._expected}
        if self.request.decision.etag_digest is not None:
            algos.add(self.request.decision.etag_digest)
        self._hashers = {a: new_hasher(a) for a in algos}
        self.state = State.STREAMING
        if self.request.decision.rewrite is None and not self._compares_versions:
            # A rewritten document is answered once it exists, a body that may prove
            # older than the stored one once that is known; anything else is streamed
            # to clients from the first byte.
            self._answer(Outcome.STREAM)
        self._sink = _BodySink(self, self._clock, self._idle_timeout)
        resp.response.deliverBody(self._sink)

    def _relay(self, resp: UpstreamResponse) -> None:
        """Collect a small non-200 answer to pass on to every subscriber."""
        self.headers = {
            k: v
            for k in (b"content-type",)
            if (v := resp.header(k)) is not None  # type: ignore[misc]
        }
        body: Deferred[bytes] = Deferred.fromCoroutine(read_small(resp, MAX_ERROR_BODY))

        def finish(result: bytes | Failure) -> None:
            self.error_body = result if isinstance(result, bytes) else b""
            self.state = State.ANSWERED
            self._answer(Outcome.RESPONSE)
            self._settle()

        body.addBoth(finish)

    def _refresh(self, entry: Entry, resp: UpstreamResponse, validators: bool = True) -> None:
        """The stored entry is current again; with ``validators``, under the ones
        ``resp`` names (a 304), else under its own (an older body that was dropped)."""
        now = self._clock.seconds()
        etag = resp.header(b"etag") if validators else None
        lm = resp.header(b"last-modified") if validators else None
        if etag:
            entry.etag = etag.decode("latin-1")
        if lm:
            entry.last_modified = lm.decode("latin-1")
        entry.fetched = now
        if entry.expires is not None:
            entry.expires = now + self._ttl(resp, now)
        self._store.update(entry)
        self.entry = entry
        sibling = self._store.peek(entry.key + PACKED)
        if sibling is not None and sibling.etag == entry.sha256:
            sibling.fetched, sibling.expires = entry.fetched, entry.expires
            self._store.update(sibling)

    def _ttl(self, resp: UpstreamResponse, now: float) -> float:
        ttl = self.request.decision.ttl
        if ttl is not None:
            return ttl
        return httputil.freshness_lifetime(
            resp.header(b"cache-control"),
            resp.header(b"expires"),
            resp.header(b"date"),
            resp.header(b"last-modified"),
            now,
        )

    def _answer(self, outcome: Outcome, error: UpstreamError | None = None) -> None:
        self.answered_at = self._clock.seconds()
        self.outcome = outcome
        self.error = error
        waiters, self._answer_waiters = self._answer_waiters, []
        for d in waiters:
            d.callback(self)

    def _notify(self) -> None:
        waiters, self._progress_waiters = self._progress_waiters, []
        for d in waiters:
            d.callback(None)

    # -- body, called by the sink --------------------------------------------------

    def _data(self, data: bytes) -> None:
        if self.state is not State.STREAMING:
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > HIGH_WATER and self._sink is not None:
            self._sink.pause()
        self._write_next()

    def _ended(self, reason: Failure) -> None:
        self._body_ended = reason
        if self.upstream is not None:
            self.upstream.release()
        self._write_next()

    def _write_next(self) -> None:
        if self._writing or self.state is not State.STREAMING:
            return
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._writing = True
            assert self._file is not None
            if isinstance(self._file, _MemoryBody):
                d = succeed(_append_and_hash(self._file.data, data, self._hashers))
            elif self._file.spill is not None:
                if len(self._file.spill) + len(data) > self._file.reserved:
                    self._writing = False
                    self._give_up_spill()
                    return
                # Hashed in the pool, as a disk write would be: up to HIGH_WATER at once.
                d = self._pool.run(_append_and_hash, self._file.spill, data, self._hashers)
            else:
                self._in_write = data
                d = self._pool.run(
                    _write_and_hash, self._file.fd, data, self.written, self._hashers
                )
            d.addCallbacks(self._wrote, self._write_failed)
            return
        if self._body_ended is not None:
            self._finish_body(self._body_ended)

    def _wrote(self, n: int) -> None:
        self._writing = False
        self._in_write = b""
        self._pending_bytes -= n
        self.written += n
        if self._pending_bytes < LOW_WATER and self._sink is not None:
            self._sink.resume()
        self._notify()
        self._write_next()

    def _write_failed(self, f: Failure) -> None:
        self._writing = False
        why = f.getErrorMessage()
        self._store.disk_error(why)
        body = self._file
        if (
            isinstance(body, _SharedFile)
            and body.spill is None
            and self.state is State.STREAMING
            and self.request.decision.rewrite is None
        ):
            # The clients of this download still get it whole: what is left of it is
            # held in memory (up to SPILL_MAX, within the budget shared by all
            # downloads), checked as before, and not stored.
            need = SPILL_MAX if self.length is None else max(0, self.length - self.written)
            if need > SPILL_MAX:
                self._give_up_spill()
                return
            budget = SPILL_BUDGET
            if not budget.take(need):
                log.warn(
                    "cache disk error writing {url} ({why}); the memory for downloads "
                    "the disk refused is spent ({held} of {limit} MiB), so this one fails",
                    url=self.request.url,
                    why=why,
                    held=budget.held >> 20,
                    limit=budget.limit >> 20,
                )
                self._disk_failure("no memory left to finish it after a cache disk error")
                return
            body.reserved = need
            body.budget = budget
            log.warn(
                "cache disk error writing {url} ({why}); its clients get the rest "
                "from memory and it is not stored",
                url=self.request.url,
                why=why,
            )
            body.spill_at = self.written
            body.spill = bytearray()
            self._pending.insert(0, self._in_write)
            self._write_next()
            return
        self._disk_failure(why)

    def _give_up_spill(self) -> None:
        log.warn(
            "{url}: more than {n} MiB left to hold in memory after a cache disk error",
            url=self.request.url,
            n=SPILL_MAX >> 20,
        )
        self._disk_failure("the rest of the body is too large to hold in memory")

    def _disk_failure(self, why: str) -> None:
        if self._sink is not None:
            self._sink.abort()
        self._fail(f"cache disk error: {why}", "disk")

    def _finish_body(self, reason: Failure) -> None:
        problem = self._check(reason)
        if problem is not None:
            kind, why = problem
            log.warn("not caching {url}: {problem}", url=self.request.url, problem=why)
            self._fail(why, kind)
            return
        if self.request.decision.rewrite is not None:
            self._rewrite(reason)
            return
        if self._compares_versions:
            self._compare_versions(reason)
            return
        self._done(reason)

    @property
    def _compares_versions(self) -> bool:
        """Whether this body replaces a stored one only if it is not older."""
        decision = self.request.decision
        return (
            decision.version_of is not None
            and self.request.stale is not None
            and decision.rewrite is None
        )

    def _compare_versions(self, reason: Failure) -> None:
        """Keep the stored body if the new one is older (a lagging mirror); else go on
        as usual. Clients were not answered yet: they get whichever is kept."""
        version_of = self.request.decision.version_of
        stale = self.request.stale
        body = self._file
        assert version_of is not None and stale is not None and body is not None
        stored = self._store.path_of(stale)

        def work() -> tuple[float | None, float | None]:
            new = version_of(body.read(VERSION_HEAD, 0))
            try:
                with open(stored, "rb") as f:
                    old = version_of(f.read(VERSION_HEAD))
            except OSError:
                old = None  # gone meanwhile: nothing to keep
            return new, old

        def compared(versions: tuple[float | None, float | None]) -> None:
            new, old = versions
            if new is not None and old is not None and new < old:
                log.warn(
                    "upstream sent {url} older than the cached copy ({new} < {old}): "
                    "keeping the cached one",
                    url=self.request.url,
                    new=httputil.http_date(new),
                    old=httputil.http_date(old),
                )
                self._keep_stored(stale)
                return
            self._done(reason)
            self._answer(Outcome.STREAM)

        def failed(f: Failure) -> None:
            log.failure("comparing versions of {url}", f, url=self.request.url)
            self._done(reason)
            self._answer(Outcome.STREAM)

        self._pool.run(work).addCallbacks(compared, failed)

    def _keep_stored(self, entry: Entry) -> None:
        """The stored copy stays, fresh for another lifetime: the upstream did answer,
        just with something older. Its validators stay its own."""
        self._discard_temp()
        assert self.upstream is not None
        self._refresh(entry, self.upstream, validators=False)
        self.state = State.ANSWERED
        self._answer(Outcome.NOT_MODIFIED)
        self._notify()
        self._settle()

    def _rewrite(self, reason: Failure) -> None:
        """Turn the verified upstream document into the one clients get, then serve it."""
        rewrite = self.request.decision.rewrite
        context = self.request.rewrite_context
        assert rewrite is not None and context is not None and self._temp is not None
        raw, out = self._temp, self._store.temp_name(self.key)
        coding = self.headers.get(b"content-encoding", b"").strip().lower()
        plain = self._store.temp_name(self.key) if coding in (b"gzip", b"x-gzip") else None

        packed = self._store.temp_name(self.key)

        def work() -> tuple[int, str, int, Learned | None, _Packed | None]:
            if plain is None:
                learned = rewrite(raw, out, context)
            else:
                # Taken compressed (verified as the upstream sent it); rewritten and
                # served as the document itself.
                try:
                    _gunzip(raw, plain, MAX_DOCUMENT)
                    learned = rewrite(plain, out, context)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(plain)
            digest, size, gz = _hash_and_pack(out, packed)
            return os.open(out, os.O_RDWR), digest, size, learned, gz

        def swapped(result: tuple[int, str, int, Learned | None, _Packed | None]) -> None:
            fd, digest, size, self.learned, gz = result
            if plain is not None:
                del self.headers[b"content-encoding"]
            self._discard_temp()
            self._packed = gz
            self._temp, self._file = out, _SharedFile(fd)
            self.written = self.length = size
            self._hashers = {"sha256": _Known(digest)}
            self._done(reason)
            self._answer(Outcome.STREAM)

        def failed(f: Failure) -> None:
            log.failure("rewriting {url} failed", f, url=self.request.url)
            self._store.discard(out)
            self._store.discard(packed)
            self._fail(f"cannot rewrite the upstream document: {f.getErrorMessage()}")

        # A gzip body is counted at what JSON and HTML indexes usually expand to.
        size = self.written * (8 if plain is not None else 1)
        self._pool.run_document(size, work).addCallbacks(swapped, failed)

    def _done(self, reason: Failure) -> None:
        self.sha256 = self._hashers["sha256"].hexdigest()
        self.state = State.DONE
        if self.request.on_verified is not None:
            self.request.on_verified()
        self._notify()
        if self._storable(reason):
            self._commit()
        else:
            self._discard_temp()
            self._settle()

    def _check(self, reason: Failure) -> tuple[str, str] | None:
        """``(kind, why)`` the body must not be served as complete, or ``None``.

        The kind is ``transfer`` for a broken transfer and ``verify`` for a complete
        body that is not what an index or digest says it must be.
        """
        if not reason.check(ResponseDone, PotentialDataLoss):
            why = f"transfer failed after {self.written} bytes: {reason.getErrorMessage()}"
            return "transfer", why
        if self.length is not None and self.written != self.length:
            return "transfer", f"got {self.written} bytes, upstream announced {self.length}"
        want = self.request.decision
        if want.size is not None and self.written != want.size:
            return "verify", f"got {self.written} bytes, the index says {want.size}"
        for algo, hexdigest in self._expected.items():
            got = self._hashers[algo].hexdigest()
            if got != hexdigest:
                return "verify", f"{algo} mismatch: got {got}, expected {hexdigest}"
        return None

    def _storable(self, reason: Failure) -> bool:
        decision = self.request.decision
        if decision.cache_class is CacheClass.PASS:
            return False
        if isinstance(self._file, _SharedFile) and self._file.spill is not None:
            return False  # part of it never reached the disk
        resp = self.upstream
        assert resp is not None
        if decision.cache_class is CacheClass.MUTABLE and not httputil.storable(
            resp.header(b"cache-control")
        ):
            return False
        if reason.check(PotentialDataLoss) and not (decision.digests or decision.size):
            # The body ended with the connection and nothing says how long it should
            # be: it may be truncated, so it is served but not kept.
            return False
        return True

    def _commit(self) -> None:
        from pkgproxy.cache.store import Entry

        resp = self.upstream
        assert resp is not None and self._temp is not None and self.sha256 is not None
        now = self._clock.seconds()
        immutable = self.request.decision.cache_class is CacheClass.IMMUTABLE
        etag = resp.header(b"etag")
        lm = resp.header(b"last-modified")
        entry = Entry(
            key=self.key,
            url=self.request.url,
            file="",
            size=self.written,
            sha256=self.sha256,
            headers={k.decode(): v.decode("latin-1") for k, v in self.headers.items()},
            etag=etag.decode("latin-1") if etag else None,
            last_modified=lm.decode("latin-1") if lm else httputil.http_date(now),
            fetched=now,
            expires=None if immutable else now + self._ttl(resp, now),
            last_access=now,
            digests={a: h.hexdigest() for a, h in self._hashers.items() if a != "sha256"},
        )
        body = bytes(self._file.data) if isinstance(self._file, _MemoryBody) else None
        d = self._store.commit(entry, self._temp, body)

        def committed(e: Entry) -> Deferred[None] | None:
            self.entry = e
            return self._commit_packed(e)

        def failed(f: Failure) -> None:
            log.failure("cannot commit {url} to the cache", f, url=self.request.url)
            if self._packed is not None:
                self._store.discard(self._packed.path)
                self._packed = None

        d.addCallbacks(committed, failed)
        d.addBoth(lambda _: self._settle())

    def _commit_packed(self, entry: Entry) -> Deferred[None] | None:
        """Store the gzip form of a rewritten document beside it (see :data:`PACKED`)."""
        packed, self._packed = self._packed, None
        if packed is None:
            if self.request.decision.rewrite is not None:
                self._store.remove(entry.key + PACKED)  # the gzip form of an older one
            return None
        from pkgproxy.cache.store import Entry

        sibling = Entry(
            key=entry.key + PACKED,
            url=entry.url,
            file="",
            size=packed.size,
            sha256=packed.sha256,
            headers={**entry.headers, "content-encoding": "gzip"},
            etag=entry.sha256,  # which identity document this is the gzip form of
            last_modified=entry.last_modified,
            fetched=entry.fetched,
            expires=entry.expires,
            last_access=entry.last_access,
        )

        def failed(f: Failure) -> None:
            log.failure("cannot commit the gzip form of {url}", f, url=self.request.url)

        return self._store.commit(sibling, packed.path).addCallbacks(lambda _: None, failed)

    def _fail(self, why: str, kind: str = "transfer") -> None:
        self.state = State.FAILED
        error = UpstreamError(kind, why, 503 if kind == "disk" else 502)
        self._discard_temp()
        if self.outcome is None:  # nobody was answered yet (a rewritten document)
            self._answer(Outcome.UNREACHABLE, error=error)
        self.error = error
        self._notify()
        self._settle()

    def _discard_temp(self) -> None:
        if self._temp is not None:
            self._store.discard(self._temp)
        if self._packed is not None:
            self._store.discard(self._packed.path)
            self._packed = None
        if self._file is not None:
            self._file.release()
            self._file = None

    def _settle(self) -> None:
        if self._file is not None:
            self._file.release()
            self._file = None
        callbacks, self._settled_callbacks = self._settled_callbacks, []
        for f in callbacks:
            f(self)


@dataclass(frozen=True)
class _Packed:
    path: str
    sha256: str
    size: int


def _hash_and_pack(path: str, packed: str) -> tuple[str, int, _Packed | None]:
    """The sha256 and size of the file at ``path``, and its gzip form written to
    ``packed`` when it is worth serving (in the disk pool, one read of the file)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f, open(packed, "wb") as out:
        # No name and no time in the header: the same document, the same bytes.
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=1) as gz:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
                gz.write(chunk)
    if size < PACK_MIN:
        os.unlink(packed)
        return h.hexdigest(), size, None
    ph = hashlib.sha256()
    psize = 0
    with open(packed, "rb") as f:
        while chunk := f.read(1 << 20):
            ph.update(chunk)
            psize += len(chunk)
    return h.hexdigest(), size, _Packed(packed, ph.hexdigest(), psize)


def _gunzip(src: str, dst: str, limit: int) -> None:
    """Decompress the gzip file ``src`` into ``dst`` (in the disk pool).

    :raises ValueError: it is not gzip, or it expands past ``limit`` bytes.
    """
    total = 0
    try:
        with gzip.open(src, "rb") as g, open(dst, "wb") as f:
            while chunk := g.read(1 << 20):
                total += len(chunk)
                if total > limit:
                    raise ValueError(f"the document expands past {limit >> 20} MiB")
                f.write(chunk)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"bad gzip body: {e}") from None


class _Known:
    """A digest already computed elsewhere, in the hasher interface."""

    def __init__(self, hexdigest: str) -> None:
        self._hex = hexdigest

    def update(self, data: bytes, /) -> None:
        raise AssertionError("nothing more is hashed")

    def hexdigest(self) -> str:
        return self._hex


def _append_and_hash(body: bytearray, data: bytes, hashers: dict[str, Any]) -> int:
    """A body's next piece, kept in memory: a small download's, or the rest of one the
    disk refused (then run in the pool, one piece at a time)."""
    body += data
    for h in hashers.values():
        h.update(data)
    return len(data)


def _write_and_hash(fd: int, data: bytes, offset: int, hashers: dict[str, Any]) -> int:
    """Runs in the disk pool: one writer per fetch at a time, so order is kept."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        offset += n
        view = view[n:]
    for h in hashers.values():
        h.update(data)
    return len(data)


def _stored_headers(resp: UpstreamResponse, url: str) -> dict[bytes, bytes]:
    out = {}
    for name in STORED_HEADERS:
        v = resp.header(name)
        if v is not None:
            out[name] = v
    enc = out.get(b"content-encoding", b"").strip().lower()
    if enc in (b"", b"identity") or url.split("?")[0].endswith(COMPRESSED_SUFFIXES):
        # The wire bytes of a .gz/.xz/.deb are the file itself: never announce them as
        # content-coded, or a client would unpack them on the fly.
        out.pop(b"content-encoding", None)
    return out


class _BodySink(Protocol):
    """Receives the upstream body; enforces the idle timeout; exposes flow control."""

    def __init__(self, fetch: Fetch, clock: IReactorTime, idle_timeout: float) -> None:
        self._fetch = fetch
        self._clock = clock
        self._timeout = idle_timeout
        self._timer: IDelayedCall | None = None
        self._paused = False
        self._timed_out = False

    def connectionMade(self) -> None:
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._timeout)
        else:
            self._timer = self._clock.callLater(self._timeout, self._idle)

    def _idle(self) -> None:
        log.warn("upstream went silent for {t}s", t=self._timeout)
        self._timed_out = True
        self.abort()

    def dataReceived(self, data: bytes) -> None:
        if not self._paused:
            self._arm()
        self._fetch._data(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._timed_out:
            # A body delimited by the connection's end would look complete after the
            # abort: it was cut off here, so it is a failure whatever Twisted says.
            reason = Failure(UpstreamError("timeout", "upstream went silent mid-body", 504))
        self._fetch._ended(reason)

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self._arm()
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]
