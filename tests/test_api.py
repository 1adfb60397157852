"""The REST/WebSocket edge: ownership and input validation.

Threats: a user of a shared (JupyterHub-style) deployment reading, prompting or deleting another
user's session, or learning that it exists; input that smuggles options or commands into git
(``--upload-pack``, ``ext::``), credentials in URLs that would land in logs, path tricks in branch
names, oversized prompts.
"""

from __future__ import annotations

import pytest
from tornado.httpclient import HTTPClientError
from tornado.websocket import WebSocketClosedError

from tests.support.api import Api
from tests.support.identity import headers


async def test_another_users_session_is_invisible(jp_fetch, jp_ws_fetch, source_repo, llm, tabbi_app):
    alice, bob = Api(jp_fetch, headers("alice")), Api(jp_fetch, headers("bob"))
    session = await alice.create(str(source_repo))
    sid = session["id"]
    assert session["owner"] == "alice"
    assert (await tabbi_app.store.get_user("alice"))["name"] == "alice"

    for method, path, body in [
        ("GET", f"tabbi/api/sessions/{sid}", None),
        ("GET", f"tabbi/api/sessions/{sid}/events", None),
        ("GET", f"tabbi/api/sessions/{sid}/messages", None),
        ("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "hi"}),
        ("POST", f"tabbi/api/sessions/{sid}/abort", None),
        ("POST", f"tabbi/api/sessions/{sid}/permissions/per_x", {"reply": "once"}),
        ("DELETE", f"tabbi/api/sessions/{sid}", None),
    ]:
        code, body_ = await bob.call(method, path, body)
        assert code == 404, (method, path, code, body_)
        assert sid in body_["message"]
    assert (await bob.ok("GET", "tabbi/api/sessions"))["sessions"] == []
    with pytest.raises((HTTPClientError, WebSocketClosedError)) as failed:
        ws = await jp_ws_fetch("tabbi", "api", "sessions", sid, "stream",
                               headers=headers("bob"))
        await ws.read_message()
    assert getattr(failed.value, "code", 404) == 404

    # Alice still sees and owns it; nothing Bob did changed it.
    mine = (await alice.ok("GET", "tabbi/api/sessions"))["sessions"]
    assert [s["id"] for s in mine] == [sid]
    events = (await alice.events(sid))["events"]
    assert not [e for e in events if e["type"] == "prompt.queued"]
    await alice.ok("DELETE", f"tabbi/api/sessions/{sid}", expect=204)


@pytest.mark.tabbi(max_prompt_chars=1000)
async def test_bad_input_gets_400_with_a_message(api, source_repo, tmp_path):
    not_a_repo = tmp_path / "plain-folder"
    not_a_repo.mkdir()
    cases = [
        ({}, "'repo' is required"),
        ({"repo": 42}, "'repo' is required"),
        ({"repo": "--upload-pack=touch /tmp/x"}, "must not start with '-'"),
        ({"repo": "ext::sh -c touch% /tmp/pwned"}, "not allowed"),
        ({"repo": "ssh://git@example.com/a/b.git"}, "unsupported repository URL scheme"),
        ({"repo": "https://user:secret@example.com/a/b.git"}, "no credentials"),
        ({"repo": str(tmp_path / "no-such-dir")}, "no such directory"),
        ({"repo": "/no/such/dir"}, "inside your Jupyter root directory"),
        ({"repo": str(not_a_repo)}, "not a git repository"),
        ({"repo": "relative/../path/x"}, "cannot read"),
        ({"repo": str(source_repo), "branch": "../etc"}, "not a valid branch name"),
        ({"repo": str(source_repo), "branch": "-f"}, "not a valid branch name"),
        ({"repo": str(source_repo), "branch": "a.lock"}, "not a valid branch name"),
        ({"repo": str(source_repo), "model": "bad model!"}, "'model' must look like"),
    ]
    for body, message in cases:
        code, answer = await api.call("POST", "tabbi/api/sessions", body)
        assert code == 400, (body, code, answer)
        assert message in answer["message"], (body, answer)
    assert (await api.ok("GET", "tabbi/api/sessions"))["sessions"] == []

    code, answer = await api.call("POST", "tabbi/api/sessions", "{not json")
    assert code == 400 and "not valid JSON" in answer["message"]
    code, answer = await api.call("POST", "tabbi/api/sessions", "[1, 2]")
    assert code == 400 and "JSON object" in answer["message"]

    sid = (await api.create(str(source_repo)))["id"]
    for body, message in [
        ({}, "'text' is required"),
        ({"text": "   "}, "'text' is required"),
        ({"text": "x" * 1001}, "the limit is 1000"),
        ({"text": "nul\0byte"}, "NUL"),
    ]:
        code, answer = await api.call("POST", f"tabbi/api/sessions/{sid}/prompt", body)
        assert code == 400 and message in answer["message"], (body, answer)
    code, answer = await api.call("GET", f"tabbi/api/sessions/{sid}/events", params={"after": "-1"})
    assert code == 400 and "must not be negative" in answer["message"]
    code, answer = await api.call("GET", f"tabbi/api/sessions/{sid}/events", params={"after": "x"})
    assert code == 400 and "whole number" in answer["message"]
    code, answer = await api.call("POST", f"tabbi/api/sessions/{sid}/permissions/per_1",
                                  {"reply": "sure"})
    assert code in (400, 409)
    # Nothing invalid was queued.
    events = (await api.events(sid))["events"]
    assert not [e for e in events if e["type"] == "prompt.queued"]
    await api.ok("DELETE", f"tabbi/api/sessions/{sid}", expect=204)


async def test_unknown_session_is_404(api):
    code, answer = await api.call("GET", "tabbi/api/sessions/ses-000000000000")
    assert code == 404 and "no session" in answer["message"]
