"""npm packuments as clients are served them: every tarball URL leads back to the proxy.

A packument (``GET /<name>``, full or abbreviated) lists each version's ``dist.tarball``
as an absolute URL on the registry. Served unchanged, it would send npm, yarn and pnpm
straight to the registry for every tarball, past the cache. :func:`rewrite_packument`
parses the document and replaces each tarball URL with the one this client uses for it
through the proxy (``RewriteContext.public_url``); ``integrity`` and ``shasum`` are left
as they are. The document is parsed (what it teaches is read from the same parse); where
every tarball is under the registry's prefix, written plainly, the registry's bytes are
served with that prefix replaced (:mod:`pkgproxy.rewrite.prefix`, which proves that this
is the parsed rewrite); otherwise, as for a document that escapes its slashes
(``https:\\/\\/``), the parsed document is rewritten and serialised again.

Packuments of popular packages reach tens of MB. The rewrite runs in the disk pool, but
a thread only helps the reactor while it lets go of the GIL, and ``json.loads`` and
``json.dumps`` in C hold it for a whole document (a third of a second for 30 MB of small
objects). So the parser calls back into Python for every object it builds, and the
writer encodes the document member by member: either gives the interpreter a point
where the reactor thread can take the GIL every few microseconds of work. Two more
pauses come with millions of objects: the cyclic garbage collector walks every live
container in whichever thread allocates (tens of ms per full pass while a big document
is alive), and freeing a document at once is one long cascade in C. So automatic
collection is held off while a document is alive (:func:`pkgproxy.gcpolicy.quiet`), and
a document is taken apart one version at a time (:func:`dispose`).

Nothing here does network I/O.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urljoin

from pkgproxy import gcpolicy
from pkgproxy.rewrite import prefix

if TYPE_CHECKING:  # pkgproxy.families imports the npm family, which imports this module
    from pkgproxy.rewrite.context import RewriteContext

#: A JSON object as parsed here.
JSONObject = dict[str, Any]
T = TypeVar("T")

_GZIP_MAGIC = b"\x1f\x8b"
#: Encoded output is written to the file in pieces of about this size.
_WRITE_CHUNK = 1 << 20
#: Containers this close to the top of the document are written member by member;
#: below it (one version's manifest, one ``time`` value) each value is encoded at once.
_SPLIT_DEPTH = 2

_encode_utf8 = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_encode_ascii = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


def dispose(doc: JSONObject) -> None:
    """Free a parsed document a version at a time, so no single free holds the GIL long."""
    versions = doc.get("versions")
    if isinstance(versions, dict):
        while versions:
            versions.popitem()
    doc.clear()


def _object(pairs: list[tuple[str, Any]]) -> JSONObject:
    """Build one JSON object; being Python code, it lets other threads run between objects."""
    return dict(pairs)


def load_json(data: bytes) -> Any:
    """Parse a JSON document (UTF-8, -16 or -32, as :func:`json.loads` detects it).

    Same result as ``json.loads(data)``, but the GIL is released between objects; see
    the module docstring.
    """
    return json.loads(data, object_pairs_hook=_object)


@contextmanager
def document(data: bytes) -> Iterator[JSONObject]:
    """The JSON object a stored document's bytes hold, alive for the ``with`` block.

    Automatic garbage collection is held off while it is alive
    (:func:`pkgproxy.gcpolicy.quiet`), and it is taken apart a version at a time when
    the block ends (:func:`dispose`): its user, a family learning from it, need not know.

    :raises ValueError: not a JSON object (an HTML error page, garbage).
    """
    with gcpolicy.quiet():
        doc, _ = read_document(data)
        try:
            yield doc
        finally:
            dispose(doc)


def read_document(data: bytes) -> tuple[JSONObject, bool]:
    """The JSON object in a stored document's bytes, and whether they were gzip-compressed.

    An upstream that gzips the document although pkgproxy asked for ``identity`` stores
    its ``Content-Encoding`` with the body; the document is read through it.

    :raises ValueError: not a JSON object (an HTML error page, garbage).
    """
    compressed = data.startswith(_GZIP_MAGIC)
    if compressed:
        data = gzip.decompress(data)
    return _parse(data, _object), compressed


def _parse(data: bytes, hook: Callable[[list[tuple[str, Any]]], JSONObject]) -> JSONObject:
    """The JSON object ``data`` holds, parsed with ``hook`` building each object (a
    :class:`~pkgproxy.rewrite.prefix.KeyedStrings` only where it is needed).

    :raises ValueError: not a JSON object (an HTML error page, garbage).
    """
    try:
        if isinstance(hook, prefix.KeyedStrings):
            doc = prefix.loads(data, hook)
        else:
            doc = json.loads(data, object_pairs_hook=hook)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and bad UTF-8 included
        raise ValueError(f"not a JSON document: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"not an npm document: the JSON is a {type(doc).__name__}")
    return doc


def _piece(value: Any) -> bytes:
    """``value`` as compact JSON in UTF-8.

    A lone surrogate (``"\\ud800"`` in the source) has no UTF-8 form; such a value is
    written with ASCII escapes instead, as the upstream must have written it.
    """
    try:
        return _encode_utf8(value).encode("utf-8")
    except UnicodeEncodeError:
        return _encode_ascii(value).encode("ascii")


def write_json(value: Any, write: Callable[[bytes], object]) -> None:
    """Serialise ``value`` as compact JSON through ``write``, a piece at a time.

    The top two levels of containers are walked here and everything below them is
    encoded one value at a time, so no single call into the C encoder covers more than
    one version of a package (see the module docstring). Pieces are gathered into
    ``write`` calls of about 1 MB.
    """
    pending: list[bytes] = []
    size = 0

    def emit(data: bytes) -> None:
        nonlocal size
        pending.append(data)
        size += len(data)
        if size >= _WRITE_CHUNK:
            flush()

    def flush() -> None:
        nonlocal size
        if pending:
            write(b"".join(pending))
            pending.clear()
            size = 0

    def walk(v: Any, depth: int) -> None:
        if depth < _SPLIT_DEPTH and isinstance(v, dict):
            emit(b"{")
            for i, (k, member) in enumerate(v.items()):
                emit(b"," + _piece(k) + b":" if i else _piece(k) + b":")
                walk(member, depth + 1)
            emit(b"}")
        elif depth < _SPLIT_DEPTH and isinstance(v, list):
            emit(b"[")
            for i, member in enumerate(v):
                if i:
                    emit(b",")
                walk(member, depth + 1)
            emit(b"]")
        else:
            emit(_piece(v))

    walk(value, 0)
    flush()


def dists(doc: JSONObject) -> Iterator[tuple[str | None, JSONObject]]:
    """``(package name, dist)`` for every version a document describes.

    A packument (full or abbreviated) has ``versions: {version: manifest}``; a single
    version document (``GET /<name>/<version>``) is one manifest with its own ``dist``.
    Anything of another shape (no ``dist``, a ``dist`` that is not an object) is
    skipped: one odd version must not make the whole package uninstallable.
    """
    top_name = doc.get("name")
    name = top_name if isinstance(top_name, str) else None
    versions = doc.get("versions")
    if isinstance(versions, dict):
        for manifest in versions.values():
            if isinstance(manifest, dict):
                dist = manifest.get("dist")
                if isinstance(dist, dict):
                    own = manifest.get("name")
                    yield (own if isinstance(own, str) else name), dist
    dist = doc.get("dist")
    if isinstance(dist, dict):
        yield name, dist


def public_tarball(url: str, context: RewriteContext) -> str | None:
    """The URL a client should fetch the tarball at ``url`` from, or ``None`` to keep it.

    A relative URL is taken relative to the document. Old packuments name the registry
    with ``http://`` where the route reaches it with ``https://`` (or the other way
    round): the same host and path under the other scheme is the same file, which the
    tarball's digests then prove.
    """
    absolute = urljoin(context.page_url, url)
    scheme, sep, rest = absolute.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    public = context.public_url(absolute)
    if public is None:
        other = "https" if scheme.lower() == "http" else "http"
        public = context.public_url(f"{other}://{rest}")
    return public


def rewrite_document(doc: JSONObject, context: RewriteContext) -> int:
    """Point every ``dist.tarball`` of ``doc`` at the proxy, in place; returns how many.

    A tarball no route of this proxy serves (another host) is left as it is, and so is
    a ``tarball`` that is missing or not a string.
    """
    changed = 0
    for _name, dist in dists(doc):
        tarball = dist.get("tarball")
        if not isinstance(tarball, str):
            continue
        public = public_tarball(tarball, context)
        if public is not None and public != tarball:
            dist["tarball"] = public
            changed += 1
    return changed


def _prefix_rewrite(
    data: bytes, doc: JSONObject, seen: list[str] | None, context: RewriteContext
) -> tuple[str, str] | None:
    """``(registry prefix, public prefix)`` if replacing the one by the other in
    ``data`` serves exactly the rewritten document.

    ``None`` when the document does not allow it (see :mod:`pkgproxy.rewrite.prefix`):
    a tarball elsewhere, a relative or escaped URL, or the registry's URL in another
    field. A tarball no route serves, which the parser leaves too, is no obstacle.
    """
    if context.public_prefix is None:
        return None
    found = context.public_prefix(context.page_url)
    if found is None:
        return None
    upstream, public = found
    links: list[str] = []
    for _name, dist in dists(doc):
        tarball = dist.get("tarball")
        if not isinstance(tarball, str):
            continue
        if tarball.startswith(upstream) and "/." not in tarball:
            links.append(tarball)
        elif public_tarball(tarball, context) not in (None, tarball):
            return None
    return found if prefix.exact(data, "tarball", seen, links, upstream, public) else None


def rewrite_packument(
    raw_path: str,
    out_path: str,
    context: RewriteContext,
    learn: Callable[[JSONObject], T] | None = None,
) -> T | None:
    """The npm family's rewriter: read ``raw_path``, write the served form to ``out_path``.

    Runs in the disk pool after the upstream body was verified. A body that is not a
    JSON object raises :class:`ValueError`, so nothing is cached and the client is told
    the upstream answer was unusable. Where every tarball is under the registry's own
    prefix (the usual case), the served bytes are the upstream's with that prefix
    replaced; otherwise the document is rewritten as parsed and written out again. A
    gzip body (an upstream that answered ``Content-Encoding: gzip``) is written back
    gzip-compressed, to match the ``Content-Encoding`` stored with it.

    :param learn: called with the upstream's document before it is rewritten; its
        result is returned (what the document teaches, learned in the same pass).
    """
    with open(raw_path, "rb") as f:
        data = f.read()
    compressed = data.startswith(_GZIP_MAGIC)
    if compressed:
        data = gzip.decompress(data)
    seen = prefix.KeyedStrings("tarball")
    with gcpolicy.quiet():
        doc = _parse(data, seen)
        try:
            learned = learn(doc) if learn is not None else None
            fast = _prefix_rewrite(data, doc, seen.seen(), context)
            with open(out_path, "wb") as f:
                if compressed:
                    # No name and no time in the gzip header: the same document always
                    # gives the same bytes, and so the same ETag for clients.
                    with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
                        _write(data, doc, fast, context, gz.write)
                else:
                    _write(data, doc, fast, context, f.write)
        finally:
            dispose(doc)
    return learned


def _write(
    data: bytes,
    doc: JSONObject,
    fast: tuple[str, str] | None,
    context: RewriteContext,
    write: Callable[[bytes], object],
) -> None:
    if fast is not None:
        prefix.write_replaced(data, *fast, write, _WRITE_CHUNK)
        return
    rewrite_document(doc, context)
    write_json(doc, write)
