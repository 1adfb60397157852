"""Store writes that fail: retried with backoff, surfaced when they keep failing, and no event is
announced to clients before it is persisted. Real SQLite underneath, failing the way it does under
contention ("database is locked")."""

from __future__ import annotations

import sqlite3

import pytest

from tabbi_extension.agent import AgentSettings, SessionAgent
from tabbi_extension.store import SessionRecord, SQLiteStore


class LockedStore(SQLiteStore):
    """Fails the next ``failures`` event writes with SQLite's own lock error."""

    failures = 0

    async def append_event(self, event):
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database is locked")
        return await super().append_event(event)


@pytest.fixture
def agent(tmp_path, jp_asyncio_loop):
    store = LockedStore(tmp_path / "db.sqlite3")
    jp_asyncio_loop.run_until_complete(store.open())
    record = SessionRecord(id="ses-000000000001", owner="me", repo="/r", work_branch="tabbi/x")
    jp_asyncio_loop.run_until_complete(store.create_session(record))
    yield SessionAgent(record, store=store, provider=None, settings=AgentSettings(store_retries=3))
    jp_asyncio_loop.run_until_complete(store.close())


async def test_a_transient_failure_is_retried_and_the_event_announced_once(agent):
    queue = agent.subscribe()
    agent.store.failures = 2
    event = await agent._emit("note", {"n": 1})
    assert event.seq == 1 and queue.get_nowait().seq == 1 and queue.empty()
    assert [e.seq for e in await agent.store.list_events(agent.id)] == [1]


async def test_a_persistent_failure_is_surfaced_and_nothing_is_announced(agent):
    queue = agent.subscribe()
    agent.store.failures = 3
    with pytest.raises(sqlite3.OperationalError):
        await agent._emit("note", {"n": 1})
    assert queue.empty()  # never acknowledged to a client without being persisted
    assert (await agent._emit("note", {"n": 2})).seq == 1  # no gap in the log afterwards


async def test_a_subscriber_that_falls_behind_costs_bounded_memory_and_misses_nothing(agent):
    """A client that stops reading (a stalled browser tab) must not make the server queue every
    event forever: its queue keeps the newest entries, and the jump in ``seq`` tells it to read
    the rest from the store, where every event is."""
    from tabbi_extension.eventlog import SUBSCRIBER_QUEUE

    queue = agent.subscribe()
    total = SUBSCRIBER_QUEUE + 25
    for n in range(total):
        await agent._emit("note", {"n": n})
    assert queue.qsize() == SUBSCRIBER_QUEUE
    first = queue.get_nowait()
    assert first.seq == total - SUBSCRIBER_QUEUE + 1  # the oldest gave way, not the newest
    missed = await agent.store.list_events(agent.id, 0, first.seq - 1)
    assert [e.seq for e in missed] == list(range(1, first.seq))
    agent.unsubscribe(queue)
