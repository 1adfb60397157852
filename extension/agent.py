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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tabbi_sandbox.provider import Sandbox, SandboxError, SandboxProvider, SandboxSpec

from . import model_config, states, workspace
from .normalize import EventNormalizer, Normalized, Signals, error_message
from .opencode import OpenCodeClient, OpenCodeError
from .store import Event, Prompt, SessionRecord, Store, StoreError
from .validation import parse_repo

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


@dataclass
class Turn:
    prompt_id: str
    outcome: str = "completed"
    error: str | None = None
    watchdog: asyncio.Task | None = None


class SessionAgent:
    def __init__(
        self,
        record: SessionRecord,
        *,
        store: Store,
        provider: SandboxProvider,
        settings: AgentSettings,
    ):
        self.record = record
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
            setup = model_config.build(self.settings.model, self.record.model)
            repo = parse_repo(self.record.repo, self.settings.github_url)
            spec = SandboxSpec(
                sandbox_id=self.id,
                repo_url=repo.url,
                repo_display=repo.display,
                work_branch=self.record.work_branch,
                base_branch=self.record.base_branch,
                opencode_config=setup.config,
                opencode_env=setup.env,
                read_only_paths=[repo.local_path] if repo.local_path else [],
            )
            self._model_ref = setup.model_ref
            self._sandbox = await self.provider.create(spec, self._on_progress)
            await self.store.update_session(self.id, sandbox_state=self._sandbox.get_state())
            self._client = OpenCodeClient(self._sandbox.endpoint())
            oc_id = self.record.opencode_session_id
            if not oc_id or not await self._client.session_exists(oc_id):
                oc_id = await self._client.create_session()
                self.record.opencode_session_id = oc_id
                await self.store.update_session(self.id, opencode_session_id=oc_id)
            self._normalizer = EventNormalizer(oc_id)
            connected = asyncio.Event()
            self._spawn("feed", self._feed(self._client, self._sandbox, connected))
            try:
                await asyncio.wait_for(connected.wait(), self.settings.connect_timeout)
            except asyncio.TimeoutError:
                raise OpenCodeError("OpenCode's event stream did not connect") from None
            await self._set_state(states.RUNNING, phase="ready")
            self._wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure of a start is reported, never swallowed
            log.warning("tabbi: session %s failed to start", self.id, exc_info=True)
            await self._fault(_readable(exc, "The sandbox failed to start"))

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
        for name in ("feed", "boot"):
            task = self._tasks.get(name)
            if task is not None and task is not current and not task.done():
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
        """The store says this session was live, but the server process that ran its sandbox is
        gone (and the sandbox with it). End the interrupted turn, say what happened, and start
        again if prompts are waiting."""
        pending = await self.store.pending_prompts(self.id)
        for prompt in pending:
            if prompt.status == "running":
                self._turn = Turn(prompt.id)
        await self._fault(
            "The server restarted and the sandbox stopped with it. "
            "Send a prompt to start it again; the workspace is kept."
        )
        if any(p.status == "queued" for p in pending):
            await self.start()

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
            while self.state == states.RUNNING and self._turn is None:
                queued = [p for p in await self.store.pending_prompts(self.id) if p.status == "queued"]
                if not queued:
                    break
                await self._begin_turn(queued[0])

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

    # -- the workspace ------------------------------------------------------------------------
    def _running_sandbox(self) -> Sandbox:
        if self._sandbox is None or self.state != states.RUNNING:
            raise AgentError(f"the session is {self.state}; its workspace is readable while it runs")
        return self._sandbox

    async def diff(self) -> dict[str, Any]:
        """The branch's changes against the commit it started from, untracked files included."""
        sandbox = self._running_sandbox()
        try:
            return await workspace.diff(sandbox, self.record.base_commit or "HEAD")
        except workspace.WorkspaceError as exc:
            raise AgentError(str(exc), 500) from exc

    async def read_file(self, path: str) -> str:
        try:
            return await workspace.read_file(self._running_sandbox(), path)
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
                            await self._catch_up_after_gap(client)
                        continue
                    assert self._normalizer is not None
                    events, signals = self._normalizer.feed(raw)
                    await self._apply(events, signals)
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

    async def _catch_up_after_gap(self, client: OpenCodeClient) -> None:
        """After a reconnect, a turn that ended while we were away must still be finished."""
        if self._turn is None:
            return
        statuses = await client.statuses()
        if self.record.opencode_session_id not in statuses:
            await self._finish_turn(self._turn.outcome, self._turn.error)

    async def _apply(self, events: list[Normalized], signals: Signals) -> None:
        if signals.message is not None:
            message_id, role, info = signals.message
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
        if signals.idle and self._turn is not None:
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
