"""``%tabbi checkout``: from a turn's end (its ``turn.finished`` event, as a client sees it) to the
kernel's working copy being up to date, for a small change (one file) and a larger one (200 new
files, 2.7 MB), against two baselines measured in the same run on the same state:
- ``GET /diff`` of the session (the server's other way of showing the workspace), and
- a plain ``git fetch`` of the same bundle (the same delta) from a local file into a repository
  that has the previous state: the cost of moving the objects with git alone.

The follower runs as in a kernel (``tabbi_kernel.checkout``, a background thread long-polling the
events), here in this process; the server is a real Jupyter server with tabbi (local provider,
bubblewrap), the agent a real OpenCode driven by the scripted model.

Run: ``.venv/bin/python bench/bench_checkout.py [N]``.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import JupyterProcess, ScriptedLLM, machine, sample_repo

from tabbi_kernel import checkout
from tabbi_kernel.client import connect
from tests.support.llm import Reply, bash

CHANGES = {
    "small (1 file)": "echo \"V = $RANDOM\" > small.py",
    "larger (200 files, 2.7 MB)": "mkdir -p data && for i in $(seq 200); do "
                                  "head -c 10000 /dev/urandom | base64 > data/f$i.txt; done",
}


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def main(n: int = 5) -> None:
    llm = ScriptedLLM().start()
    work = Path(tempfile.mkdtemp(prefix="tabbi-bench-checkout-"))
    server = JupyterProcess(llm.url, work / "server")
    results: dict[str, dict[str, list[float]]] = {
        k: {"checkout": [], "diff": [], "fetch": []} for k in CHANGES}
    try:
        sid = server.call("POST", "tabbi/api/sessions", {"repo": str(sample_repo(work))})["id"]
        server.wait_event(sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "running")
        session = connect(server.url, server.token).session(sid)
        follower = checkout.checkout(session, str(work / "copy"), report=lambda line: None)
        copy = Path(follower.copy.path)
        mirror = work / "mirror.git"
        git("init", "-q", "--bare", str(mirror), cwd=work)
        for i in range(n):
            for name, command in CHANGES.items():
                previous = follower.copy.current()
                git("fetch", "-q", str(copy), f"{checkout.REF}:refs/prev", cwd=mirror)
                after = session.refresh()["last_seq"]
                llm.enqueue(Reply(tools=[bash(f"rm -rf data small.py; {command}")]), Reply(text="Done."))
                count = follower.updates
                session.prompt(f"change {i} {name}")
                ended = None
                while ended is None:
                    for event in session.events(after, wait=10):
                        after = event["seq"]
                        if event["type"] == "turn.finished":
                            ended = time.monotonic()
                assert follower.wait_for(count + 1, 120), follower.error
                results[name]["checkout"].append(time.monotonic() - ended)
                t0 = time.monotonic()
                session.diff()
                results[name]["diff"].append(time.monotonic() - t0)
                bundle = work / "delta.bundle"
                with open(bundle, "wb") as out:
                    session.bundle(out, previous)
                t0 = time.monotonic()
                git("fetch", "-q", str(bundle), "refs/tabbi/checkout:refs/new", cwd=mirror)
                results[name]["fetch"].append(time.monotonic() - t0)
        checkout.stop()
    finally:
        server.stop()
        llm.stop()
    print(f"machine: {machine()}")
    for name, times in results.items():
        c, d, f = (statistics.median(times[k]) for k in ("checkout", "diff", "fetch"))
        print(f"{name}: turn.finished -> working copy up to date median {c * 1000:.0f} ms; "
              f"GET /diff {d * 1000:.0f} ms; git fetch of the same bundle {f * 1000:.0f} ms (n={n}); "
              f"ratios checkout/diff {c / d:.2f}, checkout/fetch {c / f:.1f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
