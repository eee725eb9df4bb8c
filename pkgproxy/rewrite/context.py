"""What a rewriter is told besides the document: where it came from and how to name URLs.

Plain data; imports nothing of pkgproxy, so rewriters and families both depend on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RewriteContext:
    """What a rewriter needs to know besides the document.

    :ivar page_url: the upstream URL the document came from (for relative links).
    :ivar public_url: maps an upstream URL to the URL a client uses for it through this
        proxy, as that client reached the proxy (``http://cache:3142/pypi/files/...``,
        or in forward mode the route's forward prefix); ``None`` for a URL no route
        serves. A rewritten document is cached per client base for this reason.
    """

    page_url: str
    public_url: Callable[[str], str | None]
    #: ``upstream URL -> (upstream prefix, public prefix)``: every URL under the route
    #: serving it maps to the public prefix plus the rest (a rewrite may then replace
    #: prefixes in the bytes); ``None`` where that does not hold.
    public_prefix: Callable[[str], tuple[str, str] | None] | None = None
