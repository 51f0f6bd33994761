"""``AsyncClient`` discovery through a registry that is down when the first calls come.

Concurrent first calls share one discovery attempt; a failed attempt is not kept,
so once the registry answers again the next call discovers the nodes.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from typing import Any, AsyncIterator, List

import pytest

import octo_core
from octo_core.cluster import invoker
from octo_core.cluster.routing import NoRouteError, RouteRule
from octo_core.errors import CallTimeout, ClientClosed, Status, TransportError
from octo_core.protocol import NodeStatus
from octo_core.registry import Node, RegistryError, Watch
from octo_core.registry.base import WatchCallback
from octo_core.registry.memory import MemoryRegistry

from wire_helpers import (Echo, EchoHandler, LOCALHOST, deaf, echo_services,  # noqa: F401
                          fake_server, fresh_throttle, run, serving, wait_until, watchdog)

pytestmark = pytest.mark.usefixtures("watchdog")

APPKEY = "com.example.discovery"


class OutageRegistry(MemoryRegistry):
    """A memory registry that, while ``down``, fails every question and whose
    watches (made meanwhile) say nothing: ZooKeeper out of reach."""

    def __init__(self) -> None:
        super().__init__(f"discovery-{uuid.uuid4().hex}")
        self.down = True
        self.lists = 0                 # list() calls: one per discovery attempt
        self.watches: List[Watch] = []

    async def list(self, appkey: str) -> List[Node]:
        self.lists += 1
        await asyncio.sleep(0)         # let the other first calls join the attempt
        if self.down:
            raise RegistryError("the registry is down")
        return await super().list(appkey)

    async def routes(self, appkey: str) -> List[RouteRule]:
        if self.down:
            raise RegistryError("the registry is down")
        return await super().routes(appkey)

    def watch(self, appkey: str, callback: WatchCallback) -> Watch:
        def unless_down(nodes: List[Node], rules: List[RouteRule]) -> None:
            if not self.down:
                callback(nodes, rules)
        watch = super().watch(appkey, unless_down)
        self.watches.append(watch)
        return watch

    def answer(self) -> None:
        self.down = False


class Leaving:
    """Two servers, and a registry (up) listing the first; ``leave()`` replaces
    it with the second, as a rolling deploy does, and waits until ``client``
    saw it go."""

    def __init__(self, first: octo_core.Server, second: octo_core.Server,
                 registry: OutageRegistry, gone: Node) -> None:
        self.first, self.second, self.registry, self.gone = first, second, registry, gone

    @classmethod
    @contextlib.asynccontextmanager
    async def serving(cls) -> AsyncIterator["Leaving"]:
        async with serving(echo_services()) as first, serving(echo_services()) as second, \
                OutageRegistry() as registry:
            registry.down = False
            gone = await registry.register(Node(APPKEY, LOCALHOST, first.port))
            yield cls(first, second, registry, gone)

    def client(self, **options: Any) -> octo_core.AsyncClient:
        return octo_core.AsyncClient(Echo, appkey="c", registry=self.registry,
                                     remote_appkey=APPKEY, **options)

    async def leave(self, client: octo_core.AsyncClient) -> None:
        await self.registry.register(Node(APPKEY, LOCALHOST, self.second.port))
        await self.registry.unregister(APPKEY, self.gone.key)
        await wait_until(lambda: self.first.address not in client._endpoints)


def test_calls_after_a_registry_outage_discover_the_nodes():
    async def main():
        async with serving(echo_services()) as server, OutageRegistry() as registry:
            await registry.register(Node(APPKEY, LOCALHOST, server.port))
            async with octo_core.AsyncClient(Echo, appkey="c", registry=registry,
                                             remote_appkey=APPKEY) as client:
                first = await asyncio.gather(*(client.echo(f"early {i}") for i in range(3)),
                                             return_exceptions=True)
                assert all(isinstance(outcome, RegistryError) for outcome in first), first
                assert registry.lists == 1, "concurrent first calls share one attempt"
                assert all(watch.cancelled for watch in registry.watches), \
                    "a failed discovery leaves no watch behind"

                registry.down = False
                assert await client.echo("back") == "back"
                assert registry.lists == 2
                assert await client.echo("again") == "again"
                assert registry.lists == 2, "a successful discovery is kept"
    run(main())


def test_first_calls_sharing_a_failed_discovery_each_get_an_error_naming_their_method():
    async def main():
        async with OutageRegistry() as registry:
            async with octo_core.AsyncClient(Echo, appkey="c", registry=registry,
                                             remote_appkey=APPKEY) as client:
                first = await asyncio.gather(client.echo("x"), client.ping(), client.whoami(),
                                             return_exceptions=True)
                assert registry.lists == 1          # one attempt, shared
                assert all(isinstance(outcome, RegistryError) for outcome in first), first
                assert [outcome.method for outcome in first] == ["echo", "ping", "whoami"]
                assert len({id(outcome) for outcome in first}) == 3
                assert all("the registry is down" in str(outcome) for outcome in first)
    run(main())


def test_a_node_that_leaves_is_forgotten_once_its_calls_are_answered():
    """Nodes come and go for years (rolling deploys, new addresses): the client
    keeps connections, breakers and balancers only for the nodes listed, and a
    call already on a node that leaves still gets its answer."""
    async def main():
        async with Leaving.serving() as nodes, nodes.client(heartbeat_interval=0.05) as client:
            assert await client.echo("to the first") == "to the first"
            endpoint = client._endpoints[nodes.first.address]
            (conn,) = [c for c in endpoint._conns if c is not None]
            on_the_way = asyncio.ensure_future(client.slow("still answered", 300))
            await wait_until(lambda: conn.in_flight == 1)

            await nodes.leave(client)
            assert endpoint.closed and not conn.closed       # its call is still running
            assert await on_the_way == "still answered"
            await wait_until(lambda: conn.closed)
            assert endpoint._heartbeat_task.done()
            assert await client.echo("to the second") == "to the second"
            assert list(client._endpoints) == [nodes.second.address]
            assert list(client._cluster._breakers) == [
                Node(APPKEY, LOCALHOST, nodes.second.port).key]
    run(main())


def test_a_server_on_every_interface_registers_an_address_callers_can_dial():
    """``host="0.0.0.0"`` used to register the node as 0.0.0.0:port. (Tests bind
    127.0.0.1 only: the registration is made without listening.)"""
    import socket

    async def main():
        registry = OutageRegistry()
        registry.down = False
        for node_fields, expected in (({}, None), ({"ip": LOCALHOST}, LOCALHOST)):
            server = octo_core.Server(APPKEY, host="0.0.0.0", port=9, registry=registry,
                                      node=node_fields)
            server.add_service(Echo, EchoHandler())
            await server._register()
            (node,) = await registry.list(APPKEY)
            await registry.unregister(APPKEY, node.key)
            assert node.port == 9 and node.ip == (expected or node.ip)
            with socket.socket() as probe:    # an address of this machine: it can be bound
                probe.bind((node.ip, 0))
            assert node.ip != "0.0.0.0"
    run(main())


@pytest.mark.parametrize("passes", [1, 2], ids=["connect not started", "connect under way"])
def test_a_call_waiting_for_a_connect_to_a_node_that_leaves_is_still_sent(passes):
    """A node that leaves the registry still serves while it unregisters: the call
    that waited for a connect to it is sent and answered, then the connection
    closes; nothing is kept for the node."""
    async def main():
        async with Leaving.serving() as nodes, nodes.client() as client:
            await client._discover(5.0, "echo")
            call = asyncio.ensure_future(client.echo("on its way"))
            for _ in range(passes):
                await asyncio.sleep(0)
            endpoint = client._endpoints[nodes.first.address]
            assert endpoint._connecting
            await nodes.leave(client)
            assert await call == "on its way"
            await wait_until(lambda: endpoint.finished)
            assert not client._cluster._degraded
    run(main())


def test_close_reaches_the_calls_on_a_node_that_left():
    """``close()`` fails every call still waiting, those on a retired node too."""
    async def main():
        async with Leaving.serving() as nodes:
            client = nodes.client(timeout=30.0)
            assert await client.echo("first") == "first"
            (conn,) = [c for c in client._endpoints[nodes.first.address]._conns if c is not None]
            call = asyncio.ensure_future(client.slow("never answered", 20_000))
            await wait_until(lambda: conn.in_flight == 1)
            await nodes.leave(client)
            await client.close()
            with pytest.raises(TransportError):
                await asyncio.wait_for(call, 5)
            assert conn.closed
    run(main())


def test_a_node_that_hangs_and_leaves_is_let_go_with_its_heartbeat_unanswered():
    """A node usually leaves because it hangs: the heartbeat it never answers must
    not keep its connection open for ever."""
    async def main():
        async with fake_server(deaf) as hung_address:   # reads every request, answers none
            port = int(hung_address.rsplit(":", 1)[1])
            async with serving(echo_services()) as other, OutageRegistry() as registry:
                registry.down = False
                node = await registry.register(Node(APPKEY, LOCALHOST, port))
                async with octo_core.AsyncClient(Echo, appkey="c", registry=registry,
                                                 remote_appkey=APPKEY, timeout=0.05,
                                                 heartbeat_interval=0.5) as client:
                    with pytest.raises(TransportError):           # a timeout: still connected
                        await client.echo("no answer")
                    # (on a loaded machine the 50 ms may run out before the connect ends;
                    # the connect goes on, and the heartbeat follows once it is made)
                    endpoint = client._endpoints[f"{LOCALHOST}:{port}"]
                    await wait_until(lambda: any(endpoint._conns), what="the connection")
                    (conn,) = [c for c in endpoint._conns if c]
                    await wait_until(lambda: conn.in_flight == 1)  # the heartbeat, waiting
                    await registry.register(Node(APPKEY, LOCALHOST, other.port))
                    await registry.unregister(APPKEY, node.key)
                    await wait_until(lambda: conn.closed)
    run(main())


def test_with_no_route_a_wildcard_server_registers_an_address_it_listens_on(monkeypatch, caplog):
    """No default route (a sandbox): the host name's address, or loopback when the
    name does not resolve; for "::", which listens on IPv6 only, ::1."""
    import socket

    from octo_core import server as server_module

    def no_route(self, address):
        raise OSError("Network is unreachable")

    def unresolvable(name):
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(socket.socket, "connect", no_route)
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "192.0.2.7")
    assert server_module._reachable_ip("0.0.0.0") == "192.0.2.7"
    monkeypatch.setattr(socket, "gethostbyname", unresolvable)
    assert server_module._reachable_ip("0.0.0.0") == "127.0.0.1"
    assert server_module._reachable_ip("::") == "::1"
    assert "no default route" in caplog.text


def test_nodes_that_do_not_serve_the_service_are_not_called():
    """serviceInfo lists what a node hosts (a node hosting only Calc is no Echo
    node), unifiedProto 0 keeps unified clients away, serverType 1 is HTTP."""
    async def main():
        async with serving(echo_services()) as server, OutageRegistry() as registry:
            registry.down = False
            echo = Node(APPKEY, LOCALHOST, server.port, serviceInfo={"Echo": {"unifiedProto": 1}})
            others = [Node(APPKEY, "127.0.0.2", 1, serviceInfo={"Calc": {"unifiedProto": 1}}),
                      Node(APPKEY, "127.0.0.3", 1, serverType=1),
                      Node(APPKEY, "127.0.0.4", 1, serviceInfo={"Echo": {"unifiedProto": 0}})]
            for node in [echo, *others]:
                await registry.register(node)
            # (plain native thrift names no service, the server dispatches by method:
            # any thrift node may do; failover passes over the ports no one listens on)
            for options, reachable in [({}, {echo.key}),
                                       ({"protocol": "thrift", "multiplexed": True,
                                         "cluster": "failover"}, {echo.key, others[2].key}),
                                       ({"protocol": "thrift", "cluster": "failover"},
                                        {echo.key, others[0].key, others[2].key})]:
                async with octo_core.AsyncClient(Echo, appkey="com.example.caller",
                                                 remote_appkey=APPKEY, registry=registry,
                                                 timeout=2, **options) as client:
                    assert await client.echo("x") == "x"
                    assert {n.key for n in client._cluster.router.nodes} == reachable
    run(main())


def test_a_registry_listing_no_node_of_the_callee_says_so_and_names_the_method():
    """It said only "no node is available for this call": neither the method (every
    error names it) nor the appkey looked for, misspelt most often."""
    async def main():
        async with OutageRegistry() as registry:
            registry.down = False
            await registry.register(Node(APPKEY, "127.0.0.2", 1,
                                         serviceInfo={"Calc": {"unifiedProto": 1}}))
            async with octo_core.AsyncClient(Echo, appkey="com.example.caller",
                                             remote_appkey=APPKEY, registry=registry) as client:
                with pytest.raises(NoRouteError) as refused:
                    await client.echo("x")
            assert str(refused.value) == (
                f"no node is available for this call: the registry ({registry!r}) lists "
                f"no node of {APPKEY!r} serving Echo (method echo)")
    run(main())


@pytest.mark.parametrize("url, said", [("memory://team", "memory://team (prod)"),
                                       ("file:///srv/octo?env=test", "file:///srv/octo (test)"),
                                       ("zk://127.0.0.1:1,127.0.0.1:2/octo",
                                        "zk://127.0.0.1:1,127.0.0.1:2/octo (prod)")])
def test_a_registry_says_where_it_is(url, said):
    """In the error of a call that found no node: a misspelt directory or chroot
    lists nothing, and the message should show which one was read."""
    registry = octo_core.registry.open_registry(url)
    try:
        assert repr(registry) == said
    finally:
        run(registry.close())



def test_a_client_refused_for_its_middleware_leaves_no_registry_open():
    """The registry its URL names was opened before the middleware was read, and
    never closed: a ZooKeeper session went on trying to connect, on threads of
    its own, for as long as the process ran."""
    pytest.importorskip("kazoo")
    before = set(threading.enumerate())
    with pytest.raises(TypeError, match="middleware is a list of functions"):
        octo_core.AsyncClient(Echo, appkey="c", registry="zk://127.0.0.1:1/octo",
                              remote_appkey=APPKEY, middleware=[5])
    assert set(threading.enumerate()) - before == set()


@pytest.mark.parametrize("listed, why", [
    ([dict(status=NodeStatus.DEAD), dict(status=NodeStatus.DEAD), dict(status=NodeStatus.STOPPED)],
     "the registry lists 3 node(s) of {appkey!r} serving Echo, none ALIVE (2 DEAD, 1 STOPPED)"),
    ([dict(weight=0), dict(weight=0)],
     "the registry lists 2 ALIVE node(s) of {appkey!r} serving Echo, every one of weight 0"),
], ids=["none alive", "all of weight 0"])
def test_a_registry_listing_no_node_that_can_serve_says_why(listed, why):
    """With the nodes the scanner marked DEAD, or an operator took out of rotation
    (weight 0), the call said only "no node is available for this call (method
    echo)": nothing to tell it from a router or breaker refusal."""
    async def main():
        async with OutageRegistry() as registry:
            registry.down = False
            for i, fields in enumerate(listed):
                await registry.register(Node(APPKEY, f"127.0.0.{i + 2}", 1, **fields))
            async with octo_core.AsyncClient(Echo, appkey="com.example.caller",
                                             remote_appkey=APPKEY, registry=registry) as client:
                with pytest.raises(NoRouteError) as refused:
                    await client.echo("x")
        assert str(refused.value) == (
            f"no node is available for this call: {why.format(appkey=APPKEY)} (method echo)")
    run(main())


class SilentRegistry(OutageRegistry):
    """A registry that, while ``down``, answers no question at all (a ZooKeeper
    out of reach whose client waits for its session) rather than failing them."""

    def __init__(self) -> None:
        super().__init__()
        self.back = asyncio.Event()

    async def list(self, appkey: str) -> List[Node]:
        await self.back.wait()
        return await super().list(appkey)

    async def routes(self, appkey: str) -> List[RouteRule]:
        await self.back.wait()
        return await super().routes(appkey)

    def answer(self) -> None:
        self.down = False
        self.back.set()


def test_a_first_call_waits_for_discovery_no_longer_than_its_own_timeout():
    """A silent registry held a first call for the directory's own registry
    timeout (5 s), past the call's 0.2 s. With no snapshot to start from, it
    fails at its own deadline with a CallTimeout whose request never left;
    discovery goes on, and a call made once the registry answers goes through."""
    async def main():
        async with serving(echo_services()) as server, SilentRegistry() as registry:
            await registry.register(Node(APPKEY, LOCALHOST, server.port,
                                         serviceInfo={"Echo": {"unifiedProto": 1}}))
            async with octo_core.AsyncClient(Echo, appkey="com.example.caller",
                                             remote_appkey=APPKEY, registry=registry,
                                             timeout=0.2) as client:
                with pytest.raises(CallTimeout) as waited:
                    await client.echo("first")
                assert waited.value.request_sent is False and waited.value.method == "echo"
                assert "no node list" in str(waited.value)
                registry.answer()
                assert await client.call("echo", "after", timeout=5) == "after"
                # the caller saw one failed call, and the client's metrics say so
                row = client.metrics.stats()["Echo.echo"]
                assert row["calls"] == 2 and row["errors"] == {Status.TRANSPORT_EXCEPTION: 1}
    run(main())


@pytest.mark.parametrize("outage", [SilentRegistry, OutageRegistry])
def test_a_failsafe_call_with_no_node_list_returns_none(outage, caplog, monkeypatch):
    """failsafe gives None when there is no node to call, and a registry that
    cannot say which nodes there are (silent, or failing: ZooKeeper away as the
    client starts, with no snapshot) leaves none: such first calls raised
    CallTimeout or RegistryError. Once the registry answers, calls go through."""
    fresh_throttle(monkeypatch, "_FAILSAFE", invoker)   # (logged, whatever came before)

    async def main():
        async with serving(echo_services()) as server, outage() as registry:
            await registry.register(Node(APPKEY, LOCALHOST, server.port))
            async with octo_core.AsyncClient(Echo, appkey="com.example.caller",
                                             remote_appkey=APPKEY, registry=registry,
                                             cluster="failsafe", timeout=0.2) as client:
                with caplog.at_level(logging.WARNING, logger="octo_core.cluster"):
                    assert await client.echo("first") is None
                assert any("failsafe call found no node" in record.getMessage()
                           for record in caplog.records)
                registry.answer()
                assert await client.call("echo", "after", timeout=5) == "after"
    run(main())


def test_a_first_call_starts_from_the_snapshot_within_its_own_timeout(tmp_path):
    """With a snapshot, a first call gives the silent registry half its time, then
    starts from the snapshot and is answered; the registry's answer, when it
    comes, replaces the snapshot's nodes."""
    from octo_core.registry.directory import _write_snapshot

    async def main():
        async with serving(echo_services()) as server, serving(echo_services()) as newer, \
                SilentRegistry() as registry:
            saved = Node(APPKEY, LOCALHOST, server.port, serviceInfo={"Echo": {"unifiedProto": 1}})
            snapshot = str(tmp_path / "snapshot.json")
            _write_snapshot(snapshot, APPKEY, [saved], [])
            listed = Node(APPKEY, LOCALHOST, newer.port, serviceInfo={"Echo": {"unifiedProto": 1}})
            await registry.register(listed)
            async with octo_core.AsyncClient(Echo, appkey="com.example.caller",
                                             remote_appkey=APPKEY, registry=registry,
                                             snapshot_path=snapshot, timeout=1.0) as client:
                assert await client.echo("from the snapshot") == "from the snapshot"
                assert {n.key for n in client._cluster.router.nodes} == {saved.key}
                registry.answer()
                await wait_until(lambda: {n.key for n in client._cluster.router.nodes}
                                 == {listed.key}, 10, "the registry's nodes")
                assert await client.echo("from the registry") == "from the registry"
    run(main())


def test_a_first_call_waiting_for_the_registry_fails_as_closed_when_the_client_closes():
    """close() while a first call waits for a silent registry: the call fails at
    once with ClientClosed (its request never left), as every call a closing
    client cuts short; it waited out its timeout and raised CallTimeout ("discovery
    goes on", for a client that was closed)."""
    async def main():
        async with SilentRegistry() as registry:
            client = octo_core.AsyncClient(Echo, appkey="com.example.caller",
                                           remote_appkey=APPKEY, registry=registry, timeout=60)
            call = asyncio.ensure_future(client.echo("first"))
            await wait_until(lambda: client._discovery is not None, 10, "discovery")
            await client.close()
            with pytest.raises(ClientClosed) as closed:
                await asyncio.wait_for(call, 10)   # (a bound for the test: the call has 60 s)
            assert closed.value.request_sent is False and closed.value.method == "echo"
    run(main())


def test_a_first_call_gets_the_registrys_error_when_discovery_fails_as_its_half_ends():
    """The discovery attempt failing just as the call's half of its timeout ran
    out (both due in one turn of the loop): the call read self._discovery again,
    which the failure had just reset to None, and raised TypeError from
    asyncio.shield. It gets the registry's error."""
    async def main():
        client = octo_core.AsyncClient(Echo, appkey="com.example.caller", remote_appkey=APPKEY,
                                       registry=OutageRegistry(), timeout=0.2)

        async def failing_start() -> None:
            await asyncio.sleep(0.1005)   # just after the call's half
            raise RegistryError("the registry is down")

        async def hold_the_loop() -> None:
            await asyncio.sleep(0.08)
            time.sleep(0.05)              # both come due in one turn of the loop

        client._directory.start = failing_start
        holding = asyncio.ensure_future(hold_the_loop())
        try:
            with pytest.raises(RegistryError):
                await client.echo("first")
        finally:
            await holding
            await client.close()
    run(main())


def test_first_calls_waiting_for_the_registry_go_once_another_starts_from_the_snapshot(tmp_path):
    """Two first calls with a silent registry: the one with 1 s starts from the
    snapshot at its half; the one with 60 s, made before it, waited for its own
    half (30 s), while a call made after the snapshot went at once. Nodes known,
    every waiting first call goes."""
    from octo_core.registry.directory import _write_snapshot

    async def main():
        async with serving(echo_services()) as server, SilentRegistry() as registry:
            saved = Node(APPKEY, LOCALHOST, server.port, serviceInfo={"Echo": {"unifiedProto": 1}})
            snapshot = str(tmp_path / "snapshot.json")
            _write_snapshot(snapshot, APPKEY, [saved], [])
            async with octo_core.AsyncClient(Echo, appkey="com.example.caller",
                                             remote_appkey=APPKEY, registry=registry,
                                             snapshot_path=snapshot, timeout=60) as client:
                client._directory.timeout = 60   # (the registry's own time is not what ends it)
                patient = asyncio.ensure_future(client.call("echo", "patient", timeout=60))
                assert await client.call("echo", "hurried", timeout=1.0) == "hurried"
                await wait_until(patient.done, 10, "the patient call's answer")
                assert patient.result() == "patient"
    run(main())
