"""Middleware. A server's (``Server(middleware=[...])``): around every call, plain
and coroutine handlers alike, in order, with the call's context; what it raises
is answered as the handler's own exception. A client's (``AsyncClient`` and
``Client``, ``middleware=[...]``): around every call, in every call mode, with
the call's own timeout kept inside."""
from __future__ import annotations

from typing import Any, Callable, List, Tuple

import asyncio
import queue

import pytest

import octo_core
from octo_core import context
from octo_core.errors import ApplicationError, CallTimeout, ClientClosed
from octo_core.middleware import is_coroutine_function

from wire_helpers import (CLIENT_APPKEY, MONITORED, SERVER_APPKEY, Echo,  # noqa: F401
                          EchoError, EchoHandler, StoreHandler, async_client, echo_services, run,
                          serving, serving_in_thread, watchdog)

pytestmark = pytest.mark.usefixtures("watchdog")


def recording(tag: str, seen: List[Tuple[Any, ...]]) -> Callable[..., Any]:
    """A middleware noting, per call, its tag, the method, the arguments and the
    caller's appkey, and answering ``refuse`` texts with a declared exception."""
    def layer(service: str, method: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def before(args: Tuple[Any, ...]) -> None:
            caller = context.caller()
            seen.append((tag, service, method, args, caller.appkey if caller else None))
            if args and args[0] == "refuse":
                raise EchoError(message=f"{tag} refused", code=7)

        if is_coroutine_function(call):
            async def run_async(*args: Any) -> Any:
                before(args)
                return f"{tag}({await call(*args)})" if method == "slow" else await call(*args)
            return run_async

        def run_plain(*args: Any) -> Any:
            before(args)
            return f"{tag}({call(*args)})" if method == "echo" else call(*args)
        return run_plain
    return layer


def test_middleware_runs_around_plain_and_coroutine_handlers_first_outermost():
    seen: List[Tuple[Any, ...]] = []
    middleware = [recording("outer", seen), recording("inner", seen)]

    async def main() -> None:
        async with serving(echo_services(), middleware=middleware) as server, \
                async_client(Echo, server.address) as client:
            assert await client.echo("plain") == "outer(inner(plain))"
            assert await client.slow("coroutine", 0) == "outer(inner(coroutine))"
            with pytest.raises(EchoError, match="outer refused"):
                await client.fail("refuse")
            with pytest.raises(ApplicationError, match="boom"):   # the handler's own, through
                await client.fail("undeclared")

    run(main())
    assert seen[:4] == [("outer", "Echo", "echo", ("plain",), CLIENT_APPKEY),
                        ("inner", "Echo", "echo", ("plain",), CLIENT_APPKEY),
                        ("outer", "Echo", "slow", ("coroutine", 0), CLIENT_APPKEY),
                        ("inner", "Echo", "slow", ("coroutine", 0), CLIENT_APPKEY)]
    assert [entry[0] for entry in seen[4:]] == ["outer", "outer", "inner"]


def test_middleware_that_changes_a_handlers_kind_is_refused_when_the_service_is_added():
    def to_plain(service: str, method: str, call: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *args: call(*args)     # a coroutine handler made a plain function

    server = octo_core.Server(SERVER_APPKEY, middleware=[to_plain])
    with pytest.raises(TypeError, match=r"Echo\.slow, whose handler is a coroutine function"):
        server.add_service(Echo, EchoHandler())
    with pytest.raises(TypeError, match="middleware is a list of functions"):
        octo_core.Server(SERVER_APPKEY, middleware=to_plain)   # type: ignore[arg-type]


def test_middleware_leaves_a_service_hosted_beside_the_one_it_extends_unambiguous():
    """``Store`` and its base ``Monitored`` hosted with one handler: a native call of
    the inherited ``status`` by its bare name runs the same handler function
    either way, middleware or not (each service's is wrapped anew: it was
    refused as ambiguous), and goes through the middleware."""
    seen: List[Tuple[Any, ...]] = []

    async def main() -> None:
        handler = StoreHandler()
        async with serving([(MONITORED.Store, handler, None), (MONITORED.Monitored, handler, None)],
                           middleware=[recording("mw", seen)]) as server, \
                async_client(MONITORED.Store, server.address, protocol="thrift") as client:
            assert await client.status() == "ALIVE"

    run(main())
    assert [(tag, method) for tag, _, method, _, _ in seen] == [("mw", "status")]


def test_middleware_given_as_an_iterator_is_applied():
    seen: List[Tuple[Any, ...]] = []

    async def main() -> None:
        async with serving(echo_services(), middleware=iter([recording("once", seen)])) as server, \
                async_client(Echo, server.address) as client:
            assert await client.echo("x") == "once(x)"

    run(main())


# --- client middleware (``AsyncClient(middleware=[...])``, ``Client`` alike) --------------

def client_recording(tag: str, seen: List[Tuple[Any, ...]]) -> Callable[..., Any]:
    """A client middleware noting its tag, the service, the method and the arguments,
    adding ``{tag: method}`` to the request's globalContext, answering ``echo("cached")``
    itself and turning an ``EchoError`` into a ``LookupError``."""
    def layer(service: str, method: str, call: Callable[..., Any]) -> Callable[..., Any]:
        async def run(*args: Any, **kwargs: Any) -> Any:
            seen.append((tag, service, method, args, kwargs))
            if method == "echo" and args == ("cached",):
                return f"{tag}-cache"
            with context.use({tag: method}):
                try:
                    return await call(*args, **kwargs)
                except EchoError as exc:
                    raise LookupError(f"{tag}: {exc.message}") from exc
        return run
    return layer


def context_seen(seen: List[Any]) -> Callable[..., Any]:
    """A server middleware noting the globalContext each call arrives with."""
    def layer(service: str, method: str, call: Callable[..., Any]) -> Callable[..., Any]:
        if is_coroutine_function(call):
            async def run_async(*args: Any) -> Any:
                seen.append(dict(context.global_context()))
                return await call(*args)
            return run_async

        def run_plain(*args: Any) -> Any:
            seen.append(dict(context.global_context()))
            return call(*args)
        return run_plain
    return layer


def test_client_middleware_runs_around_every_call_first_outermost():
    seen: List[Tuple[Any, ...]] = []
    arrived: List[Any] = []
    middleware = [client_recording("outer", seen), client_recording("inner", seen)]

    async def main() -> None:
        async with serving(echo_services(), middleware=[context_seen(arrived)]) as server, \
                async_client(Echo, server.address, middleware=middleware,
                             service_name="Echo") as client:
            assert await client.echo(text="hi") == "hi"
            assert await client.call("slow", "by name", 0) == "by name"
            assert await client.echo("cached") == "outer-cache"   # answered, never sent
            # the inner one translates; the outer sees a LookupError, not its EchoError
            with pytest.raises(LookupError, match="^inner: refused on purpose$") as caught:
                await client.fail("declared")
            assert isinstance(caught.value.__cause__, EchoError)

    run(main())
    assert seen == [("outer", "Echo", "echo", (), {"text": "hi"}),
                    ("inner", "Echo", "echo", (), {"text": "hi"}),
                    ("outer", "Echo", "slow", ("by name", 0), {}),
                    ("inner", "Echo", "slow", ("by name", 0), {}),
                    ("outer", "Echo", "echo", ("cached",), {}),
                    ("outer", "Echo", "fail", ("declared",), {}),
                    ("inner", "Echo", "fail", ("declared",), {})]
    assert arrived == [{"outer": method, "inner": method} for method in ("echo", "slow", "fail")]


def test_client_middleware_keeps_each_calls_own_timeout():
    """``call(name, ..., timeout=)`` still bounds the call inside the middleware;
    a call the middleware makes itself meanwhile gets the client's timeout, not
    the outer call's."""
    inner_calls: List[str] = []

    def with_a_call_of_its_own(service: str, method: str,
                               call: Callable[..., Any]) -> Callable[..., Any]:
        async def run(*args: Any, **kwargs: Any) -> Any:
            if method == "slow":   # a lookup of its own first, slower than the outer timeout
                inner_calls.append(await client.nap("lookup", 300))   # (through it too)
            return await call(*args, **kwargs)
        return run

    async def main() -> None:
        nonlocal client
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address, timeout=5.0,
                             middleware=[with_a_call_of_its_own]) as client:
            with pytest.raises(CallTimeout):
                await client.call("slow", "outer", 2000, timeout=0.2)
            assert inner_calls == ["lookup"]
            assert await client.call("echo", "x", timeout=0.2) == "x"

    client: Any = None
    run(main())


def test_client_middleware_is_refused_unless_it_gives_a_coroutine_function():
    def to_plain(service: str, method: str, call: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *args: call(*args)

    with pytest.raises(TypeError, match=r"Echo\.echo, whose call is a coroutine function"):
        octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, hosts=["127.0.0.1:1"],
                              middleware=[to_plain])
    with pytest.raises(TypeError, match="middleware is a list of functions"):
        octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, hosts=["127.0.0.1:1"],
                              middleware=to_plain)   # type: ignore[arg-type]
    with pytest.raises(TypeError, match="middleware is a list of functions, not 5"):
        octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, hosts=["127.0.0.1:1"],
                              middleware=5)   # type: ignore[arg-type]  # (said: not iterable)


def test_a_closed_client_refuses_before_its_middleware_runs():
    seen: List[Tuple[Any, ...]] = []

    async def main() -> None:
        client = octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, hosts=["127.0.0.1:1"],
                                       middleware=[client_recording("mw", seen)])
        await client.close()
        with pytest.raises(ClientClosed):
            await client.echo("x")

    run(main())
    assert seen == []


def test_blocking_client_middleware_in_every_call_mode():
    seen: List[Tuple[Any, ...]] = []
    answers: "queue.Queue[Any]" = queue.Queue()
    with serving_in_thread(echo_services()) as server, \
            octo_core.Client(Echo, appkey=CLIENT_APPKEY, hosts=[server.address], timeout=2.0,
                             middleware=iter([client_recording("mw", seen)])) as client:
        assert client.echo("sync") == "sync"
        assert client.future.echo("future").result(5) == "future"
        client.callback.echo("callback", callback=answers.put)
        assert answers.get(timeout=5) == "callback"
        assert client.call("echo", "cached", timeout=1.0) == "mw-cache"
        with pytest.raises(CallTimeout):
            client.call("slow", "late", 2000, timeout=0.2)
    assert [args for _, _, _, args, _ in seen] == [("sync",), ("future",), ("callback",),
                                                  ("cached",), ("late", 2000)]


def test_a_graceful_close_lets_a_call_its_middleware_holds_end():
    """``close(grace=)`` lets the calls in flight end: one that a middleware holds when
    the close begins (a concurrency limit, a backoff before its call) is one of
    them; a call made after the close is refused."""
    def holding(service: str, method: str, call: Callable[..., Any]) -> Callable[..., Any]:
        async def run(*args: Any, **kwargs: Any) -> Any:
            held.set()
            await gate.wait()
            return await call(*args, **kwargs)
        return run

    async def main() -> None:
        async with serving(echo_services()) as server:
            client = octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, hosts=[server.address],
                                           timeout=5.0, middleware=[holding])
            call = asyncio.ensure_future(client.echo("held"))
            await asyncio.wait_for(held.wait(), 5)
            closing = asyncio.ensure_future(client.close(grace=10.0))
            await asyncio.sleep(0.05)   # (the close begun: new calls refused)
            with pytest.raises(ClientClosed):
                await client.echo("new")
            assert not closing.done()
            gate.set()
            assert await asyncio.wait_for(call, 5) == "held"
            await asyncio.wait_for(closing, 5)

    held, gate = asyncio.Event(), asyncio.Event()
    run(main())
