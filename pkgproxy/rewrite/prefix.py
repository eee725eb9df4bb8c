"""Rewriting a JSON document's links by replacing their common prefix in the bytes.

PyPI's JSON documents and npm's packuments name every file under one upstream prefix
(``https://files.pythonhosted.org/``, ``https://registry.npmjs.org/``), and the proxy
maps that prefix to one public prefix for a client base. So once a document has been
parsed (for learning, which needs it anyway), the served copy can be the upstream bytes
with ``"<prefix>`` replaced by ``"<public prefix>``: no walk, no re-serialisation.

It is only done when the bytes prove it gives exactly what rewriting the parsed values
would. :class:`KeyedStrings` records, while the document is parsed, every string value
of a member named ``key`` (``url``, ``tarball``), decoded; then :func:`exact` checks

- that every occurrence of ``"<prefix>`` in the bytes stands right after a literal
  ``"key":`` (so it starts the value of such a member, written without escapes);
- that there are as many of them as decoded values of ``key`` members starting with the
  prefix (so none of those values is written with escapes, and no member is duplicated);
- that these are exactly the links the format rewrites (the caller passes those).

Anything else (an escaped slash, a relative link, a link to another host, a registry
URL in some other field) fails the check, and the caller takes the parsing path.
:func:`write_replaced` then writes the document in pieces, never copied whole.
"""

from __future__ import annotations

import functools
import json
import mmap
import re
from collections.abc import Callable
from typing import Any

#: Documents up to this size are replaced in one copy; larger ones link by link.
COPY_MAX = 8 * 1024 * 1024
#: Documents up to this size may be parsed in one call into C (a few ms holding the GIL).
PLAIN_MAX = 1024 * 1024
#: What a public prefix may contain to be spliced into JSON as it is.
_SAFE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[A-Za-z0-9._~:@!$&'()*+,;=%\[\]/-]*$")


class KeyedStrings:
    """An ``object_pairs_hook`` that keeps the string values of members named ``key``.

    Being Python code, it also lets other threads (the reactor) take the GIL between
    objects of a large document.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self.values: list[str] = []
        #: False when the document was parsed without this hook (see :func:`loads`).
        self.recorded = True

    def seen(self) -> list[str] | None:
        """What :func:`exact` takes as ``seen``."""
        return self.values if self.recorded else None

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        value = obj.get(self.key)
        if value is not None and type(value) is str:
            if len(obj) != len(pairs):  # a duplicated member: count every occurrence
                self.values.extend(v for k, v in pairs if k == self.key and type(v) is str)
            else:
                self.values.append(value)
        return obj


def loads(data: bytes, seen: KeyedStrings, **kwargs: Any) -> Any:
    """``data`` parsed as JSON, ``seen`` recording only where :func:`exact` needs it.

    A document without a backslash writes every string exactly as it decodes (a quote
    inside a string needs one), so the counts of :func:`exact` on its bytes are the
    counts of its values; one of up to :data:`PLAIN_MAX` bytes is then parsed without a
    Python hook per object (a larger one keeps the hook, which lets the reactor thread
    take the GIL between objects).
    """
    if len(data) > PLAIN_MAX or b"\\" in data:
        return json.loads(data, object_pairs_hook=seen, **kwargs)
    seen.recorded = False
    return json.loads(data, **kwargs)


def exact(
    data: bytes, key: str, seen: list[str] | None, links: list[str], prefix: str, public: str
) -> bool:
    """Whether replacing ``"prefix`` by ``"public`` in ``data`` rewrites exactly ``links``.

    :param seen: the decoded string values of every member named ``key`` (from
        :class:`KeyedStrings`); ``None`` for a document with no backslash at all
        (:func:`loads`).
    :param links: the values the format rewrites (each must start with ``prefix``).
    """
    if not links or not _SAFE.match(prefix) or not _SAFE.match(public):
        return False
    if any(not link.startswith(prefix) for link in links):
        return False
    n = len(links)
    if seen is None:
        if b"\\" in data:
            return False
    elif sum(1 for v in seen if v.startswith(prefix)) != n:
        return False
    quoted = b'"' + prefix.encode()
    if data.count(quoted) != n:
        return False
    compact = b'"' + key.encode() + b'":' + quoted
    if data.count(compact) == n and b"\\" + compact not in data:
        return True  # the usual compact document, counted without a regex
    # The quote before the key is not escaped, so it opens the key: in valid JSON an
    # escaped backslash before it would leave the key's name outside any string.
    name = re.escape(key.encode())
    keyed = re.compile(rb'(?<!\\)"' + name + rb'"[ \t\n\r]*:[ \t\n\r]*' + re.escape(quoted))
    return sum(1 for _ in keyed.finditer(data)) == n


def write_replaced(
    data: bytes, prefix: str, public: str, write: Callable[[bytes], object], chunk: int = 1 << 20
) -> None:
    """Write ``data`` through ``write`` with every ``"prefix`` as ``"public``, in pieces of
    about ``chunk`` bytes (a document larger than :data:`COPY_MAX` is not copied whole)."""
    old = b'"' + prefix.encode()
    new = b'"' + public.encode()
    if len(data) <= COPY_MAX:
        # One copy of a document this size costs less than a loop over its links.
        out = data.replace(old, new)
        for i in range(0, len(out), chunk):
            write(out[i : i + chunk])
        return
    view = memoryview(data)
    pending: list[bytes | memoryview] = []
    size = 0
    last = 0
    while True:
        at = data.find(old, last)
        end = len(data) if at < 0 else at
        pending.append(view[last:end])
        size += end - last
        if at < 0:
            break
        pending.append(new)
        size += len(new)
        last = at + len(old)
        if size >= chunk:
            write(b"".join(pending))
            pending.clear()
            size = 0
    write(b"".join(pending))


# -- the bytes alone -------------------------------------------------------------------
#
# In valid JSON a ``"`` outside strings opens or closes one, and inside a string it is
# always escaped (``\"``). A closing quote is followed by ``:``, ``,``, ``}``, ``]`` or
# white space. So ``"<prefix>`` (a prefix starting with a letter) and ``"key":`` that
# no backslash precedes can only open a string, and a member name: an escaped quote has
# its backslash before it, and an escaped backslash before a quote would make that
# quote a closing one followed by a letter. :func:`relink` and :func:`entry_at` rest on
# that; a document that breaks it is refused (or, not being JSON, fails its client as
# the upstream's own would).

#: A JSON string or a bracket, read from a point outside any string; or a quote that
#: opens no whole string (the reading stops there: it never searches on from inside one).
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]]|"', re.DOTALL)
#: The same, in reversed bytes: there a quote is escaped when an odd run of backslashes
#: follows it.
_BACK_TOKEN = re.compile(rb'"(?:[^"]|"(?=(?:\\\\)*\\(?!\\)))*"|[{}\[\]]|"', re.DOTALL)
#: How far around a link :func:`entry_at` looks for the object holding it.
ENTRY_MAX = 64 * 1024


def first_value(data: bytes, key: str) -> str | None:
    """The first ``"key":"<value>"`` string, where it is written without escapes."""
    keyed = b'"' + key.encode() + b'":"'
    at = data.find(keyed)
    if at < 0:
        return None
    start = at + len(keyed)
    end = data.find(b'"', start)
    value = data[start:end]
    return None if end < 0 or b"\\" in value else value.decode("utf-8", "replace")


def relink(data: bytes, key: str, prefix: str, public: str) -> bytes | None:
    """``data`` with every ``"prefix`` as ``"public``, if its bytes alone prove that this
    rewrites exactly the links a parser would: ``None`` otherwise.

    The proof: the document is an object; every member named ``key`` is written
    ``"key":"<prefix>...`` (compact, as registries write it), so every link is under the
    prefix, and there is no other ``"<prefix>`` (in another field); no link has an
    escape or a dot segment; no backslash stands before any of these quotes, and no
    member name is written with a ``\\u`` escape. The bytes around the links are the
    upstream's: whether they are valid JSON, the client finds out as it would directly.
    """
    if not _SAFE.match(prefix) or not _SAFE.match(public):
        return None
    if data.lstrip()[:1] != b"{" or data.rstrip()[-1:] != b"}":
        return None
    quoted = b'"' + prefix.encode()
    keyed = b'"' + key.encode() + b'":'
    # Each pass is one scan of the document, and the scans are most of the cost: as
    # many "<prefix> as "key":"<prefix> (each then stands right after a key), and no
    # "key": before anything else. (re finds these two faster than bytes' own search.)
    n = data.count(quoted)
    if n == 0 or data.count(keyed + quoted) != n:
        return None
    if _unlinked(key, prefix).search(data) is not None:
        return None
    if b"\\" in data and (
        b"\\" + quoted in data
        or b"\\" + keyed in data
        or re.search(re.escape(quoted) + rb'[^"\\]*\\', data) is not None
        or _spelled_with_escapes(data, key)
    ):
        return None
    if _DOT.search(data) is not None and (
        re.search(re.escape(quoted) + rb'[^"]*/\.', data) is not None
    ):
        return None
    return data.replace(quoted, b'"' + public.encode())


#: A ``/.`` anywhere: the cheap look before the search for a dot segment in a link.
_DOT = re.compile(rb"/\.")


@functools.lru_cache(maxsize=64)
def _unlinked(key: str, prefix: str) -> re.Pattern[bytes]:
    """A ``"key":`` whose value does not start ``"<prefix>``."""
    return re.compile(
        re.escape(b'"' + key.encode() + b'":') + rb"(?!" + re.escape(b'"' + prefix.encode()) + rb")"
    )


#: A document as :func:`entry_at` reads it: bytes, or a stored file mapped in memory.
Document = bytes | mmap.mmap


def _spelled_with_escapes(data: bytes, key: str) -> bool:
    """Whether a member name in ``data`` spells ``key`` with a ``\\u`` escape.

    Such a name has exactly ``len(key)`` characters, each one byte or an escape, and an
    escape among them: the pattern looks at most that far from any quote, so the search
    is linear in the document, however many escapes a readme holds. A match that is not
    a name (a quote that closes a string) only costs a decode.
    """
    if b"\\u" not in data:
        return False
    k = len(key)
    atom = rb'(?:[^"\\]|\\u[0-9A-Fa-f]{4})'
    name = re.compile(
        rb'"((?=' + atom + rb"{0,%d}\\u)" % (k - 1) + atom + rb'{%d})"[ \t\n\r]*:' % k
    )
    for m in name.finditer(data):
        try:
            if json.loads(b'"' + m[1] + b'"') == key:
                return True
        except ValueError:
            continue
    return False


def entry_at(data: Document, needle: bytes) -> list[bytes]:
    """The innermost objects holding each occurrence of ``needle``, as JSON texts.

    ``needle`` ends a string: it contains a ``/``, ends with ``"`` and has no other
    quote and no backslash. Outside strings JSON has no ``/``, and an unescaped quote
    after it closes the string, so every occurrence ends one string; the objects around
    it are read from there, forwards and (from the string's opening quote) backwards.
    Used to read what a stored document says of one file without parsing all of it.
    An object reaching further than :data:`ENTRY_MAX` from the needle is not found, nor
    a string an array holds. What is found is only text of the document: its caller
    parses it, and keeps only what it says of the file it looked for.
    """
    found: list[bytes] = []
    inside = needle[:-1]
    if needle[-1:] != b'"' or b"/" not in inside or b'"' in inside or b"\\" in inside:
        return found
    at = data.find(needle)
    while at >= 0:
        closed = at + len(inside)
        opened = data.rfind(b'"', 0, at)
        if opened >= 0 and _unescaped(data, opened):
            back = _scan(data[max(0, opened - ENTRY_MAX) : opened][::-1], b"}]", _BACK_TOKEN)
            ahead = _scan(data[closed + 1 : closed + 1 + ENTRY_MAX], b"{[", _TOKEN)
            if back is not None and ahead is not None:
                found.append(data[opened - 1 - back : closed + 2 + ahead])
        at = data.find(needle, closed + 1)
    return found


def objects_at(data: Document, needle: bytes) -> list[dict[str, Any]] | None:
    """The objects :func:`entry_at` finds, parsed; ``None`` if there is none, or one
    of them is not a JSON object (then the whole document has to be read)."""
    found = []
    for text in entry_at(data, needle):
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if not isinstance(value, dict):
            return None
        found.append(value)
    return found or None


def _unescaped(data: Document, at: int) -> bool:
    """Whether the quote at ``at`` is a real one: an even run of backslashes before it
    (one longer than :data:`ENTRY_MAX` is not told)."""
    start = max(0, at - ENTRY_MAX)
    before = data[start:at]
    run = len(before) - len(before.rstrip(b"\\"))
    return run % 2 == 0 and (run < len(before) or start == 0)


def _scan(data: bytes, deeper: bytes, token: re.Pattern[bytes]) -> int | None:
    """The index of the brace that ends the object holding the point ``data`` is read
    from (a point outside any string; ``deeper``: the brackets that open a level in the
    direction read), or ``None`` (no such brace within ``data``, or an array holds it)."""
    depth = 0
    for m in token.finditer(data):
        c = data[m.start()]
        if c == 0x22:  # a string
            if m.end() - m.start() < 2:
                return None  # not closed within reach
            continue
        if c in deeper:
            depth += 1
        elif depth:
            depth -= 1
        else:
            return m.start() if c in b"{}" else None
    return None
