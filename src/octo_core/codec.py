"""Thrift binary codec for thriftpy2 structs (the Python face of ``_codec``).

``encode``/``decode`` handle one struct; ``encode_message``/``decode_message``
a whole strict TBinaryProtocol message (the old non-strict header is accepted
on decode). Decoding enforces ``Limits``; every failure is an
``octo_core.errors.EncodeError`` or ``DecodeError``. A ``string`` that is not
UTF-8 decodes to its bytes, as thriftpy2 reads it (C++, Go and older peers may
put GBK and the like there); bytes are written as they are. A ``set<T>``
decodes as a Python ``set`` (Apache's Python does so; thriftpy2 gives a
``list``), or as a ``list`` when its elements are lists, sets or maps, which
Python cannot hash.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

from thriftpy2.thrift import TApplicationException, TMessageType

from octo_core._codec import Limits, decode, decode_body, decode_message_begin, encode, encode_message
from octo_core.errors import DecodeError

Buffer = Union[bytes, bytearray, memoryview]

__all__ = ["Limits", "TMessageType", "encode", "decode", "encode_message", "decode_message",
           "message_class"]


def _check_limits(limits: Any) -> None:
    """``TypeError`` unless ``limits`` is None or a ``Limits`` (a ``Server``'s or a
    client's option: a dict of them failed only once a connection read with them)."""
    if limits is not None and not isinstance(limits, Limits):
        raise TypeError(f"limits is an octo_core.codec.Limits(max_depth=..., ...), not {limits!r}")


def message_class(service: Any, name: str, msg_type: int) -> type:
    """The struct class a ``msg_type`` message for method ``name`` of ``service`` carries.

    CALL/ONEWAY carry ``<name>_args``, REPLY ``<name>_result`` and EXCEPTION a
    ``TApplicationException``. Raises ``DecodeError`` for a method the service lacks.
    """
    if msg_type == TMessageType.EXCEPTION:
        return TApplicationException
    if name not in getattr(service, "thrift_services", ()):
        raise DecodeError(f"service {getattr(service, '__name__', service)!s} has no method {name!r}")
    suffix = "_result" if msg_type == TMessageType.REPLY else "_args"
    return getattr(service, name + suffix)


def decode_message(data: Buffer, service: Any,
                   limits: Optional[Limits] = None) -> Tuple[str, int, int, Any]:
    """``(name, msg_type, seqid, obj)`` of one whole TBinaryProtocol message in ``data``."""
    name, msg_type, seqid, offset = decode_message_begin(data, limits)
    try:
        cls = message_class(service, name, msg_type)
    except DecodeError as exc:
        # the name ends where the seqid (strict) or the type byte and seqid begin
        strict = bytes(memoryview(data)[:1]) >= b"\x80"
        exc.offset = offset - (4 if strict else 5) - len(name.encode("utf-8"))
        raise
    return name, msg_type, seqid, decode_body(cls, data, offset, limits)
