"""The ``octo`` command.

``octo bench [TARGET] [OPTIONS]`` runs the benchmarks that ship with octo_core;
with no TARGET it runs every one of them. Benchmarks are listed in
``BENCHMARKS``: adding one is one entry there (its options come from its own
parser, so ``octo bench TARGET --help`` lists them).

``octo scanner --registry URL --appkey A ...`` runs the health scanner
(``octo_core.health``).

``octo nodes --registry URL APPKEY`` lists an appkey's nodes (``--json``: as the
registry stores them); ``--set IP:PORT --status/--weight/--role/--warmup``
changes one as an operator does (``Registry.update``).

``octo call IDL [SERVICE.]METHOD [JSON] --host HOST:PORT`` (or ``--registry URL
--remote-appkey APPKEY``) calls one method, its arguments a JSON object by name,
and prints the answer as JSON (``octo_core.jsonvalue`` says how thrift values
are written); a declared exception is printed as ``{"ExceptionName": {...}}``
with exit status 1, as is any other failure of the call (on stderr).

``octo --version`` prints the installed version.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import sys
import urllib.parse
from types import ModuleType
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from octo_core.checks import count_argument, seconds_argument

#: ``octo bench``'s --seconds default, which every target's own --seconds defers to.
DEFAULT_SECONDS = 1.0
#: The options ``octo bench`` takes before a target (and every target takes after it).
BENCH_OPTIONS = ("seconds", "rounds")
#: Exit status when stdout's reader went away (``octo bench | head -1``): 128 + SIGPIPE,
#: what a shell reports for a writer its closed pipe ended; 1 would read as "a
#: benchmark failed", which is what 1 means here.
SIGPIPE_STATUS = 128 + signal.SIGPIPE


#: What ``--rounds`` is to each benchmark (``octo bench``, before a target, says both).
_CODEC_ROUNDS = ("interleaved rounds per row, the best is kept (default: one per 20 ms of "
                 "--seconds, at least 5)")
_RPC_ROUNDS = "measurements of the whole matrix, the median is kept (default: 1)"


def _timing_options(rounds: str = f"codec: {_CODEC_ROUNDS}; rpc: {_RPC_ROUNDS}"
                    ) -> argparse.ArgumentParser:
    """``--seconds`` and ``--rounds`` (its help: ``rounds``): ``octo bench``'s, and the
    codec benchmark's."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--seconds", type=seconds_argument, default=DEFAULT_SECONDS, metavar="S",
                        help=f"timing budget per measured row, in seconds "
                             f"(default: {DEFAULT_SECONDS:g})")
    parser.add_argument("--rounds", type=count_argument, default=None, metavar="N", help=rounds)
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
    commands.add_parser("nodes", add_help=False,
                        help="list an appkey's nodes in a registry, or change one "
                             "(octo nodes --help)")
    commands.add_parser("call", add_help=False,
                        help="call one method of a service, arguments and answer in JSON "
                             "(octo call --help)")
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
    """Why a command (the scanner, ``octo nodes``), a process of its own, could not
    find a node in ``url``, if so (``once``: it looks once, now)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "memory":
        return (f"{url}: a memory registry lives in one process, so this command's own "
                "never holds a node; use file:///dir or zk://")
    if (parts.scheme == "file" and once and not parts.netloc   # (file://dir: open_registry's)
            and not os.path.isdir(urllib.parse.unquote(parts.path))):
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


def nodes_parser() -> argparse.ArgumentParser:
    """``octo nodes``'s argument parser."""
    from octo_core.protocol import NodeStatus

    parser = argparse.ArgumentParser(
        prog="octo nodes", description="List an appkey's nodes in a registry; with --set, "
        "change one as an operator does (what the scanner and the provider leave alone).")
    parser.add_argument("appkey", help="the provider's appkey")
    parser.add_argument("--registry", required=True, metavar="URL",
                        help="file:///dir or zk://host:2181 (with ?env=... as elsewhere)")
    parser.add_argument("--json", action="store_true", help="print the nodes as JSON")
    parser.add_argument("--set", metavar="IP:PORT", help="the node to change")
    parser.add_argument("--status", choices=[s.name.lower() for s in NodeStatus],
                        help="its status (stopped: no calls; alive: calls again)")
    parser.add_argument("--weight", type=int, metavar="N", help="its weight (0: no calls)")
    parser.add_argument("--role", choices=("primary", "backup"), help="backup nodes serve "
                        "only when no primary can")
    parser.add_argument("--warmup", type=int, metavar="S", help="its warm-up, in seconds")
    return parser


def _nodes(argv: List[str]) -> int:
    """``octo nodes``: list, or change one node; a registry that fails exits 1."""
    from octo_core.errors import OctoError
    from octo_core.protocol import NodeStatus
    from octo_core.registry import RegistryError, open_registry
    from octo_core.registry.node import Role
    from octo_core.transport.address import parse_address
    from octo_core.transport.loop import new_event_loop

    parser = nodes_parser()
    args = parser.parse_args(argv)
    changes = {name: value for name, value in (
        ("status", None if args.status is None else NodeStatus[args.status.upper()]),
        ("weight", args.weight),
        ("role", {"primary": Role.PRIMARY, "backup": Role.BACKUP}.get(args.role or "")),
        ("warmup", args.warmup)) if value is not None}
    if bool(changes) != bool(args.set):
        parser.error("--set IP:PORT goes with at least one of --status, --weight, --role, "
                     "--warmup, and they with it")
    if args.set:
        try:
            parse_address(args.set)
        except ValueError as exc:   # (no port: it would name no node, and say only that)
            parser.error(f"argument --set: {exc}")
    problem = _registry_problem(args.registry, once=True)
    if problem:
        parser.error(f"argument --registry: {problem}")
    try:
        registry = open_registry(args.registry)
    except (ValueError, RegistryError) as exc:   # (zk:// without kazoo: as the scanner says it)
        parser.error(f"argument --registry: {exc}")

    async def run() -> Any:
        try:
            if args.set:
                return [await registry.update(args.appkey, args.set, **changes)]
            return await registry.list(args.appkey)
        finally:
            await registry.close()

    loop = new_event_loop()
    try:
        nodes = loop.run_until_complete(run())
    except (OctoError, OSError, ValueError) as exc:
        print(f"octo nodes: {exc}", file=sys.stderr)
        return 1
    finally:
        loop.close()
    if args.json:
        print(json.dumps([node.to_dict() for node in nodes], indent=2))
    else:
        _print_nodes(nodes)
    if not nodes:   # (a misspelt appkey, or another env: say so, beside the empty list)
        print(f"octo nodes: {args.registry} lists no node of {args.appkey!r}", file=sys.stderr)
    return 0


def _print_nodes(nodes: Sequence[Any]) -> None:
    """The nodes as a table, a row each, sorted by address."""
    from octo_core.protocol import status_name

    rows = [("NODE", "STATUS", "WEIGHT", "ROLE", "VERSION", "CELL", "SWIMLANE", "IDC", "REGION")]
    for node in sorted(nodes, key=lambda n: n.key):
        rows.append((node.key, status_name(node.status), f"{node.base_weight():g}",
                     "backup" if node.role else "primary", node.version, node.cell,
                     node.swimlane, node.idc, node.region))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def call_parser() -> argparse.ArgumentParser:
    """``octo call``'s argument parser."""
    parser = argparse.ArgumentParser(
        prog="octo call", description="Call one method of a service: its arguments a JSON "
        "object by name, its answer printed as JSON. Binary is base64 text, an enum its "
        "name, a set an array, a map an object (or an array of [key, value] pairs). A "
        "declared exception is printed as {\"Name\": {...}}; then, as for any other "
        "failure, the exit status is 1.")
    parser.add_argument("idl", help="the service's .thrift file")
    parser.add_argument("method", metavar="[SERVICE.]METHOD",
                        help="the method; SERVICE may be left out when one service of the "
                             "IDL has the method")
    parser.add_argument("arguments", metavar="JSON", nargs="?", default="{}",
                        help="the arguments, a JSON object by name ('-': read from stdin; "
                             "default {})")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--host", action="append", metavar="HOST:PORT",
                       help="a node to call (unix:///path too); may be repeated")
    where.add_argument("--registry", metavar="URL", help="find the nodes in this registry "
                       "(file:///dir, zk://host:2181); needs --remote-appkey")
    parser.add_argument("--remote-appkey", default=None, help="the callee's appkey")
    parser.add_argument("--appkey", default="com.octo.cli", help="this caller's appkey "
                        "(default com.octo.cli)")
    parser.add_argument("--protocol", choices=("octo", "thrift"), default="octo",
                        help="the OCTO unified protocol (default) or framed thrift")
    parser.add_argument("--service-name", help="the service's name on the wire (default: "
                        "its IDL name)")
    parser.add_argument("--timeout", type=seconds_argument, default=5.0, metavar="S",
                        help="seconds the call may take (default 5)")
    parser.add_argument("--token", help="sign the request with this token (a server with "
                        "auth=); needs --remote-appkey")
    return parser


def _method_of(module: ModuleType, name: str) -> Tuple[Any, str]:
    """(service, method) that ``[SERVICE.]METHOD`` names in the IDL ``module``;
    ``ValueError`` saying what the IDL has instead."""
    services = {attr: value for attr, value in vars(module).items()
                if isinstance(getattr(value, "thrift_services", None), list)}
    service_name, _, method = name.rpartition(".")
    if service_name:
        if service_name not in services:
            raise ValueError(f"the IDL has no service {service_name!r} (it has: "
                             f"{', '.join(services) or 'none'})")
        having = [service_name] if method in services[service_name].thrift_services else []
    else:
        having = [s for s, service in services.items() if method in service.thrift_services]
    if len(having) != 1:
        offered = sorted(f"{s}.{m}" for s, service in services.items()
                         for m in service.thrift_services)
        why = "no method" if not having else f"{len(having)} services with a method"
        raise ValueError(f"the IDL has {why} {name!r}; it has: {', '.join(offered) or 'none'}"
                         + ("" if not having else " (name the service)"))
    return services[having[0]], method


def _call(argv: List[str]) -> int:
    """``octo call``: parse, call, print; usage errors exit 2, a failed call 1."""
    from octo_core import jsonvalue
    from octo_core.client import AsyncClient
    from octo_core.errors import OctoError
    from octo_core.idl import load_idl
    from octo_core.transport.loop import new_event_loop

    parser = call_parser()
    args = parser.parse_args(argv)
    if args.registry and not args.remote_appkey:
        parser.error("--registry needs --remote-appkey")
    if args.token is not None and not args.remote_appkey:   # (said in this command's words)
        parser.error("--token needs --remote-appkey: the signature covers the callee's appkey")
    problem = args.registry and _registry_problem(args.registry, once=True)
    if problem:
        parser.error(f"argument --registry: {problem}")
    try:
        module = load_idl(args.idl)
        service, method = _method_of(module, args.method)
        text = sys.stdin.read() if args.arguments == "-" else args.arguments
        arguments = jsonvalue.args_from_json(getattr(service, f"{method}_args"), json.loads(text))
    except (OSError, ValueError, RecursionError) as exc:   # (JSONDecodeError: a ValueError;
        parser.error(str(exc))                             # JSON nested past Python's stack)
    where: Dict[str, Any] = ({"hosts": args.host} if args.host else
                             {"registry": args.registry})
    options = {key: value for key, value in (("service_name", args.service_name),
                                             ("token", args.token),
                                             ("remote_appkey", args.remote_appkey))
               if value is not None}
    try:   # (made before its loop runs: it binds to the loop at its first call)
        client = AsyncClient(service, appkey=args.appkey, timeout=args.timeout,
                             protocol=args.protocol, **where, **options)
    except (ValueError, OctoError) as exc:   # a --host, --registry or --token no client can use
        parser.error(str(exc))

    async def call() -> Any:
        async with client:
            return await client.call(method, **arguments)

    result_cls = getattr(service, f"{method}_result", None)   # (none for oneway)
    outcomes = jsonvalue.fields(result_cls) if result_cls is not None else {}
    success_type, success_spec = outcomes.get("success", (0, None))   # (void: None answers)
    loop = new_event_loop()
    try:
        answer = jsonvalue.to_json(success_type, success_spec, loop.run_until_complete(call()))
    except OctoError as exc:
        print(f"octo call: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:   # a declared exception: the service's answer, printed
        declared = [name for name, (_, spec) in outcomes.items() if name != "success"
                    and isinstance(spec, type) and isinstance(exc, spec)]
        if not declared:
            raise
        print(json.dumps({type(exc).__name__: jsonvalue.struct_to_json(exc)},
                         ensure_ascii=False, indent=2))
        return 1
    finally:
        loop.close()
    print(json.dumps(answer, ensure_ascii=False, indent=2))
    return 0


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
        elif argv[:1] == ["call"]:
            status = _call(argv[1:])
        elif argv[:1] == ["nodes"]:
            status = _nodes(argv[1:])
        else:
            status = _bench(build_parser(), argv)
        sys.stdout.flush()   # a closed pipe shows here, not at exit
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        _drop_stdout()
        return SIGPIPE_STATUS
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
