"""Types of the C extension ``octo_core._codec`` (its docstrings say what each does)."""
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, TypeVar, Union

from octo_core.errors import DecodeError as DecodeError
from octo_core.errors import EncodeError as EncodeError
from octo_core.errors import ProtocolError as ProtocolError

Buffer = Union[bytes, bytearray, memoryview]
_T = TypeVar("_T")

UNFRAMED: int
SHA256_HARDWARE: bool

class Limits:
    max_string_length: int
    max_container_length: int
    max_depth: int
    max_items: int
    def __init__(self, max_string_length: int = ..., max_container_length: int = ...,
                 max_depth: int = ..., max_items: int = ...) -> None: ...

# --- thrift binary ---------------------------------------------------------------------

def encode(obj: Any) -> bytes: ...
def decode(cls: Callable[..., _T], data: Buffer, limits: Optional[Limits] = ...) -> _T: ...
def check_struct(cls: type) -> None: ...
def is_twin(cls: type, of: type) -> bool: ...
def encode_message(name: str, msg_type: int, seqid: int, obj: Any, *,
                   check_required: bool = ..., max_depth: int = ...) -> bytes: ...
def decode_message_begin(data: Buffer, limits: Optional[Limits] = ...) -> Tuple[str, int, int, int]: ...
def decode_body(cls: Callable[..., _T], data: Buffer, offset: int,
                limits: Optional[Limits] = ...) -> _T: ...
def decode_body_counted(cls: Callable[..., _T], data: Buffer, offset: int,
                        limits: Optional[Limits] = ...) -> Tuple[_T, int]: ...
def decode_reply(result_cls: type, exception_cls: type, data: Buffer,
                 limits: Optional[Limits] = ..., seqid: int = ...,
                 name: Optional[str] = ...) -> Tuple[int, Any]: ...

# --- frames ----------------------------------------------------------------------------

def adler32(data: Buffer) -> int: ...
def encode_frame(flags: int, header_length: int, payload: Buffer, tail: Buffer = ...) -> bytes: ...
def encode_framed(body: Buffer) -> bytes: ...
def encode_framed_message(name: str, msg_type: int, seqid: int, obj: Any, *,
                          max_depth: int = ...) -> bytes: ...
def encode_unified_message(flags: int, header: Any, name: str, msg_type: int, seqid: int,
                           obj: Any) -> bytes: ...

class InflateBudget:
    per_pass: int
    used: int
    def __init__(self, per_pass: int, call_soon: Callable[[Callable[[], None]], Any]) -> None: ...

class FrameReader:
    max_frame_size: int
    consumed: int
    max_batch: int
    more: bool
    error: Optional[ProtocolError]
    budget: Optional[InflateBudget]
    def __init__(self, max_frame_size: int = ..., frame_cls: Optional[type] = ...,
                 decompress: Optional[Callable[[int, bytes, int], Buffer]] = ...,
                 limits: Optional[Limits] = ..., max_batch: int = ...) -> None: ...
    @property
    def buffered(self) -> int: ...
    def feed(self, data: Buffer) -> List[Any]: ...

# --- the unified header ----------------------------------------------------------------

class Head:
    message_type: int
    is_request: bool
    sequence_id: int
    service_name: Optional[str]
    call_type: int
    timeout: int
    status: int
    message: Optional[str]
    client_appkey: Optional[str]
    trace_id: Optional[str]
    span_id: Optional[str]
    global_context: Optional[Dict[str, str]]
    local_context: Optional[Dict[str, str]]
    raw: bytes
    def full(self, header_cls: Callable[..., _T]) -> _T: ...

def read_head(flags: int, header_length: int, payload: Buffer,
              limits: Optional[Limits] = ...) -> Tuple[Head, bytes]: ...
def request_header_bytes(message_type: int, service_name: str, sequence_id: int, call_type: int,
                         timeout: int, client_appkey: Optional[str] = ...,
                         trace_id: Optional[str] = ..., span_id: Optional[str] = ...,
                         global_context: Optional[Mapping[str, str]] = ...,
                         local_context: Optional[Mapping[str, str]] = ...) -> bytes: ...
def response_header_bytes(message_type: int, sequence_id: int, status: int,
                          message: Optional[str] = ...) -> bytes: ...
def encode_request(flags: int, message_type: int, service_name: str, sequence_id: int,
                   call_type: int, timeout: int, client_appkey: Optional[str],
                   trace_id: Optional[str], span_id: Optional[str],
                   global_context: Optional[Mapping[str, str]],
                   local_context: Optional[Mapping[str, str]], name: str, msg_type: int,
                   seqid: int, obj: Any, max_depth: int = ...) -> bytes: ...
def encode_response(flags: int, sequence_id: int, status: int, message: Optional[str], name: str,
                    msg_type: int, seqid: int, obj: Any, max_depth: int = ...) -> bytes: ...
def new_id() -> str: ...

# --- signing (PROTOCOL.md §6) ----------------------------------------------------------

def sha256_hex(data: Buffer) -> str: ...

class SigningKey:
    def __init__(self, key: Union[str, Buffer]) -> None: ...
    def digest(self, data: Buffer) -> bytes: ...
    def sign(self, client_appkey: str, server_appkey: str, service: str, method: str, ts: str,
             nonce: str, body_sha256: Optional[str] = ...) -> str: ...
    def verify(self, signature: str, client_appkey: str, server_appkey: str, service: str,
               method: str, ts: str, nonce: str, body_sha256: Optional[str] = ...) -> bool: ...
