"""A simulated cluster: which balancer and fault policy keep latency and errors down.

Run with (about 3 s of CPU per row of 10^5 calls on the reference machine)::

    python benchmarks/bench_lb_sim.py                 # the full table, 10^5 requests a row
    python benchmarks/bench_lb_sim.py --requests 20000 --balancers random,lalb

``python -m pytest benchmarks/bench_lb_sim.py`` runs a small smoke version.

The model (all on virtual time, so it is fast and deterministic for a seed):

- 100 providers of weight 10. Each is a FIFO queue in front of ``--workers``
  workers (4): a call waits for a free worker, then takes a log-normal service
  time (median 10 ms, sigma 0.35). 10 % of the nodes are 5x slower. One other
  node answers half of its calls with an error (``RpcError``, status 3: the
  node refused the call, e.g. its queue was full), after the usual service time.
- Open-loop Poisson arrivals at ``--rate`` calls/s (5000: the fast nodes run at
  about 12 % of their capacity; a slow node given an equal share, at 63 %).
- Policies: ``failfast`` (breakers disabled: the raw picture),
  ``failfast+breaker`` and ``failover+breaker`` (``retries=2``, default
  breakers: 5 failures in a row, or >= 50 % of >= 20 calls in 10 s); on request,
  ``hedging+breaker`` (backup after 25 ms).
- Every call goes through the real ``octo_core.cluster.invoker.Cluster.invoke``
  (routing, balancer, breakers, retry budget, deadline) with a 1 s timeout and a
  fake ``send`` that books the call on the node's queue and sleeps until its
  answer (or the time left). A cancelled attempt keeps its worker busy: the
  server does not know the caller gave up.

Plumbing for virtual time: the event loop is ``cluster_helpers.VirtualTimeLoop``;
LALB gets ``clock=loop.time``; breakers and the retry budget get the same clock;
and, because ``Cluster._attempt`` measures each call's latency with
``time.perf_counter()`` (not the loop's clock), the ``time`` module seen by
``octo_core.cluster.invoker`` is replaced, for the run only, by one whose
``perf_counter`` is the virtual clock.

Reported per (balancer, policy): the caller-visible latency (arrival to answer,
retries included) p50 / p99 / p99.9, the caller-visible error rate, attempts
per call, and the share of attempts that went to the slow nodes and to the
failing node. Targets: LALB and least-request p99 at most 0.5x weighted
random's; failover + breaker at most 0.1 % errors visible to callers.

``--balancers ...,fewest-inflight`` adds a yardstick that is not in the product:
each pick scans every node for the fewest calls in flight. It shows what any
balancer steered by in-flight counts alone can reach in this model, least
request's two random choices included.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import heapq
import math
import os
import platform
import random
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
from cluster_helpers import CALLEE, VirtualTimeLoop, run_on  # noqa: E402

from octo_core.cluster import invoker as invoker_module  # noqa: E402
from octo_core.cluster.balancer import make_balancer  # noqa: E402
from octo_core.cluster.breaker import RetryBudget  # noqa: E402
from octo_core.cluster.invoker import Cluster  # noqa: E402
from octo_core.cluster.routing import Router  # noqa: E402
from octo_core.errors import CallTimeout, RpcError  # noqa: E402
from octo_core.registry.node import Node  # noqa: E402

BALANCERS = ("random", "roundrobin", "leastrequest", "lalb", "consistenthash")
#: Not in the product: what any balancer that looks only at calls in flight can
#: reach here (least-request's power of two choices included); see FewestInFlight.
FEWEST_IN_FLIGHT = "fewest-inflight"
NO_BREAKER = {"consecutive_failures": 10**9, "min_calls": 10**9}
POLICIES = {
    # name: (Cluster policy, breaker options (None: the defaults), other Cluster options)
    "failfast": ("failfast", NO_BREAKER, {}),
    "failfast+breaker": ("failfast", None, {}),
    "failover+breaker": ("failover", None, {}),
    "hedging+breaker": ("hedging", None, {"hedge_delay": 0.025}),
}
DEFAULT_POLICIES = ("failfast", "failfast+breaker", "failover+breaker")


@dataclasses.dataclass
class Scenario:
    nodes: int = 100
    slow_share: float = 0.10
    slow_factor: float = 5.0
    failing_error_rate: float = 0.5
    rate: float = 5000.0          # calls per second, Poisson
    requests: int = 100_000
    workers: int = 4              # calls one node serves at once
    median_ms: float = 10.0
    sigma: float = 0.35           # log-normal shape of the service time
    timeout: float = 1.0
    retries: int = 2
    hash_keys: int = 20_000       # distinct keys for consistenthash
    seed: int = 1


class SimNode:
    """One provider: ``workers`` workers behind a FIFO queue, on virtual time."""

    __slots__ = ("factor", "error_rate", "free", "attempts")

    def __init__(self, factor: float, error_rate: float, workers: int) -> None:
        self.factor = factor
        self.error_rate = error_rate
        self.free = [0.0] * workers          # a heap: when each worker is next free
        self.attempts = 0

    def book(self, now: float, service: float, draw: float) -> "tuple[float, bool]":
        """Queue a call arriving at ``now``: when its answer is ready, and whether it succeeds."""
        self.attempts += 1
        start = max(now, self.free[0])
        finish = start + service * self.factor
        heapq.heapreplace(self.free, finish)
        return finish, draw >= self.error_rate


class _VirtualPerfCounter:
    """Stands in for ``time`` inside ``octo_core.cluster.invoker`` during a run."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.perf_counter = loop.time


class FewestInFlight:
    """A yardstick, not a product balancer: every pick scans all nodes for the fewest
    calls in flight (ties at random). Least request's two random choices approximate
    this; no balancer steered by in-flight counts alone does better in this model.
    O(n) a pick, and it ignores weights (all equal here)."""

    learns = True

    def __init__(self) -> None:
        self._impl = self                    # the face bench_lb_sim seeds through
        self._rng = random.Random()
        self._nodes: List[Node] = []
        self._in_flight: Dict[str, int] = {}

    def seed(self, seed: int) -> None:
        self._rng.seed(seed)

    def update(self, nodes: Sequence[Node], weights: Sequence[float]) -> None:
        self._nodes = [node for node, weight in zip(nodes, weights) if weight > 0]

    def select(self, key: Optional[str] = None, exclude: Any = None) -> Optional[Node]:
        barred = {item if isinstance(item, str) else item.key for item in exclude or ()}
        loads = [(self._in_flight.get(node.key, 0), node) for node in self._nodes
                 if node.key not in barred]
        if not loads:
            return None
        fewest = min(load for load, _ in loads)
        return self._rng.choice([node for load, node in loads if load == fewest])

    def on_start(self, node: Node) -> None:
        self._in_flight[node.key] = self._in_flight.get(node.key, 0) + 1

    def on_finish(self, node: Node, latency_s: float, ok: bool) -> None:
        self._in_flight[node.key] -= 1


def _balancer_or_yardstick(name: str, **options: Any) -> Any:
    """``make_balancer`` as the invoker sees it during a run: it knows the yardstick too."""
    return FewestInFlight() if name == FEWEST_IN_FLIGHT else make_balancer(name, **options)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    k = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


async def _simulate(sc: Scenario, lb: str, policy: str) -> Dict[str, Any]:
    loop = asyncio.get_running_loop()
    rng = random.Random(f"{sc.seed}:{lb}:{policy}")
    random.seed(sc.seed)                                # breaker jitter
    mu = math.log(sc.median_ms / 1000.0)

    placement = random.Random(sc.seed)                  # same slow/failing nodes in every row
    order = list(range(sc.nodes))
    placement.shuffle(order)
    slow = set(order[:round(sc.nodes * sc.slow_share)])
    failing = order[round(sc.nodes * sc.slow_share)]
    nodes = [Node(appkey=CALLEE, ip=f"10.7.{i // 250}.{i % 250}", port=9000, weight=10)
             for i in range(sc.nodes)]
    sims = {n.key: SimNode(sc.slow_factor if i in slow else 1.0,
                           sc.failing_error_rate if i == failing else 0.0, sc.workers)
            for i, n in enumerate(nodes)}

    kind, breaker, options = POLICIES[policy]
    # hedging sends backups of idempotent calls only; the others keep failover's
    # rule (after a send, only refusals are retried)
    idempotent = kind == "hedging"
    breaker_options = dict(breaker or {}, clock=loop.time)
    cluster = Cluster(Router(), lb=lb, lb_options={"clock": loop.time} if lb == "lalb" else None,
                      policy=kind, retries=sc.retries, budget=RetryBudget(clock=loop.time),
                      breaker_options=breaker_options, **options)
    cluster.update(nodes)
    cluster.select({}, None, set())                     # create the balancer, then seed it
    for _, balancer in cluster._balancers.values():
        balancer._impl.seed(sc.seed)

    async def send(node: Node, remaining: float) -> None:
        now = loop.time()
        finish, ok = sims[node.key].book(now, rng.lognormvariate(mu, sc.sigma), rng.random())
        wait = finish - now
        if wait > remaining:
            await asyncio.sleep(remaining)
            raise CallTimeout(f"no reply within {remaining:.3f}s", node=node.key)
        await asyncio.sleep(wait)
        if not ok:
            raise RpcError("internal error: refused", node=node.key)

    latencies: List[float] = []
    errors = 0
    pending = sc.requests
    finished = loop.create_future()

    async def call(key: Optional[str]) -> None:
        nonlocal errors, pending
        arrived = loop.time()
        try:
            await cluster.invoke(send, timeout=sc.timeout, key=key, idempotent=idempotent)
        except Exception:  # noqa: BLE001 - any failure is what the caller sees
            errors += 1
        latencies.append(loop.time() - arrived)
        pending -= 1
        if not pending:
            finished.set_result(None)

    def arrive(key: Optional[str]) -> None:
        loop.create_task(call(key))

    at = loop.time()
    for _ in range(sc.requests):
        at += rng.expovariate(sc.rate)
        key = f"user-{rng.randrange(sc.hash_keys)}" if lb == "consistenthash" else None
        loop.call_at(at, arrive, key)
    await finished

    latencies.sort()
    attempts = sum(s.attempts for s in sims.values())
    return {
        "lb": lb, "policy": policy, "requests": sc.requests,
        "p50_ms": _percentile(latencies, 0.50) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
        "p999_ms": _percentile(latencies, 0.999) * 1000,
        "mean_ms": sum(latencies) / len(latencies) * 1000,
        "error_rate": errors / sc.requests,
        "attempts_per_call": attempts / sc.requests,
        "slow_share": sum(sims[nodes[i].key].attempts for i in slow) / attempts,
        "failing_share": sims[nodes[failing].key].attempts / attempts,
        "virtual_s": loop.time(),
    }


def simulate(sc: Scenario, lb: str, policy: str) -> Dict[str, Any]:
    """One row: ``lb`` under ``policy`` on a fresh virtual-time loop."""
    async def on_virtual_time() -> Dict[str, Any]:
        invoker_module.time = _VirtualPerfCounter(asyncio.get_running_loop())
        invoker_module.make_balancer = _balancer_or_yardstick
        return await _simulate(sc, lb, policy)

    saved = invoker_module.time
    started = time.perf_counter()
    try:
        row = run_on(VirtualTimeLoop, on_virtual_time())
    finally:
        invoker_module.time = saved
        invoker_module.make_balancer = make_balancer
    row["wall_s"] = time.perf_counter() - started
    return row


def table(rows: Sequence[Dict[str, Any]]) -> str:
    out = ["| balancer | policy | p50 ms | p99 ms | p99.9 ms | caller errors | attempts/call "
           "| to slow nodes | to failing node | wall s |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['lb']} | {r['policy']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                   f"{r['p999_ms']:.2f} | {r['error_rate']:.3%} | {r['attempts_per_call']:.4f} | "
                   f"{r['slow_share']:.2%} | {r['failing_share']:.2%} | {r['wall_s']:.1f} |")
    return "\n".join(out)


def verdicts(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """The targets, checked against the rows that exist."""
    by = {(r["lb"], r["policy"]): r for r in rows}
    out = []
    for policy in sorted({r["policy"] for r in rows}):
        base = by.get(("random", policy))
        if base is None:
            continue
        for lb in ("lalb", "leastrequest", FEWEST_IN_FLIGHT):
            r = by.get((lb, policy))
            if r is not None:
                ratio = r["p99_ms"] / base["p99_ms"]
                verdict = ("(a yardstick: no target)" if lb == FEWEST_IN_FLIGHT else
                           f"-> {'MET' if ratio <= 0.5 else 'NOT MET'} (target <= 0.5)")
                out.append(f"{lb} p99 / random p99 ({policy}): {ratio:.2f} {verdict}")
    for r in rows:
        if r["policy"] == "failover+breaker":
            out.append(f"{r['lb']} failover+breaker caller errors: {r['error_rate']:.3%} -> "
                       f"{'MET' if r['error_rate'] <= 0.001 else 'NOT MET'} (target <= 0.1 %)")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=Scenario.requests)
    parser.add_argument("--rate", type=float, default=Scenario.rate)
    parser.add_argument("--workers", type=int, default=Scenario.workers)
    parser.add_argument("--seed", type=int, default=Scenario.seed)
    parser.add_argument("--balancers", default=",".join(BALANCERS),
                        help=f"comma-separated, of {', '.join(BALANCERS)}, or {FEWEST_IN_FLIGHT} "
                             "(a yardstick, not in the product: each pick scans every node "
                             "for the fewest calls in flight)")
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                        help=f"comma-separated, of {', '.join(POLICIES)}")
    args = parser.parse_args(argv)
    sc = Scenario(requests=args.requests, rate=args.rate, workers=args.workers, seed=args.seed)
    print(f"# {sc}", flush=True)
    print(f"# python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs",
          flush=True)
    rows = []
    for policy in args.policies.split(","):
        for lb in args.balancers.split(","):
            rows.append(simulate(sc, lb, policy))
            r = rows[-1]
            print(f"# done {lb} {policy}: p99 {r['p99_ms']:.2f} ms, errors {r['error_rate']:.3%}, "
                  f"{r['wall_s']:.1f} s", file=sys.stderr, flush=True)
    print(table(rows))
    print()
    for line in verdicts(rows):
        print(f"- {line}")
    return 0


# --- a smoke run under pytest ------------------------------------------------------------

def test_sim_smoke() -> None:
    """A small run of every balancer and policy: it completes and its numbers are sane."""
    sc = Scenario(requests=3000, rate=2000.0)
    for policy in POLICIES:
        for lb in BALANCERS:
            row = simulate(sc, lb, policy)
            assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["p999_ms"] <= 1000 * sc.timeout + 1
            assert 0 <= row["error_rate"] < 0.05
            assert row["attempts_per_call"] >= 1.0
    yardstick = simulate(sc, FEWEST_IN_FLIGHT, "failfast")
    assert yardstick["slow_share"] < simulate(sc, "random", "failfast")["slow_share"]
    first = simulate(sc, "lalb", "failover+breaker")
    again = simulate(sc, "lalb", "failover+breaker")
    assert {k: v for k, v in first.items() if k != "wall_s"} == \
        {k: v for k, v in again.items() if k != "wall_s"}          # deterministic


if __name__ == "__main__":
    sys.exit(main())
