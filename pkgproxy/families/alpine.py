"""Alpine Linux repositories (apk).

``APKINDEX.tar.gz`` is the index, revalidated after the route's TTL. Packages (``.apk``)
never change under their names once published, so they are kept forever, but only
after they match the size (``S:``) and control checksum (``C:``) the cached index gives
for them. PROTOCOLS.md section 3.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import re
import tarfile
import zlib

from pkgproxy.config.model import Route
from pkgproxy.families import CacheClass, Decision, Expect, Facts, Family, Request, on_both_schemes
from pkgproxy.families.compressed import Chunks, stream

_BRANCH = r"(?:v\d+\.\d+|edge|latest-stable)"
_INDEX = re.compile(rf"^{_BRANCH}/[^/]+/[^/]+/(?:APKINDEX\.tar\.gz|Packages\.adb)$")
_PACKAGE = re.compile(rf"^{_BRANCH}/[^/]+/[^/]+/[^/]+\.apk$")
_RELEASE = re.compile(rf"^{_BRANCH}/releases/")


def classify(
    route: Route, path: str, facts: Facts | None = None, request: Request | None = None
) -> Decision:
    """Classify ``path`` (relative to the mirror root) of an Alpine route."""
    if _PACKAGE.match(path):
        known = facts.get(route.upstream + path) if facts is not None else None
        return Decision(CacheClass.IMMUTABLE).with_expect(known)
    if _RELEASE.match(path) and "latest" not in path and not path.startswith("latest-stable/"):
        return Decision(CacheClass.IMMUTABLE)
    return Decision(CacheClass.MUTABLE, ttl=route.index_ttl)


def learns(path: str) -> bool:
    """The v2 index lists size and checksum of every package beside it."""
    return path.endswith("/APKINDEX.tar.gz") and bool(_INDEX.match(path))


def parse_apkindex(text: str) -> list[tuple[str, int | None, str | None]]:
    """``(file name, S:, C:)`` of each record of an APKINDEX text."""
    out = []
    for record in text.split("\n\n"):
        fields = {}
        for line in record.splitlines():
            if len(line) > 2 and line[1] == ":":
                fields[line[0]] = line[2:]
        name, version = fields.get("P"), fields.get("V")
        if not name or not version:
            continue
        size = fields.get("S")
        out.append(
            (
                f"{name}-{version}.apk",
                int(size) if size and size.isdigit() else None,
                fields.get("C"),
            )
        )
    return out


def learn(path: str, body: Chunks, url: str) -> list[tuple[str, Expect]]:
    """Read ``APKINDEX`` out of the index archive's bytes (runs in the disk pool)."""
    directory = url.rsplit("/", 1)[0]
    # Two gzip streams, each a tar segment (signature, then index); gzip reads both as
    # one stream, and ignore_zeros steps over the first segment's end marker.
    with (
        gzip.GzipFile(fileobj=stream(body), mode="rb") as gz,
        tarfile.open(fileobj=gz, mode="r|", ignore_zeros=True) as tar,
    ):
        for member in tar:
            if member.name == "APKINDEX" and member.isfile():
                f = tar.extractfile(member)
                if f is None:
                    break
                text = f.read().decode("utf-8", "replace")
                return [
                    (
                        f"{directory}/{name}",
                        Expect(size, {"apk-control": c} if c and c.startswith("Q1") else {}),
                    )
                    for name, size, c in parse_apkindex(text)
                    if "/" not in name  # only packages of the index's own directory
                ]
    return []


class ApkControlHasher:
    """Alpine's ``C:`` checksum: ``Q1`` + base64 of the SHA-1 of the second gzip member.

    An ``.apk`` is three concatenated gzip streams (signature, control, data); the index
    checksums the raw bytes of the control stream. The streams are found by inflating
    only the first two; the large data stream is not decompressed.
    """

    def __init__(self) -> None:
        self._member = 0
        self._inflater = zlib.decompressobj(wbits=31)
        self._sha1 = hashlib.sha1()
        self._done = False
        self._error = False

    def update(self, data: bytes, /) -> None:
        while data and not self._done and not self._error:
            try:
                self._inflater.decompress(data, 1 << 16)
            except zlib.error:
                self._error = True
                return
            tail = self._inflater.unconsumed_tail
            used = len(data) - len(tail) - len(self._inflater.unused_data)
            if self._member == 1:
                self._sha1.update(data[:used])
            if self._inflater.eof:
                rest = self._inflater.unused_data
                self._member += 1
                if self._member == 2:
                    self._done = True
                    return
                self._inflater = zlib.decompressobj(wbits=31)
                data = rest + tail if tail else rest
            else:
                data = tail

    def hexdigest(self) -> str:
        if not self._done or self._error:
            return "(no control stream)"
        return "Q1" + base64.b64encode(self._sha1.digest()).decode()


#: The built-in routes of this family (a configuration file overrides one by name).
ROUTES: tuple[Route, ...] = (
    Route(
        name="alpine",
        family="alpine",
        prefix="/alpine/",
        upstream="https://dl-cdn.alpinelinux.org/alpine/",
        forward=on_both_schemes("dl-cdn.alpinelinux.org/alpine/"),
        index_ttl=300.0,
    ),
)

FAMILY = Family(
    classify,
    learns,
    learn,
    routes=ROUTES,
    compressed=(".apk",),
    hashers={"apk-control": ApkControlHasher},
)
