"""Load balancers: which node of an appkey takes the next call.

``make_balancer(name, **options)`` builds one of

- ``"random"`` (default): weighted random;
- ``"roundrobin"``: nginx's smooth weighted round robin;
- ``"leastrequest"``: power of two choices on in-flight calls per unit of weight;
- ``"lalb"``: brpc's locality-aware balancing (weight = throughput / latency);
- ``"consistenthash"``: a ketama ring over ``node.key``, for ``select(key=...)``.

The algorithms run in C (``octo_core._lb``), on node indices; this module maps
them to ``Node`` objects. Nodes are known by ``node.key``, so what a balancer
learned about a node (in-flight calls, latencies, round robin position) survives
an ``update`` that keeps it. ``options`` go to the C class (for example
``replicas`` for ``consistenthash``, ``window`` or ``min_weight_ratio`` for
``lalb``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

from octo_core import _lb
from octo_core.registry.node import Node


class Balancer:
    """Chooses a node per call among the nodes given to ``update``.

    ``select(key=None, exclude=None)`` returns a node for the next call, or
    ``None`` when every node is excluded or weighs 0; ``exclude`` holds node keys
    or ``Node`` objects, ``key`` only matters to ``consistenthash``. It is the C
    balancer's own method (no Python frame per pick).

    The caller reports every call it sends: ``on_start(node)`` before,
    ``on_finish(node, latency_s, ok)`` after. Balancers that learn nothing from
    calls ignore them (``learns`` is False: callers may skip the reports).
    """

    def __init__(self, impl: Any, name: str) -> None:
        self.name = name
        self._impl = impl
        self.select: Callable[..., Optional[Node]] = impl.select
        self.learns: bool = name in _LEARNING
        if self.learns:
            # (the C balancer's own methods, in place of the no-op ones: no Python frame)
            self.on_start: Callable[[Node], None] = impl.start  # type: ignore[method-assign]
            self.on_finish: Callable[[Node, float, bool], None] = impl.finish  # type: ignore[method-assign]
        self._nodes: List[Node] = []
        self._index: Dict[str, int] = {}

    @property
    def nodes(self) -> Sequence[Node]:
        """The nodes of the last ``update``."""
        return self._nodes

    def update(self, nodes: Sequence[Node], weights: Sequence[float]) -> None:
        """Install ``nodes`` with their weights (already warm-up adjusted: see
        ``Node.effective_weight``). A weight of 0 keeps a node out of every pick.
        What the balancer learned about a node (in-flight calls, latencies, round
        robin position) stays with its key."""
        if len(weights) != len(nodes):
            raise ValueError(f"{len(weights)} weights for {len(nodes)} nodes")
        index = {node.key: i for i, node in enumerate(nodes)}
        if len(index) != len(nodes):
            raise ValueError("node keys must be unique")
        previous = [self._index.get(node.key, -1) for node in nodes]
        self._rebuild(nodes, weights, previous)  # first: a refused update changes nothing
        self._nodes = list(nodes)
        self._index = index
        self._impl.bind(self._nodes, index)

    def on_start(self, node: Node) -> None:
        """A call to ``node`` is starting."""

    def on_finish(self, node: Node, latency_s: float, ok: bool) -> None:
        """A call to ``node`` ended after ``latency_s`` seconds, successfully or not."""

    def _rebuild(self, nodes: Sequence[Node], weights: Sequence[float],
                 previous: List[int]) -> None:
        impl = self._impl
        if self.name == "consistenthash":
            # A node of the heaviest configured weight gets ``replicas`` points, the
            # others their share of that: a node warming up, reweighted or gone moves
            # only its own keys (libketama's mean weight would move every node's), but
            # for the heaviest, whose weight sizes the others' points too. (A
            # weight past _lb.MAX_WEIGHT counts as that, as the weights given do.)
            heaviest = min(max([node.base_weight() for node in nodes], default=0.0),
                           _lb.MAX_WEIGHT)
            impl.update([node.key for node in nodes], weights,
                        heaviest if heaviest > 0 else None)
        elif self.name == "random":
            impl.update(weights)
        else:                       # per-node state, handed over to the same keys
            impl.update(weights, previous)


_LEARNING = ("leastrequest", "lalb")

_KINDS: Dict[str, Callable[..., Any]] = {
    "random": _lb.WeightedRandom,
    "roundrobin": _lb.RoundRobin,
    "leastrequest": _lb.LeastRequest,
    "lalb": _lb.LocalityAware,
    "consistenthash": _lb.ConsistentHash,
}

#: The names ``make_balancer`` knows.
BALANCERS = tuple(_KINDS)


def make_balancer(name: str = "random", **options: Any) -> Balancer:
    """A new, empty balancer of kind ``name``; ``options`` go to its C implementation."""
    try:
        impl = _KINDS[name]
    except KeyError:
        raise ValueError(f"unknown balancer {name!r}; choose one of {', '.join(BALANCERS)}") from None
    return Balancer(impl(**options), name)
