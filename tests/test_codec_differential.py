"""Differential tests: octo_core's codec against thriftpy2 and Apache Thrift.

For generated values ``x`` of every struct in everything.thrift:

* ``encode(x)`` equals the bytes of thriftpy2's pure-Python binary protocol,
  thriftpy2's Cython ``cybin`` protocol, Apache's pure-Python
  ``TBinaryProtocol`` and Apache's fastbinary-accelerated protocol;
* ``decode(encode(x))`` is ``x`` again, and so is ``decode`` of each peer's bytes;
* each peer decodes ``encode(x)`` to ``x``.

Comparisons between decoded objects go through ``strategies.canonical``:
thriftpy2 decodes sets as lists, Apache objects are other classes, and
thriftpy2 exceptions compare by identity. ``==`` is used as well wherever the
struct holds no exception.

Set order: a Python set iterates in an order that depends on its history, not
only on its elements, so two equal sets can write their elements in different
orders. Every writer here (octo_core, thriftpy2, Apache) writes a set by
iterating it, so the byte comparisons hand all writers the *same* set objects:
thriftpy2 writers get ``x`` itself, and ``ApacheConverter`` reuses x's sets of
primitives (Apache cannot hold any other kind of set). Objects that come out
of a decoder are only ever compared after decoding (canonical form), never by
re-encoding them.
"""
from __future__ import annotations

import importlib
import math
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from thriftpy2.protocol import TBinaryProtocolFactory
from thriftpy2.protocol.cybin import TCyBinaryProtocolFactory
from thriftpy2.thrift import TApplicationException, TException, TMessageType, TType
from thriftpy2.transport import TCyMemoryBuffer, TMemoryBuffer

import octo_core
from octo_core import codec
from octo_core.codec import decode, decode_message, encode, encode_message

import strategies as S

IDL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "idl", "everything.thrift")
IDL = octo_core.load_idl(IDL_PATH)
STRUCTS = S.top_level_structs(IDL)
SERVICE = IDL.EverythingService
METHODS = list(SERVICE.thrift_services)

PROPERTY = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_STRATEGIES = {}


def strategy_for(cls):
    if cls not in _STRATEGIES:
        _STRATEGIES[cls] = S.structs(cls)
    return _STRATEGIES[cls]


# --- peers ---------------------------------------------------------------------------------


def tp_encode(obj, cy=False) -> bytes:
    buf = TCyMemoryBuffer() if cy else TMemoryBuffer()
    factory = TCyBinaryProtocolFactory() if cy else TBinaryProtocolFactory()
    factory.get_protocol(buf).write_struct(obj)
    return buf.getvalue()


def tp_decode(cls, data: bytes, cy=False):
    obj = cls()
    buf = TCyMemoryBuffer(data) if cy else TMemoryBuffer(data)
    factory = TCyBinaryProtocolFactory() if cy else TBinaryProtocolFactory()
    factory.get_protocol(buf).read_struct(obj)
    return obj


def apache_protocol(trans, accelerated: bool, strict=True):
    from thrift.protocol import TBinaryProtocol
    if accelerated:
        # fallback=False: fail rather than silently test the pure-Python path.
        return TBinaryProtocol.TBinaryProtocolAccelerated(trans, fallback=False)
    return TBinaryProtocol.TBinaryProtocol(trans, strictRead=True, strictWrite=strict)


def apache_encode(aobj, accelerated: bool) -> bytes:
    from thrift.transport import TTransport
    trans = TTransport.TMemoryBuffer()
    aobj.write(apache_protocol(trans, accelerated))
    return trans.getvalue()


def apache_decode(acls, data: bytes, accelerated: bool):
    from thrift.transport import TTransport
    obj = acls()
    # Apache generates exceptions as immutable classes whose `read` is a
    # classmethod returning the new instance; structs are filled in place.
    made = obj.read(apache_protocol(TTransport.TMemoryBuffer(data), accelerated))
    return obj if made is None else made


def holds_exception(cls) -> bool:
    return any(issubclass(c, TException) for c in S.struct_classes(cls))


def assert_same(decoded, x, cls):
    assert S.canonical(decoded, cls) == S.canonical(x, cls)


def encoded_as_thriftpy2(cls, x):
    """``(ours, back)``: octo_core's bytes for ``x``, checked equal to thriftpy2's
    (pure and cybin), and what octo_core reads back from them, checked equal to ``x``."""
    ours = encode(x)
    assert type(ours) is bytes
    assert ours == tp_encode(x), "differs from thriftpy2's pure-Python TBinaryProtocol"
    assert ours == tp_encode(x, cy=True), "differs from thriftpy2's cybin TCyBinaryProtocol"
    back = decode(cls, ours)
    S.check_python_types(back)
    assert_same(back, x, cls)
    if not holds_exception(cls):
        assert back == x
    return ours, back


# --- octo_core vs thriftpy2 (pure and cybin) ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STRUCTS))
@PROPERTY
@given(data=st.data())
def test_encode_matches_thriftpy2_and_round_trips(name, data):
    cls = STRUCTS[name]
    x = data.draw(strategy_for(cls), label=name)
    ours, back = encoded_as_thriftpy2(cls, x)
    # Re-encoding what we decoded is stable (compare decoded forms: set order may differ).
    assert_same(decode(cls, encode(back)), x, cls)

    # Peers decode our bytes to x (thriftpy2 gives lists for sets: canonical form).
    assert_same(tp_decode(cls, ours), x, cls)
    assert_same(tp_decode(cls, ours, cy=True), x, cls)


@pytest.mark.parametrize("name", sorted(STRUCTS))
@settings(PROPERTY, max_examples=10)
@given(data=st.data())
def test_decode_accepts_any_buffer(name, data):
    cls = STRUCTS[name]
    x = data.draw(strategy_for(cls), label=name)
    raw = encode(x)
    padded = b"junk" + raw + b"more"
    for buf in (bytearray(raw), memoryview(raw), memoryview(padded)[4:-4],
                memoryview(bytearray(padded))[4:4 + len(raw)]):
        assert_same(decode(cls, buf), x, cls)


def _package_idl_structs():
    """(id, class) for every struct of the .thrift files shipped in octo_core:
    IDLs these tests did not write, handled by the same generic strategies."""
    root = os.path.dirname(os.path.abspath(octo_core.__file__))
    found = []
    for dirpath, _, files in sorted(os.walk(root)):
        for fname in sorted(files):
            if not fname.endswith(".thrift"):
                continue
            path = os.path.join(dirpath, fname)
            rel = os.path.relpath(path, root)
            module_name = "octo_test_" + "".join(c if c.isalnum() else "_" for c in rel) + "_thrift"
            module = octo_core.load_idl(path, module_name)
            found += [(f"{rel}:{name}", cls) for name, cls in sorted(S.top_level_structs(module).items())]
    return found


PACKAGE_IDL_STRUCTS = _package_idl_structs()


@pytest.mark.parametrize("cls", [c for _, c in PACKAGE_IDL_STRUCTS],
                         ids=[i for i, _ in PACKAGE_IDL_STRUCTS])
@settings(PROPERTY, max_examples=20)
@given(data=st.data())
def test_package_idls_match_thriftpy2(cls, data):
    x = data.draw(strategy_for(cls))
    ours = encode(x)
    assert ours == tp_encode(x) == tp_encode(x, cy=True)
    back = decode(cls, ours)
    S.check_python_types(back)
    assert_same(back, x, cls)
    assert_same(tp_decode(cls, ours), x, cls)


# --- octo_core vs Apache Thrift -------------------------------------------------------------------


APACHE_STRUCTS = sorted(n for n, c in STRUCTS.items() if S.apache_compatible(c))


@pytest.mark.parametrize("accelerated", [False, True], ids=["pure", "fastbinary"])
@pytest.mark.parametrize("name", APACHE_STRUCTS)
@PROPERTY
@given(data=st.data())
def test_encode_matches_apache(apache, name, accelerated, data):
    cls = STRUCTS[name]
    if accelerated and S.has_negative_ids(cls):
        pytest.skip("Apache emits no thrift_spec for negative field ids: fastbinary writes "
                    "an empty struct (see everything.thrift)")
    to_apache = S.ApacheConverter(*apache.modules)
    acls = to_apache.apache_class(cls)
    x = data.draw(strategy_for(cls), label=name)
    ours = encode(x)
    theirs = apache_encode(to_apache(x), accelerated)
    if S.fields_in_id_order(cls):
        assert ours == theirs
    else:
        # Apache writes fields in id order, octo_core (like thriftpy2) in
        # declaration order: both are valid, and each decodes the other.
        assert sorted(ours) == sorted(theirs) and len(ours) == len(theirs)
    back = decode(cls, theirs)
    S.check_python_types(back)
    assert_same(back, x, cls)
    assert_same(apache_decode(acls, ours, accelerated), x, cls)


def test_fastbinary_is_really_used(apache):
    importlib.import_module("thrift.protocol.fastbinary")    # the C extension is there
    from thrift.transport import TTransport
    proto = apache_protocol(TTransport.TMemoryBuffer(), accelerated=True)
    assert proto._fast_encode is not None and proto._fast_decode is not None


# --- messages ------------------------------------------------------------------------------------


def tp_message(name, msg_type, seqid, obj, strict=True) -> bytes:
    buf = TMemoryBuffer()
    proto = TBinaryProtocolFactory(strict_write=strict).get_protocol(buf)
    proto.write_message_begin(name, msg_type, seqid)
    proto.write_struct(obj)
    proto.write_message_end()
    return buf.getvalue()


def apache_message(name, msg_type, seqid, aobj, accelerated=False, strict=True) -> bytes:
    from thrift.transport import TTransport
    trans = TTransport.TMemoryBuffer()
    proto = (apache_protocol(trans, True) if accelerated
             else apache_protocol(trans, False, strict=strict))
    proto.writeMessageBegin(name, msg_type, seqid)
    aobj.write(proto)
    proto.writeMessageEnd()
    return trans.getvalue()


def is_oneway(method) -> bool:
    return bool(getattr(getattr(SERVICE, method + "_result"), "oneway", False))


@st.composite
def messages(draw):
    method = draw(st.sampled_from(METHODS))
    if is_oneway(method):
        msg_type = TMessageType.ONEWAY
    else:
        msg_type = draw(st.sampled_from([TMessageType.CALL, TMessageType.REPLY]))
    suffix = "_result" if msg_type == TMessageType.REPLY else "_args"
    cls = getattr(SERVICE, method + suffix)
    seqid = draw(st.integers(-(2 ** 31), 2 ** 31 - 1))
    obj = draw(strategy_for(cls))
    if msg_type == TMessageType.REPLY:
        # A real reply sets at most one field: `success` or one declared exception.
        names = [f.name for f in S.fields(cls)]
        keep = draw(st.sampled_from(names)) if names else None
        for n in names:
            if n != keep:
                setattr(obj, n, None)
    return method, msg_type, seqid, obj


def check_decoded_message(data, method, msg_type, seqid, obj):
    name, mtype, sid, back = decode_message(data, SERVICE)
    assert (name, mtype, sid) == (method, msg_type, seqid)
    assert type(back) is type(obj)
    S.check_python_types(back)
    assert_same(back, obj, type(obj))


@settings(PROPERTY, max_examples=60)
@given(msg=messages())
def test_messages_match_thriftpy2(msg):
    method, msg_type, seqid, obj = msg
    ours = encode_message(method, msg_type, seqid, obj)
    assert ours == tp_message(method, msg_type, seqid, obj)
    # Our bytes, and thriftpy2's old non-strict header.
    for data in (ours, tp_message(method, msg_type, seqid, obj, strict=False)):
        check_decoded_message(data, method, msg_type, seqid, obj)


@settings(PROPERTY, max_examples=40)
@given(msg=messages())
def test_messages_match_apache(apache, msg):
    method, msg_type, seqid, obj = msg
    ours = encode_message(method, msg_type, seqid, obj)
    aobj = S.ApacheConverter(*apache.modules)(obj)
    # thriftpy2 declares a result's `success` (id 0) after the exceptions, Apache
    # writes it first: with one field set, as in a real reply, the bytes agree.
    assert ours == apache_message(method, msg_type, seqid, aobj)
    assert ours == apache_message(method, msg_type, seqid, aobj, accelerated=True)
    check_decoded_message(apache_message(method, msg_type, seqid, aobj, strict=False),
                          method, msg_type, seqid, obj)


@pytest.mark.parametrize("exc_type", [0, 1, 6, 7])
@pytest.mark.parametrize("message", [None, "", "unknown method frobnicate", "\u2603 snow"])
def test_application_exception_message(exc_type, message):
    obj = TApplicationException(type=exc_type, message=message)
    ours = encode_message("echo", TMessageType.EXCEPTION, 7, obj)
    assert ours == tp_message("echo", TMessageType.EXCEPTION, 7, obj)
    name, mtype, seqid, back = decode_message(ours, SERVICE)
    assert (name, mtype, seqid) == ("echo", TMessageType.EXCEPTION, 7)
    assert type(back) is TApplicationException
    assert (back.type, back.message) == (exc_type, message)


@pytest.mark.parametrize("exc_type", [0, 6])
@pytest.mark.parametrize("message", [None, "internal \u2603"])
def test_application_exception_message_matches_apache(apache, exc_type, message):
    from thrift.Thrift import TApplicationException as ApacheTAE
    obj = TApplicationException(type=exc_type, message=message)
    ours = encode_message("echo", TMessageType.EXCEPTION, 7, obj)
    theirs = ApacheTAE(type=exc_type, message=message)
    assert ours == apache_message("echo", TMessageType.EXCEPTION, 7, theirs)
    back = decode_message(ours, SERVICE)[3]
    assert (back.type, back.message) == (exc_type, message)


def test_exception_message_for_a_method_the_service_lacks():
    # EXCEPTION messages always carry a TApplicationException, whatever the name.
    data = encode_message("no_such_method", TMessageType.EXCEPTION, 1,
                          TApplicationException(1, "nope"))
    name, _, _, back = decode_message(data, SERVICE)
    assert name == "no_such_method" and back.message == "nope"


def test_message_layout():
    obj = SERVICE.add_args(a=1, b=2)
    data = encode_message("add", TMessageType.CALL, 258, obj)
    assert data[:4] == b"\x80\x01\x00\x01"
    assert data[4:11] == b"\x00\x00\x00\x03add"
    assert data[11:15] == b"\x00\x00\x01\x02"
    assert data[15:] == encode(obj)


def test_long_method_name():
    # Names longer than the encoder's 256-byte header buffer.
    name = "m" * 1000
    obj = SERVICE.ping_args()
    data = encode_message(name, TMessageType.CALL, 1, obj)
    assert data == tp_message(name, TMessageType.CALL, 1, obj)
    assert codec.decode_message_begin(data)[:3] == (name, TMessageType.CALL, 1)


# --- specific values -----------------------------------------------------------------------------


def test_known_bytes():
    x = IDL.Scalars(flag=True, b=-1, tiny=127, small=-2, medium=0x01020304,
                    large=-(2 ** 63), real=1.5, text="h\u00e9", blob=b"\x00\xff", color=2)
    expected = (
        b"\x02\x00\x01\x01"
        b"\x03\x00\x02\xff"
        b"\x03\x00\x03\x7f"
        b"\x06\x00\x04\xff\xfe"
        b"\x08\x00\x05\x01\x02\x03\x04"
        b"\x0a\x00\x06\x80\x00\x00\x00\x00\x00\x00\x00"
        b"\x04\x00\x07" + struct.pack("!d", 1.5) +
        b"\x0b\x00\x08\x00\x00\x00\x03h\xc3\xa9"
        b"\x0b\x00\x09\x00\x00\x00\x02\x00\xff"
        b"\x08\x00\x0a\x00\x00\x00\x02"
        b"\x00"
    )
    assert encode(x) == expected
    assert decode(IDL.Scalars, expected) == x


@pytest.mark.parametrize("value", [math.nan, -math.nan, struct.unpack("!d", b"\x7f\xf0\x00\x00\x00\x00\x00\x01")[0],
                                   math.inf, -math.inf, 0.0, -0.0, 5e-324, 1.7976931348623157e308])
def test_doubles_bit_exact(value):
    # NaN is left out of the property tests (NaN != NaN); compare bytes instead.
    x = IDL.Scalars(real=value)
    data = encode(x)
    assert data == tp_encode(x) == tp_encode(x, cy=True)
    assert data[3:11] == struct.pack("!d", value)
    back = decode(IDL.Scalars, data).real
    assert struct.pack("!d", back) == struct.pack("!d", value)


def test_nan_in_containers():
    x = IDL.Containers(reals=[math.nan, 1.0], real_set={math.nan})
    data = encode(x)
    assert data == tp_encode(x)
    back = decode(IDL.Containers, data)
    assert math.isnan(back.reals[0]) and back.reals[1] == 1.0
    assert len(back.real_set) == 1 and math.isnan(next(iter(back.real_set)))


@pytest.mark.parametrize("field,lo,hi", [("b", -128, 127), ("tiny", -128, 127),
                                         ("small", -(2 ** 15), 2 ** 15 - 1),
                                         ("medium", -(2 ** 31), 2 ** 31 - 1),
                                         ("large", -(2 ** 63), 2 ** 63 - 1)])
def test_integer_bounds(field, lo, hi):
    for v in (lo, lo + 1, -1, 0, 1, hi - 1, hi):
        x = IDL.Scalars(**{field: v})
        data = encode(x)
        assert data == tp_encode(x)
        assert getattr(decode(IDL.Scalars, data), field) == v


def test_empty_struct_and_all_none():
    assert encode(IDL.Empty()) == b"\x00"
    assert encode(IDL.Scalars()) == b"\x00"
    assert decode(IDL.Empty, b"\x00") == IDL.Empty()


def test_field_ids_extremes():
    x = IDL.NegativeIds(minus_two="a", minus_one=-1, one=1, top=True)
    data = encode(x)
    assert data == tp_encode(x)
    assert data.startswith(b"\x0b\xff\xfe")                  # -2 first, as declared
    assert b"\x02\x7f\xff\x01" in data                       # id 32767
    assert decode(IDL.NegativeIds, data) == x
    h = IDL.HighId(low=1, highest=2 ** 62)
    assert encode(h)[7:10] == b"\x0a\x7f\xff"
    assert decode(IDL.HighId, encode(h)) == h


def test_out_of_order_declaration_is_written_in_declaration_order():
    x = IDL.OutOfOrder(third="c", first=1, second=[2])
    data = encode(x)
    assert data == tp_encode(x)
    assert data[:3] == b"\x0b\x00\x03"
    # Fields may arrive in any order.
    reordered = (b"\x0f\x00\x02\x0a\x00\x00\x00\x01" + struct.pack("!q", 2) +
                 b"\x08\x00\x01\x00\x00\x00\x01" + b"\x0b\x00\x03\x00\x00\x00\x01c" + b"\x00")
    assert decode(IDL.OutOfOrder, reordered) == x


def test_wide_struct_more_fields_than_the_stack_buffer():
    wide = IDL.Wide()
    for f in S.fields(IDL.Wide):
        setattr(wide, f.name, {TType.BOOL: True, TType.BYTE: -3, TType.I16: 300, TType.I32: f.fid,
                               TType.I64: -f.fid, TType.DOUBLE: f.fid / 4, TType.STRING: f.name,
                               TType.BINARY: f.name.encode(), TType.LIST: [f.fid]}[f.ttype])
    data = encode(wide)
    assert data == tp_encode(wide)
    assert decode(IDL.Wide, data) == wide
    # Absent fields of a wide struct decode as None.
    assert decode(IDL.Wide, b"\x00") == IDL.Wide()


def test_enums_decode_as_plain_ints():
    x = IDL.Containers(colors=[IDL.Color.RED, IDL.Color.INFRARED, IDL.Color.ULTRAVIOLET],
                       by_color={IDL.Color.BLUE: IDL.Inner(name="b")})
    back = decode(IDL.Containers, encode(x))
    assert back.colors == [0, -7, 2 ** 31 - 1]
    assert all(type(c) is int for c in back.colors)
    # A value the enum does not name still decodes (as an int).
    assert decode(IDL.Scalars, encode(IDL.Scalars(color=12345))).color == 12345


def test_sets_decode_as_sets_and_unhashable_sets_as_lists():
    x = IDL.PyOnly(set_of_lists=[[1, 2], [3]], set_of_maps=[{"a": 1}], set_of_sets=[{1, 2}, set()],
                   points={IDL.Point(x=1, y=2)}, by_point={IDL.Point(x=0, y=0): "origin"},
                   mixed=[[[1], [2, 3]]])
    data = encode(x)
    assert data == tp_encode(x)
    back = decode(IDL.PyOnly, data)
    assert back == x
    assert type(back.set_of_lists) is list and back.set_of_lists == [[1, 2], [3]]
    assert type(back.set_of_sets[0]) is set
    assert type(back.points) is set
    data = encode(IDL.Containers(tags={"a", "b"}, color_set={1}))
    c = decode(IDL.Containers, data)
    assert type(c.tags) is set and c.tags == {"a", "b"}
    assert type(c.color_set) is set
    # the difference the README and codec docs warn thriftpy2 users of
    assert type(tp_decode(IDL.Containers, data).tags) is list
    assert type(tp_decode(IDL.Containers, data, cy=True).tags) is list


def test_encode_accepts_equivalent_python_containers():
    # tuples/frozensets/bytearrays encode like lists/sets/bytes, as in thriftpy2.
    tags = frozenset({"x", "y"})
    x = IDL.Containers(ints=(1, 2, 3), tags=tags, blobs=[bytearray(b"ab"), memoryview(b"cd")])
    y = IDL.Containers(ints=[1, 2, 3], tags=tags, blobs=[b"ab", b"cd"])
    assert encode(x) == encode(y) == tp_encode(y)


def test_missing_fields_get_idl_defaults():
    d = decode(IDL.Defaults, encode(IDL.Defaults(must="given")))
    fresh = IDL.Defaults(must="given")
    assert d == fresh
    assert (d.answer, d.greeting, d.ratio, d.enabled, d.color, d.offset) == (42, "hello", 0.5, True, 1, -1)
    assert d.primes == [2, 3, 5] and d.ages == {"ann": 31, "bob": 27} and d.letters == {"x", "y"}
    assert d.grid == [["a"], [], ["b", "c"]]
    # Only `must` on the wire: everything else came from the IDL defaults.
    only_must = b"\x0b\x00\x0a\x00\x00\x00\x01m\x00"
    assert decode(IDL.Defaults, only_must) == IDL.Defaults()
    # Fields without a default decode as None.
    assert decode(IDL.Inner, b"\x00") == IDL.Inner(name=None, count=None)
    # A field present on the wire overrides the default, even with the default's value.
    assert decode(IDL.Oops, encode(IDL.Oops(code=0))).code == 0


def test_missing_container_default_is_a_fresh_object():
    """Each decoded struct gets its own default containers (as thriftpy2's
    constructor gives): mutating one must not change later decodes."""
    only_must = b"\x0b\x00\x0a\x00\x00\x00\x01m\x00"
    first = decode(IDL.Defaults, only_must)
    first.primes.append(7)
    first.ages["eve"] = 1
    first.letters.add("z")
    first.grid[0].append("zz")
    try:
        second = decode(IDL.Defaults, only_must)
        assert second.primes == [2, 3, 5]
        assert second.ages == {"ann": 31, "bob": 27}
        assert second.letters == {"x", "y"}
        assert second.grid == [["a"], [], ["b", "c"]]
        assert IDL.Defaults().primes == [2, 3, 5]
    finally:
        # Undo, in case the decoder shares its defaults: later tests must see the IDL's.
        first.primes.remove(7)
        del first.ages["eve"]
        first.letters.discard("z")
        first.grid[0].remove("zz")


def test_uuid_fields_of_a_newer_peer_are_skipped():
    """Thrift 0.19 added a uuid type (16 bytes); thriftpy2 IDLs have none, so to
    us such fields are unknown and must be skipped, as Thrift's forward
    compatibility requires. The bytes come from Apache's own writer: a uuid, a
    list of them, a map of them and a nested struct holding one, around the
    fields the IDL knows, in a message read framed and unframed."""
    import uuid

    from thrift.protocol import TBinaryProtocol
    from thrift.Thrift import TType as AType
    from thrift.transport import TTransport

    from octo_core.protocol import UNFRAMED, FrameDecoder

    ids = [uuid.UUID(int=i * 0x0123456789ABCDEF) for i in range(1, 4)]
    trans = TTransport.TMemoryBuffer()
    out = TBinaryProtocol.TBinaryProtocol(trans)
    out.writeMessageBegin("checksum", TMessageType.CALL, 9)
    out.writeStructBegin("checksum_args")
    out.writeFieldBegin("request_id", AType.UUID, 90)
    out.writeUuid(ids[0])
    out.writeFieldBegin("data", TType.STRING, 1)
    out.writeBinary(b"payload")
    out.writeFieldBegin("trail", AType.LIST, 91)
    out.writeListBegin(AType.UUID, len(ids))
    for one in ids:
        out.writeUuid(one)
    out.writeListEnd()
    out.writeFieldBegin("owners", AType.MAP, 92)
    out.writeMapBegin(AType.UUID, AType.UUID, 1)
    out.writeUuid(ids[1])
    out.writeUuid(ids[2])
    out.writeMapEnd()
    out.writeFieldBegin("origin", AType.STRUCT, 93)
    out.writeStructBegin("Origin")
    out.writeFieldBegin("id", AType.UUID, 1)
    out.writeUuid(ids[2])
    out.writeFieldStop()
    out.writeStructEnd()
    out.writeFieldBegin("algorithms", TType.SET, 2)
    out.writeSetBegin(TType.STRING, 1)
    out.writeString("crc")
    out.writeSetEnd()
    out.writeFieldStop()
    out.writeStructEnd()
    out.writeMessageEnd()
    message = trans.getvalue()

    expected = SERVICE.checksum_args(data=b"payload", algorithms={"crc"})
    assert decode_message(message, SERVICE) == ("checksum", TMessageType.CALL, 9, expected)
    decoder = FrameDecoder()
    frames = [f for at in range(len(message)) for f in decoder.feed(message[at:at + 1])]
    assert [(f.flags, f.body) for f in frames] == [(UNFRAMED, message)]


def test_container_map_keys_decode_as_tuples_and_frozensets(tmp_path):
    """A Java or C++ peer may send map<list<i32>, ...>: a Python list cannot be a
    dict key (thriftpy2 fails there), so keys come back as the encoder takes
    them, and re-encode to the same bytes, thriftpy2's."""
    (tmp_path / "container_keys.thrift").write_text(
        "struct Keys { 1: map<list<i32>, string> lists, 2: map<set<string>, i32> sets,\n"
        "              3: map<list<list<i64>>, bool> nested }\n")
    idl = octo_core.load_idl(str(tmp_path / "container_keys.thrift"))
    value = idl.Keys(lists={(1, 2): "a", (): "empty"}, sets={frozenset({"x", "y"}): 3},
                     nested={((1,), (2, 3)): True})
    data = encode(value)
    assert data == tp_encode(value)
    assert decode(idl.Keys, data) == value
    assert encode(decode(idl.Keys, data)) == data
