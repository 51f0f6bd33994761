"""Blocking work (files, name lookups, ZooKeeper calls) off the event loop, on octo_core's own threads.

Not ``asyncio.to_thread``: the default executor, like every
``concurrent.futures.ThreadPoolExecutor``, refuses new work once the interpreter
starts shutting down, that is as soon as the main thread returns, while a
non-daemon thread may go on serving for long after, renewing, reading and
unregistering its registry entries.

Each kind of work has a pool of its own, so one cannot hold up another: a
resolver that does not answer, or a ZooKeeper call waiting for its session,
never delays the renewal that keeps a serving node listed.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Optional, TypeVar

from octo_core.afterfork import tell_forked_children
from octo_core.business import BusinessPool

T = TypeVar("T")


class Pool:
    """Daemon threads for one kind of blocking work, started at first use (again
    in a forked child, which has none of its parent's threads)."""

    def __init__(self, name: str, threads: int) -> None:
        self.name = name
        self.threads = threads
        self._pool: Optional[BusinessPool] = None
        self._shut = False
        self._starting = threading.Lock()
        tell_forked_children(self)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on one of this pool's threads (``RuntimeError`` once it is shut down)."""
        pool = self._pool
        if pool is None:
            with self._starting:
                if self._shut:
                    raise RuntimeError(f"the {self.name} pool is shut down")
                if self._pool is None:
                    try:
                        self._pool = BusinessPool(self.threads, self.name)
                    except RuntimeError:   # 3.12+ starts no thread once the interpreter
                        return fn(*args)   # shuts down: then the work, short, runs here
                pool = self._pool
        return await asyncio.wrap_future(pool.submit(fn, *args))

    def shutdown(self) -> None:
        """Take no more work; the threads end once the work already given is done."""
        with self._starting:
            pool, self._pool, self._shut = self._pool, None, True
        if pool is not None:
            pool.shutdown(cancel_pending=False)

    def _inherited_by_fork(self) -> None:
        """In a forked child: the threads are the parent's; the next use starts new ones."""
        self._pool, self._starting = None, threading.Lock()


#: Name lookups (a resolver that does not answer holds only these).
LOOKUPS = Pool("octo-lookup", 4)
#: Registry files and directory snapshots: short, and renewals must not wait.
FILES = Pool("octo-files", 4)
