"""Middleware: the application's own code around every call a server handles or a client makes.

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

On a client (``AsyncClient(..., middleware=[...])``, ``Client`` alike) the same
function gets, once per IDL method, ``service`` the client's ``service_name``
and ``call`` a coroutine function making the call: ``await call(*args,
**kwargs)`` takes the IDL arguments as the caller gave them and returns the
answer, or raises what the caller would get. What a middleware returns must be
a coroutine function too (on a blocking ``Client`` it runs on the client's I/O
thread). Around ``call`` it may log, time, set ``octo_core.context.use(...)``
for the request's ``globalContext``, translate errors, or answer without
calling at all; the call's own timeout (``call(name, ..., timeout=)``) still
applies, inside. A closed client refuses a call before its middleware runs; one
already inside when ``close(grace=)`` begins is in flight, and goes on within
the grace.

The first middleware of the list is the outermost. They are applied when a
service is added (a client made), so a call pays only for what they do; none,
nothing.
"""
from __future__ import annotations

import collections.abc
import inspect
from typing import Any, Callable, Iterable, Tuple

#: ``middleware(service, method, call) -> call``.
Middleware = Callable[[str, str, Callable[..., Any]], Callable[..., Any]]


def is_coroutine_function(fn: Callable[..., Any]) -> bool:
    """Does calling ``fn`` give a coroutine? (async functions, partials of them, and
    objects with an async ``__call__``; the server runs any other on a business thread.)"""
    return (inspect.iscoroutinefunction(fn)
            or inspect.iscoroutinefunction(getattr(fn, "__call__", None)))


def layers(middleware: Iterable[Middleware]) -> Tuple[Middleware, ...]:
    """The ``middleware=`` a server or client was given, read once (an iterator
    too); ``TypeError`` unless a list of functions."""
    listed = isinstance(middleware, collections.abc.Iterable) and not callable(middleware)
    kept = tuple(middleware) if listed else ()
    if not listed or not all(callable(layer) for layer in kept):
        raise TypeError(f"middleware is a list of functions, not {middleware!r}")
    return kept


def wrapped(middleware: Iterable[Middleware], service: str, method: str,
            call: Callable[..., Any], what: str = "handler") -> Callable[..., Any]:
    """``call`` inside ``middleware`` (the first outermost); a middleware that changes
    its kind (coroutine function or plain) is a ``TypeError`` naming it and
    ``what`` ``call`` runs."""
    for layer in reversed(tuple(middleware)):
        outer = layer(service, method, call)
        if not callable(outer) or is_coroutine_function(outer) != is_coroutine_function(call):
            kind = "a coroutine function" if is_coroutine_function(call) else "a plain function"
            raise TypeError(f"middleware {layer!r} gave {outer!r} for {service}.{method}, whose "
                            f"{what} is {kind}: it must give {kind} too")
        call = outer
    return call
