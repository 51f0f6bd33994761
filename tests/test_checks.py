"""The one check of times, rates and counts every option shares (``octo_core.checks``)."""
import math

import pytest

from octo_core.checks import count, finite_number, is_finite_number


@pytest.mark.parametrize("value, zero_ok, expected", [
    (1, False, True), (0.25, False, True), (1e12, False, True),
    (0, False, False), (0, True, True), (0.0, True, True), (-1e-9, True, False),
    (math.nan, True, False), (math.inf, False, False), (-math.inf, True, False),
    (True, False, False), (False, True, False), ("1", False, False), (None, True, False),
])
def test_is_finite_number(value, zero_ok, expected):
    assert is_finite_number(value, zero_ok=zero_ok) is expected


def test_finite_number_names_the_option_the_unit_and_what_else_would_do():
    assert finite_number("timeout", 2.5) == 2.5
    with pytest.raises(ValueError, match=r"^quotas\['\*'\] must be a finite number of calls per "
                                         r"second \(above 0\), not nan$"):
        finite_number("quotas['*']", math.nan, "calls per second")
    with pytest.raises(ValueError, match=r"^idle_timeout must be None \(off\), or a finite "
                                         r"number of seconds \(0 or more\), not -1$"):
        finite_number("idle_timeout", -1, zero_ok=True, off="None (off)")


def test_count_names_the_option_its_least_value_and_whether_none_would_do():
    assert count("business_queue", 0, 0) == 0 and count("max_in_flight", None, none_ok=True) is None
    with pytest.raises(ValueError, match=r"^business_threads must be an integer of at least 1, "
                                         r"not 2\.5$"):
        count("business_threads", 2.5)
    with pytest.raises(ValueError, match=r"^max_connections must be None \(no limit\) or an "
                                         r"integer of at least 1, not 0$"):
        count("max_connections", 0, none_ok=True)
    for wrong in (True, None, "3", -1):
        with pytest.raises(ValueError):
            count("pause_reading_at", wrong, 2)
