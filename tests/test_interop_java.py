"""Interop with Apache Thrift's Java library (Debian's ``libthrift-java``), the
library of the Java services OCTO peers run on:

* our ``protocol="thrift"`` AsyncClient and blocking Client against a Java
  ``TThreadPoolServer`` (strict reads, a ``TMultiplexedProcessor`` with a
  default processor) and a ``TThreadedSelectorServer`` (the library's defaults),
  both framed;
* the Java generated client against our Server: framed and buffered, with the
  strict and the old message header, through a ``TMultiplexedProtocol``, and on
  many connections at once (a Java client has one call in flight on a connection).

Both directions carry every thrift type (``tests/idl/interop.thrift``), declared
exceptions, undeclared failures, unknown methods and oneway calls
(``interop_cases.exercise``), and frames at the 16,384,000 bytes Java's
``TFramedTransport`` reads at most. The Java peers (``tests/java/``) are compiled
once per session, and each server runs once per module; the tests skip, saying
what is missing, without javac, the thrift compiler or the library
(``scripts/test.sh`` installs them).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Iterator

import pytest
from thriftpy2.thrift import TApplicationException, TType

from octo_core import protocol
from octo_core.errors import ApplicationError, CallTimeout, EncodeError, TransportError

from interop_cases import (FROM_OURS, PAYLOADS, VARIANTS, Containers, Defaults,
                           Everything, Expect, Interop, InteropHandler, Scalars, Sign,
                           Variant, exercise, in_thread, late_reply_is_dropped,
                           many_calls_on_one_connection, unknown_method_is_refused)
from interop_peers import PeerCallError
from java_peers import Peers, build_peers, java_client, java_server
from strategies import canonical, fields, is_enum, split
from wire_helpers import (async_client, run, serving_in_thread, sync_client,
                          watchdog)  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("watchdog")

# Java's TFramedTransport reads a frame whose length is at most this.
JAVA_MAX_FRAME = 16_384_000


@pytest.fixture(scope="session")
def peers(tmp_path_factory) -> Peers:
    return build_peers(str(tmp_path_factory.mktemp("java_interop")))


@pytest.fixture(scope="module")
def threadpool(peers) -> Iterator[str]:
    """A TThreadPoolServer that reads only the strict header, Interop under two
    names of a TMultiplexedProcessor and as its default (for calls naming none)."""
    with java_server(peers, "threadpool", "Interop", "com.example.Interop", "--default",
                     "--strict-read") as address:
        yield address


@pytest.fixture(scope="module")
def selector(peers) -> Iterator[str]:
    """A TThreadedSelectorServer, the library's defaults, no multiplexing."""
    with java_server(peers, "selector") as address:
        yield address


# --- what Java holds ----------------------------------------------------------------------

def as_java_holds(value: Any, ttype: int = TType.STRUCT, sub: Any = None) -> Any:
    """``value`` as Java's generated classes give it back: an enum value the IDL
    does not name reads as null (a field left out; in a container, the element or
    map entry dropped), and a string that is not UTF-8 is decoded, U+FFFD for each
    bad sequence."""
    if value is None:
        return None
    if ttype == TType.STRUCT:
        cls = sub or type(value)
        return cls(**{f.name: as_java_holds(getattr(value, f.name), f.ttype, f.sub)
                      for f in fields(cls)})
    if is_enum(sub):
        return value if value in sub._VALUES_TO_NAMES else None
    if ttype == TType.STRING and isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if ttype in (TType.LIST, TType.SET):
        held = (as_java_holds(item, *split(sub)) for item in value)
        return type(value)(item for item in held if item is not None)
    if ttype == TType.MAP:
        (kt, ks), (vt, vs) = split(sub[0]), split(sub[1])
        entries = ((as_java_holds(k, kt, ks), as_java_holds(v, vt, vs)) for k, v in value.items())
        return {k: v for k, v in entries if k is not None}
    return value


def test_what_java_holds_of_what_it_cannot_read():
    """The three values of our payloads Java changes, each as the Java server echoes it."""
    assert as_java_holds(Scalars(sign=12345, text="kept")) == Scalars(text="kept")
    assert as_java_holds(Containers(by_sign={Sign.ZERO: [], 7: []}, signs={Sign.ZERO, 7})) == \
        Containers(by_sign={Sign.ZERO: []}, signs={Sign.ZERO})
    assert as_java_holds(Variant(text=b"\xff\xfe!")) == Variant(text="\ufffd\ufffd!")


# The Java processor answers any other exception with INTERNAL_ERROR, naming the
# method, not the failure (which it logs).
FROM_JAVA = Expect(ApplicationError, TApplicationException.INTERNAL_ERROR,
                   "Internal error processing fail", as_java_holds)
# Our server's answers, as the Java client reads them.
OURS_TO_JAVA = dataclasses.replace(FROM_OURS, held=as_java_holds)


# --- our clients against the Java servers ----------------------------------------------

# server fixture, our client's options
JAVA_SERVERS = {
    "threadpool, multiplexed": ("threadpool", {"multiplexed": True}),
    "threadpool, by its default processor": ("threadpool", {}),
    "selector": ("selector", {}),
}


@pytest.mark.parametrize("kind", list(JAVA_SERVERS))
def test_our_async_client_against_the_java_server(request, kind):
    server, options = JAVA_SERVERS[kind]
    address = request.getfixturevalue(server)

    async def main() -> None:
        async with async_client(Interop, address, protocol="thrift", **options) as client:
            await exercise(client.call, FROM_JAVA)

    run(main())


def test_our_sync_client_against_the_java_server(selector):
    with sync_client(Interop, selector, protocol="thrift") as client:
        run(exercise(in_thread(client.call), FROM_JAVA))
        assert canonical(client.future.echo(PAYLOADS[1]).result(5)) == \
            canonical(as_java_holds(PAYLOADS[1]))
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            texts = [f"thread {i}" for i in range(64)]
            assert list(pool.map(client.fail, texts)) == texts


@pytest.mark.parametrize("server", ["threadpool", "selector"])
def test_many_calls_in_flight_on_one_connection_to_the_java_server(request, server):
    """The Java servers read a connection's next call once the last is answered;
    each of ours, all sent at once on the one connection, gets its own answer."""
    run(many_calls_on_one_connection(request.getfixturevalue(server), PAYLOADS * 5,
                                     as_java_holds))


def test_our_client_drops_a_late_reply_of_the_java_server(selector):
    run(late_reply_is_dropped(selector))


def variant_of_frame_length(length: int) -> Any:
    """A Variant whose echo_variant call (and reply) is a frame of ``length``."""
    empty = protocol.encode_framed_message("echo_variant", 1, 1,
                                           Interop.echo_variant_args(value=Variant(text="")))
    return Variant(text="v" * (length - (len(empty) - 4)))


@pytest.mark.parametrize("server", ["threadpool", "selector"])
def test_frames_at_javas_limit_to_and_from_the_java_server(request, server):
    """A request and a reply of exactly Java's largest frame go through; a request
    one byte over is refused before it is sent, and the connection goes on."""
    address = request.getfixturevalue(server)

    async def main() -> None:
        async with async_client(Interop, address, protocol="thrift", timeout=20.0) as client:
            largest = variant_of_frame_length(JAVA_MAX_FRAME)
            assert await client.echo_variant(largest) == largest
            with pytest.raises(EncodeError, match="max_frame_size"):
                await client.echo_variant(variant_of_frame_length(JAVA_MAX_FRAME + 1))
            assert await client.fail("still served") == "still served"

    run(main(), timeout=60.0)


def test_our_multiplexed_client_names_the_service_for_the_java_server(threadpool):
    """``service_name`` is a name the Java TMultiplexedProcessor registered. For one
    it did not, it answers nothing and closes the connection (a TProtocolException
    in Java); the client's next call reconnects."""
    async def main() -> None:
        async with async_client(Interop, threadpool, protocol="thrift", multiplexed=True,
                                service_name="com.example.Interop") as named:
            assert await named.fail("by its registered name") == "by its registered name"
        async with async_client(Interop, threadpool, protocol="thrift", multiplexed=True,
                                service_name="Nope") as unknown:
            with pytest.raises(TransportError) as closed:
                await unknown.ping()
            assert not isinstance(closed.value, CallTimeout)
        async with async_client(Interop, threadpool, protocol="thrift",
                                multiplexed=True) as client:
            assert await client.echo_variant(VARIANTS[0]) == VARIANTS[0]

    run(main())


def test_fields_left_out_come_back_as_the_java_server_holds_them(selector):
    """Java holds a field of a primitive type by value, and any other as a
    reference: one we leave out comes back as its zero (primitives) or stays out
    (the others, unlike C++). Its generated constructors set the IDL's defaults,
    optional fields' too."""
    async def main() -> None:
        async with async_client(Interop, selector, protocol="thrift") as client:
            back = await client.echo(Everything(scalars=Scalars(), defaults=Defaults(
                answer=None, greeting=None, ratio=None, enabled=None, primes=None, ages=None,
                sign=None, offset=None)))
            assert back.scalars == Scalars(flag=False, tiny=0, small=0, medium=0, large=0,
                                           real=0.0)
            assert back.defaults == Defaults(offset=-1)    # the IDL's defaults, all
            assert (back.containers, back.variant, back.tree, back.inners) == (None,) * 4

    run(main())


@pytest.mark.parametrize("server", ["threadpool", "selector"])
def test_an_empty_union_java_cannot_read_costs_only_its_call(request, server):
    """Java reads a union with no member set as an error (C++ and Python take it),
    answers PROTOCOL_ERROR, and then cannot go on with the connection: the selector
    server closes it, the thread-pool server reads on from inside the bad frame and
    answers nothing more on it. The next call goes out on a new connection."""
    address = request.getfixturevalue(server)

    async def main() -> None:
        async with async_client(Interop, address, protocol="thrift", pool_size=1) as client:
            with pytest.raises(ApplicationError, match="Unrecognized type 0") as refused:
                await client.echo_variant(Variant())
            assert refused.value.type == TApplicationException.PROTOCOL_ERROR
            assert await client.fail("on a new connection") == "on a new connection"

    run(main())


def test_a_union_with_two_members_is_refused_before_java_misreads_it(selector):
    """Java reads a union with two members set as if it held the first, then
    takes the second for a field of the struct around it: that struct comes
    back without what followed (no error anywhere). So our writers refuse it,
    as they refuse an unset required field; the next call goes on."""
    async def main() -> None:
        async with async_client(Interop, selector, protocol="thrift", pool_size=1) as client:
            both = Everything(variant=Variant(number=1, text="two"), inners=[])
            with pytest.raises(EncodeError, match=r"union Variant has 2 fields set "
                                                  r"\(number, text\); it holds one at most"):
                await client.echo(both)
            assert await client.echo_variant(Variant(text="one")) == Variant(text="one")

    run(main())


@pytest.mark.parametrize("kind", list(JAVA_SERVERS))
def test_an_unknown_method_on_the_java_server(request, kind):
    server, options = JAVA_SERVERS[kind]
    run(unknown_method_is_refused(request.getfixturevalue(server), options))


# --- the Java client against our server ---------------------------------------------------

# (transport, TMultiplexedProtocol service name, old header)
JAVA_CLIENTS = {
    "framed": ("framed", None, False),
    "framed, multiplexed": ("framed", "Interop", False),
    "framed, old header": ("framed", None, True),
    "buffered, multiplexed, old header": ("buffered", "Interop", True),
}


@pytest.fixture(scope="module")
def our_server() -> Iterator[Any]:
    with serving_in_thread([(Interop, InteropHandler(), None)]) as server:
        yield server


@pytest.mark.parametrize("kind", list(JAVA_CLIENTS))
def test_java_client_against_our_server(peers, our_server, kind):
    transport, service_name, old_header = JAVA_CLIENTS[kind]
    with java_client(peers, our_server.address, transport, service_name, old_header) as client:
        run(exercise(in_thread(client.call), OURS_TO_JAVA))
        with pytest.raises(TApplicationException) as unknown:
            client.call("ghost")
        assert unknown.value.type == TApplicationException.UNKNOWN_METHOD
        assert client.call("fail", "still served") == "still served"


def test_java_clients_on_many_connections_against_our_server(peers, our_server):
    calls = 400
    with java_client(peers, our_server.address, "framed", "Interop") as client:
        assert client.texts(f"threads 8 {calls}") == [f"call {i}" for i in range(calls)]
    # and the unified protocol on the same port
    with sync_client(Interop, our_server.address) as unified:
        assert canonical(unified.echo(PAYLOADS[0])) == canonical(PAYLOADS[0])


def test_java_multiplexed_client_naming_a_service_our_server_lacks(peers, our_server):
    with java_client(peers, our_server.address, "framed", "Nope") as client:
        with pytest.raises(TApplicationException) as unknown:
            client.call("ping")
        assert unknown.value.type == TApplicationException.UNKNOWN_METHOD
        assert "Nope" in unknown.value.message
        with pytest.raises(TApplicationException) as again:      # the connection goes on
            client.call("fail", "refused again")
        assert again.value.type == TApplicationException.UNKNOWN_METHOD


def test_frames_at_javas_limit_from_the_java_client(peers, our_server):
    """Our server reads a request of Java's largest frame and answers it with a
    reply as large, which the Java client reads. One byte more, and the server
    refuses it and closes the connection, as Java's servers do."""
    with java_client(peers, our_server.address) as client:
        largest = variant_of_frame_length(JAVA_MAX_FRAME)
        assert client.call("echo_variant", largest) == largest
        with pytest.raises(PeerCallError):
            client.call("echo_variant", variant_of_frame_length(JAVA_MAX_FRAME + 1))
