"""``Server``: many thrift services on one port, unified protocol and framed thrift alike."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import ipaddress
import logging
import operator
import os
import signal
import socket
import ssl as _ssl
import threading
import time
import warnings
import weakref
from typing import (Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeGuard,
                    TypeVar, Union)

from thriftpy2.thrift import TApplicationException, TMessageType

from octo_core import _codec, idl, protocol
from octo_core import context as _context
from octo_core.afterfork import release_in_child, tell_forked_children
from octo_core.auth import Authenticator
from octo_core.blocking import LOOKUPS
from octo_core.business import BusinessPool, LoopInbox
from octo_core.checks import count, finite_number
from octo_core.codec import Limits, _check_limits
from octo_core.errors import CallTimeout, DecodeError, EncodeError, SecurityError, Status
from octo_core.metrics import Metrics, MethodStats, RecentRates, prometheus_text
from octo_core.middleware import Middleware, is_coroutine_function, layers, wrapped
from octo_core.protocol import Frame, MessageType, NodeStatus
from octo_core.quotas import Quotas
from octo_core.reply import Reply
from octo_core.registry import HeartbeatSupport, Node, Registry, open_registry
from octo_core.registry.base import provider_fields
from octo_core.registry.registration import Registration, call_timeout
from octo_core.throttle import Throttle
from octo_core.transport.address import (Address, Listeners, Listening, check_listen_address,
                                        default_route_ip, listen, parse_address,
                                        refuse_a_live_socket)
from octo_core.transport.http import bound_port, serve_metrics
from octo_core.transport.loop import (SERVING_LOOPS, LoopThread, cancel_rest, new_event_loop,
                                     start_task)
from octo_core.transport.server import PartialFrames, ServerConnection, fd_connections
from octo_core.transport.stream import CLOSE_LINGER, READ_BATCH

log = logging.getLogger("octo_core.server")

UNKNOWN = "(unknown)"   # the metrics name of services and methods this server does not have

_Cleanup = TypeVar("_Cleanup", bound=Callable[[], Any])   # what on_stop takes, and gives back

# Enum members every call uses, read as globals: on Python 3.11 ``Status.SUCCESS``
# and the like go through EnumType's __getattr__ hook, several times slower.
_SUCCESS = Status.SUCCESS
_ALIVE = NodeStatus.ALIVE
_HEARTBEATS = (MessageType.NORMAL_HEARTBEAT, MessageType.SCANNER_HEARTBEAT)
_REPLY_MESSAGE = TMessageType.REPLY    # (thriftpy2's: a class attribute, as slow to read)
#: The message types a request may have: a reply or an exception sent to a server
#: (a peer, a proxy, reflecting one back) is no call to run.
_CALL_MESSAGE, _ONEWAY_MESSAGE = TMessageType.CALL, TMessageType.ONEWAY

#: Bytes a call is charged per object its decoded arguments are made of (as
#: ``Limits.max_items`` counts them), on top of its request's: the dearest
#: measured (a one-byte exception: 72; a plain struct or list element: about 40).
#: Without it a small request that inflates to many objects would be counted as
#: a fraction of the memory it holds.
OBJECT_BYTES = 72
#: Bytes every call is charged on top, whatever its request: what it costs the
#: server while it runs (its record, task, coroutine, header), measured at
#: about 2 KB for a coroutine handler waiting. Without it, calls of tiny
#: requests held twenty times what ``max_in_flight_bytes`` counted of them.
CALL_BYTES = 2048

#: Seconds a connection must have been quiet (no call running) before one beyond
#: ``max_connections`` may take its place.
EVICTABLE_AFTER = 1.0

#: Seconds a TLS client may take over its handshake (ms on any network that works).
_TLS_HANDSHAKE_TIMEOUT = 10.0
#: Seconds the server waits, at most, for peers told of a close to close their
#: connections themselves (a stop waits within its grace): what they sent
#: meanwhile is refused (at a stop) or served (an idle connection).
CLOSE_NOTICE = 0.5


_Argv = Callable[[Any], Tuple[Any, ...]]


def _takes_arguments(fn: Callable[..., Any], method: idl.Method) -> bool:
    """Can ``fn`` be called with ``method``'s arguments by position, as calls call it?
    (True when its signature cannot be read: a builtin's, say.) A decorator's
    wrapper is read as it is, not the function it wraps (``functools.wraps``):
    one that supplies an argument of its own takes fewer than what it wraps."""
    try:
        signature = inspect.signature(fn, follow_wrapped=False)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(*method.arg_names)
    except TypeError:
        return False
    return True


def _argv(method: idl.Method) -> _Argv:
    """``method``'s argument values, in order, from its decoded args struct: made
    once per method, a C getter where it can be (every call's path: a list
    comprehension over the names costs a frame and a getattr() per argument)."""
    names = method.arg_names
    if len(names) > 1:
        return operator.attrgetter(*names)
    if names:
        get = operator.attrgetter(names[0])   # (one name: the value, not a 1-tuple)
        return lambda args: (get(args),)
    return lambda args: ()


class _Service:
    """One hosted service. (Slots, not a NamedTuple: every request reads these, and
    CPython 3.11 reads a slot faster than a NamedTuple field.)"""

    __slots__ = ("name", "service", "methods", "handlers", "handler")

    def __init__(self, name: str, service: Any, methods: Dict[str, idl.Method],
                 handlers: Dict[str, Tuple[Callable[..., Any], int, _Argv]],
                 handler: Any) -> None:
        self.name = name
        self.service = service
        self.methods = methods
        # name -> (function, within the middleware; where it runs (_COROUTINE,
        # _INLINE, _POOLED); its argument values from the args struct)
        self.handlers = handlers
        self.handler = handler   # the application's object, its methods unwrapped


#: Where a handler runs: a coroutine as a task on the loop; a plain function on the
#: loop itself (``add_service(..., inline=True)``) or on the business pool.
_COROUTINE, _INLINE, _POOLED = range(3)


def _runs_alike(one: _Service, other: _Service, method: str) -> bool:
    """Do both services run ``method`` alike: the same IDL method (a service and
    the one it extends share its args and result classes) by the same handler
    function? Then a native call by the bare name means one thing, whichever runs it.
    (The handler's own function: the middleware wraps each service's anew.)"""
    mine, theirs = one.methods[method], other.methods[method]
    return (mine.args_cls is theirs.args_cls and mine.result_cls is theirs.result_cls
            and getattr(one.handler, method) == getattr(other.handler, method))


_EVERY_INTERFACE = ("", "0.0.0.0", "::")


def _check_structs(service: str, method: idl.Method) -> None:
    """``ValueError`` when the codec cannot read ``method``'s arguments or write
    its result (an IDL thriftpy2 loads, but no thrift binary peer speaks): found
    here, not by each of its requests."""
    for cls in (method.args_cls, method.result_cls):
        try:
            _codec.check_struct(cls)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{service}.{method.name}: octo_core cannot read or write "
                             f"{cls.__name__}: {exc}") from None


def _check_timeout(name: str, seconds: Any) -> None:
    """``ValueError`` unless ``seconds`` is None or 0 (off) or a positive, finite
    number: a negative one ("-1: off", as elsewhere) had the sweeper sleep a
    negative time, which spun the server's loop."""
    if seconds is None or (seconds == 0 and not isinstance(seconds, bool)):
        return
    finite_number(name, seconds, off="None or 0 (off)")


def _reachable_ip(wildcard: str) -> str:
    """This machine's address for others to call: the source address of its
    default route (a UDP "connect" sends nothing), else its host name's, else
    loopback (blocking: a name lookup may be made)."""
    ip = default_route_ip(ipv6=wildcard == "::")
    if ip is not None:
        return ip
    try:   # (a "::" server is IPv6 only: no IPv4 name or loopback would reach it)
        ip = "::1" if wildcard == "::" else socket.gethostbyname(socket.gethostname())
    except OSError:
        ip = "127.0.0.1"
    log.warning("no default route: registering %s (node={'ip': ...} sets the address "
                "callers should use)", ip)
    return ip


def _machine_local(ip: str) -> bool:
    """Is ``ip`` (a registered node's) reachable from this machine only?"""
    if ip.startswith("unix://") or ip == "localhost":
        return True
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:   # a host name: it may resolve to anything
        return False


class _Unrun(Exception):
    """The call was refused before its handler started: answered with ``status``
    and ``why`` (the handler never ran)."""
    status = Status.RPC_EXCEPTION
    why = ""


class _DeadlinePassed(_Unrun):
    status = Status.TRANSPORT_EXCEPTION
    why = f"{protocol.DEADLINE_PASSED} before the handler ran"


#: What a call cut short by its caller's deadline is answered (status 4).
_PASSED_WHILE_IT_RAN = f"{protocol.DEADLINE_PASSED} while it ran"


class _StoppedUnrun(_Unrun):
    why = "the server stopped before a business thread could run it"


#: Who cancelled a call's coroutine handler (``_Call.cancelled_by``).
_BY_STOP, _BY_DEADLINE = "stop", "deadline"


def _describe(exc: BaseException) -> str:
    """``"Type: message"``; only the type when the exception's ``__str__`` itself fails."""
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:
        return f"{type(exc).__name__} (its message cannot be formatted)"


#: Held while a call that came with no trace makes the one it begins (``_Call._new_trace``).
_NEW_TRACE = threading.Lock()


def _new_trace_lock_in_child() -> None:
    """A forked child's own lock: one a thread held at the fork would never be let go."""
    global _NEW_TRACE
    _NEW_TRACE = threading.Lock()


if hasattr(os, "register_at_fork"):    # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_new_trace_lock_in_child)

#: How much of a name off the wire (an appkey, a trace id) a log line shows.
_LOGGED_NAME = 64


#: The longest trace or span id a server carries on (16 to 32 characters in
#: practice): a call with a longer one begins a trace of its own, or that id,
#: up to the whole 32 KiB a header may hold, would leave no room in the headers
#: of the calls its handler makes, and each would fail to be framed.
_MAX_TRACE_ID = 128


def _continues_trace(head: Optional[_codec.Head]) -> TypeGuard[_codec.Head]:
    """Did the request come with a trace this server carries on (a trace id, and
    ids no longer than ``_MAX_TRACE_ID``)?"""
    if head is None or not head.trace_id:
        return False
    return len(head.trace_id) <= _MAX_TRACE_ID and len(head.span_id or "") <= _MAX_TRACE_ID


def _logged(name: str) -> str:
    """A name off the wire as a log line shows it: a repr (a line break in it
    cannot forge a line), cut to ``_LOGGED_NAME`` characters."""
    return repr(name[:_LOGGED_NAME]) + ("..." if len(name) > _LOGGED_NAME else "")


class _Call(Reply):
    """A request from its frame to its answer: how to answer it, and once it is
    admitted, what it runs and holds. (One object per request, made as its frame
    is dispatched, the call's fields set by ``admit``: every call's path.)"""

    __slots__ = ("method", "service", "seqid", "stats", "started", "span_ends", "size", "head",
                 "deadline", "trace", "cancelled_by")

    def admit(self, service: _Service, method: idl.Method, seqid: int, stats: MethodStats,
              started: float, size: int, head: Optional[_codec.Head],
              deadline: Optional[float]) -> None:
        # request bytes it holds, its arguments' objects and itself too (flow control)
        self.size = size
        self.service = service
        self.method = method
        self.seqid = seqid
        self.stats = stats
        self.started = started
        self.span_ends: Optional[list] = None
        self.head = head
        self.deadline = deadline
        self.trace: Optional[_context.Carried] = None   # made at the start (_call_context)
        self.cancelled_by: Optional[str] = None   # who cancelled its handler: a stop, its deadline

    def carried(self) -> _context.Carried:
        """What its handler's own calls carry on: the caller's globalContext and trace
        (``context._carried``; the header read now, when asked). A call that came
        with no trace (native thrift, a caller that sends none, or ids too long to
        carry on) starts one here."""
        if self.trace is not None:
            return self.trace
        head = self.head
        if not _continues_trace(head):
            return self._new_trace()
        # (a header with a trace id has a span id: see Server._call_context)
        return (head.global_context or _context._NOTHING[0],
                _context._new_span((head.trace_id, head.span_id, None)))

    def _new_trace(self) -> Tuple[Mapping[str, str], _context.Span]:
        """The root span of a trace this call begins, made once: every call its
        handler makes is a child of it, in one trace (made anew for each, they
        would scatter over as many traces, none with the server's span)."""
        with _NEW_TRACE:   # (a plain handler's calls may ask from several threads at once)
            tags, span = self.trace or ({}, None)
            if span is None:
                head = self.head
                tags = (head.global_context if head is not None else None) or {}
                span = _context._child_of(None)
                self.trace = (tags, span)
            return tags, span

    def who(self) -> str:
        """Who sent it, and in which trace, for a log line about it: the peer's
        address, and the appkey and trace id it sent, if any."""
        head, conn = self.head, self.conn
        # (on a unix socket ``peer`` names the server's own socket: see ``caller``)
        said = [f"from {conn.peer}" if conn.peer_ip is not None else "over a unix socket"]
        if head is not None and head.client_appkey:
            said.append(f"appkey {_logged(head.client_appkey)}")
        trace_id = (self.trace[1].trace_id if self.trace is not None and self.trace[1]
                    else head.trace_id if head is not None else None)
        if trace_id:
            said.append(f"trace {_logged(trace_id)}")
        return ", ".join(said)

    def caller(self) -> _context.Caller:
        """Who sent it (``octo_core.context.caller()``, in its handler)."""
        head, conn = self.head, self.conn
        # (on a unix socket ``peer`` names the server's own socket: no address of the peer)
        return _context.Caller((head.client_appkey or "") if head is not None else "",
                               conn.peer if conn.peer_ip is not None else "", self.deadline)


#: Authentication that raised something other than a refusal (a token store's
#: fault): each such call is refused, and the log says why.
_AUTH_BROKEN = Throttle(10.0, log)
#: Connections cut at ``read_timeout`` for a frame still incomplete: a
#: slow-loris peer makes one per connection it opens.
_STALLED = Throttle(10.0, log, logging.INFO)
#: The registry calls a stop's withdrawal of the node may wait for: an attempt in
#: flight, STOPPING, unregister, each bounded by ``registration.call_timeout``.
_WITHDRAWAL_CALLS = 3


def _collected_started(pool: BusinessPool, appkey: str) -> None:
    """A started ``Server`` collected without ``stop()``: end its business threads, and say so."""
    pool.shutdown()
    warnings.warn(f"an octo_core Server ({appkey}) was collected while started, without stop()",
                  ResourceWarning)


class Server:
    """Hosts thrift services on one TCP port or unix socket.

    ``Server(appkey="com.example.echo", host="127.0.0.1", port=0)``; ``host`` may
    also be ``"unix:///path/to.sock"``. Port 0 is a free port, picked by ``start()``:
    ``port`` and ``address`` say which once it has run. The port speaks the unified protocol
    (the header's serviceName picks the service) and native thrift, framed or
    unframed: a method name is enough when one service has it, and
    ``"Service:method"`` (a multiplexed client's) picks the service by the name
    ``add_service`` gave it. Plain-function handlers run on a bounded
    business thread pool (``business_threads`` workers, at most ``business_queue``
    waiting; past that a call is refused at once with status 3, and so is one
    from a connection already holding half of the pool); coroutine
    handlers run on the event loop, each as a task whose first step runs as
    its request is read (one that never suspends answers in the same read).
    Coroutine handlers include partials of async functions and objects with an
    async ``__call__``; a plain function that returns a coroutine (an async
    method behind a plain decorator) runs on the pool, its coroutine on the loop.
    A service added with ``inline=True`` runs its plain functions on the loop
    too (see ``add_service``).

    Protection: ``max_frame_size``, and ``limits`` (``octo_core.codec.Limits``:
    string and container lengths, nesting, objects per decode) for the thrift
    messages, bound what one request may cost; ``max_connections`` (one more
    takes the place of the connection quiet longest, a second at least with no
    call running and no reply going out, its peer told first; else it is closed
    on accept; by default the open-file limit, RLIMIT_NOFILE, at ``start``,
    less an eighth or 128 (528 on asyncio's own loop, which keeps up to 400
    refused sockets open while a peer redials), whichever is more, never below
    half: a server out of descriptors cannot even accept a connection to refuse
    it; the default is each server's and counts connections once their TLS
    handshake is done, so give it yourself for several servers in one process),
    ``max_in_flight`` and ``max_in_flight_per_connection`` (status 3 past them),
    ``max_in_flight_bytes`` (request bytes, as decoded, of every call running
    on the server, and 72 bytes, ``octo_core.server.OBJECT_BYTES``, per object
    its arguments decoded to, and 2 KiB, ``CALL_BYTES``, per call; 256 MiB by
    default, None for no limit: status 3 past it, unless nothing else runs;
    many peers each under their own flow control cannot add up to more),
    ``pause_reading_at`` and ``pause_reading_bytes`` (calls running on one
    connection, and request bytes they hold, counted so, at which the server
    stops reading it until both are down to half: flow control, no refusal;
    reading also stops while a peer leaves its replies unread),
    ``max_partial_bytes`` (what all connections hold of frames partly read, 256
    MiB by default, None for no limit: past it a connection holding part of a
    frame stops reading until the sum is down to half, its read timeout still
    running, but for one at a time that reads on to its frame's end; so peers
    each within ``max_frame_size`` add up to the limit, a frame, and a read of
    each connection, not connections x ``max_frame_size``),
    ``quotas`` (``{caller appkey or "*": calls per second}``, token buckets;
    status 6 past them). A connection idle for ``idle_timeout`` seconds is
    closed (a unified peer is told first, as at a stop, and given half a second
    to leave: a call it sends meanwhile is served, not lost in the close), and
    so is one whose frame takes over ``read_timeout`` seconds to
    arrive however it trickles in (a slow-loris peer holds no buffer for long);
    None (or 0) turns either off. A request whose caller's deadline (the
    unified header's timeout, from its arrival) has passed before its handler
    starts is not run; with ``cancel_past_deadline=True`` a coroutine handler
    still running when it passes is cancelled too (its caller has given up:
    the answer would be dropped), the call counted as timed out (status 4).
    That is off by default: a handler cancelled midway must leave things
    consistent, as one a stop cancels past its grace must.
    ``auth`` (an
    ``octo_core.auth.Authenticator``) requires signed, granted requests; native
    thrift, which cannot carry a signature, is then refused. ``ssl`` serves TLS.

    Naming: with ``registry`` (a URL such as ``file:///var/lib/octo`` or
    ``zk://host:2181``, or a ``Registry``) the server registers itself on
    start (``node`` sets ``Node`` fields: weight, warmup, cell, swimlane, idc,
    region...; a server on every interface, ``0.0.0.0`` or ``::``, registers
    the address its default route uses, unless ``node`` gives ``ip``; a loopback
    address or unix socket registered where other machines look, ``zk://``, is
    warned of: they cannot reach it), and on
    stop first marks itself STOPPING and unregisters, keeps serving for
    ``unregister_delay`` seconds while callers see the change, and only then
    refuses new calls and drains. A registry that cannot be reached at start
    (ZooKeeper away), or does not answer within twice its ``op_timeout``
    (the ``Registry`` attribute: 5 s unless the registry sets its own,
    ZooKeeper the URL's), does not stop the server: it serves, warns, and
    keeps registering in the background (a doubling, jittered pause up to
    30 s, each attempt bounded alike) until the registry takes the node
    (``registered_node`` says when); a stop meanwhile ends the attempts and
    unregisters only what was registered (or what an attempt given up on may
    have), waiting for each registry call no longer either. With
    ``require_registry=True`` such a start fails instead (``RegistryError``;
    ``RegistryTimeout`` when no answer came), leaving nothing behind. With
    ``auth``, a peer on its deny list is refused when it connects (to the
    metrics port too).

    Sight: ``stats()``; with ``metrics_port`` (0 picks a free one: ``metrics_port``
    holds it once started, and the start's log line names it) the metrics
    are also served as Prometheus text at ``http://host:metrics_port/metrics``,
    and the node's status at ``/health`` (a readiness probe's): ``ALIVE`` with
    200, else with 503 (``STOPPING`` from the moment a stop begins: both stay
    served until it ends).
    ``middleware``: functions of the application's around every call of the
    services added (logging, checks, translating errors; see
    ``octo_core.middleware``), the first outermost.

    A handler's undeclared exception is logged (``octo_core.server``, ERROR),
    its traceback with the first of each service, method and exception type
    (and with one after 10 s without any), then a record every 10 s at most
    for each, counting those held back (no traceback): a caller can set one
    off every call.
    """

    def __init__(self, appkey: str, host: str = "127.0.0.1", port: int = 0, *,
                 business_threads: int = 16, business_queue: int = 1024,
                 max_frame_size: int = protocol.DEFAULT_MAX_FRAME_SIZE,
                 limits: Optional[Limits] = None,
                 idle_timeout: Optional[float] = 600.0, read_timeout: Optional[float] = 30.0,
                 max_connections: Optional[int] = None, max_in_flight: Optional[int] = None,
                 max_in_flight_per_connection: Optional[int] = None,
                 max_in_flight_bytes: Optional[int] = 256 * 1024 * 1024,
                 pause_reading_at: int = 1024, pause_reading_bytes: int = 64 * 1024 * 1024,
                 max_partial_bytes: Optional[int] = 256 * 1024 * 1024,
                 quotas: Optional[Mapping[str, float]] = None,
                 auth: Optional[Authenticator] = None,
                 ssl: Optional["_ssl.SSLContext"] = None,
                 registry: Optional[Union[str, Registry]] = None,
                 node: Optional[Mapping[str, Any]] = None,
                 unregister_delay: float = 1.0,
                 require_registry: bool = False,
                 metrics_port: Optional[int] = None,
                 cancel_past_deadline: bool = False,
                 middleware: Sequence[Middleware] = ()) -> None:
        count("business_threads", business_threads)
        count("business_queue", business_queue, 0)
        count("pause_reading_at", pause_reading_at, 2)
        count("pause_reading_bytes", pause_reading_bytes)
        for name, limit in (("max_connections", max_connections),
                            ("max_in_flight", max_in_flight),
                            ("max_in_flight_per_connection", max_in_flight_per_connection),
                            ("max_in_flight_bytes", max_in_flight_bytes),
                            ("max_partial_bytes", max_partial_bytes)):
            count(name, limit, none_ok=True)
        protocol.FrameDecoder(max_frame_size)   # the reader's own check: ValueError when too small
        check_listen_address(host, port)
        _check_timeout("idle_timeout", idle_timeout)
        _check_timeout("read_timeout", read_timeout)
        _check_limits(limits)
        if auth is not None and not isinstance(auth, Authenticator):   # (a token dict, say)
            raise TypeError(f"auth is an octo_core.auth.Authenticator(tokens, ...), not {auth!r}")
        self.appkey = appkey
        self.host = host
        self.port = port
        self.unix_path = parse_address(host).path if host.startswith("unix://") else None
        self.max_frame_size = max_frame_size
        self.limits = limits
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight
        self.max_in_flight_per_connection = max_in_flight_per_connection
        self.max_in_flight_bytes = max_in_flight_bytes
        self.max_partial_bytes = max_partial_bytes
        self.pause_reading_at = pause_reading_at
        self.pause_reading_bytes = pause_reading_bytes
        self.quotas = Quotas(quotas) if quotas else None
        self.auth = auth
        self.ssl = ssl
        self.metrics = Metrics("server")
        self._registry_spec = registry
        self._registry: Optional[Registry] = None
        self._node_fields = provider_fields(node or {})
        self._registration: Optional[Registration] = None
        self.unregister_delay = unregister_delay
        self.require_registry = require_registry
        self.metrics_port = metrics_port
        self.cancel_past_deadline = cancel_past_deadline
        self.middleware = layers(middleware)
        self._metrics_http: Optional[Listeners] = None
        self.status = NodeStatus.STARTING
        # stopping, and saying so (registry, heartbeats) while calls are still served
        self._leaving = False
        # heartbeat load info: calls per second lately (made anew at start())
        self._rates = RecentRates(self.metrics, time.monotonic())
        self._services: Dict[str, _Service] = {}
        self._by_method: Dict[str, List[_Service]] = {}
        self._business_threads = business_threads
        self._business_limit = business_threads + business_queue
        # One connection may hold half the pool (all of a small one): a peer
        # pipelining calls cannot take the whole queue from the others.
        self._business_share = max(business_threads + 1, self._business_limit // 2)
        self._business_pending = 0
        self._pool: Optional[BusinessPool] = None
        self._outcomes: LoopInbox   # the pool's answers, to the loop (made by start())
        self._unix_inode = 0
        self._handlers: Dict[asyncio.Future, _Call] = {}   # coroutine handlers that suspended
        self._listener: Optional[Listening] = None
        self._sweeper: Optional[asyncio.Task] = None
        self._connections: set = set()
        self._in_flight = 0
        self._in_flight_bytes = 0
        # stop()'s wait for the calls in flight: made by stop(), set by the last answer
        # (no event toggled by every call: an eager handler takes it 0 -> 1 -> 0)
        self._drained: Optional[asyncio.Future] = None
        self._stopping: Optional[asyncio.Task] = None   # a stop a handler started
        self._hurry: Optional[asyncio.Future] = None   # done: the stop waits no more (``_stop_now``)
        # Handlers' bugs, logged: a caller can set one off at will, every call
        # (the first of each service, method and exception type with its traceback,
        # and one after a quiet period)
        self._faults = Throttle(10.0, log, logging.ERROR)
        self._inherited = False   # a forked child's copy of a started server
        tell_forked_children(self)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[LoopThread] = None
        self._on_stop: List[Callable[[], Any]] = []
        self._served = False   # a start succeeded, and no stop has run on_stop since

    # --- configuration -------------------------------------------------------------

    def on_stop(self, callback: _Cleanup) -> _Cleanup:
        """Run ``callback()`` (a function, or a coroutine function: awaited) at the
        end of every stop, on the server's loop, once each call is answered or cut
        and the connections are closed, after those added before it (a start that
        fails runs none: the start may be tried again). For what the
        service holds, such as the clients its handlers call through, which a
        ``serve_forever`` or ``with server`` program has no other place to close::

            backend = octo_core.AsyncClient(...)
            server.on_stop(backend.close)

        An exception it raises is logged; the others still run. Each runs to its
        end, even in a stop told to hurry (a second signal): keep them short.
        Returns ``callback`` (so it also serves as a decorator)."""
        if not callable(callback):
            raise TypeError(f"on_stop takes a function, not {callback!r}")
        self._on_stop.append(callback)
        return callback

    def add_service(self, service: Any, handler: Any, name: Optional[str] = None, *,
                    inline: bool = False) -> None:
        """Host ``service`` (a thriftpy2 service class, ``echo_thrift.Echo``) with the
        methods of ``handler`` (an object, ``EchoHandler()``: each call calls its method
        with the IDL's arguments, by position). ``TypeError`` names the methods the
        handler lacks, or whose parameters cannot take those arguments.

        ``name`` is the unified protocol's ``serviceName``; it defaults to the
        IDL service name (``Echo``); set it to match a Java peer's class name.
        ``inline=True`` runs the handler's plain functions on the event loop, as
        its coroutines run, instead of on the business threads (Dubbo's "direct"
        dispatch): for handlers that never block (no I/O, no waiting, no long
        computation), it saves each call two thread hand-overs, about half of a
        lone call's time on the server. A handler that blocks there stalls every
        connection of the loop for as long as it runs. (A native call by the bare
        name of a method two services run alike runs as the one added first does.)
        Native thrift names no service (unless multiplexed): such a call to a
        method two hosted services have is refused as ambiguous, unless both run
        it alike (a service and the one it extends, added with one handler).
        """
        methods = idl.methods(service)   # (first: TypeError for what is no service)
        name = name or service.__name__
        if name in self._services:
            raise ValueError(f"a service named {name!r} is already added")
        missing = [m for m in methods if not callable(getattr(handler, m, None))]
        if missing:
            raise TypeError(f"handler for {name} lacks methods: {', '.join(missing)}")
        if isinstance(handler, type) and any(
                inspect.isfunction(inspect.getattr_static(handler, m)) for m in methods):
            raise TypeError(f"handler {handler.__name__} is a class, whose methods need an "
                            f"instance: add_service(..., {handler.__name__}())")
        unfit = [m for m, declared in methods.items()
                 if not _takes_arguments(getattr(handler, m), declared)]
        if unfit:   # (else every call of them fails, as an ApplicationError at the caller)
            raise TypeError(f"handler for {name} cannot take the IDL's arguments: " + "; ".join(
                f"{m}{inspect.signature(getattr(handler, m), follow_wrapped=False)} for "
                f"{m}({', '.join(methods[m].arg_names)})" for m in unfit))
        for declared in methods.values():
            _check_structs(name, declared)
        handlers = {}
        for method in methods:
            fn = wrapped(self.middleware, name, method, getattr(handler, method))
            runs = _COROUTINE if is_coroutine_function(fn) else _INLINE if inline else _POOLED
            handlers[method] = (fn, runs, _argv(methods[method]))
        entry = _Service(name, service, methods, handlers, handler)
        self._services[name] = entry
        for method in methods:
            hosts = self._by_method.setdefault(method, [])
            # one more service that runs this method alike leaves a native call by
            # its bare name unambiguous (a service hosted beside the one it extends)
            if not any(_runs_alike(host, entry, method) for host in hosts):
                hosts.append(entry)

    def stats(self) -> Dict[str, dict]:
        """Per ``service.method``: see ``Metrics.stats`` (calls, refused, errors by status,
        in-flight, p50/p90/p99 seconds of the calls that ran)."""
        return self.metrics.stats()

    # --- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Bind and listen; afterwards ``port`` holds the bound port. A start that
        fails leaves nothing behind (no socket, thread or registration)."""
        if not self._services:
            raise RuntimeError("add_service() before start()")
        if self._listener is not None:
            raise RuntimeError(f"{self.appkey} is already started on {self.address}")
        previous, self._loop = self._loop, asyncio.get_running_loop()
        # (a stop that timed out may have left these, maybe of another loop)
        self._drained = self._hurry = None
        if previous is not None and previous.is_closed():
            # calls still running when their loop closed can never be answered: none is in
            # flight, and none holds the business queue (the new pool's threads are all free)
            self._in_flight = self._in_flight_bytes = self._business_pending = 0
            self.metrics.forget_in_flight()

        max_connections = self.max_connections
        if max_connections is None:
            max_connections = fd_connections(self._loop)

        partial = (None if self.max_partial_bytes is None
                   else PartialFrames(self.max_partial_bytes))
        # Many peers each sending one compression bomb: one loop pass inflates a
        # batch's worth, not one frame each, so other connections are served between.
        inflate = _codec.InflateBudget(READ_BATCH, self._loop.call_soon)

        def make_connection() -> ServerConnection:
            return ServerConnection(self._dispatch, self._connections, self.max_frame_size,
                                    max_connections, self.pause_reading_at,
                                    self.pause_reading_bytes, admit=self._admit_peer,
                                    max_depth=self.limits.max_depth if self.limits
                                    else protocol.DEFAULT_MAX_DEPTH, partial=partial,
                                    inflate=inflate, make_room=self._let_idlest_go)

        # A TLS handshake comes before any frame and any of the limits on frames:
        # a peer that stalls it may hold its socket this long, no longer.
        tls: Dict[str, Any] = (dict(ssl=self.ssl, ssl_handshake_timeout=_TLS_HANDSHAKE_TIMEOUT)
                               if self.ssl else {})
        # The pool first: one that cannot start its threads leaves no socket behind,
        # and it is there when the first connection comes (at once, maybe).
        pool = BusinessPool(self._business_threads, f"octo-biz-{self.appkey}")
        try:
            if self.unix_path is not None:
                await refuse_a_live_socket(self.unix_path)
                self._listener = await self._loop.create_unix_server(
                    make_connection, self.unix_path, **tls)
                self._unix_inode = os.stat(self.unix_path).st_ino
            else:
                self._listener = await listen(
                    functools.partial(self._loop.create_server, make_connection, **tls),
                    self.host, self.port)
                self.port = self._listener.sockets[0].getsockname()[1]
        except BaseException:
            pool.abandon()
            raise
        self._pool = pool
        self._outcomes = LoopInbox(self._loop, self._pool_done)
        SERVING_LOOPS.setdefault(self._loop, weakref.WeakSet()).add(self)
        # Collected while started (its loop ended without stop()): its business threads
        # would wait for work for ever.
        self._collected = weakref.finalize(self, _collected_started, self._pool, self.appkey)
        self._collected.atexit = False   # at exit the daemon threads just end
        if self.idle_timeout or self.read_timeout:
            self._sweeper = self._loop.create_task(self._sweep())
        self._rates = RecentRates(self.metrics, time.monotonic())
        self._leaving = False
        self.status = NodeStatus.ALIVE
        try:
            if self.metrics_port is not None:
                http_host = "127.0.0.1" if self.unix_path is not None else self.host
                self._metrics_http = await serve_metrics(lambda: prometheus_text(self.metrics),
                                                         http_host, self.metrics_port,
                                                         self._health, self._admit_peer)
                self.metrics_port = bound_port(self._metrics_http)
            if self._registry_spec is not None:
                await self._register()
        except BaseException:
            await self.stop(grace=0)
            raise
        self._served = True
        log.info("%s serving %s on %s%s", self.appkey, ", ".join(self._services), self.address,
                 self._metrics_said())

    def _running(self) -> str:
        """The methods with calls running, and how many each: what a stop cuts short."""
        return ", ".join(f"{service}.{method}: {stats.in_flight}"
                         for (service, method), stats in sorted(self.metrics.items())
                         if stats.in_flight)

    def _metrics_said(self) -> str:
        """Where the start's log line says /metrics and /health are (with ``metrics_port=0``
        under ``serve_forever``, nothing else tells the port picked)."""
        if self._metrics_http is None:
            return ""
        host = "127.0.0.1" if self.unix_path is not None else self.host
        return f"; /metrics and /health on http://{Address(host, self.metrics_port)}"

    def _admit_peer(self, ip: Optional[str]) -> Optional[str]:
        """Why a peer may not connect at all (the deny list), or None."""
        if self.auth is not None:
            try:
                self.auth.check_connection(ip)
            except SecurityError as refused:
                return str(refused)
        return None

    async def _register(self) -> None:
        spec = self._registry_spec
        assert spec is not None   # start() registers only with one
        registry = self._registry = open_registry(spec) if isinstance(spec, str) else spec
        ip, port = (self.address, 0) if self.unix_path is not None else (self.host, self.port)
        if ip in _EVERY_INTERFACE and "ip" not in self._node_fields:   # callers cannot dial 0.0.0.0
            listener = self._listener
            ip = await LOOKUPS.run(_reachable_ip, ip)
            if self._leaving or self._listener is not listener:   # a stop came meanwhile
                return
        fields: Dict[str, Any] = dict(
            appkey=self.appkey, ip=ip, port=port, env=registry.env, startTime=int(time.time()),
            heartbeatSupport=HeartbeatSupport.BOTH,
            serviceInfo={name: {"unifiedProto": 1} for name in self._services})
        fields.update(self._node_fields)
        if not registry.machine_local and _machine_local(fields["ip"]):
            log.warning("%s: registering %s in a registry shared by machines: callers on "
                        "other machines cannot reach a loopback address or a unix socket "
                        "(listen on host='0.0.0.0', or give node={'ip': ...})",
                        self.appkey, fields["ip"])
        where = spec if isinstance(spec, str) else type(registry).__name__
        self._registration = Registration(registry, Node(**fields), where)
        await self._registration.start(required=self.require_registry)

    async def _unregister(self) -> None:
        """Tell callers first: STOPPING, then gone; calls keep being served meanwhile
        (when the registry took the STOPPING mark: else no one is being told)."""
        assert self._registration is not None   # stop() asks only when it has one
        # (forgotten once withdrawn: a stop cancelled before that withdraws it again)
        told = await self._registration.withdraw()
        self._registration = None
        if told and self.unregister_delay > 0:
            await self._stop_waits(None, self.unregister_delay)

    @property
    def registered_node(self) -> Optional[Node]:
        """This server's node as its registry stored it; None without a registry,
        while a registry that was away at start is still being retried, and once
        stopping (a readiness check can wait for it)."""
        registration = self._registration
        return None if registration is None or self._leaving else registration.stored

    @property
    def address(self) -> str:
        """Where clients reach this server: ``host:port``, ``[v6]:port`` or ``unix:///path``."""
        return str(Address(self.host, self.port, self.unix_path))

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight calls finish within ``grace`` seconds, then close.

        Calls that arrive meanwhile are refused with status 3 so callers can go
        elsewhere; none is dropped without an answer. Past the grace, coroutine
        handlers are cancelled (their callers told so with status 4, as when a
        connection is lost mid-call: failover retries idempotent methods), and
        plain-function calls no business thread has started never run (refused
        with status 3: they may be retried elsewhere); a plain function already
        running cannot be stopped (its caller sees the connection close).
        Called from a coroutine
        handler of this server, it starts the stop and returns at once: it
        cannot wait for the very call it runs in (whose answer still goes out).
        Awaited on another loop while the server's own runs (``with server``),
        the stop runs on the server's loop. In a child of ``os.fork()``, a
        server the parent started is the parent's: stopping it there (or leaving
        ``with server``) does nothing.
        """
        if self._listener is None or self._inherited:
            return
        assert self._loop is not None   # start() set it before the listener
        if self._loop is not asyncio.get_running_loop() and self._loop.is_running():
            # its loop runs on another thread (``with server``): the stop runs there
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.stop(grace), self._loop))
            return
        if self._runs_a_handler(asyncio.current_task()):
            self._stopping = self._loop.create_task(self.stop(grace))
            return
        self._leaving = True
        if self._registration is not None:
            await self._unregister()
        self.status = NodeStatus.STOPPING
        self._listener.close()
        notified = self._notify_closing(
            [conn for conn in self._connections if conn.unified_peer and not conn.closed])
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._in_flight:
            if self._drained is None:
                self._drained = self._loop.create_future()
            drained = self._drained
            await self._stop_waits(drained, grace)
            if not drained.done():
                log.warning("%s: %d calls still running %s (%s); cancelling the coroutine "
                            "handlers and the calls no business thread has started", self.appkey,
                            self._in_flight, "when told to stop at once" if self._hurried().done()
                            else f"after {grace:.1f}s grace", self._running())
                # (each refuses its caller: it never ran)
                self._pool.cancel_pending()  # type: ignore[union-attr]  # started: start() made it
                for task, call in list(self._handlers.items()):
                    call.cancelled_by = _BY_STOP
                    task.cancel()           # each answers its caller with an error
                await asyncio.sleep(0)
        # Requests a notified peer sent before it read the notice are still read and
        # refused (status 3) rather than dropped unread at the close: until it has
        # closed the connection (an octo_core client closes one it was told of
        # once its calls are answered), for at most CLOSE_NOTICE.
        await self._stop_waits_while(lambda: bool(self._connections.intersection(notified)),
                                     min(grace, CLOSE_NOTICE))
        for conn in list(self._connections):
            conn.shutdown()
        # what is written goes out, but a peer that reads nothing (or a plain function
        # still running on a connection) does not hold the stop
        await self._stop_waits_while(lambda: bool(self._connections), CLOSE_LINGER)
        for conn in list(self._connections):
            conn.abort()
        await asyncio.sleep(0)
        if self._metrics_http is not None:   # last: /health said STOPPING all along
            self._metrics_http.close()
            self._metrics_http = None
        self._collected.detach()
        assert self._pool is not None   # start() made it before the listener
        self._pool.shutdown()
        self._listener = None
        SERVING_LOOPS[self._loop].discard(self)
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.unix_path).st_ino == self._unix_inode:   # still ours
                    os.unlink(self.unix_path)
        if self._registry is not None:
            if isinstance(self._registry_spec, str):    # we opened it, we close it
                await self._registry.close()
            self._registry = None
        self._leaving = False
        self._hurry = None
        self.status = NodeStatus.STOPPED
        # (not after a start that failed: what the service holds is kept for a retry)
        served, self._served = self._served, False
        for callback in self._on_stop if served else ():
            try:
                outcome = callback()
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception:
                log.exception("%s: on_stop callback %r failed", self.appkey, callback)

    def _hurried(self) -> asyncio.Future:
        """The future whose result ends the stop's waits (made at its first use)."""
        if self._hurry is None:
            assert self._loop is not None   # started: start() set it
            self._hurry = self._loop.create_future()
        return self._hurry

    async def _stop_waits(self, future: Optional[asyncio.Future], seconds: float) -> None:
        """A stop's wait: for ``future`` (None: nothing), ``seconds`` at most, and
        no longer once ``_stop_now`` is called."""
        await asyncio.wait([f for f in (future, self._hurried()) if f is not None],
                           timeout=seconds, return_when=asyncio.FIRST_COMPLETED)

    async def _stop_waits_while(self, busy: Callable[[], bool], seconds: float) -> None:
        """A stop's wait for connections to close: while ``busy()``, ``seconds`` at
        most, and no longer once ``_stop_now`` is called (a hurried stop closes them)."""
        loop, hurry = self._loop, self._hurried()
        assert loop is not None   # started: start() set it
        until = loop.time() + seconds
        while busy() and not hurry.done() and loop.time() < until:
            await asyncio.sleep(0.01)

    def _stop_now(self) -> None:
        """(On the server's loop.) Cut the stop under way, or the next one, short:
        no more of ``unregister_delay`` or of the grace; the calls still running
        are ended as when the grace runs out (a second Ctrl-C)."""
        hurry = self._hurried()
        if not hurry.done():
            hurry.set_result(None)

    def _notify_closing(self, conns: List[ServerConnection]) -> List[ServerConnection]:
        """Tell the peers of ``conns`` (unified ones: native thrift has no such
        message) that their connection is about to close, so they send no more
        calls on it: octo_core's close notice, on PROTOCOL.md §3's heartbeats, a
        reply with sequenceId -1 and this node's status (STOPPING at a stop), which
        a client that does not know it drops as a reply to nothing. Returns ``conns``."""
        notice = self._heartbeat_frame(protocol.CLOSE_NOTICE_SEQUENCE,
                                       MessageType.NORMAL_HEARTBEAT)
        for conn in conns:
            conn.send(notice)
        return conns

    def _inherited_by_fork(self) -> None:
        """In a child of ``os.fork()``, a server the parent started is the parent's:
        stopping it there would shut the parent's connections, unlink its socket
        path and unregister its node. ``stop()`` leaves it all alone; the child's
        copies of its listening sockets close now (each connection closes its own),
        so the port closes when the parent stops."""
        listener = self._listener
        self._inherited = listener is not None
        if listener is not None:
            self._collected.detach()
            listening = [*listener.sockets,
                         *(self._metrics_http.sockets if self._metrics_http else ())]
            release_in_child(sock.fileno() for sock in listening)

    def _runs_a_handler(self, task: Optional[asyncio.Task]) -> bool:
        """Is ``task`` one of this server's coroutine handlers? (Read off its
        coroutine: nothing is marked per call for the rare stop from a handler.)"""
        frame = getattr(task.get_coro(), "cr_frame", None) if task is not None else None
        return (frame is not None and frame.f_code is Server._run_coroutine.__code__
                and frame.f_locals.get("self") is self)

    def serve_forever(self, grace: float = 5.0) -> None:
        """Run the server on a new event loop until SIGINT or SIGTERM, then stop it
        (from the main thread: only it receives signals), giving the calls in
        flight ``grace`` seconds (see ``stop``). A second signal stops it at once:
        the rest of the grace, and of ``unregister_delay``, is not waited for (as
        when the grace runs out, coroutine handlers are cancelled and their callers
        told so, calls not started are refused, and the callers of plain functions
        still running see their connection close). Tasks still running on the loop
        once the server has stopped (a handler's background work) are cancelled
        before it closes, as ``asyncio.run`` does; clients the handlers call
        through are the service's own to close, in an ``on_stop`` callback."""
        loop = new_event_loop()

        async def main() -> None:
            signalled = asyncio.Event()

            def on_signal() -> None:
                if signalled.is_set():
                    log.warning("%s: signalled again: stopping at once", self.appkey)
                    self._stop_now()
                signalled.set()

            for sig in (signal.SIGINT, signal.SIGTERM):   # before start: it serves at once
                loop.add_signal_handler(sig, on_signal)
            await self.start()
            await signalled.wait()
            await self.stop(grace)

        try:
            loop.run_until_complete(main())
        finally:
            # as asyncio.run and ``with server`` do: what the service left running
            # (an AsyncClient's heartbeats, a handler's background task) is
            # cancelled, not destroyed pending by the close
            loop.run_until_complete(cancel_rest())
            loop.close()

    def __enter__(self) -> "Server":
        """Start the server on a loop thread of its own; leaving the ``with``
        stops it (a Ctrl-C during that stop makes it at once: see ``serve_forever``).
        A Ctrl-C that lands while the start is under way, or as it ends, stops
        what the start started (as leaving the ``with`` does) before it goes on."""
        thread = LoopThread(f"octo-server-{self.appkey}")
        starting = thread.submit(self.start)
        try:
            starting.result()
        except BaseException as exc:
            if starting.done() and not starting.cancelled() and starting.exception() is exc:
                thread.stop()   # the start failed (already started, say: that one keeps its thread)
                raise
            self._thread = thread   # interrupted: once the start ends, the stop
            try:
                concurrent.futures.wait([starting])   # (the start bounds its own waits)
            except BaseException:   # interrupted again: no waiting for the start
                starting.cancel()
                thread.stop()
                raise
            self.__exit__(None, None, None)
            raise
        self._thread = thread
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._inherited:   # a forked child's: its I/O thread and all it serves are the parent's
            return
        thread = self._thread
        assert thread is not None   # __enter__ set it
        try:
            # bounded: a loop that died cannot hold the exit (stop takes its grace
            # of 5 s, the node's withdrawal and unregister_delay, a close notice, a
            # linger, and a margin). Reckoned first: a Ctrl-C once the stop is under
            # way must find this thread waiting for it, to make it stop at once.
            registry = self._registry
            withdrawal = 0.0 if registry is None else \
                _WITHDRAWAL_CALLS * call_timeout(registry) + self.unregister_delay
            bound = withdrawal + CLOSE_NOTICE + CLOSE_LINGER + 5.0
            stopping = thread.submit(self.stop)
            try:
                stopping.result(5.0 + bound)
            except KeyboardInterrupt:   # Ctrl-C (again): stop at once, not half-way, then go on
                thread.loop.call_soon_threadsafe(self._stop_now)
                stopping.result(bound)
                raise
        finally:
            thread.stop()

    async def __aenter__(self) -> "Server":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def _sweep(self) -> None:
        """Close connections idle too long, or stuck on a partial frame too long."""
        limits = [t for t in (self.idle_timeout, self.read_timeout) if t]
        period = min(min(limits) / 2, 5.0)
        assert self._loop is not None   # start() set it before starting this
        while True:
            await asyncio.sleep(period)
            self._sweep_once(self._loop.time())

    def _sweep_once(self, now: float) -> None:
        """One pass of ``_sweep``, in a frame of its own: the connection it looked at
        last is not kept alive while the sweep sleeps (for good, once none is left)."""
        for conn in list(self._connections):
            quiet = now - conn.last_read
            reading = None if conn.frame_started is None else now - conn.frame_started
            if self.read_timeout and reading is not None and reading > self.read_timeout \
                    and not conn.paused_for_itself:   # our pause, not the peer's stall
                _STALLED.log("closing %s: a frame still incomplete after %.3gs",
                             conn.peer, reading)
                conn.abort()
            elif self.idle_timeout and quiet > self.idle_timeout and not conn.in_flight:
                self._close_idle(conn, now)
            else:
                conn.told_idle_at = None   # (busy again: a later idle spell tells it anew)

    def _let_idlest_go(self) -> bool:
        """At ``max_connections``, a new connection takes the place of the one idle
        longest (no call running, nothing arriving, no reply still going out, quiet
        ``EVICTABLE_AFTER`` seconds at least), whose peer is told first as at an
        idle close: else idle sockets, a peer's pile of them, would keep every
        newcomer out until ``idle_timeout``. Returns whether one was let go."""
        assert self._loop is not None   # (connections come once started)
        quiet_since = self._loop.time() - EVICTABLE_AFTER
        idle = [conn for conn in self._connections
                if not conn.in_flight and conn.frame_started is None and not conn.closed
                and conn.last_read <= quiet_since and not conn.replies_unread()]
        if not idle:
            return False
        conn = min(idle, key=lambda c: c.last_read)
        self._connections.discard(conn)   # (its place is the newcomer's now)
        log.info("closing idle connection %s: at max_connections, for a new one", conn.peer)
        if conn.unified_peer:
            self._notify_closing([conn])
        conn.close()
        return True

    def _close_idle(self, conn: ServerConnection, now: float) -> None:
        """Close an idle connection; a unified peer is told first (``_notify_closing``)
        and given CLOSE_NOTICE to close it itself: a call it sent before it heard
        is served, not lost in the close."""
        if conn.unified_peer:
            if conn.told_idle_at is None:
                conn.told_idle_at = now
                self._notify_closing([conn])
                return
            if now - conn.told_idle_at < CLOSE_NOTICE:
                return
        log.info("closing idle connection %s", conn.peer)
        conn.close()

    # --- dispatch ------------------------------------------------------------------

    def _dispatch(self, conn: ServerConnection, frame: Frame) -> None:
        head = frame.head
        if head is None:
            self._native(conn, frame)
            return
        if not head.is_request:
            conn.reject(protocol.ProtocolError("a response frame was sent to the server"))
            return
        conn.unified_peer = True     # (told before a close: see _notify_closing)
        reply = _Call(conn, frame.flags & protocol.MIRRORED_FLAGS, head.sequence_id, True)
        if head.message_type in _HEARTBEATS:
            self._heartbeat(reply, head.message_type)
            return
        service = self._services.get(head.service_name)  # type: ignore[arg-type]  # None: no service
        if service is None:
            status, text = self._unhosted(reply, head, frame.body)
            # names off the wire are not metric labels: one series for all unknown services
            self.metrics.refused(UNKNOWN, UNKNOWN, status)
            reply.refuse(status, text)
            return
        try:
            begin = _codec.decode_message_begin(frame.body, self.limits)
        except DecodeError as exc:   # framing is intact: refuse this call, keep the connection
            self.metrics.refused(service.name, UNKNOWN, Status.PROTOCOL_EXCEPTION)  # (no method read)
            reply.refuse(Status.PROTOCOL_EXCEPTION, f"bad message: {exc}")
            return
        deadline = time.monotonic() + head.timeout / 1000.0 if head.timeout > 0 else None
        self._call(service, reply, frame.body, begin, deadline, head)

    def _native(self, conn: ServerConnection, frame: Frame) -> None:
        reply = _Call(conn, frame.flags, 0, False)   # flags: framed (0) or UNFRAMED
        try:
            begin = _codec.decode_message_begin(frame.body, self.limits)
        except DecodeError as exc:   # no header to answer by: this stream cannot be trusted
            conn.reject(protocol.ProtocolError(f"bad framed thrift message: {exc}"))
            return
        name, msg_type, seqid, offset = begin
        reply.silent = msg_type == _ONEWAY_MESSAGE
        service_name, multiplexed, method = name.partition(":")
        if multiplexed:
            # TMultiplexedProtocol (Apache, thriftpy2): "Service:method" picks the service
            # as serviceName does on the unified protocol; the reply names the method alone.
            service = self._services.get(service_name)
            if service is None:
                self._unknown(reply, UNKNOWN, method, seqid, self._not_hosted(service_name))
                return
            begin = (method, msg_type, seqid, offset)
        else:
            hosts = self._by_method.get(name, ())
            if len(hosts) != 1:
                why = ("is not hosted here" if not hosts else "is ambiguous: several services "
                       "have it (a multiplexed client's \"Service:method\" names one)")
                self._unknown(reply, UNKNOWN, name, seqid, f"method {name!r} {why}")
                return
            service = hosts[0]
        self._call(service, reply, frame.body, begin, None, None)

    def _unknown(self, reply: Reply, service: str, name: str, seqid: int, why: str) -> None:
        """Answer a call to a method this port lacks with UNKNOWN_METHOD; it is
        counted under ``(unknown)`` (names off the wire are not metric labels)."""
        self.metrics.refused(service, UNKNOWN, Status.APPLICATION_EXCEPTION)
        reply.app_exception(name, seqid, TApplicationException.UNKNOWN_METHOD, why)

    def _unhosted(self, reply: Reply, head: _codec.Head, body: Any) -> Tuple[int, str]:
        """Why a call to a service this port lacks is refused: with ``auth``, only a
        caller that passes it learns that the service is not here (status 8)."""
        if self.auth is not None:
            try:
                method = _codec.decode_message_begin(body, self.limits)[0]
            except DecodeError:
                method = ""      # (signed for no method, it fails the signature)
            refusal = self._authenticate(head.service_name or "", method, reply, head, body)
            if refusal is not None:
                return refusal
        return Status.SERVICE_EXCEPTION, self._not_hosted(head.service_name)

    def _not_hosted(self, name: Optional[str]) -> str:
        """Why a call to service ``name`` finds none. A client made from the IDL
        of a service hosted under another name, or of one a hosted service
        ``extends``, names that: it is told which hosted service has its methods."""
        why = f"service {name!r} is not hosted by {self.appkey}"
        if self.auth is not None:   # a native caller is refused unauthenticated: names stay in
            return why
        serving = [entry.name for entry in self._services.values()
                   if any(cls.__name__ == name for cls in entry.service.__mro__
                          if cls is not object)]   # (every class's last base: no service)
        if serving:
            why += (f", but its methods are, in {', '.join(map(repr, serving))}: call with "
                    f"service_name={serving[0]!r} (or host {name!r} too, with the same handler)")
        return why

    def _authenticate(self, service: str, name: str, reply: Reply, head: Optional[_codec.Head],
                      body: Any) -> Optional[Tuple[int, str]]:
        """Why ``auth`` refuses this request (status 7, message), or None."""
        assert self.auth is not None
        if head is None:
            return (Status.SECURITY_EXCEPTION,
                    "authentication is required: native thrift cannot be signed")
        caller = head.client_appkey or ""
        try:
            self.auth.check_peer(reply.conn.peer_ip)
            self.auth.check(caller=caller, server_appkey=self.appkey, service=service,
                            method=name, local_context=head.local_context,
                            body=bytes(body) if self.auth.sign_body else None)
        except SecurityError as refused:
            return Status.SECURITY_EXCEPTION, str(refused)
        except Exception as broken:   # the token store's fault: this call is refused, no more
            # (the caller's name as a repr: it is the peer's, unchecked, and could
            # carry a line break to forge log lines)
            _AUTH_BROKEN.log("%s: checking a request from %r failed: %r",
                             self.appkey, caller, broken)
            return Status.SECURITY_EXCEPTION, "the server could not check this request"
        return None

    def _admission(self, service: _Service, name: str, reply: Reply, head: Optional[_codec.Head],
                   body: Any) -> Optional[Tuple[int, str]]:
        """Why a request may not run now (status, message), or None to run it."""
        if self.status != _ALIVE:
            return Status.RPC_EXCEPTION, f"{self.appkey} is {self.status.name.lower()}"
        if self.auth is not None:
            refused = self._authenticate(service.name, name, reply, head, body)
            if refused is not None:
                return refused
        caller = (head.client_appkey or "") if head is not None else ""
        if self.max_in_flight is not None and self._in_flight >= self.max_in_flight:
            return Status.RPC_EXCEPTION, f"{self.appkey} is overloaded: {self._in_flight} calls in flight"
        bytes_limit = self.max_in_flight_bytes
        if bytes_limit is not None and self._in_flight \
                and self._in_flight_bytes + CALL_BYTES + len(body) > bytes_limit:
            return (Status.RPC_EXCEPTION, f"{self.appkey} is overloaded: "
                    f"{self._in_flight_bytes} bytes of requests in flight")
        limit = self.max_in_flight_per_connection
        if limit is not None and reply.conn.in_flight >= limit:
            return Status.RPC_EXCEPTION, f"too many calls in flight on this connection (max {limit})"
        if self.quotas is not None and not self.quotas.take(caller):
            return Status.DEGRADE_EXCEPTION, f"quota exceeded for caller {caller or '(anonymous)'}"
        return None

    def _call(self, service: _Service, call: _Call, body: Any, begin: tuple,
              deadline: Optional[float], head: Optional[_codec.Head]) -> None:
        """Admit, decode and start one request; ``begin`` is its decoded message header."""
        name, msg_type, seqid, offset = begin
        if msg_type != _CALL_MESSAGE and msg_type != _ONEWAY_MESSAGE:
            # (its body is a result, not arguments: run, the handler would get Nones)
            self.metrics.refused(service.name, UNKNOWN, Status.PROTOCOL_EXCEPTION)
            call.refuse(Status.PROTOCOL_EXCEPTION, f"{service.name}.{name}: a message of type "
                        f"{msg_type} is no call (CALL 1 or ONEWAY 4)", name, seqid)
            return
        method = service.methods.get(name)
        if method is not None and method.oneway and not call.unified:
            call.silent = True   # (thriftpy2 sends oneway calls as CALL): no reply, even a refusal
        refusal = self._admission(service, name, call, head, body)
        if refusal is not None:
            self.metrics.refused(service.name, name if method is not None else UNKNOWN, refusal[0])
            call.refuse(*refusal, name, seqid)
            return
        if method is None:
            self._unknown(call, service.name, name, seqid,
                          f"service {service.name} has no method {name!r}")
            return
        try:
            args, objects = _codec.decode_body_counted(method.args_cls, body, offset,
                                                       self.limits)
        except DecodeError as exc:
            self.metrics.refused(service.name, name, Status.PROTOCOL_EXCEPTION)
            call.refuse(Status.PROTOCOL_EXCEPTION, f"{service.name}.{name}: bad arguments: {exc}",
                        name, seqid)
            return
        fn, runs, argv_of = service.handlers[name]
        if runs is _POOLED:
            why = None
            if self._business_pending >= self._business_limit:
                why = f"{self.appkey} is overloaded: business queue full"
            elif call.conn.pooled >= self._business_share:
                why = (f"{self.appkey} is overloaded: this connection holds its share of the "
                       f"business queue ({self._business_share} calls)")
            if why is not None:
                self.metrics.refused(service.name, name, Status.RPC_EXCEPTION)
                call.refuse(Status.RPC_EXCEPTION, why, name, seqid)
                return
        call.admit(service, method, seqid, self.metrics.started(service.name, name),
                   time.monotonic(), CALL_BYTES + len(body) + objects * OBJECT_BYTES, head,
                   deadline)
        call.conn.call_started(runs is _POOLED, call.size)
        self._in_flight += 1
        self._in_flight_bytes += call.size
        argv = argv_of(args)
        context = self._call_context(call, head)
        if runs is _COROUTINE:   # (written out, not _plain_done's helper: every call's path)
            task = start_task(self._loop,  # type: ignore[arg-type]  # started: start() set it
                              self._run_coroutine(call, fn, argv, deadline), context)
            if not task.done():   # (checked here: most answer at once, every call's path)
                self._track(task, call)
            return
        if runs is _INLINE:
            value, error = _run_plain(context, fn, argv, deadline)
            self._plain_done(call, context, value, error)
            if isinstance(error, KeyboardInterrupt):
                raise error   # Ctrl-C is the loop's business, not the call's
            return
        self._business_pending += 1
        self._pool.start(  # type: ignore[union-attr]  # started: start() made it
            _PooledCall(self._outcomes, call, context, fn, argv, deadline))

    @staticmethod
    def _call_context(call: _Call, head: Optional[_codec.Head]) -> contextvars.Context:
        """The context the handler runs in: a copy of this one holding the call
        (``context.caller()``, and the caller's globalContext and trace: see
        ``_Call.carried``)."""
        if head is not None and head.trace_id and head.span_id and not _context._HOOKS:
            pass   # (most calls: the trace is read when asked, in _Call.carried)
        elif _continues_trace(head):
            # the span made now: a new id (the caller sent none) is one id, and a hook
            # is told of it now
            span = _context._new_span((head.trace_id, head.span_id or _codec.new_id(), None))
            if _context._HOOKS:
                call.span_ends = _context._span_started("server", call.service.name,
                                                        call.method.name, span)
            call.trace = (head.global_context or {}, span)
        elif _context._HOOKS:   # no trace came with it: its hooks see the one it begins
            call.span_ends = _context._span_started("server", call.service.name,
                                                    call.method.name, call._new_trace()[1])
        return _context._handler_context(call)

    async def _run_coroutine(self, call: _Call, fn: Callable[..., Any], argv: Tuple[Any, ...],
                             deadline: Optional[float]) -> None:
        try:
            if deadline is not None and time.monotonic() > deadline:
                raise _DeadlinePassed()
            value = await fn(*argv)
        except BaseException as exc:  # noqa: B902 - every failure becomes a reply
            self._answer(call, None, exc)
            if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)):
                raise   # Ctrl-C and cancellation are the loop's business, not the call's
        else:
            self._answer(call, value, None)

    def _pool_done(self, call: _Call, context: contextvars.Context, value: Any,
                   exc: Optional[BaseException]) -> None:
        """(On the loop, from ``_outcomes``.) A pooled plain function's outcome."""
        self._business_pending -= 1
        call.conn.pool_released()
        self._plain_done(call, context, value, exc)

    def _plain_done(self, call: _Call, context: contextvars.Context, value: Any,
                    exc: Optional[BaseException]) -> None:
        """Answer with a plain function's outcome."""
        if exc is None and inspect.isawaitable(value):
            # A plain function that returned a coroutine (an async handler behind a
            # plain decorator): its answer is what the coroutine gives, on the loop.
            task = start_task(self._loop,  # type: ignore[arg-type]  # started: start() set it
                              self._run_coroutine(call, lambda: value, (), None), context)
            if not task.done():
                self._track(task, call)
            return
        self._answer(call, value, exc)

    def _cancel_at(self, deadline: float, call: _Call, task: asyncio.Future) -> None:
        """Cancel ``call``'s handler ``task`` if it still runs at ``deadline``."""
        def cancel() -> None:
            if not task.done():
                call.cancelled_by = _BY_DEADLINE
                task.cancel()
        timer = self._loop.call_later(  # type: ignore[union-attr]  # started: start() set it
            max(0.0, deadline - time.monotonic()), cancel)
        task.add_done_callback(lambda _: timer.cancel())

    def _track(self, task: asyncio.Future, call: _Call) -> None:
        """Keep a handler that suspended, for stop() to cancel past its grace (and,
        with ``cancel_past_deadline``, its caller's deadline)."""
        self._handlers[task] = call
        task.add_done_callback(self._handlers.pop)   # (a C call: no Python frame per call)
        if call.deadline is not None and self.cancel_past_deadline:
            self._cancel_at(call.deadline, call, task)

    def _answer(self, call: _Call, value: Any, exc: Optional[BaseException]) -> None:
        call.conn.call_finished(call.size)
        self._in_flight -= 1
        self._in_flight_bytes -= call.size
        if not self._in_flight and self._drained is not None:
            self._drained.set_result(None)
            self._drained = None
        try:
            status = self._reply(call, value, exc)
        except Exception as bug:   # building the answer failed: answer that (no caller waits)
            status = self._reply(call, None, bug)
        if exc is not None and isinstance(exc, _Unrun):
            Metrics.unrun(call.stats, status)   # (no latency: the handler never ran)
        else:
            Metrics.finished(call.stats, time.monotonic() - call.started, status)
        for end in call.span_ends or ():
            end(status)

    def _reply(self, call: _Call, value: Any, exc: Optional[BaseException]) -> int:
        """Send the answer (if one is owed); returns the OCTO status of the call."""
        reply, method, name, seqid = call, call.method, call.method.name, call.seqid
        send = not reply.silent and not reply.conn.closed and not reply.conn.discarding
        result = method.result_cls()
        if exc is None:   # (first: every call's path)
            if method.returns_value:
                result.success = value
        elif isinstance(exc, asyncio.CancelledError) and call.cancelled_by is not None:
            # (one the handler raised of its own accord, or a cancel from elsewhere, is
            # its fault: logged and answered below as any other)
            # Status 4, as a connection lost mid-call: failover takes an idempotent
            # method elsewhere (native thrift: INTERNAL_ERROR, which says it ran)
            if send:   # (past its deadline, the caller has given up: a refusal it drops)
                reply.refuse(Status.TRANSPORT_EXCEPTION, f"{name}: cancelled: " + (
                    _PASSED_WHILE_IT_RAN if call.cancelled_by is _BY_DEADLINE
                    else "the server stopped while it ran"), name, seqid)
            return Status.TRANSPORT_EXCEPTION
        elif isinstance(exc, _Unrun):
            if send:
                reply.refuse(exc.status, f"{name}: {exc.why}", name, seqid)
            return exc.status
        else:
            field = next((f for f, cls in method.exceptions if isinstance(exc, cls)), None)
            if field is None:   # raised from another load of the IDL that declares it
                field = next((f for f, cls in method.exceptions
                              if _codec.is_twin(type(exc), cls)), None)
            if field is None and isinstance(exc, TApplicationException):
                # the handler's own protocol-level answer: sent as it is, as
                # thriftpy2's and Apache's processors send it -- but for LOADSHEDDING,
                # which says the call did not run (failover may repeat it): this one did
                if send:
                    kind = (TApplicationException.INTERNAL_ERROR
                            if exc.type == protocol.LOADSHEDDING else exc.type)
                    reply.app_exception(name, seqid, kind, exc.message)
                return Status.APPLICATION_EXCEPTION
            if field is None and isinstance(exc, CallTimeout) and (
                    exc.inherited_deadline or call.deadline is not None
                    and time.monotonic() >= call.deadline):
                # its own call ended with the deadline it inherited (see context.caller),
                # or ended after it: the caller has given up, so this is a timeout, not
                # the handler's bug
                if send:
                    reply.refuse(Status.TRANSPORT_EXCEPTION,
                                 f"{name}: {_PASSED_WHILE_IT_RAN} ({exc})", name, seqid)
                return Status.TRANSPORT_EXCEPTION
            if field is None:
                # a bug in the handler: the server's log keeps its traceback (the
                # caller gets the message only, and a oneway caller nothing at all)
                text = _describe(exc)
                self._faults.log("%s.%s raised %s (call %s)", call.service.name, name, text,
                                 call.who(), key=(call.service.name, name, type(exc)),
                                 exc_info=exc)
                if send:
                    reply.app_exception(name, seqid, TApplicationException.INTERNAL_ERROR, text)
                return Status.APPLICATION_EXCEPTION
            setattr(result, field, exc)
        if send:
            try:
                reply.message(name, _REPLY_MESSAGE, seqid, result)
            except EncodeError as bad:   # the handler's value does not fit the IDL: its bug
                self._faults.log("%s.%s: its result cannot be sent: %s (call %s)",
                                 call.service.name, name, bad, call.who(),
                                 key=(call.service.name, name, "result"))
                reply.app_exception(name, seqid, TApplicationException.INTERNAL_ERROR,
                                    f"{name}: its result cannot be sent: {bad}")
                return Status.APPLICATION_EXCEPTION
        return _SUCCESS

    def _told_status(self) -> NodeStatus:
        """The status heartbeats and ``/health`` tell: STOPPING from the moment a
        stop begins (the registry is told first, while calls are still served)."""
        return NodeStatus.STOPPING if self._leaving else self.status

    def _health(self) -> Tuple[bool, str]:
        """What ``/health`` says: serving, and the status heartbeats tell."""
        status = self._told_status()
        return status == NodeStatus.ALIVE, status.name

    def _heartbeat(self, reply: Reply, message_type: int) -> None:
        # Heartbeats cannot be signed: with ``auth``, the per-method rates (which name
        # the services and methods hosted) are not told to whoever asks.
        rates = self._rates.rates(time.monotonic()) if self.auth is None else None
        load = protocol.LoadInfo(queueSize=self._business_pending, threadNum=self._business_threads,
                                 methodQpsMap=rates)
        reply.conn.send(self._heartbeat_frame(reply.sequence_id, message_type, reply.flags, load))

    def _heartbeat_frame(self, sequence_id: int, message_type: int,
                         flags: int = protocol.DEFAULT_FLAGS, load: Optional[Any] = None) -> bytes:
        """A heartbeat reply frame (PROTOCOL.md §3) with this node's status: STOPPING
        from the moment it starts to leave."""
        beat = protocol.HeartbeatInfo(appkey=self.appkey, sendTime=int(time.time() * 1000),
                                      loadInfo=load,
                                      status=int(self._told_status()))
        header = protocol.response_header(sequence_id, 0, message_type=message_type,
                                          heartbeat=beat)
        return protocol.encode_unified(header, b"", flags)


class _PooledCall:
    """A call to a plain function, as a business-pool job: its outcome goes to
    the server's loop through ``outcomes`` (``Server._pool_done``)."""

    __slots__ = ("_outcomes", "_call", "_context", "_fn", "_argv", "_deadline")

    def __init__(self, outcomes: LoopInbox, call: _Call, context: contextvars.Context,
                 fn: Callable[..., Any], argv: Tuple[Any, ...], deadline: Optional[float]) -> None:
        self._outcomes, self._call, self._context = outcomes, call, context
        self._fn, self._argv, self._deadline = fn, argv, deadline

    def run(self) -> None:
        """(On a business thread.)"""
        self._hand_back(*_run_plain(self._context, self._fn, self._argv, self._deadline))

    def cancel(self) -> None:
        """A stop cancelled it before a thread started it: refused, not run."""
        self._hand_back(None, _StoppedUnrun())

    def _hand_back(self, value: Any, exc: Optional[BaseException]) -> None:
        # a handler that outlived the stop finds its loop closed: no one to answer
        with contextlib.suppress(RuntimeError):   # (asyncio: "Event loop is closed")
            self._outcomes.put(self._call, self._context, value, exc)


def _run_plain(context: contextvars.Context, fn: Callable[..., Any], argv: Tuple[Any, ...],
               deadline: Optional[float]) -> Tuple[Any, Optional[BaseException]]:
    """A plain function's (value, exception), run in the call's context unless its
    caller gave up meanwhile."""
    try:
        if deadline is not None and time.monotonic() > deadline:
            raise _DeadlinePassed()
        return context.run(fn, *argv), None
    except BaseException as exc:  # noqa: B902 - every failure becomes a reply
        return None, exc
