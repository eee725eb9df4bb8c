"""Client addresses and the networks they are checked against (``admin_networks``,
``trusted_proxies``). Plain data, no I/O."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(host: object) -> IP | None:
    """``host`` as an IP address (an IPv4-mapped IPv6 one as the IPv4 one it is), or
    ``None`` when it is none (a UNIX socket's address, a name, garbage)."""
    if not isinstance(host, str):
        return None
    try:
        ip = ipaddress.ip_address(host.strip().partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class Networks:
    """A list of networks (``10.0.0.0/8``, ``::1``) that addresses are checked against."""

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, host: object) -> bool:
        """Whether ``host`` (an address, as a string or parsed) is in one of them."""
        ip = host if isinstance(host, IP) else parse_ip(host)
        return ip is not None and any(ip in net for net in self._networks)
