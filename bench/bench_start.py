"""create -> running through tabbi (HTTP API, real server, sandbox with clone + bootstrap), against
a bare ``opencode serve`` cold start to healthy, both measured in this run.

Run: ``.venv/bin/python bench/bench_start.py [N]``. The ratio is tabbi / bare.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import BareOpenCode, JupyterProcess, ScriptedLLM, machine, sample_repo, summary


def main(n: int = 5) -> None:
    llm = ScriptedLLM().start()
    work = Path(tempfile.mkdtemp(prefix="tabbi-bench-start-"))
    repo = sample_repo(work)
    bare: list[float] = []
    for _ in range(n):
        oc = BareOpenCode(llm, repo)
        bare.append(oc.wait_healthy())
        oc.stop()
    server = JupyterProcess(llm.url, work / "server")
    tabbi: list[float] = []
    try:
        for _ in range(n):
            started = time.monotonic()
            sid = server.call("POST", "tabbi/api/sessions", {"repo": str(repo)})["id"]
            server.wait_event(sid, lambda e: e["type"] == "session.status"
                              and e["data"]["state"] in ("running", "error"))
            tabbi.append(time.monotonic() - started)
            server.call("DELETE", f"tabbi/api/sessions/{sid}")
    finally:
        server.stop()
        llm.stop()
    print(f"machine: {machine()}")
    print(f"bare opencode serve cold start -> healthy: {summary(bare)}")
    print(f"tabbi create -> running:                  {summary(tabbi)}")
    print(f"ratio (median tabbi / median bare): {statistics.median(tabbi) / statistics.median(bare):.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
