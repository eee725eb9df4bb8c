"""Where a link found in an upstream document should lead a client of the proxy.

Shared by the HTML and JSON rewriters of PyPI's documents: relative links are resolved
against the page's upstream URL (or an HTML ``<base>``) first, then mapped by the
request's :class:`~pkgproxy.rewrite.context.RewriteContext` to the URL of the route that
serves them, as this client reached the proxy. A link no route serves is left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

if TYPE_CHECKING:  # pkgproxy.families imports the families, which import this module
    from pkgproxy.rewrite.context import RewriteContext


def _nowhere(url: str) -> str | None:
    return None


class Linker:
    """Resolves and maps the links of one document.

    :param page_url: the document's upstream URL.
    :param public_url: the mapping of a request's
        :class:`~pkgproxy.rewrite.context.RewriteContext`; without one, links are only resolved.
    """

    def __init__(self, page_url: str, public_url: Callable[[str], str | None] = _nowhere) -> None:
        self._public = public_url
        self.base = page_url
        self._origin = _origin(page_url)
        self._base_set = False

    @classmethod
    def of(cls, context: RewriteContext) -> Linker:
        """The linker for a rewrite's context."""
        return cls(context.page_url, context.public_url)

    def set_base(self, href: str) -> None:
        """Resolve later relative links against ``href``: an HTML ``<base>``.

        Only the first one counts, as in browsers and in pip's parser.
        """
        if not self._base_set:
            self._base_set = True
            self.base = self.resolve(href)
            self._origin = _origin(self.base)

    def resolve(self, url: str) -> str:
        """``url`` made absolute against the current base.

        The common shapes (an absolute ``https://`` URL, an absolute path) skip
        :func:`~urllib.parse.urljoin`, which would dominate the cost of a page of hundreds
        of thousands of links. Anything with a dot segment takes the full path.
        """
        if "/." not in url:
            if url.startswith(("https://", "http://")):
                return url
            if url.startswith("/") and not url.startswith("//"):
                return self._origin + url
        return urljoin(self.base, url)

    def map(self, url: str) -> str | None:
        """The client-facing URL for ``url`` (given without its fragment).

        ``None`` when the link is to stay as it is: no route serves its target, or the
        mapping changes nothing.
        """
        mapped = self._public(self.resolve(url))
        if mapped is None or mapped == url:
            return None
        return mapped


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
