"""Per ``service.method`` call metrics: counts, errors by status, in-flight, latency.

Latencies go into fixed log-spaced buckets (four per power of two, 1 µs to about
1 min), so recording is a bisect and percentiles are read from the buckets
(within one bucket's width, about 19 %). ``prometheus_text`` renders the
Prometheus exposition format.
"""
from __future__ import annotations

import bisect
import collections
import threading
from typing import Dict, Iterable, List, Optional, Tuple

BOUNDS: Tuple[float, ...] = tuple(1e-6 * 2 ** (i / 4) for i in range(0, 4 * 26 + 1))


class MethodStats:
    """The metrics of one method on one side (``server`` or ``client``)."""

    __slots__ = ("errors", "in_flight", "buckets", "total_seconds")

    def __init__(self) -> None:
        self.errors: Dict[int, int] = collections.Counter()
        self.in_flight = 0
        self.buckets = [0] * (len(BOUNDS) + 1)
        self.total_seconds = 0.0

    @property
    def calls(self) -> int:
        """Calls finished: each is counted in one bucket (so ``finished`` counts no
        more: every call's path, both sides)."""
        return sum(self.buckets)

    def percentile(self, q: float) -> Optional[float]:
        """The latency below which a share ``q`` (0..1) of calls finished; None if no calls."""
        done = self.calls
        if not done:
            return None
        rank = q * done
        seen = 0
        for index, count in enumerate(self.buckets):
            seen += count
            if seen >= rank and count:
                return BOUNDS[min(index, len(BOUNDS) - 1)]
        return BOUNDS[-1]

    def snapshot(self) -> dict:
        return {"calls": self.calls, "errors": dict(self.errors), "in_flight": self.in_flight,
                "p50": self.percentile(0.50), "p90": self.percentile(0.90),
                "p99": self.percentile(0.99)}


class Metrics:
    """All methods' metrics for one server or client. Thread-safe."""

    def __init__(self, side: str) -> None:
        self.side = side
        self._methods: Dict[Tuple[str, str], MethodStats] = {}
        # the same stats by service, then method: what ``started`` looks up
        # without making and hashing a key tuple (every call's path, twice)
        self._by_name: Dict[str, Dict[str, MethodStats]] = {}
        self._lock = threading.Lock()

    def _stats(self, service: str, method: str) -> MethodStats:
        key = (service, method)
        stats = self._methods.get(key)
        if stats is None:
            with self._lock:
                stats = self._methods.setdefault(key, MethodStats())
                self._by_name.setdefault(service, {})[method] = stats
        return stats

    def started(self, service: str, method: str) -> MethodStats:
        """A call began; returns the stats to pass to ``finished``."""
        try:
            stats = self._by_name[service][method]
        except KeyError:   # (a method's first call)
            stats = self._stats(service, method)
        stats.in_flight += 1
        return stats

    @staticmethod
    def finished(stats: MethodStats, seconds: float, status: int = 0) -> None:
        """A call that ``started`` ended after ``seconds`` with OCTO ``status`` (0 = success)."""
        stats.in_flight -= 1
        if status:
            stats.errors[status] += 1
        stats.buckets[bisect.bisect_left(BOUNDS, seconds)] += 1
        stats.total_seconds += seconds

    @staticmethod
    def record(stats: MethodStats, seconds: float, status: int = 0) -> None:
        """A call that did not go through ``started`` (a refusal): counted as one
        that started and ended at once."""
        stats.in_flight += 1
        Metrics.finished(stats, seconds, status)

    def refused(self, service: str, method: str, status: int) -> None:
        """A call refused before it ran (no latency to speak of)."""
        self.record(self._stats(service, method), 0.0, status)

    def stats(self) -> Dict[str, dict]:
        """``{"Service.method": {calls, errors, in_flight, p50, p90, p99}}``."""
        return {f"{s}.{m}": stats.snapshot() for (s, m), stats in sorted(self._methods.items())}

    def qps_by_method(self, seconds: float) -> Dict[str, float]:
        """Calls per second over ``seconds``, from the counts (for heartbeat LoadInfo)."""
        return {f"{s}.{m}": stats.calls / seconds for (s, m), stats in self._methods.items()}

    def items(self) -> Iterable[Tuple[Tuple[str, str], MethodStats]]:
        return list(self._methods.items())


def _escape(value: str) -> str:
    """A Prometheus label value: backslash, double quote and line feed escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**values: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in values.items()) + "}"


def prometheus_text(*registries: Metrics) -> str:
    """The Prometheus text exposition of these metrics."""
    lines: List[str] = [
        "# HELP octo_calls_total Calls finished, by side, service and method.",
        "# TYPE octo_calls_total counter",
    ]
    rows = [(m.side, key, stats) for m in registries for key, stats in m.items()]
    for side, (service, method), stats in rows:
        lines.append(f"octo_calls_total{_labels(side=side, service=service, method=method)} {stats.calls}")
    lines += ["# HELP octo_errors_total Failed calls by OCTO status code.",
              "# TYPE octo_errors_total counter"]
    for side, (service, method), stats in rows:
        for status, count in sorted(stats.errors.items()):
            # the code's digits (str() of an IntEnum member is its name before 3.11)
            labels = _labels(side=side, service=service, method=method, status=str(int(status)))
            lines.append(f"octo_errors_total{labels} {count}")
    lines += ["# HELP octo_in_flight Calls running now.", "# TYPE octo_in_flight gauge"]
    for side, (service, method), stats in rows:
        lines.append(f"octo_in_flight{_labels(side=side, service=service, method=method)} {stats.in_flight}")
    lines += ["# HELP octo_latency_seconds Call latency.", "# TYPE octo_latency_seconds histogram"]
    for side, (service, method), stats in rows:
        cumulative = 0
        for bound, count in zip(BOUNDS + (float("inf"),), stats.buckets):
            cumulative += count
            if count or bound == float("inf"):
                le = "+Inf" if bound == float("inf") else f"{bound:.9g}"
                labels = _labels(side=side, service=service, method=method, le=le)
                lines.append(f"octo_latency_seconds_bucket{labels} {cumulative}")
        labels = _labels(side=side, service=service, method=method)
        lines.append(f"octo_latency_seconds_sum{labels} {stats.total_seconds:.9g}")
        lines.append(f"octo_latency_seconds_count{labels} {stats.calls}")
    return "\n".join(lines) + "\n"
