#!/usr/bin/env python
"""Worker processes, each calling in turn with its own blocking client: the web-worker pattern.

    python benchmarks/bench_workers.py                    # 1 and 16 workers, 3 rounds
    python benchmarks/bench_workers.py --workers 4,16 --seconds 3 --rounds 5

``bench_rpc`` gives a blocking client's calls in flight to threads of one
process. A deployment often has something else: N processes (pre-fork web
workers, say), each with its own client and one call at a time. Here each
system's clients run so, against its own library's server (``bench_rpc``'s
server processes and client drivers):

* ``octo-sync``: ``octo_core.Client`` against ``octo_core.Server`` (a
  coroutine handler), over the unified protocol;
* ``thriftpy2-sync``: ``make_client`` against ``make_server`` (a thread per
  connection), framed, cybin;
* ``apache-sync``: Apache Thrift's accelerated client against its
  ``TThreadedServer``, framed.

Each worker opens its client, says it is ready, and once all are, warms up and
then calls for the measured seconds; it writes its latencies to a file. The
rows: all workers' calls per second, p50/p99 over all their calls, the CPU per
call of the workers together and of the server. With ``--rounds`` > 1 each
cell shows its median round by calls/s. No timing is asserted; the smoke test
(``tests/test_bench_rpc.py``) runs a tiny matrix.
"""
from __future__ import annotations

import argparse
import array
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Sequence

try:
    from octo_core.bench import rpc
except ImportError:  # run from a source checkout without installing: use ../src
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src"))
    from octo_core.bench import rpc

SYSTEMS = (rpc.OCTO_SYNC, rpc.TP2_SYNC, rpc.APACHE_SYNC)
#: Seconds a worker has to open its client and answer a first call, and to report
#: once its measured seconds are over.
READY_TIMEOUT = 30.0


def worker(system: str, port: int, payload: str, warmup: float, seconds: float,
           latency_file: str) -> int:
    """A worker process: open the client, say ``READY``, wait for ``GO``, warm up,
    measure; print ``{"calls", "elapsed", "cpu"}`` and write the latencies."""
    driver = rpc._DRIVERS[system](port, rpc.make_message(rpc.PAYLOADS[payload]), 1)
    driver.open()
    try:
        print("READY", flush=True)
        if sys.stdin.readline().strip() != "GO":
            return 1
        driver.phase(warmup)
        cpu0 = rpc._process_cpu()
        latencies, elapsed = driver.phase(seconds)
        cpu = rpc._process_cpu() - cpu0
    finally:
        driver.close()
    with open(latency_file, "wb") as fh:
        array.array("q", latencies).tofile(fh)
    print(json.dumps({"calls": len(latencies), "elapsed": elapsed, "cpu": cpu}), flush=True)
    return 0


def measure(system: str, workers: int, payload: str, seconds: float,
            warmup: float) -> Dict[str, float]:
    """One cell: a fresh server process and ``workers`` worker processes."""
    with rpc.ServerProcess(rpc.SERVER_KIND[system]) as server, \
            tempfile.TemporaryDirectory(prefix="octo-workers-") as tmp:
        files = [os.path.join(tmp, f"latencies-{n}") for n in range(workers)]
        procs = [subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", system, str(server.port),
             payload, str(warmup), str(seconds), path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for path in files]
        try:
            for proc in procs:
                _expect(proc, "READY", READY_TIMEOUT)
            for proc in procs:
                proc.stdin.write("GO\n")   # type: ignore[union-attr]  # (a pipe)
                proc.stdin.flush()         # type: ignore[union-attr]
            time.sleep(warmup)   # the server's CPU over the measured seconds, as near as may be
            cpu0 = server.cpu()
            reports = [json.loads(_expect(proc, "{", seconds + READY_TIMEOUT)) for proc in procs]
            server_cpu = server.cpu() - cpu0
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        latencies = sorted(ns for path in files for ns in _read_latencies(path))
    calls = sum(r["calls"] for r in reports)
    if not calls:
        raise RuntimeError(f"{system}, {workers} workers: no call completed in {seconds}s")
    return {"calls_per_s": sum(r["calls"] / r["elapsed"] for r in reports),
            "p50_us": rpc._percentile(latencies, 0.50), "p99_us": rpc._percentile(latencies, 0.99),
            "client_cpu_us": sum(r["cpu"] for r in reports) * 1e6 / calls,
            "server_cpu_us": server_cpu * 1e6 / calls}


def _expect(proc: "subprocess.Popen[str]", prefix: str, timeout: float) -> str:
    """The worker's next line, which starts with ``prefix`` within ``timeout``
    seconds (else the worker failed or hangs). (A worker writes one line, then
    waits or ends: none is left in the pipe's buffer for ``select`` to miss.)"""
    stdout = proc.stdout
    assert stdout is not None   # (a pipe)
    if not select.select([stdout], [], [], timeout)[0]:
        raise RuntimeError(f"a worker said nothing within {timeout:g}s, not {prefix}...")
    line = stdout.readline()
    if not line.startswith(prefix):
        raise RuntimeError(f"a worker said {line!r} (exit {proc.poll()}), not {prefix}...")
    return line


def _read_latencies(path: str) -> array.array:
    found = array.array("q")
    with open(path, "rb") as fh:
        found.frombytes(fh.read())
    return found


def run(systems: Sequence[str], workers: Sequence[int], payload: str, seconds: float,
        warmup: float, rounds: int, quiet_wait: float) -> Dict[tuple, Dict[str, float]]:
    """Every (system, workers) cell, ``rounds`` times interleaved; each cell's median round."""
    measured: Dict[tuple, List[Dict[str, float]]] = {}
    for _ in range(rounds):
        for count in workers:
            for system in systems:
                if quiet_wait > 0:
                    rpc.wait_for_quiet(quiet_wait)
                measured.setdefault((system, count), []).append(
                    measure(system, count, payload, seconds, warmup))
    return {cell: sorted(found, key=lambda r: r["calls_per_s"])[len(found) // 2]
            for cell, found in measured.items()}


def report(results: Dict[tuple, Dict[str, float]]) -> str:
    """The table, and octo's calls/s ÷ each peer's with the same number of workers."""
    lines = [f"{'system':<15} {'workers':>7} {'calls/s':>10} {'p50 µs':>9} {'p99 µs':>9} "
             f"{'client CPU µs/call':>18} {'server CPU µs/call':>18}"]
    for (system, count), r in results.items():
        lines.append(f"{system:<15} {count:>7} {r['calls_per_s']:>10,.0f} {r['p50_us']:>9.1f} "
                     f"{r['p99_us']:>9.1f} {r['client_cpu_us']:>18.1f} {r['server_cpu_us']:>18.1f}")
    for (system, count), r in results.items():
        octo = results.get((rpc.OCTO_SYNC, count))
        if system != rpc.OCTO_SYNC and octo is not None:
            lines.append(f"octo-sync ÷ {system}, {count} worker{'s' * (count != 1)}: "
                         f"{octo['calls_per_s'] / r['calls_per_s']:.2f}× calls/s")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["--worker"]:
        system, port, payload, warmup, seconds, path = argv[1:]
        return worker(system, int(port), payload, float(warmup), float(seconds), path)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    parser.add_argument("--workers", default="1,16", help="comma-separated worker counts")
    parser.add_argument("--payload", default="10B", choices=list(rpc.PAYLOADS))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quiet-wait", type=float, default=10.0)
    options = parser.parse_args(argv)
    systems = [s for s in options.systems.split(",") if s]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system {', '.join(unknown)}")
    missing = {s: rpc.missing_reason(s) for s in systems}
    for system, why in missing.items():
        if why is not None:
            print(f"{system}: MISSING: {why}")
    results = run([s for s in systems if missing[s] is None],
                  [int(n) for n in options.workers.split(",")], options.payload,
                  options.seconds, options.warmup, options.rounds, options.quiet_wait)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
