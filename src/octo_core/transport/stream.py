"""A framed connection: decodes what arrives, coalesces what is written."""
from __future__ import annotations

import asyncio
import logging
from typing import List, Optional

from octo_core.errors import ProtocolError
from octo_core.protocol import DEFAULT_MAX_DEPTH, DEFAULT_MAX_FRAME_SIZE, Frame, FrameDecoder
from octo_core.afterfork import release_in_child, tell_forked_children
from octo_core.throttle import Throttle

log = logging.getLogger("octo_core.transport")

#: Bytes of frames decoded from what was read before they are handled: a read
#: full of small compressed frames inflates no further before flow control sees it.
READ_BATCH = 4 * 1024 * 1024

#: Bytes of writes held for the end of a loop iteration before they go out at
#: once: the transport's back-pressure (pause_writing, at its 64 KiB high-water
#: mark by default) must see a burst of calls while it is being made, not after.
WRITE_BATCH = 64 * 1024

#: How many of a burst's frames go out in one write. A burst's frames (the
#: replies to a read of many calls, or the calls their answers set off) leave
#: in batches as they are made, so the peer starts on the first while the rest
#: are being made: with both ends busy (many calls in flight), each works while
#: the other does, instead of waiting for the other's whole burst. A batch of
#: FIRST_BATCH_FRAMES, then each twice the last up to WRITE_BATCH_FRAMES, the
#: count starting anew at each read: an idle peer gets work at once, and a long
#: burst costs few writes (a burst of 64: 7 writes).
FIRST_BATCH_FRAMES = 1
WRITE_BATCH_FRAMES = 64

#: Seconds a closed connection may take to hand its last bytes to a peer that
#: reads nothing before it is aborted: a close must not hold a socket forever.
CLOSE_LINGER = 2.0


#: Connections closed for bytes that break the framing (either side).
BROKEN = Throttle(10.0, log)


class FramedProtocol(asyncio.Protocol):
    """Base of the server and client connections.

    Writes made during one loop iteration go out together (see ``send``);
    bad bytes close this connection only (``frames_received`` never sees them).
    Unified headers are read under the default ``Limits`` whatever a server or
    client sets for its messages: a header is at most 32 KiB, and a tight
    message limit must not refuse the appkeys and trace ids every call carries.
    """

    # Slots: every call reads and writes these, and a slot stays a fixed-offset
    # access however many attributes a subclass adds (CPython's compact
    # instance dicts stop at 30 keys).
    __slots__ = ("transport", "peer", "peer_ip", "_decoder", "max_frame_size", "max_depth",
                 "_out", "_out_bytes", "sent_bytes", "_batch_frames", "_flush_scheduled",
                 "_wrote_since_read", "closed",
                 "loop", "last_read", "frame_started", "_linger",
                 "discarding", "__weakref__", "__dict__")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.peer = "?"
        self.peer_ip: Optional[str] = None
        self._decoder = FrameDecoder(max_frame_size, max_batch=READ_BATCH)
        self.max_frame_size = max_frame_size   # what it reads, and so, by agreement, sends
        self.max_depth = max_depth   # the nesting of the messages it reads, and so sends
        self._out: List[bytes] = []
        self._out_bytes = 0    # in _out
        self.sent_bytes = 0    # every frame ever sent: what the peer took is this less the unsent
        self._batch_frames = FIRST_BATCH_FRAMES   # frames in _out that go out at once
        self._flush_scheduled = False
        # A burst of writes follows a read (the replies it wakes, the calls
        # they make): its first frame leaves at once, the rest in batches.
        self._wrote_since_read = False
        self.closed = False
        self.loop = asyncio.get_event_loop()
        self.last_read = self.loop.time()
        # since when the frame being read has been arriving (None between frames)
        self.frame_started: Optional[float] = None
        self._linger: Optional[asyncio.TimerHandle] = None
        # closing: what the peer still sends is read and dropped (a lingering close)
        self.discarding = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        tell_forked_children(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
            self.peer_ip = peer[0]
        elif peer:
            self.peer = str(peer)
        else:   # a unix socket's peer has no name: its path says which; a TCP peer reset
            # before its name was asked has none either, and the port's is not it
            local = transport.get_extra_info("sockname")
            self.peer = "a peer gone at once" if isinstance(local, tuple) else str(local or "unix")

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        now = self.last_read = self.loop.time()
        self._wrote_since_read = False
        self._batch_frames = FIRST_BATCH_FRAMES
        if self._read(data) or self.frame_started is None:
            self.frame_started = now if self._decoder.buffered else None

    def _read(self, data: bytes = b"") -> bool:
        """Hand the frames of ``data`` (and those the decoder holds) to
        ``frames_received``, a batch at a time while ``accepting_frames``;
        a framing error ends the stream once the frames before it are handled.
        Returns whether any frame was handed over."""
        decoder, handed = self._decoder, False
        while True:
            try:
                frames = decoder.feed(data)
            except ProtocolError as exc:
                self.protocol_error(exc)
                return handed
            if frames:
                handed = True
                if len(frames) == 1:
                    # One frame: its reply (an eager handler's) leaves as it is sent,
                    # ahead of the call's own bookkeeping: one call in flight waits
                    # for nothing else.
                    self.frames_received(frames)
                else:
                    # What is sent while these frames are handled (eager handlers'
                    # replies) leaves in batches (see send), the rest when they are done.
                    flush_pending = self._flush_scheduled
                    self._flush_scheduled = True
                    try:
                        self.frames_received(frames)
                    finally:
                        if not flush_pending:
                            self._flush()
            elif decoder.more:
                # Whole frames held back by the budget its reader shares (a server's):
                # they wait for the next loop pass.
                self.frames_deferred()
                return handed
            if decoder.error is not None:
                self.protocol_error(decoder.error)
                return handed
            if not decoder.more or self.closed or not self.accepting_frames():
                return handed
            data = b""

    def _inherited_by_fork(self) -> None:
        """In a forked child: the socket is the parent's. Close the child's copy;
        nothing is written from here."""
        self.closed = True
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is not None:
            release_in_child([sock.fileno()])

    def accepting_frames(self) -> bool:
        """Whether to decode more of what was read now (flow control says no)."""
        return True

    def frames_received(self, frames: List[Frame]) -> None:  # pragma: no cover - abstract
        """Handle a batch of whole frames, in the order they arrived (see ``_read``)."""
        raise NotImplementedError

    def frames_deferred(self) -> None:  # pragma: no cover - abstract
        """Whole frames wait in the decoder for a loop pass with room in its
        ``InflateBudget`` (only readers given one see this)."""
        raise NotImplementedError

    def protocol_error(self, exc: ProtocolError) -> None:
        """The peer broke the framing: drop this connection, nothing else."""
        BROKEN.log("closing connection %s: %s", self.peer, exc)
        self.abort(exc)

    def send(self, data: bytes) -> None:
        """Write ``data``: the first frame since the last read goes out at once (no
        added latency, no extra loop pass); later ones go out in growing batches
        as they come (see ``FIRST_BATCH_FRAMES``; at most ``WRITE_BATCH`` bytes),
        what is left at the end of the loop iteration."""
        if self.closed:
            return
        self.sent_bytes += len(data)
        if self._flush_scheduled:
            pass
        elif self._wrote_since_read:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        else:
            self._wrote_since_read = True
            self.transport.write(data)  # type: ignore[union-attr]  # only sent to once connected
            return
        self._out.append(data)
        self._out_bytes += len(data)
        if len(self._out) >= self._batch_frames or self._out_bytes >= WRITE_BATCH:
            self._batch_frames = min(2 * self._batch_frames, WRITE_BATCH_FRAMES)
            self._write_out()   # (the flush still scheduled finds less, or nothing, to do)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write_out()

    def _write_out(self) -> None:
        out = self._out
        self._out_bytes = 0
        # A write that failed (the peer is gone) closes the transport at once but
        # tells connection_lost only on the next loop pass: the answers finishing
        # meanwhile are dropped here, not each logged by asyncio's transport.
        if self.closed or not out or self.transport.is_closing():  # type: ignore[union-attr]
            out.clear()
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.transport.write(data)  # type: ignore[union-attr]  # (as in send)

    def close(self) -> None:
        """Flush what is queued, then close; abort if the peer has not taken
        what is left within ``CLOSE_LINGER`` seconds."""
        if self.closed:
            return
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()
            if self.transport.get_write_buffer_size():
                self._linger = self.loop.call_later(CLOSE_LINGER, self.transport.abort)

    def abort(self, exc: Optional[BaseException] = None) -> None:
        """Close at once, discarding unsent data."""
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        self._out.clear()
        self._out_bytes = 0
        if self._linger is not None:
            self._linger.cancel()
