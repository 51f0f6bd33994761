"""Apache Thrift's C++ library as a peer of octo_core (tests/test_interop_cpp.py).

``build_peers`` generates C++ from ``tests/idl/interop.thrift`` with ``thrift
--gen cpp`` and compiles it with the sources of ``tests/cpp/`` into two
programs: ``interop_server`` (a ``TThreadedServer``) and ``interop_client`` (the
generated client, driven line by line over its stdin and stdout). It skips,
saying what is missing, without g++, the thrift compiler, or the C++ headers
(``libthrift-dev``, and ``libboost-dev``, which they include).

``cpp_server`` and ``cpp_client`` run them as child processes that are always
killed.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator, List, Optional

import pytest
from thriftpy2.thrift import TApplicationException

import octo_core
from octo_core import codec

from conftest import thrift_compiler_or_skip
from wire_helpers import LOCALHOST

HERE = os.path.dirname(os.path.abspath(__file__))
CPP_DIR = os.path.join(HERE, "cpp")
INTEROP_IDL = os.path.join(HERE, "idl", "interop.thrift")
INTEROP = octo_core.load_idl(INTEROP_IDL, module_name="octo_interop_thrift")

# What the generated code and the peers include: a missing header means a
# missing package (the headers of Debian's libthrift-dev include Boost's).
_PROBE = ("#include <thrift/transport/TSocket.h>\n"
          "#include <thrift/server/TThreadedServer.h>\n"
          "#include <thrift/processor/TMultiplexedProcessor.h>\n")
_CXXFLAGS = ["-std=c++17", "-O0", "-g0"]   # -O0: these programs are built on every run
_LIBS = ["-lthrift", "-pthread"]
_TIMEOUT = 300.0


@dataclasses.dataclass(frozen=True)
class Peers:
    server: str             # the interop_server program
    client: str             # the interop_client program
    build_seconds: float    # generating, compiling and linking both


def _skip(reason: str) -> None:
    print(f"\nSKIP: {reason}", file=sys.stderr)
    pytest.skip(reason)


def _compiler_or_skip() -> str:
    cxx = shutil.which("g++")
    if cxx is None:
        _skip("g++ not found: the C++ interop tests build Apache Thrift C++ peers "
              "(Debian: apt-get install g++)")
    probe = subprocess.run([cxx, *_CXXFLAGS, "-E", "-x", "c++", "-o", os.devnull, "-"],
                           input=_PROBE, capture_output=True, text=True, timeout=_TIMEOUT)
    if probe.returncode != 0:
        first_error = next((line for line in probe.stderr.splitlines() if "error" in line),
                           probe.stderr.strip())
        _skip(f"Apache Thrift's C++ headers cannot be compiled ({first_error}); install "
              "them (Debian: apt-get install libthrift-dev libboost-dev) to run the C++ "
              "interop tests")
    return cxx


def _run(command: List[str]) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr}"


def build_peers(out: str) -> Peers:
    """Both C++ programs, built in ``out`` (the translation units in parallel)."""
    started = time.monotonic()
    cxx = _compiler_or_skip()
    thrift = thrift_compiler_or_skip()
    gen = os.path.join(out, "gen")
    os.mkdir(gen)
    _run([thrift, "--gen", "cpp", "-out", gen, INTEROP_IDL])
    sources = {name: os.path.join(gen, f"{name}.cpp")
               for name in ("Interop", "Unserved", "interop_types")}
    sources.update({name: os.path.join(CPP_DIR, f"{name}.cpp")
                    for name in ("interop_server", "interop_client")})
    objects = {name: os.path.join(out, f"{name}.o") for name in sources}

    def compile_unit(name: str) -> None:
        _run([cxx, *_CXXFLAGS, "-I", gen, "-c", sources[name], "-o", objects[name]])

    def link(program: str, *units: str) -> str:
        path = os.path.join(out, program)
        _run([cxx, "-o", path, *(objects[unit] for unit in (program, *units)), *_LIBS])
        return path

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(compile_unit, sources))   # list(): raise the first failure
    server = link("interop_server", "Interop", "interop_types")
    client = link("interop_client", "Interop", "Unserved", "interop_types")
    return Peers(server, client, time.monotonic() - started)


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
def cpp_server(peers: Peers, transport: str, *service_names: str) -> Iterator[str]:
    """The C++ server (``transport``: ``framed`` or ``buffered``; with
    ``service_names``, a ``TMultiplexedProcessor`` under each) on a free port;
    yields its address."""
    with tempfile.TemporaryFile("w+") as errors, \
            _stopping(subprocess.Popen([peers.server, transport, *service_names],
                                       stdout=subprocess.PIPE, stderr=errors,
                                       text=True)) as proc:
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            errors.seek(0)
            raise AssertionError(f"the C++ server did not start: {line!r} {errors.read()}")
        yield f"{LOCALHOST}:{int(line.split()[1])}"


class CppCallError(Exception):
    """The C++ client failed otherwise than with a TApplicationException."""


class CppClient:
    """Calls through the C++ client process: ``call(method, *args)`` returns the
    value, raises the declared exception, thriftpy2's ``TApplicationException``
    for one the C++ client got, or ``CppCallError``. Methods are
    ``INTEROP.Interop``'s, and ``Unserved``'s ``ghost``."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self._proc = proc

    def call(self, method: str, *args: Any) -> Any:
        service = INTEROP.Unserved if method == "ghost" else INTEROP.Interop
        arguments = getattr(service, f"{method}_args")(*args)
        answer = self._ask(f"{method} {codec.encode(arguments).hex()}")
        if answer[0] == "sent":
            return None
        if answer[0] == "app":
            raise TApplicationException(int(answer[1]), bytes.fromhex(answer[2]).decode())
        if answer[0] != "ok":
            raise CppCallError(bytes.fromhex(answer[1]).decode())
        result_cls = getattr(service, f"{method}_result")
        result = codec.decode(result_cls, bytes.fromhex(answer[1]))
        for _, spec in sorted(result_cls.thrift_spec.items()):
            if spec[1] != "success" and getattr(result, spec[1]) is not None:
                raise getattr(result, spec[1])
        return getattr(result, "success", None)

    def burst(self, count: int) -> List[str]:
        """``count`` calls of ``slow("burst <i>", 0)`` pipelined on the connection
        (all sent before a reply is read); their replies' texts in the order sent."""
        answer = self._ask(f"burst {count}")
        if answer[0] != "burst":
            raise CppCallError(bytes.fromhex(answer[1]).decode())
        return [bytes.fromhex(text).decode() for text in answer[1:]]

    def _ask(self, command: str) -> List[str]:
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        answer = self._proc.stdout.readline().split()
        if not answer:
            raise CppCallError(f"the C++ client exited ({self._proc.wait(5)})")
        return answer


@contextlib.contextmanager
def cpp_client(peers: Peers, address: str, transport: str,
               service_name: Optional[str] = None) -> Iterator[CppClient]:
    """The C++ client on one connection to ``address`` (``transport``: ``framed``
    or ``buffered``; ``service_name``: through a ``TMultiplexedProtocol``)."""
    port = address.rpartition(":")[2]
    command = [peers.client, port, transport, *([service_name] if service_name else [])]
    with _stopping(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, bufsize=1)) as proc:
        yield CppClient(proc)
