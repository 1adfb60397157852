"""A session end to end on ModalProvider: a real Jupyter server process with tabbi configured for
Modal, the real ``modal`` client in it talking to the loopback stand-in of Modal's API, real
OpenCode in the stand-in's bubblewrap sandbox, the scripted model behind tabbi's model gateway.

One journey, to keep the suite lean: start from a local repository (uploaded as a bundle), a
streamed turn, diff, push (the branch leaves as a bundle and is pushed from the server), the
server SIGKILLed mid-turn and a new one re-attaching to the live sandbox with nothing lost, a
pause into a filesystem snapshot and a resume from it with the conversation kept, and an
orphaned sandbox of this server ended by the reconcile.
"""

from __future__ import annotations

import json

import pytest

from tabbi_sandbox.bootstrap import free_port
from tests.conftest import git
from tests.support.llm import Reply, write
from tests.test_lifecycle import contiguous
from tests.test_provider_contract import modal_environment, modal_standin

pytestmark = pytest.mark.timeout(600)

SERVER_TAG = "tabbi-test-server"


def modal_options(idle_timeout: float) -> list[str]:
    return [
        "--TabbiExtension.sandbox_provider_class=tabbi_sandbox.modal.ModalProvider",
        "--ModalProvider.agent_user=",  # the stand-in's images run no RUN step: no user is made
        "--ModalProvider.allow_private_gateway=True",  # the stand-in forwards the server's port
        "--ModalProvider.publish_image=False",
        f"--ModalProvider.server_tag={SERVER_TAG}",
        "--ModalProvider.reconcile_interval=0",
        "--ModalProvider.start_timeout=180",
        f"--TabbiExtension.idle_timeout={idle_timeout}",
        "--TabbiExtension.model_retries=100",
    ]


def orphan(client, session_id: str) -> str:
    """A sandbox tagged for this server whose session is not live (as a crash mid-start leaves)."""
    import modal

    app = modal.App.lookup("tabbi", create_if_missing=True, client=client)
    sb = modal.Sandbox.create(
        app=app,
        tags={"tabbi_session": session_id, "tabbi_server": SERVER_TAG, "tabbi_owner": "nobody"},
        client=client,
        timeout=600,
    )
    return sb.object_id


def test_a_session_runs_end_to_end_on_modal(tmp_path, llm, source_repo):
    import modal

    from tests.support.server import JupyterProcess

    port = free_port()
    with modal_standin(internet_ports=[port]) as standin, modal_environment(standin) as env:
        client = modal.Client.from_credentials(env["MODAL_TOKEN_ID"], env["MODAL_TOKEN_SECRET"])
        options = modal_options(idle_timeout=900)
        first = JupyterProcess(llm.url, tmp_path / "srv", extra=options, env=env, port=port)
        try:
            sid = first.call("POST", "tabbi/api/sessions", {"repo": str(source_repo)})["id"]
            first.wait_event(
                sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "running", timeout=240
            )
            llm.enqueue(Reply(tools=[write("hello.py", "print('hi from modal')\n")]), Reply(text="wrote it"))
            first.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "write hello.py"})
            done = first.wait_event(sid, lambda e: e["type"] == "turn.finished", timeout=180)
            assert done["data"]["outcome"] == "completed", done
            diff = first.call("GET", f"tabbi/api/sessions/{sid}/diff")
            assert [f["path"] for f in diff["files"]] == ["hello.py"]
            pushed = first.call(
                "POST", f"tabbi/api/sessions/{sid}/push", {"message": "from modal"}, timeout=120
            )
            branch = pushed["branch"]
            assert git("show", f"{branch}:hello.py", cwd=source_repo) == "print('hi from modal')"

            # Mid-turn, the server dies; the Modal sandbox does not.
            words = " ".join(f"w{i}" for i in range(120))
            llm.enqueue(Reply(text=words, chunks=60, drip=0.05), Reply(text="answered after re-attach"))
            first.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "talk for long"})
            first.wait_event(sid, lambda e: e["type"] == "text.delta", after=done["seq"])
            persisted = first.call("GET", f"tabbi/api/sessions/{sid}/events")["events"]
            running = [
                s for s in standin.sandboxes.values() if s.running and s.tags.get("tabbi_session") == sid
            ]
        finally:
            first.kill()
        assert len(running) == 1 and running[0].running, "the Modal sandbox outlived its server"
        stray = orphan(client, "ses-000000000000")

        second = JupyterProcess(llm.url, tmp_path / "srv", extra=options, env=env, port=port)
        try:
            caught_up = second.wait_event(
                sid, lambda e: e["type"] == "turn.finished", after=persisted[-1]["seq"], timeout=180
            )
            assert not standin.sandboxes[stray].running, "the orphan was ended by the reconcile"
            assert running[0].running, "the session's own sandbox was kept"
            messages_before = second.call("GET", f"tabbi/api/sessions/{sid}/messages")
            second.call("POST", f"tabbi/api/sessions/{sid}/pause", timeout=300)
            assert not running[0].running, "a pause ends the Modal sandbox (its snapshot remains)"
            llm.enqueue(Reply(text="resumed and remembering"))
            second.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "after the pause"})
            resumed = second.wait_event(
                sid, lambda e: e["type"] == "turn.finished", after=caught_up["seq"], timeout=240
            )
            messages_after = second.call("GET", f"tabbi/api/sessions/{sid}/messages")
            events = second.call("GET", f"tabbi/api/sessions/{sid}/events")["events"]
            diff_after = second.call("GET", f"tabbi/api/sessions/{sid}/diff")
        finally:
            second.stop()
        requests = list(standin.state.create_requests)
    assert contiguous(events) and events[: len(persisted)] == persisted
    after = events[len(persisted) :]
    assert ("session.status", "reattached") in [(e["type"], e["data"].get("phase")) for e in after]
    texts = [e["data"]["text"] for e in after if e["type"] == "part.updated" and e["data"].get("text")]
    assert "answered after re-attach" in texts and "resumed and remembering" in texts
    assert resumed["data"]["outcome"] == "completed"
    phases = [e["data"].get("phase") for e in after if e["type"] == "session.status"]
    assert "restoring" in phases and "reusing_workspace" in phases
    # The conversation is kept: every message from before the pause is still there, in order,
    # and OpenCode (restored from the snapshot image) sent the model the whole conversation.
    ids_before = [m["id"] for m in messages_before["messages"]]
    assert [m["id"] for m in messages_after["messages"]][: len(ids_before)] == ids_before
    last = json.dumps(llm.agent_requests()[-1])
    assert "write hello.py" in last and "talk for long" in last and "after the pause" in last
    assert [f["path"] for f in diff_after["files"]] == ["hello.py"]
    # Modal's idle timeout is above tabbi's idle pause; its lifetime covers tabbi's.
    mine = [r for r in requests if any(t.tag_name == "tabbi_session" and t.tag_value == sid for t in r.tags)]
    assert len(mine) == 2  # the first start and the resume
    for request in mine:
        assert request.definition.idle_timeout_secs > 900
        assert request.definition.timeout_secs >= request.definition.idle_timeout_secs
