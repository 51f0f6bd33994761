"""The load balancers: ``octo_core._lb`` against the plain-Python references in
``lb_reference.py`` (same PRNG, so seeded picks must agree exactly), the
distributions they promise (chi-square), the LALB behaviours of brpc's
docs/cn/lalb.md, and the ``Node``-level face ``octo_core.cluster.balancer``.

No test measures time: LALB runs on a fake clock.
"""
from __future__ import annotations

import collections
import math
import random
from typing import Any, Callable, Dict, List, Sequence

import pytest

import lb_reference as ref
from octo_core import _lb
from octo_core.cluster.balancer import BALANCERS, make_balancer
from octo_core.registry.node import Node

#: Upper 0.1% points of the chi-square distribution, by degrees of freedom.
CHI2_P001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458,
             7: 24.322, 8: 26.124, 9: 27.877, 10: 29.588}


def assert_distribution(counts: Sequence[int], probabilities: Sequence[float]) -> None:
    """Pearson's chi-square goodness of fit at p = 0.001; impossible cells must stay empty."""
    total = sum(counts)
    assert all(c == 0 for c, p in zip(counts, probabilities) if p == 0), counts
    cells = [(c, p * total) for c, p in zip(counts, probabilities) if p > 0]
    statistic = sum((observed - expected) ** 2 / expected for observed, expected in cells)
    assert statistic < CHI2_P001[len(cells) - 1], (statistic, counts, probabilities)


def tally(pick: Callable[[], int], n: int, draws: int) -> List[int]:
    counts = [0] * n
    for _ in range(draws):
        counts[pick()] += 1
    return counts


def node_keys(n: int) -> List[str]:
    return [f"10.0.{i // 250}.{i % 250}:9000" for i in range(n)]


def build(kind: str, weights: Any) -> Any:
    """A C balancer of ``kind`` over ``weights`` (a list, or a node count)."""
    if kind == "consistenthash":
        n = weights if isinstance(weights, int) else len(weights)
        return _lb.ConsistentHash(node_keys(n), None if isinstance(weights, int) else weights)
    return {"random": _lb.WeightedRandom, "roundrobin": _lb.RoundRobin,
            "leastrequest": _lb.LeastRequest, "lalb": _lb.LocalityAware}[kind](weights)


KINDS = ["random", "roundrobin", "leastrequest", "lalb", "consistenthash"]


# --- what every balancer promises ------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_empty_picks_nothing(kind: str) -> None:
    lb = build(kind, [])
    assert len(lb) == 0
    assert lb.pick() == -1
    assert lb.pick(exclude={0}) == -1


@pytest.mark.parametrize("kind", KINDS)
def test_zero_weights_are_never_picked(kind: str) -> None:
    lb = build(kind, [0, 3, 0, 1, 0, 0.5])
    lb.seed(7)
    assert {lb.pick() for _ in range(3000)} == {1, 3, 5}
    assert build(kind, [0, 0, 0]).pick() == -1


@pytest.mark.parametrize("kind", KINDS)
def test_excluded_nodes_are_never_picked(kind: str) -> None:
    rng = random.Random(1)
    weights = [rng.choice([0, 1, 2.5, 7, 10]) for _ in range(9)]
    lb = build(kind, weights)
    lb.seed(3)
    for _ in range(3000):
        exclude = frozenset(rng.sample(range(9), rng.randint(0, 9)))
        chosen = lb.pick(exclude=exclude)
        allowed = {i for i, w in enumerate(weights) if w > 0} - exclude
        if allowed:
            assert chosen in allowed
        else:
            assert chosen == -1


@pytest.mark.parametrize("kind", KINDS)
def test_exclude_takes_any_iterable_ignoring_strangers(kind: str) -> None:
    lb = build(kind, 3)
    lb.seed(5)
    picks = {lb.pick(exclude=[0, 0, 7, -1]) for _ in range(200)}
    assert picks == {1, 2}
    assert lb.pick(exclude=iter(range(3))) == -1
    with pytest.raises(TypeError):
        lb.pick(exclude=["0"])
    assert lb.pick() in {0, 1, 2}  # a refused exclude set leaves nothing behind


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [[-1.0], [float("nan")], [float("inf")], [2e6], -1])
def test_bad_weights_are_refused(kind: str, bad: Any) -> None:
    if kind == "consistenthash" and bad == -1:
        with pytest.raises(ValueError):
            _lb.ConsistentHash(["a"], [-1.0])
        return
    with pytest.raises(ValueError):
        build(kind, bad)


@pytest.mark.parametrize("kind", ["random", "leastrequest", "lalb", "consistenthash"])
def test_seed_makes_picks_repeatable(kind: str) -> None:
    first, second = build(kind, [1, 2, 3, 4]), build(kind, [1, 2, 3, 4])
    first.seed(99)
    second.seed(99)
    assert [first.pick() for _ in range(500)] == [second.pick() for _ in range(500)]


# --- weighted random -------------------------------------------------------------------

def test_weighted_random_matches_reference() -> None:
    rng = random.Random(2)
    for seed in range(20):
        weights = [rng.choice([0, 0.5, 1, 3, 10, 250]) for _ in range(rng.randint(1, 40))]
        lb, model = _lb.WeightedRandom(weights), ref.WeightedRandomRef(weights, seed)
        lb.seed(seed)
        for _ in range(500):
            exclude = set(rng.sample(range(len(weights)), rng.randint(0, 3))) if rng.random() < 0.3 else None
            assert lb.pick(exclude) == model.pick(exclude)


def test_weighted_random_distribution() -> None:
    weights = [1, 2, 3, 4, 0, 10, 0.5]
    lb = _lb.WeightedRandom(weights)
    lb.seed(11)
    counts = tally(lb.pick, len(weights), 200_000)
    assert_distribution(counts, [w / sum(weights) for w in weights])


def test_weighted_random_distribution_with_exclusions() -> None:
    weights = [5, 1, 1, 3, 2]
    lb = _lb.WeightedRandom(weights)
    lb.seed(12)
    counts = tally(lambda: lb.pick({0, 3}), len(weights), 100_000)
    assert_distribution(counts, [0, 0.25, 0.25, 0, 0.5])


# --- least request (power of two choices) ----------------------------------------------

def test_least_request_matches_reference() -> None:
    rng = random.Random(3)
    for seed in range(10):
        weights = [rng.choice([0, 1, 2, 5, 10]) for _ in range(rng.randint(1, 25))]
        lb, model = _lb.LeastRequest(weights), ref.LeastRequestRef(weights, seed)
        lb.seed(seed)
        running: List[int] = []
        for _ in range(2000):
            if running and rng.random() < 0.45:
                i = running.pop(rng.randrange(len(running)))
                lb.on_finish(i, 0.01, True)
                model.on_finish(i)
                continue
            exclude = {rng.randrange(len(weights))} if rng.random() < 0.2 else None
            i = lb.pick(exclude)
            assert i == model.pick(exclude)
            if i >= 0:
                lb.on_start(i)
                model.on_start(i)
                running.append(i)
        assert [lb.inflight(i) for i in range(len(weights))] == model.inflight


def p2c_probabilities(weights: Sequence[float], inflight: Sequence[int]) -> List[float]:
    """Exact pick probabilities of weighted power of two choices (first draw wins ties)."""
    total = sum(weights)
    out = [0.0] * len(weights)
    for a, wa in enumerate(weights):
        for b, wb in enumerate(weights):
            if a == b or wa == 0 or wb == 0:
                continue
            winner = b if inflight[b] * wa < inflight[a] * wb else a
            out[winner] += wa / total * wb / (total - wa)
    return out


def test_least_request_distribution() -> None:
    weights, inflight = [1, 2, 3, 4, 2], [3, 0, 1, 2, 1]
    lb = _lb.LeastRequest(weights)
    lb.seed(13)
    for i, calls in enumerate(inflight):
        for _ in range(calls):
            lb.on_start(i)
    counts = tally(lb.pick, len(weights), 100_000)
    assert_distribution(counts, p2c_probabilities(weights, inflight))


def test_least_request_idle_distribution_is_weighted_random() -> None:
    weights = [1, 2, 3, 4]
    lb = _lb.LeastRequest(weights)
    lb.seed(14)
    assert_distribution(tally(lb.pick, 4, 100_000), [w / 10 for w in weights])


def test_least_request_never_picks_the_busiest_of_equals() -> None:
    lb = _lb.LeastRequest([1, 1, 1, 1])
    for _ in range(5):
        lb.on_start(2)
    assert 2 not in {lb.pick() for _ in range(2000)}
    assert lb.pick(exclude={0, 1, 3}) == 2  # alone, it is the only choice


def test_least_request_counts_survive_update() -> None:
    lb = _lb.LeastRequest([1, 1, 1])
    lb.on_start(2)
    lb.on_start(2)
    lb.on_finish(0)  # a finish without a start does not go below zero
    lb.update([1, 1, 1, 1], previous=[2, -1, 0, None])
    assert [lb.inflight(i) for i in range(4)] == [2, 0, 0, 0]
    with pytest.raises(ValueError):
        lb.update([1, 1], previous=[0, 0])
    with pytest.raises(IndexError):
        lb.on_start(4)


# --- smooth weighted round robin --------------------------------------------------------

def test_round_robin_5_1_1() -> None:
    lb = _lb.RoundRobin([5, 1, 1], start=0)
    assert "".join("ABC"[lb.pick()] for _ in range(21)) == "AABACAA" * 3
    with pytest.raises(TypeError):
        lb.pick(exclude=[None])
    assert "".join("ABC"[lb.pick()] for _ in range(7)) == "AABACAA"  # no step was lost


def test_round_robin_equal_weights_take_turns() -> None:
    lb = _lb.RoundRobin([10] * 7, start=0)
    assert [lb.pick() for _ in range(21)] == list(range(7)) * 3
    lb = _lb.RoundRobin([10] * 7, start=12)     # counted modulo the 7 nodes
    assert [lb.pick() for _ in range(14)] == [5, 6, 0, 1, 2, 3, 4] * 2


def test_round_robin_clients_start_apart() -> None:
    """Without ``start``, each balancer begins its turns at a node of its own: clients
    that start together do not all call node 0 first and walk the nodes in step."""
    firsts = {_lb.RoundRobin([1] * 10).pick() for _ in range(60)}
    assert len(firsts) > 1      # all 60 at one node: odds of 10**-59 if drawn at random
    lb = _lb.RoundRobin([1] * 10)
    first = lb.pick()
    assert [lb.pick() for _ in range(9)] == [(first + k) % 10 for k in range(1, 10)]
    seeded = [_lb.RoundRobin([3, 1, 2, 1, 1, 2, 1, 1, 1, 1]) for _ in range(2)]
    seeded[0].pick()
    for lb in seeded:
        lb.seed(7)          # the turns begin anew, a drawn start drawn again: reproducible
    assert [seeded[0].pick() for _ in range(10)] == [seeded[1].pick() for _ in range(10)]
    given = _lb.RoundRobin([1] * 10, start=4)
    given.seed(7)           # a given start stays
    assert given.pick() == 4
    with pytest.raises(ValueError):
        _lb.RoundRobin([1, 1], start=-1)


def test_round_robin_matches_nginx_loop() -> None:
    rng = random.Random(4)
    for _ in range(40):
        n = rng.randint(1, 33)
        weights = [rng.choice([0, 1, 1, 2, 3, 5, 8, 13, 0.25, 2.5]) for _ in range(n)]
        start = rng.randrange(2 * n)
        lb, model = _lb.RoundRobin(weights, start), ref.SmoothRoundRobinRef(weights, start)
        for _ in range(1500):
            exclude = set(rng.sample(range(n), rng.randint(1, n))) if rng.random() < 0.2 else None
            assert lb.pick(exclude) == model.pick(exclude)


def test_round_robin_keeps_its_place_across_updates() -> None:
    rng = random.Random(5)
    weights = [3, 1, 4, 1, 5]
    lb, model = _lb.RoundRobin(weights, 3), ref.SmoothRoundRobinRef(weights, 3)
    for _ in range(30):
        for _ in range(rng.randint(0, 40)):
            assert lb.pick() == model.pick()
        n_old, n = len(weights), rng.randint(1, 8)
        previous = [-1] * n
        for new, old in zip(rng.sample(range(n), min(n, n_old)), rng.sample(range(n_old), min(n, n_old))):
            previous[new] = old
        weights = [rng.choice([0, 1, 2, 6, 9]) for _ in range(n)]
        lb.update(weights, previous)
        model.update(weights, previous)


def test_round_robin_long_run() -> None:
    """Past the rebase of its lines (every 2^16 picks) it still matches nginx."""
    weights = [7, 3, 0, 11, 2, 2, 5]
    lb, model = _lb.RoundRobin(weights, 0), ref.SmoothRoundRobinRef(weights)
    for step in range(140_000):
        exclude = {step % 5} if step % 17 == 0 else None
        assert lb.pick(exclude) == model.pick(exclude)


# --- consistent hash (ketama) -----------------------------------------------------------

def random_keys(rng: random.Random, count: int) -> List[Any]:
    """str and bytes keys of 0..200 bytes: md5 tails of one and two blocks, many blocks."""
    keys: List[Any] = []
    for _ in range(count):
        size = rng.choice([0, 1, 8, 55, 56, 63, 64, 65, 119, 120, 200, rng.randint(0, 200)])
        if rng.random() < 0.5:
            keys.append(bytes(rng.getrandbits(8) for _ in range(size)))
        else:
            keys.append("".join(rng.choice("abcxyz:/-_é中0123456789") for _ in range(size)))
    return keys


def test_consistent_hash_matches_ketama() -> None:
    rng = random.Random(6)
    keys = node_keys(40)
    weights = [rng.choice([0, 1, 1, 2, 0.5, 10]) for _ in keys]
    for replicas in (160, 4, 100):
        lb = _lb.ConsistentHash(keys, weights, replicas=replicas)
        model = ref.KetamaRef(keys, weights, replicas)
        for key in random_keys(rng, 4000):
            assert lb.pick_key(key) == model.pick_key(key), key


def test_consistent_hash_unweighted_is_classic_ketama() -> None:
    keys = ["192.168.1.101:11210", "192.168.1.102:11210", "192.168.1.103:11210"]
    lb, model = _lb.ConsistentHash(keys), ref.KetamaRef(keys)
    assert len(model.points) == 3 * 160
    for i in range(3000):
        assert lb.pick_key(f"user:{i}") == model.pick_key(f"user:{i}")


def moved_keys(weights: Sequence[float], gone: int, keys: Sequence[Any]) -> tuple:
    """Ring before and after node ``gone`` leaves: (its keys, other keys that moved)."""
    names = node_keys(len(weights))
    left = names[:gone] + names[gone + 1:]
    before = _lb.ConsistentHash(names, weights)
    after = _lb.ConsistentHash(left, list(weights[:gone]) + list(weights[gone + 1:]))
    owners = [(names[before.pick_key(k)], left[after.pick_key(k)]) for k in keys]
    return (sum(old == names[gone] for old, _ in owners),
            sum(old != names[gone] and new != old for old, new in owners))


def test_consistent_hash_removing_a_node_moves_only_its_keys() -> None:
    keys = random_keys(random.Random(7), 5000)
    ours, others = moved_keys([1] * 25, 11, keys)
    assert ours > 0 and others == 0


def test_consistent_hash_weighted_removal_moves_few_other_keys() -> None:
    """ketama sizes a node by weight / mean weight: when a node leaves, the mean moves
    and the others gain or lose a digest or two, taking a few keys along."""
    rng = random.Random(8)
    weights = [rng.choice([1, 2, 3]) for _ in range(25)]
    keys = random_keys(rng, 5000)
    ours, others = moved_keys(weights, 11, keys)
    assert ours > 0 and others < 0.03 * len(keys)


def test_consistent_hash_ring_collisions_go_to_the_smaller_key() -> None:
    """Equal points are ordered by node key, not by index: reordering changes nothing."""
    keys = node_keys(30)
    forward, backward = _lb.ConsistentHash(keys), _lb.ConsistentHash(keys[::-1])
    for i in range(3000):
        assert keys[forward.pick_key(b"k%d" % i)] == keys[::-1][backward.pick_key(b"k%d" % i)]


def test_consistent_hash_exclude_walks_on() -> None:
    rng = random.Random(8)
    keys = node_keys(12)
    lb, model = _lb.ConsistentHash(keys), ref.KetamaRef(keys)
    for key in random_keys(rng, 2000):
        exclude = set(rng.sample(range(12), rng.randint(1, 11)))
        assert lb.pick_key(key, exclude) == model.pick_key(key, exclude)


def test_consistent_hash_keyless_pick_matches_reference() -> None:
    keys = node_keys(10)
    lb, model = _lb.ConsistentHash(keys, [1, 2] * 5), ref.KetamaRef(keys, [1, 2] * 5, seed=21)
    lb.seed(21)
    assert [lb.pick() for _ in range(2000)] == [model.pick() for _ in range(2000)]


def test_consistent_hash_refuses_other_key_types() -> None:
    lb = _lb.ConsistentHash(["a:1"])
    with pytest.raises(TypeError):
        lb.pick_key(42)
    with pytest.raises(ValueError):
        _lb.ConsistentHash(["a:1"], replicas=2)
    with pytest.raises(ValueError):
        _lb.ConsistentHash(["a:1", "b:2"], [1.0])
    ring = _lb.ConsistentHash(["a:1", "b:2"])
    for reference in (0.0, -1.0, math.nan, math.inf, 1e-5):   # (1e-5: below a weight)
        with pytest.raises(ValueError, match="reference weight"):
            ring.update(["a:1", "b:2"], [1.0, 2.0], reference)
    ring.update(["a:1", "b:2"], [1.0, 2.0], 2.0)


# --- locality-aware (LALB) --------------------------------------------------------------

class FakeClock:
    """A monotonic clock the test moves by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lalb(weights: Any, clock: FakeClock, seed: int = 0, **options: Any) -> _lb.LocalityAware:
    lb = _lb.LocalityAware(weights, clock=clock, **options)
    lb.seed(seed)
    return lb


def run_calls(lb: Any, clock: FakeClock, latency: Callable[[int], float], calls: int,
              ok: Callable[[int], bool] = lambda i: True) -> List[int]:
    """One call at a time through ``lb``; returns how often each node was picked."""
    counts: Dict[int, int] = collections.Counter()
    for _ in range(calls):
        i = lb.pick()
        lb.on_start(i)
        clock.now += latency(i)
        lb.on_finish(i, latency(i), ok(i))
        counts[i] += 1
    return [counts[i] for i in range(len(lb))]


def test_lalb_slow_node_gets_a_smaller_share() -> None:
    clock = FakeClock()
    lb = lalb(4, clock)
    latencies = [0.001, 0.001, 0.001, 0.010]
    run_calls(lb, clock, latencies.__getitem__, 2000)
    counts = run_calls(lb, clock, latencies.__getitem__, 4000)
    assert counts[3] < min(counts[:3]) / 10
    assert counts[3] > 0  # the minimum weight keeps it probed
    mean = sum(lb.weight(i) for i in range(4)) / 4
    assert lb.weight(3) >= 0.01 * mean * (1 - 1e-9)


def test_lalb_erroring_node_gets_a_smaller_share() -> None:
    clock = FakeClock()
    lb = lalb(4, clock, seed=1)
    counts = run_calls(lb, clock, lambda i: 0.002, 6000, ok=lambda i: i != 1)
    assert counts[1] < min(counts[0], counts[2], counts[3]) / 3


def test_lalb_half_failing_node_weighs_less_than_its_twins() -> None:
    """Same feedback but every other call failed: its charged latency is higher."""
    clock = FakeClock()
    lb = lalb(2, clock)
    for call in range(200):
        for i in (0, 1):
            lb.on_start(i)
            clock.now += 0.001
            lb.on_finish(i, 0.001, ok=(i == 0 or call % 2 == 0))
    assert lb.weight(1) < lb.weight(0) / 1.1


def test_lalb_new_node_starts_at_the_average() -> None:
    clock = FakeClock()
    lb = lalb([2, 2, 2], clock)
    assert [lb.weight(i) for i in range(3)] == [2.0, 2.0, 2.0]  # nothing measured yet
    run_calls(lb, clock, lambda i: 0.001 * (i + 1), 600)
    weights = [lb.weight(i) for i in range(3)]
    assert len(set(weights)) == 3
    lb.update([2, 2, 2, 2, 4], previous=[0, 1, 2, -1, -1])
    assert [lb.weight(i) for i in range(3)] == weights
    assert lb.weight(3) == pytest.approx(sum(weights) / 3, rel=1e-12)
    assert lb.weight(4) == pytest.approx(2 * sum(weights) / 3, rel=1e-12)  # twice the base


def test_lalb_unmeasured_node_weighs_the_mean_of_the_measured() -> None:
    clock = FakeClock()
    lb = lalb([1, 1, 1], clock)
    for latency in (0.001, 0.002, 0.003):
        for i in (0, 1):
            lb.on_start(i)
            clock.now += latency * (i + 1)
            lb.on_finish(i, latency * (i + 1), True)
    measured = [lb.weight(0), lb.weight(1)]
    assert lb.weight(2) == pytest.approx(sum(measured) / 2, rel=1e-12)


def test_lalb_base_weight_scales_the_weight() -> None:
    clock = FakeClock()
    lb = lalb([1, 3], clock)
    for _ in range(50):
        for i in (0, 1):
            lb.on_start(i)
            clock.now += 0.004
            lb.on_finish(i, 0.004, True)
    assert lb.weight(1) == pytest.approx(3 * lb.weight(0), rel=1e-9)


def test_lalb_inflight_punishment() -> None:
    clock = FakeClock()
    lb = lalb(3, clock)
    run_calls(lb, clock, lambda i: 0.001, 600)
    before = lb.weight(0)
    lb.on_start(0)
    clock.now += 0.0012  # within punish_inflight_ratio (1.5) of the 1 ms average
    assert lb.weight(0) == before
    clock.now += 0.0088  # the oldest call has now waited 10 ms, ten times the average
    assert lb.weight(0) == pytest.approx(before * 0.1, rel=1e-12)
    # picks draw by the punished weights while the call is out
    weights = [lb.weight(i) for i in range(3)]
    assert_distribution(tally(lb.pick, 3, 3000), [w / sum(weights) for w in weights])
    lb.on_finish(0, 0.010, True)
    assert lb.inflight(0) == 0


def test_lalb_a_pick_punishes_a_stuck_node() -> None:
    """The punishment is applied by the pick that lands on the node, without feedback."""
    clock = FakeClock()
    lb = lalb(2, clock)
    run_calls(lb, clock, lambda i: 0.001, 400)
    lb.on_start(1)
    clock.now += 1.0  # a thousand average latencies
    counts = tally(lb.pick, 2, 2000)
    assert counts[1] < 60


def test_lalb_update_keeps_measures_by_previous_index() -> None:
    clock = FakeClock()
    lb = lalb(3, clock)
    run_calls(lb, clock, lambda i: 0.001 * (i + 1), 900)
    weights = [lb.weight(i) for i in range(3)]
    lb.update([1, 1, 1], previous=[2, 0, 1])
    assert [lb.weight(i) for i in range(3)] == pytest.approx([weights[2], weights[0], weights[1]])
    lb.update([1, 0, 1], previous=[0, 1, 2])
    assert lb.weight(1) == 0.0
    assert 1 not in {lb.pick() for _ in range(1000)}


def test_lalb_matches_reference() -> None:
    """Random calls, failures, stuck calls, exclusions and node changes: the C
    balancer and the Python one pick the same nodes and agree on every weight."""
    rng = random.Random(9)
    for seed in range(6):
        clock = FakeClock()
        speed = [rng.choice([0.0005, 0.001, 0.004, 0.02]) for _ in range(12)]
        weights = [rng.choice([0, 1, 2, 10]) for _ in range(8)]
        options = dict(window=rng.choice([2, 16, 128]), quadratic_latency=rng.random() < 0.7)
        lb = lalb(weights, clock, seed, **options)
        model = ref.LocalityAwareRef(weights, clock, seed, **options)
        nodes = list(range(8))  # which "server" (speed) each index is
        running: List[tuple] = []
        for step in range(3000):
            action = rng.random()
            if running and action < 0.45:
                i, started, _ = running.pop(rng.randrange(len(running)))
                latency = clock.now - started
                ok = rng.random() > 0.1
                lb.on_finish(i, latency, ok)
                model.on_finish(i, latency, ok)
            elif action < 0.97:
                exclude = {rng.randrange(len(nodes))} if rng.random() < 0.1 else None
                i = lb.pick(exclude)
                assert i == model.pick(exclude), step
                if i >= 0:
                    lb.on_start(i)
                    model.on_start(i)
                    running.append((i, clock.now, nodes[i]))
            elif not running:
                keep = sorted(rng.sample(range(len(nodes)), rng.randint(1, len(nodes))))
                previous = keep + [-1] * rng.randint(0, 2)
                rng.shuffle(previous)
                nodes = [nodes[p] if p >= 0 else rng.randrange(12) for p in previous]
                weights = [rng.choice([0, 1, 2, 10]) for _ in previous]
                lb.update(weights, previous)
                model.update(weights, previous)
            clock.now += speed[running[-1][2]] * rng.random() if running else 0.0001
            if rng.random() < 0.01:
                clock.now += 0.05  # now and then a call looks stuck
        for i in range(len(nodes)):
            assert lb.weight(i) == pytest.approx(model.weight(i), rel=1e-12)


def test_lalb_error_punishment_is_charged_a_day_at_most() -> None:
    # latency * punish_error_ratio overflowed int64: the window's sum wrapped to 0,
    # the weights went inf and NaN, and a pick descended into the tree's padding and
    # read past the nodes (ASan: heap-buffer-overflow in LocalityAware._pick)
    clock = FakeClock()
    lb = lalb([1.0] * 3, clock, window=2, punish_error_ratio=1e300, quadratic_latency=False)
    clock.now += 1.0
    lb.on_finish(0, 0.2, False)
    clock.now += 1.0
    lb.on_finish(0, 0.001, False)
    assert all(0 <= lb.pick() < 3 for _ in range(100))
    assert all(math.isfinite(lb.weight(i)) and lb.weight(i) > 0 for i in range(3))


def test_lalb_options_are_checked() -> None:
    for options in (dict(window=1), dict(punish_inflight_ratio=0), dict(punish_error_ratio=0.5),
                    dict(min_weight_ratio=0), dict(min_weight_ratio=2)):
        with pytest.raises(ValueError):
            _lb.LocalityAware(2, **options)
    with pytest.raises(IndexError):
        _lb.LocalityAware(2).on_finish(2, 0.1, True)


# --- the Node face ----------------------------------------------------------------------

def make_nodes(n: int, **fields: Any) -> List[Node]:
    return [Node(appkey="com.example.echo", ip=f"10.1.0.{i}", port=9000, **fields) for i in range(n)]


@pytest.mark.parametrize("name", BALANCERS)
def test_face_selects_nodes(name: str) -> None:
    balancer = make_balancer(name)
    assert balancer.name == name
    assert balancer.select() is None  # before any update
    nodes = make_nodes(4)
    balancer.update(nodes, [1, 1, 0, 1])
    chosen = {balancer.select(key=f"k{i}").key for i in range(400)}
    assert chosen <= {nodes[0].key, nodes[1].key, nodes[3].key}
    assert balancer.select(exclude={nodes[0].key, nodes[1].key}) is nodes[3]
    assert balancer.select(exclude=[nodes[0], nodes[1], nodes[3], "10.9.9.9:1"]) is None
    for node in nodes:
        balancer.on_start(node)
        balancer.on_finish(node, 0.001, True)


@pytest.mark.parametrize("cls", [_lb.WeightedRandom, _lb.RoundRobin, _lb.LeastRequest,
                                 _lb.LocalityAware])
def test_bound_objects_must_match_the_indices(cls: Any) -> None:
    lb = cls([1, 1])
    with pytest.raises(ValueError, match="bound to 2 indices"):
        lb.bind(["a"], {"a": 0})
    lb.bind(["a", "b"], {"a": 0, "b": 1})
    assert lb.select(exclude=["a"]) == "b"
    assert lb.select(exclude=["a", "b", "not bound"]) is None


@pytest.mark.parametrize("cls", [_lb.WeightedRandom, _lb.RoundRobin, _lb.LeastRequest,
                                 _lb.LocalityAware, _lb.ConsistentHash])
def test_select_refuses_nodes_not_bound_to_the_indices(cls: Any) -> None:
    # select reads the bound list unchecked at the picked index: after an update that
    # grew the nodes it read past the list's end (ASan: heap-buffer-overflow)
    hashing = cls is _lb.ConsistentHash
    lb = cls(["a"]) if hashing else cls([1])
    with pytest.raises(ValueError, match="0 nodes bound to 1 indices"):
        lb.select()
    lb.bind(["a"], {"a": 0})
    assert lb.select() == "a"
    keys = [f"n{i}" for i in range(64)]
    if hashing:
        lb.update(keys)
    else:
        lb.update([1] * 64)
    with pytest.raises(ValueError, match="bind the nodes after each update"):
        lb.select()
    lb.bind(keys, {key: i for i, key in enumerate(keys)})
    assert lb.select() in keys


@pytest.mark.parametrize("cls", [_lb.LeastRequest, _lb.LocalityAware])
def test_feedback_refuses_bound_indices_out_of_range(cls: Any) -> None:
    # start/finish wrote the C arrays at whatever index the bound keys gave
    # (ASan: heap-buffer-overflow in LeastRequest._on_start, LocalityAware._on_finish)
    (node,) = make_nodes(1)
    lb = cls([1])
    lb.bind([node], {node.key: 5})
    with pytest.raises(IndexError, match="node 5 out of range"):
        lb.start(node)
    with pytest.raises(IndexError, match="node 5 out of range"):
        lb.finish(node, 0.01)
    lb.bind([node], {node.key: 0})
    lb.start(node)
    assert lb.inflight(0) == 1


def test_face_default_is_random_and_unknown_names_fail() -> None:
    assert make_balancer().name == "random"
    with pytest.raises(ValueError, match="unknown balancer"):
        make_balancer("fastest")


def test_face_checks_its_input() -> None:
    balancer = make_balancer("roundrobin")
    nodes = make_nodes(2)
    with pytest.raises(ValueError):
        balancer.update(nodes, [1])
    with pytest.raises(ValueError):
        balancer.update(nodes + nodes[:1], [1, 1, 1])
    balancer.update(nodes, [1, 1])
    with pytest.raises(ValueError):
        balancer.update(nodes, [1, -1])
    assert balancer.nodes == nodes  # a refused update changes nothing


def test_face_consistent_hash_is_keyed_by_node_key() -> None:
    nodes = make_nodes(6)   # (of weight 10)
    balancer = make_balancer("consistenthash", replicas=100)
    balancer.update(nodes, [10] * 6)
    model = ref.KetamaRef([n.key for n in nodes], replicas=100)
    for i in range(500):
        assert balancer.select(key=f"order-{i}") is nodes[model.pick_key(f"order-{i}")]
        assert balancer.select(key=i) is nodes[model.pick_key(str(i))]
    reordered = nodes[::-1]
    balancer.update(reordered, [10] * 6)
    for i in range(500):
        assert balancer.select(key=f"order-{i}") is nodes[model.pick_key(f"order-{i}")]


def test_face_consistent_hash_moves_only_the_keys_of_the_node_that_changed() -> None:
    """Points are sized against the heaviest configured weight: a node warming up,
    or one leaving, takes or gives its own keys; the others keep theirs (sized
    against the mean, as libketama does, every node's points moved)."""
    nodes = [Node(appkey="com.example.echo", ip=f"10.1.0.{i}", port=9000, weight=w)
             for i, w in enumerate([10, 20, 30, 40, 10])]
    balancer = make_balancer("consistenthash")
    keys = random_keys(random.Random(9), 4000)

    def owners() -> List[str]:
        return [balancer.select(key=k).key for k in keys]

    warming = nodes[4]
    balancer.update(nodes, [10, 20, 30, 40, 1])        # nodes[4] warming up: 1 of 10
    before = owners()
    for weight in (3, 6, 10):
        balancer.update(nodes, [10, 20, 30, 40, weight])
        after = owners()
        moved = [(old, new) for old, new in zip(before, after) if old != new]
        assert moved and all(new == warming.key for _, new in moved)
        before = after
    balancer.update(nodes[1:], [20, 30, 40, 10])        # the lightest node leaves
    after = owners()
    assert {old for old, new in zip(before, after) if old != new} == {nodes[0].key}


def test_face_consistent_hash_counts_a_configured_weight_past_the_largest_as_that() -> None:
    """Routing gives a weight over _lb.MAX_WEIGHT as MAX_WEIGHT; sized against the
    configured one, nodes all weighing 1e9 got one digest each (4 points, where
    equal weights of 10 get 160) and balanced badly."""
    def ring(fweight: float) -> List[str]:
        nodes = [Node(appkey="com.example.echo", ip=f"10.1.0.{i}", port=9000, fweight=fweight)
                 for i in range(5)]
        balancer = make_balancer("consistenthash")
        balancer.update(nodes, [min(fweight, _lb.MAX_WEIGHT)] * 5)
        return [balancer.select(key=k).key for k in random_keys(random.Random(3), 2000)]

    assert ring(1e9) == ring(10.0)


def test_face_feedback_follows_node_keys_across_updates() -> None:
    clock = FakeClock()
    balancer = make_balancer("lalb", clock=clock)
    nodes = make_nodes(3)
    balancer.update(nodes, [1, 1, 1])
    for _ in range(300):
        node = balancer.select()
        balancer.on_start(node)
        latency = 0.020 if node is nodes[0] else 0.001
        clock.now += latency
        balancer.on_finish(node, latency, True)
    impl = balancer._impl
    slow = impl.weight(0)
    assert slow < impl.weight(1)
    # same nodes, new order and fresh objects: node 0's measure follows its key
    fresh = make_nodes(3)
    balancer.update([fresh[2], fresh[0], fresh[1]], [1, 1, 1])
    assert impl.weight(1) == slow
    # feedback about a node that left is ignored
    balancer.update(fresh[1:], [1, 1])
    balancer.on_start(fresh[0])
    balancer.on_finish(fresh[0], 0.001, False)


def test_face_round_robin_is_smooth_over_nodes() -> None:
    nodes = make_nodes(3)
    balancer = make_balancer("roundrobin", start=0)
    balancer.update(nodes, [5, 1, 1])
    letters = {nodes[0].key: "A", nodes[1].key: "B", nodes[2].key: "C"}
    assert "".join(letters[balancer.select().key] for _ in range(7)) == "AABACAA"


def test_face_uses_effective_weights() -> None:
    """Warm-up is the registry's business: the balancer takes the weights it is given."""
    warming = make_nodes(2, warmup=100, startTime=1_000)
    weights = [node.effective_weight(now=1_050) for node in warming]
    assert weights == [5.0, 5.0]
    balancer = make_balancer("random")
    balancer.update(warming, weights)
    assert balancer.select() in warming
