"""One ``SessionAgent`` per session: it owns the sandbox, the OpenCode connection, the prompt queue
and the session's event log.

Guarantees it keeps, and where:
- every event is persisted before any client sees it, with the next ``seq`` (``_emit``);
- prompts are persisted first and delivered one at a time, in order, only while running (``_pump``);
- every turn ends with exactly one ``turn.finished``, whatever fails (``_finish_turn``, called from the
  SSE feed, from the prompt call's failure, from the watchdog and from ``_fault``);
- a fault (OpenCode or the sandbox dying, the feed lost) ends the turn, reports a readable error,
  moves the session to ``error``, and the next prompt starts it again on the same workspace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tabbi_sandbox.provider import Sandbox, SandboxError, SandboxProvider, SandboxSpec

from . import model_config, states, workspace
from .encryption import SecretBox
from .github.accounts import GitAccess, GitHubError
from .normalize import EventNormalizer, Normalized, Signals, error_message
from .opencode import OpenCodeClient, OpenCodeError
from .store import Event, Prompt, SessionRecord, Snapshot, Store, StoreError
from .validation import RepoSpec, parse_repo

#: ``owner -> GitAccess | None``: the credential for a GitHub clone (None: not signed in).
GitAccessLookup = Callable[[str], Awaitable[GitAccess | None]]

log = logging.getLogger(__name__)

PERMISSION_REPLIES = ("once", "always", "reject")


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
    #: Seals the OpenCode password kept with a sandbox that can outlive the server, so that the
    #: next server process can re-attach (None: no re-attach).
    secrets: SecretBox | None = None


@dataclass
class Turn:
    prompt_id: str
    outcome: str = "completed"
    error: str | None = None
    watchdog: asyncio.Task | None = None
    #: OpenCode created this turn's user message. Until then an idle signal belongs to the turn
    #: before (OpenCode can report idle more than once, late, after an abort).
    acknowledged: bool = False


class SessionAgent:
    def __init__(
        self,
        record: SessionRecord,
        *,
        store: Store,
        provider: SandboxProvider,
        settings: AgentSettings,
        git_access: GitAccessLookup | None = None,
    ):
        self.record = record
        self.git_access = git_access
        self.store = store
        self.provider = provider
        self.settings = settings
        self._next_seq = 1
        self._emit_lock = asyncio.Lock()
        self._lifecycle = asyncio.Lock()
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._wake = asyncio.Event()
        self._turn: Turn | None = None
        self._sandbox: Sandbox | None = None
        self._client: OpenCodeClient | None = None
        self._normalizer: EventNormalizer | None = None
        self._model_ref: dict[str, str] | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._user_messages: set[str] = set()
        self._snapshot_lock = asyncio.Lock()
        self._snapshot_wanted = False
        self._pausing = False
        #: Held while applying OpenCode's events, so a catch-up and the live feed take turns.
        self._applying = asyncio.Lock()
        #: What holds the workspace between turns (a push), or None.
        self._holding: str | None = None
        self._last_activity = time.monotonic()
        self._running_since = time.monotonic()

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def state(self) -> str:
        return self.record.state

    @property
    def busy(self) -> bool:
        return self._turn is not None

    def describe(self) -> dict[str, Any]:
        return {**self.record.public(), "busy": self.busy, "last_seq": self._next_seq - 1}

    async def load(self) -> None:
        """Pick up the log where it stands and start the prompt pump."""
        self._next_seq = await self.store.last_seq(self.id) + 1
        self._spawn("pump", self._pump())

    # -- events -------------------------------------------------------------------------------
    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(queue)

    async def _emit(self, type_: str, data: dict[str, Any]) -> Event:
        async with self._emit_lock:
            event = Event(self.id, self._next_seq, type_, data, time.time())
            await self._retry_store(lambda: self.store.append_event(event))
            self._next_seq += 1
            for queue in self._subscribers:
                queue.put_nowait(event)
        return event

    async def announce(self, type_: str, data: dict[str, Any]) -> Event:
        """Add an event to the session's log on behalf of a service acting on it (a push)."""
        return await self._emit(type_, data)

    async def _retry_store(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """Store writes are retried with backoff; an event is never announced unless persisted."""
        delay = 0.05
        for attempt in range(self.settings.store_retries):
            try:
                return await call()
            except StoreError:
                raise  # a constraint broke: retrying cannot help
            except Exception:
                if attempt == self.settings.store_retries - 1:
                    raise
                log.warning("tabbi: store write failed; retrying", exc_info=True)
                await asyncio.sleep(delay)  # backoff between attempts, not synchronization
                delay *= 4
        return None

    async def _set_state(self, new: str, **detail: Any) -> None:
        if new != self.record.state or new == states.ERROR:
            states.check_transition(self.record.state, new)
        error = detail.get("error") if new == states.ERROR else None
        self.record.state, self.record.error = new, error
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
        try:
            password = secrets.token_urlsafe(24)  # OpenCode's, random per sandbox start
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
                max_seconds=(self.settings.max_lifetime + self.settings.turn_timeout)
                if self.settings.max_lifetime else None,
            )
            self._model_ref = setup.model_ref
            latest = await self.store.list_snapshots(self.id)
            restore = latest[0].ref if latest else None
            try:
                self._sandbox = await self.provider.create(spec, self._on_progress, restore=restore)
            except SandboxError as exc:
                if why_anonymous and "clone" in str(exc):
                    raise SandboxError(f"{exc} ({why_anonymous})") from None
                raise
            await self._remember_sandbox(self._sandbox, spec.password)
            await self._connect(self._sandbox)
            self._running_since = self._last_activity = time.monotonic()
            await self._set_state(states.RUNNING, phase="ready")
            self._spawn("watch", self._watch_limits())
            self._wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure of a start is reported, never swallowed
            log.warning("tabbi: session %s failed to start", self.id, exc_info=True)
            await self._fault(_readable(exc, "The sandbox failed to start"))

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

    async def _connect(self, sandbox: Sandbox, reattaching: bool = False) -> None:
        """Talk to the sandbox's OpenCode: its session (created if missing, except when
        re-attaching: then the running one must be there) and its event feed."""
        self._client = OpenCodeClient(sandbox.endpoint())
        oc_id = self.record.opencode_session_id
        if not oc_id or not await self._client.session_exists(oc_id):
            if reattaching:
                raise OpenCodeError("the sandbox's agent no longer has this session")
            oc_id = await self._client.create_session()
            self.record.opencode_session_id = oc_id
            await self.store.update_session(self.id, opencode_session_id=oc_id)
        self._normalizer = EventNormalizer(oc_id)
        connected = asyncio.Event()
        self._spawn("feed", self._feed(self._client, sandbox, connected))
        try:
            await asyncio.wait_for(connected.wait(), self.settings.connect_timeout)
        except asyncio.TimeoutError:
            raise OpenCodeError("OpenCode's event stream did not connect") from None

    async def _on_progress(self, message: dict[str, Any]) -> None:
        phase = message.get("phase")
        if phase == "ready":
            return  # RUNNING is announced once the event feed is connected
        if phase == "branch" and message.get("base_commit"):
            self.record.base_commit = message["base_commit"]
            await self.store.update_session(self.id, base_commit=self.record.base_commit)
        detail = {k: v for k, v in message.items() if k in ("repo", "branch")}
        await self._emit("session.status", {"state": states.STARTING, "phase": phase, **detail})

    async def _fault(self, message: str) -> None:
        """Something broke under the session: report it, end the turn, release the sandbox."""
        if self.state == states.DELETED:
            return
        await self._emit("error", {"name": "SessionError", "message": message})
        await self._finish_turn("error", message, report=False)
        await self._release_sandbox()
        await self._set_state(states.ERROR, error=message)

    async def _release_sandbox(self) -> None:
        current = asyncio.current_task()
        for name in ("feed", "boot", "watch", "snapshot"):
            task = self._tasks.get(name)
            if task is None or task is current or task.done():
                continue
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
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
                "Send a prompt to start it again; the workspace is kept."
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
            await self._connect(sandbox, reattaching=True)
            assert self._client is not None
            await self._catch_up(self._client)
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
        """The server is stopping: end our tasks and processes; the record stays as it is."""
        if self._turn is not None and self._turn.watchdog is not None:
            self._turn.watchdog.cancel()
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self._release_sandbox()

    async def delete(self) -> None:
        async with self._lifecycle:
            if self.state == states.DELETED:
                return
            self.record.state = states.DELETED
            await self.shutdown()
            await self.provider.destroy(self.id)
            for snapshot in await self.store.list_snapshots(self.id):
                await self.provider.delete_snapshot(snapshot.ref)
            await self.store.delete_session(self.id)

    # -- prompts and turns --------------------------------------------------------------------
    async def prompt(self, text: str) -> Prompt:
        if self.state == states.DELETED:
            raise AgentError("the session was deleted", 410)
        prompt = Prompt(
            id="prm_" + secrets.token_hex(8),
            session_id=self.id,
            text=text,
            status="queued",
            created_at=time.time(),
        )
        self._last_activity = time.monotonic()
        await self._retry_store(lambda: self.store.enqueue_prompt(prompt))
        await self._emit(
            "prompt.queued", {"prompt_id": prompt.id, "text": text, "position": prompt.position}
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
        return (self.state == states.RUNNING and self._turn is None and not self._pausing
                and self._holding is None)

    async def _begin_turn(self, prompt: Prompt) -> None:
        turn = self._turn = Turn(prompt.id)
        await self._retry_store(lambda: self.store.set_prompt_status(prompt.id, "running"))
        await self._emit("turn.started", {"prompt_id": prompt.id, "text": prompt.text})
        turn.watchdog = asyncio.create_task(self._watch(turn))
        try:
            assert self._client is not None and self.record.opencode_session_id
            await self._client.prompt(self.record.opencode_session_id, prompt.text, self._model_ref)
        except (OpenCodeError, AssertionError) as exc:
            message = _readable(exc, "The prompt could not be delivered")
            await self._finish_turn("error", message)

    async def _watch(self, turn: Turn) -> None:
        await asyncio.sleep(self.settings.turn_timeout)  # a deadline, not synchronization
        if self._turn is turn:
            message = f"The turn ran longer than {self.settings.turn_timeout:.0f} s and was stopped."
            with contextlib.suppress(OpenCodeError, AttributeError):
                await self._client.abort(self.record.opencode_session_id)  # type: ignore[union-attr]
            await self._finish_turn("error", message)

    async def _finish_turn(self, outcome: str, error: str | None = None, report: bool = True) -> None:
        turn, self._turn = self._turn, None
        if turn is None:
            return
        if turn.watchdog is not None and turn.watchdog is not asyncio.current_task():
            turn.watchdog.cancel()
        if outcome == "error" and error and report and turn.error is None:
            await self._emit("error", {"name": "TurnError", "message": error})
        data: dict[str, Any] = {"prompt_id": turn.prompt_id, "outcome": outcome}
        if outcome == "error":
            data["error"] = error or turn.error
        await self._retry_store(
            lambda: self.store.set_prompt_status(
                turn.prompt_id, "done" if outcome != "error" else "failed"
            )
        )
        await self._emit("turn.finished", data)
        self._last_activity = time.monotonic()
        if self.state == states.RUNNING and self._sandbox is not None:
            self._request_snapshot()
        self._wake.set()

    async def abort(self) -> None:
        if self._turn is None or self._client is None:
            raise AgentError("no turn is running")
        self._turn.outcome = "aborted"
        try:
            await self._client.abort(self.record.opencode_session_id or "")
        except OpenCodeError as exc:
            raise AgentError(f"the abort did not reach the agent: {exc}", 502) from exc

    async def reply_permission(self, permission_id: str, reply: str) -> None:
        if reply not in PERMISSION_REPLIES:
            raise AgentError(f"'reply' must be one of {', '.join(PERMISSION_REPLIES)}", 400)
        if self._client is None:
            raise AgentError("the session is not running")
        try:
            await self._client.reply_permission(permission_id, reply)
        except OpenCodeError as exc:
            raise AgentError(str(exc), 502) from exc

    # -- snapshots, pause and resume -------------------------------------------------------------
    def _request_snapshot(self) -> None:
        """Snapshot in the background after a turn; the next prompt is not held up. Requests that
        arrive while one runs fold into one more run."""
        self._snapshot_wanted = True
        task = self._tasks.get("snapshot")
        if task is None or task.done():
            self._spawn("snapshot", self._snapshot_loop())

    async def _snapshot_loop(self) -> None:
        while self._snapshot_wanted and self.state == states.RUNNING:
            self._snapshot_wanted = False
            await self._snapshot("turn")

    async def _snapshot(self, reason: str) -> Snapshot | None:
        """Save the running sandbox. A failure is reported as an event and leaves the sandbox
        running; the next turn tries again. Older snapshots go only after a newer one is stored."""
        async with self._snapshot_lock:
            sandbox = self._sandbox
            if sandbox is None:
                return None
            name = f"{int(time.time() * 1000)}-{secrets.token_hex(3)}"
            started = time.monotonic()
            try:
                ref, size = await self.provider.snapshot(sandbox, name)
            except Exception as exc:  # any failure: report, keep running, retry next turn
                log.warning("tabbi: snapshot of %s failed", self.id, exc_info=True)
                await self._emit("snapshot.failed", {
                    "reason": reason, "message": _readable(exc, "The snapshot failed")})
                return None
            snapshot = Snapshot(self.id, name, ref, size, time.time())
            await self._retry_store(lambda: self.store.add_snapshot(snapshot))
            seconds = round(time.monotonic() - started, 3)
            # Older ones go once this one is stored, and before it is announced, so that a client
            # seeing ``snapshot.saved`` sees the kept set as it stays.
            for old in (await self.store.list_snapshots(self.id))[self.settings.snapshots_keep:]:
                await self.provider.delete_snapshot(old.ref)
                await self.store.delete_snapshot(self.id, old.id)
            await self._emit("snapshot.saved", {
                "snapshot_id": name, "size": size, "reason": reason, "seconds": seconds})
            return snapshot

    async def pause(self, reason: str = "requested") -> None:
        """Snapshot, then stop the sandbox. Never during a turn; a failed snapshot keeps it running."""
        async with self._lifecycle:
            if self.state == states.PAUSED:
                return
            if self.state != states.RUNNING:
                raise AgentError(f"the session is {self.state}; only a running session can pause")
            if self._turn is not None or self._holding is not None:
                raise AgentError(f"{self._holding or 'a turn'} is running: let it finish, then pause")
            self._pausing = True
            try:
                snapshot = await self._snapshot(reason)
                if snapshot is None:
                    raise AgentError("the snapshot failed, so the session keeps running", 500)
                await self._release_sandbox()
                await self.provider.destroy(self.id)
                await self._set_state(states.PAUSED, reason=reason, snapshot_id=snapshot.id)
            finally:
                self._pausing = False
        if await self._queued():
            await self.start()  # a prompt arrived while pausing: it resumes the session

    async def resume(self) -> None:
        if self.state in (states.PAUSED, states.ERROR, states.IDLE):
            await self.start()
        elif self.state not in states.LIVE:
            raise AgentError(f"the session is {self.state}")

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
            quiet = self._turn is None and not self._pausing and self._holding is None
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
        sandbox = self.running_sandbox()
        if self._turn is not None:
            raise AgentError(f"a turn is running: let it finish (or abort it), then {what}")
        if self._holding is not None or self._pausing:
            raise AgentError(f"the session is busy ({self._holding or 'pausing'}); try again shortly")
        self._holding = what
        try:
            yield sandbox
        finally:
            self._holding = None
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

    # -- OpenCode's event feed ----------------------------------------------------------------
    async def _feed(self, client: OpenCodeClient, sandbox: Sandbox, connected: asyncio.Event) -> None:
        """Read OpenCode's SSE feed; reconnect while the sandbox lives, report a fault when not."""
        failures = 0
        while True:
            reconnect = connected.is_set()
            try:
                async for raw in client.events():
                    if raw.get("type") == "server.connected":
                        failures = 0
                        connected.set()
                        if reconnect:
                            await self._catch_up(client)
                        continue
                    assert self._normalizer is not None
                    async with self._applying:
                        await self._apply(*self._normalizer.feed(raw))
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

    async def _catch_up(self, client: OpenCodeClient) -> None:
        """After a gap in the feed (a reconnect, or a server restart with the sandbox alive):
        persist and announce every message and part that changed while nobody listened, as
        complete ``part.updated`` / ``tool`` events, then end a turn that finished meanwhile (or
        queue its prompt again, if it never reached OpenCode)."""
        async with self._applying:
            await self._replay_messages(client)
        turn = self._turn
        if turn is None or self.record.opencode_session_id in await client.statuses():
            return  # no turn, or OpenCode is still working on it: the feed carries on
        if not turn.acknowledged:
            turn.acknowledged = await self._reached_opencode(turn, client)
        if self._turn is not turn:
            return  # the feed ended it meanwhile
        if turn.acknowledged or turn.outcome != "completed":
            await self._finish_turn(turn.outcome, turn.error)
        else:  # the prompt never reached OpenCode: deliver it again
            self._turn = None
            if turn.watchdog is not None:
                turn.watchdog.cancel()
            await self._retry_store(lambda: self.store.set_prompt_status(turn.prompt_id, "queued"))
            self._wake.set()

    async def _replay_messages(self, client: OpenCodeClient) -> None:
        """Apply OpenCode's current messages where they differ from what the log holds."""
        assert self._normalizer is not None and self.record.opencode_session_id
        oc_id = self.record.opencode_session_id
        persisted = await self.store.list_messages(self.id)
        known = {m["id"]: {p["id"]: p for p in m["parts"]} for m in persisted}
        for m in persisted:  # a normalizer new to this session still knows whose parts are whose
            self._normalizer.roles.setdefault(m["id"], m["role"])
        for message in await client.messages(oc_id):
            info = message.get("info") or {}
            if info.get("id") not in known:
                updated = {"type": "message.updated", "properties": {"info": info}}
                await self._apply(*self._normalizer.feed(updated))
            stored = known.get(info.get("id"), {})
            for part in message.get("parts") or []:
                events, signals = self._normalizer.feed(
                    {"type": "message.part.updated", "properties": {"part": part}}
                )
                if signals.part is not None:
                    _, part_id, normalized = signals.part
                    if {k: v for k, v in (stored.get(part_id) or {}).items() if k != "id"} == normalized:
                        continue
                await self._apply(events, signals)

    async def _reached_opencode(self, turn: Turn, client: OpenCodeClient) -> bool:
        """Whether OpenCode holds a user message made after ``turn`` started (OpenCode creates it
        when the prompt arrives; a turn before it had ended by then). Unknown counts as yes:
        ending a turn is better than delivering its prompt twice."""
        last = self._next_seq - 1
        started = [e.ts for e in await self.store.list_events(self.id, max(0, last - 2000), 2000)
                   if e.type == "turn.started" and e.data.get("prompt_id") == turn.prompt_id]
        if not started:
            return True
        for message in await client.messages(self.record.opencode_session_id or ""):
            info = message.get("info") or {}
            created = (info.get("time") or {}).get("created") or 0
            if info.get("role") == "user" and created / 1000 >= started[-1] - 1.0:
                return True
        return False

    async def _apply(self, events: list[Normalized], signals: Signals) -> None:
        if signals.message is not None:
            message_id, role, info = signals.message
            if role == "user" and message_id not in self._user_messages:
                self._user_messages.add(message_id)
                if self._turn is not None:
                    self._turn.acknowledged = True
            await self._retry_store(lambda: self.store.upsert_message(self.id, message_id, role, info))
        if signals.part is not None:
            message_id, part_id, part = signals.part
            await self._retry_store(lambda: self.store.upsert_part(self.id, message_id, part_id, part))
        for event in events:
            await self._emit(event.type, event.data)
            if event.type == "agent.status" and event.data["status"] == "retry":
                await self._on_retry(event.data)
        if signals.error is not None:
            await self._on_agent_error(signals.error)
        if signals.idle and self._turn is not None and (
            self._turn.acknowledged or self._turn.outcome == "aborted"
        ):
            await self._finish_turn(self._turn.outcome, self._turn.error)

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
        with contextlib.suppress(OpenCodeError):
            assert self._client is not None
            await self._client.abort(self.record.opencode_session_id or "")

    async def _on_agent_error(self, error: dict[str, Any]) -> None:
        turn = self._turn
        if error.get("name") == "MessageAbortedError":
            if turn is not None and turn.outcome != "error":
                turn.outcome = "aborted"
            return
        message = error_message(error)
        if turn is not None:
            if turn.error == message:
                return  # the same error arrives as session.error and on the message
            turn.outcome, turn.error = "error", message
        await self._emit("error", {"name": error.get("name") or "Error", "message": message})

    # -- helpers ------------------------------------------------------------------------------
    def _spawn(self, name: str, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks[name] = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("tabbi: task of session %s failed", self.id, exc_info=task.exception())


def _readable(exc: BaseException, fallback: str) -> str:
    if isinstance(exc, (SandboxError, OpenCodeError, model_config.ModelConfigError)):
        return str(exc)
    text = str(exc).strip()
    return f"{fallback}: {text}" if text else fallback
