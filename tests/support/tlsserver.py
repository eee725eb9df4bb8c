"""A throwaway CA and an https:// static file server on 127.0.0.1 signed by it.

Stands in for an upstream with a private CA (an internal mirror) and for a host reached
through a blind tunnel. The server logs ``accepted`` for every TCP connection *before*
any TLS, so a test can prove that a connection was never made at all.

Run as ``python -m tests.support.tlsserver --port P --cert C --key K --dir D``; tests use
:func:`start_tls_server`, which also stops it in cleanup.
"""

from __future__ import annotations

import argparse
import http.server
import os
import socket
import ssl
import sys
import time
from dataclasses import dataclass

from twisted.trial.unittest import SynchronousTestCase

from pkgproxy.tlsca import CertificateAuthority
from tests.support.procs import HOST, REPO_ROOT, ServerProcess, clean_env, free_port, tail


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA certificate (what a client trusts) and the server's pair."""

    ca_cert: str
    cert: str
    key: str


def make_tls_files(directory: str) -> TlsFiles:
    """A new CA, and a server certificate it signed for ``127.0.0.1`` and ``localhost``.

    Made with pkgproxy's own CA code: an upstream's CA of the test's own, unrelated to the
    CA pkgproxy uses for interception.
    """
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    files = TlsFiles(
        os.path.join(directory, "ca.pem"),
        os.path.join(directory, "server.pem"),
        os.path.join(directory, "server.key"),
    )
    ca = CertificateAuthority(files.ca_cert, os.path.join(directory, "ca.key"))
    cert_pem, key_pem = ca.issue([HOST, "localhost"])
    with open(files.cert, "wb") as f:
        f.write(cert_pem)
    with open(files.key, "wb") as f:
        f.write(key_pem)
    return files


class TlsServer(ServerProcess):
    """The https:// static server child; :meth:`connections` counts TCP accepts."""

    def url(self, path: str = "/") -> str:
        """``https://127.0.0.1:PORT`` + ``path``."""
        return f"https://{HOST}:{self.port}{path}"

    def connections(self) -> int:
        """TCP connections the server accepted so far (logged before any TLS)."""
        return tail(self.log_path, 1 << 20).count("accepted connection")


def start_tls_server(
    testcase: SynchronousTestCase,
    root_dir: str,
    files: TlsFiles,
    *,
    timeout: float = 10.0,
    keepalive: bool = False,
) -> TlsServer:
    """Serve ``root_dir`` over https on 127.0.0.1 until the test ends.

    Readiness is read from the server's own "listening" line, not probed with a
    connection, so that :meth:`TlsServer.connections` counts only the test's clients.
    """
    log_dir = os.path.abspath(testcase.mktemp())
    os.makedirs(log_dir)
    port = free_port()
    server = TlsServer(
        "tls-server",
        [sys.executable, "-u", "-m", "tests.support.tlsserver", "--port", str(port)]
        + ["--cert", files.cert, "--key", files.key, "--dir", os.path.abspath(root_dir)]
        + (["--keepalive"] if keepalive else []),
        port,
        os.path.join(log_dir, "tls-server.log"),
        clean_env({"PYTHONPATH": REPO_ROOT}),
        cwd=REPO_ROOT,
    )
    testcase.addCleanup(server.stop)
    deadline = time.monotonic() + timeout
    while "listening on" not in tail(server.log_path):
        if not server.running or time.monotonic() > deadline:
            server.kill9()
            testcase.fail(f"tls-server exited or was not up within {timeout} s\n{server.logs()}")
        time.sleep(0.05)
    return server


class _Server(http.server.ThreadingHTTPServer):
    """Logs each accept, then does the TLS handshake in the handler's thread."""

    daemon_threads = True
    context: ssl.SSLContext

    def get_request(self) -> tuple[socket.socket, object]:
        sock, addr = self.socket.accept()
        print(f"accepted connection from {addr}", flush=True)
        tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return tls, addr

    def finish_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:  # type: ignore[override]
        assert isinstance(request, ssl.SSLSocket)
        request.settimeout(10)
        try:
            request.do_handshake()
        except (ssl.SSLError, OSError) as e:
            print(f"handshake failed: {e}", flush=True)
            return
        super().finish_request(request, client_address)  # type: ignore[arg-type]


def main() -> None:
    """Serve ``--dir`` over https on 127.0.0.1:``--port`` until killed."""
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--keepalive", action="store_true", help="HTTP/1.1 persistent connections")
    args = p.parse_args()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)

    class Handler(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1" if args.keepalive else "HTTP/1.0"

        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=args.dir, **kw)  # type: ignore[arg-type]

    server = _Server((HOST, args.port), Handler)
    server.context = context
    print(f"listening on {HOST}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
