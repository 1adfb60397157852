"""Moving a person's local history into Convex (``python -m tabbi_extension.store.migrate``): the
copy is complete, an interrupted copy is finished by running the command again, and running it
again after that changes nothing (no event, prompt or snapshot twice)."""

from __future__ import annotations

import asyncio

import pytest

from tabbi_extension.store import ConvexStore, NewEvent, Prompt, SessionRecord, Snapshot, SQLiteStore
from tabbi_extension.store.migrate import MigrateStore, copy_store
from tests.support.convex_standin import ConvexStandin, convex_standin  # noqa: F401 (a fixture)
from tests.support.convex_store import make_store, store_env


class Crash(Exception):
    """The copying process dies."""


class DiesAfterWriting(ConvexStore):
    """A target whose process dies right after its ``n``-th event batch was committed, before the
    copy could note anything: the worst moment to be interrupted."""

    batches_left = 2

    async def append_events(self, session_id, events):
        stored = await super().append_events(session_id, events)
        self.batches_left -= 1
        if self.batches_left == 0:
            raise Crash()
        return stored


async def fill(path) -> None:
    """A local store as a person leaves it: two people, sessions with long logs, prompts in every
    state, messages with parts, snapshots and a sealed token."""
    store = SQLiteStore(path)
    await store.open()
    await store.upsert_user("alice", {"name": "Alice"})
    await store.upsert_user("bob", {})
    await store.put_token("alice", "github", b"\x00sealed\xff")
    for n, owner in enumerate(["alice", "alice", "bob"]):
        sid = f"ses-{n}"
        await store.create_session(SessionRecord(sid, owner, "/r", f"tabbi/{n}", state="paused",
                                                 sandbox_state={"pid": n}, created_at=100.0 + n))
        total = 450 if n == 0 else 30
        for start in range(0, total, 50):
            await store.append_events(sid, [NewEvent("text.delta", {"n": i, "$odd key": "ü"}, 1e9 + i)
                                            for i in range(start, min(start + 50, total))])
        for k, status in enumerate(["done", "failed", "running", "queued"]):
            await store.enqueue_prompt(Prompt(f"p{n}{k}", sid, f"prompt {k}", "queued", 200.0 + k))
            await store.set_prompt_status(f"p{n}{k}", status)
        await store.upsert_message(sid, "m1", "user", {})
        await store.upsert_message(sid, "m2", "assistant", {"modelID": "x"})
        await store.upsert_part(sid, "m2", "pt1", {"type": "text", "text": "hello"})
        await store.upsert_part(sid, "m2", "pt2", {"type": "tool", "status": "completed"})
        for k in range(2):
            await store.add_snapshot(Snapshot(sid, f"snap{k}", {"path": f"/s/{k}"}, 10, 300.0 + k))
    # a session alice deleted: its spend still counts in her budgets, wherever her store is
    await store.retire_spend("alice", "ses-gone", 0.25, 60.0)
    await store.close()


async def compare(path, standin: ConvexStandin) -> None:
    source, target = SQLiteStore(path), make_store(standin)
    await source.open()
    await target.open()
    try:
        def sessions(records):
            return [(s.id, s.owner, s.state, s.sandbox_state, s.created_at) for s in records]

        assert sessions(await target.list_sessions()) == sessions(await source.list_sessions())
        for sid in ("ses-0", "ses-1", "ses-2"):
            here = [(e.seq, e.type, e.data, e.ts) for e in await source.list_events(sid, limit=1000)]
            there = [(e.seq, e.type, e.data, e.ts) for e in await target.list_events(sid, limit=1000)]
            assert there == here and len(there) == (450 if sid == "ses-0" else 30)
            assert [(p.id, p.status, p.position) for p in await target.pending_prompts(sid)] == [
                (p.id, p.status, p.position) for p in await source.pending_prompts(sid)]
            assert await target.list_messages(sid) == await source.list_messages(sid)
            assert [s.id for s in await target.list_snapshots(sid)] == ["snap1", "snap0"]
        assert await target.get_user("alice") == {"name": "Alice"}
        assert await target.get_token("alice", "github") == b"\x00sealed\xff"
        assert await target.retired_spend("alice") == (0.25, 60.0)
        assert await target.retired_spend("bob") == (0.0, 0.0)
    finally:
        await source.close()
        await target.close()


def test_an_interrupted_copy_is_finished_by_running_it_again(tmp_path, convex_standin, monkeypatch):  # noqa: F811
    convex_standin.reset()
    path = tmp_path / "tabbi.sqlite3"
    asyncio.run(fill(path))

    async def interrupted() -> None:
        source = SQLiteStore(path)
        target = DiesAfterWriting(**make_store(convex_standin).trait_values(config=True))
        await source.open()
        await target.open()
        try:
            with pytest.raises(Crash):
                await copy_store(source, target)
        finally:
            await source.close()
            await target.close()

    asyncio.run(interrupted())
    appended = convex_standin.stats()["calls"]["events:append"]
    assert appended == 2  # it died mid-log, after its second batch

    # The command, configured from the environment as a deployment's server is (the key never
    # on the command line).
    for name, value in store_env(convex_standin).items():
        monkeypatch.setenv(name, value)

    def run_command() -> None:
        app = MigrateStore()
        app.initialize(["--from", str(path), "--to", convex_standin.url])
        app.start()

    run_command()
    asyncio.run(compare(path, convex_standin))
    # In batches of 200: ses-0's last 50 events in one, ses-1's and ses-2's 30 in one each.
    assert convex_standin.stats()["calls"]["events:append"] == appended + 3
    run_command()  # once more: no event is written again
    assert convex_standin.stats()["calls"]["events:append"] == appended + 3
    asyncio.run(compare(path, convex_standin))
