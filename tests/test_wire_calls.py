"""Calls over the wire: both protocols, every call mode, errors, flags, timeouts, load.

Each test starts its own Server on 127.0.0.1 port 0 (or a unix socket) and stops
it on the way out; async tests run on a fresh uvloop bounded by a timeout.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import os
import queue
import random
import re
import socket
import sys
import traceback
from typing import Any, List, Optional

import pytest
from thriftpy2.thrift import TApplicationException, TMessageType

import octo_core
from octo_core import protocol
from octo_core.codec import Limits
from octo_core.errors import (ApplicationError, CallTimeout, DecodeError, EncodeError, OctoError,
                              ProtocolError, RpcError, ServiceError, Status, TransportError)
from octo_core.protocol import MessageType, NodeStatus
from octo_core.registry.memory import MemoryRegistry

from wire_helpers import (CLIENT_APPKEY, EVERYTHING, MONITORED, SERVER_APPKEY, Calc, CalcHandler,
                          Echo, EchoError, EchoHandler, EverythingStubs, StoreHandler, async_client, deaf, decode_body, echo_services,
                          fake_server, have_snappy, raw_connection,
                          run, serving, serving_in_thread, short_tmpdir, sync_client,
                          unified_request, wait_until, watchdog)  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("watchdog")

PROTOCOLS = ["octo", "thrift"]
SNAPPY = have_snappy()


def client_conns(client):
    """The live connections of an AsyncClient (private state, read in this one place)."""
    client = getattr(client, "_async", client)
    return [c for ep in client._endpoints.values() for c in ep._conns if c is not None]


@pytest.fixture
def wire_warnings(caplog):
    """Warnings octo_core logs (closing a connection for bad bytes, heartbeat loss...)."""
    caplog.set_level(logging.WARNING, logger="octo_core")
    return lambda: [r for r in caplog.records
                    if r.name.startswith("octo_core") and r.levelno >= logging.WARNING]


# --- IDL method names the clients use themselves ---------------------------------------

CLASH = octo_core.load_idl(os.path.join(os.path.dirname(os.path.abspath(__file__)), "idl",
                                        "clash.thrift"), module_name="octo_clash_thrift").Clash


class ClashHandler:
    def close(self, why):
        return f"closing: {why}"

    def call(self, x):
        return 2 * x

    def future(self):
        return "the future"

    def callback(self):
        return "called back"

    def timeout(self):
        return "time's up"

    def echo(self, text):
        return text


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_idl_methods_named_like_the_async_clients_own(proto):
    async def main():
        async with serving([(CLASH, ClashHandler(), None)]) as server:
            client = octo_core.AsyncClient(CLASH, appkey="c", hosts=[server.address],
                                           protocol=proto)
            assert client.close.__func__ is octo_core.AsyncClient.close   # not shadowed
            assert client.call.__func__ is octo_core.AsyncClient.call
            assert await client.call("close", "bye") == "closing: bye"
            assert await client.call("call", 21) == 42
            # one set of reserved names for both clients: `future` is Client's, still kept off
            assert not hasattr(client, "future") and client.timeout == 1.0
            assert await client.call("future") == "the future"
            assert await client.call("timeout") == "time's up"
            assert await client.echo("plain") == "plain"
            await client.close()                     # the client's close: calls now fail
            with pytest.raises(TransportError):
                await client.echo("after close")
    run(main())


def test_idl_methods_named_like_the_sync_clients_own():
    with serving_in_thread([(CLASH, ClashHandler(), None)]) as server:
        client = octo_core.Client(CLASH, appkey="c", hosts=[server.address])
        try:
            assert client.call("close", "bye") == "closing: bye"
            assert client.call("call", 4, timeout=2.0) == 8
            assert client.call("future") == "the future"
            assert client.timeout == 1.0   # the client's own, as on AsyncClient
            assert client.call("timeout") == "time's up"
            assert not hasattr(client.future, "timeout")
            assert client.future.call("timeout").result(5) == "time's up"
            assert client.future.call("close", "later").result(5) == "closing: later"
            assert client.future.call("call", 5).result(5) == 10
            assert client.future.echo("as future").result(5) == "as future"
            outcomes: "queue.Queue" = queue.Queue()
            client.callback.call("callback", callback=outcomes.put)
            assert outcomes.get(timeout=5) == "called back"
            assert client.echo("plain") == "plain"
            with pytest.raises(AttributeError):
                client.call("no_such_method")
        finally:
            client.close()                           # the client's close, not the IDL's
        with pytest.raises(TransportError):
            client.echo("after close")


def test_the_sync_client_shows_the_async_clients_public_attributes_read_only():
    with serving_in_thread(echo_services()) as server:
        with octo_core.Client(Echo, appkey="c", hosts=[server.address], timeout=2.5,
                              remote_appkey=SERVER_APPKEY) as client:
            assert client.echo("counted") == "counted"
            own = client._async
            for name in octo_core.client.RESERVED_NAMES - {"call", "close", "future",
                                                           "callback", "timeout_of"}:
                assert getattr(client, name) is getattr(own, name), name
                with pytest.raises(AttributeError):
                    setattr(client, name, None)
            assert (client.timeout, client.appkey, client.remote_appkey) == (
                2.5, "c", SERVER_APPKEY)
            assert client.service is Echo and client.unified
            assert client.metrics.stats()["Echo.echo"]["calls"] == 1


# --- handlers that are not plain `async def` methods ------------------------------------

def plain_decorator(fn):
    """A tracing-style decorator that is itself a plain function: it hands back fn's coroutine."""
    def wrapper(*args):
        return fn(*args)
    return wrapper


class AsyncCallable:
    def __init__(self, reply):
        self.reply = reply

    async def __call__(self):
        await asyncio.sleep(0)
        return self.reply


class OddHandler(EchoHandler):
    """``echo`` behind a plain decorator, ``whoami`` an object with an async ``__call__``,
    ``fail`` a partial of a coroutine function."""

    def __init__(self):
        super().__init__()
        self.whoami = AsyncCallable("callable")
        self.fail = functools.partial(self._fail, "partial")

    @plain_decorator
    async def echo(self, text):
        await asyncio.sleep(0)
        return f"decorated: {text}"

    async def _fail(self, prefix, kind):
        if kind == "declared":
            raise EchoError(message=prefix, code=1)
        return f"{prefix}: {kind}"


def test_handlers_that_return_coroutines_without_being_async_functions():
    async def main():
        async with serving(echo_services(OddHandler())) as server, \
                async_client(Echo, server.address) as client:
            assert await client.echo("hi") == "decorated: hi"
            assert await client.whoami() == "callable"
            assert await client.fail("fine") == "partial: fine"
            with pytest.raises(EchoError, match="partial"):
                await client.fail("declared")
    run(main())


# --- call modes ----------------------------------------------------------------------

@pytest.mark.parametrize("proto", PROTOCOLS)
def test_async_client_every_call_shape(proto, wire_warnings):
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler)) as server, \
                async_client(Echo, server.address, protocol=proto) as client:
            assert await client.echo("hi") == "hi"
            assert await client.echo("") == ""
            assert await client.echo("ünïcödé ✓ 中文") == "ünïcödé ✓ 中文"
            big = "x" * (2 << 20)
            assert await client.echo(big) == big
            assert await client.call("echo", "by name") == "by name"
            assert await client.echo(text="keyword") == "keyword"
            assert await client.ping() is None
            assert handler.pings == 1
            assert await client.slow("coroutine", 5) == "coroutine"
            assert await client.nap("thread", 5) == "thread"
            assert await client.fail("fine") == "fine"
            # oneway: returns once written; the handler still gets it
            assert await client.notify("one-way") is None
            await wait_until(lambda: handler.notes.qsize() == 1, what="the oneway call")
            assert handler.notes.get_nowait() == "one-way"
            # the connection is still good after a oneway call (a reply to it, if
            # any, is dropped)
            assert await client.echo("after oneway") == "after oneway"
            assert len(client_conns(client)) == 1

    run(main())
    assert wire_warnings() == []


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_async_client_declared_and_undeclared_exceptions(proto, wire_warnings):
    async def main():
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address, protocol=proto) as client:
            with pytest.raises(EchoError) as declared:
                await client.fail("declared")
            assert declared.value.message == "refused on purpose"
            assert declared.value.code == 42

            with pytest.raises(ApplicationError) as undeclared:
                await client.fail("undeclared")
            err = undeclared.value
            assert err.status == Status.APPLICATION_EXCEPTION == 1
            assert "boom" in str(err)
            assert err.method == "fail"
            assert err.node == server.address
            assert err.type == TApplicationException.INTERNAL_ERROR

            with pytest.raises(ApplicationError) as app:
                await client.fail("app")
            # a handler's TApplicationException goes back as it is (thriftpy2, Apache)
            assert app.value.type == TApplicationException.INVALID_MESSAGE_TYPE
            assert str(app.value).startswith("app says no")

            # an exception whose __str__ fails is answered all the same
            with pytest.raises(ApplicationError) as unprintable:
                await client.fail("unprintable")
            assert unprintable.value.type == TApplicationException.INTERNAL_ERROR
            assert "Unprintable (its message cannot be formatted)" in str(unprintable.value)
            # errors do not spoil the connection, nor leave calls counted in flight
            assert await client.echo("still fine") == "still fine"
            assert server.stats()["Echo.fail"]["in_flight"] == 0

    run(main())
    # the undeclared ones are bugs in the handler: the server logs them with their
    # tracebacks; declared exceptions and TApplicationException are answers
    (logged, unformattable) = wire_warnings()
    # the line names who called, and the trace, for the operator who reads it (native
    # thrift sends neither appkey nor trace)
    who = r" \(call from 127\.0\.0\.1:\d+" + (
        "" if proto == "thrift" else r", appkey 'com\.example\.wire\.client', trace '[0-9a-f]{16}'") + r"\)"
    assert logged.levelname == "ERROR"
    assert re.fullmatch("Echo.fail raised ValueError: boom" + who, logged.getMessage())
    assert "fail" in [frame.name for frame in traceback.extract_tb(logged.exc_info[2])]
    assert re.fullmatch(r"Echo.fail raised Unprintable \(its message cannot be formatted\)" + who,
                        unformattable.getMessage())


def test_a_handler_failing_every_call_is_logged_once_per_period_per_exception_type(caplog):
    """A caller can make a handler raise at will: the first of each service,
    method and exception type is logged with its traceback, the rest summed up
    in one record a period (no traceback), however many calls fail."""
    now = [0.0]

    async def main():
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address) as client:
            server._dispatcher._faults.clock = lambda: now[0]   # (its period passes when the test says)

            async def fail(kind, times):
                for _ in range(times):
                    with pytest.raises(ApplicationError, match="Echo.fail|boom|Unprintable"):
                        await client.fail(kind)

            await fail("undeclared", 50)
            await fail("unprintable", 3)         # another exception type: its own first record
            now[0] += server._dispatcher._faults.every
            await fail("undeclared", 2)          # the period is over: a summary, then held back
            now[0] += server._dispatcher._faults.every
            await fail("unprintable", 1)         # its two held back, told at last
            assert server.stats()["Echo.fail"]["errors"] == {Status.APPLICATION_EXCEPTION: 56}

    with caplog.at_level(logging.ERROR, logger="octo_core.server"):
        run(main())
    # (who called: see test_async_client_declared_and_undeclared_exceptions)
    logged = [(re.sub(r" \(call from [^)]*\)", "", r.getMessage()), r.exc_info is not None)
              for r in caplog.records if r.name == "octo_core.server"]
    assert logged == [
        ("Echo.fail raised ValueError: boom", True),
        ("Echo.fail raised Unprintable (its message cannot be formatted)", True),
        ("Echo.fail raised ValueError: boom (and 49 more since the last such message)", False),
        ("Echo.fail raised Unprintable (its message cannot be formatted) "
         "(and 2 more since the last such message)", False),
    ]


def test_a_handler_fault_names_its_caller_without_letting_it_forge_or_fill_the_log(caplog):
    """The appkey and trace id in a fault's line are the peer's: shown as reprs (a
    line break stays inside the line) and cut short (a 1000-character id)."""
    async def main():
        async with serving(echo_services()) as server, raw_connection(server.address) as raw:
            header = protocol.request_header("Echo", 1, 2000, trace=protocol.TraceInfo(
                clientAppkey="evil\nERROR forged line", traceId="t" * 1000, spanId="s"))
            body = octo_core.codec.encode_message("fail", TMessageType.CALL, 1,
                                                  Echo.fail_args(kind="undeclared"))
            await raw.send(protocol.encode_unified(header, body))
            assert (await raw.read_frame()).head.status == Status.APPLICATION_EXCEPTION

    with caplog.at_level(logging.ERROR, logger="octo_core.server"):
        run(main())
    (line,) = [r.getMessage() for r in caplog.records if r.name == "octo_core.server"]
    assert "\n" not in line and len(line) < 300, line
    assert "appkey 'evil\\nERROR forged line'" in line
    assert f"trace '{'t' * 64}'..." in line


def test_a_handler_fault_over_a_unix_socket_names_no_address(caplog):
    """A unix socket's peer has no address (the connection's name for it is the
    server's own path): the fault's line says it came over a unix socket."""
    async def main():
        with short_tmpdir() as tmp:
            async with serving(echo_services(), host=f"unix://{tmp}/s.sock") as server, \
                    async_client(Echo, server.address) as client:
                with pytest.raises(ApplicationError):
                    await client.fail("undeclared")

    with caplog.at_level(logging.ERROR, logger="octo_core.server"):
        run(main())
    (line,) = [r.getMessage() for r in caplog.records if r.name == "octo_core.server"]
    assert "(call over a unix socket, appkey 'com.example.wire.client', trace '" in line
    assert "s.sock" not in line


class _PartialResults(EverythingStubs):
    """Answers structs whose required fields are unset (a bug in the handler)."""

    async def echo(self, payload):
        return EVERYTHING.Everything(requiredness=EVERYTHING.Requiredness(req_struct=None))


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_unset_required_fields_fail_on_the_side_that_left_them_unset(proto, wire_warnings):
    """Our readers refuse a struct without its required fields (as Java, C++ and
    Go do), so our writers do not send one: the handler's bug is its server's
    error (logged, INTERNAL_ERROR to the caller), the caller's is its own
    ``EncodeError`` before anything is sent."""
    service = EVERYTHING.EverythingService

    async def main():
        async with serving([(service, _PartialResults(), None)]) as server, \
                async_client(service, server.address, protocol=proto) as client:
            with pytest.raises(ApplicationError, match="Requiredness.req is unset") as bad:
                await client.echo(EVERYTHING.Everything())
            assert bad.value.type == TApplicationException.INTERNAL_ERROR
            with pytest.raises(EncodeError, match="walk_args.root is unset"):
                await client.walk(root=None)
            (conn,) = client_conns(client)
            assert conn.in_flight == 0 and not conn.closed

    run(main())
    (logged,) = wire_warnings()
    assert "EverythingService.echo: its result cannot be sent" in logged.getMessage()


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_sync_client_every_mode(proto):
    handler = EchoHandler()
    with serving_in_thread(echo_services(handler)) as server, \
            sync_client(Echo, server.address, protocol=proto) as client:
        # sync
        assert client.echo("sync") == "sync"
        assert client.ping() is None
        assert client.slow("loop", 1) == "loop"
        with pytest.raises(EchoError) as declared:
            client.fail("declared")
        assert declared.value.code == 42
        with pytest.raises(ApplicationError) as undeclared:
            client.fail("undeclared")
        assert undeclared.value.method == "fail" and undeclared.value.node == server.address
        # oneway
        assert client.notify("sync-oneway") is None
        assert handler.notes.get(timeout=5) == "sync-oneway"

        # future
        future = client.future.echo("future")
        assert isinstance(future, concurrent.futures.Future)
        assert future.result(timeout=5) == "future"
        assert client.future.ping().result(timeout=5) is None
        assert isinstance(client.future.fail("declared").exception(timeout=5), EchoError)
        assert isinstance(client.future.fail("undeclared").exception(timeout=5), ApplicationError)
        assert client.future.notify("future-oneway").result(timeout=5) is None
        assert handler.notes.get(timeout=5) == "future-oneway"

        # callback
        got: "queue.Queue" = queue.Queue()
        client.callback.echo("callback", callback=got.put)
        assert got.get(timeout=5) == "callback"
        client.callback.ping(callback=got.put)
        assert got.get(timeout=5) is None
        client.callback.fail("declared", callback=got.put)
        assert isinstance(got.get(timeout=5), EchoError)
        client.callback.fail("undeclared", callback=got.put)
        assert isinstance(got.get(timeout=5), ApplicationError)
        client.callback.notify("callback-oneway", callback=got.put)
        assert got.get(timeout=5) is None
        assert handler.notes.get(timeout=5) == "callback-oneway"


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_sync_client_is_thread_safe(proto):
    with serving_in_thread(echo_services()) as server, \
            sync_client(Echo, server.address, protocol=proto, timeout=5) as client:
        def work(i):
            if i % 3 == 0:
                return client.future.echo(f"t{i}").result(timeout=10)
            if i % 3 == 1:
                return client.slow(f"t{i}", random.randint(0, 5))
            return client.echo(f"t{i}")

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(work, range(300), timeout=30))
        assert results == [f"t{i}" for i in range(300)]


# --- service resolution --------------------------------------------------------------

def test_unknown_service_is_status_8():
    async def main():
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address, service_name="com.example.Missing") as client:
            with pytest.raises(ServiceError) as info:
                await client.echo("x")
            assert info.value.status == Status.SERVICE_EXCEPTION == 8
            assert info.value.method == "echo" and info.value.node == server.address
            assert "com.example.Missing" in str(info.value)
            with pytest.raises(ServiceError):   # the connection stays usable
                await client.ping()

    run(main())


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_unknown_method(proto):
    async def main():
        async with serving(echo_services()) as server, \
                async_client(Calc, server.address, protocol=proto, service_name="Echo") as client:
            # Calc.add is not a method of Echo
            with pytest.raises(ApplicationError) as info:
                await client.add(1, 2)
            assert info.value.type == TApplicationException.UNKNOWN_METHOD
            assert info.value.method == "add"
            # whoami exists in both IDLs: the server answers it as Echo
            assert await client.whoami() == "Echo"
            # counted, under a name that is not the wire's (native thrift names no service)
            counted = "Echo.(unknown)" if proto == "octo" else "(unknown).(unknown)"
            assert server.stats()[counted]["errors"] == {Status.APPLICATION_EXCEPTION: 1}

    run(main())


def test_a_native_oneway_call_to_a_missing_method_is_counted_and_logged(caplog, monkeypatch):
    """Its caller reads no answer, so the server's log and metrics are its only trace."""
    monkeypatch.setattr(octo_core.reply, "_DROPPED",
                        octo_core.reply.Throttle(10.0, octo_core.reply.log))

    async def main():
        async with serving([(Calc, CalcHandler(), None)]) as server, \
                async_client(Echo, server.address, protocol="thrift") as client:
            with caplog.at_level(logging.WARNING, logger="octo_core.server"):
                await client.notify("into the void")
                await client.notify("again")
                assert await client.whoami() == "Calc"   # answered after both were read
            errors = server.stats()["(unknown).(unknown)"]["errors"]
            assert errors == {Status.APPLICATION_EXCEPTION: 2}
    run(main())
    dropped = [r.getMessage() for r in caplog.records if "dropped unanswered" in r.getMessage()]
    assert len(dropped) == 1 and "'notify' is not hosted here" in dropped[0]   # then throttled


def test_a_reply_without_its_result_is_missing_result():
    """A non-void method answered without ``success``: thriftpy2's MISSING_RESULT,
    the node's own answer."""
    class Nothing(EchoHandler):
        def echo(self, text):
            return None

    async def main():
        async with serving([(Echo, Nothing(), None)]) as server:
            for proto in PROTOCOLS:
                async with async_client(Echo, server.address, protocol=proto) as client:
                    with pytest.raises(ApplicationError, match="MISSING_RESULT") as info:
                        await client.echo("x")
                    assert info.value.type == TApplicationException.MISSING_RESULT
                    assert info.value.from_peer

    run(main())


def test_service_name_override():
    async def main():
        async with serving(echo_services(name="com.example.EchoService")) as server:
            async with async_client(Echo, server.address,
                                    service_name="com.example.EchoService") as named:
                assert await named.echo("named") == "named"
            async with async_client(Echo, server.address) as default:
                # "Echo" is not hosted under that name, and is told the one it has
                with pytest.raises(ServiceError,
                                   match="service_name='com.example.EchoService'"):
                    await default.echo("x")
            async with async_client(Echo, server.address, protocol="thrift") as native:
                assert await native.echo("by method") == "by method"
            # every service class's last base is object: no service of that name is
            # told to use one of the hosted services
            async with async_client(Echo, server.address, service_name="object") as other:
                with pytest.raises(ServiceError) as info:
                    await other.echo("x")
                assert "its methods are" not in str(info.value)

    run(main())


def test_add_service_refuses_duplicates_and_incomplete_handlers():
    server = octo_core.Server(SERVER_APPKEY)
    server.add_service(Echo, EchoHandler())
    with pytest.raises(ValueError):
        server.add_service(Echo, EchoHandler())
    with pytest.raises(TypeError):
        server.add_service(Calc, object(), name="Other")
    server.add_service(Echo, EchoHandler(), name="EchoAgain")   # same IDL under another name


@pytest.mark.parametrize("option", ["timeout", "connect_timeout"])
@pytest.mark.parametrize("value", [None, 0, -1.0, "1", True, math.nan, math.inf])
def test_client_refuses_a_timeout_that_is_not_a_positive_number(option, value):
    with pytest.raises(ValueError,
                       match=f"{option} must be a finite number of seconds \\(above 0\\)"):
        octo_core.AsyncClient(Echo, appkey="c", hosts=["127.0.0.1:1"], **{option: value})


@pytest.mark.parametrize("value", [2.0, "2", True, None])
def test_client_refuses_a_pool_size_that_is_not_a_whole_number(value):
    """pool_size=2.0 (read from a config file, say) was taken, and then every
    call failed with "can't multiply sequence by non-int of type 'float'"."""
    with pytest.raises(TypeError, match="pool_size is a whole number of connections"):
        octo_core.AsyncClient(Echo, appkey="c", hosts=["127.0.0.1:1"], pool_size=value)


@pytest.mark.filterwarnings("ignore:timeout=1e\\+12 is")   # (read as milliseconds: told so)
def test_a_by_name_timeout_is_checked_as_the_clients_is_before_anything_is_sent():
    handler = EchoHandler()
    with serving_in_thread([(Echo, handler, None)]) as server, \
            sync_client(Echo, server.address, timeout=1e12) as client:
        assert client.echo("a huge timeout") == "a huge timeout"   # waits, no overflow
        assert client.call("echo", "the largest", timeout=sys.float_info.max) == "the largest"
        refused = "timeout must be a finite number of seconds \\(above 0\\)"
        for value in (0, -1, math.nan, math.inf, "2", True):
            with pytest.raises(ValueError, match=refused):
                client.call("notify", "refused", timeout=value)
            with pytest.raises(ValueError, match=refused):
                client.future.call("notify", "refused", timeout=value)
        client.call("notify", "sent", timeout=1.0)
        assert handler.notes.get(timeout=5) == "sent"   # the refused ones never left


@pytest.mark.parametrize("options", [
    dict(business_threads=0), dict(business_threads=2.5), dict(business_queue=-1),
    dict(pause_reading_at=1), dict(pause_reading_bytes=0), dict(max_connections=0),
    dict(max_in_flight=0), dict(max_in_flight_per_connection=-1), dict(max_in_flight=True),
    dict(max_partial_bytes=0), dict(max_frame_size=8)], ids=repr)
def test_server_refuses_impossible_options_when_made(options):
    """Each refused by name (a max_in_flight of 0 refused every call; a business_threads
    of 2.5 failed only in start())."""
    (name,) = options
    with pytest.raises(ValueError, match=name):
        octo_core.Server(SERVER_APPKEY, **options)
    if "max_frame_size" in options:
        with pytest.raises(ValueError):
            octo_core.AsyncClient(Echo, appkey="c", hosts=["127.0.0.1:1"], **options)


def test_many_services_on_one_port():
    async def main():
        services = [(Echo, EchoHandler(), None), (Calc, CalcHandler(), None),
                    (Echo, EchoHandler(), "com.example.EchoCopy")]
        async with serving(services) as server:
            async with async_client(Echo, server.address) as echo, \
                    async_client(Calc, server.address) as calc, \
                    async_client(Echo, server.address, service_name="com.example.EchoCopy") as copy:
                results = await asyncio.gather(
                    echo.echo("e"), calc.add(2, 3), copy.echo("c"),
                    echo.whoami(), calc.whoami(), copy.whoami())
                assert results == ["e", 5, "c", "Echo", "Calc", "Echo"]
            # native thrift has no service name: dispatch by method name
            async with async_client(Calc, server.address, protocol="thrift") as native_calc:
                assert await native_calc.add(20, 22) == 42
                with pytest.raises(ApplicationError) as info:    # whoami is on several services
                    await native_calc.whoami()
                assert info.value.type == TApplicationException.UNKNOWN_METHOD
                assert "ambiguous" in str(info.value)
            async with async_client(Echo, server.address, protocol="thrift") as native_echo:
                # echo is hosted twice (Echo and its copy): ambiguous as well
                with pytest.raises(ApplicationError) as info:
                    await native_echo.echo("x")
                assert info.value.type == TApplicationException.UNKNOWN_METHOD

    run(main())


def test_a_service_hosted_beside_the_one_it_extends_answers_native_calls_of_both():
    """A server hosts ``Store`` and, for callers of the base service's name (a
    monitoring client of an fb303-style base), ``Monitored`` too, with one
    handler: a native call of the inherited ``status`` runs the same handler
    function whichever service takes it, so it is answered, not refused as
    ambiguous (the child's own native callers lost it). With two handlers
    it is ambiguous still."""
    store, monitored = MONITORED.Store, MONITORED.Monitored

    async def main():
        handler = StoreHandler()
        async with serving([(store, handler, None), (monitored, handler, None)]) as server:
            for proto in PROTOCOLS:
                async with async_client(store, server.address, protocol=proto) as client:
                    assert await client.status() == "ALIVE"
                    assert await client.put("k") == "k"
                async with async_client(monitored, server.address, protocol=proto) as client:
                    assert await client.status() == "ALIVE"
        async with serving([(store, handler, None)]) as server:
            # Store alone: a unified client of the base is told how to reach it
            async with async_client(monitored, server.address) as client:
                with pytest.raises(ServiceError, match="service_name='Store'"):
                    await client.status()
            async with async_client(monitored, server.address, service_name="Store") as client:
                assert await client.status() == "ALIVE"
        async with serving([(store, StoreHandler(), None),
                            (monitored, StoreHandler(), None)]) as server:
            async with async_client(store, server.address, protocol="thrift") as client:
                assert await client.put("k") == "k"
                with pytest.raises(ApplicationError, match="ambiguous") as info:
                    await client.status()
                assert info.value.type == TApplicationException.UNKNOWN_METHOD

    run(main())


# --- addresses: IPv6, unix sockets ---------------------------------------------------

def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_an_ipv6_server_gives_a_bracketed_address_its_clients_reach():
    async def main():
        async with serving(echo_services(), host="::1") as server:
            assert server.address == f"[::1]:{server.port}"
            async with async_client(Echo, server.address) as client:
                assert await client.echo("over v6") == "over v6"

    run(main())


def test_a_unix_socket_path_in_use_is_refused_and_a_stale_one_reused():
    """A second server on a live path fails to start (it would silently take the
    first one's traffic); a socket file nobody listens at is replaced; a server
    removes its socket file on stop only while it is still its own."""
    import socket

    with short_tmpdir() as tmp:
        path = os.path.join(tmp, "echo.sock")

        async def main():
            async with serving(echo_services(), host=f"unix://{path}") as first:
                second = octo_core.Server("com.example.second", host=f"unix://{path}")
                second.add_service(Echo, EchoHandler())
                with pytest.raises(OSError, match="already listening"):
                    await second.start()
                async with async_client(Echo, first.address) as client:
                    assert await client.echo("still first") == "still first"
            assert not os.path.exists(path)
            stale = socket.socket(socket.AF_UNIX)
            stale.bind(path)            # a socket file, nobody listening
            stale.close()
            async with serving(echo_services(), host=f"unix://{path}") as server, \
                    async_client(Echo, server.address) as client:
                assert await client.echo("over the stale path") == "over the stale path"

        run(main())


def test_a_start_that_fails_leaves_nothing_behind_and_a_second_start_is_refused():
    """A port in use (or a live socket path) fails the start; the business
    threads, and the loop thread of ``with Server``, must not stay behind, or a
    supervisor that retries the start leaks a thread pool each time."""
    import threading

    async def main():
        async with serving(echo_services()) as taken:
            host, port = taken.address.rsplit(":", 1)
            await asyncio.to_thread(lambda: None)     # the loop's executor thread, counted once
            before = set(threading.enumerate())   # (threads of earlier tests may still end)
            for _ in range(3):
                server = octo_core.Server("com.example.late", host=host, port=int(port))
                server.add_service(Echo, EchoHandler())
                with pytest.raises(OSError):
                    await server.start()
                with pytest.raises(OSError):
                    await asyncio.to_thread(server.__enter__)
            assert set(threading.enumerate()) - before == set()   # none started and left
            with pytest.raises(RuntimeError, match="already started"):
                await taken.start()
            async with async_client(Echo, taken.address) as client:
                assert await client.echo("still serving") == "still serving"

    run(main())


def test_a_start_whose_business_threads_cannot_start_leaves_no_socket(monkeypatch):
    """Out of threads ("can't start new thread") at the third business thread: the
    start fails, no port listens, the two threads started end, and once threads
    can be made again the same server starts."""
    import threading
    real_start, starts = threading.Thread.start, []

    def third_fails(thread: threading.Thread) -> None:
        if thread.name.startswith("octo-biz-"):
            starts.append(thread)
            if len(starts) == 3:
                raise RuntimeError("can't start new thread")
        real_start(thread)

    async def main():
        server = octo_core.Server("com.example.threadless", port=0, business_threads=4)
        server.add_service(Echo, EchoHandler())
        monkeypatch.setattr(threading.Thread, "start", third_fails)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            await server.start()
        monkeypatch.undo()
        assert server.port == 0      # nothing was bound
        for thread in starts[:2]:
            thread.join(5)
            assert not thread.is_alive()
        await server.start()
        try:
            async with async_client(Echo, server.address) as client:
                assert await client.echo("started") == "started"
        finally:
            await server.stop()

    run(main())


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_unix_socket_server(proto):
    handler = EchoHandler()
    with short_tmpdir() as tmp:
        path = os.path.join(tmp, "echo.sock")

        async def main():
            async with serving(echo_services(handler), host=f"unix://{path}") as server:
                assert server.address == f"unix://{path}"
                assert os.path.exists(path)
                async with async_client(Echo, server.address, protocol=proto) as client:
                    assert await client.echo("over uds") == "over uds"
                    with pytest.raises(EchoError):
                        await client.fail("declared")
                    await client.notify("uds")
                    results = await asyncio.gather(*(client.slow(str(i), 1) for i in range(50)))
                    assert results == [str(i) for i in range(50)]
                async with raw_connection(server.address) as raw:
                    await raw.send(protocol.encode_unified(protocol.scanner_heartbeat_request(), b""))
                    assert (await raw.read_frame()).header.heartbeatInfo.status == NodeStatus.ALIVE

        run(main())
        assert handler.notes.get(timeout=5) == "uds"

        with serving_in_thread(echo_services(), host=f"unix://{path}") as server, \
                sync_client(Echo, server.address, protocol=proto) as client:
            assert client.echo("sync uds") == "sync uds"


# --- checksum and compression ------------------------------------------------------

FLAG_CASES = [0x01, 0x81, 0x41, 0xC1, 0x21, 0xA1, 0x61]


@pytest.mark.parametrize("flags", FLAG_CASES + [0x1D, 0x9D], ids=lambda f: f"0x{f:02x}")
def test_reply_mirrors_request_flags(flags):
    """The checksum, compression and serializer bits come back (§1); bits §1 does not
    define (0x1C) are not claimed back."""
    if flags & protocol.FLAG_SNAPPY and not SNAPPY:
        pytest.skip("cramjam is not installed")
    text = "mirror " * 200

    async def main():
        async with serving(echo_services()) as server, raw_connection(server.address) as raw:
            await raw.send(unified_request("echo", Echo.echo_args(text=text), 5, flags=flags))
            frame = await raw.read_frame()
            mirrored = flags & 0xE3
            assert frame.flags == mirrored
            assert frame.header.responseInfo.sequenceId == 5
            assert frame.header.responseInfo.status == 0
            assert decode_body(frame, Echo)[:3] == ("echo", TMessageType.REPLY, 5)
            assert decode_body(frame, Echo)[3].success == text
            # refusals and heartbeats mirror the flags too
            await raw.send(unified_request("echo", Echo.echo_args(text="x"), 6, flags=flags,
                                           service="NoSuchService"))
            refused = await raw.read_frame()
            assert refused.flags == mirrored and refused.header.responseInfo.status == 8
            await raw.send(protocol.encode_unified(protocol.scanner_heartbeat_request(), b"", flags))
            beat = await raw.read_frame()
            assert beat.flags == mirrored and beat.header.heartbeatInfo is not None

    run(main())


@pytest.mark.parametrize("proto_flags", [
    dict(checksum=True), dict(compression="gzip"), dict(checksum=True, compression="gzip"),
    dict(compression="snappy"), dict(checksum=True, compression="snappy"),
], ids=["checksum", "gzip", "checksum+gzip", "snappy", "checksum+snappy"])
def test_checksum_and_compression_calls(proto_flags):
    if proto_flags.get("compression") == "snappy" and not SNAPPY:
        pytest.skip("cramjam is not installed (see test_snappy_client_without_cramjam)")

    async def main():
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address, **proto_flags) as client:
            text = "compress me " * 5000
            assert await client.echo(text) == text
            assert await client.echo("") == ""
            with pytest.raises(EchoError):
                await client.fail("declared")
            with pytest.raises(ServiceError):
                async with async_client(Echo, server.address, service_name="Nope",
                                        **proto_flags) as other:
                    await other.echo("x")
            results = await asyncio.gather(*(client.slow(f"s{i}", 1) for i in range(100)))
            assert results == [f"s{i}" for i in range(100)]

    run(main())


def test_snappy_client_without_cramjam(monkeypatch):
    monkeypatch.setitem(sys.modules, "cramjam", None)   # `import cramjam` fails from here on

    async def main():
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address, compression="snappy") as client:
            with pytest.raises(ProtocolError) as info:
                await client.echo("x")
            assert "cramjam" in str(info.value)

    run(main())


# --- timeouts ----------------------------------------------------------------------

@pytest.mark.parametrize("proto", PROTOCOLS)
def test_timeout_then_the_same_connection_keeps_working(proto, wire_warnings):
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler)) as server, \
                async_client(Echo, server.address, protocol=proto, timeout=5) as client:
            assert await client.echo("warm") == "warm"
            [conn] = client_conns(client)
            with pytest.raises(CallTimeout) as info:
                await client.call("slow", "late", 400, timeout=0.05)
            err = info.value
            assert isinstance(err, TransportError) and err.status == 4
            assert err.method == "slow" and err.node == server.address
            # the next call on the same connection works at once
            assert await client.echo("next") == "next"
            # a call still waiting when the late reply lands gets its own answer
            assert await client.slow("mine", 700) == "mine"
            await wait_until(lambda: handler.slow_finished == 2, what="the late reply")
            assert await client.echo("after the late reply") == "after the late reply"
            assert client_conns(client) == [conn] and not conn.closed

    run(main())
    assert wire_warnings() == []


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_timeout_in_sync_and_future_modes(proto):
    with serving_in_thread(echo_services()) as server, \
            sync_client(Echo, server.address, protocol=proto, timeout=0.05) as client:
        with pytest.raises(CallTimeout):
            client.slow("late", 300)
        assert isinstance(client.future.slow("late", 300).exception(timeout=5), CallTimeout)
        got: "queue.Queue" = queue.Queue()
        client.callback.slow("late", 300, callback=got.put)
        assert isinstance(got.get(timeout=5), CallTimeout)
        assert client.echo("fast") == "fast"


def test_server_skips_queued_work_whose_caller_gave_up():
    handler = EchoHandler()
    naps = []
    original_nap = handler.nap
    handler.nap = lambda text, ms: naps.append(text) or original_nap(text, ms)

    async def main():
        async with serving(echo_services(handler), business_threads=1) as server, \
                async_client(Echo, server.address, timeout=5) as client:
            blocker = asyncio.ensure_future(client.block("hold"))
            await wait_until(lambda: handler.entered.qsize() == 1, what="block() to start")
            with pytest.raises(CallTimeout):
                await client.call("nap", "too late", 0, timeout=0.1)   # queued behind block()
            await asyncio.sleep(0.1)    # the server's copy of the deadline passes as well
            handler.release.set()
            assert await blocker == "hold"
            assert await client.nap("in time", 0) == "in time"
            assert naps == ["in time"], "the server ran a call whose deadline had passed"

    run(main())


# --- concurrency --------------------------------------------------------------------

@pytest.mark.parametrize("proto", PROTOCOLS)
def test_1000_concurrent_calls_out_of_order_on_one_connection(proto):
    handler = EchoHandler()
    rng = random.Random(1234)
    delays = [rng.randint(0, 30) for _ in range(1000)]

    async def main():
        async with serving(echo_services(handler)) as server, \
                async_client(Echo, server.address, protocol=proto, timeout=15) as client:
            finished = []

            async def one(i):
                result = await client.slow(f"call-{i}", delays[i])
                finished.append(i)
                return result

            results = await asyncio.gather(*(one(i) for i in range(1000)))
            assert results == [f"call-{i}" for i in range(1000)]
            assert len(client_conns(client)) == 1
            assert finished != sorted(finished), "replies never came back out of order"
            assert handler.slow_finished == 1000

    run(main())


def test_business_queue_full_is_rpc_error_status_3():
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler), business_threads=1,
                           business_queue=1) as server, \
                async_client(Echo, server.address, timeout=5) as client:
            assert await client.echo("warm") == "warm"
            calls = [asyncio.ensure_future(client.block(f"b{i}")) for i in range(3)]
            done, pending = await asyncio.wait(calls, timeout=5,
                                               return_when=asyncio.FIRST_COMPLETED)
            assert len(done) == 1 and len(pending) == 2
            refused = done.pop().exception()
            assert isinstance(refused, RpcError), refused
            assert refused.status == Status.RPC_EXCEPTION == 3
            assert refused.method == "block"
            await wait_until(lambda: handler.entered.qsize() == 1, what="block() to start")
            # full: another plain call is refused too, coroutine handlers still run
            with pytest.raises(RpcError):
                await client.echo("refused")
            assert await client.slow("coroutines are not queued", 1) == "coroutines are not queued"
            handler.release.set()
            results = await asyncio.gather(*pending)
            assert len(set(results)) == 2 and set(results) <= {"b0", "b1", "b2"}
            assert await client.echo("capacity is back") == "capacity is back"

    run(main())


# --- heartbeats -------------------------------------------------------------------

def test_scanner_and_normal_heartbeats_over_a_raw_socket():
    async def main():
        async with serving(echo_services()) as server, raw_connection(server.address) as raw:
            await raw.send(protocol.encode_unified(protocol.scanner_heartbeat_request(), b""))
            frame = await raw.read_frame()
            header = frame.header
            assert header.messageType == MessageType.SCANNER_HEARTBEAT
            assert header.responseInfo.sequenceId == 1
            assert header.responseInfo.status == 0
            beat = header.heartbeatInfo
            assert beat.status == NodeStatus.ALIVE == 2
            assert beat.appkey == SERVER_APPKEY
            assert isinstance(beat.sendTime, int) and beat.sendTime > 1_500_000_000_000
            assert bytes(frame.body) == b""

            normal = protocol.request_header("", 77, 1000,
                                             message_type=MessageType.NORMAL_HEARTBEAT)
            await raw.send(protocol.encode_unified(normal, b""))
            frame = await raw.read_frame()
            assert frame.header.messageType == MessageType.NORMAL_HEARTBEAT
            assert frame.header.responseInfo.sequenceId == 77
            assert frame.header.heartbeatInfo.status == NodeStatus.ALIVE
            assert frame.header.heartbeatInfo.appkey == SERVER_APPKEY

            # heartbeats and calls interleave on one connection
            await raw.send(unified_request("echo", Echo.echo_args(text="between"), 3)
                           + protocol.encode_unified(protocol.scanner_heartbeat_request(), b""))
            first, second = await raw.read_frames(2)
            replies = {f.header.messageType: f for f in (first, second)}
            assert decode_body(replies[MessageType.NORMAL], Echo)[3].success == "between"
            assert replies[MessageType.SCANNER_HEARTBEAT].header.heartbeatInfo.status == 2

    run(main())


def test_heartbeat_reports_stopping_during_graceful_stop():
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler)) as server, raw_connection(server.address) as raw:
            await raw.send(unified_request("slow", Echo.slow_args(text="drain", delay_ms=300), 1))
            await wait_until(lambda: handler.slow_started == 1, what="slow() to start")
            stopping = asyncio.ensure_future(server.stop(grace=5))
            await wait_until(lambda: server.status == NodeStatus.STOPPING)
            await raw.send(protocol.encode_unified(protocol.scanner_heartbeat_request(), b""))
            await raw.send(unified_request("echo", Echo.echo_args(text="too late"), 2))
            frames = await raw.read_frames(4)
            by_seq = {(f.header.messageType, f.header.responseInfo.sequenceId): f for f in frames}
            beat = by_seq[(MessageType.SCANNER_HEARTBEAT, 1)]
            assert beat.header.heartbeatInfo.status == NodeStatus.STOPPING == 3
            notice = by_seq[(MessageType.NORMAL_HEARTBEAT, protocol.CLOSE_NOTICE_SEQUENCE)]
            assert notice.header.heartbeatInfo.status == NodeStatus.STOPPING
            refused = by_seq[(MessageType.NORMAL, 2)]
            assert refused.header.responseInfo.status == Status.RPC_EXCEPTION
            drained = by_seq[(MessageType.NORMAL, 1)]
            assert decode_body(drained, Echo)[3].success == "drain"
            await asyncio.wait_for(stopping, 5)
            assert await raw.closed_by_peer()

    run(main())


def test_heartbeat_reports_stopping_from_the_moment_the_node_unregisters():
    # the unregister delay gives callers time to see the change; a heartbeat is one
    # way they see it, and it must not report ALIVE meanwhile (calls are still served)
    registry = MemoryRegistry("heartbeat-while-unregistering")

    async def main():
        async with serving(echo_services(), registry=registry, unregister_delay=1.0) as server, \
                raw_connection(server.address) as raw:
            assert len(await registry.list(SERVER_APPKEY)) == 1
            stopping = asyncio.ensure_future(server.stop(grace=5))
            await wait_until(lambda: not registry._space.nodes.get(registry._where(SERVER_APPKEY)),
                             what="the node to unregister")
            await raw.send(protocol.encode_unified(protocol.scanner_heartbeat_request(), b""))
            [beat] = await raw.read_frames(1)
            assert beat.header.heartbeatInfo.status == NodeStatus.STOPPING
            await asyncio.wait_for(stopping, 10)

    run(main())


def test_client_heartbeats_keep_an_idle_connection_open(wire_warnings):
    async def main():
        async with serving(echo_services(), idle_timeout=0.6) as server, \
                async_client(Echo, server.address, heartbeat_interval=0.2) as beating, \
                async_client(Echo, server.address) as quiet:
            assert await beating.echo("a") == "a"
            assert await quiet.echo("b") == "b"
            [beating_conn] = client_conns(beating)
            [quiet_conn] = client_conns(quiet)
            # the server drops the quiet connection for idleness...
            await wait_until(lambda: quiet_conn.closed, timeout=10,
                             what="the server to close the idle connection")
            # ...and, a full idle period later, still keeps the heartbeating one
            await asyncio.sleep(0.8)
            assert not beating_conn.closed
            assert await beating.echo("c") == "c"
            assert client_conns(beating) == [beating_conn]
            # the quiet client reconnects on its next call
            assert await quiet.echo("d") == "d"
            assert client_conns(quiet)[0] is not quiet_conn

    run(main())
    assert wire_warnings() == []


def test_heartbeat_interval_with_a_busy_connection_is_harmless():
    async def main():
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address, heartbeat_interval=0.05) as client:
            for i in range(20):
                results = await asyncio.gather(*(client.slow(f"{i}-{j}", 10) for j in range(10)))
                assert results == [f"{i}-{j}" for j in range(10)]

    run(main())



def test_heartbeats_reach_a_connection_that_is_written_to_but_never_answers(caplog):
    # Only what the node sends counts against idleness: counting what is written
    # too, a caller calling more often than the heartbeat interval would keep a
    # dead connection (requests go out, nothing ever comes back: a route that
    # drops packets, a peer gone without a FIN) from ever being checked, and
    # every call would time out on it for good.
    accepted: List[Any] = []

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await deaf(reader, writer)

    async def main():
        never_opens = {"consecutive_failures": 10**9, "min_calls": 10**9}
        async with fake_server(counted) as address, \
                async_client(Echo, address, timeout=0.1, heartbeat_interval=0.2,
                             breaker=never_opens) as client:
            async def call_until_redialled():
                while len(accepted) < 2:   # each call goes out well within an interval
                    with pytest.raises(TransportError):
                        await client.echo("anyone there?")
            await asyncio.wait_for(call_until_redialled(), 10)

    with caplog.at_level(logging.WARNING, logger="octo_core.transport"):
        run(main())
    assert any("heartbeat" in r.getMessage() and "unanswered" in r.getMessage()
               for r in caplog.records)


def test_unified_connections_are_heartbeated_by_default():
    """A node gone without a FIN leaves calls only timing out, and a timeout alone
    keeps the connection (the node may be slow): the default heartbeat is what
    finds it out. Native thrift has no heartbeat; 0 turns it off."""
    def interval(**options) -> Optional[float]:
        client = octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, hosts=["127.0.0.1:9"],
                                       **options)
        return client._endpoint_options["heartbeat_interval"]

    assert interval() == octo_core.client.DEFAULT_HEARTBEAT_INTERVAL == 30.0
    assert interval(protocol="thrift") is None
    assert not interval(heartbeat_interval=0)


# --- handler and caller edge cases -----------------------------------------------------

class _OddHandler(EchoHandler):
    """Handlers that misbehave in ways a server must still answer."""

    def echo(self, text):
        if text == "wrong type":
            return 12345                # the IDL says string
        return text

    async def slow(self, text, delay_ms):
        if text == "cancelled inside":
            # e.g. the handler awaited a future another component cancelled
            raise asyncio.CancelledError()
        return await super().slow(text, delay_ms)


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_handler_returning_a_value_its_idl_forbids(proto):
    async def main():
        async with serving(echo_services(_OddHandler())) as server, \
                async_client(Echo, server.address, protocol=proto) as client:
            with pytest.raises(ApplicationError) as info:
                await client.echo("wrong type")
            assert info.value.type == TApplicationException.INTERNAL_ERROR
            assert await client.echo("fine") == "fine"

    run(main())


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_coroutine_handler_raising_cancelled_error_still_gets_a_reply(proto):
    # A BaseException that is not an Exception still gets its reply: re-raised
    # before one, the caller would hear nothing and wait out its whole timeout.
    async def main():
        async with serving(echo_services(_OddHandler())) as server, \
                async_client(Echo, server.address, protocol=proto, timeout=1.0) as client:
            with pytest.raises(OctoError) as info:
                await client.slow("cancelled inside", 0)
            assert not isinstance(info.value, CallTimeout), \
                "no reply at all: the server dropped the call"
            # the handler's own doing, said as such: the server is not stopping
            assert "CancelledError" in str(info.value) and "stopping" not in str(info.value)
            assert await client.echo("next") == "next"

    run(main())


def test_cancelled_call_forgets_its_sequence_id():
    # A caller that cancels (asyncio.wait_for around the call, task.cancel()) must
    # not leave its entry in the connection's pending table: against a peer that
    # never answers, the table (and Endpoint.in_flight) would grow forever.
    async def main():
        async with fake_server(deaf) as address, async_client(Echo, address, timeout=5) as client:
            await client.notify("connect first")    # oneway: no reply needed
            for i in range(50):
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(client.echo(f"c{i}"), 0.001)
            [conn] = client_conns(client)
            assert conn.in_flight == 0, f"{conn.in_flight} cancelled calls still pending"

    run(main())


def test_oneway_then_immediate_close_still_delivers():
    handler = EchoHandler()
    with serving_in_thread(echo_services(handler)) as server:
        for proto in PROTOCOLS:
            with sync_client(Echo, server.address, protocol=proto) as client:
                client.notify(f"last words {proto}")
            assert handler.notes.get(timeout=5) == f"last words {proto}"


def test_pool_size_spreads_calls_over_connections():
    async def main():
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address, pool_size=3) as client:
            results = await asyncio.gather(*(client.slow(f"p{i}", 2) for i in range(60)))
            assert results == [f"p{i}" for i in range(60)]
            conns = client_conns(client)
            assert len(conns) == 3 and len({id(c) for c in conns}) == 3

    run(main())


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_decode_limits_on_both_sides(proto):
    """``limits=`` bounds what the server decodes (a request over them is refused
    with status 5, the connection stays) and what the client decodes (a reply over
    them fails its own call only)."""
    async def main():
        async with serving(echo_services(), limits=Limits(max_string_length=8)) as server:
            async with async_client(Echo, server.address, protocol=proto) as client:
                with pytest.raises((ProtocolError, ApplicationError)) as info:
                    await client.echo("nine char")
                assert "limit" in str(info.value)
                assert await client.echo("8 chars!") == "8 chars!"
        async with serving(echo_services()) as server:
            async with async_client(Echo, server.address, protocol=proto,
                                    limits=Limits(max_string_length=8)) as client:
                with pytest.raises(DecodeError, match="bad reply"):
                    await client.echo("nine char")
                assert await client.echo("8 chars!") == "8 chars!"

    run(main())


class _Walker(_PartialResults):
    async def walk(self, root, depth):
        return [root]


def _node_chain(length: int) -> Any:
    node = EVERYTHING.Node(value=0)
    for value in range(1, length):
        node = EVERYTHING.Node(value=value, sibling=node)
    return node


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_what_limits_let_a_side_read_it_may_also_write(proto):
    """``Limits.max_depth`` is the nesting a server or client reads, and so the
    nesting it writes: with a deeper limit on both sides a value deeper than the
    default 64 goes there and back; with the default, the client refuses to send
    it (EncodeError, as thriftpy2 and fastbinary refuse past 64)."""
    service, deep = EVERYTHING.EverythingService, _node_chain(100)
    roomy = Limits(max_depth=300)

    async def main():
        async with serving([(service, _Walker(), None)], limits=roomy) as server:
            async with async_client(service, server.address, protocol=proto,
                                    limits=roomy) as client:
                (back,) = await client.walk(deep)
                assert back == deep
            async with async_client(service, server.address, protocol=proto) as client:
                with pytest.raises(EncodeError, match="nesting deeper than 64"):
                    await client.walk(deep)

    run(main())


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_frames_over_max_frame_size(proto):
    async def main():
        async with serving(echo_services(), max_frame_size=64 * 1024) as server:
            async with async_client(Echo, server.address, protocol=proto) as client:
                # the server refuses an oversized request by closing that connection
                with pytest.raises(TransportError) as info:
                    await client.echo("x" * 100_000)
                assert not isinstance(info.value, CallTimeout)
                assert await client.echo("small again") == "small again"   # reconnects
            # a request over the client's own limit is refused before it is sent
            # (tests/test_wire_faults.py has replies over the limits)
            async with async_client(Echo, server.address, protocol=proto,
                                    max_frame_size=1024) as client:
                assert await client.echo("fits") == "fits"
                with pytest.raises(EncodeError):
                    await client.echo("y" * 2000)
                assert await client.echo("fits again") == "fits again"

    run(main())


def test_deadline_passed_reply_is_status_4():
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler), business_threads=1) as server, \
                raw_connection(server.address) as raw:
            await raw.send(unified_request("block", Echo.block_args(text="hold"), 1,
                                           timeout_ms=5000))
            await wait_until(lambda: handler.entered.qsize() == 1, what="block() to start")
            await raw.send(unified_request("nap", Echo.nap_args(text="late", delay_ms=0), 2,
                                           timeout_ms=20))
            await asyncio.sleep(0.1)        # let the queued call's 20 ms deadline pass
            handler.release.set()
            frames = await raw.read_frames(2)
            by_seq = {f.header.responseInfo.sequenceId: f for f in frames}
            assert decode_body(by_seq[1], Echo)[3].success == "hold"
            assert by_seq[2].header.responseInfo.status == Status.TRANSPORT_EXCEPTION == 4
            assert handler.naps_started == 0
            # refused unrun: counted by status, not as a latency (it waited 100 ms queued)
            row = server.stats()["Echo.nap"]
            assert row["calls"] == row["refused"] == 1 and row["in_flight"] == 0
            assert row["errors"] == {Status.TRANSPORT_EXCEPTION: 1} and row["p50"] is None

    run(main())


class StuckEcho(EchoHandler):
    """``slow`` never answers by itself; it says whether it was cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.started: "queue.Queue[str]" = queue.Queue()
        self.cancelled: "queue.Queue[str]" = queue.Queue()

    async def slow(self, text: str, delay_ms: int) -> str:
        self.started.put(text)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.put(text)
            raise
        return text


class StuckBehindPlain(StuckEcho):
    """``slow`` a plain function that returns the coroutine (an async handler behind
    a plain decorator): run on a business thread, its coroutine on the loop."""

    def slow(self, text: str, delay_ms: int) -> Any:   # type: ignore[override]
        return StuckEcho.slow(self, text, delay_ms)


@pytest.mark.parametrize("cancel, handler_cls", [(True, StuckEcho), (False, StuckEcho),
                                                 (True, StuckBehindPlain)])
def test_a_coroutine_handler_past_its_callers_deadline_is_cancelled_when_asked(cancel,
                                                                               handler_cls,
                                                                               caplog):
    handler = handler_cls()

    async def main():
        async with serving(echo_services(handler), cancel_past_deadline=cancel) as server, \
                async_client(Echo, server.address) as client:
            # the client's own timeout, or (first, at times) the server's refusal, status 4,
            # that the deadline passed: a CallTimeout either way
            with pytest.raises(CallTimeout):
                await client.call("slow", "stuck", 0, timeout=0.2)
            await wait_until(lambda: handler.started.qsize() == 1, what="slow() to start")
            if cancel:
                await wait_until(lambda: handler.cancelled.qsize() == 1, what="the cancel")
                await wait_until(lambda: server.stats()["Echo.slow"]["in_flight"] == 0,
                                 what="the call's end")
                row = server.stats()["Echo.slow"]   # it ran: a latency, status 4
                assert row["calls"] == 1 and row["refused"] == 0
                assert row["errors"] == {Status.TRANSPORT_EXCEPTION: 1}
            else:   # it runs on; the stop cancels it past its grace
                assert handler.cancelled.qsize() == 0
                assert server.stats()["Echo.slow"]["in_flight"] == 1
            assert await client.echo("next") == "next"   # the connection serves on
            # a deadline's cancel is no fault of the handler's: nothing logged
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert handler.cancelled.qsize() == 1

    run(main())


@pytest.mark.filterwarnings("ignore:timeout=1e\\+07 is")   # (read as milliseconds: told so)
def test_a_deadline_longer_than_requestinfo_holds_is_sent_as_the_longest():
    """RequestInfo.timeout is an i32 of milliseconds (about 24.8 days)."""
    async def main():
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address, timeout=10.0 ** 7) as client:
            assert await client.echo("patient") == "patient"
            assert await client.call("echo", "later", timeout=10.0 ** 9) == "later"

    run(main())
