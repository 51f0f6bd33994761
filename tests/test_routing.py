"""Acceptance tests of ``octo_core.cluster.routing``: the OCTO routing scenarios as tables.

Each case builds a ``Router`` for one caller over hand-built ``Node``s and checks
which nodes (and weights) ``Router.route(tags)`` leaves for the call, or that it
refuses with ``NoRouteError``. Order of the steps under test: route rules,
LiteSet, Set, swimlane, locality, then only ALIVE nodes of weight > 0. Nothing
here touches a socket or measures time; warm-up runs on a fake clock.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Mapping, Sequence, Set, Union

import pytest

from octo_core._lb import MAX_WEIGHT
from octo_core.cluster import routing
from octo_core.cluster.balancer import BALANCERS, make_balancer
from octo_core.cluster.routing import (LITESET_KEY, OTHERS_WEIGHT_FACTOR, SWIMLANE_KEY, Caller,
                                       NoRouteError, RouteRule, Router, Weighted)
from octo_core.errors import RpcError
from octo_core.protocol import NodeStatus
from octo_core.registry import node as node_module
from octo_core.registry.node import Node

from cluster_helpers import FakeClock, FakeTime, node

def names(routed: Weighted) -> Set[str]:
    """The routed nodes by ip (the tests name nodes by their ip)."""
    return {n.ip for n in routed.nodes}


def weights_by_name(routed: Weighted) -> Dict[str, float]:
    return {n.ip: w for n, w in zip(routed.nodes, routed.weights)}


def route(nodes: Sequence[Node], caller: Caller = Caller(), tags: Mapping[str, str] = {},
          rules: Sequence[RouteRule] = (), **router_options: Any) -> Weighted:
    router = Router(caller, **router_options)
    router.update(nodes, rules)
    return router.route(tags)


def check(expected: Union[Set[str], type], nodes: Sequence[Node], caller: Caller,
          tags: Mapping[str, str], **router_options: Any) -> None:
    if isinstance(expected, type):
        with pytest.raises(expected):
            route(nodes, caller, tags, **router_options)
    else:
        assert names(route(nodes, caller, tags, **router_options)) == expected


# --- Set, LiteSet, swimlane --------------------------------------------------------------

SET_CALLER = Caller(appkey="com.example.caller", cell="gz-set1", set_routing=True)
SET_OFF = Caller(appkey="com.example.caller", cell="gz-set1", set_routing=False)
PLAIN = Caller(appkey="com.example.caller")
LITESET = {LITESET_KEY: "lite-a"}
BLUE = {SWIMLANE_KEY: "blue"}

CELL_CASES = [
    # (id, caller, tags, nodes, expected names or error)
    ("set caller, callee has Set nodes but none in its cell: no silent fallback",
     SET_CALLER, {}, [node("center1"), node("s2a", cell="gz-set2"), node("s2b", cell="gz-set2")],
     NoRouteError),
    ("set caller, callee has no Set nodes: the center",
     SET_CALLER, {}, [node("center1"), node("center2")], {"center1", "center2"}),
    ("set caller goes to its own cell only",
     SET_CALLER, {}, [node("center1"), node("s1a", cell="gz-set1"), node("s1b", cell="gz-set1"),
                      node("s2a", cell="gz-set2")], {"s1a", "s1b"}),
    ("a cell without set_routing is not a Set caller: the center",
     SET_OFF, {}, [node("center1"), node("s1a", cell="gz-set1")], {"center1"}),
    ("a cell alone does not make a Set caller (set_routing is off unless asked for)",
     Caller(appkey="com.example.caller", cell="gz-set1"), {},
     [node("center1"), node("s1a", cell="gz-set1")], {"center1"}),
    ("untagged, non-Set caller: the center",
     PLAIN, {}, [node("center1"), node("center2"), node("s1a", cell="gz-set1")],
     {"center1", "center2"}),
    ("LiteSet tag: that cell",
     PLAIN, LITESET, [node("center1"), node("la", cell="lite-a"), node("lb", cell="lite-b")],
     {"la"}),
    ("LiteSet tag, no node in that cell: the center",
     PLAIN, LITESET, [node("center1"), node("lb", cell="lite-b")], {"center1"}),
    ("LiteSet wins over Set",
     SET_CALLER, LITESET, [node("center1"), node("s1a", cell="gz-set1"), node("la", cell="lite-a")],
     {"la"}),
    ("LiteSet wins over Set, also when falling back (to the center, not the Set)",
     SET_CALLER, LITESET, [node("center1"), node("s1a", cell="gz-set1")], {"center1"}),
    ("LiteSet tag, callee has no center: routed as untagged (every cell)",
     PLAIN, LITESET, [node("s1a", cell="gz-set1"), node("s2a", cell="gz-set2")], {"s1a", "s2a"}),
    ("LiteSet tag, callee has no center, Set caller: routed as untagged (its Set)",
     SET_CALLER, LITESET, [node("s1a", cell="gz-set1"), node("s2a", cell="gz-set2")], {"s1a"}),
    ("LiteSet tag, no center, Set caller with no node in its Set: the LiteSet still serves",
     SET_CALLER, LITESET, [node("la", cell="lite-a"), node("s2a", cell="gz-set2")], {"la"}),
    ("LiteSet tag, no center, Set caller, neither has nodes: no silent fallback",
     SET_CALLER, LITESET, [node("s2a", cell="gz-set2")], NoRouteError),
    ("swimlane tag: the lane's nodes",
     PLAIN, BLUE, [node("t1"), node("t2"), node("b1", swimlane="blue"), node("g1", swimlane="green")],
     {"b1"}),
    ("swimlane tag, no node in the lane: the trunk",
     PLAIN, BLUE, [node("t1"), node("t2"), node("g1", swimlane="green")], {"t1", "t2"}),
    ("untagged never reaches lane nodes",
     PLAIN, {}, [node("t1"), node("b1", swimlane="blue"), node("g1", swimlane="green")], {"t1"}),
    ("untagged, only lane nodes: nothing (never a lane)",
     PLAIN, {}, [node("b1", swimlane="blue")], set()),
    ("LiteSet and swimlane together: the lane inside the cell",
     PLAIN, {**LITESET, **BLUE}, [node("center1"), node("la", cell="lite-a"),
                                  node("la-blue", cell="lite-a", swimlane="blue"),
                                  node("blue", swimlane="blue")], {"la-blue"}),
    ("Set caller with a swimlane tag: the lane inside its cell",
     SET_CALLER, BLUE, [node("s1a", cell="gz-set1"), node("s1-blue", cell="gz-set1", swimlane="blue"),
                        node("blue", swimlane="blue")], {"s1-blue"}),
    ("an empty tag value is no tag",
     PLAIN, {SWIMLANE_KEY: "", LITESET_KEY: ""}, [node("t1"), node("b1", swimlane="blue"),
                                                   node("la", cell="lite-a")], {"t1"}),
]


@pytest.mark.parametrize("caller,tags,nodes,expected", [c[1:] for c in CELL_CASES],
                         ids=[c[0] for c in CELL_CASES])
def test_cells_and_lanes(caller, tags, nodes, expected):
    check(expected, nodes, caller, tags)


def test_no_route_error_is_an_rpc_error_that_names_the_set():
    with pytest.raises(NoRouteError, match="gz-set1") as caught:
        route([node("center1"), node("s2a", cell="gz-set2")], SET_CALLER)
    assert isinstance(caught.value, RpcError)


def test_set_caller_whose_cell_nodes_are_all_down_gets_no_node_not_the_center():
    routed = route([node("center1"), node("s1a", cell="gz-set1", status=NodeStatus.DEAD)],
                   SET_CALLER)
    assert routed.nodes == ()


UNUSABLE = [("DEAD", {"status": NodeStatus.DEAD}), ("STOPPING", {"status": NodeStatus.STOPPING}),
            ("STOPPED", {"status": NodeStatus.STOPPED}), ("STARTING", {"status": NodeStatus.STARTING}),
            ("weight 0", {"weight": 0})]


def test_swimlane_whose_nodes_are_all_unusable_falls_back_to_the_trunk():
    """A lane with no usable node is a lane with no node: its calls go to the trunk.

    (While the lane's only provider is STOPPING for a redeploy, or DEAD, tagged
    calls must not fail when the trunk can serve them.)
    """
    got = {why: names(route([node("t1"), node("b1", swimlane="blue", **fields)], PLAIN, BLUE))
           for why, fields in UNUSABLE}
    assert got == {why: {"t1"} for why, _ in UNUSABLE}


def test_liteset_whose_nodes_are_all_unusable_falls_back_to_the_center():
    got = {why: names(route([node("center1"), node("la", cell="lite-a", **fields)], PLAIN, LITESET))
           for why, fields in UNUSABLE}
    assert got == {why: {"center1"} for why, _ in UNUSABLE}


def test_liteset_whose_nodes_are_all_unusable_and_no_center_goes_where_untagged_calls_go():
    got = {why: names(route([node("s2a", cell="gz-set2"), node("la", cell="lite-a", **fields)],
                            PLAIN, LITESET))
           for why, fields in UNUSABLE}
    assert got == {why: {"s2a"} for why, _ in UNUSABLE}


def test_a_lane_with_one_usable_node_keeps_its_calls():
    routed = route([node("t1"), node("b1", swimlane="blue", status=NodeStatus.DEAD),
                    node("b2", swimlane="blue")], PLAIN, BLUE)
    assert names(routed) == {"b2"}


# --- locality ----------------------------------------------------------------------------

HERE = Caller(appkey="com.example.caller", idc="gz1", region="south")


def dc(name: str, idc: str, region: str, alive: bool = True) -> Node:
    return node(name, idc=idc, region=region,
                status=NodeStatus.ALIVE if alive else NodeStatus.DEAD)


LOCALITY_CASES = [
    # (id, caller, nodes, router options, expected)
    ("same IDC first",
     HERE, [dc("i1", "gz1", "south"), dc("i2", "gz1", "south"), dc("r1", "gz2", "south"),
            dc("e1", "bj1", "north")], {}, {"i1", "i2"}),
    ("no node in the IDC: same region",
     HERE, [dc("r1", "gz2", "south"), dc("r2", "gz3", "south"), dc("e1", "bj1", "north")], {},
     {"r1", "r2"}),
    ("no node in the region: anywhere",
     HERE, [dc("e1", "bj1", "north"), dc("e2", "sh1", "east")], {}, {"e1", "e2"}),
    ("IDC tier with too few ALIVE nodes: skipped for IDC + region",
     HERE, [dc("i1", "gz1", "south"), dc("i2", "gz1", "south", False),
            dc("i3", "gz1", "south", False), dc("r1", "gz2", "south"), dc("r2", "gz2", "south"),
            dc("e1", "bj1", "north")], {}, {"i1", "r1", "r2"}),
    ("IDC tier whose other nodes an operator set to weight 0: skipped for IDC + region",
     HERE, [dc("i1", "gz1", "south"), node("i2", idc="gz1", region="south", weight=0),
            node("i3", idc="gz1", region="south", weight=0), dc("r1", "gz2", "south"),
            dc("r2", "gz2", "south"), dc("e1", "bj1", "north")], {}, {"i1", "r1", "r2"}),
    ("ALIVE share exactly at the threshold: the tier is kept",
     HERE, [dc("i1", "gz1", "south"), dc("i2", "gz1", "south", False), dc("r1", "gz2", "south")],
     {"locality_threshold": 0.5}, {"i1"}),
    ("IDC and region tiers both below the threshold: anywhere",
     HERE, [dc("i1", "gz1", "south", False), dc("r1", "gz2", "south", False),
            dc("r2", "gz2", "south"), dc("r3", "gz2", "south", False),
            dc("e1", "bj1", "north"), dc("e2", "bj1", "north")], {}, {"r2", "e1", "e2"}),
    # The IDC's dead nodes must not count against the region: with them unlisted
    # ("no node in the IDC") the calls stay in the region, so with them DEAD too.
    ("an all-DEAD IDC is skipped for a region healthy on its own",
     HERE, [dc("i1", "gz1", "south", False), dc("i2", "gz1", "south", False),
            dc("i3", "gz1", "south", False), dc("r1", "gz2", "south"),
            dc("r2", "gz2", "south", False), dc("e1", "bj1", "north")], {}, {"r1"}),
    ("a half-dead IDC goes with a region healthy on its own",
     HERE, [dc("i1", "gz1", "south"), dc("i2", "gz1", "south", False),
            dc("i3", "gz1", "south", False), dc("i4", "gz1", "south", False),
            dc("i5", "gz1", "south", False), dc("r1", "gz2", "south"),
            dc("r2", "gz2", "south", False), dc("e1", "bj1", "north")], {}, {"i1", "r1"}),
    ("a higher threshold skips a half-dead IDC",
     HERE, [dc("i1", "gz1", "south"), dc("i2", "gz1", "south", False), dc("r1", "gz2", "south")],
     {"locality_threshold": 0.8}, {"i1", "r1"}),
    ("locality='idc': only the IDC, even when it is all down",
     HERE, [dc("i1", "gz1", "south", False), dc("r1", "gz2", "south"), dc("e1", "bj1", "north")],
     {"locality": "idc"}, set()),
    ("locality='idc': the IDC's ALIVE nodes",
     HERE, [dc("i1", "gz1", "south"), dc("i2", "gz1", "south", False), dc("i3", "gz1", "south", False),
            dc("r1", "gz2", "south")], {"locality": "idc"}, {"i1"}),
    ("locality='region': IDC and region, never elsewhere",
     HERE, [dc("i1", "gz1", "south", False), dc("r1", "gz2", "south", False),
            dc("e1", "bj1", "north")], {"locality": "region"}, set()),
    ("locality='region': the region's ALIVE nodes",
     HERE, [dc("i1", "gz1", "south"), dc("r1", "gz2", "south"), dc("e1", "bj1", "north")],
     {"locality": "region"}, {"i1", "r1"}),
    ("a caller that does not say where it is: anywhere",
     Caller(appkey="com.example.caller"), [dc("i1", "gz1", "south"), dc("e1", "bj1", "north")], {},
     {"i1", "e1"}),
    ("a caller with a region only: the region",
     Caller(region="north"), [dc("i1", "gz1", "south"), dc("e1", "bj1", "north")], {}, {"e1"}),
    ("a caller with an IDC only: the IDC",
     Caller(idc="gz1"), [dc("i1", "gz1", "south"), dc("e1", "bj1", "north")], {}, {"i1"}),
    ("a node weighing less than 1 is still capacity: its IDC stays a tier",
     HERE, [node("i1", idc="gz1", region="south", weight=0, fweight=0.5), dc("r1", "gz2", "south")],
     {}, {"i1"}),
]


@pytest.mark.parametrize("caller,nodes,options,expected", [c[1:] for c in LOCALITY_CASES],
                         ids=[c[0] for c in LOCALITY_CASES])
def test_locality(caller, nodes, options, expected):
    check(expected, nodes, caller, {}, **options)


def test_locality_applies_inside_the_lane():
    nodes = [dc("i1", "gz1", "south"), node("lane-far", swimlane="blue", idc="bj1", region="north"),
             node("lane-near", swimlane="blue", idc="gz1", region="south")]
    assert names(route(nodes, HERE, BLUE)) == {"lane-near"}
    assert names(route(nodes, HERE)) == {"i1"}


def test_nodes_the_caller_knows_are_down_count_out_of_the_locality_share():
    """Two of the IDC's three nodes crashed and the registry has not heard yet: the
    caller's breakers know, and the IDC spills into the region as if they were DEAD
    (not the one survivor taking the whole IDC's calls); when they recover, back."""
    nodes = [dc("i1", "gz1", "south"), dc("i2", "gz1", "south"), dc("i3", "gz1", "south"),
             dc("r1", "gz2", "south"), dc("r2", "gz2", "south")]
    router = Router(HERE)
    router.update(nodes)
    assert names(router.route()) == {"i1", "i2", "i3"}
    router.set_down({nodes[1].key, nodes[2].key})
    assert names(router.route()) == {"i1", "i2", "i3", "r1", "r2"}
    router.set_down(set())
    assert names(router.route()) == {"i1", "i2", "i3"}
    restricted = Router(HERE, locality="idc")      # no shares: nothing to redo
    restricted.update(nodes)
    before = restricted.route()
    restricted.set_down({nodes[1].key, nodes[2].key})
    assert restricted.route() is before and names(before) == {"i1", "i2", "i3"}


def test_nodes_the_caller_knows_are_down_count_for_a_caller_that_knows_only_its_region():
    nodes = [dc("r1", "gz1", "south"), dc("r2", "gz2", "south"), dc("r3", "gz2", "south"),
             dc("e1", "bj1", "north")]
    router = Router(Caller(region="south"))
    router.update(nodes)
    assert names(router.route()) == {"r1", "r2", "r3"}
    router.set_down({nodes[1].key, nodes[2].key})
    assert names(router.route()) == {"r1", "r2", "r3", "e1"}


def tiers(routed: Weighted) -> List[Set[str]]:
    """The names of each tier of the answer, most preferred first."""
    chain = []
    while routed is not None and routed.nodes:
        chain.append(names(routed))
        routed = routed.fallback
    return chain


TIER_CASES = [
    # (id, caller, tags, nodes, router options, expected tiers)
    ("the IDC, then the rest of the region, then the rest",
     HERE, {}, [dc("i1", "gz1", "south"), dc("r1", "gz2", "south"), dc("e1", "bj1", "north")], {},
     [{"i1"}, {"r1"}, {"e1"}]),
    ("a tier with no node is left out",
     HERE, {}, [dc("i1", "gz1", "south"), dc("e1", "bj1", "north")], {}, [{"i1"}, {"e1"}]),
    ("an IDC with too few ALIVE nodes: IDC + region together, then the rest",
     HERE, {}, [dc("i1", "gz1", "south"), dc("i2", "gz1", "south", False),
                dc("i3", "gz1", "south", False), dc("r1", "gz2", "south"), dc("e1", "bj1", "north")],
     {}, [{"i1", "r1"}, {"e1"}]),
    ("a region tier with too few ALIVE nodes: the IDC, then the region with the rest",
     HERE, {}, [dc("i1", "gz1", "south"), dc("r1", "gz2", "south"), dc("r2", "gz2", "south", False),
                dc("r3", "gz2", "south", False), dc("e1", "bj1", "north")],
     {}, [{"i1"}, {"r1", "e1"}]),
    ("the lane's tiers, then the trunk's",
     HERE, BLUE, [node("b1", swimlane="blue", idc="gz1", region="south"),
                  node("b2", swimlane="blue", idc="bj1", region="north"), dc("t1", "gz1", "south")],
     {}, [{"b1"}, {"b2"}, {"t1"}]),
    ("the LiteSet's cell, then the center",
     PLAIN, LITESET, [node("la", cell="lite-a"), node("c1")], {}, [{"la"}, {"c1"}]),
    ("locality='idc' is a hard limit",
     HERE, {}, [dc("i1", "gz1", "south"), dc("r1", "gz2", "south")], {"locality": "idc"}, [{"i1"}]),
    ("locality='region' is a hard limit",
     HERE, {}, [dc("i1", "gz1", "south"), dc("e1", "bj1", "north")], {"locality": "region"},
     [{"i1"}]),
    ("a Set is a hard limit",
     SET_CALLER, {}, [node("s1", cell="gz-set1"), node("c1")], {}, [{"s1"}]),
    # PROTOCOL.md §5 role: a backup serves when no primary can (they took half the calls)
    ("backup nodes (role 1) are the last tier",
     PLAIN, {}, [node("p1"), node("p2"), node("b1", role=1)], {}, [{"p1", "p2"}, {"b1"}]),
    ("backups come after every primary tier, nearest first",
     HERE, {}, [dc("i1", "gz1", "south"), node("ib", idc="gz1", region="south", role=1),
                dc("e1", "bj1", "north"), node("eb", idc="bj1", region="north", role=1)],
     {}, [{"i1"}, {"e1"}, {"ib"}, {"eb"}]),
    ("backups alone serve",
     PLAIN, {}, [node("b1", role=1), node("b2", role=1)], {}, [{"b1", "b2"}]),
    ("a primary that is not ALIVE leaves the calls to the backup",
     PLAIN, {}, [node("p1", status=NodeStatus.DEAD), node("b1", role=1)], {}, [{"b1"}]),
    ("a backup in the lane comes after the trunk's primaries",
     PLAIN, BLUE, [node("bb", swimlane="blue", role=1), node("t1")], {}, [{"t1"}, {"bb"}]),
]


@pytest.mark.parametrize("caller,tags,nodes,options,expected", [c[1:] for c in TIER_CASES],
                         ids=[c[0] for c in TIER_CASES])
def test_the_answer_chains_the_next_tiers(caller, tags, nodes, options, expected):
    """Where a call goes when no node of a tier can take it (breakers open,
    connections degraded: see ``Cluster.select``)."""
    assert tiers(route(nodes, caller, tags, **options)) == expected


def test_a_tier_whose_alive_nodes_all_weigh_zero_is_passed_over():
    """ALIVE enough to be chosen, but no node of it can serve: the next tier serves."""
    routed = route([dc("i1", "gz1", "south"), node("i2", idc="gz1", region="south", weight=0),
                    dc("r1", "gz2", "south")], HERE)
    assert tiers(routed) == [{"i1"}, {"r1"}]
    zero = route([node("i1", idc="gz1", region="south", weight=0), dc("r1", "gz2", "south")], HERE)
    assert tiers(zero) == [{"r1"}]


def test_unknown_locality_is_refused():
    with pytest.raises(ValueError):
        Router(HERE, locality="city")


@pytest.mark.parametrize("caller, locality", [
    (Caller(), "idc"), (Caller(region="south"), "idc"),
    (Caller(), "region"), (Caller(idc="gz1"), "region")],
    ids=["idc, caller nowhere", "idc, caller with a region only",
         "region, caller nowhere", "region, caller with an IDC only"])
def test_a_hard_locality_without_the_callers_own_is_refused(caller, locality):
    """locality='idc' for a caller without an idc limited nothing (every node was
    routed) or, with a region, routed no call at all (each failed with "no node is
    available"); the same for 'region' without a region: a configuration error
    that showed up only as misrouted or failing calls."""
    with pytest.raises(ValueError, match=f"locality={locality!r} needs the caller's {locality}"):
        Router(caller, locality=locality)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_a_locality_threshold_within_0_and_1_is_taken(threshold):
    assert Router(HERE, locality_threshold=threshold).locality_threshold == threshold


@pytest.mark.parametrize("threshold", [-0.1, 1.5, 2.0])
def test_a_locality_threshold_outside_0_and_1_is_refused(threshold):
    with pytest.raises(ValueError, match="locality_threshold must be within"):
        Router(HERE, locality_threshold=threshold)


def test_a_caller_is_frozen():
    """One ``Caller`` is shared (``Router``'s default, a client's routers): no one
    may change where the others call from."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        HERE.idc = "bj1"


# --- route rules ------------------------------------------------------------------------

CALLER_IP = "192.168.1.7"
ME = Caller(appkey="com.example.caller", ip=CALLER_IP)
P = [node(f"10.1.0.{i}", weight=10) for i in range(1, 5)]        # 10.1.0.1 .. 10.1.0.4
ALL = {n.ip for n in P}


def rule(id: str, providers: Sequence[str], **fields: Any) -> RouteRule:
    return RouteRule(id=id, providers=tuple(providers), **fields)


RULE_CASES = [
    # (id, caller, rules, expected names, expected weights or None)
    ("no rule: every node at full weight",
     ME, [], ALL, {ip: 10 for ip in ALL}),
    ("limit rule by caller IP wildcard: only its providers",
     ME, [rule("r1", ["10.1.0.1:*", "10.1.0.2:9000"], consumer_ips=("192.168.1.*",), limit=True)],
     {"10.1.0.1", "10.1.0.2"}, {"10.1.0.1": 10, "10.1.0.2": 10}),
    ("limit rule by appkey",
     ME, [rule("r1", ["10.1.0.3:9000"], consumer_appkeys=("com.example.caller",), limit=True)],
     {"10.1.0.3"}, None),
    ("non-limit rule: the others stay, down-weighted",
     ME, [rule("r1", ["10.1.0.1:9000"], consumer_ips=(CALLER_IP,))], ALL,
     {"10.1.0.1": 10, **{ip: 10 * OTHERS_WEIGHT_FACTOR for ip in ALL - {"10.1.0.1"}}}),
    ("a rule for other callers does not apply",
     ME, [rule("r1", ["10.1.0.1:9000"], consumer_ips=("10.9.*",), consumer_appkeys=("com.x",),
               limit=True)], ALL, None),
    ("priority order: the higher priority matching rule wins",
     ME, [rule("low", ["10.1.0.1:9000"], consumer_ips=("192.168.*",), priority=1, limit=True),
          rule("high", ["10.1.0.2:9000"], consumer_ips=("192.168.*",), priority=5, limit=True)],
     {"10.1.0.2"}, None),
    ("a higher priority rule that does not match is skipped",
     ME, [rule("low", ["10.1.0.1:9000"], consumer_ips=("192.168.*",), priority=1, limit=True),
          rule("high", ["10.1.0.2:9000"], consumer_ips=("172.16.*",), priority=5, limit=True)],
     {"10.1.0.1"}, None),
    ("equal priority: the first match wins (only one rule applies)",
     ME, [rule("first", ["10.1.0.3:9000"], consumer_appkeys=("com.example.caller",), limit=True),
          rule("second", ["10.1.0.4:9000"], consumer_ips=(CALLER_IP,), limit=True)],
     {"10.1.0.3"}, None),
    ("disabled rules are ignored",
     ME, [rule("off", ["10.1.0.1:9000"], consumer_ips=("*",), limit=True, enabled=False)],
     ALL, None),
    ("exclusive group: kept from other callers",
     ME, [rule("vip", ["10.1.0.4:9000"], consumer_appkeys=("com.example.vip",), exclusive=True,
               limit=True)], ALL - {"10.1.0.4"}, None),
    ("exclusive group: its own callers keep it (limit)",
     Caller(appkey="com.example.vip"), [rule("vip", ["10.1.0.4:9000"],
                                             consumer_appkeys=("com.example.vip",),
                                             exclusive=True, limit=True)], {"10.1.0.4"}, None),
    ("exclusive group, non-limit: its callers favour it, others still there",
     Caller(appkey="com.example.vip"),
     [rule("vip", ["10.1.0.4:9000"], consumer_appkeys=("com.example.vip",), exclusive=True)],
     ALL, {"10.1.0.4": 10, **{ip: 10 * OTHERS_WEIGHT_FACTOR for ip in ALL - {"10.1.0.4"}}}),
    ("exclusive group kept from a caller whose own rule matches elsewhere",
     ME, [rule("vip", ["10.1.0.4:9000"], consumer_appkeys=("com.example.vip",), exclusive=True),
          rule("mine", ["10.1.0.*:9000"], consumer_ips=(CALLER_IP,), limit=True)],
     ALL - {"10.1.0.4"}, None),
    ("a disabled exclusive rule keeps nothing from anyone",
     ME, [rule("vip", ["10.1.0.4:9000"], consumer_appkeys=("com.example.vip",), exclusive=True,
               enabled=False)], ALL, None),
    ("an IP pattern never matches a caller without an IP",
     Caller(appkey="com.example.caller"), [rule("r1", ["10.1.0.1:9000"], consumer_ips=("*",),
                                                limit=True)], ALL, None),
]


@pytest.mark.parametrize("caller,rules,expected,weights", [c[1:] for c in RULE_CASES],
                         ids=[c[0] for c in RULE_CASES])
def test_route_rules(caller, rules, expected, weights):
    routed = route(P, caller, rules=rules)
    assert names(routed) == expected
    if weights is not None:
        assert weights_by_name(routed) == pytest.approx(weights)


def test_a_non_limit_rule_down_weights_the_other_providers():
    favoured = rule("r1", ["10.1.0.1:*"], consumer_ips=(CALLER_IP,))
    weights = weights_by_name(route(P, ME, rules=[favoured]))
    assert all(0 < weights[ip] < weights["10.1.0.1"] for ip in ALL - {"10.1.0.1"}), weights


def test_an_exclusive_group_serves_every_caller_its_rule_matches():
    """``exclusive``: the group serves the callers its rule matches, and only them.
    A caller that its higher-priority rule also matches is still one of them: the
    exclusive group must not be taken away from it."""
    vip = rule("vip", ["10.1.0.4:9000"], consumer_ips=(CALLER_IP,), exclusive=True)
    mine = rule("mine", ["10.1.0.*:9000"], consumer_appkeys=("com.example.caller",), priority=5)
    assert names(route(P, ME, rules=[vip])) == ALL
    assert names(route(P, ME, rules=[vip, mine])) == ALL


def test_route_rules_run_before_the_swimlane():
    nodes = [node("10.1.0.1"), node("10.1.0.2"), node("10.1.0.9", swimlane="blue")]
    limit = rule("r1", ["10.1.0.1:*", "10.1.0.9:*"], consumer_ips=(CALLER_IP,), limit=True)
    assert names(route(nodes, ME, BLUE, rules=[limit])) == {"10.1.0.9"}
    assert names(route(nodes, ME, rules=[limit])) == {"10.1.0.1"}


def test_route_rule_json_round_trip():
    original = rule("r7", ["10.1.0.*:9000"], consumer_ips=("192.168.*",),
                    consumer_appkeys=("com.a",), priority=3, limit=True, exclusive=True, name="n")
    assert RouteRule.from_dict(json.loads(original.to_json())) == original
    minimal = RouteRule.from_dict({"id": 5, "providers": ["a:1"]})
    assert (minimal.id, minimal.enabled, minimal.limit, minimal.priority) == ("5", True, False, 0)
    assert minimal == RouteRule(id="5", providers=("a:1",))     # the same defaults in Python
    with pytest.raises(dataclasses.FrozenInstanceError):        # (a rule is shared by clients)
        minimal.limit = True


@pytest.mark.parametrize("data", [None, [], "id"], ids=repr)
def test_route_rule_json_that_is_no_object_is_refused(data):
    with pytest.raises(ValueError):
        RouteRule.from_dict(data)


# --- ALIVE only, weight > 0, warm-up -----------------------------------------------------

@pytest.mark.parametrize("status", list(NodeStatus), ids=[s.name for s in NodeStatus])
def test_only_alive_nodes_are_routed(status):
    routed = route([node("a"), node("b", status=status)])
    assert names(routed) == ({"a", "b"} if status == NodeStatus.ALIVE else {"a"})


def test_only_nodes_of_positive_weight_are_routed():
    routed = route([node("a", weight=5), node("zero", weight=0), node("f", weight=0, fweight=2.5),
                    node("neg", weight=-3)])
    assert weights_by_name(routed) == {"a": 5.0, "f": 2.5}


def test_a_weight_beyond_what_balancers_take_counts_as_the_largest_they_take():
    # Registries hold any int64 weight and any finite fweight; a balancer refuses a
    # weight over MAX_WEIGHT, and with it every call of the client.
    routed = route([node("big", weight=2_000_000), node("huge", weight=0, fweight=1e308),
                    node("a", weight=5)])
    assert weights_by_name(routed) == {"big": MAX_WEIGHT, "huge": MAX_WEIGHT, "a": 5.0}
    for name in BALANCERS:
        make_balancer(name).update(routed.nodes, routed.weights)   # accepted


def test_no_alive_node_at_all_routes_to_nothing():
    assert route([node("a", status=NodeStatus.DEAD)]).nodes == ()
    assert route([]).nodes == ()


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """Wall-clock time for the router and ``Node.effective_weight``, moved by hand."""
    fake = FakeClock(start=1_700_000_000.25)
    monkeypatch.setattr(routing, "time", FakeTime(fake))
    monkeypatch.setattr(node_module, "time", FakeTime(fake))
    return fake


WARMUP_CASES = [
    # (weight, warmup, seconds since start, expected effective weight)
    (100, 60, 15, 25.0),
    (100, 60, 30, 50.0),
    (100, 60, 59, 100 * 59 / 60),
    (100, 60, 60, 100.0),
    (100, 60, 3600, 100.0),
    (100, 60, 0.1, 1.0),          # at least 1
    (100, 60, -5, 1.0),           # a start time in the future (clock skew): still 1
    (10, 600, 30, 1.0),           # 0.5 -> at least 1
    (0, 60, 15, 0.0),             # weight 0 stays out
    (100, 0, 0, 100.0),           # no warm-up
]


@pytest.mark.parametrize("weight,warmup,elapsed,expected", WARMUP_CASES)
def test_warm_up_weight(clock, weight, warmup, elapsed, expected):
    n = node("w", weight=weight, warmup=warmup, startTime=int(clock.now - elapsed + 0.25))
    assert n.effective_weight(now=n.startTime + elapsed) == pytest.approx(expected)
    clock.now = n.startTime + elapsed
    assert n.effective_weight() == pytest.approx(expected)


def test_warm_up_weight_uses_fweight():
    n = node("w", weight=100, fweight=40.0, warmup=40, startTime=1000)
    assert n.effective_weight(now=1010) == pytest.approx(10.0)


def test_router_weights_warm_up_and_refresh_each_second(clock):
    start = int(clock.now)
    clock.now = start + 10.0
    router = Router()
    router.update([node("old", weight=100), node("new", weight=100, warmup=40, startTime=start)])
    first = router.route()
    assert weights_by_name(first) == pytest.approx({"old": 100, "new": 25})
    clock.advance(0.5)
    assert router.route() is first                    # same second: cached
    clock.advance(10.0)
    later = router.route()
    assert weights_by_name(later) == pytest.approx({"old": 100, "new": 100 * 20.5 / 40})
    clock.advance(20)                                  # 40.5 s: warm since this second
    warm = router.route()
    assert weights_by_name(warm) == pytest.approx({"old": 100, "new": 100})
    clock.advance(5)
    assert router.route() is warm                      # warm now: cached for good


def test_router_weights_refresh_until_the_last_node_is_warm(clock):
    start = int(clock.now)
    clock.now = start + 30.0
    router = Router()
    router.update([node("quick", weight=100, warmup=20, startTime=start),
                   node("slow", weight=100, warmup=60, startTime=start)])
    assert weights_by_name(router.route()) == pytest.approx({"quick": 100, "slow": 50})
    clock.advance(15)
    assert weights_by_name(router.route()) == pytest.approx({"quick": 100, "slow": 75})


# --- the cache ---------------------------------------------------------------------------

def test_the_same_answer_object_while_nothing_changes():
    router = Router(SET_CALLER)
    nodes = [node("s1a", cell="gz-set1"), node("s1b", cell="gz-set1"), node("c")]
    router.update(nodes)
    first = router.route()
    assert router.route() is first
    assert router.route({}) is first
    blue = router.route(BLUE)
    assert blue is router.route({SWIMLANE_KEY: "blue"})
    lite = router.route(LITESET)
    assert router.route(dict(LITESET)) is lite
    assert router.route({"some.other.key": "x"}) is first   # only routing tags matter


def test_a_new_answer_after_update():
    router = Router()
    nodes = [node("a"), node("b")]
    router.update(nodes)
    first = router.route()
    router.update(nodes)                                   # same nodes: still a new answer
    second = router.route()
    assert second is not first and names(second) == names(first)
    assert router.route() is second
    router.update([node("a"), node("b", status=NodeStatus.STOPPING)])
    assert names(router.route()) == {"a"}
    router.update(nodes, [rule("r", ["a:9000"], consumer_ips=("*",), limit=True)])
    assert names(router.route()) == {"a", "b"}              # the caller has no IP: no match
    assert Router(Caller(ip="1.2.3.4")).route().nodes == ()  # never updated: no nodes


def test_update_with_rules_changes_the_answer():
    router = Router(ME)
    router.update(P)
    before = router.route()
    router.update(P, [rule("r", ["10.1.0.2:9000"], consumer_ips=(CALLER_IP,), limit=True)])
    after = router.route()
    assert after is not before and names(after) == {"10.1.0.2"}
    assert router.nodes == tuple(P)


def test_no_route_is_not_cached_as_an_answer():
    """A Set caller with no node refuses every time (the error is raised, not cached)."""
    router = Router(SET_CALLER)
    router.update([node("c"), node("s2", cell="gz-set2")])
    for _ in range(3):
        with pytest.raises(NoRouteError):
            router.route()
    router.update([node("c"), node("s2", cell="gz-set2"), node("s1", cell="gz-set1")])
    assert names(router.route()) == {"s1"}


def test_tags_no_node_carries_route_as_one_and_share_its_answer():
    """Tags come from remote callers: each unknown LiteSet or lane must not make
    an answer of its own (nor a balancer in ``Cluster``, keyed by ``tag_key``)."""
    router = Router()
    router.update([node("c"), node("la", cell="lite-a"), node("b1", swimlane="blue")])
    unknown_cell = router.route({LITESET_KEY: "lite-x"})
    assert names(unknown_cell) == {"c"}
    assert router.tag_key({LITESET_KEY: "lite-y"}) == router.tag_key({LITESET_KEY: "lite-x"})
    assert router.route({LITESET_KEY: "lite-y"}) is unknown_cell
    assert router.tag_key({SWIMLANE_KEY: "red"}) == router.tag_key({})
    assert router.route({SWIMLANE_KEY: "red"}) is router.route()


def test_routable_says_which_tag_keys_the_nodes_still_have():
    """What ``Cluster.update`` keeps balancers for: the cells and lanes still listed."""
    router = Router()
    router.update([node("c"), node("la", cell="lite-a"), node("b1", swimlane="blue")])
    keys = {name: router.tag_key(tags) for name, tags in [
        ("untagged", {}), ("lite-a", LITESET), ("blue", BLUE), ("both", {**LITESET, **BLUE}),
        ("unknown cell", {LITESET_KEY: "lite-x"})]}
    assert {name: router.routable(key) for name, key in keys.items()} == dict.fromkeys(keys, True)
    router.update([node("c")])
    assert {name: router.routable(key) for name, key in keys.items()} == {
        "untagged": True, "lite-a": False, "blue": False, "both": False, "unknown cell": True}


def test_a_router_never_updated_routes_tagged_calls_to_nothing():
    router = Router()
    assert [router.route(tags).nodes for tags in ({}, LITESET, BLUE)] == [(), (), ()]


_RULE = {"id": "r1", "providers": ["10.0.0.1:*"], "consumer_appkeys": ["me"]}


@pytest.mark.parametrize("changes", [
    {"providers": "10.0.0.1:*"},          # tuple() would make one pattern per character
    {"consumer_ips": "10.*"},
    {"consumer_appkeys": "me,other"},
    {"providers": [1, 2]},                # parsed, then fnmatch raised TypeError per call
    {"providers": {"a": 1}},
    {"enabled": "false"},                 # bool("false") is True
    {"limit": "false"},
    {"exclusive": 1},
    {"priority": "high"},
    {"priority": 1.5},
    {"name": ["n"]},
    {"id": None},
], ids=repr)
def test_route_rule_json_of_the_wrong_type_is_refused(changes):
    with pytest.raises(ValueError):
        RouteRule.from_dict({**_RULE, **changes})


@pytest.mark.parametrize("text", ["[]", "null", '{"providers": []}', "[" * 100_000 + "]" * 100_000],
                         ids=["list", "null", "no_id", "deep"])
def test_route_rule_text_that_is_no_rule_is_refused(text):
    from octo_core.registry.base import parse_rule

    with pytest.raises(ValueError):
        parse_rule(text)
