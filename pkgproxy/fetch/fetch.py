"""One upstream fetch of one cache key, shared by every client that wants it.

The body goes to a temp file as it arrives, hashed on the way (in the disk pool, so the
reactor never hashes); every subscriber reads that file at its own pace through
:class:`~pkgproxy.web.producer.BodyProducer`. The temp file is the buffer, so a slow
client costs disk reads, not memory, and never slows the others. Only a complete 200
whose length and digests check out is committed; anything else is discarded and every
subscriber's response ends as a failed transfer.

This module is the state machine; the body's buffer is :mod:`pkgproxy.fetch.body`,
the checks :mod:`pkgproxy.fetch.verify`, and what is stored :mod:`pkgproxy.fetch.finish`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pkgproxy import httputil
from pkgproxy.cache.keys import PACKED as PACKED
from pkgproxy.families import (
    COMPRESSED_SUFFIXES,
    Decision,
    Learned,
    RewriteContext,
    new_hasher,
)
from pkgproxy.fetch import finish, verify
from pkgproxy.fetch.body import (
    DOCUMENT_BUDGET,
    Body,
    BodyReceiver,
    BodyWriter,
    MemoryBody,
    SharedFile,
)
from pkgproxy.fetch.body import SPILL_BUDGET as SPILL_BUDGET
from pkgproxy.fetch.finish import Known, Packed
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
    on_verified: Callable[[Fetch], object] | None = None
    #: Passed to the decision's rewriter, if it has one.
    rewrite_context: RewriteContext | None = None


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
        #: A relinked document's bytes, from its verification until it is settled, and
        #: its gzip form's with that form's sha256 (what its clients are sent from).
        self.document: bytes | None = None
        self.document_gz: tuple[bytes, str] | None = None
        #: The gzip form of a rewritten document, committed beside it.
        self._packed: Packed | None = None
        self._subscribers = 0
        self.started_at = clock.seconds()
        #: When the upstream's answer was known (headers, or the error).
        self.answered_at = self.started_at
        self._file: Body | None = None
        #: What a document received in memory reserved of :data:`DOCUMENT_BUDGET`.
        self._held = 0
        self._temp: str | None = None
        self._hashers: dict[str, Any] = {}
        #: Digests the body must have: the family's, and one a response header names.
        self._expected: dict[str, str] = dict(request.decision.digests)
        self._answer_waiters: list[Deferred[Fetch]] = []
        self._progress_waiters: list[Deferred[None]] = []
        self._settled_callbacks: list[Callable[[Fetch], None]] = []
        self._writer: BodyWriter | None = None
        self._sink: BodyReceiver | None = None
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

    def open_body(self) -> Body | None:
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
            digest = verify.named_digest(named)
            if digest is not None:
                # Verified like any other digest, before anything is stored.
                self._expected[digest[0]] = digest[1]
                self.headers[header.lower().encode()] = named.encode("latin-1")
        length = resp.response.length
        self.length = length if isinstance(length, int) else None
        msg = verify.announced_mismatch(self.length, self.request.decision.size)
        if msg is not None:
            resp.discard()
            self.state = State.ANSWERED
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
            self._file = MemoryBody()
            self._start_body(resp)
            return None
        if (
            self.request.decision.relink is not None
            and self.length is not None
            and self.length <= finish.RELINK_MAX
            and DOCUMENT_BUDGET.take(self.length)
        ):
            # A document to relink in memory is received there: its rewrite starts
            # with its last byte, not after the disk writes of the ones before it.
            self._held = self.length
            self._file = MemoryBody()
            self._start_body(resp)
            return None
        # Creating a file costs a journal update: never in the reactor thread.
        d = self._pool.run(os.open, temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)

        def opened(fd: int) -> None:
            self._file = SharedFile(fd)
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
        assert self._file is not None
        self._writer = writer = BodyWriter(
            self._file,
            self._hashers,
            self._pool,
            url=self.request.url,
            length=self.length,
            may_spill=self.request.decision.rewrite is None,
            on_written=self._wrote,
            on_finished=self._finish_body,
            on_refused=self._disk_failure,
            disk_error=self._store.disk_error,
        )
        self._sink = writer.flow = BodyReceiver(
            writer.add, self._ended, self._clock, self._idle_timeout
        )
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
        """The stored entry is current again (see :func:`finish.refresh`)."""
        now = self._clock.seconds()
        lifetime = finish.ttl(self.request.decision, resp, now)
        finish.refresh(self._store, entry, resp, now, lifetime, validators)
        self.entry = entry

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

    # -- body, called by the receiver and the writer -------------------------------

    def _ended(self, reason: Failure) -> None:
        if self.upstream is not None:
            self.upstream.release()
        if self._writer is not None:
            self._writer.end(reason)

    def _wrote(self, n: int) -> None:
        self.written += n
        self._notify()

    def _disk_failure(self, why: str) -> None:
        if self._sink is not None:
            self._sink.abort()
        self._fail(f"cache disk error: {why}", "disk")

    def _finish_body(self, reason: Failure) -> None:
        problem = self._check(reason)
        if problem is not None:
            log.warn("not caching {url}: {problem}", url=self.request.url, problem=problem.why)
            self._fail(problem.why, problem.kind)
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

        def compared(versions: tuple[float | None, float | None]) -> None:
            new, old = versions
            if finish.older(new, old):
                assert new is not None and old is not None
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

        self._pool.run(finish.versions, version_of, body, stored).addCallbacks(compared, failed)

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
        held = self._file.data if isinstance(self._file, MemoryBody) else None
        if held is not None:
            self._temp = None  # a name only: the rewrite removes any file it makes of it

        def swapped(done: finish.Rewritten) -> None:
            self._release_held()
            self.learned = done.learned
            self.document = done.document
            if done.document_gz is not None and done.packed is not None:
                self.document_gz = (done.document_gz, done.packed.sha256)
            if plain is not None:
                del self.headers[b"content-encoding"]
            self._discard_temp()
            self._packed = done.packed
            self._temp, self._file = out, SharedFile(done.fd)
            self.written = self.length = done.size
            self._hashers = {"sha256": Known(done.sha256)}
            self._done(reason)
            self._answer(Outcome.STREAM)

        def failed(f: Failure) -> None:
            self._release_held()
            if f.check(ValueError):
                # The document is not what its format says: each rewriter says how.
                log.warn(
                    "cannot rewrite {url}: {why}", url=self.request.url, why=f.getErrorMessage()
                )
            else:
                log.failure("rewriting {url} failed", f, url=self.request.url)
            self._store.discard(out)
            self._store.discard(packed)
            self._fail(f"cannot rewrite the upstream document: {f.getErrorMessage()}")

        work = self._pool.run_cpu(
            finish.rewrite_document,
            rewrite,
            context,
            raw,
            out,
            plain,
            packed,
            self.request.decision.relink,
            held,
        )
        work.addCallbacks(swapped, failed)

    def _done(self, reason: Failure) -> None:
        self.sha256 = self._hashers["sha256"].hexdigest()
        self.state = State.DONE
        if self.request.on_verified is not None:
            self.request.on_verified(self)
        self._notify()
        if self._storable(reason):
            self._commit()
        else:
            self._discard_temp()
            self._settle()

    def _check(self, reason: Failure) -> verify.Problem | None:
        """What is wrong with the body received (see :func:`verify.check`), or ``None``."""
        return verify.check(
            error=verify.transfer_error(reason),
            written=self.written,
            announced=self.length,
            size=self.request.decision.size,
            expected=self._expected,
            got={algo: self._hashers[algo].hexdigest() for algo in self._expected},
        )

    def _storable(self, reason: Failure) -> bool:
        assert self.upstream is not None
        return finish.storable(
            self.request.decision,
            spilled=isinstance(self._file, SharedFile) and self._file.spill is not None,
            cache_control=self.upstream.header(b"cache-control"),
            open_ended=verify.open_ended(reason),
        )

    def _commit(self) -> None:
        resp = self.upstream
        assert resp is not None and self._temp is not None and self.sha256 is not None
        entry = finish.new_entry(
            key=self.key,
            url=self.request.url,
            decision=self.request.decision,
            resp=resp,
            headers=self.headers,
            size=self.written,
            digests={
                **self.request.decision.named_digests,
                **{a: h.hexdigest() for a, h in self._hashers.items()},
            },
            now=self._clock.seconds(),
        )
        body = bytes(self._file.data) if isinstance(self._file, MemoryBody) else None
        packed, self._packed = self._packed, None
        rewritten = self.request.decision.rewrite is not None

        def committed(e: Entry | None) -> Deferred[None] | None:
            if e is None:
                return None
            self.entry = e
            return finish.commit_packed(self._store, e, packed, rewritten)

        d = finish.commit(self._store, entry, self._temp, body, packed)
        d.addCallback(committed)
        d.addBoth(lambda _: self._settle())

    def _fail(self, why: str, kind: str = "transfer") -> None:
        self.state = State.FAILED
        if self._writer is not None:
            self._writer.stop()
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

    def _release_held(self) -> None:
        """Give back what a document received in memory reserved."""
        if self._held:
            DOCUMENT_BUDGET.give(self._held)
            self._held = 0

    def _settle(self) -> None:
        self._release_held()
        if self._file is not None:
            self._file.release()
            self._file = None
        callbacks, self._settled_callbacks = self._settled_callbacks, []
        for f in callbacks:
            f(self)
        self.document = None
        self.document_gz = None


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
