"""Serve the example Echo service from several processes, each a node of its own:
python python/workers.py [processes] [registry URL]

A Python process runs its calls' Python code on one core at a time (the GIL), so
a service that needs more cores runs more processes. Here each process is a
node: it listens on a free port of its own and registers in the registry (the
embedded one-machine ``file://`` registry in a fresh directory, unless a URL such
as ``zk://host:2181`` is given), where callers find all of them::

    octo_core.AsyncClient(echo_thrift.Echo, appkey=..., remote_appkey="com.example.echo",
                          registry="file:///the/directory/printed")

Why not one port shared by all of them (``SO_REUSEPORT``, or a listening socket
inherited by forked workers, as pre-fork HTTP servers do): the kernel spreads
connections, not calls, and an octo_core client sends all its calls to a node on
one connection, so each caller's calls would all land on one process. As nodes,
the callers' balancers spread the calls over the processes (least request and
LALB by each one's own load), and a process that stops or dies takes only its
own node with it.

Ctrl-C or SIGTERM stops every process gracefully (each unregisters, answers its
calls in flight, then exits). A process that dies on its own stops the others
too, and the exit status is 1: restarting is the process manager's job. And
the processes of a parent killed outright (SIGKILL) stop on their own.
"""
import multiprocessing
import os
import queue
import signal
import sys
import tempfile
from multiprocessing.process import BaseProcess
from typing import List, Optional, Sequence

import octo_core

from echo_server import STOP_SIGNALS, EchoHandler, echo_thrift

APPKEY = "com.example.echo"
#: How long a stopping process may take: its grace (5 s), its unregister_delay
#: (1 s), and a margin.
STOP_WAIT = 30.0


def serve_one(registry: str, started: "multiprocessing.Queue[str]") -> None:
    """One process: a node on a free port, registered, until SIGTERM or until its
    parent is gone (killed outright: no one else would stop it). The stop signals
    stay blocked, as the parent left them: only the parent's SIGTERM stops it, so
    a Ctrl-C reaching the whole process group stops it once."""
    parent = multiprocessing.parent_process()
    # a registry other machines read (zk://) gets an address they can dial: every
    # interface, registered as the one the default route uses
    host = "127.0.0.1" if registry.startswith("file:") else "0.0.0.0"
    server = octo_core.Server(appkey=APPKEY, host=host, port=0, registry=registry)
    server.add_service(echo_thrift.Echo, EchoHandler())
    with server:
        started.put(server.address)
        while signal.sigtimedwait({signal.SIGTERM}, 0.5) is None:
            if parent is not None and not parent.is_alive():
                break


def stop_all(processes: Sequence[BaseProcess]) -> None:
    """SIGTERM to each process still running, then wait for them (kill what
    outlives ``STOP_WAIT``)."""
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signal.SIGTERM)   # type: ignore[arg-type]  # (started)
    for process in processes:
        process.join(STOP_WAIT)
        if process.is_alive():
            process.kill()
            process.join()


def first_dead(processes: Sequence[BaseProcess]) -> Optional[BaseProcess]:
    """A process of ``processes`` that has ended, if any."""
    return next((process for process in processes if not process.is_alive()), None)


def serve(count: int, registry: str) -> int:
    """Start ``count`` processes, wait for a stop signal or for one to die, stop them
    all. Returns the exit status: 0 after a signal, 1 when a process died."""
    context = multiprocessing.get_context("spawn")   # (a fresh interpreter: no fork of threads)
    started: "multiprocessing.Queue[str]" = context.Queue()
    # Blocked before the processes start (they inherit the mask): the signals wait
    # for sigtimedwait below, and in each process for its sigwait. (After the
    # queue: making the first one starts multiprocessing's resource tracker, which
    # unblocks these signals when it has.)
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    processes = [context.Process(target=serve_one, args=(registry, started), daemon=True)
                 for _ in range(count)]
    for process in processes:
        process.start()
    try:
        addresses: List[str] = []
        while len(addresses) < count:
            dead = first_dead(processes)
            if dead is not None:
                print(f"workers: process {dead.pid} failed to start (exit status "
                      f"{dead.exitcode})", file=sys.stderr)
                return 1
            try:
                addresses.append(started.get(timeout=0.5))
            except queue.Empty:
                pass
        print(f"serving Echo from {count} processes ({', '.join(sorted(addresses))}); "
              f"registry {registry}", flush=True)
        while signal.sigtimedwait(STOP_SIGNALS, 0.5) is None:
            dead = first_dead(processes)
            if dead is not None:
                print(f"workers: process {dead.pid} exited (status {dead.exitcode}); "
                      "stopping the others", file=sys.stderr)
                return 1
        return 0
    finally:
        stop_all(processes)


def main(argv: List[str]) -> int:
    count = int(argv[0]) if argv else (os.cpu_count() or 1)
    if len(argv) > 1:
        return serve(count, argv[1])
    with tempfile.TemporaryDirectory(prefix="octo-registry-") as directory:
        return serve(count, f"file://{directory}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
