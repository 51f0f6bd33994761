# Included by _codec.pyx: where an unframed (buffered-transport) thrift message ends.
# Such a message has no length prefix; only its structure says where it stops. The
# scan below walks that structure once and keeps its place when the bytes run out,
# so the next read goes on from there (re-reading at most one field or container
# header): a message trickled in byte by byte costs time linear in its size.

DEF SCAN_STRUCT = 0
DEF SCAN_LIST = 1          # lists and sets
DEF SCAN_MAP = 2


cdef struct _ScanLevel:
    int kind               # SCAN_STRUCT, SCAN_LIST or SCAN_MAP
    int key_type           # a list's element type; a map's key type
    int value_type         # a map's value type
    Py_ssize_t left        # values still to come: a list's elements, a map's keys and values


cdef struct _Scan:
    _ScanLevel* levels     # the open structs and containers
    int capacity           # levels allocated (grown on demand, up to MAX_DEPTH_CAP)
    int depth              # levels open; 0 before the message header and after the end
    bint begun             # the message header has been read
    int pending            # the type of a value whose own header is still to read, or -1
    Py_ssize_t pos         # bytes of the message accounted for
    Py_ssize_t skip        # bytes still to pass: a string, the name, a run of fixed-size values
    Py_ssize_t limit       # the most bytes the message may take (max_frame_size)


# Only where the message ends is found here, so only what bounds the scan itself is
# checked: the size (a length that claims more than the limit is refused at once)
# and nesting up to MAX_DEPTH_CAP. The message is decoded later under the server's
# own Limits, which may be higher or lower than the defaults.

cdef void _scan_start(_Scan* s, Py_ssize_t limit) noexcept:
    """Make ``s`` ready for a new message (its level stack is kept between messages)."""
    s.depth = 0
    s.begun = False
    s.pending = -1
    s.pos = 0
    s.skip = 0
    s.limit = limit


cdef void _scan_free(_Scan* s) noexcept:
    PyMem_Free(s.levels)
    s.levels = NULL
    s.capacity = 0


cdef int _scan_over(_Scan* s) except -1:
    raise DecodeError(f"message over {s.limit} bytes")


cdef Py_ssize_t _scan_length(_Scan* s, const unsigned char* p, Py_ssize_t unit,
                             str what) except -1:
    """An i32 count at ``s.pos`` of values of at least ``unit`` bytes, checked
    against the message's limit."""
    cdef Py_ssize_t n = <int32_t>_get_u32(p + s.pos)
    if n < 0:
        raise DecodeError(f"negative {what} length {n} at byte {s.pos}")
    if s.pos + n * unit > s.limit:
        _scan_over(s)
    return n


cdef int _scan_push(_Scan* s, int kind, int key_type, int value_type,
                    Py_ssize_t left) except -1:
    cdef int capacity
    cdef _ScanLevel* grown
    if s.depth == s.capacity:
        capacity = min(MAX_DEPTH_CAP, max(16, 2 * s.capacity))
        grown = <_ScanLevel*>PyMem_Realloc(s.levels, capacity * sizeof(_ScanLevel))
        if grown == NULL:
            raise MemoryError()
        s.levels, s.capacity = grown, capacity
    s.levels[s.depth] = _ScanLevel(kind, key_type, value_type, left)
    s.depth += 1
    return 0


cdef bint _scan_value(_Scan* s, const unsigned char* p, Py_ssize_t n) except -1:
    """Start the pending value: False when its header is not all there yet."""
    cdef int wire = s.pending, element, key_type, value_type
    cdef Py_ssize_t count, size = _min_wire_size(wire)
    if size < 0:
        raise DecodeError(f"invalid field type {wire} near byte {s.pos}")
    if T_STRUCT <= wire <= T_LIST and s.depth >= MAX_DEPTH_CAP:   # as _skip: only these nest
        raise DecodeError(f"nesting deeper than {MAX_DEPTH_CAP} at byte {s.pos}")
    if wire == T_STRING:
        if n - s.pos < 4:
            return False
        s.skip = _scan_length(s, p, 1, "string")
        s.pos += 4
    elif wire == T_STRUCT:
        _scan_push(s, SCAN_STRUCT, 0, 0, 0)
    elif wire == T_LIST or wire == T_SET:
        if n - s.pos < 5:
            return False
        element = p[s.pos]
        s.pos += 1
        count = _scan_length(s, p, _unit(element), "list")
        s.pos += 4
        if count and _fixed_size(element):
            s.skip = count * _fixed_size(element)   # a run of fixed-size values
        else:
            _scan_push(s, SCAN_LIST, element, 0, count)
    elif wire == T_MAP:
        if n - s.pos < 6:
            return False
        key_type, value_type = p[s.pos], p[s.pos + 1]
        s.pos += 2
        count = _scan_length(s, p, _unit(key_type) + _unit(value_type), "map")
        s.pos += 4
        _scan_push(s, SCAN_MAP, key_type, value_type, 2 * count)
    else:
        s.skip = size            # bool, byte, i16, i32, i64, double, uuid
    s.pending = -1
    return True


cdef Py_ssize_t _scan_unframed(_Scan* s, const unsigned char* p, Py_ssize_t n) except -2:
    """Go on with the message at ``p``, of which ``p[:n]`` has arrived: its length
    once it is whole, -1 while it is not. ``DecodeError`` when it cannot be a
    message within the size limit."""
    cdef Py_ssize_t take
    cdef uint32_t version
    cdef int wire
    cdef _ScanLevel* level
    while True:
        if s.pos + s.skip > s.limit:
            _scan_over(s)
        if s.skip:
            take = min(s.skip, n - s.pos)
            s.pos += take
            s.skip -= take
            if s.skip:
                return -1
        if s.pending >= 0:
            if not _scan_value(s, p, n):
                return -1
        elif not s.begun:
            if n < 8:
                return -1
            version = _get_u32(p)
            if not version & 0x80000000:
                # the old header: name length, name, type, seqid (strict_write=False)
                s.skip = _scan_length(s, p, 1, "method name") + 5
                s.pos = 4
            else:
                if (version & VERSION_MASK) != VERSION_1:
                    raise DecodeError(f"bad message version 0x{version:08x}")
                if not 1 <= (version & 0xff) <= 4:
                    raise DecodeError(f"unknown message type {version & 0xff}")
                s.pos = 4
                s.skip = _scan_length(s, p, 1, "method name") + 4   # name, seqid
                s.pos = 8
            s.begun = True
            _scan_push(s, SCAN_STRUCT, 0, 0, 0)
        elif s.depth == 0:
            return s.pos             # the arguments' struct is closed
        else:
            level = &s.levels[s.depth - 1]
            if level.kind == SCAN_STRUCT:
                if s.pos >= n:
                    return -1
                wire = p[s.pos]
                if wire == T_STOP:
                    s.pos += 1
                    s.depth -= 1
                elif n - s.pos < 3:
                    return -1
                else:
                    s.pos += 3       # type and field id
                    s.pending = wire
            elif level.left == 0:
                s.depth -= 1
            else:
                level.left -= 1      # a map's keys come at odd counts left, its values at even
                s.pending = (level.key_type if level.kind == SCAN_LIST or level.left % 2
                             else level.value_type)
