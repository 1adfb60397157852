"""The API edge as an attacker probes it: bad input of every kind, local paths that are someone
else's, and the long-lived connections (keep-alive pings, activity reports to Jupyter).

Threats: input that is well-formed enough to pass the first check and then breaks something
deeper (a seq past SQLite's 64-bit integers gave a 500 on ``/events`` and a WebSocket that opened
and then said nothing forever; a lone surrogate in a prompt gave a 500; ``repo=/proc/1/root``
gave a 500); a second person on a shared server naming the first person's files or another
session's live workspace as their repository (they cloned it, and pushed a branch into it), or
learning from the answer which paths exist; a proxy dropping a quiet event stream mid-turn; an
idle culler stopping the whole server while an agent is working and nobody is watching.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import posixpath

import jupyter_server.serverapp as jupyter_serverapp
import pytest
from tornado.httpclient import HTTPClientError

from tests.conftest import git
from tests.support.api import Api
from tests.support.identity import headers
from tests.support.llm import Reply, bash

SID = "{sid}"  # replaced by a real session of the caller

# (method, path, body or query, status, part of the message). Bodies given as str are sent raw
# (JSON text with escapes Python's json module would never write, invalid UTF-8, deep nesting).
BAD_INPUT = [
    # POST /sessions: JSON bodies
    ("POST", "sessions", '{"repo": "/x\\ud800"}', 400, "not valid Unicode"),
    ("POST", "sessions", '{"repo": "octo/x", "\\udfff": 1}', 400, "not valid Unicode"),
    ("POST", "sessions", b'{"repo": "\xff\xfe"}', 400, "not valid JSON"),
    ("POST", "sessions", "[" * 100_000, 400, "not valid JSON"),
    ("POST", "sessions", '{"repo": ' + "9" * 5000 + "}", 400, "not valid JSON"),
    ("POST", "sessions", '{"repo": 1e999}', 400, "'repo' is required"),
    ("POST", "sessions", {"repo": ["octo/x"]}, 400, "'repo' is required"),
    ("POST", "sessions", {"repo": "/proc/1/root"}, 400, "inside your Jupyter root directory"),
    ("POST", "sessions", {"repo": "file:///proc/1/root"}, 400, "inside your Jupyter root directory"),
    ("POST", "sessions", {"repo": "/etc/\0passwd"}, 400, "control characters"),
    ("POST", "sessions", {"repo": "o/" + "x" * 600}, 400, "too long"),
    ("POST", "sessions", {"repo": "octo/x", "branch": 7}, 400, "'branch' must be a string"),
    ("POST", "sessions", {"repo": "octo/x", "branch": "x" * 300}, 400, "'branch' must be a string"),
    ("POST", "sessions", {"repo": "octo/x", "model": {"a": 1}}, 400, "'model' must look like"),
    ("POST", "sessions", "x" * 600_000, 413, "larger than"),
    # GET /events: query strings
    ("GET", f"sessions/{SID}/events", {"after": str(2**63)}, 400, "must be at most"),
    ("GET", f"sessions/{SID}/events", {"after": "9" * 5000}, 400, "whole number"),
    ("GET", f"sessions/{SID}/events", {"after": "-1"}, 400, "must not be negative"),
    ("GET", f"sessions/{SID}/events", {"after": "1e3"}, 400, "whole number"),
    ("GET", f"sessions/{SID}/events", {"limit": str(2**64)}, 400, "must be at most"),
    ("GET", f"sessions/{SID}/events", {"wait": "nan"}, 400, "number of seconds"),
    ("GET", f"sessions/{SID}/events", {"wait": "soon"}, 400, "number of seconds"),
    # POST /prompt
    ("POST", f"sessions/{SID}/prompt", '{"text": "hello \\ud800 there"}', 400, "not valid Unicode"),
    ("POST", f"sessions/{SID}/prompt", {"text": 42}, 400, "'text' is required"),
    ("POST", f"sessions/{SID}/prompt", {"text": ["hi"]}, 400, "'text' is required"),
    ("POST", f"sessions/{SID}/prompt", {"text": "a\0b"}, 400, "NUL"),
    ("POST", f"sessions/{SID}/prompt", {"text": "x" * 1001}, 400, "the limit is 1000"),
    # GET /file
    ("GET", f"sessions/{SID}/file", {"path": "../../etc/passwd"}, 400, "without '..'"),
    ("GET", f"sessions/{SID}/file", {"path": "-rf"}, 400, "without '..'"),
    ("GET", f"sessions/{SID}/file", {"path": "x" * 2000}, 400, "'path' is required"),
    ("GET", f"sessions/{SID}/file", {"path": "/etc/passwd"}, 400, "without '..'"),
    # POST /permissions/<id>
    ("POST", f"sessions/{SID}/permissions/per_1", {"reply": ["once"]}, 400, "'reply' must be one of"),
    ("POST", f"sessions/{SID}/permissions/per_1", {"reply": "sure"}, 400, "'reply' must be one of"),
    # POST /push
    ("POST", f"sessions/{SID}/push", {"pr": "false"}, 400, "'pr' must be true or false"),
    ("POST", f"sessions/{SID}/push", {"message": 5}, 400, "'message' must be text"),
    ("POST", f"sessions/{SID}/push", {"author": "nobody"}, 400, "'author' must look like"),
    ("POST", f"sessions/{SID}/push", {"cells": ["x"]}, 400, "'cells' must be an object"),
    ("POST", f"sessions/{SID}/push", {"cells": {"notebook": "a\0.ipynb"}}, 400, "saved .ipynb"),
    ("POST", f"sessions/{SID}/push", {"cells": {"notebook": "/etc/x.ipynb", "select": "a"}}, 400,
     "the notebook's cells"),  # the server reads no notebook: the kernel sends the cells
    # GitHub routes (GitHub not configured here: input is checked first)
    ("POST", "github/login", {"flow": ["web"]}, 400, "'flow' must be"),
    ("GET", "github/login/abcdefghijkl", {"wait": "nan"}, 400, "number of seconds"),
    ("GET", "github/repos", {"q": "x" * 300}, 400, "longer than"),
]


#: No model: a session created under it goes to ``error`` at once, without a sandbox (cheap).
#: Every bad input is refused before anything would use one.
NO_MODEL = pytest.mark.tabbi(model=None, llm_base_url=None, max_prompt_chars=1000)


@NO_MODEL
@pytest.mark.parametrize(("method", "path", "payload", "status", "message"), BAD_INPUT,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(BAD_INPUT)])
async def test_bad_input_gets_a_4xx_with_a_readable_message(
    api, source_repo, method, path, payload, status, message
):
    if SID in path:
        path = path.replace(SID, (await api.create(str(source_repo)))["id"])
    body, params = (payload, None) if method == "POST" else (None, payload)
    code, answer = await api.call(method, f"tabbi/api/{path}", body=body, params=params)
    assert (code, message in answer.get("message", "")) == (status, True), answer
    sessions = (await api.ok("GET", "tabbi/api/sessions"))["sessions"]
    for session in sessions:  # nothing invalid reached a session's log
        events = (await api.events(session["id"]))["events"]
        assert not [e for e in events if e["type"] == "prompt.queued"]


async def test_oauth_callback_with_foreign_characters_is_a_400_page(jp_fetch):
    # A state GitHub never sent (non-ASCII made the constant-time comparison raise: a 500).
    for params in ({"state": "é" * 30, "code": "x"}, {"state": "s", "code": "x" * 5000}):
        page = await jp_fetch("tabbi", "github", "callback", params=params, raise_error=False)
        assert page.code == 400 and b"not a sign-in link" in page.body


@NO_MODEL
@pytest.mark.parametrize("after", [str(2**63), "-1", "x"])
async def test_stream_with_a_bad_seq_is_refused_at_the_handshake(api, source_repo, jp_ws_fetch, after):
    # Before: after=2**63 opened the WebSocket, then the store overflowed in a background task
    # and the client waited forever for an event that would never come.
    sid = (await api.create(str(source_repo)))["id"]
    with pytest.raises(HTTPClientError) as refused:
        await jp_ws_fetch("tabbi", "api", "sessions", sid, "stream", params={"after": after})
    assert refused.value.code == 400


@NO_MODEL
async def test_stream_refuses_what_it_does_not_understand_and_streams_on(api, source_repo, jp_ws_fetch):
    sid = (await api.create(str(source_repo)))["id"]
    ws = await jp_ws_fetch("tabbi", "api", "sessions", sid, "stream", params={"after": 0})
    junks = (b"\x00\xff" * 1000, "{" * 10_000, json.dumps({"after": 2**70}))
    for junk in junks:
        await ws.write_message(junk, binary=isinstance(junk, bytes))
    # Each is refused in a frame of its own (no seq: not an event); the log streams on regardless.
    refusals, first = [], None
    while first is None:
        frame = json.loads(await asyncio.wait_for(ws.read_message(), 30))
        if "seq" in frame:
            first = frame
        else:
            refusals.append(frame)
    assert first["seq"] == 1
    while len(refusals) < len(junks):
        frame = json.loads(await asyncio.wait_for(ws.read_message(), 30))
        if "seq" not in frame:
            refusals.append(frame)
    assert [(r["type"], r["status"]) for r in refusals] == [("prompt.refused", 400)] * len(junks)
    ws.close()


# -- local repositories (issue 9, item 6) --------------------------------------------------


async def refusal(api: Api, repo: str) -> tuple[int, dict]:
    return await api.call("POST", "tabbi/api/sessions", {"repo": repo})


@pytest.mark.tabbi(local_repo_roots=None, model=None, llm_base_url=None)  # roots: the default
async def test_local_repos_only_inside_the_root_dir_and_never_the_data_dir(
    jp_fetch, jp_root_dir, source_repo, tmp_path, data_dir, jp_serverapp
):
    """Bob, on a server he shares with Alice, names her folder, system paths and Alice's live
    session workspace as his repository: spelled directly, through symlinks he planted in the
    root, with ``..``, ``~`` and as file:// URLs. Each gets the same answer as a path that does
    not exist: nothing to clone, nothing to learn."""
    alice, bob = Api(jp_fetch, headers("alice")), Api(jp_fetch, headers("bob"))
    inside = jp_root_dir / "project"
    git("clone", "--quiet", str(source_repo), str(inside), cwd=tmp_path)
    mine = await alice.create(str(inside))
    assert mine["repo"] == str(inside.resolve())

    (jp_root_dir / "link-out").symlink_to(source_repo)
    (jp_root_dir / "link-proc").symlink_to("/proc/1/root")
    attempts = [
        "/no/such/path", str(source_repo), str(source_repo / ".git"), "/proc/1/root", "/proc/self/cwd",
        str(jp_root_dir / "link-out"), str(jp_root_dir / "link-proc"), f"file://{source_repo}",
        str(jp_root_dir / ".." / source_repo.name), "~/", "~root/x", "~no-such-user-here/x",
    ]
    answers = [await refusal(bob, path) for path in attempts]
    assert len({json.dumps(a, sort_keys=True) for a in answers}) == 1, answers
    assert answers[0][0] == 400 and "inside your Jupyter root directory" in answers[0][1]["message"]

    # An admin makes a folder holding tabbi's data dir a root: a live session workspace under
    # it (a clone, as the sandbox holds it) is refused all the same, like a missing one.
    jp_serverapp.web_app.settings["tabbi_local_repo_roots"] = [str(tmp_path)]
    live = data_dir / "sandboxes" / mine["id"] / "workspace"
    git("clone", "--quiet", str(source_repo), str(live), cwd=tmp_path)
    (tmp_path / "to-live").symlink_to(live)
    taken = [await refusal(bob, str(p)) for p in (live, tmp_path / "to-live", data_dir / "nothing")]
    assert taken[0][0] == 400 and taken[0] == taken[1] == taken[2], taken
    assert (await bob.ok("GET", "tabbi/api/sessions"))["sessions"] == []


@NO_MODEL
async def test_a_refused_path_is_not_looked_up(api, tmp_path, monkeypatch):
    """No existence oracle: a path outside the roots is refused before any file-system call
    touches it (no stat whose timing, automount or error could tell it exists)."""
    outside = "/var/lib/someone-else/repo"
    touched: list[str] = []
    for name in ("realpath", "isdir", "isfile", "exists", "lexists"):
        real = getattr(posixpath, name)

        def spy(path, *args, _real=real, **kwargs):
            if str(path).startswith("/var/lib/someone-else"):
                touched.append(str(path))
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(posixpath, name, spy)
    code, answer = await refusal(api, outside)
    assert code == 400 and "inside your Jupyter root directory" in answer["message"]
    assert touched == []


@NO_MODEL
async def test_per_person_roots_keep_people_out_of_each_others_folders(jp_fetch, tmp_path, source_repo,
                                                                      jp_serverapp):
    """With ``local_repo_roots = ['/home/{username}']``, Bob cannot use Alice's repository, and
    his answer for it is the one for a path that does not exist in her folder."""
    jp_serverapp.web_app.settings["tabbi_local_repo_roots"] = [str(tmp_path / "home" / "{username}")]
    theirs = tmp_path / "home" / "alice" / "repo"
    theirs.parent.mkdir(parents=True)
    git("clone", "--quiet", str(source_repo), str(theirs), cwd=tmp_path)
    alice, bob = Api(jp_fetch, headers("alice")), Api(jp_fetch, headers("bob"))
    assert (await alice.create(str(theirs)))["owner"] == "alice"
    taken = await refusal(bob, str(theirs))
    missing = await refusal(bob, str(theirs.parent / "nothing-here"))
    assert taken[0] == 400 and taken == missing
    assert str(tmp_path / "home" / "bob") in taken[1]["message"]
    assert "alice" not in taken[1]["message"]


# -- keep-alive and activity (issue 9, architecture) ---------------------------------------


@pytest.mark.tabbi(websocket_ping_interval=0.2, model=None, llm_base_url=None)
async def test_event_stream_sends_keepalive_pings(api, source_repo, jp_ws_fetch):
    sid = (await api.create(str(source_repo)))["id"]
    ws = await jp_ws_fetch("tabbi", "api", "sessions", sid, "stream", params={"after": 0})
    pinged = asyncio.Event()
    ws.on_ping = lambda data: pinged.set()  # tornado calls the connection's on_ping per ping

    async def read_all() -> None:  # tornado's client handles frames only as messages are read
        while await ws.read_message() is not None:
            pass

    reader = asyncio.ensure_future(read_all())
    try:
        await asyncio.wait_for(pinged.wait(), 30)
    finally:
        ws.close()
        reader.cancel()


@pytest.mark.tabbi(activity_interval=0.05)
async def test_a_working_session_keeps_jupyter_from_culling_the_server(
    api, llm, source_repo, tabbi_app, jp_serverapp, monkeypatch
):
    """Nobody watches while the agent runs a long command. Jupyter's idle shutdown (and
    JupyterHub's culler, through ``last_activity``) must see tabbi working; once the turn is
    over, tabbi no longer holds the server up."""
    sid = (await api.create(str(source_repo)))["id"]
    await api.wait_state(sid, "running")
    reporter = tabbi_app.activity
    report, stamped = reporter.report, asyncio.Event()

    def spy() -> bool:
        did = report()
        if did:
            stamped.set()
        return did

    monkeypatch.setattr(reporter, "report", spy)
    llm.enqueue(Reply(tools=[bash("sleep 600", "wait for the data")]), Reply(text="Done."))
    after = (await api.events(sid))["last_seq"]
    await api.prompt(sid, "wait for the data")
    await api.wait_for(sid, lambda e: e["type"] == "tool" and e["data"]["status"] == "running", after)

    stamped.clear()
    await asyncio.wait_for(stamped.wait(), 30)  # the heartbeat stamped while the command runs
    assert tabbi_app.current_activity() == [sid]
    stamp = jp_serverapp.web_app.settings["last_activity_times"]["tabbi"]
    assert jp_serverapp.web_app.last_activity() >= stamp

    # Jupyter's idle shutdown an hour later, no kernels: the working session holds it off.
    stopped: list[bool] = []
    monkeypatch.setattr(jp_serverapp, "stop", lambda *a, **k: stopped.append(True))
    later = jupyter_serverapp.utcnow() + datetime.timedelta(hours=1)
    monkeypatch.setattr(jupyter_serverapp, "utcnow", lambda: later)
    jp_serverapp.shutdown_no_activity_timeout = 60
    jp_serverapp.shutdown_no_activity()
    assert stopped == []

    await api.ok("POST", f"tabbi/api/sessions/{sid}/abort")
    await api.wait_turn(sid, after)
    assert tabbi_app.current_activity() == [] and report() is False
    jp_serverapp.shutdown_no_activity()
    assert stopped == [True]
