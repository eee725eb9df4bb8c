"""``CONNECT``: intercept TLS for a routed host, blindly tunnel a listed one, refuse the rest.

Never a certificate, nor a tunnel, for a host no route or ``[tls_intercept] tunnel`` names.
"""

from __future__ import annotations

from typing import Any

from twisted.web import http
from twisted.web.server import NOT_DONE_YET, Request

from pkgproxy.tlsca import CertificateAuthority
from pkgproxy.web.respond import reason
from pkgproxy.web.routing import RouteTable
from pkgproxy.web.tunnel import BlindTunnels


def answer(
    request: Request,
    table: RouteTable,
    ca: CertificateAuthority | None,
    tunnels: BlindTunnels | None,
) -> bytes | int:
    """``CONNECT host:port`` with interception on: end TLS here for a routed host.

    The answer goes out on the raw connection, TLS starts with a certificate for
    exactly that host, and the same HTTP channel then reads the requests inside,
    which are routed like forward-proxy requests for ``https://host``. A host no
    route names is refused before any TLS, and no certificate is made for it, unless
    ``[tls_intercept] tunnel`` lists it: then it gets a blind, uncached tunnel.
    """
    authority = request.uri.decode("latin-1")
    host, _, port_text = authority.rpartition(":")
    host = host.strip("[]").lower()
    if not host or not port_text.isdigit():
        return reason(request, http.BAD_REQUEST, f"malformed CONNECT target {authority!r}")
    port = int(port_text)
    intercept = ca is not None and table.interceptable(host, port)
    # An intercepted host is cached; only a host no route names can be tunnelled.
    blind = not intercept and tunnels is not None and tunnels.allowed(host, port)
    if not intercept and not blind:
        return reason(
            request,
            http.FORBIDDEN,
            f"{authority} is not an https upstream of this proxy; nothing is tunnelled",
        )
    channel: Any = request.channel
    transport: Any = channel.transport
    if getattr(transport, "TLS", False):
        return reason(request, http.BAD_REQUEST, "CONNECT inside a tunnel")
    if blind and tunnels is not None:
        return tunnels.open(request, host, port)
    assert ca is not None
    options = ca.options_for(host)
    transport.write(b"HTTP/1.1 200 Connection established\r\nVia: 1.1 pkgproxy\r\n\r\n")
    request.startedWriting = 1  # answered above, outside the Request's own framing
    # The connection now carries the tunnel, whatever an HTTP/1.0 CONNECT (Python's
    # http.client, so pip) would otherwise mean for its persistence.
    channel.persistent = True
    channel.pkgproxy_tunnel = f"https://{host}" + ("" if port == 443 else f":{port}")
    transport.startTLS(options)
    request.finish()
    return NOT_DONE_YET
