"""``Registration``: a provider's own node in a registry, kept trying while the registry is away.

A provider that can serve should serve: its callers may still reach it from
what they last discovered (a restart keeps its ``ip:port``). So a registry that
does not answer at start costs the node its listing for a while, not the
process: ``Registration`` tries once, and while that fails keeps trying in the
background, with a capped, jittered backoff, until the registry stores the node.
"""
from __future__ import annotations

import asyncio
import logging
import random
from typing import Optional

from octo_core.protocol import NodeStatus
from octo_core.registry.base import Registry, RegistryError
from octo_core.registry.node import Node

log = logging.getLogger("octo_core.registry")

#: Seconds before the first retry; each failure doubles it, up to the last.
RETRY_FIRST, RETRY_LAST = 1.0, 30.0

#: What a registry that cannot be reached raises (a file registry: ``OSError``).
#: Anything else at start is a mistake to show at once (a node of another env, say).
UNREACHABLE = (RegistryError, OSError)


class Registration:
    """``node`` in ``registry``, as its provider keeps it: ``start``, then ``withdraw``.

    ``where`` names the registry in log messages (its URL).
    """

    def __init__(self, registry: Registry, node: Node, where: str) -> None:
        self.registry = registry
        self.node = node
        self.where = where
        # the latest ``register`` (maybe in flight): what the registry stored is its result
        self._last: Optional[asyncio.Future] = None
        self._retrying: Optional[asyncio.Task] = None
        self._withdrawn = False

    @property
    def stored(self) -> Optional[Node]:
        """What the registry stored, once it did; None before and after ``withdraw``."""
        last = self._last
        if last is None or not last.done() or last.cancelled() or last.exception() is not None:
            return None
        return last.result()

    async def start(self, required: bool) -> None:
        """Register now. If the registry cannot be reached: with ``required`` raise
        its error, else warn and go on trying in the background."""
        try:
            await self._attempt()
        except UNREACHABLE as exc:
            if required:
                raise
            if self._withdrawn:   # a stop came while it was tried: it is over
                return
            log.warning("%s: cannot register %s in %s (%s): serving unregistered, callers "
                        "reach it only from what they discovered before; registering in "
                        "the background", self.node.appkey, self.node.key, self.where, exc)
            self._retrying = asyncio.get_running_loop().create_task(self._retry())

    async def withdraw(self) -> bool:
        """Stop trying; mark the node STOPPING, then unregister it, if it was
        registered, by an attempt that ended before or ends now (a stop during
        the start's attempt waits for it). True when the registry took the
        STOPPING mark: callers are being told (a registry away tells no one,
        so nothing is worth waiting for). A registry that fails is logged,
        never raised: it must not hold up a stop. Cancelled before it is done,
        it may be called again: the node is still withdrawn whole."""
        self._withdrawn = True
        retrying, self._retrying = self._retrying, None
        if retrying is not None:
            retrying.cancel()
            await asyncio.gather(retrying, return_exceptions=True)   # (it ends cancelled)
        last = self._last
        if last is not None and not last.done():   # (bounded by the registry's own time limit)
            await asyncio.wait({last})
        told = False
        if self.stored is not None:
            node = self.node
            try:
                await self.registry.update(node.appkey, node.key, status=NodeStatus.STOPPING)
                told = True
                await self.registry.unregister(node.appkey, node.key)
            except Exception as exc:  # a registry outage must not block a stop
                log.warning("%s: could not unregister %s: %s", node.appkey, node.key, exc)
        self._last = None   # (only now: a withdraw cancelled before this one is done again)
        return told

    async def _attempt(self) -> None:
        """One ``register``. Cancelled meanwhile, it leaves the attempt running:
        ``withdraw`` waits for its answer and takes back a registration that lands."""
        self._last = asyncio.ensure_future(self.registry.register(self.node))
        await asyncio.shield(self._last)

    async def _retry(self) -> None:
        """Try again after a doubling, jittered pause until the registry stores the node."""
        delay, attempts = RETRY_FIRST, 1
        while True:
            # jittered: the providers that restarted in one outage do not all come back at once
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            attempts += 1
            try:
                await self._attempt()
            except Exception as exc:   # whatever fails, the next attempt may work
                delay = min(2 * delay, RETRY_LAST)
                log.warning("%s: registering %s in %s failed again (attempt %d: %s); "
                            "retrying within %.0fs", self.node.appkey, self.node.key,
                            self.where, attempts, exc, delay)
                continue
            log.warning("%s: registered %s in %s after %d attempts (it served unregistered "
                        "until now)", self.node.appkey, self.node.key, self.where, attempts)
            return
