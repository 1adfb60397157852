"""The store contract: one suite, run against every backend (``store`` is parametrized).

A new backend (Convex) is added to ``BACKENDS`` and is done when this suite passes.
"""

from __future__ import annotations

import sqlite3
import time

import pytest

from tabbi_extension.store import Event, Prompt, SessionRecord, Snapshot, SQLiteStore, StoreError


async def make_sqlite(tmp_path):
    return SQLiteStore(tmp_path / "db" / "tabbi.sqlite3")


BACKENDS = {"sqlite": make_sqlite}


@pytest.fixture(params=sorted(BACKENDS))
def store(request, tmp_path, jp_asyncio_loop):
    run = jp_asyncio_loop.run_until_complete
    backend = run(BACKENDS[request.param](tmp_path))
    run(backend.open())
    yield backend
    run(backend.close())


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
    await store.update_session("ses-1", state="error", error="boom", sandbox_state={"pid": 3})
    got = await store.get_session("ses-1")
    assert (got.state, got.error, got.sandbox_state) == ("error", "boom", {"pid": 3})
    with pytest.raises(StoreError):
        await store.update_session("ses-1", owner="mallory")


async def test_events_are_ordered_and_unique_per_seq(store):
    await store.create_session(record("ses-1"))
    assert await store.last_seq("ses-1") == 0
    for seq in range(1, 6):
        await store.append_event(Event("ses-1", seq, "text.delta", {"delta": str(seq)}, time.time()))
    await store.append_event(Event("ses-2", 1, "other", {}, time.time()))
    assert await store.last_seq("ses-1") == 5
    after = await store.list_events("ses-1", after=2)
    assert [e.seq for e in after] == [3, 4, 5]
    assert after[0].data == {"delta": "3"}
    assert [e.seq for e in await store.list_events("ses-1", after=0, limit=2)] == [1, 2]
    with pytest.raises(StoreError):
        await store.append_event(Event("ses-1", 3, "dup", {}, time.time()))


async def test_prompts_queue_in_order_and_track_status(store):
    for n in range(3):
        prompt = await store.enqueue_prompt(Prompt(f"p{n}", "ses-1", f"text {n}", "queued", time.time()))
        assert prompt.position == n + 1
    await store.set_prompt_status("p0", "done")
    await store.set_prompt_status("p1", "running")
    pending = await store.pending_prompts("ses-1")
    assert [(p.id, p.status) for p in pending] == [("p1", "running"), ("p2", "queued")]
    assert await store.pending_prompts("ses-other") == []


async def test_messages_with_parts(store):
    await store.upsert_message("ses-1", "m1", "user", {})
    await store.upsert_message("ses-1", "m2", "assistant", {"modelID": "x"})
    await store.upsert_part("ses-1", "m1", "p1", {"type": "text", "text": "hi"})
    await store.upsert_part("ses-1", "m2", "p2", {"type": "tool", "status": "running"})
    await store.upsert_part("ses-1", "m2", "p2", {"type": "tool", "status": "completed"})
    messages = await store.list_messages("ses-1")
    assert [(m["id"], m["role"]) for m in messages] == [("m1", "user"), ("m2", "assistant")]
    assert messages[1]["parts"] == [{"id": "p2", "type": "tool", "status": "completed"}]
    assert messages[1]["info"] == {"modelID": "x"}


async def test_delete_session_removes_everything_of_it(store):
    await store.create_session(record("ses-1"))
    await store.create_session(record("ses-2"))
    await store.append_event(Event("ses-1", 1, "x", {}, time.time()))
    await store.append_event(Event("ses-2", 1, "x", {}, time.time()))
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
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert path.stat().st_mode & 0o077 == 0
