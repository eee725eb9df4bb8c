"""twistd plugin: ``twistd pkgproxy``.

Kept import-light on purpose: twistd imports every plugin module on every run, so the
real work lives in :mod:`pkgproxy.tap` and is named here only by string.
"""

from twisted.application.service import ServiceMaker

pkgproxy = ServiceMaker(
    "pkgproxy",
    "pkgproxy.tap",
    "Caching proxy for Debian, Ubuntu, Alpine, PyPI, npm and OCI registries",
    "pkgproxy",
)
