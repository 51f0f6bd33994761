"""What travels with a call: OCTO's ``globalContext`` and the trace it belongs to.

A server sets both from the incoming header before it runs a handler, and every
client call made inside that handler sends them on: swimlane and LiteSet tags
stay on their lane across hops, and the handler's calls are child spans of the
same trace. Callers at the edge set tags with ``use()``; a new trace starts
wherever there is none. ``add_span_hook`` lets a tracing system (OpenTelemetry,
say) observe every span. In a handler, ``caller()`` tells who sent the call
and when it stops waiting for the answer; the handler's own calls end by then
too (their timeouts shrink to the time left), unless made ``detached()``.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import time
from typing import (Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Protocol,
                    Tuple, Union)

from octo_core import _codec
from octo_core.throttle import Throttle

log = logging.getLogger("octo_core.context")
#: Span hooks that raise: one may fail on every call, and on what a peer sent (a
#: trace id that is not hex), so each kind of failure is logged once a period.
_HOOK_FAILED = Throttle(10.0, log, logging.ERROR)


class Span(NamedTuple):
    """One hop of a trace (``TraceInfo.traceId`` / ``spanId``)."""
    trace_id: str
    span_id: str
    parent_id: Optional[str] = None


#: ``_new_span(fields)`` is ``Span(*fields)`` without the Python-level ``__new__``
#: NamedTuple generates, and without a frame of its own: a per-call cost on both sides.
_new_span: Callable[[tuple], Span] = functools.partial(tuple.__new__, Span)

#: What a call carries: the globalContext and the span (none yet: no trace).
Carried = Tuple[Mapping[str, str], Optional[Span]]
_NOTHING: Carried = ({}, None)

class Caller(NamedTuple):
    """Who sent the call being handled (``caller()``)."""
    #: The unified header's ``clientAppkey``; "" when none was sent (native thrift).
    appkey: str
    #: The peer's ``"ip:port"`` ("" on a unix socket).
    address: str
    #: The ``time.monotonic()`` at which the caller stops waiting: the request's
    #: arrival plus the timeout its header gave; None when it gave none (native thrift).
    deadline: Optional[float]

    def time_left(self) -> Optional[float]:
        """Seconds until ``deadline`` (below 0 once it passed); None without one."""
        return None if self.deadline is None else self.deadline - time.monotonic()


class _Incoming(Protocol):
    """A request a server is handling (its ``_Call``): what it carries, who sent it,
    and the ``time.monotonic()`` its caller stops waiting at (None: never)."""

    deadline: Optional[float]

    def carried(self) -> Carried: ...

    def caller(self) -> Caller: ...


class _Within:
    """``use()`` inside a handler: its own globalContext and span, the handler's caller."""

    __slots__ = ("_carried", "_incoming")

    def __init__(self, carried: Carried, incoming: _Incoming) -> None:
        self._carried, self._incoming = carried, incoming

    def carried(self) -> Carried:
        return self._carried

    def caller(self) -> Caller:
        return self._incoming.caller()

    @property
    def deadline(self) -> Optional[float]:
        return self._incoming.deadline


#: What the current call carries: a ``Carried`` pair (``use()``, or nothing), or,
#: in a handler, the request being handled, whose header is read only when asked
#: (most handlers never ask: a Span fewer per call).
_CARRIED: contextvars.ContextVar[Union[Carried, _Incoming]] = contextvars.ContextVar(
    "octo_carried", default=_NOTHING)


def _carried() -> Carried:
    """The current globalContext and span."""
    value = _CARRIED.get()
    if type(value) is tuple:
        return value
    return value.carried()   # type: ignore[union-attr]  # (the only other kind)


def caller() -> Optional[Caller]:
    """Who sent the call being handled: its appkey, address and deadline.

    In a handler, and in what it runs (its tasks, its callbacks); None elsewhere.
    The handler's own calls end by the deadline too: each one's timeout is cut
    to the time left, and one made after the deadline fails at once with
    ``CallTimeout``, unsent (a server answers a handler that lets it through
    with status 4, as a call past its deadline). A call cut to less than half
    its own timeout that times out says nothing of its node: no breaker counts
    it (callers short of time would open breakers on healthy nodes). Work meant
    to outlive the call (a background task it starts) is started ``detached()``.
    """
    value = _CARRIED.get()
    return None if type(value) is tuple else value.caller()   # type: ignore[union-attr]


# hook(side, service, method, span) -> None or a function called with the OCTO status at the end
SpanHook = Callable[[str, str, str, Span], Optional[Callable[[int], None]]]
_HOOKS: List[SpanHook] = []


def global_context() -> Mapping[str, str]:
    """The ``globalContext`` outbound calls will carry (read-only)."""
    return _carried()[0]


def current_span() -> Optional[Span]:
    """The span of the call being handled, if any."""
    return _carried()[1]


def child_span() -> Span:
    """A span for an outbound call: in the current trace, or the first of a new one."""
    return _child_of(_carried()[1])


def _child_of(parent: Optional[Span]) -> Span:
    """A span for an outbound call made under ``parent`` (None: a new trace)."""
    if parent is None:
        return _new_span((_codec.new_id(), _codec.new_id(), None))
    return _new_span((parent.trace_id, _codec.new_id(), parent.span_id))


@contextlib.contextmanager
def use(values: Optional[Mapping[str, str]] = None, **more: str) -> Iterator[Dict[str, str]]:
    """Add entries to the ``globalContext`` for the calls made inside the block.

    ``with octo_core.context.use({"octo.swimlane": "lane-a"}): await client.echo("x")``
    """
    value = _CARRIED.get()
    tags, span = _carried()
    merged = {**tags, **(values or {}), **more}
    token = _CARRIED.set((merged, span) if type(value) is tuple
                         else _Within((merged, span), value))  # type: ignore[arg-type]
    try:
        yield merged
    finally:
        _CARRIED.reset(token)


@contextlib.contextmanager
def detached() -> Iterator[None]:
    """Inside the block, and in the tasks started inside it, calls are no longer
    bound by the deadline of the call being handled (``caller()`` is None there);
    they keep its ``globalContext`` and trace. For work that outlives the call::

        with octo_core.context.detached():
            asyncio.create_task(refresh_cache())
    """
    token = _CARRIED.set(_carried())
    try:
        yield
    finally:
        _CARRIED.reset(token)


def add_span_hook(hook: SpanHook) -> Callable[[], None]:
    """Call ``hook`` at the start of every span (both sides); returns its remover.

    ``hook(side, service, method, span)``: ``side`` is ``"client"`` or ``"server"``,
    ``span`` a ``Span``. It may return a function, called with the call's OCTO
    status (``errors.Status``) when the span ends: a declared exception is
    ``SUCCESS``, as on the wire. Both run on the event loop of the call (a
    ``Client``'s I/O thread, a ``Server``'s loop): keep them short; one that
    raises is logged (each kind of failure once every 10 s, with a count of
    those held back) and skipped. Client and server share a span (its
    ``span_id``); the wire carries no parent, so a server's ``parent_id`` is
    None (the client's span has it). A call that came with no trace (native
    thrift carries none) begins one at the server: its server span is the root
    of a new trace, and the calls its handler makes are its children.
    """
    _HOOKS.append(hook)
    return lambda: _HOOKS.remove(hook)


def _span_started(side: str, service: str, method: str, span: Span) -> List[Callable[[int], None]]:
    """Tell the hooks a span began; returns the callbacks to give its status at the end.

    A hook that raises is logged and skipped: tracing must never break a call.
    Callers check ``_HOOKS`` first: with none (the usual case) a call makes no
    frame here.
    """
    ends = []
    for hook in list(_HOOKS):
        try:
            end = hook(side, service, method, span)
        except Exception as exc:
            _hook_failed(hook, "start", service, method, exc)
            continue
        if end is not None:
            ends.append(_guarded(hook, end, service, method))
    return ends


def _guarded(hook: SpanHook, end: Callable[[int], None], service: str,
             method: str) -> Callable[[int], None]:
    def finish(status: int) -> None:
        try:
            end(status)
        except Exception as exc:
            _hook_failed(hook, "end", service, method, exc)
    return finish


def _hook_failed(hook: SpanHook, where: str, service: str, method: str,
                 exc: Exception) -> None:
    """Log that ``hook`` raised ``exc`` at the ``where`` of a span (throttled)."""
    _HOOK_FAILED.log("span hook %r failed at the %s of %s.%s: %r", hook, where, service, method,
                     exc, key=(hook, where, service, method, type(exc)), exc_info=exc)


def _handler_context(incoming: _Incoming) -> contextvars.Context:
    """Server side: a copy of the current context holding the request being
    handled (what its caller sent, and who that is), for a handler to run in."""
    context = contextvars.copy_context()
    context.run(_CARRIED.set, incoming)
    return context
