"""A repository whose ``.tabbi/setup.sh`` installs a few Python packages: the first session (clone,
setup script, warm snapshot) against later sessions started from that warm snapshot, in one run.

The packages come from a wheelhouse committed in the repository (``.tabbi/wheels``, filled once
with ``pip download``, which reads pip's cache or the registry), so the install is the same on
every run and needs no network: ``python3 -m venv .venv`` then ``pip install --no-index``.

For each session: create -> running (the agent answers; reads may begin) and create -> in sync
(writes may begin: the warm workspace was fetched and fast-forwarded; for the first session the
same moment as running). The load average is printed: the machine is shared.

Run: ``.venv/bin/python bench/bench_setup.py [N]`` (N later sessions, default 5).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import JupyterProcess, ScriptedLLM, machine, sample_repo, summary

PACKAGES = ["numpy", "tabulate", "six", "attrs", "packaging"]

SETUP = """#!/bin/bash
set -euo pipefail
python3 -m venv .venv
.venv/bin/pip install --quiet --no-index --find-links .tabbi/wheels {packages}
.venv/bin/python -c "import numpy, tabulate; print('numpy', numpy.__version__)"
"""


def repository(work: Path) -> Path:
    repo = sample_repo(work)
    wheels = repo / ".tabbi" / "wheels"
    wheels.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                    "--python-version", "3.11", "--platform", "manylinux2014_x86_64",
                    "--dest", str(wheels), *PACKAGES], check=True)
    (repo / ".tabbi" / "setup.sh").write_text(SETUP.format(packages=" ".join(PACKAGES)))
    (repo / ".gitignore").write_text(".venv/\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@x"}
    for args in (["add", "."], ["commit", "-qm", "setup script and wheelhouse"]):
        subprocess.run(["git", *args], cwd=repo, env=env, check=True)
    return repo


def phases(server: JupyterProcess, sid: str) -> dict[str, float]:
    """Seconds spent in the start's parts, from the session's event timestamps: the setup script,
    the restore of the warm snapshot, saving it, and OpenCode's start."""
    events = server.call("GET", f"tabbi/api/sessions/{sid}/events?after=0")["events"]
    at: dict[str, float] = {}
    for e in events:
        if e["type"] in ("session.status", "environment"):
            at.setdefault(e["data"].get("phase") or e["data"].get("status"), e["ts"])  # the first
    out = {}
    agent_up = "saving_environment" if "saving_environment" in at else "ready"
    parts = (("setup.sh", "setup", "setup_done"), ("restore", "restoring", "reusing_workspace"),
             ("opencode", "starting_agent", agent_up), ("save", "saving_environment", "ready"))
    for name, begin, end in parts:
        if begin in at and end in at:
            out[name] = at[end] - at[begin]
    return out


def one_session(server: JupyterProcess, repo: Path, fresh: bool = False) -> tuple[float, float, dict]:
    """(create -> running, create -> writes allowed, the environment) of one new session."""
    started = time.monotonic()
    sid = server.call("POST", "tabbi/api/sessions", {"repo": str(repo), "fresh": fresh})["id"]
    event = server.wait_event(sid, lambda e: e["type"] == "session.status"
                              and e["data"]["state"] in ("running", "error"), timeout=600)
    if event["data"]["state"] == "error":
        raise RuntimeError(event["data"].get("error"))
    running = time.monotonic() - started
    environment = server.call("GET", f"tabbi/api/sessions/{sid}")["environment"]
    in_sync = running
    if environment["source"] == "warm":
        server.wait_event(sid, lambda e: e["type"] == "environment" and e["data"]["status"] == "synced")
        in_sync = time.monotonic() - started
    environment["phases"] = phases(server, sid)
    server.call("DELETE", f"tabbi/api/sessions/{sid}")
    return running, in_sync, environment


def main(n: int = 5) -> None:
    llm = ScriptedLLM().start()
    work = Path(tempfile.mkdtemp(prefix="tabbi-bench-setup-"))
    repo = repository(work)
    wheel_mb = sum(p.stat().st_size for p in (repo / ".tabbi" / "wheels").iterdir()) / 1e6
    server = JupyterProcess(llm.url, work / "server", extra=["--TabbiExtension.start_timeout=600"])
    load_before = os.getloadavg()
    try:
        first, _, built = one_session(server, repo)
        assert built["source"] == "built", built
        warm_running: list[float] = []
        warm_sync: list[float] = []
        warm_phases: list[dict] = []
        for _ in range(n):
            running, in_sync, environment = one_session(server, repo)
            assert environment["source"] == "warm", environment
            warm_running.append(running)
            warm_sync.append(in_sync)
            warm_phases.append(environment["phases"])
        fresh, _, rebuilt = one_session(server, repo, fresh=True)
    finally:
        server.stop()
        llm.stop()
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    print(f"machine: {machine()}")
    print(f"load average (1, 5, 15 min) before: {load_before}, after: {load_after}")
    print(f"repository: {', '.join(PACKAGES)} from a {wheel_mb:.1f} MB wheelhouse; "
          f"warm snapshot {built['size'] / 1e6:.1f} MB")
    print(f"first session (clone + setup.sh + warm snapshot) -> running: {first * 1000:.0f} ms")
    print(f"--fresh session (the same, again)             -> running: {fresh * 1000:.0f} ms")
    print(f"later sessions from the warm snapshot -> running: {summary(warm_running)}")
    print(f"later sessions from the warm snapshot -> in sync: {summary(warm_sync)}")
    for label, parts in (("first", built["phases"]), ("--fresh", rebuilt["phases"]),
                         ("warm (median)", {k: statistics.median(p[k] for p in warm_phases)
                                            for k in warm_phases[0]})):
        print(f"  {label:14} parts: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in parts.items()))
    print(f"ratio (median warm -> running / first): {statistics.median(warm_running) / first:.2f}")
    print(f"ratio (median warm -> in sync / first): {statistics.median(warm_sync) / first:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
