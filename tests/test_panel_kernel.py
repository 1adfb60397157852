"""The chat panel through a real kernel: what it sends over the widget comm (deltas as custom
messages, coarse state as traits, one snapshot for a late view), what the notebook keeps (the
transcript output), and what its buttons do, against the real server and real OpenCode (scripted
model). The browser's half is tests/test_browser.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import git
from tests.support.llm import Reply, write

pytestmark = pytest.mark.timeout(300)

WIDGET = "application/vnd.jupyter.widget-view+json"


async def start(kernel, repo) -> str:
    done = await kernel.run(f"%load_ext tabbi_kernel\n%tabbi start {repo}")
    assert done.status == "ok", done
    return done.stdout.split("[tabbi] session ")[1].split()[0]


def customs(kernel, model_id: str) -> list[dict]:
    """The custom messages the kernel sent to one widget's front end, in order."""
    return [m["content"]["data"]["content"] for m in kernel.comm_messages
            if m["msg_type"] == "comm_msg" and m["content"].get("comm_id") == model_id
            and m["content"]["data"].get("method") == "custom"]


def fold(kernel, model_id: str) -> list[dict]:
    """The conversation a front end holds after applying every ``ops`` message (what panel.js does)."""
    messages: dict[str, dict] = {}
    for content in customs(kernel, model_id):
        for op in content.get("ops", []) if content.get("type") == "ops" else []:
            if op["op"] == "message":
                messages.setdefault(op["message"]["id"], {**op["message"], "parts": []})
                continue
            if op["op"] == "turn":
                continue
            message = messages.setdefault(op["message"],
                                          {"id": op["message"], "role": "assistant", "parts": []})
            part_id = op["part"] if op["op"] == "append" else op["part"]["id"]
            part = next((p for p in message["parts"] if p["id"] == part_id), None)
            if part is None:
                part = {"id": part_id, "type": op.get("kind") or op["part"]["type"]}
                message["parts"].append(part)
            if op["op"] == "append":
                part["text"] = part.get("text", "") + op["text"]
            else:
                part.clear()
                part.update(op["part"])
    return list(messages.values())


async def turn(api, sid: str, text: str) -> list[dict]:
    """Prompt and wait for that turn's end."""
    prompt_id = (await api.prompt(sid, text))["prompt_id"]
    return await api.wait_for(sid, lambda e: e["type"] == "turn.finished"
                              and e["data"]["prompt_id"] == prompt_id)


def send_action(kernel, model_id: str, content: dict) -> None:
    """What a button in the panel sends, through the real widget comm."""
    kernel.client.session.send(kernel.client.shell_channel.socket, "comm_msg", {
        "comm_id": model_id, "data": {"method": "custom", "content": content}})


def transcript_updates(kernel) -> list[dict]:
    return [m["content"]["data"] for m in kernel.iopub_seen if m["msg_type"] == "update_display_data"]


@pytest.fixture
def kernel(kernel):
    """The kernel, also keeping every display update seen on iopub (the transcript's refreshes)."""
    kernel.iopub_seen = []
    original = kernel.client.get_iopub_msg

    async def get_iopub_msg(*args, **kwargs):
        msg = await original(*args, **kwargs)
        kernel.iopub_seen.append(msg)
        return msg

    kernel.client.get_iopub_msg = get_iopub_msg
    return kernel


async def test_a_turn_streams_as_deltas_and_the_notebook_keeps_a_transcript(kernel, llm, source_repo, api):
    """Items 12-14 on one real session: deltas, a late view's snapshot, one follower for two
    panels, a dropped stream resuming from its last seq, the transcript output and its refresh at
    turn ends, an aborted turn's label, "Insert code" past the aborted turn, and the push line."""
    sid = await start(kernel, source_repo)
    shown = await kernel.run("%tabbi panel")
    assert shown.status == "ok", shown
    # Two outputs: the live view (with a text that says what it is) and the transcript.
    view, transcript = shown.displays
    model_id = view[WIDGET]["model_id"]
    assert "live panel" in view["text/plain"] and "<i>" in view["text/html"]
    assert 'class="tabbi-transcript"' in transcript["text/html"] and sid in transcript["text/plain"]

    # A second panel of the same session shares the first one's stream.
    second_id = (await kernel.run("%tabbi panel")).displays[0][WIDGET]["model_id"]
    followers = await kernel.run("from tabbi_kernel.panel import Follower\n"
                                 "print([len(f.panels) for f in Follower.live.values()])")
    assert followers.stdout.strip() == "[2]", followers

    reply = "Here is the **plan**: " + " ".join(f"word{i}" for i in range(60))
    llm.enqueue(Reply(text="I'll write it.", tools=[write("w.py", "W = 2\n")]),
                Reply(text=reply, chunks=30, drip=0.06))
    await turn(api, sid, "write w.py")
    await kernel.drain_comms(lambda: not kernel.widget_state(model_id).get("busy", True) and any(
        p.get("text") == reply for m in fold(kernel, model_id) for p in m["parts"]), timeout=120)
    # Deltas came as small messages: none of them carries the conversation.
    batches = [c for c in customs(kernel, model_id) if c["type"] == "ops"]
    appends = [op for c in batches for op in c["ops"] if op["op"] == "append"]
    assert appends and "".join(op["text"] for op in appends if "word" in op["text"]).endswith("word59")
    assert "messages" not in kernel.widget_state(model_id)  # the conversation is not a trait
    assert max(len(json.dumps(c)) for c in batches if all(op["op"] == "append" for op in c["ops"])) < 2000
    # Both panels got the same operations.
    assert fold(kernel, second_id) == fold(kernel, model_id)

    # A late view asks once and gets the whole state, equal to what the deltas built.
    send_action(kernel, model_id, {"type": "sync", "nonce": "late"})
    await kernel.drain_comms(lambda: any(c.get("nonce") == "late" for c in customs(kernel, model_id)))
    snapshot = next(c for c in customs(kernel, model_id) if c.get("nonce") == "late")
    assert snapshot["messages"] == fold(kernel, model_id)
    assert [t["outcome"] for t in snapshot["turns"]] == ["completed"]

    # The transcript was refreshed when the turn ended: the saved notebook has the reply.
    updates = transcript_updates(kernel)
    assert updates and reply in updates[-1]["text/plain"] and "write w.py" in updates[-1]["text/plain"]

    # Drop the stream (as a network blip would): it resumes from its last seq, nothing lost or doubled.
    dropped = await kernel.run("next(iter(Follower.live.values())).ws.close()")
    assert dropped.status == "ok", dropped

    # Item 13: an aborted turn is labelled; "Insert code" then takes the turn that wrote code.
    llm.enqueue(Reply(text="thinking very hard", stall=True))
    second = await api.prompt(sid, "think forever")
    await kernel.drain_comms(lambda: any(p.get("text", "").startswith("thinking")
                                         for m in fold(kernel, model_id) for p in m["parts"]), timeout=120)
    send_action(kernel, model_id, {"type": "abort"})
    events = await api.wait_for(sid, lambda e: e["type"] == "turn.finished"
                                and e["data"]["prompt_id"] == second["prompt_id"])
    assert events[-1]["data"]["outcome"] == "aborted"
    await kernel.drain_comms(lambda: any(
        op["op"] == "turn" and op["turn"]["outcome"] == "aborted"
        for c in customs(kernel, model_id) if c["type"] == "ops" for op in c["ops"]), timeout=60)
    await kernel.drain_comms(lambda: "turn aborted" in transcript_updates(kernel)[-1]["text/plain"],
                             timeout=30)
    send_action(kernel, model_id, {"type": "insert"})
    await kernel.drain_comms(lambda: "W = 2" in kernel.widget_state(model_id).get("code", ""), timeout=60)
    assert "earlier turn" in kernel.widget_state(model_id)["notice"]

    # One push gives one line (the push line), and the next turn clears it.
    send_action(kernel, model_id, {"type": "push", "message": "From the panel", "pr": False})
    await kernel.drain_comms(lambda: bool(kernel.widget_state(model_id).get("pushed", {}).get("commit")),
                             timeout=120)
    await kernel.drain_comms(lambda: not kernel.widget_state(model_id).get("pushing"), timeout=60)
    state = kernel.widget_state(model_id)
    assert state["notice"] == ""  # not a second line saying the same
    assert state["pushed"]["committed"] is True
    assert git("log", "-1", "--format=%s", state["pushed"]["branch"], cwd=source_repo) == "From the panel"
    llm.enqueue(Reply(text="next"))
    await turn(api, sid, "next")
    await kernel.drain_comms(lambda: kernel.widget_state(model_id).get("pushed") == {}, timeout=60)
    last = await quiet_last_seq(api, sid)
    await kernel.drain_comms(lambda: kernel.widget_state(model_id).get("last_seq") == last, timeout=60)
    assert fold(kernel, second_id) == fold(kernel, model_id)
    user_texts = [p["text"] for m in fold(kernel, model_id) if m["role"] == "user" for p in m["parts"]]
    assert user_texts == ["write w.py", "think forever", "next"]  # across the reconnect


async def quiet_last_seq(api, sid: str) -> int:
    """The log's last seq once the last turn's background snapshot is logged (nothing follows)."""
    while True:
        events = (await api.events(sid))["events"]
        last_turn = max(e["seq"] for e in events if e["type"] == "turn.finished")
        if any(e["type"] == "snapshot.saved" and e["seq"] > last_turn for e in events):
            return events[-1]["seq"]
        await api.events(sid, after=events[-1]["seq"], wait=10)  # until something new is logged


def fake_panel(extra: str = "") -> str:
    """Kernel code: a panel on a session id the server does not know (its stream ends at once with
    404), fed synthetic events; no sandbox needed to measure what the panel sends."""
    return ("import tabbi_kernel, asyncio\nfrom tabbi_kernel.panel import ChatPanel\n"
            "from tabbi_kernel.client import Session\n"
            "session = Session(tabbi_kernel.connect(), 'ses-notthere', {'repo': 'r', 'work_branch': 'b'})\n"
            "p = ChatPanel(session); display(p)\n" + extra)


async def wait_gone(kernel) -> None:
    for _ in range(100):
        done = await kernel.run("print(p._follower.gone or p._follower._task.done())")
        if done.stdout.strip() == "True":
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the follower of an unknown session did not stop")


async def test_bytes_per_delta_stay_flat_as_the_conversation_grows(kernel):
    """Item 14: a delta costs its own size whatever the length of the conversation (the old panel
    re-sent the whole conversation on every delta)."""
    shown = await kernel.run(fake_panel())
    assert shown.status == "ok", shown
    model_id = shown.displays[0][WIDGET]["model_id"]
    await wait_gone(kernel)
    feed = (
        "seq = [0]\n"
        "def ev(t, **data):\n"
        "    seq[0] += 1\n"
        "    p._follower.receive({'seq': seq[0], 'type': t, 'data': data, 'ts': 0})\n"
        "def grow(n):\n"
        "    for i in range(n):\n"
        "        ev('message', message_id=f'm{seq[0]}', role='assistant')\n"
        "        ev('part.updated', message_id=f'm{seq[0]-1}', part_id='p', part_type='text',\n"
        "           text='x' * 200)\n"
        "    p._follower.flush()\n"
        "def delta():\n"
        "    ev('text.delta', message_id='live', part_id='t', field='text', delta='token ')\n"
        "    p._follower.flush()\n"
        "ev('message', message_id='live', role='assistant')\n"
    )
    assert (await kernel.run(feed)).status == "ok"
    sizes = {}
    for total in (10, 100, 1000):
        await kernel.run(f"grow({total} - (seq[0] // 2))")
        before = len(kernel.comm_messages)
        await kernel.run("delta()")
        await kernel.drain_comms(lambda b=before: len(kernel.comm_messages) > b)
        sent = [m for m in kernel.comm_messages[before:] if m["content"].get("comm_id") == model_id]
        assert len(sent) == 1, sent  # one custom message, no trait update
        sizes[total] = len(json.dumps(sent[0]["content"]["data"]))
    assert max(sizes.values()) - min(sizes.values()) <= 4, sizes  # only the seq's digits grow
    assert sizes[1000] < 400, sizes


async def test_an_action_in_flight_does_not_block_the_kernel(kernel):
    """Item 14: a slow action (a diff of a big workspace, a pause saving a snapshot) runs off the
    kernel's message loop: another cell runs meanwhile. The slow request is held in the kernel by
    a gate the test opens."""
    shown = await kernel.run(fake_panel(
        "import threading\ngate = threading.Event()\n"
        "session.diff = lambda: (gate.wait(60), {'diff': '', 'files': []})[1]\n"))
    assert shown.status == "ok", shown
    model_id = shown.displays[0][WIDGET]["model_id"]
    send_action(kernel, model_id, {"type": "diff"})
    meanwhile = await kernel.run("print('free', gate.is_set())", timeout=30)
    assert meanwhile.stdout.strip() == "free False"  # ran while the diff waited
    await kernel.run("gate.set()")
    await kernel.drain_comms(lambda: "No changes" in kernel.widget_state(model_id).get("diff_html", ""),
                             timeout=30)


async def test_the_panel_says_when_the_turn_waits_for_the_model(kernel):
    """Item 10's panel half: the server's ``turn.waiting`` reaches the panel as coarse state (the
    front end shows "waiting for the model…" and the time since), and ends with the model's output."""
    shown = await kernel.run(fake_panel())
    model_id = shown.displays[0][WIDGET]["model_id"]
    await wait_gone(kernel)
    feed = ("def ev(seq, t, **data):\n"
            "    p._follower.receive({'seq': seq, 'type': t, 'data': data, 'ts': 1000.0 + seq})\n"
            "    p._follower.flush()\n"
            "ev(1, 'turn.started', prompt_id='q', text='hi')\n"
            "ev(2, 'turn.waiting', prompt_id='q', waiting=True)\n")
    assert (await kernel.run(feed)).status == "ok"
    await kernel.drain_comms(lambda: kernel.widget_state(model_id).get("waiting_since") == 1002.0)
    assert kernel.widget_state(model_id)["waiting_signal"] is True
    await kernel.run("ev(3, 'turn.waiting', prompt_id='q', waiting=False)\n"
                     "ev(4, 'text.delta', message_id='m', part_id='t', field='text', delta='hello')")
    await kernel.drain_comms(lambda: kernel.widget_state(model_id).get("waiting_since") is None)
