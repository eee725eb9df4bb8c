"""Metalinks of RPM repositories (MirrorManager's ``/metalink?repo=...&arch=...``).

dnf asks a metalink for the mirrors of a repository and for the checksums repomd.xml must
have. The rewritten metalink keeps the upstream's checksums, size and timestamp (and its
``alternates``, the recent older repomd.xml a mirror may still serve), so dnf's own check
of repomd.xml passes, and lists one mirror only: this proxy, by the route that serves the
repository. A mirror URL is mapped to that route as it is, or by the tree it names
(``.../fedora/linux/...``, ``.../epel/...``) under the master host's layout, which the
built-in routes' forward prefixes name (:func:`mirror_public_url`, which the mirrorlist
rewrite shares).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from xml.sax.saxutils import escape, quoteattr

if TYPE_CHECKING:
    from pkgproxy.rewrite.context import RewriteContext

NS = "http://www.metalinker.org/"
MM0 = "http://fedorahosted.org/mirrormanager"

#: Trees of the mirror layouts (Fedora's, Rocky's, AlmaLinux's), and where each
#: distribution's master host has them: a mirror names the tree somewhere in its path.
TREES = {
    "/fedora/linux/": "https://dl.fedoraproject.org/pub/fedora/linux/",
    "/fedora-secondary/": "https://dl.fedoraproject.org/pub/fedora-secondary/",
    "/epel/": "https://dl.fedoraproject.org/pub/epel/",
    "/rocky/": "https://dl.rockylinux.org/pub/rocky/",
    "/rockylinux/": "https://dl.rockylinux.org/pub/rocky/",
    "/almalinux/": "https://repo.almalinux.org/almalinux/",
}


#: A run of slashes in a mirror's path.
_SLASHES = re.compile(r"/{2,}")


class MetalinkError(ValueError):
    """The upstream document is not a metalink this proxy can answer for."""


def mirror_path(url: str) -> str | None:
    """A mirror URL's path with each run of slashes as one (a mirror may write its tree
    as ``/pub/rocky//9.5/``; the master host's path has one slash, and so has the one
    cache entry of each file); ``None`` if it has a dot segment, which would lead the
    client elsewhere on this proxy (a mirror of these layouts never names one)."""
    path = urlsplit(url).path
    if any(segment in (".", "..") for segment in path.split("/")):
        return None
    return _SLASHES.sub("/", path)


def mirror_public_url(url: str, context: RewriteContext) -> str | None:
    """The URL a client uses, through this proxy, for a mirror's ``url``: the route
    serving it as it is, else the route serving the same file of the master host by the
    tree (:data:`TREES`) the URL names; ``None`` when no route serves it either way, or
    its path has a dot segment (:func:`mirror_path`)."""
    path = mirror_path(url)
    if path is None:
        return None
    mapped = context.public_url(url)
    if mapped is not None:
        return mapped
    for tree, master in TREES.items():
        if tree in path:
            mapped = context.public_url(master + path.split(tree, 1)[1])
            if mapped is not None:
                return mapped
    return None


def _hashes(verification: ET.Element | None) -> list[tuple[str, str]]:
    if verification is None:
        return []
    return [
        (h.get("type", ""), (h.text or "").strip())
        for h in verification.iter(f"{{{NS}}}hash")
        if h.get("type") and h.text
    ]


def _text(elem: ET.Element | None) -> str:
    return (elem.text or "").strip() if elem is not None else ""


def _what_repomd_is(elem: ET.Element, indent: str) -> list[str]:
    """The timestamp, size and hashes a metalink ``file`` (or ``alternate``) gives."""
    out = []
    timestamp = _text(elem.find(f"{{{MM0}}}timestamp"))
    size = _text(elem.find(f"{{{NS}}}size"))
    if timestamp.isdigit():
        out.append(f"{indent}<mm0:timestamp>{timestamp}</mm0:timestamp>\n")
    if size.isdigit():
        out.append(f"{indent}<size>{size}</size>\n")
    out.append(f"{indent}<verification>\n")
    for kind, value in _hashes(elem.find(f"{{{NS}}}verification")):
        out.append(f"{indent} <hash type={quoteattr(kind)}>{escape(value)}</hash>\n")
    out.append(f"{indent}</verification>\n")
    return out


def rewrite_metalink(raw_path: str, out_path: str, context: RewriteContext) -> None:
    """Write the metalink of ``raw_path`` with this proxy as its one mirror."""
    try:
        root = ET.parse(raw_path).getroot()
    except ET.ParseError as e:
        raise MetalinkError(f"upstream metalink is not XML: {e}") from None
    file = root.find(f"{{{NS}}}files/{{{NS}}}file[@name='repomd.xml']")
    if file is None:
        raise MetalinkError("upstream metalink lists no repomd.xml (an unknown repo or arch?)")
    public = None
    for url in file.iter(f"{{{NS}}}url"):
        public = mirror_public_url(_text(url), context)
        if public is not None:
            break
    if public is None:
        raise MetalinkError("no route of this proxy serves any mirror the metalink lists")
    out = [
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<metalink version="3.0" xmlns="{NS}" type="dynamic" generator="pkgproxy"'
        f' xmlns:mm0="{MM0}">\n <files>\n  <file name="repomd.xml">\n',
        *_what_repomd_is(file, "   "),
    ]
    alternates = file.find(f"{{{MM0}}}alternates")
    if alternates is not None:
        out.append("   <mm0:alternates>\n")
        for alt in alternates.findall(f"{{{MM0}}}alternate"):
            out += ["    <mm0:alternate>\n", *_what_repomd_is(alt, "     ")]
            out.append("    </mm0:alternate>\n")
        out.append("   </mm0:alternates>\n")
    scheme = urlsplit(public).scheme
    out.append(
        '   <resources maxconnections="1">\n'
        f'    <url protocol="{scheme}" type="{scheme}" preference="100">{escape(public)}</url>\n'
        "   </resources>\n  </file>\n </files>\n</metalink>\n"
    )
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("".join(out))
