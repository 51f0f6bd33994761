"""``octo call`` and the JSON form of thrift values it reads and prints (``octo_core.jsonvalue``)."""
from __future__ import annotations

import io
import json
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings

import octo_core
from octo_core import cli, jsonvalue

import strategies
from wire_helpers import ECHO_IDL, SERVER_APPKEY, EchoHandler, echo_services, serving_in_thread

HERE = os.path.dirname(os.path.abspath(__file__))
everything = octo_core.load_idl(os.path.join(HERE, "idl", "everything.thrift"),
                                module_name="call_cli_everything_thrift")
#: every struct and exception of the IDL
STRUCTS = [value for value in vars(everything).values()
           if isinstance(value, type) and hasattr(value, "thrift_spec")
           and not hasattr(value, "thrift_services")]


def round_trip(obj):
    """``obj`` through its JSON text and back."""
    text = json.dumps(jsonvalue.struct_to_json(obj))
    return jsonvalue.struct_from_json(type(obj), json.loads(text), "value")


@pytest.mark.parametrize("cls", STRUCTS, ids=lambda c: c.__name__)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=strategies.st.data())
def test_every_value_of_every_type_comes_back_from_its_json(cls, data):
    obj = data.draw(strategies.structs(cls, max_depth=3))
    assert strategies.canonical(round_trip(obj)) == strategies.canonical(obj)


@pytest.mark.parametrize("given_json, why", [
    ('{"text": 5}', r"args\.text: expected a string, got 5"),
    ('{"txt": "x"}', r"echo_args has no field 'txt' \(its fields: text\)"),
    ('[1]', r"args: expected an object of echo_args's fields, got \[1\]"),
])
def test_arguments_that_do_not_fit_say_where_and_what_was_expected(given_json, why):
    with pytest.raises(ValueError, match=why):
        jsonvalue.args_from_json(octo_core.load_idl(ECHO_IDL).Echo.echo_args, json.loads(given_json))


def test_the_json_forms_of_the_types_json_lacks():
    """binary as base64, enums by name, sets as arrays, maps with number keys as
    objects and with struct keys as pairs; and their refusals."""
    color = everything.Color
    assert jsonvalue.from_json(8, color, "BLUE", "c") == color.BLUE
    assert jsonvalue.from_json(8, color, 2, "c") == color.BLUE
    assert jsonvalue.to_json(8, color, color.INFRARED) == "INFRARED"
    assert jsonvalue.from_json(18, None, "aGk=", "b") == b"hi"
    assert jsonvalue.to_json(18, None, b"\xff\x00") == "/wA="
    assert jsonvalue.from_json(13, (8, 11), {"-2": "x", "7": "y"}, "m") == {-2: "x", 7: "y"}
    assert jsonvalue.to_json(13, (8, 11), {-2: "x"}) == {"-2": "x"}
    point = (12, everything.Point)
    pairs = [[{"x": 1, "y": 2}, "a"]]
    assert jsonvalue.from_json(13, (point, 11), pairs, "m") == {everything.Point(x=1, y=2): "a"}
    assert jsonvalue.to_json(13, (point, 11), {everything.Point(x=1, y=2): "a"}) == pairs
    assert jsonvalue.to_json(14, 11, {"b", "a"}) == ["a", "b"]
    for spec, value, why in [
            ((8, color), "PURPLE", r"'PURPLE' is no Color \(one of RED, GREEN"),
            ((3, None), 128, "128 does not fit in 8 bits"),
            ((18, None), "not base64!", "binary is given as base64 text"),
            ((2, None), 1, "expected a boolean, got 1"),
            ((13, (point, 11)), {"p": "a"}, r"give it as an array of \[key, value\] pairs")]:
        with pytest.raises(ValueError, match=why):
            jsonvalue.from_json(*spec, value, "here")


def test_map_keys_that_are_lists_or_sets_are_read_from_pairs():
    """JSON arrays for keys of list or set type become the tuples and frozensets the
    codec takes (a dict cannot hold lists): `octo call` crashed with a TypeError."""
    keyed = octo_core.load_idl(os.path.join(HERE, "idl", "adversarial.thrift")).Keyed
    given_json = {"by_list": [[[1, -2], 3], [[], 4]], "by_set": [[[5, 5, 6], 7]]}
    made = jsonvalue.struct_from_json(keyed, given_json, "k")
    assert made.by_list == {(1, -2): 3, (): 4}
    assert made.by_set == {frozenset({5, 6}): 7}
    assert jsonvalue.struct_to_json(made) == {"by_list": [[[1, -2], 3], [[], 4]],
                                             "by_set": [[[5, 6], 7]]}
    nested = ((15, (14, 8)), 11)   # map<list<set<i32>>, string>
    assert jsonvalue.from_json(13, nested, [[[[2, 1], []], "x"]], "m") \
        == {(frozenset({1, 2}), frozenset()): "x"}
    with pytest.raises(ValueError, match=r"m key 0: a map cannot be a map key in Python"):
        jsonvalue.from_json(13, ((13, (11, 8)), 11), [[{"a": 1}, "x"]], "m")


class Answers(EchoHandler):
    def echo(self, text: str) -> str:
        return text.upper()


def run_cli(capsys, *argv):
    """``octo call`` with ``argv``: (exit status, stdout, stderr)."""
    status = cli.main(["call", *argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("protocol", ["octo", "thrift"])
def test_octo_call_prints_the_answer_and_a_declared_exception_as_json(capsys, protocol):
    with serving_in_thread(echo_services(Answers())) as server:
        host = ["--host", server.address, "--protocol", protocol]
        assert run_cli(capsys, ECHO_IDL, "Echo.echo", '{"text": "héllo"}', *host) \
            == (0, '"HÉLLO"\n', "")
        status, out, err = run_cli(capsys, ECHO_IDL, "fail", '{"kind": "declared"}', *host)
        assert status == 1 and err == ""
        assert json.loads(out) == {"EchoError": {"message": "refused on purpose", "code": 42}}
        assert run_cli(capsys, ECHO_IDL, "Echo.ping", *host) == (0, "null\n", "")
        status, out, err = run_cli(capsys, ECHO_IDL, "Echo.fail", '{"kind": "undeclared"}', *host)
        assert status == 1 and out == "" and "ValueError: boom" in err


def test_octo_call_finds_the_nodes_in_a_registry(capsys, tmp_path):
    url = f"file://{tmp_path}"
    with serving_in_thread(echo_services(Answers()), registry=url, unregister_delay=0.0):
        assert run_cli(capsys, ECHO_IDL, "echo", '{"text": "found"}', "--registry", url,
                       "--remote-appkey", SERVER_APPKEY) == (0, '"FOUND"\n', "")


def test_octo_call_reads_its_arguments_from_stdin(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO('{"text": "from stdin"}'))
    with serving_in_thread(echo_services(Answers())) as server:
        assert run_cli(capsys, ECHO_IDL, "echo", "-", "--host", server.address) \
            == (0, '"FROM STDIN"\n', "")


def test_octo_call_says_why_a_call_could_not_be_made(capsys):
    status, out, err = run_cli(capsys, ECHO_IDL, "echo", '{"text": "x"}',
                               "--host", "127.0.0.1:1", "--timeout", "2")
    assert status == 1 and out == "" and err.startswith("octo call: ")


@pytest.mark.parametrize("argv, why", [
    ([ECHO_IDL, "whoami", "--host", "h:1"],
     r"2 services with a method 'whoami'; it has: .*Calc\.whoami.* \(name the service\)"),
    ([ECHO_IDL, "Echo.add", "--host", "h:1"], "no method 'Echo.add'; it has: Calc.add, "),
    ([ECHO_IDL, "Nope.echo", "--host", "h:1"], r"no service 'Nope' \(it has: Echo, Calc\)"),
    ([ECHO_IDL, "echo", "{not json", "--host", "h:1"], "Expecting property name"),
    ([ECHO_IDL, "echo", '{"text": 1}', "--host", "h:1"], r"args\.text: expected a string"),
    ([ECHO_IDL, "echo", "--registry", "file:///tmp"], "--registry needs --remote-appkey"),
    ([ECHO_IDL, "echo", "--registry", "memory://x", "--remote-appkey", "a"],
     "a memory registry lives in one process"),
    (["/no/such.thrift", "echo", "--host", "h:1"], "No such file"),
    ([ECHO_IDL, "echo"], "one of the arguments --host --registry is required"),
    ([ECHO_IDL, "echo", "--host", "nonsense"], "address 'nonsense' is not host:port"),
    ([ECHO_IDL, "echo", "--registry", "bogus://x", "--remote-appkey", "a.b"],
     "unknown registry scheme"),
    ([ECHO_IDL, "echo", "--host", "h:1", "--token", "t"], "--token needs --remote-appkey"),
    ([ECHO_IDL, "echo", "[" * 100_000, "--host", "h:1"], "recursion"),
    ([ECHO_IDL, "echo", "--registry", "file://tmp/x", "--remote-appkey", "a"],
     "a file registry URL is file:///absolute/dir"),
    ([ECHO_IDL, "echo", "--registry", "file:///no/such/dir", "--remote-appkey", "a"],
     "no such directory"),
], ids=["ambiguous", "no method", "no service", "bad json", "bad value", "no appkey",
        "memory registry", "no idl", "no node", "bad host", "bad registry", "token alone",
        "deep json", "bad registry URL", "no registry dir"])
def test_octo_call_refuses_what_it_cannot_call_as_a_usage_error(capsys, argv, why):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["call", *argv])
    assert exit_.value.code == 2
    assert re.search(why, capsys.readouterr().err)
