"""Interop with Apache Thrift's Python library (the ``thrift`` package) and the code
its compiler generates from ``tests/idl/echo.thrift`` (and ``stranger_shop.thrift``,
an IDL with includes, typedefs of typedefs, struct defaults and inheritance) -- a
second Thrift implementation beside thriftpy2, both protocol stacks (pure
``TBinaryProtocol`` and the C-accelerated one), framed transport:

* Apache's generated client against our Server (native thrift on the unified port);
* our ``protocol="thrift"`` clients (async, sync, future, callback) against
  Apache's generated processor.

Skipped, with the reason printed, when the Apache compiler is not installed
(``scripts/test.sh`` installs it).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import queue
import socket
import threading
import time
import types
from typing import Any, Iterator, Optional, Tuple

import pytest
from thrift.protocol import TBinaryProtocol, TMultiplexedProtocol, TProtocol
from thrift import TMultiplexedProcessor
from thrift.Thrift import TApplicationException as ApacheApplicationException
from thrift.TSerialization import serialize
from thrift.transport import TSocket, TTransport

import octo_core
from octo_core import codec
from octo_core.errors import ApplicationError, CallTimeout, TransportError

from conftest import apache_generate
from wire_helpers import (ECHO_IDL, HERE, LOCALHOST, Calc, CalcHandler, Echo, EchoError,
                          EchoHandler, async_client, echo_services, run, serving_in_thread,
                          sync_client, watchdog)  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("watchdog")

PROTOCOLS = {
    "binary": TBinaryProtocol.TBinaryProtocolFactory(),
    # fallback=False: fail rather than silently run the pure-Python path.
    "accelerated": TBinaryProtocol.TBinaryProtocolAcceleratedFactory(fallback=False),
}


@pytest.fixture(scope="module")
def apache_echo(tmp_path_factory) -> types.SimpleNamespace:
    """echo.thrift compiled by Apache's ``thrift --gen py``: ``Echo``, ``Calc``, ``ttypes``."""
    echo, calc, ttypes = apache_generate(
        ECHO_IDL, str(tmp_path_factory.mktemp("apache_echo")),
        "octo_echo_apache.Echo", "octo_echo_apache.Calc", "octo_echo_apache.ttypes")
    return types.SimpleNamespace(Echo=echo, Calc=calc, ttypes=ttypes)


STRANGER_IDL = os.path.join(HERE, "idl", "stranger_shop.thrift")
stranger = octo_core.load_idl(STRANGER_IDL)


@pytest.fixture(scope="module")
def apache_stranger(tmp_path_factory) -> types.SimpleNamespace:
    """stranger_shop.thrift and its include compiled by Apache's ``thrift -r --gen py``."""
    shop, ttypes, base = apache_generate(
        STRANGER_IDL, str(tmp_path_factory.mktemp("apache_stranger")),
        "octo_stranger_apache.shop.Shop", "octo_stranger_apache.shop.ttypes",
        "octo_stranger_apache.base.ttypes")
    return types.SimpleNamespace(Shop=shop, ttypes=ttypes, base=base)


@contextlib.contextmanager
def apache_client(service_module: Any, address: str, protocol: str,
                  transport_cls: Any = TTransport.TFramedTransport,
                  multiplexed: Optional[str] = None) -> Iterator[Any]:
    """Apache's generated client for ``service_module`` over a framed (or, with
    ``TBufferedTransport``, unframed) socket, closed afterwards; ``multiplexed``
    names the service through Apache's ``TMultiplexedProtocol``."""
    host, _, port = address.rpartition(":")
    connection = TSocket.TSocket(host, int(port))
    connection.setTimeout(5000)
    transport = transport_cls(connection)
    proto = PROTOCOLS[protocol].getProtocol(transport)
    if multiplexed is not None:
        proto = TMultiplexedProtocol.TMultiplexedProtocol(proto, multiplexed)
    client = service_module.Client(proto)
    transport.open()
    try:
        yield client
    finally:
        transport.close()


@contextlib.contextmanager
def apache_server(processor: Any, protocol: str) -> Iterator[Tuple[str, int]]:
    """Apache's generated ``processor`` served thread-per-connection on a free port.

    The accept loop is ours because Apache's ``TServer`` loops have no way to
    stop; everything else (framing, protocol, dispatch) is Apache's.
    """
    listener = TSocket.TServerSocket(host=LOCALHOST, port=0)
    listener.listen()
    port = listener.handle.getsockname()[1]
    stopping = threading.Event()

    def serve(client: TSocket.TSocket) -> None:
        transport = TTransport.TFramedTransport(client)
        proto = PROTOCOLS[protocol].getProtocol(transport)
        try:
            while not stopping.is_set():
                processor.process(proto, proto)
        except (TTransport.TTransportException, OSError):   # the client went away
            pass
        except TProtocol.TProtocolException:   # unreadable or unroutable: Apache's servers close
            pass
        finally:
            transport.close()

    def accept() -> None:
        while not stopping.is_set():
            try:
                client = listener.accept()
            except (TTransport.TTransportException, OSError):
                return
            if client is not None:
                threading.Thread(target=serve, args=(client,), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True, name="apache-server")
    acceptor.start()
    try:
        yield LOCALHOST, port
    finally:
        stopping.set()
        listener.handle.shutdown(socket.SHUT_RDWR)   # wakes the blocked accept(); close() does not
        listener.close()
        acceptor.join(5)


class ApacheEchoHandler:
    """``Echo`` for Apache's processor: the same behaviour as ``EchoHandler``, with
    Apache's exception classes."""

    def __init__(self, ttypes: Any) -> None:
        self.ttypes = ttypes
        self.notes: "queue.Queue[str]" = queue.Queue()

    def echo(self, text: str) -> str:
        return text

    def fail(self, kind: str) -> str:
        if kind == "declared":
            raise self.ttypes.EchoError(message="refused on purpose", code=42)
        if kind == "undeclared":
            raise ValueError("boom")
        if kind == "app":
            raise ApacheApplicationException(ApacheApplicationException.INVALID_MESSAGE_TYPE,
                                             "app says no")
        return kind

    def ping(self) -> None:
        return None

    def notify(self, text: str) -> None:
        self.notes.put(text)

    def slow(self, text: str, delay_ms: int) -> str:
        time.sleep(delay_ms / 1000.0)
        return text

    def whoami(self) -> str:
        return "apache"


class StrangerShop:
    """``Shop`` of stranger_shop.thrift for either side: ``shop`` and ``base`` are
    thriftpy2's modules (``stranger``, ``stranger.base``) or Apache's ``ttypes``."""

    def __init__(self, shop: Any, base: Any) -> None:
        self.shop, self.base = shop, base
        self.audits: "queue.Queue[Tuple[str, int]]" = queue.Queue()

    def ping(self) -> str:
        return "pong"

    def now(self) -> int:
        return -(2 ** 63)

    def fail_void(self, why: str) -> None:
        if why:
            raise self.base.BaseError(message=why)   # code: its default, -1

    def get(self, id: str) -> Any:
        if id == "missing":
            raise self.shop.NotFound(message="no such order", id=id)
        shop, status = self.shop, self.base.Status
        return shop.Order(id=id, status=status.NEXT, stamps={-1},
                          by_status={status.DELETED: [shop.Price()], status.NEXT: []},
                          ratio=float("-inf"), raw=b"\x00\xff",
                          tree=shop.Tree(name="root", kids=[shop.Tree(name="leaf", kids=[])]))

    def statuses(self) -> dict:
        return {self.base.Status.DELETED: "deleted", self.base.Status.NEXT: "next"}

    def audit(self, what: str, at: int) -> None:
        self.audits.put((what, at))

    def measure(self, x: float) -> float:
        return x


def stranger_calls(client: Any, shop: Any, base: Any, as_bytes: Any) -> None:
    """The calls either side's client makes of a Shop server, checked against what
    ``StrangerShop`` answers; ``as_bytes`` serializes that client's structs."""
    expected = StrangerShop(stranger, stranger.base)
    assert client.ping() == "pong" and client.now() == -(2 ** 63)   # inherited, no arguments
    assert client.fail_void("") is None
    with pytest.raises(base.BaseError) as failed:
        client.fail_void("why")
    assert (failed.value.message, failed.value.code) == ("why", -1)
    assert as_bytes(client.get("o1")) == codec.encode(expected.get("o1"))
    with pytest.raises(shop.NotFound) as missing:
        client.get("missing")
    assert (missing.value.message, missing.value.id) == ("no such order", "missing")
    assert client.statuses() == {-100: "deleted", 51: "next"}
    client.audit("checked", -1)
    assert math.isnan(client.measure(float("nan")))
    assert math.copysign(1.0, client.measure(-0.0)) == -1.0


def test_apache_client_of_a_stranger_idl_against_our_server(apache_stranger):
    """Apache's generated client of an IDL with an include from a subdirectory,
    typedefs of typedefs, struct defaults and a service that extends another:
    its inherited and own methods, values compared as bytes."""
    handler = StrangerShop(stranger, stranger.base)
    with serving_in_thread([(stranger.Shop, handler, None)]) as server, \
            apache_client(apache_stranger.Shop, server.address, "accelerated") as client:
        stranger_calls(client, apache_stranger.ttypes, apache_stranger.base, serialize)
        assert handler.audits.get(timeout=5) == ("checked", -1)


def test_our_client_of_a_stranger_idl_against_apache_server(apache_stranger):
    handler = StrangerShop(apache_stranger.ttypes, apache_stranger.base)
    with apache_server(apache_stranger.Shop.Processor(handler), "binary") as (host, port), \
            sync_client(stranger.Shop, f"{host}:{port}", protocol="thrift", timeout=5.0) as client:
        stranger_calls(client, stranger, stranger.base, codec.encode)
        assert handler.audits.get(timeout=5) == ("checked", -1)


@pytest.fixture
def quiet_apache_processor():
    """Apache's processor logs handler exceptions at ERROR; the tests raise them on purpose."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


# --- Apache's client against our server ------------------------------------------------

@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_apache_client_against_our_server(apache_echo, protocol):
    handler = EchoHandler()
    services = [(Echo, handler, None), (Calc, CalcHandler(), None)]
    with serving_in_thread(services) as server, \
            apache_client(apache_echo.Echo, server.address, protocol) as client:
        assert client.echo("hello") == "hello"
        assert client.echo("ünï ✓") == "ünï ✓"
        assert client.echo("") == ""
        assert client.ping() is None
        assert client.slow("coroutine handler", 2) == "coroutine handler"
        assert client.fail("fine") == "fine"

        with pytest.raises(apache_echo.ttypes.EchoError) as declared:
            client.fail("declared")
        assert (declared.value.message, declared.value.code) == ("refused on purpose", 42)

        with pytest.raises(ApacheApplicationException) as undeclared:
            client.fail("undeclared")
        assert undeclared.value.type == ApacheApplicationException.INTERNAL_ERROR
        assert "boom" in undeclared.value.message

        client.notify("one way")          # no reply is read: the next call must not see one
        assert client.echo("after oneway") == "after oneway"
        assert handler.notes.get(timeout=5) == "one way"

        # `whoami` is in both services on this port: native thrift cannot say which.
        with pytest.raises(ApacheApplicationException) as ambiguous:
            client.whoami()
        assert ambiguous.value.type == ApacheApplicationException.UNKNOWN_METHOD
        assert client.echo("still served") == "still served"

    with serving_in_thread(services) as server, \
            apache_client(apache_echo.Calc, server.address, protocol) as calc:
        assert calc.add(2, 40) == 42
        assert calc.add(-(2 ** 31), 0) == -(2 ** 31)


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_apache_buffered_client_against_our_server(apache_echo, protocol):
    """Apache's unframed transport (``TBufferedTransport``): the server reads each
    message by its own structure and answers unframed."""
    handler = EchoHandler()
    with serving_in_thread(echo_services(handler)) as server, \
            apache_client(apache_echo.Echo, server.address, protocol,
                          TTransport.TBufferedTransport) as client:
        assert client.echo("hello") == "hello"
        big = "b" * 3_000_000                 # unframed messages may be as large as framed ones
        assert client.echo(big) == big
        with pytest.raises(apache_echo.ttypes.EchoError):
            client.fail("declared")
        client.notify("one way")
        assert client.echo("after oneway") == "after oneway"
        assert handler.notes.get(timeout=5) == "one way"


def test_apache_multiplexed_clients_against_our_server(apache_echo):
    """Apache's ``TMultiplexedProtocol`` ("Service:method") picks the service:
    ``whoami``, which both services have, reaches each."""
    services = [(Echo, EchoHandler(), None), (Calc, CalcHandler(), "com.example.Calc")]
    with serving_in_thread(services) as server:
        with apache_client(apache_echo.Echo, server.address, "binary",
                           multiplexed="Echo") as echo, \
                apache_client(apache_echo.Calc, server.address, "accelerated",
                              multiplexed="com.example.Calc") as calc:
            assert echo.whoami() == "Echo" and calc.whoami() == "Calc"
            assert calc.add(20, 22) == 42 and echo.echo("hello") == "hello"
            with pytest.raises(apache_echo.ttypes.EchoError):
                echo.fail("declared")


# --- our clients against Apache's server --------------------------------------------

@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_our_async_client_against_apache_server(apache_echo, protocol, quiet_apache_processor):
    handler = ApacheEchoHandler(apache_echo.ttypes)

    async def calls(address: str) -> None:
        async with async_client(Echo, address, protocol="thrift", timeout=5.0) as client:
            assert await client.echo("hi") == "hi"
            assert await client.echo("ünï ✓") == "ünï ✓"
            assert await client.whoami() == "apache"
            assert await client.ping() is None
            assert await client.fail("fine") == "fine"

            with pytest.raises(EchoError) as declared:
                await client.fail("declared")
            assert (declared.value.message, declared.value.code) == ("refused on purpose", 42)

            with pytest.raises(ApplicationError) as undeclared:
                await client.fail("undeclared")
            assert undeclared.value.type == ApacheApplicationException.INTERNAL_ERROR
            assert undeclared.value.method == "fail"

            with pytest.raises(ApplicationError) as app:
                await client.fail("app")
            assert app.value.type == ApacheApplicationException.INVALID_MESSAGE_TYPE
            assert "app says no" in str(app.value)

            await client.notify("one way")
            assert await client.echo("after oneway") == "after oneway"
            assert handler.notes.get(timeout=5) == "one way"

            # Many calls in flight on one connection: Apache answers them in order,
            # each caller still gets its own answer.
            texts = [f"call {i}" for i in range(50)]
            assert await asyncio.gather(*(client.echo(t) for t in texts)) == texts

    with apache_server(apache_echo.Echo.Processor(handler), protocol) as (host, port):
        run(calls(f"{host}:{port}"))


def test_our_clients_of_an_apache_multiplexed_server_are_told_to_name_the_service(
        apache_echo, quiet_apache_processor):
    """Apache's ``TMultiplexedProcessor`` closes a connection, without a byte, on a
    call that names no service or one it does not host: the caller is told of
    ``multiplexed=True`` and ``service_name=``, not only of transports."""
    processor = TMultiplexedProcessor.TMultiplexedProcessor()
    processor.registerProcessor("com.example.Echo",
                                apache_echo.Echo.Processor(ApacheEchoHandler(apache_echo.ttypes)))

    async def calls(address: str) -> None:
        for options, told in [({}, "call it with multiplexed=True"),
                              ({"multiplexed": True}, "is service_name='Echo' the name")]:
            async with async_client(Echo, address, protocol="thrift", timeout=5.0,
                                    **options) as client:
                with pytest.raises(TransportError) as closed:
                    await client.echo("x")
                assert told in str(closed.value)
        async with async_client(Echo, address, protocol="thrift", multiplexed=True,
                                service_name="com.example.Echo", timeout=5.0) as client:
            assert await client.echo("named") == "named"

    with apache_server(processor, "binary") as (host, port):
        run(calls(f"{host}:{port}"))


def test_our_client_survives_a_late_apache_reply(apache_echo):
    """A call that times out leaves its reply to be dropped; the connection and the
    next call are unharmed (thriftpy2's and Apache's own clients lose sync here)."""

    async def calls(address: str) -> None:
        async with async_client(Echo, address, protocol="thrift", timeout=5.0) as client:
            with pytest.raises(CallTimeout):
                await client.call("slow", "late", 300, timeout=0.05)
            assert await client.echo("next") == "next"       # queued behind the slow call
            assert await client.slow("on time", 1) == "on time"

    handler = ApacheEchoHandler(apache_echo.ttypes)
    with apache_server(apache_echo.Echo.Processor(handler), "accelerated") as (host, port):
        run(calls(f"{host}:{port}"))


def test_our_sync_client_modes_against_apache_server(apache_echo, quiet_apache_processor):
    handler = ApacheEchoHandler(apache_echo.ttypes)
    with apache_server(apache_echo.Echo.Processor(handler), "binary") as (host, port), \
            sync_client(Echo, f"{host}:{port}", protocol="thrift", timeout=5.0) as client:
        assert client.echo("sync") == "sync"
        assert client.future.echo("future").result(5) == "future"

        outcomes: "queue.Queue[Any]" = queue.Queue()
        client.callback.echo("callback", callback=outcomes.put)
        client.callback.fail("declared", callback=outcomes.put)
        assert outcomes.get(timeout=5) == "callback"
        declared = outcomes.get(timeout=5)
        assert isinstance(declared, EchoError) and declared.code == 42

        client.notify("sync one way")
        assert handler.notes.get(timeout=5) == "sync one way"

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            texts = [f"thread {i}" for i in range(40)]
            assert list(pool.map(client.echo, texts)) == texts
