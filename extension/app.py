"""The tabbi server extension: configuration, wiring, start-up and shutdown.

Every setting is a documented trait, settable in ``jupyter_config.py`` as ``c.TabbiExtension.x``;
the ones deployments set from secrets also read an environment variable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import os
import time
from pathlib import Path
from typing import Any, TypeVar

from jupyter_core.paths import jupyter_data_dir
from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Dict, Enum, Float, Instance, Int, List, Type, Unicode, default

from tabbi_sandbox.local import LocalProvider
from tabbi_sandbox.provider import SandboxProvider

from . import admin, encryption, handlers, logs, metrics, models
from . import gateway as model_gateway
from .activity import ActivityReporter
from .agent import AgentSettings
from .budgets import Budgets
from .demo_model import DemoModel
from .environments import EnvironmentRegistry
from .github import GitHubAccounts, GitHubHosts
from .github import handlers as github_handlers
from .github.oauth import DEFAULT_SCOPE, OAuthApp
from .handlers import is_single_user
from .limits import TabbiLimits
from .manager import SessionManager
from .model_config import DEFAULT_PERMISSIONS, PROVIDER_KEYS, ModelConfigError, ModelSettings
from .model_config import build as build_model_config
from .model_config import problem as model_problem
from .pool import WarmPool
from .push import Publisher
from .store import SQLiteStore, Store

T = TypeVar("T")


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


class TabbiExtension(ExtensionApp):
    name = "tabbi"
    description = "AI coding-agent sessions in Jupyter"
    load_other_extensions = True
    #: The embedded backends, so ``--help-all`` shows their traits (Modal's and Convex's classes are
    #: imported only when selected).
    classes = [LocalProvider, SQLiteStore, TabbiLimits, admin.TabbiAdmins, Budgets, WarmPool]

    data_dir = Unicode(
        help="Where tabbi keeps its database, sandboxes and snapshots. Env: TABBI_DATA_DIR."
    ).tag(config=True)

    @default("data_dir")
    def _data_dir_default(self) -> str:
        return _env("TABBI_DATA_DIR") or os.path.join(jupyter_data_dir(), "tabbi")

    opencode_bin = Unicode(
        None,
        allow_none=True,
        help="Path of the OpenCode binary. Unset: TABBI_OPENCODE_BIN, then 'opencode' on PATH, "
        "then the project's pinned install (node_modules/.bin/opencode).",
    ).tag(config=True)

    model = Unicode(
        None,
        allow_none=True,
        help="Default model: provider/model for OpenCode's providers, or the bare model id on "
        "the server named by llm_base_url. Env: TABBI_MODEL.",
    ).tag(config=True)

    @default("model")
    def _model_default(self) -> str | None:
        return _env("TABBI_MODEL")

    extra_models = List(
        Unicode(),
        help="More models people may switch a session to (%tabbi model, --model), beside the "
        "default model and the demo model: provider/model for OpenCode's providers (their key "
        "set), or model ids on the llm_base_url server. %tabbi models lists them.",
    ).tag(config=True)

    llm_base_url = Unicode(
        None,
        allow_none=True,
        help="Base URL (ending in /v1) of an OpenAI-compatible model server. Env: TABBI_LLM_BASE_URL.",
    ).tag(config=True)

    @default("llm_base_url")
    def _llm_base_url_default(self) -> str | None:
        return _env("TABBI_LLM_BASE_URL")

    llm_api_key = Unicode(
        None,
        allow_none=True,
        help="API key for llm_base_url; stays in the server (the model gateway adds it to the "
        "sandbox's model calls). Env: TABBI_LLM_API_KEY.",
    ).tag(config=True)

    @default("llm_api_key")
    def _llm_api_key_default(self) -> str | None:
        return _env("TABBI_LLM_API_KEY")

    llm_pricing = Dict(
        help="Prices of the llm_base_url model in dollars per million tokens, as OpenCode takes "
        "them: {'input': 3, 'output': 15, 'cache_read': 0.3, 'cache_write': 3.75}. OpenCode "
        "reports each message's cost from them and budgets (c.Budgets.*) count it. Unset: the "
        "cost of that model counts as 0 (OpenCode's own providers are priced by OpenCode).",
    ).tag(config=True)

    gateway_url = Unicode(
        None,
        allow_none=True,
        help="This server's base URL as sandboxes reach it, for the model gateway "
        "(<gateway_url>tabbi/gateway/...). Unset: http://127.0.0.1:<port><base_url>, right for "
        "local sandboxes, which share the server's network; set it when sandboxes run elsewhere "
        "(Modal), the server listens on a Unix socket, or serves HTTPS with a private certificate.",
    ).tag(config=True)

    permissions = Dict(
        default_value=DEFAULT_PERMISSIONS,
        help="OpenCode permission rules (allow | ask | deny per tool family). 'ask' makes the "
        "agent wait for a person's answer in the notebook.",
    ).tag(config=True)

    isolation = Enum(
        ["auto", "bwrap", "none"],
        default_value="auto",
        help="Local sandboxes: 'bwrap' requires bubblewrap, 'none' runs plain subprocesses, "
        "'auto' uses bubblewrap where it works and says once in the log when it cannot.",
    ).tag(config=True)

    sandbox_provider_class = Type(
        default_value=LocalProvider,
        klass=SandboxProvider,
        help="The sandbox provider: local processes by default, Modal in production.",
    ).tag(config=True)

    detach_sandboxes = Bool(
        False,
        help="Local sandboxes outlive a crashed server (a clean stop still stops them) and the "
        "next server process re-attaches to them, catching up on what the agent did meanwhile. "
        "Their OpenCode password is kept sealed with encryption_key; a sandbox nobody comes "
        "back for stops itself after max_lifetime + turn_timeout.",
    ).tag(config=True)

    sandbox_provider_options = Dict(
        help="Extra keyword arguments for the sandbox provider class."
    ).tag(config=True)

    store_class = Type(
        default_value=SQLiteStore,
        klass=Store,
        help="The store backend: SQLite (a file in data_dir) by default; "
        "tabbi_extension.store.ConvexStore keeps sessions in Convex (c.ConvexStore.*).",
    ).tag(config=True)

    store_options = Dict(help="Keyword arguments for the store class (a Convex URL, ...).").tag(
        config=True
    )

    start_timeout = Float(90.0, help="Seconds a sandbox may take to become ready.").tag(config=True)
    turn_timeout = Float(1800.0, help="Seconds after which a running turn is aborted.").tag(
        config=True
    )
    model_retries = Int(
        3,
        help="How often OpenCode may retry a failing model call before tabbi ends the turn "
        "with an error (OpenCode alone would retry without end).",
    ).tag(config=True)
    idle_timeout = Float(
        600.0, help="Seconds without activity after which a running session pauses (0: never)."
    ).tag(config=True)
    max_lifetime = Float(
        8 * 3600.0,
        help="Seconds a sandbox may run before it is paused; a running turn is finished first "
        "(0: no limit).",
    ).tag(config=True)
    snapshots_keep = Int(3, help="Snapshots kept per session (the newest).").tag(config=True)
    environments = Bool(
        True,
        help="Keep a warm snapshot per person and repository after its setup script "
        "(.tabbi/setup.sh) ran, and start later sessions on that repository from it "
        "(docs/environments.md). False: every session clones and runs the setup script.",
    ).tag(config=True)
    environment_max_age = Float(
        6 * 3600.0,
        help="Seconds after which a warm snapshot is rebuilt by the next session on its "
        "repository, even if neither the base branch nor the setup script changed (0: never).",
    ).tag(config=True)
    setup_timeout = Float(
        600.0, help="Seconds a repository's setup script (.tabbi/setup.sh) may run."
    ).tag(config=True)
    server_lease = Float(
        30.0,
        help="Seconds this server's lease on its sessions lasts unrenewed (it renews it every "
        "third of that). Servers sharing a data dir or store leave each other's sessions alone, "
        "and take over those of a server whose lease expired (at once, on the same machine, "
        "when that server's process is gone).",
    ).tag(config=True)
    max_prompt_chars = Int(100_000, help="Longest prompt accepted, in characters.").tag(config=True)
    github_url = Unicode(
        help="GitHub's web URL (GitHub Enterprise Server: https://HOST). Env: TABBI_GITHUB_URL."
    ).tag(config=True)

    @default("github_url")
    def _github_url_default(self) -> str:
        return _env("TABBI_GITHUB_URL") or "https://github.com"

    github_api_url = Unicode(
        None,
        allow_none=True,
        help="GitHub's REST API URL. Unset: https://api.github.com for github.com, "
        "github_url + '/api/v3' for GitHub Enterprise Server. Env: TABBI_GITHUB_API_URL.",
    ).tag(config=True)

    @default("github_api_url")
    def _github_api_url_default(self) -> str | None:
        return _env("TABBI_GITHUB_API_URL")

    github_client_id = Unicode(
        None,
        allow_none=True,
        help="Client id of the GitHub OAuth App or GitHub App people sign in with. "
        "Env: TABBI_GITHUB_CLIENT_ID.",
    ).tag(config=True)

    @default("github_client_id")
    def _github_client_id_default(self) -> str | None:
        return _env("TABBI_GITHUB_CLIENT_ID")

    github_client_secret = Unicode(
        None, allow_none=True, help="Its client secret. Env: TABBI_GITHUB_CLIENT_SECRET."
    ).tag(config=True)

    @default("github_client_secret")
    def _github_client_secret_default(self) -> str | None:
        return _env("TABBI_GITHUB_CLIENT_SECRET")

    github_scope = Unicode(
        DEFAULT_SCOPE,
        help="OAuth scopes asked for (OAuth Apps; GitHub Apps ignore scopes and use their "
        "permissions).",
    ).tag(config=True)
    github_login_flow = Enum(
        ["web", "device"],
        default_value="web",
        help="How `%tabbi login` signs in by default: 'web' (a link; GitHub redirects back to "
        "this server) or 'device' (a code to type at GitHub; no callback URL needed).",
    ).tag(config=True)
    github_callback_url = Unicode(
        None,
        allow_none=True,
        help="The OAuth callback URL to send to GitHub. Unset: derived from the request as "
        "<server base URL>/tabbi/github/callback (set it when a proxy rewrites the host).",
    ).tag(config=True)
    public_url = Unicode(
        None,
        allow_none=True,
        help="This server's base URL (with its base_url) as people's browsers reach it, behind "
        "JupyterHub's proxy and any TLS terminator, e.g. https://hub.example.org/services/tabbi/. "
        "GitHub's OAuth callback and links are built from it, whichever route a request came in "
        "by. Env: TABBI_PUBLIC_URL, then JUPYTERHUB_PUBLIC_URL (JupyterHub sets it for servers and "
        "services when c.JupyterHub.public_url is set). Unset: derived from each request, except "
        "under JupyterHub's identity (there a kernel's request has an internal Host).",
    ).tag(config=True)

    @default("public_url")
    def _public_url_default(self) -> str | None:
        return _env("TABBI_PUBLIC_URL") or _env("JUPYTERHUB_PUBLIC_URL")

    encryption_key = Unicode(
        None,
        allow_none=True,
        help="Fernet key(s) encrypting tokens at rest, comma-separated (the first encrypts). "
        "Unset on a single-user server: generated into data_dir/encryption.key (0600). Required "
        "on multi-user servers with GitHub configured. Env: TABBI_ENCRYPTION_KEY.",
    ).tag(config=True)

    @default("encryption_key")
    def _encryption_key_default(self) -> str | None:
        return _env("TABBI_ENCRYPTION_KEY")

    single_user = Bool(
        None,
        allow_none=True,
        help="Whether everyone who can reach this server is one person (then sessions are filed "
        "under local_owner). Unset: true for Jupyter's own token/password identity, false for "
        "identity providers with real user names, such as JupyterHub's.",
    ).tag(config=True)
    local_owner = Unicode(
        help="Owner name of sessions on a single-user server (default: the OS user)."
    ).tag(config=True)

    @default("local_owner")
    def _local_owner_default(self) -> str:
        return getpass.getuser()

    local_repo_roots = List(
        Unicode(),
        default_value=None,
        allow_none=True,
        help="Folders a local-path 'repo' must lie in (compared after resolving symlinks); "
        "'{username}' stands for the requesting person (a server shared by several people: "
        "['/home/{username}']). Unset: the server's root directory, the files people already "
        "reach through Jupyter. data_dir is never allowed. [] turns local paths off.",
    ).tag(config=True)
    websocket_ping_interval = Float(
        30.0,
        help="Seconds between keep-alive pings on the event stream WebSocket (0: none); a "
        "client that does not answer within the same time is disconnected.",
    ).tag(config=True)
    activity_interval = Float(
        60.0,
        help="Seconds between reports of activity to Jupyter while a session starts or runs a "
        "turn, so idle culling does not stop the server mid-turn (0: never report).",
    ).tag(config=True)

    log_style = Enum(
        ["text", "json"],
        default_value="text",
        help="Format of tabbi's log lines on stderr: 'text' (Jupyter's layout, the event's fields "
        "as key=value) or 'json' (one object per line with event, session and owner; Jupyter's "
        "own lines become JSON too). The hub service defaults to 'json'. Env: TABBI_LOG_STYLE.",
    ).tag(config=True)

    @default("log_style")
    def _log_style_default(self) -> str:
        return _env("TABBI_LOG_STYLE") or "text"

    manager = Instance(SessionManager, allow_none=True)
    github = Instance(GitHubAccounts, allow_none=True)
    store = Instance(Store, allow_none=True)
    provider = Instance(SandboxProvider, allow_none=True)
    gateway = Instance(model_gateway.ModelGateway, allow_none=True)
    pool = Instance(WarmPool, allow_none=True)
    demo_model = Instance(DemoModel, args=(), help="The demo model (TABBI_MODEL=demo), started on first use.")

    def initialize_settings(self) -> None:
        logs.install(self.log_style, self.serverapp.log.getEffectiveLevel(), [self.serverapp.log, self.log])
        data = Path(self.data_dir)
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = self.make_store(data)
        self.provider = self.make_provider(data)
        secrets = self.make_secret_box(data)
        model_settings = self.model_settings()
        if (trouble := model_problem(model_settings)) is not None:
            self.log.warning("tabbi: %s; sessions cannot start until it is", trouble)
        self.gateway = model_gateway.ModelGateway(
            lambda: model_settings, self.server_url, self.store.get_session, secrets,
            warm=lambda session_id: session_id in self.provider.warm_ids,
        )
        settings = AgentSettings(
            model=dataclasses.replace(model_settings, gateway=self.gateway),
            github_url=self.github_url,
            turn_timeout=self.turn_timeout,
            model_retries=self.model_retries,
            idle_timeout=self.idle_timeout,
            max_lifetime=self.max_lifetime,
            snapshots_keep=self.snapshots_keep,
            secrets=secrets,
            budgets=self.configured(Budgets, {}, {}),
            environments=EnvironmentRegistry(data / "environments.json", self.provider,
                                             self.environment_max_age, self.setup_timeout)
            if self.environments else None,
        )
        self.github = self.make_github(secrets)
        self.pool = WarmPool(self.provider, settings, parent=self)
        self.manager = SessionManager(self.store, self.provider, settings, self.github.git_access,
                                      lease_seconds=self.server_lease, pool=self.pool)
        metrics.watch(self.manager)
        self._ready_lock = asyncio.Lock()
        self._ready = False
        self.activity = ActivityReporter(self.manager.agents, self.serverapp.web_app.settings,
                                         self.activity_interval)
        contents_root = getattr(self.serverapp.contents_manager, "root_dir", None)
        self.settings.update(
            tabbi_ready=self.ensure_started,
            tabbi_manager=self.manager,
            tabbi_health=self.health,
            tabbi_github_url=self.github_url,
            tabbi_single_user=self.single_user,
            tabbi_local_owner=self.local_owner,
            tabbi_max_prompt_chars=self.max_prompt_chars,
            tabbi_github=self.github,
            tabbi_publisher=Publisher(self.github),
            tabbi_github_login_flow=self.github_login_flow,
            tabbi_github_callback_url=self.github_callback_url,
            tabbi_public_url=self.public_url,
            tabbi_urls_from_requests=not type(self.serverapp.identity_provider).__module__.startswith(
                "jupyterhub."),
            tabbi_data_dir=str(data),
            tabbi_local_repo_roots=list(
                self.local_repo_roots
                if self.local_repo_roots is not None
                else [contents_root or self.serverapp.root_dir]
            ),
            tabbi_websocket_ping_interval=self.websocket_ping_interval,
            tabbi_gateway=self.gateway,
            tabbi_limits=TabbiLimits(self.store, parent=self),
            tabbi_admins=admin.TabbiAdmins(parent=self),
            tabbi_pool=self.pool,
        )

    def model_settings(self) -> ModelSettings:
        """The model configuration (traits and provider keys of the environment); the doctor
        checks the same one."""
        return ModelSettings(
            model=self.model,
            llm_base_url=self.llm_base_url,
            llm_api_key=self.llm_api_key,
            provider_keys={k: os.environ[k] for k in PROVIDER_KEYS if os.environ.get(k)},
            permissions=dict(self.permissions),
            demo=self.demo_model,
            pricing=dict(self.llm_pricing),
            extra_models=tuple(self.extra_models),
        )

    def server_url(self) -> str:
        """Where a sandbox reaches this server: ``gateway_url``, else loopback on its port (local
        sandboxes share the server's network namespace)."""
        if self.gateway_url:
            return self.gateway_url
        app = self.serverapp
        scheme = "https" if app.certfile else "http"
        ip = app.ip or "localhost"
        if ip in ("localhost", "127.0.0.1", "0.0.0.0", "*"):
            host = "127.0.0.1"
        elif ip in ("::", "::1"):
            host = "[::1]"
        else:  # listening on one address only
            host = f"[{ip}]" if ":" in ip else ip
        return f"{scheme}://{host}:{app.port}{app.base_url}"

    def make_secret_box(self, data: Path) -> encryption.SecretBox | None:
        """The key for secrets at rest, when something needs one: GitHub tokens, or the OpenCode
        passwords of sandboxes that outlive a crash. A single-user server makes one; a
        multi-user server must be given one (a key generated next to the database would protect
        nothing): without it, GitHub sign-in refuses to start and re-attaching is off."""
        if not self.github_client_id and not self.provider.survives_restart:
            return None
        single = is_single_user(self.single_user, self.serverapp.identity_provider)
        try:
            return encryption.load(self.encryption_key, data, generate=single)
        except encryption.EncryptionKeyError as exc:
            if self.github_client_id:
                self.log.critical("tabbi: %s", exc)
                raise SystemExit(f"tabbi: {exc}") from None
            self.log.warning("tabbi: sandboxes will not be re-attached after a restart: %s", exc)
            return None

    def make_github(self, secrets: encryption.SecretBox | None) -> GitHubAccounts:
        """GitHub sign-in when a client id is configured (its tokens sealed by ``secrets``)."""
        hosts = GitHubHosts(self.github_url, self.github_api_url)
        if not self.github_client_id:
            return GitHubAccounts(self.store, None, None, hosts)
        app = OAuthApp(self.github_client_id, self.github_client_secret or "", hosts, self.github_scope)
        return GitHubAccounts(self.store, secrets, app, hosts)

    def make_store(self, data: Path) -> Store:
        defaults: dict[str, Any] = {"path": data / "tabbi.sqlite3"} if issubclass(
            self.store_class, SQLiteStore) else {}
        return self.configured(self.store_class, defaults, self.store_options)

    def make_provider(self, data: Path) -> SandboxProvider:
        defaults: dict[str, Any] = {}
        if issubclass(self.sandbox_provider_class, LocalProvider):
            legacy = {"isolation": "isolation", "opencode_bin": "opencode_bin",
                      "start_timeout": "start_timeout", "detach_sandboxes": "detach"}
            defaults = {"root": data / "sandboxes", "snapshot_root": data / "snapshots",
                        "log_root": data / "logs"}
            defaults.update({mine: getattr(self, ours) for ours, mine in legacy.items()})
        return self.configured(self.sandbox_provider_class, defaults, self.sandbox_provider_options)

    def configured(self, cls: type[T], defaults: dict[str, Any], options: dict[str, Any]) -> T:
        """``cls(parent=self)`` given tabbi's defaults and the legacy ``*_options``, except where
        the class's own config section (``c.LocalProvider.x``, also of a base class) sets the
        trait: the class's section is where a backend is configured, so it wins."""
        explicit: set[str] = set()
        for klass in cls.mro():
            section = self.config.get(klass.__name__)
            if section is not None and klass.__name__ != "object":
                explicit.update(section)
        kwargs = {k: v for k, v in {**defaults, **options}.items() if k not in explicit}
        return cls(parent=self, **kwargs)

    def initialize_handlers(self) -> None:
        self.handlers.extend([*handlers.routes(), *admin.routes(), *github_handlers.routes(),
                              *model_gateway.routes(), *models.routes()])

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        await self.ensure_started()

    async def ensure_started(self) -> None:
        """Open the store and reconcile sessions, once. Called at server start and awaited by
        every request, so a request that arrives first (or a server started without the
        post-start hook, as in pytest-jupyter) still finds everything ready."""
        if self._ready:
            return
        async with self._ready_lock:
            if self._ready:
                return
            assert self.store is not None and self.manager is not None
            await self.store.open()
            await self.manager.startup()
            self.activity.start()
            self._ready = True
            self.log.info("tabbi: data in %s, sandboxes by %s", self.data_dir, self.provider.name)

    def current_activity(self) -> list[str]:
        """Sessions at work (Jupyter's idle shutdown waits for them); see ``activity``."""
        return self.activity.working() if self.manager is not None else []

    async def stop_extension(self) -> None:
        await self.activity.stop()
        if self.github is not None:
            await self.github.close()
        if self.gateway is not None:
            await self.gateway.close()
        await asyncio.to_thread(self.demo_model.stop)  # waits for its serving thread to end
        if self.manager is not None:
            await self.manager.shutdown()
        if self.store is not None:
            await self.store.close()
        logs.uninstall()

    async def health(self) -> dict[str, Any]:
        """``GET /tabbi/api/health``: is every dependency of a session usable right now?"""
        started = time.monotonic()
        store_ok = await self.store.ping() if self.store else False
        check = await asyncio.to_thread(self.provider.check) if self.provider else {}
        sandbox = {"provider": getattr(self.provider, "name", None), **check}
        opencode = sandbox.pop("opencode", None)  # providers that run a binary of this machine
        model: dict[str, Any] = {"default": self.model, "custom_endpoint": bool(self.llm_base_url)}
        try:
            build_model_config(self.manager.settings.model if self.manager else ModelSettings())
            model["configured"] = True
        except ModelConfigError as exc:
            model.update(configured=False, detail=str(exc))
        trouble = self.store.trouble() if self.store else None
        store: dict[str, Any] = {"reachable": store_ok, "backend": type(self.store).__name__}
        if trouble:
            store["detail"] = trouble
        ok = store_ok and not trouble and sandbox.get("usable", False) and model["configured"]
        return {
            "status": "ok" if ok else "degraded",
            "store": store,
            **({"opencode": opencode} if opencode is not None else {}),
            "sandbox": sandbox,
            "model": model,
            "checked_in_ms": round((time.monotonic() - started) * 1000, 1),
        }
