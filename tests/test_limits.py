"""Quotas and rate limits (issue 13, item 4): per person, sessions kept, sandboxes running at
once and prompts per minute over REST and the WebSocket together; for the whole service,
sandboxes running at once. Going over is a 429 naming the limit (with Retry-After when waiting
helps); nothing already accepted is dropped.

Threats, as a person of a shared server: taking every sandbox of the machine (or the Modal plan)
by starting, resuming or prompting paused sessions; flooding prompts, over REST, over the event
WebSocket to get round the REST limit, or two starts at the same instant to both take the last
place. The limits must not cost anyone their accepted work.

The prompt window is long (600 s) in these tests: a refused prompt is refused for sure, and no
test waits for a window to pass (``SlidingWindow`` takes an injected clock for that).
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import urllib.error

import pytest

from tabbi_extension import states
from tabbi_extension.limits import LimitExceeded, SlidingWindow, TabbiLimits
from tabbi_extension.store import Lease, SessionRecord, SQLiteStore
from tabbi_extension.validation import MAX_PROMPT_CHARS
from tabbi_kernel.client import _refusal
from tests.support.api import Api
from tests.support.identity import headers


@pytest.fixture
def limits() -> dict:
    return {}


@pytest.fixture
def jp_server_config(jp_server_config: dict, limits: dict) -> dict:
    return {**jp_server_config, "TabbiLimits": limits}


# -- the counting itself, without a server -------------------------------------------------------

def test_the_window_admits_exactly_the_allowed_number_and_says_how_long_to_wait():
    now = [1000.0]
    window = SlidingWindow(lambda: now[0])
    for t in (1000, 1010, 1020):
        now[0] = t
        assert window.take("alice", 3, 60) is None
    now[0] = 1030
    assert window.take("alice", 3, 60) == pytest.approx(30)  # the one of 1000 leaves at 1060
    assert window.take("bob", 3, 60) is None  # one counter per person
    now[0] = 1060
    assert window.take("alice", 3, 60) is None  # the one of 1000 left: one place, no more
    assert window.take("alice", 3, 60) == pytest.approx(10)  # the one of 1010 leaves at 1070
    now[0] = 1091
    window.forget_idle(60)  # bob's only prompt (1030) is out of the window
    assert set(window._seen) == {"alice"}


async def test_running_limits_count_the_stores_sessions_and_two_starts_cannot_share_a_place(tmp_path):
    """Threat: two starts at the same instant (two tabs, a script) both seeing one place left
    and both taking it. The count and the start happen under one lock."""
    store = SQLiteStore(path=tmp_path / "s.sqlite3")
    await store.open()
    try:
        for sid, owner, state in [("ses-a", "alice", states.RUNNING), ("ses-b", "bob", states.STARTING),
                                  ("ses-c", "carol", states.PAUSED), ("ses-d", "carol", states.ERROR)]:
            await store.create_session(SessionRecord(sid, owner, "r", "b", state=state))
        limits = TabbiLimits(store, running_total=3, running_per_user=1, sessions_per_user=2)
        with pytest.raises(LimitExceeded) as over:
            async with limits.starting("carol", new_session=True):
                pass
        assert (over.value.limit, over.value.retry_after) == ("sessions_per_user", None)
        with pytest.raises(LimitExceeded) as over:
            async with limits.starting("alice"):
                pass
        assert over.value.limit == "running_per_user" and over.value.retry_after > 0

        async def start(owner: str, sid: str) -> str:
            try:
                async with limits.starting(owner):
                    await asyncio.sleep(0)  # another start gets its turn to check here
                    await store.create_session(SessionRecord(sid, owner, "r", "b", state=states.STARTING))
                return "started"
            except LimitExceeded as exc:
                return exc.limit

        # carol (1 place of her own) and dave both want the service's last place.
        results = await asyncio.gather(start("carol", "ses-e"), start("dave", "ses-f"))
        assert sorted(results) == ["running_total", "started"], results
        assert limits.running_total == 3
        assert sum(r.state in states.LIVE for r in await store.list_sessions()) == 3
    finally:
        await store.close()


def test_a_429_becomes_one_sentence_with_the_limit_and_the_wait():
    body = {"message": "too many prompts: at most 3 per minute per person; send it again in 12 s",
            "reason": "limit", "limit": "prompts_per_minute", "allowed": 3, "retry_after": 12}
    error = urllib.error.HTTPError("http://x/", 429, "Too Many Requests", {},
                                   io.BytesIO(json.dumps(body).encode()))
    refusal = _refusal(error)
    assert (refusal.status, refusal.limit, refusal.retry_after) == (429, "prompts_per_minute", 12)
    assert str(refusal) == f"over the limit prompts_per_minute: {body['message']}"
    bare = _refusal(urllib.error.HTTPError("http://x/", 429, "Too Many Requests", {}, io.BytesIO(b"")))
    assert bare.limit is None and "limit" in str(bare)


# -- through the server -------------------------------------------------------------------------------

async def read_reply(ws, timeout: float = 60) -> dict:
    """The next frame that answers a message of ours (event frames carry a seq; replies don't)."""
    deadline = time.monotonic() + timeout
    while True:
        frame = json.loads(await asyncio.wait_for(ws.read_message(), deadline - time.monotonic()))
        if "seq" not in frame:
            return frame


@pytest.mark.parametrize("limits", [{"prompts_per_minute": 3, "rate_window": 600}])
async def test_prompts_over_the_limit_are_refused_over_rest_and_websocket_alike(
        jp_fetch, jp_ws_fetch, source_repo, llm, limits):
    """Threat: bob floods prompts, over REST and then over the event WebSocket to get round the
    REST limit. One counter per person covers both; the refused ones are not queued, and every
    accepted one runs to its end."""
    bob = Api(jp_fetch, headers("bob"))
    sid = (await bob.create(str(source_repo)))["id"]
    ws = await jp_ws_fetch("tabbi", "api", "sessions", sid, "stream", headers=headers("bob"))
    accepted = [(await bob.prompt(sid, "one"))["prompt_id"]]
    ws.write_message(json.dumps({"type": "prompt", "text": "two", "ref": "r2"}))
    reply = await read_reply(ws)
    assert reply["type"] == "prompt.accepted" and reply["ref"] == "r2", reply
    accepted.append(reply["prompt_id"])
    accepted.append((await bob.prompt(sid, "three"))["prompt_id"])

    response = await jp_fetch("tabbi", "api", "sessions", sid, "prompt", method="POST",
                              body=json.dumps({"text": "four"}), headers=headers("bob"),
                              raise_error=False)
    assert response.code == 429
    body = json.loads(response.body)
    assert body["limit"] == "prompts_per_minute" and body["allowed"] == 3
    assert 0 < body["retry_after"] <= 600 and response.headers["Retry-After"] == str(body["retry_after"])
    assert "at most 3 per 600 s" in body["message"]
    ws.write_message(json.dumps({"type": "prompt", "text": "five", "ref": "r5"}))
    refused = await read_reply(ws)
    assert refused["type"] == "prompt.refused" and refused["status"] == 429, refused
    assert {k: refused[k] for k in ("limit", "allowed", "ref")} == {
        "limit": "prompts_per_minute", "allowed": 3, "ref": "r5"}
    ws.close()

    events = await bob.wait_for(sid, lambda e: e["type"] == "turn.finished"
                                and e["data"]["prompt_id"] == accepted[-1], timeout=240)
    queued = [e["data"]["text"] for e in events if e["type"] == "prompt.queued"]
    finished = [e["data"] for e in events if e["type"] == "turn.finished"]
    assert queued == ["one", "two", "three"]
    assert [(f["prompt_id"], f["outcome"]) for f in finished] == [(p, "completed") for p in accepted]
    await bob.ok("DELETE", f"tabbi/api/sessions/{sid}", expect=204)


async def test_a_websocket_message_is_checked_like_a_post(jp_fetch, jp_ws_fetch, source_repo, llm):
    """Threat: bob sends over the WebSocket what the REST route refuses (an oversized or empty
    prompt, something that is not a prompt at all, a huge ref): each is refused, nothing queued."""
    bob = Api(jp_fetch, headers("bob"))
    sid = (await bob.create(str(source_repo)))["id"]
    ws = await jp_ws_fetch("tabbi", "api", "sessions", sid, "stream", headers=headers("bob"))
    for message, status in [("not json", 400), (json.dumps([1]), 400), (json.dumps({"type": "abort"}), 400),
                            (json.dumps({"type": "prompt", "text": ""}), 400),
                            (json.dumps({"type": "prompt", "text": "x" * (MAX_PROMPT_CHARS + 1)}), 400),
                            (json.dumps({"type": "prompt", "text": "hi", "ref": "r" * 101}), 400),
                            ("x" * (512 * 1024 + 1), 413)]:
        ws.write_message(message)
        reply = await read_reply(ws)
        assert (reply["type"], reply["status"]) == ("prompt.refused", status), (message[:40], reply)
    ws.close()
    events = (await bob.events(sid))["events"]
    assert not [e for e in events if e["type"] == "prompt.queued"]
    await bob.ok("DELETE", f"tabbi/api/sessions/{sid}", expect=204)


@pytest.mark.parametrize("limits", [{"running_per_user": 1, "sessions_per_user": 2}])
async def test_sandboxes_and_sessions_over_the_limit_are_refused_resuming_included(
        jp_fetch, source_repo, llm, limits):
    """Threat: alice holds more sandboxes than her share: a second session while one runs, or
    getting round that by pausing one, starting another, then resuming (or prompting) the paused
    one. And keeping sessions without end."""
    alice = Api(jp_fetch, headers("alice"))
    first = (await alice.create(str(source_repo)))["id"]
    await alice.wait_state(first, "running", timeout=180)

    response = await jp_fetch("tabbi", "api", "sessions", method="POST", raise_error=False,
                              body=json.dumps({"repo": str(source_repo)}), headers=headers("alice"))
    assert response.code == 429
    body = json.loads(response.body)
    assert (body["limit"], body["allowed"]) == ("running_per_user", 1)
    assert int(response.headers["Retry-After"]) > 0 and "pause one" in body["message"]

    await alice.ok("POST", f"tabbi/api/sessions/{first}/pause")
    second = (await alice.create(str(source_repo)))["id"]
    code, body = await alice.call("POST", "tabbi/api/sessions", {"repo": str(source_repo)})
    assert (code, body["limit"], body["retry_after"]) == (429, "sessions_per_user", None), body
    await alice.wait_state(second, "running", timeout=180)

    # The paused one may not come back while the other runs: neither by resume nor by a prompt.
    code, body = await alice.call("POST", f"tabbi/api/sessions/{first}/resume")
    assert (code, body["limit"]) == (429, "running_per_user"), body
    code, body = await alice.call("POST", f"tabbi/api/sessions/{first}/prompt", {"text": "wake up"})
    assert (code, body["limit"]) == (429, "running_per_user"), body
    info = await alice.ok("GET", f"tabbi/api/sessions/{first}")
    assert info["state"] == "paused"
    assert not [e for e in (await alice.events(first))["events"] if e["type"] == "prompt.queued"]
    # A running session takes prompts as always.
    prompt = await alice.prompt(second, "hello")
    await alice.wait_for(second, lambda e: e["type"] == "turn.finished"
                         and e["data"]["prompt_id"] == prompt["prompt_id"], timeout=180)
    sessions = (await alice.ok("GET", "tabbi/api/sessions"))["sessions"]
    assert sorted(s["id"] for s in sessions) == sorted([first, second])


@pytest.mark.parametrize("limits", [{"running_total": 1}])
async def test_the_services_running_limit_counts_everyone(jp_fetch, source_repo, llm, tabbi_app, limits):
    """Threat: many people at once start more sandboxes than the machine (or Modal plan) holds.
    Another server sharing this store runs one (its lease is alive): that is the one place."""
    await tabbi_app.ensure_started()  # the store opens with the first request otherwise
    store = tabbi_app.store
    await store.put_lease(Lease("srv-elsewhere", time.time() + 3600, {"host": "another-machine"},
                                time.time()))
    await store.create_session(SessionRecord("ses-0000000000aa", "carol", "r", "tabbi/x",
                                             state=states.RUNNING, server_id="srv-elsewhere"))
    code, body = await Api(jp_fetch, headers("alice")).call(
        "POST", "tabbi/api/sessions", {"repo": str(source_repo)})
    assert (code, body["limit"], body["allowed"]) == (429, "running_total", 1), body
    assert "for everyone together" in body["message"]
    assert [s.id for s in await store.list_sessions()] == ["ses-0000000000aa"]
