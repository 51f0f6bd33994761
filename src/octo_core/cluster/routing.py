"""Routing: which nodes a call may use (the OCTO order, one small router per step).

1. route rules (traffic splitting, exclusive groups)   ``RouteRules``
2. LiteSet: a tagged request goes to its cell, else the center
3. Set: a caller in a Set goes to its cell (no silent fallback)
4. swimlane: a tagged request goes to its lane, else the trunk
5. locality: same IDC, then same region, then anywhere
6. only ALIVE nodes with weight > 0 (breakers and degraded connections are
   applied per call by ``Cluster`` as exclusions, so their flips keep this cache)

``Router.route(tags)`` runs them and caches the answer per request tags until
the node list changes, so an unchanged cluster costs a dict lookup.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import time
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from octo_core.errors import RpcError
from octo_core.registry.node import Node

# globalContext keys: they travel the whole call chain, so a handler's own
# outbound calls stay in the lane / LiteSet its caller was in.
LITESET_KEY = "octo.liteset"
SWIMLANE_KEY = "octo.swimlane"

# A non-limit route rule keeps the other providers, at this share of their weight.
OTHERS_WEIGHT_FACTOR = 0.01

_UNKNOWN_CELL = "\x00unknown"   # stands for every LiteSet tag that no node carries
_NO_TAGS = ("", "")               # the tag key of an untagged call


class NoRouteError(RpcError):
    """Routing left no node the call may use."""


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who is calling: fixed for a client, read by the routers."""
    appkey: str = ""
    ip: str = ""
    cell: str = ""            # the caller's Set
    set_routing: bool = False
    idc: str = ""
    region: str = ""


@dataclasses.dataclass(frozen=True)
class RouteRule:
    """One traffic-splitting rule (the registry's ``.../route/{id}`` JSON).

    Callers match by IP pattern (``*`` wildcards) or appkey; the rule's
    providers match ``ip:port`` patterns. ``limit``: only those providers;
    otherwise the others stay, down-weighted. ``exclusive``: those providers
    serve the matching callers only.
    """
    id: str
    providers: Tuple[str, ...]
    consumer_ips: Tuple[str, ...] = ()
    consumer_appkeys: Tuple[str, ...] = ()
    priority: int = 0
    enabled: bool = True
    limit: bool = False
    exclusive: bool = False
    name: str = ""

    @classmethod
    def from_dict(cls, data: Mapping) -> "RouteRule":
        return cls(id=str(data["id"]), name=data.get("name", ""),
                   providers=tuple(data.get("providers", ())),
                   consumer_ips=tuple(data.get("consumer_ips", ())),
                   consumer_appkeys=tuple(data.get("consumer_appkeys", ())),
                   priority=int(data.get("priority", 0)), enabled=bool(data.get("enabled", True)),
                   limit=bool(data.get("limit", False)), exclusive=bool(data.get("exclusive", False)))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    def matches_caller(self, caller: Caller) -> bool:
        return (any(fnmatch.fnmatchcase(caller.ip, p) for p in self.consumer_ips if caller.ip)
                or caller.appkey in self.consumer_appkeys)

    def matches_provider(self, node: Node) -> bool:
        return any(fnmatch.fnmatchcase(node.key, p) for p in self.providers)


class Weighted(NamedTuple):
    """The routed nodes and the weights the balancer should use."""
    nodes: Tuple[Node, ...]
    weights: Tuple[float, ...]


class Router:
    """Runs the six steps for one caller over one callee's nodes."""

    def __init__(self, caller: Caller = Caller(), *, locality: Optional[str] = None,
                 locality_threshold: float = 0.5) -> None:
        if locality not in (None, "idc", "region"):
            raise ValueError("locality must be None, 'idc' or 'region'")
        self.caller = caller
        self.locality = locality
        self.locality_threshold = locality_threshold
        self._nodes: Tuple[Node, ...] = ()
        self._rules: Tuple[RouteRule, ...] = ()
        self._cache: Dict[tuple, Weighted] = {}
        self._known_cells: frozenset = frozenset()
        self._known_lanes: frozenset = frozenset()
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
        self._warm_until = max((n.startTime + n.warmup for n in self._nodes if n.warmup), default=0)
        if self._warm_until <= now:
            self._warm_until = 0.0

    @property
    def nodes(self) -> Tuple[Node, ...]:
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

    def route(self, tags: Mapping[str, str] = {}) -> Weighted:  # noqa: B006 - read only
        """The nodes (and weights) a call with these ``globalContext`` tags may use."""
        return self.route_for(self.tag_key(tags))

    def route_for(self, tag_key: Tuple[str, str]) -> Weighted:
        """``route`` for tags already reduced by ``tag_key``."""
        liteset, lane = tag_key
        # While a node warms up its weight changes: the answers are redone each second.
        if self._warm_until:
            tick = int(time.time())
            if tick >= self._warm_until:
                self._warm_until = 0.0
            if tick != self._tick:
                self._tick = tick
                self._cache.clear()
        key = tag_key
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._route(liteset, lane)
        return hit

    def _route(self, liteset: str, lane: str) -> Weighted:
        weights = {n.key: n.effective_weight() for n in self._nodes}

        def usable(node: Node) -> bool:
            return node.alive and weights[node.key] > 0

        nodes = self._route_rules(list(self._nodes), weights)
        nodes = self._cells(nodes, liteset, usable)
        nodes = self._swimlane(nodes, lane, usable)
        nodes = self._locality(nodes)
        nodes = [n for n in nodes if usable(n)]
        return Weighted(tuple(nodes), tuple(weights[n.key] for n in nodes))

    def _route_rules(self, nodes: List[Node], weights: Dict[str, float]) -> List[Node]:
        caller = self.caller
        rule = next((r for r in self._rules if r.matches_caller(caller)), None)
        # An exclusive group serves the callers its rule matches, and no one else.
        for other in self._rules:
            if other.exclusive and not other.matches_caller(caller):
                nodes = [n for n in nodes if not other.matches_provider(n)]
        if rule is None:
            return nodes
        group = [n for n in nodes if rule.matches_provider(n)]
        if rule.limit:
            return group
        for node in nodes:
            if not rule.matches_provider(node):
                weights[node.key] *= OTHERS_WEIGHT_FACTOR
        return nodes

    def _cells(self, nodes: List[Node], liteset: str, usable: Callable[[Node], bool]) -> List[Node]:
        center = [n for n in nodes if not n.cell]
        if liteset:                                   # LiteSet wins over Set
            # a LiteSet whose nodes cannot serve (DEAD, STOPPING, weight 0) is empty
            tagged = [n for n in nodes if n.cell == liteset and usable(n)]
            return tagged or center
        caller = self.caller
        if caller.set_routing and caller.cell:
            if len(center) == len(nodes):            # the callee has no Set nodes at all
                return center
            mine = [n for n in nodes if n.cell == caller.cell]
            if not mine:
                raise NoRouteError(f"callee has Set nodes but none in Set {caller.cell!r}")
            return mine
        return center or nodes

    @staticmethod
    def _swimlane(nodes: List[Node], lane: str, usable: Callable[[Node], bool]) -> List[Node]:
        trunk = [n for n in nodes if not n.swimlane]
        if lane:   # a lane whose nodes cannot serve falls back to the trunk, like an empty one
            return [n for n in nodes if n.swimlane == lane and usable(n)] or trunk
        return trunk

    def _locality(self, nodes: List[Node]) -> List[Node]:
        caller = self.caller
        if not caller.idc and not caller.region:
            return nodes
        same_idc = [n for n in nodes if caller.idc and n.idc == caller.idc]
        same_region = [n for n in nodes if caller.region and n.region == caller.region
                       and not (caller.idc and n.idc == caller.idc)]
        if self.locality == "idc":
            return same_idc
        if self.locality == "region":
            return same_idc + same_region
        for tier in (same_idc, same_idc + same_region):
            if tier and sum(n.alive for n in tier) / len(tier) >= self.locality_threshold:
                return tier
        return nodes
