"""Apache Thrift's Java library as a peer of octo_core (tests/test_interop_java.py).

``build_peers`` generates Java from ``tests/idl/interop.thrift`` with ``thrift
--gen java`` and compiles it with the sources of ``tests/java/`` against
Debian's ``libthrift-java`` into two programs: ``InteropServer`` (a
``TThreadPoolServer`` or a ``TThreadedSelectorServer``) and ``InteropClient``
(the generated client, driven line by line over its stdin and stdout). It skips,
saying what is missing, without javac, the thrift compiler or the jars.

``java_server`` and ``java_client`` run them as child processes that are always
killed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import shutil
from typing import Iterator, List, Optional

from conftest import skip, thrift_compiler_or_skip
from interop_cases import INTEROP_IDL
from interop_peers import PeerClient, peer_client, peer_server, run_step

JAVA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "java")
# Where Debian's libthrift-java and libslf4j-java (which it depends on) put their jars.
JARS = "/usr/share/java"
# The library; the logging API it calls; and the logger that drops what it says
# (without one, slf4j warns on every start that it has none).
_LIBRARY = ("thrift.jar", "slf4j-api.jar", "slf4j-nop.jar")
# Short runs, javac's too: the client compiler only (a program starts in a tenth
# of a second, javac takes half the time), one GC thread, and a heap that holds
# the biggest payloads.
_JVM_FLAGS = ["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Xmx1g"]


@dataclasses.dataclass(frozen=True)
class Peers:
    java: str               # the java launcher
    classpath: str          # the peers' classes and the library


def _tools_or_skip() -> List[str]:
    """javac and java, and the library's jars; else skips, saying what is missing."""
    tools = [shutil.which("javac"), shutil.which("java")]
    if None in tools:
        skip("javac not found: the Java interop tests build Apache Thrift Java peers "
             "(Debian: apt-get install default-jdk-headless)")
    missing = [jar for jar in _LIBRARY if not os.path.exists(os.path.join(JARS, jar))]
    if missing:
        skip(f"{', '.join(missing)} not found in {JARS}: install Apache Thrift's Java "
             "library (Debian: apt-get install libthrift-java) to run the Java interop tests")
    return tools


def build_peers(out: str) -> Peers:
    """Both Java programs, compiled into ``out``."""
    javac, java = _tools_or_skip()
    thrift = thrift_compiler_or_skip()
    gen, classes = os.path.join(out, "gen"), os.path.join(out, "classes")
    os.mkdir(gen)
    # (no @Generated: its annotation is not in the JDK since Java 11)
    run_step([thrift, "--gen", "java:generated_annotations=suppress", "-out", gen, INTEROP_IDL])
    library = os.pathsep.join(os.path.join(JARS, jar) for jar in _LIBRARY)
    sources = sorted(glob.glob(os.path.join(gen, "*.java")) +
                     glob.glob(os.path.join(JAVA_DIR, "*.java")))
    run_step([javac, *(f"-J{flag}" for flag in _JVM_FLAGS), "-nowarn", "-encoding", "UTF-8",
              "-cp", library, "-d", classes, *sources])
    return Peers(java, os.pathsep.join([classes, library]))


def _command(peers: Peers, program: str, *args: str) -> List[str]:
    return [peers.java, *_JVM_FLAGS, "-cp", peers.classpath, program, *args]


@contextlib.contextmanager
def java_server(peers: Peers, kind: str, *options: str) -> Iterator[str]:
    """The Java server (``kind``: ``threadpool`` or ``selector``; ``options``: service
    names for a ``TMultiplexedProcessor``, ``--default``, ``--strict-read``) on a
    free port; yields its address."""
    with peer_server(_command(peers, "InteropServer", kind, *options), "Java") as address:
        yield address


@contextlib.contextmanager
def java_client(peers: Peers, address: str, transport: str = "framed",
                service_name: Optional[str] = None,
                old_header: bool = False) -> Iterator[PeerClient]:
    """The Java client on one connection to ``address`` (``transport``: ``framed`` or
    ``buffered``; ``service_name``: through a ``TMultiplexedProtocol``; ``old_header``:
    the non-strict message header)."""
    port = address.rpartition(":")[2]
    args = [port, transport, *([service_name] if service_name else []),
            *(["--old-header"] if old_header else [])]
    with peer_client(_command(peers, "InteropClient", *args)) as client:
        yield client
