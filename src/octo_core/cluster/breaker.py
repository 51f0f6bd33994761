"""Per-node circuit breakers and the retry budget."""
from __future__ import annotations

import enum
import inspect
import math
import random
import time
from typing import Any, Callable, Dict, Mapping, Optional

from octo_core.checks import count, finite_number, is_finite_number


class BreakerState(enum.Enum):
    """A circuit breaker's state: calls pass (closed), are refused (open), or a
    few probe the node (half-open)."""
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


# The states as globals: on Python 3.11 ``BreakerState.CLOSED`` goes through
# EnumType's __getattr__ hook, several times slower, and every call asks its breaker.
_CLOSED, _OPEN, _HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class _Window:
    """Counts per one-second bucket over the last ``seconds`` seconds: O(1) to add to."""

    __slots__ = ("size", "buckets", "second", "_current", "_start", "_end")

    def __init__(self, seconds: int, fields: int) -> None:
        self.size = max(1, seconds)
        self.buckets = [[0] * fields for _ in range(self.size)]
        self.second = 0
        # the current second's bucket, and when that second starts and ends (as floats:
        # a float compares with a float faster than with an int)
        self._current = self.buckets[0]
        self._start, self._end = 0.0, 1.0

    def slot(self, now: float) -> list:
        # Within the current second, two float compares: every call's path counts here
        # twice (budget, breaker), and int(now) and the modulo cost more than the rest.
        if self._start <= now < self._end:
            return self._current
        second = math.floor(now)   # (floor, not int: each bucket is one second, 0 too)
        if second != self.second:
            for past in range(max(self.second + 1, second - self.size + 1), second + 1):
                bucket = self.buckets[past % self.size]
                for i in range(len(bucket)):
                    bucket[i] = 0
            self.second = second
        self._current = self.buckets[second % self.size]
        self._start, self._end = float(second), second + 1.0
        return self._current

    def total(self, field: int) -> int:
        return sum(bucket[field] for bucket in self.buckets)

    def clear(self) -> None:
        for bucket in self.buckets:
            for i in range(len(bucket)):
                bucket[i] = 0


class CircuitBreaker:
    """Opens after ``consecutive_failures`` in a row, or when at least ``min_calls``
    calls in the last ``window`` seconds failed at ``error_rate`` or more.

    While open no call passes; after a jittered backoff (doubling from
    ``backoff_min`` to ``backoff_max`` on each failed probe) one probe call is let
    through (half-open): its success closes the breaker, its failure reopens it.
    ``ValueError`` for a setting out of range (an ``error_rate`` of 50 meant as
    per cent would never open it).
    """

    def __init__(self, *, consecutive_failures: int = 5, error_rate: float = 0.5,
                 min_calls: int = 20, window: int = 10, backoff_min: float = 1.0,
                 backoff_max: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 on_change: Optional[Callable[["CircuitBreaker"], None]] = None) -> None:
        count("consecutive_failures", consecutive_failures)
        count("min_calls", min_calls)
        if not (is_finite_number(error_rate) and error_rate <= 1):
            raise ValueError(f"error_rate is the share of calls failed, above 0 and at most 1, "
                             f"not {error_rate!r}")
        if not (is_finite_number(window) and float(window).is_integer()):   # (a bucket a second)
            raise ValueError(f"window must be a whole number of seconds, at least 1, "
                             f"not {window!r}")
        if finite_number("backoff_max", backoff_max) < finite_number("backoff_min", backoff_min):
            raise ValueError(f"backoff_max ({backoff_max!r}) is below backoff_min "
                             f"({backoff_min!r})")
        self.consecutive_failures = consecutive_failures
        self.error_rate = error_rate
        self.min_calls = min_calls
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._clock = clock
        self._on_change = on_change
        self.state = _CLOSED
        self._streak = 0
        self._window = _Window(int(window), 2)     # [calls, failures] per second
        self._backoff = 0.0
        self._reopen_at = 0.0
        self._probing = False
        # Times it has opened: a caller that notes it as its call goes, and finds it
        # changed when the call ends, holds old news (the node was judged since): the
        # cluster records no such outcome
        self.opened = 0

    def allows(self) -> bool:
        """May a call go through now? (Claims the half-open probe when it does.)"""
        if self.state is _CLOSED:
            return True
        if self.state is _OPEN and self._clock() >= self._reopen_at:
            self._set(_HALF_OPEN)
        if self.state is _HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def available(self) -> bool:
        """Would a call be allowed, without claiming the probe (for routing)?"""
        if self.state is _CLOSED:
            return True
        if self.state is _OPEN:
            return self._clock() >= self._reopen_at
        return not self._probing

    def release(self) -> None:
        """The half-open probe ended proving nothing (cancelled: it lost a hedge or
        fork race, its caller gave up): the breaker stays half-open and the next
        call probes, with no backoff added."""
        self._probing = False

    def record(self, ok: bool) -> None:
        """The outcome of a call that went through."""
        now = self._clock()
        if self.state is _HALF_OPEN:
            self._probing = False
            if ok:
                self._backoff = 0.0
                self._reset_window()
                self._set(_CLOSED)
            else:
                self._open(now)
            return
        bucket = self._window.slot(now)
        bucket[0] += 1
        if ok:
            self._streak = 0
            return       # a success never opens the breaker: nothing more to check
        bucket[1] += 1
        self._streak += 1
        if self.state is not _CLOSED:
            return
        if self._streak >= self.consecutive_failures:
            self._open(now)
            return
        calls = self._window.total(0)
        if calls >= self.min_calls and self._window.total(1) / calls >= self.error_rate:
            self._open(now)

    def _open(self, now: float) -> None:
        self.opened += 1
        self._backoff = min(self.backoff_max, max(self.backoff_min, self._backoff * 2))
        self._reopen_at = now + self._backoff * random.uniform(0.8, 1.2)
        self._reset_window()
        self._set(_OPEN)

    def _reset_window(self) -> None:
        self._window.clear()
        self._streak = 0

    def _set(self, state: BreakerState) -> None:
        if state is not self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(self)


#: The options ``AsyncClient(breaker={...})`` may give each node's ``CircuitBreaker``:
#: its own keywords, but ``on_change`` (the cluster's own).
BREAKER_OPTIONS = tuple(name for name in inspect.signature(CircuitBreaker).parameters
                        if name != "on_change")


def breaker_options(options: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """``options`` for the breakers of a cluster, checked now rather than at the first
    call that makes a breaker: ``TypeError`` naming an unknown one, ``ValueError`` for
    a value out of range."""
    checked = dict(options or {})
    unknown = sorted(set(checked) - set(BREAKER_OPTIONS))
    if unknown:
        raise TypeError(f"breaker has no option {', '.join(map(repr, unknown))} "
                        f"(its options: {', '.join(BREAKER_OPTIONS)})")
    CircuitBreaker(**checked)
    return checked


class RetryBudget:
    """Retries may add at most ``ratio`` of the recent requests, plus
    ``min_per_second`` each second, so failures never multiply load.
    """

    def __init__(self, ratio: float = 0.1, min_per_second: float = 10.0, window: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio = ratio
        self.min_per_second = min_per_second
        self._clock = clock
        self._window = _Window(int(window), 2)     # [requests, retries] per second

    def record_request(self) -> None:
        """Count one request (a first attempt): the base the retries are a share of."""
        self._window.slot(self._clock())[0] += 1

    def try_retry(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        bucket = self._window.slot(self._clock())
        window = self._window
        allowed = self.ratio * window.total(0) + self.min_per_second * window.size
        if window.total(1) >= allowed:
            return False
        bucket[1] += 1
        return True
