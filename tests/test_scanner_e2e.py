"""The health ``Scanner`` against real provider processes (tests/naming_provider.py)
registered in ``file://`` and ``zk://``.

A SIGSTOPped provider is hung (its socket still accepts, it never answers), a
SIGKILLed one refuses connections. The TTL (file://) and the session timeout
(zk://) are long here, so a dead provider's node stays listed and the scanner
is what marks it. tests/test_health.py covers the same rules against in-process
peers and a memory registry; these check them on the real thing.

Every process runs in its own process group and is killed in a ``finally``;
every wait is bounded; nothing asserts how long something took.
"""
from __future__ import annotations

import asyncio
import faulthandler
import logging
import signal
import subprocess
import sys
import uuid
from typing import Dict, Iterator

import pytest

from octo_core import cli
from octo_core.health import Scanner
from octo_core.protocol import NodeStatus
from octo_core.registry import Node, Registry, open_registry

from naming_provider import Providers
from wire_helpers import run
from zk import zookeeper_server  # noqa: F401  (fixture)

APPKEY = "com.example.scanner.e2e"
# One probe's bound and the pause before the confirming probe.
PROBE = dict(timeout=0.5, confirm_delay=0.2)
ROUND_LIMIT = 20.0      # seconds a scan may take before the test gives up on it


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    """A hang dumps every stack and ends the run (providers exit when orphaned)."""
    faulthandler.dump_traceback_later(90, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(params=["file", "zk"])
def url(request, tmp_path) -> str:
    """Long enough that no killed provider's node goes away by itself during a test."""
    if request.param == "file":
        return f"file://{tmp_path}/registry?ttl=60&interval=0.1"
    server = request.getfixturevalue("zookeeper_server")
    return server.url(f"scanner-{uuid.uuid4().hex[:12]}", timeout=20, op_timeout=3)


@pytest.fixture
def providers(url, tmp_path) -> Iterator[Providers]:
    with Providers(url, APPKEY, str(tmp_path)) as launched:
        yield launched


async def statuses(registry: Registry) -> Dict[str, int]:
    return {node.key: node.status for node in await registry.list(APPKEY)}


async def scan(scanner: Scanner):
    return (await asyncio.wait_for(scanner.run_once(), ROUND_LIMIT))[APPKEY]


def test_hung_and_killed_providers_become_dead_only_after_confirmation_and_revive(
        url, providers, caplog):
    caplog.set_level(logging.DEBUG, logger="octo_core.health")

    async def scenario():
        hung, killed, *rest = await asyncio.to_thread(providers.start, "p1", "p2", "p3", "p4", "p5")
        everyone = {p.key for p in providers.all.values()}
        async with open_registry(url) as registry:
            scanner = Scanner(registry, [APPKEY], **PROBE)
            report = await scan(scanner)
            assert (report.probed, report.failed, report.changes, report.error) == (5, [], {}, None)

            # A pause shorter than the confirmation delay is not a death: hung at the
            # first probe, answering at the second. (Timers on one loop: the first
            # probe times out at 0.5 s, SIGCONT at 1 s, the confirming probe at 2.5 s.)
            patient = Scanner(registry, [APPKEY], timeout=0.5, confirm_delay=2.0)
            hung.signal(signal.SIGSTOP)
            try:
                round_ = asyncio.get_running_loop().create_task(scan(patient))
                await asyncio.sleep(1.0)
            finally:
                hung.signal(signal.SIGCONT)
            report = await round_
            assert any(f"probe of {hung.key} failed" in r.getMessage() for r in caplog.records), \
                "the first probe of the paused provider should have failed"
            assert (report.failed, report.changes) == ([], {})
            assert set((await statuses(registry)).values()) == {NodeStatus.ALIVE}

            # Hung for good, and killed: both DEAD after the confirming probe.
            hung.signal(signal.SIGSTOP)
            killed.kill()
            report = await scan(scanner)
            assert sorted(report.failed) == sorted([hung.key, killed.key])
            assert not report.suspected_fault
            assert report.changes == {hung.key: NodeStatus.DEAD, killed.key: NodeStatus.DEAD}
            listed = await statuses(registry)
            assert set(listed) == everyone, "a killed provider's node must still be listed"
            assert {key for key, status in listed.items() if status == NodeStatus.DEAD} == \
                {hung.key, killed.key}

            # SIGCONT: the hung provider answers again and is ALIVE; the killed one stays DEAD.
            hung.signal(signal.SIGCONT)
            deadline = asyncio.get_running_loop().time() + ROUND_LIMIT
            while (await statuses(registry))[hung.key] != NodeStatus.ALIVE:
                assert asyncio.get_running_loop().time() < deadline, "the provider never revived"
                report = await scan(scanner)
            listed = await statuses(registry)
            assert listed[killed.key] == NodeStatus.DEAD
            assert all(listed[p.key] == NodeStatus.ALIVE for p in [hung, *rest])
            report = await scan(scanner)          # a steady state: nothing more to write
            assert (report.failed, report.changes) == ([killed.key], {})
    run(scenario(), timeout=80)


def test_mass_failure_trips_the_guard_and_marks_none(url, providers):
    async def scenario():
        hung, killed1, killed2, healthy = await asyncio.to_thread(
            providers.start, "p1", "p2", "p3", "p4")
        async with open_registry(url) as registry:
            scanner = Scanner(registry, [APPKEY], **PROBE)
            assert (await scan(scanner)).failed == []

            hung.signal(signal.SIGSTOP)
            killed1.kill()
            killed2.kill()
            report = await scan(scanner)
            assert report.suspected_fault
            assert sorted(report.failed) == sorted([hung.key, killed1.key, killed2.key])
            assert report.changes == {}
            assert set((await statuses(registry)).values()) == {NodeStatus.ALIVE}

            # The same from a scanner process: exit status 1, and still nothing marked.
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "octo_core", "scanner", "--registry", url,
                 "--appkey", APPKEY, "--once", "--timeout", "0.5", "--confirm-delay", "0.2"],
                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            assert done.returncode == 1, done.stderr
            assert "suspecting the scanner or the network" in done.stderr
            assert set((await statuses(registry)).values()) == {NodeStatus.ALIVE}

            # The hung one comes back: 2 of 4 dead is no mass failure, the dead are marked.
            hung.signal(signal.SIGCONT)
            report = await scan(scanner)
            assert not report.suspected_fault
            assert report.changes == {killed1.key: NodeStatus.DEAD, killed2.key: NodeStatus.DEAD}
            listed = await statuses(registry)
            assert (listed[hung.key], listed[healthy.key]) == (NodeStatus.ALIVE, NodeStatus.ALIVE)
    run(scenario(), timeout=80)


@pytest.mark.parametrize("registry, why", [
    ("memory://scanner", "a memory registry lives in one process"),
    ("file:///nonexistent/octo-registry", "no such directory")])
def test_a_registry_the_scanner_process_cannot_see_is_a_usage_error(registry, why, capsys):
    """`octo scanner --once` used to exit 0 saying nothing: its own memory registry
    never holds a node, and a file:// directory that does not exist is a typo."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["scanner", "--registry", registry, "--appkey", APPKEY, "--once"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    [message] = [line for line in err.splitlines() if "error:" in line]
    assert f"argument --registry: {registry}: {why}" in message


def test_an_existing_file_registry_with_no_nodes_is_scanned(tmp_path, caplog):
    """Only a directory that does not exist is refused: an empty one is scanned,
    and the round says it found no node (a wrong appkey, or the wrong registry)."""
    assert cli.main(["scanner", "--registry", f"file://{tmp_path}", "--appkey", APPKEY,
                     "--once", "--timeout", "0.5"]) == 0
    assert f"{APPKEY}: no nodes in file://{tmp_path}" in caplog.text

    async def stopped() -> str:
        """Nodes listed but all STOPPED are left alone on purpose: no warning."""
        registry = open_registry(f"file://{tmp_path}")
        try:
            await registry.register(Node(APPKEY, "127.0.0.1", 9, status=NodeStatus.STOPPED))
            done = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "octo_core", "scanner", "--registry",
                                 f"file://{tmp_path}", "--appkey", APPKEY, "--once"],
                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        finally:
            await registry.close()
        assert done.returncode == 0, done.stderr
        return done.stderr
    assert "no nodes" not in run(stopped())
