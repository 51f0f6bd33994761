"""Node addresses (``host:port``, ``[v6]:port`` or ``unix:///path``), their lookup, and binding.

Names are looked up and listening sockets bound by Python, never by the event
loop: uvloop resolves on libuv's thread pool (``create_server`` for any host,
``create_connection`` for a name), and once that pool has started, every child
forked from the process crashes (SIGSEGV) as it exits, libuv's exit hook
joining pool threads the child does not have. The loop is handed bound sockets
and numeric addresses only.
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
from typing import (Any, Awaitable, Callable, List, NamedTuple, Optional, Protocol, Sequence, Tuple,
                    TypeVar)

from octo_core.blocking import LOOKUPS

T = TypeVar("T")


class Address(NamedTuple):
    """Where to connect or listen: ``host`` and ``port``, or a unix socket ``path``."""
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


async def resolve(host: Optional[str], port: int, *, passive: bool = False) -> List[Tuple[int, Any]]:
    """The ``(family, sockaddr)`` pairs to reach (or, ``passive``, to listen on) TCP
    ``host``:``port``, in getaddrinfo's order: a numeric host, or none (every
    interface), is read at once; a name is looked up off the loop (``octo_core.blocking``)."""
    flags = socket.AI_PASSIVE if passive else 0
    try:
        infos = socket.getaddrinfo(host or None, port, 0, socket.SOCK_STREAM, 0,
                                   flags | socket.AI_NUMERICHOST)
    except socket.gaierror:
        if not host:
            raise
        try:
            infos = await LOOKUPS.run(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM, 0,
                                      flags)
        except socket.gaierror as exc:   # the system's text does not say which name
            raise socket.gaierror(exc.errno, f"cannot resolve {host!r}: {exc.strerror}") from None
    found: List[Tuple[int, Any]] = []
    for family, _, _, _, sockaddr in infos:
        if (family, sockaddr) not in found:
            found.append((family, sockaddr))
    return found


async def connect(open_to: Callable[..., Awaitable[T]], host: Optional[str], port: int,
                  **options: Any) -> T:
    """``open_to(ip, port, **options)`` for each address ``host`` resolves to, in
    turn: the first that connects (the last failure if none does)."""
    failure: Optional[OSError] = None
    for _, sockaddr in await resolve(host, port):
        try:
            return await open_to(sockaddr[0], sockaddr[1], **options)
        except OSError as exc:
            failure = exc
    raise failure or OSError(f"{host} resolves to no address")


class Listening(Protocol):
    """A listening server as this package uses one: asyncio's ``Server`` and uvloop's
    both have ``sockets``, which ``asyncio.AbstractServer`` (uvloop's stubs) does not declare."""

    @property
    def sockets(self) -> Sequence[socket.socket]: ...

    def close(self) -> None: ...


class Listeners:
    """The servers listening on one address: one per address it resolves to."""

    def __init__(self, servers: List[Listening]) -> None:
        self.servers = servers

    @property
    def sockets(self) -> List[socket.socket]:
        """Every listening socket, of all the servers."""
        return [sock for server in self.servers for sock in server.sockets]

    def close(self) -> None:
        """Stop listening on all of them."""
        for server in self.servers:
            server.close()


async def listen(serve: Callable[..., Awaitable[Listening]], host: Optional[str],
                 port: int) -> Listeners:
    """Bind every address ``host``:``port`` resolves to (port 0: one free port, the
    same for all), then ``serve(sock=...)`` on each socket, as asyncio's
    ``create_server(host, port)`` would (address reuse on, IPv6 sockets IPv6 only)."""
    bound: List[socket.socket] = []
    servers: List[Listening] = []
    try:
        for family, sockaddr in await resolve(host, port, passive=True):
            sock = socket.socket(family, socket.SOCK_STREAM)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(bound) > 1:
                sockaddr = (sockaddr[0], bound[0].getsockname()[1], *sockaddr[2:])
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                raise OSError(exc.errno, f"error while attempting to bind on address "
                                         f"{sockaddr!r}: {exc.strerror}") from None
        for sock in bound:
            servers.append(await serve(sock=sock))
    except BaseException:
        for server in servers:
            server.close()
        for sock in bound:
            sock.close()
        raise
    return Listeners(servers)


def check_listen_address(host: Any, port: Any) -> None:
    """``TypeError`` or ``ValueError`` for a ``host`` or ``port`` a server cannot listen
    on as meant: a port past 65535 would be bound modulo 65536, and ``"ip:port"``
    looked up as a host name."""
    if not isinstance(host, str):
        raise TypeError(f"host is a string (a name, an IP address or unix:///path), not {host!r}")
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port is an int (0: a free port, chosen at start), not {port!r}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range (0 to 65535; 0: a free port, chosen at "
                         "start)")
    if ":" in host and not host.startswith("unix://"):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"host {host!r} is not a host name or IP address (the port "
                             "goes in port=; an IPv6 address, without brackets)") from None


async def refuse_a_live_socket(path: str) -> None:
    """``OSError`` when a server already listens at the unix socket ``path``: asyncio
    would replace its socket file, quietly taking its traffic (a stale file, with
    nobody listening, may go)."""
    if not os.path.exists(path):
        return
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 1.0)
    except (OSError, asyncio.TimeoutError):
        return
    writer.close()
    raise OSError(errno.EADDRINUSE, f"a server is already listening at unix://{path}")
