"""Plain-Python load balancers: the yardsticks of ``octo_core._lb``.

Each is the textbook form of its algorithm: nginx's O(n) loop for smooth round
robin, ``bisect`` over prefix sums, ``hashlib.md5`` for ketama, brpc's LALB
formulas over a list-based sum tree. They share the C code's PRNG (splitmix64,
Lemire's bounded draw) and weight units (thousandths), so with the same seed they
must pick the very same nodes. ``tests/test_lb.py`` checks that;
``benchmarks/bench_lb.py`` times them beside the C ones.
"""
from __future__ import annotations

import bisect
import collections
import hashlib
import itertools
import math
from typing import Callable, Deque, Iterable, List, Optional, Sequence, Tuple, Union

MASK64 = (1 << 64) - 1


class SplitMix64:
    """The PRNG of ``_lb``: splitmix64 with Lemire's bounded draw."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        """Uniform in [0, n): the high word of a 64x64-bit product."""
        return (self.next() * n) >> 64

    def uniform(self) -> float:
        return (self.next() >> 11) * (1.0 / 9007199254740992.0)


def llround(x: float) -> int:
    """C's llround for x >= 0: halves round away from zero (``round`` goes to even)."""
    whole = int(x)
    return whole + (x - whole >= 0.5)


def units(weight: float) -> int:
    """A weight in integer thousandths; a positive weight is at least 1."""
    return 0 if weight == 0 else max(1, llround(weight * 1000))


def _excluded(exclude: Optional[Iterable[int]], n: int) -> List[int]:
    return sorted({i for i in exclude or () if 0 <= i < n})


class WeightedRandomRef:
    """Prefix sums and ``bisect``; excluded intervals are cut out of the draw."""

    def __init__(self, weights: Sequence[float], seed: int = 0) -> None:
        self.rng = SplitMix64(seed)
        self.update(weights)

    def update(self, weights: Sequence[float]) -> None:
        self.w = [units(x) for x in weights]
        self.prefix = list(itertools.accumulate(self.w))

    def pick(self, exclude: Optional[Iterable[int]] = None) -> int:
        return self._draw(_excluded(exclude, len(self.w)))

    def _draw(self, excluded: List[int]) -> int:
        total = (self.prefix[-1] if self.prefix else 0) - sum(self.w[e] for e in excluded)
        if total <= 0:
            return -1
        r = self.rng.below(total)
        for e in excluded:  # ascending: each excluded interval at or before r shifts it
            if r < self.prefix[e] - self.w[e]:
                break
            r += self.w[e]
        return bisect.bisect_right(self.prefix, r)


class LeastRequestRef(WeightedRandomRef):
    """Two distinct weighted draws; the one with fewer in-flight calls per weight wins."""

    def __init__(self, weights: Sequence[float], seed: int = 0) -> None:
        self.inflight: List[int] = []
        super().__init__(weights, seed)

    def update(self, weights: Sequence[float], previous: Optional[Sequence[int]] = None) -> None:
        old = self.inflight
        super().update(weights)
        self.inflight = [old[p] if previous and p >= 0 else 0
                         for p in (previous or [-1] * len(self.w))]

    def pick(self, exclude: Optional[Iterable[int]] = None) -> int:
        excluded = _excluded(exclude, len(self.w))
        a = self._draw(excluded)
        if a < 0:
            return -1
        b = self._draw(sorted(excluded + [a]))
        if b >= 0 and self.inflight[b] * self.w[a] < self.inflight[a] * self.w[b]:
            return b
        return a

    def on_start(self, i: int) -> None:
        self.inflight[i] += 1

    def on_finish(self, i: int, latency_s: float = 0.0, ok: bool = True) -> None:
        self.inflight[i] = max(0, self.inflight[i] - 1)


class SmoothRoundRobinRef:
    """nginx's smooth weighted round robin, as its loop does it: O(n) per pick, the
    nodes visited from ``start`` (modulo their count) on."""

    def __init__(self, weights: Sequence[float], start: int = 0) -> None:
        self.w: List[int] = []
        self.current: List[int] = []
        self.start = start
        self.update(weights)

    def update(self, weights: Sequence[float], previous: Optional[Sequence[int]] = None) -> None:
        old = self.current
        self.w = [units(x) for x in weights]
        self.current = [old[p] if previous and p >= 0 else 0
                        for p in (previous or [-1] * len(self.w))]

    def pick(self, exclude: Optional[Iterable[int]] = None) -> int:
        skip = set(exclude or ())
        best, total, n = -1, 0, len(self.w)
        for i in [(self.start + k) % n for k in range(n)]:
            w = self.w[i]
            if w == 0 or i in skip:
                continue
            self.current[i] += w
            total += w
            if best < 0 or self.current[i] > self.current[best]:
                best = i
        if best >= 0:
            self.current[best] -= total
        return best


Key = Union[str, bytes]


def ketama_hash(data: bytes) -> int:
    """A key's place on the ring: the first 4 bytes of its md5, little-endian."""
    return int.from_bytes(hashlib.md5(data).digest()[:4], "little")


class KetamaRef:
    """libketama's continuum with ``hashlib.md5`` and ``bisect``."""

    def __init__(self, keys: Sequence[Key], weights: Optional[Sequence[float]] = None,
                 replicas: int = 160, seed: int = 0) -> None:
        self.rng = SplitMix64(seed)
        raw = [k.encode() if isinstance(k, str) else k for k in keys]
        n = len(raw)
        ws = [1.0] * n if weights is None else [float(w) for w in weights]
        total = sum(ws)
        ring: List[Tuple[int, bytes, int]] = []
        for i, (key, w) in enumerate(zip(raw, ws)):
            if w <= 0:
                continue
            for j in range(max(1, math.floor(w * (replicas // 4) * n / total))):
                digest = hashlib.md5(key + b"-%d" % j).digest()
                ring.extend((int.from_bytes(digest[4 * h:4 * h + 4], "little"), key, i)
                            for h in range(4))
        ring.sort()  # a point hashed by two nodes goes to the smaller key
        self.points = [point for point, _, _ in ring]
        self.owner = [i for _, _, i in ring]

    def pick_key(self, key: Key, exclude: Optional[Iterable[int]] = None) -> int:
        return self._walk(ketama_hash(key.encode() if isinstance(key, str) else key), exclude)

    def pick(self, exclude: Optional[Iterable[int]] = None) -> int:
        return self._walk(self.rng.next() >> 32, exclude)

    def _walk(self, h: int, exclude: Optional[Iterable[int]]) -> int:
        skip = set(exclude or ())
        if not set(self.owner) - skip:
            return -1
        k = bisect.bisect_left(self.points, h) % len(self.points)
        while self.owner[k] in skip:
            k = (k + 1) % len(self.points)
        return self.owner[k]


class _LalbNode:
    def __init__(self, window: int) -> None:
        self.base = 0.0
        self.calls: Deque[Tuple[int, int]] = collections.deque(maxlen=window)  # (end, latency) ns
        self.starts: List[int] = []  # in-flight start times, ascending
        self.raw = 0.0
        self.level = 0.0
        self.measured = False

    @property
    def latency_sum(self) -> int:
        return sum(latency for _, latency in self.calls)


class LocalityAwareRef:
    """brpc's LALB (docs/cn/lalb.md) as ``octo_core._lb.LocalityAware`` applies it."""

    def __init__(self, weights: Sequence[float], clock: Callable[[], float], seed: int = 0, *,
                 window: int = 128, punish_inflight_ratio: float = 1.5,
                 punish_error_ratio: float = 1.2, min_weight_ratio: float = 0.01,
                 quadratic_latency: bool = True) -> None:
        self.clock = clock
        self.rng = SplitMix64(seed)
        self.window = window
        self.punish_inflight = punish_inflight_ratio
        self.punish_error = punish_error_ratio
        self.min_ratio = min_weight_ratio
        self.quadratic = quadratic_latency
        self.nodes: List[_LalbNode] = []
        self.update(weights)

    def update(self, weights: Sequence[float], previous: Optional[Sequence[int]] = None) -> None:
        nodes = []
        for j, w in enumerate(weights):
            p = previous[j] if previous else -1
            node = self.nodes[p] if p >= 0 else _LalbNode(self.window)
            node.base = float(w)
            nodes.append(node)
        self.nodes = nodes
        self.m = 1
        while self.m < len(nodes):
            self.m *= 2
        self.d = [0.0] * (2 * self.m)
        self.u = [0.0] * (2 * self.m)
        self.base_total = 0.0
        for i, node in enumerate(nodes):
            self.base_total += node.base
            if node.measured:
                self.d[self.m + i] = node.base * node.level
            else:
                self.u[self.m + i] = node.base
        for v in range(self.m - 1, 0, -1):
            self.d[v] = self.d[2 * v] + self.d[2 * v + 1]
            self.u[v] = self.u[2 * v] + self.u[2 * v + 1]

    def now(self) -> int:
        return llround(self.clock() * 1e9)

    def mean(self) -> float:
        measured_base = self.base_total - self.u[1]
        return self.d[1] / measured_base if self.d[1] > 0 and measured_base > 0 else 1.0

    def weight(self, i: int) -> float:
        node = self.nodes[i]
        if node.measured and node.starts:
            self._punish(i, self.now(), self.mean())
        return self.d[self.m + i] + self.u[self.m + i] * self.mean()

    def pick(self, exclude: Optional[Iterable[int]] = None) -> int:
        if not self.nodes:
            return -1
        mean = self.mean()
        excluded = _excluded(exclude, len(self.nodes))
        saved = [(self.d[self.m + e], self.u[self.m + e]) for e in excluded]
        for e in excluded:
            self._set_leaf(e, 0.0, 0.0)
        now = None
        while True:
            total = self.d[1] + self.u[1] * mean
            if not total > 0:
                i = -1
                break
            i, offset = self._descend(self.rng.uniform() * total, mean)
            node = self.nodes[i]
            if not (node.measured and node.starts):
                break
            now = self.now() if now is None else now
            # a punished node stays picked if the point is still inside its weight
            if not self._punish(i, now, mean) or offset < self.d[self.m + i]:
                break
        for e, (d, u) in zip(excluded, saved):
            self._set_leaf(e, d, u)
        return i

    def on_start(self, i: int) -> None:
        bisect.insort_right(self.nodes[i].starts, self.now())

    def on_finish(self, i: int, latency_s: float, ok: bool = True) -> None:
        now = self.now()
        node = self.nodes[i]
        latency = max(llround(min(max(latency_s, 0.0), 86400.0) * 1e9), 1000)
        if node.starts:  # forget the in-flight start nearest to when this call began
            started = now - latency
            k = bisect.bisect_left(node.starts, started)
            if k == len(node.starts) or (k > 0 and started - node.starts[k - 1] < node.starts[k] - started):
                k -= 1
            del node.starts[k]
        if not ok:
            if node.calls:
                latency = max(latency, node.latency_sum // len(node.calls))
            latency = int(min(latency * self.punish_error, 86400e9))
        node.calls.append((now, latency))
        count = len(node.calls)
        if count >= 2:
            span = node.calls[-1][0] - node.calls[0][0]
            if span > 0:
                qps = (count - 1) * 1e9 / span
                avg = node.latency_sum / count * 1e-9
                node.raw = qps / (avg * avg if self.quadratic else avg)
                node.measured = True
        if node.measured:
            node.level = self._level(node, now, self.mean())
            self._set_leaf(i, node.base * node.level, 0.0)

    def _level(self, node: _LalbNode, now: int, mean: float) -> float:
        level = node.raw
        avg = node.latency_sum / len(node.calls)
        if node.starts:
            waited = float(now - node.starts[0])
            if waited > avg * self.punish_inflight:
                level *= avg / waited
        return max(level, self.min_ratio * mean)

    def _punish(self, i: int, now: int, mean: float) -> bool:
        node = self.nodes[i]
        level = self._level(node, now, mean)
        if level >= node.level:
            return False
        node.level = level
        self._set_leaf(i, node.base * level, 0.0)
        return True

    def _set_leaf(self, i: int, d: float, u: float) -> None:
        v = self.m + i
        self.d[v], self.u[v] = d, u
        v //= 2
        while v:
            self.d[v] = self.d[2 * v] + self.d[2 * v + 1]
            self.u[v] = self.u[2 * v] + self.u[2 * v + 1]
            v //= 2

    def _descend(self, r: float, mean: float) -> Tuple[int, float]:
        v = 1
        while v < self.m:
            left = 2 * v
            left_weight = self.d[left] + self.u[left] * mean
            if left_weight > 0 and (r < left_weight or
                                    self.d[left + 1] + self.u[left + 1] * mean <= 0):
                v = left
            else:
                r -= left_weight
                v = left + 1
        return v - self.m, r
