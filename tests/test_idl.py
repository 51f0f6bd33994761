"""``load_idl``: one module per IDL file, whatever the file is called."""
from __future__ import annotations

import pytest

import octo_core


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
