"""Budgets (``c.Budgets.*``) against a real server, real OpenCode and the scripted model.

The scripted model reports usage on every call (10 prompt and 5 completion tokens); the test
model is priced through ``llm_pricing`` at $1000 / $2000 per million tokens, so OpenCode reports
$0.02 per model call on the assistant messages, and that is what the budgets count.

Threat: an agent (or a person) that keeps a session busy runs up model bills and sandbox time
without end: a runaway turn must be stopped where it crosses the budget, and a new prompt past it
refused, also after a restart (spend is derived from the store) and across a user's sessions.
"""

from __future__ import annotations

import pytest

from tabbi_extension.budgets import Budgets
from tests.support.llm import Reply, write

pytestmark = pytest.mark.timeout(300)

PRICING = {"input": 1000.0, "output": 2000.0}  # $ per million tokens: $0.02 per scripted call


@pytest.fixture
def budgets() -> dict:
    """``c.Budgets`` of the test's server (parametrized per test)."""
    return {}


@pytest.fixture
def jp_server_config(tabbi_config: dict, budgets: dict) -> dict:
    return {
        "ServerApp": {
            "jpserver_extensions": {"tabbi_extension": True},
            "identity_provider_class": "tests.support.identity.TokenUsers",
        },
        "TabbiExtension": {**tabbi_config, "llm_pricing": PRICING},
        "Budgets": budgets,
    }


def turn_error(events: list[dict]) -> str:
    finished = [e for e in events if e["type"] == "turn.finished"][-1]["data"]
    assert finished["outcome"] == "error", finished
    assert any(e["type"] == "error" and e["data"]["name"] == "BudgetExceeded" for e in events), events
    return finished["error"]


async def refused(api, sid: str) -> str:
    """A prompt past the budget: HTTP 429 with the reason, and nothing queued."""
    before = (await api.events(sid))["events"]
    code, body = await api.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "more"})
    assert code == 429, (code, body)
    after = (await api.events(sid, before[-1]["seq"]))["events"]
    assert not [e for e in after if e["type"] == "prompt.queued"]
    return body["message"]


@pytest.mark.parametrize("budgets", [{"session_cost": 0.05}])
async def test_a_turn_is_stopped_at_the_session_cost_budget_and_the_next_prompt_refused(
        api, llm, source_repo, tabbi_app):
    """A turn that would go on for seven model calls is stopped at the third ($0.06 >= $0.05);
    a prompt admitted (queued) before that is stopped as its turn begins; and the budget holds for
    a fresh ``Budgets`` (a restarted server) reading the same store."""
    llm.enqueue(*[Reply(tools=[write(f"f{i}.txt", "x")]) for i in range(6)], Reply(text="done"))
    sid = (await api.create(str(source_repo)))["id"]
    await api.prompt(sid, "write many files")
    await api.prompt(sid, "then this")  # admitted: nothing is spent yet
    first = await api.wait_turn(sid, timeout=180)
    error = turn_error(first)
    assert "this session's model cost budget is used up" in error and "of $0.0500" in error, error
    assert len(llm.script) >= 3, "the turn ran on past its budget"
    error = turn_error(await api.wait_turn(sid, after=first[-1]["seq"], timeout=180))
    assert "model cost budget is used up" in error, error
    message = await refused(api, sid)
    assert "model cost budget" in message and "c.Budgets.session_cost" in message, message

    store = tabbi_app.store
    record = await store.get_session(sid)
    fresh = Budgets(session_cost=0.05)
    spent = (await fresh.usage(store, record))["session_cost"]
    assert 0.05 <= spent < 0.2, spent
    assert "model cost budget" in (await fresh.exceeded(store, record) or "")


@pytest.mark.parametrize("budgets", [{"user_cost": 0.05}])
async def test_the_user_cost_budget_spans_sessions(api, llm, source_repo):
    """Session A spends $0.04 and finishes; session B of the same user crosses the user's $0.05
    at its first call and is stopped; then A's next prompt is refused as well."""
    llm.enqueue(Reply(tools=[write("a.txt", "a")]), Reply(text="A done"))
    a = (await api.create(str(source_repo)))["id"]
    await api.prompt(a, "one file")
    finished = [e for e in await api.wait_turn(a, timeout=180) if e["type"] == "turn.finished"]
    assert finished[-1]["data"]["outcome"] == "completed", finished

    llm.enqueue(*[Reply(tools=[write(f"b{i}.txt", "b")]) for i in range(4)], Reply(text="B done"))
    b = (await api.create(str(source_repo)))["id"]
    await api.prompt(b, "many files")
    error = turn_error(await api.wait_turn(b, timeout=180))
    assert "model cost budget (all sessions, deleted ones included) is used up" in error, error
    assert len(llm.script) >= 2, "session B ran on past the user's budget"
    assert "c.Budgets.user_cost" in await refused(api, a)


@pytest.mark.parametrize("budgets", [{"user_cost": 0.02}])
async def test_deleting_sessions_does_not_reset_the_user_budget(api, llm, source_repo, tabbi_app):
    """Threat: a person resets their spend by deleting sessions. They use up their $0.02 in
    session A (one model call), delete A (its messages and log go with it), and prompt a new
    session B: refused with 429 naming their budget, also for a fresh ``Budgets`` (a restarted
    server) reading the same store, as the deleted session's spend is kept there."""
    llm.enqueue(Reply(text="A done"))
    a = (await api.create(str(source_repo)))["id"]
    await api.prompt(a, "answer")
    await api.wait_turn(a, timeout=180)
    await api.ok("DELETE", f"tabbi/api/sessions/{a}", expect=204)

    b = (await api.create(str(source_repo)))["id"]
    message = await refused(api, b)
    assert "model cost budget (all sessions, deleted ones included)" in message, message
    assert "c.Budgets.user_cost" in message, message

    store = tabbi_app.store
    fresh = Budgets(user_cost=0.02)
    assert "c.Budgets.user_cost" in (await fresh.exceeded(store, await store.get_session(b)) or "")


@pytest.mark.parametrize("budgets", [{"session_sandbox_seconds": 4.0}])
async def test_a_turn_is_stopped_when_the_sandbox_time_budget_runs_out(api, llm, source_repo):
    """A model that never finishes its answer: the turn is stopped once the sandbox has run for
    the budget's 4 s, the model's stream is cut, and the next prompt is refused."""
    llm.enqueue(Reply(text="thinking", stall=True))
    sid = (await api.create(str(source_repo)))["id"]
    await api.prompt(sid, "think forever")
    error = turn_error(await api.wait_turn(sid, timeout=120))
    assert "this session's sandbox time budget is used up" in error, error
    if llm.agent_requests():  # the model was reached before the budget ran out: it is cut off
        llm.wait_closed(1, timeout=30)
    assert "c.Budgets.session_sandbox_seconds" in await refused(api, sid)


def test_a_detached_sandbox_nobody_comes_back_for_stops_itself(tmp_path, llm, source_repo):
    """Threat: a sandbox that outlives a crashed server (detach_sandboxes) and whose server never
    returns has nobody to pause it at idle_timeout: it must stop itself once max_lifetime +
    turn_timeout have passed (the bootstrap's own deadline), not run and cost forever."""
    from tabbi_sandbox import processes
    from tests.support.server import JupyterProcess
    from tests.support.waiting import wait_exited

    # Its deadline, 15 s after it is ready, leaves time to see it outlive the server on a slow machine.
    limits = ["--TabbiExtension.detach_sandboxes=True", "--TabbiExtension.max_lifetime=10",
              "--TabbiExtension.turn_timeout=5", "--TabbiExtension.idle_timeout=0"]
    server = JupyterProcess(llm.url, tmp_path / "srv", extra=limits)
    try:
        sid = server.call("POST", "tabbi/api/sessions", {"repo": str(source_repo)})["id"]
        server.wait_event(sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "running")
    finally:
        server.kill()
    assert processes.sandbox_pids(sid), "the detached sandbox outlived its server"
    wait_exited(lambda: processes.sandbox_pids(sid), 90, "the orphaned sandbox stopping itself")
