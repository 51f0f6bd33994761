"""``Registration``: a provider's own node in a registry, kept trying while the registry is away.

A provider that can serve should serve: its callers may still reach it from
what they last discovered (a restart keeps its ``ip:port``). So a registry that
does not answer at start costs the node its listing for a while, not the
process: ``Registration`` tries once, and while that fails keeps trying in the
background, with a capped, jittered backoff, until the registry stores the node.

Every call it makes waits at most ``call_timeout(registry)``, twice the
registry's ``op_timeout``: a registry that does not answer is one that cannot
be reached, so a start does not hang on it, nor does a stop. An attempt given
up on (cancelled) may still store the node: a withdrawal then unregisters it
all the same.
"""
from __future__ import annotations

import asyncio
import logging
import random
from typing import Awaitable, Optional, TypeVar

from octo_core.protocol import NodeStatus
from octo_core.errors import RegistryError, RegistryTimeout
from octo_core.registry.base import Registry
from octo_core.registry.node import Node

log = logging.getLogger("octo_core.registry")

T = TypeVar("T")

#: Seconds before the first retry; each failure doubles it, up to the last.
RETRY_FIRST, RETRY_LAST = 1.0, 30.0

#: A call to the registry is given up on (``RegistryTimeout``) after this many of
#: its ``op_timeout``: a backend that bounds its own waits by one (ZooKeeper: for
#: a session, for an answer) fails first, on its own, when it cannot be reached.
CALL_TIMEOUTS = 2

#: What a registry that cannot be reached raises (a file registry: ``OSError``; one
#: that does not answer in time: ``RegistryTimeout``, a ``RegistryError``).
#: Anything else at start is a mistake to show at once (a node of another env, say).
UNREACHABLE = (RegistryError, OSError)


def call_timeout(registry: Registry) -> float:
    """Seconds a ``Registration`` waits for one call to ``registry``."""
    return CALL_TIMEOUTS * registry.op_timeout


class Registration:
    """``node`` in ``registry``, as its provider keeps it: ``start``, then ``withdraw``.

    ``where`` names the registry in log messages (its URL). Each call to the
    registry is given up on past ``timeout`` (see the module docstring).
    """

    def __init__(self, registry: Registry, node: Node, where: str) -> None:
        self.registry = registry
        self.node = node
        self.where = where
        self.timeout = call_timeout(registry)
        # the latest ``register`` (maybe in flight): what the registry stored is its result
        self._last: Optional[asyncio.Future] = None
        self._retrying: Optional[asyncio.Task] = None
        self._withdrawn = False
        # an attempt was given up on unanswered: it may store the node yet
        self._abandoned = False

    @property
    def stored(self) -> Optional[Node]:
        """What the registry stored, once it did; None before and after ``withdraw``."""
        last = self._last
        if last is None or not last.done() or last.cancelled() or last.exception() is not None:
            return None
        return last.result()

    async def start(self, required: bool) -> None:
        """Register now. If the registry cannot be reached or does not answer within
        ``timeout``: with ``required`` raise its error (``RegistryTimeout``
        for no answer), else warn and go on trying in the background."""
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
        an attempt waits for it, up to ``timeout``; one given
        up on, then or before, may have stored the node: it is unregistered,
        unmarked). True when the registry took the STOPPING mark: callers are
        being told (a registry away tells no one, so nothing is worth waiting
        for). A registry that fails or does not answer is logged, never
        raised: it must not hold up a stop. Cancelled before it is done, it may
        be called again: the node is still withdrawn whole."""
        self._withdrawn = True
        retrying, self._retrying = self._retrying, None
        if retrying is not None:
            retrying.cancel()
            await asyncio.gather(retrying, return_exceptions=True)   # (it ends cancelled)
        last = self._last
        if last is not None and not last.done() and not await self._answered(last):
            self._abandon(last)
        told = False
        node = self.node
        try:
            if self.stored is not None:
                await self._call(self.registry.update(node.appkey, node.key,
                                                      status=NodeStatus.STOPPING), "STOPPING")
                told = True
                await self._call(self.registry.unregister(node.appkey, node.key), "unregister")
            elif self._abandoned:   # (unregistering a node that is not there is no error)
                await self._call(self.registry.unregister(node.appkey, node.key), "unregister")
        except Exception as exc:  # a registry outage must not block a stop
            log.warning("%s: could not unregister %s: %s", node.appkey, node.key, exc)
        self._last = None   # (only now: a withdraw cancelled before this one is done again)
        return told

    async def _attempt(self) -> None:
        """One ``register``, given up on past ``timeout`` (``RegistryTimeout``).
        Cancelled meanwhile, it leaves the attempt running: ``withdraw`` waits
        for its answer and takes back a registration that lands."""
        last = self._last = asyncio.ensure_future(self.registry.register(self.node))
        if not await self._answered(last) or last.cancelled():   # (or a withdraw gave up)
            self._abandon(last)
            raise RegistryTimeout(f"{self.where} did not answer within "
                                  f"{self.timeout:g}s")
        last.result()   # (its error, if any)

    async def _answered(self, call: asyncio.Future) -> bool:
        """Wait for ``call`` up to ``timeout``: has it ended?
        Cancelled meanwhile, it leaves ``call`` running."""
        done, _ = await asyncio.wait({call}, timeout=self.timeout)
        return bool(done)

    def _abandon(self, attempt: asyncio.Future) -> None:
        """Give up on an unanswered ``register`` (it may store the node yet)."""
        attempt.cancel()
        self._abandoned = True
        if self._last is attempt:   # (a withdraw does not wait for it again)
            self._last = None

    async def _call(self, call: Awaitable[T], what: str) -> T:
        """``call`` (a stop's), cancelled past ``timeout``: ``RegistryTimeout``."""
        task = asyncio.ensure_future(call)
        try:
            answered = await self._answered(task)
        except asyncio.CancelledError:   # (the stop was given up on: its call with it)
            task.cancel()
            raise
        if not answered:
            task.cancel()
            raise RegistryTimeout(f"{self.where} did not answer {what} within "
                                  f"{self.timeout:g}s")
        return task.result()

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
