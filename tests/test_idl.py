"""``load_idl``: one module per IDL file, whatever the file is called."""
from __future__ import annotations

import os
import re

import pytest
import thriftpy2
import thriftpy2.thrift
from thriftpy2.parser.exc import ThriftGrammarError

import octo_core

from wire_helpers import CLIENT_APPKEY, SERVER_APPKEY, EchoHandler, echo_thrift


def test_two_idl_files_of_one_name_are_two_modules(tmp_path):
    """Services often name their IDL ``service.thrift``: a client of two of them
    must get each file's own module (thriftpy2 caches modules by name)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "twin_named.thrift").write_text("service Echo { string echo(1: string s) }\n")
    (tmp_path / "b" / "twin_named.thrift").write_text("service Other { i32 add(1: i32 x) }\n")
    first = octo_core.load_idl(str(tmp_path / "a" / "twin_named.thrift"))
    second = octo_core.load_idl(str(tmp_path / "b" / "twin_named.thrift"))
    assert hasattr(first, "Echo") and not hasattr(first, "Other")
    assert hasattr(second, "Other") and not hasattr(second, "Echo")
    assert first.__name__ == "twin_named_thrift" and second.__name__.endswith("_thrift")
    # the same file, however it is named, is the same module (its classes compare equal)
    again = octo_core.load_idl(str(tmp_path / "b" / ".." / "b" / "twin_named.thrift"))
    assert again is second
    with pytest.raises(ValueError, match="is taken by the IDL"):
        octo_core.load_idl(str(tmp_path / "b" / "twin_named.thrift"), module_name="twin_named_thrift")


def test_the_includes_of_two_idl_files_of_one_name_stay_apart_too(tmp_path):
    """Each ``echo.thrift`` includes its own ``shared.thrift``: the second file's
    module must see its own ``Item``, not the first one's."""
    for side, field in (("a", "i32 count"), ("b", "string label")):
        (tmp_path / side).mkdir()
        (tmp_path / side / "shared.thrift").write_text(f"struct Item {{ 1: {field} }}\n")
        (tmp_path / side / "twin_incl.thrift").write_text(
            'include "shared.thrift"\nservice Echo { shared.Item get() }\n')
    first = octo_core.load_idl(str(tmp_path / "a" / "twin_incl.thrift"))
    second = octo_core.load_idl(str(tmp_path / "b" / "twin_incl.thrift"))
    assert first.shared.Item.thrift_spec[1][1] == "count"
    assert second.shared.Item.thrift_spec[1][1] == "label"
    # the second one's structs pickle too (thriftpy2's structs do)
    import pickle
    item = second.shared.Item(label="x")
    assert pickle.loads(pickle.dumps(item)) == item


def test_two_services_each_with_its_own_include_of_one_name_keep_their_own(tmp_path):
    """A client of two services, each shipping its own ``common.thrift`` beside
    its IDL: thriftpy2 names an include by its relative path and caches it by
    that name, so the second service would get the first one's ``Item``
    (silently wrong types on the wire). Each must see its own; and two IDLs of
    one directory still share the one include (its classes are the same)."""
    for side, field in (("a", "string name"), ("b", "i64 id")):
        (tmp_path / side).mkdir()
        (tmp_path / side / "stray_common.thrift").write_text(f"struct Item {{ 1: {field} }}\n")
        (tmp_path / side / f"stray_{side}.thrift").write_text(
            'include "stray_common.thrift"\nservice S { stray_common.Item get() }\n')
    (tmp_path / "b" / "stray_b2.thrift").write_text(
        'include "stray_common.thrift"\nservice S2 { stray_common.Item get() }\n')
    first = octo_core.load_idl(str(tmp_path / "a" / "stray_a.thrift"))
    second = octo_core.load_idl(str(tmp_path / "b" / "stray_b.thrift"))
    assert first.stray_common.Item.thrift_spec[1][1] == "name"
    assert second.stray_common.Item.thrift_spec[1][1] == "id"
    third = octo_core.load_idl(str(tmp_path / "b" / "stray_b2.thrift"))
    assert third.stray_common is second.stray_common
    assert octo_core.load_idl(str(tmp_path / "b" / "stray_b.thrift")) is second
    import pickle
    item = second.stray_common.Item(id=7)
    assert pickle.loads(pickle.dumps(item)) == item


def test_an_include_of_an_idl_loaded_privately_is_not_handed_to_another_file(tmp_path):
    """The stray-include check parses the second service's IDL with its
    includes under their plain names, and thriftpy2 caches those: a later IDL of
    one of those names from a third directory (``own_only.thrift``) got the
    second service's file's module, types and all, though nothing of that name
    was loaded. It gets its own."""
    for side, field in (("a", "string name"), ("b", "i64 id")):
        (tmp_path / side).mkdir()
        (tmp_path / side / "own_common.thrift").write_text(f"struct Item {{ 1: {field} }}\n")
    (tmp_path / "a" / "own_a.thrift").write_text(
        'include "own_common.thrift"\nservice S { own_common.Item get() }\n')
    (tmp_path / "b" / "own_only.thrift").write_text("struct Only { 1: string of_b }\n")
    (tmp_path / "b" / "own_b.thrift").write_text(
        'include "own_common.thrift"\ninclude "own_only.thrift"\n'
        "service S { own_common.Item get(1: own_only.Only only) }\n")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "own_only.thrift").write_text("struct Only { 1: i32 of_c }\n")
    octo_core.load_idl(str(tmp_path / "a" / "own_a.thrift"))
    second = octo_core.load_idl(str(tmp_path / "b" / "own_b.thrift"))
    assert second.__name__ != "own_b_thrift"   # (its include was another file's: private)
    third = octo_core.load_idl(str(tmp_path / "c" / "own_only.thrift"))
    assert third.__thrift_file__ == str(tmp_path / "c" / "own_only.thrift")
    assert third.Only.thrift_spec[1][1] == "of_c"
    assert octo_core.load_idl(str(tmp_path / "c" / "own_only.thrift")) is third

def test_an_include_that_does_not_start_its_line_is_checked_too(tmp_path):
    """The check that skips the second parse of an IDL without includes looked
    only for lines starting with ``include``: after a ``namespace`` on the same
    line (or a comment), the include was missed, and the second service got the
    first one's ``common`` types."""
    for side, field in (("a", "string name"), ("b", "i64 id")):
        (tmp_path / side).mkdir()
        (tmp_path / side / "inline_common.thrift").write_text(f"struct Item {{ 1: {field} }}\n")
    (tmp_path / "a" / "inline_a.thrift").write_text(
        'include "inline_common.thrift"\nservice S { inline_common.Item get() }\n')
    (tmp_path / "b" / "inline_b.thrift").write_text(
        'namespace py inline_b; /* ours */ include "inline_common.thrift"\n'
        "service S { inline_common.Item get() }\n")
    first = octo_core.load_idl(str(tmp_path / "a" / "inline_a.thrift"))
    second = octo_core.load_idl(str(tmp_path / "b" / "inline_b.thrift"))
    assert first.inline_common.Item.thrift_spec[1][1] == "name"
    assert second.inline_common.Item.thrift_spec[1][1] == "id"


def test_an_idl_with_includes_is_parsed_once(tmp_path, monkeypatch):
    """The stray-include check parses the IDL; load then parsed it again, which
    doubled a big IDL's load time. Each file is parsed once now."""
    import thriftpy2.parser.parser as thrift_parser

    parsed = []
    parse_data = thrift_parser._parse_data

    def counting(data, thrift, *args, **kwargs):
        parsed.append(os.path.basename(thrift.__thrift_file__))
        return parse_data(data, thrift, *args, **kwargs)

    monkeypatch.setattr(thrift_parser, "_parse_data", counting)
    (tmp_path / "once_common.thrift").write_text("struct Item { 1: string name }\n")
    (tmp_path / "once.thrift").write_text(
        'include "once_common.thrift"\nservice S { once_common.Item get() }\n')
    module = octo_core.load_idl(str(tmp_path / "once.thrift"))
    assert sorted(parsed) == ["once.thrift", "once_common.thrift"]
    assert module.S.get_result.thrift_spec[0][2] is module.once_common.Item


def test_includes_are_found_in_include_dirs_as_thrift_dash_i_finds_them(tmp_path, monkeypatch):
    """An IDL tree built for ``thrift -I common``: ``include "base/dirs_types.thrift"``
    is not beside the service's file but under an include directory (given
    relative to the current directory)."""
    (tmp_path / "common" / "base").mkdir(parents=True)
    (tmp_path / "svc").mkdir()
    (tmp_path / "common" / "base" / "dirs_types.thrift").write_text(
        "struct Money { 1: i64 cents, 2: string currency }\n")
    (tmp_path / "svc" / "dirs_pay.thrift").write_text(
        'include "base/dirs_types.thrift"\n'
        "service Pay { dirs_types.Money charge(1: dirs_types.Money amount) }\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="base/dirs_types.thrift"):
        octo_core.load_idl("svc/dirs_pay.thrift")
    module = octo_core.load_idl("svc/dirs_pay.thrift", include_dirs=["common"])
    money = module.dirs_types.Money(cents=250, currency="EUR")
    assert octo_core.codec.decode(type(money), octo_core.codec.encode(money)) == money
    assert module.Pay.charge_args.thrift_spec[1][2] is module.dirs_types.Money


def test_the_same_idl_is_the_same_module_after_a_chdir(tmp_path, monkeypatch):
    (tmp_path / "idl").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "idl" / "chdir_twin.thrift").write_text("struct Msg { 1: string text }\n")
    monkeypatch.chdir(tmp_path)
    first = octo_core.load_idl("idl/chdir_twin.thrift")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert octo_core.load_idl(str(tmp_path / "idl" / "chdir_twin.thrift")) is first


def test_a_symlinked_idl_finds_its_includes_beside_the_link(tmp_path):
    """IDL trees made of links (Bazel runfiles, vendored directories) resolve
    includes from where the link is, as thriftpy2 does."""
    (tmp_path / "real").mkdir()
    (tmp_path / "tree").mkdir()
    (tmp_path / "real" / "linked_svc.thrift").write_text(
        'include "common.thrift"\nservice Svc { common.Id fresh() }\n')
    (tmp_path / "tree" / "common.thrift").write_text("typedef i64 Id\n")
    (tmp_path / "tree" / "linked_svc.thrift").symlink_to(tmp_path / "real" / "linked_svc.thrift")
    module = octo_core.load_idl(str(tmp_path / "tree" / "linked_svc.thrift"))
    assert hasattr(module, "Svc")


def test_a_declared_exception_raised_from_its_include_loaded_on_its_own_is_declared(tmp_path):
    """``load_idl`` of an include gives other classes than the including IDL's
    copy; the server matches the twin, as the encoder does (same name, same
    fields), so the caller gets the declared exception, not status 1."""
    from octo_core.errors import ApplicationError
    from wire_helpers import run, serving

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "twin_base.thrift").write_text(
        "exception Refused { 1: string why }\nexception Other { 1: i32 code }\n")
    (tmp_path / "twin_top.thrift").write_text(
        'include "sub/twin_base.thrift"\n'
        "service Top { void go(1: i32 how) throws (1: twin_base.Refused refused) }\n")
    base = octo_core.load_idl(str(tmp_path / "sub" / "twin_base.thrift"))
    top = octo_core.load_idl(str(tmp_path / "twin_top.thrift"))
    assert base.Refused is not top.twin_base.Refused

    class Handler:
        async def go(self, how: int) -> None:
            raise base.Refused(why="no") if how else base.Other(code=1)

    async def main():
        async with serving([(top.Top, Handler(), None)]) as server, \
                octo_core.AsyncClient(top.Top, appkey="com.example.caller",
                                      hosts=[server.address], timeout=5) as client:
            with pytest.raises(top.twin_base.Refused) as declared:
                await client.go(1)
            assert declared.value.why == "no"
            with pytest.raises(ApplicationError):   # undeclared: no twin among the declared
                await client.go(0)
    run(main())


def test_a_void_methods_exception_named_success_or_with_id_0_is_raised(tmp_path):
    """A void method has no result value: a declared exception named ``success``
    (or with field id 0) is an exception like any other, raised to the caller, as
    Apache's generated clients raise it (it was taken for the return value: the
    client returned it, and a handler's ignored return value became an
    INTERNAL_ERROR; one with id 0 was not declared at all)."""
    from octo_core.idl import methods
    from wire_helpers import run, serving

    (tmp_path / "void_success.thrift").write_text(
        "exception Refused { 1: string why }\n"
        "service Svc {\n"
        "  void named(1: i32 how) throws (1: Refused success),\n"
        "  void zero(1: i32 how) throws (0: Refused refused),\n"
        "  Refused value(),\n"
        "}\n")
    module = octo_core.load_idl(str(tmp_path / "void_success.thrift"))
    table = methods(module.Svc)
    assert not table["named"].returns_value and not table["zero"].returns_value
    assert table["named"].exceptions == (("success", module.Refused),)
    assert table["zero"].exceptions == (("refused", module.Refused),)
    assert table["value"].returns_value and table["value"].exceptions == ()

    class Handler:
        async def named(self, how: int) -> str:
            if how:
                raise module.Refused(why="named")
            return "ignored: the method is void"

        async def zero(self, how: int) -> None:
            if how:
                raise module.Refused(why="zero")

        async def value(self):
            return module.Refused(why="returned")

    async def main():
        async with serving([(module.Svc, Handler(), None)]) as server:
            for protocol in ("octo", "thrift"):
                async with octo_core.AsyncClient(module.Svc, appkey="com.example.caller",
                                                 hosts=[server.address], timeout=5,
                                                 protocol=protocol) as client:
                    for method in ("named", "zero"):
                        with pytest.raises(module.Refused) as raised:
                            await client.call(method, 1)
                        assert raised.value.why == method
                        assert await client.call(method, 0) is None
                    returned = await client.value()
                    assert isinstance(returned, module.Refused) and returned.why == "returned"
    run(main())


@pytest.mark.parametrize("declaration, says", [
    ("struct Bad { 1: string await }", "bad_defs_thrift.Bad: field 'await' is a Python keyword"),
    ("struct Bad { 1: i32 None }", "bad_defs_thrift.Bad: field 'None' is a Python keyword"),
    ("service Bad { string get() throws (1: Refused success) }",
     "bad_defs_thrift.get_result: a non-void method's exception is named 'success'"),
], ids=["await", "None", "success"])
def test_a_definition_thriftpy2_cannot_build_is_refused_not_dropped(tmp_path, declaration, says):
    """thriftpy2 builds each struct's ``__init__`` from its field names; the
    ``SyntaxError`` of a name it cannot take reached its parser, which took it
    for its own and went on without the definitions around it: the module came
    back without them (here ``After`` and ``Later``, or the service itself) and
    the caller met an AttributeError far from the cause. An IDL including such
    a file is refused too."""
    (tmp_path / "bad_defs.thrift").write_text(
        "exception Refused { 1: string why }\n"
        f"{declaration}\n"
        "struct After { 1: i32 x }\n"
        "service Later { void ping() }\n")
    (tmp_path / "bad_user.thrift").write_text('include "bad_defs.thrift"\n'
                                              "service User { void ping() }\n")
    generate = thriftpy2.thrift.init_func_generator
    with pytest.raises(ThriftGrammarError, match=re.escape(says)):
        octo_core.load_idl(str(tmp_path / "bad_defs.thrift"))
    with pytest.raises(ThriftGrammarError, match=re.escape(says)):
        octo_core.load_idl(str(tmp_path / "bad_user.thrift"))
    assert thriftpy2.thrift.init_func_generator is generate   # thriftpy2 left as it was


@pytest.mark.parametrize("given, says", [
    (echo_thrift, "octo_wire_echo_thrift is the IDL's module; give one of its services: "
                  "octo_wire_echo_thrift.Calc, octo_wire_echo_thrift.Echo"),
    (EchoHandler(), "expected a thriftpy2 service class"),
    ("Echo", "not 'Echo'"),
], ids=["the module", "a handler", "a name"])
def test_what_is_no_service_class_is_refused_saying_what_to_give(given, says):
    """Each went on to an AttributeError from inside (``thrift_services``,
    ``__name__``) that did not say what was wrong."""
    with pytest.raises(TypeError, match=re.escape(says)):
        octo_core.AsyncClient(given, appkey=CLIENT_APPKEY, hosts=["127.0.0.1:1"])
    with pytest.raises(TypeError, match=re.escape(says)):
        octo_core.Server(SERVER_APPKEY).add_service(given, EchoHandler())


def test_an_idl_thriftpy2_loaded_already_is_that_very_module(tmp_path):
    """A service moving from thriftpy2 keeps its ``thriftpy2.load`` (in a shared
    models module, say) beside ``load_idl`` for a while: one file is one module,
    so the structs and exceptions either side makes are the other's too."""
    (tmp_path / "mig_common.thrift").write_text("exception Missing { 1: i64 id }\n")
    path = tmp_path / "mig_users.thrift"
    path.write_text('include "mig_common.thrift"\n'
                    "service Users { void get(1: i64 id) throws (1: mig_common.Missing m) }\n")
    theirs = thriftpy2.load(str(path), module_name="mig_users_thrift",
                            include_dirs=[str(tmp_path)])
    ours = octo_core.load_idl(str(path))
    assert ours is theirs
    assert ours.mig_common.Missing is theirs.mig_common.Missing
