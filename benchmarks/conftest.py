"""pytest settings for the benchmark suites in this directory."""
from __future__ import annotations

import pytest
from pytest_benchmark.utils import parse_seconds

#: Minimum time of one pytest-benchmark round unless ``--benchmark-min-time`` is given.
#: pytest-benchmark's default (5 µs) lets a cold first call settle calibration at one
#: iteration per round, so a 0.2 µs encode would be timed together with the timer's own
#: overhead; 100 µs rounds batch sub-microsecond operations by the hundred.
MIN_ROUND_TIME = "0.0001"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Raise the default ``--benchmark-min-time`` to ``MIN_ROUND_TIME`` (an explicit flag wins)."""
    if not any(str(arg).startswith("--benchmark-min-time") for arg in config.invocation_params.args):
        config.option.benchmark_min_time = parse_seconds(MIN_ROUND_TIME)
