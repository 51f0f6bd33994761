"""``zk://host:port[,host:port]/chroot``: the MNS tree in ZooKeeper, through kazoo.

Layout: ``{chroot}/octo/nameservice/{prod|stage|test}/{appkey}/provider/{ip}:{port}``
holds ``Node.to_json()``, ``.../{appkey}/route/{id}`` a route rule's JSON,
``.../{appkey}/operator/{ip}:{port}`` what operators set on that node (an
octo_core addition, persistent: the next registration keeps it).
Provider nodes are ephemeral: they vanish with the session of the process
that registered them (a crash, a session expiry, ``close()``).

Threads: kazoo calls block, so the API runs them in the loop's default executor,
each bounded by ``op_timeout`` (a request queued while ZooKeeper is away fails
instead of hanging). Watches: for each watched appkey, a children watch on
``provider/`` and ``route/`` (an exists watch while one is missing: watching
creates nothing) and a data watch on every child. kazoo delivers events on its
own thread; one worker thread applies them in order (reads are pipelined, and
the data changes that arrive meanwhile are read as one batch), then wakes the
``Watch`` handles, which call back on their loops.
Log: kazoo logs a few messages at every reconnection attempt (about 2,400 an
hour during an outage); those go through a ``Throttle`` (the first of each
kind, then one every ``RECONNECT_LOG_EVERY`` seconds counting those held back,
and one line once connected again), kazoo's other messages pass unchanged.
Sessions: after every reconnection the worker re-reads the watched appkeys;
after a lost (expired) session it first re-creates this process's ephemeral
nodes, keeping the operator changes it saw before the loss and those in their
operator records. Work that fails while the session lasts is tried again after
a pause (no reconnection may come to retry it). A session cut off for a
session timeout is checked: if ZooKeeper gives a new session meanwhile, it is
refusing ours (back without its data, a rebuilt ensemble, it refuses every
client that has seen a newer transaction than it has, for as long as that
lasts), so this registry drops it and starts a new one, which recovers as
after a lost session. (A ZooKeeper that is merely down keeps the session: its
nodes outlive the outage.)
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from kazoo.client import KazooClient
from kazoo.exceptions import (BadVersionError, KazooException, NoAuthError, NodeExistsError,
                              NoNodeError)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import EventType, KazooState, WatchedEvent, ZnodeStat

from octo_core.blocking import Pool
from octo_core.business import BusinessPool
from octo_core.errors import NotRegisteredError, RegistryError
from octo_core.registry.base import (Registry, Snapshot, Watch, WatchCallback, check_name,
                                     check_status, node_name, parse_record, provider_entry,
                                     record_json, registered, remember, rule_entry, snapshot_of,
                                     stamped)
from octo_core.registry.node import Env, Node, OperatorFields
from octo_core.registry.route import RouteRule
from octo_core.throttle import Throttle

log = logging.getLogger("octo_core.registry.zookeeper")

ROOT = "/octo/nameservice"
# What a kazoo call raises when ZooKeeper is unreachable, slow or refuses.
_FAILURES = (KazooException, KazooTimeoutError)
# Reconnect quickly after an outage (kazoo's default backoff grows to an hour).
_CONNECTION_RETRY = dict(max_tries=-1, delay=0.1, backoff=1.5, max_delay=2.0)
_UPDATE_ATTEMPTS = 10
# Seconds before recovery work that failed while the session lasted is tried
# again (no reconnection may come to retry it), doubling up to the last.
_RETRY_FIRST, _RETRY_LAST = 0.5, 8.0
# The refused-session check's own kazoo client logs its failures here, quietly: a
# ZooKeeper that is down is the registry's news, told by its session's client.
_probe_log = logging.getLogger("octo_core.registry.zookeeper.probe")
_probe_log.setLevel(logging.CRITICAL)

#: Seconds between kazoo's records of one kind of reconnection message while
#: ZooKeeper is away (it logs one per attempt, every 2 s at most).
RECONNECT_LOG_EVERY = 60.0
# What kazoo logs at each reconnection attempt (its format strings): the failures,
_FAILED_ATTEMPTS = frozenset({"Connection dropped: %s", "Connection time-out: %s",
                              "Cannot resolve %s: %s"})
# and the attempts.
_ATTEMPTS = frozenset({"Connecting to %s(%s):%s, use_ssl: %r"})


#: Reads a znode: its name and its data (``None`` when written without data).
_Parser = Callable[[str, Optional[bytes]], Any]


def _parse(parse: _Parser, path: str, data: Optional[bytes]) -> Any:
    """``parse(name, data)``, or ``None`` (and a warning) when the znode holds something else."""
    try:
        return parse(path.rsplit("/", 1)[1], data)
    except ValueError as exc:   # the parsers refuse bad data so: this znode alone is skipped
        log.warning("ignoring malformed znode %s: %s", path, exc)
        return None


def _detail(exc: BaseException) -> str:
    """A kazoo failure for a message (most have an empty ``str``)."""
    if isinstance(exc, NoAuthError):
        return "NoAuthError: not allowed by the znode's ACL"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _KazooLog(logging.LoggerAdapter):
    """kazoo's logger (``kazoo.client``) as one registry's client uses it: what
    kazoo logs at each reconnection attempt goes through a ``Throttle`` per
    level, keyed by message (the first of each kind, then one every
    ``RECONNECT_LOG_EVERY`` seconds counting those held back); the rest passes
    unchanged. ``connected()`` ends an outage: one line says how many
    connection failures it saw, and the next outage's first messages go out
    at once.

    kazoo logs from its connection thread and calls the state listener that
    calls ``connected()`` there too; a lock keeps the counts whole anyway.
    ``clock`` (seconds, monotonic) is read at every use: tests replace it.
    """

    def __init__(self, hosts: str) -> None:
        super().__init__(logging.getLogger("kazoo.client"), {})
        self.hosts = hosts
        self.clock: Callable[[], float] = time.monotonic
        self.failures = 0   # connection failures since the last connection
        self._lock = threading.Lock()
        self._throttles = self._new_throttles()

    def _new_throttles(self) -> Dict[int, Throttle]:
        return {level: Throttle(RECONNECT_LOG_EVERY, self.logger, level,
                                clock=lambda: self.clock())
                for level in (logging.INFO, logging.WARNING)}

    def process(self, msg: Any, kwargs: Any) -> Tuple[Any, Any]:
        return msg, kwargs   # as kazoo gave them (the default replaces ``extra``)

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        repeated = isinstance(msg, str) and (msg in _FAILED_ATTEMPTS or msg in _ATTEMPTS)
        throttle = self._throttles.get(level) if repeated else None
        if throttle is None:   # (the record names kazoo's line, not this one)
            kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1
            super().log(level, msg, *args, **kwargs)
            return
        with self._lock:
            if msg in _FAILED_ATTEMPTS:
                self.failures += 1
            throttle.log(msg, *args, key=msg)

    def connected(self) -> None:
        """The client is connected (again): say so if it was away, start the count anew."""
        with self._lock:
            failures, self.failures = self.failures, 0
            self._throttles = self._new_throttles()
        if failures:
            self.logger.warning("connected to ZooKeeper %s again after %d connection failures "
                                "(kazoo's messages about them: one per %gs at most)",
                                self.hosts, failures, RECONNECT_LOG_EVERY)


class _ZnodeDir:
    """The children of one znode and their parsed data, kept current by watches.

    Every method but the two event callbacks runs on the registry's worker thread.
    """

    def __init__(self, registry: "ZooKeeperRegistry", path: str,
                 parse: _Parser, on_change: Callable[[], None]) -> None:
        self._registry = registry
        self.path = path
        self._parse = parse
        self._on_change = on_change
        self.names: Set[str] = set()
        self.items: Dict[str, Any] = {}
        self.stopped = False
        # children whose data changed, not read yet: a burst of changes (a scanner
        # round) is read in one pipelined batch and delivered as one change
        self._changed: Set[str] = set()
        self._changed_lock = threading.Lock()

    def reread(self) -> None:
        """Read every child again (a new watch, a reconnection); the caller tells."""
        names = self._children()
        self.names = set(names)
        self.items = self._fetch(names)

    def _children(self) -> List[str]:
        """The children's names, watched; none while the znode does not exist (its
        creation is watched instead: a consumer creates nothing in the tree)."""
        registry, client = self._registry, self._registry._client
        watcher = registry._children_event
        while True:
            try:
                return registry._wait(client.get_children_async(self.path, watcher))
            except NoNodeError:
                if registry._wait(client.exists_async(self.path, watcher)) is None:
                    return []

    def _fetch(self, names: Iterable[str]) -> Dict[str, Any]:
        items, gone = self._registry._get_parsed(self.path, names, self._parse,
                                                 self._registry._child_event)
        self.names -= gone
        return items

    def _children_changed(self) -> None:
        names = self._children()
        new = [name for name in names if name not in self.names]
        self.names = set(names)
        items = {name: item for name, item in self.items.items() if name in self.names}
        items.update(self._fetch(new))
        self.items = items
        self._on_change()

    def _children_reread(self) -> None:
        with self._changed_lock:
            names, self._changed = self._changed, set()
        names &= self.names   # (those removed since: the children watch saw to them)
        if not names:
            return
        fetched = self._fetch(names)
        for name in names:
            if name in fetched:
                self.items[name] = fetched[name]
            else:
                self.items.pop(name, None)
        self._on_change()

    # kazoo's thread (through the registry's watchers): hand the event to the worker.
    def children_event(self, event: WatchedEvent) -> None:
        if not self.stopped and event.type != EventType.NONE:
            self._registry._submit(self._children_changed)

    def child_event(self, event: WatchedEvent) -> None:
        if not self.stopped and event.type != EventType.NONE:
            with self._changed_lock:
                first = not self._changed
                self._changed.add(event.path.rsplit("/", 1)[1])
            if first:
                self._registry._submit(self._children_reread)


class _AppkeyTree:
    """One watched appkey: its provider and route directories, and the watches on it."""

    def __init__(self, registry: "ZooKeeperRegistry", appkey: str) -> None:
        base = registry._appkey_path(appkey)
        self.providers = _ZnodeDir(registry, f"{base}/provider", provider_entry, self._changed)
        self.routes = _ZnodeDir(registry, f"{base}/route", rule_entry, self._changed)
        self.snapshot: Optional[Snapshot] = None
        self._read = False   # both directories once: nothing is delivered before
        self._lock = threading.Lock()
        self._watches: Set[Watch] = set()

    def refresh(self) -> None:
        """Read both directories again, then deliver once: a first delivery of the
        providers alone would start a consumer without its route rules."""
        self.providers.reread()
        self.routes.reread()
        self._read = True
        self._changed()

    def add(self, watch: Watch) -> None:
        with self._lock:
            self._watches.add(watch)

    def remove(self, watch: Watch) -> bool:
        """Forget ``watch``; True when no watch is left."""
        with self._lock:
            self._watches.discard(watch)
            return not self._watches

    @property
    def dirs(self) -> Tuple[_ZnodeDir, _ZnodeDir]:
        return self.providers, self.routes

    def stop(self) -> None:
        self.providers.stopped = self.routes.stopped = True

    def cancel_watches(self) -> None:
        with self._lock:
            watches = list(self._watches)
        for watch in watches:
            watch.cancel()

    def _changed(self) -> None:
        if not self._read:
            return
        self.snapshot = snapshot_of(list(self.providers.items.values()),
                                    list(self.routes.items.values()))
        with self._lock:
            watches = list(self._watches)
        for watch in watches:
            watch.changed()


class ZooKeeperRegistry(Registry):
    """The MNS tree in ZooKeeper (see the module docstring)."""

    def __init__(self, hosts: str, *, chroot: str = "", env: int = Env.PROD,
                 session_timeout: float = 10.0, op_timeout: float = 5.0) -> None:
        super().__init__(env)
        self.hosts = hosts
        self.op_timeout = op_timeout
        self.session_timeout = session_timeout
        self._chroot = chroot
        self._base = f"{chroot}{ROOT}/{Env.NAMES[env]}"
        self._kazoo_log = _KazooLog(hosts)
        self._client = KazooClient(hosts=hosts, timeout=session_timeout,
                                   connection_retry=dict(_CONNECTION_RETRY),
                                   logger=self._kazoo_log)
        # one daemon thread, in order (see octo_core.blocking for why not an executor)
        self._worker = BusinessPool(1, "octo-zk")
        # its calls, which may wait up to op_timeout for a session: a pool of its own
        self._calls = Pool("octo-zk-call", 4)
        self._registered: Dict[str, Node] = {}   # path -> the node as this process registered it
        self._seen: Dict[str, Node] = {}         # path -> its latest data (operator changes)
        # path -> when ZooKeeper wrote the data seen (ms, its clock), 0 for our own
        # writes: an operator record written after it is newer (see _reregister)
        self._seen_at: Dict[str, int] = {}
        self._trees: Dict[str, _AppkeyTree] = {}
        # path -> the watched directory there: kazoo keeps a watcher until its znode
        # changes, so the watchers are this registry's own methods (one entry per
        # path in kazoo's sets), which find the directory watched now, if any
        self._dirs: Dict[str, _ZnodeDir] = {}
        self._retry: Optional[threading.Timer] = None
        self._retry_delay = _RETRY_FIRST
        self._refusal_check: Optional[threading.Timer] = None
        # held to replace the session, and by close() to end it: a replacement never
        # starts a session after close() ended the last one
        self._session_lock = threading.Lock()
        # Sessions lost (kazoo's thread counts them), and how many of those our nodes
        # were last re-created after (the worker's): they differ while nodes are owed.
        self._sessions_lost = 0
        self._reregistered_after = 0
        self._closed = False
        self._client.add_listener(self._on_state)
        self._connected = self._client.start_async()   # set while a session is live

    def __repr__(self) -> str:
        return f"zk://{self.hosts}{self._chroot} ({Env.NAMES[self.env]})"

    # --- paths and plumbing ------------------------------------------------------------

    def _appkey_path(self, appkey: str) -> str:
        return f"{self._base}/{check_name(appkey, 'appkey')}"

    def _node_path(self, appkey: str, key: str) -> str:
        return f"{self._appkey_path(appkey)}/provider/{node_name(key)}"

    def _record_path(self, appkey: str, key: str) -> str:
        return f"{self._appkey_path(appkey)}/operator/{node_name(key)}"

    def _route_path(self, appkey: str, rule_id: str) -> str:
        return f"{self._appkey_path(appkey)}/route/{check_name(rule_id, 'route id')}"

    def _wait(self, result: Any) -> Any:
        """The value of a kazoo async result, waiting at most ``op_timeout``."""
        return result.get(timeout=self.op_timeout)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking kazoo work off the loop; kazoo failures become ``RegistryError``."""
        if self._closed:
            raise RegistryError(f"the ZooKeeper registry {self.hosts} is closed")
        try:
            return await self._calls.run(self._when_connected, fn, *args)
        except _FAILURES as exc:
            raise RegistryError(f"ZooKeeper {_detail(exc)}") from exc
        except RuntimeError:   # its pool shut down by a close() under way
            if not self._closed:
                raise
            raise RegistryError(f"the ZooKeeper registry {self.hosts} is closed") from None

    def _when_connected(self, fn: Callable[..., Any], *args: Any) -> Any:
        # Fail while ZooKeeper is away rather than queue a write that lands much later.
        if not self._connected.wait(self.op_timeout):
            raise RegistryError(f"ZooKeeper {self.hosts} not connected "
                                f"within {self.op_timeout}s")
        return fn(*args)

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Queue watch/session work for the worker thread (any thread may call this)."""
        if self._closed:
            return
        with contextlib.suppress(RuntimeError):   # the worker shut down meanwhile
            self._worker.submit(self._logged, fn, *args)

    def _logged(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except _FAILURES as exc:   # everything is read again, after a pause or a reconnection
            if not self._closed:
                log.info("ZooKeeper watch work failed (%s); reading again", _detail(exc))
                self._recover_later()
        except Exception:
            log.exception("ZooKeeper watch work failed")

    # --- sessions ------------------------------------------------------------------------

    def _on_state(self, state: str) -> None:
        # kazoo's connection thread: never block here.
        if state == KazooState.LOST:
            self._sessions_lost += 1
        elif state == KazooState.CONNECTED:
            self._kazoo_log.connected()
            self._submit(self._recover)
        elif state == KazooState.SUSPENDED:
            self._check_refusal_later()

    def _check_refusal_later(self) -> None:
        """Run ``_check_refusal`` once the session has been cut off for its timeout."""
        if self._closed:
            return
        if self._refusal_check is not None:
            self._refusal_check.cancel()
        self._refusal_check = threading.Timer(self.session_timeout, self._submit,
                                              (self._check_refusal,))
        self._refusal_check.daemon = True
        self._refusal_check.start()

    def _check_refusal(self) -> None:
        """Still cut off: if ZooKeeper gives a new session but not ours, start a new one
        (the module docstring); else look again after another session timeout."""
        if self._closed or self._connected.is_set():
            return
        # (ours gets its own chance too: kazoo retries every 2 s at most)
        if not self._serves_new_sessions() or self._connected.wait(self.op_timeout):
            if not self._connected.is_set():
                self._check_refusal_later()
            return
        with self._session_lock:
            if self._closed:
                return
            log.warning("ZooKeeper %s serves new sessions but refuses this one (back without "
                        "its data? it refuses clients that have seen newer transactions): "
                        "starting a new session, its nodes are registered again", self.hosts)
            self._client.stop()          # (the session is LOST: _on_state counts it)
            self._client.start_async()   # (sets the same event, self._connected, when connected)

    def _end_session(self) -> None:
        with self._session_lock:
            self._client.stop()

    def _serves_new_sessions(self) -> bool:
        """Does ZooKeeper give a new session now (a session of its own, at once closed)?"""
        probe = KazooClient(hosts=self.hosts, timeout=self.session_timeout,
                            connection_retry=dict(max_tries=0), logger=_probe_log)
        try:
            probe.start(timeout=self.op_timeout)
            return True
        except Exception:  # noqa: BLE001 - whatever fails, ZooKeeper is not serving
            return False
        finally:
            probe.stop()
            probe.close()

    def _recover(self) -> None:
        """After a reconnection: re-create our ephemeral nodes if a session was lost
        since they were last made, follow them again, and re-read every watched
        appkey. What fails is tried again after a pause, or at the next
        reconnection, whichever comes first."""
        lost = self._sessions_lost       # (read once: a loss from now on is recovered next)
        reregister = lost != self._reregistered_after
        failed = False
        for path, node in list(self._registered.items()):
            try:
                if reregister:
                    self._reregister(path, node)
                self._follow(path)
            except _FAILURES as exc:
                log.warning("re-registering %s failed (%s); trying again", path, _detail(exc))
                failed = True
        if not failed:
            self._reregistered_after = lost
        for tree in list(self._trees.values()):
            try:
                tree.refresh()
            except _FAILURES as exc:
                log.info("re-reading a watched appkey failed (%s); trying again", _detail(exc))
                failed = True
        if failed:
            self._recover_later()
        else:
            self._retry_delay = _RETRY_FIRST

    def _reregister(self, path: str, node: Node) -> None:
        """Re-create our node after a lost session, keeping what operators set: on the
        node as last seen, and in its operator record (set while we were cut off, the
        change to the node itself went with the session)."""
        record, written = self._read_record(node.appkey, node.key)
        previous = self._seen.get(path)
        if written is not None and record and (
                previous is None or written.mtime >= self._seen_at.get(path, 0)):
            previous = dataclasses.replace(previous or node, **record)
        stored = stamped(node.reregistered(previous))
        self._store(path, stored, self._wait(self._client.exists_async(path)))
        self._saw(path, stored)
        log.info("re-registered %s after the ZooKeeper session was lost", path)

    def _recover_later(self) -> None:
        """Run ``_recover`` again after a pause that doubles each time; one at a time
        (the worker thread, as everything that calls this)."""
        if self._closed or (self._retry is not None and self._retry.is_alive()):
            return
        delay, self._retry_delay = self._retry_delay, min(2 * self._retry_delay, _RETRY_LAST)
        self._retry = threading.Timer(delay, self._submit, (self._retry_recovery,))
        self._retry.daemon = True
        self._retry.start()

    def _retry_recovery(self) -> None:
        if self._connected.is_set():   # (else the reconnection recovers: see _on_state)
            self._recover()

    def _session_id(self) -> Optional[int]:
        client_id = self._client.client_id
        return client_id[0] if client_id else None

    def _store(self, path: str, node: Node, stat: Optional[ZnodeStat]) -> None:
        """Write ``node`` at ``path`` as an ephemeral node of this session."""
        data = node.to_json().encode("utf-8")
        if stat is not None and stat.ephemeralOwner == self._session_id():
            self._wait(self._client.set_async(path, data))
            return
        if stat is not None:
            # Another session's node (say, this provider before a restart): its expiry
            # must not take our registration with it.
            with contextlib.suppress(NoNodeError):
                self._wait(self._client.delete_async(path))
        self._wait(self._client.create_async(path, data, ephemeral=True, makepath=True))

    def _follow(self, path: str) -> None:
        """Keep ``_seen[path]`` current: operator changes to survive a session loss."""
        if path not in self._registered:
            return
        try:
            data, stat = self._wait(self._client.get_async(path, self._own_event))
        except NoNodeError:
            return
        node = _parse(provider_entry, path, data)
        if node is not None:
            self._saw(path, node, stat.mtime)

    def _saw(self, path: str, node: Node, written: int = 0) -> None:
        """``node`` is now at ``path``, written at ``written`` (0: by us)."""
        self._seen[path] = node
        self._seen_at[path] = written

    def _own_event(self, event: WatchedEvent) -> None:
        if event.type == EventType.CHANGED:
            self._submit(self._follow, event.path)

    def _children_event(self, event: WatchedEvent) -> None:
        directory = self._dirs.get(event.path)
        if directory is not None:
            directory.children_event(event)

    def _child_event(self, event: WatchedEvent) -> None:
        if event.path is None:   # kazoo drops every watch at a connection loss: _recover re-reads
            return
        directory = self._dirs.get(event.path.rsplit("/", 1)[0])
        if directory is not None:
            directory.child_event(event)

    # --- blocking operations (executor threads) -----------------------------------------

    def _register(self, node: Node) -> Node:
        path = self._node_path(node.appkey, node.key)
        try:
            data, stat = self._wait(self._client.get_async(path))
            previous = _parse(provider_entry, path, data)
        except NoNodeError:
            previous, stat = None, None
        stored = registered(node, previous, self._read_record(node.appkey, node.key)[0])
        self._store(path, stored, stat)
        self._registered[path] = node
        self._saw(path, stored)
        self._submit(self._follow, path)
        return stored

    def _update(self, appkey: str, key: str, changes: OperatorFields,
                if_status: Optional[int]) -> Node:
        path = self._node_path(appkey, key)
        for _ in range(_UPDATE_ATTEMPTS):
            try:
                data, stat = self._wait(self._client.get_async(path))
            except NoNodeError:
                raise NotRegisteredError(f"{appkey} has no node {key}") from None
            current = _parse(provider_entry, path, data)
            if current is None:
                raise RegistryError(f"{path} does not hold a node")
            check_status(current, if_status, appkey)   # (the versioned set below makes it a CAS)
            stored = stamped(dataclasses.replace(current, **changes))
            try:
                self._wait(self._client.set_async(path, stored.to_json().encode("utf-8"),
                                                  stat.version))
            except BadVersionError:   # someone wrote in between: read again
                continue
            if path in self._registered:   # our own node: a re-creation must keep this
                self._registered[path] = dataclasses.replace(self._registered[path], **changes)
                self._saw(path, stored)
            self._remember(appkey, key, changes)
            return stored
        raise RegistryError(f"{path}: {_UPDATE_ATTEMPTS} concurrent writers in a row, giving up")

    def _delete(self, path: str) -> None:
        with contextlib.suppress(NoNodeError):
            self._wait(self._client.delete_async(path))

    def _read(self, directory: str, parse: _Parser) -> List[Any]:
        try:
            names = self._wait(self._client.get_children_async(directory))
        except NoNodeError:
            return []
        return list(self._get_parsed(directory, names, parse)[0].values())

    def _get_parsed(self, directory: str, names: Iterable[str], parse: _Parser,
                    watch: Optional[Callable[[WatchedEvent], None]] = None
                    ) -> Tuple[Dict[str, Any], Set[str]]:
        """The children ``names`` of ``directory``, read at once (the requests
        pipelined) and parsed: the items by name (those that do not parse are
        left out), and the names found gone."""
        pending = [(name, self._client.get_async(f"{directory}/{name}", watch))
                   for name in names]
        items, gone = {}, set()
        for name, result in pending:
            try:
                data, _ = self._wait(result)
            except NoNodeError:
                gone.add(name)
                continue
            item = _parse(parse, f"{directory}/{name}", data)
            if item is not None:
                items[name] = item
        return items, gone

    def _read_record(self, appkey: str, key: str) -> Tuple[OperatorFields, Optional[ZnodeStat]]:
        path = self._record_path(appkey, key)
        try:
            data, stat = self._wait(self._client.get_async(path))
        except NoNodeError:
            return {}, None
        return parse_record(data, path), stat

    def _remember(self, appkey: str, key: str, changes: OperatorFields) -> None:
        """Add ``changes`` to the node's operator record; versioned like the node's
        own write: two operators at once both get theirs kept."""
        path = self._record_path(appkey, key)
        for _ in range(_UPDATE_ATTEMPTS):
            record, stat = self._read_record(appkey, key)
            kept = remember(record, changes)
            if kept == record:
                return
            data = record_json(kept).encode("utf-8")
            try:
                if stat is None:
                    self._wait(self._client.create_async(path, data, makepath=True))
                else:
                    self._wait(self._client.set_async(path, data, stat.version))
                return
            except (BadVersionError, NodeExistsError, NoNodeError):   # someone wrote in between
                continue
        raise RegistryError(f"{path}: {_UPDATE_ATTEMPTS} concurrent writers in a row, giving up")

    def _put(self, path: str, data: bytes) -> None:
        """Write a persistent znode, creating it when missing."""
        try:
            self._wait(self._client.set_async(path, data))
        except NoNodeError:
            try:
                self._wait(self._client.create_async(path, data, makepath=True))
            except NodeExistsError:   # created in between
                self._wait(self._client.set_async(path, data))

    # --- the Registry API -------------------------------------------------------------

    async def register(self, node: Node) -> Node:
        self._check_node(node)
        return await self._call(self._register, node)

    async def unregister(self, appkey: str, key: str) -> None:
        path = self._node_path(appkey, key)
        self._registered.pop(path, None)
        self._seen.pop(path, None)
        self._seen_at.pop(path, None)
        await self._call(self._delete, path)

    async def _change(self, appkey: str, key: str, changes: OperatorFields,
                      if_status: Optional[int]) -> Node:
        return await self._call(self._update, appkey, key, changes, if_status)

    async def list(self, appkey: str) -> List[Node]:
        directory = f"{self._appkey_path(appkey)}/provider"
        nodes = await self._call(self._read, directory, provider_entry)
        return sorted(nodes, key=lambda node: node.key)

    async def routes(self, appkey: str) -> List[RouteRule]:
        rules = await self._call(self._read, f"{self._appkey_path(appkey)}/route", rule_entry)
        return sorted(rules, key=lambda rule: rule.id)

    async def set_route(self, appkey: str, rule: RouteRule) -> None:
        await self._call(self._put, self._route_path(appkey, rule.id),
                         rule.to_json().encode("utf-8"))

    async def remove_route(self, appkey: str, rule_id: str) -> None:
        await self._call(self._delete, self._route_path(appkey, rule_id))

    def watch(self, appkey: str, callback: WatchCallback) -> Watch:
        tree = self._trees.get(appkey)
        if tree is None:
            tree = self._trees[appkey] = _AppkeyTree(self, appkey)
            for directory in tree.dirs:
                self._dirs[directory.path] = directory
            self._submit(tree.refresh)
        watch = Watch(asyncio.get_running_loop(), callback, lambda: tree.snapshot,
                      lambda w: self._unwatch(appkey, w))
        tree.add(watch)
        watch.changed()
        return watch

    def _unwatch(self, appkey: str, watch: Watch) -> None:
        tree = self._trees.get(appkey)
        if tree is not None and tree.remove(watch):
            tree.stop()
            del self._trees[appkey]
            for directory in tree.dirs:
                if self._dirs.get(directory.path) is directory:
                    del self._dirs[directory.path]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for timer in (self._retry, self._refusal_check):
            if timer is not None:
                timer.cancel()
        for tree in list(self._trees.values()):
            tree.cancel_watches()
        self._registered.clear()
        try:
            # Closing the session removes its ephemeral nodes at once.
            await self._calls.run(self._end_session)
        finally:
            self._client.close()
            self._worker.shutdown()
            self._calls.shutdown()
