"""pytest-benchmark suite: routing + pick per call among 1000 nodes when nothing changed.

Run with::

    python -m pytest benchmarks/bench_routing.py --benchmark-enable

(without ``--benchmark-enable`` every benchmark runs once, as a smoke test).

What a call pays before it is sent, on an unchanged cluster of 1000 nodes
(some in a swimlane, some in a LiteSet cell, three IDCs, one route rule):

- ``route``: ``Router.route(tags)`` alone, a cache hit (untagged, swimlane
  tag, LiteSet tag);
- ``select``: ``Cluster.select(tags, key, tried)``: the route cache hit, the
  per-tag balancer lookup and the balancer's pick, for each balancer;
- ``cold``: for scale, ``Router.update`` + the first ``route`` (the whole six
  steps over 1000 nodes), which happens once per node-list change, for a caller
  with and without an IDC/region (the locality step dominates).

Target: ``select`` (route cache hit + pick) at most 2 µs per call.
"""
from __future__ import annotations

import os
import random
import sys
from typing import Any, Dict, List

import pytest

from octo_core.cluster.invoker import Cluster
from octo_core.cluster.routing import LITESET_KEY, SWIMLANE_KEY, Caller, RouteRule, Router
from octo_core.registry.node import Node

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
from cluster_helpers import CALLEE  # noqa: E402

N = 1000
SEED = 7
CALLER = Caller(appkey="com.example.bench.caller", ip="192.168.3.4", idc="gz1", region="south")
TAGS: Dict[str, Dict[str, str]] = {
    "untagged": {},
    "swimlane": {SWIMLANE_KEY: "blue"},
    "liteset": {LITESET_KEY: "lite-a"},
}
HASH_KEY = "user:20250101:order:42"
BALANCERS = ["random", "roundrobin", "leastrequest", "lalb", "consistenthash"]


def _nodes() -> List[Node]:
    """1000 nodes: 3 IDCs in 2 regions, 5 % in lane ``blue``, 5 % in cell ``lite-a``."""
    rng = random.Random(SEED)
    nodes = []
    for i in range(N):
        nodes.append(Node(appkey=CALLEE, ip=f"10.{i // 250}.{i % 250}.{i % 7}", port=9000,
                          weight=rng.randint(1, 10),
                          idc=("gz1", "gz2", "bj1")[i % 3], region="north" if i % 3 == 2 else "south",
                          swimlane="blue" if i % 20 == 1 else "",
                          cell="lite-a" if i % 20 == 2 else ""))
    return nodes


NODES = _nodes()
RULES = [RouteRule(id="canary", providers=("10.0.*:9000",), consumer_appkeys=("com.example.other",),
                   limit=True)]


def _router() -> Router:
    router = Router(CALLER)
    router.update(NODES, RULES)
    return router


def _cluster(lb: str) -> Cluster:
    cluster = Cluster(_router(), lb=lb)
    cluster.update(NODES, RULES)
    for tags in TAGS.values():
        cluster.select(tags, None, set())           # builds and feeds the balancers
    for _, balancer in cluster._balancers.values():
        balancer._impl.seed(SEED)
    return cluster


@pytest.mark.parametrize("tagging", list(TAGS))
def test_route(benchmark: Any, tagging: str) -> None:
    """``Router.route`` on a cache hit."""
    router = _router()
    tags = TAGS[tagging]
    first = router.route(tags)
    benchmark.group = "route: Router.route, cache hit (1000 nodes)"
    assert benchmark(router.route, tags) is first
    assert first.nodes


@pytest.mark.parametrize("tagging", ["untagged", "swimlane"])
@pytest.mark.parametrize("lb", BALANCERS)
def test_select(benchmark: Any, lb: str, tagging: str) -> None:
    """``Cluster.select``: route cache hit + balancer pick, nothing excluded."""
    cluster = _cluster(lb)
    tags = TAGS[tagging]
    key = HASH_KEY if lb == "consistenthash" else None
    tried: set = set()
    allowed = {n.key for n in cluster.router.route(tags).nodes}
    benchmark.group = f"select: Cluster.select (1000 nodes, {tagging})"
    node, _ = benchmark(cluster.select, tags, key, tried)
    assert node.key in allowed


def test_select_with_a_retry_exclusion(benchmark: Any) -> None:
    """A failover retry: one node already tried (exclusion path of the pick)."""
    cluster = _cluster("random")
    first, _ = cluster.select({}, None, set())
    tried = {first.key}
    benchmark.group = "select: Cluster.select (1000 nodes, untagged)"
    node, _ = benchmark(cluster.select, {}, None, tried)
    assert node.key != first.key


@pytest.mark.parametrize("locality", ["idc+region caller", "caller without locality"])
def test_cold_route(benchmark: Any, locality: str) -> None:
    """``Router.update`` + first ``route``: the six steps over 1000 nodes (once per change,
    and once a second per tag set while a node warms up)."""
    router = Router(CALLER if locality == "idc+region caller" else Caller(appkey=CALLER.appkey))

    def cold() -> Any:
        router.update(NODES, RULES)
        return router.route({})

    benchmark.group = "cold: Router.update + first route (1000 nodes)"
    assert benchmark(cold).nodes
