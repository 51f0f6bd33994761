"""Fault tolerance: what a call does when a node fails.

``Cluster.invoke`` routes (``Router``), balances, and runs one policy:

- ``failfast``: one attempt (the default, as in OCTO);
- ``failover``: up to ``retries`` more attempts, each on a node not yet tried,
  only for idempotent methods or when the request provably was not executed;
  an attempt whose request never left (the node refused the connection) is
  given back, and its retry draws no budget: it loaded no server, and a call
  must not fail for meeting more dead nodes than it has retries while a live
  one is listed. A call gets back at most as many as it may make, and none on
  a node already known dead (tried when no other is left): an outage costs a
  call its retries, not a walk over every node. Forking and hedging give back
  the same way;
- ``failsafe``: one attempt; a failure on the way (a node's fault, or no node
  to call: ``node_failed``) is logged and the call returns ``None``; an answer
  (a declared exception, the handler's own error) and the caller's own mistakes
  are raised, as under failfast;
- ``forking``: ``forks`` attempts at once on different nodes, the first answer wins;
- ``hedging``: a backup attempt on another node if no answer came within
  ``hedge_delay``, or at once when the first attempt fails (gRPC A6, brpc's
  backup request); the first answer wins.

Forking and hedging send extra copies of idempotent methods only (as gRPC
allows hedging only for them): a method that is not idempotent gets one copy
at a time, and another node only when the request provably was not executed
(up to ``forks`` or 2 attempts).

Every retry, fork and hedge draws on the ``RetryBudget``, and only when it is
really sent (not one that replaces an attempt given back). The deadline is
fixed when the call starts; each attempt gets only the time that is left, and
none is sent once it has passed: the caller gets the last real failure.
Breakers and degraded connections exclude nodes per call, so the routing cache
survives their flips; when they leave no node of the preferred routing tier,
the call goes to the next one (``Weighted.fallback``).
Only node faults count against a node (``node_failed``): never the caller's own
mistakes, such as a request the server refused as malformed.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import (AbstractSet, Any, Awaitable, Callable, Dict, FrozenSet, List, Mapping, Optional,
                    Sequence, Set, Tuple)

from octo_core.cluster.balancer import make_balancer
from octo_core.cluster.breaker import (_CLOSED, _HALF_OPEN, BreakerState, CircuitBreaker,
                                      RetryBudget, breaker_options as _breaker_options)
from octo_core.cluster.routing import _NO_TAGS, NoRouteError, RouteRule, Router, Weighted
from octo_core.errors import (CallTimeout, ClientClosed, DegradeError, EncodeError, OctoError,
                              ProtocolError, RpcError, ServiceError, TransportError)
from octo_core.registry.node import Node
from octo_core.tasks import outcome_seen
from octo_core.throttle import Throttle

log = logging.getLogger("octo_core.cluster")
#: What an outage makes a client log on every call it makes (a failsafe call that
#: failed or found no node; a retry), each kind for each node once a period, the
#: rest counted in the next: a node down under load would log every call.
_FAILSAFE = Throttle(10.0, log)
_RETRYING = Throttle(10.0, log, logging.INFO)

POLICIES = ("failfast", "failover", "failsafe", "forking", "hedging")

Send = Callable[[Node, float], Awaitable[Any]]
#: A client's connect-only check of a node (``Cluster(probe=...)``): raises when it cannot connect.
Probe = Callable[[Node], Awaitable[Any]]
#: ``begin``'s send: ``send(node, remaining_seconds, request)``, the call's own ``request``
#: handed to every attempt (a caller needs no callable of its own made per call).
SendRequest = Callable[[Node, float, Any], Awaitable[Any]]

#: Seconds a node whose connect failed is kept from calls before it is tried again (OCTO's 2 s).
DEGRADE_SECONDS = 2.0

#: No node tried yet (``select``'s ``tried`` for a call's only attempt; never added to).
_NONE_TRIED: FrozenSet[str] = frozenset()


def _send_alone(node: Node, remaining: float, send: Send) -> Awaitable[Any]:
    """``invoke``'s attempt: its ``send`` takes no request (``begin`` hands it over as one)."""
    return send(node, remaining)


def node_failed(exc: BaseException) -> bool:
    """Does ``exc`` say something about the node's health (not the business logic,
    nor the caller's own values)?

    A ``ProtocolError`` counts when this client could not read the node's reply
    (the node sent garbage); not for an ``EncodeError`` (raised before anything
    is sent), nor when the node itself reported status 5 (``from_peer``): it
    refused the request as malformed, which is the caller's mistake. Nor does
    ``ClientClosed``: the caller's own side cut the call short.
    """
    if isinstance(exc, ProtocolError):
        return not (isinstance(exc, EncodeError) or _from_peer(exc))
    return (isinstance(exc, (TransportError, RpcError, ServiceError, DegradeError))
            and not isinstance(exc, ClientClosed))


def _from_peer(exc: BaseException) -> bool:
    """Is ``exc`` the status the node put in its reply, rather than something this
    process saw? (Set by the client on the errors it makes from a reply's status.)"""
    return getattr(exc, "from_peer", False)


def _connection_failed(exc: BaseException) -> bool:
    """Did the connection fail (refused, or lost with every call on it)? A timeout
    is not that, nor a transport status the node reported in a reply."""
    return (isinstance(exc, TransportError) and not isinstance(exc, CallTimeout)
            and not _from_peer(exc))


def _given_back(exc: BaseException, known_dead: bool) -> bool:
    """Is a failed attempt given back to its call (module docstring)? When its request
    never left, the node's fault (a refused connect, not the caller's time running
    out), on a node not already known dead."""
    return not known_dead and _connection_failed(exc) and not getattr(exc, "request_sent", True)


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
                 breaker_options: Optional[Mapping[str, Any]] = None,
                 probe: Optional[Probe] = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"cluster policy must be one of {', '.join(POLICIES)}")
        self.router = router
        self.policy = policy
        self.retries = max(0, retries)
        self.forks = max(1, forks)
        self.hedge_delay = hedge_delay
        # One attempt after the other: failover's retries, or the copies forking and
        # hedging would send of a method that may not run twice.
        self._attempts_in_turn = {"failover": 1 + self.retries, "forking": self.forks,
                                  "hedging": 2}.get(policy, 1)
        # One attempt, and its failure is the call's (failfast; failover with no retries ...)
        self._one_attempt = self._attempts_in_turn == 1 and policy != "failsafe"
        self.budget = budget or RetryBudget()
        self._lb = lb
        self._lb_options = dict(lb_options or {})
        make_balancer(lb, **self._lb_options)   # an unknown kind or option: now, not at a call
        self._balancers: Dict[tuple, list] = {}   # route tags (+ tier) -> [answer, balancer]
        self._breaker_options = _breaker_options(breaker_options)   # now, not at a call
        self._breakers: Dict[str, CircuitBreaker] = {}
        self._unhealthy: Set[str] = set()          # breaker not closed
        self._degraded: Dict[str, float] = {}      # connect failed: key -> retry time
        self._reconnecting: Set[str] = set()       # degraded, one call trying it again now
        self._probe = probe
        self._probes: Dict[str, Any] = {}          # degraded key -> its probe's timer or task
        self._closed = False                       # no more probes
        self._listed: Set[str] = set()             # keys of the nodes discovery gave
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def update(self, nodes: Sequence[Node], rules: Sequence[RouteRule] = ()) -> None:
        """New nodes or rules from discovery (balancer state is kept per node key).

        What was kept for nodes, lanes and cells that left goes with them: a
        cluster that replaces its nodes for years holds only the ones it has."""
        self.router.update(nodes, rules)
        listed = self._listed = {node.key for node in nodes}
        for key in [key for key in self._breakers if key not in listed]:
            del self._breakers[key]
        self._unhealthy &= listed
        for key in [key for key in self._degraded if key not in listed]:
            del self._degraded[key]
        self._reconnecting &= listed
        for key in [key for key in self._probes if key not in listed]:
            self._probes.pop(key).cancel()
        for tier_key in [key for key in self._balancers if not self.router.routable(
                key[0] if isinstance(key[1], int) else key)]:
            del self._balancers[tier_key]

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the calls run on, looked up once: on CPython 3.11 every
        get_running_loop() is a getpid() system call, and this is the per-call path."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    # --- health ------------------------------------------------------------------------

    def breaker(self, node: Node) -> CircuitBreaker:
        """``node``'s circuit breaker, made on first use; kept only while the node
        is listed (a departed node's is a throwaway: it leaves no entry behind)."""
        breaker = self._breakers.get(node.key)
        if breaker is None:
            key = node.key
            breaker = CircuitBreaker(on_change=lambda b: self._breaker_changed(key, b),
                                     **self._breaker_options)
            if node.key in self._listed:   # (not one that left as its attempt was chosen)
                self._breakers[node.key] = breaker
        return breaker

    def _breaker_changed(self, key: str, breaker: CircuitBreaker) -> None:
        if self._breakers.get(key) is not breaker:
            return      # a node that left, its last calls finishing: nothing to route around
        if breaker.state is BreakerState.CLOSED:
            self._unhealthy.discard(key)
        else:
            self._unhealthy.add(key)
        self._tell_router()

    def degrade(self, node: Node, retry_in: Optional[float] = None) -> None:
        """OCTO's connection degrade: no calls to ``node`` until it connects again.

        With a ``probe`` (a client's: a connect alone) the node is tried every
        ``retry_in`` seconds in the background: no call is spent finding out that
        it is still down. Without one, the degrade ends after ``retry_in`` seconds.
        Once it ends, one call at a time tries the node (the others keep away
        until one is answered), so a connect that hangs, or a node that accepts
        and drops every call, holds up one call, not all of them. ``retry_in``
        defaults to ``DEGRADE_SECONDS``."""
        key = node.key
        if key not in self._listed:
            return
        if retry_in is None:
            retry_in = DEGRADE_SECONDS
        if self._probe is None:
            self._degraded[key] = self._running_loop().time() + retry_in
        elif key not in self._probes and not self._closed:   # (one probe a node at a time)
            self._degraded[key] = math.inf
            self._probes[key] = self._running_loop().call_later(
                retry_in, self._start_probe, node, retry_in)
        self._tell_router()

    def _start_probe(self, node: Node, retry_in: float) -> None:
        task = self._running_loop().create_task(self._probing(node, retry_in))
        self._probes[node.key] = task

    async def _probing(self, node: Node, retry_in: float) -> None:
        """One probe of a degraded node: it takes calls again, or is degraded anew.
        (Cancelled when the node leaves or the cluster closes.)"""
        assert self._probe is not None   # (degrade() starts probes only then)
        failure: Optional[Exception] = None
        try:
            await self._probe(node)
        except Exception as exc:
            failure = exc
        del self._probes[node.key]   # (not when cancelled: whoever cancelled it took it out)
        if failure is not None:
            log.debug("%s still does not connect: %s", node.key, failure)
            self.degrade(node, retry_in)
        elif node.key in self._degraded:
            # It connects, which says nothing of its answers: its degrade ends now, and
            # one call at a time tries it until one is answered (see _attempt), so a node
            # that accepts connections and drops every call loses one call, not all.
            self._degraded[node.key] = self._running_loop().time()

    def close(self) -> None:
        """Stop probing degraded nodes (the client closes)."""
        self._closed = True
        for probe in self._probes.values():
            probe.cancel()
        self._probes.clear()

    def _tell_router(self) -> None:
        """What this client knows of nodes that cannot take calls (breaker not
        closed, connect failing) goes into the router's locality shares: an IDC
        whose nodes crashed before the registry heard of it spills over as one
        the registry marks DEAD does."""
        self.router.set_down(self._unhealthy.union(self._degraded))

    def _excluded(self, tried: AbstractSet[str]) -> Set[str]:
        """``tried`` and the nodes health rules out now (some are unhealthy or degraded)."""
        excluded = set(tried)
        for key in self._unhealthy:
            breaker = self._breakers[key]
            if not breaker.available():
                excluded.add(key)
        if self._degraded:
            now = self._running_loop().time()
            for key, until in self._degraded.items():
                if until > now or key in self._reconnecting:
                    excluded.add(key)
        return excluded

    # --- selection ---------------------------------------------------------------------

    def _balancer(self, key: tuple, routed: Weighted) -> Any:
        """The balancer for one routing tier of calls with these tags, fed the
        latest routing answer (``key``: the tag key for the first tier, with the
        tier's depth for the next ones).

        One balancer per (LiteSet, swimlane) and tier for the client's life: when
        the answer changes it is updated, and what it learned about surviving
        nodes (in-flight calls, latencies) stays.
        """
        entry = self._balancers.get(key)
        if entry is None:
            balancer = make_balancer(self._lb, **self._lb_options)
            balancer.update(routed.nodes, routed.weights)
            entry = self._balancers[key] = [routed, balancer]
        elif entry[0] is not routed:     # the router's answer changed (new nodes, warm-up)
            entry[1].update(routed.nodes, routed.weights)
            entry[0] = routed
        return entry[1]

    def select(self, tags: Mapping[str, str], key: Any,
               tried: AbstractSet[str]) -> Tuple[Node, Any]:
        """A node for the next attempt, and the balancer that chose it."""
        router = self.router
        tag_key = router.tag_key(tags) if tags else _NO_TAGS   # (most calls carry no tags)
        routed = router.route_for(tag_key)
        if not routed.nodes:
            raise NoRouteError("no node is available for this call")
        # (no call at all while every node is healthy: this is every call's path)
        excluded = self._excluded(tried) if self._unhealthy or self._degraded else tried
        entry = self._balancers.get(tag_key)
        balancer = (entry[1] if entry is not None and entry[0] is routed   # (as _balancer: the
                    else self._balancer(tag_key, routed))                  # usual case inline)
        node = balancer.select(key, excluded or None)
        if node is None:
            return self._select_further(tag_key, routed, key, tried, excluded)
        return node, balancer

    def _select_further(self, tag_key: Tuple[str, str], routed: Weighted, key: Any,
                        tried: AbstractSet[str], excluded: AbstractSet[str]) -> Tuple[Node, Any]:
        """No node of the first routing tier can take the attempt (breakers open,
        connections degraded, every one tried): the next tiers take it, as in
        Envoy's locality failover (IDC, region, anywhere; lane, trunk; cell, center)."""
        tiers = self._tiers(tag_key, routed)
        for balancer in tiers[1:]:
            node = balancer.select(key=key, exclude=excluded or None)
            if node is not None:
                return node, balancer
        if len(excluded) > len(tried):
            # Panic mode: every healthy choice is gone, so health stops steering and
            # the attempt itself says why the node cannot be used (open breaker,
            # connect backoff) -- one node degraded must not mean no calls at all.
            for balancer in tiers:
                node = balancer.select(key=key, exclude=tried or None)
                if node is not None:
                    return node, balancer
        raise NoRouteError("no node left to try")

    def _tiers(self, tag_key: Tuple[str, str], routed: Weighted) -> List[Any]:
        """The balancers of every routing tier for these tags, most preferred first."""
        tiers = [self._balancer(tag_key, routed)]
        while routed.fallback is not None:
            routed = routed.fallback
            tiers.append(self._balancer((tag_key, len(tiers)), routed))
        return tiers

    def _known_dead(self, node: Node) -> bool:
        """Is ``node`` degraded (its connect failed lately)? Asked before an attempt:
        a refusal by a node already known dead is given back to no call (one that
        tries it again once its degrade is over is given back, as before it)."""
        if not self._degraded:    # every healthy call's case
            return False
        until = self._degraded.get(node.key)
        return until is not None and until > self._running_loop().time()

    def _sendable(self, node: Node, deadline: float) -> bool:
        """Could an attempt on ``node`` go now: is time left, would its breaker let it by?"""
        return (deadline > self._loop.time()  # type: ignore[union-attr]  # begin() looked it up
                and self.breaker(node).available())

    def found_no_node(self, why: OctoError) -> None:
        """A call found no node to call (none routable, or no node list at all: the
        registry away at a client's start): ``None`` under failsafe (logged), else
        ``why`` is raised."""
        if self.policy != "failsafe":
            raise why
        _FAILSAFE.log("failsafe call found no node: %s", why, key=(None, type(why)))

    # --- invocation --------------------------------------------------------------------

    async def invoke(self, send: Send, *, timeout: float, idempotent: bool = False,
                     tags: Mapping[str, str] = {}, key: Any = None,  # noqa: B006
                     blame_timeouts: bool = True) -> Any:
        """Run ``send(node, remaining_seconds)`` under the cluster's policy (the
        options: see ``begin``)."""
        return await self.begin(_send_alone, send, timeout=timeout, idempotent=idempotent,
                                tags=tags, key=key, blame_timeouts=blame_timeouts)

    def begin(self, send: SendRequest, request: Any, *, timeout: float,
              idempotent: bool = False, tags: Mapping[str, str] = {},  # noqa: B006
              key: Any = None, blame_timeouts: bool = True) -> Awaitable[Any]:
        """``invoke``, begun now (from a running loop), where each attempt is
        ``send(node, remaining_seconds, request)``: the deadline is fixed and,
        for a call of one attempt, its node chosen (``NoRouteError`` at once);
        returns the coroutine to await for the outcome. That coroutine is the
        attempt itself when one attempt is all the policy makes: no coroutine of
        the cluster's own to make and to resume through, on every call's path.
        ``blame_timeouts=False``: the call's time was cut short (by the deadline
        of the call a handler serves), so its attempts' timeouts say nothing of
        the nodes, and no breaker counts them."""
        deadline = self._running_loop().time() + timeout
        self.budget.record_request()
        # Parallel copies only of what may run twice; the rest goes one copy at a time,
        # to another node only for a node fault, and once sent only if idempotent.
        if idempotent and self.policy == "forking":
            return self._race(send, request, deadline, tags, key, self.forks, 0.0,
                              blame_timeouts)
        if idempotent and self.policy == "hedging":
            return self._race(send, request, deadline, tags, key, 2, self.hedge_delay,
                              blame_timeouts)
        if self._one_attempt:
            # What _in_turn does with one attempt, minus the bookkeeping for retries
            # (tried nodes, attempts given back) that only a second attempt reads.
            node, balancer = self.select(tags, key, _NONE_TRIED)
            return self._attempt(send, request, node, balancer, deadline, timeout,
                                 blame_timeouts)
        return self._in_turn(send, request, deadline, idempotent, tags, key, blame_timeouts)

    async def _in_turn(self, send: SendRequest, request: Any, deadline: float, idempotent: bool,
                       tags: Mapping[str, str], key: Any, blame_timeouts: bool = True) -> Any:
        """One attempt after the other (failover, failsafe, forking and hedging for
        a method that may not run twice)."""
        attempts = self._attempts_in_turn
        counted = 0                             # attempts that count against `attempts`
        spare = attempts if attempts > 1 else 0  # attempts it may give back (failfast: none)
        tried: Set[str] = set()
        failure: Optional[Exception] = None     # the last attempt's, once a retry is wanted
        free = False                            # ... and it was given back: no budget
        while True:
            try:
                node, balancer = self.select(tags, key, tried)
            except NoRouteError as exc:
                if failure is not None:
                    raise failure from None       # out of nodes: the real error, not routing's
                return self.found_no_node(exc)
            if failure is not None:
                # A retry that cannot go (no time left, circuit open) is not sent and
                # costs no budget: the caller gets the real error.
                if not self._sendable(node, deadline) or not (free or self.budget.try_retry()):
                    raise failure
                # (keyed by the node that failed: the one an operator looks for)
                _RETRYING.log("retrying on %s after: %s", node.key, failure,
                              key=(getattr(failure, "node", None), type(failure)))
            tried.add(node.key)
            known_dead = self._known_dead(node)
            try:
                return await self._attempt(send, request, node, balancer, deadline,
                                           blame_timeouts=blame_timeouts)
            except Exception as exc:
                if self.policy == "failsafe" and node_failed(exc):
                    _FAILSAFE.log("failsafe call to %s failed: %s", node.key, exc,
                                  key=(node.key, type(exc)))
                    return None
                free = spare > 0 and _given_back(exc, known_dead)
                spare -= free
                counted += not free
                if not (counted < attempts and node_failed(exc)
                        and (idempotent or not_executed(exc))):
                    raise
                failure = exc

    async def _attempt(self, send: SendRequest, request: Any, node: Node, balancer: Any,
                       deadline: float, remaining: Optional[float] = None,
                       blame_timeouts: bool = True) -> Any:
        """One attempt of a call on ``node``, with the time left before ``deadline``
        (``remaining``, when the caller knows it): refused at once past the deadline
        or by an open breaker; its outcome then feeds the node's breaker, the
        balancer's learning (latency, served or not) and, for a failed connect, the
        node's degrade."""
        if remaining is None:   # (begin's attempt has all of the call's time: no clock read)
            loop = self._loop
            assert loop is not None   # begin() looked it up
            remaining = deadline - loop.time()
        if remaining <= 0:    # the caller's deadline: no node to blame
            raise CallTimeout("the call's deadline passed before an attempt was sent")
        breaker = self._breakers.get(node.key) or self.breaker(node)   # (made at a first call)
        probe = breaker.state is not _CLOSED    # (closed: it allows; else this claims the probe)
        if probe and not breaker.allows():
            raise DegradeError("circuit open", node=node.key)
        opened = breaker.opened
        learns = balancer.learns
        if learns:
            balancer.on_start(node)
            started = time.perf_counter()   # loop.time() is too coarse under uvloop for LALB
        served = True                   # for the balancer: did the node serve this call?
        health: Optional[bool] = True   # for the breaker; None when it is not its business
        # A degraded node's retry: this call tries the connect, the others keep away.
        reconnect = bool(self._degraded) and node.key in self._degraded \
            and node.key not in self._reconnecting
        if reconnect:
            self._reconnecting.add(node.key)
        settled: Optional[bool] = True  # for a retry: did it tell whether the node connects?
        try:
            return await send(node, remaining, request)
        except asyncio.CancelledError:
            health = settled = None     # a lost race (hedge, fork) says nothing of the node
            raise
        except Exception as exc:
            served = health = not node_failed(exc)
            if isinstance(exc, DegradeError) and _from_peer(exc):
                # The node refused this caller past its quota (status 6): it answered,
                # so it is up; as a failure it would open the breaker on a node that
                # serves this caller again within the second.
                health = True
            elif isinstance(exc, ClientClosed):
                health = settled = None   # the client closed: nothing the node did
            elif _connection_failed(exc):
                # The connection failed (refused, or lost with every call on it): the
                # node is degraded for a while -- one event, not N breaker failures.
                # Breakers judge how the node answers: timeouts, overload, bad replies.
                self.degrade(node)
                health = None
            elif isinstance(exc, CallTimeout) and not (blame_timeouts and exc.request_sent):
                # The caller's time ran out before its request could go (waiting for a
                # connect many calls share): the connect judges the node, not each of
                # them. Or the call had too little time to be fair to the node.
                health = settled = None
                # (the balancer learns the time taken until then, a lower bound of the
                # node's latency, as for a lost race: no error to punish the node for)
                served = True
            raise
        finally:
            if reconnect:
                self._reconnecting.discard(node.key)
                if settled:     # answered, or failed to connect (and is degraded anew)
                    until = self._degraded.get(node.key)
                    if until is not None and until <= self._running_loop().time():
                        del self._degraded[node.key]
                        self._tell_router()
            if breaker.opened != opened:
                # Sent before the breaker last opened, it ends after: old news, which
                # must neither decide the probe nor reopen a breaker the probe closed.
                pass
            elif health is not None:
                breaker.record(health)
            elif settled is None:
                if probe:
                    breaker.release()   # the probe proved nothing: the next call probes
            elif breaker.state is _HALF_OPEN:
                breaker.record(False)   # its connect failed (now degraded): probe again later
            if learns:
                balancer.on_finish(node, time.perf_counter() - started, served)

    async def _race(self, send: SendRequest, request: Any, deadline: float,
                    tags: Mapping[str, str], key: Any, width: int, delay: float,
                    blame_timeouts: bool = True) -> Any:
        """Forking (``delay`` 0) and hedging: up to ``width`` attempts, first answer
        wins. A hedge goes after ``delay``, or at once when an attempt fails with a
        node fault (gRPC A6 hedging)."""
        loop = self._loop
        assert loop is not None   # begin() looked it up
        tried: Set[str] = set()
        running: Dict[asyncio.Task, bool] = {}   # attempt -> its node was known dead
        last: Optional[BaseException] = None
        counted = 0              # attempts that count against `width`
        spare = width            # attempts it may give back (see the module docstring)
        owed = 0                 # copies owed for attempts given back: no budget

        def launch(extra: bool) -> bool:
            """Start one more attempt; an extra one (a fork or hedge) only when it can
            go (time left, a node whose breaker lets it by), and then it pays from
            the budget, unless it replaces one given back."""
            nonlocal last, counted, owed
            try:
                node, balancer = self.select(tags, key, tried)
            except OctoError as exc:
                last = last or exc
                return False
            if extra and not (self._sendable(node, deadline)
                              and (owed or self.budget.try_retry())):
                return False
            owed -= extra and owed > 0
            tried.add(node.key)
            counted += 1
            task = loop.create_task(self._attempt(send, request, node, balancer, deadline,
                                                  blame_timeouts=blame_timeouts))
            running[task] = self._known_dead(node)
            return True

        launch(False)
        try:
            while running:
                if counted < width and not delay:        # forking: every fork at once
                    if launch(True):
                        continue
                    width = counted                      # no fork to send: wait for what runs
                wait = min(delay, deadline - loop.time()) if counted < width else None
                done, _ = await asyncio.wait(running, timeout=wait,
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    known_dead = running.pop(task)
                    exc = task.exception()
                    if exc is None or not node_failed(exc):
                        return task.result()
                    last = exc
                    if spare > 0 and _given_back(exc, known_dead):
                        spare, counted, owed = spare - 1, counted - 1, owed + 1
                # The hedge delay passed, or an attempt failed: the next copy goes now.
                if counted < width and not launch(True):
                    width = counted                      # no copy to send: wait for what runs
            raise last if last is not None else NoRouteError("no node to try")
        finally:
            for task in running:
                task.cancel()
                # a copy may end in an error all the same (a closing client turns the
                # cancel into TransportError): read it, or asyncio logs it as unretrieved
                task.add_done_callback(outcome_seen)
