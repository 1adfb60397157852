"""The store interface: everything tabbi persists, behind one small async API.

SQLite implements it by default; a Convex backend implements the same methods over Convex's HTTP
API. ``tests/test_store_contract.py`` runs one suite against every implementation, so a backend is
done when that suite passes.

Concurrency model (what every backend guarantees, and what callers may rely on):

- **One call, one transaction.** Each method either happens completely or not at all, and is
  isolated from other calls, also from other store instances on the same data (several server
  processes sharing a data dir, or a Convex deployment serving many servers). Nothing a caller
  does spans two calls atomically, except through the compare-and-swap methods below.
- **The store numbers events.** ``append_events`` gives a batch of one session's new events the
  next ``seq`` numbers, atomically: whoever appends, from however many processes, a session's
  log is numbered 1, 2, 3 ... with no gap and no duplicate. No caller picks a ``seq``.
  Announcing events to live subscribers (in seq order, each once) is the caller's business;
  ``SessionAgent`` does it under one lock per session, and a session's events are written only by
  the server that holds it (see leases).
- **Prompt positions** are assigned the same way by ``enqueue_prompt``: unique and consecutive
  per session.
- **Compare-and-swap** where read-modify-write crosses calls: ``swap_token`` (a token refresh:
  only one process may spend a rotating refresh token) and ``claim_session`` (which server runs a
  session).
- **Leases.** Each server process holds a lease (``put_lease`` renews it, ``release_lease`` ends
  it on a clean stop) and each session records the server that runs it. A server reconciles
  only sessions that are its own or whose server's lease is gone or expired, so two servers on
  one data dir never stop each other's sandboxes. Expiry is judged with the reader's clock:
  servers sharing a store need clocks that agree to well within a lease's length.
- **Errors.** Everything a store raises is a ``StoreError``. ``StoreUnavailable`` (a subclass)
  means the store could not answer now (busy, locked, unreachable, an I/O error) and nothing was
  written: the same call may succeed later, so callers retry it with backoff. A backend that
  cannot know whether a write happened (a timeout after sending it) must make that write
  idempotent before raising ``StoreUnavailable``. Any other ``StoreError`` is permanent (a
  constraint such as a duplicate id, bad input, a closed store): retrying cannot help. No
  driver-specific exception (``sqlite3.Error``, ``httpx.HTTPError``) escapes a store.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from traitlets.config import LoggingConfigurable

from tabbi_sandbox.provider import ConfigurableABCMeta


class StoreError(Exception):
    """The store did not do what was asked. Permanent (a broken constraint, bad input, a closed
    store) unless it is a ``StoreUnavailable``."""


class StoreUnavailable(StoreError):
    """The store cannot answer right now (locked, busy, unreachable, an I/O error); nothing was
    written and the same call may succeed later. The only store error worth retrying."""


def spend_amount(value: float) -> float:
    """A spend to keep (``retire_spend``): a finite number of at least 0, else a ``StoreError``
    (refused before anything is written, on every backend alike)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise StoreError(f"a spend must be a finite number >= 0, not {value!r}")
    return float(value)


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
    #: The server process that runs the session (its lease id); None: no server holds it.
    server_id: str | None = None

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
class NewEvent:
    """An event to append; the store gives it its ``seq``."""

    type: str
    data: dict[str, Any]
    ts: float = field(default_factory=time.time)


@dataclass
class Prompt:
    id: str
    session_id: str
    text: str
    status: str  # queued | running | done | failed
    created_at: float
    #: Order of delivery within the session; assigned by the store.
    position: int = 0
    #: What the person attached (``{kind, label, content, truncated}``, validated at the edge):
    #: kept with the prompt until it is delivered, the model gets each as a labelled block.
    attachments: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Snapshot:
    """A saved sandbox state. ``ref`` is the provider's JSON description (an archive path, a
    Modal image id); newest first when listed."""

    session_id: str
    id: str
    ref: dict[str, Any]
    size: int
    created_at: float


@dataclass
class Lease:
    """A server process's claim to the sessions it runs, valid until ``expires_at`` (renewed by
    its heartbeat). ``info`` says where it runs (host, pid ...), so a server on the same machine
    can tell a crashed one from a live one without waiting for the expiry."""

    server_id: str
    expires_at: float
    info: dict[str, Any] = field(default_factory=dict)
    heartbeat_at: float = 0.0


SESSION_FIELDS = {
    "state",
    "base_commit",
    "error",
    "opencode_session_id",
    "sandbox_state",
    "model",
}


class Store(LoggingConfigurable, metaclass=ConfigurableABCMeta):
    """Async persistence for users, sessions, messages and parts, events, prompts and tokens.

    A backend is configured as its own traitlets class (``c.SQLiteStore.busy_timeout``,
    ``c.ConvexStore.url``); the extension constructs it with ``parent=`` itself."""

    async def open(self) -> None:
        """Connect and migrate the schema to the current version."""

    async def close(self) -> None:
        """Release connections."""

    async def ping(self) -> bool:
        """True when the backend answers; used by the health endpoint."""
        return True

    def trouble(self) -> str | None:
        """Why the store is not fully usable right now (its calls failing and being retried),
        or None; the health endpoint reports it."""
        return None

    #: Seconds a streamed event (a text delta) may wait for others to share its write
    #: (``EventLog``). A store whose writes are cheap (SQLite) writes at once.
    batch_window: float = 0.0

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
        """Remove the session and everything that belongs to it (its events, prompts, messages,
        parts and snapshot records), all or nothing."""

    @abc.abstractmethod
    async def claim_session(self, session_id: str, server_id: str, expected: str | None) -> bool:
        """Make ``server_id`` the server that runs the session, only if the session's server is
        still ``expected`` (compare-and-swap); False when it changed meanwhile or there is no
        such session."""

    # spend of deleted sessions --------------------------------------------------------------
    @abc.abstractmethod
    async def retire_spend(self, user_id: str, session_id: str, cost: float, seconds: float) -> None:
        """Keep what a session of ``user_id`` spent (model cost in dollars, sandbox running
        seconds) after it is deleted, so that the user's budgets still count it. One row per
        (user, session): repeating the call (a retried delete, a lost answer) never adds twice;
        each amount becomes the larger of the stored and the given one (spend only grows)."""

    @abc.abstractmethod
    async def retired_spend(self, user_id: str) -> tuple[float, float]:
        """``(cost, seconds)`` summed over the user's retired sessions that no longer exist;
        (0, 0) when none. A session retired but still here (its delete failed half-way) is not
        counted: its own spend still counts for it, and it must not count twice."""

    # leases ---------------------------------------------------------------------------------
    @abc.abstractmethod
    async def put_lease(self, lease: Lease) -> None:
        """Take or renew a server's lease."""

    @abc.abstractmethod
    async def list_leases(self) -> list[Lease]: ...

    @abc.abstractmethod
    async def release_lease(self, server_id: str) -> None:
        """End a lease and let go of every session it held (their ``server_id`` becomes None),
        in one transaction: a clean stop, or a dead server's lease cleared by another."""

    # events ---------------------------------------------------------------------------------
    @abc.abstractmethod
    async def append_events(self, session_id: str, events: Sequence[NewEvent]) -> list[Event]:
        """Append a batch of new events to the session's log, numbered by the store with the next
        seqs (atomically: concurrent appends never collide or leave gaps); returns them in order."""

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

    async def message_infos(self, session_id: str) -> list[dict[str, Any]]:
        """Messages in creation order without their parts, each ``{"id", "role", "info"}``: what
        accounting reads (a store that can skip the parts, tool outputs included, overrides it)."""
        messages = await self.list_messages(session_id)
        return [{"id": m["id"], "role": m["role"], "info": m["info"]} for m in messages]

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
    async def put_token(self, username: str, provider: str, ciphertext: bytes) -> None:
        """Store the token, replacing any (a sign-in)."""

    @abc.abstractmethod
    async def swap_token(
        self, username: str, provider: str, expected: bytes, ciphertext: bytes | None
    ) -> bool:
        """Replace the token with ``ciphertext`` (None: delete it) only if it is still
        ``expected`` (compare-and-swap); False when it changed or is gone."""

    @abc.abstractmethod
    async def get_token(self, username: str, provider: str) -> bytes | None: ...

    @abc.abstractmethod
    async def delete_token(self, username: str, provider: str) -> None: ...
