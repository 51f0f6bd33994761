"""``Directory``: one consumer's cache of one appkey's nodes and route rules (the sg_agent role).

The registry's watch keeps the cache current; a periodic ``refresh`` asks the
registry directly, in case a watch went quiet. What the registry says is taken
unless it looks like a registry failure, which must not take a working client
down with it:

* an error or a timeout changes nothing;
* an empty node list while nodes are known keeps the known nodes (route rules
  still follow the registry) - the last known good list.

Each refusal logs a warning. With ``snapshot_path`` every accepted state is
also saved to that JSON file, and ``start`` falls back to it when the registry
cannot answer, so a client can start during a registry outage; until the
registry lists a node, the snapshot's are the last known (a file registry
whose directory is gone, or whose files are all unreadable, lists none).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from octo_core.blocking import FILES
from octo_core.errors import RegistryError
from octo_core.registry.base import Registry, Watch, parse_rule, snapshot_of
from octo_core.registry.file import write_atomic
from octo_core.registry.node import Node
from octo_core.registry.route import RouteRule

log = logging.getLogger("octo_core.registry.directory")

Subscriber = Callable[[List[Node], List[RouteRule]], None]


class Subscription:
    """What ``Directory.subscribe`` returns: ``cancel()`` stops the callbacks."""

    def __init__(self, subscribers: Set["Subscription"], callback: Subscriber) -> None:
        self._subscribers = subscribers
        self.callback = callback
        subscribers.add(self)

    def cancel(self) -> None:
        """Stop the callbacks (idempotent)."""
        self._subscribers.discard(self)


class Directory:
    """The nodes and route rules of ``appkey``, as this consumer last accepted them.

    ``timeout`` bounds each question to the registry; ``refresh_interval``
    (seconds, ``None``: never) is how often it is asked directly besides the watch.
    """

    def __init__(self, registry: Registry, appkey: str, snapshot_path: Optional[str] = None, *,
                 timeout: float = 5.0, refresh_interval: Optional[float] = 30.0) -> None:
        self.registry = registry
        self.appkey = appkey
        self.snapshot_path = snapshot_path
        self.timeout = timeout
        self.refresh_interval = refresh_interval
        self._nodes: Tuple[Node, ...] = ()
        self._saved_nodes: Tuple[Node, ...] = ()   # the snapshot's, until nodes are known
        self._saved_rules: Tuple[RouteRule, ...] = ()   # (and its rules)
        self._rules: Tuple[RouteRule, ...] = ()
        self._version = 0
        self._subscribers: Set[Subscription] = set()
        self._watch: Optional[Watch] = None
        self._deliveries = 0          # watch callbacks so far: a newer word than a slow fetch
        self._first_delivery: Optional[asyncio.Future] = None   # start() waits for it too
        self._refresher: Optional[asyncio.Task] = None
        self._saver: Optional[asyncio.Task] = None
        self._save_pending = False
        self._closed = False

    # --- state -------------------------------------------------------------------------

    @property
    def nodes(self) -> Tuple[Node, ...]:
        """Every known node (any status), sorted by key."""
        return self._nodes

    @property
    def rules(self) -> Tuple[RouteRule, ...]:
        """The route rules, sorted by id."""
        return self._rules

    @property
    def version(self) -> int:
        """0 before anything was accepted; +1 on each accepted change."""
        return self._version

    def subscribe(self, callback: Subscriber) -> Subscription:
        """Call ``callback(nodes, rules)`` on the event loop after each accepted change
        (not for the current state: read ``nodes`` and ``rules`` for that)."""
        return Subscription(self._subscribers, callback)

    # --- life cycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Watch the registry and load the current state.

        When the registry cannot answer within ``timeout`` (and its watch has
        not spoken either), the snapshot is loaded instead; with no usable
        snapshot, ``RegistryError``. A failed start stops its watch, and may be
        tried again.
        """
        if self._closed:
            return
        if self.snapshot_path is not None and not self._nodes:
            try:
                nodes, rules = await FILES.run(_read_snapshot, self.snapshot_path, self.appkey)
                self._saved_nodes, self._saved_rules = tuple(nodes), tuple(rules)
            except _UNUSABLE:   # (said when it is needed: the registry failed)
                pass
        self._watch = self.registry.watch(self.appkey, self._on_watch)
        try:
            await self._load()
        except BaseException:
            self._watch.cancel()   # a failed start leaves nothing behind: start() may be retried
            raise
        if self.refresh_interval and not self._closed:   # (closed while it loaded: no refresher)
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_every())

    async def _load(self) -> None:
        """The current state: the registry's answer or its watch's first delivery,
        whichever comes first (a large appkey need not be read twice before a
        start ends); else, the watch silent too, the snapshot."""
        fetching = asyncio.ensure_future(self._fetch())
        if not self._deliveries:
            self._first_delivery = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait({fetching, self._first_delivery},
                                   return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                fetching.cancel()
                raise
        if self._deliveries:
            fetching.cancel()   # (it may still end in an error that nobody needs: see _fetch)
            return
        try:
            await fetching
        except Exception as exc:  # noqa: BLE001 - any registry failure: fall back
            if self._version:   # started from the snapshot meanwhile (start_from_snapshot)
                log.warning("%s: the registry failed (%r); going on from the snapshot",
                            self.appkey, exc)
                return
            if not self._deliveries and not await self._load_snapshot(exc):
                raise RegistryError(f"cannot discover {self.appkey}: the registry failed ({exc!r}) "
                                    "and there is no snapshot to start from") from exc

    def start_from_snapshot(self) -> bool:
        """For a caller that cannot wait for the registry any longer: a start still
        waiting for it takes the snapshot's nodes now (the start goes on, and the
        registry's answer, when it comes, replaces them). Returns whether nodes
        are known now (False: there is no usable snapshot)."""
        if not self._version and self._saved_nodes:
            log.warning("%s: the registry has not answered yet; starting from the snapshot "
                        "%s (%d nodes)", self.appkey, self.snapshot_path, len(self._saved_nodes))
            self._accept(*snapshot_of(self._saved_nodes, self._saved_rules))
        return bool(self._version)

    async def refresh(self) -> bool:
        """Ask the registry now; True when that changed the state. Never raises for a
        registry failure (it is logged and the last known good state kept)."""
        try:
            return await self._fetch()
        except Exception as exc:  # noqa: BLE001 - keep the last known good state
            log.warning("%s: registry refresh failed (%r); keeping the last %d known nodes",
                        self.appkey, exc, len(self._nodes))
            return False

    async def close(self) -> None:
        """Stop watching and refreshing (a start still under way starts neither); a
        pending snapshot write is finished first."""
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        if self._saver is not None:
            await asyncio.gather(self._saver, return_exceptions=True)
        self._subscribers.clear()

    async def __aenter__(self) -> "Directory":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- accepting changes -------------------------------------------------------------

    def _on_watch(self, nodes: List[Node], rules: List[RouteRule]) -> None:
        self._deliveries += 1
        if self._first_delivery is not None and not self._first_delivery.done():
            self._first_delivery.set_result(None)
        self._offer(nodes, rules, "watch")

    async def _fetch(self) -> bool:
        deliveries = self._deliveries
        fetching = asyncio.gather(self.registry.list(self.appkey),
                                  self.registry.routes(self.appkey))
        # cancelled (a close, the timeout), it may still end in an error no one reads
        fetching.add_done_callback(lambda done: done.cancelled() or done.exception())
        nodes, rules = await asyncio.wait_for(fetching, self.timeout)
        if self._deliveries != deliveries:   # the watch spoke meanwhile: it is at least as new
            return False
        return self._offer(nodes, rules, "refresh")

    async def _refresh_every(self) -> None:
        # (until closed, not only until cancelled: before Python 3.12, close()'s cancel
        # is lost when it comes as _fetch's wait_for gets its answer)
        while not self._closed:
            await asyncio.sleep(self.refresh_interval)  # type: ignore[arg-type]  # started with one
            await self.refresh()

    def _offer(self, nodes: Sequence[Node], rules: Sequence[RouteRule], origin: str) -> bool:
        """Take a state from the registry unless it looks like a registry failure."""
        new_nodes, new_rules = snapshot_of(nodes, rules)
        if not new_nodes and self._nodes:
            log.warning("%s: the registry (%s) lists no nodes; keeping the last %d known",
                        self.appkey, origin, len(self._nodes))
            new_nodes = self._nodes
        elif not new_nodes and self._saved_nodes:
            log.warning("%s: the registry (%s) lists no nodes; starting from the %d of the "
                        "snapshot %s", self.appkey, origin, len(self._saved_nodes),
                        self.snapshot_path)
            new_nodes = snapshot_of(self._saved_nodes, ())[0]
        if new_nodes == self._nodes and new_rules == self._rules:
            return False
        self._accept(new_nodes, new_rules)
        self._save_soon()
        return True

    def _accept(self, nodes: Tuple[Node, ...], rules: Tuple[RouteRule, ...]) -> None:
        self._nodes, self._rules = nodes, rules
        if nodes:
            self._saved_nodes, self._saved_rules = (), ()
        self._version += 1
        for subscription in list(self._subscribers):
            try:
                subscription.callback(list(nodes), list(rules))
            except Exception:  # one subscriber's bug must not starve the others
                log.exception("%s: directory subscriber failed", self.appkey)

    # --- the snapshot ------------------------------------------------------------------

    def _save_soon(self) -> None:
        if self.snapshot_path is None:
            return
        self._save_pending = True
        if self._saver is None or self._saver.done():
            self._saver = asyncio.get_running_loop().create_task(self._save())

    async def _save(self) -> None:
        # One writer at a time, always the latest state: writes cannot land out of order.
        while self._save_pending:
            self._save_pending = False
            try:
                await FILES.run(_write_snapshot, self.snapshot_path, self.appkey,
                                        self._nodes, self._rules)
            except OSError as exc:
                log.warning("%s: cannot write the snapshot %s: %s",
                            self.appkey, self.snapshot_path, exc)

    async def _load_snapshot(self, why: Exception) -> bool:
        if self.snapshot_path is None:
            return False
        try:
            nodes, rules = await FILES.run(_read_snapshot, self.snapshot_path, self.appkey)
        except _UNUSABLE as exc:
            log.warning("%s: the registry failed (%r) and the snapshot %s is unusable: %s",
                        self.appkey, why, self.snapshot_path, exc)
            return False
        log.warning("%s: the registry failed (%r); starting from the snapshot %s (%d nodes)",
                    self.appkey, why, self.snapshot_path, len(nodes))
        self._accept(*snapshot_of(nodes, rules))
        return True


#: What reading a snapshot that is missing or is not one raises.
_UNUSABLE = (OSError, ValueError, KeyError, TypeError, RecursionError)


def _write_snapshot(path: str, appkey: str, nodes: Sequence[Node],
                    rules: Sequence[RouteRule]) -> None:
    document = {"appkey": appkey, "saved": time.time(),
                "nodes": [node.to_dict() for node in nodes],
                "rules": [json.loads(rule.to_json()) for rule in rules]}
    write_atomic(path, json.dumps(document, separators=(",", ":")))


def _read_snapshot(path: str, appkey: str) -> Tuple[List[Node], List[RouteRule]]:
    """The snapshot's nodes and rules; ``ValueError`` (``OSError``, or ``RecursionError``
    for JSON nested too deep) when it is not one ``_write_snapshot`` wrote for ``appkey``."""
    with open(path, encoding="utf-8") as f:
        document = json.load(f)
    if not isinstance(document, dict):
        raise ValueError(f"it holds a JSON {type(document).__name__}, not an object")
    if document.get("appkey") != appkey:
        raise ValueError(f"it holds appkey {document.get('appkey')!r}")
    return ([Node.from_dict(node) for node in _objects(document, "nodes")],
            [parse_rule(rule) for rule in _objects(document, "rules")])


def _objects(document: Dict[str, Any], key: str) -> List[Dict[str, Any]]:
    """``document[key]``, checked to be a list of JSON objects."""
    items = document.get(key)
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ValueError(f"its {key!r} is not a list of objects")
    return items
