"""``Directory``: the consumer's cache keeps the last known good state through registry
failures, saves a snapshot, starts from it during an outage, and counts versions.

The registry is the in-process one, wrapped so its ``list`` can fail, hang, answer
an empty list, or answer late (the watch stays real).
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import List, Optional

import pytest

from octo_core.cluster.routing import RouteRule
from octo_core.registry import Directory, Node, RegistryError, Watch
from octo_core.registry.base import WatchCallback
from octo_core.registry.memory import MemoryRegistry

from wire_helpers import run, wait_until, watchdog  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("watchdog")

APPKEY = "com.example.directory"


class FlakyRegistry(MemoryRegistry):
    """A memory registry whose ``list`` misbehaves on demand; while it is down
    (``fail``, ``hang``) its watch is silent too."""

    def __init__(self) -> None:
        super().__init__(f"directory-{uuid.uuid4().hex}")
        self.mode = "ok"                       # ok | fail | hang | empty
        self.silent = False                    # the watch went quiet (list still works)
        self.gate: Optional[asyncio.Event] = None   # when set, ``list`` answers once it opens
        self.watches: List[Watch] = []         # every watch made, cancelled or not

    async def list(self, appkey: str) -> List[Node]:
        if self.mode == "fail":
            raise RegistryError("the registry is down")
        if self.mode == "hang":
            await asyncio.Event().wait()
        if self.mode == "empty":
            return []
        nodes = await super().list(appkey)
        if self.gate is not None:
            await self.gate.wait()
        return nodes

    def watch(self, appkey: str, callback: WatchCallback) -> Watch:
        def unless_down(nodes: List[Node], rules: List[RouteRule]) -> None:
            if not self.silent and self.mode not in ("fail", "hang"):
                callback(nodes, rules)
        watch = super().watch(appkey, unless_down)
        self.watches.append(watch)
        return watch


def node(port: int, **fields) -> Node:
    return Node(APPKEY, "127.0.0.1", port, **fields)


def keys(directory: Directory) -> List[str]:
    return [n.key for n in directory.nodes]


def test_version_counts_accepted_changes_and_subscribers_see_them():
    async def scenario():
        async with FlakyRegistry() as registry:
            await registry.register(node(2000))
            async with Directory(registry, APPKEY, refresh_interval=None) as directory:
                assert keys(directory) == ["127.0.0.1:2000"] and directory.version == 1
                seen = []
                directory.subscribe(lambda nodes, rules: seen.append(([n.key for n in nodes], rules)))
                await registry.register(node(2001))
                await wait_until(lambda: directory.version == 2, what="the new node")
                assert keys(directory) == ["127.0.0.1:2000", "127.0.0.1:2001"]
                assert not await directory.refresh()     # nothing new: no version
                assert directory.version == 2
                rule = RouteRule(id="r1", providers=("*",))
                await registry.set_route(APPKEY, rule)
                await wait_until(lambda: directory.version == 3, what="the rule")
                assert directory.rules == (rule,)
                assert seen == [(["127.0.0.1:2000", "127.0.0.1:2001"], []),
                                (["127.0.0.1:2000", "127.0.0.1:2001"], [rule])]
    run(scenario())


def test_an_empty_list_keeps_the_last_known_nodes(caplog):
    async def scenario():
        async with FlakyRegistry() as registry:
            await registry.register(node(2000))
            async with Directory(registry, APPKEY, refresh_interval=None) as directory:
                # The watch says "no nodes": a registry glitch as far as we can tell.
                await registry.unregister(APPKEY, "127.0.0.1:2000")
                await wait_until(lambda: "lists no nodes" in caplog.text, what="the warning")
                assert keys(directory) == ["127.0.0.1:2000"] and directory.version == 1
                # Route rules still follow the registry.
                await registry.set_route(APPKEY, RouteRule(id="r1", providers=("*",)))
                await wait_until(lambda: directory.version == 2, what="the rule")
                assert keys(directory) == ["127.0.0.1:2000"]
                # A refresh answering an empty list is refused the same way.
                registry.mode = "empty"
                assert not await directory.refresh()
                assert keys(directory) == ["127.0.0.1:2000"]
                # Real nodes again replace the kept ones.
                registry.mode = "ok"
                await registry.register(node(2001))
                await wait_until(lambda: keys(directory) == ["127.0.0.1:2001"], what="the new node")
    with caplog.at_level(logging.WARNING, "octo_core.registry.directory"):
        run(scenario())
    assert caplog.text.count("lists no nodes") >= 2


def test_failures_and_timeouts_keep_the_last_known_nodes(caplog):
    async def scenario():
        async with FlakyRegistry() as registry:
            await registry.register(node(2000))
            async with Directory(registry, APPKEY, timeout=0.2, refresh_interval=None) as directory:
                for mode in ("fail", "hang"):
                    registry.mode = mode
                    assert not await directory.refresh()
                    assert keys(directory) == ["127.0.0.1:2000"] and directory.version == 1
    with caplog.at_level(logging.WARNING, "octo_core.registry.directory"):
        run(scenario())
    assert caplog.text.count("refresh failed") == 2


def test_periodic_refresh_catches_up_without_the_watch():
    async def scenario():
        async with FlakyRegistry() as registry:
            await registry.register(node(2000))
            async with Directory(registry, APPKEY, refresh_interval=0.05) as directory:
                registry.silent = True
                await registry.register(node(2001))
                await wait_until(lambda: len(directory.nodes) == 2, what="the periodic refresh")
    run(scenario())


def test_a_slow_answer_never_overrides_a_newer_watch():
    async def scenario():
        async with FlakyRegistry() as registry:
            await registry.register(node(2000))
            async with Directory(registry, APPKEY, refresh_interval=None) as directory:
                registry.gate = asyncio.Event()
                slow = asyncio.ensure_future(directory.refresh())   # reads [2000], then waits
                await asyncio.sleep(0.05)
                await registry.register(node(2001))
                await wait_until(lambda: len(directory.nodes) == 2, what="the watch")
                registry.gate.set()
                assert not await slow
                assert keys(directory) == ["127.0.0.1:2000", "127.0.0.1:2001"]
    run(scenario())


def test_snapshot_lets_a_client_start_while_the_registry_is_down(tmp_path, caplog):
    snapshot = str(tmp_path / "snapshot.json")
    rule = RouteRule(id="r1", providers=("127.0.0.1:*",), consumer_appkeys=("com.a",))

    async def scenario():
        async with FlakyRegistry() as registry:
            await registry.register(node(2000, weight=3, cell="gray"))
            await registry.set_route(APPKEY, rule)
            async with Directory(registry, APPKEY, snapshot, refresh_interval=None) as directory:
                first = directory.nodes
            with open(snapshot) as f:
                saved = json.load(f)
            assert saved["appkey"] == APPKEY and len(saved["nodes"]) == 1

            for mode, timeout in (("fail", 5.0), ("hang", 0.2)):
                registry.mode = mode
                async with Directory(registry, APPKEY, snapshot, timeout=timeout,
                                     refresh_interval=None) as late:
                    assert late.nodes == first and late.rules == (rule,)
                    assert late.nodes[0].weight == 3 and late.nodes[0].cell == "gray"
                    assert late.version == 1
                    assert "starting from the snapshot" in caplog.text
                    caplog.clear()

            registry.mode = "fail"
            with pytest.raises(RegistryError, match="no snapshot"):
                await Directory(registry, APPKEY, str(tmp_path / "missing.json"),
                                refresh_interval=None).start()
            with pytest.raises(RegistryError):   # another appkey's snapshot is no use
                await Directory(registry, "com.example.other", snapshot,
                                refresh_interval=None).start()
    run(scenario())


def test_a_start_to_an_empty_list_takes_the_snapshots_nodes(tmp_path, caplog):
    # A file registry whose directory is gone, or whose files are all unreadable,
    # lists nothing without failing: at start too, an empty list is no news.
    snapshot = str(tmp_path / "snapshot.json")
    rule = RouteRule(id="r1", providers=("127.0.0.1:*",), consumer_appkeys=("com.a",))

    async def scenario():
        async with FlakyRegistry() as registry:
            await registry.register(node(2000))
            async with Directory(registry, APPKEY, snapshot, refresh_interval=None) as directory:
                first = directory.nodes
            await registry.unregister(APPKEY, "127.0.0.1:2000")
            await registry.set_route(APPKEY, rule)
            async with Directory(registry, APPKEY, snapshot, refresh_interval=None) as late:
                assert late.nodes == first
                assert late.rules == (rule,)   # the registry's, as later
                assert "lists no nodes; starting from the 1 of the snapshot" in caplog.text
                await registry.register(node(2001))
                await wait_until(lambda: keys(late) == ["127.0.0.1:2001"], what="a real node")
            caplog.clear()
            await registry.unregister(APPKEY, "127.0.0.1:2001")   # no snapshot: empty, quietly
            async with Directory(registry, APPKEY, str(tmp_path / "none.json"),
                                 refresh_interval=None) as bare:
                assert bare.nodes == ()
            assert "snapshot" not in caplog.text
    with caplog.at_level(logging.WARNING, "octo_core.registry.directory"):
        run(scenario())


def test_snapshot_follows_every_accepted_change(tmp_path):
    snapshot = str(tmp_path / "deep" / "snapshot.json")

    def saved_ports() -> List[int]:
        try:
            with open(snapshot) as f:
                return [n["port"] for n in json.load(f)["nodes"]]
        except FileNotFoundError:
            return []

    async def scenario():
        async with FlakyRegistry() as registry:
            await registry.register(node(2000))
            async with Directory(registry, APPKEY, snapshot, refresh_interval=None):
                await wait_until(lambda: saved_ports() == [2000], what="the first snapshot")
                await registry.register(node(2001))
                await wait_until(lambda: saved_ports() == [2000, 2001], what="the second")
    run(scenario())


def test_a_failed_start_leaves_no_watch_and_can_be_retried():
    async def scenario():
        async with FlakyRegistry() as registry:
            await registry.register(node(2000))
            registry.mode = "fail"
            directory = Directory(registry, APPKEY, refresh_interval=None)
            with pytest.raises(RegistryError, match="no snapshot"):
                await directory.start()
            registry.mode = "hang"
            cancelled = asyncio.ensure_future(directory.start())
            await wait_until(lambda: len(registry.watches) == 2, what="the second watch")
            cancelled.cancel()
            await asyncio.gather(cancelled, return_exceptions=True)
            assert [watch.cancelled for watch in registry.watches] == [True, True]
            registry.mode = "ok"
            await directory.start()
            assert keys(directory) == ["127.0.0.1:2000"]
            await directory.close()
    run(scenario())


UNUSABLE_SNAPSHOTS = {
    "truncated": '{"appkey": "%s", "nodes": [' % APPKEY,
    "a list": "[]",
    "a string": json.dumps(APPKEY),
    "nodes not a list": json.dumps({"appkey": APPKEY, "nodes": 5, "rules": []}),
    "a node not an object": json.dumps({"appkey": APPKEY, "nodes": [1], "rules": []}),
    "a rule not an object": json.dumps({"appkey": APPKEY, "nodes": [], "rules": ["r1"]}),
    "no rules": json.dumps({"appkey": APPKEY, "nodes": []}),
    "nested too deep": "[" * 100_000,
}


@pytest.mark.parametrize("content", UNUSABLE_SNAPSHOTS.values(), ids=UNUSABLE_SNAPSHOTS.keys())
def test_an_unusable_snapshot_is_a_registry_error_and_leaves_no_watch(tmp_path, content):
    snapshot = tmp_path / "snapshot.json"
    snapshot.write_text(content)

    async def scenario():
        async with FlakyRegistry() as registry:
            registry.mode = "fail"
            with pytest.raises(RegistryError, match="no snapshot"):
                await Directory(registry, APPKEY, str(snapshot), refresh_interval=None).start()
            assert [watch.cancelled for watch in registry.watches] == [True]
    run(scenario())


def test_start_ends_at_the_watchs_first_word_when_it_beats_the_registrys_answer():
    """A large appkey: the watch has read it all while ``list`` is still reading it
    again. The start ends with the watch's state; it does not wait for (or time out
    on) the second read."""
    async def main():
        async with FlakyRegistry() as registry:
            await registry.register(node(2000))
            registry.gate = asyncio.Event()    # list() answers only once this opens: never
            directory = Directory(registry, APPKEY, timeout=30, refresh_interval=None)
            await asyncio.wait_for(directory.start(), 5)
            try:
                assert keys(directory) == ["127.0.0.1:2000"]
            finally:
                await directory.close()
    run(main())


def test_close_during_start_leaves_no_refresher():
    """A client closed while its first discovery waits for the registry: the start
    that finishes afterwards makes no refresher (it polled a closed registry for
    ever)."""
    async def main():
        registry = FlakyRegistry()
        await registry.register(Node(APPKEY, "10.0.0.1", 1))
        registry.gate = asyncio.Event()
        registry.silent = True             # (else start() ends at the watch's first word)
        directory = Directory(registry, APPKEY, refresh_interval=0.05)
        starting = asyncio.ensure_future(directory.start())
        await asyncio.sleep(0.01)          # start() waits for list()
        await directory.close()
        registry.gate.set()
        await asyncio.wait_for(starting, 5)
        assert directory._refresher is None

    run(main())
