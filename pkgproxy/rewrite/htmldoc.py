"""A forward-only HTML tag scanner, and the targeted rewrite of link attributes over it.

Why not :class:`html.parser.HTMLParser`: it hands out decoded attribute values, not where
they are in the document, so rewriting with it means re-rendering the page, which loses
the exact bytes of every attribute the index wrote. This scanner finds start tags and
the byte span of each attribute value, and the rewrite splices new values into the
original bytes: everything else is copied as it came.

What counts as a tag follows the parsers clients use (pip's is ``HTMLParser``): comments
and ``<!...>``/``<?...>`` declarations are skipped, the bodies of ``<script>`` and
``<style>`` are raw text, attribute values may be double-quoted, single-quoted or
unquoted, and a quoted ``>`` does not end a tag. An unterminated comment, tag or raw-text
element runs to the end of the document, as it does for those parsers, so the scan never
re-reads text and stays linear however hostile the page.

The scanner works on bytes (any ASCII-compatible encoding) and on an ``mmap`` as well, so
a document of tens of megabytes is never read into one string.
"""

from __future__ import annotations

import html
import mmap
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO, NamedTuple

Buffer = bytes | mmap.mmap

#: Where markup starts: a comment, a declaration, or a start or end tag and its name. A
#: '<' that starts none of them is text.
_MARKUP = re.compile(rb"<(?:(!--)|[!?]|(/?)([A-Za-z][^\t\n\f\r />]*)|/)")
_GAP = re.compile(rb"[\t\n\f\r /]*")
#: One attribute: its name, then optionally ``=`` and a value in one of three forms.
_ATTR = re.compile(
    rb"([^\t\n\f\r />][^\t\n\f\r /=>]*)"
    rb"(?:([\t\n\f\r ]*=[\t\n\f\r ]*)"
    rb"(?:\"([^\"]*)\"|'([^']*)'|([^\t\n\f\r >\"'][^\t\n\f\r >]*))?)?"
)
_RAW_TEXT_END = {
    name: re.compile(rb"</" + name + rb"[\t\n\f\r />]", re.IGNORECASE)
    for name in (b"script", b"style")
}
_GT = 0x3E
_QUOTES = (0x22, 0x27)


class Attr(NamedTuple):
    """One attribute of a start tag.

    :ivar name: lower-cased.
    :ivar raw: the value as written (entities not decoded), without its quotes;
        ``None`` for an attribute without a value.
    :ivar start: where the value starts in the document, at its opening quote if any.
    :ivar end: just past the value (and its closing quote).
    :ivar quote: ``b'"'``, ``b"'"`` or ``b""`` for an unquoted value.
    """

    name: bytes
    raw: bytes | None
    start: int
    end: int
    quote: bytes

    @property
    def value(self) -> str | None:
        """The value with character references decoded (undecodable bytes kept)."""
        if self.raw is None:
            return None
        return unescape(self.raw.decode("utf-8", "surrogateescape"))


class Tag(NamedTuple):
    """A start tag: its lower-cased name, its span and its attributes in order."""

    name: bytes
    start: int
    end: int
    attrs: tuple[Attr, ...]

    def get(self, name: bytes) -> Attr | None:
        """The last attribute called ``name``: pip keeps the last of duplicates."""
        found = None
        for a in self.attrs:
            if a.name == name:
                found = a
        return found


def _attributes(buf: Buffer, pos: int, n: int) -> tuple[tuple[Attr, ...], int] | None:
    """The attributes of a tag whose name ends at ``pos``, and where the tag ends.

    ``None`` if the document ends inside the tag (an unterminated quoted value runs to
    the end of the document, as in HTML's tokenizer).
    """
    attrs: list[Attr] = []
    while True:
        pos = _GAP.match(buf, pos).end()  # type: ignore[union-attr]
        if pos >= n:
            return None
        if buf[pos] == _GT:
            return tuple(attrs), pos + 1
        m = _ATTR.match(buf, pos)
        assert m is not None  # buf[pos] is none of the characters the gap skips
        name = m.group(1).lower()
        if m.group(2) is None:
            attrs.append(Attr(name, None, m.end(1), m.end(1), b""))
        elif m.group(3) is not None:
            attrs.append(Attr(name, m.group(3), m.start(3) - 1, m.end(3) + 1, b'"'))
        elif m.group(4) is not None:
            attrs.append(Attr(name, m.group(4), m.start(4) - 1, m.end(4) + 1, b"'"))
        elif m.group(5) is not None:
            attrs.append(Attr(name, m.group(5), m.start(5), m.end(5), b""))
        else:
            vpos = m.end(2)
            if vpos >= n or buf[vpos] in _QUOTES:
                return None
            attrs.append(Attr(name, b"", vpos, vpos, b""))
        pos = m.end()


def tags(buf: Buffer) -> Iterator[Tag]:
    """Every start tag of the document in order, outside comments and raw text."""
    n = len(buf)
    pos = 0
    while True:
        m = _MARKUP.search(buf, pos)
        if m is None:
            return
        end = m.end()
        if m.group(1) is not None:  # a comment
            close = buf.find(b"-->", end)
            if close < 0:
                return
            pos = close + 3
            continue
        name = m.group(3)
        if name is None:  # <!DOCTYPE>, <?...>, "</ ...>": skipped to the next '>'
            close = buf.find(b">", end)
            if close < 0:
                return
            pos = close + 1
            continue
        if m.group(2) and buf[end : end + 1] == b">":
            pos = end + 1  # the usual "</a>"
            continue
        parsed = _attributes(buf, end, n)
        if parsed is None:
            return
        attrs, pos = parsed
        if m.group(2):
            continue  # an end tag with attributes: skipped like any end tag
        name = name.lower()
        yield Tag(name, m.start(), pos, attrs)
        raw_end = _RAW_TEXT_END.get(name)
        if raw_end is not None:
            close_m = raw_end.search(buf, pos)
            if close_m is None:
                return
            pos = close_m.start()


def unescape(text: str) -> str:
    """``text`` with its character references decoded, as an HTML parser would."""
    return html.unescape(text) if "&" in text else text


def text_after(buf: Buffer, tag: Tag) -> str:
    """The text between ``tag`` and the next tag, decoded (an anchor's file name)."""
    lt = buf.find(b"<", tag.end)
    raw = buf[tag.end : lt if lt >= 0 else len(buf)]
    return unescape(raw.decode("utf-8", "surrogateescape")).strip()


def escape_attr(value: str, quote: str) -> str:
    """``value`` made safe inside an attribute delimited by ``quote``."""
    value = value.replace("&", "&amp;")
    if quote == '"':
        return value.replace('"', "&quot;")
    return value.replace("'", "&#x27;")


def new_url_value(attr: Attr, url: str, fragment_kept: str) -> bytes:
    """The bytes that replace ``attr``'s value (quotes included) to link to ``url``.

    ``fragment_kept`` is the part of the raw value from its ``#`` on, copied as the index
    wrote it; an unquoted value is given double quotes.
    """
    quote = attr.quote.decode() or '"'
    if not attr.quote:
        fragment_kept = fragment_kept.replace('"', "&quot;")
    text = quote + escape_attr(url, quote) + fragment_kept + quote
    return text.encode("utf-8", "surrogateescape")


#: ``(tag, attribute) -> replacement bytes for the attribute's value, or None``.
Replacer = Callable[[Tag, Attr], bytes | None]


def rewrite(buf: Buffer, out: BinaryIO, replace: Replacer, wanted: frozenset[bytes]) -> int:
    """Copy ``buf`` to ``out``, letting ``replace`` change values of tags in ``wanted``.

    :return: how many values were replaced.
    """
    last = 0
    changed = 0
    for tag in tags(buf):
        if tag.name not in wanted:
            continue
        for attr in tag.attrs:
            new = replace(tag, attr)
            if new is None:
                continue
            out.write(buf[last : attr.start])
            out.write(new)
            last = attr.end
            changed += 1
    out.write(buf[last:])
    return changed


@contextmanager
def mapped(path: str) -> Iterator[Buffer]:
    """The file at ``path`` as a read-only buffer (an ``mmap``; ``b""`` when empty)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            yield m
