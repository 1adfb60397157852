"""How the local provider starts processes: they die with the server, and starting one does not
fork the whole server (a ``preexec_fn`` would; see ``sandbox/local.py`` ``SETPRIV``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tabbi_sandbox import local
from tests.support.waiting import wait_exited

#: A server that starts a long-running child through ``_spawn``, prints the child's pid, and waits.
SERVER = textwrap.dedent("""
    import asyncio, sys
    from tabbi_sandbox import local

    async def main():
        proc = await local._spawn(["sleep", "600"])
        print(proc.pid, flush=True)
        await asyncio.Event().wait()  # until the test kills this process

    asyncio.run(main())
""")


def _alive(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return [] if stat.read().split(") ")[1].startswith("Z") else [pid]
    except FileNotFoundError:
        return []


def test_a_spawned_process_dies_with_its_server():
    """Threat: a crashed server leaves sandboxes (an agent with a shell and the gateway's address)
    running with nobody watching them. The parent-death signal must survive the switch from
    ``preexec_fn`` to ``setpriv``."""
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        child = int(server.stdout.readline())
        assert _alive(child)
    finally:
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
    wait_exited(lambda: _alive(child), 30, "the child dying with its server")


@pytest.mark.skipif(local.SETPRIV is None, reason="util-linux setpriv is not installed")
def test_the_parent_death_signal_needs_no_preexec_fn():
    """With ``setpriv`` on the machine, no ``preexec_fn`` is used (it would force a fork of the
    whole server on the event loop for every process a sandbox starts)."""
    argv, preexec = local._dying_with_parent(["bwrap", "--", "true"])
    assert preexec is None
    assert argv[:4] == [local.SETPRIV, "--pdeathsig", "KILL", "--"] and argv[4:] == ["bwrap", "--", "true"]
