"""An end-to-end session on ConvexStore: a real Jupyter server configured as a deployment would be
(``store_class`` and the ``TABBI_CONVEX_*`` environment), real OpenCode, the scripted model, and
the Convex stand-in serving the real functions over Convex's HTTP API. Convex goes away in the
middle of a turn and comes back; the server restarts; the history is read back from Convex in a
new notebook, and the session goes on where it was."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.support.convex_standin import ConvexStandin, convex_standin  # noqa: F401 (a fixture)
from tests.support.convex_store import STORE_CLASS, store_env
from tests.support.llm import Reply
from tests.support.notebooks import server_env
from tests.support.server import JupyterProcess

STREAMED = " ".join(f"word{n}" for n in range(60))


def turn_events(server: JupyterProcess, sid: str, after: int) -> list[dict]:
    """The events of the turn that starts after ``after``, up to its end."""
    end = server.wait_event(sid, lambda e: e["type"] == "turn.finished", after=after, timeout=180)
    return server.call("GET", f"tabbi/api/sessions/{sid}/events?after={after}&limit=1000")["events"][
        : end["seq"] - after]


def degraded_until(server: JupyterProcess, condition, timeout: float = 60) -> dict:
    """The health report once it is degraded and ``condition`` holds for it."""
    deadline = time.monotonic() + timeout
    while True:
        health = server.call("GET", "tabbi/api/health")
        if health["status"] == "degraded" and condition(health):
            return health
        if time.monotonic() > deadline:
            raise TimeoutError(f"health never got there: {health}")
        time.sleep(0.05)  # a poll interval; the report is what is waited for


def read_in_a_new_notebook(server: JupyterProcess, sid: str, workdir: Path) -> dict:
    """What a fresh notebook's kernel reads of the session through tabbi's Python API."""
    code = (
        "import json, tabbi_kernel\n"
        f"session = tabbi_kernel.connect().session({sid!r})\n"
        "events = session.all_events()\n"
        "texts = [e['data'].get('text') for e in events if e['type'] == 'part.updated']\n"
        "print(json.dumps({'state': session.state, 'seqs': [e['seq'] for e in events], 'text': texts}))\n"
    )
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    client = NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    client.execute(env={**os.environ, **server_env(server)})
    [output] = notebook.cells[0].outputs
    return json.loads(output["text"])


def test_a_session_on_convex_survives_an_outage_and_a_server_restart(tmp_path, llm, source_repo,
                                                                    convex_standin: ConvexStandin):  # noqa: F811
    convex_standin.reset()
    env = store_env(convex_standin)
    extra = [f"--TabbiExtension.store_class={STORE_CLASS}"]
    workdir = tmp_path / "srv"
    first = JupyterProcess(llm.url, workdir, extra=extra, env=env)
    try:
        sid = first.call("POST", "tabbi/api/sessions", {"repo": str(source_repo)})["id"]
        first.wait_event(sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "running")
        # A turn streams while Convex goes away and comes back.
        llm.enqueue(Reply(text=STREAMED, chunks=30, drip=0.05))
        before = first.call("GET", f"tabbi/api/sessions/{sid}")["last_seq"]
        first.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "stream for a while"})
        first.wait_event(sid, lambda e: e["type"] == "text.delta", after=before)
        convex_standin.faults(outage=True)
        # The turn's writes meet the outage (it cannot end without writing turn.finished).
        health = degraded_until(first, lambda h: "retried" in (h["store"].get("detail") or ""))
        assert health["store"]["backend"] == "ConvexStore" and health["store"]["reachable"] is False
        assert "unreachable" in health["store"]["detail"]
        convex_standin.faults()
        turn = turn_events(first, sid, before)
        assert [e["seq"] for e in turn] == list(range(before + 1, before + 1 + len(turn)))
        assert turn[-1]["data"]["outcome"] == "completed"
        [part] = [e for e in turn if e["type"] == "part.updated" and e["data"]["role"] == "assistant"
                  and e["data"]["part_type"] == "text"][-1:]
        deltas = "".join(e["data"]["delta"] for e in turn if e["type"] == "text.delta"
                         and e["data"]["part_id"] == part["data"]["part_id"])
        assert part["data"]["text"] == STREAMED and deltas == STREAMED  # no delta lost or twice
        assert first.call("GET", "tabbi/api/health")["store"].get("detail") is None
        history = first.call("GET", f"tabbi/api/sessions/{sid}/events?limit=1000")["events"]
    finally:
        first.stop()  # a clean stop: the quiet session is snapshotted and paused

    second = JupyterProcess(llm.url, workdir, extra=extra, env=env)
    try:
        assert not (workdir / "tabbi-data" / "tabbi.sqlite3").exists()  # all of it lives in Convex
        assert [s["id"] for s in second.call("GET", "tabbi/api/sessions")["sessions"]] == [sid]
        reloaded = second.call("GET", f"tabbi/api/sessions/{sid}/events?limit=1000")["events"]
        assert reloaded[: len(history)] == history
        seen = read_in_a_new_notebook(second, sid, workdir)
        assert seen["seqs"] == [e["seq"] for e in reloaded] and STREAMED in seen["text"]
        assert seen["state"] == "paused"
        # The session goes on, its log continuing where it was.
        llm.enqueue(Reply(text="still here"))
        last = reloaded[-1]["seq"]
        second.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "are you there?"})
        turn = turn_events(second, sid, last)
        assert turn[0]["seq"] == last + 1 and turn[-1]["data"]["outcome"] == "completed"
        assert "still here" in "".join(e["data"]["delta"] for e in turn if e["type"] == "text.delta")
    finally:
        second.stop()


pytestmark = pytest.mark.timeout(600)
