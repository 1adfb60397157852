"""``%tabbi checkout`` end to end: a real server, a real kernel, real OpenCode turns (the scripted
model), real git, on the local provider and on the Modal provider (the real ``modal`` client and
the loopback stand-in of Modal's API). The agent writes a module, the kernel's working copy gets
it and imports it; the next turn changes it, the working copy follows in the background and
autoreload sees the change.

The kernel only has its Jupyter token: the server fetches from the sandbox (an exec inside it) and
answers ``GET .../bundle`` for the session's owner only.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator

import pytest

from tabbi_extension import bundle, opencode
from tests.support.api import Api
from tests.support.identity import headers
from tests.support.llm import Reply, bash, write
from tests.test_kernel import start
from tests.test_provider_contract import modal_world as modal_world  # the fixture

pytestmark = pytest.mark.timeout(420)

MODULE_V1 = "def value():\n    return 1\n"
MODULE_V2 = "def value():\n    return 2\n"


@pytest.fixture(params=["local", "modal"])
def provider(request) -> Iterator[str]:
    if request.param == "local":
        yield "local"
        return
    # Its environment points the server's client at it (and trusts its tunnels' CA: the
    # process's one TLS context for OpenCode clients is made anew with it); its sandboxes reach
    # the model through this server's gateway, on the server's port.
    request.getfixturevalue("modal_world").standin.allow_internet(request.getfixturevalue("jp_http_port"))
    opencode._tls.cache_clear()
    yield "modal"
    opencode._tls.cache_clear()


@pytest.fixture
def jp_server_config(jp_server_config: dict, provider: str) -> dict:
    config = copy.deepcopy(jp_server_config)
    if provider == "modal":
        config["TabbiExtension"]["sandbox_provider_class"] = "tabbi_sandbox.modal.ModalProvider"
        config["ModalProvider"] = {"agent_user": "", "allow_private_gateway": True,
                                   "publish_image": False, "start_timeout": 180.0,
                                   "reconcile_interval": 0.0}
    return config


async def ok(kernel, code: str, timeout: float = 180):
    done = await kernel.run(code, timeout=timeout)
    assert done.status == "ok" and not done.stderr, (code, done)
    return done


async def test_the_agents_module_is_importable_and_followed_after_each_turn(
        provider, kernel, llm, source_repo, jp_fetch, tmp_path):
    sid = await start(kernel, source_repo)
    llm.enqueue(Reply(tools=[write("src/agentpkg/__init__.py", ""),
                             write("src/agentpkg/mod.py", MODULE_V1)]), Reply(text="Written."))
    await ok(kernel, "%%tabbi\nwrite agentpkg")

    folder = tmp_path / "copy"
    done = await ok(kernel, f"%tabbi checkout {folder}")
    assert "uncommitted changes" in done.stdout and "src/agentpkg/mod.py" in done.stdout, done.stdout
    assert f"{folder}/src (the src/ layout's folder) is on sys.path" in done.stdout, done.stdout
    assert "%autoreload 2" in done.stdout
    assert (folder / "src/agentpkg/mod.py").read_text() == MODULE_V1
    imported = await ok(kernel, "%load_ext autoreload\n%autoreload 2\n"
                                "import agentpkg.mod\nprint(agentpkg.mod.value())")
    assert imported.stdout.strip() == "1"

    # The next turn changes the module (and commits it): the working copy follows by itself.
    llm.enqueue(Reply(tools=[write("src/agentpkg/mod.py", MODULE_V2),
                             bash("git add -A && git commit -qm 'value 2'")]), Reply(text="Changed."))
    await ok(kernel, "%%tabbi\nmake it 2")
    waited = await ok(kernel, "import tabbi_kernel.checkout as co\n"
                              f"print(co._followers[{sid!r}].wait_for(2, 120))", timeout=150)
    assert waited.stdout.strip().endswith("True"), waited.stdout
    assert (folder / "src/agentpkg/mod.py").read_text() == MODULE_V2
    reloaded = await ok(kernel, "print(agentpkg.mod.value())")  # autoreload, before the cell runs
    assert reloaded.stdout.strip() == "2"
    # What it reported (in whichever cell was running then): the commit, no uncommitted changes.
    state = await ok(kernel, f"f = co._followers[{sid!r}]\nprint(f.last.line(), f.error)")
    assert "working copy updated to tabbi/" in state.stdout, state.stdout
    assert "uncommitted" not in state.stdout
    assert "1 file(s) changed (src/agentpkg/mod.py) None" in state.stdout

    # Threat: another person asks for the bundle of this session (its files, maybe secrets in
    # them): the same 404 as for no session at all.
    bob = Api(jp_fetch, headers("bob"))
    code, _ = await bob.call("GET", f"tabbi/api/sessions/{sid}/bundle")
    assert code == 404

    stopped = await ok(kernel, "%tabbi checkout --off")
    assert f"stopped following {sid}" in stopped.stdout


@pytest.mark.parametrize("provider", ["local"], indirect=True)
async def test_what_the_agent_plants_stays_harmless_in_the_working_copy(
        provider, kernel, llm, source_repo, tmp_path, monkeypatch):
    """Threat: the agent (a shell in the workspace) plants, for the person's kernel: a link to a
    file outside the working copy (read or written through it later), a clean/smudge filter in
    ``.gitattributes`` with its driver, a post-checkout hook and ``core.fsmonitor`` in its own
    repository's config (code run by whichever git touches the files), and a file far too large.
    The working copy gets a plain file for the link, runs nothing, and leaves the large file out
    (named in the update)."""
    monkeypatch.setattr(bundle, "MAX_FILE_BYTES", 1 << 20)  # the server's limit, made small
    sid = await start(kernel, source_repo)
    pwned = tmp_path / "pwned"
    outside = tmp_path / "outside.txt"
    outside.write_text("the person's file\n")
    plant = " && ".join([
        f"ln -s {outside} link.txt",
        "printf '* filter=evil\\n' > .gitattributes",
        f"git config filter.evil.smudge 'touch {pwned}-smudge; cat'",
        f"git config filter.evil.clean 'touch {pwned}-clean; cat'",
        f"git config core.fsmonitor 'touch {pwned}-fsmonitor; false'",
        "mkdir -p .git/hooks",
        f"printf '#!/bin/sh\\ntouch {pwned}-hook\\n' > .git/hooks/post-checkout",
        "chmod +x .git/hooks/post-checkout",
        "head -c 2000000 /dev/zero > big.bin",
    ])
    llm.enqueue(Reply(tools=[bash(plant), write("planted.py", "X = 1\n")]), Reply(text="Planted."))
    await ok(kernel, "%%tabbi\nplant")

    folder = tmp_path / "copy"
    done = await ok(kernel, f"%tabbi checkout {folder} --no-follow")
    assert "left out (too large): big.bin" in done.stdout, done.stdout
    assert (folder / "big.bin").exists() is False
    assert (folder / "planted.py").read_text() == "X = 1\n"
    link = folder / "link.txt"
    assert link.is_file() and not link.is_symlink() and link.read_text() == str(outside)
    assert not (folder / "big.bin").exists()
    assert not list(tmp_path.glob("pwned*")), "something the agent configured ran"
    config = (folder / ".git" / "config").read_text()
    assert "evil" not in config and "fsmonitor = false" in config and "symlinks = false" in config
    assert not (folder / ".git" / "hooks").exists() or not list((folder / ".git" / "hooks").iterdir())
    assert json.loads(json.dumps(outside.read_text())) == "the person's file\n"
    assert sid
