"""pytest-benchmark suite: thrift binary encode/decode, octo_core vs its peers.

Run with::

    python -m pytest benchmarks/bench_codec.py --benchmark-enable

(the project's ``addopts`` disable benchmarks by default; without
``--benchmark-enable`` every benchmark runs once, as a correctness test).
Payloads, peers and the exact calls come from ``octo_core.bench.codec``, the
module behind ``octo bench codec``; results are grouped per (payload, op), so
each group's table compares the four implementations directly.
"""
from __future__ import annotations

from typing import Any

import pytest

from octo_core.bench import codec as bench

PEERS = [pytest.param(name, id=bench.PEER_IDS[name]) for name in bench.PEER_NAMES]


def test_peers_agree() -> None:
    """Every available implementation encodes identical bytes and decodes equal values."""
    check = bench.verify(bench.get_peers())
    assert check.ok, check.broken


@pytest.mark.parametrize("op", bench.OPS)
@pytest.mark.parametrize("kind", bench.KINDS)
@pytest.mark.parametrize("peer_name", PEERS)
def test_codec(benchmark: Any, peer_name: str, kind: str, op: str) -> None:
    """Time ``peer_name`` doing ``op`` on payload ``kind``; the result must be the expected one."""
    peer = bench.get_peer(peer_name)
    if peer.missing:
        pytest.skip(f"{peer.name}: {peer.missing}")
    call = bench.make_call(peer, kind, op)
    benchmark.group = f"{kind} {op}"
    benchmark.extra_info["bytes"] = len(bench.reference_bytes(kind))
    result = benchmark(call.fn, *call.args)
    assert result == call.expected
