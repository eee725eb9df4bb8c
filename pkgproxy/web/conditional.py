"""Conditional and partial answers: 304 Not Modified, Range (206/416), Accept-Encoding.

Decisions over a request's headers and what is known of the body (its size and
validators); :func:`choose_range` also sets the length headers, and answers a 416 itself.
"""

from __future__ import annotations

from twisted.web import http
from twisted.web.server import Request

from pkgproxy import httputil


def not_modified(req: Request, etag: str, last_modified: str | None) -> bool:
    """Whether the client's copy is current (``If-None-Match``, else ``If-Modified-Since``)."""
    inm = req.getHeader(b"if-none-match")
    if inm is not None:
        tags = {t.strip().removeprefix("W/") for t in inm.decode("latin-1").split(",")}
        return "*" in tags or etag in tags
    ims = httputil.parse_http_date(req.getHeader(b"if-modified-since"))
    lm = httputil.parse_http_date(last_modified)
    return ims is not None and lm is not None and lm <= ims


def choose_range(
    req: Request, size: int, etag: str | None, last_modified: str | None
) -> tuple[int, int] | None:
    """Decide between 200 and 206 and set the length headers.

    :return: the span to send, or ``None`` when a 416 has been answered.
    """
    header = req.getHeader(b"range")
    if_range = req.getHeader(b"if-range")
    if header is not None and if_range is not None:
        value = if_range.decode("latin-1").strip()
        if value != etag and value != last_modified:
            header = None  # the client's partial copy is of another version
    try:
        span = httputil.parse_range(header, size)
    except httputil.Unsatisfiable:
        req.setResponseCode(http.REQUESTED_RANGE_NOT_SATISFIABLE)
        req.setHeader(b"content-range", f"bytes */{size}".encode())
        req.setHeader(b"content-length", b"0")
        req.finish()
        return None
    if span is None:
        req.setHeader(b"content-length", str(size).encode())
        return (0, size)
    start, end = span
    req.setResponseCode(http.PARTIAL_CONTENT)
    req.setHeader(b"content-range", f"bytes {start}-{end - 1}/{size}".encode())
    req.setHeader(b"content-length", str(end - start).encode())
    return span


def takes_gzip(value: bytes | None) -> bool:
    """Whether an ``Accept-Encoding`` header admits gzip (``q`` > 0)."""
    if not value:
        return False
    star = False
    for element in value.decode("latin-1").split(","):
        coding, *params = element.split(";")
        coding = coding.strip().lower()
        q = 1.0
        for param in params:
            name, _, number = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(number)
                except ValueError:
                    q = 0.0
        if coding in ("gzip", "x-gzip"):
            return q > 0
        if coding == "*":
            star = q > 0
    return star
