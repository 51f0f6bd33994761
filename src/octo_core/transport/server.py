"""The server side of a connection: frames in, handed to a dispatcher."""
from __future__ import annotations

from typing import Callable, List, Optional, Set

from octo_core.protocol import Frame
from octo_core.transport.stream import FramedProtocol, log


_REPLIES_UNREAD = 1     # why reading is paused: the peer is not reading its replies,
_TOO_MANY_CALLS = 2     # or it has too many calls running


class ServerConnection(FramedProtocol):
    """One accepted connection; every complete frame goes to ``dispatch(conn, frame)``.

    Flow control: reading stops while the peer leaves its replies unread (the
    write buffer is over its high-water mark) or while ``pause_reading_at``
    calls of this connection run (until half of them are done): the peer's
    further requests wait in the socket, not in memory.
    """

    def __init__(self, dispatch: Callable[["ServerConnection", Frame], None],
                 connections: Set["ServerConnection"], max_frame_size: int,
                 max_connections: Optional[int] = None, pause_reading_at: int = 1024) -> None:
        super().__init__(max_frame_size)
        self._dispatch = dispatch
        self._connections = connections
        self._max_connections = max_connections
        self._pause_at = pause_reading_at
        self._paused = 0
        self.in_flight = 0

    @property
    def reading_paused(self) -> bool:
        return bool(self._paused)

    def call_started(self) -> None:
        self.in_flight += 1
        if self.in_flight >= self._pause_at:
            self._pause(_TOO_MANY_CALLS)

    def call_finished(self) -> None:
        self.in_flight -= 1
        if self._paused & _TOO_MANY_CALLS and self.in_flight <= self._pause_at // 2:
            self._resume(_TOO_MANY_CALLS)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self._max_connections is not None and len(self._connections) >= self._max_connections:
            log.warning("refusing connection from %s: %d connections open (max %d)",
                        self.peer, len(self._connections), self._max_connections)
            self.abort()
            return
        self._connections.add(self)

    def pause_writing(self) -> None:
        self._pause(_REPLIES_UNREAD)

    def resume_writing(self) -> None:
        self._resume(_REPLIES_UNREAD)

    def _pause(self, why: int) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._paused |= why

    def _resume(self, why: int) -> None:
        if not self._paused & why:
            return
        self._paused &= ~why
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def frames_received(self, frames: List[Frame]) -> None:
        for frame in frames:
            if self.closed:
                return
            self._dispatch(self, frame)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        super().connection_lost(exc)
        self._connections.discard(self)
