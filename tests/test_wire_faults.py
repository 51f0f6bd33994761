"""Faults: bad bytes, graceful stop under load, dead servers, reconnects.

Bad bytes on one connection must close that connection only; a good client on
another connection keeps calling with zero failures. Stopping drains accepted
calls and refuses the rest cleanly. A dead or absent server gives a prompt
TransportError, never a hang.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import struct
import sys
import threading
import time
import zlib
from typing import List

import pytest
from thriftpy2.thrift import TApplicationException, TMessageType

import octo_core
from octo_core import codec, protocol
from octo_core.errors import (ApplicationError, CallTimeout, DecodeError, EncodeError, OctoError,
                              RemoteError, RpcError, Status, TransportError)
from octo_core.protocol import Header, NodeStatus
from octo_core.throttle import Throttle
from octo_core.transport.stream import FramedProtocol
from octo_core.transport import server as server_conn
from octo_core.transport import client as client_conn
from octo_core.transport import stream
from octo_core.transport.client import Endpoint
from octo_core.transport.loop import new_event_loop

from cluster_helpers import run_on

from wire_helpers import (CLIENT_APPKEY, ECHO_IDL, LOCALHOST, Echo, EchoError, EchoHandler, GoodCaller,
                          _build_server, async_client, decode_body, echo_services, fake_server,
                          echo_reply, frames_read, framed_request, fresh_throttle,
                          raw_connection, refusing_port, run, serving, serving_in_thread,
                          short_tmpdir, sync_client, unified_request, wait_until,
                          watchdog)  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("watchdog")


def _good_request(seq: int = 1, flags: int = 0x01) -> bytes:
    return unified_request("echo", Echo.echo_args(text="ok"), seq, flags=flags)


def _with_bad_checksum() -> bytes:
    frame = bytearray(_good_request(flags=0x81))
    frame[-6] ^= 0xFF
    return bytes(frame)


def _unified_prefix(flags: int, total_length: int, header_length: int) -> bytes:
    return b"\xab\xba\x00" + bytes([flags]) + struct.pack("!ih", total_length, header_length)


def _request_head() -> bytes:
    return codec.encode(protocol.request_header("Echo", 1, 1000))


BAD_BYTES = {
    "http-garbage": b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
    "random-garbage": bytes(range(7, 255, 3)) * 4,
    "huge-unified-length": _unified_prefix(0x01, 0x7FFFFFFF, 0),
    "huge-framed-length": struct.pack("!i", 0x7FFFFFF0),
    "framed-length-zero": struct.pack("!i", 0) + b"\x80\x01\x00\x01",
    "framed-length-negative": struct.pack("!i", -2) + b"\x80\x01\x00\x01",
    "bad-checksum": _with_bad_checksum(),
    "total-length-too-small": _unified_prefix(0x01, 1, 0) + b"\x00" * 8,
    "negative-header-length": _unified_prefix(0x01, 2 + 40, -5) + b"\x00" * 40,
    "header-length-past-payload": _unified_prefix(0x01, 2 + 4, 100) + b"\x00" * 4,
    "response-header-to-server": protocol.encode_unified(protocol.response_header(1), b""),
    "header-without-request-info": protocol.encode_unified(Header(messageType=0), b""),
    "undecodable-header": _unified_prefix(0x01, 2 + 8, 8) + b"\x0c\x00\x02\xff\xff\xff\xff\xff",
    "unsupported-serializer": _unified_prefix(0x02, 2 + len(_request_head()),
                                              len(_request_head())) + _request_head(),
    "bad-gzip": _unified_prefix(0x41, 2 + 12, 4) + b"not gzip !!!",
    "framed-not-thrift": protocol.encode_framed(b"\x00\x00\x00\x05hello, not thrift"),
}


def _gzip_bomb() -> bytes:
    """~20 KiB on the wire, 20 MiB inflated: over the server's 16 MiB max_frame_size."""
    blob = zlib.compressobj(9, zlib.DEFLATED, 31)
    payload = blob.compress(b"\x00" * (20 << 20)) + blob.flush()
    return _unified_prefix(0x41, 2 + len(payload), 0) + payload


BAD_BYTES["gzip-bomb"] = _gzip_bomb()


@pytest.mark.parametrize("name", list(BAD_BYTES))
def test_bad_bytes_close_only_that_connection(name):
    async def main():
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address) as good:
            hammer = GoodCaller(good)
            await hammer.progress()
            async with raw_connection(server.address) as raw:
                # the raw connection works until the bad bytes come
                await raw.send(_good_request(seq=9))
                assert decode_body(await raw.read_frame(), Echo)[3].success == "ok"
                await raw.send(BAD_BYTES[name])
                assert await raw.closed_by_peer()
            await hammer.progress()
            # and fresh connections are still welcome
            async with raw_connection(server.address) as again:
                await again.send(_good_request(seq=10))
                assert decode_body(await again.read_frame(), Echo)[3].success == "ok"
            await hammer.finish()

    run(main())


def test_connections_closed_for_bad_bytes_are_logged_a_line_at_a_time(caplog, monkeypatch):
    """A peer that sends garbage on connection after connection gets one warning,
    then a count of the rest in the next: it cannot fill the log at will."""
    period_over = fresh_throttle(monkeypatch, "BROKEN", stream, server_conn)
    caplog.set_level(logging.WARNING, logger="octo_core")

    def closings() -> list:
        return [r.getMessage() for r in caplog.records if "closing connection" in r.getMessage()]

    async def main():
        async with serving(echo_services()) as server:
            for data in BAD_BYTES.values():
                async with raw_connection(server.address) as raw:
                    await raw.send(data)
                    assert await raw.closed_by_peer()
            assert len(closings()) == 1
            period_over()
            async with raw_connection(server.address) as raw:
                await raw.send(BAD_BYTES["random-garbage"])
                assert await raw.closed_by_peer()

    run(main())
    assert len(closings()) == 2
    assert closings()[1].endswith(f"(and {len(BAD_BYTES) - 1} more since the last such message)")


def test_a_throttle_bounds_its_keys_and_throttles_those_past_them_together(caplog):
    """A peer that makes up a new key per event (an exception type, a name) gets
    no more records, nor memory, than ``max_keys`` keys and one more; each key's
    first record carries the traceback, summaries none; nothing held back goes
    untold."""
    now = [0.0]
    throttle = Throttle(10.0, logging.getLogger("octo_core.test"), max_keys=2,
                               clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="octo_core.test")
    fault = ValueError("made up")

    def log(kind: int) -> None:
        throttle.log("kind %d", kind, key=kind, exc_info=fault)
        assert len(throttle._keys) <= throttle.max_keys

    for kind in range(1000):
        log(kind)
    now[0] += throttle.every
    log(1000)    # the quiet keys go; the shared one tells its count first
    log(1001)    # then a new key has room again
    log(1001)
    assert [(r.getMessage(), r.exc_info is not None) for r in caplog.records] == [
        ("kind 0", True),
        ("kind 1", True),
        ("kind 2 (past 2 kinds of message: throttled together)", True),
        ("kind 1000 (and 997 more since the last such message) "
         "(past 2 kinds of message: throttled together)", False),
        ("kind 1001", True),
    ]


def test_a_throttle_gives_the_traceback_again_after_a_quiet_period(caplog):
    """A record with none held back since the key's last (that key quiet for a
    period: another bug of the same type, maybe) carries its traceback, as the
    key's first did; only a summary of those held back goes without."""
    now = [0.0]
    throttle = Throttle(10.0, logging.getLogger("octo_core.test"), clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="octo_core.test")

    def log(text: str) -> None:
        throttle.log(text, key="one kind", exc_info=ValueError(text))

    log("first")
    now[0] += throttle.every
    log("again, after a quiet period")
    log("held back")
    now[0] += throttle.every
    log("a summary")
    assert [(r.getMessage(), r.exc_info is not None) for r in caplog.records] == [
        ("first", True),
        ("again, after a quiet period", True),
        ("a summary (and 1 more since the last such message)", False),
    ]


def test_all_bad_connections_at_once_while_good_clients_call():
    async def main():
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address) as good, \
                async_client(Echo, server.address, protocol="thrift") as good_native:
            hammers = [GoodCaller(good), GoodCaller(good_native)]
            for hammer in hammers:
                await hammer.progress(5)

            async def attack(data: bytes) -> bool:
                async with raw_connection(server.address) as raw:
                    await raw.send(data)
                    return await raw.closed_by_peer()

            assert all(await asyncio.gather(*(attack(d) for d in BAD_BYTES.values())))
            for hammer in hammers:
                await hammer.progress(5)
                await hammer.finish()

    run(main())


def test_truncated_frame_then_close():
    async def main():
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address) as good:
            hammer = GoodCaller(good)
            await hammer.progress(5)
            frame = _good_request()
            for cut in (3, 9, len(frame) // 2, len(frame) - 1):
                async with raw_connection(server.address) as raw:
                    await raw.send(frame[:cut])
                    raw.writer.write_eof()              # half-close: "the peer went away"
                    assert await raw.closed_by_peer()
                async with raw_connection(server.address) as raw:
                    await raw.send(frame[:cut])          # and a plain close mid-frame
            await hammer.progress(5)
            await hammer.finish()

    run(main())


def test_bad_message_body_gets_status_5_and_keeps_the_connection():
    # framing and header are fine, only the thrift body is bad: that call fails
    # with a ProtocolException reply, the connection stays usable
    async def main():
        async with serving(echo_services()) as server, raw_connection(server.address) as raw:
            header = protocol.request_header("Echo", 4, 1000)
            await raw.send(protocol.encode_unified(header, b"\x00\x01garbage"))
            reply = await raw.read_frame()
            assert reply.header.responseInfo.sequenceId == 4
            assert reply.header.responseInfo.status == Status.PROTOCOL_EXCEPTION
            # arguments of the wrong shape: echo's field 1 sent as an i32 twice over
            body = (struct.pack("!Ii", 0x80010001, 4) + b"echo" + struct.pack("!i", 5)
                    + b"\x08\x00\x01" + struct.pack("!i", 7) + b"\x0b\x00\x01\xff\xff\xff\xff\x00")
            await raw.send(protocol.encode_unified(protocol.request_header("Echo", 5, 1000), body))
            reply = await raw.read_frame()
            assert reply.header.responseInfo.sequenceId == 5
            assert reply.header.responseInfo.status == Status.PROTOCOL_EXCEPTION
            await raw.send(_good_request(seq=6))
            assert decode_body(await raw.read_frame(), Echo)[3].success == "ok"

    run(main())


#: These tests look at one node's connection: the circuit breaker stays out of it.
NO_BREAKER = {"consecutive_failures": 10 ** 9, "min_calls": 10 ** 9}


async def never_reads(reader, writer) -> None:
    """A fake server's handler: accept, never read."""
    await asyncio.sleep(30)


def test_calls_held_by_back_pressure_at_close_hear_client_is_closed():
    """At close, the calls waiting for the server to read (nothing sent) fail as
    the calls waiting for their replies do: "client is closed"."""
    async def main():
        async with fake_server(never_reads) as address, \
                async_client(Echo, address, timeout=30) as client:
            big = "x" * (1 << 20)
            calls = [asyncio.ensure_future(client.echo(big)) for _ in range(16)]
            await wait_until(lambda: any(conn is not None and conn.write_paused
                                         for endpoint in client._endpoints.values()
                                         for conn in endpoint._conns), what="the writes to pause")
            await client.close()
            errors = await asyncio.gather(*calls, return_exceptions=True)
            assert {str(error).split(" (")[0] for error in errors} == {"client is closed"}
            assert any(not error.request_sent for error in errors)   # (some were held)

    run(main())


def test_a_server_that_reads_nothing_makes_calls_wait_not_pile_up():
    """While the server reads nothing of what was sent, further calls wait for it
    and time out with nothing sent, instead of piling their requests up in the
    client's memory (each of these is 1 MB)."""
    async def main():
        async with fake_server(never_reads) as address, \
                async_client(Echo, address, timeout=0.1, breaker=NO_BREAKER) as client:
            big = "x" * (1 << 20)
            unsent = 0
            for _ in range(30):
                with pytest.raises(CallTimeout) as info:
                    await client.echo(big)
                unsent += not info.value.request_sent
            (endpoint,) = client._endpoints.values()
            assert endpoint._conns[0].transport.get_write_buffer_size() < 8 << 20
            assert unsent > 0                          # they waited, and said so
            assert not endpoint._conns[0]._drain_waiters   # none kept after it gave up

    run(main())


def test_a_burst_of_calls_to_a_server_that_reads_nothing_does_not_pile_up_either():
    """Calls made together (one loop pass: their writes are joined) meet the same
    back-pressure as calls made one by one: most wait and fail unsent; the write
    buffer holds a few requests, not the burst (here 300 x 128 KiB = 37.5 MiB)."""
    async def main():
        async with fake_server(never_reads) as address, \
                async_client(Echo, address, timeout=0.3, breaker=NO_BREAKER) as client:
            big = "x" * (128 << 10)
            outcomes = await asyncio.gather(*(client.echo(big) for _ in range(300)),
                                            return_exceptions=True)
            assert all(isinstance(o, CallTimeout) for o in outcomes)
            assert sum(not o.request_sent for o in outcomes) > 150
            (endpoint,) = client._endpoints.values()
            assert endpoint._conns[0].transport.get_write_buffer_size() < 8 << 20

    run(main())


@pytest.mark.parametrize("proto", ["octo", "thrift"])
def test_a_reply_that_stops_partway_does_not_hold_its_connection_for_good(proto):
    """The first connection gets all but the last bytes of a reply, then silence
    (TCP open): that call times out, and as nothing more was read for half as long
    as it waited, the connection leaves the pool (it closes once idle); the next
    call goes out on a new one and is answered."""
    connections = []

    async def handle(reader, writer):
        connections.append(writer)
        async for frame in frames_read(reader):
            reply = echo_reply(frame, decode_body(frame, Echo)[3].text)
            writer.write(reply[:-3] if len(connections) == 1 else reply)

    async def main():
        async with fake_server(handle) as address, \
                async_client(Echo, address, timeout=1, protocol=proto) as client:
            with pytest.raises(CallTimeout):
                await client.echo("first")
            assert await client.echo("second") == "second"
            assert len(connections) == 2

    run(main())


def test_a_native_servers_protocol_error_moves_new_calls_to_a_new_connection():
    """A native server that answers PROTOCOL_ERROR could not read a request, and
    may have lost its place in the stream: Java's TThreadPoolServer reads on from
    inside that request's frame and answers nothing more on the connection (as
    this one does). The call gets its ApplicationError; the next goes out on a new
    connection and is answered (on the old one it timed out, as every later one did)."""
    connections = []

    async def handle(reader, writer):
        connections.append(writer)
        lost_its_place = len(connections) == 1
        async for frame in frames_read(reader):
            name, _, seqid, args = decode_body(frame, Echo)
            if not lost_its_place:
                writer.write(protocol.encode_framed_message(
                    name, TMessageType.REPLY, seqid, Echo.echo_result(success=args.text)))
            elif args.text == "unreadable":
                writer.write(protocol.encode_framed_message(
                    name, TMessageType.EXCEPTION, seqid, TApplicationException(
                        TApplicationException.PROTOCOL_ERROR, "Unrecognized type 0")))

    async def main():
        async with fake_server(handle) as address, \
                async_client(Echo, address, protocol="thrift", pool_size=1,
                             timeout=1) as client:
            with pytest.raises(ApplicationError, match="Unrecognized type 0") as refused:
                await client.echo("unreadable")
            assert refused.value.type == TApplicationException.PROTOCOL_ERROR
            assert await client.echo("next") == "next"
            assert len(connections) == 2

    run(main())


def test_a_reply_that_only_pauses_is_not_cut_off_by_another_calls_timeout():
    """A's large reply pauses midway (a retransmit, a busy server) while B, on the
    same connection, times out: B gets its CallTimeout, A its answer. (New calls
    would go to a new connection meanwhile; this one is not torn down.)"""
    big = "x" * 200_000

    async def handle(reader, writer):
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                size = struct.unpack("!i", await reader.readexactly(4))[0]
                name, _, seqid, _ = codec.decode_message_begin(await reader.readexactly(size))
                if name != "echo":
                    continue                     # B's call: never answered
                reply = protocol.encode_framed_message(
                    "echo", TMessageType.REPLY, seqid, Echo.echo_result(success=big))
                writer.write(reply[:len(reply) // 2])
                await asyncio.sleep(0.6)         # the pause midway
                writer.write(reply[len(reply) // 2:])

    async def main():
        async with fake_server(handle) as address, \
                async_client(Echo, address, protocol="thrift", timeout=5) as client:
            a = asyncio.ensure_future(client.echo(big))
            await asyncio.sleep(0.05)
            b = asyncio.ensure_future(client.call("slow", "b", 0, timeout=0.3))
            got_a, got_b = await asyncio.gather(a, b, return_exceptions=True)
            assert got_a == big
            assert isinstance(got_b, CallTimeout)

    run(main())


@pytest.mark.parametrize("proto", ["octo", "thrift"])
def test_oneway_calls_after_idle_closes_are_all_sent(proto):
    """A oneway-only connection hears nothing from the node; closed as idle by the
    server, it is no 'dropped unheard' connection: each next call reconnects."""
    async def main():
        async with serving(echo_services(), idle_timeout=0.3) as server, \
                async_client(Echo, server.address, protocol=proto) as client:
            for i in range(3):
                await client.notify(f"n{i}")
                await asyncio.sleep(0.8)         # past the idle timeout: the server closed it

    run(main())


def test_a_node_that_accepts_and_drops_is_not_redialled_for_every_call():
    """A connection closed with not a byte from the node is redialled once; again
    and again, it counts as a failed connect (backoff, calls fail fast unsent),
    not a new connection per call."""
    accepted = []

    async def handle(reader, writer):
        accepted.append(writer)
        writer.close()

    async def main():
        async with fake_server(handle) as address, \
                async_client(Echo, address, timeout=1, breaker=NO_BREAKER) as client:
            said = set()
            for _ in range(50):
                with pytest.raises(TransportError) as info:
                    await client.echo("x")
                assert not isinstance(info.value, CallTimeout)
                said.add(str(info.value).split(";")[0])
            assert len(accepted) < 15
            # every connect worked: the calls refused meanwhile are told what did not
            assert any(text.startswith("the node closed the last 2 connections without "
                                       "answering") for text in said), said
            assert not any("connect failed" in text for text in said)

    run(main())


def test_a_node_that_closes_connections_before_any_call_is_not_blamed_on_the_protocol(
        monkeypatch):
    """A server that closes each connection at once, before a request is on it (an
    octo_core server at its max_connections, one refusing the peer), has read no
    unified frame: the backoff's message says the connections closed unanswered,
    without the hint that the node may speak only native thrift."""
    monkeypatch.setattr(client_conn, "DROPPED_AT_ONCE", 60.0)   # "at once" whatever the load

    async def handle(reader, writer):
        writer.close()

    async def main():
        async with fake_server(handle) as address:
            endpoint = Endpoint(address, unheard_hint="(the protocol hint)")
            try:
                for _ in range(2):   # connections alone, as the cluster's probe opens them
                    conn = await endpoint.connection()
                    await wait_until(lambda: conn.closed)
                with pytest.raises(TransportError) as info:
                    await endpoint.connection()
            finally:
                endpoint.close()
            assert "the node closed the last 2 connections without answering" in str(info.value)
            assert "protocol hint" not in str(info.value)

    run(main())


def test_a_pools_connects_refused_at_one_moment_are_one_failure_in_a_row():
    """The slots of a pool that dial a node at once and are all refused (it is
    restarting, say) are one failure: the calls after them are told it is retried
    after the first backoff, not after one doubled for every slot."""
    async def main():
        with refusing_port() as dead:
            endpoint = Endpoint(f"{LOCALHOST}:{dead.getsockname()[1]}", pool_size=4,
                                backoff_min=0.5, backoff_max=60.0)
            try:
                refused = await asyncio.gather(*[endpoint.connection() for _ in range(4)],
                                               return_exceptions=True)
                assert all(isinstance(exc, TransportError) for exc in refused)
                with pytest.raises(TransportError, match="retrying in") as later:
                    await endpoint.connection()
                retry_in = float(re.search(r"retrying in ([\d.]+)s", str(later.value)).group(1))
                assert retry_in <= 0.5 * 1.2     # backoff_min, jittered
            finally:
                endpoint.close()

    run(main())


def test_connections_the_client_retires_itself_do_not_count_as_dropped_by_the_node():
    """Native thrift calls timing out one after the other on a fresh connection
    (a slow handler, nothing read yet) make the client leave it and close it once
    idle: its own close, not the node dropping it unheard. Done again and again,
    the calls still go to the node (and time out), never fail unsent as if the
    node closed its connections without answering."""
    async def main():
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address, protocol="thrift", timeout=5,
                             breaker=NO_BREAKER) as client:
            for _ in range(3):
                calls = [client.call("slow", "x", 300, timeout=t) for t in (0.02, 0.04)]
                for outcome in await asyncio.gather(*calls, return_exceptions=True):
                    assert isinstance(outcome, CallTimeout)
                await asyncio.sleep(0.01)    # the connection left behind has closed
            assert await client.echo("still served") == "still served"

    run(main())


@pytest.mark.parametrize("sent,why", [
    (b"\x00\x00\x00\x00 this is not a frame", "not positive"),
    (unified_request("echo", Echo.echo_args(text="x"), 0), "request frame"),
], ids=["garbage", "a request frame"])
def test_bytes_a_server_must_not_send_fail_the_pending_calls(sent, why):
    """Garbage, or a request frame, from the server: the stream cannot be trusted,
    so the connection closes and the waiting call fails with a TransportError
    naming its method (not a timeout)."""
    async def handle(reader, writer):
        await reader.read(65536)
        writer.write(sent)
        await writer.drain()
        await asyncio.sleep(5)
        writer.close()

    async def main():
        async with fake_server(handle) as address, \
                async_client(Echo, address, timeout=10) as client:
            with pytest.raises(TransportError, match=why) as info:
                await asyncio.wait_for(client.echo("x"), 5)
            assert not isinstance(info.value, CallTimeout)
            assert info.value.method == "echo"

    run(main())


def _first_reply_then_echo(first_body, first_status: int = 0):
    """A fake server's handler: the first call's reply carries the body
    ``first_body(name, seqid)`` makes (and ``first_status`` in its header); the
    second is echoed properly."""
    async def handle(reader, writer):
        decoder = protocol.FrameDecoder()
        answered = 0
        while answered < 2:
            data = await reader.read(65536)
            if not data:
                return
            for frame in decoder.feed(data):
                name, _, seqid, args = decode_body(frame, Echo)
                body = (first_body(name, seqid) if answered == 0 else
                        codec.encode_message(name, 2, seqid, Echo.echo_result(success=args.text)))
                writer.write(protocol.encode_unified(protocol.response_header(
                    frame.head.sequence_id, first_status if answered == 0 else 0), body))
                answered += 1
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()
    return handle


def test_a_reply_with_a_bad_body_fails_only_its_own_call():
    """A well-framed reply whose thrift body does not decode: that call gets a
    ProtocolError (status 5) naming the method; the connection carries on."""
    handle = _first_reply_then_echo(lambda name, seqid: b"\x80\x01\x00\x02not a thrift message")

    async def main():
        async with fake_server(handle) as address, \
                async_client(Echo, address, timeout=5) as client:
            with pytest.raises(DecodeError, match="bad reply") as info:
                await client.echo("first")
            assert info.value.status == Status.PROTOCOL_EXCEPTION
            assert info.value.method == "echo"
            assert await client.echo("second") == "second"

    run(main())


@pytest.mark.parametrize("wrong,said", [("seqid", "seqid"), ("call", "message type 1"),
                                        ("name", "is to method 'whoami'")])
def test_a_reply_that_is_not_the_answer_to_its_call_fails_that_call(wrong, said):
    """§3: the body's seqid repeats the header's; a REPLY with another seqid, or a
    message that is no reply at all, is refused (Apache's clients refuse both),
    not returned as the call's result; so is a REPLY to another method (Apache's
    Go and C++ clients refuse it: its result struct would be read as this
    method's, whoami's string as echo's). The next call on the connection works."""
    def impostor(name: str, seqid: int) -> bytes:
        if wrong == "call":
            return codec.encode_message(name, 1, seqid, Echo.echo_args(text="impostor"))
        return codec.encode_message("whoami", 2, seqid + 999 if wrong == "seqid" else seqid,
                                    Echo.whoami_result(success="impostor"))

    handle = _first_reply_then_echo(impostor)

    async def main():
        async with fake_server(handle) as address, \
                async_client(Echo, address, timeout=5) as client:
            with pytest.raises(DecodeError, match="bad reply") as info:
                await client.echo("first")
            assert said in str(info.value)
            assert await client.echo("second") == "second"

    run(main())


def test_a_reply_naming_its_method_as_a_multiplexed_call_does_is_read():
    """Servers answer a multiplexed call ("Echo:echo") under the method's own name
    (Apache's, thriftpy2's and ours do); one that repeats the call's name is read too."""
    handle = _first_reply_then_echo(lambda name, seqid: codec.encode_message(
        "Echo:echo", 2, seqid, Echo.echo_result(success="multiplexed")))

    async def main():
        async with fake_server(handle) as address, \
                async_client(Echo, address, timeout=5) as client:
            assert await client.echo("first") == "multiplexed"

    run(main())


def test_a_result_carrying_both_success_and_an_exception_is_read_as_success():
    """thriftpy2's and Apache's clients look at ``success`` first; so does ours."""
    handle = _first_reply_then_echo(lambda name, seqid: codec.encode_message(
        name, 2, seqid, Echo.fail_result(success="ok", err=EchoError(message="also set"))))

    async def main():
        async with fake_server(handle) as address, \
                async_client(Echo, address, timeout=5) as client:
            assert await client.fail("declared") == "ok"
            assert await client.echo("second") == "second"

    run(main())


@pytest.mark.parametrize("status", [10, 42, -1, -128])
def test_a_status_outside_octos_is_a_remote_error_naming_it(status):
    """§2 defines statuses 0-9; any other is the peer's fault, reported as
    REMOTE_EXCEPTION (a status every reader of errors and metrics knows) that
    names the value. The connection carries on."""
    handle = _first_reply_then_echo(lambda name, seqid: b"", first_status=status)

    async def main():
        async with fake_server(handle) as address, \
                async_client(Echo, address, timeout=5) as client:
            with pytest.raises(RemoteError, match=f"undefined status {status}") as info:
                await client.echo("first")
            assert info.value.status == Status.REMOTE_EXCEPTION
            assert await client.echo("second") == "second"

    run(main())


def test_good_requests_ahead_of_garbage_in_one_read_are_all_answered():
    """However TCP cuts the stream, what came before the bad bytes is served (a
    oneway call among it runs); then that connection alone closes."""
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler)) as server, \
                async_client(Echo, server.address) as good, \
                raw_connection(server.address) as raw:
            requests = [unified_request("echo", Echo.echo_args(text=f"t{seq}"), seq)
                        for seq in range(3)]
            requests.append(unified_request("notify", Echo.notify_args(text="noted"), 3,
                                            call_type=protocol.CallType.NO_REPLY))
            raw.writer.write(b"".join(requests) + b"\xab\xba\x01\x01garbage that breaks it")
            frames = sorted(await raw.read_frames(4), key=lambda f: f.head.sequence_id)
            assert [f.head.sequence_id for f in frames] == [0, 1, 2, 3]   # in any order
            assert [decode_body(f, Echo)[3].success for f in frames[:3]] == ["t0", "t1", "t2"]
            assert handler.notes.get(timeout=5) == "noted"
            assert await raw.closed_by_peer(timeout=5)
            assert await good.echo("unaffected") == "unaffected"

    run(main())


# --- frames over max_frame_size ---------------------------------------------------------

LIMIT = 1 << 20


class AmplifyingHandler(EchoHandler):
    """``echo`` answers with ``text`` repeated to over 1 MiB: a reply too big to send;
    ``fail("huge")`` raises an exception whose message is that big."""

    def echo(self, text: str) -> str:
        return text * (LIMIT // max(1, len(text)) + 1) if text.startswith("big") else text

    def fail(self, kind: str) -> str:
        if kind == "huge":
            raise ValueError("h" * (2 * LIMIT))
        return super().fail(kind)


@pytest.mark.parametrize("proto,compression", [("octo", None), ("thrift", None), ("octo", "gzip")])
def test_an_oversized_request_fails_alone_before_it_is_sent(proto, compression):
    """A request over max_frame_size would make the server close the connection and
    fail every call on it; it fails alone, with an EncodeError, and is never sent.
    Compressed, it is the decompressed size the server checks, so it counts here too."""
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler), max_frame_size=LIMIT) as server, \
                async_client(Echo, server.address, max_frame_size=LIMIT, timeout=5,
                             protocol=proto, compression=compression, cluster="failover",
                             idempotent=True) as client:
            others = [asyncio.ensure_future(client.slow(f"other {i}", 200)) for i in range(5)]
            await wait_until(lambda: handler.slow_started == 5)
            with pytest.raises(EncodeError, match="exceeds max_frame_size 1048576") as info:
                await client.echo("x" * (LIMIT + 1))      # gzip makes this a few KB on the wire
            assert (info.value.method, info.value.node) == ("echo", server.address)
            assert await asyncio.gather(*others) == [f"other {i}" for i in range(5)]
            assert await client.echo("after") == "after"
            # The caller's own mistake says nothing about the node: more of them than
            # the breaker's consecutive-failure threshold leave it closed, unretried.
            for _ in range(6):
                with pytest.raises(EncodeError):
                    await client.echo("x" * (LIMIT + 1))
            assert await client.echo("still served") == "still served"

    run(main())


@pytest.mark.parametrize("proto, other_cause", [("octo", 'protocol="thrift"'),
                                                 ("thrift", "framed=False")])
def test_a_request_over_the_servers_smaller_max_frame_size_is_named_as_a_cause(proto,
                                                                               other_cause):
    """A server whose max_frame_size is below the client's closes the connection on
    a request over it, without a byte, as a native thrift server closes a unified
    one (or a buffered one a framed one): the call is told both causes, not only
    protocol="thrift" (framed=False, which an octo_core server does not need)."""
    async def main():
        async with serving(echo_services(), max_frame_size=4096) as server, \
                async_client(Echo, server.address, timeout=5, breaker=NO_BREAKER,
                             protocol=proto) as client:
            with pytest.raises(TransportError) as info:
                await client.echo("x" * 10000)
            assert other_cause in str(info.value)
            assert "over its max_frame_size" in str(info.value)
            assert await client.echo("after") == "after"

    run(main())


@pytest.mark.parametrize("proto", ["octo", "thrift"])
def test_an_oversized_reply_becomes_an_error_for_its_own_call(proto):
    """A result too big for max_frame_size is not sent (the client would close the
    connection); its caller gets an application error, the other calls carry on."""
    handler = AmplifyingHandler()

    async def main():
        async with serving(echo_services(handler), max_frame_size=LIMIT) as server, \
                async_client(Echo, server.address, timeout=5, protocol=proto) as client:
            others = [asyncio.ensure_future(client.slow(f"other {i}", 200)) for i in range(5)]
            await wait_until(lambda: handler.slow_started == 5)
            with pytest.raises(ApplicationError, match="cannot be sent.*exceeds max_frame_size"):
                await client.echo("big")
            with pytest.raises(ApplicationError, match=r"ValueError: h+\.\.\. \(\d+ more characters\)"):
                await client.fail("huge")                   # the message is cut, not the call
            assert await asyncio.gather(*others) == [f"other {i}" for i in range(5)]
            assert await client.echo("small") == "small"

    run(main())


@pytest.mark.parametrize("framed", [True, False])
def test_a_native_message_of_exactly_max_frame_size_goes_both_ways(framed):
    """Framed, max_frame_size holds the length a frame starts with (not its own 4
    bytes), as the reader and Apache's TFramedTransport do; unframed, the message:
    a request and a reply of exactly the limit are sent and read (a framed one
    within 4 bytes of it was refused, though any peer would read it), one byte
    more is refused before it is sent."""
    empty = codec.encode_message("echo", TMessageType.CALL, 1, Echo.echo_args(text=""))

    def text_of(size: int) -> str:     # an echo request (and reply) of ``size`` bytes
        return "t" * (size - len(empty))

    async def main():
        async with serving(echo_services(), max_frame_size=LIMIT) as server, \
                async_client(Echo, server.address, timeout=5, protocol="thrift",
                             framed=framed, max_frame_size=LIMIT) as client:
            assert await client.echo(text_of(LIMIT)) == text_of(LIMIT)
            with pytest.raises(EncodeError, match=f"request of {LIMIT + 1} bytes exceeds"):
                await client.echo(text_of(LIMIT + 1))

    run(main())


@pytest.mark.parametrize("proto", ["octo", "thrift"])
def test_a_reply_over_the_clients_own_limit_closes_its_connection(proto):
    """A server with a larger limit than the client's can send a reply the client
    will not read: the client closes that connection (a TransportError, not a
    timeout) and reconnects for the next call."""
    async def main():
        async with serving(echo_services(AmplifyingHandler())) as server, \
                async_client(Echo, server.address, timeout=5, protocol=proto,
                             max_frame_size=LIMIT) as client:
            with pytest.raises(TransportError) as info:
                await client.echo("big")
            assert not isinstance(info.value, CallTimeout)
            assert await client.echo("small") == "small"

    run(main())


# --- graceful stop ------------------------------------------------------------------

def _is_clean_refusal(exc: BaseException) -> bool:
    """Refused, not lost: a native refusal too is an RpcError (LOADSHEDDING)."""
    return isinstance(exc, (RpcError, TransportError)) and not isinstance(exc, CallTimeout)


def test_graceful_stop_under_load():
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler), grace=5, business_threads=32) as server, \
                async_client(Echo, server.address, timeout=10) as unified, \
                async_client(Echo, server.address, protocol="thrift", timeout=10) as native:
            accepted = ([unified.slow(f"u{i}", 300) for i in range(100)]
                        + [native.slow(f"n{i}", 300) for i in range(30)]
                        + [unified.nap(f"z{i}", 300) for i in range(20)]
                        + [native.nap(f"y{i}", 300) for i in range(10)])
            expected = ([f"u{i}" for i in range(100)] + [f"n{i}" for i in range(30)]
                        + [f"z{i}" for i in range(20)] + [f"y{i}" for i in range(10)])
            accepted = [asyncio.ensure_future(c) for c in accepted]
            await wait_until(lambda: handler.slow_started == 130 and handler.naps_started == 30,
                             what="every call to reach its handler")

            stopping = asyncio.ensure_future(server.stop(grace=5))
            await wait_until(lambda: server.status == NodeStatus.STOPPING)
            # new calls while draining: refused at once, never run: status 3, or, on
            # the unified client the stop notice reached, never sent (the node's
            # listener is closed: its connect is refused)
            during = await asyncio.wait_for(asyncio.gather(
                unified.echo("late"), unified.slow("late", 1), native.echo("late"),
                return_exceptions=True), 5)
            for refusal in during[:2]:
                assert (isinstance(refusal, RpcError) and refusal.status == 3
                        or isinstance(refusal, TransportError) and not refusal.request_sent), \
                    refusal
            assert _is_clean_refusal(during[2]), during[2]

            # every accepted call completes successfully
            results = await asyncio.wait_for(asyncio.gather(*accepted), 10)
            assert results == expected
            await asyncio.wait_for(stopping, 10)
            assert server.status == NodeStatus.STOPPED

            # after stop: clean errors, no hang
            for client in (unified, native):
                with pytest.raises(OctoError) as info:
                    await asyncio.wait_for(client.echo("after stop"), 5)
                assert _is_clean_refusal(info.value), info.value

    run(main())


def test_a_stop_notice_leaves_no_call_sent_in_the_closing_window():
    """Rolling restarts: callers keep calling two nodes while one stops. The stop
    tells its unified peers (a heartbeat reply, sequenceId -1, status STOPPING),
    which send it no more calls, and it closes only once they have left: no call
    is sent into its close and lost there (a non-idempotent call could not be
    retried), so failover hides the stop entirely. A unified peer that does not
    know the notice still gets status 3 for what it sends while the node drains."""
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler)) as staying, \
                serving(echo_services(handler)) as leaving, \
                octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, cluster="failover", timeout=5,
                                      hosts=[staying.address, leaving.address]) as client, \
                raw_connection(leaving.address) as unaware:
            await unaware.send(protocol.encode_unified(protocol.scanner_heartbeat_request(), b""))
            await unaware.read_frame()          # (it has spoken the unified protocol)
            failures: List[BaseException] = []
            calls = 0
            running = True

            async def caller(i: int) -> None:
                nonlocal calls
                while running:
                    try:
                        assert await client.slow(f"c{i}", 20) == f"c{i}"
                        calls += 1
                    except OctoError as exc:
                        failures.append(exc)
                        await asyncio.sleep(0.01)

            callers = [asyncio.ensure_future(caller(i)) for i in range(32)]
            try:
                await wait_until(lambda: calls > 200, 10, "calls on both nodes")
                stopping = asyncio.ensure_future(leaving.stop(grace=5))
                notice = await unaware.read_frame()
                assert notice.header.responseInfo.sequenceId == protocol.CLOSE_NOTICE_SEQUENCE
                assert notice.header.heartbeatInfo.status == NodeStatus.STOPPING
                await unaware.send(unified_request("echo", Echo.echo_args(text="late"), 7))
                refusal = await unaware.read_frame()
                assert refusal.header.responseInfo.status == Status.RPC_EXCEPTION
                await asyncio.wait_for(stopping, 10)
                before = calls
                await wait_until(lambda: calls > before + 200, 10, "calls on the staying node")
            finally:
                running = False
                await asyncio.wait_for(asyncio.gather(*callers), 10)
            assert failures == []

    run(main())


def test_calls_a_stop_cut_short_fail_over_when_idempotent():
    """A handler the stop cancels past its grace is answered as a connection lost
    mid-call (status 4), not as the handler's own error (status 1): failover takes
    an idempotent method to another node, as after a kill -9."""
    class Quick(EchoHandler):
        async def slow(self, text: str, delay_ms: int) -> str:   # at once, whatever the delay
            return await super().slow(text, 0)

    stopping, staying = EchoHandler(), Quick()

    async def main():
        async with serving(echo_services(staying)) as other, \
                serving(echo_services(stopping)) as doomed:
            async with octo_core.AsyncClient(
                    Echo, appkey="c", hosts=[doomed.address, other.address], timeout=20,
                    lb="roundrobin", cluster="failover", idempotent=["slow"]) as client:
                calls = [asyncio.ensure_future(client.slow(f"call {i}", 15000))
                         for i in range(4)]
                await wait_until(lambda: stopping.slow_started >= 1, what="a call on the node")
                await asyncio.wait_for(doomed.stop(grace=0.1), 10)
                return await asyncio.wait_for(asyncio.gather(*calls), 10)

    answers = run(main())
    assert answers == [f"call {i}" for i in range(4)]
    assert stopping.slow_finished == 0 and staying.slow_finished >= stopping.slow_started


def test_stop_with_grace_shorter_than_a_call_fails_it_cleanly():
    """Past the grace a coroutine handler is cancelled and its caller told so; a
    plain function cannot be stopped, and its caller sees the connection close.
    Neither waits for its own deadline."""
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler)) as server, \
                async_client(Echo, server.address, timeout=20) as client:
            coroutine = asyncio.ensure_future(client.slow("forever", 15000))
            blocked = asyncio.ensure_future(client.block("forever"))
            await wait_until(lambda: handler.slow_started == 1 and handler.entered.qsize() == 1)
            await asyncio.wait_for(server.stop(grace=0.1), 10)
            with pytest.raises(TransportError, match="cancelled: the server stopped while it ran"):
                await asyncio.wait_for(coroutine, 5)
            with pytest.raises(TransportError) as info:
                await asyncio.wait_for(blocked, 5)
            assert not isinstance(info.value, CallTimeout)
            assert not server._dispatcher._handlers
        handler.release.set()

    run(main())


def test_calls_still_queued_for_a_business_thread_past_the_grace_are_answered_and_never_run():
    """Past the grace, plain-function calls still waiting for a business thread
    are refused with status 3 (they never ran: a caller may retry them
    elsewhere) and never run: not left to see their connection close as if
    they might have run, nor run after the stop."""
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler), business_threads=1) as server, \
                async_client(Echo, server.address, timeout=20) as client:
            blocked = asyncio.ensure_future(client.block("holds the only thread"))
            await wait_until(lambda: handler.entered.qsize() == 1)
            queued = [asyncio.ensure_future(client.nap(f"q{i}", 0)) for i in range(3)]
            await wait_until(lambda: server.stats().get("Echo.nap", {}).get("in_flight") == 3,
                             what="the naps to wait for the business thread")
            await asyncio.wait_for(server.stop(grace=0.1), 10)
            for call in queued:
                with pytest.raises(RpcError, match="the server stopped before a business "
                                                   "thread could run it"):
                    await asyncio.wait_for(call, 5)
            handler.release.set()
            with pytest.raises(TransportError):
                await asyncio.wait_for(blocked, 5)
        assert handler.naps_started == 0
        # refusals, not latencies: they waited the grace out, but never ran
        row = server.stats()["Echo.nap"]
        assert row["calls"] == row["refused"] == 3 and row["in_flight"] == 0
        assert row["errors"] == {Status.RPC_EXCEPTION: 3} and row["p50"] is None

    run(main())


def test_sync_server_context_manager_drains_and_stops():
    handler = EchoHandler()
    server = octo_core.Server("com.example.ctx", port=0)
    server.add_service(Echo, handler)
    client = None
    try:
        with server:
            assert server.status == NodeStatus.ALIVE
            client = octo_core.Client(Echo, appkey="com.example.caller", hosts=[server.address],
                                      timeout=5)
            assert client.echo("ctx") == "ctx"
            future = client.future.nap("draining", 200)
            deadline = time.monotonic() + 5
            while handler.naps_started < 1:
                assert time.monotonic() < deadline, "nap() never started"
                time.sleep(0.005)
        # leaving the block drained the accepted call, then stopped the server
        assert future.result(timeout=5) == "draining"
        assert server.status == NodeStatus.STOPPED
        with pytest.raises(TransportError):
            client.echo("after stop")
    finally:
        if client is not None:
            client.close()


# --- nothing listening, reconnects -----------------------------------------------------

def test_connect_failure_names_the_method_and_node():
    # errors "say where the error happened": a call that could not connect knows
    # both its method and its node
    with refusing_port() as sock:
        address = f"{LOCALHOST}:{sock.getsockname()[1]}"

        async def main():
            async with async_client(Echo, address) as client:
                with pytest.raises(TransportError) as first:
                    await asyncio.wait_for(client.echo("x"), 5)
                with pytest.raises(TransportError) as during_backoff:
                    await asyncio.wait_for(client.ping(), 5)
            for info, method in ((first, "echo"), (during_backoff, "ping")):
                assert info.value.node == address
                assert info.value.method == method, f"{info.value!r} has method {info.value.method!r}"

        run(main())


@pytest.mark.parametrize("make_loop", [asyncio.new_event_loop, new_event_loop],
                         ids=["asyncio", "uvloop"])
def test_a_refused_connect_says_why_in_the_systems_words(make_loop):
    """On asyncio's own loop (asyncio.run, as in the README's tour) the reason was
    asyncio's text, which names only the address: "Connect call failed ('127.0.0.1', 41234)"."""
    with refusing_port() as sock:
        async def main():
            async with async_client(Echo, f"{LOCALHOST}:{sock.getsockname()[1]}") as client:
                with pytest.raises(TransportError) as refused:
                    await client.echo("x")
            return refused.value
        error = run_on(make_loop, main())
    assert error.message == f"cannot connect: {os.strerror(errno.ECONNREFUSED)}"


def test_cancelling_a_call_while_it_connects_does_not_poison_the_endpoint():
    # A caller's CancelledError during the connect is not a failed connect: taken
    # for one, it would become TransportError("cannot connect: ") and put the
    # healthy node into backoff, failing the next caller fast with "connect
    # failed recently".
    async def main():
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address) as client:
            call = asyncio.ensure_future(client.echo("cancel me"))
            await asyncio.sleep(0)          # the call is now waiting for its connection
            assert not call.done()
            call.cancel()
            outcome = (await asyncio.wait_for(asyncio.gather(call, return_exceptions=True), 5))[0]
            assert isinstance(outcome, asyncio.CancelledError), \
                f"the cancelled call ended with {outcome!r}"
            assert await asyncio.wait_for(client.echo("next caller"), 5) == "next caller"

    run(main())


def test_client_closed_mid_call_fails_waiting_calls():
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler)) as server:
            client = octo_core.AsyncClient(Echo, appkey="com.example.caller",
                                           hosts=[server.address], timeout=20)
            waiting = [asyncio.ensure_future(client.slow(f"w{i}", 5000)) for i in range(5)]
            await wait_until(lambda: handler.slow_started == 5)
            await asyncio.wait_for(client.close(), 5)
            outcomes = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
            for outcome in outcomes:
                assert isinstance(outcome, TransportError) and not isinstance(outcome, CallTimeout)
            with pytest.raises(TransportError):
                await asyncio.wait_for(client.echo("closed"), 5)

    run(main())


def test_reconnect_after_backoff_tcp():
    with refusing_port() as sock:
        port = sock.getsockname()[1]
        address = f"{LOCALHOST}:{port}"

        async def main():
            async with async_client(Echo, address, timeout=5, connect_timeout=5) as client:
                with pytest.raises(TransportError) as info:
                    await asyncio.wait_for(client.echo("nobody home"), 5)
                assert not isinstance(info.value, CallTimeout)
                assert info.value.node == address
                with pytest.raises(TransportError):        # fails fast during the backoff
                    await asyncio.wait_for(client.echo("still nobody"), 5)

                sock.close()
                async with serving(echo_services(), port=port) as server:
                    assert server.port == port
                    assert await _first_success(client) == "back"

        run(main())


def test_reconnect_after_backoff_unix_socket():
    with short_tmpdir() as tmp:
        address = f"unix://{os.path.join(tmp, 'later.sock')}"

        async def main():
            async with async_client(Echo, address, timeout=5) as client:
                with pytest.raises(TransportError):
                    await asyncio.wait_for(client.echo("no socket yet"), 5)
                async with serving(echo_services(), host=address):
                    assert await _first_success(client) == "back"

        run(main())


def test_sync_client_reconnects_after_the_server_restarts():
    with refusing_port() as sock:
        port = sock.getsockname()[1]
        sock.close()
        address = f"{LOCALHOST}:{port}"
        with sync_client(Echo, address, timeout=5) as client:
            with pytest.raises(TransportError):
                client.echo("down")
            for attempt in range(2):     # up, down, up again
                with serving_in_thread(echo_services(), port=port):
                    deadline = time.monotonic() + 10
                    while True:
                        try:
                            assert client.echo(f"up {attempt}") == f"up {attempt}"
                            break
                        except TransportError:
                            assert time.monotonic() < deadline, "never reconnected"
                            time.sleep(0.02)
                with pytest.raises(TransportError):
                    client.echo("down again")


async def _first_success(client, text: str = "back", patience: float = 10.0):
    """Call until the backoff lets a connect through; only TransportError may happen before."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return await asyncio.wait_for(client.echo(text), 5)
        except TransportError as exc:
            assert not isinstance(exc, CallTimeout), exc
            assert time.monotonic() < deadline, f"never reconnected: {exc}"
            await asyncio.sleep(0.02)


# --- a server that dies mid-call ---------------------------------------------------------

DOOMED_SERVER = r"""
import asyncio, os, sys, time

import octo_core

echo = octo_core.load_idl(sys.argv[1], module_name="doomed_echo_thrift")


class Handler:
    def echo(self, text): return text
    def fail(self, kind): return kind
    def ping(self): pass
    def notify(self, text): pass
    def block(self, text): return text
    def whoami(self): return "Echo"

    async def slow(self, text, delay_ms):
        os.write(1, b"started\n")   # one atomic write: handlers run on many threads
        await asyncio.sleep(delay_ms / 1000)
        return text

    def nap(self, text, delay_ms):
        os.write(1, b"started\n")   # one atomic write: handlers run on many threads
        time.sleep(delay_ms / 1000)
        return text


async def main():
    server = octo_core.Server("com.example.doomed", port=0)
    server.add_service(echo.Echo, Handler())
    await server.start()
    print(server.address, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_server_killed_mid_call_fails_waiting_calls():
    async def main():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", DOOMED_SERVER, ECHO_IDL, stdout=asyncio.subprocess.PIPE)
        try:
            address = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
            assert address.startswith(LOCALHOST), address
            async with async_client(Echo, address, timeout=30) as unified, \
                    async_client(Echo, address, protocol="thrift", timeout=30) as native:
                assert await unified.echo("alive") == "alive"
                calls = ([unified.slow(f"u{i}", 20000) for i in range(10)]
                         + [native.slow(f"n{i}", 20000) for i in range(5)]
                         + [unified.nap(f"z{i}", 20000) for i in range(3)])
                waiting = [asyncio.ensure_future(c) for c in calls]
                for _ in range(len(waiting)):
                    line = await asyncio.wait_for(proc.stdout.readline(), 10)
                    assert line.strip() == b"started", line
                proc.kill()
                outcomes = await asyncio.wait_for(
                    asyncio.gather(*waiting, return_exceptions=True), 10)
                for outcome in outcomes:
                    assert isinstance(outcome, TransportError), outcome
                    assert not isinstance(outcome, CallTimeout), outcome
                # and later calls fail promptly too (nothing listens any more)
                with pytest.raises(TransportError):
                    await asyncio.wait_for(unified.echo("dead"), 5)
        finally:
            if proc.returncode is None:
                proc.kill()
            await asyncio.wait_for(proc.wait(), 10)

    run(main())


@pytest.mark.parametrize("method", ["slow", "nap", "echo"])
@pytest.mark.parametrize("framing", ["unified", "framed", "unframed"])
def test_a_peer_that_half_closes_still_gets_its_answers(framing, method):
    """``nc -N`` and many scripted clients send their request and shut their
    sending side: the answers to what they sent still come, then the server closes."""
    args = (Echo.echo_args(text="hi") if method == "echo"
            else getattr(Echo, f"{method}_args")(text="hi", delay_ms=50))

    async def main():
        async with serving(echo_services()) as server, \
                raw_connection(server.address) as raw:
            if framing == "unified":
                data = unified_request(method, args, 5)
            else:
                message = codec.encode_message(method, TMessageType.CALL, 5, args)
                data = protocol.encode_framed(message) if framing == "framed" else message
            raw.writer.write(data)
            raw.writer.write_eof()
            received = b""
            while True:                       # everything up to the server's close
                chunk = await raw.read_raw(timeout=5)
                if not chunk:
                    break
                received += chunk
            if framing == "unified":
                frames = protocol.FrameDecoder().feed(received)
                assert [decode_body(f, Echo)[3].success for f in frames] == ["hi"]
            else:
                message = received[4:] if framing == "framed" else received
                assert codec.decode_message(message, Echo)[3].success == "hi"

    run(main())


def test_nothing_after_a_frame_the_server_cannot_trust_is_served():
    """A native message that is no thrift: the call before it is answered, the
    one after it is not run, and the connection closes."""
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler)) as server, \
                raw_connection(server.address) as raw:
            await raw.send(
                framed_request("slow", Echo.slow_args(text="before", delay_ms=100), 1)
                + protocol.encode_framed(b"\x00\x00\x00\x05hello, not thrift")
                + framed_request("notify", Echo.notify_args(text="after"), 3, TMessageType.ONEWAY))
            received = b""
            while True:
                chunk = await raw.read_raw(timeout=5)
                if not chunk:
                    break
                received += chunk
            size = int.from_bytes(received[:4], "big")
            assert len(received) == 4 + size            # one answer, no more
            assert codec.decode_message(received[4:], Echo)[3].success == "before"
            assert handler.notes.empty()

    run(main())


class ExitingHandler(EchoHandler):
    """Handlers that call sys.exit(): a plain one on a business thread, a coroutine on the loop."""

    def echo(self, text: str) -> str:
        if text == "exit":
            raise SystemExit(3)
        return text

    async def slow(self, text: str, delay_ms: int) -> str:
        raise SystemExit(4)


def test_a_handler_calling_sys_exit_fails_its_call_not_the_server():
    """sys.exit() in a handler is the handler's failure: its caller gets an
    error, the other calls on the connection and the server carry on."""
    async def main():
        async with serving(echo_services(ExitingHandler())) as server, \
                async_client(Echo, server.address) as client:
            others = [asyncio.ensure_future(client.echo(f"other {i}")) for i in range(20)]
            with pytest.raises(ApplicationError, match="SystemExit"):
                await client.echo("exit")
            with pytest.raises(ApplicationError, match="SystemExit"):
                await client.slow("exit", 0)
            assert await asyncio.gather(*others) == [f"other {i}" for i in range(20)]
            assert await client.echo("still serving") == "still serving"

    run(main())


def test_a_server_restarted_on_a_new_loop_after_a_stop_that_timed_out_stops_cleanly(caplog):
    """The first stop gives up on a plain handler that never returns, and its loop
    closes; the handler ends later, with no loop to answer on (and no error for
    it); started again on a new loop, the server's next stop neither fails (on
    the first stop's leftovers) nor counts the lost call as in flight."""
    handler = EchoHandler()
    server = _build_server(echo_services(handler), LOCALHOST, 0)

    async def first():
        await server.start()
        async with async_client(Echo, server.address, timeout=20) as client:
            blocked = asyncio.ensure_future(client.block("forever"))
            await wait_until(lambda: handler.entered.qsize() == 1)
            await server.stop(grace=0.1)
            await asyncio.gather(blocked, return_exceptions=True)

    async def second():
        await server.start()
        assert server._in_flight == 0
        async with async_client(Echo, server.address, timeout=20) as client:
            call = asyncio.ensure_future(client.slow("again", 100))
            await wait_until(lambda: handler.slow_started == 1)
            await asyncio.wait_for(server.stop(grace=10), 15)
            assert await call == "again"
        assert server._in_flight == 0

    run(first())
    business = [t for t in threading.enumerate() if t.name.startswith("octo-biz-")]
    handler.release.set()      # (its answer has no loop to go to)
    for thread in business:
        thread.join(5)
    assert "Event loop is closed" not in caplog.text
    run(second())


def test_a_handler_that_stops_its_own_server_gets_its_answer_out_and_the_stop_completes():
    """An "admin shutdown" method: stop() cannot wait for the call it runs in, so
    it starts the stop and returns; the caller gets the answer, then the server
    stops whole (it waited out its grace and cancelled itself halfway)."""
    class Stopping(EchoHandler):
        server: octo_core.Server

        async def slow(self, text: str, delay_ms: int) -> str:
            await self.server.stop(grace=10)
            return f"stopping: {text}"

    handler = Stopping()

    async def main():
        async with serving(echo_services(handler)) as server, \
                async_client(Echo, server.address, timeout=20) as client:
            handler.server = server
            assert await client.slow("bye", 0) == "stopping: bye"
            await wait_until(lambda: server.status == NodeStatus.STOPPED,
                             what="the stop the handler started to finish")
            assert server._listener is None and not server._connections

    run(main())


def test_business_threads_cannot_keep_the_process_alive_after_a_stop():
    """A plain handler that never returns cannot be stopped; its thread is a
    daemon, so the process still exits once the server has stopped."""
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler), grace=0.1) as server, \
                async_client(Echo, server.address, timeout=20) as client:
            blocked = asyncio.ensure_future(client.block("forever"))
            await wait_until(lambda: handler.entered.qsize() == 1)
            business = [t for t in threading.enumerate() if t.name.startswith("octo-biz-")]
            assert business and all(t.daemon for t in business)
            await server.stop(grace=0.1)
            with pytest.raises(TransportError):
                await asyncio.wait_for(blocked, 5)
        handler.release.set()

    run(main())


class _GatedHandler(EchoHandler):
    """``slow`` waits for ``gate``: the calls held there all answer in one loop pass."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event = asyncio.Event()

    async def slow(self, text: str, delay_ms: int) -> str:
        self.slow_started += 1
        await self.gate.wait()
        self.slow_finished += 1
        return text


@pytest.mark.parametrize("loop_factory", [new_event_loop, asyncio.new_event_loop],
                         ids=["uvloop", "asyncio"])
def test_a_peer_gone_before_its_big_answers_costs_no_log_line_per_answer(loop_factory, caplog):
    # A peer that sent calls and then went away (its FIN reads as a half-close,
    # which still gets its answers) must not make the server write every answer
    # finishing in the same loop pass to a socket that has already failed:
    # asyncio's own loop logs "socket.send() raised exception." for each one past
    # its fifth, so a peer could make the server log at will.
    handler = _GatedHandler()
    calls, big = 40, "x" * 100_000

    async def main():
        async with serving(echo_services(handler)) as server:
            host, port = server.address.rsplit(":", 1)
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"".join(unified_request("slow", Echo.slow_args(text=big, delay_ms=0), seq)
                                  for seq in range(calls)))
            await writer.drain()
            await wait_until(lambda: handler.slow_started == calls, timeout=10,
                             what="every call to start")
            writer.close()       # gone: the answers meet a closed socket
            [conn] = server._connections
            await wait_until(lambda: conn._input_ended, timeout=10, what="the server to read its FIN")
            handler.gate.set()   # every answer in one loop pass
            await wait_until(lambda: not server._connections, timeout=10,
                             what="the server to drop the connection")
            assert handler.slow_finished == calls

    with caplog.at_level(logging.WARNING):
        run_on(loop_factory, asyncio.wait_for(main(), 30))
    assert not [r for r in caplog.records if "socket.send() raised exception" in r.getMessage()]


class _NamelessTransport(asyncio.Transport):
    """A transport whose peer has no name (a TCP peer that reset before it was
    asked, or any unix socket's), on a socket named ``local``."""

    def __init__(self, local) -> None:
        super().__init__()
        self._local = local

    def get_extra_info(self, name, default=None):
        return self._local if name == "sockname" else default


@pytest.mark.parametrize("local, named", [(("127.0.0.1", 9001), "a peer gone at once"),
                                          ("/run/octo.sock", "/run/octo.sock"),
                                          ("", "unix")])
def test_a_peer_without_a_name_is_not_named_after_the_port(local, named):
    # A TCP peer that reset before its name was asked was logged under the
    # listening address, as if the server had sent the bad bytes itself.
    async def made() -> FramedProtocol:   # (a protocol takes its loop when made)
        conn = FramedProtocol()
        conn.connection_made(_NamelessTransport(local))
        return conn

    conn = run(made())
    assert conn.peer == named and conn.peer_ip is None
