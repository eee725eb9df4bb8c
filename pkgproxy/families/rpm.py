"""RPM repositories (dnf, yum, zypper): Fedora, EPEL, RHEL clones, CentOS Stream, openSUSE.

``repodata/repomd.xml`` is the index: revalidated after the route's ``index_ttl``, kept
with its detached signature ``repomd.xml.asc`` (revalidated whenever repomd.xml comes
back changed, as Debian's Release and Release.gpg), and never replaced by an older one
(its ``<revision>``, or its newest ``<timestamp>``), so a lagging mirror cannot take
the cache back in time. repomd lists the metadata files (primary, filelists, other,
updateinfo, modules, comps) by content-addressed names with their checksums and sizes:
those are kept forever once they match. ``primary.xml`` lists every package's location,
size and checksum: an ``.rpm`` is stored only once it matches them, then kept forever.
Fedora's and EPEL's ``metalink`` answers are rewritten to name this proxy as the one
mirror (:mod:`pkgproxy.rewrite.metalink`), and so are Rocky's and AlmaLinux's
``mirrorlist`` answers (:mod:`pkgproxy.rewrite.mirrorlist`).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import replace

from pkgproxy.config.model import Route
from pkgproxy.families import CacheClass, Decision, Expect, Facts, Family, Request, on_both_schemes
from pkgproxy.families.compressed import Chunks, open_index, stream
from pkgproxy.families.debian import signature_time
from pkgproxy.rewrite.metalink import rewrite_metalink
from pkgproxy.rewrite.mirrorlist import rewrite_mirrorlist

_REPOMD = re.compile(r"(?:^|/)repodata/repomd\.xml$")
_REPOMD_ASC = re.compile(r"(?:^|/)repodata/repomd\.xml\.(?:asc|key)$")
#: ``<hex digest>-<type>.<ext>``: createrepo's unique metadata names.
_CONTENT_ADDRESSED = re.compile(r"(?:^|/)repodata/[0-9a-f]{32,128}-[^/]+$")
_REPODATA = re.compile(r"(?:^|/)repodata/[^/]+$")
_PRIMARY = re.compile(
    r"(?:^|/)repodata/(?:[0-9a-f]{32,128}-)?primary\.xml(?:\.(?:gz|xz|bz2|zst))?$"
)
_PACKAGE = re.compile(r"[^/]\.(?:rpm|drpm)$")
#: MirrorManager's ``mirrorlist?repo=...&arch=...`` (Rocky), AlmaLinux's
#: ``mirrorlist/<release>/<repo>``.
_MIRRORLIST = re.compile(r"mirrorlist(?:/[^/]+/[^/]+)?")

#: repomd/primary checksum types as :mod:`hashlib` names ("sha" is yum's old SHA-1).
_ALGOS = {
    "sha": "sha1",
    "sha1": "sha1",
    "sha224": "sha224",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
    "md5": "md5",
}
_HEX_LENGTH = {"sha1": 40, "sha224": 56, "sha256": 64, "sha384": 96, "sha512": 128, "md5": 32}


def classify(
    route: Route, path: str, facts: Facts | None = None, request: Request | None = None
) -> Decision:
    """Classify ``path`` (relative to a repository's or a mirror's root) of an RPM route."""
    known = facts.get(route.upstream + path) if facts is not None else None
    if _PACKAGE.search(path) and "repodata/" not in path:
        return Decision(CacheClass.IMMUTABLE).with_expect(known)
    if _CONTENT_ADDRESSED.search(path):
        return Decision(CacheClass.IMMUTABLE).with_expect(known)
    decision = Decision(CacheClass.MUTABLE, ttl=route.index_ttl)
    if path == "metalink":
        # MirrorManager's answer for ?repo=...&arch=...: this proxy as the one mirror.
        return replace(decision, rewrite=rewrite_metalink)
    if _MIRRORLIST.fullmatch(path):
        # The same, as a plain list of repository URLs: this proxy's one.
        return replace(decision, rewrite=rewrite_mirrorlist)
    if _REPOMD.search(path):
        # A mirror behind a round-robin name may lag behind the one asked last time;
        # repomd.xml and its signature are one pair, refreshed together.
        return replace(decision, version_of=repomd_version, revalidate_also=(f"{path}.asc",))
    if _REPOMD_ASC.search(path):
        return replace(decision, version_of=signature_time)
    if _REPODATA.search(path):
        # Plain (not content-addressed) metadata names: what the cached repomd says.
        return decision.with_expect(known)
    # .treeinfo, images, media.1/ and the odd README: revalidated after the TTL.
    return decision


_REVISION = re.compile(rb"<revision>\s*(\d+)\s*</revision>")
_TIMESTAMP = re.compile(rb"<timestamp>\s*(\d+)\s*</timestamp>")


def repomd_version(head: bytes) -> float | None:
    """How new a repomd.xml is: its numeric ``<revision>`` (createrepo writes the time
    of the build), else the newest ``<timestamp>`` of the files it lists."""
    m = _REVISION.search(head)
    if m:
        return float(m.group(1))
    stamps = [float(s) for s in _TIMESTAMP.findall(head)]
    return max(stamps) if stamps else None


def learns(path: str) -> bool:
    """repomd.xml lists the metadata files; primary lists the packages."""
    return bool(_REPOMD.search(path) or _PRIMARY.search(path))


def learn(path: str, body: Chunks, url: str) -> list[tuple[str, Expect]]:
    """What an index lists (runs in the disk pool: decompressing a primary is CPU work)."""
    if _REPOMD.search(path):
        return learn_repomd(body, url)
    return learn_primary(body, url)


def _root_of(url: str) -> str:
    """The repository root of an index's URL: the directory above ``repodata/``."""
    i = url.rfind("repodata/")
    return url[:i] if i >= 0 else url.rsplit("/", 1)[0] + "/"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _checks(checksum: ET.Element | None, size: str | None) -> Expect | None:
    """The Expect of a ``<checksum type=...>`` and a size; ``None`` if unusable."""
    digests: dict[str, str] = {}
    if checksum is not None and checksum.text:
        algo = _ALGOS.get(checksum.get("type", "").lower())
        hexd = checksum.text.strip().lower()
        if algo is not None and len(hexd) == _HEX_LENGTH[algo]:
            digests[algo] = hexd
    n = int(size) if size is not None and size.strip().isdigit() else None
    if not digests and n is None:
        return None
    return Expect(n, digests)


def _href(location: ET.Element | None, root: str) -> str | None:
    if location is None:
        return None
    href = location.get("href")
    if not href or href.startswith("/") or "://" in href or ".." in href.split("/"):
        return None
    base = location.get("{http://www.w3.org/XML/1998/namespace}base")
    if base and "://" in base:
        return base.rstrip("/") + "/" + href
    return root + href


def learn_repomd(body: Chunks, url: str) -> list[tuple[str, Expect]]:
    """Every metadata file repomd.xml lists, with its size and checksum."""
    root = _root_of(url)
    out = []
    for data in ET.parse(stream(body)).getroot():
        if _local(data.tag) != "data":
            continue
        fields = {_local(child.tag): child for child in data}
        size = fields.get("size")
        href = _href(fields.get("location"), root)
        expect = _checks(fields.get("checksum"), size.text if size is not None else None)
        if href is not None and expect is not None:
            out.append((href, expect))
    return out


def learn_primary(body: Chunks, url: str) -> list[tuple[str, Expect]]:
    """``location -> (size, checksum)`` of every package of a primary.xml, read as a
    stream (Fedora's is hundreds of megabytes once decompressed)."""
    root = _root_of(url)
    out = []
    with open_index(body) as index:
        top: ET.Element | None = None
        for event, elem in ET.iterparse(index, events=("start", "end")):
            if top is None:
                top = elem
                continue
            if event != "end" or _local(elem.tag) != "package":
                continue
            checksum = location = None
            size: str | None = None
            for child in elem:
                name = _local(child.tag)
                if name == "checksum":
                    checksum = child
                elif name == "location":
                    location = child
                elif name == "size":
                    size = child.get("package")
            href = _href(location, root)
            expect = _checks(checksum, size)
            if href is not None and expect is not None:
                out.append((href, expect))
            top.clear()
    return out


ROUTES: tuple[Route, ...] = (
    # RPM (dnf, yum, zypper). Fedora and EPEL from Fedora's master host, which serves every
    # release and update; MirrorManager's metalink answers name this proxy as the one mirror
    # (revalidated as often as repomd.xml, so the checksums they carry keep up with it).
    # Rocky's and AlmaLinux's mirrorlist answers, likewise, list this proxy alone.
    Route(
        name="fedora",
        family="rpm",
        prefix="/fedora/",
        upstream="https://dl.fedoraproject.org/pub/fedora/linux/",
        forward=on_both_schemes(
            "dl.fedoraproject.org/pub/fedora/linux/", "download.fedoraproject.org/pub/fedora/linux/"
        ),
    ),
    Route(
        name="epel",
        family="rpm",
        prefix="/epel/",
        upstream="https://dl.fedoraproject.org/pub/epel/",
        forward=on_both_schemes(
            "dl.fedoraproject.org/pub/epel/", "download.fedoraproject.org/pub/epel/"
        ),
    ),
    Route(
        name="fedora-metalink",
        family="rpm",
        prefix="/fedora-metalink/",
        upstream="https://mirrors.fedoraproject.org/",
        forward=on_both_schemes("mirrors.fedoraproject.org/"),
    ),
    Route(
        name="rocky",
        family="rpm",
        prefix="/rocky/",
        upstream="https://dl.rockylinux.org/pub/rocky/",
        forward=on_both_schemes(
            "dl.rockylinux.org/pub/rocky/", "download.rockylinux.org/pub/rocky/"
        ),
    ),
    Route(
        name="rocky-mirrorlist",
        family="rpm",
        prefix="/rocky-mirrorlist/",
        upstream="https://mirrors.rockylinux.org/",
        forward=on_both_schemes("mirrors.rockylinux.org/"),
    ),
    Route(
        name="almalinux",
        family="rpm",
        prefix="/almalinux/",
        upstream="https://repo.almalinux.org/almalinux/",
        forward=on_both_schemes("repo.almalinux.org/almalinux/"),
    ),
    Route(
        name="almalinux-mirrorlist",
        family="rpm",
        prefix="/almalinux-mirrorlist/",
        upstream="https://mirrors.almalinux.org/",
        forward=on_both_schemes("mirrors.almalinux.org/"),
    ),
    Route(
        name="centos-stream",
        family="rpm",
        prefix="/centos-stream/",
        upstream="https://mirror.stream.centos.org/",
        forward=on_both_schemes("mirror.stream.centos.org/"),
    ),
    Route(
        name="opensuse",
        family="rpm",
        prefix="/opensuse/",
        upstream="https://download.opensuse.org/",
        forward=on_both_schemes("download.opensuse.org/", "cdn.opensuse.org/"),
    ),
)

FAMILY = Family(classify, learns, learn, routes=ROUTES, compressed=(".rpm", ".drpm"))
