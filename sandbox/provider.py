"""The sandbox provider interface: what the server extension may ask of any substrate.

Modelled on JupyterHub's ``Spawner``: a provider creates sandboxes; a sandbox can be polled,
exec'd in, terminated, and described by a JSON-able ``get_state`` that is stored with the session so
a restarted server can ``load_state`` and re-attach to what is still alive. Local processes and
Modal sandboxes implement the same calls, and both run ``bootstrap.py`` inside.
"""

from __future__ import annotations

import abc
import os
import secrets
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
    #: Whether a push must not run inside the sandbox: its ``exec`` shares a container (PID and
    #: /tmp) with the agent. Then the branch is exported as a git bundle (``export_branch``) and
    #: pushed from the server (``tabbi_sandbox.modal_push``), so the token never enters it.
    pushes_from_bundle: bool = False

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
