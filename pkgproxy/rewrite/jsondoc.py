"""Finding values at given places of a JSON document with their exact positions.

Why not ``json.load`` and ``json.dump``: re-serialising changes every byte of a document
(spacing, escapes, key order, number forms) and drops duplicate keys, and the PyPI
documents are to reach clients as the index wrote them except for their file URLs. So
the document is walked only along the paths that lead to a link (``files[*].url``); every
other value is stepped over with the C decoder's ``raw_decode``, which also reports where
it ends. The walk visits each value once: linear in the document, with the interpreter
regaining control between values, so a thread doing this leaves the reactor time to run.

A path is a tuple of keys; ``None`` stands for any key of an object or any item of an
array.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

Path = tuple[str | None, ...]

_WS = re.compile(r"[ \t\n\r]*")
_DECODE = json.JSONDecoder().raw_decode


@dataclass(frozen=True)
class Found:
    """A value at one of the paths asked for: its text span and its decoded value."""

    start: int
    end: int
    value: Any


def _ws(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()  # type: ignore[union-attr]


def _skip(text: str, pos: int) -> int:
    return int(_DECODE(text, pos)[1])


def _expect(text: str, pos: int, what: str) -> None:
    if not text.startswith(what, pos):
        got = text[pos : pos + 20] or "the end"
        raise ValueError(f"expected {what!r} at offset {pos}, found {got!r}")


def _walk(text: str, pos: int, paths: tuple[Path, ...], out: list[Found]) -> int:
    """Collect the values at ``paths`` below the value at ``pos``; return where it ends."""
    pos = _ws(text, pos)
    if any(not p for p in paths):
        value, end = _DECODE(text, pos)
        out.append(Found(pos, end, value))
        return int(end)
    opener = text[pos : pos + 1]
    if opener == "{":
        pos = _ws(text, pos + 1)
        if text.startswith("}", pos):
            return pos + 1
        while True:
            _expect(text, pos, '"')
            key, pos = _DECODE(text, pos)
            pos = _ws(text, pos)
            _expect(text, pos, ":")
            below = tuple(p[1:] for p in paths if p[0] is None or p[0] == key)
            pos = _walk(text, pos + 1, below, out) if below else _skip(text, _ws(text, pos + 1))
            pos = _ws(text, pos)
            if text.startswith(",", pos):
                pos = _ws(text, pos + 1)
                continue
            _expect(text, pos, "}")
            return pos + 1
    if opener == "[":
        items = tuple(p[1:] for p in paths if p[0] is None)
        if not items:
            return _skip(text, pos)
        pos = _ws(text, pos + 1)
        if text.startswith("]", pos):
            return pos + 1
        while True:
            pos = _ws(text, _walk(text, pos, items, out))
            if text.startswith(",", pos):
                pos += 1
                continue
            _expect(text, pos, "]")
            return pos + 1
    return _skip(text, pos)


def find(text: str, paths: Sequence[Path]) -> list[Found]:
    """Every value of ``text`` at one of ``paths``, in document order.

    :raises ValueError: ``text`` is not one JSON document.
    """
    out: list[Found] = []
    start = 1 if text.startswith("\ufeff") else 0  # a byte order mark is tolerated
    end = _ws(text, _walk(text, start, tuple(paths), out))
    if end != len(text):
        raise ValueError(f"extra data after the JSON document at offset {end}")
    return out


def replace_strings(
    text: str, paths: Sequence[Path], replace: Callable[[str], str | None], out: BinaryIO
) -> int:
    """Write ``text`` to ``out`` (UTF-8) with the strings at ``paths`` passed through
    ``replace``; a ``None`` from it, or a value that is not a string, is left as written.

    :return: how many values were replaced.
    """
    last = 0
    changed = 0
    for found in find(text, paths):
        if not isinstance(found.value, str):
            continue
        new = replace(found.value)
        if new is None:
            continue
        out.write(text[last : found.start].encode("utf-8", "surrogateescape"))
        out.write(json.dumps(new).encode())
        last = found.end
        changed += 1
    out.write(text[last:].encode("utf-8", "surrogateescape"))
    return changed
