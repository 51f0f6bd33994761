"""Clients across ``os.fork()``: the child never speaks on the parent's connections.

A forked child inherits the client's sockets as they are. Written to from the
child, they carry its requests on the parent's connection with the sequence ids
the parent uses next, so the parent reads the child's answers as its own. A
blocking ``Client`` opens its own thread and connections in the child; an
``AsyncClient`` refuses calls there; a ``Server`` the parent started is left
alone (stopped from the child, it would shut the parent's connections, unlink
its socket path and unregister its node).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import warnings
from typing import Any, Callable, Tuple

import pytest

import octo_core
from octo_core import blocking
from octo_core.errors import TransportError
from octo_core.transport.loop import new_event_loop

from wire_helpers import (CLIENT_APPKEY, LOCALHOST, SERVER_APPKEY, Echo,  # noqa: F401
                          EchoHandler, echo_services, run, serving_in_thread, short_tmpdir,
                          sync_client, wait_until_sync, watchdog)

pytestmark = [pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
              pytest.mark.usefixtures("watchdog")]

#: Seconds a child may take before SIGALRM ends it (a hang fails the test, not CI).
CHILD_SECONDS = 30


def in_child(work: Callable[[], Any]) -> Tuple[str, Any]:
    """Run ``work`` in a child made by ``os.fork()``: ``("ok", result)``, or
    ``("error", (type name, message))`` for what it raised."""
    read, write = os.pipe()
    with warnings.catch_warnings():   # 3.12+ warns of fork in a process with threads
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:   # the child: never back into pytest
        try:
            os.close(read)
            signal.alarm(CHILD_SECONDS)
            try:
                outcome: Tuple[str, Any] = ("ok", work())
            except BaseException as exc:
                outcome = ("error", (type(exc).__name__, str(exc)))
            os.write(write, pickle.dumps(outcome))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0, f"the child ended with status {status:#x}"
    return pickle.loads(data)


def client_threads() -> int:
    return sum(thread.name == "octo-client" for thread in threading.enumerate())


def test_a_blocking_client_works_in_the_child_on_connections_of_its_own():
    with serving_in_thread(echo_services()) as server, sync_client(Echo, server.address) as client:
        assert client.echo("parent") == "parent"

        def child() -> Any:
            answers = [client.echo("child"), client.future.echo("future").result(5)]
            called_back: concurrent.futures.Future = concurrent.futures.Future()
            client.callback.echo("callback", callback=called_back.set_result)
            answers.append(called_back.result(5))
            threads = client_threads()
            client.close()
            return answers, threads

        # one I/O thread in the child: its own, the parent's does not run there
        assert in_child(child) == ("ok", (["child", "future", "callback"], 1))
        # the child's requests went out on its own connection: the parent's
        # answers are still its own
        assert [client.echo(f"parent {n}") for n in range(3)] == [f"parent {n}" for n in range(3)]


def test_a_client_given_its_hosts_as_a_generator_works_in_the_child_too():
    """The child's client is made anew from the parent's arguments: hosts (and
    idempotent) given as a generator were used up by the parent's, and the
    child's first call failed with "hosts must name at least one node"."""
    with serving_in_thread(echo_services()) as server, \
            octo_core.Client(Echo, appkey=CLIENT_APPKEY, hosts=(a for a in [server.address]),
                             idempotent=(m for m in ["echo"]), timeout=5) as client:
        assert client.echo("parent") == "parent"

        def child() -> Any:
            answer = client.echo("child")
            client.close()
            return answer

        assert in_child(child) == ("ok", "child")


def test_threads_of_the_child_racing_its_first_calls_open_one_client():
    with serving_in_thread(echo_services()) as server, sync_client(Echo, server.address) as client:
        client.echo("parent")

        def child() -> Any:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                answers = sorted(pool.map(client.echo, [str(n) for n in range(8)]))
            threads = client_threads()
            client.close()
            return answers, threads

        assert in_child(child) == ("ok", (sorted(str(n) for n in range(8)), 1))
        assert client.echo("parent again") == "parent again"


def test_a_client_closed_in_the_child_before_any_call_stays_closed_and_the_parent_carries_on():
    with serving_in_thread(echo_services()) as server, sync_client(Echo, server.address) as client:
        client.echo("parent")

        def child() -> Any:
            client.close()        # nothing of the child's to close: returns at once
            try:
                client.echo("after close")
            except TransportError as exc:
                return str(exc), exc.request_sent, client_threads()
            return "answered"

        outcome = in_child(child)
        assert outcome[0] == "ok" and outcome[1][0].startswith("client is closed")
        assert outcome[1][1:] == (False, 0)
        assert client.echo("parent again") == "parent again"


def test_a_client_closed_before_the_fork_stays_closed_in_the_child():
    with serving_in_thread(echo_services()) as server:
        client = octo_core.Client(Echo, appkey=CLIENT_APPKEY, hosts=[server.address], timeout=2.0)
        client.close()

        def child() -> Any:
            client.echo("x")

        kind, (name, message) = in_child(child)
        assert (kind, name) == ("error", "ClientClosed") and message.startswith("client is closed")


def test_an_async_client_refuses_calls_in_the_child_and_the_parent_keeps_its_own_answers():
    with serving_in_thread(echo_services()) as server:
        client = octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, hosts=[server.address],
                                       timeout=2.0)
        loop = new_event_loop()
        try:
            assert loop.run_until_complete(client.echo("parent")) == "parent"

            def child() -> Any:
                child_loop = new_event_loop()
                try:
                    child_loop.run_until_complete(client.echo("child"))
                except TransportError as exc:
                    refused = (str(exc), exc.request_sent)
                else:
                    return "answered"
                child_loop.run_until_complete(client.close())   # the parent's: left alone
                child_loop.close()
                return refused

            kind, (message, request_sent) = in_child(child)
            assert kind == "ok" and "before os.fork()" in message and request_sent is False
            # had the child written on the inherited connection, with the sequence
            # id the parent uses next, this call would have its answer
            assert loop.run_until_complete(client.echo("parent again")) == "parent again"
        finally:
            loop.run_until_complete(client.close())
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()


def test_a_server_stopped_in_the_child_goes_on_serving_in_the_parent():
    with short_tmpdir() as tmp:
        path = os.path.join(tmp, "echo.sock")
        registry = f"file://{tmp}/registry"
        server = octo_core.Server(SERVER_APPKEY, host=f"unix://{path}", registry=registry)
        server.add_service(Echo, EchoHandler())
        with server, sync_client(Echo, server.address) as client:
            assert client.echo("parent") == "parent"

            def child() -> Any:
                server.__exit__(None, None, None)   # as leaving `with server` there
                asyncio.run(server.stop())          # and as a stop on a loop of the child's
                return client_threads()

            assert in_child(child) == ("ok", 0)
            # the parent's connection, socket path and registration are all still there
            assert client.echo("parent again") == "parent again"
            assert os.path.exists(path)
            with octo_core.Client(Echo, appkey=CLIENT_APPKEY, registry=registry,
                                  remote_appkey=SERVER_APPKEY, timeout=2.0) as discovering:
                assert discovering.echo("found") == "found"


#: A process that serves on a host and dials a node by name, then forks; the child
#: ends as programs do (interpreter shutdown, not os._exit). uvloop would have looked
#: both up on libuv's thread pool, whose exit hook crashes a forked child (SIGSEGV)
#: unless the child started a pool of its own.
_SERVE_DIAL_FORK = """
import os, sys
sys.path.insert(0, {tests!r})
import octo_core
from wire_helpers import CLIENT_APPKEY, SERVER_APPKEY, Echo, EchoHandler
server = octo_core.Server(SERVER_APPKEY, host="127.0.0.1")
server.add_service(Echo, EchoHandler())
with server, octo_core.Client(Echo, appkey=CLIENT_APPKEY, timeout=2.0,
                              hosts=["localhost:%d" % server.port]) as client:
    assert client.echo("parent") == "parent"
    pid = os.fork()
    if pid == 0:
        import signal; signal.alarm(30)
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    print("child", "signal %d" % os.WTERMSIG(status) if os.WIFSIGNALED(status)
          else "exit %d" % os.WEXITSTATUS(status))
"""


def test_a_child_that_ends_normally_is_not_killed_by_the_event_loop_s_thread_pool():
    script = _SERVE_DIAL_FORK.format(tests=os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", script],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["child", "exit", "0"]


def test_while_a_child_lives_the_parent_s_closes_and_stops_still_close():
    """The child's copies of the parent's sockets are closed at the fork: the parent's
    close reaches the server, its stop closes the port, and the port can serve again."""
    with serving_in_thread(echo_services()) as server:
        client = octo_core.Client(Echo, appkey=CLIENT_APPKEY, hosts=[server.address], timeout=2.0)
        client.echo("parent")
        inner = octo_core.Server(SERVER_APPKEY, host=LOCALHOST)
        inner.add_service(Echo, EchoHandler())
        serving_inner = contextlib.ExitStack()
        serving_inner.enter_context(inner)
        port = inner.port
        go_on, hold = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:   # lives, doing nothing, until the parent is done
            try:
                os.close(hold)
                signal.alarm(CHILD_SECONDS)
                os.read(go_on, 1)
            finally:
                os._exit(0)
        os.close(go_on)
        try:
            client.close()
            wait_until_sync(lambda: not server._connections)
            serving_inner.close()
            with pytest.raises(TransportError, match="cannot connect"):
                with octo_core.Client(Echo, appkey=CLIENT_APPKEY, hosts=[f"{LOCALHOST}:{port}"],
                                      timeout=2.0) as late:
                    late.echo("refused, not left to time out")
            again = octo_core.Server(SERVER_APPKEY, host=LOCALHOST, port=port)
            again.add_service(Echo, EchoHandler())
            with again, octo_core.Client(Echo, appkey=CLIENT_APPKEY, hosts=[again.address],
                                         timeout=2.0) as fresh:
                assert fresh.echo("served again") == "served again"
        finally:
            client.close()
            serving_inner.close()
            os.close(hold)
            os.waitpid(pid, 0)


def test_blocking_work_pools_start_their_own_threads_in_the_child():
    assert run(blocking.FILES.run(lambda: "parent")) == "parent"   # its threads now run here

    def child() -> Any:   # the parent's threads are not in the child: new ones must start
        return run(blocking.FILES.run(lambda: "child"), timeout=10)

    assert in_child(child) == ("ok", "child")


#: The client a multiprocessing worker inherits (set by the test, read in the workers).
_POOL_CLIENT: Any = None


def _echo_in_a_worker(text: str) -> Tuple[str, int]:
    return _POOL_CLIENT.echo(text), os.getpid()


def test_a_module_level_client_serves_multiprocessing_fork_workers():
    global _POOL_CLIENT
    import multiprocessing

    with serving_in_thread(echo_services()) as server, sync_client(Echo, server.address) as client:
        client.echo("parent")       # its connection is open before the workers fork
        _POOL_CLIENT = client
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                with multiprocessing.get_context("fork").Pool(3) as pool:
                    answers = pool.map(_echo_in_a_worker, [f"w{n}" for n in range(30)],
                                       chunksize=1)
        finally:
            _POOL_CLIENT = None
        assert [text for text, _ in answers] == [f"w{n}" for n in range(30)]
        assert os.getpid() not in {pid for _, pid in answers}
        assert client.echo("parent again") == "parent again"


class _Told:
    """Says, in the child, whether it was told of the fork (or fails when told)."""

    def __init__(self, fails: bool) -> None:
        self.fails = fails
        self.told = False

    def _inherited_by_fork(self) -> None:
        if self.fails:
            raise OSError("no file descriptor left")
        self.told = True


def test_one_object_failing_in_the_child_does_not_keep_the_others_from_being_told():
    from octo_core import afterfork

    # every good one is told, wherever the failing ones fall in the set's order
    told = [_Told(fails=number % 2 == 0) for number in range(40)]
    for obj in told:
        afterfork.tell_forked_children(obj)
    assert in_child(lambda: [obj.told for obj in told]) == (
        "ok", [number % 2 == 1 for number in range(40)])
