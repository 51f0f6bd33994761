"""``Throttle``: at most one log record per kind a period, the rest counted in the next.

Shared by what logs events it does not control the rate of: what peers set
off (``transport``, ``server``) and what a ZooKeeper outage sets off in kazoo
(``registry.zookeeper``).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Dict, Hashable, List, Optional


class Throttle:
    """Log records a peer can cause at will, at most one per key every ``every``
    seconds: one record per event would let it flood the log (and, with a
    traceback, spend the server's time formatting it). Those held back are
    counted in the key's next record.

    ``key`` groups the records (the default, None: all of them). A record
    that comes with none held back (a key's first, or one after a quiet period:
    another bug, maybe, of the same kind) carries ``exc_info`` (its traceback);
    a summary of those held back, the message alone (a key quiet for a while
    may be dropped). The keys are bounded: past ``max_keys`` (once those quiet
    for ``every`` with nothing held back are dropped) new keys share one, until
    it has told its count, so a peer that makes up keys gets no more records,
    nor memory, than ``max_keys`` and one more.
    ``clock`` (seconds, monotonic) is for tests, which must not sleep.
    """

    def __init__(self, every: float, logger: logging.Logger, level: int = logging.WARNING, *,
                 max_keys: int = 256, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.logger = logger
        self.level = level
        self.max_keys = max_keys
        self.clock = clock
        # key -> [when its next record may go, records held back since its last]
        self._keys: Dict[Hashable, List[Any]] = {}
        self._crowd: List[Any] = [-math.inf, 0]   # the key shared past max_keys
        self._pruned_at = -math.inf

    def log(self, message: str, *args: Any, key: Hashable = None,
            exc_info: Optional[BaseException] = None) -> None:
        """Log ``message % args`` at ``level``, unless ``key`` had a record less
        than ``every`` seconds ago: then it is counted, for the key's next record."""
        now = self.clock()
        entry = self._keys.get(key) or self._new_key(key, now)
        if now < entry[0]:
            entry[1] += 1
            return
        if entry[1]:   # a summary: the traceback went with the record before those held
            exc_info = None
            message += f" (and {entry[1]} more since the last such message)"
        if entry is self._crowd:
            message += f" (past {self.max_keys} kinds of message: throttled together)"
        self.logger.log(self.level, message, *args, exc_info=exc_info)
        entry[0], entry[1] = now + self.every, 0

    def _new_key(self, key: Hashable, now: float) -> List[Any]:
        """``key``'s entry, new; the shared one when the table is full."""
        if len(self._keys) >= self.max_keys and now >= self._pruned_at + self.every:
            # (at most once a period: a peer making up keys must not make each call O(keys))
            self._pruned_at = now
            # (over a copy, made at once: clients' I/O threads share a module's
            # throttles, and one may add a key meanwhile; a count lost so is harmless)
            self._keys = {k: e for k, e in list(self._keys.items()) if now < e[0] or e[1]}
        if len(self._keys) >= self.max_keys or self._crowd[1]:
            return self._crowd   # (until it has told its count: then keys may have room again)
        entry = self._keys[key] = [-math.inf, 0]
        return entry
