"""``add_service(..., inline=True)``: plain-function handlers run on the event loop.

Each test runs one behaviour on both sides of the choice (business pool, loop),
and the outcome a caller sees must not depend on it; only the thread differs.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, AsyncContextManager, AsyncIterator, Optional, Tuple

import pytest

import octo_core
from octo_core.context import current_span, global_context
from octo_core.errors import ApplicationError, RpcError, Status, TransportError

from wire_helpers import (Calc, CalcHandler, Echo, EchoError, EchoHandler, async_client, run,
                          wait_until)

POOLED, INLINE = False, True


class ThreadRecorder(EchoHandler):
    """Echo whose plain methods say which thread ran them, and what the call carried."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list = []
        self.seen: list = []

    def echo(self, text: str) -> str:
        self.threads.append(threading.get_ident())
        span = current_span()
        self.seen.append((dict(global_context()), span.trace_id if span else None))
        return text

    def fail(self, kind: str) -> str:   # (a plain function that returns a coroutine)
        if kind == "coroutine":
            return self.later(kind)    # type: ignore[return-value]
        return super().fail(kind)

    async def later(self, text: str) -> str:
        await asyncio.sleep(0)
        return f"{text} answered later"


@contextlib.asynccontextmanager
async def _serving(*services: Tuple[Any, Any, Optional[str], bool],
                   **options: Any) -> AsyncIterator[octo_core.Server]:
    """A server of ``services`` (service, handler, name, inline), started and always stopped."""
    server = octo_core.Server("com.example.inline", host="127.0.0.1", port=0, **options)
    for service, handler, name, inline in services:
        server.add_service(service, handler, name, inline=inline)
    await asyncio.wait_for(server.start(), 5)
    try:
        yield server
    finally:
        await asyncio.wait_for(server.stop(grace=1), 6)


def _serving_echo(handler: EchoHandler, inline: bool) -> AsyncContextManager[octo_core.Server]:
    """Echo, ``inline`` or pooled, beside Calc."""
    return _serving((Echo, handler, None, inline), (Calc, CalcHandler(), None, False))


@pytest.mark.parametrize("inline", [POOLED, INLINE], ids=["pooled", "inline"])
def test_where_plain_functions_run_and_what_they_see(inline):
    handler = ThreadRecorder()

    async def main():
        async with _serving_echo(handler, inline) as server:
            async with async_client(Echo, server.address, timeout=5) as client:
                with octo_core.context.use({"octo.swimlane": "lane-a"}):
                    assert await client.echo("hi") == "hi"
                    results = await asyncio.gather(*(client.echo(f"m{i}") for i in range(50)))
                assert results == [f"m{i}" for i in range(50)]
                return threading.get_ident()

    loop_thread = run(main())
    on_loop = {ident == loop_thread for ident in handler.threads}
    assert on_loop == {inline}
    assert len(handler.seen) == 51
    for tags, trace_id in handler.seen:   # the caller's context, on either side
        assert tags == {"octo.swimlane": "lane-a"} and trace_id


@pytest.mark.parametrize("inline", [POOLED, INLINE], ids=["pooled", "inline"])
def test_outcomes_are_the_same_either_way(inline):
    async def main():
        async with _serving_echo(ThreadRecorder(), inline) as server:
            async with async_client(Echo, server.address, timeout=5) as client:
                with pytest.raises(EchoError) as declared:
                    await client.fail("declared")
                assert declared.value.code == 42
                with pytest.raises(ApplicationError, match="boom") as undeclared:
                    await client.fail("undeclared")
                assert undeclared.value.status == Status.APPLICATION_EXCEPTION
                assert await client.fail("coroutine") == "coroutine answered later"
                await client.notify("one way")
                assert await client.echo("after all that") == "after all that"
            return server.stats()["Echo.fail"]

    stats = run(main())
    assert stats["calls"] == 3


def test_inline_calls_are_not_held_by_a_full_business_pool():
    handler = EchoHandler()

    async def main():
        async with _serving((Echo, handler, None, POOLED),
                            (Echo, EchoHandler(), "EchoInline", INLINE),
                            business_threads=1, business_queue=0) as server, \
                async_client(Echo, server.address, timeout=5) as pooled, \
                async_client(Echo, server.address, timeout=5,
                             service_name="EchoInline") as inline:
            blocked = asyncio.ensure_future(pooled.block("b"))
            await wait_until(lambda: handler.entered.qsize() == 1, what="block() to start")
            with pytest.raises(RpcError):   # the pool's one thread is taken, no queue
                await pooled.echo("refused")
            assert await inline.echo("runs on the loop") == "runs on the loop"
            handler.release.set()
            assert await blocked == "b"

    run(main())



class NestingHandler(EchoHandler):
    """``echo`` (a plain function) makes a blocking call of its own, to Calc."""

    inner: octo_core.Client

    def echo(self, text: str) -> str:
        try:
            return f"{text} {self.inner.add(1, 2)}"
        except TransportError as exc:   # the outcome under test
            return f"refused: {exc}"


@pytest.mark.parametrize("inline", [POOLED, INLINE], ids=["pooled", "inline"])
def test_a_blocking_call_from_a_plain_handler_is_refused_only_on_the_loop(inline):
    # on the loop it would stall the server, its own answer included, for as long as it waits
    handler = NestingHandler()

    async def main():
        async with _serving_echo(handler, inline) as server:
            with octo_core.Client(Calc, appkey="com.example.caller",
                                  hosts=[server.address]) as handler.inner:
                async with async_client(Echo, server.address, timeout=5) as client:
                    return await client.echo("nested")

    answer = run(main())
    if inline:
        assert answer.startswith("refused: a blocking call on an octo_core Server's event loop")
        assert "inline" in answer
    else:
        assert answer == "nested 3"


class Exiting(EchoHandler):
    """``echo`` raises what its argument names, a BaseException that is no Exception."""

    def echo(self, text: str) -> str:
        raise {"SystemExit": SystemExit, "GeneratorExit": GeneratorExit}[text]()


@pytest.mark.parametrize("inline", [POOLED, INLINE], ids=["pooled", "inline"])
def test_a_plain_handler_raising_systemexit_or_generatorexit_answers_and_serves_on(inline):
    async def main():
        async with _serving_echo(Exiting(), inline) as server:
            async with async_client(Echo, server.address, timeout=5) as client:
                for kind in ("SystemExit", "GeneratorExit"):
                    with pytest.raises(ApplicationError, match=kind):
                        await client.echo(kind)
                assert await client.whoami() == "Echo"

    run(main())
