"""Asyncio task plumbing without I/O, shared by the transport and the cluster."""
from __future__ import annotations

import asyncio
from typing import Any


def outcome_seen(task: "asyncio.Future[Any]") -> None:
    """A done callback for a task whose outcome nobody may wait for (a shared
    connect every caller gave up on, a forked copy the race cancelled): its
    error is marked read, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()
