"""Interop with Apache Thrift's C++ library (Debian's ``libthrift-dev``), a Thrift
implementation that shares no code with octo_core, thriftpy2 or Apache's Python:

* our ``protocol="thrift"`` AsyncClient and blocking Client against a C++
  ``TThreadedServer``, framed and buffered, plain and through a
  ``TMultiplexedProcessor``;
* the C++ generated client against our Server, framed, buffered and through a
  ``TMultiplexedProtocol``, all on one port.

Both directions carry every thrift type (``tests/idl/interop.thrift``), declared
exceptions, undeclared failures, unknown methods and oneway calls
(``interop_cases.exercise``). The C++ peers
(``tests/cpp/``) are built once per session (``cpp_peers.build_peers``); the
tests skip, saying what is missing, without g++, the thrift compiler or the C++
headers (``scripts/test.sh`` installs them).
"""
from __future__ import annotations

import asyncio
import concurrent.futures

import pytest
from thriftpy2.thrift import TApplicationException

from octo_core.errors import ApplicationError, EncodeError

from cpp_peers import Peers, build_peers, cpp_client, cpp_server
from interop_cases import (EMPTY_CONTAINERS, FROM_OURS, PAYLOADS, VARIANTS, Defaults,
                           Everything, Expect, Interop, InteropHandler, Scalars, Variant,
                           exercise, in_thread, late_reply_is_dropped,
                           many_calls_on_one_connection, unknown_method_is_refused)
from strategies import canonical
from wire_helpers import (async_client, run, serving, serving_in_thread, sync_client,
                          watchdog)  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("watchdog")


@pytest.fixture(scope="session")
def peers(tmp_path_factory) -> Peers:
    return build_peers(str(tmp_path_factory.mktemp("cpp_interop")))


# The C++ processor answers any std::exception with TApplicationException(what()):
# type UNKNOWN.
FROM_CPP = Expect(ApplicationError, TApplicationException.UNKNOWN, "boom")


# --- our clients against the C++ server -----------------------------------------------

# (C++ server transport, its multiplexed service names) -> our client's options
CPP_SERVERS = {
    "framed": (("framed",), {}),
    "buffered": (("buffered",), {"framed": False}),
    "framed, multiplexed": (("framed", "Interop"), {"multiplexed": True}),
    "buffered, multiplexed": (("buffered", "Interop"), {"multiplexed": True, "framed": False}),
}


@pytest.mark.parametrize("kind", list(CPP_SERVERS))
def test_our_async_client_against_the_cpp_server(peers, kind):
    server_args, options = CPP_SERVERS[kind]

    async def main(address: str) -> None:
        async with async_client(Interop, address, protocol="thrift", **options) as client:
            await exercise(client.call, FROM_CPP)

    with cpp_server(peers, *server_args) as address:
        run(main(address))


def test_our_sync_client_against_the_cpp_server(peers):
    with cpp_server(peers, "framed") as address, \
            sync_client(Interop, address, protocol="thrift") as client:
        run(exercise(in_thread(client.call), FROM_CPP))
        assert canonical(client.future.echo(PAYLOADS[1]).result(5)) == canonical(PAYLOADS[1])
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            texts = [f"thread {i}" for i in range(64)]
            assert list(pool.map(client.fail, texts)) == texts


def test_many_calls_in_flight_on_one_connection_to_the_cpp_server(peers):
    """The C++ server answers one connection's calls in turn; each of ours, all
    sent at once on the one connection, gets its own answer."""
    with cpp_server(peers, "framed") as address:
        run(many_calls_on_one_connection(address, PAYLOADS * 10))


def test_our_client_drops_a_late_reply_of_the_cpp_server(peers):
    with cpp_server(peers, "framed") as address:
        run(late_reply_is_dropped(address))


def test_a_request_past_apaches_frame_limit_is_refused_before_it_is_sent(peers):
    """Apache Thrift reads frames of at most 16,384,000 bytes: a bigger request
    would only have its connection dropped by the peer ("Broken pipe"), so our
    client refuses it first, naming the size, and the connection goes on."""
    async def main(address: str) -> None:
        async with async_client(Interop, address, protocol="thrift", timeout=5.0) as client:
            with pytest.raises(EncodeError, match="max_frame_size"):
                await client.slow("x" * 16_384_000, 0)
            big = "y" * 16_000_000        # under the limit: it goes, and comes back
            assert await client.slow(big, 0) == big

    with cpp_server(peers, "framed") as address:
        run(main(address))


def test_our_multiplexed_client_names_the_service_for_the_cpp_server(peers):
    """``service_name`` is the name the C++ TMultiplexedProcessor registered; one it
    did not is refused (PROTOCOL_ERROR, then the C++ server drops the connection),
    and the client's next call reconnects."""
    async def main(address: str) -> None:
        async with async_client(Interop, address, protocol="thrift", multiplexed=True,
                                service_name="com.example.Interop") as named:
            assert await named.fail("by its registered name") == "by its registered name"
        async with async_client(Interop, address, protocol="thrift", multiplexed=True,
                                service_name="Nope") as unknown:
            with pytest.raises(ApplicationError) as refused:
                await unknown.ping()
            assert refused.value.type == TApplicationException.PROTOCOL_ERROR
            assert "Unknown service: Nope" in str(refused.value)
        async with async_client(Interop, address, protocol="thrift", multiplexed=True) as client:
            assert await client.echo_variant(VARIANTS[0]) == VARIANTS[0]

    with cpp_server(peers, "framed", "Interop", "com.example.Interop") as address:
        run(main(address))


@pytest.mark.parametrize("kind", ["framed", "framed, multiplexed"])
def test_an_unknown_method_on_the_cpp_server(peers, kind):
    server_args, options = CPP_SERVERS[kind]
    with cpp_server(peers, *server_args) as address:
        run(unknown_method_is_refused(address, options))


def test_fields_left_out_come_back_as_the_cpp_server_holds_them(peers):
    """C++ holds every field by value: one we leave out comes back as its zero or
    IDL default, except optional ones and union members, which stay out. (An
    optional field with a default the C++ side leaves out reads as that default,
    as thriftpy2's and Apache Python's generated classes fill it in.)"""
    async def main(address: str) -> None:
        async with async_client(Interop, address, protocol="thrift") as client:
            back = await client.echo(Everything(scalars=Scalars(), defaults=Defaults(
                answer=None, greeting=None, ratio=None, enabled=None, primes=None, ages=None,
                sign=None, offset=None)))
            assert back.scalars == Scalars(flag=False, tiny=0, small=0, medium=0, large=0,
                                           real=0.0, text="", blob=b"", sign=0)
            assert back.containers == EMPTY_CONTAINERS
            assert back.defaults == Defaults()    # the IDL's defaults
            assert (back.variant, back.tree, back.inners) == (None, None, [])
            assert await client.echo_variant(Variant()) == Variant()

    with cpp_server(peers, "framed") as address:
        run(main(address))


# --- the C++ client against our server ---------------------------------------------------

# (C++ client transport, its TMultiplexedProtocol service name)
CPP_CLIENTS = {
    "framed": ("framed", None),
    "buffered": ("buffered", None),
    "framed, multiplexed": ("framed", "Interop"),
    "buffered, multiplexed": ("buffered", "Interop"),
}


def test_cpp_clients_against_our_server_on_one_port(peers):
    handler = InteropHandler()
    with serving_in_thread([(Interop, handler, None)]) as server:
        for transport, service_name in CPP_CLIENTS.values():
            with cpp_client(peers, server.address, transport, service_name) as client:
                run(exercise(in_thread(client.call), FROM_OURS))
                with pytest.raises(TApplicationException) as unknown:
                    client.call("ghost")
                assert unknown.value.type == TApplicationException.UNKNOWN_METHOD
                assert client.call("fail", "still served") == "still served"
        # and the unified protocol on the same port
        with sync_client(Interop, server.address) as unified:
            assert canonical(unified.echo(PAYLOADS[0])) == canonical(PAYLOADS[0])


class ReversingHandler(InteropHandler):
    """Answers a burst of ``count`` slow() calls ("burst 0", "burst 1", ...) last
    first: each waits until the one after it is answered, so all are in flight."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.answered = [asyncio.Event() for _ in range(count)]
        self.order: list = []

    async def slow(self, text: str, delay_ms: int) -> str:
        index = int(text.split()[1])
        if index + 1 < len(self.answered):
            await self.answered[index + 1].wait()
        self.order.append(index)
        self.answered[index].set()
        return text


@pytest.mark.parametrize("transport", ["framed", "buffered"])
def test_cpp_pipelining_client_against_our_server_answering_out_of_order(peers, transport):
    """Apache's generated concurrent client sends every call before reading a
    reply and matches replies by sequence id: ours, written last call first, each
    reach their caller."""
    count = 16
    handler = ReversingHandler(count)
    with serving_in_thread([(Interop, handler, None)]) as server, \
            cpp_client(peers, server.address, transport) as client:
        assert client.texts(f"burst {count}") == [f"burst {i}" for i in range(count)]
    assert handler.order == list(reversed(range(count)))


def test_cpp_multiplexed_client_naming_a_service_our_server_lacks(peers):
    with serving_in_thread([(Interop, InteropHandler(), None)]) as server, \
            cpp_client(peers, server.address, "framed", "Nope") as client:
        with pytest.raises(TApplicationException) as unknown:
            client.call("ping")
        assert unknown.value.type == TApplicationException.UNKNOWN_METHOD
        assert "Nope" in unknown.value.message


def test_cpp_client_against_our_async_server(peers):
    """Our server on the test's own loop (the C++ client's calls off it)."""
    async def main() -> None:
        async with serving([(Interop, InteropHandler(), "com.example.Interop")]) as server:
            for transport, service_name in (("framed", None),
                                            ("buffered", "com.example.Interop")):
                with cpp_client(peers, server.address, transport, service_name) as client:
                    call = in_thread(client.call)
                    texts = [f"{transport} {i}" for i in range(20)]
                    assert [await call("slow", text, 0) for text in texts] == texts

    run(main())
