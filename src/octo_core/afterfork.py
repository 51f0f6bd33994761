"""What a child made by ``os.fork()`` must not use of its parent's, and the hook that tells it.

A child inherits a copy of every event loop, connection, pending call and
thread pool, but none of the threads: no thread runs those loops or pools
there, and its sockets are the parent's own. Written to from the child, a
connection interleaves frames with the parent's, and one process reads the
other's answers. Objects that hold such things register here, and their
``_inherited_by_fork()`` runs in the child, before any other code, to refuse
or to start afresh.
"""
from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Iterable

log = logging.getLogger("octo_core")


def tell_forked_children(obj: Any) -> None:
    """Have ``obj._inherited_by_fork()`` called in each child that ``os.fork()``
    makes while ``obj`` lives (on the child's copy, before any other code runs there)."""
    _TOLD_AT_FORK.add(obj)


_TOLD_AT_FORK: "weakref.WeakSet[Any]" = weakref.WeakSet()


def release_in_child(fds: Iterable[int]) -> None:
    """In a forked child: close the child's copies of the parent's sockets ``fds``
    (the parent's own stay open). Until then the child holds them open too: a
    listener the parent closed would still take connections, a connection the
    parent closed would never end at the peer. Each number stays taken (by
    /dev/null), so what still holds it closes /dev/null, never a newer socket."""
    placeholder = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in fds:
            if fd >= 0 and fd != placeholder:
                os.dup2(placeholder, fd)
    finally:
        os.close(placeholder)


def _after_fork_in_child() -> None:
    for obj in list(_TOLD_AT_FORK):
        try:
            obj._inherited_by_fork()
        except Exception:   # one that fails must not leave the others as they were
            log.exception("after os.fork(): %r could not let go of its parent's", obj)


if hasattr(os, "register_at_fork"):    # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
