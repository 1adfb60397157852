"""Everyday use of the magics through a real kernel (issue 10, items 5-10): which session is
current, a start that fails, messages a person can act on, relative repository paths, the model a
session uses, and a turn that waits for the model."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.conftest import git
from tests.support.llm import Reply, write
from tests.test_kernel import start
from tests.test_magics_units import folded

pytestmark = pytest.mark.timeout(300)

#: No model: a session goes to ``error`` at once, without a sandbox (cheap), as a start that
#: fails for any reason does.
NO_MODEL = pytest.mark.tabbi(model=None, llm_base_url=None)


def session_id(output: str) -> str:
    found = re.search(r"session (ses-[0-9a-f]{12})", output)
    assert found, output
    return found.group(1)


async def current(kernel) -> str:
    """The current session, as ``%tabbi status`` reports it."""
    done = await kernel.run("%tabbi status")
    assert done.status == "ok", done
    return done.stdout.split(":")[0]


async def refused(kernel, code: str, message: str) -> None:
    """One red line with ``message``: no traceback, no HTTP status, no progress printed first."""
    done = await kernel.run(code)
    assert done.status == "error", (code, done)
    assert done.stderr.startswith("UsageError: ") and message in done.stderr, (code, done.stderr)
    assert "Traceback" not in done.text and "HTTP" not in done.text, (code, done.text)
    assert done.stdout == "", (code, done.stdout)


@NO_MODEL
async def test_current_session_failed_start_relative_paths_and_messages(kernel, api, source_repo,
                                                                        tmp_path):
    # Item 8: the notebook's folder (the kernel's working directory) holds the repository;
    # relative paths are taken from there, as in any notebook.
    await kernel.run(f"%load_ext tabbi_kernel\nimport os\nos.chdir({str(tmp_path)!r})")
    first = await kernel.run("%tabbi start source --no-wait")
    second = await kernel.run("%tabbi start ./source/ --no-wait")
    a, b = session_id(first.stdout), session_id(second.stdout)
    rows = (await api.ok("GET", "tabbi/api/sessions"))["sessions"]
    assert {r["id"]: r["repo"] for r in rows} == {a: str(source_repo), b: str(source_repo)}
    assert await current(kernel) == b  # start made it current

    # Item 5: naming another session does not switch to it; deleting another keeps this one.
    await kernel.run(f"%tabbi use {a}")
    other = await kernel.run(f"%tabbi status {b}")
    assert other.stdout.startswith(f"{b}: error")
    assert await current(kernel) == a
    await kernel.run(f"%tabbi panel {b}")
    assert await current(kernel) == a
    deleted = await kernel.run(f"%tabbi delete {b}")
    assert deleted.status == "ok" and f"deleted {b}" in deleted.stdout, deleted
    assert await current(kernel) == a
    # A session in error says what to do next.
    status = await kernel.run("%tabbi status")
    assert "no model configured" in status.stderr and f"%tabbi delete {a} removes it" in status.stderr

    # Item 6: a start that fails leaves nothing behind and does not become current.
    failed = await kernel.run("%tabbi start source")
    assert failed.status == "error", failed
    gone = session_id(failed.stderr)
    assert f"session {gone} could not start: no model configured" in failed.stderr
    assert "It was deleted; fix the cause, then run %tabbi start again." in failed.stderr
    assert "Traceback" not in failed.text
    assert [r["id"] for r in (await api.ok("GET", "tabbi/api/sessions"))["sessions"]] == [a]
    assert await current(kernel) == a

    # Item 7: messages a person can act on.
    empty = tmp_path / "empty"
    empty.mkdir()
    git("init", "--quiet", cwd=empty)
    no_commits = f"{empty} has no commits yet: make a first commit, then start again"
    await refused(kernel, "%tabbi start empty", no_commits)
    code, answer = await api.call("POST", "tabbi/api/sessions", {"repo": str(empty)})
    assert (code, answer["message"]) == (400, no_commits)
    await refused(kernel, "%tabbi use ses-doesnotexist",
                  "no session ses-doesnotexist; %tabbi sessions lists yours")
    await refused(kernel, "%tabbi status ses-0123456789ab",
                  "no session ses-0123456789ab; %tabbi sessions lists yours")
    await refused(kernel, "%tabbi repos", "GitHub sign-in is not configured on this server. An "
                  "administrator enables it by setting TABBI_GITHUB_CLIENT_ID")
    await refused(kernel, "%tabbi login", "GitHub sign-in is not configured on this server.")
    await refused(kernel, "%tabbi push --pr", "pull requests need a GitHub repository (owner/name), "
                  f"and {a} works on {source_repo}; push without --pr")
    await refused(kernel, "%tabbi push", f"{a} is error; %tabbi resume, then push")
    assert [r["id"] for r in (await api.ok("GET", "tabbi/api/sessions"))["sessions"]] == [a]


def turn_shape(events: list[dict]) -> str:
    """A turn's events as letters: W/w the turn starts/stops waiting for the model, o the model's
    output (repeats folded), T a tool call ended, F the turn's end."""
    shape = ""
    for e in events:
        kind, data = e["type"], e["data"]
        if kind == "turn.waiting":
            shape += "W" if data["waiting"] else "w"
        elif kind == "tool" and data["status"] in ("completed", "error"):
            shape += "T"
        elif kind in ("text.delta", "tool") or (kind == "part.updated" and data["role"] == "assistant"):
            shape += "" if shape.endswith("o") else "o"
        elif kind == "turn.finished":
            shape += "F"
    return shape


async def test_model_shown_waiting_for_the_model_and_resume_phases(kernel, llm, source_repo, api):
    sid = await start(kernel, source_repo)

    # Item 9: the model the session uses, not "(server default)".
    assert (await api.ok("GET", f"tabbi/api/sessions/{sid}"))["model"] == "scripted"
    status = await kernel.run("%tabbi status")
    assert "model:  scripted\n" in status.stdout, status.stdout
    table = (await kernel.run("%tabbi sessions")).displays[0]["text/plain"]
    assert table.splitlines()[1].split()[-1] == "scripted", table

    # Item 10: the server says when a turn waits for the model: from the start to the first
    # output, and again once the tool calls have ended, until the model answers.
    llm.enqueue(Reply(tools=[write("w.py", "W = 1\n")]), Reply(text="written"))
    await api.prompt(sid, "write w.py")
    events = await api.wait_turn(sid)
    started = max(i for i, e in enumerate(events) if e["type"] == "turn.started")
    assert turn_shape(events[started:]) == "WwoTWwoF"

    # A model that says nothing for a while: the cell says so, on one line that changes in
    # place every second or so (a carriage return, as progress bars do: no flood of outputs, and
    # nothing left in the saved notebook), and that goes once the turn ends.
    llm.enqueue(Reply(stall=True), Reply(text="after"))
    waited = asyncio.Event()
    cell = asyncio.ensure_future(kernel.run(
        "%%tabbi\nthink hard",
        on_output=lambda r: "\r[tabbi] waiting for the model... 2 s" in r.stdout and waited.set()))
    await asyncio.wait_for(waited.wait(), 120)
    info = await api.ok("GET", f"tabbi/api/sessions/{sid}")
    assert info["busy"] and info["waiting_since"] > 0
    await kernel.manager.interrupt_kernel(kernel.id)
    done = await cell
    assert done.status == "ok" and not done.displays, done
    shown = re.findall(r"\r\[tabbi\] waiting for the model\.\.\. (\d+) s", done.stdout)
    assert shown[:2] == ["1", "2"] and len(shown) == len(set(shown)), shown  # once per second
    assert folded(done.stdout).splitlines() == ["[tabbi] the turn was aborted"], done.stdout

    # A prompt to a paused session shows the phases of its resume, then the turn.
    assert (await kernel.run("%tabbi pause")).status == "ok"
    resumed = await kernel.run("%tabbi ask are you back")
    assert resumed.status == "ok", resumed
    phases = [line for line in resumed.stdout.splitlines() if line.startswith("[tabbi]")]
    assert phases[:2] == ["[tabbi] creating the sandbox", "[tabbi] restoring the last snapshot"], phases
    assert "[tabbi] starting the agent" in phases and "after" in resumed.stdout
