"""``Dispatcher``: a server's call path, from a request's frame to its answer.

What the call path owns lives here: the services hosted and the index of their
methods, admission (auth, limits, quotas), the calls in flight and the bytes
they hold, the business pool's queue, the coroutine handlers that suspended,
heartbeats. ``Server`` configures it, starts and stops it; each connection
hands it its frames (``dispatch``, a bound method: no hop between them).
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import operator
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, TypeGuard

from thriftpy2.thrift import TApplicationException, TMessageType

from octo_core import _codec, idl, protocol
from octo_core import context as _context
from octo_core.auth import Authenticator
from octo_core.business import BusinessPool, LoopInbox
from octo_core.codec import Limits
from octo_core.errors import CallTimeout, DecodeError, EncodeError, SecurityError, Status
from octo_core.metrics import Metrics, MethodStats, RecentRates
from octo_core.middleware import Middleware, is_coroutine_function, wrapped
from octo_core.protocol import Frame, MessageType, NodeStatus
from octo_core.quotas import Quotas
from octo_core.reply import Reply
from octo_core.tasks import start_task
from octo_core.throttle import Throttle
from octo_core.transport.server import ServerConnection

if sys.version_info >= (3, 14):
    import annotationlib

# (the server's logger: what the call path logs is the server's, as users filter it)
log = logging.getLogger("octo_core.server")

UNKNOWN = "(unknown)"   # the metrics name of services and methods this server does not have


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


_Argv = Callable[[Any], Tuple[Any, ...]]


def _own_signature(fn: Callable[..., Any]) -> inspect.Signature:
    """``fn``'s own signature (a decorator's wrapper as it is), its annotations
    as written. Python 3.14 evaluates annotations when they are read (PEP 649),
    and a handler annotated with a name only a type checker imports (under
    ``TYPE_CHECKING``) would fail ``add_service`` with a NameError."""
    if sys.version_info >= (3, 14):
        return inspect.signature(fn, follow_wrapped=False,
                                 annotation_format=annotationlib.Format.STRING)
    return inspect.signature(fn, follow_wrapped=False)


def _takes_arguments(fn: Callable[..., Any], method: idl.Method) -> bool:
    """Can ``fn`` be called with ``method``'s arguments by position, as calls call it?
    (True when its signature cannot be read: a builtin's, say.) A decorator's
    wrapper is read as it is, not the function it wraps (``functools.wraps``):
    one that supplies an argument of its own takes fewer than what it wraps."""
    try:
        signature = _own_signature(fn)
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
        # (a header with a trace id has a span id: see Dispatcher._call_context)
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


class Dispatcher:
    """A server's call path and what it holds (see the module's docstring): one
    per ``Server``, made with it; ``start`` gives it a loop and a business pool."""

    def __init__(self, appkey: str, metrics: Metrics, *, business_threads: int,
                 business_queue: int, limits: Optional[Limits],
                 max_in_flight: Optional[int], max_in_flight_per_connection: Optional[int],
                 max_in_flight_bytes: Optional[int], quotas: Optional[Quotas],
                 auth: Optional[Authenticator], cancel_past_deadline: bool,
                 middleware: Tuple[Middleware, ...]) -> None:
        self.appkey = appkey
        self.metrics = metrics
        self.limits = limits
        self.max_in_flight = max_in_flight
        self.max_in_flight_per_connection = max_in_flight_per_connection
        self.max_in_flight_bytes = max_in_flight_bytes
        self.quotas = quotas
        self.auth = auth
        self.cancel_past_deadline = cancel_past_deadline
        self.middleware = middleware
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
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._handlers: Dict[asyncio.Future, _Call] = {}   # coroutine handlers that suspended
        self._in_flight = 0
        self._in_flight_bytes = 0
        # stop()'s wait for the calls in flight: made by drained(), set by the last answer
        # (no event toggled by every call: an eager handler takes it 0 -> 1 -> 0)
        self._drained: Optional[asyncio.Future] = None
        # Handlers' bugs, logged: a caller can set one off at will, every call
        # (the first of each service, method and exception type with its traceback,
        # and one after a quiet period)
        self._faults = Throttle(10.0, log, logging.ERROR)

    # --- services ------------------------------------------------------------------

    def add_service(self, service: Any, handler: Any, name: Optional[str], inline: bool) -> None:
        """Host ``service`` with ``handler``'s methods (``Server.add_service``)."""
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
                f"{m}{_own_signature(getattr(handler, m))} for "
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

    # --- life cycle ----------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, pool: BusinessPool) -> None:
        """Serve on ``loop``, plain functions on ``pool``; the server is ALIVE."""
        if self._loop is not None and self._loop.is_closed():
            # calls still running when their loop closed can never be answered: none is in
            # flight, and none holds the business queue (the new pool's threads are all free)
            self._in_flight = self._in_flight_bytes = self._business_pending = 0
            self.metrics.forget_in_flight()
        self._loop = loop
        self._drained = None   # (a stop that timed out may have left it, maybe of another loop)
        self._pool = pool
        self._outcomes = LoopInbox(loop, self._pool_done)
        self._rates = RecentRates(self.metrics, time.monotonic())
        self._leaving = False
        self.status = NodeStatus.ALIVE

    def drained(self) -> Optional[asyncio.Future]:
        """None when no call is in flight; else a future done once the last is answered."""
        if not self._in_flight:
            return None
        if self._drained is None:
            assert self._loop is not None   # calls run once started
            self._drained = self._loop.create_future()
        return self._drained

    def running(self) -> str:
        """The methods with calls running, and how many each: what a stop cuts short."""
        return ", ".join(f"{service}.{method}: {stats.in_flight}"
                         for (service, method), stats in sorted(self.metrics.items())
                         if stats.in_flight)

    def cut_short(self) -> None:
        """A stop past its grace: cancel the coroutine handlers still running and the
        calls no business thread has started (each refuses its caller: it never ran)."""
        assert self._pool is not None   # started: start() gave it
        self._pool.cancel_pending()
        for task, call in list(self._handlers.items()):
            call.cancelled_by = _BY_STOP
            task.cancel()           # each answers its caller with an error

    def runs_a_handler(self, task: Optional[asyncio.Task]) -> bool:
        """Is ``task`` one of these coroutine handlers? (Read off its coroutine:
        nothing is marked per call for the rare stop from a handler.)"""
        frame = getattr(task.get_coro(), "cr_frame", None) if task is not None else None
        return (frame is not None and frame.f_code is Dispatcher._run_coroutine.__code__
                and frame.f_locals.get("self") is self)

    # --- the call path ------------------------------------------------------------

    def dispatch(self, conn: ServerConnection, frame: Frame) -> None:
        """Answer or start what ``frame`` asks (every frame a connection reads)."""
        head = frame.head
        if head is None:
            self._native(conn, frame)
            return
        if not head.is_request:
            conn.reject(protocol.ProtocolError("a response frame was sent to the server"))
            return
        conn.unified_peer = True     # (told before a close: see Server._notify_closing)
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

    def health(self) -> Tuple[bool, str]:
        """What ``/health`` says: serving, and the status heartbeats tell."""
        status = self._told_status()
        return status == NodeStatus.ALIVE, status.name

    def _heartbeat(self, reply: Reply, message_type: int) -> None:
        # Heartbeats cannot be signed: with ``auth``, the per-method rates (which name
        # the services and methods hosted) are not told to whoever asks.
        rates = self._rates.rates(time.monotonic()) if self.auth is None else None
        load = protocol.LoadInfo(queueSize=self._business_pending, threadNum=self._business_threads,
                                 methodQpsMap=rates)
        reply.conn.send(self.heartbeat_frame(reply.sequence_id, message_type, reply.flags, load))

    def heartbeat_frame(self, sequence_id: int, message_type: int,
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
    the server's loop through ``outcomes`` (``Dispatcher._pool_done``)."""

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
