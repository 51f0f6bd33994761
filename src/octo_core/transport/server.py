"""The server side of a connection: frames in, handed to a dispatcher."""
from __future__ import annotations

from typing import Callable, List, Optional, Set

from octo_core.protocol import Frame
from octo_core.transport.stream import FramedProtocol, log


class ServerConnection(FramedProtocol):
    """One accepted connection; every complete frame goes to ``dispatch(conn, frame)``."""

    def __init__(self, dispatch: Callable[["ServerConnection", Frame], None],
                 connections: Set["ServerConnection"], max_frame_size: int,
                 max_connections: Optional[int] = None) -> None:
        super().__init__(max_frame_size)
        self._dispatch = dispatch
        self._connections = connections
        self._max_connections = max_connections
        self.in_flight = 0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self._max_connections is not None and len(self._connections) >= self._max_connections:
            log.warning("refusing connection from %s: %d connections open (max %d)",
                        self.peer, len(self._connections), self._max_connections)
            self.abort()
            return
        self._connections.add(self)

    def pause_writing(self) -> None:
        """The peer is not reading its replies: stop reading its requests until it
        does, or the replies would pile up in memory without bound."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def frames_received(self, frames: List[Frame]) -> None:
        for frame in frames:
            if self.closed:
                return
            self._dispatch(self, frame)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        super().connection_lost(exc)
        self._connections.discard(self)
