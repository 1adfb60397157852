"""Resume-to-running against create-to-running, snapshot time against workspace size (1, 10,
100 MB) with a plain ``tar -czf`` of the same workspace as the baseline, and recovery after the
server is SIGKILLed: re-attaching to a sandbox that outlived it (``detach_sandboxes``) against
resuming from the snapshot (the default). All through a real ``jupyter server`` with tabbi,
measured in this run.

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


def recovery_time(llm: ScriptedLLM, work: Path, detach: bool) -> float:
    """SIGKILL the server of a running session, start it again: seconds from the new server
    process's start until the session runs again (re-attached, or resumed by a prompt)."""
    extra = ["--TabbiExtension.detach_sandboxes=True"] if detach else []
    folder = Path(tempfile.mkdtemp(prefix="srv-", dir=work))
    first = JupyterProcess(llm.url, folder, extra=extra)
    try:
        sid = first.call("POST", "tabbi/api/sessions", {"repo": str(sample_repo(folder))})["id"]
        wait_running(first, sid, 0)
        first.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "hello"})
        first.wait_event(sid, lambda e: e["type"] == "snapshot.saved")
        last = first.call("GET", f"tabbi/api/sessions/{sid}")["last_seq"]
    finally:
        first.kill()
    t0 = time.monotonic()
    second = JupyterProcess(llm.url, folder, extra=extra)
    try:
        if not detach:
            second.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "again"})
        wait_running(second, sid, last)
        elapsed = time.monotonic() - t0
        second.call("DELETE", f"tabbi/api/sessions/{sid}")
    finally:
        second.stop()
    return elapsed


def main() -> None:
    llm = ScriptedLLM().start()
    work = Path(tempfile.mkdtemp(prefix="tabbi-bench-life-"))
    server = JupyterProcess(llm.url, work / "server")
    try:
        creates, resumes = start_and_resume(server, sample_repo(work), 3)
        sizes = {mb: snapshot_times(server, work, mb) for mb in (1, 10, 100)}
    finally:
        server.stop()
    try:
        reattach = [recovery_time(llm, work, detach=True) for _ in range(3)]
        resume = [recovery_time(llm, work, detach=False) for _ in range(3)]
    finally:
        llm.stop()
    print(f"machine: {machine()}")
    c, r = statistics.median(creates), statistics.median(resumes)
    print(f"create -> running: median {c * 1000:.0f} ms; resume -> running: median {r * 1000:.0f} ms "
          f"(n={len(creates)}); ratio resume/create {r / c:.2f}")
    a, b = statistics.median(reattach), statistics.median(resume)
    print(f"after a SIGKILL, new server start -> session running: re-attach median {a * 1000:.0f} ms, "
          f"resume from snapshot median {b * 1000:.0f} ms (n=3); ratio {a / b:.2f}")
    for mb, (tabbi, baseline) in sizes.items():
        print(f"snapshot of a {mb:>3} MB workspace: tabbi {tabbi:.2f} s, tar -czf {baseline:.2f} s, "
              f"ratio {tabbi / baseline:.2f}")


if __name__ == "__main__":
    main()
