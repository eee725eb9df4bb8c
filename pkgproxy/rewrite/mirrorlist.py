"""Mirrorlists of RPM repositories (``mirrorlist=`` in a dnf or yum repository file).

A mirrorlist is plain text: one repository base URL per line, in the order dnf tries
them, with blank lines and ``#`` comments (Rocky's MirrorManager at
``/mirrorlist?arch=...&repo=...``, AlmaLinux's ``/mirrorlist/<release>/<repo>``, whose URLs
keep a literal ``$basearch`` that dnf fills in). The rewritten answer lists one URL: this
proxy's, for the first listed mirror a route serves, as it is or by the tree its path
names under the master host's layout (:func:`pkgproxy.rewrite.metalink.mirror_public_url`);
else for the first that keeps the release tree at the root of its host.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pkgproxy.rewrite.metalink import mirror_path, mirror_public_url

if TYPE_CHECKING:
    from pkgproxy.rewrite.context import RewriteContext

#: The most of a mirrorlist read: real ones are a few kilobytes (some dozens of mirrors).
MAX_MIRRORLIST = 256 * 1024

#: One absolute URL, nothing else on the line.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#]+\S*")


class MirrorlistError(ValueError):
    """The upstream document is not a mirrorlist this proxy can answer for."""


def mirror_urls(raw_path: str) -> list[str]:
    """The URLs a mirrorlist lists, in order; reads at most :data:`MAX_MIRRORLIST` bytes.

    :raises MirrorlistError: it is empty, too large, not text, has a line that is no
        URL (an error page), or lists no URL.
    """
    with open(raw_path, "rb") as f:
        data = f.read(MAX_MIRRORLIST + 1)
    if len(data) > MAX_MIRRORLIST:
        raise MirrorlistError(
            f"upstream mirrorlist is over {MAX_MIRRORLIST >> 10} KiB (not a mirrorlist?)"
        )
    if not data.strip():
        raise MirrorlistError("upstream mirrorlist is empty")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        raise MirrorlistError("upstream mirrorlist is not text")
    urls = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not _URL.fullmatch(line):
            raise MirrorlistError(
                f"line {number} of the upstream mirrorlist is not a URL: {line[:60]!r}"
            )
        urls.append(line)
    if not urls:
        raise MirrorlistError(
            "upstream mirrorlist lists no mirror (an unknown repo, release or arch?)"
        )
    return urls


#: Each mirrorlist service's tree on its distribution's master host, for the mirrors
#: that keep that tree at the root of their host (``https://mirror.example/9.5/BaseOS/``).
ROOT_TREES = {
    "mirrors.rockylinux.org": "https://dl.rockylinux.org/pub/rocky/",
    "mirrors.almalinux.org": "https://repo.almalinux.org/almalinux/",
}

#: A path that starts as a release tree does: ``/<release>/<repository>/``.
_RELEASE_ROOT = re.compile(r"/\d+(?:\.\d+)*(?:-[a-z]+)?/[A-Za-z][\w.-]*/")


def rewrite_mirrorlist(raw_path: str, out_path: str, context: RewriteContext) -> None:
    """Write the mirrorlist of ``raw_path`` with this proxy as its one mirror: the first
    listed mirror a route serves (:func:`mirror_public_url`), else the first that keeps
    the release tree at the root of its host (:func:`_at_root`)."""
    urls = mirror_urls(raw_path)
    public = next(filter(None, (mirror_public_url(u, context) for u in urls)), None)
    if public is None:
        public = _at_root(urls, context)
    if public is None:
        raise MirrorlistError("no route of this proxy serves any mirror the mirrorlist lists")
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(f"{public}\n")


def _at_root(urls: list[str], context: RewriteContext) -> str | None:
    """This proxy's URL for the first mirror that keeps its distribution's release tree
    at the root of its host, as the master host has that tree: the distribution is the
    mirrorlist service's (:data:`ROOT_TREES`, by the host it was asked of)."""
    master = ROOT_TREES.get(urlsplit(context.page_url).hostname or "")
    if master is None:
        return None
    for url in urls:
        path = mirror_path(url)
        if path is not None and _RELEASE_ROOT.match(path):
            public = context.public_url(master + path[1:])
            if public is not None:
                return public
    return None
