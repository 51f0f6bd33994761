"""Asyncio task plumbing without I/O, shared by the transport, the server and the
cluster: a task started eagerly, an outcome nobody waits for marked read."""
from __future__ import annotations

import asyncio
import contextvars
import sys
from typing import Any, Coroutine, Generator, List


def outcome_seen(task: "asyncio.Future[Any]") -> None:
    """A done callback for a task whose outcome nobody may wait for (a shared
    connect every caller gave up on, a forked copy the race cancelled): its
    error is marked read, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def start_task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any],
               context: contextvars.Context) -> asyncio.Future:
    """Run ``coro`` as a task whose first step runs now, in ``context``.

    A handler that finishes without suspending is done before this returns: no
    scheduling, no extra loop iteration, and its reply goes out in the same
    read callback. One that suspends goes on as an ordinary task (it is the
    current task throughout, so ``asyncio.timeout`` and friends work).
    """
    if _EAGER_START:
        return asyncio.Task(coro, loop=loop, context=context,  # type: ignore[call-arg]  # 3.12+
                            eager_start=True)
    if _current_tasks.get(loop) is not None:   # <3.12 cannot nest tasks: start it normally
        return context.run(loop.create_task, coro)   # (the task copies ``context``)
    return _EagerTask(coro, loop, context)


_EAGER_START = sys.version_info >= (3, 12)
if not _EAGER_START:
    # what asyncio.current_task(loop) reads, without its Python frame (every call's path)
    _current_tasks = asyncio.tasks._current_tasks  # type: ignore[attr-defined]
    _enter_task = asyncio.tasks._enter_task  # type: ignore[attr-defined]
    _leave_task = asyncio.tasks._leave_task  # type: ignore[attr-defined]
    _PENDING = asyncio.futures._PENDING  # type: ignore[attr-defined]
    _FINISHED = asyncio.futures._FINISHED  # type: ignore[attr-defined]

_RETURNED, _RAISED, _YIELDED = range(3)   # how a first step ended (_EagerTask's)


class _EagerTask(asyncio.tasks._PyTask):  # type: ignore[name-defined,misc]
    """Eager start before 3.12: the pure-Python Task, minus the scheduled first
    step (3.12 has ``eager_start``; 3.10's and 3.11's Task internals no longer change).

    The first step runs here. When it returns (a handler that answers at once:
    every call's path) the result is set in place; whatever else it does (raise,
    suspend, cancel its own task) the inherited step is shown again, so that it
    is handled by asyncio's own code exactly as if that step had run it."""

    def __init__(self, coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop,
                 context: contextvars.Context) -> None:
        self._loop = loop           # what _PyFuture.__init__ sets, minus its debug lookup
        self._callbacks: List[Any] = []
        self._name = "octo-handler"
        self._num_cancels_requested = 0
        self._must_cancel = False
        self._fut_waiter = None
        self._coro = coro
        self._context = context
        _enter_task(loop, self)
        try:
            yielded = context.run(coro.send, None)
        except StopIteration as stop:
            if not self._must_cancel:
                self._state, self._result = _FINISHED, stop.value  # (no callback yet to call)
                return
            outcome, value = _RETURNED, stop.value
        except BaseException as exc:  # noqa: B902 - the inherited step sorts them out
            outcome, value = _RAISED, exc
        else:
            outcome, value = _YIELDED, yielded
        finally:
            _leave_task(loop, self)
        self._coro = _first_step_again(  # type: ignore[assignment]  # (only sent to, once)
            self, self._must_cancel, outcome, value)
        self._must_cancel = False   # (the step checks it before it "runs" the coroutine)
        try:
            context.run(self._Task__step)
        finally:
            self._coro = coro       # later steps resume the coroutine itself
        # (done() without its frame) it suspended: asyncio.all_tasks() should see it now
        if self._state == _PENDING:
            asyncio.tasks._register_task(self)

    def __del__(self) -> None:
        # The inherited __del__ (Task's, then Future's through super()) logs only a
        # task still pending or an exception never retrieved: this checks both
        # without its two frames, as every handler's task ends here.
        if self._state == _PENDING or self._Future__log_traceback:
            super().__del__()


def _first_step_again(task: _EagerTask, must_cancel: bool, outcome: int,
                      value: Any) -> Generator[Any, None, Any]:
    """What an eager task's first step did, done again for the inherited step: it
    returns ``value``, raises it or yields it, with ``_must_cancel`` as the first
    step left it (set here, after the inherited step looked at it before running)."""
    task._must_cancel = must_cancel
    if outcome == _RAISED:
        raise value
    if outcome == _RETURNED:
        return value
    yield value
