"""Per-node circuit breakers and the retry budget."""
from __future__ import annotations

import collections
import enum
import random
import time
from typing import Callable, Deque, Optional, Tuple


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Opens after ``consecutive_failures`` in a row, or when at least ``min_calls``
    calls in the last ``window`` seconds failed at ``error_rate`` or more.

    While open no call passes; after a jittered backoff (doubling from
    ``backoff_min`` to ``backoff_max`` on each failed probe) one probe call is let
    through (half-open): its success closes the breaker, its failure reopens it.
    """

    def __init__(self, *, consecutive_failures: int = 5, error_rate: float = 0.5,
                 min_calls: int = 20, window: float = 10.0, backoff_min: float = 1.0,
                 backoff_max: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 on_change: Optional[Callable[["CircuitBreaker"], None]] = None) -> None:
        self.consecutive_failures = consecutive_failures
        self.error_rate = error_rate
        self.min_calls = min_calls
        self.window = window
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._clock = clock
        self._on_change = on_change
        self.state = BreakerState.CLOSED
        self._streak = 0
        self._calls: Deque[Tuple[float, bool]] = collections.deque()
        self._failures = 0
        self._backoff = 0.0
        self._reopen_at = 0.0
        self._probing = False

    def allows(self) -> bool:
        """May a call go through now? (Claims the half-open probe when it does.)"""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and self._clock() >= self._reopen_at:
            self._set(BreakerState.HALF_OPEN)
        if self.state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def available(self) -> bool:
        """Would a call be allowed, without claiming the probe (for routing)?"""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            return self._clock() >= self._reopen_at
        return not self._probing

    def record(self, ok: bool) -> None:
        """The outcome of a call that went through."""
        now = self._clock()
        if self.state is BreakerState.HALF_OPEN:
            self._probing = False
            if ok:
                self._backoff = 0.0
                self._reset_window()
                self._set(BreakerState.CLOSED)
            else:
                self._open(now)
            return
        self._calls.append((now, ok))
        self._failures += not ok
        while self._calls and self._calls[0][0] < now - self.window:
            self._failures -= not self._calls.popleft()[1]
        self._streak = 0 if ok else self._streak + 1
        if self.state is BreakerState.CLOSED and (
                self._streak >= self.consecutive_failures
                or (len(self._calls) >= self.min_calls
                    and self._failures / len(self._calls) >= self.error_rate)):
            self._open(now)

    def _open(self, now: float) -> None:
        self._backoff = min(self.backoff_max, max(self.backoff_min, self._backoff * 2))
        self._reopen_at = now + self._backoff * random.uniform(0.8, 1.2)
        self._reset_window()
        self._set(BreakerState.OPEN)

    def _reset_window(self) -> None:
        self._calls.clear()
        self._failures = 0
        self._streak = 0

    def _set(self, state: BreakerState) -> None:
        if state is not self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(self)


class RetryBudget:
    """Retries may add at most ``ratio`` of the recent requests, plus
    ``min_per_second`` each second, so failures never multiply load.

    Counts live in one bucket per second over ``window`` seconds: constant memory.
    """

    def __init__(self, ratio: float = 0.1, min_per_second: float = 10.0, window: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self._clock = clock
        self._requests = [0] * window
        self._retries = [0] * window
        self._second = int(clock())

    def _advance(self) -> int:
        now = int(self._clock())
        if now != self._second:
            for second in range(max(self._second + 1, now - self.window + 1), now + 1):
                self._requests[second % self.window] = 0
                self._retries[second % self.window] = 0
            self._second = now
        return now % self.window

    def record_request(self) -> None:
        self._requests[self._advance()] += 1

    def try_retry(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        slot = self._advance()
        allowed = self.ratio * sum(self._requests) + self.min_per_second * self.window
        if sum(self._retries) >= allowed:
            return False
        self._retries[slot] += 1
        return True
