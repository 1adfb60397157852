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
    needle = f"{MARKER}={sandbox_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def kill_all(sandbox_id: str) -> None:
    for pid in sandbox_pids(sandbox_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
