"""The package surface: public names, error classes, and the import failure
when the compiled codec is missing."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import octo_core
from octo_core import codec, errors

IDL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "idl", "everything.thrift")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_import_without_compiled_codec_says_how_to_build():
    proc = run_python("""
        import sys
        sys.modules["octo_core._codec"] = None      # as if the extension were not built
        try:
            import octo_core
        except ImportError as exc:
            print("IMPORT-ERROR:", exc)
        else:
            print("IMPORTED")
    """)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "IMPORT-ERROR:" in out, out
    assert "pip install" in out
    assert "octo_core._codec" in out


def test_import_error_is_an_import_error_subclass_with_cause():
    proc = run_python("""
        import sys
        sys.modules["octo_core._codec"] = None
        try:
            import octo_core
        except ImportError as exc:
            assert isinstance(exc.__cause__, ImportError), repr(exc.__cause__)
            print("ok")
    """)
    assert proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_public_names():
    assert callable(octo_core.load_idl)
    for name in ("encode", "decode", "encode_message", "decode_message", "Limits"):
        assert callable(getattr(codec, name)), name
    for name in ("load_idl", "codec", "errors"):
        assert name in octo_core.__all__
    for name in ("encode", "decode", "encode_message", "decode_message", "Limits"):
        assert name in codec.__all__
    assert isinstance(octo_core.__version__, str)


def test_error_hierarchy_and_statuses():
    assert issubclass(errors.ProtocolError, errors.OctoError)
    assert issubclass(errors.EncodeError, errors.ProtocolError)
    assert issubclass(errors.DecodeError, errors.ProtocolError)
    assert issubclass(errors.OctoError, Exception)
    assert errors.ProtocolError.status == errors.EncodeError.status == errors.DecodeError.status == 5
    assert errors.Status.PROTOCOL_EXCEPTION == 5
    assert isinstance(errors.OctoError("x").status, int)

    e = errors.DecodeError("bad byte", offset=12)
    assert e.offset == 12 and e.status == 5 and str(e) == "bad byte"
    assert errors.DecodeError("no offset").offset is None
    enc = errors.EncodeError("S.x: expected int for i32, got str")
    assert enc.status == 5 and enc.message == "S.x: expected int for i32, got str"
    where = errors.DecodeError("bad", offset=0, method="echo", node="10.0.0.1:9000")
    assert "echo" in str(where) and "10.0.0.1:9000" in str(where)


def test_load_idl(tmp_path, idl, idl_path):
    module = octo_core.load_idl(idl_path)
    assert module is idl                      # same path and name: the same module
    assert module.__name__ == "everything_thrift"
    assert octo_core.load_idl(IDL_PATH).Everything is module.Everything
    assert hasattr(module, "EverythingService") and "echo" in module.EverythingService.thrift_services
    named = octo_core.load_idl(IDL_PATH, "other_everything_thrift")
    assert named.__name__ == "other_everything_thrift"
    # Round trip through the public API with a freshly loaded module.
    obj = named.Inner(name="n", count=3)
    assert codec.decode(named.Inner, codec.encode(obj)) == obj
    odd = tmp_path / "my-service.v2.thrift"
    odd.write_text("struct A { 1: i32 a }\n")
    assert octo_core.load_idl(str(odd)).__name__.endswith("_thrift")


def test_codec_errors_are_protocol_errors():
    module = octo_core.load_idl(IDL_PATH)
    with pytest.raises(errors.ProtocolError):
        codec.encode(module.Scalars(medium="x"))
    with pytest.raises(errors.ProtocolError):
        codec.decode(module.Scalars, b"\x08")
