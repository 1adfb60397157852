"""Turn boundaries under OpenCode's real quirks, fed through the normalizer into the agent.

Measured with opencode-ai 1.18.33: after an abort OpenCode reports ``session.idle`` twice, ~30 ms
apart, and re-sends the previous user message (with its summary) after a turn. A prompt sent
between the two idles must not be ended by the second one.
"""

from __future__ import annotations

import pytest

from tabbi_extension.agent import AgentSettings, SessionAgent, Turn
from tabbi_extension.normalize import EventNormalizer
from tabbi_extension.runtime import Update
from tabbi_extension.store import SessionRecord, SQLiteStore

OC = "ses_oc"


def idle() -> dict:
    return {"type": "session.idle", "properties": {"sessionID": OC}}


def user_message(message_id: str) -> dict:
    return {"type": "message.updated", "properties": {
        "sessionID": OC, "info": {"id": message_id, "role": "user", "sessionID": OC}}}


@pytest.fixture
def agent(tmp_path, jp_asyncio_loop):
    store = SQLiteStore(tmp_path / "db.sqlite3")
    jp_asyncio_loop.run_until_complete(store.open())
    record = SessionRecord(id="ses-000000000002", owner="me", repo="/r", work_branch="tabbi/x")
    agent = SessionAgent(record, store=store, provider=None, settings=AgentSettings())
    yield agent
    jp_asyncio_loop.run_until_complete(store.close())


@pytest.fixture
def feed():
    """Feed one raw OpenCode event to the agent the way its runtime does."""
    normalizer = EventNormalizer(OC)

    async def feed(agent: SessionAgent, raw: dict) -> None:
        await agent._apply(Update(*normalizer.feed(raw)))

    return feed


async def test_a_late_idle_of_the_previous_turn_does_not_end_the_next_one(agent, feed):
    await feed(agent, user_message("msg_1"))  # turn 1's user message (turn already over)
    agent._turn = Turn("prm_2")
    await feed(agent, idle())  # the second idle of an aborted turn 1
    await feed(agent, user_message("msg_1"))  # turn 1's message again, with its summary
    assert agent._turn is not None and agent._turn.prompt_id == "prm_2"
    await feed(agent, user_message("msg_2"))  # now OpenCode has turn 2's prompt
    await feed(agent, idle())
    assert agent._turn is None
    finished = [e for e in await agent.store.list_events(agent.id) if e.type == "turn.finished"]
    assert [(e.data["prompt_id"], e.data["outcome"]) for e in finished] == [("prm_2", "completed")]


async def test_an_aborted_turn_ends_on_idle_even_before_its_message_exists(agent, feed):
    agent._turn = Turn("prm_1", outcome="aborted")
    await feed(agent, idle())
    assert agent._turn is None
