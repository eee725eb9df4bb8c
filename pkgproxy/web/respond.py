"""How pkgproxy writes an answer it makes itself: the one-line error, in the family's format.

Every error a client gets from the proxy (not relayed from an upstream) is written here.
"""

from __future__ import annotations

from twisted.web.server import Request

from pkgproxy.families import FAMILIES


def reason(request: Request, code: int, message: str, family: str | None = None) -> bytes:
    """A one-line error: what went wrong and, where it helps, what to do.

    Plain text, unless the family's clients read errors in a format of their own.
    """
    request.setResponseCode(code)
    formatter = FAMILIES[family].error_body if family in FAMILIES else None
    if formatter is not None:
        content_type, body = formatter(code, message)
        request.setHeader(b"content-type", content_type.encode("latin-1"))
    else:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        body = f"pkgproxy: {message}\n".encode()
    request.setHeader(b"via", b"1.1 pkgproxy")
    request.setHeader(b"content-length", str(len(body)).encode())
    return b"" if request.method == b"HEAD" else body
