"""The registry of session agents: creation, lookup with ownership, deletion, start-up reconcile."""

from __future__ import annotations

import asyncio
import logging
import secrets

from tabbi_sandbox.provider import SandboxProvider

from . import states
from .agent import AgentSettings, GitAccessLookup, SessionAgent
from .store import SessionRecord, Store
from .validation import RepoSpec

log = logging.getLogger(__name__)


class SessionNotFound(LookupError):
    """No such session for this user. Other users' sessions are reported the same way, so that
    a session id reveals nothing about who owns it."""


class SessionManager:
    def __init__(
        self,
        store: Store,
        provider: SandboxProvider,
        settings: AgentSettings,
        git_access: GitAccessLookup | None = None,
    ):
        self.store = store
        self.git_access = git_access
        self.provider = provider
        self.settings = settings
        self._agents: dict[str, SessionAgent] = {}
        self._lock = asyncio.Lock()

    async def create(
        self,
        owner: str,
        repo: RepoSpec,
        model: str | None,
        base_branch: str | None,
        profile: dict | None = None,
    ) -> SessionAgent:
        await self.store.upsert_user(owner, profile or {})
        session_id = "ses-" + secrets.token_hex(6)
        record = SessionRecord(
            id=session_id,
            owner=owner,
            repo=repo.display if repo.kind != "url" else repo.url,
            work_branch=f"tabbi/{session_id.removeprefix('ses-')}",
            base_branch=base_branch,
            model=model,
        )
        await self.store.create_session(record)
        agent = await self._adopt(record)
        await agent.start()
        return agent

    async def get(self, owner: str, session_id: str) -> SessionAgent:
        agent = self._agents.get(session_id)
        if agent is None:
            async with self._lock:
                agent = self._agents.get(session_id)
                if agent is None:
                    record = await self.store.get_session(session_id)
                    if record is None:
                        raise SessionNotFound(session_id)
                    agent = await self._adopt(record)
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
        await agent.delete()
        self._agents.pop(session_id, None)

    async def _adopt(self, record: SessionRecord) -> SessionAgent:
        agent = SessionAgent(
            record, store=self.store, provider=self.provider, settings=self.settings,
            git_access=self.git_access,
        )
        await agent.load()
        self._agents[record.id] = agent
        return agent

    async def startup(self) -> None:
        """Reconcile what the store says was live with what is: a sandbox still alive (one that
        outlives its server, ``detach_sandboxes``) is re-attached and caught up; a gone one
        leaves its session ``paused`` (with a snapshot) or ``error``, with an event saying why,
        and any queued prompts start it again."""
        for record in await self.store.list_sessions():
            if record.state not in states.LIVE:
                continue
            agent = await self._adopt(record)
            log.info("tabbi: session %s was %s when the server stopped", record.id, record.state)
            await agent.recover_after_restart()

    async def shutdown(self) -> None:
        await asyncio.gather(*(a.shutdown() for a in self._agents.values()), return_exceptions=True)
        self._agents.clear()
