"""Finding every process that belongs to a sandbox, wherever it has wandered.

Each sandbox process carries ``TABBI_SANDBOX_ID=<id>`` in its environment. A model-run shell
command can ``setsid`` and leave the process group, but not shed what it inherited, so scanning
``/proc`` for the marker finds stragglers that a process-group kill misses.
"""

from __future__ import annotations

import contextlib
import os
import signal

MARKER = "TABBI_SANDBOX_ID"


def sandbox_pids(sandbox_id: str) -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and carries_marker(int(e), sandbox_id)]


def kill_all(sandbox_id: str) -> None:
    for pid in sandbox_pids(sandbox_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), to tell a process from a later one that
    reuses its number; None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def carries_marker(pid: int, sandbox_id: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{MARKER}={sandbox_id}".encode() in f.read().split(b"\0")
    except OSError:
        return False
