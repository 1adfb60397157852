"""Sessions end to end: the real Jupyter server, real OpenCode (offline), real git, the scripted model.

Each test names the promise it checks; waits are on events with deadlines, never on sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from tabbi_sandbox import processes
from tests.conftest import git
from tests.support.llm import Reply, bash, edit, read, write

pytestmark = pytest.mark.timeout(300)


async def running_session(api, repo) -> str:
    session = await api.create(str(repo))
    await api.wait_state(session["id"], "running")
    return session["id"]


async def read_ws(ws, until_type: str = "turn.finished", timeout: float = 90) -> list[dict]:
    """Read WebSocket events until one of ``until_type`` arrives."""
    out = []
    while True:
        message = await asyncio.wait_for(ws.read_message(), timeout)
        assert message is not None, "the server closed the event stream"
        event = json.loads(message)
        out.append(event)
        if event["type"] == until_type:
            return out


def opencode_pids(session_id: str) -> list[int]:
    """The session's OpenCode server processes. A child OpenCode is forking (to run git, say)
    carries OpenCode's command line until it execs: one whose parent is also listed is such a
    moment's fork, not a server, and is left out (it made a test's "same processes" flaky)."""
    found: dict[int, int] = {}
    for pid in processes.sandbox_pids(session_id):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat", "rb") as f:
                parent = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if argv and b"opencode" in os.path.basename(argv[0]) and b"serve" in argv:
            found[pid] = parent
    return [pid for pid, parent in found.items() if parent not in found]


@pytest.mark.parametrize("isolation", ["bwrap", "none"])
async def test_prompt_writes_file_on_session_branch(api, llm, source_repo, workspace, jp_ws_fetch,
                                                    isolation):
    session = await api.create(str(source_repo))
    assert session["state"] == "starting"
    sid = session["id"]
    ws = await jp_ws_fetch("tabbi", "api", "sessions", sid, "stream", params={"after": 0})
    await api.wait_state(sid, "running")

    llm.enqueue(
        Reply(text="I'll create hello.py.", tools=[write("hello.py", "print('hello')\n")]),
        Reply(text="Created hello.py.", chunks=4),
    )
    await api.prompt(sid, "create hello.py")
    events = await read_ws(ws)
    ws.close()

    # The agent's file is in the workspace, on the session's own branch.
    ws_path = workspace(sid)
    assert (ws_path / "hello.py").read_text() == "print('hello')\n"
    assert git("branch", "--show-current", cwd=ws_path) == session["work_branch"]
    assert session["work_branch"].startswith("tabbi/")
    # Nothing of tabbi's was written into the user's repository.
    assert sorted(p.name for p in source_repo.iterdir()) == [".git", "README.md", "calc.py"]

    # Every event, in seq order, none missing, ending with the turn's end.
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "turn.finished"
    assert events[-1]["data"]["outcome"] == "completed"
    # The log holds the same events (a background snapshot may already have logged one more).
    persisted = (await api.events(sid))["events"]
    assert persisted[: len(events)] == events
    assert {e["type"] for e in persisted[len(events):]} <= {"snapshot.saved"}
    tools = [e["data"] for e in events if e["type"] == "tool"]
    assert [t["status"] for t in tools] == ["pending", "running", "completed"]
    assert tools[-1]["tool"] == "write" and tools[-1]["input"]["filePath"].endswith("hello.py")
    text = "".join(e["data"]["delta"] for e in events if e["type"] == "text.delta")
    assert "Created hello.py." in text
    # The conversation is persisted as messages with parts.
    messages = (await api.ok("GET", f"tabbi/api/sessions/{sid}/messages"))["messages"]
    assert [m["role"] for m in messages][:2] == ["user", "assistant"]
    assert any(p["type"] == "tool" and p["status"] == "completed" for p in messages[1]["parts"])


async def test_late_and_reconnecting_clients_get_exactly_the_events_after_their_seq(
    api, llm, source_repo, jp_ws_fetch
):
    sid = await running_session(api, source_repo)
    llm.enqueue(Reply(text="one two three four five six seven eight", chunks=8, drip=0.15))
    await api.prompt(sid, "count slowly")

    # A client that reads part of the turn, then drops its connection mid-turn...
    first = await jp_ws_fetch("tabbi", "api", "sessions", sid, "stream", params={"after": 0})
    head = await read_ws(first, until_type="text.delta")
    first.close()
    k = head[-1]["seq"]
    # ...and reconnects from its last seq: it gets exactly what came after, live.
    second = await jp_ws_fetch("tabbi", "api", "sessions", sid, "stream", params={"after": k})
    tail = await read_ws(second)
    second.close()
    assert tail[0]["seq"] == k + 1
    assert [e["seq"] for e in head + tail] == list(range(1, tail[-1]["seq"] + 1))

    # A client arriving after the turn (after=0) replays the same log; the GET agrees.
    late = await jp_ws_fetch("tabbi", "api", "sessions", sid, "stream", params={"after": 0})
    replay = await read_ws(late)
    late.close()
    assert replay == head + tail
    page = await api.events(sid, after=k)
    assert page["events"][: len(tail)] == tail


async def test_prompt_while_starting_is_delivered_after_start_and_prompts_run_in_order(
    api, llm, source_repo
):
    session = await api.create(str(source_repo))
    sid = session["id"]
    llm.enqueue(Reply(text="first answer"), Reply(text="second answer"))
    await api.prompt(sid, "first prompt")  # the sandbox is still starting
    await api.prompt(sid, "second prompt")  # queued behind the first
    finished = 0

    def second_turn_finished(event: dict) -> bool:
        nonlocal finished
        finished += event["type"] == "turn.finished"
        return finished == 2

    events = await api.wait_for(sid, second_turn_finished, timeout=120)
    order = [(e["type"], e["data"].get("text") or e["data"].get("state")) for e in events
             if e["type"] in ("turn.started", "turn.finished")
             or (e["type"] == "session.status" and e["data"]["state"] == "running")]
    assert order[0] == ("session.status", "running")
    assert [o for o in order if o[0] == "turn.started"] == [
        ("turn.started", "first prompt"), ("turn.started", "second prompt")]
    kinds = [o[0] for o in order]
    assert kinds == ["session.status", "turn.started", "turn.finished", "turn.started",
                     "turn.finished"]
    asked = [r["messages"][-1]["content"] for r in llm.agent_requests()]
    user_texts = [c if isinstance(c, str) else c[0]["text"] for c in asked]
    assert user_texts == ["first prompt", "second prompt"]


async def test_abort_mid_turn_then_next_prompt_works(api, llm, source_repo):
    sid = await running_session(api, source_repo)
    llm.enqueue(Reply(text="x " * 200, chunks=100, drip=0.1), Reply(text="after abort"))
    await api.prompt(sid, "talk for a long time")
    seen = await api.wait_for(sid, lambda e: e["type"] == "text.delta")
    await api.ok("POST", f"tabbi/api/sessions/{sid}/abort")
    events = await api.wait_turn(sid, after=seen[-1]["seq"])
    assert events[-1]["data"]["outcome"] == "aborted"
    assert not [e for e in events if e["type"] == "error"]

    await api.prompt(sid, "are you there?")
    events = await api.wait_turn(sid, after=events[-1]["seq"])
    assert events[-1]["data"]["outcome"] == "completed"
    assert "after abort" in "".join(e["data"]["delta"] for e in events if e["type"] == "text.delta")

    code, body = await api.call("POST", f"tabbi/api/sessions/{sid}/abort")
    assert code == 409 and "no turn" in body["message"]


async def test_opencode_killed_mid_turn_reports_error_and_next_prompt_recovers(
    api, llm, source_repo, workspace
):
    sid = await running_session(api, source_repo)
    llm.enqueue(Reply(tools=[write("kept.txt", "survives\n")]), Reply(text="written"))
    await api.prompt(sid, "write kept.txt")
    done = await api.wait_turn(sid)

    llm.enqueue(Reply(text="y " * 200, chunks=100, drip=0.1))
    await api.prompt(sid, "talk for a long time")
    seen = await api.wait_for(sid, lambda e: e["type"] == "text.delta", after=done[-1]["seq"])
    pids = opencode_pids(sid)
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)

    events = await api.wait_for(
        sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "error",
        after=seen[-1]["seq"],
    )
    errors = [e["data"]["message"] for e in events if e["type"] == "error"]
    assert errors and "stopped unexpectedly" in errors[0]
    finished = [e for e in events if e["type"] == "turn.finished"]
    assert len(finished) == 1 and finished[0]["data"]["outcome"] == "error"

    llm.enqueue(Reply(text="back again"))
    await api.prompt(sid, "hello again")
    events = await api.wait_turn(sid, after=events[-1]["seq"])
    assert events[-1]["data"]["outcome"] == "completed"
    assert any(e["type"] == "session.status" and e["data"]["state"] == "running" for e in events)
    assert (workspace(sid) / "kept.txt").read_text() == "survives\n"


@pytest.mark.tabbi(model_retries=1)
async def test_model_server_500_ends_turn_with_error_and_session_keeps_working(
    api, llm, source_repo
):
    sid = await running_session(api, source_repo)
    llm.enqueue(*[Reply(status=500)] * 3)
    await api.prompt(sid, "this will fail")
    events = await api.wait_turn(sid)
    assert events[-1]["data"]["outcome"] == "error"
    errors = [e["data"]["message"] for e in events if e["type"] == "error"]
    assert len(errors) == 1 and "scripted failure 500" in errors[0]
    llm.script.clear()

    llm.enqueue(Reply(text="fine now"))
    await api.prompt(sid, "try again")
    events = await api.wait_turn(sid, after=events[-1]["seq"])
    assert events[-1]["data"]["outcome"] == "completed"


async def test_malformed_model_stream_ends_turn_with_error(api, llm, source_repo):
    sid = await running_session(api, source_repo)
    llm.enqueue(Reply(text="partial answer here", malformed=True))
    await api.prompt(sid, "break")
    events = await api.wait_turn(sid)
    assert events[-1]["data"]["outcome"] == "error"
    assert "JSON" in events[-1]["data"]["error"]


async def test_delete_ends_every_sandbox_process(api, llm, source_repo, workspace):
    sid = await running_session(api, source_repo)
    assert opencode_pids(sid)
    await api.ok("DELETE", f"tabbi/api/sessions/{sid}", expect=204)
    assert processes.sandbox_pids(sid) == []
    assert not workspace(sid).exists()
    code, _ = await api.call("GET", f"tabbi/api/sessions/{sid}")
    assert code == 404


async def test_failed_start_reports_a_readable_error_and_leaves_no_process(api, source_repo):
    session = await api.create(str(source_repo), branch="no-such-branch")
    events = await api.wait_for(
        session["id"], lambda e: e["type"] == "session.status" and e["data"]["state"] == "error"
    )
    assert "no-such-branch" in events[-1]["data"]["error"]
    assert processes.sandbox_pids(session["id"]) == []
    got = await api.ok("GET", f"tabbi/api/sessions/{session['id']}")
    assert got["state"] == "error" and "git clone failed" in got["error"]


async def test_server_shutdown_leaves_no_sandbox_process(api, source_repo, tabbi_app):
    sid = await running_session(api, source_repo)
    assert opencode_pids(sid)
    await tabbi_app.manager.shutdown()
    assert processes.sandbox_pids(sid) == []


async def test_two_sessions_do_not_see_each_others_events(api, llm, source_repo):
    a = await api.create(str(source_repo))
    b = await api.create(str(source_repo))
    await api.wait_state(a["id"], "running")
    await api.wait_state(b["id"], "running")
    await asyncio.gather(api.prompt(a["id"], "prompt for A"), api.prompt(b["id"], "prompt for B"))
    events_a, events_b = await asyncio.gather(api.wait_turn(a["id"]), api.wait_turn(b["id"]))

    def prompts(events):
        return {e["data"]["text"] for e in events if e["type"] == "turn.started"} | {
            e["data"]["text"] for e in events
            if e["type"] == "part.updated" and e["data"]["role"] == "user"}

    assert prompts(events_a) == {"prompt for A"}
    assert prompts(events_b) == {"prompt for B"}
    ids_a = {e["data"].get("message_id") for e in events_a} - {None}
    ids_b = {e["data"].get("message_id") for e in events_b} - {None}
    assert ids_a and ids_b and not ids_a & ids_b


async def test_health_reports_dependencies(api):
    health = await api.ok("GET", "tabbi/api/health")
    assert health["status"] == "ok"
    assert health["store"]["reachable"] is True
    assert health["opencode"]["found"] is True
    assert health["sandbox"]["usable"] is True
    assert health["model"]["configured"] is True


@pytest.mark.tabbi(llm_base_url=None, model=None)
async def test_health_says_what_is_missing(api):
    health = await api.ok("GET", "tabbi/api/health")
    assert health["status"] == "degraded"
    assert health["model"]["configured"] is False and "TABBI_MODEL" in health["model"]["detail"]


async def test_endpoints_require_authentication(jp_fetch):
    response = await jp_fetch(
        "tabbi", "api", "sessions", headers={"Authorization": "token wrong"}, raise_error=False
    )
    assert response.code == 403


async def test_read_edit_and_tool_errors(api, llm, source_repo, workspace):
    sid = await running_session(api, source_repo)
    llm.enqueue(
        Reply(tools=[read("calc.py")]),
        Reply(tools=[edit("calc.py", "return a + b", "return a - b")]),
        Reply(tools=[edit("calc.py", "this text is not there", "x")]),
        Reply(tools=[bash("echo from-bash; exit 3")]),
        Reply(text="edited"),
    )
    await api.prompt(sid, "make add subtract")
    events = await api.wait_turn(sid)
    assert events[-1]["data"]["outcome"] == "completed"
    assert "return a - b" in (workspace(sid) / "calc.py").read_text()
    final = [e["data"] for e in events if e["type"] == "tool" and e["data"]["status"] in
             ("completed", "error")]
    assert [(t["tool"], t["status"]) for t in final] == [
        ("read", "completed"), ("edit", "completed"), ("edit", "error"), ("bash", "completed")]
    assert "return a + b" in final[0]["output"]
    assert final[2]["error"]  # a readable reason why the edit failed
    assert "from-bash" in final[3]["output"]


@pytest.mark.tabbi(permissions={"edit": "ask", "bash": "allow"})
async def test_permission_asked_and_answered_through_the_api(api, llm, source_repo, workspace):
    sid = await running_session(api, source_repo)
    llm.enqueue(Reply(tools=[write("asked.txt", "yes\n")]), Reply(text="wrote it"))
    await api.prompt(sid, "write asked.txt")
    asked = await api.wait_for(sid, lambda e: e["type"] == "permission.asked")
    request = asked[-1]["data"]
    assert request["permission"] == "edit" and "asked.txt" in request["metadata"]["diff"]
    assert not (workspace(sid) / "asked.txt").exists()
    await api.ok("POST", f"tabbi/api/sessions/{sid}/permissions/{request['permission_id']}",
                 {"reply": "once"})
    events = await api.wait_turn(sid, after=asked[-1]["seq"])
    assert any(e["type"] == "permission.replied" and e["data"]["reply"] == "once" for e in events)
    assert (workspace(sid) / "asked.txt").read_text() == "yes\n"


async def test_diff_and_file_endpoints_stay_inside_the_workspace(api, llm, source_repo, workspace):
    sid = await running_session(api, source_repo)
    llm.enqueue(Reply(tools=[write("new.py", "N = 1\n"), edit("calc.py", "a + b", "b + a")]),
                Reply(tools=[bash("ln -s /etc/hostname escape.txt")]),
                Reply(text="done"))
    await api.prompt(sid, "change things")
    await api.wait_turn(sid)
    diff = await api.ok("GET", f"tabbi/api/sessions/{sid}/diff")
    by_path = {f["path"]: f for f in diff["files"]}
    assert by_path["calc.py"]["status"] == "modified" and by_path["calc.py"]["additions"] == 1
    assert by_path["new.py"]["status"] == "added" and "+N = 1" in diff["diff"]
    got = await api.ok("GET", f"tabbi/api/sessions/{sid}/file", params={"path": "new.py"})
    assert got["content"] == "N = 1\n"
    # Threat: a path or a symlink planted by the agent that makes the server read outside the repo.
    for path, message in [("../../etc/passwd", "without '..'"), ("/etc/passwd", "relative"),
                          ("escape.txt", "outside the repository")]:
        code, answer = await api.call("GET", f"tabbi/api/sessions/{sid}/file", params={"path": path})
        assert code == 400 and message in answer["message"], (path, answer)
    code, answer = await api.call("GET", f"tabbi/api/sessions/{sid}/file", params={"path": "nope.py"})
    assert code == 404 and "no such file" in answer["message"]


async def test_server_shutdown_during_start_is_prompt_and_leaves_no_process(api, source_repo,
                                                                           tabbi_app):
    session = await api.create(str(source_repo))
    await api.wait_for(session["id"], lambda e: e["data"].get("phase") == "starting_agent")
    await asyncio.wait_for(tabbi_app.manager.shutdown(), 30)
    assert processes.sandbox_pids(session["id"]) == []
