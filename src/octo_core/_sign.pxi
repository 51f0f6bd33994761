# Included by _codec.pyx: request signing (shared/PROTOCOL.md §6) on the C hot path.
# The signed string is  clientAppkey \n serverAppkey \n serviceName \n method \n ts \n nonce
# [\n hex(sha256(body))], hashed piecewise (never joined in Python).

cdef extern from "_sha256.h":
    ctypedef struct octo_sha256:
        pass
    ctypedef struct octo_hmac_key:
        pass
    void octo_sha256_init(octo_sha256* s) noexcept nogil
    void octo_sha256_update(octo_sha256* s, const unsigned char* p, size_t n) noexcept nogil
    void octo_sha256_final(octo_sha256* s, unsigned char* out) noexcept nogil
    void octo_hmac_key_init(octo_hmac_key* k, const unsigned char* key, size_t n) noexcept nogil
    void octo_hmac_parts(const octo_hmac_key* k, const unsigned char* const* parts,
                         const size_t* lengths, int count, int sep, unsigned char* out) noexcept nogil
    int octo_sha256_setup() noexcept nogil

#: True when SHA-256 runs on the CPU's SHA instructions (x86 SHA-NI), else portable C.
SHA256_HARDWARE = bool(octo_sha256_setup())

DEF SIGNED_PARTS = 7
cdef const char* _HEX = b"0123456789abcdef"


cdef str _hex(const unsigned char* digest, int n):
    cdef char out[64]
    cdef int i
    for i in range(n):
        out[2 * i] = _HEX[digest[i] >> 4]
        out[2 * i + 1] = _HEX[digest[i] & 15]
    return out[:2 * n].decode("ascii")


cdef const unsigned char* _utf8(object text, size_t* n) except NULL:
    cdef Py_ssize_t size
    cdef const char* p = PyUnicode_AsUTF8AndSize(text, &size)
    n[0] = size
    return <const unsigned char*>p


def sha256_hex(data) -> str:
    """Lowercase hex SHA-256 of ``data`` (bytes-like)."""
    cdef _View v
    cdef octo_sha256 s
    cdef unsigned char digest[32]
    _view_open(&v, data)
    try:
        octo_sha256_init(&s)
        octo_sha256_update(&s, v.buf, v.len)
        octo_sha256_final(&s, digest)
    finally:
        _view_close(&v)
    return _hex(digest, 32)


cdef class SigningKey:
    """An HMAC-SHA256 key with its pad blocks pre-hashed, for signing requests.

    ``sign(...)`` returns the lowercase hex signature of PROTOCOL.md §6;
    ``verify(signature, ...)`` compares in constant time.
    """
    cdef octo_hmac_key _key

    def __init__(self, key):
        if isinstance(key, str):
            key = key.encode()
        cdef _View v
        _view_open(&v, key)
        try:
            octo_hmac_key_init(&self._key, v.buf, v.len)
        finally:
            _view_close(&v)

    def digest(self, data) -> bytes:
        """HMAC-SHA256 of ``data`` (bytes-like) under this key, raw 32 bytes."""
        cdef _View v
        cdef const unsigned char* parts[1]
        cdef size_t lengths[1]
        cdef unsigned char out[32]
        _view_open(&v, data)
        try:
            parts[0] = v.buf
            lengths[0] = v.len
            octo_hmac_parts(&self._key, parts, lengths, 1, -1, out)
        finally:
            _view_close(&v)
        return out[:32]

    cdef void _sign(self, tuple fields, unsigned char* out) except *:
        cdef const unsigned char* parts[SIGNED_PARTS]
        cdef size_t lengths[SIGNED_PARTS]
        cdef int i, count = len(fields)
        for i in range(count):
            parts[i] = _utf8(fields[i], &lengths[i])
        octo_hmac_parts(&self._key, parts, lengths, count, 10, out)   # 10: "\n"

    def sign(self, str client_appkey, str server_appkey, str service, str method, str ts,
             str nonce, str body_sha256=None) -> str:
        """The hex signature over the §6 fields (``body_sha256`` when body signing is on)."""
        cdef unsigned char out[32]
        fields = (client_appkey, server_appkey, service, method, ts, nonce)
        if body_sha256 is not None:
            fields += (body_sha256,)
        self._sign(fields, out)
        return _hex(out, 32)

    def verify(self, str signature, str client_appkey, str server_appkey, str service,
               str method, str ts, str nonce, str body_sha256=None) -> bool:
        """Is ``signature`` right for these fields? Constant-time in the signature's bytes."""
        cdef unsigned char out[32]
        cdef size_t n
        cdef const unsigned char* given = _utf8(signature, &n)
        cdef str expected
        cdef const unsigned char* want
        cdef unsigned char diff = 0
        cdef int i
        fields = (client_appkey, server_appkey, service, method, ts, nonce)
        if body_sha256 is not None:
            fields += (body_sha256,)
        self._sign(fields, out)
        expected = _hex(out, 32)
        want = <const unsigned char*>PyUnicode_AsUTF8AndSize(expected, NULL)
        if n != 64:
            return False      # the length is public; only the content is secret
        for i in range(64):
            diff |= given[i] ^ want[i]
        return diff == 0
