"""The ``octo`` command.

``octo bench [TARGET] [OPTIONS]`` runs the benchmarks that ship with octo_core;
with no TARGET it runs every one of them. Benchmarks are listed in
``BENCHMARKS``: adding one is one entry there (its options come from its own
parser, so ``octo bench TARGET --help`` lists them).

``octo scanner --registry URL --appkey A ...`` runs the health scanner
(``octo_core.health``).

``octo --version`` prints the installed version.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import signal
import sys
import urllib.parse
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

from octo_core.checks import is_finite_number

#: ``octo bench``'s --seconds default, which every target's own --seconds defers to.
DEFAULT_SECONDS = 1.0
#: The options ``octo bench`` takes before a target (and every target takes after it).
BENCH_OPTIONS = ("seconds", "rounds")
#: Exit status when stdout's reader went away (``octo bench | head -1``): 128 + SIGPIPE,
#: what a shell reports for a writer its closed pipe ended; 1 would read as "a
#: benchmark failed", which is what 1 means here.
SIGPIPE_STATUS = 128 + signal.SIGPIPE


def _number(text: str, zero_ok: bool) -> float:
    value = float(text)
    if not is_finite_number(value, zero_ok=zero_ok):
        # inf would overflow the round count or a timer; nan passes every comparison
        kind = "non-negative" if zero_ok else "positive"
        raise argparse.ArgumentTypeError(f"must be a finite {kind} number, got {text}")
    return value


def _positive_float(text: str) -> float:
    return _number(text, zero_ok=False)


def _non_negative_float(text: str) -> float:
    return _number(text, zero_ok=True)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


#: What ``--rounds`` is to each benchmark (``octo bench``, before a target, says both).
_CODEC_ROUNDS = ("interleaved rounds per row, the best is kept (default: one per 20 ms of "
                 "--seconds, at least 5)")
_RPC_ROUNDS = "measurements of the whole matrix, the median is kept (default: 1)"


def _timing_options(rounds: str = f"codec: {_CODEC_ROUNDS}; rpc: {_RPC_ROUNDS}"
                    ) -> argparse.ArgumentParser:
    """``--seconds`` and ``--rounds`` (its help: ``rounds``): ``octo bench``'s, and the
    codec benchmark's."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--seconds", type=_positive_float, default=DEFAULT_SECONDS, metavar="S",
                        help=f"timing budget per measured row, in seconds "
                             f"(default: {DEFAULT_SECONDS:g})")
    parser.add_argument("--rounds", type=_positive_int, default=None, metavar="N", help=rounds)
    return parser


def _codec_options() -> argparse.ArgumentParser:
    return _timing_options(_CODEC_ROUNDS)


def _rpc_options() -> argparse.ArgumentParser:
    from octo_core.bench import rpc

    return rpc.options_parser(seconds=DEFAULT_SECONDS)


def _bench_codec(args: argparse.Namespace) -> int:
    from octo_core.bench import codec

    return codec.run(seconds=args.seconds, rounds=args.rounds)


def _bench_rpc(args: argparse.Namespace) -> int:
    from octo_core.bench import rpc

    if args.rounds is None:   # octo bench's "each benchmark's own default"
        args.rounds = rpc.options_parser().get_default("rounds")
    return rpc.bench(args)


class Benchmark(NamedTuple):
    """One ``octo bench`` target."""

    description: str
    #: Takes the parsed arguments, returns an exit status (0 when everything checked out).
    run: Callable[[argparse.Namespace], int]
    #: The target's options, as an argparse parent parser.
    options: Callable[[], argparse.ArgumentParser]


BENCHMARKS: Dict[str, Benchmark] = {
    "codec": Benchmark("thrift binary encode/decode: octo_core vs thriftpy2 and Apache "
                       "fastbinary", _bench_codec, _codec_options),
    "rpc": Benchmark("echo calls on loopback, server in its own process: octo_core vs "
                     "thriftpy2, grpcio and a raw uvloop echo", _bench_rpc, _rpc_options),
}


def _version() -> str:
    try:
        return importlib.metadata.version("octo_core")
    except importlib.metadata.PackageNotFoundError:   # a source tree on sys.path
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The ``octo`` argument parser."""
    parser = argparse.ArgumentParser(prog="octo", description="octo_core command-line tools.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("scanner", add_help=False,
                        help="probe a registry's nodes and write their health back "
                             "(octo scanner --help)")
    bench = commands.add_parser(
        "bench", parents=[_timing_options()], help="run benchmarks",
        description="Run octo_core's benchmarks; with no TARGET, every one of them "
                    "(octo bench TARGET --help: the target's options).")
    targets = bench.add_subparsers(dest="target", metavar="TARGET",
                                   help="benchmark to run (default: all)")
    for name, benchmark in BENCHMARKS.items():
        target = targets.add_parser(name, parents=[benchmark.options()],
                                    help=benchmark.description,
                                    description=benchmark.description + ".")
        _defer_to_bench(target)
    return parser


def _defer_to_bench(target: argparse.ArgumentParser) -> None:
    """A target's ``BENCH_OPTIONS`` get no default of their own: a subparser's defaults
    overwrite what was parsed before it, so `octo bench --seconds 3 codec` would run with
    the default seconds. (Not ``set_defaults(x=SUPPRESS)``: that stores the marker.)"""
    for action in target._actions:
        if action.dest in BENCH_OPTIONS:
            action.default = argparse.SUPPRESS


def _registry_problem(url: str, once: bool) -> Optional[str]:
    """Why the scanner, a process of its own, could not find a node in ``url``, if so."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "memory":
        return (f"{url}: a memory registry lives in one process, so the scanner's own "
                "never holds a node; use file:///dir or zk://")
    if parts.scheme == "file" and once and not os.path.isdir(urllib.parse.unquote(parts.path)):
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


def _bench(parser: argparse.ArgumentParser, argv: List[str]) -> int:
    args = parser.parse_args(argv)
    if args.command != "bench":
        parser.print_help(sys.stderr)
        return 2
    # No target: every one, as if named after the options given (`octo bench --seconds 3 rpc`).
    runs = [args] if args.target else [parser.parse_args([*argv, name]) for name in BENCHMARKS]
    status = 0
    for i, run_args in enumerate(runs):
        if i:
            print()
        status = max(status, BENCHMARKS[run_args.target].run(run_args))
    return status


def _drop_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered would fail again (with a
    traceback) at the interpreter's final flush."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``octo`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["scanner"]:   # its own parser lives with the scanner
            status = _scanner(argv[1:])
        else:
            status = _bench(build_parser(), argv)
        sys.stdout.flush()   # a closed pipe shows here, not at exit
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        _drop_stdout()
        return SIGPIPE_STATUS
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
