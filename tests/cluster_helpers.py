"""Helpers for the cluster-layer tests (``test_routing.py``, ``test_invoker.py``) and
the cluster benchmarks (``benchmarks/bench_routing.py``, ``benchmarks/bench_lb_sim.py``).

* ``node()``: hand-built ``Node`` objects with readable keys;
* ``FakeClock`` / ``FakeTime``: clocks a test moves by hand (breakers, budgets,
  warm-up);
* ``VirtualTimeLoop`` / ``run_virtual()``: an asyncio event loop whose clock
  jumps to the next timer instead of sleeping, so ``asyncio.sleep(5)`` costs
  nothing and every schedule is deterministic (no sockets on it);
* ``ScriptedSend``: a fake ``send(node, remaining)`` for ``Cluster.invoke`` that
  plays per-node behaviours and records every attempt;
* servers for the end-to-end tests: an ``Echo`` handler that says which server
  answered, optionally calling a second service, and a doomed subprocess server.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import selectors
import sys
import time
from typing import (Any, AsyncIterator, Awaitable, Callable, Dict, List, Mapping, Optional,
                    Sequence)

import octo_core
from octo_core.registry.node import Node
from octo_core.transport.loop import new_event_loop

HERE = os.path.dirname(os.path.abspath(__file__))
ECHO_IDL = os.path.join(HERE, "idl", "echo.thrift")
echo_thrift = octo_core.load_idl(ECHO_IDL, module_name="octo_cluster_echo_thrift")
Echo = echo_thrift.Echo
EchoError = echo_thrift.EchoError

CALLEE = "com.example.cluster.callee"
CALLER = "com.example.cluster.caller"
LOCALHOST = "127.0.0.1"


# --- nodes -------------------------------------------------------------------------

def node(ip: str, port: int = 9000, **fields: Any) -> Node:
    """A node of ``CALLEE`` at ``ip:port`` (ALIVE, weight 10 unless told)."""
    return Node(appkey=CALLEE, ip=ip, port=port, **fields)


def numbered_nodes(count: int, **fields: Any) -> List[Node]:
    """``count`` nodes ``10.0.x.y:9000`` with distinct keys."""
    return [node(f"10.0.{i // 250}.{i % 250}", **fields) for i in range(count)]


# --- clocks ------------------------------------------------------------------------

class FakeClock:
    """A monotonic clock a test advances by hand: ``clock()``, ``clock.advance(s)``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class FakeTime:
    """Stands in for the ``time`` module of a module under test (``time()`` and friends)."""

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock

    def time(self) -> float:
        return self._clock()

    monotonic = perf_counter = time


# --- virtual time ------------------------------------------------------------------

class _VirtualSelector(selectors.BaseSelector):
    """Never waits: a ``select(timeout)`` moves the loop's clock on by ``timeout``."""

    def __init__(self) -> None:
        self._keys: Dict[int, selectors.SelectorKey] = {}
        self.loop: Optional["VirtualTimeLoop"] = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._keys.pop(fd)

    def select(self, timeout: Optional[float] = None) -> list:
        if timeout is None:
            raise RuntimeError("virtual-time loop: nothing is scheduled and nothing can "
                               "wake it up (a test waits for ever)")
        self.loop._now += max(0.0, timeout)
        return []

    def get_map(self) -> Mapping[int, selectors.SelectorKey]:
        return self._keys

    def close(self) -> None:
        self._keys.clear()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time: when nothing is ready it jumps to the next timer.

    Only timers and callbacks work on it (no sockets, no threads): exactly what
    ``Cluster.invoke`` with a fake ``send`` needs. ``loop.time()`` starts at 0.
    """

    def __init__(self) -> None:
        selector = _VirtualSelector()
        self._now = 0.0
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self._now


def run_on(loop_factory: Callable[[], asyncio.AbstractEventLoop], coro: Awaitable[Any]) -> Any:
    """Run ``coro`` on a new loop from ``loop_factory``, then cancel what is left and
    close the loop: ``asyncio.Runner``'s job, which Python 3.10 (our floor) lacks."""
    loop = loop_factory()
    try:
        return loop.run_until_complete(coro)
    finally:
        try:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:   # (gather of nothing would make its future on another loop)
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            for task in left:   # one that failed as it was cancelled is reported, as asyncio.run does
                if not task.cancelled() and task.exception() is not None:
                    loop.call_exception_handler({
                        "message": "a task left running failed as the loop closed",
                        "exception": task.exception(), "task": task})
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def run_virtual(coro: Awaitable[Any], limit: float = 3600.0) -> Any:
    """Run ``coro`` on a fresh ``VirtualTimeLoop``; fail if it takes more than ``limit``
    virtual seconds (the virtual equivalent of a watchdog)."""
    return run_on(VirtualTimeLoop, asyncio.wait_for(coro, limit))


def run(coro: Awaitable[Any], timeout: float = 20.0) -> Any:
    """Run ``coro`` on a fresh uvloop (real time), bounded by ``timeout`` seconds."""
    return run_on(new_event_loop, asyncio.wait_for(coro, timeout))


async def settle(rounds: int = 5) -> None:
    """Let callbacks scheduled by a cancellation run (no time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


# --- a fake send ---------------------------------------------------------------------

Behaviour = Callable[[Node, float], Awaitable[Any]]


def answer(value: Any = None, after: float = 0.0) -> Behaviour:
    """Reply ``value`` (default ``"ok from <node key>"``) after ``after`` seconds
    (virtual seconds on a ``VirtualTimeLoop``)."""
    async def behave(node: Node, remaining: float) -> Any:
        if after:
            await asyncio.sleep(after)
        return f"ok from {node.key}" if value is None else value
    return behave


def fail(make: Callable[[], BaseException], after: float = 0.0) -> Behaviour:
    """Raise a fresh ``make()`` after ``after`` seconds."""
    async def behave(node: Node, remaining: float) -> Any:
        if after:
            await asyncio.sleep(after)
        raise make()
    return behave


def use_up_time(make: Callable[[], BaseException]) -> Behaviour:
    """Wait out the whole time left, then raise ``make()`` (a call that timed out)."""
    async def behave(node: Node, remaining: float) -> Any:
        await asyncio.sleep(remaining)
        raise make()
    return behave


@dataclasses.dataclass
class Attempt:
    key: str
    remaining: float
    started: float
    outcome: str = "running"     # "ok", "error", "cancelled"
    error: Optional[BaseException] = None


class ScriptedSend:
    """``send(node, remaining)`` playing, for attempt i (0-based), ``by_attempt[i]`` if
    given, else ``behaviours[node.key]``, else ``default``.

    Every attempt is recorded in ``attempts`` with the time left it was given,
    when it started (loop time) and how it ended.
    """

    def __init__(self, behaviours: Optional[Mapping[str, Behaviour]] = None,
                 default: Optional[Behaviour] = None,
                 by_attempt: Sequence[Behaviour] = ()) -> None:
        self.behaviours = dict(behaviours or {})
        self.default = default or answer()
        self.by_attempt = list(by_attempt)
        self.attempts: List[Attempt] = []

    def _behaviour(self, node: Node) -> Behaviour:
        if len(self.attempts) <= len(self.by_attempt):
            return self.by_attempt[len(self.attempts) - 1]
        return self.behaviours.get(node.key, self.default)

    async def __call__(self, node: Node, remaining: float) -> Any:
        attempt = Attempt(node.key, remaining, asyncio.get_running_loop().time())
        self.attempts.append(attempt)
        try:
            result = await self._behaviour(node)(node, remaining)
        except asyncio.CancelledError:
            attempt.outcome = "cancelled"
            raise
        except BaseException as exc:
            attempt.outcome = "error"
            attempt.error = exc
            raise
        attempt.outcome = "ok"
        return result

    @property
    def keys(self) -> List[str]:
        return [a.key for a in self.attempts]

    def __len__(self) -> int:
        return len(self.attempts)


# --- end-to-end servers --------------------------------------------------------------

class NamedEcho:
    """``Echo`` handler whose ``echo`` answers ``"<name>:<text>"``, or, given
    ``downstream`` (an ``AsyncClient`` of another ``Echo``), ``"<name>><its answer>"``."""

    def __init__(self, name: str, downstream: Optional[Any] = None) -> None:
        self.name = name
        self.downstream = downstream
        self.calls = 0
        self.contexts: List[Dict[str, str]] = []

    async def echo(self, text: str) -> str:
        self.calls += 1
        self.contexts.append(dict(octo_core.context.global_context()))
        if self.downstream is not None:
            return f"{self.name}>{await self.downstream.echo(text)}"
        return f"{self.name}:{text}"

    def fail(self, kind: str) -> str:
        if kind == "declared":
            raise EchoError(message="refused on purpose", code=7)
        raise ValueError(kind)

    def ping(self) -> None:
        return None

    def notify(self, text: str) -> None:
        return None

    async def slow(self, text: str, delay_ms: int) -> str:
        await asyncio.sleep(delay_ms / 1000.0)
        return f"{self.name}:{text}"

    def nap(self, text: str, delay_ms: int) -> str:
        time.sleep(delay_ms / 1000.0)
        return f"{self.name}:{text}"

    def block(self, text: str) -> str:
        return text

    def whoami(self) -> str:
        return self.name


@contextlib.asynccontextmanager
async def echo_servers(handlers: Sequence[Any], *, appkey: str = CALLEE,
                       nodes: Optional[Sequence[Mapping[str, Any]]] = None,
                       registry: Optional[str] = None) -> AsyncIterator[List[Any]]:
    """One ``Server`` per handler on 127.0.0.1 (free ports), always stopped.

    ``nodes[i]`` are the ``Node`` fields of server i when it registers in ``registry``.
    """
    from octo_core.server import Server
    servers: List[Server] = []
    try:
        for i, handler in enumerate(handlers):
            server = Server(appkey, LOCALHOST, 0, registry=registry,
                            node=dict(nodes[i]) if nodes else None, unregister_delay=0.0)
            server.add_service(Echo, handler)
            servers.append(server)
            await server.start()
        yield servers
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.stop(grace=1.0), 5)


# A server in its own process, so a test can kill it with SIGKILL. Prints its port.
DOOMED_SERVER = r"""
import asyncio, sys
import octo_core
from octo_core.server import Server
from octo_core.transport.loop import new_event_loop

echo = octo_core.load_idl(sys.argv[1], module_name="doomed_echo_thrift")
name = sys.argv[2]

class Handler:
    async def echo(self, text): return f"{name}:{text}"
    def fail(self, kind): raise ValueError(kind)
    def ping(self): return None
    def notify(self, text): return None
    async def slow(self, text, delay_ms):
        await asyncio.sleep(delay_ms / 1000.0)
        return f"{name}:{text}"
    def nap(self, text, delay_ms): return text
    def block(self, text): return text
    def whoami(self): return name

async def main():
    server = Server("com.example.cluster.callee", "127.0.0.1", 0)
    server.add_service(echo.Echo, Handler())
    await server.start()
    print(server.port, flush=True)
    await asyncio.sleep(120)      # killed long before; never outlives a stuck test

loop = new_event_loop()
loop.run_until_complete(main())
"""


@contextlib.asynccontextmanager
async def doomed_server(name: str) -> AsyncIterator[Any]:
    """A server process (``proc``, with ``proc.port``) that the test may SIGKILL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DOOMED_SERVER, ECHO_IDL, name, stdout=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        if not line.strip():
            raise AssertionError("the subprocess server did not start")
        proc.port = int(line)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 10)
