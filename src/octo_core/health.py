"""``Scanner``: probes provider nodes and writes their status back to the registry.

One round, for each appkey:

1. list its nodes; STOPPED ones (an operator's decision) are neither probed nor touched;
2. probe the others concurrently: a ScannerHeartbeat (PROTOCOL.md §3) to nodes
   whose ``heartbeatSupport`` is 2 or 3 - the reply carries the node's own
   status - and a TCP connect to the rest;
3. probe every node that failed again, on a new connection, ``confirm_delay``
   later: a node is dead only when both probes fail;
4. the mass-failure guard: when more than ``mass_failure_ratio`` of the serving
   (ALIVE) nodes failed, the fault is more likely the scanner's or the
   network's: mark none of the failed nodes, log an error, and say so in the
   report. Only serving nodes count, on both sides of the ratio: a node already
   DEAD that stays dead is no new failure. The guard needs at least
   ``mass_failure_min_nodes`` serving nodes (default 2): a lone node's failure
   is all of them, and the guard would keep it ALIVE forever, while both of
   two failing at once is as likely the scanner's fault as with more;
5. write the changes: DEAD for the dead; for the living, the status a heartbeat
   reported, or ALIVE when a TCP probe finds a DEAD node listening again.

``octo scanner --registry URL --appkey A [--appkey B]`` runs ``main``.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from octo_core.checks import (argument, count, count_argument, finite_number, seconds_argument,
                              seconds_or_zero_argument)
from octo_core.errors import NotRegisteredError, OctoError, RegistryError, StatusChanged
from octo_core.protocol import (FrameDecoder, NodeStatus, encode_unified, scanner_heartbeat_request,
                               status_name)
from octo_core.registry import open_registry
from octo_core.registry.base import Registry, check_name
from octo_core.registry.node import HeartbeatSupport, Node
from octo_core.transport.address import connect, parse_address
from octo_core.transport.loop import new_event_loop

log = logging.getLogger("octo_core.health")

_HEARTBEAT_REQUEST = encode_unified(scanner_heartbeat_request(), b"")
_MAX_REPLY = 64 * 1024   # a heartbeat reply is tiny; refuse to buffer more
_PROBE_FAILURES = (OSError, asyncio.TimeoutError, OctoError)


class _BadReply(Exception):
    """The node answered, but not with a heartbeat reply (of its own appkey)."""


class _BadAddress(Exception):
    """The node's registered address cannot be connected to (port 70000, say)."""


def _ratio(name: str, value: float) -> float:
    """``value`` if it is a share between 0 and 1, else ``ValueError``."""
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
    return value


@dataclasses.dataclass
class AppkeyReport:
    """What one round found for one appkey."""

    appkey: str
    #: nodes the registry listed, and of them those probed (all but STOPPED ones)
    listed: int = 0
    probed: int = 0
    #: keys of the nodes that failed both probes (marked DEAD unless ``suspected_fault``)
    failed: List[str] = dataclasses.field(default_factory=list)
    #: key -> the status written to the registry this round
    changes: Dict[str, int] = dataclasses.field(default_factory=dict)
    #: too many failures at once: nothing was marked DEAD
    suspected_fault: bool = False
    #: why the nodes could not be listed (nothing was probed)
    error: Optional[str] = None


class Scanner:
    """Probes every node of ``appkeys`` each ``interval`` seconds (see the module docstring).

    ``timeout`` bounds one probe; at most ``concurrency`` probes run at once.
    ``mass_failure_ratio`` and ``mass_failure_min_nodes`` set the guard (step 4).
    ``last_report`` holds the last round's ``AppkeyReport`` per appkey.
    ``ValueError`` for a setting out of range: a zero timeout would mark every
    node DEAD, a negative interval would scan in a tight loop.
    """

    def __init__(self, registry: Registry, appkeys: Iterable[str], interval: float = 5.0,
                 timeout: float = 1.0, confirm_delay: float = 0.5,
                 mass_failure_ratio: float = 0.5, mass_failure_min_nodes: int = 2,
                 concurrency: int = 64) -> None:
        self.registry = registry
        self.appkeys = list(appkeys)
        self.interval = finite_number("interval", interval)
        self.timeout = finite_number("timeout", timeout)
        self.confirm_delay = finite_number("confirm_delay", confirm_delay, zero_ok=True)
        self.mass_failure_ratio = _ratio("mass_failure_ratio", mass_failure_ratio)
        self.mass_failure_min_nodes = count("mass_failure_min_nodes", mass_failure_min_nodes)
        self.last_report: Dict[str, AppkeyReport] = {}
        self._limit = asyncio.Semaphore(count("concurrency", concurrency))
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        """Scan every ``interval`` seconds until ``stop()``."""
        self._stopped.clear()
        while not self._stopped.is_set():
            await self.run_once()
            try:
                await asyncio.wait_for(self._stopped.wait(), self.interval)
            except asyncio.TimeoutError:
                pass

    def stop(self) -> None:
        """End ``run()`` after the current round."""
        self._stopped.set()

    async def run_once(self) -> Dict[str, AppkeyReport]:
        """One round over every appkey; returns (and keeps) the reports."""
        reports = await asyncio.gather(*(self._scan(appkey) for appkey in self.appkeys))
        self.last_report = {report.appkey: report for report in reports}
        return self.last_report

    # --- one appkey ------------------------------------------------------------------

    async def _scan(self, appkey: str) -> AppkeyReport:
        report = AppkeyReport(appkey)
        try:
            nodes = await self.registry.list(appkey)
        except Exception as exc:  # noqa: BLE001 - report it, try again next round
            report.error = repr(exc)
            log.warning("%s: cannot list the nodes: %r", appkey, exc)
            return report
        probed = [node for node in nodes if node.status != NodeStatus.STOPPED]
        report.listed, report.probed = len(nodes), len(probed)
        observed = await self._observe(probed)
        report.failed = [node.key for node in probed if observed[node.key] is None]
        report.suspected_fault = self._mass_failure(appkey, probed, observed)
        for node in probed:
            status = self._verdict(node, observed[node.key], report.suspected_fault)
            if status is not None and status != node.status:
                await self._write(appkey, node, status, report)
        return report

    def _mass_failure(self, appkey: str, probed: Sequence[Node],
                      observed: Dict[str, Optional[int]]) -> bool:
        """Did too many serving nodes fail at once (step 4)? Logs it when they did."""
        serving = [node for node in probed if node.status == NodeStatus.ALIVE]
        failed = sum(observed[node.key] is None for node in serving)
        if (len(serving) < self.mass_failure_min_nodes
                or failed <= self.mass_failure_ratio * len(serving)):
            return False
        log.error("%s: %d of %d serving nodes failed at once; suspecting the scanner or the "
                  "network, marking none of them dead", appkey, failed, len(serving))
        return True

    async def _observe(self, nodes: Sequence[Node]) -> Dict[str, Optional[int]]:
        """Each node's probed status, ``None`` for a node that failed twice."""
        first = await asyncio.gather(*(self._probe(node) for node in nodes))
        observed = {node.key: status for node, status in zip(nodes, first)}
        suspects = [node for node in nodes if observed[node.key] is None]
        if suspects:
            await asyncio.sleep(self.confirm_delay)
            second = await asyncio.gather(*(self._probe(node) for node in suspects))
            observed.update((node.key, status) for node, status in zip(suspects, second))
        return observed

    @staticmethod
    def _verdict(node: Node, observed: Optional[int], suspected_fault: bool) -> Optional[int]:
        """The status to store for ``node`` (``None``: leave it)."""
        if observed is None:
            return None if suspected_fault else NodeStatus.DEAD
        if _uses_heartbeat(node):
            # The node's own word, except STOPPED: that one is the operator's.
            return None if observed == NodeStatus.STOPPED else observed
        return NodeStatus.ALIVE if node.status == NodeStatus.DEAD else None

    async def _write(self, appkey: str, node: Node, status: int, report: AppkeyReport) -> None:
        try:
            # only from the status it saw: an operator's STOPPED (or a provider's own
            # change) that came during the round is theirs to keep
            await self.registry.update(appkey, node.key, status=status, if_status=node.status)
        except (NotRegisteredError, StatusChanged):   # unregistered, or changed, during the round
            return
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            log.warning("%s: cannot mark %s %s: %r", appkey, node.key,
                        NodeStatus(status).name, exc)
            return
        report.changes[node.key] = int(status)
        log.info("%s: %s %s -> %s", appkey, node.key, status_name(node.status), status_name(status))

    # --- probes ----------------------------------------------------------------------

    async def _probe(self, node: Node) -> Optional[int]:
        """The node's status if it answered (ALIVE for a TCP probe), ``None`` if not."""
        async with self._limit:
            probe = self._heartbeat(node) if _uses_heartbeat(node) else self._connect(node)
            try:
                return await asyncio.wait_for(probe, self.timeout)
            except (*_PROBE_FAILURES, _BadReply, _BadAddress) as exc:
                log.debug("probe of %s failed: %r", node.key, exc)
                return None

    async def _connect(self, node: Node) -> int:
        _, writer = await _open(node)
        writer.close()
        return NodeStatus.ALIVE

    async def _heartbeat(self, node: Node) -> int:
        reader, writer = await _open(node)
        try:
            writer.write(_HEARTBEAT_REQUEST)
            decoder = FrameDecoder(max_frame_size=_MAX_REPLY)
            while True:
                data = await reader.read(_MAX_REPLY)
                if not data:
                    raise ConnectionError("closed without answering the heartbeat")
                frames = decoder.feed(data)
                if frames:
                    return _heartbeat_status(frames[0].header, node.appkey)
        finally:
            writer.close()


def _uses_heartbeat(node: Node) -> bool:
    return node.heartbeatSupport in (HeartbeatSupport.SCANNER, HeartbeatSupport.BOTH)


async def _open(node: Node) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        address = parse_address(node.address)
    except ValueError as exc:   # this node's probe fails; the round goes on
        raise _BadAddress(str(exc)) from None
    if address.path is not None:
        return await asyncio.open_unix_connection(address.path)
    assert address.port is not None   # parse_address: no path, a port
    return await connect(asyncio.open_connection, address.host, address.port)


def _heartbeat_status(header: object, appkey: str) -> int:
    """The status a heartbeat reply reports; ``_BadReply`` unless it is a reply from
    ``appkey`` (another service now on the node's port says nothing about the node)."""
    beat = getattr(header, "heartbeatInfo", None)
    if getattr(header, "responseInfo", None) is None or beat is None:
        raise _BadReply("the reply carries no heartbeatInfo")
    if beat.appkey != appkey:
        raise _BadReply(f"the reply is from appkey {beat.appkey!r}, not {appkey!r}")
    try:
        return NodeStatus(beat.status)
    except ValueError:
        raise _BadReply(f"unknown node status {beat.status}") from None


# --- octo scanner ------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``octo scanner`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="octo scanner",
        description="Probe provider nodes and write their status back to the registry.")
    parser.add_argument("--registry", required=True, metavar="URL",
                        help="file:///dir or zk://host:port[,host:port][/chroot] (a memory:// "
                             "registry lives in one process: the scanner's would be empty)")
    parser.add_argument("--appkey", action="append", required=True, dest="appkeys",
                        metavar="APPKEY", type=argument(lambda text: check_name(text, "appkey")),
                        help="an appkey to scan (repeat for more)")
    parser.add_argument("--interval", type=seconds_argument, default=5.0,
                        help="seconds between rounds (default %(default)s)")
    parser.add_argument("--timeout", type=seconds_argument, default=1.0,
                        help="seconds per probe (default %(default)s)")
    parser.add_argument("--confirm-delay", type=seconds_or_zero_argument, default=0.5,
                        help="seconds before a failed node is probed again (default %(default)s)")
    parser.add_argument("--mass-failure-ratio", default=0.5,
                        type=argument(lambda text: _ratio("it", float(text))),
                        help="above this share (0 to 1) of serving nodes failing at once in "
                             "one appkey, mark none dead (default %(default)s)")
    parser.add_argument("--mass-failure-min-nodes", type=count_argument, default=2,
                        help="the guard applies to appkeys with at least this many "
                             "serving nodes (default %(default)s)")
    parser.add_argument("--once", action="store_true", help="run one round and exit")
    return parser


async def _serve(registry: Registry, args: argparse.Namespace) -> int:
    try:
        scanner = Scanner(registry, args.appkeys, interval=args.interval, timeout=args.timeout,
                          confirm_delay=args.confirm_delay,
                          mass_failure_ratio=args.mass_failure_ratio,
                          mass_failure_min_nodes=args.mass_failure_min_nodes)
        if args.once:
            reports = await scanner.run_once()
            for report in reports.values():
                if not report.listed and not report.error:   # likely a wrong registry or appkey
                    log.warning("%s: no nodes in %s", report.appkey, args.registry)
            return 1 if any(r.error or r.suspected_fault for r in reports.values()) else 0
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, scanner.stop)
        await scanner.run()
        return 0
    finally:
        await registry.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``octo scanner`` with ``argv``; returns the exit status (``--once``: 1 when a
    registry failed or a mass failure was suspected)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        registry = open_registry(args.registry)
    except (ValueError, RegistryError) as exc:   # a bad URL is a usage error too
        parser.error(f"argument --registry: {exc}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop = new_event_loop()
    try:
        return loop.run_until_complete(_serve(registry, args))
    finally:
        loop.close()
