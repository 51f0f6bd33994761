"""Naming: provider nodes and the registries that hold them."""
from octo_core.registry.node import Env, HeartbeatSupport, Node, Role

__all__ = ["Node", "Env", "Role", "HeartbeatSupport"]
