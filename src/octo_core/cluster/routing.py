"""Routing: which nodes a call may use (the OCTO order, one small router per step).

1. route rules (traffic splitting, exclusive groups)   ``RouteRule``
2. LiteSet: a tagged request goes to its cell, else the center
3. Set: a caller in a Set goes to its cell (no silent fallback)
4. swimlane: a tagged request goes to its lane, else the trunk
5. locality: same IDC, then same region, then anywhere
6. only ALIVE nodes with weight > 0 (at most ``_lb.MAX_WEIGHT``: more counts as that)
7. backups (``role`` 1) only when no primary can serve: after every tier of primaries

The answer is a chain of tiers, most preferred first (``Weighted.fallback``):
the LiteSet's cell before the center, the lane before the trunk, and within
each the locality tiers. Breakers and degraded connections are applied per call
by ``Cluster`` as exclusions: a call that finds no node of a tier able to serve
goes on to the next tier (Envoy's locality failover), so their flips keep this
cache. Set routing, ``locality="idc"``/``"region"`` and ``limit`` rules are
hard limits: they have no next tier.

``Router.route(tags)`` runs them and caches the answer per request tags until
the node list changes, so an unchanged cluster costs a dict lookup.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import time
from typing import AbstractSet, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from octo_core._lb import MAX_WEIGHT
from octo_core.errors import NoRouteError
from octo_core.registry.node import Node, Role
# "as": a typed re-export, so "from octo_core.cluster.routing import RouteRule" still holds
from octo_core.registry.route import RouteRule as RouteRule

# globalContext keys: they travel the whole call chain, so a handler's own
# outbound calls stay in the lane / LiteSet its caller was in.
LITESET_KEY = "octo.liteset"
SWIMLANE_KEY = "octo.swimlane"

# A non-limit route rule keeps the other providers, at this share of their weight.
OTHERS_WEIGHT_FACTOR = 0.01

_UNKNOWN_CELL = "\x00unknown"   # stands for every LiteSet tag that no node carries
_NO_TAGS = ("", "")               # the tag key of an untagged call


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who is calling: fixed for a client, read by the routers."""
    appkey: str = ""
    ip: str = ""
    cell: str = ""            # the caller's Set
    set_routing: bool = False
    idc: str = ""
    region: str = ""


def _matches_caller(rule: RouteRule, caller: Caller) -> bool:
    """Whether ``rule`` applies to ``caller``: its IP matches a ``consumer_ips``
    pattern, or its appkey is one of ``consumer_appkeys``."""
    return (any(fnmatch.fnmatchcase(caller.ip, p) for p in rule.consumer_ips if caller.ip)
            or caller.appkey in rule.consumer_appkeys)


def _matches_provider(rule: RouteRule, node: Node) -> bool:
    """Whether ``node`` (by its ``ip:port`` key) matches a ``providers`` pattern of ``rule``."""
    return any(fnmatch.fnmatchcase(node.key, p) for p in rule.providers)


class Weighted(NamedTuple):
    """The routed nodes and the weights the balancer should use; ``fallback`` is the
    next tier, for a call that finds none of these nodes able to take it."""
    nodes: Tuple[Node, ...]
    weights: Tuple[float, ...]
    fallback: Optional["Weighted"] = None


class Router:
    """Runs the seven steps for one caller over one callee's nodes."""

    def __init__(self, caller: Caller = Caller(), *, locality: Optional[str] = None,
                 locality_threshold: float = 0.5) -> None:
        if locality not in (None, "idc", "region"):
            raise ValueError("locality must be None, 'idc' or 'region'")
        if locality is not None and not getattr(caller, locality):
            # (without it the hard limit would route every call, or none)
            raise ValueError(f"locality={locality!r} needs the caller's {locality} "
                             f"({locality}=...)")
        if not 0.0 <= locality_threshold <= 1.0:
            raise ValueError(
                f"locality_threshold must be within [0, 1], not {locality_threshold!r}")
        self.caller = caller
        self.locality = locality
        self.locality_threshold = locality_threshold
        self._nodes: Tuple[Node, ...] = ()
        self._rules: Tuple[RouteRule, ...] = ()
        self._cache: Dict[tuple, Weighted] = {}
        self._known_cells: frozenset = frozenset()
        self._known_lanes: frozenset = frozenset()
        self._down: frozenset = frozenset()   # see set_down
        self._tick = 0
        self._warm_until = 0.0

    # --- inputs ----------------------------------------------------------------------

    def update(self, nodes: Sequence[Node], rules: Sequence[RouteRule] = ()) -> None:
        """A new node list (and rules) from discovery: the cache starts over."""
        self._nodes = tuple(nodes)
        self._rules = tuple(sorted((r for r in rules if r.enabled), key=lambda r: -r.priority))
        self._cache.clear()
        self._known_cells = frozenset(n.cell for n in self._nodes if n.cell)
        self._known_lanes = frozenset(n.swimlane for n in self._nodes if n.swimlane)
        now = time.time()
        self._warm_until = max((n.started + n.warmup for n in self._nodes if n.warmup), default=0)
        if self._warm_until <= now:
            self._warm_until = 0.0

    def set_down(self, keys: AbstractSet[str]) -> None:
        """The nodes the caller knows cannot take calls now (open breakers, failed
        connects), though the registry lists them ALIVE: the locality shares count
        them out. The answers are redone only if the set changed and shares matter."""
        down = frozenset(keys)
        if down != self._down:
            self._down = down
            if self._shares_matter():
                self._cache.clear()

    def _shares_matter(self) -> bool:
        """Whether the locality tiers depend on how many nodes are serving."""
        return self.locality is None and bool(self.caller.idc or self.caller.region)

    @property
    def nodes(self) -> Tuple[Node, ...]:
        """The nodes being routed among (as last updated)."""
        return self._nodes

    # --- routing ---------------------------------------------------------------------

    def tag_key(self, tags: Mapping[str, str]) -> Tuple[str, str]:
        """The (LiteSet, swimlane) that matter for routing, from ``globalContext`` tags.

        Tags come from remote callers: a value no node carries routes like any
        other unknown one, so caches keyed by this stay as small as the cluster.
        """
        if not tags:
            return _NO_TAGS
        liteset = tags.get(LITESET_KEY, "")
        if liteset and liteset not in self._known_cells:
            liteset = _UNKNOWN_CELL      # routes to the center, as every unknown LiteSet does
        lane = tags.get(SWIMLANE_KEY, "")
        if lane not in self._known_lanes:
            lane = ""                    # an unknown lane routes like no lane: the trunk
        return liteset, lane

    def routable(self, tag_key: Tuple[str, str]) -> bool:
        """Whether ``tag_key`` is one ``tag_key()`` can still give (its cell and
        lane exist among the nodes)."""
        liteset, lane = tag_key
        return ((liteset in ("", _UNKNOWN_CELL) or liteset in self._known_cells)
                and (not lane or lane in self._known_lanes))

    def route(self, tags: Mapping[str, str] = {}) -> Weighted:  # noqa: B006 - read only
        """The nodes (and weights) a call with these ``globalContext`` tags may use."""
        return self.route_for(self.tag_key(tags))

    def route_for(self, tag_key: Tuple[str, str]) -> Weighted:
        """``route`` for tags already reduced by ``tag_key``."""
        # While a node warms up its weight changes: the answers are redone each second.
        if self._warm_until:
            tick = int(time.time())
            if tick >= self._warm_until:
                self._warm_until = 0.0
            if tick != self._tick:
                self._tick = tick
                self._cache.clear()
        hit = self._cache.get(tag_key)
        if hit is None:
            hit = self._cache[tag_key] = self._route(*tag_key)
        return hit

    def _route(self, liteset: str, lane: str) -> Weighted:
        # A registry may hold any weight (an operator's typo, a hostile entry); beyond
        # what the balancers take it counts as the largest they take: refused, it would
        # fail every call of the client.
        weights = {n.key: min(n.effective_weight(), MAX_WEIGHT) for n in self._nodes}
        nodes = self._route_rules(list(self._nodes), weights)
        tiers = [tier for group in self._cells(nodes, liteset)
                 for sub in self._swimlane(group, lane)
                 for tier in self._locality(sub, weights)]
        # Backups (role 1) serve only when no primary can: after every primary tier.
        return self._chain([[n for n in tier if n.role != Role.BACKUP] for tier in tiers]
                           + [[n for n in tier if n.role == Role.BACKUP] for tier in tiers],
                           weights)

    @staticmethod
    def _chain(tiers: List[List[Node]], weights: Dict[str, float]) -> Weighted:
        """The usable nodes (ALIVE, weight > 0) of each tier, linked most preferred
        first; a tier left with none is skipped."""
        answer = None
        for tier in reversed(tiers):
            usable = [n for n in tier if n.alive and weights[n.key] > 0]
            if usable:
                answer = Weighted(tuple(usable), tuple(weights[n.key] for n in usable), answer)
        return answer or Weighted((), ())

    def _route_rules(self, nodes: List[Node], weights: Dict[str, float]) -> List[Node]:
        caller = self.caller
        rule = next((r for r in self._rules if _matches_caller(r, caller)), None)
        # An exclusive group serves the callers its rule matches, and no one else.
        for other in self._rules:
            if other.exclusive and not _matches_caller(other, caller):
                nodes = [n for n in nodes if not _matches_provider(other, n)]
        if rule is None:
            return nodes
        group = [n for n in nodes if _matches_provider(rule, n)]
        if rule.limit:
            return group
        for node in nodes:
            if not _matches_provider(rule, node):
                weights[node.key] *= OTHERS_WEIGHT_FACTOR
        return nodes

    def _cells(self, nodes: List[Node], liteset: str) -> List[List[Node]]:
        """The LiteSet / Set groups a call may use, in order of preference."""
        center = [n for n in nodes if not n.cell]
        if liteset:                                   # LiteSet wins over Set
            # A LiteSet whose nodes cannot serve is passed over for the center; a
            # callee with no center is then routed as an untagged call (the tag
            # travels down the whole call chain: it must not break calls to
            # services deployed only in cells).
            lite = [n for n in nodes if n.cell == liteset]
            if center:
                return [lite, center]
            try:
                return [lite] + self._cells(nodes, "")
            except NoRouteError:
                if not lite:
                    raise
                return [lite]
        caller = self.caller
        if caller.set_routing and caller.cell:
            if len(center) == len(nodes):            # the callee has no Set nodes at all
                return [center]
            mine = [n for n in nodes if n.cell == caller.cell]
            if not mine:
                raise NoRouteError(f"callee has Set nodes but none in Set {caller.cell!r}")
            return [mine]                             # no silent fallback to the center
        return [center or nodes]

    @staticmethod
    def _swimlane(nodes: List[Node], lane: str) -> List[List[Node]]:
        """The lane, then the trunk: a lane whose nodes cannot serve is passed over,
        like an empty one."""
        trunk = [n for n in nodes if not n.swimlane]
        if lane:
            return [[n for n in nodes if n.swimlane == lane], trunk]
        return [trunk]

    def _locality(self, nodes: List[Node], weights: Dict[str, float]) -> List[List[Node]]:
        """The locality tiers of ``nodes``, nearest first. Automatically: the same
        IDC, the rest of the region, the rest -- from the first tier (the IDC, or
        IDC + region together, which the rest of the region qualifies alone too)
        with enough serving nodes (ALIVE, weight > 0: a node an operator drained
        is no capacity); else all of them as one."""
        caller = self.caller
        if not caller.idc and not caller.region:
            return [nodes]
        same_idc: List[Node] = []
        same_region: List[Node] = []
        far: List[Node] = []
        for n in nodes:
            if caller.idc and n.idc == caller.idc:
                same_idc.append(n)
            elif caller.region and n.region == caller.region:
                same_region.append(n)
            else:
                far.append(n)
        near = same_idc + same_region
        if self.locality == "idc":
            return [same_idc]
        if self.locality == "region":
            return [near]
        if self._enough_serving(same_idc, weights):
            # the region beyond the IDC is a tier of its own only if healthy enough,
            # else its nodes go with the rest (as an unhealthy IDC goes with its region)
            if self._enough_serving(same_region, weights):
                return [same_idc, same_region, far]
            return [same_idc, same_region + far]
        # The region is a tier if healthy enough with the IDC's survivors or on its own:
        # the IDC's dead nodes must not count against it (unlisted, they would not).
        if self._enough_serving(near, weights) or self._enough_serving(same_region, weights):
            return [near, far]
        return [nodes]

    def _enough_serving(self, tier: List[Node], weights: Dict[str, float]) -> bool:
        """Is the share of ``tier``'s nodes that can take calls (ALIVE, weight > 0,
        not known down: ``set_down``) at least the locality threshold? A tier whose
        every such node is known down stays a tier: each call passes it over, and
        its nodes' probes find it first when they recover (``Cluster.select``)."""
        listed = [n for n in tier if n.alive and weights[n.key] > 0]
        serving = sum(n.key not in self._down for n in listed) or len(listed)
        return bool(tier) and serving / len(tier) >= self.locality_threshold
