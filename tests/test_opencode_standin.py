"""The self-test of the benchmarks' stand-in agent (``bench/standin_agent/opencode_standin.py``):
through tabbi's own OpenCode client and normalizer, a turn against it gives what a text-only turn
of OpenCode gives (user and assistant messages, busy, one delta per model chunk, the whole part,
idle), and it refuses what it does not implement instead of pretending."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tabbi_extension.model_config import ModelSettings, build
from tabbi_extension.opencode import OpenCodeRuntime
from tabbi_sandbox import bootstrap
from tabbi_sandbox.provider import Endpoint
from tests.support.llm import Reply, write

STANDIN = Path(__file__).resolve().parent.parent / "bench" / "standin_agent" / "opencode_standin.py"
PASSWORD = "standin-password"


@pytest.fixture
def standin(llm, tmp_path: Path):
    port = bootstrap.free_port()
    config = build(ModelSettings(model="scripted", llm_base_url=llm.url)).config
    proc = subprocess.Popen(
        [str(STANDIN), "serve", "--hostname", "127.0.0.1", "--port", str(port)], cwd=tmp_path,
        env={"OPENCODE_SERVER_PASSWORD": PASSWORD, "OPENCODE_CONFIG_CONTENT": json.dumps(config)},
        stderr=subprocess.PIPE, text=True,
    )
    bootstrap.wait_healthy(port, PASSWORD, proc, 30)
    yield Endpoint(f"http://127.0.0.1:{port}", PASSWORD), proc
    proc.terminate()
    proc.wait(10)


async def one_turn(endpoint: Endpoint, text: str) -> list:
    runtime = OpenCodeRuntime(endpoint)
    await runtime.open(None)
    updates = []

    async def follow(connected: asyncio.Event) -> None:
        async for update in runtime.updates():
            if update is None:
                connected.set()
                continue
            updates.append(update)
            if update.signals.idle:
                return

    connected = asyncio.Event()
    task = asyncio.ensure_future(follow(connected))
    await asyncio.wait_for(connected.wait(), 10)
    await runtime.prompt(text, None)
    await asyncio.wait_for(task, 30)
    assert await runtime.received_prompt_since(0)
    assert not await runtime.busy()
    await runtime.aclose()
    return updates


def test_a_text_turn_reads_as_opencode_does_through_tabbis_client(llm, standin) -> None:
    endpoint, _ = standin
    llm.enqueue(Reply(text="w1;w2;w3;w4;", chunks=4))
    updates = asyncio.run(one_turn(endpoint, "hello"))
    events = [e for u in updates for e in u.events]
    kinds = [e.type for e in events]
    assert [e.data["role"] for e in events if e.type == "message"] == ["user", "assistant"]
    assert [e.data["delta"] for e in events if e.type == "text.delta"] == ["w1;", "w2;", "w3;", "w4;"]
    assert [e.data["status"] for e in events if e.type == "agent.status"] == ["busy", "idle"]
    whole = [e.data["text"] for e in events if e.type == "part.updated" and e.data["role"] == "assistant"]
    assert whole == ["w1;w2;w3;w4;"]
    assert kinds.index("text.delta") < kinds.index("part.updated", kinds.index("text.delta"))
    assert llm.agent_requests()[-1]["messages"][-1]["content"] == "hello"


def test_it_refuses_what_it_does_not_implement(llm, standin) -> None:
    endpoint, proc = standin

    def call(path: str, password: str = PASSWORD) -> int:
        token = base64.b64encode(f"opencode:{password}".encode()).decode()
        request = urllib.request.Request(endpoint.url + path, headers={"Authorization": f"Basic {token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert call("/global/health") == 200
    assert call("/global/health", "wrong") == 401
    assert call("/vcs/status") == 501
    # A model reply with tool calls is an error of the turn, not a silent text-only turn.
    llm.enqueue(Reply(text="x", tools=[write("a.txt", "a")]))
    updates = asyncio.run(one_turn(endpoint, "use a tool"))
    errors = [u.signals.error for u in updates if u.signals.error]
    assert errors and "not implemented" in errors[0][1]
    proc.terminate()
    assert "not implemented: GET /vcs/status" in proc.communicate(timeout=10)[1]
