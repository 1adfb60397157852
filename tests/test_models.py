"""Model and cost in view (issue 14 item 5) through a real kernel, server, OpenCode and the
scripted model: ``%tabbi models``, ``%tabbi model``, and each turn's tokens and cost.

The scripted model reports 10 prompt and 5 completion tokens per call; ``llm_pricing`` prices
them at $1000 / $2000 per million, so each model call OpenCode makes costs $0.02 in its report
(as in test_budgets.py). Everything shown is checked against what OpenCode stored on its
messages and against the calls the scripted model served.

Threat (listing): the model list is for every signed-in person; it must name models and nothing
about where they are served or with which key (the key of ``llm_base_url`` stays in the server).
Threat (switching): a client naming a model the server does not offer (a costlier one, a
provider it has no business with) must be refused at the edge, and nothing must change.
"""

from __future__ import annotations

import re

import pytest

from tabbi_kernel.conversation import Conversation
from tests.support.llm import Reply, write
from tests.test_kernel import start

pytestmark = [pytest.mark.timeout(420),
              pytest.mark.tabbi(extra_models=["tabbi/scripted-large"], llm_pricing={"input": 1000.0,
                                                                                   "output": 2000.0},
                                llm_api_key="sk-test-SECRET-models-7f3a9c")]

KEY = "sk-test-SECRET-models-7f3a9c"
LISTED = ["tabbi/scripted", "tabbi/scripted-large", "demo"]


def opencode_totals(messages: list[dict]) -> tuple[int, int, float]:
    """Input and output tokens and cost of the assistant messages, as OpenCode stored them."""
    infos = [m["info"] for m in messages if m["role"] == "assistant"]
    return (sum(i["tokens"]["input"] for i in infos), sum(i["tokens"]["output"] for i in infos),
            sum(i["cost"] for i in infos))


def usage_line(output: str) -> str:
    lines = [line for line in output.splitlines() if re.match(r"\[tabbi\] [\d,]+ in / ", line)]
    assert len(lines) == 1, output
    return lines[0]


async def test_models_listed_switched_and_every_turns_cost_shown(kernel, api, llm, source_repo,
                                                                  tabbi_app):
    # -- the list, from a kernel, before any session runs: names only, no key, no endpoint
    await kernel.run("%load_ext tabbi_kernel")
    listed = await kernel.run("%tabbi models")
    assert listed.status == "ok", listed
    assert [re.split(r"\s+", line.strip())[0] for line in listed.stdout.splitlines()[1:4]] == LISTED
    assert "tabbi/scripted        (default)" in listed.stdout
    raw = await api.ok("GET", "tabbi/api/models")
    assert [m["id"] for m in raw["models"]] == LISTED and raw["default"] == "tabbi/scripted"
    for text in (listed.text, str(raw)):
        assert KEY not in text and llm.url.split("/v1")[0] not in text, text

    code, body = await api.call("POST", "tabbi/api/sessions", {"repo": str(source_repo),
                                                               "model": "tabbi/gpt-9"})
    assert code == 400 and "available: tabbi/scripted, tabbi/scripted-large, demo" in body["message"]
    assert (await api.ok("GET", "tabbi/api/sessions"))["sessions"] == []

    # -- a session; its model is marked, and its OpenCode reports the models listed for its server
    sid = await start(kernel, source_repo)
    runtime = tabbi_app.manager.agents()[0]._runtime
    reported = await runtime.client._call("GET", "/config/providers")
    assert {p["id"]: sorted(p["models"]) for p in reported["providers"]} == {
        "tabbi": ["scripted", "scripted-large"]}, reported
    marked = await kernel.run("%tabbi models")
    assert "> tabbi/scripted        (default)" in marked.stdout, marked.stdout
    assert "  tabbi/scripted-large" in marked.stdout

    # -- turn 1: the cell ends with its tokens and cost, which are OpenCode's
    llm.enqueue(Reply(tools=[write("a.txt", "a")]), Reply(text="done"))
    first = await kernel.run("%%tabbi\nwrite a.txt")
    assert first.status == "ok", first
    calls = len(llm.agent_requests())
    cost = 0.02 * calls
    assert usage_line(first.stdout) == (f"[tabbi] {10 * calls} in / {5 * calls} out tokens · "
                                        f"${cost:.4f} · session total ${cost:.4f}")
    messages = (await api.ok("GET", f"tabbi/api/sessions/{sid}/messages"))["messages"]
    assert opencode_totals(messages) == (10 * calls, 5 * calls, pytest.approx(cost))

    # -- turn 2 runs slowly; the model is switched meanwhile: the running turn keeps its model
    # (a 5 s answer: time enough to switch while it streams, even on a loaded machine)
    llm.enqueue(Reply(text="slowly " * 10, chunks=10, drip=0.6, tools=[write("b.txt", "b")]),
                Reply(text="done too"))
    mark = (await api.events(sid))["events"][-1]["seq"]
    started = await kernel.run("%%tabbi --no-wait\nwrite b.txt")
    assert started.status == "ok", started
    await api.wait_for(sid, lambda e: e["type"] == "text.delta", after=mark)  # its first call streams
    switched = await kernel.run("%tabbi model tabbi/scripted-large")
    assert switched.status == "ok", switched
    assert f"{sid} uses tabbi/scripted-large from its next turn on; the running turn keeps " \
           "tabbi/scripted" in switched.stdout, switched.stdout
    turn2 = (await api.wait_turn(sid, after=mark))[-1]["data"]
    assert [r["model"] for r in llm.agent_requests()] == ["scripted"] * len(llm.agent_requests())
    assert turn2["outcome"] == "completed"
    assert turn2["cost"] == pytest.approx(0.02 * (len(llm.agent_requests()) - calls))

    # -- an unknown model is refused with the list, and nothing changes
    code, body = await api.call("PATCH", f"tabbi/api/sessions/{sid}", {"model": "tabbi/gpt-9"})
    assert code == 400 and "not available" in body["message"], (code, body)
    assert "available: tabbi/scripted, tabbi/scripted-large, demo" in body["message"]
    refused = await kernel.run("%tabbi model openai/gpt-4.1")
    assert refused.status == "error" and "not available on this server" in refused.stderr, refused
    # another model server than the running sandbox's: pause first (said so), nothing changes
    code, body = await api.call("PATCH", f"tabbi/api/sessions/{sid}", {"model": "demo"})
    assert code == 409 and "%tabbi pause" in body["message"], (code, body)
    assert (await api.ok("GET", f"tabbi/api/sessions/{sid}"))["model"] == "tabbi/scripted-large"

    # -- turn 3 names the new model per message
    before = len(llm.agent_requests())
    third = await kernel.run("%tabbi ask hello")
    assert third.status == "ok", third
    assert [r["model"] for r in llm.agent_requests()[before:]] == ["scripted-large"]
    all_calls = len(llm.agent_requests())

    # -- the session's totals: status, info and the panel's turns agree with OpenCode
    info = await api.ok("GET", f"tabbi/api/sessions/{sid}")
    messages = (await api.ok("GET", f"tabbi/api/sessions/{sid}/messages"))["messages"]
    tokens_in, tokens_out, total = opencode_totals(messages)
    assert (tokens_in, tokens_out, total) == (10 * all_calls, 5 * all_calls, pytest.approx(0.02 * all_calls))
    assert info["usage"]["tokens"]["input"] == tokens_in and info["usage"]["cost"] == pytest.approx(total)
    assert usage_line(third.stdout).endswith(f"session total ${total:.4f}")
    status = await kernel.run("%tabbi status")
    assert f"usage:  {tokens_in:,} in / {tokens_out:,} out tokens · ${total:.4f} (session total)" \
        in status.stdout, status.stdout
    assert "model:  tabbi/scripted-large" in status.stdout
    events = (await api.events(sid))["events"]
    turns = Conversation().apply_all(events).turns
    assert sum(t.usage["cost"] for t in turns) == pytest.approx(total)
    assert [e["data"]["model"] for e in events if e["type"] == "turn.started"] == \
        ["tabbi/scripted", "tabbi/scripted", "tabbi/scripted-large"]

    # -- the choice survives a pause and a resume
    paused = await kernel.run("%tabbi pause")
    assert paused.status == "ok", paused
    resumed = await kernel.run("%tabbi resume")
    assert resumed.status == "ok", resumed
    again = await kernel.run("%tabbi ask once more")
    assert again.status == "ok", again
    assert [r["model"] for r in llm.agent_requests()[all_calls:]] == ["scripted-large"]
    assert usage_line(again.stdout) == (f"[tabbi] 10 in / 5 out tokens · $0.0200 · session total "
                                        f"${total + 0.02:.4f}")
