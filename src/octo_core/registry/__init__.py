"""Naming: provider nodes and the registries that hold them."""
from octo_core.errors import NotRegisteredError, RegistryError, RegistryTimeout, StatusChanged
from octo_core.registry.base import Registry, Watch
from octo_core.registry.directory import Directory, Subscription
from octo_core.registry.node import Env, HeartbeatSupport, Node, Role
from octo_core.registry.opening import open_registry

__all__ = ["Node", "Env", "Role", "HeartbeatSupport", "Registry", "RegistryError",
           "RegistryTimeout", "NotRegisteredError", "StatusChanged", "Watch", "open_registry",
           "Directory", "Subscription"]
