"""etc/haproxy/pkgproxy.cfg made runnable on loopback, for the cluster test and bench.

The shipped configuration is what runs: only the lines it marks ``# test: listen`` and
``# test: node`` are replaced (127.0.0.1 ports for the example addresses), and HAProxy
connects to the nodes from :data:`BALANCER_SOURCE`, so that a node can tell the balancer
(its one trusted proxy) from the client the PROXY protocol header names (127.0.0.1).
Run it as a program to print the configuration::

    python3 -m tests.support.haproxy LISTEN_PORT NODE_PORT NODE_PORT NODE_PORT
"""

from __future__ import annotations

import os
import sys

from tests.support.procs import HOST, REPO_ROOT

HAPROXY_CFG = os.path.join(REPO_ROOT, "etc", "haproxy", "pkgproxy.cfg")
#: The address HAProxy connects to the nodes from: the nodes' one trusted proxy.
BALANCER_SOURCE = "127.0.0.2"


def node_names() -> list[str]:
    """The ``server`` names of the shipped configuration, in order."""
    with open(HAPROXY_CFG, encoding="utf-8") as f:
        return [line.split()[1] for line in f if line.rstrip().endswith("# test: node")]


def haproxy_config(port: int, node_ports: list[int]) -> str:
    """etc/haproxy/pkgproxy.cfg on ``port``, balancing over 127.0.0.1:``node_ports``."""
    with open(HAPROXY_CFG, encoding="utf-8") as f:
        lines = f.read().splitlines()
    ports = iter(node_ports)
    out = []
    for line in lines:
        if line.rstrip().endswith("# test: listen"):
            line = f"    bind {HOST}:{port}"
        elif line.rstrip().endswith("# test: node"):
            port_of_node = next(ports, None)
            if port_of_node is None:
                raise ValueError(f"{len(node_ports)} node ports for more nodes")
            line = f"    server {line.split()[1]} {HOST}:{port_of_node}"
        out.append(line)
        if line.startswith("backend "):
            out.append(f"    source {BALANCER_SOURCE}")
    if next(ports, None) is not None:
        raise ValueError(f"{len(node_ports)} node ports for fewer nodes")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(haproxy_config(int(sys.argv[1]), [int(p) for p in sys.argv[2:]]))
