"""The asyncio edge: sockets, connections, event loops. Nothing below this layer does I/O."""
from octo_core.transport.address import Address, parse_address
from octo_core.transport.loop import LoopThread, new_event_loop

__all__ = ["Address", "parse_address", "LoopThread", "new_event_loop"]
