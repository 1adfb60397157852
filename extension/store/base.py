"""The store interface: everything tabbi persists, behind one small async API.

SQLite implements it by default; a Convex backend implements the same methods over Convex's HTTP
API. ``tests/test_store_contract.py`` runs one suite against every implementation, so a backend is
done when that suite passes.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any


class StoreError(Exception):
    """The store could not do what was asked (unreachable, constraint broken)."""


@dataclass
class SessionRecord:
    id: str
    owner: str
    repo: str
    work_branch: str
    base_branch: str | None = None
    #: The commit the session branch started from (what ``diff`` compares against).
    base_commit: str | None = None
    model: str | None = None
    state: str = "idle"
    error: str | None = None
    opencode_session_id: str | None = None
    sandbox_state: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0

    def public(self) -> dict[str, Any]:
        """What clients may see: no sandbox internals."""
        return {
            "id": self.id,
            "owner": self.owner,
            "repo": self.repo,
            "work_branch": self.work_branch,
            "base_branch": self.base_branch,
            "base_commit": self.base_commit,
            "model": self.model,
            "state": self.state,
            "error": self.error,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass
class Event:
    """One entry of a session's append-only log. ``seq`` starts at 1 and has no gaps."""

    session_id: str
    seq: int
    type: str
    data: dict[str, Any]
    ts: float

    def public(self) -> dict[str, Any]:
        return {"seq": self.seq, "type": self.type, "data": self.data, "ts": self.ts}


@dataclass
class Prompt:
    id: str
    session_id: str
    text: str
    status: str  # queued | running | done | failed
    created_at: float
    #: Order of delivery within the session; assigned by the store.
    position: int = 0


@dataclass
class Snapshot:
    """A saved sandbox state. ``ref`` is the provider's JSON description (an archive path, a
    Modal image id); newest first when listed."""

    session_id: str
    id: str
    ref: dict[str, Any]
    size: int
    created_at: float


SESSION_FIELDS = {
    "state",
    "base_commit",
    "error",
    "opencode_session_id",
    "sandbox_state",
    "model",
}


class Store(abc.ABC):
    """Async persistence for users, sessions, messages and parts, events, prompts and tokens."""

    async def open(self) -> None:
        """Connect and migrate the schema to the current version."""

    async def close(self) -> None:
        """Release connections."""

    async def ping(self) -> bool:
        """True when the backend answers; used by the health endpoint."""
        return True

    # users ----------------------------------------------------------------------------------
    @abc.abstractmethod
    async def upsert_user(self, username: str, profile: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def get_user(self, username: str) -> dict[str, Any] | None: ...

    # sessions -------------------------------------------------------------------------------
    @abc.abstractmethod
    async def create_session(self, record: SessionRecord) -> SessionRecord: ...

    @abc.abstractmethod
    async def get_session(self, session_id: str) -> SessionRecord | None: ...

    @abc.abstractmethod
    async def list_sessions(self, owner: str | None = None) -> list[SessionRecord]:
        """Sessions of ``owner`` (all sessions when None), newest first."""

    @abc.abstractmethod
    async def update_session(self, session_id: str, **fields: Any) -> None:
        """Change the named fields (a subset of ``SESSION_FIELDS``)."""

    @abc.abstractmethod
    async def delete_session(self, session_id: str) -> None:
        """Remove the session and everything that belongs to it."""

    # events ---------------------------------------------------------------------------------
    @abc.abstractmethod
    async def append_event(self, event: Event) -> None:
        """Persist one event; a duplicate (session_id, seq) raises ``StoreError``."""

    @abc.abstractmethod
    async def list_events(self, session_id: str, after: int = 0, limit: int = 1000) -> list[Event]:
        """Events with ``seq > after`` in seq order."""

    @abc.abstractmethod
    async def last_seq(self, session_id: str) -> int: ...

    # prompts --------------------------------------------------------------------------------
    @abc.abstractmethod
    async def enqueue_prompt(self, prompt: Prompt) -> Prompt:
        """Persist a queued prompt and give it the next position."""

    @abc.abstractmethod
    async def pending_prompts(self, session_id: str) -> list[Prompt]:
        """Prompts not yet finished (queued or running), in delivery order."""

    @abc.abstractmethod
    async def set_prompt_status(self, prompt_id: str, status: str) -> None: ...

    # messages and parts ---------------------------------------------------------------------
    @abc.abstractmethod
    async def upsert_message(
        self, session_id: str, message_id: str, role: str, info: dict[str, Any]
    ) -> None: ...

    @abc.abstractmethod
    async def upsert_part(
        self, session_id: str, message_id: str, part_id: str, part: dict[str, Any]
    ) -> None: ...

    @abc.abstractmethod
    async def list_messages(self, session_id: str) -> list[dict[str, Any]]:
        """Messages in creation order, each ``{"id", "role", "info", "parts": [{"id", ...}]}``."""

    # snapshots ------------------------------------------------------------------------------
    @abc.abstractmethod
    async def add_snapshot(self, snapshot: Snapshot) -> None: ...

    @abc.abstractmethod
    async def list_snapshots(self, session_id: str) -> list[Snapshot]:
        """Newest first."""

    @abc.abstractmethod
    async def delete_snapshot(self, session_id: str, snapshot_id: str) -> None: ...

    # tokens (already encrypted by the caller) ------------------------------------------------
    @abc.abstractmethod
    async def put_token(self, username: str, provider: str, ciphertext: bytes) -> None: ...

    @abc.abstractmethod
    async def get_token(self, username: str, provider: str) -> bytes | None: ...

    @abc.abstractmethod
    async def delete_token(self, username: str, provider: str) -> None: ...
