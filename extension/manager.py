"""The registry of session agents: creation, lookup with ownership, deletion, start-up reconcile,
and this server's lease on the sessions it runs.

Several server processes may share one data dir (JupyterHub named servers of one person share a
home) or one store. Each holds a lease in the store, renewed by a heartbeat, and each session
records the server that runs it. A server touches only its own sessions and those whose server
is gone: its lease released (a clean stop), expired, or (on the same machine) its process dead.
So a second server never stops the sandboxes of a first one that is alive, and a crashed
server's sessions are recovered by the next server that looks (at its start, or at a heartbeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from typing import Any

from tabbi_sandbox import processes
from tabbi_sandbox.provider import SandboxError, SandboxProvider

from . import model_config, states
from .agent import AgentError, AgentSettings, GitAccessLookup, SessionAgent, StartSteps
from .environments import EnvironmentStart
from .pool import WarmPool
from .store import Lease, SessionRecord, Store, StoreError
from .validation import RepoSpec

log = logging.getLogger(__name__)


class SessionNotFound(LookupError):
    """No such session for this user. Other users' sessions are reported the same way, so that
    a session id reveals nothing about who owns it."""


class SessionElsewhere(AgentError):
    """The session is run by another live tabbi server sharing this data (a named server)."""

    def __init__(self, session_id: str):
        super().__init__(
            f"session {session_id} is running on another tabbi server that shares this data "
            "directory; use it there (or stop that server, and this one takes the session over)",
            409,
        )


def _machine() -> dict[str, Any]:
    """Where this process runs, precisely enough that another server process can tell whether
    it is still alive: the same host, boot and PID namespace make a PID comparable."""
    info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(),
                            "started": processes.start_time(os.getpid())}
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as f:
            info["boot"] = f.read().strip()
        info["pidns"] = os.readlink("/proc/self/ns/pid")
    return info


def resolved_model(settings: model_config.ModelSettings, requested: str | None) -> str | None:
    """The model a new session will use (the server's default, unless it asked for another),
    spelled as configured so that it resolves the same way at every start: the session records
    (and its clients show) the model actually used rather than "the server's default". A
    configuration that names no usable model keeps the request: the start then fails with the
    reason, on the session."""
    try:
        model_config.resolve(settings, requested)
    except model_config.ModelConfigError:
        return requested
    return requested or settings.model


class SessionManager:
    def __init__(
        self,
        store: Store,
        provider: SandboxProvider,
        settings: AgentSettings,
        git_access: GitAccessLookup | None = None,
        lease_seconds: float = 30.0,
        pool: WarmPool | None = None,
    ):
        self.store = store
        #: Warm sandboxes for new sessions (None: every start is cold).
        self.pool = pool
        self.git_access = git_access
        self.provider = provider
        self.settings = settings
        #: This server process's lease: renewed every third of it, taken over once it expires.
        self.server_id = "srv-" + secrets.token_hex(8)
        self.lease_seconds = lease_seconds
        self._machine = _machine()
        self._agents: dict[str, SessionAgent] = {}
        self._lock = asyncio.Lock()
        self._heartbeat: asyncio.Task | None = None

    async def create(
        self,
        owner: str,
        repo: RepoSpec,
        model: str | None,
        base_branch: str | None,
        profile: dict | None = None,
        fresh: bool = False,
    ) -> SessionAgent:
        """A new session, starting. ``fresh``: build the repository's environment anew rather
        than start from the person's warm snapshot of it (``environments.py``)."""
        asked = StartSteps()
        await self.store.upsert_user(owner, profile or {})
        model = resolved_model(self.settings.model, model)
        # A warm sandbox is reserved for the session it serves: the session takes its id.
        warm = self.pool.take(model) if self.pool is not None else None
        session_id = warm.id if warm else "ses-" + secrets.token_hex(6)
        record = SessionRecord(
            id=session_id,
            owner=owner,
            repo=repo.display if repo.kind != "url" else repo.url,
            work_branch=f"tabbi/{session_id.removeprefix('ses-')}",
            base_branch=base_branch,
            model=model,
            server_id=self.server_id,
        )
        try:
            await self.store.create_session(record)
            async with self._lock:
                agent = await self._adopt(record)
        except BaseException:
            if warm is not None:
                await asyncio.shield(self.provider.discard(warm))
            raise
        agent.warm, agent.steps = warm, asked
        # A git URL's query is left out of the log: someone may have put a credential there.
        agent.log.info("session.created", "session created", repo=record.repo.split("?", 1)[0],
                       model=model, provider=self.provider.name)
        if self.settings.environments is not None:
            agent.environment = EnvironmentStart(self.settings.environments, record.id, owner,
                                                 record.repo, base_branch, fresh)
        await agent.start()
        return agent

    async def get(self, owner: str, session_id: str) -> SessionAgent:
        agent = self._agents.get(session_id)
        taken = None
        if agent is None:
            async with self._lock:
                agent = self._agents.get(session_id)
                if agent is None:
                    record = await self.store.get_session(session_id)
                    if record is None or record.owner != owner:
                        raise SessionNotFound(session_id)
                    agent = taken = await self._take(record)
                    if agent is None:
                        raise SessionElsewhere(session_id)
            if taken is not None and taken.state in states.LIVE:
                await taken.recover_after_restart()  # it was live on a server that is gone
        if agent.record.owner != owner or agent.state == states.DELETED:
            raise SessionNotFound(session_id)
        return agent

    def agents(self) -> list[SessionAgent]:
        """Every session agent this server holds (all owners)."""
        return list(self._agents.values())

    async def list(self, owner: str) -> list[dict]:
        out = []
        for record in await self.store.list_sessions(owner):
            agent = self._agents.get(record.id)
            out.append(agent.describe() if agent else record.public())
        return out

    async def delete(self, owner: str, session_id: str) -> None:
        agent = await self.get(owner, session_id)
        budgets = self.settings.budgets
        if budgets is not None:  # its spend still counts for its owner: kept before it goes
            await budgets.retire(self.store, agent.record)
        await agent.delete()
        self._agents.pop(session_id, None)
        if budgets is not None:
            try:  # with what it spent until it stopped; the first record already holds most
                await budgets.retire(self.store, agent.record)
            except Exception:  # the delete is done: a failed update must not turn it into an error
                log.warning("tabbi: the final spend of deleted session %s was not recorded", session_id,
                            exc_info=True)
            finally:
                budgets.forget(session_id)

    async def _adopt(self, record: SessionRecord) -> SessionAgent:
        agent = SessionAgent(
            record, store=self.store, provider=self.provider, settings=self.settings,
            git_access=self.git_access,
        )
        await agent.load()
        self._agents[record.id] = agent
        return agent

    async def _take(self, record: SessionRecord) -> SessionAgent | None:
        """Adopt a session this process has no agent for, if it is ours to run: its server is
        this one, or gone (then it is claimed, compare-and-swap, so that of two servers looking
        at once only one takes it). None: another live server runs it. Called under the lock."""
        for _ in range(3):  # its server may change meanwhile (a dead server's lease released)
            if record.server_id == self.server_id:
                return await self._adopt(record)
            if record.server_id is not None and record.server_id in await self._live_servers():
                return None
            if await self.store.claim_session(record.id, self.server_id, record.server_id):
                record.server_id = self.server_id
                return await self._adopt(record)
            fresh = await self.store.get_session(record.id)
            if fresh is None:
                return None
            record = fresh
        return None

    # -- the lease ----------------------------------------------------------------------------
    def _alive(self, lease: Lease, now: float) -> bool:
        if lease.server_id == self.server_id:
            return True
        if lease.expires_at < now:
            return False
        info, here = lease.info, self._machine
        same_machine = all(info.get(k) == here.get(k) for k in ("host", "boot", "pidns"))
        if same_machine and "boot" in here and "pidns" in here and info.get("pid"):
            return processes.start_time(int(info["pid"])) == info.get("started")
        return True  # elsewhere: only the expiry tells

    async def _live_servers(self) -> set[str]:
        now = time.time()
        return {lease.server_id for lease in await self.store.list_leases() if self._alive(lease, now)}

    async def _renew(self) -> None:
        await self.store.put_lease(Lease(
            self.server_id, time.time() + self.lease_seconds, self._machine, time.time()))

    async def _beat(self) -> None:
        """Renew the lease, and take over the sessions of servers that went away meanwhile."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)  # a heartbeat timer, not synchronization
            try:
                await self._renew()
            except StoreError:
                log.warning("tabbi: renewing this server's lease failed; trying again", exc_info=True)
                continue
            try:
                await self.reconcile()
            except Exception:  # the heartbeat must go on, or the lease lapses
                log.exception("tabbi: taking over the sessions of a stopped server failed")

    async def startup(self) -> None:
        """Take this server's lease, reconcile, and keep the lease renewed."""
        await self._renew()
        await self.reconcile()
        self._heartbeat = asyncio.ensure_future(self._beat())

    async def reconcile(self) -> None:
        """Reconcile what the store says was live with what is, for the sessions of servers that
        are gone (their leases are cleared, which lets go of their sessions): a sandbox still
        alive (one that outlives its server, ``detach_sandboxes``) is re-attached and caught up;
        a gone one leaves its session ``paused`` (with a snapshot) or ``error``, with an event
        saying why, and any queued prompts start it again. Sessions of live servers are not
        touched; dormant ones are claimed when first used."""
        now = time.time()
        leases = await self.store.list_leases()
        live = {lease.server_id for lease in leases if self._alive(lease, now)}
        for lease in leases:
            if lease.server_id not in live:
                log.info("tabbi: server %s is gone; its sessions are free", lease.server_id)
                await self.store.release_lease(lease.server_id)
        for record in await self.store.list_sessions():
            if record.state not in states.LIVE or record.id in self._agents:
                continue
            if record.server_id is not None and record.server_id in live - {self.server_id}:
                continue
            async with self._lock:
                if record.id in self._agents:
                    continue
                agent = await self._take(record)
            if agent is None:
                continue
            log.info("tabbi: session %s was %s when its server stopped", record.id, record.state)
            await agent.recover_after_restart()
        await self._end_orphans()

    async def _end_orphans(self) -> None:
        """Let the provider end its sandboxes that no live session owns (a sandbox whose server
        crashed while starting it, or whose session was deleted meanwhile), so none bills forever.
        A starting session owns whatever sandbox it has (its state is stored once it runs)."""
        if type(self.provider).reconcile is SandboxProvider.reconcile:
            return  # this provider has nothing to list (local orphans are found by their marker)
        live = {r.id: (r.sandbox_state if r.state != states.STARTING else None)
                for r in await self.store.list_sessions() if r.state in states.LIVE}
        try:
            ended = await self.provider.reconcile(live)
        except SandboxError as exc:
            log.warning("tabbi: ending orphaned sandboxes failed: %s", exc)
            return
        if ended:
            log.info("tabbi: ended %d orphaned sandbox(es)", ended)

    async def shutdown(self) -> None:
        """Stop the heartbeat and every agent, then release the lease (so the sessions are free
        at once for the next server, not after the lease's expiry)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self.pool is not None:
            await self.pool.shutdown()
        await asyncio.gather(*(a.shutdown() for a in self._agents.values()), return_exceptions=True)
        self._agents.clear()
        try:
            await self.store.release_lease(self.server_id)
        except StoreError:
            log.warning("tabbi: releasing this server's lease failed; it expires by itself",
                        exc_info=True)
