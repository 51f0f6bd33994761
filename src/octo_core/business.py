"""``BusinessPool``: the threads plain-function handlers run on.

OCTO keeps business work off the I/O threads. The pool is bounded by the
server's admission checks (a full queue is refused with status 3 before it gets
here), so it holds no limit of its own. Its threads are daemon threads: a
handler that never returns cannot keep the process alive after the server has
stopped, which ``concurrent.futures.ThreadPoolExecutor`` (whose threads the
interpreter joins at exit) would.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Any, Callable, List, Optional, Tuple

_Work = Tuple[concurrent.futures.Future, Callable[..., Any], Tuple[Any, ...]]


class BusinessPool:
    """``threads`` daemon threads taking work from one queue."""

    def __init__(self, threads: int, name: str) -> None:
        self._queue: "queue.SimpleQueue[Optional[_Work]]" = queue.SimpleQueue()
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

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run ``fn(*args)`` on a business thread; its outcome lands in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the business pool is shut down")
            self._queue.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as exc:  # noqa: B902 - the caller's future says what happened
                    future.set_exception(exc)
                else:
                    future.set_result(result)

    def cancel_pending(self) -> None:
        """Cancel the work no thread has started (its futures say so); the pool
        takes new work on."""
        with self._lock:
            if not self._closed:   # (once shut down, the queue holds the threads' stop marks)
                self._cancel_queued()

    def _cancel_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[0].cancel()

    def shutdown(self, cancel_pending: bool = True) -> None:
        """Take no more work, and cancel the work not started (or, without
        ``cancel_pending``, let it run); each thread ends when it finds no work left."""
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
