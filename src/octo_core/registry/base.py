"""The ``Registry`` interface, its watch handle, and what the backends share.

A registry holds the provider nodes and route rules of each appkey, in one
environment (prod, stage or test: the MNS tree's top level). Every backend has
the same async API and the same rules:

* ``register`` keeps what an operator set on a node already registered
  (``Node.reregistered``), or, when the node is gone meanwhile (a clean stop,
  a crash), what the operator record remembers of it (``remember``), and
  stamps ``lastUpdateTime``;
* nodes registered through a registry belong to it: they go away when it is
  closed or its process dies (ZooKeeper ephemeral nodes, file TTLs);
* ``watch`` callbacks run on the event loop that called ``watch``, once with
  the current state and then after every change, with the whole list.
"""
from __future__ import annotations

import abc
import asyncio
import dataclasses
import json
import logging
import threading
import time
import urllib.parse
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, cast

from octo_core.errors import StatusChanged
from octo_core.registry import schema
from octo_core.protocol import NodeStatus
from octo_core.registry.node import Env, Node, OperatorFields, check_field
from octo_core.registry.route import RouteRule

log = logging.getLogger("octo_core.registry")

#: What a watch delivers: every node (sorted by key) and every route rule (by id).
Snapshot = Tuple[Tuple[Node, ...], Tuple[RouteRule, ...]]
WatchCallback = Callable[[List[Node], List[RouteRule]], None]

#: The node fields an operator (or the scanner) may change with ``update``.
OPERATOR_FIELDS = ("weight", "fweight", "status", "role", "warmup")


def check_status(current: Node, if_status: Optional[int], appkey: str) -> None:
    """``StatusChanged`` unless ``if_status`` is None or ``current``'s status (what
    ``update``'s compare-and-set compares, under each backend's own lock or version)."""
    if if_status is not None and current.status != if_status:
        raise StatusChanged(f"{appkey} node {current.key} has status {current.status}, "
                            f"not {if_status}: left as it is")


class Watch:
    """The handle ``Registry.watch`` returns: ``cancel()`` stops the callbacks.

    Backends call ``changed()`` from any thread; the handle then reads the
    backend's current snapshot on its loop and calls the callback only when it
    differs from the last one delivered, so a burst of changes costs one call.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: WatchCallback,
                 snapshot: Callable[[], Optional[Snapshot]],
                 on_cancel: Callable[["Watch"], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._snapshot = snapshot
        self._on_cancel = on_cancel
        self._lock = threading.Lock()
        self._scheduled = False
        self._last: Optional[Snapshot] = None
        self.cancelled = False

    def changed(self) -> None:
        """The backend's state may have changed: deliver it soon (thread-safe)."""
        with self._lock:
            if self._scheduled or self.cancelled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the watcher's loop is closed: nobody is listening
            self.cancelled = True

    def cancel(self) -> None:
        """Stop the callbacks (idempotent)."""
        if not self.cancelled:
            self.cancelled = True
            self._on_cancel(self)

    def _deliver(self) -> None:
        with self._lock:
            self._scheduled = False
        if self.cancelled:
            return
        current = self._snapshot()
        if current is None or current == self._last:
            return
        self._last = current
        try:
            self._callback(list(current[0]), list(current[1]))
        except Exception:  # a subscriber's bug must not end the watch
            log.exception("registry watch callback failed")


class Registry(abc.ABC):
    """Where providers register and consumers discover them (see the module docstring)."""

    #: Whether every process using it runs on this machine (``memory://``, ``file://``),
    #: so that a loopback address or a unix socket registered there reaches every caller.
    machine_local = False

    #: Seconds within which an operation is expected to answer. A provider's
    #: registration gives up on a call after twice this (``RegistryTimeout``):
    #: its attempts (a server's start waits no longer for its first) and, at
    #: stop, the STOPPING mark and the unregistration. ZooKeeper's is the URL's
    #: ``op_timeout``, which bounds its own waits (for a session, for an answer).
    op_timeout: float = 5.0

    def __init__(self, env: int = Env.PROD) -> None:
        if env not in Env.NAMES:
            raise ValueError(f"unknown env {env!r}: one of {sorted(Env.NAMES)}")
        self.env = env

    @abc.abstractmethod
    async def register(self, node: Node) -> Node:
        """Store ``node`` (its ``env`` must be this registry's); returns what was stored."""

    @abc.abstractmethod
    async def unregister(self, appkey: str, key: str) -> None:
        """Remove the node ``key`` (``ip:port``) of ``appkey``; no error if it is absent."""

    async def update(self, appkey: str, key: str, *, weight: Optional[int] = None,
                     fweight: Optional[float] = None, status: Optional[int] = None,
                     role: Optional[int] = None, warmup: Optional[int] = None,
                     if_status: Optional[int] = None) -> Node:
        """Change operator fields of a registered node; returns the stored node.

        ``weight`` without ``fweight`` sets ``fweight`` to the same value: readers
        prefer a non-zero ``fweight`` (PROTOCOL.md §5), so a weight change that
        left an older ``fweight`` in place would not move traffic (``weight=0``
        would not drain the node).

        Raises ``NotRegisteredError`` when the node is not registered. With
        ``if_status``, only a node in that status now is changed (a compare-and-set:
        the scanner must not undo an operator's STOPPED that came after its look),
        else ``StatusChanged``.
        """
        changes = operator_changes(weight=weight, fweight=fweight, status=status, role=role,
                                   warmup=warmup)
        return await self._change(appkey, key, changes, if_status)

    @abc.abstractmethod
    async def _change(self, appkey: str, key: str, changes: OperatorFields,
                      if_status: Optional[int]) -> Node:
        """``update``'s backend half: store ``changes`` (checked, ``fweight`` filled
        in) on the node, as ``update`` says."""

    @abc.abstractmethod
    async def list(self, appkey: str) -> List[Node]:
        """Every registered node of ``appkey``, sorted by key."""

    @abc.abstractmethod
    def watch(self, appkey: str, callback: WatchCallback) -> Watch:
        """Call ``callback(nodes, rules)`` with the current state, then on every change.

        Call it from the event loop the callbacks should run on.
        """

    @abc.abstractmethod
    async def routes(self, appkey: str) -> List[RouteRule]:
        """The route rules of ``appkey``, sorted by id."""

    @abc.abstractmethod
    async def set_route(self, appkey: str, rule: RouteRule) -> None:
        """Add ``rule``, or replace the rule with the same id."""

    @abc.abstractmethod
    async def remove_route(self, appkey: str, rule_id: str) -> None:
        """Remove a route rule; no error if it is absent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Withdraw the nodes registered here, stop every watch, release resources."""

    async def __aenter__(self) -> "Registry":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- helpers shared by the backends ------------------------------------------------

    def _check_node(self, node: Node) -> None:
        check_name(node.appkey, "appkey")
        if node.env != self.env:
            raise ValueError(f"node {node.key} is for env {node.env}, "
                             f"this registry serves env {self.env} ({Env.NAMES[self.env]})")


def check_name(name: str, what: str) -> str:
    """``name`` if it can be one path component (appkeys, route ids), else ``ValueError``."""
    if not name or "/" in name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"invalid {what} {name!r}: it must be one non-hidden path component")
    return name


def node_name(key: str) -> str:
    """The path component for a node key: ``ip:port`` as is, a unix socket path escaped."""
    return urllib.parse.quote(key, safe=":[]")


def provider_entry(name: str, text: "str | bytes | None") -> Node:
    """The node a provider entry named ``name`` holds (its znode or file name, as
    ``node_name`` writes it); ``ValueError`` when it is not one, or is another
    node's: a copy under another name would list that node twice, and updates
    would go to an entry that does not hold it. (``None``: a znode without data.)"""
    node = Node.from_json(text or b"")
    if node_name(node.key) != name:
        raise ValueError(f"it holds node {node.key}, not {name}")
    return node


def stamped(node: Node) -> Node:
    """``node`` with ``lastUpdateTime`` set to now (seconds). A node without
    ``startTime`` (a Java provider's) warms up from its ``lastUpdateTime``: that
    clock moves to ``startTime`` first, so an update is no restart."""
    return dataclasses.replace(node, lastUpdateTime=int(time.time()), startTime=node.started)


def remember(record: OperatorFields, changes: OperatorFields) -> OperatorFields:
    """The operator record of a node after ``update(**changes)``: what its next
    registration keeps though the node was gone in between (PROTOCOL.md §5:
    STOPPED survives re-registration). Weight, fweight, role and warmup as last
    set; STOPPED until someone sets ALIVE again (STOPPING and DEAD are the
    server's and the scanner's words, not an operator's: they leave it)."""
    kept = cast(OperatorFields, {**record, **{name: value for name, value in changes.items()
                                              if name != "status"}})
    status = changes.get("status")
    if status == NodeStatus.STOPPED:
        kept["status"] = status
    elif status == NodeStatus.ALIVE:
        kept.pop("status", None)
    return kept


def record_json(record: OperatorFields) -> str:
    """An operator record as the JSON ``parse_record`` reads."""
    return json.dumps(dict(record), separators=(",", ":"), sort_keys=True)


def parse_record(data: "str | bytes | None", where: str) -> OperatorFields:
    """An operator record from its JSON; ``{}`` (and a warning) when it is not one."""
    try:
        record = schema.require_object(schema.loads(data or b"{}", "operator record"),
                                       "operator record")
        # (mypy cannot type a comprehension as a TypedDict: fweight alone is a float)
        return cast(OperatorFields, {name: (schema.require_float(name, record[name])
                                            if name == "fweight"
                                            else schema.require_int(name, record[name]))
                                     for name in OPERATOR_FIELDS if name in record})
    except ValueError as exc:
        log.warning("ignoring malformed operator record %s: %s", where, exc)
        return {}


def registered(node: Node, previous: Optional[Node], record: OperatorFields) -> Node:
    """What ``register(node)`` stores: ``node`` keeping what an operator set on
    ``previous`` (the entry still there), else on its ``record``; stamped."""
    if previous is None and record:
        previous = dataclasses.replace(node, **record)
    return stamped(node.reregistered(previous))


#: What ``update`` may set each integer field to: a status or role of PROTOCOL.md §5,
#: a weight or warm-up of 0 or more that fits the readers' int64.
_OPERATOR_RANGES = {"weight": (0, schema.INT_RANGE[1]), "warmup": (0, schema.INT_RANGE[1]),
                    "status": (min(NodeStatus), max(NodeStatus)), "role": (0, 1)}


def operator_changes(**fields: Optional[float]) -> OperatorFields:
    """The ``update`` keywords that were given, as plain numbers; at least one is needed.

    ``ValueError`` for a value out of range or of the wrong type (``fweight`` a
    finite number of 0 or more, the others integers): written, a value the
    readers refuse (NaN, a weight past int64) would take the node out of
    discovery while its provider runs, and a float weight would be truncated.
    """
    changes = {name: value for name, value in fields.items() if value is not None}
    if not changes:
        raise ValueError(f"update needs at least one of {', '.join(OPERATOR_FIELDS)}")
    checked: Dict[str, float] = {}
    for name, value in changes.items():
        if name == "fweight":
            checked[name] = schema.require_float(name, value)
            if checked[name] < 0:
                raise ValueError(f"fweight must be 0 or more, not {value!r}")
        else:
            checked[name] = int(schema.require_int(name, value, _OPERATOR_RANGES[name]))
    if "weight" in checked and "fweight" not in checked:   # (update's docstring says why)
        checked["fweight"] = float(checked["weight"])
    # (the names are update's keywords, so OPERATOR_FIELDS; fweight alone is a float)
    return cast(OperatorFields, checked)


def provider_fields(fields: Mapping[str, Any]) -> Dict[str, Any]:
    """What a provider sets on its own node (``Server(node=...)``), checked as readers
    check a node's JSON and, for the operator's fields, as ``update`` checks them:
    registered unchecked, a value of the wrong type made every reader skip the node
    (its server ran and got no calls). ``ValueError`` naming the key."""
    checked = {}
    for name, value in fields.items():
        try:
            checked[name] = check_field(name, value)
            if name in OPERATOR_FIELDS:
                operator_changes(**{name: value})
        except ValueError as exc:
            raise ValueError(f"node[{name!r}]: {exc}") from None
    return checked


def parse_rule(data: "str | bytes | Mapping[str, Any]") -> RouteRule:
    """A route rule from its registry JSON (text, or already decoded); ``ValueError``
    when it is not one."""
    return RouteRule.from_dict(schema.loads(data, "route rule") if isinstance(data, (str, bytes))
                               else data)


def rule_entry(name: str, text: "str | bytes | None") -> RouteRule:
    """The route rule an entry named ``name`` holds (its id need not be the name);
    ``ValueError`` when it is not one."""
    return parse_rule(text or b"")


def snapshot_of(nodes: Iterable[Node], rules: Iterable[RouteRule]) -> Snapshot:
    """The canonical (sorted, immutable) form of a state, as watches compare it."""
    return (tuple(sorted(nodes, key=lambda n: n.key)), tuple(sorted(rules, key=lambda r: r.id)))
