"""Failure behaviour of the codec: what it refuses, and that it refuses it safely.

Encoding: every bad value is an ``EncodeError`` naming ``Struct.field``.
Decoding: every bad input is a ``DecodeError`` (with an int ``.offset`` inside
the input), never another exception, a crash, or a large allocation; limits
are enforced and configurable; unknown and retyped fields are skipped.
"""
from __future__ import annotations

import gc
import os
import re
import struct
import subprocess
import sys
import textwrap
import tracemalloc

from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from thriftpy2.protocol import TBinaryProtocolFactory
from thriftpy2.protocol.binary import TBinaryProtocol as PureBinaryProtocol
from thriftpy2.thrift import TMessageType
from thriftpy2.transport import TMemoryBuffer
from thriftpy2.utils import serialize

import octo_core
from octo_core.codec import Limits, decode, decode_message, encode, encode_message
from octo_core.errors import DecodeError, EncodeError, ProtocolError

import strategies as S

HERE = os.path.dirname(os.path.abspath(__file__))
IDL_PATH = os.path.join(HERE, "idl", "everything.thrift")
IDL = octo_core.load_idl(IDL_PATH)
STRUCTS = S.top_level_structs(IDL)
SERVICE = IDL.EverythingService

FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_STRATEGIES = {}


def strategy_for(cls, max_depth=4):
    key = (cls, max_depth)
    if key not in _STRATEGIES:
        _STRATEGIES[key] = S.structs(cls, max_depth=max_depth)
    return _STRATEGIES[key]


def i32(n: int) -> bytes:
    return struct.pack("!i", n)


def field(wire: int, fid: int) -> bytes:
    return struct.pack("!bh", wire, fid)


T_BOOL, T_BYTE, T_DOUBLE, T_I16, T_I32, T_I64, T_STRING, T_STRUCT, T_MAP, T_SET, T_LIST = \
    2, 3, 4, 6, 8, 10, 11, 12, 13, 14, 15


def decode_error(fn, *args, data=None, **kw) -> DecodeError:
    """Run ``fn`` expecting a DecodeError; check what every DecodeError must be."""
    with pytest.raises(DecodeError) as info:
        fn(*args, **kw)
    err = info.value
    assert isinstance(err, ProtocolError) and err.status == 5
    if data is not None:
        assert type(err.offset) is int, f"offset {err.offset!r} is not an int: {err}"
        assert 0 <= err.offset <= len(data), f"offset {err.offset} outside {len(data)} bytes"
    return err


def decode_or_error(cls, data, limits=None):
    """Decode, allowing only a DecodeError; a decoded object must be sane."""
    try:
        obj = decode(cls, data, limits)
    except DecodeError as err:
        assert type(err.offset) is int and 0 <= err.offset <= len(data), (err.offset, len(data))
        return None
    S.check_python_types(obj)
    # Whatever decodes re-encodes, and decodes again to the same thing.
    again = decode(cls, encode(obj))
    assert S.canonical(again) == S.canonical(obj)
    return obj


# --- encode errors -------------------------------------------------------------------------------


ENCODE_ERRORS = [
    # (struct, field, value, words the message must contain)
    ("Scalars", "medium", "12", ["Scalars.medium", "i32", "str"]),
    ("Scalars", "medium", 1.0, ["Scalars.medium", "i32", "float"]),
    ("Scalars", "large", b"1", ["Scalars.large", "i64", "bytes"]),
    ("Scalars", "b", 128, ["Scalars.b", "128", "byte"]),
    ("Scalars", "b", -129, ["Scalars.b", "-129", "byte"]),
    ("Scalars", "tiny", 200, ["Scalars.tiny", "200", "byte"]),
    ("Scalars", "small", 2 ** 15, ["Scalars.small", "32768", "i16"]),
    ("Scalars", "small", -(2 ** 15) - 1, ["Scalars.small", "-32769", "i16"]),
    ("Scalars", "medium", 2 ** 31, ["Scalars.medium", "2147483648", "i32"]),
    ("Scalars", "medium", -(2 ** 31) - 1, ["Scalars.medium", "-2147483649", "i32"]),
    ("Scalars", "medium", 2 ** 62, ["Scalars.medium", str(2 ** 62), "i32"]),
    ("Scalars", "color", 2 ** 31, ["Scalars.color", "i32"]),
    ("Scalars", "real", "1.5", ["Scalars.real", "double", "str"]),
    ("Scalars", "real", 10 ** 400, ["Scalars.real"]),
    ("Scalars", "flag", "yes", ["Scalars.flag", "bool", "str"]),
    ("Scalars", "text", "\ud800", ["Scalars.text"]),
    ("Scalars", "text", "ok\udfffok", ["Scalars.text"]),
    ("Scalars", "text", 5, ["Scalars.text", "string", "int"]),
    ("Scalars", "blob", 5, ["Scalars.blob", "binary", "int"]),
    ("Containers", "ints", 5, ["Containers.ints", "int"]),
    ("Containers", "ints", "123", ["Containers.ints", "str"]),
    ("Containers", "ints", [1, "2"], ["Containers.ints", "i32", "str"]),
    ("Containers", "ints", [2 ** 31], ["Containers.ints", "i32"]),
    ("Containers", "tags", {"a": 1}, ["Containers.tags", "dict"]),
    ("Containers", "tags", {"\ud800"}, ["Containers.tags"]),
    ("Containers", "counts", [("a", 1)], ["Containers.counts", "list"]),
    ("Containers", "counts", {1: 1}, ["Containers.counts", "string", "int"]),
    ("Containers", "counts", {"a": "1"}, ["Containers.counts", "i64", "str"]),
    ("Containers", "matrix", [[1], 2], ["Containers.matrix", "int"]),
    ("Containers", "nested_maps", {1: {"k": 3}}, ["Containers.nested_maps", "binary", "int"]),
    ("Containers", "set_list", [{-(2 ** 63) - 1}], ["Containers.set_list"]),
    ("Containers", "byte_sets", {1: {300}}, ["Containers.byte_sets", "300", "byte"]),
    ("Containers", "deep", [{"k": [{1, "x"}]}], ["Containers.deep", "i32", "str"]),
]


@pytest.mark.parametrize("struct_name,field_name,value,words", ENCODE_ERRORS,
                         ids=[f"{s}.{f}={v!r:.20}" for s, f, v, _ in ENCODE_ERRORS])
def test_encode_error_names_field_and_type(struct_name, field_name, value, words):
    obj = STRUCTS[struct_name](**{field_name: value})
    with pytest.raises(EncodeError) as info:
        encode(obj)
    err = info.value
    assert isinstance(err, ProtocolError) and err.status == 5
    for word in words:
        assert word in str(err), f"{word!r} not in {str(err)!r}"


def test_encode_ints_beyond_64_bits_name_field_and_type():
    """An int too big for any C integer is as out of range as one that fits in
    64 bits: the message names the field and the IDL type, like the others."""
    problems = []
    for fname, tname in [("b", "byte"), ("tiny", "byte"), ("small", "i16"), ("medium", "i32"),
                         ("large", "i64"), ("color", "i32")]:
        for value in (2 ** 63, -(2 ** 63) - 1, 2 ** 64, -(2 ** 100)):
            with pytest.raises(EncodeError) as info:
                encode(IDL.Scalars(**{fname: value}))
            message = str(info.value)
            if f"Scalars.{fname}" not in message or tname not in message:
                problems.append(f"{fname}={value}: {message!r}")
    assert not problems, "messages without the IDL type:\n" + "\n".join(problems)


class _Index:
    """An integer-like that is no int (as numpy's are): it has ``__index__``."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def _number_likes():
    from decimal import Decimal
    from fractions import Fraction

    yield dict(b=_Index(-5), tiny=_Index(7), small=_Index(300), medium=_Index(-70000),
               large=_Index(2 ** 40), real=Decimal("2.5"), flag=_Index(1))
    yield dict(real=Fraction(1, 4), flag=0)
    try:
        import numpy
    except ImportError:
        return
    yield dict(b=numpy.int8(-5), tiny=numpy.int8(7), small=numpy.int16(300),
               medium=numpy.int32(-70000), large=numpy.int64(2 ** 40), real=numpy.float32(2.5),
               flag=numpy.bool_(True), color=numpy.int64(2))


@pytest.mark.parametrize("values", list(_number_likes()), ids=lambda v: type(v["real"]).__name__)
def test_number_likes_encode_as_their_values_do_in_thriftpy2(values):
    """numpy's scalars, ``__index__`` objects, Decimal, Fraction: thriftpy2 and
    Apache write them as the numbers they stand for, and so does octo_core."""
    plain = {k: (float(v) if k == "real" else bool(v) if k == "flag" else int(v))
             for k, v in values.items()}
    data = encode(IDL.Scalars(**values))
    assert data == encode(IDL.Scalars(**plain))
    buf = TMemoryBuffer()
    IDL.Scalars(**values).write(PureBinaryProtocol(buf))      # thriftpy2 without cybin
    assert data == buf.getvalue()


class _Meddler:
    """A number whose ``__index__`` changes the container it is written from."""

    def __init__(self, meddle) -> None:
        self.meddle = meddle
        self.container = None

    def __index__(self) -> int:
        self.meddle(self.container)
        return 1


@pytest.mark.parametrize("meddle", [list.clear, lambda c: c.append(2), lambda c: c.pop()],
                         ids=["cleared", "grown", "shrunk"])
def test_a_list_changed_while_written_is_an_encode_error_not_a_crash(meddle):
    number = _Meddler(meddle)
    number.container = ints = [number, 7, 8]
    with pytest.raises(EncodeError, match="Containers.ints: the list changed size"):
        encode(IDL.Containers(ints=ints))


@pytest.mark.parametrize("meddle", [dict.clear, lambda c: c.update(b=2, c=3),
                                    lambda c: c.pop("z")], ids=["cleared", "grown", "shrunk"])
def test_a_dict_changed_while_written_is_an_encode_error_not_wrong_bytes(meddle):
    number = _Meddler(meddle)
    number.container = counts = {"a": number, "z": 9}
    with pytest.raises(EncodeError, match="Containers.counts: the dict changed size"):
        encode(IDL.Containers(counts=counts))


def test_a_dict_whose_len_lies_is_written_whole():
    class Lying(dict):
        def __len__(self) -> int:
            return 1
    data = encode(IDL.Containers(counts=Lying(a=1, b=2, z=3)))
    assert decode(IDL.Containers, data).counts == {"a": 1, "b": 2, "z": 3}


def _payload_class(name: str, spec: dict, namespace: Optional[dict] = None) -> type:
    """A struct class as thriftpy2 makes them, from ``spec`` ({fid: (ttype, name, required)})."""
    from thriftpy2.thrift import TPayload
    namespace = dict(namespace or {})
    namespace.update(thrift_spec=spec, default_spec=[(v[1], None) for v in spec.values()])
    cls = type(name, (TPayload,), namespace)

    def __init__(self, **values):
        for field in cls.thrift_spec.values():
            setattr(self, field[1], values.get(field[1]))
    cls.__init__ = __init__
    return cls


def test_a_class_rebuilt_from_an_encoded_ones_dict_is_compiled_for_itself():
    """A decorator that rebuilds a class copies its dict, the encoder's cached spec
    with it: that spec is the old class's, and the new one is compiled afresh."""
    from thriftpy2.thrift import TType
    old = _payload_class("A", {1: (TType.I32, "a", False)})
    encode(old(a=1))
    copied = {k: v for k, v in old.__dict__.items() if k not in ("__dict__", "__weakref__")}
    new = _payload_class("A", {1: (TType.I32, "a", False), 2: (TType.I32, "b", False)}, copied)
    assert encode(new(a=1, b=2)) == serialize(new(a=1, b=2))
    bogus = _payload_class("B", {1: (TType.I32, "a", False)}, {"__octo_codec_spec__": 7})
    assert encode(bogus(a=1)) == serialize(bogus(a=1))   # not trusted: no crash


def test_a_struct_that_refers_to_one_that_failed_to_compile_is_an_encode_error():
    """Recursive structs resolve to a spec registered before its fields are compiled;
    when that compile fails, the structs holding it refuse, rather than write it empty."""
    from thriftpy2.thrift import TType
    a = _payload_class("A", {})
    b = _payload_class("B", {1: (TType.STRUCT, "a", a, False)})
    a.thrift_spec = {1: (TType.STRUCT, "b", b, False), 70000: (TType.I32, "x", False)}
    with pytest.raises(EncodeError, match="field id 70000"):
        encode(a(b=None, x=1))
    with pytest.raises(EncodeError, match="B.a: struct A could not be compiled"):
        encode(b(a=a(b=None, x=5)))


class _Raising:
    def __index__(self) -> int:
        raise ZeroDivisionError("from __index__")


class _Unreadable:
    """A struct whose ``ints`` field raises when it is read."""

    def __getattribute__(self, name):
        if name == "ints":
            raise KeyError("no ints here")
        return object.__getattribute__(self, name)


@pytest.mark.parametrize("make,words", [
    (lambda: IDL.Containers(ints=[_Raising()]), "Containers.ints: ZeroDivisionError: from __index__"),
    (lambda: IDL.Containers(ints=(i if i < 2 else {}["mid"] for i in range(3))),
     "Containers.ints: KeyError: 'mid'"),
    (lambda: type("U", (_Unreadable, IDL.Containers), {})(),
     "U.ints: reading it raised KeyError"),   # (a twin: named by its own class)
], ids=["__index__", "generator", "getattr"])
def test_what_a_values_own_code_raises_is_an_encode_error_naming_the_field(make, words):
    with pytest.raises(EncodeError, match=re.escape(words)):
        encode(make())


def test_a_dict_subclass_is_written_by_its_own_items():
    class Filtered(dict):
        def items(self):
            return [(k, v) for k, v in super().items() if not k.startswith("_")]
    data = encode(IDL.Containers(counts=Filtered(a=1, _hidden=2)))
    assert decode(IDL.Containers, data).counts == {"a": 1}


@pytest.mark.parametrize("field,value", [("medium", 1.0), ("large", "7"), ("real", "2.5"),
                                         ("flag", "yes"), ("small", None.__class__)])
def test_what_is_no_number_is_still_refused(field, value):
    with pytest.raises(EncodeError, match=f"Scalars.{field}: expected"):
        encode(IDL.Scalars(**{field: value}))


def test_a_float_for_an_integer_field_is_refused_with_the_way_out():
    # thriftpy2's default codec truncates it silently (time.time() * 1000 for an
    # i64): the refusal says what to pass instead
    with pytest.raises(EncodeError, match=r"^Scalars\.large: expected int for i64, got float "
                                          r"1700000000000\.25 \(.*pass int\(\) or round\(\)"):
        encode(IDL.Scalars(large=1700000000000.25))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_float_no_int_can_hold_is_refused_without_the_int_advice(value):
    # int() of it raises: the refusal names the type alone
    with pytest.raises(EncodeError, match=r"^Scalars\.large: expected int for i64, got float$"):
        encode(IDL.Scalars(large=value))


def test_encode_error_message_format():
    with pytest.raises(EncodeError, match=r"^Scalars\.medium: expected int for i32, got str$"):
        encode(IDL.Scalars(medium="x"))


@pytest.mark.parametrize("obj,words", [
    (lambda: IDL.Everything(scalars=IDL.Inner()), ["Everything.scalars", "Scalars", "Inner"]),
    (lambda: IDL.Containers(oopses=[IDL.Inner()]), ["Containers.oopses", "Oops", "Inner"]),
    (lambda: IDL.Containers(groups={"g": [IDL.Inner(), IDL.Point(x=1, y=2)]}),
     ["Containers.groups", "Inner", "Point"]),
    (lambda: IDL.Containers(by_color={1: "not a struct"}), ["Containers.by_color", "Inner", "str"]),
])
def test_encode_wrong_struct_class(obj, words):
    with pytest.raises(EncodeError) as info:
        encode(obj())
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("outer,words", [
    (lambda: IDL.Everything(scalars=IDL.Scalars(small=10 ** 6)), ["Scalars.small"]),
    (lambda: IDL.Everything(containers=IDL.Containers(groups={"g": [IDL.Inner(count="3")]})),
     ["Inner.count", "i64", "str"]),
    (lambda: IDL.Everything(tree=IDL.Node(children=[IDL.Node(value=2 ** 40)])), ["Node.value"]),
    (lambda: IDL.Everything(requiredness=IDL.Requiredness(req_map={"k": b"\xff"}, req=1,
                                                          req_struct=IDL.Inner(name=3))),
     ["Inner.name", "int"]),
])
def test_encode_error_names_the_innermost_struct(outer, words):
    with pytest.raises(EncodeError) as info:
        encode(outer())
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("value", [5, "Inner", b"\x00", {"name": "x"}, None, IDL.Inner, object()])
def test_encode_non_struct(value):
    with pytest.raises(EncodeError):
        encode(value)


def test_encode_apache_object_is_an_encode_error(apache):
    with pytest.raises(EncodeError):
        encode(apache.ttypes.Inner(name="x"))


def test_encode_cycles_and_too_deep():
    node = IDL.Node(value=1)
    node.sibling = node
    with pytest.raises(EncodeError, match="Node.sibling"):
        encode(node)
    loop = IDL.Node(value=1, children=[])
    loop.children.append(loop)
    with pytest.raises(EncodeError):
        encode(loop)
    # 64 nested structs (the outermost included) is the encoder's limit.
    assert decode(IDL.Node, encode(chain(64))) == chain(64)
    with pytest.raises(EncodeError):
        encode(chain(65))


def test_encoder_recovers_after_error():
    good = IDL.Containers(ints=list(range(1000)))
    with pytest.raises(EncodeError):
        encode(IDL.Containers(ints=list(range(1000)) + ["x"]))
    assert decode(IDL.Containers, encode(good)) == good


@pytest.mark.parametrize("args,word", [
    (("m", 0, 1), "message type"),
    (("m", 5, 1), "message type"),
    (("m", 1, 2 ** 31), "2147483648"),
    (("m", 1, -(2 ** 31) - 1), ""),
    (("m", 1, "1"), "str"),
    (("bad\ud800name", 1, 1), ""),
])
def test_encode_message_errors(args, word):
    with pytest.raises(EncodeError, match=word or None):
        encode_message(*args, SERVICE.ping_args())


def test_encode_message_non_struct():
    with pytest.raises(EncodeError):
        encode_message("ping", TMessageType.CALL, 1, {"a": 1})


# --- truncation, mutation, garbage ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STRUCTS))
@settings(FUZZ, max_examples=15)
@given(data=st.data())
def test_every_truncation_is_a_decode_error(name, data):
    cls = STRUCTS[name]
    raw = encode(data.draw(strategy_for(cls), label=name))
    for cut in range(len(raw)):
        decode_error(decode, cls, raw[:cut], data=raw[:cut])


@settings(FUZZ, max_examples=20)
@given(data=st.data())
def test_every_message_truncation_is_a_decode_error(data):
    method = data.draw(st.sampled_from(list(SERVICE.thrift_services)))
    obj = data.draw(strategy_for(getattr(SERVICE, method + "_args")))
    raw = encode_message(method, TMessageType.CALL, 1, obj)
    for cut in range(len(raw)):
        decode_error(decode_message, raw[:cut], SERVICE, data=raw[:cut])


@st.composite
def mutated(draw, cls):
    """Valid bytes of ``cls`` with a few random edits."""
    data = bytearray(encode(draw(strategy_for(cls, max_depth=3))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "flip", "insert", "delete", "copy", "int"]))
        pos = draw(st.integers(0, len(data)))
        if op == "set" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=6))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 6))]
        elif op == "copy" and data:
            # repeat a slice: duplicated fields, headers in odd places
            a = draw(st.integers(0, len(data) - 1))
            data[pos:pos] = data[a:a + draw(st.integers(1, 12))]
        elif op == "int":
            # overwrite 4 bytes with an interesting length/count
            value = draw(st.sampled_from([0, 1, 2, 7, 255, 2 ** 15, 2 ** 31 - 1, -1, -(2 ** 31)]))
            data[pos:pos + 4] = i32(value)
    return bytes(data)


@pytest.mark.parametrize("name", sorted(STRUCTS))
@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_mutations_decode_or_raise_decode_error(name, data):
    cls = STRUCTS[name]
    decode_or_error(cls, data.draw(mutated(cls), label="bytes"))


@pytest.mark.parametrize("name", ["Everything", "Containers", "Node", "PyOnly", "Requiredness"])
@settings(FUZZ, max_examples=60)
@given(raw=st.binary(max_size=64))
def test_random_bytes_decode_or_raise_decode_error(name, raw):
    decode_or_error(STRUCTS[name], raw)


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_mutated_messages(data):
    method = data.draw(st.sampled_from(list(SERVICE.thrift_services)))
    obj = data.draw(strategy_for(getattr(SERVICE, method + "_args"), max_depth=3))
    raw = bytearray(encode_message(method, TMessageType.CALL, 9, obj))
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    raw = bytes(raw)
    try:
        name, mtype, seqid, back = decode_message(raw, SERVICE)
    except DecodeError as err:
        if "has no method" not in str(err):   # (that one has its own test: unknown method)
            assert type(err.offset) is int and 0 <= err.offset <= len(raw), (err.offset, err)
    else:
        assert 1 <= mtype <= 4 and -(2 ** 31) <= seqid < 2 ** 31
        S.check_python_types(back)


# --- huge lengths and counts ----------------------------------------------------------------------


def peak_allocation(fn) -> int:
    """Bytes allocated at the peak while running ``fn`` (above what was live before)."""
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


def assert_fails_small(fn, data, limit=1 << 20):
    def run():
        decode_error(fn, data=data)
    assert peak_allocation(run) < limit


UNLIMITED = Limits(max_string_length=2 ** 40, max_container_length=2 ** 40, max_depth=64,
                   max_items=2 ** 40)


@pytest.mark.parametrize("limits", [None, UNLIMITED], ids=["default-limits", "no-limits"])
def test_five_bytes_claiming_a_2gib_method_name(limits):
    # Old non-strict header: i32 name length (2 GiB - 1), then one byte.
    data = i32(2 ** 31 - 1) + b"\x01"
    assert len(data) == 5
    assert_fails_small(lambda: decode_message(data, SERVICE, limits), data)


@pytest.mark.parametrize("limits", [None, UNLIMITED], ids=["default-limits", "no-limits"])
@pytest.mark.parametrize("cls,prefix", [
    ("Scalars", field(T_STRING, 8)),                      # string
    ("Scalars", field(T_STRING, 9)),                      # binary
    ("Empty", field(T_STRING, 1)),                        # skipped unknown field
    ("Scalars", field(T_STRING, 5)),                      # skipped: wire type differs (i32)
    ("Containers", field(T_LIST, 11) + bytes([T_STRING]) + i32(1)),   # element of list<binary>
])
def test_huge_string_length(cls, prefix, limits):
    data = prefix + i32(2 ** 31 - 1)
    assert_fails_small(lambda: decode(STRUCTS[cls], data, limits), data)
    data = prefix + i32(2 ** 31 - 1) + b"x" * 100
    assert_fails_small(lambda: decode(STRUCTS[cls], data, limits), data)


def test_huge_strict_message_name():
    data = b"\x80\x01\x00\x01" + i32(2 ** 31 - 1)
    assert_fails_small(lambda: decode_message(data, SERVICE, UNLIMITED), data)


HUGE_CONTAINERS = [
    ("Containers", field(T_LIST, 1) + bytes([T_I32])),                  # list<i32>
    ("Containers", field(T_SET, 2) + bytes([T_STRING])),                # set<string>
    ("Containers", field(T_MAP, 3) + bytes([T_STRING, T_I64])),         # map<string, i64>
    ("Containers", field(T_LIST, 21) + bytes([T_STRUCT])),              # list<Empty>: 1 byte each
    ("Containers", field(T_LIST, 20) + bytes([T_BOOL])),                # list<bool>: 1 byte each
    ("Containers", field(T_LIST, 4) + bytes([T_LIST]) + i32(1) + bytes([T_I32])),  # inner list
    ("Empty", field(T_LIST, 1) + bytes([T_STRUCT])),                   # skipped list
    ("Empty", field(T_MAP, 1) + bytes([T_BOOL, T_BYTE])),              # skipped map
    ("Empty", field(T_SET, 1) + bytes([T_I64])),                       # skipped fixed-size set
    ("Containers", field(T_LIST, 1) + bytes([0x7f])),                  # invalid element type
    ("Containers", field(T_MAP, 3) + bytes([0x00, 0x01])),             # invalid key/value types
]


@pytest.mark.parametrize("limits", [None, UNLIMITED], ids=["default-limits", "no-limits"])
@pytest.mark.parametrize("count", [2 ** 31 - 1, 2 ** 24 + 1, 1000])
@pytest.mark.parametrize("cls,prefix", HUGE_CONTAINERS)
def test_huge_container_count(cls, prefix, count, limits):
    data = prefix + i32(count) + b"\x00" * 16
    assert_fails_small(lambda: decode(STRUCTS[cls], data, limits), data)


@pytest.mark.parametrize("cls,prefix,kind", [
    ("Containers", field(T_LIST, 1) + bytes([T_I32]), "list"),
    ("Containers", field(T_SET, 2) + bytes([T_STRING]), "set"),
    ("Empty", field(T_SET, 1) + bytes([T_I64]), "set"),              # skipped
    ("Empty", field(T_LIST, 1) + bytes([T_I64]), "list"),            # skipped
])
def test_a_container_count_error_names_the_containers_kind(cls, prefix, kind):
    data = prefix + i32(2 ** 30) + b"\x00" * 16
    err = decode_error(decode, STRUCTS[cls], data, data=data)
    assert f"{kind} length" in str(err), str(err)


@pytest.mark.parametrize("prefix", [field(T_STRING, 8), field(T_LIST, 1) + bytes([T_I32]),
                                    field(T_MAP, 3) + bytes([T_STRING, T_I64])])
@pytest.mark.parametrize("n", [-1, -(2 ** 31), -100])
def test_negative_lengths(prefix, n):
    cls = IDL.Scalars if prefix[0] == T_STRING else IDL.Containers
    data = prefix + i32(n) + b"\x00" * 8
    err = decode_error(decode, cls, data, data=data)
    assert "negative" in str(err)


def test_count_checked_against_bytes_left():
    # 1000 empty structs need at least 1000 bytes; 999 are there.
    data = field(T_LIST, 21) + bytes([T_STRUCT]) + i32(1000) + b"\x00" * 999
    decode_error(decode, IDL.Containers, data, data=data)
    ok = field(T_LIST, 21) + bytes([T_STRUCT]) + i32(1000) + b"\x00" * 1000 + b"\x00"
    assert decode(IDL.Containers, ok).empties == [IDL.Empty()] * 1000


# --- depth ---------------------------------------------------------------------------------------


def chain(n: int):
    """n nested Nodes linked through `sibling` (n structs deep)."""
    node = None
    for i in range(n):
        node = IDL.Node(value=i, sibling=node)
    return node


def sibling_bomb(n: int) -> bytes:
    return field(T_STRUCT, 3) * n + b"\x00" * (n + 1)


def children_bomb(n: int) -> bytes:
    # Node{children: [Node{children: [...]}]}: a struct and a list per level.
    return (field(T_LIST, 2) + bytes([T_STRUCT]) + i32(1)) * n + b"\x00" * (n + 1)


def list_bomb(n: int) -> bytes:
    # An unknown field of n nested lists: Empty must skip it.
    return field(T_LIST, 1) + (bytes([T_LIST]) + i32(1)) * n + bytes([T_I32]) + i32(0) + b"\x00"


def struct_skip_bomb(n: int) -> bytes:
    return field(T_STRUCT, 1) * n + b"\x00" * (n + 1)


BOMBS = [("Node", sibling_bomb), ("Node", children_bomb), ("Empty", list_bomb),
         ("Empty", struct_skip_bomb), ("Inner", sibling_bomb)]


@pytest.mark.parametrize("cls,bomb", BOMBS, ids=[b.__name__ + "-" + c for c, b in BOMBS])
@pytest.mark.parametrize("n", [65, 1000, 200_000])
def test_depth_bombs(cls, bomb, n):
    data = bomb(n)
    err = decode_error(decode, STRUCTS[cls], data, data=data)
    assert "nest" in str(err) or "deep" in str(err)


@pytest.mark.parametrize("cls,bomb", BOMBS, ids=[b.__name__ + "-" + c for c, b in BOMBS])
def test_depth_bombs_are_valid_bytes(cls, bomb):
    # The bombs are well-formed: with room enough they decode.
    decode(STRUCTS[cls], bomb(100), Limits(max_depth=1000))


@pytest.mark.parametrize("max_depth", [1, 2, 3, 10, 64, 100])
def test_max_depth_is_exact_for_known_fields(max_depth):
    """max_depth counts nested structs and containers, the outermost struct included."""
    limits = Limits(max_depth=max_depth)
    ok = encode(chain(max_depth)) if max_depth <= 64 else sibling_bomb(max_depth - 1)
    assert decode(IDL.Node, ok, limits) is not None
    too_deep = sibling_bomb(max_depth)     # max_depth + 1 structs
    decode_error(decode, IDL.Node, too_deep, limits, data=too_deep)
    if max_depth == 64:
        assert decode(IDL.Node, ok) == chain(64)      # the default is 64
        decode_error(decode, IDL.Node, too_deep, data=too_deep)


def test_max_depth_counts_containers():
    # Everything(1) > Containers(2) > list(3) > list(4) of i32
    data = encode(IDL.Everything(containers=IDL.Containers(matrix=[[1]])))
    assert decode(IDL.Everything, data, Limits(max_depth=4)).containers.matrix == [[1]]
    decode_error(decode, IDL.Everything, data, Limits(max_depth=3), data=data)
    # An empty container still counts as a level.
    data = encode(IDL.Everything(containers=IDL.Containers(ints=[])))
    assert decode(IDL.Everything, data, Limits(max_depth=3)).containers.ints == []
    decode_error(decode, IDL.Everything, data, Limits(max_depth=2), data=data)


def test_skipping_a_flat_unknown_field_needs_no_depth():
    """Skipping an unknown *primitive* field nests nothing: a flat struct that
    decodes with max_depth=1 must still decode when it carries unknown fields."""
    data = encode(IDL.Inner(name="x", count=5))
    assert decode(IDL.Inner, data, Limits(max_depth=1)) == IDL.Inner(name="x", count=5)
    assert decode(IDL.Empty, data, Limits(max_depth=1)) == IDL.Empty()


@pytest.mark.parametrize("max_depth", [64])
def test_skipping_allows_the_same_depth_as_reading(max_depth):
    """A nested value that decodes as a known field within max_depth can also
    be skipped as an unknown field under the same limit."""
    limits = Limits(max_depth=max_depth)
    # Node.sibling chain: max_depth Nodes in all, so decoding as Node just fits.
    data = encode(chain(max_depth))
    assert decode(IDL.Node, data, limits) == chain(max_depth)
    # Inner knows none of Node's fields: it skips the same nesting.
    assert decode(IDL.Inner, data, limits) == IDL.Inner()


def test_huge_max_depth_is_refused_up_front():
    """The decoder recurses in C, so Limits caps max_depth (1000) instead of
    letting deep input overflow the C stack."""
    with pytest.raises(ValueError, match="max_depth"):
        Limits(max_depth=10 ** 9)


def test_deep_input_at_the_depth_cap_does_not_crash():
    """At the largest accepted max_depth, deeply nested input gives a clean
    DecodeError or a result, never a crash of the interpreter; run on a thread
    with a small (512 KiB) stack to leave no margin for luck."""
    code = textwrap.dedent(f"""
        import threading
        import octo_core
        from octo_core.codec import Limits, decode
        from octo_core.errors import DecodeError
        m = octo_core.load_idl({IDL_PATH!r})
        n = 300_000
        data = b"\\x0c\\x00\\x03" * n + b"\\x00" * (n + 1)
        out = []
        def run():
            try:
                decode(m.Node, data, Limits(max_depth=1000))
            except DecodeError as e:
                out.append("error")
            else:
                out.append("decoded")
        threading.stack_size(512 * 1024)
        t = threading.Thread(target=run)
        t.start()
        t.join()
        print(out[0])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"interpreter died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    assert proc.stdout.strip() == "error"


# --- limits --------------------------------------------------------------------------------------


def test_limits_defaults_and_validation():
    d = Limits()
    assert (d.max_string_length, d.max_container_length, d.max_depth, d.max_items) == (
        64 * 2 ** 20, 16 * 2 ** 20, 64, 2 * 2 ** 20)
    assert "max_depth=64" in repr(d) and "max_items=2097152" in repr(d)
    custom = Limits(max_string_length=0, max_container_length=0, max_depth=1, max_items=0)
    assert (custom.max_string_length, custom.max_container_length, custom.max_depth,
            custom.max_items) == (0, 0, 1, 0)
    for bad in (dict(max_string_length=-1), dict(max_container_length=-1), dict(max_depth=0),
                dict(max_depth=-5), dict(max_items=-1)):
        with pytest.raises(ValueError):
            Limits(**bad)
    with pytest.raises(AttributeError):
        d.max_depth = 3


@pytest.mark.parametrize("fname", ["text", "blob"])
def test_string_limit(fname):
    limits = Limits(max_string_length=4)
    value = "abcd" if fname == "text" else b"abcd"
    assert getattr(decode(IDL.Scalars, encode(IDL.Scalars(**{fname: value})), limits), fname) == value
    data = encode(IDL.Scalars(**{fname: value * 2}))
    err = decode_error(decode, IDL.Scalars, data, limits, data=data)
    assert "limit" in str(err)
    # Lengths count bytes, not characters.
    data = encode(IDL.Scalars(text="\u00e9\u00e9\u00e9"))   # 6 bytes
    decode_error(decode, IDL.Scalars, data, limits, data=data)
    # The limit also applies to skipped fields and to unknown ones.
    data = encode(IDL.Inner(name="abcdefgh"))
    decode_error(decode, IDL.Empty, data, limits, data=data)
    assert decode(IDL.Empty, encode(IDL.Inner(name="abcd")), limits) == IDL.Empty()
    # And to zero.
    assert decode(IDL.Scalars, encode(IDL.Scalars(text="")), Limits(max_string_length=0)).text == ""


@pytest.mark.parametrize("fname,small,big", [
    ("ints", [1, 2, 3], [1, 2, 3, 4]),
    ("tags", {"a", "b", "c"}, {"a", "b", "c", "d"}),
    ("counts", {"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 2, "c": 3, "d": 4}),
    ("matrix", [[1, 2, 3]], [[1, 2, 3, 4]]),
    ("empties", [IDL.Empty()] * 3, [IDL.Empty()] * 4),
])
def test_container_limit(fname, small, big):
    limits = Limits(max_container_length=3)
    assert getattr(decode(IDL.Containers, encode(IDL.Containers(**{fname: small})), limits), fname) == small
    data = encode(IDL.Containers(**{fname: big}))
    err = decode_error(decode, IDL.Containers, data, limits, data=data)
    assert "limit" in str(err)
    # Skipped containers obey the limit as well.
    decode_error(decode, IDL.Empty, data, limits, data=data)
    assert decode(IDL.Containers, data) is not None          # the default limit is far higher


def test_items_limit_bounds_the_objects_one_decode_makes():
    """``max_items`` counts what a decode makes: a container element 1, a map entry
    2, a struct 1 plus its declared fields (each becomes an attribute)."""
    top = 1 + len(IDL.Containers.thrift_spec)
    inner = 1 + len(IDL.Inner.thrift_spec)
    cases = [(dict(empties=[IDL.Empty()] * 3), 3 + 3 * 1),
             (dict(ints=[1, 2, 3]), 3),
             (dict(counts={"a": 1, "b": 2}), 2 * 2),
             (dict(groups={"g": [IDL.Inner(name="x")]}), 2 + 1 + inner)]
    for fields, items in cases:
        data = encode(IDL.Containers(**fields))
        assert decode(IDL.Containers, data, Limits(max_items=top + items)) == IDL.Containers(**fields)
        err = decode_error(decode, IDL.Containers, data, Limits(max_items=top + items - 1), data=data)
        assert "max_items" in str(err)


def lone_stop_structs(count: int) -> bytes:
    """``Containers.oopses`` as ``count`` exceptions of one byte each (a STOP): the
    input that makes the most objects per byte."""
    fid = next(i for i, spec in IDL.Containers.thrift_spec.items() if spec[1] == "oopses")
    return struct.pack(">bhbi", 15, fid, 12, count) + b"\x00" * count + b"\x00"


def test_one_byte_structs_cannot_amplify_a_frame_into_gigabytes():
    """A 16 MiB frame of lone STOP bytes used to decode into ~16 million objects
    (4.7 GB); the items limit stops it after a bounded amount of work."""
    data = lone_stop_structs(1_000_000)
    limits = Limits(max_items=10_000)
    assert peak_allocation(lambda: decode_error(decode, IDL.Containers, data, limits, data=data)) \
        < 8 << 20
    err = decode_error(decode, IDL.Containers, lone_stop_structs(3 * 2 ** 20))   # default limits
    assert "max_items" in str(err)


def test_a_big_decode_sets_off_no_garbage_collection_and_leaves_the_collector_as_it_was():
    """What a decode makes is all alive, so the collections its allocations would
    set off (over and over, rescanning everything) are waste: a big decode pauses
    the collector, and leaves it enabled or disabled as it found it, error or not."""
    data = encode(IDL.Containers(oopses=[IDL.Oops()] * 200_000))
    collections = []

    def count(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(count)
    try:
        assert gc.isenabled()
        assert len(decode(IDL.Containers, data).oopses) == 200_000
        assert collections == [] and gc.isenabled()
        decode_error(decode, IDL.Containers, data[:-1], data=data[:-1])
        assert gc.isenabled()
        gc.disable()
        try:
            decode(IDL.Containers, data)
            assert not gc.isenabled()
        finally:
            gc.enable()
    finally:
        gc.callbacks.remove(count)


def test_idl_container_defaults_count_against_max_items():
    """A struct left at its IDL defaults costs copies of them: a list of empty
    structs with big defaults must not slip past ``max_items`` a STOP byte each."""
    only_must = b"\x0b\x00\x0a\x00\x00\x00\x01m\x00"
    fields_only = Limits(max_items=1 + len(IDL.Defaults.thrift_spec))
    err = decode_error(decode, IDL.Defaults, only_must, fields_only, data=only_must)
    assert "max_items" in str(err)
    assert decode(IDL.Defaults, only_must, Limits(max_items=100)) == IDL.Defaults()


def test_limits_apply_to_messages():
    data = encode_message("checksum", TMessageType.CALL, 1,
                          SERVICE.checksum_args(data=b"x" * 100, algorithms={"a"}))
    decode_error(decode_message, data, SERVICE, Limits(max_string_length=50), data=data)
    decode_error(decode_message, data, SERVICE, Limits(max_string_length=7), data=data)  # the name
    assert decode_message(data, SERVICE, Limits(max_string_length=100))[3].data == b"x" * 100
    decode_error(decode_message, data, SERVICE, Limits(max_depth=1), data=data)
    decode_error(decode_message, data, SERVICE, Limits(max_container_length=0), data=data)


# --- invalid text ---------------------------------------------------------------------------------


BAD_UTF8 = [b"\xff", b"\xc3", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xfe\xfe"]


def thriftpy2_bytes(obj) -> bytes:
    """What thriftpy2's pure binary protocol writes for the struct ``obj``."""
    buffer = TMemoryBuffer()
    PureBinaryProtocol(buffer).write_struct(obj)
    return buffer.getvalue()


def thriftpy2_reads(cls, data: bytes):
    """What thriftpy2's pure binary protocol decodes ``data`` to."""
    obj = cls()
    PureBinaryProtocol(TMemoryBuffer(data)).read_struct(obj)
    return obj


@pytest.mark.parametrize("bad", BAD_UTF8)
def test_invalid_utf8_in_string_field_is_read_as_its_bytes_as_thriftpy2_does(bad):
    """C++, Go and older peers put other encodings (GBK, say) in string fields:
    the call goes on, and the application gets the bytes to decode."""
    body = b"ok" + bad + b"ok"
    data = field(T_STRING, 8) + i32(len(body)) + body + b"\x00"
    assert decode(IDL.Scalars, data).text == body == thriftpy2_reads(IDL.Scalars, data).text
    assert encode(decode(IDL.Scalars, data)) == data          # and written back unchanged
    text = "ok ✓".encode()
    data = field(T_STRING, 8) + i32(len(text)) + text + b"\x00"
    assert decode(IDL.Scalars, data).text == "ok ✓"             # valid UTF-8 is text


@pytest.mark.parametrize("bad", BAD_UTF8)
def test_invalid_utf8_inside_containers_is_read_as_its_bytes(bad):
    data = field(T_SET, 2) + bytes([T_STRING]) + i32(2) + i32(1) + b"a" + i32(len(bad)) + bad + b"\x00"
    assert decode(IDL.Containers, data).tags == {"a", bad}
    assert sorted(map(repr, thriftpy2_reads(IDL.Containers, data).tags)) == sorted([repr("a"), repr(bad)])
    data = (field(T_MAP, 12) + bytes([T_STRING, T_STRING]) + i32(1) + i32(len(bad)) + bad
            + i32(len(bad)) + bad + b"\x00")
    assert decode(IDL.Containers, data).by_blob == {bad: bad} == thriftpy2_reads(IDL.Containers, data).by_blob


def test_invalid_utf8_in_unknown_field_is_skipped():
    data = field(T_STRING, 99) + i32(1) + b"\xff" + b"\x00"
    assert decode(IDL.Scalars, data) == IDL.Scalars()


def test_invalid_utf8_method_name():
    data = b"\x80\x01\x00\x01" + i32(2) + b"\xff\xfe" + i32(1) + b"\x00"
    err = decode_error(decode_message, data, SERVICE, data=data)
    assert err.offset == 8


def test_messages_of_other_thrift_protocols_are_named_in_the_error():
    """A framed client on the compact protocol, or on THeader, gets told so: the
    bytes come from Apache Thrift's own writers."""
    from thrift.protocol.TCompactProtocol import TCompactProtocol
    from thrift.protocol.THeaderProtocol import THeaderProtocol
    from thrift.transport.THeaderTransport import THeaderClientType
    from thrift.transport.TTransport import TMemoryBuffer

    def written(make_protocol) -> bytes:
        buffer = TMemoryBuffer()
        proto = make_protocol(buffer)
        proto.writeMessageBegin("ping", 1, 7)
        proto.writeStructBegin("ping_args")
        proto.writeFieldStop()
        proto.writeStructEnd()
        proto.writeMessageEnd()
        proto.trans.flush()
        return buffer.getvalue()

    compact = written(TCompactProtocol)
    assert "compact protocol" in str(decode_error(decode_message, compact, SERVICE, data=compact))
    header = written(lambda b: THeaderProtocol(b, [THeaderClientType.HEADERS]))[4:]   # the frame
    assert "THeader" in str(decode_error(decode_message, header, SERVICE, data=header))


# --- framing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [b"\x00", b"\x01\x02\x03", b"\x00" * 100])
def test_trailing_bytes(extra):
    raw = encode(IDL.Inner(name="x"))
    data = raw + extra
    err = decode_error(decode, IDL.Inner, data, data=data)
    assert err.offset == len(raw)
    msg = encode_message("ping", TMessageType.CALL, 1, SERVICE.ping_args()) + extra
    err = decode_error(decode_message, msg, SERVICE, data=msg)
    assert err.offset == len(msg) - len(extra)


def test_empty_input():
    decode_error(decode, IDL.Empty, b"", data=b"")
    decode_error(decode_message, b"", SERVICE, data=b"")


@pytest.mark.parametrize("version", [0x80020001, 0x80000001, 0x81010001, 0xFFFF0001])
def test_bad_message_version(version):
    data = struct.pack("!I", version) + i32(4) + b"ping" + i32(1) + b"\x00"
    err = decode_error(decode_message, data, SERVICE, data=data)
    assert err.offset == 0
    assert "version" in str(err)


@pytest.mark.parametrize("mtype", [0, 5, 0x7f, 0xff])
def test_bad_message_type(mtype):
    strict = struct.pack("!I", 0x80010000 | mtype) + i32(4) + b"ping" + i32(1) + b"\x00"
    decode_error(decode_message, strict, SERVICE, data=strict)
    old = i32(4) + b"ping" + bytes([mtype]) + i32(1) + b"\x00"
    decode_error(decode_message, old, SERVICE, data=old)


@pytest.mark.parametrize("mtype", [TMessageType.CALL, TMessageType.REPLY, TMessageType.ONEWAY])
def test_non_strict_header(mtype):
    suffix = "_result" if mtype == TMessageType.REPLY else "_args"
    obj = getattr(SERVICE, "add" + suffix)(**({"success": 5} if suffix == "_result" else {"a": 2, "b": 3}))
    body = encode(obj)
    old = i32(3) + b"add" + bytes([mtype]) + i32(-5) + body
    assert decode_message(old, SERVICE) == ("add", mtype, -5, obj)
    # Same result as the strict header; and the same bytes thriftpy2 writes when not strict.
    assert decode_message(encode_message("add", mtype, -5, obj), SERVICE) == ("add", mtype, -5, obj)
    buf = TMemoryBuffer()
    proto = TBinaryProtocolFactory(strict_write=False).get_protocol(buf)
    proto.write_message_begin("add", mtype, -5)
    proto.write_struct(obj)
    assert buf.getvalue() == old


def test_non_strict_header_truncated_type_byte():
    data = i32(3) + b"add"
    decode_error(decode_message, data, SERVICE, data=data)


@pytest.mark.parametrize("mtype", [TMessageType.CALL, TMessageType.REPLY, TMessageType.ONEWAY])
def test_unknown_method(mtype):
    data = encode_message("frobnicate", mtype, 1, IDL.Empty())
    with pytest.raises(DecodeError, match="frobnicate"):
        decode_message(data, SERVICE)


def test_unknown_method_error_has_an_offset():
    data = encode_message("frobnicate", TMessageType.CALL, 1, IDL.Empty())
    decode_error(decode_message, data, SERVICE, data=data)


# --- schema evolution -----------------------------------------------------------------------------


NEWER_IDL = """
struct Payload {
  1: string s,
  2: list<double> d,
  3: map<i32, Payload> kids,
}

struct Inner {
  1: string name,
  2: optional i64 count,
  3: bool b3,
  4: byte b4,
  5: i16 b5,
  6: i32 b6,
  7: i64 b7,
  8: double b8,
  9: string b9,
  10: binary b10,
  11: Payload p11,
  12: list<Payload> l12,
  13: set<string> s13,
  14: map<string, list<i64>> m14,
  15: list<list<byte>> l15,
  16: map<i32, bool> m16,
  17: set<list<i32>> s17,
  -5: i32 neg,
  32767: string top,
}

// Same ids, other wire types: an old reader skips them.
struct Retyped {
  1: i32 name,
  2: string count,
}

exception Oops {
  1: string message,
  2: list<i32> code,
  3: Payload extra,
}
"""


@pytest.fixture(scope="module")
def newer(tmp_path_factory):
    path = tmp_path_factory.mktemp("idl") / "newer.thrift"
    path.write_text(NEWER_IDL)
    return octo_core.load_idl(str(path), "octo_test_newer_thrift")


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_unknown_fields_are_skipped(newer, data):
    x = data.draw(S.structs(newer.Inner, max_depth=4))
    raw = encode(x)
    assert decode(IDL.Inner, raw) == IDL.Inner(name=x.name, count=x.count)
    assert decode(IDL.Empty, raw) == IDL.Empty()
    # Unknown fields also skip inside containers of the old struct.
    outer = field(T_LIST, 15) + bytes([T_STRUCT]) + i32(2) + raw + raw + b"\x00"
    old = decode(IDL.Containers, field(T_MAP, 5) + bytes([T_STRING, T_LIST]) + i32(1) + i32(1) + b"g"
                 + bytes([T_STRUCT]) + i32(2) + raw + raw + b"\x00")
    assert old.groups == {"g": [IDL.Inner(name=x.name, count=x.count)] * 2}
    oopses = decode(IDL.Containers, outer).oopses
    # Oops shares id 1 (string) with the newer Inner; its i32 `code` (id 2) met an
    # i64 there, so it was skipped and `code` is the IDL default.
    assert [(o.message, o.code) for o in oopses] == [(x.name, 7)] * 2


def test_retyped_fields_are_skipped_and_get_defaults(newer):
    raw = encode(newer.Retyped(name=5, count="five"))
    assert decode(IDL.Inner, raw) == IDL.Inner()
    oops = decode(IDL.Oops, encode(newer.Oops(message="m", code=[1, 2], extra=newer.Payload(s="p"))))
    assert (oops.message, oops.code) == ("m", 7)        # `code` came as a list: IDL default


def test_required_field_sent_with_the_wrong_type_is_missing():
    data = field(T_STRING, 1) + i32(1) + b"1" + field(T_I32, 2) + i32(2) + b"\x00"
    err = decode_error(decode, IDL.Point, data, data=data)
    assert "Point.x" in str(err)


# --- required fields ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,raw,missing", [
    ("Point", lambda: field(T_I32, 1) + i32(1) + b"\x00", "Point.y"),
    ("Point", lambda: b"\x00", "Point.x"),
    ("Defaults", lambda: b"\x00", "Defaults.must"),      # a default does not excuse a required field
    ("Requiredness", lambda: encode(IDL.Requiredness(req=1, req_struct=IDL.Inner())), "Requiredness.req_map"),
    ("Everything", lambda: encode(IDL.Everything(requiredness=IDL.Requiredness(
        req_struct=IDL.Inner(), req_map={}))), "Requiredness.req"),
    ("PyOnly", lambda: field(T_SET, 4) + bytes([T_STRUCT]) + i32(1) + field(T_I32, 2) + i32(0) + b"\x00\x00",
     "Point.x"),
])
def test_missing_required_field(cls, raw, missing):
    data = raw()
    err = decode_error(decode, STRUCTS[cls], data, data=data)
    assert re.search(re.escape(missing) + r"\b", str(err)), str(err)


def test_missing_required_argument_in_message():
    data = encode_message("walk", TMessageType.CALL, 1, SERVICE.walk_args(depth=2))
    err = decode_error(decode_message, data, SERVICE, data=data)
    assert "walk_args.root" in str(err)


def test_unset_required_fields_are_left_out_as_thriftpy2_writes_them_or_refused_on_request():
    """``encode`` writes what thriftpy2 and Apache write (the field left out);
    the RPC paths ask for ``check_required`` (as Java writes), so a reader that
    refuses the message is never sent one."""
    partial = IDL.Requiredness(req=None, req_struct=IDL.Inner(), req_map={})
    args = SERVICE.echo_args(payload=IDL.Everything(requiredness=partial))
    assert encode(partial) == thriftpy2_bytes(partial)
    plain = encode_message("echo", TMessageType.CALL, 1, args)
    with pytest.raises(EncodeError, match="required field Requiredness.req is unset"):
        encode_message("echo", TMessageType.CALL, 1, args, check_required=True)
    with pytest.raises(EncodeError, match="Requiredness.req is unset"):
        octo_core.protocol.encode_framed_message("echo", TMessageType.CALL, 1, args)
    whole = IDL.Requiredness(req=0, req_struct=IDL.Inner(), req_map={})
    assert encode_message("echo", TMessageType.CALL, 1, SERVICE.echo_args(
        payload=IDL.Everything(requiredness=whole)), check_required=True) != plain


def test_a_union_with_two_members_is_written_as_thriftpy2_writes_it_or_refused_on_request():
    """A union holds one member at most. ``encode`` writes what it is given, as
    thriftpy2 and Apache do; the RPC paths (``check_required``) refuse two, as
    they refuse an unset required field: Java reads them as one member and
    silently loses the rest of the struct around it. None set is sent (C++ and
    Python read it; Java refuses it, loudly)."""
    adv = octo_core.load_idl(os.path.join(HERE, "idl", "adversarial.thrift"))
    one, none, two = adv.Choice(number=1), adv.Choice(), adv.Choice(number=1, text="and two")
    for choice in (none, two, adv.Choice(many=[two])):
        assert encode(choice) == thriftpy2_bytes(choice)
    for choice in (two, adv.Choice(many=[one, two])):
        with pytest.raises(EncodeError, match=r"^union Choice has 2 fields set \(number, text\); "
                                              r"it holds one at most$"):
            encode_message("pick", TMessageType.CALL, 1, adv.Derived.pick_args(c=choice),
                           check_required=True)
    for choice in (none, adv.Choice(many=[one, none])):
        assert encode_message("pick", TMessageType.CALL, 1, adv.Derived.pick_args(c=choice),
                              check_required=True) == \
            encode_message("pick", TMessageType.CALL, 1, adv.Derived.pick_args(c=choice))


def test_a_union_read_with_one_member_does_not_take_another_members_default(tmp_path):
    """thriftpy2 gives every new union its members' IDL defaults, so a union read
    with another member held two, which calls and results refuse to send: a server
    could not send back the union it was sent. The member on the wire is the one
    (as Java reads it); a union read with none takes the default. A union sent with
    a default beside another member is refused saying so."""
    idl = tmp_path / "defaulted_union.thrift"
    idl.write_text("union U {\n  1: i32 a = 5,\n  2: string b,\n}\n"
                   "service S {\n  U echo(1: U u),\n}\n")
    mod = octo_core.load_idl(str(idl), module_name="defaulted_union_thrift")
    decoded = decode(mod.U, encode(mod.U(a=None, b="x")))
    assert (decoded.a, decoded.b) == (None, "x")
    assert decode(mod.U, encode(mod.U(a=None))).a == 5
    args = mod.S.echo_args(u=decoded)
    sent = encode_message("echo", TMessageType.CALL, 1, args, check_required=True)
    assert decode_message(sent, mod.S)[3] == args
    with pytest.raises(EncodeError, match=r"^union U has 2 fields set \(a, b\); it holds one at "
                                          r"most \(a: the IDL's default; set it to None\)$"):
        encode_message("echo", TMessageType.CALL, 1, mod.S.echo_args(u=mod.U(b="x")),
                       check_required=True)


def test_required_fields_present_decode():
    x = IDL.Requiredness(req=0, req_struct=IDL.Inner(), req_map={})
    assert decode(IDL.Requiredness, encode(x)) == x


def test_an_object_of_a_class_apache_thrift_generated_is_refused_saying_so(apache):
    """Code moving from Apache Thrift's generated classes passes their objects
    where the IDL's structs go: refused, in a field too, saying what it is (it
    said "Expected dict, got tuple", of Apache's thrift_spec)."""
    foreign = apache.ttypes.Scalars(medium=7, text="t")
    with pytest.raises(EncodeError, match=r"^Everything\.scalars: .*Scalars'> is not a thriftpy2 "
                                          r"struct class \(a class Apache Thrift generated\?"):
        encode(IDL.Everything(scalars=foreign))
    with pytest.raises(EncodeError, match="not a thriftpy2 struct"):
        encode(foreign)


def test_a_struct_from_another_load_of_the_idl_encodes_like_its_twin(tmp_path):
    """Two loads of one IDL make two classes per struct; thriftpy2 writes either
    where the other is declared, and so does octo_core. A different struct that
    only shares the name is still refused, and the message says so."""
    twin = octo_core.load_idl(IDL_PATH, module_name="everything_twin_thrift")
    mixed = IDL.Everything(scalars=twin.Scalars(medium=7, text="t"))
    assert encode(mixed) == encode(IDL.Everything(scalars=IDL.Scalars(medium=7, text="t")))
    other = tmp_path / "other.thrift"
    other.write_text("struct Scalars { 1: i32 medium }\n")
    stranger = octo_core.load_idl(str(other), module_name="other_thrift")
    with pytest.raises(EncodeError, match="another struct of that name"):
        encode(IDL.Everything(scalars=stranger.Scalars(medium=7)))
