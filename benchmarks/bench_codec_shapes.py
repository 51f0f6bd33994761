"""octo_core's binary codec against thriftpy2 cybin and Apache fastbinary, shape by shape.

Run (from the repository root, after ``python setup.py build_ext --inplace``)::

    PYTHONPATH=src nice python3 benchmarks/bench_codec_shapes.py
    PYTHONPATH=src nice python3 benchmarks/bench_codec_shapes.py --only list_i32 map --repeat 9

Every shape is one struct of ``shapes.thrift`` (next to this script) holding a
deterministic value. For each shape the script first checks that the three
codecs write identical bytes and that each decodes those bytes back to an
equal value (a difference is printed as MISMATCH: it is a defect), then times
encode and decode of each codec in the same run, interleaved: ``--repeat``
rounds, each timing every codec once (``timeit``, the order rotating every
round), and keeps each codec's best round (``--stat median`` for the median).
The ratio columns are peer time ÷ octo_core time: above 1 we are faster.

How each codec is called (the cheapest way its users would, as
``octo_core.bench.codec`` does for ``octo bench codec``):

* octo_core: ``octo_core.codec.encode(obj)``, ``decode(cls, data)``;
* cybin: one reused ``TCyMemoryBuffer`` + ``TCyBinaryProtocol``:
  ``write_struct`` + ``getvalue`` + ``clean``; ``setvalue`` + ``read_struct``
  into ``cls()``;
* fastbinary: ``encode_binary(obj, [cls, spec])``; ``decode_binary(cls(),
  protocol, [cls, spec])`` with a new ``TMemoryBuffer`` on one reused
  ``TBinaryProtocolAccelerated``. Its classes come from
  ``/usr/bin/thrift --gen py`` run into a temporary directory; without the
  compiler (or with ``--no-apache``) the column is left out with a note.

Shapes marked ``fresh`` encode a new object for every timed call (timeit
``number=1``): a ``str`` caches its UTF-8 form on first use, so timing the
same non-ASCII string again and again would time only the first encoding once.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import timeit
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from octo_core import codec as octo_codec
from octo_core.idl import load_idl

HERE = os.path.dirname(os.path.abspath(__file__))
IDL = os.path.join(HERE, "shapes.thrift")
APACHE_PACKAGE = "octo_bench_shapes"   # the IDL's `namespace py`


# --- shapes ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    name: str
    struct: str                      # struct name in shapes.thrift
    build: Callable[[Any], Any]      # thriftpy2 module -> value (a thriftpy2 object)
    fresh: bool = False              # encode a new copy of the value for every timed call


def _wide(m: Any) -> Any:
    values = {}
    for i in range(1, 61):
        values[f"f{i}"] = (i * 100_003, i << 33, f"value-{i}", i * 0.25, bool(i % 2))[(i - 1) % 5]
    return m.Wide(**values)


def _nested(m: Any) -> Any:
    value = m.N8(leaf=7)
    for level in range(7, 0, -1):
        value = getattr(m, f"N{level}")(child=value)
    return value


NON_ASCII = "数据 données ñandú Ελληνικά ☃ "   # 1-, 2-, 3-byte UTF-8


def _text(m: Any) -> Any:
    # a new str each call: its UTF-8 form is not cached yet
    piece = NON_ASCII.encode("utf-8")
    data = (piece * (256 * 1024 // len(piece) + 1))[:256 * 1024]
    return m.Text(v=data.decode("utf-8", "ignore"))


def _item(m: Any, i: int) -> Any:
    return m.Item(id=100_000 + i, name=f"item-{i:04d}", score=i * 1.5)


SHAPES: List[Shape] = [
    Shape("scalars", "Scalars",
          lambda m: m.Scalars(b=True, y=-5, s=1234, i=123_456, l=1 << 40, d=3.14)),
    Shape("wide_60_fields", "Wide", _wide),
    Shape("nested_depth_8", "N1", _nested),
    Shape("list_i32_10k", "I32s", lambda m: m.I32s(v=[(i * 7919) % 2_000_003 - 1_000_000
                                                      for i in range(10_000)])),
    Shape("list_i64_10k", "I64s", lambda m: m.I64s(v=[i * 1_000_000_007 - 5_000_000_000
                                                      for i in range(10_000)])),
    Shape("list_double_10k", "Doubles", lambda m: m.Doubles(v=[i * 0.37 for i in range(10_000)])),
    Shape("list_bool_10k", "Bools", lambda m: m.Bools(v=[i % 3 == 0 for i in range(10_000)])),
    Shape("list_i16_10k", "I16s",
          lambda m: m.I16s(v=[(i * 37) % 65536 - 32768 for i in range(10_000)])),
    Shape("list_i8_10k", "I8s", lambda m: m.I8s(v=[i % 256 - 128 for i in range(10_000)])),
    Shape("list_string_1k", "Strings", lambda m: m.Strings(v=[f"s-{i:05d}" for i in range(1000)])),
    Shape("list_binary_1k", "Binaries",
          lambda m: m.Binaries(v=[bytes([i % 256]) * 32 for i in range(1000)])),
    Shape("binary_1MiB", "Blob", lambda m: m.Blob(v=bytes(range(256)) * 4096)),
    Shape("string_256KiB_utf8", "Text", _text),
    Shape("string_256KiB_utf8_fresh", "Text", _text, fresh=True),
    Shape("map_i32_string_1k", "MapI32Str",
          lambda m: m.MapI32Str(v={i * 1009: f"v-{i}" for i in range(1000)})),
    Shape("map_string_i64_1k", "MapStrI64",
          lambda m: m.MapStrI64(v={f"k-{i:04d}": i << 35 for i in range(1000)})),
    Shape("map_string_list_i64", "MapStrListI64",
          lambda m: m.MapStrListI64(v={f"k-{i}": [j << 33 for j in range(100)]
                                       for i in range(100)})),
    Shape("set_string_1k", "SetStr", lambda m: m.SetStr(v={f"member-{i}" for i in range(1000)})),
    Shape("set_i32_10k", "SetI32", lambda m: m.SetI32(v=set(range(1000, 11_000)))),
    Shape("list_list_i32_100x100", "ListListI32",
          lambda m: m.ListListI32(v=[[i * 1000 + j for j in range(100)] for i in range(100)])),
    Shape("list_map_str_str_100x10", "ListMapStrStr",
          lambda m: m.ListMapStrStr(v=[{f"k{j}": f"v{i}-{j}" for j in range(10)}
                                       for i in range(100)])),
    Shape("list_struct_1k", "Items", lambda m: m.Items(v=[_item(m, i) for i in range(1000)])),
    Shape("map_i64_struct_1k", "MapI64Item",
          lambda m: m.MapI64Item(v={i << 33: _item(m, i) for i in range(1000)})),
    Shape("map_str_map_str_str_100x10", "MapStrMap",
          lambda m: m.MapStrMap(v={f"outer-{i}": {f"k{j}": f"v{i}-{j}" for j in range(10)}
                                   for i in range(100)})),
    Shape("list_set_i32_100x100", "ListSetI32",
          lambda m: m.ListSetI32(v=[set(range(i * 1000, i * 1000 + 100)) for i in range(100)])),
    Shape("optional_mostly_unset", "Sparse", lambda m: m.Sparse(o2=1 << 40, o19="only two set")),
    Shape("enums", "Enums",
          lambda m: m.Enums(one=m.Color.RED, many=[m.Color.BLUE, m.Color.GREEN] * 50,
                            names={m.Color.RED: "red", m.Color.GREEN: "green"})),
    Shape("union", "Choice", lambda m: m.Choice(item=_item(m, 1))),
    Shape("list_union_300", "Choices",
          lambda m: m.Choices(v=[m.Choice(number=i) if i % 3 == 0 else
                                 m.Choice(text=f"t{i}") if i % 3 == 1 else
                                 m.Choice(item=_item(m, i)) for i in range(300)])),
    Shape("exception", "Failure",
          lambda m: m.Failure(code=503, message="service unavailable",
                              detail={"host": "10.0.0.1", "retry": "later"})),
    Shape("empty_struct", "Empty", lambda m: m.Empty()),
    Shape("list_empty_struct_1k", "Empties",
          lambda m: m.Empties(v=[m.Empty() for _ in range(1000)])),
    Shape("typedefs", "Typedefs",
          lambda m: m.Typedefs(at=1_700_000_000_000, who="alice", values=list(range(50)),
                               times=[1_700_000_000_000 + i for i in range(50)])),
    Shape("defaults", "Defaults", lambda m: m.Defaults()),
]


# --- codecs ----------------------------------------------------------------------------

class Codec:
    """One implementation: the timeit statements of encode and decode.

    ``encode_stmt`` reads the value from ``o``; ``decode_stmt`` the bytes from ``d``.
    Each leaves its result in ``_last`` as its last step, so every codec's previous
    result is still alive while it works (freeing it first would hand the allocator
    a warm block of the right size: a 512 KiB string decodes measurably faster).
    """

    name = ""
    encode_stmt = ""
    decode_stmt = ""

    def native(self, value: Any) -> Any:
        return value

    def namespace(self, shape: Shape, cls: type) -> Dict[str, Any]:
        raise NotImplementedError

    def encode(self, ns: Dict[str, Any], obj: Any) -> bytes:
        ns = dict(ns, o=obj)
        exec(self.encode_stmt.replace("\n", "; ") + "; r = _last", ns)  # noqa: S102
        return ns["r"]

    def decode(self, ns: Dict[str, Any], data: bytes) -> Any:
        ns = dict(ns, d=data)
        exec(ns.get("decode_stmt", self.decode_stmt), ns)  # noqa: S102
        return ns["_last"]


class Octo(Codec):
    name = "octo"
    encode_stmt = "_last = enc(o)"
    decode_stmt = "_last = dec(cls, d)"

    def namespace(self, shape: Shape, cls: type) -> Dict[str, Any]:
        return {"enc": octo_codec.encode, "dec": octo_codec.decode, "cls": cls}


class Cybin(Codec):
    name = "cybin"
    encode_stmt = "ws(o); _last = gv(); clean()"
    decode_stmt = "o = cls(); sv(d); rs(o); _last = o"

    def __init__(self) -> None:
        from thriftpy2.protocol.cybin import TCyBinaryProtocolFactory
        from thriftpy2.transport import TCyMemoryBuffer
        self._factory, self._buffer = TCyBinaryProtocolFactory(), TCyMemoryBuffer

    def namespace(self, shape: Shape, cls: type) -> Dict[str, Any]:
        wbuf, rbuf = self._buffer(), self._buffer()
        wproto, rproto = self._factory.get_protocol(wbuf), self._factory.get_protocol(rbuf)
        return {"ws": wproto.write_struct, "gv": wbuf.getvalue, "clean": wbuf.clean,
                "sv": rbuf.setvalue, "rs": rproto.read_struct, "cls": cls}


class Fastbinary(Codec):
    name = "fastbinary"
    encode_stmt = "_last = enc(o, ta)"
    decode_stmt = "o = acls(); proto.trans = TMB(d); dec(o, proto, ta); _last = o"
    # exceptions are immutable (Apache 0.14+): decode_binary builds the object itself
    immutable_decode_stmt = "proto.trans = TMB(d); _last = dec(None, proto, ta)"

    def __init__(self, module: Any) -> None:
        from thrift.protocol import fastbinary
        from thrift.protocol.TBinaryProtocol import TBinaryProtocolAccelerated
        from thrift.transport.TTransport import TMemoryBuffer
        self._fb, self._proto, self._tmb = fastbinary, TBinaryProtocolAccelerated, TMemoryBuffer
        self.module = module

    def native(self, value: Any) -> Any:
        """The Apache form of a thriftpy2 value (structs by class name)."""
        if hasattr(type(value), "thrift_spec") and hasattr(value, "__dict__"):
            cls = getattr(self.module, type(value).__name__)
            return cls(**{k: self.native(v) for k, v in vars(value).items()})
        if isinstance(value, list):
            return [self.native(v) for v in value]
        if isinstance(value, (set, frozenset)):
            return {self.native(v) for v in value}
        if isinstance(value, dict):
            return {self.native(k): self.native(v) for k, v in value.items()}
        return value

    def namespace(self, shape: Shape, cls: type) -> Dict[str, Any]:
        acls = getattr(self.module, shape.struct)
        immutable = "__setattr__" in vars(acls)
        return {"decode_stmt": self.immutable_decode_stmt if immutable else self.decode_stmt,
                "enc": self._fb.encode_binary, "dec": self._fb.decode_binary,
                "ta": [acls, acls.thrift_spec], "acls": acls, "TMB": self._tmb,
                "proto": self._proto(self._tmb(), fallback=False)}


def load_apache(tmp: str) -> Tuple[Optional[Any], str]:
    """The Apache ``ttypes`` module of shapes.thrift, or ``None`` and why not."""
    compiler = shutil.which("thrift") or ("/usr/bin/thrift" if os.path.exists("/usr/bin/thrift")
                                          else None)
    if compiler is None:
        return None, "fastbinary column skipped: no thrift compiler (/usr/bin/thrift)"
    try:
        import thrift.protocol.fastbinary  # noqa: F401
    except ImportError as exc:
        return None, f"fastbinary column skipped: {exc}"
    subprocess.run([compiler, "--gen", "py", "-out", tmp, IDL], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sys.path.insert(0, tmp)
    return importlib.import_module(f"{APACHE_PACKAGE}.ttypes"), ""


# --- checking and timing -----------------------------------------------------------------

def first_difference(a: bytes, b: bytes) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (f"{len(a)} B vs {len(b)} B, first difference at byte {n}: "
            f"{a[n:n + 16].hex()} vs {b[n:n + 16].hex()}")


def canon(value: Any) -> Any:
    """A comparable form of a decoded value: thriftpy2 exceptions compare by identity."""
    if hasattr(type(value), "thrift_spec"):
        return type(value).__name__, canon(vars(value))
    if isinstance(value, (list, tuple)):
        return [canon(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return "set", sorted(repr(canon(v)) for v in value)
    if isinstance(value, dict):
        return "dict", sorted((repr(canon(k)), repr(canon(v))) for k, v in value.items())
    return value


def check(shape: Shape, module: Any, codecs: List[Codec], spaces: Dict[str, Dict[str, Any]],
          notes: List[str]) -> Tuple[int, List[str]]:
    """Encoded size and the problems: differing bytes, failed or unequal decodes."""
    value = shape.build(module)
    ref = codecs[0].encode(spaces["octo"], value)
    problems = []
    for c in codecs:
        native = c.native(value)
        try:
            data = c.encode(spaces[c.name], native)
        except Exception as exc:
            problems.append(f"{c.name} encode raised {exc!r}")
            continue
        if data != ref:
            diff = f"{c.name} bytes differ from octo: {first_difference(data, ref)}"
            if canon(octo_codec.decode(getattr(module, shape.struct), data)) == canon(value):
                # a set rebuilt for Apache may iterate in another order
                notes.append(f"{shape.name}: {diff} (same value, elements in another order)")
            else:
                problems.append(diff)
        try:
            got = c.decode(spaces[c.name], ref)
        except Exception as exc:
            problems.append(f"{c.name} decode raised {exc!r}")
            continue
        if canon(got) != canon(native):
            if c.encode(spaces[c.name], got) == ref:   # e.g. cybin reads a set as a list
                notes.append(f"{shape.name}: {c.name} decodes to another Python form "
                             f"({type(got.v).__name__}) that it writes back to the same bytes")
            else:
                problems.append(f"{c.name} decodes octo's bytes to another value: {got!r:.120}")
    return len(ref), problems


def time_shape(shape: Shape, module: Any, codecs: List[Codec], spaces: Dict[str, Dict[str, Any]],
               op: str, repeat: int, target: float, stat: str) -> Dict[str, float]:
    """Seconds per ``op`` of each codec: ``repeat`` interleaved rounds, best or median."""
    value = shape.build(module)
    data = codecs[0].encode(spaces["octo"], value)
    timers, numbers = {}, {}
    for c in codecs:
        ns = dict(spaces[c.name], d=data, o=c.native(value))
        stmt = c.encode_stmt if op == "encode" else ns.get("decode_stmt", c.decode_stmt)
        if shape.fresh and op == "encode":
            ns.update(build=shape.build, m=module, native=c.native)
            timers[c.name] = timeit.Timer(stmt, setup="o = native(build(m))", globals=ns)
            numbers[c.name] = 1
        else:
            timers[c.name] = timeit.Timer(stmt, globals=ns)
            n, t = timers[c.name].autorange()
            numbers[c.name] = max(1, int(n * target / t))
    samples: Dict[str, List[float]] = {c.name: [] for c in codecs}
    names = [c.name for c in codecs]
    rounds = repeat * (25 if shape.fresh and op == "encode" else 1)   # number=1: more samples
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(timers[name].timeit(numbers[name]) / numbers[name])
    pick = min if stat == "min" else statistics.median
    return {name: pick(s) for name, s in samples.items()}


def fmt_time(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f}ms"
    return f"{seconds * 1e6:.2f}µs" if seconds >= 1e-6 else f"{seconds * 1e9:.0f}ns"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=[],
                        help="run only shapes whose name contains one of these words")
    parser.add_argument("--repeat", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--target", type=float, default=0.02,
                        help="seconds of one timed batch (default 0.02)")
    parser.add_argument("--stat", choices=("min", "median"), default="min")
    parser.add_argument("--no-apache", action="store_true", help="leave fastbinary out")
    args = parser.parse_args(argv)

    module = load_idl(IDL, module_name="octo_bench_shapes_thrift")
    codecs: List[Codec] = [Octo(), Cybin()]
    notes = []
    tmp = tempfile.mkdtemp(prefix="octo-shapes-")
    try:
        apache, why = (None, "fastbinary column skipped: --no-apache") if args.no_apache \
            else load_apache(tmp)
        if apache is not None:
            codecs.append(Fastbinary(apache))
        else:
            notes.append(why)
        shapes = [s for s in SHAPES if not args.only or any(w in s.name for w in args.only)]
        peers = [c.name for c in codecs[1:]]
        head = f"{'shape':<26}{'bytes':>9}  {'op':<6}{'octo':>10}" + "".join(
            f"{p:>11}{p + '/octo':>16}" for p in peers)
        print(head)
        print("-" * len(head))
        mismatches = 0
        for shape in shapes:
            cls = getattr(module, shape.struct)
            spaces = {c.name: c.namespace(shape, cls) for c in codecs}
            size, problems = check(shape, module, codecs, spaces, notes)
            for p in problems:
                print(f"!!! MISMATCH {shape.name}: {p}")
            mismatches += len(problems)
            for op in ("encode", "decode"):
                t = time_shape(shape, module, codecs, spaces, op, args.repeat, args.target,
                               args.stat)
                line = f"{shape.name if op == 'encode' else '':<26}" \
                       f"{size if op == 'encode' else '':>9}  {op:<6}{fmt_time(t['octo']):>10}"
                for p in peers:
                    ratio = t[p] / t["octo"]
                    flag = " <" if ratio < 1 else ""
                    line += f"{fmt_time(t[p]):>11}{ratio:>13.2f}×{flag:<2}"
                print(line, flush=True)
        print(f"\nratio = peer time ÷ octo time (>1: octo faster; '<' marks a loss); "
              f"{args.stat} of {args.repeat} interleaved rounds; Python {sys.version.split()[0]}")
        for n in notes:
            print(n)
        if mismatches:
            print(f"!!! {mismatches} MISMATCH(ES): see above")
        return 1 if mismatches else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
