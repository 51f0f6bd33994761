"""Server middleware (``Server(middleware=[...])``): around every call, plain and
coroutine handlers alike, in order, with the call's context; what it raises is
answered as the handler's own exception."""
from __future__ import annotations

from typing import Any, Callable, List, Tuple

import os

import pytest

import octo_core
from octo_core import context
from octo_core.errors import ApplicationError
from octo_core.middleware import is_coroutine_function

from wire_helpers import (CLIENT_APPKEY, HERE, SERVER_APPKEY, Echo, EchoError,  # noqa: F401
                          EchoHandler, async_client, echo_services, run, serving, watchdog)

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


MONITORED = octo_core.load_idl(os.path.join(HERE, "idl", "monitored.thrift"))


class _StoreHandler:
    def status(self) -> str:
        return "ALIVE"

    def put(self, key: str) -> str:
        return key


def test_middleware_leaves_a_service_hosted_beside_the_one_it_extends_unambiguous():
    """``Store`` and its base ``Monitored`` hosted with one handler: a native call of
    the inherited ``status`` by its bare name runs the same handler function
    either way, middleware or not (each service's is wrapped anew: it was
    refused as ambiguous), and goes through the middleware."""
    seen: List[Tuple[Any, ...]] = []

    async def main() -> None:
        handler = _StoreHandler()
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
