"""10 sessions x 5 turns at once against one real server process (the load test's code):
wall time, events/s, and the server process's peak memory without the OpenCode processes.
The baseline is one session x 5 turns on the same server, measured in this run.

Run: ``.venv/bin/python bench/bench_load.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from harness import JupyterProcess, ScriptedLLM, machine, sample_repo

from tests.support.load import run_load


def main() -> None:
    llm = ScriptedLLM().start()
    work = Path(tempfile.mkdtemp(prefix="tabbi-bench-load-"))
    repo = sample_repo(work)
    server = JupyterProcess(llm.url, work / "server", extra=["--TabbiExtension.idle_timeout=0"])
    try:
        single = run_load(server, repo, sessions=1, turns=5)
        many = run_load(server, repo, sessions=10, turns=5)
    finally:
        server.stop()
        llm.stop()
    print(f"machine: {machine()}")
    print(f"baseline: {single.summary()}")
    print(f"load:     {many.summary()}")
    print(f"ratio wall (10 sessions / 1 session): {many.wall_seconds / single.wall_seconds:.2f}")


if __name__ == "__main__":
    main()
