"""Node addresses: ``host:port``, ``[v6]:port`` or ``unix:///path``."""
from __future__ import annotations

import socket
from typing import NamedTuple, Optional


class Address(NamedTuple):
    host: Optional[str]
    port: Optional[int]
    path: Optional[str] = None   # a unix socket path

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix://{self.path}"
        if self.host and ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse ``host:port``, ``[::1]:port`` or ``unix:///path/to.sock``."""
    if text.startswith("unix://"):
        path = text[len("unix://"):]
        if not path:
            raise ValueError(f"no socket path in {text!r}")
        return Address(None, None, path)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"address {text!r} is not host:port or unix:///path")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port_number = int(port)
    if not 0 <= port_number <= 65535:
        raise ValueError(f"port {port_number} out of range in {text!r}")
    return Address(host, port_number)


def default_route_ip(ipv6: bool = False) -> Optional[str]:
    """The source address of this machine's default route (what others reach it
    by), or None without one. A UDP "connect" sends nothing and looks up no name."""
    family, probe = ((socket.AF_INET6, "2001:db8::1") if ipv6
                     else (socket.AF_INET, "192.0.2.1"))    # documentation addresses
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.connect((probe, 9))
            return udp.getsockname()[0]
    except OSError:
        return None
