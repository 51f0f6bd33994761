"""The check of the numbers users give for times, rates and counts, in one place.

Every option that is a number of seconds (timeouts, intervals, the signing skew)
or a rate (quotas) is checked here, so they accept the same values and refuse
the rest in the same words: NaN (which compares false, so a bound check lets it
through) and infinity (which overflows timers and counters) are refused, and so
is a ``bool`` (an ``int`` to Python, never what was meant). Counts (threads,
connections, bytes) are whole numbers with a least value, checked by ``count``.
The command line's numbers (``octo bench``, ``octo call``, ``octo scanner``) go
through the same checks, as argparse types (``seconds_argument`` and the rest).
"""
from __future__ import annotations

import math
from typing import Any, Callable, TypeVar

_T = TypeVar("_T")


def is_finite_number(value: Any, *, zero_ok: bool = False) -> bool:
    """Whether ``value`` is an int or float (not a bool), finite, and above 0
    (or 0 as well, with ``zero_ok``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (0 <= value if zero_ok else 0 < value) and value < math.inf


def finite_number(name: str, value: Any, unit: str = "seconds", *, zero_ok: bool = False,
                  off: str = "") -> Any:
    """``value`` if :func:`is_finite_number`, else ``ValueError`` naming ``name``.

    ``unit`` says what the number counts (``"calls per second"``); ``off`` names
    the values the caller accepted before asking (``"None or 0 (off)"``), so the
    message lists every value that would do.
    """
    if not is_finite_number(value, zero_ok=zero_ok):
        bound = "0 or more" if zero_ok else "above 0"
        alternative = f"{off}, or " if off else ""
        raise ValueError(f"{name} must be {alternative}a finite number of {unit} ({bound}), "
                         f"not {value!r}")
    return value


def count(name: str, value: Any, at_least: int = 1, *, none_ok: bool = False) -> Any:
    """``value`` if it is an int (not a bool) of at least ``at_least`` (or None, with
    ``none_ok``: no limit), else ``ValueError`` naming ``name``."""
    if none_ok and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < at_least:
        off = "None (no limit) or " if none_ok else ""
        raise ValueError(f"{name} must be {off}an integer of at least {at_least}, not {value!r}")
    return value


def argument(read: Callable[[str], _T]) -> Callable[[str], _T]:
    """An argparse ``type`` that reads an option's text with ``read``: its
    ``ValueError`` becomes a usage error that says what was wrong (argparse's
    own would only say "invalid value")."""

    def parse(text: str) -> _T:
        try:
            return read(text)
        except ValueError as exc:
            import argparse   # (here: the library itself never needs it)

            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


#: argparse types of the command line's seconds (above 0, or 0 as well) and counts.
seconds_argument = argument(lambda text: finite_number("it", float(text)))
seconds_or_zero_argument = argument(lambda text: finite_number("it", float(text), zero_ok=True))
count_argument = argument(lambda text: count("it", int(text)))
