"""`%tabbi push` against a plain `git commit` + `git push` of the same change from a clone on the
host, both to the same token-protected GitHub stand-in (smart HTTP through `git http-backend`),
measured in this run. Also the sign-in and the repository listing of 1,000 repositories.

tabbi's push is two sandbox processes (commit, then push from a private bare repository, see the
README's security notes) plus the REST round trip; the baseline is what a person would type.

Run: ``.venv/bin/python bench/bench_push.py``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from harness import JupyterProcess, ScriptedLLM, machine, sample_repo

from tests.support.github import FakeGitHub

RUNS = 7


def sign_in(server: JupyterProcess) -> float:
    """The web flow as a browser does it; returns its duration."""
    t0 = time.monotonic()
    attempt = server.call("POST", "tabbi/api/github/login", {"flow": "web"})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    try:
        urllib.request.build_opener(NoRedirect).open(attempt["url"])
    except urllib.error.HTTPError as redirect:
        location = redirect.headers["Location"]
    query = parse_qs(urlsplit(location).query)
    callback = urllib.request.Request(
        f"{server.url}tabbi/github/callback?code={query['code'][0]}&state={query['state'][0]}",
        headers={"Authorization": f"token {server.token}"})
    with urllib.request.urlopen(callback) as page:
        assert b"Signed in" in page.read()
    return time.monotonic() - t0


def baseline_push(github: FakeGitHub, token: str, work: Path, n: int) -> list[float]:
    clone = work / "baseline"
    helper = work / "askpass.sh"
    helper.write_text(f"#!/bin/sh\ncase \"$1\" in Username*) echo x-access-token;; *) echo {token};; esac\n")
    helper.chmod(0o700)
    env = {**os.environ, "GIT_ASKPASS": str(helper), "GIT_TERMINAL_PROMPT": "0", "GIT_AUTHOR_NAME": "b",
           "GIT_AUTHOR_EMAIL": "b@x", "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@x"}
    url = f"{github.base_url}/octo/sample.git"
    subprocess.run(["git", "clone", "-q", url, str(clone)], env=env, check=True)
    subprocess.run(["git", "checkout", "-qb", "baseline"], cwd=clone, env=env, check=True)
    times = []
    for i in range(n):
        (clone / f"change-{i}.txt").write_text(f"change {i}\n")
        t0 = time.monotonic()
        for args in (["add", "-A"], ["commit", "-qm", f"change {i}"], ["push", "-q", "origin", "baseline"]):
            subprocess.run(["git", *args], cwd=clone, env=env, check=True)
        times.append(time.monotonic() - t0)
    return times


def main() -> None:
    llm = ScriptedLLM().start()
    work = Path(tempfile.mkdtemp(prefix="tabbi-bench-push-"))
    github = FakeGitHub(work / "github").start()
    github.add_user("octo", 4242, "Octo Cat")
    github.add_repo("octo/sample", sample_repo(work))
    for i in range(999):
        github.add_repo(f"org/repo-{i:04d}", pushed_at=f"2025-01-01T00:{i // 60:02d}:{i % 60:02d}Z")
    config = work / "server" / "config"
    config.mkdir(parents=True)
    (config / "jupyter_server_config.json").write_text(json.dumps({"TabbiExtension": {
        "github_url": github.base_url, "github_client_id": github.client_id,
        "github_client_secret": github.client_secret}}))
    server = JupyterProcess(llm.url, work / "server")
    try:
        login = sign_in(server)
        t0 = time.monotonic()
        listed = server.call("GET", "tabbi/api/github/repos", timeout=120)["count"]
        listing = time.monotonic() - t0
        sid = server.call("POST", "tabbi/api/sessions", {"repo": "octo/sample"})["id"]
        server.wait_event(sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "running")
        workspace = server.workdir / "tabbi-data" / "sandboxes" / sid / "workspace"
        pushes = []
        for i in range(RUNS):
            (workspace / f"change-{i}.txt").write_text(f"change {i}\n")
            t0 = time.monotonic()
            result = server.call("POST", f"tabbi/api/sessions/{sid}/push", {"message": f"change {i}"},
                                 timeout=120)
            pushes.append(time.monotonic() - t0)
            assert result["committed"]
        baseline = baseline_push(github, github.issued[-1]["access_token"], work, RUNS)
    finally:
        server.stop()
        github.stop()
        llm.stop()
    print(f"machine: {machine()}")
    print(f"sign-in (web flow: authorize, callback, token exchange, /user): {login * 1000:.0f} ms")
    pages = -(-listed // 100)
    print(f"repository listing: {listed} repositories over {pages} pages in {listing * 1000:.0f} ms")
    p, b = statistics.median(pushes), statistics.median(baseline)
    print(f"push of one changed file: tabbi median {p * 1000:.0f} ms, git add+commit+push median "
          f"{b * 1000:.0f} ms (n={RUNS}); ratio tabbi/git {p / b:.2f}")


if __name__ == "__main__":
    main()
