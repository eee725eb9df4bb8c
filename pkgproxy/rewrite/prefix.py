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

import json
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
