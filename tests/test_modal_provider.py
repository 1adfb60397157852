"""What is particular to ModalProvider, through the real ``modal`` client and the stand-in: the push
that never lets the token into the sandbox, snapshots whose image is gone, re-attaching and
reconciling by tags, and errors a person can act on. (What every provider does is in
test_provider_contract.py, a whole session too.)
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from pathlib import Path

import pytest

from tabbi_sandbox import modal_push
from tabbi_sandbox.binary import PINNED_VERSION
from tabbi_sandbox.provider import RestoreError, SandboxError
from tests.conftest import git
from tests.support.git_remote import GitHTTPRemote
from tests.test_provider_contract import ModalWorld, make_spec, shell
from tests.test_provider_contract import modal_world as modal_world  # the fixture

pytestmark = pytest.mark.timeout(300)

#: An agent that watches everything it can for a token: every process's environment and command
#: line (as fast as it can loop), and every file of the container, until told to stop.
WATCHER = r"""
import base64, os, sys, time
needle, stop = base64.b64decode(sys.argv[1]), sys.argv[2]  # not in its own argv as it is
seen = set()
def scan_procs():
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        for name in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as f:
                    if needle in f.read():
                        seen.add(f"/proc/{pid}/{name}")
            except OSError:
                pass
def scan_files():
    for top in ("/tmp", "/root", "/home", "/workspace", "/opt", "/var/tmp"):
        for folder, _, files in os.walk(top):
            for name in files:
                try:
                    with open(os.path.join(folder, name), "rb") as f:
                        if needle in f.read(1 << 20):
                            seen.add(os.path.join(folder, name))
                except OSError:
                    pass
rounds = 0
while not os.path.exists(stop):
    scan_procs()
    rounds += 1
    if rounds % 20 == 0:
        scan_files()
scan_files()
print("ROUNDS", rounds)
for path in sorted(seen):
    print("SEEN", path)
"""


async def watch(sandbox, needle: str, stop: str) -> asyncio.Task:
    """Start the watcher as the agent would (an exec in the sandbox) and return its task."""
    sandbox_dir = "/tmp/agent-watcher.py"
    await shell(sandbox, f"cat > {sandbox_dir} <<'EOF'\n{WATCHER}\nEOF")
    encoded = base64.b64encode(needle.encode()).decode()
    return asyncio.ensure_future(sandbox.exec(["python3", sandbox_dir, encoded, stop], timeout=200))


async def test_a_sandbox_keeps_its_secrets_and_a_push_never_lets_the_token_in(
    modal_world: ModalWorld, source_repo, tmp_path
):
    """The create call carries the tags, Modal's limits and tabbi's recipe, and no secret: the
    OpenCode password and the clone's credential go on the bootstrap's stdin only, and the agent
    cannot read them in any process.

    Threat (the push): the agent has a shell in the same container as every exec (on Modal an exec
    has no PID namespace or /tmp of its own), and watches /proc and the filesystem while a push
    runs; a token handed to any process in there would be seen. With the bundle route the token
    stays in the server's git process. The positive control proves the watcher would see a secret
    given to an exec the way the local provider's push gets its token."""
    token = "ghs_" + secrets.token_hex(16)
    remote = GitHTTPRemote(tmp_path / "remote", token).start()
    provider = modal_world.provider(
        server_tag="limits",
        timeout=7200,
        idle_timeout=1800,
        apt_packages=["graphviz"],
        pip_packages=["pandas==2.2.3"],
    )
    spec = make_spec(source_repo)
    spec.owner = "alice"
    spec.git_credential = {"username": "x-access-token", "password": "ghs_" + secrets.token_hex(8)}
    spec.max_seconds = 9000
    sandbox = await provider.create(spec, _quiet)
    try:
        request = modal_world.standin.state.create_requests[-1]
        recipe = "\n".join(modal_world.standin.sandboxes[sandbox.modal_id].image.commands)
        # What the agent can read of every process: command lines, environments (OpenCode's holds
        # its password: closed, as it runs from an execute-only binary).
        ps = await shell(
            sandbox, "for p in /proc/[0-9]*; do cat $p/cmdline $p/environ; done 2>/dev/null | tr '\\0' ' '"
        )
        assert "TABBI_SANDBOX_ID" in ps  # the scan reads environments at all
        remote.add_bare("o/r", source_repo)
        await shell(
            sandbox,
            "echo 'print(1)' > work.py && git add work.py && git -c user.name=a "
            "-c user.email=a@b commit -qm work",
        )
        canary = "canary_" + secrets.token_hex(8)
        control = await watch(sandbox, canary, "/tmp/stop-control")
        # The local provider's way: a secret on an exec's stdin, handed to its child's environment.
        await sandbox.exec(["sh", "-c", 'read T; T="$T" sleep 3'], timeout=30, input=canary.encode() + b"\n")
        await shell(sandbox, "touch /tmp/stop-control")
        control_out = (await control).stdout
        assert "SEEN /proc/" in control_out, control_out  # the watcher does see exec'd secrets

        watcher = await watch(sandbox, token, "/tmp/stop-watch")
        result = await modal_push.push_from_bundle(
            sandbox, "tabbi/contract", remote.url("o/r"), {"username": "x-access-token", "password": token}
        )
        await shell(sandbox, "touch /tmp/stop-watch")
        watched = (await watcher).stdout
    finally:
        await sandbox.terminate()
        remote.stop()
    assert result == {"pushed": True}, result
    head = git("rev-parse", "refs/heads/tabbi/contract", cwd=tmp_path / "remote" / "o" / "r.git")
    assert head and "ROUNDS" in watched
    assert "SEEN" not in watched, watched
    # The image is tabbi's recipe: OpenCode at the pinned version, the team's packages.
    assert f"opencode-ai@{PINNED_VERSION}" in recipe and "graphviz" in recipe and "pandas==2.2.3" in recipe
    tags = {t.tag_name: t.tag_value for t in request.tags}
    assert tags == {"tabbi_session": spec.sandbox_id, "tabbi_owner": "alice", "tabbi_server": "limits"}
    assert request.definition.timeout_secs == 9000 + 600  # covers max_lifetime + turn_timeout
    assert request.definition.idle_timeout_secs == 1800
    wire = request.SerializeToString()
    for secret in (spec.password, spec.git_credential["password"]):
        assert secret.encode() not in wire
        assert secret not in ps


async def _quiet(_: dict) -> None:
    return None


async def test_a_missing_snapshot_image_falls_back_to_the_last_good_one(modal_world: ModalWorld, source_repo):
    provider = modal_world.provider()
    spec = make_spec(source_repo)
    sandbox = await provider.create(spec, _quiet)
    try:
        await shell(sandbox, "echo one > kept.txt")
        good, _ = await provider.snapshot(sandbox, "good")
        await shell(sandbox, "echo two > kept.txt")
        newest, _ = await provider.snapshot(sandbox, "newest")
    finally:
        await sandbox.terminate()
    assert newest["fallbacks"] == [good["image_id"]]
    # The newest image expired (Modal's ttl) or was deleted.
    gone = {**newest, "image_id": "im-" + "0" * 22}
    phases: list[dict] = []

    async def progress(message: dict) -> None:
        phases.append(message)

    restored = await provider.create(spec, progress, restore=gone)
    try:
        assert (await shell(restored, "cat kept.txt")).strip() == "one"
    finally:
        await restored.terminate()
    assert {"phase": "restoring_older_snapshot", "image_id": good["image_id"]} in phases
    with pytest.raises(RestoreError, match="gone"):
        await provider.create(spec, _quiet, restore={**gone, "fallbacks": []})


async def test_reattach_by_id_and_reconcile_by_tags(modal_world: ModalWorld, source_repo):
    import modal

    provider = modal_world.provider(server_tag="reconcile-" + secrets.token_hex(4))
    spec = make_spec(source_repo)
    sandbox = await provider.create(spec, _quiet)
    # Another sandbox of this server whose session is not live (a crash mid-start leaves one).
    stray = await modal.Sandbox.create.aio(
        app=await provider.app(),
        image=modal.Image.debian_slim(),  # not the client's cached default (of another stand-in)
        client=modal_world.client,
        timeout=600,
        tags={"tabbi_session": "ses-000000000001", "tabbi_server": provider.server_tag, "tabbi_owner": "x"},
    )
    try:
        state = sandbox.get_state()
        assert "password" not in str(state) and spec.password not in str(state)
        again = await provider.load_state(state, spec.password)
        assert again is not None and again.endpoint().url == sandbox.endpoint().url
        assert (await shell(again, "git branch --show-current")).strip() == "tabbi/contract"
        # Only the sandbox a live session owns stays.
        ended = await provider.reconcile({spec.sandbox_id: state})
        assert ended == 1
        assert modal_world.standin.sandboxes[stray.object_id].running is False
        assert modal_world.standin.sandboxes[sandbox.modal_id].running is True
    finally:
        await sandbox.terminate()
        await stray.terminate.aio()
    assert await provider.load_state(state, spec.password) is None  # gone: nothing to re-attach
    with pytest.raises(SandboxError, match=r"the Modal sandbox is gone .* start the session again"):
        await again.exec(["true"])  # a handle to a sandbox that ended meanwhile


async def test_errors_say_what_to_do(modal_world: ModalWorld, source_repo, monkeypatch):
    import modal

    # A model gateway this server's sandboxes cannot reach.
    spec = make_spec(source_repo)
    spec.opencode_config = {
        "provider": {"p": {"options": {"baseURL": "http://127.0.0.1:8888/tabbi/gateway/x/v1"}}}
    }
    with pytest.raises(SandboxError, match="gateway_url"):
        await modal_world.provider(allow_private_gateway=False).create(spec, _quiet)
    # Credentials Modal refuses.
    env = modal_world.standin.env
    wrong = await modal.Client.from_credentials.aio(env["MODAL_TOKEN_ID"], "as-wrong")
    with pytest.raises(SandboxError, match="MODAL_TOKEN_ID"):
        await modal_world.provider(client=wrong).create(make_spec(source_repo), _quiet)
    # A pinned image that does not exist.
    with pytest.raises(SandboxError, match="image_id"):
        await modal_world.provider(image_id="im-" + "1" * 22).create(make_spec(source_repo), _quiet)


def test_modal_is_imported_only_by_the_provider(tmp_path: Path):
    """The server's default path (the extension, its push) does not import ``modal`` (0.26 s, 46 MB):
    only constructing ModalProvider does. (The kernel side: test_units.)"""
    import subprocess
    import sys

    code = "import sys, tabbi_extension.app, tabbi_extension.push; print('modal' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


async def test_quota_image_build_and_tunnel_failures_say_what_to_do(modal_world: ModalWorld, monkeypatch):
    """The failures the stand-in cannot cause on cue, each through the provider's own path: a quota
    Modal reports, an image build that fails, a tunnel that never answers. Each is a message that
    names what to do, never a gRPC status."""
    import modal

    from tabbi_sandbox import modal_image
    from tabbi_sandbox.bootstrap import free_port
    from tabbi_sandbox.provider import Endpoint

    provider = modal_world.provider(start_timeout=2.0)
    quota = provider.readable(modal.exception.ResourceExhaustedError("Too many sandboxes"), "starting it")
    assert "quota or concurrency limit" in str(quota) and "pause other sessions" in str(quota)
    gone = provider.readable(modal.exception.NotFoundError("Sandbox not found"), "running a command")
    assert "sandbox is gone" in str(gone) and "snapshots are kept" in str(gone)

    class Failing:
        class build:  # the shape of modal.Image.build
            @staticmethod
            async def aio(app):
                raise modal.exception.RemoteError("E: Unable to locate package no-such-package")

    monkeypatch.setattr(modal_image, "build_definition", lambda _modal, _recipe: Failing)
    with pytest.raises(SandboxError, match=r"could not be built.*no-such-package.*apt_packages"):
        await provider.build(modal_image.Recipe.default(["no-such-package"], []))

    closed = free_port()  # nothing listens there: a tunnel that never answers
    with pytest.raises(SandboxError, match=r"did not answer.*modal\.host"):
        await provider.check_tunnel(Endpoint(f"https://127.0.0.1:{closed}", "password"))
