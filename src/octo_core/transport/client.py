"""The client side: one multiplexed connection per node, and the endpoint that keeps it."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import os
import ssl as _ssl
import random
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

from thriftpy2.thrift import TApplicationException

from octo_core import _codec, protocol
from octo_core._codec import InflateBudget
from octo_core.errors import (CallTimeout, ClientClosed, DecodeError, ProtocolError, TransportError,
                              own_copy)
from octo_core.protocol import CLOSE_NOTICE_SEQUENCE, Frame, Header, MessageType, NodeStatus
from octo_core.tasks import outcome_seen
from octo_core.throttle import Throttle
from octo_core.transport.address import Address, connect, parse_address
from octo_core.transport.stream import FramedProtocol, log

#: Connections left because the node stopped answering on them or could not read
#: a request: it sets that off at will, on each connection opened after, so at
#: most one record per node and reason a period (the others counted in the next).
_LEFT = Throttle(10.0, log)
#: Connections left because the node said it closes them (stopping, idle): one
#: notice a connection, ``pool_size`` of them at a node's stop.
_NOTICED = Throttle(10.0, log, logging.INFO)


#: Seconds within which a connection that closes unheard was dropped "at once".
DROPPED_AT_ONCE = 0.1

#: Seconds a connection that completes after its node left stays open for the
#: calls that waited for it to be sent (they go within a few loop passes).
RETIRED_CONNECT_GRACE = 1.0


class ClientConnection(FramedProtocol):
    """A connection that carries many calls at once.

    ``expect(seq)`` registers a future that the reply with that sequence id
    resolves (replies may come in any order). A reply nobody waits for (the call
    timed out, or it answers a oneway call) is dropped quietly.
    """

    # seq -> (future, finish, method): see expect()
    _Pending = Tuple[asyncio.Future, Optional[Callable[[Frame, str], Any]], str]

    def __init__(self, node: str, max_frame_size: int,
                 max_depth: int = protocol.DEFAULT_MAX_DEPTH, heartbeats: bool = False,
                 on_stopping: Optional[Callable[[], None]] = None,
                 unheard_hint: str = "", inflate: Optional[InflateBudget] = None) -> None:
        super().__init__(max_frame_size, max_depth)
        # shared with the client's other connections: what they inflate a loop pass
        # (a node's compression bombs wait their turn behind the others' replies)
        self._decoder.budget = inflate
        self._deferred = False   # whole frames wait for the next loop pass (frames_deferred)
        self.node = node
        # added to what the waiting calls are told when the node closes the
        # connection without a byte (see Endpoint's unheard_hint)
        self.unheard_hint = unheard_hint
        # told when the node says it is stopping (its close notice: see _close_notice)
        self.on_stopping = on_stopping
        # The endpoint heartbeats it when silent (see _stuck); last_read when calls
        # last timed out (None before any did).
        self.heartbeats = heartbeats
        self._read_at_timeout: Optional[float] = None
        self._pending: Dict[int, ClientConnection._Pending] = {}
        # Requests sent whose replies have not come, those whose callers stopped
        # waiting (timed out, cancelled) too: what the node still works on, or will
        # (a server answering a connection's calls one at a time: behind them).
        self.owed = 0
        self._sequence = itertools.count()
        # Call deadlines: a heap of (when, seq, timeout, method) served by one
        # timer armed for the earliest -- a timer per call costs more than the
        # rest of the call's bookkeeping. Answered calls leave lazily; the heap
        # holds no future, so an answer is not kept alive until its deadline.
        # (A seq comes back only after 2**31 calls, far beyond any timeout.)
        self._deadlines: List[Tuple[float, int, float, str]] = []
        # Calls waiting at which the next expect() forgets those whose caller gave up
        # (see _forget_given_up).
        self._sweep_at = SWEEP_AT_LEAST
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timer_at = 0.0
        # The server is not reading what was sent (the write buffer is over its
        # high-water mark): new requests wait in drained() rather than pile up.
        self.write_paused = False
        self._drain_waiters: List[asyncio.Future] = []
        self.retiring = False   # closes once idle; new calls go elsewhere (close_when_idle)
        # It closed with not a byte from the node, on calls waiting for replies or
        # at once (see Endpoint._open): not an idle close of a oneway-only one.
        self.dropped_unheard = False
        # ... with calls sent on it: what a native-thrift-only server does with a
        # unified request (a server refusing the connection itself does it at once)
        self.dropped_on_calls = False
        # close() was called here (the client retired it, or is closing): a close that
        # says nothing of the node, however young and unheard the connection
        self._closed_here = False
        self._closed_why = ""   # what close(why) said: the calls that come after hear it too

    def next_sequence(self) -> int:
        """Unique per connection, starting at 0; kept within i32 for the thrift seqid."""
        return next(self._sequence) & 0x7FFFFFFF

    def expect(self, seq: int, timeout: Optional[float] = None, method: str = "",
               finish: Optional[Callable[[Frame, str], Any]] = None) -> asyncio.Future:
        """A future for the reply to ``seq``; fails at once if the connection is gone
        (it can close between the connect and the caller resuming).

        The future's result is the reply ``Frame``, or ``finish(frame, node)`` --
        the decoded answer, or the error ``finish`` raises -- worked out as the
        reply is read, so the caller's task resumes with it. With ``timeout`` the
        future fails with ``CallTimeout`` after that many seconds and ``seq`` is
        forgotten: a late reply is dropped. ``method`` names the call in errors.
        """
        if self.closed:
            why = self._closed_why or "connection closed before the request was sent"
            raise closed_error(why, method=method or None, node=self.node, request_sent=False)
        future = self.loop.create_future()
        if len(self._pending) >= self._sweep_at:   # (every call's path: one comparison)
            self._forget_given_up()
        self._pending[seq] = (future, finish, method)
        self.owed += 1
        if timeout is not None:
            when = self.loop.time() + timeout
            heapq.heappush(self._deadlines, (when, seq, timeout, method))
            if self._timer is None or when < self._timer_at:
                self._arm(when)
        return future

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._expire)

    def _expire(self) -> None:
        """Fail the calls whose time is up; re-arm for the next live deadline."""
        self._timer = None
        if len(self._deadlines) > 2 * len(self._pending):
            # Mostly answered calls (all of them, a second after a burst): dropped at
            # once, not popped one by one at log n tuple comparisons each.
            self._prune_deadlines()
        deadlines, pending = self._deadlines, self._pending
        now = self.loop.time()
        waited = 0.0    # the longest timeout that ran out now
        while deadlines:
            when, seq, timeout, method = deadlines[0]
            entry = pending.get(seq)
            if entry is None or when <= now:
                heapq.heappop(deadlines)
                if entry is None:
                    continue              # answered or forgotten already
                del pending[seq]          # timed out, or its caller gave up (cancelled)
                future = entry[0]
                if not future.done():
                    future.set_exception(CallTimeout(f"no reply within {timeout:.3g}s",
                                                     method=method, node=self.node))
                    waited = max(waited, timeout)
            else:
                self._arm(when)
                break
        if waited and not self.retiring:
            stuck = self._stuck(now, waited)
            self._read_at_timeout = self.last_read
            if stuck:
                # Every reply behind it waits too (a reply that was only slow still
                # arrives on the connection left behind).
                self._leave(_LEFT, "%s; new calls go to a new connection", stuck)
                return
        if self.retiring:
            self._close_if_idle()

    def _stuck(self, now: float, waited: float) -> str:
        """Why replies no longer seem to come on this connection, now that calls
        waited ``waited`` seconds for theirs in vain ("" if they still may):

        - a reply has been arriving for half as long as they waited: it stopped
          partway, or trickles in (a byte now and then would keep the time since
          the last read short, and heartbeats away);
        - without heartbeats (native thrift), nothing came since calls timed out
          before, nor for all of this wait: a peer gone without a FIN, or a server
          that answers a connection's calls one at a time (Apache's and
          thriftpy2's threaded servers) stuck on one. A single slow call is not
          that: it takes a second timeout in a row with nothing read.
        """
        quiet = now - self.last_read
        if self.frame_started is not None:
            if now - self.frame_started >= waited / 2:
                return (f"a reply from {self.node} is still incomplete after "
                        f"{now - self.frame_started:.3g}s (nothing read for {quiet:.3g}s)")
        elif not self.heartbeats and quiet >= waited and self.last_read == self._read_at_timeout:
            return f"nothing came from {self.node} for {quiet:.3g}s, calls timing out"
        return ""

    def _bound_deadlines(self) -> None:
        """Prune once the deadlines outnumber the calls waiting twice over (plus 1024).
        Checked where calls stop waiting: expect, on every call's path, adds one
        deadline and one waiting call, and that never tips the balance."""
        if len(self._deadlines) > 2 * len(self._pending) + 1024:
            self._prune_deadlines()

    def _prune_deadlines(self) -> None:
        """Drop answered calls' deadlines: the heap stays proportional to the calls in flight."""
        self._drop_given_up()
        pending = self._pending
        self._deadlines = [entry for entry in self._deadlines if entry[1] in pending]
        heapq.heapify(self._deadlines)

    def _forget_given_up(self) -> None:
        """A caller that gives up (a wait_for of its own, a hedge that lost) leaves
        its entry until a reply or its deadline: with a node that answers nothing
        and a long timeout, such entries would pile up at the rate callers give
        up. Each sweep drops them, and the next comes once the calls waiting are
        twice what this one left: the cost per call stays constant."""
        self._prune_deadlines()   # (their deadlines go too)
        self._sweep_at = max(SWEEP_AT_LEAST, 2 * len(self._pending))

    def _drop_given_up(self) -> None:
        """Forget calls whose caller gave up (cancelled) before any reply came."""
        pending = self._pending
        for seq in [seq for seq, entry in pending.items() if entry[0].done()]:
            del pending[seq]

    def forget(self, seq: int) -> None:
        """Stop waiting for the reply to ``seq`` (its waiter gave up on it); a
        retiring connection with nothing left to wait for closes."""
        self._pending.pop(seq, None)
        self._bound_deadlines()
        if self.retiring:
            self._close_if_idle()

    @property
    def in_flight(self) -> int:
        """Calls waiting for their reply."""
        self._drop_given_up()
        return len(self._pending)

    @property
    def heard_from(self) -> bool:
        """Whether the node has sent anything on this connection (see Endpoint._open)."""
        return bool(self._decoder.consumed or self._decoder.buffered)

    def frames_deferred(self) -> None:
        """Reading waits a loop pass: the client's inflate budget for this one is spent."""
        if self.transport is not None and not self.closed:
            self._deferred = True
            self.transport.pause_reading()
            self.loop.call_soon(self._read_on)

    def _read_on(self) -> None:
        """The next loop pass: the frames held back, then reading again unless held anew."""
        self._deferred = False
        if self.closed or self.transport is None:
            return
        if self._read():
            # as after a read (data_received): the frames held back were whole, and
            # what is left is a frame still arriving, or nothing -- else a later
            # timeout takes the held frames for a reply stuck partway (see _stuck)
            self.frame_started = self.last_read if self._decoder.buffered else None
        if not self._deferred and not self.closed:
            self.transport.resume_reading()

    def frames_received(self, frames: List[Frame]) -> None:
        for frame in frames:
            head = frame.head
            if head is not None:
                if head.is_request:
                    self.protocol_error(ProtocolError("the server sent a request frame"))
                    return
                seq = head.sequence_id
                if seq == CLOSE_NOTICE_SEQUENCE:
                    if not self._close_notice(frame):
                        return
                    continue
            else:
                try:
                    seq = _codec.decode_message_begin(frame.body)[2]
                except Exception as exc:  # a DecodeError: the stream cannot be trusted
                    self.protocol_error(ProtocolError(f"bad framed thrift reply: {exc}"))
                    return
            if self.owed:   # (a reply to nothing sent may come: never below 0)
                self.owed -= 1
            entry = self._pending.pop(seq, None)
            if entry is None:
                continue
            future, finish, _ = entry
            if future.done():
                continue
            if finish is None:
                future.set_result(frame)
                continue
            try:
                answer = finish(frame, self.node)
            except Exception as exc:   # the call's error (declared, remote, bad reply): the caller's
                if head is None and _request_unread(exc):
                    self._stream_in_doubt()
                future.set_exception(exc)
            else:
                future.set_result(answer)
        if len(self._deadlines) > 1024:   # (else within bounds: the one len per batch)
            self._bound_deadlines()
        if self.retiring:
            self._close_if_idle()

    def _close_notice(self, frame: Frame) -> bool:
        """The node is about to close this connection (``Server``'s close notice: it
        is stopping, or the connection is idle): no new call goes on it (one sent
        into the close would be lost unrun), the calls on it keep their answers,
        and it closes once they have them. Returns False when the notice's header
        does not decode: the connection is then dropped as for any bad header."""
        try:
            # (the C reader skips heartbeatInfo: it is first decoded here)
            beat = frame.head.full(Header).heartbeatInfo   # type: ignore[union-attr]  # (unified)
        except DecodeError as exc:
            self.protocol_error(ProtocolError(f"bad unified header: {exc}"))
            return False
        if beat is not None:
            stopping = beat.status == NodeStatus.STOPPING
            why = "is stopping" if stopping else "closes an idle connection"
            # (the reason in the message: the throttle's key, so one holds back no other)
            self._leave(_NOTICED, f"%s {why}: the connection takes no new calls", self.node)
            if stopping and self.on_stopping is not None:
                self.on_stopping()
        return True

    def _stream_in_doubt(self) -> None:
        """A native thrift server could not read a request (PROTOCOL_ERROR) and may
        have lost its place in the stream: Apache's C++ server and Java's
        TThreadedSelectorServer close the connection, Java's TThreadPoolServer
        reads the next request from inside the bad one's frame and waits for bytes
        that never come (every later call on it timed out). New calls go to a new
        connection."""
        self._leave(_LEFT, "%s could not read a request (PROTOCOL_ERROR); new calls "
                    "go to a new connection", self.node)

    def _leave(self, throttle: Throttle, message: str, *args: Any) -> None:
        """No new call goes on this connection, which closes once its calls have their
        answers or timeouts; ``message % args`` goes to ``throttle`` for the first
        reason only (a peer may repeat what makes it leave at will)."""
        if not self.retiring:
            throttle.log(message, *args, key=(self.node, message))
        self.close_when_idle()

    def close_when_idle(self) -> None:
        """Close once every call on the connection has its answer (or its timeout);
        the endpoint hands it to no new call."""
        self.retiring = True
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if not self.in_flight:
            self.close()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain_waiters()

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def drained(self, timeout: float, method: str = "") -> None:
        """Wait while the server reads nothing of what was sent; ``CallTimeout``
        (with nothing sent) if it still does not after ``timeout`` seconds."""
        deadline = self.loop.time() + timeout
        # A resume wakes every waiter; the first ones' requests may pause the
        # writes again, and then the others wait on (not all write at once).
        while self.write_paused and not self.closed:
            waiter = self.loop.create_future()
            self._drain_waiters.append(waiter)
            try:
                woken = await _waited(waiter, max(0.0, deadline - self.loop.time()))
            finally:
                if not waiter.done():   # timed out or the caller gave up: not kept till a wake-up
                    waiter.cancel()
                    with contextlib.suppress(ValueError):
                        self._drain_waiters.remove(waiter)
            if not woken:
                raise CallTimeout(f"the server did not read enough of the requests already "
                                  f"sent to take this one within {timeout:.3g}s",
                                  method=method or None, node=self.node, request_sent=False)

    def _fail_pending(self, why: str) -> None:
        """Every call still waiting fails with its own ``TransportError``."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines = []
        self._wake_drain_waiters()        # they find the connection closed
        pending, self._pending = self._pending, {}
        # (never read from, its last_read is still when it was made)
        self.dropped_unheard = not self._closed_here and not self.heard_from and (
            bool(pending) or self.loop.time() - self.last_read < DROPPED_AT_ONCE)
        self.dropped_on_calls = self.dropped_unheard and bool(pending)
        for future, _, method in pending.values():
            if not future.done():
                future.set_exception(closed_error(why, method=method or None, node=self.node))

    def close(self, why: str = "") -> None:
        """Close (see ``FramedProtocol.close``); with ``why``, the calls still waiting
        fail at once with ``TransportError(why)`` (their requests were sent), not
        with "connection closed" once it is."""
        self._closed_here = True
        if why:
            self._closed_why = why
            self._fail_pending(why)
        FramedProtocol.close(self)

    def abort(self, exc: Optional[BaseException] = None) -> None:
        super().abort(exc)
        self._fail_pending(f"connection aborted: {exc}")

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        super().connection_lost(exc)
        why = f"connection closed{': ' + str(exc) if exc else ''}"
        if self.unheard_hint and self._pending and not self.heard_from:
            why = f"{why} {self.unheard_hint}"   # the node's doing: not the client's close
        self._answer_held(why)

    def _answer_held(self, why: str) -> None:
        """(Closed.) The replies read whole that the inflate budget still holds back
        reach their calls, a batch a loop pass as before; then the calls still
        waiting fail, ``why``. (Paused reading keeps a TCP close behind them, but
        TLS reads a close that came with them at once.)"""
        if self._pending and self._decoder.more:
            self._read()     # (closed: one batch, or none while the budget is spent)
            if self._pending and self._decoder.more:
                self.loop.call_soon(self._answer_held, why)
                return
        self._fail_pending(why)


#: Calls waiting on a connection before the first sweep of those whose caller gave up.
SWEEP_AT_LEAST = 1024

#: Why calls fail once their client is closed (``ClientClosed``: not the node's doing).
CLIENT_CLOSED = "client is closed"


def closed_error(why: str, **kw: Any) -> TransportError:
    """The error of a call on a closed connection or endpoint, ``why`` it closed:
    ``ClientClosed`` when the client was closed."""
    return ClientClosed(why, **kw) if why == CLIENT_CLOSED else TransportError(why, **kw)


def _request_unread(exc: BaseException) -> bool:
    """Is ``exc`` the peer's TApplicationException PROTOCOL_ERROR (it could not read
    the request)?"""
    return (getattr(exc, "from_peer", False)
            and getattr(exc, "type", None) == TApplicationException.PROTOCOL_ERROR)


def _why(exc: OSError) -> str:
    """Why a connect failed, in the system's words ("Connection refused"): asyncio's
    own text ("Connect call failed ('127.0.0.1', 9001)") names only the address."""
    if exc.errno and (type(exc) is OSError or isinstance(exc, ConnectionError)):
        return os.strerror(exc.errno)   # (not a lookup's or TLS's: their codes are their own)
    return exc.strerror or str(exc) or type(exc).__name__


class Endpoint:
    """The connections to one node: opens them on demand, reconnects with backoff.

    After a failed connect the node is not retried before the backoff passes
    (doubling from ``backoff_min`` to ``backoff_max``); calls fail fast meanwhile
    so a cluster layer can go elsewhere.
    """

    def __init__(self, node: str, *, pool_size: int = 1, connect_timeout: float = 1.0,
                 max_frame_size: int = protocol.DEFAULT_MAX_FRAME_SIZE,
                 max_depth: int = protocol.DEFAULT_MAX_DEPTH,
                 backoff_min: float = 0.1, backoff_max: float = 2.0,
                 heartbeat_interval: Optional[float] = None,
                 ssl: Optional["_ssl.SSLContext"] = None,
                 on_stopping: Optional[Callable[[str], None]] = None,
                 unheard_hint: str = "", inflate: Optional[InflateBudget] = None) -> None:
        self.node = node
        # what a node that closes connections without a byte may mean (its
        # protocol is another: the client's own guess), told to the calls
        self.unheard_hint = unheard_hint
        self.inflate = inflate   # its connections' share of the client's inflate budget
        # on_stopping(node): the node's close notice said it is stopping
        self.on_stopping = on_stopping
        self.address: Address = parse_address(node)
        self.pool_size = max(1, pool_size)
        self.connect_timeout = connect_timeout
        self.max_frame_size = max_frame_size
        self.max_depth = max_depth     # of the messages its connections read and write
        self._conns: List[Optional[ClientConnection]] = [None] * self.pool_size
        self._connecting: Dict[int, asyncio.Future] = {}
        self._next = 0
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._backoff = 0.0
        self._retry_at = 0.0
        self._backoff_why = ""   # why _retry_at was set (see _connect_failed)
        self._unheard = 0   # connections in a row dropped unheard (ClientConnection.dropped_unheard)
        # connections taken out of the pool that close once idle (a stalled reply)
        self._retiring: "weakref.WeakSet[ClientConnection]" = weakref.WeakSet()
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_task: Optional[asyncio.Task] = None
        self.ssl = ssl
        self.closed = False
        self._retired = False
        self._closed_why = CLIENT_CLOSED

    def ready(self) -> Optional[ClientConnection]:
        """The pool's connection for the next call without waiting, or None (then
        ``connection()``): see ``_pick``."""
        if self.pool_size == 1:   # (most clients: no choice to make)
            conn = self._conns[0]
            return conn if conn is not None and not conn.closed and not conn.retiring else None
        slot, conn = self._pick()
        if conn is not None:   # (None: connection() takes the turn, picking again)
            self._next = (slot + 1) % self.pool_size
        return conn

    async def connection(self, timeout: Optional[float] = None) -> ClientConnection:
        """A live connection to the node (see ``_pick``), opened if need be.

        ``timeout`` (a call's time left) bounds how long this caller waits for a
        connect, which itself goes on, up to ``connect_timeout``, for the callers
        after it: ``CallTimeout``, with nothing sent, when it is up first.
        """
        slot, conn = self._pick()
        self._next = (slot + 1) % self.pool_size
        if conn is not None:
            return conn
        return await self._open(slot, timeout)

    def _pick(self) -> Tuple[int, Optional[ClientConnection]]:
        """The pool's slot for the next call, and its live connection (None: a slot
        to open): the live connection owing the fewest replies, ties in turn,
        unless every live one owes some and a slot has none to open. A server that
        answers a connection's calls one at a time (thriftpy2's, Apache's
        threaded servers) runs a call sent behind a slow one, or behind one its
        caller gave up on, only once that one is done. The turn moves on where a
        call takes the slot: ``ready()`` that finds none to take leaves it to
        ``connection()`` (moved twice, calls made before the pool connects would
        share half its slots: one of two)."""
        conns, size = self._conns, self.pool_size
        best: Optional[ClientConnection] = None
        best_slot = to_open = -1
        for turn in range(self._next, self._next + size):
            slot = turn % size
            conn = conns[slot]
            if conn is None or conn.closed or conn.retiring:
                if to_open < 0:
                    to_open = slot
            elif best is None or conn.owed < best.owed:
                best, best_slot = conn, slot
                if not conn.owed:
                    break
        if best is None or (best.owed and to_open >= 0):
            best, best_slot = None, to_open
        return best_slot, best

    async def _open(self, slot: int, timeout: Optional[float]) -> ClientConnection:
        if self.closed:
            raise self._closed_error()
        attempt = self._connecting.get(slot)
        if attempt is None:
            gone = self._conns[slot]
            if gone is not None:
                self._conns[slot] = None
                if not gone.closed:    # retiring: closed by its last call, or by close()
                    self._retiring.add(gone)
                if not gone.dropped_unheard:
                    self._backoff, self._unheard = 0.0, 0
                else:
                    # It closed with not a byte from the node (on calls waiting for
                    # replies, or at once). Once (it refused an oversized request, say),
                    # redial; again and again (it accepts and drops), as a failed
                    # connect: not a new connection per call.
                    self._unheard += 1
                    if self._unheard > 1:
                        self._connect_failed(f"the node closed the last {self._unheard} "
                                             "connections without answering"
                                             + self._unheard_hint(gone))
            now = time.monotonic()
            if now < self._retry_at:
                raise TransportError(f"{self._backoff_why}; retrying in "
                                     f"{self._retry_at - now:.2f}s", node=self.node,
                                     request_sent=False)
            # The connect runs as its own task: a caller that gives up (cancelled,
            # timed out) neither aborts it for the others nor counts as a failure.
            attempt = asyncio.get_running_loop().create_task(self._connect_slot(slot))
            # its outcome is seen even when every caller gave up waiting for it
            attempt.add_done_callback(outcome_seen)
            self._connecting[slot] = attempt
        try:
            # (wait, not wait_for: see _waited)
            if await _waited(attempt, timeout):
                return attempt.result()
        except TransportError as failed:
            # each waiter its own error, not one shared by all: each caller names its
            # own method in it
            if self.closed:
                raise self._closed_error() from None
            raise own_copy(failed) from failed.__cause__
        except asyncio.CancelledError:
            # close() cancelled a connect before it began (so before _connect_slot
            # could say so): its waiters fail as closed -- unless this caller was
            # itself cancelled meanwhile, which stays a cancellation
            if attempt.cancelled() and self.closed and not _cancelling(asyncio.current_task()):
                raise self._closed_error() from None
            raise
        # (the attempt turns its own timeout into TransportError)
        raise CallTimeout(f"not connected within the call's {timeout:.3g}s left; the "
                          "request was not sent", node=self.node, request_sent=False)

    def _unheard_hint(self, gone: ClientConnection) -> str:
        """``unheard_hint`` for the backoff's message, when ``gone`` closed unheard
        on calls sent to the node: a server that closes every connection at once
        (at its max_connections, or refusing the peer) has read no request, so it
        says nothing of the protocol."""
        return f" {self.unheard_hint}" if self.unheard_hint and gone.dropped_on_calls else ""

    def _closed_error(self) -> TransportError:
        return closed_error(self._closed_why, node=self.node, request_sent=False)

    async def _connect_slot(self, slot: int) -> ClientConnection:
        loop = asyncio.get_running_loop()
        try:
            conn = await self._connect(loop)
        except asyncio.CancelledError:
            if not self.closed:
                raise
            raise self._closed_error() from None   # close() cancelled it: no backoff
        except TransportError:
            # The pool's other slots, dialling at the same moment, may have failed
            # first: one outage is one failure in a row, not one per slot (a node
            # down for a moment must not be kept away 2**pool_size times as long).
            if time.monotonic() >= self._retry_at:
                self._connect_failed()
            raise
        finally:
            del self._connecting[slot]
        if self.closed and not self._retired:
            conn.close()
            raise self._closed_error()
        # (the backoff goes back to nothing once a connection ends otherwise than dropped unheard)
        self._conns[slot] = conn
        if self._retired:
            # The node left while this connect was under way: the calls waiting for it
            # go out on it (the node still serves while it unregisters), then it closes.
            loop.call_later(RETIRED_CONNECT_GRACE, conn.close_when_idle)
        elif self._heartbeat_interval and self._heartbeat_task is None:
            self._heartbeat_task = loop.create_task(self._heartbeats())
        return conn

    def _connect_failed(self, why: str = "connect failed recently") -> None:
        """No redial before a backoff that doubles with each failure in a row;
        ``why`` is what the calls refused meanwhile are told."""
        self._backoff = min(self._backoff_max, max(self._backoff_min, self._backoff * 2))
        self._retry_at = time.monotonic() + self._backoff * random.uniform(0.8, 1.2)
        self._backoff_why = why

    def _stopping(self) -> None:
        if self.on_stopping is not None:
            self.on_stopping(self.node)

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> ClientConnection:
        def factory() -> ClientConnection:
            return ClientConnection(self.node, self.max_frame_size, self.max_depth,
                                    heartbeats=bool(self._heartbeat_interval),
                                    on_stopping=self._stopping,
                                    unheard_hint=self.unheard_hint, inflate=self.inflate)

        if self.address.path is not None:
            opening = loop.create_unix_connection(
                factory, self.address.path, ssl=self.ssl,
                server_hostname="localhost" if self.ssl else None)
        else:
            assert self.address.port is not None   # parse_address: no path, a port
            opening = connect(functools.partial(loop.create_connection, factory),
                              self.address.host, self.address.port, ssl=self.ssl,
                              server_hostname=self.address.host if self.ssl else None)
        try:
            _, conn = await asyncio.wait_for(opening, self.connect_timeout)
        except asyncio.TimeoutError:
            raise TransportError(f"connect timed out after {self.connect_timeout:.3g}s",
                                 node=self.node, request_sent=False) from None
        except OSError as exc:
            raise TransportError(f"cannot connect: {_why(exc)}", node=self.node,
                                 request_sent=False) from None
        return conn

    @property
    def connected(self) -> bool:
        """Whether any of the node's connections is open."""
        return any(c is not None and not c.closed for c in self._conns)

    @property
    def in_flight(self) -> int:
        """Calls waiting for their reply on all the node's connections, retiring ones too."""
        return sum(c.in_flight for c in [*self._conns, *self._retiring] if c is not None)

    async def _heartbeats(self) -> None:
        """Send a NormalHeartbeat on connections the node has sent nothing on for a
        heartbeat interval. Only reads count: requests written to a node that is
        gone (a dropped route, a peer that stopped without a FIN) are no sign of
        life, and a caller calling more often than the interval must not keep
        the check away from the very connection that needs it."""
        interval = self._heartbeat_interval
        assert interval is not None   # started only with a heartbeat interval
        while not self.closed:
            await asyncio.sleep(interval)
            for conn in self._conns:
                if conn is None or conn.closed or conn.loop.time() - conn.last_read < interval:
                    continue
                seq = conn.next_sequence()
                header = protocol.request_header(
                    "", seq, int(interval * 1000), message_type=MessageType.NORMAL_HEARTBEAT)
                reply = conn.expect(seq)
                conn.send(protocol.encode_unified(header, b""))
                try:
                    await asyncio.wait_for(reply, interval)
                except asyncio.CancelledError:
                    conn.forget(seq)        # (a retired connection waits for no heartbeat)
                    raise
                except (asyncio.TimeoutError, TransportError):
                    conn.forget(seq)
                    if self.closed:   # the reply failed as the client closed: not the node's doing
                        return
                    log.warning("heartbeat to %s unanswered; closing the connection", self.node)
                    conn.abort(TransportError("heartbeat timed out", node=self.node))

    def close(self) -> None:
        """The client is closed: close the connections; connects under way are
        cancelled. Every call waiting fails at once with ``TransportError("client is
        closed")``, those waiting for a connect with ``request_sent`` False."""
        self._closed_why = CLIENT_CLOSED   # (a retired node's too: the client closed)
        self._end()
        for attempt in self._connecting.values():
            attempt.cancel()
        for conn in [*self._conns, *self._retiring]:
            if conn is not None:
                conn.close(self._closed_why)

    def retire(self) -> None:
        """The node left the cluster: no new connects; each connection closes once
        the calls already on it are answered (or time out), and a connect under
        way serves the calls waiting for it first."""
        self._closed_why = "the node left the cluster"
        self._retired = True
        self._end()
        for conn in self._conns:
            if conn is not None:
                conn.close_when_idle()

    def _end(self) -> None:
        self.closed = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()

    @property
    def finished(self) -> bool:
        """Closed, with no connection open and no connect under way."""
        return self.closed and not self._connecting and not any(
            conn is not None and not conn.closed for conn in self._conns)


async def _waited(future: "asyncio.Future[Any]", timeout: Optional[float]) -> bool:
    """Wait up to ``timeout`` seconds (None: no limit) for ``future``, which is
    neither cancelled nor read here; returns whether it is done. Not
    ``asyncio.wait_for``: before Python 3.12 it returns an outcome that came in
    the loop pass its caller was cancelled in, and the cancel is lost (the call
    goes on, an ``asyncio.timeout`` around it never fires)."""
    done, _ = await asyncio.wait((future,), timeout=timeout)
    return bool(done)


def _cancelling(task: Optional[asyncio.Task]) -> bool:
    """Was ``task`` asked to cancel? (``Task.cancelling``, Python 3.11+; on 3.10
    a cancellation that meets a close is taken for the close.)"""
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling and cancelling())
