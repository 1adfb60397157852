"""A session's event log: append-only, numbered, persisted before anyone sees an entry.

Every client (WebSocket, long-poll, kernel) reads "events after seq N" from the store and then
follows live ones; the live side is a bounded queue per subscriber. A subscriber that falls
behind loses the oldest queued entries, never the newest: it sees a jump in ``seq`` and fills
the gap from the store, so a slow browser costs bounded memory and still misses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from . import logs, metrics
from .store import Event, NewEvent, Store, StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Live events queued per subscriber before the oldest give way (the store has them all).
SUBSCRIBER_QUEUE = 1000
#: Most events written in one store call (Convex takes up to 500 in one mutation).
MAX_BATCH = 200
#: Streamed events queued unwritten before ``post`` waits for the store (back-pressure).
MAX_PENDING = 5000


async def with_retries(call: Callable[[], Awaitable[T]], attempts: int) -> T:
    """Run a store write, retrying with backoff what the store could not do now
    (``StoreUnavailable``: locked, busy, unreachable). Any other error (a broken constraint, bad
    input) is raised at once, since retrying cannot help."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            return await call()
        except StoreUnavailable as exc:
            if attempt == attempts - 1:
                raise
            metrics.STORE_RETRIES.labels("session").inc()
            logs.event(log, logging.WARNING, "store.retry", f"the store is unavailable; retrying: {exc}",
                       attempt=attempt + 1, of=attempts)
            await asyncio.sleep(delay)  # backoff between attempts, not synchronization
            delay *= 4
    raise AssertionError("unreachable: attempts must be at least 1")


class EventLog:
    """The log of one session. ``append`` and ``post`` are the only ways in. The store numbers
    events (so two writers never collide); one writer task per log persists them in the order
    they came, and announces each batch only once it is stored, so subscribers receive events in
    ``seq`` order with no gap (only the server holding the session's lease writes them).

    **Batching (group commit).** Events that arrive while a write is in flight go together in
    the next one, so a store with a long round trip (Convex across a network) keeps up with a
    fast stream: a write carries whatever accumulated during the one before. Streamed events
    (``post``: text deltas) may also wait up to the store's ``batch_window`` for company,
    measured from when they arrived; an ``append`` someone awaits cuts that wait short. So
    what a person sees is delayed by at most the window (or the write in flight, if longer)
    beyond the write itself, and a store with a zero window (SQLite) writes at once."""

    def __init__(self, session_id: str, store: Store, retries: int = 3):
        self.session_id = session_id
        self.store = store
        self.retries = retries
        self.window = store.batch_window
        self._next_seq = 1
        #: Events not yet written: (event, when queued (monotonic), the awaiting caller's future).
        self._pending: deque[tuple[NewEvent, float, asyncio.Future[Event] | None]] = deque()
        self._awaited = 0
        self._wake = asyncio.Event()
        self._writer: asyncio.Task | None = None
        self._subscribers: set[asyncio.Queue[Event]] = set()

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    async def load(self) -> None:
        """Continue the log where the store has it."""
        self._next_seq = await self.store.last_seq(self.session_id) + 1

    async def append(self, type_: str, data: dict[str, Any]) -> Event:
        """Persist an event, announce it, and return it (with its ``seq``) once stored; raises
        the store's error if it could not be stored (then nobody saw it)."""
        future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._queue(NewEvent(type_, data, time.time()), future)
        return await future

    async def post(self, type_: str, data: dict[str, Any], received: float | None = None) -> None:
        """Queue a streamed event (a text delta) without waiting for its write: it is stored and
        announced in order with everything else, possibly batched with what follows. If it cannot
        be stored it is dropped with a warning (a delta's text also arrives whole in the
        ``part.updated`` that completes its part). Waits only when very many are queued.
        ``received``: when it arrived from the agent (``time.monotonic()``; default: now)."""
        if len(self._pending) >= MAX_PENDING:
            await self.append(type_, data)  # back-pressure: the store is far behind
            return
        self._queue(NewEvent(type_, data, time.time()), None, received)

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until everything queued is written (or has failed), for at most ``timeout`` s
        (a server stopping while its store is away does not wait for it)."""
        writer = self._writer
        if writer is not None and not writer.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(writer), timeout)

    def _queue(self, event: NewEvent, future: asyncio.Future[Event] | None,
               received: float | None = None) -> None:
        self._pending.append((event, received or time.monotonic(), future))
        if future is not None:
            self._awaited += 1
            self._wake.set()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        while self._pending:
            wait = self._pending[0][1] + self.window - time.monotonic()
            if wait > 0 and not self._awaited:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)  # the window, or an append
            batch = [self._pending.popleft() for _ in range(min(MAX_BATCH, len(self._pending)))]
            await self._store(batch)

    async def _store(self, batch: list[tuple[NewEvent, float, asyncio.Future[Event] | None]]) -> None:
        """Write one batch, then announce it and answer whoever waits for it."""
        waiting = [future for _, _, future in batch if future is not None]
        self._awaited -= len(waiting)
        events = [event for event, _, _ in batch]
        try:
            stored = await with_retries(
                lambda: self.store.append_events(self.session_id, events), self.retries)
        except Exception as exc:  # the store's error goes to whoever waits for these events
            if len(waiting) < len(batch):
                log.warning("tabbi: session %s: %d streamed events could not be stored and were "
                            "dropped: %s", self.session_id, len(batch) - len(waiting), exc)
            for future in waiting:
                if not future.done():
                    future.set_exception(exc)
            return
        self._next_seq = stored[-1].seq + 1
        for event in stored:
            for queue in self._subscribers:
                _offer(queue, event)
        metrics.EVENTS_WRITTEN.inc(len(stored))
        now = time.monotonic()
        for event, received, _ in batch:
            if event.type == "text.delta":
                metrics.DELTA_LATENCY_SECONDS.observe(now - received)
        for (_, _, future), event in zip(batch, stored, strict=True):
            if future is not None and not future.done():
                future.set_result(event)

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
