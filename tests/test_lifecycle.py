"""Lifecycles of servers and clients: re-entered, stopped from elsewhere, interrupted,
or dropped without being closed."""
from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import warnings
import weakref

import pytest

import octo_core
from octo_core import blocking
from octo_core.errors import ApplicationError, TransportError
from octo_core.registry.memory import MemoryRegistry
from octo_core.server import NodeStatus
from octo_core.transport.loop import LoopThread

from wire_helpers import (CLIENT_APPKEY, LOCALHOST, SERVER_APPKEY, Calc, Echo,  # noqa: F401
                          EchoHandler, async_client, run, sync_client, wait_until,
                          wait_until_sync, watchdog)

pytestmark = pytest.mark.usefixtures("watchdog")


def echo_server(handler: EchoHandler = None, **options) -> octo_core.Server:
    server = octo_core.Server(SERVER_APPKEY, host=LOCALHOST, **options)
    server.add_service(Echo, handler or EchoHandler())
    return server


def test_with_server_re_entered_fails_and_the_outer_with_still_stops_it():
    server = echo_server()
    with server:
        with pytest.raises(RuntimeError, match="already started"):
            with server:
                pass
        with sync_client(Echo, server.address) as client:
            assert client.echo("still served") == "still served"
    assert server.status == NodeStatus.STOPPED
    with pytest.raises(TransportError, match="cannot connect"):
        with sync_client(Echo, server.address) as client:
            client.echo("after the outer with")
    assert not [t for t in threading.enumerate() if t.name.startswith("octo-server")]


class _Relay(EchoHandler):
    """``echo`` asks another server, through an ``AsyncClient`` it holds."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.client = octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, hosts=[backend])

    async def echo(self, text: str) -> str:
        return await self.client.echo(text)


def test_on_stop_callbacks_close_what_the_service_holds_after_its_last_answer(caplog):
    """``with server`` (as ``serve_forever``) gives a program no place to close the
    clients its handlers call through: ``on_stop`` runs them, on the server's
    loop, in order, a failing one logged without keeping the others from running."""
    with echo_server() as backend:
        relay = _Relay(backend.address)
        server = echo_server(relay)
        ran = []

        def fails() -> None:
            raise RuntimeError("cleanup bug")

        @server.on_stop
        async def first() -> None:
            ran.append(("first", relay.client._closed))
        server.on_stop(fails)
        server.on_stop(relay.client.close)
        server.on_stop(lambda: ran.append(("last", relay.client._closed)))
        with server:
            with sync_client(Echo, server.address) as client:
                assert client.echo("through") == "through"
            assert ran == []
    assert ran == [("first", False), ("last", True)]
    assert [r.getMessage() for r in caplog.records if "on_stop" in r.getMessage()] == [
        f"{SERVER_APPKEY}: on_stop callback {fails!r} failed"]
    with pytest.raises(TypeError, match="on_stop takes a function"):
        server.on_stop(None)


def test_a_start_that_fails_runs_no_on_stop_callback():
    """A start that fails (its metrics port taken) stops what it began, but leaves
    what the service holds: a start tried again serves with it. (The clients its
    handlers call through were closed, and every call of the started server failed.)"""
    ran = []

    async def main() -> None:
        with socket.socket() as taken:
            taken.bind((LOCALHOST, 0))
            taken.listen()
            server = echo_server(metrics_port=taken.getsockname()[1])
            server.on_stop(lambda: ran.append("stopped"))
            with pytest.raises(OSError):
                await server.start()
        assert ran == []
        server.metrics_port = 0
        await server.start()
        await server.stop()
        assert ran == ["stopped"]

    run(main())


def test_stop_awaited_on_another_loop_stops_the_server_on_its_own():
    handler = EchoHandler()
    server = echo_server(handler)
    with server, sync_client(Echo, server.address, timeout=10.0) as client:
        in_flight = client.future.slow("answered", 300)
        wait_until_sync(lambda: handler.slow_started == 1)
        asyncio.run(asyncio.wait_for(server.stop(grace=5.0), 10))
        assert server.status == NodeStatus.STOPPED
        assert in_flight.result(10) == "answered"   # the grace let it finish
        with pytest.raises(TransportError):
            client.echo("after the stop")


class Interrupted(BaseException):
    """Stands for KeyboardInterrupt (a signal handler's exception in the waiting thread)."""


def test_a_blocking_call_interrupted_by_a_signal_is_let_go():
    handler = EchoHandler()

    def interrupt(signum, frame):
        raise Interrupted()

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with echo_server(handler) as server, \
                sync_client(Echo, server.address, timeout=30.0) as client:
            main = threading.get_ident()

            def send_signal_once_the_call_runs() -> None:
                wait_until_sync(lambda: not handler.entered.empty())
                signal.pthread_kill(main, signal.SIGUSR1)

            threading.Thread(target=send_signal_once_the_call_runs, daemon=True).start()
            with pytest.raises(Interrupted):
                client.block("never waited for")
            endpoints = list(client._async._endpoints.values())
            # no one waits for it: the client forgets it now, not at its 30 s deadline
            wait_until_sync(lambda: sum(e.in_flight for e in endpoints) == 0)
            assert client.echo("the next call") == "the next call"
            handler.release.set()
    finally:
        signal.signal(signal.SIGUSR1, previous)


class _SlowToRegister(MemoryRegistry):
    """A registry whose registration waits (within a short op_timeout): a start
    that is under way, serving already, for as long."""

    op_timeout = 0.3

    async def register(self, node):   # type: ignore[override]
        await asyncio.Event().wait()


@pytest.mark.parametrize("when", ["as the start ends", "while the start runs"])
def test_a_ctrl_c_during_with_servers_start_stops_what_it_started(monkeypatch, when):
    """``with server:`` interrupted (Ctrl-C) while its start runs, or once it has
    ended but before the ``with`` saw it: the interruption goes on, and the
    server is stopped, as leaving the ``with`` would (the loop thread was
    stopped alone: the server went on listening, never stopped, and a process
    whose business threads still ran could not exit)."""
    real_submit = LoopThread.submit
    interrupted = []

    def submit(thread, coro):   # the first: the start's, interrupted as it is waited for
        future = real_submit(thread, coro)
        if interrupted:
            return future

        class Interrupting:
            def __getattr__(self, name):
                return getattr(future, name)

            def result(self, timeout=None):
                interrupted.append(True)
                if when == "as the start ends":
                    future.result(timeout)
                raise Interrupted()
        return Interrupting()

    monkeypatch.setattr(LoopThread, "submit", submit)
    registry = _SlowToRegister("interrupted-start")
    server = octo_core.Server(SERVER_APPKEY, registry=registry)
    server.add_service(Echo, EchoHandler())
    with pytest.raises(Interrupted):
        with server:
            raise AssertionError("the with's body ran")
    assert interrupted and server.status == NodeStatus.STOPPED
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOCALHOST, server.port), timeout=5).close()


@pytest.mark.parametrize("discovery", ["hosts", "registry"])
def test_an_async_client_collected_unclosed_closes_what_it_holds_and_warns(discovery):
    registry = MemoryRegistry(f"collected-{discovery}")

    async def main() -> None:
        server = echo_server(registry=registry if discovery == "registry" else None)
        await server.start()
        try:
            found = (dict(registry=registry, remote_appkey=SERVER_APPKEY)
                     if discovery == "registry" else dict(hosts=[server.address]))
            client = octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, **found)
            assert await client.echo("x") == "x"
            assert len(server._connections) == 1
            with pytest.warns(ResourceWarning, match="AsyncClient was collected without close"):
                del client
                gc.collect()
            await wait_until(lambda: not server._connections)
            # and its directory no longer watches the registry
            await wait_until(lambda: not registry._space.watches.get(registry._where(SERVER_APPKEY)))
        finally:
            await server.stop()

    run(main())


def test_a_closed_connection_is_not_kept_alive_by_the_servers_sweep():
    # The sweep's loop variable held the last connection it looked at while it slept:
    # for good once the last peer had gone (its buffers with it).
    async def main() -> None:
        server = echo_server(read_timeout=0.2)   # (a sweep every 0.1s)
        await server.start()
        try:
            async with async_client(Echo, server.address) as client:
                assert await client.echo("x") == "x"
                gone = weakref.ref(next(iter(server._connections)))
                await asyncio.sleep(0.3)   # (swept while connected: the sweep has seen it)
            await wait_until(lambda: not server._connections)

            def collected() -> bool:
                gc.collect()
                return gone() is None
            await wait_until(collected, what="the closed connection collected")
        finally:
            await server.stop()

    run(main())


def test_a_server_collected_while_started_ends_its_business_threads_and_warns():
    appkey = "com.example.forgotten"

    async def start_and_forget() -> None:
        server = octo_core.Server(appkey, host=LOCALHOST)
        server.add_service(Echo, EchoHandler())
        await server.start()    # and no stop(): the loop ends under it

    asyncio.run(start_and_forget())
    with warnings.catch_warnings(record=True) as seen:
        # (its listening socket, collected with it, warns too: pytest.warns would
        # pass that on, an error under -W error::ResourceWarning)
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    assert any("collected while started" in str(w.message) for w in seen), seen
    wait_until_sync(lambda: not [t for t in threading.enumerate()
                                 if t.name.startswith(f"octo-biz-{appkey}")])


#: The main thread returns while a non-daemon thread serves with a file registry.
#: The interpreter's shutdown has then begun: every concurrent.futures executor
#: (asyncio's default one too) refuses work, yet the server goes on serving.
_SERVES_PAST_MAIN = """
import concurrent.futures.thread, os, sys, threading, time
sys.path.insert(0, {tests!r})
import octo_core
from wire_helpers import CLIENT_APPKEY, SERVER_APPKEY, Echo, EchoHandler
registry = "file://{root}?ttl=1"
ready = threading.Event()

def serve():
    server = octo_core.Server(SERVER_APPKEY, host="127.0.0.1", registry=registry)
    server.add_service(Echo, EchoHandler())
    # (made now: from 3.12 no thread starts once the interpreter shuts down)
    with server, octo_core.Client(Echo, appkey=CLIENT_APPKEY, registry=registry,
                                  remote_appkey=SERVER_APPKEY, timeout=2.0) as client:
        ready.set()
        while not concurrent.futures.thread._shutdown:   # the main thread has returned
            time.sleep(0.01)
        time.sleep(2.5)   # more than the ttl: the node must have been renewed meanwhile
        print(client.echo("discovered"))
    providers = [name for _, _, names in os.walk({root!r}) for name in names
                 if name.endswith(".json")]
    print("left in the registry:", len(providers))

threading.Thread(target=serve).start()
ready.wait(10)
"""


def test_a_server_outliving_the_main_thread_keeps_its_registry_entry_and_removes_it(tmp_path):
    script = _SERVES_PAST_MAIN.format(tests=os.path.dirname(os.path.abspath(__file__)),
                                      root=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["discovered", "left in the registry: 0"], done.stderr[-2000:]


def test_a_stop_told_to_stop_at_once_waits_out_neither_unregister_delay_nor_grace():
    """What a second signal does to a stop (``_stop_now``), without signals: the
    node, unregistered, is not kept serving for the rest of ``unregister_delay``,
    nor are its calls given the rest of the grace; its caller is told."""
    registry = MemoryRegistry("stop-at-once")

    async def main() -> None:
        server = echo_server(registry=registry, unregister_delay=3600)
        await server.start()
        async with async_client(Echo, server.address, timeout=600.0) as client:
            call = asyncio.ensure_future(client.slow("never done", 3_600_000))
            await wait_until(lambda: server._in_flight == 1, what="the call to run")
            stopping = asyncio.ensure_future(server.stop(grace=3600))
            await wait_until(lambda: server._leaving, what="the stop to begin")
            assert await registry.list(SERVER_APPKEY) == []   # gone, yet serving on
            assert not stopping.done() and not call.done()
            server._stop_now()
            await asyncio.wait_for(stopping, 30)   # (a hang guard only)
            assert server.status == NodeStatus.STOPPED
            with pytest.raises(TransportError, match="the server stopped while it ran"):
                await call

    run(main())


class _CancelsItself(EchoHandler):
    """``slow`` raises CancelledError of its own accord once ``go`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()

    async def slow(self, text: str, delay_ms: int) -> str:
        self.slow_started += 1
        await self.go.wait()
        raise asyncio.CancelledError("the handler's own")


def test_a_handlers_own_cancelled_error_during_a_stop_is_its_fault_not_the_stops(caplog):
    """Only a call the stop itself cancelled (past its grace) is answered "the server
    stopped while it ran": one whose handler raises CancelledError of its own
    accord while the stop waits is a fault of the handler's, logged and answered
    as one."""
    handler = _CancelsItself()

    async def main() -> None:
        server = echo_server(handler)
        await server.start()
        async with async_client(Echo, server.address, timeout=30.0) as client:
            call = asyncio.ensure_future(client.slow("x", 0))
            await wait_until(lambda: server._in_flight == 1, what="the call to run")
            stopping = asyncio.ensure_future(server.stop(grace=30))
            await wait_until(lambda: server._leaving, what="the stop to begin")
            handler.go.set()
            with pytest.raises(ApplicationError) as info:
                await call
            await asyncio.wait_for(stopping, 30)   # (a hang guard only)
        assert "stopped while it ran" not in str(info.value)   # (the stop's own words)
        assert "stopping" not in str(info.value) and "CancelledError" in str(info.value)
        assert any("CancelledError" in r.getMessage() for r in caplog.records
                   if r.levelno >= logging.ERROR)

    run(main())


class _Blocks(EchoHandler):
    """``block`` runs until the test releases it, however long (no timeout of its own)."""

    def block(self, text: str) -> str:
        self.entered.put(text)
        self.release.wait()
        return text


def test_a_stop_told_to_stop_at_once_does_not_linger_for_a_plain_function(monkeypatch):
    """A plain function still running cannot be stopped; a hurried stop does not wait
    for its connection (``CLOSE_LINGER``, here longer than any test) but closes it:
    the stop ends with the function still running, and its caller sees the
    connection close."""
    monkeypatch.setattr(octo_core.server, "CLOSE_LINGER", 3600.0)
    handler = _Blocks()

    async def main() -> None:
        server = echo_server(handler)
        await server.start()
        try:
            async with async_client(Echo, server.address, timeout=600.0) as client:
                call = asyncio.ensure_future(client.block("never answered"))
                await asyncio.get_running_loop().run_in_executor(None, handler.entered.get, True, 10)
                stopping = asyncio.ensure_future(server.stop(grace=3600))
                await wait_until(lambda: server._leaving, what="the stop to begin")
                server._stop_now()
                await asyncio.wait_for(stopping, 30)   # (a hang guard only)
                assert server.status == NodeStatus.STOPPED and not handler.release.is_set()
                with pytest.raises(TransportError):
                    await call
        finally:
            handler.release.set()

    run(main())


#: A server that runs a coroutine handler and a plain one that never end, until
#: signalled: with ``serve_forever`` (a grace no test waits out) or ``with server``.
_SERVES_UNTIL_SIGNALLED = """
import asyncio, logging, signal, sys, threading, time
sys.path.insert(0, {tests!r})
import octo_core
from wire_helpers import SERVER_APPKEY, Echo, EchoHandler

# Ctrl-C as a terminal gives it, whatever the test run's own: a run started in the
# background of a shell ignores SIGINT, and so would this process, inheriting it.
signal.signal(signal.SIGINT, signal.default_int_handler)

logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")

class Stuck(EchoHandler):
    async def slow(self, text, delay_ms):
        print("running", text, flush=True)
        await asyncio.Event().wait()

    def nap(self, text, delay_ms):
        print("running", text, flush=True)
        threading.Event().wait()

server = octo_core.Server(SERVER_APPKEY, host="127.0.0.1")
server.add_service(Echo, Stuck())
if {how!r} == "serve_forever":
    server.serve_forever(grace=3600)
    print("serve_forever returned", flush=True)
else:
    try:
        with server:
            while True:
                time.sleep(1)
    finally:
        print("left the with", server.status.name, flush=True)
"""


def _refuses_connections(port: int) -> bool:
    """Is nothing listening on ``port``? (Refused, or reset: taken into the backlog
    as the listener closed.)"""
    try:
        socket.create_connection((LOCALHOST, port), timeout=5).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    return False


@pytest.mark.parametrize("how, exit_status", [("serve_forever", 0), ("with", -signal.SIGINT)])
def test_a_second_ctrl_c_stops_the_server_at_once_and_its_callers_are_answered(how, exit_status):
    """The first SIGINT starts the graceful stop (no new connections; the calls in
    flight go on); a second cuts its grace short: the coroutine handler is
    cancelled and its caller told so, the plain function's caller sees its
    connection close, the stop runs to its end, and so does the process
    (``serve_forever`` returns; out of ``with``, the KeyboardInterrupt goes on)."""
    script = _SERVES_UNTIL_SIGNALLED.format(tests=os.path.dirname(os.path.abspath(__file__)),
                                            how=how)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout],
                              daemon=True)
    reader.start()
    output: list = []

    def line_with(text: str) -> str:
        while not any(text in line for line in output):
            output.append(lines.get(timeout=30))   # (a hang guard only)
        return next(line for line in output if text in line)

    async def main() -> None:
        address = line_with(" serving Echo on ").split()[-1]
        async with async_client(Echo, address, timeout=600.0) as client:
            coroutine = asyncio.ensure_future(client.slow("a coroutine", 0))
            plain = asyncio.ensure_future(client.nap("a plain function", 0))
            await asyncio.to_thread(line_with, "running a coroutine")
            await asyncio.to_thread(line_with, "running a plain function")
            process.send_signal(signal.SIGINT)
            port = int(address.rsplit(":", 1)[1])
            await wait_until(lambda: _refuses_connections(port), timeout=30,
                             what="the stop to begin")   # (a hang guard only: another process)
            assert not coroutine.done() and not plain.done()   # the grace goes on
            process.send_signal(signal.SIGINT)
            await asyncio.wait_for(asyncio.wait([coroutine, plain]), 30)   # (a hang guard only)
            with pytest.raises(TransportError, match="the server stopped while it ran"):
                coroutine.result()
            with pytest.raises(TransportError):
                plain.result()

    try:
        run(main())
        assert process.wait(timeout=30) == exit_status, "".join(output)
        # (the line names what it cuts short)
        assert "(Echo.nap: 1, Echo.slow: 1)" in line_with(
            "calls still running when told to stop at once")
        line_with("serve_forever returned" if how == "serve_forever" else "left the with STOPPED")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        reader.join(30)          # (at the pipe's end, now the process is gone)
        process.stdout.close()   # (else a ResourceWarning, in whichever later test collects it)


#: serve_forever with a coroutine handler that leaves a task running (as an
#: AsyncClient's heartbeats are): the server is called, then told to stop.
_LEAVES_A_TASK = """
import asyncio, os, signal, sys, threading
sys.path.insert(0, {tests!r})
import octo_core
from wire_helpers import SERVER_APPKEY, Echo, EchoHandler

async def forever():
    try:
        await asyncio.Event().wait()
    finally:
        print("background task ended", flush=True)

KEPT = set()   # (asyncio keeps tasks weakly: one nothing holds may be collected pending)

class Leaves(EchoHandler):
    async def slow(self, text, delay_ms):
        KEPT.add(asyncio.get_running_loop().create_task(forever()))
        return text

server = octo_core.Server(SERVER_APPKEY, host="127.0.0.1")
server.add_service(Echo, Leaves())

def call_then_stop():
    while server.status.name != "ALIVE":
        threading.Event().wait(0.01)
    with octo_core.Client(Echo, appkey="caller", hosts=[server.address]) as client:
        client.slow("left", 0)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=call_then_stop).start()
server.serve_forever(grace=5)
print("serve_forever returned", flush=True)
"""


def test_serve_forever_cancels_the_tasks_left_on_its_loop_before_closing_it():
    """As asyncio.run does: not left pending for the loop's close to destroy
    ("Task was destroyed but it is pending!")."""
    script = _LEAVES_A_TASK.format(tests=os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines() == ["background task ended", "serve_forever returned"]
    assert "destroyed but it is pending" not in run.stderr


def test_blocking_work_runs_in_place_when_no_thread_may_start(monkeypatch):
    def no_threads(*args):   # what Python 3.12+ says once the interpreter shuts down
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(blocking, "BusinessPool", no_threads)
    assert run(blocking.Pool("octo-test-no-threads", 1).run(lambda x: x * 2, 21)) == 42


def test_name_lookups_that_hang_do_not_hold_up_registry_files():
    stuck = threading.Event()

    async def main() -> None:
        hung = [asyncio.ensure_future(blocking.LOOKUPS.run(stuck.wait))
                for _ in range(blocking.LOOKUPS.threads + 1)]
        try:
            assert await asyncio.wait_for(blocking.FILES.run(lambda: "renewed"), 10) == "renewed"
        finally:
            stuck.set()
            await asyncio.gather(*hung)

    run(main())


def test_a_handler_class_given_for_an_instance_is_refused_when_added():
    """Taken, each call failed in the handler (its method called unbound, the
    request's first argument as self) with an ApplicationError at the caller."""
    server = octo_core.Server(SERVER_APPKEY)
    with pytest.raises(TypeError, match=r"handler EchoHandler is a class.*EchoHandler\(\)"):
        server.add_service(Echo, EchoHandler)

    class Static:   # a class whose methods need no instance serves as it is
        @staticmethod
        def add(a, b):
            return a + b

        @classmethod
        def whoami(cls):
            return cls.__name__

    server.add_service(Calc, Static)


def test_a_handler_method_that_cannot_take_the_idls_arguments_is_refused_when_added():
    """Taken, each call of it failed in the handler (a TypeError) with an
    ApplicationError at the caller; thriftpy2 says so only at the call too."""
    class TooFew(EchoHandler):
        def echo(self):   # type: ignore[override]
            return "?"

    class TooMany(EchoHandler):
        async def echo(self, text, loud):   # type: ignore[override]
            return text

    server = octo_core.Server(SERVER_APPKEY)
    with pytest.raises(TypeError, match=re.escape(
            "handler for Echo cannot take the IDL's arguments: echo() for echo(text)")):
        server.add_service(Echo, TooFew())
    with pytest.raises(TypeError, match=re.escape("echo(text, loud) for echo(text)")):
        server.add_service(Echo, TooMany())

    class Flexible(EchoHandler):   # what a call by position can reach is taken
        def echo(self, *args, loud=False):   # type: ignore[override]
            return args[0]

    class Static:
        add = staticmethod(lambda a, b, c=0: a + b + c)
        whoami = staticmethod(os.getcwd)   # a builtin, its signature read as well

    def with_request_id(fn):   # a decorator that supplies an argument of its own
        @functools.wraps(fn)
        def wrapper(self, *args):
            return fn(self, "req-1", *args)
        return wrapper

    class Decorated(EchoHandler):
        @with_request_id
        def echo(self, request_id, text):   # type: ignore[override]
            return text

    server.add_service(Echo, Flexible())
    server.add_service(Echo, Decorated(), name="Decorated")
    server.add_service(Calc, Static)


#: A handler module annotated with what only a type checker imports. Before 3.14 such
#: a module needs ``from __future__ import annotations`` (annotations stay strings);
#: 3.14 defers them without it (PEP 649), and evaluates them when they are read.
_HINTED_HANDLERS = ("from __future__ import annotations\n" if sys.version_info < (3, 14)
                    else "") + """
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from checker_only import Text

class Hinted(EchoHandler):
    async def echo(self, text: Text) -> Text:
        return text

class TooFew(EchoHandler):
    def echo(self) -> Text:
        return "?"
"""


def test_a_handler_annotated_with_names_only_a_type_checker_imports_is_added():
    """On 3.14, reading the handler's signature (the argument check) evaluated its
    annotations: add_service failed with NameError, not the handler's fault."""
    handlers: dict = {"EchoHandler": EchoHandler}
    exec(compile(_HINTED_HANDLERS, "hinted_handlers", "exec", dont_inherit=True), handlers)
    server = octo_core.Server(SERVER_APPKEY)
    server.add_service(Echo, handlers["Hinted"]())
    with pytest.raises(TypeError, match=r"echo\(\) -> 'Text' for echo\(text\)"):
        server.add_service(Echo, handlers["TooFew"](), name="TooFew")


@pytest.mark.parametrize("host, port, error, says", [
    (LOCALHOST, 70000, ValueError, "port 70000 is out of range"),
    (LOCALHOST, -1, ValueError, "port -1 is out of range"),
    (LOCALHOST, "9001", TypeError, "port is an int"),
    ("127.0.0.1:9001", 0, ValueError, r"'127.0.0.1:9001' is not a host name.*port="),
    ("[::1]", 0, ValueError, "without brackets"),
    (None, 0, TypeError, "host is a string"),
], ids=["port past 65535", "negative port", "port a string", "host with its port",
        "bracketed IPv6", "no host"])
def test_a_host_or_port_no_server_can_listen_on_is_refused_when_made(host, port, error, says):
    """Port 70000 was bound as 4464 (modulo 65536), and "ip:port" was looked up as a
    host name at start, failing with the resolver's "Name or service not known"."""
    with pytest.raises(error, match=says):
        octo_core.Server(SERVER_APPKEY, host=host, port=port)
    octo_core.Server(SERVER_APPKEY, host="::1", port=65535)     # IPv6, as it is listened on
    octo_core.Server(SERVER_APPKEY, host="unix:///tmp/octo.sock")


def test_a_host_name_that_does_not_resolve_is_named_in_the_error(monkeypatch):
    def unknown(host, *args):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    server = octo_core.Server(SERVER_APPKEY, host="no-such-host.invalid")
    server.add_service(Echo, EchoHandler())
    with pytest.raises(socket.gaierror, match="cannot resolve 'no-such-host.invalid'"):
        run(server.start())


@pytest.mark.parametrize("options, error, says", [
    (dict(auth={CLIENT_APPKEY: "token"}), TypeError, r"auth is an octo_core.auth.Authenticator"),
    (dict(limits={"max_depth": 8}), TypeError, r"limits is an octo_core.codec.Limits"),
    (dict(quotas={"*": 0}), ValueError,
     r"quotas\['\*'\] must be a finite number of calls per second \(above 0\)"),
    (dict(quotas={CLIENT_APPKEY: -1}), ValueError, "must be a finite number of calls"),
    (dict(quotas={"*": float("nan")}), ValueError, "must be a finite number of calls"),
    (dict(idle_timeout=-1), ValueError,
     r"idle_timeout must be None or 0 \(off\), or a finite number of seconds \(above 0\)"),
    (dict(read_timeout=-1), ValueError, r"read_timeout must be None or 0 \(off\), or a finite"),
    (dict(read_timeout=float("nan")), ValueError, "read_timeout must be None"),
    (dict(idle_timeout="600"), ValueError, "idle_timeout must be None"),
    (dict(node={"weight": "5"}), ValueError, r"node\['weight'\]: weight must be an integer"),
    (dict(node={"idc": 3}), ValueError, r"node\['idc'\]: idc must be a string"),
    (dict(node={"cell": None}), ValueError, r"node\['cell'\]: cell must be a string"),
    (dict(node={"weight": -1}), ValueError, r"node\['weight'\]: weight must be an integer in \[0,"),
    (dict(node={"status": 9}), ValueError, r"node\['status'\]: status must be an integer in \[0, 5\]"),
    (dict(node={"wieght": 5}), ValueError, r"node has no field 'wieght'"),
], ids=["auth a token dict", "limits a dict", "quota 0", "quota negative", "quota NaN",
        "idle_timeout negative", "read_timeout negative", "read_timeout NaN",
        "idle_timeout a string", "node weight a string", "node idc a number", "node cell None",
        "node weight negative", "node status unknown", "node field misspelt"])
def test_server_options_of_the_wrong_kind_are_refused_when_made(options, error, says):
    """A token dict for auth failed every connection as it was made (an
    AttributeError logged by the loop, the call refused with status 7); a dict for
    limits closed every connection unanswered; a quota of 0 or less let one call
    through, then none; a negative idle_timeout or read_timeout ("-1: off") made
    the sweeper sleep a negative time, so the server's loop spun at 100% CPU. A
    node field of the wrong type was registered as given: every reader skipped
    the node as malformed, so the server ran and got no calls (and could not
    unregister it); a misspelt one failed only at start, after binding."""
    with pytest.raises(error, match=says):
        octo_core.Server(SERVER_APPKEY, **options)


def test_a_plain_call_left_running_by_a_closed_loop_holds_no_queue_after_a_restart():
    # its outcome can never come back (the loop it would answer on is closed): the
    # server started again on a new loop must not count it in its business queue
    handler = EchoHandler()
    server = echo_server(handler, business_threads=1, business_queue=0)

    async def leave_one_running() -> None:
        await server.start()
        async with async_client(Echo, server.address, timeout=10) as client:
            left = asyncio.ensure_future(client.block("left running"))
            await wait_until(lambda: handler.entered.qsize() == 1, what="block() to start")
            await server.stop(grace=0)
            with pytest.raises(octo_core.errors.OctoError):
                await left

    async def serve_again() -> str:
        await server.start()
        try:
            async with async_client(Echo, server.address, timeout=5) as client:
                return await client.echo("served")
        finally:
            await server.stop(grace=1)

    run(leave_one_running())
    old_threads = list(server._pool._workers)
    handler.release.set()   # it returns to a closed loop
    wait_until_sync(lambda: not any(thread.is_alive() for thread in old_threads))
    assert run(serve_again()) == "served"
    # nor count it as running for ever (the in-flight gauge of stats() and /metrics)
    assert all(row["in_flight"] == 0 for row in server.stats().values())
