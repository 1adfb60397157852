"""Waiting on other processes with a deadline, woken by the kernel rather than by a timer.

A process's exit is signalled through a pidfd (readable once the process has ended); a line in
another process's output arrives through a pipe (see ``server.OutputWatch``). Nothing here sleeps.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable


def wait_exited(pids_of: Callable[[], list[int]], timeout: float, what: str) -> None:
    """Until ``pids_of()`` finds no process: wait for the ones it finds to end, then ask again
    (a process may have started meanwhile). Fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while pids := pids_of():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{what} not within {timeout} s (still running: {pids})")
        fds = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                fds.append(os.pidfd_open(pid))
        try:
            if fds:
                select.select(fds, [], [], remaining)  # returns as soon as one of them ends
        finally:
            for fd in fds:
                os.close(fd)
