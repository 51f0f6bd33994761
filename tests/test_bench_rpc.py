"""Smoke test of the RPC benchmark runner (``octo_core.bench.rpc``).

Runs a tiny matrix (octo_core, the codec-only floor and the raw uvloop echo, 1 and 4 calls in
flight, 0.2 s per cell) and checks that every cell produced calls and that
every server child process is gone afterwards; runs the thread-per-connection
peers (Apache Thrift's and thriftpy2's) the same way, and
``benchmarks/bench_workers.py`` (blocking clients in worker processes); runs
``octo bench rpc`` with its own options; checks the report's sections. No
timing assertions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import List

import pytest

from octo_core import cli
from octo_core.bench import rpc

SYSTEMS = (rpc.OCTO, rpc.CODEC_ONLY, rpc.RAW)
WORKER_SYSTEMS = (rpc.OCTO_SYNC, rpc.TP2_SYNC, rpc.APACHE_SYNC)   # bench_workers.py's
CONCURRENCIES = (1, 4)


def _server_children() -> List[int]:
    """PIDs of this process's children that are benchmark server processes."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me and b"octo_core.bench.rpc" in cmdline and b"--serve" in cmdline:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process reusing the PID
        return False
    return True


def test_runner_smoke() -> None:
    results = rpc.run(0.2, systems=SYSTEMS, payloads=("10B",), concurrencies=CONCURRENCIES,
                      warmup=0.05)
    cells = {(r.system, r.concurrency): r for r in results}
    assert set(cells) == {(s, c) for s in SYSTEMS for c in CONCURRENCIES}
    for (system, concurrency), r in cells.items():
        assert r.error is None and r.missing is None, (system, concurrency, r.error, r.missing)
        assert r.calls > 0 and r.calls_per_s > 0, r
        assert 0 < r.p50_us <= r.p99_us, r
        assert r.server_pid is not None
    # every server child is stopped and reaped
    assert not [r.server_pid for r in results if _alive(r.server_pid)]
    assert _server_children() == []
    report = rpc.format_report(results, 0.2, 0.05)
    for system in SYSTEMS:
        assert system in report
    assert "targets:" in report


@pytest.mark.parametrize("system", [rpc.APACHE_SYNC, rpc.TP2_SYNC])
def test_a_threaded_peer_runs_a_client_per_thread_against_its_own_server(system: str) -> None:
    results = rpc.run(0.2, systems=(system,), payloads=("10B",), concurrencies=(1, 3),
                      warmup=0.05)
    assert [(r.system, r.concurrency, r.connections) for r in results] == [
        (system, 1, 1), (system, 3, 3)]
    for r in results:
        assert r.error is None and r.missing is None, (r.error, r.missing)
        assert r.calls > 0 and 0 < r.p50_us <= r.p99_us, r
    assert _server_children() == []


def test_bench_workers_runs_each_system_with_worker_processes() -> None:
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bench_workers.py")
    done = subprocess.run(
        [sys.executable, script, "--workers", "2", "--seconds", "0.2", "--warmup", "0.05",
         "--rounds", "1", "--quiet-wait", "0"],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    table = [line.split() for line in done.stdout.splitlines()]
    rows = {row[0]: row for row in table if row[:1] and row[0] in WORKER_SYSTEMS
            and row[1].isdigit()}   # (not the ratio lines after the table)
    assert set(rows) == set(WORKER_SYSTEMS), done.stdout
    for row in rows.values():
        assert row[1] == "2" and float(row[2].replace(",", "")) > 0, row   # workers, calls/s
    assert "octo-sync ÷ thriftpy2-sync, 2 workers:" in done.stdout
    assert _server_children() == []


def test_octo_bench_rpc_runs_the_asked_cells_and_writes_json(
        tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "rpc.json"
    status = cli.main(["bench", "rpc", "--systems", f"{rpc.OCTO},{rpc.RAW}", "--payloads", "10B",
                       "--concurrency", "1", "--seconds", "0.1", "--warmup", "0",
                       "--quiet-wait", "0", "--json", str(path)])
    out = capsys.readouterr().out
    assert status == 0, out
    cells = [(r["system"], r["payload"], r["concurrency"])
             for r in json.loads(path.read_text())["results"]]
    assert cells == [(rpc.OCTO, "10B", 1), (rpc.RAW, "10B", 1)]
    assert "each cell: 0 s warm-up + 0.1 s measured" in out
    assert rpc.TP2_AIO not in out                  # not run: no section about it either
    assert _server_children() == []


def _ok(system: str, concurrency: int, calls_per_s: float) -> rpc.Result:
    return rpc.Result(system, "10B", concurrency, calls=100, seconds=1.0,
                      calls_per_s=calls_per_s, p50_us=10.0, p99_us=20.0)


def test_report_has_the_peer_ratios_only_with_their_rows() -> None:
    heading = "octo calls/s ÷ each peer's"
    without = [_ok(rpc.OCTO, 64, 3000.0), _ok(rpc.RAW, 64, 6000.0)]
    assert heading not in rpc.format_report(without)
    report = rpc.format_report(without + [_ok(rpc.TP2_AIO, 64, 1000.0),
                                          _ok(rpc.APACHE_SYNC, 64, 1500.0),
                                          _ok(rpc.APACHE_SYNC, 1, 1500.0)])
    table = report[report.index(heading):].splitlines()
    assert table[1].split() == ["payload", "in-flight", rpc.TP2_AIO, rpc.APACHE_SYNC]
    assert table[2].split() == ["10B", "64", "3.00×", "2.00×"]
    assert len(table) == 3 or not table[3].strip()   # no row for the cell octo lacks
