"""Metrics, the Prometheus exposition, heartbeat load info, and tracing.

After a known sequence of calls the server's and the client's metrics count
exactly what happened; ``prometheus_text`` is valid exposition text; a
ScannerHeartbeat reply carries LoadInfo with the called methods; a trace and the
``globalContext`` cross two hops (edge -> A -> B) with a new span per hop.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import math
import re
import socket
import struct
import time
import types
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from thriftpy2.thrift import TMessageType

import octo_core
from octo_core import codec, context, dispatch, protocol
from octo_core.auth import Authenticator, StaticTokens
from octo_core.cluster.breaker import BreakerState
from octo_core.context import Span, add_span_hook, current_span, global_context
from octo_core.errors import ApplicationError, CallTimeout, SecurityError, ServiceError, Status
from octo_core.metrics import BOUNDS, Metrics, RecentRates, prometheus_text
from octo_core.protocol import MessageType, NodeStatus
from octo_core.transport import http
from octo_core.transport.http import serve_metrics

from wire_helpers import (CLIENT_APPKEY, SERVER_APPKEY, Echo, EchoError, EchoHandler,
                          async_client, deaf, decode_body, echo_services, fake_server,
                          frames_read, framed_request, fresh_throttle, raw_connection, run, serving,
                          short_tmpdir,
                          unified_request, wait_until, watchdog)  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("watchdog")

TOKEN = "metrics-test-token"
NO_BREAKER = {"consecutive_failures": 10 ** 9, "min_calls": 10 ** 9}


# --- a Prometheus text parser (strict enough to catch broken output) ----------------

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
SAMPLE = re.compile(rf"^({NAME})(\{{(?:{LABEL}(?:,{LABEL})*)?\}})? (\S+)$")
LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def parse_prometheus(text: str) -> Tuple[Dict[str, str], List[Tuple[str, Dict[str, str], float]]]:
    """``({family: type}, [(name, labels, value)])``; fails on any malformed line."""
    assert text.endswith("\n")
    types: Dict[str, str] = {}
    samples = []
    for number, line in enumerate(text[:-1].split("\n"), 1):
        if line.startswith("#"):
            parts = line.split(" ", 3)
            assert parts[1] in ("HELP", "TYPE"), f"line {number}: {line!r}"
            if parts[1] == "TYPE":
                assert parts[3] in ("counter", "gauge", "histogram", "summary", "untyped")
                types[parts[2]] = parts[3]
            continue
        match = SAMPLE.match(line)
        assert match, f"line {number} is not `name{{labels}} value`: {line!r}"
        name, labels, value = match.groups()
        pairs = {k: unescape(v) for k, v in LABEL_PAIR.findall(labels or "")}
        number_value = float(value)            # also accepts +Inf / NaN spellings
        family = re.sub(r"_(bucket|sum|count|total)$", "", name)
        assert name in types or family in types or f"{family}_total" in types, \
            f"line {number}: sample {name} before its # TYPE"
        samples.append((name, pairs, number_value))
    return types, samples


def check_histograms(samples) -> Dict[Tuple, Dict[str, float]]:
    """Buckets cumulative, ending in +Inf == _count; returns {series: {count, sum}}."""
    series: Dict[Tuple, Dict[str, Any]] = {}
    for name, labels, value in samples:
        if not name.startswith("octo_latency_seconds"):
            continue
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        entry = series.setdefault(key, {"buckets": []})
        if name.endswith("_bucket"):
            entry["buckets"].append((labels["le"], value))
        elif name.endswith("_count"):
            entry["count"] = value
        elif name.endswith("_sum"):
            entry["sum"] = value
    for key, entry in series.items():
        buckets = entry["buckets"]
        assert buckets and buckets[-1][0] == "+Inf", key
        bounds = [math.inf if le == "+Inf" else float(le) for le, _ in buckets]
        assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds), key
        counts = [count for _, count in buckets]
        assert counts == sorted(counts), f"{key}: buckets are not cumulative: {counts}"
        assert counts[-1] == entry["count"], key
        assert entry["sum"] >= 0
    return series


# --- exact counts after a known sequence -------------------------------------------

def test_server_and_client_count_exactly_what_happened():
    n_ok, m_declared, k_undeclared, r_refused, u_unknown = 7, 3, 2, 4, 2
    handler = EchoHandler()

    async def main():
        auth = Authenticator(StaticTokens({CLIENT_APPKEY: TOKEN}))
        options = dict(remote_appkey=SERVER_APPKEY, breaker=NO_BREAKER)
        async with serving(echo_services(handler), auth=auth) as server, \
                async_client(Echo, server.address, token=TOKEN, **options) as good, \
                async_client(Echo, server.address, token="wrong", **options) as bad, \
                async_client(Echo, server.address, token=TOKEN, service_name="Nope",
                             **options) as lost, \
                async_client(Echo, server.address, token=TOKEN, timeout=0.05,
                             **options) as hasty:
            for i in range(n_ok):
                assert await good.echo(f"e{i}") == f"e{i}"
            for _ in range(m_declared):
                with pytest.raises(EchoError):
                    await good.fail("declared")
            for _ in range(k_undeclared):
                with pytest.raises(ApplicationError):
                    await good.fail("undeclared")
            for _ in range(r_refused):
                with pytest.raises(SecurityError):
                    await bad.echo("x")
            for _ in range(u_unknown):
                with pytest.raises(ServiceError):
                    await lost.echo("x")
            with pytest.raises(CallTimeout):
                await hasty.slow("late", 300)
            await wait_until(lambda: handler.slow_finished == 1, what="the slow handler to end")
            await wait_until(lambda: server.stats()["Echo.slow"]["in_flight"] == 0)

            stats = server.stats()
            # calls counts the refused ones too; refused says how many of them there were
            assert stats["Echo.echo"]["calls"] == n_ok + r_refused
            assert stats["Echo.echo"]["refused"] == r_refused
            assert stats["Echo.echo"]["errors"] == {Status.SECURITY_EXCEPTION: r_refused}
            assert stats["Echo.fail"]["calls"] == m_declared + k_undeclared
            # a declared exception is a business answer, not an error
            assert stats["Echo.fail"]["errors"] == {Status.APPLICATION_EXCEPTION: k_undeclared}
            assert stats["Echo.slow"]["calls"] == 1 and stats["Echo.slow"]["errors"] == {}
            # a service name off the wire is not a label: every unknown service is one row
            assert not any(key.startswith("Nope") for key in stats)
            assert stats["(unknown).(unknown)"]["errors"] == {Status.SERVICE_EXCEPTION: u_unknown}
            # only refusals: no call ran, so there is no latency to tell
            unknown = stats.pop("(unknown).(unknown)")
            assert unknown["calls"] == unknown["refused"] == u_unknown
            assert unknown["p50"] is unknown["p90"] is unknown["p99"] is None
            for key, row in stats.items():
                assert row["in_flight"] == 0, key
                assert set(row) >= {"calls", "refused", "errors", "in_flight", "p50", "p90", "p99"}
                assert row["p50"] is not None and 0 <= row["p50"] <= row["p90"] <= row["p99"]
            # the slow handler ran ~300 ms: its percentile says so (within a bucket)
            assert stats["Echo.slow"]["p50"] >= 0.2

            good_stats = good.metrics.stats()
            assert good_stats["Echo.echo"] == {**good_stats["Echo.echo"], "calls": n_ok,
                                               "refused": 0, "errors": {}, "in_flight": 0}
            assert good_stats["Echo.fail"]["calls"] == m_declared + k_undeclared
            assert good_stats["Echo.fail"]["errors"] == {Status.APPLICATION_EXCEPTION: k_undeclared}
            bad_stats = bad.metrics.stats()
            # a client counts each call it made as run: its caller waited the round trip
            assert bad_stats["Echo.echo"]["calls"] == r_refused
            assert bad_stats["Echo.echo"]["refused"] == 0 and bad_stats["Echo.echo"]["p50"] > 0
            assert bad_stats["Echo.echo"]["errors"] == {Status.SECURITY_EXCEPTION: r_refused}
            lost_stats = lost.metrics.stats()
            assert lost_stats["Nope.echo"]["errors"] == {Status.SERVICE_EXCEPTION: u_unknown}
            hasty_stats = hasty.metrics.stats()
            assert hasty_stats["Echo.slow"]["errors"] == {Status.TRANSPORT_EXCEPTION: 1}
            for client in (good, bad, lost, hasty):
                for key, row in client.metrics.stats().items():
                    assert row["in_flight"] == 0, key
                    assert row["p50"] is not None and row["p50"] <= row["p90"] <= row["p99"]

            # the exposition of both sides parses and agrees with stats()
            text = prometheus_text(server.metrics, good.metrics)
            types, samples = parse_prometheus(text)
            assert types == {"octo_calls_total": "counter", "octo_refused_total": "counter",
                             "octo_errors_total": "counter", "octo_in_flight": "gauge",
                             "octo_latency_seconds": "histogram"}
            calls = {(l["side"], l["service"], l["method"]): v for name, l, v in samples
                     if name == "octo_calls_total"}
            assert calls[("server", "Echo", "echo")] == n_ok + r_refused
            assert calls[("server", "Echo", "fail")] == m_declared + k_undeclared
            assert calls[("client", "Echo", "echo")] == n_ok
            assert calls[("client", "Echo", "fail")] == m_declared + k_undeclared
            refused = {(l["side"], l["service"], l["method"]): v for name, l, v in samples
                       if name == "octo_refused_total"}
            assert refused[("server", "Echo", "echo")] == r_refused
            assert refused[("server", "(unknown)", "(unknown)")] == u_unknown
            assert refused[("client", "Echo", "echo")] == 0
            errors = {(l["side"], l["method"], l["status"]): v for name, l, v in samples
                      if name == "octo_errors_total"}
            assert errors[("server", "echo", "7")] == r_refused
            assert errors[("server", "fail", "1")] == k_undeclared
            assert errors[("client", "fail", "1")] == k_undeclared
            series = check_histograms(samples)
            server_echo = (("method", "echo"), ("service", "Echo"), ("side", "server"))
            # the histogram holds the calls that ran: the refused ones are not in it
            assert series[server_echo]["count"] == n_ok
            unknown_series = (("method", "(unknown)"), ("service", "(unknown)"), ("side", "server"))
            assert series[unknown_series]["count"] == 0
            assert all(v == 0 for name, _, v in samples if name == "octo_in_flight")

    run(main())


def test_a_call_its_caller_gave_up_on_is_counted_as_failed_not_served():
    """A call cancelled by its caller (``asyncio.wait_for``) took no answer: the
    client's metrics count it with status 4, as a timeout, not as a success."""
    async def main() -> Dict[str, Any]:
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address) as client:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.slow("given up", 2000), 0.05)
            return client.metrics.stats()["Echo.slow"]

    row = run(main())
    assert row["calls"] == 1 and row["errors"] == {Status.TRANSPORT_EXCEPTION: 1}


def test_prometheus_text_of_hand_made_metrics():
    metrics = Metrics("server")
    awkward = 'we"ird\\svc'
    for seconds in (0.0, 1e-7, 3e-6, 0.001, 0.001, 0.25, 2.0, 1e6):
        stats = metrics.started(awkward, "m")
        Metrics.finished(stats, seconds, 0 if seconds < 1 else Status.TRANSPORT_EXCEPTION)
    metrics.refused("Svc", "refused", Status.RPC_EXCEPTION)
    in_flight = metrics.started("Svc", "running")
    types, samples = parse_prometheus(prometheus_text(metrics))
    series = check_histograms(samples)
    awkward_key = (("method", "m"), ("service", awkward), ("side", "server"))
    assert series[awkward_key]["count"] == 8
    assert series[awkward_key]["sum"] == pytest.approx(0.0 + 1e-7 + 3e-6 + 0.002 + 0.25 + 2 + 1e6)
    in_flights = {l["method"]: v for name, l, v in samples if name == "octo_in_flight"}
    assert in_flights["running"] == 1 and in_flights["m"] == 0
    errors = {(l["method"], l["status"]): v for name, l, v in samples if name == "octo_errors_total"}
    assert errors == {("m", "4"): 2, ("refused", "3"): 1}
    refused = {l["method"]: v for name, l, v in samples if name == "octo_refused_total"}
    assert refused == {"m": 0, "refused": 1, "running": 0}
    calls = {l["method"]: v for name, l, v in samples if name == "octo_calls_total"}
    assert calls == {"m": 8, "refused": 1, "running": 0}
    assert series[(("method", "refused"), ("service", "Svc"), ("side", "server"))]["count"] == 0
    # an empty registry is valid too
    parse_prometheus(prometheus_text(Metrics("client")))
    del in_flight


def test_prometheus_text_sums_registries_of_one_side_into_one_series_each():
    """Two clients of one service: each of their series appears once, holding both
    clients' calls (a series twice in a scrape is refused), and neither client's
    own metrics change."""
    first, second, server = Metrics("client"), Metrics("client"), Metrics("server")
    for metrics, seconds in ((first, 0.001), (second, 0.001), (second, 0.5), (server, 0.001)):
        Metrics.finished(metrics.started("S", "m"), seconds, Status.TRANSPORT_EXCEPTION)
    second.refused("S", "m", Status.RPC_EXCEPTION)
    running = first.started("S", "m")
    types, samples = parse_prometheus(prometheus_text(server, first, second))
    seen = [(name, tuple(sorted(labels.items()))) for name, labels, _ in samples]
    assert len(seen) == len(set(seen)), "a series appears twice"
    values = {(name, labels["side"], labels.get("status")): value for name, labels, value in samples
              if "le" not in labels}
    assert values[("octo_calls_total", "client", None)] == 4
    assert values[("octo_refused_total", "client", None)] == 1
    assert values[("octo_errors_total", "client", "4")] == 3
    assert values[("octo_errors_total", "client", "3")] == 1
    assert values[("octo_in_flight", "client", None)] == 1
    assert values[("octo_latency_seconds_sum", "client", None)] == pytest.approx(0.502)
    assert values[("octo_calls_total", "server", None)] == 1
    series = check_histograms(samples)
    assert series[(("method", "m"), ("service", "S"), ("side", "client"))]["count"] == 3
    assert first.stats()["S.m"]["calls"] == 1 and second.stats()["S.m"]["calls"] == 3
    del running


def test_every_latency_series_has_the_same_buckets_whatever_its_calls():
    """PromQL sums histograms by ``le`` across instances and interpolates within
    the bucket below a rank: a bound one series leaves out reads as no calls
    there (a sum undercounted, 2x off at p75 with two instances) or as 0 s. So
    every series, and every scrape, has the same bounds."""
    one, other = Metrics("server"), Metrics("server")
    for _ in range(3):
        finish(one, 0.001)
    finish(other, 0.010)
    other.refused("S", "refused", Status.RPC_EXCEPTION)   # a series with no call that ran
    bounds_of: Dict[Tuple, List[Tuple[float, float]]] = {}
    for name, text in (("one", prometheus_text(one)), ("other", prometheus_text(other)),
                       ("empty", prometheus_text(Metrics("client")))):
        for sample, labels, value in parse_prometheus(text)[1]:
            if sample == "octo_latency_seconds_bucket":
                bounds_of.setdefault((name, labels["method"]), []).append(
                    (float(labels["le"]), value))
    les = {key: [le for le, _ in pairs] for key, pairs in bounds_of.items()}
    assert set(les) == {("one", "m"), ("other", "m"), ("other", "refused")}
    assert les[("one", "m")] == les[("other", "m")] == les[("other", "refused")]
    assert len(les[("one", "m")]) > 20 and les[("one", "m")][-1] == math.inf
    for le, count in bounds_of[("one", "m")]:   # each the calls at most that long
        assert count == (3 if le >= 0.001 else 0), le
    for le, count in bounds_of[("other", "m")]:
        assert count == (1 if le >= 0.010 else 0), le


def finish(metrics: Metrics, seconds: float, status: int = 0, method: str = "m") -> None:
    """One call of ``S.method`` that ran for ``seconds``."""
    Metrics.finished(metrics.started("S", method), seconds, status)


def test_percentiles_track_the_latencies():
    metrics = Metrics("client")
    finish(metrics, 0.010)
    for _ in range(98):
        finish(metrics, 0.001)
    finish(metrics, 1.0)
    row = metrics.stats()["S.m"]
    assert row["calls"] == 100 and row["in_flight"] == 0 and row["refused"] == 0
    assert 0.001 / 1.2 <= row["p50"] <= 0.001 * 1.2
    assert row["p50"] <= row["p90"] <= row["p99"]
    assert row["p99"] <= 0.010 * 1.2
    assert Metrics("x").stats() == {}
    assert BOUNDS == tuple(sorted(BOUNDS))


def test_refusals_are_counted_but_kept_out_of_the_latencies():
    # an overloaded server refuses most calls at once: they are calls (and errors by
    # status), but p50/p99 stay those of the calls that ran, not fall towards 0 s
    metrics = Metrics("server")
    for _ in range(10):
        finish(metrics, 0.100)
    for _ in range(60):
        metrics.refused("S", "m", Status.RPC_EXCEPTION)
    for _ in range(30):   # admitted, then dropped unrun (deadline passed while queued)
        Metrics.unrun(metrics.started("S", "m"), Status.TRANSPORT_EXCEPTION)
    row = metrics.stats()["S.m"]
    assert row["calls"] == 100 and row["refused"] == 90 and row["in_flight"] == 0
    assert row["errors"] == {Status.RPC_EXCEPTION: 60, Status.TRANSPORT_EXCEPTION: 30}
    assert 0.100 <= row["p50"] == row["p99"] <= 0.100 * 1.2
    series = check_histograms(parse_prometheus(prometheus_text(metrics))[1])
    assert series[(("method", "m"), ("service", "S"), ("side", "server"))]["count"] == 10


def test_recent_rates_follow_the_calls_of_the_last_window():
    metrics = Metrics("server")
    rates = RecentRates(metrics, now=1000.0, window=10.0)
    assert rates.rates(1000.5) == {}
    now = 1000.0
    for _ in range(100):              # 10 calls/s for 10 s, the heartbeat asked each second
        now += 0.1
        finish(metrics, 0.001)
        if round(now * 10) % 10 == 0:
            rates.rates(now)
    assert rates.rates(now)["S.m"] == pytest.approx(10.0)
    metrics.refused("S", "other", Status.RPC_EXCEPTION)   # refusals are load too
    for _ in range(10):               # then quiet, still asked each second
        now += 1.0
        rates.rates(now)
    quiet = rates.rates(now + 1.0)
    assert quiet == {"S.m": 0.0, "S.other": pytest.approx(1 / 11)}
    assert rates.rates(now + 30.0) == {"S.m": 0.0, "S.other": 0.0}


def test_recent_rates_read_rarely_average_since_the_last_reading():
    metrics = Metrics("server")
    rates = RecentRates(metrics, now=0.0, window=10.0)
    for _ in range(3600):
        finish(metrics, 0.001)
    assert rates.rates(3600.0) == {"S.m": pytest.approx(1.0)}   # the first hour: 1/s
    assert rates.rates(7200.0) == {"S.m": 0.0}                  # an idle hour: none


def test_recent_rates_hold_a_few_samples_however_often_they_are_read():
    metrics = Metrics("server")
    rates = RecentRates(metrics, now=0.0, window=10.0)
    for tick in range(1, 10_001):     # read 100 times a second for 100 s
        if tick % 10 == 0:
            finish(metrics, 0.001)
        rates.rates(tick / 100.0)
    assert len(rates._samples) <= 10
    assert rates.rates(100.01) == {"S.m": pytest.approx(10.0, rel=0.05)}


def test_prometheus_text_survives_a_hostile_service_name():
    # the service name of a refused request comes straight off the wire: a newline
    # or quote in it must not break (or forge lines in) the exposition
    async def main():
        async with serving(echo_services()) as server, raw_connection(server.address) as raw:
            evil = 'Evil"}\nocto_calls_total{side="forged"} 999\n#'
            await raw.send(unified_request("echo", Echo.echo_args(text="x"), 1, service=evil))
            reply = await raw.read_frame()
            assert reply.header.responseInfo.status == Status.SERVICE_EXCEPTION
            types, samples = parse_prometheus(prometheus_text(server.metrics))
            assert not any(labels.get("side") == "forged" for _, labels, _ in samples)
            services = {labels.get("service") for _, labels, _ in samples}
            assert evil not in services and "(unknown)" in services
            # a hostile name that does reach the labels is escaped, not executed
            hostile = Metrics("server")
            hostile.refused(evil, "m", Status.SERVICE_EXCEPTION)
            types, samples = parse_prometheus(prometheus_text(hostile))
            assert not any(labels.get("side") == "forged" for _, labels, _ in samples)
            assert evil in {labels.get("service") for _, labels, _ in samples}

    run(main())


def test_unknown_service_names_do_not_grow_metrics_without_bound():
    # every distinct service name a peer invents must not become a new metric series
    # (memory and Prometheus cardinality): refusals for unknown services are bounded
    async def main():
        async with serving(echo_services()) as server, raw_connection(server.address) as raw:
            names = 3000
            batch = b"".join(unified_request("echo", Echo.echo_args(text="x"), i,
                                             service=f"Invented{i}") for i in range(names))
            await raw.send(batch)
            replies = await raw.read_frames(names, timeout=20)
            assert all(r.header.responseInfo.status == Status.SERVICE_EXCEPTION for r in replies)
            assert len(server.stats()) <= 1000, f"{len(server.stats())} metric series"

    run(main())


def test_a_request_whose_body_is_no_thrift_message_is_counted_as_refused():
    """A call to a hosted service whose body cannot be read as a message is
    refused with status 5, and counted so (under no method: none was read),
    as every other refusal."""
    async def main() -> Dict[str, Any]:
        async with serving(echo_services()) as server, raw_connection(server.address) as raw:
            header = protocol.request_header("Echo", 1, 2000,
                                             trace=protocol.TraceInfo(clientAppkey=CLIENT_APPKEY))
            not_a_message = b"\x80\x01\x00\x01\xff\xff\xff\xff"   # a name of length -1
            await raw.send(protocol.encode_unified(header, not_a_message) * 3)
            replies = await raw.read_frames(3)
            assert all(r.head.status == Status.PROTOCOL_EXCEPTION for r in replies)
            return server.stats()

    stats = run(main())
    assert stats == {"Echo.(unknown)": {**stats["Echo.(unknown)"], "calls": 3, "refused": 3,
                                        "errors": {Status.PROTOCOL_EXCEPTION: 3}}}


# --- heartbeat load info ------------------------------------------------------------

def test_scanner_heartbeat_carries_load_info_with_called_methods():
    async def main():
        async with serving(echo_services(), business_threads=5) as server, \
                async_client(Echo, server.address) as client:
            for _ in range(10):
                await client.echo("x")
            await client.ping()
            with pytest.raises(EchoError):
                await client.fail("declared")
            async with raw_connection(server.address) as raw:
                await raw.send(protocol.encode_unified(protocol.scanner_heartbeat_request(), b""))
                frame = await raw.read_frame()
            header = frame.header
            assert header.messageType == MessageType.SCANNER_HEARTBEAT
            beat = header.heartbeatInfo
            assert beat.appkey == SERVER_APPKEY and beat.status == NodeStatus.ALIVE
            load = beat.loadInfo
            assert load is not None
            assert load.threadNum == 5 and load.queueSize == 0
            qps = load.methodQpsMap
            assert set(qps) == {"Echo.echo", "Echo.ping", "Echo.fail"}
            assert all(isinstance(v, float) and v > 0 for v in qps.values())
            assert qps["Echo.echo"] > qps["Echo.ping"]        # 10 calls vs 1, same uptime
            assert qps["Echo.echo"] == pytest.approx(10 * qps["Echo.ping"])

    run(main())


def test_heartbeat_qps_is_the_recent_rate_not_a_lifetime_average(monkeypatch):
    # busy at first, then quiet past the window: the heartbeat's methodQpsMap falls
    # to 0 (an average since start would still report load); the server's clock is
    # moved on, not slept through
    skipped = [0.0]
    clock = types.SimpleNamespace(monotonic=lambda: time.monotonic() + skipped[0],
                                  time=time.time)
    monkeypatch.setattr(dispatch, "time", clock)   # (the heartbeat's: the call path's)

    async def qps_map(server) -> Dict[str, float]:
        async with raw_connection(server.address) as raw:
            await raw.send(protocol.encode_unified(protocol.scanner_heartbeat_request(), b""))
            return (await raw.read_frame()).header.heartbeatInfo.loadInfo.methodQpsMap

    async def main():
        async with serving(echo_services()) as server, \
                async_client(Echo, server.address) as client:
            for _ in range(10):
                await client.echo("x")
            assert (await qps_map(server))["Echo.echo"] > 0
            skipped[0] += 15.0     # quiet for longer than the window (10 s), asked once
            assert 0 < (await qps_map(server))["Echo.echo"] <= 10 / 15
            skipped[0] += 15.0     # and again: nothing since the last reading
            assert await qps_map(server) == {"Echo.echo": 0.0}
            await client.echo("x")
            skipped[0] += 15.0
            assert await qps_map(server) == {"Echo.echo": pytest.approx(1 / 15, rel=0.01)}

    run(main())


def test_heartbeat_before_any_call_has_an_empty_qps_map():
    async def main():
        async with serving(echo_services()) as server, raw_connection(server.address) as raw:
            await raw.send(protocol.encode_unified(protocol.scanner_heartbeat_request(), b""))
            load = (await raw.read_frame()).header.heartbeatInfo.loadInfo
            assert load is not None and not load.methodQpsMap

    run(main())


# --- tracing --------------------------------------------------------------------------

@contextlib.contextmanager
def recording_spans() -> Iterator[List[Dict[str, Any]]]:
    records: List[Dict[str, Any]] = []

    def hook(side: str, service: str, method: str, span: Span):
        record = {"side": side, "service": service, "method": method, "span": span,
                  "status": None}
        records.append(record)

        def end(status: int) -> None:
            record["status"] = status
        return end

    remove = add_span_hook(hook)
    try:
        yield records
    finally:
        remove()


def only(records, **match) -> Dict[str, Any]:
    found = [r for r in records if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, records)
    return found[0]


class SpanEcho(EchoHandler):
    """echo() answers with the span and globalContext the handler runs in (business thread)."""

    def echo(self, text: str) -> str:
        span = current_span()
        return json.dumps({"text": text, "span": list(span) if span else None,
                           "ctx": dict(global_context())})


def test_edge_calls_start_new_traces():
    async def main():
        with recording_spans() as records:
            async with serving(echo_services(SpanEcho())) as server, \
                    async_client(Echo, server.address) as client:
                assert current_span() is None
                first = json.loads(await client.echo("a"))
                second = json.loads(await client.echo("b"))
                with pytest.raises(ApplicationError):
                    await client.fail("undeclared")
            await asyncio.sleep(0)
        assert first["span"][0] != second["span"][0]
        for seen in (first, second):
            trace_id, span_id, _ = seen["span"]
            assert re.fullmatch(r"[0-9a-f]{16}", trace_id) and re.fullmatch(r"[0-9a-f]{16}",
                                                                             span_id)
            client_span = only(records, side="client", method="echo",
                               span=Span(trace_id, span_id, None))
            server_span = only(records, side="server", method="echo",
                               span=Span(trace_id, span_id, None))
            assert client_span["status"] == server_span["status"] == 0
        failed = [r for r in records if r["method"] == "fail"]
        assert {r["side"] for r in failed} == {"client", "server"}
        assert all(r["status"] == Status.APPLICATION_EXCEPTION for r in failed)
        assert failed[0]["span"].trace_id == failed[1]["span"].trace_id
        assert len({r["span"].trace_id for r in records}) == 3

    run(main())


class RelayA(EchoHandler):
    """Server A: echo() is a coroutine that adds a tag and asks server B."""

    def __init__(self) -> None:
        super().__init__()
        self.to_b: Optional[octo_core.AsyncClient] = None
        self.seen: List[Any] = []

    async def echo(self, text: str) -> str:
        self.seen.append((current_span(), dict(global_context())))
        with context.use({"hop": "A"}):
            answer = await self.to_b.echo(text)
        assert dict(global_context()).get("hop") is None    # use() ends with the block
        return answer


@pytest.mark.parametrize("trace_id, continued", [("a" * 32, True), ("t" * 20000, False)])
def test_a_trace_id_too_long_to_carry_on_begins_a_new_trace(trace_id, continued):
    """A caller's trace id of up to the whole 32 KiB a header holds would leave the
    relay's own calls no room in theirs (each failed: "header ... cannot be
    framed"); past 128 characters the relay begins a trace of its own."""
    async def main() -> None:
        a_handler = RelayA()
        async with serving(echo_services(EchoHandler(), name="EchoB")) as server_b, \
                serving(echo_services(a_handler)) as server_a, \
                async_client(Echo, server_b.address, service_name="EchoB") as a_to_b, \
                raw_connection(server_a.address) as conn:
            a_handler.to_b = a_to_b
            header = protocol.request_header("Echo", 1, 2000, trace=protocol.TraceInfo(
                clientAppkey=CLIENT_APPKEY, traceId=trace_id, spanId="s1"))
            await conn.send(protocol.encode_unified(header, codec.encode_message(
                "echo", TMessageType.CALL, 1, Echo.echo_args(text="relayed"))))
            assert decode_body(await conn.read_frame(), Echo)[3].success == "relayed"
        (span, _), = a_handler.seen
        assert (span.trace_id == trace_id) is continued
        assert len(span.trace_id) <= 128

    run(main())


def test_trace_and_global_context_cross_two_hops():
    async def main():
        a_handler = RelayA()
        with recording_spans() as records:
            async with serving(echo_services(SpanEcho(), name="EchoB"),
                               appkey="com.example.b") as server_b, \
                    serving(echo_services(a_handler), appkey="com.example.a") as server_a, \
                    async_client(Echo, server_b.address, appkey="com.example.a",
                                 service_name="EchoB") as a_to_b, \
                    async_client(Echo, server_a.address, appkey="com.example.edge") as edge:
                a_handler.to_b = a_to_b
                with context.use({"octo.swimlane": "lane-a", "tenant": "t1"}):
                    answer = json.loads(await edge.echo("two hops"))
                    assert dict(global_context()) == {"octo.swimlane": "lane-a", "tenant": "t1"}
                assert dict(global_context()) == {}
                # a second edge call without context: nothing of the first leaks into it
                plain = json.loads(await edge.echo("plain"))
        assert answer["text"] == "two hops"
        assert answer["ctx"] == {"octo.swimlane": "lane-a", "tenant": "t1", "hop": "A"}
        assert plain["ctx"] == {"hop": "A"}       # only what A itself added

        edge_span = only(records, side="client", service="Echo", method="echo",
                         span=records[0]["span"])["span"]
        trace = edge_span.trace_id
        assert edge_span.parent_id is None
        a_span = only(records, side="server", service="Echo",
                      span=Span(trace, edge_span.span_id, None))["span"]
        a_out = [r["span"] for r in records if r["side"] == "client" and r["service"] == "EchoB"
                 and r["span"].trace_id == trace]
        assert len(a_out) == 1
        a_out = a_out[0]
        assert a_out.span_id != a_span.span_id            # a new span for the new hop
        assert a_out.parent_id == a_span.span_id          # whose parent is A's span
        b_span = only(records, side="server", service="EchoB", span=records[3]["span"])["span"]
        assert b_span.trace_id == trace                   # same trace at B
        assert b_span.span_id == a_out.span_id            # B serves A's outbound span
        assert b_span.parent_id in (None, a_span.span_id)
        assert answer["span"][:2] == [trace, a_out.span_id]
        # what A's handler itself saw
        seen_span, seen_ctx = a_handler.seen[0]
        assert seen_span.trace_id == trace and seen_span.span_id == edge_span.span_id
        assert seen_ctx == {"octo.swimlane": "lane-a", "tenant": "t1"}
        # the second edge call is another trace all the way down
        assert plain["span"][0] != trace
        assert all(r["status"] == 0 for r in records)
        assert len(records) == 8

    run(main())


class TwiceToB(EchoHandler):
    """echo() asks server B twice: the spans of one request's calls, side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.to_b: Optional[octo_core.AsyncClient] = None

    async def echo(self, text: str) -> str:
        first = json.loads(await self.to_b.echo(text))
        second = json.loads(await self.to_b.echo(text))
        return json.dumps({"mine": list(current_span()), "b": [first["span"], second["span"]]})


@pytest.mark.parametrize("hooked", [True, False])
def test_a_call_that_came_without_a_trace_begins_one_its_calls_share(hooked):
    """Native thrift carries no trace: the call begins one at the server, so the
    calls its handler makes are children of one span, in one trace (not a trace
    each), and a span hook sees that server span too."""
    async def main():
        relay = TwiceToB()
        with recording_spans() if hooked else contextlib.nullcontext([]) as records:
            async with serving(echo_services(SpanEcho(), name="EchoB")) as server_b, \
                    serving(echo_services(relay)) as server_a, \
                    async_client(Echo, server_b.address, service_name="EchoB") as a_to_b, \
                    async_client(Echo, server_a.address, protocol="thrift") as native:
                relay.to_b = a_to_b
                answer = json.loads(await native.echo("no trace"))
        mine = Span(*answer["mine"])
        assert mine.parent_id is None and mine.trace_id and mine.span_id
        for trace_id, span_id, _ in answer["b"]:   # what B served: A's two calls
            assert trace_id == mine.trace_id
            if hooked:
                out = only(records, side="client", service="EchoB",
                           span=Span(trace_id, span_id, mine.span_id))
                assert out["status"] == 0
        assert answer["b"][0][1] != answer["b"][1][1]
        if hooked:
            served = only(records, side="server", service="Echo", method="echo")
            assert served["span"] == mine and served["status"] == 0

    run(main())


def test_a_call_without_context_runs_without_the_serving_loops():
    """A handler's context is a copy of the one the server's loop runs in, holding
    the caller's globalContext and span: a call that sends neither sees none (a
    trace of its own begins), not what that context itself holds."""
    async def main() -> Dict[str, Any]:
        async with serving(echo_services(SpanEcho())) as server, \
                raw_connection(server.address) as conn:
            await conn.send(unified_request("echo", Echo.echo_args(text="bare"), 1))
            reply = decode_body(await conn.read_frame(), Echo)[3]
        return json.loads(reply.success)

    def in_a_traced_context() -> Dict[str, Any]:
        # (no public setter: a server sets spans)
        context._CARRIED.set(({}, Span("0" * 16, "1" * 16)))
        with context.use({"loop": "tag"}):
            return run(main())

    seen = contextvars.copy_context().run(in_a_traced_context)
    trace_id, _, parent_id = seen.pop("span")
    assert trace_id != "0" * 16 and parent_id is None
    assert seen == {"text": "bare", "ctx": {}}


class CallerEcho(EchoHandler):
    """Echoes, keeping ``context.caller()`` as the handler (and a task it
    starts, and a ``use()`` block in it) saw it."""

    def __init__(self, plain: bool = False) -> None:
        super().__init__()
        self.seen: List[Any] = []
        if plain:
            self.echo = self._plain_echo   # type: ignore[method-assign]

    def _plain_echo(self, text: str) -> str:
        with context.use({"k": "v"}):
            self.seen.append(("plain", context.caller()))
        return text

    async def echo(self, text: str) -> str:
        async def in_a_task() -> Optional[context.Caller]:
            return context.caller()
        with context.use({"k": "v"}):
            self.seen.append(("coroutine", context.caller()))
        self.seen.append(("task", await asyncio.create_task(in_a_task())))
        return text


@pytest.mark.parametrize("plain", [False, True])
def test_a_handler_learns_who_called_and_when_they_stop_waiting(plain):
    handler = CallerEcho(plain)

    async def main() -> Tuple[str, str]:
        async with serving(echo_services(handler)) as server:
            async with async_client(Echo, server.address, timeout=3.0) as client:
                await client.echo("unified")
                local = next(iter(client._endpoints.values())).ready().transport \
                    .get_extra_info("sockname")
            async with raw_connection(server.address) as conn:   # native framed thrift
                await conn.send(framed_request("echo", Echo.echo_args(text="native"), 1))
                assert decode_body(await conn.read_frame(), Echo)[3].success == "native"
                native_local = conn.writer.get_extra_info("sockname")
        return f"{local[0]}:{local[1]}", f"{native_local[0]}:{native_local[1]}"

    assert context.caller() is None          # outside a handler
    octo_address, native_address = run(main())
    kinds = ["plain"] if plain else ["coroutine", "task"]
    unified, native = handler.seen[:len(kinds)], handler.seen[len(kinds):]
    assert [kind for kind, _ in unified] == kinds == [kind for kind, _ in native]
    for _, seen in unified:
        assert (seen.appkey, seen.address) == (CLIENT_APPKEY, octo_address)
        # the request's arrival plus the 3 s its header gave, never more
        assert seen.deadline is not None and 0 < seen.time_left() <= 3.0
    for _, seen in native:   # native thrift sends neither appkey nor timeout
        assert seen == context.Caller("", native_address, None)
        assert seen.time_left() is None


def test_a_caller_on_a_unix_socket_has_no_address():
    """A unix socket's peer has no address: the connection's name for it is the
    server's own socket path, which ``caller().address`` gave."""
    handler = CallerEcho(plain=True)

    async def main() -> None:
        with short_tmpdir() as tmp:
            async with serving(echo_services(handler), host=f"unix://{tmp}/s.sock") as server, \
                    async_client(Echo, server.address) as client:
                assert await client.echo("x") == "x"

    run(main())
    [(_, seen)] = handler.seen
    assert (seen.appkey, seen.address) == (CLIENT_APPKEY, "")


class _Relay(EchoHandler):
    """``echo`` calls ``backend``'s, after its own caller's deadline has passed with
    ``wait_out``, ``detached()`` with ``detach``; ``outcome`` keeps what that call gave."""

    def __init__(self, backend: str, wait_out: bool = False, detach: bool = False) -> None:
        super().__init__()
        self.backend, self.wait_out, self.detach = backend, wait_out, detach
        self.outcome: Any = None
        self.done = asyncio.Event()
        self.client: Any = None   # the client it called through

    async def echo(self, text: str) -> str:
        try:
            if self.wait_out:
                await asyncio.sleep(context.caller().time_left() + 0.05)
            async with async_client(Echo, self.backend, timeout=30.0) as backend:
                self.client = backend
                with context.detached() if self.detach else contextlib.nullcontext():
                    self.outcome = await backend.echo(text)
                    return self.outcome
        except Exception as exc:
            self.outcome = exc
            raise
        finally:
            self.done.set()


def test_a_handlers_calls_end_by_its_callers_deadline():
    """The deadline passes on: the back end's header carries the time the first
    caller left (2 s), not the relay's own client's 30 s."""
    backend = CallerEcho(plain=True)

    async def main() -> None:
        async with serving(echo_services(backend)) as back:
            async with serving(echo_services(_Relay(back.address))) as front, \
                    async_client(Echo, front.address, timeout=2.0) as client:
                assert await client.echo("hop") == "hop"

    run(main())
    [(_, seen)] = backend.seen
    assert seen.deadline is not None and 0 < seen.time_left() <= 2.0


@pytest.mark.parametrize("detach", [False, True])
def test_a_call_made_once_the_callers_deadline_passed_is_not_sent_unless_detached(detach):
    backend = CallerEcho(plain=True)

    relay: Any = None

    async def main() -> Any:
        nonlocal relay
        async with serving(echo_services(backend)) as back:
            relay = _Relay(back.address, wait_out=True, detach=detach)
            async with serving(echo_services(relay)) as front, \
                    async_client(Echo, front.address, timeout=0.2) as client:
                with pytest.raises(CallTimeout):
                    await client.echo("late")
                await asyncio.wait_for(relay.done.wait(), 10)
        return relay.outcome

    outcome = run(main())
    row = relay.client.metrics.stats()["Echo.echo"]   # counted as a call, failed or not
    assert row["calls"] == 1 and row["errors"] == ({} if detach else {4: 1})
    if detach:
        assert outcome == "late" and len(backend.seen) == 1
        [(_, seen)] = backend.seen
        assert seen.time_left() > 2.0            # its own client's 30 s, not what was left
    else:
        assert isinstance(outcome, CallTimeout) and not outcome.request_sent
        assert "detached()" in str(outcome) and outcome.inherited_deadline
        assert backend.seen == []


def test_a_relays_calls_cut_short_by_its_callers_deadline_open_no_breaker():
    """Callers with little time left make a relay's calls time out on a healthy
    backend: that says nothing of the backend, so its breaker stays closed (one
    timeout in a row would open it) and callers with time are served."""
    class Relay(EchoHandler):
        def __init__(self, backend: str) -> None:
            super().__init__()
            self.client = octo_core.AsyncClient(Echo, appkey=CLIENT_APPKEY, hosts=[backend],
                                                timeout=30.0,
                                                breaker=dict(consecutive_failures=1))

        async def echo(self, text: str) -> str:
            return await self.client.slow(text, 300)   # longer than a hurried caller waits

    async def main() -> None:
        async with serving(echo_services()) as back:
            relay = Relay(back.address)
            async with serving(echo_services(relay)) as front, \
                    async_client(Echo, front.address, timeout=0.1) as hurried, \
                    async_client(Echo, front.address, timeout=5.0) as patient:
                for _ in range(3):   # (its own timeout, or the relay's status 4 first)
                    with pytest.raises(CallTimeout):
                        await hurried.echo("late")
                assert await patient.echo("in time") == "in time"
                [node] = relay.client._cluster.router.nodes
                assert relay.client._cluster.breaker(node).state is BreakerState.CLOSED
            await relay.client.close()

    run(main())


async def _answer_to_echo(handler: EchoHandler, timeout_ms: int) -> Any:
    """The frame a server of ``handler`` answers a unified ``echo`` with, whose
    header gave ``timeout_ms``."""
    async with serving(echo_services(handler)) as server, \
            raw_connection(server.address) as conn:
        await conn.send(unified_request("echo", Echo.echo_args(text="x"), 1,
                                        timeout_ms=timeout_ms))
        return await conn.read_frame()


def test_a_handler_whose_inherited_deadline_passed_is_answered_as_timed_out(caplog):
    """A handler letting out the CallTimeout of a call cut by its own deadline is
    answered with status 4 (the caller gave up: a timeout, not the handler's bug),
    and no traceback is logged."""
    async def main() -> Any:
        async with serving(echo_services(EchoHandler())) as back:
            return await _answer_to_echo(_Relay(back.address, wait_out=True), timeout_ms=200)

    frame = run(main())
    assert frame.head.status == Status.TRANSPORT_EXCEPTION
    assert "deadline passed while it ran" in frame.head.message
    assert not [r for r in caplog.records if r.exc_info]


class _TimeoutsSeen(EchoHandler):
    """``echo`` calls ``backend`` (which never answers) with ``timeout`` (None: its
    client's 30 s) and keeps the ``CallTimeout`` it gets."""

    def __init__(self, backend: str, timeout: Optional[float]) -> None:
        super().__init__()
        self.backend, self.timeout = backend, timeout
        self.seen: List[CallTimeout] = []

    async def echo(self, text: str) -> str:
        async with async_client(Echo, self.backend, timeout=30.0) as backend:
            try:
                return await backend.call("echo", text, timeout=self.timeout)
            except CallTimeout as exc:
                self.seen.append(exc)
                raise


@pytest.mark.parametrize("timeout, inherited", [(None, True), (0.05, False)])
def test_a_call_timeout_says_whether_its_callers_deadline_ended_it(timeout, inherited):
    """A handler's call whose timeout was cut to its caller's deadline (0.3 s left
    of 30 s) times out with ``inherited_deadline``; one ended by its own, shorter,
    timeout does not."""
    async def main() -> _TimeoutsSeen:
        async with fake_server(deaf) as back:
            relay = _TimeoutsSeen(back, timeout)
            async with serving(echo_services(relay)) as front, \
                    raw_connection(front.address) as conn:
                await conn.send(unified_request("echo", Echo.echo_args(text="x"), 1,
                                                timeout_ms=300))
                await conn.read_frame()
        return relay

    [seen] = run(main()).seen
    assert seen.inherited_deadline is inherited


class _RaisesInherited(EchoHandler):
    async def echo(self, text: str) -> str:
        late = CallTimeout("no reply (cut to the caller's deadline)")
        late.inherited_deadline = True
        raise late


def test_a_timeout_cut_to_the_callers_deadline_is_answered_as_timed_out_by_any_clock(caplog):
    """The CallTimeout of a call cut to the caller's deadline is answered with
    status 4 even when the server's clock has not reached that deadline yet (a
    timer may fire a little early: uvloop's count whole milliseconds), not as
    the handler's bug (status 1, its traceback logged)."""
    frame = run(_answer_to_echo(_RaisesInherited(), timeout_ms=60_000))
    assert frame.head.status == Status.TRANSPORT_EXCEPTION
    assert not [r for r in caplog.records if r.exc_info]


def test_a_nodes_answer_that_the_deadline_passed_is_a_call_timeout():
    """A node's status-4 answer that the caller's deadline passed while the call ran
    is raised as a ``CallTimeout`` (the node's word, ``from_peer``), as the
    caller's own timer would have: which of the two comes first is a race."""
    async def main() -> None:
        async with serving(echo_services(_RaisesInherited())) as server, \
                async_client(Echo, server.address, timeout=5.0) as client:
            with pytest.raises(CallTimeout) as caught:
                await client.echo("x")
            assert caught.value.from_peer and caught.value.request_sent
            assert "deadline passed while it ran" in str(caught.value)

    run(main())


async def _refused_past_deadline() -> Any:
    """The frame a server answers a call with whose deadline (50 ms) passed while it
    waited for a business thread (the only one blocked meanwhile)."""
    handler = EchoHandler()
    async with serving(echo_services(handler), business_threads=1) as server, \
            raw_connection(server.address) as conn:
        await conn.send(unified_request("block", Echo.block_args(text="busy"), 1))
        assert await asyncio.to_thread(handler.entered.get, timeout=5) == "busy"
        await conn.send(unified_request("echo", Echo.echo_args(text="late"), 2, timeout_ms=50))
        await asyncio.sleep(0.2)
        handler.release.set()
        frames = await conn.read_frames(2)
        return next(frame for frame in frames if frame.head.sequence_id == 2)


def test_a_nodes_refusal_that_the_deadline_passed_before_the_call_ran_is_a_call_timeout():
    """A node's status-4 refusal of a call whose deadline passed before its handler
    started (it waited for a business thread) is a ``CallTimeout``, as the one that
    passed while the call ran: which comes first, it or the caller's own timer, is
    a race, and a relay that let out a bare TransportError was answered as its
    handler's bug (status 1, its traceback logged)."""
    refusal = run(_refused_past_deadline())
    assert refusal.head.status == Status.TRANSPORT_EXCEPTION

    async def answers_so(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for frame in frames_read(reader):
            writer.write(protocol.encode_unified(protocol.response_header(
                frame.head.sequence_id, refusal.head.status, refusal.head.message), b""))

    async def main() -> None:
        async with fake_server(answers_so) as address, \
                async_client(Echo, address, timeout=5.0) as client:
            with pytest.raises(CallTimeout) as caught:
                await client.echo("x")
            assert caught.value.from_peer

    run(main())


def test_a_relay_whose_backend_timed_out_by_the_deadline_is_answered_as_timed_out(caplog):
    """Three hops: the back end answers the relay that the deadline passed (status
    4) before the relay's own cut timeout fires. The relay lets that out: it is
    answered with status 4, as its own timeout would be, not as its handler's
    bug (status 1, its traceback logged)."""
    relay: Any = None

    async def main() -> Any:
        nonlocal relay
        async with serving(echo_services(_RaisesInherited())) as back:
            relay = _Relay(back.address)
            return await _answer_to_echo(relay, timeout_ms=5000)

    frame = run(main())
    assert isinstance(relay.outcome, CallTimeout) and relay.outcome.inherited_deadline
    assert frame.head.status == Status.TRANSPORT_EXCEPTION
    assert "deadline passed while it ran" in frame.head.message
    assert not [r for r in caplog.records if r.exc_info]


def test_concurrent_traces_do_not_mix():
    async def main():
        async with serving(echo_services(SpanEcho())) as server, \
                async_client(Echo, server.address) as client:
            async def one(i: int) -> Tuple[str, Dict[str, str]]:
                with context.use({"i": str(i)}):
                    seen = json.loads(await client.echo(str(i)))
                return seen["text"], seen["ctx"]
            results = await asyncio.gather(*(one(i) for i in range(100)))
            assert all(ctx == {"i": text} for text, ctx in results)

    run(main())


def test_span_hook_removal_and_hookless_calls():
    async def main():
        calls = []
        remove = add_span_hook(lambda *a: calls.append(a))   # returns None: no end callback
        try:
            async with serving(echo_services()) as server, \
                    async_client(Echo, server.address) as client:
                await client.echo("x")
                assert len(calls) == 2
                remove()
                await client.echo("y")
                assert len(calls) == 2
        finally:
            with contextlib.suppress(ValueError):
                remove()

    run(main())


@pytest.mark.parametrize("where", ["start", "end"])
@pytest.mark.parametrize("side", ["server", "client"])
def test_a_failing_span_hook_does_not_break_calls(side, where):
    # a tracer's bug is the tracer's problem: the call is still answered with its own
    # result, and no in-flight count (server admission, metrics) is left behind
    def hook(hook_side: str, service: str, method: str, span: Span):
        if hook_side == side and where == "start":
            raise RuntimeError("tracer bug at span start")
        if hook_side == side:
            def end(status: int) -> None:
                raise RuntimeError("tracer bug at span end")
            return end
        return None

    async def main():
        async with serving(echo_services(), max_in_flight=1) as server, \
                async_client(Echo, server.address, timeout=2.0) as client:
            remove = add_span_hook(hook)
            try:
                for i in range(3):
                    assert await client.echo(f"traced {i}") == f"traced {i}"
                    assert await client.slow(f"coroutine {i}", 1) == f"coroutine {i}"
            finally:
                remove()
            assert await client.echo("untraced") == "untraced"
            await wait_until(lambda: server._in_flight == 0, 2, "the server's in-flight count")
            for stats in (server.stats(), client.metrics.stats()):
                assert all(row["in_flight"] == 0 for row in stats.values()), stats

    run(main())


def test_a_span_hook_failing_on_every_call_is_logged_once_a_period(monkeypatch, caplog):
    """A hook that fails on what a peer sent (an OpenTelemetry bridge reading a
    trace id that is not hex) fails on every call: its failures are logged once
    a period, with the traceback, then with a count of those held back."""
    period_over = fresh_throttle(monkeypatch, "_HOOK_FAILED", context)

    def parses_ids(side: str, service: str, method: str, span: Span) -> None:
        int(span.trace_id, 16)   # (what a tracer taking 64-bit ids must do)

    async def main() -> None:
        async with serving(echo_services()) as server, raw_connection(server.address) as conn:
            for seq in range(2):
                for n in range(10):
                    trace = protocol.TraceInfo(clientAppkey=CLIENT_APPKEY, traceId="not hex\n",
                                               spanId="1")
                    header = protocol.request_header("Echo", n, 2000, trace=trace)
                    body = octo_core.codec.encode_message("echo", 1, n, Echo.echo_args(text="x"))
                    await conn.send(protocol.encode_unified(header, body))
                await conn.read_frames(10)
                if not seq:
                    period_over()

    remove = add_span_hook(parses_ids)
    try:
        with caplog.at_level(logging.ERROR, logger="octo_core.context"):
            run(main())
    finally:
        remove()
    failed = [r for r in caplog.records if "span hook" in r.getMessage()]
    assert len(failed) == 2
    assert failed[0].exc_info and "start of Echo.echo" in failed[0].getMessage()
    assert not failed[1].exc_info and "and 9 more" in failed[1].getMessage()
    assert all("\n" not in r.getMessage() for r in failed)   # the peer's id, escaped


async def _http_get(port: int, path: str) -> Tuple[bytes, str]:
    """GET ``path`` from the metrics endpoint: its status line and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], body.decode()


def test_prometheus_endpoint_serves_the_metrics_over_http():
    # Server(metrics_port=0) serves prometheus_text at /metrics; other paths are 404
    async def main():
        async with serving(echo_services(), metrics_port=0) as server, \
                async_client(Echo, server.address) as client:
            assert await client.echo("counted") == "counted"

            def get(path):
                return _http_get(server.metrics_port, path)

            status, body = await get("/metrics")
            assert status == b"HTTP/1.1 200 OK"
            types, samples = parse_prometheus(body)
            calls = {(labels["service"], labels["method"]): value for name, labels, value in samples
                     if name == "octo_calls_total"}
            assert calls[("Echo", "echo")] == 1
            assert await get("/other") == (b"HTTP/1.1 404 Not Found",
                                           "not found: try /metrics or /health\n")

    run(main())


def test_the_start_says_where_the_metrics_endpoint_listens(caplog):
    """With metrics_port=0 under serve_forever, the log line is all that tells the port."""
    caplog.set_level("INFO", logger="octo_core.server")

    async def main():
        async with serving(echo_services(), metrics_port=0) as server:
            url = f"http://127.0.0.1:{server.metrics_port}"
            assert f"; /metrics and /health on {url}" in caplog.text
            assert server.address in caplog.text
            assert (await _http_get(server.metrics_port, "/health"))[1] == "ALIVE\n"

    run(main())


class HeldEcho(EchoHandler):
    """``slow`` answers once the test lets it."""

    def __init__(self) -> None:
        super().__init__()
        self.go: Optional[asyncio.Event] = None

    async def slow(self, text: str, delay_ms: int) -> str:
        assert self.go is not None
        await self.go.wait()
        return text


def test_health_endpoint_says_alive_then_stopping_from_the_moment_a_stop_begins():
    handler = HeldEcho()

    async def main():
        handler.go = asyncio.Event()
        async with serving(echo_services(handler), metrics_port=0) as server, \
                async_client(Echo, server.address) as client:
            def get(path):
                return _http_get(server.metrics_port, path)

            assert await get("/health") == (b"HTTP/1.1 200 OK", "ALIVE\n")
            held = asyncio.ensure_future(client.slow("held", 0))
            await wait_until(lambda: server._in_flight == 1, 5, "the held call")
            stopping = asyncio.ensure_future(server.stop(grace=10))
            await wait_until(lambda: server._leaving, 5, "the stop")
            # in-flight calls still finish: the probe tells the balancer in front to go
            assert await get("/health") == (b"HTTP/1.1 503 Service Unavailable", "STOPPING\n")
            handler.go.set()
            assert await held == "held"
            await stopping

    run(main())


# --- the metrics endpoint under hostile clients ------------------------------------------

@contextlib.asynccontextmanager
async def _metrics_endpoint(render=lambda: "up 1\n"):
    server = await serve_metrics(render)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def _exchange(port: int, request: bytes) -> bytes:
    """The whole answer to ``request``; b"" when the server closed or reset unanswered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def test_metrics_request_with_bare_lf_line_endings_is_answered(monkeypatch):
    # a head that never "ends" would wait out this timeout, then get no answer
    monkeypatch.setattr(http, "READ_TIMEOUT", 30.0)

    async def main():
        async with _metrics_endpoint() as port:
            answer = await asyncio.wait_for(
                _exchange(port, b"GET /metrics HTTP/1.1\nHost: x\n\n"), 10)
            assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"up 1\n")
    run(main())


def test_a_scrape_beyond_the_cap_takes_the_place_of_the_oldest_head_still_coming(monkeypatch):
    # A few peers trickling request heads (a byte now and then, or none) held every
    # slot: health probes were refused for as long as they kept it up.
    monkeypatch.setattr(http, "READ_TIMEOUT", 30.0)

    async def main():
        async with _metrics_endpoint() as port:
            slow = [await asyncio.open_connection("127.0.0.1", port)
                    for _ in range(http.MAX_CONNECTIONS)]
            try:
                for _, writer in slow:
                    writer.write(b"GET /met")
                answer = await asyncio.wait_for(_exchange(port, b"GET /health HTTP/1.1\r\n\r\n"), 10)
                assert answer.startswith(b"HTTP/1.1 404 Not Found")   # (no health here)
                oldest, newest = slow[0][0], slow[-1][0]
                assert await asyncio.wait_for(oldest.read(), 10) == b""   # dropped for it
                slow[-1][1].write(b"rics HTTP/1.1\r\n\r\n")           # the others are served
                assert (await asyncio.wait_for(newest.read(), 10)).startswith(b"HTTP/1.1 200 OK")
            finally:
                for _, writer in slow:
                    writer.close()
    run(main())


@pytest.mark.parametrize("rules, served", [({"deny": ["127.0.0.0/8"]}, False),
                                            ({"allow": ["10.0.0.0/8"]}, True)])
def test_the_deny_list_keeps_its_peers_off_the_metrics_port_too(rules, served):
    # The metrics name every method hosted, which a denied peer may not learn on the
    # RPC port; the allow list says who may call: scrapers and probes are not callers.
    async def main():
        auth = Authenticator(StaticTokens({CLIENT_APPKEY: "t"}), **rules)
        async with serving(echo_services(), auth=auth, metrics_port=0) as server:
            for path in ("/metrics", "/health"):
                answer = await _exchange(server.metrics_port, f"GET {path} HTTP/1.1\r\n\r\n".encode())
                assert answer.startswith(b"HTTP/1.1 200 OK") if served else answer == b""
    run(main())


def test_a_scraper_that_resets_after_its_request_costs_the_log_nothing(caplog):
    # uvloop refuses a write on a transport the peer reset: each such peer logged an
    # "Unhandled exception" with its traceback, a line of log a connection at will.
    async def main():
        async with _metrics_endpoint() as port:
            for _ in range(20):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.connect(("127.0.0.1", port))
                sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
                sock.close()   # with a reset
            await wait_until(lambda: not _metrics_handlers(), what="the handlers to end")
            assert (await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")).endswith(b"up 1\n")
    with caplog.at_level(logging.ERROR):
        run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def _metrics_handlers() -> list:
    """The metrics endpoint's connection handlers still running."""
    return [t for t in asyncio.all_tasks() if "serve_metrics" in t.get_coro().__qualname__]


def _answer_began(sock: socket.socket) -> bool:
    """Whether the first bytes of an answer reached ``sock`` (non-blocking; left unread)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False


def test_metrics_connections_beyond_the_cap_are_refused_while_all_are_answered(monkeypatch):
    monkeypatch.setattr(http, "WRITE_TIMEOUT", 30.0)

    async def main():
        # far more than the socket buffers hold: each answer waits for its reader
        async with _metrics_endpoint(lambda: "x" * 8_000_000) as port:
            loop = asyncio.get_running_loop()
            readers = []
            try:
                for _ in range(http.MAX_CONNECTIONS):
                    sock = socket.socket()
                    readers.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
                    sock.setblocking(False)
                    await loop.sock_connect(sock, ("127.0.0.1", port))
                    sock.send(b"GET /metrics HTTP/1.1\r\n\r\n")   # and read nothing
                    await wait_until(lambda: _answer_began(sock), what="the answer to begin")
                # an extra connection is closed unanswered, not kept waiting; none of
                # the answers being sent is dropped for it
                assert await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n") == b""
                assert len(_metrics_handlers()) == http.MAX_CONNECTIONS
            finally:
                for sock in readers:
                    sock.close()
            # the slots free as they go: a scrape is served again
            answers: List[bytes] = []

            async def scrape_until_served():
                while not answers or not answers[-1]:
                    answers.append(await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
            await asyncio.wait_for(scrape_until_served(), 10)
            assert answers[-1].startswith(b"HTTP/1.1 200 OK")
    run(main())


def test_metrics_answer_to_a_client_that_never_reads_is_dropped(monkeypatch):
    monkeypatch.setattr(http, "WRITE_TIMEOUT", 0.2, raising=False)

    async def main():
        # far more than the socket buffers hold
        async with _metrics_endpoint(lambda: "x" * 8_000_000) as port:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
                sock.send(b"GET /metrics HTTP/1.1\r\n\r\n")   # and never read
                await wait_until(lambda: _metrics_handlers(), what="the handler to start")
                await wait_until(lambda: not _metrics_handlers(), timeout=10,
                                 what="the stalled answer to be dropped")
            finally:
                sock.close()
    run(main())

