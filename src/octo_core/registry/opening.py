"""``open_registry(url)``: the registry backend a URL names, its options checked."""
from __future__ import annotations

import math
import urllib.parse

from octo_core.checks import is_finite_number
from octo_core.errors import RegistryError
from octo_core.registry.base import Registry
from octo_core.registry.node import Env


def _env(text: str) -> int:
    by_name = {name: env for env, name in Env.NAMES.items()}
    if text in by_name:
        return by_name[text]
    if text.isdigit() and int(text) in Env.NAMES:
        return int(text)
    raise ValueError(f"unknown env {text!r}: one of {', '.join(by_name)}")


_OPTIONS = {"memory": (), "file": ("ttl", "interval"), "zk": ("timeout", "op_timeout")}


def open_registry(url: str) -> Registry:
    """A registry for ``url``.

    * ``memory://name``: in this process, shared by every registry of that name;
    * ``file:///dir``: one machine, many processes (``?ttl=10&interval=0.2``:
      seconds until a silent provider's nodes expire, seconds between polls);
    * ``zk://host:port[,host:port][/chroot]``: ZooKeeper, the tree at
      ``[/chroot]/octo/nameservice`` (``?timeout=10``: the session timeout,
      ``&op_timeout=5``: the bound on one operation, seconds). Credentials in
      the URL are refused: ZooKeeper ACLs are not supported, nodes are written
      open to all.

    Every scheme takes ``?env=prod|stage|test`` (default prod).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in _OPTIONS:
        raise ValueError(f"{url}: unknown registry scheme (memory://, file:///dir, zk://hosts/chroot)")
    options = {key: values[-1] for key, values in
               urllib.parse.parse_qs(parts.query, keep_blank_values=True).items()}
    env = _env(options.pop("env", "prod"))
    unknown = set(options) - set(_OPTIONS[parts.scheme])
    if unknown:
        raise ValueError(f"{url}: unknown option(s) {', '.join(sorted(unknown))}")

    def number(name: str, default: float) -> float:
        text = options.get(name)
        try:
            value = default if text is None else float(text)
        except ValueError:
            value = math.nan   # refused just below, naming the option
        if not is_finite_number(value):
            raise ValueError(f"{url}: {name} must be a finite positive number of seconds, "
                             f"not {text!r}")
        return value

    if parts.scheme == "memory":
        from octo_core.registry.memory import MemoryRegistry
        return MemoryRegistry(parts.netloc + parts.path, env=env)
    if parts.scheme == "file":
        if parts.netloc or not parts.path.startswith("/"):   # (file:dir would follow the cwd)
            raise ValueError(f"{url}: a file registry URL is file:///absolute/dir")
        from octo_core.registry.file import FileRegistry
        # percent-decoded, as every file URL (pathlib's as_uri() writes a space as %20)
        return FileRegistry(urllib.parse.unquote(parts.path), env=env, ttl=number("ttl", 10.0),
                            interval=number("interval", 0.2))
    if not parts.netloc:
        raise ValueError(f"{url}: a ZooKeeper URL is zk://host:port[,host:port][/chroot]")
    if "@" in parts.netloc:   # silently connecting anonymously would be worse
        raise ValueError(f"{parts.scheme}://...@{parts.netloc.rsplit('@', 1)[1]}: credentials "
                         "in a ZooKeeper URL are not supported (no ZooKeeper auth)")
    try:
        from octo_core.registry.zookeeper import ZooKeeperRegistry
    except ImportError as exc:
        raise RegistryError(f"{url}: the ZooKeeper registry needs kazoo "
                            f"(pip install octo_core[zookeeper]): {exc}") from None
    timeouts = dict(session_timeout=number("timeout", 10.0), op_timeout=number("op_timeout", 5.0))
    try:
        return ZooKeeperRegistry(parts.netloc, chroot=parts.path.rstrip("/"), env=env, **timeouts)
    except ValueError as exc:   # kazoo refuses the hosts ("Port out of range")
        raise ValueError(f"{url}: {exc}") from None
