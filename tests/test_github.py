"""GitHub through the real server: sign-in (web and device flows), tokens encrypted and refreshed,
repositories, clone and push through a one-shot credential, pull requests, cells as commits.

GitHub itself is the loopback stand-in ``tests.support.github.FakeGitHub`` (OAuth server, REST
API and git smart HTTP at GitHub Enterprise's paths); everything else is real: the Jupyter
server, OpenCode in its sandbox, git on both ends, SQLite.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import nbformat
import pytest
from cryptography.fernet import Fernet

from tabbi_kernel.client import notebook_cells
from tests.conftest import git
from tests.support.github import FakeGitHub
from tests.support.llm import Reply, write

USER = {"login": "octo", "id": 4242, "name": "Octo Cat"}
NOREPLY = "4242+octo@users.noreply.127.0.0.1"


@pytest.fixture
def github(request, tmp_path: Path, source_repo: Path):
    marker = request.node.get_closest_marker("github")
    server = FakeGitHub(tmp_path / "github", **(marker.kwargs if marker else {})).start()
    server.add_user(USER["login"], USER["id"], USER["name"])
    server.add_repo("octo/sample", source_repo, pushed_at="2026-11-01T00:00:00Z")
    yield server
    server.stop()


@pytest.fixture
def tabbi_config(tabbi_config: dict, github: FakeGitHub) -> dict:
    return {
        **tabbi_config,
        "github_url": github.base_url,  # GitHub Enterprise layout: the API at /api/v3
        "github_client_id": github.client_id,
        "github_client_secret": github.client_secret,
        "encryption_key": Fernet.generate_key().decode(),
    }


async def sign_in_web(api, jp_fetch, github: FakeGitHub) -> dict:
    """The person's path through the web flow: the link, GitHub's consent, the callback."""
    attempt = await api.ok("POST", "tabbi/api/github/login", {"flow": "web"}, expect=201)
    async with httpx.AsyncClient() as browser:
        consent = await browser.get(attempt["url"])  # GitHub "clicks Authorize" for the person
    assert consent.status_code == 302, consent.text
    callback = urlsplit(consent.headers["location"])
    assert callback.path.endswith("/tabbi/github/callback")
    params = {k: v[0] for k, v in parse_qs(callback.query).items()}
    page = await jp_fetch("tabbi", "github", "callback", params=params, raise_error=False)
    assert page.code == 200, page.body
    status = await api.ok("GET", f"tabbi/api/github/login/{attempt['login_id']}")
    assert status["status"] == "done" and status["login"] == "octo"
    return attempt


async def sign_in_device(api, github: FakeGitHub) -> None:
    attempt = await api.ok("POST", "tabbi/api/github/login", {"flow": "device"}, expect=201)
    github.approve_device(attempt["user_code"])
    status = await api.ok("GET", f"tabbi/api/github/login/{attempt['login_id']}", params={"wait": 30})
    assert status["status"] == "done", status


def stored_bytes(data_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in data_dir.glob("tabbi.sqlite3*"))


async def test_web_flow_signs_in_with_state_and_pkce_and_stores_the_token_encrypted(
    api, jp_fetch, jp_base_url, github, data_dir
):
    assert (await api.ok("GET", "tabbi/api/github/user"))["signed_in"] is False
    attempt = await sign_in_web(api, jp_fetch, github)

    authorize = parse_qs(urlsplit(attempt["url"]).query)
    assert authorize["code_challenge_method"] == ["S256"] and len(authorize["code_challenge"][0]) == 43
    assert len(authorize["state"][0]) >= 20
    # The callback lives under the server's base URL (JupyterHub's /user/<name>/ works the same).
    redirect = urlsplit(authorize["redirect_uri"][0])
    assert redirect.path == jp_base_url.rstrip("/") + "/tabbi/github/callback"
    exchange = [r for r in github.requests if r["path"] == "/login/oauth/access_token"]
    assert exchange and exchange[-1]["form"]["code_verifier"]

    me = await api.ok("GET", "tabbi/api/github/user")
    assert me["signed_in"] and me["login"] == "octo" and "token" not in json.dumps(me)
    # Threat: a stolen database file. The token is in it only as ciphertext.
    token = github.issued[-1]["access_token"]
    assert token.encode() not in stored_bytes(data_dir)
    assert (await api.ok("GET", "tabbi/api/github/repos"))["count"] == 1  # and it works


async def test_callback_with_a_wrong_state_is_refused(api, jp_fetch, github):
    # Threat: login CSRF, a callback carrying someone else's code signs this person in.
    attempt = await api.ok("POST", "tabbi/api/github/login", {"flow": "web"}, expect=201)
    page = await jp_fetch("tabbi", "github", "callback", params={"code": "x", "state": "forged-state-value"},
                          raise_error=False)
    assert page.code == 400
    assert b"not valid" in page.body
    status = await api.ok("GET", f"tabbi/api/github/login/{attempt['login_id']}")
    assert status["status"] == "pending"
    assert (await api.ok("GET", "tabbi/api/github/user"))["signed_in"] is False


@pytest.mark.github(device_interval=1)
async def test_device_flow_waits_while_pending_then_signs_in(api, github):
    attempt = await api.ok("POST", "tabbi/api/github/login", {"flow": "device"}, expect=201)
    assert attempt["user_code"] and attempt["url"].endswith("/login/device")
    pending = await api.ok("GET", f"tabbi/api/github/login/{attempt['login_id']}", params={"wait": 2.5})
    assert pending["status"] == "pending"
    polls = [r for r in github.requests if r.get("form", {}).get("device_code")]
    assert polls, "the server polled GitHub while the person had not approved yet"
    github.approve_device(attempt["user_code"])
    done = await api.ok("GET", f"tabbi/api/github/login/{attempt['login_id']}", params={"wait": 30})
    assert done["status"] == "done" and done["login"] == "octo"


@pytest.mark.github(kind="app", token_lifetime=120, device_interval=1)
async def test_expiring_app_token_is_refreshed_and_a_failed_refresh_asks_to_sign_in(api, github):
    await sign_in_device(api, github)
    first = github.issued[-1]
    assert first["access_token"].startswith("ghu_") and first["refresh_token"].startswith("ghr_")

    # 120 s of life is inside the refresh margin: the next use refreshes, and the rotated refresh
    # token is stored (a second refresh with it succeeds, the old one would be refused).
    assert (await api.ok("GET", "tabbi/api/github/repos"))["count"] == 1
    assert (await api.ok("GET", "tabbi/api/github/repos"))["count"] == 1
    refreshes = [t for t in github.issued if t["grant_type"] == "refresh_token"]
    assert len(refreshes) == 2
    assert first["access_token"] in github.revoked

    github.fail_refresh = True
    code, body = await api.call("GET", "tabbi/api/github/repos")
    assert code == 403 and body["reason"] == "login_required" and "%tabbi login" in body["message"]
    assert (await api.ok("GET", "tabbi/api/github/user"))["signed_in"] is False


async def test_repos_lists_every_page_newest_first_and_filters(api, jp_fetch, github):
    for i in range(230):
        github.add_repo(f"org/project-{i:03d}", pushed_at=f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}T00:00:00Z",
                        description="data pipeline" if i % 50 == 0 else "")
    await sign_in_web(api, jp_fetch, github)
    repos = (await api.ok("GET", "tabbi/api/github/repos"))["repos"]
    assert len(repos) == 231 and len({r["full_name"] for r in repos}) == 231
    assert [r["pushed_at"] for r in repos] == sorted((r["pushed_at"] for r in repos), reverse=True)
    assert repos[0]["full_name"] == "octo/sample"
    pages = {r["query"].get("page") for r in github.requests if r["path"] == "/api/v3/user/repos"}
    assert {"2", "3"} <= pages
    found = (await api.ok("GET", "tabbi/api/github/repos", params={"q": "PIPELINE"}))["repos"]
    assert sorted(r["full_name"] for r in found) == [f"org/project-{i:03d}" for i in (0, 50, 100, 150, 200)]


async def test_private_repo_without_sign_in_fails_readably(api, github):
    session = await api.create("octo/sample")
    events = await api.wait_for(
        session["id"], lambda e: e["type"] == "session.status" and e["data"]["state"] == "error"
    )
    assert "not signed in to GitHub" in events[-1]["data"]["error"]
    assert all(r["auth"] is None for r in github.requests if ".git" in r["path"])


async def test_clone_push_and_pull_request_through_the_token(api, jp_fetch, github, llm, workspace):
    await sign_in_web(api, jp_fetch, github)
    session = await api.create("octo/sample")
    sid, branch = session["id"], session["work_branch"]
    await api.wait_state(sid, "running")
    ws = workspace(sid)
    assert (ws / "calc.py").exists()
    # The clone authenticated, yet the workspace's remote carries no credential.
    assert any(r["auth"] == "basic" and "git-upload-pack" in r["path"] for r in github.requests)
    assert git("remote", "get-url", "origin", cwd=ws) == f"{github.base_url}/octo/sample.git"

    llm.enqueue(Reply(tools=[write("stats.py", "def mean(xs):\n    return sum(xs) / len(xs)\n")]),
                Reply(text="Added stats.py."))
    await api.prompt(sid, "add a mean function")
    await api.wait_turn(sid)

    pushed = await api.ok("POST", f"tabbi/api/sessions/{sid}/push",
                          {"message": "Add mean()", "pr": True})
    bare = github.root / "octo" / "sample.git"
    assert git("rev-parse", branch, cwd=bare) == pushed["commit"]
    author = git("log", "-1", "--format=%an <%ae>|%cn|%s", branch, cwd=bare)
    assert author == f"Octo Cat <{NOREPLY}>|Octo Cat|Add mean()"
    assert "stats.py" in git("show", "--stat", "--format=", branch, cwd=bare)
    pull = github.pulls["octo/sample"][0]
    assert pull["head"]["ref"] == branch and pull["base"]["ref"] == "main" and pull["title"] == "Add mean()"
    assert "add a mean function" in pull["body"] and "`stats.py`" in pull["body"]
    assert pushed["pull_request"] == {"number": pull["number"], "url": pull["html_url"], "created": True}
    assert pushed["links"]["commit"].endswith(f"/octo/sample/commit/{pushed['commit']}")
    assert pushed["links"]["branch"].endswith(f"/octo/sample/tree/{branch}")

    # Pushing again with nothing new reports the open pull request instead of a second one.
    again = await api.ok("POST", f"tabbi/api/sessions/{sid}/push", {"pr": True})
    assert again["committed"] is False and again["pull_request"]["created"] is False
    assert len(github.pulls["octo/sample"]) == 1
    events = (await api.events(sid))["events"]
    assert [e["data"]["commit"] for e in events if e["type"] == "push.completed"] == [pushed["commit"]] * 2


async def test_rejected_push_keeps_the_commit_and_can_be_pushed_again(api, jp_fetch, github, workspace):
    await sign_in_web(api, jp_fetch, github)
    session = await api.create("octo/sample")
    sid, branch = session["id"], session["work_branch"]
    await api.wait_state(sid, "running")
    (workspace(sid) / "notes.md").write_text("the agent's notes\n")
    github.protect_branch("octo/sample", "tabbi/*")

    code, body = await api.call("POST", f"tabbi/api/sessions/{sid}/push", {"message": "notes"})
    assert code == 409 and "protected" in body["message"]
    kept = git("rev-parse", "HEAD", cwd=workspace(sid))
    assert kept[:10] in body["message"]
    assert git("log", "-1", "--format=%s", cwd=workspace(sid)) == "notes"

    bare = github.root / "octo" / "sample.git"
    (bare / "hooks" / "pre-receive").unlink()  # an admin lifts the protection
    pushed = await api.ok("POST", f"tabbi/api/sessions/{sid}/push", {})
    assert pushed["commit"] == kept and pushed["committed"] is False
    assert git("rev-parse", branch, cwd=bare) == kept

    # Someone else pushes to the branch meanwhile: the next push is refused as non-fast-forward.
    theirs = git("commit-tree", f"{kept}^{{tree}}", "-p", kept, "-m", "theirs", cwd=bare)
    git("update-ref", f"refs/heads/{branch}", theirs, cwd=bare)
    (workspace(sid) / "more.md").write_text("more\n")
    code, body = await api.call("POST", f"tabbi/api/sessions/{sid}/push", {"message": "more"})
    assert code == 409 and "non-fast-forward" in body["message"], body
    assert git("log", "-1", "--format=%s", cwd=workspace(sid)) == "more"
    assert git("rev-parse", branch, cwd=bare) == theirs


async def test_tagged_cells_of_a_real_notebook_arrive_as_a_percent_file(
    api, jp_fetch, github, workspace, jp_root_dir
):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Load\nRead the data.", metadata={"tags": ["export"]}),
        nbformat.v4.new_code_cell("%matplotlib inline\nimport math\nx = math.pi",
                                  metadata={"tags": ["export"]}),
        nbformat.v4.new_code_cell("print('scratch')"),
        nbformat.v4.new_code_cell("y = x * 2", metadata={"tags": ["export", "other"]}),
    ]
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="ignored output\n")]
    (jp_root_dir / "work").mkdir()
    nbformat.write(nb, jp_root_dir / "work" / "analysis.ipynb")

    await sign_in_web(api, jp_fetch, github)
    session = await api.create("octo/sample")
    sid, branch = session["id"], session["work_branch"]
    await api.wait_state(sid, "running")
    (workspace(sid) / "agent.txt").write_text("the agent's work\n")

    # The kernel reads the saved notebook and sends its cells (client.notebook_cells).
    sent = notebook_cells(str(jp_root_dir / "work" / "analysis.ipynb"))
    assert "ignored output" not in json.dumps(sent)
    cells = {"notebook": "analysis.ipynb", "cells": sent, "select": "export", "only": True}
    pushed = await api.ok("POST", f"tabbi/api/sessions/{sid}/push", {"cells": cells})
    assert pushed["files"] == ["notebooks/analysis-export.py"]
    bare = github.root / "octo" / "sample.git"
    expected = (
        "# Cells export of analysis.ipynb, pushed by tabbi. Edit them in the notebook.\n\n"
        "# %% [markdown]\n# # Load\n# Read the data.\n\n"
        "# %%\n# %matplotlib inline\nimport math\nx = math.pi\n\n"
        "# %%\ny = x * 2\n"
    )
    assert git("show", f"{branch}:notebooks/analysis-export.py", cwd=bare) + "\n" == expected
    # --cells-only: the agent's uncommitted work stayed out of the commit.
    assert "agent.txt" not in git("ls-tree", "-r", "--name-only", branch, cwd=bare)
    assert git("log", "-1", "--format=%ae", branch, cwd=bare) == NOREPLY

    # Deterministic: the same cells again commit nothing; numbers and ids select too.
    again = await api.ok("POST", f"tabbi/api/sessions/{sid}/push", {"cells": cells})
    assert again["committed"] is False
    by_number = {**cells, "select": "2,4", "to": "src/pipeline.py"}
    more = await api.ok("POST", f"tabbi/api/sessions/{sid}/push", {"cells": by_number})
    pipeline = git("show", f"{more['commit']}:src/pipeline.py", cwd=bare)
    assert pipeline.endswith("x = math.pi\n\n# %%\ny = x * 2")

    for bad, why in (({**cells, "select": "missing"}, "no cell is tagged"),
                     ({**cells, "select": "9"}, "outside"),
                     ({**cells, "to": "../escape.py"}, "without '..'"),
                     ({**cells, "cells": [{"cell_type": "code", "source": 5}]}, "'source' must be text"),
                     ({**cells, "cells": [{"cell_type": "output"}]}, "cell_type is one of"),
                     ({**cells, "cells": [{"cell_type": "code", "tags": "export"}]}, "'tags' must be"),
                     ({**cells, "cells": {"path": "/etc/passwd"}}, "the notebook's cells"),
                     ({**cells, "notebook": "/etc/passwd"}, "saved .ipynb")):
        code, body = await api.call("POST", f"tabbi/api/sessions/{sid}/push", {"cells": bad})
        assert code == 400 and why in body["message"], body


async def test_push_without_github_goes_to_the_local_remote(api, llm, source_repo, workspace):
    """The embedded defaults: a session on a local path pushes its branch back there."""
    session = await api.create(str(source_repo))
    sid, branch = session["id"], session["work_branch"]
    await api.wait_state(sid, "running")
    llm.enqueue(Reply(tools=[write("todo.txt", "ship it\n")]), Reply(text="done"))
    await api.prompt(sid, "write a todo")
    await api.wait_turn(sid)
    pushed = await api.ok("POST", f"tabbi/api/sessions/{sid}/push",
                          {"message": "todo", "author": "Ada Lovelace <ada@example.com>"})
    assert git("log", "-1", "--format=%an <%ae> %s", branch, cwd=source_repo) == \
        "Ada Lovelace <ada@example.com> todo"
    assert git("rev-parse", branch, cwd=source_repo) == pushed["commit"]
    code, body = await api.call("POST", f"tabbi/api/sessions/{sid}/push", {"pr": True})
    assert code == 400 and "GitHub" in body["message"]

    # Not in the middle of a turn: the agent may be writing the files being committed.
    llm.enqueue(Reply(text="slow " * 100, chunks=100, drip=0.1))
    prompt = await api.prompt(sid, "think out loud")
    await api.wait_for(sid, lambda e: e["type"] == "text.delta")
    code, body = await api.call("POST", f"tabbi/api/sessions/{sid}/push", {})
    assert code == 409 and "a turn is running" in body["message"]
    await api.ok("POST", f"tabbi/api/sessions/{sid}/abort")
    assert prompt["prompt_id"]


@pytest.mark.github(device_interval=1)
async def test_device_login_finishes_by_itself_in_the_notebook_and_logout_revokes(kernel, api, github):
    started = await kernel.run("%load_ext tabbi_kernel\n%tabbi login --device")
    assert started.status == "ok", started
    shown = started.displays[0]["text/plain"]
    code = shown.split("enter the code ")[1].split(".")[0]
    assert shown.startswith(f"Open {github.base_url}/login/device")
    github.approve_device(code)
    # The cell has returned already; its output turns into "signed in" by itself.
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        assert asyncio.get_running_loop().time() < deadline, "the login output was never updated"
        try:
            msg = await kernel.client.get_iopub_msg(timeout=5)
        except Exception:  # queue.Empty: nothing yet
            continue
        if msg["msg_type"] == "update_display_data":
            assert msg["content"]["data"]["text/plain"] == "Signed in to GitHub as octo."
            break
    again = await kernel.run("%tabbi login")
    assert "already signed in to GitHub as octo" in again.stdout

    token = github.issued[-1]["access_token"]
    out = await kernel.run("%tabbi logout")
    assert "signed out of GitHub (octo)" in out.stdout and "revoked at GitHub" in out.stdout, out
    assert token in github.revoked
    assert (await api.ok("GET", "tabbi/api/github/user"))["signed_in"] is False
    pushed = await kernel.run("%tabbi repos")
    assert pushed.status == "error" and "Sign in to GitHub first" in pushed.stderr
