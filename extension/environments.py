"""Per-repository environments: a repository's setup script run once, kept as a warm snapshot, and
new sessions on that repository started from it.

A repository may carry ``.tabbi/setup.sh``. The first session on it (per person, repository and
base branch) clones, runs the script in the sandbox (``tabbi_sandbox.setup_script``, its output
streamed as progress) and, once OpenCode is up and before the person's first prompt, saves the
sandbox as that person's **warm snapshot** of the repository, keyed by repository, base branch
commit and the script's blob id. Later sessions restore it (the script does not run again),
start OpenCode at once, and bring the workspace up to date with the base branch in the
background (``EnvironmentStart.sync``; on a provider whose execs the agent can reach, Modal,
the server fetches with the person's credential and hands the sandbox a git bundle, see
``EnvironmentStart._fetch_base``). Meanwhile the agent may read; writes wait: OpenCode's
``edit`` and ``bash`` permissions are set to ``ask`` for this start, and tabbi answers those asks
itself once the sync is done (``WriteGate``). A person's own ``ask`` answers wait the same way.

Refresh: when the sync finds that the base branch moved or the setup script changed, the warm
snapshot is outdated (its key no longer matches) and retired; the session itself re-runs a
changed setup script before writes go ahead, and the next session builds a fresh warm snapshot.
A warm snapshot older than ``TabbiExtension.environment_max_age`` is retired the same way, and
``fresh`` (``%tabbi start REPO --fresh``) builds a new one regardless.

Ownership: a warm snapshot holds a clone made with its owner's GitHub token (of a repository
others may not read) and is only ever used for that owner's sessions.

Where they are kept: ``<data_dir>/environments.json`` (the snapshots themselves are the
provider's, like a session's). The registry is per data dir: servers sharing a Convex store but
not a data dir each build their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tabbi_sandbox import modal_push
from tabbi_sandbox.provider import Sandbox, SandboxError, SandboxProvider

log = logging.getLogger(__name__)

#: OpenCode permission families that write; held until a warm workspace is in sync.
WRITING = ("edit", "bash")


@dataclasses.dataclass
class WarmSnapshot:
    """One person's warm snapshot of one repository at one base commit and setup script."""

    id: str
    owner: str
    repo: str
    base_branch: str | None
    commit: str
    setup_hash: str
    ref: dict[str, Any]
    size: int
    created_at: float
    #: The session whose sandbox it was taken from.
    built_by: str

    def public(self) -> dict[str, Any]:
        return {"snapshot": self.id, "created_at": self.created_at, "commit": self.commit,
                "setup_hash": self.setup_hash, "size": self.size}


def key(owner: str, repo: str, base_branch: str | None, commit: str, setup_hash: str) -> str:
    """The id of a warm snapshot: what it was built from, and for whom."""
    text = "\0".join([owner, repo, base_branch or "", commit, setup_hash])
    return "env-" + hashlib.sha256(text.encode()).hexdigest()[:12]


class EnvironmentRegistry:
    """The warm snapshots of this data dir, one per person, repository and base branch."""

    def __init__(self, path: Path, provider: SandboxProvider, max_age: float = 6 * 3600.0,
                 setup_timeout: float = 600.0):
        self.path = path
        self.provider = provider
        self.max_age = max_age
        self.setup_timeout = setup_timeout
        self._lock = asyncio.Lock()

    async def find(self, owner: str, repo: str, base_branch: str | None) -> WarmSnapshot | None:
        """The person's current warm snapshot of ``repo``; one past ``max_age`` is retired."""
        async with self._lock:
            entries = await self._load()
            wanted = (owner, repo, base_branch)
            found = next((e for e in entries if (e.owner, e.repo, e.base_branch) == wanted), None)
            if found is not None and self.max_age and time.time() - found.created_at > self.max_age:
                await self._drop(entries, found)
                return None
            return found

    async def save(self, snapshot: WarmSnapshot) -> None:
        """Keep ``snapshot`` as the person's warm snapshot of its repository (the one it replaces
        is deleted)."""
        async with self._lock:
            entries = await self._load()
            for old in [e for e in entries if (e.owner, e.repo, e.base_branch)
                        == (snapshot.owner, snapshot.repo, snapshot.base_branch)]:
                await self._drop(entries, old, write=False)
            entries.append(snapshot)
            await asyncio.to_thread(self._write, entries)

    async def retire(self, snapshot: WarmSnapshot) -> None:
        """``snapshot`` is outdated (the base branch moved, the setup script changed): the next
        session builds a fresh one."""
        async with self._lock:
            entries = await self._load()
            current = next((e for e in entries if e.id == snapshot.id), None)
            if current is not None:
                await self._drop(entries, current)

    async def all(self) -> list[WarmSnapshot]:
        async with self._lock:
            return await self._load()

    async def _drop(self, entries: list[WarmSnapshot], entry: WarmSnapshot, write: bool = True) -> None:
        entries.remove(entry)
        if write:
            await asyncio.to_thread(self._write, entries)
        with contextlib.suppress(Exception):  # a snapshot already gone is gone
            await self.provider.delete_snapshot(entry.ref)

    async def _load(self) -> list[WarmSnapshot]:
        def read() -> list[WarmSnapshot]:
            try:
                data = json.loads(self.path.read_text())
            except FileNotFoundError:
                return []
            except ValueError:
                log.warning("tabbi: %s is damaged; warm snapshots are rebuilt", self.path)
                return []
            return [WarmSnapshot(**item) for item in data]

        return await asyncio.to_thread(read)

    def _write(self, entries: list[WarmSnapshot]) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump([dataclasses.asdict(e) for e in entries], f)
        os.replace(partial, self.path)


class WriteGate:
    """Holds the agent's writes until a warm workspace is in sync with its base branch.

    ``families``: the permission families tabbi turned from ``allow`` into ``ask`` for this start;
    their asks are tabbi's to answer (``once``, as soon as the gate opens) and never reach the
    person. Asks of families the person configured as ``ask`` reach the person as always, and
    their answer waits for the gate (``wait``)."""

    def __init__(self, families: set[str]):
        self.families = families
        self.held: list[str] = []
        self._open = asyncio.Event()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    async def wait(self) -> None:
        await self._open.wait()

    async def asked(self, data: dict[str, Any], reply: Callable[[str], Awaitable[None]]) -> bool:
        """A ``permission.asked``: True when it is tabbi's (held, or answered at once)."""
        if data.get("permission") not in self.families or not data.get("permission_id"):
            return False
        if self.is_open:
            await reply(str(data["permission_id"]))
        else:
            self.held.append(str(data["permission_id"]))
        return True

    async def open(self, reply: Callable[[str], Awaitable[None]]) -> None:
        """Writes go ahead: those held are answered, later ones at once."""
        self._open.set()
        held, self.held = self.held, []
        for permission_id in held:
            await reply(permission_id)

    def release(self) -> None:
        """The sandbox is gone: nothing waits for it any more (its held asks died with it)."""
        self._open.set()
        self.held = []


Emit = Callable[[str, dict[str, Any]], Awaitable[Any]]


class EnvironmentStart:
    """What one session's first start does about its repository's environment: build a warm
    snapshot (a cold start of a repository with a setup script) or start from one (a warm start),
    then sync it."""

    def __init__(self, registry: EnvironmentRegistry, session_id: str, owner: str, repo: str,
                 base_branch: str | None, fresh: bool = False):
        self.registry = registry
        self.session_id = session_id
        self.owner = owner
        self.repo = repo
        self.base_branch = base_branch
        self.fresh = fresh
        self.warm: WarmSnapshot | None = None
        self.gate: WriteGate | None = None
        #: What the person sees in ``describe()``: where the environment came from.
        self.status: dict[str, Any] = {"source": "none"}
        self._setup_hash: str | None = None
        self._base_commit: str | None = None
        #: The person's permissions, as they were before a warm start held the writing ones.
        self._permission: dict[str, Any] = {}

    async def plan(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """``(spec.environment, restore ref)`` for the sandbox."""
        if not self.fresh:
            self.warm = await self.registry.find(self.owner, self.repo, self.base_branch)
        if self.warm is None:
            return {"setup": True, "setup_timeout": self.registry.setup_timeout}, None
        self.status = {"source": "warm", **self.warm.public(), "synced": False}
        return {"warm": True}, self.warm.ref

    def opencode_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """For a warm start: the writing permissions the person allows become ``ask`` until the
        sync is done (``WriteGate``)."""
        if self.warm is None:
            return config
        permission = dict(config.get("permission") or {})
        self._permission = permission
        families = {f for f in WRITING if permission.get(f, "allow") == "allow"}
        self.gate = WriteGate(families)
        return {**config, "permission": {**permission, **{f: "ask" for f in families}}}

    async def fall_back(self, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The warm snapshot could not be restored: retire it and start cold. Returns the new
        ``(spec.environment, OpenCode config)``."""
        warm, self.warm, self.gate = self.warm, None, None
        if warm is not None:
            log.warning("tabbi: the warm snapshot %s could not be restored; building a fresh one", warm.id)
            await self.registry.retire(warm)
        self.status = {"source": "none"}
        return ({"setup": True, "setup_timeout": self.registry.setup_timeout},
                {**config, "permission": dict(self._permission)})

    def observe(self, message: dict[str, Any]) -> None:
        """A progress line of the bootstrap."""
        phase = message.get("phase")
        if phase == "setup_done":
            self._setup_hash = message.get("setup_hash")
        elif phase == "branch":
            self._base_commit = message.get("base_commit")

    @property
    def will_build(self) -> bool:
        """Whether ``built`` will snapshot the sandbox (a setup script ran on a cold start)."""
        return self.warm is None and bool(self._setup_hash and self._base_commit)

    async def built(self, provider: SandboxProvider, sandbox: Sandbox, progress: Emit) -> None:
        """After a cold start whose setup script ran: keep the sandbox as the person's warm
        snapshot (OpenCode is up but has no conversation yet: the workspace is quiet)."""
        if not self.will_build:
            return
        await progress("session.status", {"state": "starting", "phase": "saving_environment"})
        name = f"{int(time.time() * 1000)}-env{secrets.token_hex(3)}"
        try:
            ref, size = await provider.snapshot(sandbox, name)
        except SandboxError as exc:
            log.warning("tabbi: the warm snapshot of %s failed: %s", self.repo, exc)
            await progress("error", {"name": "EnvironmentError", "message":
                                     f"the environment could not be saved for later sessions: {exc}"})
            return
        snapshot = WarmSnapshot(
            id=key(self.owner, self.repo, self.base_branch, self._base_commit, self._setup_hash),
            owner=self.owner, repo=self.repo, base_branch=self.base_branch,
            commit=self._base_commit, setup_hash=self._setup_hash, ref=ref, size=size,
            created_at=time.time(), built_by=self.session_id,
        )
        await self.registry.save(snapshot)
        self.status = {"source": "built", **snapshot.public()}

    async def sync(self, sandbox: Sandbox, request: dict[str, Any], emit: Emit,
                   reply: Callable[[str], Awaitable[None]],
                   rebased: Callable[[str], Awaitable[None]]) -> None:
        """Bring a warm workspace up to date with the base branch while the agent may read, then
        let writes go ahead. ``request``: ``bootstrap.py sync``'s (paths, URL, maybe a credential);
        ``rebased(commit)``: the session's base commit moved there."""
        warm, gate = self.warm, self.gate
        assert warm is not None and gate is not None
        await emit("environment", {"status": "syncing", **self.status})
        try:
            answer = await self._fetch_base(sandbox, request)
            if answer.get("base_commit") and answer["base_commit"] != answer.get("previous"):
                await rebased(answer["base_commit"])
            if answer.get("setup_hash") != warm.setup_hash or answer.get("base_commit") != warm.commit:
                await self.registry.retire(warm)  # outdated: the next session builds a fresh one
            if answer.get("setup_hash") != warm.setup_hash:
                await emit("environment", {"status": "setup", "setup_hash": answer.get("setup_hash")})
                if answer.get("setup_hash"):
                    ran = await self._bootstrap(
                        sandbox, ["setup"],
                        {"workspace": sandbox.workspace_path, "home": sandbox.home_path,
                         "timeout": self.registry.setup_timeout},
                        timeout=self.registry.setup_timeout + 30)
                    self.status["setup_seconds"] = ran.get("seconds")
                self.status["setup_hash"] = answer.get("setup_hash")
            self.status.update(synced=True, commit=answer.get("base_commit"))
            await emit("environment", {"status": "synced", **self.status})
        except SandboxError as exc:
            self.status["sync_error"] = str(exc)
            await emit("error", {"name": "EnvironmentError", "message":
                                 f"the workspace could not be brought up to date with its base branch "
                                 f"({exc}); the agent works on the warm snapshot's commit "
                                 f"{warm.commit[:12]}"})
        finally:
            await gate.open(reply)

    async def _fetch_base(self, sandbox: Sandbox, request: dict[str, Any]) -> dict[str, Any]:
        """The workspace fast-forwarded to the base branch: ``{"base_commit", "previous",
        "setup_hash"}``. The one place that decides where the person's credential goes.

        A sandbox whose execs are private (bubblewrap) fetches itself, the credential handed to
        that one exec (``bootstrap.py sync``). Any other (Modal: an exec shares the container,
        PID and /tmp with the agent, which could race for the token) never sees it: this server
        fetches, and the sandbox gets a bundle of the tip (``bootstrap.py sync-bundle``). The
        answer is then this server's own: the sandbox only says whether its fast-forward
        worked, and nothing it prints moves the base commit or the setup script's id."""
        if sandbox.private_exec:
            return await self._bootstrap(sandbox, ["sync"], request, timeout=900)
        warm = self.warm
        assert warm is not None
        tip = await modal_push.with_remote(modal_push.fetch_base, request["remote_url"],
                                           request.get("base_branch"), request.get("credential"), warm.commit)
        if tip.bundle:
            where = {"workspace": request["workspace"], "branch": request["branch"]}
            await self._bootstrap(sandbox, ["sync-bundle", json.dumps(where)], tip.bundle, timeout=900)
        return {"base_commit": tip.commit, "previous": warm.commit, "setup_hash": tip.setup_hash}

    @staticmethod
    async def _bootstrap(sandbox: Sandbox, args: list[str], request: dict[str, Any] | bytes,
                         timeout: float) -> dict[str, Any]:
        """Run ``bootstrap.py ARGS`` with ``request`` (JSON, or bytes as they are) on its stdin;
        its last line, the answer."""
        stdin = request if isinstance(request, bytes) else json.dumps(request).encode()
        done = await sandbox.exec(sandbox.bootstrap_argv(*args), timeout=timeout, input=stdin)
        lines = done.stdout.strip().splitlines()
        try:
            answer = json.loads(lines[-1]) if lines else {}
        except ValueError:
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        if done.returncode != 0 or "error" in answer or not answer:
            raise SandboxError(str(answer.get("error") or done.stderr.strip()[-300:] or f"{args[0]} failed"))
        return answer
