"""PyPI's documents as clients are served them: every file link leads back to the proxy.

The simple API (PEP 503 HTML, PEP 691 JSON) and the JSON API list each file with an
absolute URL on the files host (or a relative one on a private index). Served
unchanged, they would send pip and uv past the cache for every download. The rewriters
here replace those URLs and nothing else: the ``#sha256=`` fragment, every ``data-*``
attribute (requires-python with its ``&gt;`` escapes, yanked, core-metadata, provenance),
every JSON field, and anything a future PEP adds, reach the client as the index wrote
them (PROTOCOLS.md 4.4).

The same readers list the files of a document with their hashes, for the family's
``learn``: what a project page says a file must be is checked before the file is stored.

An upstream that ignores ``Accept`` (a static directory, an older private index) answers
HTML where JSON was negotiated; that page is converted to PEP 691 JSON so the client
gets the type it was promised. The converse has never been seen and is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterator, Mapping
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple
from urllib.parse import unquote, urlsplit

from pkgproxy.rewrite import htmldoc, jsondoc, prefix
from pkgproxy.rewrite.links import Linker

if TYPE_CHECKING:  # pkgproxy.families imports the pypi family, which imports this module
    from pkgproxy.rewrite.context import RewriteContext

HTML = "text/html"
V1_HTML = "application/vnd.pypi.simple.v1+html"
V1_JSON = "application/vnd.pypi.simple.v1+json"

#: Where file URLs are in a PEP 691 project page and in the JSON API.
SIMPLE_URLS: tuple[jsondoc.Path, ...] = (("files", None, "url"),)
API_URLS: tuple[jsondoc.Path, ...] = (("urls", None, "url"), ("releases", None, None, "url"))

#: Hash names a ``#name=hex`` fragment may use (PEP 503), with their hex lengths.
_HASH_LENGTHS = {
    name: hashlib.new(name).digest_size * 2
    for name in ("md5", "sha1", "sha224", "sha256", "sha384", "sha512")
}
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_BASE_TAG = re.compile(rb"<base[\t\n\f\r />]", re.IGNORECASE)
_NORMALIZE = re.compile(r"[-_.]+")


def normalize(name: str) -> str:
    """PEP 503 normalised project name."""
    return _NORMALIZE.sub("-", name).lower()


_NOTHING: Mapping[str, Any] = MappingProxyType({})


class Listed(NamedTuple):
    """One file a project page or the JSON API lists.

    :ivar href: the link as written (entities decoded), without its fragment.
    :ivar url: ``href`` made absolute against the page.
    :ivar hashes: ``{hash name: lower-case hex}``, only well-formed ones.
    :ivar size: bytes, where the document says (JSON).
    :ivar metadata_hashes: hashes of the PEP 658 ``.metadata`` file, where given.
    :ivar fields: the PEP 691 fields besides those, for the HTML to JSON conversion.

    A named tuple: a page lists tens of thousands of these, made cheaply.
    """

    href: str
    url: str
    filename: str
    hashes: Mapping[str, str]
    size: int | None = None
    metadata_hashes: Mapping[str, str] = _NOTHING
    fields: Mapping[str, Any] = _NOTHING


def _hashes(value: object) -> dict[str, str]:
    """The well-formed entries of a hash mapping (JSON ``hashes``/``digests``)."""
    if type(value) is dict and len(value) == 1:
        # The usual ``{"sha256": hex}``, without the loop.
        hexdigest = value.get("sha256")
        if type(hexdigest) is str and len(hexdigest) == 64 and _HEX.match(hexdigest):
            return {"sha256": hexdigest.lower()}
    out: dict[str, str] = {}
    if isinstance(value, dict):
        for name, hexdigest in value.items():
            want = _HASH_LENGTHS.get(name)
            if want and isinstance(hexdigest, str) and len(hexdigest) == want:
                if _HEX.match(hexdigest):
                    out[name] = hexdigest.lower()
    return out


def _fragment_hashes(fragment: str) -> dict[str, str]:
    """``sha256=hex`` (a link fragment, or a ``data-core-metadata`` value) as a mapping."""
    name, eq, hexdigest = fragment.partition("=")
    return _hashes({name: hexdigest}) if eq else {}


def _metadata_value(value: str) -> bool | dict[str, str]:
    """``data-core-metadata`` as PEP 691 spells it: ``true``, or the hashes."""
    if value.strip().lower() == "true":
        return True
    return _fragment_hashes(value) or False


def _is_json(buf: htmldoc.Buffer) -> bool:
    """Whether a document is JSON rather than HTML, by its first significant byte."""
    head = buf[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1] in (b"{", b"[")


def _base(buf: htmldoc.Buffer, linker: Linker) -> None:
    """Apply the document's first ``<base href>`` to ``linker``, before any link.

    pip resolves every link, even one above the ``<base>`` tag, against it; the cheap
    search keeps the second pass to the pages that have one.
    """
    if _BASE_TAG.search(buf) is None:
        return
    for tag in htmldoc.tags(buf):
        if tag.name == b"base":
            href = tag.get(b"href")
            if href is not None and href.value is not None:
                linker.set_base(href.value)
                return


# -- reading -------------------------------------------------------------------------


def listed_in_html(buf: htmldoc.Buffer, linker: Linker) -> Iterator[Listed]:
    """The files a PEP 503 page links to, in order."""
    _base(buf, linker)
    for tag in htmldoc.tags(buf):
        if tag.name != b"a":
            continue
        attr = tag.get(b"href")
        value = attr.value if attr is not None else None
        if value is None:
            continue
        href, _, fragment = value.partition("#")
        url = linker.resolve(href)
        fields: dict[str, Any] = {}
        metadata: dict[str, str] = {}
        for name, key in (
            (b"data-requires-python", "requires-python"),
            (b"data-yanked", "yanked"),
            (b"data-dist-info-metadata", "core-metadata"),
            (b"data-core-metadata", "core-metadata"),  # PEP 714's name wins over PEP 658's
            (b"data-gpg-sig", "gpg-sig"),
            (b"data-provenance", "provenance"),
        ):
            a = tag.get(name)
            if a is None:
                continue
            text = a.value or ""
            if key == "yanked":
                fields[key] = text or True
            elif key == "core-metadata":
                fields[key] = _metadata_value(text)
                metadata = fields[key] if isinstance(fields[key], dict) else {}
            elif key == "gpg-sig":
                fields[key] = text.strip().lower() == "true"
            else:
                fields[key] = text
        filename = htmldoc.text_after(buf, tag) or unquote(urlsplit(url).path.rsplit("/", 1)[-1])
        yield Listed(href, url, filename, _fragment_hashes(fragment), None, metadata, fields)


def listed_in_json(doc: object, linker: Linker) -> Iterator[Listed]:
    """The files of a PEP 691 project page or of a JSON API document."""
    if not isinstance(doc, dict):
        return
    entries: list[object] = []
    for key in ("files", "urls"):
        if isinstance(doc.get(key), list):
            entries.extend(doc[key])
    releases = doc.get("releases")
    if isinstance(releases, dict):
        for files in releases.values():
            if isinstance(files, list):
                entries.extend(files)
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            continue
        href = entry["url"]
        if "#" in href:
            href = href.partition("#")[0]
        size = entry.get("size")
        metadata = entry.get("core-metadata")
        if metadata is None and "core-metadata" not in entry:
            for k in ("dist-info-metadata", "data-dist-info-metadata"):
                if k in entry:
                    metadata = entry[k]
                    break
        filename = entry.get("filename", "")
        yield Listed(
            href,
            linker.resolve(href),
            filename if type(filename) is str else str(filename),
            _hashes(entry.get("hashes")) or _hashes(entry.get("digests")),
            size if type(size) is int else None,
            _hashes(metadata) if metadata is not None else _NOTHING,
        )


def listed(buf: htmldoc.Buffer, page_url: str) -> list[Listed]:
    """The files the document ``buf`` lists (HTML or JSON, as it turns out to be).

    ``page_url`` is the document's upstream URL: relative links are resolved against it.
    """
    linker = Linker(page_url)
    if _is_json(buf):
        return list(listed_in_json(json.loads(bytes(buf)), linker))
    return list(listed_in_html(buf, linker))


# -- rewriting ------------------------------------------------------------------------


def _map_link(linker: Linker, value: str) -> str | None:
    """A link with its fragment, mapped: ``None`` to leave it as written."""
    url, hashmark, fragment = value.partition("#")
    mapped = linker.map(url)
    return None if mapped is None else mapped + hashmark + fragment


def rewrite_html(
    raw_path: str, out_path: str, context: RewriteContext, listing: bool = True
) -> list[Listed]:
    """Rewrite the ``href`` of every ``<a>`` of a PEP 503 page (project or root list).

    :return: with ``listing``, the files the upstream's page lists.
    """
    linker = Linker.of(context)

    def replace(tag: htmldoc.Tag, attr: htmldoc.Attr) -> bytes | None:
        if tag.name != b"a" or attr.name != b"href" or attr.raw is None:
            return None
        value = attr.value
        assert value is not None
        url, hashmark, fragment = value.partition("#")
        mapped = linker.map(url)
        if mapped is None:
            return None
        raw = attr.raw.decode("utf-8", "surrogateescape")
        cut = raw.find("#")
        if cut >= 0 and htmldoc.unescape(raw[:cut]) == url:
            kept = raw[cut:]  # the fragment exactly as the index wrote it
        else:
            kept = htmldoc.escape_attr(hashmark + fragment, attr.quote.decode() or '"')
        return htmldoc.new_url_value(attr, mapped, kept)

    with htmldoc.mapped(raw_path) as buf, open(out_path, "wb", buffering=1 << 20) as out:
        _base(buf, linker)
        htmldoc.rewrite(buf, out, replace, frozenset({b"a"}))
        return list(listed_in_html(buf, Linker(context.page_url))) if listing else []


def _values_at(value: object, path: jsondoc.Path) -> Iterator[object]:
    """The values at ``path`` below a parsed JSON ``value`` (``None``: any key or item)."""
    if not path:
        yield value
        return
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        if head is None:
            for v in value.values():
                yield from _values_at(v, rest)
        elif head in value:
            yield from _values_at(value[head], rest)
    elif isinstance(value, list) and head is None:
        for v in value:
            yield from _values_at(v, rest)


def _prefix_plan(
    data: bytes,
    doc: object,
    seen: list[str] | None,
    context: RewriteContext,
    paths: tuple[jsondoc.Path, ...],
) -> tuple[str, str] | None:
    """``(files prefix, public prefix)`` if replacing the one by the other in ``data``
    gives exactly what rewriting the links at ``paths`` one by one would.

    Every link the parser would change must be under the prefix of the route that
    serves the first link, written without escapes, and the only ``url`` member
    starting with it (see :mod:`pkgproxy.rewrite.prefix`).
    """
    if context.public_prefix is None:
        return None
    linker = Linker.of(context)
    values = [v for p in paths for v in _values_at(doc, p) if isinstance(v, str)]
    if not values:
        return None
    found = context.public_prefix(linker.resolve(values[0].partition("#")[0]))
    if found is None:
        return None
    upstream, public = found
    links = []
    for v in values:
        if v.startswith(upstream) and "/." not in v:
            links.append(v)
        elif _map_link(linker, v) is not None:
            return None
    return found if prefix.exact(data, "url", seen, links, upstream, public) else None


def rewrite_json(
    raw_path: str, out_path: str, context: RewriteContext, paths: tuple[jsondoc.Path, ...]
) -> list[Listed]:
    """Rewrite the file URLs at ``paths`` of a JSON document.

    The usual document names every file under one prefix, which is then replaced in
    the bytes; any other is walked and its links replaced one by one.

    :return: the files the upstream's document lists (read from the same parse).
    """
    with open(raw_path, "rb") as f:
        data = f.read()
    seen = prefix.KeyedStrings("url")
    try:
        doc = prefix.loads(data, seen)
    except (ValueError, RecursionError):
        doc = None  # the walk below says what is wrong with it
    items = list(listed_in_json(doc, Linker(context.page_url)))
    plan = _prefix_plan(data, doc, seen.seen(), context, paths) if doc is not None else None
    del doc
    with open(out_path, "wb", buffering=1 << 20) as out:
        if plan is not None:
            prefix.write_replaced(data, *plan, out.write)
            return items
        linker = Linker.of(context)
        text = data.decode("utf-8", "surrogateescape")
        del data
        jsondoc.replace_strings(text, paths, partial(_map_link, linker), out)
    return items


def rewrite_api(raw_path: str, out_path: str, context: RewriteContext) -> list[Listed]:
    """The JSON API (``/pypi/<project>[/<version>]/json``): ``urls`` and ``releases``."""
    return rewrite_json(raw_path, out_path, context, API_URLS)


def _write_json_items(
    out: BinaryIO, head: Mapping[str, Any], key: str, items: Iterator[Any]
) -> None:
    """``head`` plus ``key: [items]``, written one item at a time (no giant string)."""
    out.write(json.dumps(dict(head))[:-1].encode())
    out.write(f"{', ' if head else ''}{json.dumps(key)}: [".encode())
    for i, item in enumerate(items):
        out.write(b", " if i else b"")
        out.write(json.dumps(item).encode())
    out.write(b"]}")


def html_to_json(raw_path: str, out_path: str, context: RewriteContext, root: bool) -> list[Listed]:
    """A PEP 503 page as PEP 691 JSON (API version 1.0), links mapped as in HTML.

    :return: the files the upstream's page lists.
    """
    linker = Linker.of(context)
    items: list[Listed] = []
    meta = {"meta": {"api-version": "1.0"}}
    with htmldoc.mapped(raw_path) as buf, open(out_path, "wb", buffering=1 << 20) as out:
        if root:
            names = (
                {"name": htmldoc.text_after(buf, tag)}
                for tag in htmldoc.tags(buf)
                if tag.name == b"a" and tag.get(b"href") is not None
            )
            _write_json_items(out, meta, "projects", names)
            return items
        segments = [s for s in urlsplit(context.page_url).path.split("/") if s]
        head = {**meta, "name": normalize(unquote(segments[-1])) if segments else ""}

        def files() -> Iterator[dict[str, Any]]:
            for item in listed_in_html(buf, linker):
                items.append(item)
                entry: dict[str, Any] = {
                    "filename": item.filename,
                    "url": linker.map(item.href) or item.href,
                    "hashes": dict(item.hashes),
                }
                for key, value in item.fields.items():
                    entry[key] = value
                    if key == "core-metadata":
                        # Also under the key pypi.org's JSON has always used. Never as
                        # "dist-info-metadata": pip 22.3 to 23.1 (Debian 12 has 23.0.1)
                        # fails on any object there ("unhashable type: 'dict'", PEP 714).
                        entry["data-dist-info-metadata"] = value
                yield entry

        _write_json_items(out, head, "files", files())
    return items


def rewrite_simple(
    raw_path: str, out_path: str, context: RewriteContext, *, want_json: bool, root: bool
) -> list[Listed]:
    """A simple API page in the negotiated type, links rewritten.

    :param want_json: the client was promised PEP 691 JSON (else HTML).
    :param root: the project list, whose JSON form has no links at all.
    :return: the files the upstream's page lists (none for the root list).
    """
    with htmldoc.mapped(raw_path) as buf:
        is_json = _is_json(buf)
    if is_json and not want_json:
        raise ValueError("the index answered JSON where HTML was asked for")
    if is_json and root:
        shutil.copyfile(raw_path, out_path)
        return []
    if is_json:
        return rewrite_json(raw_path, out_path, context, SIMPLE_URLS)
    if want_json:
        return html_to_json(raw_path, out_path, context, root)
    return rewrite_html(raw_path, out_path, context, listing=not root)
