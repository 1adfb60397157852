"""The warm pool against cold starts, in one run: a bare ``opencode serve`` cold start -> healthy
(the baseline), tabbi's cold create -> running (pool off), and create -> running from the warm
pool; where a pooled start's time goes (the server's ``session.ready`` log line: milliseconds per
step); the first prompt after running (prompt -> its turn finished, with the scripted model's
one-line answer), so that a cost moved past ``running`` shows; then the memory an idle pooled
sandbox holds (RSS and PSS of its processes).

Run: ``.venv/bin/python bench/bench_pool.py [N]``. Ratios are against the bare cold start's
median in the same run. The samples run in N rounds of (pooled, bare, cold), so that all three
see the same load on a shared machine (the load average is printed after each round); the pool
refills in the background after each pooled sample, as it would between a person's sessions,
and is full again before the bare and cold samples of the round.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from harness import BareOpenCode, JupyterProcess, ScriptedLLM, machine, percentile, sample_repo, summary

from tabbi_sandbox import processes


def create_until_running(server: JupyterProcess, repo: Path) -> tuple[float, float, str]:
    """``(create -> running, first prompt -> its turn finished, session id)`` in seconds."""
    started = time.monotonic()
    sid = server.call("POST", "tabbi/api/sessions", {"repo": str(repo)})["id"]
    event = server.wait_event(sid, lambda e: e["type"] == "session.status"
                              and e["data"]["state"] in ("running", "error"))
    running = time.monotonic() - started
    if event["data"]["state"] != "running":
        raise RuntimeError(f"session {sid} failed: {event['data']}")
    asked = time.monotonic()
    server.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "hello"})
    done = server.wait_event(sid, lambda e: e["type"] == "turn.finished", after=event["seq"])
    if done["data"].get("outcome") != "completed":
        raise RuntimeError(f"the first turn of {sid} failed: {done['data']}")
    return running, time.monotonic() - asked, sid


def start_steps(server: JupyterProcess) -> dict[str, list[dict[str, int]]]:
    """The ``session.ready`` lines of the server's log, by session id (JSON log lines)."""
    found: dict[str, list[dict[str, int]]] = defaultdict(list)
    for line in server.log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == "session.ready":
            found[record["session"]].append({**record["steps"], "total": record["ms"]})
    return found


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def wait_pool_full(server: JupyterProcess, timeout: float = 300) -> None:
    """Ask for warm sandboxes (an intent, rate limit off) until one is ready."""
    deadline = time.monotonic() + timeout
    while server.call("POST", "tabbi/api/warm")["ready"] < 1:
        if time.monotonic() > deadline:
            raise TimeoutError("the pool did not fill")
        time.sleep(0.2)  # a poll interval: the server has no pool event to wait on


def memory_by_sandbox() -> dict[str, tuple[int, int]]:
    """``sandbox id -> (RSS, PSS)`` in bytes, over every process carrying a sandbox marker."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                marker = next((v for v in f.read().split(b"\0")
                               if v.startswith(processes.MARKER.encode() + b"=")), None)
            if marker is None:
                continue
            fields = {}
            with open(f"/proc/{entry}/smaps_rollup") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 2 and parts[1].isdigit():
                        fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
        except OSError:
            continue
        sid = marker.split(b"=", 1)[1].decode()
        totals[sid][0] += fields.get("Rss", 0)
        totals[sid][1] += fields.get("Pss", 0)
    return {k: (v[0], v[1]) for k, v in totals.items()}


def main(n: int = 5) -> None:
    llm = ScriptedLLM().start()
    work = Path(tempfile.mkdtemp(prefix="tabbi-bench-pool-"))
    repo = sample_repo(work)
    loads = [load()]
    json_log = ["--TabbiExtension.log_style=json"]
    cold_server = JupyterProcess(llm.url, work / "cold", extra=json_log)  # no pool: JupyterProcess's default
    server = JupyterProcess(llm.url, work / "warm",
                            extra=[*json_log, "--WarmPool.size=1", "--WarmPool.warm_interval=0"])
    bare: list[float] = []
    cold: list[float] = []
    cold_prompt: list[float] = []
    warm: list[float] = []
    warm_prompt: list[float] = []
    warm_ids: list[str] = []
    memory: list[tuple[int, int]] = []
    try:
        # Rounds of (pooled, bare, cold), so that the three see the same load on a shared machine;
        # the pool refills before the bare and cold samples, never during one.
        for _ in range(n):
            wait_pool_full(server)
            live = {s["id"] for s in server.call("GET", "tabbi/api/sessions")["sessions"]}
            # This server's sandboxes (other processes on the machine may run their own).
            pooled = {d.name for d in (work / "warm" / "tabbi-data" / "sandboxes").iterdir()} - live
            memory += [m for sid, m in memory_by_sandbox().items() if sid in pooled]
            seconds, prompt, sid = create_until_running(server, repo)
            warm.append(seconds)
            warm_prompt.append(prompt)
            warm_ids.append(sid)
            server.call("DELETE", f"tabbi/api/sessions/{sid}")
            wait_pool_full(server)

            oc = BareOpenCode(llm, repo)
            bare.append(oc.wait_healthy())
            oc.stop()

            seconds, prompt, sid = create_until_running(cold_server, repo)
            cold.append(seconds)
            cold_prompt.append(prompt)
            cold_server.call("DELETE", f"tabbi/api/sessions/{sid}")
            loads.append(load())
    finally:
        server.stop()
        cold_server.stop()
        llm.stop()
    cold_steps = [s for runs in start_steps(cold_server).values() for s in runs]
    logged = start_steps(server)
    warm_steps = [s for sid in warm_ids for s in logged.get(sid, [])[:1]]

    base = statistics.median(bare)
    print(f"machine: {machine()}; load average (1 min) at the start and after each round: {', '.join(loads)}")
    print(f"bare opencode serve cold start -> healthy: {summary(bare)}")
    print(f"tabbi cold create -> running (no pool):    {summary(cold)}  "
          f"= {statistics.median(cold) / base:.2f}x bare")
    print(f"tabbi create -> running from the pool:     {summary(warm)}  "
          f"= {statistics.median(warm) / base:.2f}x bare "
          f"(p99 {percentile(warm, 99) / base:.2f}x); goal <= 0.10x")
    print(f"first prompt -> turn finished, cold:       {summary(cold_prompt)}")
    print(f"first prompt -> turn finished, pooled:     {summary(warm_prompt)}")
    for name, steps in (("cold", cold_steps), ("pooled", warm_steps)):
        if steps:
            keys = [k for k in steps[0] if k != "total"] + ["total"]
            print(f"where a {name} start goes (server side, median ms of {len(steps)}): " + ", ".join(
                f"{k} {statistics.median(s.get(k, 0) for s in steps):.0f}" for k in keys))
    if memory:
        rss = statistics.median(m[0] for m in memory) / 2**20
        pss = statistics.median(m[1] for m in memory) / 2**20
        print(f"idle pooled sandbox memory (median of {len(memory)}): RSS {rss:.0f} MB, PSS {pss:.0f} MB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
