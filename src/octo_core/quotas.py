"""``Quotas``: a server's per-caller call rates (token buckets), bounded in memory."""
from __future__ import annotations

import time
from typing import Dict, List, Mapping, Tuple

from octo_core.checks import finite_number


class Quotas:
    """Per-caller token buckets: ``{appkey or "*": calls per second}``.

    A bucket holds one second's worth of calls, and at least one call, so a rate
    below 1/s still admits a call every 1/rate seconds. Caller names come off the
    wire, so the buckets are bounded: a bucket that has refilled is the same as
    none and is dropped first; past ``max_callers`` the stalest go.
    """

    def __init__(self, rates: Mapping[str, float], max_callers: int = 100_000) -> None:
        for caller, rate in rates.items():   # (0 or less let one call through, then none)
            finite_number(f"quotas[{caller!r}]", rate, "calls per second")
        self.rates = dict(rates)
        self.max_callers = max_callers
        self._buckets: Dict[str, List[float]] = {}   # appkey -> [tokens, last refill]

    def take(self, caller: str) -> bool:
        """Take one call from ``caller``'s bucket; False when it is empty (refuse
        the call). A caller with no rate, nor a ``"*"`` one, is not limited."""
        rate = self.rates.get(caller, self.rates.get("*"))
        if rate is None:
            return True
        now = time.monotonic()
        capacity = max(rate, 1.0)
        bucket = self._buckets.get(caller)
        if bucket is None:
            if len(self._buckets) >= self.max_callers:
                self._prune(now)
            bucket = self._buckets[caller] = [capacity, now]
        bucket[0] = min(capacity, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if bucket[0] < 1.0:
            return False
        bucket[0] -= 1.0
        return True

    def _prune(self, now: float) -> None:
        """Drop the buckets that have refilled; if all are busy, the stalest half."""
        def refilled(item: Tuple[str, List[float]]) -> bool:
            caller, (tokens, last) = item
            rate = self.rates.get(caller, self.rates.get("*", 0.0))
            return tokens + (now - last) * rate >= max(rate, 1.0)

        self._buckets = {k: v for k, v in self._buckets.items() if not refilled((k, v))}
        if len(self._buckets) >= self.max_callers:   # all busy: forget the stalest half
            keep = sorted(self._buckets.items(), key=lambda kv: kv[1][1])[len(self._buckets) // 2:]
            self._buckets = dict(keep)
