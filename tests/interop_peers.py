"""Apache Thrift's own libraries as peers of octo_core, run as child processes
(``cpp_peers``, ``java_peers``): what the C++ and the Java peers share.

A peer's server prints ``PORT <n>`` once it listens; ``peer_server`` waits for
that line and yields the address. A peer's client is driven line by line over its
stdin and stdout (the protocol ``tests/cpp/interop_client.cpp`` describes), by a
``PeerClient``. Both are always killed.
"""
from __future__ import annotations

import contextlib
import subprocess
import tempfile
from typing import Any, Iterator, List

from thriftpy2.thrift import TApplicationException

from octo_core import codec

from interop_cases import INTEROP
from wire_helpers import LOCALHOST

TIMEOUT = 300.0     # for a build step


def run_step(command: List[str]) -> None:
    """A build step that must succeed (its output in the failure)."""
    proc = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr}"


@contextlib.contextmanager
def _stopping(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(5)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def peer_server(command: List[str], what: str) -> Iterator[str]:
    """The server ``command`` starts, on a free port: yields its address."""
    with tempfile.TemporaryFile("w+") as errors, \
            _stopping(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors,
                                       text=True)) as proc:
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            errors.seek(0)
            raise AssertionError(f"the {what} server did not start: {line!r} {errors.read()}")
        yield f"{LOCALHOST}:{int(line.split()[1])}"


class PeerCallError(Exception):
    """The peer's client failed otherwise than with a TApplicationException."""


class PeerClient:
    """Calls through a peer's client process: ``call(method, *args)`` returns the
    value, raises the declared exception, thriftpy2's ``TApplicationException``
    for one the peer's client got, or ``PeerCallError``. Methods are
    ``INTEROP.Interop``'s, and ``Unserved``'s ``ghost``."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self._proc = proc

    def call(self, method: str, *args: Any) -> Any:
        service = INTEROP.Unserved if method == "ghost" else INTEROP.Interop
        arguments = getattr(service, f"{method}_args")(*args)
        answer = self.ask(f"{method} {codec.encode(arguments).hex()}")
        if answer[0] == "sent":
            return None
        if answer[0] == "app":
            raise TApplicationException(int(answer[1]), bytes.fromhex(answer[2]).decode())
        if answer[0] != "ok":
            raise PeerCallError(bytes.fromhex(answer[1]).decode())
        result_cls = getattr(service, f"{method}_result")
        result = codec.decode(result_cls, bytes.fromhex(answer[1]))
        for _, spec in sorted(result_cls.thrift_spec.items()):
            if spec[1] != "success" and getattr(result, spec[1]) is not None:
                raise getattr(result, spec[1])
        return getattr(result, "success", None)

    def texts(self, command: str) -> List[str]:
        """A command answered by its own name and hex texts (``burst``, ``threads``)."""
        answer = self.ask(command)
        if answer[0] != command.split()[0]:
            raise PeerCallError(bytes.fromhex(answer[1]).decode())
        return [bytes.fromhex(text).decode() for text in answer[1:]]

    def ask(self, command: str) -> List[str]:
        """One command line sent, its answer line read (split)."""
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        answer = self._proc.stdout.readline().split()
        if not answer:
            raise PeerCallError(f"the peer's client exited ({self._proc.wait(5)})")
        return answer


@contextlib.contextmanager
def peer_client(command: List[str]) -> Iterator[PeerClient]:
    """The client ``command`` starts, driven by a ``PeerClient``."""
    with _stopping(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, bufsize=1)) as proc:
        yield PeerClient(proc)
