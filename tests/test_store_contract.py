"""The store contract: one suite, run against every backend (``store`` is parametrized): SQLite,
and Convex through its real HTTP API served by the loopback stand-in (the real functions in
``convex/functions``, run by convex-test).

A new backend is added to ``BACKENDS`` and is done when this suite passes. Tests use the
abstract ``Store`` API only; what a test cannot do through it (make the backend fail in the
middle of a call, hold its write lock, write from another process) is a hook of the backend's
entry in ``BACKENDS``, which a new backend implements its own way. Session-scoped writes go to
sessions that exist (Convex refuses others: it authorizes them by the session's owner).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tabbi_extension.store import (
    Lease,
    NewEvent,
    Prompt,
    SessionRecord,
    Snapshot,
    SQLiteStore,
    Store,
    StoreError,
    StoreUnavailable,
)
from tabbi_extension.store.sqlite import MIGRATIONS
from tests.support.convex_standin import ConvexStandin, convex_standin  # noqa: F401 (a fixture)
from tests.support.convex_store import make_store, store_env


class SQLiteBackend:
    """The SQLite backend and its fault hooks (triggers and a second connection: real SQLite
    failing the ways it does)."""

    #: Writes per writer in the concurrency tests.
    writes = 150

    def __init__(self, tmp_path: Path):
        self.path = tmp_path / "db" / "tabbi.sqlite3"

    def make(self) -> Store:
        """Another store instance on the same data (what another server process opens)."""
        return SQLiteStore(self.path)

    @contextlib.contextmanager
    def _sql(self):
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def failing(self, name: str, when: str):
        """Every write matching ``when`` (a trigger's timing, event and condition) fails inside
        the store's transaction, as a constraint would."""
        with self._sql() as conn:
            conn.execute(f"CREATE TRIGGER {name} {when} BEGIN SELECT RAISE(ABORT, 'injected'); END")
        try:
            yield
        finally:
            with self._sql() as conn:
                conn.execute(f"DROP TRIGGER {name}")

    def fail_deleting_sessions(self):
        """``delete_session`` fails at its very end, after the session's children went."""
        return self.failing("no_session_delete", "BEFORE DELETE ON sessions")

    def fail_inserting_prompts(self):
        return self.failing("no_prompt_insert", "BEFORE INSERT ON prompts")

    def fail_events_of_type(self, type_: str):
        assert type_.isalnum()
        return self.failing("no_poison", f"BEFORE INSERT ON events WHEN NEW.type = '{type_}'")

    @contextlib.asynccontextmanager
    async def unavailable(self) -> AsyncIterator[Store]:
        """A store instance that finds the backend unavailable: another connection holds the
        write lock past the instance's busy timeout. Writes become possible again on exit."""
        store = SQLiteStore(self.path, busy_timeout=0.2)
        await store.open()
        with self._sql() as conn:
            conn.execute("BEGIN EXCLUSIVE")
            try:
                yield store
            finally:
                conn.execute("ROLLBACK")
        await store.close()

    def writer_process(self, session_id: str, count: int) -> subprocess.Popen:
        """Another process appending ``count`` single events to ``session_id`` (data: n)."""
        code = textwrap.dedent(f"""
            import asyncio, sys
            from tabbi_extension.store import NewEvent, SQLiteStore
            async def main():
                store = SQLiteStore({str(self.path)!r})
                await store.open()
                print("open", flush=True)
                for n in range({count}):
                    await store.append_events({session_id!r}, [NewEvent("w", {{"from": "proc", "n": n}})])
                await store.close()
            asyncio.run(main())
        """)
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


class ConvexBackend:
    """The Convex backend: a ``ConvexStore`` talking to the stand-in (emptied for each test), its
    fault hooks the stand-in's switches. A Convex mutation is one transaction: a function that
    fails half-way has written nothing (Convex's own guarantee, which convex-test keeps too); what
    the hooks test is that the store reports such a refusal as permanent and that nothing of the
    call shows."""

    #: Fewer than SQLite's: each write is an HTTP round trip through convex-test.
    writes = 50

    def __init__(self, standin: ConvexStandin):
        self.standin = standin
        standin.reset()

    def make(self, **traits) -> Store:
        return make_store(self.standin, **traits)

    @contextlib.contextmanager
    def refusing(self):
        """The next call is refused by Convex (HTTP 560, the shape of a function that threw)."""
        self.standin.faults(fail_next=1, status=560)
        try:
            yield
        finally:
            self.standin.faults()

    def fail_deleting_sessions(self):
        return self.refusing()

    def fail_inserting_prompts(self):
        return self.refusing()

    def fail_events_of_type(self, type_: str):
        return self.refusing()

    @contextlib.asynccontextmanager
    async def unavailable(self) -> AsyncIterator[Store]:
        """A store instance (retrying nothing itself) whose next two calls find Convex answering
        503 before anything runs; it knows its sessions already, as a running server does."""
        store = self.make(retry_for=0.0)
        await store.open()
        await store.list_sessions()
        self.standin.faults(fail_next=2, status=503)
        try:
            yield store
        finally:
            self.standin.faults()
            await store.close()

    def writer_process(self, session_id: str, count: int) -> subprocess.Popen:
        """Another process appending ``count`` single events (data: n), configured from the
        environment as a deployment configures its servers."""
        code = textwrap.dedent(f"""
            import asyncio
            from tabbi_extension.store import ConvexStore, NewEvent
            async def main():
                store = ConvexStore()
                await store.open()
                print("open", flush=True)
                for n in range({count}):
                    await store.append_events({session_id!r}, [NewEvent("w", {{"from": "proc", "n": n}})])
                await store.close()
            asyncio.run(main())
        """)
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, **store_env(self.standin)})


BACKENDS = {"sqlite": SQLiteBackend, "convex": ConvexBackend}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, tmp_path):
    if request.param == "convex":
        return ConvexBackend(request.getfixturevalue("convex_standin"))
    return BACKENDS[request.param](tmp_path)


@pytest.fixture
def store(backend, jp_asyncio_loop):
    run = jp_asyncio_loop.run_until_complete
    instance = backend.make()
    run(instance.open())
    yield instance
    run(instance.close())


@pytest.fixture
def second(backend, store, jp_asyncio_loop):
    """A second store instance on the same data, as another server process has."""
    run = jp_asyncio_loop.run_until_complete
    instance = backend.make()
    run(instance.open())
    yield instance
    run(instance.close())


def new(type_: str = "x", **data) -> NewEvent:
    return NewEvent(type_, data)


def record(session_id: str, owner: str = "alice", **kw) -> SessionRecord:
    return SessionRecord(id=session_id, owner=owner, repo="/r", work_branch="tabbi/x", **kw)


async def test_sessions_roundtrip_and_list_by_owner(store):
    await store.create_session(record("ses-1", model="m"))
    await store.create_session(record("ses-2"))
    await store.create_session(record("ses-3", owner="bob"))
    got = await store.get_session("ses-1")
    assert (got.owner, got.repo, got.model, got.state) == ("alice", "/r", "m", "idle")
    assert got.created_at > 0
    assert {s.id for s in await store.list_sessions("alice")} == {"ses-1", "ses-2"}
    assert [s.id for s in await store.list_sessions("bob")] == ["ses-3"]
    assert len(await store.list_sessions()) == 3
    assert await store.get_session("nope") is None


async def test_update_session_fields(store):
    await store.create_session(record("ses-1"))
    await store.update_session("ses-1", state="error", error="boom", sandbox_state={"pid": 3},
                               model="tabbi/other")  # a model switch (%tabbi model)
    got = await store.get_session("ses-1")
    assert (got.state, got.error, got.sandbox_state) == ("error", "boom", {"pid": 3})
    assert got.model == "tabbi/other"
    with pytest.raises(StoreError):
        await store.update_session("ses-1", owner="mallory")


async def test_events_are_numbered_by_the_store_in_order(store):
    await store.create_session(record("ses-1"))
    await store.create_session(record("ses-2"))
    assert await store.last_seq("ses-1") == 0
    first = await store.append_events("ses-1", [NewEvent("text.delta", {"delta": "1"}, 100.0)])
    assert [(e.session_id, e.seq, e.type, e.data, e.ts) for e in first] == [
        ("ses-1", 1, "text.delta", {"delta": "1"}, 100.0)]
    batch = await store.append_events("ses-1", [new(delta=str(n)) for n in range(2, 6)])
    assert [e.seq for e in batch] == [2, 3, 4, 5] and batch[0].data == {"delta": "2"}
    assert [e.seq for e in await store.append_events("ses-2", [new("other")])] == [1]
    assert await store.append_events("ses-1", []) == []
    assert await store.last_seq("ses-1") == 5
    after = await store.list_events("ses-1", after=2)
    assert [e.seq for e in after] == [3, 4, 5]
    assert after[0].data == {"delta": "3"}
    assert [e.seq for e in await store.list_events("ses-1", after=0, limit=2)] == [1, 2]


async def test_prompts_queue_in_order_and_track_status(store):
    await store.create_session(record("ses-1"))
    for n in range(3):
        prompt = await store.enqueue_prompt(Prompt(f"p{n}", "ses-1", f"text {n}", "queued", time.time()))
        assert prompt.position == n + 1
    await store.set_prompt_status("p0", "done")
    await store.set_prompt_status("p1", "running")
    pending = await store.pending_prompts("ses-1")
    assert [(p.id, p.status) for p in pending] == [("p1", "running"), ("p2", "queued")]
    assert await store.pending_prompts("ses-other") == []


async def test_messages_with_parts(store):
    await store.create_session(record("ses-1"))
    await store.upsert_message("ses-1", "m1", "user", {})
    await store.upsert_message("ses-1", "m2", "assistant", {"modelID": "x"})
    await store.upsert_part("ses-1", "m1", "p1", {"type": "text", "text": "hi"})
    await store.upsert_part("ses-1", "m2", "p2", {"type": "tool", "status": "running"})
    await store.upsert_part("ses-1", "m2", "p2", {"type": "tool", "status": "completed"})
    messages = await store.list_messages("ses-1")
    assert [(m["id"], m["role"]) for m in messages] == [("m1", "user"), ("m2", "assistant")]
    assert messages[1]["parts"] == [{"id": "p2", "type": "tool", "status": "completed"}]
    assert messages[1]["info"] == {"modelID": "x"}
    assert await store.message_infos("ses-1") == [
        {"id": "m1", "role": "user", "info": {}}, {"id": "m2", "role": "assistant", "info": {"modelID": "x"}}]


async def test_delete_session_removes_everything_of_it(store):
    await store.create_session(record("ses-1"))
    await store.create_session(record("ses-2"))
    await store.append_events("ses-1", [new()])
    await store.append_events("ses-2", [new()])
    await store.enqueue_prompt(Prompt("p1", "ses-1", "t", "queued", time.time()))
    await store.upsert_message("ses-1", "m1", "user", {})
    await store.delete_session("ses-1")
    assert await store.get_session("ses-1") is None
    assert await store.list_events("ses-1") == []
    assert await store.pending_prompts("ses-1") == []
    assert await store.list_messages("ses-1") == []
    assert [e.seq for e in await store.list_events("ses-2")] == [1]


async def test_users_and_tokens(store):
    await store.upsert_user("alice", {"name": "Alice"})
    await store.upsert_user("alice", {"name": "Alice A."})
    assert await store.get_user("alice") == {"name": "Alice A."}
    assert await store.get_user("bob") is None
    await store.put_token("alice", "github", b"\x00cipher")
    await store.put_token("alice", "github", b"\x01newer")
    assert await store.get_token("alice", "github") == b"\x01newer"
    await store.delete_token("alice", "github")
    assert await store.get_token("alice", "github") is None


async def test_token_compare_and_swap(store, second):
    """Two processes refreshing one rotating token: only the one that still saw the stored
    token may replace it (or delete it)."""
    assert await store.swap_token("alice", "github", b"old", b"new") is False  # nothing stored
    await store.put_token("alice", "github", b"v1")
    assert await store.swap_token("alice", "github", b"v1", b"v2") is True
    assert await second.swap_token("alice", "github", b"v1", b"v2-other") is False  # lost the race
    assert await second.get_token("alice", "github") == b"v2"
    assert await second.swap_token("alice", "github", b"stale", None) is False
    assert await store.get_token("alice", "github") == b"v2"
    assert await second.swap_token("alice", "github", b"v2", None) is True
    assert await store.get_token("alice", "github") is None


async def test_leases_and_which_server_runs_a_session(store, second):
    await store.create_session(record("ses-1"))
    await store.create_session(record("ses-2", server_id="srv-a"))
    assert (await store.get_session("ses-1")).server_id is None
    assert (await store.get_session("ses-2")).server_id == "srv-a"
    await store.put_lease(Lease("srv-a", time.time() + 30, {"pid": 1}))
    await second.put_lease(Lease("srv-b", time.time() + 30))
    await store.put_lease(Lease("srv-a", 2e9, {"pid": 1}))  # renewed
    leases = {lease.server_id: lease for lease in await second.list_leases()}
    assert set(leases) == {"srv-a", "srv-b"}
    assert leases["srv-a"].expires_at == 2e9 and leases["srv-a"].info == {"pid": 1}
    assert leases["srv-a"].heartbeat_at > 0
    # Claims are compare-and-swap on the session's current server.
    assert await store.claim_session("ses-1", "srv-a", expected=None) is True
    assert await second.claim_session("ses-1", "srv-b", expected=None) is False
    assert await second.claim_session("ses-2", "srv-b", expected="srv-c") is False
    assert await second.claim_session("nope", "srv-b", expected=None) is False
    assert (await second.get_session("ses-1")).server_id == "srv-a"
    # A released lease lets go of its sessions, which another server may then claim.
    await store.release_lease("srv-a")
    assert {lease.server_id for lease in await store.list_leases()} == {"srv-b"}
    assert [s.server_id for s in await store.list_sessions()] == [None, None]
    assert await second.claim_session("ses-2", "srv-b", expected=None) is True


async def test_snapshots_newest_first_and_deleted_with_the_session(store):
    await store.create_session(record("ses-1"))
    for n in range(3):
        await store.add_snapshot(Snapshot("ses-1", f"snap{n}", {"path": f"/s/{n}"}, 10 * n, 100.0 + n))
    assert [s.id for s in await store.list_snapshots("ses-1")] == ["snap2", "snap1", "snap0"]
    assert (await store.list_snapshots("ses-1"))[0].ref == {"path": "/s/2"}
    await store.delete_snapshot("ses-1", "snap1")
    assert [s.id for s in await store.list_snapshots("ses-1")] == ["snap2", "snap0"]
    await store.delete_session("ses-1")
    assert await store.list_snapshots("ses-1") == []


async def test_retired_spend_outlives_its_session_and_counts_once(store, second):
    """Threat: a person resets their spend by deleting sessions (budgets.py keeps it here first).
    What is retired survives the session's delete and another store instance (a restart) sees
    it; a retried retire (a retried delete, a lost answer) never adds twice nor lowers it; it is
    the owner's alone; nobody retires spend onto someone else's session; bad amounts are refused."""
    await store.create_session(record("ses-1"))
    await store.create_session(record("ses-2"))
    await store.create_session(record("ses-b", owner="bob"))
    await store.create_session(record("ses-3"))
    assert await store.retired_spend("alice") == (0.0, 0.0)
    await store.retire_spend("alice", "ses-1", 0.25, 30.0)
    await store.retire_spend("alice", "ses-1", 0.25, 30.0)  # retried
    await store.retire_spend("alice", "ses-1", 0.1, 40.0)  # amounts only grow
    await store.retire_spend("alice", "ses-2", 0.5, 0)
    # a delete that failed half-way: the sessions are still here and count through their own
    # spend, so their retired rows do not count (nothing twice)
    assert await store.retired_spend("alice") == (0.0, 0.0)
    await store.delete_session("ses-1")
    await store.retire_spend("alice", "ses-1", 0.3, 0.0)  # retried after the delete
    cost, seconds = await second.retired_spend("alice")
    assert cost == pytest.approx(0.3) and seconds == pytest.approx(40.0)
    await store.delete_session("ses-2")
    cost, seconds = await second.retired_spend("alice")
    assert cost == pytest.approx(0.8) and seconds == pytest.approx(40.0)
    assert await second.retired_spend("bob") == (0.0, 0.0)
    with pytest.raises(StoreError):
        await store.retire_spend("bob", "ses-3", 1.0, 1.0)  # alice's session
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(StoreError):
            await store.retire_spend("alice", "ses-2", bad, 0.0)
    cost, seconds = await store.retired_spend("alice")
    assert cost == pytest.approx(0.8) and seconds == pytest.approx(40.0)
    assert await store.retired_spend("bob") == (0.0, 0.0)


async def test_ping(store):
    assert await store.ping() is True


# SQLite specifics ---------------------------------------------------------------------------
async def test_sqlite_schema_is_versioned_wal_and_private(tmp_path):
    path = tmp_path / "db" / "tabbi.sqlite3"
    first = SQLiteStore(path)
    await first.open()
    await first.create_session(record("ses-1"))
    await first.close()
    again = SQLiteStore(path)  # re-opening migrates nothing twice and keeps the data
    await again.open()
    assert (await again.get_session("ses-1")).owner == "alice"
    await again.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert path.stat().st_mode & 0o077 == 0


# Atomicity: a call that fails in the middle leaves nothing half done ----------------------------
async def test_a_failed_delete_session_deletes_nothing(backend, store):
    await store.create_session(record("ses-1"))
    await store.append_events("ses-1", [new(), new()])
    await store.enqueue_prompt(Prompt("p1", "ses-1", "t", "queued", time.time()))
    await store.upsert_message("ses-1", "m1", "user", {})
    await store.upsert_part("ses-1", "m1", "pt1", {"type": "text"})
    await store.add_snapshot(Snapshot("ses-1", "snap", {"path": "/s"}, 1, 1.0))
    with backend.fail_deleting_sessions(), pytest.raises(StoreError) as failed:
        await store.delete_session("ses-1")
    assert not isinstance(failed.value, StoreUnavailable)  # a broken constraint is permanent
    assert await store.get_session("ses-1") is not None
    assert [e.seq for e in await store.list_events("ses-1")] == [1, 2]
    assert [p.id for p in await store.pending_prompts("ses-1")] == ["p1"]
    assert [len(m["parts"]) for m in await store.list_messages("ses-1")] == [1]
    assert [s.id for s in await store.list_snapshots("ses-1")] == ["snap"]
    await store.delete_session("ses-1")  # and once the fault is gone, it all goes
    assert await store.list_events("ses-1") == [] and await store.get_session("ses-1") is None


async def test_a_failed_enqueue_leaves_no_prompt_and_no_gap(backend, store):
    await store.create_session(record("ses-1"))
    await store.enqueue_prompt(Prompt("p1", "ses-1", "a", "queued", time.time()))
    with backend.fail_inserting_prompts(), pytest.raises(StoreError):
        await store.enqueue_prompt(Prompt("p2", "ses-1", "b", "queued", time.time()))
    assert [p.id for p in await store.pending_prompts("ses-1")] == ["p1"]
    assert (await store.enqueue_prompt(Prompt("p3", "ses-1", "c", "queued", time.time()))).position == 2


async def test_a_batch_of_events_is_appended_whole_or_not_at_all(backend, store):
    await store.create_session(record("ses-1"))
    await store.append_events("ses-1", [new()])
    with backend.fail_events_of_type("poison"), pytest.raises(StoreError):
        await store.append_events("ses-1", [new("fine"), new("poison"), new("fine")])
    assert [e.seq for e in await store.list_events("ses-1")] == [1]
    assert [e.seq for e in await store.append_events("ses-1", [new(), new()])] == [2, 3]


# Concurrency: seqs and positions are assigned by the store, atomically ------------------------
def gap_free(events) -> bool:
    return [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_concurrent_appends_from_one_store_are_gap_free(store):
    await store.create_session(record("ses-1"))
    sizes = [1 + n % 3 for n in range(60)]
    batches = await asyncio.gather(*(
        store.append_events("ses-1", [new(batch=b, i=i) for i in range(size)])
        for b, size in enumerate(sizes)))
    for batch in batches:  # each batch got consecutive seqs, in its own order
        assert [e.seq for e in batch] == list(range(batch[0].seq, batch[0].seq + len(batch)))
        assert [e.data["i"] for e in batch] == list(range(len(batch)))
    stored = await store.list_events("ses-1", limit=1000)
    assert gap_free(stored) and len(stored) == sum(sizes)
    assert sorted((e.data["batch"], e.data["i"]) for e in stored) == sorted(
        (b, i) for b, size in enumerate(sizes) for i in range(size))


async def test_concurrent_enqueues_get_unique_consecutive_positions(store):
    await store.create_session(record("ses-1"))
    prompts = await asyncio.gather(*(
        store.enqueue_prompt(Prompt(f"p{n}", "ses-1", str(n), "queued", time.time())) for n in range(40)))
    assert sorted(p.position for p in prompts) == list(range(1, 41))
    assert [p.position for p in await store.pending_prompts("ses-1")] == list(range(1, 41))


async def test_two_store_instances_append_to_one_log_concurrently(backend, store, second):
    """Two server processes' stores writing one session's log at once (each on its own thread
    and connection): one numbering, no collision, no gap, nothing lost."""
    await store.create_session(record("ses-1"))

    count = backend.writes

    async def write(instance: Store, name: str) -> None:
        for n in range(count):
            await instance.append_events("ses-1", [new(src=name, n=n)])

    await asyncio.gather(write(store, "a"), write(second, "b"), write(store, "a2"), write(second, "b2"))
    stored = await second.list_events("ses-1", limit=1000)
    assert gap_free(stored) and len(stored) == 4 * count
    for name in ("a", "b", "a2", "b2"):  # each writer's events in its own order
        assert [e.data["n"] for e in stored if e.data["src"] == name] == list(range(count))


async def test_another_process_appending_at_the_same_time(backend, store):
    await store.create_session(record("ses-1"))
    count = backend.writes
    process = backend.writer_process("ses-1", count)
    try:
        assert await asyncio.to_thread(process.stdout.readline) == "open\n"
        for n in range(count):
            await store.append_events("ses-1", [new(src="here", n=n)])
        assert await asyncio.to_thread(process.wait, 120) == 0
    finally:
        process.kill()
        process.wait()
    stored = await store.list_events("ses-1", limit=1000)
    assert gap_free(stored) and len(stored) == 2 * count
    assert [e.data["n"] for e in stored if e.data.get("src") == "here"] == list(range(count))
    assert [e.data["n"] for e in stored if e.data.get("from") == "proc"] == list(range(count))


# Errors: retryable (the store could not answer now) vs permanent ------------------------------
async def test_a_store_locked_by_another_client_is_unavailable_then_recovers(backend, store):
    await store.create_session(record("ses-1"))
    await store.append_events("ses-1", [new()])
    async with backend.unavailable() as locked:
        with pytest.raises(StoreUnavailable):
            await locked.append_events("ses-1", [new()])
        with pytest.raises(StoreUnavailable):
            await locked.enqueue_prompt(Prompt("p1", "ses-1", "t", "queued", time.time()))
        assert [e.seq for e in await locked.list_events("ses-1")] == [1]  # reads still work
        retry = asyncio.ensure_future(store.append_events("ses-1", [new()]))
    assert [e.seq for e in await retry] == [2]  # nothing of the failed calls was written
    assert await store.pending_prompts("ses-1") == []


async def test_duplicates_and_bad_input_are_permanent_errors(store):
    await store.create_session(record("ses-1"))
    await store.enqueue_prompt(Prompt("p1", "ses-1", "t", "queued", time.time()))
    failures = []
    for call in (
        lambda: store.create_session(record("ses-1")),
        lambda: store.enqueue_prompt(Prompt("p1", "ses-1", "again", "queued", time.time())),
        lambda: store.add_snapshot(Snapshot("ses-1", "s", {}, 1, 1.0)),
        lambda: store.list_events("ses-1", after=2**64),
        lambda: store.enqueue_prompt(Prompt("p2", "ses-1", "\ud800", "queued", time.time())),
    ):
        try:
            await call()
        except Exception as exc:  # the type is what is checked
            failures.append(exc)
    assert len(failures) == 4  # the first snapshot is fine
    for exc in failures:
        assert isinstance(exc, StoreError) and not isinstance(exc, StoreUnavailable), repr(exc)
    assert [p.id for p in await store.pending_prompts("ses-1")] == ["p1"]


async def test_a_closed_store_says_so(backend):
    closed = backend.make()
    await closed.open()
    await closed.close()
    with pytest.raises(StoreError):
        await closed.append_events("ses-1", [new()])
    assert await closed.ping() is False
