"""Resume-to-running against create-to-running, and snapshot time against workspace size
(1, 10, 100 MB) with a plain ``tar -czf`` of the same workspace as the baseline. All through a
real ``jupyter server`` with tabbi, measured in this run.

Run: ``.venv/bin/python bench/bench_lifecycle.py``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from harness import JupyterProcess, ScriptedLLM, machine, sample_repo


def wait_running(server: JupyterProcess, sid: str, after: int) -> None:
    server.wait_event(sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "running",
                      after=after)


def start_and_resume(server: JupyterProcess, repo: Path, n: int) -> tuple[list[float], list[float]]:
    creates, resumes = [], []
    for _ in range(n):
        t0 = time.monotonic()
        sid = server.call("POST", "tabbi/api/sessions", {"repo": str(repo)})["id"]
        wait_running(server, sid, 0)
        creates.append(time.monotonic() - t0)
        server.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "hello"})
        server.wait_event(sid, lambda e: e["type"] == "snapshot.saved")
        server.call("POST", f"tabbi/api/sessions/{sid}/pause", timeout=120)
        t0 = time.monotonic()
        resumed = server.call("POST", f"tabbi/api/sessions/{sid}/resume")
        wait_running(server, sid, resumed["last_seq"])
        resumes.append(time.monotonic() - t0)
        server.call("DELETE", f"tabbi/api/sessions/{sid}")
    return creates, resumes


def snapshot_times(server: JupyterProcess, work: Path, megabytes: int) -> tuple[float, float]:
    repo = sample_repo(work / f"repo-{megabytes}mb")
    (repo / "data.bin").write_bytes(os.urandom(megabytes * 1024 * 1024))  # incompressible
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@x"}
    subprocess.run(["git", "add", "."], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "data"], cwd=repo, check=True, env=env)
    sid = server.call("POST", "tabbi/api/sessions", {"repo": str(repo)})["id"]
    wait_running(server, sid, 0)
    server.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "hello"})
    saved = server.wait_event(sid, lambda e: e["type"] == "snapshot.saved", timeout=300)
    workspace = server.workdir / "tabbi-data" / "sandboxes" / sid / "workspace"
    t0 = time.monotonic()
    subprocess.run(["tar", "-czf", str(work / "baseline.tar.gz"), "-C", str(workspace.parent),
                    "workspace"], check=True)
    baseline = time.monotonic() - t0
    server.call("DELETE", f"tabbi/api/sessions/{sid}")
    return saved["data"]["seconds"], baseline


def main() -> None:
    llm = ScriptedLLM().start()
    work = Path(tempfile.mkdtemp(prefix="tabbi-bench-life-"))
    server = JupyterProcess(llm.url, work / "server")
    try:
        creates, resumes = start_and_resume(server, sample_repo(work), 3)
        sizes = {mb: snapshot_times(server, work, mb) for mb in (1, 10, 100)}
    finally:
        server.stop()
        llm.stop()
    print(f"machine: {machine()}")
    c, r = statistics.median(creates), statistics.median(resumes)
    print(f"create -> running: median {c * 1000:.0f} ms; resume -> running: median {r * 1000:.0f} ms "
          f"(n={len(creates)}); ratio resume/create {r / c:.2f}")
    for mb, (tabbi, baseline) in sizes.items():
        print(f"snapshot of a {mb:>3} MB workspace: tabbi {tabbi:.2f} s, tar -czf {baseline:.2f} s, "
              f"ratio {tabbi / baseline:.2f}")


if __name__ == "__main__":
    main()
