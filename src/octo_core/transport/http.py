"""A minimal HTTP endpoint: ``GET /metrics`` for Prometheus to scrape, ``GET /health``
for a readiness probe (a load balancer's, Kubernetes'), nothing else."""
from __future__ import annotations

import asyncio
import functools
import logging
from typing import Callable, Dict, Optional, Tuple

from octo_core.transport.address import Listeners, listen

log = logging.getLogger("octo_core.transport")

MAX_REQUEST_HEAD = 8192        # a scrape request is a few hundred bytes
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0            # a scraper that stops reading loses its answer
# Scrapers are few: more connections than this at once are not kept, so idle
# connections cannot use up the process's file descriptors (and the RPC port's).
MAX_CONNECTIONS = 16


class _BadRequest(Exception):
    """The request head is too long or ends early."""


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """The request head up to its blank line; lines may end in CRLF or a bare LF
    (RFC 9112 §2.2 lets a server accept either)."""
    head = b""
    while True:
        try:
            line = await reader.readline()
        except ValueError as exc:   # readline's form of a line longer than the limit
            raise _BadRequest(str(exc)) from None
        if not line.endswith(b"\n"):
            raise _BadRequest("the connection closed before the request head ended")
        head += line
        if line in (b"\r\n", b"\n"):
            return head
        if len(head) > MAX_REQUEST_HEAD:
            raise _BadRequest(f"request head over {MAX_REQUEST_HEAD} bytes")


#: ``health()``: whether the process serves, and a word saying how it is ("ALIVE").
Health = Callable[[], Tuple[bool, str]]
#: ``admit(peer IP)``: why that peer may not connect at all, or None.
Admit = Callable[[Optional[str]], Optional[str]]


def _response(head: bytes, render: Callable[[], str], health: Optional[Health]) -> bytes:
    """The whole HTTP response to the request ``head``."""
    parts = head.split(b"\n", 1)[0].split()
    path = parts[1].split(b"?", 1)[0] if len(parts) == 3 and parts[0] in (b"GET", b"HEAD") \
        else None
    if path == b"/metrics":
        body = render().encode()
        status, kind = b"200 OK", b"text/plain; version=0.0.4; charset=utf-8"
    elif path == b"/health" and health is not None:
        serving, word = health()
        body, kind = word.encode() + b"\n", b"text/plain"
        status = b"200 OK" if serving else b"503 Service Unavailable"
    else:
        body, status, kind = (b"not found: try /metrics" + (b" or /health" if health else b"")
                              + b"\n", b"404 Not Found", b"text/plain")
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind +
            b"\r\nContent-Length: " + str(len(body)).encode() +
            b"\r\nConnection: close\r\n\r\n" + (b"" if parts[:1] == [b"HEAD"] else body))


async def serve_metrics(render: Callable[[], str], host: str = "127.0.0.1",
                        port: int = 0, health: Optional[Health] = None,
                        admit: Optional[Admit] = None) -> Listeners:
    """Serve ``render()`` as Prometheus text at ``http://host:port/metrics``, and
    with ``health``, its word at ``/health``: 200 while it says the process
    serves, else 503. A peer ``admit`` refuses is closed as it connects (the RPC
    port's deny list: the metrics name the methods hosted).

    Each connection gets one answer and is closed; a request head over 8 KiB or
    slower than 5 s is dropped, and so is an answer the client does not take
    within 5 s. At most ``MAX_CONNECTIONS`` are served at once: one more takes the
    place of the oldest still sending its request head (a few peers trickling
    heads, or sending none, would otherwise keep every probe out), or is closed
    at once when all are answering. Returns the listening server (``.close()`` it).
    """
    # each connection served, oldest first: True while it is still sending its head
    served: Dict[asyncio.StreamWriter, bool] = {}

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if admit is not None and _refused(admit, writer):
            writer.transport.abort()
            return
        if not _make_room(served):
            log.debug("metrics connection refused: %d answers being sent", len(served))
            writer.close()
            return
        served[writer] = True
        # drain() then waits for the whole answer, so close() leaves nothing buffered
        writer.transport.set_write_buffer_limits(high=0)
        try:
            head = await asyncio.wait_for(_read_head(reader), READ_TIMEOUT)
            if writer.is_closing():   # the peer left, or was dropped for a newer one, as
                return                # its head came in (uvloop raises on a write then)
            served[writer] = False
            writer.write(_response(head, render, health))
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (asyncio.TimeoutError, _BadRequest, ConnectionError) as exc:
            log.debug("metrics request dropped: %s", exc)
            writer.transport.abort()   # nothing worth flushing to this client
        finally:
            served.pop(writer, None)
            writer.close()

    return await listen(functools.partial(asyncio.start_server, answer, limit=MAX_REQUEST_HEAD),
                        host, port)


def _refused(admit: Admit, writer: asyncio.StreamWriter) -> bool:
    """Whether ``admit`` refuses the peer of ``writer`` (logged at debug: the RPC
    port logs such peers already, and a scraper on a deny list may come often)."""
    peer = writer.get_extra_info("peername")
    why = admit(peer[0] if isinstance(peer, tuple) else None)
    if why:
        log.debug("metrics connection from %s refused: %s", peer, why)
    return bool(why)


def _make_room(served: Dict[asyncio.StreamWriter, bool]) -> bool:
    """Whether one more connection may be served: below the cap, or once the
    oldest connection still sending its head is dropped to make room for it."""
    if len(served) < MAX_CONNECTIONS:
        return True
    slowest = next((writer for writer, reading in served.items() if reading), None)
    if slowest is None:
        return False
    del served[slowest]   # (its own handler ends as its read fails)
    log.debug("metrics connection dropped for a newer one: its request head is late")
    slowest.transport.abort()
    return True


def bound_port(server: Listeners) -> Optional[int]:
    """The port a started server listens on."""
    return server.sockets[0].getsockname()[1] if server.sockets else None
