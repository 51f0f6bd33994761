"""Overload protection and transport security of the server.

``max_connections`` closes the extra connection only; ``max_in_flight`` and
``max_in_flight_per_connection`` refuse with status 3 and recover; per-caller
``quotas`` refuse a burst with status 6 and recover as the bucket refills; a
stalled partial frame is cut after ``read_timeout`` and an idle connection after
``idle_timeout``; TLS and mutual TLS with certificates made at test time.

Nothing asserts a duration: every wait is a bounded poll.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import re
import ssl
import time
from typing import Any, Awaitable, Callable, Dict, Iterator, List

import pytest
from thriftpy2.thrift import TApplicationException

import octo_core

from octo_core import protocol, server as server_module
from octo_core.cluster.breaker import BreakerState
from octo_core.protocol import NodeStatus
from octo_core.auth import Authenticator, StaticTokens
from octo_core.transport import server as server_conn
from octo_core.transport.loop import new_event_loop
from octo_core.errors import (ApplicationError, CallTimeout, DegradeError, OctoError, RpcError,
                              Status, TransportError)

from cluster_helpers import FakeClock, FakeTime
from wire_helpers import (CLIENT_APPKEY, EVERYTHING, LOCALHOST, SERVER_APPKEY, Echo, EchoHandler,
                          EverythingStubs, async_client, decode_body, echo_services, framed_request,
                          fresh_throttle, raw_connection, run, serving, thriftpy2_client,
                          unified_request, wait_until, watchdog)  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("watchdog")

# Status 3 refusals count against a node in the client's circuit breaker; these
# tests look at the server's refusals themselves, so the breaker stays out of it.
NO_BREAKER = {"consecutive_failures": 10 ** 9, "min_calls": 10 ** 9}


def echo_client(address: str, **options):
    options.setdefault("breaker", NO_BREAKER)
    return async_client(Echo, address, **options)


class GatedHandler(EchoHandler):
    """``slow`` (a coroutine handler) waits at a gate the test opens."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.running = 0

    async def slow(self, text: str, delay_ms: int) -> str:
        self.slow_started += 1
        self.running += 1
        try:
            await asyncio.wait_for(self.gate.wait(), 10)
        finally:
            self.running -= 1
        self.slow_finished += 1
        return text


def good_request(seq: int, text: str = "ok") -> bytes:
    return unified_request("echo", Echo.echo_args(text=text), seq)


async def echo_on(raw, seq: int, text: str = "ok") -> str:
    await raw.send(good_request(seq, text))
    return decode_body(await raw.read_frame(), Echo)[3].success


async def settle(tasks: List[asyncio.Future], refused: int, timeout: float = 5.0) -> List[BaseException]:
    """Wait until ``refused`` of ``tasks`` have finished; return their exceptions."""
    await wait_until(lambda: sum(t.done() for t in tasks) >= refused, timeout,
                     what=f"{refused} refusals")
    return [t.exception() for t in tasks if t.done()]


# --- max_connections ---------------------------------------------------------------

@pytest.fixture
def no_eviction(monkeypatch):
    """No connection is quiet long enough to give its place to a newcomer."""
    monkeypatch.setattr(server_module, "EVICTABLE_AFTER", 3600.0)


@pytest.fixture
def eviction_at_once(monkeypatch):
    """Any quiet connection may give its place to a newcomer."""
    monkeypatch.setattr(server_module, "EVICTABLE_AFTER", 0.0)


@pytest.mark.usefixtures("no_eviction")
def test_max_connections_closes_the_extra_connection_only():
    async def main():
        async with serving(echo_services(), max_connections=2) as server, \
                echo_client(server.address) as first, \
                echo_client(server.address) as second:
            assert await first.echo("1") == "1"
            assert await second.echo("2") == "2"
            async with raw_connection(server.address) as extra:
                await extra.send(good_request(1))
                assert await extra.closed_by_peer()
            # a third client cannot get in either
            async with echo_client(server.address, timeout=0.5) as third:
                with pytest.raises(TransportError):
                    await third.echo("3")
            # the two admitted connections never noticed
            for i in range(20):
                assert await first.echo(f"a{i}") == f"a{i}"
                assert await second.echo(f"b{i}") == f"b{i}"
            assert len(server._connections) == 2
            # one leaves: a newcomer is welcome again
            await second.close()
            await wait_until(lambda: len(server._connections) == 1, what="the slot to free up")
            async with raw_connection(server.address) as newcomer:
                assert await echo_on(newcomer, 1, "back") == "back"
            assert await first.echo("still") == "still"

    run(main())


@pytest.mark.usefixtures("eviction_at_once")
def test_at_max_connections_a_newcomer_takes_the_place_of_the_idlest_connection():
    """Idle sockets (a peer's pile of them) would keep every newcomer out until
    ``idle_timeout``: at the cap, the connection quiet longest lets a newcomer
    in, its peer told first; one with a call running never does."""
    handler = GatedHandler()

    async def main():
        async with serving(echo_services(handler), max_connections=1) as server, \
                raw_connection(server.address) as busy:
            await busy.send(unified_request("slow", Echo.slow_args(text="held", delay_ms=0), 1))
            await wait_until(lambda: handler.running == 1, what="the call")
            async with raw_connection(server.address) as refused:   # a call runs: no room
                assert await refused.closed_by_peer()
            handler.gate.set()
            assert decode_body(await busy.read_frame(), Echo)[3].success == "held"
            async with raw_connection(server.address) as newcomer:  # quiet now: room
                assert await echo_on(newcomer, 1, "in") == "in"
                notice = await busy.read_frame()                    # told, then closed
                assert notice.head.sequence_id == protocol.CLOSE_NOTICE_SEQUENCE
                assert await busy.closed_by_peer()
                assert len(server._connections) == 1

    run(main())


@pytest.mark.usefixtures("eviction_at_once")
def test_at_max_connections_a_connection_still_taking_its_reply_keeps_its_place():
    """A peer reading a big reply slowly sends nothing meanwhile, and runs no call:
    it is not idle while the reply goes out, so a newcomer is refused rather
    than take its place (the close would cut the reply short at CLOSE_LINGER)."""
    size = 8 * 1024 * 1024

    async def main():
        async with serving(echo_services(), max_connections=1) as server, \
                raw_connection(server.address) as slow:
            await slow.send(unified_request("echo", Echo.echo_args(text="z" * size), 1))
            [conn] = server._connections
            await wait_until(lambda: not conn.in_flight and conn.replies_unread(),
                             what="the reply to be on its way, unread")
            async with raw_connection(server.address) as newcomer:
                assert await newcomer.closed_by_peer()
            frame = await slow.read_frame(timeout=10)
            assert decode_body(frame, Echo)[3].success == "z" * size

    run(main())


@pytest.mark.usefixtures("no_eviction")
def test_client_refused_by_max_connections_fails_fast_not_by_timeout():
    # The server closes the extra connection at once. A call on it must fail with a
    # TransportError saying so, not sit out its whole timeout as a CallTimeout
    # (the client must not wait for a reply on a connection it knows is closed).
    async def main():
        async with serving(echo_services(), max_connections=1) as server, \
                echo_client(server.address) as first:
            assert await first.echo("in") == "in"
            async with echo_client(server.address, timeout=3.0) as extra:
                for _ in range(2):
                    with pytest.raises(TransportError) as info:
                        await extra.echo("x")
                    assert not isinstance(info.value, CallTimeout), repr(info.value)
                    await asyncio.sleep(0.3)      # past the reconnect backoff
            assert await first.echo("still") == "still"

    run(main())


def test_max_connections_defaults_to_below_the_open_file_limit(monkeypatch):
    # Without a cap, peers holding connections run the process out of descriptors:
    # then it cannot even accept a connection to refuse it. A soft limit of 32
    # (too small to leave 128 descriptors spare) gives half of it to connections.
    import resource
    monkeypatch.setattr(resource, "getrlimit", lambda which: (32, 4096))

    async def main():
        async with serving(echo_services()) as server, contextlib.AsyncExitStack() as stack:
            held = [await stack.enter_async_context(raw_connection(server.address))
                    for _ in range(16)]
            for seq, raw in enumerate(held):
                assert await echo_on(raw, seq) == "ok"
            async with raw_connection(server.address) as extra:
                await extra.send(good_request(99))
                assert await extra.closed_by_peer()
            assert await echo_on(held[0], 100) == "ok"

    run(main())


def test_max_connections_leaves_room_for_what_asyncio_accepts_before_it_refuses(monkeypatch):
    # asyncio's own loop keeps up to four listen backlogs (400) of accepted sockets
    # open before a refused one closes: with 128 spare, a peer redialling past the
    # cap ran a process at 1024 open files out of them (accept failed with EMFILE,
    # over and over, each logged with its traceback). uvloop closes them at once.
    import resource
    monkeypatch.setattr(resource, "getrlimit", lambda which: (2048, 4096))
    stdlib, uv = asyncio.new_event_loop(), new_event_loop()
    try:
        assert isinstance(stdlib, asyncio.selector_events.BaseSelectorEventLoop)
        assert server_conn.fd_connections(stdlib) == 2048 - 128 - 400
        assert server_conn.fd_connections(uv) == 2048 - 2048 // 8
    finally:
        stdlib.close()
        uv.close()


@pytest.mark.usefixtures("no_eviction")
def test_refused_connections_are_logged_a_line_at_a_time_with_a_count(caplog, monkeypatch):
    # A peer redialling in a loop is refused every time: one warning per refusal
    # would let it fill the log at will. One is logged; the next counts the rest.
    period_over = fresh_throttle(monkeypatch, "_REFUSED", server_conn)
    caplog.set_level(logging.WARNING, logger="octo_core")

    def refusals() -> List[str]:
        return [r.getMessage() for r in caplog.records if "refusing connection" in r.getMessage()]

    async def refused(address: str) -> None:
        async with raw_connection(address) as extra:
            assert await extra.closed_by_peer()

    async def main():
        async with serving(echo_services(), max_connections=1) as server, \
                echo_client(server.address) as first:
            assert await first.echo("in") == "in"
            for _ in range(5):
                await refused(server.address)
            assert len(refusals()) == 1
            period_over()
            await refused(server.address)
            assert await first.echo("still") == "still"

    run(main())
    assert len(refusals()) == 2
    assert refusals()[1].endswith("(and 4 more since the last such message)")


def test_denied_peers_are_logged_a_line_at_a_time_with_a_count(caplog, monkeypatch):
    # A peer on the deny list redialling in a loop must not fill the log either.
    period_over = fresh_throttle(monkeypatch, "_DENIED", server_conn)
    caplog.set_level(logging.INFO, logger="octo_core")

    def refusals() -> List[str]:
        return [r.getMessage() for r in caplog.records if "refusing connection" in r.getMessage()]

    async def main():
        auth = Authenticator(StaticTokens({}), deny=["127.0.0.0/8"])
        async with serving(echo_services(), auth=auth) as server:
            for _ in range(5):
                async with raw_connection(server.address) as denied:
                    assert await denied.closed_by_peer()
            assert len(refusals()) == 1 and "deny" in refusals()[0]
            period_over()
            async with raw_connection(server.address) as denied:
                assert await denied.closed_by_peer()

    run(main())
    assert len(refusals()) == 2
    assert refusals()[1].endswith("(and 4 more since the last such message)")
    assert {r.levelno for r in caplog.records if "refusing connection" in r.getMessage()} \
        == {logging.INFO}


# --- in-flight limits --------------------------------------------------------------

def test_max_in_flight_refuses_with_status_3_and_recovers():
    handler = GatedHandler()

    async def main():
        async with serving(echo_services(handler), max_in_flight=5) as server, \
                echo_client(server.address, timeout=8) as a, \
                echo_client(server.address, timeout=8) as b:
            burst = [asyncio.ensure_future((a if i % 2 else b).slow(f"s{i}", 0))
                     for i in range(20)]
            errors = await settle(burst, 15)
            assert len(errors) == 15
            for error in errors:
                assert isinstance(error, RpcError), repr(error)
                assert error.status == Status.RPC_EXCEPTION == 3
                assert "overloaded" in str(error)
            assert handler.running == 5
            # full: even a fast call is refused while five are running
            with pytest.raises(RpcError):
                await a.echo("refused")
            handler.gate.set()
            await asyncio.wait(burst, timeout=5)
            done = [t.result() for t in burst if t.exception() is None]
            assert len(done) == 5
            # capacity is back
            handler.gate = asyncio.Event()
            handler.gate.set()
            results = await asyncio.gather(*(a.slow(f"r{i}", 0) for i in range(5)))
            assert results == [f"r{i}" for i in range(5)]
            assert await b.echo("ok") == "ok"
            stats = server.stats()
            assert stats["Echo.slow"]["errors"] == {Status.RPC_EXCEPTION: 15}
            assert stats["Echo.slow"]["in_flight"] == 0
            assert server._in_flight == 0

    run(main())


def test_refusals_under_overload_do_not_pull_the_latency_percentiles_down():
    """Overloaded, the server refuses most calls at once: they are calls, refusals
    and errors (status 3), but p50 and p99 stay those of the calls that ran (with
    the refusals counted at 0 s they fell, just when an operator reads them)."""
    handler = GatedHandler()

    async def main():
        async with serving(echo_services(handler), max_in_flight=2) as server, \
                echo_client(server.address, timeout=8) as client:
            running = [asyncio.ensure_future(client.slow(f"s{i}", 0)) for i in range(2)]
            await wait_until(lambda: handler.running == 2, what="two calls running")
            for _ in range(20):
                with pytest.raises(RpcError, match="overloaded"):
                    await client.slow("refused", 0)
            await asyncio.sleep(0.05)       # the two running calls take 50 ms at least
            handler.gate.set()
            assert await asyncio.gather(*running) == ["s0", "s1"]
            row = server.stats()["Echo.slow"]
            assert row["calls"] == 22 and row["refused"] == 20 and row["in_flight"] == 0
            assert row["errors"] == {Status.RPC_EXCEPTION: 20}
            assert row["p50"] >= 0.05 and row["p99"] >= 0.05

    run(main())


def test_a_handler_that_ran_never_says_loadshedding_so_failover_does_not_repeat_it():
    """LOADSHEDDING (type 11) on native thrift says the call did not run, and
    failover repeats any method so told. A handler that raises it has run (a
    proxy relaying its backend's, say): it goes out as INTERNAL_ERROR, with its
    message, and a method that is not idempotent runs once."""
    class Relaying(EchoHandler):
        def __init__(self) -> None:
            super().__init__()
            self.ran = 0

        async def echo(self, text: str) -> str:
            self.ran += 1
            raise TApplicationException(protocol.LOADSHEDDING, "the backend shed it")
    first, second = Relaying(), Relaying()

    async def main():
        async with serving(echo_services(first)) as one, serving(echo_services(second)) as two, \
                octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, timeout=8, protocol="thrift",
                                      cluster="failover", lb="roundrobin", breaker=NO_BREAKER,
                                      hosts=[one.address, two.address]) as client:
            with pytest.raises(ApplicationError, match="the backend shed it") as failed:
                await client.echo("once")
            assert failed.value.type == TApplicationException.INTERNAL_ERROR
            assert first.ran + second.ran == 1
    run(main())


def test_a_native_thrift_refusal_says_the_call_did_not_run_so_failover_takes_it_elsewhere():
    """Native thrift has no status: a call the server refused without running it
    (here: max_in_flight) is a TApplicationException of type LOADSHEDDING
    (fbthrift's), which octo_core's client reads as RpcError, status 3, as on the
    unified protocol: failover tries another node even for a method that is not
    idempotent. (Read as the handler's own error, it was tried nowhere else.) A
    plain thriftpy2 client gets the type and the reason."""
    full, spare = GatedHandler(), EchoHandler()

    async def main():
        async with serving(echo_services(full), max_in_flight=1) as busy, \
                serving(echo_services(spare)) as free, \
                echo_client(busy.address, timeout=8, protocol="thrift") as holder, \
                echo_client(busy.address, timeout=8, protocol="thrift") as alone, \
                octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, timeout=8, protocol="thrift",
                                      cluster="failover", lb="roundrobin", breaker=NO_BREAKER,
                                      hosts=[busy.address, free.address]) as both:
            held = asyncio.ensure_future(holder.slow("holds the only slot", 0))
            await wait_until(lambda: full.running == 1, what="the slot taken")
            with pytest.raises(RpcError, match="overloaded") as refused:
                await alone.echo("refused")
            assert refused.value.status == Status.RPC_EXCEPTION
            answers = [await both.echo(f"call {i}") for i in range(6)]
            assert answers == [f"call {i}" for i in range(6)]
            assert busy.stats()["Echo.echo"]["refused"] >= 3   # tried there first, then elsewhere

            loop = asyncio.get_running_loop()

            def plain_call() -> Exception:
                with thriftpy2_client(Echo, LOCALHOST, busy.port) as client:
                    with pytest.raises(TApplicationException) as info:
                        client.echo("refused")
                    return info.value
            plain = await loop.run_in_executor(None, plain_call)
            assert plain.type == protocol.LOADSHEDDING == 11 and "overloaded" in plain.message
            full.gate.set()
            assert await held == "holds the only slot"

    run(main())


def test_max_in_flight_bytes_bounds_the_requests_all_connections_hold_together():
    """Each connection under its own flow control, but many of them: the server
    refuses (status 3) what would take the request bytes it holds past the limit,
    runs a call of any size when nothing else runs, and recovers."""
    handler = GatedHandler()
    big = "x" * 40_000

    async def main():
        async with serving(echo_services(handler), max_in_flight_bytes=100_000) as server, \
                echo_client(server.address, timeout=8) as a, \
                echo_client(server.address, timeout=8) as b:
            first = [asyncio.ensure_future(c.slow(big, 0)) for c in (a, b)]
            await wait_until(lambda: handler.running == 2, what="two big calls running")
            with pytest.raises(RpcError, match="bytes of requests in flight") as refused:
                await a.slow(big, 0)
            assert refused.value.status == Status.RPC_EXCEPTION
            assert await b.echo("small") == "small"        # small ones still fit
            handler.gate.set()
            assert await asyncio.gather(*first) == [big, big]
            assert server._dispatcher._in_flight_bytes == 0
            lone = "y" * 150_000                           # over the limit, but alone
            assert await a.slow(lone, 0) == lone

    run(main())
    with pytest.raises(ValueError, match="max_in_flight_bytes"):
        octo_core.Server("com.example.limits", max_in_flight_bytes=0)
    assert octo_core.Server("com.example.limits", max_in_flight_bytes=None).max_in_flight_bytes \
        is None   # no limit


def test_max_in_flight_bytes_charges_each_call_what_it_costs_the_server_whatever_its_request():
    """A tiny request costs the server about 2 KB while its call runs (its record,
    task, coroutine, header), twenty times its bytes: charged only those, 8 MB of
    calls held 230 MB under a limit that counted 10. Each call is charged
    ``CALL_BYTES`` on top, so the limit bounds what calls hold."""
    handler = GatedHandler()
    count, fits = 200, 50

    async def main():
        async with serving(echo_services(handler),
                           max_in_flight_bytes=fits * server_module.CALL_BYTES) as server, \
                raw_connection(server.address) as raw:
            raw.writer.write(b"".join(unified_request("slow", Echo.slow_args(text="", delay_ms=0),
                                                      seq) for seq in range(count)))
            refused = await raw.read_frames(count - fits, timeout=10)   # before any answer
            assert all(f.head.status == Status.RPC_EXCEPTION for f in refused)
            assert "bytes of requests in flight" in refused[0].head.message
            running = handler.running
            assert 0 < running < fits
            handler.gate.set()
            rest = await raw.read_frames(fits, timeout=10)
            assert sum(f.head.status == 0 for f in rest) == running
            assert server._dispatcher._in_flight_bytes == 0

    run(main())


def test_max_in_flight_per_connection_limits_each_connection_alone():
    handler = GatedHandler()

    async def main():
        async with serving(echo_services(handler), max_in_flight_per_connection=3) as server, \
                echo_client(server.address, timeout=8) as a, \
                echo_client(server.address, timeout=8) as b:
            burst_a = [asyncio.ensure_future(a.slow(f"a{i}", 0)) for i in range(10)]
            errors = await settle(burst_a, 7)
            assert len(errors) == 7
            assert all(isinstance(e, RpcError) and e.status == 3 for e in errors), errors
            assert handler.running == 3
            # another connection has its own allowance
            burst_b = [asyncio.ensure_future(b.slow(f"b{i}", 0)) for i in range(4)]
            errors_b = await settle(burst_b, 1)
            assert len(errors_b) == 1 and isinstance(errors_b[0], RpcError)
            await wait_until(lambda: handler.running == 6, what="six calls running")
            handler.gate.set()
            await asyncio.wait(burst_a + burst_b, timeout=5)
            assert sum(t.exception() is None for t in burst_a) == 3
            assert sum(t.exception() is None for t in burst_b) == 3
            # recovered: three at a time go through again on the same connection
            results = await asyncio.gather(*(a.slow(f"again{i}", 0) for i in range(3)))
            assert results == [f"again{i}" for i in range(3)]
            assert server.stats()["Echo.slow"]["errors"] == {Status.RPC_EXCEPTION: 8}

    run(main())


# --- quotas --------------------------------------------------------------------------

async def admitted_within(call: Callable[[], Awaitable[Any]], seconds: float, every: float,
                          why: str) -> Any:
    """What ``call`` answers once a quota admits it, tried ``every`` seconds; the
    test fails with ``why`` if none is admitted within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await call()
        except DegradeError:
            assert time.monotonic() < deadline, why
            await asyncio.sleep(every)


def test_quota_refuses_a_burst_with_status_6_and_recovers():
    async def main():
        quotas = {CLIENT_APPKEY: 5, "*": 1000}
        async with serving(echo_services(), quotas=quotas) as server, \
                echo_client(server.address) as limited, \
                echo_client(server.address, appkey="com.example.other") as other:
            results = await asyncio.gather(*(limited.echo(f"q{i}") for i in range(30)),
                                           return_exceptions=True)
            passed = [r for r in results if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, BaseException)]
            assert 5 <= len(passed) < 30, results
            assert refused, "a burst six times the rate was never refused"
            for error in refused:
                assert isinstance(error, DegradeError), repr(error)
                assert error.status == Status.DEGRADE_EXCEPTION == 6
                assert CLIENT_APPKEY in str(error)
            # another caller has its own bucket
            others = await asyncio.gather(*(other.echo(f"o{i}") for i in range(30)))
            assert len(others) == 30
            # the bucket refills: a call gets through again
            assert await admitted_within(lambda: limited.echo("again"), 5, 0.1,
                                         "the quota never recovered") == "again"
            errors = server.stats()["Echo.echo"]["errors"]
            assert errors[Status.DEGRADE_EXCEPTION] >= len(refused)

    run(main())


def test_wildcard_quota_gives_each_caller_its_own_bucket():
    async def main():
        async with serving(echo_services(), quotas={"*": 3}) as server:
            outcomes: Dict[str, List[bool]] = {}
            for appkey in ("com.example.a", "com.example.b"):
                async with echo_client(server.address, appkey=appkey) as client:
                    results = await asyncio.gather(*(client.echo("x") for _ in range(10)),
                                                   return_exceptions=True)
                    outcomes[appkey] = [not isinstance(r, BaseException) for r in results]
                    assert all(isinstance(r, DegradeError) for r in results
                               if isinstance(r, BaseException))
            for appkey, passed in outcomes.items():
                assert 3 <= sum(passed) < 10, (appkey, passed)

    run(main())


def test_quota_below_one_call_per_second_still_admits_calls():
    # 0.5 calls per second means one call every two seconds, not none at all
    async def main():
        async with serving(echo_services(), quotas={"*": 0.5}) as server, \
                echo_client(server.address) as client:
            assert await admitted_within(lambda: client.echo("slowly"), 3.5, 0.25,
                                         "a 0.5 qps quota never admits a call") == "slowly"

    run(main())


def test_quota_applies_to_native_thrift_callers_as_anonymous():
    async def main():
        async with serving(echo_services(), quotas={"": 2}) as server, \
                echo_client(server.address, protocol="thrift") as native, \
                echo_client(server.address) as unified:
            results = await asyncio.gather(*(native.echo("n") for _ in range(10)),
                                           return_exceptions=True)
            passed = sum(not isinstance(r, BaseException) for r in results)
            assert 2 <= passed < 10
            assert all(isinstance(r, OctoError) for r in results if isinstance(r, BaseException))
            # a named caller is not covered by the "" quota
            assert len(await asyncio.gather(*(unified.echo("u") for _ in range(10)))) == 10

    run(main())


def test_a_native_quota_refusal_does_not_open_the_callers_breaker():
    """A quota refusal proves the node up (it serves others): on native thrift too it
    never counts against the node in the caller's breaker, as status 6 does not on
    the unified protocol. (Overload refusals, LOADSHEDDING, do count.)"""
    async def main():
        async with serving(echo_services(), quotas={"": 1}) as server, \
                async_client(Echo, server.address, protocol="thrift",
                             breaker=dict(consecutive_failures=2)) as native:
            results = await asyncio.gather(*(native.echo("n") for _ in range(10)),
                                           return_exceptions=True)
            refused = [r for r in results if isinstance(r, BaseException)]
            assert len(refused) >= 5 and all("quota" in str(r) for r in refused), refused
            (node,) = native._cluster.router.nodes
            assert native._cluster.breaker(node).state is BreakerState.CLOSED

    run(main())


# --- a peer that does not read its replies --------------------------------------------

def test_a_peer_that_never_reads_its_replies_is_not_read_either():
    """Replies the peer does not read would pile up in the server's memory without
    bound; once the connection's write buffer is full the server stops reading
    that peer's requests, and serves them all once the peer reads again."""
    count = 20_000        # 20 MB of requests: more than the kernel's socket buffers hold

    class ImmediateEcho(EchoHandler):
        """Answers inside the read that brought the request (an eager coroutine)."""
        async def slow(self, text: str, delay_ms: int) -> str:
            self.slow_started += 1
            return text

    handler = ImmediateEcho()

    async def main():
        async with serving(echo_services(handler)) as server, \
                raw_connection(server.address) as raw:
            requests = b"".join(unified_request("slow", Echo.slow_args(text="x" * 1000, delay_ms=0),
                                                seq) for seq in range(count))
            raw.writer.write(requests)                  # and read nothing
            [conn] = server._connections
            await wait_until(lambda: not conn.transport.is_reading(), timeout=10)
            assert conn.transport.get_write_buffer_size() < 1 << 20
            assert handler.slow_started < count        # the rest waits in the socket
            frames = await raw.read_frames(count, timeout=60)
            assert sorted(f.head.sequence_id for f in frames) == list(range(count))
            assert handler.slow_started == count

    run(main())


def test_small_requests_for_big_replies_read_at_once_stop_at_the_full_write_buffer():
    """Requests read in one go used to be dispatched to the end of the read even
    once the write buffer was full: 75 KB of requests for 1 MB answers, never
    read, held a gigabyte of replies. Answers made in the read stop the rest of
    its calls at the high-water mark; the calls wait, and run once the peer reads."""
    count, size = 400, 100_000

    class BigAnswers(EchoHandler):
        """Answers inside the read that brought the request, much bigger than it."""
        async def slow(self, text: str, delay_ms: int) -> str:
            self.slow_started += 1
            return text * size

    handler = BigAnswers()

    async def main():
        async with serving(echo_services(handler), read_timeout=None) as server, \
                raw_connection(server.address) as raw:
            raw.writer.write(b"".join(unified_request("slow", Echo.slow_args(text="x", delay_ms=0),
                                                      seq) for seq in range(count)))
            [conn] = server._connections
            await wait_until(lambda: conn.transport.get_write_buffer_size() and conn.reading_paused,
                             timeout=10, what="the server to stop at the full write buffer")
            assert conn.transport.get_write_buffer_size() < 4 * size
            assert handler.slow_started < count
            frames = await raw.read_frames(count, timeout=60)
            assert sorted(f.head.sequence_id for f in frames) == list(range(count))
            assert handler.slow_started == count

    run(main(), timeout=90)


def test_too_many_calls_on_one_connection_pause_its_reading_not_refuse():
    """Past ``pause_reading_at`` running calls the server stops reading that
    connection (the rest wait in the socket, not in memory as tasks), resumes at
    half, and serves every call; nothing is refused."""
    count, pause_at = 20_000, 100
    gate = asyncio.Event()

    class GatedEcho(EchoHandler):
        async def slow(self, text: str, delay_ms: int) -> str:
            self.slow_started += 1
            await gate.wait()
            return text

    handler = GatedEcho()

    async def main():
        async with serving(echo_services(handler), pause_reading_at=pause_at) as server, \
                raw_connection(server.address) as raw:
            raw.writer.write(b"".join(
                unified_request("slow", Echo.slow_args(text=f"t{seq}", delay_ms=0), seq)
                for seq in range(count)))
            [conn] = server._connections
            await wait_until(lambda: conn.reading_paused and handler.slow_started >= pause_at)
            assert handler.slow_started < count // 2    # not all read: paused
            gate.set()
            frames = await raw.read_frames(count, timeout=30)
            assert sorted(f.head.sequence_id for f in frames) == list(range(count))
            assert all(f.head.status == 0 for f in frames)
            assert handler.slow_started == count and not conn.reading_paused

    run(main())


def test_one_connection_cannot_take_the_business_pool_from_the_others():
    """A peer pipelining calls to a plain-function handler used to fill the shared
    business queue, and good callers on other connections were refused (status 3).
    One connection now holds at most half of the pool; its calls past that are
    refused, and the other callers still find room."""
    count = 2000
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler)) as server, \
                raw_connection(server.address) as raw, \
                async_client(Echo, server.address, timeout=20) as good:
            raw.writer.write(b"".join(unified_request("block", Echo.block_args(text=f"b{seq}"), seq)
                                      for seq in range(count)))
            share = server._dispatcher._business_share
            assert share <= server._dispatcher._business_limit // 2
            statuses = [f.head.status for f in await raw.read_frames(count - share, timeout=30)]
            assert statuses == [Status.RPC_EXCEPTION] * (count - share)   # the excess, at once
            answer = asyncio.ensure_future(good.echo("good"))
            await wait_until(lambda: server._dispatcher._business_pending == share + 1)   # queued, not refused
            handler.release.set()
            assert await answer == "good"
            frames = await raw.read_frames(share, timeout=30)
            assert [f.head.status for f in frames] == [0] * share
            assert handler.entered.qsize() == share

    run(main())


# --- read and idle timeouts --------------------------------------------------------

def test_stalled_partial_frame_is_closed_after_read_timeout(caplog, monkeypatch):
    fresh_throttle(monkeypatch, "_STALLED", server_module)   # (logged, whatever came before)

    async def main():
        async with serving(echo_services(), read_timeout=0.4, idle_timeout=60) as server, \
                echo_client(server.address) as good, \
                raw_connection(server.address) as bystander:
            assert await echo_on(bystander, 1) == "ok"
            async with raw_connection(server.address) as stalled:
                frame = good_request(7, "never finished")
                await stalled.send(frame[:len(frame) // 2])
                started = time.monotonic()
                while True:          # the good client keeps calling while the stall lasts
                    assert await good.echo("busy") == "busy"
                    if stalled.reader.at_eof() or time.monotonic() - started > 1.0:
                        break
                    await asyncio.sleep(0.05)
                assert await stalled.closed_by_peer(timeout=5)
            # the idle-but-clean bystander and the good client are unaffected
            assert not bystander.reader.at_eof()
            assert await echo_on(bystander, 2, "still here") == "still here"
            assert await good.echo("fine") == "fine"

    with caplog.at_level(logging.INFO, logger="octo_core.server"):
        run(main())
    # the line says how long the frame took, a fraction of a second too (not "0s")
    (waited,) = [m.group(1) for r in caplog.records
                 for m in [re.search(r"a frame still incomplete after ([0-9.]+)s$", r.getMessage())]
                 if m]
    assert float(waited) >= 0.4 and "." in waited, waited


def test_partial_header_bytes_stall_too():
    async def main():
        async with serving(echo_services(), read_timeout=0.3, idle_timeout=60) as server, \
                raw_connection(server.address) as stalled:
            await stalled.send(b"\xab\xba\x00")       # not even a length yet
            assert await stalled.closed_by_peer(timeout=5)

    run(main())


def test_idle_connection_is_closed_after_idle_timeout():
    async def main():
        async with serving(echo_services(), idle_timeout=0.4, read_timeout=None) as server, \
                raw_connection(server.address) as idle:
            assert await echo_on(idle, 1) == "ok"
            assert await idle.closed_by_peer(timeout=5)
            await wait_until(lambda: not server._connections, what="the server to forget it")
            # the server still accepts new connections
            async with raw_connection(server.address) as fresh:
                assert await echo_on(fresh, 1, "new") == "new"

    run(main())


def test_an_idle_unified_peer_is_told_before_the_close_and_its_late_call_is_served():
    """Closing an idle connection while its peer sends a call would lose the call
    unrun (its caller told it was sent). A unified peer is told first (the close
    notice, with the node's status, ALIVE) and may still call until it leaves or
    the server closes after CLOSE_NOTICE; an octo_core client leaves at once and
    calls on a new connection."""
    async def main():
        async with serving(echo_services(), idle_timeout=0.3, read_timeout=None) as server, \
                raw_connection(server.address) as unaware:
            assert await echo_on(unaware, 1) == "ok"
            notice = await unaware.read_frame(timeout=5)
            assert notice.header.responseInfo.sequenceId == protocol.CLOSE_NOTICE_SEQUENCE
            assert notice.header.heartbeatInfo.status == NodeStatus.ALIVE
            assert await echo_on(unaware, 2, "sent as it heard") == "sent as it heard"
            assert await unaware.closed_by_peer(timeout=5)

            async with echo_client(server.address, timeout=5) as client:
                assert await client.echo("first") == "first"
                [conn] = server._connections
                await wait_until(lambda: conn.closed, 5, "the client to leave the idle connection")
                assert await client.echo("then") == "then"       # on a new connection

    run(main())


def test_idle_timeout_spares_a_connection_with_a_call_in_flight():
    handler = GatedHandler()

    async def main():
        async with serving(echo_services(handler), idle_timeout=0.3, read_timeout=None) as server, \
                echo_client(server.address, timeout=8) as client:
            call = asyncio.ensure_future(client.slow("long", 0))
            await wait_until(lambda: handler.running == 1, what="the call to start")
            await asyncio.sleep(1.0)     # several idle periods pass while it runs
            assert not call.done()
            handler.gate.set()
            assert await asyncio.wait_for(call, 5) == "long"

    run(main())


def test_busy_connection_is_not_idle():
    async def main():
        async with serving(echo_services(), idle_timeout=0.3, read_timeout=None) as server, \
                raw_connection(server.address) as busy:
            started = time.monotonic()
            seq = 0
            while time.monotonic() - started < 1.2:
                seq += 1
                assert await echo_on(busy, seq, f"t{seq}") == f"t{seq}"
                await asyncio.sleep(0.05)
            assert not busy.reader.at_eof()

    run(main())


# --- TLS ---------------------------------------------------------------------------

class Certs:
    """A throwaway CA, a server certificate (127.0.0.1, localhost) and a client one."""

    def __init__(self, directory) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.timezone.utc)

        def name(common: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

        def write(stem: str, key, cert) -> None:
            (directory / f"{stem}.key").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

        def make_ca(common: str):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (x509.CertificateBuilder().subject_name(name(common)).issuer_name(name(common))
                    .public_key(key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(now - datetime.timedelta(days=1))
                    .not_valid_after(now + datetime.timedelta(days=2))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                    .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                                 crl_sign=True, content_commitment=False,
                                                 key_encipherment=False, data_encipherment=False,
                                                 key_agreement=False, encipher_only=False,
                                                 decipher_only=False), critical=True)
                    .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                   critical=False)
                    .sign(key, hashes.SHA256()))
            return key, cert

        def make_leaf(common: str, ca_key, ca_cert, usage, sans=()):
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (x509.CertificateBuilder().subject_name(name(common))
                       .issuer_name(ca_cert.subject).public_key(key.public_key())
                       .serial_number(x509.random_serial_number())
                       .not_valid_before(now - datetime.timedelta(days=1))
                       .not_valid_after(now + datetime.timedelta(days=2))
                       .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                      critical=True)
                       .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                       # key identifiers: Python 3.13's strict X.509 checks want them
                       .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                      critical=False)
                       .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                           ca_key.public_key()), critical=False))
            if sans:
                builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)),
                                                critical=False)
            return key, builder.sign(ca_key, hashes.SHA256())

        ca_key, ca_cert = make_ca("octo test CA")
        write("ca", ca_key, ca_cert)
        write("server", *make_leaf("octo test server", ca_key, ca_cert,
                                   ExtendedKeyUsageOID.SERVER_AUTH,
                                   [x509.DNSName("localhost"),
                                    x509.IPAddress(ipaddress.ip_address(LOCALHOST))]))
        write("client", *make_leaf("octo test client", ca_key, ca_cert,
                                   ExtendedKeyUsageOID.CLIENT_AUTH))
        rogue_key, rogue_cert = make_ca("rogue CA")
        write("rogue-ca", rogue_key, rogue_cert)
        write("rogue-client", *make_leaf("rogue client", rogue_key, rogue_cert,
                                         ExtendedKeyUsageOID.CLIENT_AUTH))
        self.dir = directory

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def server_context(self, require_client_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.path("server.pem"), self.path("server.key"))
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.path("ca.pem"))
        return context

    def client_context(self, cert: str = "", ca: str = "ca") -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.path(f"{ca}.pem"))
        if cert:
            context.load_cert_chain(self.path(f"{cert}.pem"), self.path(f"{cert}.key"))
        return context


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    pytest.importorskip("cryptography")
    return Certs(tmp_path_factory.mktemp("tls"))


def test_tls_calls(certs):
    async def main():
        async with serving(echo_services(), ssl=certs.server_context()) as server, \
                echo_client(server.address, ssl=certs.client_context()) as client:
            assert await client.echo("over tls") == "over tls"
            results = await asyncio.gather(*(client.echo(f"t{i}") for i in range(100)))
            assert results == [f"t{i}" for i in range(100)]
            assert await client.echo("é" * 10000) == "é" * 10000
            conn = next(iter(server._connections))
            assert conn.transport.get_extra_info("ssl_object") is not None

    run(main())


def test_tls_native_thrift_and_auth(certs):
    async def main():
        auth = Authenticator(StaticTokens({CLIENT_APPKEY: "tls-token"}))
        async with serving(echo_services(), ssl=certs.server_context()) as server, \
                echo_client(server.address, ssl=certs.client_context(),
                             protocol="thrift") as native:
            assert await native.echo("native tls") == "native tls"
        async with serving(echo_services(), ssl=certs.server_context(), auth=auth,
                           ) as server, \
                echo_client(server.address, ssl=certs.client_context(), token="tls-token",
                             remote_appkey=SERVER_APPKEY) as signed:
            assert await signed.echo("signed tls") == "signed tls"

    run(main())


def test_tls_client_that_does_not_trust_the_server_fails(certs):
    async def main():
        async with serving(echo_services(), ssl=certs.server_context()) as server:
            async with echo_client(server.address,
                                    ssl=certs.client_context(ca="rogue-ca")) as client:
                with pytest.raises(TransportError):
                    await client.echo("x")
            async with echo_client(server.address, ssl=certs.client_context()) as client:
                assert await client.echo("still serving") == "still serving"

    run(main())


def test_plaintext_client_against_tls_server_fails_cleanly(certs):
    async def main():
        async with serving(echo_services(), ssl=certs.server_context()) as server:
            async with echo_client(server.address, timeout=1.0) as plain:
                with pytest.raises(TransportError) as info:
                    await plain.echo("x")
                # the server closed it without a byte, as a native thrift one would:
                # the way out for this one is named too
                assert "pass ssl=" in str(info.value)
            async with echo_client(server.address, ssl=certs.client_context()) as client:
                assert await client.echo("fine") == "fine"

    run(main())


def test_tls_replies_held_back_by_the_inflate_budget_survive_a_close_read_with_them(
        certs, monkeypatch):
    """A node answers every call, compressed, and closes, all in one write. The
    client's inflate budget holds most of the replies back a loop pass; TLS reads
    the close with them (paused reading keeps only a TCP close behind them), and
    the calls whose replies were held still get them, not "connection closed"."""
    from octo_core import client as client_module
    from octo_core import codec
    from wire_helpers import frames_read

    monkeypatch.setattr(client_module, "READ_BATCH", 3000)
    texts = [f"{i}" + "x" * 2500 for i in range(8)]

    def reply(frame: Any) -> bytes:
        name, _, seqid, args = decode_body(frame, Echo)
        body = codec.encode_message(name, 2, seqid, Echo.echo_result(success=args.text))
        return protocol.encode_unified(protocol.response_header(frame.head.sequence_id), body,
                                       protocol.FLAG_GZIP | protocol.SERIALIZER_THRIFT)

    async def answer_all_and_close(reader: asyncio.StreamReader,
                                   writer: asyncio.StreamWriter) -> None:
        calls = []
        async for frame in frames_read(reader):
            calls.append(frame)
            if len(calls) == len(texts):
                break
        writer.write(b"".join(reply(frame) for frame in calls))
        writer.close()

    async def main() -> List[Any]:
        listener = await asyncio.start_server(answer_all_and_close, LOCALHOST, 0,
                                              ssl=certs.server_context())
        address = f"{LOCALHOST}:{listener.sockets[0].getsockname()[1]}"
        try:
            async with echo_client(address, ssl=certs.client_context(), compression="gzip",
                                   heartbeat_interval=None) as client:
                return await asyncio.gather(*(client.echo(text) for text in texts),
                                            return_exceptions=True)
        finally:
            listener.close()

    assert run(main()) == texts


def test_a_stalled_tls_handshake_is_cut(certs, monkeypatch):
    """Before its handshake a TLS peer is under none of the limits on frames; a
    handshake has a deadline of its own, so a stalled one does not hold a socket."""
    import octo_core.server

    monkeypatch.setattr(octo_core.server, "_TLS_HANDSHAKE_TIMEOUT", 0.3)

    async def main():
        async with serving(echo_services(), ssl=certs.server_context()) as server, \
                raw_connection(server.address) as stalled:      # TCP, then silence
            assert await stalled.closed_by_peer(timeout=5)
            async with echo_client(server.address, ssl=certs.client_context()) as client:
                assert await client.echo("fine") == "fine"

    run(main())


def test_mutual_tls(certs):
    async def main():
        async with serving(echo_services(), ssl=certs.server_context(True)) as server:
            async with echo_client(server.address,
                                    ssl=certs.client_context(cert="client")) as client:
                assert await client.echo("mutual") == "mutual"
                peer = next(iter(server._connections)).transport.get_extra_info("peercert")
                assert peer and dict(x[0] for x in peer["subject"])["commonName"] == \
                    "octo test client"
                # no client certificate: refused at the handshake (the call fails)
                async with echo_client(server.address, timeout=1.0,
                                        ssl=certs.client_context()) as anonymous:
                    with pytest.raises(TransportError):
                        await anonymous.echo("x")
                # a certificate from a CA the server does not trust: refused too
                async with echo_client(server.address, timeout=1.0,
                                        ssl=certs.client_context(cert="rogue-client")) as rogue:
                    with pytest.raises(TransportError):
                        await rogue.echo("x")
                # the authenticated client never noticed
                assert await client.echo("still mutual") == "still mutual"

    run(main())


def test_quota_buckets_for_invented_callers_stay_bounded():
    # caller appkeys come off the wire: a "*" quota must not keep a bucket per name forever
    from octo_core.quotas import Quotas
    quotas = Quotas({"*": 5.0, "vip": 1.0}, max_callers=100)
    for i in range(5000):
        assert quotas.take(f"invented.{i}")          # a first call always has a token
    assert len(quotas._buckets) <= 100
    # a limited caller is still limited: its bucket is not refilled, so not dropped
    assert quotas.take("vip") and not quotas.take("vip")
    for i in range(150):
        quotas.take(f"more.{i}")
    assert len(quotas._buckets) <= 100


@pytest.fixture
def quota_clock(monkeypatch) -> FakeClock:
    """The monotonic clock of ``octo_core.quotas``, moved by hand."""
    from octo_core import quotas as quotas_module
    clock = FakeClock(start=1000.0)
    monkeypatch.setattr(quotas_module, "time", FakeTime(clock))
    return clock


def test_a_quota_bucket_refills_at_its_rate(quota_clock):
    from octo_core.quotas import Quotas
    quotas = Quotas({"fast": 2.0, "slow": 0.5})
    assert [quotas.take("fast") for _ in range(3)] == [True, True, False]
    assert [quotas.take("slow") for _ in range(2)] == [True, False]
    quota_clock.advance(0.5)                   # one call's worth for fast, a quarter for slow
    assert [quotas.take("fast") for _ in range(2)] == [True, False]
    assert not quotas.take("slow")
    quota_clock.advance(1.5)                   # 2 s since slow's call: one more
    assert [quotas.take("slow") for _ in range(2)] == [True, False]


def test_making_room_for_quota_callers_forgets_only_refilled_buckets(quota_clock):
    """Buckets that have refilled are dropped; the partly used ones stay, whatever
    their rate (below 1/s, above, or one being refilled), so no caller gets a fresh
    bucket early by others' names coming in."""
    from octo_core.quotas import Quotas
    quotas = Quotas({"busy": 0.1, "slow": 0.5, "heavy": 10.0, "*": 1.0}, max_callers=5)
    assert all(quotas.take(caller) for caller in ["busy", "slow", "any-1", "any-2"])
    quota_clock.advance(0.5)
    assert all(quotas.take("heavy") for _ in range(9))          # 1 left, 5/s coming back
    quota_clock.advance(0.5)                                     # any-1 and any-2 are full again
    assert quotas.take("new")                                    # the sixth caller: room made
    assert not quotas.take("busy") and not quotas.take("slow")
    assert sum(quotas.take("heavy") for _ in range(10)) == 6


def test_with_every_quota_bucket_busy_making_room_forgets_the_stalest_half(quota_clock):
    from octo_core.quotas import Quotas
    quotas = Quotas({"*": 2.0}, max_callers=4)
    for caller, calls in [("d4", 1), ("c3", 2), ("b2", 1), ("a1", 2)]:   # oldest first
        assert all(quotas.take(caller) for _ in range(calls))
        quota_clock.advance(0.1)
    assert quotas.take("new")                  # none has refilled: d4 and c3 are forgotten
    assert quotas.take("c3")                   # (a fresh bucket)
    assert not quotas.take("a1")               # still empty


def test_quotas_keep_a_hundred_thousand_callers_by_default(quota_clock):
    from octo_core.quotas import Quotas
    quotas = Quotas({"*": 1.0})
    assert quotas.take("caller.0")
    quota_clock.advance(0.25)
    assert all(quotas.take(f"caller.{i}") for i in range(1, 100_000))
    assert not quotas.take("caller.0")         # all 100 000 buckets kept
    quota_clock.advance(0.25)
    assert quotas.take("one.more")             # room made: the stalest half forgotten
    assert quotas.take("caller.0")


def test_a_frame_trickled_in_is_closed_after_read_timeout():
    """A slow-loris peer sends a byte now and then: the connection is never quiet,
    but its frame is not done within ``read_timeout``, so it goes."""
    async def main():
        async with serving(echo_services(), read_timeout=0.4, idle_timeout=60) as server, \
                echo_client(server.address) as good, \
                raw_connection(server.address) as trickle:
            frame = good_request(7, "x" * 1000)
            await trickle.send(frame[:100])
            sent = 100
            while not trickle.reader.at_eof() and sent < len(frame) - 1:
                try:
                    await trickle.send(frame[sent:sent + 1])
                except (ConnectionError, asyncio.TimeoutError, RuntimeError):
                    break   # (RuntimeError: uvloop's "handler is closed", the server closed it)
                sent += 1
                await asyncio.sleep(0.02)
            assert sent < len(frame) - 1, "the frame arrived whole: nothing was cut"
            assert await trickle.closed_by_peer(timeout=5)
            assert await good.echo("fine") == "fine"

    run(main())


async def _pile_up_unread_replies(server, raw, count: int = 20_000):
    """Requests whose replies the peer never reads, until the server stops reading it.
    (``slow`` is a coroutine: every call is answered, 20 MB in all -- a plain
    function's would mostly be refused for its pool share, in replies small
    enough for the socket buffers to swallow.)"""
    raw.writer.write(b"".join(unified_request("slow", Echo.slow_args(text="x" * 1000, delay_ms=0),
                                              seq) for seq in range(count)))
    [conn] = server._connections
    await wait_until(lambda: conn.closed or (not conn.transport.is_reading()
                                             and conn.transport.get_write_buffer_size()),
                     timeout=30, what="the server to stop reading the peer, replies unread")
    return conn


def test_an_idle_peer_that_reads_nothing_is_let_go():
    """Closing waits for the write buffer to drain; a peer that never reads must
    not hold its socket (and a ``max_connections`` slot) forever."""
    async def main():
        async with serving(echo_services(), idle_timeout=1.0, read_timeout=None,
                           max_connections=1) as server:
            async with raw_connection(server.address) as raw:
                await _pile_up_unread_replies(server, raw)
                await wait_until(lambda: not server._connections, timeout=15,
                                 what="the server to drop the connection")
            async with echo_client(server.address) as good:     # the slot is free again
                assert await good.echo("fine") == "fine"

    run(main())


def test_stop_does_not_wait_forever_for_a_peer_that_reads_nothing():
    async def main():
        async with contextlib.AsyncExitStack() as stack:
            server = await stack.enter_async_context(serving(echo_services(), grace=0.2))
            raw = await stack.enter_async_context(raw_connection(server.address))
            conn = await _pile_up_unread_replies(server, raw)
            assert conn.transport.get_write_buffer_size()       # replies it will never read
            await asyncio.wait_for(server.stop(grace=0.2), 15)
            assert not server._connections and conn.closed
            assert await raw.closed_by_peer(timeout=5)

    run(main())


class GatedSorter(EverythingStubs):
    """EverythingService whose ``classify`` waits at a gate the test opens."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.running = 0

    async def classify(self, items):
        self.running += 1
        await asyncio.wait_for(self.gate.wait(), 10)
        return {}


def test_the_objects_a_request_decodes_to_count_in_flow_control_and_in_flight_bytes():
    """A byte of request can decode to a whole struct: a call holds
    ``OBJECT_BYTES`` per object of its arguments on top of its request bytes, for
    its connection's flow control and for the server's ``max_in_flight_bytes``."""
    service, sorter = EVERYTHING.EverythingService, GatedSorter()
    items = [EVERYTHING.Inner()] * 20_000      # a STOP byte each, 3 objects each
    request = unified_request("classify", service.classify_args(items=items), 1,
                              service="EverythingService")

    async def main():
        async with serving([(service, sorter, None)] + echo_services(),
                           pause_reading_bytes=1 << 20, max_in_flight_bytes=1 << 20) as server, \
                raw_connection(server.address) as raw, echo_client(server.address) as other:
            await raw.send(request)
            await wait_until(lambda: sorter.running, what="the call to run")
            assert len(request) < 30_000
            assert server._dispatcher._in_flight_bytes >= len(items) * 3 * server_module.OBJECT_BYTES
            (conn,) = server._connections
            assert conn.reading_paused
            with pytest.raises(RpcError, match="bytes of requests in flight"):
                await other.echo("no room")
            sorter.gate.set()
            assert (await raw.read_frame()).head.status == 0
            assert await other.echo("room again") == "room again"
            assert server._dispatcher._in_flight_bytes == 0 and not conn.reading_paused

    run(main())


def test_compressed_requests_count_inflated_in_flow_control():
    """A few kilobytes of gzip can carry many megabytes of request: the server
    reads no more of a connection once its running calls hold
    ``pause_reading_bytes`` (decoded), the rest waiting still compressed; every
    call is served once they finish."""
    from octo_core import protocol

    count, size, pause_bytes = 24, 2 << 20, 5 << 20
    handler = GatedHandler()

    async def main():
        async with serving(echo_services(handler), pause_reading_bytes=pause_bytes,
                           max_frame_size=4 << 20) as server, \
                raw_connection(server.address) as raw:
            gzip = protocol.DEFAULT_FLAGS | protocol.FLAG_GZIP
            requests = b"".join(unified_request("slow", Echo.slow_args(text="x" * size, delay_ms=0),
                                                seq, flags=gzip) for seq in range(count))
            assert len(requests) < count * size // 100       # the bomb: over 100x
            raw.writer.write(requests)
            [conn] = server._connections
            await wait_until(lambda: conn.reading_paused and handler.running)
            await asyncio.sleep(0.2)                          # would more be read? (none may)
            assert conn.held <= pause_bytes + size            # it stopped at the first past the line
            assert handler.slow_started < count // 4
            handler.gate.set()
            frames = await raw.read_frames(count, timeout=30)
            assert sorted(f.head.sequence_id for f in frames) == list(range(count))
            assert all(f.head.status == 0 for f in frames) and conn.held == 0

    run(main())


def test_a_compressed_request_behind_the_call_that_pauses_a_connection_waits_compressed():
    """The calls of one read past ``pause_reading_at`` wait in the connection's
    backlog; a gzip request among them used to wait there inflated, so that
    each connection's few hundred bytes of calls and 15 KB of gzip held 16 MB
    that no server-wide limit counted. It waits compressed, as it came."""
    size, pause_at = 8 << 20, 4
    handler = GatedHandler()

    async def main():
        async with serving(echo_services(handler), pause_reading_at=pause_at) as server, \
                raw_connection(server.address) as raw:
            gzip = protocol.DEFAULT_FLAGS | protocol.FLAG_GZIP
            calls = [unified_request("slow", Echo.slow_args(text="", delay_ms=0), seq)
                     for seq in range(pause_at)]
            bomb = unified_request("echo", Echo.echo_args(text="x" * size), pause_at, flags=gzip)
            raw.writer.write(b"".join(calls) + bomb)
            [conn] = server._connections
            await wait_until(lambda: conn.reading_paused and handler.running == pause_at)
            assert sum(len(frame.body) for frame in conn._backlog) < size // 100
            handler.gate.set()
            frames = await raw.read_frames(pause_at + 1, timeout=30)
            assert sorted(f.head.sequence_id for f in frames) == list(range(pause_at + 1))
            assert all(f.head.status == 0 for f in frames)

    run(main())


def test_a_connection_whose_whole_frames_waited_in_the_reader_is_not_taken_for_a_stall():
    """Frames kept back compressed while the connection was busy are read when it
    frees up; nothing of a frame is then missing, so however long the calls run,
    ``read_timeout`` does not cut the connection."""
    from octo_core import protocol

    gzip = protocol.DEFAULT_FLAGS | protocol.FLAG_GZIP
    big = "a" * (1 << 20)              # 8 of these inflate past one read batch

    async def main():
        async with serving(echo_services(), pause_reading_at=2, read_timeout=0.5) as server, \
                raw_connection(server.address) as raw:
            await raw.send(b"".join(
                unified_request("slow", Echo.slow_args(text=big, delay_ms=1500 if seq == 7 else 50),
                                seq, flags=gzip)
                for seq in range(8)))
            frames = await raw.read_frames(8, timeout=20)
            assert sorted(f.head.sequence_id for f in frames) == list(range(8))

    run(main())


HOARD = (1_000_000).to_bytes(4, "big") + b"\x80\x01\x00\x01"   # a framed call, never ended


def partial_held(server: octo_core.Server) -> int:
    return sum(conn._decoder.buffered for conn in server._connections)


def test_partial_frames_across_connections_meet_a_server_wide_limit():
    """Peers each holding much of a frame (within max_frame_size) add up past
    max_partial_bytes: one reads on, the others stop being read, and the server
    holds not much more than the limit; when the hoarders leave, they read on."""
    big = framed_request("echo", Echo.echo_args(text="x" * 300_000), 7)

    async def main():
        async with serving(echo_services(), max_frame_size=1 << 20, max_partial_bytes=1 << 20,
                           read_timeout=None) as server, \
                raw_connection(server.address) as first, \
                raw_connection(server.address) as second, \
                raw_connection(server.address) as late:
            await first.send(HOARD + b"\x00" * 900_000)
            await wait_until(lambda: partial_held(server) >= 900_000, what="the first's bytes")
            await second.send(HOARD + b"\x00" * 300_000)   # past the limit: it reads on
            await wait_until(lambda: partial_held(server) >= 1_200_000, what="the second's")
            await late.send(big[:-1])                      # past it too: it waits
            await wait_until(lambda: any(c.reading_paused for c in server._connections),
                             what="the late connection to wait")
            assert partial_held(server) < 1_200_000 + 300_000   # the rest waits in the socket
            await first.aclose()
            await second.aclose()
            await late.send(big[-1:])
            name, _, seqid, result = decode_body(await late.read_frame(), Echo)
            assert (name, seqid, result.success) == ("echo", 7, "x" * 300_000)
            await wait_until(lambda: partial_held(server) == 0, what="nothing held")

    run(main())


def test_large_requests_at_once_past_the_partial_frame_limit_are_all_answered():
    """Legitimate requests, together past max_partial_bytes, each sent but for its
    last byte: one reads on past the limit, then the next, so every one is
    answered (none waits for room that only its own end would make)."""
    requests = [framed_request("echo", Echo.echo_args(text=str(i) * 600_000), i)
                for i in range(3)]

    async def main():
        async with serving(echo_services(), max_frame_size=1 << 20, max_partial_bytes=1 << 20,
                           read_timeout=None) as server, contextlib.AsyncExitStack() as peers:
            connections = [await peers.enter_async_context(raw_connection(server.address))
                           for _ in requests]
            for peer, request in zip(connections, requests):
                await peer.send(request[:-1])
            await wait_until(lambda: any(c.reading_paused for c in server._connections),
                             what="a connection to wait")
            for peer, request in zip(connections, requests):
                await peer.send(request[-1:])
            for i, peer in enumerate(connections):
                _, _, seqid, result = decode_body(await peer.read_frame(), Echo)
                assert (seqid, result.success) == (i, str(i) * 600_000)

    run(main())


def test_a_peer_waiting_for_partial_frame_room_still_meets_its_read_timeout():
    """The pause for the server-wide limit is for the others: the read timeout goes
    on for the peer that waits, so peers that never finish a frame cannot hold the
    room, and everyone's frames, for ever."""
    async def main():
        async with serving(echo_services(), max_frame_size=1 << 20, max_partial_bytes=1 << 19,
                           read_timeout=0.5) as server, \
                raw_connection(server.address) as first, \
                raw_connection(server.address) as second:
            await first.send(HOARD + b"\x00" * 600_000)   # past the limit: it reads on
            await wait_until(lambda: partial_held(server) >= 600_000, what="the first's bytes")
            await second.send(HOARD + b"\x00" * 600_000)
            await wait_until(lambda: any(c.reading_paused for c in server._connections),
                             what="the second connection to wait")
            assert await first.closed_by_peer() and await second.closed_by_peer()

    run(main())


class _PassCounting(EchoHandler):
    """``echo`` on the loop, noting the loop pass (``passes[0]``) it was called in."""

    def __init__(self) -> None:
        super().__init__()
        self.passes = [0]
        self.seen: List[int] = []

    async def echo(self, text: str) -> str:   # type: ignore[override]
        self.seen.append(self.passes[0])
        return text


@contextlib.contextmanager
def _counting_passes(handler: _PassCounting) -> Iterator[None]:
    """Count the running loop's passes in ``handler.passes`` inside the block."""
    loop = asyncio.get_running_loop()

    def tick() -> None:
        handler.passes[0] += 1
        ticking[0] = loop.call_soon(tick)
    ticking = [loop.call_soon(tick)]
    try:
        yield
    finally:
        ticking[0].cancel()


def test_frames_inflating_past_a_batch_take_turns_with_other_connections(monkeypatch):
    """A read whose compressed frames inflate past ``READ_BATCH`` is served a batch
    a loop pass, so a peer's compression bombs cannot hold the loop for a whole
    read; a peer that half-closes after sending them still gets every answer."""
    from octo_core.transport import stream

    monkeypatch.setattr(stream, "READ_BATCH", 3000)   # one 2,500-byte request a batch
    handler = _PassCounting()
    count = 6

    async def main():
        with _counting_passes(handler):
            async with serving(echo_services(handler)) as server, \
                    raw_connection(server.address) as raw:
                gzip = protocol.DEFAULT_FLAGS | protocol.FLAG_GZIP
                raw.writer.write(b"".join(
                    unified_request("echo", Echo.echo_args(text=f"{seq}" + "x" * 2500), seq,
                                    flags=gzip) for seq in range(count)))
                raw.writer.write_eof()
                frames = await raw.read_frames(count)
                assert sorted(f.head.sequence_id for f in frames) == list(range(count))
                assert all(f.head.status == 0 for f in frames)

    run(main())
    assert len(handler.seen) == count
    assert len(set(handler.seen)) == count     # one a loop pass, not all in one


def test_many_peers_each_sending_one_frame_that_inflates_a_lot_take_turns(monkeypatch):
    """What all of a server's connections inflate in one loop pass is bounded
    (``READ_BATCH``, shared): peers that each send one compression bomb are
    inflated a pass or more apart, not all in the pass that read them, and each
    is answered."""
    monkeypatch.setattr(server_module, "READ_BATCH", 3000)   # one 2,500-byte request a pass
    handler = _PassCounting()
    count = 6

    async def main():
        gzip = protocol.DEFAULT_FLAGS | protocol.FLAG_GZIP
        with _counting_passes(handler):
            async with serving(echo_services(handler)) as server, \
                    contextlib.AsyncExitStack() as stack:
                peers = [await stack.enter_async_context(raw_connection(server.address))
                         for _ in range(count)]
                for seq, raw in enumerate(peers):
                    raw.writer.write(unified_request(
                        "echo", Echo.echo_args(text=f"{seq}" + "x" * 2500), seq, flags=gzip))
                for seq, raw in enumerate(peers):
                    [frame] = await raw.read_frames(1)
                    assert frame.head.sequence_id == seq and frame.head.status == 0

    run(main())
    assert len(handler.seen) == count
    assert len(set(handler.seen)) == count     # one a loop pass, not all in one


class _BigAnswers(GatedHandler):
    """``slow`` answers, at the gate, with ``size`` times its text."""

    async def slow(self, text: str, delay_ms: int) -> str:
        await super().slow(text, delay_ms)
        return text * delay_ms


async def _call_for_answers_unread(raw: Any, handler: "_BigAnswers", count: int,
                                   reply: int) -> None:
    """``count`` calls for answers of ``reply`` bytes on ``raw``, all running, then let go."""
    raw.writer.write(b"".join(unified_request(
        "slow", Echo.slow_args(text="x", delay_ms=reply), seq) for seq in range(count)))
    await wait_until(lambda: handler.running == count, 10, "the calls")
    handler.gate.set()


def test_a_peer_leaving_big_answers_unread_is_cut_off_past_pause_reading_bytes(caplog,
                                                                               monkeypatch):
    """Calls dispatched before the write buffer filled answer on, each with a reply
    far bigger than its request: 200 unread replies of 256 KiB held 50 MB here. A
    peer that takes none of them past ``pause_reading_bytes`` unread (or two
    frames' worth) is cut, at once past four times that; the server serves
    others on."""
    fresh_throttle(monkeypatch, "_UNREAD", server_conn)   # (logged again, whatever came before)
    handler = _BigAnswers()
    count, reply = 200, 256 * 1024

    async def main():
        async with serving(echo_services(handler), max_frame_size=1 << 20,
                           pause_reading_bytes=1 << 20) as server:
            async with raw_connection(server.address) as raw:   # it never reads
                await _call_for_answers_unread(raw, handler, count, reply)
                await wait_until(lambda: not server._connections, 10, "the cut")
            assert "bytes of replies unread" in caplog.text
            async with echo_client(server.address) as client:
                assert await client.echo("after") == "after"

    run(main())


def test_a_peer_reading_a_burst_of_big_answers_as_they_come_is_not_cut():
    """Answers finishing together pass the unread mark however fast their peer
    reads (they are written in one loop pass): one that takes them as they go
    out gets them all (here 6 MiB: past the 2 MiB mark, within 4 times it)."""
    handler = _BigAnswers()
    count, reply = 24, 256 * 1024

    async def main():
        async with serving(echo_services(handler), max_frame_size=1 << 20,
                           pause_reading_bytes=1 << 20) as server, \
                echo_client(server.address, timeout=30) as client:
            calls = [asyncio.ensure_future(client.slow("x", reply)) for _ in range(count)]
            await wait_until(lambda: handler.running == count, 10, "the calls")
            handler.gate.set()
            assert await asyncio.gather(*calls) == ["x" * reply] * count

    run(main())


def test_a_peer_that_takes_none_of_its_answers_is_cut_after_the_grace(caplog, monkeypatch):
    """Past the unread mark but within four times it, a peer is given
    ``UNREAD_GRACE`` to take its answers: one that takes none is cut then."""
    fresh_throttle(monkeypatch, "_UNREAD", server_conn)
    handler = _BigAnswers()
    # 25 MiB of answers: the kernel's socket buffers take at most about 10 MiB
    # (tcp_wmem, tcp_rmem), the rest waits here, past the 8 MiB mark, within 32 MiB
    count, reply = 100, 256 * 1024

    async def main():
        async with serving(echo_services(handler), max_frame_size=1 << 20,
                           pause_reading_bytes=8 << 20) as server:
            async with raw_connection(server.address) as raw:   # it never reads
                await _call_for_answers_unread(raw, handler, count, reply)
                [conn] = server._connections
                await wait_until(lambda: handler.slow_finished == count, 10, "the answers")
                assert conn._unread_check is not None   # the grace, not a cut at once
                await wait_until(lambda: not server._connections, 10, "the cut")
            assert "bytes of replies unread" in caplog.text

    run(main())
