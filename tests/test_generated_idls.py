"""octo_core on IDLs nobody wrote: random IDLs (``idl_generator``), random values.

For each seed, ``idl_generator`` writes a main IDL and one it includes; both
are loaded with ``octo_core.load_idl`` and compiled by Apache's ``thrift --gen
py``. Then, for values ``strategies`` draws of every struct, union and
exception and of every method's args and result:

* ``encode(x)`` is thriftpy2's bytes (pure and cybin), ``decode`` gives ``x``
  back, and thriftpy2 reads ``x`` from them;
* Apache's generated classes (pure and fastbinary) read ``x`` from our bytes,
  and octo_core reads ``x`` from theirs; where every struct lists its fields in
  id order (Apache writes by id) the bytes are the same;
* call and reply messages are thriftpy2's and Apache's bytes and decode back;
* a struct read with no field on the wire holds the IDL's defaults, as both
  peers make them.

And, for the service that extends the others (across the include), an
octo_core ``Server`` answers every method, inherited ones too (results drawn,
declared exceptions, void and oneway), to octo_core's ``AsyncClient`` over the
unified protocol and framed thrift and to a plain thriftpy2 client: the handler
gets the arguments sent, the caller the answer given.

Seeds and examples are fixed (``derandomize``): a failure names its seed, and
``python tests/idl_generator.py SEED DIR`` writes that IDL again.
"""
from __future__ import annotations

import os
import queue
import types
from typing import Any, Dict, Tuple

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from thriftpy2.thrift import TException, TMessageType

import octo_core
from octo_core.codec import decode, decode_message, encode_message

import idl_generator
import strategies as S
from conftest import apache_generate
from test_codec_differential import (apache_decode, apache_encode, apache_message, assert_same,
                                     encoded_as_thriftpy2, tp_decode, tp_message)
from wire_helpers import LOCALHOST, async_client, run, serving_in_thread, thriftpy2_client

CODEC_SEEDS = range(40)
RPC_SEEDS = range(12)
# (no "explain" phase: tracing what varies in a failing example of these values
# takes minutes)
SETTINGS = settings(max_examples=8, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- the generated IDLs, loaded by both peers ------------------------------------------------


class Built(types.SimpleNamespace):
    """One seed's IDLs: ``text``, the thriftpy2 ``service`` the RPC tests call,
    ``classes`` (name -> thriftpy2 class: structs, unions, exceptions, args and
    results), ``apache`` (Apache's generated modules) and ``results`` (the
    names of the result classes)."""


_BUILT: Dict[int, Built] = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("generated_idls"))


def built(seed: int, workdir: str) -> Built:
    """Seed ``seed``'s IDLs, written, loaded and compiled once per test run."""
    if seed not in _BUILT:
        directory = os.path.join(workdir, f"seed{seed}")
        os.makedirs(directory, exist_ok=True)
        gen = idl_generator.generate(seed, directory)
        main = octo_core.load_idl(gen.main_path, gen.main_module)
        modules = [main] + list(main.__thrift_meta__["includes"])
        classes, services = {}, {}
        for module in modules:
            classes.update(S.top_level_structs(module))
            for service in module.__thrift_meta__["services"]:
                services[service.__name__] = (module, service)
        results = set()
        for name, (module, service) in services.items():
            for method in service.thrift_services:
                classes[f"{method}_args"] = getattr(service, f"{method}_args")
                if not oneway(service, method):   # (a oneway call has no reply)
                    classes[f"{method}_result"] = getattr(service, f"{method}_result")
                    results.add(f"{method}_result")
        apache_names = ([f"{gen.apache_packages[0]}.ttypes", f"{gen.apache_packages[1]}.ttypes"]
                        + [f"{gen.apache_packages[0 if module is main else 1]}.{name}"
                           for name, (module, _) in services.items()])
        apache = apache_generate(gen.main_path, directory, *apache_names)
        _BUILT[seed] = Built(text=gen.text, service=getattr(main, gen.service), classes=classes,
                             apache=apache, results=results)
    return _BUILT[seed]


def oneway(service, method: str) -> bool:
    return bool(getattr(getattr(service, f"{method}_result"), "oneway", False))


# --- values ----------------------------------------------------------------------------------


def reply_value(draw, cls, field_name: str):
    """A result holding ``field_name`` only (a real reply sets one field at most)."""
    f = next(f for f in S.fields(cls) if f.name == field_name)
    strategy = S.structs(f.sub, max_depth=3) if S.is_struct_class(f.sub) else S.values(f.ttype, f.sub)
    return cls(**{field_name: draw(strategy)})


def draw_value(draw, b: Built, name: str):
    cls = b.classes[name]
    if name in b.results:
        names = [f.name for f in S.fields(cls)]
        if not names:
            return cls()
        return reply_value(draw, cls, draw(st.sampled_from(names)))
    return draw(S.structs(cls, max_depth=3))


# --- codec -------------------------------------------------------------------------------------


def check_codec(b: Built, name: str, x) -> None:
    """octo_core's bytes and reading of ``x`` against thriftpy2's and Apache's."""
    cls = b.classes[name]
    ours, _ = encoded_as_thriftpy2(cls, x)
    assert_same(tp_decode(cls, ours), x, cls)
    assert_same(tp_decode(cls, ours, cy=True), x, cls)
    if S.apache_compatible(cls):
        check_apache(b, cls, x, ours)


def check_apache(b: Built, cls, x, ours: bytes) -> None:
    to_apache = S.ApacheConverter(*b.apache)
    acls = to_apache.apache_class(cls)
    # Apache emits no thrift_spec for structs with negative field ids, so
    # fastbinary cannot write or read them (see everything.thrift).
    for accelerated in (False,) if S.has_negative_ids(cls) else (False, True):
        theirs = apache_encode(to_apache(x), accelerated)
        if same_bytes_as_apache(b, cls):
            assert ours == theirs, f"differs from Apache's (fastbinary: {accelerated})"
        assert_same(decode(cls, theirs), x, cls)
        assert_same(apache_decode(acls, ours, accelerated), x, cls)


def same_bytes_as_apache(b: Built, cls) -> bool:
    """Whether Apache, which writes fields by id, writes ``cls`` as we do: its
    structs all list their fields in id order. A result holds one field, so
    where thriftpy2 lists its `success` (last, id 0) does not matter."""
    return all(list(c.thrift_spec) == sorted(c.thrift_spec) for c in S.struct_classes(cls)
               if c is not cls or cls.__name__ not in b.results)


def check_message(b: Built, name: str, x) -> None:
    """A call (args) or reply (result) message of ``x``: thriftpy2's and Apache's bytes."""
    method, kind = name.rsplit("_", 1)
    if kind == "args":
        msg_type = TMessageType.ONEWAY if oneway(b.service, method) else TMessageType.CALL
    else:
        if oneway(b.service, method):
            return
        msg_type = TMessageType.REPLY
    ours = encode_message(method, msg_type, 7, x)
    assert ours == tp_message(method, msg_type, 7, x)
    if S.apache_compatible(type(x)) and same_bytes_as_apache(b, type(x)):
        aobj = S.ApacheConverter(*b.apache)(x)
        assert ours == apache_message(method, msg_type, 7, aobj)
    got_name, got_type, seqid, back = decode_message(ours, b.service)
    assert (got_name, got_type, seqid) == (method, msg_type, 7)
    assert type(back) is type(x)
    assert_same(back, x, type(x))


@pytest.mark.parametrize("seed", CODEC_SEEDS)
@SETTINGS
@given(data=st.data())
def test_codec_matches_peers(workdir, seed, data):
    b = built(seed, workdir)
    for name in sorted(b.classes):
        x = draw_value(data.draw, b, name)
        try:
            check_codec(b, name, x)
            if name.endswith(("_args", "_result")) and name.rsplit("_", 1)[0] in b.service.thrift_services:
                check_message(b, name, x)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}, {name} = {x!r}\n{b.text}") from exc




# --- RPC -------------------------------------------------------------------------------------


def answers(result_cls) -> st.SearchStrategy:
    """What a handler of a method with result ``result_cls`` gives: ``("return",
    value)`` (``None`` when void) or ``("raise", exception)``, one it declares."""
    choices = []
    for f in S.fields(result_cls):
        strategy = S.structs(f.sub, max_depth=3) if S.is_struct_class(f.sub) else S.values(f.ttype, f.sub)
        choices.append(strategy.map(lambda v, f=f: ("return" if f.name == "success" else "raise", v)))
    if not any(f.name == "success" for f in S.fields(result_cls)):
        choices.append(st.just(("return", None)))    # void
    return st.one_of(choices)


@st.composite
def scripts(draw, b: Built) -> Dict[str, Tuple[Any, Tuple[str, Any]]]:
    """For each method of the service: the args to send and the handler's answer."""
    script = {}
    for method in b.service.thrift_services:
        args = draw(S.structs(getattr(b.service, f"{method}_args"), max_depth=3))
        answer = ("return", None)
        if not oneway(b.service, method):
            answer = draw(answers(getattr(b.service, f"{method}_result")))
        script[method] = (args, answer)
    return script


class ScriptedHandler:
    """Answers each method as the script says and keeps the args it was called with."""

    def __init__(self, service, script) -> None:
        self.service = service
        self.script = script
        self.received: "queue.Queue[Tuple[str, Any]]" = queue.Queue()

    def __getattr__(self, method: str):
        if method not in self.script:
            raise AttributeError(method)
        args_cls = getattr(self.service, f"{method}_args")

        def call(*values):
            self.received.put((method, args_cls(**dict(zip([f.name for f in S.fields(args_cls)], values)))))
            kind, value = self.script[method][1]
            if kind == "raise":
                raise value
            return value
        return call


def as_kwargs(args) -> Dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in S.fields(type(args))}


def check_answer(b: Built, method: str, expected: Tuple[str, Any], outcome: Tuple[str, Any]) -> None:
    """The caller got what the handler gave (compared as a result struct holds it)."""
    assert outcome[0] == expected[0], (method, outcome, expected)
    if oneway(b.service, method) or expected[1] is None:
        assert outcome[1] is None
        return
    result_cls = getattr(b.service, f"{method}_result")
    if expected[0] == "return":
        assert_same(result_cls(success=outcome[1]), result_cls(success=expected[1]), result_cls)
    else:
        assert type(outcome[1]) is type(expected[1])
        assert_same(outcome[1], expected[1], type(expected[1]))


def check_received(handler: ScriptedHandler, method: str, sent) -> None:
    got_method, got = handler.received.get(timeout=5)
    assert got_method == method
    assert_same(got, sent, type(sent))


async def call_async(client, method: str, args) -> Tuple[str, Any]:
    try:
        return "return", await client.call(method, **as_kwargs(args))
    except TException as exc:
        return "raise", exc


def call_blocking(client, method: str, args) -> Tuple[str, Any]:
    try:
        return "return", getattr(client, method)(**as_kwargs(args))
    except TException as exc:
        return "raise", exc


async def octo_calls(b: Built, handler: ScriptedHandler, script, address: str, protocol: str) -> None:
    async with async_client(b.service, address, protocol=protocol) as client:
        for method, (args, answer) in script.items():
            check_answer(b, method, answer, await call_async(client, method, args))
            check_received(handler, method, args)


@pytest.mark.parametrize("seed", RPC_SEEDS)
@settings(SETTINGS, max_examples=3)
@given(data=st.data())
def test_rpc_on_generated_service(workdir, seed, data):
    b = built(seed, workdir)
    script = data.draw(scripts(b))
    handler = ScriptedHandler(b.service, script)
    with serving_in_thread([(b.service, handler, None)]) as server:
        for protocol in ("octo", "thrift"):
            run(octo_calls(b, handler, script, server.address, protocol))
        with thriftpy2_client(b.service, LOCALHOST, server.port) as client:
            for method, (args, answer) in script.items():
                check_answer(b, method, answer, call_blocking(client, method, args))
                check_received(handler, method, args)


# --- IDL defaults ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", CODEC_SEEDS)
def test_defaults_match_peers(workdir, seed):
    """A struct read with no field on the wire holds the IDL's defaults, as
    thriftpy2's constructor and Apache's generated classes make them."""
    b = built(seed, workdir)
    for name, cls in sorted(b.classes.items()):
        if any(f.required for f in S.fields(cls)):
            continue     # refused without them
        ours = decode(cls, b"\x00")
        assert_same(ours, cls(), cls)
        assert_same(ours, tp_decode(cls, b"\x00"), cls)
        S.check_python_types(ours)
        if S.apache_compatible(cls):
            acls = S.ApacheConverter(*b.apache).apache_class(cls)
            assert_same(apache_decode(acls, b"\x00", accelerated=False), ours, cls)
