"""Guarantees that mutation probing found unguarded (issue 17), each checked from the outside:
what a client, the model provider or an attacker in the sandbox observes.

Every test here fails under the breakage named in its docstring; ``make mutants`` re-checks that
(tests/mutants.toml, docs/testing.md). GitHub's part is in test_guarantees_github.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tabbi_sandbox import bootstrap
from tabbi_sandbox.isolation import bwrap_path, bwrap_works
from tabbi_sandbox.provider import BOOTSTRAP_SCRIPT
from tests.conftest import git
from tests.support.git_remote import GitHTTPRemote
from tests.support.llm import Reply, write
from tests.support.snapshots import open_archive
from tests.test_sessions import read_ws, running_session

pytestmark = pytest.mark.timeout(300)

TOKEN = "tabbi-push-token-6d1e0a"

#: A ``git`` placed first on the bootstrap's PATH: it records its arguments and whether the
#: credential was anywhere in its environment, then runs the real git.
GIT_SPY = """#!/bin/sh
case "$(env)" in *{token}*) seen=yes ;; *) seen=no ;; esac
printf '%s\\0' "$seen" "$@" > "{log}/$$"
exec /usr/bin/git "$@"
"""


@pytest.mark.skipif(not bwrap_works()[0], reason="needs bubblewrap to place the git spy")
def test_only_git_push_sees_the_push_credential(tmp_path, source_repo):
    """Threat: every process that holds the token in its environment is one more place it can leak
    from (a child it starts, a core dump, a /proc reader in the same namespace). The push step
    prepares a private repository (``git init``, ``git fetch`` of the agent's workspace) before
    pushing: only the ``git push`` may hold the credential. Breakage caught: the push step's whole
    environment carrying the token."""
    remote = GitHTTPRemote(tmp_path / "remote", TOKEN)
    remote.root.mkdir()
    remote.add_bare("sample", source_repo)
    remote.start()
    try:
        ws, home, spy, log = (tmp_path / name for name in ("ws", "home", "spy", "log"))
        for folder in (home, spy, log):
            folder.mkdir()
        git("clone", "--quiet", str(source_repo), str(ws), cwd=tmp_path)
        git("checkout", "--quiet", "-b", "tabbi/pushed", cwd=ws)
        (spy / "git").write_text(GIT_SPY.format(token=TOKEN, log=log))
        (spy / "git").chmod(0o755)
        request = {"workspace": str(ws), "home": str(home), "branch": "tabbi/pushed",
                   "remote_url": remote.url("sample"),
                   "credential": {"username": "x-access-token", "password": TOKEN}}
        # The bootstrap's PATH starts with /usr/local/bin: the spy is mounted there, for it only.
        done = subprocess.run(
            [bwrap_path(), "--dev-bind", "/", "/", "--bind", str(spy), "/usr/local/bin",
             os.path.realpath(sys.executable), "-I", "-S", str(BOOTSTRAP_SCRIPT), "push"],
            input=json.dumps(request), capture_output=True, text=True, timeout=120,
        )
    finally:
        remote.stop()
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"pushed": True}, done.stderr
    assert git("rev-parse", "tabbi/pushed", cwd=remote.root / "sample.git") == git(
        "rev-parse", "HEAD", cwd=ws)
    runs = []
    for record in log.iterdir():
        seen, *argv = record.read_bytes().rstrip(b"\0").decode().split("\0")
        runs.append((bootstrap.subcommand(argv), seen == "yes"))
    steps = {step for step, _ in runs}
    assert {"init", "fetch", "push"} <= steps, runs  # the spy saw the whole push step
    assert [step for step, seen in runs if seen] == ["push"], runs


@pytest.mark.tabbi(turn_timeout=30.0)
async def test_a_stalled_turn_ends_at_its_deadline_and_the_model_is_cut_off(api, llm, source_repo):
    """Threat: a model server that stops answering (or an agent that loops) would hold the session
    busy, and the provider's meter running, forever. Breakage caught: the turn watchdog never
    firing. (The deadline leaves a loaded machine time to reach the model before it passes: 15 s
    was too short with two test workers and other work on 2 cores.)"""
    sid = await running_session(api, source_repo)
    llm.enqueue(Reply(text="thinking", stall=True), Reply(text="back"))
    await api.prompt(sid, "think forever")
    seen = await api.wait_for(sid, lambda e: e["type"] == "text.delta")  # the model now stalls
    events = await api.wait_turn(sid, after=seen[-1]["seq"], timeout=90)
    # "error" with the reason, even when OpenCode's idle after the watchdog's abort ends it.
    assert events[-1]["data"]["outcome"] == "error"
    assert "ran longer than 30 s" in events[-1]["data"]["error"]
    assert [e for e in events if e["type"] == "error" and "ran longer" in e["data"]["message"]]
    llm.wait_closed(1, 30)  # the stalled model stream was closed, not left open
    await api.prompt(sid, "are you there?")
    after = await api.wait_turn(sid, after=events[-1]["seq"])
    assert after[-1]["data"]["outcome"] == "completed"


async def test_abort_cuts_the_model_stream(api, llm, source_repo):
    """Threat: an abort that only relabels the turn leaves the model streaming (and billing) on,
    and the session busy until it is done. Breakage caught: the turn marked aborted without
    OpenCode being told."""
    sid = await running_session(api, source_repo)
    llm.enqueue(Reply(text="on and on", stall=True))
    await api.prompt(sid, "talk")
    seen = await api.wait_for(sid, lambda e: e["type"] == "text.delta")
    await api.ok("POST", f"tabbi/api/sessions/{sid}/abort")
    llm.wait_closed(1, 30)
    events = await api.wait_turn(sid, after=seen[-1]["seq"], timeout=30)
    assert events[-1]["data"]["outcome"] == "aborted"


@pytest.mark.tabbi(max_lifetime=5.0, idle_timeout=0)
async def test_a_sandbox_pauses_at_its_maximum_lifetime_after_its_turn(api, llm, source_repo):
    """Threat: a sandbox nobody stops runs (and costs) forever; but cutting a turn short loses
    work. Breakage caught: the lifetime deadline never taken into account."""
    sid = await running_session(api, source_repo)
    # A turn that outlasts the lifetime: it finishes first, then the session pauses.
    llm.enqueue(Reply(text="w " * 40, chunks=40, drip=0.2))
    await api.prompt(sid, "talk for a while")
    events = await api.wait_for(
        sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "paused", timeout=120)
    assert events[-1]["data"]["reason"] == "max_lifetime"
    finished = [e["data"]["outcome"] for e in events if e["type"] == "turn.finished"]
    assert finished and finished[-1] == "completed"  # the turn was not cut


#: What a snapshot may hold (sandbox/snapshots.py): the workspace, and OpenCode's data and state
#: minus its logs and raw database files (the database goes in as one consistent copy).
ALLOWED = ("workspace", "home/.local/share/opencode", "home/.local/state/opencode")
DATABASE = "home/.local/share/opencode/opencode.db"


def allowed_in_snapshot(name: str, is_dir: bool) -> bool:
    name = name.strip("/")
    if is_dir and any(root.startswith(name + "/") for root in ALLOWED):
        return True  # a parent folder of an allowed one
    inside = [root for root in ALLOWED if name == root or name.startswith(root + "/")]
    if not inside:
        return False
    parts = name.split("/")
    return "log" not in parts and not name.endswith(("-wal", "-shm", "-journal"))


async def test_a_snapshot_holds_only_what_resume_needs(api, llm, source_repo, data_dir, workspace):
    """Threat: a snapshot outlives the sandbox and may be copied to other machines; anything in it
    beyond what a resume needs (the generated config, logs, caches, temporary files) is exposure
    for nothing. Breakage caught: the generated config folder archived as well."""
    sid = await running_session(api, source_repo)
    llm.enqueue(Reply(tools=[write("kept.txt", "kept\n")]), Reply(text="done"))
    await api.prompt(sid, "write kept.txt")
    await api.wait_turn(sid)
    home = workspace(sid).parent / "home"
    assert (home / ".config").is_dir()  # the generated config exists, so leaving it out is a choice
    for planted in (".cache/planted.bin", "tmp/planted.txt", ".planted-history",
                    ".local/share/opencode/log/planted.log"):
        (home / planted).parent.mkdir(parents=True, exist_ok=True)
        (home / planted).write_text("not for the snapshot\n")
    await api.ok("POST", f"tabbi/api/sessions/{sid}/pause")
    archives = sorted((data_dir / "snapshots" / sid).glob("*.snapshot"))
    assert archives
    with open_archive(archives[-1]) as tar:
        members = {m.name.strip("/"): m for m in tar.getmembers()}
        database = tar.extractfile(members[DATABASE]).read()
    assert "workspace/kept.txt" in members and "workspace/.git/HEAD" in members
    assert database.startswith(b"SQLite format 3\0")
    extra = sorted(n for n, m in members.items() if not allowed_in_snapshot(n, m.isdir()))
    assert not extra, f"the snapshot holds what resume does not need: {extra[:20]}"


def test_the_credential_helper_answers_only_its_own_host(tmp_path):
    """Threat: a push or clone redirected elsewhere (an ``insteadOf`` the agent slipped into some
    config, a URL rewritten on the way) asks the new host for credentials: the helper must give
    them only to the remote's own protocol and host. Breakage caught: the host check dropped."""
    url = "https://git.example.com/octo/sample.git"
    args, env = bootstrap.remote_args(url, {"username": "x-access-token", "password": TOKEN})
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_TERMINAL_PROMPT": "0", **env}

    def fill(protocol: str, host: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args, "credential", "fill"], env=base, cwd=tmp_path,
                              input=f"protocol={protocol}\nhost={host}\n\n", capture_output=True,
                              text=True, timeout=30)

    own = fill("https", "git.example.com")
    assert own.returncode == 0 and f"password={TOKEN}" in own.stdout, own.stderr
    for protocol, host in (("https", "spy.example.net"), ("http", "git.example.com")):
        other = fill(protocol, host)
        assert TOKEN not in other.stdout + other.stderr, (protocol, host)


CANARY = "tabbi-server-only-canary-7f2e"


async def test_the_sandbox_gets_nothing_of_the_server_and_no_secret_in_argv(
    api, llm, source_repo, monkeypatch
):
    """Threat: the server's environment holds what the agent must not have (cloud credentials, a
    hub token, tabbi's own keys), and a process's argv is readable by every user of the machine.
    The sandbox starts from a clean environment, and OpenCode's password travels on stdin.
    Breakages caught: the server's environment passed on; the password put in the bootstrap's
    argv."""
    from tabbi_sandbox import processes
    from tests.test_github_secrets import process_texts
    from tests.test_sessions import opencode_pids

    monkeypatch.setenv("TABBI_TEST_SERVER_ONLY", CANARY)  # in the server's own environment now
    sid = await running_session(api, source_repo)
    sandbox = processes.sandbox_pids(sid)
    agent = opencode_pids(sid)
    assert agent and set(agent) < set(sandbox), "OpenCode and its bootstrap were found"
    with open(f"/proc/{agent[0]}/environ", "rb") as f:
        environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    password = environ[b"OPENCODE_SERVER_PASSWORD"]
    texts = process_texts()  # environment and argv of every process
    for pid in sandbox:
        assert CANARY.encode() not in texts.get(pid, b""), f"sandbox process {pid} has the server's env"
    for pid in texts:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read()
        except OSError:
            continue
        assert password not in argv, f"OpenCode's password is in the argv of process {pid}"


async def test_an_event_logged_while_a_client_joins_reaches_it_once(
    api, llm, source_repo, jp_ws_fetch, tabbi_app, monkeypatch
):
    """Threat to the log's promise (no gap, no duplicate): a client joining the stream is
    subscribed to live events before the log is replayed to it, so an event logged in between is
    in both. It must arrive once. The store is made to log one event exactly then (the window is
    milliseconds wide in real use). Breakage caught: live events forwarded without skipping what
    the replay sent."""
    sid = await running_session(api, source_repo)
    owner = (await api.ok("GET", "tabbi/api/whoami"))["owner"]
    agent = await tabbi_app.manager.get(owner, sid)
    replay = agent.store.list_events
    joined = []

    async def joining(session_id: str, after: int = 0, limit: int = 1000):
        if not joined:
            joined.append(await agent.announce("test.joined", {}))
        return await replay(session_id, after, limit)

    monkeypatch.setattr(agent.store, "list_events", joining)
    ws = await jp_ws_fetch("tabbi", "api", "sessions", sid, "stream", params={"after": 0})
    received = await read_ws(ws, until_type="test.joined")
    await agent.announce("test.after", {})
    received += await read_ws(ws, until_type="test.after")
    ws.close()
    assert [e["seq"] for e in received] == list(range(1, received[-1]["seq"] + 1))
