"""A session's event log on Convex while Convex misbehaves (the stand-in's fault switches):
unreachable, slow, or losing answers after it committed. Events are buffered and retried, never
announced before they are stored, never lost, never duplicated, and the log goes on by itself
when Convex is back. (``test_agent_store_faults.py`` is the SQLite side of the same guarantees.)"""

from __future__ import annotations

import asyncio

import pytest

from tabbi_extension.agent import AgentSettings, SessionAgent
from tabbi_extension.store import SessionRecord
from tests.support.convex_standin import convex_standin  # noqa: F401 (a fixture)
from tests.support.convex_store import make_store, wait_until


@pytest.fixture
def standin(convex_standin):  # noqa: F811
    convex_standin.reset()
    yield convex_standin
    convex_standin.faults()


@pytest.fixture
def agent(standin, jp_asyncio_loop):
    run = jp_asyncio_loop.run_until_complete
    store = make_store(standin)
    run(store.open())
    record = SessionRecord(id="ses-000000000001", owner="me", repo="/r", work_branch="tabbi/x")
    run(store.create_session(record))
    agent = SessionAgent(record, store=store, provider=None, settings=AgentSettings(store_retries=3))
    run(agent.events.load())
    yield agent
    run(store.close())


def drain(queue: asyncio.Queue) -> list:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


async def test_an_outage_mid_stream_buffers_events_and_announces_them_once_stored(agent, standin):
    queue = agent.subscribe()
    assert (await agent._emit("turn.started", {})).seq == 1
    standin.faults(outage=True)
    for n in range(100):  # the agent streams on while Convex is away
        await agent.events.post("text.delta", {"n": n})
    finished = asyncio.ensure_future(agent._emit("turn.finished", {}))
    await wait_until(lambda: agent.store.trouble() is not None, "the store notices the outage")
    await wait_until(lambda: standin.stats()["reset_connections"] >= 3, "retries meet the outage")
    assert [e.seq for e in drain(queue)] == [1]  # nothing announced that is not stored
    assert not finished.done()
    standin.faults()
    assert (await finished).seq == 102
    announced = drain(queue)
    stored = await agent.store.list_events(agent.id)
    for events in (announced, stored[1:]):
        assert [e.seq for e in events] == list(range(2, 103))
        assert [e.data["n"] for e in events[:-1]] == list(range(100))
        assert events[-1].type == "turn.finished"
    assert agent.store.trouble() is None


async def test_answers_lost_after_commits_never_duplicate_a_streamed_event(agent, standin):
    """Three writes in a row commit but their answers are lost (a 503 after the function ran):
    each is retried with its batch's key, so every delta is in the log exactly once, in order."""
    queue = agent.subscribe()
    standin.faults(fail_next=3, status=503, error_phase="after", latency_ms=5)
    for n in range(60):
        await agent.events.post("text.delta", {"n": n})
        if n % 20 == 19:
            await agent._emit("part.updated", {"upto": n})  # awaited: a batch boundary
    assert standin.stats()["faulted"] == 3
    stored = await agent.store.list_events(agent.id)
    assert [e.seq for e in stored] == list(range(1, 64))
    assert [e.data["n"] for e in stored if e.type == "text.delta"] == list(range(60))
    assert [e.seq for e in drain(queue)] == list(range(1, 64))


async def test_a_fast_stream_over_a_slow_link_is_written_in_batches(agent, standin):
    """50 deltas/s over a 50 ms round trip: one write per delta could not keep up (20/s at
    most); batched, every delta is stored in order with far fewer writes."""
    standin.faults(latency_ms=50)
    before = standin.stats()["calls"].get("events:append", 0)
    for n in range(50):
        await agent.events.post("text.delta", {"n": n})
        await asyncio.sleep(0.02)  # the producer's pace (50/s), not synchronization
    await agent._emit("turn.finished", {})
    writes = standin.stats()["calls"]["events:append"] - before
    stored = await agent.store.list_events(agent.id)
    assert [e.data.get("n") for e in stored[:-1]] == list(range(50))
    assert writes <= 25, writes  # at least two deltas per write on average
