"""A session's event log: append-only, numbered, persisted before anyone sees an entry.

Every client (WebSocket, long-poll, kernel) reads "events after seq N" from the store and then
follows live ones; the live side is a bounded queue per subscriber. A subscriber that falls
behind loses the oldest queued entries, never the newest: it sees a jump in ``seq`` and fills
the gap from the store, so a slow browser costs bounded memory and still misses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .store import Event, NewEvent, Store, StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Live events queued per subscriber before the oldest give way (the store has them all).
SUBSCRIBER_QUEUE = 1000


async def with_retries(call: Callable[[], Awaitable[T]], attempts: int) -> T:
    """Run a store write, retrying with backoff what the store could not do now
    (``StoreUnavailable``: locked, busy, unreachable). Any other error (a broken constraint, bad
    input) is raised at once, since retrying cannot help."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            return await call()
        except StoreUnavailable:
            if attempt == attempts - 1:
                raise
            log.warning("tabbi: the store is unavailable; retrying", exc_info=True)
            await asyncio.sleep(delay)  # backoff between attempts, not synchronization
            delay *= 4
    raise AssertionError("unreachable: attempts must be at least 1")


class EventLog:
    """The log of one session. ``append`` is the only way in. The store numbers events (so two
    writers never collide); the lock makes persisting and announcing one step per event, so
    subscribers receive them in ``seq`` order with no gap (only the server holding the
    session's lease writes them)."""

    def __init__(self, session_id: str, store: Store, retries: int = 3):
        self.session_id = session_id
        self.store = store
        self.retries = retries
        self._next_seq = 1
        self._lock = asyncio.Lock()
        self._subscribers: set[asyncio.Queue[Event]] = set()

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    async def load(self) -> None:
        """Continue the log where the store has it."""
        self._next_seq = await self.store.last_seq(self.session_id) + 1

    async def append(self, type_: str, data: dict[str, Any]) -> Event:
        new = NewEvent(type_, data, time.time())
        async with self._lock:
            [event] = await with_retries(
                lambda: self.store.append_events(self.session_id, [new]), self.retries)
            self._next_seq = event.seq + 1
            for queue in self._subscribers:
                _offer(queue, event)
        return event

    def subscribe(self) -> asyncio.Queue[Event]:
        """A queue of live events from now on. Consumers compare ``seq`` with the last one they
        handled and read a gap from the store (see the module docstring)."""
        queue: asyncio.Queue[Event] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(queue)


def _offer(queue: asyncio.Queue[Event], event: Event) -> None:
    """Queue ``event``, dropping the oldest entry of a full queue (never the newest, so the
    consumer always learns how far the log has gone)."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(event)
