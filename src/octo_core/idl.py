"""Loading Thrift IDL at run time (thriftpy2)."""
from __future__ import annotations

import os
import re
from types import ModuleType
from typing import Optional

import thriftpy2


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
