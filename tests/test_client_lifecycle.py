"""The client's life cycle: callbacks on the I/O thread, close() racing calls and
connects, a client used from another event loop, a constructor that fails, and
the loop thread under it.

Connects that never finish are made by replacing ``Endpoint._connect`` with one
that waits until it is cancelled: no misbehaving peer, nothing timed.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import pickle
import math
import re
import sys
import threading
import warnings
from typing import Any, List, Tuple

import pytest

import octo_core
from octo_core import blocking_client
from octo_core.errors import CallTimeout, ClientClosed, TransportError
from octo_core.transport.client import Endpoint
from octo_core.transport.loop import LoopThread

from wire_helpers import (CLIENT_APPKEY, Echo, EchoHandler, async_client, fake_server,  # noqa: F401
                          echo_services, run, serving, serving_in_thread, sync_client,
                          wait_until, wait_until_sync, watchdog)

pytestmark = pytest.mark.usefixtures("watchdog")

#: An address nothing is asked of: every connect to it hangs (see HungConnects).
NOWHERE = "127.0.0.1:9"


class HungConnects:
    """Every connect waits until cancelled; counts those started and cancelled."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = 0
        self.cancelled = 0

        async def hung(endpoint: Endpoint, loop: asyncio.AbstractEventLoop) -> Any:
            self.started += 1
            try:
                await loop.create_future()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        monkeypatch.setattr(Endpoint, "_connect", hung)


def assert_closed_error(error: BaseException) -> None:
    assert isinstance(error, ClientClosed), repr(error)
    assert error.message == "client is closed" and error.request_sent is False


def client_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "octo-client"]


# --- callbacks run on the client's I/O thread ---------------------------------------

def test_a_blocking_call_in_a_callback_fails_at_once_and_the_client_goes_on():
    with serving_in_thread(echo_services()) as server, \
            sync_client(Echo, server.address) as client:
        outcomes: "concurrent.futures.Future[Any]" = concurrent.futures.Future()

        def chained(first: Any) -> None:
            try:
                client.echo("from the callback")
            except Exception as exc:  # the outcome under test
                outcomes.set_result((first, exc))

        client.callback.echo("first", callback=chained)
        first, error = outcomes.result(5)
        assert first == "first"
        assert isinstance(error, TransportError) and error.request_sent is False
        assert "client.future" in str(error)
        # The I/O thread was never blocked: other callers go on.
        assert client.echo("after") == "after"


class NestingHandler(EchoHandler):
    """``slow`` (a coroutine handler, run on the server's loop) makes a blocking call."""

    def __init__(self) -> None:
        super().__init__()
        self.inner: Any = None

    async def slow(self, text: str, delay_ms: int) -> str:
        try:
            return self.inner.echo(text)
        except TransportError as exc:   # the outcome under test
            return f"refused: {exc}"


def test_a_blocking_call_on_a_servers_event_loop_is_refused_at_once():
    handler = NestingHandler()
    with serving_in_thread(echo_services(handler)) as server, \
            sync_client(Echo, server.address, timeout=30) as client, \
            sync_client(Echo, server.address) as handler.inner:
        assert client.slow("nested", 0).startswith(
            "refused: a blocking call on an octo_core Server's event loop")

        async def on_another_loop() -> str:   # (as in Jupyter): no server to stop there
            return handler.inner.echo("not refused")
        assert asyncio.run(on_another_loop()) == "not refused"


def test_a_loop_whose_servers_stopped_takes_blocking_calls_again():
    with serving_in_thread(echo_services()) as server, \
            sync_client(Echo, server.address) as client:
        async def around_a_server() -> Tuple[str, str]:
            local = octo_core.Server(appkey="com.example.local", host="127.0.0.1", port=0)
            local.add_service(Echo, EchoHandler())
            await local.start()
            try:
                client.echo("serving")
            except TransportError as exc:
                during = str(exc)
            await local.stop(grace=0)
            return during, client.echo("stopped")
        during, after = asyncio.run(around_a_server())
        assert "octo_core Server's event loop" in during and after == "stopped"


def test_a_callback_chains_calls_through_callback_mode():
    with serving_in_thread(echo_services()) as server, \
            sync_client(Echo, server.address) as client:
        second: "concurrent.futures.Future[Any]" = concurrent.futures.Future()
        client.callback.echo("one", callback=lambda first: client.callback.echo(
            f"{first} two", callback=second.set_result))
        assert second.result(5) == "one two"


def test_close_from_a_callback_closes_without_waiting_for_itself():
    with serving_in_thread(echo_services()) as server:
        client = octo_core.Client(Echo, appkey=CLIENT_APPKEY, hosts=[server.address])
        closed: "concurrent.futures.Future[Any]" = concurrent.futures.Future()

        def close(_: Any) -> None:
            try:
                client.close()
            except Exception as exc:  # a failure to report, not to lose in the loop's log
                closed.set_exception(exc)
            else:
                closed.set_result(None)

        client.callback.echo("bye", callback=close)
        closed.result(5)
        wait_until_sync(client._thread.loop.is_closed, what="the client's loop to close")
        with pytest.raises(TransportError, match="client is closed"):
            client.echo("after close")


def test_a_blocking_call_gives_up_on_a_stuck_io_thread(monkeypatch):
    monkeypatch.setattr(blocking_client, "_LOOP_MARGIN", 0.1)
    release = threading.Event()
    with serving_in_thread(echo_services()) as server, \
            sync_client(Echo, server.address, timeout=0.1) as client:
        try:
            # A callback that blocks the I/O thread (as a done-callback stuck in user code would).
            entered = threading.Event()

            def stuck() -> None:
                entered.set()
                release.wait(10)
            client._thread.loop.call_soon_threadsafe(stuck)
            assert entered.wait(5)
            with pytest.raises(CallTimeout, match="I/O thread") as caught:
                client.echo("waits for a stuck thread")
            assert caught.value.method == "echo"
        finally:
            release.set()


def test_close_gives_up_on_a_stuck_io_thread_without_waiting_twice(monkeypatch):
    monkeypatch.setattr(blocking_client, "_CLOSE_WAIT", 0.1)
    release = threading.Event()
    with serving_in_thread(echo_services()) as server:
        client = octo_core.Client(Echo, appkey=CLIENT_APPKEY, hosts=[server.address])
        try:
            entered = threading.Event()
            client.callback.echo("x", callback=lambda _: (entered.set(), release.wait(10)))
            assert entered.wait(5)
            with pytest.raises(TransportError, match=f"I/O thread .*ident {client._thread.ident}"):
                client.close()
            # it raised while the thread is still held: no wait for it to end either
            assert client._thread._thread.is_alive()
        finally:
            release.set()
        wait_until_sync(lambda: not client._thread._thread.is_alive(),
                        what="the freed I/O thread to close the client and end")
        wait_until_sync(lambda: not server._connections, what="its connection to close")
        assert client._async._closed   # closed by its own close(), not torn down with the loop


# --- close() while calls are connecting ----------------------------------------------

def test_sync_close_while_connecting_fails_every_caller_with_client_is_closed(monkeypatch):
    connects = HungConnects(monkeypatch)
    client = octo_core.Client(Echo, appkey=CLIENT_APPKEY, hosts=[NOWHERE],
                              timeout=60, connect_timeout=60)
    called: "concurrent.futures.Future[Any]" = concurrent.futures.Future()
    calls = [0]

    def callback(outcome: Any) -> None:
        calls[0] += 1
        called.set_result(outcome)

    client.callback.echo("callback", callback=callback)
    future = client.future.echo("future")
    blocking = outcome_in_thread(lambda: client.echo("sync"))
    wait_until_sync(lambda: connects.started == 1, what="the connect to start")
    client.close()

    assert_closed_error(future.exception(5))
    assert_closed_error(called.result(5))
    assert_closed_error(blocking.result(5))
    assert calls == [1] and connects.cancelled == 1


@pytest.mark.parametrize("cluster", ["failfast", "failsafe"])
def test_calls_waiting_for_their_replies_at_close_fail_with_client_is_closed(cluster):
    """Under failsafe too: a call the client itself cut short is no node's
    failure to hide behind None."""
    handler = EchoHandler()
    with serving_in_thread(echo_services(handler)) as server:
        client = octo_core.Client(Echo, appkey=CLIENT_APPKEY, hosts=[server.address], timeout=30,
                                  cluster=cluster)
        try:
            future = client.future.block("sent")
            assert handler.entered.get(timeout=5) == "sent"
            client.close()
            error = future.exception(5)
            assert isinstance(error, ClientClosed), repr(error)
            assert error.message == "client is closed" and error.request_sent is True
        finally:
            handler.release.set()


def test_every_mode_refuses_a_call_on_a_closed_client_at_the_call_site():
    """As ``Executor.submit`` after ``shutdown()`` (the documented contract): no
    future, so a callback-mode call calls no callback."""
    with serving_in_thread(echo_services()) as server:
        client = octo_core.Client(Echo, appkey=CLIENT_APPKEY, hosts=[server.address])
        client.close()
        called: List[Any] = []
        for call in (lambda: client.echo("x"), lambda: client.future.echo("x"),
                     lambda: client.callback.echo("x", callback=called.append)):
            with pytest.raises(TransportError) as refused:
                call()
            assert_closed_error(refused.value)
        assert called == []


def outcome_in_thread(call: Any, name: str = "caller") -> "concurrent.futures.Future[Any]":
    """Run ``call`` on a thread of its own; the future holds what it returned or raised."""
    outcome: "concurrent.futures.Future[Any]" = concurrent.futures.Future()

    def run_call() -> None:
        try:
            outcome.set_result(call())
        except Exception as exc:  # the outcome under test
            outcome.set_result(exc)
    threading.Thread(target=run_call, name=name, daemon=True).start()
    return outcome


def test_async_close_while_connecting_fails_waiting_calls_at_once(monkeypatch):
    connects = HungConnects(monkeypatch)

    async def main():
        async with async_client(Echo, NOWHERE, timeout=60, connect_timeout=60) as client:
            calls = [asyncio.ensure_future(client.echo(f"c{i}")) for i in range(5)]
            await wait_until(lambda: connects.started == 1, what="the connect to start")
            await client.close()
            # Left waiting, they would wait out connect_timeout (60 s): far past this bound.
            outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
        for outcome in outcomes:
            assert_closed_error(outcome)
        assert len({id(outcome) for outcome in outcomes}) == 5   # each call its own error
        assert connects.cancelled == 1
    run(main())


def test_calls_sharing_a_failed_connect_each_get_an_error_naming_their_own_method(
        monkeypatch):
    """Calls made together wait on one connect; when it fails, each is told with
    an error of its own, naming its own method (one shared error object, each
    caller writing its method into it, named the first caller's for all)."""
    release = asyncio.Event()

    async def failing(endpoint: Endpoint, loop: asyncio.AbstractEventLoop) -> Any:
        await release.wait()   # (as the real one says a refused connect)
        raise TransportError("connect failed: refused", node=endpoint.node, request_sent=False)
    monkeypatch.setattr(Endpoint, "_connect", failing)

    async def main():
        async with async_client(Echo, NOWHERE, timeout=60) as client:
            calls = [asyncio.ensure_future(call) for call in
                     (client.echo("x"), client.ping(), client.whoami())]
            await asyncio.sleep(0)
            release.set()
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(outcome, TransportError) for outcome in outcomes), outcomes
        assert [outcome.method for outcome in outcomes] == ["echo", "ping", "whoami"]
        assert len({id(outcome) for outcome in outcomes}) == 3
        assert all(outcome.request_sent is False and outcome.node == NOWHERE
                   for outcome in outcomes)
    run(main())


def test_close_in_the_loop_pass_a_first_connect_begins_fails_the_call_as_closed():
    """The connect task is cancelled before its first step: the call gets "client
    is closed", not a bare CancelledError from a task nobody cancelled."""
    async def main():
        async with serving(echo_services()) as server:
            client = octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, hosts=[server.address])
            call = asyncio.ensure_future(client.echo("x"))
            await asyncio.sleep(0)     # the call is waiting for its connect, not yet begun
            await client.close()
            with pytest.raises(TransportError) as closed:
                await asyncio.wait_for(call, 5)
            assert_closed_error(closed.value)

    run(main())


def test_a_call_racing_close_gets_client_is_closed(monkeypatch):
    """The caller passes the closed check, then close() runs to its end before the
    caller's submit lands: a typed error, no hang, no coroutine left unawaited."""
    with serving_in_thread(echo_services()) as server:
        client = octo_core.Client(Echo, appkey=CLIENT_APPKEY, hosts=[server.address])
        assert client.echo("warm") == "warm"
        checked, closed = threading.Event(), threading.Event()
        schedule = client._thread._schedule

        def late_schedule(coro: Any, future: Any) -> None:
            if threading.current_thread().name == "racer":   # close() itself is not delayed
                checked.set()
                closed.wait(10)
            schedule(coro, future)
        monkeypatch.setattr(client._thread, "_schedule", late_schedule)
        outcome = outcome_in_thread(lambda: client.echo("racing"), name="racer")
        assert checked.wait(5)
        client.close()
        closed.set()
        error = outcome.result(5)
        assert isinstance(error, TransportError) and error.message == "client is closed"


class InterruptedLoop:
    """A client's loop whose ``call_soon_threadsafe``, on the thread named ``racer``,
    first runs ``interrupt`` (once): as a signal handler does that lands while that
    thread hands a call over to the I/O thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interrupt: Any) -> None:
        self._loop, self._interrupt = loop, interrupt

    def call_soon_threadsafe(self, *args: Any) -> Any:
        if threading.current_thread().name == "racer" and self._interrupt is not None:
            interrupt, self._interrupt = self._interrupt, None
            interrupt()
        return self._loop.call_soon_threadsafe(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


@pytest.mark.parametrize("handler_does", ["close", "call"])
def test_a_signal_handler_closing_or_calling_in_the_middle_of_a_call_does_not_deadlock(
        handler_does, monkeypatch):
    """A SIGTERM handler's close(), or a call, must not wait for the very call it
    interrupted (on its own thread): the interrupted call fails as closed, or goes on."""
    with serving_in_thread(echo_services()) as server:
        client = octo_core.Client(Echo, appkey=CLIENT_APPKEY, hosts=[server.address])
        assert client.echo("warm") == "warm"
        handled: List[Any] = []
        interrupt = (client.close if handler_does == "close"
                     else lambda: handled.append(client.echo("from the handler")))
        monkeypatch.setattr(client._thread, "loop", InterruptedLoop(client._thread.loop, interrupt))
        outcome = outcome_in_thread(lambda: client.echo("interrupted"), name="racer")
        if handler_does == "close":
            error = outcome.result(5)
            assert isinstance(error, TransportError) and error.message == "client is closed"
            wait_until_sync(lambda: not client._thread._thread.is_alive(),
                            what="the closed client's loop thread to end")
        else:
            assert outcome.result(5) == "interrupted" and handled == ["from the handler"]
            client.close()


@pytest.mark.parametrize("mode", ["blocking", "future"])
def test_an_interrupt_before_the_hand_over_leaves_no_coroutine_never_awaited(mode,
                                                                             monkeypatch):
    """Ctrl-C landing after a call began but before the I/O thread has it."""
    def interrupted(*args: Any) -> None:
        raise KeyboardInterrupt
    with serving_in_thread(echo_services()) as server, \
            sync_client(Echo, server.address) as client, \
            monkeypatch.context() as patched:     # (undone before close() submits)
        patched.setattr(client._thread, "call" if mode == "blocking" else "submit", interrupted)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                client.echo("x") if mode == "blocking" else client.future.echo("x")
            except KeyboardInterrupt:
                pass
            gc.collect()
        assert [str(w.message) for w in seen] == []


# --- the loop thread ------------------------------------------------------------------

async def wait_forever(started: threading.Event) -> None:
    started.set()
    await asyncio.get_running_loop().create_future()


def test_a_loop_thread_fails_what_it_stops_under_and_refuses_what_comes_after():
    thread = LoopThread("test-loop", stopped_error=lambda: TransportError("gone"))
    started = threading.Event()
    running = thread.submit(wait_forever(started))
    assert started.wait(5)
    thread.stop()
    with pytest.raises(TransportError, match="gone"):   # not a bare CancelledError
        running.result(5)
    never_run = wait_forever(threading.Event())
    with pytest.raises(TransportError, match="gone"):   # not queued on a loop that is gone
        thread.submit(never_run)
    assert never_run.cr_frame is None     # closed, not left "never awaited"
    assert thread.loop.is_closed()


def test_cancelling_a_submitted_future_cancels_its_coroutine():
    thread = LoopThread("test-loop")
    try:
        started = threading.Event()
        future = thread.submit(wait_forever(started))
        assert started.wait(5)
        assert future.cancel()
        done, _ = concurrent.futures.wait([future], timeout=5)
        assert done == {future}
        wait_until_sync(lambda: not thread.run(all_other_tasks(), timeout=5),
                        what="the cancelled coroutine to end")
    finally:
        thread.stop()


async def answer(value: Any) -> Any:
    await asyncio.sleep(0)
    if isinstance(value, BaseException):
        raise value
    return value


def test_a_blocking_call_on_the_loop_thread_gets_its_coroutines_value_or_exception():
    thread = LoopThread("test-loop")
    try:
        assert thread.call(answer(42), 5, TimeoutError) == 42
        refused = ValueError("refused")
        with pytest.raises(ValueError) as raised:
            thread.call(answer(refused), 5, TimeoutError)
        assert raised.value is refused
        # given the function that makes the coroutine, the same; and what that
        # function raises is the call's outcome (not an error logged on the loop)
        assert thread.call(functools.partial(answer, 7), 5, TimeoutError) == 7
        with pytest.raises(TypeError):
            thread.submit(functools.partial(answer, 1, 2, 3)).result(5)
    finally:
        thread.stop()


async def cancel_itself() -> None:
    raise asyncio.CancelledError()


def test_a_blocking_call_whose_coroutine_cancels_itself_is_told_at_once():
    """As ``submit(...).result()`` is: CancelledError, not a wait for the bound."""
    thread = LoopThread("test-loop")
    try:
        with pytest.raises(concurrent.futures.CancelledError):
            thread.call(cancel_itself(), 30, TimeoutError)
    finally:
        thread.stop()


def test_a_blocking_call_that_outlives_its_wait_is_cancelled_with_the_callers_error():
    thread = LoopThread("test-loop")
    try:
        started = threading.Event()
        with pytest.raises(TransportError, match="no outcome"):
            thread.call(wait_forever(started), 0.2, lambda: TransportError("no outcome"))
        assert started.is_set()
        wait_until_sync(lambda: not thread.run(all_other_tasks(), timeout=5),
                        what="the abandoned coroutine to be cancelled")
    finally:
        thread.stop()


def test_a_blocking_call_waiting_when_its_loop_thread_stops_gets_the_stopped_error():
    thread = LoopThread("test-loop", stopped_error=lambda: TransportError("gone"))
    started = threading.Event()
    outcome = outcome_in_thread(lambda: thread.call(wait_forever(started), 30, TimeoutError))
    assert started.wait(5)
    thread.stop()
    error = outcome.result(10)
    assert isinstance(error, TransportError) and error.message == "gone"


async def all_other_tasks() -> set:
    return asyncio.all_tasks() - {asyncio.current_task()}


def test_a_client_whose_options_are_refused_leaves_no_thread_behind():
    before = len(client_threads())
    for _ in range(3):
        with pytest.raises(ValueError, match="timeout"):
            octo_core.Client(Echo, appkey=CLIENT_APPKEY, hosts=[NOWHERE], timeout=0)
    wait_until_sync(lambda: len(client_threads()) == before,
                    what="the refused clients' loop threads to end")


@pytest.mark.parametrize("warnings_are", ["warnings", "errors"])
def test_a_client_collected_unclosed_warns_and_leaves_no_thread_or_connection(warnings_are,
                                                                              monkeypatch):
    gc.collect()   # what earlier tests left for the collector warns before this test looks
    unraisable: List[Any] = []    # (the warning raised as an error, in the finalizer)
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with serving_in_thread(echo_services()) as server:
        before = len(client_threads())
        client = octo_core.Client(Echo, appkey=CLIENT_APPKEY, hosts=[server.address], timeout=5)
        assert client.echo("used once") == "used once"
        wait_until_sync(lambda: len(server._connections) == 1, what="the client's connection")
        with warnings.catch_warnings(record=True) as seen:
            # (-W error turns the warning into an error: the client closes all the same)
            warnings.simplefilter("error" if warnings_are == "errors" else "always",
                                  ResourceWarning)
            del client
            gc.collect()
        said = [str(w.message) for w in seen] + [str(u.exc_value) for u in unraisable]
        assert said == ["an octo_core Client was collected without close(): it is being closed"]
        wait_until_sync(lambda: len(client_threads()) == before,
                        what="the collected client's loop thread to end")
        wait_until_sync(lambda: not server._connections, what="its connection to close")


def test_a_client_dropped_with_calls_pending_is_closed_only_once_they_settle():
    handler = EchoHandler()
    with serving_in_thread(echo_services(handler)) as server:
        client = octo_core.Client(Echo, appkey=CLIENT_APPKEY, hosts=[server.address], timeout=5)
        called: "concurrent.futures.Future[Any]" = concurrent.futures.Future()
        future = client.future.block("future")
        client.callback.block("callback", callback=called.set_result)
        assert {handler.entered.get(timeout=5), handler.entered.get(timeout=5)} == {
            "future", "callback"}
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", ResourceWarning)
            del client
            gc.collect()
            assert not seen            # the pending calls keep their client
            handler.release.set()
            assert future.result(5) == "future" and called.result(5) == "callback"

            def collected() -> bool:
                gc.collect()
                return len(seen) == 1
            wait_until_sync(collected, what="the client to be collected once its calls settled")
        assert "collected without close()" in str(seen[0].message)


# --- one client, one event loop -------------------------------------------------------

def test_a_call_from_another_event_loop_fails_before_anything_is_sent():
    handler = EchoHandler()
    with serving_in_thread(echo_services(handler)) as server:
        client = octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, hosts=[server.address])
        home = LoopThread("test-home-loop")
        try:
            assert home.run(client.slow("home", 0), timeout=5) == "home"

            async def elsewhere() -> None:
                for _ in range(3):
                    with pytest.raises(TransportError, match="another event loop") as caught:
                        await client.slow("elsewhere", 0)
                    assert caught.value.request_sent is False
            run(elsewhere())
            # Coroutine handlers start as their frames are read, in order: had any
            # "elsewhere" call been written, it would have started before this one.
            assert home.run(client.slow("home again", 0), timeout=5) == "home again"
            assert handler.slow_started == 2
            home.run(client.close(), timeout=5)
        finally:
            home.stop()


def test_a_client_whose_event_loop_is_closed_says_so():
    with serving_in_thread(echo_services()) as server:
        client = octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, hosts=[server.address])
        with warnings.catch_warnings():
            # The first loop closes under the client's connection, as this test means
            # it to: uvloop warns of the open transport. Not made an error (-W error):
            # uvloop's close then never returns (the warning cuts its handle's close short).
            warnings.simplefilter("ignore", ResourceWarning)
            assert run(client.echo("first loop")) == "first loop"

        async def second_loop() -> None:
            with pytest.raises(TransportError, match="event loop .* is closed") as caught:
                await client.echo("second loop")
            assert caught.value.request_sent is False
            await client.close()    # its connections went with their loop: nothing to raise
            with pytest.raises(TransportError, match="client is closed"):
                await client.echo("after close")
        run(second_loop())


# --- messages -------------------------------------------------------------------------

def test_a_call_timeout_prints_its_seconds_with_three_significant_digits():
    handler = EchoHandler()

    async def main():
        async with serving(echo_services(handler)) as server, \
                async_client(Echo, server.address) as client:
            with pytest.raises(CallTimeout) as caught:
                await client.call("slow", "late", 300, timeout=0.1)
            await wait_until(lambda: handler.slow_finished == 1, what="the late call to end")
        seconds = re.search(r"no reply within ([0-9.]+)s", str(caught.value)).group(1)
        assert 0 < float(seconds) <= 0.1
        assert len(seconds.replace(".", "").lstrip("0")) <= 3, seconds
    run(main())


@pytest.mark.parametrize("option, value", [("timeout", math.inf), ("timeout", 0),
                                           ("connect_timeout", -1), ("heartbeat_interval", -1),
                                           ("heartbeat_interval", "abc"),
                                           ("heartbeat_interval", math.nan)])
def test_nonsense_seconds_are_refused_when_the_client_is_made(option, value):
    """A negative heartbeat interval aborted every connection as it opened and spun
    a core; a NaN one silently never beat."""
    with pytest.raises(ValueError, match=option):
        octo_core.AsyncClient(Echo, appkey="com.example.caller", hosts=["127.0.0.1:1"],
                              **{option: value})


@pytest.mark.parametrize("options, error, says", [
    (dict(lb="bogus"), ValueError, "unknown balancer 'bogus'"),
    (dict(hosts="127.0.0.1:1"), TypeError, r"hosts=\['127.0.0.1:1'\]"),
    (dict(idempotent="echo"), TypeError, r"idempotent=\['echo'\]"),
    (dict(idempotent=["echo", "ecko"]), ValueError, "Echo has no method 'ecko'"),
    (dict(hash_arg="nosuch"), ValueError, "'nosuch' is no argument"),
    (dict(hash_arg="text", hash_header="uid"), ValueError, "not both"),
    (dict(lb="consistenthash"), ValueError, "give it hash_arg= .* or hash_header="),
    (dict(hash_header="uid"), ValueError, "lb='consistenthash' hashes a key"),
    (dict(hosts=[("127.0.0.1", 1)]), TypeError, "hosts holds addresses as strings"),
    (dict(hosts=["http://127.0.0.1:1"]), ValueError, "not host:port"),
    (dict(hosts=["127.0.0.1:0"]), ValueError, r"port 0.*await server.start\(\)"),
    (dict(limits={"max_depth": 8}), TypeError, "limits is an octo_core.codec.Limits"),
], ids=["unknown lb", "hosts a string", "idempotent a string", "idempotent a typo",
        "hash_arg no argument", "two hash keys", "consistenthash without a key",
        "a hash key without consistenthash", "hosts a tuple", "hosts a URL",
        "hosts port 0", "limits a dict"])
def test_misread_options_are_refused_when_the_client_is_made(options, error, says):
    """Each of these was taken quietly: a string's characters as host names or
    method names (hedging then never applied), an unknown balancer refused only
    at the first call, a hash argument that no call has, a consistenthash
    balancer with no key to hash or a key with no such balancer (each call
    balanced at random). An address as a tuple
    failed deep inside ('tuple' object has no attribute 'startswith'), a URL's
    scheme was looked up as part of a host name, and port 0 (a Server(port=0)'s
    address read before its start) failed each call to connect. A dict for limits
    failed inside ('dict' object has no attribute 'max_depth')."""
    arguments = dict(appkey="com.example.caller", hosts=["127.0.0.1:1"])
    arguments.update(options)
    with pytest.raises(error, match=says):
        octo_core.AsyncClient(Echo, **arguments)


class _Gated(EchoHandler):
    """``slow`` answers once ``gate`` is set (a coroutine, or with ``plain`` a
    function on a business thread)."""

    def __init__(self, plain: bool = False) -> None:
        super().__init__()
        self.started = threading.Event()
        self.gate = threading.Event()
        if plain:
            self.slow = self._plain_slow   # type: ignore[method-assign]

    def _plain_slow(self, text: str, delay_ms: int) -> str:
        self.started.set()
        self.gate.wait(10)
        return text

    async def slow(self, text: str, delay_ms: int) -> str:
        self.started.set()
        while not self.gate.is_set():
            await asyncio.sleep(0.01)
        return text


async def _call_in_flight(handler: _Gated, address: str) -> Tuple[octo_core.AsyncClient,
                                                                  "asyncio.Future[str]"]:
    """A client to ``address`` with one call of ``slow`` waiting at ``handler``'s gate."""
    client = octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, hosts=[address], timeout=10.0)
    call = asyncio.ensure_future(client.slow("in flight", 0))
    await wait_until(handler.started.is_set, 5, "the call")
    return client, call


def test_a_close_with_grace_refuses_new_calls_and_lets_those_in_flight_end():
    handler = _Gated()

    async def main() -> None:
        async with serving(echo_services(handler)) as server:
            client, call = await _call_in_flight(handler, server.address)
            closing = asyncio.ensure_future(client.close(grace=10.0))
            await asyncio.sleep(0.05)
            with pytest.raises(ClientClosed):
                await client.echo("new")
            assert not closing.done() and not call.done()
            handler.gate.set()
            assert await call == "in flight"
            await asyncio.wait_for(closing, 5)

    run(main())


def test_a_close_whose_grace_runs_out_fails_the_calls_still_in_flight():
    handler = _Gated()

    async def main() -> None:
        async with serving(echo_services(handler)) as server:
            client, call = await _call_in_flight(handler, server.address)
            await client.close(grace=0.05)
            with pytest.raises(TransportError):
                await call
            handler.gate.set()
        with pytest.raises(ValueError, match="grace"):
            await client.close(grace=-1)

    run(main())


def test_a_call_in_flight_during_a_close_with_grace_may_still_fail_over_to_a_new_node():
    """Within the grace a call in flight is still the caller's: its retry on a node
    the client never connected to goes (it was failed at once, ClientClosed)."""
    handler = _Gated()
    sent, closing_begun = asyncio.Event(), asyncio.Event()

    async def drops_the_call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        sent.set()
        await closing_begun.wait()
        writer.transport.abort()   # the call's connection lost: an idempotent call goes elsewhere

    async def main() -> None:
        async with fake_server(drops_the_call) as first, \
                serving(echo_services(handler)) as second:
            client = octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, timeout=10.0,
                                           hosts=[first, second.address], lb="roundrobin",
                                           cluster="failover", idempotent=True)
            client._cluster._lb_options = {"start": 0}   # the first call: the first node
            call = asyncio.ensure_future(client.slow("in flight", 0))
            await asyncio.wait_for(sent.wait(), 5)
            closing = asyncio.ensure_future(client.close(grace=10.0))
            await asyncio.sleep(0)   # (the close begun: new calls refused)
            closing_begun.set()
            await wait_until(handler.started.is_set, 5, "the retry on the second node")
            handler.gate.set()
            assert await call == "in flight"
            await asyncio.wait_for(closing, 5)

    run(main())


def test_a_blocking_close_with_grace_waits_for_the_calls_of_other_threads():
    handler = _Gated(plain=True)
    with serving_in_thread(echo_services(handler)) as server:
        client = octo_core.Client(Echo, appkey=CLIENT_APPKEY, hosts=[server.address],
                                  timeout=10.0)
        call = client.future.slow("in flight", 0)
        assert handler.started.wait(5)
        closing = threading.Thread(target=client.close, kwargs=dict(grace=10.0))
        closing.start()
        wait_until_sync(lambda: client._closed, 5, "the close")
        with pytest.raises(ClientClosed):
            client.echo("new")
        assert closing.is_alive()
        handler.gate.set()
        assert call.result(5) == "in flight"
        closing.join(5)
        assert not closing.is_alive()


def test_a_client_refuses_to_be_pickled_and_says_what_to_do():
    """A client passed to a ``spawn`` worker (``multiprocessing``, ``concurrent.futures``)
    is pickled: each says it cannot be, and what to do instead (it failed on
    ``cannot pickle '_thread.lock'``)."""
    async def main() -> None:
        client = octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, hosts=["127.0.0.1:1"])
        with pytest.raises(TypeError, match="AsyncClient cannot be pickled .* make one in each"):
            pickle.dumps(client)
        await client.close()

    run(main())
    with octo_core.Client(Echo, appkey=CLIENT_APPKEY, hosts=["127.0.0.1:1"]) as client:
        with pytest.raises(TypeError, match="Client cannot be pickled .* make one in each"):
            pickle.dumps(client)
