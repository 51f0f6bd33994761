"""Fuzzing the server: mutated and random frames on many connections at once.

The server runs in its own process (a crash in the C codec shows up as a dead
process, not a dead test run). Twenty raw connections each push two hundred
frames made by mutating valid unified and framed requests (bit flips,
truncations, length-field edits, splices, random bytes; a seeded RNG, so a
failure replays), while a good ``AsyncClient`` keeps calling. Afterwards: zero
failed good calls, the server process alive and still answering, no unhandled
exception in its log, and its RSS stable across a second round.

A hypothesis test does the same on a single in-process connection, shrinking any
byte string that breaks the one rule: bad bytes cost their own connection at
most.
"""
from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import random
import re
import struct
import subprocess
import sys
import textwrap
from typing import Callable, Iterator, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from thriftpy2.thrift import TMessageType

from octo_core import codec, protocol
from octo_core.auth import DerivedTokens, Signer

from wire_helpers import (CLIENT_APPKEY, HERE, LOCALHOST, Calc, Echo, EchoHandler, CalcHandler,
                          GoodCaller, async_client, decode_body, raw_connection, run, serving,
                          unified_request, watchdog)  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("watchdog")

SEED = int(os.environ.get("OCTO_FUZZ_SEED", "20240611"))
CONNECTIONS = 20
FRAMES_PER_CONNECTION = 200
RSS_GROWTH_LIMIT = 20 * 1024 * 1024


# --- the corpus of valid frames --------------------------------------------------------

MASTER = "fuzz-master-secret"
SERVER_APPKEY = "com.example.fuzz.server"
TOKEN = DerivedTokens(MASTER).token(CLIENT_APPKEY)


def _header(service: str, method: str, seq: int, body: bytes, variant: int) -> object:
    trace = protocol.TraceInfo(clientAppkey=CLIENT_APPKEY, traceId="0123456789abcdef",
                               spanId="fedcba9876543210", debug=True, sample=False,
                               clientIp="127.0.0.1")
    local = None
    if variant % 2:      # signed for real (the protected server checks it; replays are refused)
        local = Signer(CLIENT_APPKEY, TOKEN, SERVER_APPKEY).headers(service, method, body)
    return protocol.request_header(
        service, seq, 1000, trace=trace,
        global_context={"octo.swimlane": "lane", "k": "v"} if variant >= 2 else None,
        local_context=local)


def corpus() -> List[bytes]:
    """Valid requests of every shape the server takes (none that blocks a thread)."""
    calls: List[Tuple[str, str, object]] = [
        ("Echo", "echo", Echo.echo_args(text="hello fuzz")),
        ("Echo", "echo", Echo.echo_args(text="\u00e9\u4e2d" * 20)),
        ("Echo", "fail", Echo.fail_args(kind="declared")),
        ("Echo", "fail", Echo.fail_args(kind="undeclared")),
        ("Echo", "ping", Echo.ping_args()),
        ("Echo", "notify", Echo.notify_args(text="n")),
        ("Echo", "whoami", Echo.whoami_args()),
        ("Calc", "add", Calc.add_args(a=1, b=2)),
    ]
    frames = []
    for seq, (service, method, args) in enumerate(calls):
        body = codec.encode_message(method, TMessageType.CALL, seq, args)
        for variant, flags in enumerate((0x01, 0x81, 0x41, 0xC1, 0x01, 0x01)):
            header = _header(service, method, seq, body, variant)
            frames.append(protocol.encode_unified(header, body, flags))
        if method != "whoami":                         # ambiguous natively: also fine
            frames.append(protocol.encode_framed(body))
    frames.append(protocol.encode_unified(protocol.scanner_heartbeat_request(), b""))
    frames.append(protocol.encode_unified(
        protocol.request_header("", 5, 1000, message_type=protocol.MessageType.NORMAL_HEARTBEAT),
        b""))
    return frames


CORPUS = corpus()


# --- mutations --------------------------------------------------------------------------

def _bit_flips(rng: random.Random, data: bytearray) -> bytearray:
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return data


def _byte_sets(rng: random.Random, data: bytearray) -> bytearray:
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    return data


def _truncate(rng: random.Random, data: bytearray) -> bytearray:
    return data[:rng.randrange(len(data))]


def _length_edit(rng: random.Random, data: bytearray) -> bytearray:
    interesting = [0, 1, 2, 9, -1, -2, 0x7FFFFFFF, -0x80000000, 0x7FFF, 0x8000, 0xFFFF,
                   len(data), len(data) - 8, len(data) - 10, len(data) + 1, len(data) - 1]
    value = rng.choice(interesting) + rng.choice([0, 0, 1, -1])
    if len(data) < 10:
        data = data + bytearray(10 - len(data))
    if data[:2] == b"\xab\xba" and rng.random() < 0.5:
        struct.pack_into("!h", data, 8, max(-0x8000, min(0x7FFF, value)))     # header_length
    else:
        offset = 4 if data[:2] == b"\xab\xba" else 0                           # total / frame
        struct.pack_into("!i", data, offset, max(-0x80000000, min(0x7FFFFFFF, value)))
    return data


def _inner_length_edit(rng: random.Random, data: bytearray) -> bytearray:
    # a thrift string/container length somewhere inside: pick any 4 aligned-ish bytes
    if len(data) > 16:
        i = rng.randrange(10, len(data) - 4)
        struct.pack_into("!i", data, i, rng.choice([-1, 0x7FFFFFFF, 0x10000000, 1 << 20, 3]))
    return data


def _splice(rng: random.Random, data: bytearray) -> bytearray:
    other = rng.choice(CORPUS)
    cut_a, cut_b = rng.randrange(len(data)), rng.randrange(len(other))
    return data[:cut_a] + bytearray(other[cut_b:])


def _insert_delete(rng: random.Random, data: bytearray) -> bytearray:
    i = rng.randrange(len(data))
    if rng.random() < 0.5:
        return data[:i] + bytearray(rng.randbytes(rng.randint(1, 16))) + data[i:]
    return data[:i] + data[i + rng.randint(1, 16):]


def _random_bytes(rng: random.Random, data: bytearray) -> bytearray:
    prefix = rng.choice([b"", b"\xab\xba", b"\xab\xba\x00\x01", struct.pack("!i", 40)])
    return bytearray(prefix + rng.randbytes(rng.randint(0, 200)))


def _gzip_payload(rng: random.Random, data: bytearray) -> bytearray:
    # a well-framed gzip frame whose inflated content is garbage
    junk = gzip.compress(rng.randbytes(rng.randint(0, 300)))
    head_len = rng.randint(-5, 400)
    return bytearray(b"\xab\xba\x00\x41" + struct.pack("!ih", 2 + len(junk), head_len) + junk)


MUTATIONS: List[Callable[[random.Random, bytearray], bytearray]] = [
    _bit_flips, _bit_flips, _byte_sets, _truncate, _length_edit, _length_edit,
    _inner_length_edit, _splice, _insert_delete, _random_bytes, _gzip_payload]


def fuzz_frame(rng: random.Random) -> bytes:
    """One frame: usually a mutation (sometimes two) of a valid one, now and then a valid one."""
    data = bytearray(rng.choice(CORPUS))
    if rng.random() < 0.1:
        return bytes(data)
    for _ in range(1 if rng.random() < 0.8 else 2):
        if data:
            data = rng.choice(MUTATIONS)(rng, data)
    return bytes(data)


# --- the server in its own process ------------------------------------------------------

SERVER_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {tests!r})
    import octo_core
    from octo_core.transport.loop import new_event_loop
    from wire_helpers import Echo, Calc, EchoHandler, CalcHandler

    class Handler(EchoHandler):      # nothing a fuzzed argument can make block
        async def slow(self, text, delay_ms):
            return text
        def nap(self, text, delay_ms):
            return text
        def block(self, text):
            return text

    async def main():
        protection = {{}}
        if {protected!r}:
            from octo_core.auth import Authenticator, DerivedTokens
            protection = dict(
                auth=Authenticator(DerivedTokens({master!r}), acl={{"*": ["Echo.*", "Calc.add"]}},
                                   deny=["192.0.2.0/24"], nonce_capacity=10000),
                quotas={{"*": 100000}}, max_in_flight=1000, max_in_flight_per_connection=100,
                max_connections=200)
        server = octo_core.Server({appkey!r}, "127.0.0.1", 0,
                                  max_frame_size=1 << 20, read_timeout=2.0, **protection)
        server.add_service(Echo, Handler())
        server.add_service(Calc, CalcHandler())
        await server.start()
        print(server.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop(grace=1.0)

    loop = new_event_loop()
    loop.run_until_complete(main())
""")


# What the server logs for a handler's own exception: its message, then its traceback.
HANDLER_ERROR = re.compile(r"^\w+\.\w+ raised (\w+): .*\nTraceback \(most recent call last\):\n"
                           r"(?:  .*\n)+\1: .*\n", re.MULTILINE)


@contextlib.contextmanager
def server_process(tmp_path, protected: bool = False) -> Iterator[Tuple[subprocess.Popen, str, str]]:
    log_path = str(tmp_path / f"server-{protected}.log")
    script = SERVER_SCRIPT.format(tests=HERE, protected=protected, master=MASTER,
                                  appkey=SERVER_APPKEY)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", script],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    try:
        line = _readline_with_timeout(proc, 20)
        assert line.strip().isdigit(), f"server did not start: {line!r} {open(log_path).read()}"
        yield proc, f"{LOCALHOST}:{int(line)}", log_path
    finally:
        with contextlib.suppress(Exception):
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()


def _readline_with_timeout(proc: subprocess.Popen, timeout: float) -> str:
    import selectors
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            proc.kill()
            raise AssertionError("the server process printed no port")
    return proc.stdout.readline().decode()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# --- the attack -------------------------------------------------------------------------

class Attacker:
    """One fuzzing connection; reconnects whenever the server closes it."""

    def __init__(self, address: str, rng: random.Random) -> None:
        self.address = address
        self.rng = rng
        self.sent = 0
        self.reconnects = 0
        self.replies = 0              # bytes the server sent back

    async def _open(self):
        host, _, port = self.address.rpartition(":")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)

        async def drain_replies() -> None:
            with contextlib.suppress(Exception):
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    self.replies += len(data)
        return reader, writer, asyncio.ensure_future(drain_replies())

    async def run(self, frames: int) -> None:
        reader, writer, drainer = await self._open()
        try:
            for i in range(frames):
                if drainer.done() or writer.is_closing():     # the server hung up on us
                    writer.close()
                    reader, writer, drainer = await self._open()
                    self.reconnects += 1
                data = fuzz_frame(self.rng)
                self.sent += 1
                # now and then split a frame across writes, as a slow peer would
                if len(data) > 4 and self.rng.random() < 0.1:
                    cut = self.rng.randrange(1, len(data))
                    if not _write(writer, data[:cut]):
                        continue
                    await asyncio.sleep(0)
                    data = data[cut:]
                _write(writer, data)
                if i % 10 == 9:
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await asyncio.wait_for(writer.drain(), 5)
                # a moment for the server to answer or hang up, so that few frames are
                # wasted on a connection it has already dropped
                await asyncio.sleep(0.001)
        finally:
            writer.close()
            drainer.cancel()
            with contextlib.suppress(BaseException):
                await drainer


def _write(writer: asyncio.StreamWriter, data: bytes) -> bool:
    """Write unless the server already closed the connection (the next frame reconnects)."""
    try:
        writer.write(data)
        return True
    except (RuntimeError, ConnectionError):     # uvloop: "the handler is closed"
        return False


async def fuzz_round(address: str, seed: int) -> List[Attacker]:
    attackers = [Attacker(address, random.Random(f"{seed}-{i}")) for i in range(CONNECTIONS)]
    await asyncio.wait_for(asyncio.gather(*(a.run(FRAMES_PER_CONNECTION) for a in attackers)), 25)
    return attackers


def signing(protected: bool) -> dict:
    return dict(token=TOKEN, remote_appkey=SERVER_APPKEY) if protected else {}


async def still_serves(address: str, protected: bool) -> None:
    async with async_client(Echo, address, **signing(protected)) as client:
        assert await client.echo("alive") == "alive"
    if not protected:
        async with raw_connection(address) as raw:
            await raw.send(unified_request("echo", Echo.echo_args(text="raw"), 1))
            assert decode_body(await raw.read_frame(), Echo)[3].success == "raw"
        async with async_client(Calc, address, protocol="thrift") as native:
            assert await native.add(2, 3) == 5


@pytest.mark.parametrize("protected", [False, True], ids=["plain", "auth-quotas-limits"])
def test_fuzz_many_connections_while_a_good_client_calls(tmp_path, protected):
    with server_process(tmp_path, protected) as (proc, address, log_path):
        async def main():
            async with async_client(Echo, address, timeout=5.0,
                                    **signing(protected)) as good_client:
                good = GoodCaller(good_client, pause=0.001)
                try:
                    first = await fuzz_round(address, SEED)
                    assert proc.poll() is None, "the server process died in round 1"
                    await still_serves(address, protected)
                    await asyncio.sleep(0.3)
                    rss_before = rss_bytes(proc.pid)
                    second = await fuzz_round(address, SEED + 1)
                    assert proc.poll() is None, "the server process died in round 2"
                    await still_serves(address, protected)
                    await asyncio.sleep(0.3)
                    rss_after = rss_bytes(proc.pid)
                finally:
                    await good.stop()
                assert good.failures == [], (len(good.failures), good.failures[:3])
                assert good.calls > 0
                return first + second, rss_before, rss_after

        attackers, rss_before, rss_after = run(main(), timeout=60)
        assert proc.poll() is None
    sent = sum(a.sent for a in attackers)
    assert sent == 2 * CONNECTIONS * FRAMES_PER_CONNECTION
    assert sum(a.reconnects for a in attackers) > 0, "no mutation ever made the server hang up"
    assert sum(a.replies for a in attackers) > 0, "no fuzzed frame was ever answered"
    growth = rss_after - rss_before
    assert growth < RSS_GROWTH_LIMIT, f"server RSS grew {growth / 1e6:.1f} MB in round 2"
    with open(log_path, encoding="utf-8", errors="replace") as server_log:
        log = server_log.read()
    # (a handler that fails on fuzzed arguments is logged with its traceback, on purpose)
    log = HANDLER_ERROR.sub("", log)
    assert "Traceback" not in log, "the server had an unhandled exception:\n" + \
        log[max(0, log.find("Traceback") - 2000):log.find("Traceback") + 3000]
    assert proc.returncode == 0, f"server exit code {proc.returncode}"


# --- a hypothesis fuzzer on one connection, in process -----------------------------------

@st.composite
def hostile_bytes(draw) -> bytes:
    rng = random.Random(draw(st.integers(0, 2 ** 32 - 1)))
    kind = draw(st.sampled_from(["mutated", "mutated", "raw", "concat"]))
    if kind == "raw":
        return draw(st.binary(min_size=1, max_size=300))
    if kind == "concat":
        return b"".join(fuzz_frame(rng) for _ in range(draw(st.integers(2, 5))))
    return fuzz_frame(rng) or b"\x00"


class QuickEcho(EchoHandler):
    async def slow(self, text: str, delay_ms: int) -> str:
        return text

    def nap(self, text: str, delay_ms: int) -> str:
        return text

    def block(self, text: str) -> str:
        return text


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=hostile_bytes())
def test_hostile_bytes_cost_at_most_their_own_connection(data):
    async def main():
        async with serving([(Echo, QuickEcho(), None), (Calc, CalcHandler(), None)],
                           max_frame_size=1 << 20, read_timeout=1.0) as server:
            async with raw_connection(server.address) as bystander:
                async with raw_connection(server.address) as raw:
                    await raw.send(data)
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(raw.reader.read(65536), 0.05)
                await bystander.send(unified_request("echo", Echo.echo_args(text="ok"), 1))
                assert decode_body(await bystander.read_frame(), Echo)[3].success == "ok"
            async with raw_connection(server.address) as fresh:
                await fresh.send(unified_request("echo", Echo.echo_args(text="new"), 2))
                assert decode_body(await fresh.read_frame(), Echo)[3].success == "new"

    run(main(), timeout=10)
