#!/usr/bin/env python
"""Registry benchmark: how fast a change reaches a consumer, and what 1000 nodes cost.

For each backend (memory://, file://, zk://)::

* propagation: a provider registry changes a node (weight and status changes,
  alternating); the time until a ``Directory`` subscriber on a second registry
  sees it, from the moment the change is issued (median and p99 over
  ``--changes`` changes issued at random moments, 3 nodes under the appkey);
* 1000 nodes under one appkey (``--nodes``): registering them, one ``list()``
  (median of 20), a new watch's first full delivery, propagation of one change
  (median of 20), and the CPU a watch burns per second while nothing changes.

Run::

    python benchmarks/bench_registry.py
    python benchmarks/bench_registry.py --changes 50 --nodes 1000 --zk 127.0.0.1:2181

Without ``--zk`` a ZooKeeper is started from Debian's ``zookeeper`` package
(``tests/zk.py``) on a free 127.0.0.1 port and stopped at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from typing import Callable, Dict, Iterator, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import octo_core  # noqa: F401
except ImportError:  # a source checkout without installing: use ../src
    sys.path.insert(0, os.path.join(HERE, os.pardir, "src"))

from octo_core.protocol import NodeStatus  # noqa: E402
from octo_core.registry import Directory, Node, Registry, open_registry  # noqa: E402
from octo_core.transport.loop import new_event_loop  # noqa: E402

APPKEY = "com.example.bench"
WAIT = 30.0   # the longest any single change may take before the run fails
IDLE_SECONDS = 5.0
# Changes come at random moments, not in step with a polling registry's rounds.
JITTER_SECONDS = 0.25


def percentile(samples: List[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


class Probe:
    """A Directory subscriber that wakes a waiter when a predicate on the nodes holds."""

    def __init__(self) -> None:
        self.random = random.Random(1)
        self.predicate: Callable[[List[Node]], bool] = lambda nodes: False
        self.event = asyncio.Event()
        self.seen_at = 0.0

    def __call__(self, nodes: List[Node], rules: list) -> None:
        if not self.event.is_set() and self.predicate(nodes):
            self.seen_at = time.perf_counter()
            self.event.set()

    async def change(self, issue: Callable[[], "asyncio.Future"],
                     predicate: Callable[[List[Node]], bool]) -> float:
        """Issue a change; seconds until the subscriber saw ``predicate`` hold."""
        await asyncio.sleep(self.random.uniform(0, JITTER_SECONDS))
        self.predicate = predicate
        self.event.clear()
        start = time.perf_counter()
        await issue()
        await asyncio.wait_for(self.event.wait(), WAIT)
        return self.seen_at - start


async def propagation(provider: Registry, directory: Directory, probe: Probe, key: str,
                      count: int) -> List[float]:
    """``count`` alternating weight/status changes of ``key``; their latencies."""
    samples = []
    for i in range(count):
        if i % 2:
            status = NodeStatus.DEAD if i % 4 == 1 else NodeStatus.ALIVE
            samples.append(await probe.change(
                lambda: provider.update(APPKEY, key, status=status),
                lambda nodes: any(n.key == key and n.status == status for n in nodes)))
        else:
            weight = 100 + i
            samples.append(await probe.change(
                lambda: provider.update(APPKEY, key, weight=weight),
                lambda nodes: any(n.key == key and n.weight == weight for n in nodes)))
    return samples


async def idle_cpu(seconds: float) -> float:
    """CPU seconds this whole process burns per second while nothing changes (the
    watch, and the provider side too: file TTL renewal, ZooKeeper pings)."""
    start = time.process_time()
    await asyncio.sleep(seconds)
    return (time.process_time() - start) / seconds


async def bench_backend(url: str, changes: int, nodes: int) -> Dict[str, float]:
    out: Dict[str, float] = {}
    async with open_registry(url) as provider, open_registry(url) as consumer:
        for port in range(3):
            await provider.register(Node(APPKEY, "127.0.0.1", 7000 + port))
        probe = Probe()
        async with Directory(consumer, APPKEY, refresh_interval=None) as directory:
            directory.subscribe(probe)
            samples = await propagation(provider, directory, probe, "127.0.0.1:7000", changes)
        out["p50"], out["p99"] = statistics.median(samples), percentile(samples, 0.99)

        start = time.perf_counter()
        await asyncio.gather(*(provider.register(Node(APPKEY, "10.0.0.1", 10000 + i))
                               for i in range(nodes)))
        out["register"] = time.perf_counter() - start
        listing = []
        for _ in range(20):
            start = time.perf_counter()
            listed = await consumer.list(APPKEY)
            listing.append(time.perf_counter() - start)
        assert len(listed) == nodes + 3, len(listed)
        out["list"] = statistics.median(listing)

        first = asyncio.Event()
        start = time.perf_counter()
        watch = consumer.watch(APPKEY, lambda found, rules: len(found) == nodes + 3 and first.set())
        await asyncio.wait_for(first.wait(), WAIT)
        out["watch"] = time.perf_counter() - start
        watch.cancel()

        probe = Probe()
        async with Directory(consumer, APPKEY, refresh_interval=None) as directory:
            directory.subscribe(probe)
            samples = await propagation(provider, directory, probe, "10.0.0.1:10000", 20)
            out["big_p50"] = statistics.median(samples)
            out["idle_cpu"] = await idle_cpu(IDLE_SECONDS)
    return out


@contextlib.contextmanager
def zookeeper(hosts: Optional[str]) -> Iterator[str]:
    if hosts:
        yield hosts
        return
    sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))
    from zk import ZooKeeper
    workdir = tempfile.mkdtemp(prefix="octo-bench-zk-")
    try:
        server = ZooKeeper(workdir)
        server.start()
        try:
            yield server.hosts
        finally:
            server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=50, help="changes timed per backend")
    parser.add_argument("--nodes", type=int, default=1000, help="nodes under one appkey")
    parser.add_argument("--zk", metavar="HOST:PORT", help="use this ZooKeeper (default: start one)")
    args = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="octo-bench-file-")
    results = {}
    try:
        with zookeeper(args.zk) as hosts:
            urls = {"memory://": f"memory://bench-{uuid.uuid4().hex}",
                    "file:// (poll 0.2 s)": f"file://{directory}",
                    "zk://": f"zk://{hosts}/bench-{uuid.uuid4().hex}"}
            for name, url in urls.items():
                loop = new_event_loop()
                try:
                    results[name] = loop.run_until_complete(
                        bench_backend(url, args.changes, args.nodes))
                finally:
                    loop.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"change -> Directory subscriber, {args.changes} changes, 3 nodes (ms):\n")
    print("| backend | median | p99 |")
    print("| --- | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {ms(r['p50'])} | {ms(r['p99'])} |")
    print(f"\n{args.nodes} nodes under one appkey (ms, except CPU):\n")
    print("| backend | register all | list() | watch: first delivery | change -> subscriber "
          "(median of 20) | idle watch CPU |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {ms(r['register'])} | {ms(r['list'])} | {ms(r['watch'])} | "
              f"{ms(r['big_p50'])} | {r['idle_cpu'] * 100:.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
