"""The SQLite store: the zero-setup default, one file under the data dir.

All SQLite work runs on one dedicated thread per store (never on the server's event loop). Each
call is one transaction: writes begin with ``BEGIN IMMEDIATE``, which takes SQLite's write lock
up front, so two writers (two store instances, two server processes on one data dir) queue on
that lock (``busy_timeout``) instead of reading a stale ``MAX(seq)`` or failing half-way; reads
run in a deferred transaction and see one consistent snapshot (WAL mode: they never block).
Schema changes are numbered migrations recorded in ``PRAGMA user_version``, applied under the
same write lock, so two processes opening a fresh database migrate it once.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from traitlets import Float

from tabbi_sandbox.provider import PathTrait

from .. import metrics
from .base import (
    SESSION_FIELDS,
    Event,
    Lease,
    NewEvent,
    Prompt,
    SessionRecord,
    Snapshot,
    Store,
    StoreError,
    StoreUnavailable,
    spend_amount,
)

T = TypeVar("T")

#: Migration N brings the schema from version N to N+1. Append; never edit a released one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE users (
        username TEXT PRIMARY KEY,
        profile TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        repo TEXT NOT NULL,
        work_branch TEXT NOT NULL,
        base_branch TEXT,
        base_commit TEXT,
        model TEXT,
        state TEXT NOT NULL,
        error TEXT,
        opencode_session_id TEXT,
        sandbox_state TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX sessions_owner ON sessions(owner, created_at);
    CREATE TABLE events (
        session_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        type TEXT NOT NULL,
        data TEXT NOT NULL,
        ts REAL NOT NULL,
        PRIMARY KEY (session_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE prompts (
        id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        text TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX prompts_session ON prompts(session_id, position);
    CREATE TABLE messages (
        session_id TEXT NOT NULL,
        id TEXT NOT NULL,
        role TEXT NOT NULL,
        info TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (session_id, id)
    );
    CREATE TABLE parts (
        session_id TEXT NOT NULL,
        message_id TEXT NOT NULL,
        id TEXT NOT NULL,
        part TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (session_id, id)
    );
    CREATE TABLE tokens (
        username TEXT NOT NULL,
        provider TEXT NOT NULL,
        ciphertext BLOB NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (username, provider)
    );
    """,
    # 2: snapshots of a session's sandbox (workspace + agent data), newest kept.
    """
    CREATE TABLE snapshots (
        session_id TEXT NOT NULL,
        id TEXT NOT NULL,
        ref TEXT NOT NULL,
        size INTEGER NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (session_id, id)
    );
    """,
    # 3: leases of server processes, and which server runs each session.
    """
    ALTER TABLE sessions ADD COLUMN server_id TEXT;
    CREATE TABLE leases (
        server_id TEXT PRIMARY KEY,
        expires_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        info TEXT NOT NULL
    );
    """,
    # 4: what the person attached to a prompt (JSON list of {kind, label, content, truncated}).
    """
    ALTER TABLE prompts ADD COLUMN attachments TEXT NOT NULL DEFAULT '[]';
    """,
    # 5: spend of deleted sessions, still counted by the owner's budgets (budgets.py).
    """
    CREATE TABLE retired_spend (
        user_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        cost REAL NOT NULL,
        seconds REAL NOT NULL,
        retired_at REAL NOT NULL,
        PRIMARY KEY (user_id, session_id)
    ) WITHOUT ROWID;
    """,
]

#: Primary SQLite result codes that mean "not now" rather than "never": BUSY, LOCKED, NOMEM,
#: INTERRUPT, IOERR, FULL, CANTOPEN, PROTOCOL.
_RETRYABLE_CODES = {5, 6, 7, 9, 10, 13, 14, 15}


def _statements(script: str) -> list[str]:
    """A migration script split into statements (``executescript`` would commit on its own)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return [s for s in statements if s.strip(" ;\n")]


def _translate(exc: BaseException) -> StoreError:
    """SQLite's (and the driver's) errors as the store's own: retryable or permanent."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        text = str(exc)
        if code is not None:
            retryable = code & 0xFF in _RETRYABLE_CODES
        else:  # Python < 3.11: only the message tells
            retryable = isinstance(exc, sqlite3.OperationalError) and any(
                word in text for word in ("locked", "busy", "I/O", "unable to open", "full")
            )
        return (StoreUnavailable if retryable else StoreError)(f"SQLite: {text}")
    # The driver refusing a value (an integer beyond 64 bits, a lone surrogate): bad input.
    return StoreError(f"the store cannot hold this value: {exc}")


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to the current version (inside the caller's write transaction, so two
    processes opening one database at once migrate it once)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for number, script in enumerate(MIGRATIONS[version:], start=version):
        for statement in _statements(script):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version={number + 1}")


def _session_from_row(row: sqlite3.Row) -> SessionRecord:
    values = dict(row)
    values["sandbox_state"] = json.loads(values["sandbox_state"] or "{}")
    return SessionRecord(**values)


_DRIVER_ERRORS = (sqlite3.Error, OverflowError, UnicodeError)


def _transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T], write: bool) -> T:
    """Run ``fn`` as one transaction: all of it is committed, or none of it."""
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


class SQLiteStore(Store):
    """The embedded default: one SQLite file, written by one thread of the server process."""

    path = PathTrait(help="The database file. Default: DATA_DIR/tabbi.sqlite3.").tag(config=True)
    busy_timeout = Float(
        5.0, help="Seconds a call waits for another writer's lock before StoreUnavailable."
    ).tag(config=True)

    def __init__(self, path: str | Path | None = None, **kwargs: Any):
        if path is not None:
            kwargs["path"] = path
        super().__init__(**kwargs)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tabbi-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def _call(self, fn: Callable[[], T]) -> T:
        """``fn`` on the store's thread, its errors translated."""

        def call() -> T:
            try:
                return fn()
            except _DRIVER_ERRORS as exc:
                error = _translate(exc)
                metrics.store_error("sqlite", error)
                raise error from exc

        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, call)
        except RuntimeError:  # the executor was shut down: closed
            raise StoreError("the store is closed") from None
        return await future

    async def _run(self, fn: Callable[[sqlite3.Connection], T], write: bool = True) -> T:
        """``fn`` as one transaction (a write transaction unless ``write`` is False)."""

        def call() -> T:
            if self._conn is None:
                raise StoreError("the store is closed")
            return _transaction(self._conn, fn, write)

        return await self._call(call)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._run(fn, write=False)

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout, check_same_thread=False, isolation_level=None
            )
            try:
                conn.row_factory = sqlite3.Row
                conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA foreign_keys=ON")
                _transaction(conn, _migrate, write=True)
                self.path.chmod(0o600)
            except BaseException:
                conn.close()
                raise
            return conn

        self._conn = await self._call(connect)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._call(conn.close)
        self._executor.shutdown(wait=False)

    async def ping(self) -> bool:
        try:
            return await self._read(lambda c: c.execute("SELECT 1").fetchone()[0] == 1)
        except StoreError:
            return False

    # users ----------------------------------------------------------------------------------
    async def upsert_user(self, username: str, profile: dict[str, Any]) -> None:
        await self._run(
            lambda c: c.execute(
                "INSERT INTO users VALUES (?, ?, ?) ON CONFLICT(username) DO UPDATE SET "
                "profile=excluded.profile, updated_at=excluded.updated_at",
                (username, json.dumps(profile), time.time()),
            )
        )

    async def get_user(self, username: str) -> dict[str, Any] | None:
        row = await self._read(
            lambda c: c.execute("SELECT profile FROM users WHERE username=?", (username,)).fetchone()
        )
        return json.loads(row[0]) if row else None

    # sessions -------------------------------------------------------------------------------
    async def create_session(self, record: SessionRecord) -> SessionRecord:
        now = time.time()
        record.created_at = record.created_at or now
        record.updated_at = now
        await self._run(
            lambda c: c.execute(
                "INSERT INTO sessions (id, owner, repo, work_branch, base_branch, base_commit, model, "
                "state, error, opencode_session_id, sandbox_state, created_at, updated_at, server_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.owner,
                    record.repo,
                    record.work_branch,
                    record.base_branch,
                    record.base_commit,
                    record.model,
                    record.state,
                    record.error,
                    record.opencode_session_id,
                    json.dumps(record.sandbox_state),
                    record.created_at,
                    record.updated_at,
                    record.server_id,
                ),
            )
        )
        return record

    async def get_session(self, session_id: str) -> SessionRecord | None:
        row = await self._read(
            lambda c: c.execute("SELECT * FROM sessions WHERE id=?", (session_id,)).fetchone()
        )
        return _session_from_row(row) if row else None

    async def list_sessions(self, owner: str | None = None) -> list[SessionRecord]:
        def query(c: sqlite3.Connection) -> list[sqlite3.Row]:
            if owner is None:
                return c.execute("SELECT * FROM sessions ORDER BY created_at DESC").fetchall()
            return c.execute(
                "SELECT * FROM sessions WHERE owner=? ORDER BY created_at DESC", (owner,)
            ).fetchall()

        return [_session_from_row(r) for r in await self._read(query)]

    async def update_session(self, session_id: str, **fields: Any) -> None:
        unknown = set(fields) - SESSION_FIELDS
        if unknown:
            raise StoreError(f"unknown session fields: {sorted(unknown)}")
        if "sandbox_state" in fields:
            fields["sandbox_state"] = json.dumps(fields["sandbox_state"])
        fields["updated_at"] = time.time()
        assignments = ", ".join(f"{name}=?" for name in fields)
        await self._run(
            lambda c: c.execute(
                f"UPDATE sessions SET {assignments} WHERE id=?", (*fields.values(), session_id)
            )
        )

    async def delete_session(self, session_id: str) -> None:
        def delete(c: sqlite3.Connection) -> None:
            for table in ("events", "prompts", "messages", "parts", "snapshots"):
                c.execute(f"DELETE FROM {table} WHERE session_id=?", (session_id,))
            c.execute("DELETE FROM sessions WHERE id=?", (session_id,))

        await self._run(delete)

    async def claim_session(self, session_id: str, server_id: str, expected: str | None) -> bool:
        cursor = await self._run(
            lambda c: c.execute(
                "UPDATE sessions SET server_id=? WHERE id=? AND server_id IS ?",
                (server_id, session_id, expected),
            )
        )
        return cursor.rowcount == 1

    # spend of deleted sessions --------------------------------------------------------------
    async def retire_spend(self, user_id: str, session_id: str, cost: float, seconds: float) -> None:
        row = (user_id, session_id, spend_amount(cost), spend_amount(seconds), time.time())

        def retire(c: sqlite3.Connection) -> None:
            owner = c.execute("SELECT owner FROM sessions WHERE id=?", (session_id,)).fetchone()
            if owner is not None and owner[0] != user_id:
                raise StoreError(f"no session {session_id}")  # someone else's: as Convex answers
            c.execute(
                "INSERT INTO retired_spend VALUES (?, ?, ?, ?, ?) ON CONFLICT(user_id, session_id) "
                "DO UPDATE SET cost=max(cost, excluded.cost), seconds=max(seconds, excluded.seconds)",
                row,
            )

        await self._run(retire)

    async def retired_spend(self, user_id: str) -> tuple[float, float]:
        row = await self._read(
            lambda c: c.execute(
                "SELECT coalesce(sum(cost), 0), coalesce(sum(seconds), 0) FROM retired_spend "
                "WHERE user_id=? AND session_id NOT IN (SELECT id FROM sessions)", (user_id,)).fetchone()
        )
        return float(row[0]), float(row[1])

    # leases ---------------------------------------------------------------------------------
    async def put_lease(self, lease: Lease) -> None:
        lease.heartbeat_at = lease.heartbeat_at or time.time()
        await self._run(
            lambda c: c.execute(
                "INSERT INTO leases VALUES (?, ?, ?, ?) ON CONFLICT(server_id) DO UPDATE SET "
                "expires_at=excluded.expires_at, heartbeat_at=excluded.heartbeat_at, info=excluded.info",
                (lease.server_id, lease.expires_at, lease.heartbeat_at, json.dumps(lease.info)),
            )
        )

    async def list_leases(self) -> list[Lease]:
        rows = await self._read(
            lambda c: c.execute("SELECT server_id, expires_at, heartbeat_at, info FROM leases").fetchall()
        )
        return [Lease(r[0], r[1], json.loads(r[3]), r[2]) for r in rows]

    async def release_lease(self, server_id: str) -> None:
        def release(c: sqlite3.Connection) -> None:
            c.execute("UPDATE sessions SET server_id=NULL WHERE server_id=?", (server_id,))
            c.execute("DELETE FROM leases WHERE server_id=?", (server_id,))

        await self._run(release)

    # events ---------------------------------------------------------------------------------
    async def append_events(self, session_id: str, events: Sequence[NewEvent]) -> list[Event]:
        def append(c: sqlite3.Connection) -> list[Event]:
            last = c.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM events WHERE session_id=?", (session_id,)
            ).fetchone()[0]
            stored = [
                Event(session_id, last + n, e.type, e.data, e.ts) for n, e in enumerate(events, 1)
            ]
            c.executemany(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                [(e.session_id, e.seq, e.type, json.dumps(e.data), e.ts) for e in stored],
            )
            return stored

        return await self._run(append)

    async def list_events(self, session_id: str, after: int = 0, limit: int = 1000) -> list[Event]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT seq, type, data, ts FROM events WHERE session_id=? AND seq>? "
                "ORDER BY seq LIMIT ?",
                (session_id, after, limit),
            ).fetchall()
        )
        return [Event(session_id, r[0], r[1], json.loads(r[2]), r[3]) for r in rows]

    async def last_seq(self, session_id: str) -> int:
        row = await self._read(
            lambda c: c.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM events WHERE session_id=?", (session_id,)
            ).fetchone()
        )
        return int(row[0])

    # prompts --------------------------------------------------------------------------------
    async def enqueue_prompt(self, prompt: Prompt) -> Prompt:
        def insert(c: sqlite3.Connection) -> int:
            position = c.execute(
                "SELECT COALESCE(MAX(position), 0) + 1 FROM prompts WHERE session_id=?",
                (prompt.session_id,),
            ).fetchone()[0]
            c.execute(
                "INSERT INTO prompts (id, session_id, position, text, status, created_at, attachments) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (prompt.id, prompt.session_id, position, prompt.text, prompt.status, prompt.created_at,
                 json.dumps(prompt.attachments)),
            )
            return position

        prompt.position = await self._run(insert)
        return prompt

    async def pending_prompts(self, session_id: str) -> list[Prompt]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT id, session_id, text, status, created_at, position, attachments FROM prompts "
                "WHERE session_id=? AND status IN ('queued', 'running') ORDER BY position",
                (session_id,),
            ).fetchall()
        )
        return [Prompt(*r[:6], attachments=json.loads(r[6])) for r in rows]

    async def set_prompt_status(self, prompt_id: str, status: str) -> None:
        await self._run(
            lambda c: c.execute("UPDATE prompts SET status=? WHERE id=?", (status, prompt_id))
        )

    # messages and parts ---------------------------------------------------------------------
    async def upsert_message(
        self, session_id: str, message_id: str, role: str, info: dict[str, Any]
    ) -> None:
        await self._run(
            lambda c: c.execute(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?) ON CONFLICT(session_id, id) DO UPDATE "
                "SET role=excluded.role, info=excluded.info",
                (session_id, message_id, role, json.dumps(info), time.time()),
            )
        )

    async def upsert_part(
        self, session_id: str, message_id: str, part_id: str, part: dict[str, Any]
    ) -> None:
        await self._run(
            lambda c: c.execute(
                "INSERT INTO parts VALUES (?, ?, ?, ?, ?) ON CONFLICT(session_id, id) DO UPDATE "
                "SET part=excluded.part",
                (session_id, message_id, part_id, json.dumps(part), time.time()),
            )
        )

    @staticmethod
    def _message_rows(c: sqlite3.Connection, session_id: str) -> list[dict[str, Any]]:
        return [{"id": r[0], "role": r[1], "info": json.loads(r[2])} for r in c.execute(
            "SELECT id, role, info FROM messages WHERE session_id=? ORDER BY created_at, rowid",
            (session_id,))]

    async def message_infos(self, session_id: str) -> list[dict[str, Any]]:
        return await self._read(lambda c: self._message_rows(c, session_id))

    async def list_messages(self, session_id: str) -> list[dict[str, Any]]:
        def query(c: sqlite3.Connection) -> list[dict[str, Any]]:
            messages = [{**m, "parts": []} for m in self._message_rows(c, session_id)]
            by_id = {m["id"]: m for m in messages}
            for message_id, part_id, part in c.execute(
                "SELECT message_id, id, part FROM parts WHERE session_id=? ORDER BY created_at, rowid",
                (session_id,),
            ):
                if message_id in by_id:
                    by_id[message_id]["parts"].append({"id": part_id, **json.loads(part)})
            return messages

        return await self._read(query)

    # snapshots ------------------------------------------------------------------------------
    async def add_snapshot(self, snapshot: Snapshot) -> None:
        await self._run(
            lambda c: c.execute(
                "INSERT INTO snapshots VALUES (?, ?, ?, ?, ?)",
                (snapshot.session_id, snapshot.id, json.dumps(snapshot.ref), snapshot.size,
                 snapshot.created_at),
            )
        )

    async def list_snapshots(self, session_id: str) -> list[Snapshot]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT session_id, id, ref, size, created_at FROM snapshots WHERE session_id=? "
                "ORDER BY created_at DESC, rowid DESC",
                (session_id,),
            ).fetchall()
        )
        return [Snapshot(r[0], r[1], json.loads(r[2]), r[3], r[4]) for r in rows]

    async def delete_snapshot(self, session_id: str, snapshot_id: str) -> None:
        await self._run(
            lambda c: c.execute(
                "DELETE FROM snapshots WHERE session_id=? AND id=?", (session_id, snapshot_id)
            )
        )

    # tokens ---------------------------------------------------------------------------------
    async def put_token(self, username: str, provider: str, ciphertext: bytes) -> None:
        await self._run(
            lambda c: c.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?) ON CONFLICT(username, provider) DO UPDATE "
                "SET ciphertext=excluded.ciphertext, updated_at=excluded.updated_at",
                (username, provider, ciphertext, time.time()),
            )
        )

    async def swap_token(
        self, username: str, provider: str, expected: bytes, ciphertext: bytes | None
    ) -> bool:
        def swap(c: sqlite3.Connection) -> int:
            if ciphertext is None:
                return c.execute(
                    "DELETE FROM tokens WHERE username=? AND provider=? AND ciphertext=?",
                    (username, provider, expected),
                ).rowcount
            return c.execute(
                "UPDATE tokens SET ciphertext=?, updated_at=? "
                "WHERE username=? AND provider=? AND ciphertext=?",
                (ciphertext, time.time(), username, provider, expected),
            ).rowcount

        return await self._run(swap) == 1

    async def get_token(self, username: str, provider: str) -> bytes | None:
        row = await self._read(
            lambda c: c.execute(
                "SELECT ciphertext FROM tokens WHERE username=? AND provider=?", (username, provider)
            ).fetchone()
        )
        return bytes(row[0]) if row else None

    async def delete_token(self, username: str, provider: str) -> None:
        await self._run(
            lambda c: c.execute(
                "DELETE FROM tokens WHERE username=? AND provider=?", (username, provider)
            )
        )
