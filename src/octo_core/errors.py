"""Typed errors. Every error carries the OCTO status code of PROTOCOL.md §2.

Callers catch by class; servers map a class to the status they send back.
"""
from __future__ import annotations

import copy
import enum
from typing import Any, Optional, TypeVar


class Status(enum.IntEnum):
    """``ResponseInfo.status`` values (PROTOCOL.md §2, ``StatusCode``)."""

    SUCCESS = 0
    APPLICATION_EXCEPTION = 1
    RUNTIME_EXCEPTION = 2
    RPC_EXCEPTION = 3
    TRANSPORT_EXCEPTION = 4
    PROTOCOL_EXCEPTION = 5
    DEGRADE_EXCEPTION = 6
    SECURITY_EXCEPTION = 7
    SERVICE_EXCEPTION = 8
    REMOTE_EXCEPTION = 9


class OctoError(Exception):
    """Base of every octo_core error.

    ``status`` is the OCTO status code; ``method`` and ``node`` say where the
    error happened when that is known (``None`` otherwise). ``from_peer`` is
    true when the error is the peer's own answer (its reply's status or
    exception) rather than something that went wrong on the way to or from it.
    """

    status: int = Status.REMOTE_EXCEPTION
    from_peer: bool = False

    def __init__(self, message: str, *, status: Optional[int] = None,
                 method: Optional[str] = None, node: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.method = method
        self.node = node

    def __str__(self) -> str:
        where = []
        if self.method:
            where.append(f"method {self.method}")
        if self.node:
            where.append(f"node {self.node}")
        return f"{self.message} ({', '.join(where)})" if where else self.message


_Error = TypeVar("_Error", bound=OctoError)


def own_copy(error: _Error) -> _Error:
    """A copy of ``error``, with its traceback, for one of several callers that
    waited on one outcome (a shared connect, the first discovery): each names its
    own method in its copy, where in the one object the first would name it for all."""
    return copy.copy(error).with_traceback(error.__traceback__)


class ApplicationError(OctoError):
    """The remote handler raised an exception its IDL does not declare."""
    status = Status.APPLICATION_EXCEPTION


class RuntimeFailure(OctoError):
    """A runtime failure reported by the peer (status 2)."""
    status = Status.RUNTIME_EXCEPTION


class RpcError(OctoError):
    """The call was refused or failed in the RPC layer (overload, rejected)."""
    status = Status.RPC_EXCEPTION


class NoRouteError(RpcError):
    """Routing left no node the call may use (raised where routing runs,
    ``octo_core.cluster.routing``)."""


class TransportError(OctoError):
    """The connection failed, closed, or could not be made.

    ``request_sent`` is False when the request provably never left this
    process (e.g. the connect failed): any method may then be retried.
    """
    status = Status.TRANSPORT_EXCEPTION

    def __init__(self, message: str, *, request_sent: bool = True, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.request_sent = request_sent


class CallTimeout(TransportError):
    """No reply arrived within the call's timeout.

    ``inherited_deadline`` is True when that timeout was the deadline of the call
    being handled (``octo_core.context.caller``), cut short from the call's own.
    """
    inherited_deadline = False


class ClientClosed(TransportError):
    """The client was closed: the call was refused, or cut short, by the caller's
    own side, not by anything the node did (failsafe does not swallow it, and
    no breaker counts it)."""

    def __init__(self, message: str = "client is closed", **kw: Any) -> None:
        super().__init__(message, **kw)


class ProtocolError(OctoError):
    """Bytes that do not follow the protocol, or values that cannot be framed."""
    status = Status.PROTOCOL_EXCEPTION


class EncodeError(ProtocolError):
    """A value cannot be encoded (wrong type, out of range, bad text)."""


class DecodeError(ProtocolError):
    """Bytes cannot be decoded; ``offset`` is the byte where it went wrong."""

    def __init__(self, message: str, *, offset: Optional[int] = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.offset = offset


class DegradeError(OctoError):
    """The call was degraded: circuit open, quota exhausted."""
    status = Status.DEGRADE_EXCEPTION


class SecurityError(OctoError):
    """Authentication or access control refused the call."""
    status = Status.SECURITY_EXCEPTION


class ServiceError(OctoError):
    """The service is not hosted where the call was sent."""
    status = Status.SERVICE_EXCEPTION


class RemoteError(OctoError):
    """The peer reported an error octo_core has no closer class for."""
    status = Status.REMOTE_EXCEPTION


# The registry's errors (``octo_core.registry``): what a client's discovery, a
# server's registration and the registry's own operations raise.

class RegistryError(OctoError):
    """The registry could not be reached or refused an operation."""


class RegistryTimeout(RegistryError):
    """The registry did not answer within its ``op_timeout``: the operation was
    given up on (it may still take effect)."""


class NotRegisteredError(RegistryError, LookupError):
    """``update`` named a node the registry does not hold."""


class StatusChanged(RegistryError):
    """``update(if_status=...)`` found the node in another status: nothing was written."""
