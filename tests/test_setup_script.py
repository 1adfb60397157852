"""Per-repository environments (``extension/environments.py``, ``sandbox/setup_script.py``): a
repository's ``.tabbi/setup.sh`` runs once in the sandbox after the clone, its result is kept as
the person's warm snapshot of the repository, and later sessions start from it, reading at once
while the workspace is brought up to date, writing only after.

Threat (``test_the_setup_script_gets_no_secret``): the setup script is repository content, i.e.
written by whoever can push to the repository, and runs before the agent does. It must get no
more than the agent: not the person's GitHub token (the clone's credential), not the model key,
not the OpenCode password, not the server's secrets (its GitHub client secret, its encryption
key). It is written as that attacker: it reads its environment, every /proc entry it can list,
its parent's memory, its home and the repository's git config.

Real parts: the Jupyter server, OpenCode, git, bubblewrap; the model is the scripted one, GitHub
and Modal's API are the loopback stand-ins. Waits are on events with deadlines.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import threading
from pathlib import Path

import pytest

from tests.conftest import git
from tests.support.api import Api
from tests.support.git_remote import GitHTTPRemote
from tests.support.identity import headers
from tests.support.llm import Reply, read, write
from tests.test_github import github, sign_in_web, tabbi_config  # noqa: F401  (fixtures used here)
from tests.test_provider_contract import (  # noqa: F401  (the module's Modal stand-in)
    local_kit,
    make_spec,
    modal_kit,
    modal_world,
    shell,
)

pytestmark = pytest.mark.timeout(600)

SETUP = """#!/bin/bash
echo "installing the demo package"
mkdir -p .tabbi-env
echo run >> .tabbi-env/runs
echo "setup finished"
"""


def commit_setup(repo: Path, script: str, message: str = "setup script") -> str:
    (repo / ".tabbi").mkdir(exist_ok=True)
    (repo / ".tabbi" / "setup.sh").write_text(script)
    (repo / ".gitignore").write_text(".tabbi-env/\n")
    git("add", ".", cwd=repo)
    git("commit", "--quiet", "-m", message, cwd=repo)
    return git("rev-parse", "HEAD", cwd=repo)


def commit_change(repo: Path, text: str) -> str:
    (repo / "README.md").write_text(text)
    git("commit", "--quiet", "-am", "the base branch moves", cwd=repo)
    return git("rev-parse", "HEAD", cwd=repo)


def setup_ran(events: list[dict]) -> bool:
    return any(e["type"] == "session.status" and e["data"].get("phase") == "setup_done" for e in events)


async def start(api: Api, repo: str, **extra) -> tuple[str, list[dict], dict]:
    """A session on ``repo``, running: its id, the events of its start, its description."""
    session = await api.create(repo, **extra)
    events = await api.wait_state(session["id"], "running", timeout=180)
    return session["id"], events, await api.ok("GET", f"tabbi/api/sessions/{session['id']}")


async def synced(api: Api, sid: str) -> list[dict]:
    """Until the warm workspace is in sync with its base branch (or the sync failed)."""
    def done(event: dict) -> bool:
        return event["type"] == "error" or (
            event["type"] == "environment" and event["data"]["status"] == "synced")

    events = await api.wait_for(sid, done, timeout=120)
    assert events[-1]["type"] == "environment", events[-1]
    return events


async def delete(api: Api, *sids: str) -> None:
    for sid in sids:
        await api.ok("DELETE", f"tabbi/api/sessions/{sid}", expect=204)


async def test_a_setup_script_runs_once_and_later_sessions_start_from_its_snapshot(
    api, jp_fetch, source_repo, workspace, tabbi_app
):
    first_commit = commit_setup(source_repo, SETUP)
    repo = str(source_repo)
    registry = tabbi_app.manager.settings.environments

    # The first session clones, runs the script (its output shown as progress) and keeps the result.
    a, events, info = await start(api, repo)
    lines = [e["data"].get("line") for e in events if e["data"].get("phase") == "setup"]
    assert "installing the demo package" in lines and "setup finished" in lines
    assert setup_ran(events) and info["environment"]["source"] == "built"
    assert info["environment"]["commit"] == first_commit
    assert (workspace(a) / ".tabbi-env" / "runs").read_text() == "run\n"

    # Another person never gets this person's warm snapshot (the clone used the owner's token).
    alice = Api(jp_fetch, headers("alice"))
    b, events, info = await start(alice, repo)
    assert setup_ran(events) and info["environment"]["source"] == "built"
    assert sorted(e.owner for e in await registry.all()) == ["alice", "owner"]

    # --fresh builds it anew although a warm snapshot exists.
    c, events, info = await start(api, repo, fresh=True)
    assert setup_ran(events) and info["environment"]["source"] == "built"
    built = info["environment"]["snapshot"]
    await delete(api, a, c)
    await delete(alice, b)

    # The base branch moves. The next session starts from the warm snapshot (the script does
    # not run again, its effect is there), on its own branch, and is brought up to date; the
    # snapshot is outdated, so the session after builds a fresh one.
    moved = commit_change(source_repo, "# sample, moved on\n")
    d, events, info = await start(api, repo)
    assert not setup_ran(events)
    assert info["environment"]["source"] == "warm" and info["environment"]["snapshot"] == built
    assert info["environment"]["commit"] == first_commit
    events = await synced(api, d)
    assert events[-1]["data"]["commit"] == moved
    assert (workspace(d) / ".tabbi-env" / "runs").read_text() == "run\n"
    assert (workspace(d) / "README.md").read_text() == "# sample, moved on\n"
    assert git("branch", "--show-current", cwd=workspace(d)) == info["work_branch"]
    assert git("branch", "--list", "tabbi/*", cwd=workspace(d)).strip("* \n") == info["work_branch"]
    assert (await api.ok("GET", f"tabbi/api/sessions/{d}"))["base_commit"] == moved
    assert [e.owner for e in await registry.all()] == ["alice"]  # the next session builds anew
    e, events, info = await start(api, repo)
    assert setup_ran(events) and info["environment"]["commit"] == moved
    await delete(api, d)

    # The setup script changes: the warm session runs the new one before writes go ahead, and
    # the snapshot is retired.
    commit_setup(source_repo, SETUP.replace("setup finished", "setup v2 finished"), "setup v2")
    f, events, info = await start(api, repo)
    assert not setup_ran(events) and info["environment"]["source"] == "warm"
    events = await synced(api, f)
    assert any(x["type"] == "environment" and x["data"]["status"] == "setup" for x in events)
    assert (workspace(f) / ".tabbi-env" / "runs").read_text() == "run\nrun\n"
    assert [e.owner for e in await registry.all()] == ["alice"]
    await delete(api, e, f)

    # A warm snapshot that cannot be restored (damaged, or retired meanwhile) means a cold start.
    (damaged,) = await registry.all()
    archive = tabbi_app.provider._archive(damaged.ref)
    archive.write_bytes(archive.read_bytes()[:4096])
    i, events, info = await start(alice, repo)
    assert setup_ran(events) and info["environment"]["source"] == "built"
    await delete(alice, i)


@pytest.mark.tabbi(setup_timeout=5.0)
async def test_a_failing_or_endless_setup_script_fails_the_start_with_its_last_lines(
    api, source_repo, tmp_path
):
    commit_setup(source_repo, "echo 'step one'\n"
                              "echo 'ERROR: no matching distribution for pandsa' >&2\nexit 3\n")
    failing = await api.create(str(source_repo))
    events = await api.wait_state(failing["id"], "error", timeout=180)
    message = events[-1]["data"]["error"]
    assert "exit status 3" in message and "no matching distribution for pandsa" in message, message
    assert "step one" in message

    endless = tmp_path / "endless"
    shutil.copytree(source_repo, endless)
    commit_setup(endless, "echo 'compiling forever'\nsleep 600\n")
    stuck = await api.create(str(endless))
    events = await api.wait_state(stuck["id"], "error", timeout=180)
    message = events[-1]["data"]["error"]
    assert "did not finish within 5 s" in message and "compiling forever" in message, message


SCAN = r"""#!/bin/bash
# The attacker: everything this script can reach, written where the test reads it.
mkdir -p .tabbi-env
{
  echo "== env"; env
  for p in /proc/[0-9]*; do
    echo "== $p"; tr '\0' '\n' < "$p/environ"; tr '\0' ' ' < "$p/cmdline"; echo
  done
  echo "== parent memory"; head -c 4096 "/proc/$PPID/mem" | strings
  echo "== home"; find "$HOME" -type f -exec cat {} + 2>&1 | strings
  echo "== git"; cat .git/config; git config --list --show-origin
} > .tabbi-env/seen 2>&1
exit 0
"""


async def test_the_setup_script_gets_no_secret(api, jp_fetch, github, source_repo, workspace,  # noqa: F811
                                               tabbi_app, tabbi_config):  # noqa: F811
    commit_setup(source_repo, SCAN)
    git("push", "--quiet", str(github.root / "octo" / "sample.git"), "main", cwd=source_repo)
    await sign_in_web(api, jp_fetch, github)
    sid, events, info = await start(api, "octo/sample")
    assert setup_ran(events)
    seen = (workspace(sid) / ".tabbi-env" / "seen").read_text(errors="replace")
    assert "XDG_CONFIG_HOME=" in seen and "== /proc/" in seen  # the scan ran and read its own environ
    tokens = [t["access_token"] for t in github.issued] + [t.get("refresh_token") for t in github.issued]
    password = tabbi_app.manager._agents[sid]._sandbox.endpoint().password
    secrets_ = [*filter(None, tokens), github.client_secret, tabbi_config["encryption_key"], password]
    assert tokens and all(secret not in seen for secret in secrets_)

    # The next session starts warm and syncs the private repository with the person's token,
    # which still never lands in the workspace.
    warm, _, info = await start(api, "octo/sample")
    assert info["environment"]["source"] == "warm"
    await synced(api, warm)
    await delete(api, sid, warm)


class GatedRemote(GitHTTPRemote):
    """A remote whose fetches wait while ``gate`` is clear: a slow network, held as long as the
    test needs and released on a condition (never a sleep)."""

    def __init__(self, root: Path):
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()
        super().__init__(root, token=secrets.token_hex(8), anonymous_read=True)

    def _handler_class(self):
        base, remote = super()._handler_class(), self

        class Gated(base):
            def do_POST(self) -> None:
                if "git-upload-pack" in self.path and not remote.gate.is_set():
                    remote.held.set()
                    remote.gate.wait(300)
                super().do_POST()

        return Gated


async def test_reads_answer_before_the_sync_and_writes_wait_for_it(
    api, llm, source_repo, workspace, tmp_path
):
    commit_setup(source_repo, SETUP)
    remote = GatedRemote(tmp_path / "remote").start()
    try:
        bare = remote.add_bare("sample", source_repo)
        url = remote.url("sample")
        built, _, _ = await start(api, url)
        await delete(api, built)
        moved = commit_change(source_repo, "# sample, moved on\n")
        git("push", "--quiet", str(bare), "main", cwd=source_repo)

        remote.gate.clear()  # the next fetch waits
        sid, _, info = await start(api, url)
        assert info["environment"]["source"] == "warm"
        assert await asyncio.to_thread(remote.held.wait, 120), "the sync never fetched"
        llm.enqueue(Reply(tools=[read("README.md")]), Reply(tools=[write("notes.txt", "written\n")]),
                    Reply(text="done"))
        await api.prompt(sid, "read the README, then write notes.txt")
        events = await api.wait_for(sid, lambda e: e["type"] == "tool" and e["data"]["tool"] == "write")
        # The read has answered (with the snapshot's README) while the fetch is still held; the
        # write has been called but waits.
        read_done = [e for e in events if e["type"] == "tool" and e["data"]["tool"] == "read"
                     and e["data"]["status"] == "completed"]
        assert read_done and "# sample" in read_done[-1]["data"]["output"]
        assert not any(e["type"] == "environment" and e["data"]["status"] == "synced" for e in events)
        assert not (workspace(sid) / "notes.txt").exists()
        assert not any(e["type"] == "permission.asked" for e in events)  # tabbi's, not the person's

        remote.gate.set()
        events += await api.wait_turn(sid, after=events[-1]["seq"])
        order = {(e["type"], e["data"].get("status"), e["data"].get("tool")): e["seq"] for e in events}
        assert order[("tool", "completed", "read")] < order[("environment", "synced", None)]
        assert order[("environment", "synced", None)] < order[("tool", "completed", "write")]
        assert (workspace(sid) / "notes.txt").read_text() == "written\n"
        assert (workspace(sid) / "README.md").read_text() == "# sample, moved on\n"
        assert git("rev-parse", "HEAD", cwd=workspace(sid)) == moved
        await delete(api, sid)
    finally:
        remote.gate.set()
        remote.stop()


@pytest.fixture(params=["local", "modal"])
def kit(request, tmp_path):
    return {"local": local_kit, "modal": modal_kit}[request.param](request, tmp_path / "tabbi-data")


async def test_the_setup_script_runs_in_the_bootstrap_on_every_provider(kit, source_repo):
    commit_setup(source_repo, SETUP)
    spec = make_spec(source_repo)
    spec.environment = {"setup": True, "setup_timeout": 120}
    progress: list[dict] = []

    async def collect(message: dict) -> None:
        progress.append(message)

    sandbox = await kit.provider.create(spec, collect)
    try:
        phases = [m["phase"] for m in progress]
        assert phases.index("branch") < phases.index("setup") < phases.index("setup_done")
        assert phases.index("setup_done") < phases.index("starting_agent")
        assert {"phase": "setup", "line": "installing the demo package"} in progress
        assert (await shell(sandbox, "cat .tabbi-env/runs")) == "run\n"
    finally:
        await sandbox.terminate()
        await kit.provider.destroy(spec.sandbox_id)



def test_start_fresh_reaches_the_server_and_status_names_the_snapshot(capsys):
    """``%tabbi start REPO --fresh`` asks for a fresh environment; ``%tabbi status`` says which
    warm snapshot the session started from (a client stand-in: no server needed)."""
    from tabbi_kernel.magics import TabbiMagics

    info = {"id": "ses-000000000001", "state": "running", "repo": "/r", "work_branch": "tabbi/1",
            "model": None, "environment": {"source": "warm", "snapshot": "env-abc", "created_at": 0,
                                           "setup_hash": "8d1e0c2b4a6f99", "synced": True}}
    asked: list[bool] = []

    class Session:
        id = info["id"]

        def __init__(self) -> None:
            self.info = info

    class Client:
        def start(self, repo: str, model=None, branch=None, fresh: bool = False) -> Session:
            asked.append(fresh)
            return Session()

        def session(self, session_id: str) -> Session:
            return Session()

    magics = TabbiMagics(None, client_factory=Client)
    magics.cmd_start(["/r", "--fresh", "--no-wait"])
    magics.cmd_start(["/r", "--no-wait"])
    magics.cmd_status([])
    assert asked == [True, False]
    assert ("environment: warm snapshot env-abc from 1970-01-01 00:00 UTC, setup.sh 8d1e0c2b4a6f, "
            "in sync with the base branch") in capsys.readouterr().out
