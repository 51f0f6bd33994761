"""Cancellation: a caller that gives up on a call (``task.cancel()``,
``asyncio.timeout``, a TaskGroup sibling failing) gets its ``CancelledError``
at every stage of the call, and what the call held is given back.

The races are set up with done callbacks, not timers: the caller is cancelled
in the very loop pass in which what it waits for comes (before Python 3.12,
``asyncio.wait_for`` then returns what came and drops the cancel).
"""
from __future__ import annotations

import asyncio

import pytest

import octo_core
from octo_core.cluster import invoker
from octo_core.cluster.balancer import make_balancer
from octo_core.cluster.breaker import BreakerState
from octo_core.errors import ClientClosed
from octo_core.registry import Directory
from octo_core.registry.memory import MemoryRegistry
from octo_core.registry.node import Node
from octo_core.transport.client import Endpoint

from wire_helpers import (CLIENT_APPKEY, EchoHandler, Echo, async_client, echo_services, run,
                          serving, wait_until)


def _live_conns(client):
    """The live connections of an AsyncClient (private state, read in this one place)."""
    return [c for ep in client._endpoints.values() for c in ep._conns if c is not None]


def _counting_balancers(monkeypatch):
    """Count the calls every balancer the cluster makes is told of: started, finished."""
    told = {"started": 0, "finished": 0}

    def counted(name, **options):
        balancer = make_balancer(name, **options)
        start, finish = balancer.on_start, balancer.on_finish

        def on_start(node):
            told["started"] += 1
            start(node)

        def on_finish(node, latency, ok):
            told["finished"] += 1
            finish(node, latency, ok)
        balancer.on_start, balancer.on_finish = on_start, on_finish
        return balancer
    monkeypatch.setattr(invoker, "make_balancer", counted)
    return told


@pytest.mark.parametrize("cluster, copies", [("failfast", 1), ("failover", 1), ("hedging", 2),
                                             ("forking", 2)])
def test_a_call_cancelled_while_it_waits_for_its_reply_gives_back_what_it_held(
        cluster, copies, monkeypatch):
    told = _counting_balancers(monkeypatch)
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler)) as one, \
                serving(echo_services(handler)) as two:
            client = octo_core.AsyncClient(
                Echo, hosts=[one.address, two.address], appkey=CLIENT_APPKEY, timeout=10,
                lb="leastrequest", cluster=cluster, idempotent=True, hedge_delay=0.001)
            try:
                call = asyncio.ensure_future(client.block("cancel me"))
                await wait_until(lambda: handler.entered.qsize() == copies)
                call.cancel()
                outcome = (await asyncio.gather(call, return_exceptions=True))[0]
                assert isinstance(outcome, asyncio.CancelledError), \
                    f"the call ended with {outcome!r}"
                handler.release.set()     # the late replies come, and are dropped
                await wait_until(lambda: all(conn.owed == 0 for conn in _live_conns(client)))
                assert told["started"] == told["finished"] == copies
                assert client.metrics.stats()["Echo.block"]["in_flight"] == 0
                assert all(conn.in_flight == 0 for conn in _live_conns(client))
                assert all(breaker.state is BreakerState.CLOSED
                           for breaker in client._cluster._breakers.values())
                assert await client.block("next") == "next"
            finally:
                await client.close()

    run(main())


def test_a_caller_cancelled_as_its_connect_completes_stays_cancelled(monkeypatch):
    # A connect that completes in the loop pass its caller is cancelled in: before
    # Python 3.12, asyncio.wait_for returns that outcome and drops the cancel (the
    # request would go out, an asyncio.timeout around the call never fire), which is
    # why Endpoint._open waits with asyncio.wait.
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler)) as server, \
                async_client(Echo, server.address) as client:
            gate = asyncio.get_running_loop().create_future()
            connect = Endpoint._connect

            async def gated(self, loop):
                await gate
                return await connect(self, loop)
            monkeypatch.setattr(Endpoint, "_connect", gated)
            call = asyncio.ensure_future(client.slow("cancel me", 0))
            await asyncio.sleep(0)          # waiting for the shared connect
            [endpoint] = client._endpoints.values()
            [attempt] = endpoint._connecting.values()
            attempt.add_done_callback(lambda _: call.cancel())
            gate.set_result(None)
            outcome = (await asyncio.gather(call, return_exceptions=True))[0]
            assert isinstance(outcome, asyncio.CancelledError), f"the call ended with {outcome!r}"
            assert handler.slow_started == 0, "the request went out after its caller gave up"
            assert await client.slow("next", 0) == "next"

    run(main())


def test_a_caller_cancelled_as_the_server_reads_again_stays_cancelled():
    # The same race for ClientConnection.drained (see above): a caller cancelled in
    # the loop pass the writes resume must not have its request sent.
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler)) as server, \
                async_client(Echo, server.address) as client:
            assert await client.slow("connect first", 0) == "connect first"
            [conn] = _live_conns(client)
            conn.pause_writing()            # as the transport does past its high-water mark
            call = asyncio.ensure_future(client.slow("cancel me", 0))
            await asyncio.sleep(0)
            [waiter] = conn._drain_waiters
            waiter.add_done_callback(lambda _: call.cancel())
            conn.resume_writing()
            outcome = (await asyncio.gather(call, return_exceptions=True))[0]
            assert isinstance(outcome, asyncio.CancelledError), f"the call ended with {outcome!r}"
            assert handler.slow_started == 1, "the request went out after its caller gave up"
            assert not conn._drain_waiters
            assert await client.slow("next", 0) == "next"

    run(main())


def test_a_call_cancelled_while_the_server_reads_nothing_leaves_no_waiter():
    async def main():
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address) as client:
            assert await client.echo("connect first") == "connect first"
            [conn] = _live_conns(client)
            conn.pause_writing()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.echo("gives up"), 0.01)
            assert not conn._drain_waiters
            conn.resume_writing()
            assert await client.echo("next") == "next"

    run(main())


def test_a_close_given_up_on_in_its_grace_still_closes():
    # A close(grace) cancelled while it waits for the calls in flight (an
    # asyncio.timeout around it) must still close: else the client refuses every
    # call but keeps its connections, and their heartbeats, open for good (its
    # finalizer is already detached by then).
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler)) as server, \
                async_client(Echo, server.address, timeout=10) as client:
            call = asyncio.ensure_future(client.slow("in flight", 10_000))
            await wait_until(lambda: handler.slow_started == 1)
            [conn] = _live_conns(client)
            closing = asyncio.ensure_future(client.close(grace=10))
            await wait_until(lambda: client._closed)
            closing.cancel()
            outcome = (await asyncio.gather(closing, return_exceptions=True))[0]
            assert isinstance(outcome, asyncio.CancelledError), f"close() ended with {outcome!r}"
            assert conn.closed
            assert all(endpoint.closed for endpoint in client._endpoints.values())
            with pytest.raises(ClientClosed):
                await call

    run(main())


APPKEY = "com.example.cancel.server"


class _GatedRegistry(MemoryRegistry):
    """A memory registry whose ``list`` waits for ``gate`` when one is set
    (``waiting`` meanwhile)."""

    gate: "asyncio.Future[None] | None" = None
    waiting = False

    async def list(self, appkey):
        if self.gate is not None:
            self.waiting = True
            await self.gate
        return await super().list(appkey)


def test_a_directory_closed_as_its_refresh_is_answered_stops_refreshing():
    # The refresher stops once closed, not only once cancelled: its fetch waits with
    # asyncio.wait_for, which before Python 3.12 drops a cancel that comes in the
    # loop pass of the registry's answer, and close() would then wait for the
    # refresher for ever (and an AsyncClient's close with it).
    async def main():
        registry = _GatedRegistry()
        await registry.register(Node(appkey=APPKEY, ip="127.0.0.1", port=9001))
        directory = Directory(registry, APPKEY, refresh_interval=0.001)
        await directory.start()
        registry.gate = asyncio.get_running_loop().create_future()
        await wait_until(lambda: registry.waiting)   # a refresh waits for its answer
        closing = []
        registry.gate.add_done_callback(lambda _: asyncio.get_running_loop().call_soon(
            lambda: closing.append(asyncio.ensure_future(directory.close()))))
        registry.gate.set_result(None)
        await wait_until(lambda: closing)
        await asyncio.wait_for(closing[0], 5)
        assert directory._refresher.done()

    run(main())
