"""``Server``: many thrift services on one port, unified protocol and framed thrift alike."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import logging
import signal
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from thriftpy2.thrift import TApplicationException, TMessageType

from octo_core import _codec, idl, protocol
from octo_core import context as _context
from octo_core.errors import DecodeError, EncodeError, Status
from octo_core.protocol import Frame, MessageType, NodeStatus
from octo_core.transport.address import parse_address
from octo_core.transport.loop import LoopThread, new_event_loop
from octo_core.transport.server import ServerConnection

log = logging.getLogger("octo_core.server")


class _Service(NamedTuple):
    name: str
    service: Any
    methods: Dict[str, idl.Method]
    handlers: Dict[str, Tuple[Callable[..., Any], bool]]   # name -> (function, is coroutine)


class _DeadlinePassed(Exception):
    """The caller's deadline passed before the handler could start."""


class _Reply:
    """How to answer one request on its connection, in its protocol."""

    __slots__ = ("conn", "flags", "sequence_id", "unified")

    def __init__(self, conn: ServerConnection, flags: int, sequence_id: int, unified: bool) -> None:
        self.conn = conn
        self.flags = flags
        self.sequence_id = sequence_id
        self.unified = unified

    def message(self, name: str, msg_type: int, seqid: int, obj: Any, status: int = 0,
                text: Optional[str] = None) -> None:
        if self.unified:
            header = protocol.response_header(self.sequence_id, status, text)
            data = protocol.encode_unified_message(self.flags, header, name, msg_type, seqid, obj)
        else:
            data = protocol.encode_framed_message(name, msg_type, seqid, obj)
        self.conn.send(data)

    def app_exception(self, name: str, seqid: int, kind: int, text: str,
                      status: int = Status.APPLICATION_EXCEPTION) -> None:
        self.message(name, TMessageType.EXCEPTION, seqid,
                     TApplicationException(kind, text), status, text)

    def refuse(self, status: int, text: str, name: str = "", seqid: int = 0) -> None:
        """A failure outside the handler: a status and message (§2), body-less on unified."""
        if self.unified:
            header = protocol.response_header(self.sequence_id, status, text)
            self.conn.send(protocol.encode_unified(header, b"", self.flags))
        else:
            self.app_exception(name, seqid, TApplicationException.INTERNAL_ERROR, text, status)


class Server:
    """Hosts thrift services on one TCP port or unix socket.

    ``Server(appkey="com.example.echo", host="127.0.0.1", port=0)``; ``host`` may
    also be ``"unix:///path/to.sock"``. Plain-function handlers run on a bounded
    business thread pool (``business_threads`` workers, at most ``business_queue``
    waiting; past that a call is refused at once with status 3); coroutine
    handlers run on the event loop. A connection with no traffic and no call in
    flight for ``idle_timeout`` seconds is closed (``None``: never).
    """

    def __init__(self, appkey: str, host: str = "127.0.0.1", port: int = 0, *,
                 business_threads: int = 16, business_queue: int = 1024,
                 max_frame_size: int = protocol.DEFAULT_MAX_FRAME_SIZE,
                 idle_timeout: Optional[float] = 600.0) -> None:
        self.appkey = appkey
        self.host = host
        self.port: Optional[int] = port
        self.unix_path = parse_address(host).path if host.startswith("unix://") else None
        self.max_frame_size = max_frame_size
        self.idle_timeout = idle_timeout
        self._sweeper: Optional[asyncio.Task] = None
        self.status = NodeStatus.STARTING
        self._services: Dict[str, _Service] = {}
        self._by_method: Dict[str, List[_Service]] = {}
        self._business_threads = business_threads
        self._business_limit = business_threads + business_queue
        self._business_pending = 0
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._listener: Optional[asyncio.AbstractServer] = None
        self._connections: set = set()
        self._in_flight = 0
        self._idle: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[LoopThread] = None

    # --- configuration -------------------------------------------------------------

    def add_service(self, service: Any, handler: Any, name: Optional[str] = None) -> None:
        """Host ``service`` (a thriftpy2 service class) with ``handler``'s methods.

        ``name`` is the unified protocol's ``serviceName``; it defaults to the
        IDL service name (``Echo``); set it to match a Java peer's class name.
        """
        name = name or service.__name__
        if name in self._services:
            raise ValueError(f"a service named {name!r} is already added")
        methods = idl.methods(service)
        missing = [m for m in methods if not callable(getattr(handler, m, None))]
        if missing:
            raise TypeError(f"handler for {name} lacks methods: {', '.join(missing)}")
        handlers = {}
        for method in methods:
            fn = getattr(handler, method)
            handlers[method] = (fn, inspect.iscoroutinefunction(fn))
        entry = _Service(name, service, methods, handlers)
        self._services[name] = entry
        for method in methods:
            self._by_method.setdefault(method, []).append(entry)

    # --- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Bind and listen; afterwards ``port`` holds the bound port."""
        if not self._services:
            raise RuntimeError("add_service() before start()")
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self._business_threads, thread_name_prefix=f"octo-biz-{self.appkey}")

        def make_connection() -> ServerConnection:
            return ServerConnection(self._dispatch, self._connections, self.max_frame_size)

        if self.unix_path is not None:
            self._listener = await self._loop.create_unix_server(make_connection, self.unix_path)
        else:
            self._listener = await self._loop.create_server(
                make_connection, self.host, self.port, reuse_address=True)
            self.port = self._listener.sockets[0].getsockname()[1]
        if self.idle_timeout:
            self._sweeper = self._loop.create_task(self._sweep_idle())
        self.status = NodeStatus.ALIVE
        log.info("%s serving %s on %s", self.appkey, ", ".join(self._services), self.address)

    @property
    def address(self) -> str:
        """Where clients reach this server: ``host:port`` or ``unix:///path``."""
        if self.unix_path is not None:
            return f"unix://{self.unix_path}"
        return f"{self.host}:{self.port}"

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight calls finish within ``grace`` seconds, then close.

        Calls that arrive meanwhile are refused with status 3 so callers can go
        elsewhere; none is dropped without an answer.
        """
        if self._listener is None:
            return
        self.status = NodeStatus.STOPPING
        self._listener.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._in_flight:
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("%s: %d calls still running after %.1fs grace",
                            self.appkey, self._in_flight, grace)
        for conn in list(self._connections):
            conn.close()
        await asyncio.sleep(0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._listener = None
        self.status = NodeStatus.STOPPED

    def serve_forever(self) -> None:
        """Run the server on a new event loop until SIGINT or SIGTERM, then stop it."""
        loop = new_event_loop()

        async def main() -> None:
            await self.start()
            done = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, done.set)
            await done.wait()
            await self.stop()

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    def __enter__(self) -> "Server":
        self._thread = LoopThread(f"octo-server-{self.appkey}")
        self._thread.run(self.start())
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._thread.run(self.stop())
        finally:
            self._thread.stop()

    async def __aenter__(self) -> "Server":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def _sweep_idle(self) -> None:
        period = min(self.idle_timeout / 2, 5.0)
        while True:
            await asyncio.sleep(period)
            cutoff = self._loop.time() - self.idle_timeout
            for conn in list(self._connections):
                if conn.last_activity < cutoff and not conn.in_flight:
                    log.info("closing idle connection %s", conn.peer)
                    conn.close()

    # --- dispatch ------------------------------------------------------------------

    def _dispatch(self, conn: ServerConnection, frame: Frame) -> None:
        header = frame.header
        if header is None:
            self._native(conn, frame)
            return
        info = header.requestInfo
        if info is None:
            conn.protocol_error(protocol.ProtocolError("a response frame was sent to the server"))
            return
        reply = _Reply(conn, frame.flags, info.sequenceId, True)
        if header.messageType in (MessageType.NORMAL_HEARTBEAT, MessageType.SCANNER_HEARTBEAT):
            self._heartbeat(reply, header.messageType)
            return
        if self.status != NodeStatus.ALIVE:
            reply.refuse(Status.RPC_EXCEPTION, f"{self.appkey} is {self.status.name.lower()}")
            return
        service = self._services.get(info.serviceName)
        if service is None:
            reply.refuse(Status.SERVICE_EXCEPTION,
                         f"service {info.serviceName!r} is not hosted by {self.appkey}")
            return
        deadline = time.monotonic() + info.timeout / 1000.0 if info.timeout > 0 else None
        self._call(service, reply, frame.body, deadline, header.globalContext)

    def _native(self, conn: ServerConnection, frame: Frame) -> None:
        reply = _Reply(conn, 0, 0, False)
        try:
            name = _codec.decode_message_begin(frame.body)[0]
        except DecodeError as exc:
            conn.protocol_error(protocol.ProtocolError(f"bad framed thrift message: {exc}"))
            return
        hosts = self._by_method.get(name, ())
        if len(hosts) != 1:
            seqid = _codec.decode_message_begin(frame.body)[2]
            why = "is not hosted here" if not hosts else "is ambiguous: several services have it"
            reply.app_exception(name, seqid, TApplicationException.UNKNOWN_METHOD,
                                f"method {name!r} {why}")
            return
        if self.status != NodeStatus.ALIVE:
            seqid = _codec.decode_message_begin(frame.body)[2]
            reply.refuse(Status.RPC_EXCEPTION, f"{self.appkey} is {self.status.name.lower()}",
                         name, seqid)
            return
        self._call(hosts[0], reply, frame.body, None, None)

    def _call(self, service: _Service, reply: _Reply, body: Any, deadline: Optional[float],
              global_context: Optional[dict]) -> None:
        try:
            name, msg_type, seqid, offset = _codec.decode_message_begin(body)
        except DecodeError as exc:
            reply.refuse(Status.PROTOCOL_EXCEPTION, f"bad message: {exc}")
            return
        method = service.methods.get(name)
        if method is None:
            reply.app_exception(name, seqid, TApplicationException.UNKNOWN_METHOD,
                                f"service {service.name} has no method {name!r}")
            return
        try:
            args = _codec.decode_body(method.args_cls, body, offset)
        except DecodeError as exc:
            reply.refuse(Status.PROTOCOL_EXCEPTION, f"{service.name}.{name}: bad arguments: {exc}",
                         name, seqid)
            return
        # A oneway call is answered on the unified protocol (the reference server does
        # so, §3) but never on native thrift, whose clients do not read a reply.
        answer = reply.unified or not (method.oneway or msg_type == TMessageType.ONEWAY)
        fn, is_coroutine = service.handlers[name]
        argv = [getattr(args, arg) for arg in method.arg_names]
        if is_coroutine:
            self._started(reply.conn)
            context = contextvars.copy_context()
            context.run(_context._enter, global_context)
            self._loop.create_task(
                self._run_coroutine(fn, argv, method, reply, seqid, answer, deadline),
                context=context)
            return
        if self._business_pending >= self._business_limit:
            reply.refuse(Status.RPC_EXCEPTION,
                         f"{self.appkey} is overloaded: business queue full", name, seqid)
            return
        self._started(reply.conn)
        self._business_pending += 1
        future = self._pool.submit(_run_sync, fn, argv, deadline, global_context)
        future.add_done_callback(
            lambda f: self._loop.call_soon_threadsafe(self._sync_done, f, method, reply, seqid, answer))

    def _started(self, conn: ServerConnection) -> None:
        conn.in_flight += 1
        self._in_flight += 1
        self._idle.clear()

    def _finished(self, conn: ServerConnection) -> None:
        conn.in_flight -= 1
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()

    async def _run_coroutine(self, fn, argv, method, reply, seqid, answer, deadline) -> None:
        try:
            if deadline is not None and time.monotonic() > deadline:
                raise _DeadlinePassed()
            value = await fn(*argv)
        except BaseException as exc:  # noqa: B902 - every failure becomes a reply
            self._answer(method, reply, seqid, answer, None, exc)
        else:
            self._answer(method, reply, seqid, answer, value, None)

    def _sync_done(self, future: concurrent.futures.Future, method, reply, seqid, answer) -> None:
        self._business_pending -= 1
        if future.cancelled():
            self._answer(method, reply, seqid, answer, None, _DeadlinePassed())
            return
        exc = future.exception()
        self._answer(method, reply, seqid, answer, None if exc else future.result(), exc)

    def _answer(self, method: idl.Method, reply: _Reply, seqid: int, answer: bool,
                value: Any, exc: Optional[BaseException]) -> None:
        self._finished(reply.conn)
        if not answer or reply.conn.closed:
            return
        name = method.name
        if isinstance(exc, _DeadlinePassed):
            reply.refuse(Status.TRANSPORT_EXCEPTION,
                         f"{name}: the caller's deadline passed before the handler ran", name, seqid)
            return
        result = method.result_cls()
        if exc is not None:
            field = next((f for f, cls in method.exceptions if isinstance(exc, cls)), None)
            if field is None:
                if not isinstance(exc, Exception):
                    raise exc
                log.info("%s raised %s: %s", name, type(exc).__name__, exc)
                reply.app_exception(name, seqid, TApplicationException.INTERNAL_ERROR,
                                    f"{type(exc).__name__}: {exc}")
                return
            setattr(result, field, exc)
        elif method.returns_value:
            result.success = value
        try:
            reply.message(name, TMessageType.REPLY, seqid, result)
        except EncodeError as bad:
            reply.app_exception(name, seqid, TApplicationException.INTERNAL_ERROR,
                                f"{name} returned a value its IDL does not allow: {bad}")

    def _heartbeat(self, reply: _Reply, message_type: int) -> None:
        beat = protocol.HeartbeatInfo(appkey=self.appkey, sendTime=int(time.time() * 1000),
                                      status=int(self.status))
        header = protocol.response_header(reply.sequence_id, 0, message_type=message_type,
                                          heartbeat=beat)
        reply.conn.send(protocol.encode_unified(header, b"", reply.flags))


def _run_sync(fn: Callable[..., Any], argv: List[Any], deadline: Optional[float],
              global_context: Optional[dict]) -> Any:
    """Runs on a business thread: skip work whose caller has already given up."""
    if deadline is not None and time.monotonic() > deadline:
        raise _DeadlinePassed()
    return contextvars.copy_context().run(_call_in_context, fn, argv, global_context)


def _call_in_context(fn: Callable[..., Any], argv: List[Any], global_context: Optional[dict]) -> Any:
    _context._enter(global_context)
    return fn(*argv)
