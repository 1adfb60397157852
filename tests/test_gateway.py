"""The model key stays in the server; OpenCode's password stays in OpenCode.

Threat: the agent has a shell in its sandbox, and a prompt-injected agent would walk off with
whatever secret it can read there. A team's model key read there is a model account stolen; the
OpenCode password read there lets the agent drive its own OpenCode API (answer its own
permission requests, rewrite its config). The fence: no model key enters a sandbox at all (the
server's model gateway adds it to each model call, for a per-sandbox gateway token that works only
on the model API paths, only for its own session), OpenCode's tools run without OpenCode's
secrets in their environment, and OpenCode runs non-dumpable, so its /proc files and memory are
closed to the tools.

The tests attack as the agent would: plain and base64-hidden shell commands that dump every
environment, command line and file they can reach, and scan every process memory they can open
for the secrets' variable names; then the sandbox's files and every process on the machine are
searched for the key and the password. A turn still runs end to end through the gateway.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from types import SimpleNamespace

import httpx
import pytest

from tabbi_extension.app import TabbiExtension
from tabbi_extension.gateway import UsageMeter, derive_token
from tests.support.llm import Reply, ScriptedLLM, bash, write
from tests.test_github_secrets import files_under, process_texts
from tests.test_sessions import opencode_pids

pytestmark = pytest.mark.timeout(300)

#: The team's model key: distinctive, so that any copy of it anywhere is found.
MODEL_KEY = "sk-tabbi-" + secrets.token_hex(20)

#: What the hidden command runs: everything readable goes into one file in the workspace (tool
#: output is truncated, a file is not), and every process memory it can open is searched for
#: where secrets sit (environment variable names, an Authorization header).
LOOT = ".loot"
ATTACK = r"""
out="$PWD/.loot"
{
  env
  for p in /proc/[0-9]*; do
    echo "== $p"; tr '\0' '\n' < "$p/environ"; tr '\0' ' ' < "$p/cmdline"; echo
  done
  python3 - <<'PY'
import os, re, sys
out = sys.stdout.buffer
for top in {os.environ["HOME"], os.getcwd(), "/tmp"}:
    for folder, _, names in os.walk(top):
        for name in names:
            path = os.path.join(folder, name)
            if name == ".loot" or not os.path.isfile(path) or os.path.islink(path):
                continue
            try:
                with open(path, "rb") as f:
                    out.write(b"== " + path.encode() + b"\n" + f.read() + b"\n")
            except OSError as exc:
                print("==", path, "closed:", exc.strerror, flush=True)
out.flush()
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        maps = open(f"/proc/{pid}/maps").read().splitlines()
        mem = open(f"/proc/{pid}/mem", "rb", 0)
    except OSError as exc:
        print("mem", pid, "closed:", exc.strerror)
        continue
    for line in maps:
        span, perms = line.split()[:2]
        if not perms.startswith("r"):
            continue
        start, end = (int(x, 16) for x in span.split("-"))
        try:
            mem.seek(start)
            chunk = mem.read(min(end - start, 64 << 20))
        except (OSError, OverflowError, ValueError):
            continue
        for hit in re.finditer(rb"(OPENCODE_SERVER_PASSWORD|TABBI_LLM_API_KEY|Bearer |x-api-key)", chunk):
            print("mem", pid, chunk[hit.start():hit.start() + 120])
PY
} > "$out" 2>&1
echo "loot: $(wc -c < "$out") bytes"
"""


#: A watcher left running in the background for the rest of the turn: whatever process OpenCode
#: starts meanwhile (git for its snapshots, ripgrep, the tools' shells) has its environment read
#: the moment it exists, until the agent's last step leaves a stop file.
WATCH = r"""
import os, time
seen, deadline = set(), time.monotonic() + 120
with open(".watch", "ab", 0) as out:
    while not os.path.exists(".stop") and time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f, open(f"/proc/{pid}/cmdline", "rb") as c:
                    environ, argv = f.read(), c.read()
            except OSError:
                continue
            if (pid, argv) not in seen:
                seen.add((pid, argv))
                out.write(b"== " + pid.encode() + b" " + argv + b"\n" + environ + b"\n")
"""


class KeyCheckingLLM(ScriptedLLM):
    """The scripted model, also recording the credential every request arrived with."""

    def __init__(self) -> None:
        self.authorizations: list[str | None] = []
        super().__init__()

    def _handler_class(self):
        base, llm = super()._handler_class(), self

        class Handler(base):
            def do_POST(self) -> None:
                llm.authorizations.append(self.headers.get("Authorization"))
                super().do_POST()

            def do_GET(self) -> None:
                llm.authorizations.append(self.headers.get("Authorization"))
                super().do_GET()

        return Handler


@pytest.fixture
def llm():
    server = KeyCheckingLLM().start()
    yield server
    server.stop()


def opencode_secrets(sid: str) -> tuple[str, str]:
    """OpenCode's password and gateway token, read the way only the server's user (outside any
    sandbox, with its capabilities) can: proof that there is something to find."""
    pid = opencode_pids(sid)[0]
    with open(f"/proc/{pid}/environ", "rb") as f:
        environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    password = environ[b"OPENCODE_SERVER_PASSWORD"].decode()
    config = json.loads(environ[b"OPENCODE_CONFIG_CONTENT"])
    token = config["provider"]["tabbi"]["options"]["apiKey"]
    assert b"TABBI_LLM_API_KEY" not in environ and MODEL_KEY.encode() not in b"".join(environ.values())
    return password, token


@pytest.mark.tabbi(llm_api_key=MODEL_KEY)
@pytest.mark.parametrize("isolation", ["bwrap"])
async def test_the_agent_finds_neither_the_model_key_nor_the_opencode_password(
    api, llm, source_repo, isolation, workspace, data_dir, tabbi_app
):
    sid = (await api.create(str(source_repo)))["id"]
    await api.wait_state(sid, "running")
    password, token = opencode_secrets(sid)
    assert token == derive_token(password)

    hidden = base64.b64encode(ATTACK.encode()).decode()
    watcher = base64.b64encode(WATCH.encode()).decode()
    llm.enqueue(
        Reply(text="Looking around. ", tools=[bash(
            f"echo {watcher} | base64 -d > /tmp/w.py; setsid python3 /tmp/w.py </dev/null >/dev/null 2>&1 & "
            "env; echo ---; cat /proc/$PPID/environ; echo rc=$?")]),
        Reply(tools=[bash(f"echo {hidden} | base64 -d | sh", "tidy up")]),
        Reply(tools=[write("notes.txt", "the tools still work\n"),
                     bash("git status --short && python3 -c 'print(6 * 7)'")]),
        Reply(tools=[bash("touch .stop")]),
        Reply(text="All done."),
    )
    await api.prompt(sid, "have a look around")
    events = await api.wait_turn(sid, timeout=240)

    # The turn ran end to end through the gateway: text streamed, tools worked.
    finished = [e for e in events if e["type"] == "turn.finished"]
    assert finished[-1]["data"]["outcome"] == "completed", finished
    assert "Looking around" in "".join(e["data"]["delta"] for e in events if e["type"] == "text.delta")
    tools = [e["data"] for e in events
             if e["type"] == "tool" and e["data"]["status"] in ("completed", "error")]
    assert [t["tool"] for t in tools] == ["bash", "bash", "write", "bash", "bash"], tools
    first, hidden_run, _, last, _ = (t.get("output") or "" for t in tools)
    assert "TABBI_SANDBOX_ID=" in first  # the shell's environment was dumped ...
    assert "Permission denied" in first  # ... and OpenCode's was closed to it
    assert "loot:" in hidden_run
    assert "notes.txt" in last and "42" in last
    assert (workspace(sid) / "notes.txt").read_text() == "the tools still work\n"

    # Every model call reached the model with the real key, and only through the gateway.
    assert len(llm.authorizations) >= 4
    assert set(llm.authorizations) == {f"Bearer {MODEL_KEY}"}
    usage = tabbi_app.gateway.usage[sid]
    assert usage.requests == len(llm.authorizations) and usage.output_tokens > 0

    loot = (workspace(sid) / LOOT).read_bytes()
    assert b"TABBI_SANDBOX_ID=" in loot and b"opencode" in loot and b"# sample" in loot, loot[:2000]
    assert b"mem " in loot  # the memory scan ran
    for name in ("workspace/calc.py", "opencode/opencode.db", "opencode/package.json", "opencode.log"):
        assert f"/{name}\n".encode() in loot, f"the file scan missed {name}"

    watched = (workspace(sid) / ".watch").read_bytes()
    assert watched.count(b"== ") > 5 and b"git" in watched, watched[:2000]  # it saw processes come

    files = files_under(data_dir / "sandboxes" / sid)
    assert any(name.endswith("opencode.db") for name in files)
    places: dict[str, bytes] = {
        "events": json.dumps(events).encode(),
        "loot": loot,
        "watched": watched,
        **{f"file {name}": data for name, data in files.items()},
    }
    for name, secret in (("model key", MODEL_KEY), ("OpenCode password", password),
                         ("gateway token", token)):
        leaks = [where for where, data in places.items() if secret.encode() in data]
        assert not leaks, f"the {name} is readable by the agent in: {leaks}"
    # OpenCode still refuses its API to anyone without the password (the plugin that keeps the
    # password from its children must not have switched its own auth off).
    with open(f"/proc/{opencode_pids(sid)[0]}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    url = f"http://127.0.0.1:{int(argv[argv.index(b'--port') + 1])}/session"
    async with httpx.AsyncClient(timeout=30) as client:
        assert (await client.get(url)).status_code == 401
        assert (await client.get(url, auth=("opencode", "wrong"))).status_code == 401
        assert (await client.get(url, auth=("opencode", password))).status_code == 200
    # And no process on this machine holds the key in its environment or command line.
    assert not [pid for pid, text in process_texts().items() if MODEL_KEY.encode() in text]


@pytest.mark.tabbi(llm_api_key=MODEL_KEY)
async def test_the_gateway_lets_only_its_own_sandbox_call_only_the_model(
    api, llm, source_repo, jp_serverapp, caplog
):
    """Threat: the gateway is reachable by anything on the machine (and by the agent, which can
    find its token in OpenCode's config only if the fences above fail). It must not be an open
    proxy, nor a way into another session's model account or budget."""
    first = (await api.create(str(source_repo)))["id"]
    second = (await api.create(str(source_repo)))["id"]
    await api.wait_state(first, "running")
    await api.wait_state(second, "running")
    _, token = opencode_secrets(first)
    _, other_token = opencode_secrets(second)
    assert token != other_token
    base = f"http://127.0.0.1:{jp_serverapp.port}{jp_serverapp.base_url}tabbi/gateway"
    body = {"model": "scripted", "stream": True, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "noop", "parameters": {}}}]}
    llm.enqueue(Reply(text="through the gateway", chunks=4, drip=0.3))

    async with httpx.AsyncClient(timeout=60) as client:
        async def call(sid: str, path: str, auth: dict[str, str], method: str = "POST") -> httpx.Response:
            return await client.request(method, f"{base}/{sid}/v1/{path}", headers=auth,
                                        json=body if method == "POST" else None)

        bearer = {"Authorization": f"Bearer {token}"}
        seen = len(llm.authorizations)
        assert (await call(first, "chat/completions", {})).status_code == 403
        assert (await call(first, "chat/completions", {"Authorization": "Bearer wrong"})).status_code == 403
        near = token[:-1] + ("1" if token.endswith("0") else "0")  # one character off
        assert (await call(first, "chat/completions", {"x-api-key": near})).status_code == 403
        assert (await call(second, "chat/completions", bearer)).status_code == 403  # another session
        assert (await call("ses-000000000000", "chat/completions", bearer)).status_code == 403
        # Said where an operator looks (only a warm sandbox's own rehearsal call is not).
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(f"a call for {second} without its token" in m for m in warned), warned
        # Jupyter's own token is not a gateway token.
        jupyter = {"Authorization": f"token {jp_serverapp.identity_provider.token}"}
        assert (await call(first, "chat/completions", jupyter)).status_code == 403
        for path, method in (("embeddings", "POST"), ("files", "GET"), ("chat/completions", "GET"),
                             ("models/x", "GET"), ("audio/speech", "POST")):
            assert (await call(first, path, bearer, method)).status_code == 404, path
        assert len(llm.authorizations) == seen, "a refused call reached the model"

        async with client.stream("POST", f"{base}/{first}/v1/chat/completions", headers=bearer,
                                 json=body) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            completed = llm.completed
            chunks, unfinished_at_first = [], None
            async for chunk in streamed.aiter_text():
                if unfinished_at_first is None:
                    unfinished_at_first = llm.completed == completed
                chunks.append(chunk)
        lines = [line[6:] for line in "".join(chunks).splitlines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        deltas = [json.loads(line)["choices"] for line in lines[:-1]]
        text = "".join(c[0]["delta"].get("content") or "" for c in deltas if c)
        assert text == "through the gateway"
        assert unfinished_at_first, "the first piece arrived only after the model had finished"
        assert (await call(first, "models", bearer, "GET")).status_code == 200
        # The other session's token works for the other session.
        other = {"Authorization": f"Bearer {other_token}"}
        assert (await call(second, "models", other, "GET")).status_code == 200
    assert llm.authorizations[seen:] == [f"Bearer {MODEL_KEY}"] * 3


@pytest.mark.parametrize(("ip", "expected"), [
    ("", "http://127.0.0.1:8888/base/"), ("0.0.0.0", "http://127.0.0.1:8888/base/"),
    ("localhost", "http://127.0.0.1:8888/base/"), ("::", "http://[::1]:8888/base/"),
    ("10.1.2.3", "http://10.1.2.3:8888/base/"),
])
def test_the_gateway_url_is_where_a_local_sandbox_reaches_the_server(ip, expected):
    serverapp = SimpleNamespace(ip=ip, port=8888, base_url="/base/", certfile="")
    assert TabbiExtension.server_url(SimpleNamespace(gateway_url=None, serverapp=serverapp)) == expected
    configured = SimpleNamespace(gateway_url="https://hub.example/user/x/", serverapp=serverapp)
    assert TabbiExtension.server_url(configured) == "https://hub.example/user/x/"


def test_usage_is_read_from_openai_and_anthropic_streams_split_anywhere():
    openai = (b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
              b'data: {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 7}}\n\n'
              b"data: [DONE]\n\n")
    anthropic = (b'event: message_start\ndata: {"type": "message_start", "message": '
                 b'{"usage": {"input_tokens": 30, "output_tokens": 1}}}\n\n'
                 b'event: message_delta\ndata: {"type": "message_delta", "usage": {"output_tokens": 9}}\n\n')
    for stream, expected in ((openai, (12, 7)), (anthropic, (30, 9))):
        meter = UsageMeter()
        for i in range(0, len(stream), 7):  # chunk borders fall inside lines
            meter.feed(stream[i:i + 7], "text/event-stream")
        meter.finish()
        assert (meter.input, meter.output) == expected
    whole = UsageMeter()
    whole.feed(b'{"usage": {"input_tokens": 5, "output_tokens": 2}}', "application/json")
    whole.finish()
    assert (whole.input, whole.output) == (5, 2)
