"""Blocking work (files, name lookups, ZooKeeper calls) off the event loop, on octo_core's own threads.

Not ``asyncio.to_thread``: the default executor, like every
``concurrent.futures.ThreadPoolExecutor``, refuses new work once the interpreter
starts shutting down, that is as soon as the main thread returns, while a
non-daemon thread may go on serving for long after, renewing, reading and
unregistering its registry entries. These are daemon threads, started at first
use (again in a forked child, which has none of its parent's threads).
"""
from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, Callable, Optional, TypeVar

from octo_core.business import BusinessPool

T = TypeVar("T")

#: Threads for blocking work. Registry file I/O is short, but a ZooKeeper call may
#: wait for its session (up to its op_timeout) and a name lookup for DNS.
THREADS = 8

_pool: Optional[BusinessPool] = None
_starting = threading.Lock()


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on one of octo_core's blocking-work threads."""
    global _pool
    if _pool is None:
        with _starting:
            if _pool is None:
                try:
                    _pool = BusinessPool(THREADS, "octo-blocking")
                except RuntimeError:   # 3.12+ starts no thread once the interpreter shuts down:
                    return fn(*args)   # then the work, short, runs here
    return await asyncio.wrap_future(_pool.submit(fn, *args))


def _forget_the_parent_s_pool() -> None:
    global _pool, _starting
    _pool, _starting = None, threading.Lock()


if hasattr(os, "register_at_fork"):    # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_forget_the_parent_s_pool)
