"""The smart-HTTP git remote fixture, and sessions cloning from a git URL.

The fixture must refuse what GitHub refuses (no token, wrong token), or tests built on it (clone
and push through a one-shot credential) would prove nothing.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import git
from tests.support.git_remote import GitHTTPRemote

TOKEN = "test-token-0123456789"


@pytest.fixture
def remote(tmp_path, source_repo):
    root = tmp_path / "remote"
    root.mkdir()
    server = GitHTTPRemote(root, TOKEN).start()
    server.add_bare("sample", source_repo)
    yield server
    server.stop()


def clone(url, dest, askpass_token=None):
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1"}
    if askpass_token is not None:
        helper = dest.parent / "askpass.sh"
        helper.write_text(f"#!/bin/sh\ncase \"$1\" in Username*) echo x-access-token;; "
                          f"*) echo {askpass_token};; esac\n")
        helper.chmod(0o700)
        env["GIT_ASKPASS"] = str(helper)
    return subprocess.run(["git", "clone", "--quiet", url, str(dest)], env=env,
                          capture_output=True, text=True, timeout=60)


def test_token_auth_is_enforced(remote, tmp_path):
    assert clone(remote.url("sample"), tmp_path / "anon").returncode != 0
    assert clone(remote.url("sample"), tmp_path / "wrong", askpass_token="nope").returncode != 0
    ok = clone(remote.url("sample"), tmp_path / "good", askpass_token=TOKEN)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "good" / "calc.py").exists()
    # and a push with the token lands on the remote
    (tmp_path / "good" / "new.txt").write_text("new\n")
    git("add", "new.txt", cwd=tmp_path / "good")
    git("commit", "-qm", "new", cwd=tmp_path / "good")
    helper = tmp_path / "askpass.sh"
    pushed = subprocess.run(["git", "push", "-q", "origin", "HEAD:refs/heads/pushed"],
                            cwd=tmp_path / "good", capture_output=True, text=True, timeout=60,
                            env={**os.environ, "GIT_ASKPASS": str(helper), "GIT_TERMINAL_PROMPT": "0"})
    assert pushed.returncode == 0, pushed.stderr
    assert "new" in git("log", "--oneline", "pushed", cwd=remote.root / "sample.git")


async def test_session_clones_from_a_git_url(api, remote, workspace):
    remote.anonymous_read = True  # a public repository
    session = await api.create(remote.url("sample"))
    await api.wait_state(session["id"], "running")
    ws = workspace(session["id"])
    assert (ws / "calc.py").exists()
    assert git("branch", "--show-current", cwd=ws) == session["work_branch"]
    assert any(method == "GET" and "info/refs" in path for method, path, _ in remote.requests)


async def test_session_on_a_private_url_without_credentials_fails_readably(api, remote):
    session = await api.create(remote.url("sample"))
    events = await api.wait_for(
        session["id"], lambda e: e["type"] == "session.status" and e["data"]["state"] == "error"
    )
    assert "git clone failed" in events[-1]["data"]["error"]
