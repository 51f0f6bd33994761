"""How calls are scheduled: coroutine handlers start eagerly, deadlines share one timer.

Each test starts its own Server on 127.0.0.1 port 0 and stops it on the way out.
"""
from __future__ import annotations

import asyncio
import contextvars
import gc
import random
import weakref

import pytest

from octo_core import protocol
from octo_core.errors import CallTimeout
from octo_core.tasks import start_task
from octo_core.transport.client import SWEEP_AT_LEAST, ClientConnection

from wire_helpers import (Echo, EchoHandler, async_client, deaf, echo_services, fake_server,
                          run, serving, watchdog)  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("watchdog")


class TaskAwareHandler(EchoHandler):
    """Coroutine handlers that need to be inside a task from their first line."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks = []

    async def slow(self, text: str, delay_ms: int) -> str:
        me = asyncio.current_task()
        self.tasks.append(me)
        if hasattr(asyncio, "timeout"):         # 3.11+: needs the current task at once
            async with asyncio.timeout(5):
                await asyncio.sleep(delay_ms / 1000)
        else:
            await asyncio.sleep(delay_ms / 1000)
        assert asyncio.current_task() is me
        return text


def test_coroutine_handlers_run_as_tasks_from_their_first_line():
    handler = TaskAwareHandler()

    async def main():
        async with serving(echo_services(handler)) as server, \
                async_client(Echo, server.address) as client:
            assert await client.slow("now", 0) == "now"
            answers = await asyncio.gather(*(client.slow(f"m{i}", i % 3) for i in range(30)))
            assert answers == [f"m{i}" for i in range(30)]
        assert len(handler.tasks) == 31 and all(t is not None for t in handler.tasks)

    run(main())


def test_start_task_finishes_a_coroutine_that_never_suspends_before_returning():
    seen = []

    async def quick():
        seen.append(asyncio.current_task())
        return 7

    async def later():
        await asyncio.sleep(0)
        return 8

    def from_a_callback(loop, coro):
        """Start ``coro`` as the server does: from a protocol callback, outside any task."""
        started = loop.create_future()

        def start():
            task = start_task(loop, coro, contextvars.copy_context())
            started.set_result((task, task.done(), task in asyncio.all_tasks(loop)))
        loop.call_soon(start)
        return started

    async def main():
        loop = asyncio.get_running_loop()
        task, done, _ = await from_a_callback(loop, quick())
        assert done and task.result() == 7 and seen == [task]
        task, done, listed = await from_a_callback(loop, later())
        assert not done and listed              # a suspended eager task is visible
        assert await task == 8
        # inside a task (not the server's case) it still runs, as an ordinary task
        assert await start_task(loop, quick(), contextvars.copy_context()) == 7

    run(main())


def test_eager_task_is_cancelled_like_any_task():
    async def main():
        loop = asyncio.get_running_loop()
        started = loop.create_future()

        async def waits():
            started.set_result(None)
            await asyncio.sleep(30)

        holder = {}
        loop.call_soon(lambda: holder.setdefault(
            "task", start_task(loop, waits(), contextvars.copy_context())))
        await started
        task = holder["task"]
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

    run(main())


async def _returns():
    return "value"


async def _raises():
    raise ValueError("at once")


async def _raises_later():
    await asyncio.sleep(0)
    raise ValueError("later")


async def _cancels_itself_then_returns():
    asyncio.current_task().cancel()
    return "ignored"


async def _cancels_itself_then_waits():
    asyncio.current_task().cancel()
    await asyncio.sleep(10)


async def _cancels_itself_and_swallows_it():
    asyncio.current_task().cancel()
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        return "carried on"


async def _raises_cancelled():
    raise asyncio.CancelledError()


@pytest.mark.parametrize("make", [
    _returns, _raises, _raises_later, _cancels_itself_then_returns, _cancels_itself_then_waits,
    _cancels_itself_and_swallows_it, _raises_cancelled])
def test_an_eager_task_ends_as_an_ordinary_task_would(make):
    """However the coroutine ends (a value, an exception at once or later, a
    cancellation of its own task in the first step), the eager task ends in
    the same state as ``loop.create_task`` of the same coroutine."""
    def outcome(task):
        if task.cancelled():
            return "cancelled"
        exc = task.exception()
        return ("raised", type(exc), str(exc)) if exc else ("returned", task.result())

    async def main():
        loop = asyncio.get_running_loop()
        ordinary = loop.create_task(make())
        await asyncio.wait([ordinary])
        started = loop.create_future()
        loop.call_soon(lambda: started.set_result(
            start_task(loop, make(), contextvars.copy_context())))   # from a callback
        eager = await started
        await asyncio.wait([eager])
        assert outcome(eager) == outcome(ordinary)

    run(main())


def test_deadlines_fire_in_time_order_whatever_order_the_calls_were_made():
    async def main():
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address, timeout=5.0) as client:
            finished = []

            async def call(name, timeout):
                try:
                    await client.call("slow", name, 2000, timeout=timeout)
                except CallTimeout:
                    finished.append(name)

            # the long deadline is armed first; the short one must re-arm the timer
            await asyncio.gather(call("long", 0.6), call("short", 0.05), call("mid", 0.3))
            assert finished == ["short", "mid", "long"]
            assert await client.echo("still fine") == "still fine"

    run(main())


def test_answered_calls_do_not_pile_up_deadlines():
    async def main():
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address, timeout=30.0) as client:
            for _ in range(10):
                await asyncio.gather(*(client.echo(str(i)) for i in range(500)))
            (endpoint,) = client._endpoints.values()
            conn = endpoint._conns[0]
            # 5000 answered calls, each with a 30 s deadline: the heap is pruned
            assert len(conn._deadlines) <= 2 * len(conn._pending) + 1024 + 1
            assert not conn._pending
            # and after pruning it is still a heap: deadlines fire in time order
            finished = []

            async def call(name, timeout):
                with pytest.raises(CallTimeout):
                    await client.call("slow", name, 2000, timeout=timeout)
                finished.append(name)

            await asyncio.gather(*(call(f"t{i}", 0.05 + 0.02 * (i * 7 % 10)) for i in range(10)))
            assert finished == [f"t{i}" for i in sorted(range(10), key=lambda i: i * 7 % 10)]

    run(main())


def test_an_answered_call_is_not_kept_alive_by_its_deadline():
    async def main():
        conn = ClientConnection("127.0.0.1:1", 1 << 20)
        future = conn.expect(7, 3600.0, "echo")
        conn.data_received(protocol.encode_framed_message(
            "echo", 2, 7, Echo.echo_result(success="x" * 1000)))
        assert future.done() and not conn._pending
        answer = weakref.ref(future)
        del future
        gc.collect()
        assert answer() is None      # the hour-long deadline no longer holds the reply
        conn._fail_pending("test over")

    run(main())


def test_pruned_deadlines_stay_a_heap():
    async def main():
        conn = ClientConnection("127.0.0.1:1", 1 << 20)
        rng = random.Random(7)
        futures = [conn.expect(seq, rng.uniform(10, 20), "m") for seq in range(3000)]
        for future in rng.sample(futures, 2500):      # answered or given up
            future.cancel()
        conn._prune_deadlines()
        heap = conn._deadlines
        assert len(heap) == 500 and len(conn._pending) == 500
        assert all(heap[(i - 1) // 2] <= heap[i] for i in range(1, len(heap)))
        conn._fail_pending("test over")
        for future in futures:   # (read: else each logs "exception was never retrieved")
            if not future.cancelled():
                future.exception()

    run(main())


class _RecordingTransport(asyncio.Transport):
    """Keeps what is written, one entry per ``write`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = []

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def get_extra_info(self, name, default=None):
        return default

    def is_closing(self) -> bool:
        return False


def test_writes_leave_at_once_then_in_growing_batches_until_the_next_read():
    from octo_core.transport.stream import FramedProtocol

    class Conn(FramedProtocol):
        def frames_received(self, frames):
            for frame in frames:
                self.send(b"reply:" + bytes(frame.body))

    async def scenario():
        conn = Conn()
        transport = _RecordingTransport()
        conn.connection_made(transport)
        conn.send(b"a")                      # the first write since a read: at once
        assert transport.writes == [b"a"]
        conn.send(b"b")                      # then batches of 1, 2, 4, ...
        conn.send(b"c")
        assert transport.writes == [b"a", b"b"]
        conn.send(b"d")
        assert transport.writes == [b"a", b"b", b"cd"]
        conn.send(b"e")                      # a batch not full: at the iteration's end
        assert len(transport.writes) == 3
        await asyncio.sleep(0)
        assert transport.writes[3:] == [b"e"]
        conn.send(b"f")                      # still no read since: held again
        assert len(transport.writes) == 4
        await asyncio.sleep(0)
        assert transport.writes[4:] == [b"f"]
        # the replies to a read of many frames: a new burst, its first alone
        framed = b"".join(len(body).to_bytes(4, "big") + body
                          for body in (b"\x80\x01\x00\x01x", b"\x80\x01\x00\x01y",
                                       b"\x80\x01\x00\x01z"))
        conn.data_received(framed)
        assert transport.writes[5:] == [b"reply:\x80\x01\x00\x01x",
                                        b"reply:\x80\x01\x00\x01y" + b"reply:\x80\x01\x00\x01z"]
        conn.send(b"g")                      # a read happened: the next write is at once
        assert transport.writes[7:] == [b"g"]
        await asyncio.sleep(0)
        assert len(transport.writes) == 8

    run(scenario())


def test_a_long_burst_leaves_in_growing_batches_so_the_peer_starts_on_it_early():
    """Calls or replies made in one burst go out as they are made, in batches of
    FIRST_BATCH_FRAMES, then twice as many each time up to WRITE_BATCH_FRAMES,
    not all at the burst's end: the peer works on the first while the rest are
    being made, and a long burst takes few writes. A read starts a new burst."""
    from octo_core.transport.stream import (FIRST_BATCH_FRAMES, WRITE_BATCH_FRAMES,
                                            FramedProtocol)

    class Conn(FramedProtocol):
        def frames_received(self, frames):
            for frame in frames:
                self.send(bytes(frame.body))

    sizes, size = [], FIRST_BATCH_FRAMES
    while sum(sizes) < 3 * WRITE_BATCH_FRAMES:
        sizes.append(size)
        size = min(2 * size, WRITE_BATCH_FRAMES)
    bodies = [b"\x80\x01\x00\x01" + i.to_bytes(2, "big") for i in range(sum(sizes) + 1)]
    batches, at = [], 0
    for size in sizes:
        batches.append(b"".join(bodies[at:at + size]))
        at += size

    async def scenario():
        conn = Conn()
        transport = _RecordingTransport()
        conn.connection_made(transport)
        conn.send(b"first")                          # the burst's first: at once
        for body in bodies:
            conn.send(body)
        assert transport.writes == [b"first", *batches]
        assert sizes[-1] == sizes[-2] == WRITE_BATCH_FRAMES    # (the growth stopped)
        await asyncio.sleep(0)                       # the rest at the iteration's end
        assert transport.writes[1 + len(batches):] == [bodies[-1]]
        # the replies to a read of many calls: a new burst, in the same batches
        transport.writes.clear()
        conn.data_received(b"".join(len(body).to_bytes(4, "big") + body for body in bodies))
        assert transport.writes == [*batches, bodies[-1]]

    run(scenario())


def test_the_reply_to_a_lone_frame_leaves_while_it_is_handled():
    """One call in flight: its reply is written as it is sent, not held until the
    handling (the server's bookkeeping after an eager handler's answer) is over."""
    from octo_core.transport.stream import FramedProtocol

    left_by_then = []

    class Conn(FramedProtocol):
        def frames_received(self, frames):
            for frame in frames:
                self.send(b"reply:" + bytes(frame.body))
            left_by_then.append(list(transport.writes))   # the rest of the handling

    async def scenario():
        conn = Conn()
        conn.connection_made(transport)
        conn.data_received(b"\x00\x00\x00\x05\x80\x01\x00\x01x")
        assert left_by_then == [[b"reply:\x80\x01\x00\x01x"]]
        assert transport.writes == [b"reply:\x80\x01\x00\x01x"]

    transport = _RecordingTransport()
    run(scenario())


def test_callers_that_give_up_on_a_silent_node_leave_nothing_piling_up():
    """Callers with wait_for()s of their own, on a node that reads and never
    answers, under a 60 s client timeout: their entries and deadlines were kept
    until a reply or the 60 s (about 400 B a call, at the rate callers give up).
    They are swept as calls come: what is kept stays proportional to the calls
    really waiting."""
    async def main():
        async with fake_server(deaf) as address, \
                async_client(Echo, address, timeout=60.0) as client:
            for _ in range(20):
                await asyncio.gather(*(asyncio.wait_for(client.echo("x"), 0.001)
                                       for _ in range(500)), return_exceptions=True)
            (endpoint,) = client._endpoints.values()
            conn = endpoint._conns[0]
            # 10,000 calls given up: at most a sweep's worth is left
            assert len(conn._pending) <= 2 * SWEEP_AT_LEAST
            assert len(conn._deadlines) <= 2 * len(conn._pending) + 1024 + 1 + 500

    run(main())
