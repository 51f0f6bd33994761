"""Loading Thrift IDL at run time (thriftpy2)."""
from __future__ import annotations

import hashlib
import os
import re
import sys
import types
from types import ModuleType
from typing import Any, Dict, NamedTuple, Optional, Tuple

import thriftpy2
from thriftpy2.thrift import TType


def load_idl(path: str, module_name: Optional[str] = None) -> ModuleType:
    """Parse the ``.thrift`` file at ``path`` and return its thriftpy2 module.

    ``module_name`` must end in ``_thrift`` (thriftpy2's rule); by default it is
    the file's stem plus ``_thrift``, or, when a module of that name came from
    another file (two ``echo.thrift`` in different directories), that name
    under a package named by a digest of the path (``_1a2b3c4d.echo_thrift``),
    so that its includes get names of their own too. Loading the same file
    twice gives the same module, so classes compare equal across calls. A
    ``module_name`` given that another file's module already has is a
    ``ValueError`` (thriftpy2 would hand back that other module).
    """
    real = os.path.realpath(path)    # to compare files
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    name = module_name or stem + "_thrift"
    holder = _loaded_from(name)
    if holder is not None and holder != real:
        if module_name is not None:
            raise ValueError(f"module name {module_name!r} is taken by the IDL {holder}; "
                             "give this one another name")
        package = f"_{hashlib.sha1(real.encode()).hexdigest()[:8]}"
        # an importable (empty) package, so that pickle finds "<package>.<name>"
        sys.modules.setdefault(package, types.ModuleType(package)).__path__ = []
        name = f"{package}.{name}"
    # absolute, as given (not resolved): includes are found beside a symlink, and
    # the file is the same one after a chdir
    return thriftpy2.load(os.path.abspath(path), module_name=name)


def _loaded_from(module_name: str) -> Optional[str]:
    """The IDL file the loaded module ``module_name`` came from, if there is one."""
    module = sys.modules.get(module_name)
    source = getattr(module, "__thrift_file__", None)
    return os.path.realpath(source) if source else None


class Method(NamedTuple):
    """What the RPC layers need to know about one IDL method."""
    name: str
    args_cls: type
    result_cls: type
    oneway: bool
    arg_names: Tuple[str, ...]                 # in declaration order
    exceptions: Tuple[Tuple[str, type], ...]   # declared (result field, class)
    returns_value: bool                        # the result struct has `success`


def check_service(service: Any) -> None:
    """``TypeError`` unless ``service`` is a thriftpy2 service class (``echo_thrift.Echo``):
    the module ``load_idl`` returns, a handler or a name are common slips."""
    if isinstance(service, type) and hasattr(service, "thrift_services"):
        return
    if isinstance(service, ModuleType):
        inside = sorted(name for name, value in vars(service).items()
                        if isinstance(value, type) and hasattr(value, "thrift_services"))
        raise TypeError(f"{service.__name__} is the IDL's module; give one of its services: "
                        + (", ".join(f"{service.__name__}.{name}" for name in inside)
                           or "(it declares none)"))
    raise TypeError(f"expected a thriftpy2 service class (a service of the module load_idl "
                    f"returns, such as echo_thrift.Echo), not {service!r}")


def methods(service: Any) -> Dict[str, Method]:
    """The method table of a thriftpy2 service class, by method name (``TypeError``
    for anything else: see ``check_service``)."""
    check_service(service)
    table = {}
    for name in service.thrift_services:
        args_cls = getattr(service, name + "_args")
        result_cls = getattr(service, name + "_result")
        spec = result_cls.thrift_spec
        # The value is field 0 named success (thriftpy2 adds it for a non-void
        # method); a void method's exception may be named success, or have id 0.
        returns_value = spec.get(0, (None, None))[1] == "success"
        exceptions = tuple((field[1], field[2]) for fid, field in spec.items()
                           if not (fid == 0 and returns_value) and field[0] == TType.STRUCT)
        table[name] = Method(
            name=name, args_cls=args_cls, result_cls=result_cls,
            oneway=bool(getattr(result_cls, "oneway", False)),
            arg_names=tuple(field[1] for field in args_cls.thrift_spec.values()),
            exceptions=exceptions, returns_value=returns_value)
    return table
