"""The unified frame and native framed thrift, sans-IO (PROTOCOL.md §1–§4).

Bytes are checked against independent oracles: the layout written out by hand
with ``struct``, ``zlib.adler32`` for the checksum, Python's ``gzip`` module,
``cramjam`` for snappy (when installed) and thriftpy2's own binary protocol for
header bytes. Every malformed input must be a ``ProtocolError`` (status 5) and
nothing else, and must be refused before large buffers are allocated.
"""
from __future__ import annotations

import copy
import gzip
import os
import struct
import sys
import tracemalloc
import zlib
from typing import Any, List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from thriftpy2.protocol.binary import TBinaryProtocol
from thriftpy2.transport import TMemoryBuffer
from thriftpy2.thrift import TMessageType
from thriftpy2.utils import serialize

import octo_core
from octo_core import _codec, codec, protocol
from octo_core.errors import DecodeError, EncodeError, ProtocolError
from octo_core.protocol import (FLAG_CHECKSUM, FLAG_GZIP, FLAG_SNAPPY, Frame, FrameDecoder,
                                Header, HeartbeatInfo, LoadInfo, MessageType, RequestInfo,
                                TraceInfo)

from wire_helpers import Echo, have_snappy, watchdog  # noqa: F401  (fixture)

import strategies as S

pytestmark = pytest.mark.usefixtures("watchdog")

SNAPPY = have_snappy()
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

BASE_FLAGS = [0x01, 0x01 | FLAG_CHECKSUM, 0x01 | FLAG_GZIP, 0x01 | FLAG_GZIP | FLAG_CHECKSUM]
SNAPPY_FLAGS = [0x01 | FLAG_SNAPPY, 0x01 | FLAG_SNAPPY | FLAG_CHECKSUM,
                0x01 | FLAG_SNAPPY | FLAG_GZIP | FLAG_CHECKSUM]
ALL_FLAGS = BASE_FLAGS + (SNAPPY_FLAGS if SNAPPY else [])


def full_request_header(seq: int = 7) -> Header:
    return protocol.request_header(
        "com.example.EchoService", seq, 1500, call_type=protocol.CallType.NO_REPLY,
        trace=TraceInfo(clientAppkey="com.example.caller", traceId="abc", spanId="0.1",
                        debug=True, sample=False, clientIp="10.0.0.1"),
        global_context={"tenant": "t1", "ünï": "ｃｏｄｅ"}, local_context={"hop": "1"})


def full_response_header(seq: int = 7) -> Header:
    beat = HeartbeatInfo(appkey="com.example.echo", sendTime=1_700_000_000_000,
                         loadInfo=LoadInfo(averageLoad=0.5, threadNum=8,
                                           methodQpsMap={"echo": 12.5}),
                         status=2)
    return protocol.response_header(seq, 3, "busy", heartbeat=beat)


def echo_body(seq: int = 7, text: str = "hello") -> bytes:
    return codec.encode_message("echo", TMessageType.CALL, seq, Echo.echo_args(text=text))


def raw_unified(flags: int, header_length: int, payload: bytes, *,
                total_length: int = None, checksum: bool = None) -> bytes:
    """A unified frame written by hand from §1 (not by the code under test)."""
    checksum = bool(flags & FLAG_CHECKSUM) if checksum is None else checksum
    if total_length is None:
        total_length = 2 + len(payload) + (4 if checksum else 0)
    frame = (b"\xab\xba\x00" + bytes([flags]) + struct.pack("!i", total_length)
             + struct.pack("!h", header_length) + payload)
    if checksum:
        frame += struct.pack("!I", zlib.adler32(frame))
    return frame


def raw_framed(body: bytes) -> bytes:
    return struct.pack("!i", len(body)) + body


def feed_error(data: bytes, max_frame_size: int = protocol.DEFAULT_MAX_FRAME_SIZE) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        FrameDecoder(max_frame_size).feed(data)
    assert info.value.status == 5
    return info.value


def only_frame(data: bytes, max_frame_size: int = protocol.DEFAULT_MAX_FRAME_SIZE) -> Frame:
    decoder = FrameDecoder(max_frame_size)
    frames = decoder.feed(data)
    assert len(frames) == 1 and decoder.buffered == 0
    return frames[0]


# --- layout and round trips --------------------------------------------------------

def test_uncompressed_frame_layout_matches_the_contract():
    header = full_request_header()
    body = echo_body()
    frame = protocol.encode_unified(header, body)
    head = serialize(header)   # thriftpy2's TBinaryProtocol: an independent encoder
    assert frame[:4] == b"\xab\xba\x00\x01"
    assert struct.unpack("!i", frame[4:8])[0] == 2 + len(head) + len(body)
    assert struct.unpack("!h", frame[8:10])[0] == len(head)
    assert frame[10:] == head + body
    assert len(frame) == struct.unpack("!i", frame[4:8])[0] + 8


def test_header_always_writes_message_type_first():
    for header in (protocol.request_header("S", 0, 1), protocol.response_header(0)):
        encoded = codec.encode(header)
        assert encoded[:4] == b"\x03\x00\x01\x00"   # field 1, byte, value 0 (Normal)
    beat = protocol.scanner_heartbeat_request()
    assert beat.messageType == MessageType.SCANNER_HEARTBEAT
    assert beat.requestInfo == RequestInfo("ScannerHeartbeat", 1, 0, 1000)


@pytest.mark.parametrize("flags", ALL_FLAGS, ids=lambda f: f"0x{f:02x}")
@pytest.mark.parametrize("make_header", [full_request_header, full_response_header])
def test_round_trip_every_flag_combination(flags, make_header):
    header = make_header()
    body = echo_body() * 3
    frame = protocol.encode_unified(header, body, flags)
    assert frame[3] == flags
    decoded = only_frame(frame)
    assert decoded.flags == flags
    assert decoded.is_unified
    assert decoded.header == header
    assert bytes(decoded.body) == body


def test_encode_unified_message_equals_the_two_step_encoding():
    header = full_request_header(9)
    args = Echo.echo_args(text="x" * 300)
    for flags in ALL_FLAGS:
        one_pass = protocol.encode_unified_message(flags, header, "echo", TMessageType.CALL, 9, args)
        two_step = protocol.encode_unified(header, codec.encode_message("echo", 1, 9, args), flags)
        assert one_pass == two_step, f"flags 0x{flags:02x}"
    assert protocol.encode_framed_message("echo", 1, 9, args) == raw_framed(
        codec.encode_message("echo", 1, 9, args))


TEXT = st.text(max_size=40)
TEXT_MAP = st.one_of(st.none(), st.dictionaries(TEXT, TEXT, max_size=4))


@FUZZ
@given(message_type=st.sampled_from(list(MessageType)), service=TEXT,
       seq=st.integers(-2**63, 2**63 - 1), call_type=st.integers(0, 1),
       timeout=st.integers(-2**31, 2**31 - 1),
       trace=st.one_of(st.none(), st.tuples(TEXT, st.none() | TEXT, st.none() | TEXT)),
       global_context=TEXT_MAP, local_context=TEXT_MAP, flags=st.sampled_from([0x01, 0x81]))
def test_request_header_from_fields_is_the_header_struct_byte_for_byte(
        message_type, service, seq, call_type, timeout, trace, global_context, local_context,
        flags):
    trace_info = None if trace is None else TraceInfo(clientAppkey=trace[0], traceId=trace[1],
                                                      spanId=trace[2])
    header = Header(messageType=message_type,
                    requestInfo=RequestInfo(service, seq, call_type, timeout),
                    traceInfo=trace_info, globalContext=global_context or None,
                    localContext=local_context or None)
    fields = (message_type, service, seq, call_type, timeout, *(trace or (None,) * 3),
              global_context, local_context)
    assert _codec.request_header_bytes(*fields) == serialize(header)
    args = Echo.echo_args(text=service)
    assert (_codec.encode_request(flags, *fields, "echo", TMessageType.CALL, 3, args)
            == protocol.encode_unified_message(flags, header, "echo", TMessageType.CALL, 3, args))


@FUZZ
@given(seq=st.integers(-2**63, 2**63 - 1), status=st.integers(0, 127),
       text=st.none() | TEXT, flags=st.sampled_from(ALL_FLAGS))
def test_response_header_from_fields_is_the_header_struct_byte_for_byte(seq, status, text, flags):
    header = protocol.response_header(seq, status, text)
    assert _codec.response_header_bytes(MessageType.NORMAL, seq, status, text) == serialize(header)
    result = Echo.echo_result(success=text)
    assert (protocol.encode_response(flags, seq, status, text, "echo", TMessageType.REPLY, 4, result)
            == protocol.encode_unified_message(flags, header, "echo", TMessageType.REPLY, 4, result))
    assert protocol.encode_refusal(flags, seq, status, text or "") == protocol.encode_unified(
        protocol.response_header(seq, status, text or ""), b"", flags)


@pytest.mark.parametrize("fields, why", [
    ((0, None, 1, 0, 10), "serviceName is required"),
    ((0, b"Echo", 1, 0, 10), "serviceName must be str"),
    ((0, "Echo", 1, 0, 10, 7), "clientAppkey must be str"),
    ((0, "Echo", 1, 0, 10, "c", None, None, {"k": 1}), "must map str to str"),
    ((0, "Echo", 1, 0, 10, "c", None, None, None, ["x"]), "must be a dict"),
    ((0, "Echo", 1, 0, 10, "c", "\ud800"), "traceId"),
])
def test_request_header_fields_of_the_wrong_type_are_encode_errors(fields, why):
    with pytest.raises(EncodeError, match=why):
        _codec.request_header_bytes(*fields)


def test_new_ids_are_16_hex_digits_and_do_not_repeat():
    ids = {_codec.new_id() for _ in range(100_000)}
    assert len(ids) == 100_000
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in list(ids)[:100])


OPT_TEXT = st.none() | TEXT
RESPONSE_INFO = st.builds(protocol.ResponseInfo, st.integers(-2**63, 2**63 - 1),
                          st.integers(-128, 127), OPT_TEXT)
TRACE = st.builds(TraceInfo, clientAppkey=TEXT, traceId=OPT_TEXT, spanId=OPT_TEXT,
                  rootMessageId=OPT_TEXT, currentMessageId=OPT_TEXT, serverMessageId=OPT_TEXT,
                  debug=st.none() | st.booleans(), sample=st.none() | st.booleans(),
                  clientIp=OPT_TEXT)
HEADERS = st.one_of(
    st.builds(Header, messageType=st.none() | st.sampled_from(list(MessageType)),
              requestInfo=st.builds(RequestInfo, TEXT, st.integers(-2**63, 2**63 - 1),
                                    st.integers(-128, 127), st.integers(-2**31, 2**31 - 1)),
              traceInfo=st.none() | TRACE, globalContext=TEXT_MAP, localContext=TEXT_MAP),
    st.builds(Header, messageType=st.none() | st.sampled_from(list(MessageType)),
              responseInfo=RESPONSE_INFO,
              traceInfo=st.none() | TRACE,
              heartbeatInfo=st.none() | st.builds(HeartbeatInfo, appkey=OPT_TEXT,
                                                  status=st.integers(0, 5))))


def head_and_body(header: Header, body: bytes = b"body"):
    head_bytes = serialize(header)
    return _codec.read_head(1, len(head_bytes), head_bytes + body)


@FUZZ
@given(header=HEADERS)
def test_head_read_in_c_agrees_with_the_header_struct(header):
    head, body = head_and_body(header)
    assert body == b"body"
    assert head.full(Header) == header
    assert head.message_type == (header.messageType or 0)
    info = header.requestInfo or header.responseInfo
    assert head.is_request == (header.requestInfo is not None)
    assert head.sequence_id == info.sequenceId
    if head.is_request:
        assert (head.service_name, head.call_type, head.timeout) == (
            info.serviceName, info.callType, info.timeout)
    else:
        assert (head.status, head.message) == (info.status, info.message)
    trace = header.traceInfo
    assert (head.client_appkey, head.trace_id, head.span_id) == (
        (trace.clientAppkey, trace.traceId, trace.spanId) if trace else (None, None, None))
    assert head.global_context == header.globalContext
    assert head.local_context == header.localContext


@FUZZ
@given(header=HEADERS, trace=TRACE, response=RESPONSE_INFO)
def test_a_repeated_header_struct_replaces_the_first_whole(header, trace, response):
    """Thrift lets a field appear twice; the last copy wins, none of the first is kept
    (as in thriftpy2's struct decoder): an optional field the second copy lacks is None."""
    expected = copy.deepcopy(header)
    extra = b"\x0c\x00\x04" + serialize(trace)                  # traceInfo (field 4) again
    expected.traceInfo = trace
    if header.responseInfo is not None:
        extra += b"\x0c\x00\x03" + serialize(response)          # responseInfo (field 3) again
        expected.responseInfo = response
    data = serialize(header)[:-1] + extra + b"\x00"
    head, _ = _codec.read_head(1, len(data), data)
    assert head.full(Header) == expected
    assert (head.client_appkey, head.trace_id, head.span_id) == (
        trace.clientAppkey, trace.traceId, trace.spanId)
    if header.responseInfo is not None:
        assert (head.sequence_id, head.status, head.message) == (
            response.sequenceId, response.status, response.message)


@FUZZ
@given(header=HEADERS, data=st.data())
def test_damaged_header_bytes_are_a_protocol_error_and_nothing_else(header, data):
    good = serialize(header)
    cut = data.draw(st.integers(0, len(good) - 1))
    with pytest.raises(ProtocolError):
        _codec.read_head(1, cut, good[:cut])           # every truncation
    at = data.draw(st.integers(0, len(good) - 1))
    damaged = good[:at] + bytes([data.draw(st.integers(0, 255))]) + good[at + 1:]
    try:
        head, _ = _codec.read_head(1, len(damaged), damaged)
    except ProtocolError:
        return
    assert head.is_request in (True, False)


def test_header_text_must_be_utf8_where_a_body_string_need_not_be():
    """A message body's strings are read as thriftpy2 reads them (bytes when not
    UTF-8); the unified header's appkeys, names and contexts are text (§2)."""
    header = Header(requestInfo=RequestInfo("Echo\u00e9", 1, 0, 10),
                    traceInfo=TraceInfo(clientAppkey="caller", traceId="t", spanId="s"),
                    globalContext={"lane": "gr\u00fcn"}, localContext={})
    good = serialize(header)
    for text in ("Echo\u00e9", "caller", "gr\u00fcn"):
        encoded = text.encode()
        assert good.count(encoded) == 1
        damaged = good.replace(encoded, b"\xff" * len(encoded))
        with pytest.raises(ProtocolError, match="UTF-8"):
            _codec.read_head(1, len(damaged), damaged)
        head, _ = _codec.read_head(1, len(good), good)
        assert head.full(Header) == header


def test_head_reports_missing_required_fields_and_extra_bytes():
    no_timeout = serialize(Header(requestInfo=RequestInfo("Echo", 1, 0, 10)))
    no_timeout = no_timeout.replace(b"\x08\x00\x04\x00\x00\x00\x0a", b"")
    with pytest.raises(ProtocolError, match="RequestInfo.timeout is missing"):
        _codec.read_head(1, len(no_timeout), no_timeout)
    both = serialize(Header(requestInfo=RequestInfo("Echo", 1, 0, 10),
                            responseInfo=protocol.ResponseInfo(1, 0)))
    with pytest.raises(ProtocolError, match="both requestInfo and responseInfo"):
        _codec.read_head(1, len(both), both)
    good = serialize(Header(requestInfo=RequestInfo("Echo", 1, 0, 10)))
    with pytest.raises(ProtocolError):   # header_length past the header's own end
        _codec.read_head(1, len(good) + 1, good + b"\x00")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_draws_other_ids_than_its_parent():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: report its next ids and leave at once
        os.write(write, " ".join(_codec.new_id() for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 1024).decode().split()
    os.close(read)
    parent = [_codec.new_id() for _ in range(3)]
    assert len(child) == 3 and not set(child) & set(parent)


def test_framed_thrift_round_trip():
    body = echo_body(3)
    frame = protocol.encode_framed(body)
    assert frame == raw_framed(body)
    decoded = only_frame(frame)
    assert decoded == Frame(0, None, body)
    assert not decoded.is_unified


def test_frame_reader_strips_the_verified_checksum():
    head = codec.encode(full_request_header())
    body = echo_body()
    frame = _codec.encode_frame(0x81, len(head), head, body)
    assert frame == raw_unified(0x81, len(head), head + body)
    reader = _codec.FrameReader(1 << 20)
    assert reader.feed(frame) == [(0x81, len(head), head + body)]
    assert reader.consumed == len(frame) and reader.buffered == 0


def test_encode_refuses_what_cannot_be_framed():
    huge = protocol.request_header("S", 1, 1, global_context={"k": "v" * 40000})
    with pytest.raises(EncodeError):
        protocol.encode_unified(huge, b"")
    with pytest.raises(EncodeError):
        protocol.encode_unified_message(1, huge, "echo", 1, 1, Echo.echo_args(text="x"))
    with pytest.raises(EncodeError):
        _codec.encode_frame(1, 40000, b"")
    with pytest.raises(EncodeError):
        _codec.encode_frame(256, 0, b"")


# --- streams: byte by byte, mixed protocols -----------------------------------------

def mixed_stream():
    frames = [
        protocol.encode_unified(full_request_header(1), echo_body(1), 0x01),
        protocol.encode_framed(echo_body(2)),
        protocol.encode_unified(full_response_header(3), b"", 0x81),
        protocol.encode_framed(echo_body(4, "ü" * 50)),
        protocol.encode_unified(full_request_header(5), echo_body(5), 0x41),
        protocol.encode_unified(full_request_header(6), echo_body(6), 0xC1),
    ]
    return frames


def describe(frames):
    return [(f.flags, f.header, bytes(f.body)) for f in frames]


def test_mixed_unified_and_framed_in_one_stream():
    frames = mixed_stream()
    decoded = FrameDecoder().feed(b"".join(frames))
    assert len(decoded) == len(frames)
    assert [f.is_unified for f in decoded] == [True, False, True, False, True, True]
    assert [f.header.requestInfo.sequenceId for f in decoded if f.header and f.header.requestInfo] \
        == [1, 5, 6]
    assert decoded[2].header.responseInfo.sequenceId == 3
    assert bytes(decoded[1].body) == echo_body(2)


def test_byte_by_byte_equals_all_at_once():
    stream = b"".join(mixed_stream())
    expected = describe(FrameDecoder().feed(stream))
    decoder = FrameDecoder()
    got = []
    for i in range(len(stream)):
        got.extend(decoder.feed(stream[i:i + 1]))
        assert decoder.buffered <= i + 1
    assert describe(got) == expected
    assert decoder.buffered == 0


@FUZZ
@given(st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_any_chunking_gives_the_same_frames(cuts):
    stream = b"".join(mixed_stream())
    expected = describe(FrameDecoder().feed(stream))
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder()
    got = []
    for a, b in zip(points, points[1:]):
        got.extend(decoder.feed(stream[a:b]))
    assert describe(got) == expected


def test_partial_frame_is_buffered_not_returned():
    frame = protocol.encode_unified(full_request_header(), echo_body(), 0x81)
    decoder = FrameDecoder()
    assert decoder.feed(frame[:9]) == []          # shorter than the 10-byte prefix
    assert decoder.feed(frame[9:-1]) == []        # checksum byte missing
    assert decoder.buffered == len(frame) - 1
    assert len(decoder.feed(frame[-1:])) == 1
    assert decoder.buffered == 0


# --- checksum -------------------------------------------------------------------------

@pytest.mark.parametrize("data", [b"", b"a", b"Wikipedia", bytes(range(256)) * 40,
                                  b"\xff" * 1_000_003, b"\x00" * 70000],
                         ids=["empty", "one", "wikipedia", "ramp", "ff-1M", "zeros"])
def test_adler32_equals_zlib(data):
    assert _codec.adler32(data) == zlib.adler32(data)


@FUZZ
@given(st.binary(max_size=20000))
def test_adler32_equals_zlib_fuzz(data):
    assert _codec.adler32(data) == zlib.adler32(data)


def test_checksum_trailer_is_zlib_adler32_of_everything_before_it():
    for flags in ALL_FLAGS:
        if not flags & FLAG_CHECKSUM:
            continue
        frame = protocol.encode_unified(full_request_header(), echo_body(), flags)
        assert struct.unpack("!I", frame[-4:])[0] == zlib.adler32(frame[:-4])
        assert struct.unpack("!i", frame[4:8])[0] == len(frame) - 8


def test_bad_checksum_is_refused_wherever_the_damage_is():
    frame = bytearray(protocol.encode_unified(full_request_header(), echo_body(), 0x81))
    for position in (3 + 0, 9, 12, len(frame) // 2, len(frame) - 5, len(frame) - 1):
        if position == 3:
            continue   # flipping the flag byte changes the framing itself
        damaged = bytearray(frame)
        damaged[position] ^= 0x01
        assert "checksum" in str(feed_error(bytes(damaged)))


def test_hand_built_checksum_frame_is_accepted():
    head = codec.encode(full_request_header())
    frame = raw_unified(0x81, len(head), head + echo_body())
    assert only_frame(frame).header == full_request_header()


# --- compression ------------------------------------------------------------------------

def test_gzip_payload_is_one_gzip_member_of_header_plus_body():
    header, body = full_request_header(), echo_body() * 20
    frame = protocol.encode_unified(header, body, 0x41)
    head = codec.encode(header)
    payload = frame[10:]
    assert payload[:2] == b"\x1f\x8b"
    assert gzip.decompress(payload) == head + body
    assert struct.unpack("!h", frame[8:10])[0] == len(head)   # UNcompressed header length


def test_gzip_from_another_encoder_is_accepted():
    head = codec.encode(full_request_header())
    body = echo_body()
    payload = gzip.compress(head + body, compresslevel=1, mtime=123456)
    for flags in (0x41, 0xC1):
        frame = only_frame(raw_unified(flags, len(head), payload))
        assert frame.header == full_request_header() and bytes(frame.body) == body


@pytest.mark.parametrize("payload", [
    b"not gzip at all",
    gzip.compress(b"\x00" * 100)[:-6],                       # truncated member
    gzip.compress(b"\x00" * 100) + b"trailing",               # bytes after the member
    gzip.compress(b"\x00" * 100) + gzip.compress(b"\x00"),    # two members
    b"",
], ids=["garbage", "truncated", "trailing", "two-members", "empty"])
def test_bad_gzip_payload_is_a_protocol_error(payload):
    feed_error(raw_unified(0x41, 0, payload))


def test_gzip_header_length_checked_against_the_decompressed_payload():
    head = codec.encode(full_request_header())
    payload = gzip.compress(head)
    feed_error(raw_unified(0x41, len(head) + 1, payload))
    # the compressed blob is longer than the header: still judged on the inflated size
    padded = gzip.compress(head, compresslevel=0) + b""
    assert len(padded) > len(head)
    feed_error(raw_unified(0x41, len(head) + 5, padded))


def test_gzip_bomb_is_bounded_by_max_frame_size():
    limit = 1 << 20
    bomb = gzip.compress(b"\x00" * (32 << 20), compresslevel=9)   # ~32 KiB expanding to 32 MiB
    frame = raw_unified(0x41, 0, bomb)
    assert len(frame) < limit
    tracemalloc.start()
    try:
        err = feed_error(frame, max_frame_size=limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "limit" in str(err)
    assert peak < 8 * limit, f"decoding the bomb allocated {peak} bytes"


def test_snappy_bomb_preamble_is_refused_before_decompressing():
    # varint preamble claiming 2 GiB, then junk: must not try to allocate 2 GiB
    preamble = bytes([0x80, 0x80, 0x80, 0x80, 0x08])
    tracemalloc.start()
    try:
        feed_error(raw_unified(0x21, 0, preamble + b"\x00" * 64), max_frame_size=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


@pytest.mark.skipif(not SNAPPY, reason="cramjam is not installed")
def test_snappy_payload_is_a_raw_snappy_block():
    import cramjam
    header, body = full_request_header(), echo_body() * 20
    frame = protocol.encode_unified(header, body, 0x21)
    head = codec.encode(header)
    assert bytes(cramjam.snappy.decompress_raw(frame[10:])) == head + body
    # and a block compressed by cramjam directly decodes
    hand = raw_unified(0xA1, len(head), bytes(cramjam.snappy.compress_raw(head + body)))
    decoded = only_frame(hand)
    assert decoded.header == header and bytes(decoded.body) == body


@pytest.mark.skipif(not SNAPPY, reason="cramjam is not installed")
def test_snappy_wins_when_both_compression_bits_are_set():
    import cramjam
    header, body = full_request_header(), echo_body()
    frame = protocol.encode_unified(header, body, 0x61)
    head = codec.encode(header)
    assert bytes(cramjam.snappy.decompress_raw(frame[10:])) == head + body
    assert only_frame(frame).header == header
    # a gzip blob under both bits is read as snappy, and so refused
    feed_error(raw_unified(0x61, len(head), gzip.compress(head + body)))


@pytest.mark.skipif(not SNAPPY, reason="cramjam is not installed")
def test_bad_snappy_payload_is_a_protocol_error():
    import cramjam
    good = bytes(cramjam.snappy.compress_raw(b"abc" * 100))
    for payload in (b"", b"\xff\xff\xff\xff\xff\xff", good[:-3], b"\x05" + b"\x00" * 2):
        feed_error(raw_unified(0x21, 0, payload))


def test_snappy_without_cramjam_is_a_clear_protocol_error(monkeypatch):
    # hide cramjam whether or not it is installed: `import cramjam` now fails
    monkeypatch.setitem(sys.modules, "cramjam", None)
    head = codec.encode(full_request_header())
    err = feed_error(raw_unified(0x21, len(head), b"\x10" + head[:16]))
    assert "cramjam" in str(err)
    with pytest.raises(ProtocolError) as info:          # EncodeError is a ProtocolError
        protocol.encode_unified(full_request_header(), b"", 0x21)
    assert "cramjam" in str(info.value)
    # both bits set: snappy wins, so this is the snappy error too, not a gzip decode
    err = feed_error(raw_unified(0x61, len(head), gzip.compress(head)))
    assert "cramjam" in str(err)


# --- size limits --------------------------------------------------------------------

def test_max_frame_size_is_enforced_before_buffering_unified():
    decoder = FrameDecoder(1024)
    prefix = b"\xab\xba\x00\x01" + struct.pack("!i", 1 << 20) + b"\x00\x00"
    with pytest.raises(ProtocolError) as info:
        decoder.feed(prefix)            # only the 10-byte prefix: refused already
    assert "max_frame_size" in str(info.value)


def test_max_frame_size_is_enforced_before_buffering_framed():
    decoder = FrameDecoder(1024)
    with pytest.raises(ProtocolError):
        decoder.feed(struct.pack("!i", 5000))


def test_max_frame_size_boundary():
    limit = 256
    head = codec.encode(protocol.request_header("S", 1, 1))
    fits = raw_unified(0x01, len(head), head + b"x" * (limit - 10 - len(head)))
    assert len(fits) == limit
    assert only_frame(fits, limit).header.requestInfo.serviceName == "S"
    feed_error(raw_unified(0x01, len(head), head + b"x" * (limit - 9 - len(head))), limit)
    # framed thrift: the length itself is held to the limit, as PROTOCOL.md section 4
    # says and TFramedTransport's peers do
    body = b"\x00" * limit    # (a letter first would start an unframed old-style message)
    assert bytes(only_frame(raw_framed(body), limit).body) == body
    feed_error(raw_framed(body + b"y"), limit)


@pytest.mark.parametrize("total_length", [0, 1, -1])
def test_a_unified_frame_too_short_to_hold_a_header_length_is_refused_at_once(total_length):
    # the whole frame is these 8 bytes (or 9): nothing more is coming to wait for
    whole = b"\xab\xba\x00\x01" + struct.pack("!i", total_length) + b"\x00" * max(0, total_length)
    with pytest.raises(ProtocolError, match="too small"):
        FrameDecoder(1024).feed(whole)


def test_max_frame_size_applies_after_decompression_too():
    head = codec.encode(protocol.request_header("S", 1, 1))
    body = b"z" * 5000
    frame = protocol.encode_unified(protocol.request_header("S", 1, 1), body, 0x41)
    assert len(frame) < 1024
    feed_error(frame, max_frame_size=1024)
    assert bytes(only_frame(frame, 8192).body) == body
    assert len(head) < 1024


# --- malformed prefixes and headers ----------------------------------------------------

@pytest.mark.parametrize("total_length,flags", [
    (0, 0x01), (1, 0x01), (-1, 0x01), (-(1 << 31), 0x01), (5, 0x81), (2, 0x81),
], ids=["zero", "one", "minus-one", "int-min", "checksum-5", "checksum-2"])
def test_total_length_too_small(total_length, flags):
    data = (b"\xab\xba\x00" + bytes([flags]) + struct.pack("!i", total_length)
            + b"\x00\x00" + b"\x00" * 16)
    feed_error(data)


def test_smallest_legal_frame_is_a_prefix_with_empty_payload():
    # total_length 2, header_length 0: the framing is fine, the empty header is not
    feed_error(raw_unified(0x01, 0, b""))
    feed_error(raw_unified(0x81, 0, b""))


def test_negative_header_length():
    head = codec.encode(full_request_header())
    for header_length in (-1, -32768):
        feed_error(raw_unified(0x01, header_length, head + b"x" * 10))


def test_header_length_past_payload():
    head = codec.encode(full_request_header())
    feed_error(raw_unified(0x01, len(head) + 1, head))
    feed_error(raw_unified(0x81, 32767, head))


def test_header_with_neither_request_nor_response_info():
    for header in (Header(messageType=0), Header(messageType=1, traceInfo=TraceInfo("x")),
                   Header(messageType=2, heartbeatInfo=HeartbeatInfo(status=2))):
        head = codec.encode(header)
        assert "neither" in str(feed_error(raw_unified(0x01, len(head), head)))


def test_header_that_does_not_decode():
    garbage = b"\x0c\x00\x02" + b"\xff" * 12              # requestInfo struct, then junk
    feed_error(raw_unified(0x01, len(garbage), garbage))
    # requestInfo missing a required field (sequenceId)
    partial = (b"\x03\x00\x01\x00" + b"\x0c\x00\x02" + b"\x0b\x00\x01" + struct.pack("!i", 1)
               + b"S" + b"\x00" + b"\x00")
    feed_error(raw_unified(0x01, len(partial), partial))
    # header_length cuts the header short
    head = codec.encode(full_request_header())
    feed_error(raw_unified(0x01, len(head) - 3, head))


@pytest.mark.parametrize("serializer", [0, 2, 3])
def test_unsupported_serializer_bits(serializer):
    head = codec.encode(full_request_header())
    for extra in (0x00, FLAG_CHECKSUM):
        flags = serializer | extra
        err = feed_error(raw_unified(flags, len(head), head + echo_body()))
        assert "serializer" in str(err)


@pytest.mark.parametrize("length", [0, -1, -(1 << 31)])
def test_framed_length_not_positive(length):
    feed_error(struct.pack("!i", length) + b"\x80\x01\x00\x01")


@pytest.mark.parametrize("data,guess", [
    (b"\x82\x21\x00\x04echo", "compact protocol"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "TLS handshake"),
    (b"GET /metrics HTTP/1.1\r\n\r\n", "HTTP"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP"),
    (b'[1,"echo",1,0,{"1":{"str":"x"}}]', "JSON protocol"),
    (zlib.compress(b"\x80\x01\x00\x01\x00\x00\x00\x04echo"), "zlib"),
])
def test_the_usual_wrong_peers_are_named_in_the_error(data, guess):
    """A client on the wrong transport or protocol gets a hint in the error the
    server logs, not only a nonsense length."""
    assert guess in str(feed_error(data))


@pytest.mark.parametrize("data,guess", [
    (b"\x82\x21\x00\x04echo", "compact protocol"),
    (b'[1,"echo",1,0,{"1":{"str":"x"}}]', "JSON protocol"),
])
def test_the_usual_wrong_protocols_inside_a_good_frame_are_named_in_the_error(data, guess):
    """A framed client of another protocol (Apache's TJSONProtocol on a
    TFramedTransport, say) sends a frame the server reads: the message in it
    gets the hint too, not a method name length of a billion."""
    framed = struct.pack("!i", len(data)) + data
    frame, = FrameDecoder().feed(framed)
    with pytest.raises(DecodeError, match=guess):
        codec.decode_message(frame.body, Echo)


def test_unframed_thrift_messages_are_cut_by_their_own_structure():
    """Strict binary thrift with no length prefix (a buffered transport, thriftpy2's
    and Apache's default) is read message by message, however it is cut."""
    msg = codec.encode_message("echo", TMessageType.CALL, 7, Echo.echo_args(text="x" * 1000))
    framed = struct.pack("!i", len(msg)) + msg
    stream = msg + framed + msg                     # unframed, framed, unframed
    decoder = FrameDecoder()
    frames = [f for i in range(len(stream)) for f in decoder.feed(stream[i:i + 1])]
    assert [f.flags for f in frames] == [protocol.UNFRAMED, 0, protocol.UNFRAMED]
    assert all(f.body == msg and f.head is None for f in frames)
    assert decoder.buffered == 0


def old_style(name: str, msg_type: int, seqid: int, obj) -> bytes:
    """A message with the old (non-strict) header, as ``strict_write=False`` writes it."""
    return (struct.pack("!i", len(name)) + name.encode() + struct.pack("!bi", msg_type, seqid)
            + codec.encode(obj))


def test_unframed_messages_with_the_old_header_are_read_too():
    """``strict_write=False`` peers (Apache's and thriftpy2's option) on a buffered
    transport send no version word: the message starts with its name's length.
    Framed thrift cannot start so (after its length comes 0x80 or 0x00)."""
    args = Echo.echo_args(text="y" * 300)
    old = old_style("echo", TMessageType.CALL, 5, args)
    buffer = TMemoryBuffer()
    TBinaryProtocol(buffer, strict_write=False).write_message_begin("echo", TMessageType.CALL, 5)
    assert old.startswith(buffer.getvalue())                        # as thriftpy2 writes it
    strict = codec.encode_message("echo", TMessageType.CALL, 6, args)
    stream = old + struct.pack("!i", len(old)) + old + strict + old  # the framed one is old too
    decoder = FrameDecoder()
    frames = [f for i in range(len(stream)) for f in decoder.feed(stream[i:i + 1])]
    assert [f.flags for f in frames] == [protocol.UNFRAMED, 0, protocol.UNFRAMED, protocol.UNFRAMED]
    assert [f.body for f in frames] == [old, old, strict, old] and decoder.buffered == 0
    assert codec.decode_message(old, Echo)[1:] == (TMessageType.CALL, 5, args)


def test_bad_or_oversized_unframed_messages_are_protocol_errors():
    begin = b"\x80\x01\x00\x01\x00\x00\x00\x04echo\x00\x00\x00\x01"
    assert "unframed" in str(feed_error(begin + b"\x63\x00\x01"))  # no such field type
    assert "unframed" in str(feed_error(b"\x80\x01\x00\x09" + begin[4:] + b"\x00"))  # type 9
    big = codec.encode_message("echo", TMessageType.CALL, 1, Echo.echo_args(text="z" * 5000))
    assert "over 1024 bytes" in str(feed_error(big, max_frame_size=1024))
    claims = begin + b"\x0b\x00\x01" + struct.pack("!i", 2000)     # a string claiming 2000
    assert "over 1024 bytes" in str(feed_error(claims, max_frame_size=1024))   # refused up front
    deep = begin + b"\x0c\x00\x01" * 1000                   # finding the end nests 1000 deep
    assert "nesting deeper than 1000" in str(feed_error(deep))   # at most (Limits decide later)
    lies = begin + b"\x0f\x00\x01\x0c" + struct.pack("!i", 2 ** 31 - 1)  # 2^31 structs
    assert f"over {protocol.DEFAULT_MAX_FRAME_SIZE} bytes" in str(feed_error(lies))


def test_large_unframed_messages_trickled_byte_by_byte_cost_linear_time():
    """The scan keeps its place between reads: a 256 KiB message fed one byte at
    a time is read whole (re-scanning from its start at every read, as a naive
    reader does, would take minutes; this takes well under a second)."""
    args = Echo.echo_args(text="q" * (256 * 1024))
    msg = codec.encode_message("echo", TMessageType.CALL, 3, args)
    decoder = FrameDecoder()
    frames = [f for i in range(len(msg)) for f in decoder.feed(msg[i:i + 1])]
    assert [f.body for f in frames] == [msg] and decoder.buffered == 0


UNFRAMED_IDL = octo_core.load_idl(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "idl", "everything.thrift"))
UNFRAMED_STRUCTS = sorted(S.top_level_structs(UNFRAMED_IDL).items())


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_unframed_messages_of_any_struct_are_found_however_the_stream_is_cut(data):
    """Messages carrying generated values of every struct of an IDL we did not
    shape for this, with the strict or the old header: each comes out whole,
    whatever the read boundaries."""
    messages = []
    for seq in range(data.draw(st.integers(1, 3))):
        _, cls = data.draw(st.sampled_from(UNFRAMED_STRUCTS))
        value = data.draw(S.structs(cls, max_depth=3))
        messages.append(data.draw(st.sampled_from([codec.encode_message, old_style]))(
            "method", TMessageType.CALL, seq, value))
    stream = b"".join(messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder = FrameDecoder()
    frames = [f for a, b in zip([0] + cuts, cuts + [len(stream)]) for f in decoder.feed(stream[a:b])]
    assert [f.body for f in frames] == messages
    assert {f.flags for f in frames} == {protocol.UNFRAMED} and decoder.buffered == 0


def feed_all(decoder: FrameDecoder, chunks) -> tuple:
    """``(frames, error)`` from feeding ``chunks``: the frames up to the end or to
    the framing error, which a feed may keep (``decoder.error``) after handing
    over the frames before it."""
    frames = []
    try:
        for chunk in chunks:
            frames.extend(decoder.feed(chunk))
            if decoder.error is not None:
                raise decoder.error
    except ProtocolError as err:
        return frames, err
    return frames, None


# Old-header look-alikes: an empty name (a letter where its type byte goes), and a
# name longer than the frame limit (read as a framed length, it is too large).
HOSTILE_OLD_STARTS = [b"\x00\x00\x00\x00a", b"\x00\x10\x00\x00a"]


@pytest.mark.parametrize("start", HOSTILE_OLD_STARTS)
def test_four_bytes_then_the_rest_read_as_the_whole(start):
    """Four bytes starting with 0 are a framed length or an old-header name length:
    the name's first characters tell, so the reader waits for them."""
    stream = start + b"\x00\x00\x00\x01\x00"
    for cut in (4, 5):
        assert _feed_outcome([stream[:cut], stream[cut:]]) == _feed_outcome([stream])


def test_a_frame_of_zlib_is_a_frame_not_an_old_style_name_waited_for():
    """Apache's ``TZlibTransport`` over ``TFramedTransport`` frames zlib, which
    starts with "x": read as an old-style message's name, the frame length was
    taken for the name's and the server waited for bytes that never came (the
    client's read timed out). "x" then 0x9c is no name: the frame is read, and
    its message refused with the hint."""
    data = zlib.compress(codec.encode_message("echo", TMessageType.CALL, 1,
                                              Echo.echo_args(text="x")))
    frame, = FrameDecoder().feed(struct.pack("!i", len(data)) + data)
    assert frame.flags == 0 and frame.body == data
    with pytest.raises(DecodeError, match="zlib"):
        codec.decode_message(frame.body, Echo)
    old = old_style("xecho", TMessageType.CALL, 1, Echo.echo_args(text="x"))
    assert [f.body for f in FrameDecoder().feed(old)] == [old]   # a name that starts so


def _feed_outcome(chunks) -> tuple:
    decoder = FrameDecoder(max_frame_size=4096)
    frames, err = feed_all(decoder, chunks)
    return [f.body for f in frames], (str(err) if err is not None else decoder.buffered)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"\x80\x01\x00\x01\x00\x00\x00\x01m\x00\x00\x00\x01",
                        b"\x00\x00\x00\x01m\x01\x00\x00\x00\x01",    # strict, old header
                        *HOSTILE_OLD_STARTS]),
       st.binary(max_size=200), st.lists(st.integers(0, 220), max_size=8))
def test_unframed_hostile_bytes_read_the_same_however_they_are_cut(start, tail, cuts):
    """Any bytes after an unframed message start give the same frames and the
    same error (or the same bytes held) whether they come at once or in pieces."""
    stream = start + tail
    cuts = sorted(min(c, len(stream)) for c in cuts)
    pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    (whole_frames, whole_end), (cut_frames, cut_end) = _feed_outcome([stream]), _feed_outcome(pieces)
    assert cut_end == whole_end
    if isinstance(whole_end, str):    # a read that fails drops the frames it completed first
        assert cut_frames[:len(whole_frames)] == whole_frames
    else:
        assert cut_frames == whole_frames


def test_decoder_stays_broken_after_an_error():
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(struct.pack("!i", 0))
    with pytest.raises(ProtocolError):
        decoder.feed(protocol.encode_framed(echo_body()))


@pytest.mark.parametrize("flags", [0x01, 0x01 | FLAG_GZIP])
def test_a_bad_header_breaks_the_decoder_too(flags):
    decoder = FrameDecoder()
    garbage = b"\x0c\x00\x02" + b"\xff" * 12
    payload = gzip.compress(garbage + b"body") if flags & FLAG_GZIP else garbage + b"body"
    with pytest.raises(ProtocolError, match="bad unified header"):
        decoder.feed(raw_unified(flags, len(garbage), payload))
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.feed(protocol.encode_framed(echo_body()))


def test_frames_before_an_error_in_the_same_feed_are_handed_over_with_the_error():
    """However TCP cuts the bytes, good frames ahead of bad ones are not lost
    (a oneway call among them would vanish unanswered); the error follows them."""
    decoder = FrameDecoder()
    good = protocol.encode_framed(echo_body())
    frames = decoder.feed(good + good + struct.pack("!i", -5))
    assert [bytes(f.body) for f in frames] == [echo_body(), echo_body()]
    assert isinstance(decoder.error, ProtocolError) and "not positive" in str(decoder.error)
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.feed(good)


def test_one_feed_hands_out_about_max_batch_bytes_and_keeps_the_rest_compressed():
    body = b"\x00" * 100_000
    header = protocol.request_header("Echo", 1, 1000)
    frame = protocol.encode_unified(header, body, protocol.DEFAULT_FLAGS | protocol.FLAG_GZIP)
    decoder = FrameDecoder(max_batch=250_000)
    stream = frame * 5
    frames = decoder.feed(stream)
    assert len(frames) == 2 and decoder.more      # 2 x 100 kB inflated fit 250 kB, a 3rd would not
    assert decoder.buffered == 3 * len(frame)     # the rest as it came, still compressed
    assert len(decoder.feed(b"")) == 2 and decoder.more
    assert len(decoder.feed(b"")) == 1 and not decoder.more
    assert decoder.feed(b"") == [] and not decoder.more and decoder.buffered == 0


@pytest.mark.parametrize("flags", [FLAG_GZIP] + ([FLAG_SNAPPY] if SNAPPY else []))
def test_a_compressed_frame_goes_first_in_a_batch_it_would_not_fit(flags):
    """Behind other frames a compressed one is inflated only if what it says it
    inflates to fits the batch: a batch its reader stops partway (flow control)
    holds at most about ``max_batch`` inflated, not a bomb more."""
    header = protocol.request_header("Echo", 1, 1000)
    small = protocol.encode_unified(header, echo_body())
    big = protocol.encode_unified(header, b"\x00" * 200_000, 0x01 | flags)
    decoder = FrameDecoder(max_batch=100_000)
    assert len(decoder.feed(small + big)) == 1 and decoder.more
    assert decoder.buffered == len(big)           # as it came, compressed
    [frame] = decoder.feed(b"")                   # the first of its batch: inflated
    assert len(frame.body) == 200_000 and not decoder.more


def test_a_gzip_frame_that_lies_about_its_size_breaks_the_stream():
    header = protocol.request_header("Echo", 1, 1000)
    small = protocol.encode_unified(header, echo_body())
    head = codec.encode(header)
    payload = bytearray(protocol.compress(FLAG_GZIP, head + b"\x00" * 200_000))
    payload[-4:] = struct.pack("<I", 10)          # ISIZE: "10 bytes", to join the batch
    liar = _codec.encode_frame(0x01 | FLAG_GZIP, len(head), bytes(payload))
    decoder = FrameDecoder(max_batch=100_000)
    assert len(decoder.feed(small + liar)) == 1
    assert isinstance(decoder.error, ProtocolError) and "gzip" in str(decoder.error)


def _sharing(budget: "_codec.InflateBudget", count: int) -> List[FrameDecoder]:
    decoders = [FrameDecoder() for _ in range(count)]
    for decoder in decoders:
        decoder.budget = budget
    return decoders


def test_readers_sharing_an_inflate_budget_inflate_about_that_much_a_loop_pass():
    """A server's connections share one budget: many peers each sending one
    frame that inflates a lot are not all inflated in one pass; a frame held
    back waits compressed, with ``more`` set, for the refill (the next pass)."""
    header = protocol.request_header("Echo", 1, 1000)
    gzip_flags = protocol.DEFAULT_FLAGS | protocol.FLAG_GZIP
    frame = protocol.encode_unified(header, b"\x00" * 80_000, gzip_flags)
    passes: List[Any] = []
    budget = _codec.InflateBudget(100_000, passes.append)
    a, b, c = _sharing(budget, 3)
    assert len(a.feed(frame)) == 1 and not a.more
    assert len(passes) == 1                       # the refill, due at the next pass
    assert b.feed(frame) == [] and b.more and b.buffered == len(frame)
    plain = protocol.encode_unified(header, echo_body())
    assert len(c.feed(plain)) == 1 and not c.more  # uncompressed frames do not wait
    passes.pop()()                                 # the next pass
    assert budget.used == 0
    [inflated] = b.feed(b"")
    assert len(inflated.body) == 80_000 and not b.more and b.buffered == 0


def test_the_first_compressed_frame_of_a_pass_is_inflated_whatever_its_size():
    header = protocol.request_header("Echo", 1, 1000)
    big = protocol.encode_unified(header, b"\x00" * 300_000,
                                  protocol.DEFAULT_FLAGS | protocol.FLAG_GZIP)
    budget = _codec.InflateBudget(100_000, lambda refill: None)
    [decoder] = _sharing(budget, 1)
    [frame] = decoder.feed(big + big)
    assert len(frame.body) == 300_000 and decoder.more   # the second waits for a pass
    assert budget.used > budget.per_pass


def test_an_inflating_that_fails_is_charged_a_whole_frame():
    """A liar's ISIZE gets its frame inflated; what it cost is charged as the most it
    could have been, so liars on other connections wait for the next pass."""
    header = protocol.request_header("Echo", 1, 1000)
    head = codec.encode(header)
    payload = bytearray(protocol.compress(FLAG_GZIP, head + b"\x00" * 200_000))
    payload[-4:] = struct.pack("<I", 10)
    liar = _codec.encode_frame(0x01 | FLAG_GZIP, len(head), bytes(payload))
    budget = _codec.InflateBudget(1_000_000, lambda refill: None)
    first, second = _sharing(budget, 2)
    with pytest.raises(ProtocolError, match="gzip"):
        first.feed(liar)
    assert budget.used >= first.max_frame_size
    assert second.feed(liar) == [] and second.more


# --- fuzz ---------------------------------------------------------------------------

def decode_stream(chunks, max_frame_size=4096):
    """Feed chunks; the only acceptable failure is ProtocolError. Returns the frames."""
    frames, err = feed_all(FrameDecoder(max_frame_size), chunks)
    if err is not None:
        assert err.status == 5
        return frames, err
    for frame in frames:
        assert isinstance(frame, Frame)
        assert isinstance(bytes(frame.body), bytes)
        if frame.header is not None:
            assert frame.header.requestInfo is not None or frame.header.responseInfo is not None
            assert frame.flags & 0x03 == 1
    return frames, None


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_random_bytes_give_frames_or_protocol_error(chunks):
    decode_stream(chunks)


@st.composite
def unified_ish(draw):
    """Frames with a plausible prefix and random everything else (reaches deeper code)."""
    flags = draw(st.sampled_from([0x01, 0x81, 0x41, 0xC1, 0x21, 0x00, 0x03, 0x61]) | st.integers(0, 255))
    valid_head = codec.encode(draw(st.sampled_from([full_request_header(), full_response_header(),
                                                    protocol.scanner_heartbeat_request()])))
    payload = draw(st.one_of(
        st.binary(max_size=400),
        st.just(valid_head + draw(st.binary(max_size=50))),
        st.just(gzip.compress(valid_head + draw(st.binary(max_size=50)))),
    ))
    header_length = draw(st.one_of(st.just(len(valid_head)), st.integers(-40000, 40000)))
    header_length = max(-32768, min(32767, header_length))
    checksum = draw(st.booleans())
    frame = raw_unified(flags, header_length, payload, checksum=bool(flags & FLAG_CHECKSUM))
    if draw(st.booleans()):
        frame = bytearray(frame)
        index = draw(st.integers(0, len(frame) - 1))
        frame[index] = draw(st.integers(0, 255))
        frame = bytes(frame)
    if checksum and draw(st.booleans()):
        frame = frame[:draw(st.integers(0, len(frame)))]
    return frame


@FUZZ
@given(st.lists(unified_ish() | st.binary(max_size=64)
                | st.builds(lambda b: raw_framed(b), st.binary(max_size=100)), max_size=5),
       st.integers(1, 64))
def test_plausible_frames_give_frames_or_protocol_error(pieces, chunk):
    stream = b"".join(pieces)
    chunks = [stream[i:i + chunk] for i in range(0, len(stream), chunk)]
    frames, err = decode_stream(chunks)
    again, err2 = decode_stream([stream])
    assert (err is None) == (err2 is None)
    if err is None:
        assert describe(frames) == describe(again)
