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
from typing import Iterator, Optional

from conftest import skip, thrift_compiler_or_skip
from interop_cases import INTEROP_IDL
from interop_peers import TIMEOUT, PeerClient, peer_client, peer_server, run_step

CPP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpp")

# What the generated code and the peers include: a missing header means a
# missing package (the headers of Debian's libthrift-dev include Boost's).
_PROBE = ("#include <thrift/transport/TSocket.h>\n"
          "#include <thrift/server/TThreadedServer.h>\n"
          "#include <thrift/processor/TMultiplexedProcessor.h>\n")
_CXXFLAGS = ["-std=c++17", "-O0", "-g0"]   # -O0: these programs are built on every run
_LIBS = ["-lthrift", "-pthread"]


@dataclasses.dataclass(frozen=True)
class Peers:
    server: str             # the interop_server program
    client: str             # the interop_client program


def _compiler_or_skip() -> str:
    cxx = shutil.which("g++")
    if cxx is None:
        skip("g++ not found: the C++ interop tests build Apache Thrift C++ peers "
             "(Debian: apt-get install g++)")
    probe = subprocess.run([cxx, *_CXXFLAGS, "-E", "-x", "c++", "-o", os.devnull, "-"],
                           input=_PROBE, capture_output=True, text=True, timeout=TIMEOUT)
    if probe.returncode != 0:
        first_error = next((line for line in probe.stderr.splitlines() if "error" in line),
                           probe.stderr.strip())
        skip(f"Apache Thrift's C++ headers cannot be compiled ({first_error}); install "
             "them (Debian: apt-get install libthrift-dev libboost-dev) to run the C++ "
             "interop tests")
    return cxx


def build_peers(out: str) -> Peers:
    """Both C++ programs, built in ``out`` (the translation units in parallel)."""
    cxx = _compiler_or_skip()
    thrift = thrift_compiler_or_skip()
    gen = os.path.join(out, "gen")
    os.mkdir(gen)
    run_step([thrift, "--gen", "cpp", "-out", gen, INTEROP_IDL])
    sources = {name: os.path.join(gen, f"{name}.cpp")
               for name in ("Interop", "Unserved", "interop_types")}
    sources.update({name: os.path.join(CPP_DIR, f"{name}.cpp")
                    for name in ("interop_server", "interop_client")})
    objects = {name: os.path.join(out, f"{name}.o") for name in sources}

    def compile_unit(name: str) -> None:
        run_step([cxx, *_CXXFLAGS, "-I", gen, "-c", sources[name], "-o", objects[name]])

    def link(program: str, *units: str) -> str:
        path = os.path.join(out, program)
        run_step([cxx, "-o", path, *(objects[unit] for unit in (program, *units)), *_LIBS])
        return path

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(compile_unit, sources))   # list(): raise the first failure
    server = link("interop_server", "Interop", "interop_types")
    client = link("interop_client", "Interop", "Unserved", "interop_types")
    return Peers(server, client)


@contextlib.contextmanager
def cpp_server(peers: Peers, transport: str, *service_names: str) -> Iterator[str]:
    """The C++ server (``transport``: ``framed`` or ``buffered``; with
    ``service_names``, a ``TMultiplexedProcessor`` under each) on a free port;
    yields its address."""
    with peer_server([peers.server, transport, *service_names], "C++") as address:
        yield address


@contextlib.contextmanager
def cpp_client(peers: Peers, address: str, transport: str,
               service_name: Optional[str] = None) -> Iterator[PeerClient]:
    """The C++ client on one connection to ``address`` (``transport``: ``framed``
    or ``buffered``; ``service_name``: through a ``TMultiplexedProtocol``)."""
    port = address.rpartition(":")[2]
    with peer_client([peers.client, port, transport,
                      *([service_name] if service_name else [])]) as client:
        yield client
