"""Sessions that never lose work: snapshots, pause and resume with the conversation, faults.

Each test is one way the predecessor lost work, reproduced against the real server, real OpenCode
and the scripted model, with what must survive it checked.
"""

from __future__ import annotations

import gzip

import pytest

from tabbi_sandbox import processes
from tests.conftest import git
from tests.support.llm import Reply, write
from tests.support.snapshots import archive_bytes, open_archive
from tests.support.waiting import wait_exited
from tests.test_sessions import opencode_pids, running_session

pytestmark = pytest.mark.timeout(300)


def contiguous(events: list[dict]) -> bool:
    return [e["seq"] for e in events] == list(range(1, len(events) + 1))


def snapshot_files(data_dir, sid):
    folder = data_dir / "snapshots" / sid
    return sorted(folder.glob("*.snapshot")) if folder.is_dir() else []


async def test_pause_then_a_prompt_resumes_the_same_conversation(api, llm, source_repo, workspace,
                                                                 data_dir):
    sid = await running_session(api, source_repo)
    llm.enqueue(Reply(tools=[write("notes.txt", "remember: 42\n")]), Reply(text="Noted."))
    await api.prompt(sid, "write the number 42 into notes.txt")
    await api.wait_for(sid, lambda e: e["type"] == "snapshot.saved")

    paused = await api.ok("POST", f"tabbi/api/sessions/{sid}/pause")
    assert paused["state"] == "paused"
    assert processes.sandbox_pids(sid) == []
    assert not workspace(sid).exists()  # the snapshot is all that is left of it
    assert snapshot_files(data_dir, sid)

    before = len(llm.agent_requests())
    last = (await api.events(sid))["last_seq"]
    llm.enqueue(Reply(text="You asked me to write 42 into notes.txt."))
    await api.prompt(sid, "what did I ask you before?")  # a prompt resumes a paused session
    events = await api.wait_turn(sid, after=last)
    assert events[-1]["data"]["outcome"] == "completed"
    statuses = [e["data"].get("phase") for e in (await api.events(sid))["events"]
                if e["type"] == "session.status"]
    assert "restoring" in statuses

    # The model saw the earlier turn: the SAME OpenCode session continued.
    request = llm.agent_requests()[before]
    said = repr(request["messages"])
    assert "write the number 42 into notes.txt" in said and "what did I ask you before?" in said
    assert (workspace(sid) / "notes.txt").read_text() == "remember: 42\n"
    assert git("branch", "--show-current", cwd=workspace(sid)).startswith("tabbi/")
    assert contiguous((await api.events(sid))["events"])


@pytest.mark.tabbi(idle_timeout=2.0)
async def test_idle_session_pauses_by_itself(api, llm, source_repo):
    sid = await running_session(api, source_repo)
    await api.prompt(sid, "hello")
    events = await api.wait_for(
        sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "paused", timeout=90)
    assert events[-1]["data"]["reason"] == "idle"
    assert processes.sandbox_pids(sid) == []
    resumed = await api.ok("POST", f"tabbi/api/sessions/{sid}/resume", expect=202)
    assert resumed["state"] == "starting"
    await api.wait_state(sid, "running", after=resumed["last_seq"])


async def test_pause_is_refused_during_a_turn(api, llm, source_repo):
    sid = await running_session(api, source_repo)
    llm.enqueue(Reply(text="slow " * 100, chunks=50, drip=0.1))
    await api.prompt(sid, "talk")
    await api.wait_for(sid, lambda e: e["type"] == "text.delta")
    code, answer = await api.call("POST", f"tabbi/api/sessions/{sid}/pause")
    assert code == 409 and "a turn is running" in answer["message"]
    await api.ok("POST", f"tabbi/api/sessions/{sid}/abort")
    await api.wait_turn(sid)


async def test_killing_the_whole_sandbox_mid_turn(api, llm, source_repo, workspace):
    sid = await running_session(api, source_repo)
    llm.enqueue(Reply(tools=[write("kept.txt", "kept\n")]), Reply(text="ok"))
    await api.prompt(sid, "write kept.txt")
    await api.wait_turn(sid)
    llm.enqueue(Reply(text="z " * 200, chunks=100, drip=0.1))
    await api.prompt(sid, "talk")
    seen = await api.wait_for(sid, lambda e: e["type"] == "text.delta" and "z" in e["data"]["delta"])
    # bwrap, bootstrap, OpenCode: everything. Killing one takes others with it (the PID
    # namespace's init, die-with-parent), so a process listed a moment ago may be gone already:
    # kill_all tolerates that (killing the listed pids one by one raised ProcessLookupError).
    processes.kill_all(sid)
    events = await api.wait_for(
        sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "error",
        after=seen[-1]["seq"])
    assert next(e["data"]["message"] for e in events if e["type"] == "error").startswith(
        "The agent process stopped unexpectedly")
    assert [e["data"]["outcome"] for e in events if e["type"] == "turn.finished"] == ["error"]
    assert contiguous((await api.events(sid))["events"])

    llm.enqueue(Reply(text="back"))
    await api.prompt(sid, "again")
    assert (await api.wait_turn(sid, after=events[-1]["seq"]))[-1]["data"]["outcome"] == "completed"
    assert (workspace(sid) / "kept.txt").read_text() == "kept\n"


@pytest.mark.tabbi(snapshots_keep=2)
async def test_failing_snapshots_keep_the_sandbox_running_and_retry(api, llm, source_repo, data_dir):
    sid = await running_session(api, source_repo)
    blocker = data_dir / "snapshots" / sid
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the snapshot folder should be")  # every snapshot now fails

    await api.prompt(sid, "first")
    failed = await api.wait_for(sid, lambda e: e["type"] == "snapshot.failed")
    assert failed[-1]["data"]["message"]
    code, answer = await api.call("POST", f"tabbi/api/sessions/{sid}/pause")
    assert code == 500 and "keeps running" in answer["message"]
    assert (await api.ok("GET", f"tabbi/api/sessions/{sid}"))["state"] == "running"

    blocker.unlink()  # the disk is fine again: the next turn's snapshot succeeds
    after = (await api.events(sid))["last_seq"]
    for text in ("second", "third", "fourth"):
        await api.prompt(sid, text)
        after = (await api.wait_for(sid, lambda e: e["type"] == "snapshot.saved", after=after))[-1]["seq"]
    assert len(snapshot_files(data_dir, sid)) == 2  # only the newest are kept
    assert contiguous((await api.events(sid))["events"])
    await api.ok("DELETE", f"tabbi/api/sessions/{sid}", expect=204)
    assert snapshot_files(data_dir, sid) == []  # snapshots go away with the session


SECRET_KEY = "tabbi-test-model-key-51c3a"


@pytest.mark.tabbi(llm_api_key=SECRET_KEY)
async def test_no_secret_inside_a_snapshot(api, llm, source_repo, data_dir):
    """Threat: snapshots are files that outlive the sandbox and may be copied around; the model
    key and OpenCode's password must never be in them."""
    sid = await running_session(api, source_repo)
    with open(f"/proc/{opencode_pids(sid)[0]}/environ", "rb") as f:
        environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    password = environ[b"OPENCODE_SERVER_PASSWORD"]
    assert SECRET_KEY.encode() not in b"".join(environ.values())  # the key stays in the server
    await api.prompt(sid, "hello")
    await api.wait_for(sid, lambda e: e["type"] == "snapshot.saved")
    archive = snapshot_files(data_dir, sid)[0]
    assert SECRET_KEY.encode() not in gzip.decompress(archive_bytes(archive))
    with open_archive(archive) as tar:
        names = tar.getnames()
        for member in tar.getmembers():
            if member.isfile():
                content = tar.extractfile(member).read()
                assert SECRET_KEY.encode() not in content and password not in content, member.name
    assert any(n.startswith("workspace/") for n in names)
    assert "home/.local/share/opencode/opencode.db" in names
    assert not [n for n in names if n.endswith(".log") or "/log/" in n]


def test_server_killed_mid_turn_then_restarted(tmp_path, llm, source_repo):
    """SIGKILL the Jupyter server during a turn, with a prompt queued behind it; start it again on
    the same data: every persisted event is still there, the session is reconciled with an event
    saying what happened, and the queued prompt is delivered."""
    from tests.support.server import JupyterProcess
    from tests.test_sessions import opencode_pids as oc_pids

    first = JupyterProcess(llm.url, tmp_path / "srv")
    try:
        sid = first.call("POST", "tabbi/api/sessions", {"repo": str(source_repo)})["id"]
        first.wait_event(sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "running")
        llm.enqueue(Reply(tools=[write("before.txt", "before the crash\n")]), Reply(text="saved"),
                    Reply(text="w " * 300, chunks=150, drip=0.1), Reply(text="delivered after restart"))
        first.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "write before.txt"})
        first.wait_event(sid, lambda e: e["type"] == "snapshot.saved")
        first.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "talk for long"})
        first.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "the queued one"})
        first.wait_event(sid, lambda e: e["type"] == "text.delta" and "w" in e["data"]["delta"])
        persisted = first.call("GET", f"tabbi/api/sessions/{sid}/events")["events"]
    finally:
        first.kill()
    # The sandbox dies with its server (no orphan OpenCode is left behind).
    wait_exited(lambda: oc_pids(sid), 30, "the sandbox dying with its server")

    second = JupyterProcess(llm.url, tmp_path / "srv")
    try:
        done = second.wait_event(
            sid, lambda e: e["type"] == "turn.finished" and e["data"]["outcome"] == "completed",
            after=persisted[-1]["seq"], timeout=180)
        events = second.call("GET", f"tabbi/api/sessions/{sid}/events")["events"]
    finally:
        second.stop()
    assert contiguous(events)
    assert events[: len(persisted)] == persisted  # nothing persisted before the crash is lost
    after_crash = events[len(persisted):]
    kinds = [(e["type"], e["data"].get("state") or e["data"].get("outcome") or e["data"].get("name"))
             for e in after_crash]
    assert ("error", "ServerRestarted") in kinds
    assert ("turn.finished", "error") in kinds  # the interrupted turn ends, reported
    assert ("session.status", "paused") in kinds and ("session.status", "running") in kinds
    started = [e["data"]["text"] for e in after_crash if e["type"] == "turn.started"]
    assert started == ["the queued one"] and done["seq"] > 0


def test_server_killed_mid_turn_reattaches_to_its_live_sandbox(tmp_path, llm, source_repo):
    """With detach_sandboxes, a sandbox outlives its crashed server. The next server re-attaches:
    the same OpenCode process goes on, the model call the crash cut (model calls go through the
    server's gateway) is retried by OpenCode and goes through the new server, what the agent did
    meanwhile is caught up from OpenCode into the log, the turn ends as completed, and the queued
    prompt is delivered. A clean stop of that server then stops the sandbox."""
    from tests.support.server import JupyterProcess
    from tests.test_sessions import opencode_pids as oc_pids

    # While no server listens, the model is out of reach (its gateway is in the server): OpenCode
    # keeps retrying, and must not give up before the next server is there.
    detach = ["--TabbiExtension.detach_sandboxes=True", "--TabbiExtension.model_retries=100"]
    first = JupyterProcess(llm.url, tmp_path / "srv", extra=detach)
    try:
        sid = first.call("POST", "tabbi/api/sessions", {"repo": str(source_repo)})["id"]
        first.wait_event(sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "running")
        words = " ".join(f"w{i}" for i in range(120))
        llm.enqueue(Reply(text=words, chunks=60, drip=0.05), Reply(text="answered after re-attach"),
                    Reply(text="delivered after re-attach"))
        first.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "talk for long"})
        first.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "the queued one"})
        first.wait_event(sid, lambda e: e["type"] == "text.delta")
        persisted = first.call("GET", f"tabbi/api/sessions/{sid}/events")["events"]
        agent = oc_pids(sid)
    finally:
        first.kill()
    assert agent and set(agent) <= set(oc_pids(sid)), "the sandbox outlived the server"

    # On the same port: the sandbox reaches the model gateway at the URL it was started with.
    second = JupyterProcess(llm.url, tmp_path / "srv", extra=detach, port=first.port)
    try:
        caught_up = second.wait_event(sid, lambda e: e["type"] == "turn.finished",
                                      after=persisted[-1]["seq"], timeout=120)
        done = second.wait_event(sid, lambda e: e["type"] == "turn.finished", after=caught_up["seq"],
                                 timeout=120)
        events = second.call("GET", f"tabbi/api/sessions/{sid}/events")["events"]
        assert set(agent) <= set(oc_pids(sid)), "re-attached to the same OpenCode, not a new sandbox"
    finally:
        second.stop()
    wait_exited(lambda: oc_pids(sid), 30, "a clean stop stopping the sandbox")
    assert contiguous(events)
    assert events[: len(persisted)] == persisted
    after = events[len(persisted):]
    assert ("session.status", "reattached") in [(e["type"], e["data"].get("phase")) for e in after]
    assert not [e for e in after if e["type"] == "error"], after
    texts = [e["data"]["text"] for e in after if e["type"] == "part.updated" and e["data"].get("text")]
    assert "answered after re-attach" in texts, "the retried model call went through the new server"
    finished = [(e["data"]["prompt_id"], e["data"]["outcome"]) for e in after if e["type"] == "turn.finished"]
    assert [outcome for _, outcome in finished] == ["completed", "completed"]
    assert done["seq"] > caught_up["seq"]
    started = [e["data"]["text"] for e in after if e["type"] == "turn.started"]
    assert started == ["the queued one"]


def test_a_detached_sandbox_orphaned_while_starting_is_stopped_by_the_next_server(tmp_path, llm, source_repo):
    """A detached sandbox whose server died before it was ready was never recorded, so no server
    can re-attach to it: it must not run on (until its own deadline). Its bootstrap ends at its
    next progress line, which nobody reads; the next server also kills whatever still carries the
    sandbox's marker (for the moment between "ready" and the state being stored)."""
    from tabbi_sandbox import processes
    from tests.support.server import JupyterProcess

    detach = ["--TabbiExtension.detach_sandboxes=True"]
    first = JupyterProcess(llm.url, tmp_path / "srv", extra=detach)
    try:
        sid = first.call("POST", "tabbi/api/sessions", {"repo": str(source_repo)})["id"]
        first.wait_event(sid, lambda e: e["data"].get("phase") == "starting_agent")
    finally:
        first.kill()
    assert processes.sandbox_pids(sid), "the detached sandbox outlived its server"
    second = JupyterProcess(llm.url, tmp_path / "srv", extra=detach)
    try:
        wait_exited(lambda: processes.sandbox_pids(sid), 30, "the orphan being stopped")
        state = second.call("GET", f"tabbi/api/sessions/{sid}")["state"]
    finally:
        second.stop()
    assert state == "error"


@pytest.mark.tabbi(idle_timeout=2.0)
@pytest.mark.timeout(120)
async def test_server_stops_cleanly_while_a_sandbox_is_being_created(api, llm, source_repo):
    """The test ends (and the server shuts down in teardown) just as the resumed sandbox's process
    is being created. Cancelling process creation used to hang shutdown forever (CPython 3.11);
    before the fix this failed in about half of the runs, as a teardown timeout."""
    sid = await running_session(api, source_repo)
    await api.prompt(sid, "hello")
    await api.wait_for(
        sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "paused", timeout=90)
    resumed = await api.ok("POST", f"tabbi/api/sessions/{sid}/resume", expect=202)
    await api.wait_for(sid, lambda e: e["data"].get("phase") == "restoring", after=resumed["last_seq"])
