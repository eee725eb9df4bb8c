"""Mirrorlists of RPM repositories (``mirrorlist=`` in a dnf or yum repository file).

A mirrorlist is plain text: one repository base URL per line, in the order dnf tries
them, with blank lines and ``#`` comments (Rocky's MirrorManager at
``/mirrorlist?arch=...&repo=...``, AlmaLinux's ``/mirrorlist/<release>/<repo>``, whose URLs
keep a literal ``$basearch`` that dnf fills in). The rewritten answer lists one URL: this
proxy's, for the first listed mirror a route serves, as it is or by the tree its path
names under the master host's layout (:func:`pkgproxy.rewrite.metalink.mirror_public_url`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pkgproxy.rewrite.metalink import mirror_public_url

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


def rewrite_mirrorlist(raw_path: str, out_path: str, context: RewriteContext) -> None:
    """Write the mirrorlist of ``raw_path`` with this proxy as its one mirror."""
    for url in mirror_urls(raw_path):
        public = mirror_public_url(url, context)
        if public is not None:
            break
    else:
        raise MirrorlistError("no route of this proxy serves any mirror the mirrorlist lists")
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(f"{public}\n")
