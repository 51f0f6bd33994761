"""octo_core: an asyncio-native RPC core speaking Meituan OCTO's unified protocol and thrift."""
try:
    from octo_core import _codec  # noqa: F401  (the compiled core; nothing works without it)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "octo_core's compiled extension (octo_core._codec) is missing or was built for "
        "another Python. Build it with `pip install .` from the source tree (or "
        "`python setup.py build_ext --inplace` for development); octo_core has no "
        f"pure-Python fallback. Original error: {exc}"
    ) from exc

from octo_core import codec, errors
from octo_core.blocking_client import Client
from octo_core.client import AsyncClient
from octo_core.idl import load_idl
from octo_core.server import Server

__all__ = ["load_idl", "Server", "AsyncClient", "Client", "codec", "errors"]
__version__ = "0.1.0"
