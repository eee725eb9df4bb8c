"""Pure HTTP rules shared by the serving and fetching sides (RFC 9110, 9111).

No I/O here: Range parsing, cache directives, freshness, dates and paths, so each rule is
tested as a plain function and used the same way by every family.
"""

from __future__ import annotations

import calendar
import email.utils
import re
from typing import AnyStr
from urllib.parse import quote_from_bytes, unquote_to_bytes

#: Headers that belong to one connection and never cross the proxy (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

#: File names whose bytes are already compressed: a Content-Encoding on them is an
#: upstream mistake, and the raw wire bytes are the file. These are the general
#: formats; a family adds its own package formats (``Family.compressed``).
COMPRESSED_SUFFIXES = (
    ".gz",
    ".xz",
    ".bz2",
    ".zst",
    ".lz4",
    ".lzma",
    ".tgz",
    ".zip",
    ".tar",
)


def split_origin(url: AnyStr) -> tuple[AnyStr, AnyStr]:
    """``(scheme://authority, the rest)`` of an absolute URL, as str or bytes.

    Upstream code asks this for every request, for a new URL of one of a few origins:
    a search for the first ``/``, ``?`` or ``#`` after ``://`` instead of a full parse,
    so what is derived from the origin can be remembered by it.
    """
    if isinstance(url, bytes):
        mark, stops = url.find(b"://"), (b"/", b"?", b"#")
    else:
        mark, stops = url.find("://"), ("/", "?", "#")
    if mark < 0:
        raise ValueError(f"not an absolute URL: {url[:80]!r}")
    end = len(url)
    for c in stops:
        i = url.find(c, mark + 3)  # type: ignore[arg-type]
        if 0 <= i < end:
            end = i
    return url[:end], url[end:]


def http_date(ts: float) -> str:
    """Format a POSIX time as an IMF-fixdate."""
    return email.utils.formatdate(ts, usegmt=True)


def parse_http_date(value: str | bytes | None) -> float | None:
    """Parse an HTTP date; ``None`` for anything unparseable."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    try:
        parsed = email.utils.parsedate_tz(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None:
        return None
    try:
        return float(calendar.timegm(parsed[:9]) - (parsed[9] or 0))
    except (OverflowError, ValueError):
        return None


def cache_directives(value: str | bytes | None) -> dict[str, str | None]:
    """Parse a Cache-Control header into ``{directive: argument or None}``."""
    if not value:
        return {}
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    out: dict[str, str | None] = {}
    for part in value.split(","):
        name, sep, arg = part.strip().partition("=")
        if name:
            out[name.strip().lower()] = arg.strip().strip('"') if sep else None
    return out


def client_wants_revalidation(cache_control: bytes | None, pragma: bytes | None) -> bool:
    """True if the client asked for an end-to-end check (``max-age=0``, ``no-cache``)."""
    d = cache_directives(cache_control)
    if "no-cache" in d:
        return True
    if "max-age" in d:
        try:
            return int(d["max-age"] or "0") <= 0
        except ValueError:
            return True
    return bool(pragma and b"no-cache" in pragma.lower())


def storable(cache_control: bytes | None) -> bool:
    """False if the upstream forbids a shared cache to keep the response."""
    d = cache_directives(cache_control)
    return "no-store" not in d and "private" not in d


def freshness_lifetime(
    cache_control: bytes | None,
    expires: bytes | None,
    date: bytes | None,
    last_modified: bytes | None,
    now: float,
) -> float:
    """Seconds a response stays fresh in a shared cache (RFC 9111 4.2.1 and 4.2.2).

    Falls back to the usual heuristic of 10% of the time since Last-Modified, capped at a
    day; without any information the response is stale at once and revalidated.
    """
    d = cache_directives(cache_control)
    if "no-cache" in d:
        return 0.0
    for name in ("s-maxage", "max-age"):
        if name in d:
            try:
                return max(0.0, float(int(d[name] or "")))
            except ValueError:
                return 0.0
    served = parse_http_date(date) or now
    if expires is not None:
        exp = parse_http_date(expires)
        return max(0.0, exp - served) if exp is not None else 0.0
    lm = parse_http_date(last_modified)
    if lm is not None and lm < served:
        return min(86400.0, (served - lm) / 10)
    return 0.0


_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


class Unsatisfiable(Exception):
    """The Range cannot be served from an object of this size (answer 416)."""


def parse_range(value: bytes | None, size: int) -> tuple[int, int] | None:
    """Resolve a single ``Range`` header against ``size``.

    :return: ``(start, end)`` with ``end`` exclusive, or ``None`` to serve the whole
        object (no Range, a malformed one, or several ranges: RFC 9110 allows a 200).
    :raises Unsatisfiable: the first byte is at or past the end.
    """
    if not value:
        return None
    m = _RANGE.match(value.decode("latin-1"))
    if not m:
        return None
    first, last = m.group(1), m.group(2)
    if first == "":
        if last == "":
            return None
        n = int(last)
        if n == 0:
            raise Unsatisfiable()
        return (max(0, size - n), size)
    start = int(first)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        raise Unsatisfiable()
    end = size if last == "" else min(size, int(last) + 1)
    return (start, end)


# RFC 3986 pchar, without '%': what may stand unescaped in a path segment.
_SEGMENT_SAFE = "!$&'()*+,;=:@-._~"


class BadPath(ValueError):
    """The request path cannot be mapped to an upstream path."""


def canonical_path(raw: str) -> str:
    """Decode and re-encode each segment of a request path, one way for every client.

    apt sends ``%2b`` for ``+`` and another client may not; both must reach one cache
    entry and one upstream URL. Dot segments and encoded slashes or NULs are refused:
    they would let a request name something outside its route.
    """
    out = []
    for seg in raw.split("/"):
        decoded = unquote_to_bytes(seg)
        if decoded in (b".", b"..") or b"/" in decoded or b"\x00" in decoded:
            raise BadPath(f"path segment {seg!r} is not allowed")
        out.append(quote_from_bytes(decoded, safe=_SEGMENT_SAFE))
    return "/".join(out)


def parse_accept(accept: str) -> list[tuple[str, float]]:
    """``(media range, q)`` of each element of an ``Accept`` header, media lower-cased.

    Elements without a ``/`` are skipped; a malformed or out-of-range ``q`` counts as 0
    (not acceptable), so a garbled header never selects something the client did not
    clearly ask for.
    """
    out = []
    for element in accept.split(","):
        media, *params = element.split(";")
        media = media.strip().lower()
        if "/" not in media:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        out.append((media, q if 0.0 <= q <= 1.0 else 0.0))
    return out
