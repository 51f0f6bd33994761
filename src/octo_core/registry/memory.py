"""``memory://name``: a registry inside this process, shared by every registry of that name.

For tests and single-process deployments: a server and its clients in one
process (even on different event loops) see the same nodes at once.
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Dict, List, Optional, Set, Tuple

from octo_core.errors import NotRegisteredError
from octo_core.registry.base import (Registry, Snapshot, Watch, WatchCallback, check_name,
                                     check_status, registered, remember, snapshot_of, stamped)
from octo_core.registry.node import Env, Node, OperatorFields
from octo_core.registry.route import RouteRule

_Where = Tuple[int, str]   # (env, appkey)


class _Space:
    """The state every ``MemoryRegistry`` of one name shares."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.nodes: Dict[_Where, Dict[str, Node]] = {}
        self.rules: Dict[_Where, Dict[str, RouteRule]] = {}
        self.records: Dict[_Where, Dict[str, OperatorFields]] = {}   # operator records
        self.watches: Dict[_Where, Set[Watch]] = {}

    def snapshot(self, where: _Where) -> Snapshot:
        with self.lock:
            return snapshot_of(self.nodes.get(where, {}).values(),
                               self.rules.get(where, {}).values())

    def changed(self, where: _Where) -> None:
        with self.lock:
            watches = list(self.watches.get(where, ()))
        for watch in watches:
            watch.changed()


_SPACES: Dict[str, _Space] = {}
_SPACES_LOCK = threading.Lock()


class MemoryRegistry(Registry):
    """An in-process registry; every ``MemoryRegistry(name)`` shares one state."""

    machine_local = True

    def __init__(self, name: str = "", env: int = Env.PROD) -> None:
        super().__init__(env)
        with _SPACES_LOCK:
            self._space = _SPACES.setdefault(name, _Space())
        self._owned: Set[Tuple[str, str]] = set()    # (appkey, key) registered here
        self._watches: Set[Watch] = set()
        self._name = name

    def __repr__(self) -> str:
        return f"memory://{self._name} ({Env.NAMES[self.env]})"

    def _where(self, appkey: str) -> _Where:
        return self.env, check_name(appkey, "appkey")

    async def register(self, node: Node) -> Node:
        self._check_node(node)
        where = self._where(node.appkey)
        space = self._space
        with space.lock:
            nodes = space.nodes.setdefault(where, {})
            record = space.records.get(where, {}).get(node.key, {})
            stored = nodes[node.key] = registered(node, nodes.get(node.key), record)
        self._owned.add((node.appkey, node.key))
        space.changed(where)
        return stored

    async def unregister(self, appkey: str, key: str) -> None:
        where = self._where(appkey)
        self._owned.discard((appkey, key))
        with self._space.lock:
            removed = self._space.nodes.get(where, {}).pop(key, None)
        if removed is not None:
            self._space.changed(where)

    async def _change(self, appkey: str, key: str, changes: OperatorFields,
                      if_status: Optional[int]) -> Node:
        where = self._where(appkey)
        with self._space.lock:
            nodes = self._space.nodes.get(where, {})
            if key not in nodes:
                raise NotRegisteredError(f"{appkey} has no node {key}")
            check_status(nodes[key], if_status, appkey)
            stored = nodes[key] = stamped(dataclasses.replace(nodes[key], **changes))
            records = self._space.records.setdefault(where, {})
            record = records.get(key, {})
            kept = remember(record, changes)
            if kept != record:   # (as the other backends: no record of nothing)
                records[key] = kept
        self._space.changed(where)
        return stored

    async def list(self, appkey: str) -> List[Node]:
        return list(self._space.snapshot(self._where(appkey))[0])

    def watch(self, appkey: str, callback: WatchCallback) -> Watch:
        where = self._where(appkey)
        watch = Watch(asyncio.get_running_loop(), callback,
                      lambda: self._space.snapshot(where), lambda w: self._unwatch(where, w))
        with self._space.lock:
            self._space.watches.setdefault(where, set()).add(watch)
        self._watches.add(watch)
        watch.changed()
        return watch

    def _unwatch(self, where: _Where, watch: Watch) -> None:
        self._watches.discard(watch)
        with self._space.lock:
            self._space.watches.get(where, set()).discard(watch)

    async def routes(self, appkey: str) -> List[RouteRule]:
        return list(self._space.snapshot(self._where(appkey))[1])

    async def set_route(self, appkey: str, rule: RouteRule) -> None:
        where = self._where(appkey)
        check_name(rule.id, "route id")
        with self._space.lock:
            self._space.rules.setdefault(where, {})[rule.id] = rule
        self._space.changed(where)

    async def remove_route(self, appkey: str, rule_id: str) -> None:
        where = self._where(appkey)
        with self._space.lock:
            removed = self._space.rules.get(where, {}).pop(rule_id, None)
        if removed is not None:
            self._space.changed(where)

    async def close(self) -> None:
        for watch in list(self._watches):
            watch.cancel()
        for appkey, key in list(self._owned):
            await self.unregister(appkey, key)
