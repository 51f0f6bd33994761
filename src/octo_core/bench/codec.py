"""Codec benchmark: octo_core against thriftpy2 (cybin and pure) and Apache fastbinary.

Everything both runners need lives here, so ``octo bench codec`` and the
pytest-benchmark suite (``benchmarks/bench_codec.py``) share one definition of
the payloads, of how each peer is called and of what a correct result is:

* ``build_object(kind)``: the deterministic ``Small`` / ``Payload`` values of
  ``payload.thrift`` as thriftpy2 objects (``kind`` is ``"small"`` or
  ``"payload"``);
* ``get_peers()``: one ``Peer`` per implementation, available or not (a
  missing library gives a peer with ``missing`` set, never a fake);
* ``make_call(peer, kind, op)``: the exact ``fn, args`` that is timed, plus the
  value it must return;
* ``verify(peers)``: every peer's encoded bytes are identical and every peer
  decodes them to the equal value;
* ``measure(...)`` / ``format_table(...)`` / ``run(...)``: the
  ``time.perf_counter`` runner behind ``octo bench codec``.

How each peer is called (the cheapest way a user of that library would):

* ``octo_core``: ``octo_core.codec.encode(obj)`` and ``decode(cls, data)``.
* ``thriftpy2 cybin``: one ``TCyMemoryBuffer`` + ``TCyBinaryProtocol`` kept and
  reused for every call (as a connection's transport is), ``write_struct`` +
  ``getvalue`` + ``clean`` to encode, ``setvalue`` + ``read_struct`` into a new
  object to decode. This is faster than ``thriftpy2.utils.serialize``, which
  builds a new buffer and protocol each call.
* ``thriftpy2 pure``: the same with the pure-Python classes,
  ``thriftpy2.protocol.binary.TBinaryProtocolFactory`` over
  ``thriftpy2.transport.memory.TMemoryBuffer`` (on CPython the package-level
  names ``thriftpy2.protocol.TBinaryProtocolFactory`` and
  ``thriftpy2.transport.TMemoryBuffer`` are aliases of the Cython classes).
* ``apache fastbinary``: ``fastbinary.encode_binary(obj, [cls, cls.thrift_spec])``
  called directly; decoding needs a ``CReadableTransport``, so each call wraps
  the bytes in a new ``TMemoryBuffer`` and hands it to one reused
  ``TBinaryProtocolAccelerated`` (``decode_binary(obj, protocol, [cls, spec])``
  reads the transport and the length limits from the protocol). The Apache
  classes are ``octo_core.bench._apache_payload``.
"""
from __future__ import annotations

import functools
import gc
import itertools
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, TextIO, Tuple

from octo_core import codec as octo_codec
from octo_core.idl import load_idl

PAYLOAD_THRIFT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "payload.thrift")

#: Payload kinds, in table order; each names a struct of payload.thrift.
KINDS: Tuple[str, ...] = ("payload", "small")
STRUCT_NAMES: Dict[str, str] = {"small": "Small", "payload": "Payload"}
#: Operations, in table order.
OPS: Tuple[str, ...] = ("encode", "decode")

OCTO = "octo_core"
CYBIN = "thriftpy2 cybin"
PURE = "thriftpy2 pure"
APACHE = "apache fastbinary"
#: Every implementation, in table order; the first is the one ratios are of.
PEER_NAMES: Tuple[str, ...] = (OCTO, CYBIN, PURE, APACHE)
#: Short ids (pytest parameter ids).
PEER_IDS: Dict[str, str] = {OCTO: "octo_core", CYBIN: "cybin", PURE: "pure", APACHE: "fastbinary"}

#: Speed targets: (peer, kind, op, minimum octo_core ÷ peer ratio).
#: Beating fastbinary means a ratio above 1.0.
TARGETS: Tuple[Tuple[str, str, str, float], ...] = (
    (CYBIN, "payload", "encode", 2.5),
    (CYBIN, "payload", "decode", 1.8),
    (CYBIN, "small", "encode", 2.0),
    (CYBIN, "small", "decode", 1.5),
    (APACHE, "payload", "encode", 1.0),
    (APACHE, "payload", "decode", 1.0),
    (APACHE, "small", "encode", 1.0),
    (APACHE, "small", "decode", 1.0),
)


# --- payloads -------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def payload_module() -> ModuleType:
    """The thriftpy2 module of ``payload.thrift`` (loaded once)."""
    if not os.path.exists(PAYLOAD_THRIFT):
        raise FileNotFoundError(
            f"{PAYLOAD_THRIFT} is missing: this octo_core install lacks the benchmark IDL "
            "(package data of octo_core.bench)")
    return load_idl(PAYLOAD_THRIFT, module_name="octo_core_bench_payload_thrift")


def build_small(index: int = 0) -> Any:
    """A deterministic ``Small``: the benchmark's small struct for ``index`` 0."""
    m = payload_module()
    return m.Small(id=42 + index, name=f"item-{index:02d}", score=3.25 + 1.5 * index)


def build_payload() -> Any:
    """The deterministic ``Payload`` (about 1.9 KB encoded).

    title is 20 bytes, body 200 bytes, ``ids`` 100 i64 values across the whole
    signed range used in practice, ``tags`` 10 entries and ``items`` 20
    ``Small`` structs. All text is ASCII.
    """
    m = payload_module()
    sentence = "The quick brown fox jumps over the lazy dog; "
    body = (sentence * (200 // len(sentence) + 1))[:200]
    ids = [(1_600_000_000_000 + i * 7_919) * (-1 if i % 7 == 3 else 1) for i in range(95)]
    ids += [0, 1, -1, 2 ** 63 - 1, -(2 ** 63)]
    tags = {f"tag-{i:02d}": f"value-{i:02d}" for i in range(10)}
    items = [build_small(i) for i in range(20)]
    return m.Payload(code=200, timestamp=1_700_000_000_123, ratio=0.7321, active=True,
                     title="quarterly report #42", body=body, ids=ids, tags=tags, items=items)


def build_object(kind: str) -> Any:
    """The thriftpy2 object of payload ``kind`` (``"small"`` or ``"payload"``)."""
    if kind == "small":
        return build_small()
    if kind == "payload":
        return build_payload()
    raise ValueError(f"unknown payload kind {kind!r}; expected one of {KINDS}")


def struct_class(kind: str) -> type:
    """The thriftpy2 class of payload ``kind``."""
    return getattr(payload_module(), STRUCT_NAMES[kind])


def to_apache(value: Any) -> Any:
    """Convert a thriftpy2 value (struct, container or scalar) to Apache's classes.

    Structs map by name onto ``octo_core.bench._apache_payload``; lists, sets
    and dicts are converted element by element; scalars are returned as is.
    """
    from octo_core.bench import _apache_payload

    if hasattr(type(value), "thrift_spec") and hasattr(value, "__dict__"):
        cls = getattr(_apache_payload, type(value).__name__)
        return cls(**{name: to_apache(v) for name, v in vars(value).items()})
    if isinstance(value, list):
        return [to_apache(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return {to_apache(v) for v in value}
    if isinstance(value, dict):
        return {to_apache(k): to_apache(v) for k, v in value.items()}
    return value


# --- peers ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    """One timed operation: ``fn(*args)``, and the value it must return."""

    fn: Callable[..., Any]
    args: Tuple[Any, ...]
    expected: Any

    def __call__(self) -> Any:
        """Run the operation once."""
        return self.fn(*self.args)


class Peer:
    """One codec implementation. ``missing`` is the reason it cannot run, or ``None``."""

    name: str = ""
    missing: Optional[str] = None

    def native(self, obj: Any) -> Any:
        """This peer's form of thriftpy2 object ``obj`` (what it encodes and decodes to)."""
        return obj

    def encoder(self, obj: Any) -> Tuple[Callable[..., bytes], Tuple[Any, ...]]:
        """``(fn, args)`` with ``fn(*args)`` returning the bytes of native object ``obj``."""
        raise NotImplementedError

    def decoder(self, kind: str, data: bytes) -> Tuple[Callable[..., Any], Tuple[Any, ...]]:
        """``(fn, args)`` with ``fn(*args)`` decoding ``data`` into a new native ``kind`` object."""
        raise NotImplementedError


class MissingPeer(Peer):
    """An implementation that is not installed; it is reported, never timed."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.missing = reason


class OctoCorePeer(Peer):
    """``octo_core.codec.encode`` / ``decode``, called directly."""

    name = OCTO

    def encoder(self, obj: Any) -> Tuple[Callable[..., bytes], Tuple[Any, ...]]:
        return octo_codec.encode, (obj,)

    def decoder(self, kind: str, data: bytes) -> Tuple[Callable[..., Any], Tuple[Any, ...]]:
        return octo_codec.decode, (struct_class(kind), data)


class Thriftpy2Peer(Peer):
    """A thriftpy2 protocol over one reused memory buffer (per timed call site)."""

    def __init__(self, name: str, protocol_factory: Any, buffer_class: type) -> None:
        self.name = name
        self._factory = protocol_factory
        self._buffer_class = buffer_class

    def _protocol(self) -> Tuple[Any, Any]:
        buf = self._buffer_class()
        return buf, self._factory.get_protocol(buf)

    def encoder(self, obj: Any) -> Tuple[Callable[..., bytes], Tuple[Any, ...]]:
        buf, proto = self._protocol()
        write_struct, getvalue = proto.write_struct, buf.getvalue
        reset = getattr(buf, "clean", None) or (lambda: buf.setvalue(b""))

        def encode(o: Any) -> bytes:
            write_struct(o)
            data = getvalue()
            reset()
            return data

        return encode, (obj,)

    def decoder(self, kind: str, data: bytes) -> Tuple[Callable[..., Any], Tuple[Any, ...]]:
        buf, proto = self._protocol()
        setvalue, read_struct = buf.setvalue, proto.read_struct

        def decode(cls: type, d: bytes) -> Any:
            o = cls()
            setvalue(d)
            read_struct(o)
            return o

        return decode, (struct_class(kind), data)


class ApachePeer(Peer):
    """Apache Thrift's C ``fastbinary`` module, called directly."""

    name = APACHE

    def __init__(self) -> None:
        from thrift.protocol import fastbinary
        from thrift.protocol.TBinaryProtocol import TBinaryProtocolAccelerated
        from thrift.transport.TTransport import TMemoryBuffer

        from octo_core.bench import _apache_payload

        self._fastbinary = fastbinary
        self._protocol_class = TBinaryProtocolAccelerated
        self._buffer_class = TMemoryBuffer
        self._classes = _apache_payload

    def native(self, obj: Any) -> Any:
        return to_apache(obj)

    def encoder(self, obj: Any) -> Tuple[Callable[..., bytes], Tuple[Any, ...]]:
        cls = type(obj)
        return self._fastbinary.encode_binary, (obj, [cls, cls.thrift_spec])

    def decoder(self, kind: str, data: bytes) -> Tuple[Callable[..., Any], Tuple[Any, ...]]:
        cls = getattr(self._classes, STRUCT_NAMES[kind])
        type_args = [cls, cls.thrift_spec]
        buffer_class = self._buffer_class
        protocol = self._protocol_class(buffer_class(), fallback=False)
        decode_binary = self._fastbinary.decode_binary

        def decode(d: bytes) -> Any:
            o = cls()
            protocol.trans = buffer_class(d)
            decode_binary(o, protocol, type_args)
            return o

        return decode, (data,)


def _make_cybin() -> Peer:
    try:
        # (cybin is compiled, without a stub: mypy cannot see what it defines)
        from thriftpy2.protocol.cybin import TCyBinaryProtocolFactory  # type: ignore[attr-defined]
        from thriftpy2.transport import TCyMemoryBuffer
        from thriftpy2.transport.memory import TMemoryBuffer as PyMemoryBuffer
    except ImportError as exc:
        return MissingPeer(CYBIN, f"missing: thriftpy2.protocol.cybin is not importable ({exc})")
    if TCyMemoryBuffer is PyMemoryBuffer:  # thriftpy2 built without its Cython parts
        return MissingPeer(CYBIN, "missing: thriftpy2 was installed without its Cython extensions")
    return Thriftpy2Peer(CYBIN, TCyBinaryProtocolFactory(), TCyMemoryBuffer)


def _make_pure() -> Peer:
    # Not ``thriftpy2.protocol.TBinaryProtocolFactory`` nor ``thriftpy2.transport.TMemoryBuffer``:
    # on CPython thriftpy2 aliases those names to the Cython classes.
    from thriftpy2.protocol.binary import TBinaryProtocolFactory
    from thriftpy2.transport.memory import TMemoryBuffer

    return Thriftpy2Peer(PURE, TBinaryProtocolFactory(), TMemoryBuffer)


def _make_apache() -> Peer:
    try:
        import thrift  # noqa: F401
    except ImportError:
        return MissingPeer(APACHE, "missing: the `thrift` package (Apache) is not installed")
    try:
        return ApachePeer()
    except ImportError as exc:
        return MissingPeer(APACHE, f"missing: thrift is installed without fastbinary ({exc})")


@functools.lru_cache(maxsize=None)
def _peers() -> Tuple[Peer, ...]:
    return (OctoCorePeer(), _make_cybin(), _make_pure(), _make_apache())


def get_peers() -> List[Peer]:
    """Every implementation in ``PEER_NAMES`` order; unavailable ones are ``MissingPeer``."""
    return list(_peers())


def get_peer(name_or_id: str) -> Peer:
    """The peer called ``name_or_id`` (a ``PEER_NAMES`` entry or a ``PEER_IDS`` value)."""
    for peer in _peers():
        if name_or_id in (peer.name, PEER_IDS[peer.name]):
            return peer
    raise KeyError(name_or_id)


@functools.lru_cache(maxsize=None)
def reference_bytes(kind: str) -> bytes:
    """The bytes every peer must produce for ``kind`` (and that every peer decodes).

    This is octo_core's encoding; ``verify`` checks that every other peer agrees.
    """
    return octo_codec.encode(build_object(kind))


def make_call(peer: Peer, kind: str, op: str) -> Call:
    """The timed call of ``peer`` doing ``op`` (``"encode"``/``"decode"``) on ``kind``.

    ``encode`` encodes the peer's form of ``build_object(kind)`` and must return
    ``reference_bytes(kind)``; ``decode`` decodes ``reference_bytes(kind)`` and
    must return a value equal to the peer's form of ``build_object(kind)``.
    Each call builds fresh objects, so calls never share state.
    """
    if peer.missing:
        raise RuntimeError(f"{peer.name} is not available: {peer.missing}")
    if op == "encode":
        fn, args = peer.encoder(peer.native(build_object(kind)))
        return Call(fn, args, reference_bytes(kind))
    if op == "decode":
        fn, args = peer.decoder(kind, reference_bytes(kind))
        return Call(fn, args, peer.native(build_object(kind)))
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


# --- correctness check -------------------------------------------------------------------

@dataclass
class Verification:
    """Result of ``verify``: ``broken`` holds the (peer, kind, op) that failed."""

    broken: Dict[Tuple[str, str, str], str] = field(default_factory=dict)
    sizes: Dict[str, int] = field(default_factory=dict)
    checked: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every available peer agreed on every payload."""
        return not self.broken


def _first_difference(a: bytes, b: bytes) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (f"{len(a)} B vs {len(b)} B, first difference at byte {n}: "
            f"{a[n:n + 12].hex()} vs {b[n:n + 12].hex()}")


def verify(peers: Sequence[Peer], kinds: Iterable[str] = KINDS) -> Verification:
    """Check that all available peers encode ``kinds`` to identical bytes and decode them equal.

    The expected bytes are the ones most peers produce (octo_core's on a tie);
    a peer that disagrees, raises, or decodes to an unequal value is recorded
    in ``Verification.broken`` with the reason.
    """
    result = Verification()
    live = [p for p in peers if not p.missing]
    result.checked = [p.name for p in live]
    for kind in kinds:
        outputs: Dict[str, bytes] = {}
        for peer in live:
            try:
                fn, args = peer.encoder(peer.native(build_object(kind)))
                outputs[peer.name] = fn(*args)
            except Exception as exc:  # a crashing peer is a broken peer
                result.broken[(peer.name, kind, "encode")] = f"raised {exc!r}"
        votes: Dict[bytes, List[str]] = {}
        for name, data in outputs.items():
            votes.setdefault(data, []).append(name)
        if votes:
            top = max(len(v) for v in votes.values())
            winners = [d for d, names in votes.items() if len(names) == top]
            expected = next((d for d in winners if OCTO in votes[d]), winners[0])
            result.sizes[kind] = len(expected)
            for name, data in outputs.items():
                if data != expected:
                    result.broken[(name, kind, "encode")] = (
                        "encoded bytes differ from " + ", ".join(votes[expected]) + ": "
                        + _first_difference(data, expected))
            if expected != outputs.get(OCTO):
                for peer in live:
                    result.broken.setdefault(
                        (peer.name, kind, "decode"),
                        "not checked: octo_core's bytes (the decode input) are not the agreed ones")
                continue
        for peer in live:
            if (peer.name, kind, "decode") in result.broken:
                continue
            try:
                call = make_call(peer, kind, "decode")
                got = call()
            except Exception as exc:
                result.broken[(peer.name, kind, "decode")] = f"raised {exc!r}"
                continue
            if got != call.expected:
                result.broken[(peer.name, kind, "decode")] = (
                    f"decoded value differs: {got!r:.200} != {call.expected!r:.200}")
    return result


# --- timing --------------------------------------------------------------------------------

@dataclass
class Timing:
    """Best time of one (peer, kind, op) over the rounds."""

    peer: str
    kind: str
    op: str
    best: float  # seconds per operation
    number: int  # operations per round
    rounds: int

    @property
    def ops(self) -> float:
        """Operations per second (from the best round)."""
        return 1.0 / self.best


def _time_batch(call: Call, number: int) -> float:
    """Seconds ``number`` back-to-back calls take (gc off, as ``timeit`` does)."""
    fn, args = call.fn, call.args
    loop = itertools.repeat(None, number)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in loop:
            fn(*args)
        return time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()


def _calibrate(call: Call, target: float) -> int:
    """How many calls take about ``target`` seconds."""
    number = 1
    while True:
        elapsed = _time_batch(call, number)
        if elapsed >= target / 4 or number >= 1 << 30:
            break
        number *= 4 if elapsed < target / 40 else 2
    return max(1, int(number * target / max(elapsed, 1e-9)))


#: Length of one timed batch when ``rounds`` is chosen automatically: short
#: batches, many rounds, so the best round dodges the noise of a shared machine.
BATCH_SECONDS = 0.02


def auto_rounds(seconds: float) -> int:
    """Rounds for a ``seconds`` budget: ``BATCH_SECONDS`` batches, at least 5."""
    return max(5, int(round(seconds / BATCH_SECONDS)))


def measure(peers: Sequence[Peer], seconds: float, rounds: Optional[int] = None,
            kinds: Iterable[str] = KINDS, ops: Iterable[str] = OPS,
            skip: Iterable[Tuple[str, str, str]] = ()) -> Dict[Tuple[str, str, str], Timing]:
    """Time every available peer on every (kind, op); returns ``{(peer, kind, op): Timing}``.

    Each (peer, kind, op) gets about ``seconds`` of timing split into ``rounds``
    batches (``auto_rounds(seconds)`` by default). The peers of one (kind, op)
    are interleaved round by round (the order rotating) so drift on a busy
    machine hits them all alike; each keeps its best batch. The calibration
    batches are not counted. ``skip`` lists (peer, kind, op) not to time.
    """
    if rounds is None:
        rounds = auto_rounds(seconds)
    if seconds <= 0 or rounds < 1:
        raise ValueError("seconds must be positive and rounds at least 1")
    skipped = set(skip)
    target = seconds / rounds
    timings: Dict[Tuple[str, str, str], Timing] = {}
    for kind in kinds:
        for op in ops:
            calls = [(p.name, make_call(p, kind, op)) for p in peers
                     if not p.missing and (p.name, kind, op) not in skipped]
            numbers = {name: _calibrate(call, target) for name, call in calls}
            best = {name: float("inf") for name, _ in calls}
            for r in range(rounds):
                shift = r % len(calls) if calls else 0
                for name, call in calls[shift:] + calls[:shift]:
                    per_op = _time_batch(call, numbers[name]) / numbers[name]
                    best[name] = min(best[name], per_op)
            for name, _ in calls:
                timings[(name, kind, op)] = Timing(name, kind, op, best[name], numbers[name],
                                                   rounds)
    return timings


# --- report -------------------------------------------------------------------------------

def ratio(timings: Dict[Tuple[str, str, str], Timing], peer: str, kind: str,
          op: str) -> Optional[float]:
    """octo_core ÷ ``peer`` in ops/s (how many times faster octo_core is), or ``None``."""
    mine, theirs = timings.get((OCTO, kind, op)), timings.get((peer, kind, op))
    if mine is None or theirs is None:
        return None
    return theirs.best / mine.best


def format_table(peers: Sequence[Peer], timings: Dict[Tuple[str, str, str], Timing],
                 check: Verification) -> str:
    """The comparison table: a row per (kind, op, peer): ops/s, µs/op, octo_core ÷ peer."""
    header = (f"{'case':<16} {'implementation':<18} {'ops/s':>12} {'µs/op':>9} "
              f"{'octo_core ÷ peer':>17}")
    lines = [header, "-" * len(header)]
    for kind in KINDS:
        for op in OPS:
            case = f"{kind} {op}"
            for peer in peers:
                key = (peer.name, kind, op)
                label = case if peer is peers[0] else ""
                if peer.missing:
                    lines.append(f"{label:<16} {peer.name:<18} {peer.missing}")
                elif key in check.broken:
                    lines.append(f"{label:<16} {peer.name:<18} "
                                 f"BROKEN (not timed): {check.broken[key]}")
                elif key in timings:
                    t = timings[key]
                    r = ratio(timings, peer.name, kind, op)
                    rtext = f"{r:.2f}×" if r is not None else "n/a"
                    lines.append(f"{label:<16} {peer.name:<18} {t.ops:>12,.0f} "
                                 f"{t.best * 1e6:>9.3f} {rtext:>17}")
            lines.append("")
    return "\n".join(lines).rstrip("\n")


def format_targets(timings: Dict[Tuple[str, str, str], Timing]) -> str:
    """One line per entry of ``TARGETS``: the measured ratio and met / NOT met."""
    lines = []
    for peer, kind, op, need in TARGETS:
        r = ratio(timings, peer, kind, op)
        want = f"> {need:.1f}×" if need == 1.0 else f"≥ {need:.1f}×"
        if r is None:
            verdict, got = "n/a (not measured)", "-"
        else:
            met = r > need if need == 1.0 else r >= need
            verdict, got = ("met" if met else "NOT met"), f"{r:.2f}×"
        lines.append(f"  {kind:<8} {op:<7} vs {peer:<18} {want:>7}  measured {got:>7}  {verdict}")
    return "\n".join(lines)


def _versions() -> str:
    parts = [f"Python {platform.python_version()} ({platform.python_implementation()})"]
    for dist in ("thriftpy2", "thrift"):
        try:
            from importlib.metadata import version

            parts.append(f"{dist} {version(dist)}")
        except Exception:
            parts.append(f"{dist} not installed")
    parts.append(f"{os.cpu_count()} CPUs")
    return ", ".join(parts)


def run(seconds: float = 1.0, rounds: Optional[int] = None, out: Optional[TextIO] = None) -> int:
    """Check, time and print the codec comparison; returns 0, or 1 if any peer was broken.

    ``seconds`` is the timing budget of each (implementation, payload, op),
    ``rounds`` how many interleaved batches it is split into (default
    ``auto_rounds(seconds)``).
    """
    out = out or sys.stdout
    if rounds is None:
        rounds = auto_rounds(seconds)
    peers = get_peers()
    check = verify(peers)
    print(f"octo bench codec: thrift binary encode/decode, {_versions()}", file=out)
    print("payloads: " + ", ".join(f"{STRUCT_NAMES[k]} {check.sizes.get(k, '?')} B" for k in KINDS)
          + f"; best of {rounds} interleaved rounds, ~{seconds:g} s per row, gc off while timing",
          file=out)
    if check.ok:
        print(f"check: encoded bytes identical and decoded values equal across "
              f"{', '.join(check.checked)}: PASS", file=out)
    else:
        bar = "!" * 78
        print(bar, file=out)
        print("check: FAILED: some implementations disagree; their rows are not timed", file=out)
        for (peer, kind, op), why in sorted(check.broken.items()):
            print(f"  {peer} {kind} {op}: {why}", file=out)
        print(bar, file=out)
    out.flush()
    timings = measure(peers, seconds, rounds, skip=check.broken)
    print("", file=out)
    print(format_table(peers, timings, check), file=out)
    print("", file=out)
    print("targets (octo_core ÷ peer):", file=out)
    print(format_targets(timings), file=out)
    return 0 if check.ok else 1
