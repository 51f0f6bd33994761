# Included by _codec.pyx: the unified header (PROTOCOL.md §2) written straight
# from its fields, and the ids of TraceInfo. The per-call paths build no
# thriftpy2 Header objects; the bytes are exactly those of encode(Header(...))
# (tests compare them), fields in id order, unset optional fields left out.

from os import register_at_fork, urandom


cdef inline int _w_field(_Writer* w, uint8_t wire, uint16_t fid) except -1:
    _w_reserve(w, 3)
    _put_u8(w.data + w.len, wire)
    _put_u16(w.data + w.len + 1, fid)
    w.len += 3
    return 0


cdef inline int _w_fixed(_Writer* w, uint8_t wire, uint16_t fid, int64_t v) except -1:
    """A byte, i32 or i64 field."""
    _w_field(w, wire, fid)
    if wire == T_BYTE:
        return _w_u8(w, <uint8_t>v)
    if wire == T_I32:
        return _w_u32(w, <uint32_t>v)
    return _w_u64(w, <uint64_t>v)


cdef int _w_text(_Writer* w, uint16_t fid, object v, str what) except -1:
    """An optional string field: nothing when ``v`` is None."""
    if v is None:
        return 0
    if not PyUnicode_Check(v):
        raise EncodeError(f"{what} must be str, got {_tname(v)}")
    _w_field(w, T_STRING, fid)
    try:
        _w_string(w, v, T_STRING)
    except UnicodeError as e:
        raise EncodeError(f"{what}: {e}") from e
    return 0


cdef int _w_text_map(_Writer* w, uint16_t fid, object d, str what) except -1:
    """An optional map<string, string> field: nothing when ``d`` is None or empty."""
    cdef Py_ssize_t pos = 0
    cdef PyObject* k
    cdef PyObject* v
    if not d:
        return 0
    if not PyDict_CheckExact(d):
        if not isinstance(d, dict):
            raise EncodeError(f"{what} must be a dict of str to str, got {_tname(d)}")
    _w_field(w, T_MAP, fid)
    _w_reserve(w, 6)
    _put_u8(w.data + w.len, T_STRING)
    _put_u8(w.data + w.len + 1, T_STRING)
    _put_u32(w.data + w.len + 2, <uint32_t>len(d))
    w.len += 6
    while PyDict_Next(d, &pos, &k, &v):
        if not PyUnicode_Check(<object>k) or not PyUnicode_Check(<object>v):
            raise EncodeError(f"{what} must map str to str, got "
                              f"{_tname(<object>k)} -> {_tname(<object>v)}")
        try:
            _w_string(w, <object>k, T_STRING)
            _w_string(w, <object>v, T_STRING)
        except UnicodeError as e:
            raise EncodeError(f"{what}: {e}") from e
    return 0


cdef int _w_request_header(_Writer* w, int message_type, object service_name,
                           int64_t sequence_id, int call_type, int32_t timeout,
                           object client_appkey, object trace_id, object span_id,
                           object global_context, object local_context) except -1:
    if service_name is None:
        raise EncodeError("RequestInfo.serviceName is required")
    _w_fixed(w, T_BYTE, 1, message_type)
    _w_field(w, T_STRUCT, 2)                       # RequestInfo
    _w_text(w, 1, service_name, "RequestInfo.serviceName")
    _w_fixed(w, T_I64, 2, sequence_id)
    _w_fixed(w, T_BYTE, 3, call_type)
    _w_fixed(w, T_I32, 4, timeout)
    _w_stop(w)
    if client_appkey is not None:
        _w_field(w, T_STRUCT, 4)                   # TraceInfo
        _w_text(w, 1, client_appkey, "TraceInfo.clientAppkey")
        _w_text(w, 2, trace_id, "TraceInfo.traceId")
        _w_text(w, 3, span_id, "TraceInfo.spanId")
        _w_stop(w)
    _w_text_map(w, 5, global_context, "Header.globalContext")
    _w_text_map(w, 6, local_context, "Header.localContext")
    return _w_stop(w)


cdef int _w_response_header(_Writer* w, int message_type, int64_t sequence_id, int status,
                            object message) except -1:
    _w_fixed(w, T_BYTE, 1, message_type)
    _w_field(w, T_STRUCT, 3)                       # ResponseInfo
    _w_fixed(w, T_I64, 1, sequence_id)
    _w_fixed(w, T_BYTE, 2, status)
    _w_text(w, 3, message, "ResponseInfo.message")
    _w_stop(w)
    return _w_stop(w)


def request_header_bytes(int message_type, service_name, int64_t sequence_id, int call_type,
                         int32_t timeout, client_appkey=None, trace_id=None, span_id=None,
                         global_context=None, local_context=None) -> bytes:
    """The encoded request ``Header``; ``client_appkey`` None leaves out TraceInfo."""
    cdef _Writer w
    _w_init(&w, 128)
    try:
        _w_request_header(&w, message_type, service_name, sequence_id, call_type, timeout,
                          client_appkey, trace_id, span_id, global_context, local_context)
    except BaseException:
        _w_abandon(&w)
        raise
    return _w_finish(&w)


def response_header_bytes(int message_type, int64_t sequence_id, int status,
                          message=None) -> bytes:
    """The encoded response ``Header`` (no heartbeat)."""
    cdef _Writer w
    _w_init(&w, 64)
    try:
        _w_response_header(&w, message_type, sequence_id, status, message)
    except BaseException:
        _w_abandon(&w)
        raise
    return _w_finish(&w)


def encode_request(int flags, int message_type, service_name, int64_t sequence_id,
                   int call_type, int32_t timeout, client_appkey, trace_id, span_id,
                   global_context, local_context, name, msg_type, seqid, obj,
                   int max_depth=64) -> bytes:
    """A whole uncompressed unified request frame in one pass: the header from
    its fields (as ``request_header_bytes``), then the message ``(name, msg_type,
    seqid, obj)``, nested at most ``max_depth`` deep (see ``encode_message``)."""
    _check_plain_flags(flags)
    cdef _StructSpec s = _encode_spec(obj)
    cdef _Writer w
    _w_init(&w, s.size_hint + 160, True, max_depth)   # a call's message: its required fields set
    try:
        w.len = PREFIX
        _w_request_header(&w, message_type, service_name, sequence_id, call_type, timeout,
                          client_appkey, trace_id, span_id, global_context, local_context)
        header_length = w.len - PREFIX
        _w_message_begin(&w, name, msg_type, seqid)
        _w_top(&w, s, obj)
    except BaseException:
        _w_abandon(&w)
        raise
    return _finish_unified(&w, flags, header_length)


def encode_response(int flags, int64_t sequence_id, int status, message, name, msg_type,
                    seqid, obj, int max_depth=64) -> bytes:
    """A whole uncompressed unified reply frame in one pass (a normal message
    type), nested at most ``max_depth`` deep (see ``encode_message``)."""
    _check_plain_flags(flags)
    cdef _StructSpec s = _encode_spec(obj)
    cdef _Writer w
    _w_init(&w, s.size_hint + 96, True, max_depth)    # a reply's message: its required fields set
    try:
        w.len = PREFIX
        _w_response_header(&w, 0, sequence_id, status, message)
        header_length = w.len - PREFIX
        _w_message_begin(&w, name, msg_type, seqid)
        _w_top(&w, s, obj)
    except BaseException:
        _w_abandon(&w)
        raise
    return _finish_unified(&w, flags, header_length)


# --- trace ids -------------------------------------------------------------------
# 64 random bits as 16 hex digits, from xorshift128+ seeded by the OS (and
# reseeded in a forked child, so parent and child never share a sequence).
# Ids must be unique, not secret.

cdef uint64_t _id_state[2]     # _HEX comes from _sign.pxi


def _seed_ids() -> None:
    cdef bytes seed = urandom(16)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(seed)
    _id_state[0] = _get_u64(p) | 1
    _id_state[1] = _get_u64(p + 8)


_seed_ids()
register_at_fork(after_in_child=_seed_ids)


def new_id() -> str:
    """A fresh 64-bit id as 16 lowercase hex digits (trace and span ids)."""
    cdef uint64_t x = _id_state[0], y = _id_state[1]
    _id_state[0] = y
    x ^= x << 23
    _id_state[1] = x ^ y ^ (x >> 17) ^ (y >> 26)
    cdef uint64_t v = _id_state[1] + y
    cdef char out[16]
    cdef int i
    for i in range(16):
        out[15 - i] = _HEX[v & 0xF]
        v >>= 4
    return out[:16].decode("ascii")


# --- reading a header ---------------------------------------------------------------

cdef class Head:
    """The fields of a unified ``Header`` that calls use, read without building
    thriftpy2 objects. ``full(Header)`` decodes the whole struct (heartbeat
    info, the rest of TraceInfo) from ``raw`` on demand, once."""
    cdef readonly int message_type
    cdef readonly bint is_request
    cdef readonly int64_t sequence_id
    cdef readonly object service_name      # request
    cdef readonly int call_type            # request
    cdef readonly int32_t timeout          # request, milliseconds
    cdef readonly int status               # response
    cdef readonly object message           # response
    cdef readonly object client_appkey     # TraceInfo, None without one
    cdef readonly object trace_id
    cdef readonly object span_id
    cdef readonly object global_context    # dict or None
    cdef readonly object local_context     # dict or None
    cdef readonly bytes raw
    cdef Limits _limits
    cdef object _full

    def full(self, header_cls):
        """The whole header as a ``header_cls`` (thriftpy2 ``Header``) object."""
        if self._full is None:   # its text is UTF-8, as the fields read in C
            self._full = _decode_at(_decode_spec(header_cls), <const unsigned char*>self.raw,
                                    0, len(self.raw), self._limits, True, True)
        return self._full


cdef _TypeSpec _TEXT_MAP = _TypeSpec.__new__(_TypeSpec)
_TEXT_MAP.kind = _TEXT_MAP.wire = T_MAP
_TEXT_MAP.key = _TEXT_MAP.elem = _primitive(T_STRING)


cdef inline int _r_field(_Reader* r, int* fid) except -2:
    """The next field header of a struct: its wire type (``T_STOP`` at the end)."""
    _need(r, 1, "field type")
    cdef int wire = r.buf[r.pos]
    if wire == T_STOP:
        r.pos += 1
        return T_STOP
    _need(r, 3, "field header")
    fid[0] = <int16_t>((r.buf[r.pos + 1] << 8) | r.buf[r.pos + 2])
    r.pos += 3
    return wire


cdef inline int64_t _r_fixed(_Reader* r, int wire) except? -1:
    """A byte, i32 or i64 value."""
    cdef int64_t v
    if wire == T_BYTE:
        _need(r, 1, "byte")
        v = <int8_t>r.buf[r.pos]
        r.pos += 1
    elif wire == T_I32:
        v = _r_i32(r)
    else:
        _need(r, 8, "i64")
        v = <int64_t>_get_u64(r.buf + r.pos)
        r.pos += 8
    return v


cdef int _missing(str field, _Reader* r) except -1:
    raise DecodeError(f"required field {field} is missing (struct ends at byte {r.pos})",
                      offset=r.pos)


cdef int _r_request_info(_Reader* r, Head h) except -1:
    cdef int fid = 0, wire, seen = 0
    while True:
        wire = _r_field(r, &fid)
        if wire == T_STOP:
            break
        if fid == 1 and wire == T_STRING:
            h.service_name = _r_string(r, T_STRING)
        elif fid == 2 and wire == T_I64:
            h.sequence_id = _r_fixed(r, wire)
        elif fid == 3 and wire == T_BYTE:
            h.call_type = <int>_r_fixed(r, wire)
        elif fid == 4 and wire == T_I32:
            h.timeout = <int32_t>_r_fixed(r, wire)
        else:
            _skip(r, wire, 2)
            continue
        seen |= 1 << fid
    if seen != 0b11110:
        for fid, name in ((1, "serviceName"), (2, "sequenceId"), (3, "callType"), (4, "timeout")):
            if not seen & (1 << fid):
                _missing(f"RequestInfo.{name}", r)
    return 0


cdef str _r_free_text(_Reader* r):
    """A string a peer writes for people (ResponseInfo.message): bytes that are not
    UTF-8 in it (a C++ peer's GBK, say) come out escaped, failing nothing else
    read with it -- the other calls of the connection."""
    cdef bint strict = r.strict_text
    r.strict_text = False
    text = _r_string(r, T_STRING)
    r.strict_text = strict
    return text.decode("utf-8", "backslashreplace") if type(text) is bytes else text


cdef int _r_response_info(_Reader* r, Head h) except -1:
    cdef int fid = 0, wire, seen = 0
    h.message = None    # a repeated responseInfo replaces the first whole (so does TraceInfo)
    while True:
        wire = _r_field(r, &fid)
        if wire == T_STOP:
            break
        if fid == 1 and wire == T_I64:
            h.sequence_id = _r_fixed(r, wire)
        elif fid == 2 and wire == T_BYTE:
            h.status = <int>_r_fixed(r, wire)
        elif fid == 3 and wire == T_STRING:
            h.message = _r_free_text(r)
        else:
            _skip(r, wire, 2)
            continue
        seen |= 1 << fid
    if not seen & 2:
        _missing("ResponseInfo.sequenceId", r)
    if not seen & 4:
        _missing("ResponseInfo.status", r)
    return 0


cdef int _r_trace_info(_Reader* r, Head h) except -1:
    cdef int fid = 0, wire
    h.client_appkey = h.trace_id = h.span_id = None
    while True:
        wire = _r_field(r, &fid)
        if wire == T_STOP:
            break
        if fid == 1 and wire == T_STRING:
            h.client_appkey = _r_string(r, T_STRING)
        elif fid == 2 and wire == T_STRING:
            h.trace_id = _r_string(r, T_STRING)
        elif fid == 3 and wire == T_STRING:
            h.span_id = _r_string(r, T_STRING)
        else:
            _skip(r, wire, 2)    # the rest of TraceInfo: in full() when wanted
    if h.client_appkey is None:
        _missing("TraceInfo.clientAppkey", r)
    return 0


cdef Head _r_head(_Reader* r, Limits limits):
    cdef Head h = Head.__new__(Head)
    cdef int fid = 0, wire
    cdef bint request = False, response = False
    h._limits = limits
    if r.max_depth < 2:
        raise DecodeError(f"nesting deeper than {r.max_depth} at byte {r.pos}", offset=r.pos)
    while True:
        wire = _r_field(r, &fid)
        if wire == T_STOP:
            break
        if fid == 1 and wire == T_BYTE:
            h.message_type = <int>_r_fixed(r, wire)
        elif fid == 2 and wire == T_STRUCT:
            _r_request_info(r, h)
            request = True
        elif fid == 3 and wire == T_STRUCT:
            _r_response_info(r, h)
            response = True
        elif fid == 4 and wire == T_STRUCT:
            _r_trace_info(r, h)
        elif fid == 5 and wire == T_MAP:
            h.global_context = _r_map(r, _TEXT_MAP, 2)
        elif fid == 6 and wire == T_MAP:
            h.local_context = _r_map(r, _TEXT_MAP, 2)
        else:
            _skip(r, wire, 1)    # heartbeatInfo (read by full()) and unknown fields
    if request == response:
        if request:
            raise DecodeError("header has both requestInfo and responseInfo")
        raise DecodeError("header has neither requestInfo nor responseInfo")
    h.is_request = request
    return h


cdef tuple _head_and_body(const unsigned char* p, Py_ssize_t n, int flags,
                          Py_ssize_t header_length, Limits limits):
    """``(head, body)`` of the decompressed unified payload ``p[:n]``."""
    if flags & 0x03 != 1:
        raise ProtocolError(f"unsupported serializer {flags & 0x03} (only 1, thrift binary, is accepted)")
    if header_length > n:
        raise ProtocolError(f"header_length {header_length} exceeds the {n}-byte payload")
    cdef _Reader r
    cdef Head head
    _r_init(&r, p, 0, header_length, limits, True)   # the header's text is UTF-8 (§2)
    try:
        head = _r_head(&r, limits)
        if r.pos != header_length:
            raise DecodeError(f"{header_length - r.pos} bytes after the header's end", offset=r.pos)
    except DecodeError as exc:
        raise ProtocolError(f"bad unified header: {exc}") from None
    head.raw = PyBytes_FromStringAndSize(<const char*>p, header_length)
    return head, PyBytes_FromStringAndSize(<const char*>p + header_length, n - header_length)


def read_head(int flags, Py_ssize_t header_length, payload, Limits limits=None):
    """``(head, body)`` of a decompressed unified payload: the ``Head`` read in
    C, and the body bytes after it (§1–§2 checks included)."""
    cdef _View v
    _view_open(&v, payload)
    try:
        return _head_and_body(v.buf, v.len, flags, header_length,
                              DEFAULT_LIMITS if limits is None else limits)
    finally:
        _view_close(&v)
