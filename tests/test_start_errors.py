"""Ordinary mistakes of a person starting a session (no model configured, a repository that
cannot be cloned, one with no commits) are told to them as events, and logged on the server as
one line each with the session id and the reason: not as a traceback, which buries real faults
in the log and alarms whoever reads it."""

from __future__ import annotations

import logging

import pytest

from tabbi_extension.demo_model import DemoModel
from tabbi_extension.model_config import ModelSettings, problem
from tests.conftest import git

pytestmark = pytest.mark.timeout(300)


@pytest.mark.tabbi(model=None, llm_base_url=None)
async def test_a_failed_start_is_one_log_line_with_the_session_and_the_reason(api, tmp_path, caplog,
                                                                             source_repo):
    empty = tmp_path / "empty"
    empty.mkdir()
    git("init", "--quiet", "--initial-branch=main", cwd=empty)
    caplog.set_level(logging.INFO)
    # A local repository with no commits is refused before a session exists (a clone of a
    # remote one says the same at its start: tests/test_magics_units.py).
    code, answer = await api.call("POST", "tabbi/api/sessions", {"repo": str(empty), "model": "demo"})
    assert code == 400 and "has no commits yet" in answer["message"], answer
    starts = {
        "no model": await api.create(str(source_repo)),
        "clone": await api.create("http://127.0.0.1:9/nothing.git", model="demo"),
    }
    for session in starts.values():
        await api.wait_state(session["id"], "error")

    logged = {}
    for reason, session in starts.items():
        lines = [r for r in caplog.records
                 if session["id"] in r.getMessage() and r.levelno >= logging.WARNING]
        assert len(lines) == 1, (reason, [r.getMessage() for r in lines])
        (line,) = lines
        assert line.exc_info is None and "\n" not in line.getMessage(), line.getMessage()
        logged[reason] = line.getMessage()
        assert "failed to start" in logged[reason]
    assert "no model configured" in logged["no model"]
    assert "clone" in logged["clone"]
    assert "Traceback" not in caplog.text


def test_start_up_names_what_keeps_the_default_model_from_working():
    """Logged once at start-up (``TabbiExtension.initialize_settings``), so that nobody learns it
    from a failed first session; the `make lab` test sees the line in a real server's log."""
    assert "TABBI_MODEL=demo" in problem(ModelSettings())
    assert problem(ModelSettings(model="anthropic/claude-sonnet-4-5")) == (
        "TABBI_MODEL is anthropic/claude-sonnet-4-5 but ANTHROPIC_API_KEY is not set")
    assert problem(ModelSettings(model="anthropic/x", provider_keys={"ANTHROPIC_API_KEY": "k"})) is None
    assert problem(ModelSettings(model="llama3.1", llm_base_url="http://127.0.0.1:1/v1")) is None
    assert "not offered" in problem(ModelSettings(model="demo"))
    demo = DemoModel()
    try:
        assert problem(ModelSettings(model="demo", demo=demo)) is None
    finally:
        demo.stop()
