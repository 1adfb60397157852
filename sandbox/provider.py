"""The sandbox provider interface: what the server extension may ask of any substrate.

Modelled on JupyterHub's ``Spawner``: a provider creates sandboxes; a sandbox can be polled,
exec'd in, terminated, and described by a JSON-able ``get_state`` that is stored with the session so
a restarted server can ``load_state`` and re-attach to what is still alive. Local processes and
Modal sandboxes implement the same calls, and both run ``bootstrap.py`` inside.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traitlets import TraitType
from traitlets.config import LoggingConfigurable
from traitlets.traitlets import MetaHasTraits

#: Called with each progress line of the bootstrap (``{"phase": "cloning", ...}``).
ProgressCallback = Callable[[dict[str, Any]], Awaitable[None]]

BOOTSTRAP_SCRIPT = Path(__file__).with_name("bootstrap.py")


class ConfigurableABCMeta(abc.ABCMeta, MetaHasTraits):
    """Lets a pluggable backend be both an abstract base class and a traitlets ``Configurable``
    (each metaclass alone refuses the other)."""


class PathTrait(TraitType[Path, Any]):
    """A filesystem path: configured as a string, held as a ``Path``."""

    info_text = "a filesystem path"

    def validate(self, obj: Any, value: Any) -> Path | None:
        if value is None and self.allow_none:
            return None
        if isinstance(value, (str, os.PathLike)) and str(value):
            return Path(value)
        self.error(obj, value)


class SandboxError(Exception):
    """A sandbox could not be created or used; the message is safe to show to the person."""


class RestoreError(SandboxError):
    """A snapshot could not be restored. Nothing of it was put in place (the next start restores
    again, or starts afresh without it) and the snapshot itself is untouched."""


@dataclass
class SandboxSpec:
    """Everything a sandbox needs to come up. ``password`` (OpenCode's, per start) and
    ``git_credential`` are secrets: they go to the bootstrap's stdin only. No model key is here:
    the sandbox reaches the model through the server's gateway."""

    sandbox_id: str
    repo_url: str
    repo_display: str
    work_branch: str
    base_branch: str | None = None
    git_name: str = "tabbi"
    git_email: str = "tabbi@localhost"
    opencode_config: dict[str, Any] = field(default_factory=dict)
    #: Host paths the clone must be able to read (a local repository), bound read-only.
    read_only_paths: list[str] = field(default_factory=list)
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    #: Providers whose sandboxes outlive the server stop them after this many seconds, in case no
    #: server comes back to do it (None: no limit).
    max_seconds: float | None = None
    #: ``{"username", "password"}`` for the clone only (a GitHub token); never stored anywhere.
    git_credential: dict[str, str] | None = field(default=None, repr=False)
    #: The session's owner, for providers that label their sandboxes (Modal's ``tabbi_owner`` tag).
    owner: str | None = None
    #: What the bootstrap does about the repository's environment (no secret):
    #: ``{"setup": True, "setup_timeout": S}`` or ``{"warm": True}`` (``bootstrap.prepare_environment``).
    environment: dict[str, Any] | None = None


@dataclass
class WarmSandbox:
    """A sandbox started ahead of demand (``SandboxProvider.prepare``): OpenCode healthy in a
    workspace it already opened, an empty git repository (``bootstrap.prepare_warm_workspace``);
    no repository, no person. Its ``id`` is the session id it will serve, so the
    sandbox's folder, marker, tags and model gateway route are already the session's; its
    OpenCode runs with ``password`` and ``config`` (whose gateway token unlocks nothing until the
    gateway issues a grant for that session, at assignment). Used by one session at most:
    ``consumed`` once ``start`` assigned or discarded it."""

    sandbox: Sandbox
    password: str = field(repr=False)
    config: dict[str, Any] = field(repr=False)
    model: str | None = None
    created: float = field(default_factory=time.monotonic)
    consumed: bool = False

    @property
    def id(self) -> str:
        return self.sandbox.id


@dataclass(frozen=True)
class Endpoint:
    """Where the sandbox's OpenCode server answers. Never leaves the server process."""

    url: str
    password: str = field(repr=False)


@dataclass
class ExecResult:
    returncode: int
    stdout: str
    stderr: str


class Sandbox(abc.ABC):
    """One running (or once-running) sandbox."""

    id: str
    #: Whether the agent is fenced off from the server's user (its files, processes, secrets).
    #: Credentials (a GitHub token) are handed only to confined sandboxes.
    confined: bool = True
    #: The workspace (the clone) and the sandbox's home, as paths inside the sandbox.
    workspace_path: str
    home_path: str
    #: Whether an ``exec`` is out of the agent's reach (its own PID namespace and /tmp, like
    #: bubblewrap's): only then may a command given the person's credential run inside. A
    #: sandbox whose execs share a container with the agent (Modal) has the server talk to the
    #: remote instead, with git bundles crossing the edge (``tabbi_sandbox.modal_push``): a push
    #: exports the branch, a warm workspace's sync gets the base branch's tip. False unless a
    #: provider says otherwise: a new provider keeps the credential out until it shows its
    #: execs are private.
    private_exec: bool = False

    @property
    def pushes_from_bundle(self) -> bool:
        """A push exports the branch as a git bundle and the server pushes it (``export_branch``)."""
        return not self.private_exec

    @abc.abstractmethod
    def bootstrap_argv(self, *args: str) -> list[str]:
        """The command that runs ``bootstrap.py`` (with ``args``) inside this sandbox."""

    @abc.abstractmethod
    def endpoint(self) -> Endpoint:
        """The OpenCode server inside, valid while ``poll()`` is None."""

    @abc.abstractmethod
    def poll(self) -> int | None:
        """None while the sandbox's agent runs, else its exit status (like ``Popen.poll``)."""

    @abc.abstractmethod
    async def wait(self) -> int:
        """Return the exit status once the sandbox's agent has stopped."""

    @abc.abstractmethod
    async def exec(
        self, argv: list[str], timeout: float = 60, input: bytes | None = None, write_remote: bool = False,
        max_output: int | None = None,
    ) -> ExecResult:
        """Run a command in the workspace, confined like the agent, in a process the agent cannot
        see. ``input`` goes to its stdin (the only way a secret may enter); ``write_remote``
        lets it write the session's local remote repository (read-only to the agent), to push.
        ``max_output``: keep at most that many bytes of stdout and of stderr (the rest is read
        and dropped), for output the workspace's content decides."""

    @abc.abstractmethod
    async def terminate(self) -> None:
        """End the whole process tree. Idempotent; nothing may survive it."""

    @abc.abstractmethod
    def get_state(self) -> dict[str, Any]:
        """JSON-able description stored with the session (no secrets)."""


class SandboxProvider(LoggingConfigurable, metaclass=ConfigurableABCMeta):
    """Creates sandboxes on one substrate.

    A provider is configured as its own traitlets class (``c.LocalProvider.isolation``,
    ``c.ModalProvider.cpu``); the extension constructs it with ``parent=`` itself, so those
    settings and the server's log reach it."""

    #: Short name shown in health output and logs.
    name: str = "abstract"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.warm_ids: set[str] = set()

    @abc.abstractmethod
    async def create(
        self, spec: SandboxSpec, progress: ProgressCallback, restore: dict[str, Any] | None = None
    ) -> Sandbox:
        """Start a sandbox, run the bootstrap, and return once OpenCode is healthy.

        With ``restore`` (a snapshot's ref), the sandbox starts from that snapshot unless its own
        workspace still exists (it is newer). A restore is all or nothing: a failure raises
        ``RestoreError`` and leaves no part of the snapshot in place."""

    #: Whether sandboxes outlive a crashed server process (then ``load_state`` can re-attach).
    survives_restart: bool = False

    async def load_state(self, state: dict[str, Any], password: str | None = None) -> Sandbox | None:
        """Re-attach to a sandbox described by ``get_state`` whose OpenCode answers to
        ``password`` (kept by the caller, encrypted: states hold no secret); None when it is
        gone. A sandbox returned without a password is only good for ``terminate``."""
        return None

    @abc.abstractmethod
    async def snapshot(self, sandbox: Sandbox, name: str) -> tuple[dict[str, Any], int]:
        """Save the sandbox's workspace and agent data; return ``(ref, size in bytes)``. The ref
        is JSON (stored with the session) and holds no secret. Raises ``SandboxError``.

        The sandbox's files are the agent's: the archive is made inside the sandbox (or by other
        means that never follow a link the agent planted), never by the server reading them."""

    @abc.abstractmethod
    async def delete_snapshot(self, ref: dict[str, Any]) -> None: ...

    async def destroy(self, sandbox_id: str) -> None:
        """Remove everything the sandbox left behind (workspace, home); snapshots stay."""

    # -- warm sandboxes (the pool of ``tabbi_extension.pool``) ---------------------------------
    #: ``warm_ids``: the sandboxes ``prepare`` made that no session has taken yet; ``reconcile``
    #: spares them. In memory only: once this server process is gone, they are orphans like any
    #: other.

    def warm_unsupported(self) -> str | None:
        """Why this provider cannot prepare warm sandboxes as configured (None: it can)."""
        return f"the {self.name} provider has no warm sandboxes"

    async def prepare(self, spec: SandboxSpec) -> WarmSandbox:
        """Start a sandbox for ``spec`` (no repository: ``repo_url`` empty, no credential, no
        owner) whose OpenCode is healthy and has opened its workspace, an empty git repository
        (``create`` with no repository: the bootstrap then clones nothing); ``start(..., warm=)``
        later clones into it. Raises
        ``SandboxError``."""
        if (why := self.warm_unsupported()) is not None:
            raise SandboxError(why)
        if spec.repo_url or spec.git_credential or spec.owner:
            raise SandboxError("a warm sandbox is prepared for nobody and no repository")
        self.warm_ids.add(spec.sandbox_id)
        try:
            sandbox = await self.create(spec, no_progress)
        except BaseException:
            self.warm_ids.discard(spec.sandbox_id)
            with contextlib.suppress(SandboxError):
                await asyncio.shield(self.destroy(spec.sandbox_id))
            raise
        return WarmSandbox(sandbox, spec.password, spec.opencode_config)

    async def start(
        self, spec: SandboxSpec, progress: ProgressCallback, restore: dict[str, Any] | None = None,
        warm: WarmSandbox | None = None,
    ) -> Sandbox:
        """``create``, or with ``warm`` (prepared for this very session, with ``spec``'s password
        and OpenCode config) clone into that sandbox instead. A warm sandbox that no longer
        fits (dead, a restore, another config) is discarded and the start is cold; one whose
        clone fails is destroyed and the failure raised, as a cold start's would be."""
        if warm is None:
            return await self.create(spec, progress, restore)
        fits = (restore is None and not warm.consumed and warm.id == spec.sandbox_id
                and warm.password == spec.password and warm.config == spec.opencode_config
                and warm.sandbox.poll() is None
                and (warm.sandbox.confined or spec.git_credential is None))
        if not fits:
            await self.discard(warm)
            return await self.create(spec, progress, restore)
        warm.consumed = True
        self.warm_ids.discard(warm.id)
        try:
            await self.assign(warm.sandbox, spec, progress)
        except BaseException:
            await asyncio.shield(self._end(warm.sandbox))
            raise
        return warm.sandbox

    async def assign(self, sandbox: Sandbox, spec: SandboxSpec, progress: ProgressCallback) -> None:
        """Clone ``spec``'s repository into the warm ``sandbox`` (``bootstrap.py clone``: the
        credential on its stdin, the plugin fence after it).

        OpenCode reads a directory (git root, project, config, plugins) when it first serves a
        request for it, and keeps what it read. A warm sandbox's OpenCode read its workspace
        while it waited, as an empty git repository (``bootstrap.open_warm_workspace``), and the
        clone takes that repository's place, so the session's first request finds the
        workspace open (measured with 1.18.33: 10 ms instead of 80 bare)."""
        request = {
            "workspace": sandbox.workspace_path,
            "home": sandbox.home_path,
            "repo_url": await self.clone_url(sandbox, spec),
            "repo_display": spec.repo_display,
            "base_branch": spec.base_branch,
            "branch": spec.work_branch,
            "git_identity": {"name": spec.git_name, "email": spec.git_email},
            "git_credential": spec.git_credential,
            # the repository's setup script runs after the clone, as in a cold start
            "environment": spec.environment,
            "marker": sandbox.id,
        }
        await progress({"phase": "cloning", "repo": spec.repo_display})
        done = await sandbox.exec(sandbox.bootstrap_argv("clone"), timeout=self.clone_timeout,
                                  input=json.dumps(request).encode(), max_output=1 << 20)
        del request
        failed = None
        for line in done.stdout.splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                message = json.loads(line)
                if message.get("phase") == "failed":
                    failed = message.get("error")
                elif message.get("phase") not in (None, "cloning", "cloned"):
                    await progress(message)
        if failed or done.returncode != 0:
            raise SandboxError(failed or f"the clone failed (status {done.returncode}): "
                               f"{done.stderr.strip()[-300:]}")
        await progress({"phase": "ready"})

    #: Seconds a clone into a warm sandbox may take.
    clone_timeout: float = 600.0

    async def clone_url(self, sandbox: Sandbox, spec: SandboxSpec) -> str:
        """Where the sandbox clones ``spec``'s repository from (a provider that cannot reach a
        local path uploads it first)."""
        return spec.repo_url

    async def discard(self, warm: WarmSandbox) -> None:
        """End a warm sandbox nobody will use (never handed on: it is used once at most)."""
        warm.consumed = True
        self.warm_ids.discard(warm.id)
        await self._end(warm.sandbox)

    async def _end(self, sandbox: Sandbox) -> None:
        await sandbox.terminate()
        await self.destroy(sandbox.id)

    def memory_held(self, sandbox: Sandbox) -> int | None:
        """Bytes of memory the sandbox's processes hold now (None: not measurable here)."""
        return None

    async def confines(self) -> bool:
        """Whether sandboxes created now are confined (see ``Sandbox.confined``)."""
        return True

    async def reconcile(self, live: dict[str, dict[str, Any] | None], force: bool = False) -> int:
        """End this server's sandboxes that no live session owns (``live``: session id -> its
        stored sandbox state, None while starting), so that nothing runs (and bills) forever.
        Called by the session manager at start-up and on its heartbeat; the number ended."""
        return 0

    def check(self) -> dict[str, Any]:
        """Health details for ``GET /tabbi/api/health``: ``{"usable": bool, ...}``."""
        return {"usable": True}


async def no_progress(message: dict[str, Any]) -> None:
    """The progress of a warm sandbox's start: nobody waits for it."""
