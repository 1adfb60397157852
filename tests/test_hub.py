"""tabbi in hub mode on a real JupyterHub: the session service runs as a hub-managed service under
its own OS user, the users' servers run as theirs (alice, bob), and people use tabbi from their
kernels exactly as in personal mode. One hub for the whole module (tests/support/hub.py).

Threats, as a hub user with a notebook (any code, their own shell):
- reading or acting on another person's sessions by id, over REST or the event WebSocket, or
  learning that an id exists (a 403 would say so: only 404 is answered);
- reading the team's secrets (model API key, GitHub client secret, encryption key) from anything
  their kernel can reach: its environment, /proc of every process it sees, every file it can read;
- using the service's own Jupyter server (kernels, files) to run code next to those secrets;
- sign-in links built from the internal address their kernel reached the service by;
- listing, pausing or stopping other people's sessions through the admin routes (or learning
  that they exist), taking more sandboxes than their share, flooding prompts over REST or the
  event WebSocket.
And as the hub's operator: a person's server culled mid-turn must not lose the turn.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.fernet import Fernet
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from tabbi_extension import handlers
from tests.support.hub import SERVICE_USER, Hub, as_user, find_proxy
from tests.support.llm import Reply, ScriptedLLM, write
from tests.test_auth_routes import concrete, methods
from tests.test_limits import read_reply

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None or find_proxy() is None,
    reason="needs root (to create OS users) and configurable-http-proxy (npm install)",
)

PUBLIC_URL = "https://hub.example.test/services/tabbi/"
SECRETS = {
    "TABBI_LLM_API_KEY": "sk-planted-llm-" + Fernet.generate_key().decode()[:20],
    "TABBI_GITHUB_CLIENT_SECRET": "planted-gh-secret-" + Fernet.generate_key().decode()[:20],
    "TABBI_ENCRYPTION_KEY": Fernet.generate_key().decode(),
}
REPOS = f"/home/{SERVICE_USER}/repos"
#: The module's quotas: each person runs one sandbox at a time and sends at most 4 prompts an hour
#: (the other tests send no more than 3 each; an hour, so that none is refused by chance).
LIMITS = {"running_per_user": 1, "prompts_per_minute": 4, "rate_window": 3600}


@pytest.fixture(scope="module")
def llm():
    server = ScriptedLLM().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hub(tmp_path_factory, llm):
    env = {**SECRETS, "TABBI_LLM_BASE_URL": llm.url, "TABBI_MODEL": "scripted",
           "TABBI_GITHUB_CLIENT_ID": "Iv1.hubtestclient", "TABBI_GITHUB_URL": "https://github.invalid"}
    started = Hub(tmp_path_factory.mktemp("hub"), ["alice", "bob"], env,
                  {"local_repo_roots": [REPOS + "/{username}"]}, public_url=PUBLIC_URL,
                  sections={"TabbiLimits": LIMITS}, admins=("alice",))
    try:
        for name in [*started.users, "carol"]:  # carol: a person with no server (see test_quotas_...)
            started.shared_repo(REPOS, name)  # each person's, in a folder of the service's user
            if name in started.users:
                started.start_server(name)
        yield started
    finally:
        started.stop()


START = """
from tabbi_kernel import client, discovery
cl = client.connect()
s = cl.start("{repos}/{user}/repo")
s.wait_until_running()
r = s.ask("write a file")
print("ROUTE", discovery.find_server().route)
print("RESULT", s.id, r.outcome, r.error)
print("MINE", *sorted(x["id"] for x in cl.sessions()))
"""


def line(output: str, tag: str) -> list[str]:
    return next(row.split()[1:] for row in output.splitlines() if row.startswith(tag + " "))


@pytest.fixture(scope="module")
def sessions(hub, llm) -> dict[str, str]:
    """alice's and bob's session ids, each started from a kernel in their own server."""
    return {}


async def start_from_kernel(hub: Hub, llm: ScriptedLLM, user: str) -> str:
    llm.enqueue(Reply(tools=[write(f"{user}.txt", f"{user} was here\n")]), Reply(text="Done."))
    out = await run_in(hub, user, START.format(repos=REPOS, user=user))
    assert line(out, "ROUTE") == ["JupyterHub", "service"], out
    session_id, outcome, *_ = line(out, "RESULT")
    assert outcome == "completed", out
    assert line(out, "MINE") == [session_id], out
    return session_id


async def test_each_person_sees_only_their_own_sessions(hub, llm, sessions):
    """alice and bob start sessions from their own kernels through the hub; each lists only
    theirs, and bob's kernel gets 404, never 403, on every session route with alice's id,
    REST and WebSocket alike."""
    sessions["alice"] = await start_from_kernel(hub, llm, "alice")
    sessions["bob"] = await start_from_kernel(hub, llm, "bob")

    probes = []
    for pattern, handler in handlers.routes():
        if "session_id" in pattern:
            path = concrete(pattern).replace("ses-0123456789ab", sessions["alice"]).lstrip("/")
            probes += [(method, path) for method in methods(handler)]
    assert len(probes) >= 12, probes
    out = await run_in(hub, "bob", PROBE.format(probes=probes))
    codes = json.loads(out.split("CODES ", 1)[1])
    assert len(codes) == len(probes) and set(codes.values()) == {404}, codes
    # ... while alice's own session is still there for her.
    status, body = hub.api("GET", f"tabbi/api/sessions/{sessions['alice']}",
                           token=await user_token(hub, "alice"), base=hub.service_url)
    assert status == 200 and body["id"] == sessions["alice"], (status, body)


PROBE = """
import json, urllib.request, urllib.error
from tornado.httpclient import HTTPRequest, HTTPClientError
from tornado.websocket import websocket_connect
from tabbi_kernel import discovery
info = discovery.find_server()
auth = {{"Authorization": "token " + info.token}}
codes = {{}}
for method, path in {probes!r}:
    if method == "WS":
        try:
            ws = await websocket_connect(HTTPRequest(info.url.replace("http", "ws", 1) + path, headers=auth))
            codes[method + " " + path] = 101
            ws.close()
        except HTTPClientError as exc:
            codes[method + " " + path] = exc.code
        continue
    body = b"{{}}" if method in ("POST", "PUT", "PATCH") else None
    try:
        req = urllib.request.Request(info.url + path, method=method, headers=auth, data=body)
        codes[method + " " + path] = urllib.request.urlopen(req, timeout=30).status
    except urllib.error.HTTPError as exc:
        codes[method + " " + path] = exc.code
print("CODES", json.dumps(codes))
"""

SCAN = r"""
import base64, json, os, stat, urllib.request, urllib.error
from tabbi_kernel import discovery
# Sent encoded: the cell's own text must not plant the values in a file (ipykernel may keep cells).
planted = {{name: base64.b64decode(value).decode()[::-1] for name, value in {planted!r}.items()}}
found, scanned = [], {{"files": 0, "procs": 0}}
def check(where, data):
    found.extend([name, where] for name, value in planted.items() if value.encode() in data)
check("os.environ", repr(dict(os.environ)).encode())
for pid in filter(str.isdigit, os.listdir("/proc")):
    scanned["procs"] += 1
    for part in ("environ", "cmdline"):
        try:
            with open(f"/proc/{{pid}}/{{part}}", "rb") as f:
                check(f"/proc/{{pid}}/{{part}}", f.read())
        except OSError:
            pass
SKIP = {{"/proc", "/sys", "/dev", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/boot"}}
for top, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(top, d) not in SKIP and d not in ("node_modules", ".git")
               and not d.startswith(("python3", "site-packages"))]
    for name in files:
        path = os.path.join(top, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_size > 20_000_000:
                continue
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        scanned["files"] += 1
        check(path, data)
# The service's own Jupyter server serves tabbi alone: no kernel, file or terminal of it.
info = discovery.find_server()
service = {{}}
for method, path in [("POST", "api/kernels"), ("GET", "api/kernels"), ("GET", "api/contents"),
                     ("POST", "api/terminals"), ("GET", "api/sessions")]:
    req = urllib.request.Request(info.url + path, method=method, data=b"{{}}" if method == "POST" else None,
                                 headers={{"Authorization": "token " + info.token}})
    try:
        service[method + " " + path] = urllib.request.urlopen(req, timeout=30).status
    except urllib.error.HTTPError as exc:
        service[method + " " + path] = exc.code
print("RESULT", json.dumps({{"found": found, "scanned": scanned, "service": service, "uid": os.getuid()}}))
"""


async def test_no_team_secret_is_reachable_from_a_kernel(hub):
    """From alice's kernel: the team's secrets (set only in the service's environment) are in
    neither its environment, nor /proc of any process it can see, nor any file it can read;
    and the service's Jupyter server gives it no kernel, file or terminal to run code next to
    them."""
    # The scanner's self-check: a value planted where alice can read it must be found.
    canary = "canary-" + Fernet.generate_key().decode()[:20]
    as_user("alice", "sh", "-c", f"echo {canary} > /home/alice/.canary")
    wanted = {**SECRETS, "CANARY": canary}
    encoded = {name: base64.b64encode(value[::-1].encode()).decode() for name, value in wanted.items()}
    out = await run_in(hub, "alice", SCAN.format(planted=encoded), timeout=300)
    result = json.loads(out.split("RESULT ", 1)[1])
    assert result["uid"] == hub.accounts["alice"].pw_uid
    assert result["scanned"]["files"] > 1000 and result["scanned"]["procs"] > 10, result["scanned"]
    assert result["found"] == [["CANARY", "/home/alice/.canary"]], result["found"]
    assert all(code in (403, 404) for code in result["service"].values()), result["service"]


REACH = """
import json
from tabbi_kernel import client
cl = client.connect()
def call(method, path, body):
    try:
        cl.request(method, path, body)
        return 200
    except client.TabbiError as exc:
        return exc.status
print("CODES", json.dumps({{
    "bob's repo": call("POST", "sessions", {{"repo": "{repos}/bob/repo"}}),
    "the service's home": call("POST", "sessions", {{"repo": "{home}"}}),
    "a notebook of the service": call("POST", "sessions/{sid}/push",
                                      {{"cells": {{"notebook": "{home}/x.ipynb", "select": "1"}}}}),
}}))
"""


async def test_no_way_into_the_service_files_from_a_kernel(hub, llm, sessions):
    """alice names what the service's user can read but she may not: bob's local repository,
    the service's home (its data, its runtime files), a notebook among the service's files to
    push as cells into her own session (another person's sandbox workspace). Each is refused."""
    sid = sessions.get("alice") or await start_from_kernel(hub, llm, "alice")
    home = hub.accounts[SERVICE_USER].pw_dir
    out = await run_in(hub, "alice", REACH.format(repos=REPOS, home=home, sid=sid))
    codes = json.loads(out.split("CODES ", 1)[1])
    assert codes == {"bob's repo": 400, "the service's home": 400, "a notebook of the service": 400}, codes


LOGIN = """
from urllib.parse import parse_qs, urlsplit
from tabbi_kernel import client
attempt = client.connect().login("web")
print("REDIRECT", parse_qs(urlsplit(attempt["url"]).query)["redirect_uri"][0])
"""


async def test_github_callback_uses_the_public_url_from_a_kernel(hub):
    """``%tabbi login`` from a kernel, which reaches the service through the proxy's internal
    address: GitHub is told to send the browser to the hub's public URL."""
    out = await run_in(hub, "alice", LOGIN)
    assert line(out, "REDIRECT") == [PUBLIC_URL + "tabbi/github/callback"], out


PROMPT = """
from tabbi_kernel import client
s = client.connect().session("{sid}")
print("PROMPT", s.prompt("take your time"), s.refresh()["last_seq"])
"""

CATCH_UP = """
import time
from tabbi_kernel import client
s = client.connect().session("{sid}")
deadline = time.monotonic() + 120
while (info := s.refresh())["busy"] and time.monotonic() < deadline:
    s.events(info["last_seq"], wait=10)
texts = [p.get("text", "") for m in s.messages() if m["role"] == "assistant" for p in m.get("parts", [])]
print("STATE", info["state"], info["busy"])
print("LAST", json.dumps(texts[-1:]))
"""


async def test_a_turn_survives_its_persons_server_being_stopped(hub, llm, sessions):
    """alice's server is stopped (culled) mid-turn and started again: the turn went on in the
    service meanwhile, and her new kernel finds it finished with the whole answer."""
    sid = sessions.get("alice") or await start_from_kernel(hub, llm, "alice")
    done = llm.completed
    answer = "slow answer " + " ".join(f"w{i}" for i in range(20))
    llm.enqueue(Reply(text=answer, chunks=20, drip=1.0))
    out = await run_in(hub, "alice", PROMPT.format(sid=sid))
    assert line(out, "PROMPT")
    hub.stop_server("alice")
    assert llm.completed == done, "the turn ended before the server stopped: make the reply slower"
    hub.start_server("alice")
    out = await run_in(hub, "alice", "import json\n" + CATCH_UP.format(sid=sid))
    assert line(out, "STATE") == ["running", "False"], out
    assert answer in out, out


async def test_the_service_serves_metrics_to_a_token_with_its_access_scope_and_logs_json(hub):
    """An operator's Prometheus scrapes the service at /services/tabbi/metrics with a hub token
    carrying the service's access scope; a call without such a token is refused. The service's
    log lines are JSON (hub mode's default), for a log pipeline."""
    status, text = hub.api("GET", "metrics", token=await user_token(hub, "alice"), base=hub.service_url)
    assert status == 200, (status, text)
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"tabbi_sessions", "tabbi_sandboxes_running", "tabbi_turn_seconds"} <= names, names
    status, _ = hub.api("GET", "metrics", token="not-a-hub-token", base=hub.service_url)
    assert status == 403
    lines = [json.loads(row) for row in hub.log_path.read_text().splitlines() if row.startswith("{")]
    assert any("tabbi: data in" in row["message"] for row in lines)


async def run_in(hub: Hub, user: str, code: str, timeout: float = 180) -> str:
    """Run ``code`` in a new kernel of ``user``'s server, as their notebook would."""
    kernel = await hub.kernel(user)
    try:
        return await kernel.run(code, timeout)
    finally:
        kernel.close()


async def user_token(hub: Hub, user: str) -> str:
    status, body = hub.api("POST", f"users/{user}/tokens",
                           {"scopes": ["access:services!service=tabbi"], "expires_in": 600})
    assert status == 201, (status, body)
    return body["token"]


ADMIN_PROBE = """
import json
from tabbi_kernel import client
cl = client.connect()
try:
    cl.admin_sessions()
    print("LIST", 200)
except client.TabbiError as exc:
    print("LIST", exc.status)
"""

ADMIN = """
import json
from tabbi_kernel import client
cl = client.connect()
row = next(s for s in cl.admin_sessions() if s["id"] == "{sid}")
print("ROW", json.dumps({{k: row[k] for k in ("owner", "state", "busy")}}))
print("STOPPED", json.dumps(cl.admin_stop("{sid}")))
"""


async def test_an_admin_lists_and_stops_bobs_session_and_bob_cannot(hub, llm, sessions):
    """alice, a hub admin, lists every session from her kernel and stops bob's mid-turn. bob
    (not an admin) probes the admin routes from his kernel, listing, pausing and stopping alice's
    session: each is a 404, as for a route that does not exist."""
    bob_sid = sessions.get("bob") or await start_from_kernel(hub, llm, "bob")
    alice_sid = sessions.get("alice") or await start_from_kernel(hub, llm, "alice")
    probes = [("GET", "tabbi/api/admin/sessions"), ("GET", "tabbi/api/admin/no-such-route"),
              ("POST", f"tabbi/api/admin/sessions/{alice_sid}/stop"),
              ("POST", f"tabbi/api/admin/sessions/{alice_sid}/pause")]
    codes = json.loads((await run_in(hub, "bob", PROBE.format(probes=probes))).split("CODES ", 1)[1])
    assert set(codes.values()) == {404}, codes
    assert line(await run_in(hub, "bob", ADMIN_PROBE), "LIST") == ["404"]

    bob = await user_token(hub, "bob")
    before = hub.api("GET", f"tabbi/api/sessions/{bob_sid}", token=bob, base=hub.service_url)[1]["last_seq"]
    llm.enqueue(Reply(text="let me think", stall=True))
    status, body = hub.api("POST", f"tabbi/api/sessions/{bob_sid}/prompt", {"text": "think"},
                           token=bob, base=hub.service_url)
    assert status == 202, (status, body)
    await wait_events(hub, bob, bob_sid, lambda e: e["type"] == "text.delta", after=before)

    out = await run_in(hub, "alice", ADMIN.format(sid=bob_sid))
    assert json.loads(out.split("ROW ", 1)[1].splitlines()[0]) == {
        "owner": "bob", "state": "running", "busy": True}, out
    stopped = json.loads(out.split("STOPPED ", 1)[1].splitlines()[0])
    assert stopped["state"] == "error" and "administrator (alice)" in stopped["error"], stopped
    events = await wait_events(hub, bob, bob_sid, lambda e: e["type"] == "admin.action", after=before)
    assert events[-1]["data"] == {"action": "stop", "by": "alice", "was": "running"}
    assert [e["data"]["outcome"] for e in events if e["type"] == "turn.finished"][-1] == "error"
    assert f"tabbi admin: alice stopped session {bob_sid} of bob" in hub.log_path.read_text()


async def test_quotas_and_rate_limits_answer_429_through_the_hub(hub, llm):
    """carol (a hub user without a server of her own: a script with her API token) goes over her
    quotas through the hub's proxy: a second running sandbox, a fifth prompt within the hour
    over REST, and again over the WebSocket to get round the REST limit. Each is a 429 naming the
    limit, with Retry-After; her four accepted prompts all run to their end."""
    status, body = hub.api("POST", "users/carol")
    assert status in (201, 409), (status, body)
    carol = await user_token(hub, "carol")
    status, session = hub.api("POST", "tabbi/api/sessions", {"repo": f"{REPOS}/carol/repo"},
                              token=carol, base=hub.service_url)
    assert status == 201, (status, session)
    sid = session["id"]
    status, headers_, body = raw_call(hub, carol, "POST", "tabbi/api/sessions",
                                      {"repo": f"{REPOS}/carol/repo"})
    assert (status, body["limit"]) == (429, "running_per_user") and int(headers_["Retry-After"]) > 0, body

    ws = await websocket_connect(HTTPRequest(
        hub.service_url.replace("http", "ws", 1) + f"tabbi/api/sessions/{sid}/stream",
        headers={"Authorization": f"token {carol}"}))
    accepted = []
    for n in range(4):
        if n % 2:
            ws.write_message(json.dumps({"type": "prompt", "text": f"prompt {n}"}))
            reply = await read_reply(ws)
            assert reply["type"] == "prompt.accepted", reply
            accepted.append(reply["prompt_id"])
        else:
            status, body = hub.api("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": f"prompt {n}"},
                                   token=carol, base=hub.service_url)
            assert status == 202, (status, body)
            accepted.append(body["prompt_id"])
    status, headers_, body = raw_call(hub, carol, "POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "5"})
    assert (status, body["limit"], body["allowed"]) == (429, "prompts_per_minute", 4), body
    assert headers_["Retry-After"] == str(body["retry_after"]) and 0 < body["retry_after"] <= 3600
    ws.write_message(json.dumps({"type": "prompt", "text": "6"}))
    refused = await read_reply(ws)
    assert (refused["type"], refused["status"], refused["limit"]) == (
        "prompt.refused", 429, "prompts_per_minute"), refused
    ws.close()

    events = await wait_events(hub, carol, sid, lambda e: e["type"] == "turn.finished"
                               and e["data"]["prompt_id"] == accepted[-1], timeout=300)
    queued = [e["data"]["text"] for e in events if e["type"] == "prompt.queued"]
    assert queued == [f"prompt {n}" for n in range(4)], queued
    finished = [(e["data"]["prompt_id"], e["data"]["outcome"])
                for e in events if e["type"] == "turn.finished"]
    assert finished == [(p, "completed") for p in accepted], finished
    assert hub.api("DELETE", f"tabbi/api/sessions/{sid}", token=carol, base=hub.service_url)[0] == 204


def raw_call(hub: Hub, token: str, method: str, path: str, body: Any) -> tuple[int, Any, Any]:
    """A call to the service through the proxy that keeps the response's headers."""
    request = urllib.request.Request(hub.service_url + path, method=method, data=json.dumps(body).encode(),
                                     headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read() or b"{}")


async def wait_events(hub: Hub, token: str, sid: str, until: Callable[[dict], bool], after: int = 0,
                      timeout: float = 120) -> list[dict]:
    """The session's events after ``after`` up to the first one ``until`` accepts (long-polling,
    with a deadline)."""
    deadline, seen = time.monotonic() + timeout, []
    while True:
        assert time.monotonic() < deadline, f"not within {timeout} s: {seen[-10:]}"
        after = seen[-1]["seq"] if seen else after
        status, body = await asyncio.to_thread(
            hub.api, "GET", f"tabbi/api/sessions/{sid}/events?after={after}&wait=10", None, token,
            hub.service_url)
        assert status == 200, (status, body)
        for event in body["events"]:
            seen.append(event)
            if until(event):
                return seen
