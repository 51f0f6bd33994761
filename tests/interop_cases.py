"""What the interop tests against Apache Thrift's own libraries check, whichever
peer is on the other side (tests/test_interop_cpp.py, tests/test_interop_java.py):
``tests/idl/interop.thrift`` loaded as ``INTEROP``, values of every thrift type,
``exercise`` (the calls each pairing of a client and a server makes, and what they
must give) and ``InteropHandler``, which our Server runs for the peers' clients.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import os
from typing import Any, Awaitable, Callable

import pytest
from thriftpy2.thrift import TApplicationException

import octo_core
from octo_core.errors import ApplicationError, CallTimeout

from strategies import canonical
from wire_helpers import async_client

INTEROP_IDL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "idl", "interop.thrift")
INTEROP = octo_core.load_idl(INTEROP_IDL, module_name="octo_interop_thrift")

Interop, Sign = INTEROP.Interop, INTEROP.Sign
Scalars, Inner, Variant, Node = INTEROP.Scalars, INTEROP.Inner, INTEROP.Variant, INTEROP.Node
Containers, Defaults, Everything = INTEROP.Containers, INTEROP.Defaults, INTEROP.Everything

Call = Callable[..., Awaitable[Any]]   # (method, *args) -> the result


EVERY_BYTE = bytes(range(256))

SCALARS = [
    Scalars(flag=True, tiny=-128, small=-32768, medium=-2**31, large=-2**63, real=-0.0,
            text="", blob=b"", sign=Sign.FLOOR),
    Scalars(flag=False, tiny=127, small=32767, medium=2**31 - 1, large=2**63 - 1,
            real=math.inf, text="ünï ✓ 𝄞 中文", blob=EVERY_BYTE, sign=Sign.CEILING),
    Scalars(flag=True, tiny=0, small=-1, medium=0, large=1, real=math.nan, text="nul\x00inside",
            blob=b"\x00", sign=Sign.MINUS_ONE),
    Scalars(flag=False, tiny=-1, small=0, medium=-1, large=0, real=-math.inf, text=" ",
            blob=b"\xff", sign=Sign.ZERO),
    Scalars(flag=True, tiny=1, small=1, medium=1, large=-1, real=5e-324, text="x" * 70_000,
            blob=EVERY_BYTE * 300, sign=12345),   # an enum value the IDL does not name
    Scalars(flag=False, tiny=2, small=2, medium=2, large=2, real=1.7976931348623157e308,
            text="\U0010ffff", blob=b"", sign=Sign.ZERO),
]

VARIANTS = [
    Variant(number=-2**63),
    Variant(text="ünï"),
    Variant(text=""),
    Variant(text=b"\xff\xfe not UTF-8"),     # read as bytes, written as they came
    Variant(inner=Inner(name="in a union", count=3, weight=-1)),
    Variant(reals=[math.nan, -0.0, math.inf, -math.inf]),
    Variant(reals=[]),
]

CONTAINERS = Containers(
    ints=[-2**31, 0, 2**31 - 1],
    tags={"", "a", "ünï"},
    counts={"": -2**63, "max": 2**63 - 1},
    matrix=[[], [-32768, 32767], [0]],
    by_sign={Sign.FLOOR: [Inner(name="f", count=1, weight=2)], Sign.CEILING: [], 7: []},
    nested={-1: {"every byte": EVERY_BYTE, "": b""}, 0: {}},
    set_list=[set(), {-2**63, 2**63 - 1}],
    # no NaN in a set: C++'s std::set<double> takes NaN as equal to everything
    real_set={-1.5, 0.0, math.inf, -math.inf, 1e-300},
    by_blob={EVERY_BYTE: True, b"": False, b"\xff": True},
    deep=[{"x": {-128, 127}, "": set()}, {}],
    signs={Sign.FLOOR, Sign.ZERO, Sign.CEILING},
    bools=[True, False, True],
    variants=VARIANTS,
)

EMPTY_CONTAINERS = Containers(ints=[], tags=set(), counts={}, matrix=[], by_sign={}, nested={},
                              set_list=[], real_set=set(), by_blob={}, deep=[], signs=set(),
                              bools=[], variants=[])

TREE = Node(value=1, children=[Node(value=2, children=[]),
                               Node(value=-3, children=[Node(value=4, children=[])])])


def everything(scalars: Any) -> Any:
    return Everything(scalars=scalars, containers=CONTAINERS, defaults=Defaults(),
                      variant=Variant(inner=Inner(name="top")), tree=TREE,
                      inners=[Inner(name="", count=-2**63, weight=-2**31), Inner(name="n")])


PAYLOADS = [everything(scalars) for scalars in SCALARS] + [
    # empty containers and strings; the optional variant and tree left out
    Everything(scalars=SCALARS[0], containers=EMPTY_CONTAINERS,
               defaults=Defaults(must="", primes=[], ages={}, greeting=""),
               inners=[]),
]


# --- what every pairing checks ----------------------------------------------------------

def as_sent(value: Any) -> Any:
    return value


@dataclasses.dataclass(frozen=True)
class Expect:
    """How the calling side reports a failure the IDL does not declare, and what
    comes back of a value sent through the peer's generated classes."""
    app_error: type           # the exception it raises
    undeclared_type: int      # that TApplicationException type the server sends
    undeclared_text: str      # in its message
    held: Callable[[Any], Any] = as_sent    # a value, as the peer's classes hold it


# Ours answers a handler's undeclared failure with INTERNAL_ERROR, naming it.
FROM_OURS = Expect(TApplicationException, TApplicationException.INTERNAL_ERROR, "boom")

_events = itertools.count()


async def exercise(call: Call, expect: Expect) -> None:
    """The calls every client and server pairing makes, and what they must give."""
    assert await call("ping") is None
    for payload in PAYLOADS:
        assert canonical(await call("echo", payload)) == canonical(expect.held(payload))
    for value in VARIANTS:
        assert canonical(await call("echo_variant", value)) == canonical(expect.held(value))

    assert await call("fail", "fine") == "fine"
    with pytest.raises(INTEROP.Oops) as oops:
        await call("fail", "oops")
    assert (oops.value.message, oops.value.code) == ("refused on purpose", 42)
    with pytest.raises(INTEROP.Fatal) as fatal:
        await call("fail", "fatal")
    assert (fatal.value.reason, fatal.value.trace) == ("fatal", ["a", "b"])
    with pytest.raises(expect.app_error) as undeclared:
        await call("fail", "undeclared")
    assert undeclared.value.type == expect.undeclared_type
    assert expect.undeclared_text in str(undeclared.value)

    event = f"event {next(_events)} ünï"
    assert await call("notify", event) is None
    for _ in range(500):          # a oneway call has no reply to wait for
        notes = await call("notes")
        if event in notes:
            break
        await asyncio.sleep(0.01)
    assert event in notes
    assert await call("slow", "after all that", 1) == "after all that"


def in_thread(blocking: Callable[..., Any]) -> Call:
    """A blocking ``call(method, *args)`` as a coroutine (off the event loop)."""
    async def call(method: str, *args: Any) -> Any:
        return await asyncio.to_thread(blocking, method, *args)
    return call


class InteropHandler:
    """Interop for our Server: behaves as the peers' servers' handlers (tests/cpp/,
    tests/java/)."""

    def __init__(self) -> None:
        self.events: list = []

    def ping(self) -> None:
        pass

    def echo(self, payload: Any) -> Any:
        return payload

    def echo_variant(self, value: Any) -> Any:
        return value

    def fail(self, kind: str) -> str:
        if kind == "oops":
            raise INTEROP.Oops(message="refused on purpose", code=42)
        if kind == "fatal":
            raise INTEROP.Fatal(reason="fatal", trace=["a", "b"])
        if kind == "undeclared":
            raise ValueError("boom")
        return kind

    def notify(self, event: str) -> None:
        self.events.append(event)

    def notes(self) -> list:
        return list(self.events)

    async def slow(self, text: str, delay_ms: int) -> str:
        await asyncio.sleep(delay_ms / 1000)
        return text


async def many_calls_on_one_connection(address: str, payloads: list,
                                       held: Callable[[Any], Any] = lambda value: value) -> None:
    """300 slow calls and ``payloads``' echoes, all sent at once on one native
    connection to a peer's server that answers a connection's calls in turn: each
    gets its own answer (``held``: a payload as the peer gives it back)."""
    async with async_client(Interop, address, protocol="thrift", pool_size=1,
                            timeout=10.0) as client:
        texts = [f"call {i}" for i in range(300)]
        answers = await asyncio.gather(*(client.slow(text, i % 2) for i, text in enumerate(texts)),
                                       *(client.echo(payload) for payload in payloads))
        assert answers[:len(texts)] == texts
        assert [canonical(a) for a in answers[len(texts):]] == \
            [canonical(held(p)) for p in payloads]


async def late_reply_is_dropped(address: str) -> None:
    """A call that timed out on a peer's server: its late reply is dropped, and the
    next call on the connection gets its own answer."""
    async with async_client(Interop, address, protocol="thrift", timeout=5.0) as client:
        with pytest.raises(CallTimeout):
            await client.call("slow", "late", 300, timeout=0.05)
        assert await client.fail("answered after it") == "answered after it"


async def unknown_method_is_refused(address: str, options: dict) -> None:
    """A method a peer's server lacks (``Unserved``'s, under ``Interop`` when
    multiplexed): UNKNOWN_METHOD naming it, and the connection still serves."""
    if options.get("multiplexed"):
        options = dict(options, service_name="Interop")
    async with async_client(INTEROP.Unserved, address, protocol="thrift", **options) as client:
        with pytest.raises(ApplicationError) as unknown:
            await client.ghost()
        assert unknown.value.type == TApplicationException.UNKNOWN_METHOD
        assert "ghost" in str(unknown.value)
        with pytest.raises(ApplicationError):
            await client.ghost()
