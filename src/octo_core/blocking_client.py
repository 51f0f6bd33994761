"""``Client``: the blocking client, an ``AsyncClient`` run on an event-loop thread of its own.

Every call mode of a blocking program: ``c.echo("hi")`` waits for the answer,
``c.future.echo("hi")`` returns a ``concurrent.futures.Future``,
``c.callback.echo("hi", callback=fn)`` calls ``fn`` with the outcome. The calls
themselves are the ``AsyncClient``'s (``client.py``), handed to its I/O thread.
"""
from __future__ import annotations

import asyncio
import collections.abc
import concurrent.futures
import functools
import operator
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Dict, List, NoReturn, Optional, Tuple

from octo_core import idl
from octo_core.afterfork import tell_forked_children
from octo_core.checks import finite_number
from octo_core.client import (_MADE_FOR_CLIENT, _SHARED_ATTRIBUTES, AsyncClient, _binds,
                              _closed_error, _not_picklable, _warn_if_milliseconds)
from octo_core.errors import CallTimeout, ClientClosed, TransportError
from octo_core.metrics import Metrics
from octo_core.transport.loop import SERVING_LOOPS, LoopThread


#: How ``Client`` wraps one IDL method (with a by-name call's ``timeout``) for a call mode.
_Wrap = Callable[[idl.Method, Optional[float]], Callable[..., Any]]


class _Mode:
    """``client.future`` / ``client.callback``: the same methods, another way to wait.

    ``call(name, *args, **kwargs)`` reaches any method by name (``call`` itself
    included), ``timeout`` as in ``AsyncClient.call``.
    """

    if TYPE_CHECKING:
        def __getattr__(self, name: str) -> Any:
            """The IDL methods, attributes made at run time: to a type checker, Any."""

    def __init__(self, client: "Client", wrap: _Wrap) -> None:
        self._by_name = client._async._by_name
        self._wrap = wrap
        for name, method in client._async._methods.items():
            if _binds(self, name):
                setattr(self, name, wrap(method, None))

    def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        method, timeout = self._by_name(name, kwargs)
        return self._wrap(method, timeout)(*args, **kwargs)


class Client:
    """A blocking client; the I/O runs on its own event-loop thread. Thread-safe.

    Takes the same arguments as ``AsyncClient``, and shows its public attributes
    (``timeout``, ``metrics``, ...), read-only. ``c.echo("hi")`` waits for the
    answer; ``c.future.echo("hi")`` returns a ``concurrent.futures.Future``;
    ``c.callback.echo("hi", callback=fn)`` calls ``fn(result_or_exception)``.
    Oneway methods return once the request is written. A method whose name the
    clients use themselves (``RESERVED_NAMES``: ``close``, ``future``, ...) is
    called by name: ``c.call("close")``, ``c.future.call("close")``. The methods pass every
    argument to the IDL method as given; in callback mode the keyword
    ``callback`` is the callback, so an IDL argument called ``callback`` is
    passed by position there.

    Callbacks (and the futures' done-callbacks) run on the client's I/O thread:
    keep them short. They may start calls in future or callback mode, and may
    ``close()`` the client (it then closes without waiting), but a blocking call
    there raises ``TransportError`` at once: it would wait for the very thread
    it blocks. So does one on an octo_core ``Server``'s event loop (in a
    coroutine handler), which it would stop meanwhile. A blocking call waits at
    most its timeout plus a margin (``CallTimeout`` if the I/O thread is stuck).
    Once closed, every call -- one still connecting, waiting for its reply or
    racing ``close()`` too -- fails with ``ClientClosed``, a ``TransportError``
    ("client is closed"; ``request_sent`` True if its request may have gone
    out), under every ``cluster`` policy, failsafe too. A call the closed
    client refuses raises it at the call site, in every mode (as
    ``Executor.submit`` after ``shutdown()``): a callback-mode call then calls
    no callback. Every call that returned its future has its callback called
    exactly once.

    A client made before ``os.fork()`` works in the child (``multiprocessing``'s
    fork workers, a pre-forking server's): the child's first call opens the
    child's own I/O thread and connections from the same arguments, leaving the
    parent's alone. A ``registry`` given as an object goes across as it is (give
    a URL and the child opens its own session).
    """

    if TYPE_CHECKING:   # read-only properties, made below from _SHARED_ATTRIBUTES
        service: Any
        service_name: str
        appkey: str
        remote_appkey: str
        timeout: float
        unified: bool
        metrics: Metrics

        def __getattr__(self, name: str) -> Any:
            """The IDL methods, attributes made at run time: to a type checker, Any."""

    def __init__(self, service: Any, **options: Any) -> None:
        self._service, self._options = service, _kept(options)
        _warn_if_milliseconds(options)   # (here: the AsyncClient is made on the I/O thread)
        self._closed = False
        self._closing = threading.Lock()   # taken by the first close(), never let go
        self._inherited = False   # a forked child's copy, until its first call reopens it
        # Re-entrant: a signal handler's close() or call must not wait for the very
        # thread it interrupted (nor may close(): see there).
        self._reopening = threading.RLock()
        self._open()
        self.future = _Mode(self, self._submitter)
        self.callback = _Mode(self, self._with_callback)
        for name, method in self._async._methods.items():
            if _binds(self, name):
                setattr(self, name, self._blocking(method))
        tell_forked_children(self)

    def _open(self) -> None:
        """Start the I/O thread and make the ``AsyncClient`` that runs on it."""
        self._thread = LoopThread(_IO_THREAD, stopped_error=_cut_short)
        try:
            self._async = self._thread.run(_make_async(self._service, self._options))
        except BaseException:   # a bad option: no thread (nor its loop's fds) left behind
            self._thread.stop()
            raise
        # Collected unclosed: its thread, loop and connections would outlive it.
        self._collected = weakref.finalize(self, _close_collected, self._thread, self._async)
        self._collected.atexit = False   # at exit the daemon thread just ends

    def _inherited_by_fork(self) -> None:
        """In a child of ``os.fork()``: no thread runs the inherited loop, and its
        connections are the parent's (the child's copies of their sockets close
        now: see ``FramedProtocol``). Loop and connections are kept, never run
        nor torn down, for the life of the child; the first call opens its own."""
        self._collected.detach()
        _LEFT_BY_FORK.append((self._thread, self._async))
        self._inherited = True
        # locks held at the fork would never be let go
        self._closing, self._reopening = threading.Lock(), threading.RLock()

    def _reopen(self, method: idl.Method) -> None:
        """A call's slow path: refuse it on a closed client; in a forked child,
        open the child's own thread and connections (once, whichever thread asks first)."""
        with self._reopening:
            if self._inherited and not self._closed:
                self._open()
                self._inherited = False
        if self._closed:
            raise _closed_error(method.name)

    def __reduce__(self) -> NoReturn:
        raise _not_picklable(self)

    def timeout_of(self, name: str) -> float:
        """As ``AsyncClient.timeout_of``."""
        return self._async.timeout_of(name)

    def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call IDL method ``name`` and wait; ``timeout`` as in ``AsyncClient.call``."""
        method, timeout = self._async._by_name(name, kwargs)
        return self._blocking(method, timeout)(*args, **kwargs)

    def _maker(self, method: idl.Method, args: tuple, kwargs: dict,
               timeout: Optional[float]) -> Callable[[], Coroutine[Any, Any, Any]]:
        """What makes one call of ``method``'s coroutine on the I/O thread (made there,
        none is left "never awaited" by a caller interrupted while handing it over).
        A closed client refuses the call; a forked child's opens its own thread first."""
        if self._closed or self._inherited:
            self._reopen(method)
        # the client's own _begin (its middleware, then _call), not call(): every
        # argument is the IDL method's
        return functools.partial(self._async._begin, method, args, kwargs, timeout)

    def _submitter(self, method: idl.Method,
                   timeout: Optional[float] = None) -> Callable[..., concurrent.futures.Future]:
        def submit(*args: Any, **kwargs: Any) -> concurrent.futures.Future:
            make = self._maker(method, args, kwargs, timeout)
            future = self._thread.submit(make)   # (the thread _maker may have reopened)
            _KEPT_ALIVE[future] = self
            future.add_done_callback(_KEPT_ALIVE.pop)
            return future
        submit.__name__ = method.name
        return submit

    def _blocking(self, method: idl.Method,
                  timeout: Optional[float] = None) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self._inherited:   # first: a thread of the child may have the dead I/O thread's ident
                self._reopen(method)
            if threading.get_ident() == self._thread.ident:
                raise TransportError("a blocking call from a callback (on the client's own I/O "
                                     "thread) would wait for itself forever; call through "
                                     "client.future or client.callback there",
                                     method=method.name, request_sent=False)
            running = asyncio._get_running_loop()   # (None, at no cost, for most callers)
            if running is not None and SERVING_LOOPS.get(running):
                raise TransportError("a blocking call on an octo_core Server's event loop (in "
                                     "a coroutine handler, or a plain one added inline=True) "
                                     "would stop that server, answers to this call included, "
                                     "for as long as it waits; await an AsyncClient in a "
                                     "coroutine handler, or add the service without inline",
                                     method=method.name, request_sent=False)
            make = self._maker(method, args, kwargs, timeout)
            # Waits at most the call's timeout plus _LOOP_MARGIN: a stuck I/O thread
            # fails the call rather than hang its caller.
            bound = (self._async.timeout_of(method.name) if timeout is None
                     else timeout) + _LOOP_MARGIN
            return self._thread.call(make, bound, lambda: CallTimeout(
                f"the client's I/O thread gave no answer within {bound:.3g}s", method=method.name))
        call.__name__ = method.name
        return call

    def _with_callback(self, method: idl.Method,
                       timeout: Optional[float] = None) -> Callable[..., concurrent.futures.Future]:
        submit = self._submitter(method, timeout)

        def call(*args: Any, callback: Callable[[Any], None], **kwargs: Any) -> concurrent.futures.Future:
            if not callable(callback):   # most likely an IDL argument called `callback`
                raise TypeError(f"{method.name}: callback must be callable, not {callback!r} "
                                "(in callback mode an IDL argument called callback is "
                                "passed by position)")
            future = submit(*args, **kwargs)
            future.add_done_callback(lambda f: callback(_outcome(f)))
            return future
        call.__name__ = method.name
        # what a call without callback= is told it misses
        call.__qualname__ = f"{self.service.__name__}.{method.name}"
        return call

    def close(self, grace: float = 0.0) -> None:
        """Close the connections and stop the loop thread (see the class docstring);
        ``grace`` as in ``AsyncClient.close``: new calls are refused at once, those
        in flight get up to that long to end first."""
        grace = finite_number("grace", grace, zero_ok=True)
        # Once, never waiting: from a signal handler that interrupted a close(), a call
        # or a reopening on its thread, it returns (that close() goes on) or closes.
        if not self._closing.acquire(blocking=False):
            return
        with self._reopening:   # (after another thread's reopening)
            self._closed = True
            if self._inherited:   # a forked child's copy never reopened: nothing of its own
                return
        self._collected.detach()
        if threading.get_ident() == self._thread.ident:   # from a callback: cannot wait for itself
            _close_soon(self._thread, self._async, grace)
            return
        closing = self._thread.submit(_close_on_loop(self._thread, self._async, grace))
        try:
            if not concurrent.futures.wait([closing], _CLOSE_WAIT + grace).done:
                raise TransportError(
                    f"close(): the client's I/O thread ({_IO_THREAD}, ident "
                    f"{self._thread.ident}) is stuck (in a callback?): it did not close the "
                    f"client within {_CLOSE_WAIT + grace:.3g}s; it closes it, and ends, "
                    "once free")
            closing.result()
        finally:
            if closing.done():
                self._thread.stop()
            else:   # no second wait for a stuck thread: it stops once it has closed the
                # client (a stop now would refuse the closing still queued)
                closing.add_done_callback(lambda _: self._thread.stop())

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        Client.close(self)


def _kept(options: Dict[str, Any]) -> Dict[str, Any]:
    """``options`` with the one-shot iterators of names a ``Client`` gets
    (``hosts``, ``idempotent``: a generator, say) as tuples: a forked child
    makes its client anew from them, and what the parent's used up would give
    it none."""
    kept = dict(options)
    for name in ("hosts", "idempotent", "middleware"):
        if isinstance(kept.get(name), collections.abc.Iterator):
            kept[name] = tuple(kept[name])
    return kept



for _name in _SHARED_ATTRIBUTES:   # (a forked child's reopened client: its new AsyncClient's)
    setattr(Client, _name, property(operator.attrgetter(f"_async.{_name}"),
                                    doc=f"The ``AsyncClient``'s ``{_name}`` (read-only)."))
del _name
#: What forked children inherited of their blocking clients (see _inherited_by_fork).
_LEFT_BY_FORK: List[Tuple[LoopThread, AsyncClient]] = []
#: The blocking clients of the futures still pending: a client dropped meanwhile
#: is collected (and closed, cutting them short) only once they settle.
_KEPT_ALIVE: Dict[concurrent.futures.Future, "Client"] = {}
#: Seconds a blocking call waits beyond its timeout (for a first call's registry
#: discovery, or a busy loop) before it gives up on the I/O thread.
_LOOP_MARGIN = 10.0
#: Seconds Client.close() gives the calls still running to end with their own errors.
_CLOSE_GRACE = 1.0
#: Seconds Client.close() waits for its I/O thread to close the client (and those
#: calls): beyond that, the thread is stuck.
_CLOSE_WAIT = _CLOSE_GRACE + 5.0
#: The name of every blocking client's I/O thread.
_IO_THREAD = "octo-client"


async def _close_on_loop(thread: LoopThread, client: AsyncClient, grace: float = 0.0) -> None:
    """Close a blocking client's ``AsyncClient`` on its loop; its calls get their
    errors before the loop stops (the stopping loop would cancel them)."""
    await AsyncClient.close(client, grace)
    await thread.settle(_CLOSE_GRACE)


def _close_soon(thread: LoopThread, client: AsyncClient, grace: float = 0.0) -> None:
    """Close ``client`` and then stop its loop ``thread``, without waiting for either."""
    def begin() -> None:
        closing = thread.loop.create_task(_close_on_loop(thread, client, grace))
        closing.add_done_callback(lambda _: thread.stop())
    thread.loop.call_soon_threadsafe(begin)


def _close_collected(thread: LoopThread, client: AsyncClient) -> None:
    """A ``Client`` collected unclosed: say so, and close it (never blocking the
    collector, which may run on any thread)."""
    _close_soon(thread, client)   # first: a warnings filter may turn the warning into an error
    warnings.warn("an octo_core Client was collected without close(): it is being closed",
                  ResourceWarning)


def _cut_short() -> TransportError:
    """A call the closing client's loop stopped under: it may have been sent."""
    return ClientClosed()


def _outcome(future: concurrent.futures.Future) -> Any:
    """A finished future's result, or its exception (``CancelledError`` if cancelled)."""
    if future.cancelled():
        return concurrent.futures.CancelledError()
    error = future.exception()
    return error if error is not None else future.result()


async def _make_async(service: Any, options: Dict[str, Any]) -> AsyncClient:
    _MADE_FOR_CLIENT.set(True)   # (in this task's context only)
    return AsyncClient(service, **options)
