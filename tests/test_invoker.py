"""Acceptance tests of ``octo_core.cluster.invoker.Cluster`` (fault policies, retry
budget, deadlines, breakers, connection degrade) and of the cluster options of
``AsyncClient`` end to end.

The ``Cluster.invoke`` tests use a scripted fake ``send(node, remaining)`` (no
sockets) on a virtual-time event loop (``cluster_helpers.VirtualTimeLoop``):
sleeps cost nothing and every schedule is deterministic, so slow nodes, hedge
delays and deadlines are exact without measuring real time. Breakers and retry
budgets run on a ``FakeClock``.

The end-to-end tests run real ``Server``s on 127.0.0.1 (free ports, always
stopped) and a real ``AsyncClient`` on uvloop, each bounded by a timeout.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import re
import uuid
from types import SimpleNamespace
from typing import Any, Callable, List, Optional, Sequence, Set, Tuple

import pytest

import octo_core
from octo_core.client import AsyncClient
from octo_core.cluster.breaker import BreakerState, CircuitBreaker, RetryBudget
from octo_core.cluster import breaker as breaker_module, invoker
from octo_core.cluster.balancer import Balancer
from octo_core.cluster.invoker import POLICIES, Cluster, node_failed, not_executed
from octo_core.cluster.routing import (LITESET_KEY, SWIMLANE_KEY, Caller, NoRouteError,
                                       RouteRule, Router)
from octo_core.errors import (ApplicationError, CallTimeout, ClientClosed, DegradeError,
                              EncodeError, ProtocolError, RemoteError, RpcError, RuntimeFailure,
                              SecurityError, ServiceError, Status, TransportError)
from octo_core.registry.node import Node
from octo_core.transport.address import default_route_ip

from cluster_helpers import (CALLEE, CALLER, EchoError, Echo, FakeClock, NamedEcho, ScriptedSend,
                             answer, doomed_server, echo_servers, fail, node, numbered_nodes, run,
                             run_virtual, settle, use_up_time)
from wire_helpers import fresh_throttle, refusing_port

GENEROUS = dict(ratio=1.0, min_per_second=100_000.0)     # a budget that never says no
NO_BREAKER = dict(consecutive_failures=10**9, min_calls=10**9)


def make_cluster(count: int = 3, *, policy: str = "failover", lb: str = "roundrobin",
                 nodes: Optional[Sequence[Node]] = None, budget: Optional[RetryBudget] = None,
                 breaker: Optional[dict] = None, router: Optional[Router] = None,
                 **options: Any) -> Cluster:
    if lb == "roundrobin":
        options.setdefault("lb_options", dict(start=0))   # nginx's order: node 0 first
    cluster = Cluster(router or Router(), lb=lb, policy=policy,
                      budget=budget or RetryBudget(**GENEROUS), breaker_options=breaker, **options)
    cluster.update(list(nodes) if nodes is not None else numbered_nodes(count))
    return cluster


def overload() -> RpcError:
    return RpcError("server overloaded", status=Status.RPC_EXCEPTION)


def refused() -> TransportError:
    return TransportError("cannot connect: Connection refused", request_sent=False)


def malformed() -> ProtocolError:
    """What the client makes of a server's status-5 refusal of the request itself
    (``from_peer``: the status came in the node's reply)."""
    error = ProtocolError("Echo.echo: bad arguments: required field text is missing",
                          status=Status.PROTOCOL_EXCEPTION)
    error.from_peer = True
    return error


async def outcome(call: Any) -> Any:
    """The result of awaiting ``call``, or the exception it raised."""
    try:
        return await call
    except Exception as exc:  # noqa: BLE001 - the tests look at it
        return exc


# --- failfast, failover, failsafe ------------------------------------------------------------

def test_policy_names():
    assert set(POLICIES) == {"failfast", "failover", "failsafe", "forking", "hedging"}
    with pytest.raises(ValueError):
        Cluster(Router(), policy="failback")


def test_failfast_makes_one_attempt():
    async def main():
        cluster = make_cluster(policy="failfast")
        send = ScriptedSend(default=fail(overload))
        with pytest.raises(RpcError):
            await cluster.invoke(send, timeout=1.0, idempotent=True)
        assert len(send) == 1
    run_virtual(main())


@pytest.mark.parametrize("lb", ["random", "roundrobin", "leastrequest", "lalb"])
def test_failover_never_repeats_a_node_and_stops_after_retries(lb):
    async def main():
        cluster = make_cluster(6, lb=lb, retries=2, breaker=NO_BREAKER)
        for _ in range(100):
            send = ScriptedSend(default=fail(overload))
            with pytest.raises(RpcError):
                await cluster.invoke(send, timeout=1.0)
            assert len(send) == 3 and len(set(send.keys)) == 3, send.keys
    run_virtual(main())


def test_failover_returns_the_first_success():
    async def main():
        cluster = make_cluster(5, retries=4)
        send = ScriptedSend(by_attempt=[fail(overload), fail(refused), answer("third time")])
        assert await cluster.invoke(send, timeout=1.0) == "third time"
        assert len(send) == 3 and len(set(send.keys)) == 3
    run_virtual(main())


def test_failover_with_zero_retries_is_failfast():
    async def main():
        cluster = make_cluster(3, retries=0)
        send = ScriptedSend(default=fail(overload))
        with pytest.raises(RpcError):
            await cluster.invoke(send, timeout=1.0, idempotent=True)
        assert len(send) == 1
    run_virtual(main())


def test_failover_that_runs_out_of_nodes_raises_the_last_failure():
    """More retries allowed than there are nodes: after the last node fails the
    caller must see that failure (what went wrong), not a NoRouteError."""
    async def main():
        cluster = make_cluster(2, retries=2, breaker=NO_BREAKER)
        send = ScriptedSend(default=fail(overload))
        error = await outcome(cluster.invoke(send, timeout=1.0))
        assert len(send) == 2 and len(set(send.keys)) == 2
        assert type(error) is RpcError, f"got {type(error).__name__}: {error}"
    run_virtual(main())


def test_failover_walks_past_more_refusing_nodes_than_it_has_retries():
    """A refused connect (the request never left) uses up no retry and no budget:
    a call meeting more dead nodes than it has retries still reaches a live one."""
    async def main():
        cluster = make_cluster(5, retries=2, breaker=NO_BREAKER,
                               budget=RetryBudget(ratio=0.0, min_per_second=0.0))
        send = ScriptedSend(by_attempt=[fail(refused)] * 3 + [answer("live")])
        assert await cluster.invoke(send, timeout=1.0) == "live"   # not idempotent either
        assert len(send) == 4 and len(set(send.keys)) == 4
    run_virtual(main())


def test_a_call_gets_back_no_more_attempts_than_it_may_make():
    """Every node refusing (an outage): a call walks 1 + retries nodes given back,
    then 1 + retries that count -- not every node listed."""
    async def main():
        cluster = make_cluster(20, retries=1, breaker=NO_BREAKER)
        send = ScriptedSend(default=fail(refused))
        assert isinstance(await outcome(cluster.invoke(send, timeout=1.0)), TransportError)
        assert len(send) == 4 and len(set(send.keys)) == 4
    run_virtual(main())


def test_refusals_by_nodes_already_known_dead_count():
    """Once every node is degraded, trying them again is a last resort, and each
    attempt counts: an outage costs a call its retries, not a walk over every node."""
    async def main():
        cluster = make_cluster(4, retries=1, breaker=NO_BREAKER)
        send = ScriptedSend(default=fail(refused))
        assert isinstance(await outcome(cluster.invoke(send, timeout=1.0)), TransportError)
        assert len(send) == 4               # each refused once: all four degraded now
        send = ScriptedSend(default=fail(refused))
        assert isinstance(await outcome(cluster.invoke(send, timeout=1.0)), TransportError)
        assert len(send) == 2               # 1 + retries
    run_virtual(main())


# (first failure, idempotent, attempts made; the second attempt succeeds)
RETRY_CASES = [
    ("CallTimeout", lambda: CallTimeout("no reply within 1.0s"), False, 1),
    ("TransportError sent", lambda: TransportError("connection lost", request_sent=True), False, 1),
    ("ProtocolError", lambda: ProtocolError("bad reply"), False, 1),
    ("TransportError not sent", refused, False, 2),
    ("RpcError overload", overload, False, 2),
    ("RpcError stopping", lambda: RpcError("com.x is stopping", status=3), False, 2),
    ("DegradeError", lambda: DegradeError("quota exceeded"), False, 2),
    ("ServiceError", lambda: ServiceError("service 'Echo' is not hosted"), False, 2),
    ("CallTimeout idempotent", lambda: CallTimeout("no reply within 1.0s"), True, 2),
    ("TransportError sent idempotent", lambda: TransportError("connection lost"), True, 2),
    ("ProtocolError idempotent", lambda: ProtocolError("bad reply"), True, 2),
]


@pytest.mark.parametrize("make,idempotent,attempts", [c[1:] for c in RETRY_CASES],
                         ids=[c[0] for c in RETRY_CASES])
def test_what_failover_retries(make, idempotent, attempts):
    async def main():
        cluster = make_cluster(3)
        send = ScriptedSend(by_attempt=[fail(make), answer("second")])
        result = await outcome(cluster.invoke(send, timeout=1.0, idempotent=idempotent))
        assert len(send) == attempts
        if attempts == 1:
            assert isinstance(result, type(make()))
        else:
            assert result == "second"
    run_virtual(main())


BUSINESS = [
    ("declared IDL exception", lambda: EchoError(message="no such user", code=404)),
    ("ApplicationError", lambda: ApplicationError("ValueError: boom")),
    ("RuntimeFailure", lambda: RuntimeFailure("handler crashed")),
    ("SecurityError", lambda: SecurityError("not granted")),
    ("RemoteError", lambda: RemoteError("status 9")),
    ("plain exception", lambda: ValueError("bad argument")),
]


@pytest.mark.parametrize("make", [c[1] for c in BUSINESS], ids=[c[0] for c in BUSINESS])
@pytest.mark.parametrize("policy", ["failover", "forking", "hedging"])
def test_business_exceptions_are_never_retried(make, policy):
    async def main():
        cluster = make_cluster(3, policy=policy, forks=2, hedge_delay=0.05)
        send = ScriptedSend(by_attempt=[fail(make, after=0.01), answer("retried", after=0.5)])
        error = await outcome(cluster.invoke(send, timeout=1.0, idempotent=True))
        assert type(error) is type(make())
        if policy == "failover":
            assert len(send) == 1
        await settle()
        assert all(a.outcome != "ok" for a in send.attempts)
    run_virtual(main())


def test_error_classification():
    assert node_failed(CallTimeout("t")) and not not_executed(CallTimeout("t"))
    assert node_failed(refused()) and not_executed(refused())
    assert not node_failed(ApplicationError("x")) and not node_failed(EchoError())
    assert node_failed(NoRouteError("none"))
    assert node_failed(ProtocolError("a bad reply"))     # read here: the node sent garbage
    assert not node_failed(malformed())                  # the node refused the caller's request
    assert not node_failed(EncodeError("the caller's own value"))


@pytest.mark.parametrize("policy", ["failover", "hedging"])
def test_a_request_the_server_refused_as_malformed_is_the_callers_mistake(policy):
    """A status-5 refusal says the request was malformed: not retried or hedged,
    and no breaker opens, so the valid calls after it still go through."""
    async def main():
        cluster = make_cluster(3, policy=policy, hedge_delay=0.5,
                               breaker=dict(consecutive_failures=2, clock=FakeClock()))
        for _ in range(10):
            send = ScriptedSend(default=fail(malformed, after=0.01))
            error = await outcome(cluster.invoke(send, timeout=1.0, idempotent=True))
            assert isinstance(error, ProtocolError) and error.from_peer
            await settle()
            assert len(send) == 1, send.keys
        assert all(cluster.breaker(n).state is BreakerState.CLOSED for n in cluster.router.nodes)
        assert (await cluster.invoke(ScriptedSend(), timeout=1.0)).startswith("ok from")
    run_virtual(main())


def over_quota() -> DegradeError:
    """What the client makes of a node's status-6 refusal: this caller is past its quota."""
    error = DegradeError("quota exceeded for caller com.example.caller")
    error.from_peer = True
    return error


def test_quota_refusals_do_not_open_the_nodes_breaker():
    """A node that refuses a caller past its quota answered: it is up. Counted as
    failures, its refusals would open the breaker, and the caller would get
    local "circuit open" errors for calls the node would take a moment later."""
    async def main():
        cluster = make_cluster(1, policy="failfast",
                               breaker=dict(consecutive_failures=2, clock=FakeClock()))
        for _ in range(10):
            error = await outcome(cluster.invoke(ScriptedSend(default=fail(over_quota)),
                                                 timeout=1.0))
            assert isinstance(error, DegradeError) and error.from_peer, error
        (only,) = cluster.router.nodes
        assert cluster.breaker(only).state is BreakerState.CLOSED
        assert (await cluster.invoke(ScriptedSend(), timeout=1.0)).startswith("ok from")
    run_virtual(main())


@pytest.mark.parametrize("policy", ["failfast", "failover", "failsafe", "hedging"])
def test_a_closed_client_is_no_nodes_failure(policy):
    """``ClientClosed`` is the caller's side cutting its call short: raised under
    every policy (failsafe too: no None for a call the client dropped), never
    retried elsewhere, and no breaker counts it."""
    async def main():
        cluster = make_cluster(3, policy=policy, hedge_delay=0.5,
                               breaker=dict(consecutive_failures=1, clock=FakeClock()))
        send = ScriptedSend(default=fail(ClientClosed, after=0.01))
        with pytest.raises(ClientClosed):
            await cluster.invoke(send, timeout=1.0, idempotent=True)
        await settle()
        assert len(send) == 1, send.keys
        assert all(cluster.breaker(n).state is BreakerState.CLOSED for n in cluster.router.nodes)
    assert not node_failed(ClientClosed())
    run_virtual(main())


def test_failsafe_returns_none_and_logs(caplog, monkeypatch):
    fresh_throttle(monkeypatch, "_FAILSAFE", invoker)   # (logged, whatever came before)

    async def main():
        cluster = make_cluster(3, policy="failsafe")
        send = ScriptedSend(default=fail(overload))
        with caplog.at_level(logging.WARNING, logger="octo_core.cluster"):
            assert await cluster.invoke(send, timeout=1.0, idempotent=True) is None
        assert len(send) == 1
        assert any("failsafe" in r.getMessage() and send.keys[0] in r.getMessage()
                   for r in caplog.records), caplog.text
        ok = ScriptedSend()
        assert await cluster.invoke(ok, timeout=1.0) == f"ok from {ok.keys[0]}"
    run_virtual(main())


@pytest.mark.parametrize("error", [lambda: EchoError(message="declared", code=1),
                                   lambda: ApplicationError("the handler raised"),
                                   lambda: EncodeError("not a string"), malformed],
                         ids=["declared", "handler's error", "caller's encode error", "malformed"])
def test_failsafe_hides_failures_on_the_way_not_answers_nor_the_callers_mistakes(error):
    """A declared exception or the handler's own error is the node's answer, an
    EncodeError or a request the node refused as malformed the caller's mistake:
    raised as under failfast."""
    async def main():
        cluster = make_cluster(3, policy="failsafe")
        send = ScriptedSend(default=fail(error))
        with pytest.raises(type(error())):
            await cluster.invoke(send, timeout=1.0)
        assert len(send) == 1
    run_virtual(main())


def test_failsafe_with_no_node_to_call_returns_none(caplog, monkeypatch):
    fresh_throttle(monkeypatch, "_FAILSAFE", invoker)   # (logged, whatever came before)

    async def main():
        cluster = make_cluster(0, policy="failsafe")
        with caplog.at_level(logging.WARNING, logger="octo_core.cluster"):
            assert await cluster.invoke(ScriptedSend(), timeout=1.0) is None
        assert "found no node" in caplog.text
    run_virtual(main())


def test_an_outage_is_logged_once_a_period_not_once_a_call(caplog, monkeypatch):
    """A node that fails every call (down, overloaded) costs the log a record per
    kind and node a period: failsafe's warnings, failover's retries, each with
    a count of those held back in the next."""
    periods_over = (fresh_throttle(monkeypatch, "_FAILSAFE", invoker),
                    fresh_throttle(monkeypatch, "_RETRYING", invoker))

    async def main():
        failsafe = make_cluster(1, policy="failsafe", breaker=NO_BREAKER)
        failover = make_cluster(2, policy="failover", breaker=NO_BREAKER)
        down = numbered_nodes(2)[0].key
        for period in range(2):
            for _ in range(20):
                assert await failsafe.invoke(ScriptedSend(default=fail(overload)),
                                             timeout=1.0) is None
                send = ScriptedSend(behaviours={down: fail(overload)})
                assert (await failover.invoke(send, timeout=1.0, idempotent=True)
                        ).startswith("ok from")
            for period_over in periods_over:
                period_over()

    with caplog.at_level(logging.INFO, logger="octo_core.cluster"):
        run_virtual(main())
    failsafe_said = [r.getMessage() for r in caplog.records if "failsafe" in r.getMessage()]
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(failsafe_said) == 2 and "and 19 more" in failsafe_said[1], failsafe_said
    # (round robin: every other call begins on the node that is down, and retries)
    assert len(retries) == 2 and "and 9 more" in retries[1], retries


# --- forking and hedging ----------------------------------------------------------------------

def test_forking_runs_n_in_parallel_first_success_wins_rest_cancelled():
    async def main():
        loop = asyncio.get_running_loop()
        cluster = make_cluster(5, policy="forking", forks=3)
        send = ScriptedSend(by_attempt=[answer("slowest", after=0.3), answer("fastest", after=0.1),
                                        answer("middle", after=0.2)])
        started = loop.time()
        assert await cluster.invoke(send, timeout=1.0, idempotent=True) == "fastest"
        assert loop.time() - started == pytest.approx(0.1)
        assert len(send) == 3 and len(set(send.keys)) == 3
        assert all(a.started == started for a in send.attempts)          # in parallel
        assert all(a.remaining == pytest.approx(1.0) for a in send.attempts)
        await settle()
        assert [a.outcome for a in send.attempts] == ["cancelled", "ok", "cancelled"]
    run_virtual(main())


def test_forking_skips_failures_and_takes_the_first_answer():
    async def main():
        cluster = make_cluster(5, policy="forking", forks=3)
        send = ScriptedSend(by_attempt=[fail(overload, after=0.01), answer("late", after=0.2),
                                        fail(overload, after=0.05)])
        assert await cluster.invoke(send, timeout=1.0, idempotent=True) == "late"
        assert len(send) == 3
    run_virtual(main())


@pytest.mark.parametrize("policy", ["forking", "hedging"])
def test_forking_and_hedging_replace_a_copy_whose_request_never_left(policy):
    """As failover gives back a refused connect: with no budget for an extra copy at
    all, the refused first copy is still replaced, and the call reaches a live node."""
    async def main():
        cluster = make_cluster(4, policy=policy, breaker=NO_BREAKER,
                               budget=RetryBudget(ratio=0.0, min_per_second=0.0))
        send = ScriptedSend(by_attempt=[fail(refused), answer("live")])
        assert await cluster.invoke(send, timeout=1.0, idempotent=True) == "live"
        assert len(send) == 2 and len(set(send.keys)) == 2
    run_virtual(main())


@pytest.mark.parametrize("policy", ["forking", "hedging"])
def test_forking_and_hedging_get_back_no_more_copies_than_they_may_send(policy):
    """As failover: every node refusing (an outage), a call gets back as many
    copies as it may send (2), then sends 2 that count -- not one to every node."""
    async def main():
        cluster = make_cluster(20, policy=policy, forks=2, breaker=NO_BREAKER)
        send = ScriptedSend(default=fail(refused))
        error = await outcome(cluster.invoke(send, timeout=1.0, idempotent=True))
        assert isinstance(error, TransportError)
        assert len(send) == 4 and len(set(send.keys)) == 4
    run_virtual(main())

def test_a_hedge_the_budget_refused_is_not_tried_again_later_in_the_call():
    """No copy to send: the call waits for the one that runs, though the budget
    has a token again before it answers (its spent retry left the 10 s window)."""
    async def main():
        loop = asyncio.get_running_loop()
        budget = RetryBudget(ratio=0.0, min_per_second=0.1, window=10, clock=loop.time)
        assert budget.try_retry()                          # its one token for 10 s, spent
        cluster = make_cluster(3, policy="hedging", hedge_delay=0.5, budget=budget)
        send = ScriptedSend(by_attempt=[answer("first", after=15.0)], default=answer("hedge"))
        assert await cluster.invoke(send, timeout=30.0, idempotent=True) == "first"
        assert len(send) == 1
    run_virtual(main())

def test_only_the_copy_that_replaces_one_given_back_goes_without_budget():
    """The refused first copy is replaced for free, once: the hedge after that
    slow replacement still needs the budget (here none)."""
    async def main():
        cluster = make_cluster(4, policy="hedging", hedge_delay=0.05, breaker=NO_BREAKER,
                               budget=RetryBudget(ratio=0.0, min_per_second=0.0))
        send = ScriptedSend(by_attempt=[fail(refused), answer("slow", after=0.5)],
                            default=answer("hedge"))
        assert await cluster.invoke(send, timeout=1.0, idempotent=True) == "slow"
        assert len(send) == 2
    run_virtual(main())


@pytest.mark.parametrize("make", [overload, refused], ids=["overload", "connect refused"])
def test_hedging_sends_the_backup_at_once_when_the_first_attempt_fails(make):
    """gRPC A6: a node fault of one attempt sends the next hedge at once; the call
    does not fail while an untried node is left."""
    async def main():
        cluster = make_cluster(3, policy="hedging", hedge_delay=0.5)
        send = ScriptedSend(by_attempt=[fail(make, after=0.01), answer("backup", after=0.01)])
        assert await cluster.invoke(send, timeout=2.0, idempotent=True) == "backup"
        assert len(send) == 2 and send.keys[0] != send.keys[1]
        assert send.attempts[1].started == send.attempts[0].started + 0.01   # not after 0.5 s
    run_virtual(main())


def test_a_hedge_after_a_failure_still_draws_on_the_budget():
    async def main():
        budget = RetryBudget(ratio=0.0, min_per_second=0.0, window=10, clock=FakeClock())
        cluster = make_cluster(3, policy="hedging", hedge_delay=0.5, budget=budget)
        send = ScriptedSend(by_attempt=[fail(overload, after=0.01), answer("backup")])
        assert isinstance(await outcome(cluster.invoke(send, timeout=2.0, idempotent=True)),
                          RpcError)
        assert len(send) == 1
    run_virtual(main())


@pytest.mark.parametrize("policy", ["forking", "hedging"])
def test_forking_and_hedging_send_one_copy_of_a_method_that_is_not_idempotent(policy):
    """Two copies of a non-idempotent call may both run (gRPC hedges only idempotent
    methods): one copy at a time, however slow it is."""
    async def main():
        cluster = make_cluster(3, policy=policy, forks=3, hedge_delay=0.05)
        send = ScriptedSend(default=answer("done", after=0.2))
        assert await cluster.invoke(send, timeout=2.0) == "done"
        await asyncio.sleep(1.0)
        assert len(send) == 1
    run_virtual(main())


@pytest.mark.parametrize("policy", ["forking", "hedging"])
def test_a_non_idempotent_call_goes_elsewhere_only_when_it_surely_did_not_run(policy):
    async def main():
        cluster = make_cluster(3, policy=policy, forks=3, hedge_delay=0.05)
        unsent = ScriptedSend(by_attempt=[fail(refused), answer("second")])
        assert await cluster.invoke(unsent, timeout=2.0) == "second"
        assert len(unsent) == 2 and unsent.keys[0] != unsent.keys[1]
        lost = ScriptedSend(by_attempt=[fail(lambda: CallTimeout("no reply")), answer("second")])
        assert isinstance(await outcome(cluster.invoke(lost, timeout=2.0)), CallTimeout)
        assert len(lost) == 1
    run_virtual(main())


def test_forking_when_every_fork_fails_raises_a_failure():
    async def main():
        cluster = make_cluster(3, policy="forking", forks=3, breaker=NO_BREAKER)
        send = ScriptedSend(default=fail(overload, after=0.01))
        error = await outcome(cluster.invoke(send, timeout=1.0, idempotent=True))
        assert isinstance(error, RpcError)
        assert len(send) == 3
    run_virtual(main())


@pytest.mark.parametrize("policy", ["forking", "hedging"])
def test_a_losing_copy_that_ends_in_an_error_once_cancelled_leaves_none_unretrieved(policy):
    """The race cancels the copies still running when one answers; a copy may end
    with an error all the same (a closing client turns the cancel into
    TransportError). Nobody read it: asyncio logged "Task exception was never
    retrieved", with its traceback, at ERROR."""
    async def main():
        loop = asyncio.get_running_loop()
        unretrieved: List[str] = []
        loop.set_exception_handler(lambda _, context: unretrieved.append(context["message"]))
        cluster = make_cluster(3, policy=policy, forks=2, hedge_delay=0.001)

        async def closing(node: Any, remaining: float) -> Any:
            try:
                await asyncio.sleep(1.0)
            except asyncio.CancelledError:
                raise TransportError("client is closed") from None

        send = ScriptedSend(by_attempt=[closing, answer("first", after=0.01)])
        assert await cluster.invoke(send, timeout=1.0, idempotent=True) == "first"
        await settle()
        assert [a.outcome for a in send.attempts] == ["error", "ok"]
        gc.collect()
        assert unretrieved == []
    run_virtual(main())


def test_forking_never_uses_a_node_twice():
    async def main():
        cluster = make_cluster(2, policy="forking", forks=4)
        send = ScriptedSend(default=answer(after=0.1))
        assert (await cluster.invoke(send, timeout=1.0, idempotent=True)).startswith("ok from")
        assert sorted(send.keys) == sorted({n.key for n in cluster.router.nodes})
    run_virtual(main())


def test_hedging_sends_a_backup_only_when_the_first_is_slow():
    async def main():
        loop = asyncio.get_running_loop()
        cluster = make_cluster(3, policy="hedging", hedge_delay=0.05)
        send = ScriptedSend(by_attempt=[answer("slow", after=1.0), answer("backup", after=0.01)])
        t0 = loop.time()
        assert await cluster.invoke(send, timeout=2.0, idempotent=True) == "backup"
        assert loop.time() - t0 == pytest.approx(0.06)
        assert len(send) == 2 and send.keys[0] != send.keys[1]
        assert send.attempts[1].started - t0 == pytest.approx(0.05)
        assert send.attempts[1].remaining == pytest.approx(2.0 - 0.05)
        await settle()
        assert [a.outcome for a in send.attempts] == ["cancelled", "ok"]

        fast = ScriptedSend(default=answer("fast", after=0.01))
        assert await cluster.invoke(fast, timeout=2.0, idempotent=True) == "fast"
        await asyncio.sleep(1.0)
        assert len(fast) == 1                                   # no backup for a quick answer
    run_virtual(main())


def test_hedging_first_answer_wins_even_after_the_backup_left():
    async def main():
        cluster = make_cluster(3, policy="hedging", hedge_delay=0.05)
        send = ScriptedSend(by_attempt=[answer("first", after=0.08), answer("backup", after=0.5)])
        assert await cluster.invoke(send, timeout=2.0, idempotent=True) == "first"
        await settle()
        assert [a.outcome for a in send.attempts] == ["ok", "cancelled"]
    run_virtual(main())


def test_hedging_backup_rescues_a_first_attempt_that_fails_late():
    async def main():
        cluster = make_cluster(3, policy="hedging", hedge_delay=0.05)
        send = ScriptedSend(by_attempt=[fail(overload, after=0.1), answer("backup", after=0.2)])
        assert await cluster.invoke(send, timeout=2.0, idempotent=True) == "backup"
    run_virtual(main())


# --- the retry budget ---------------------------------------------------------------------------

def test_retry_budget_ratio_and_floor():
    clock = FakeClock()
    budget = RetryBudget(ratio=0.1, min_per_second=2, window=10, clock=clock)
    assert sum(budget.try_retry() for _ in range(50)) == 20            # the floor: 2/s over 10 s
    for _ in range(300):
        budget.record_request()
    assert sum(budget.try_retry() for _ in range(50)) == 30            # + 10 % of 300
    clock.advance(10.5)                                                # the window moved on
    assert sum(budget.try_retry() for _ in range(50)) == 20


def test_retry_budget_window_moves_on_second_by_second():
    """Requests count in the second they came in, and leave the window with it,
    however the clock moves within and across seconds."""
    clock = FakeClock(1000.25)
    budget = RetryBudget(ratio=1.0, min_per_second=0, window=3, clock=clock)
    for step in (0.0, 0.5, 0.25, 0.5, 1.75):         # seconds 1000, 1000, 1001, 1001, 1003
        clock.advance(step)
        for _ in range(10):
            budget.record_request()
    clock.advance(0.5)                                 # 1003.75: 1001 and 1003 are in the window
    assert sum(budget.try_retry() for _ in range(50)) == 30
    clock.advance(1.0)                                 # 1004.75: only 1003 is left
    assert sum(budget.try_retry() for _ in range(50)) == 0   # its 10 requests, 30 retries


def test_retry_budget_keeps_a_total_outage_from_multiplying_calls():
    async def main():
        clock = FakeClock()
        budget = RetryBudget(ratio=0.1, min_per_second=1, window=10, clock=clock)
        cluster = make_cluster(20, retries=3, budget=budget, breaker=NO_BREAKER)
        send = ScriptedSend(default=fail(overload))
        calls = 500
        for _ in range(calls):
            with pytest.raises(RpcError):
                await cluster.invoke(send, timeout=1.0)
        # Without a budget: 4 attempts per call (2000). With it: +10 % and the floor.
        assert calls < len(send) <= calls * 1.1 + 10
    run_virtual(main())


def test_every_call_counts_toward_the_retry_budget():
    """The ratio is a share of the calls made: at half of them and no floor, 100
    calls failing everywhere get 50 retries between them (none, had the calls not
    been counted)."""
    async def main():
        budget = RetryBudget(ratio=0.5, min_per_second=0.0, window=10, clock=FakeClock())
        cluster = make_cluster(3, retries=1, budget=budget, breaker=NO_BREAKER)
        send = ScriptedSend(default=fail(overload))
        for _ in range(100):
            with pytest.raises(RpcError):
                await cluster.invoke(send, timeout=1.0)
        assert len(send) == 150
    run_virtual(main())


def test_forks_and_hedges_draw_on_the_budget():
    async def main():
        clock = FakeClock()
        budget = RetryBudget(ratio=0.0, min_per_second=0.3, window=10, clock=clock)   # 3 extra
        forking = make_cluster(5, policy="forking", forks=3, budget=budget)
        sends = []
        for _ in range(4):
            sends.append(ScriptedSend(default=answer(after=0.01)))
            await forking.invoke(sends[-1], timeout=1.0, idempotent=True)
        assert [len(s) for s in sends] == [3, 2, 1, 1]
    run_virtual(main())


def test_a_fork_or_hedge_that_is_not_sent_costs_no_budget():
    """Only extra attempts actually sent may draw on the budget: a fork or hedge
    for which no node is left must leave its token to the next call's retry."""
    async def main():
        clock = FakeClock()
        budget = RetryBudget(ratio=0.0, min_per_second=0.5, window=10, clock=clock)   # 5 extra
        forking = make_cluster(2, policy="forking", forks=4, budget=budget)
        send = ScriptedSend(default=answer(after=0.01))
        await forking.invoke(send, timeout=1.0, idempotent=True)
        assert len(send) == 2                          # one extra attempt was sent
        hedging = make_cluster(1, policy="hedging", hedge_delay=0.05, budget=budget)
        slow = ScriptedSend(default=answer(after=0.2))
        await hedging.invoke(slow, timeout=1.0, idempotent=True)
        assert len(slow) == 1                          # no other node: no hedge sent
        left = sum(budget.try_retry() for _ in range(10))
        assert left == 4, f"{5 - left} tokens spent for 1 extra attempt sent"
    run_virtual(main())


@pytest.mark.parametrize("window", [1, 2])
@pytest.mark.parametrize("start", [0.0, 0.5, 1.5, 1000.25])
def test_retry_budget_holds_requests_for_its_window_whatever_the_clock_starts_at(start, window):
    """Requests count for ``window`` seconds, on a clock that starts near 0 too (a
    caller's own: a new loop's ``loop.time()``, a fake)."""
    for wait in range(window + 1):
        clock = FakeClock(start)
        budget = RetryBudget(ratio=0.5, min_per_second=0, window=window, clock=clock)
        for _ in range(10):
            budget.record_request()
        clock.advance(wait)
        expected = 5 if wait < window else 0
        assert sum(budget.try_retry() for _ in range(50)) == expected, f"after {wait} s"


def test_the_default_retry_budget_is_a_tenth_of_the_requests_and_ten_a_second():
    clock = FakeClock()
    budget = RetryBudget(clock=clock)
    for _ in range(1000):
        budget.record_request()
    assert sum(budget.try_retry() for _ in range(500)) == 200   # 10/s over 10 s + 10 % of 1000
    clock.advance(9.0)
    assert not budget.try_retry()                                # spent for the 10 s window
    clock.advance(1.0)                                           # the requests' second left it
    assert sum(budget.try_retry() for _ in range(500)) == 100


# --- deadlines --------------------------------------------------------------------------------

def slow_failure(seconds: float) -> Callable:
    """Fails with an overload after ``seconds``, or times out if less time is left."""
    async def behave(node: Node, remaining: float) -> Any:
        if remaining < seconds:
            await asyncio.sleep(remaining)
            raise CallTimeout(f"no reply within {remaining:.3f}s")
        await asyncio.sleep(seconds)
        raise overload()
    return behave


def test_remaining_time_shrinks_across_attempts():
    async def main():
        loop = asyncio.get_running_loop()
        cluster = make_cluster(5, retries=4, breaker=NO_BREAKER)
        send = ScriptedSend(default=slow_failure(0.3))
        t0 = loop.time()
        with pytest.raises(CallTimeout):
            await cluster.invoke(send, timeout=1.0)
        assert [a.remaining for a in send.attempts] == pytest.approx([1.0, 0.7, 0.4, 0.1])
        for a in send.attempts:                     # never more than what is left
            assert a.remaining <= 1.0 - (a.started - t0) + 1e-9
        assert loop.time() - t0 == pytest.approx(1.0)
    run_virtual(main())


@pytest.mark.parametrize("policy", ["failfast", "failover", "hedging"])
def test_timeouts_of_a_call_cut_short_open_no_breaker(policy):
    """A call whose time a handler's caller cut short (``blame_timeouts=False``) may
    time out on a healthy node: that says nothing of the node, so however many do,
    its breaker stays closed; the same timeouts with the call's own time open it."""
    async def main() -> Tuple[BreakerState, BreakerState]:
        states = []
        for blame in (False, True):
            cluster = make_cluster(1, policy=policy, breaker=dict(consecutive_failures=2))
            slow = ScriptedSend(default=fail(lambda: CallTimeout("no reply within 0.002s")))
            for _ in range(5):
                with pytest.raises((CallTimeout, DegradeError)):   # (an open circuit)
                    await cluster.invoke(slow, timeout=1.0, idempotent=True,
                                         blame_timeouts=blame)
            states.append(cluster.breaker(cluster.router.nodes[0]).state)
        return states[0], states[1]

    assert run_virtual(main()) == (BreakerState.CLOSED, BreakerState.OPEN)


def test_timeouts_of_a_call_cut_short_are_no_failure_to_a_learning_balancer(monkeypatch):
    """Nor are they the node's failure to LALB or least request: the balancer learns
    the time the call took until cut (a lower bound of the node's latency, as for a
    lost hedge), not an error to punish; the same timeout with the call's own time
    is one."""
    told: List[bool] = []
    made = Balancer.__init__

    def recording(balancer: Balancer, impl: Any, name: str) -> None:
        made(balancer, impl, name)
        finish = balancer.on_finish

        def on_finish(node: Node, latency_s: float, ok: bool) -> None:
            told.append(ok)
            finish(node, latency_s, ok)
        balancer.on_finish = on_finish  # type: ignore[method-assign]
    monkeypatch.setattr(Balancer, "__init__", recording)

    async def main() -> None:
        for blame in (False, True):
            cluster = make_cluster(1, policy="failfast", lb="lalb", breaker=NO_BREAKER)
            slow = ScriptedSend(default=fail(lambda: CallTimeout("no reply within 0.002s")))
            with pytest.raises(CallTimeout):
                await cluster.invoke(slow, timeout=1.0, blame_timeouts=blame)
    run_virtual(main())
    assert told == [True, False]


@pytest.mark.parametrize("lb", ["lalb", "leastrequest"])
def test_a_learning_balancer_hears_each_attempts_start_latency_and_outcome(monkeypatch, lb):
    told: List[Tuple[Any, ...]] = []
    made = Balancer.__init__

    def recording(balancer: Balancer, impl: Any, name: str) -> None:
        made(balancer, impl, name)
        start, finish = balancer.on_start, balancer.on_finish

        def on_start(node: Node) -> None:
            told.append(("start", node.key))
            start(node)

        def on_finish(node: Node, latency_s: float, ok: bool) -> None:
            told.append(("finish", node.key, round(latency_s, 6), ok))
            finish(node, latency_s, ok)
        balancer.on_start = on_start  # type: ignore[method-assign]
        balancer.on_finish = on_finish  # type: ignore[method-assign]
    monkeypatch.setattr(Balancer, "__init__", recording)
    monkeypatch.setattr(invoker, "time", _LoopClock)

    async def main() -> None:
        cluster = make_cluster(1, policy="failfast", lb=lb, breaker=NO_BREAKER)
        (only,) = cluster.router.nodes
        assert await cluster.invoke(ScriptedSend(default=answer("ok", after=0.25)),
                                    timeout=1.0) == "ok"
        failing = ScriptedSend(default=fail(overload, after=0.5))
        assert isinstance(await outcome(cluster.invoke(failing, timeout=1.0)), RpcError)
        assert told == [("start", only.key), ("finish", only.key, 0.25, True),
                        ("start", only.key), ("finish", only.key, 0.5, False)]
    run_virtual(main())


def test_a_call_whose_deadline_passed_raises_call_timeout_without_sending():
    async def main():
        cluster = make_cluster(3, retries=2)
        send = ScriptedSend(default=use_up_time(overload))
        with pytest.raises(RpcError):               # the node's own answer, not a phantom's
            await cluster.invoke(send, timeout=0.5)
        assert len(send) == 1                       # the retry found no time left
        nothing = ScriptedSend()
        with pytest.raises(CallTimeout):
            await cluster.invoke(nothing, timeout=0.0)
        assert len(nothing) == 0
    run_virtual(main())


def test_failover_after_an_attempt_used_the_whole_deadline_sends_and_spends_nothing():
    """No retry fits in no time: no budget token goes, and the caller gets the
    timeout of the node that was called, not one naming a node never contacted."""
    async def main():
        budget = RetryBudget(ratio=0.0, min_per_second=1.0, window=10, clock=FakeClock())
        cluster = make_cluster(3, retries=2, budget=budget)
        send = ScriptedSend(default=use_up_time(lambda: CallTimeout("no reply within 0.5s")))
        error = await outcome(cluster.invoke(send, timeout=0.5, idempotent=True))
        assert len(send) == 1 and error is send.attempts[0].error
        assert sum(budget.try_retry() for _ in range(20)) == 10        # all 10 tokens left
    run_virtual(main())


def test_a_retry_refused_by_an_open_circuit_spends_nothing_and_raises_the_real_error():
    async def main():
        budget = RetryBudget(ratio=0.0, min_per_second=1.0, window=10, clock=FakeClock())
        nodes = numbered_nodes(2)
        cluster = make_cluster(nodes=nodes, retries=1, budget=budget,
                               breaker=dict(consecutive_failures=1, clock=FakeClock()))
        cluster.breaker(nodes[1]).record(False)                         # its circuit is open
        send = ScriptedSend(default=fail(overload))
        error = await outcome(cluster.invoke(send, timeout=1.0))
        assert send.keys == [nodes[0].key] and error is send.attempts[0].error
        assert sum(budget.try_retry() for _ in range(20)) == 10
    run_virtual(main())


def gz1_caller_and_nodes() -> Tuple[Caller, List[Node], List[Node]]:
    """A caller in IDC gz1 (region south), three nodes in its IDC, two in gz2 of its region."""
    caller = Caller(appkey=CALLER, idc="gz1", region="south")
    idc = [node(f"10.1.0.{i}", idc="gz1", region="south") for i in range(3)]
    region = [node(f"10.2.0.{i}", idc="gz2", region="south") for i in range(2)]
    return caller, idc, region


async def spread(cluster: Cluster) -> Set[str]:
    """The nodes 50 calls through ``cluster`` went to."""
    send = ScriptedSend()
    for _ in range(50):
        await cluster.invoke(send, timeout=1.0)
    return set(send.keys)


def test_open_breakers_in_the_callers_idc_spill_its_calls_into_the_region():
    """The registry still lists two crashed IDC nodes ALIVE; once their breakers
    open, the IDC is below the locality threshold and the region shares its calls
    (not the one survivor taking them all); closed again, the calls come back."""
    async def main():
        caller, idc, region = gz1_caller_and_nodes()
        clock = FakeClock()
        cluster = make_cluster(nodes=idc + region, router=Router(caller), policy="failfast",
                               breaker=dict(consecutive_failures=1, backoff_min=60.0,
                                            backoff_max=60.0, clock=clock))
        for crashed in idc[1:]:
            cluster.breaker(crashed).record(False)
        assert await spread(cluster) == {idc[0].key} | {n.key for n in region}
        clock.advance(120.0)                          # past the jittered backoff
        for crashed in idc[1:]:                       # each probe succeeds: closed again
            assert cluster.breaker(crashed).allows()
            cluster.breaker(crashed).record(True)
        assert await spread(cluster) <= {n.key for n in idc}
    run_virtual(main())


def test_degraded_nodes_in_the_callers_idc_spill_its_calls_until_they_connect_again():
    """As open breakers do: two IDC nodes whose connects failed put the IDC below
    the locality threshold; once a call finds each connects again, the calls come back."""
    async def main():
        caller, idc, region = gz1_caller_and_nodes()
        cluster = make_cluster(nodes=idc + region, router=Router(caller), policy="failfast",
                               breaker=NO_BREAKER)
        for crashed in idc[1:]:
            cluster.degrade(crashed)
        assert await spread(cluster) == {idc[0].key} | {n.key for n in region}
        await asyncio.sleep(2.5)                      # the degrades are over
        await spread(cluster)                         # (calls find each connects)
        assert await spread(cluster) <= {n.key for n in idc}
    run_virtual(main())


def test_hedge_backup_gets_only_what_is_left():
    async def main():
        cluster = make_cluster(3, policy="hedging", hedge_delay=0.2)
        send = ScriptedSend(default=use_up_time(lambda: CallTimeout("no reply")))
        with pytest.raises(CallTimeout):
            await cluster.invoke(send, timeout=0.5, idempotent=True)
        assert [a.remaining for a in send.attempts] == pytest.approx([0.5, 0.3])
    run_virtual(main())


def test_hedge_delay_longer_than_the_deadline_sends_no_useful_backup():
    async def main():
        cluster = make_cluster(3, policy="hedging", hedge_delay=5.0)
        send = ScriptedSend(default=use_up_time(lambda: CallTimeout("no reply")))
        with pytest.raises(CallTimeout):
            await cluster.invoke(send, timeout=0.5, idempotent=True)
        assert [a.remaining for a in send.attempts][:1] == pytest.approx([0.5])
        assert all(a.remaining > 0 for a in send.attempts)
    run_virtual(main(), limit=10)


# --- breakers -----------------------------------------------------------------------------------

def test_breaker_opens_after_consecutive_failures_and_probes_after_backoff():
    clock = FakeClock()
    breaker = CircuitBreaker(consecutive_failures=3, backoff_min=1.0, backoff_max=8.0, clock=clock)
    for ok in (False, False, True, False, False):
        breaker.record(ok)
    assert breaker.state is BreakerState.CLOSED            # a success broke the streak
    breaker.record(False)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allows() and not breaker.available()
    clock.advance(0.79)
    assert not breaker.available()                         # backoff 1 s, jitter ±20 %
    clock.advance(0.42)
    assert breaker.available()
    assert breaker.allows()                                # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allows() and not breaker.available()   # one probe at a time
    breaker.record(False)                                  # the probe failed: backoff doubles
    assert breaker.state is BreakerState.OPEN
    clock.advance(1.5)
    assert not breaker.available()                         # 2 s × [0.8, 1.2] ≥ 1.6 s
    clock.advance(1.0)
    assert breaker.allows()
    breaker.record(True)
    assert breaker.state is BreakerState.CLOSED and breaker.allows()
    for _ in range(2):
        breaker.record(False)
    assert breaker.state is BreakerState.CLOSED            # the window started over


def test_breaker_opens_on_error_rate():
    clock = FakeClock()
    breaker = CircuitBreaker(consecutive_failures=100, error_rate=0.5, min_calls=10, window=10.0,
                             clock=clock)
    for i in range(9):
        breaker.record(i % 2 == 0)                         # 4 failures in 9: too few calls
        clock.advance(0.1)
    assert breaker.state is BreakerState.CLOSED
    breaker.record(False)                                  # 5 of 10
    assert breaker.state is BreakerState.OPEN


def test_breaker_forgets_failures_outside_its_window():
    clock = FakeClock()
    breaker = CircuitBreaker(consecutive_failures=100, error_rate=0.5, min_calls=10, window=10.0,
                             clock=clock)
    for _ in range(9):
        breaker.record(False)
    clock.advance(11.0)
    for _ in range(9):
        breaker.record(True)
    breaker.record(False)
    assert breaker.state is BreakerState.CLOSED            # 1 failure in the last 10 calls


def test_breaker_stays_closed_below_its_error_rate():
    clock = FakeClock()
    breaker = CircuitBreaker(consecutive_failures=100, error_rate=0.5, min_calls=10, clock=clock)
    for ok in [True, False] * 4 + [True, True]:
        breaker.record(ok)
    assert breaker.state is BreakerState.CLOSED            # 4 of 10 failed
    breaker.record(False)
    assert breaker.state is BreakerState.CLOSED            # 5 of 11
    breaker.record(False)
    assert breaker.state is BreakerState.OPEN              # 6 of 12


def test_an_error_rate_of_1_opens_the_breaker_only_when_every_call_failed():
    for outcomes, state in (((False, True, False, False), BreakerState.CLOSED),
                            ((False,) * 4, BreakerState.OPEN)):
        breaker = CircuitBreaker(consecutive_failures=100, error_rate=1, min_calls=4,
                                 clock=FakeClock())
        for ok in outcomes:
            breaker.record(ok)
        assert breaker.state is state, outcomes


def test_a_breaker_closed_again_judges_only_the_calls_since():
    clock = FakeClock()
    breaker = CircuitBreaker(consecutive_failures=100, error_rate=0.5, min_calls=2, clock=clock)
    for _ in range(2):
        breaker.record(False)
    assert breaker.state is BreakerState.OPEN              # 2 of 2 failed
    clock.advance(1.21)
    assert breaker.allows()
    breaker.record(True)                                   # the probe closes it
    breaker.record(False)
    assert breaker.state is BreakerState.CLOSED            # 1 call since: fewer than min_calls
    breaker.record(False)
    assert breaker.state is BreakerState.OPEN


def test_late_outcomes_a_breaker_records_while_open_change_nothing():
    """Calls sent before the breaker opened may end after it did: their failures
    tell nothing new about the node."""
    clock = FakeClock()
    breaker = CircuitBreaker(consecutive_failures=2, backoff_min=1.0, backoff_max=8.0, clock=clock)
    for _ in range(5):
        breaker.record(False)                              # 2 open it, 3 more were on their way
    assert breaker.state is BreakerState.OPEN and breaker.allows() is False
    clock.advance(1.21)
    assert breaker.allows() is True                        # after 1 s (jittered), not 2 s or more
    breaker.record(True)
    breaker.record(False)
    assert breaker.state is BreakerState.CLOSED            # 1 failure in a row since it closed


def test_a_breaker_by_default_opens_and_backs_off_as_documented(monkeypatch):
    """``help(AsyncClient)``'s defaults: open after 5 failures in a row, or half of at
    least 20 calls in 10 s; a probe after 1 s (jittered by up to 20 %), doubling up
    to 30 s on each failed probe, and from 1 s again once a probe closed it."""
    monkeypatch.setattr(breaker_module, "random", SimpleNamespace(uniform=lambda low, high: high))
    clock = FakeClock()
    in_a_row = CircuitBreaker(clock=clock)
    for _ in range(4):
        in_a_row.record(False)
    assert in_a_row.state is BreakerState.CLOSED
    in_a_row.record(False)
    assert in_a_row.state is BreakerState.OPEN
    backoffs = (1, 2, 4, 8, 16, 30, 30, 1)
    for i, backoff in enumerate(backoffs):
        clock.advance(backoff * 1.2 - 0.05)                # the longest jitter: 1.2 × the backoff
        assert not in_a_row.available(), backoff
        clock.advance(0.1)
        assert in_a_row.allows(), backoff                  # the probe
        in_a_row.record(i == len(backoffs) - 2)            # the second 30 s probe closes it ...
        if in_a_row.state is BreakerState.CLOSED:
            for _ in range(5):                             # ... and it opens again
                in_a_row.record(False)

    clock = FakeClock()
    by_rate = CircuitBreaker(clock=clock)
    pattern = [False, False, True] * 6 + [False]           # 19 calls, 13 failed, never 5 in a row
    for ok in pattern:
        by_rate.record(ok)
    assert by_rate.state is BreakerState.CLOSED            # fewer than 20 calls
    clock.advance(10.0)                                    # they left the 10 s window
    for ok in pattern:
        by_rate.record(ok)
    assert by_rate.state is BreakerState.CLOSED
    by_rate.record(False)
    assert by_rate.state is BreakerState.OPEN              # 14 of 20 failed


@pytest.mark.parametrize("options, error, words", [
    ({"consecutive_failure": 3}, TypeError, "breaker has no option 'consecutive_failure'"),
    ({"on_change": print}, TypeError, "breaker has no option 'on_change'"),
    ({"consecutive_failures": 0}, ValueError, "consecutive_failures"),
    ({"error_rate": 50}, ValueError, "error_rate is the share of calls failed"),
    ({"error_rate": 1.5}, ValueError, "error_rate is the share of calls failed"),
    ({"error_rate": float("nan")}, ValueError, "error_rate"),
    ({"min_calls": -1}, ValueError, "min_calls"),
    ({"window": 0}, ValueError, "window"),
    ({"window": 2.5}, ValueError, "window must be a whole number of seconds"),
    ({"backoff_min": 10.0, "backoff_max": 5.0}, ValueError, "backoff_max (5.0) is below"),
])
def test_breaker_options_are_refused_when_the_client_is_made(options, error, words):
    """A misspelt or out-of-range ``breaker=`` option fails ``AsyncClient(...)``, not
    the first call (which would fail every call, or never open a breaker)."""
    with pytest.raises(error, match=re.escape(words)):
        AsyncClient(Echo, appkey=CALLER, hosts=["127.0.0.1:1"], breaker=options)


def test_cluster_breaker_excludes_a_failing_node_then_probes_and_closes():
    async def main():
        clock = FakeClock()
        nodes = numbered_nodes(2)
        bad, good = nodes[0].key, nodes[1].key
        cluster = make_cluster(policy="failfast", nodes=nodes, breaker=dict(
            consecutive_failures=3, backoff_min=1.0, backoff_max=8.0, clock=clock))
        send = ScriptedSend({bad: fail(overload)})
        for _ in range(6):                       # round robin: 3 failures on `bad`
            await outcome(cluster.invoke(send, timeout=1.0))
        assert send.keys.count(bad) == 3
        assert cluster.breaker(nodes[0]).state is BreakerState.OPEN
        del send.attempts[:]
        for _ in range(20):
            assert await cluster.invoke(send, timeout=1.0) == f"ok from {good}"
        assert set(send.keys) == {good}

        clock.advance(1.3)                       # past the backoff: one probe may go
        send.behaviours[bad] = answer("recovered", after=1.0)
        del send.attempts[:]
        calls = [asyncio.ensure_future(cluster.invoke(send, timeout=2.0)) for _ in range(20)]
        await asyncio.gather(*calls)
        assert send.keys.count(bad) == 1         # while the probe runs, nobody else goes there
        assert cluster.breaker(nodes[0]).state is BreakerState.CLOSED
        del send.attempts[:]
        for _ in range(10):
            await cluster.invoke(send, timeout=2.0)
        assert send.keys.count(bad) == 5         # back in the rotation
    run_virtual(main())


def test_cluster_breaker_failed_probe_reopens():
    async def main():
        clock = FakeClock()
        nodes = numbered_nodes(2)
        bad = nodes[0].key
        cluster = make_cluster(policy="failfast", nodes=nodes, breaker=dict(
            consecutive_failures=2, backoff_min=1.0, backoff_max=8.0, clock=clock))
        send = ScriptedSend({bad: fail(overload)})
        for _ in range(4):
            await outcome(cluster.invoke(send, timeout=1.0))
        assert cluster.breaker(nodes[0]).state is BreakerState.OPEN
        clock.advance(1.3)
        del send.attempts[:]
        for _ in range(10):
            await outcome(cluster.invoke(send, timeout=1.0))
        assert send.keys.count(bad) == 1         # the probe, which failed
        assert cluster.breaker(nodes[0]).state is BreakerState.OPEN
        clock.advance(1.5)                       # doubled backoff: not yet
        del send.attempts[:]
        for _ in range(10):
            await cluster.invoke(send, timeout=1.0)
        assert bad not in send.keys
    run_virtual(main())


def probing(policy: str = "failfast",
            **options: Any) -> Tuple[Cluster, CircuitBreaker, List[Node]]:
    """Two nodes; the first's breaker (one failure opens it, backoff 1 s to 8 s)
    opened and past its backoff: the next call to that node is the half-open probe."""
    clock = FakeClock()
    nodes = numbered_nodes(2)
    cluster = make_cluster(policy=policy, nodes=nodes, breaker=dict(
        consecutive_failures=1, backoff_min=1.0, backoff_max=8.0, clock=clock), **options)
    breaker = cluster.breaker(nodes[0])
    breaker.record(False)
    clock.advance(1.3)
    return cluster, breaker, nodes


def test_a_probe_that_loses_a_hedge_race_proves_nothing():
    """The half-open probe went to the slow node and the hedge answered first: the
    cancelled probe says nothing of the node, so the breaker neither reopens with
    a doubled backoff (a node slower than the hedge would then stay out for good)
    nor stays claimed: the next call probes."""
    async def main():
        cluster, breaker, nodes = probing(policy="hedging", hedge_delay=0.05)
        slow, fast = nodes[0].key, nodes[1].key
        send = ScriptedSend({slow: answer("late", after=1.0)})
        assert await cluster.invoke(send, timeout=2.0, idempotent=True) == f"ok from {fast}"
        assert send.keys == [slow, fast]         # the probe, then the hedge that won
        await settle()                           # the loser's cancellation runs
        assert breaker.state is BreakerState.HALF_OPEN and breaker.available()
        send.behaviours[slow] = answer("recovered")
        del send.attempts[:]
        answers = [await cluster.invoke(send, timeout=2.0, idempotent=True) for _ in range(4)]
        assert "recovered" in answers and breaker.state is BreakerState.CLOSED
    run_virtual(main())


def test_a_probe_its_caller_cancels_proves_nothing():
    async def main():
        cluster, breaker, nodes = probing()
        send = ScriptedSend({nodes[0].key: answer("late", after=1.0)})
        probe = asyncio.ensure_future(cluster.invoke(send, timeout=2.0))
        await asyncio.sleep(0.1)
        assert send.keys == [nodes[0].key]       # the probe is out
        probe.cancel()
        await asyncio.wait([probe])
        assert probe.cancelled()                 # the caller's cancel reaches the caller
        assert breaker.state is BreakerState.HALF_OPEN and breaker.available()
    run_virtual(main())


def test_a_probe_its_client_cuts_short_proves_nothing():
    """``ClientClosed`` on the half-open probe is this side's doing: the breaker
    neither closes on it (as if the node had answered) nor stays claimed."""
    async def main():
        cluster, breaker, nodes = probing()
        send = ScriptedSend({nodes[0].key: fail(ClientClosed)})
        with pytest.raises(ClientClosed):
            await cluster.invoke(send, timeout=1.0)
        assert send.keys == [nodes[0].key]       # it was the probe
        assert breaker.state is BreakerState.HALF_OPEN and breaker.available()
    run_virtual(main())


def test_a_probe_whose_connect_is_refused_reopens_the_breaker():
    """A refused connect is no breaker failure while the breaker is closed (the
    degrade judges it), but on the half-open probe it is the probe's answer: the
    breaker opens again, not left half-open (and claimed) nor closed."""
    async def main():
        cluster, breaker, nodes = probing()
        send = ScriptedSend({nodes[0].key: fail(refused)})
        assert isinstance(await outcome(cluster.invoke(send, timeout=1.0)), TransportError)
        assert send.keys == [nodes[0].key]       # it was the probe
        assert breaker.state is BreakerState.OPEN
    run_virtual(main())


def test_overload_the_node_reports_in_its_reply_opens_its_breaker():
    """Only a quota refusal (status 6) from the node is an answer that keeps its
    breaker closed: an overload status the node put in its reply is a failure."""
    def reported_overload() -> RpcError:
        error = overload()
        error.from_peer = True
        return error

    async def main():
        cluster = make_cluster(1, policy="failfast",
                               breaker=dict(consecutive_failures=2, clock=FakeClock()))
        send = ScriptedSend(default=fail(reported_overload))
        for _ in range(2):
            assert isinstance(await outcome(cluster.invoke(send, timeout=1.0)), RpcError)
        (only,) = cluster.router.nodes
        assert cluster.breaker(only).state is BreakerState.OPEN
    run_virtual(main())


async def _calls_out_on_a_hung_node(stale: int, opens_after: int) -> Tuple[
        Cluster, ScriptedSend, List["asyncio.Future[Any]"]]:
    """Two nodes, round robin from the first, which hangs: ``stale`` calls sent
    (half of them to it, each to time out after 2 s), then its breaker opened by
    ``opens_after`` failures, and the clock past its backoff: the next call probes."""
    clock = FakeClock()
    nodes = numbered_nodes(2)
    cluster = make_cluster(policy="failfast", nodes=nodes, breaker=dict(
        consecutive_failures=opens_after, backoff_min=1.0, backoff_max=8.0, clock=clock))
    send = ScriptedSend({nodes[0].key: use_up_time(lambda: CallTimeout("no reply"))})
    calls = [asyncio.ensure_future(outcome(cluster.invoke(send, timeout=2.0)))
             for _ in range(stale)]
    await asyncio.sleep(0.1)
    for _ in range(opens_after):                   # opened by calls before those out
        cluster.breaker(nodes[0]).record(False)
    clock.advance(1.3)
    return cluster, send, calls


def test_a_call_sent_before_the_breaker_opened_does_not_decide_its_probe():
    """A hung node's calls sent before its breaker opened time out after it did. While
    the half-open probe runs, such an old outcome says nothing new: it must neither
    reopen the breaker (with a doubled backoff) nor leave the probe's answer unheard,
    which kept a node that had come back out of the rotation for another backoff."""
    async def main():
        cluster, send, stale = await _calls_out_on_a_hung_node(stale=2, opens_after=1)
        breaker, hung = cluster.breaker(cluster.router.nodes[0]), cluster.router.nodes[0].key
        send.behaviours[hung] = answer("back", after=3.0)
        probes = [asyncio.ensure_future(cluster.invoke(send, timeout=5.0)) for _ in range(2)]
        await asyncio.gather(*stale)               # the old call times out as the probe runs
        assert breaker.state is BreakerState.HALF_OPEN
        assert "back" in await asyncio.gather(*probes)
        assert send.keys.count(hung) == 2          # the old call, and the probe
        assert breaker.state is BreakerState.CLOSED
    run_virtual(main())


def test_calls_sent_before_the_breaker_opened_do_not_reopen_it_once_closed():
    """The probe found the node back and closed the breaker; the calls sent to it
    before the breaker opened time out only now. Their failures are old news: a
    streak of them must not open the breaker again on a node that answers."""
    async def main():
        cluster, send, stale = await _calls_out_on_a_hung_node(stale=6, opens_after=2)
        breaker, hung = cluster.breaker(cluster.router.nodes[0]), cluster.router.nodes[0].key
        send.behaviours[hung] = answer("back")
        assert "back" in [await cluster.invoke(send, timeout=1.0) for _ in range(2)]
        assert breaker.state is BreakerState.CLOSED   # the probe found it back
        await asyncio.gather(*stale)               # the old calls time out now
        assert send.keys.count(hung) == 4          # the three old calls, and the probe
        assert breaker.state is BreakerState.CLOSED
    run_virtual(main())


def test_timeouts_count_for_the_breaker_but_connect_failures_do_not():
    async def main():
        clock = FakeClock()
        nodes = numbered_nodes(2)
        cluster = make_cluster(policy="failfast", nodes=nodes, breaker=dict(
            consecutive_failures=2, clock=clock))
        timeouts = ScriptedSend({nodes[0].key: fail(lambda: CallTimeout("no reply"))})
        for _ in range(4):
            await outcome(cluster.invoke(timeouts, timeout=1.0))
        assert cluster.breaker(nodes[0]).state is BreakerState.OPEN
        refusing = ScriptedSend({nodes[1].key: fail(refused)})
        for _ in range(4):
            await outcome(cluster.invoke(refusing, timeout=1.0))
        assert cluster.breaker(nodes[1]).state is BreakerState.CLOSED
    run_virtual(main())


class _LoopClock:
    """``time`` for the invoker: ``perf_counter`` on the running (virtual) loop's clock,
    so LALB sees the simulated latencies."""

    @staticmethod
    def perf_counter() -> float:
        return asyncio.get_running_loop().time()


def _drop_after_send() -> TransportError:
    # What a client sees from a server that accepts, reads the request and closes the
    # connection (e.g. past its max_connections, or crashing on every request).
    return TransportError("connection lost: reset by peer", request_sent=True)


def _share_to_bad_node(lb: str, calls: int = 2000) -> Any:
    async def main():
        loop = asyncio.get_running_loop()
        nodes = numbered_nodes(2)
        cluster = Cluster(Router(), lb=lb, policy="failfast", budget=RetryBudget(**GENEROUS),
                          lb_options={"clock": loop.time} if lb == "lalb" else None)
        cluster.update(nodes)
        send = ScriptedSend({nodes[0].key: fail(_drop_after_send, after=0.001)},
                            default=answer(after=0.01))
        failures = 0
        for _ in range(calls):
            failures += isinstance(await outcome(cluster.invoke(send, timeout=1.0)), Exception)
        late = send.keys[calls // 2:]
        return late.count(nodes[0].key) / len(late), failures / calls
    return run_virtual(main(), limit=10_000)


def test_lalb_does_not_favour_a_node_that_drops_every_call(monkeypatch):
    """A node whose every call dies with "connection lost" (request sent) must not get
    more than a fair share under LALB (2 nodes: at most half)."""
    from octo_core.cluster import invoker
    monkeypatch.setattr(invoker, "time", _LoopClock)
    share, _ = _share_to_bad_node("lalb")
    assert share <= 0.5, f"LALB sent {share:.1%} of the calls to the node that drops them all"


def test_a_node_that_drops_every_call_is_eventually_avoided(monkeypatch):
    """Neither its breaker (connection failures are not counted) nor the connection
    degrade (only for requests never sent) takes such a node out: with plain weighted
    random, half of all calls keep failing for ever."""
    from octo_core.cluster import invoker
    monkeypatch.setattr(invoker, "time", _LoopClock)
    share, _ = _share_to_bad_node("random")
    assert share < 0.1, f"{share:.1%} of the calls still go to a node that fails them all"


# --- connection degrade and panic mode ------------------------------------------------------------

def test_connection_degrade_excludes_a_node_for_a_while():
    async def main():
        nodes = numbered_nodes(2)
        down, up = nodes[0].key, nodes[1].key
        cluster = make_cluster(policy="failfast", nodes=nodes)
        send = ScriptedSend({down: fail(refused)})
        first = await outcome(cluster.invoke(send, timeout=1.0))
        if send.keys[0] == up:                   # round robin started on the other one
            first = await outcome(cluster.invoke(send, timeout=1.0))
        assert isinstance(first, TransportError) and send.keys[-1] == down
        del send.attempts[:]
        for _ in range(20):
            assert await cluster.invoke(send, timeout=1.0) == f"ok from {up}"
        await asyncio.sleep(2.5)                 # the degrade (2 s) is over
        send.behaviours.clear()
        del send.attempts[:]
        for _ in range(4):
            await cluster.invoke(send, timeout=1.0)
        assert send.keys.count(down) == 2
    run_virtual(main())


def test_a_degraded_node_is_retried_by_one_call_at_a_time():
    """When a degrade is over, one call tries the node's connect again while the node
    keeps weight 0 for the others: a connect that hangs (a machine that went away
    without refusing) must not draw every concurrent call onto itself and fail them."""
    async def main():
        nodes = numbered_nodes(2)
        down = nodes[0].key
        cluster = make_cluster(policy="failfast", nodes=nodes, lb="random", breaker=NO_BREAKER)
        cluster.degrade(nodes[0])
        await asyncio.sleep(2.5)                 # the degrade (2 s) is over
        send = ScriptedSend({down: fail(refused, after=0.5)})
        outcomes = await asyncio.gather(*(outcome(cluster.invoke(send, timeout=1.0))
                                          for _ in range(40)))
        assert send.keys.count(down) == 1
        assert sum(isinstance(o, TransportError) for o in outcomes) == 1
        del send.attempts[:]                     # degraded again: no call for 2 s
        for _ in range(20):
            await cluster.invoke(send, timeout=1.0)
        assert down not in send.keys
        await asyncio.sleep(2.5)                 # ... and then tried again
        send.behaviours.clear()
        for _ in range(20):
            await cluster.invoke(send, timeout=1.0)
        assert down in send.keys
    run_virtual(main())


def test_a_degraded_node_whose_connect_works_again_takes_calls_again():
    async def main():
        nodes = numbered_nodes(2)
        cluster = make_cluster(policy="failfast", nodes=nodes, lb="random", breaker=NO_BREAKER)
        cluster.degrade(nodes[0])
        await asyncio.sleep(2.5)
        send = ScriptedSend(default=answer(after=0.1))
        await asyncio.gather(*(cluster.invoke(send, timeout=1.0) for _ in range(40)))
        await asyncio.gather(*(cluster.invoke(send, timeout=1.0) for _ in range(40)))
        assert send.keys.count(nodes[0].key) > 10 and not cluster._degraded
    run_virtual(main())


def test_failover_degrades_a_refusing_node_and_retries_elsewhere():
    async def main():
        nodes = numbered_nodes(3)
        cluster = make_cluster(policy="failover", nodes=nodes, lb="random")
        send = ScriptedSend({nodes[0].key: fail(refused)})
        for _ in range(50):
            assert (await cluster.invoke(send, timeout=1.0)).startswith("ok from")
        assert send.keys.count(nodes[0].key) == 1    # once, then degraded
    run_virtual(main(), limit=1.5)


def test_panic_mode_still_tries_when_every_node_is_excluded():
    async def main():
        nodes = numbered_nodes(3)
        cluster = make_cluster(policy="failover", nodes=nodes, retries=2)
        for n in nodes:
            cluster.degrade(n, retry_in=60.0)
        send = ScriptedSend()
        assert (await cluster.invoke(send, timeout=1.0)).startswith("ok from")
        assert len(send) == 1

        down = ScriptedSend(default=fail(refused))
        with pytest.raises(TransportError):
            await cluster.invoke(down, timeout=1.0)
        assert len(down) == 3 and len(set(down.keys)) == 3     # still no node twice
    run_virtual(main())


def test_panic_mode_with_every_breaker_open_refuses_with_degrade_error():
    async def main():
        clock = FakeClock()
        nodes = numbered_nodes(2)
        cluster = make_cluster(policy="failfast", nodes=nodes,
                               breaker=dict(consecutive_failures=1, clock=clock))
        send = ScriptedSend(default=fail(overload))
        for _ in range(2):
            await outcome(cluster.invoke(send, timeout=1.0))
        assert all(cluster.breaker(n).state is BreakerState.OPEN for n in nodes)
        del send.attempts[:]
        error = await outcome(cluster.invoke(send, timeout=1.0))
        assert isinstance(error, DegradeError) and len(send) == 0
    run_virtual(main())


# --- probing degraded nodes in the background ----------------------------------------------------

class ConnectProbe:
    """A client's connect-only probe, scripted: connecting to a key in ``down`` fails."""

    def __init__(self, down: Set[str]) -> None:
        self.down = set(down)
        self.probed: List[str] = []

    async def __call__(self, node: Node) -> None:
        self.probed.append(node.key)
        await asyncio.sleep(0.01)
        if node.key in self.down:
            raise refused()


def test_a_probed_node_gets_no_call_while_its_connect_fails():
    """With a probe (a client's: a connect alone), a degraded node is tried in the
    background every 2 s: a failfast caller loses the call that found it down and
    none after; once the probe connects, the node takes its share again."""
    async def main():
        nodes = numbered_nodes(2)
        down = nodes[0].key
        probe = ConnectProbe({down})
        cluster = make_cluster(policy="failfast", nodes=nodes, lb="roundrobin",
                               breaker=NO_BREAKER, probe=probe)
        send = ScriptedSend({down: fail(refused)})
        outcomes = []
        for _ in range(100):                     # ten (virtual) seconds of calls
            outcomes.append(await outcome(cluster.invoke(send, timeout=1.0)))
            await asyncio.sleep(0.1)
        assert sum(isinstance(o, TransportError) for o in outcomes) == 1
        assert send.keys.count(down) == 1
        assert probe.probed in ([down] * 4, [down] * 5)    # every 2 s, the node only
        probe.down.clear()
        send.behaviours.clear()
        await asyncio.sleep(2.5)                 # the next probe connects
        del send.attempts[:]
        for _ in range(10):
            await cluster.invoke(send, timeout=1.0)
        assert send.keys.count(down) == 5
        assert not cluster._degraded             # (its first call answered)
    run_virtual(main())


def test_a_probed_node_that_connects_takes_one_call_before_the_others():
    """A probe proves the connect, not the calls: once it connects, one call at a
    time tries the node (as without a probe), so a node that accepts connections
    and drops every call loses one call, not every call in flight meanwhile."""
    async def main():
        nodes = numbered_nodes(2)
        down = nodes[0].key
        probe = ConnectProbe(set())              # it connects ...
        cluster = make_cluster(policy="failfast", nodes=nodes, lb="roundrobin",
                               breaker=NO_BREAKER, probe=probe)
        dropped = lambda: TransportError("connection closed", request_sent=True)  # noqa: E731
        send = ScriptedSend({down: fail(dropped, after=0.05)})   # ... and drops the call
        cluster.degrade(nodes[0])
        await asyncio.sleep(2.5)                 # the probe connected
        assert probe.probed == [down]
        outcomes = await asyncio.gather(*(outcome(cluster.invoke(send, timeout=1.0))
                                          for _ in range(10)))
        assert send.keys.count(down) == 1
        assert sum(isinstance(o, TransportError) for o in outcomes) == 1
        assert down in cluster._probes           # degraded anew, probed again
    run_virtual(main())


def test_probes_end_when_their_node_leaves_or_the_cluster_closes():
    async def main():
        nodes = numbered_nodes(3)
        probe = ConnectProbe({n.key for n in nodes})
        cluster = make_cluster(policy="failfast", nodes=nodes, probe=probe)
        for n in nodes:
            cluster.degrade(n)
        await asyncio.sleep(3)
        assert sorted(probe.probed) == sorted(n.key for n in nodes)
        cluster.update(nodes[1:])                # nodes[0] left: its probe with it
        del probe.probed[:]
        await asyncio.sleep(4)                   # two more rounds of the others
        assert sorted(probe.probed) == sorted([nodes[1].key, nodes[2].key] * 2)
        cluster.close()
        del probe.probed[:]
        await asyncio.sleep(10)
        assert probe.probed == [] and not cluster._probes
        cluster.degrade(nodes[1])                # closed: no probe starts any more
        assert not cluster._probes
    run_virtual(main())


def test_a_failfast_client_loses_one_call_to_a_static_host_that_is_down(monkeypatch):
    """A node of static ``hosts`` that is down: the call that finds it down fails
    (failfast), and no call after it: the client probes the node's connect in the
    background (every DEGRADE_SECONDS), and once a server listens there again it
    takes calls again, with no call failed on the way."""
    from octo_core.cluster import invoker
    monkeypatch.setattr(invoker, "DEGRADE_SECONDS", 0.1)

    async def main():
        with refusing_port() as dead:
            port = dead.getsockname()[1]
            async with echo_servers([NamedEcho("s0")]) as servers, \
                    AsyncClient(Echo, appkey=CALLER, lb="roundrobin", timeout=2.0,
                                hosts=[servers[0].address, f"127.0.0.1:{port}"]) as client:
                outcomes = []
                for i in range(40):
                    outcomes.append(await outcome(client.echo(f"call {i}")))
                    await asyncio.sleep(0.02)
                failed = [o for o in outcomes if isinstance(o, Exception)]
                assert len(failed) == 1 and isinstance(failed[0], TransportError), failed
                dead.close()
                revived = octo_core.Server(CALLEE, "127.0.0.1", port)
                revived.add_service(Echo, NamedEcho("s1"))
                await revived.start()
                try:
                    answers: List[str] = []
                    while not any(a.startswith("s1:") for a in answers):
                        answers.append(await client.echo("again"))   # (none may fail)
                        await asyncio.sleep(0.02)
                finally:
                    await revived.stop(grace=1.0)
    run(main(), timeout=30)


def test_a_client_collected_unclosed_stops_probing(monkeypatch):
    """The probe keeps no client alive, and a collected client's probes end with it."""
    from octo_core.cluster import invoker
    monkeypatch.setattr(invoker, "DEGRADE_SECONDS", 0.05)

    async def main():
        with refusing_port() as dead:
            client = AsyncClient(Echo, appkey=CALLER, timeout=2.0,
                                 hosts=[f"127.0.0.1:{dead.getsockname()[1]}"])
            assert isinstance(await outcome(client.echo("x")), TransportError)
            cluster = client._cluster
            assert cluster._probes                   # probing the node
            with pytest.warns(ResourceWarning):
                del client
                # (on 3.12 the failed call's exception, and through its traceback's
                # frames the client, stay reachable until the loop has run once more)
                await asyncio.sleep(0)
                gc.collect()
                await asyncio.sleep(0.2)
            assert not cluster._probes
    run(main(), timeout=30)


# --- routing tiers and node health ------------------------------------------------------------

def _tiered(policy: str = "failfast", **breaker: Any) -> Any:
    """A caller in IDC ``a``: one node there, two in IDC ``b`` of the same region."""
    nodes = [node("10.0.0.1", idc="a", region="r"), node("10.0.1.1", idc="b", region="r"),
             node("10.0.1.2", idc="b", region="r")]
    cluster = make_cluster(policy=policy, nodes=nodes, lb="random",
                           router=Router(Caller(appkey=CALLER, idc="a", region="r")),
                           breaker=breaker or None)
    return cluster, nodes


@pytest.mark.parametrize("policy", ["failfast", "failover"])
def test_a_tier_whose_circuits_are_open_fails_over_to_the_next_and_back(policy):
    """Envoy's locality failover: while the local node's breaker is open the region
    serves, and once a probe closes it the calls come home (the tiers stay: a tier
    all down is passed over call by call)."""
    async def main():
        clock = FakeClock()
        cluster, nodes = _tiered(policy, consecutive_failures=2, backoff_min=1.0, clock=clock)
        local = nodes[0].key
        routed = cluster.router.route()
        send = ScriptedSend({local: fail(lambda: CallTimeout("no reply"))})
        for _ in range(2):                                  # the local tier takes them
            await outcome(cluster.invoke(send, timeout=1.0))
        assert cluster.breaker(nodes[0]).state is BreakerState.OPEN
        del send.attempts[:]
        for _ in range(20):
            assert (await cluster.invoke(send, timeout=1.0)).startswith("ok from 10.0.1.")
        assert len(send) == 20
        clock.advance(1.3)                                  # the probe may go
        send.behaviours.clear()
        for _ in range(5):
            assert await cluster.invoke(send, timeout=1.0) == f"ok from {local}"
        assert cluster.router.route() == routed     # the same tiers throughout
    run_virtual(main())


def test_a_tier_whose_connections_are_degraded_fails_over_to_the_next():
    async def main():
        cluster, nodes = _tiered()
        send = ScriptedSend({nodes[0].key: fail(refused)})
        assert isinstance(await outcome(cluster.invoke(send, timeout=1.0)), TransportError)
        for _ in range(10):
            assert (await cluster.invoke(send, timeout=1.0)).startswith("ok from 10.0.1.")
        assert send.keys.count(nodes[0].key) == 1
    run_virtual(main())


@pytest.mark.parametrize("tags,place", [({SWIMLANE_KEY: "blue"}, {"swimlane": "blue"}),
                                        ({LITESET_KEY: "lite-a"}, {"cell": "lite-a"})],
                         ids=["lane to trunk", "LiteSet to center"])
def test_a_lane_or_cell_whose_circuits_are_open_falls_back(tags, place):
    async def main():
        nodes = [node("tagged", **place), node("trunk")]
        cluster = make_cluster(nodes=nodes, policy="failfast",
                               breaker=dict(consecutive_failures=1, clock=FakeClock()))
        send = ScriptedSend({nodes[0].key: fail(overload)})
        assert isinstance(await outcome(cluster.invoke(send, timeout=1.0, tags=tags)), RpcError)
        for _ in range(5):
            assert await cluster.invoke(send, timeout=1.0, tags=tags) == "ok from trunk:9000"
    run_virtual(main())


def test_failover_retries_in_the_next_tier_once_the_first_is_all_tried():
    async def main():
        cluster, nodes = _tiered("failover", **NO_BREAKER)
        send = ScriptedSend({nodes[0].key: fail(overload)})
        assert (await cluster.invoke(send, timeout=1.0)).startswith("ok from 10.0.1.")
        assert send.keys[0] == nodes[0].key and len(send) == 2
    run_virtual(main())


def test_a_retry_in_panic_mode_still_goes_to_a_node_not_yet_tried():
    """The only other node degraded, failover's retry takes it (panic mode), never
    the node that just failed."""
    async def main():
        tried, degraded = numbered_nodes(2)
        cluster = make_cluster(nodes=[tried, degraded], policy="failover", retries=1,
                               lb="random", breaker=NO_BREAKER)
        cluster.degrade(degraded)
        for _ in range(20):
            send = ScriptedSend({tried.key: fail(overload)})
            assert await cluster.invoke(send, timeout=1.0) == f"ok from {degraded.key}"
            assert send.keys == [tried.key, degraded.key]
    run_virtual(main())


def test_with_every_tier_open_panic_mode_still_prefers_the_first():
    async def main():
        cluster, nodes = _tiered(consecutive_failures=1, clock=FakeClock())
        for n in nodes:
            cluster.breaker(n).record(False)
        error = await outcome(cluster.invoke(ScriptedSend(), timeout=1.0))
        assert isinstance(error, DegradeError) and error.node == nodes[0].key
    run_virtual(main())


# --- selection --------------------------------------------------------------------------------------

def test_no_node_raises_no_route_error():
    async def main():
        cluster = make_cluster(nodes=[])
        with pytest.raises(NoRouteError):
            await cluster.invoke(ScriptedSend(), timeout=1.0)
        set_caller = make_cluster(
            router=Router(Caller(cell="set-1", set_routing=True)),
            nodes=[node("c"), node("s2", cell="set-2")])
        send = ScriptedSend()
        with pytest.raises(NoRouteError):
            await set_caller.invoke(send, timeout=1.0)
        assert len(send) == 0
    run_virtual(main())


@pytest.mark.parametrize("policy", ["failfast", "failover", "forking", "hedging"])
def test_a_call_that_finds_no_node_says_why_under_every_policy(policy):
    """The router's reason (a Set caller with no node in its Set), not a generic
    one: forking and hedging too, though they ask for nodes their own way."""
    async def main():
        cluster = make_cluster(policy=policy, router=Router(Caller(cell="set-1", set_routing=True)),
                               nodes=[node("c"), node("s2", cell="set-2")])
        with pytest.raises(NoRouteError, match="none in Set 'set-1'"):
            await cluster.invoke(ScriptedSend(), timeout=1.0, idempotent=True)
    run_virtual(main())


def test_tags_route_the_call():
    async def main():
        nodes = [node("trunk"), node("lane", swimlane="blue"), node("cell", cell="lite-a")]
        cluster = make_cluster(nodes=nodes, lb="random")
        for tags, expected in (({}, "trunk"), ({SWIMLANE_KEY: "blue"}, "lane"),
                               ({LITESET_KEY: "lite-a"}, "cell")):
            send = ScriptedSend()
            for _ in range(10):
                await cluster.invoke(send, timeout=1.0, tags=tags)
            assert set(send.keys) == {f"{expected}:9000"}
    run_virtual(main())


def test_what_is_kept_for_nodes_lanes_and_cells_goes_when_they_leave():
    """Deploys that bring new nodes (new addresses, a lane or a LiteSet cell per
    feature) for years must not leave breakers, health marks or balancers behind:
    each would be kept, and walked by every call, for the client's life."""
    async def main():
        cluster = make_cluster(nodes=[node("trunk")], lb="random", policy="failfast",
                               breaker=dict(consecutive_failures=1))
        for release in range(20):
            here = [node("trunk"), node(f"lane-{release}", swimlane=f"blue-{release}"),
                    node(f"cell-{release}", cell=f"lite-{release}")]
            cluster.update(here)
            for tags in ({SWIMLANE_KEY: f"blue-{release}"}, {LITESET_KEY: f"lite-{release}"}):
                await outcome(cluster.invoke(ScriptedSend(default=fail(overload)), timeout=1.0,
                                             tags=tags))
            cluster.degrade(here[0])
            assert cluster._unhealthy == {f"lane-{release}:9000", f"cell-{release}:9000"}
        cluster.update(here)    # the same list again: nothing of it is forgotten
        assert set(cluster._breakers) == {"lane-19:9000", "cell-19:9000"}
        assert cluster._unhealthy == {"lane-19:9000", "cell-19:9000"}
        assert set(cluster._degraded) == {"trunk:9000"}
        assert set(cluster._balancers) == {("", "blue-19"), ("lite-19", "")}

        cluster.update([node("trunk")])
        assert not cluster._breakers and not cluster._unhealthy and not cluster._balancers
        # an attempt on a node chosen just before it left keeps nothing of it either
        cluster.breaker(node("lane-19")).record(False)
        cluster.degrade(node("lane-19"))
        assert not cluster._breakers and set(cluster._degraded) == {"trunk:9000"}
    run_virtual(main())


def test_distinct_routing_tags_do_not_grow_memory_without_bound():
    """Swimlane and LiteSet tags arrive in the ``globalContext`` of incoming requests
    and are passed on by every handler's outbound calls, so their values are chosen
    by remote callers. Calls tagged with 1000 different lanes that have no node
    (all served by the trunk) must not leave 1000 routing answers and balancers behind.
    """
    import gc
    import tracemalloc

    async def grown(distinct: bool) -> float:
        cluster = make_cluster(100, lb="random")
        send = ScriptedSend()
        await cluster.invoke(send, timeout=1.0)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(1000):
                lane = f"lane-{i}" if distinct else "lane"
                await cluster.invoke(send, timeout=1.0, tags={SWIMLANE_KEY: lane})
            send.attempts.clear()
            gc.collect()
            return (tracemalloc.get_traced_memory()[0] - before) / 1e6
        finally:
            tracemalloc.stop()

    same = run_virtual(grown(False))
    distinct = run_virtual(grown(True))
    assert distinct < same + 2.0, (f"1000 distinct unknown lanes kept {distinct:.1f} MB "
                                   f"(one lane: {same:.2f} MB)")


def test_consistent_hash_key_sticks_to_a_node_and_fails_over_elsewhere():
    async def main():
        cluster = make_cluster(10, lb="consistenthash", breaker=NO_BREAKER)
        where = {}
        for key in (f"user-{i}" for i in range(50)):
            send = ScriptedSend()
            for _ in range(3):
                await cluster.invoke(send, timeout=1.0, key=key)
            assert len(set(send.keys)) == 1
            where[key] = send.keys[0]
        assert len(set(where.values())) > 3
        home = where["user-7"]
        send = ScriptedSend({home: fail(overload)})
        assert await cluster.invoke(send, timeout=1.0, key="user-7") != f"ok from {home}"
        assert send.keys[0] == home and len(send) == 2
    run_virtual(main())


def test_a_new_node_list_keeps_the_balancer_and_its_cache():
    async def main():
        nodes = numbered_nodes(3)
        cluster = make_cluster(nodes=nodes)
        cluster.select({}, None, set())
        balancer = cluster._balancers[("", "")][1]
        cluster.update(nodes[:2])
        seen = {cluster.select({}, None, set())[0].key for _ in range(10)}
        assert seen == {n.key for n in nodes[:2]}
        assert cluster._balancers[("", "")][1] is balancer
    run_virtual(main())


def test_route_rules_apply_through_the_cluster():
    async def main():
        nodes = numbered_nodes(4)
        cluster = make_cluster(nodes=nodes, router=Router(Caller(ip="192.168.0.5")))
        cluster.update(nodes, [RouteRule(id="r", providers=(nodes[3].key,),
                                         consumer_ips=("192.168.*",), limit=True)])
        send = ScriptedSend()
        for _ in range(5):
            await cluster.invoke(send, timeout=1.0)
        assert set(send.keys) == {nodes[3].key}
    run_virtual(main())


# --- end to end: AsyncClient + Servers on 127.0.0.1 -------------------------------------------------

def test_client_options_reach_the_cluster_and_router():
    async def main():
        budget = RetryBudget(ratio=0.2)
        async with AsyncClient(Echo, appkey=CALLER, hosts=["127.0.0.1:1", "127.0.0.1:2"],
                               lb="leastrequest", cluster="hedging", retries=4, forks=3,
                               hedge_delay=0.02, cell="gz-set1", set_routing=True, idc="gz1",
                               region="south", locality="region", locality_threshold=0.8,
                               caller_ip="10.9.8.7",
                               retry_budget=budget, breaker={"consecutive_failures": 9}) as client:
            cluster = client._cluster
            assert cluster.router.caller == Caller(appkey=CALLER, ip="10.9.8.7", cell="gz-set1",
                                                   set_routing=True, idc="gz1", region="south")
            assert (cluster.router.locality, cluster.router.locality_threshold) == ("region", 0.8)
            assert (cluster.policy, cluster.retries, cluster.forks, cluster.hedge_delay) == (
                "hedging", 4, 3, 0.02)
            assert cluster.budget is budget
            assert cluster.breaker(cluster.router.nodes[0]).consecutive_failures == 9
            assert {n.key for n in cluster.router.nodes} == {"127.0.0.1:1", "127.0.0.1:2"}
        # without caller_ip, route rules match the address of the default route
        async with AsyncClient(Echo, appkey=CALLER, hosts=["127.0.0.1:1"]) as plain:
            assert plain._cluster.router.caller.ip == (default_route_ip() or
                                                       default_route_ip(ipv6=True) or "")
        with pytest.raises(ValueError):
            AsyncClient(Echo, appkey=CALLER, hosts=["127.0.0.1:1"], cluster="retry-forever")
        with pytest.raises(ValueError):
            AsyncClient(Echo, appkey=CALLER, hosts=["127.0.0.1:1"], locality="planet")
        with pytest.raises(ValueError, match="locality_threshold"):
            AsyncClient(Echo, appkey=CALLER, hosts=["127.0.0.1:1"], locality_threshold=1.5)
    run(main(), timeout=10)


def test_e2e_failover_survives_a_stopped_and_a_killed_server():
    async def main():
        handlers = [NamedEcho("s0"), NamedEcho("s1")]
        async with echo_servers(handlers) as servers, doomed_server("s2") as doomed:
            hosts = [s.address for s in servers] + [f"127.0.0.1:{doomed.port}"]
            async with AsyncClient(Echo, appkey=CALLER, hosts=hosts, lb="roundrobin",
                                   cluster="failover", idempotent=True, timeout=2.0) as client:
                warm = {(await client.echo("warm")).split(":")[0] for _ in range(9)}
                assert warm == {"s0", "s1", "s2"}
                errors: List[BaseException] = []
                answered: List[str] = []

                async def worker(w: int) -> None:
                    for i in range(40):
                        if w == 0 and i == 10:
                            doomed.kill()                       # SIGKILL: no goodbye
                        if w == 1 and i == 20:
                            await servers[1].stop(grace=2.0)    # graceful stop
                        try:
                            answered.append(await client.echo(f"{w}-{i}"))
                        except Exception as exc:  # noqa: BLE001
                            errors.append(exc)
                        await asyncio.sleep(0.002)

                await asyncio.gather(*(worker(w) for w in range(6)))
                assert errors == [], errors[:3]
                assert len(answered) == 240
                tail = [await client.echo("after") for _ in range(10)]
                assert all(t.startswith("s0:") for t in tail)
    run(main(), timeout=30)


def test_e2e_failfast_caller_does_see_the_dead_server():
    """The contrast that shows the failover test exercises something."""
    async def main():
        async with echo_servers([NamedEcho("s0")]) as servers, doomed_server("s1") as doomed:
            hosts = [servers[0].address, f"127.0.0.1:{doomed.port}"]
            async with AsyncClient(Echo, appkey=CALLER, hosts=hosts, lb="roundrobin",
                                   timeout=2.0) as client:
                doomed.kill()
                await doomed.wait()
                results = [await outcome(client.echo("x")) for _ in range(4)]
                assert any(isinstance(r, TransportError) for r in results)
    run(main(), timeout=30)


@pytest.mark.parametrize("option,value", [("hash_arg", "text"), ("hash_header", "uid")])
def test_e2e_consistent_hash_sends_the_same_key_to_the_same_server(option, value):
    """The key is an argument (``hash_arg``) or a globalContext value the caller
    sets (``hash_header``: a user id, say, whatever the arguments)."""
    async def call(client: AsyncClient, key: str, round_: int) -> str:
        if option == "hash_arg":
            return await client.echo(key)
        with octo_core.context.use({value: key}):
            return await client.echo(f"round {round_}")

    async def main():
        handlers = [NamedEcho(f"s{i}") for i in range(3)]
        async with echo_servers(handlers) as servers:
            async with AsyncClient(Echo, appkey=CALLER, hosts=[s.address for s in servers],
                                   lb="consistenthash", timeout=2.0, **{option: value}) as client:
                home = {}
                for round_ in range(3):
                    for k in range(30):
                        server = (await call(client, f"key-{k}", round_)).split(":")[0]
                        assert home.setdefault(k, server) == server, (k, round_)
                assert len(set(home.values())) >= 2
                assert sum(h.calls for h in handlers) == 90
    run(main(), timeout=30)


def test_a_node_that_says_it_is_stopping_gets_no_new_calls_from_static_hosts():
    """A stopping server tells its unified peers (the close notice, status
    STOPPING). A client of static ``hosts`` has no registry to learn it from:
    it took the notice for its connection only, and its next call to the node
    met the closed listener (failfast: a failed call). The node is now
    degraded at the notice, and the calls go to the others."""
    async def main():
        handlers = [NamedEcho("s0"), NamedEcho("s1")]
        async with echo_servers(handlers) as servers:
            async with AsyncClient(Echo, appkey=CALLER, hosts=[s.address for s in servers],
                                   lb="roundrobin", timeout=2.0) as client:
                for i in range(4):   # a connection to each
                    await client.echo(f"warm {i}")
                stopping = servers[0]
                await stopping.stop(grace=1.0)   # returns once its peers have left
                (key,) = [n.key for n in client._cluster.router.nodes
                          if n.address == stopping.address]
                assert key in client._cluster._degraded
                answers = [await client.echo(f"after {i}") for i in range(10)]
                assert all(answer.startswith("s1:") for answer in answers), answers
    run(main(), timeout=30)


FRONT = "com.example.cluster.front"
BACK = "com.example.cluster.back"
PLACES = [("trunk", {}), ("blue", {"swimlane": "blue"}), ("lite", {"cell": "lite-a"})]


def test_e2e_swimlane_and_liteset_tags_stay_on_their_lane_across_two_hops():
    async def main():
        url = f"memory://cluster-e2e-{uuid.uuid4().hex}"
        async with AsyncClient(Echo, appkey=FRONT, registry=url, remote_appkey=BACK,
                               timeout=2.0) as to_back:
            back = [NamedEcho(f"B-{name}") for name, _ in PLACES]
            front = [NamedEcho(f"A-{name}", downstream=to_back) for name, _ in PLACES]
            fields = [f for _, f in PLACES]
            async with echo_servers(back, appkey=BACK, registry=url, nodes=fields), \
                    echo_servers(front, appkey=FRONT, registry=url, nodes=fields):
                async with AsyncClient(Echo, appkey=CALLER, registry=url, remote_appkey=FRONT,
                                       timeout=2.0) as client:
                    cases = [({}, "A-trunk>B-trunk:x"),
                             ({SWIMLANE_KEY: "blue"}, "A-blue>B-blue:x"),
                             ({LITESET_KEY: "lite-a"}, "A-lite>B-lite:x"),
                             ({SWIMLANE_KEY: "red"}, "A-trunk>B-trunk:x"),      # no such lane
                             ({LITESET_KEY: "lite-z"}, "A-trunk>B-trunk:x")]    # no such cell
                    for tags, expected in cases:
                        for _ in range(3):
                            with octo_core.context.use(tags):
                                assert await client.echo("x") == expected, tags
                    assert await client.echo("x") == "A-trunk>B-trunk:x"   # the block ended
                # A Set caller: the callee has Set nodes (cell lite-a), so its own cell or nothing.
                async with AsyncClient(Echo, appkey=CALLER, registry=url, remote_appkey=FRONT,
                                       cell="lite-a", set_routing=True, timeout=2.0) as in_set, \
                        AsyncClient(Echo, appkey=CALLER, registry=url, remote_appkey=FRONT,
                                    cell="gz-set9", set_routing=True, timeout=2.0) as elsewhere:
                    assert await in_set.echo("x") == "A-lite>B-trunk:x"
                    with pytest.raises(NoRouteError):
                        await elsewhere.echo("x")
        blue = back[1].contexts
        assert blue and all(c.get(SWIMLANE_KEY) == "blue" for c in blue)
        assert all(c.get(LITESET_KEY) == "lite-a" for c in back[2].contexts)
    run(main(), timeout=30)


STORE_IDL = """
struct Item { 1: required string name }
service Store { string put(1: Item item) }
"""


class Store:
    """A ``Store`` handler that counts the calls that reach it."""

    def __init__(self) -> None:
        self.calls = 0

    async def put(self, item: Any) -> str:
        self.calls += 1
        return item.name


def test_e2e_a_request_the_server_refuses_as_malformed_opens_no_breaker(tmp_path):
    """A request missing a required field is refused by every server (status 5):
    the caller's mistake, so it is not retried and the next valid call goes through."""
    idl_path = tmp_path / "store.thrift"
    idl_path.write_text(STORE_IDL)
    store = octo_core.load_idl(str(idl_path), module_name="octo_cluster_store_thrift")

    async def main():
        handlers = [Store() for _ in range(3)]
        servers = [octo_core.Server(appkey="com.example.cluster.store", port=0) for _ in handlers]
        try:
            for server, handler in zip(servers, handlers):
                server.add_service(store.Store, handler)
                await server.start()
            async with AsyncClient(store.Store, appkey=CALLER, hosts=[s.address for s in servers],
                                   cluster="failover", idempotent=True, timeout=2.0,
                                   breaker={"consecutive_failures": 2}) as client:
                for _ in range(6):
                    with pytest.raises(ProtocolError, match="required field"):
                        await client.put(store.Item(name=None))
                assert sum(h.calls for h in handlers) == 0
                breakers = client._cluster._breakers.values()
                assert all(b.state is BreakerState.CLOSED for b in breakers)
                assert await client.put(store.Item(name="valid")) == "valid"
        finally:
            for server in servers:
                await server.stop(grace=1.0)
    run(main(), timeout=20)


def test_a_node_whose_last_call_failed_after_it_left_is_called_again_when_it_returns():
    """A call still running on a node that leaves may fail after (opening the breaker
    it had): that breaker is the departed node's, and must not mark the node down
    for routing, or the node, listed again, would never be called."""
    async def main() -> None:
        cluster = make_cluster(1, policy="failfast", breaker=dict(consecutive_failures=1))
        [node] = cluster.router.nodes
        late = ScriptedSend(default=fail(overload, after=1.0))
        call = asyncio.ensure_future(cluster.invoke(late, timeout=5.0))
        await asyncio.sleep(0.5)
        cluster.update([])                          # the node leaves, its call running
        with pytest.raises(RpcError):
            await call                              # ... which fails after it left
        cluster.update([node])                      # listed again
        assert await cluster.invoke(ScriptedSend(), timeout=5.0) == f"ok from {node.key}"
    run_virtual(main())
