"""The warm pool: sandboxes started ahead of demand, so that a new session is running about as
soon as its repository is cloned, not after OpenCode's own cold start.

A pooled sandbox (``SandboxProvider.prepare``) runs OpenCode, healthy, in a workspace it has
already opened (an empty git repository), with no repository and nobody's secret in it. It is
reserved for one future session: its id is that session's id (so its folder, process marker,
Modal tags and model gateway route need no renaming), and its OpenCode's gateway token is
derived from its own random password, which the gateway honours only once a session of that id
exists and ``SessionAgent._boot`` has issued the grant (at assignment). The person's GitHub
token reaches it only for the clone, after it was taken (``SandboxProvider.assign``). A sandbox
is taken once and never returned: one that is not used (a session on another model, a failed
clone, a server stopping) is destroyed.

The pool fills only on intent (``warm``: a kernel loading tabbi, a panel opening), sequentially,
in the background, within ``size`` and ``max_memory_mb``, and empties itself after
``idle_seconds`` without intent, so a server nobody uses holds no OpenCode. Providers that cannot
pool as configured (``warm_unsupported``) leave it empty: every start is then cold, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

from traitlets import Float, Int
from traitlets.config import LoggingConfigurable

from tabbi_sandbox.provider import SandboxError, SandboxProvider, SandboxSpec, WarmSandbox

from . import model_config
from .agent import AgentSettings
from .gateway import ModelGateway, derive_token

log = logging.getLogger(__name__)

MB = 1 << 20
#: What one pooled sandbox is assumed to hold until one was measured (OpenCode ~315 MB at start).
FIRST_ESTIMATE = 400 * MB


class PoolBusy(Exception):
    """A person asked to warm again sooner than ``warm_interval`` allows."""

    def __init__(self, retry_after: float):
        super().__init__(f"asked to warm too often; try again in {retry_after:.0f} s")
        self.retry_after = retry_after


class WarmPool(LoggingConfigurable):
    """Warm sandboxes for new sessions on the server's default model (``c.WarmPool.*``)."""

    size = Int(
        1,
        help="Warm sandboxes kept ready for new sessions (0: none, every start is cold). Each "
        "holds an idle OpenCode (about 300-400 MB on the local provider).",
    ).tag(config=True)
    max_memory_mb = Int(
        1536,
        help="Memory (MB) the warm sandboxes together may hold: no sandbox is added that would "
        "take them above it (measured on the local provider; Modal's are not counted here).",
    ).tag(config=True)
    idle_seconds = Float(
        900.0,
        help="Seconds after the last sign of intent (a kernel loading tabbi, a panel opening, a "
        "session starting) after which the warm sandboxes are stopped.",
    ).tag(config=True)
    warm_interval = Float(
        5.0, help="Seconds one person must wait between two warm requests (POST /tabbi/api/warm)."
    ).tag(config=True)
    refill_delay = Float(
        20.0,
        help="Seconds after a session took a warm sandbox before the pool starts another: the "
        "session's own start (OpenCode reading the new workspace) goes first on a small machine.",
    ).tag(config=True)

    def __init__(self, provider: SandboxProvider, settings: AgentSettings, **kwargs: Any):
        super().__init__(**kwargs)
        self.provider = provider
        self.settings = settings
        self._ready: list[WarmSandbox] = []
        #: Taken by a session, not yet assigned or discarded by the provider: ended at shutdown.
        self._lent: list[WarmSandbox] = []
        self._filling = False
        self._active_until = 0.0
        self._retry_at = 0.0
        self._failures = 0
        #: The most one warm sandbox was measured to hold (0: none measured yet).
        self._measured = 0
        self._asked: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self._closed = False
        self._unsupported_said = False
        self._ending: set[asyncio.Task] = set()

    # -- what the server asks -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"size": self.size, "ready": len(self._ready), "starting": self._filling}

    def warm(self, owner: str) -> dict[str, Any]:
        """Someone is about to start a session: keep the pool full for the next ``idle_seconds``.
        A no-op when it is full. Raises ``PoolBusy`` when ``owner`` asks too often."""
        now = time.monotonic()
        last = self._asked.get(owner)
        if last is not None and now - last < self.warm_interval:
            raise PoolBusy(self.warm_interval - (now - last))
        self._asked[owner] = now
        self._extend(now)
        return self.status()

    def take(self, model: str | None) -> WarmSandbox | None:
        """A ready warm sandbox for a new session on ``model``, now reserved for it (its id is
        the session's id); None when there is none (the start is then cold). Never blocks."""
        self._lent = [w for w in self._lent if not w.consumed]
        self._extend(time.monotonic())  # a session starting is intent too: refill behind it
        for warm in list(self._ready):
            if warm.sandbox.poll() is not None or warm.consumed:  # died idle: never handed out
                self._ready.remove(warm)
                self._spawn_discard(warm)
                continue
            if warm.model == model:
                self._ready.remove(warm)
                self._lent.append(warm)
                self._retry_at = max(self._retry_at, time.monotonic() + self.refill_delay)
                self._wake.set()
                return warm
        return None

    async def shutdown(self) -> None:
        """Stop filling and end every warm sandbox not assigned to a session."""
        self._closed = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        left = [*self._ready, *(w for w in self._lent if not w.consumed)]
        self._ready.clear()
        self._lent.clear()
        await asyncio.gather(*(self._discard(w) for w in left))

    # -- filling ----------------------------------------------------------------------------------
    def _extend(self, now: float) -> None:
        if self._closed or self.size <= 0:
            return
        self._active_until = max(self._active_until, now + self.idle_seconds)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._run())
        self._wake.set()

    async def _run(self) -> None:
        """Fill the pool one sandbox at a time while there is intent and room; empty it once the
        intent has lapsed. Wakes on ``_wake`` (intent, a take) or at the next deadline."""
        while not self._closed:
            now = time.monotonic()
            if now >= self._active_until:
                await self._drain()
                return  # the next intent starts a new runner
            if now >= self._retry_at and len(self._ready) < self.size and await self._room():
                await self._add_one()
                continue
            self._wake.clear()
            deadline = min(self._active_until, self._retry_at if self._retry_at > now else self._active_until)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.01, deadline - now))

    async def _room(self) -> bool:
        """Whether one more sandbox fits under ``max_memory_mb``."""
        held = 0
        for warm in self._ready:
            measured = await asyncio.to_thread(self.provider.memory_held, warm.sandbox)
            held += measured or self._estimate
        return held + self._estimate <= self.max_memory_mb * MB

    @property
    def _estimate(self) -> int:
        return self._measured or FIRST_ESTIMATE

    async def _add_one(self) -> None:
        why = self.provider.warm_unsupported()
        if why is not None:
            if not self._unsupported_said:
                self._unsupported_said = True
                self.log.info("tabbi: no warm sandboxes: %s", why)
            self._retry_at = float("inf")
            return
        model = self.settings.model.model
        sandbox_id = "ses-" + secrets.token_hex(6)
        password = secrets.token_urlsafe(24)
        try:
            config = self._config(sandbox_id, password, model)
            lifetime = self.settings.max_lifetime
            spec = SandboxSpec(sandbox_id=sandbox_id, repo_url="", repo_display="", work_branch="",
                               opencode_config=config, password=password,
                               max_seconds=lifetime + self.settings.turn_timeout if lifetime else None)
            started = time.monotonic()
            self._filling = True
            warm = await self.provider.prepare(spec)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # SandboxError, ModelConfigError, or a defect: never a hot loop
            if not isinstance(exc, (SandboxError, model_config.ModelConfigError)):
                self.log.exception("tabbi: starting a warm sandbox failed unexpectedly")
            self._failures += 1
            pause = min(600.0, 15.0 * 2 ** self._failures)
            self._retry_at = time.monotonic() + pause
            self.log.warning("tabbi: a warm sandbox could not be started (%s); next try in %.0f s",
                             exc, pause)
            return
        finally:
            self._filling = False
        warm.model = model
        self._failures = 0
        if self._closed or time.monotonic() >= self._active_until:
            await self._discard(warm)
            return
        self._ready.append(warm)  # first: from here on, shutdown ends it
        measured = await asyncio.to_thread(self.provider.memory_held, warm.sandbox)
        self._measured = max(self._measured, measured or 0)
        self.log.info("tabbi: warm sandbox %s ready in %.1f s", warm.id, time.monotonic() - started)

    def _config(self, sandbox_id: str, password: str, model: str | None) -> dict[str, Any]:
        """OpenCode's config for the session that will take this sandbox, exactly as
        ``model_config.for_sandbox`` will make it then, but without issuing the gateway grant
        (the token is inert until the session exists and issues it)."""
        gateway = self.settings.model.gateway
        access = None
        if isinstance(gateway, ModelGateway):
            access = model_config.GatewayAccess(gateway.base_url(sandbox_id), derive_token(password))
        return model_config.build(self.settings.model, model, access).config

    async def _drain(self) -> None:
        ready, self._ready = self._ready, []
        await asyncio.gather(*(self._discard(w) for w in ready))

    async def _discard(self, warm: WarmSandbox) -> None:
        try:
            await self.provider.discard(warm)
        except Exception:  # it is gone or going; nothing else depends on it
            log.warning("tabbi: ending warm sandbox %s failed", warm.id, exc_info=True)

    def _spawn_discard(self, warm: WarmSandbox) -> None:
        task = asyncio.ensure_future(self._discard(warm))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)
