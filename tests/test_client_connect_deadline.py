"""A call's deadline bounds its wait for a TCP connect.

The connect is made to hang (a gate in front of ``Endpoint._connect``) with a
``connect_timeout`` far longer than the call's timeout: the call gives up at its
own deadline, saying nothing was sent, while the connect goes on and serves the
calls after it.
"""
from __future__ import annotations

import asyncio

import pytest

from octo_core.errors import CallTimeout
from octo_core.transport.client import Endpoint

from wire_helpers import Echo, async_client, echo_services, run, serving, watchdog  # noqa: F401

pytestmark = pytest.mark.usefixtures("watchdog")


class GatedConnects:
    """Holds every connect until ``gate`` opens; counts them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gate = asyncio.Event()
        self.count = 0
        real = Endpoint._connect

        async def gated(endpoint: Endpoint, loop: asyncio.AbstractEventLoop):
            self.count += 1
            await self.gate.wait()
            return await real(endpoint, loop)
        monkeypatch.setattr(Endpoint, "_connect", gated)


def test_the_call_deadline_bounds_the_connect_wait(monkeypatch):
    async def main():
        connects = GatedConnects(monkeypatch)
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address, timeout=0.2, connect_timeout=60) as client:
            with pytest.raises(CallTimeout, match="not sent") as caught:
                # Far below connect_timeout: a call the connect held past its own
                # deadline fails this bound.
                await asyncio.wait_for(client.echo("hung connect"), 10)
            assert caught.value.request_sent is False and caught.value.method == "echo"

            connects.gate.set()     # the same connect attempt goes on for the next call
            assert await client.call("echo", "connected", timeout=10) == "connected"
            assert connects.count == 1
    run(main())


def test_callers_that_gave_up_on_a_slow_connect_do_not_open_the_breaker(monkeypatch):
    """Five calls whose deadlines ran out while one connect was under way sent
    nothing: the node is not blamed five times (the connect judges it), so once
    the connection is up the next call goes through."""
    async def main():
        connects = GatedConnects(monkeypatch)
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address, timeout=0.1, connect_timeout=60) as client:
            results = await asyncio.gather(*(client.echo("early") for _ in range(5)),
                                           return_exceptions=True)
            assert all(isinstance(r, CallTimeout) and r.request_sent is False for r in results)
            connects.gate.set()
            assert await client.call("echo", "later", timeout=10) == "later"
            assert connects.count == 1
    run(main())
