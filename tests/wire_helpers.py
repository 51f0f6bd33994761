"""Helpers for the wire tests: servers that always stop, raw sockets, thriftpy2 peers.

Everything binds 127.0.0.1 on a free port (port 0) or a unix socket in a fresh
short temporary directory, and every helper that starts something stops it in a
``finally``. Async tests run through ``run()`` (no pytest-asyncio): one event
loop per test, the whole coroutine bounded by a timeout so a bug fails the test
instead of hanging CI.
"""
from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import queue
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterator, List, Optional, Sequence, Tuple

import pytest
import thriftpy2.rpc
from thriftpy2.protocol import TBinaryProtocolFactory
from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport import TFramedTransportFactory

import octo_core
from octo_core import codec, protocol
from octo_core.protocol import Frame, FrameDecoder
from octo_core.transport.loop import LoopThread, new_event_loop
from octo_core.throttle import Throttle

from cluster_helpers import run_on

HERE = os.path.dirname(os.path.abspath(__file__))
ECHO_IDL = os.path.join(HERE, "idl", "echo.thrift")
echo_thrift = octo_core.load_idl(ECHO_IDL, module_name="octo_wire_echo_thrift")
Echo = echo_thrift.Echo
Calc = echo_thrift.Calc
EchoError = echo_thrift.EchoError
EVERYTHING = octo_core.load_idl(os.path.join(HERE, "idl", "everything.thrift"))
#: ``Store`` extends ``Monitored`` (an fb303-style base): one handler may serve both.
MONITORED = octo_core.load_idl(os.path.join(HERE, "idl", "monitored.thrift"))


class EverythingStubs:
    """EverythingService's methods, each with a plain answer: a test's handler
    overrides the ones it calls."""

    def ping(self):
        pass

    def add(self, a, b):
        return a + b

    def echo(self, payload):
        return payload

    def notify(self, event, attrs):
        pass

    def walk(self, root, depth):
        return []

    def checksum(self, data, algorithms):
        return b""

    def classify(self, items):
        return {}

SERVER_APPKEY = "com.example.wire.server"
CLIENT_APPKEY = "com.example.wire.client"
LOCALHOST = "127.0.0.1"

# A hard cap for one test: a hang dumps every thread's stack and fails the run
# instead of stalling CI forever (pytest-timeout is not installed).
TEST_WATCHDOG_SECONDS = 60.0


def have_snappy() -> bool:
    try:
        import cramjam  # noqa: F401  (only whether it imports)
    except ImportError:
        return False
    return True


@pytest.fixture(autouse=False)
def watchdog():
    """Import with ``from wire_helpers import watchdog`` and mark autouse in a module."""
    faulthandler.dump_traceback_later(TEST_WATCHDOG_SECONDS, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


# --- handlers ---------------------------------------------------------------------

class Unprintable(Exception):
    """An exception whose ``__str__`` fails (a common bug in custom exceptions)."""

    def __str__(self) -> str:
        return self.missing   # type: ignore[attr-defined]


class EchoHandler:
    """Handler for ``Echo``: plain functions run on business threads, ``slow`` on the loop."""

    def __init__(self) -> None:
        self.notes: "queue.Queue[str]" = queue.Queue()   # texts received by notify()
        self.pings = 0
        self.entered: "queue.Queue[str]" = queue.Queue()  # block() calls that started
        self.release = threading.Event()                  # lets block() return
        self.slow_started = 0
        self.slow_finished = 0
        self.naps_started = 0
        self._lock = threading.Lock()

    def echo(self, text: str) -> str:
        return text

    def fail(self, kind: str) -> str:
        if kind == "declared":
            raise EchoError(message="refused on purpose", code=42)
        if kind == "undeclared":
            raise ValueError("boom")
        if kind == "unprintable":
            raise Unprintable()
        if kind == "app":
            raise TApplicationException(TApplicationException.INVALID_MESSAGE_TYPE, "app says no")
        return kind

    def ping(self) -> None:
        with self._lock:
            self.pings += 1

    def notify(self, text: str) -> None:
        self.notes.put(text)

    async def slow(self, text: str, delay_ms: int) -> str:
        self.slow_started += 1
        await asyncio.sleep(delay_ms / 1000.0)
        self.slow_finished += 1
        return text

    def nap(self, text: str, delay_ms: int) -> str:
        with self._lock:
            self.naps_started += 1
        time.sleep(delay_ms / 1000.0)
        return text

    def block(self, text: str) -> str:
        self.entered.put(text)
        if not self.release.wait(10):
            raise RuntimeError("block() was never released")
        return text

    def whoami(self) -> str:
        return "Echo"


class StoreHandler:
    """Handler for ``MONITORED.Store`` and its base ``Monitored`` alike."""

    def status(self) -> str:
        return "ALIVE"

    def put(self, key: str) -> str:
        return key


class SyncEchoHandler(EchoHandler):
    """Every method a plain function (for the thread-per-connection thriftpy2 server)."""

    def slow(self, text: str, delay_ms: int) -> str:  # type: ignore[override]
        self.slow_started += 1
        time.sleep(delay_ms / 1000.0)
        self.slow_finished += 1
        return text


class CalcHandler:
    async def add(self, a: int, b: int) -> int:
        return a + b

    def whoami(self) -> str:
        return "Calc"


# --- running coroutines -----------------------------------------------------------

def run(coro, timeout: float = 30.0) -> Any:
    """Run ``coro`` on a fresh uvloop (the loop octo_core uses), bounded by ``timeout``."""
    return run_on(new_event_loop, asyncio.wait_for(coro, timeout))


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0,
                     what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def wait_until_sync(predicate: Callable[[], bool], timeout: float = 5.0,
                    what: str = "condition") -> None:
    """``wait_until`` for a thread that runs no loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


# --- our server ---------------------------------------------------------------------

Services = Sequence[Tuple[Any, Any, Optional[str]]]   # (service, handler, name)


class GoodCaller:
    """A good client calling echo in a loop on its own connection, counting
    calls and failures (every failure is a bug); ``pause`` seconds between calls."""

    def __init__(self, client: octo_core.AsyncClient, pause: float = 0.0) -> None:
        self.client = client
        self.pause = pause
        self.calls = 0
        self.failures: List[BaseException] = []
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            text = f"good-{self.calls}"
            try:
                result = await self.client.echo(text)
                if result != text:
                    self.failures.append(AssertionError(f"{result!r} != {text!r}"))
            except Exception as exc:  # any failure of the good client is a bug
                self.failures.append(exc)
            self.calls += 1
            if self.pause:
                await asyncio.sleep(self.pause)

    async def progress(self, more: int = 20) -> None:
        """Wait until ``more`` further calls have been made."""
        target = self.calls + more
        await wait_until(lambda: self.calls >= target or self._task.done(),
                         what="the good client to keep calling")

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(self._task, 5)

    async def finish(self) -> None:
        """Stop, and fail the test if any call failed or none was made."""
        await self.stop()
        assert self.failures == [], self.failures[:3]
        assert self.calls > 0


def _build_server(services: Services, host: str, port: int, **options: Any) -> octo_core.Server:
    server = octo_core.Server(options.pop("appkey", SERVER_APPKEY), host=host, port=port, **options)
    for service, handler, name in services:
        server.add_service(service, handler, name=name)
    return server


def fresh_throttle(monkeypatch: pytest.MonkeyPatch, name: str, *modules: Any) -> Callable[[], None]:
    """Put a ``Throttle`` nothing was logged to yet (earlier tests' records held
    nothing back) in place of ``modules``' ``name`` (each module that imported
    it), on a clock the test moves: calling what is returned ends its quiet
    period, and no test sleeps."""
    now = [0.0]
    old = getattr(modules[0], name)
    throttle = Throttle(old.every, old.logger, old.level, clock=lambda: now[0])
    for module in modules:
        monkeypatch.setattr(module, name, throttle)

    def period_over() -> None:
        now[0] += throttle.every
    return period_over


@contextlib.asynccontextmanager
async def serving(services: Services, *, host: str = LOCALHOST, port: int = 0,
                  grace: float = 1.0, **options: Any) -> AsyncIterator[octo_core.Server]:
    """An octo_core Server on this loop, started and ALWAYS stopped."""
    server = _build_server(services, host, port, **options)
    await asyncio.wait_for(server.start(), 5)
    try:
        yield server
    finally:
        await asyncio.wait_for(server.stop(grace=grace), grace + 5)


@contextlib.contextmanager
def serving_in_thread(services: Services, *, host: str = LOCALHOST, port: int = 0,
                      grace: float = 1.0, **options: Any) -> Iterator[octo_core.Server]:
    """An octo_core Server on its own loop thread (for blocking clients)."""
    server = _build_server(services, host, port, **options)
    loop = LoopThread("wire-test-server")
    try:
        loop.run(server.start(), timeout=5)
        try:
            yield server
        finally:
            loop.run(server.stop(grace=grace), timeout=grace + 5)
    finally:
        loop.stop()


def echo_services(handler: Optional[EchoHandler] = None, name: Optional[str] = None) -> Services:
    return [(Echo, handler if handler is not None else EchoHandler(), name)]


@contextlib.asynccontextmanager
async def async_client(service: Any, address: str, **options: Any) -> AsyncIterator[octo_core.AsyncClient]:
    options.setdefault("appkey", CLIENT_APPKEY)
    options.setdefault("timeout", 2.0)
    client = octo_core.AsyncClient(service, hosts=[address], **options)
    try:
        yield client
    finally:
        await asyncio.wait_for(client.close(), 5)


@contextlib.contextmanager
def sync_client(service: Any, address: str, **options: Any) -> Iterator[octo_core.Client]:
    options.setdefault("appkey", CLIENT_APPKEY)
    options.setdefault("timeout", 2.0)
    client = octo_core.Client(service, hosts=[address], **options)
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def short_tmpdir() -> Iterator[str]:
    """A short temporary directory (unix socket paths must stay under ~107 bytes)."""
    path = tempfile.mkdtemp(prefix="octo-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A port that is bound but not listening: connecting to it is refused.

    Holding the socket keeps anyone else from taking the port; the caller closes
    it (``sock.close()`` on the yielded pair) just before binding a server there.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOCALHOST, 0))
        yield sock
    finally:
        sock.close()


# --- building and reading raw frames ----------------------------------------------

def echo_reply(frame: Frame, text: str) -> bytes:
    """The reply to an echo call ``frame`` (unified or framed), answering ``text``."""
    name, _, seqid, _ = decode_body(frame, Echo)
    body = codec.encode_message(name, 2, seqid, Echo.echo_result(success=text))
    if frame.head is None:
        return protocol.encode_framed(body)
    return protocol.encode_unified(protocol.response_header(frame.head.sequence_id), body)


def unified_request(method: str, args: Any, seq: int, *, service: str = "Echo",
                    flags: int = protocol.DEFAULT_FLAGS, timeout_ms: int = 2000,
                    call_type: int = protocol.CallType.REPLY) -> bytes:
    header = protocol.request_header(service, seq, timeout_ms, call_type=call_type,
                                     trace=protocol.TraceInfo(clientAppkey=CLIENT_APPKEY))
    body = codec.encode_message(method, TMessageType.CALL, seq, args)
    return protocol.encode_unified(header, body, flags)


def framed_request(method: str, args: Any, seqid: int,
                   msg_type: int = TMessageType.CALL) -> bytes:
    return protocol.encode_framed(codec.encode_message(method, msg_type, seqid, args))


def decode_body(frame: Frame, service: Any) -> Tuple[str, int, int, Any]:
    """``(name, msg_type, seqid, obj)`` of a reply frame's thrift message."""
    return codec.decode_message(bytes(frame.body), service)


class RawConnection:
    """A plain asyncio stream to the server for hand-made bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_frame_size: int = protocol.DEFAULT_MAX_FRAME_SIZE) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(max_frame_size)
        self._frames: List[Frame] = []

    @classmethod
    async def open(cls, address: str) -> "RawConnection":
        if address.startswith("unix://"):
            opening = asyncio.open_unix_connection(address[len("unix://"):])
        else:
            host, _, port = address.rpartition(":")
            opening = asyncio.open_connection(host, int(port))
        reader, writer = await asyncio.wait_for(opening, 5)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), 5)

    async def read_frames(self, count: int = 1, timeout: float = 5.0) -> List[Frame]:
        """Exactly ``count`` frames (fails on timeout or if the server closes first)."""
        async def fill() -> None:
            while len(self._frames) < count:
                data = await self.reader.read(65536)
                if not data:
                    raise AssertionError(f"server closed the connection after "
                                         f"{len(self._frames)} of {count} frames")
                self._frames.extend(self.decoder.feed(data))
        await asyncio.wait_for(fill(), timeout)
        out, self._frames = self._frames[:count], self._frames[count:]
        return out

    async def read_frame(self, timeout: float = 5.0) -> Frame:
        return (await self.read_frames(1, timeout))[0]

    async def read_raw(self, timeout: float = 5.0) -> bytes:
        """Whatever bytes arrive next (b"" at end of stream)."""
        return await asyncio.wait_for(self.reader.read(65536), timeout)

    async def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True once the server has closed (EOF or reset); fails if it stays open."""
        async def drain() -> None:
            while True:
                try:
                    data = await self.reader.read(65536)
                except (ConnectionResetError, BrokenPipeError):
                    return
                if not data:
                    return
        try:
            await asyncio.wait_for(drain(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError("the server kept the connection open") from None
        return True

    def close(self) -> None:
        self.writer.close()

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


@contextlib.asynccontextmanager
async def fake_server(handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]
                      ) -> AsyncIterator[str]:
    """A hand-written server on a free port (``handle(reader, writer)`` per connection);
    yields its address. Its connections close with it: a writer left open warns
    ("loop is closed") when it is collected after its loop closed, in whatever
    later test happens to collect it."""
    writers: List[asyncio.StreamWriter] = []

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            await handle(reader, writer)
        except asyncio.CancelledError:   # the test's loop closing under it: 3.11's
            pass   # start_server logs a cancelled handler as an error (3.12 does not)

    listener = await asyncio.start_server(tracked, LOCALHOST, 0)
    try:
        yield f"{LOCALHOST}:{listener.sockets[0].getsockname()[1]}"
    finally:
        listener.close()
        for writer in writers:
            writer.close()


async def frames_read(reader: asyncio.StreamReader) -> AsyncIterator[Frame]:
    """A ``fake_server`` handler's view of its connection: the frames the client
    sends, as they arrive, until it closes."""
    decoder = FrameDecoder()
    while data := await reader.read(65536):
        for frame in decoder.feed(data):
            yield frame


async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A ``fake_server`` handler that reads everything and answers nothing."""
    while await reader.read(65536):
        pass


@contextlib.asynccontextmanager
async def raw_connection(address: str) -> AsyncIterator[RawConnection]:
    conn = await RawConnection.open(address)
    try:
        yield conn
    finally:
        await conn.aclose()


# --- plain thriftpy2 peers ---------------------------------------------------------

@contextlib.contextmanager
def thriftpy2_server(service: Any, handler: Any, *,
                     trans_factory: Any = None, proto_factory: Any = None,
                     processor: Any = None) -> Iterator[Tuple[str, int]]:
    """A plain thriftpy2 threaded server (framed transport, binary protocol) on a free port.

    ``processor`` (a ``TMultiplexedProcessor``, say) replaces the one made from
    ``service`` and ``handler``. Listening happens here, before the serving
    thread starts, so the port is known and connectable when this yields; the
    server is always closed.
    """
    server = thriftpy2.rpc.make_server(
        service, handler, host=LOCALHOST, port=1,   # port replaced below: 0 means "free"
        trans_factory=trans_factory or TFramedTransportFactory(),
        proto_factory=proto_factory or TBinaryProtocolFactory(),
        client_timeout=5000)
    if processor is not None:
        server.processor = processor
    server.daemon = True          # connection threads must not keep the test process alive
    server.trans.port = 0
    server.trans.listen()
    port = server.trans.sock.getsockname()[1]
    server.trans.listen = lambda: None   # serve() would listen again on a new socket
    thread = threading.Thread(target=_serve_quietly, args=(server,), daemon=True,
                              name="thriftpy2-server")
    thread.start()
    try:
        yield LOCALHOST, port
    finally:
        server.close()
        server.trans.close()     # unblocks accept()
        thread.join(5)


def _serve_quietly(server: Any) -> None:
    try:
        server.serve()
    except Exception:   # accept() on the closed socket after close(): the normal way out
        pass


@contextlib.contextmanager
def thriftpy2_client(service: Any, host: str, port: int, *,
                     trans_factory: Any = None, proto_factory: Any = None) -> Iterator[Any]:
    """A plain thriftpy2 client (framed, binary), closed afterwards."""
    client = thriftpy2.rpc.make_client(
        service, host=host, port=port, timeout=5000,
        trans_factory=trans_factory or TFramedTransportFactory(),
        proto_factory=proto_factory or TBinaryProtocolFactory())
    try:
        yield client
    finally:
        client.close()


# --- thrift binary by hand (for the legacy MTthrift header) -----------------------

def t_field(ttype: int, fid: int) -> bytes:
    return struct.pack("!bh", ttype, fid)


def t_string(fid: int, text: str) -> bytes:
    data = text.encode()
    return t_field(11, fid) + struct.pack("!i", len(data)) + data


def t_bool(fid: int, value: bool) -> bytes:
    return t_field(2, fid) + struct.pack("!b", 1 if value else 0)


def t_map_ss(fid: int, mapping: dict) -> bytes:
    out = [t_field(13, fid), struct.pack("!bbi", 11, 11, len(mapping))]
    for key, value in mapping.items():
        for text in (key, value):
            data = text.encode()
            out.append(struct.pack("!i", len(data)) + data)
    return b"".join(out)


def t_message_begin(name: str, msg_type: int, seqid: int) -> bytes:
    data = name.encode()
    return struct.pack("!Ii", 0x80010000 | msg_type, len(data)) + data + struct.pack("!i", seqid)


STOP = b"\x00"
