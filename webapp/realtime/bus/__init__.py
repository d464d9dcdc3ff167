"""Transports that carry envelopes between instances: Redis, or memory for one instance.

The propagator speaks envelopes; a bus moves bytes on named channels and keeps the history
that gives each message its offset in its partition. Swapping the transport touches this package alone.
"""

from .base import (
    ZERO,
    Bus,
    BusUnavailable,
    Entry,
    GapHandler,
    History,
    Mark,
    MessageHandler,
    Offset,
    Position,
)
from .memory import MemoryBus
from .redis_bus import RedisBus

__all__ = [
    "ZERO", "Bus", "BusUnavailable", "Entry", "GapHandler", "History", "Mark", "MemoryBus", "MessageHandler",
    "Offset", "Position", "RedisBus",
]
