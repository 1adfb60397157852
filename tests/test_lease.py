"""Servers sharing one data dir (JupyterHub named servers of one person share a home): each holds
a lease and runs only its own sessions.

Threat (reliability): a second server started on the same data reconciled every session the
store called live, found the first server's sandbox "orphaned" and stopped it, killing the
first server's running session. Now it leaves a live server's sessions alone and takes over only
those of a server that is gone: its lease expired, or (on the same machine) its process dead.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error

import pytest

from tabbi_extension import states
from tabbi_extension.agent import AgentSettings
from tabbi_extension.manager import SessionElsewhere, SessionManager
from tabbi_extension.store import Lease, SessionRecord, SQLiteStore
from tabbi_sandbox.local import LocalProvider
from tests.support.llm import Reply
from tests.test_lifecycle import contiguous
from tests.test_sessions import opencode_pids


def running(event: dict) -> bool:
    return event["type"] == "session.status" and event["data"]["state"] == "running"


def test_a_second_server_leaves_the_first_ones_session_alone_and_takes_it_over_when_it_dies(
    tmp_path, llm, source_repo
):
    from tests.support.server import JupyterProcess

    lease = ["--TabbiExtension.server_lease=3"]
    first = JupyterProcess(llm.url, tmp_path / "srv", extra=lease)
    second = None
    try:  # the second server stops whatever fails; the first one is killed first
        try:
            sid = first.call("POST", "tabbi/api/sessions", {"repo": str(source_repo)})["id"]
            first.wait_event(sid, running)
            agent = opencode_pids(sid)
            assert agent

            # A second server on the same data dir: its start-up reconciled the store's sessions.
            second = JupyterProcess(llm.url, tmp_path / "srv", extra=lease)
            with pytest.raises(urllib.error.HTTPError) as elsewhere:
                second.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "from the second"})
            assert elsewhere.value.code == 409
            assert b"another tabbi server" in elsewhere.value.read()
            with pytest.raises(urllib.error.HTTPError) as stream:  # the event stream says the same
                second.call("GET", f"tabbi/api/sessions/{sid}/stream")
            assert stream.value.code == 409
            assert [s["id"] for s in second.call("GET", "tabbi/api/sessions")["sessions"]] == [sid]

            # The first server's sandbox keeps running and answers (over several of the second
            # server's heartbeats, each of which looks for sessions to take over).
            llm.enqueue(Reply(text="still here"))
            first.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "are you there?"})
            done = first.wait_event(sid, lambda e: e["type"] == "turn.finished")
            assert done["data"]["outcome"] == "completed"
            first.wait_event(sid, lambda e: e["type"] == "snapshot.saved", after=done["seq"])
            assert set(agent) <= set(opencode_pids(sid)), "the second server stopped the first one's sandbox"
            events = first.call("GET", f"tabbi/api/sessions/{sid}/events")["events"]
            assert not [e for e in events if e["type"] == "error"], events
            assert first.call("GET", f"tabbi/api/sessions/{sid}")["state"] == "running"
        finally:
            first.kill()  # a crash: its lease is neither renewed nor released
        assert second is not None
        # The second server finds the first one gone and takes its session over: the session is
        # paused (its sandbox died with its server), and the next prompt resumes it there.
        paused = second.wait_event(
            sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "paused",
            after=events[-1]["seq"], timeout=60)
        assert paused["data"]["reason"] == "server_restart"
        llm.enqueue(Reply(text="back on the second server"))
        second.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "and now?"})
        finished = second.wait_event(sid, lambda e: e["type"] == "turn.finished", after=paused["seq"],
                                     timeout=120)
        assert finished["data"]["outcome"] == "completed"
        log = second.call("GET", f"tabbi/api/sessions/{sid}/events")["events"]
    finally:
        if second is not None:
            second.stop()
    assert contiguous(log) and log[: len(events)] == events


# The lease itself, through two managers on two store instances (two processes' views) --------
@pytest.fixture
def manager(tmp_path, jp_asyncio_loop):
    run = jp_asyncio_loop.run_until_complete
    store = SQLiteStore(tmp_path / "tabbi.sqlite3")
    run(store.open())
    provider = LocalProvider(tmp_path / "sandboxes", isolation="none")
    made = SessionManager(store, provider, AgentSettings(idle_timeout=0), lease_seconds=0.6)
    yield made
    run(made.shutdown())
    run(store.close())


async def wait_until(condition, timeout: float = 30.0):
    """Poll the store until ``condition()`` (a coroutine) holds; nothing notifies a store reader."""
    deadline = time.monotonic() + timeout
    while not (result := await condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
    return result


async def test_a_session_of_a_server_elsewhere_is_taken_over_only_once_its_lease_expires(
    tmp_path, manager
):
    """A server on another machine (only its lease's expiry can tell it is gone) runs a session;
    this server leaves it alone while the lease lives and recovers it once it expired."""
    other = SQLiteStore(tmp_path / "tabbi.sqlite3")
    await other.open()
    try:
        expires = time.time() + 5
        await other.put_lease(Lease("srv-remote", expires, {"host": "elsewhere", "pid": 1}))
        await other.create_session(SessionRecord(id="ses-00000000000a", owner="me", repo="/r",
                                                 work_branch="tabbi/a", state=states.RUNNING,
                                                 server_id="srv-remote"))
        await manager.startup()
        assert (await other.get_session("ses-00000000000a")).state == states.RUNNING
        with pytest.raises(SessionElsewhere):
            await manager.get("me", "ses-00000000000a")
        assert time.time() < expires, "the machine was too slow for this test's lease"

        async def taken_over():
            record = await other.get_session("ses-00000000000a")
            return record if record.server_id == manager.server_id and record.state == states.ERROR else None

        record = await wait_until(taken_over)
        assert time.time() >= expires  # not before the lease expired
        assert "server restarted" in record.error
        assert {lease.server_id for lease in await other.list_leases()} == {manager.server_id}
        assert (await manager.get("me", "ses-00000000000a")).state == states.ERROR
    finally:
        await other.close()


async def test_a_clean_stop_releases_the_lease_and_the_sessions(tmp_path, manager):
    await manager.startup()
    await manager.store.create_session(SessionRecord(id="ses-00000000000b", owner="me", repo="/r",
                                                     work_branch="tabbi/b",
                                                     server_id=manager.server_id))
    assert [lease.server_id for lease in await manager.store.list_leases()] == [manager.server_id]
    await manager.shutdown()
    assert await manager.store.list_leases() == []
    assert (await manager.store.get_session("ses-00000000000b")).server_id is None


async def test_two_servers_finding_a_dead_ones_session_at_once_recover_it_once(tmp_path, manager):
    """Both reconcile at the same moment; the claim (compare-and-swap) lets one of them take
    the session, so it is recovered once, not twice (two sandboxes, doubled events)."""
    store = SQLiteStore(tmp_path / "tabbi.sqlite3")
    await store.open()
    rival = SessionManager(store, manager.provider, manager.settings, lease_seconds=0.6)
    try:
        await store.put_lease(Lease("srv-dead", time.time() - 1, {"host": "elsewhere"}))
        await store.create_session(SessionRecord(id="ses-00000000000c", owner="me", repo="/r",
                                                 work_branch="tabbi/c", state=states.RUNNING,
                                                 server_id="srv-dead"))
        await asyncio.gather(manager.startup(), rival.startup())
        holders = [m for m in (manager, rival) if "ses-00000000000c" in m._agents]
        assert len(holders) == 1
        record = await store.get_session("ses-00000000000c")
        assert record.server_id == holders[0].server_id and record.state == states.ERROR
        errors = [e for e in await store.list_events("ses-00000000000c") if e.type == "error"]
        assert len(errors) == 1
    finally:
        await rival.shutdown()
        await store.close()
