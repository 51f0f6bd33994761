"""Naming, end to end and across processes: real provider processes
(tests/naming_provider.py) registered in ``file://`` and ``zk://``, a discovering
``AsyncClient`` in this process, and an operator in a third process.

What the registry tests (tests/test_registry.py) check for one backend call at a
time, these check from the caller's side: that a running client follows the
registry (operator changes, crashes, graceful stops, session expiry) and that
no call fails while it does - under load, through a ZooKeeper outage, and when
it has to start from its snapshot with the registry down.

Every process binds 127.0.0.1 on a free port, runs in its own process group and
is killed in a ``finally``; every wait polls against a deadline; nothing asserts
how long something took. The ZooKeeper outage lasts the issue's full 30 s
(``OCTO_ZK_OUTAGE_SECONDS`` shortens it when iterating locally).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import AsyncIterator, Dict, Iterator, List, NamedTuple, Optional, Set

import pytest

import octo_core
from octo_core.protocol import NodeStatus
from octo_core.registry import Node, open_registry

from naming_provider import Providers
from wire_helpers import Echo, run, wait_until
from zk import ZooKeeper, zookeeper_server  # noqa: F401  (fixture)

APPKEY = "com.example.naming.e2e"
CALLER = "com.example.naming.caller"
# How long ZooKeeper stays down under load (the scenario: 30 s).
OUTAGE_SECONDS = float(os.environ.get("OCTO_ZK_OUTAGE_SECONDS", "30"))   # the 30 s
FILE_TTL = 1.5          # seconds until a silent provider's node file expires
ZK_SESSION = 2.5        # seconds: the ZooKeeper session timeout
EXPIRY_MARGIN = 15.0    # deadline slack past the TTL / session timeout


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    """A hang dumps every stack and ends the run (providers exit when orphaned)."""
    faulthandler.dump_traceback_later(90 + OUTAGE_SECONDS, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


class Backend(NamedTuple):
    kind: str
    url: str
    expiry: float             # how long a dead provider's node may stay listed
    root: Optional[str]       # file://: the registry directory


@pytest.fixture(params=["file", "zk"])
def backend(request, tmp_path) -> Backend:
    if request.param == "file":
        root = str(tmp_path / "registry")
        return Backend("file", f"file://{root}?ttl={FILE_TTL}&interval=0.1", FILE_TTL, root)
    server = request.getfixturevalue("zookeeper_server")
    return Backend("zk", server.url(unique("naming"), timeout=ZK_SESSION, op_timeout=2),
                   ZK_SESSION, None)


@pytest.fixture
def providers(backend: Backend, tmp_path) -> Iterator[Providers]:
    with Providers(backend.url, APPKEY, str(tmp_path)) as launched:
        yield launched


# --- the caller's side ---------------------------------------------------------------------

@contextlib.asynccontextmanager
async def discovering_client(url: str, **options) -> AsyncIterator[octo_core.AsyncClient]:
    options.setdefault("timeout", 2.0)
    client = octo_core.AsyncClient(Echo, appkey=CALLER, registry=url, remote_appkey=APPKEY,
                                   **options)
    try:
        yield client
    finally:
        await asyncio.wait_for(client.close(), 15)


def client_keys(client: octo_core.AsyncClient) -> Set[str]:
    """The node keys the client's discovery holds (private: no public accessor)."""
    return {node.key for node in client._directory.nodes}


class Members:
    """A registry watch in this process: what the registry lists right now."""

    def __init__(self, registry) -> None:
        self.registry = registry
        self.nodes: Dict[str, Node] = {}

    def __call__(self, nodes: List[Node], rules: list) -> None:
        self.nodes = {node.key: node for node in nodes}


@contextlib.asynccontextmanager
async def observing(url: str) -> AsyncIterator[Members]:
    registry = open_registry(url)
    members = Members(registry)
    try:
        registry.watch(APPKEY, members)
        yield members
    finally:
        await asyncio.wait_for(registry.close(), 15)


class Load:
    """``workers`` loops of ``whoami`` calls: counts every call and its outcome."""

    def __init__(self, client: octo_core.AsyncClient, workers: int = 4,
                 pause: float = 0.005) -> None:
        self.client = client
        self.workers = workers
        self.pause = pause
        self.issued = 0
        self.ok = 0
        self.failures: List[str] = []
        self.answers: List[str] = []          # who answered, in completion order
        self._stop = asyncio.Event()
        self._tasks: List[asyncio.Task] = []

    def start(self) -> "Load":
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._worker()) for _ in range(self.workers)]
        return self

    async def _worker(self) -> None:
        while not self._stop.is_set():
            self.issued += 1
            try:
                name = await self.client.whoami()
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                self.failures.append(f"{time.strftime('%X')} {exc!r}")
            else:
                self.ok += 1
                self.answers.append(name)
            await asyncio.sleep(self.pause)

    async def stop(self) -> None:
        """Stop issuing calls and wait for those in flight (bounded)."""
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 15)

    def mark(self) -> int:
        return len(self.answers)

    async def wait_answers(self, names: Set[str], timeout: float, what: str,
                           since: Optional[int] = None) -> None:
        """Until each of ``names`` answered (after ``since``, default now)."""
        start = self.mark() if since is None else since
        await wait_until(lambda: names <= set(self.answers[start:]) or self.failures,
                         timeout, what)
        self.assert_clean()

    async def wait_calls(self, count: int, timeout: float, what: str) -> List[str]:
        """``count`` more answers; returns them."""
        start = self.mark()
        await wait_until(lambda: self.mark() - start >= count or self.failures, timeout, what)
        self.assert_clean()
        return self.answers[start:start + count]

    async def wait_streak(self, names: Set[str], streak: int, timeout: float, what: str) -> None:
        """Until the last ``streak`` answers (all after now) came from ``names`` only."""
        start = self.mark()

        def done() -> bool:
            tail = self.answers[-streak:]
            return (self.mark() - start >= streak and set(tail) <= names) or bool(self.failures)
        await wait_until(done, timeout, what)
        self.assert_clean()

    def assert_clean(self) -> None:
        assert self.failures == [], f"{len(self.failures)} failed calls: {self.failures[:5]}"

    def assert_every_call_answered(self) -> None:
        self.assert_clean()
        assert self.ok == self.issued, f"{self.issued} calls issued, {self.ok} answered"


async def until_answered(client: octo_core.AsyncClient, names: Set[str], timeout: float,
                         what: str) -> List[str]:
    """Sequential ``whoami`` calls (each must succeed) until every one of ``names`` answered."""
    answers: List[str] = []
    deadline = time.monotonic() + timeout
    while not names <= set(answers):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; answers: "
                                 f"{collections.Counter(answers)}")
        answers.append(await client.whoami())
    return answers


# --- the operator: a third process ---------------------------------------------------------

OPERATOR_SCRIPT = """
import asyncio, sys
from octo_core.registry import open_registry

async def main(url, appkey, key, *changes):
    fields = {name: int(value) for name, value in (change.split("=", 1) for change in changes)}
    async with open_registry(url) as registry:
        node = await registry.update(appkey, key, **fields)
    print(node.to_json(), flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


async def operate(url: str, key: str, **changes: int) -> dict:
    """Change operator fields of node ``key`` from another process; returns the stored node."""
    argv = [sys.executable, "-c", OPERATOR_SCRIPT, url, APPKEY, key]
    argv += [f"{name}={int(value)}" for name, value in changes.items()]
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True,
                                   timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"operator {changes} on {key} failed:\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- 1. operator changes reach a running client --------------------------------------------

def test_operator_changes_from_a_third_process_steer_a_running_client(backend, providers):
    async def scenario():
        p1, p2, p3 = await asyncio.to_thread(providers.start, "p1", "p2", "p3")
        async with discovering_client(backend.url) as client:
            load = Load(client, workers=2).start()
            try:
                await load.wait_answers({"p1", "p2", "p3"}, 20,
                                        "the client to discover all three providers")
                drained = await operate(backend.url, p1.key, weight=0)
                assert drained["weight"] == 0
                stopped = await operate(backend.url, p2.key, status=NodeStatus.STOPPED)
                assert stopped["status"] == NodeStatus.STOPPED
                await load.wait_streak({"p3"}, 100, 20,
                                       "the client to stop calling the drained and stopped nodes")
                assert set(await load.wait_calls(100, 20, "more calls")) == {"p3"}

                await operate(backend.url, p1.key, weight=10)
                await operate(backend.url, p2.key, status=NodeStatus.ALIVE)
                await load.wait_answers({"p1", "p2"}, 20, "the restored nodes to answer again")
            finally:
                await load.stop()
            load.assert_every_call_answered()
    run(scenario(), timeout=80)


# --- 2. kill -9 under load: failover hides it ---------------------------------------------

def test_kill_9_under_load_with_failover_fails_no_call(backend, providers):
    async def scenario():
        victim, _, _ = await asyncio.to_thread(providers.start, "p1", "p2", "p3")
        async with observing(backend.url) as members, \
                discovering_client(backend.url, cluster="failover", idempotent=True,
                                   retries=2) as client:
            load = Load(client, workers=4).start()
            try:
                await load.wait_answers({"p1", "p2", "p3"}, 20, "calls to reach every provider")
                await wait_until(lambda: victim.key in members.nodes, 10, "the observer's list")
                answered_before = load.answers.count("p1")
                victim.kill()
                await wait_until(lambda: victim.key not in members.nodes,
                                 backend.expiry + EXPIRY_MARGIN,
                                 "the killed provider to leave the registry")
                await wait_until(lambda: victim.key not in client_keys(client), 10,
                                 "the killed provider to leave the client's list")
                after = await load.wait_calls(200, 20, "calls after the provider left")
                assert set(after) <= {"p2", "p3"}
            finally:
                await load.stop()
            load.assert_every_call_answered()
            assert answered_before > 0
    run(scenario(), timeout=80)


# --- 3. SIGTERM under load: the graceful stop hides it from a failfast client ------------

def test_sigterm_under_load_unregisters_before_refusing(backend, providers):
    async def scenario():
        leaving, _, _ = await asyncio.to_thread(providers.start, "p1", "p2", "p3")
        async with observing(backend.url) as members, \
                discovering_client(backend.url, cluster="failfast") as client:
            load = Load(client, workers=4).start()
            try:
                await load.wait_answers({"p1", "p2", "p3"}, 20, "calls to reach every provider")
                await wait_until(lambda: leaving.key in members.nodes, 10, "the observer's list")
                leaving.signal(signal.SIGTERM)
                status = await asyncio.to_thread(leaving.wait_exit, 30)
                assert status == 0, f"the stopped provider exited with {status}"
                await wait_until(lambda: leaving.key not in members.nodes, 10,
                                 "the stopped provider to leave the registry")
                await wait_until(lambda: leaving.key not in client_keys(client), 10,
                                 "the stopped provider to leave the client's list")
                after = await load.wait_calls(200, 20, "calls after the provider stopped")
                assert set(after) <= {"p2", "p3"}
            finally:
                await load.stop()
            load.assert_every_call_answered()
    run(scenario(), timeout=80)


# --- 4. ZooKeeper outage under load ------------------------------------------------------

def test_zk_outage_under_load_fails_no_call_and_changes_flow_again(zookeeper_server, tmp_path):
    url = zookeeper_server.url(unique("outage"), timeout=ZK_SESSION, op_timeout=1)
    providers = Providers(url, APPKEY, str(tmp_path))

    async def scenario():
        await asyncio.to_thread(providers.start, "p1", "p2")
        async with discovering_client(url) as client:
            load = Load(client, workers=4).start()
            try:
                await load.wait_answers({"p1", "p2"}, 20, "the client to discover both providers")
                await asyncio.to_thread(zookeeper_server.stop)
                try:
                    ok_before = load.ok
                    deadline = time.monotonic() + OUTAGE_SECONDS
                    while time.monotonic() < deadline:
                        await asyncio.sleep(0.2)
                        load.assert_clean()
                    assert load.ok > ok_before, "no call completed during the outage"
                    assert client_keys(client) == {p.key for p in providers.all.values()}
                finally:
                    await asyncio.to_thread(zookeeper_server.start)
                # Back: a provider that registers now is discovered (changes flow again).
                await asyncio.to_thread(providers.start, "p3")
                await load.wait_answers({"p3"}, 30, "the client to discover a provider "
                                                    "registered after the outage")
                await load.wait_answers({"p1", "p2", "p3"}, 20, "every provider to answer")
            finally:
                await load.stop()
            load.assert_every_call_answered()

    with providers:                 # killed, and their logs shown, on the way out
        run(scenario(), timeout=70 + OUTAGE_SECONDS)


# --- 5. ZooKeeper session expiry of a provider -------------------------------------------

def test_zk_provider_session_expiry_reregisters_by_itself(zookeeper_server, tmp_path):
    chroot = unique("expiry")
    url = zookeeper_server.url(chroot, timeout=4, op_timeout=2)
    # p1's session is short: a SIGSTOP (a long GC pause, a frozen VM) outlasts it.
    short = zookeeper_server.url(chroot, timeout=1.5, op_timeout=2)
    providers = Providers(url, APPKEY, str(tmp_path))

    async def scenario():
        p1 = (await asyncio.to_thread(providers.start, "p1", registry=short))[0]
        await asyncio.to_thread(providers.start, "p2")
        async with observing(url) as members, discovering_client(url) as client:
            await until_answered(client, {"p1", "p2"}, 20, "the client to discover both")
            p1.signal(signal.SIGSTOP)
            try:
                await wait_until(lambda: p1.key not in members.nodes, 20,
                                 "the frozen provider's session to expire")
                await wait_until(lambda: p1.key not in client_keys(client), 10,
                                 "the client to drop the expired node")
            finally:
                p1.signal(signal.SIGCONT)
            await wait_until(lambda: p1.key in members.nodes, 20,
                             "the provider to re-register by itself")
            assert members.nodes[p1.key].status == NodeStatus.ALIVE
            await wait_until(lambda: p1.key in client_keys(client), 10,
                             "the client to see the provider again")
            await until_answered(client, {"p1"}, 20, "the re-registered provider to answer")
            assert p1.process.poll() is None
        assert "re-registered" in p1.log(200), "the provider did not report re-registering"

    with providers:                 # killed, and their logs shown, on the way out
        run(scenario(), timeout=80)


# --- 6. a client starts from its snapshot while the registry is down ---------------------

@contextlib.asynccontextmanager
async def registry_down(backend: Backend, server: Optional[ZooKeeper]) -> AsyncIterator[None]:
    """zk: ZooKeeper stopped. file: the registry directory replaced by a plain file, so
    every read fails (a missing directory is not down: it lists no nodes)."""
    if backend.kind == "zk":
        await asyncio.to_thread(server.stop)
        try:
            yield
        finally:
            await asyncio.to_thread(server.start)
        return
    aside = backend.root + ".aside"
    os.rename(backend.root, aside)
    with open(backend.root, "w") as f:
        f.write("not a directory\n")
    try:
        yield
    finally:
        os.unlink(backend.root)
        os.rename(aside, backend.root)


def snapshot_keys(path: str) -> Set[str]:
    try:
        with open(path) as f:
            return {node["ip"] + ":" + str(node["port"]) for node in json.load(f)["nodes"]}
    except (OSError, ValueError, KeyError):
        return set()


def test_client_starts_from_its_snapshot_while_the_registry_is_down(backend, providers,
                                                                    tmp_path, request):
    snapshot = str(tmp_path / "octo-snapshot.json")
    server = request.getfixturevalue("zookeeper_server") if backend.kind == "zk" else None

    async def scenario():
        p1, p2 = await asyncio.to_thread(providers.start, "p1", "p2")
        async with discovering_client(backend.url, snapshot_path=snapshot) as first:
            await until_answered(first, {"p1", "p2"}, 20, "the first client to discover both")
            await wait_until(lambda: snapshot_keys(snapshot) == {p1.key, p2.key}, 10,
                             "the snapshot to hold both providers")
        # Created now, it first asks the registry at its first call, with the registry down.
        async with discovering_client(backend.url, snapshot_path=snapshot) as second:
            async with registry_down(backend, server):
                with pytest.raises(Exception):   # really down: the registry cannot list
                    async with open_registry(backend.url) as registry:
                        await asyncio.wait_for(registry.list(APPKEY), 10)
                answers = [await second.whoami() for _ in range(60)]
                assert set(answers) == {"p1", "p2"}
                assert client_keys(second) == {p1.key, p2.key}
            # The registry is back: the client follows it again.
            await asyncio.to_thread(providers.start, "p3")
            await until_answered(second, {"p3"}, 30,
                                 "the client to discover a provider registered after the outage")
    run(scenario(), timeout=80)


# --- file:// : a provider paused past its TTL -----------------------------------------------

def test_file_provider_paused_past_its_ttl_is_listed_again(tmp_path):
    """The file:// analog of the session expiry above: a lone provider frozen longer
    than the TTL drops out; once it runs (and renews its file) again, watchers must
    list it again. (Fails as of this writing: a file watch rescans a provider directory
    only when the directory changes or a *live* node is due to expire; renewing a file
    with ``os.utime`` changes neither, so with no other live node it is never seen.)"""
    url = f"file://{tmp_path}/registry?ttl={FILE_TTL}&interval=0.1"
    providers = Providers(url, APPKEY, str(tmp_path))

    async def scenario():
        (p1,) = await asyncio.to_thread(providers.start, "p1")
        async with observing(url) as members, discovering_client(url) as client:
            await until_answered(client, {"p1"}, 20, "the client to discover the provider")
            p1.signal(signal.SIGSTOP)
            try:
                await wait_until(lambda: p1.key not in members.nodes, FILE_TTL + EXPIRY_MARGIN,
                                 "the frozen provider's node to expire")
                # An empty list looks like a registry failure: the client keeps the node.
                assert client_keys(client) == {p1.key}
            finally:
                p1.signal(signal.SIGCONT)
            await until_answered(client, {"p1"}, 20, "the resumed provider to answer")
            deadline = time.monotonic() + 15
            while p1.key not in {n.key for n in await members.registry.list(APPKEY)}:
                assert time.monotonic() < deadline, "registry.list() never showed the renewed node"
                await asyncio.sleep(0.1)
            try:
                await wait_until(lambda: p1.key in members.nodes, 8,
                                 "the watch to list the resumed provider again")
            except AssertionError as exc:
                raise AssertionError(
                    f"{exc}: registry.list() holds {p1.key} again but the watch still delivers "
                    f"{sorted(members.nodes)}") from None

    with providers:                 # killed, and their logs shown, on the way out
        run(scenario(), timeout=80)
