"""The ``octo`` command.

``octo bench [TARGET] [--seconds S]`` runs the benchmarks that ship with
octo_core; with no TARGET it runs every one of them. Benchmarks are listed in
``BENCHMARKS``: adding one is one entry there.

``octo scanner --registry URL --appkey A ...`` runs the health scanner
(``octo_core.health``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import urllib.parse
from typing import Callable, Dict, List, Optional, Sequence, Tuple


def _bench_codec(args: argparse.Namespace) -> int:
    from octo_core.bench import codec

    return codec.run(seconds=args.seconds, rounds=args.rounds)


def _bench_rpc(args: argparse.Namespace) -> int:
    from octo_core.bench import rpc

    argv = ["--seconds", str(args.seconds)]
    if args.rounds:
        argv += ["--rounds", str(args.rounds)]
    return rpc.main(argv)


#: name -> (one-line description, runner). A runner takes the parsed ``octo bench``
#: arguments and returns an exit status (0 when everything checked out).
BENCHMARKS: Dict[str, Tuple[str, Callable[[argparse.Namespace], int]]] = {
    "codec": ("thrift binary encode/decode: octo_core vs thriftpy2 and Apache fastbinary",
              _bench_codec),
    "rpc": ("echo calls on loopback, server in its own process: octo_core vs thriftpy2, "
            "grpcio and a raw uvloop echo", _bench_rpc),
}


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):   # inf would overflow the round count
        raise argparse.ArgumentTypeError(f"must be a finite positive number, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``octo`` argument parser."""
    parser = argparse.ArgumentParser(prog="octo", description="octo_core command-line tools.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("scanner", add_help=False,
                        help="probe a registry's nodes and write their health back "
                             "(octo scanner --help)")
    bench = commands.add_parser(
        "bench", help="run benchmarks",
        description="Run octo_core's benchmarks. Targets: " + "; ".join(
            f"{name}: {desc}" for name, (desc, _) in BENCHMARKS.items()) + ".")
    bench.add_argument("target", nargs="?", choices=sorted(BENCHMARKS),
                       help="benchmark to run (default: all)")
    bench.add_argument("--seconds", type=_positive_float, default=1.0, metavar="S",
                       help="timing budget per measured row, in seconds (default: 1)")
    bench.add_argument("--rounds", type=_positive_int, default=None, metavar="N",
                       help="interleaved rounds per row, the best is kept "
                            "(default: one per 20 ms of --seconds, at least 5)")
    return parser


def _registry_problem(url: str, once: bool) -> Optional[str]:
    """Why the scanner, a process of its own, could not find a node in ``url``, if so."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "memory":
        return (f"{url}: a memory registry lives in one process, so the scanner's own "
                "never holds a node; use file:///dir or zk://")
    if parts.scheme == "file" and once and not os.path.isdir(parts.path):
        # (a long-running scanner may start before the first provider makes the directory)
        return f"{url}: no such directory"
    return None


def _scanner(argv: List[str]) -> int:
    """``octo scanner``: the scanner's parser and loop live with it (``health.main``);
    a registry it cannot scan from here is refused first, as a usage error."""
    from octo_core import health

    parser = health.build_parser()
    args = parser.parse_args(argv)
    problem = _registry_problem(args.registry, args.once)
    if problem:
        parser.error(f"argument --registry: {problem}")
    return health.main(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``octo`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["scanner"]:       # its own parser lives with the scanner
        return _scanner(argv[1:])
    args = parser.parse_args(argv)
    if args.command != "bench":
        parser.print_help(sys.stderr)
        return 2
    targets: List[str] = [args.target] if args.target else list(BENCHMARKS)
    status = 0
    for i, name in enumerate(targets):
        if i:
            print()
        status = max(status, BENCHMARKS[name][1](args))
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
