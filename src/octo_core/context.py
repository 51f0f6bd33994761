"""The call context that travels with a request: OCTO's ``globalContext``.

A server sets it from the incoming header before it runs a handler, and every
client call made inside that handler sends it on, so swimlane and LiteSet tags
stay on their lane across hops. Callers at the edge set it with ``use()``.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Dict, Iterator, Mapping, Optional

_GLOBAL: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "octo_global_context", default={})


def global_context() -> Mapping[str, str]:
    """The ``globalContext`` outbound calls will carry (read-only)."""
    return _GLOBAL.get()


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


def _enter(values: Optional[Mapping[str, str]]) -> None:
    """Server side: the handler about to run inherits the caller's context."""
    _GLOBAL.set(values or {})
