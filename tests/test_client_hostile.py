"""The client against broken or hostile servers: what a node sends can fail the
calls on its connection, with typed errors, but never break the client (an
unhandled exception, a log it floods) nor keep it off the node once it serves again.

(test_wire_faults.py has the older cases: garbage, request frames, bad bodies,
replies that stop partway, servers that read nothing.)
"""
from __future__ import annotations

import asyncio
import logging
import struct

import pytest

from octo_core import _codec, protocol
from octo_core.errors import CallTimeout, TransportError
from octo_core.protocol import HeartbeatInfo, NodeStatus

from octo_core.transport import client as transport_client

from wire_helpers import (Echo, SyncEchoHandler, async_client, deaf, echo_reply,
                          fake_server, frames_read, fresh_throttle, run,
                          thriftpy2_server, wait_until,
                          watchdog)  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("watchdog")

#: These tests look at one node's connections: the circuit breaker stays out of it.
NO_BREAKER = {"consecutive_failures": 10 ** 9, "min_calls": 10 ** 9}


def _calls(answer):
    """A fake server's handler: each call frame (heartbeats aside) is answered with
    ``answer(frame, writer, connection_number)`` (a coroutine), in turn."""
    connections = 0

    async def handle(reader, writer):
        nonlocal connections
        connections += 1
        number = connections
        async for frame in frames_read(reader):
            if frame.head is None or frame.head.message_type == protocol.MessageType.NORMAL:
                await answer(frame, writer, number)
    return handle


def _close_notice(heartbeat: bytes) -> bytes:
    """A close notice (a reply with sequenceId -1) whose heartbeatInfo is the raw
    struct ``heartbeat`` (with its stop byte)."""
    response_info = b"\x0a\x00\x01" + struct.pack("!q", -1) + b"\x03\x00\x02\x00\x00"
    head = (b"\x03\x00\x01\x01" + b"\x0c\x00\x03" + response_info
            + b"\x0c\x00\x07" + heartbeat + b"\x00")
    return _codec.encode_frame(protocol.DEFAULT_FLAGS, len(head), head)


@pytest.mark.parametrize("heartbeat", [
    b"\x00",                                                               # no status (required)
    b"\x0b\x00\x01" + struct.pack("!i", 2) + b"\xff\xfe"
    + b"\x08\x00\x04" + struct.pack("!i", 3) + b"\x00",                    # appkey not UTF-8
], ids=["status-missing", "appkey-not-utf8"])
def test_a_close_notice_that_does_not_decode_drops_the_connection_as_a_bad_header(
        heartbeat, caplog):
    """The header reader skips heartbeatInfo; a notice whose heartbeatInfo does not
    decode escaped frames_received (asyncio logged 'Fatal error on transport' with
    the traceback). It is a bad header: the call waiting on the connection fails
    with a TransportError saying so, and the next call reconnects."""
    async def answer(frame, writer, number):
        writer.write((_close_notice(heartbeat) if number == 1 else b"")
                     + echo_reply(frame, "answer"))

    async def main():
        async with fake_server(_calls(answer)) as address, \
                async_client(Echo, address, timeout=5, breaker=NO_BREAKER) as client:
            with pytest.raises(TransportError, match="bad unified header") as info:
                await client.echo("first")
            assert not isinstance(info.value, CallTimeout)
            assert (info.value.method, info.value.node) == ("echo", address)
            assert await client.echo("second") == "answer"

    with caplog.at_level(logging.WARNING):
        run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_close_notice_repeated_is_logged_once(monkeypatch, caplog):
    """A node may send the notice as often as it likes: one log line per connection,
    not one per notice (a few kilobytes made thousands of lines)."""
    fresh_throttle(monkeypatch, "_NOTICED", transport_client)   # (none held back before)
    notice = protocol.encode_unified(protocol.response_header(
        protocol.CLOSE_NOTICE_SEQUENCE, message_type=protocol.MessageType.NORMAL_HEARTBEAT,
        heartbeat=HeartbeatInfo(status=NodeStatus.STOPPING)), b"")

    async def answer(frame, writer, number):
        writer.write(notice * 1000 + echo_reply(frame, "answer"))

    async def main():
        async with fake_server(_calls(answer)) as address, \
                async_client(Echo, address, timeout=5) as client:
            assert await client.echo("x") == "answer"

    with caplog.at_level(logging.INFO, logger="octo_core"):
        run(main())
    assert sum("takes no new calls" in r.getMessage() for r in caplog.records) == 1


def test_a_stopping_notice_is_logged_after_an_idle_close_notice_from_the_same_node(
        monkeypatch, caplog):
    """The close notices' records are throttled per node and reason: that a node
    closed an idle connection does not hold back, for a period, the record that
    it is stopping (an operator would not see the node's stop in the log)."""
    fresh_throttle(monkeypatch, "_NOTICED", transport_client)

    def notice(status: int) -> bytes:
        return protocol.encode_unified(protocol.response_header(
            protocol.CLOSE_NOTICE_SEQUENCE, message_type=protocol.MessageType.NORMAL_HEARTBEAT,
            heartbeat=HeartbeatInfo(status=status)), b"")

    async def answer(frame, writer, number):   # the first connection idle, the next stopping
        status = NodeStatus.ALIVE if number == 1 else NodeStatus.STOPPING
        writer.write(echo_reply(frame, "answer") + notice(status))

    async def main():
        async with fake_server(_calls(answer)) as address, \
                async_client(Echo, address, timeout=5) as client:
            assert await client.echo("x") == "answer"
            await wait_until(lambda: "takes no new calls" in caplog.text, what="the first notice")
            assert await client.echo("y") == "answer"
            await wait_until(lambda: "is stopping" in caplog.text, what="the second notice")

    with caplog.at_level(logging.INFO, logger="octo_core"):
        run(main())
    said = [r.getMessage() for r in caplog.records if "takes no new calls" in r.getMessage()]
    assert len(said) == 2 and "closes an idle connection" in said[0] and "is stopping" in said[1]


def test_closing_the_client_while_a_heartbeat_waits_says_nothing_of_the_node(caplog):
    """The heartbeat's reply fails as the client closes: no warning that the node
    left it unanswered."""
    heard = []

    async def handle(reader, writer):
        async for frame in frames_read(reader):
            if frame.head.message_type == protocol.MessageType.NORMAL:
                writer.write(echo_reply(frame, "answer"))
            else:
                heard.append(frame)       # a heartbeat: never answered

    async def main():
        async with fake_server(handle) as address:
            async with async_client(Echo, address, heartbeat_interval=0.1) as client:
                assert await client.echo("x") == "answer"
                await wait_until(lambda: heard, what="a heartbeat")

    with caplog.at_level(logging.WARNING, logger="octo_core"):
        run(main())
    assert "unanswered" not in caplog.text


@pytest.mark.parametrize("proto", ["octo", "thrift"])
def test_a_reply_trickling_in_does_not_hold_its_connection_for_good(proto):
    """The first connection sends its reply a byte at a time, each well within half
    a call's timeout: the check for a reply that stopped partway (nothing read for
    that long) never fires, nor do heartbeats (something is read). The call times
    out, and as the reply had been arriving for all of its wait, new calls go to a
    new connection, and are answered."""
    async def answer(frame, writer, number):
        reply = echo_reply(frame, "x" * 1000)
        if number > 1:
            writer.write(reply)
            return
        for byte in reply:           # ~100 s at this pace
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)

    async def main():
        async with fake_server(_calls(answer)) as address, \
                async_client(Echo, address, timeout=0.5, protocol=proto,
                             breaker=NO_BREAKER) as client:
            with pytest.raises(CallTimeout):
                await client.echo("first")
            assert await client.echo("second") == "x" * 1000

    run(main())


def test_connections_a_node_leaves_stuck_one_after_another_are_logged_sparingly(
        monkeypatch, caplog):
    """A native node that answers nothing: every connection the client opens to it
    is left after two timeouts in a row, and the next one too, as long as the node
    stays stuck (with pool_size connections at once: a busy web tier logged
    dozens of warnings a second). The first is logged; the rest are held back
    and counted in the next record a period later."""
    period_over = fresh_throttle(monkeypatch, "_LEFT", transport_client)

    async def main():
        async with fake_server(deaf) as address, \
                async_client(Echo, address, timeout=0.05, protocol="thrift",
                             breaker=NO_BREAKER) as client:
            for _ in range(8):   # two timeouts in a row leave a connection: 4 left
                with pytest.raises(CallTimeout):
                    await client.echo("unanswered")
            period_over()
            for _ in range(2):
                with pytest.raises(CallTimeout):
                    await client.echo("unanswered")

    with caplog.at_level(logging.WARNING, logger="octo_core"):
        run(main())
    left = [r.getMessage() for r in caplog.records if "new calls go to a new connection" in
            r.getMessage()]
    assert len(left) == 2, left
    assert "(and 3 more since the last such message)" in left[1]


def test_a_native_thrift_connection_stuck_behind_one_call_is_left():
    """Apache's and thriftpy2's threaded servers answer a connection's calls one at
    a time: one handler stuck, every later call on that connection waits behind it.
    Native thrift has no heartbeat: a second call in a row timing out with nothing
    read sends new calls to a new connection (a new server thread), and they are
    answered. (One timeout alone keeps the connection: a call may just be slow.)"""
    handler = SyncEchoHandler()
    with thriftpy2_server(Echo, handler) as (host, port):
        async def main():
            async with async_client(Echo, f"{host}:{port}", timeout=0.3, protocol="thrift",
                                    breaker=NO_BREAKER) as client:
                assert await client.echo("warm") == "warm"
                with pytest.raises(CallTimeout):
                    await client.block("stuck")
                with pytest.raises(CallTimeout):
                    await client.echo("behind it")
                assert await client.echo("elsewhere") == "elsewhere"

        try:
            run(main())
        finally:
            handler.release.set()
