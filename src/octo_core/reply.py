"""How a server answers one request: in the request's protocol (a unified frame,
framed or unframed thrift), a thrift message, a ``TApplicationException`` or a
refusal (a status and a message), checked against the connection's frame limit
before anything is sent."""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from thriftpy2.thrift import TApplicationException, TMessageType

from octo_core import _codec, protocol
from octo_core.errors import Status
from octo_core.transport.server import ServerConnection
from octo_core.throttle import Throttle

log = logging.getLogger("octo_core.server")   # (the server's records: one logger to filter)

#: Error texts sent to callers are diagnostics: past this many characters they are
#: cut, so an exception with a huge message still fits in a frame.
MAX_ERROR_TEXT = 4096

#: Refusals of native oneway calls (a peer calling a method this port lacks, or
#: an overloaded server): their callers read no answer, so the log is the trace.
_DROPPED = Throttle(10.0, log)
#: The TApplicationException type of a native refusal, by the status a unified one
#: has. A quota's (status 6) stays INTERNAL_ERROR: as LOADSHEDDING it would count
#: against the node in the caller's breaker, as an overload does, though the node
#: is up and serves others (a unified client tells the two apart by the status).
_NATIVE_REFUSALS: Dict[int, int] = {Status.PROTOCOL_EXCEPTION: TApplicationException.PROTOCOL_ERROR,
                                     Status.RPC_EXCEPTION: protocol.LOADSHEDDING}


class Reply:
    """How to answer one request on its connection, in its protocol."""

    __slots__ = ("conn", "flags", "sequence_id", "unified", "silent")

    def __init__(self, conn: ServerConnection, flags: int, sequence_id: int, unified: bool) -> None:
        self.conn = conn
        self.flags = flags
        self.sequence_id = sequence_id
        self.unified = unified
        # A oneway call on native thrift: its client reads no reply, so none is
        # sent, not even a refusal (it would be read as the next call's answer).
        # The unified protocol answers oneway calls (§3).
        self.silent = False

    def message(self, name: str, msg_type: int, seqid: int, obj: Any, status: int = 0,
                text: Optional[str] = None) -> None:
        """Send a thrift message; ``EncodeError`` (nothing sent) when it cannot be
        encoded or would exceed the connection's max_frame_size."""
        if self.silent:
            if msg_type == TMessageType.EXCEPTION:   # a refusal nobody will read: say it here
                _DROPPED.log("%s: a oneway call was dropped unanswered: %s", self.conn.peer, text)
            return
        conn, flags = self.conn, self.flags
        if self.unified and not flags & protocol.COMPRESSED:
            # The usual reply: protocol.encode_response's C half and check_frame_size's
            # test, without their two frames (every call's path).
            data = _codec.encode_response(flags, self.sequence_id, status, text, name, msg_type,
                                          seqid, obj, conn.max_depth)
            if len(data) > conn.max_frame_size:
                raise protocol.frame_too_large(len(data), conn.max_frame_size, "reply")
        else:
            data = self._encode(name, msg_type, seqid, obj, status, text)
        conn.send(data)

    def _encode(self, name: str, msg_type: int, seqid: int, obj: Any, status: int,
                text: Optional[str]) -> bytes:
        """The reply frame in this request's protocol; ``EncodeError`` as for ``message``."""
        limit, depth = self.conn.max_frame_size, self.conn.max_depth
        if self.unified:
            data = protocol.encode_response(self.flags, self.sequence_id, status, text,
                                            name, msg_type, seqid, obj, limit, depth)
        elif self.flags == protocol.UNFRAMED:     # a buffered-transport peer
            data = _codec.encode_message(name, msg_type, seqid, obj, check_required=True,
                                         max_depth=depth)
        else:
            data = protocol.encode_framed_message(name, msg_type, seqid, obj, max_depth=depth)
        protocol.check_frame_size(data, not self.unified and self.flags != protocol.UNFRAMED,
                                  limit, "reply")
        return data

    def app_exception(self, name: str, seqid: int, kind: int, text: Optional[str],
                      status: int = Status.APPLICATION_EXCEPTION) -> None:
        """A TApplicationException; ``text`` None: one without a message (as a
        handler raised it: thriftpy2 and Apache send it so, with no message field)."""
        text = None if text is None else _clip(text)
        self.message(name, TMessageType.EXCEPTION, seqid,
                     TApplicationException(kind, text), status, text)

    def refuse(self, status: int, text: str, name: str = "", seqid: int = 0) -> None:
        """A failure outside the handler: a status and message (§2), body-less on unified."""
        text = _clip(text)
        if self.unified:
            self.conn.send(protocol.encode_refusal(self.flags, self.sequence_id, status, text))
        else:
            kind = _NATIVE_REFUSALS.get(status, TApplicationException.INTERNAL_ERROR)
            self.app_exception(name, seqid, kind, text, status)


def _clip(text: str) -> str:
    """``text`` cut to MAX_ERROR_TEXT characters, and writable: a lone surrogate
    (os.fsdecode makes them of a file name that is not UTF-8) is escaped, since
    UTF-8 cannot carry it and the caller would get an EncodeError instead."""
    if isinstance(text, str) and not text.isascii():   # (a handler's TApplicationException
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")   # may hold bytes)
    if len(text) <= MAX_ERROR_TEXT:
        return text
    return f"{text[:MAX_ERROR_TEXT]}... ({len(text) - MAX_ERROR_TEXT} more characters)"
