"""A provider process for the cross-process naming tests (tests/test_naming_e2e.py,
tests/test_scanner_e2e.py).

    python tests/naming_provider.py --registry URL --appkey A --name NAME [--weight W]

Starts an octo_core ``Server`` hosting ``Echo`` (tests/idl/echo.thrift) on
127.0.0.1, port 0, registered in ``URL``; prints ``ready <port>`` once it is
registered, then serves until SIGTERM/SIGINT (a graceful ``Server.stop``:
STOPPING, unregister, ``--unregister-delay`` of service, drain; exit status 0)
or SIGKILL. ``whoami`` answers NAME, so a caller can tell the providers apart.

A provider whose parent (the test run) is gone exits by itself: a test killed
by its watchdog leaves no provider behind.

Tests import ``Providers`` from here: it launches these processes (each in its
own process group), signals them, and always kills them all in ``close()``.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

import octo_core
from octo_core.transport.loop import new_event_loop

HERE = os.path.dirname(os.path.abspath(__file__))
ECHO_IDL = os.path.join(HERE, "idl", "echo.thrift")
PARENT_CHECK_SECONDS = 0.5


class Handler:
    """``Echo`` for a provider called ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def echo(self, text: str) -> str:
        return text

    def fail(self, kind: str) -> str:
        raise ValueError(f"{self.name} fails on purpose ({kind})")

    def ping(self) -> None:
        return None

    def notify(self, text: str) -> None:
        return None

    async def slow(self, text: str, delay_ms: int) -> str:
        await asyncio.sleep(delay_ms / 1000.0)
        return text

    def nap(self, text: str, delay_ms: int) -> str:
        time.sleep(delay_ms / 1000.0)
        return text

    def block(self, text: str) -> str:
        return text

    def whoami(self) -> str:
        return self.name


# --- the harness the tests use ---------------------------------------------------------

READY_TIMEOUT = 30.0


class Provider:
    """One provider process (its own process group)."""

    def __init__(self, name: str, process: subprocess.Popen, log_path: str) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path
        self.port = 0

    @property
    def key(self) -> str:
        """The node key it registers: ``127.0.0.1:port``."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the provider's process group (no error if it is gone)."""
        if self.process.poll() is not None:   # reaped: its pid may belong to someone else now
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL (also ends a SIGSTOPped provider) and reap it."""
        self.signal(signal.SIGKILL)
        self.process.wait(10)

    def wait_exit(self, timeout: float) -> int:
        """The exit status, waiting at most ``timeout`` seconds (``subprocess.TimeoutExpired``)."""
        return self.process.wait(timeout)

    def log(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def _wait_ready(self, deadline: float) -> None:
        line: List[str] = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()),
                                  daemon=True, name=f"ready-{self.name}")
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        words = line[0].split() if line else []
        if len(words) != 2 or words[0] != "ready":
            raise AssertionError(f"provider {self.name} did not start (said {line!r}):\n{self.log()}")
        self.port = int(words[1])


class Providers:
    """Launches ``naming_provider.py`` processes and always kills them in ``close()``."""

    def __init__(self, registry: str, appkey: str, log_dir: str) -> None:
        self.registry = registry
        self.appkey = appkey
        self.log_dir = log_dir
        self.all: Dict[str, Provider] = {}

    def start(self, *names: str, registry: Optional[str] = None, weight: Optional[int] = None,
              unregister_delay: Optional[float] = None) -> List[Provider]:
        """Start one provider per name (in parallel); returns them once all are ready."""
        started = []
        try:
            for name in names:
                if name in self.all:
                    raise ValueError(f"provider {name} already started")
                argv = [sys.executable, os.path.abspath(__file__),
                        "--registry", registry or self.registry, "--appkey", self.appkey,
                        "--name", name]
                if weight is not None:
                    argv += ["--weight", str(weight)]
                if unregister_delay is not None:
                    argv += ["--unregister-delay", str(unregister_delay)]
                log_path = os.path.join(self.log_dir, f"provider-{name}.log")
                with open(log_path, "ab") as log:
                    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log,
                                               stdin=subprocess.DEVNULL, text=True,
                                               start_new_session=True)
                provider = self.all[name] = Provider(name, process, log_path)
                started.append(provider)
            deadline = time.monotonic() + READY_TIMEOUT
            for provider in started:
                provider._wait_ready(deadline)
        except BaseException:
            for provider in started:
                provider.kill()
            raise
        return started

    def __getitem__(self, name: str) -> Provider:
        return self.all[name]

    def close(self) -> None:
        """SIGKILL every provider still running and reap them all."""
        for provider in self.all.values():
            provider.signal(signal.SIGKILL)
        for provider in self.all.values():
            try:
                provider.process.wait(10)
            finally:
                if provider.process.stdout is not None:
                    provider.process.stdout.close()

    def __enter__(self) -> "Providers":
        return self

    def __exit__(self, *exc: object) -> None:
        """``close()``, then print every provider's log (pytest shows it when the test failed)."""
        self.close()
        for name, provider in self.all.items():
            print(f"--- provider {name} ({provider.key}) log:\n{provider.log()}")


# --- the provider process ----------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", required=True, metavar="URL")
    parser.add_argument("--appkey", required=True)
    parser.add_argument("--name", required=True, help="what whoami answers")
    parser.add_argument("--weight", type=int, default=None, help="the node's weight")
    parser.add_argument("--unregister-delay", type=float, default=1.0,
                        help="seconds of service after unregistering on SIGTERM")
    return parser


async def _orphan_guard(parent: int) -> None:
    while True:
        await asyncio.sleep(PARENT_CHECK_SECONDS)
        if os.getppid() != parent:
            logging.getLogger("naming_provider").error("parent %d is gone: exiting", parent)
            os._exit(3)


async def serve(args: argparse.Namespace) -> None:
    echo_thrift = octo_core.load_idl(ECHO_IDL, module_name="naming_provider_echo_thrift")
    node = {"weight": args.weight} if args.weight is not None else {}
    server = octo_core.Server(args.appkey, host="127.0.0.1", port=0, registry=args.registry,
                              node=node, unregister_delay=args.unregister_delay)
    server.add_service(echo_thrift.Echo, Handler(args.name))
    loop = asyncio.get_running_loop()
    guard = loop.create_task(_orphan_guard(os.getppid()))
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await server.start()
    print(f"ready {server.port}", flush=True)
    await done.wait()
    logging.getLogger("naming_provider").info("%s: stopping", args.name)
    await server.stop()
    guard.cancel()
    print("stopped", flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {args.name} %(levelname)s %(name)s: %(message)s")
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(args))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
