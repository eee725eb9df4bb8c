"""A real outbound HTTP proxy (Debian's tinyproxy) on 127.0.0.1, for upstream-proxy tests.

:func:`start_tinyproxy` writes a config of the test's own, starts ``tinyproxy -d`` on a
free port and waits until it accepts connections; the test's cleanup stops it.
"""

from __future__ import annotations

import os
import shutil

from twisted.trial.unittest import SynchronousTestCase

from tests.support.procs import (
    HOST,
    ServerProcess,
    _fail_start,
    _wait_tcp,
    clean_env,
    free_port,
    tail,
)


class Tinyproxy(ServerProcess):
    """A running tinyproxy; :meth:`log` is its log file."""

    config_log = ""

    def log(self) -> str:
        return tail(self.config_log, 1 << 20) if self.config_log else ""


def start_tinyproxy(
    testcase: SynchronousTestCase,
    *,
    auth: tuple[str, str] | None = None,
    allow: str = HOST,
    timeout: float = 10.0,
) -> Tinyproxy:
    """tinyproxy on 127.0.0.1 allowing clients from ``allow`` (another address: it
    refuses every request with 403), asking for ``auth`` as Basic credentials if given."""
    binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    port = free_port()
    log_path = os.path.join(directory, "tinyproxy.log")
    lines = [
        f"Port {port}",
        f"Listen {HOST}",
        "Timeout 30",
        f"Allow {allow}",
        f'LogFile "{log_path}"',
        "LogLevel Info",
        "MaxClients 64",
    ]
    if auth is not None:
        lines.append(f"BasicAuth {auth[0]} {auth[1]}")
    conf = os.path.join(directory, "tinyproxy.conf")
    with open(conf, "w") as f:
        f.write("\n".join(lines) + "\n")
    server = Tinyproxy(
        "tinyproxy",
        [binary, "-d", "-c", conf],
        port,
        os.path.join(directory, "tinyproxy.out"),
        clean_env(),
    )
    server.config_log = log_path
    testcase.addCleanup(server.stop)
    error = _wait_tcp(server, timeout)
    if error:
        _fail_start(testcase, server, error)
    return server
