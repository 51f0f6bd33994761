"""Hypothesis strategies and converters for ANY thriftpy2 struct class.

Everything here walks ``thrift_spec`` (and ``default_spec``), never a
hand-written list of fields, so it works on IDLs these tests did not write:

* ``structs(cls)``: instances of ``cls`` with every field filled from its type
  (a union's: one member at most), nesting bounded by ``max_depth`` (recursive
  structs terminate);
* ``ApacheConverter``: a thriftpy2 object -> the same object as a class that
  ``thrift --gen py`` generated (same struct and field names);
* ``canonical(obj)``: a hashable, order-free form of a struct for comparisons
  across decoders that disagree on containers (thriftpy2 decodes sets as
  lists, octo_core as sets, Apache as sets; Apache objects are other classes);
* ``check_python_types(obj)``: a decoded object has the documented Python
  types (sets of hashable elements are ``set``, other sets ``list``, ...);
* ``apache_compatible``/``fields_in_id_order``/``has_negative_ids``: which
  comparisons with Apache Thrift make sense for a class.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Iterator, NamedTuple, Tuple

import pytest
from hypothesis import strategies as st
from thriftpy2.thrift import TType

INT_RANGES = {
    TType.BYTE: (-(2 ** 7), 2 ** 7 - 1),
    TType.I16: (-(2 ** 15), 2 ** 15 - 1),
    TType.I32: (-(2 ** 31), 2 ** 31 - 1),
    TType.I64: (-(2 ** 63), 2 ** 63 - 1),
}
CONTAINERS = (TType.LIST, TType.SET, TType.MAP)
PRIMITIVES = (TType.BOOL, TType.BYTE, TType.I16, TType.I32, TType.I64, TType.DOUBLE,
              TType.STRING, TType.BINARY)


class Field(NamedTuple):
    fid: int
    ttype: int
    name: str
    sub: Any        # container/struct/enum spec, or None
    required: bool


def fields(cls) -> Iterator[Field]:
    """The fields of a thriftpy2 struct class, in declaration order."""
    for fid, spec in cls.thrift_spec.items():
        if len(spec) == 3:
            ttype, name, required = spec
            sub = None
        else:
            ttype, name, sub, required = spec
        yield Field(fid, ttype, name, sub, bool(required))


def split(spec) -> Tuple[int, Any]:
    """A container element spec (a bare type id or ``(ttype, sub)``) as ``(ttype, sub)``."""
    if isinstance(spec, tuple):
        return spec[0], spec[1]
    return spec, None


def is_enum(sub) -> bool:
    return isinstance(sub, type) and hasattr(sub, "_VALUES_TO_NAMES")


def is_struct_class(obj) -> bool:
    return isinstance(obj, type) and isinstance(getattr(obj, "thrift_spec", None), dict)


def is_union(cls) -> bool:
    """Whether thriftpy2 parsed ``cls`` as a union (its module's ``__thrift_meta__`` says so)."""
    meta = getattr(sys.modules.get(cls.__module__), "__thrift_meta__", None) or {}
    return any(union is cls for union in meta.get("unions", ()))


def is_hashable_kind(ttype: int) -> bool:
    """Python can hash values of this thrift type (thriftpy2 structs define ``__hash__``)."""
    return ttype not in CONTAINERS


def freeze(value) -> Any:
    """A hashable stand-in for a (possibly nested) container value; used to keep
    the elements of a "set" of unhashable values unique."""
    if isinstance(value, dict):
        return ("map", frozenset((freeze(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return ("set", frozenset(freeze(v) for v in value))
    if isinstance(value, (list, tuple)):
        return ("list", tuple(freeze(v) for v in value))
    return value


# --- value strategies ----------------------------------------------------------------------


class _Builder:
    """Builds (and memoises) the strategy of each (type, remaining depth)."""

    def __init__(self, max_size: int, max_text: int):
        self.max_size = max_size
        self.max_text = max_text
        self._structs: Dict[Tuple[type, int], st.SearchStrategy] = {}

    def value(self, ttype: int, sub, depth: int) -> st.SearchStrategy:
        if ttype == TType.BOOL:
            return st.booleans()
        if ttype in INT_RANGES:
            if ttype == TType.I32 and is_enum(sub):
                return st.sampled_from(sorted(sub._VALUES_TO_NAMES))
            lo, hi = INT_RANGES[ttype]
            # Edge values are the interesting ones; hypothesis favours them anyway.
            return st.integers(lo, hi)
        if ttype == TType.DOUBLE:
            # NaN != NaN would break every equality below; NaN gets its own
            # bytes-only test. Infinities and -0.0 are fine.
            return st.floats(allow_nan=False)
        if ttype == TType.STRING:
            # Surrogates cannot be encoded as UTF-8 (they are an EncodeError).
            return st.text(st.characters(codec="utf-8"), max_size=self.max_text)
        if ttype == TType.BINARY:
            return st.binary(max_size=self.max_text)
        if ttype == TType.STRUCT:
            return self.struct(sub, depth - 1)
        if ttype in CONTAINERS and depth <= 0:
            # Out of depth budget: containers stay empty so that recursion ends
            # (a set of unhashable elements is a list, as below).
            if ttype == TType.SET and is_hashable_kind(split(sub)[0]):
                return st.just(set())
            return st.just({} if ttype == TType.MAP else [])
        if ttype == TType.LIST:
            et, es = split(sub)
            return st.lists(self.value(et, es, depth - 1), max_size=self.max_size)
        if ttype == TType.SET:
            et, es = split(sub)
            elems = self.value(et, es, depth - 1)
            if is_hashable_kind(et):
                return st.sets(elems, max_size=self.max_size)
            # A thrift set of lists/sets/maps: Python sets cannot hold those, so
            # both octo_core and thriftpy2 take (and octo_core returns) a list.
            return st.lists(elems, max_size=self.max_size, unique_by=freeze)
        if ttype == TType.MAP:
            (kt, ks), (vt, vs) = split(sub[0]), split(sub[1])
            if not is_hashable_kind(kt):
                return st.just({})   # a dict cannot have container keys
            return st.dictionaries(self.value(kt, ks, depth - 1), self.value(vt, vs, depth - 1),
                                   max_size=self.max_size)
        raise TypeError(f"unknown thrift type {ttype}")

    def struct(self, cls, depth: int) -> st.SearchStrategy:
        key = (cls, depth)
        if key not in self._structs:
            # Registered first (deferred) so that a struct that contains itself
            # through a *required* chain still gets a strategy object.
            self._structs[key] = st.deferred(lambda: self._structs[key])
            self._structs[key] = self._build_struct(cls, depth)
        return self._structs[key]

    def _build_struct(self, cls, depth: int) -> st.SearchStrategy:
        if is_union(cls):
            return self._build_union(cls, depth)
        defaults = dict(getattr(cls, "default_spec", None) or ())
        kwargs = {}
        for f in fields(cls):
            if f.ttype == TType.STRUCT and depth <= 0 and not f.required:
                # Out of depth: optional struct fields end the recursion (as
                # their IDL default where they have one: that is what a field
                # left off the wire decodes as).
                kwargs[f.name] = st.just(defaults.get(f.name))
                continue
            value = self.value(f.ttype, f.sub, depth)
            if f.required or defaults.get(f.name) is not None:
                # Required fields must be set; a field with an IDL default that
                # is None on the wire decodes back as the default, not None.
                kwargs[f.name] = value
            else:
                kwargs[f.name] = st.none() | value
        return st.builds(cls, **kwargs)

    def _build_union(self, cls, depth: int) -> st.SearchStrategy:
        """A union with one member set, or none; the others ``None`` (IDL defaults
        too: a union holds one member, and one read from the wire holds only it)."""
        unset = {f.name: st.none() for f in fields(cls)}
        members = [st.builds(cls, **{**unset, f.name: self.value(f.ttype, f.sub, depth)})
                   for f in fields(cls)
                   if not (f.ttype == TType.STRUCT and depth <= 0)]  # out of depth: none
        return st.one_of([st.builds(cls, **unset)] + members)


def structs(cls, max_depth: int = 5, max_size: int = 3, max_text: int = 12) -> st.SearchStrategy:
    """Instances of thriftpy2 struct/exception class ``cls``.

    ``max_depth`` bounds the nesting of structs and containers below ``cls``;
    ``max_size`` the elements of each container; ``max_text`` the length of
    strings and binaries.
    """
    return _Builder(max_size, max_text).struct(cls, max_depth)


def values(ttype: int, sub=None, max_depth: int = 3, max_size: int = 3,
           max_text: int = 12) -> st.SearchStrategy:
    """Values of one thrift type (``ttype`` plus thriftpy2's ``sub`` spec)."""
    return _Builder(max_size, max_text).value(ttype, sub, max_depth)


# --- class properties ----------------------------------------------------------------------


def struct_classes(cls) -> Iterator[type]:
    """``cls`` and every struct class reachable from its fields (each once)."""
    seen = set()

    def walk_type(ttype, sub):
        if ttype == TType.STRUCT:
            yield from walk(sub)
        elif ttype in (TType.LIST, TType.SET):
            yield from walk_type(*split(sub))
        elif ttype == TType.MAP:
            yield from walk_type(*split(sub[0]))
            yield from walk_type(*split(sub[1]))

    def walk(c):
        if c in seen:
            return
        seen.add(c)
        yield c
        for f in fields(c):
            yield from walk_type(f.ttype, f.sub)

    yield from walk(cls)


def _all_types(cls) -> Iterator[Tuple[int, Any]]:
    def walk_type(ttype, sub):
        yield ttype, sub
        if ttype in (TType.LIST, TType.SET):
            yield from walk_type(*split(sub))
        elif ttype == TType.MAP:
            yield from walk_type(*split(sub[0]))
            yield from walk_type(*split(sub[1]))

    for c in struct_classes(cls):
        for f in fields(c):
            yield from walk_type(f.ttype, f.sub)


def apache_compatible(cls) -> bool:
    """Apache's generated Python can hold every value of ``cls``: its structs are
    unhashable, so no set of structs/containers and no struct/container map keys."""
    for ttype, sub in _all_types(cls):
        if ttype == TType.SET and not split(sub)[0] in PRIMITIVES:
            return False
        if ttype == TType.MAP and not split(sub[0])[0] in PRIMITIVES:
            return False
    return True


def fields_in_id_order(cls) -> bool:
    """Every reachable struct declares its fields in ascending id order, so that
    declaration-order writers (octo_core, thriftpy2) and id-order writers
    (Apache) produce the same bytes."""
    return all(list(c.thrift_spec) == sorted(c.thrift_spec) for c in struct_classes(cls))


def has_negative_ids(cls) -> bool:
    """Apache emits no usable thrift_spec (hence no fastbinary) for such structs."""
    return any(fid < 0 for c in struct_classes(cls) for fid in c.thrift_spec)


# --- conversion to Apache-generated objects -----------------------------------------------------


class ApacheConverter:
    """thriftpy2 object -> the equivalent object of Apache-generated classes.

    Apache classes are looked up by the thriftpy2 class name in ``modules``
    (e.g. the ``ttypes`` module and a service module for ``<method>_args``).
    """

    def __init__(self, *modules):
        self.modules = modules

    def apache_class(self, cls) -> type:
        for module in self.modules:
            found = getattr(module, cls.__name__, None)
            if isinstance(found, type):
                return found
        raise LookupError(f"no Apache class {cls.__name__} in {self.modules}")

    def __call__(self, obj):
        cls = type(obj)
        kwargs = {f.name: self.value(getattr(obj, f.name, None), f.ttype, f.sub)
                  for f in fields(cls)}
        return self.apache_class(cls)(**kwargs)

    def value(self, v, ttype: int, sub):
        if v is None:
            return None
        if ttype == TType.STRUCT:
            return self(v)
        if ttype == TType.LIST:
            et, es = split(sub)
            return [self.value(e, et, es) for e in v]
        if ttype == TType.SET:
            et, es = split(sub)
            if et in PRIMITIVES:
                # The very same set object: Apache, thriftpy2 and octo_core all
                # write a set by iterating it, and a copy (even set(v)) is not
                # guaranteed to iterate in the same order, which would make
                # equal values produce different bytes.
                return v
            raise TypeError(f"Apache's Python cannot hold a set of {TType._VALUES_TO_NAMES[et]}")
        if ttype == TType.MAP:
            (kt, ks), (vt, vs) = split(sub[0]), split(sub[1])
            # A new dict built in the same iteration order writes the same bytes.
            return {self.value(k, kt, ks): self.value(x, vt, vs) for k, x in v.items()}
        return v


# --- canonical form -----------------------------------------------------------------------------


def canonical(obj, cls=None) -> Any:
    """A hashable form of struct ``obj`` that ignores set order and container
    classes. ``cls`` (default ``type(obj)``) is the thriftpy2 class whose spec
    is walked; ``obj`` may be an Apache-generated object with the same fields."""
    cls = cls or type(obj)
    return (cls.__name__,
            tuple((f.name, _canonical_value(getattr(obj, f.name, None), f.ttype, f.sub))
                  for f in fields(cls)))


def _canonical_value(v, ttype: int, sub):
    if v is None:
        return None
    if ttype == TType.STRUCT:
        return canonical(v, sub)
    if ttype == TType.DOUBLE:
        return ("double", float(v).hex())   # tells -0.0 from 0.0
    if ttype == TType.BOOL:
        return bool(v)
    if ttype == TType.LIST:
        et, es = split(sub)
        return ("list", tuple(_canonical_value(e, et, es) for e in v))
    if ttype == TType.SET:
        et, es = split(sub)
        return ("set", frozenset(_canonical_value(e, et, es) for e in v))
    if ttype == TType.MAP:
        (kt, ks), (vt, vs) = split(sub[0]), split(sub[1])
        return ("map", frozenset((_canonical_value(k, kt, ks), _canonical_value(x, vt, vs))
                                 for k, x in v.items()))
    return v


# --- decoded Python types -----------------------------------------------------------------------


def check_python_types(obj, cls=None, path=None):
    """Decoded values have the documented Python types: sets of hashable
    elements are ``set``, other sets ``list``, enums plain ``int``, strings
    ``str`` (``bytes`` when they are not UTF-8, as thriftpy2 reads them),
    binaries ``bytes``, structs the IDL's class."""
    cls = cls or type(obj)
    path = path or cls.__name__
    assert type(obj) is cls, f"{path}: {type(obj).__name__} is not {cls.__name__}"
    for f in fields(cls):
        _check_value(getattr(obj, f.name), f.ttype, f.sub, f"{path}.{f.name}")


_PY_TYPES = {TType.BOOL: bool, TType.BYTE: int, TType.I16: int, TType.I32: int, TType.I64: int,
             TType.DOUBLE: float, TType.STRING: str, TType.BINARY: bytes}


def _check_value(v, ttype, sub, path):
    if v is None:
        return
    if ttype == TType.STRING and type(v) is bytes:
        with pytest.raises(UnicodeDecodeError):
            v.decode("utf-8")   # only a string that is not UTF-8 is read as its bytes
    elif ttype in _PY_TYPES:
        assert type(v) is _PY_TYPES[ttype], f"{path}: {type(v).__name__}"
    elif ttype == TType.STRUCT:
        check_python_types(v, sub, path)
    elif ttype in (TType.LIST, TType.SET):
        et, es = split(sub)
        if ttype == TType.SET and is_hashable_kind(et):
            assert type(v) is set, f"{path}: {type(v).__name__}, expected set"
        else:
            assert type(v) is list, f"{path}: {type(v).__name__}, expected list"
        for i, e in enumerate(v):
            _check_value(e, et, es, f"{path}[{i}]")
    else:
        assert type(v) is dict, f"{path}: {type(v).__name__}"
        (kt, ks), (vt, vs) = split(sub[0]), split(sub[1])
        for k, e in v.items():
            _check_value(k, kt, ks, f"{path} key")
            _check_value(e, vt, vs, f"{path}[{k!r}]")



def top_level_structs(module) -> Dict[str, type]:
    """The struct and exception classes a thriftpy2 module defines, by name."""
    return {name: obj for name, obj in vars(module).items()
            if is_struct_class(obj) and obj.__module__ == module.__name__}
