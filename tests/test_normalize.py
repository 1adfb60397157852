"""OpenCode events -> tabbi events, against payloads recorded from opencode-ai 1.18.33."""

from __future__ import annotations

import json
from pathlib import Path

from tabbi_extension.normalize import EventNormalizer, error_message

RECORDED = json.loads((Path(__file__).parent / "data" / "opencode-events.json").read_text())
SID = RECORDED["session.created"]["properties"]["sessionID"]


def feed_all(normalizer, names):
    out = []
    for name in names:
        events, signals = normalizer.feed(RECORDED[name])
        out.append((name, events, signals))
    return out


def test_a_recorded_turn_normalizes_to_tabbis_vocabulary():
    n = EventNormalizer(SID)
    results = feed_all(n, [
        "server.connected", "session.created", "session.updated", "message.updated:user",
        "message.part.updated:text", "session.status", "message.updated:assistant",
        "session.diff", "plugin.added", "message.part.updated:step-start", "message.part.delta",
        "message.part.updated:tool:pending", "message.part.updated:tool:running",
        "permission.asked", "permission.replied", "file.edited",
        "message.part.updated:tool:completed", "message.part.updated:step-finish",
        "message.part.updated:patch", "session.idle",
    ])
    types = [e.type for _, events, _ in results for e in events]
    assert types == [
        "message", "part.updated", "agent.status", "message", "text.delta", "tool", "tool",
        "permission.asked", "permission.replied", "tool", "part.updated",
    ]
    by_name = {name: (events, signals) for name, events, signals in results}
    user_text = by_name["message.part.updated:text"][0][0].data
    assert user_text["role"] == "user" and user_text["text"] == "create hello.py"
    delta = by_name["message.part.delta"][0][0].data
    assert delta["delta"] == "I'll create hello.py." and delta["field"] == "text"
    done = by_name["message.part.updated:tool:completed"][0][0].data
    assert (done["tool"], done["status"], done["output"]) == ("write", "completed",
                                                              "Wrote file successfully.")
    assert done["input"]["content"] == 'print("hello from opencode")\n'
    # Paths are reported relative to the workspace, not as the sandbox's internal layout.
    assert done["input"]["filePath"] == "hello.py"
    assert by_name["message.part.updated:patch"][0][0].data["files"] == ["hello.py"]
    asked = by_name["permission.asked"][0][0].data
    assert asked["permission"] == "edit" and "+print" in asked["metadata"]["diff"]
    assert by_name["session.idle"][1].idle is True
    # Bookkeeping reaches the store through signals, not as client events.
    assert by_name["message.part.updated:tool:completed"][1].part[2]["status"] == "completed"
    assert by_name["message.updated:assistant"][1].message[1] == "assistant"


def test_events_of_other_sessions_and_unknown_types_are_dropped():
    n = EventNormalizer("ses_someone_else")
    for payload in RECORDED.values():
        events, signals = n.feed(payload)
        assert events == [] and not signals


def test_repeated_busy_status_is_reported_once():
    n = EventNormalizer(SID)
    first, _ = n.feed(RECORDED["session.status"])
    again, _ = n.feed(RECORDED["session.status"])
    assert [e.data for e in first] == [{"status": "busy"}] and again == []


def test_errors_become_readable_messages():
    aborted = RECORDED["session.error"]["properties"]["error"]
    assert error_message(aborted) == "The turn was aborted."
    api = {"name": "APIError", "data": {"message": "upstream exploded", "statusCode": 500}}
    assert error_message(api) == "APIError (HTTP 500): upstream exploded"
    assert error_message(None) == "unknown error"
    n = EventNormalizer(SID)
    payload = {"type": "session.error", "properties": {"sessionID": SID, "error": api}}
    events, signals = n.feed(payload)
    assert events == [] and signals.error == ("APIError", "APIError (HTTP 500): upstream exploded")
    assert not signals.aborted
    aborted_event = {"type": "session.error", "properties": {"sessionID": SID, "error": aborted}}
    events, signals = n.feed(aborted_event)
    assert events == [] and signals.aborted and signals.error is None


def test_huge_tool_output_is_clipped():
    n = EventNormalizer(SID)
    payload = json.loads(json.dumps(RECORDED["message.part.updated:tool:completed"]))
    payload["properties"]["part"]["state"]["output"] = "z" * 50_000
    events, _ = n.feed(payload)
    assert len(events[0].data["output"]) < 21_000
    assert "more characters" in events[0].data["output"]
