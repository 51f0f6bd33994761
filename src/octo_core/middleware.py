"""Server middleware: the application's own code around every call it handles.

A middleware is a function ``middleware(service, method, call) -> call``: given,
once per method of each service added, the function that runs the handler's
method, it returns the function the server runs instead -- most often one that
does something before and after calling ``call`` (Kitex's middleware, Dubbo's
filters, gRPC's interceptors)::

    def timed(service, method, call):
        if octo_core.middleware.is_coroutine_function(call):
            async def run(*args):
                started = time.monotonic()
                try:
                    return await call(*args)
                finally:
                    log.info("%s.%s took %.3fs", service, method, time.monotonic() - started)
        else:
            def run(*args):
                ...
        return run

    server = octo_core.Server(appkey, middleware=[timed])

``service`` is the name the service was added under, ``method`` the IDL
method's; ``call(*args)`` takes the IDL arguments by position. For a coroutine
handler ``call`` is a coroutine function; for a plain one, a plain function
(run on a business thread, or on the loop with ``inline=True``): what a
middleware returns must be of the same kind. Inside, ``octo_core.context``
tells who called (``caller()``) and what the call carries
(``global_context()``). What it raises is answered as the handler's own
exception would be: a declared one in the result, any other with status 1.

The first middleware of the list is the outermost. They are applied when a
service is added, so a call pays only for what they do; none, nothing.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

#: ``middleware(service, method, call) -> call``.
Middleware = Callable[[str, str, Callable[..., Any]], Callable[..., Any]]


def is_coroutine_function(fn: Callable[..., Any]) -> bool:
    """Does calling ``fn`` give a coroutine? (async functions, partials of them, and
    objects with an async ``__call__``; the server runs any other on a business thread.)"""
    return (inspect.iscoroutinefunction(fn)
            or inspect.iscoroutinefunction(getattr(fn, "__call__", None)))


def wrapped(middleware: Sequence[Middleware], service: str, method: str,
            call: Callable[..., Any]) -> Callable[..., Any]:
    """``call`` inside ``middleware`` (the first outermost); a middleware that changes
    its kind (coroutine function or plain) is a ``TypeError`` naming it."""
    for layer in reversed(middleware):
        outer = layer(service, method, call)
        if not callable(outer) or is_coroutine_function(outer) != is_coroutine_function(call):
            kind = "a coroutine function" if is_coroutine_function(call) else "a plain function"
            raise TypeError(f"middleware {layer!r} gave {outer!r} for {service}.{method}, whose "
                            f"handler is {kind}: it must give {kind} too")
        call = outer
    return call
