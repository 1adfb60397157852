"""What every sandbox provider must do, run against each of them: the local provider, and the Modal
provider through the real ``modal`` client talking to the loopback stand-in of Modal's API
(``tests/support/modal_standin``), whose sandboxes are bubblewrap containers on this machine.

The promises: ``create`` runs the bootstrap and returns with OpenCode healthy; ``exec`` is confined
(it cannot see the server's files or processes); a snapshot round-trips every workspace a data
scientist makes (a venv, absolute, relative and dangling links, hard links, a big file, read-only
files and folders) byte for byte; a restore is all or nothing (a corrupt or truncated snapshot
leaves nothing in place, its archive untouched, and the session can be started again); and
``terminate`` leaves no process behind.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tabbi_sandbox import processes
from tabbi_sandbox.local import LocalProvider
from tabbi_sandbox.provider import RestoreError, Sandbox, SandboxProvider, SandboxSpec
from tests.support.modal_standin import ModalStandIn
from tests.support.waiting import wait_exited

pytestmark = pytest.mark.timeout(300)


@dataclass
class Kit:
    """A provider under test and what the suite needs to know of it."""

    provider: SandboxProvider
    #: A copy of the snapshot ``ref`` damaged by ``damage(bytes) -> bytes``; returns its ref (None:
    #: the provider's snapshots are not archives tabbi holds).
    damaged_copy: Callable[[dict[str, Any], Callable[[bytes], bytes]], dict[str, Any]] | None = None
    #: The archive bytes of ``ref`` (to prove a failed restore left it untouched).
    archive_bytes: Callable[[dict[str, Any]], bytes] | None = None
    #: What a snapshot leaves out of a workspace (``WORKSPACE_SCRIPT``'s FIFO and git lock).
    left_out: frozenset[str] = frozenset({"./a-fifo", "./.git/index.lock"})


def local_kit(request: pytest.FixtureRequest, data: Path) -> Kit:
    provider = LocalProvider(data / "sandboxes", isolation="bwrap", start_timeout=120)

    def path(ref: dict[str, Any]) -> Path:
        return provider._archive(ref)

    def damaged_copy(ref: dict[str, Any], damage: Callable[[bytes], bytes]) -> dict[str, Any]:
        copy = {**ref, "name": f"{ref['name']}-damaged"}
        path(copy).write_bytes(damage(path(ref).read_bytes()))
        return copy

    return Kit(provider, damaged_copy, lambda ref: path(ref).read_bytes())


@dataclass
class ModalWorld:
    """The stand-in of Modal's API and a client of the real ``modal`` library pointed at it."""

    standin: ModalStandIn
    client: Any

    def provider(self, **options: Any) -> Any:
        from tabbi_sandbox.modal import ModalProvider

        settings = {
            "client": self.client,
            "agent_user": "",  # the stand-in runs no RUN step of the recipe: no user is made
            "allow_private_gateway": True,
            "publish_image": False,
            "start_timeout": 120.0,
            "reconcile_interval": 0.0,
            **options,
        }
        return ModalProvider(**settings)


def modal_standin(**options: Any) -> ModalStandIn:
    """A stand-in whose images hold what tabbi's recipe installs with npm (the stand-in records an
    image's ``RUN`` steps but runs none): the pinned OpenCode binary, bound read-only."""
    from tabbi_sandbox import binary, modal_image, sealed

    # Execute-only, as the recipe installs it (so OpenCode runs non-dumpable there too).
    installed = {modal_image.OPENCODE_BIN: sealed.execute_only(os.path.realpath(binary.find_opencode()))}
    return ModalStandIn(installed=installed, **options)


@contextlib.contextmanager
def modal_environment(standin: ModalStandIn) -> Iterator[dict[str, str]]:
    """This process's environment pointed at ``standin`` (the real client reads it), with the
    tunnels' certificate authority trusted (httpx reads SSL_CERT_FILE); the variables set.
    ``standin.activated()`` drops the client ``modal.Client.from_env()`` cached for another
    module's stand-in, in and out: an in-process server after that module would otherwise talk
    to a stand-in that is gone ("Modal could not be reached")."""
    variables = {**standin.env, "SSL_CERT_FILE": str(standin.ca_file)}
    with pytest.MonkeyPatch.context() as env:
        for name in ("MODAL_PROFILE", "MODAL_ENVIRONMENT"):
            env.delenv(name, raising=False)
        for name, value in variables.items():
            env.setenv(name, value)
        with standin.activated():
            yield variables


@pytest.fixture(scope="module")
def modal_world() -> Iterator[ModalWorld]:
    """One stand-in per module (tests share it; each makes its own sandboxes)."""
    import modal

    with modal_standin() as standin, modal_environment(standin) as env:
        client = modal.Client.from_credentials(env["MODAL_TOKEN_ID"], env["MODAL_TOKEN_SECRET"])
        yield ModalWorld(standin, client)
        standin.check()


def modal_kit(request: pytest.FixtureRequest, data: Path) -> Kit:
    world = request.getfixturevalue("modal_world")
    return Kit(world.provider(), left_out=frozenset({"./.git/index.lock"}))


KITS = {"local": local_kit, "modal": modal_kit}


@pytest.fixture(params=sorted(KITS))
def kit(request, tmp_path) -> Kit:
    return KITS[request.param](request, tmp_path / "tabbi-data")


def make_spec(source_repo: Path, sandbox_id: str | None = None) -> SandboxSpec:
    return SandboxSpec(
        sandbox_id=sandbox_id or f"ses-{secrets.token_hex(6)}",
        repo_url=str(source_repo),
        repo_display=str(source_repo),
        work_branch="tabbi/contract",
        read_only_paths=[str(source_repo)],
    )


async def start(kit: Kit, spec: SandboxSpec, restore: dict | None = None) -> tuple[Sandbox, list[str]]:
    phases: list[str] = []

    async def progress(message: dict) -> None:
        phases.append(message["phase"])

    return await kit.provider.create(spec, progress, restore=restore), phases


async def shell(sandbox: Sandbox, script: str, timeout: float = 120) -> str:
    done = await sandbox.exec(["bash", "-c", script], timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


def healthy(sandbox: Sandbox) -> bool:
    endpoint = sandbox.endpoint()
    token = base64.b64encode(f"opencode:{endpoint.password}".encode()).decode()
    request = urllib.request.Request(
        f"{endpoint.url}/global/health", headers={"Authorization": f"Basic {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read()).get("healthy") is True


async def test_start_runs_the_bootstrap_and_terminate_leaves_no_process(kit, source_repo):
    spec = make_spec(source_repo)
    sandbox, phases = await start(kit, spec)
    try:
        # The bootstrap's phases, in order (a provider may report its own before them).
        assert phases.index("cloning") < phases.index("branch") and phases[-1] == "ready"
        assert sandbox.poll() is None
        assert healthy(sandbox)
        branch = await shell(sandbox, "git branch --show-current")
        assert branch.strip() == "tabbi/contract"
        # OpenCode's project id cache, written by the clone as OpenCode would (its first root
        # commit), so that opening the workspace spawns one git process fewer.
        cached = await shell(sandbox, "cat .git/opencode")
        roots = await shell(sandbox, "git rev-list --max-parents=0 HEAD")
        assert cached == sorted(roots.split())[0]
        assert processes.sandbox_pids(spec.sandbox_id)
    finally:
        await sandbox.terminate()
    await sandbox.terminate()  # idempotent
    wait_exited(lambda: processes.sandbox_pids(spec.sandbox_id), 30, "every sandbox process ending")
    assert sandbox.poll() is not None
    await kit.provider.destroy(spec.sandbox_id)


async def test_exec_cannot_see_the_server(kit, source_repo, tmp_path):
    """Threat: exec runs what the agent's files decide (git config, filters) in the sandbox; it
    must not see the server's database, its home, its processes or system secrets."""
    data = tmp_path / "tabbi-data"
    data.mkdir(parents=True, exist_ok=True)
    server_db = data / "tabbi.sqlite3"
    server_db.write_text("server database")
    home_secret = Path(os.environ["HOME"]) / f"tabbi-contract-{secrets.token_hex(4)}"
    home_secret.write_text("home secret")
    try:
        sandbox, _ = await start(kit, make_spec(source_repo))
        try:
            out = await shell(
                sandbox,
                f"""
                for p in {server_db} {home_secret} /etc/shadow /proc/{os.getpid()}/environ; do
                  test -e "$p" && echo "VISIBLE $p" || echo "hidden $p"; done
                ls {data} 2>/dev/null || echo absent""",
            )
        finally:
            await sandbox.terminate()
    finally:
        home_secret.unlink()
    assert "VISIBLE" not in out, out
    assert out.count("hidden") == 4
    # Of the data folder: only its own folder's path (local), or nothing at all (Modal).
    assert out.splitlines()[-1] in ("sandboxes", "absent")


#: Builds the workspace a data scientist makes: a venv, every kind of link, a big file, read-only
#: files and folders, odd names; plus what a snapshot leaves out (a FIFO, a git lock).
WORKSPACE_SCRIPT = r"""
set -e
python3 -m venv --without-pip .venv
mkdir -p data/raw nested/deeper "odd name é"
head -c 24000000 /dev/urandom > data/raw/big.bin
printf 'x,y\n1,2\n' > data/small.csv
ln data/small.csv data/hardlink.csv
ln data/small.csv nested/deeper/another-hardlink.csv
ln -s "$PWD/data/small.csv" absolute-link.csv
ln -s ../data/raw nested/relative-dir-link
ln -s /nowhere/at/all dangling-link
ln -s "$PWD/.venv" venv-link
echo 'frozen' > readonly.txt && chmod 444 readonly.txt
mkdir locked && echo inside > locked/file.txt && chmod 555 locked
echo '#!/bin/sh' > run.sh && chmod 755 run.sh
echo 'é' > "odd name é/ünïcode.txt"
touch -d '2001-02-03 04:05:06' data/small.csv
mkfifo a-fifo
echo stale > .git/index.lock
"""

#: Prints a manifest of the workspace from inside the sandbox: every path with its type, mode,
#: link target, content digest, mtime (files) and hard-link group; links are never followed.
MANIFEST_SCRIPT = r"""
import hashlib, json, os, stat
groups, out = {}, {}
for top, dirs, files in os.walk(".", followlinks=False):
    for name in dirs + files:
        path = os.path.join(top, name)
        st = os.lstat(path)
        entry = {"mode": oct(stat.S_IMODE(st.st_mode)), "type": stat.S_IFMT(st.st_mode)}
        if stat.S_ISLNK(st.st_mode):
            entry = {"type": "link", "target": os.readlink(path)}
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                entry["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
            entry["mtime"] = int(st.st_mtime)
            if st.st_nlink > 1:
                entry["group"] = groups.setdefault((st.st_dev, st.st_ino), path)
        out[path] = entry
print(json.dumps(out, sort_keys=True))
"""


#: Files OpenCode rewrites whenever it starts (the same content at a new time).
REWRITTEN_AT_START = {"./.git/opencode"}


def comparable(manifest: dict[str, dict]) -> dict[str, dict]:
    return {
        path: {k: v for k, v in entry.items() if not (k == "mtime" and path in REWRITTEN_AT_START)}
        for path, entry in manifest.items()
    }


async def manifest(sandbox: Sandbox) -> dict[str, dict]:
    return json.loads(await shell(sandbox, f"python3 -c '{MANIFEST_SCRIPT}'"))


async def test_a_data_scientists_workspace_round_trips_through_a_snapshot(kit, source_repo):
    spec = make_spec(source_repo)
    sandbox, _ = await start(kit, spec)
    try:
        await shell(sandbox, WORKSPACE_SCRIPT)
        before = await manifest(sandbox)
        ref, size = await kit.provider.snapshot(sandbox, "first")
        assert size > 20_000_000  # the big random file is in it
    finally:
        await sandbox.terminate()
    await kit.provider.destroy(spec.sandbox_id)  # as a pause does: the snapshot is all that is left

    restored, phases = await start(kit, spec, restore=ref)
    try:
        assert "restoring" in phases and "reusing_workspace" in phases
        after = await manifest(restored)
        python = await shell(restored, ".venv/bin/python -c 'import sys; print(sys.prefix)'")
        status = await shell(restored, "git status --porcelain -uno; git branch --show-current")
        assert healthy(restored)
    finally:
        await restored.terminate()
    left_out = kit.left_out
    assert left_out <= before.keys()
    expected = {path: entry for path, entry in before.items() if path not in left_out}
    assert comparable(after) == comparable(expected)
    assert python.strip().endswith("/workspace/.venv")
    assert status.strip() == "tabbi/contract"


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flip_a_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


def cut_before_the_end(data: bytes) -> bytes:
    return data[:-12]  # everything but gzip's trailer (CRC and length) and a little more


async def test_a_damaged_snapshot_restores_nothing_and_can_be_retried(kit, source_repo):
    if kit.damaged_copy is None or kit.archive_bytes is None:
        pytest.skip("this provider's snapshots are not archives tabbi holds (see the Modal tests)")
    spec = make_spec(source_repo)
    sandbox, _ = await start(kit, spec)
    try:
        await shell(sandbox, "head -c 3000000 /dev/urandom > noise.bin; echo mine > mine.txt")
        before = await manifest(sandbox)
        ref, _ = await kit.provider.snapshot(sandbox, "good")
    finally:
        await sandbox.terminate()
    await kit.provider.destroy(spec.sandbox_id)
    good = kit.archive_bytes(ref)

    for damage in (truncate, flip_a_byte, cut_before_the_end):
        bad = kit.damaged_copy(ref, damage)
        damaged = kit.archive_bytes(bad)
        with pytest.raises(RestoreError, match="could not be restored"):
            await start(kit, spec, restore=bad)
        assert processes.sandbox_pids(spec.sandbox_id) == [], damage.__name__
        assert kit.archive_bytes(bad) == damaged and kit.archive_bytes(ref) == good  # untouched
        if isinstance(kit.provider, LocalProvider):  # nothing half-restored, no staging left
            root = kit.provider.sandbox_root(spec.sandbox_id)
            assert not (root / "workspace").exists() and not (root / "home").exists(), damage.__name__
            assert not (root / ".tabbi-restore").exists()

    again, _ = await start(kit, spec, restore=ref)  # a retry with a good snapshot works
    try:
        assert comparable(await manifest(again)) == comparable(before)
    finally:
        await again.terminate()


# -- a whole session, through a real Jupyter server process, on each substrate ------------------------

SERVER_TAG = "tabbi-contract-server"


class LocalSubstrate:
    """Detached local sandboxes (they outlive a crashed server), confined by bubblewrap."""

    def __init__(self, port: int):
        self.env: dict[str, str] = {}
        self.options = ["--TabbiExtension.detach_sandboxes=True", "--TabbiExtension.isolation=bwrap"]

    def alive(self, sid: str) -> bool:
        from tests.test_sessions import opencode_pids

        return bool(opencode_pids(sid))

    def orphan(self) -> Callable[[], bool] | None:
        return None  # a local orphan is found by its marker at load_state (test_lifecycle.py)

    def create_requests(self, sid: str) -> list[Any]:
        return []

    def close(self) -> None:
        pass


class ModalSubstrate:
    """ModalProvider in the server process, its real client pointed at the stand-in, which lets the
    sandboxes reach the server's port (the model gateway)."""

    def __init__(self, port: int):
        import modal

        self._stack = contextlib.ExitStack()
        self.standin = self._stack.enter_context(modal_standin(internet_ports=[port]))
        self.env = self._stack.enter_context(modal_environment(self.standin))
        self.client = modal.Client.from_credentials(
            self.env["MODAL_TOKEN_ID"], self.env["MODAL_TOKEN_SECRET"]
        )
        self.options = [
            "--TabbiExtension.sandbox_provider_class=tabbi_sandbox.modal.ModalProvider",
            "--ModalProvider.agent_user=",  # the stand-in runs no RUN step: no user is made
            "--ModalProvider.allow_private_gateway=True",  # the stand-in forwards the server's port
            "--ModalProvider.publish_image=False",
            f"--ModalProvider.server_tag={SERVER_TAG}",
            "--ModalProvider.reconcile_interval=0",
            "--ModalProvider.start_timeout=180",
        ]

    def sandboxes(self, sid: str) -> list[Any]:
        return [s for s in self.standin.sandboxes.values() if s.tags.get("tabbi_session") == sid]

    def alive(self, sid: str) -> bool:
        return any(s.running for s in self.sandboxes(sid))

    def orphan(self) -> Callable[[], bool] | None:
        """A sandbox tagged for this server whose session is not live (a crash mid-start leaves
        one); returns whether it still runs."""
        import modal

        app = modal.App.lookup("tabbi", create_if_missing=True, client=self.client)
        tags = {"tabbi_session": "ses-000000000000", "tabbi_server": SERVER_TAG, "tabbi_owner": "nobody"}
        # An explicit image: the client's cached default may be another stand-in's.
        sb = modal.Sandbox.create(
            app=app, image=modal.Image.debian_slim(), tags=tags, client=self.client, timeout=600
        )
        return lambda: self.standin.sandboxes[sb.object_id].running

    def create_requests(self, sid: str) -> list[Any]:
        return [
            r
            for r in self.standin.state.create_requests
            if any(t.tag_name == "tabbi_session" and t.tag_value == sid for t in r.tags)
        ]

    def close(self) -> None:
        self._stack.close()


SUBSTRATES = {"local": LocalSubstrate, "modal": ModalSubstrate}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("substrate_name", sorted(SUBSTRATES))
def test_a_session_end_to_end(substrate_name, tmp_path, llm, source_repo):
    """One journey per substrate (kept to one to keep the suite lean): start from a local repository
    (on Modal uploaded as a bundle), a streamed turn, diff, the file read back for insert, push (on
    Modal the branch leaves as a bundle and is pushed from the server), the server SIGKILLed
    mid-turn and a new one re-attaching to the live sandbox with nothing lost, orphans reconciled,
    a pause into a snapshot and a resume from it with the conversation kept (the model gets the
    whole conversation)."""
    from tabbi_sandbox.bootstrap import free_port
    from tests.conftest import git
    from tests.support.llm import Reply, write
    from tests.support.server import JupyterProcess
    from tests.test_lifecycle import contiguous

    port = free_port()
    substrate = SUBSTRATES[substrate_name](port)
    idle = ["--TabbiExtension.idle_timeout=900", "--TabbiExtension.model_retries=100"]
    options, env = [*substrate.options, *idle], substrate.env
    try:
        first = JupyterProcess(llm.url, tmp_path / "srv", extra=options, env=env, port=port)
        try:
            sid = first.call("POST", "tabbi/api/sessions", {"repo": str(source_repo)})["id"]
            first.wait_event(
                sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "running", timeout=240
            )
            llm.enqueue(Reply(tools=[write("hello.py", "print('hi')\n")]), Reply(text="wrote it"))
            first.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "write hello.py"})
            done = first.wait_event(sid, lambda e: e["type"] == "turn.finished", timeout=180)
            assert done["data"]["outcome"] == "completed", done
            streamed = first.call("GET", f"tabbi/api/sessions/{sid}/events")["events"]
            assert [f["path"] for f in first.call("GET", f"tabbi/api/sessions/{sid}/diff")["files"]] == [
                "hello.py"
            ]
            # What `%tabbi insert` and the panel read back: the file at its final content.
            read = first.call("GET", f"tabbi/api/sessions/{sid}/file?path=hello.py")
            assert read["content"] == "print('hi')\n"
            pushed = first.call("POST", f"tabbi/api/sessions/{sid}/push", {"message": "pushed"}, timeout=120)
            assert git("show", f"{pushed['branch']}:hello.py", cwd=source_repo) == "print('hi')"

            # Mid-turn, the server dies; the sandbox does not.
            words = " ".join(f"w{i}" for i in range(120))
            llm.enqueue(Reply(text=words, chunks=60, drip=0.05), Reply(text="answered after re-attach"))
            first.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "talk for long"})
            first.wait_event(sid, lambda e: e["type"] == "text.delta", after=done["seq"])
            persisted = first.call("GET", f"tabbi/api/sessions/{sid}/events")["events"]
        finally:
            first.kill()
        assert substrate.alive(sid), "the sandbox outlived its server"
        orphan_alive = substrate.orphan()

        second = JupyterProcess(llm.url, tmp_path / "srv", extra=options, env=env, port=port)
        try:
            caught_up = second.wait_event(
                sid, lambda e: e["type"] == "turn.finished", after=persisted[-1]["seq"], timeout=180
            )
            assert orphan_alive is None or not orphan_alive(), "the orphan was ended by the reconcile"
            assert substrate.alive(sid), "the session's own sandbox was kept"
            before = second.call("GET", f"tabbi/api/sessions/{sid}/messages")["messages"]
            second.call("POST", f"tabbi/api/sessions/{sid}/pause", timeout=300)
            assert not substrate.alive(sid), "a pause ends the sandbox (its snapshot remains)"
            llm.enqueue(Reply(text="resumed and remembering"))
            second.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "after the pause"})
            resumed = second.wait_event(
                sid, lambda e: e["type"] == "turn.finished", after=caught_up["seq"], timeout=240
            )
            after_messages = second.call("GET", f"tabbi/api/sessions/{sid}/messages")["messages"]
            events = second.call("GET", f"tabbi/api/sessions/{sid}/events")["events"]
            diff_after = second.call("GET", f"tabbi/api/sessions/{sid}/diff")
        finally:
            second.stop()
        requests = substrate.create_requests(sid)
    finally:
        substrate.close()
    assert "text.delta" in [e["type"] for e in streamed]  # the answer streamed
    assert contiguous(events) and events[: len(persisted)] == persisted
    later = events[len(persisted) :]
    assert ("session.status", "reattached") in [(e["type"], e["data"].get("phase")) for e in later]
    texts = [e["data"]["text"] for e in later if e["type"] == "part.updated" and e["data"].get("text")]
    assert "answered after re-attach" in texts and "resumed and remembering" in texts
    assert resumed["data"]["outcome"] == "completed"
    phases = [e["data"].get("phase") for e in later if e["type"] == "session.status"]
    assert "restoring" in phases and "reusing_workspace" in phases
    # The conversation is kept: the messages from before the pause are still there, in order, and
    # OpenCode (restored from the snapshot) sent the model the whole conversation.
    assert [m["id"] for m in after_messages][: len(before)] == [m["id"] for m in before]
    last = json.dumps(llm.agent_requests()[-1])
    assert "write hello.py" in last and "talk for long" in last and "after the pause" in last
    assert [f["path"] for f in diff_after["files"]] == ["hello.py"]
    # On Modal: its idle timeout above tabbi's idle pause (900 s), its lifetime above that.
    for request in requests:
        assert request.definition.idle_timeout_secs > 900
        assert request.definition.timeout_secs >= request.definition.idle_timeout_secs
    assert len(requests) == (2 if substrate_name == "modal" else 0)  # the first start, the resume


@pytest.mark.timeout(600)
def test_an_idle_modal_session_pauses_into_a_snapshot_before_modal_would_end_it(tmp_path, llm, source_repo):
    """Threat: Modal ends an idle sandbox by itself (its ``idle_timeout``), and the work since the
    last snapshot would go with it. tabbi's own idle pause must come first: the session pauses
    into a snapshot and tabbi terminates the sandbox (TERMINATED, not Modal's TIMEOUT), and Modal's
    idle timeout is set above tabbi's."""
    from modal_proto import api_pb2

    from tabbi_sandbox.bootstrap import free_port
    from tests.support.server import JupyterProcess

    port = free_port()
    substrate = ModalSubstrate(port)
    options = [*substrate.options, "--TabbiExtension.idle_timeout=4"]
    try:
        server = JupyterProcess(llm.url, tmp_path / "srv", extra=options, env=substrate.env, port=port)
        try:
            sid = server.call("POST", "tabbi/api/sessions", {"repo": str(source_repo)})["id"]
            paused = server.wait_event(
                sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "paused", timeout=300
            )
            events = server.call("GET", f"tabbi/api/sessions/{sid}/events")["events"]
        finally:
            server.stop()
        requests = substrate.create_requests(sid)
        boxes = substrate.sandboxes(sid)
    finally:
        substrate.close()
    assert paused["data"]["reason"] == "idle", paused
    assert [e for e in events if e["type"] == "snapshot.saved"], "the pause saved a snapshot"
    assert [b.result.status for b in boxes] == [api_pb2.GenericResult.GENERIC_STATUS_TERMINATED]
    assert [r.definition.idle_timeout_secs > 4 for r in requests] == [True]
