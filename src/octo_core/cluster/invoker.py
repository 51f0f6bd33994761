"""Fault tolerance: what a call does when a node fails.

``Cluster.invoke`` routes (``Router``), balances, and runs one policy:

- ``failfast``: one attempt (the default, as in OCTO);
- ``failover``: up to ``retries`` more attempts, each on a node not yet tried,
  only for idempotent methods or when the request provably was not executed;
- ``failsafe``: one attempt; a failure is logged and the call returns ``None``;
- ``forking``: ``forks`` attempts at once on different nodes, the first answer wins;
- ``hedging``: a backup attempt on another node if no answer came within
  ``hedge_delay``; the first answer wins.

Every retry, fork and hedge draws on the ``RetryBudget``. The deadline is fixed
when the call starts; each attempt gets only the time that is left. Breakers
and degraded connections exclude nodes per call, so the routing cache survives
their flips.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Dict, Mapping, Optional, Sequence, Set, Tuple

from octo_core.cluster.balancer import make_balancer
from octo_core.cluster.breaker import BreakerState, CircuitBreaker, RetryBudget
from octo_core.cluster.routing import NoRouteError, RouteRule, Router, Weighted
from octo_core.errors import (CallTimeout, DegradeError, EncodeError, OctoError, ProtocolError,
                              RpcError, ServiceError, TransportError)
from octo_core.registry.node import Node

log = logging.getLogger("octo_core.cluster")

POLICIES = ("failfast", "failover", "failsafe", "forking", "hedging")

Send = Callable[[Node, float], Awaitable[Any]]


def node_failed(exc: BaseException) -> bool:
    """Does ``exc`` say something about the node's health (not the business logic,
    nor the caller's own values: an ``EncodeError`` is raised before anything is sent)?"""
    return (isinstance(exc, (TransportError, RpcError, ProtocolError, ServiceError, DegradeError))
            and not isinstance(exc, EncodeError))


def not_executed(exc: BaseException) -> bool:
    """Did the request provably not run? Then any method may be retried elsewhere."""
    if isinstance(exc, (RpcError, DegradeError, ServiceError)):
        return True   # refused before the handler ran: overload, stopping, circuit, no such service
    return isinstance(exc, TransportError) and not getattr(exc, "request_sent", True)


class Cluster:
    """The nodes of one callee, and how calls are spread and retried over them."""

    def __init__(self, router: Router, *, lb: str = "random",
                 lb_options: Optional[Mapping[str, Any]] = None, policy: str = "failfast",
                 retries: int = 2, forks: int = 2, hedge_delay: float = 0.05,
                 budget: Optional[RetryBudget] = None,
                 breaker_options: Optional[Mapping[str, Any]] = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"cluster policy must be one of {', '.join(POLICIES)}")
        self.router = router
        self.policy = policy
        self.retries = max(0, retries)
        self.forks = max(1, forks)
        self.hedge_delay = hedge_delay
        self.budget = budget or RetryBudget()
        self._lb = lb
        self._lb_options = dict(lb_options or {})
        self._balancers: Dict[Tuple[str, str], list] = {}   # route tags -> [answer, balancer]
        self._breaker_options = dict(breaker_options or {})
        self._breakers: Dict[str, CircuitBreaker] = {}
        self._unhealthy: Set[str] = set()          # breaker not closed
        self._degraded: Dict[str, float] = {}      # connect failed: key -> retry time
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def update(self, nodes: Sequence[Node], rules: Sequence[RouteRule] = ()) -> None:
        """New nodes or rules from discovery (balancer state is kept per node key)."""
        self.router.update(nodes, rules)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the calls run on, looked up once: on CPython 3.11 every
        get_running_loop() is a getpid() system call, and this is the per-call path."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    # --- health ------------------------------------------------------------------------

    def breaker(self, node: Node) -> CircuitBreaker:
        breaker = self._breakers.get(node.key)
        if breaker is None:
            breaker = self._breakers[node.key] = CircuitBreaker(
                on_change=lambda b, key=node.key: self._breaker_changed(key, b),
                **self._breaker_options)
        return breaker

    def _breaker_changed(self, key: str, breaker: CircuitBreaker) -> None:
        if breaker.state is BreakerState.CLOSED:
            self._unhealthy.discard(key)
        else:
            self._unhealthy.add(key)

    def degrade(self, node: Node, retry_in: float = 2.0) -> None:
        """OCTO's connection degrade: no calls to ``node`` for ``retry_in`` seconds."""
        self._degraded[node.key] = self._running_loop().time() + retry_in

    def _excluded(self, tried: Set[str]) -> Set[str]:
        if not self._unhealthy and not self._degraded:
            return tried
        excluded = set(tried)
        for key in self._unhealthy:
            breaker = self._breakers[key]
            if not breaker.available():
                excluded.add(key)
        if self._degraded:
            now = self._running_loop().time()
            for key, until in list(self._degraded.items()):
                if until <= now:
                    del self._degraded[key]
                else:
                    excluded.add(key)
        return excluded

    # --- selection ---------------------------------------------------------------------

    def _balancer(self, tag_key: Tuple[str, str], routed: Weighted) -> Any:
        """The balancer for calls with these routing tags, fed the latest routing answer.

        One balancer per (LiteSet, swimlane) for the client's life: when the
        answer changes it is updated, and what it learned about surviving nodes
        (in-flight calls, latencies) stays.
        """
        entry = self._balancers.get(tag_key)
        if entry is None:
            balancer = make_balancer(self._lb, **self._lb_options)
            balancer.update(routed.nodes, routed.weights)
            entry = self._balancers[tag_key] = [routed, balancer]
        elif entry[0] is not routed:     # the router's answer changed (new nodes, warm-up)
            entry[1].update(routed.nodes, routed.weights)
            entry[0] = routed
        return entry[1]

    def select(self, tags: Mapping[str, str], key: Any, tried: Set[str]) -> Tuple[Node, Any]:
        """A node for the next attempt, and the balancer that chose it."""
        tag_key = self.router.tag_key(tags)
        routed = self.router.route_for(tag_key)
        if not routed.nodes:
            raise NoRouteError("no node is available for this call")
        excluded = self._excluded(tried)
        balancer = self._balancer(tag_key, routed)
        node = balancer.select(key=key, exclude=excluded or None)
        if node is None and len(excluded) > len(tried):
            # Panic mode: every healthy choice is gone, so health stops steering and
            # the attempt itself says why the node cannot be used (open breaker,
            # connect backoff) -- one node degraded must not mean no calls at all.
            node = balancer.select(key=key, exclude=tried or None)
        if node is None:
            raise NoRouteError("no node left to try")
        return node, balancer

    # --- invocation --------------------------------------------------------------------

    async def invoke(self, send: Send, *, timeout: float, idempotent: bool = False,
                     tags: Mapping[str, str] = {}, key: Any = None) -> Any:  # noqa: B006
        """Run ``send(node, remaining_seconds)`` under the cluster's policy."""
        deadline = self._running_loop().time() + timeout
        self.budget.record_request()
        if self.policy == "forking":
            return await self._race(send, deadline, tags, key, self.forks, 0.0)
        if self.policy == "hedging":
            return await self._race(send, deadline, tags, key, 2, self.hedge_delay)
        attempts = 1 + self.retries if self.policy == "failover" else 1
        tried: Set[str] = set()
        failure: Optional[Exception] = None     # the last attempt's, once a retry is wanted
        while True:
            try:
                node, balancer = self.select(tags, key, tried)
            except NoRouteError:
                if failure is not None:
                    raise failure from None       # out of nodes: the real error, not routing's
                raise
            if failure is not None:
                if not self.budget.try_retry():   # spent only when a retry is really sent
                    raise failure
                log.info("retrying on %s after: %s", node.key, failure)
            tried.add(node.key)
            try:
                return await self._attempt(send, node, balancer, deadline)
            except Exception as exc:
                if self.policy == "failsafe":
                    log.warning("failsafe call to %s failed: %s", node.key, exc)
                    return None
                if not (len(tried) < attempts and node_failed(exc)
                        and (idempotent or not_executed(exc))):
                    raise
                failure = exc

    async def _attempt(self, send: Send, node: Node, balancer: Any, deadline: float) -> Any:
        remaining = deadline - self._loop.time()
        if remaining <= 0:
            raise CallTimeout("the call's deadline passed before this attempt", node=node.key)
        breaker = self.breaker(node)
        if not breaker.allows():
            raise DegradeError("circuit open", node=node.key)
        learns = balancer.learns
        if learns:
            balancer.on_start(node)
            started = time.perf_counter()   # loop.time() is too coarse under uvloop for LALB
        served = True                   # for the balancer: did the node serve this call?
        health: Optional[bool] = True   # for the breaker; None when it is not its business
        try:
            return await send(node, remaining)
        except asyncio.CancelledError:
            health = None               # a lost race (hedge, fork) says nothing of the node
            raise
        except Exception as exc:
            served = health = not node_failed(exc)
            if isinstance(exc, TransportError) and not isinstance(exc, CallTimeout):
                # The connection failed (refused, or lost with every call on it): the
                # node is degraded for a while -- one event, not N breaker failures.
                # Breakers judge how the node answers: timeouts, overload, bad replies.
                self.degrade(node)
                health = None
            raise
        finally:
            if health is not None:
                breaker.record(health)
            elif breaker.state is BreakerState.HALF_OPEN:
                breaker.record(False)   # the probe proved nothing; probe again later
            if learns:
                balancer.on_finish(node, time.perf_counter() - started, served)

    async def _race(self, send: Send, deadline: float, tags: Mapping[str, str], key: Any,
                    width: int, delay: float) -> Any:
        """Forking (``delay`` 0) and hedging: up to ``width`` attempts, first answer wins."""
        loop = self._loop
        tried: Set[str] = set()
        running: Set[asyncio.Task] = set()
        last: Optional[BaseException] = None

        def launch(extra: bool) -> bool:
            """Start one more attempt; an extra one (a fork or hedge) pays from the
            budget, and only once a node is there to send it to."""
            nonlocal last
            try:
                node, balancer = self.select(tags, key, tried)
            except OctoError as exc:
                last = last or exc
                return False
            if extra and not self.budget.try_retry():
                return False
            tried.add(node.key)
            running.add(loop.create_task(self._attempt(send, node, balancer, deadline)))
            return True

        launch(False)
        try:
            while running:
                extra = len(tried) < width
                if extra and not delay:
                    if launch(True):
                        continue
                    width = extra = False       # no fork to send: wait for what runs
                wait = min(delay, deadline - loop.time()) if extra else None
                done, _ = await asyncio.wait(running, timeout=wait,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    if not launch(True):
                        width = len(tried)      # no backup to send: wait for what runs
                    continue
                for task in done:
                    running.discard(task)
                    exc = task.exception()
                    if exc is None or not node_failed(exc):
                        return task.result()
                    last = exc
            raise last if last is not None else NoRouteError("no node to try")
        finally:
            for task in running:
                task.cancel()
