"""How the proxy writes an answer: one :class:`Responder` type for every answer.

Root decides what a request gets and picks a responder; the responder writes the status,
the headers and the body, and finishes the request (or hands it to a producer that
will). The kinds:

- :class:`Stored`: a committed cache entry: 304, Range, a small file read at once (and
  remembered by the hit path), a large one by sendfile or the disk-pool producer;
- :class:`Streamed`: the body of a running fetch, joined while it downloads;
- :class:`Small`: a small upstream answer held in memory (a 404 and its page);
- :class:`Local`: an answer a family makes itself (``/v2/``'s ``{}``, a redirect);
- :class:`Error`: the one-line error, in the family's format (:func:`reason`).

Every error a client gets from the proxy (not relayed from an upstream) is written by
:func:`reason`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import Request

from pkgproxy.cache.keys import PACKED
from pkgproxy.cache.store import CacheStore, Entry
from pkgproxy.diskpool import DiskPool
from pkgproxy.families import FAMILIES, CacheClass, LocalAnswer
from pkgproxy.fetch.fetch import Fetch
from pkgproxy.web import conditional
from pkgproxy.web.exchange import Exchange
from pkgproxy.web.fast import HitPath
from pkgproxy.web.producer import (
    BodyProducer,
    CompleteSource,
    FileRef,
    OwnedFile,
    SendfileProducer,
    frame_as_upstream,
)

log = Logger()

VIA = b"1.1 pkgproxy"


def reason(request: Request, code: int, message: str, family: str | None = None) -> bytes:
    """A one-line error: what went wrong and, where it helps, what to do.

    Plain text, unless the family's clients read errors in a format of their own.
    Sets the status and headers; returns the body (empty for a HEAD).
    """
    request.setResponseCode(code)
    formatter = FAMILIES[family].error_body if family in FAMILIES else None
    if formatter is not None:
        content_type, body = formatter(code, message)
        request.setHeader(b"content-type", content_type.encode("latin-1"))
    else:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        body = f"pkgproxy: {message}\n".encode()
    request.setHeader(b"via", VIA)
    request.setHeader(b"content-length", str(len(body)).encode())
    return b"" if request.method == b"HEAD" else body


class Responder(Protocol):
    """Writes one whole answer to an exchange's client."""

    def respond(self, ex: Exchange) -> None: ...


@dataclass(frozen=True)
class Means:
    """What the responders that send bodies from disk share (one per server).

    :ivar unreadable: called with ``(exchange, entry, why)`` when a cache file cannot
        be read: root drops the entry and asks again once.
    """

    store: CacheStore
    pool: DiskPool
    clock: IReactorTime
    sync_read_max: int
    hit_path: HitPath
    unreadable: Callable[[Exchange, Entry, str], None]


@dataclass(frozen=True)
class Error:
    """The proxy's own one-line error, in the route family's format."""

    code: int
    message: str

    def respond(self, ex: Exchange) -> None:
        if ex.gone:
            return
        body = reason(ex.request, self.code, self.message, ex.route.family)
        if body:
            ex.request.write(body)
        ex.request.finish()


@dataclass(frozen=True)
class Local:
    """An answer the family gives without asking upstream (a redirect, a 404, ``{}``)."""

    answer: LocalAnswer

    def respond(self, ex: Exchange) -> None:
        answer, req = self.answer, ex.request
        for k, v in answer.headers.items():
            req.setHeader(k.encode(), v.encode("latin-1"))
        if answer.location is not None:
            req.setHeader(b"location", answer.location.encode("latin-1"))
        if answer.status >= 300:
            Error(answer.status, answer.message).respond(ex)
            return
        body = answer.message.encode()
        req.setResponseCode(answer.status)
        req.setHeader(b"content-type", answer.content_type.encode("latin-1"))
        req.setHeader(b"via", VIA)
        send_whole(req, body)


@dataclass(frozen=True)
class Small:
    """A small upstream answer held in memory (a 404, a 500 and its page)."""

    status: int
    headers: Mapping[bytes, bytes]
    body: bytes
    x_cache: bytes

    def respond(self, ex: Exchange) -> None:
        req = ex.request
        req.setResponseCode(self.status)
        for k, v in self.headers.items():
            req.setHeader(k, v)
        req.setHeader(b"via", VIA)
        req.setHeader(b"x-cache", self.x_cache)
        send_whole(req, self.body)


class Stored:
    """A committed cache entry: conditional, ranged, read at once or produced from disk."""

    __slots__ = ("_means", "_entry", "_x_cache")

    def __init__(self, means: Means, entry: Entry, x_cache: bytes) -> None:
        self._means = means
        self._entry = entry
        self._x_cache = x_cache

    def respond(self, ex: Exchange) -> None:
        means, entry, req, decision = self._means, self._entry, ex.request, ex.decision
        if decision.rewrite is not None and conditional.takes_gzip(
            req.getHeader(b"accept-encoding")
        ):
            # The gzip form stored beside a rewritten document, if it is of this one.
            sibling = means.store.get(entry.key + PACKED)
            if sibling is not None and sibling.etag == entry.sha256:
                entry = sibling
        etag = f'"{entry.sha256}"'
        own = entry.digests.get(decision.etag_digest or "")
        if own is not None:
            etag = f'"{own}"'
        elif entry.etag and decision.rewrite is None:
            etag = entry.etag
        set_headers(
            req,
            entry.headers,
            decision.response_headers,
            self._x_cache,
            etag,
            entry.last_modified,
        )
        if conditional.not_modified(req, etag, entry.last_modified):
            req.setResponseCode(http.NOT_MODIFIED)
            req.finish()
            return
        span = conditional.choose_range(req, entry.size, etag, entry.last_modified)
        if span is None:
            return
        start, end = span
        if req.method == b"HEAD":
            req.finish()
            return
        path = means.store.path_of(entry)
        if entry.size <= means.sync_read_max:
            # A small file from a local disk is cheaper to read here than to hand to a
            # thread and back; most package files and every index hit are small.
            try:
                data = _read_span(path, start, end)
            except OSError as e:
                means.unreadable(ex, entry, str(e))
                return
            if self._x_cache == b"HIT" and end - start == entry.size:
                _remember_hit(means.hit_path, ex, entry, data)
            req.write(data)
            req.finish()
            return
        means.store.pin(entry)
        d = means.pool.run(_open_read, path)

        def opened(fd: int) -> None:
            unpin = lambda: means.store.unpin(entry)  # noqa: E731
            if ex.gone:
                OwnedFile(fd).release()
                unpin()
                return
            if SendfileProducer.usable(req):
                SendfileProducer(req, OwnedFile(fd), start, end, means.clock, unpin).start()
                return
            BodyProducer(
                req,
                OwnedFile(fd),
                CompleteSource(entry.size),
                start,
                end,
                means.pool,
                means.clock,
                on_close=unpin,
            ).start()

        def missing(f: Failure) -> None:
            means.store.unpin(entry)
            means.unreadable(ex, entry, f.getErrorMessage())

        d.addCallbacks(opened, missing)


class Streamed:
    """The body of a running fetch, sent as it arrives (the client subscribes to it)."""

    __slots__ = ("_means", "_fetch", "_file", "_x_cache")

    def __init__(self, means: Means, fetch: Fetch, file: FileRef, x_cache: bytes) -> None:
        self._means = means
        self._fetch = fetch
        self._file = file
        self._x_cache = x_cache

    def respond(self, ex: Exchange) -> None:
        means, fetch, file, req, decision = (
            self._means,
            self._fetch,
            self._file,
            ex.request,
            ex.decision,
        )
        up = fetch.upstream
        etag_b = up.header(b"etag") if up is not None else None
        lm_b = up.header(b"last-modified") if up is not None else None
        etag = etag_b.decode("latin-1") if etag_b else None
        lm = lm_b.decode("latin-1") if lm_b else None
        headers = {k.decode(): v.decode("latin-1") for k, v in fetch.headers.items()}
        packed = fetch.document_gz
        if (
            packed is not None
            and decision.rewrite is not None
            and req.getHeader(b"range") is None
            and conditional.takes_gzip(req.getHeader(b"accept-encoding"))
        ):
            # The gzip form, in memory until stored, as a hit would be sent it.
            file.release()
            body, digest = packed
            gz_etag = f'"{digest}"'
            headers["content-encoding"] = "gzip"
            set_headers(
                req, headers, decision.response_headers, self._x_cache, gz_etag, lm, ranges=False
            )
            if conditional.not_modified(req, gz_etag, lm):
                req.setResponseCode(http.NOT_MODIFIED)
                req.finish()
                return
            send_whole(req, body)
            return
        if decision.rewrite is not None:
            etag = f'"{fetch.sha256}"'  # this is our representation, not the upstream's
        # A part is sent only with the ETag it belongs to; a body whose own ETag is
        # known once it is complete goes out whole, without one.
        ranges = fetch.length is not None and decision.etag_digest is None
        if decision.etag_digest is not None:
            etag = None
        set_headers(req, headers, decision.response_headers, self._x_cache, etag, lm, ranges=ranges)
        if etag is not None and conditional.not_modified(req, etag, lm):
            # The client's copy is current even though the cache had to fetch (an
            # upstream that answers If-None-Match with a full 200, as npm's does).
            file.release()
            req.setResponseCode(http.NOT_MODIFIED)
            req.finish()
            return
        start, end = 0, fetch.length
        if ranges:
            assert fetch.length is not None
            span = conditional.choose_range(req, fetch.length, etag, lm)
            if span is None:
                file.release()
                return
            start, end = span
        if req.method == b"HEAD":
            file.release()
            req.finish()
            return
        want = fetch.request.decision
        # (Nor is such a body stored: fetch.finish.storable.)
        frame_as_upstream(req, up, want.size is not None or bool(want.digests))
        closed = fetch.subscribe()

        def unstarted(_: Request) -> None:
            # The fetch failed before the first byte was sent (a download the disk
            # refused and memory could not take on): a response of its own.
            err = fetch.error
            for name, _values in list(req.responseHeaders.getAllRawHeaders()):
                req.responseHeaders.removeHeader(name)
            Error(
                err.gateway_status if err is not None else http.BAD_GATEWAY,
                str(err) if err is not None else "the download failed",
            ).respond(ex)

        BodyProducer(
            req,
            file,
            fetch,
            start,
            end,
            means.pool,
            means.clock,
            closed,
            means.sync_read_max,
            unstarted,
        ).start()


def send_whole(req: Request, body: bytes) -> None:
    """Answer with ``body``, held in memory: its length, then it (not for HEAD)."""
    req.setHeader(b"content-length", b"%d" % len(body))
    if req.method != b"HEAD":
        req.write(body)
    req.finish()


def _remember_hit(hit_path: HitPath, ex: Exchange, entry: Entry, body: bytes) -> None:
    """Let the hit path replay this answer to the next identical request.

    Content pinned by the family (immutable, or named by an index) is answered the same
    way while the entry lasts; an index only while it is fresh.
    """
    decision = ex.decision
    if (
        decision.cache_class is CacheClass.IMMUTABLE
        or decision.digests
        or decision.size is not None
    ):
        hit_path.remember(ex.request, entry, ex.route, False, body)
    elif entry.expires is not None:
        hit_path.remember(ex.request, entry, ex.route, True, body)


def set_headers(
    req: Request,
    headers: Mapping[str, str],
    extra: Mapping[str, str],
    x_cache: bytes,
    etag: str | None,
    last_modified: str | None,
    ranges: bool = True,
) -> None:
    """The headers of an answer with a body: the stored or upstream ones, the family's,
    the validators, and the proxy's own."""
    for k, v in headers.items():
        req.setHeader(k.encode(), v.encode("latin-1"))
    for k, v in extra.items():
        req.setHeader(k.encode(), v.encode("latin-1"))
    if etag:
        req.setHeader(b"etag", etag.encode("latin-1"))
    if last_modified:
        req.setHeader(b"last-modified", last_modified.encode("latin-1"))
    if ranges:
        req.setHeader(b"accept-ranges", b"bytes")
    req.setHeader(b"via", VIA)
    req.setHeader(b"x-cache", x_cache)


def _read_span(path: str, start: int, end: int) -> bytes:
    """``[start, end)`` of a small file; a short read is an error, never a short body."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, end - start, start)
    finally:
        os.close(fd)
    if len(data) != end - start:
        raise OSError(f"short read: {len(data)} of {end - start} bytes")
    return data


def _open_read(path: str) -> int:
    return os.open(path, os.O_RDONLY)


def internal_error(f: Failure, ex: Exchange) -> None:
    """A bug while answering: logged with its traceback; the client gets a 500."""
    log.failure("request for {url} failed", f, url=ex.url)
    Error(http.INTERNAL_SERVER_ERROR, "internal error").respond(ex)
