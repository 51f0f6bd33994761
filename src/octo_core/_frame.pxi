# Included by _codec.pyx: OCTO unified frames (PROTOCOL.md §1) and native framed
# thrift (§4), the byte-level part only. Header structs and compression live in
# protocol.py; this file builds frames and cuts a byte stream into frames.

DEF MAGIC_0 = 0xAB
DEF MAGIC_1 = 0xBA
DEF PREFIX = 10            # magic 2, version 1, protocol 1, total_length 4, header_length 2
DEF FLAG_CHECKSUM = 0x80
DEF ADLER_MOD = 65521
DEF ADLER_NMAX = 5552      # most bytes before the 32-bit sums must be reduced


cdef uint32_t _adler32(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Adler-32 as zlib.adler32 computes it (RFC 1950)."""
    cdef uint32_t a = 1, b = 0
    cdef Py_ssize_t chunk
    while n > 0:
        chunk = n if n < ADLER_NMAX else ADLER_NMAX
        n -= chunk
        while chunk:
            a += p[0]
            b += a
            p += 1
            chunk -= 1
        a %= ADLER_MOD
        b %= ADLER_MOD
    return (b << 16) | a


def adler32(data) -> int:
    """Adler-32 of ``data`` (equal to ``zlib.adler32(data)``)."""
    cdef _View v
    _view_open(&v, data)
    try:
        return _adler32(v.buf, v.len)
    finally:
        _view_close(&v)


def encode_frame(int flags, Py_ssize_t header_length, payload, tail=b""):
    """One unified frame around ``payload + tail``; ``header_length`` as §1 defines it.

    With ``flags & 0x80`` the Adler-32 trailer is appended. ``payload`` and ``tail``
    are written once each (no intermediate concatenation).
    """
    cdef _View a, b
    _view_open(&a, payload)
    try:
        _view_open(&b, tail)
        try:
            return _frame_parts(flags, header_length, &a, &b)
        finally:
            _view_close(&b)
    finally:
        _view_close(&a)


cdef bytes _frame_parts(int flags, Py_ssize_t header_length, _View* a, _View* b):
    cdef Py_ssize_t n = a.len + b.len
    cdef Py_ssize_t trailer = 4 if flags & FLAG_CHECKSUM else 0
    if not 0 <= header_length <= 32767:
        raise EncodeError(f"header of {header_length} bytes cannot be framed (max 32767)")
    if not 0 <= flags <= 255:
        raise EncodeError(f"protocol flags {flags} do not fit a byte")
    if 2 + n + trailer > 2147483647:
        raise EncodeError(f"frame payload of {n} bytes is too large")
    out = PyBytes_FromStringAndSize(NULL, PREFIX + n + trailer)
    cdef char* p = PyBytes_AS_STRING(out)
    p[0] = <char>MAGIC_0
    p[1] = <char>MAGIC_1
    p[2] = 0
    p[3] = <char>flags
    _put_u32(p + 4, <uint32_t>(2 + n + trailer))
    _put_u16(p + 8, <uint16_t>header_length)
    memcpy(p + PREFIX, a.buf, a.len)
    memcpy(p + PREFIX + a.len, b.buf, b.len)
    if trailer:
        _put_u32(p + PREFIX + n, _adler32(<const unsigned char*>p, PREFIX + n))
    return out


def encode_framed(body) -> bytes:
    """Native TFramedTransport framing: an i32 length, then ``body``."""
    cdef _View a
    cdef char* p
    _view_open(&a, body)
    try:
        if a.len > 2147483647:
            raise EncodeError(f"frame of {a.len} bytes is too large")
        out = PyBytes_FromStringAndSize(NULL, 4 + a.len)
        p = PyBytes_AS_STRING(out)
        _put_u32(p, <uint32_t>a.len)
        memcpy(p + 4, a.buf, a.len)
        return out
    finally:
        _view_close(&a)


def encode_framed_message(name, msg_type, seqid, obj, *, int max_depth=64) -> bytes:
    """``encode_framed(encode_message(..., check_required=True, max_depth=...))`` in one pass."""
    cdef _StructSpec s = _encode_spec(obj)
    cdef _Writer w
    _w_init(&w, s.size_hint + 64, True, max_depth)
    try:
        w.len = 4
        _w_message_begin(&w, name, msg_type, seqid)
        _w_top(&w, s, obj)
    except BaseException:
        _w_abandon(&w)
        raise
    _put_u32(w.data, <uint32_t>(w.len - 4))
    return _w_finish(&w)


cdef object _finish_unified(_Writer* w, int flags, Py_ssize_t header_length):
    """Fill in the prefix of the frame in ``w`` (written from byte 10 on), add the
    checksum if ``flags`` asks for one, and hand over the bytes."""
    if header_length > 32767:
        _w_abandon(w)
        raise EncodeError(f"header of {header_length} bytes cannot be framed (max 32767)")
    if w.len + 4 > 2147483647:
        _w_abandon(w)
        raise EncodeError(f"frame of {w.len} bytes is too large")
    cdef Py_ssize_t trailer = 4 if flags & FLAG_CHECKSUM else 0
    if trailer:
        try:
            _w_reserve(w, 4)
        except BaseException:
            _w_abandon(w)
            raise
    w.data[0] = <char>MAGIC_0
    w.data[1] = <char>MAGIC_1
    w.data[2] = 0
    w.data[3] = <char>flags
    _put_u32(w.data + 4, <uint32_t>(w.len - 8 + trailer))
    _put_u16(w.data + 8, <uint16_t>header_length)
    if trailer:
        _put_u32(w.data + w.len, _adler32(<const unsigned char*>w.data, w.len))
        w.len += 4
    return _w_finish(w)


cdef int _check_plain_flags(int flags) except -1:
    if flags & 0x60 or not 0 <= flags <= 255:
        raise EncodeError(f"a one-pass frame cannot apply protocol flags 0x{flags:02x}")
    return 0


def encode_unified_message(int flags, header, name, msg_type, seqid, obj) -> bytes:
    """A whole uncompressed unified frame: ``header`` then the message, in one pass.

    Equal to ``encode_frame(flags, len(h), h, encode_message(...,
    check_required=True))`` with ``h = encode(header)``; compression flags are
    the caller's business.
    """
    _check_plain_flags(flags)
    cdef _StructSpec hs = _encode_spec(header)
    cdef _StructSpec s = _encode_spec(obj)
    cdef _Writer w
    _w_init(&w, hs.size_hint + s.size_hint + 96, True)
    try:
        w.len = PREFIX
        _w_top(&w, hs, header)
        header_length = w.len - PREFIX
        _w_message_begin(&w, name, msg_type, seqid)
        _w_top(&w, s, obj)
    except BaseException:
        _w_abandon(&w)
        raise
    return _finish_unified(&w, flags, header_length)


#: ``Frame.flags`` of an unframed (buffered-transport) thrift message: the reply
#: goes back unframed too.
UNFRAMED = -1


cdef str _looks_like(const unsigned char* p, Py_ssize_t n):
    """What a stream (or a message) that is neither framing (nor binary thrift)
    seems to be, for the error: the usual mistakes are a client on the wrong
    transport or protocol, TLS, or HTTP."""
    if n >= 2 and p[0] == 0x82 and (p[1] & 0x1F) == 1:
        return " (it looks like thrift's compact protocol: only the binary protocol is served)"
    if n >= 2 and p[0] == 0x0F and p[1] == 0xFF:
        return (" (it looks like thrift's THeader protocol: binary thrift, framed or not, "
                "and the OCTO unified protocol are served)")
    if n >= 3 and p[0] == 0x16 and p[1] == 0x03:
        return " (it looks like a TLS handshake: this connection is not TLS)"
    if n >= 4 and p[:4] in (b"GET ", b"POST", b"PUT ", b"HEAD", b"PRI "):
        return " (it looks like HTTP)"
    if n >= 2 and p[0] == 0x5B and 0x31 <= p[1] <= 0x39:   # [1,"name",...
        return " (it looks like thrift's JSON protocol: only the binary protocol is served)"
    if n >= 2 and p[0] == 0x78 and p[1] in (0x01, 0x5E, 0x9C, 0xDA):
        return " (it looks like zlib (TZlibTransport): compressed transports are not served)"
    return ""


cdef inline bint _old_style_unframed(const unsigned char* p, Py_ssize_t n,
                                     Py_ssize_t max_frame_size) noexcept:
    """Whether ``p`` starts an unframed message with the old (non-strict) header:
    the method name's length, then the name. Framed thrift cannot start so: its
    message, after the length, begins with 0x80 (strict) or 0x00 (old style).
    A name is never empty (with a length of 0 the fifth byte is no name's), and
    one longer than a frame may be is read as the framed length it also is (too
    large either way): so four bytes decide but for the name's first two
    characters (a frame of zlib starts with "x" and a byte no name has).
    ``_old_style_decided`` says how many bytes that takes."""
    if n < 5 or p[0] != 0 or not 0 < _get_u32(p) < max_frame_size - 4:
        return False
    cdef unsigned char first = p[4]     # of the name: a thrift identifier's first character
    if not (first == 0x5F or 0x41 <= first <= 0x5A or 0x61 <= first <= 0x7A):
        return False
    return _get_u32(p) == 1 or (n >= 6 and _in_a_name(p[5]))


cdef inline bint _in_a_name(unsigned char c) noexcept:
    """Whether ``c`` may follow a method name's first character: a thrift
    identifier's (letters, digits, "_", "."), or a multiplexed service name's
    ("Service:method"; names such as "com.example-calc")."""
    return (0x61 <= c <= 0x7A or 0x41 <= c <= 0x5A or 0x30 <= c <= 0x39
            or c == 0x5F or c == 0x2E or c == 0x3A or c == 0x2D)


cdef inline Py_ssize_t _old_style_decided(uint32_t name_length) noexcept:
    """The bytes ``_old_style_unframed`` needs to tell an old-style message
    whose name is ``name_length`` long from a frame: the length and up to two
    characters."""
    return 5 if name_length == 1 else 6


cdef Py_ssize_t _declared_inflated(const unsigned char* p, Py_ssize_t n, int flags) noexcept:
    """The size compressed payload ``p[:n]`` says it inflates to: snappy's length
    preamble, gzip's ISIZE trailer; PY_SSIZE_T_MAX if it has none to read. A lie
    costs no memory: inflating checks both (zlib the ISIZE, ``decompress`` the
    preamble) and breaks the stream."""
    cdef Py_ssize_t size = 0
    cdef int i
    if flags & 0x20:          # snappy wins (§1)
        for i in range(5 if n > 5 else n):
            size |= <Py_ssize_t>(p[i] & 0x7F) << (7 * i)
            if not p[i] & 0x80:
                return size
        return PY_SSIZE_T_MAX
    if n < 18:                # shorter than any gzip member
        return PY_SSIZE_T_MAX
    return p[n - 4] | (p[n - 3] << 8) | (p[n - 2] << 16) | (<Py_ssize_t>p[n - 1] << 24)


@cython.final
cdef class InflateBudget:
    """What the frame readers sharing it (a server's connections) may inflate in
    one pass of their event loop, ``per_pass`` bytes.

    Each reader's own batch (``max_batch``) bounds one connection's read; this
    bounds them all together: many peers, each sending one compressed frame
    that inflates a lot, would otherwise be inflated one after the other in the
    same pass, with every other connection waiting. Once the pass has
    inflated ``per_pass``, a compressed frame waits, still compressed (its
    reader sets ``more``), for a pass with room; the first compressed frame of
    a pass is inflated whatever its size, so every pass makes progress. The
    budget is whole again at the start of the next pass (``call_soon``, the
    loop's, runs the refill). A frame whose inflating fails is charged
    ``max_frame_size``: it may have inflated that much before it was found out.
    """
    cdef readonly Py_ssize_t per_pass
    cdef readonly Py_ssize_t used        # inflated in this pass
    cdef object _call_soon

    def __init__(self, Py_ssize_t per_pass, call_soon):
        if per_pass < 1:
            raise ValueError("per_pass must be at least 1 byte")
        self.per_pass = per_pass
        self._call_soon = call_soon

    cdef inline bint admits(self, Py_ssize_t size) noexcept:
        return self.used == 0 or size <= self.per_pass - self.used

    cdef int charge(self, Py_ssize_t size) except -1:
        if self.used == 0:
            self._call_soon(self._refill)
        if size < 1:
            size = 1
        # (PY_SSIZE_T_MAX for a frame that declares nothing: no overflow past it)
        self.used = PY_SSIZE_T_MAX if size > PY_SSIZE_T_MAX - self.used else self.used + size

    def _refill(self):
        self.used = 0


cdef class FrameReader:
    """Cuts a byte stream into frames, sans-IO: ``feed(data)`` returns the complete ones.

    Each frame is a tuple ``(flags, header_length, payload)``: for a unified frame
    ``flags`` is its protocol byte and ``payload`` the (possibly compressed)
    header+body with the checksum already verified and removed; for native framed
    thrift ``flags`` is ``None`` and ``payload`` the thrift message. Any violation
    (bad length, over ``max_frame_size``, bad checksum) raises ``ProtocolError``
    and the reader must not be used again: the stream has lost its framing.
    Frames completed before the violation are not lost: that ``feed`` returns
    them and keeps the error in ``error``, for the caller to act on once they
    are handled (the next ``feed`` raises it).

    With ``max_batch``, one ``feed`` hands out frames totalling about that many
    bytes (at least one frame; after the first, a compressed one only if what it
    says it inflates to still fits) and keeps the rest of the stream, compressed
    as it came, with ``more`` set; ``feed(b"")`` goes on. A read full of small
    compressed frames so never inflates into more memory than its reader is
    ready for, nor does a batch whose reader stops partway (flow control) hold
    more than that inflated. Without it, every whole frame comes out at once.
    A ``budget`` (an ``InflateBudget``, shared) may hold back compressed frames
    too, ``more`` set the same way.

    With ``frame_cls`` the frames come out finished instead, as
    ``frame_cls(flags, head, body)`` tuples: a unified payload is decompressed
    by ``decompress(flags, payload, max_frame_size)`` when its flags say so and
    its header read into a ``Head`` (``limits`` bound it); native framed thrift
    gives ``(0, None, message)``. A bad header then breaks the stream too.
    """
    cdef bytearray _buf
    cdef readonly Py_ssize_t max_frame_size
    cdef readonly Py_ssize_t consumed    # bytes taken from the stream so far
    cdef readonly Py_ssize_t max_batch
    cdef readonly bint more              # the last feed stopped at max_batch
    cdef readonly object error           # the ProtocolError that broke the stream
    cdef public InflateBudget budget     # shared with other readers, or None
    cdef bint _broken
    cdef object _frame_cls
    cdef object _decompress
    cdef Limits _limits
    cdef _Scan _scan         # of an unframed message not yet whole
    cdef bint _scanning

    # max_frame_size: protocol.DEFAULT_MAX_FRAME_SIZE (Apache Thrift's)
    def __init__(self, Py_ssize_t max_frame_size=16_384_000, frame_cls=None,
                 decompress=None, Limits limits=None, Py_ssize_t max_batch=PY_SSIZE_T_MAX):
        if max_frame_size < 16:
            raise ValueError("max_frame_size must be at least 16 bytes")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1 byte")
        self.max_frame_size = max_frame_size
        self.max_batch = max_batch
        self._buf = bytearray()
        self.consumed = 0
        self._frame_cls = frame_cls
        self._decompress = decompress
        self._limits = DEFAULT_LIMITS if limits is None else limits

    def __dealloc__(self):
        _scan_free(&self._scan)

    @property
    def buffered(self):
        """Bytes received that do not yet make a whole frame."""
        return len(self._buf)

    def feed(self, data):
        """Add ``data`` and return the list of frames it completed (maybe empty)."""
        if self._broken:
            raise ProtocolError(f"the stream already failed ({self.error}); open a new connection")
        cdef list frames = []
        cdef _View v
        cdef Py_ssize_t used
        self.more = False
        try:
            if not self._buf:
                # Common case: parse straight from ``data`` and keep only the tail.
                _view_open(&v, data)
                try:
                    used = self._parse(v.buf, v.len, frames)
                    if used < v.len:
                        self._buf += (<const char*>v.buf)[used:v.len]
                finally:
                    _view_close(&v)
                return frames
            self._buf += data
            _view_open(&v, self._buf)
            try:
                used = self._parse(v.buf, v.len, frames)
            finally:
                _view_close(&v)   # release the export before resizing the bytearray
            del self._buf[:used]
            return frames
        except ProtocolError as exc:
            self._broken = True
            self.error = exc
            del self._buf[:]
            if frames:
                return frames    # theirs to handle; the error comes with the next feed
            raise

    cdef Py_ssize_t _parse(self, const unsigned char* p, Py_ssize_t n, list frames) except -1:
        cdef Py_ssize_t pos = 0, total = 0, header_length, trailer, handed = 0, declared = 0
        cdef int flags
        cdef bint inflating
        cdef InflateBudget budget = self.budget
        cdef uint32_t want
        while n - pos >= 4:
            if handed >= self.max_batch:
                self.more = True
                break
            if p[pos] == MAGIC_0 and p[pos + 1] == MAGIC_1:
                if n - pos < 8:   # judged by its total_length, not left waiting for a 10th byte
                    break
                flags = p[pos + 3]
                total = <int32_t>_get_u32(p + pos + 4)
                trailer = 4 if flags & FLAG_CHECKSUM else 0
                if total < 2 + trailer:
                    self._fail(f"unified frame total_length {total} is too small", pos)
                if total + 8 > self.max_frame_size:
                    self._fail(f"unified frame of {total + 8} bytes exceeds max_frame_size "
                               f"{self.max_frame_size}", pos)
                if n - pos < total + 8:
                    break
                inflating = flags & 0x60 and self._frame_cls is not None
                if inflating:
                    declared = _declared_inflated(p + pos + PREFIX, total - 2 - trailer, flags)
                    if (frames and self.max_batch != PY_SSIZE_T_MAX
                            and declared > self.max_batch - handed) or (
                                budget is not None and not budget.admits(declared)):
                        # Inflated as the next batch's first frame instead (in a pass with
                        # room): the rest of a batch that flow control stops partway waits
                        # as it came, compressed.
                        self.more = True
                        break
                header_length = <int16_t>((p[pos + 8] << 8) | p[pos + 9])
                if header_length < 0:
                    self._fail(f"negative header_length {header_length}", pos)
                if trailer:
                    want = _get_u32(p + pos + total + 4)
                    if _adler32(p + pos, total + 4) != want:
                        self._fail("checksum mismatch", pos)
                if self._frame_cls is None:
                    payload = PyBytes_FromStringAndSize(<const char*>p + pos + PREFIX,
                                                        total - 2 - trailer)
                    frames.append((flags, header_length, payload))
                    handed += total
                elif inflating and budget is not None:
                    budget.charge(declared)
                    try:
                        handed += self._unified(p + pos + PREFIX, total - 2 - trailer, flags,
                                                header_length, frames)
                    except BaseException:
                        budget.charge(self.max_frame_size)
                        raise
                else:
                    handed += self._unified(p + pos + PREFIX, total - 2 - trailer, flags,
                                            header_length, frames)
                pos += total + 8
            elif (p[pos] == 0x80 and p[pos + 1] == 0x01) or _old_style_unframed(p + pos, n - pos,
                                                                            self.max_frame_size):
                # Unframed (buffered-transport) binary thrift, thriftpy2's and Apache's
                # default: no length prefix, the message says where it ends.
                if not self._scanning:
                    _scan_start(&self._scan, self.max_frame_size)
                    self._scanning = True
                try:
                    total = _scan_unframed(&self._scan, p + pos, n - pos)
                except DecodeError as exc:
                    self._fail(f"bad unframed thrift message: {exc}", pos)
                if total < 0:
                    break
                self._scanning = False
                body = PyBytes_FromStringAndSize(<const char*>p + pos, total)
                if self._frame_cls is None:
                    frames.append((UNFRAMED, 0, body))
                else:
                    frames.append(tuple.__new__(self._frame_cls, (UNFRAMED, None, body)))
                handed += total
                pos += total
            else:
                total = <int32_t>_get_u32(p + pos)
                if (p[pos] == 0 and 0 < total <= self.max_frame_size
                        and n - pos < _old_style_decided(total)):
                    break   # framed, or an old-style unframed name: its first characters tell
                if total <= 0:
                    self._fail(f"framed thrift length {total} is not positive"
                               f"{_looks_like(p + pos, n - pos)}", pos)
                if total > self.max_frame_size:   # the length itself, as TFramedTransport's peers
                    self._fail(f"framed thrift length {total} exceeds "
                               f"max_frame_size {self.max_frame_size}"
                               f"{_looks_like(p + pos, n - pos)}", pos)
                if n - pos < total + 4:
                    break
                body = PyBytes_FromStringAndSize(<const char*>p + pos + 4, total)
                if self._frame_cls is None:
                    frames.append((None, 0, body))
                else:
                    frames.append(tuple.__new__(self._frame_cls, (0, None, body)))
                handed += total
                pos += total + 4
        self.consumed += pos
        return pos

    cdef Py_ssize_t _unified(self, const unsigned char* p, Py_ssize_t n, int flags,
                             Py_ssize_t header_length, list frames) except -1:
        """Append the finished unified frame of payload ``p[:n]``; returns its size
        as read (inflated)."""
        cdef _View v
        v.held = False
        if flags & 0x60:
            inflated = self._decompress(
                flags, PyBytes_FromStringAndSize(<const char*>p, n), self.max_frame_size)
            _view_open(&v, inflated)
            p, n = v.buf, v.len
        try:
            head, body = _head_and_body(p, n, flags, header_length, self._limits)
        finally:
            _view_close(&v)
        frames.append(tuple.__new__(self._frame_cls, (flags, head, body)))
        return n

    cdef int _fail(self, str why, Py_ssize_t pos) except -1:
        raise ProtocolError(f"{why} (stream byte {self.consumed + pos})")
