"""Event loops: uvloop when it is installed, and a loop on its own thread for sync callers."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
import weakref
from typing import Any, Callable, Coroutine, Dict, Optional, Set, Union


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's if available, else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


#: The event loops octo_core Servers run on, each with its servers: a blocking call
#: made on one that serves (from a coroutine handler) is refused, as it would stop
#: the servers it runs in.
SERVING_LOOPS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, weakref.WeakSet[Any]]" = \
    weakref.WeakKeyDictionary()

#: Seconds a stopping loop gives its cancelled tasks to finish before it closes.
_STOP_GRACE = 5.0


class LoopThread:
    """An event loop running on a daemon thread; blocking code submits coroutines to it.

    Once ``stop()`` is called, ``submit`` refuses new work with ``stopped_error()``
    and a coroutine still running when the loop stops is cancelled, its future
    failing with ``stopped_error()`` too: no caller waits forever for a loop that
    is gone, nor gets a bare ``CancelledError`` it never asked for. The thread
    cancels what is left and closes its loop itself, so ``stop()`` may be called
    from the loop thread too (it then returns without waiting).
    """

    def __init__(self, name: str = "octo-io",
                 stopped_error: Optional[Callable[[], Exception]] = None) -> None:
        self.loop = new_event_loop()
        self._stopped_error = stopped_error or (
            lambda: RuntimeError(f"the {name} loop thread is stopped"))
        # No lock orders submit() against stop(): a signal handler may call either
        # while its thread is in the other (see _schedule and _run).
        self._stopping = False
        self._stop_once = threading.Lock()   # taken by the first stop(), never let go
        # What makes each submitted coroutine not started yet, by its future: whoever
        # pops one (the loop starting it, the stopping thread, its interrupted caller)
        # settles it.
        self._queued: Dict[Any, Callable[[], Coroutine[Any, Any, Any]]] = {}
        self._tasks: Set[asyncio.Task] = set()   # the submitted coroutines still running
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    @property
    def ident(self) -> Optional[int]:
        """The loop thread's ``threading.get_ident()``."""
        return self._thread.ident

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
            self.loop.run_until_complete(cancel_rest())
        finally:
            # However the loop ended, submit() now refuses work, and what was queued
            # never starts. A submit() that queues after this snapshot reads
            # _stopping after it is set: it takes its coroutine back itself.
            self._stopping = True
            for future in list(self._queued):
                self._refuse(future)
            self.loop.close()

    def submit(self, coro: "Startable") -> concurrent.futures.Future:
        """Schedule ``coro`` on the loop; returns a ``concurrent.futures.Future``
        (cancelling it cancels the coroutine).

        ``coro`` is a coroutine, or a function that makes one: made on the loop, a
        coroutine is never left "never awaited" by a caller interrupted (Ctrl-C)
        while handing it over. The same for ``call`` and ``run``."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._schedule(coro, future)
        return future

    def call(self, coro: "Startable", timeout: float,
             no_outcome: Callable[[], BaseException]) -> Any:
        """Run ``coro`` on the loop and wait for its outcome: what
        ``submit(coro).result(timeout)`` gives, for a blocking caller, handed
        over with one thread wake-up (``_Handoff``). When ``timeout`` seconds pass
        without an outcome, or the caller is interrupted (Ctrl-C), the coroutine
        is cancelled and ``no_outcome()`` (resp. the interruption) is raised."""
        handoff = _Handoff()
        self._schedule(coro, handoff)
        return handoff.wait(timeout, no_outcome)

    def _schedule(self, coro: "Startable",
                  future: "concurrent.futures.Future | _Handoff") -> None:
        try:
            self._queued[future] = coro if callable(coro) else functools.partial(_given, coro)
            if self._stopping:   # (read after queuing: see _run)
                raise self._stopped_error()
            try:
                # queued before stop()'s loop.stop: it runs, or is refused by _start
                self.loop.call_soon_threadsafe(self._start, future)
            except RuntimeError:   # the loop closed meanwhile
                raise self._stopped_error() from None
        except BaseException:   # refused, or its caller interrupted (Ctrl-C): it never starts
            self._refuse(future)
            raise

    def _start(self, future: "concurrent.futures.Future | _Handoff") -> None:
        """On the loop: run the coroutine queued for ``future`` as a task whose
        outcome goes to ``future``."""
        make = self._queued.pop(future, None)
        if make is None:          # refused meanwhile
            return
        if self._stopping or future.cancelled():   # (a task now would miss cancel_rest)
            self._never_started(future, make)
            return
        try:
            coro = make()
        except Exception as exc:   # (the function that makes it failed): the caller's outcome
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)
            return
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._settle, future))
        future.add_done_callback(functools.partial(self._cancel_if_cancelled, task))

    def _refuse(self, future: "concurrent.futures.Future | _Handoff") -> None:
        """``future``'s coroutine, if still queued, never starts (see ``_never_started``)."""
        make = self._queued.pop(future, None)
        if make is not None:
            self._never_started(future, make)

    def _never_started(self, future: "concurrent.futures.Future | _Handoff",
                       make: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Close the coroutine (no "coroutine was never awaited"); ``future``, unless
        its caller cancelled it, fails with ``stopped_error()``."""
        with contextlib.suppress(Exception):   # (one that cannot be made was never made)
            make().close()
        if future.set_running_or_notify_cancel():
            future.set_exception(self._stopped_error())

    def _settle(self, future: "concurrent.futures.Future | _Handoff", task: asyncio.Task) -> None:
        """Hand the task's outcome to ``future``; cancelled by stop(): ``stopped_error()``."""
        self._tasks.discard(task)
        if task.cancelled() and not self._stopping:
            future.cancel()       # its caller cancelled it (or it cancelled itself)
        if not future.set_running_or_notify_cancel():
            return
        if task.cancelled():
            future.set_exception(self._stopped_error())
            return
        error = task.exception()
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(task.result())

    def _cancel_if_cancelled(self, task: asyncio.Task,
                             future: "concurrent.futures.Future | _Handoff") -> None:
        """The caller cancelled ``future``: cancel the task running its coroutine."""
        if future.cancelled():
            try:
                self.loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:   # the loop is closed: it cancelled the task itself
                pass

    async def settle(self, timeout: float) -> None:
        """Wait (on the loop), up to ``timeout`` seconds, for the submitted
        coroutines still running -- the one calling this aside -- to end."""
        running = self._tasks - {asyncio.current_task()}
        if running:
            await asyncio.wait(running, timeout=timeout)

    def run(self, coro: "Startable", timeout: Optional[float] = None) -> Any:
        """Run ``coro`` on the loop and wait for its result."""
        return self.submit(coro).result(timeout)

    def stop(self, timeout: float = 2 * _STOP_GRACE) -> None:
        """Stop the loop: tasks still running are cancelled, then the loop closes.

        From another thread this waits (up to ``timeout`` seconds) for the thread
        to end; from the loop thread itself (a callback) it returns at once."""
        if self._stop_once.acquire(blocking=False):   # (never waits: see __init__)
            self._stopping = True
            try:
                self.loop.call_soon_threadsafe(self.loop.stop)
            except RuntimeError:   # the loop ended on its own, and is closed
                pass
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


class _Handoff:
    """One blocking call's outcome, passed from the loop thread to the caller
    waiting for it by releasing a plain lock.

    A ``concurrent.futures.Future`` does the same job with a condition variable
    and more Python on both sides; on the blocking client's path that cost about
    20 µs a call. This is the part of the Future API that ``LoopThread`` settles
    outcomes through (``cancelled``, ``cancel``, ``add_done_callback`` (called on
    cancellation only: all ``LoopThread`` asks of it), ``set_running_or_notify_cancel``,
    ``set_result``, ``set_exception``), with the same states and races: it can be
    cancelled until the loop starts to settle it, not after.
    """

    __slots__ = ("_settled", "_lock", "_state", "_value", "_error", "_on_cancel")

    def __init__(self) -> None:
        self._settled = threading.Lock()
        self._settled.acquire()          # released once: the outcome is in place, or cancelled
        self._lock = threading.Lock()    # orders cancel() against the loop's settling
        self._state = _UNSETTLED
        self._value: Any = None
        self._error: Optional[BaseException] = None
        self._on_cancel: Optional[Callable[["_Handoff"], None]] = None

    def cancelled(self) -> bool:
        return self._state is _CANCELLED

    def add_done_callback(self, fn: Callable[["_Handoff"], None]) -> None:
        with self._lock:
            if self._state is not _CANCELLED:
                self._on_cancel = fn
                return
        fn(self)

    def cancel(self) -> bool:
        with self._lock:
            if self._state is not _UNSETTLED:
                return self._state is _CANCELLED
            self._state = _CANCELLED
            on_cancel = self._on_cancel
        self._settled.release()   # a waiter still there (the loop cancelled it) wakes to that
        if on_cancel is not None:
            on_cancel(self)
        return True

    def set_running_or_notify_cancel(self) -> bool:
        with self._lock:
            if self._state is _CANCELLED:
                return False
            self._state = _SETTLING
            return True

    def set_result(self, value: Any) -> None:
        self._value = value
        self._settled.release()

    def set_exception(self, error: BaseException) -> None:
        self._error = error
        self._settled.release()

    def wait(self, timeout: float, no_outcome: Callable[[], BaseException]) -> Any:
        """The outcome (the value, or its exception raised); see ``LoopThread.call``."""
        try:
            settled = self._settled.acquire(timeout=timeout)
        except BaseException:   # interrupted (Ctrl-C): no one waits for the answer now
            self.cancel()
            raise
        if not settled:
            if self.cancel():
                raise no_outcome()
            self._settled.acquire()   # the loop is settling it at this moment
        if self._state is _CANCELLED:   # by the loop: the coroutine cancelled itself
            raise concurrent.futures.CancelledError()
        error, self._error = self._error, None   # (no cycle through the traceback)
        if error is not None:
            raise error
        return self._value


_UNSETTLED, _SETTLING, _CANCELLED = "unsettled", "settling", "cancelled"   # (_Handoff's)

#: What ``LoopThread.submit`` starts: a coroutine, or a function that makes one.
Startable = Union[Coroutine[Any, Any, Any], Callable[[], Coroutine[Any, Any, Any]]]


def _given(coro: Coroutine[Any, Any, Any]) -> Coroutine[Any, Any, Any]:
    return coro


async def cancel_rest() -> None:
    """Cancel every task left on a stopped loop; wait a bounded time for them to end
    (what ``asyncio.run`` does before it closes its loop)."""
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=_STOP_GRACE)
