"""pytest-benchmark suite: the cost of one pick among 1000 nodes, per balancer.

Run with::

    python -m pytest benchmarks/bench_lb.py --benchmark-enable

(without ``--benchmark-enable`` every benchmark runs once, as a smoke test).
Each balancer is one group, timed three ways:

- ``c``: the ``octo_core._lb`` object's method, called directly;
- ``face``: ``Balancer.select`` of ``octo_core.cluster.balancer`` (index to ``Node``);
- ``python``: the plain-Python version of the same algorithm (``tests/lb_reference.py``).

Targets, Python call overhead included: 250 ns per pick for random, round robin,
least request and LALB; 500 ns for consistent hash (which hashes its key with md5).
``lalb-inflight`` has a call in flight on every node, so each pick also reads the
clock and applies the in-flight punishment of the node it lands on.
"""
from __future__ import annotations

import os
import random
import sys
import time
from typing import Any, Callable, Dict, Tuple

import pytest

from octo_core import _lb
from octo_core.cluster.balancer import Balancer, make_balancer
from octo_core.registry.node import Node

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
import lb_reference as ref  # noqa: E402

N = 1000
WEIGHTS = [random.Random(1).randint(1, 10) for _ in range(N)]
NODES = [Node(appkey="com.example.echo", ip=f"10.0.{i // 250}.{i % 250}", port=9000)
         for i in range(N)]
HASH_KEY = "user:20250101:order:42"
SEED = 42

Call = Tuple[Callable[..., Any], Tuple[Any, ...]]


def _feed(start: Callable[[int], None], finish: Callable[[int, float], None],
          in_flight: bool) -> None:
    """Three calls per node (different latencies per node), then maybe one left open."""
    for i in range(N):
        for latency in (0.001, 0.002, 0.0015):
            start(i)
            finish(i, latency * (1 + i % 7))
    if in_flight:
        for i in range(N):
            start(i)


def _c(kind: str) -> Call:
    if kind == "consistenthash":
        impl = _lb.ConsistentHash([node.key for node in NODES], WEIGHTS)
        return impl.pick_key, (HASH_KEY,)
    impl = {"random": _lb.WeightedRandom, "roundrobin": _lb.RoundRobin,
            "leastrequest": _lb.LeastRequest, "lalb": _lb.LocalityAware,
            "lalb-inflight": _lb.LocalityAware}[kind](WEIGHTS)
    impl.seed(SEED)
    if kind == "leastrequest":
        for i in range(0, N, 3):
            impl.on_start(i)
    if kind.startswith("lalb"):
        _feed(impl.on_start, lambda i, latency: impl.on_finish(i, latency, True),
              kind == "lalb-inflight")
    return impl.pick, ()


def _face(kind: str) -> Call:
    balancer: Balancer = make_balancer(kind.split("-")[0])
    balancer.update(NODES, WEIGHTS)
    balancer._impl.seed(SEED)
    if kind == "leastrequest":
        for node in NODES[::3]:
            balancer.on_start(node)
    if kind.startswith("lalb"):
        _feed(lambda i: balancer.on_start(NODES[i]),
              lambda i, latency: balancer.on_finish(NODES[i], latency, True),
              kind == "lalb-inflight")
    if kind == "consistenthash":
        return balancer.select, (HASH_KEY,)
    return balancer.select, ()


def _python(kind: str) -> Call:
    if kind == "consistenthash":
        model = ref.KetamaRef([node.key for node in NODES], WEIGHTS)
        return model.pick_key, (HASH_KEY,)
    if kind == "random":
        return ref.WeightedRandomRef(WEIGHTS, SEED).pick, ()
    if kind == "roundrobin":
        return ref.SmoothRoundRobinRef(WEIGHTS).pick, ()
    if kind == "leastrequest":
        model = ref.LeastRequestRef(WEIGHTS, SEED)
        for i in range(0, N, 3):
            model.on_start(i)
        return model.pick, ()
    lalb = ref.LocalityAwareRef(WEIGHTS, time.monotonic, SEED)
    _feed(lalb.on_start, lambda i, latency: lalb.on_finish(i, latency, True),
          kind == "lalb-inflight")
    return lalb.pick, ()


KINDS = ["random", "roundrobin", "leastrequest", "lalb", "lalb-inflight", "consistenthash"]
HOWS: Dict[str, Callable[[str], Call]] = {"c": _c, "face": _face, "python": _python}


@pytest.mark.parametrize("how", list(HOWS))
@pytest.mark.parametrize("kind", KINDS)
def test_pick(benchmark: Any, kind: str, how: str) -> None:
    """Time one pick among 1000 weighted nodes."""
    fn, args = HOWS[how](kind)
    benchmark.group = f"pick {kind} (1000 nodes)"
    result = benchmark(fn, *args)
    index = NODES.index(result) if how == "face" else result
    assert 0 <= index < N
