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


@pytest.fixture
def planted_etc_secret():
    """A secret in /etc/jupyter, where a deployment keeps its Jupyter config (tokens, client
    secrets). Planting needs a writable /etc (the server running as root, as in CI)."""
    folder = Path("/etc/jupyter")
    if not os.access("/etc", os.W_OK):
        pytest.skip("/etc is not writable here: cannot plant the secret")
    made = not folder.exists()
    folder.mkdir(exist_ok=True)
    planted = folder / f"tabbi-test-{os.getpid()}.json"
    planted.write_text(f'{{"ServerApp": {{"token": "{SECRET}"}}}}')
    yield planted
    planted.unlink()
    if made:
        folder.rmdir()


@pytest.mark.tabbi(permissions={"edit": "allow", "bash": "allow", "read": "allow",
                                "external_directory": "allow"})
@pytest.mark.parametrize("isolation", ["bwrap"])
async def test_agent_sees_only_what_tools_need_of_etc(api, llm, source_repo, isolation, planted_etc_secret):
    """Threat (issue 9 item 5): /etc was bound whole. With the server as root the agent read
    /etc/shadow; a deployment's /etc/jupyter config (tokens, OAuth client secrets) and package
    managers' credentials (/etc/pip.conf, npmrc) were readable too. The agent tries plainly and
    hidden behind base64; tools it needs (git, python3 with TLS, name lookups) still work."""
    import base64

    probe = (f"for f in /etc/shadow /etc/gshadow {planted_etc_secret} /etc/pip.conf /etc/npmrc; do "
             'test -r "$f" && echo "READABLE $f" || echo "hidden $f"; done; '
             f"cat {planted_etc_secret}; ls /etc/jupyter")
    hidden = f"echo {base64.b64encode(probe.encode()).decode()} | base64 -d | sh"
    tools_work = ("git --version && python3 -c 'import ssl; ssl.create_default_context(); print(\"tls ok\")' "
                  "&& getent hosts localhost && whoami")
    sid = (await api.create(str(source_repo)))["id"]
    await api.wait_state(sid, "running")
    llm.enqueue(Reply(tools=[bash(probe)]), Reply(tools=[bash(hidden)]),
                Reply(tools=[read(str(planted_etc_secret))]), Reply(tools=[bash(tools_work)]),
                Reply(text="done"))
    await api.prompt(sid, "look around /etc")
    events = await api.wait_turn(sid, timeout=120)
    tools = [e["data"] for e in events
             if e["type"] == "tool" and e["data"]["status"] in ("completed", "error")]
    assert [t["tool"] for t in tools] == ["bash", "bash", "read", "bash"]
    assert SECRET not in repr(events)
    for shell in tools[:2]:
        assert "READABLE" not in shell["output"] and shell["output"].count("hidden") == 5
    assert tools[2]["status"] == "error"
    assert "tls ok" in tools[3]["output"] and "localhost" in tools[3]["output"]
