#!/usr/bin/env python
"""End-to-end RPC benchmark: octo_core vs thriftpy2, grpcio and a raw uvloop echo.

A thin wrapper around ``octo_core.bench.rpc`` (where the systems, the
measurement and the report are defined)::

    python benchmarks/bench_rpc.py --seconds 3
    python benchmarks/bench_rpc.py --seconds 3 --rounds 2 --json /tmp/rpc.json
    python benchmarks/bench_rpc.py --systems octo,raw-uvloop --concurrency 1,64

Every cell starts its server in a separate process and stops it afterwards;
``--help`` lists the options.
"""
from __future__ import annotations

import os
import sys

try:
    from octo_core.bench import rpc
except ImportError:  # run from a source checkout without installing: use ../src
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src"))
    from octo_core.bench import rpc


if __name__ == "__main__":
    sys.exit(rpc.main(sys.argv[1:]))
