"""A repository's setup script (``.tabbi/setup.sh``), run INSIDE the sandbox after the clone.

The script is repository content: whoever can push to the repository writes it, so it is treated
like the agent (an attacker with a shell). It runs in the sandbox, as the sandbox's user, with the
environment the agent gets (``bootstrap.base_env``: the sandbox home, a fixed PATH) and nothing
else: no GitHub token (the clone's credential lived only in the clone's git process and is gone
before the script starts), no OpenCode password (it is not started yet, and its spec is only in
the memory of the bootstrap, which is non-dumpable), no model key (those never enter a sandbox).
It may use the network (``pip install``), like the agent.

This module is standard-library only and is loaded by ``bootstrap.py`` from beside itself (like
``snapshots.py``), so it runs as is in bubblewrap and in Modal's image.

Its output is streamed line by line to a callback (the bootstrap turns each line into a progress
message), and the last lines are kept for the error when it fails or runs out of time. On a
timeout the whole process group is killed: a script that forks a server in the background cannot
keep the start waiting.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable

#: Where a repository keeps its setup script, relative to the workspace.
SCRIPT = ".tabbi/setup.sh"

#: How many of the script's last output lines an error shows.
TAIL_LINES = 15

#: Longest output line passed on as progress (a progress bar can be one huge line).
MAX_LINE = 400


class SetupError(Exception):
    """The setup script failed or ran out of time; the message holds its last output lines."""


def present(workspace: str) -> bool:
    """Whether the workspace has a setup script: a regular file (a link could point at anything
    of the sandbox; it is refused in ``run``, so it counts as present here)."""
    return os.path.lexists(os.path.join(workspace, SCRIPT))


def run(workspace: str, env: dict[str, str], timeout: float, on_line: Callable[[str], None]) -> float:
    """Run the setup script in ``workspace`` with exactly ``env``; return the seconds it took.
    Raise ``SetupError`` with its last lines when it exits non-zero or exceeds ``timeout``."""
    path = os.path.join(workspace, SCRIPT)
    if os.path.islink(path) or not os.path.isfile(path):
        raise SetupError(f"{SCRIPT} must be a regular file in the repository (not a link or a folder)")
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        ["/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh", SCRIPT],
        cwd=workspace,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: a timeout ends all it started
    )
    assert proc.stdout is not None
    deadline = started + timeout
    pending = b""
    timed_out = False
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([proc.stdout], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                _pass_on(raw, tail, on_line)
        if pending:
            _pass_on(pending, tail, on_line)
    finally:
        if timed_out:
            _kill_group(proc)
        proc.stdout.close()
    try:
        status = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # output closed but the script still runs
        timed_out = True
        _kill_group(proc)
        status = proc.wait()
    _kill_group(proc)  # nothing it started in the background outlives it into the agent's time
    shown = "\n".join(tail) or "(no output)"
    if timed_out:
        raise SetupError(f"{SCRIPT} did not finish within {timeout:.0f} s; its last output:\n{shown}")
    if status != 0:
        raise SetupError(f"{SCRIPT} failed with exit status {status}; its last output:\n{shown}")
    return round(time.monotonic() - started, 3)


def _pass_on(raw: bytes, tail: deque[str], on_line: Callable[[str], None]) -> None:
    line = raw.decode(errors="replace").rstrip("\r")[:MAX_LINE]
    tail.append(line)
    on_line(line)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
