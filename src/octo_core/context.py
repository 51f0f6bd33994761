"""What travels with a call: OCTO's ``globalContext`` and the trace it belongs to.

A server sets both from the incoming header before it runs a handler, and every
client call made inside that handler sends them on: swimlane and LiteSet tags
stay on their lane across hops, and the handler's calls are child spans of the
same trace. Callers at the edge set tags with ``use()``; a new trace starts
wherever there is none. ``add_span_hook`` lets a tracing system (OpenTelemetry,
say) observe every span.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional

from octo_core import _codec

log = logging.getLogger("octo_core.context")

_GLOBAL: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "octo_global_context", default={})
_SPAN: contextvars.ContextVar[Optional["Span"]] = contextvars.ContextVar("octo_span", default=None)


class Span(NamedTuple):
    """One hop of a trace (``TraceInfo.traceId`` / ``spanId``)."""
    trace_id: str
    span_id: str
    parent_id: Optional[str] = None


#: ``_new_span(fields)`` is ``Span(*fields)`` without the Python-level ``__new__``
#: NamedTuple generates, and without a frame of its own: a per-call cost on both sides.
_new_span: Callable[[tuple], Span] = functools.partial(tuple.__new__, Span)


# hook(side, service, method, span) -> None or a function called with the OCTO status at the end
SpanHook = Callable[[str, str, str, Span], Optional[Callable[[int], None]]]
_HOOKS: List[SpanHook] = []


def global_context() -> Mapping[str, str]:
    """The ``globalContext`` outbound calls will carry (read-only)."""
    return _GLOBAL.get()


def current_span() -> Optional[Span]:
    """The span of the call being handled, if any."""
    return _SPAN.get()


def child_span() -> Span:
    """A span for an outbound call: in the current trace, or the first of a new one."""
    parent = _SPAN.get()
    if parent is None:
        return _new_span((_codec.new_id(), _codec.new_id(), None))
    return _new_span((parent.trace_id, _codec.new_id(), parent.span_id))


@contextlib.contextmanager
def use(values: Optional[Mapping[str, str]] = None, **more: str) -> Iterator[Dict[str, str]]:
    """Add entries to the ``globalContext`` for the calls made inside the block.

    ``with octo_core.context.use({"octo.swimlane": "lane-a"}): await client.echo("x")``
    """
    merged = {**_GLOBAL.get(), **(values or {}), **more}
    token = _GLOBAL.set(merged)
    try:
        yield merged
    finally:
        _GLOBAL.reset(token)


def add_span_hook(hook: SpanHook) -> Callable[[], None]:
    """Call ``hook`` at the start of every span (both sides); returns its remover."""
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
        except Exception:
            log.exception("span hook %r failed at the start of %s.%s", hook, service, method)
            continue
        if end is not None:
            ends.append(_guarded(end, service, method))
    return ends


def _guarded(end: Callable[[int], None], service: str, method: str) -> Callable[[int], None]:
    def finish(status: int) -> None:
        try:
            end(status)
        except Exception:
            log.exception("span hook failed at the end of %s.%s", service, method)
    return finish


def _handler_context(values: Optional[Mapping[str, str]],
                     span: Optional[Span]) -> contextvars.Context:
    """Server side: a copy of the current context holding the caller's
    ``globalContext`` and trace, for a handler to run in. A variable that holds
    what it must already (no globalContext sent, and an empty one here, which the
    handler then reads, read-only as ever) is not set again: a set makes a new
    mapping and a token (every call's path)."""
    context = contextvars.copy_context()
    if values or _GLOBAL.get():
        context.run(_GLOBAL.set, values or {})
    if span is not None or _SPAN.get() is not None:
        context.run(_SPAN.set, span)
    return context
