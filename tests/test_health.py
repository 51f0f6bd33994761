"""``Scanner`` against real octo_core Servers and hand-made misbehaving peers on 127.0.0.1.

Peers: a hung node (accepts, never answers), a dead one (a bound port that
refuses connections), a flaky one (drops the first connection, answers the
next). Each counts its connections, so a test can tell a confirmation probe
happened - or that a STOPPED node was never probed at all.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from typing import AsyncIterator, List

import pytest

from octo_core import cli, health, protocol
from octo_core.health import Scanner
from octo_core.protocol import FrameDecoder, HeartbeatInfo, MessageType, NodeStatus
from octo_core.registry import HeartbeatSupport, Node
from octo_core.registry.memory import MemoryRegistry

from wire_helpers import LOCALHOST, echo_services, refusing_port, run, serving, wait_until, watchdog  # noqa: F401,E501

pytestmark = pytest.mark.usefixtures("watchdog")

APPKEY = "com.example.health"
FAST = dict(timeout=0.3, confirm_delay=0.05)


class Peer:
    """A raw TCP peer: ``hang`` never answers; ``flaky`` drops its first connection and
    answers heartbeats (ALIVE) on the others."""

    def __init__(self, behaviour: str, appkey: str = APPKEY) -> None:
        self.behaviour = behaviour
        self.appkey = appkey
        self.connections = 0
        self.port = 0
        self._writers: List[asyncio.StreamWriter] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        if self.behaviour == "flaky" and self.connections == 1:
            writer.close()
            return
        decoder = FrameDecoder()
        while data := await reader.read(65536):
            if self.behaviour == "hang":
                continue
            for frame in decoder.feed(data):
                beat = HeartbeatInfo(appkey=self.appkey, sendTime=int(time.time() * 1000),
                                     status=NodeStatus.ALIVE)
                header = protocol.response_header(frame.header.requestInfo.sequenceId,
                                                  message_type=MessageType.SCANNER_HEARTBEAT,
                                                  heartbeat=beat)
                writer.write(protocol.encode_unified(header, b""))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator["Peer"]:
        server = await asyncio.start_server(self._handle, LOCALHOST, 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for writer in self._writers:
                writer.close()
            await server.wait_closed()


def node(port: int, *, heartbeat: bool = True, status: int = NodeStatus.ALIVE) -> Node:
    support = HeartbeatSupport.BOTH if heartbeat else HeartbeatSupport.NONE
    return Node(APPKEY, LOCALHOST, port, heartbeatSupport=support, status=status)


def new_registry() -> MemoryRegistry:
    return MemoryRegistry(f"health-{uuid.uuid4().hex}")


async def statuses(registry: MemoryRegistry) -> dict:
    return {n.port: n.status for n in await registry.list(APPKEY)}


@contextlib.asynccontextmanager
async def servers(count: int) -> AsyncIterator[list]:
    """``count`` real octo_core Servers (ALIVE) of ``APPKEY``, always stopped."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(serving(echo_services(), appkey=APPKEY))
               for _ in range(count)]


def test_dead_only_after_a_confirming_probe():
    async def scenario():
        registry = new_registry()
        with refusing_port() as dead:
            dead_port = dead.getsockname()[1]
            async with servers(3) as live, Peer("hang").running() as hung, \
                    Peer("flaky").running() as flaky:
                for server in live:
                    await registry.register(node(server.port))
                await registry.register(node(hung.port))
                await registry.register(node(flaky.port))
                await registry.register(node(dead_port, heartbeat=False))   # a TCP probe

                report = (await Scanner(registry, [APPKEY], **FAST).run_once())[APPKEY]

                found = await statuses(registry)
                assert found[hung.port] == found[dead_port] == NodeStatus.DEAD
                assert found[flaky.port] == NodeStatus.ALIVE    # failed once, not twice
                assert all(found[s.port] == NodeStatus.ALIVE for s in live)
                # Both suspects were probed again, each on a new connection.
                assert hung.connections == 2 and flaky.connections == 2
                assert report.probed == 6 and not report.suspected_fault
                assert sorted(report.failed) == sorted([f"{LOCALHOST}:{hung.port}",
                                                        f"{LOCALHOST}:{dead_port}"])
                assert report.changes == {f"{LOCALHOST}:{hung.port}": NodeStatus.DEAD,
                                          f"{LOCALHOST}:{dead_port}": NodeStatus.DEAD}
    run(scenario())


def test_recovered_nodes_go_back_to_alive():
    async def scenario():
        registry = new_registry()
        async with servers(2) as (first, second):
            await registry.register(node(first.port, status=NodeStatus.DEAD))
            await registry.register(node(second.port, heartbeat=False, status=NodeStatus.DEAD))
            scanner = Scanner(registry, [APPKEY], **FAST)
            report = (await scanner.run_once())[APPKEY]
            assert await statuses(registry) == {first.port: NodeStatus.ALIVE,
                                                second.port: NodeStatus.ALIVE}
            assert len(report.changes) == 2
            assert (await scanner.run_once())[APPKEY].changes == {}   # nothing new
    run(scenario())


def test_heartbeat_status_is_the_nodes_own_word():
    async def scenario():
        registry = new_registry()
        async with servers(2) as (server, other):
            await registry.register(node(server.port))
            await registry.register(node(other.port))
            scanner = Scanner(registry, [APPKEY], **FAST)
            server.status = NodeStatus.WARNING
            await scanner.run_once()
            assert (await statuses(registry))[server.port] == NodeStatus.WARNING
            server.status = NodeStatus.ALIVE
            await scanner.run_once()
            assert (await statuses(registry))[server.port] == NodeStatus.ALIVE
    run(scenario())


def test_stopped_nodes_are_never_probed_or_touched():
    async def scenario():
        registry = new_registry()
        with refusing_port() as dead:
            async with servers(1) as (live,), Peer("hang").running() as hung:
                await registry.register(node(live.port))
                await registry.register(node(hung.port, status=NodeStatus.STOPPED))
                await registry.register(node(dead.getsockname()[1], status=NodeStatus.STOPPED))
                report = (await Scanner(registry, [APPKEY], **FAST).run_once())[APPKEY]
                found = await statuses(registry)
                assert found[hung.port] == found[dead.getsockname()[1]] == NodeStatus.STOPPED
                assert hung.connections == 0
                assert report.probed == 1 and report.changes == {}
    run(scenario())


def test_an_operators_stop_during_a_round_is_not_undone():
    """The operator stops a node after the scanner has listed it (as DEAD) and
    before it writes what it found (ALIVE): the scanner's write is a compare-and-set
    on the status it saw, so the node stays STOPPED, and its operator record too."""
    async def scenario():
        name = f"health-{uuid.uuid4().hex}"
        registry = MemoryRegistry(name)
        async with servers(1) as (server,):
            await registry.register(node(server.port, heartbeat=False, status=NodeStatus.DEAD))

            class OperatorMidRound(MemoryRegistry):
                async def list(self, appkey: str) -> List[Node]:
                    listed = await super().list(appkey)
                    await registry.update(APPKEY, listed[0].key, status=NodeStatus.STOPPED)
                    return listed

            scanning = OperatorMidRound(name)
            report = (await Scanner(scanning, [APPKEY], **FAST).run_once())[APPKEY]
            assert report.changes == {}
            assert await statuses(registry) == {server.port: NodeStatus.STOPPED}
            # the record outlives the provider: re-registered, the node is STOPPED still
            await registry.register(node(server.port, heartbeat=False))
            assert await statuses(registry) == {server.port: NodeStatus.STOPPED}
    run(scenario())


def test_mass_failure_marks_nobody_and_is_reported():
    async def scenario():
        registry = new_registry()
        with refusing_port() as a, refusing_port() as b, refusing_port() as c:
            async with servers(1) as (live,):
                await registry.register(node(live.port))
                for sock in (a, b, c):
                    await registry.register(node(sock.getsockname()[1], heartbeat=False))
                scanner = Scanner(registry, [APPKEY], **FAST)
                await scanner.run_once()
                report = scanner.last_report[APPKEY]
                assert report.suspected_fault and len(report.failed) == 3
                assert report.changes == {}
                assert set((await statuses(registry)).values()) == {NodeStatus.ALIVE}
    run(scenario())


def test_the_guard_counts_only_serving_nodes_that_failed():
    async def scenario():
        registry = new_registry()
        with refusing_port() as old1, refusing_port() as old2, refusing_port() as crashed:
            async with servers(1) as (live,):
                await registry.register(node(live.port))
                for sock in (old1, old2):      # dead long ago, and still dead
                    await registry.register(node(sock.getsockname()[1], heartbeat=False,
                                                 status=NodeStatus.DEAD))
                await registry.register(node(crashed.getsockname()[1], heartbeat=False))
                # 1 of the 2 serving nodes failed: no mass failure, whatever the DEAD ones do.
                report = (await Scanner(registry, [APPKEY], **FAST).run_once())[APPKEY]
                assert not report.suspected_fault and len(report.failed) == 3
                assert report.changes == {f"{LOCALHOST}:{crashed.getsockname()[1]}":
                                          NodeStatus.DEAD}
    run(scenario())


@pytest.mark.parametrize("count, min_nodes", [(1, 2), (2, 3)])
def test_the_guard_leaves_appkeys_with_few_serving_nodes_alone(count, min_nodes):
    """Below ``mass_failure_min_nodes`` serving nodes (2 by default: a lone node's
    failure is always all of them) failed nodes are marked DEAD."""
    async def scenario():
        registry = new_registry()
        with contextlib.ExitStack() as stack:
            ports = [stack.enter_context(refusing_port()).getsockname()[1]
                     for _ in range(count)]
            for port in ports:
                await registry.register(node(port, heartbeat=False))
            scanner = Scanner(registry, [APPKEY], mass_failure_min_nodes=min_nodes, **FAST)
            report = (await scanner.run_once())[APPKEY]
            assert not report.suspected_fault
            assert await statuses(registry) == {port: NodeStatus.DEAD for port in ports}
    run(scenario())


def test_the_guard_protects_two_serving_nodes_by_default():
    """Both of two nodes failing at once is as likely the scanner's own network
    as the service: nobody is marked (a two-node service is common)."""
    async def scenario():
        registry = new_registry()
        with refusing_port() as a, refusing_port() as b:
            for sock in (a, b):
                await registry.register(node(sock.getsockname()[1], heartbeat=False))
            scanner = Scanner(registry, [APPKEY], **FAST)
            assert (await scanner.run_once())[APPKEY].suspected_fault
            assert set((await statuses(registry)).values()) == {NodeStatus.ALIVE}
    run(scenario())


def test_run_loops_until_stopped():
    async def scenario():
        registry = new_registry()
        with refusing_port() as dead:
            async with servers(2) as live:
                for server in live:
                    await registry.register(node(server.port))
                await registry.register(node(dead.getsockname()[1]))
                scanner = Scanner(registry, [APPKEY], interval=0.05, **FAST)
                task = asyncio.ensure_future(scanner.run())
                await wait_until(lambda: scanner.last_report, what="a round")
                scanner.stop()
                await asyncio.wait_for(task, 5)
                assert (await statuses(registry))[dead.getsockname()[1]] == NodeStatus.DEAD
    run(scenario())


def test_main_runs_one_round_from_the_command_line():
    name = f"health-cli-{uuid.uuid4().hex}"
    registry = MemoryRegistry(name)
    with refusing_port() as dead:
        port = dead.getsockname()[1]
        run(registry.register(node(port, heartbeat=False)))
        assert health.main(["--registry", f"memory://{name}", "--appkey", APPKEY,
                            "--appkey", "com.example.empty", "--once", "--timeout", "0.3",
                            "--confirm-delay", "0.05", "--mass-failure-ratio", "1"]) == 0
        assert run(statuses(registry)) == {port: NodeStatus.DEAD}


def test_a_heartbeat_from_another_appkey_is_a_failed_probe():
    # another service now listening on the node's port says nothing about the node
    async def scenario():
        registry = new_registry()
        async with Peer("answer", appkey="com.someone.else").running() as stranger:
            await registry.register(node(stranger.port))
            report = (await Scanner(registry, [APPKEY], **FAST).run_once())[APPKEY]
            assert report.failed == [f"{LOCALHOST}:{stranger.port}"]
            assert await statuses(registry) == {stranger.port: NodeStatus.DEAD}
    run(scenario())


def test_a_node_with_an_unusable_address_fails_alone():
    async def scenario():
        registry = new_registry()
        async with servers(1) as (live,):
            await registry.register(node(live.port))
            await registry.register(node(70000))   # no tool checked the port
            await registry.register(Node("com.example.other", LOCALHOST, 70000))
            scanner = Scanner(registry, [APPKEY, "com.example.other"], **FAST)
            reports = await scanner.run_once()
            assert reports[APPKEY].failed == [f"{LOCALHOST}:70000"]
            assert (await statuses(registry))[live.port] == NodeStatus.ALIVE
            assert reports["com.example.other"].error is None
    run(scenario())


@pytest.mark.parametrize("setting", [
    dict(timeout=0), dict(timeout=-1), dict(timeout=float("nan")), dict(interval=-1),
    dict(interval=float("inf")), dict(confirm_delay=-5), dict(mass_failure_ratio=7),
    dict(mass_failure_ratio=float("nan")), dict(mass_failure_min_nodes=0), dict(concurrency=0),
], ids=repr)
def test_scanner_refuses_settings_out_of_range(setting):
    async def scenario():
        with pytest.raises(ValueError):
            Scanner(new_registry(), [APPKEY], **setting)
    run(scenario())


@pytest.mark.parametrize("argv", [
    ["--timeout", "0"], ["--timeout", "-1"], ["--interval", "-1"], ["--interval", "nan"],
    ["--mass-failure-ratio", "7"], ["--confirm-delay", "-5"], ["--mass-failure-min-nodes", "0"],
    ["--appkey", "../../etc"], ["--appkey", ""],
    ["--registry", "bogus://x"], ["--registry", "file:///tmp/x?ttl=abc"],
    ["--registry", "file:///tmp/x?ttl=inf"], ["--registry", "zk://127.0.0.1:99999/x"],
], ids=" ".join)
def test_main_refuses_bad_arguments_with_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        health.main(["--registry", "memory://x", "--appkey", APPKEY, "--once", *argv])
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err   # the message names the option


def test_the_scanner_help_offers_only_registries_it_can_scan():
    """It offered memory://name, which ``octo scanner`` refuses: a memory registry
    lives in one process, and the scanner's own would hold no node."""
    registry = next(action for action in health.build_parser()._actions
                    if action.dest == "registry")
    assert re.findall(r"\w+://", registry.help.split(" (")[0]) == ["file://", "zk://"]
    assert cli._registry_problem("memory://x", once=False)
