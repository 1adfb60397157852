"""Persistence behind one interface (``Store``); SQLite is the default backend, Convex the
shared one (``ConvexStore``)."""

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
from .convex import ConvexStore
from .sqlite import SQLiteStore

__all__ = [
    "ConvexStore",
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
