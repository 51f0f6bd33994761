"""Interop with plain thriftpy2 peers (framed transport, binary protocol).

* a thriftpy2 client against our Server (native thrift on the same port as the
  unified protocol);
* our ``protocol="thrift"`` AsyncClient and Client against a thriftpy2 server;
* the legacy MTthrift in-band header (PROTOCOL.md §4) accepted by our server;
* our clients against a peer written from PROTOCOL.md with the sans-IO decoder
  alone (request bytes, sequence ids, out-of-order replies, status mapping).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import socket
import struct

import pytest
from thriftpy2.protocol import TBinaryProtocolFactory, TCyBinaryProtocolFactory
from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport import (TBufferedTransportFactory, TCyBufferedTransportFactory,
                                 TCyFramedTransportFactory, TFramedTransportFactory)

import octo_core
from octo_core import codec, protocol
from octo_core.errors import ApplicationError, CallTimeout, TransportError

from wire_helpers import (STOP, Calc, CalcHandler, Echo, EchoError, EchoHandler, SyncEchoHandler,
                          async_client, decode_body, echo_services, framed_request,
                          raw_connection, run, serving,
                          serving_in_thread, sync_client, t_bool, t_field, t_map_ss,
                          t_message_begin, t_string, thriftpy2_client, thriftpy2_server,
                          unified_request, wait_until, wait_until_sync, watchdog)  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("watchdog")

THRIFTPY2_STACKS = {
    "pure": dict(trans_factory=TFramedTransportFactory(), proto_factory=TBinaryProtocolFactory()),
    "cython": dict(trans_factory=TCyFramedTransportFactory(),
                   proto_factory=TCyBinaryProtocolFactory()),
    "non-strict": dict(trans_factory=TFramedTransportFactory(),
                       proto_factory=TBinaryProtocolFactory(strict_read=False,
                                                            strict_write=False)),
}


# Unframed (buffered transport): thriftpy2's default, and Apache's. Our server
# reads it (the message says where it ends) and answers unframed; our client
# speaks it with framed=False.
UNFRAMED_STACKS = {
    "buffered (thriftpy2's default)": dict(trans_factory=TBufferedTransportFactory(),
                                           proto_factory=TBinaryProtocolFactory()),
    "cython-buffered": dict(trans_factory=TCyBufferedTransportFactory(),
                            proto_factory=TCyBinaryProtocolFactory()),
    # the old message header (no version word): name length first
    "buffered, non-strict": dict(trans_factory=TBufferedTransportFactory(),
                                 proto_factory=TBinaryProtocolFactory(strict_read=False,
                                                                      strict_write=False)),
}


def host_port(address: str):
    host, _, port = address.rpartition(":")
    return host, int(port)


# --- a plain thriftpy2 client against our server -------------------------------------

@pytest.mark.parametrize("stack", list(THRIFTPY2_STACKS) + list(UNFRAMED_STACKS))
def test_thriftpy2_client_against_our_server(stack):
    handler = EchoHandler()
    options = THRIFTPY2_STACKS.get(stack) or UNFRAMED_STACKS[stack]
    with serving_in_thread(echo_services(handler)) as server, \
            thriftpy2_client(Echo, *host_port(server.address), **options) as client:
        assert client.echo("hello") == "hello"
        assert client.echo("ünï ✓") == "ünï ✓"
        assert client.echo("") == ""
        assert client.ping() is None
        assert handler.pings == 1
        assert client.slow("coroutine handler", 2) == "coroutine handler"
        assert client.nap("thread handler", 2) == "thread handler"

        with pytest.raises(EchoError) as declared:
            client.fail("declared")
        assert declared.value.message == "refused on purpose" and declared.value.code == 42

        with pytest.raises(TApplicationException) as undeclared:
            client.fail("undeclared")
        assert undeclared.value.type == TApplicationException.INTERNAL_ERROR
        assert "boom" in undeclared.value.message

        # oneway: no reply is sent on native thrift, so the next reply is the right one
        assert client.notify("oneway from thriftpy2") is None
        assert client.echo("after oneway") == "after oneway"
        assert handler.notes.get(timeout=5) == "oneway from thriftpy2"
        for i in range(50):
            assert client.echo(f"n{i}") == f"n{i}"


def test_thriftpy2_asyncio_client_with_its_defaults_against_our_server():
    """thriftpy2's asyncio client as it comes: a buffered (unframed) transport."""
    from thriftpy2.contrib.aio.rpc import make_client

    async def main():
        async with serving(echo_services()) as server:
            client = await make_client(Echo, *host_port(server.address))
            try:
                assert await client.echo("aio") == "aio"
                big = "y" * 3_000_000                     # unframed: as large as framed
                assert await client.echo(big) == big
                with pytest.raises(EchoError):
                    await client.fail("declared")
                assert await client.echo("after") == "after"
            finally:
                client.close()

    run(main())


def test_a_handlers_application_exception_is_answered_in_thriftpy2s_bytes():
    """A TApplicationException a handler raises goes back as thriftpy2's server
    sends it, byte for byte: without a message it has no message field (an empty
    one was written, which its caller read as ``""``, not None)."""
    class Handler(EchoHandler):
        def fail(self, kind: str) -> str:
            message = None if kind == "bare" else kind
            raise TApplicationException(TApplicationException.INVALID_MESSAGE_TYPE, message)

    def reply(address, request: bytes) -> bytes:
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(request)
            data = b""
            while len(data) < 4 or len(data) < 4 + struct.unpack("!i", data[:4])[0]:
                chunk = sock.recv(65536)
                assert chunk, "the server closed the connection"
                data += chunk
            return data

    with serving_in_thread([(Echo, Handler(), None)]) as server, \
            thriftpy2_server(Echo, Handler()) as theirs:
        for kind in ("bare", "with a message"):
            request = framed_request("fail", Echo.fail_args(kind=kind), 7)
            assert reply(host_port(server.address), request) == reply(theirs, request)
        with sync_client(Echo, server.address) as client:
            with pytest.raises(ApplicationError) as raised:
                client.fail("bare")
            assert raised.value.type == TApplicationException.INVALID_MESSAGE_TYPE


def test_thriftpy2_client_unknown_and_ambiguous_methods():
    services = [(Echo, EchoHandler(), None), (Calc, CalcHandler(), None)]
    with serving_in_thread(services) as server:
        host, port = host_port(server.address)
        with thriftpy2_client(Calc, host, port) as calc:
            assert calc.add(40, 2) == 42
            with pytest.raises(TApplicationException) as info:   # on both services
                calc.whoami()
            assert info.value.type == TApplicationException.UNKNOWN_METHOD
            assert calc.add(1, 1) == 2                          # connection still in sync
    with serving_in_thread(echo_services()) as server:
        with thriftpy2_client(Calc, *host_port(server.address)) as calc:
            with pytest.raises(TApplicationException) as info:   # not hosted at all
                calc.add(1, 2)
            assert info.value.type == TApplicationException.UNKNOWN_METHOD
            assert calc.whoami() == "Echo"


def test_multiplexed_thriftpy2_clients_name_the_service():
    """TMultiplexedProtocol ("Service:method"): a method two services share is
    reached on each, by the name ``add_service`` gave; an unknown service gets
    UNKNOWN_METHOD and its connection stays in sync."""
    from thriftpy2.protocol.multiplex import TMultiplexedProtocolFactory

    services = [(Echo, EchoHandler(), None), (Calc, CalcHandler(), "com.example.Calc")]
    with serving_in_thread(services) as server:
        host, port = host_port(server.address)

        def client(service, name):
            factory = TMultiplexedProtocolFactory(TBinaryProtocolFactory(), name)
            return thriftpy2_client(service, host, port, proto_factory=factory)

        with client(Echo, "Echo") as echo, client(Calc, "com.example.Calc") as calc, \
                client(Calc, "Calc") as unknown:
            assert echo.whoami() == "Echo" and calc.whoami() == "Calc"
            assert echo.echo("hi") == "hi" and calc.add(2, 3) == 5
            with pytest.raises(EchoError):
                echo.fail("declared")
            for _ in range(2):
                with pytest.raises(TApplicationException) as info:
                    unknown.whoami()
                assert info.value.type == TApplicationException.UNKNOWN_METHOD
                assert "'Calc' is not hosted" in info.value.message


def test_our_multiplexed_client_against_a_thriftpy2_multiplexed_server():
    from thriftpy2.thrift import TMultiplexedProcessor, TProcessor

    processor = TMultiplexedProcessor()
    processor.register_processor("Echo", TProcessor(Echo, SyncEchoHandler()))
    processor.register_processor("Calc", TProcessor(Calc, CalcHandler()))
    with thriftpy2_server(Echo, None, processor=processor) as (host, port):
        address = f"{host}:{port}"

        async def main():
            async with async_client(Echo, address, protocol="thrift", multiplexed=True) as echo, \
                    async_client(Calc, address, protocol="thrift", multiplexed=True) as calc:
                assert await echo.whoami() == "Echo" and await calc.whoami() == "Calc"
                assert await echo.echo("multiplexed") == "multiplexed"
                with pytest.raises(EchoError):
                    await echo.fail("declared")
        run(main())
    for option in ({"multiplexed": True}, {"framed": False}):   # protocol="thrift" only
        with pytest.raises(ValueError, match="framed and multiplexed"):
            octo_core.AsyncClient(Echo, appkey="a", hosts=[address], **option)


@pytest.mark.parametrize("stack", list(UNFRAMED_STACKS))
def test_our_unframed_clients_against_a_buffered_thriftpy2_server(stack):
    """``framed=False``: a thriftpy2 server as it comes (buffered transport, no
    length prefix); many calls in flight on one connection, every call mode."""
    handler = SyncEchoHandler()
    with thriftpy2_server(Echo, handler, **UNFRAMED_STACKS[stack]) as (host, port):
        address = f"{host}:{port}"

        async def main():
            async with async_client(Echo, address, protocol="thrift", framed=False) as client:
                texts = [f"call {i} " * i for i in range(50)]
                assert await asyncio.gather(*(client.echo(t) for t in texts)) == texts
                big = "u" * 200_000
                assert await client.echo(big) == big
                with pytest.raises(EchoError):
                    await client.fail("declared")
                await client.notify("unframed oneway")
                assert await client.echo("after oneway") == "after oneway"
        run(main())
        assert handler.notes.get(timeout=5) == "unframed oneway"
        with sync_client(Echo, address, protocol="thrift", framed=False) as client:
            assert client.echo("sync") == "sync"
            assert client.future.echo("future").result(timeout=5) == "future"


def test_thriftpy2_and_unified_clients_share_the_port():
    handler = EchoHandler()
    with serving_in_thread(echo_services(handler)) as server:
        host, port = host_port(server.address)
        with thriftpy2_client(Echo, host, port) as native, \
                sync_client(Echo, server.address) as unified:
            def native_calls():
                return [native.echo(f"native-{i}") for i in range(100)]

            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                native_future = pool.submit(native_calls)
                unified_results = [unified.future.echo(f"unified-{i}") for i in range(100)]
                assert [f.result(timeout=10) for f in unified_results] == \
                    [f"unified-{i}" for i in range(100)]
                assert native_future.result(timeout=20) == [f"native-{i}" for i in range(100)]


# --- our native client against a plain thriftpy2 server -------------------------------

@pytest.mark.parametrize("stack", ["pure", "cython"])
def test_our_async_client_against_thriftpy2_server(stack):
    handler = SyncEchoHandler()
    with thriftpy2_server(Echo, handler, **THRIFTPY2_STACKS[stack]) as (host, port):
        async def main():
            async with async_client(Echo, f"{host}:{port}", protocol="thrift") as client:
                assert await client.echo("hello") == "hello"
                assert await client.echo("ünï ✓") == "ünï ✓"
                assert await client.ping() is None
                with pytest.raises(EchoError) as declared:
                    await client.fail("declared")
                assert declared.value.code == 42
                # a TApplicationException the handler raises keeps its type
                with pytest.raises(ApplicationError) as app:
                    await client.fail("app")
                assert app.value.type == TApplicationException.INVALID_MESSAGE_TYPE
                assert "app says no" in str(app.value)
                # oneway: thriftpy2 sends nothing back; the next call is answered right
                assert await client.notify("to thriftpy2") is None
                assert await client.echo("after oneway") == "after oneway"
                # many calls pipelined on the connection (the server answers in order)
                results = await asyncio.gather(*(client.echo(f"p{i}") for i in range(200)))
                assert results == [f"p{i}" for i in range(200)]

            async with async_client(Calc, f"{host}:{port}", protocol="thrift") as calc:
                with pytest.raises(ApplicationError) as unknown:
                    await calc.add(1, 2)
                assert unknown.value.type == TApplicationException.UNKNOWN_METHOD
                # thriftpy2 gives it no message: the caller is told what it means
                assert "no such method (UNKNOWN_METHOD" in str(unknown.value)

        run(main())
        assert handler.notes.get(timeout=5) == "to thriftpy2"
        assert handler.pings == 1


def test_our_client_when_thriftpy2_server_drops_the_connection():
    # thriftpy2's server closes the connection when a handler raises an exception
    # its IDL does not declare: the call fails as a TransportError, the next one
    # reconnects.
    handler = SyncEchoHandler()
    with thriftpy2_server(Echo, handler) as (host, port):
        async def main():
            async with async_client(Echo, f"{host}:{port}", protocol="thrift", timeout=5) as client:
                assert await client.echo("before") == "before"
                with pytest.raises(TransportError) as info:
                    await client.fail("undeclared")
                assert not isinstance(info.value, CallTimeout)
                assert await client.echo("reconnected") == "reconnected"

        run(main())


def test_our_unified_client_against_a_thriftpy2_server_is_told_to_speak_native_thrift():
    # A team migrating one service at a time calls a thriftpy2 server with the
    # default protocol: the server drops the unified frames without a byte, and
    # every error the calls see names the way out.
    with thriftpy2_server(Echo, SyncEchoHandler()) as (host, port):
        async def main():
            async with async_client(Echo, f"{host}:{port}", timeout=5,
                                    breaker={"consecutive_failures": 10 ** 9,
                                             "min_calls": 10 ** 9}) as client:
                said = []
                for _ in range(4):
                    with pytest.raises(TransportError) as info:
                        await client.echo("x")
                    said.append(str(info.value))
                assert all('protocol="thrift"' in text for text in said), said
                # the backoff's own message (connections dropped in a row) says it too
                assert any("without answering" in text for text in said), said
            async with async_client(Echo, f"{host}:{port}", protocol="thrift") as client:
                assert await client.echo("native") == "native"

        run(main())


@pytest.mark.parametrize("framed", [True, False])
def test_our_native_client_on_the_other_transport_is_told_to_switch(framed):
    # A thriftpy2 server closes a connection whose transport it does not speak
    # without a byte: a framed client of a buffered server (thriftpy2's default)
    # is told to pass framed=False, an unframed one of a framed server framed=True.
    stack = {} if not framed else UNFRAMED_STACKS["buffered (thriftpy2's default)"]
    with thriftpy2_server(Echo, SyncEchoHandler(), **stack) as (host, port):
        async def main():
            async with async_client(Echo, f"{host}:{port}", protocol="thrift", framed=framed,
                                    timeout=5) as client:
                with pytest.raises(TransportError) as info:
                    await client.echo("x")
                assert f"call it with framed={not framed}" in str(info.value)
            async with async_client(Echo, f"{host}:{port}", protocol="thrift",
                                    framed=not framed) as client:
                assert await client.echo("switched") == "switched"

        run(main())


def test_our_sync_client_against_thriftpy2_server():
    handler = SyncEchoHandler()
    with thriftpy2_server(Echo, handler) as (host, port), \
            sync_client(Echo, f"{host}:{port}", protocol="thrift") as client:
        assert client.echo("sync") == "sync"
        assert client.future.echo("future").result(timeout=5) == "future"
        got: "queue.Queue" = queue.Queue()
        client.callback.echo("callback", callback=got.put)
        assert got.get(timeout=5) == "callback"
        with pytest.raises(EchoError):
            client.fail("declared")
        assert isinstance(client.future.fail("declared").exception(timeout=5), EchoError)
        client.callback.fail("declared", callback=got.put)
        assert isinstance(got.get(timeout=5), EchoError)
        assert client.notify("sync oneway") is None
        assert client.future.notify("future oneway").result(timeout=5) is None
        client.callback.notify("callback oneway", callback=got.put)
        assert got.get(timeout=5) is None
        assert client.echo("still in sync") == "still in sync"
        notes = sorted(handler.notes.get(timeout=5) for _ in range(3))
        assert notes == ["callback oneway", "future oneway", "sync oneway"]


def test_our_sync_client_timeout_against_thriftpy2_server():
    handler = SyncEchoHandler()
    with thriftpy2_server(Echo, handler) as (host, port), \
            sync_client(Echo, f"{host}:{port}", protocol="thrift", timeout=0.1) as client:
        with pytest.raises(CallTimeout):
            client.slow("late", 300)
        # the late reply reaches the client before the next one (thriftpy2 answers in
        # order) and must be dropped by its sequence id
        wait_until_sync(lambda: handler.slow_finished == 1, what="the late reply")
        assert client.echo("next") == "next"
        assert client.echo("and next") == "and next"


# --- the legacy MTthrift in-band header ------------------------------------------------

def legacy_header(local=None, global_=None) -> bytes:
    """Field 32767 (struct) with the MTthrift ids 10001..10011."""
    fields = [
        t_string(10001, "trace-123"), t_string(10002, "0.1.2"), t_string(10003, "com.legacy.caller"),
        t_string(10004, "10.1.2.3"), t_string(10005, "Echo.echo"), t_string(10006, "10.0.0.9:9001"),
        t_bool(10007, True), t_bool(10008, False), t_string(10009, "1.3.7"),
        t_map_ss(10010, local if local is not None else {"hop": "1"}),
        t_map_ss(10011, global_ if global_ is not None else {"tenant": "t", "ü": "✓"}),
    ]
    return t_field(12, 32767) + b"".join(fields) + STOP


def legacy_request(method: str, seqid: int, args: bytes, *, msg_type=TMessageType.CALL,
                   header: bytes = None) -> bytes:
    message = (t_message_begin(method, msg_type, seqid)
               + (legacy_header() if header is None else header) + args + STOP)
    return protocol.encode_framed(message)


def test_legacy_mtthrift_header_is_accepted():
    assert legacy_header()[:3] == b"\x0c\x7f\xff"
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler)) as server, raw_connection(server.address) as raw:
            await raw.send(legacy_request("echo", 11, t_string(1, "legacy hello")))
            frame = await raw.read_frame()
            assert frame.header is None                      # answered as framed thrift
            name, msg_type, seqid, result = decode_body(frame, Echo)
            assert (name, msg_type, seqid, result.success) == \
                ("echo", TMessageType.REPLY, 11, "legacy hello")

            # an empty legacy header, a void method, a declared exception, a oneway call
            await raw.send(legacy_request("ping", 12, b"", header=t_field(12, 32767) + STOP))
            await raw.send(legacy_request("fail", 13, t_string(1, "declared")))
            await raw.send(legacy_request("notify", 14, t_string(1, "legacy oneway"),
                                          msg_type=TMessageType.ONEWAY))
            await raw.send(legacy_request("slow", 15, t_string(1, "slow") + t_field(8, 2)
                                          + b"\x00\x00\x00\x01"))
            replies = {decode_body(f, Echo)[2]: decode_body(f, Echo)
                       for f in await raw.read_frames(3)}
            assert set(replies) == {12, 13, 15}              # no reply to the oneway call
            assert replies[12][:2] == ("ping", TMessageType.REPLY)
            assert replies[13][3].err.code == 42
            assert replies[15][3].success == "slow"
            assert handler.notes.get(timeout=5) == "legacy oneway"
            assert handler.pings == 1

    run(main())


@pytest.mark.parametrize("msg_type", [TMessageType.ONEWAY, TMessageType.CALL],
                         ids=["ONEWAY", "CALL (thriftpy2 sends oneway calls so)"])
def test_a_refused_native_oneway_call_gets_no_reply(msg_type):
    """A native client reads no reply to a oneway call: a refusal sent anyway
    would be taken as the answer to its next call, and every answer after it
    would be one call late."""
    truncated = t_field(11, 1) + struct.pack("!i", 1000) + b"short"   # bad arguments
    native = protocol.encode_framed

    async def main():
        async with serving(echo_services()) as server, raw_connection(server.address) as raw:
            await raw.send(native(t_message_begin("notify", msg_type, 1) + truncated))
            await raw.send(native(t_message_begin("Echo:notify", msg_type, 2) + truncated))
            if msg_type == TMessageType.ONEWAY:   # as a CALL to an unknown service it is answered
                await raw.send(native(t_message_begin("Nope:notify", msg_type, 3) + STOP))
            await raw.send(framed_request("echo", Echo.echo_args(text="next"), 4))
            name, kind, seqid, result = decode_body(await raw.read_frame(), Echo)
            assert (name, kind, seqid, result.success) == ("echo", TMessageType.REPLY, 4, "next")

            # a two-way call refused the same way is answered, as a protocol error
            await raw.send(native(t_message_begin("echo", TMessageType.CALL, 5) + truncated))
            name, kind, seqid, refusal = decode_body(await raw.read_frame(), Echo)
            assert (name, kind, seqid) == ("echo", TMessageType.EXCEPTION, 5)
            assert refusal.type == TApplicationException.PROTOCOL_ERROR

    run(main())


def test_legacy_header_after_the_arguments_and_with_empty_maps():
    async def main():
        async with serving(echo_services()) as server, raw_connection(server.address) as raw:
            # field order is free in thrift: the header may follow the arguments
            message = (t_message_begin("echo", TMessageType.CALL, 21) + t_string(1, "args first")
                       + legacy_header({}, {}) + STOP)
            await raw.send(protocol.encode_framed(message))
            _, _, seqid, result = decode_body(await raw.read_frame(), Echo)
            assert (seqid, result.success) == (21, "args first")

    run(main())


def test_thriftpy2_client_after_legacy_traffic_on_the_same_server():
    # a legacy request and plain clients on one server: the header changes nothing else
    with serving_in_thread(echo_services()) as server:
        host, port = host_port(server.address)
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(legacy_request("echo", 5, t_string(1, "blocking legacy")))
            decoder = protocol.FrameDecoder()
            frames = []
            while not frames:
                data = sock.recv(65536)
                assert data, "server closed the legacy connection"
                frames = decoder.feed(data)
            assert decode_body(frames[0], Echo)[3].success == "blocking legacy"
        with thriftpy2_client(Echo, host, port) as client:
            assert client.echo("plain") == "plain"

        async def unified():
            async with raw_connection(server.address) as raw:
                await raw.send(unified_request("echo", Echo.echo_args(text="unified"), 1))
                assert decode_body(await raw.read_frame(), Echo)[3].success == "unified"
        run(unified())


# --- a hand-written peer that speaks the byte contract --------------------------------

class ContractPeer:
    """A server written from PROTOCOL.md with the sans-IO decoder only.

    It records every request frame, waits until ``batch`` requests are in, then
    answers them all in REVERSE order (a reply to a oneway call included, as the
    reference server does); heartbeats are answered at once. ``status`` makes it
    answer calls with a body-less error reply instead.
    """

    def __init__(self, batch: int, status: int = 0) -> None:
        self.batch = batch
        self.status = status
        self.frames = []
        self._waiting = []
        self.listener = None

    async def start(self) -> str:
        self.listener = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self.listener.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        self.listener.close()

    async def _serve(self, reader, writer) -> None:
        decoder = protocol.FrameDecoder()
        while True:
            data = await reader.read(65536)
            if not data:
                break
            for frame in decoder.feed(data):
                self.frames.append(frame)
                if frame.header is not None and frame.header.messageType != 0:
                    beat = protocol.HeartbeatInfo(appkey="peer", sendTime=1, status=2)
                    writer.write(protocol.encode_unified(protocol.response_header(
                        frame.header.requestInfo.sequenceId, message_type=frame.header.messageType,
                        heartbeat=beat), b"", frame.flags))
                    continue
                self._waiting.append(frame)
            if len(self._waiting) >= self.batch:
                for frame in reversed(self._waiting):
                    writer.write(self._answer(frame))
                self._waiting = []
        writer.close()

    def _answer(self, frame) -> bytes:
        name, _, seqid, args = decode_body(frame, Echo)
        if frame.header is None:
            return protocol.encode_framed(codec.encode_message(
                name, TMessageType.REPLY, seqid, Echo.echo_result(success=f"peer:{args.text}")))
        seq = frame.header.requestInfo.sequenceId
        if self.status:
            return protocol.encode_unified(
                protocol.response_header(seq, self.status, f"status {self.status}"), b"", frame.flags)
        result = Echo.notify_result() if name == "notify" else Echo.echo_result(
            success=f"peer:{args.text}")
        return protocol.encode_unified(
            protocol.response_header(seq),
            codec.encode_message(name, TMessageType.REPLY, seqid, result), frame.flags)


@pytest.mark.parametrize("options,flags", [
    ({}, 0x01), ({"checksum": True}, 0x81), ({"compression": "gzip"}, 0x41),
    ({"checksum": True, "compression": "gzip"}, 0xC1),
], ids=["plain", "checksum", "gzip", "checksum+gzip"])
def test_our_unified_client_against_a_contract_peer(options, flags):
    peer = ContractPeer(batch=6)

    async def main():
        address = await peer.start()
        try:
            async with async_client(Echo, address, appkey="com.example.caller", timeout=3,
                                    **options) as client:
                calls = [asyncio.ensure_future(client.echo(f"m{i}")) for i in range(5)]
                await asyncio.sleep(0)
                assert await client.notify("fire and forget") is None
                results = await asyncio.wait_for(asyncio.gather(*calls), 5)
                assert results == [f"peer:m{i}" for i in range(5)]     # answered in reverse
                # the reply to the oneway call was dropped quietly: the connection is fine
                peer.batch = 1
                assert await client.echo("again") == "peer:again"
        finally:
            peer.close()

    run(main())
    requests = [f for f in peer.frames if f.header.messageType == 0]
    assert len(requests) == 7
    seqs = [f.header.requestInfo.sequenceId for f in requests]
    assert sorted(seqs) == list(range(7)), "sequence ids start at 0 and are unique"
    for frame in requests:
        info = frame.header.requestInfo
        name, msg_type, seqid, args = decode_body(frame, Echo)
        assert frame.flags == flags
        assert seqid == info.sequenceId                     # body seqid = header sequenceId
        assert msg_type == TMessageType.CALL                # CALL even for oneway (§3)
        assert info.serviceName == "Echo"
        # the deadline travels as the time left of the call's 3 s: positive, never more
        assert 0 < info.timeout <= 3000
        assert info.callType == (1 if name == "notify" else 0)
        assert frame.header.traceInfo.clientAppkey == "com.example.caller"


def test_our_native_client_against_a_contract_peer():
    peer = ContractPeer(batch=5)

    async def main():
        address = await peer.start()
        try:
            async with async_client(Echo, address, protocol="thrift", timeout=3) as client:
                assert await client.notify("native oneway") is None
                calls = [asyncio.ensure_future(client.echo(f"n{i}")) for i in range(4)]
                results = await asyncio.wait_for(asyncio.gather(*calls), 5)
                assert results == [f"peer:n{i}" for i in range(4)]
        finally:
            peer.close()

    run(main())
    assert all(f.header is None for f in peer.frames)
    kinds = [codec.decode_message_begin(bytes(f.body))[:3] for f in peer.frames]
    assert kinds[0] == ("notify", TMessageType.ONEWAY, 0)
    assert sorted(k[2] for k in kinds) == list(range(5))


@pytest.mark.parametrize("status,error", [
    (1, "ApplicationError"), (2, "RuntimeFailure"), (3, "RpcError"), (4, "TransportError"),
    (5, "ProtocolError"), (6, "DegradeError"), (7, "SecurityError"), (8, "ServiceError"),
    (9, "RemoteError"), (42, "RemoteError"),
])
def test_body_less_error_replies_map_to_typed_errors(status, error):
    from octo_core import errors
    peer = ContractPeer(batch=1, status=status)

    async def main():
        address = await peer.start()
        try:
            async with async_client(Echo, address, timeout=3) as client:
                with pytest.raises(errors.OctoError) as info:
                    await client.echo("x")
                assert type(info.value) is getattr(errors, error)
                # a status §2 does not define is REMOTE_EXCEPTION, the value named
                assert info.value.status == (status if status <= 9 else errors.Status.REMOTE_EXCEPTION)
                assert info.value.method == "echo" and info.value.node == address
                assert f"status {status}" in str(info.value)
        finally:
            peer.close()

    run(main())


def test_client_heartbeat_request_follows_the_contract():
    peer = ContractPeer(batch=1)

    async def main():
        address = await peer.start()
        try:
            async with async_client(Echo, address, heartbeat_interval=0.05) as client:
                assert await client.echo("hb") == "peer:hb"
                await wait_until(lambda: any(f.header.messageType == 1 for f in peer.frames),
                                 what="a heartbeat from the idle client")
                assert await client.echo("still") == "peer:still"
        finally:
            peer.close()

    run(main())
    beat = next(f for f in peer.frames if f.header.messageType == 1)
    assert beat.header.requestInfo is not None and bytes(beat.body) == b""


def test_a_pool_sends_no_call_behind_one_a_serial_server_still_runs():
    """A thriftpy2 threaded server runs a connection's calls one at a time: with
    ``pool_size=2`` a call goes on the connection owing no reply, not in turn
    behind a call still running there, nor behind one whose caller timed out
    (the server works on it all the same)."""
    handler = SyncEchoHandler()

    async def echoes(client: octo_core.AsyncClient, *texts: str) -> None:
        for text in texts:   # in turn, every other one would wait behind the blocked call
            assert await asyncio.wait_for(client.echo(text), 4) == text   # (a hang guard)

    async def main() -> None:
        host, port = address
        async with async_client(Echo, f"{host}:{port}", protocol="thrift", pool_size=2,
                                timeout=5.0) as client:
            held = asyncio.ensure_future(client.block("held"))
            assert await asyncio.to_thread(handler.entered.get, timeout=5) == "held"
            await echoes(client, "a", "b", "c")
            handler.release.set()
            assert await held == "held"
            handler.release.clear()
            with pytest.raises(CallTimeout):
                await client.call("block", "given up", timeout=0.1)
            assert await asyncio.to_thread(handler.entered.get, timeout=5) == "given up"
            await echoes(client, "d", "e", "f")
            handler.release.set()

    with thriftpy2_server(Echo, handler) as address:
        run(main())


def test_calls_made_together_on_a_new_pool_spread_over_its_connections():
    """Calls made together before the pool has a connection take its slots in turn,
    as later ones do: against a thriftpy2 threaded server (a connection's calls one
    at a time), an echo made together with a call that blocks is answered while
    that call still runs, on the pool's other connection."""
    handler = SyncEchoHandler()

    async def main() -> None:
        host, port = address
        async with async_client(Echo, f"{host}:{port}", protocol="thrift", pool_size=2,
                                timeout=5.0) as client:
            held = asyncio.ensure_future(client.block("held"))
            quick = asyncio.ensure_future(client.echo("quick"))
            try:
                assert await asyncio.wait_for(quick, 4) == "quick"
            finally:
                handler.release.set()
            assert await held == "held"

    with thriftpy2_server(Echo, handler) as address:
        run(main())
