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
import tarfile
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import nbformat
import pytest

from tests.support.llm import Reply, write
from tests.test_github import USER, github, tabbi_config  # noqa: F401  (fixtures used here)
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
            if path.name.endswith(".tar.gz"):
                with tarfile.open(path) as archive:
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
        snapshots = list((data_dir / "snapshots").rglob("*.tar.gz"))
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
