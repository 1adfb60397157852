"""GitHub credentials and unconfined sandboxes (issue 17): checked as GitHub sees it.

The GitHub stand-in and the server's GitHub configuration come from test_github.py.
"""

from __future__ import annotations

import pytest

from tests.conftest import git
from tests.test_github import github, sign_in_web, tabbi_config  # noqa: F401  (fixtures used here)

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("isolation", ["none"])
async def test_github_gets_no_credential_from_an_unconfined_sandbox(
    api, jp_fetch, github, workspace, isolation  # noqa: F811
):
    """Threat: without bubblewrap the agent runs as the person and can read the server's key file
    and any process's environment: a GitHub token handed to such a sandbox is the agent's. So a
    signed-in person's clone goes without it (and fails on a private repository, saying why), and a
    push to GitHub is refused before any credential leaves the server. Breakages caught: the
    refusal of the push removed; the clone credential handed to an unconfined sandbox."""
    await sign_in_web(api, jp_fetch, github)
    session = await api.create("octo/sample")
    sid, branch = session["id"], session["work_branch"]
    failed = await api.wait_for(
        sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "error")
    assert "confined by bubblewrap" in failed[-1]["data"]["error"]

    # A workspace kept from an earlier start lets the session run without cloning.
    bare = github.root / "octo" / "sample.git"
    git("clone", "--quiet", str(bare), str(workspace(sid)), cwd=bare.parent)
    git("checkout", "--quiet", "-b", branch, cwd=workspace(sid))
    await api.prompt(sid, "hello")
    await api.wait_turn(sid, after=failed[-1]["seq"])
    (workspace(sid) / "work.txt").write_text("the work\n")

    code, answer = await api.call("POST", f"tabbi/api/sessions/{sid}/push", {"message": "work"})
    assert code == 409 and "confined by bubblewrap" in answer["message"], answer
    assert branch not in git("branch", "--list", cwd=bare)
    git_calls = [r for r in github.requests if ".git/" in r["path"]]
    assert all(r["auth"] is None for r in git_calls), git_calls
