"""Everything the stand-in knows, shared by its control plane and its command router.

All of it lives on the stand-in's own event loop (its thread): handlers and timers run there,
so the state needs no locks except where tests read it from their own thread (lists and dicts
are only ever replaced or appended to).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from grpclib import GRPCError, Status
from modal_proto import api_pb2

from .ids import new_id
from .images import Store
from .rpc import Recorder, invalid, not_found
from .sandboxes import Sandbox, SandboxGone
from .tunnels import Authority, open_tunnel

MAX_TIMEOUT = 24 * 3600  # Modal's maximum sandbox lifetime
TOKEN_LIFETIME = 3600


@dataclass
class Options:
    """What a test can choose about the stand-in."""

    token_id: str = field(default_factory=lambda: "ak-" + secrets.token_hex(8))
    token_secret: str = field(default_factory=lambda: "as-" + secrets.token_hex(16))
    internet_ports: list[int] = field(default_factory=list)
    installed: dict[str, str] = field(default_factory=dict)  # sandbox path -> host path (read-only)
    users: dict[str, int] = field(default_factory=dict)  # name -> uid (and gid), as `useradd` makes
    list_page_size: int = 50


class State:
    def __init__(self, root: Path, options: Options, recorder: Recorder) -> None:
        self.root = root
        self.options = options
        self.recorder = recorder
        self.store = Store(root)
        self.authority = Authority(root / "tls")
        self.apps: dict[tuple[str, str], str] = {}  # (environment, name) -> app id
        self.sandboxes: dict[str, Sandbox] = {}
        self.by_task: dict[str, Sandbox] = {}
        self.create_requests: list[api_pb2.SandboxCreateV2Request] = []
        self.router_url = ""
        self._key = secrets.token_bytes(32)
        self._tunnel_servers: dict[str, list[asyncio.Server]] = {}
        self._last_created = 0.0
        self.etc = user_files(root / "etc", options.users)

    # -- credentials ------------------------------------------------------------------------------

    def check_token(self, metadata) -> None:
        """The control plane answers only the credentials the client was given."""
        token_id, token_secret = metadata.get("x-modal-token-id"), metadata.get("x-modal-token-secret")
        if not (
            token_id
            and token_secret
            and hmac.compare_digest(token_id, self.options.token_id)
            and hmac.compare_digest(token_secret, self.options.token_secret)
        ):
            raise GRPCError(Status.UNAUTHENTICATED, "Token ID or secret is invalid")

    def jwt(self, claims: dict) -> str:
        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = b64(json.dumps({**claims, "exp": int(time.time()) + TOKEN_LIFETIME}).encode())
        signature = hmac.new(self._key, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{b64(signature)}"

    def claims(self, token: str) -> dict | None:
        """The claims of a token this stand-in signed and that has not expired, else None."""
        try:
            head, body, signature = token.split(".")
            expected = hmac.new(self._key, f"{head}.{body}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(_unb64(signature), expected):
                return None
            claims = json.loads(_unb64(body))
        except (ValueError, TypeError):
            return None
        return claims if claims.get("exp", 0) > time.time() else None

    def router_access(self, sandbox: Sandbox) -> api_pb2.CommandRouterAccess:
        return api_pb2.CommandRouterAccess(url=self.router_url, jwt=self.jwt({"task_id": sandbox.task_id}))

    # -- apps -------------------------------------------------------------------------------------

    def app(self, environment: str, name: str, create: bool) -> str:
        key = (environment or "main", name)
        if key not in self.apps:
            if not create:
                raise not_found(f"App '{name}'")
            self.apps[key] = new_id("ap")
        return self.apps[key]

    # -- sandboxes --------------------------------------------------------------------------------

    def sandbox(self, sandbox_id: str) -> Sandbox:
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is None:
            raise not_found(f"Sandbox {sandbox_id}")
        return sandbox

    def task(self, task_id: str, *, ended_too: bool = False) -> Sandbox:
        """The running sandbox of a task: after it ended, its task is gone (NOT_FOUND), as the
        real command router answers once a task has shut down."""
        sandbox = self.by_task.get(task_id)
        if sandbox is None or not (sandbox.running or ended_too):
            raise not_found(f"Task {task_id}")
        return sandbox

    async def create(self, request: api_pb2.SandboxCreateV2Request) -> Sandbox:
        definition = request.definition
        self.validate(request)
        image = self.store.get(definition.image_id)
        env = self.store.resolve(list(request.secret_sources), list(definition.secret_ids))
        for mount_id in definition.mount_ids:
            if mount_id not in self.store.mounts:
                raise not_found(f"Mount {mount_id}")
        if definition.name and any(
            s.definition.name == definition.name and s.app_id == request.app_id and s.running
            for s in self.sandboxes.values()
        ):
            raise GRPCError(Status.ALREADY_EXISTS, f"Sandbox with name '{definition.name}' already exists")
        self._last_created = max(time.time(), self._last_created + 1e-3)
        sandbox = Sandbox(
            app_id=request.app_id,
            definition=definition,
            image=image,
            env=env,
            tags={t.tag_name: t.tag_value for t in request.tags},
            root=self.root / "sandboxes",
            created_at=self._last_created,
            internet_ports=self.options.internet_ports,
            installed=self.options.installed,
            users=self.options.users,
            etc=self.etc,
            on_end=self._ended,
        )
        self.create_requests.append(request)
        self.sandboxes[sandbox.sandbox_id] = sandbox
        self.by_task[sandbox.task_id] = sandbox
        self._tunnel_servers[sandbox.sandbox_id] = [
            await open_tunnel(self.authority, sandbox, spec.port) for spec in definition.open_ports.ports
        ]
        try:
            await sandbox.start(self.store)
        except SandboxGone:
            raise GRPCError(Status.NOT_FOUND, f"Sandbox {sandbox.sandbox_id} ended while starting") from None
        except Exception as exc:
            await sandbox.end(api_pb2.GenericResult.GENERIC_STATUS_FAILURE, message=f"could not start: {exc}")
            raise
        return sandbox

    def validate(self, request: api_pb2.SandboxCreateV2Request) -> None:
        d = request.definition
        if request.app_id not in self.apps.values():
            raise not_found(f"App {request.app_id}")
        if not d.image_id:
            raise invalid("Sandbox definition has no image")
        if not 0 < d.timeout_secs <= MAX_TIMEOUT:
            raise invalid(f"timeout must be between 1 and {MAX_TIMEOUT} seconds")
        if d.idle_timeout_secs and d.idle_timeout_secs > MAX_TIMEOUT:
            raise invalid(f"idle_timeout must be at most {MAX_TIMEOUT} seconds")
        if d.workdir and not d.workdir.startswith("/"):
            raise invalid("workdir must be an absolute path")
        unsupported = {
            "volume_mounts": d.volume_mounts,
            "nfs_mounts": d.nfs_mounts,
            "cloud_bucket_mounts": d.cloud_bucket_mounts,
            "proxy_id": d.proxy_id,
            "pty_info": d.HasField("pty_info"),
            "unencrypted or h2 ports": [p for p in d.open_ports.ports if p.unencrypted or p.tunnel_type],
        }
        for what, present in unsupported.items():
            if present:
                self.recorder.missing(f"SandboxCreateV2.{what}")
                raise GRPCError(Status.UNIMPLEMENTED, f"the modal stand-in does not implement {what}")
        ports = [p.port for p in d.open_ports.ports]
        if len(set(ports)) != len(ports) or not all(0 < p < 65536 for p in ports):
            raise invalid("open ports must be distinct TCP ports")

    async def terminate(self, sandbox: Sandbox) -> None:
        await sandbox.end(api_pb2.GenericResult.GENERIC_STATUS_TERMINATED)

    def _ended(self, sandbox: Sandbox) -> None:
        for server in self._tunnel_servers.pop(sandbox.sandbox_id, []):
            server.close()
        asyncio.get_running_loop().create_task(sandbox.remove())

    def list_page(self, request: api_pb2.SandboxListRequest) -> list[Sandbox]:
        wanted = {t.tag_name: t.tag_value for t in request.tags}
        found = [
            s
            for s in self.sandboxes.values()
            if (not request.app_id or s.app_id == request.app_id)
            and (request.include_finished or s.running)
            and (not request.before_timestamp or s.created_at < request.before_timestamp)
            and all(s.tags.get(k) == v for k, v in wanted.items())
        ]
        found.sort(key=lambda s: s.created_at, reverse=True)
        return found[: self.options.list_page_size]

    async def close(self) -> None:
        for sandbox in list(self.sandboxes.values()):
            await sandbox.end(api_pb2.GenericResult.GENERIC_STATUS_TERMINATED, message="stand-in stopped")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def user_files(folder: Path, users: dict[str, int]) -> dict[str, str]:
    """``/etc/passwd`` and ``/etc/group`` with ``users`` added to the host's, as the recipe's
    ``useradd`` would have made them: {sandbox path: host file} (none without users)."""
    if not users:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    taken = {*users, *(str(uid) for uid in users.values())}
    for name, line in (("passwd", "{0}:x:{1}:{1}::/home/{0}:/bin/bash"), ("group", "{0}:x:{1}:")):
        # The host's entries, but none with these names or ids (a fresh image has no uid 1000).
        host = [e for e in Path("/etc", name).read_text().splitlines() if not taken & set(e.split(":")[:3])]
        added = [line.format(user, uid) for user, uid in users.items()]
        (folder / name).write_text("\n".join([*host, *added]) + "\n")
        files[f"/etc/{name}"] = str(folder / name)
    return files
