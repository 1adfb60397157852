"""The agent attacks the snapshot, restore and log paths of the server (issue 9, items 1, 2, 3, 7).

The agent has a shell in a folder the server once opened, followed and archived by path. Each test
is one way it used that to reach the server user's files, or to freeze or mislead the server; the
fix is structural: snapshots are made and unpacked inside the sandbox (where nothing of the server
is visible) by walking without following links, and the server keeps its logs in its own folder.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tabbi_sandbox import processes
from tests.support.llm import Reply, bash
from tests.support.snapshots import archive_bytes
from tests.test_lifecycle import snapshot_files
from tests.test_provider_contract import (
    MANIFEST_SCRIPT,
    WORKSPACE_SCRIPT,
    comparable,
    local_kit,
    make_spec,
    shell,
    start,
)
from tests.test_sessions import running_session

pytestmark = pytest.mark.timeout(400)

SECRET = f"server-only-{secrets.token_hex(8)}"


def hidden(script: str) -> str:
    """The command as an attacker sends it: nothing readable for a reviewer or a filter."""
    return f"echo {base64.b64encode(script.encode()).decode()} | base64 -d | sh"


def archive_text(path: Path) -> bytes:
    return gzip.decompress(archive_bytes(path))


#: Flips the agent's database between its real file and a link to the server's database, as fast
#: as it can, until told to stop; then puts the real file back.
FLIPPER = r"""
import os, sys
server, stop = sys.argv[1], sys.argv[2]
d = os.path.join(os.environ["HOME"], ".local/share/opencode")
db, keep, f, l = (os.path.join(d, name) for name in ("opencode.db", "real.db", "f.tmp", "l.tmp"))
os.link(db, keep)
flips = 0
while not os.path.exists(stop):
    for _ in range(500):
        os.symlink(server, l); os.rename(l, db)  # now a link to the server's database
        os.link(keep, f); os.rename(f, db)  # now the real file again
    flips += 500
print(flips)
"""


RACE_SECONDS = 40


async def test_database_flipped_to_a_link_never_archives_the_servers(request, tmp_path, source_repo):
    """Threat (item 1): the server checked that opencode.db is no link, then opened it by path.
    The agent flips it between a file and a link to <data_dir>/tabbi.sqlite3 while snapshots
    run; one that wins the race archives every user's sessions into the agent's snapshot."""
    kit = local_kit(request, tmp_path / "tabbi-data")
    server_db = tmp_path / "tabbi-data" / "tabbi.sqlite3"
    server_db.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(server_db) as db:
        db.execute("create table sessions (secret text)")
        db.execute("insert into sessions values (?)", (SECRET,))
    spec = make_spec(source_repo)
    sandbox, _ = await start(kit, spec)
    stop = Path(sandbox.workspace_path) / "stop-flipping"
    flipper = asyncio.ensure_future(
        sandbox.exec(["python3", "-c", FLIPPER, str(server_db), str(stop)], timeout=300))
    saved, failed = [], 0
    # The race is narrow and this machine is loaded: on the old code about one snapshot in 160
    # lost it (measured: 3 of 482 in 40 s), so snapshots are taken back to back for a while.
    deadline = time.monotonic() + RACE_SECONDS
    try:
        while time.monotonic() < deadline:
            try:
                ref, _ = await kit.provider.snapshot(sandbox, f"race-{len(saved) + failed}")
                saved.append(ref)
            except Exception:  # a snapshot that meets the link may fail: the agent's own loss
                failed += 1
    finally:
        stop.write_text("")
        done = await flipper
        await sandbox.terminate()
    assert done.returncode == 0 and int(done.stdout) > 0, done.stderr  # it really flipped
    leaked = [ref["name"] for ref in saved if SECRET.encode() in archive_text(kit.provider._archive(ref))]
    assert not leaked, f"{len(leaked)} of {len(saved)} snapshots hold the server's database"
    assert saved, f"every snapshot failed ({failed})"


async def test_fifo_or_link_at_the_old_log_location_neither_blocks_nor_is_written(request, tmp_path,
                                                                                 source_repo):
    """Threat (item 3): the server opened <sandbox>/bootstrap.log by path, in a folder the agent
    writes. A FIFO there froze the whole Jupyter server (the open blocks its event loop until
    someone reads); a link made it append to any file the server user can write."""
    kit = local_kit(request, tmp_path / "tabbi-data")
    outside = tmp_path / "outside" / "written-by-the-server.txt"
    outside.parent.mkdir()
    spec = make_spec(source_repo)
    sandbox, _ = await start(kit, spec)
    try:
        await shell(sandbox, hidden(f"""cd "$(dirname "$PWD")"
            rm -f bootstrap.log; mkfifo bootstrap.log
            mkdir -p logs; ln -s {outside} logs/{spec.sandbox_id}.log"""))
    finally:
        await sandbox.terminate()  # a fault: the next start reuses the folder as the agent left it
    fifo = kit.provider.sandbox_root(spec.sandbox_id) / "bootstrap.log"

    restarted, blocked = threading.Event(), []

    def unblock_after_a_deadline() -> None:
        if not restarted.wait(60):  # the server is frozen: open the FIFO's other end to free it
            blocked.append(True)
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))

    watchdog = threading.Thread(target=unblock_after_a_deadline, daemon=True)
    watchdog.start()
    try:
        again, _ = await start(kit, spec)
        await again.terminate()
    finally:
        restarted.set()
        watchdog.join()
    assert not blocked, "the server blocked on the FIFO"
    assert not outside.exists()
    assert (tmp_path / "tabbi-data" / "logs" / f"{spec.sandbox_id}.log").is_file()  # its own folder


@pytest.mark.tabbi(permissions={"edit": "allow", "bash": "allow", "read": "allow",
                                "external_directory": "allow"})
@pytest.mark.parametrize("isolation", ["bwrap"])
async def test_symlinked_parent_folder_is_never_archived(api, llm, source_repo, data_dir, tmp_path,
                                                         isolation):
    """Threat (item 2): only the last component was checked. The agent replaces
    ~/.local/share with a link to the server user's own ~/.local/share (their OpenCode
    auth.json): the pause archives it, the resume unpacks it into the sandbox, the agent reads it."""
    server_share = tmp_path / "server-user-share"
    (server_share / "opencode").mkdir(parents=True)
    (server_share / "opencode" / "auth.json").write_text(json.dumps({"openai": {"key": SECRET}}))
    sid = await running_session(api, source_repo)
    attack = hidden(f"cd ~/.local && mv share share.moved && ln -s {server_share} share")
    llm.enqueue(Reply(tools=[bash(attack)]), Reply(text="done"))
    await api.prompt(sid, "tidy up")
    await api.wait_turn(sid)
    await api.ok("POST", f"tabbi/api/sessions/{sid}/pause")
    for archive in snapshot_files(data_dir, sid):
        assert SECRET.encode() not in archive_text(archive), archive.name

    last = (await api.events(sid))["last_seq"]
    llm.enqueue(Reply(tools=[bash(hidden("cat ~/.local/share/opencode/auth.json; ls -la ~/.local/share"))]),
                Reply(text="done"))
    await api.prompt(sid, "look")
    events = await api.wait_turn(sid, after=last, timeout=180)
    assert SECRET not in repr(events)
    assert (server_share / "opencode" / "auth.json").is_file()  # and nothing of the server's changed


def host_manifest(folder: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", MANIFEST_SCRIPT], cwd=folder, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.parametrize("isolation", ["bwrap"])
async def test_venv_and_every_link_kind_round_trip_through_pause_and_resume(api, llm, source_repo,
                                                                          workspace, isolation):
    """Item 7: a venv (absolute links) made the restore fail half way and the next prompt ran on a
    workspace missing its files. Pause and resume must give back the same workspace, byte for
    byte, link for link, mode for mode (less the FIFO and the stale git lock)."""
    sid = await running_session(api, source_repo)
    llm.enqueue(Reply(tools=[bash(WORKSPACE_SCRIPT)]), Reply(text="made"))
    await api.prompt(sid, "set up the project")
    await api.wait_turn(sid)
    before = host_manifest(workspace(sid))
    await api.ok("POST", f"tabbi/api/sessions/{sid}/pause")
    assert processes.sandbox_pids(sid) == [] and not workspace(sid).exists()

    resumed = await api.ok("POST", f"tabbi/api/sessions/{sid}/resume", expect=202)
    await api.wait_state(sid, "running", after=resumed["last_seq"], timeout=180)
    after = host_manifest(workspace(sid))
    left_out = {"./a-fifo", "./.git/index.lock"}
    assert left_out <= before.keys()
    assert comparable(after) == comparable({p: e for p, e in before.items() if p not in left_out})
    assert after["./.venv/bin/python"]["type"] == "link"
    assert after["./absolute-link.csv"]["target"] == str(workspace(sid) / "data" / "small.csv")
    assert after["./data/hardlink.csv"]["group"] == after["./data/small.csv"]["group"]
    assert after["./locked"]["mode"] == "0o555" and after["./readonly.txt"]["mode"] == "0o444"

