"""``AsyncClient``: call a thrift service over the unified protocol or framed thrift (the blocking ``Client``: ``blocking_client.py``)."""
from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import ssl as _ssl
import threading
import time
import warnings
import weakref
from typing import (TYPE_CHECKING, Any, Awaitable, Callable, Dict, Iterable, Mapping, NoReturn,
                    Optional, Sequence, Set, Tuple, Type, Union)

from thriftpy2.thrift import TApplicationException, TMessageType

from octo_core import _codec, idl, protocol
from octo_core.cluster.breaker import RetryBudget
from octo_core.cluster.invoker import Cluster
from octo_core.cluster.routing import Caller, NoRouteError, RouteRule, Router
from octo_core.afterfork import tell_forked_children
from octo_core.auth import Signer
from octo_core.checks import finite_number, is_finite_number
from octo_core.codec import Limits, _check_limits
from octo_core.context import _CARRIED, _HOOKS, Span, _child_of, _span_started
from octo_core.metrics import Metrics
from octo_core.middleware import Middleware, layers, wrapped
from octo_core.errors import (ApplicationError, CallTimeout, ClientClosed, DecodeError,
                              DegradeError, EncodeError, OctoError, ProtocolError, RemoteError,
                              RpcError, RuntimeFailure, SecurityError, ServiceError, Status,
                              TransportError, own_copy)
from octo_core.protocol import DEFAULT_MAX_DEPTH, CallType, Frame, FrameDecoder, MessageType
from octo_core.registry import Directory, Node, Registry, RegistryError, open_registry
from octo_core.transport.address import default_route_ip, parse_address
from octo_core.transport.client import ClientConnection, Endpoint
from octo_core.transport.stream import READ_BATCH

# (looked up by a reply header's status: an int, or None without a header)
_ERRORS_BY_STATUS: Dict[Optional[int], Type[OctoError]] = {
    Status.APPLICATION_EXCEPTION: ApplicationError,
    Status.RUNTIME_EXCEPTION: RuntimeFailure,
    Status.RPC_EXCEPTION: RpcError,
    Status.TRANSPORT_EXCEPTION: TransportError,
    Status.PROTOCOL_EXCEPTION: ProtocolError,
    Status.DEGRADE_EXCEPTION: DegradeError,
    Status.SECURITY_EXCEPTION: SecurityError,
    Status.SERVICE_EXCEPTION: ServiceError,
}

_STATUSES = frozenset(Status)

_COMPRESSION_FLAGS = {None: 0, "gzip": protocol.FLAG_GZIP, "snappy": protocol.FLAG_SNAPPY}

#: RequestInfo.timeout is an i32 of milliseconds: a longer deadline is sent as the longest.
_MAX_TIMEOUT_MS = 2**31 - 1

# Enum members every call uses, read as globals: on Python 3.11 ``Status.SUCCESS``
# and the like go through EnumType's __getattr__ hook, several times slower.
_SUCCESS = Status.SUCCESS
_NORMAL = MessageType.NORMAL
_REPLY, _NO_REPLY = CallType.REPLY, CallType.NO_REPLY
# The same for thriftpy2's message types: a class attribute is a slow read too.
_CALL, _EXCEPTION = TMessageType.CALL, TMessageType.EXCEPTION


#: What a unified client adds when a node closes its connections on calls without a
#: byte: servers that speak only native thrift (thriftpy2's, Apache's) do, so a team
#: migrating from them meets this first. A TLS server does so with a plaintext
#: client (``_TLS_UNHEARD_HINT``), and an octo_core server, whatever the protocol or
#: transport, with a frame over its max_frame_size (``_OCTO_UNHEARD_HINT``).
_UNIFIED_UNHEARD_HINT = ("(a server that speaks only native thrift, such as thriftpy2's "
                         "or Apache Thrift's, closes a unified connection so: call it "
                         "with protocol=\"thrift\"{tls}")
_TLS_UNHEARD_HINT = "; a TLS server closes a plaintext one so: pass ssl="
#: What a native client adds, by ``framed``: a server on the other transport closes
#: its connections so (thriftpy2's and Apache's are buffered unless told), and so
#: does thriftpy2's on a handler's undeclared exception, on a connection's first call.
_NATIVE_UNHEARD_HINTS = {
    True: ("(a server on a buffered transport, thriftpy2's and Apache's default, closes "
           "a framed connection so: call it with framed=False{tls}; thriftpy2's also "
           "closes one when a handler raises an exception its IDL does not declare"),
    False: ("(a server on a framed transport closes an unframed connection so: call it "
            "with framed=True{tls}; thriftpy2's also closes one when a handler raises an "
            "exception its IDL does not declare"),
}
#: What a native client adds, by ``multiplexed``: a ``TMultiplexedProcessor``
#: (Apache's, Java's, thriftpy2's) closes a connection whose call names no service
#: (Apache's also one naming a service it does not host).
_MULTIPLEXED_UNHEARD_HINTS = {
    False: ("; a server of many services (a TMultiplexedProcessor) closes one whose "
            "calls name none: call it with multiplexed=True"),
    True: ("; a TMultiplexedProcessor closes one naming a service it does not host: "
           "is service_name={service_name!r} the name the server registered it under?"),
}
_OCTO_UNHEARD_HINT = "; an octo_core server does so only with a request over its max_frame_size)"

#: Seconds between a draining close's looks at the calls still in flight.
_DRAIN_POLL = 0.01

#: Seconds of silence from a node before a unified connection is sent a heartbeat.
DEFAULT_HEARTBEAT_INTERVAL = 30.0


class AsyncClient:
    """Calls the methods of a thriftpy2 service as coroutines.

    ``async with AsyncClient(echo_thrift.Echo, appkey="com.example.caller",
    remote_appkey="com.example.echo", hosts=["127.0.0.1:9001"]) as c:
    await c.echo("hi")``. Each IDL method becomes an attribute of the client,
    except those whose names the clients use themselves (``RESERVED_NAMES``:
    ``close``, ``call``, ``timeout``, ...; the same for ``Client``):
    ``await c.call("close")`` calls those, and any other, by name.
    ``protocol="thrift"`` speaks native framed thrift instead of the unified
    protocol; ``framed=False`` leaves out the length prefix (a buffered
    transport, the default of thriftpy2's and Apache's servers), and with
    ``multiplexed=True`` its method names are ``"<service_name>:<method>"``, as
    Apache's and thriftpy2's ``TMultiplexedProtocol`` write them, for servers
    hosting many services. ``service_name`` (the IDL service's name unless
    given) is the name the server knows the service by: the ``serviceName`` of
    the unified protocol, the name a ``TMultiplexedProcessor`` registered it
    under. Many calls share one connection per node (``pool_size`` for more:
    a call takes the one owing the fewest replies, so against a server that
    answers a connection's calls one at a time, thriftpy2's or Apache's
    threaded ones, it is not sent behind a slow call while another is free).

    ``timeout`` (seconds) bounds each call, unless ``timeouts`` gives its method
    one of its own (``{"method": seconds}``) or the call does (``call(name, ...,
    timeout=)``); in a handler, no call outlasts the deadline of the one handled
    (see ``octo_core.context.caller``).

    Cluster options: ``lb`` (``random``, ``roundrobin``, ``leastrequest``,
    ``lalb``, ``consistenthash`` with ``hash_arg`` naming the argument to hash, or
    ``hash_header`` the ``globalContext`` key whose value is hashed; a call
    without that key, a method that has no such argument or a value of None,
    goes to a random point of the ring),
    ``cluster`` (``failfast``, ``failover``, ``failsafe``, ``forking``,
    ``hedging``), ``retries``, ``forks``, ``hedge_delay``, ``idempotent`` (True,
    or the method names that may be retried after they were sent; forking and
    hedging send extra copies of these only); ``breaker``, the options of each
    node's circuit breaker (``octo_core.cluster.breaker.CircuitBreaker``: it opens
    after ``consecutive_failures``, 5, or at ``error_rate``, 0.5, of at least
    ``min_calls``, 20, in ``window``, 10 s; a probe call after ``backoff_min``, 1 s,
    doubling to ``backoff_max``, 30 s; an unknown option or a value out of range
    is refused here). Only a node's faults fail over and count against it
    (timeouts, lost connections, overload refusals; a quota refusal fails over
    but opens no breaker): an answer, a declared exception or the handler's own
    error (``ApplicationError``), never does, under any policy. ``retry_budget``
    (a ``RetryBudget`` of the same module) bounds the retries, forks and hedges;
    routing:
    ``cell``/``set_routing``, ``idc``/``region``/``locality`` (``"idc"`` or
    ``"region"``: only that of the caller, given by ``idc`` or ``region``;
    ``locality_threshold``: the share of serving nodes -- ALIVE, weight > 0,
    circuit closed, connects working -- a nearer tier needs to be used alone,
    0.5 by default), ``caller_ip``
    (what route rules match consumer IPs against; by default the address of
    this machine's default route).
    Nodes come from ``hosts`` (addresses) or from a ``registry`` (URL or
    ``Registry``) for ``remote_appkey``; discovery follows changes and keeps the
    last good list through registry outages (``snapshot_path`` persists it; a
    first call gives the registry half its timeout, then starts from it).
    Trust: ``token`` signs every unified request (PROTOCOL.md §6; ``sign_body``
    covers the body too); ``ssl`` connects over TLS. ``metrics`` counts calls.
    ``middleware``: coroutine functions of the application's around every call
    (``fn(service_name, method, call) -> call``; see ``octo_core.middleware``),
    the first outermost.
    ``max_frame_size``, and ``limits`` (``octo_core.codec.Limits``) for the reply
    messages, bound what a reply may cost to read; a request over
    ``max_frame_size`` is not sent, and while a server reads nothing of what
    was sent, new calls wait for it (within their deadline) rather than pile
    their requests up in memory.

    ``heartbeat_interval`` (unified protocol; 30 s by default, 0 or None: off):
    a connection the node has sent nothing on for that long gets a
    NormalHeartbeat, and one left unanswered for as long is closed. It is how a
    connection whose node went away silently (no FIN: a route that drops
    packets, a host powered off) is left: calls on it only time out, and a
    timeout alone never closes a connection (the node may just be slow).
    Without heartbeats (native thrift, or turned off), new calls go to a new
    connection once a second call in a row times out on one the node has sent
    nothing on meanwhile (Apache's and thriftpy2's threaded servers answer a
    connection's calls one at a time: one stuck handler holds up all behind it).

    A client belongs to the event loop of its first call (its connections live
    there): a call from any other loop fails with ``TransportError``, before
    anything is sent. ``close()`` works from anywhere.
    """

    # The client's own state in slots: read on every call, it stays a fixed-offset
    # load however many IDL methods the instance dict holds (CPython keeps a dict
    # in its compact shared-keys form only up to 30 attributes).
    __slots__ = ("service", "appkey", "remote_appkey", "timeout", "unified", "service_name",
                 "metrics", "_framed", "_flags", "_signer", "_limits", "_endpoint_options",
                 "_endpoints", "_retired", "_listed", "_closed", "_shut", "_inherited",
                 "_collected", "_loop", "_loop_thread", "_methods", "_named_service",
                 "_wire_names", "_idempotent", "_timeouts", "_hash_arg", "_hash_header",
                 "_cluster", "_directory", "_discovery", "_owns_registry", "_finishers",
                 "_chains", "_in_middleware", "__dict__", "__weakref__")

    if TYPE_CHECKING:
        def __getattr__(self, name: str) -> Any:
            """The IDL methods, attributes made at run time: to a type checker, Any."""

    def __init__(self, service: Any, *, appkey: str, hosts: Optional[Iterable[str]] = None,
                 registry: Optional[Union[str, Registry]] = None,
                 snapshot_path: Optional[str] = None,
                 remote_appkey: Optional[str] = None, timeout: float = 1.0,
                 timeouts: Optional[Mapping[str, float]] = None,
                 protocol: str = "octo", service_name: Optional[str] = None,
                 framed: bool = True, multiplexed: bool = False,
                 pool_size: int = 1, connect_timeout: float = 1.0, checksum: bool = False,
                 compression: Optional[str] = None,
                 heartbeat_interval: Optional[float] = DEFAULT_HEARTBEAT_INTERVAL,
                 max_frame_size: int = protocol.DEFAULT_MAX_FRAME_SIZE,
                 limits: Optional[Limits] = None,
                 lb: str = "random", cluster: str = "failfast", retries: int = 2,
                 forks: int = 2, hedge_delay: float = 0.05,
                 idempotent: Union[bool, Iterable[str]] = False, hash_arg: Optional[str] = None,
                 hash_header: Optional[str] = None,
                 cell: str = "", set_routing: bool = False, idc: str = "", region: str = "",
                 locality: Optional[str] = None, locality_threshold: float = 0.5,
                 caller_ip: str = "",
                 breaker: Optional[Dict[str, Any]] = None,
                 retry_budget: Optional[RetryBudget] = None,
                 token: Optional[Union[str, bytes]] = None, sign_body: bool = False,
                 ssl: Optional["_ssl.SSLContext"] = None,
                 middleware: Iterable[Middleware] = ()) -> None:
        timeout, connect_timeout = _check_options(
            protocol=protocol, framed=framed, multiplexed=multiplexed, compression=compression,
            max_frame_size=max_frame_size, limits=limits, timeout=timeout,
            connect_timeout=connect_timeout, timeouts=timeouts,
            heartbeat_interval=heartbeat_interval, pool_size=pool_size)
        self._methods = idl.methods(service)   # (first: TypeError for what is no service)
        self.service = service
        self.appkey = appkey
        self.remote_appkey = remote_appkey or ""
        self.timeout = timeout
        self.unified = protocol == "octo"
        self._framed = framed
        self.service_name = service_name or service.__name__
        self._flags = (protocol_flags(checksum) | _COMPRESSION_FLAGS[compression])
        self._signer = _make_signer(appkey, token, self.remote_appkey, sign_body)
        self.metrics = Metrics("client")
        self._limits = limits
        self._set_wire(pool_size=pool_size, connect_timeout=connect_timeout,
                       max_frame_size=max_frame_size, ssl=ssl, limits=limits,
                       heartbeat_interval=heartbeat_interval, framed=framed,
                       multiplexed=multiplexed)
        self._endpoints: Dict[str, Endpoint] = {}
        self._retired: Set[Endpoint] = set()            # of nodes that left, calls still on them
        self._listed: Optional[Dict[str, Node]] = None  # by address, from a registry
        self._closed = False
        self._shut = False   # its connections closed (after close()'s grace, if any)
        self._inherited = False   # this is a forked child's copy (see _inherited_by_fork)
        self._collected: Optional[weakref.finalize] = None   # set with the client's loop
        # The loop of the first call, and the thread running it: every call compares
        # its thread (cheap), a closed client or another loop take the slow path.
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread: Optional[int] = None
        self._idempotent = (set(self._methods) if idempotent is True
                            else self._method_names("idempotent", idempotent or ()))
        self._timeouts = self._method_timeouts(timeouts or {})
        self._check_hash_key(lb, hash_arg, hash_header)
        self._hash_arg = hash_arg
        self._hash_header = hash_header
        self._cluster = self._make_cluster(
            caller_ip=caller_ip, cell=cell, set_routing=set_routing, idc=idc, region=region,
            locality=locality, locality_threshold=locality_threshold, lb=lb, policy=cluster,
            retries=retries, forks=forks, hedge_delay=hedge_delay, budget=retry_budget,
            breaker=breaker)
        self._bind_methods(middleware)
        self._directory: Optional[Directory] = None
        self._discovery: Optional[asyncio.Task] = None
        # last: a registry it opens is the client's to close, so nothing may fail after
        self._make_discovery(hosts, registry, remote_appkey, snapshot_path)
        tell_forked_children(self)

    def _set_wire(self, *, pool_size: int, connect_timeout: float, max_frame_size: int,
                  ssl: Optional["_ssl.SSLContext"], limits: Optional[Limits],
                  heartbeat_interval: Optional[float], framed: bool, multiplexed: bool) -> None:
        """What the client's connections are made with, and the names a request
        carries on the wire (options checked: ``_check_options``)."""
        self._endpoint_options: Dict[str, Any] = dict(
            pool_size=pool_size, connect_timeout=connect_timeout, max_frame_size=max_frame_size,
            ssl=ssl,
            # what it nests in a request: what it would read
            max_depth=limits.max_depth if limits else DEFAULT_MAX_DEPTH,
            heartbeat_interval=heartbeat_interval if self.unified else None,
            on_stopping=_weak_method(self._node_stopping),
            unheard_hint=_unheard_hint(self.unified, framed, multiplexed, self.service_name,
                                       ssl),
            # what its connections together inflate a loop pass (see the server's)
            inflate=_codec.InflateBudget(READ_BATCH, _call_soon))
        # the service name the server dispatches by, if the wire carries one
        self._named_service = self.service_name if self.unified or multiplexed else None
        # the message name native thrift sends for each method
        self._wire_names = {name: f"{self.service_name}:{name}" if multiplexed else name
                            for name in self._methods}

    def _check_hash_key(self, lb: str, hash_arg: Optional[str],
                        hash_header: Optional[str]) -> None:
        """``ValueError`` unless ``lb='consistenthash'`` comes with one key to hash
        (an argument of some method, or a ``globalContext`` key), and only it does."""
        if hash_arg is not None and not any(hash_arg in m.arg_names for m in self._methods.values()):
            raise ValueError(f"hash_arg {hash_arg!r} is no argument of any method of "
                             f"{self.service.__name__}")
        if hash_arg is not None and hash_header is not None:
            raise ValueError("give hash_arg or hash_header, not both: one key per call")
        if (lb == "consistenthash") != (hash_arg is not None or hash_header is not None):
            # (either way, each call would be balanced at random)
            raise ValueError("lb='consistenthash' hashes a key of each call: give it hash_arg= "
                             "(an argument's name) or hash_header= (a globalContext key), "
                             "and give those with it only")

    def _make_cluster(self, *, caller_ip: str, cell: str, set_routing: bool, idc: str,
                      region: str, locality: Optional[str], locality_threshold: float, lb: str,
                      policy: str, retries: int, forks: int, hedge_delay: float,
                      budget: Optional[RetryBudget],
                      breaker: Optional[Dict[str, Any]]) -> Cluster:
        """The cluster that routes, balances and retries this client's calls (its
        options as ``AsyncClient`` takes them); it probes a node known down
        through this client, weakly."""
        caller_ip = caller_ip or default_route_ip() or default_route_ip(ipv6=True) or ""
        caller = Caller(appkey=self.appkey, ip=caller_ip, cell=cell,
                        set_routing=set_routing, idc=idc, region=region)
        router = Router(caller, locality=locality, locality_threshold=locality_threshold)
        return Cluster(router, lb=lb, policy=policy, retries=retries, forks=forks,
                       hedge_delay=hedge_delay, budget=budget, breaker_options=breaker,
                       probe=_weak_method(self._connect_to, _probe_of_a_closed_client))

    def _make_discovery(self, hosts: Optional[Iterable[str]],
                        registry: Optional[Union[str, Registry]], remote_appkey: Optional[str],
                        snapshot_path: Optional[str]) -> None:
        """Where the nodes come from: the cluster is given ``hosts`` now, or a
        ``Directory`` of the ``registry`` will list ``remote_appkey``'s."""
        if (hosts is None) == (registry is None):
            raise ValueError("give either hosts or registry")
        if isinstance(hosts, str):
            raise TypeError(f"hosts is a list of addresses: hosts=[{hosts!r}]")
        self._owns_registry = isinstance(registry, str)
        if registry is not None:
            if not remote_appkey:
                raise ValueError("registry discovery needs remote_appkey")
            self._directory = Directory(open_registry(registry) if isinstance(registry, str)
                                        else registry, remote_appkey, snapshot_path)
            # weakly: a client dropped unclosed is collected (and closed) all the same
            self._directory.subscribe(_weak_method(self._discovered))
        else:
            assert hosts is not None   # (checked above: hosts or registry)
            nodes = [static_node(self.remote_appkey, host) for host in hosts]
            if not nodes:
                raise ValueError("hosts must name at least one node")
            self._cluster.update(nodes)

    def _bind_methods(self, middleware: Iterable[Middleware]) -> None:
        """Each IDL method as an attribute (unless reserved: ``_binds``), through
        ``middleware`` if any, and the reader of its replies."""
        # name -> finish(frame, node): decodes a reply as it is read (see _start)
        self._finishers = {name: functools.partial(self._result, method)
                           for name, method in self._methods.items()}
        # name -> the call within the middleware (none: empty, and calls skip it)
        chain = layers(middleware)
        self._chains: Dict[str, Callable[..., Awaitable[Any]]] = {
            name: wrapped(chain, self.service_name, name, self._innermost(method), "call")
            for name, method in self._methods.items()} if chain else {}
        # calls within the middleware now: in flight, for a close's grace (see _drained)
        self._in_middleware = 0
        for name, method in self._methods.items():
            if _binds(self, name):
                setattr(self, name, self._caller(method))

    def _method_names(self, option: str, names: Iterable[str]) -> Set[str]:
        """``names`` as a set of this service's method names (a typo is an error,
        not a method silently left out)."""
        if isinstance(names, str):
            raise TypeError(f"{option} is True or a list of method names: {option}=[{names!r}]")
        chosen = set(names)
        unknown = chosen - set(self._methods)
        if unknown:
            raise ValueError(f"{option}: {self.service.__name__} has no method "
                             f"{', '.join(sorted(map(repr, unknown)))}")
        return chosen

    def _method_timeouts(self, timeouts: Mapping[str, float]) -> Dict[str, float]:
        """``timeouts`` checked: this service's method names, each to seconds."""
        if not isinstance(timeouts, Mapping):
            raise TypeError(f"timeouts maps method names to seconds, not {timeouts!r}")
        self._method_names("timeouts", timeouts)
        return {name: _seconds(f"timeouts[{name!r}]", value) for name, value in timeouts.items()}

    def __reduce__(self) -> NoReturn:
        raise _not_picklable(self)

    def timeout_of(self, name: str) -> float:
        """The timeout a call of method ``name`` gets unless it gives its own:
        ``timeouts[name]``, else ``timeout``."""
        return self._timeouts.get(name, self.timeout)

    def _caller(self, method: idl.Method) -> Callable[..., Any]:
        if self._chains:
            def call(*args: Any, **kwargs: Any) -> Awaitable[Any]:
                return self._through(method, args, kwargs, None)
        else:
            def call(*args: Any, **kwargs: Any) -> Awaitable[Any]:
                return self._call(method, args, kwargs)   # the coroutine itself: one frame less
        call.__name__ = method.name
        call.__qualname__ = f"{self.service.__name__}.{method.name}"
        return call

    async def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call IDL method ``name``; the keyword ``timeout`` overrides the client's for this call.

        Every method can be called this way; it is the only way to reach one whose
        name the client uses itself (``close``, ``call``, ...). For a method with
        an argument called ``timeout``, that keyword is the argument (the call
        keeps the client's timeout); any other argument, ``name`` too, is the
        method's own."""
        method, timeout = self._by_name(name, kwargs)
        return await self._begin(method, args, kwargs, timeout)

    def _by_name(self, name: str, kwargs: Dict[str, Any]) -> Tuple[idl.Method, Optional[float]]:
        """The method ``name`` and the call's ``timeout`` override, taken out of
        ``kwargs`` unless the method has an argument of that name (see ``call``)."""
        method = self._methods.get(name)
        if method is None:
            raise AttributeError(f"{self.service.__name__} has no method {name!r}")
        timeout = None if "timeout" in method.arg_names else kwargs.pop("timeout", None)
        return method, None if timeout is None else _seconds("timeout", timeout)

    def _begin(self, method: idl.Method, args: tuple, kwargs: dict,
               timeout: Optional[float]) -> Awaitable[Any]:
        """A call of ``method`` (``timeout``: the call's own, or None), through the
        middleware if any."""
        if self._chains:
            return self._through(method, args, kwargs, timeout)
        return self._call(method, args, kwargs, timeout)

    async def _through(self, method: idl.Method, args: tuple, kwargs: dict,
                       timeout: Optional[float]) -> Any:
        """A call within the middleware; the call's own timeout waits for it inside
        (``_innermost``), set for each call: a middleware's own calls get theirs."""
        self._check_caller(method)   # (a closed client refuses before any middleware runs)
        own = _OWN_TIMEOUT.set(timeout)
        self._in_middleware += 1
        try:
            return await self._chains[method.name](*args, **kwargs)
        finally:
            self._in_middleware -= 1
            _OWN_TIMEOUT.reset(own)

    def _innermost(self, method: idl.Method) -> Callable[..., Awaitable[Any]]:
        """What the middleware wraps for ``method``: the call itself, with the
        timeout its caller gave. (Admitted by ``_through``: within a close's grace it
        still goes.)"""
        async def call(*args: Any, **kwargs: Any) -> Any:
            return await self._call(method, args, kwargs, _OWN_TIMEOUT.get(), admitted=True)
        call.__name__ = method.name
        call.__qualname__ = f"{self.service.__name__}.{method.name}"
        return call

    async def _call(self, method: idl.Method, args: tuple, kwargs: dict,
                    timeout: Optional[float] = None, admitted: bool = False) -> Any:
        if (threading.get_ident() != self._loop_thread
                or self._loop.is_closed()):  # type: ignore[union-attr]  # set with _loop_thread
            self._check_caller(method, admitted)
        if timeout is None:
            timeout = self._timeouts.get(method.name, self.timeout) if self._timeouts \
                else self.timeout
        deadline: Optional[float] = None   # the handled call's, in a handler
        carried = _CARRIED.get()
        if type(carried) is tuple:
            tags, parent = carried
        else:
            tags, parent = carried.carried()   # type: ignore[union-attr]  # (the other kind)
            deadline = carried.deadline   # type: ignore[union-attr]
        try:
            request = method.args_cls(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(_argument_error(method, args, kwargs, exc)) from None
        key = (getattr(request, self._hash_arg, None) if self._hash_arg
               else tags.get(self._hash_header) if self._hash_header else None)

        span = _child_of(parent)
        stats = self.metrics.started(self.service_name, method.name)
        ends = _span_started("client", self.service_name, method.name, span) if _HOOKS else None
        started = time.monotonic()
        status: int = _SUCCESS
        cut = False   # the timeout is the handled call's deadline, not this call's own
        fair = True   # ... and it leaves at least half of its own: a timeout blames the node
        try:
            if deadline is not None:   # (counted as a call, as below, when it has passed)
                within = _within(deadline, timeout, method)
                cut, fair, timeout = within < timeout, within >= timeout / 2, within
            if self._directory is not None and self._directory.version == 0:
                try:   # (counted as a call: one failing here is one the caller saw fail)
                    timeout = await self._discover(timeout, method.name)
                except (CallTimeout, RegistryError) as exc:   # no node list: no node to call
                    return self._cluster.found_no_node(exc)
            return await self._cluster.begin(   # (invoke, minus a coroutine: see begin)
                self._send, (method, request, tags, span),   # _send(node, remaining, call)
                timeout=timeout, idempotent=method.name in self._idempotent, tags=tags,
                key=None if key is None else str(key), blame_timeouts=fair)
        except OctoError as exc:
            status = exc.status
            exc.method = exc.method or method.name   # (a NoRouteError knows no method)
            if cut and isinstance(exc, CallTimeout):
                # (told by the cut, not the clock: a timer may fire a little early)
                exc.inherited_deadline = True
            if isinstance(exc, NoRouteError) and self._listed is not None:
                exc.message += self._why_no_node()
            raise
        except Exception as exc:
            status = Status.SUCCESS if _declared(method, exc) else Status.REMOTE_EXCEPTION
            raise
        except asyncio.CancelledError:
            # its caller gave up on it (asyncio.wait_for, a blocking wait past its
            # bound): no answer was taken, as with a timeout, not a success
            status = Status.TRANSPORT_EXCEPTION
            raise
        finally:
            self.metrics.finished(stats, time.monotonic() - started, status)
            for end in ends or ():
                end(status)

    def _why_no_node(self) -> str:
        """What the registry said, when no node could take a call: none listed (a
        misspelt appkey?), none ALIVE (the scanner marked them DEAD, an operator
        STOPPED them) or the ALIVE ones all of weight 0 (an operator's), else
        nothing (their circuits or connects failed)."""
        nodes = list((self._listed or {}).values())
        where = f"of {self.remote_appkey!r} serving {self.service_name}"
        if not nodes:
            registry = self._directory.registry if self._directory is not None else None
            return f": the registry ({registry!r}) lists no node {where}"
        alive = [node for node in nodes if node.status == protocol.NodeStatus.ALIVE]
        if not alive:
            statuses = collections.Counter(protocol.status_name(node.status) for node in nodes)
            counts = ", ".join(f"{count} {name}" for name, count in sorted(statuses.items()))
            return f": the registry lists {len(nodes)} node(s) {where}, none ALIVE ({counts})"
        if all(node.base_weight() <= 0 for node in alive):
            return (f": the registry lists {len(alive)} ALIVE node(s) {where}, "
                    "every one of weight 0")
        return ""

    def _check_caller(self, method: idl.Method, admitted: bool = False) -> None:
        """A call's slow path: refuse it on a closed client or from a loop other than
        the client's, else bind the client to the caller's loop (its first call, or
        the same loop now run by another thread). ``admitted``: a call its
        middleware let through, which began before the close: refused only once
        the close's grace is over."""
        if self._closed and (self._shut or not admitted):
            raise _closed_error(method.name)
        if self._inherited:
            raise TransportError("this client was made before os.fork(): its connections are "
                                 "the parent process's; make an AsyncClient in this process "
                                 "(a blocking Client opens its own here by itself)",
                                 method=method.name, request_sent=False)
        running = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not running:
            why = ("its event loop (that of its first call) is closed" if self._loop.is_closed()
                   else "it belongs to another event loop (that of its first call)")
            raise TransportError(f"this client cannot call from this event loop: {why}; make "
                                 "a client per event loop, or share a Client between threads",
                                 method=method.name, request_sent=False)
        if self._closed:   # (admitted in a close's grace: every other call still refused)
            return
        self._loop, self._loop_thread = running, threading.get_ident()
        if self._collected is None:
            # Collected unclosed, its connections would stay open as long as the loop.
            self._collected = weakref.finalize(self, _close_collected_async, running,
                                               *self._parts())
            self._collected.atexit = False

    async def _discover(self, timeout: float, method: str) -> float:
        """Start discovery: concurrent first calls share one attempt, and a failed
        attempt is forgotten, so a call after a registry outage tries again.

        A call waits for it within its own ``timeout``: half of it for the
        registry, then it starts from the snapshot (``snapshot_path``) if there
        is one, else waits out the rest (``CallTimeout`` then: discovery goes on
        for the calls after it); nodes known meanwhile (another call started
        from the snapshot) end its wait. Returns the time the call has left."""
        directory = self._directory
        assert directory is not None   # (a call discovers only with a registry)
        loop = asyncio.get_running_loop()
        # (this call's attempt: a failed one leaves self._discovery to the next)
        discovery = self._discovery
        if discovery is None:
            discovery = self._discovery = loop.create_task(directory.start())
            discovery.add_done_callback(self._discovery_done)
        began = loop.time()
        known: asyncio.Future = loop.create_future()   # nodes accepted meanwhile

        def nodes_known(*_: Any) -> None:
            if not known.done():
                known.set_result(None)
        subscription = directory.subscribe(nodes_known)
        try:
            for until in (began + timeout / 2, began + timeout):
                # (wait, not wait_for: a timeout leaves the shared attempt be, at once)
                await asyncio.wait((discovery, known), timeout=until - loop.time(),
                                   return_when=asyncio.FIRST_COMPLETED)
                if discovery.done():
                    if discovery.cancelled() and self._closed:   # close() stopped it
                        raise _closed_error(method)
                    failed = discovery.exception()
                    if isinstance(failed, OctoError):   # the registry's: each call its own
                        raise own_copy(failed) from failed.__cause__
                    discovery.result()   # (anything else, as it is)
                    break
                if directory.version or directory.start_from_snapshot():
                    break
            else:
                raise CallTimeout(f"no node list of {self.remote_appkey} from the registry "
                                  f"within the call's {timeout:.3g}s (discovery goes on)",
                                  method=method, request_sent=False)
        finally:
            subscription.cancel()
        self._discovered(directory.nodes, directory.rules)
        return max(0.001, timeout - (loop.time() - began))

    def _discovered(self, nodes: Sequence[Node], rules: Sequence[RouteRule]) -> None:
        """A new node list: routing takes those that serve this client's service,
        and the endpoints of nodes that left retire (they close once the calls
        already on them are answered)."""
        nodes = [node for node in nodes if node.serves(self._named_service, self.unified)]
        self._cluster.update(nodes, rules)
        self._listed = {node.address: node for node in nodes}
        self._retired.difference_update([e for e in self._retired if e.finished])
        for address in [address for address in self._endpoints if address not in self._listed]:
            endpoint = self._endpoints.pop(address)
            endpoint.retire()
            self._retired.add(endpoint)     # until it finishes: close() still reaches it

    def _discovery_done(self, attempt: asyncio.Task) -> None:
        if attempt.cancelled() or attempt.exception() is not None:
            self._discovery = None   # its callers have the error; the next call starts anew

    def _node_stopping(self, address: str) -> None:
        """The node at ``address`` said it is stopping: new calls keep away from it for
        a while, as from a node whose connect failed (a registry tells only later,
        and static ``hosts`` never)."""
        for node in self._cluster.router.nodes:
            if node.address == address:
                self._cluster.degrade(node)

    def _endpoint(self, node: Node) -> Endpoint:
        endpoint = self._endpoints.get(node.address)
        if endpoint is None:
            endpoint = Endpoint(node.address, **self._endpoint_options)
            if self._listed is not None and node.address not in self._listed:
                # chosen just before it left (a hedge, a retry): it fails, opening nothing
                endpoint.retire()
                return endpoint
            self._endpoints[node.address] = endpoint
            if self._shut:   # a retry on another node after close(): it fails, opening nothing
                endpoint.close()   # (within close()'s grace it is a call in flight: it goes)
        return endpoint

    async def _connect_to(self, node: Node) -> None:
        """The cluster's probe of a node whose connect failed: a connection, opened
        if need be (within ``connect_timeout``), and no call."""
        endpoint = self._endpoints.get(node.address) or self._endpoint(node)
        await endpoint.connection()

    def _send(self, node: Node, timeout: float,
              call: Tuple[idl.Method, Any, Mapping[str, str], Span]) -> Awaitable[Any]:
        """One attempt on one node of ``call`` (method, request, tags, span). With a
        connection ready the request is written now and the reply's future
        returned: the reply is decoded as it is read (``_result``), and the caller
        awaits no coroutine of ours."""
        method, request, tags, span = call
        # (_endpoint only for a node's first call: this is every call's path)
        endpoint = self._endpoints.get(node.address) or self._endpoint(node)
        conn = endpoint.ready()
        if conn is None or conn.write_paused:
            return self._send_when_ready(endpoint, conn, method, request, timeout, tags, span)
        return self._start(conn, method, request, timeout, tags, span)

    async def _send_when_ready(self, endpoint: Endpoint, conn: Optional[ClientConnection],
                               method: idl.Method, request: Any, timeout: float,
                               tags: Mapping[str, str], span: Span) -> Any:
        """The slow way: connect first, or wait while the server reads nothing of
        what this connection sent (more requests would only pile up in memory)."""
        deadline = time.monotonic() + timeout
        try:
            if conn is None:
                conn = await endpoint.connection(timeout)
            await conn.drained(max(0.0, deadline - time.monotonic()), method.name)
        except OctoError as exc:
            exc.method = exc.method or method.name
            raise
        return await self._start(conn, method, request, max(0.001, deadline - time.monotonic()),
                                 tags, span)

    def _start(self, conn: ClientConnection, method: idl.Method, request: Any, timeout: float,
               tags: Mapping[str, str], span: Span) -> "asyncio.Future[Any]":
        seq = conn.next_sequence()
        limit, depth = conn.max_frame_size, conn.max_depth
        try:
            if self.unified:
                data = self._request_frame(method, request, seq, timeout, tags, span, limit, depth)
            else:
                msg_type = TMessageType.ONEWAY if method.oneway else TMessageType.CALL
                name = self._wire_names[method.name]
                data = (protocol.encode_framed_message(name, msg_type, seq, request,
                                                       max_depth=depth)
                        if self._framed
                        else _codec.encode_message(name, msg_type, seq, request,
                                                   check_required=True, max_depth=depth))
            if len(data) > limit:   # (the size check's own call only when it may refuse)
                protocol.check_frame_size(data, not self.unified and self._framed, limit,
                                          "request")
        except EncodeError as exc:     # the caller's values: nothing was sent
            exc.method, exc.node = method.name, conn.node
            raise
        if method.oneway:
            if conn.closed:
                raise TransportError("connection closed before the request was sent",
                                     method=method.name, node=conn.node, request_sent=False)
            conn.send(data)
            sent = conn.loop.create_future()
            sent.set_result(None)
            return sent
        reply = conn.expect(seq, timeout, method.name, self._finishers[method.name])
        conn.send(data)
        return reply

    def _request_frame(self, method: idl.Method, request: Any, seq: int, timeout: float,
                       tags: Mapping[str, str], span: Span, limit: int, depth: int) -> bytes:
        """The unified request frame; its header is written from these fields."""
        call_type = _NO_REPLY if method.oneway else _REPLY
        ms = timeout * 1000
        # min(max(1, int(ms)), _MAX_TIMEOUT_MS), with no call but int's on the usual path
        timeout_ms = int(ms) if 1.0 <= ms < _MAX_TIMEOUT_MS else 1 if ms < 1.0 else _MAX_TIMEOUT_MS
        context = tags if type(tags) is dict else dict(tags)
        if self._signer is None and not self._flags & protocol.COMPRESSED:
            return _codec.encode_request(
                self._flags, _NORMAL, self.service_name, seq, call_type, timeout_ms,
                self.appkey, span.trace_id, span.span_id, context, None,
                method.name, _CALL, seq, request, depth)
        body = _codec.encode_message(method.name, _CALL, seq, request,
                                     check_required=True, max_depth=depth)
        signature = (self._signer.headers(self.service_name, method.name, body)
                     if self._signer is not None else None)
        head = _codec.request_header_bytes(
            _NORMAL, self.service_name, seq, call_type, timeout_ms,
            self.appkey, span.trace_id, span.span_id, context, signature)
        return protocol.frame_unified(head, body, self._flags, limit)

    def _result(self, method: idl.Method, frame: Frame, node: str) -> Any:
        head = frame.head
        if head is not None and head.status != _SUCCESS and not frame.body:
            status, text = head.status, head.message or f"status {head.status}"
            if status not in _STATUSES:   # not an OCTO status (§2): the peer's fault, said as such
                status, text = Status.REMOTE_EXCEPTION, f"{text} (undefined status {status})"
            error = _ERRORS_BY_STATUS.get(status, RemoteError)
            if status == Status.TRANSPORT_EXCEPTION and protocol.DEADLINE_PASSED in text:
                error = CallTimeout   # the node timed it out by the caller's deadline
            elif status == Status.SECURITY_EXCEPTION:
                text += self._signing_hint(text)
            refusal = error(text, status=status, method=method.name, node=node)
            refusal.from_peer = True     # the node's verdict (status 5: on the request)
            raise refusal
        try:
            msg_type, result = _codec.decode_reply(
                method.result_cls, TApplicationException, frame.body, self._limits,
                -1 if head is None else head.sequence_id, method.name)
        except DecodeError as exc:
            raise DecodeError(f"bad reply: {exc}", offset=exc.offset, method=method.name,
                              node=node) from None
        if msg_type == _EXCEPTION:
            error = (_ERRORS_BY_STATUS.get(head.status, ApplicationError) if head is not None
                     else RpcError if result.type == protocol.LOADSHEDDING   # refused, not run
                     else ApplicationError)
            raise _application_exception(
                error, _text(result.message) or _unexplained(result.type), result.type,
                method, node)
        # success first, then the declared exceptions: the order in which thriftpy2's
        # and Apache's clients read a result (a result may carry both)
        if method.returns_value and result.success is not None:
            return result.success
        for field, _ in method.exceptions:
            declared = getattr(result, field)
            if declared is not None:
                raise declared
        if not method.returns_value:
            return None
        # the node's answer, as thriftpy2 and Apache read it
        raise _application_exception(ApplicationError, "the reply carries no result "
                                     "(MISSING_RESULT)", TApplicationException.MISSING_RESULT,
                                     method, node)

    def _signing_hint(self, refusal: str) -> str:
        """What this client signed with, for a server that refused the signature: the
        server cannot tell a wrong token from a wrong ``remote_appkey`` (both sign)."""
        if refusal.startswith("unsigned") and self._signer is None:
            return " (this client signs nothing: give it token= and remote_appkey=)"
        if refusal.startswith("bad-signature") and self._signer is not None:
            return (f" (signed as {self.appkey!r} for remote_appkey {self.remote_appkey!r}: "
                    "is that the server's appkey, and the token the server holds for this one?)")
        return ""

    async def close(self, grace: float = 0.0) -> None:
        """Close every connection; calls still waiting (connecting too) fail with
        ``TransportError``. With ``grace`` (seconds), calls made from now on are
        refused at once (``ClientClosed``), but those in flight get up to that
        long to end first (a gateway's drain; a close cancelled meanwhile ends the
        grace, not the closing). From another event loop than the
        client's, the closing is handed to the client's loop if it still runs
        (its connections live there), and is left to that loop's own closing if
        not."""
        grace = finite_number("grace", grace, zero_ok=True)
        self._closed = True
        self._loop_thread = None     # every call now takes the slow path, which refuses it
        if self._collected is not None:
            self._collected.detach()
        if self._inherited:          # the connections, and the loop they live on, are the parent's
            return
        loop = self._loop
        if loop is None or loop is asyncio.get_running_loop():
            await self._shutdown(grace)
        elif loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(grace), loop)

    def _inherited_by_fork(self) -> None:
        """In a child of ``os.fork()``: every call is refused, and nothing of the
        parent's (its connections, registry session, loop) is written to or closed."""
        self._inherited = True
        self._loop_thread = None     # every call takes the slow path, which refuses it
        if self._collected is not None:   # nothing of the parent's is closed from here
            self._collected.detach()
        self._cluster.close()        # nor does a probe of the parent's dial from the child

    def _parts(self) -> Tuple[Cluster, Dict[str, Endpoint], Set[Endpoint], Optional[Directory],
                              Optional[Registry]]:
        """What closing the client closes (none of it refers back to the client)."""
        directory = self._directory
        return (self._cluster, self._endpoints, self._retired, directory,
                directory.registry if directory is not None and self._owns_registry else None)

    async def _shutdown(self, grace: float = 0.0) -> None:
        try:
            if grace:
                await self._drained(grace)
        finally:
            # (also when the close is given up on in its grace, an asyncio.timeout
            # around it: the grace ends there, not the closing -- else the connections
            # stayed open for good, the client refusing every call)
            if self._discovery is not None:
                self._discovery.cancel()   # the first calls waiting for it fail as closed
            self._shut = True
            await _close_parts(*self._parts())

    async def _drained(self, grace: float) -> None:
        """Wait, ``grace`` seconds at most, until no call is in flight (in the
        middleware too). (A poll: a close's, so that no call pays for telling one
        it has ended.)"""
        loop = asyncio.get_running_loop()
        until = loop.time() + grace
        while (self._in_middleware or any(stats.in_flight for _, stats in self.metrics.items())) \
                and loop.time() < until:
            await asyncio.sleep(min(_DRAIN_POLL, max(0.0, until - loop.time())))

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await AsyncClient.close(self)


#: The public attributes of an ``AsyncClient`` that a ``Client`` shows, read-only.
_SHARED_ATTRIBUTES = frozenset({"service", "service_name", "appkey", "remote_appkey", "timeout",
                                "unified", "metrics"})
#: The names both clients keep for themselves (their public attributes): an IDL
#: method so named is called by name, ``client.call("close")``. One set for both
#: classes and every call mode, so a method is reached the same way everywhere.
RESERVED_NAMES = frozenset({"call", "close", "future", "callback", "timeout_of"}) \
    | _SHARED_ATTRIBUTES


def _binds(client: Any, name: str) -> bool:
    """Does IDL method ``name`` become an attribute of ``client``? Not when reserved,
    nor when it would hide one of the client's private attributes (a slot not yet
    set is one too)."""
    return name not in RESERVED_NAMES and not hasattr(client, name) \
        and not hasattr(type(client), name)


def _seconds(name: str, seconds: Any) -> float:
    """``seconds``, at most the longest deadline the wire carries (about 24.8 days;
    so no arithmetic on it overflows); ``ValueError`` unless a positive, finite number."""
    return min(finite_number(name, seconds), _MAX_TIMEOUT_MS / 1000)


def _check_options(*, protocol: str, framed: bool, multiplexed: bool, compression: Optional[str],
                   max_frame_size: int, limits: Optional[Limits], timeout: float,
                   connect_timeout: float, timeouts: Optional[Mapping[str, float]],
                   heartbeat_interval: Optional[float], pool_size: int) -> Tuple[float, float]:
    """``AsyncClient``'s options that need nothing else checked (``ValueError``,
    ``TypeError``), and a warning for times that read as milliseconds; returns
    ``timeout`` and ``connect_timeout`` in seconds."""
    if protocol not in ("octo", "thrift"):
        raise ValueError("protocol must be 'octo' or 'thrift'")
    if (multiplexed or not framed) and protocol != "thrift":
        raise ValueError("framed and multiplexed apply to protocol='thrift' (the unified "
                         "protocol has its own framing and names the service)")
    if compression not in _COMPRESSION_FLAGS:
        raise ValueError("compression must be None, 'gzip' or 'snappy'")
    FrameDecoder(max_frame_size)   # the reader's own check: ValueError when too small
    _check_limits(limits)
    if not _MADE_FOR_CLIENT.get():   # (a blocking Client warned its own caller)
        _warn_if_milliseconds(dict(timeout=timeout, connect_timeout=connect_timeout,
                                   timeouts=timeouts), stacklevel=4)   # (through __init__)
    seconds = _seconds("timeout", timeout), _seconds("connect_timeout", connect_timeout)
    _seconds("heartbeat_interval", heartbeat_interval or 1.0)   # 0/None: off
    if isinstance(pool_size, bool) or not isinstance(pool_size, int):
        raise TypeError(f"pool_size is a whole number of connections per node, "
                        f"not {pool_size!r}")
    return seconds


def _make_signer(appkey: str, token: Optional[Union[str, bytes]], remote_appkey: str,
                 sign_body: bool) -> Optional[Signer]:
    """What signs every unified request, if a ``token`` is given."""
    if token is None:
        return None
    if not remote_appkey:
        raise ValueError("token= needs remote_appkey=: the signature covers the appkey of "
                         "the server it is for")
    return Signer(appkey, token, remote_appkey, sign_body=sign_body)


def _call_soon(callback: Callable[[], Any]) -> None:
    """``call_soon`` on the running loop (an ``InflateBudget``'s refill: a client
    is made before it knows its loop, and charges only from there)."""
    asyncio.get_running_loop().call_soon(callback)


def _within(deadline: float, timeout: float, method: idl.Method) -> float:
    """``timeout`` cut to end by ``deadline`` (the handled call's); ``CallTimeout``,
    unsent, when it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        late = CallTimeout(f"not sent: the deadline of the call being handled passed "
                           f"{-left:.3g}s ago (calls meant to outlive it: "
                           "octo_core.context.detached())", method=method.name,
                           request_sent=False)
        late.inherited_deadline = True
        raise late
    return left if left < timeout else timeout


#: A timeout of at least this many seconds was most likely meant in milliseconds.
_LIKELY_MILLISECONDS = 1000.0


def _warn_if_milliseconds(options: Mapping[str, Any], stacklevel: int = 3) -> None:
    """Warn the caller of the client's maker of a ``timeout``, ``connect_timeout`` or
    ``timeouts`` entry that reads as milliseconds: thriftpy2's are, and its
    ``timeout=3000`` would be 50 minutes here. (``stacklevel``: that caller's, as
    ``warnings.warn`` counts; by default, this is called from the maker.)"""
    timeouts = options.get("timeouts")
    values = dict(timeout=options.get("timeout"), connect_timeout=options.get("connect_timeout"),
                  **{f"timeouts[{name!r}]": value for name, value in
                     (timeouts.items() if isinstance(timeouts, Mapping) else ())})
    for name, value in values.items():
        if is_finite_number(value) and value >= _LIKELY_MILLISECONDS:
            warnings.warn(f"{name}={value:g} is {value / 60:,.0f} minutes: octo_core's timeouts "
                          f"are in seconds (thriftpy2's are in milliseconds; "
                          f"{name}={value / 1000:g} is {value / 1000:g} seconds)", UserWarning,
                          stacklevel=stacklevel)


def _unheard_hint(unified: bool, framed: bool, multiplexed: bool, service_name: str,
                  ssl: Optional["_ssl.SSLContext"]) -> str:
    """What calls are told when a node closes their connection without a byte
    (``Endpoint``'s ``unheard_hint``): the protocol, transport or service name it
    may want instead."""
    tls = "" if ssl is not None else _TLS_UNHEARD_HINT
    if unified:
        return _UNIFIED_UNHEARD_HINT.format(tls=tls) + _OCTO_UNHEARD_HINT
    return (_NATIVE_UNHEARD_HINTS[bool(framed)].format(tls=tls)
            + _MULTIPLEXED_UNHEARD_HINTS[bool(multiplexed)].format(service_name=service_name)
            + _OCTO_UNHEARD_HINT)


def _argument_error(method: idl.Method, args: tuple, kwargs: Dict[str, Any],
                    exc: TypeError) -> str:
    """What a call's arguments got wrong, said of the IDL method (the argument struct's
    own message names ``__init__`` and counts its ``self`` among the arguments)."""
    signature = f"{method.name}({', '.join(method.arg_names)})"
    if len(args) > len(method.arg_names):
        count = len(method.arg_names)
        return f"{signature} takes {count} argument{'s' * (count != 1)}, {len(args)} were given"
    unknown = [name for name in kwargs if name not in method.arg_names]
    if unknown == ["timeout"]:
        return (f"{signature} has no argument 'timeout'; a call's own deadline is "
                f"client.call({method.name!r}, ..., timeout=seconds)")
    if unknown:
        return f"{signature} has no argument {', '.join(map(repr, unknown))}"
    return f"{signature}: {exc}"


def _text(message: Any) -> Optional[str]:
    """A TApplicationException's message as text: one that is not UTF-8 (a C++
    server's, in GBK say) decodes to its bytes, which are shown escaped."""
    if isinstance(message, bytes):
        return message.decode("utf-8", "backslashreplace")
    return message


#: TApplicationException types by number (Apache Thrift's, thriftpy2 has the first
#: eight; then fbthrift's LOADSHEDDING, ``protocol.LOADSHEDDING``).
_APPLICATION_EXCEPTION_TYPES = (
    "UNKNOWN", "UNKNOWN_METHOD", "INVALID_MESSAGE_TYPE", "WRONG_METHOD_NAME",
    "BAD_SEQUENCE_ID", "MISSING_RESULT", "INTERNAL_ERROR", "PROTOCOL_ERROR",
    "INVALID_TRANSFORM", "INVALID_PROTOCOL", "UNSUPPORTED_CLIENT_TYPE", "LOADSHEDDING")


def _unexplained(kind: Any) -> str:
    """What a TApplicationException that came without a message is said as: its
    type by name (thriftpy2's server sends UNKNOWN_METHOD so, for a method its
    IDL, older than the caller's, lacks)."""
    if kind == TApplicationException.UNKNOWN_METHOD:
        return "the node has no such method (UNKNOWN_METHOD: its IDL may be older)"
    if isinstance(kind, int) and 0 <= kind < len(_APPLICATION_EXCEPTION_TYPES):
        return f"application exception {_APPLICATION_EXCEPTION_TYPES[kind]} (type {kind})"
    return f"application exception type {kind}"


def _application_exception(error: type, text: str, kind: int, method: idl.Method,
                           node: str) -> OctoError:
    """The node's TApplicationException (``kind``: its type) as the caller's ``error``."""
    failure = error(text, method=method.name, node=node)
    failure.type = kind
    failure.from_peer = True
    return failure


def _declared(method: idl.Method, exc: BaseException) -> bool:
    """Is ``exc`` one of the method's declared IDL exceptions (a business answer)?"""
    return any(isinstance(exc, cls) for _, cls in method.exceptions)


def static_node(appkey: str, host: str) -> Node:
    """A ``Node`` for an address given by hand (``host:port`` or ``unix:///path``);
    ``TypeError`` or ``ValueError`` for what no server can be at."""
    if not isinstance(host, str):
        raise TypeError(f"hosts holds addresses as strings, 'host:port' or 'unix:///path', "
                        f"not {host!r}")
    address = parse_address(host)
    if address.path is not None:
        return Node(appkey=appkey, ip=host, port=0)
    assert address.host is not None and address.port is not None   # parse_address: no path
    if "/" in address.host:   # "http://host:port": it would be looked up as a host name
        raise ValueError(f"address {host!r} is not host:port or unix:///path")
    if address.port == 0:
        raise ValueError(f"address {host!r} has port 0, where no server listens: a "
                         "Server(port=0) has its port once started (read server.address "
                         "after await server.start(), or inside `with server`)")
    return Node(appkey=appkey, ip=address.host, port=address.port)


def protocol_flags(checksum: bool) -> int:
    """The unified frame's protocol byte for a thrift body, with or without a checksum."""
    return protocol.DEFAULT_FLAGS | (protocol.FLAG_CHECKSUM if checksum else 0)



async def _close_parts(cluster: Cluster, endpoints: Dict[str, Endpoint], retired: Set[Endpoint],
                       directory: Optional[Directory], registry: Optional[Registry]) -> None:
    """Close an ``AsyncClient``'s probes and connections, its directory and the
    registry it opened."""
    cluster.close()
    for endpoint in [*endpoints.values(), *retired]:
        endpoint.close()
    if directory is not None:
        await directory.close()
    if registry is not None:
        await registry.close()
    await asyncio.sleep(0)


def _close_collected_async(loop: asyncio.AbstractEventLoop, *parts: Any) -> None:
    """An ``AsyncClient`` collected without ``close()``: close what it holds on its
    loop (the collector may run on any thread), and say so."""
    try:
        loop.call_soon_threadsafe(lambda: loop.create_task(_close_parts(*parts)))
    except RuntimeError:   # the loop is closed: so are its connections
        return
    warnings.warn("an octo_core AsyncClient was collected without close(): it is being closed",
                  ResourceWarning)


def _weak_method(method: Callable[..., Any],
                 gone: Callable[..., Any] = lambda *args: None) -> Callable[..., Any]:
    """``method``, called only while its object lives, else ``gone`` with the same
    arguments (a subscription, a probe, that keeps nothing alive)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> Any:
        bound = ref()
        return gone(*args) if bound is None else bound(*args)
    return call


def _probe_of_a_closed_client(node: Node) -> Awaitable[None]:
    """The cluster's probe once its client is collected (which closes the cluster
    and its probes: a probe on its way meanwhile fails)."""
    raise ClientClosed(node=node.key, request_sent=False)


def _not_picklable(client: Any) -> TypeError:
    """What pickling a client raises: its connections, loop and threads live in
    this process only."""
    return TypeError(f"an octo_core {type(client).__name__} cannot be pickled (its connections "
                     "belong to this process): make one in each process, from the same "
                     "arguments (a blocking Client made before os.fork() works in the child)")


def _closed_error(method: Optional[str] = None) -> TransportError:
    return ClientClosed(method=method, request_sent=False)


#: The timeout a call through the middleware was given (``_through``), for its
#: innermost step; None: the client's for the method.
_OWN_TIMEOUT: contextvars.ContextVar[Optional[float]] = contextvars.ContextVar(
    "octo_core_own_timeout", default=None)
#: Set while a blocking ``Client`` makes its ``AsyncClient``.
_MADE_FOR_CLIENT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "octo_client_made_for_client", default=False)
