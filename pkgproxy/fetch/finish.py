"""Finishing a verified download: what is stored, how, and what a stale copy becomes.

- :func:`storable`: whether a verified body may be kept (a pass-through, a body part of
  which never reached the disk, an upstream's ``no-store``, or a body cut by the
  connection with nothing to check its length against are served, not kept).
- :func:`commit`: the cache entry and its atomic commit, with the gzip form of a
  rewritten document beside it (:data:`~pkgproxy.cache.keys.PACKED`).
- :func:`refresh`: a stale entry is current again (a 304, or a body found older).
- :func:`versions` and :func:`older`: the "never back in time" rule: a revalidation that
  brings a body older than the stored one (a mirror lagging behind another) keeps the
  stored one.
- :func:`rewrite_document`: the disk-pool work that turns a verified upstream document
  into the one clients are served.

Functions named for the disk pool do file I/O and run there; the rest run in the reactor.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pkgproxy import deflate, httputil
from pkgproxy.cache.keys import PACKED
from pkgproxy.families import (
    VERSION_HEAD,
    CacheClass,
    Decision,
    Learned,
    Relinker,
    Rewriter,
    new_hasher,
)
from pkgproxy.rewrite.context import RewriteContext
from pkgproxy.upstream.client import UpstreamResponse

if TYPE_CHECKING:
    from pkgproxy.cache.store import CacheStore, Entry
    from pkgproxy.fetch.body import Body

log = Logger()

#: Rewritten documents smaller than this are not worth a gzip form.
PACK_MIN = 1024
#: A gzip-compressed document to rewrite may expand to this much, no more.
MAX_DOCUMENT = 1024 * 1024 * 1024


def storable(
    decision: Decision, *, spilled: bool, cache_control: bytes | None, open_ended: bool
) -> bool:
    """Whether a verified body may be committed.

    :param spilled: part of the body was held in memory after a disk error.
    :param cache_control: the upstream's ``Cache-Control``.
    :param open_ended: the body ended with the connection, no length announced.
    """
    if decision.cache_class is CacheClass.PASS:
        return False
    if spilled:
        return False  # part of it never reached the disk
    if decision.cache_class is CacheClass.MUTABLE and not httputil.storable(cache_control):
        return False
    if open_ended and not (decision.digests or decision.size):
        # The body ended with the connection and nothing says how long it should
        # be: it may be truncated, so it is served but not kept.
        return False
    return True


def ttl(decision: Decision, resp: UpstreamResponse, now: float) -> float:
    """How long a copy of ``resp`` stays fresh: the family's TTL, else the upstream's."""
    if decision.ttl is not None:
        return decision.ttl
    return httputil.freshness_lifetime(
        resp.header(b"cache-control"),
        resp.header(b"expires"),
        resp.header(b"date"),
        resp.header(b"last-modified"),
        now,
    )


def refresh(
    store: CacheStore,
    entry: Entry,
    resp: UpstreamResponse,
    now: float,
    lifetime: float,
    validators: bool = True,
) -> None:
    """The stored entry is current again; with ``validators``, under the ones ``resp``
    names (a 304), else under its own (an older body that was dropped)."""
    etag = resp.header(b"etag") if validators else None
    lm = resp.header(b"last-modified") if validators else None
    if etag:
        entry.etag = etag.decode("latin-1")
    if lm:
        entry.last_modified = lm.decode("latin-1")
    entry.fetched = now
    if entry.expires is not None:
        entry.expires = now + lifetime
    store.update(entry)
    sibling = store.peek(entry.key + PACKED)
    if sibling is not None and sibling.etag == entry.sha256:
        sibling.fetched, sibling.expires = entry.fetched, entry.expires
        store.update(sibling)


@dataclass(frozen=True)
class Packed:
    """The gzip form of a rewritten document, in a temp file."""

    path: str
    sha256: str
    size: int


def new_entry(
    *,
    key: str,
    url: str,
    decision: Decision,
    resp: UpstreamResponse,
    headers: dict[bytes, bytes],
    size: int,
    digests: dict[str, str],
    now: float,
) -> Entry:
    """The cache entry of a verified body (``digests`` has its sha256 and every other
    digest computed while it was received)."""
    from pkgproxy.cache.store import Entry

    immutable = decision.cache_class is CacheClass.IMMUTABLE
    etag = resp.header(b"etag")
    lm = resp.header(b"last-modified")
    return Entry(
        key=key,
        url=url,
        file="",
        size=size,
        sha256=digests["sha256"],
        headers={k.decode(): v.decode("latin-1") for k, v in headers.items()},
        etag=etag.decode("latin-1") if etag else None,
        last_modified=lm.decode("latin-1") if lm else httputil.http_date(now),
        fetched=now,
        expires=None if immutable else now + ttl(decision, resp, now),
        last_access=now,
        digests={a: h for a, h in digests.items() if a != "sha256"},
    )


def commit(
    store: CacheStore, entry: Entry, temp: str, data: bytes | None, packed: Packed | None
) -> Deferred[Entry | None]:
    """Commit ``entry`` (its body in ``temp``, or ``data`` for one held in memory); fires
    with the committed entry, or ``None`` if it could not be (logged; the gzip form
    ``packed`` is then discarded)."""

    def failed(f: Failure) -> None:
        log.failure("cannot commit {url} to the cache", f, url=entry.url)
        if packed is not None:
            store.discard(packed.path)

    return store.commit(entry, temp, data).addErrback(failed)


def commit_packed(
    store: CacheStore, entry: Entry, packed: Packed | None, rewritten: bool
) -> Deferred[None] | None:
    """Store the gzip form of a rewritten document beside it (see :data:`PACKED`)."""
    from pkgproxy.cache.store import Entry

    if packed is None:
        if rewritten:
            store.remove(entry.key + PACKED)  # the gzip form of an older one
        return None
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
        log.failure("cannot commit the gzip form of {url}", f, url=entry.url)

    return store.commit(sibling, packed.path).addCallbacks(lambda _: None, failed)


# -- never back in time --------------------------------------------------------------


def versions(
    version_of: Callable[[bytes], float | None], body: Body, stored: str
) -> tuple[float | None, float | None]:
    """Disk pool: the version stamps of the new ``body`` and of the stored file."""
    new = version_of(body.read(VERSION_HEAD, 0))
    try:
        with open(stored, "rb") as f:
            old = version_of(f.read(VERSION_HEAD))
    except OSError:
        old = None  # gone meanwhile: nothing to keep
    return new, old


def older(new: float | None, old: float | None) -> bool:
    """Whether a body stamped ``new`` is older than the stored one stamped ``old``."""
    return new is not None and old is not None and new < old


# -- rewriting ------------------------------------------------------------------------


@dataclass(frozen=True)
class Rewritten:
    """A rewritten document, open and hashed, ready to serve.

    :ivar learned: what the upstream's document teaches, read in the same pass; ``None``
        when it is not learned from, or (a ``document``, relinked) when it is learned
        from one file's entry at a time, as files are asked for.
    """

    fd: int
    sha256: str
    size: int
    learned: Learned | None
    packed: Packed | None
    #: The relinked document's bytes, for its files' lookups until it is committed.
    document: bytes | None = None
    #: Its gzip form's bytes, for the clients of this fetch that take gzip.
    document_gz: bytes | None = None


#: A document rewritten in memory by its bytes (:attr:`Decision.relink`) is at most this
#: large (it is held twice, as received and as served, for a moment; parsed, it would
#: take several times that); a larger one takes the file-based rewriter.
RELINK_MAX = 32 * 1024 * 1024


def rewrite_document(
    rewrite: Rewriter,
    context: RewriteContext,
    raw: str,
    out: str,
    plain: str | None,
    packed: str,
    relink: Relinker | None = None,
    held: bytes | bytearray | None = None,
) -> Rewritten:
    """Disk pool: rewrite the verified document ``raw`` into ``out`` (through ``plain``
    when it came gzip-compressed), hash it and write its gzip form to ``packed``.

    With ``relink``, a document of up to :data:`RELINK_MAX` bytes is first tried in
    memory: decompressed, rewritten by its bytes, hashed and compressed without a
    parse or a second read. ``held`` is the document as received, when it was received
    in memory (``raw`` is then only its name, written if the file path needs it).
    """
    data = _small_document(raw, plain is not None, held) if relink is not None else None
    if data is not None and relink is not None:
        served = relink(data, context)
        if served is not None:
            del data
            return _write_relinked(served, out, packed)
    # The file path. A document received in memory reaches a file only where that
    # path reads one (as received, or decompressed), and is removed again after.
    written = held is not None and (plain is None or data is None)
    if written:
        assert held is not None
        with open(raw, "wb") as f:
            f.write(held)
    try:
        if plain is None:
            learned = rewrite(raw, out, context)
        else:
            # Taken compressed (verified as the upstream sent it); rewritten and
            # served as the document itself.
            try:
                if data is None:
                    gunzip(raw, plain, MAX_DOCUMENT)
                else:
                    with open(plain, "wb") as f:
                        f.write(data)
                    del data
                learned = rewrite(plain, out, context)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(plain)
    finally:
        if written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(raw)
    digest, size, gz = hash_and_pack(out, packed)
    return Rewritten(os.open(out, os.O_RDWR), digest, size, learned, gz)


def _small_document(
    raw: str, compressed: bool, held: bytes | bytearray | None = None
) -> bytes | None:
    """The document in ``raw`` (or ``held``; decompressed), if it is at most
    :data:`RELINK_MAX` bytes and (compressed) one whole gzip member; ``None`` leaves it
    to the file path."""
    data: bytes | bytearray
    if held is not None:
        data = held
    elif os.path.getsize(raw) > RELINK_MAX:
        return None
    else:
        with open(raw, "rb") as f:
            data = f.read()
    if len(data) > RELINK_MAX:
        return None
    if not compressed:
        return bytes(data)  # (no copy of bytes read from the file)
    try:
        return deflate.inflate_whole(data, RELINK_MAX)
    except deflate.ERRORS:
        return None  # the file path says what is wrong with it


def _write_relinked(served: bytes, out: str, packed: str) -> Rewritten:
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(served)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    digest = hashlib.sha256(served).hexdigest()
    gz: Packed | None = None
    body: bytes | None = None
    if len(served) >= PACK_MIN:
        body = deflate.compress(served)
        with open(packed, "wb") as f:
            f.write(body)
        gz = Packed(packed, hashlib.sha256(body).hexdigest(), len(body))
    return Rewritten(
        fd,
        digest,
        len(served),
        None,
        gz,
        document=served,
        document_gz=body,
    )


def hash_and_pack(path: str, packed: str) -> tuple[str, int, Packed | None]:
    """The sha256 and size of the file at ``path``, and its gzip form written to
    ``packed`` when it is worth serving (in the disk pool, one read of the file; the
    gzip form is hashed as it is written)."""
    h, ph = hashlib.sha256(), hashlib.sha256()
    size = psize = 0
    with open(path, "rb") as f, open(packed, "wb") as out:
        gz = deflate.deflater()
        while True:
            chunk = f.read(1 << 20)
            if chunk:
                h.update(chunk)
                size += len(chunk)
            piece = gz.compress(chunk) if chunk else gz.flush()
            ph.update(piece)
            psize += len(piece)
            out.write(piece)
            if not chunk:
                break
    if size < PACK_MIN:
        os.unlink(packed)
        return h.hexdigest(), size, None
    return h.hexdigest(), size, Packed(packed, ph.hexdigest(), psize)


def digest_file(path: str, algos: Sequence[str]) -> dict[str, str]:
    """The digests ``algos`` (any a family defines) of the file at ``path`` (in the disk
    pool, one read)."""
    hashers = {a: new_hasher(a) for a in algos}
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}


def gunzip(src: str, dst: str, limit: int) -> None:
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


class Known:
    """A digest already computed elsewhere, in the hasher interface."""

    def __init__(self, hexdigest: str) -> None:
        self._hex = hexdigest

    def update(self, data: bytes, /) -> None:
        raise AssertionError("nothing more is hashed")

    def hexdigest(self) -> str:
        return self._hex
