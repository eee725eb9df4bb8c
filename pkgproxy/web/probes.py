"""The probes under ``/_pkgproxy/`` anyone may ask: health, readiness, the CA certificate.

The admin pages proper (status, metrics, actions) are the admin resource's.
"""

from __future__ import annotations

from twisted.web import http
from twisted.web.server import Request

from pkgproxy.cache.store import CacheStore
from pkgproxy.learning import Learner
from pkgproxy.tlsca import CertificateAuthority
from pkgproxy.web.respond import reason


def answer(
    request: Request, store: CacheStore, learner: Learner, ca: CertificateAuthority | None
) -> bytes:
    """Answer a probe (or 404 for any other path under ``/_pkgproxy/``)."""
    if request.path in (b"/_pkgproxy/health", b"/_pkgproxy/ready"):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        failure = store.failure
        if failure is not None:
            # Alive but useless: a cache it cannot use (a disk gone, read-only) is a
            # failed health check, so a supervisor restarts or replaces it.
            request.setResponseCode(http.SERVICE_UNAVAILABLE)
            return f"pkgproxy: {failure}\n".encode()
        ready = (store.ready and learner.ready) or request.path == b"/_pkgproxy/health"
        request.setResponseCode(200 if ready else 503)
        return b"ok\n" if ready else b"starting\n"
    if request.path == b"/_pkgproxy/ca.crt" and ca is not None:
        # Public by nature: clients install it to trust intercepted https sources.
        request.setHeader(b"content-type", b"application/x-pem-file")
        return ca.cert_pem
    return reason(request, http.NOT_FOUND, "no such admin page")
