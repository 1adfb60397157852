"""Sandbox isolation under bubblewrap, proven with a model that tries to read what it must not.

Threat: the agent runs model-chosen commands as the person's own user. A prompt-injected or
confused model could read SSH keys or cloud credentials from the real HOME, or the Jupyter server's
token from its runtime dir, and leak them into the conversation. Under bubblewrap neither exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.llm import Reply, bash, read, write

SECRET = "tabbi-planted-secret-8c1f"


# OpenCode's own guard would ask before touching paths outside the workspace; allow it, so that
# bubblewrap is the only fence under test.
@pytest.mark.tabbi(permissions={"edit": "allow", "bash": "allow", "read": "allow",
                                "external_directory": "allow"})
@pytest.mark.parametrize("isolation", ["bwrap"])
async def test_agent_cannot_read_real_home_or_jupyter_runtime_dir(api, llm, source_repo, isolation,
                                                                  jp_runtime_dir, workspace, data_dir):
    home_file = Path(os.environ["HOME"]) / "secret.txt"
    runtime_file = Path(jp_runtime_dir) / "secret.txt"
    other_sandbox = data_dir / "sandboxes" / "ses-0123456789ab" / "workspace" / "secret.txt"
    other_sandbox.parent.mkdir(parents=True)
    for path in (home_file, runtime_file, other_sandbox):
        path.write_text(SECRET)
    # The planted files are readable to the server process itself: the fence is the sandbox.
    assert home_file.read_text() == SECRET

    session = await api.create(str(source_repo))
    sid = session["id"]
    await api.wait_state(sid, "running")
    llm.enqueue(
        Reply(tools=[read(str(home_file))]),
        Reply(tools=[read(str(runtime_file))]),
        Reply(tools=[bash(f"cat {home_file} {runtime_file} {other_sandbox}; "
                          f"test -e /proc/{os.getpid()} && echo SERVER-VISIBLE || echo SERVER-HIDDEN")]),
        Reply(tools=[write("inside.txt", "the workspace is writable\n")]),
        Reply(text="done"),
    )
    await api.prompt(sid, "read the secrets")
    events = await api.wait_turn(sid, timeout=120)

    tools = [e["data"] for e in events if e["type"] == "tool" and e["data"]["status"] in
             ("completed", "error")]
    assert [t["tool"] for t in tools] == ["read", "read", "bash", "write"]
    everything = repr(events)
    assert SECRET not in everything
    assert tools[0]["status"] == "error" and tools[1]["status"] == "error"
    shell = tools[2]["output"] or ""
    assert shell.count("No such file") == 3
    # Its own PID namespace: the Jupyter server's process (this test process) does not exist there.
    assert "SERVER-HIDDEN" in shell
    assert (workspace(sid) / "inside.txt").exists()
    health = await api.ok("GET", "tabbi/api/health")
    assert health["sandbox"]["isolation"] == "bwrap"
