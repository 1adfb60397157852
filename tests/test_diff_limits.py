"""``GET /diff`` on a workspace the agent filled with huge files: bounded, fast, and the server
keeps answering everyone else meanwhile.

Threat: the agent (by mistake, or a prompt injection on purpose) writes big untracked files, say
a data dump. The diff used to be ``git diff`` of everything read whole into the server's memory
and summarized on its event loop: 4 x 400 MB files took 6.7 GB of memory and froze the server
(every user, every kernel connection) for 27 s. Now the sandbox lists such files with their size
only, cuts long diffs with a marker, and the server reads a bounded answer off its loop.

This runs a real ``jupyter server`` process so that its memory is its own to measure.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from tabbi_extension.workspace import MAX_DIFF_CHARS, MAX_DIFF_SOURCE_BYTES, MAX_FILE_DIFF_CHARS
from tabbi_kernel import render
from tests.support.server import JupyterProcess

LINE = b"x" * 99 + b"\n"
MB = 1024 * 1024


def memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def write_lines(path: Path, total: int) -> None:
    """About ``total`` bytes of 100-byte text lines."""
    lines, chunk = total // len(LINE), MB // len(LINE)
    with open(path, "wb") as out:
        for start in range(0, lines, chunk):
            out.write(LINE * min(chunk, lines - start))


def test_diff_of_huge_untracked_files_is_bounded_and_the_server_stays_responsive(tmp_path, llm, source_repo):
    server = JupyterProcess(llm.url, tmp_path / "srv")
    try:
        sid = server.call("POST", "tabbi/api/sessions", {"repo": str(source_repo)})["id"]
        server.wait_event(sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "running")
        workspace = tmp_path / "srv" / "tabbi-data" / "sandboxes" / sid / "workspace"
        # What the agent left behind (written here directly: the same files, faster).
        for name in ("dump-1.csv", "dump-2.csv"):
            write_lines(workspace / name, 200 * MB)  # text, so git would diff every line
        write_lines(workspace / "medium.txt", 3 * MAX_FILE_DIFF_CHARS // 2)
        (workspace / "notes.txt").write_text("first\nsecond\n")
        (workspace / "blob.bin").write_bytes(bytes(range(256)) * 4)
        (workspace / "calc.py").write_text("def add(a, b):\n    return b + a\n")

        Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")  # peak RSS := current RSS
        before = memory_kb(server.proc.pid, "VmHWM")
        answer: dict = {}

        def fetch() -> None:
            started = time.monotonic()
            answer["diff"] = server.call("GET", f"tabbi/api/sessions/{sid}/diff", timeout=120)
            answer["seconds"] = time.monotonic() - started

        diffing = threading.Thread(target=fetch)
        diffing.start()
        latencies = []
        while diffing.is_alive():  # someone else uses the server while the diff is made
            started = time.monotonic()
            server.call("GET", "tabbi/api/whoami", timeout=120)
            latencies.append(time.monotonic() - started)
        diffing.join()
        grown_mb = (memory_kb(server.proc.pid, "VmHWM") - before) / 1024
    finally:
        server.stop()

    result = answer["diff"]
    files = {f["path"]: f for f in result["files"]}
    assert answer["seconds"] < 60, answer["seconds"]
    assert latencies and max(latencies) < 5, f"the server stalled: {max(latencies):.1f} s"
    assert grown_mb < 300, f"the server's peak memory grew by {grown_mb:.0f} MB"

    assert result["truncated"] is True and len(result["diff"]) < MAX_DIFF_CHARS + 10_000
    for name in ("dump-1.csv", "dump-2.csv"):
        dump = files[name]
        assert dump["size"] == 200 * MB // len(LINE) * len(LINE) > MAX_DIFF_SOURCE_BYTES
        assert dump["truncated"] is True and dump["additions"] is None and "bytes" in dump["skipped"]
        assert f"diff --git a/{name} b/{name}\n# tabbi: content not shown" in result["diff"]
    medium = files["medium.txt"]
    assert medium["truncated"] is True and medium["status"] == "added"
    assert medium["additions"] == medium["size"] // len(LINE)  # counted in full, shown in part
    assert "# tabbi: the diff of medium.txt is cut here" in result["diff"]
    # each file's part of the text, where the server says it is: a kernel cuts it exactly there
    parts = dict(zip(files, render.split_diff(result["diff"], result["files"]), strict=True))
    assert sum(f["diff_chars"] for f in result["files"]) == len(result["diff"])
    notes = dict(files["notes.txt"])
    assert notes.pop("diff_chars") == len(parts["notes.txt"])
    assert notes == {"path": "notes.txt", "status": "added", "additions": 2, "deletions": 0,
                     "binary": False, "size": 13, "truncated": False}
    assert parts["notes.txt"].startswith("diff --git a/notes.txt b/notes.txt\n")
    assert "+second" in parts["notes.txt"]
    assert parts["medium.txt"].endswith("# tabbi: the diff of medium.txt is cut here\n")
    assert files["blob.bin"]["binary"] is True
    assert (files["calc.py"]["status"], files["calc.py"]["additions"], files["calc.py"]["deletions"]) == \
        ("modified", 1, 1)
