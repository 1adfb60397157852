"""One ``SessionAgent`` per session: the session's state machine. It owns the sandbox, the
connection to the agent runtime in it, the prompt queue and the turns; its parts live next door:
the event log (``eventlog.py``), the agent runtime (``runtime.py``, OpenCode in ``opencode.py``),
snapshot bookkeeping (``snapshots.py``) and the states with their transitions (``states.py``).

Guarantees it keeps, and where:
- every event is persisted before any client sees it, with the next ``seq`` (``EventLog``);
- prompts are persisted first and delivered one at a time, in order, only while running (``_pump``);
- every turn ends with exactly one ``turn.finished``, whatever fails (``_finish_turn``, called from the
  SSE feed, from the prompt call's failure, from the watchdog and from ``_fault``);
- a fault (the agent or the sandbox dying, the feed lost) ends the turn, reports a readable error,
  moves the session to ``error`` (no prompt is delivered meanwhile), and a queued or next prompt
  starts it again on the same workspace (``_fault``);
- a snapshot is of a quiet workspace: no turn begins while one is taken (``_hold``);
- a restore that fails leaves the session paused with its snapshots untouched (``_boot``).

Between turns, at most one thing holds the running workspace (``_hold``): a snapshot, a pause, a
push, or the recovery from a fault. The prompt pump delivers only when nothing does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tabbi_sandbox.provider import (
    Endpoint,
    RestoreError,
    Sandbox,
    SandboxError,
    SandboxProvider,
    SandboxSpec,
    WarmSandbox,
)

from . import logs, metrics, model_config, states, workspace
from .encryption import SecretBox
from .environments import EnvironmentRegistry, EnvironmentStart
from .eventlog import EventLog, with_retries
from .github.accounts import GitAccess, GitHubError
from .opencode import OpenCodeRuntime
from .runtime import AgentRuntime, AgentRuntimeError, Signals, Update
from .snapshots import SnapshotKeeper
from .store import Event, Prompt, SessionRecord, Snapshot, Store
from .validation import RepoSpec, parse_repo

if TYPE_CHECKING:
    from .budgets import Budgets

#: ``owner -> GitAccess | None``: the credential for a GitHub clone (None: not signed in).
GitAccessLookup = Callable[[str], Awaitable[GitAccess | None]]

log = logging.getLogger(__name__)

PERMISSION_REPLIES = ("once", "always", "reject")

#: What can hold the running workspace between turns (``SessionAgent._hold``).
HOLD_SNAPSHOT, HOLD_PAUSE, HOLD_FAULT = "a snapshot", "pausing", "recovering from a fault"


class AgentError(Exception):
    """A request the session cannot honour now; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class AgentSettings:
    model: model_config.ModelSettings = field(default_factory=model_config.ModelSettings)
    github_url: str = "https://github.com"
    turn_timeout: float = 1800.0
    connect_timeout: float = 30.0
    #: Retries of a failing model call OpenCode may make before tabbi ends the turn.
    model_retries: int = 3
    store_retries: int = 3
    #: Snapshots kept per session (the newest ones).
    snapshots_keep: int = 3
    #: Seconds without activity after which a running session pauses itself (0: never).
    idle_timeout: float = 600.0
    #: Seconds a sandbox may run before it is paused (after its current turn; 0: no limit).
    max_lifetime: float = 8 * 3600.0
    #: Seconds a clean server stop may spend snapshotting a quiet running session before it stops it.
    shutdown_snapshot_timeout: float = 60.0
    #: Seals the OpenCode password kept with a sandbox that can outlive the server, so that the
    #: next server process can re-attach (None: no re-attach).
    secrets: SecretBox | None = None
    #: Cost and running-time budgets (``budgets.py``); None: none.
    budgets: Budgets | None = None
    #: Per-person warm snapshots of repositories with a setup script (None: none are kept).
    environments: EnvironmentRegistry | None = None


@dataclass
class Turn:
    prompt_id: str
    outcome: str = "completed"
    error: str | None = None
    watchdog: asyncio.Task | None = None
    #: The agent has this turn's prompt. Until then an idle signal belongs to the turn
    #: before (OpenCode reports idle more than once, late, after an abort).
    acknowledged: bool = False
    #: Since when (epoch seconds) the turn waits for the model (None: it does not); see
    #: ``SessionAgent._set_waiting``.
    waiting_since: float | None = None
    #: Tool calls of the turn that have not ended: while any runs, the agent works, not the model.
    tools_running: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    #: The agent's messages of this turn, whose tokens and cost its ``turn.finished`` reports.
    messages: set[str] = field(default_factory=set)


class StartSteps:
    """Where a start's time goes: milliseconds per step, from ``since`` (when the session was
    asked for) to running, logged with ``session.ready`` (and read by ``bench/bench_pool.py``)."""

    def __init__(self, since: float | None = None):
        self.since = self._last = since if since is not None else time.monotonic()
        self.ms: dict[str, int] = {}

    def mark(self, step: str) -> None:
        """``step`` ended now (it began where the previous one ended)."""
        now = time.monotonic()
        self.ms[step] = self.ms.get(step, 0) + round((now - self._last) * 1000)
        self._last = now

    @property
    def total_ms(self) -> int:
        return round((time.monotonic() - self.since) * 1000)


class SessionAgent:
    def __init__(
        self,
        record: SessionRecord,
        *,
        store: Store,
        provider: SandboxProvider,
        settings: AgentSettings,
        git_access: GitAccessLookup | None = None,
        runtime_class: Callable[[Endpoint], AgentRuntime] = OpenCodeRuntime,
    ):
        self.record = record
        self.git_access = git_access
        self.store = store
        self.provider = provider
        self.settings = settings
        self.runtime_class = runtime_class
        self.events = EventLog(record.id, store, settings.store_retries)
        self.snapshots = SnapshotKeeper(record.id, store, provider, self.events,
                                        settings.snapshots_keep, settings.store_retries)
        self._lifecycle = asyncio.Lock()
        self._wake = asyncio.Event()
        self._turn: Turn | None = None
        self._sandbox: Sandbox | None = None
        self._runtime: AgentRuntime | None = None
        self._model_ref: dict[str, str] | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._user_messages: set[str] = set()
        #: Held while applying the agent's events, so a catch-up and the live feed take turns.
        self._applying = asyncio.Lock()
        #: What holds the workspace between turns (``HOLD_*`` or a service's name, e.g. "push"),
        #: or None. No turn begins while something does.
        self._hold: str | None = None
        self._last_activity = time.monotonic()
        self._running_since = time.monotonic()
        self._usage = metrics.UsageCounter()
        self.log = logs.SessionLog(log, record.id, record.owner)
        #: A warm sandbox reserved for this session's first start (``pool.WarmPool.take``).
        self.warm: WarmSandbox | None = None
        #: The next start's step timings (made when the session was asked for; else at start).
        self.steps: StartSteps | None = None
        #: The repository's environment at the first start (``environments.py``); None after a
        #: restart of the server (the session then resumes from its own snapshots).
        self.environment: EnvironmentStart | None = None

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def state(self) -> str:
        return self.record.state

    @property
    def busy(self) -> bool:
        return self._turn is not None

    @property
    def has_sandbox(self) -> bool:
        return self._sandbox is not None

    @property
    def last_activity(self) -> float:
        """``time.monotonic()`` of the last prompt or turn end (what ``idle_timeout`` counts from)."""
        return self._last_activity

    @property
    def running_since(self) -> float | None:
        """Since when (epoch seconds) the sandbox runs; None while it does not."""
        if self.state != states.RUNNING:
            return None
        return time.time() - (time.monotonic() - self._running_since)

    @property
    def current_turn(self) -> Turn | None:
        return self._turn

    def describe(self) -> dict[str, Any]:
        waiting = self._turn.waiting_since if self._turn is not None else None
        environment = self.environment.status if self.environment is not None else None
        return {**self.record.public(), "busy": self.busy, "waiting_since": waiting,
                "last_seq": self.events.last_seq, "environment": environment}

    async def info(self) -> dict[str, Any]:
        """``describe()`` and the session's model use so far: ``usage: {tokens, cost}`` as
        OpenCode reported it (None when it cannot be read now)."""
        budgets = self.settings.budgets
        usage = await budgets.model_usage_or_none(self.store, self.id) if budgets is not None else None
        return {**self.describe(), "usage": usage}

    async def load(self) -> None:
        """Pick up the log where it stands and start the prompt pump."""
        await self.events.load()
        self._spawn("pump", self._pump())

    # -- events -------------------------------------------------------------------------------
    def subscribe(self) -> asyncio.Queue[Event]:
        return self.events.subscribe()

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self.events.unsubscribe(queue)

    async def _emit(self, type_: str, data: dict[str, Any]) -> Event:
        return await self.events.append(type_, data)

    async def announce(self, type_: str, data: dict[str, Any]) -> Event:
        """Add an event to the session's log on behalf of a service acting on it (a push)."""
        return await self._emit(type_, data)

    async def _retry_store(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """Store writes are retried with backoff (see ``eventlog.with_retries``)."""
        return await with_retries(call, self.settings.store_retries)

    async def _set_state(self, new: str, **detail: Any) -> None:
        if new != self.record.state or new == states.ERROR:
            states.check_transition(self.record.state, new)
        error = detail.get("error") if new == states.ERROR else None
        previous, self.record.state, self.record.error = self.record.state, new, error
        self.log.event(logging.WARNING if new == states.ERROR else logging.INFO, "session.state",
                       f"session is {new}", state=new, previous=previous, error=error,
                       **{k: detail[k] for k in ("phase", "reason") if k in detail})
        await self._retry_store(lambda: self.store.update_session(self.id, state=new, error=error))
        await self._emit("session.status", {"state": new, **detail})

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Bring the sandbox up (again). Returns at once; progress arrives as events."""
        async with self._lifecycle:
            if self.state in states.LIVE or self.state == states.DELETED:
                return
            await self._set_state(states.STARTING, phase="creating")
            self._spawn("boot", self._boot())

    async def _boot(self) -> None:
        warm, self.warm = self.warm, None
        try:
            await self._boot_from(warm)
        finally:
            if warm is not None and not warm.consumed:  # failed or cancelled before it took it
                with contextlib.suppress(SandboxError):
                    await asyncio.shield(self.provider.discard(warm))

    async def _boot_from(self, warm: WarmSandbox | None) -> None:
        started = time.monotonic()
        steps, self.steps = self.steps or StartSteps(started), None
        steps.mark("accept")  # the request: pool take, store writes, the agent, STARTING

        def took(outcome: str) -> None:  # the start's duration, by how it ended
            seconds = time.monotonic() - started
            metrics.SANDBOX_START_SECONDS.labels(self.provider.name, outcome).observe(seconds)

        try:
            # OpenCode's, random per sandbox start (a warm sandbox's OpenCode already has one)
            password = warm.password if warm else secrets.token_urlsafe(24)
            setup = model_config.for_sandbox(self.settings.model, self.id, password, self.record.model)
            repo = parse_repo(self.record.repo, self.settings.github_url)
            access, why_anonymous = await self._clone_access(repo)
            spec = SandboxSpec(
                sandbox_id=self.id,
                repo_url=repo.url,
                repo_display=repo.display,
                work_branch=self.record.work_branch,
                base_branch=self.record.base_branch,
                opencode_config=setup.config,
                password=password,
                read_only_paths=[repo.local_path] if repo.local_path else [],
                git_credential=access.credential if access else None,
                owner=self.record.owner,
                max_seconds=(self.settings.max_lifetime + self.settings.turn_timeout)
                if self.settings.max_lifetime else None,
            )
            self._model_ref = setup.model_ref
            latest = await self.snapshots.latest()
            restore = latest.ref if latest else None
            environment = self.environment if latest is None and self.record.base_commit is None else None
            if environment is not None:
                spec.environment, warm_snapshot = await environment.plan()
                spec.opencode_config = environment.opencode_config(spec.opencode_config)
                restore = warm_snapshot
                if environment.warm is not None:
                    await self._emit("session.status", {"state": states.STARTING, "phase": "warm_snapshot",
                                                        "snapshot": environment.warm.id})
            steps.mark("plan")  # model config, the credential, snapshots, the environment
            try:
                try:
                    self._sandbox = await self.provider.start(spec, self._on_progress, restore, warm)
                except RestoreError:
                    if environment is None or environment.warm is None:
                        raise
                    # The warm snapshot is unusable (retired meanwhile, damaged): start cold.
                    spec.environment, spec.opencode_config = await environment.fall_back(spec.opencode_config)
                    await self.provider.destroy(self.id)
                    self._sandbox = await self.provider.create(spec, self._on_progress)
            except SandboxError as exc:
                if why_anonymous and "clone" in str(exc):
                    raise SandboxError(f"{exc} ({why_anonymous})") from None
                raise
            steps.mark("sandbox")  # a cold create, or a warm sandbox's clone and fence
            if environment is not None and environment.will_build:
                # The warm snapshot is taken before the session's conversation exists.
                await self._remember_sandbox(self._sandbox, spec.password)
                await environment.built(self.provider, self._sandbox, self._emit)
                await self._connect(self._sandbox, steps=steps)
            else:  # independent: the state's store write, and OpenCode opening the workspace
                remembering = asyncio.ensure_future(self._remember_sandbox(self._sandbox, spec.password))
                try:
                    await self._connect(self._sandbox, steps=steps)
                except BaseException:
                    remembering.cancel()
                    raise
                await remembering
            steps.mark("connect")
            self._running_since = self._last_activity = time.monotonic()
            await self._set_state(states.RUNNING, phase="ready")
            steps.mark("running")
            took("ready")
            self.log.info("session.ready", "session is ready", pooled=warm is not None,
                          ms=steps.total_ms, steps=steps.ms)
            self._spawn("watch", self._watch_limits())
            if environment is not None and environment.warm is not None:
                request = {"workspace": self._sandbox.workspace_path, "home": self._sandbox.home_path,
                           "remote_url": repo.url, "branch": self.record.work_branch,
                           "base_branch": self.record.base_branch,
                           "credential": access.credential if access else None}
                self._spawn("sync", environment.sync(self._sandbox, request, self._emit,
                                                     self._approve, self._rebased))
            self._wake.set()
        except asyncio.CancelledError:
            raise
        except RestoreError as exc:
            took("restore_failed")
            log.warning("tabbi: session %s could not be restored", self.id, exc_info=True)
            await self._restore_failed(str(exc))
        except Exception as exc:  # every failure of a start is reported, never swallowed
            took("failed")
            message = _readable(exc, "The sandbox failed to start")
            if isinstance(exc, _PERSONS_MISTAKES):  # no model, a failed clone: one line, no traceback
                log.warning("tabbi: session %s failed to start: %s", self.id, " ".join(message.split()))
            else:
                log.warning("tabbi: session %s failed to start", self.id, exc_info=True)
            await self._fault(message, restart_queued=False)

    async def _restore_failed(self, message: str) -> None:
        """The snapshot could not be restored: nothing half-restored is used, the snapshots stay
        as they are, and the session stays paused (its prompts stay queued) until resumed."""
        await self._emit("error", {"name": "RestoreError", "message": message})
        await self._release_sandbox()
        await self._set_state(states.PAUSED, reason="restore_failed", error=message)

    async def _clone_access(self, repo: RepoSpec) -> tuple[GitAccess | None, str | None]:
        """The credential a clone of ``repo`` may use, or None and why not. Asking GitHub can
        fail (an outage, an expired sign-in) without stopping a start that reuses its workspace
        and clones nothing; the reason shows only if a clone then fails."""
        if repo.kind != "github" or self.git_access is None:
            return None, None
        if not await self.provider.confines():
            return None, "GitHub credentials go only to sandboxes confined by bubblewrap"
        try:
            access = await self.git_access(self.record.owner)
        except GitHubError as exc:
            return None, str(exc)
        return access, None if access else "not signed in to GitHub: %tabbi login"

    async def _remember_sandbox(self, sandbox: Sandbox, password: str) -> None:
        """Store the sandbox's state; for a sandbox that can outlive this server, with its OpenCode
        password sealed, so that the next server process can talk to it."""
        state = sandbox.get_state()
        if self.provider.survives_restart and self.settings.secrets is not None:
            state["password_sealed"] = self.settings.secrets.encrypt(password.encode()).decode()
        self.record.sandbox_state = state
        await self.store.update_session(self.id, sandbox_state=state)

    async def _connect(self, sandbox: Sandbox, reattaching: bool = False,
                       steps: StartSteps | None = None) -> AgentRuntime:
        """Talk to the sandbox's agent: its conversation (a new one if missing, except when
        re-attaching: then the running one must be there) and its event feed."""
        runtime = self._runtime = self.runtime_class(sandbox.endpoint())
        connected = asyncio.Event()
        fresh = not self.record.opencode_session_id
        if fresh:  # no conversation yet, so nothing to miss: the feed connects meanwhile
            self._spawn("feed", self._feed(runtime, sandbox, connected))
        conversation = await runtime.open(self.record.opencode_session_id, must_exist=reattaching)
        if steps is not None:
            steps.mark("open")  # OpenCode opening the workspace (its first request) + its session
        if conversation != self.record.opencode_session_id:
            self.record.opencode_session_id = conversation
            await self.store.update_session(self.id, opencode_session_id=conversation)
        if not fresh:
            self._spawn("feed", self._feed(runtime, sandbox, connected))
        try:
            await asyncio.wait_for(connected.wait(), self.settings.connect_timeout)
        except asyncio.TimeoutError:
            raise AgentRuntimeError("the agent's event stream did not connect") from None
        return runtime

    async def _on_progress(self, message: dict[str, Any]) -> None:
        phase = message.get("phase")
        if phase == "ready":
            return  # RUNNING is announced once the event feed is connected
        if phase == "branch" and message.get("base_commit"):
            self.record.base_commit = message["base_commit"]
            await self.store.update_session(self.id, base_commit=self.record.base_commit)
        if self.environment is not None:
            self.environment.observe(message)
        detail = {k: v for k, v in message.items()
                  if k in ("repo", "branch", "files", "line", "setup_hash", "seconds")}
        await self._emit("session.status", {"state": states.STARTING, "phase": phase, **detail})

    async def _fault(self, message: str, restart_queued: bool = True) -> None:
        """Something broke under the session: report it, end the turn, release the sandbox. No
        prompt is delivered while this runs; prompts still queued then start the session again
        (unless the fault was a failed start, which would only fail again)."""
        if self.state == states.DELETED:
            return
        self._hold = HOLD_FAULT
        try:
            await self._emit("error", {"name": "SessionError", "message": message})
            await self._finish_turn("error", message, report=False)
            await self._release_sandbox()
            await self._set_state(states.ERROR, error=message)
        finally:
            self._hold = None
        if restart_queued and await self._queued():
            await self.start()

    async def _release_sandbox(self) -> None:
        current = asyncio.current_task()
        for name in ("feed", "boot", "watch", "snapshot", "sync"):
            task = self._tasks.get(name)
            if task is None or task is current or task.done():
                continue
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.environment is not None and self.environment.gate is not None:
            self.environment.gate.release()  # nothing is left to wait for in this sandbox
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            await runtime.aclose()
        sandbox, self._sandbox = self._sandbox, None
        if sandbox is not None:
            await sandbox.terminate()

    async def recover_after_restart(self) -> None:
        """The store says this session was live, but the server process that ran it is gone.
        A sandbox that is still alive is re-attached and what happened meanwhile is caught up.
        Otherwise: end the interrupted turn, say what happened, and start again if prompts are
        waiting."""
        pending = await self.store.pending_prompts(self.id)
        for prompt in pending:
            if prompt.status == "running":
                self._turn = Turn(prompt.id)
        if await self._reattach():
            return
        snapshots = await self.store.list_snapshots(self.id)
        if snapshots:
            message = ("The server restarted and the sandbox stopped with it; the session is paused "
                       "and resumes from its files (or its last snapshot) with the next prompt.")
            await self._emit("error", {"name": "ServerRestarted", "message": message})
            await self._finish_turn("error", message, report=False)
            await self._set_state(states.PAUSED, reason="server_restart",
                                  snapshot_id=snapshots[0].id)
        else:
            await self._fault(
                "The server restarted and the sandbox stopped with it. "
                "Send a prompt to start it again; the workspace is kept.",
                restart_queued=False,
            )
        if any(p.status == "queued" for p in pending):
            await self.start()

    async def _reattach(self) -> bool:
        state = {"sandbox_id": self.id, **(self.record.sandbox_state or {})}
        sealed, box = state.pop("password_sealed", None), self.settings.secrets
        password = box.decrypt(sealed.encode()) if sealed and box else None
        sandbox = await self.provider.load_state(state, password.decode() if password else None)
        if sandbox is None:
            return False
        if password is None:
            log.info("tabbi: session %s: its sandbox is alive but cannot be re-attached (no key)", self.id)
            await sandbox.terminate()
            return False
        self._sandbox = sandbox
        try:
            client = await self._connect(sandbox, reattaching=True)
            await self._catch_up(client)
        except Exception as exc:  # not usable after all: treat it as gone
            log.info("tabbi: session %s: re-attaching failed (%s); restarting it", self.id, exc)
            await self._release_sandbox()
            return False
        log.info("tabbi: session %s: re-attached to its running sandbox", self.id)
        turn = self._turn
        if turn is not None and turn.watchdog is None:
            turn.watchdog = asyncio.create_task(self._watch(turn))
        await self._emit("session.status", {"state": states.RUNNING, "phase": "reattached"})
        self._running_since = self._last_activity = time.monotonic()
        self._spawn("watch", self._watch_limits())
        self._wake.set()
        return True

    async def shutdown(self) -> None:
        """The server is stopping. A quiet running session is snapshotted and paused first, so
        that the next server resumes it from its newest files; then our tasks and processes end.
        A session in a turn keeps its record as it is (the next server reconciles it)."""
        if self.state == states.RUNNING and self._turn is None:
            try:
                await asyncio.wait_for(self.pause("server_stopped"), self.settings.shutdown_snapshot_timeout)
            except (AgentError, asyncio.TimeoutError) as exc:
                log.info("tabbi: session %s not paused at shutdown: %s", self.id, exc or "timed out")
        if self._turn is not None and self._turn.watchdog is not None:
            self._turn.watchdog.cancel()
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self._release_sandbox()
        await self.events.drain()

    async def delete(self) -> None:
        async with self._lifecycle:
            if self.state == states.DELETED:
                return
            self.record.state = states.DELETED
            self.log.info("session.deleted", "session deleted")
            await self.shutdown()
            await self.provider.destroy(self.id)
            await self.snapshots.delete_all()
            await self.store.delete_session(self.id)

    # -- prompts and turns --------------------------------------------------------------------
    async def prompt(self, text: str, attachments: list[dict[str, Any]] | None = None) -> Prompt:
        if self.state == states.DELETED:
            raise AgentError("the session was deleted", 410)
        prompt = Prompt(
            id="prm_" + secrets.token_hex(8),
            session_id=self.id,
            text=text,
            status="queued",
            created_at=time.time(),
            attachments=list(attachments or []),
        )
        self._last_activity = time.monotonic()
        if self.settings.budgets is not None:
            await self.settings.budgets.admit(self)  # a used-up budget refuses the prompt
        await self._retry_store(lambda: self.store.enqueue_prompt(prompt))
        await self._emit(
            "prompt.queued", {"prompt_id": prompt.id, "text": text, "position": prompt.position,
                              **attached(prompt.attachments)}
        )
        if self.state in (states.IDLE, states.ERROR, states.PAUSED):
            await self.start()
        self._wake.set()
        return prompt

    async def _pump(self) -> None:
        """Deliver queued prompts one at a time, in order, while the session runs."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._may_begin_turn():
                queued = [p for p in await self.store.pending_prompts(self.id) if p.status == "queued"]
                if not queued or not self._may_begin_turn():  # re-checked: a push may have begun
                    break
                await self._begin_turn(queued[0])

    def _may_begin_turn(self) -> bool:
        return self.state == states.RUNNING and self._turn is None and self._hold is None

    async def _begin_turn(self, prompt: Prompt) -> None:
        turn = self._turn = Turn(prompt.id)
        await self._retry_store(lambda: self.store.set_prompt_status(prompt.id, "running"))
        await self._emit("turn.started", {"prompt_id": prompt.id, "text": prompt.text,
                                          "model": model_config.current(self.settings.model,
                                                                        self.record.model),
                                          **attached(prompt.attachments)})
        self.log.info("turn.started", f"turn {prompt.id} started", prompt_id=prompt.id,
                      prompt_chars=len(prompt.text))
        self.log.debug("turn.prompt", prompt.text, prompt_id=prompt.id)  # a prompt: never above DEBUG
        await self._set_waiting(turn, True)
        turn.watchdog = asyncio.create_task(self._watch(turn))
        runtime = self._runtime
        try:
            if runtime is None:
                raise AgentRuntimeError("the agent is not connected")
            await runtime.prompt(prompt.text, self._prompt_model(), attachment_blocks(prompt.attachments))
        except AgentRuntimeError as exc:
            message = _readable(exc, "The prompt could not be delivered")
            await self._finish_turn("error", message)
        else:  # the agent has the prompt: from now on a budget it crosses stops it
            if self.settings.budgets is not None:
                self._spawn("budget", self.settings.budgets.watch(self))

    async def _watch(self, turn: Turn) -> None:
        await asyncio.sleep(self.settings.turn_timeout)  # a deadline, not synchronization
        message = f"The turn ran longer than {self.settings.turn_timeout:.0f} s and was stopped."
        await self.stop_turn(turn, "TurnError", message)

    async def stop_turn(self, turn: Turn, name: str, message: str) -> None:
        """End ``turn`` (if it still runs) as an error tabbi decided on: a deadline, a budget."""
        if self._turn is turn:
            # The outcome is set before the agent hears of the abort: its idle may end the turn
            # first, and must end it as this error, with the reason shown.
            turn.outcome, turn.error = "error", message
            await self._emit("error", {"name": name, "message": message})
            await self._abort_quietly()
            await self._finish_turn("error", message)

    async def _finish_turn(self, outcome: str, error: str | None = None, report: bool = True) -> None:
        turn, self._turn = self._turn, None
        if turn is None:
            return
        if turn.watchdog is not None and turn.watchdog is not asyncio.current_task():
            turn.watchdog.cancel()
        if outcome == "error" and error and report and turn.error is None:
            await self._emit("error", {"name": "TurnError", "message": error})
        await self._set_waiting(turn, False)
        data: dict[str, Any] = {"prompt_id": turn.prompt_id, "outcome": outcome}
        if outcome == "error":
            data["error"] = error or turn.error
        data.update(await self._turn_usage(turn))
        await self._retry_store(
            lambda: self.store.set_prompt_status(
                turn.prompt_id, "done" if outcome != "error" else "failed"
            )
        )
        await self._emit("turn.finished", data)
        seconds = time.monotonic() - turn.started
        metrics.TURN_SECONDS.labels(outcome).observe(seconds)
        self.log.event(logging.WARNING if outcome == "error" else logging.INFO, "turn.finished",
                       f"turn {turn.prompt_id} {outcome}", prompt_id=turn.prompt_id, outcome=outcome,
                       seconds=round(seconds, 3), error=data.get("error"))
        self._last_activity = time.monotonic()
        if self.state == states.RUNNING and self._sandbox is not None and self._hold is None:
            self._request_snapshot()
        self._wake.set()

    async def _turn_usage(self, turn: Turn) -> dict[str, Any]:
        """``{tokens, cost, session: {tokens, cost}}``: the turn's model use and the session's,
        as OpenCode reported it (the budgets' spend); empty when it cannot be read now (the turn
        still ends)."""
        budgets = self.settings.budgets
        if budgets is None:
            return {}
        try:
            spend = await budgets.spend(self.store, self.id, times=False)
        except Exception:  # the store failing: the turn ends all the same, without its usage
            log.debug("tabbi: usage of turn %s unknown", turn.prompt_id, exc_info=True)
            return {}
        return {**spend.usage(turn.messages), "session": spend.usage()}

    def _prompt_model(self) -> dict[str, str] | None:
        """The model a prompt names (OpenCode takes one per message): the session's choice now."""
        try:
            return model_config.resolve(self.settings.model, self.record.model)[0]
        except model_config.ModelConfigError:
            return self._model_ref

    async def set_model(self, name: str) -> str:
        """Use the available model ``name`` from the session's next turn on (a turn running now
        keeps its model); stored with the session, so it survives pause, resume and a server
        restart. Returns the model's id. A model of another model server than the one a live
        sandbox is set up for (its OpenCode config and gateway grant) needs the sandbox
        restarted: refused with what to do."""
        if self.state == states.DELETED:
            raise AgentError("the session was deleted", 410)
        settings = self.settings.model
        try:
            choice = model_config.choose(settings, name)
        except model_config.ModelConfigError as exc:
            raise AgentError(str(exc), 400) from None
        before = model_config.current(settings, self.record.model)
        if before == choice.id:
            return choice.id
        if self.state in states.LIVE:
            try:
                running = model_config.choose(settings, self.record.model or settings.model or "")
            except model_config.ModelConfigError:
                running = None
            if running is None or running.upstream != choice.upstream:
                raise AgentError(
                    f"{choice.id} is served by another model server than {before}, which this "
                    "session's sandbox is set up for: pause the session (%tabbi pause), switch, "
                    "then resume it", 409)
        await self._retry_store(lambda: self.store.update_session(self.id, model=choice.id))
        self.record.model = choice.id
        self.log.info("session.model", f"model switched to {choice.id}", model=choice.id, previous=before)
        await self._emit("session.model", {"model": choice.id, "previous": before})
        return choice.id

    async def abort(self) -> None:
        runtime = self._runtime
        if self._turn is None or runtime is None:
            raise AgentError("no turn is running")
        self._turn.outcome = "aborted"
        try:
            await runtime.abort()
        except AgentRuntimeError as exc:
            raise AgentError(f"the abort did not reach the agent: {exc}", 502) from exc

    async def _abort_quietly(self) -> None:
        """Stop the agent's current work (tabbi ended the turn: a deadline, a failing model)."""
        if self._runtime is not None:
            with contextlib.suppress(AgentRuntimeError):
                await self._runtime.abort()

    async def reply_permission(self, permission_id: str, reply: str) -> None:
        if reply not in PERMISSION_REPLIES:
            raise AgentError(f"'reply' must be one of {', '.join(PERMISSION_REPLIES)}", 400)
        if self._runtime is None:
            raise AgentError("the session is not running")
        gate = self.environment.gate if self.environment is not None else None
        if gate is not None and reply != "reject":
            await gate.wait()  # writes wait until the warm workspace is in sync
        try:
            await self._runtime.reply_permission(permission_id, reply)
        except AgentRuntimeError as exc:
            raise AgentError(str(exc), 502) from exc

    # -- snapshots, pause and resume -------------------------------------------------------------
    def _request_snapshot(self) -> None:
        """Snapshot after a turn, before the next one begins: a snapshot is of a quiet workspace
        (archived while a turn runs, it could hold half of that turn's work, or a git lock). The
        hold is taken here, synchronously, so that the pump woken next cannot slip a turn in."""
        self._hold = HOLD_SNAPSHOT
        self._spawn("snapshot", self._snapshot_after_turn())

    async def _snapshot_after_turn(self) -> None:
        try:
            if self.state == states.RUNNING:
                await self._snapshot("turn")
        finally:
            if self._hold == HOLD_SNAPSHOT:
                self._hold = None
            self._wake.set()

    async def _snapshot_settled(self) -> None:
        """Wait for the snapshot that follows a turn, if one runs: pause and push come after it
        rather than being refused because of it."""
        task = self._tasks.get("snapshot")
        if task is not None and not task.done():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.shield(task)

    async def _snapshot(self, reason: str) -> Snapshot | None:
        """Save the running sandbox. A failure is reported as an event and leaves it running; the
        next turn tries again."""
        sandbox = self._sandbox
        if sandbox is None:
            return None
        gate = self.environment.gate if self.environment is not None else None
        if gate is not None:
            await gate.wait()  # not of a workspace the sync is still updating
        started = time.monotonic()
        snapshot = await self.snapshots.take(sandbox, reason, _readable)
        self.log.event(logging.INFO if snapshot else logging.WARNING, "snapshot",
                       f"snapshot {'saved' if snapshot else 'failed'}", reason=reason,
                       outcome="saved" if snapshot else "failed", bytes=snapshot and snapshot.size,
                       seconds=round(time.monotonic() - started, 3))
        return snapshot

    async def pause(self, reason: str = "requested") -> None:
        """Snapshot, then stop the sandbox. Never during a turn; a failed snapshot keeps it running."""
        async with self._lifecycle:
            if self.state == states.PAUSED:
                return
            if self.state != states.RUNNING:
                raise AgentError(f"the session is {self.state}; only a running session can pause")
            await self._snapshot_settled()
            if self._turn is not None or self._hold is not None:
                raise AgentError(f"{self._hold or 'a turn'} is running: let it finish, then pause")
            self._hold = HOLD_PAUSE
            try:
                snapshot = await self._snapshot(reason)
                if snapshot is None:
                    raise AgentError("the snapshot failed, so the session keeps running", 500)
                await self._release_sandbox()
                await self.provider.destroy(self.id)
                await self._set_state(states.PAUSED, reason=reason, snapshot_id=snapshot.id)
            finally:
                self._hold = None
        if await self._queued():
            await self.start()  # a prompt arrived while pausing: it resumes the session

    async def resume(self) -> None:
        if self.state in (states.PAUSED, states.ERROR, states.IDLE):
            await self.start()
        elif self.state not in states.LIVE:
            raise AgentError(f"the session is {self.state}")

    async def stop(self, message: str) -> None:
        """Stop the sandbox now, mid-turn too (an administrator's stop): the turn ends as an
        error saying ``message``, the workspace and snapshots are kept, and queued prompts wait
        until the owner resumes the session (they would only start it again)."""
        if self.state in states.LIVE:
            await self._fault(message, restart_queued=False)

    async def _queued(self) -> bool:
        return any(p.status == "queued" for p in await self.store.pending_prompts(self.id))

    async def _watch_limits(self) -> None:
        """Pause after ``idle_timeout`` without activity, and once ``max_lifetime`` is reached
        (after the running turn: a turn in progress is never cut)."""
        idle, lifetime = self.settings.idle_timeout, self.settings.max_lifetime
        if not idle and not lifetime:
            return
        while self.state == states.RUNNING:
            now = time.monotonic()
            deadlines = []
            if idle:
                deadlines.append((self._last_activity + idle, "idle"))
            if lifetime:
                deadlines.append((self._running_since + lifetime, "max_lifetime"))
            due, reason = min(deadlines)
            quiet = self._turn is None and self._hold is None
            if now >= due and quiet and not await self._queued():
                with contextlib.suppress(AgentError):
                    await self.pause(reason)
                return
            # A timer, not synchronization: wake at the next deadline (or soon, if a turn runs).
            await asyncio.sleep(max(0.05, due - now) if now < due else 0.5)

    # -- the workspace ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def between_turns(self, what: str) -> AsyncIterator[Sandbox]:
        """Hold the running workspace for ``what`` (a push): no turn starts and no pause happens
        meanwhile; prompts that arrive wait in the queue."""
        await self._snapshot_settled()
        sandbox = self.running_sandbox()
        if self._turn is not None:
            raise AgentError(f"a turn is running: let it finish (or abort it), then {what}")
        if self._hold is not None:
            raise AgentError(f"the session is busy ({self._hold}); try again shortly")
        self._hold = what
        try:
            yield sandbox
        finally:
            self._hold = None
            self._wake.set()

    def running_sandbox(self) -> Sandbox:
        if self._sandbox is None or self.state != states.RUNNING:
            raise AgentError(f"the session is {self.state}; its workspace is readable while it runs")
        return self._sandbox

    async def diff(self) -> dict[str, Any]:
        """The branch's changes against the commit it started from, untracked files included."""
        sandbox = self.running_sandbox()
        try:
            return await workspace.diff(sandbox, self.record.base_commit or "HEAD")
        except workspace.WorkspaceError as exc:
            raise AgentError(str(exc), 500) from exc

    async def read_file(self, path: str) -> str:
        try:
            return await workspace.read_file(self.running_sandbox(), path)
        except workspace.WorkspaceError as exc:
            raise AgentError(str(exc), 404) from exc

    # -- the agent's event feed -------------------------------------------------------------------
    async def _feed(self, runtime: AgentRuntime, sandbox: Sandbox, connected: asyncio.Event) -> None:
        """Follow the agent's events; reconnect while the sandbox lives, report a fault when not.
        After a reconnect, what was missed meanwhile is caught up first."""
        failures = 0
        while True:
            reconnect = connected.is_set()
            try:
                async for update in runtime.updates():
                    if update is None:  # (re)connected
                        failures = 0
                        connected.set()
                        if reconnect:
                            await self._catch_up(runtime)
                        continue
                    async with self._applying:
                        await self._apply(update)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.debug("tabbi: event feed of %s broke", self.id, exc_info=True)
            # The feed ended. Did the agent die, or only the connection?
            try:
                code = await asyncio.wait_for(sandbox.wait(), 3)
            except asyncio.TimeoutError:
                code = None
            if code is not None:
                await self._fault(
                    f"The agent process stopped unexpectedly (exit status {code}). "
                    "Send a prompt to start it again; the workspace is kept."
                )
                return
            failures += 1
            if failures > 5:
                await self._fault("Lost the connection to the agent; send a prompt to restart it.")
                return
            await asyncio.sleep(min(0.1 * 2**failures, 3))  # reconnect backoff

    async def _catch_up(self, runtime: AgentRuntime) -> None:
        """After a gap in the feed (a reconnect, or a server restart with the sandbox alive):
        persist and announce every message and part that changed while nobody listened, as
        complete ``part.updated`` / ``tool`` events, then end a turn that finished meanwhile (or
        queue its prompt again, if it never reached the agent)."""
        # The live feed waits meanwhile, so that its idle is judged with this turn's state known.
        async with self._applying:
            for update in await runtime.replay(await self.store.list_messages(self.id)):
                await self._apply(update)
            turn = self._turn
            if turn is None:
                return
            if not turn.acknowledged:
                # Its prompt may have been stored before the gap (replay skips what the log
                # holds): ask the agent, or the idle that ends the turn would be ignored.
                turn.acknowledged = await self._reached_agent(turn, runtime)
            if await runtime.busy():
                return  # the agent still works on it: its idle on the feed ends the turn
            if turn.acknowledged or turn.outcome != "completed":
                await self._finish_turn(turn.outcome, turn.error)
            else:  # the prompt never reached the agent: deliver it again
                self._turn = None
                await self._set_waiting(turn, False)
                if turn.watchdog is not None:
                    turn.watchdog.cancel()
                await self._retry_store(lambda: self.store.set_prompt_status(turn.prompt_id, "queued"))
                self._wake.set()

    async def _reached_agent(self, turn: Turn, runtime: AgentRuntime) -> bool:
        """Whether the agent holds a prompt that arrived after ``turn`` started (a turn before
        it had ended by then). Unknown counts as yes: ending a turn is better than delivering its
        prompt twice."""
        last = self.events.last_seq
        started = [e.ts for e in await self.store.list_events(self.id, max(0, last - 2000), 2000)
                   if e.type == "turn.started" and e.data.get("prompt_id") == turn.prompt_id]
        return not started or await runtime.received_prompt_since(started[-1])

    async def _apply(self, update: Update) -> None:
        """Persist and log what one agent event means, and act on its signals."""
        signals = update.signals
        if signals.message is not None:
            message_id, role, info = signals.message
            if role == "assistant":
                self._usage.add(message_id, info)
                if self._turn is not None:
                    self._turn.messages.add(message_id)
            if role == "user" and message_id not in self._user_messages:
                self._user_messages.add(message_id)
                if self._turn is not None:
                    self._turn.acknowledged = True
            await self._retry_store(lambda: self.store.upsert_message(self.id, message_id, role, info))
            if self.settings.budgets is not None:
                await self.settings.budgets.on_message(self, message_id, role, info)
        if signals.part is not None:
            message_id, part_id, part = signals.part
            await self._retry_store(lambda: self.store.upsert_part(self.id, message_id, part_id, part))
        for event in update.events:
            if event.type == "permission.asked" and await self._gated(event.data):
                continue  # a write held until the workspace is in sync (``environments.WriteGate``)
            turn = self._turn
            output = turn is not None and _model_output(event.type, event.data)
            if output:
                await self._set_waiting(turn, False)
            if event.type == "text.delta":  # streamed: batched with what follows (``EventLog``)
                await self.events.post(event.type, event.data, received=update.received)
                continue
            await self._emit(event.type, event.data)
            if output and event.type == "part.updated" and event.data.get("text"):
                self.log.debug("model.text", event.data["text"])  # model output: never above DEBUG
            if output and event.type == "tool":
                await self._track_tool(turn, event.data)
            if event.type == "agent.status" and event.data["status"] == "retry":
                await self._on_retry(event.data)
        await self._on_agent_error(signals)
        if signals.idle and self._turn is not None and (
            self._turn.acknowledged or self._turn.outcome == "aborted"
        ):
            await self._finish_turn(self._turn.outcome, self._turn.error)

    async def _set_waiting(self, turn: Turn, waiting: bool) -> None:
        """Log when the turn starts and stops waiting for the model: ``turn.waiting`` ``{prompt_id,
        waiting}``. Clients show "waiting for the model" (with the time since that event) until
        the matching ``waiting: false``, so a slow model never looks like a stuck cell. A turn
        waits from its start until the model's first output, and again once its tool calls have
        all ended (their results go back to the model); every ``waiting: true`` is followed by a
        ``waiting: false`` before the turn's ``turn.finished``."""
        if (turn.waiting_since is not None) == waiting:
            return
        turn.waiting_since = time.time() if waiting else None
        await self._emit("turn.waiting", {"prompt_id": turn.prompt_id, "waiting": waiting})

    async def _track_tool(self, turn: Turn, data: dict[str, Any]) -> None:
        call = str(data.get("call_id") or data.get("part_id"))
        if data.get("status") in ("completed", "error"):
            turn.tools_running.discard(call)
            if not turn.tools_running and self._turn is turn:
                await self._set_waiting(turn, True)
        else:
            turn.tools_running.add(call)

    async def _on_retry(self, status: dict[str, Any]) -> None:
        """OpenCode retries failing model calls forever; tabbi gives up after a few attempts so
        that a broken model server ends the turn with a readable error."""
        turn = self._turn
        attempt = int(status.get("attempt") or 0)
        if turn is None or turn.outcome == "error" or attempt <= self.settings.model_retries:
            return
        turn.outcome = "error"
        turn.error = (
            f"The model server kept failing ({status.get('message') or 'no details'}); "
            f"gave up after {attempt} attempts."
        )
        await self._emit("error", {"name": "ModelError", "message": turn.error})
        await self._abort_quietly()

    async def _on_agent_error(self, signals: Signals) -> None:
        turn = self._turn
        if signals.aborted and turn is not None and turn.outcome != "error":
            turn.outcome = "aborted"
        if signals.error is None:
            return
        name, message = signals.error
        if turn is not None:
            if turn.error == message:
                return  # the same error arrives as session.error and on the message
            turn.outcome, turn.error = "error", message
        await self._emit("error", {"name": name, "message": message})

    # -- the environment's sync ------------------------------------------------------------------
    async def _gated(self, data: dict[str, Any]) -> bool:
        gate = self.environment.gate if self.environment is not None else None
        return gate is not None and await gate.asked(data, self._approve)

    async def _approve(self, permission_id: str) -> None:
        """Let a write tabbi held go ahead (it asked on tabbi's behalf, the person allows it)."""
        if self._runtime is not None:
            with contextlib.suppress(AgentRuntimeError):
                await self._runtime.reply_permission(permission_id, "once")

    async def _rebased(self, commit: str) -> None:
        """The sync moved the session branch to the base branch's newest commit: diffs start there."""
        self.record.base_commit = commit
        await self._retry_store(lambda: self.store.update_session(self.id, base_commit=commit))

    # -- helpers ------------------------------------------------------------------------------
    def _spawn(self, name: str, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks[name] = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("tabbi: task of session %s failed", self.id, exc_info=task.exception())


def _model_output(kind: str, data: dict[str, Any]) -> bool:
    """Whether an event is the model answering (its text, reasoning or tool calls), which ends a
    wait for it. The prompt's own text part (role user) is not."""
    if kind in ("text.delta", "tool"):
        return True
    return kind == "part.updated" and data.get("role") == "assistant" and bool(
        data.get("text") or data.get("files"))


#: Start failures whose message says all there is to say (what to configure, why a clone failed).
_PERSONS_MISTAKES = (SandboxError, model_config.ModelConfigError)


def _readable(exc: BaseException, fallback: str) -> str:
    if isinstance(exc, (SandboxError, AgentRuntimeError, model_config.ModelConfigError)):
        return str(exc)
    text = str(exc).strip()
    return f"{fallback}: {text}" if text else fallback


def attached(attachments: list[dict[str, Any]]) -> dict[str, Any]:
    """What a prompt's events record of its attachments: kind, label, size and whether it was
    cut, never the content (the log is replayed to every view; the content went to the model)."""
    if not attachments:
        return {}
    return {"attachments": [{"kind": a["kind"], "label": a["label"], "truncated": bool(a.get("truncated")),
                             "bytes": len(a["content"].encode("utf-8"))} for a in attachments]}


def attachment_blocks(attachments: list[dict[str, Any]]) -> list[str]:
    """Each attachment as one labelled block of text for the model, after the person's prompt."""
    blocks = []
    for a in attachments:
        label = a["label"].replace('"', "'")
        cut = ' truncated="true"' if a.get("truncated") else ""
        blocks.append(f'<attachment kind="{a["kind"]}" label="{label}"{cut}>\n'
                      f"(attached by the person from their notebook)\n{a['content']}\n</attachment>")
    return blocks
