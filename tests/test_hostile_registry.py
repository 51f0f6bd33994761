"""Hostile registry contents: a malformed node file or znode, a wrongly typed value, a
FIFO, a symlink loop or a huge file next to a good provider's node.

Each bad entry must be skipped alone (with a warning): the appkey's good nodes stay
discoverable through ``list`` and through a running watch.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Callable, Dict, List

import pytest
from kazoo.client import KazooClient

from octo_core.registry import Node, open_registry
from octo_core.registry.file import MAX_FILE_SIZE

from wire_helpers import run, wait_until, watchdog  # noqa: F401  (fixture)
from zk import zookeeper_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("watchdog")

APPKEY = "com.example.hostile"
GOOD = {"appkey": APPKEY, "ip": "10.9.9.9", "port": 1}
DEEP = "[" * 200_000 + "]" * 200_000

#: node JSON that must be refused, by what is wrong with it
BAD_NODE_JSON: Dict[str, str] = {
    "list": "[]",
    "null": "null",
    "deep": DEEP,
    "deep_value": '{"appkey": ' + DEEP + "}",
    "port_inf": '{"appkey": "%s", "ip": "10.9.9.9", "port": 1e400}' % APPKEY,
    "port_range": json.dumps(dict(GOOD, port=70000)),
    "port_str": json.dumps(dict(GOOD, port="1")),
    "ip_int": json.dumps(dict(GOOD, ip=123)),
    "weight_str": json.dumps(dict(GOOD, weight="heavy")),
    "weight_huge": json.dumps(dict(GOOD, weight=10 ** 30)),
    "weight_bool": json.dumps(dict(GOOD, weight=True)),
    "fweight_str": json.dumps(dict(GOOD, fweight="x")),
    "fweight_nan": json.dumps(dict(GOOD, fweight=float("nan"))),
    "warmup_str": json.dumps(dict(GOOD, warmup="5", startTime=1)),
    "status_str": json.dumps(dict(GOOD, status="2")),
    "cell_list": json.dumps(dict(GOOD, cell=["a"])),
    "service_info": json.dumps(dict(GOOD, serviceInfo={"Echo": "yes"})),
    "missing_port": json.dumps({"appkey": APPKEY, "ip": "10.9.9.9"}),
    "null_port": json.dumps(dict(GOOD, port=None)),
    # no caller can dial these: every call routed there failed with a ValueError
    "ip_empty": json.dumps(dict(GOOD, ip="")),
    "tcp_port_0": json.dumps(dict(GOOD, port=0)),
    "unix_without_path": json.dumps(dict(GOOD, ip="unix://", port=0)),
}


@pytest.mark.parametrize("text", BAD_NODE_JSON.values(), ids=BAD_NODE_JSON.keys())
def test_node_json_of_the_wrong_shape_is_a_value_error(text):
    with pytest.raises(ValueError):
        Node.from_json(text)


def test_a_unix_socket_node_has_port_0():
    node = Node.from_json(json.dumps(dict(GOOD, ip="unix:///run/echo.sock", port=0)))
    assert node.address == "unix:///run/echo.sock"


def test_node_json_round_trips_and_takes_integral_fweight():
    node = Node(APPKEY, "10.0.0.1", 9000, weight=3, fweight=2.5, cell="c",
                serviceInfo={"Echo": {"unifiedProto": 1}})
    assert Node.from_json(node.to_json()) == node
    assert Node.from_dict(dict(GOOD, fweight=2)).fweight == 2.0


def test_node_json_null_values_are_defaults_as_jackson_writes_unset_fields():
    java = dict(GOOD, version=None, protocol=None, serviceInfo=None, cell=None, weight=7)
    node = Node.from_json(json.dumps(java))
    assert (node.version, node.protocol, node.serviceInfo, node.cell, node.weight) == \
        (Node.version, Node.protocol, {}, "", 7)


# --- file:// ----------------------------------------------------------------------------

def _write(data: "str | bytes") -> Callable[[str], None]:
    def plant(path: str) -> None:
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    return plant


def _huge(path: str) -> None:
    # well-formed JSON, but no node is a megabyte
    _write(json.dumps(dict(GOOD, version="a" * MAX_FILE_SIZE)))(path)


#: hostile things to find at a node file's path
BAD_FILES: Dict[str, Callable[[str], None]] = {
    **{name: _write(text) for name, text in BAD_NODE_JSON.items()},
    "not_utf8": _write(b'{"appkey": "\xff"}'),
    "directory": os.mkdir,
    "symlink_loop": lambda path: os.symlink(path, path),
    "fifo": os.mkfifo,
    "huge": _huge,
    # a well-formed copy of another node (the registered one) under this name
    "copy": _write(json.dumps({"appkey": APPKEY, "ip": "127.0.0.1", "port": 2000})),
}


def _provider_dir(root: str) -> str:
    return os.path.join(root, "prod", APPKEY, "provider")


@pytest.mark.parametrize("plant", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_file_registry_skips_a_bad_node_file_and_serves_the_rest(plant, tmp_path, caplog):
    url = f"file://{tmp_path}?ttl=30&interval=0.05"

    async def scenario():
        async with open_registry(url) as registry:
            await registry.register(Node(APPKEY, "127.0.0.1", 2000))
            plant(os.path.join(_provider_dir(str(tmp_path)), "10.9.9.9:1.json"))
            with caplog.at_level(logging.WARNING, "octo_core.registry"):
                nodes = await registry.list(APPKEY)
            assert [n.key for n in nodes] == ["127.0.0.1:2000"]
            assert "10.9.9.9:1.json" in caplog.text
    run(scenario())


@pytest.mark.parametrize("bad", ["[]", "null", DEEP, json.dumps(dict(GOOD, weight="x"))],
                         ids=["list", "null", "deep", "weight_str"])
def test_file_watch_goes_on_after_a_bad_file_appears(bad, tmp_path):
    url = f"file://{tmp_path}?ttl=30&interval=0.05"

    async def scenario():
        async with open_registry(url) as registry:
            await registry.register(Node(APPKEY, "127.0.0.1", 2000))
            seen: List[List[str]] = []
            watch = registry.watch(APPKEY, lambda nodes, _: seen.append([n.key for n in nodes]))
            try:
                await wait_until(lambda: seen, what="the first state")
                _write(bad)(os.path.join(_provider_dir(str(tmp_path)), "10.9.9.9:1.json"))
                await registry.register(Node(APPKEY, "127.0.0.1", 2001))
                await wait_until(lambda: seen[-1] == ["127.0.0.1:2000", "127.0.0.1:2001"],
                                 what="the poller to see the new node")
                await registry.unregister(APPKEY, "127.0.0.1:2000")
                await wait_until(lambda: seen[-1] == ["127.0.0.1:2001"],
                                 what="the poller to see the node leave")
            finally:
                watch.cancel()
    run(scenario())


def test_file_registration_replaces_a_bad_file_at_its_own_path(tmp_path):
    async def scenario():
        async with open_registry(f"file://{tmp_path}?ttl=30") as registry:
            os.makedirs(_provider_dir(str(tmp_path)))
            _write("[]")(os.path.join(_provider_dir(str(tmp_path)), "127.0.0.1:2000.json"))
            await registry.register(Node(APPKEY, "127.0.0.1", 2000, weight=7))
            assert [(n.key, n.weight) for n in await registry.list(APPKEY)] == \
                [("127.0.0.1:2000", 7)]
    run(scenario())


# --- zk:// ------------------------------------------------------------------------------

BAD_ZNODES: Dict[str, bytes] = {
    "list": b"[]", "null": b"null", "empty": b"", "deep": DEEP.encode(),
    "port_inf": BAD_NODE_JSON["port_inf"].encode(),
    "weight_str": BAD_NODE_JSON["weight_str"].encode(), "not_utf8": b'{"appkey": "\xff"}',
    "copy": json.dumps({"appkey": APPKEY, "ip": "127.0.0.1", "port": 2000}).encode(),
}


def test_zk_registry_skips_bad_znodes_in_list_and_watch(zookeeper_server):  # noqa: F811
    chroot = f"hostile-{uuid.uuid4().hex[:12]}"
    base = f"/{chroot}/octo/nameservice/prod/{APPKEY}/provider"
    raw = KazooClient(hosts=zookeeper_server.hosts)
    raw.start(timeout=10)

    async def scenario():
        async with open_registry(zookeeper_server.url(chroot)) as registry:
            await registry.register(Node(APPKEY, "127.0.0.1", 2000))
            for i, data in enumerate(BAD_ZNODES.values()):
                raw.create(f"{base}/10.9.9.{i}:1", data)
            raw.create(f"{base}/10.9.9.99:1", None)   # a znode without data
            assert [n.key for n in await registry.list(APPKEY)] == ["127.0.0.1:2000"]
            seen: List[List[str]] = []
            watch = registry.watch(APPKEY, lambda nodes, _: seen.append([n.key for n in nodes]))
            try:
                await wait_until(lambda: seen and seen[-1] == ["127.0.0.1:2000"],
                                 what="the first state")
                raw.set(f"{base}/10.9.9.0:1", b"null")   # a known child turns bad
                await registry.register(Node(APPKEY, "127.0.0.1", 2001))
                await wait_until(lambda: seen[-1] == ["127.0.0.1:2000", "127.0.0.1:2001"],
                                 what="the watch to see the new node")
            finally:
                watch.cancel()
    try:
        run(scenario())
    finally:
        raw.stop()
        raw.close()


@pytest.mark.parametrize("text", ["[]", "not json", '{"weight": "heavy"}', '{"status": true}',
                                  '{"fweight": "x"}', DEEP])
def test_a_malformed_operator_record_is_ignored_with_a_warning(text, caplog, tmp_path):
    """A node registers with its own fields when its operator record is garbage."""
    from octo_core.registry.base import parse_record

    assert parse_record(text, "here") == {}
    assert "malformed operator record here" in caplog.text

    async def scenario():
        async with open_registry(f"file://{tmp_path}") as registry:
            record = tmp_path / "prod" / APPKEY / "operator" / "10.9.9.9:1.json"
            record.parent.mkdir(parents=True)
            record.write_text(text)
            assert (await registry.register(Node(APPKEY, "10.9.9.9", 1, weight=4))).weight == 4
    run(scenario())
