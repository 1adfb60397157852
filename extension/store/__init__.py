"""Persistence behind one interface (``Store``); SQLite is the default backend."""

from .base import (
    Event,
    Lease,
    NewEvent,
    Prompt,
    SessionRecord,
    Snapshot,
    Store,
    StoreError,
    StoreUnavailable,
)
from .sqlite import SQLiteStore

__all__ = [
    "Event",
    "Lease",
    "NewEvent",
    "Prompt",
    "SQLiteStore",
    "SessionRecord",
    "Snapshot",
    "Store",
    "StoreError",
    "StoreUnavailable",
]
