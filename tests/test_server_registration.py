"""A server whose registry is away at start: it serves, and registers once the registry is back.

A registry double that fails while ``down`` (and can hold an attempt in flight),
and a real ZooKeeper stopped for the start. No timing is asserted: waits are
hang guards.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import threading
import uuid
from typing import List, Tuple

import pytest

import octo_core
from octo_core import server as server_module
from octo_core.protocol import NodeStatus
from octo_core.registry import Node, Registry, RegistryError, RegistryTimeout, open_registry
from octo_core.registry import registration
from octo_core.registry.memory import MemoryRegistry

from wire_helpers import (Echo, LOCALHOST, async_client, echo_services, run, serving,  # noqa: F401
                          wait_until, watchdog)
from zk import zookeeper_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("watchdog")

APPKEY = "com.example.registration"


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch) -> None:
    """Retries within milliseconds: the tests wait for them, not for a production backoff."""
    monkeypatch.setattr(registration, "RETRY_FIRST", 0.01)
    monkeypatch.setattr(registration, "RETRY_LAST", 0.05)


class FlakyRegistry(MemoryRegistry):
    """A memory registry whose ``register`` fails while ``down`` and, while ``hold``,
    waits for ``release`` before it registers (an attempt in flight)."""

    def __init__(self) -> None:
        super().__init__(f"registration-{uuid.uuid4().hex}")
        self.down = True
        self.attempts = 0
        self.hold = False
        self.holding = False
        self.release = asyncio.Event()
        self.updates: List[Tuple[str, dict]] = []

    async def register(self, node: Node) -> Node:
        self.attempts += 1
        if self.down:
            raise RegistryError("the registry is down")
        if self.hold:
            self.holding = True
            await self.release.wait()
        return await super().register(node)

    async def update(self, appkey: str, key: str, **changes) -> Node:
        self.updates.append((key, changes))
        if self.down:
            raise RegistryError("the registry is down")
        return await super().update(appkey, key, **changes)


def serving_in(registry: Registry, **options):
    """The echo server of ``APPKEY`` registering in ``registry`` (no unregister delay)."""
    return serving(echo_services(), appkey=APPKEY, registry=registry, unregister_delay=0,
                   **options)


async def stop_during_an_attempt(registry: "FlakyRegistry", server) -> asyncio.Future:
    """Let ``registry`` answer but hold a registration attempt in flight, then
    begin ``server``'s stop; returns the stop."""
    registry.down, registry.hold = False, True
    await wait_until(lambda: registry.holding, 10, "an attempt in flight")
    stopping = asyncio.ensure_future(server.stop())
    await wait_until(lambda: server._leaving, 10, "the stop to begin")
    return stopping


def registration_tasks() -> List[asyncio.Task]:
    return [task for task in asyncio.all_tasks()
            if "Registration" in getattr(task.get_coro(), "__qualname__", "")]


def test_a_server_whose_registry_is_down_serves_and_registers_once_it_is_back(caplog):
    caplog.set_level(logging.INFO, "octo_core.registry")

    async def scenario():
        registry = FlakyRegistry()
        async with serving_in(registry) as server:
            assert server.registered_node is None
            async with async_client(Echo, server.address) as client:   # hosts=: no registry
                assert await client.echo("served unregistered") == "served unregistered"
            await wait_until(lambda: registry.attempts >= 3, 10, "attempts while it is down")
            assert await registry.list(APPKEY) == []
            registry.down = False
            await wait_until(lambda: server.registered_node is not None, 10, "the registration")
            assert [node.key for node in await registry.list(APPKEY)] == [f"{LOCALHOST}:{server.port}"]
            # (the retries end once they see it: a loop pass after the registry answered)
            await wait_until(lambda: registration_tasks() == [], 10, "the retries to end")
        assert await registry.list(APPKEY) == []   # the stop unregistered it, STOPPING first
        assert [changes for _, changes in registry.updates] == [{"status": NodeStatus.STOPPING}]

    run(scenario())
    said = " ".join(record.getMessage() for record in caplog.records)
    assert "serving unregistered" in said and "registering in the background" in said
    assert "registered 127.0.0.1:" in said and "(it served unregistered until now)" in said


def test_require_registry_fails_the_start_and_leaves_nothing_behind():
    async def scenario():
        registry = FlakyRegistry()
        with pytest.raises(RegistryError, match="the registry is down"):
            async with serving_in(registry, require_registry=True):
                pass
        assert registry.attempts == 1 and registration_tasks() == []

    run(scenario())


def test_stop_while_retrying_ends_the_attempts_cleanly(caplog):
    caplog.set_level(logging.ERROR, "asyncio")

    async def scenario():
        registry = FlakyRegistry()
        async with serving_in(registry) as server:
            await wait_until(lambda: registry.attempts >= 2, 10, "a retry")
        assert registration_tasks() == []
        assert await registry.list(APPKEY) == [] and registry.updates == []
        assert server.registered_node is None

    run(scenario())
    gc.collect()
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


def test_a_registration_landing_during_the_stop_is_taken_back():
    async def scenario():
        registry = FlakyRegistry()
        async with serving_in(registry) as server:
            stopping = await stop_during_an_attempt(registry, server)
            registry.release.set()   # the registry stores the node after the stop began
            await asyncio.wait_for(stopping, 10)
            assert await registry.list(APPKEY) == []
            assert [changes for _, changes in registry.updates] == [{"status": NodeStatus.STOPPING}]
            assert registration_tasks() == []

    run(scenario())


def test_zk_a_server_started_while_zookeeper_is_down_registers_when_it_is_back(
        zookeeper_server):  # noqa: F811
    url = zookeeper_server.url(f"reg{uuid.uuid4().hex[:8]}", op_timeout=1, timeout=2)

    async def scenario():
        await asyncio.to_thread(zookeeper_server.stop)
        down = True
        try:
            async with serving(echo_services(), appkey=APPKEY, registry=url,
                               unregister_delay=0) as server:
                assert server.registered_node is None
                async with async_client(Echo, server.address) as client:
                    assert await client.echo("zk is down") == "zk is down"
                await asyncio.to_thread(zookeeper_server.start)
                down = False
                await wait_until(lambda: server.registered_node is not None, 30,
                                 "the registration once ZooKeeper is back")
                async with open_registry(url) as reader:
                    assert [node.key for node in await reader.list(APPKEY)] == \
                        [f"{LOCALHOST}:{server.port}"]
            async with open_registry(url) as reader:
                assert await reader.list(APPKEY) == []
        finally:
            if down:   # (the other tests of the session need it)
                await asyncio.to_thread(zookeeper_server.start)

    run(scenario(), timeout=50)


class LateRegistry(FlakyRegistry):
    """A registry whose first ``register`` waits for ``release`` and only then
    sees whether it is ``down`` (an attempt in flight at start, still undecided)."""

    async def register(self, node: Node) -> Node:
        self.attempts += 1
        if self.attempts == 1:
            self.holding = True
            await self.release.wait()
        if self.down:
            raise RegistryError("the registry is down")
        return await MemoryRegistry.register(self, node)


def started_while(registry: Registry) -> octo_core.Server:
    """The echo server of ``APPKEY`` registering in ``registry``, not started."""
    server = octo_core.Server(APPKEY, LOCALHOST, 0, registry=registry, unregister_delay=0)
    for service, handler, name in echo_services():
        server.add_service(service, handler, name)
    return server


@pytest.mark.parametrize("lands", [True, False], ids=["lands", "fails"])
def test_a_stop_during_the_starts_attempt_leaves_no_node_and_no_retries(lands):
    async def scenario():
        registry = LateRegistry()
        registry.down = not lands
        server = started_while(registry)
        starting = asyncio.ensure_future(server.start())
        await wait_until(lambda: registry.holding, 10, "the start's attempt in flight")
        stopping = asyncio.ensure_future(server.stop())
        await wait_until(lambda: server._leaving, 10, "the stop to begin")
        registry.release.set()   # the start's attempt ends once the stop has begun
        await asyncio.wait_for(asyncio.gather(starting, stopping), 10)
        assert await registry.list(APPKEY) == []   # taken back (or never stored)
        assert registration_tasks() == [] and registry.attempts == 1

    run(scenario())


def test_a_stop_during_the_address_lookup_registers_nothing(monkeypatch):
    looking, answer = threading.Event(), threading.Event()

    def slow_lookup(wildcard: str) -> str:
        looking.set()
        answer.wait(10)
        return LOCALHOST

    # (the server listens on loopback; its registration looks its address up as for 0.0.0.0)
    monkeypatch.setattr(server_module, "_EVERY_INTERFACE", (LOCALHOST,))
    monkeypatch.setattr(server_module, "_reachable_ip", slow_lookup)

    async def scenario():
        registry = FlakyRegistry()
        registry.down = False
        server = started_while(registry)
        starting = asyncio.ensure_future(server.start())
        await wait_until(looking.is_set, 10, "the address lookup")
        await asyncio.wait_for(server.stop(), 10)
        answer.set()
        await asyncio.wait_for(starting, 10)
        assert await registry.list(APPKEY) == [] and registry.attempts == 0
        assert registration_tasks() == []

    run(scenario())


def test_a_stop_cancelled_while_it_withdraws_the_node_is_done_whole_by_the_next():
    """A stop given up on (cancelled: a supervisor's bound) while the retry's
    attempt is in flight, then a stop to the end: the registration that lands
    meanwhile is taken back, not left listed for a server that is gone."""
    async def scenario():
        registry = FlakyRegistry()
        async with serving_in(registry) as server:
            stopping = await stop_during_an_attempt(registry, server)
            assert server.registered_node is None   # (stopping)
            stopping.cancel()
            await asyncio.gather(stopping, return_exceptions=True)
            registry.release.set()   # the attempt lands after the stop was given up
        # (serving_in's stop, to the end)
        assert await registry.list(APPKEY) == []
        assert registration_tasks() == []

    run(scenario())


def test_a_stop_the_registry_cannot_hear_waits_out_no_unregister_delay(caplog):
    """The registry away at stop: the node cannot be marked STOPPING, so no caller
    learns of the stop through it, and ``unregister_delay`` (here an hour: a
    stop that waited it out would hang the test) is not waited for."""
    caplog.set_level(logging.WARNING, "octo_core.registry")

    async def scenario():
        registry = FlakyRegistry()
        registry.down = False
        async with serving(echo_services(), appkey=APPKEY, registry=registry,
                           unregister_delay=3600) as server:
            await wait_until(lambda: server.registered_node is not None, 10, "the registration")
            registry.down = True
        assert [changes for _, changes in registry.updates] == [{"status": NodeStatus.STOPPING}]

    run(scenario())
    assert "could not unregister" in caplog.text


class SilentRegistry(FlakyRegistry):
    """A registry that, while ``silent``, never answers ``register``, ``update`` or
    ``unregister`` (a connection to it hangs), with a short ``op_timeout`` (the
    bound the tests wait out, not a time they assert). ``pending``: its calls in
    flight, which a cancellation ends."""

    op_timeout = 0.05

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.silent = True
        self.pending = 0

    async def _silence(self) -> None:
        self.pending += 1
        try:
            await asyncio.Event().wait()   # never set
        finally:
            self.pending -= 1

    async def register(self, node: Node) -> Node:
        if self.silent:
            self.attempts += 1
            await self._silence()
        return await super().register(node)

    async def update(self, appkey: str, key: str, **changes) -> Node:
        if self.silent:
            self.updates.append((key, changes))
            await self._silence()
        return await super().update(appkey, key, **changes)

    async def unregister(self, appkey: str, key: str) -> None:
        if self.silent:
            await self._silence()
        await super().unregister(appkey, key)


def test_a_registry_that_never_answers_does_not_hold_the_start(caplog):
    """Its first attempt given up on at the registry's ``op_timeout``, the server
    serves and registers in the background, each attempt bounded alike, until
    the registry answers."""
    caplog.set_level(logging.INFO, "octo_core.registry")

    async def scenario():
        registry = SilentRegistry()
        async with serving_in(registry) as server:   # (its start is bounded: a hang fails it)
            assert server.registered_node is None
            async with async_client(Echo, server.address) as client:
                assert await client.echo("served unregistered") == "served unregistered"
            await wait_until(lambda: registry.attempts >= 3, 10, "attempts given up on")
            assert await registry.list(APPKEY) == []
            registry.silent = False
            await wait_until(lambda: server.registered_node is not None, 10, "the registration")
            await wait_until(lambda: registration_tasks() == [], 10, "the retries to end")
            assert registry.pending == 0   # each attempt given up on was cancelled
        assert await registry.list(APPKEY) == []
        assert [changes for _, changes in registry.updates] == [{"status": NodeStatus.STOPPING}]

    run(scenario())
    said = " ".join(record.getMessage() for record in caplog.records)
    assert "did not answer within 0.1s): serving unregistered" in said
    assert "(it served unregistered until now)" in said


def test_require_registry_fails_a_start_the_registry_never_answers():
    async def scenario():
        registry = SilentRegistry()
        server = started_while(registry)
        server.require_registry = True
        with pytest.raises(RegistryTimeout, match="did not answer within 0.1s"):
            await asyncio.wait_for(server.start(), 10)
        assert server._listener is None and registration_tasks() == []
        await wait_until(lambda: registry.pending == 0, 10, "the calls given up on to end")
        assert registry.attempts == 1 and registry.updates == []

    run(scenario())


def test_a_stop_during_a_start_the_registry_never_answers_ends_and_retries_nothing(caplog):
    """The stop waits for the start's attempt no longer than the registry's
    ``op_timeout``, then unregisters what it may have stored (an unregister
    the registry never answers either: given up on too, and said)."""
    caplog.set_level(logging.WARNING, "octo_core.registry")

    async def scenario():
        registry = SilentRegistry()
        server = started_while(registry)
        starting = asyncio.ensure_future(server.start())
        await wait_until(lambda: registry.pending == 1, 10, "the start's attempt in flight")
        stopping = asyncio.ensure_future(server.stop())
        await wait_until(lambda: server._leaving, 10, "the stop to begin")
        await asyncio.wait_for(asyncio.gather(starting, stopping), 10)
        assert registration_tasks() == [] and registry.attempts == 1
        assert registry.updates == []   # never marked STOPPING: no attempt answered
        await wait_until(lambda: registry.pending == 0, 10, "the calls given up on to end")

    run(scenario())
    assert "could not unregister" in caplog.text and "did not answer unregister" in caplog.text


class LandingLateRegistry(FlakyRegistry):
    """A registry whose first ``register`` stores the node only once ``release``
    is set, even when the call was given up on meanwhile (the work goes on
    elsewhere: a thread, a server); later attempts fail (``down``)."""

    op_timeout = 0.05

    def __init__(self) -> None:
        super().__init__()
        self.landed = False

    async def register(self, node: Node) -> Node:
        self.attempts += 1
        if self.attempts == 1:
            return await asyncio.shield(self._store_when_released(node))
        raise RegistryError("the registry is down")

    async def _store_when_released(self, node: Node) -> Node:
        await self.release.wait()
        stored = await MemoryRegistry.register(self, node)
        self.landed = True
        return stored


def test_a_registration_given_up_on_that_lands_later_is_taken_back_at_stop():
    async def scenario():
        registry = LandingLateRegistry()
        async with serving_in(registry) as server:
            await wait_until(lambda: registry.attempts >= 2, 10, "a retry after it was given up")
            registry.release.set()
            await wait_until(lambda: registry.landed, 10, "the late registration")
            assert [node.key for node in await registry.list(APPKEY)] == \
                [f"{LOCALHOST}:{server.port}"]
            assert server.registered_node is None   # (its attempt was given up on)
        assert await registry.list(APPKEY) == []
        assert registry.updates == []   # (no one was told it was registered: no STOPPING)

    run(scenario())
