"""Checks for the JSON documents a registry holds (nodes, route rules).

A registry's contents come from other processes and operators' tools, so
every value is checked for its type and range when it is read; anything else
is a ``ValueError`` naming the key, which the registries turn into "skip this
entry, with a warning".
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, Tuple

#: JSON integers a node may hold: Java's ``long`` (and nothing ``float()`` overflows on).
INT_RANGE = (-(2 ** 63), 2 ** 63 - 1)


def loads(text: "str | bytes", what: str) -> Dict[str, Any]:
    """``text`` decoded as one JSON object; ``ValueError`` for anything else."""
    try:
        data = json.loads(text)
    except RecursionError:   # json's C decoder recurses once per nesting level
        raise ValueError(f"{what} JSON is nested too deeply") from None
    return require_object(data, what)


def require_object(data: Any, what: str) -> Dict[str, Any]:
    """``data`` if it is a JSON object (a dict), else ``ValueError``."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} JSON is a {type(data).__name__}, not an object")
    return data


def _wrong(key: str, expected: str, value: Any) -> ValueError:
    shown = repr(value)
    if len(shown) > 40:   # the value may be huge: name its start only
        shown = shown[:40] + "..."
    return ValueError(f"{key} must be {expected}, not {shown}")


def require_str(key: str, value: Any) -> str:
    """``value`` if it is a string, else ``ValueError`` naming ``key``."""
    if not isinstance(value, str):
        raise _wrong(key, "a string", value)
    return value


def require_bool(key: str, value: Any) -> bool:
    """``value`` if it is a JSON boolean, else ``ValueError`` naming ``key``."""
    if not isinstance(value, bool):
        raise _wrong(key, "true or false", value)
    return value


def require_int(key: str, value: Any, bounds: Tuple[int, int] = INT_RANGE) -> int:
    """``value`` if it is a JSON integer (not a boolean) within ``bounds`` (inclusive)."""
    if isinstance(value, bool) or not isinstance(value, int) or not bounds[0] <= value <= bounds[1]:
        raise _wrong(key, f"an integer in [{bounds[0]}, {bounds[1]}]", value)
    return value


def require_float(key: str, value: Any) -> float:
    """``value`` as a float if it is a finite JSON number (not a boolean)."""
    if isinstance(value, int) and not isinstance(value, bool) and \
            INT_RANGE[0] <= value <= INT_RANGE[1]:
        return float(value)
    if not isinstance(value, float) or not math.isfinite(value):
        raise _wrong(key, "a finite number", value)
    return value


def require_str_list(key: str, value: Any) -> Tuple[str, ...]:
    """``value`` as a tuple if it is a JSON list of strings (a lone string is refused:
    ``tuple()`` would split it into characters)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise _wrong(key, "a list of strings", value)
    return tuple(value)
