"""Admins (issue 13, item 3): every person's sessions with owner, state, age and use; pausing
or stopping any of them, over REST, the Python API and ``%tabbi admin``; logged.

Here on a shared personal-mode server (tests/support/identity.py: alice, bob, and "owner", the
server's own token, which kernels use); tests/test_hub.py does the same through a real hub,
where admins are the hub's.

Threats: a person who is not an admin listing everyone's sessions (repositories, who works on
what), pausing or stopping someone else's work, or even learning that the admin routes exist;
an admin's stop losing the owner's accepted prompts or workspace; an admin acting unseen.
"""

from __future__ import annotations

import json
import logging

import pytest

from tabbi_extension import admin
from tests.support.api import Api
from tests.support.identity import headers
from tests.support.llm import Reply

ADMINS = {"admin_users": ["alice", "owner"]}


@pytest.fixture
def admins() -> dict:
    return ADMINS


@pytest.fixture
def jp_server_config(jp_server_config: dict, admins: dict) -> dict:
    return {**jp_server_config, "TabbiAdmins": admins}


async def answer(jp_fetch, user: str, method: str, path: str) -> tuple[int, str, bytes]:
    auth = {} if user == "owner" else headers(user)  # the owner: jp_fetch's own token
    response = await jp_fetch(*path.split("/"), method=method, raise_error=False, headers=auth,
                              body="{}" if method == "POST" else None)
    return response.code, response.headers.get("Content-Type", ""), response.body


async def admin_row(admin: Api, sid: str) -> dict:
    """Session ``sid`` as the admin listing shows it."""
    return next(s for s in (await admin.ok("GET", "tabbi/api/admin/sessions"))["sessions"] if s["id"] == sid)


async def test_a_person_who_is_not_an_admin_cannot_tell_the_admin_routes_exist(jp_fetch):
    """Threat: bob probes the admin routes (listing, pausing, stopping) to learn whether they
    exist or to use them. He gets exactly what a route that does not exist gives, status,
    type and body; so does the server's own user, who is an admin only when named."""
    unknown = await answer(jp_fetch, "bob", "GET", "tabbi/api/admin/no-such-route")
    assert unknown[0] == 404 and "html" in unknown[1]
    for method, path in [("GET", "tabbi/api/admin/sessions"),
                         ("POST", "tabbi/api/admin/sessions/ses-0123456789ab/stop"),
                         ("POST", "tabbi/api/admin/sessions/ses-0123456789ab/pause")]:
        assert await answer(jp_fetch, "bob", method, path) == unknown, (method, path)
    alice = await answer(jp_fetch, "alice", "GET", "tabbi/api/admin/sessions")
    assert alice[0] == 200 and json.loads(alice[2]) == {"sessions": [], "admin": "alice"}
    code, _, body = await answer(jp_fetch, "alice", "POST", "tabbi/api/admin/sessions/ses-0123456789ab/stop")
    assert code == 404 and json.loads(body)["message"] == "no session ses-0123456789ab"


@pytest.mark.parametrize("admins", [{}])
async def test_in_personal_mode_nobody_is_an_admin_unless_named(jp_fetch, admins):
    for user in ("owner", "alice"):
        assert (await answer(jp_fetch, user, "GET", "tabbi/api/admin/sessions"))[0] == 404


async def test_an_admin_lists_stops_mid_turn_and_pauses_someone_elses_session(
        jp_fetch, kernel, source_repo, llm, workspace, caplog):
    """alice (an admin) sees bob's session at work, stops it mid-turn: the turn ends saying who
    stopped it, the sandbox ends, the workspace and bob's queued prompt are kept (his resume runs
    it). Then the server's user pauses it from a kernel with ``%tabbi admin pause``. Both actions
    are in the server's log and in bob's event log."""
    bob, alice = Api(jp_fetch, headers("bob")), Api(jp_fetch, headers("alice"))
    sid = (await bob.create(str(source_repo)))["id"]
    await bob.wait_state(sid, "running", timeout=180)
    llm.enqueue(Reply(text="thinking about it", stall=True), Reply(text="The queued one ran."))
    stalled = (await bob.prompt(sid, "think forever"))["prompt_id"]
    waiting = (await bob.prompt(sid, "then this"))["prompt_id"]
    await bob.wait_for(sid, lambda e: e["type"] == "text.delta", timeout=120)

    mine = await admin_row(alice, sid)
    assert (mine["owner"], mine["state"], mine["busy"]) == ("bob", "running", True)
    use = mine["usage"]
    assert use["busy"] and use["prompts_queued"] == 1 and use["running_seconds"] > 0
    assert use["age_seconds"] >= use["running_seconds"] and use["events"] >= mine["last_seq"]

    caplog.set_level(logging.INFO, logger=admin.__name__)
    stopped = await alice.ok("POST", f"tabbi/api/admin/sessions/{sid}/stop")
    assert stopped["state"] == "error" and "administrator (alice)" in stopped["error"]
    events = (await bob.events(sid))["events"]
    ended = next(e["data"] for e in events
                 if e["type"] == "turn.finished" and e["data"]["prompt_id"] == stalled)
    assert ended["outcome"] == "error" and "stopped by an administrator (alice)" in ended["error"]
    assert [e["data"] for e in events if e["type"] == "admin.action"] == [
        {"action": "stop", "by": "alice", "was": "running"}]
    assert f"alice stopped session {sid} of bob" in caplog.text
    assert (workspace(sid) / "README.md").read_text() == "# sample\n"  # the workspace is kept
    after = await admin_row(alice, sid)
    assert after["usage"]["prompts_queued"] == 1 and after["usage"]["running_seconds"] is None

    # bob's accepted prompt was not lost: his resume runs it.
    last = events[-1]["seq"]
    await bob.ok("POST", f"tabbi/api/sessions/{sid}/resume", expect=202)
    await bob.wait_for(sid, lambda e: e["type"] == "turn.finished" and e["data"]["prompt_id"] == waiting,
                       after=last, timeout=180)

    # The server's own user (named an admin) from a kernel.
    await kernel.run("%load_ext tabbi_kernel")
    shown = await kernel.run("%tabbi admin")
    assert shown.status == "ok", shown
    table = shown.displays[0]["text/plain"]
    assert "owner" in table.splitlines()[0] and f"bob  {sid}  running" in table, table
    done = await kernel.run(f"%tabbi admin pause {sid}")
    assert done.status == "ok", done
    assert done.stdout.strip() == f"[tabbi] {sid} of bob is paused (paused by you)"
    assert (await bob.ok("GET", f"tabbi/api/sessions/{sid}"))["state"] == "paused"
    assert f"owner paused session {sid} of bob" in caplog.text
    events = (await bob.events(sid, after=last))["events"]
    assert [e["data"]["by"] for e in events if e["type"] == "admin.action"] == ["owner"]
    paused = await admin_row(alice, sid)
    assert paused["usage"]["snapshots"] >= 1 and paused["usage"]["snapshot_bytes"] > 0
    # the model's tokens as OpenCode reported them (the scripted model: 10 in, 5 out per call)
    assert paused["usage"]["tokens"]["input"] >= 10 and paused["usage"]["tokens"]["output"] >= 5
    assert "model use" in table.splitlines()[0] and " tokens, $" in table
    usage = await kernel.run("%tabbi admin stop")
    assert usage.status == "error" and "which session" in usage.stderr
