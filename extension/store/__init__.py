"""Persistence behind one interface (``Store``); SQLite is the default backend."""

from .base import Event, Prompt, SessionRecord, Store, StoreError
from .sqlite import SQLiteStore

__all__ = ["Event", "Prompt", "SQLiteStore", "SessionRecord", "Store", "StoreError"]
