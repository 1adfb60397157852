"""The kernel side's small rules, without a server (issue 10, items 7, 8 and 10): where a
relative repository path points, what an error without a server message says, what an empty
repository's clone says, and the status line of a long tool call."""

from __future__ import annotations

import io
import json
import urllib.error
from pathlib import Path

import pytest

from tabbi_kernel.client import _refusal, local_path
from tabbi_kernel.magics import TurnPrinter
from tabbi_sandbox import bootstrap
from tests.conftest import git


def test_relative_repository_paths_are_taken_from_the_notebooks_folder(tmp_path, monkeypatch):
    (tmp_path / "octo" / "hello").mkdir(parents=True)
    monkeypatch.setenv("HOME", "/home/someone")
    here = str(tmp_path)
    assert local_path("repo", here) == f"{here}/repo"
    assert local_path("./repo/", here) == f"{here}/repo"
    assert local_path("../up/repo", here) == f"{tmp_path.parent}/up/repo"
    assert local_path(".", here) == here
    assert local_path("octo/hello", here) == f"{here}/octo/hello"  # a folder next to the notebook
    assert local_path("~/work/repo", here) == "/home/someone/work/repo"  # the person's home
    for as_is in ("octo/world", "/abs/repo", "https://github.com/octo/world.git", "file:///x/y", "-x"):
        assert local_path(as_is, here) == as_is


@pytest.mark.parametrize("code", [400, 401, 403, 404, 409, 413, 418, 500, 502, 503])
@pytest.mark.parametrize("body", [b"", b"<html>Not Found</html>", b'{"message": ""}', b"[1]",
                                  b'{"reason": "Not Found"}'])
def test_an_error_without_a_message_of_the_servers_is_still_a_sentence(code, body):
    error = urllib.error.HTTPError("http://x/", code, "Whatever", {}, io.BytesIO(body))
    message = str(_refusal(error))
    assert "HTTP" not in message and "Whatever" not in message and len(message.split()) >= 5, message


def test_the_servers_own_message_is_kept():
    body = json.dumps({"message": "no session ses-0123456789ab"}).encode()
    error = urllib.error.HTTPError("http://x/", 404, "Not Found", {}, io.BytesIO(body))
    assert str(_refusal(error)) == "no session ses-0123456789ab"


def test_an_empty_repository_says_so_at_the_clone(tmp_path: Path):
    """A GitHub repository created without a README has no commit: the clone works, and the
    session start used to end with git's 'rev-parse failed: git <command> [<revision>...]'."""
    empty = tmp_path / "empty.git"
    git("init", "--quiet", "--bare", str(empty), cwd=tmp_path)
    workspace = tmp_path / "sandbox" / "workspace"
    spec = {"workspace": str(workspace), "branch": "tabbi/x", "repo_display": "octo/empty",
            "repo_url": str(empty)}
    env = bootstrap.prepare_home(str(tmp_path / "home"))
    with pytest.raises(bootstrap.BootstrapError) as failed:
        bootstrap.clone_or_reuse(spec, env)
    assert str(failed.value) == ("octo/empty has no commits yet: make a first commit (and push it), "
                                 "then start again")
    assert not workspace.exists()  # the next start clones again, rather than reusing an empty clone


def folded(text: str) -> str:
    """What a front end shows of a stream: each carriage return rewrites its line."""
    lines = []
    for line in text.split("\n"):
        shown = ""
        for piece in line.split("\r"):
            shown = piece + shown[len(piece):]
        lines.append(shown.rstrip())
    return "\n".join(lines)


def test_a_long_tool_call_shows_what_runs_and_for_how_long(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("tabbi_kernel.magics.time.monotonic", lambda: clock[0])
    out = io.StringIO()
    printer = TurnPrinter(out=out, err=out)
    tool = {"message_id": "m", "part_id": "p", "call_id": "c", "tool": "bash",
            "input": {"command": "pytest -q"}}
    printer({"type": "text.delta", "data": {"message_id": "m", "delta": "Running the tests"}})
    printer({"type": "tool", "data": {**tool, "status": "running"}})
    printer.tick()
    clock[0] += 65
    printer.tick()
    printer.tick()
    assert out.getvalue() == "Running the tests\n\r[tabbi] running bash pytest -q... 1 min 5 s"
    printer({"type": "tool", "data": {**tool, "status": "completed"}})
    printer({"type": "turn.waiting", "data": {"waiting": True}})
    clock[0] += 2
    printer({"type": "agent.status", "data": {"status": "retry", "attempt": 2}})
    assert out.getvalue().endswith(
        "\r[tabbi] waiting for the model... 2 s (the model server failed; retrying, attempt 2)")
    printer({"type": "turn.waiting", "data": {"waiting": False}})
    printer({"type": "text.delta", "data": {"message_id": "m", "delta": "All pass."}})
    assert folded(out.getvalue()) == "Running the tests\n[tool] bash pytest -q: completed\nAll pass."


def test_insert_takes_the_code_of_the_last_turn_that_produced_any():
    """An aborted (or chatty) turn after the one that wrote code must not hide that code from
    ``%tabbi insert`` and the panel's "Insert code" (one function serves both)."""
    from tabbi_kernel.conversation import Conversation
    from tabbi_kernel.snippets import earlier_note, latest_code

    def turn(seq, prompt, outcome, tool=None):
        events = [{"seq": seq, "type": "turn.started", "data": {"prompt_id": prompt, "text": prompt}},
                  {"seq": seq + 1, "type": "message", "data": {"message_id": f"m{seq}", "role": "assistant"}}]
        if tool:
            events.append({"seq": seq + 2, "type": "tool", "data": {
                "message_id": f"m{seq}", "part_id": f"p{seq}", "tool": "write", "status": "completed",
                "input": {"filePath": "calc.py", "content": tool}}})
        events.append({"seq": seq + 3, "type": "turn.finished",
                       "data": {"prompt_id": prompt, "outcome": outcome}})
        return events

    code = "def add(a, b):\n    return a + b\n"
    conversation = Conversation().apply_all(turn(1, "write add", "completed", code)
                                            + turn(10, "stop that", "aborted"))
    found = latest_code(conversation)
    assert found is not None
    chosen, snippets = found
    assert chosen.text == "write add" and "def add" in snippets[0].code
    assert "from an earlier turn: 'write add'" in earlier_note(conversation, chosen)
    assert latest_code(Conversation().apply_all(turn(1, "chat", "completed"))) is None
