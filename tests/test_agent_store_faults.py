"""Store writes that fail: retried with backoff when the store says it is unavailable (locked,
busy, unreachable), raised at once when the failure is permanent (a broken constraint), surfaced
when they keep failing, and no event is announced to clients before it is persisted."""

from __future__ import annotations

import pytest

from tabbi_extension.agent import AgentSettings, SessionAgent
from tabbi_extension.store import NewEvent, SessionRecord, SQLiteStore, StoreError, StoreUnavailable


class FailingStore(SQLiteStore):
    """Fails the next ``failures`` event appends with ``error`` (what SQLiteStore raises for
    "database is locked", or for a constraint)."""

    failures = 0
    calls = 0
    error: StoreError = StoreUnavailable("SQLite: database is locked")

    async def append_events(self, session_id, events):
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise self.error
        return await super().append_events(session_id, events)


@pytest.fixture
def agent(tmp_path, jp_asyncio_loop):
    store = FailingStore(tmp_path / "db.sqlite3")
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
    assert agent.describe()["last_seq"] == 1


async def test_a_persistent_failure_is_surfaced_and_nothing_is_announced(agent):
    queue = agent.subscribe()
    agent.store.failures = 3
    with pytest.raises(StoreUnavailable):
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


async def test_a_permanent_failure_is_not_retried(agent):
    queue = agent.subscribe()
    agent.store.failures, agent.store.error = 1, StoreError("SQLite: CHECK constraint failed")
    with pytest.raises(StoreError):
        await agent._emit("note", {"n": 1})
    assert agent.store.calls == 1 and queue.empty()


async def test_seqs_come_from_the_store_not_from_memory(agent, tmp_path):
    """Another writer on the same database (another store instance) appended meanwhile: the
    agent's next event follows it instead of colliding with it."""
    other = SQLiteStore(tmp_path / "db.sqlite3")
    await other.open()
    try:
        await agent._emit("note", {"n": 1})
        await other.append_events(agent.id, [NewEvent("elsewhere", {})])
        queue = agent.subscribe()
        assert (await agent._emit("note", {"n": 2})).seq == 3
        assert queue.get_nowait().seq == 3
    finally:
        await other.close()
