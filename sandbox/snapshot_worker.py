"""The server's end of a sandbox's snapshot worker (``bootstrap.py snapshot``).

Why a worker: a snapshot is taken after every turn, and a confined process started for each one
paid bubblewrap, the interpreter and its imports every time (0.1 s on an idle 2-core VM, over
1 s under load), far more than the work of a snapshot after a one-file change (a walk that
stats every file, one file and the database copy hashed). The worker is started, confined like
any sandbox process, at the sandbox's first snapshot and serves every later one, until the
sandbox stops. Each snapshot hands it, over a Unix socket (``SCM_RIGHTS``), the previous
snapshot's cache and a fresh pipe into the store; the stream ends when the worker closes the
pipe, and the store checks it exactly as it checked the stream of a one-shot process.

Threats (the worker runs as the agent's user, in the agent's files, for as long as the sandbox):
- the agent reaching the worker: under bubblewrap the worker has its own PID namespace (its
  own ``bwrap``, like every ``exec``), so the agent's processes cannot list, signal or ptrace
  it, and it is non-dumpable (``bootstrap.main``); its socket and pipes are never in a path
  the agent can open. Without isolation (``isolation = "none"``) the agent could, as it can the
  server itself: nothing new;
- the agent feeding the worker hostile files (links, FIFOs, swaps mid-walk): the same code as
  a one-shot process (``snapshots.write_snapshot``), with the same guards; a worker that hangs
  is killed at the snapshot timeout and the next snapshot starts a new one;
- a worker that lies (compromised by some bug, so for every later snapshot of the sandbox):
  what it says is untrusted, as a one-shot process's was. The store takes only a well-formed
  stream whose bytes match their digests and whose manifest names only blobs of this sandbox's
  own store; a lie can misstate only the sandbox's own files, which the agent can change anyway;
  its answer on the socket is read bounded and only as a status;
- memory: one idle Python process per sandbox that has taken a snapshot (about 28 MB resident
  with its two bubblewrap processes, measured),
  ended with the sandbox (its socket closes; it also carries the sandbox's marker).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from collections.abc import Awaitable, Callable

from .provider import SandboxError

#: The largest answer read from the worker (a status line).
ANSWER_LIMIT = 1 << 16
#: Seconds a worker may take to start (bubblewrap, the interpreter, its imports).
START_TIMEOUT = 120.0


class WorkerGone(SandboxError):
    """The worker had ended before it took the request (nothing was written): start another."""

    def __init__(self) -> None:
        super().__init__("the snapshot worker had ended")


class SnapshotWorker:
    """A running worker: its process (leader of its own group) and the server's end of its socket."""

    def __init__(self, proc: asyncio.subprocess.Process, channel: socket.socket):
        self.proc = proc
        self.channel = channel

    @classmethod
    async def start(cls, spawn: Callable[[int], Awaitable[asyncio.subprocess.Process]]) -> SnapshotWorker:
        """Start a worker with ``spawn`` (given the descriptor to make its stdin); return once it
        says it is ready (its imports done, so that a worker started ahead saves all of that)."""
        server_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = await spawn(worker_end.fileno())
        except BaseException:
            server_end.close()
            raise
        finally:
            worker_end.close()
        server_end.setblocking(False)
        worker = cls(proc, server_end)
        try:
            said = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(server_end, ANSWER_LIMIT),
                                          START_TIMEOUT)
        except BaseException as exc:
            await worker.stop()
            if isinstance(exc, asyncio.TimeoutError):
                raise SandboxError(f"the snapshot worker did not start in {START_TIMEOUT:.0f} s") from None
            raise
        if said != b'{"ready": true}':
            await worker.stop()
            raise SandboxError("the snapshot worker did not start")
        return worker

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and self.channel.fileno() != -1

    async def snapshot(self, cache_fd: int, stream_fd: int, timeout: float) -> str | None:
        """Have the worker write one snapshot stream into ``stream_fd`` (the caller closes its
        copy), reading the cache from ``cache_fd``: None when it says it did, else why not. A
        timeout, or a caller giving up, ends the worker (the next snapshot starts another);
        ``WorkerGone`` if it had ended before."""
        loop = asyncio.get_running_loop()
        try:
            socket.send_fds(self.channel, [b"snapshot"], [cache_fd, stream_fd])
        except OSError:
            await self.stop()
            raise WorkerGone() from None
        try:
            answer = await asyncio.wait_for(loop.sock_recv(self.channel, ANSWER_LIMIT), timeout)
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, asyncio.TimeoutError):
                raise SandboxError(f"the snapshot took longer than {timeout:.0f} s") from None
            if isinstance(exc, OSError):
                return f"the snapshot worker is gone ({exc.strerror or exc})"
            raise
        if not answer:
            await self.stop()
            return "the snapshot worker ended"
        try:
            said = json.loads(answer)
        except ValueError:
            said = None
        if isinstance(said, dict) and type(said.get("entries")) is int:
            return None
        why = said.get("error") if isinstance(said, dict) else None
        return str(why)[:1000] if why else "the snapshot worker gave no answer"

    async def stop(self, grace: float = 0) -> None:
        """End the worker. With ``grace``: the end of its socket ends its loop, and the worker is
        waited for (bubblewrap ends once everything in the worker's PID namespace has), killed
        only if it has not ended within ``grace`` seconds. Without: killed at once; its process
        inside the namespace (a session of its own, out of the group killed) ends right after,
        when bubblewrap's end tears the namespace down."""
        with contextlib.suppress(OSError):
            self.channel.shutdown(socket.SHUT_RDWR)  # a receive still pending gets its end too
        try:
            if grace:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.proc.wait()), grace)
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            await asyncio.shield(self.proc.wait())
        finally:
            self.channel.close()
