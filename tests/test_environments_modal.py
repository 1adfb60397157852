"""Warm snapshots on Modal (``extension/environments.py``, ``tabbi_sandbox.modal_push.fetch_base``):
a repository with a setup script, its first session builds the person's warm snapshot (a Modal
filesystem snapshot), the base branch moves, and the next session starts from the snapshot, reads
at once, and writes only once the workspace is brought up to date with the moved branch.

A Modal ``exec`` shares its container (PID namespace, /tmp) with the agent, so the sync's fetch
with the person's GitHub token runs on the server; the sandbox gets a git bundle of the tip
(``bootstrap.py sync-bundle``). Threats, written as the attacker (the agent, with a shell in the
sandbox, root there as ``agent_user`` is unset in these tests):
- it watches every process it can see (``/proc/*/environ``, ``cmdline``) and every file written
  in the places it can write (/tmp, its home, the workspace, tabbi's folder) for the whole sync,
  hoping to catch the token on its way to a fetch: it never sees it, and no exec tabbi runs in
  the sandbox is given it (argv or stdin);
- it owns what the sandbox's processes print, so the sync's answer is forged (a base commit and
  a setup script id of its choosing): the session's recorded base commit and the warm snapshot's
  fate are decided by the server's own fetch, never by that answer.

Real parts: the Jupyter server, OpenCode, git, the real ``modal`` client against the loopback
stand-in of Modal's API, the GitHub stand-in; the model is the scripted one. Waits are on
conditions with deadlines.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tabbi_sandbox import modal_push
from tabbi_sandbox.modal import ModalSandbox
from tabbi_sandbox.provider import ExecResult, SandboxError
from tests.conftest import git
from tests.support.git_remote import GitHTTPRemote
from tests.support.llm import Reply, read, write
from tests.test_checkout import jp_server_config, provider  # noqa: F401  (fixtures used here)
from tests.test_github import github, sign_in_web, tabbi_config  # noqa: F401  (fixtures used here)
from tests.test_provider_contract import modal_world, shell  # noqa: F401  (the module's stand-in)
from tests.test_setup_script import SETUP, commit_change, commit_setup, delete, setup_ran, start

pytestmark = pytest.mark.timeout(600)

#: The attacker's watch: every process's environment and command line, and every file written
#: since it started in the places it can write, until told to stop (then once more).
WATCH = r"""
mkdir -p /tmp/watch && touch /tmp/watch/started && echo watching
scan() {
  for p in /proc/[0-9]*; do
    tr '\0' '\n' < "$p/environ" 2>/dev/null; tr '\0' ' ' < "$p/cmdline" 2>/dev/null; echo
  done
  find /tmp /var/tmp "$HOME" /workspace /opt/tabbi -xdev -type f -newer /tmp/watch/started \
    -not -path '/tmp/watch/*' -print 2>/dev/null | while IFS= read -r f; do echo "== $f"; cat "$f"; done
}
while [ ! -e /tmp/watch/stop ]; do scan >> /tmp/watch/seen 2>&1; done
scan >> /tmp/watch/seen 2>&1
echo stopped
"""


@pytest.mark.parametrize("provider", ["modal"], indirect=True)
async def test_a_modal_session_starts_from_the_warm_snapshot_and_the_token_stays_out(
        provider, api, jp_fetch, github, modal_world, llm, source_repo, tabbi_app,  # noqa: F811
        monkeypatch):
    commit_setup(source_repo, SETUP)
    bare = github.root / "octo" / "sample.git"
    git("push", "--quiet", str(bare), "main", cwd=source_repo)
    modal_world.standin.allow_internet(int(github.base_url.rsplit(":", 1)[1]))  # the cold clone
    await sign_in_web(api, jp_fetch, github)

    # The first session clones with the token (the bootstrap, before the agent runs), runs the
    # setup script and keeps the sandbox as the person's warm snapshot.
    built, events, info = await start(api, "octo/sample")
    assert setup_ran(events) and info["environment"]["source"] == "built", info["environment"]
    first = info["environment"]["commit"]
    await delete(api, built)
    moved = commit_change(source_repo, "# sample, moved on\n")
    git("push", "--quiet", str(bare), "main", cwd=source_repo)

    # The sandbox's part of the sync waits until the attacker watches; everything tabbi hands
    # the sandbox is recorded; the sandbox's answer to the sync is forged.
    gate, syncing = asyncio.Event(), asyncio.Event()
    real_exec = ModalSandbox.exec
    handed: list[bytes] = []
    forged = {"base_commit": "f" * 40, "previous": "e" * 40, "setup_hash": "d" * 40}

    async def recording_exec(self, argv, timeout=60, input=None, write_remote=False, max_output=None):
        handed.append(json.dumps(argv).encode() + (input or b""))
        if any(word in argv for word in ("sync", "sync-bundle")):
            syncing.set()
            await asyncio.wait_for(gate.wait(), 120)
        done = await real_exec(self, argv, timeout, input, write_remote, max_output)
        if "sync-bundle" in argv:
            done = ExecResult(done.returncode, done.stdout + json.dumps(forged) + "\n", done.stderr)
        return done

    monkeypatch.setattr(ModalSandbox, "exec", recording_exec)

    sid, events, info = await start(api, "octo/sample")
    assert not setup_ran(events)
    assert info["environment"]["source"] == "warm" and info["environment"]["commit"] == first
    sandbox = tabbi_app.manager._agents[sid]._sandbox
    await asyncio.wait_for(syncing.wait(), 120)
    watcher = await sandbox.start_process(["bash", "-c", WATCH], timeout=300)
    said = aiter(watcher.stdout)
    assert b"watching" in await anext(said)

    # Reads answer at once; the write waits for the sync.
    llm.enqueue(Reply(tools=[read("README.md")]), Reply(tools=[write("notes.txt", "written\n")]),
                Reply(text="done"))
    await api.prompt(sid, "read the README, then write notes.txt")
    events = await api.wait_for(sid, lambda e: e["type"] == "tool" and e["data"]["tool"] == "write")
    assert (await shell(sandbox, "ls notes.txt 2>/dev/null || echo absent")).strip() == "absent"
    gate.set()
    events = await api.wait_turn(sid, timeout=180)
    order = {(e["type"], e["data"].get("status"), e["data"].get("tool")): e["seq"] for e in events}
    assert order[("tool", "completed", "read")] < order[("environment", "synced", None)]
    assert order[("environment", "synced", None)] < order[("tool", "completed", "write")]
    assert (await shell(sandbox, "cat notes.txt")) == "written\n"
    assert (await shell(sandbox, "cat README.md")) == "# sample, moved on\n"
    assert (await shell(sandbox, "git rev-parse HEAD")).strip() == moved

    # The forged answer moved nothing: the server's own fetch decided the base commit, and the
    # setup script (unchanged) did not run again.
    described = await api.ok("GET", f"tabbi/api/sessions/{sid}")
    assert described["base_commit"] == moved and described["environment"]["commit"] == moved
    assert described["environment"]["setup_hash"] != forged["setup_hash"]
    assert not any(e["type"] == "environment" and e["data"]["status"] == "setup" for e in events)

    # The attacker saw the whole sync and never the token; nor did tabbi hand it in.
    await shell(sandbox, "touch /tmp/watch/stop")
    rest = b"".join([chunk async for chunk in said])
    assert b"stopped" in rest  # it watched from before the fetch to after the sync
    seen = await shell(sandbox, "sort -u /tmp/watch/seen")
    assert "TABBI_SANDBOX_ID=" in seen and "opencode" in seen  # it read the processes' environ
    tokens = [t for i in github.issued for t in (i["access_token"], i.get("refresh_token")) if t]
    assert tokens and [t for t in tokens if t in seen] == []
    assert [t for t in tokens if any(t.encode() in h for h in handed)] == []
    assert any(b"sync-bundle" in h for h in handed)
    await delete(api, sid)


def test_the_server_fetches_the_base_branch_and_bundles_only_what_the_sandbox_lacks(source_repo, tmp_path):
    """``fetch_base`` with a token the remote requires: the tip and the setup script's id come
    from the server's own fetch; the bundle is thin against the warm commit when that is an
    ancestor, whole when the branch was rewritten, empty when nothing moved."""
    token = "ghs_warmsyncfetchtoken0123456789"  # fake: the test remote's own token
    warm = commit_setup(source_repo, SETUP)
    remote = GitHTTPRemote(tmp_path / "remote", token).start()
    try:
        bare = remote.add_bare("o/r", source_repo)
        credential = {"username": "x-access-token", "password": token}
        with pytest.raises(SandboxError, match="could not be fetched"):
            modal_push.fetch_base(remote.url("o/r"), "main", {**credential, "password": "wrong"}, warm)
        same = modal_push.fetch_base(remote.url("o/r"), "main", credential, warm)
        assert (same.commit, same.bundle) == (warm, b"")
        assert same.setup_hash == git("rev-parse", f"{warm}:.tabbi/setup.sh", cwd=source_repo)

        moved = commit_change(source_repo, "# moved\n")
        git("push", "--quiet", str(bare), "main", cwd=source_repo)
        thin = modal_push.fetch_base(remote.url("o/r"), "main", credential, warm)
        (tmp_path / "thin.bundle").write_bytes(thin.bundle)
        assert thin.commit == moved and thin.thin
        listed = git("bundle", "list-heads", str(tmp_path / "thin.bundle"), cwd=tmp_path)
        assert listed == f"{moved} refs/heads/tabbi-sync"
        assert warm in git("bundle", "verify", str(tmp_path / "thin.bundle"), cwd=source_repo)

        rewritten = modal_push.fetch_base(remote.url("o/r"), "main", credential, "0" * 40)
        assert rewritten.commit == moved and not rewritten.thin
        assert len(rewritten.bundle) > len(thin.bundle)
    finally:
        remote.stop()
