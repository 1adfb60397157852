"""tabbi's log lines: JSON that carries the session and its owner, and nothing it must not carry.

Threat: logs are read by more people than sessions are (operators, log pipelines, whoever gets a
support bundle), kept longer, and shipped elsewhere. A secret in a log line (a GitHub token, the
GitHub client secret, the encryption key, the model API key, a sandbox's OpenCode password or the
gateway token derived from it) is a secret handed to all of them; a prompt or the model's answer
at INFO is people's work in everyone's log. So the whole journey runs once with every logger at
DEBUG, in JSON mode, and the test looks for each planted secret in every line of every logger,
and for the prompt's and the answer's text in every line at INFO or above. Positive controls
prove the capture sees what it looks for: both texts do show up at DEBUG.
"""

from __future__ import annotations

import json
import logging
import secrets

import pytest
from cryptography.fernet import Fernet

from tabbi_extension import logs
from tabbi_extension.gateway import derive_token
from tests.support.github import FakeGitHub
from tests.support.llm import Reply, write
from tests.test_github import github, sign_in_web  # noqa: F401  (the github fixture is used here)

pytestmark = pytest.mark.timeout(300)

CLIENT_SECRET = "cs-planted-" + secrets.token_hex(12)
LLM_KEY = "sk-planted-" + secrets.token_hex(12)
ENCRYPTION_KEY = Fernet.generate_key().decode()


@pytest.fixture
def tabbi_config(tabbi_config: dict, github: FakeGitHub) -> dict:  # noqa: F811
    return {
        **tabbi_config,
        "github_url": github.base_url,
        "github_client_id": github.client_id,
        "github_client_secret": CLIENT_SECRET,
        "encryption_key": ENCRYPTION_KEY,
        "llm_api_key": LLM_KEY,
        "log_style": "json",
    }


class Collect(logging.Handler):
    """Every record of every logger, with its level, as the text a handler would write."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[int, str]] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a record that cannot format is still scanned by its parts
            text = f"{record.msg} {record.args}"
        fields = getattr(record, logs.FIELDS, None)
        self.records.append((record.levelno, f"{text} {json.dumps(fields, default=str)}"))


@pytest.fixture
def captured(jp_serverapp):
    """Everything logged while the test runs, at DEBUG: tabbi's loggers and all others."""
    collect = Collect()
    watched = [logging.getLogger(), jp_serverapp.log, logging.getLogger("tornado.access")]
    levels = {name: logging.getLogger(name).level for name in ("", *logs.TABBI_LOGGERS)}
    for logger in watched:
        logger.addHandler(collect)
    for name in levels:
        logging.getLogger(name).setLevel(logging.DEBUG)
    yield collect
    for logger in watched:
        logger.removeHandler(collect)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.github(client_secret=CLIENT_SECRET)
async def test_a_whole_journey_logs_json_with_ids_and_no_secret_prompt_or_output(
    api, jp_fetch, github, llm, tabbi_app, captured, capsys  # noqa: F811
):
    prompt_marker, output_marker = "pmk" + secrets.token_hex(8), "omk" + secrets.token_hex(8)
    await sign_in_web(api, jp_fetch, github)
    session = await api.create("octo/sample")
    sid, owner = session["id"], session["owner"]
    await api.wait_state(sid, "running")
    passwords = [tabbi_app.manager._agents[sid]._sandbox.endpoint().password]

    llm.enqueue(Reply(tools=[write("notes.py", "X = 1\n")]),
                Reply(text=f"Wrote notes.py for you. {output_marker}"))
    await api.prompt(sid, f"add a notes module {prompt_marker}")
    await api.wait_turn(sid)
    await api.ok("POST", f"tabbi/api/sessions/{sid}/push", {"message": "Add notes"})
    await api.ok("POST", f"tabbi/api/sessions/{sid}/pause")
    after = (await api.events(sid))["events"][-1]["seq"]
    await api.ok("POST", f"tabbi/api/sessions/{sid}/resume", expect=202)
    await api.wait_state(sid, "running", after=after)
    passwords.append(tabbi_app.manager._agents[sid]._sandbox.endpoint().password)
    # A caller Jupyter does not let in: an auth failure worth a line.
    refused = await jp_fetch("tabbi", "api", "sessions", raise_error=False,
                             headers={"Authorization": "token not-the-token"})
    assert refused.code == 403

    planted = {
        "GitHub token": github.issued[-1]["access_token"],
        "GitHub client secret": CLIENT_SECRET,
        "encryption key": ENCRYPTION_KEY,
        "model API key": LLM_KEY,
        **{f"OpenCode password {i}": p for i, p in enumerate(passwords)},
        **{f"gateway token {i}": derive_token(p) for i, p in enumerate(passwords)},
    }
    stderr = capsys.readouterr().err
    everything = [text for _, text in captured.records] + stderr.splitlines()
    for what, secret in planted.items():
        assert len(secret) >= 16
        leaks = [line for line in everything if secret in line]
        assert not leaks, f"the {what} is in the logs: {leaks[:3]}"

    # Prompt and model output: never at INFO or above, in any logger ...
    for level, text in captured.records:
        if level >= logging.INFO:
            assert prompt_marker not in text and output_marker not in text, text
    # ... while at DEBUG they do show (so the scan above saw where they would be).
    debug = [text for level, text in captured.records if level == logging.DEBUG]
    assert any(prompt_marker in text for text in debug)
    assert any(output_marker in text for text in debug)

    # JSON mode: every line on stderr is one JSON object; tabbi's events carry session and owner.
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)
    mine = [line for line in lines if line.get("session") == sid]
    assert all(line["owner"] == owner for line in mine)
    for line in mine:
        if line["level"] != "debug":
            assert prompt_marker not in json.dumps(line) and output_marker not in json.dumps(line)
    events = {(line["event"], line.get("state") or line.get("outcome")) for line in mine}
    expected = {("session.created", None), ("session.state", "starting"), ("session.state", "running"),
                ("session.state", "paused"), ("turn.started", None), ("turn.finished", "completed"),
                ("snapshot", "saved"), ("push", "pushed")}
    assert expected <= events, expected - events
    finished = next(line for line in mine if line["event"] == "turn.finished")
    assert finished["seconds"] > 0 and finished["level"] == "info"
    assert any(line.get("event") == "auth.github_signin" and line.get("owner") == owner for line in lines)
    assert any(line.get("event") == "auth.refused" and line.get("status") == 403 for line in lines)


def test_text_format_appends_the_fields_and_json_holds_them():
    record = logging.LogRecord("tabbi_extension.agent", logging.INFO, __file__, 1, "%s", ("turn done",), None)
    setattr(record, logs.FIELDS, {"event": "turn.finished", "session": "ses-0123456789ab",
                                  "owner": "ada lovelace", "seconds": 1.5})
    text = logs.TextFormatter().format(record)
    assert text.endswith('turn done session=ses-0123456789ab owner="ada lovelace" seconds=1.5')
    assert text.startswith("[I ")
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["event"] == "turn.finished" and line["session"] == "ses-0123456789ab"
    assert line["level"] == "info" and line["message"] == "turn done" and line["ts"].endswith("Z")
