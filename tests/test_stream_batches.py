"""FramedProtocol.send's growing batches against what may happen mid-burst: reads
of one or many frames, coroutines sending at once, the transport's flow control
pausing and resuming writes, the transport closing under it, a graceful close.
Whatever happens, frames leave in the order they were sent, none is written
after the connection is closed, and none sent before a graceful close is lost."""
from __future__ import annotations

import asyncio
import random
from typing import List

import pytest

from octo_core.errors import OctoError
from octo_core.transport.stream import WRITE_BATCH, FramedProtocol

from wire_helpers import (Echo, EchoHandler, RawConnection, async_client, decode_body,
                          echo_services, run, serving, unified_request, wait_until)


class _Transport(asyncio.Transport):
    """Records every write; emulates a write buffer with flow control (the peer
    reads ``drain`` bytes when told to), and a close."""

    def __init__(self, protocol: FramedProtocol, high: int = 4096) -> None:
        super().__init__()
        self.protocol = protocol
        self.writes: List[bytes] = []
        self.buffered = 0
        self.high = high
        self.paused = False
        self.closing = False
        self.written_while_closing = 0

    def write(self, data) -> None:
        if self.closing:
            self.written_while_closing += 1
            return
        self.writes.append(bytes(data))
        self.buffered += len(data)
        if not self.paused and self.buffered > self.high:
            self.paused = True
            self.protocol.pause_writing()

    def drain(self) -> None:
        self.buffered = 0
        if self.paused:
            self.paused = False
            self.protocol.resume_writing()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default


class _Conn(FramedProtocol):
    """Answers each frame read with ``reply:`` and its body; records every send."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: List[bytes] = []
        self.write_paused = False

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.sent.append(data)
        FramedProtocol.send(self, data)

    def frames_received(self, frames) -> None:
        for frame in frames:
            self.send(b"reply:" + bytes(frame.body))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False


def _framed(tag: bytes) -> bytes:
    body = b"\x80\x01\x00\x01" + tag
    return len(body).to_bytes(4, "big") + body


async def _burst(conn: _Conn, transport: _Transport, rng: random.Random, close_at: int) -> None:
    """Coroutines sending small and large frames, reads of 1..20 frames, the peer
    draining now and then, and (at step ``close_at``) a graceful close."""
    counter = iter(range(1_000_000))

    async def sender(name: int) -> None:
        for _ in range(rng.randrange(1, 60)):
            size = rng.choice([8, 8, 8, 300, 5000, WRITE_BATCH // 3, WRITE_BATCH + 1])
            conn.send(b"<%d:%d:" % (name, next(counter)) + b"." * size + b">")
            if rng.random() < 0.5:
                await asyncio.sleep(0)

    async def reader() -> None:
        for _ in range(rng.randrange(1, 20)):
            n = rng.choice([1, 1, 2, 5, 20])
            conn.data_received(b"".join(_framed(b"%d" % next(counter)) for _ in range(n)))
            await asyncio.sleep(0)

    async def peer() -> None:
        for _ in range(50):
            if rng.random() < 0.3:
                transport.drain()
            await asyncio.sleep(0)

    async def closer() -> None:
        for _ in range(close_at):
            await asyncio.sleep(0)
        conn.close()

    tasks = [sender(i) for i in range(rng.randrange(1, 12))] + [reader(), peer()]
    if close_at >= 0:
        tasks.append(closer())
    await asyncio.gather(*tasks)
    for _ in range(3):
        await asyncio.sleep(0)


@pytest.mark.parametrize("seed", range(40))
def test_frames_leave_in_the_order_sent_whatever_happens_mid_burst(seed):
    rng = random.Random(seed)
    close_at = rng.choice([-1, -1, 0, 1, 3, 10])

    async def scenario():
        conn = _Conn()
        transport = _Transport(conn)
        conn.connection_made(transport)
        await _burst(conn, transport, rng, close_at)
        if close_at < 0:
            conn.close()
        # every frame sent before the close, in order, and nothing after it
        assert b"".join(transport.writes) == b"".join(conn.sent)
        assert transport.written_while_closing == 0
        assert conn.write_paused == transport.paused

    run(scenario())


@pytest.mark.parametrize("seed", range(20))
def test_nothing_is_written_once_the_transport_is_closing(seed):
    """A write that fails closes the transport at once (connection_lost comes a
    pass later): the batches still being made are dropped, not written."""
    rng = random.Random(seed)

    async def scenario():
        conn = _Conn()
        transport = _Transport(conn)
        conn.connection_made(transport)
        fail_after = rng.randrange(1, 6)
        real_write = transport.write

        def write(data) -> None:
            real_write(data)
            if len(transport.writes) >= fail_after:
                transport.closing = True      # the peer reset: this write failed

        transport.write = write   # type: ignore[method-assign]
        conn.data_received(b"".join(_framed(b"%d" % i) for i in range(200)))
        assert len(transport.writes) == fail_after
        assert b"".join(transport.writes) == b"".join(conn.sent)[:len(b"".join(transport.writes))]
        assert transport.written_while_closing == 0
        # The first send after that read still takes the direct path, unchecked
        # (harmless: a closing transport drops it, and only one per read), the
        # rest of the burst goes through the batches, which check.
        for i in range(100):
            conn.send(b"late%d" % i)
        await asyncio.sleep(0)
        assert len(transport.writes) == fail_after
        assert transport.written_while_closing == 1

    run(scenario())


class _EagerEcho(EchoHandler):
    """``echo`` answered on the loop without suspending: the replies to a read of
    many calls are sent while the read is handled (the batched path)."""

    async def echo(self, text: str) -> str:   # type: ignore[override]
        return text


@pytest.mark.parametrize("proto", ["octo", "thrift"])
def test_a_burst_of_calls_of_mixed_sizes_gets_each_its_own_reply(proto):
    """Small and large frames mixed in one burst (the frame cap and the byte cap
    of the batches both at work), many in flight on one connection."""
    rng = random.Random(7)
    texts = [f"{i}:" + "x" * rng.choice([0, 10, 10, 10, 1000, 20_000, WRITE_BATCH + 5])
             for i in range(600)]

    async def main():
        async with serving(echo_services(_EagerEcho())) as server, \
                async_client(Echo, server.address, protocol=proto, timeout=20) as client:
            for _ in range(2):
                assert await asyncio.gather(*(client.echo(t) for t in texts)) == texts

    run(main())


def test_a_server_stopping_mid_burst_answers_or_fails_each_call_with_a_typed_error():
    async def main():
        async with serving(echo_services(_EagerEcho()), grace=0.0) as server, \
                async_client(Echo, server.address, timeout=10) as client:
            await client.echo("warm")
            answered = []

            async def one(i: int):
                try:
                    text = await client.echo(f"call-{i}" + "y" * (i % 50) * 100)
                except OctoError as exc:
                    return exc
                answered.append(i)
                return text

            calls = [asyncio.ensure_future(one(i)) for i in range(2000)]
            while len(answered) < 100:
                await asyncio.sleep(0)
            await server.stop(grace=0.0)
            results = await asyncio.gather(*calls)
        replies = [(i, r) for i, r in enumerate(results) if isinstance(r, str)]
        assert len(replies) >= 100
        assert all(r == f"call-{i}" + "y" * (i % 50) * 100 for i, r in replies)
        assert all(isinstance(r, (str, OctoError)) for r in results)

    run(main())


def test_replies_to_a_peer_that_reads_slowly_come_in_the_order_of_its_calls():
    """A peer sends thousands of calls at once and reads slowly: the server's
    writes pause it (reading stops, the decoder and backlog hold the rest, read
    on later in batches), and the replies still come out whole, one per call,
    in the calls' order (eager replies are sent as their calls are handled)."""
    count = 3000
    calls = b"".join(unified_request("echo", Echo.echo_args(text=f"{i}:" + "z" * (i % 7) * 900), i)
                     for i in range(count))

    async def main():
        async with serving(echo_services(_EagerEcho())) as server:
            raw = await RawConnection.open(server.address)
            try:
                raw.writer.transport.set_write_buffer_limits(high=4 * len(calls))
                raw.writer.transport.pause_reading()    # replies unread: the server pauses
                raw.writer.write(calls)
                await wait_until(lambda: any(c.reading_paused for c in server._connections),
                                 what="the server's writes to pause")
                raw.writer.transport.resume_reading()
                frames = []
                while len(frames) < count:
                    frames.extend(await raw.read_frames(min(97, count - len(frames)), timeout=20))
                    await asyncio.sleep(0.001)        # a slow reader: the server's writes pause
            finally:
                raw.writer.close()
        seqs = [frame.head.sequence_id for frame in frames]
        assert seqs == list(range(count))
        texts = [decode_body(frame, Echo)[3].success for frame in frames]
        assert texts == [f"{i}:" + "z" * (i % 7) * 900 for i in range(count)]

    run(main())


def test_a_clients_compressed_replies_past_its_inflate_budget_wait_a_pass_and_all_arrive(
        monkeypatch):
    """A client's connections share an inflate budget as a server's do: replies that
    inflate past it (a node's compression bombs, here 2.5 KB each against 3,000
    bytes) wait, still compressed, for the next loop pass; each reaches its call."""
    from octo_core import client as client_module
    from octo_core.transport.client import ClientConnection

    monkeypatch.setattr(client_module, "READ_BATCH", 3000)
    deferred = []
    plain_deferred = ClientConnection.frames_deferred

    def counted(conn: ClientConnection) -> None:
        deferred.append(conn)
        plain_deferred(conn)
    monkeypatch.setattr(ClientConnection, "frames_deferred", counted)

    async def main() -> List[str]:
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address, compression="gzip") as client:
            return await asyncio.gather(*(client.call("echo", f"{i}" + "x" * 2500)
                                          for i in range(8)))

    assert run(main()) == [f"{i}" + "x" * 2500 for i in range(8)]
    assert deferred     # (some waited a pass: else this proves nothing)


def test_replies_held_back_a_pass_leave_no_reply_taken_for_stuck_partway(monkeypatch):
    """Once the compressed replies held back by the client's inflate budget have
    all been read, nothing is still arriving on the connection: a call timing out
    on it later (a slow handler) is not taken for a reply stuck partway, which
    retires a healthy connection with a warning."""
    from octo_core import client as client_module

    monkeypatch.setattr(client_module, "READ_BATCH", 3000)

    async def main() -> None:
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address, compression="gzip") as client:
            texts = [f"{i}" + "x" * 2500 for i in range(8)]
            assert await asyncio.gather(*(client.call("echo", t) for t in texts)) == texts
            (endpoint,) = client._endpoints.values()
            conn = next(c for c in endpoint._conns if c is not None)
            assert conn.frame_started is None
            later = conn.loop.time() + 60.0   # (a call of 1 s timing out then)
            assert conn._stuck(later, 1.0) == ""

    run(main())
