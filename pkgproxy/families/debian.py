"""Debian and Ubuntu archives (apt).

``pool/`` files and ``by-hash/`` indexes never change under their names, so they are kept
forever and a client's ``max-age=0`` does not send them upstream again; a by-hash URL
names its own digest, which the body must match before it is stored. Release files and
the indexes under ``dists/`` change and are revalidated after the route's ``index_ttl``.
See PROTOCOLS.md section 2.2 for the classes, checked in this order.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pkgproxy.families import CacheClass, Decision

if TYPE_CHECKING:
    from pkgproxy.config import Route

_BY_HASH = re.compile(
    r"(?:^|/)dists/.+/by-hash/(?P<algo>MD5Sum|SHA1|SHA256|SHA512)/(?P<hex>[0-9a-f]{32,128})$"
)
_HASH_ALGOS = {
    "MD5Sum": ("md5", 32),
    "SHA1": ("sha1", 40),
    "SHA256": ("sha256", 64),
    "SHA512": ("sha512", 128),
}
_POOL = re.compile(
    r"(?:^|/)pool/.+/[^/]+\.(?:u?deb|ddeb|dsc|tar\.(?:gz|xz|bz2|lzma|zst)|diff\.gz"
    r"|buildinfo|changes|asc)$"
)
_PDIFF = re.compile(r"(?:^|/)dists/.+\.diff/(?!Index$)[^/]+$")


def classify(route: Route, path: str) -> Decision:
    """Classify ``path`` (relative to the archive root, no query) of a Debian route."""
    m = _BY_HASH.search(path)
    if m:
        algo, length = _HASH_ALGOS[m.group("algo")]
        if len(m.group("hex")) == length:
            return Decision(CacheClass.IMMUTABLE, digests={algo: m.group("hex")})
        return Decision(CacheClass.PASS)
    if _POOL.search(path) or _PDIFF.search(path):
        return Decision(CacheClass.IMMUTABLE)
    # Release files, indexes, the rest of dists/ and the odd file outside it (README,
    # project/trace) are all revalidated after the route's TTL.
    return Decision(CacheClass.MUTABLE, ttl=route.index_ttl)
