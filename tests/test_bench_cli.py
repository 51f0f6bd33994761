"""``octo bench codec``: runs, lists every implementation, passes its byte-equality check.
``octo bench``: its targets and their options; a closed stdout; ``octo --version``.
The example ``python/echo_server.py``: says it serves once bound, or why it cannot.

No timing assertions: only what the commands print and return.
"""
from __future__ import annotations

import argparse
import ast
import asyncio
import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, List, Tuple

import pytest

import octo_core
from octo_core import cli
from octo_core.bench import codec as bench
from octo_core.bench import rpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ECHO_SERVER = os.path.join(ROOT, "python", "echo_server.py")


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


def _record_runs(monkeypatch: pytest.MonkeyPatch) -> List[argparse.Namespace]:
    """Replace every benchmark's runner by one that records its arguments."""
    ran: List[argparse.Namespace] = []
    for name, benchmark in list(cli.BENCHMARKS.items()):
        monkeypatch.setitem(cli.BENCHMARKS, name,
                            benchmark._replace(run=lambda args: ran.append(args) or 0))
    return ran


def test_bench_without_target_runs_every_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    ran = _record_runs(monkeypatch)
    assert cli.main(["bench", "--seconds", "0.01"]) == 0
    assert [args.target for args in ran] == list(cli.BENCHMARKS)
    assert all(args.seconds == 0.01 and args.rounds is None for args in ran)
    rpc_args = ran[list(cli.BENCHMARKS).index("rpc")]    # the rpc benchmark's own defaults
    assert (rpc_args.systems, rpc_args.quiet_wait, rpc_args.json) == (list(rpc.SYSTEMS), 10.0, None)


def test_bench_rpc_takes_the_rpc_options(monkeypatch: pytest.MonkeyPatch) -> None:
    ran = _record_runs(monkeypatch)
    assert cli.main(["bench", "rpc", "--systems", "octo,raw-uvloop", "--payloads", "10B",
                     "--concurrency", "1,4", "--warmup", "0", "--quiet-wait", "0",
                     "--rounds", "2", "--seconds", "0.5"]) == 0
    [args] = ran
    assert (args.target, args.systems, args.payloads, args.concurrency, args.warmup,
            args.quiet_wait, args.rounds, args.seconds) == \
        ("rpc", ["octo", "raw-uvloop"], ["10B"], [1, 4], 0.0, 0.0, 2, 0.5)


@pytest.mark.parametrize("target", sorted(cli.BENCHMARKS))
def test_bench_options_given_before_the_target_stand(target: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ran = _record_runs(monkeypatch)
    cli.main(["bench", "--seconds", "3", "--rounds", "2", target])
    cli.main(["bench", target])
    assert [(a.seconds, a.rounds) for a in ran] == [(3.0, 2), (cli.DEFAULT_SECONDS, None)]


@pytest.mark.parametrize("target, options", [
    ("rpc", ["--systems", "--payloads", "--concurrency", "--quiet-wait", "--warmup", "--json",
             "--seconds", "--rounds"]),
    ("codec", ["--seconds", "--rounds"])])
def test_bench_target_help_lists_its_options(target: str, options: List[str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", target, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert out.startswith(f"usage: octo bench {target} ")
    assert cli.BENCHMARKS[target].description in " ".join(out.split())
    for option in options:
        assert f"  {option} " in out, option
    if target == "rpc":          # the rpc benchmark's server-child options stay hidden
        assert "--serve" not in out
    else:                        # (its --rounds said what it is to rpc too)
        assert "rpc" not in out


def test_octo_bench_rpc_and_the_rpc_module_list_the_same_options(
        capsys: pytest.CaptureFixture[str]) -> None:
    """One definition: ``octo bench rpc`` and ``python -m octo_core.bench.rpc`` both
    take (and list) every option of ``rpc.options_parser``."""
    options = [o for a in rpc.options_parser()._actions for o in a.option_strings]
    helps = []
    for show_help in (lambda: cli.main(["bench", "rpc", "--help"]), lambda: rpc.main(["--help"])):
        with pytest.raises(SystemExit):
            show_help()
        helps.append(capsys.readouterr().out)
    for option in options:
        assert all(f"  {option} " in text for text in helps), option


@pytest.mark.parametrize("option, value", [
    ("--warmup", "-1"), ("--warmup", "nan"), ("--warmup", "inf"),
    ("--quiet-wait", "-1"), ("--quiet-wait", "nan"), ("--quiet-wait", "inf"),
    ("--json", "/nonexistent/r.json")])
def test_bad_rpc_options_are_usage_errors_before_the_run(
        option: str, value: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    ran = _record_runs(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "rpc", option, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and ran == []
    [message] = [line for line in err.splitlines() if "error:" in line]
    assert f"argument {option}:" in message and value in message
    assert "Traceback" not in err


def test_rpc_json_path_is_created_before_the_run(tmp_path: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    ran = _record_runs(monkeypatch)
    path = tmp_path / "r.json"
    assert cli.main(["bench", "rpc", "--json", str(path)]) == 0
    assert path.exists() and ran[0].json == str(path)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"octo {importlib.metadata.version('octo_core')}\n"


def test_closed_stdout_ends_quietly_with_the_sigpipe_status() -> None:
    """`octo bench codec | head -1`: no traceback, 128 + SIGPIPE (not 1, a failed check)."""
    read_end, write_end = os.pipe()
    os.close(read_end)             # the reader is gone before the first byte is written
    try:
        done = subprocess.run([sys.executable, "-m", "octo_core", "bench", "codec",
                               "--seconds", "0.01"], stdout=write_end, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == cli.SIGPIPE_STATUS == 128 + signal.SIGPIPE
    assert done.stderr == ""


@pytest.mark.parametrize("argv", [["bench", "codec", "--seconds", "0"], ["bench", "nope"],
                                  ["bench", "codec", "--seconds", "inf"],
                                  ["bench", "codec", "--seconds", "nan"],
                                  ["bench", "rpc", "--systems", "octo", "--bogus"]])
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


# --- python/echo_server.py ------------------------------------------------------------

def _echo_server(*argv: str) -> "subprocess.Popen[str]":
    return subprocess.Popen([sys.executable, ECHO_SERVER, *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_echo_server_says_serving_once_bound_and_stops_on_sigterm() -> None:
    proc = _echo_server("0")
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving Echo on 127.0.0.1:"), line + proc.stderr.read()
        address = line.split()[3]                   # the bound port, not the 0 asked for
        echo = octo_core.load_idl(os.path.join(ROOT, "python", "echo.thrift"))
        with octo_core.Client(echo.Echo, appkey="com.example.caller", hosts=[address],
                              timeout=10.0) as client:
            assert client.echo("hi") == "hi"        # listening when it said so
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.communicate()


def test_echo_server_on_a_taken_port_says_so_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _echo_server(str(port))
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 1
    assert out == ""                                # never claimed to serve
    assert err == f"echo_server: cannot listen on 127.0.0.1:{port}: Address already in use\n"


# --- python/cluster.py ------------------------------------------------------------------

def test_cluster_example_routes_and_fails_over_as_it_says() -> None:
    """Lanes, locality and failover past dead nodes, end to end (its own registry,
    servers and client, in a temporary directory)."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "python", "cluster.py")],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answered = [ast.literal_eval(line.split(":", 1)[1].strip())
                for line in done.stdout.splitlines()]
    assert len(answered) == 3 and all(sum(tally.values()) == 200 for tally in answered)
    assert set(answered[0]) == {"bj-a", "bj-b"}   # bj1's: never the lane, nor the dead node
    assert answered[1] == {"blue": 200}
    assert answered[2] == {"sh-c": 200}            # every call failed over to the next IDC



# --- python/workers.py ------------------------------------------------------------------

def _workers(tmp_path: Any, count: int) -> Tuple["subprocess.Popen[str]", str, List[str]]:
    """workers.py with ``count`` processes and a registry in ``tmp_path``, once it says
    it serves: the process, the registry's URL, the addresses it printed."""
    registry = f"file://{tmp_path}"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "python", "workers.py"),
                             str(count), registry], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()   # type: ignore[union-attr]
    assert line.startswith(f"serving Echo from {count} processes ("), line + proc.stderr.read()
    addresses = line.split("(", 1)[1].split(")", 1)[0].split(", ")
    return proc, registry, addresses


def _registered(registry: str) -> List[str]:
    async def listed() -> List[str]:
        opened = octo_core.registry.open_registry(registry)
        try:
            return sorted(node.key for node in await opened.list("com.example.echo"))
        finally:
            await opened.close()
    return asyncio.run(listed())


def _worker_pids(parent: int) -> List[int]:
    """The parent's serving processes (not multiprocessing's resource tracker)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat, open(f"/proc/{entry}/cmdline") as cmd:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
                spawned = "spawn_main" in cmd.read()
        except (OSError, ValueError):
            continue
        if ppid == parent and spawned:
            pids.append(int(entry))
    return pids


def test_workers_example_serves_from_each_process_as_a_node_and_stops_them_all(
        tmp_path: Any) -> None:
    proc, registry, addresses = _workers(tmp_path, 2)
    try:
        assert len(set(addresses)) == 2              # a port each
        assert _registered(registry) == sorted(addresses)
        echo = octo_core.load_idl(os.path.join(ROOT, "python", "echo.thrift"))
        for address in addresses:                   # each process answers
            with octo_core.Client(echo.Echo, appkey="com.example.caller", hosts=[address],
                                  timeout=10.0) as client:
                assert client.echo("hi") == "hi"
        with octo_core.Client(echo.Echo, appkey="com.example.caller",
                              remote_appkey="com.example.echo", registry=registry,
                              timeout=10.0) as client:   # and callers find them there
            assert [client.echo(str(i)) for i in range(4)] == ["0", "1", "2", "3"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()   # type: ignore[union-attr]
        assert _registered(registry) == []           # each unregistered as it stopped
    finally:
        proc.kill()
        proc.communicate()


def test_workers_example_stops_every_process_when_one_dies(tmp_path: Any) -> None:
    proc = _workers(tmp_path, 2)[0]
    try:
        workers = _worker_pids(proc.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
        err = proc.stderr.read()   # type: ignore[union-attr]
        assert f"process {workers[0]} exited (status -9); stopping the others" in err
        assert not os.path.exists(f"/proc/{workers[1]}")   # stopped, and waited for
    finally:
        proc.kill()
        proc.communicate()


def test_workers_example_processes_stop_when_their_parent_is_killed(tmp_path: Any) -> None:
    proc, registry, _ = _workers(tmp_path, 2)
    try:
        workers = _worker_pids(proc.pid)
        assert len(workers) == 2
        proc.kill()                                  # no stop_all: the processes see it alone
        proc.wait(timeout=60)
        give_up = time.monotonic() + 60
        while _registered(registry) and time.monotonic() < give_up:
            time.sleep(0.1)                          # each stops (unregistering) on its own
        assert _registered(registry) == []
    finally:
        proc.kill()
        proc.communicate()
