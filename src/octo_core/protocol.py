"""The OCTO unified protocol and native framed thrift, sans-IO (PROTOCOL.md).

Bytes in, ``Frame`` objects out, and back: no sockets, no asyncio. The framing
and the header codec are C (``_codec``); this module adds the header objects,
payload compression and the rules of §1–§4.
"""
from __future__ import annotations

import enum
import gzip
import os
import sys
import zlib
from typing import Any, NamedTuple, Optional, Union

import thriftpy2

from octo_core import _codec
from octo_core.codec import Limits
from octo_core.errors import EncodeError, ProtocolError

_IDL = thriftpy2.load(os.path.join(os.path.dirname(__file__), "octo.thrift"),
                      module_name="octo_core_header_thrift")
Header = _IDL.Header
RequestInfo = _IDL.RequestInfo
ResponseInfo = _IDL.ResponseInfo
TraceInfo = _IDL.TraceInfo
LoadInfo = _IDL.LoadInfo
HeartbeatInfo = _IDL.HeartbeatInfo

FLAG_CHECKSUM = 0x80
FLAG_GZIP = 0x40
FLAG_SNAPPY = 0x20
SERIALIZER_MASK = 0x03
SERIALIZER_THRIFT = 1
DEFAULT_FLAGS = SERIALIZER_THRIFT
COMPRESSED = FLAG_GZIP | FLAG_SNAPPY
#: the bits a response mirrors (§1); the others mean nothing to us, so are not claimed back
MIRRORED_FLAGS = FLAG_CHECKSUM | COMPRESSED | SERIALIZER_MASK
MAX_HEADER_LENGTH = 32767
#: The sequenceId of an octo_core server's close notice (an addition to §3's
#: heartbeats, not in the contract): a NormalHeartbeat reply no call asked for,
#: sent before the server closes a connection (at a stop, status STOPPING; when
#: it is idle, the node's status). No call's sequence id is negative.
CLOSE_NOTICE_SEQUENCE = -1
#: The TApplicationException type of a native thrift request the server refused
#: without running it (overload, stopping): fbthrift's LOADSHEDDING, an addition
#: to the contract, where unified replies carry status 3 (§2).
#: Native thrift has no status: without it a refusal read as the handler's own
#: error, and an idempotent call was not tried on another node.
LOADSHEDDING = 11
#: The words of an octo_core server's status-4 answer to a call whose caller's
#: deadline passed before its handler started (it waited for a business thread)
#: or while it ran (its handler's call timed out by it, or it was cancelled at
#: it): a timeout, which its client raises as ``CallTimeout``, as the caller's own
#: timer would have (which comes first is a race). A relay that lets it out is
#: then answered as timed out too, not as its handler's bug.
DEADLINE_PASSED = "the caller's deadline passed"
#: Apache Thrift's default, the same in all its libraries (C++, Java, Go, ...): a
#: frame we send is one they read, and a peer of theirs is read as far as they write.
DEFAULT_MAX_FRAME_SIZE = 16_384_000
#: The nesting a connection writes by default: what ``Limits()`` lets it read.
DEFAULT_MAX_DEPTH = Limits().max_depth

SCANNER_HEARTBEAT_SERVICE = "ScannerHeartbeat"


class MessageType(enum.IntEnum):
    """``Header.messageType``."""
    NORMAL = 0
    NORMAL_HEARTBEAT = 1
    SCANNER_HEARTBEAT = 2


class CallType(enum.IntEnum):
    """``RequestInfo.callType``."""
    REPLY = 0
    NO_REPLY = 1


class NodeStatus(enum.IntEnum):
    """A node's status (PROTOCOL.md §5); heartbeat replies carry it."""
    DEAD = 0
    STARTING = 1
    ALIVE = 2
    STOPPING = 3
    STOPPED = 4
    WARNING = 5


def status_name(status: int) -> str:
    """A node status's name, or ``status N`` for a number ``NodeStatus`` lacks (a
    registry may hold any: a node written by another implementation)."""
    try:
        return NodeStatus(status).name
    except ValueError:
        return f"status {status}"


class Frame(NamedTuple):
    """One decoded frame. ``head`` (the header fields calls use, read in C) is
    ``None`` for native framed thrift; ``header`` is the whole ``Header``."""
    flags: int
    head: Optional[_codec.Head]
    body: Union[bytes, memoryview]

    @property
    def header(self) -> Optional[Any]:
        """The whole ``Header`` object, decoded on first use."""
        return None if self.head is None else self.head.full(Header)

    @property
    def is_unified(self) -> bool:
        """A unified-protocol frame (it has a header), not native thrift."""
        return self.head is not None


# --- compression ------------------------------------------------------------------

def _snappy():
    try:
        import cramjam
    except ImportError:  # the optional dependency: pip install octo_core[snappy]
        return None
    return cramjam.snappy


def _snappy_length(payload: bytes) -> int:
    """The uncompressed length a raw snappy block declares (its varint preamble)."""
    value = shift = 0
    for i, byte in enumerate(payload[:5]):
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
        shift += 7
    raise ProtocolError("snappy block has no valid length preamble")


def compress(flags: int, data: bytes) -> bytes:
    """``data`` compressed as the compression bits of ``flags`` say (snappy wins)."""
    if flags & FLAG_SNAPPY:
        snappy = _snappy()
        if snappy is None:
            raise EncodeError("snappy compression needs the 'cramjam' package")
        return bytes(snappy.compress_raw(data))
    if flags & FLAG_GZIP:
        return gzip.compress(data, compresslevel=6, mtime=0)
    return data


def decompress(flags: int, payload: bytes, limit: int) -> bytes:
    """Undo ``compress``; never produces more than ``limit`` bytes."""
    if flags & FLAG_SNAPPY:
        snappy = _snappy()
        if snappy is None:
            raise ProtocolError("snappy-compressed frame, but 'cramjam' is not installed")
        size = _snappy_length(payload)
        if size > limit:
            raise ProtocolError(f"snappy payload expands to {size} bytes, over the {limit} limit")
        try:
            out = bytes(snappy.decompress_raw(payload))
        except Exception as exc:  # cramjam raises its own DecompressionError
            raise ProtocolError(f"bad snappy payload: {exc}") from None
        if len(out) != size:
            raise ProtocolError("snappy payload length does not match its preamble")
        return out
    if flags & FLAG_GZIP:
        inflater = zlib.decompressobj(wbits=31)
        try:
            out = inflater.decompress(payload, limit + 1)
        except zlib.error as exc:
            raise ProtocolError(f"bad gzip payload: {exc}") from None
        if len(out) > limit:
            raise ProtocolError(f"gzip payload expands past the {limit}-byte limit")
        if not inflater.eof or inflater.unused_data:
            raise ProtocolError("gzip payload is truncated or has trailing bytes")
        return out
    return payload


# --- building frames --------------------------------------------------------------

def frame_too_large(size: int, limit: int, what: str) -> EncodeError:
    """The error for a frame over ``limit``: it is not sent, since the peer would
    refuse to read it and close the connection, failing every call on it."""
    return EncodeError(f"{what} of {size} bytes exceeds max_frame_size {limit}")


def check_frame_size(data: bytes, native_framed: bool, limit: int, what: str) -> None:
    """``EncodeError`` when ``data`` (a whole frame, about to be sent) exceeds
    ``limit``: all of a unified frame or an unframed message counts, but of native
    framed thrift only the length, not its own 4 bytes (PROTOCOL.md §4; Apache's
    TFramedTransport reads a length up to the limit)."""
    size = len(data) - 4 if native_framed else len(data)
    if size > limit:
        raise frame_too_large(size, limit, what)


def frame_unified(head: bytes, body: bytes, flags: int = DEFAULT_FLAGS,
                  limit: Optional[int] = None) -> bytes:
    """A whole unified frame from an encoded header and a thrift ``body``
    (compressed as ``flags`` say). With ``limit`` (the max_frame_size) a
    compressed payload must also fit once decompressed, as readers check."""
    if len(head) > MAX_HEADER_LENGTH:
        raise EncodeError(f"header of {len(head)} bytes cannot be framed (max {MAX_HEADER_LENGTH})")
    if flags & COMPRESSED:
        if limit is not None and len(head) + len(body) > limit:
            raise frame_too_large(len(head) + len(body), limit, "uncompressed payload")
        return _codec.encode_frame(flags, len(head), compress(flags, head + body))
    return _codec.encode_frame(flags, len(head), head, body)


def encode_unified(header: Any, body: bytes, flags: int = DEFAULT_FLAGS) -> bytes:
    """A whole unified frame: ``header`` (a ``Header``), then the thrift ``body``."""
    return frame_unified(_codec.encode(header), body, flags)


def encode_unified_message(flags: int, header: Any, name: str, msg_type: int, seqid: int,
                           obj: Any) -> bytes:
    """A unified frame carrying ``header`` and the thrift message ``(name, msg_type, seqid, obj)``."""
    if flags & COMPRESSED:
        return encode_unified(header, _codec.encode_message(name, msg_type, seqid, obj,
                                                            check_required=True), flags)
    return _codec.encode_unified_message(flags, header, name, msg_type, seqid, obj)


def encode_response(flags: int, sequence_id: int, status: int, text: Optional[str], name: str,
                    msg_type: int, seqid: int, obj: Any, limit: Optional[int] = None,
                    max_depth: int = DEFAULT_MAX_DEPTH) -> bytes:
    """A reply frame: a response header ``(sequence_id, status, text)`` and the
    message; the header is written from its fields, no ``Header`` object.
    ``limit`` as for ``frame_unified``; ``max_depth`` as for ``_codec.encode_message``."""
    if flags & COMPRESSED:
        return frame_unified(_codec.response_header_bytes(MessageType.NORMAL, sequence_id, status, text),
                             _codec.encode_message(name, msg_type, seqid, obj, check_required=True,
                                                   max_depth=max_depth),
                             flags, limit)
    return _codec.encode_response(flags, sequence_id, status, text, name, msg_type, seqid, obj,
                                  max_depth)


def encode_refusal(flags: int, sequence_id: int, status: int, text: str) -> bytes:
    """A body-less reply frame: only the status and message (§2)."""
    return frame_unified(_codec.response_header_bytes(MessageType.NORMAL, sequence_id, status, text),
                         b"", flags)


encode_framed = _codec.encode_framed
encode_framed_message = _codec.encode_framed_message
#: ``Frame.flags`` of a native thrift message that came unframed (a buffered
#: transport, thriftpy2's and Apache's default); its reply goes back unframed.
UNFRAMED = _codec.UNFRAMED


def request_header(service_name: str, sequence_id: int, timeout_ms: int, *,
                   call_type: int = CallType.REPLY, trace: Optional[Any] = None,
                   global_context: Optional[dict] = None,
                   local_context: Optional[dict] = None,
                   message_type: int = MessageType.NORMAL) -> Any:
    """A request ``Header``."""
    return Header(messageType=message_type,
                  requestInfo=RequestInfo(service_name, sequence_id, call_type, timeout_ms),
                  traceInfo=trace, globalContext=global_context or None,
                  localContext=local_context or None)


def response_header(sequence_id: int, status: int = 0, message: Optional[str] = None, *,
                    message_type: int = MessageType.NORMAL,
                    heartbeat: Optional[Any] = None) -> Any:
    """A response ``Header``."""
    return Header(messageType=message_type,
                  responseInfo=ResponseInfo(sequence_id, status, message),
                  heartbeatInfo=heartbeat)


def scanner_heartbeat_request() -> Any:
    """The ScannerHeartbeat request header §3 prescribes."""
    return request_header(SCANNER_HEARTBEAT_SERVICE, 1, 1000,
                          message_type=MessageType.SCANNER_HEARTBEAT)


# --- reading frames ---------------------------------------------------------------

class FrameDecoder(_codec.FrameReader):
    """Bytes from one connection in, ``Frame`` objects out (the C ``FrameReader``
    giving finished ``Frame``s).

    A ``ProtocolError`` from ``feed``, or in ``error`` after a ``feed`` that
    still returned the frames completed before it, means the connection must be
    closed: the stream's framing is lost. Header decoding is bounded by
    ``limits``. With ``max_batch``, one ``feed`` returns about that many bytes
    of frames (decoded: compressed ones count inflated) and sets ``more`` when
    whole frames are left; ``feed(b"")`` gives the next ones.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 limits: Optional[Limits] = None, max_batch: Optional[int] = None) -> None:
        super().__init__(max_frame_size, Frame, decompress, limits,
                         sys.maxsize if max_batch is None else max_batch)
