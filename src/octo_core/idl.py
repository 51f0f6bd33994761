"""Loading Thrift IDL at run time (thriftpy2)."""
from __future__ import annotations

import os
import re
from types import ModuleType
from typing import Any, Dict, NamedTuple, Optional, Tuple

import thriftpy2
from thriftpy2.thrift import TType


def load_idl(path: str, module_name: Optional[str] = None) -> ModuleType:
    """Parse the ``.thrift`` file at ``path`` and return its thriftpy2 module.

    ``module_name`` must end in ``_thrift`` (thriftpy2's rule); by default it is
    the file's stem plus ``_thrift``. Loading the same path and name twice gives
    the same module, so classes compare equal across calls.
    """
    if module_name is None:
        stem = os.path.splitext(os.path.basename(path))[0]
        module_name = re.sub(r"\W", "_", stem) + "_thrift"
    return thriftpy2.load(path, module_name=module_name)


class Method(NamedTuple):
    """What the RPC layers need to know about one IDL method."""
    name: str
    args_cls: type
    result_cls: type
    oneway: bool
    arg_names: Tuple[str, ...]                 # in declaration order
    exceptions: Tuple[Tuple[str, type], ...]   # declared (result field, class)
    returns_value: bool                        # the result struct has `success`


def methods(service: Any) -> Dict[str, Method]:
    """The method table of a thriftpy2 service class, by method name."""
    table = {}
    for name in service.thrift_services:
        args_cls = getattr(service, name + "_args")
        result_cls = getattr(service, name + "_result")
        result_fields = [spec[1] for spec in result_cls.thrift_spec.values()]
        exceptions = tuple((spec[1], spec[2]) for fid, spec in result_cls.thrift_spec.items()
                           if fid != 0 and spec[0] == TType.STRUCT)
        table[name] = Method(
            name=name, args_cls=args_cls, result_cls=result_cls,
            oneway=bool(getattr(result_cls, "oneway", False)),
            arg_names=tuple(spec[1] for spec in args_cls.thrift_spec.values()),
            exceptions=exceptions, returns_value="success" in result_fields)
    return table
