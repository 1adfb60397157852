"""Many sessions at once against one real server process: the load test and its benchmark share
this, so the figures in docs/benchmarks.md come from the code the test checks."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.server import JupyterProcess


@dataclass
class LoadResult:
    sessions: int
    turns: int
    wall_seconds: float
    events: dict[str, list[dict]] = field(default_factory=dict)
    server_peak_rss_mb: float = 0.0

    @property
    def total_events(self) -> int:
        return sum(len(v) for v in self.events.values())

    def summary(self) -> str:
        return (f"{self.sessions} sessions x {self.turns} turns: wall {self.wall_seconds:.1f} s, "
                f"{self.total_events} events ({self.total_events / self.wall_seconds:.0f} events/s), "
                f"server peak RSS {self.server_peak_rss_mb:.0f} MB (OpenCode processes not included)")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_load(server: JupyterProcess, repo: Path, sessions: int = 10, turns: int = 5) -> LoadResult:
    def one(index: int) -> tuple[str, list[dict]]:
        sid = server.call("POST", "tabbi/api/sessions", {"repo": str(repo)})["id"]
        server.wait_event(sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "running",
                          timeout=300)
        after = 0
        for turn in range(turns):
            prompt = server.call("POST", f"tabbi/api/sessions/{sid}/prompt",
                                 {"text": f"session {index} turn {turn}"})
            after = server.wait_event(
                sid, lambda e, p=prompt["prompt_id"]: e["type"] == "turn.finished"
                and e["data"]["prompt_id"] == p, after=after, timeout=300)["seq"]
        events: list[dict] = []
        while True:
            page = server.call("GET", f"tabbi/api/sessions/{sid}/events?after="
                               f"{events[-1]['seq'] if events else 0}")["events"]
            events += page
            if len(page) < 1000:
                return sid, events

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=sessions) as pool:
        results = list(pool.map(one, range(sessions)))
    result = LoadResult(sessions, turns, time.monotonic() - started, dict(results))
    result.server_peak_rss_mb = peak_rss_mb(server.proc.pid)
    return result
