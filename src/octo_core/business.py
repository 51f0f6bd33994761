"""``BusinessPool``: the threads plain-function handlers run on; ``LoopInbox``:
their outcomes, back to the event loop.

OCTO keeps business work off the I/O threads. The pool is bounded by the
server's admission checks (a full queue is refused with status 3 before it gets
here), so it holds no limit of its own. Its threads are daemon threads: a
handler that never returns cannot keep the process alive after the server has
stopped, which ``concurrent.futures.ThreadPoolExecutor`` (whose threads the
interpreter joins at exit) would.

A job is an object with ``run()`` and ``cancel()``, not a function and a
``concurrent.futures.Future``: the future's condition variable and callbacks
cost some microseconds on every call of a plain-function handler.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from typing import Any, Callable, List, Optional, Protocol


class Job(Protocol):
    """A piece of work for the pool: ``run()`` on a business thread, or
    ``cancel()`` (on the thread that cancels) if no thread ever starts it."""

    def run(self) -> None: ...

    def cancel(self) -> None: ...


class BusinessPool:
    """``threads`` daemon threads taking jobs from one queue: a server's business
    threads, and the pools of ``octo_core.blocking`` and the ZooKeeper worker."""

    def __init__(self, threads: int, name: str) -> None:
        self.name = name
        self._queue: "queue.SimpleQueue[Optional[Job]]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._workers: List[threading.Thread] = []
        try:
            for number in range(threads):
                worker = threading.Thread(target=self._work, name=f"{name}-{number}", daemon=True)
                worker.start()
                self._workers.append(worker)
        except BaseException:   # (can't start new thread): those started end, none is left waiting
            self.abandon()
            raise

    def start(self, job: Job) -> None:
        """Queue ``job``: one of the pool's threads runs it (``RuntimeError`` once shut down)."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the {self.name} pool is shut down")
            self._queue.put(job)

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run ``fn(*args)`` on one of the pool's threads; its outcome lands in the future."""
        job = _FutureJob(fn, args)
        self.start(job)
        return job.future

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            job.run()
            # Not kept while the thread waits for the next: a call's job holds its
            # arguments and connection, which an idle thread would otherwise pin.
            del job

    def cancel_pending(self) -> None:
        """Cancel the jobs no thread has started; the pool takes new work on."""
        with self._lock:
            if not self._closed:   # (once shut down, the queue holds the threads' stop marks)
                self._cancel_queued()

    def _cancel_queued(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.cancel()

    def shutdown(self, cancel_pending: bool = True) -> None:
        """Take no more work, and cancel the jobs not started (or, without
        ``cancel_pending``, let them run); each thread ends when it finds no work left."""
        with self._lock:
            self._closed = True
            if cancel_pending:
                self._cancel_queued()
            for _ in self._workers:
                self._queue.put(None)

    def abandon(self) -> None:
        """Shut down a pool that was never given work, and wait for its threads to
        end (at once: each finds it has nothing to do)."""
        self.shutdown()
        for worker in self._workers:
            worker.join()


class _FutureJob:
    """``fn(*args)``, its outcome in a ``concurrent.futures.Future``."""

    __slots__ = ("future", "_fn", "_args")

    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self._fn, self._args = fn, args

    def run(self) -> None:
        if self.future.set_running_or_notify_cancel():
            try:
                result = self._fn(*self._args)
            except BaseException as exc:  # noqa: B902 - the caller's future says what happened
                self.future.set_exception(exc)
            else:
                self.future.set_result(result)

    def cancel(self) -> None:
        self.future.cancel()


class LoopInbox:
    """What other threads hand to an event loop, taken there in batches: one
    wake-up of the loop (a ``call_soon_threadsafe``, a write to its self-pipe)
    for all that arrived since it last looked, not one per item.

    ``take(*item)`` is called on the loop for each item, in arrival order; an
    exception it raises goes to the loop's exception handler, as a callback's
    would, and the batch goes on. A ``KeyboardInterrupt`` or ``SystemExit`` ends
    the loop's run, as a callback's would; the rest of the batch is taken when
    the loop runs again (as the callbacks it had ready would be)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, take: Callable[..., None]) -> None:
        self._loop = loop
        self._take = take
        self._items: List[tuple] = []
        self._lock = threading.Lock()

    def put(self, *item: Any) -> None:
        """(Any thread.) Hand ``item`` over; ``RuntimeError`` if the loop is closed
        (an item put while another thread finds it closed is dropped unseen)."""
        with self._lock:
            items = self._items
            items.append(item)
            if len(items) > 1:   # a wake-up is on its way: it takes this one too
                return
        try:
            self._loop.call_soon_threadsafe(self._take_all)
        except RuntimeError:
            # closed: nothing will take these; dropped, so that the next put is refused too
            with self._lock:
                self._items = []
            raise

    def _take_all(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        take = self._take
        for index, item in enumerate(items):
            try:
                take(*item)
            except Exception as exc:   # one item's failure is not the others'
                self._loop.call_exception_handler({
                    "message": f"{take!r} failed", "exception": exc})
            except BaseException:
                self._put_back(items[index + 1:])
                raise

    def _put_back(self, rest: List[tuple]) -> None:
        """(On the loop.) Items a batch left untaken, first in line for the next one."""
        if not rest:
            return
        with self._lock:
            self._items[:0] = rest
            wake = len(self._items) == len(rest)   # none came since: no wake-up is on its way
        if wake:
            self._loop.call_soon(self._take_all)
