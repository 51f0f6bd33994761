"""Lifecycles of servers and clients: re-entered, stopped from elsewhere, interrupted,
or dropped without being closed."""
from __future__ import annotations

import asyncio
import signal
import threading

import pytest

import octo_core
from octo_core.errors import TransportError
from octo_core.server import NodeStatus

from wire_helpers import (CLIENT_APPKEY, LOCALHOST, SERVER_APPKEY, Echo,  # noqa: F401
                          EchoHandler, sync_client, wait_until_sync, watchdog)

pytestmark = pytest.mark.usefixtures("watchdog")


def echo_server(handler: EchoHandler = None) -> octo_core.Server:
    server = octo_core.Server(SERVER_APPKEY, host=LOCALHOST)
    server.add_service(Echo, handler or EchoHandler())
    return server


def test_with_server_re_entered_fails_and_the_outer_with_still_stops_it():
    server = echo_server()
    with server:
        with pytest.raises(RuntimeError, match="already started"):
            with server:
                pass
        with sync_client(Echo, server.address) as client:
            assert client.echo("still served") == "still served"
    assert server.status == NodeStatus.STOPPED
    with pytest.raises(TransportError, match="cannot connect"):
        with sync_client(Echo, server.address) as client:
            client.echo("after the outer with")
    assert not [t for t in threading.enumerate() if t.name.startswith("octo-server")]


def test_stop_awaited_on_another_loop_stops_the_server_on_its_own():
    handler = EchoHandler()
    server = echo_server(handler)
    with server, sync_client(Echo, server.address, timeout=10.0) as client:
        in_flight = client.future.slow("answered", 300)
        wait_until_sync(lambda: handler.slow_started == 1)
        asyncio.run(asyncio.wait_for(server.stop(grace=5.0), 10))
        assert server.status == NodeStatus.STOPPED
        assert in_flight.result(10) == "answered"   # the grace let it finish
        with pytest.raises(TransportError):
            client.echo("after the stop")


class Interrupted(BaseException):
    """Stands for KeyboardInterrupt (a signal handler's exception in the waiting thread)."""


def test_a_blocking_call_interrupted_by_a_signal_is_let_go():
    handler = EchoHandler()

    def interrupt(signum, frame):
        raise Interrupted()

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with echo_server(handler) as server, \
                sync_client(Echo, server.address, timeout=30.0) as client:
            main = threading.get_ident()

            def send_signal_once_the_call_runs() -> None:
                wait_until_sync(lambda: not handler.entered.empty())
                signal.pthread_kill(main, signal.SIGUSR1)

            threading.Thread(target=send_signal_once_the_call_runs, daemon=True).start()
            with pytest.raises(Interrupted):
                client.block("never waited for")
            endpoints = list(client._async._endpoints.values())
            # no one waits for it: the client forgets it now, not at its 30 s deadline
            wait_until_sync(lambda: sum(e.in_flight for e in endpoints) == 0)
            assert client.echo("the next call") == "the next call"
            handler.release.set()
    finally:
        signal.signal(signal.SIGUSR1, previous)
