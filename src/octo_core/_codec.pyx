# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, infer_types=False
"""C hot paths: the thrift binary (strict TBinaryProtocol) codec.

Each thriftpy2 struct class is compiled once into a ``_StructSpec`` (a C array
of field descriptors) kept on the class; encoding and decoding then walk those
arrays, never the Python ``thrift_spec`` tuples.

Encoding writes into one growing ``bytes`` object that is shrunk to size at the
end (no final copy). Decoding checks every length against the bytes that are
left and against the caller's ``Limits`` before it allocates anything, and
builds objects without calling the generated ``__init__``.
"""
cimport cython
from cpython.object cimport PyObject, PyTypeObject
from cpython.type cimport PyType_Check
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_FromDouble
from cpython.long cimport PyLong_FromLong, PyLong_FromLongLong
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.ref cimport Py_INCREF, Py_DECREF, Py_XDECREF
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdint cimport INT64_MAX, INT64_MIN
from libc.string cimport memcpy

from copy import deepcopy
from math import isfinite
from sys import intern, modules

from octo_core.errors import EncodeError, DecodeError, ProtocolError

cdef extern from "Python.h":
    int _PyBytes_Resize(PyObject** bytes, Py_ssize_t newsize) except -1
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL
    bint PyLong_CheckExact(object o)
    bint PyLong_Check(object o)
    bint PyFloat_Check(object o)
    bint PyUnicode_Check(object o)
    bint PyBytes_Check(object o)
    bint PyList_CheckExact(object o)
    bint PyTuple_CheckExact(object o)
    bint PyDict_CheckExact(object o)
    bint PyAnySet_Check(object o)
    long long PyLong_AsLongLongAndOverflow(object o, int* overflow) except? -1
    double PyLong_AsDouble(object o) except? -1.0
    double PyFloat_AsDouble(object o) except? -1.0
    object PyNumber_Index(object o)
    bint PyNumber_Check(object o)
    PyObject* PyObject_GetAttr(object o, object name)
    PyObject* PyDict_GetItemWithError(object d, object key)   # borrowed; NULL: absent or error
    PyObject* _PyUnicode_DecodeUTF8 "PyUnicode_DecodeUTF8" (const char* s, Py_ssize_t size,
                                                          const char* errors)
    int _PyDict_SetItem "PyDict_SetItem" (object d, object k, object v)   # -1: error set
    int _PySet_Add "PySet_Add" (object s, object k)                       # -1: error set
    int PyObject_SetAttr(object o, object name, PyObject* value) except -1
    int PyObject_GenericSetAttr(object o, object name, PyObject* value) except -1
    PyObject* PyErr_Occurred()
    int PyErr_ExceptionMatches(object exc)
    void PyErr_Clear()
    Py_ssize_t PyList_GET_SIZE(object o)
    Py_ssize_t PyTuple_GET_SIZE(object o)
    PyObject* PyList_GET_ITEM(object o, Py_ssize_t i)
    PyObject* PyTuple_GET_ITEM(object o, Py_ssize_t i)
    object PyList_New(Py_ssize_t n)
    void PyList_SET_ITEM(object o, Py_ssize_t i, PyObject* v)
    int PyDict_Next(object d, Py_ssize_t* pos, PyObject** key, PyObject** value)
    Py_ssize_t PyDict_GET_SIZE(object d)
    int PyDict_SetItem(object d, PyObject* k, PyObject* v) except -1
    int PySet_Add(object s, PyObject* k) except -1
    object PyDict_New()
    object PySet_New(PyObject* iterable)
    PyTypeObject* Py_TYPE(object o)
    PyObject* Py_True
    PyObject* Py_False
    PyObject* Py_None
    int PyGC_Enable()
    int PyGC_Disable()

cdef extern from *:
    """
    static int _uses_generic_setattr(PyTypeObject* tp) {
        return tp->tp_setattro == PyObject_GenericSetAttr;
    }
    """
    bint _uses_generic_setattr(PyTypeObject* tp)

cdef extern from *:
    """
    /* A dict with room for n entries (CPython's private call, as Cython's own code uses). */
    #if CYTHON_COMPILING_IN_CPYTHON && !defined(Py_LIMITED_API)
    #define _octo_dict_presized(n) _PyDict_NewPresized(n)
    #else
    #define _octo_dict_presized(n) PyDict_New()
    #endif
    """
    dict _dict_presized "_octo_dict_presized" (Py_ssize_t n)

# --- wire types (TType) ---------------------------------------------------------
DEF T_STOP = 0
DEF T_BOOL = 2
DEF T_BYTE = 3
DEF T_DOUBLE = 4
DEF T_I16 = 6
DEF T_I32 = 8
DEF T_I64 = 10
DEF T_STRING = 11
DEF T_STRUCT = 12
DEF T_MAP = 13
DEF T_SET = 14
DEF T_LIST = 15
DEF T_UUID = 16            # Thrift 0.19+: 16 bytes; thriftpy2 IDLs have none, so only ever skipped
# thriftpy2's marker for `binary` fields; on the wire it is a STRING.
DEF T_BINARY = 18

DEF VERSION_1 = 0x80010000
DEF VERSION_MASK = 0xffff0000

DEF MAX_STACK_FIELDS = 16   # per nesting level on the C stack; wider structs use the heap
DEF MAX_DEPTH_CAP = 1000     # ~450 bytes of C stack a level (setup.py): fits 512 KiB stacks
DEF MAX_PRESIZE = 1 << 16   # entries a decoded dict is sized for before its first insert
# What keys sharing a hash may cost to put in one decoded map or set (see _floodable):
# comparisons, at most HASH_SHARING_PER_KEY per key it holds plus HASH_SHARING_SLACK.
DEF HASH_SHARING_PER_KEY = 16
DEF HASH_SHARING_SLACK = 1024

cdef dict _TYPE_NAMES = {
    T_BOOL: "bool", T_BYTE: "byte", T_DOUBLE: "double", T_I16: "i16", T_I32: "i32",
    T_I64: "i64", T_STRING: "string", T_STRUCT: "struct", T_MAP: "map",
    T_SET: "set", T_LIST: "list", T_BINARY: "binary", T_UUID: "uuid",
}


cdef inline int _wire(int kind) noexcept nogil:
    return T_STRING if kind == T_BINARY else kind


cdef inline Py_ssize_t _fixed_size(int wire) noexcept nogil:
    """Bytes of a value of a fixed-size wire type, 0 for the others."""
    if wire == T_BOOL or wire == T_BYTE:
        return 1
    if wire == T_I16:
        return 2
    if wire == T_I32:
        return 4
    if wire == T_I64 or wire == T_DOUBLE:
        return 8
    if wire == T_UUID:
        return 16
    return 0


cdef inline Py_ssize_t _min_wire_size(int wire) noexcept nogil:
    """Fewest bytes a value of this wire type can take (bounds container counts)."""
    if wire == T_STRUCT:
        return 1
    if wire == T_STRING:
        return 4
    if wire == T_LIST or wire == T_SET:
        return 5
    if wire == T_MAP:
        return 6
    return _fixed_size(wire) or -1  # -1: not a valid wire type


# --- limits ------------------------------------------------------------------------

cdef class Limits:
    """Bounds a decoder enforces before it allocates anything.

    ``max_string_length``: bytes in one string/binary value;
    ``max_container_length``: elements in one list/set/map;
    ``max_depth``: nesting of structs and containers;
    ``max_items``: objects one decode may make, all containers and structs
    together: a container element counts 1 (a map entry 2), a struct 1 plus its
    declared fields (each becomes an attribute). The wire bounds the rest, but
    one byte can be a whole struct (a lone STOP), so without this a 16 MiB
    frame could make millions of objects and gigabytes of memory; with the
    default a decode stops at about 150 MB (measured, with exceptions of one
    byte each, the dearest objects per byte).
    """
    cdef readonly Py_ssize_t max_string_length
    cdef readonly Py_ssize_t max_container_length
    cdef readonly int max_depth
    cdef readonly Py_ssize_t max_items

    def __init__(self, Py_ssize_t max_string_length=64 * 1024 * 1024,
                 Py_ssize_t max_container_length=16 * 1024 * 1024,
                 int max_depth=64, Py_ssize_t max_items=2 * 1024 * 1024):
        if max_string_length < 0 or max_container_length < 0 or max_items < 0:
            raise ValueError("limits must be non-negative")
        if not 1 <= max_depth <= MAX_DEPTH_CAP:
            # the decoder recurses in C: deeper nesting could overflow a thread's stack
            raise ValueError(f"max_depth must be between 1 and {MAX_DEPTH_CAP}")
        self.max_string_length = max_string_length
        self.max_container_length = max_container_length
        self.max_depth = max_depth
        self.max_items = max_items

    def __repr__(self):
        return (f"Limits(max_string_length={self.max_string_length}, "
                f"max_container_length={self.max_container_length}, "
                f"max_depth={self.max_depth}, max_items={self.max_items})")


cdef Limits DEFAULT_LIMITS = Limits()


# --- compiled type descriptions ----------------------------------------------------

cdef class _TypeSpec:
    """One thrift type: its kind and, for containers and structs, what is inside."""
    cdef int kind            # T_* with T_BINARY kept apart from T_STRING
    cdef int wire            # what goes on the wire
    cdef _TypeSpec key       # map keys
    cdef _TypeSpec elem      # list/set elements, map values
    cdef _StructSpec struct  # struct / exception
    cdef bint set_as_list    # set of unhashable elements: decoded as a list


cdef struct _Field:
    int fid
    int kind
    int wire
    bint required
    PyObject* name        # interned attribute name (owned by _StructSpec.names)
    PyObject* default     # default value or None (owned by _StructSpec.defaults)
    bint mutable_default  # a list/set/dict/struct default: decode gives each object a copy
    bint flat_default     # ... a list/set/dict of immutable values: a shallow copy is a copy
    Py_ssize_t default_items  # objects that copy makes, charged as decoding them would be
    PyObject* type        # _TypeSpec (owned by _StructSpec.types)


cdef class _StructSpec:
    """A thriftpy2 struct class compiled to a C array of fields."""
    cdef object cls
    cdef PyTypeObject* tp
    cdef str name
    cdef Py_ssize_t n
    cdef _Field* fields
    cdef tuple names
    cdef tuple defaults
    cdef tuple types
    cdef Py_ssize_t size_hint
    cdef bint generic_setattr   # no __setattr__ override: skip PyObject_SetAttr's dispatch
    cdef bint ready             # its fields compiled (a failed compile leaves it False)
    cdef bint union             # a thrift union: one field at most, where required is checked

    def __dealloc__(self):
        PyMem_Free(self.fields)

    cdef inline Py_ssize_t find(self, int fid, Py_ssize_t hint) noexcept:
        """Index of field ``fid``; fields usually arrive in order, so try ``hint`` first."""
        cdef Py_ssize_t i
        if hint < self.n and self.fields[hint].fid == fid:
            return hint
        for i in range(self.n):
            if self.fields[i].fid == fid:
                return i
        return -1


cdef str _describe(_TypeSpec t):
    """The IDL spelling of a type, for error messages."""
    if t.kind == T_STRUCT:
        return t.struct.name
    if t.kind == T_LIST or t.kind == T_SET:
        return f"{_TYPE_NAMES[t.kind]}<{_describe(t.elem)}>"
    if t.kind == T_MAP:
        return f"map<{_describe(t.key)},{_describe(t.elem)}>"
    return _TYPE_NAMES[t.kind]


cdef list _PRIMITIVES = [None] * 19
cdef object _empty_tuple = ()
cdef str _SPEC_ATTR = "__octo_codec_spec__"


cdef _TypeSpec _primitive(int kind):
    cdef _TypeSpec t = _TypeSpec.__new__(_TypeSpec)
    t.kind = kind
    t.wire = _wire(kind)
    return t


cdef bint _hashable_kind(int kind):
    return kind != T_LIST and kind != T_SET and kind != T_MAP


cdef _TypeSpec _type_of(object ttype, object sub):
    """Compile a thriftpy2 type (``ttype`` plus its container/struct spec)."""
    cdef int kind = ttype
    cdef _TypeSpec t
    if kind in (T_BOOL, T_BYTE, T_DOUBLE, T_I16, T_I32, T_I64, T_STRING, T_BINARY):
        return <_TypeSpec>_PRIMITIVES[kind]   # enums are i32 with a class as `sub`
    t = _TypeSpec.__new__(_TypeSpec)
    t.kind = kind
    t.wire = kind
    if kind == T_STRUCT:
        t.struct = _spec_for(sub)
    elif kind == T_LIST or kind == T_SET:
        t.elem = _type_from_spec(sub)
        t.set_as_list = kind == T_SET and not _hashable_kind(t.elem.kind)
    elif kind == T_MAP:
        t.key = _type_from_spec(sub[0])
        t.elem = _type_from_spec(sub[1])
    else:
        raise TypeError(f"unknown thrift type id {kind}")
    return t


cdef _TypeSpec _type_from_spec(object spec):
    """A container's element spec: a bare type id or a ``(ttype, sub)`` pair."""
    if isinstance(spec, tuple):
        return _type_of(spec[0], spec[1])
    return _type_of(spec, None)


cdef _StructSpec _spec_for(object cls):
    """The compiled spec of a thriftpy2 struct class, built on first use. Only a
    spec made for this very class is taken from its dict: a class built from
    another's dict (a decorator rebuilding it) carries that one's spec."""
    if not PyType_Check(cls):
        raise TypeError(f"{cls!r} is not a thriftpy2 struct class")
    cdef PyTypeObject* tp = <PyTypeObject*>cls
    # (the C lookup: a method call of dict.get would cost more than the rest of a small decode)
    cdef PyObject* cached = (PyDict_GetItemWithError(<object>tp.tp_dict, _SPEC_ATTR)
                             if tp.tp_dict != NULL else NULL)
    if cached != NULL and Py_TYPE(<object>cached) == <PyTypeObject*>_StructSpec \
            and (<_StructSpec>cached).cls is cls:
        return <_StructSpec>cached
    if PyErr_Occurred() != NULL:
        raise_current()
    return _compile(cls)


cdef _StructSpec _compile(object cls):
    spec = getattr(cls, "thrift_spec", None)
    if not isinstance(cls, type) or spec is None:
        raise TypeError(f"{cls!r} is not a thriftpy2 struct class (no thrift_spec)")
    if not isinstance(spec, dict):   # (Apache Thrift's generated classes hold a tuple)
        raise TypeError(f"{cls!r} is not a thriftpy2 struct class (a class Apache Thrift "
                        f"generated? its thrift_spec is a {type(spec).__name__}, not a dict)")
    cdef dict thrift_spec = spec
    cdef _StructSpec s = _StructSpec.__new__(_StructSpec)
    s.cls = cls
    s.tp = <PyTypeObject*>cls
    s.name = cls.__name__
    s.size_hint = 64
    s.generic_setattr = _uses_generic_setattr(s.tp)
    s.union = _is_union(cls)
    # Registered before the fields are compiled so that recursive structs resolve.
    type.__setattr__(cls, _SPEC_ATTR, s)
    try:
        _compile_fields(s, thrift_spec, getattr(cls, "default_spec", None) or ())
    except BaseException:
        type.__delattr__(cls, _SPEC_ATTR)   # (the structs that refer to s see it not ready)
        raise
    s.ready = True
    return s


def _is_union(cls) -> bool:
    """Whether thriftpy2 parsed ``cls`` as a union: it says so only in the
    ``__thrift_meta__`` of the class's module."""
    meta = getattr(modules.get(getattr(cls, "__module__", None)), "__thrift_meta__", None)
    return isinstance(meta, dict) and any(union is cls for union in meta.get("unions", ()))


_IMMUTABLE = (type(None), bool, int, float, str, bytes, tuple, frozenset)


def _default_values(value):
    """What a container default holds (a map's keys and values)."""
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    if isinstance(value, (list, set, tuple, frozenset)):
        return list(value)
    return []


def _default_items(value) -> int:
    """Objects in a default value, counted as ``max_items`` counts decoded ones: an
    element 1, a map entry 2, a struct 1 plus its fields. A field left at its
    default costs a copy of it, so an IDL's big defaults cannot slip past the limit
    one STOP byte at a time."""
    spec = getattr(type(value), "thrift_spec", None)
    if spec is not None:
        return 1 + len(spec) + sum(_default_items(v) for v in vars(value).values())
    return sum(1 + _default_items(v) for v in _default_values(value))   # (a map's keys and values)


cdef _compile_fields(_StructSpec s, dict thrift_spec, object default_spec):
    defaults_by_name = dict(default_spec)
    names, defaults, types = [], [], []
    cdef _TypeSpec t
    cdef Py_ssize_t n = len(thrift_spec), i = 0
    s.fields = <_Field*>PyMem_Malloc(max(n, 1) * sizeof(_Field))
    if s.fields == NULL:
        raise MemoryError()
    for fid, fspec in thrift_spec.items():
        if len(fspec) == 3:
            ttype, name, required = fspec
            sub = None
        else:
            ttype, name, sub, required = fspec
        if not -32768 <= fid <= 32767:
            raise ValueError(f"{s.name}: field id {fid} out of i16 range")
        name = intern(str(name))
        t = _type_of(ttype, sub)
        names.append(name)
        defaults.append(defaults_by_name.get(name))
        types.append(t)
    s.names = tuple(names)
    s.defaults = tuple(defaults)
    s.types = tuple(types)
    for fid, fspec in thrift_spec.items():
        t = s.types[i]
        s.fields[i].fid = fid
        s.fields[i].kind = t.kind
        s.fields[i].wire = t.wire
        s.fields[i].required = bool(fspec[len(fspec) - 1])
        s.fields[i].name = <PyObject*>s.names[i]
        s.fields[i].default = <PyObject*>s.defaults[i]
        default = s.defaults[i]
        s.fields[i].mutable_default = not isinstance(default, _IMMUTABLE)
        s.fields[i].flat_default = type(default) in (list, set, dict) and all(
            isinstance(v, _IMMUTABLE) for v in _default_values(default))
        s.fields[i].default_items = 1 + _default_items(default)
        s.fields[i].type = <PyObject*>t
        i += 1
    s.n = n


# --- writer ------------------------------------------------------------------------

cdef struct _Writer:
    PyObject* buf     # a bytes object we own and resize
    char* data
    Py_ssize_t len
    Py_ssize_t cap
    int max_depth
    bint check_required   # an unset required field: an EncodeError (else left out)


cdef int _w_init(_Writer* w, Py_ssize_t cap, bint check_required=False,
                 int max_depth=64) except -1:
    if not 1 <= max_depth <= MAX_DEPTH_CAP:
        raise ValueError(f"max_depth must be between 1 and {MAX_DEPTH_CAP}")
    cdef object b = PyBytes_FromStringAndSize(NULL, cap)
    Py_INCREF(b)
    w.buf = <PyObject*>b
    w.data = PyBytes_AS_STRING(b)
    w.len = 0
    w.cap = cap
    w.max_depth = max_depth
    w.check_required = check_required
    return 0


cdef int _w_grow(_Writer* w, Py_ssize_t need) except -1:
    cdef Py_ssize_t cap = w.cap * 2
    while cap < w.len + need:
        cap *= 2
    _PyBytes_Resize(&w.buf, cap)
    w.data = PyBytes_AS_STRING(<object>w.buf)
    w.cap = cap
    return 0


cdef inline int _w_reserve(_Writer* w, Py_ssize_t need) except -1:
    if w.len + need > w.cap:
        return _w_grow(w, need)
    return 0


cdef object _w_finish(_Writer* w):
    _PyBytes_Resize(&w.buf, w.len)
    cdef object b = <object>w.buf
    Py_DECREF(b)
    w.buf = NULL
    return b


cdef void _w_abandon(_Writer* w) noexcept:
    Py_XDECREF(w.buf)
    w.buf = NULL


cdef inline void _put_u8(char* p, uint8_t v) noexcept nogil:
    p[0] = <char>v


cdef inline void _put_u16(char* p, uint16_t v) noexcept nogil:
    p[0] = <char>(v >> 8)
    p[1] = <char>v


cdef inline void _put_u32(char* p, uint32_t v) noexcept nogil:
    p[0] = <char>(v >> 24)
    p[1] = <char>(v >> 16)
    p[2] = <char>(v >> 8)
    p[3] = <char>v


cdef inline void _put_u64(char* p, uint64_t v) noexcept nogil:
    _put_u32(p, <uint32_t>(v >> 32))
    _put_u32(p + 4, <uint32_t>v)


cdef inline int _w_u8(_Writer* w, uint8_t v) except -1:
    _w_reserve(w, 1)
    _put_u8(w.data + w.len, v)
    w.len += 1
    return 0


cdef inline int _w_u16(_Writer* w, uint16_t v) except -1:
    _w_reserve(w, 2)
    _put_u16(w.data + w.len, v)
    w.len += 2
    return 0


cdef inline int _w_u32(_Writer* w, uint32_t v) except -1:
    _w_reserve(w, 4)
    _put_u32(w.data + w.len, v)
    w.len += 4
    return 0


cdef inline int _w_u64(_Writer* w, uint64_t v) except -1:
    _w_reserve(w, 8)
    _put_u64(w.data + w.len, v)
    w.len += 8
    return 0


cdef inline int _w_stop(_Writer* w) except -1:
    return _w_u8(w, T_STOP)


cdef inline int _w_raw(_Writer* w, const char* p, Py_ssize_t n) except -1:
    if n > 2147483647:
        raise OverflowError("string or binary longer than 2**31-1 bytes")
    _w_reserve(w, 4 + n)
    _put_u32(w.data + w.len, <uint32_t>n)
    memcpy(w.data + w.len + 4, p, n)
    w.len += 4 + n
    return 0


cdef str _tname(object v):
    return type(v).__name__


cdef int _int_type_error(object v, int kind) except -1:
    if isinstance(v, float) and isfinite(v):   # (int() of nan or inf fails: no way out there)
        # time.time() * 1000 for an i64: thriftpy2's default (cybin) codec wrote it
        # truncated, without a word, so code moved from it meets this first
        raise TypeError(f"expected int for {_TYPE_NAMES[kind]}, got float {v!r} (thriftpy2's "
                        f"default codec truncated it silently: pass int() or round() of it)")
    raise TypeError(f"expected int for {_TYPE_NAMES[kind]}, got {_tname(v)}")


cdef int _int_range_error(object v, int kind) except -1:
    raise OverflowError(f"{v!r} out of range for {_TYPE_NAMES[kind]}")


cdef object _index(object v, int kind):
    """An integer-like value (numpy's ints, anything with ``__index__``) as an
    int, as thriftpy2 and Apache take it; a float or a str is refused."""
    try:
        return PyNumber_Index(v)
    except TypeError:
        _int_type_error(v, kind)


cdef inline int64_t _as_int(object v, int64_t lo, int64_t hi, int kind) except? -1:
    cdef int64_t x
    if not PyLong_Check(v):
        v = _index(v, kind)
    # Cython's conversion has a fast path for small ints; past 64 bits it raises
    # OverflowError, which the struct writer reports with the field's name.
    x = v
    if x < lo or x > hi:
        _int_range_error(v, kind)
    return x


cdef int _w_string(_Writer* w, object v, int kind) except -1:
    cdef Py_ssize_t n
    cdef const char* p
    cdef Py_buffer view
    if PyUnicode_Check(v):
        p = PyUnicode_AsUTF8AndSize(v, &n)
        return _w_raw(w, p, n)
    if PyBytes_Check(v):
        return _w_raw(w, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v))
    if isinstance(v, (bytearray, memoryview)):
        PyObject_GetBuffer(v, &view, PyBUF_SIMPLE)
        try:
            _w_raw(w, <const char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return 0
    raise TypeError(f"expected str or bytes for {_TYPE_NAMES[kind]}, got {_tname(v)}")


cdef inline int _w_prim(_Writer* w, int kind, object v) except -1:
    """Write one bool, byte, i16, i32, i64, double, string or binary."""
    cdef double d
    cdef int64_t x
    if kind == T_STRING or kind == T_BINARY:
        return _w_string(w, v, kind)
    if kind == T_I32:
        x = _as_int(v, -2147483648, 2147483647, kind)
        return _w_u32(w, <uint32_t>x)
    if kind == T_I64:
        x = _as_int(v, INT64_MIN, INT64_MAX, kind)
        return _w_u64(w, <uint64_t>x)
    if kind == T_BOOL:
        if v is True:
            x = 1
        elif v is False:
            x = 0
        elif PyNumber_Check(v):    # an int, numpy.bool_...: its truth, as Apache writes it
            x = 1 if v else 0
        else:
            raise TypeError(f"expected bool for bool, got {_tname(v)}")
        return _w_u8(w, <uint8_t>x)
    if kind == T_DOUBLE:
        if PyFloat_Check(v):
            d = PyFloat_AS_DOUBLE(v)
        elif PyLong_Check(v):
            d = PyLong_AsDouble(v)
        elif PyNumber_Check(v):    # numpy floats, Decimal, Fraction: through __float__
            d = PyFloat_AsDouble(v)
        else:
            raise TypeError(f"expected float for double, got {_tname(v)}")
        return _w_u64(w, (<uint64_t*>&d)[0])
    if kind == T_BYTE:
        x = _as_int(v, -128, 127, kind)
        return _w_u8(w, <uint8_t>x)
    if kind == T_I16:
        x = _as_int(v, -32768, 32767, kind)
        return _w_u16(w, <uint16_t>x)
    raise TypeError(f"unsupported thrift type {kind}")


cdef inline bint _is_primitive(int kind) noexcept nogil:
    """A kind written and read in line (numbers, bool, string, binary), no spec needed."""
    return kind < T_STRUCT or kind == T_BINARY


cdef int _w_value(_Writer* w, _TypeSpec t, int kind, object v, int depth) except -1:
    """Write one value of type ``t`` (``kind`` is ``t.kind``; passed so primitives need no ``t``)."""
    if _is_primitive(kind):
        return _w_prim(w, kind, v)
    if depth >= w.max_depth:
        raise ValueError(f"nesting deeper than {w.max_depth} (a cycle?)")
    if kind == T_STRUCT:
        return _w_struct(w, t.struct, v, depth + 1)
    if kind == T_LIST or kind == T_SET:
        return _w_list(w, t.elem, v, depth + 1)
    if kind == T_MAP:
        return _w_map(w, t, v, depth + 1)
    raise TypeError(f"unsupported thrift type {kind}")


cdef inline int _w_elem(_Writer* w, _TypeSpec t, int kind, object v, int depth) except -1:
    """A container element: a primitive written in line, anything else by ``_w_value``."""
    if _is_primitive(kind):
        return _w_prim(w, kind, v)
    return _w_value(w, t, kind, v, depth)


cdef int _w_list(_Writer* w, _TypeSpec elem, object v, int depth) except -1:
    cdef Py_ssize_t i, n
    cdef int kind = elem.kind
    if PyList_CheckExact(v) or PyTuple_CheckExact(v):
        seq = v
    elif isinstance(v, (set, frozenset, list, tuple)):
        seq = list(v)
    elif isinstance(v, (str, bytes, dict)) or not hasattr(v, "__iter__"):
        raise TypeError(f"expected a list, tuple or set, got {_tname(v)}")
    else:
        seq = list(v)
    n = len(seq)
    if n > 2147483647:
        raise OverflowError("container longer than 2**31-1")
    _w_reserve(w, 5)
    _put_u8(w.data + w.len, <uint8_t>elem.wire)
    _put_u32(w.data + w.len + 1, <uint32_t>n)
    w.len += 5
    cdef bint is_list = PyList_CheckExact(seq)
    for i in range(n):
        if is_list:
            if i >= PyList_GET_SIZE(seq):   # an element's own code (__index__...) shrank it
                _changed_size("list")
            item = <object>PyList_GET_ITEM(seq, i)   # owned while it is written
        else:
            item = <object>PyTuple_GET_ITEM(seq, i)
        _w_elem(w, elem, kind, item, depth)
    if is_list and PyList_GET_SIZE(seq) != n:
        _changed_size("list")
    return 0


cdef int _changed_size(str what) except -1:
    raise ValueError(f"the {what} changed size while it was written (the header has its "
                     "length before)")


cdef int _w_map(_Writer* w, _TypeSpec t, object v, int depth) except -1:
    cdef Py_ssize_t pos = 0, n
    cdef PyObject* k
    cdef PyObject* val
    cdef _TypeSpec kt = t.key, vt = t.elem
    cdef int kk = kt.kind, vk = vt.kind
    if not PyDict_CheckExact(v):
        if not isinstance(v, dict) and not hasattr(v, "items"):
            raise TypeError(f"expected a dict, got {_tname(v)}")
        v = dict(v.items())   # a subclass's own items(), as thriftpy2 writes it
    n = PyDict_GET_SIZE(v)   # what PyDict_Next walks (a subclass's __len__ may say otherwise)
    if n > 2147483647:
        raise OverflowError("container longer than 2**31-1")
    _w_reserve(w, 6)
    _put_u8(w.data + w.len, <uint8_t>kt.wire)
    _put_u8(w.data + w.len + 1, <uint8_t>vt.wire)
    _put_u32(w.data + w.len + 2, <uint32_t>n)
    w.len += 6
    cdef Py_ssize_t written = 0
    while written < n and PyDict_Next(v, &pos, &k, &val):
        key = <object>k         # both owned while they are written: an element's own
        value = <object>val     # code (__index__...) may change the dict under us
        _w_elem(w, kt, kk, key, depth)
        _w_elem(w, vt, vk, value, depth)
        written += 1
    if written != n or PyDict_GET_SIZE(v) != n:
        _changed_size("dict")
    return 0


cdef _StructSpec _twin_spec(_StructSpec s, object cls):
    """The spec of struct class ``cls`` when it is ``s``'s twin: the same struct
    from another load of the IDL (same name, same fields), which thriftpy2
    writes as it would its own; otherwise ``TypeError``."""
    if cls.__name__ != s.name or getattr(cls, "thrift_spec", None) is None:
        raise TypeError(f"expected {s.name}, got {cls.__name__}")
    cdef _StructSpec other = _spec_for(cls)
    cdef Py_ssize_t i
    if other.n == s.n:
        for i in range(s.n):
            if (other.fields[i].fid != s.fields[i].fid or other.fields[i].wire != s.fields[i].wire
                    or <object>other.fields[i].name != <object>s.fields[i].name):
                break
        else:
            return other
    raise TypeError(f"expected {s.name} of {s.cls.__module__}, got {cls.__module__}."
                    f"{cls.__name__}: another struct of that name, with other fields")


def check_struct(object cls) -> None:
    """Compile thriftpy2 struct class ``cls`` for the codec now (it is compiled on
    first use otherwise), with the structs its fields refer to: ``ValueError``
    or ``TypeError`` for one the codec cannot write or read, such as a field id
    past i16, which thriftpy2 loads but no thrift binary peer can write."""
    _spec_for(cls)


def is_twin(object cls, object of) -> bool:
    """Whether struct class ``cls`` is ``of`` or its twin from another load of the
    IDL (an include loaded on its own too): the encoder writes one as the other."""
    if cls is of:
        return True
    try:
        _twin_spec(_spec_for(of), cls)
    except TypeError:
        return False
    return True


cdef int _w_struct(_Writer* w, _StructSpec s, object obj, int depth) except -1:
    cdef Py_ssize_t i, written = 0
    cdef _Field* f
    cdef PyObject* v
    if Py_TYPE(obj) != s.tp and not isinstance(obj, s.cls):
        s = _twin_spec(s, type(obj))
    if not s.ready:
        _not_ready(s)
    for i in range(s.n):
        f = &s.fields[i]
        v = PyObject_GetAttr(obj, <object>f.name)
        if v == NULL:
            if not PyErr_ExceptionMatches(AttributeError):
                _field_failed(s, f)
            PyErr_Clear()
            continue
        if v == Py_None:
            Py_DECREF(<object>v)
            if f.required and w.check_required:
                raise EncodeError(f"required field {s.name}.{<object>f.name} is unset")
            continue
        try:
            _w_reserve(w, 3)
            _put_u8(w.data + w.len, <uint8_t>f.wire)
            _put_u16(w.data + w.len + 1, <uint16_t>f.fid)
            w.len += 3
            _w_value(w, <_TypeSpec>f.type, f.kind, <object>v, depth)
            written += 1
        except EncodeError:
            raise
        except OverflowError as e:
            # Cython's int conversion past 64 bits says nothing of the IDL type; add it
            raise EncodeError(f"{s.name}.{<object>f.name}: {e} "
                              f"(field type {_describe(<_TypeSpec>f.type)})") from e
        except _NOT_THE_VALUES:
            raise
        except Exception as e:   # the value's own code too (__index__, __iter__, items())
            raise EncodeError(f"{s.name}.{<object>f.name}: {_describe_error(e)}") from e
        finally:
            Py_DECREF(<object>v)
    if s.union and written > 1 and w.check_required:
        # Java reads them as one member and loses what follows it, silently
        # (none set, Java refuses loudly; C++ and Python take it, and so it goes)
        raise EncodeError(_too_many_members(s, obj, written))
    return _w_stop(w)


cdef str _too_many_members(_StructSpec s, object obj, Py_ssize_t written):
    """What is wrong with union ``obj`` of ``written`` members: which are set, and
    which of them hold the IDL's default (thriftpy2 sets it on every new union)."""
    names = [name for name in s.names if getattr(obj, name, None) is not None]
    text = f"union {s.name} has {written} fields set ({', '.join(names)}); it holds one at most"
    defaulted = [name for name, default in zip(s.names, s.defaults)
                 if default is not None and name in names and getattr(obj, name) == default]
    if defaulted:
        text += f" ({', '.join(defaulted)}: the IDL's default; set it to None)"
    return text


#: Raised while a value is written, yet not the value's fault: they pass through,
#: where anything else its own code raises becomes an EncodeError naming the field.
_NOT_THE_VALUES = (MemoryError, RecursionError)


cdef str _describe_error(BaseException e):
    """``e``'s message; an exception other than the encoder's own says its type."""
    return str(e) if type(e) in (TypeError, ValueError, UnicodeEncodeError) \
        else f"{type(e).__name__}: {e}"


cdef int _field_failed(_StructSpec s, _Field* f) except -1:
    """Reading field ``f`` raised (not AttributeError): an EncodeError naming it."""
    try:
        raise_current()
    except _NOT_THE_VALUES:
        raise
    except Exception as e:
        raise EncodeError(f"{s.name}.{<object>f.name}: reading it raised "
                          f"{type(e).__name__}: {e}") from e
    return 0


cdef int _not_ready(_StructSpec s) except -1:
    raise TypeError(f"struct {s.name} could not be compiled (its thrift_spec is bad)")


cdef int raise_current() except -1:
    # An exception is already set; returning -1 from an `except -1` function propagates it.
    return -1


cdef int _w_message_begin(_Writer* w, object name, object msg_type, object seqid) except -1:
    """A strict message header: version|type, name, seqid."""
    cdef Py_ssize_t n
    cdef const char* p
    cdef int64_t sid
    if not PyUnicode_Check(name):
        raise EncodeError(f"message name must be str, got {_tname(name)}")
    if not PyLong_Check(msg_type) or not 1 <= msg_type <= 4:
        raise EncodeError(f"message type {msg_type!r} is not CALL/REPLY/EXCEPTION/ONEWAY")
    try:
        sid = _as_int(seqid, -2147483648, 2147483647, T_I32)
        p = PyUnicode_AsUTF8AndSize(name, &n)
    except _NOT_THE_VALUES:
        raise
    except Exception as e:
        raise EncodeError(f"message header: {_describe_error(e)}") from e
    _w_reserve(w, n + 12)
    _put_u32(w.data + w.len, <uint32_t>(VERSION_1 | msg_type))
    _put_u32(w.data + w.len + 4, <uint32_t>n)
    memcpy(w.data + w.len + 8, p, n)
    _put_u32(w.data + w.len + 8 + n, <uint32_t>sid)
    w.len += n + 12
    return 0


cdef _StructSpec _encode_spec(object obj):
    try:
        return _spec_for(type(obj))
    except TypeError as e:
        raise EncodeError(f"cannot encode {_tname(obj)}: not a thriftpy2 struct") from e
    except ValueError as e:   # a thrift_spec the encoder cannot write (a field id past i16)
        raise EncodeError(f"cannot encode {_tname(obj)}: {e}") from e


cdef int _w_top(_Writer* w, _StructSpec s, object obj) except -1:
    """Write a top-level struct and teach its spec how large it tends to be."""
    cdef Py_ssize_t start = w.len
    _w_struct(w, s, obj, 1)
    if w.len - start > s.size_hint:
        s.size_hint = w.len - start
    return 0


def encode(obj):
    """TBinaryProtocol bytes of a thriftpy2 struct or exception instance."""
    cdef _StructSpec s = _encode_spec(obj)
    cdef _Writer w
    _w_init(&w, s.size_hint)
    try:
        _w_top(&w, s, obj)
    except BaseException:
        _w_abandon(&w)
        raise
    return _w_finish(&w)


def encode_message(name, msg_type, seqid, obj, *, bint check_required=False, int max_depth=64):
    """A whole strict TBinaryProtocol message: header, then ``obj`` (the args/result struct).

    An unset required field is left out, as thriftpy2 and Apache write it, or,
    with ``check_required``, an ``EncodeError`` (as Java writes it; the RPC
    paths do so, since a reader may refuse the message); so is a union with
    more than one field set (Java reads them as one, silently losing the rest
    of the struct around it). Nesting deeper than
    ``max_depth`` (64, as thriftpy2 and fastbinary; the RPC paths use their
    ``Limits.max_depth``: what they would read) is an ``EncodeError``."""
    cdef _StructSpec s = _encode_spec(obj)
    cdef _Writer w
    _w_init(&w, s.size_hint + 64, check_required, max_depth)
    try:
        _w_message_begin(&w, name, msg_type, seqid)
        _w_top(&w, s, obj)
    except BaseException:
        _w_abandon(&w)
        raise
    return _w_finish(&w)


# --- reader ------------------------------------------------------------------------

cdef struct _Reader:
    const unsigned char* buf
    Py_ssize_t pos
    Py_ssize_t end
    Py_ssize_t max_string
    Py_ssize_t max_container
    int max_depth
    Py_ssize_t items_left    # of Limits.max_items
    bint strict_text         # invalid UTF-8 in a string: an error (else its bytes)


cdef int _truncated(_Reader* r, Py_ssize_t need, str what) except -1:
    raise DecodeError(
        f"truncated input: {what} needs {need} bytes at byte {r.pos}, "
        f"{r.end - r.pos} left", offset=r.pos)


cdef inline int _need(_Reader* r, Py_ssize_t n, str what) except -1:
    if r.end - r.pos < n:
        return _truncated(r, n, what)
    return 0


cdef inline uint32_t _get_u32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t _get_u64(const unsigned char* p) noexcept nogil:
    return (<uint64_t>_get_u32(p) << 32) | _get_u32(p + 4)


cdef inline int32_t _r_i32(_Reader* r) except? -1:
    if r.end - r.pos < 4:
        _truncated(r, 4, "i32")
    cdef int32_t v = <int32_t>_get_u32(r.buf + r.pos)
    r.pos += 4
    return v


cdef inline Py_ssize_t _r_length(_Reader* r, Py_ssize_t limit, Py_ssize_t unit,
                                 str what) except -1:
    """Read an i32 length and check it against ``limit`` and the bytes left."""
    cdef Py_ssize_t n
    if r.end - r.pos >= 4:
        n = <int32_t>_get_u32(r.buf + r.pos)
        if 0 <= n <= limit and n * unit <= r.end - r.pos - 4:
            r.pos += 4
            return n
    return _r_bad_length(r, limit, unit, what)


cdef Py_ssize_t _r_bad_length(_Reader* r, Py_ssize_t limit, Py_ssize_t unit, str what) except -1:
    """``_r_length`` out of line, for the lengths its fast path does not take: raises."""
    cdef Py_ssize_t at = r.pos
    cdef Py_ssize_t n = _r_i32(r)
    if n < 0:
        raise DecodeError(f"negative {what} length {n} at byte {at}", offset=at)
    if n > limit:
        raise DecodeError(f"{what} length {n} at byte {at} exceeds the limit {limit}", offset=at)
    if n * unit > r.end - r.pos:
        raise DecodeError(
            f"truncated input: {what} of {n} claims at least {n * unit} bytes at byte {r.pos}, "
            f"{r.end - r.pos} left", offset=at)
    return n


cdef int _over_items(_Reader* r, Py_ssize_t at) except -1:
    raise DecodeError(f"the input makes more objects than Limits.max_items allows "
                      f"(at byte {at})", offset=at)


cdef inline int _charge(_Reader* r, Py_ssize_t items, Py_ssize_t at) except -1:
    """Count ``items`` objects against the decode's ``max_items``."""
    if items > r.items_left:
        return _over_items(r, at)
    r.items_left -= items
    return 0


cdef object _r_string(_Reader* r, int kind):
    cdef Py_ssize_t n = _r_length(r, r.max_string, 1, "binary" if kind == T_BINARY else "string")
    cdef Py_ssize_t at = r.pos
    r.pos += n
    if kind == T_BINARY:
        return PyBytes_FromStringAndSize(<const char*>r.buf + at, n)
    # No try block here: Cython's saves the exception state on entry, a fifth of a
    # short string's time. A failed decode goes the slow way.
    cdef PyObject* text = _PyUnicode_DecodeUTF8(<const char*>r.buf + at, n, NULL)
    if text == NULL:
        if not PyErr_ExceptionMatches(UnicodeDecodeError):
            raise_current()
        PyErr_Clear()
        return _r_not_utf8(r, at, n)
    cdef object s = <object>text
    Py_DECREF(s)   # the cast took a reference of its own
    return s


cdef object _r_not_utf8(_Reader* r, Py_ssize_t at, Py_ssize_t n):
    """A string that is not UTF-8: an error (``strict_text``; decoded again, for
    where it goes wrong) or its bytes (at once: a list of short strings that are
    not UTF-8 would otherwise pay for a second failed decode each)."""
    if r.strict_text:
        try:
            PyUnicode_DecodeUTF8(<const char*>r.buf + at, n, NULL)
        except UnicodeDecodeError as e:
            raise DecodeError(f"invalid UTF-8 in string at byte {at + e.start}",
                              offset=at + e.start) from None
    # As thriftpy2 reads it: the bytes, for the application to decode (C++, Go and
    # older peers put other encodings, GBK say, in string fields).
    return PyBytes_FromStringAndSize(<const char*>r.buf + at, n)


cdef inline object _r_prim(_Reader* r, int kind):
    """Read one bool, byte, i16, i32, i64, double, string or binary."""
    cdef uint64_t u
    if kind == T_I32:
        return PyLong_FromLong(_r_i32(r))
    if kind == T_STRING or kind == T_BINARY:
        return _r_string(r, kind)
    if kind == T_I64:
        _need(r, 8, "i64")
        u = _get_u64(r.buf + r.pos)
        r.pos += 8
        return PyLong_FromLongLong(<int64_t>u)
    if kind == T_BOOL:
        _need(r, 1, "bool")
        r.pos += 1
        return r.buf[r.pos - 1] != 0
    if kind == T_DOUBLE:
        _need(r, 8, "double")
        u = _get_u64(r.buf + r.pos)
        r.pos += 8
        return PyFloat_FromDouble((<double*>&u)[0])
    if kind == T_BYTE:
        _need(r, 1, "byte")
        r.pos += 1
        return PyLong_FromLong(<int8_t>r.buf[r.pos - 1])
    if kind == T_I16:
        _need(r, 2, "i16")
        r.pos += 2
        return PyLong_FromLong(<int16_t>((r.buf[r.pos - 2] << 8) | r.buf[r.pos - 1]))
    raise DecodeError(f"unsupported thrift type {kind}")


cdef object _r_value(_Reader* r, _TypeSpec t, int kind, int depth):
    if _is_primitive(kind):
        return _r_prim(r, kind)
    if depth >= r.max_depth:
        raise DecodeError(f"nesting deeper than {r.max_depth} at byte {r.pos}", offset=r.pos)
    if kind == T_STRUCT:
        return _r_struct(r, t.struct, depth + 1)
    if kind == T_LIST or kind == T_SET:
        return _r_list(r, t, depth + 1)
    return _r_map(r, t, depth + 1)


cdef inline object _r_elem(_Reader* r, _TypeSpec t, int kind, int depth):
    """A container element: a primitive read in line, anything else by ``_r_value``."""
    if _is_primitive(kind):
        return _r_prim(r, kind)
    return _r_value(r, t, kind, depth)


cdef inline Py_ssize_t _unit(int wire) noexcept nogil:
    """Bytes per element to bound a container's count (1 for an invalid type: checked later)."""
    cdef Py_ssize_t size = _min_wire_size(wire)
    return size if size > 0 else 1


cdef int _r_check_wire(_Reader* r, int got, int expected, Py_ssize_t at, str what) except -1:
    if got != expected:
        raise DecodeError(
            f"{what} type {_TYPE_NAMES.get(got, got)} at byte {at} does not match "
            f"the IDL's {_TYPE_NAMES.get(expected, expected)}", offset=at)
    return 0


cdef object _r_list(_Reader* r, _TypeSpec t, int depth):
    cdef _TypeSpec elem = t.elem
    cdef int kind = elem.kind
    cdef Py_ssize_t i, n, at = r.pos
    cdef bint is_set = t.kind == T_SET   # (error messages name the IDL's kind)
    _need(r, 5, "set header" if is_set else "list header")
    cdef int wire = r.buf[r.pos]
    r.pos += 1
    n = _r_length(r, r.max_container, _unit(wire), "set" if is_set else "list")
    if n and wire != elem.wire:   # an empty container may name any element type
        _r_check_wire(r, wire, elem.wire, at, "set element" if is_set else "list element")
    _charge(r, n, at)
    cdef set members
    cdef dict hashes
    cdef Py_ssize_t before, budget = _hash_sharing_budget(n)
    if t.kind == T_SET and not t.set_as_list:
        members = set()   # filled directly: no list to build and copy
        hashes = {} if budget >= 0 and _floodable(kind) else None
        for i in range(n):
            v = _r_elem(r, elem, kind, depth)
            before = len(members)
            if _PySet_Add(members, v) < 0:
                _r_unhashable(at, "set element", "held in a Python set")
            if hashes is not None:
                _count_hash(hashes, v, len(members) > before, &budget, at, "set elements")
        return members
    cdef list out = PyList_New(n)
    for i in range(n):
        v = _r_elem(r, elem, kind, depth)
        Py_INCREF(v)
        PyList_SET_ITEM(out, i, <PyObject*>v)
    return out


cdef inline bint _floodable(int kind) noexcept nogil:
    """Whether map keys or set elements of this kind hash by values the sender
    picks, with no per-process salt (str and bytes have one): tuples and
    frozensets of numbers, and thriftpy2 structs, which hash their fields'
    values so. A sender can make n of them share one hash, and a dict or set of
    them then costs n² comparisons to build: 20,000 keys, half a megabyte, held
    the event loop 4 s, a 16 MB frame would hold it for an hour.

    A key put in costs a comparison with each key before it of the same hash, so
    the reader bounds the sum (``_count_hash``), not the keys of one hash: keys
    share hashes by nature too, in bigger groups than a fixed cap would take
    (hash(-1) == hash(-2), so the 32 tuples of five -1s and -2s share one)."""
    return kind == T_LIST or kind == T_SET or kind == T_STRUCT


cdef inline Py_ssize_t _hash_sharing_budget(Py_ssize_t n) noexcept nogil:
    """The comparisons keys sharing hashes may cost a map or set of ``n`` keys;
    -1 when n keys of one hash cost no more (its keys need not be counted)."""
    cdef Py_ssize_t budget = HASH_SHARING_PER_KEY * n + HASH_SHARING_SLACK
    # (in 64 bits: a 32-bit Py_ssize_t overflows past 46,341 keys)
    return budget if <int64_t>n * (n - 1) // 2 > budget else -1


cdef int _count_hash(dict hashes, object key, bint added, Py_ssize_t* budget,
                     Py_ssize_t at, str what) except -1:
    """Take what putting ``key`` in a dict or set just cost (a comparison with each
    key already there of its hash, at most) from ``budget``, and count it under its
    hash in ``hashes`` when it was ``added``: a ``DecodeError`` once the budget is
    spent (see ``_floodable``). A repeat adds nothing, yet is charged: finding its
    equal costs as much, so repeats of a key that shares its hash with many would
    otherwise cost the decoder as much as the flood the budget bounds."""
    h = hash(key)
    cdef Py_ssize_t c = hashes.get(h, 0)
    budget[0] -= c
    if budget[0] < 0:
        raise DecodeError(f"{what} at byte {at}: too many share a hash (their comparisons "
                          f"would cost more than {HASH_SHARING_PER_KEY} per key: an input "
                          f"made to slow the decoder down)", offset=at)
    if added:
        hashes[h] = c + 1
    return 0


cdef object _hashable(object v):
    """A decoded list or set made hashable to be a map key (as the encoder takes
    them): a tuple or frozenset, nested ones too. A Java or C++ peer may send
    map<list<i32>, ...>; a Python list cannot be a dict key."""
    if type(v) is list:
        return tuple([_hashable(x) for x in v])
    if type(v) is set:
        return frozenset([_hashable(x) for x in v])
    return v


cdef int _r_unhashable(Py_ssize_t at, str what, str where) except -1:
    """Raise the pending error of a dict or set insert; a TypeError (an unhashable
    value) as a DecodeError: ``what`` at ``at`` cannot be ``where``. So is a
    RecursionError: thriftpy2 hashes a struct in Python, a few frames a level, and
    Limits let a key nest deeper (up to 1000) than Python's stack lets it hash."""
    try:
        raise_current()
    except TypeError as e:
        raise DecodeError(f"{what} at byte {at} cannot be {where}: {e}", offset=at) from None
    except RecursionError:
        raise DecodeError(f"{what} at byte {at} cannot be {where}: it nests too deep for "
                          f"Python to hash", offset=at) from None
    return 0


cdef object _r_map(_Reader* r, _TypeSpec t, int depth):
    cdef _TypeSpec kt = t.key, vt = t.elem
    cdef int kk = kt.kind, vk = vt.kind
    cdef Py_ssize_t i, n, at = r.pos
    _need(r, 6, "map header")
    cdef int kw = r.buf[r.pos], vw = r.buf[r.pos + 1]
    r.pos += 2
    n = _r_length(r, r.max_container, _unit(kw) + _unit(vw), "map")
    if n:
        _r_check_wire(r, kw, kt.wire, at, "map key")
        _r_check_wire(r, vw, vt.wire, at, "map value")
    _charge(r, 2 * n, at)
    # Sized for n entries up front (no rehash on the way), but not past MAX_PRESIZE:
    # n repeats of one key would otherwise buy a big empty table for a few bytes.
    # Not for str keys: a presized table is a general one, and a dict of str keys
    # made empty keeps CPython's compact str-key layout (less memory, faster lookups).
    cdef dict out = {} if kk == T_STRING else _dict_presized(min(n, MAX_PRESIZE))
    cdef bint freeze = kk == T_LIST or kk == T_SET
    cdef Py_ssize_t before, budget = _hash_sharing_budget(n)
    cdef dict hashes = {} if budget >= 0 and _floodable(kk) else None
    for i in range(n):
        k = _r_elem(r, kt, kk, depth)
        if freeze:
            k = _hashable(k)
        v = _r_elem(r, vt, vk, depth)
        before = PyDict_GET_SIZE(out)
        if _PyDict_SetItem(out, k, v) < 0:   # no try block: it costs a save per entry
            _r_unhashable(at, "map key", "a Python dict key")
        if hashes is not None:
            _count_hash(hashes, k, PyDict_GET_SIZE(out) > before, &budget, at, "map keys")
    return out


cdef int _skip(_Reader* r, int wire, int depth) except -1:
    """Skip one value of wire type ``wire`` (unknown or mismatched fields)."""
    cdef Py_ssize_t n, i, at = r.pos, size
    cdef int ew, kw, vw
    size = _min_wire_size(wire)
    if size < 0:
        raise DecodeError(f"invalid field type {wire} at byte {at}", offset=at)
    if _fixed_size(wire):
        _need(r, size, "value")
        r.pos += size
    elif wire == T_STRING:
        n = _r_length(r, r.max_string, 1, "string")
        r.pos += n
    elif depth >= r.max_depth:   # like _r_value: only structs and containers nest
        raise DecodeError(f"nesting deeper than {r.max_depth} at byte {r.pos}", offset=r.pos)
    elif wire == T_STRUCT:
        while True:
            _need(r, 1, "field type")
            ew = r.buf[r.pos]
            r.pos += 1
            if ew == T_STOP:
                break
            _need(r, 2, "field id")
            r.pos += 2
            _skip(r, ew, depth + 1)
    elif wire == T_LIST or wire == T_SET:
        _need(r, 5, "set header" if wire == T_SET else "list header")
        ew = r.buf[r.pos]
        r.pos += 1
        n = _r_length(r, r.max_container, _unit(ew), "set" if wire == T_SET else "list")
        if n == 0:
            pass
        elif _fixed_size(ew):
            r.pos += n * _fixed_size(ew)  # fixed-size elements, all there (_r_length checked)
        else:
            for i in range(n):
                _skip(r, ew, depth + 1)
    elif wire == T_MAP:
        _need(r, 6, "map header")
        kw = r.buf[r.pos]
        vw = r.buf[r.pos + 1]
        r.pos += 2
        n = _r_length(r, r.max_container, _unit(kw) + _unit(vw), "map")
        for i in range(n):
            _skip(r, kw, depth + 1)
            _skip(r, vw, depth + 1)
    return 0


# The two below are out of line on purpose: _r_struct recurses once per nesting
# level, so whatever is inlined into it costs C stack at every level (see
# MAX_DEPTH_CAP).

cdef int _missing_required(_Reader* r, _StructSpec s, _Field* f) except -1:
    raise DecodeError(f"required field {s.name}.{<object>f.name} is missing "
                      f"(struct ends at byte {r.pos})", offset=r.pos)


cdef PyObject* _fresh_default(_Field* f) except NULL:
    """A new reference to a copy of a mutable default."""
    fresh = (<object>f.default).copy() if f.flat_default else deepcopy(<object>f.default)
    Py_INCREF(fresh)
    return <PyObject*>fresh


cdef object _r_struct(_Reader* r, _StructSpec s, int depth):
    cdef PyObject* stack_vals[MAX_STACK_FIELDS]
    cdef PyObject** vals = stack_vals
    cdef Py_ssize_t i, idx, hint = 0, at
    cdef int wire, fid
    cdef _Field* f
    cdef PyObject* pv
    cdef object obj
    cdef bint got_member = False
    if not s.ready:
        _not_ready(s)
    _charge(r, 1 + s.n, r.pos)
    if s.n > MAX_STACK_FIELDS:
        vals = <PyObject**>PyMem_Malloc(s.n * sizeof(PyObject*))
        if vals == NULL:
            raise MemoryError()
    for i in range(s.n):
        vals[i] = NULL
    try:
        while True:
            at = r.pos
            _need(r, 1, "field type")
            wire = r.buf[r.pos]
            if wire == T_STOP:
                r.pos += 1
                break
            _need(r, 3, "field header")
            fid = <int16_t>((r.buf[r.pos + 1] << 8) | r.buf[r.pos + 2])
            r.pos += 3
            idx = s.find(fid, hint)
            if idx < 0 or s.fields[idx].wire != wire:
                _skip(r, wire, depth)
                continue
            hint = idx + 1
            f = &s.fields[idx]
            v = _r_value(r, <_TypeSpec>f.type, f.kind, depth)
            Py_XDECREF(vals[idx])   # a repeated field: the last one wins
            Py_INCREF(v)
            vals[idx] = <PyObject*>v
            got_member = True
        obj = s.tp.tp_new(<type>s.cls, <PyObject*>_empty_tuple, NULL)
        for i in range(s.n):
            f = &s.fields[i]
            pv = vals[i]
            if pv == NULL:
                if f.required:
                    _missing_required(r, s, f)
                if s.union and got_member:
                    # the wire named the union's one member: a default would make a
                    # second, which calls and results refuse to send (Java reads one)
                    pv = <PyObject*>None
                elif f.mutable_default:   # never hand out the class's own default object
                    _charge(r, f.default_items, r.pos)
                    vals[i] = pv = _fresh_default(f)   # released with the decoded values
                else:
                    pv = f.default
            if s.generic_setattr:
                PyObject_GenericSetAttr(obj, <object>f.name, pv)
            else:
                PyObject_SetAttr(obj, <object>f.name, pv)
        return obj
    finally:
        for i in range(s.n):
            Py_XDECREF(vals[i])
        if vals != stack_vals:
            PyMem_Free(vals)


cdef struct _View:
    # The bytes of a bytes, bytearray or memoryview argument, read in place
    const unsigned char* buf
    Py_ssize_t len
    Py_buffer buffer     # held (to be released) when the argument is not bytes
    bint held


cdef inline int _view_open(_View* v, object data) except -1:
    """Point ``v`` at the bytes of ``data``; ``_view_close`` ends it. On the
    stack, not an object: most calls pass bytes, read with no buffer export."""
    if PyBytes_Check(data):
        v.buf = <const unsigned char*>PyBytes_AS_STRING(data)
        v.len = PyBytes_GET_SIZE(data)
        v.held = False
        return 0
    PyObject_GetBuffer(data, &v.buffer, PyBUF_SIMPLE)
    v.buf = <const unsigned char*>v.buffer.buf
    v.len = v.buffer.len
    v.held = True
    return 0


cdef inline void _view_close(_View* v) noexcept:
    if v.held:
        v.held = False
        PyBuffer_Release(&v.buffer)


cdef inline void _r_init(_Reader* r, const unsigned char* buf, Py_ssize_t start, Py_ssize_t end,
                         Limits limits, bint strict_text=False) noexcept:
    r.buf = buf
    r.strict_text = strict_text
    r.pos = start
    r.end = end
    r.max_string = limits.max_string_length
    r.max_container = limits.max_container_length
    r.max_depth = limits.max_depth
    r.items_left = limits.max_items


#: Input bytes from which a decode runs with the cyclic garbage collector paused.
#: A decode may make an object per byte, every one alive (nothing it makes is
#: garbage, nor a cycle), and the collections those allocations set off would scan
#: them all, and the older heap, over and over: 500,000 objects decoded in 0.4 s
#: instead of 0.1 s. Smaller decodes, most calls, set off few collections: they
#: skip the switch. (The switch is the process's: a gc.disable() another thread
#: makes during such a decode is undone at its end.)
cdef Py_ssize_t GC_PAUSE_BYTES = 64 * 1024


cdef object _decode_at(_StructSpec s, const unsigned char* buf, Py_ssize_t start, Py_ssize_t end,
                       Limits limits, bint whole, bint strict_text=False,
                       Py_ssize_t* items=NULL):
    """The struct at ``buf[start:end]``; ``items``, when given, gets the objects
    it made, as ``Limits.max_items`` counts them."""
    if end - start >= GC_PAUSE_BYTES:
        return _decode_gc_paused(s, buf, start, end, limits, whole, strict_text, items)
    return _decode_span(s, buf, start, end, limits, whole, strict_text, items)


cdef object _decode_gc_paused(_StructSpec s, const unsigned char* buf, Py_ssize_t start,
                              Py_ssize_t end, Limits limits, bint whole, bint strict_text,
                              Py_ssize_t* items):
    """``_decode_span`` with the collector paused, then as it was (see GC_PAUSE_BYTES)."""
    cdef int was_enabled = PyGC_Disable()
    try:
        return _decode_span(s, buf, start, end, limits, whole, strict_text, items)
    finally:
        if was_enabled:
            PyGC_Enable()


cdef inline object _decode_span(_StructSpec s, const unsigned char* buf, Py_ssize_t start,
                                Py_ssize_t end, Limits limits, bint whole, bint strict_text,
                                Py_ssize_t* items):
    cdef _Reader r
    _r_init(&r, buf, start, end, limits, strict_text)
    obj = _r_struct(&r, s, 1)
    if whole and r.pos != end:
        raise DecodeError(f"{end - r.pos} unexpected bytes after the struct at byte {r.pos}",
                          offset=r.pos)
    if items != NULL:
        items[0] = limits.max_items - r.items_left
    return obj


cdef _StructSpec _decode_spec(object cls):
    try:
        return _spec_for(cls)
    except (TypeError, AttributeError) as e:
        raise TypeError(f"cannot decode into {cls!r}: not a thriftpy2 struct class") from e


def decode(cls, data, Limits limits=None):
    """An instance of thriftpy2 struct class ``cls`` from TBinaryProtocol ``data``.

    ``data`` is bytes, bytearray or memoryview and must hold exactly one struct.
    """
    return _decode_body(cls, data, 0, limits, NULL)


cdef tuple _r_message_begin(_Reader* r):
    """(name, type, seqid) of a strict or old-style (non-strict) message header."""
    cdef Py_ssize_t at = r.pos
    cdef int32_t sz = _r_i32(r)
    cdef int msg_type
    cdef Py_ssize_t n
    if sz < 0:
        if (<uint32_t>sz & VERSION_MASK) != VERSION_1:
            raise DecodeError(f"bad message version 0x{<uint32_t>sz:08x} at byte {at}"
                              f"{_looks_like(r.buf + at, r.end - at)}", offset=at)
        msg_type = sz & 0xff
        n = _r_length(r, r.max_string, 1, "method name")
    else:
        # old non-strict header: name length, name, then a type byte
        if (<uint32_t>sz >> 16) == 0x0FFF:   # no name is that long: THeader's magic
            raise DecodeError(f"not a thrift message at byte {at}"
                              f"{_looks_like(r.buf + at, r.end - at)}", offset=at)
        if sz > r.end - r.pos:    # a name longer than the message: say what it may be instead
            hint = _looks_like(r.buf + at, r.end - at)
            if hint:
                raise DecodeError(f"not a thrift message at byte {at}{hint}", offset=at)
        r.pos = at
        n = _r_length(r, r.max_string, 1, "method name")
        _need(r, n + 1, "message type")
        msg_type = r.buf[r.pos + n]
    try:
        name = PyUnicode_DecodeUTF8(<const char*>r.buf + r.pos, n, NULL)
    except UnicodeDecodeError:
        raise DecodeError(f"method name at byte {r.pos} is not UTF-8", offset=r.pos) from None
    r.pos += n + (0 if sz < 0 else 1)
    if not 1 <= msg_type <= 4:
        raise DecodeError(f"unknown message type {msg_type} at byte {at}", offset=at)
    seqid = _r_i32(r)
    return name, msg_type, seqid


def decode_message_begin(data, Limits limits=None):
    """``(name, msg_type, seqid, body_offset)`` of a message in ``data``."""
    if limits is None:
        limits = DEFAULT_LIMITS
    cdef _View v
    cdef _Reader r
    _view_open(&v, data)
    try:
        _r_init(&r, v.buf, 0, v.len, limits)
        name, msg_type, seqid = _r_message_begin(&r)
    finally:
        _view_close(&v)
    return name, msg_type, seqid, r.pos


def decode_body(cls, data, Py_ssize_t offset, Limits limits=None):
    """The struct ``cls`` that fills ``data`` from ``offset`` to its end."""
    return _decode_body(cls, data, offset, limits, NULL)


def decode_body_counted(cls, data, Py_ssize_t offset, Limits limits=None):
    """``(decode_body(cls, data, offset, limits), objects)``: the objects the decode
    made, as ``Limits.max_items`` counts them (a measure of the memory it holds)."""
    cdef Py_ssize_t items = 0
    obj = _decode_body(cls, data, offset, limits, &items)
    return obj, items


cdef object _decode_body(cls, data, Py_ssize_t offset, Limits limits, Py_ssize_t* items):
    cdef _StructSpec s = _decode_spec(cls)
    if limits is None:
        limits = DEFAULT_LIMITS
    cdef _View v
    _view_open(&v, data)
    try:
        if offset < 0 or offset > v.len:
            raise ValueError(f"offset {offset} outside the {v.len}-byte input")
        return _decode_at(s, v.buf, offset, v.len, limits, True, False, items)
    finally:
        _view_close(&v)


def decode_reply(result_cls, exception_cls, data, Limits limits=None, int64_t seqid=-1,
                 str name=None):
    """``(msg_type, struct)`` of a whole reply message: an ``exception_cls``
    (``TApplicationException``) when its type is EXCEPTION, else a ``result_cls``.

    A message that is not a reply or an exception is a ``DecodeError``, and so
    is a REPLY whose seqid is not ``seqid`` (when given: the unified header's
    sequence id, which §3 says the body repeats), or that names another method
    than ``name`` (when given; ``"Service:name"`` too, as a multiplexed call
    names it: ``result_cls`` would read another method's result as this one's).
    EXCEPTION replies are taken whatever their seqid and name, as Apache's
    clients do: a server that could not read the request may not know them."""
    if limits is None:
        limits = DEFAULT_LIMITS
    cdef _View v
    _view_open(&v, data)
    try:
        return _decode_reply(result_cls, exception_cls, &v, limits, seqid, name)
    finally:
        _view_close(&v)


cdef tuple _decode_reply(result_cls, exception_cls, _View* v, Limits limits, int64_t seqid,
                         str name):
    cdef _Reader r
    _r_init(&r, v.buf, 0, v.len, limits)
    named, msg_type, body_seqid = _r_message_begin(&r)
    if msg_type != 2 and msg_type != 3:
        raise DecodeError(f"message type {msg_type} where a reply (2) or exception (3) belongs",
                          offset=0)
    if msg_type == 2 and seqid >= 0 and body_seqid != seqid:
        raise DecodeError(f"the reply's seqid {body_seqid} is not the call's {seqid}", offset=0)
    if msg_type == 2 and name is not None and named != name \
            and named.rpartition(":")[2] != name:
        raise DecodeError(f"the reply is to method {named!r}, not the call's {name!r}", offset=0)
    cdef _StructSpec s = _decode_spec(exception_cls if msg_type == 3 else result_cls)
    return msg_type, _decode_at(s, v.buf, r.pos, v.len, limits, True)


cdef _PRIMITIVE_KINDS = (T_BOOL, T_BYTE, T_DOUBLE, T_I16, T_I32, T_I64, T_STRING, T_BINARY)
for _k in _PRIMITIVE_KINDS:
    _PRIMITIVES[_k] = _primitive(_k)


include "_unframed.pxi"
include "_frame.pxi"
include "_sign.pxi"
include "_header.pxi"
