"""``file:///dir``: the embedded registry, for one machine and many processes.

The layout mirrors the MNS tree::

    dir/{prod|stage|test}/{appkey}/provider/{ip}:{port}.json   a node, Node.to_json()
    dir/{prod|stage|test}/{appkey}/route/{id}.json            a route rule
    dir/{prod|stage|test}/{appkey}/operator/{ip}:{port}.json  what operators set on a node
    dir/{prod|stage|test}/{appkey}/.lock                      serializes read-modify-write
    dir/{prod|stage|test}/{appkey}/.epoch                     a random id, made with the directory

Writes are atomic (a temporary file, then ``os.replace``): readers never see
half a file. Liveness is a TTL on a node file's mtime: the process that
registered a node touches its file every ``ttl / 3``, and a file older than
``ttl`` is a node that is gone, so a crashed provider disappears by itself (its
file stays, ignored, until that ``ip:port`` registers again). Any write renews
the TTL, so an operator's update keeps a dead provider's node one TTL longer.
A node file removed by someone else is an unregistration: its process stops
renewing it. An appkey directory removed or moved away (or one above it) is the
registry losing its state: the process registers its nodes again, as a
ZooKeeper provider does after its session is lost. ``.epoch`` tells the two
apart: a node file gone from the directory it was registered in is an
unregistration, from a directory made since (its epoch differs; inode numbers
are reused at once) a loss.

Watches poll: one ``stat`` per directory and interval (``os.replace`` and
``unlink`` change the directory's mtime); a directory is rescanned only when
it changed or its oldest node is due to expire.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import math
import os
import stat
import tempfile
import time
import uuid
from typing import (Callable, Dict, Generic, Iterator, List, NamedTuple, Optional,
                    Set, Tuple, TypeVar)

from octo_core.blocking import FILES
from octo_core.errors import NotRegisteredError
from octo_core.registry.base import (Registry, Snapshot, Watch, WatchCallback, check_name,
                                     check_status, node_name, parse_record, provider_entry,
                                     record_json, registered, remember, rule_entry, snapshot_of,
                                     stamped)
from octo_core.registry.node import Env, Node, OperatorFields
from octo_core.registry.route import RouteRule

log = logging.getLogger("octo_core.registry.file")

T = TypeVar("T")

# Filesystem timestamps tick coarsely: two changes in one tick leave one mtime.
# A directory or file changed this recently is re-read on the next poll too.
SETTLE_SECONDS = 1.0
# A node or route rule is a few hundred bytes: a bigger file is not one of ours.
MAX_FILE_SIZE = 1 << 20


def read_small_file(path: str) -> Tuple[float, str]:
    """The mtime and UTF-8 text of the regular file at ``path``.

    ``ValueError`` when it is anything else (a directory, a FIFO, a device: opened
    non-blocking, so a FIFO cannot stall the reader), larger than ``MAX_FILE_SIZE``
    or not UTF-8; ``OSError`` when it cannot be opened or read.
    """
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        data = f.read(MAX_FILE_SIZE + 1)   # the size may have changed since the fstat
    if len(data) > MAX_FILE_SIZE:
        raise ValueError(f"larger than {MAX_FILE_SIZE} bytes")
    return st.st_mtime, data.decode("utf-8")


#: Reads an entry: its name (the file's, less ``.json``) and its text.
_Parser = Callable[[str, str], T]


def _load(path: str, parse: _Parser[T], max_age: Optional[float] = None) -> Optional[T]:
    """What ``parse`` makes of the file at ``path``; ``None`` when the file is missing,
    older than ``max_age`` seconds, or not a registry file (a warning says why)."""
    try:
        mtime, text = read_small_file(path)
        if max_age is not None and time.time() - mtime > max_age:
            return None
        return parse(os.path.basename(path)[:-len(".json")], text)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:   # this entry alone is unusable
        log.warning("ignoring malformed registry file %s: %s", path, exc)
        return None


class _JsonDir(Generic[T]):
    """The JSON files of one directory, parsed; a rescan re-reads only changed files."""

    def __init__(self, path: str, parse: _Parser[T], ttl: Optional[float] = None) -> None:
        self.path = path
        self._parse = parse
        self._ttl = ttl
        self.items: Dict[str, T] = {}
        # name -> (stat signature, None when stat failed; parsed, None when unusable)
        self._files: Dict[str, Tuple[Optional[tuple], Optional[T]]] = {}
        self._dir_signature: Optional[tuple] = None
        self._rescan_at = 0.0   # rescan by then even if the directory did not change

    def _signature(self) -> Optional[tuple]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def stale(self, now: float) -> bool:
        """Whether a rescan is due (one ``stat``)."""
        return now >= self._rescan_at or self._signature() != self._dir_signature

    def rescan(self, now: float) -> bool:
        """Read the directory again; True when its items changed."""
        self._dir_signature = self._signature()
        rescan_at = math.inf
        if self._dir_signature is not None and now - self._dir_signature[1] / 1e9 < SETTLE_SECONDS:
            rescan_at = now
        files = {}
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(".json"):
                continue
            try:
                st: Optional[os.stat_result] = entry.stat()
            except FileNotFoundError:
                continue
            except OSError:   # a symlink loop, say: reading it fails once, with a warning
                st = None
            if st is not None and self._ttl is not None:
                expires = st.st_mtime + self._ttl
                if expires <= now:
                    continue
                rescan_at = min(rescan_at, expires)
            signature = None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns)
            settled = st is None or now - st.st_mtime > SETTLE_SECONDS
            known = self._files.get(entry.name)
            if known is not None and known[0] == signature and settled:
                files[entry.name] = known
            else:
                files[entry.name] = (signature, _load(entry.path, self._parse))
        self._files = files
        self._rescan_at = rescan_at
        items = {name: item for name, (_, item) in files.items() if item is not None}
        changed = items != self.items
        self.items = items
        return changed


def _read_now(directory: _JsonDir[T]) -> List[T]:
    directory.rescan(time.time())
    return list(directory.items.values())


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)   # other processes, maybe other users, read it
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Poller:
    """Polls one appkey's directories for the watches on it."""

    def __init__(self, providers: _JsonDir[Node], routes: _JsonDir[RouteRule],
                 interval: float) -> None:
        self.providers = providers
        self.routes = routes
        self.watches: Set[Watch] = set()
        self.snapshot: Optional[Snapshot] = None
        self._failing = False   # the last poll failed (said once, not at every poll)
        self.task = asyncio.get_running_loop().create_task(self._run(interval))

    async def _run(self, interval: float) -> None:
        while True:
            now = time.time()
            try:
                stale = [d for d in (self.providers, self.routes) if d.stale(now)]
                changed = bool(stale) and any(
                    await FILES.run(lambda: [d.rescan(now) for d in stale]))
                if changed or self.snapshot is None:   # the first poll is news, even if empty
                    self.snapshot = snapshot_of(list(self.providers.items.values()),
                                                list(self.routes.items.values()))
                    for watch in list(self.watches):
                        watch.changed()
            except OSError as exc:
                if not self._failing:   # (an outage would log one line a poll, 5 a second)
                    log.warning("polling %s failed: %s (said once until it works again)",
                                self.providers.path, exc)
                self._failing = True
            except Exception:  # a bug must not end discovery: the next poll tries again
                log.exception("polling %s failed", self.providers.path)
            else:
                if self._failing:
                    log.warning("polling %s works again", self.providers.path)
                    self._failing = False
            await asyncio.sleep(interval)


class _Owned(NamedTuple):
    """A node this process registered: as it was given, and the epoch of its appkey
    directory then."""
    node: Node
    epoch: str


class FileRegistry(Registry):
    """Nodes and route rules as JSON files under ``root`` (see the module docstring)."""

    machine_local = True

    def __init__(self, root: str, *, env: int = Env.PROD, ttl: float = 10.0,
                 interval: float = 0.2) -> None:
        super().__init__(env)
        self.root = os.path.abspath(root)
        self.ttl = ttl
        self.interval = interval
        self._owned: Dict[str, _Owned] = {}    # node files registered here
        self._keep_alive: Optional[asyncio.Task] = None
        self._pollers: Dict[str, _Poller] = {}

    def __repr__(self) -> str:
        return f"file://{self.root} ({Env.NAMES[self.env]})"

    # --- paths -----------------------------------------------------------------------

    def _appkey_dir(self, appkey: str) -> str:
        return os.path.join(self.root, Env.NAMES[self.env], check_name(appkey, "appkey"))

    def _node_path(self, appkey: str, key: str) -> str:
        return os.path.join(self._appkey_dir(appkey), "provider", node_name(key) + ".json")

    def _record_path(self, appkey: str, key: str) -> str:
        return os.path.join(self._appkey_dir(appkey), "operator", node_name(key) + ".json")

    def _route_path(self, appkey: str, rule_id: str) -> str:
        return os.path.join(self._appkey_dir(appkey), "route", check_name(rule_id, "route id") + ".json")

    def _providers(self, appkey: str) -> _JsonDir[Node]:
        directory = os.path.join(self._appkey_dir(appkey), "provider")
        return _JsonDir(directory, provider_entry, self.ttl)

    def _routes(self, appkey: str) -> _JsonDir[RouteRule]:
        return _JsonDir(os.path.join(self._appkey_dir(appkey), "route"), rule_entry)

    # --- blocking work (runs on a worker thread) --------------------------------------

    @contextlib.contextmanager
    def _locked(self, appkey: str) -> Iterator[None]:
        directory = self._appkey_dir(appkey)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _epoch_path(self, appkey: str) -> str:
        return os.path.join(self._appkey_dir(appkey), ".epoch")

    def _read_epoch(self, appkey: str) -> Optional[str]:
        """The appkey directory's epoch; None when there is none (or it is unreadable)."""
        try:
            return read_small_file(self._epoch_path(appkey))[1]
        except (OSError, ValueError):
            return None

    def _read_live(self, path: str) -> Optional[Node]:
        """The node stored at ``path`` unless it is missing, expired or malformed."""
        return _load(path, provider_entry, self.ttl)

    def _read_record(self, appkey: str, key: str) -> OperatorFields:
        path = self._record_path(appkey, key)
        try:
            text = read_small_file(path)[1]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:   # not a small, readable regular file
            log.warning("ignoring operator record %s: %s", path, exc)
            return {}
        return parse_record(text, path)

    def _register(self, node: Node) -> Tuple[Node, str]:
        """Store ``node``; returns what was stored and the epoch of its appkey directory."""
        path = self._node_path(node.appkey, node.key)
        with self._locked(node.appkey):
            epoch = self._read_epoch(node.appkey)
            if epoch is None:   # (a directory made now; an old one from before epochs)
                epoch = uuid.uuid4().hex
                write_atomic(self._epoch_path(node.appkey), epoch)
            record = self._read_record(node.appkey, node.key)
            stored = registered(node, self._read_live(path), record)
            write_atomic(path, stored.to_json())
        return stored, epoch

    def _update(self, appkey: str, key: str, changes: OperatorFields,
                if_status: Optional[int]) -> Node:
        path = self._node_path(appkey, key)
        with self._locked(appkey):
            current = self._read_live(path)
            if current is None:
                raise NotRegisteredError(f"{appkey} has no node {key}")
            check_status(current, if_status, appkey)
            stored = stamped(dataclasses.replace(current, **changes))
            write_atomic(path, stored.to_json())
            record = self._read_record(appkey, key)
            kept = remember(record, changes)
            if kept != record:
                write_atomic(self._record_path(appkey, key), record_json(kept))
        return stored

    def _touch(self, owned: Dict[str, _Owned]) -> Tuple[List[str], Dict[str, _Owned]]:
        """Renew the TTL of the ``owned`` node files; returns those that someone else
        unregistered, and those registered again (with their new epoch).

        A file that already expired (this process was paused past the TTL) is
        rewritten instead: watchers dropped it and only notice changes to the
        directory, which a new mtime on the file does not make. A file whose
        directory was lost is registered again (see the module docstring).
        """
        gone, again = [], {}
        now = time.time()
        for path, (node, epoch) in owned.items():
            try:
                if now - os.stat(path).st_mtime >= self.ttl:
                    write_atomic(path, read_small_file(path)[1])
                else:
                    os.utime(path)
            except FileNotFoundError:
                if self._read_epoch(node.appkey) == epoch:
                    gone.append(path)
                else:
                    log.warning("%s: the registry directory it was in is gone; registering "
                                "it again", path)
                    again[path] = _Owned(node, self._register(node)[1])
            except ValueError as exc:   # replaced by something that is no node of ours
                log.warning("%s: %s", path, exc)
                gone.append(path)
        return gone, again

    # --- the Registry API -------------------------------------------------------------

    async def register(self, node: Node) -> Node:
        self._check_node(node)
        stored, epoch = await FILES.run(self._register, node)
        self._owned[self._node_path(node.appkey, node.key)] = _Owned(node, epoch)
        if self._keep_alive is None:
            self._keep_alive = asyncio.get_running_loop().create_task(self._renew())
        return stored

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                gone, again = await FILES.run(self._touch, dict(self._owned))
            except OSError as exc:
                log.warning("renewing node files under %s failed: %s", self.root, exc)
                continue
            for path in gone:
                log.info("%s was unregistered by someone else; no longer renewing it", path)
                self._owned.pop(path, None)
            for path, owned in again.items():
                if path in self._owned:   # (not unregistered meanwhile)
                    self._owned[path] = owned

    async def unregister(self, appkey: str, key: str) -> None:
        path = self._node_path(appkey, key)
        self._owned.pop(path, None)
        await FILES.run(self._unlink, appkey, path)

    def _unlink(self, appkey: str, path: str) -> None:
        # under the appkey lock, so a concurrent update cannot write the node back
        with self._locked(appkey), contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    async def _change(self, appkey: str, key: str, changes: OperatorFields,
                      if_status: Optional[int]) -> Node:
        return await FILES.run(self._update, appkey, key, changes, if_status)

    async def list(self, appkey: str) -> List[Node]:
        nodes = await FILES.run(_read_now, self._providers(appkey))
        return sorted(nodes, key=lambda node: node.key)

    async def routes(self, appkey: str) -> List[RouteRule]:
        rules = await FILES.run(_read_now, self._routes(appkey))
        return sorted(rules, key=lambda rule: rule.id)

    def watch(self, appkey: str, callback: WatchCallback) -> Watch:
        poller = self._pollers.get(appkey)
        if poller is None:
            poller = self._pollers[appkey] = _Poller(self._providers(appkey), self._routes(appkey),
                                                     self.interval)
        watch = Watch(asyncio.get_running_loop(), callback, lambda: poller.snapshot,
                      lambda w: self._unwatch(appkey, w))
        poller.watches.add(watch)
        watch.changed()
        return watch

    def _unwatch(self, appkey: str, watch: Watch) -> None:
        poller = self._pollers.get(appkey)
        if poller is None:
            return
        poller.watches.discard(watch)
        if not poller.watches:
            poller.task.cancel()
            del self._pollers[appkey]

    async def set_route(self, appkey: str, rule: RouteRule) -> None:
        await FILES.run(write_atomic, self._route_path(appkey, rule.id), rule.to_json())

    async def remove_route(self, appkey: str, rule_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await FILES.run(os.unlink, self._route_path(appkey, rule_id))

    async def close(self) -> None:
        for poller in list(self._pollers.values()):
            for watch in list(poller.watches):
                watch.cancel()
        if self._keep_alive is not None:
            self._keep_alive.cancel()
            self._keep_alive = None
        owned, self._owned = list(self._owned), {}
        for path in owned:
            with contextlib.suppress(FileNotFoundError):
                await FILES.run(os.unlink, path)
