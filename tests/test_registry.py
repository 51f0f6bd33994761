"""The registry contract, the same tests over memory://, file:// and zk://, then each
backend's own failure modes against real processes and a real ZooKeeper.

Every wait is bounded (``wait_until`` deadlines, the ``run`` timeout); nothing
asserts how long something took.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import AsyncIterator, List, Tuple

import pytest
from kazoo.client import KazooClient
from kazoo.protocol.states import KazooState

from octo_core import cli
from octo_core.cluster.routing import RouteRule
from octo_core.protocol import NodeStatus
from octo_core.registry.file import write_atomic
from octo_core.registry import (Directory, Env, Node, NotRegisteredError, Registry, RegistryError,
                                StatusChanged, open_registry)

from wire_helpers import run, wait_until, watchdog  # noqa: F401  (fixture)
from zk import ZooKeeper, zookeeper_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("watchdog")

APPKEY = "com.example.registry"
# How long ZooKeeper stays down in the outage test; the 30 s scenario is
# OCTO_ZK_OUTAGE_SECONDS=30 (CI keeps it short).
OUTAGE_SECONDS = float(os.environ.get("OCTO_ZK_OUTAGE_SECONDS", "3"))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["memory", "file", "zk"])
def url(request, tmp_path) -> str:
    """A fresh registry URL of each kind (ZooKeeper only starts for the zk cases)."""
    if request.param == "memory":
        return f"memory://{unique('test')}"
    if request.param == "file":
        return f"file://{tmp_path}/registry?ttl=5&interval=0.05"
    server = request.getfixturevalue("zookeeper_server")
    return server.url(unique("test"), timeout=4, op_timeout=5)


def node(port: int, **fields) -> Node:
    return Node(APPKEY, "127.0.0.1", port, **fields)


class Seen:
    """A watch callback that records every state and the thread it ran on."""

    def __init__(self) -> None:
        self.states: List[Tuple[List[Node], List[RouteRule]]] = []
        self.threads = set()

    def __call__(self, nodes: List[Node], rules: List[RouteRule]) -> None:
        self.states.append((nodes, rules))
        self.threads.add(threading.get_ident())

    @property
    def nodes(self) -> List[Node]:
        return self.states[-1][0] if self.states else []

    @property
    def rules(self) -> List[RouteRule]:
        return self.states[-1][1] if self.states else []


# --- the contract, for every backend ----------------------------------------------------

def test_register_list_unregister(url):
    async def scenario():
        async with open_registry(url) as registry:
            stored = await registry.register(node(2001, version="1.2", serviceInfo={"Echo": {"unifiedProto": 1}}))
            assert stored.lastUpdateTime > 0
            await registry.register(node(2000))
            listed = await registry.list(APPKEY)
            assert [n.key for n in listed] == ["127.0.0.1:2000", "127.0.0.1:2001"]
            assert listed[1] == stored
            assert listed[1].serviceInfo == {"Echo": {"unifiedProto": 1}}
            await registry.unregister(APPKEY, "127.0.0.1:2000")
            await registry.unregister(APPKEY, "127.0.0.1:2000")     # absent: no error
            assert [n.key for n in await registry.list(APPKEY)] == ["127.0.0.1:2001"]
            assert await registry.list("com.example.nobody") == []
    run(scenario())


def test_update_operator_fields(url):
    async def scenario():
        async with open_registry(url) as registry:
            await registry.register(node(2000))
            updated = await registry.update(APPKEY, "127.0.0.1:2000", weight=3, fweight=1.5,
                                            status=NodeStatus.DEAD)
            assert (updated.weight, updated.fweight, updated.status) == (3, 1.5, NodeStatus.DEAD)
            assert (await registry.list(APPKEY)) == [updated]
            with pytest.raises(NotRegisteredError):
                await registry.update(APPKEY, "127.0.0.1:9", weight=1)
            with pytest.raises(ValueError):
                await registry.update(APPKEY, "127.0.0.1:2000")
    run(scenario())


def test_a_weight_update_is_the_weight_readers_use(url):
    """Readers prefer a non-zero fweight, so weight=0 alone left a node with an
    older fweight taking its full share: draining it did nothing."""
    async def scenario():
        async with open_registry(url) as registry:
            await registry.register(node(2000, weight=10, fweight=10.0))
            drained = await registry.update(APPKEY, "127.0.0.1:2000", weight=0)
            assert (drained.weight, drained.fweight, drained.effective_weight()) == (0, 0.0, 0.0)
            restored = await registry.update(APPKEY, "127.0.0.1:2000", weight=7)
            assert (restored.weight, restored.fweight) == (7, 7.0)
            fine = await registry.update(APPKEY, "127.0.0.1:2000", weight=7, fweight=6.5)
            assert (fine.weight, fine.fweight, fine.effective_weight()) == (7, 6.5, 6.5)
            assert (await registry.list(APPKEY)) == [fine]
    run(scenario())


def test_update_if_status_is_a_compare_and_set(url):
    """What the scanner writes with: a status found changed since it looked
    (an operator's STOPPED) is left as it is."""
    async def scenario():
        async with open_registry(url) as registry:
            stored = await registry.register(node(2000))
            with pytest.raises(StatusChanged):
                await registry.update(APPKEY, "127.0.0.1:2000", status=NodeStatus.DEAD,
                                      if_status=NodeStatus.STOPPED)
            assert await registry.list(APPKEY) == [stored]
            updated = await registry.update(APPKEY, "127.0.0.1:2000", status=NodeStatus.DEAD,
                                            if_status=NodeStatus.ALIVE)
            assert updated.status == NodeStatus.DEAD
    run(scenario())


@pytest.mark.parametrize("change", [dict(fweight=float("nan")), dict(fweight=float("inf")),
                                    dict(fweight=-1.0), dict(weight=10 ** 30), dict(weight=-1),
                                    dict(weight=2.7), dict(weight="5"), dict(weight=True),
                                    dict(status=42), dict(status=-1), dict(role=9),
                                    dict(warmup=-5)], ids=repr)
def test_update_refuses_a_value_out_of_range_and_writes_nothing(url, change):
    # NaN or a weight past int64 would be written and then refused by every reader:
    # the node would drop out of discovery while its provider runs.
    async def scenario():
        async with open_registry(url) as registry:
            stored = await registry.register(node(2000, weight=7))
            with pytest.raises(ValueError, match=next(iter(change))):
                await registry.update(APPKEY, "127.0.0.1:2000", **change)
            assert await registry.list(APPKEY) == [stored]
    run(scenario())


def test_what_an_operator_set_survives_the_node_going_and_coming_back(url):
    """PROTOCOL.md §5: STOPPED survives re-registration, also after a clean stop
    (unregister) or a crash took the node away in between; STOPPING (the
    server's word at a stop) does not undo it, ALIVE (an operator's) does."""
    async def scenario():
        async with open_registry(url) as registry:
            await registry.register(node(2000))
            await registry.update(APPKEY, "127.0.0.1:2000", weight=3, fweight=1.5, role=1,
                                  warmup=30, status=NodeStatus.STOPPED)
            await registry.update(APPKEY, "127.0.0.1:2000", status=NodeStatus.STOPPING)
            await registry.unregister(APPKEY, "127.0.0.1:2000")
            assert await registry.list(APPKEY) == []
            again = await registry.register(node(2000, weight=10))
            assert (again.weight, again.fweight, again.role, again.warmup, again.status) == \
                (3, 1.5, 1, 30, NodeStatus.STOPPED)
            await registry.update(APPKEY, "127.0.0.1:2000", status=NodeStatus.ALIVE)
            await registry.unregister(APPKEY, "127.0.0.1:2000")
            back = await registry.register(node(2000))
            assert (back.weight, back.status) == (3, NodeStatus.ALIVE)
            # another node of the appkey has no record: its own fields
            assert (await registry.register(node(2001, weight=7))).weight == 7
    run(scenario())


def test_reregistration_keeps_operator_fields(url):
    async def scenario():
        async with open_registry(url) as registry:
            await registry.register(node(2000))
            await registry.update(APPKEY, "127.0.0.1:2000", weight=0, fweight=2.5, role=1,
                                  warmup=30, status=NodeStatus.STOPPED)
            again = await registry.register(node(2000, version="2.0"))
            assert (again.weight, again.fweight, again.role, again.warmup, again.status) == \
                (0, 2.5, 1, 30, NodeStatus.STOPPED)
            assert again.version == "2.0"
            # DEAD is the scanner's word, not an operator's: a new registration is ALIVE.
            await registry.update(APPKEY, "127.0.0.1:2000", status=NodeStatus.DEAD)
            assert (await registry.register(node(2000))).status == NodeStatus.ALIVE
            assert (await registry.list(APPKEY))[0].weight == 0
    run(scenario())


# (weight, fweight, seconds since start of a 60 s warm-up, expected effective weight)
WARMUP_BOUNDS = [
    (10, 0.5, 6, 0.5),       # below 1 already: warming never lifts it above its full weight
    (10, 0.2, 0, 0.2),
    (10, 0.5, 600, 0.5),     # warm
    (10, 0.0, 6, 1.0),       # 10 * 6 / 60 = 1
    (10, 0.0, 3, 1.0),       # 0.5 -> at least 1
    (100, 0.0, 6, 10.0),
    (0, 0.0, 6, 0.0),        # out of rotation stays out
]


@pytest.mark.parametrize("weight,fweight,elapsed,expected", WARMUP_BOUNDS)
def test_warm_up_weight_is_at_least_1_and_at_most_the_full_weight(weight, fweight, elapsed,
                                                                   expected):
    warming = node(2000, weight=weight, fweight=fweight, warmup=60, startTime=1_000)
    assert warming.effective_weight(now=1_000 + elapsed) == pytest.approx(expected)


def test_a_node_without_start_time_warms_up_from_its_last_update_as_java_providers_do():
    java = node(2000, weight=10, warmup=60, lastUpdateTime=1_000)
    assert java.effective_weight(now=1_030) == pytest.approx(5.0)
    ours = node(2000, weight=10, warmup=60, lastUpdateTime=1_050, startTime=1_000)
    assert ours.effective_weight(now=1_060) == 10.0


def test_an_update_does_not_restart_a_java_providers_warm_up(tmp_path):
    """A node without startTime warms up from lastUpdateTime, which an update
    (an operator's, the scanner's) moves: the old clock is kept as startTime."""
    started = int(time.time()) - 3600
    java = Node(APPKEY, "10.0.0.9", 9000, weight=10, warmup=60, lastUpdateTime=started)

    async def scenario():
        async with open_registry(f"file://{tmp_path}?ttl=600") as registry:
            path = registry._node_path(APPKEY, java.key)
            write_atomic(path, java.to_json())          # as the Java provider wrote it
            updated = await registry.update(APPKEY, java.key, weight=20)
            assert updated.startTime == started and updated.lastUpdateTime > started
            assert updated.effective_weight() == 20.0    # warm long ago: no new ramp
    run(scenario())


def test_watch_sees_every_change_on_the_loop(url):
    async def scenario():
        async with open_registry(url) as registry:
            seen = Seen()
            watch = registry.watch(APPKEY, seen)
            await wait_until(lambda: seen.states, what="the initial state")
            assert seen.nodes == [] and seen.rules == []
            await registry.register(node(2000))
            await wait_until(lambda: [n.key for n in seen.nodes] == ["127.0.0.1:2000"], 10,
                             "the registration")
            await registry.update(APPKEY, "127.0.0.1:2000", weight=4)
            await wait_until(lambda: seen.nodes and seen.nodes[0].weight == 4, 10, "the weight")
            await registry.update(APPKEY, "127.0.0.1:2000", status=NodeStatus.DEAD)
            await wait_until(lambda: seen.nodes and seen.nodes[0].status == NodeStatus.DEAD, 10,
                             "the status")
            await registry.set_route(APPKEY, RouteRule(id="r1", providers=("127.0.0.1:*",)))
            await wait_until(lambda: [r.id for r in seen.rules] == ["r1"], 10, "the rule")
            await registry.unregister(APPKEY, "127.0.0.1:2000")
            await wait_until(lambda: seen.nodes == [], 10, "the unregistration")
            assert seen.threads == {threading.get_ident()}
            watch.cancel()
            count = len(seen.states)
            await registry.register(node(2001))
            await asyncio.sleep(0.3)
            assert len(seen.states) == count
    run(scenario())


def test_a_watchs_first_state_is_whole(url):
    """The first delivery holds every node and every route rule: a consumer starts
    from it (ZooKeeper's delivered the providers before reading the rules)."""
    async def scenario():
        async with open_registry(url) as registry:
            for port in range(2000, 2030):
                await registry.register(node(port))
            await registry.set_route(APPKEY, RouteRule(id="r1", providers=("127.0.0.1:*",)))
            seen = Seen()
            watch = registry.watch(APPKEY, seen)
            await wait_until(lambda: seen.states, 10, "the first state")
            watch.cancel()
            nodes, rules = seen.states[0]
            assert len(nodes) == 30 and [rule.id for rule in rules] == ["r1"]
    run(scenario())


def test_registries_of_one_url_share_state_and_close_withdraws(url):
    async def scenario():
        async with open_registry(url) as consumer:
            seen = Seen()
            consumer.watch(APPKEY, seen)
            provider = open_registry(url)
            try:
                await provider.register(node(2000))
                assert [n.key for n in await consumer.list(APPKEY)] == ["127.0.0.1:2000"]
                await wait_until(lambda: len(seen.nodes) == 1, 10, "the other registry's node")
            finally:
                await provider.close()
            assert await consumer.list(APPKEY) == []
            await wait_until(lambda: seen.nodes == [], 10, "the withdrawal")
    run(scenario())


def test_routes_crud(url):
    async def scenario():
        async with open_registry(url) as registry:
            r2 = RouteRule(id="r2", providers=("10.0.0.*:9000",), consumer_appkeys=("com.a",),
                           priority=5, limit=True)
            await registry.set_route(APPKEY, r2)
            await registry.set_route(APPKEY, RouteRule(id="r1", providers=("127.0.0.1:*",)))
            assert [r.id for r in await registry.routes(APPKEY)] == ["r1", "r2"]
            assert (await registry.routes(APPKEY))[1] == r2
            changed = RouteRule(id="r1", providers=("127.0.0.2:*",), enabled=False)
            await registry.set_route(APPKEY, changed)
            assert (await registry.routes(APPKEY))[0] == changed
            await registry.remove_route(APPKEY, "r1")
            await registry.remove_route(APPKEY, "r1")    # absent: no error
            assert await registry.routes(APPKEY) == [r2]
    run(scenario())


def test_env_and_names_are_checked(url):
    async def scenario():
        async with open_registry(url) as registry:
            with pytest.raises(ValueError, match="env"):
                await registry.register(node(2000, env=Env.TEST))
            with pytest.raises(ValueError, match="appkey"):
                await registry.register(Node("bad/appkey", "127.0.0.1", 2000))
            with pytest.raises(ValueError, match="route id"):
                await registry.set_route(APPKEY, RouteRule(id="../x", providers=()))
    run(scenario())


def test_a_file_url_names_its_directory_percent_encoded(tmp_path):
    directory = tmp_path / "octo registry"
    registry = open_registry(directory.as_uri())   # file:///.../octo%20registry
    assert registry.root == str(directory)
    directory.mkdir()   # and the scanner command finds it there
    assert cli.main(["scanner", "--registry", directory.as_uri(), "--appkey", APPKEY, "--once",
                     "--timeout", "0.5"]) == 0


def test_open_registry_rejects_bad_urls(tmp_path):
    for bad in ("redis://x", f"file://{tmp_path}?ttl=0", "file://relative/dir", "file:relative/dir", "file:", "zk:///chroot",
                "memory://x?ttl=1", "memory://x?env=qa"):
        with pytest.raises(ValueError):
            open_registry(bad)
    # ZooKeeper credentials: refused, never used anonymously in silence, never echoed
    with pytest.raises(ValueError, match="credentials") as refused:
        open_registry("zk://octo:s3cret@127.0.0.1:2181")
    assert "s3cret" not in str(refused.value)
    registry = open_registry(f"memory://{unique('env')}?env=test")
    assert registry.env == Env.TEST and isinstance(registry, Registry)


# --- file:// ------------------------------------------------------------------------------

PROVIDER_SCRIPT = """
import asyncio, sys
from octo_core.registry import Node, open_registry

async def main():
    registry = open_registry(sys.argv[1])
    await registry.register(Node(sys.argv[2], "127.0.0.1", int(sys.argv[3])))
    print("READY", flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


def start_provider(url: str, port: int) -> subprocess.Popen:
    """A provider process that registers one node and then waits to be killed."""
    process = subprocess.Popen([sys.executable, "-c", PROVIDER_SCRIPT, url, APPKEY, str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(20)
    if line != ["READY\n"]:
        process.kill()
        raise AssertionError(f"provider did not start: {process.communicate(timeout=5)}")
    return process


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=10)


def test_file_node_files_mirror_the_mns_tree(tmp_path):
    async def scenario():
        async with open_registry(f"file://{tmp_path}") as registry:
            stored = await registry.register(node(2000))
            await registry.set_route(APPKEY, RouteRule(id="r1", providers=("*",)))
            path = tmp_path / "prod" / APPKEY / "provider" / "127.0.0.1:2000.json"
            assert path.read_text() == stored.to_json()
            rule = json.loads((tmp_path / "prod" / APPKEY / "route" / "r1.json").read_text())
            assert rule["providers"] == ["*"]
            assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    run(scenario())


def test_file_live_provider_outlives_its_ttl_and_crashed_one_expires(tmp_path):
    url = f"file://{tmp_path}?ttl=1&interval=0.05"
    process = start_provider(url, 2001)

    async def scenario():
        async with open_registry(url) as registry:
            await registry.register(node(2000))   # this process keeps renewing its node
            seen = Seen()
            registry.watch(APPKEY, seen)
            await wait_until(lambda: len(seen.nodes) == 2, 10, "both nodes")
            kill(process)
            await wait_until(lambda: [n.key for n in seen.nodes] == ["127.0.0.1:2000"], 15,
                             "the killed provider's node to expire")
            assert [n.key for n in await registry.list(APPKEY)] == ["127.0.0.1:2000"]
            await asyncio.sleep(1.5)   # longer than the TTL: renewal keeps our node listed
            assert [n.key for n in await registry.list(APPKEY)] == ["127.0.0.1:2000"]
    try:
        run(scenario())
    finally:
        process.kill()
        process.communicate(timeout=10)


@pytest.mark.parametrize("lose", ["removed", "moved away"])
def test_file_provider_registers_again_when_the_registry_directory_goes(tmp_path, lose):
    # Losing the directory is the registry losing its state, as a ZooKeeper session
    # loss: an unregistration removes a file only, so the provider must not stop
    # renewing for good, its node gone for every client once the directory is back.
    root = tmp_path / "registry"
    url = f"file://{root}?ttl=1&interval=0.05"

    async def scenario():
        # two providers (processes, each with its own renewals) and an operator
        async with open_registry(url) as one, open_registry(url) as two, \
                open_registry(url) as other:
            first = await one.register(node(2000, startTime=1_700_000_000))
            await two.register(node(2001))
            seen = Seen()
            other.watch(APPKEY, seen)
            await wait_until(lambda: len(seen.nodes) == 2, 10, "both nodes")
            if lose == "removed":
                shutil.rmtree(root)
            else:
                os.rename(root, tmp_path / "aside")
            await wait_until(lambda: not seen.nodes, 10, "the nodes to go with the directory")
            await wait_until(lambda: len(seen.nodes) == 2, 10, "the provider to register again")
            assert [n for n in seen.nodes if n.key == first.key][0].startTime == first.startTime
            # someone else's unregistration still ends the renewals
            await other.unregister(APPKEY, "127.0.0.1:2001")
            await asyncio.sleep(1.5)   # longer than the TTL
            assert [n.key for n in await other.list(APPKEY)] == ["127.0.0.1:2000"]
    run(scenario())


def test_file_polling_that_fails_says_so_once_until_it_works_again(tmp_path, caplog):
    """An outage of the registry directory must not log a line every poll (five a
    second, for each appkey watched): once when it fails, once when it is back."""
    root = tmp_path / "registry"
    url = f"file://{root}?ttl=1&interval=0.05"

    def said(what: str) -> int:
        return sum(r.getMessage().startswith("polling ") and what in r.getMessage()
                   for r in caplog.records)

    async def scenario():
        async with open_registry(url) as provider, open_registry(url) as consumer:
            await provider.register(node(2000))
            seen = Seen()
            consumer.watch(APPKEY, seen)
            await wait_until(lambda: len(seen.nodes) == 1, 10, "the node")
            os.rename(root, tmp_path / "aside")
            root.write_text("not a directory")           # every poll fails now
            await wait_until(lambda: said("failed") >= 1, 10, "the failure to be said")
            await asyncio.sleep(0.5)                     # ten polls more
            assert said("failed") == 1
            root.unlink()
            os.rename(tmp_path / "aside", root)
            await wait_until(lambda: said("works again") == 1, 10, "the recovery to be said")

    with caplog.at_level(logging.WARNING, logger="octo_core.registry"):
        run(scenario())


# --- zk:// --------------------------------------------------------------------------------

def raw_client(server: ZooKeeper) -> KazooClient:
    client = KazooClient(hosts=server.hosts)
    client.start(timeout=10)
    return client


@pytest.mark.parametrize("host, fields, warned", [
    ("127.0.0.1", {}, True), ("localhost", {}, True), ("127.0.0.1", {"ip": "10.1.2.3"}, False)],
    ids=["loopback", "localhost", "node ip given"])
def test_a_loopback_address_registered_in_zookeeper_is_warned_of(zookeeper_server, tmp_path,
                                                                 caplog, host, fields, warned):
    """Server's default host, 127.0.0.1, was registered in ZooKeeper as it is: every
    caller on another machine dialled its own loopback (refused, or its own copy of
    the service on that port, past all routing), and nothing said so. A registry of
    one machine (file://, memory://) reaches loopback from every caller: no warning."""
    import octo_core   # (the wire helpers' Echo: a server to register)
    from wire_helpers import Echo, EchoHandler

    async def scenario(url: str) -> None:
        server = octo_core.Server(APPKEY, host=host, registry=url, node=fields,
                                  unregister_delay=0)
        server.add_service(Echo, EchoHandler())
        await server.start()
        await server.stop()

    said = "callers on other machines cannot reach"
    with caplog.at_level(logging.WARNING, logger="octo_core.server"):
        run(scenario(f"file://{tmp_path}/registry"))
        assert not [r for r in caplog.records if said in r.getMessage()]
        run(scenario(zookeeper_server.url(unique("loopback"))))
    assert bool([r for r in caplog.records if said in r.getMessage()]) == warned


def test_zk_json_is_the_node_json_at_the_mns_path(zookeeper_server):
    chroot = unique("layout")

    async def scenario():
        async with open_registry(zookeeper_server.url(chroot)) as registry:
            stored = await registry.register(node(2000, serviceInfo={"Echo": {"unifiedProto": 1}}))
            rule = RouteRule(id="r1", providers=("127.0.0.1:*",))
            await registry.set_route(APPKEY, rule)
            client = raw_client(zookeeper_server)
            try:
                base = f"/{chroot}/octo/nameservice/prod/{APPKEY}"
                data, stat = client.get(f"{base}/provider/127.0.0.1:2000")
                assert data.decode() == stored.to_json()
                assert stat.ephemeralOwner != 0
                data, stat = client.get(f"{base}/route/r1")
                assert json.loads(data) == json.loads(rule.to_json())
                assert stat.ephemeralOwner == 0
            finally:
                client.stop()
                client.close()
    run(scenario())


def test_zk_watching_an_appkey_creates_nothing_and_sees_its_first_provider(zookeeper_server):
    """A consumer only reads the tree: a watch on an appkey no one provides leaves
    no znode (a typo'd appkey stayed in the MNS tree; a read-only ACL failed)."""
    chroot = unique("watch-only")

    async def scenario():
        async with open_registry(zookeeper_server.url(chroot)) as consumer, \
                open_registry(zookeeper_server.url(chroot)) as provider:
            seen = Seen()
            consumer.watch(APPKEY, seen)
            await wait_until(lambda: seen.states, 10, "the watch's first (empty) list")
            client = raw_client(zookeeper_server)
            try:
                assert not client.exists(f"/{chroot}/octo/nameservice/prod/{APPKEY}")
            finally:
                client.stop()
                client.close()
            await provider.register(node(2000))
            await wait_until(lambda: [n.port for n in seen.nodes] == [2000], 10,
                             "the first provider, in a directory created after the watch")
    run(scenario())


def test_zk_two_operators_at_once_both_stay_in_the_operator_record(zookeeper_server):
    """Both read the record before either writes it: the versioned write makes the
    second read again, so the next registration keeps weight 0 and STOPPED."""
    url = zookeeper_server.url(unique("record-race"))

    async def scenario():
        async with open_registry(url) as provider, open_registry(url) as a, \
                open_registry(url) as b:
            await provider.register(node(2000))
            both_read = threading.Barrier(2, timeout=10)
            for operator in (a, b):
                first_read = operator._read_record

                def read_then_wait(appkey, key, _read=first_read, _operator=operator):
                    _operator._read_record = _read          # only the first read waits
                    record = _read(appkey, key)
                    both_read.wait()
                    return record
                operator._read_record = read_then_wait
            await asyncio.gather(a.update(APPKEY, "127.0.0.1:2000", weight=0),
                                 b.update(APPKEY, "127.0.0.1:2000", status=NodeStatus.STOPPED))
            await provider.unregister(APPKEY, "127.0.0.1:2000")
            back = await provider.register(node(2000))
            assert (back.weight, back.status) == (0, NodeStatus.STOPPED)
    run(scenario())


def test_zk_ephemeral_node_goes_when_its_provider_is_killed(zookeeper_server):
    url = zookeeper_server.url(unique("kill"), timeout=2)
    process = start_provider(url, 2001)

    async def scenario():
        async with open_registry(url) as registry:
            seen = Seen()
            registry.watch(APPKEY, seen)
            await wait_until(lambda: len(seen.nodes) == 1, 10, "the provider's node")
            kill(process)
            await wait_until(lambda: seen.states and seen.nodes == [], 20,
                             "the session to expire and its node to go")
            assert await registry.list(APPKEY) == []
    try:
        run(scenario())
    finally:
        process.kill()
        process.communicate(timeout=10)


def expire_session(server: ZooKeeper, session: Tuple[int, bytes]) -> None:
    """Close ``session`` from a second connection: ZooKeeper expires it for its owner."""
    client = KazooClient(hosts=server.hosts, client_id=session)
    client.start(timeout=10)
    client.stop()
    client.close()


@contextlib.asynccontextmanager
async def provider_watched(url: str) -> AsyncIterator[Tuple[Registry, Registry, "Seen"]]:
    """A provider registry holding node(2000), and an operator's registry whose
    watch (``Seen``) has seen it."""
    async with open_registry(url) as provider, open_registry(url) as operator:
        await provider.register(node(2000))
        seen = Seen()
        operator.watch(APPKEY, seen)
        await wait_until(lambda: len(seen.nodes) == 1, 10, "the node")
        yield provider, operator, seen


async def expire_and_come_back(server: ZooKeeper, provider: Registry, seen: "Seen") -> None:
    """Expire ``provider``'s session; wait for its node to go, then to be back."""
    await asyncio.to_thread(expire_session, server, provider._client.client_id)
    await wait_until(lambda: any(not nodes for nodes, _ in seen.states), 20,
                     "the expired session's node to go")
    await wait_until(lambda: len(seen.nodes) == 1, 20, "the provider to re-register")


def test_zk_session_expiry_reregisters_and_keeps_operator_changes(zookeeper_server):
    url = zookeeper_server.url(unique("expiry"), timeout=4)

    async def scenario():
        async with provider_watched(url) as (provider, operator, seen):
            await operator.update(APPKEY, "127.0.0.1:2000", weight=3)
            # Private: wait until the provider has seen the operator's change.
            path = provider._node_path(APPKEY, "127.0.0.1:2000")
            await wait_until(lambda: provider._seen[path].weight == 3, 10, "the provider to follow")
            old_session = provider._client.client_id
            await expire_and_come_back(zookeeper_server, provider, seen)
            assert seen.nodes[0].weight == 3 and seen.nodes[0].status == NodeStatus.ALIVE
            assert provider._client.client_id[0] != old_session[0]
    run(scenario(), timeout=50)


def rebuild(server: ZooKeeper, chroot: str, transactions: int) -> None:
    """Make ``transactions`` writes (under ``chroot``), then bring ``server`` back
    without its data: its transaction ids start again below what clients have seen."""
    writer = KazooClient(hosts=server.hosts)
    writer.start(timeout=10)
    try:
        writer.ensure_path(f"/{chroot}/filler")
        for result in [writer.create_async(f"/{chroot}/filler/{i}") for i in range(transactions)]:
            result.get(timeout=10)
    finally:
        writer.stop()
        writer.close()


def wiped_restart(server: ZooKeeper) -> None:
    with server.outage(wipe=True):
        pass


def test_zk_a_rebuilt_zookeeper_gets_its_nodes_and_watches_back(zookeeper_server):
    """ZooKeeper back without its data (a rebuilt ensemble) refuses, for as long as
    it has seen fewer transactions, every session that has seen more: the provider
    and the watcher start new sessions, the node is registered again and the
    watch follows changes again (they stayed cut off, the node unlisted)."""
    chroot = unique("rebuilt")
    url = zookeeper_server.url(chroot, timeout=2, op_timeout=2)

    async def scenario():
        async with provider_watched(url) as (provider, operator, seen):
            await asyncio.to_thread(rebuild, zookeeper_server, chroot, 300)
            # both sessions see the last of those transactions
            await provider.update(APPKEY, "127.0.0.1:2000", weight=3)
            await wait_until(lambda: seen.nodes[0].weight == 3, 10, "the watch to see it")
            await asyncio.to_thread(wiped_restart, zookeeper_server)
            await wait_until(lambda: provider._sessions_lost and operator._sessions_lost, 25,
                             "new sessions")
            listed: List[Node] = []
            while not listed:   # (the run timeout bounds it)
                with contextlib.suppress(RegistryError):
                    listed = await provider.list(APPKEY)
                await asyncio.sleep(0.1)
            assert [(n.key, n.weight) for n in listed] == [("127.0.0.1:2000", 3)]   # as left
            await provider.update(APPKEY, "127.0.0.1:2000", weight=5)
            await wait_until(lambda: seen.nodes[0].weight == 5, 10, "the watch to follow again")
    run(scenario(), timeout=55)


def test_zk_a_watchers_session_loss_breaks_nothing_in_kazoos_threads(zookeeper_server, caplog):
    """At a session loss (a dropped connection too) kazoo calls every watcher with an
    event that has no path: the watch takes it quietly (an AttributeError in kazoo's
    thread was logged for each provider node watched) and goes on after the recovery."""
    url = zookeeper_server.url(unique("watcher-lost"), timeout=4)

    async def scenario():
        async with provider_watched(url) as (provider, operator, seen):
            await asyncio.to_thread(expire_session, zookeeper_server, operator._client.client_id)
            await wait_until(lambda: operator._sessions_lost > 0, 20, "the session loss")
            await provider.update(APPKEY, "127.0.0.1:2000", weight=5)
            await wait_until(lambda: seen.nodes and seen.nodes[0].weight == 5, 20,
                             "the watch to go on")
    with caplog.at_level(logging.ERROR):
        run(scenario(), timeout=50)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_zk_reregistration_applies_the_operator_record_written_while_cut_off(zookeeper_server):
    """An operator stopped the node while its provider was cut off: the change to the
    node went with the expired session, unseen, but its operator record stays and
    the re-created node is STOPPED at weight 0 (not ALIVE, taking traffic)."""
    url = zookeeper_server.url(unique("record"), timeout=4)

    async def scenario():
        async with provider_watched(url) as (provider, _, seen):
            raw = KazooClient(hosts=zookeeper_server.hosts)
            await asyncio.to_thread(raw.start, 10)
            try:   # the record an operator's update(status=STOPPED, weight=0) leaves
                record = provider._record_path(APPKEY, "127.0.0.1:2000")
                await asyncio.to_thread(raw.create, record, b'{"status":4,"weight":0}',
                                        makepath=True)
            finally:
                await asyncio.to_thread(raw.stop)
                raw.close()
            await expire_and_come_back(zookeeper_server, provider, seen)
            assert (seen.nodes[0].status, seen.nodes[0].weight) == (NodeStatus.STOPPED, 0)
    run(scenario(), timeout=50)


def test_zk_reregistration_keeps_a_weight_written_to_the_node_after_the_record(zookeeper_server):
    """An operator record is older than what an admin tool wrote to the node since
    (straight into the znode, as Java's tools do): the re-created node keeps the
    newer weight, 7, not the record's 3."""
    url = zookeeper_server.url(unique("newer"), timeout=4)

    async def scenario():
        async with provider_watched(url) as (provider, operator, seen):
            await operator.update(APPKEY, "127.0.0.1:2000", weight=3)
            path = provider._node_path(APPKEY, "127.0.0.1:2000")
            raw = KazooClient(hosts=zookeeper_server.hosts)
            await asyncio.to_thread(raw.start, 10)
            try:
                data, _ = await asyncio.to_thread(raw.get, path)
                admin = dict(json.loads(data), weight=7)
                await asyncio.to_thread(raw.set, path, json.dumps(admin).encode())
            finally:
                await asyncio.to_thread(raw.stop)
                raw.close()
            # Private: wait until the provider has seen the admin's write.
            await wait_until(lambda: provider._seen[path].weight == 7, 10, "the provider to follow")
            await expire_and_come_back(zookeeper_server, provider, seen)
            assert seen.nodes[0].weight == 7
    run(scenario(), timeout=50)


def test_zk_recovery_that_fails_while_connected_is_tried_again(zookeeper_server):
    """Re-creating the node after a lost session fails once (a stall past op_timeout
    with the connection up): no reconnection comes to retry it, so the registry
    tries again by itself; the node is back."""
    from kazoo.handlers.threading import KazooTimeoutError
    url = zookeeper_server.url(unique("retry"), timeout=4)

    async def scenario():
        async with provider_watched(url) as (provider, _, seen):
            store, failures = provider._store, []

            def stalls_once(*args):   # private: the first re-creation times out
                if not failures:
                    failures.append(args)
                    raise KazooTimeoutError()
                return store(*args)

            stores = []
            provider._store = lambda *args: (stores.append(args), stalls_once(*args))[1]
            await expire_and_come_back(zookeeper_server, provider, seen)
            assert failures and provider._client.state == "CONNECTED"
            # Private: a later reconnection within the same session (as kazoo reports
            # one) re-creates nothing: the node was owed once, and is paid.
            await wait_until(lambda: provider._retry is None or not provider._retry.is_alive(),
                             10, "the retry to be over")
            made = len(stores)
            provider._on_state(KazooState.CONNECTED)
            await asyncio.to_thread(provider._worker.submit(lambda: None).result, 10)
            assert len(stores) == made
    run(scenario(), timeout=50)


def test_zk_watching_again_and_again_leaves_one_kazoo_watcher_a_path(zookeeper_server):
    """kazoo keeps a watcher until its znode changes: watches made and cancelled on a
    stable appkey (short-lived clients on a shared registry) must not pile up."""
    url = zookeeper_server.url(unique("rewatch"))

    async def scenario():
        async with open_registry(url) as provider, open_registry(url) as consumer:
            for port in (2000, 2001, 2002):
                await provider.register(node(port))
            for _ in range(20):
                seen = Seen()
                watch = consumer.watch(APPKEY, seen)
                await wait_until(lambda: len(seen.nodes) == 3, 10, "the nodes")
                watch.cancel()
            client = consumer._client   # private: kazoo's watcher sets, path -> callbacks
            assert {len(w) for w in client._data_watchers.values()} == {1}
            assert {len(w) for w in client._child_watchers.values()} == {1}
    run(scenario())


def test_zk_outage_directory_keeps_last_known_good(zookeeper_server, tmp_path):
    url = zookeeper_server.url(unique("outage"), timeout=4, op_timeout=1)
    snapshot = str(tmp_path / "directory.json")

    async def update_when_back(registry: Registry) -> None:
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            try:
                await registry.update(APPKEY, "127.0.0.1:2000", weight=7)
                return
            except RegistryError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def scenario():
        async with open_registry(url) as provider, open_registry(url) as consumer:
            await provider.register(node(2000))
            await provider.register(node(2001))
            directory = Directory(consumer, APPKEY, snapshot, timeout=1, refresh_interval=None)
            await directory.start()
            try:
                await wait_until(lambda: len(directory.nodes) == 2, 10, "both nodes")
                await wait_until(lambda: os.path.exists(snapshot), 10, "the snapshot")
                await asyncio.to_thread(zookeeper_server.stop)
                try:
                    await asyncio.sleep(OUTAGE_SECONDS)
                    assert await directory.refresh() is False     # fails: the last list stays
                    assert [n.key for n in directory.nodes] == ["127.0.0.1:2000", "127.0.0.1:2001"]
                    # A client starting during the outage comes up from the snapshot.
                    async with open_registry(url) as late:
                        started = Directory(late, APPKEY, snapshot, timeout=1, refresh_interval=None)
                        await started.start()
                        assert len(started.nodes) == 2
                        await started.close()
                finally:
                    await asyncio.to_thread(zookeeper_server.start)
                await update_when_back(provider)
                await wait_until(lambda: any(n.weight == 7 for n in directory.nodes), 20,
                                 "changes to flow again")
                assert len(directory.nodes) == 2
            finally:
                await directory.close()
    run(scenario(), timeout=55)


def test_zk_an_outage_logs_kazoos_reconnection_messages_once_a_period(zookeeper_server, caplog):
    """kazoo logs at every reconnection attempt (every 2 s at most: 2,400 lines an
    hour): while ZooKeeper is away the first of each kind goes out, then one a
    period counting those held back, and one line says when it is back; kazoo's
    other messages pass as they were, and the next outage is told at once. The
    throttle runs on the test's clock: nothing sleeps. (What is counted is said
    while ZooKeeper is down: starting it, ``zk.py``'s own clients log too.)"""
    from octo_core.registry.zookeeper import RECONNECT_LOG_EVERY
    url = zookeeper_server.url(unique("reconnect-log"), timeout=4, op_timeout=1)
    caplog.set_level(logging.INFO, logger="kazoo.client")
    now = [0.0]

    def said(text: str) -> List[str]:
        return [r.getMessage() for r in caplog.records
                if r.name == "kazoo.client" and text in r.getMessage()]

    async def scenario():
        async with open_registry(url) as registry:
            await registry.list(APPKEY)   # connected
            kazoo_log = registry._kazoo_log
            kazoo_log.clock = lambda: now[0]
            caplog.clear()
            await asyncio.to_thread(zookeeper_server.stop)
            try:
                await wait_until(lambda: kazoo_log.failures >= 4, 20, "failed attempts")
                assert len(said("Connection dropped")) == 1
                assert len(said("Connecting to")) == 1
                # kazoo's other messages pass unchanged (these come once an outage)
                assert said("Transition to CONNECTING") == ["Transition to CONNECTING"]
                assert said("Zookeeper connection lost") == ["Zookeeper connection lost"]
                now[0] += RECONNECT_LOG_EVERY
                await wait_until(lambda: len(said("Connection dropped")) == 2, 20, "a summary")
                summary = said("Connection dropped")[1]
            finally:
                await asyncio.to_thread(zookeeper_server.start)
            held = int(summary.split("(and ")[1].split(" more since the last such message)")[0])
            assert held >= 3
            await wait_until(lambda: said("again after"), 20, "the reconnection to be told")
            back = said("again after")
            assert len(back) == 1
            assert int(back[0].split("again after ")[1].split()[0]) >= held + 2
            await registry.list(APPKEY)
            # the next outage's first message goes out at once (the clock has not moved)
            caplog.clear()
            await asyncio.to_thread(zookeeper_server.stop)
            try:
                await wait_until(lambda: said("Connection dropped"), 20, "the next outage")
            finally:
                await asyncio.to_thread(zookeeper_server.start)
            await wait_until(lambda: said("again after"), 20, "the second reconnection")

    run(scenario(), timeout=55)


def test_zk_calls_racing_close_or_after_it_fail_as_registry_errors_and_leave_no_threads():
    from octo_core.registry.zookeeper import ZooKeeperRegistry

    def call_threads() -> List[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("octo-zk-call")]

    async def main():
        # nothing listens here: every call waits op_timeout for a session, as in an outage
        registry = ZooKeeperRegistry("127.0.0.1:9", op_timeout=0.5)
        waiting = [asyncio.ensure_future(registry.list("com.a")) for _ in range(4)]
        await asyncio.sleep(0.1)   # (the calls hold the pool's threads: none is needed for this)
        closing = asyncio.ensure_future(registry.close())
        await asyncio.sleep(0)
        racing = [asyncio.ensure_future(registry.list("com.a")) for _ in range(8)]
        outcomes = await asyncio.gather(*waiting, *racing, return_exceptions=True)
        await closing
        assert all(isinstance(outcome, RegistryError) for outcome in outcomes), outcomes
        with pytest.raises(RegistryError, match="closed"):
            await registry.list("com.a")
        await wait_until(lambda: not call_threads(), what="the call pool's threads to end")

    run(main())
