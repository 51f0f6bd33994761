"""``octo nodes``: an appkey's nodes in a registry, listed and changed from a shell."""
from __future__ import annotations

import asyncio
import json
import sys

import pytest

from octo_core import cli
from octo_core.protocol import NodeStatus
from octo_core.registry import open_registry
from octo_core.registry.node import Node, Role

APPKEY = "com.example.nodes"


def test_octo_nodes_lists_and_changes_the_nodes_a_provider_registered(tmp_path, capsys):
    url = f"file://{tmp_path}"

    async def nodes_cli(*argv):
        """``octo nodes`` (off this loop: it runs its own): (exit status, stdout, stderr)."""
        status = await asyncio.get_running_loop().run_in_executor(
            None, cli.main, ["nodes", APPKEY, "--registry", url, *argv])
        out, err = capsys.readouterr()
        return status, out, err

    async def main():
        async with open_registry(f"{url}?ttl=600") as provider:
            await provider.register(Node(APPKEY, "10.0.0.2", 9001, version="2.0", idc="bj"))
            await provider.register(Node(APPKEY, "10.0.0.1", 9001, swimlane="blue"))
            status, out, err = await nodes_cli()
            assert status == 0 and err == ""
            assert [line.split() for line in out.splitlines()] == [
                ["NODE", "STATUS", "WEIGHT", "ROLE", "VERSION", "CELL", "SWIMLANE", "IDC",
                 "REGION"],
                ["10.0.0.1:9001", "ALIVE", "10", "primary", "blue"],
                ["10.0.0.2:9001", "ALIVE", "10", "primary", "2.0", "bj"]]

            status, out, _ = await nodes_cli("--set", "10.0.0.2:9001", "--status", "stopped",
                                             "--weight", "0", "--role", "backup")
            assert status == 0 and out.splitlines()[1].split()[:4] == \
                ["10.0.0.2:9001", "STOPPED", "0", "backup"]
            (changed,) = [n for n in await provider.list(APPKEY) if n.key == "10.0.0.2:9001"]
            assert (changed.status, changed.weight, changed.role) == \
                (NodeStatus.STOPPED, 0, Role.BACKUP)

            status, out, _ = await nodes_cli("--json")
            assert status == 0
            assert {(n["ip"], n["status"]) for n in json.loads(out)} == \
                {("10.0.0.1", NodeStatus.ALIVE), ("10.0.0.2", NodeStatus.STOPPED)}

            status, out, err = await nodes_cli("--set", "10.0.0.9:1", "--weight", "3")
            assert status == 1 and out == "" and "has no node 10.0.0.9:1" in err

            status = await asyncio.get_running_loop().run_in_executor(
                None, cli.main, ["nodes", "com.example.misspelt", "--registry", url, "--json"])
            out, err = capsys.readouterr()
            assert (status, json.loads(out)) == (0, [])
            assert "lists no node of 'com.example.misspelt'" in err

    asyncio.run(main())


@pytest.mark.parametrize("argv, why", [
    (["--registry", "memory://x"], "a memory registry lives in one process"),
    (["--registry", "file:///no/such/dir"], "no such directory"),
    (["--registry", "file://tmp/x"], "a file registry URL is file:///absolute/dir"),
    (["--registry", "ftp://x"], "unknown registry scheme"),
    (["--registry", "file:///tmp", "--weight", "3"], "--set IP:PORT goes with"),
    (["--registry", "file:///tmp", "--set", "1.2.3.4:5"], "--set IP:PORT goes with"),
    (["--registry", "file:///tmp", "--set", "1.2.3.4:5", "--status", "gone"], "invalid choice"),
    (["--registry", "file:///tmp", "--set", "1.2.3.4", "--weight", "3"], "argument --set: "),
])
def test_octo_nodes_refuses_what_it_cannot_do_as_a_usage_error(capsys, argv, why):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["nodes", APPKEY, *argv])
    assert exit_.value.code == 2 and why in capsys.readouterr().err


def test_octo_nodes_without_kazoo_says_which_extra_to_install(capsys, monkeypatch):
    """It printed open_registry's traceback, where ``octo scanner`` and ``octo call``
    say in one line to install the zookeeper extra."""
    monkeypatch.setitem(sys.modules, "octo_core.registry.zookeeper", None)   # an ImportError
    with pytest.raises(SystemExit) as exit_:
        cli.main(["nodes", APPKEY, "--registry", "zk://127.0.0.1:1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "pip install octo_core[zookeeper]" in err
    assert "Traceback" not in err
