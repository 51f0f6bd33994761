"""A real ZooKeeper for the registry tests: Debian's ``zookeeper`` package, run by hand.

``zookeeper_server`` (session scope) starts one standalone server on a free
127.0.0.1 port with a temporary data directory and always stops it (the whole
process group is killed). ``zookeeper`` is its ``host:port``. ``outage()``
stops the server for a while and starts it again on the same port and data,
for the outage tests (``outage(wipe=True)``: with its data gone, as a rebuilt
ensemble). Import into a test module with::

    from zk import zookeeper, zookeeper_server  # noqa: F401  (fixtures)

When ZooKeeper or java is not installed the fixture FAILS (it does not skip):
CI installs the package (``apt-get install zookeeper``).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Iterator, Optional

import pytest
from kazoo.client import KazooClient

JAVA = "/usr/bin/java"
JARS = "/usr/share/java"
# zookeeper.jar's manifest names its own dependencies; slf4j-nop keeps the log quiet.
CLASSPATH = [os.path.join(JARS, "zookeeper.jar"), os.path.join(JARS, "slf4j-nop.jar")]
MAIN_CLASS = "org.apache.zookeeper.server.ZooKeeperServerMain"
START_TIMEOUT = 30.0

# Short ticks and a 1 s floor let tests use 2-4 s sessions.
ZOO_CFG = """\
tickTime=250
minSessionTimeout=1000
maxSessionTimeout=60000
dataDir={data}
clientPort={port}
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=ruok
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ready(port: int) -> bool:
    """ZooKeeper says ``imok`` and accepts a session (it answers ``ruok`` a little earlier)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"ruok")
            if sock.recv(4) != b"imok":
                return False
    except OSError:
        return False
    client = KazooClient(hosts=f"127.0.0.1:{port}", connection_retry=dict(max_tries=0))
    try:
        client.start(timeout=2)
    except Exception:  # noqa: BLE001 - not serving sessions yet
        return False
    client.stop()
    client.close()
    return True


class ZooKeeper:
    """One standalone ZooKeeper server process."""

    def __init__(self, workdir: str) -> None:
        missing = [path for path in [JAVA] + CLASSPATH if not os.path.exists(path)]
        if missing:
            pytest.fail(f"ZooKeeper tests need Debian's zookeeper package and java: missing "
                        f"{', '.join(missing)} (apt-get install zookeeper)", pytrace=False)
        self.port = _free_port()
        self.hosts = f"127.0.0.1:{self.port}"
        self._workdir = workdir
        self._config = os.path.join(workdir, "zoo.cfg")
        self._log_path = os.path.join(workdir, "zookeeper.log")
        data = os.path.join(workdir, "data")
        os.makedirs(data)
        with open(self._config, "w") as f:
            f.write(ZOO_CFG.format(data=data, port=self.port))
        self._process: Optional[subprocess.Popen] = None

    def url(self, chroot: str, **options: object) -> str:
        """A ``zk://`` registry URL for this server under ``chroot``."""
        query = "&".join(f"{key}={value}" for key, value in options.items())
        return f"zk://{self.hosts}/{chroot}" + (f"?{query}" if query else "")

    def start(self) -> None:
        with open(self._log_path, "ab") as log:
            self._process = subprocess.Popen(
                [JAVA, "-Xmx256m", "-cp", ":".join(CLASSPATH), MAIN_CLASS, self._config],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)   # its own process group: stop() kills them all
        deadline = time.monotonic() + START_TIMEOUT
        while not _ready(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"ZooKeeper did not start on port {self.port}:\n{self._log_tail()}",
                            pytrace=False)
            time.sleep(0.1)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    @contextlib.contextmanager
    def outage(self, wipe: bool = False) -> Iterator[None]:
        """ZooKeeper is down inside the block, back on the same port after it: with
        the same data, or with ``wipe`` none (its transaction ids start again)."""
        self.stop()
        try:
            yield
        finally:
            if wipe:
                data = os.path.join(self._workdir, "data")
                shutil.rmtree(data)
                os.makedirs(data)
            self.start()

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError), open(self._log_path, errors="replace") as f:
            return "".join(f.readlines()[-30:])
        return "(no log)"


@pytest.fixture(scope="session")
def zookeeper_server() -> Iterator[ZooKeeper]:
    """A running ZooKeeper (always stopped at the end of the session)."""
    workdir = tempfile.mkdtemp(prefix="octo-zk-")
    try:
        server = ZooKeeper(workdir)
        try:
            server.start()
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def zookeeper(zookeeper_server: ZooKeeper) -> str:
    """The running ZooKeeper's ``host:port``."""
    return zookeeper_server.hosts
