"""The codec reads bytes, bytearray and memoryview arguments in place (a stack
view, with a buffer export for the mutable ones): every entry point gives the
same answer for each, holds no export and no reference once it returns (also
when it raises), refuses a non-contiguous view or an object without the buffer
protocol cleanly, and a ``FrameReader`` fed pieces of any of them cuts the
same frames."""
from __future__ import annotations

import array
import gc
import hashlib
import hmac
import sys
import zlib
from typing import Any, Callable, List

import pytest
from thriftpy2.thrift import TMessageType

from octo_core import _codec, protocol
from octo_core.errors import DecodeError, ProtocolError

from wire_helpers import Echo, unified_request

ARGS = Echo.echo_args(text="hello, views")
MESSAGE = _codec.encode_message("echo", TMessageType.CALL, 7, ARGS)
STRUCT = _codec.encode(ARGS)
REPLY = _codec.encode_message("echo", TMessageType.REPLY, 7, Echo.echo_result(success="hi"))
REQUEST = unified_request("echo", ARGS, 11)              # a whole unified frame
HEADER_LENGTH = int.from_bytes(REQUEST[8:10], "big")
PAYLOAD = REQUEST[10:]                                    # header + body, no checksum


def kinds(data: bytes) -> List[Any]:
    """``data`` as bytes, bytearray, memoryview (of bytes and of a bytearray),
    a memoryview of another format, and a slice of a larger memoryview."""
    padded = b"<" + data + b">"
    return [bytes(data), bytearray(data), memoryview(data), memoryview(bytearray(data)),
            memoryview(array.array("B", data)), memoryview(padded)[1:-1]]


CALLS: List[Callable[[Any], Any]] = [
    lambda d: _codec.decode(Echo.echo_args, d),
    lambda d: _codec.decode_message_begin(d),
    lambda d: _codec.decode_body(Echo.echo_args, d, _codec.decode_message_begin(MESSAGE)[3]),
    lambda d: _codec.decode_body_counted(Echo.echo_args, d,
                                         _codec.decode_message_begin(MESSAGE)[3]),
    lambda d: _codec.decode_reply(Echo.echo_result, None, d, seqid=7, name="echo"),
    lambda d: _codec.read_head(REQUEST[3], HEADER_LENGTH, d)[0].sequence_id,
    lambda d: _codec.adler32(d),
    lambda d: _codec.encode_frame(1, 3, d, d),
    lambda d: _codec.encode_frame(0x81, 0, b"x", d),
    lambda d: _codec.encode_framed(d),
    lambda d: _codec.sha256_hex(d),
    lambda d: _codec.SigningKey(d).digest(d),
]
DECODERS = 6   # the first CALLS: they refuse bad bytes (hashing and framing take any)
INPUTS = [STRUCT, MESSAGE, MESSAGE, MESSAGE, REPLY, PAYLOAD, MESSAGE, MESSAGE, MESSAGE,
          MESSAGE, MESSAGE, MESSAGE]


@pytest.mark.parametrize("index", range(len(CALLS)))
def test_every_kind_of_bytes_like_gives_the_answer_bytes_give(index):
    call, data = CALLS[index], INPUTS[index]
    expected = call(data)
    for arg in kinds(data):
        assert call(arg) == expected, type(arg)


def test_known_answers_for_bytearray_and_memoryview():
    for arg in kinds(MESSAGE):
        assert _codec.adler32(arg) == zlib.adler32(MESSAGE)
        assert _codec.sha256_hex(arg) == hashlib.sha256(MESSAGE).hexdigest()
        assert _codec.SigningKey(arg).digest(b"m") == hmac.new(MESSAGE, b"m", "sha256").digest()
        assert _codec.encode_framed(arg) == len(MESSAGE).to_bytes(4, "big") + MESSAGE
    assert _codec.decode(Echo.echo_args, bytearray(STRUCT)) == ARGS
    assert _codec.decode_reply(Echo.echo_result, None, memoryview(REPLY))[1].success == "hi"


@pytest.mark.parametrize("index", range(len(CALLS)))
def test_no_export_is_left_after_a_call_so_the_input_can_be_resized_or_released(index):
    call, data = CALLS[index], INPUTS[index]
    grown = bytearray(data)
    call(grown)
    grown += b"more"          # a BufferError if an export were still held
    del grown[len(data):]
    view = memoryview(data)
    call(view)
    view.release()            # likewise
    backing = bytearray(data)
    view = memoryview(backing)
    call(view)
    view.release()
    backing.clear()


@pytest.mark.parametrize("index", range(DECODERS))
def test_no_export_is_left_when_a_call_raises(index):
    call = CALLS[index]
    backing = bytearray(b"\x80\x01\x00\x01\xff\xff")     # no such struct, header or message
    view = memoryview(backing)
    with pytest.raises((DecodeError, ProtocolError, ValueError)):   # (offset past the end)
        call(view)
    view.release()
    backing += b"x"


def test_encode_frame_releases_the_payload_when_the_tail_is_refused():
    payload = bytearray(b"payload")
    with pytest.raises(TypeError):
        _codec.encode_frame(1, 0, payload, "not bytes")
    payload += b"!"           # the first view was closed though the second failed


def test_encode_frame_releases_both_views_when_it_refuses_the_header_length():
    payload, tail = bytearray(b"p"), bytearray(b"t")
    with pytest.raises(Exception):
        _codec.encode_frame(1, 40000, payload, tail)
    payload += b"!"
    tail += b"!"


@pytest.mark.parametrize("index", range(len(CALLS)))
def test_a_non_contiguous_view_is_refused_cleanly(index):
    call, data = CALLS[index], INPUTS[index]
    strided = memoryview(bytearray(data * 2))[::2]
    with pytest.raises(BufferError):
        call(strided)
    strided.release()


@pytest.mark.parametrize("index", range(len(CALLS)))
@pytest.mark.parametrize("bad", ["text", 12, None, [1, 2]])
def test_an_object_without_the_buffer_protocol_is_a_type_error(index, bad):
    with pytest.raises(TypeError):
        CALLS[index](bad)


@pytest.mark.parametrize("index", range(len(CALLS)))
def test_inputs_keep_their_reference_counts(index):
    call, data = CALLS[index], INPUTS[index]
    for arg in kinds(data):
        gc.collect()
        before = sys.getrefcount(arg)
        for _ in range(200):
            call(arg)
        gc.collect()
        assert sys.getrefcount(arg) == before, type(arg)


def test_a_bytearray_changed_between_calls_is_read_as_it_is_now():
    buf = bytearray(STRUCT)
    assert _codec.decode(Echo.echo_args, buf) == ARGS
    other = _codec.encode(Echo.echo_args(text="another, longer message than before"))
    buf[:] = other            # resized: the next call reads the new bytes
    assert _codec.decode(Echo.echo_args, buf).text == "another, longer message than before"
    buf[:] = b"\x00"
    assert _codec.decode(Echo.echo_args, buf) == Echo.echo_args()


def test_spec_lookup_survives_a_class_whose_spec_is_replaced():
    """``_spec_for``'s borrowed dict lookup: a class's cached spec is found, and a
    class carrying another class's spec (a copy of its dict) gets its own."""
    assert _codec.decode(Echo.echo_args, STRUCT) == ARGS
    twin = type("echo_args", (Echo.echo_args,), dict(vars(Echo.echo_args)))
    decoded = _codec.decode(twin, STRUCT)
    assert type(decoded) is twin and decoded.text == ARGS.text
    assert _codec.decode(Echo.echo_args, STRUCT) == ARGS


def _stream() -> bytes:
    frames = [unified_request("echo", Echo.echo_args(text=f"m{i}" * i), i) for i in range(20)]
    gz = protocol.SERIALIZER_THRIFT | protocol.FLAG_GZIP
    frames += [unified_request("echo", Echo.echo_args(text="zipped" * 50), 100 + i, flags=gz)
               for i in range(3)]
    frames.append(protocol.encode_framed(MESSAGE))
    return b"".join(frames)


def _cut(stream: bytes, feeds: List[Any]) -> List[Any]:
    reader = protocol.FrameDecoder()
    out = []
    for piece in feeds:
        out.extend(reader.feed(piece))
    assert reader.buffered == 0
    return [(f.flags, f.head.sequence_id if f.head else None, bytes(f.body)) for f in out]


@pytest.mark.parametrize("size", [1, 3, 7, 64, 1000])
def test_a_frame_reader_fed_pieces_of_any_kind_cuts_the_same_frames(size):
    stream = _stream()
    expected = _cut(stream, [stream])
    assert len(expected) == 24
    pieces = [stream[i:i + size] for i in range(0, len(stream), size)]
    makers = [bytes, bytearray, memoryview, lambda p: memoryview(bytearray(p)),
              lambda p: memoryview(b"." + p)[1:]]
    mixed = [makers[i % len(makers)](p) for i, p in enumerate(pieces)]
    assert _cut(stream, mixed) == expected
    for piece in mixed:       # nothing still exported
        if isinstance(piece, memoryview):
            piece.release()
    for piece in mixed:
        if isinstance(piece, bytearray):
            piece += b"x"


def test_a_frame_reader_fed_a_bytearray_that_changes_afterwards_keeps_what_it_read():
    stream = _stream()
    expected = _cut(stream, [stream])
    reader = protocol.FrameDecoder()
    buf = bytearray()
    out = []
    for i in range(0, len(stream), 50):
        buf[:] = stream[i:i + 50]     # the caller reuses its buffer for every read
        out.extend(reader.feed(buf))
        buf[:] = b"\xde\xad" * 40     # and overwrites (and resizes) it at once
    assert [(f.flags, f.head.sequence_id if f.head else None, bytes(f.body)) for f in out] \
        == expected


def test_a_frame_reader_refuses_a_non_contiguous_view_and_reads_on():
    stream = _stream()
    reader = protocol.FrameDecoder()
    strided = memoryview(bytearray(stream * 2))[::2]
    with pytest.raises(BufferError):     # read in place (nothing buffered yet)
        reader.feed(strided)
    first = reader.feed(stream[:30])
    with pytest.raises(TypeError):       # appended to what is buffered: bytearray's error
        reader.feed(strided[30:])
    frames = first + reader.feed(memoryview(stream[30:]))
    assert len(frames) == 24


def test_a_frame_reader_keeps_reference_counts_of_what_it_is_fed():
    stream = _stream()
    pieces = [bytearray(stream[:100]), memoryview(stream[100:400]), stream[400:]]
    gc.collect()
    before = [sys.getrefcount(p) for p in pieces]
    for _ in range(50):
        reader = protocol.FrameDecoder()
        for piece in pieces:
            reader.feed(piece)
    del piece
    gc.collect()
    assert [sys.getrefcount(p) for p in pieces] == before
