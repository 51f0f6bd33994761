"""Thrift values from JSON and back, led by a thriftpy2 spec: what ``octo call`` reads and prints.

JSON has no sets, bytes, integer map keys or structs as keys, so:

- a struct (or exception) is an object of its fields by name; ``null`` or an
  absent field is an unset one;
- a list or a set is an array;
- a map is an object whose keys are written as JSON writes them (``"1"`` for
  1, ``"true"``, an enum's name), or an array of ``[key, value]`` pairs (the
  only way for keys that are structs or containers);
- binary is base64 text; an enum is its name (a number is taken too);
- a double may be ``NaN`` or ``Infinity`` (Python's ``json`` reads and writes them).

A value that does not fit its type is a ``ValueError`` naming where it is
(``args.items[2].id``) and what was expected.
"""
from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Dict, Tuple

from thriftpy2.thrift import TType

#: Bits of each integer type.
_BITS = {TType.BYTE: 8, TType.I16: 16, TType.I32: 32, TType.I64: 64}
_NAMES = {TType.BOOL: "a boolean", TType.DOUBLE: "a number", TType.STRING: "a string",
          TType.BINARY: "base64 text", TType.LIST: "an array", TType.SET: "an array",
          TType.MAP: "an object or an array of [key, value] pairs"}
#: Map key types a JSON object's (string) keys can spell.
_TEXT_KEYS = (TType.BOOL, TType.DOUBLE, TType.STRING, TType.BINARY, *_BITS)


def fields(cls: type) -> Dict[str, Tuple[int, Any]]:
    """A thriftpy2 struct class's fields: name -> (ttype, type spec or None)."""
    return {spec[1]: (spec[0], spec[2] if len(spec) > 3 else None)
            for spec in cls.thrift_spec.values()}   # type: ignore[attr-defined]


def struct_from_json(cls: type, data: Any, where: str) -> Any:
    """An instance of struct ``cls`` from a JSON object of its fields."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object of {cls.__name__}'s fields, "
                         f"got {_shown(data)}")
    known = fields(cls)
    for name in data:
        if name not in known:
            raise ValueError(f"{where}: {cls.__name__} has no field {name!r} "
                             f"(its fields: {', '.join(known) or 'none'})")
    return cls(**{name: from_json(*known[name], value, f"{where}.{name}")
                  for name, value in data.items()})


def from_json(ttype: int, spec: Any, value: Any, where: str) -> Any:
    """The thrift value of type ``ttype`` (with its thriftpy2 type ``spec``) that JSON
    ``value`` spells; ``ValueError`` if it spells none."""
    if value is None:
        return None
    if ttype == TType.STRUCT:
        return struct_from_json(spec, value, where)
    if ttype in _BITS:
        return _integer(ttype, spec, value, where)
    if ttype in (TType.LIST, TType.SET) and isinstance(value, list):
        element = _element(spec)
        return [from_json(*element, item, f"{where}[{i}]") for i, item in enumerate(value)]
    if ttype == TType.MAP:
        return _map(spec, value, where)
    if ttype == TType.BINARY and isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            raise ValueError(f"{where}: binary is given as base64 text, not {_shown(value)}") \
                from None
    if ((ttype == TType.BOOL and isinstance(value, bool))
            or (ttype == TType.STRING and isinstance(value, str))):
        return value
    if ttype == TType.DOUBLE and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{where}: expected {_NAMES.get(ttype, f'type {ttype}')}, got {_shown(value)}")


def to_json(ttype: int, spec: Any, value: Any) -> Any:
    """What ``json.dumps`` takes for the thrift ``value`` of type ``ttype`` (the inverse
    of ``from_json``)."""
    if value is None:
        return None
    if ttype == TType.STRUCT:
        return struct_to_json(value)
    if ttype in (TType.LIST, TType.SET):
        element = _element(spec)
        items = [to_json(*element, item) for item in value]
        return sorted(items, key=json.dumps) if ttype == TType.SET else items   # (a stable order)
    if ttype == TType.MAP:
        key, val = _element(spec[0]), _element(spec[1])
        if key[0] in _TEXT_KEYS:
            return {_key_text(key, k): to_json(*val, v) for k, v in value.items()}
        return [[to_json(*key, k), to_json(*val, v)] for k, v in value.items()]
    if ttype == TType.BINARY:
        return base64.b64encode(value).decode("ascii")
    if ttype in _BITS and _is_enum(spec):
        return spec._VALUES_TO_NAMES.get(value, value)
    return value


def struct_to_json(obj: Any) -> Dict[str, Any]:
    """A struct's (or an exception's) set fields as a JSON object."""
    return {name: to_json(ttype, spec, getattr(obj, name))
            for name, (ttype, spec) in fields(type(obj)).items()
            if getattr(obj, name) is not None}


def _element(spec: Any) -> Tuple[int, Any]:
    """(ttype, type spec) of a container's element, key or value spec."""
    return (spec[0], spec[1]) if isinstance(spec, tuple) else (spec, None)


def _is_enum(spec: Any) -> bool:
    return isinstance(spec, type) and hasattr(spec, "_NAMES_TO_VALUES")


def _integer(ttype: int, spec: Any, value: Any, where: str) -> int:
    if _is_enum(spec) and isinstance(value, str):
        try:
            return spec._NAMES_TO_VALUES[value]
        except KeyError:
            raise ValueError(f"{where}: {value!r} is no {spec.__name__} (one of "
                             f"{', '.join(spec._NAMES_TO_VALUES)})") from None
    if isinstance(value, bool) or not isinstance(value, int):
        kind = f"a {spec.__name__} name or an integer" if _is_enum(spec) else "an integer"
        raise ValueError(f"{where}: expected {kind}, got {_shown(value)}")
    half = 1 << (_BITS[ttype] - 1)
    if not -half <= value < half:
        raise ValueError(f"{where}: {value} does not fit in {_BITS[ttype]} bits")
    return value


def _map(spec: Any, value: Any, where: str) -> Dict[Any, Any]:
    key, val = _element(spec[0]), _element(spec[1])
    if isinstance(value, dict):
        if key[0] not in _TEXT_KEYS:
            raise ValueError(f"{where}: this map's keys are not strings or numbers: give it "
                             "as an array of [key, value] pairs")
        pairs = [(_key_from_text(key, text, where), item) for text, item in value.items()]
    elif isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
        pairs = [(_hashable(*key, from_json(*key, k, f"{where} key {i}"), f"{where} key {i}"), item)
                 for i, (k, item) in enumerate(value)]
    else:
        raise ValueError(f"{where}: expected {_NAMES[TType.MAP]}, got {_shown(value)}")
    return {k: from_json(*val, item, f"{where}[{json.dumps(to_json(*key, k))}]")
            for k, item in pairs}


def _hashable(ttype: int, spec: Any, value: Any, where: str) -> Any:
    """A map key of a container type as the codec takes and gives it: a list as a
    tuple, a set as a frozenset (a Python dict cannot hold lists or sets as keys)."""
    if value is None or ttype not in (TType.LIST, TType.SET, TType.MAP):
        return value
    if ttype == TType.MAP:
        raise ValueError(f"{where}: a map cannot be a map key in Python")
    items = (_hashable(*_element(spec), item, where) for item in value)
    return tuple(items) if ttype == TType.LIST else frozenset(items)


def _key_from_text(key: Tuple[int, Any], text: str, where: str) -> Any:
    """A map key from a JSON object's key, which JSON writes as a string."""
    ttype, spec = key
    if ttype in (TType.STRING, TType.BINARY) or (_is_enum(spec) and not text.lstrip("-").isdigit()):
        return from_json(ttype, spec, text, f"{where} key {text!r}")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    return from_json(ttype, spec, parsed, f"{where} key {text!r}")


def _key_text(key: Tuple[int, Any], value: Any) -> str:
    """A map key as a JSON object's key (the inverse of ``_key_from_text``)."""
    shown = to_json(*key, value)
    return shown if isinstance(shown, str) else json.dumps(shown)


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def args_from_json(args_cls: type, data: Any) -> Dict[str, Any]:
    """A method's arguments by name, from a JSON object of them (``args_cls``: its
    thriftpy2 ``<method>_args`` struct)."""
    made = struct_from_json(args_cls, data, "args")
    return {name: getattr(made, name) for name in data}
