"""``octo bench codec``: runs, lists every implementation, passes its byte-equality check.

No timing assertions: only what the command prints and returns.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Tuple

import pytest

from octo_core import cli
from octo_core.bench import codec as bench


def test_bench_codec_prints_every_implementation(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["bench", "codec", "--seconds", "0.05"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "check: encoded bytes identical and decoded values equal" in out
    assert ": PASS" in out and "FAILED" not in out and "BROKEN" not in out
    table = out.split("case ", 1)[1].split("\ntargets", 1)[0]
    for kind in bench.KINDS:
        for op in bench.OPS:
            assert f"{kind} {op}" in table
    for name in bench.PEER_NAMES:
        assert name in table
    for peer in bench.get_peers():  # each available peer has 4 timed rows with a ratio
        rows = [line for line in table.splitlines() if f" {peer.name} " in line and "×" in line]
        assert len(rows) == (0 if peer.missing else len(bench.KINDS) * len(bench.OPS)), peer.name


def test_bench_without_target_runs_every_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    ran = []
    for name, (desc, _) in list(cli.BENCHMARKS.items()):
        monkeypatch.setitem(cli.BENCHMARKS, name, (desc, lambda args, n=name: ran.append(n) or 0))
    assert cli.main(["bench", "--seconds", "0.01"]) == 0
    assert ran == list(cli.BENCHMARKS)


@pytest.mark.parametrize("argv", [["bench", "codec", "--seconds", "0"], ["bench", "nope"],
                                  ["bench", "codec", "--seconds", "inf"],
                                  ["bench", "codec", "--seconds", "nan"]])
def test_bad_arguments_are_rejected(argv: list, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2


def test_missing_apache_is_reported_not_faked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "thrift", None)  # `import thrift` now fails
    peer = bench._make_apache()
    assert peer.missing and "not installed" in peer.missing
    peers = [bench.OctoCorePeer(), peer]
    check = bench.verify(peers, kinds=["small"])
    timings = bench.measure(peers, 0.01, rounds=1, kinds=["small"])
    table = bench.format_table(peers, timings, check)
    assert check.ok
    assert not any(key[0] == bench.APACHE for key in timings)
    assert f"{bench.APACHE:<18} {peer.missing}" in table


class _WrongBytesPeer(bench.OctoCorePeer):
    name = "wrong bytes"

    def encoder(self, obj: Any) -> Tuple[Callable[..., bytes], Tuple[Any, ...]]:
        return (lambda o: bench.octo_codec.encode(o)[:-1]), (obj,)


def test_broken_peer_is_flagged_and_not_timed() -> None:
    peers = [bench.OctoCorePeer(), bench.get_peer("cybin"), _WrongBytesPeer()]
    check = bench.verify(peers, kinds=["small"])
    assert list(check.broken) == [("wrong bytes", "small", "encode")]
    timings = bench.measure(peers, 0.01, rounds=1, kinds=["small"], skip=check.broken)
    assert ("wrong bytes", "small", "encode") not in timings
    assert ("wrong bytes", "small", "decode") in timings
    assert "BROKEN (not timed): encoded bytes differ" in bench.format_table(peers, timings, check)
