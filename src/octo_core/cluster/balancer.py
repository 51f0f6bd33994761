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

from typing import Any, Callable, Collection, Dict, List, Optional, Sequence, Tuple, Type, Union

from octo_core import _lb
from octo_core.registry.node import Node

#: Nodes to skip in one ``select``: node keys (``"ip:port"``) or ``Node`` objects.
Exclude = Optional[Collection[Union[str, Node]]]


class Balancer:
    """Chooses a node per call among the nodes given to ``update``.

    The caller reports every call it sends: ``on_start(node)`` before,
    ``on_finish(node, latency_s, ok)`` after. Balancers that learn nothing from
    calls ignore them (``learns`` is False: callers may skip the reports).
    """

    learns = False

    def __init__(self, impl: Any, name: str) -> None:
        self.name = name
        self._impl = impl
        self._pick: Callable[..., int] = impl.pick  # bound once: select is the hot path
        self._nodes: List[Node] = []
        self._index: Dict[str, int] = {}

    @property
    def nodes(self) -> Sequence[Node]:
        """The nodes of the last ``update``."""
        return self._nodes

    def update(self, nodes: Sequence[Node], weights: Sequence[float]) -> None:
        """Install ``nodes`` with their weights (already warm-up adjusted: see
        ``Node.effective_weight``). A weight of 0 keeps a node out of every pick."""
        if len(weights) != len(nodes):
            raise ValueError(f"{len(weights)} weights for {len(nodes)} nodes")
        index = {node.key: i for i, node in enumerate(nodes)}
        if len(index) != len(nodes):
            raise ValueError("node keys must be unique")
        previous = [self._index.get(node.key, -1) for node in nodes]
        self._rebuild(nodes, weights, previous)  # first: a refused update changes nothing
        self._nodes = list(nodes)
        self._index = index

    def select(self, key: Any = None, exclude: Exclude = None) -> Optional[Node]:
        """A node for the next call, or ``None`` when every node is excluded or
        weighs 0. ``key`` only matters to ``consistenthash``."""
        i = self._pick(self._indices(exclude)) if exclude else self._pick()
        return self._nodes[i] if i >= 0 else None

    def on_start(self, node: Node) -> None:
        """A call to ``node`` is starting."""

    def on_finish(self, node: Node, latency_s: float, ok: bool) -> None:
        """A call to ``node`` ended after ``latency_s`` seconds, successfully or not."""

    def _rebuild(self, nodes: Sequence[Node], weights: Sequence[float],
                 previous: List[int]) -> None:
        self._impl.update(weights)

    def _indices(self, exclude: Collection[Union[str, Node]]) -> List[int]:
        index = self._index
        found = (index.get(item if isinstance(item, str) else item.key) for item in exclude)
        return [i for i in found if i is not None]


class _KeepingBalancer(Balancer):
    """A balancer with per-node state, handed over to the same keys on ``update``."""

    def _rebuild(self, nodes: Sequence[Node], weights: Sequence[float],
                 previous: List[int]) -> None:
        self._impl.update(weights, previous)


class _FeedbackBalancer(_KeepingBalancer):
    """A balancer that learns from the calls it is told about."""

    learns = True

    def on_start(self, node: Node) -> None:
        i = self._index.get(node.key)
        if i is not None:  # a node removed since it was selected: nothing to learn
            self._impl.on_start(i)

    def on_finish(self, node: Node, latency_s: float, ok: bool) -> None:
        i = self._index.get(node.key)
        if i is not None:
            self._impl.on_finish(i, latency_s, ok)


class _HashBalancer(Balancer):
    """Consistent hashing: the same key goes to the same node while the node stays.

    ``key`` is hashed as bytes, or as the UTF-8 of a str (anything else as its
    ``str()``); without a key a call lands on a random point of the ring.
    """

    def __init__(self, impl: Any, name: str) -> None:
        super().__init__(impl, name)
        self._pick_key: Callable[..., int] = impl.pick_key

    def select(self, key: Any = None, exclude: Exclude = None) -> Optional[Node]:
        excluded = self._indices(exclude) if exclude else None
        if key is None:
            i = self._pick(excluded)
        else:
            i = self._pick_key(key if isinstance(key, (str, bytes)) else str(key), excluded)
        return self._nodes[i] if i >= 0 else None

    def _rebuild(self, nodes: Sequence[Node], weights: Sequence[float],
                 previous: List[int]) -> None:
        self._impl.update([node.key for node in nodes], weights)


_KINDS: Dict[str, Tuple[Type[Balancer], Callable[..., Any]]] = {
    "random": (Balancer, _lb.WeightedRandom),
    "roundrobin": (_KeepingBalancer, _lb.RoundRobin),
    "leastrequest": (_FeedbackBalancer, _lb.LeastRequest),
    "lalb": (_FeedbackBalancer, _lb.LocalityAware),
    "consistenthash": (_HashBalancer, _lb.ConsistentHash),
}

#: The names ``make_balancer`` knows.
BALANCERS = tuple(_KINDS)


def make_balancer(name: str = "random", **options: Any) -> Balancer:
    """A new, empty balancer of kind ``name``; ``options`` go to its C implementation."""
    try:
        face, impl = _KINDS[name]
    except KeyError:
        raise ValueError(f"unknown balancer {name!r}; choose one of {', '.join(BALANCERS)}") from None
    return face(impl(**options), name)
