"""The server side of a Modal push: a branch bundle the agent made is pushed from a private bare
repository on the server (``tabbi_sandbox.modal_push``), and a local repository is bundled for
upload. No Modal here: these are the parts that run on the server with real git.

Threat: the bundle comes out of the agent's container, so its content is the agent's. It may carry
malformed objects (aimed at git's parsers or at the remote), extra refs (to push more than the
session branch), and the agent wrote whatever git config it liked in its own repository. The push
must take the session branch only, check every object, and run with no configuration of the
agent's (none travels in a bundle) and none of the server user's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import threading
from pathlib import Path

import pytest

from tabbi_sandbox import modal_push
from tabbi_sandbox.provider import SandboxError
from tests.conftest import git
from tests.support.git_remote import GitHTTPRemote

TOKEN = "ghs_modalpushtoken0123456789"  # fake: the test remote's own token, no real account


def bundle_of(repo: Path, *refs: str) -> bytes:
    return subprocess.run(
        ["git", "-C", str(repo), "bundle", "create", "--quiet", "-", *refs], capture_output=True, check=True
    ).stdout


@pytest.fixture
def agent_repo(source_repo: Path, remote: GitHTTPRemote) -> Path:
    """The agent's clone (made after the remote) with work on the session branch and a second
    branch it should not push."""
    git("checkout", "--quiet", "-b", "tabbi/s1", cwd=source_repo)
    (source_repo / "new.py").write_text("print('agent')\n")
    git("add", ".", cwd=source_repo)
    git("commit", "--quiet", "-m", "agent work", cwd=source_repo)
    git("branch", "other", cwd=source_repo)
    return source_repo


@pytest.fixture
def remote(tmp_path: Path, source_repo: Path):
    server = GitHTTPRemote(tmp_path / "remote", TOKEN).start()
    server.add_bare("o/r", source_repo)
    yield server
    server.stop()


def test_the_session_branch_is_pushed_with_the_credential_and_nothing_else(agent_repo, remote, tmp_path):
    head = git("rev-parse", "tabbi/s1", cwd=agent_repo)
    # The agent's bundle carries more refs than asked: only the session branch may leave.
    bundle = bundle_of(agent_repo, "tabbi/s1", "other", "main")
    result = modal_push.push_bundle(
        bundle, "tabbi/s1", remote.url("o/r"), {"username": "x-access-token", "password": TOKEN}
    )
    assert result == {"pushed": True}
    refs = git("ls-remote", str(tmp_path / "remote" / "o" / "r.git"), cwd=tmp_path)
    assert f"{head}\trefs/heads/tabbi/s1" in refs
    assert "refs/heads/other" not in refs


def test_remote_git_work_neither_waits_for_nor_holds_the_default_executor(agent_repo, remote):
    """Threat (availability): a push or a base branch's fetch may take minutes. Run on the event
    loop's default executor (a handful of threads on a small machine), a few of them at once
    would hold up every other blocking call of the server (store writes, files), for everyone;
    and one stuck there would wait behind them. They run in a pool of their own
    (``modal_push.with_remote``, used by ``push_from_bundle`` and the Modal warm sync)."""
    credential = {"username": "x-access-token", "password": TOKEN}

    async def push_while_the_default_executor_is_busy() -> dict:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=1))
        release = threading.Event()
        busy = loop.run_in_executor(None, release.wait)  # its one thread, held
        try:
            return await asyncio.wait_for(modal_push.with_remote(
                modal_push.push_bundle, bundle_of(agent_repo, "tabbi/s1"), "tabbi/s1",
                remote.url("o/r"), credential), 60)
        finally:
            release.set()
            await busy

    assert asyncio.run(push_while_the_default_executor_is_busy()) == {"pushed": True}


def test_a_wrong_token_is_a_permission_refusal(agent_repo, remote):
    result = modal_push.push_bundle(
        bundle_of(agent_repo, "tabbi/s1"),
        "tabbi/s1",
        remote.url("o/r"),
        {"username": "x-access-token", "password": "wrong"},
    )
    assert result["pushed"] is False and result["reason"] == "permission", result


def test_a_bundle_with_a_malformed_object_is_refused_before_any_push(agent_repo, remote, tmp_path):
    """The agent forges a commit git's fsck rejects (a bad author line) on the session branch."""
    tree = git("rev-parse", "tabbi/s1^{tree}", cwd=agent_repo)
    forged = (
        subprocess.run(
            ["git", "-C", str(agent_repo), "hash-object", "-t", "commit", "-w", "--literally", "--stdin"],
            input=f"tree {tree}\nauthor no email here\ncommitter x <x@y> 1 +0000\n\nforged\n".encode(),
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .strip()
    )
    git("update-ref", "refs/heads/tabbi/s1", forged, cwd=agent_repo)
    result = modal_push.push_bundle(
        bundle_of(agent_repo, "tabbi/s1"),
        "tabbi/s1",
        remote.url("o/r"),
        {"username": "x-access-token", "password": TOKEN},
    )
    assert result["pushed"] is False and "malformed git objects" in result["error"], result
    assert "missingEmail" in result["error"] or "email" in result["error"], result
    assert not [r for r in remote.requests if r[0] == "POST" and "receive-pack" in r[1]]


def test_a_bundle_without_the_branch_is_refused(agent_repo, remote):
    result = modal_push.push_bundle(bundle_of(agent_repo, "other"), "tabbi/s1", remote.url("o/r"), None)
    assert result["pushed"] is False and "fetch failed" in result["error"], result


def test_a_local_repository_is_bundled_for_upload(source_repo, tmp_path):
    bundle = modal_push.bundle_local_repository(str(source_repo), 1 << 20)
    (tmp_path / "b.bundle").write_bytes(bundle)
    clone = tmp_path / "clone"
    git("clone", "--quiet", str(tmp_path / "b.bundle"), str(clone), cwd=tmp_path)
    assert (clone / "calc.py").read_text() == (source_repo / "calc.py").read_text()
    with pytest.raises(SandboxError, match="larger than 0 MB"):
        modal_push.bundle_local_repository(str(source_repo), 10)
