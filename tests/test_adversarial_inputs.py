"""Inputs the other tests did not think of: an outside checker's findings.

Each test here began as a reproducer of a bug found by feeding octo_core IDLs
it had not seen (``idl/adversarial.thrift``), other Thrift implementations'
bytes and hostile bytes, and stays as its regression test.

* Hash flooding: map keys and set elements whose Python hash the sender picks
  (container keys, decoded as tuples and frozensets; thriftpy2 structs, which
  hash their fields' values) can be made to share one hash, and a dict or set
  of n of them costs n² comparisons to build, on the event loop: half a
  megabyte held a server 4 s. A decode now refuses a map or set whose keys
  sharing hashes would cost more than 16 comparisons a key, plus 1024
  (``DecodeError``; a server answers PROTOCOL_EXCEPTION); keys that share
  hashes by nature (-1 and -2 do, and tuples of them) decode.
  A struct key nested deeper than Python's stack can hash (Limits allow 1000)
  raised RecursionError out of the decode: a ``DecodeError`` too.
* A TApplicationException whose message is not UTF-8 (a C++ server's text in
  GBK, say) reached the caller as an error whose ``message`` was bytes, and whose
  ``str()`` read ``b'\\xc4...'``: it is text now, its stray bytes escaped.
* A service with a field id past i16 (thriftpy2 loads it, no peer can write it)
  was added, then each request to it raised ValueError out of the connection's
  ``data_received``, dropping it: ``add_service`` refuses such a service.
* A handler's error text with a lone surrogate (a file name os.fsdecode made)
  could not be written: the caller got an EncodeError's text instead, and the
  server logged that the handler raised it. Such text is sent escaped.
"""
from __future__ import annotations

import itertools
import os
import random
import struct
from typing import List, Tuple

import pytest
from thriftpy2.thrift import TApplicationException, TMessageType

import octo_core
from octo_core import codec, protocol
from octo_core.codec import decode, encode
from octo_core.errors import ApplicationError, DecodeError, ProtocolError, RpcError, Status

from wire_helpers import (Echo, EchoHandler, async_client, decode_body, echo_services,
                          fake_server, framed_request, frames_read, raw_connection, run,
                          serving, watchdog)  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("watchdog")

HERE = os.path.dirname(os.path.abspath(__file__))
ADV = octo_core.load_idl(os.path.join(HERE, "idl", "adversarial.thrift"))

# --- hash collisions, made as an attacker would -------------------------------------------
# CPython's hashes of ints, tuples and frozensets have no per-process salt (str and
# bytes do): these invert them (CPython 3.8 to 3.13 hash so). Every helper checks its
# own output: on a Python that hashes otherwise the test is skipped, not passed
# vacuously.

_M = (1 << 64) - 1
_P1, _P2, _P5 = 11400714785074694791, 14029467366897019727, 2870177450012600261


def _rotl(x: int) -> int:
    return ((x << 31) | (x >> 33)) & _M


def _rotr(x: int) -> int:
    return ((x >> 31) | (x << 33)) & _M


def _check_collide(keys: list) -> None:
    """Skip the test unless ``keys`` are distinct and share one hash."""
    if len(set(keys)) != len(keys) or len({hash(k) for k in keys}) != 1:
        pytest.skip("this Python hashes tuples or frozensets otherwise than CPython 3.8-3.13")


def _int_with_hash(h: int):
    """An i64 whose Python hash is ``h`` (unsigned 64-bit), or None."""
    value = h - (1 << 64) if h >> 63 else h
    if -(2 ** 61 - 1) < value < 2 ** 61 - 1 and value != -1 and hash(value) == value:
        return value
    return None


def colliding_pairs(n: int, seed: int = 7) -> List[Tuple[int, int]]:
    """``n`` distinct pairs of i64 whose tuples share one hash."""
    target, rng, out = 0x0123456789ABCDEF, random.Random(seed), []
    while len(out) < n:
        a = rng.randrange(-(2 ** 60), 2 ** 60)
        after_a = _rotl((_P5 + (hash(a) & _M) * _P2) & _M) * _P1 & _M
        lane = (_rotr(target * pow(_P1, -1, 1 << 64) & _M) - after_a) * pow(_P2, -1, 1 << 64) & _M
        b = _int_with_hash(lane)
        if b is not None:
            out.append((a, b))
    _check_collide(out)
    return out


def _shuffle(h: int) -> int:   # setobject.c's _shuffle_bits
    return ((h ^ 89869747) ^ (h << 16)) * 3644798167 & _M


def _unshuffle(y: int) -> int:
    g = (y * pow(3644798167, -1, 1 << 64) & _M) ^ 89869747
    return (g ^ (g << 16) ^ (g << 32) ^ (g << 48)) & _M


def colliding_int_sets(n: int, seed: int = 11) -> List[frozenset]:
    """``n`` distinct two-element sets of i64 that share one hash."""
    target, rng, out = 0xFEDCBA9876543210, random.Random(seed), []
    while len(out) < n:
        a = rng.randrange(2, 2 ** 60)
        b = _int_with_hash(_unshuffle(target ^ _shuffle(hash(a) & _M)))
        if b is not None and b != a:
            out.append(frozenset((a, b)))
    _check_collide(out)
    return out


# --- wire builders: the bytes a peer could send --------------------------------------------

T_I32, T_I64, T_STRING, T_STRUCT, T_MAP, T_SET, T_LIST = 8, 10, 11, 12, 13, 14, 15


def _i64_list(values) -> bytes:
    return struct.pack("!bi", T_I64, len(values)) + b"".join(struct.pack("!q", v) for v in values)


def _path(values) -> bytes:
    """A ``Path`` struct: field 1, list<i64>."""
    return struct.pack("!bh", T_LIST, 1) + _i64_list(values) + b"\x00"


def keyed_by_list(keys) -> bytes:
    """``Keyed`` with field 1, map<list<i64>, i32>, holding ``keys``."""
    entries = b"".join(_i64_list(k) + struct.pack("!i", 0) for k in keys)
    return struct.pack("!bhbbi", T_MAP, 1, T_LIST, T_I32, len(keys)) + entries + b"\x00"


def keyed_by_set(keys) -> bytes:
    """``Keyed`` with field 2, map<set<i64>, i32>."""
    entries = b"".join(_i64_list(sorted(k)) + struct.pack("!i", 0) for k in keys)
    return struct.pack("!bhbbi", T_MAP, 2, T_SET, T_I32, len(keys)) + entries + b"\x00"


def keyed_paths(keys) -> bytes:
    """``Keyed`` with field 3, set<Path>."""
    return (struct.pack("!bhbi", T_SET, 3, T_STRUCT, len(keys))
            + b"".join(_path(k) for k in keys) + b"\x00")


def keyed_by_path(keys) -> bytes:
    """``Keyed`` with field 4, map<Path, string>."""
    entries = b"".join(_path(k) + struct.pack("!i", 0) for k in keys)
    return struct.pack("!bhbbi", T_MAP, 4, T_STRUCT, T_STRING, len(keys)) + entries + b"\x00"


FLOODS = {
    "map<list<i64>,_>": (keyed_by_list, colliding_pairs),
    "map<set<i64>,_>": (keyed_by_set, colliding_int_sets),
    "set<Path>": (keyed_paths, colliding_pairs),
    "map<Path,_>": (keyed_by_path, colliding_pairs),
}


# --- hash flooding -------------------------------------------------------------------------


# Keys sharing a hash may cost a map or set of n keys 16 n + 1024 comparisons (each
# key one with every earlier key of its hash): n keys of one hash, n (n - 1) / 2.
@pytest.mark.parametrize("shape", sorted(FLOODS))
def test_keys_made_to_share_one_hash_are_refused(shape):
    build, collide = FLOODS[shape]
    with pytest.raises(DecodeError, match="too many share a hash"):
        decode(ADV.Keyed, build(collide(65)))    # 2080 comparisons > 16 * 65 + 1024


@pytest.mark.parametrize("shape", sorted(FLOODS))
def test_a_few_keys_that_share_a_hash_still_decode(shape):
    build, collide = FLOODS[shape]
    keys = collide(64)    # 2016 comparisons <= 16 * 64 + 1024
    keyed = decode(ADV.Keyed, build(keys))
    held = [keyed.by_list, keyed.by_set, keyed.paths, keyed.by_path]
    assert sum(len(x or ()) for x in held) == 64


def test_what_keys_sharing_hashes_may_cost_grows_with_the_container():
    shared = colliding_pairs(100)    # 4950 comparisons: too many for 100 keys ...
    with pytest.raises(DecodeError, match="too many share a hash"):
        decode(ADV.Keyed, keyed_by_list(shared))
    plenty = [(i, -i) for i in range(300)]   # ... not for 400 (16 * 400 + 1024 = 7424)
    keyed = decode(ADV.Keyed, keyed_by_list(shared + plenty))
    assert set(keyed.by_list) == set(shared) | set(plenty)


@pytest.mark.parametrize("build", [keyed_by_list, keyed_paths], ids=["map", "set"])
def test_repeats_of_a_key_that_shares_its_hash_are_charged_too(build):
    """A repeat adds no key, yet finding its equal costs a comparison with each key
    before it of its hash. Uncharged, repeats bought budget for free: 817 keys of
    one hash and 20,000 repeats of the last (half a megabyte) held the decoder
    2.4 s as a set<Path>, and a 16 MB frame would hold it for minutes."""
    shared = colliding_pairs(270)              # 36,315 comparisons ...
    plenty = [(i, -i) for i in range(1, 2001)]
    decode(ADV.Keyed, build(shared + plenty))  # ... within 16 * 2270 + 1024 = 37,344
    with pytest.raises(DecodeError, match="too many share a hash"):
        decode(ADV.Keyed, build(shared + [shared[-1]] * 2000))


def test_keys_that_share_a_hash_by_nature_and_repeats_decode():
    # hash(-1) == hash(-2): the 32 tuples of five -1s and -2s share one hash
    chance = list(itertools.product((-1, -2), repeat=5)) + [(-1,), (-2,), (-1, -1), (-2, -2)]
    assert len({hash(key) for key in chance[:32]}) == 1
    plenty = [(i, -i) for i in range(5000)]
    repeated = [colliding_pairs(1)[0]] * 100    # one key, many times: no flood
    keyed = decode(ADV.Keyed, keyed_by_list(chance + plenty + repeated))
    assert set(keyed.by_list) == set(chance) | set(plenty) | set(repeated)
    paths = decode(ADV.Keyed, keyed_paths([[i, 1] for i in range(2000)] + [[5, 1]] * 50))
    assert len(paths.paths) == 2000


def test_what_octo_core_writes_it_reads_back():
    keyed = ADV.Keyed(by_list={(1, 2): 3, (): 4}, by_set={frozenset({1, 2}): 5},
                      paths={ADV.Path([1, 2]), ADV.Path([])},
                      by_path={ADV.Path([3]): "x"}, by_leaf={ADV.Leaf(1, "a"): 1},
                      leaves={ADV.Leaf(2, "b")}, blobs={b"\xff", b""}, by_real={-0.0: "z"})
    back = decode(ADV.Keyed, encode(keyed))
    assert back.by_list == keyed.by_list and back.by_set == keyed.by_set
    assert back.paths == keyed.paths and back.by_path == keyed.by_path
    assert back.by_leaf == keyed.by_leaf and back.leaves == keyed.leaves
    assert back.blobs == keyed.blobs and back.by_real == keyed.by_real


class Picker:
    def ping(self):
        pass

    def add(self, a, b):
        return a + b

    def fire(self, what):
        pass

    def pick(self, c, k):
        return c

    def levels(self, ls):
        return sorted(ls)


# the refusal as each protocol says it: a status 5 header, or a PROTOCOL_ERROR exception
REFUSED = {"octo": ProtocolError, "thrift": ApplicationError}


@pytest.mark.parametrize("proto", sorted(REFUSED))
def test_a_flooding_request_is_refused_and_the_client_calls_on(proto):
    flood = ADV.Keyed(by_list={pair: 0 for pair in colliding_pairs(100)})

    async def main():
        async with serving([(ADV.Derived, Picker(), None)]) as server, \
                async_client(ADV.Derived, server.address, protocol=proto) as client:
            with pytest.raises(REFUSED[proto], match="too many share a hash"):
                await client.pick(ADV.Choice(number=1), flood)
            assert await client.pick(ADV.Choice(number=2), ADV.Keyed()) == ADV.Choice(number=2)

    run(main())


# --- what a server sends back --------------------------------------------------------------

GBK_TEXT = "\u4f60\u597d".encode("gbk") + b" failed"   # "hello" in GBK: not UTF-8


def _answer_with_application_exception(status: int):
    """A fake server's handler: every call is answered with a TApplicationException
    whose message is ``GBK_TEXT`` (with ``status`` in a unified reply's header)."""
    async def handle(reader, writer):
        async for frame in frames_read(reader):
            name, _, seqid, _ = codec.decode_message_begin(frame.body)
            body = codec.encode_message(name, TMessageType.EXCEPTION, seqid, TApplicationException(
                TApplicationException.INTERNAL_ERROR, GBK_TEXT))
            writer.write(protocol.encode_framed(body) if frame.head is None else
                         protocol.encode_unified(
                             protocol.response_header(frame.head.sequence_id, status), body))
    return handle


@pytest.mark.parametrize("proto", ["octo", "thrift"])
def test_an_application_exception_whose_message_is_not_utf8_is_text(proto):
    async def main():
        async with fake_server(_answer_with_application_exception(1)) as address, \
                async_client(Echo, address, protocol=proto) as client:
            with pytest.raises(ApplicationError) as info:
                await client.echo("hi")
        error = info.value
        assert isinstance(error.message, str)
        assert error.message == GBK_TEXT.decode("utf-8", "backslashreplace")
        assert str(error).startswith(error.message)
        assert error.type == TApplicationException.INTERNAL_ERROR

    run(main())


def test_a_refusal_whose_header_message_is_not_utf8_fails_that_call_alone():
    """ResponseInfo.message is the peer's text for people: its odd bytes failed the
    header, and so the connection with every call on it."""
    refused = []

    async def handle(reader, writer):
        async for frame in frames_read(reader):
            seq = frame.head.sequence_id
            name, _, seqid, _ = codec.decode_message_begin(frame.body)
            if not refused:   # the first call refused, in GBK
                refused.append(seq)
                writer.write(protocol.encode_unified(
                    protocol.response_header(seq, Status.RPC_EXCEPTION, GBK_TEXT), b""))
            else:
                writer.write(protocol.encode_unified(protocol.response_header(seq, 0),
                                                     codec.encode_message(
                    name, TMessageType.REPLY, seqid, Echo.echo_result(success="ok"))))

    async def main():
        async with fake_server(handle) as address, async_client(Echo, address) as client:
            await client._endpoint(client._cluster.router.nodes[0]).connection()
            [endpoint] = client._endpoints.values()
            first = endpoint.ready()
            with pytest.raises(RpcError) as info:
                await client.echo("first")
            assert info.value.message == GBK_TEXT.decode("utf-8", "backslashreplace")
            assert await client.echo("second") == "ok"   # the same connection serves on
            [endpoint] = client._endpoints.values()
            assert endpoint.ready() is first

    run(main())


# --- IDLs the codec cannot speak -----------------------------------------------------------


def test_a_service_whose_structs_the_codec_cannot_compile_is_refused_when_added(tmp_path):
    """thriftpy2 loads field ids past i16, which no thrift binary peer can write.
    Such a service was added, and each request to it raised ValueError out of the
    connection's data_received (asyncio logged a fatal error and dropped the
    connection, every call on it with it). It is refused at add_service."""
    path = tmp_path / "bad_ids.thrift"
    path.write_text("struct Wide { 40000: i32 x }\n"
                    "service Bad { i32 ok(1: i32 a), i32 nested(1: Wide w) }\n"
                    "service Worse { i32 direct(70000: i32 y) }\n")
    bad = octo_core.load_idl(str(path))

    class Handler:
        def ok(self, a):
            return a

        def nested(self, w):
            return 0

        def direct(self, y):
            return y

    server = octo_core.Server(appkey="adv.server", host="127.0.0.1", port=0)
    for service, words in ((bad.Bad, "Bad.nested.*Wide: field id 40000"),
                           (bad.Worse, "Worse.direct.*direct_args: field id 70000")):
        with pytest.raises(ValueError, match=words):
            server.add_service(service, Handler())
    assert server.stats() == {}



# --- what a handler raises -----------------------------------------------------------------

#: A file name that is not UTF-8, as os.fsdecode gives it (a lone surrogate per stray byte).
UNDECODABLE = os.fsdecode(b"caf\xe9.txt")


class Failing(Picker):
    def ping(self):
        raise OSError(f"cannot open {UNDECODABLE}")

    async def add(self, a, b):
        raise TApplicationException(TApplicationException.INTERNAL_ERROR,
                                    f"cannot add {UNDECODABLE}")


@pytest.mark.parametrize("proto", ["octo", "thrift"])
def test_an_error_text_utf8_cannot_carry_reaches_the_caller_escaped(proto, caplog):
    """A handler's error whose text holds a lone surrogate (a file name os.fsdecode
    made) could not be written: the caller got an error about that EncodeError,
    not the handler's, and the server logged that the handler raised it."""
    async def main():
        async with serving([(ADV.Derived, Failing(), None)]) as server, \
                async_client(ADV.Derived, server.address, protocol=proto) as client:
            with pytest.raises(ApplicationError) as info:
                await client.ping()
            assert info.value.message == "OSError: cannot open caf\\udce9.txt"
            with pytest.raises(ApplicationError) as info:
                await client.add(1, 2)
            assert info.value.message == "cannot add caf\\udce9.txt"

    run(main())
    assert "EncodeError" not in caplog.text


def _chain(depth: int) -> bytes:
    """A ``Chain`` nested ``depth`` deep (each level a struct in field 1)."""
    return b"\x0c\x00\x01" * (depth - 1) + b"\x00" * depth


@pytest.mark.parametrize("field", [
    lambda chain: struct.pack("!bhbi", T_SET, 9, T_STRUCT, 1) + chain,
    lambda chain: struct.pack("!bhbbi", T_MAP, 10, T_STRUCT, T_I32, 1) + chain + b"\x00" * 4,
], ids=["set<Chain>", "map<Chain,_>"])
def test_a_key_too_deep_for_python_to_hash_is_a_decode_error(field):
    """thriftpy2 hashes a struct in Python, several frames a level: a key nested
    as deep as Limits allows (up to 1000) raised RecursionError out of the decode,
    and out of a server connection's data_received."""
    deep = field(_chain(400)) + b"\x00"
    with pytest.raises(DecodeError, match="too deep"):
        decode(ADV.Keyed, deep, codec.Limits(max_depth=1000))
    shallow = field(_chain(60)) + b"\x00"    # as deep as the default Limits read
    decoded = decode(ADV.Keyed, shallow)
    assert len(decoded.chains or decoded.by_chain) == 1


@pytest.mark.parametrize("msg_type", [TMessageType.REPLY, TMessageType.EXCEPTION])
def test_a_message_that_is_no_call_is_refused_not_run(msg_type):
    """A reply (or an exception) sent to a server -- a
    peer or a proxy reflecting one back -- is refused with status 5 (native:
    PROTOCOL_ERROR), its handler not run (it ran, its arguments read from a
    result struct: Nones), and the connection serves on."""
    handler = EchoHandler()

    async def main() -> None:
        async with serving(echo_services(handler)) as server, \
                raw_connection(server.address) as conn:
            header = protocol.request_header("Echo", 1, 2000)
            await conn.send(protocol.encode_unified(header, codec.encode_message(
                "notify", msg_type, 1, Echo.notify_args(text="reflected"))))
            refusal = await conn.read_frame()
            assert refusal.head.status == Status.PROTOCOL_EXCEPTION
            assert "is no call" in refusal.head.message
            await conn.send(framed_request("notify", Echo.notify_args(text="reflected"), 2,
                                           msg_type=msg_type))
            name, got_type, seqid, exc = decode_body(await conn.read_frame(), Echo)
            assert (got_type, seqid) == (TMessageType.EXCEPTION, 2)
            assert exc.type == TApplicationException.PROTOCOL_ERROR
            await conn.send(framed_request("echo", Echo.echo_args(text="still here"), 3))
            assert decode_body(await conn.read_frame(), Echo)[3].success == "still here"
            assert server.stats()["Echo.(unknown)"]["errors"] == {Status.PROTOCOL_EXCEPTION: 2}
        assert handler.notes.empty()

    run(main())
