"""CPU instructions per RPC call, counted by valgrind's callgrind.

Run with (about two minutes per setting; needs ``valgrind``)::

    python benchmarks/bench_instructions.py                 # 64 calls in flight
    python benchmarks/bench_instructions.py --in-flight 1
    python benchmarks/bench_instructions.py --system octo --system codec-only --system raw
    python benchmarks/bench_instructions.py --system octo-client --system octo-server

It measures the octo_core that ``import octo_core`` finds: to measure a source
tree (a worktree, say) rather than the installed one, run it from that tree with
``PYTHONPATH=src``.

Wall-clock figures on a shared VM move by tens of percent between runs; an
instruction count barely moves (below), so this is the yardstick for comparing two versions of octo_core's own call path.
It is not a comparison with the peers (``bench_rpc.py`` is): client and server
share one process and one uvloop loop, and the count includes both sides.

Method: the same echo workload (``octo_core.bench.rpc``'s ``Echo`` and
coroutine handler, a 10-byte message) runs once with one measured round and once
with ``--rounds`` (default 5); the difference, divided by the calls in the extra
rounds, is the cost of one call with start-up, warm-up and shutdown cancelled
out. Not 1 and 2 rounds: the client's deadline timer (1 s calls) fires on
wall-clock time, which valgrind and the machine's load stretch, so what it finds
to do varies between runs; a 1-and-2 difference of one tree moved by up to ~800
per call on a loaded machine, and four extra rounds divide that by four.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys

CALLS_PER_ROUND = 3200


async def _octo_server():
    """octo_core's server of the echo (``bench_rpc``'s coroutine handler), started."""
    import octo_core
    from octo_core.bench.rpc import _AsyncEchoHandler, payload_module

    server = octo_core.Server(appkey="com.octo.bench.echo", port=0)
    server.add_service(payload_module().Echo, _AsyncEchoHandler())
    await server.start()
    return server


def _octo_client(address: str):
    """octo_core's client of the echo at ``address``."""
    import octo_core
    from octo_core.bench.rpc import payload_module

    return octo_core.AsyncClient(payload_module().Echo, appkey="com.octo.bench.client",
                                 remote_appkey="com.octo.bench.echo", hosts=[address])


async def _open_octo(message: str):
    """octo_core's server and client; returns (call, close)."""
    server = await _octo_server()
    client = _octo_client(server.address)

    async def close() -> None:
        await client.close()
        await server.stop()
    return (lambda: client.echo(message)), close


async def _open_octo_client(message: str):
    """octo_core's client calling the codec-only server: less the codec-only
    floor, what octo_core's client side costs."""
    from octo_core.bench.rpc import _CodecEchoServer

    server = await asyncio.get_running_loop().create_server(_CodecEchoServer, "127.0.0.1", 0)
    client = _octo_client("127.0.0.1:%d" % server.sockets[0].getsockname()[1])

    async def close() -> None:
        await client.close()
        server.close()
        await server.wait_closed()
    return (lambda: client.echo(message)), close


async def _open_octo_server(message: str):
    """The codec-only client calling octo_core's server: less the codec-only
    floor, what octo_core's server side costs."""
    from octo_core.bench.rpc import _CodecEchoClient

    server = await _octo_server()
    transport, client = await asyncio.get_running_loop().create_connection(
        _CodecEchoClient, "127.0.0.1", server.port)

    async def close() -> None:
        transport.close()
        await server.stop()
    return (lambda: client.call(message)), close


async def _connect(server_factory, client_factory):
    """A bare asyncio server and a client connected to it; returns (client, close)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(server_factory, "127.0.0.1", 0)
    transport, client = await loop.create_connection(
        client_factory, "127.0.0.1", server.sockets[0].getsockname()[1])

    async def close() -> None:
        transport.close()
        server.close()
        await server.wait_closed()
    return client, close


async def _open_codec_only(message: str):
    """``bench_rpc``'s codec-only floor: the protocol with nothing but the C codec."""
    from octo_core.bench.rpc import _CodecEchoClient, _CodecEchoServer

    client, close = await _connect(_CodecEchoServer, _CodecEchoClient)
    return (lambda: client.call(message)), close


async def _open_raw(message: str):
    """``bench_rpc``'s raw uvloop echo: length-prefixed frames, no serialization."""
    from octo_core.bench.rpc import _RawEchoClient, _RawEchoServer

    client, close = await _connect(_RawEchoServer, _RawEchoClient)
    data = message.encode()
    frame = len(data).to_bytes(4, "big") + data
    return (lambda: client.call(frame)), close


SYSTEMS = {"octo": _open_octo, "octo-client": _open_octo_client,
           "octo-server": _open_octo_server, "codec-only": _open_codec_only, "raw": _open_raw}


async def _workload(system: str, rounds: int, in_flight: int) -> None:
    from octo_core.bench.rpc import make_message

    call, close = await SYSTEMS[system](make_message(10))
    per_worker = CALLS_PER_ROUND // in_flight

    async def worker(calls: int) -> None:
        for _ in range(calls):
            await call()

    await asyncio.gather(*(worker(max(1, per_worker // 2)) for _ in range(in_flight)))  # warm-up
    for _ in range(rounds):
        await asyncio.gather(*(worker(per_worker) for _ in range(in_flight)))
    await close()


def _instructions(system: str, rounds: int, in_flight: int) -> int:
    """Instructions callgrind counts for a whole run with ``rounds`` measured rounds."""
    run = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         __file__, "--child", str(rounds), "--in-flight", str(in_flight), "--system", system],
        capture_output=True, text=True, check=True)
    found = re.search(r"Collected\s*:\s*([\d,]+)", run.stderr)
    if found is None:
        raise RuntimeError("callgrind printed no total:\n" + run.stderr[-2000:])
    return int(found.group(1).replace(",", ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-flight", type=int, default=64, help="calls in flight (default 64)")
    parser.add_argument("--system", choices=list(SYSTEMS), action="append",
                        help="octo (default), codec-only (bench_rpc's floor: the protocol "
                             "with nothing but the C codec), octo-client / octo-server "
                             "(octo_core's client, resp. server, with the floor's other side: "
                             "less the floor, what that side costs) and/or raw (bench_rpc's "
                             "raw uvloop echo, no serialization); may be repeated")
    parser.add_argument("--rounds", type=int, default=5,
                        help="measured rounds of the longer run (default 5; at least 2)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.in_flight <= CALLS_PER_ROUND:
        parser.error(f"--in-flight must be between 1 and {CALLS_PER_ROUND}")
    if args.rounds < 2:
        parser.error("--rounds must be at least 2")
    if args.child is not None:
        from octo_core.transport.loop import new_event_loop

        loop = new_event_loop()
        try:
            loop.run_until_complete(_workload(args.system[0], args.child, args.in_flight))
        finally:
            loop.close()
        return 0
    calls = (CALLS_PER_ROUND // args.in_flight) * args.in_flight
    for system in args.system or ["octo"]:
        one = _instructions(system, 1, args.in_flight)
        more = _instructions(system, args.rounds, args.in_flight)
        print(f"{system} echo, {args.in_flight} in flight, client and server in one process: "
              f"{(more - one) / ((args.rounds - 1) * calls):,.0f} instructions per call (both sides)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
