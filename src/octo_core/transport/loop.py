"""Event loops: uvloop when it is installed, and a loop on its own thread for sync callers."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import sys
import threading
from typing import Any, Coroutine, Optional


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's if available, else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoopThread:
    """An event loop running on a daemon thread; blocking code submits coroutines to it."""

    def __init__(self, name: str = "octo-io") -> None:
        self.loop = new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        """Schedule ``coro`` on the loop; returns a ``concurrent.futures.Future``."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: Optional[float] = None) -> Any:
        """Run ``coro`` on the loop and wait for its result."""
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        """Stop the loop and join its thread (pending tasks are cancelled)."""
        if not self._thread.is_alive():
            return

        async def _cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(_cancel_rest(), timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            if not self._thread.is_alive():
                self.loop.close()


def start_task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any],
               context: contextvars.Context) -> asyncio.Future:
    """Run ``coro`` as a task whose first step runs now, in ``context``.

    A handler that finishes without suspending is done before this returns: no
    scheduling, no extra loop iteration, and its reply goes out in the same
    read callback. One that suspends goes on as an ordinary task (it is the
    current task throughout, so ``asyncio.timeout`` and friends work).
    """
    if _EAGER_START:
        return asyncio.Task(coro, loop=loop, context=context, eager_start=True)
    if asyncio.current_task(loop) is not None:   # <3.12 cannot nest tasks: start it normally
        return context.run(loop.create_task, coro)   # (the task copies ``context``)
    return _EagerTask(coro, loop, context)


_EAGER_START = sys.version_info >= (3, 12)


class _EagerTask(asyncio.tasks._PyTask):  # type: ignore[name-defined,misc]
    """Eager start before 3.12: the pure-Python Task, minus the scheduled first
    step (3.12 has ``eager_start``; 3.10's and 3.11's Task internals no longer change)."""

    def __init__(self, coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop,
                 context: contextvars.Context) -> None:
        self._loop = loop           # what _PyFuture.__init__ sets, minus its debug lookup
        self._callbacks = []
        self._name = "octo-handler"
        self._num_cancels_requested = 0
        self._must_cancel = False
        self._fut_waiter = None
        self._coro = coro
        self._context = context
        context.run(self._Task__step)
        if not self.done():       # it suspended: asyncio.all_tasks() should see it now
            asyncio.tasks._register_task(self)
