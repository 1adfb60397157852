"""The event log on ConvexStore against SQLite, in the same run, at 0, 20 and 50 ms of injected
round-trip time (the Convex stand-in's ``latency_ms``, added to every call).

1. Events/s through a session's ``EventLog``: 1,000 streamed text deltas posted as fast as they
   come, then one awaited event (batched, as sessions write them), and the same log appending one
   awaited event at a time (what a log without batching could do).
2. Delta latency inside the server: a source emitting 50 deltas/s into the log, to a subscriber
   receiving them, batched or one awaited write at a time; on SQLite behind an injected round trip
   (pure latency: the design's numbers) and on the stand-in.
3. Delta latency, model -> client: a real Jupyter server, OpenCode and the scripted model streaming
   50 deltas/s; the time from the model server writing a delta to a WebSocket client of tabbi
   receiving it (as ``bench_latency.py``), one server on SQLite and one on ConvexStore.

The stand-in runs the real functions through convex-test, which is slower than Convex per call and
grows with the data (docs/deploy-convex.md): the Convex numbers include that cost.
Run: ``.venv/bin/python bench/bench_store.py [DELTAS]``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_latency import latencies, script
from harness import JupyterProcess, ScriptedLLM, machine, percentile, sample_repo
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from tabbi_extension.eventlog import EventLog
from tabbi_extension.store import ConvexStore, SessionRecord, SQLiteStore, Store
from tests.support.convex_standin import ConvexStandin
from tests.support.convex_store import STORE_CLASS, make_store, store_env

RTTS = (0, 20, 50)


async def throughput(store: Store, sid: str, deltas: int, single: int) -> tuple[float, float, int]:
    """(batched events/s, one-at-a-time events/s, writes for the batched run)."""
    await store.create_session(SessionRecord(sid, "bench", "/r", "tabbi/b"))
    log = EventLog(sid, store)
    await log.load()
    calls = 0
    original = store.append_events

    async def counted(*args, **kwargs):
        nonlocal calls
        calls += 1
        return await original(*args, **kwargs)

    store.append_events = counted  # type: ignore[method-assign]
    started = time.perf_counter()
    for n in range(deltas):
        await log.post("text.delta", {"delta": f"w{n};"})
    await log.append("turn.finished", {})
    batched = (deltas + 1) / (time.perf_counter() - started)
    store.append_events = original  # type: ignore[method-assign]
    started = time.perf_counter()
    for n in range(single):
        await log.append("text.delta", {"delta": f"s{n};"})
    return batched, single / (time.perf_counter() - started), calls


async def paced(store: Store, sid: str, batched: bool = True, rate: float = 50,
                count: int = 150) -> list[float]:
    """Seconds from a delta's arrival to a subscriber receiving it, for a source that emits
    ``rate`` deltas/s whether or not the log keeps up (as the model does): posted (batched), or
    appended one awaited write at a time."""
    await store.create_session(SessionRecord(sid, "bench", "/r", "tabbi/b"))
    log = EventLog(sid, store)
    await log.load()
    queue = log.subscribe()
    delays: list[float] = []
    start = time.perf_counter()

    async def receive() -> None:
        while len(delays) < count:
            event = await queue.get()
            delays.append(time.perf_counter() - (start + event.data["n"] / rate))

    receiver = asyncio.ensure_future(receive())
    for n in range(count):
        due = start + n / rate - time.perf_counter()
        if due > 0:
            await asyncio.sleep(due)  # the source's pace
        if batched:
            await log.post("text.delta", {"n": n})
        else:
            await log.append("text.delta", {"n": n})
    await asyncio.wait_for(receiver, 300)
    return delays


class Delayed(SQLiteStore):
    """SQLite behind a network: every append waits ``rtt`` first, and deltas wait for company
    as on Convex. Pure latency, no server CPU: the design's numbers without the stand-in's."""

    rtt = 0.0
    batch_window = ConvexStore.batch_window.default_value

    async def append_events(self, session_id, events):  # type: ignore[no-untyped-def]
        await asyncio.sleep(self.rtt)
        return await super().append_events(session_id, events)


async def stream_latencies(server: JupyterProcess, sid: str, llm: ScriptedLLM, chunks: int) -> list[float]:
    last = server.call("GET", f"tabbi/api/sessions/{sid}")["last_seq"]
    ws = await websocket_connect(HTTPRequest(
        f"ws://127.0.0.1:{server.port}/tabbi/api/sessions/{sid}/stream?after={last}",
        headers={"Authorization": f"token {server.token}"}))
    script(llm, chunks)  # 50 deltas/s
    server.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "stream"})
    received = []
    while True:
        event = json.loads(await asyncio.wait_for(ws.read_message(), 120))
        if event["type"] == "text.delta":
            received.append((time.time(), event["data"]["delta"]))
        if event["type"] == "turn.finished":
            break
    ws.close()
    return latencies(llm, received)


def running_session(server: JupyterProcess, repo: Path) -> str:
    sid = server.call("POST", "tabbi/api/sessions", {"repo": str(repo)})["id"]
    server.wait_event(sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "running")
    server.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "warm up"})
    server.wait_event(sid, lambda e: e["type"] == "turn.finished")
    return sid


def line(name: str, values: list[float]) -> str:
    return (f"{name}: p50 {percentile(values, 50) * 1000:.1f} ms, p99 {percentile(values, 99) * 1000:.1f} ms"
            f" (n={len(values)})")


async def main(deltas: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="tabbi-bench-store-"))
    standin = ConvexStandin.start()
    try:
        print(f"machine: {machine()}")
        print("\n1. events/s through EventLog (batched | one awaited append at a time)")
        sqlite = SQLiteStore(work / "bench.sqlite3")
        await sqlite.open()
        base, base_single, base_calls = await throughput(sqlite, "ses-sqlite", deltas, 200)
        await sqlite.close()
        print(f"SQLite       : {base:8.0f} | {base_single:6.0f} events/s ({base_calls} writes)")
        for rtt in RTTS:
            standin.reset()
            standin.faults(latency_ms=rtt)
            store = make_store(standin)
            await store.open()
            batched, single, calls = await throughput(store, f"ses-{rtt}", deltas, 40 if rtt else 100)
            await store.close()
            print(f"Convex {rtt:2d} ms : {batched:8.0f} | {single:6.0f} events/s ({calls} writes); "
                  f"batched/SQLite {batched / base:.2f}")
        standin.faults()

        print("\n2. delta latency through EventLog alone, arrival -> subscriber, 50 deltas/s")
        for rtt in (0, *RTTS[1:]):
            delayed = Delayed(work / f"delayed-{rtt}.sqlite3")
            delayed.rtt = rtt / 1000
            await delayed.open()
            for batched in (True, False):
                values = await paced(delayed, f"ses-d{rtt}-{batched}", batched)
                how = "batched  " if batched else "one by one"
                print(line(f"SQLite + {rtt:2d} ms RTT, {how}", values))
            await delayed.close()
        for rtt in RTTS:
            standin.reset()
            standin.faults(latency_ms=rtt)
            store = make_store(standin)
            await store.open()
            values = await paced(store, f"ses-paced-{rtt}")
            await store.close()
            print(line(f"Convex stand-in + {rtt:2d} ms, batched", values))
        standin.faults()

        print("\n3. delta latency, model -> WebSocket client, 50 deltas/s")
        llm = ScriptedLLM().start()
        repo = sample_repo(work)
        try:
            server = JupyterProcess(llm.url, work / "sqlite")
            try:
                base_lat = await stream_latencies(server, running_session(server, repo), llm, 200)
            finally:
                server.stop()
            print(line("SQLite       ", base_lat))
            standin.reset()
            server = JupyterProcess(llm.url, work / "convex", env=store_env(standin),
                                    extra=[f"--TabbiExtension.store_class={STORE_CLASS}"])
            try:
                sid = running_session(server, repo)
                for rtt in RTTS:
                    standin.faults(latency_ms=rtt)
                    values = await stream_latencies(server, sid, llm, 200)
                    print(line(f"Convex {rtt:2d} ms ", values) +
                          f"; p50 ratio to SQLite {percentile(values, 50) / percentile(base_lat, 50):.2f}")
                standin.faults()
            finally:
                server.stop()
        finally:
            llm.stop()
    finally:
        standin.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
