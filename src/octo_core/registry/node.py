"""``Node``: one provider ``ip:port`` of an appkey, as the OCTO naming service describes it.

JSON keys are those of the reference ZooKeeper layout (PROTOCOL.md §5),
plus octo_core's ``cell``, ``swimlane``, ``idc`` and ``region``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any, Dict, Mapping, Optional, TypedDict

from octo_core.protocol import NodeStatus
from octo_core.registry import schema


class Role:
    """``Node.role``: a backup node takes calls only when no primary can."""
    PRIMARY = 0
    BACKUP = 1


class Env:
    """``Node.env`` and a registry's environment; ``NAMES``: their path names."""
    TEST = 1
    STAGE = 2
    PROD = 3
    NAMES = {PROD: "prod", STAGE: "stage", TEST: "test"}


class HeartbeatSupport:
    """``Node.heartbeatSupport``: which heartbeats the node answers (peer to peer,
    the scanner's, both)."""
    NONE = 0
    P2P = 1
    SCANNER = 2
    BOTH = 3


class OperatorFields(TypedDict, total=False):
    """What an operator sets on a node (``Registry.update``): the changes, and the
    operator record a registry keeps of them."""
    weight: int
    fweight: float
    status: int
    role: int
    warmup: int


@dataclasses.dataclass
class Node:
    """A provider node. ``key`` (``ip:port``) identifies it within its appkey."""

    appkey: str
    ip: str
    port: int
    version: str = ""
    weight: int = 10
    fweight: float = 0.0
    status: int = NodeStatus.ALIVE
    role: int = Role.PRIMARY
    env: int = Env.PROD
    lastUpdateTime: int = 0
    serverType: int = 0
    protocol: str = "thrift"
    warmup: int = 0
    heartbeatSupport: int = HeartbeatSupport.BOTH
    serviceInfo: Dict[str, Dict[str, int]] = dataclasses.field(default_factory=dict)
    cell: str = ""
    swimlane: str = ""
    idc: str = ""
    region: str = ""
    # When the provider started (seconds since the epoch): the warm-up clock. An
    # octo_core key; a node without it (a Java provider's) warms up from its
    # lastUpdateTime, the clock the reference implementation uses.
    startTime: int = 0

    @functools.cached_property
    def key(self) -> str:
        """``ip:port`` (cached: it is read several times per call)."""
        return f"{self.ip}:{self.port}"

    @functools.cached_property
    def address(self) -> str:
        """What a client connects to (a unix socket path is kept in ``ip`` as
        ``unix://...``; cached, as ``key``)."""
        return self.ip if self.ip.startswith("unix://") else self.key

    @property
    def alive(self) -> bool:
        """Whether the node's status is ALIVE."""
        return self.status == NodeStatus.ALIVE

    @property
    def started(self) -> int:
        """When warm-up began: ``startTime``, else ``lastUpdateTime`` (0: unknown)."""
        return self.startTime or self.lastUpdateTime

    def serves(self, service: Optional[str], unified: bool) -> bool:
        """Whether a thrift client of ``service`` can call this node: a thrift
        server (``serverType`` 0) that, if it lists its services in
        ``serviceInfo``, lists this one, and for a unified-protocol client does
        not mark it ``unifiedProto: 0``. ``service`` None: the client names no
        service on the wire (plain native thrift), so any thrift node may do."""
        if self.serverType != 0:
            return False
        if service is None or not self.serviceInfo:
            return True
        info = self.serviceInfo.get(service)
        return info is not None and not (unified and info.get("unifiedProto") == 0)

    def base_weight(self) -> float:
        """``fweight`` when set (non-zero), else ``weight``."""
        return self.fweight if self.fweight else float(self.weight)

    def effective_weight(self, now: Optional[float] = None) -> float:
        """The weight after warm-up: ``weight * elapsed / warmup`` while warming, at
        least 1 but never more than the full weight (Dubbo's rule:
        ``min(weight, max(1, weight * elapsed / warmup))``; a node of weight below 1
        keeps it through warm-up).

        A node with weight 0 stays at 0 (an operator took it out of rotation).
        """
        weight = self.base_weight()
        started = self.started
        if weight <= 0 or self.warmup <= 0 or not started:
            return max(weight, 0.0)
        elapsed = (time.time() if now is None else now) - started
        if elapsed >= self.warmup:
            return weight
        return min(weight, max(1.0, weight * max(elapsed, 0.0) / self.warmup))

    # --- JSON (the reference layout's keys) ----------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        """The node's fields, by their reference JSON keys."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The node as reference JSON (what ``from_dict`` reads back)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Node":
        """A node from reference JSON; unknown keys are ignored, missing ones defaulted.

        A JSON ``null`` counts as missing: Java providers serialised by Jackson
        write their unset fields (``version``, ``protocol``...) as ``null``.
        ``ValueError`` when ``data`` is not an object, lacks ``appkey``, ``ip`` or
        ``port``, holds a value of the wrong type or out of range, or an ``ip``
        and ``port`` no caller can dial (an empty ip, port 0 but for a unix
        socket): a node that would break every call routed to it is refused
        here instead.
        """
        data = schema.require_object(data, "node")
        present = {name: value for name, value in data.items() if value is not None}
        missing = [k for k in ("appkey", "ip", "port") if k not in present]
        if missing:
            raise ValueError(f"node JSON lacks {', '.join(missing)}")
        values = {name: _check_field(name, kind, present[name])
                  for name, kind in _FIELD_KINDS.items() if name in present}
        node = cls(**values)
        _check_address(node)
        return node

    @classmethod
    def from_json(cls, text: "str | bytes") -> "Node":
        """A node from its JSON text; ``ValueError`` as ``from_dict``, or for bad JSON."""
        return cls.from_dict(schema.loads(text, "node"))

    def reregistered(self, previous: Optional["Node"]) -> "Node":
        """This node as it should be stored when ``previous`` is already registered.

        Re-registration keeps what an operator set: weight, fweight, role, warmup,
        and a STOPPED or STARTING status (PROTOCOL.md §5).
        """
        if previous is None:
            return self
        kept: OperatorFields = dict(weight=previous.weight, fweight=previous.fweight,
                                    role=previous.role, warmup=previous.warmup)
        if previous.status in (NodeStatus.STOPPED, NodeStatus.STARTING):
            kept["status"] = previous.status
        return dataclasses.replace(self, **kept)


#: Each JSON field of a node and the kind of value it holds (its annotation).
_FIELD_KINDS: Dict[str, str] = {f.name: str(f.type) for f in dataclasses.fields(Node)}
_PORT_RANGE = (0, 65535)


def check_field(name: str, value: Any) -> Any:
    """``value`` checked to be what node field ``name`` holds, as ``from_dict`` checks
    it; ``ValueError`` if not, or if a node has no such field."""
    if name not in _FIELD_KINDS:
        raise ValueError(f"node has no field {name!r} (its fields: {', '.join(_FIELD_KINDS)})")
    return _check_field(name, _FIELD_KINDS[name], value)


def _check_field(name: str, kind: str, value: Any) -> Any:
    """``value`` checked to be what node field ``name`` holds (``ValueError`` if not)."""
    if name == "port":
        return schema.require_int(name, value, _PORT_RANGE)
    if kind == "str":
        return schema.require_str(name, value)
    if kind == "int":
        return schema.require_int(name, value)
    if kind == "float":
        return schema.require_float(name, value)
    return _service_info(value)


def _check_address(node: Node) -> None:
    """``ValueError`` unless a caller can dial ``node``: its calls would fail with a
    bad address, not a failed connect, so nothing would take it out of rotation.
    (Read here, not by the transport's parser: the registry knows no transport.)"""
    if node.ip.startswith("unix://"):
        if node.ip == "unix://":
            raise ValueError(f"no socket path in ip {node.ip!r}")
        return
    if not node.ip or node.ip != node.ip.strip():
        raise ValueError(f"ip {node.ip!r} is no host a caller can dial")
    if node.port == 0:
        raise ValueError(f"port 0 is no TCP port (node {node.key}; only a unix socket has none)")


def _service_info(value: Any) -> Dict[str, Dict[str, int]]:
    """``serviceInfo``: ``{serviceName: {"unifiedProto": 0|1, ...}}``."""
    services = schema.require_object(value, "serviceInfo")
    for service, info in services.items():
        for key, flag in schema.require_object(info, f"serviceInfo[{service!r}]").items():
            schema.require_int(f"serviceInfo[{service!r}][{key!r}]", flag)
    return services
