"""``Server``: many thrift services on one port, unified protocol and framed thrift alike."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import ipaddress
import logging
import os
import signal
import socket
import ssl as _ssl
import time
import warnings
import weakref
from typing import (Any, Callable, Dict, Generic, List, Mapping, Optional, Sequence, Tuple,
                    TypeVar, Union, overload)

from octo_core import _codec, protocol
from octo_core.afterfork import release_in_child, tell_forked_children
from octo_core.auth import Authenticator
from octo_core.blocking import LOOKUPS
from octo_core.business import BusinessPool
from octo_core.checks import count, finite_number
from octo_core.codec import Limits, _check_limits
from octo_core.dispatch import CALL_BYTES, OBJECT_BYTES, UNKNOWN, Dispatcher
from octo_core.errors import SecurityError
from octo_core.metrics import Metrics, prometheus_text
from octo_core.middleware import Middleware, layers
from octo_core.protocol import MessageType, NodeStatus
from octo_core.quotas import Quotas
from octo_core.registry import HeartbeatSupport, Node, Registry, open_registry
from octo_core.registry.base import provider_fields
from octo_core.registry.registration import Registration, call_timeout
from octo_core.throttle import Throttle
from octo_core.transport.address import (Address, Listeners, Listening, check_listen_address,
                                        default_route_ip, listen, parse_address,
                                        refuse_a_live_socket)
from octo_core.transport.http import bound_port, serve_metrics
from octo_core.transport.loop import SERVING_LOOPS, LoopThread, cancel_rest, new_event_loop
from octo_core.transport.server import PartialFrames, ServerConnection, fd_connections
from octo_core.transport.stream import CLOSE_LINGER, READ_BATCH

#: (``OBJECT_BYTES``, ``CALL_BYTES`` and ``UNKNOWN`` are the call path's, named here too:
#: the docstring below and users read them as ``octo_core.server``'s)
__all__ = ["Server", "OBJECT_BYTES", "CALL_BYTES", "UNKNOWN", "CLOSE_NOTICE", "EVICTABLE_AFTER"]

log = logging.getLogger("octo_core.server")

_Cleanup = TypeVar("_Cleanup", bound=Callable[[], Any])   # what on_stop takes, and gives back
_T = TypeVar("_T")

#: Seconds a connection must have been quiet (no call running) before one beyond
#: ``max_connections`` may take its place.
EVICTABLE_AFTER = 1.0

#: Seconds a TLS client may take over its handshake (ms on any network that works).
_TLS_HANDSHAKE_TIMEOUT = 10.0
#: Seconds the server waits, at most, for peers told of a close to close their
#: connections themselves (a stop waits within its grace): what they sent
#: meanwhile is refused (at a stop) or served (an idle connection).
CLOSE_NOTICE = 0.5


_EVERY_INTERFACE = ("", "0.0.0.0", "::")


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


#: Connections cut at ``read_timeout`` for a frame still incomplete: a
#: slow-loris peer makes one per connection it opens.
_STALLED = Throttle(10.0, log, logging.INFO)
#: The registry calls a stop's withdrawal of the node may wait for: an attempt in
#: flight, STOPPING, unregister, each bounded by ``registration.call_timeout``.
_WITHDRAWAL_CALLS = 3


class _Dispatchers(Generic[_T]):
    """A ``Server`` attribute its ``Dispatcher`` owns (the call path reads it there,
    as its own): read and set through the server as before."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, server: None, owner: type) -> "_Dispatchers[_T]": ...
    @overload
    def __get__(self, server: "Server", owner: type) -> _T: ...

    def __get__(self, server: Optional["Server"], owner: type) -> Any:
        return self if server is None else getattr(server._dispatcher, self.name)

    def __set__(self, server: "Server", value: _T) -> None:
        setattr(server._dispatcher, self.name, value)


def _collected_started(pool: BusinessPool, appkey: str) -> None:
    """A started ``Server`` collected without ``stop()``: end its business threads, and say so."""
    pool.shutdown()
    warnings.warn(f"an octo_core Server ({appkey}) was collected while started, without stop()",
                  ResourceWarning)


class Server:
    """Hosts thrift services on one TCP port or unix socket.

    ``Server(appkey="com.example.echo", host="127.0.0.1", port=0)``; ``host`` may
    also be ``"unix:///path/to.sock"``. Port 0 is a free port, picked by ``start()``:
    ``port`` and ``address`` say which once it has run.

    Protocols:

    - The port speaks the unified protocol (the header's serviceName picks the
      service) and native thrift, framed or unframed: a method name is enough
      when one service has it, and ``"Service:method"`` (a multiplexed client's)
      picks the service by the name ``add_service`` gave it.
    - ``business_threads``, ``business_queue``: plain-function handlers run on a
      bounded business thread pool (``business_threads`` workers, at most
      ``business_queue`` waiting; past that a call is refused at once with
      status 3, and so is one from a connection already holding half of the pool).
    - Coroutine handlers run on the event loop, each as a task whose first step
      runs as its request is read (one that never suspends answers in the same
      read). Coroutine handlers include partials of async functions and objects
      with an async ``__call__``; a plain function that returns a coroutine (an
      async method behind a plain decorator) runs on the pool, its coroutine on
      the loop. A service added with ``inline=True`` runs its plain functions on
      the loop too (see ``add_service``).
    - ``ssl`` serves TLS.

    Protection:

    - ``max_frame_size``, and ``limits`` (``octo_core.codec.Limits``: string and
      container lengths, nesting, objects per decode) for the thrift messages,
      bound what one request may cost.
    - ``max_connections``: one more takes the place of the connection quiet
      longest, a second at least with no call running and no reply going out,
      its peer told first; else it is closed on accept. By default the open-file
      limit, RLIMIT_NOFILE, at ``start``, less an eighth or 128 (528 on asyncio's
      own loop, which keeps up to 400 refused sockets open while a peer
      redials), whichever is more, never below half: a server out of descriptors
      cannot even accept a connection to refuse it. The default is each
      server's and counts connections once their TLS handshake is done, so give
      it yourself for several servers in one process.
    - ``max_in_flight`` and ``max_in_flight_per_connection``: status 3 past them.
    - ``max_in_flight_bytes``: request bytes, as decoded, of every call running
      on the server, and 72 bytes, ``octo_core.server.OBJECT_BYTES``, per object
      its arguments decoded to, and 2 KiB, ``CALL_BYTES``, per call; 256 MiB by
      default, None for no limit: status 3 past it, unless nothing else runs;
      many peers each under their own flow control cannot add up to more.
    - ``pause_reading_at`` and ``pause_reading_bytes``: calls running on one
      connection, and request bytes they hold, counted so, at which the server
      stops reading it until both are down to half: flow control, no refusal;
      reading also stops while a peer leaves its replies unread.
    - ``max_partial_bytes``: what all connections hold of frames partly read,
      256 MiB by default, None for no limit: past it a connection holding part
      of a frame stops reading until the sum is down to half, its read timeout
      still running, but for one at a time that reads on to its frame's end; so
      peers each within ``max_frame_size`` add up to the limit, a frame, and a
      read of each connection, not connections x ``max_frame_size``.
    - ``quotas`` (``{caller appkey or "*": calls per second}``): token buckets;
      status 6 past them.
    - ``idle_timeout``: a connection idle for so many seconds is closed (a
      unified peer is told first, as at a stop, and given half a second to
      leave: a call it sends meanwhile is served, not lost in the close).
    - ``read_timeout``: so is one whose frame takes over so many seconds to
      arrive however it trickles in (a slow-loris peer holds no buffer for
      long). None (or 0) turns either off.
    - ``cancel_past_deadline``: a request whose caller's deadline (the unified
      header's timeout, from its arrival) has passed before its handler starts
      is not run; with ``cancel_past_deadline=True`` a coroutine handler still
      running when it passes is cancelled too (its caller has given up: the
      answer would be dropped), the call counted as timed out (status 4). That
      is off by default: a handler cancelled midway must leave things
      consistent, as one a stop cancels past its grace must.
    - ``auth`` (an ``octo_core.auth.Authenticator``) requires signed, granted
      requests; native thrift, which cannot carry a signature, is then refused.
      A peer on its deny list is refused when it connects (to the metrics port
      too).

    Naming:

    - ``registry`` (a URL such as ``file:///var/lib/octo`` or ``zk://host:2181``,
      or a ``Registry``): the server registers itself on start, and on stop
      first marks itself STOPPING and unregisters, keeps serving for
      ``unregister_delay`` seconds while callers see the change, and only then
      refuses new calls and drains.
    - ``node`` sets ``Node`` fields: weight, warmup, cell, swimlane, idc,
      region...; a server on every interface, ``0.0.0.0`` or ``::``, registers
      the address its default route uses, unless ``node`` gives ``ip``; a
      loopback address or unix socket registered where other machines look,
      ``zk://``, is warned of: they cannot reach it.
    - ``unregister_delay``: seconds a stop keeps serving once unregistered (above).
    - ``require_registry``: a registry that cannot be reached at start
      (ZooKeeper away), or does not answer within twice its ``op_timeout``
      (the ``Registry`` attribute: 5 s unless the registry sets its own,
      ZooKeeper the URL's), does not stop the server: it serves, warns, and
      keeps registering in the background (a doubling, jittered pause up to
      30 s, each attempt bounded alike) until the registry takes the node
      (``registered_node`` says when); a stop meanwhile ends the attempts and
      unregisters only what was registered (or what an attempt given up on may
      have), waiting for each registry call no longer either. With
      ``require_registry=True`` such a start fails instead (``RegistryError``;
      ``RegistryTimeout`` when no answer came), leaving nothing behind.

    Sight:

    - ``stats()``.
    - ``metrics_port`` (0 picks a free one: ``metrics_port`` holds it once
      started, and the start's log line names it): the metrics are also served
      as Prometheus text at ``http://host:metrics_port/metrics``, and the node's
      status at ``/health`` (a readiness probe's): ``ALIVE`` with 200, else with
      503 (``STOPPING`` from the moment a stop begins: both stay served until
      it ends).
    - ``middleware``: functions of the application's around every call of the
      services added (logging, checks, translating errors; see
      ``octo_core.middleware``), the first outermost.

    Logging:

    - A handler's undeclared exception is logged (``octo_core.server``, ERROR),
      its traceback with the first of each service, method and exception type
      (and with one after 10 s without any), then a record every 10 s at most
      for each, counting those held back (no traceback): a caller can set one
      off every call.
    """

    # options and state the call path owns (``Dispatcher``'s), here as before
    appkey: _Dispatchers[str] = _Dispatchers()
    status: _Dispatchers[NodeStatus] = _Dispatchers()
    limits: _Dispatchers[Optional[Limits]] = _Dispatchers()
    max_in_flight: _Dispatchers[Optional[int]] = _Dispatchers()
    max_in_flight_per_connection: _Dispatchers[Optional[int]] = _Dispatchers()
    max_in_flight_bytes: _Dispatchers[Optional[int]] = _Dispatchers()
    quotas: _Dispatchers[Optional[Quotas]] = _Dispatchers()
    auth: _Dispatchers[Optional[Authenticator]] = _Dispatchers()
    cancel_past_deadline: _Dispatchers[bool] = _Dispatchers()
    middleware: _Dispatchers[Tuple[Middleware, ...]] = _Dispatchers()
    _leaving: _Dispatchers[bool] = _Dispatchers()
    _services: _Dispatchers[Dict[str, Any]] = _Dispatchers()
    _in_flight: _Dispatchers[int] = _Dispatchers()
    _business_threads: _Dispatchers[int] = _Dispatchers()   # (the pool's size)

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
        self.metrics = Metrics("server")
        self._dispatcher = Dispatcher(
            appkey, self.metrics, business_threads=business_threads,
            business_queue=business_queue, limits=limits, max_in_flight=max_in_flight,
            max_in_flight_per_connection=max_in_flight_per_connection,
            max_in_flight_bytes=max_in_flight_bytes,
            quotas=Quotas(quotas) if quotas else None, auth=auth,
            cancel_past_deadline=cancel_past_deadline, middleware=layers(middleware))
        self.host = host
        self.port = port
        self.unix_path = parse_address(host).path if host.startswith("unix://") else None
        self.max_frame_size = max_frame_size
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.max_partial_bytes = max_partial_bytes
        self.pause_reading_at = pause_reading_at
        self.pause_reading_bytes = pause_reading_bytes
        self.ssl = ssl
        self._registry_spec = registry
        self._registry: Optional[Registry] = None
        self._node_fields = provider_fields(node or {})
        self._registration: Optional[Registration] = None
        self.unregister_delay = unregister_delay
        self.require_registry = require_registry
        self.metrics_port = metrics_port
        self._metrics_http: Optional[Listeners] = None
        self._pool: Optional[BusinessPool] = None
        self._unix_inode = 0
        self._listener: Optional[Listening] = None
        self._sweeper: Optional[asyncio.Task] = None
        self._connections: set = set()
        self._stopping: Optional[asyncio.Task] = None   # a stop a handler started
        self._hurry: Optional[asyncio.Future] = None   # done: the stop waits no more (``_stop_now``)
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
        self._dispatcher.add_service(service, handler, name, inline)

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
        self._loop = asyncio.get_running_loop()
        self._hurry = None   # (a stop that timed out may have left it, maybe of another loop)

        max_connections = self.max_connections
        if max_connections is None:
            max_connections = fd_connections(self._loop)

        partial = (None if self.max_partial_bytes is None
                   else PartialFrames(self.max_partial_bytes))
        # Many peers each sending one compression bomb: one loop pass inflates a
        # batch's worth, not one frame each, so other connections are served between.
        inflate = _codec.InflateBudget(READ_BATCH, self._loop.call_soon)

        def make_connection() -> ServerConnection:
            return ServerConnection(self._dispatcher.dispatch, self._connections,
                                    self.max_frame_size, max_connections, self.pause_reading_at,
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
        self._dispatcher.start(self._loop, pool)
        SERVING_LOOPS.setdefault(self._loop, weakref.WeakSet()).add(self)
        # Collected while started (its loop ended without stop()): its business threads
        # would wait for work for ever.
        self._collected = weakref.finalize(self, _collected_started, self._pool, self.appkey)
        self._collected.atexit = False   # at exit the daemon threads just end
        if self.idle_timeout or self.read_timeout:
            self._sweeper = self._loop.create_task(self._sweep())
        try:
            if self.metrics_port is not None:
                http_host = "127.0.0.1" if self.unix_path is not None else self.host
                self._metrics_http = await serve_metrics(lambda: prometheus_text(self.metrics),
                                                         http_host, self.metrics_port,
                                                         self._dispatcher.health, self._admit_peer)
                self.metrics_port = bound_port(self._metrics_http)
            if self._registry_spec is not None:
                await self._register()
        except BaseException:
            await self.stop(grace=0)
            raise
        self._served = True
        log.info("%s serving %s on %s%s", self.appkey, ", ".join(self._services), self.address,
                 self._metrics_said())

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
        if self._dispatcher.runs_a_handler(asyncio.current_task()):
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
        await self._drain(grace)
        await self._close_connections(notified, grace)
        await self._release()
        # (not after a start that failed: what the service holds is kept for a retry)
        served, self._served = self._served, False
        if served:
            await self._run_on_stop()

    async def _drain(self, grace: float) -> None:
        """A stop's wait for the calls in flight, ``grace`` seconds at most; past it,
        the calls still running are cut short (see ``stop``)."""
        drained = self._dispatcher.drained()
        if drained is None:
            return
        await self._stop_waits(drained, grace)
        if not drained.done():
            log.warning("%s: %d calls still running %s (%s); cancelling the coroutine "
                        "handlers and the calls no business thread has started", self.appkey,
                        self._in_flight, "when told to stop at once" if self._hurried().done()
                        else f"after {grace:.1f}s grace", self._dispatcher.running())
            self._dispatcher.cut_short()
            await asyncio.sleep(0)

    async def _close_connections(self, notified: List[ServerConnection], grace: float) -> None:
        """Close every connection, once the ``notified`` peers have had their chance
        to close theirs first."""
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

    async def _release(self) -> None:
        """What the start took, given back: the metrics endpoint, the business
        threads, the listener and its unix socket file, the registry we opened."""
        assert self._loop is not None and self._pool is not None   # start() made them
        if self._metrics_http is not None:   # last: /health said STOPPING all along
            self._metrics_http.close()
            self._metrics_http = None
        self._collected.detach()
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

    async def _run_on_stop(self) -> None:
        """The ``on_stop`` callbacks, in order; one that fails is logged, the rest run."""
        for callback in self._on_stop:
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

    # --- registration --------------------------------------------------------------

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

    # --- connections ---------------------------------------------------------------

    def _notify_closing(self, conns: List[ServerConnection]) -> List[ServerConnection]:
        """Tell the peers of ``conns`` (unified ones: native thrift has no such
        message) that their connection is about to close, so they send no more
        calls on it: octo_core's close notice, on PROTOCOL.md §3's heartbeats, a
        reply with sequenceId -1 and this node's status (STOPPING at a stop), which
        a client that does not know it drops as a reply to nothing. Returns ``conns``."""
        notice = self._dispatcher.heartbeat_frame(protocol.CLOSE_NOTICE_SEQUENCE,
                                       MessageType.NORMAL_HEARTBEAT)
        for conn in conns:
            conn.send(notice)
        return conns

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
