"""Fan-out: the delta latency tabbi adds while many sessions stream at once, and the server's CPU
time per 1,000 events, so that an operator can size a deployment.

Every session streams one turn at the same moment: the scripted model writes ``--chunks`` text
chunks ``--drip`` seconds apart to each of them, and stamps each chunk as it writes it. Each
chunk is read twice, in the same run, by this process:

- directly, from the session's own agent's ``/event`` SSE stream (the baseline: what any reader of
  OpenCode gets), and
- through tabbi, as a kernel reads it: over the session's WebSocket (``--client ws``, what the chat
  panel in ``tabbi_kernel/panel.py`` uses) or by long-polling with ``tabbi_kernel.client``'s
  ``Session.follow`` (``--client poll``, what ``%%tabbi`` and ``ask`` use).

"tabbi adds" is, per chunk, the time it reached the tabbi client minus the time it reached the
direct reader: OpenCode -> tabbi's SSE consumer -> normalize -> the event log (SQLite, persisted
before it is sent) -> the client. The model -> agent part is the same for both and cancels out.

CPU: the ``jupyter server`` process's own user+system time (``/proc/<pid>/stat``) from the first
prompt until the last ``turn.finished`` reached its client, per 1,000 events delivered to the
clients (every event of those turns: deltas, parts, statuses, turn events). That time includes the
server's model gateway relaying each model chunk to the agent. The agents' processes (OpenCode or
the stand-in, with their bubblewrap and bootstrap) are measured alike, for comparison.

``--agent standin`` runs ``bench/standin_agent/opencode_standin.py`` in every sandbox instead of
OpenCode (see its docstring for exactly what it stands in for): 50 OpenCode processes (300-700 MB
each) do not fit a 2-core machine with 23 GB.

The machine's load average is printed with every repeat: on a shared machine it varies, and the
added latency with it.

Run: ``.venv/bin/python bench/bench_fanout.py --sessions 10 --repeats 3``
     ``.venv/bin/python bench/bench_fanout.py --sessions 50 --agent standin --repeats 3``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from harness import ROOT, JupyterProcess, ScriptedLLM, machine, percentile, sample_repo
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from tabbi_extension import encryption
from tabbi_kernel.client import Client
from tests.support.llm import Reply
from tests.support.load import run_load

STANDIN = ROOT / "bench" / "standin_agent" / "opencode_standin.py"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Target:
    """One tabbi session, and how to reach its agent directly."""

    sid: str
    after: int
    agent_url: str = ""
    agent_password: str = ""
    agent_session: str = ""


@dataclass
class Arrivals:
    """When each model chunk reached one reader (piece -> epoch seconds), and how many events."""

    pieces: dict[str, float] = field(default_factory=dict)
    #: piece -> when the server logged it (the event's ``ts``), for tabbi's readers.
    logged: dict[str, float] = field(default_factory=dict)
    events: int = 0

    def stamp(self, delta: str, at: float, logged: float | None = None) -> None:
        for piece in (p + ";" for p in delta.split(";") if p):
            self.pieces.setdefault(piece, at)
            if logged is not None:
                self.logged.setdefault(piece, logged)


@dataclass
class Repeat:
    added: list[float]
    #: ``added`` of the last tenth of each stream: much above the whole stream's, a backlog built up.
    added_late: list[float]
    #: ``added`` in two: agent -> the server logs the delta (its SSE consumer and normalizer), and
    #: logged -> the client has it (the log's write and the delivery).
    added_in: list[float]
    added_out: list[float]
    model_to_direct: list[float]
    model_to_tabbi: list[float]
    tabbi_events: int
    agent_events: int
    wall: float
    server_cpu: float
    agent_cpu: float
    bench_cpu: float
    load: tuple[float, float]

    @property
    def cpu_per_1000(self) -> float:
        return self.server_cpu / self.tabbi_events * 1000


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):  # ended meanwhile
            total += cpu_seconds(pid)
    return total


def prioritize(pids: list[int], nice: int) -> None:
    """Set the niceness of the processes' scheduler autogroups: the server and every sandbox start
    a session of their own, so with autogroups on (Linux's default) a process's own niceness only
    counts within its group, and each group gets an equal share of the CPU."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, pid, nice)
            Path(f"/proc/{pid}/autogroup").write_text(str(nice))


def agent_access(server: JupyterProcess, target: Target) -> None:
    """The agent's URL, password and session of ``target``, as the server keeps them: the
    benchmark owns this server, so it reads them from its store (the password sealed with the
    data folder's key, as ``detach_sandboxes`` keeps it)."""
    data = server.workdir / "tabbi-data"
    with sqlite3.connect(f"file:{data / 'tabbi.sqlite3'}?mode=ro", uri=True) as db:
        session, state = db.execute(
            "SELECT opencode_session_id, sandbox_state FROM sessions WHERE id = ?", (target.sid,)).fetchone()
    state = json.loads(state)
    password = encryption.load(None, data, generate=False).decrypt(state["password_sealed"].encode())
    assert password is not None, "the sandbox's password could not be unsealed"
    target.agent_url = f"http://127.0.0.1:{state['port']}"
    target.agent_password = password.decode()
    target.agent_session = session


async def read_direct(target: Target, arrivals: Arrivals, connected: asyncio.Event) -> None:
    """The agent's own SSE stream, filtered to the session, until it is idle after streaming."""
    busy = False
    async with httpx.AsyncClient(base_url=target.agent_url, auth=("opencode", target.agent_password),
                                 timeout=httpx.Timeout(120)) as client, \
            client.stream("GET", "/event") as stream:
        async for line in stream.aiter_lines():
            if not line.startswith("data:"):
                continue
            at = time.time()
            event = json.loads(line[5:])
            props = event.get("properties") or {}
            if event["type"] == "server.connected":
                connected.set()
                continue
            owner = props.get("sessionID") or (props.get("part") or props.get("info") or {}).get("sessionID")
            if owner != target.agent_session:
                continue
            arrivals.events += 1
            if event["type"] == "message.part.delta":
                arrivals.stamp(props.get("delta", ""), at)
            busy = busy or (event["type"] == "session.status" and props["status"].get("type") == "busy")
            if event["type"] == "session.idle" and busy:  # (an idle of an earlier turn has no busy before it)
                return


async def read_websocket(server: JupyterProcess, target: Target, arrivals: Arrivals,
                         connected: asyncio.Event) -> None:
    """tabbi's WebSocket, as the chat panel reads it, until the turn's ``turn.finished``."""
    ws = await websocket_connect(HTTPRequest(
        f"ws://127.0.0.1:{server.port}/tabbi/api/sessions/{target.sid}/stream?after={target.after}",
        headers={"Authorization": f"token {server.token}"}))
    connected.set()
    try:
        while True:
            message = await asyncio.wait_for(ws.read_message(), 120)
            at = time.time()
            if message is None:
                raise RuntimeError(f"the WebSocket of {target.sid} closed")
            event = json.loads(message)
            if not take(event, at, target, arrivals):
                return
    finally:
        ws.close()


def take(event: dict, at: float, target: Target, arrivals: Arrivals) -> bool:
    """Count one tabbi event; False once the turn is over."""
    arrivals.events += 1
    target.after = event["seq"]
    if event["type"] == "text.delta":
        arrivals.stamp(event["data"]["delta"], at, event["ts"])
    return event["type"] != "turn.finished"


def follow_polling(server: JupyterProcess, target: Target, arrivals: Arrivals) -> None:
    """tabbi's long-poll, through the kernel's own client (``Session.follow``), in a thread."""
    session = Client(server.url, server.token).session(target.sid)
    for event in session.follow(target.after, until=lambda e: e["type"] == "turn.finished", timeout=120):
        take(event, time.time(), target, arrivals)


async def one_turn(server: JupyterProcess, llm: ScriptedLLM, targets: list[Target], args: argparse.Namespace,
                   rep: int, pool: ThreadPoolExecutor) -> Repeat:
    for k in range(len(targets)):  # unique pieces across sessions and repeats
        text = "".join(f"r{rep:02d}s{k:03d}w{i:04d};" for i in range(args.chunks))
        llm.enqueue(Reply(text=text, chunks=args.chunks, drip=args.drip))
    direct = [Arrivals() for _ in targets]
    tabbi = [Arrivals() for _ in targets]
    ready = [asyncio.Event() for _ in targets]
    tasks = [asyncio.ensure_future(read_direct(t, a, e))
             for t, a, e in zip(targets, direct, ready, strict=True)]
    if args.client == "ws":
        ready += [asyncio.Event() for _ in targets]
        tasks += [asyncio.ensure_future(read_websocket(server, t, a, e))
                  for t, a, e in zip(targets, tabbi, ready[len(targets):], strict=True)]
    else:  # a long-poll needs no connection: it reads from ``after`` whenever it asks
        loop = asyncio.get_running_loop()
        tasks += [loop.run_in_executor(pool, follow_polling, server, t, a)
                  for t, a in zip(targets, tabbi, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 60)

    agents = descendants(server.proc.pid)
    load_before = os.getloadavg()[0]
    cpu0, agent0, started = cpu_seconds(server.proc.pid), tree_cpu(agents), time.monotonic()
    bench0 = sum(os.times()[:2])
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"token {server.token}"},
                                 timeout=60) as client:
        await asyncio.gather(*(client.post(f"tabbi/api/sessions/{t.sid}/prompt", json={"text": "stream"})
                               for t in targets))
    done, pending = await asyncio.wait(tasks, timeout=args.chunks * args.drip + 120)
    if pending:
        stuck = [f"{'direct' if i < len(targets) else 'tabbi'} {targets[i % len(targets)].sid}"
                 for i, task in enumerate(tasks) if task in pending]
        raise RuntimeError(f"readers that did not see their turn end: {', '.join(stuck)}")
    for task in done:
        task.result()  # a reader's error
    cpu1, agent1, wall = cpu_seconds(server.proc.pid), tree_cpu(agents), time.monotonic() - started
    bench_cpu = sum(os.times()[:2]) - bench0

    emitted = {piece: at for at, piece in llm.emitted}
    added, late, into, out, to_direct, to_tabbi = [], [], [], [], [], []
    for d, t in zip(direct, tabbi, strict=True):
        for piece, at in t.pieces.items():
            if piece in d.pieces and piece in emitted:
                added.append(at - d.pieces[piece])
                into.append(t.logged[piece] - d.pieces[piece])
                out.append(at - t.logged[piece])
                if int(piece[-5:-1]) >= args.chunks * 0.9:  # the chunk's index, "w0123;"
                    late.append(added[-1])
                to_direct.append(d.pieces[piece] - emitted[piece])
                to_tabbi.append(at - emitted[piece])
    expected = len(targets) * args.chunks
    if len(added) < expected * 0.95:
        raise RuntimeError(f"only {len(added)} of {expected} chunks were seen by both readers")
    return Repeat(added, late, into, out, to_direct, to_tabbi, sum(a.events for a in tabbi),
                  sum(a.events for a in direct), wall, cpu1 - cpu0, agent1 - agent0, bench_cpu,
                  (load_before, os.getloadavg()[0]))


def settle(server: JupyterProcess, targets: list[Target]) -> None:
    """Until every session's post-turn snapshot is done, so that it does not run during the next
    measured turn."""
    def one(target: Target) -> None:
        target.after = server.wait_event(
            target.sid, lambda e: e["type"] in ("snapshot.saved", "snapshot.failed"),
            after=target.after, timeout=300)["seq"]

    with ThreadPoolExecutor(len(targets)) as pool:
        list(pool.map(one, targets))


def ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.2f}"


def describe(name: str, r: Repeat) -> str:
    return (f"{name}: added p50 {ms(r.added, 50)} ms, p99 {ms(r.added, 99)} ms (n={len(r.added)}), "
            f"last tenth p50 {ms(r.added_late, 50)} ms; agent->logged p50 {ms(r.added_in, 50)} / p99 "
            f"{ms(r.added_in, 99)} ms, logged->client p50 {ms(r.added_out, 50)} / p99 "
            f"{ms(r.added_out, 99)} ms; "
            f"model->direct p50 {ms(r.model_to_direct, 50)} / p99 {ms(r.model_to_direct, 99)} ms, "
            f"model->tabbi p50 {ms(r.model_to_tabbi, 50)} / p99 {ms(r.model_to_tabbi, 99)} ms; "
            f"{r.tabbi_events} tabbi events ({r.agent_events} agent events) in {r.wall:.1f} s; "
            f"server CPU {r.server_cpu * 1000:.0f} ms = {r.cpu_per_1000 * 1000:.0f} ms per 1,000 events; "
            f"agents CPU {r.agent_cpu * 1000:.0f} ms = {r.agent_cpu / r.wall * 100:.0f}% of a core; "
            f"this process (model + readers) CPU {r.bench_cpu / r.wall * 100:.0f}% of a core; "
            f"load {r.load[0]:.1f} -> {r.load[1]:.1f}")


async def measure(args: argparse.Namespace) -> None:
    if args.nice:
        prioritize([os.getpid()], args.nice)
    llm = ScriptedLLM().start()
    work = Path(tempfile.mkdtemp(prefix="tabbi-bench-fanout-"))
    repo = sample_repo(work)
    extra = ["--TabbiExtension.idle_timeout=0", "--TabbiExtension.detach_sandboxes=True"]
    if args.agent == "standin":
        extra.append(f"--TabbiExtension.opencode_bin={STANDIN}")
    server = JupyterProcess(llm.url, work / "server", extra=extra)
    repeats: list[Repeat] = []
    try:
        # Start the sessions and run one warm-up turn each (the load test's code).
        started = await asyncio.to_thread(run_load, server, repo, args.sessions, 1)
        targets = [Target(sid, events[-1]["seq"]) for sid, events in started.events.items()]
        await asyncio.to_thread(settle, server, targets)
        for target in targets:
            agent_access(server, target)
        if args.nice:
            prioritize([server.proc.pid, *(descendants(server.proc.pid) if args.nice_agents else [])],
                       args.nice)
        idle0, idle_at = cpu_seconds(server.proc.pid), time.monotonic()
        await asyncio.sleep(3)  # the measurement itself: the server's CPU while nothing happens
        idle = (cpu_seconds(server.proc.pid) - idle0) / (time.monotonic() - idle_at)
        with ThreadPoolExecutor(len(targets)) as pool:
            for rep in range(args.repeats):
                llm.emitted.clear()
                repeats.append(await one_turn(server, llm, targets, args, rep, pool))
                print(describe(f"repeat {rep + 1}", repeats[-1]), flush=True)
                await asyncio.to_thread(settle, server, targets)
    finally:
        server.stop()
        llm.stop()
        if args.nice:  # this process's group is the shell's too: give it back its share
            prioritize([os.getpid()], 0)
    pooled = Repeat(*([x for r in repeats for x in getattr(r, f)]
                      for f in ("added", "added_late", "added_in", "added_out", "model_to_direct",
                                "model_to_tabbi")),
                    sum(r.tabbi_events for r in repeats), sum(r.agent_events for r in repeats),
                    sum(r.wall for r in repeats), sum(r.server_cpu for r in repeats),
                    sum(r.agent_cpu for r in repeats), sum(r.bench_cpu for r in repeats),
                    (min(r.load[0] for r in repeats), max(r.load[1] for r in repeats)))
    print(f"machine: {machine()}")
    print(f"{args.sessions} sessions x {args.chunks} chunks {args.drip * 1000:.0f} ms apart, agent: "
          f"{args.agent}, tabbi client: {args.client}, {args.repeats} repeats, niceness {args.nice} "
          f"({'with' if args.nice_agents else 'without'} the agents)")
    print(describe("pooled", pooled))
    print(f"spread over repeats: added p50 {min(percentile(r.added, 50) for r in repeats) * 1000:.2f}-"
          f"{max(percentile(r.added, 50) for r in repeats) * 1000:.2f} ms, p99 "
          f"{min(percentile(r.added, 99) for r in repeats) * 1000:.2f}-"
          f"{max(percentile(r.added, 99) for r in repeats) * 1000:.2f} ms; CPU per 1,000 events "
          f"{min(r.cpu_per_1000 for r in repeats) * 1000:.0f}-"
          f"{max(r.cpu_per_1000 for r in repeats) * 1000:.0f} ms")
    print(f"ratio model->tabbi / model->direct: p50 "
          f"{percentile(pooled.model_to_tabbi, 50) / percentile(pooled.model_to_direct, 50):.2f}, p99 "
          f"{percentile(pooled.model_to_tabbi, 99) / percentile(pooled.model_to_direct, 99):.2f}")
    print(f"server CPU while idle: {idle * 1000:.1f} ms per second; "
          f"median wall per turn {statistics.median(r.wall for r in repeats):.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--agent", choices=("opencode", "standin"), default="opencode")
    parser.add_argument("--client", choices=("ws", "poll"), default="ws")
    parser.add_argument("--chunks", type=int, default=100, help="text chunks per turn and session")
    parser.add_argument("--drip", type=float, default=0.02, help="seconds between chunks")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nice", type=int, default=0,
                        help="the niceness of the scheduler groups of this process, the server and its "
                        "sandboxes (below 0 needs root): on a shared machine, so that others' jobs do "
                        "not starve them")
    parser.add_argument("--nice-agents", action="store_true",
                        help="with --nice: the agents' sandboxes too (each is a scheduler group of its own)")
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
