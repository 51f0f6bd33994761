"""A minimal HTTP endpoint for Prometheus to scrape: ``GET /metrics``, nothing else."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional

log = logging.getLogger("octo_core.transport")

MAX_REQUEST_HEAD = 8192        # a scrape request is a few hundred bytes
READ_TIMEOUT = 5.0


async def serve_metrics(render: Callable[[], str], host: str = "127.0.0.1",
                        port: int = 0) -> asyncio.AbstractServer:
    """Serve ``render()`` as Prometheus text at ``http://host:port/metrics``.

    Each connection gets one answer and is closed; a request head over 8 KiB or
    slower than 5 s is dropped. Returns the listening server (``.close()`` it).
    """

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) == 3 and parts[0] in (b"GET", b"HEAD") and \
                    parts[1].split(b"?", 1)[0] == b"/metrics":
                body = render().encode()
                status, kind = b"200 OK", b"text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, kind = b"not found: try /metrics\n", b"404 Not Found", b"text/plain"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind +
                         b"\r\nContent-Length: " + str(len(body)).encode() +
                         b"\r\nConnection: close\r\n\r\n" + (b"" if parts[:1] == [b"HEAD"] else body))
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError) as exc:
            log.debug("metrics request dropped: %s", exc)
        finally:
            writer.close()

    return await asyncio.start_server(answer, host, port, limit=MAX_REQUEST_HEAD)


def bound_port(server: asyncio.AbstractServer) -> Optional[int]:
    """The port a started server listens on."""
    return server.sockets[0].getsockname()[1] if server.sockets else None
