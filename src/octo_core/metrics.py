"""Per ``service.method`` call metrics: counts, refusals, errors by status, in-flight,
latency, and recent calls per second.

``calls`` counts every call that finished, ``refused`` those of them answered
without running (the server refused them: overload, quota, auth, an unknown
method, bad arguments, a deadline passed or a stop came before the handler
began). The latency histogram and its percentiles describe only the calls that
ran (answered or failed after running): refusals take no time, and counting them
at 0 s would pull p50 and p99 *down* under overload, just when they are read.
Every refusal is also in ``errors`` under its status. A client counts every call
it made as run: the latency is what its caller waited.

Latencies go into fixed log-spaced buckets (four per power of two, 1 µs to about
1 min), so recording is a bisect and percentiles are read from the buckets
(within one bucket's width, about 19 %). ``RecentRates`` turns the counts into
calls per second over the last seconds (heartbeat load info). ``prometheus_text``
renders the Prometheus exposition format.
"""
from __future__ import annotations

import bisect
import collections
import itertools
import threading
from typing import Deque, Dict, Iterable, List, Optional, Tuple

BOUNDS: Tuple[float, ...] = tuple(1e-6 * 2 ** (i / 4) for i in range(0, 4 * 26 + 1))
#: The ``le`` bounds of the Prometheus histogram, every other one of ``BOUNDS`` (a
#: factor of √2 apart): the same in every series and every scrape, as PromQL needs
#: (``sum by (le)`` over instances, ``histogram_quantile``, which interpolates
#: from the bound below: a bound left out would read as 0 s or as no calls).
_EXPOSED = range(0, len(BOUNDS), 2)


class MethodStats:
    """The metrics of one method on one side (``server`` or ``client``)."""

    __slots__ = ("errors", "refused", "in_flight", "buckets", "total_seconds")

    def __init__(self) -> None:
        self.errors: Dict[int, int] = collections.Counter()
        self.refused = 0
        self.in_flight = 0
        self.buckets = [0] * (len(BOUNDS) + 1)
        self.total_seconds = 0.0

    @property
    def ran(self) -> int:
        """Calls that ran and finished: each is counted in one latency bucket."""
        return sum(self.buckets)

    @property
    def calls(self) -> int:
        """Calls finished: those that ran and those refused without running."""
        return self.ran + self.refused

    def percentile(self, q: float) -> Optional[float]:
        """The latency below which a share ``q`` (0..1) of the calls that ran
        finished; None if none ran."""
        done = self.ran
        if not done:
            return None
        rank = q * done
        seen = 0
        for index, count in enumerate(self.buckets):
            seen += count
            if seen >= rank and count:
                return BOUNDS[min(index, len(BOUNDS) - 1)]
        return BOUNDS[-1]

    def plus(self, other: "MethodStats") -> "MethodStats":
        """New stats holding both these and ``other``'s calls (neither changes)."""
        total = MethodStats()
        total.errors.update(self.errors)
        total.errors.update(other.errors)
        total.refused = self.refused + other.refused
        total.in_flight = self.in_flight + other.in_flight
        total.buckets = [a + b for a, b in zip(self.buckets, other.buckets)]
        total.total_seconds = self.total_seconds + other.total_seconds
        return total

    def snapshot(self) -> dict:
        """This method's row of ``Metrics.stats``."""
        return {"calls": self.calls, "refused": self.refused, "errors": dict(self.errors),
                "in_flight": self.in_flight, "p50": self.percentile(0.50),
                "p90": self.percentile(0.90), "p99": self.percentile(0.99)}


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
        """A call began; returns the stats to pass to ``finished`` (or ``unrun``)."""
        try:
            stats = self._by_name[service][method]
        except KeyError:   # (a method's first call)
            stats = self._stats(service, method)
        stats.in_flight += 1
        return stats

    @staticmethod
    def finished(stats: MethodStats, seconds: float, status: int = 0) -> None:
        """A call that ``started`` ran and ended after ``seconds`` with OCTO
        ``status`` (0 = success)."""
        stats.in_flight -= 1
        if status:
            stats.errors[status] += 1
        stats.buckets[bisect.bisect_left(BOUNDS, seconds)] += 1
        stats.total_seconds += seconds

    @staticmethod
    def unrun(stats: MethodStats, status: int) -> None:
        """A call that ``started`` was refused with ``status`` before its handler
        ran (its deadline passed, or the server stopped, while it waited)."""
        stats.in_flight -= 1
        Metrics._count_refusal(stats, status)

    def forget_in_flight(self) -> None:
        """Count no call as running: those that were can never finish (a server's
        loop closed under them)."""
        for _, stats in self.items():
            stats.in_flight = 0

    def refused(self, service: str, method: str, status: int) -> None:
        """A call refused with ``status`` before it started."""
        self._count_refusal(self._stats(service, method), status)

    @staticmethod
    def _count_refusal(stats: MethodStats, status: int) -> None:
        """A refusal: counted by status, kept out of the latency histogram."""
        stats.refused += 1
        stats.errors[status] += 1

    def stats(self) -> Dict[str, dict]:
        """``{"Service.method": {calls, refused, errors, in_flight, p50, p90, p99}}``:
        ``calls`` counts the finished calls, ``refused`` included; ``errors``
        counts the failed ones (refusals too) by status; the percentiles (seconds)
        are those of the calls that ran, None if none did."""
        return {f"{s}.{m}": stats.snapshot() for (s, m), stats in sorted(self._methods.items())}

    def counts(self) -> Dict[str, int]:
        """``{"Service.method": calls}``: the finished calls so far, ``refused``
        included (what ``RecentRates`` differences)."""
        return {f"{s}.{m}": stats.calls for (s, m), stats in self.items()}

    def items(self) -> Iterable[Tuple[Tuple[str, str], MethodStats]]:
        """``((service, method), stats)`` pairs, a copy: safe while calls add methods."""
        return list(self._methods.items())


class RecentRates:
    """Calls per second of each method of ``metrics`` over about the last
    ``window`` seconds: heartbeat load info (``methodQpsMap``, PROTOCOL.md §3).

    A call's path gains nothing: a reading samples the cumulative counts
    (``Metrics.counts``) and takes the difference from the newest sample at
    least ``window`` old, else the oldest kept (at first, the one taken at
    creation). A sample within ``window / 8`` of the last kept one is not kept,
    so a few samples at most are held, however often it is read. Read less often
    than every ``window``, a rate is the average since the previous reading.
    Times are the caller's clock (``time.monotonic()``; a test's own).
    """

    def __init__(self, metrics: Metrics, now: float, window: float = 10.0) -> None:
        self.window = window
        self._metrics = metrics
        self._samples: Deque[Tuple[float, Dict[str, int]]] = collections.deque(
            [(now, metrics.counts())])

    def rates(self, now: float) -> Dict[str, float]:
        """``{"Service.method": calls per second}`` of the recent window, finished
        calls (refusals included) of every method called since the start."""
        counts = self._metrics.counts()
        since, base = self._base(now)
        elapsed = max(now - since, 1e-3)
        if now - self._samples[-1][0] >= self.window / 8:
            self._samples.append((now, counts))
        return {key: (count - base.get(key, 0)) / elapsed for key, count in counts.items()}

    def _base(self, now: float) -> Tuple[float, Dict[str, int]]:
        """The sample to count from: the newest at least ``window`` old (older
        ones are dropped), else the oldest."""
        samples = self._samples
        while len(samples) > 1 and now - samples[1][0] >= self.window:
            samples.popleft()
        return samples[0]


def _escape(value: str) -> str:
    """A Prometheus label value: backslash, double quote and line feed escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**values: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in values.items()) + "}"


def _rows(registries: Iterable[Metrics]) -> List[Tuple[str, Tuple[str, str], MethodStats]]:
    """``(side, (service, method), stats)``, each side and method once, in the
    order they first come."""
    merged: Dict[Tuple[str, Tuple[str, str]], MethodStats] = {}
    for registry in registries:
        for key, stats in registry.items():
            row = (registry.side, key)
            earlier = merged.get(row)
            merged[row] = stats if earlier is None else earlier.plus(stats)
    return [(side, key, stats) for (side, key), stats in merged.items()]


def prometheus_text(*registries: Metrics) -> str:
    """The Prometheus text exposition of these metrics: ``octo_calls_total``
    (finished calls, refusals included), ``octo_refused_total`` (of them, those
    refused before they ran), ``octo_errors_total`` (failed calls, refusals too,
    by status), ``octo_in_flight``, and the ``octo_latency_seconds`` histogram of
    the calls that ran (its ``_count`` is calls minus refused; its buckets, √2
    apart from 1 µs to about 67 s, the same in every series). Registries of
    one side that share a method (two clients of one service) are summed into
    its series: a series may appear only once."""
    rows = _rows(registries)
    lines: List[str] = []
    for family, what, value in (
            ("octo_calls_total", "Calls finished (refusals included), by side, service "
             "and method.", "calls"),
            ("octo_refused_total", "Calls refused before they ran (not in "
             "octo_latency_seconds).", "refused")):
        lines += [f"# HELP {family} {what}", f"# TYPE {family} counter"]
        for side, (service, method), stats in rows:
            labels = _labels(side=side, service=service, method=method)
            lines.append(f"{family}{labels} {getattr(stats, value)}")
    lines += ["# HELP octo_errors_total Failed calls (refusals included) by OCTO status code.",
              "# TYPE octo_errors_total counter"]
    for side, (service, method), stats in rows:
        for status, count in sorted(stats.errors.items()):
            # the code's digits (str() of an IntEnum member is its name before 3.11)
            labels = _labels(side=side, service=service, method=method, status=str(int(status)))
            lines.append(f"octo_errors_total{labels} {count}")
    lines += ["# HELP octo_in_flight Calls running now.", "# TYPE octo_in_flight gauge"]
    for side, (service, method), stats in rows:
        lines.append(f"octo_in_flight{_labels(side=side, service=service, method=method)} {stats.in_flight}")
    lines += ["# HELP octo_latency_seconds Latency of the calls that ran (refusals are not in it).",
              "# TYPE octo_latency_seconds histogram"]
    for side, (service, method), stats in rows:
        cumulative = list(itertools.accumulate(stats.buckets))
        bounds = [(f"{BOUNDS[index]:.9g}", cumulative[index]) for index in _EXPOSED]
        for le, count in bounds + [("+Inf", cumulative[-1])]:
            labels = _labels(side=side, service=service, method=method, le=le)
            lines.append(f"octo_latency_seconds_bucket{labels} {count}")
        labels = _labels(side=side, service=service, method=method)
        lines.append(f"octo_latency_seconds_sum{labels} {stats.total_seconds:.9g}")
        lines.append(f"octo_latency_seconds_count{labels} {cumulative[-1]}")
    return "\n".join(lines) + "\n"
