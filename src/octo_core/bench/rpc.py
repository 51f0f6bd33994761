"""End-to-end RPC benchmark: octo_core against thriftpy2, grpcio and a raw uvloop echo.

Each *cell* is one system × one payload × one concurrency (calls in flight).
For every cell a fresh server is started **in a separate process**
(``python -m octo_core.bench.rpc --serve KIND --port 0``, which prints
``PORT <n>`` and then answers control lines on its stdin), the client runs in
this process for a warm-up and then for a fixed measured window, and the server
process is stopped (killed if it does not exit) before the next cell.

What is measured, over the measured window only:

* **calls/s**: completed calls ÷ wall time of the window;
* **p50 / p99 latency**: from per-call ``time.perf_counter_ns`` stamps taken
  around each awaited (or blocking) call;
* **CPU per call**: client CPU (``time.process_time`` of this process, every
  thread included) plus server CPU (the child's
  ``resource.getrusage(RUSAGE_SELF)``, every thread included, read through the
  ``cpu`` control line before and after the window), divided by the calls.

Systems (all asyncio ones run on uvloop, client and server alike, so the
comparison is between libraries, not event loops):

* ``octo``: ``octo_core.AsyncClient(protocol="octo")`` → ``octo_core.Server``,
  the unified protocol; N calls share one multiplexed connection. The server
  registers in the embedded default registry (``file://``, a fresh directory
  per cell) and the client discovers it there, as on one machine in use.
* ``octo-thrift``: the same client with ``protocol="thrift"`` (framed thrift)
  against the same server; one multiplexed connection.
* ``octo-plain``: the same client against a server whose handler is a plain
  function (as thriftpy2 handlers are), run on the business thread pool.
* ``octo-inline``: the same, the plain function run on the server's event loop
  (``add_service(..., inline=True)``).
* ``octo-sync``: the blocking ``octo_core.Client`` (unified protocol) against the
  same server, shared by N threads, each with one call outstanding; its I/O runs
  on the client's own loop thread, over one multiplexed connection.
* ``thriftpy2-sync``: ``thriftpy2.rpc.make_server`` (a thread per connection)
  and ``make_client``, framed transport, cybin protocol. N in flight = N
  threads, each with its own client and connection (a thriftpy2 sync client
  has one call outstanding at a time).
* ``thriftpy2-aio``: ``thriftpy2.rpc.make_aio_server`` / ``make_aio_client``,
  framed transport. N in flight = N clients (N connections), each with one
  call outstanding: a thriftpy2 asyncio client cannot multiplex (it reads the
  reply right after writing the request, with no sequence-id matching).
* ``apache-sync``: Apache Thrift (the ``thrift`` package): its ``TThreadedServer``
  (a thread per connection) and a client per thread, framed transport, the
  accelerated binary protocol (``fastbinary``, C), ``Echo`` as its compiler's
  generated code has it (``octo_core.bench._apache_payload``). N in flight = N
  threads, each with its own client and connection.
* ``grpc-aio``: ``grpc.aio`` server and one channel; a raw-bytes unary echo
  method registered with ``grpc.method_handlers_generic_handler`` (no
  protobuf, no codegen: the minimum a grpc call costs). N concurrent unary
  calls on the one channel.
* ``codec-only``: octo_core's unified protocol with nothing but its C codec: a
  bare asyncio protocol on each side (the frame reader, header and message
  encoded and decoded in C, a dict of futures by sequence id). No deadlines,
  routing, balancer, breaker, metrics, tracing, flow control or handler
  dispatch: the floor of any Python implementation of the protocol, so
  ``octo`` against it is what the framework itself costs per call.
* ``raw-uvloop``: a uvloop server that echoes 4-byte-length-prefixed frames and
  a uvloop client with N frames in flight on one connection (a future per
  frame, replies matched in order, the frames written in one loop iteration
  sent together, in batches that grow after each read as octo_core's do; the
  server echoes each read's whole frames in one ``write``, having nothing to
  make while the first leave). No serialization: the ceiling for any Python
  protocol on this machine.

The thrift systems call ``Echo.echo(message)`` of ``payload.thrift`` with a
string of the payload's size; grpc and raw echo the same bytes.

The machine may be shared: each cell also records how much CPU the rest of
the machine used during its window (``other_cpu_pct``, from ``/proc/stat``),
``quiet_wait`` waits for the machine to idle before a cell, and with
``rounds`` > 1 each cell shows its median quiet round (``pick_round``).

``run(...)`` returns ``Result`` rows; ``format_report(...)`` renders them;
``main(argv)`` is the command line (``python -m octo_core.bench.rpc``), whose
options (``options_parser()``) ``octo bench rpc`` takes too.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import select
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import (Any, Awaitable, Callable, Deque, Dict, List, Optional, Sequence, TextIO,
                    Tuple)

from octo_core.bench.codec import payload_module
from octo_core.checks import count_argument, seconds_argument, seconds_or_zero_argument
from octo_core.transport.loop import new_event_loop
from octo_core.transport.stream import FIRST_BATCH_FRAMES, WRITE_BATCH_FRAMES

OCTO = "octo"
OCTO_THRIFT = "octo-thrift"
OCTO_PLAIN = "octo-plain"
OCTO_INLINE = "octo-inline"
OCTO_SYNC = "octo-sync"
TP2_SYNC = "thriftpy2-sync"
TP2_AIO = "thriftpy2-aio"
APACHE_SYNC = "apache-sync"
GRPC = "grpc-aio"
CODEC_ONLY = "codec-only"
RAW = "raw-uvloop"
#: The other libraries' systems (what octo_core is compared with).
PEERS: Tuple[str, ...] = (TP2_SYNC, TP2_AIO, APACHE_SYNC, GRPC)
#: Every system, in table order.
SYSTEMS: Tuple[str, ...] = (OCTO, OCTO_THRIFT, OCTO_PLAIN, OCTO_INLINE, OCTO_SYNC, TP2_SYNC,
                            TP2_AIO, APACHE_SYNC, GRPC, CODEC_ONLY, RAW)
#: The server each system's client talks to (the ``--serve`` kind of the child).
SERVER_KIND: Dict[str, str] = {OCTO: "octo", OCTO_THRIFT: "octo", OCTO_SYNC: "octo",
                               OCTO_PLAIN: "octo-plain", OCTO_INLINE: "octo-inline",
                               TP2_SYNC: "thriftpy2-sync",
                               TP2_AIO: "thriftpy2-aio", APACHE_SYNC: "apache-sync",
                               GRPC: "grpc", CODEC_ONLY: "codec", RAW: "raw"}
SERVER_KINDS: Tuple[str, ...] = ("octo", "octo-plain", "octo-inline", "thriftpy2-sync",
                                 "thriftpy2-aio", "apache-sync", "grpc", "codec", "raw")
#: Systems whose client finds the server as a deployment does: the server registers
#: in the embedded default registry (``file://``, a directory per cell), the client
#: discovers it there. (The registry is off the per-call path: calls cost the same.)
DISCOVERING: Tuple[str, ...] = (OCTO, OCTO_THRIFT, OCTO_PLAIN, OCTO_INLINE, OCTO_SYNC)

#: Payload name -> size in bytes of the echoed string.
PAYLOADS: Dict[str, int] = {"10B": 10, "1KB": 1024, "64KB": 65536, "1MB": 1 << 20}
#: What a run measures unless told: the small calls RPC frameworks are judged by.
DEFAULT_PAYLOADS: Tuple[str, ...] = ("10B", "1KB")
CONCURRENCIES: Tuple[int, ...] = (1, 64)

#: The gRPC method: a bytes-in, bytes-out echo (no protobuf).
GRPC_SERVICE = "octo.bench.Echo"
GRPC_METHOD = f"/{GRPC_SERVICE}/Echo"

#: Targets: with the most calls in flight octo_core reaches at least this share of the
#: raw uvloop echo's calls/s and this multiple of thriftpy2 asyncio's; with one call in
#: flight its p50 is at most this multiple of the raw echo's p50.
TARGET_VS_RAW_THROUGHPUT = 0.5
TARGET_VS_TP2_AIO_THROUGHPUT = 3.0
TARGET_VS_RAW_P50 = 1.3

#: A cell during whose window the rest of the machine used more than this % of one core
#: is marked noisy (other processes competed for the two cores).
NOISY_PCT = 20.0
#: Before a cell, ``--quiet-wait`` waits for the machine to use less than this % of one core.
QUIET_PCT = 10.0

#: Upper bound on the calls of one phase (a safety net: phases end on time).
MAX_CALLS_PER_PHASE = 20_000_000
#: How long a client may wait for one reply before the cell is declared broken.
CALL_TIMEOUT_S = 10.0
#: How long to wait for a server child to print its port or answer a control line.
CONTROL_TIMEOUT_S = 20.0
#: thrift message types (TMessageType.CALL / REPLY) for the codec-only system.
_CALL, _REPLY = 1, 2


# --- payloads ---------------------------------------------------------------------

def make_message(size: int) -> str:
    """A deterministic ASCII string of ``size`` bytes (so its UTF-8 form is ``size`` bytes)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return (alphabet * (size // len(alphabet) + 1))[:size]


# --- results ----------------------------------------------------------------------

@dataclass
class Result:
    """One cell's measurements (``missing``/``error`` set when it could not run)."""
    system: str
    payload: str
    concurrency: int
    calls: int = 0
    seconds: float = 0.0
    calls_per_s: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    client_cpu_us_per_call: float = 0.0
    server_cpu_us_per_call: float = 0.0
    connections: int = 0
    #: CPU the rest of the machine used during the window, in % of one core (noise).
    other_cpu_pct: Optional[float] = None
    rounds: int = 1
    quiet_rounds: int = 0
    server_pid: Optional[int] = None
    missing: Optional[str] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.missing is None and self.error is None and self.calls > 0

    @property
    def cpu_us_per_call(self) -> float:
        return self.client_cpu_us_per_call + self.server_cpu_us_per_call


@dataclass
class TargetCheck:
    """One target: the measured ratio against the bound (``met`` is None when unmeasured)."""
    name: str
    payload: str
    value: Optional[float]
    bound: float
    at_least: bool
    met: Optional[bool] = field(default=None)
    #: One of the cells it compares was noisy (see ``is_noisy``): take it with salt.
    noisy: bool = False


def _percentile(sorted_ns: Sequence[int], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted nanosecond samples, in µs (nearest rank)."""
    if not sorted_ns:
        return 0.0
    rank = min(len(sorted_ns) - 1, max(0, int(round(q * len(sorted_ns) + 0.5)) - 1))
    return sorted_ns[rank] / 1000.0


# --- server side (the child process) ---------------------------------------------

class _EchoHandler:
    """The plain-function handler (thread-based servers, octo-plain, octo-inline):
    returns what it is given."""

    def echo(self, message: str) -> str:
        return message

    def echo_payload(self, payload: Any) -> Any:
        return payload


class _AsyncEchoHandler:
    """The thrift handler of the asyncio servers: coroutines, run on the event loop."""

    async def echo(self, message: str) -> str:
        return message

    async def echo_payload(self, payload: Any) -> Any:
        return payload


class _PrefixedFrames:
    """What both ends of the raw echo keep of 4-byte-length-prefixed frames: the
    start of one not yet whole, joined to what comes next only once it can be
    (a large frame, arriving a read at a time, is copied once, not at every read)."""

    def __init__(self) -> None:
        super().__init__()   # (the protocol's own, next in the MRO)
        self._buf = bytearray()
        self._need = 0   # bytes the kept frame takes, prefix included (4: its prefix)

    def _joined(self, data: bytes) -> Optional[bytes]:
        """What was kept, then ``data``; None while the kept frame cannot be whole yet."""
        buf = self._buf
        buf += data
        if len(buf) < self._need:
            return None
        data = bytes(buf)
        buf.clear()
        return data

    def _keep(self, data: bytes, end: int) -> None:
        """Keep ``data[end:]``, the start of a frame not yet whole."""
        self._buf += data[end:]
        self._need = (4 + int.from_bytes(data[end:end + 4], "big") if len(data) - end >= 4
                      else 4)


class _RawEchoServer(_PrefixedFrames, asyncio.Protocol):
    """Echoes every complete 4-byte-length-prefixed frame; one ``write`` per read."""

    def __init__(self) -> None:
        super().__init__()
        self._transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._buf:
            joined = self._joined(data)
            if joined is None:
                return
            data = joined
        size = len(data)
        end = 0
        while size - end >= 4:
            frame_end = end + 4 + int.from_bytes(data[end:end + 4], "big")
            if frame_end > size:
                break
            end = frame_end
        if end:
            self._transport.write(  # type: ignore[union-attr]  # data comes once connected
                data if end == size else data[:end])
        if end < size:
            self._keep(data, end)


class _CodecEchoServer(asyncio.Protocol):
    """The codec-only server: each unified request frame read and its echo
    reply written with ``_codec`` alone; the replies to a read leave in
    growing batches, as octo_core's server sends them."""

    def __init__(self) -> None:
        from octo_core import _codec
        from octo_core.protocol import FrameDecoder

        self._feed = FrameDecoder().feed
        self._codec = _codec
        self._echo = payload_module().Echo
        self._transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        codec, echo = self._codec, self._echo
        replies = []
        batch = FIRST_BATCH_FRAMES
        for frame in self._feed(data):
            name, _, seqid, offset = codec.decode_message_begin(frame.body)
            args = codec.decode_body(echo.echo_args, frame.body, offset)
            replies.append(codec.encode_response(
                frame.flags, frame.head.sequence_id, 0, None, name, _REPLY, seqid,
                echo.echo_result(success=args.message)))
            if len(replies) == batch:
                self._transport.write(b"".join(replies))  # type: ignore[union-attr]  # (connected)
                replies.clear()
                batch = min(2 * batch, WRITE_BATCH_FRAMES)
        if replies:
            self._transport.write(b"".join(replies))  # type: ignore[union-attr]


class _Serving:
    """A server running on its own thread in the child; ``stop()`` ends it."""

    def __init__(self, port: int, stop: Callable[[], None]) -> None:
        self.port = port
        self.stop = stop


def _loop_thread(start: Callable[[], Awaitable[Tuple[int, Callable[[], Awaitable[None]]]]],
                 name: str) -> _Serving:
    """Run an asyncio server on a new uvloop loop on a daemon thread.

    ``start()`` is awaited on that loop and returns ``(port, async_stop)``.
    """
    loop = new_event_loop()
    ready: "collections.deque[Any]" = collections.deque()
    started = threading.Event()

    def body() -> None:
        asyncio.set_event_loop(loop)
        try:
            ready.append(loop.run_until_complete(start()))
        except BaseException as exc:  # reported to the starting thread
            ready.append(exc)
            started.set()
            return
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    if not started.wait(CONTROL_TIMEOUT_S):
        raise RuntimeError(f"{name}: server did not start")
    outcome = ready.popleft()
    if isinstance(outcome, BaseException):
        raise outcome
    port, async_stop = outcome

    def stop() -> None:
        async def finish() -> None:
            try:
                await asyncio.wait_for(async_stop(), 5.0)
            finally:
                loop.stop()
        asyncio.run_coroutine_threadsafe(finish(), loop)
        thread.join(10.0)

    return _Serving(port, stop)


def _serve_octo(handler: Any, inline: bool = False) -> Callable[..., _Serving]:
    """A server kind: octo_core's server with ``handler``; with ``registry`` it
    registers there or fails to start (the cell's client finds it only there),
    and leaves at once on stop: the cell is over, no caller is left."""
    def serve(host: str, port: int, registry: Optional[str] = None) -> _Serving:
        import octo_core

        async def start() -> Tuple[int, Callable[[], Awaitable[None]]]:
            server = octo_core.Server("com.octo.bench.echo", host, port, registry=registry,
                                      unregister_delay=0.0, require_registry=True)
            server.add_service(payload_module().Echo, handler, inline=inline)
            await server.start()
            return server.port, lambda: server.stop(grace=1.0)

        return _loop_thread(start, "octo-bench-server")
    return serve


def _serve_thriftpy2_sync(host: str, port: int) -> _Serving:
    from thriftpy2.rpc import make_server
    from thriftpy2.transport import TCyFramedTransportFactory

    # make_server refuses port 0, so build it on a placeholder port and bind port 0
    # ourselves; serve() would bind again, so its listen() becomes a no-op.
    server = make_server(payload_module().Echo, _EchoHandler(), host, port or 1,
                         trans_factory=TCyFramedTransportFactory(),
                         client_timeout=None)  # type: ignore[arg-type]  # None: no timeout
    server.daemon = True          # connection threads must not keep the child alive
    server.trans.port = port
    server.trans.listen()
    bound = server.trans.sock.getsockname()[1]
    server.trans.listen = lambda: None  # type: ignore[method-assign]  # bound above
    thread = threading.Thread(target=server.serve, name="thriftpy2-sync-server", daemon=True)
    thread.start()

    def stop() -> None:
        server.close()
        server.trans.close()

    return _Serving(bound, stop)


def _serve_thriftpy2_aio(host: str, port: int) -> _Serving:
    from thriftpy2.contrib.aio.transport.framed import TAsyncFramedTransportFactory
    from thriftpy2.rpc import make_aio_server

    async def start() -> Tuple[int, Callable[[], Awaitable[None]]]:
        # client_timeout=None: thriftpy2 otherwise closes every connection after 3 s.
        server = make_aio_server(payload_module().Echo, _AsyncEchoHandler(), host, port or 1,
                                 trans_factory=TAsyncFramedTransportFactory(),
                                 client_timeout=None, loop=asyncio.get_running_loop())
        server.trans.port = port          # make_aio_server refuses port 0; bind it here
        server.trans.listen()             # what TAsyncServer.init_server does, on our loop
        bound = server.trans.raw_sock.getsockname()[1]
        server.server = await server.trans.accept(server.handle)
        return bound, server.close

    return _loop_thread(start, "thriftpy2-aio-server")


def _serve_apache_sync(host: str, port: int) -> _Serving:
    from thrift.protocol.TBinaryProtocol import TBinaryProtocolAcceleratedFactory
    from thrift.server.TServer import TThreadedServer
    from thrift.transport.TSocket import TServerSocket
    from thrift.transport.TTransport import TFramedTransportFactory

    from octo_core.bench import _apache_payload

    protocols = TBinaryProtocolAcceleratedFactory()
    _apache_payload.require_accelerated(protocols.getProtocol(None))
    listener = TServerSocket(host, port)
    listener.listen()
    bound = listener.handle.getsockname()[1]
    listener.listen = lambda: None  # type: ignore[method-assign]  # bound above
    server = TThreadedServer(_apache_payload.EchoProcessor(_EchoHandler()), listener,
                             TFramedTransportFactory(), protocols, daemon=True)
    # TThreadedServer cannot be stopped: its threads are daemons, and end with the child
    # (it exits once the cell is over).
    threading.Thread(target=server.serve, name="apache-sync-server", daemon=True).start()
    return _Serving(bound, lambda: None)


def _serve_grpc(host: str, port: int) -> _Serving:
    import grpc
    import grpc.aio

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    async def start() -> Tuple[int, Callable[[], Awaitable[None]]]:
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            GRPC_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
        server.add_generic_rpc_handlers((handler,))
        bound = server.add_insecure_port(f"{host}:{port}")
        await server.start()
        return bound, lambda: server.stop(grace=1.0)

    return _loop_thread(start, "grpc-server")


def _serve_protocol(factory: Callable[[], asyncio.Protocol],
                    name: str) -> Callable[[str, int], _Serving]:
    """A server kind that is a bare asyncio protocol on a uvloop loop."""
    def serve(host: str, port: int) -> _Serving:
        async def start() -> Tuple[int, Callable[[], Awaitable[None]]]:
            loop = asyncio.get_running_loop()
            server = await loop.create_server(factory, host, port)
            bound = server.sockets[0].getsockname()[1]

            async def stop() -> None:
                server.close()
                await server.wait_closed()
            return bound, stop

        return _loop_thread(start, name)
    return serve


_SERVERS: Dict[str, Callable[..., _Serving]] = {   # (host, port), octo's also a registry
    "octo": _serve_octo(_AsyncEchoHandler()),
    "octo-plain": _serve_octo(_EchoHandler()),
    "octo-inline": _serve_octo(_EchoHandler(), inline=True),
    "thriftpy2-sync": _serve_thriftpy2_sync,
    "thriftpy2-aio": _serve_thriftpy2_aio,
    "apache-sync": _serve_apache_sync,
    "grpc": _serve_grpc,
    "codec": _serve_protocol(_CodecEchoServer, "codec-echo-server"),
    "raw": _serve_protocol(_RawEchoServer, "raw-echo-server"),
}


def _process_cpu() -> float:
    """CPU seconds (user + system) this process has used, all threads included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine_busy() -> Optional[float]:
    """CPU seconds all processes have used since boot (``/proc/stat``), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    ticks = [int(v) for v in fields[1:9]]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)   # minus idle, iowait
    return busy / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait: float, sample: float = 0.5) -> Optional[float]:
    """Wait up to ``max_wait`` s for the machine to idle (below ``QUIET_PCT`` of a core).

    Samples ``/proc/stat`` over ``sample``-second windows while this process
    sleeps; returns the last window's use in % of one core (None without
    ``/proc/stat``). Bounded: never waits longer than ``max_wait`` (+ a sample).
    """
    deadline = time.monotonic() + max_wait
    while True:
        before = _machine_busy()
        if before is None:
            return None
        t0 = time.monotonic()
        time.sleep(sample)
        after = _machine_busy()
        pct = ((after - before)  # type: ignore[operator]  # /proc/stat was read just now
               * 100.0 / (time.monotonic() - t0))
        if pct < QUIET_PCT or time.monotonic() >= deadline:
            return pct


def serve(kind: str, port: int = 0, host: str = "127.0.0.1", registry: Optional[str] = None,
          stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """The child's main: start server ``kind`` (registered in ``registry`` when
    given: octo's), print ``PORT <n>``, obey control lines.

    Control lines on stdin: ``cpu`` → ``CPU <seconds>`` (this process's
    user + system CPU); ``quit`` or end of input → stop the server and return.
    """
    start = _SERVERS[kind]
    serving = start(host, port, registry) if registry else start(host, port)
    try:
        stdout.write(f"PORT {serving.port}\n")
        stdout.flush()
        for line in stdin:
            command = line.strip()
            if command == "cpu":
                stdout.write(f"CPU {_process_cpu():.6f}\n")
                stdout.flush()
            elif command == "quit":
                break
    finally:
        serving.stop()
    return 0


# --- the server process, seen from the benchmark ---------------------------------

class ServerProcess:
    """A server child process: started, asked for its CPU, always stopped.

    ``with ServerProcess("octo") as server: server.port, server.cpu()``; on
    leaving, ``quit`` is sent and the child is killed if it has not exited
    within a few seconds.
    """

    def __init__(self, kind: str, host: str = "127.0.0.1", registry: Optional[str] = None) -> None:
        if kind not in _SERVERS:
            raise ValueError(f"unknown server kind {kind!r}")
        self.kind = kind
        self.host = host
        self.registry = registry
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self._stderr = tempfile.TemporaryFile()
        self._pending = b""

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> "ServerProcess":
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "octo_core.bench.rpc", "--serve", self.kind,
             "--host", self.host, "--port", "0",
             *(["--registry", self.registry] if self.registry else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env)
        try:
            line = self._readline()
            if not line.startswith("PORT "):
                raise RuntimeError(f"server {self.kind} said {line!r} instead of its port")
            self.port = int(line.split()[1])
        except BaseException:
            self.stop()
            raise
        return self

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")[-2000:]

    def _readline(self, timeout: float = CONTROL_TIMEOUT_S) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"server {self.kind} did not answer within {timeout}s")
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"server {self.kind} exited (status {self.proc.poll()}):\n"
                                   f"{self._stderr_tail()}")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode("ascii", "replace")

    def cpu(self) -> float:
        """The child's CPU seconds so far (user + system, every thread)."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"cpu\n")
        self.proc.stdin.flush()
        line = self._readline()
        if not line.startswith("CPU "):
            raise RuntimeError(f"server {self.kind} said {line!r} instead of its CPU time")
        return float(line.split()[1])

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the child to quit; kill it if it is still there after ``timeout`` seconds."""
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None and proc.stdin is not None:
                try:
                    proc.stdin.write(b"quit\n")
                    proc.stdin.close()
                except OSError:
                    pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        finally:
            if proc.poll() is None:   # only if even the kill has not been reaped yet
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
            self._stderr.close()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# --- client drivers ---------------------------------------------------------------

Phase = Tuple[List[int], float]   # (per-call latencies in ns, wall seconds)


class _Driver:
    """A client for one cell: ``open``, then ``phase(seconds)`` as often as needed, ``close``."""

    connections = 1

    def __init__(self, port: int, message: str, concurrency: int,
                 registry: Optional[str] = None) -> None:
        self.port = port
        self.message = message
        self.concurrency = concurrency
        self.registry = registry    # where the server registered, for clients that discover

    def open(self) -> None:
        raise NotImplementedError

    def phase(self, seconds: float) -> Phase:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


async def _drive(calls: Sequence[Callable[[], Awaitable[Any]]], seconds: float) -> Phase:
    """Run one worker per entry of ``calls`` until ``seconds`` pass; time every call."""
    latencies: List[int] = []
    clock = time.perf_counter_ns
    start = clock()
    deadline = start + int(seconds * 1e9)
    budget = max(1, MAX_CALLS_PER_PHASE // len(calls))

    async def worker(call: Callable[[], Awaitable[Any]]) -> None:
        append = latencies.append
        for _ in range(budget):
            t0 = clock()
            if t0 >= deadline:
                return
            await call()
            append(clock() - t0)

    await asyncio.gather(*(worker(call) for call in calls))
    return latencies, (clock() - start) / 1e9


class _AsyncDriver(_Driver):
    """A driver whose client runs on a uvloop loop owned by the driver."""

    def __init__(self, port: int, message: str, concurrency: int,
                 registry: Optional[str] = None) -> None:
        super().__init__(port, message, concurrency, registry)
        self.loop = new_event_loop()
        self.calls: List[Callable[[], Awaitable[Any]]] = []

    def open(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._open())

    async def _open(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    async def _check(self, call: Callable[[], Awaitable[Any]], expected: Any) -> None:
        got = await call()
        if got != expected:
            raise AssertionError(f"echo returned {str(got)[:40]!r}..., not the message")

    def phase(self, seconds: float) -> Phase:
        return self.loop.run_until_complete(_drive(self.calls, seconds))

    def close(self) -> None:
        try:
            self.loop.run_until_complete(asyncio.wait_for(self._close(), 5.0))
        finally:
            asyncio.set_event_loop(None)
            self.loop.close()


class _OctoDriver(_AsyncDriver):
    """``octo_core.AsyncClient``; every call shares the client's one connection."""

    protocol = "octo"

    async def _open(self) -> None:
        import octo_core

        nodes = (dict(registry=self.registry) if self.registry
                 else dict(hosts=[f"127.0.0.1:{self.port}"]))
        self.client = octo_core.AsyncClient(
            payload_module().Echo, appkey="com.octo.bench.client",
            remote_appkey="com.octo.bench.echo", protocol=self.protocol,
            timeout=CALL_TIMEOUT_S, **nodes)
        echo, message = self.client.echo, self.message  # type: ignore[attr-defined]  # IDL's
        call = lambda: echo(message)  # noqa: E731
        await self._check(call, message)
        self.calls = [call] * self.concurrency

    async def _close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            await client.close()


class _OctoThriftDriver(_OctoDriver):
    protocol = "thrift"


class _Tp2AioDriver(_AsyncDriver):
    """thriftpy2 asyncio: one client (one connection) per call in flight."""

    async def _open(self) -> None:
        from thriftpy2.contrib.aio.transport.framed import TAsyncFramedTransportFactory
        from thriftpy2.rpc import make_aio_client

        service, message = payload_module().Echo, self.message
        self.clients = []
        for _ in range(self.concurrency):
            self.clients.append(await make_aio_client(
                service, "127.0.0.1", self.port, trans_factory=TAsyncFramedTransportFactory(),
                timeout=int(CALL_TIMEOUT_S * 1000)))
        self.connections = len(self.clients)
        self.calls = [(lambda echo=c.echo: echo(message))  # type: ignore[misc]  # (a default)
                      for c in self.clients]
        for call in self.calls:
            await self._check(call, message)

    async def _close(self) -> None:
        for client in getattr(self, "clients", ()):
            client.close()
        await asyncio.sleep(0)


class _GrpcDriver(_AsyncDriver):
    """grpc.aio: one channel, N concurrent unary calls of the raw-bytes echo."""

    async def _open(self) -> None:
        import grpc.aio

        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        await asyncio.wait_for(self.channel.channel_ready(), CONTROL_TIMEOUT_S)
        echo = self.channel.unary_unary(GRPC_METHOD)
        data = self.message.encode()
        call = lambda: echo(data, timeout=CALL_TIMEOUT_S)  # noqa: E731
        await self._check(call, data)
        self.calls = [call] * self.concurrency

    async def _close(self) -> None:
        channel = getattr(self, "channel", None)
        if channel is not None:
            await channel.close()


class _PipelinedClient(asyncio.Protocol):
    """N requests in flight on one connection, a future each; the requests
    written during one loop iteration go out in batches that grow after each
    read, as octo_core's ``FramedProtocol.send`` sends them."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._out: List[bytes] = []
        self._flush_scheduled = False
        self._batch_frames = FIRST_BATCH_FRAMES
        self._transport: Optional[asyncio.Transport] = None
        self.lost: Optional[BaseException] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def _queue(self, frame: bytes) -> None:
        """Send ``frame`` when its batch is full, or at the end of the loop iteration."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        self._out.append(frame)
        if len(self._out) >= self._batch_frames:
            self._batch_frames = min(2 * self._batch_frames, WRITE_BATCH_FRAMES)
            self._write_out()

    def data_received(self, data: bytes) -> None:
        self._batch_frames = FIRST_BATCH_FRAMES   # the calls this read sets off: a new burst
        self._replies(data)

    def _replies(self, data: bytes) -> None:
        """Resolve the futures of the replies in ``data``."""
        raise NotImplementedError

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write_out()

    def _write_out(self) -> None:
        out = self._out
        if out and self._transport is not None:
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))
        self._out = []

    def _waiting(self) -> List["asyncio.Future[Any]"]:
        """The futures of the calls in flight (handed over: they are failed next)."""
        raise NotImplementedError

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.lost = exc or ConnectionError("closed")
        for future in self._waiting():
            if not future.done():
                future.set_exception(ConnectionError("echo connection lost"))


class _RawEchoClient(_PrefixedFrames, _PipelinedClient):
    """Length-prefixed frames; replies resolve futures in order."""

    def __init__(self) -> None:
        super().__init__()
        self._waiters: Deque[asyncio.Future] = collections.deque()

    def call(self, frame: bytes) -> "asyncio.Future[bytes]":
        if self.lost is not None:
            raise ConnectionError(f"raw echo connection lost: {self.lost}")
        future = self._loop.create_future()
        self._waiters.append(future)
        self._queue(frame)
        return future

    def _replies(self, data: bytes) -> None:
        if self._buf:
            joined = self._joined(data)
            if joined is None:
                return
            data = joined
        size = len(data)
        end = 0
        waiters = self._waiters
        while size - end >= 4:
            frame_end = end + 4 + int.from_bytes(data[end:end + 4], "big")
            if frame_end > size:
                break
            waiters.popleft().set_result(data[end + 4:frame_end])
            end = frame_end
        if end < size:
            self._keep(data, end)

    def _waiting(self) -> List["asyncio.Future[Any]"]:
        waiters, self._waiters = list(self._waiters), collections.deque()
        return waiters


class _CodecEchoClient(_PipelinedClient):
    """Unified requests written and replies read with ``_codec`` alone (the
    header carries what octo_core's client sends: service, appkey, timeout,
    trace and span ids); replies resolve futures by sequence id."""

    def __init__(self) -> None:
        from octo_core import _codec
        from octo_core.protocol import DEFAULT_FLAGS, FrameDecoder
        from thriftpy2.thrift import TApplicationException

        super().__init__()
        self._codec = _codec
        self._app_exception = TApplicationException
        self._flags = DEFAULT_FLAGS
        self._feed = FrameDecoder().feed
        self._waiters: Dict[int, asyncio.Future] = {}
        self._seq = 0
        self._echo = payload_module().Echo

    def call(self, message: str) -> "asyncio.Future[str]":
        if self.lost is not None:
            raise ConnectionError(f"codec echo connection lost: {self.lost}")
        self._seq = seq = (self._seq + 1) & 0x7FFFFFFF
        codec = self._codec
        frame = codec.encode_request(
            self._flags, 0, "Echo", seq, 0, int(CALL_TIMEOUT_S * 1000), "com.octo.bench.client",
            codec.new_id(), codec.new_id(), {}, None, "echo", _CALL, seq,
            self._echo.echo_args(message))
        future = self._waiters[seq] = self._loop.create_future()
        self._queue(frame)
        return future

    def _replies(self, data: bytes) -> None:
        decode_reply, result_cls = self._codec.decode_reply, self._echo.echo_result
        for frame in self._feed(data):
            _, result = decode_reply(result_cls, self._app_exception, frame.body)
            self._waiters.pop(frame.head.sequence_id).set_result(result.success)

    def _waiting(self) -> List["asyncio.Future[Any]"]:
        waiters, self._waiters = list(self._waiters.values()), {}
        return waiters


class _RawDriver(_AsyncDriver):
    """The raw uvloop echo: 4-byte length prefix + the message bytes, no serialization."""

    proto: _PipelinedClient   # the connection's echo client (the codec driver's is another)

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport, proto = await loop.create_connection(
            _RawEchoClient, "127.0.0.1", self.port)
        self.proto = proto
        data = self.message.encode()
        frame = len(data).to_bytes(4, "big") + data
        send = proto.call
        call = lambda: send(frame)  # noqa: E731
        await self._check(call, data)
        self.calls = [call] * self.concurrency

    async def _close(self) -> None:
        transport = getattr(self, "transport", None)
        if transport is not None:
            transport.close()
        await asyncio.sleep(0)


class _CodecDriver(_RawDriver):
    """codec-only: the unified protocol with nothing but octo_core's C codec."""

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport, proto = await loop.create_connection(
            _CodecEchoClient, "127.0.0.1", self.port)
        self.proto = proto
        send, message = proto.call, self.message
        call = lambda: send(message)  # noqa: E731
        await self._check(call, message)
        self.calls = [call] * self.concurrency


class _ThreadedDriver(_Driver):
    """A blocking client: N threads, each with one call outstanding at a time
    (``echoes``: each thread's ``echo`` function)."""

    echoes: List[Callable[[str], str]]

    def _check(self) -> None:
        for echo in set(self.echoes):
            if echo(self.message) != self.message:
                raise AssertionError("echo returned something else than the message")

    def phase(self, seconds: float) -> Phase:
        clock = time.perf_counter_ns
        lists: List[List[int]] = [[] for _ in self.echoes]
        errors: List[BaseException] = []
        budget = max(1, MAX_CALLS_PER_PHASE // len(self.echoes))
        message = self.message
        start = clock()
        deadline = start + int(seconds * 1e9)

        def worker(echo: Callable[[str], str], latencies: List[int]) -> None:
            append = latencies.append
            try:
                for _ in range(budget):
                    t0 = clock()
                    if t0 >= deadline:
                        return
                    echo(message)
                    append(clock() - t0)
            except BaseException as exc:  # reported by phase()
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(echo, lst), daemon=True)
                   for echo, lst in zip(self.echoes, lists)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + CALL_TIMEOUT_S + 15.0)   # (Client waits its timeout + 10 s)
        elapsed = (clock() - start) / 1e9
        if errors:
            raise errors[0]
        if any(t.is_alive() for t in threads):
            raise RuntimeError(f"{type(self).__name__}: worker threads did not finish")
        return [ns for lst in lists for ns in lst], elapsed


class _Tp2SyncDriver(_ThreadedDriver):
    """thriftpy2 sync: N threads, each with its own client (its own connection)."""

    def open(self) -> None:
        from thriftpy2.rpc import make_client
        from thriftpy2.transport import TCyFramedTransportFactory

        service = payload_module().Echo
        self.clients = []
        for _ in range(self.concurrency):
            self.clients.append(make_client(
                service, "127.0.0.1", self.port, trans_factory=TCyFramedTransportFactory(),
                timeout=int(CALL_TIMEOUT_S * 1000)))
        self.connections = len(self.clients)
        self.echoes = [client.echo for client in self.clients]
        self._check()

    def close(self) -> None:
        for client in getattr(self, "clients", ()):
            client.close()


class _ApacheSyncDriver(_ThreadedDriver):
    """Apache Thrift sync: N threads, each with its own client (its own connection)."""

    def open(self) -> None:
        from thrift.protocol.TBinaryProtocol import TBinaryProtocolAccelerated
        from thrift.transport.TSocket import TSocket
        from thrift.transport.TTransport import TFramedTransport

        from octo_core.bench import _apache_payload

        self.transports = []
        self.echoes = []
        for _ in range(self.concurrency):
            socket = TSocket("127.0.0.1", self.port)
            socket.setTimeout(CALL_TIMEOUT_S * 1000)
            transport = TFramedTransport(socket)
            transport.open()
            self.transports.append(transport)
            protocol = _apache_payload.require_accelerated(TBinaryProtocolAccelerated(transport))
            self.echoes.append(_apache_payload.EchoClient(protocol).echo)
        self.connections = len(self.transports)
        self._check()

    def close(self) -> None:
        for transport in getattr(self, "transports", ()):
            transport.close()


class _OctoSyncDriver(_ThreadedDriver):
    """``octo_core.Client``: N threads share the one blocking client (one connection)."""

    def open(self) -> None:
        import octo_core

        nodes = (dict(registry=self.registry) if self.registry
                 else dict(hosts=[f"127.0.0.1:{self.port}"]))
        self.client = octo_core.Client(
            payload_module().Echo, appkey="com.octo.bench.client",
            remote_appkey="com.octo.bench.echo", timeout=CALL_TIMEOUT_S, **nodes)
        self.echoes = [self.client.echo] * self.concurrency  # type: ignore[attr-defined]  # IDL's
        self._check()

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()


_DRIVERS: Dict[str, type] = {
    OCTO: _OctoDriver, OCTO_THRIFT: _OctoThriftDriver, OCTO_PLAIN: _OctoDriver,
    OCTO_INLINE: _OctoDriver, OCTO_SYNC: _OctoSyncDriver,
    TP2_SYNC: _Tp2SyncDriver, TP2_AIO: _Tp2AioDriver, APACHE_SYNC: _ApacheSyncDriver,
    GRPC: _GrpcDriver, CODEC_ONLY: _CodecDriver, RAW: _RawDriver,
}


def missing_reason(system: str) -> Optional[str]:
    """Why ``system`` cannot run here (a library is not installed), or None."""
    modules = {GRPC: ("grpc", "grpc.aio"), RAW: ("uvloop",),
               TP2_SYNC: ("thriftpy2",), TP2_AIO: ("thriftpy2.contrib.aio",),
               APACHE_SYNC: ("thrift.protocol.fastbinary",)}.get(system, ())
    for name in modules:
        try:
            __import__(name)
        except ImportError as exc:
            return f"{name.split('.')[0]} is not installed ({exc})"
    return None


# --- running ----------------------------------------------------------------------

def measure(system: str, payload: str, concurrency: int, seconds: float,
            warmup: float) -> Result:
    """Run one cell: a fresh server child, warm-up, the measured window, teardown."""
    result = Result(system, payload, concurrency)
    missing = missing_reason(system)
    if missing is not None:
        result.missing = missing
        return result
    message = make_message(PAYLOADS[payload])
    registry = tempfile.TemporaryDirectory(prefix="octo-bench-") if system in DISCOVERING else None
    url = f"file://{registry.name}" if registry is not None else None
    server = ServerProcess(SERVER_KIND[system], registry=url)
    try:
        server.start()
        result.server_pid = server.pid
        driver: _Driver = _DRIVERS[system](server.port, message, concurrency, url)
        try:
            driver.open()
            result.connections = driver.connections
            if warmup > 0:
                driver.phase(warmup)
            server_cpu0 = server.cpu()
            machine0 = _machine_busy()
            client_cpu0 = time.process_time()
            latencies, elapsed = driver.phase(seconds)
            client_cpu = time.process_time() - client_cpu0
            machine1 = _machine_busy()
            server_cpu = server.cpu() - server_cpu0
        finally:
            driver.close()
    except Exception as exc:  # the cell is reported broken; the others still run
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    finally:
        server.stop()
        if registry is not None:
            registry.cleanup()
    calls = len(latencies)
    latencies.sort()
    result.calls = calls
    result.seconds = elapsed
    result.calls_per_s = calls / elapsed if elapsed > 0 else 0.0
    result.p50_us = _percentile(latencies, 0.50)
    result.p99_us = _percentile(latencies, 0.99)
    if calls:
        result.client_cpu_us_per_call = client_cpu * 1e6 / calls
        result.server_cpu_us_per_call = server_cpu * 1e6 / calls
    if machine0 is not None and machine1 is not None and elapsed > 0:
        other = (machine1 - machine0) - client_cpu - server_cpu
        result.other_cpu_pct = max(0.0, other) * 100.0 / elapsed
    return result


def is_noisy(result: Result) -> bool:
    """Other processes used more than ``NOISY_PCT`` of a core during the cell's window."""
    return result.other_cpu_pct is not None and result.other_cpu_pct > NOISY_PCT


def pick_round(rounds: Sequence[Result]) -> Result:
    """The round that stands for a cell: the median by calls/s of its quiet rounds.

    Quiet rounds are preferred to noisy ones (``is_noisy``); without any, the
    median of the measured rounds is taken (and shows as noisy); without a
    measured round, the last attempt (its error) is returned. The median (the
    upper one for an even count), not the best: on this VM the scheduler's
    placement of client and server (same core or not) flips results between
    two modes, and the best round would report the lucky one.
    """
    measured = [r for r in rounds if r.ok]
    if not measured:
        return rounds[-1]
    pool = [r for r in measured if not is_noisy(r)] or measured
    pool.sort(key=lambda r: r.calls_per_s)
    chosen = pool[len(pool) // 2]
    chosen.quiet_rounds = sum(1 for r in measured if not is_noisy(r))
    return chosen


def run(seconds: float = 2.0, *, systems: Sequence[str] = SYSTEMS,
        payloads: Sequence[str] = DEFAULT_PAYLOADS, concurrencies: Sequence[int] = CONCURRENCIES,
        warmup: Optional[float] = None, rounds: int = 1, quiet_wait: float = 0.0,
        progress: Optional[Callable[[Result], None]] = None) -> List[Result]:
    """Measure every system × payload × concurrency; returns one ``Result`` per cell.

    ``warmup`` defaults to a quarter of ``seconds`` (at most 1 s). Every cell
    has its own server process, stopped before the next cell starts. With
    ``rounds`` > 1 the whole matrix is measured that many times over (so a burst
    of noise from other processes hits one round of a cell, not all of them)
    and each cell is represented by its median quiet round (``pick_round``).
    With ``quiet_wait`` > 0, each cell first waits up to that many seconds for
    the machine to idle (``wait_for_quiet``), since other processes sharing
    the cores change the results a lot.
    """
    unknown = [s for s in systems if s not in SYSTEMS] + [p for p in payloads if p not in PAYLOADS]
    if unknown:
        raise ValueError(f"unknown system or payload: {', '.join(unknown)}")
    if seconds <= 0 or rounds < 1 or any(c < 1 for c in concurrencies):
        raise ValueError("seconds must be positive, rounds and concurrencies at least 1")
    if warmup is None:
        warmup = min(1.0, seconds / 4)
    cells = [(system, payload, concurrency) for payload in payloads
             for concurrency in concurrencies for system in systems]
    measured: Dict[Tuple[str, str, int], List[Result]] = {cell: [] for cell in cells}
    for _ in range(rounds):
        for cell in cells:
            done = measured[cell]
            if done and done[-1].missing is not None:
                continue   # a library that is not installed stays so: no second try
            if quiet_wait > 0:
                wait_for_quiet(quiet_wait)
            result = measure(*cell, seconds, warmup)
            done.append(result)
            if progress is not None:
                progress(result)
    results = [pick_round(measured[cell]) for cell in cells]
    for result in results:
        result.rounds = len(measured[(result.system, result.payload, result.concurrency)])
    return results


# --- ratios, targets, report ------------------------------------------------------

def _find(results: Sequence[Result], system: str, payload: str,
          concurrency: int) -> Optional[Result]:
    for r in results:
        if (r.system, r.payload, r.concurrency) == (system, payload, concurrency) and r.ok:
            return r
    return None


def vs_raw(results: Sequence[Result], r: Result) -> Optional[Tuple[str, float]]:
    """``r`` against the raw uvloop echo of its cell.

    One call in flight: latency, ``("p50", r.p50 ÷ raw.p50)`` (lower is better).
    More in flight: throughput, ``("calls/s", r ÷ raw)`` (higher is better).
    """
    raw = _find(results, RAW, r.payload, r.concurrency)
    if raw is None or not r.ok:
        return None
    if r.concurrency == 1:
        return ("p50", r.p50_us / raw.p50_us) if raw.p50_us else None
    return ("calls/s", r.calls_per_s / raw.calls_per_s) if raw.calls_per_s else None


def octo_vs(results: Sequence[Result], peer: str, payload: str,
            concurrency: int) -> Optional[float]:
    """octo_core's calls/s ÷ system ``peer``'s, for one cell (None: one was not measured)."""
    octo = _find(results, OCTO, payload, concurrency)
    other = _find(results, peer, payload, concurrency)
    if octo is None or other is None or not other.calls_per_s:
        return None
    return octo.calls_per_s / other.calls_per_s


def check_targets(results: Sequence[Result]) -> List[TargetCheck]:
    """The three targets, per payload, at the lowest (1) and highest concurrency measured."""
    checks: List[TargetCheck] = []
    payloads = list(dict.fromkeys(r.payload for r in results))
    concurrencies = sorted({r.concurrency for r in results})
    if not concurrencies:
        return checks
    top = concurrencies[-1]

    def noisy(*cells: Optional[Result]) -> bool:
        return any(c is not None and is_noisy(c) for c in cells)

    for payload in payloads:
        if top > 1:
            octo = _find(results, OCTO, payload, top)
            raw = _find(results, RAW, payload, top)
            tp2 = _find(results, TP2_AIO, payload, top)
            ratio = (vs_raw(results, octo)[1]  # type: ignore[index]  # (not None: just asked)
                     if octo is not None and vs_raw(results, octo) else None)
            checks.append(TargetCheck(f"octo calls/s ÷ raw uvloop, {top} in flight", payload,
                                      ratio, TARGET_VS_RAW_THROUGHPUT, True,
                                      noisy=noisy(octo, raw)))
            checks.append(TargetCheck(f"octo calls/s ÷ thriftpy2-aio, {top} in flight", payload,
                                      octo_vs(results, TP2_AIO, payload, top),
                                      TARGET_VS_TP2_AIO_THROUGHPUT, True, noisy=noisy(octo, tp2)))
        if 1 in concurrencies:
            octo = _find(results, OCTO, payload, 1)
            raw = _find(results, RAW, payload, 1)
            ratio = (vs_raw(results, octo)[1]  # type: ignore[index]  # (not None: just asked)
                     if octo is not None and vs_raw(results, octo) else None)
            checks.append(TargetCheck("octo p50 ÷ raw uvloop p50, 1 in flight", payload,
                                      ratio, TARGET_VS_RAW_P50, False, noisy=noisy(octo, raw)))
    for check in checks:
        if check.value is not None:
            check.met = check.value >= check.bound if check.at_least else check.value <= check.bound
    return checks


def environment() -> Dict[str, str]:
    """Where the numbers come from."""
    versions = {}
    for name, distribution in (("octo_core", "octo-core"), ("thriftpy2", "thriftpy2"),
                               ("uvloop", "uvloop"), ("grpc", "grpcio"),
                               ("thrift", "thrift")):
        try:
            versions[name] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({platform.system()} "
                   f"{platform.release()})",
        "libraries": ", ".join(f"{k} {v}" for k, v in versions.items()),
    }


def _peer_ratios(results: Sequence[Result]) -> List[str]:
    """The lines of octo's calls/s ÷ each peer's, cell by cell (none when octo or
    every peer is missing: no heading over nothing)."""
    rows = []
    peers = [p for p in PEERS if any(r.system == p and r.ok for r in results)]
    for payload, concurrency in dict.fromkeys((r.payload, r.concurrency) for r in results):
        ratios = [octo_vs(results, peer, payload, concurrency) for peer in peers]
        if any(ratio is not None for ratio in ratios):
            rows.append([payload, str(concurrency)]
                        + ["-" if ratio is None else f"{ratio:.2f}×" for ratio in ratios])
    if not rows:
        return []
    header = ["payload", "in-flight", *peers]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return ["", "octo calls/s ÷ each peer's, same cell (above 1×: octo_core answers more calls):",
            *(" ".join(f"{cell:>{width}}" for cell, width in zip(row, widths))
              for row in (header, *rows))]


def format_report(results: Sequence[Result], seconds: Optional[float] = None,
                  warmup: Optional[float] = None, rounds: int = 1) -> str:
    """The results table, octo's ratios to the peers and the targets, as text."""
    lines = []
    env = environment()
    lines.append(f"RPC echo benchmark, {env['date']}; {env['python']}; {env['machine']}")
    lines.append(f"libraries: {env['libraries']}")
    if seconds is not None:
        lines.append(f"each cell: {warmup if warmup is not None else min(1.0, seconds / 4):g} s "
                     f"warm-up + {seconds:g} s measured, own server process"
                     + (f"; {rounds} rounds per cell, the median quiet round by calls/s is shown"
                        if rounds > 1 else ""))
    lines.append("")
    header = (f"{'system':<15} {'payload':>7} {'in-flight':>9} {'conns':>5} {'calls/s':>10} "
              f"{'p50 µs':>9} {'p99 µs':>9} {'CPU µs/call':>11} {'(cli+srv)':>13} "
              f"{'vs raw':>16} {'other%':>6}")
    lines.append(header)
    lines.append("-" * len(header))
    previous = None
    for r in results:
        if previous is not None and (r.payload, r.concurrency) != previous:
            lines.append("")
        previous = (r.payload, r.concurrency)
        head = f"{r.system:<15} {r.payload:>7} {r.concurrency:>9}"
        if r.missing is not None:
            lines.append(f"{head}  MISSING: {r.missing}")
            continue
        if r.error is not None:
            lines.append(f"{head}  ERROR: {r.error}")
            continue
        ratio = vs_raw(results, r)
        shown = "" if ratio is None else f"{ratio[1]:.2f}× {ratio[0]}"
        split = f"{r.client_cpu_us_per_call:.1f}+{r.server_cpu_us_per_call:.1f}"
        other = "" if r.other_cpu_pct is None else (
            f"{r.other_cpu_pct:.0f}" + ("!" if is_noisy(r) else ""))
        lines.append(f"{head} {r.connections:>5} {r.calls_per_s:>10,.0f} {r.p50_us:>9.1f} "
                     f"{r.p99_us:>9.1f} {r.cpu_us_per_call:>11.1f} {split:>13} {shown:>16} "
                     f"{other:>6}")
    lines.append("")
    lines.append("vs raw: p50 ratio with 1 in flight (lower is better), "
                 "calls/s ratio with more in flight (higher is better)")
    if any(r.system == CODEC_ONLY for r in results):
        lines.append("codec-only: the unified protocol with nothing but octo_core's C codec "
                     "(no deadlines, routing, breakers, metrics, tracing, flow control): the "
                     "floor under octo; octo minus it is what the framework costs per call")
    lines.append("other%: CPU used by the rest of the machine during the window, in % of one "
                 "core (from /proc/stat; kernel softirq work for loopback traffic counts here "
                 f"too); '!' marks a noisy cell (over {NOISY_PCT:g}%): other processes "
                 "competed for the two cores and its numbers are not comparable")
    lines += _peer_ratios(results)
    checks = check_targets(results)
    if checks:
        lines.append("")
        lines.append("targets:")
        for c in checks:
            sign = "≥" if c.at_least else "≤"
            value = "n/a" if c.value is None else f"{c.value:.2f}×"
            verdict = {True: "MET", False: "NOT MET", None: "NOT MEASURED"}[c.met]
            lines.append(f"  {c.name} ({c.payload}): {value} (target {sign} {c.bound:g}×) "
                         f"{verdict}" + (" (from a noisy cell)" if c.noisy else ""))
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------

def _csv(choices: Sequence[str]) -> Callable[[str], List[str]]:
    def parse(text: str) -> List[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return items
    return parse


def _concurrencies(text: str) -> List[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"comma-separated integers ≥ 1, got {text!r}")
    return values


def _writable(path: str) -> str:
    """``path`` once it is known to be writable: opened (created if need be) now, so a
    bad ``--json`` is a usage error before the run, not a traceback that loses it."""
    try:
        open(path, "a", encoding="utf-8").close()   # "a": nothing is lost if the run fails
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write {path}: {exc.strerror}") from None
    return path


def options_parser(seconds: float = 2.0) -> argparse.ArgumentParser:
    """The benchmark's options, as an argparse parent (``parents=[...]``): the one
    definition ``build_parser`` and ``octo bench rpc`` share. ``seconds`` is the
    ``--seconds`` default (``octo bench``'s is 1 s)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--seconds", type=seconds_argument, default=seconds, metavar="S",
                        help=f"measured seconds per cell (default: {seconds:g})")
    parser.add_argument("--warmup", type=seconds_or_zero_argument, default=None, metavar="S",
                        help="warm-up seconds per cell (default: seconds/4, at most 1)")
    parser.add_argument("--systems", type=_csv(SYSTEMS), default=list(SYSTEMS),
                        help=f"comma-separated subset of: {', '.join(SYSTEMS)}")
    parser.add_argument("--payloads", type=_csv(tuple(PAYLOADS)), default=list(DEFAULT_PAYLOADS),
                        help=f"comma-separated subset of: {', '.join(PAYLOADS)} "
                             f"(default: {','.join(DEFAULT_PAYLOADS)})")
    parser.add_argument("--concurrency", type=_concurrencies, default=list(CONCURRENCIES),
                        help="comma-separated calls in flight (default: 1,64)")
    parser.add_argument("--rounds", type=count_argument, default=1, metavar="N",
                        help="measure the whole matrix N times; each cell shows its median "
                             "quiet round by calls/s (default: 1)")
    parser.add_argument("--quiet-wait", type=seconds_or_zero_argument, default=10.0, metavar="S",
                        help="before each cell wait up to S seconds for the machine to idle "
                             f"(below {QUIET_PCT:g}%% of a core; default: 10, 0 = never)")
    parser.add_argument("--json", type=_writable, metavar="PATH",
                        help="also write the results as JSON")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """``python -m octo_core.bench.rpc``: the options, and the hidden ones of a server child."""
    parser = argparse.ArgumentParser(
        prog="python -m octo_core.bench.rpc", parents=[options_parser()],
        description="End-to-end RPC echo benchmark: octo_core vs thriftpy2, grpcio and a raw "
                    "uvloop echo, each server in its own process.")
    parser.add_argument("--serve", choices=SERVER_KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--registry", help=argparse.SUPPRESS)
    return parser


def _progress(r: Result) -> None:
    """One line on stderr per measured cell."""
    state = (f"MISSING {r.missing}" if r.missing else f"ERROR {r.error}" if r.error
             else f"{r.calls_per_s:,.0f} calls/s, p50 {r.p50_us:.1f} µs, other "
                  f"{r.other_cpu_pct if r.other_cpu_pct is not None else float('nan'):.0f}%")
    print(f"  {r.system} {r.payload} x{r.concurrency}: {state}", file=sys.stderr, flush=True)


def bench(args: argparse.Namespace) -> int:
    """Run the benchmark ``options_parser``'s parsed ``args`` ask for, write ``--json``
    and print the report; exit status 1 when a cell failed."""
    results = run(args.seconds, systems=args.systems, payloads=args.payloads,
                  concurrencies=args.concurrency, warmup=args.warmup, rounds=args.rounds,
                  quiet_wait=args.quiet_wait, progress=_progress)
    if args.json:   # before the report: a stdout that closed early must not lose it
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"environment": environment(), "seconds": args.seconds,
                       "results": [asdict(r) for r in results],
                       "targets": [asdict(c) for c in check_targets(results)]}, fh, indent=2)
    print(format_report(results, args.seconds, args.warmup, args.rounds))
    return 1 if any(r.error for r in results) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark (or, with ``--serve KIND``, be a server child); exit status."""
    args = build_parser().parse_args(argv)
    if args.serve:
        return serve(args.serve, args.port, args.host, args.registry)
    return bench(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
