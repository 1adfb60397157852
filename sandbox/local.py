"""The local sandbox provider: the embedded default, a subprocess on this machine.

Each sandbox lives in ``<root>/<sandbox_id>/`` with ``workspace/`` (the clone) and ``home/``
(OpenCode's HOME/XDG/TMPDIR). The bootstrap runs under bubblewrap where it works, as a plain
subprocess otherwise (see ``isolation``). Either way it is the leader of its own process group and
every process it starts carries the sandbox marker.

The sandbox folder is the agent's: it can put links, FIFOs or anything else anywhere in it, at any
moment. So the server never opens, follows or archives a path in it:
- the bootstrap's log and every other file the server writes live in server-only folders
  (``<log_root>/<sandbox_id>.log``, ``<snapshot_root>/<sandbox_id>/``) never bound into a sandbox,
  and are opened with ``O_NOFOLLOW | O_NONBLOCK`` all the same (a FIFO never blocks the server, a
  link is never written through);
- snapshots are made and restored by ``bootstrap.py snapshot`` / ``restore``, run confined like
  ``exec`` (a PID namespace of their own, the same bubblewrap fences; the snapshot one is a worker
  serving every snapshot of the sandbox, ``snapshot_worker``); the server only streams the
  archive between their pipes and its own store;
- the sandbox folder itself is only looked at with ``lstat`` of its direct children (the folder is
  the server's and cannot be replaced) and removed without following links (``destroy``);
- processes are started in the server's own folders (bubblewrap changes into the workspace inside
  the sandbox).
Unconfined sandboxes (isolation "none") run the same code as separate processes, but their agent
has the server user's rights: nothing above holds against it there, which is why credentials go
only to confined sandboxes.

By default a sandbox gets SIGKILL if the server dies. With ``detach=True`` it outlives a crashed
server instead (a server that stops cleanly still stops its sandboxes), and the next server process
re-attaches to it through ``load_state``, watching the process it did not start through a pidfd.
"""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import fcntl
import json
import logging
import os
import select
import shutil
import signal
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from traitlets import Bool, Enum, Float, Unicode, default

from . import isolation, processes, sealed, snapshot_store, snapshots
from .binary import OpenCodeNotFound, find_opencode
from .provider import (
    BOOTSTRAP_SCRIPT,
    Endpoint,
    ExecResult,
    PathTrait,
    ProgressCallback,
    RestoreError,
    Sandbox,
    SandboxError,
    SandboxProvider,
    SandboxSpec,
)
from .snapshot_store import SnapshotStore
from .snapshot_worker import SnapshotWorker, WorkerGone

log = logging.getLogger(__name__)

#: How the server opens the files it writes: never through a link, never blocking on a FIFO.
SAFE_WRITE = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _open_regular(path: Path, flags: int) -> int:
    """Open ``path`` with ``SAFE_WRITE | flags`` (mode 0600) and insist it is a regular file."""
    fd = os.open(path, SAFE_WRITE | flags, 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd


#: Seconds a stopping sandbox gives its snapshot worker to end by itself (then it is killed).
WORKER_STOP_GRACE = 2.0


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _die_with_parent() -> None:
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


#: util-linux's ``setpriv`` sets the parent-death signal and then execs the command. Using it
#: instead of a ``preexec_fn`` lets CPython start processes with vfork: a ``preexec_fn`` forces a
#: full fork of the server, whose cost grows with the server's memory and is paid on the event
#: loop (bench/bench_spawn.py: about 100x slower for a server of a few hundred MB).
SETPRIV = shutil.which("setpriv")


def _dying_with_parent(argv: list[str]) -> tuple[list[str], Any]:
    """``argv`` and the ``preexec_fn`` that make a process get SIGKILL when the server dies."""
    if SETPRIV:
        return [SETPRIV, "--pdeathsig", "KILL", "--", *argv], None
    return argv, _die_with_parent


async def _communicate_bounded(
    proc: asyncio.subprocess.Process, input: bytes | None, limit: int
) -> tuple[bytes, bytes]:
    """``communicate`` that keeps at most ``limit`` bytes of each stream and drains the rest."""

    async def drain(stream: asyncio.StreamReader | None) -> bytes:
        kept = bytearray()
        while stream is not None and (chunk := await stream.read(1 << 16)):
            kept += chunk[: max(0, limit - len(kept))]
        return bytes(kept)

    if input is not None and proc.stdin is not None:
        proc.stdin.write(input)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await proc.stdin.drain()
        proc.stdin.close()
    out, err = await asyncio.gather(drain(proc.stdout), drain(proc.stderr))
    await proc.wait()
    return out, err


async def _spawn(argv: list[str], die_with_parent: bool = True, **options: Any) -> asyncio.subprocess.Process:
    """Start a process as the leader of its own group, killed if the server dies (unless not
    ``die_with_parent``).

    Creation is shielded from cancellation: cancelling ``create_subprocess_exec`` midway can hang
    forever in CPython 3.11 (it waits for an exit the child watcher never reports), which froze
    server shutdown during a sandbox start. A cancelled caller still gets its cancellation, after
    the new process group is killed.
    """
    preexec = None
    if die_with_parent:
        argv, preexec = _dying_with_parent(argv)
    creation = asyncio.ensure_future(
        asyncio.create_subprocess_exec(*argv, start_new_session=True, preexec_fn=preexec, **options)
    )
    try:
        return await asyncio.shield(creation)
    except asyncio.CancelledError:
        proc = await creation
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise


class _Adopted:
    """The leader of a sandbox an earlier server process started: not our child, so its exit is
    watched through a pidfd (readable once the process has ended) instead of ``waitpid``."""

    def __init__(self, pid: int):
        self.pid = pid
        self._fd = os.pidfd_open(pid)
        self._exited: asyncio.Future[None] | None = None

    @property
    def returncode(self) -> int | None:
        """None while it runs; -1 once it has ended (its status went to its real parent)."""
        if self._exited is not None:
            return -1 if self._exited.done() else None
        readable, _, _ = select.select([self._fd], [], [], 0)
        return -1 if readable else None

    async def wait(self) -> int:
        if self._exited is None:
            loop = asyncio.get_running_loop()
            self._exited = loop.create_future()
            exited = self._exited

            def ended() -> None:
                loop.remove_reader(self._fd)
                os.close(self._fd)
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(self._fd, ended)
        await asyncio.shield(self._exited)
        return -1


#: How a sandbox runs the bootstrap: imported, not as a script, so that Python uses the bytecode
#: the server's own import of ``tabbi_sandbox.bootstrap`` cached beside it (the folder is bound
#: read-only: the agent cannot plant bytecode there). A script is compiled at every start,
#: ~15 ms of every exec (a pooled start's clone, a commit, a push) on a 2-core VM. ``sys.argv``
#: is as for the script (``-c``, then the arguments); the comment names the file in ``ps``.
BOOTSTRAP_LAUNCHER = (f"import sys; sys.path.insert(0, {str(BOOTSTRAP_SCRIPT.parent)!r}); import bootstrap; "
                      f"sys.exit(bootstrap.main())  # {BOOTSTRAP_SCRIPT}")


def cache_bootstrap_bytecode() -> None:
    """Bring the bootstrap's cached bytecode up to date (a no-op when it is), for
    ``BOOTSTRAP_LAUNCHER``: the server itself may never import the bootstrap, and a stale cache is
    ignored (recompiled at every exec). A folder this server cannot write (an installed package
    compiled at install) is left as it is."""
    with contextlib.suppress(OSError):
        compileall.compile_file(str(BOOTSTRAP_SCRIPT), quiet=2)


class LocalSandbox(Sandbox):
    #: Each exec is a bubblewrap of its own (its PID namespace, /tmp): the agent's processes,
    #: started before, cannot see it. (Unconfined, everything runs as the person anyway, and no
    #: credential is handed to the sandbox: see ``push.py``.)
    private_exec = True

    def __init__(self, provider: LocalProvider, sandbox_id: str, root: Path, confined: bool):
        self.provider = provider
        self.id = sandbox_id
        self.root = root
        self.workspace = root / "workspace"
        self.home = root / "home"
        self.workspace_path = str(self.workspace)
        self.home_path = str(self.home)
        self.confined = confined
        #: The bootstrap's log, in a server-only folder (never inside the sandbox).
        self.log_path = provider.log_root / f"{sandbox_id}.log"
        self.read_only: list[str] = []
        self.remote_paths: list[str] = []
        self._proc: asyncio.subprocess.Process | _Adopted | None = None
        self._endpoint: Endpoint | None = None
        self._reader: asyncio.Task | None = None
        #: The snapshot worker, started at the first snapshot or after a restore (``_worker``).
        self._snapshot_worker: asyncio.Task[SnapshotWorker] | None = None
        self._snapshot_lock = asyncio.Lock()

    # -- Sandbox interface -------------------------------------------------------------------
    def endpoint(self) -> Endpoint:
        if self._endpoint is None:
            raise SandboxError("the sandbox is not running")
        return self._endpoint

    def poll(self) -> int | None:
        if self._proc is None:
            return -1
        return self._proc.returncode

    async def wait(self) -> int:
        if self._proc is None:
            return -1
        return await self._proc.wait()

    async def exec(
        self, argv: list[str], timeout: float = 60, input: bytes | None = None, write_remote: bool = False,
        max_output: int | None = None,
    ) -> ExecResult:
        # Under bubblewrap every exec gets its own PID namespace: the agent's processes cannot
        # list it, nor read its environment or memory.
        cmd = self._confine(argv, cwd=str(self.workspace), write_remote=write_remote)
        proc = await _spawn(
            cmd,
            cwd=self._spawn_cwd(),
            env=self._env(),
            stdin=asyncio.subprocess.DEVNULL if input is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            if max_output is None:
                out, err = await asyncio.wait_for(proc.communicate(input), timeout)
            else:
                out, err = await asyncio.wait_for(_communicate_bounded(proc, input, max_output), timeout)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise SandboxError(f"{argv[0]} timed out after {timeout:.0f} s") from None
        return ExecResult(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))

    async def terminate(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.provider.stop_grace)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        await self._stop_snapshot_worker()
        # Whatever escaped the process group (setsid, double fork) still carries the marker.
        await asyncio.to_thread(processes.kill_all, self.id)
        if self._reader is not None:
            self._reader.cancel()
        self._endpoint = None

    def get_state(self) -> dict[str, Any]:
        pid = self._proc.pid if self._proc else None
        return {
            "provider": self.provider.name,
            "sandbox_id": self.id,
            "root": str(self.root),
            "pid": pid,
            "started": processes.start_time(pid) if pid else None,
            "port": int(self._endpoint.url.rsplit(":", 1)[1]) if self._endpoint else None,
            "confined": self.confined,
            "detached": self.provider.detach,
            "read_only": self.read_only,
            "remote_paths": self.remote_paths,
        }

    @classmethod
    def adopt(cls, provider: LocalProvider, state: dict[str, Any], password: str) -> LocalSandbox | None:
        """The sandbox ``state`` describes, if its leader still runs (the same process: same start
        time, carrying this sandbox's marker)."""
        pid, sandbox_id = state.get("pid"), str(state.get("sandbox_id", ""))
        if not (state.get("detached") and pid and state.get("port") and state.get("started")):
            return None
        root = provider.sandbox_root(sandbox_id)
        if processes.start_time(pid) != state["started"] or not processes.carries_marker(pid, sandbox_id):
            return None
        try:
            leader = _Adopted(pid)
        except OSError:  # ended just now
            return None
        sandbox = cls(provider, sandbox_id, root, bool(state.get("confined")))
        sandbox._proc = leader
        sandbox.read_only = list(state.get("read_only") or [])
        sandbox.remote_paths = list(state.get("remote_paths") or [])
        sandbox._endpoint = Endpoint(f"http://127.0.0.1:{int(state['port'])}", password)
        return sandbox

    # -- snapshots, made and unpacked inside the sandbox ------------------------------------
    async def _archive_process(
        self, command: str, stdin: int, stdout: int, stderr: int
    ) -> asyncio.subprocess.Process:
        """Start ``bootstrap.py snapshot|restore`` confined like ``exec`` (its own PID namespace),
        with the given standard descriptors."""
        request = json.dumps({"workspace": str(self.workspace), "home": str(self.home)})
        argv = self._confine(self.bootstrap_argv(command, request), cwd=str(self.root))
        return await _spawn(argv, cwd=str(self.root), env=self._env(), stdin=stdin, stdout=stdout,
                            stderr=stderr)

    async def _archive_command(
        self, command: str, stdin: int, stdout: int, timeout: float
    ) -> tuple[int, bytes, bytes]:
        """Run ``bootstrap.py restore`` with the given stdin and stdout (or pipes); return
        ``(status, stdout, stderr)``."""
        proc = await self._archive_process(command, stdin, stdout, asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except BaseException as exc:  # a timeout, or the caller gave up: nothing may go on
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.shield(proc.wait())
            if isinstance(exc, asyncio.TimeoutError):
                raise SandboxError(f"the {command} took longer than {timeout:.0f} s") from None
            raise
        return proc.returncode or 0, out or b"", err or b""

    async def write_snapshot(self, store: SnapshotStore, name: str, timeout: float) -> int:
        """Write this sandbox's snapshot ``name`` into ``store`` (a server-only folder), sending
        only what the store's newest snapshot does not hold; its size."""
        async with _held(store.lock()):
            cache = await asyncio.to_thread(store.cache)
            given = os.memfd_create("tabbi-snapshot-cache", os.MFD_CLOEXEC)
            os.write(given, cache)
            os.lseek(given, 0, os.SEEK_SET)
            read_end, write_end = _pipe()
            receiving = asyncio.ensure_future(asyncio.to_thread(_receive, store, read_end))
            try:
                try:
                    failed = await self._run_snapshot_worker(given, write_end, timeout)
                finally:
                    os.close(write_end)  # the stream ends when the worker closes its copy
                    os.close(given)
                try:
                    # The stream ends when every copy of its write end is closed: a worker that
                    # answered but kept its copy would hold the snapshot (and the store's lock).
                    pending = await asyncio.wait_for(asyncio.shield(receiving), timeout)
                except asyncio.TimeoutError:
                    await self._stop_snapshot_worker()
                    raise SandboxError(f"the snapshot stream did not end within {timeout:.0f} s") from None
                except snapshot_store.StoreError as exc:
                    if failed is None:
                        raise SandboxError(f"the snapshot could not be written: {exc}") from None
                if failed is not None:
                    raise SandboxError(f"the snapshot could not be written: {failed}")
                committing = asyncio.ensure_future(asyncio.to_thread(store.commit, name, pending))
                try:
                    size = await asyncio.shield(committing)
                except asyncio.CancelledError:  # not announced, so not kept: no manifest outlives it
                    await asyncio.wait([committing])
                    store.manifest_path(name).unlink(missing_ok=True)
                    raise
                log.info("tabbi: snapshot %s of %s: %d entries, %d files read, %d new blobs (%d bytes)",
                         name, self.id, len(pending.manifest["entries"]), len(pending.received),
                         len(pending.new_blobs), pending.bytes_written)
                return size
            finally:
                await asyncio.wait([receiving])
                if not receiving.cancelled():
                    receiving.exception()  # seen: a failed process's stream ends early, said above

    async def _run_snapshot_worker(self, cache_fd: int, stream_fd: int, timeout: float) -> str | None:
        """One snapshot by the sandbox's worker (``snapshot_worker``); None, or why it failed."""
        async with self._snapshot_lock:
            worker = await asyncio.shield(self._worker())
            try:
                return await worker.snapshot(cache_fd, stream_fd, timeout)
            except WorkerGone:  # ended since the last snapshot (killed, out of memory): anew
                self._snapshot_worker = None
            worker = await asyncio.shield(self._worker())
            return await worker.snapshot(cache_fd, stream_fd, timeout)

    def _worker(self) -> asyncio.Task[SnapshotWorker]:
        """The snapshot worker (being) started: the running one, else a new one. Started in the
        background after a restore, so that a resumed session's first snapshot does not pay it."""
        task = self._snapshot_worker
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None
                                             or not task.result().alive)):
            task = self._snapshot_worker = asyncio.ensure_future(SnapshotWorker.start(
                lambda channel: self._archive_process("snapshot", channel, asyncio.subprocess.DEVNULL,
                                                      asyncio.subprocess.DEVNULL)))
        return task

    async def _stop_snapshot_worker(self) -> None:
        task, self._snapshot_worker = self._snapshot_worker, None
        if task is not None:
            with contextlib.suppress(Exception):
                await (await asyncio.shield(task)).stop(grace=WORKER_STOP_GRACE)

    async def restore(self, store: SnapshotStore, name: str, timeout: float) -> None:
        """Unpack the snapshot ``name`` of ``store`` into this (not running) sandbox, all or
        nothing: a format-1 archive as it is, a manifest as the archive its blobs make."""
        async with _held(store.lock()):
            archive = store.archive_path(name)
            if not store.manifest_path(name).exists() and os.path.lexists(archive):
                try:
                    fd = os.open(archive, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError as exc:
                    raise RestoreError(f"the snapshot {name} cannot be read: {exc.strerror}") from None
                try:
                    answer = await self._restore_command(fd, timeout)
                finally:
                    os.close(fd)
                await asyncio.to_thread(_restored, name, *answer)
                return
            try:
                manifest = await asyncio.to_thread(store.check, name)
            except snapshot_store.StoreError as exc:
                raise RestoreError(f"the snapshot {name} could not be restored: {exc}") from None
            read_end, write_end = _pipe()
            rendering = asyncio.ensure_future(asyncio.to_thread(store.render, manifest, write_end))
            try:
                answer = await self._restore_command(read_end, timeout)
            finally:
                os.close(read_end)  # a restore process that ended early stops the rendering
                await asyncio.wait([rendering])
            try:
                rendering.result()
            except snapshot_store.StoreError as exc:  # the store's reason is the clearer one
                raise RestoreError(f"the snapshot {name} could not be restored: {exc}") from None
            except OSError:
                pass  # the restore process stopped reading: its own answer says why
            # An identity per restored file: megabytes of JSON, read off the event loop.
            files = (await asyncio.to_thread(_restored, name, *answer)).get("files")
            if store.folder.name == self.id:  # not another's (a warm snapshot is its builder's)
                try:
                    await asyncio.to_thread(store.remember_restore, name, files)
                except (snapshot_store.StoreError, OSError) as exc:  # only the next snapshot is slower
                    log.warning("tabbi: the identities of the files restored in %s are not kept: %s",
                                self.id, exc)

    async def _restore_command(self, fd: int, timeout: float) -> tuple[int, bytes, bytes]:
        try:
            return await self._archive_command("restore", fd, asyncio.subprocess.PIPE, timeout)
        except SandboxError as exc:
            raise RestoreError(str(exc)) from None

    # -- internals --------------------------------------------------------------------------
    def _spawn_cwd(self) -> str:
        """Where a sandbox process starts: a folder of the server's when confined (bubblewrap
        then changes into the workspace inside the sandbox); the workspace itself otherwise."""
        return str(self.root) if self.confined else str(self.workspace)

    def _env(self) -> dict[str, str]:
        """The bootstrap's environment: nothing of the server's (which may hold tokens)."""
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(self.home),
            processes.MARKER: self.id,
        }

    def bootstrap_argv(self, *args: str) -> list[str]:
        return [os.path.realpath(sys.executable), "-I", "-S", "-c", BOOTSTRAP_LAUNCHER, *args]

    def _confine(
        self, argv: list[str], cwd: str, write_remote: bool = False, die_with_parent: bool = True
    ) -> list[str]:
        if not self.confined:
            return argv
        writable = [str(self.root), *(self.remote_paths if write_remote else [])]
        return isolation.wrap(
            argv,
            writable=writable,
            read_only=[p for p in self.read_only if p not in writable],
            cwd=cwd,
            die_with_parent=die_with_parent,
        )

    def prepare(self, spec: SandboxSpec, opencode_bin: str) -> None:
        """What the sandbox's processes may read (and, to push, write) of the host."""
        self.read_only = [
            str(BOOTSTRAP_SCRIPT.parent),
            os.path.dirname(opencode_bin),
            os.path.dirname(os.path.realpath(sys.executable)),
            *spec.read_only_paths,
        ]
        self.remote_paths = list(spec.read_only_paths)

    async def start(self, spec: SandboxSpec, progress: ProgressCallback, opencode_bin: str) -> None:
        """Run the bootstrap (which makes the home and the workspace) and wait for OpenCode."""
        payload = {
            "workspace": str(self.workspace),
            "home": str(self.home),
            "repo_url": spec.repo_url,
            "repo_display": spec.repo_display,
            "base_branch": spec.base_branch,
            "branch": spec.work_branch,
            "git_identity": {"name": spec.git_name, "email": spec.git_email},
            "git_credential": spec.git_credential,
            "marker": self.id,
            "health_timeout": self.provider.start_timeout,
            "max_seconds": spec.max_seconds if self.provider.detach else None,
            "environment": spec.environment,
            "opencode": {
                "bin": opencode_bin,
                "password": spec.password,
                "config": spec.opencode_config,
            },
        }
        argv = self.bootstrap_argv()
        cwd = str(self.root)
        log_fd = _open_regular(self.log_path, os.O_APPEND)
        try:
            detach = self.provider.detach
            self._proc = await _spawn(
                self._confine(argv, cwd=cwd, die_with_parent=not detach),
                die_with_parent=not detach,
                cwd=cwd,
                env=self._env(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_fd,
            )
        finally:
            os.close(log_fd)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(payload).encode())
        await self._proc.stdin.drain()
        self._proc.stdin.close()
        try:
            ready = await asyncio.wait_for(self._read_until_ready(progress), self.provider.start_timeout)
        except asyncio.TimeoutError:
            await self.terminate()
            raise SandboxError(
                f"the sandbox did not become ready within {self.provider.start_timeout:.0f} s"
            ) from None
        except BaseException:
            await self.terminate()
            raise
        self._endpoint = Endpoint(f"http://127.0.0.1:{ready['port']}", spec.password)
        # Keep draining stdout so the bootstrap never blocks on a full pipe.
        self._reader = asyncio.create_task(self._drain())

    async def _read_until_ready(self, progress: ProgressCallback) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        while True:
            line = await self._proc.stdout.readline()
            if not line:
                code = await self._proc.wait()
                raise SandboxError(
                    f"the sandbox exited during start-up (status {code}); see {self.log_path}"
                )
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("phase") == "failed":
                await self._proc.wait()
                raise SandboxError(message.get("error") or "the sandbox failed to start")
            await progress(message)
            if message.get("phase") == "ready":
                return message

    async def _drain(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while await self._proc.stdout.readline():
            pass


class LocalProvider(SandboxProvider):
    """Sandboxes as local processes (under bubblewrap where it works) in folders under ``root``."""

    name = "local"

    root = PathTrait(help="Folder holding one folder per sandbox. Default: DATA_DIR/sandboxes.").tag(
        config=True
    )
    snapshot_root = PathTrait(
        help="Where snapshot archives are kept, never bound into a sandbox. Default: beside root, "
        "'snapshots'."
    ).tag(config=True)
    log_root = PathTrait(
        help="Where the bootstraps' logs are written, never bound into a sandbox. Default: beside "
        "root, 'logs'."
    ).tag(config=True)
    isolation = Enum(
        ["auto", "bwrap", "none"],
        default_value="auto",
        help="'bwrap' requires bubblewrap, 'none' runs plain subprocesses (the agent then has the "
        "server user's rights, so no credential is handed to it), 'auto' uses bubblewrap where it "
        "works. Also settable as TabbiExtension.isolation.",
    ).tag(config=True)
    opencode_bin = Unicode(
        None,
        allow_none=True,
        help="Path of the OpenCode binary. Unset: TABBI_OPENCODE_BIN, then 'opencode' on PATH, then "
        "the project's pinned install. Also settable as TabbiExtension.opencode_bin.",
    ).tag(config=True)
    start_timeout = Float(90.0, help="Seconds a sandbox may take to become ready.").tag(config=True)
    stop_grace = Float(5.0, help="Seconds between SIGTERM and SIGKILL when a sandbox stops.").tag(
        config=True
    )
    detach = Bool(
        False,
        help="Sandboxes outlive a crashed server and the next server re-attaches to them. Also "
        "settable as TabbiExtension.detach_sandboxes.",
    ).tag(config=True)
    snapshot_timeout = Float(900.0, help="Seconds a snapshot or a restore may take.").tag(config=True)

    def __init__(self, root: str | os.PathLike | None = None, **kwargs: Any):
        if root is not None:
            kwargs["root"] = root
        super().__init__(**kwargs)
        cache_bootstrap_bytecode()

    @default("snapshot_root")
    def _snapshot_root_default(self) -> Path:
        return self.root.parent / "snapshots"

    @default("log_root")
    def _log_root_default(self) -> Path:
        return self.root.parent / "logs"

    def sandbox_root(self, sandbox_id: str) -> Path:
        if not sandbox_id.replace("-", "").isalnum():
            raise SandboxError(f"invalid sandbox id {sandbox_id!r}")
        return self.root / sandbox_id

    async def create(
        self, spec: SandboxSpec, progress: ProgressCallback, restore: dict[str, Any] | None = None
    ) -> LocalSandbox:
        opencode_bin = await asyncio.to_thread(sealed.execute_only, find_opencode(self.opencode_bin))
        confined = await asyncio.to_thread(isolation.choose, self.isolation)
        root = self.sandbox_root(spec.sandbox_id)
        _private_dir(self.root)
        _private_dir(self.log_root)
        with contextlib.suppress(FileExistsError):
            root.mkdir(mode=0o700)  # the server's folder: the agent may write in it, not replace it
        sandbox = LocalSandbox(self, spec.sandbox_id, root, confined)
        sandbox.prepare(spec, opencode_bin)
        # Its direct child, looked at without following it: a workspace that exists is newer
        # than any snapshot (a restore puts it in place last, complete).
        if restore is not None and not _is_dir(root / snapshots.WORKSPACE):
            await progress({"phase": "restoring"})
            await sandbox.restore(self._store(restore), self._name(restore), self.snapshot_timeout)
        await sandbox.start(spec, progress, opencode_bin)
        if restore is not None:
            # Started now, in the background, so a resumed session's first snapshot does not pay
            # it (and a start that failed leaves no worker behind).
            sandbox._worker()
        return sandbox

    async def confines(self) -> bool:
        return await asyncio.to_thread(isolation.choose, self.isolation)

    # -- warm sandboxes ---------------------------------------------------------------------------
    def warm_unsupported(self) -> str | None:
        if self.detach:
            return ("warm sandboxes die with this server, and detach_sandboxes asks sandboxes to "
                    "outlive it")
        return None


    async def clone_url(self, sandbox: Sandbox, spec: SandboxSpec) -> str:
        """A local repository is bound read-only for the clone (and writable for a push), as in
        ``create``; the agent's own processes, started before, do not see it."""
        assert isinstance(sandbox, LocalSandbox)
        sandbox.read_only += [p for p in spec.read_only_paths if p not in sandbox.read_only]
        sandbox.remote_paths = list(spec.read_only_paths)
        return spec.repo_url

    def memory_held(self, sandbox: Sandbox) -> int | None:
        """The resident memory of every process carrying the sandbox's marker."""
        return sum(_resident_bytes(pid) for pid in processes.sandbox_pids(sandbox.id))

    @property
    def survives_restart(self) -> bool:
        return self.detach

    async def load_state(self, state: dict[str, Any], password: str | None = None) -> LocalSandbox | None:
        """The live sandbox ``state`` describes; anything else still carrying its marker (a
        detached sandbox that was starting when the server died) is an orphan and is killed."""
        sandbox_id = str(state.get("sandbox_id") or "")
        if not sandbox_id:
            return None
        adopted = None
        if state.get("provider") == self.name:
            adopted = LocalSandbox.adopt(self, state, password or "")
        if adopted is None:
            await asyncio.to_thread(processes.kill_all, sandbox_id)
        return adopted

    async def destroy(self, sandbox_id: str) -> None:
        root = self.sandbox_root(sandbox_id)
        await asyncio.to_thread(processes.kill_all, sandbox_id)
        await asyncio.to_thread(_remove_sandbox_folder, root)
        (self.log_root / f"{root.name}.log").unlink(missing_ok=True)

    # -- snapshots: a content-addressed store under snapshot_root/<sandbox id>/ (snapshot_store) --
    async def snapshot(self, sandbox: Sandbox, name: str) -> tuple[dict[str, Any], int]:
        assert isinstance(sandbox, LocalSandbox)
        if not snapshot_store.NAME.fullmatch(name):
            raise SandboxError(f"invalid snapshot name {name!r}")
        ref = {"provider": self.name, "sandbox_id": sandbox.id, "name": name}
        try:
            size = await sandbox.write_snapshot(self._store(ref), name, self.snapshot_timeout)
        except OSError as exc:
            raise SandboxError(f"the snapshot could not be written: {exc.strerror or exc}") from None
        return ref, size

    def _store(self, ref: dict[str, Any]) -> SnapshotStore:
        return SnapshotStore(self.snapshot_root / self.sandbox_root(str(ref.get("sandbox_id", ""))).name)

    def _name(self, ref: dict[str, Any]) -> str:
        name = str(ref.get("name", ""))
        if not snapshot_store.NAME.fullmatch(name):
            raise SandboxError(f"invalid snapshot reference {ref!r}")
        return name

    def _archive(self, ref: dict[str, Any]) -> Path:
        """The file that stands for snapshot ``ref``: its manifest, or its format-1 archive."""
        store, name = self._store(ref), self._name(ref)
        archive = store.archive_path(name)
        manifest = store.manifest_path(name)
        return archive if archive.exists() and not manifest.exists() else manifest

    async def delete_snapshot(self, ref: dict[str, Any]) -> None:
        await asyncio.to_thread(self._store(ref).delete, self._name(ref))

    def check(self) -> dict[str, Any]:
        """Bubblewrap as configured, and the OpenCode binary every sandbox runs."""
        ok, why = isolation.bwrap_works()
        confined = ok and self.isolation != "none"
        try:
            opencode: dict[str, Any] = {"found": True, "path": find_opencode(self.opencode_bin)}
        except OpenCodeNotFound as exc:
            opencode = {"found": False, "detail": str(exc)}
        usable = (confined or self.isolation != "bwrap") and opencode["found"]
        return {"usable": usable, "isolation": "bwrap" if confined else "none", "detail": why,
                "opencode": opencode}


def _receive(store: SnapshotStore, fd: int) -> snapshot_store.Pending:
    """Receive a snapshot stream, closing its end when done: a receive that fails early stops
    the snapshot process at once (its next write fails) rather than at the timeout."""
    try:
        return store.receive(fd)
    finally:
        os.close(fd)


def _pipe() -> tuple[int, int]:
    """A pipe for a snapshot stream, with a 1 MiB buffer where the system allows (fewer switches
    between the two processes than the default 64 KiB)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, snapshots.CHUNK)
    return read_end, write_end


@contextlib.asynccontextmanager
async def _held(lock: snapshot_store.StoreLock) -> AsyncIterator[None]:
    """Hold ``lock``, taken in a thread (it may wait for a sweep); a caller cancelled while it
    waits still releases it once taken."""
    taking = asyncio.ensure_future(asyncio.to_thread(lock.acquire))
    try:
        await asyncio.shield(taking)
    except asyncio.CancelledError:
        taking.add_done_callback(lambda _: lock.release())
        raise
    try:
        yield
    finally:
        lock.release()


def _restored(name: str, status: int, out: bytes, err: bytes) -> dict[str, Any]:
    """The restore process's answer; ``RestoreError`` unless it says it restored the snapshot."""
    try:
        answer = json.loads(_last_line(out) or "{}")
    except ValueError:
        answer = {}
    if not isinstance(answer, dict):
        answer = {}
    if status != 0 or "restored" not in answer:
        why = answer.get("error") or _last_line(err) or f"status {status}"
        raise RestoreError(f"the snapshot {name} could not be restored: {why}")
    return answer
def _resident_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (``VmRSS``), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _last_line(data: bytes) -> str:
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


def _is_dir(path: Path) -> bool:
    """Whether ``path`` is a folder itself (not a link to one)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _remove_sandbox_folder(root: Path) -> None:
    """Remove a sandbox's folder (its processes are gone) without following any link in it,
    read-only folders included."""
    try:
        parent = os.open(root.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        snapshots.remove_tree(parent, root.name)
    except OSError:
        log.warning("tabbi: could not remove all of %s", root, exc_info=True)
        shutil.rmtree(root, ignore_errors=True)  # symlink-safe; whatever it can
    finally:
        os.close(parent)
