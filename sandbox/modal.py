"""The Modal sandbox provider: each session's agent in a Modal sandbox, reached through a tunnel.

Chosen with ``c.TabbiExtension.sandbox_provider_class = "tabbi_sandbox.modal.ModalProvider"`` and
configured as ``c.ModalProvider.*`` (see docs/deploy-modal.md). ``modal`` is imported when this
provider is constructed, never by anything the kernel or the default server path imports, and only
its ``.aio`` calls are used, each bounded by a timeout (:meth:`ModalProvider.call`).

A sandbox starts from the image of ``modal_image`` (or from a snapshot of one) running Modal's
default idle command; the same ``bootstrap.py`` as the local provider then runs in it through
``exec``, the spec (with OpenCode's password and the one-shot git credential) on its stdin and its
progress lines read from its stdout. OpenCode listens on :data:`OPENCODE_PORT`, declared as an
encrypted port, and the server reaches it through Modal's TLS tunnel with its password.

Who is who inside: Modal runs ``exec`` as root. The bootstrap, OpenCode, the agent's tools and
every ``exec`` tabbi runs on the agent's behalf drop to the unprivileged ``agent_user``, so the
agent cannot read the environment or memory of tabbi's root processes, nor of its own OpenCode (an
execute-only binary makes it non-dumpable). What needs the GitHub token never runs in the sandbox
at all: a push exports the branch as a git bundle and pushes it from the server, and a warm
workspace's sync gets the base branch as a bundle the server fetched (``modal_push``).

Sandboxes carry the tags ``tabbi_session``, ``tabbi_owner`` and ``tabbi_server`` and outlive the
server process (``survives_restart``): a restarted server re-attaches through ``load_state``, and
:meth:`ModalProvider.reconcile` terminates the sandboxes of this server that no live session owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from traitlets import Any as AnyTrait
from traitlets import Bool, Float, Int, List, Unicode, default

from . import modal_image
from .provider import (
    Endpoint,
    ExecResult,
    ProgressCallback,
    RestoreError,
    Sandbox,
    SandboxError,
    SandboxProvider,
    SandboxSpec,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The port OpenCode listens on inside every Modal sandbox (declared as an encrypted port).
OPENCODE_PORT = 4096
#: Modal's hard cap on a sandbox's lifetime.
MODAL_MAX_TIMEOUT = 24 * 3600
#: Kept beyond tabbi's own limits, so that tabbi always acts (pauses, snapshots) before Modal would.
MARGIN = 600
#: Bytes of a bundle (an upload or a push) beyond which tabbi refuses rather than holding it in memory.
MAX_BUNDLE = 1 << 30


class ModalSandbox(Sandbox):
    """One Modal sandbox. ``sb`` is the ``modal.Sandbox`` handle."""

    workspace_path = modal_image.WORKSPACE
    home_path = modal_image.HOME
    confined = True
    #: An exec shares the container with the agent: a push or a sync talks to the remote from
    #: the server, with bundles crossing (see ``modal_push``).
    private_exec = False

    def __init__(self, provider: ModalProvider, sandbox_id: str, sb: Any, lineage: list[str] | None = None):
        self.provider = provider
        self.id = sandbox_id
        self.sb = sb
        #: Image ids this sandbox's files descend from, newest first: the fallbacks of its snapshots.
        self.lineage = list(lineage or [])
        self._endpoint: Endpoint | None = None
        self._returncode: int | None = None
        self._terminated = False
        self._watcher: asyncio.Task | None = None

    @property
    def modal_id(self) -> str:
        return str(self.sb.object_id)

    # -- Sandbox interface -------------------------------------------------------------------
    def bootstrap_argv(self, *args: str) -> list[str]:
        return ["python3", "-I", "-S", f"{modal_image.TABBI_DIR}/bootstrap.py", *args]

    def endpoint(self) -> Endpoint:
        if self._endpoint is None:
            raise SandboxError("the sandbox is not running")
        return self._endpoint

    def poll(self) -> int | None:
        return self._returncode

    async def wait(self) -> int:
        if self._watcher is None:
            return self._returncode if self._returncode is not None else -1
        await asyncio.shield(self._watcher)
        return self._returncode if self._returncode is not None else -1

    async def exec(
        self,
        argv: list[str],
        timeout: float = 60,
        input: bytes | None = None,
        write_remote: bool = False,
        max_output: int | None = None,
    ) -> ExecResult:
        # ``write_remote`` has no meaning here: a Modal sandbox never sees a local remote (a push
        # runs on the server, from a bundle).
        code, out, err = await self.run(argv, timeout, input, max_output)
        return ExecResult(code, out.decode(errors="replace"), err.decode(errors="replace"))

    async def terminate(self) -> None:
        # The whole sandbox, even when the agent already ended: its container would idle on.
        if not self._terminated:
            try:
                await self.provider.call(self.sb.terminate.aio(), 60, "stopping the sandbox")
                self._terminated = True
            except SandboxError as exc:  # gone already, or Modal unreachable: said, not raised
                log.info("tabbi: terminating Modal sandbox %s: %s", self.modal_id, exc)
        watcher = self._watcher
        if watcher is not None and not watcher.done():
            # It ends with the sandbox; one that cannot tell (Modal unreachable) is given up on.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(watcher), 10)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if self._returncode is None:
            self._returncode = -1
        self._endpoint = None

    def get_state(self) -> dict[str, Any]:
        return {
            "provider": self.provider.name,
            "sandbox_id": self.id,
            "modal_id": self.modal_id,
            "url": self._endpoint.url if self._endpoint else None,
            "lineage": self.lineage[:3],
        }

    # -- running things inside ---------------------------------------------------------------
    def as_agent(self, argv: list[str]) -> list[str]:
        """``argv`` run as the agent's user (Modal's exec runs as root)."""
        user = self.provider.agent_user
        if not user:
            return argv
        return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *argv]

    def exec_env(self) -> dict[str, str]:
        return {"HOME": self.home_path, "LANG": "C.UTF-8", "TABBI_SANDBOX_ID": self.id}

    async def start_process(
        self, argv: list[str], as_agent: bool = True, timeout: float | None = None
    ) -> Any:
        """Start ``argv`` in the sandbox (in the workspace); the process handle (byte streams).
        With ``timeout``, Modal ends the process after that many seconds."""
        command = self.as_agent(argv) if as_agent else argv
        limit = math.ceil(timeout) if timeout else None
        return await self.provider.call(
            self.sb.exec.aio(
                *command, workdir=self.workspace_path, env=self.exec_env(), text=False, timeout=limit
            ),
            self.provider.call_timeout,
            "starting a command in the sandbox",
        )

    async def run(
        self,
        argv: list[str],
        timeout: float,
        input: bytes | None = None,
        max_output: int | None = None,
        as_agent: bool = True,
    ) -> tuple[int, bytes, bytes]:
        """Run ``argv`` to its end: ``(status, stdout, stderr)``, each stream cut at ``max_output``."""
        process = await self.start_process(argv, as_agent, timeout)

        async def talk() -> tuple[int, bytes, bytes]:
            if input is not None:
                process.stdin.write(input)
                process.stdin.write_eof()
                await process.stdin.drain.aio()
            out, err = await asyncio.gather(
                _read(process.stdout, max_output), _read(process.stderr, max_output)
            )
            return await process.wait.aio(), out, err

        try:
            return await asyncio.wait_for(talk(), timeout)
        except asyncio.TimeoutError:
            raise SandboxError(f"{argv[0]} timed out after {timeout:.0f} s") from None
        except Exception as exc:
            raise self.provider.readable(exc, f"running {argv[0]} in the sandbox") from None

    def watch(self, awaitable: Awaitable[Any]) -> None:
        """Record the exit status once ``awaitable`` (the agent's end) completes."""

        async def watcher() -> None:
            try:
                code = await awaitable
            except asyncio.CancelledError:
                raise
            except Exception:
                log.info("tabbi: lost track of Modal sandbox %s", self.modal_id, exc_info=True)
                code = -1
            self._returncode = code if isinstance(code, int) else -1

        self._watcher = asyncio.ensure_future(watcher())


async def _read(stream: Any, limit: int | None) -> bytes:
    """All of a Modal byte stream, keeping at most ``limit`` bytes (the rest is read and dropped)."""
    kept = bytearray()
    async for chunk in stream:
        data = chunk.encode() if isinstance(chunk, str) else bytes(chunk)
        kept += data if limit is None else data[: max(0, limit - len(kept))]
    return bytes(kept)


class ModalProvider(SandboxProvider):
    """Sandboxes in Modal, reached through encrypted tunnels; they outlive the server process."""

    name = "modal"
    survives_restart = True

    app_name = Unicode("tabbi", help="The Modal app sandboxes are created under (made if missing).").tag(
        config=True
    )
    environment_name = Unicode(
        None, allow_none=True, help="The Modal environment. Unset: Modal's configured default."
    ).tag(config=True)
    apt_packages = List(
        Unicode(),
        help="Extra Debian packages for the sandbox image (a team's build "
        "tools). Part of the image recipe: changing them builds a new image once.",
    ).tag(config=True)
    pip_packages = List(
        Unicode(),
        help="Extra Python packages for the sandbox image, installed with pip. Part of the image recipe.",
    ).tag(config=True)
    cpu = Float(None, allow_none=True, help="CPU cores requested per sandbox. Unset: Modal's default.").tag(
        config=True
    )
    memory = Int(
        None, allow_none=True, help="Memory requested per sandbox, in MiB. Unset: Modal's default."
    ).tag(config=True)
    region = Unicode(
        None, allow_none=True, help="Region to run sandboxes in (e.g. 'us-east'). Unset: any."
    ).tag(config=True)
    timeout = Int(
        MODAL_MAX_TIMEOUT,
        help="Modal's lifetime limit of a sandbox in seconds (at most 24 h). It is raised to cover "
        "TabbiExtension.max_lifetime + turn_timeout (plus a margin) where those are set, so that "
        "tabbi pauses a session before Modal would end it.",
    ).tag(config=True)
    idle_timeout = Int(
        None,
        allow_none=True,
        help="Seconds Modal lets a sandbox idle (no command, no stdin, no tunnel connection) before "
        "it ends it. The bootstrap is a command for as long as OpenCode runs, so this ends a sandbox "
        "whose agent stopped. Unset: TabbiExtension.idle_timeout + turn_timeout + 10 min (at least "
        "1 h): above tabbi's own idle pause, which snapshots first.",
    ).tag(config=True)
    block_network = Bool(
        False,
        help="Block the sandbox's outbound network entirely (the model gateway and the git remote "
        "are then unreachable: for repositories uploaded from the server only, with no model).",
    ).tag(config=True)
    outbound_domain_allowlist = List(
        Unicode(),
        default_value=None,
        allow_none=True,
        help="Domains the sandbox may reach (wildcards '*.example.com'); the model gateway's and the "
        "repository's hosts are added. Unset: no limit.",
    ).tag(config=True)
    secrets = List(
        Unicode(),
        help="Names of Modal secrets whose variables every sandbox gets (for the agent's tools: "
        "anything here is readable by the agent; never put a model or GitHub key here).",
    ).tag(config=True)
    agent_user = Unicode(
        modal_image.AGENT_USER,
        help="The unprivileged user the agent runs as inside the sandbox; empty: as the image's "
        "default user (root in Modal's images: then the agent can read OpenCode's password).",
    ).tag(config=True)
    allow_private_gateway = Bool(
        False,
        help="Accept a model gateway URL on a loopback or private address. A Modal sandbox cannot "
        "reach those, so this is only for a Modal stand-in on this machine.",
    ).tag(config=True)
    server_tag = Unicode(
        help="Identifies this tabbi deployment in the sandboxes' 'tabbi_server' tag (reconcile ends "
        "only sandboxes with this tag). Default: derived from the host name and the data folder.",
    ).tag(config=True)
    image_id = Unicode(
        None,
        allow_none=True,
        help="Start sandboxes from this Modal image (an id, 'im-...') instead of tabbi's recipe: an "
        "image a team built itself (see docs/deploy-modal.md for what it must contain). Unset: the "
        "recipe, with apt_packages and pip_packages.",
    ).tag(config=True)
    publish_image = Bool(
        True,
        help="Publish the built image under a name made of the tabbi version and the recipe's hash, "
        "and look it up by that name first (one call instead of resolving every layer). Off: the "
        "recipe is resolved at the first start of each server process (Modal's layer cache still "
        "builds it only once).",
    ).tag(config=True)
    start_timeout = Float(
        300.0, help="Seconds a sandbox may take to become ready (image pull included)."
    ).tag(config=True)
    call_timeout = Float(120.0, help="Seconds any single Modal API call may take.").tag(config=True)
    build_timeout = Float(1800.0, help="Seconds building the sandbox image may take (once per recipe).").tag(
        config=True
    )
    snapshot_timeout = Float(900.0, help="Seconds a filesystem snapshot may take.").tag(config=True)
    snapshot_ttl = Int(
        30 * 24 * 3600,
        allow_none=True,
        help="Seconds Modal keeps a snapshot image (None: until deleted). Older snapshots are "
        "deleted by tabbi as newer ones are kept.",
    ).tag(config=True)
    reconcile_interval = Float(
        300.0, help="Seconds between two orphan reconciles (listing Modal's sandboxes)."
    ).tag(config=True)
    client = AnyTrait(
        None,
        allow_none=True,
        help="A modal.Client to use (tests inject one); default: Modal's client from the environment.",
    )

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        import modal  # here, not at import: only a server that chose Modal pays for it

        self.modal = modal
        self._app: Any = None
        self._image: Any = None
        self._setup_lock = asyncio.Lock()
        self._last_reconcile = 0.0

    @default("server_tag")
    def _server_tag_default(self) -> str:
        data_dir = str(getattr(self.parent, "data_dir", "") or "")
        return hashlib.sha256(f"{socket.gethostname()}:{data_dir}".encode()).hexdigest()[:16]

    # -- calls to Modal -----------------------------------------------------------------------
    async def call(self, awaitable: Awaitable[T], timeout: float, what: str) -> T:
        """One Modal call, bounded by ``timeout``; failures become a ``SandboxError`` that says
        what to do."""
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except asyncio.TimeoutError:
            raise SandboxError(
                f"Modal did not answer within {timeout:.0f} s while {what}; "
                "check the server's connection to Modal and try again"
            ) from None
        except SandboxError:
            raise
        except Exception as exc:
            raise self.readable(exc, what) from exc

    def readable(self, exc: BaseException, what: str) -> SandboxError:
        """A Modal failure as a message a person can act on."""
        if isinstance(exc, SandboxError):
            return exc
        errors = self.modal.exception
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, errors.AuthError):
            return SandboxError(
                f"Modal refused this server's credentials while {what}: set MODAL_TOKEN_ID and "
                "MODAL_TOKEN_SECRET in the Jupyter server's environment (or run `modal token new` "
                "as the server's user), then start the session again"
            )
        if isinstance(exc, errors.ResourceExhaustedError):
            return SandboxError(
                f"Modal's quota or concurrency limit was reached while {what} ({detail}): stop or "
                "pause other sessions, or raise the limit in Modal's dashboard, then try again"
            )
        finished = isinstance(exc, errors.ConflictError) and "finished" in detail.lower()
        if finished or isinstance(exc, (errors.NotFoundError, errors.SandboxTerminatedError)):
            return SandboxError(
                f"the Modal sandbox is gone ({detail}) while {what}: send a prompt "
                "to start the session again; its snapshots are kept"
            )
        if isinstance(exc, errors.ConnectionError):
            return SandboxError(
                f"Modal could not be reached while {what} ({detail}): check the "
                "server's network, then try again"
            )
        if isinstance(exc, errors.Error):
            return SandboxError(f"Modal failed while {what}: {detail}")
        return SandboxError(f"{what} failed: {type(exc).__name__}: {detail}")

    async def app(self) -> Any:
        if self._app is None:
            self._app = await self.call(
                self.modal.App.lookup.aio(
                    self.app_name,
                    create_if_missing=True,
                    client=self.client,
                    environment_name=self.environment_name,
                ),
                self.call_timeout,
                f"looking up the Modal app {self.app_name!r}",
            )
        return self._app

    async def image(self, progress: ProgressCallback) -> Any:
        """The sandbox image: the published image of this recipe, else built (once) and published."""
        async with self._setup_lock:
            if self._image is None and self.image_id:
                image = self.modal.Image.from_id(self.image_id, client=self.client)
                await self.call(
                    image.build.aio(await self.app()),
                    self.call_timeout,
                    f"looking up the image {self.image_id} (c.ModalProvider.image_id)",
                )
                self._image = image
            if self._image is None:
                recipe = modal_image.Recipe.default(self.apt_packages, self.pip_packages)
                tag = modal_image.image_tag(recipe)
                image = await self.published(tag) if self.publish_image else None
                if image is None:
                    await progress({"phase": "building_image"})
                    image = await self.build(recipe)
                    if self.publish_image:
                        try:
                            await asyncio.wait_for(
                                image.publish.aio(tag, client=self.client), self.call_timeout
                            )
                        except Exception:  # built all the same; the next server resolves its layers again
                            log.info("tabbi: could not publish the sandbox image as %s", tag, exc_info=True)
                self._image = image
            return self._image

    async def published(self, tag: str) -> Any:
        """The image published as ``tag``, or None."""
        image = self.modal.Image.from_name(tag, client=self.client, environment_name=self.environment_name)
        try:
            await self.call(
                image.build.aio(await self.app()), self.call_timeout, "looking up the sandbox image"
            )
        except SandboxError as exc:
            if isinstance(
                exc.__cause__, (self.modal.exception.NotFoundError, self.modal.exception.UnimplementedError)
            ):
                return None
            raise
        return image

    async def build(self, recipe: modal_image.Recipe) -> Any:
        image = modal_image.build_definition(self.modal, recipe)
        try:
            await asyncio.wait_for(image.build.aio(await self.app()), self.build_timeout)
        except asyncio.TimeoutError:
            raise SandboxError(
                f"building the sandbox image took longer than {self.build_timeout:.0f} s "
                "(c.ModalProvider.build_timeout)"
            ) from None
        except Exception as exc:
            raise SandboxError(
                f"the sandbox image could not be built ({self.readable(exc, 'building it')}); check "
                "c.ModalProvider.apt_packages and pip_packages, and the build log in Modal's dashboard"
            ) from exc
        return image

    # -- creating -----------------------------------------------------------------------------
    def lifetimes(self, spec: SandboxSpec) -> tuple[int, int]:
        """Modal's ``(timeout, idle_timeout)`` for a sandbox: above tabbi's own limits."""
        timeout = self.timeout
        if spec.max_seconds:
            timeout = max(timeout, int(spec.max_seconds) + MARGIN)
        if timeout > MODAL_MAX_TIMEOUT:
            log.warning("tabbi: Modal ends sandboxes after 24 h; max_lifetime + turn_timeout is longer")
            timeout = MODAL_MAX_TIMEOUT
        idle = self.idle_timeout
        if idle is None:
            tabbi_idle = float(getattr(self.parent, "idle_timeout", 0) or 0)
            turn = float(getattr(self.parent, "turn_timeout", 0) or 0)
            idle = max(3600, int(tabbi_idle + turn) + MARGIN)
        return timeout, min(idle, timeout)

    def gateway_hosts(self, spec: SandboxSpec) -> list[str]:
        """The hosts of the model endpoints in OpenCode's config; refuses ones a Modal sandbox
        cannot reach (loopback, private) unless ``allow_private_gateway``."""
        hosts = []
        for url in _base_urls(spec.opencode_config):
            host = urlsplit(url).hostname or ""
            if not self.allow_private_gateway and _private(host):
                raise SandboxError(
                    f"a Modal sandbox cannot reach the model gateway at {url} (a loopback or private "
                    "address): set c.TabbiExtension.gateway_url to this Jupyter server's public HTTPS "
                    "URL (see docs/deploy-modal.md)"
                )
            hosts.append(host)
        return hosts

    def network_options(self, spec: SandboxSpec, hosts: list[str]) -> dict[str, Any]:
        if self.block_network:
            return {"block_network": True}
        if self.outbound_domain_allowlist is None:
            return {}
        allowed = list(self.outbound_domain_allowlist)
        repo_host = urlsplit(spec.repo_url).hostname
        allowed += [h for h in [*hosts, repo_host] if h and h not in allowed]
        return {"outbound_domain_allowlist": allowed}

    async def create(
        self, spec: SandboxSpec, progress: ProgressCallback, restore: dict[str, Any] | None = None
    ) -> ModalSandbox:
        hosts = self.gateway_hosts(spec)
        # A restored sandbox reuses its workspace: nothing to upload.
        bundle = await self.source_bundle(spec) if restore is None else None
        app = await self.app()
        lineage: list[str] = []
        if restore is not None:
            await progress({"phase": "restoring"})
            image, lineage = await self.snapshot_image(restore, progress)
        else:
            image = await self.image(progress)
        timeout, idle = self.lifetimes(spec)
        tags = {
            "tabbi_session": spec.sandbox_id,
            "tabbi_owner": spec.owner or ("nobody" if not spec.repo_url else "unknown"),
            "tabbi_server": self.server_tag,
        }
        options: dict[str, Any] = {
            "app": app,
            "image": image,
            "tags": tags,
            "timeout": timeout,
            "idle_timeout": idle,
            "workdir": modal_image.WORKSPACE,
            "encrypted_ports": [OPENCODE_PORT],
            "client": self.client,
            **self.network_options(spec, hosts),
        }
        options.update(
            {
                k: v
                for k, v in (("cpu", self.cpu), ("memory", self.memory), ("region", self.region))
                if v is not None
            }
        )
        if self.secrets:
            options["secrets"] = [
                self.modal.Secret.from_name(name, environment_name=self.environment_name)
                for name in self.secrets
            ]
        await progress({"phase": "creating_sandbox"})
        sb = await self.call(
            self.modal.Sandbox.create.aio(**options), self.start_timeout, "creating the sandbox"
        )
        sandbox = ModalSandbox(self, spec.sandbox_id, sb, lineage)
        try:
            await asyncio.wait_for(
                self.bring_up(sandbox, spec, progress, bundle, restored=restore is not None),
                self.start_timeout,
            )
        except BaseException as exc:
            await asyncio.shield(sandbox.terminate())
            if isinstance(exc, asyncio.TimeoutError):
                raise SandboxError(
                    f"the Modal sandbox did not become ready within {self.start_timeout:.0f} s "
                    "(c.ModalProvider.start_timeout)"
                ) from None
            raise
        return sandbox

    async def bring_up(
        self,
        sandbox: ModalSandbox,
        spec: SandboxSpec,
        progress: ProgressCallback,
        bundle: bytes | None,
        restored: bool,
    ) -> None:
        """Upload a local repository, run the bootstrap, and reach OpenCode through the tunnel."""
        repo_url = spec.repo_url
        if restored:
            # A snapshot of a running sandbox may hold git's lock files of a command cut short.
            await sandbox.run(
                [
                    "find",
                    f"{modal_image.WORKSPACE}/.git",
                    "-maxdepth",
                    "1",
                    "-name",
                    "*.lock",
                    "-type",
                    "f",
                    "-delete",
                ],
                self.call_timeout,
            )
        if bundle is not None:
            repo_url = await self.upload(sandbox, bundle)
        payload = {
            "workspace": modal_image.WORKSPACE,
            "home": modal_image.HOME,
            "repo_url": repo_url,
            "repo_display": spec.repo_display,
            "base_branch": spec.base_branch,
            "branch": spec.work_branch,
            "git_identity": {"name": spec.git_name, "email": spec.git_email},
            # A restored sandbox reuses its workspace and clones nothing: no credential goes near it.
            "git_credential": None if restored else spec.git_credential,
            "marker": sandbox.id,
            "health_timeout": self.start_timeout,
            "max_seconds": spec.max_seconds,
            "port": OPENCODE_PORT,
            "hostname": "0.0.0.0",  # the tunnel reaches the container's address, not its loopback
            "environment": spec.environment,
            "opencode": {
                "bin": modal_image.OPENCODE_BIN,
                "password": spec.password,
                "config": spec.opencode_config,
            },
        }
        process = await sandbox.start_process(sandbox.bootstrap_argv())
        process.stdin.write(json.dumps(payload).encode())
        process.stdin.write_eof()
        await self.call(process.stdin.drain.aio(), self.call_timeout, "starting the bootstrap")
        lines = _lines(process.stdout)
        while True:
            try:
                line = await lines.__anext__()
            except StopAsyncIteration:
                code = await self.call(process.wait.aio(), self.call_timeout, "starting the agent")
                raise SandboxError(
                    f"the sandbox's bootstrap exited during start-up (status {code})"
                ) from None
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("phase") == "failed":
                raise SandboxError(message.get("error") or "the sandbox failed to start")
            if message.get("phase") == "ready":
                break
            await progress(message)
        sandbox.watch(_drain_then_wait(lines, process))
        url = await self.tunnel_url(sandbox)
        sandbox._endpoint = Endpoint(url, spec.password)
        await self.check_tunnel(sandbox._endpoint)
        await progress(message)

    async def upload(self, sandbox: ModalSandbox, bundle: bytes) -> str:
        """Put a local repository's bundle into the sandbox; the path to clone it from."""
        repo_url = f"{modal_image.TABBI_DIR}/upload/source.bundle"
        code, _, err = await sandbox.run(
            ["sh", "-c", 'install -d -m 0755 "${0%/*}" && cat > "$0" && chmod 0644 "$0"', repo_url],
            self.start_timeout,
            input=bundle,
            as_agent=False,
        )
        if code != 0:
            raise SandboxError(
                f"the repository could not be uploaded: {err.decode(errors='replace')[-200:]}"
            )
        return repo_url

    # -- warm sandboxes ---------------------------------------------------------------------------
    def warm_unsupported(self) -> str | None:
        if self.block_network or self.outbound_domain_allowlist is not None:
            return ("a warm sandbox is created before its repository is known, and its network "
                    "rules (block_network, outbound_domain_allowlist) could not name the "
                    "repository's host")
        return None


    async def clone_url(self, sandbox: Sandbox, spec: SandboxSpec) -> str:
        """Tag the sandbox with its owner now that it has one; upload a local repository."""
        assert isinstance(sandbox, ModalSandbox)
        tags = {"tabbi_session": spec.sandbox_id, "tabbi_owner": spec.owner or "unknown",
                "tabbi_server": self.server_tag}
        await self.call(sandbox.sb.set_tags.aio(tags), self.call_timeout, "tagging the sandbox")
        bundle = await self.source_bundle(spec)
        return spec.repo_url if bundle is None else await self.upload(sandbox, bundle)

    async def tunnel_url(self, sandbox: ModalSandbox) -> str:
        tunnels = await self.call(sandbox.sb.tunnels.aio(), self.call_timeout, "finding the sandbox's tunnel")
        tunnel = tunnels.get(OPENCODE_PORT)
        if tunnel is None:
            raise SandboxError("Modal gave the sandbox no tunnel to OpenCode's port")
        return str(tunnel.url).rstrip("/")

    async def check_tunnel(self, endpoint: Endpoint) -> None:
        """OpenCode answers through the tunnel (the bootstrap checked it inside)."""
        deadline = time.monotonic() + min(self.start_timeout, 60)
        why = "no answer"
        async with httpx.AsyncClient(timeout=10, auth=("opencode", endpoint.password)) as http:
            while time.monotonic() < deadline:
                try:
                    response = await http.get(f"{endpoint.url}/global/health")
                    if response.status_code == 200 and response.json().get("healthy"):
                        return
                    why = f"HTTP {response.status_code}"
                except (httpx.HTTPError, ValueError) as exc:
                    why = str(exc) or type(exc).__name__
                await asyncio.sleep(0.5)  # probe interval, bounded by the deadline
        raise SandboxError(
            f"the tunnel to the sandbox's OpenCode did not answer ({why}): check that "
            "this server can reach *.modal.host over HTTPS"
        )

    async def source_bundle(self, spec: SandboxSpec) -> bytes | None:
        """A local repository (a path on this server) as a git bundle to upload; None for URLs."""
        if "://" in spec.repo_url or not os.path.isabs(spec.repo_url):
            return None
        from .modal_push import bundle_local_repository

        bundle = await asyncio.to_thread(bundle_local_repository, spec.repo_url, MAX_BUNDLE)
        return bundle

    # -- snapshots ----------------------------------------------------------------------------
    async def snapshot(self, sandbox: Sandbox, name: str) -> tuple[dict[str, Any], int]:
        assert isinstance(sandbox, ModalSandbox)
        image = await self.call(
            sandbox.sb.snapshot_filesystem.aio(timeout=int(self.snapshot_timeout), ttl=self.snapshot_ttl),
            self.snapshot_timeout + 30,
            "taking a snapshot",
        )
        image_id = str(image.object_id)
        code, out, _ = await sandbox.run(
            ["du", "-sbx", modal_image.WORKSPACE, modal_image.HOME], self.call_timeout, max_output=4096
        )
        size = (
            sum(
                int(line.split()[0])
                for line in out.decode().splitlines()
                if line.split()[:1] != [""] and line.split()[0].isdigit()
            )
            if code in (0, 1)
            else 0
        )
        ref = {"provider": self.name, "image_id": image_id, "name": name, "fallbacks": sandbox.lineage[:2]}
        sandbox.lineage.insert(0, image_id)
        return ref, size

    async def snapshot_image(self, ref: dict[str, Any], progress: ProgressCallback) -> tuple[Any, list[str]]:
        """The image of snapshot ``ref``, else of its newest fallback still there; its lineage."""
        candidates = [str(ref.get("image_id") or ""), *[str(i) for i in ref.get("fallbacks") or []]]
        missing = []
        for index, image_id in enumerate(c for c in candidates if c):
            image = self.modal.Image.from_id(image_id, client=self.client)
            try:
                await asyncio.wait_for(image.build.aio(await self.app()), self.call_timeout)
            except Exception as exc:
                missing.append(f"{image_id} ({self.readable(exc, 'looking it up')})")
                continue
            if index:
                log.warning(
                    "tabbi: snapshot image %s is gone; resuming from the older %s", candidates[0], image_id
                )
                await progress({"phase": "restoring_older_snapshot", "image_id": image_id})
            return image, candidates[index:]
        raise RestoreError(
            "the snapshot could not be restored: its Modal image is gone (expired or deleted): "
            + "; ".join(missing)
            + ". Delete the session's snapshots or start a new session"
        )

    async def delete_snapshot(self, ref: dict[str, Any]) -> None:
        image_id = str(ref.get("image_id") or "")
        if not image_id:
            return
        from modal.experimental import image_delete

        try:
            await self.call(
                image_delete.aio(image_id, client=self.client), self.call_timeout, "deleting a snapshot image"
            )
        except SandboxError as exc:  # it expires by itself (snapshot_ttl)
            log.info("tabbi: snapshot image %s not deleted: %s", image_id, exc)

    # -- restarts and orphans -----------------------------------------------------------------
    async def load_state(self, state: dict[str, Any], password: str | None = None) -> ModalSandbox | None:
        modal_id = state.get("modal_id")
        if state.get("provider") != self.name or not modal_id:
            return None
        try:
            sb = await self.call(
                self.modal.Sandbox.from_id.aio(str(modal_id), client=self.client),
                self.call_timeout,
                "finding the session's sandbox",
            )
            if (
                await self.call(sb.poll.aio(), self.call_timeout, "checking the session's sandbox")
                is not None
            ):
                return None
        except SandboxError as exc:
            log.info("tabbi: Modal sandbox %s not re-attached: %s", modal_id, exc)
            return None
        sandbox = ModalSandbox(self, str(state.get("sandbox_id")), sb, list(state.get("lineage") or []))
        sandbox.watch(_sandbox_end(sb))
        if password:
            url = state.get("url") or await self.tunnel_url(sandbox)
            sandbox._endpoint = Endpoint(str(url), password)
        return sandbox

    async def destroy(self, sandbox_id: str) -> None:
        """End every sandbox of this server tagged for ``sandbox_id`` (a pause's leftovers)."""
        for sb in await self.tagged({"tabbi_session": sandbox_id, "tabbi_server": self.server_tag}):
            await self.call(sb.terminate.aio(), self.call_timeout, "stopping a sandbox")

    async def tagged(self, tags: dict[str, str]) -> list[Any]:
        async def collect() -> list[Any]:
            app = await self.app()
            return [
                sb
                async for sb in self.modal.Sandbox.list.aio(app_id=app.app_id, tags=tags, client=self.client)
            ]

        return await self.call(collect(), self.call_timeout, "listing sandboxes")

    async def reconcile(self, live: dict[str, dict[str, Any] | None], force: bool = False) -> int:
        """Terminate this server's sandboxes that no live session owns: ``live`` maps each live
        session to its stored sandbox state (None while it starts). At most once per
        ``reconcile_interval`` unless ``force``; returns how many were terminated."""
        now = time.monotonic()
        if not force and now - self._last_reconcile < self.reconcile_interval:
            return 0
        self._last_reconcile = now
        ended = 0
        for sb in await self.tagged({"tabbi_server": self.server_tag}):
            tags = await self.call(sb.get_tags.aio(), self.call_timeout, "reading a sandbox's tags")
            session = tags.get("tabbi_session", "")
            state = live.get(session, {}) if session in live else None
            owned = session in live and (not state or state.get("modal_id") in (None, sb.object_id))
            if not owned and session not in self.warm_ids:
                log.info(
                    "tabbi: terminating Modal sandbox %s of %s: no live session owns it",
                    sb.object_id,
                    session or "no session",
                )
                await self.call(sb.terminate.aio(), self.call_timeout, "stopping an orphaned sandbox")
                ended += 1
        return ended

    def check(self) -> dict[str, Any]:
        configured = bool(
            os.environ.get("MODAL_TOKEN_ID")
            or self.client is not None
            or os.path.exists(os.path.expanduser("~/.modal.toml"))
        )
        return {
            "usable": configured,
            "app": self.app_name,
            "detail": None if configured else "no Modal credentials: set MODAL_TOKEN_ID/MODAL_TOKEN_SECRET",
        }


async def _lines(stream: Any) -> AsyncIterator[bytes]:
    """The lines of a Modal byte stream (which arrives in chunks of any size)."""
    pending = b""
    async for chunk in stream:
        pending += chunk.encode() if isinstance(chunk, str) else bytes(chunk)
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line
    if pending:
        yield pending


async def _drain_then_wait(lines: Any, process: Any) -> int:
    """After ``ready``: read the bootstrap's stdout to its end, then its exit status."""
    with contextlib.suppress(StopAsyncIteration):
        while True:
            await lines.__anext__()
    return await process.wait.aio()


async def _sandbox_end(sb: Any) -> int:
    """The exit status of a sandbox re-attached to (its bootstrap's process is not ours)."""
    await sb.wait.aio(raise_on_termination=False)
    code = sb.returncode
    return code if isinstance(code, int) else -1


def _base_urls(config: Any) -> list[str]:
    """Every ``baseURL`` in OpenCode's config (the model gateway's)."""
    found: list[str] = []
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "baseURL" and isinstance(value, str):
                found.append(value)
            else:
                found += _base_urls(value)
    elif isinstance(config, list):
        for value in config:
            found += _base_urls(value)
    return found


def _private(host: str) -> bool:
    """Whether ``host`` is a loopback/private/link-local address or a name for one."""
    if host in ("localhost", "") or host.endswith(".localhost") or host.endswith(".local"):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return address.is_private or address.is_loopback or address.is_link_local
