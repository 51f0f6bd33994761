"""Governance on one machine: python python/cluster.py

Echo nodes register in the embedded registry (``file://`` in a temporary
directory): two in IDC bj1, one in sh1, one in bj1's "blue" swimlane, and one
more in bj1 that is listed but refuses connections (its process died; the
registry has not noticed yet). A client in bj1 discovers them there and shows,
with counts of which node answered:

1. untagged calls stay in the caller's IDC and never reach a swimlane node;
   those that pick the dead node fail over to a node not yet tried (its
   connect was refused: the request never left, so any call may), and the dead
   node is left out for 2 s at a time (OCTO's connection degrade);
2. calls tagged with the swimlane go to its node (the tag travels in the
   header's globalContext, so a server's own outbound calls keep it);
3. with no node left serving in bj1, calls go to the next IDC.
"""
import asyncio
import collections
import os
import socket
import tempfile
from typing import Counter, List

import octo_core
from octo_core.registry import Node, open_registry

echo_thrift = octo_core.load_idl(os.path.join(os.path.dirname(__file__), "echo.thrift"))
APPKEY = "com.example.echo"
NODES = {   # name: the Node fields its server registers
    "bj-a": dict(idc="bj1", region="bj"),
    "bj-b": dict(idc="bj1", region="bj"),
    "sh-c": dict(idc="sh1", region="sh"),
    "blue": dict(idc="bj1", region="bj", swimlane="blue"),
}


class NamedEcho:
    """Answers with the name of the node that served the call."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def echo(self, message: str) -> str:
        return self.name

    def log(self, line: str) -> None:
        pass


def refusing_port() -> socket.socket:
    """A socket bound on 127.0.0.1 that never listens: connects to its port are
    refused, and no other program can take the port while it is open."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


async def tally(client: octo_core.AsyncClient, calls: int = 200) -> dict:
    """Which node answered each of ``calls`` concurrent calls."""
    answers: Counter[str] = collections.Counter(
        await asyncio.gather(*(client.echo("hi") for _ in range(calls))))
    return dict(sorted(answers.items()))


async def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        registry = f"file://{root}"
        servers: List[octo_core.Server] = []
        dead = open_registry(registry)   # registers the dead node, and keeps it listed
        refusing = refusing_port()
        client = None
        try:
            for name, fields in NODES.items():
                server = octo_core.Server(appkey=APPKEY, host="127.0.0.1", port=0,
                                          registry=registry, node=dict(fields, ip="127.0.0.1"))
                server.add_service(echo_thrift.Echo, NamedEcho(name))
                await server.start()
                servers.append(server)
            await dead.register(Node(appkey=APPKEY, ip="127.0.0.1",
                                     port=refusing.getsockname()[1], idc="bj1", region="bj"))
            client = octo_core.AsyncClient(
                echo_thrift.Echo, appkey="com.example.caller", remote_appkey=APPKEY,
                registry=registry, idc="bj1", region="bj", lb="roundrobin",
                cluster="failover", idempotent=True, timeout=2.0)

            print("1. untagged, from bj1:   ", await tally(client))
            with octo_core.context.use({"octo.swimlane": "blue"}):
                print("2. tagged swimlane=blue: ", await tally(client))
            for server in servers[:2]:   # bj-a and bj-b stop (and leave the registry)
                await server.stop()
            print("3. bj1 serves no more:   ", await tally(client))
        finally:
            if client is not None:
                await client.close()
            for server in servers:
                await server.stop()
            await dead.close()
            refusing.close()


if __name__ == "__main__":
    asyncio.run(main())
