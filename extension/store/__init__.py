"""Persistence behind one interface (``Store``); SQLite is the default backend."""

from .base import Event, Prompt, SessionRecord, Snapshot, Store, StoreError
from .sqlite import SQLiteStore

__all__ = ["Event", "Prompt", "SQLiteStore", "SessionRecord", "Snapshot", "Store", "StoreError"]
