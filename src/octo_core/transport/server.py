"""The server side of a connection: frames in, handed to a dispatcher."""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import Callable, Deque, List, Optional, Set

from octo_core._codec import InflateBudget
from octo_core.errors import ProtocolError
from octo_core.protocol import DEFAULT_MAX_DEPTH, Frame
from octo_core.throttle import Throttle
from octo_core.transport.stream import BROKEN, FramedProtocol, log


_REPLIES_UNREAD = 1     # why reading is paused: the peer leaves its replies unread,
_BUSY = 2               # or too many of its calls are running,
_CROWDED = 4            # or the server's connections hold too much of frames partly read,
_TURN = 8               # or a read decoded into more than a batch (READ_BATCH: frames that
                        # inflate a lot): the rest waits a loop pass, the others' turn
#: The pauses that also hold back the calls of frames already read: an answer made
#: in the read that brought its call (an eager handler's) fills the write buffer
#: as the read's calls run, and each may be far bigger than its request.
_HOLD_CALLS = _REPLIES_UNREAD | _BUSY

#: Connections refused at ``max_connections``: a peer redialling in a loop makes one each.
_REFUSED = Throttle(10.0, log)
#: Peers on the deny list: expected traffic, logged at INFO, as sparingly.
_DENIED = Throttle(10.0, log, logging.INFO)
#: Connections cut for leaving their replies unread while their calls answer on.
_UNREAD = Throttle(10.0, log)
#: A peer past its mark of replies unread (see ``_cut_if_unread``) is cut unless it
#: takes UNREAD_RATE bytes of them every UNREAD_GRACE seconds, until below the mark;
#: past UNREAD_HARD times the mark, at once.
UNREAD_GRACE = 1.0
UNREAD_RATE = 64 * 1024
UNREAD_HARD = 4


#: Descriptors ``max_connections`` leaves free by default, at least: the process
#: has other files (its clients, registry, logs, the metrics endpoint).
_SPARE_FDS = 128
#: ... and on asyncio's own loop (not uvloop's), the sockets it accepted and has not
#: closed yet: it accepts up to its listen backlog (100) a loop pass, and a refused
#: connection closes three passes after its accept (a task makes its transport, which
#: calls connection_made a pass later, whose abort closes it a pass after that). A
#: peer redialling past ``max_connections`` keeps that many open.
_ACCEPTED_UNCLOSED = 4 * 100


def fd_connections(loop: asyncio.AbstractEventLoop) -> Optional[int]:
    """``max_connections`` by default: the open-file soft limit (RLIMIT_NOFILE) less
    an eighth of it, or less what must stay spare on ``loop`` (``_SPARE_FDS``, and
    ``_ACCEPTED_UNCLOSED`` on asyncio's own loop), whichever leaves more, but at
    least half of it; None where there is no such limit. A server that runs out of
    descriptors cannot refuse anyone: the loop fails to accept, over and over."""
    try:
        import resource
    except ImportError:    # (not on Windows)
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return None
    spare = _SPARE_FDS
    if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        spare += _ACCEPTED_UNCLOSED
    return max(soft // 2, soft - max(soft // 8, spare))


class PartialFrames:
    """The bytes a server's connections hold of frames partly read (and read, not
    decoded yet), summed. Past ``limit``, a connection that holds part of a frame
    stops reading until the sum is down to half, but for one at a time, which
    reads on to its frame's end, then lets the next on (the one holding most): a
    frame never waits for ever, however large. So many peers, each within
    ``max_frame_size``, add up to the limit, one frame and one read each (the
    read that found the limit passed), not to connections x max_frame_size.
    The read timeout goes on for a waiting connection (the pause is for the
    others): a peer that never ends its frame is cut, and leaves its room."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._waiting: Set["ServerConnection"] = set()
        self._through: Optional["ServerConnection"] = None   # reads on past the limit

    def add(self, conn: "ServerConnection", change: int, holds: int) -> bool:
        """``conn`` holds ``change`` bytes more (``holds`` in all); True when it must
        wait. A frame ended or a connection gone: the ones that wait go on."""
        self.total += change
        if holds and self.total > self.limit:
            if self._through is None or self._through is conn:
                self._through = conn
                return False
            self._waiting.add(conn)
            return True
        if not holds:
            self._waiting.discard(conn)
            if self._through is conn:
                self._through = None
        if self._waiting:
            self._let_on()
        return False

    def _let_on(self) -> None:
        if self.total <= self.limit // 2:
            waiting, self._waiting = self._waiting, set()
            for conn in waiting:
                conn.room()
        elif self._through is None:   # the one nearest its frame's end, likely
            self._through = max(self._waiting, key=lambda conn: conn.partial_held)
            self._waiting.discard(self._through)
            self._through.room()


class ServerConnection(FramedProtocol):
    """One accepted connection; every complete frame goes to ``dispatch(conn, frame)``.

    Flow control, so that one peer costs bounded memory: the connection stops
    reading and dispatching while the peer leaves its replies unread (the write
    buffer is over its high-water mark; the calls already running answer on, and
    past ``pause_reading_bytes`` of replies unread, or two frames' worth, a peer
    that does not take them at ``UNREAD_RATE`` is cut, at once past
    ``UNREAD_HARD`` times that), and while
    ``pause_reading_at`` of its calls run, or while its running calls hold
    ``pause_reading_bytes`` of requests (as decoded: compressed frames count
    inflated, and the objects their arguments make count too: the dispatcher
    gives each call's ``size``), until both are down to half. What it holds back waits in the
    socket, in the frame decoder (still compressed), or, for the rest of the
    batch that made it pause, in a backlog; nothing is refused for it. A read
    whose frames decode to more than a batch (``READ_BATCH``: compressed frames
    that inflate a lot) is served a batch a loop pass, so other connections
    are served between its batches; with ``inflate`` (the server's), what all
    its connections inflate in one loop pass is bounded too.

    A peer that shuts its sending side (half-close, as ``nc -N`` and many
    scripted clients do) still gets the answers to what it sent: the
    connection closes once they are written. (Not over TLS: asyncio's and
    uvloop's TLS transports close on EOF whatever the protocol says.)
    """

    def __init__(self, dispatch: Callable[["ServerConnection", Frame], None],
                 connections: Set["ServerConnection"], max_frame_size: int,
                 max_connections: Optional[int] = None, pause_reading_at: int = 1024,
                 pause_reading_bytes: int = 64 * 1024 * 1024,
                 admit: Optional[Callable[[Optional[str]], Optional[str]]] = None,
                 max_depth: int = DEFAULT_MAX_DEPTH,
                 partial: Optional[PartialFrames] = None,
                 inflate: Optional[InflateBudget] = None,
                 make_room: Optional[Callable[[], bool]] = None) -> None:
        super().__init__(max_frame_size, max_depth)
        self._decoder.budget = inflate
        self._make_room = make_room   # at max_connections: whether one was let go for this one
        self._dispatch = dispatch
        self._partial = partial
        self.partial_held = 0   # what the decoder held when last counted in _partial
        self._admit = admit    # peer IP -> why it may not connect, or None
        self._connections = connections
        self._max_connections = max_connections
        self._pause_at = pause_reading_at
        self._pause_bytes = pause_reading_bytes
        self.held = 0       # request bytes of the calls running
        self._paused = 0
        self._backlog: Deque[Frame] = collections.deque()
        self.in_flight = 0
        self.pooled = 0     # calls of this connection holding a business-pool slot
        self._input_ended = False
        self._rejected = False   # a bad frame was dispatched: nothing after it is served
        self.unified_peer = False   # it sent a unified frame (it can be told of a close)
        self.told_idle_at: Optional[float] = None   # when it was told of an idle close
        self._unread_check: Optional[asyncio.TimerHandle] = None   # (see _cut_if_unread)

    @property
    def reading_paused(self) -> bool:
        """Whether reading is paused now, for any reason (flow control)."""
        return bool(self._paused)

    @property
    def paused_for_itself(self) -> bool:
        """Paused for what this connection does (its calls, its unread replies): the
        wait is ours, its read timeout does not run (see PartialFrames for the other)."""
        return bool(self._paused & ~_CROWDED)

    def _read(self, data: bytes = b"") -> bool:
        handed = FramedProtocol._read(self, data)   # (not super(): every read's path)
        holds = 0 if self.closed else self._decoder.buffered
        if holds != self.partial_held and self._partial is not None:   # (a whole frame: no)
            self._count_partial(self._partial, holds)
        return handed

    def _count_partial(self, partial: PartialFrames, holds: int) -> None:
        """It holds ``holds`` bytes of a frame partly read now, not ``partial_held``."""
        change, self.partial_held = holds - self.partial_held, holds
        if partial.add(self, change, holds):
            self._pause(_CROWDED)

    def room(self) -> None:
        """The server's connections hold less of partial frames again: read on."""
        self._resume(_CROWDED)

    def call_started(self, pooled: bool, size: int) -> None:
        """A call of ``size`` request bytes runs (``pooled``: on the business pool)."""
        self.in_flight += 1
        self.pooled += pooled
        self.held += size
        if self.in_flight >= self._pause_at or self.held >= self._pause_bytes:
            self._pause(_BUSY)

    def call_finished(self, size: int) -> None:
        """A call of ``size`` request bytes was answered: read on once below half the
        pause marks; a half-closed peer's connection closes with its last answer."""
        self.in_flight -= 1
        self.held -= size
        if self._paused & _REPLIES_UNREAD:
            self._cut_if_unread()
        if self._paused & _BUSY and self.in_flight <= self._pause_at // 2 \
                and self.held <= self._pause_bytes // 2:
            self._resume(_BUSY)
        if self._input_ended and not self.in_flight:
            self.loop.call_soon(self._close_when_answered)   # after this call's reply is sent

    def replies_unread(self) -> bool:
        """Are replies still on their way to the peer (written, not taken yet)?"""
        return self.transport is not None and not self.closed and self._unread() > 0

    def _unread(self) -> int:
        """Bytes of replies written and not taken by the peer yet."""
        assert self.transport is not None   # (answering: connected)
        return self.transport.get_write_buffer_size() + self._out_bytes

    def _cut_if_unread(self) -> None:
        """(Its replies unread.) Calls dispatched before the pause answer on, each
        reply maybe far bigger than its request: past ``pause_reading_bytes`` of
        them unread, or two frames' worth if more (the mark), the peer must take
        ``UNREAD_RATE`` bytes every ``UNREAD_GRACE`` seconds until below it, or is
        cut; past ``UNREAD_HARD`` times the mark it is cut at once. (Not at the
        mark: a burst of answers finishing together passes it however fast the
        peer reads.)"""
        unread, mark = self._unread(), max(self._pause_bytes, 2 * self.max_frame_size)
        if unread > UNREAD_HARD * mark:
            self._cut(unread)
        elif self._unread_check is None and unread > mark:
            self._unread_check = self.loop.call_later(UNREAD_GRACE, self._cut_if_stuck,
                                                      unread, self.sent_bytes)

    def _cut_if_stuck(self, unread_then: int, sent_then: int) -> None:
        """``UNREAD_GRACE`` after ``unread_then`` bytes were found unread: cut a peer
        that took less than ``UNREAD_RATE`` of them and of those sent since; look
        again later at one that did, while still past the mark."""
        self._unread_check = None
        if self.closed or not self._paused & _REPLIES_UNREAD:
            return
        unread = self._unread()
        if unread_then + (self.sent_bytes - sent_then) - unread < UNREAD_RATE * UNREAD_GRACE:
            self._cut(unread)
        else:
            self._cut_if_unread()

    def _cut(self, unread: int) -> None:
        _UNREAD.log("closing connection %s: %d bytes of replies unread", self.peer, unread)
        self.abort()

    def eof_received(self) -> bool:
        """The peer sends no more: answer what it sent, then close (stay half-open)."""
        self._input_ended = True
        self._close_when_answered()
        return self.transport is None or self.transport.get_extra_info("sslcontext") is None

    def _close_when_answered(self) -> None:
        if not self.in_flight and not self._backlog and not self._frames_held():
            self.close()

    def _frames_held(self) -> bool:
        """Whole frames the decoder kept back past a batch, still to be served. (A
        close waits for them too. Defensive: reading is paused while there are
        any, so no EOF is seen before they are served.)"""
        return self._decoder.more and self._decoder.error is None \
            and not (self._rejected or self.discarding or self.closed)

    def protocol_error(self, exc: ProtocolError) -> None:
        """The peer broke the framing: read no more, answer what it sent before, close."""
        BROKEN.log("closing connection %s: %s", self.peer, exc)
        self._input_ended = True
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._close_when_answered()

    def shutdown(self) -> None:
        """A lingering close, for a stop: the write side shuts after the last reply
        (the peer reads every answer, then EOF); what the peer still sends is read
        and dropped, never run, until it closes its side. Closing with its bytes
        unread would reset the connection, and the peer would lose replies it
        had not read yet. (TLS cannot half-close: it just closes.)"""
        if self.closed or self.transport is None:
            return
        self._flush()
        if not self.transport.can_write_eof() or self.transport.get_extra_info("sslcontext"):
            self.close()
            return
        self.discarding = True
        self._backlog.clear()
        self._input_ended = True       # its EOF then closes it once calls are answered
        try:
            self.transport.write_eof()
        except OSError:                # the peer is gone already (asyncio says so here)
            self.abort()
            return
        self.transport.resume_reading()

    def reject(self, exc: ProtocolError) -> None:
        """A frame the dispatcher cannot trust: drop what came after it, answer what
        came before, close."""
        self._rejected = True
        self._backlog.clear()
        self.protocol_error(exc)

    def accepting_frames(self) -> bool:
        return not (self._paused or self._backlog or self._input_ended or self.closed)

    def pool_released(self) -> None:
        """One of its calls gave back its business-pool slot."""
        self.pooled -= 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        refused = self._admit(self.peer_ip) if self._admit is not None else None
        if refused:   # before it can hold a connection slot, a heartbeat or an answer
            _DENIED.log("refusing connection from %s: %s", self.peer, refused)
            self.abort()
            return
        if self._max_connections is not None and len(self._connections) >= self._max_connections \
                and not (self._make_room is not None and self._make_room()):
            _REFUSED.log("refusing connection from %s: %d connections open (max %d)",
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
        if not self._paused:
            # Soon, not now: this runs inside a call's answer, and going on
            # dispatches more calls -- they must not nest inside it.
            self.loop.call_soon(self._go_on)

    def _go_on(self) -> None:
        """Dispatch what was held back, then read again, unless paused anew."""
        if self.closed:
            return
        while self._backlog and not self._paused and not self.closed:
            self._dispatch(self, self._backlog.popleft())
        if self._frames_held() and not (self._paused or self._backlog):
            self._read()      # the whole frames the decoder kept back
        if self._input_ended:
            self._close_when_answered()
        elif not self._paused and not self.closed and self.transport is not None:
            # a frame still arriving starts its clock now: the wait was ours, not the peer's
            self.frame_started = self.loop.time() if self._decoder.buffered else None
            self.transport.resume_reading()

    def frames_received(self, frames: List[Frame]) -> None:
        self._take(frames)
        if self._decoder.more:
            # Inflating the rest may take long (a peer's compression bombs): other
            # connections are served first.
            self.frames_deferred()

    def frames_deferred(self) -> None:
        """The decoder holds whole frames back: serve them on the next loop pass
        (reading waits too: nothing piles up)."""
        if not self._paused and not self.closed:
            self._pause(_TURN)
            self.loop.call_soon(self._resume, _TURN)

    def _take(self, frames: List[Frame]) -> None:
        """Dispatch ``frames``, or hold them in the backlog while calls are held back."""
        if self._backlog or self._paused & _HOLD_CALLS:
            self._backlog.extend(frames)
            return
        for i, frame in enumerate(frames):
            if self.closed or self._rejected:
                return
            self._dispatch(self, frame)
            if self._paused & _HOLD_CALLS:
                self._backlog.extend(frames[i + 1:])
                return

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        super().connection_lost(exc)
        if self._unread_check is not None:
            self._unread_check.cancel()
        self._backlog.clear()
        self._connections.discard(self)
        if self._partial is not None and self.partial_held:
            self._count_partial(self._partial, 0)   # (closed: it holds nothing now)
