"""The stand-in's sandboxes: one bubblewrap container per sandbox, execs forked inside it.

Each sandbox is a folder on the host (``<data>/sandboxes/<id>/fs``) bound as the container's
root, writable, with the host's system folders bound read-only over it (the helpers of
``tabbi_sandbox.isolation``), its own PID, IPC, UTS and network namespaces and no capabilities.
Absolute paths such as ``/workspace`` or ``/root`` therefore work, and nothing of the host's
``/work``, the stand-in's data or the test's files is visible. The first process is the agent
(``agent.py``); the entrypoint and every exec are its children, so an exec shares the container
with the entrypoint and with every other exec, as on Modal (where the agent being able to see
and signal a push's process is the realistic threat).

The network namespace has only a loopback: tunnels reach a sandbox port through a connection
the agent opens inside, and the sandbox reaches "the internet" only through the host ports the
stand-in is told to forward (``internet_ports``: for example the LLM or GitHub stand-ins),
which appear inside at the same 127.0.0.1 port. ``block_network=True`` forwards none.

Lifecycle: the sandbox ends when its entrypoint exits (result SUCCESS or FAILURE with the exit
code), when terminated (TERMINATED), or at its ``timeout`` or ``idle_timeout`` (TIMEOUT). Idle
means, as Modal documents it: no exec running, no stdin written, no open tunnel connection.
Ending kills every process of the container at once (it is one PID namespace).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from modal_proto import api_pb2

from tabbi_sandbox import isolation

from .ids import new_sandbox_id, new_task_id
from .images import DEFAULT_DIRS, IMAGE_USR, SYSTEM_TOP, Image, Store, copy_tree

log = logging.getLogger("modal_standin")

AGENT = Path(__file__).with_name("agent.py")
AGENT_IN_SANDBOX = "/__modal/standin-agent.py"
SANDBOX_PYTHON = "/usr/bin/python3"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CHUNK = 64 * 1024
#: What root in a container may do (a subset of Docker's defaults: no MKNOD, no NET_RAW), given
#: only when the stand-in has users: root's execs then drop to them with ``setpriv``/``su``.
ROOT_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_SETUID", "CAP_SETGID", "CAP_KILL")
Result = api_pb2.GenericResult


class Output:
    """Everything one stream of a process wrote, readable from any byte offset, any number of times."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self._changed = asyncio.Event()

    def append(self, chunk: bytes) -> None:
        self.data += chunk
        self._wake()

    def close(self) -> None:
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def read_from(self, offset: int) -> AsyncIterator[tuple[int, bytes]]:
        """(offset, non-empty chunk) from ``offset`` until the stream ends."""
        while True:
            if offset < len(self.data):
                chunk = bytes(self.data[offset : offset + CHUNK])
                yield offset, chunk
                offset += len(chunk)
                continue
            if self.eof:
                return
            await self._changed.wait()

    async def pump(self, fd: int) -> None:
        """Copy a pipe into this output until its writers are gone."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=CHUNK)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
        try:
            while chunk := await reader.read(CHUNK):
                self.append(chunk)
        finally:
            transport.close()
            self.close()


@dataclass
class Process:
    """An exec (or the entrypoint) inside a sandbox."""

    exec_id: str
    argv: list[str]
    stdout: Output = field(default_factory=Output)
    stderr: Output = field(default_factory=Output)
    stdin: asyncio.StreamWriter | None = None
    stdin_offset: int = 0
    stdin_closed: bool = False
    returncode: int | None = None  # negative: killed by that signal
    done: asyncio.Event = field(default_factory=asyncio.Event)
    pumps: list[asyncio.Task] = field(default_factory=list)
    counts: bool = True  # keeps the sandbox from being idle while it runs

    def finish(self, returncode: int) -> None:
        if self.returncode is None:
            self.returncode = returncode
        self.done.set()


class SandboxGone(Exception):
    """The sandbox has ended (or never started): the caller answers NOT_FOUND."""


class Sandbox:
    def __init__(
        self,
        *,
        app_id: str,
        definition: api_pb2.Sandbox,
        image: Image,
        env: dict[str, str],
        tags: dict[str, str],
        root: Path,
        created_at: float,
        internet_ports: list[int],
        installed: dict[str, str],
        users: dict[str, int],
        etc: dict[str, str],
        on_end: Callable[[Sandbox], None],
    ) -> None:
        self.sandbox_id = new_sandbox_id()
        self.task_id = new_task_id()
        self.app_id = app_id
        self.definition = definition
        self.image = image
        self.env = env
        self.tags = tags
        self.created_at = created_at
        self.dir = root / self.sandbox_id
        self.fs = self.dir / "fs"
        self.result: Result | None = None
        self.ended = asyncio.Event()
        self.ready = asyncio.Event()
        self.processes: dict[str, Process] = {}
        self.tunnels: dict[int, tuple[str, int]] = {}  # container port -> (host, port)
        self.internet_ports = [] if self.blocked else list(internet_ports)
        self.installed = dict(installed)
        self.users = dict(users)
        self._etc = dict(etc)
        self._on_end = on_end
        self._bwrap: asyncio.subprocess.Process | None = None
        self._channel: socket.socket | None = None
        self._pending: dict[str, asyncio.Future] = {}
        self._ids = itertools.count()
        self._timers: list[asyncio.TimerHandle] = []
        self._idle_timer: asyncio.TimerHandle | None = None
        self._active = 0
        self._tasks: set[asyncio.Task] = set()
        self._files = asyncio.Lock()  # laying out, snapshotting and removing the root folder
        self.last_active = time.monotonic()

    # -- facts ------------------------------------------------------------------------------------

    @property
    def blocked(self) -> bool:
        return self.definition.network_access.network_access_type == api_pb2.NetworkAccess.BLOCKED

    @property
    def running(self) -> bool:
        return self.result is None

    @property
    def workdir(self) -> str:
        return self.definition.workdir or self.image.workdir or "/"

    def info(self) -> api_pb2.SandboxInfo:
        return api_pb2.SandboxInfo(
            id=self.sandbox_id,
            created_at=self.created_at,
            app_id=self.app_id,
            image_id=self.image.image_id,
            name=self.definition.name,
            tags=[api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in self.tags.items()],
            timeout_secs=self.definition.timeout_secs,
            idle_timeout_secs=self.definition.idle_timeout_secs,
            task_info=api_pb2.TaskInfo(
                id=self.task_id, sandbox_id=self.sandbox_id, started_at=self.created_at, result=self.result
            ),
            metadata=self.handle_metadata(),
        )

    def handle_metadata(self) -> api_pb2.SandboxHandleMetadata:
        return api_pb2.SandboxHandleMetadata(app_id=self.app_id, result=self.result)

    # -- start ------------------------------------------------------------------------------------

    async def start(self, store: Store) -> None:
        """Lay out the root folder and start the container with its agent and entrypoint."""
        async with self._files:
            await asyncio.to_thread(self._lay_out, store)
        if not self.running:  # terminated while its files were being laid out
            raise SandboxGone(self.sandbox_id)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with open(self.dir / "bwrap.log", "wb") as errors:
                self._bwrap = await asyncio.create_subprocess_exec(
                    *self._bwrap_argv(child.fileno()),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=errors,
                    pass_fds=(child.fileno(),),
                    env=self._container_env(),
                )
        finally:
            child.close()
        parent.setblocking(False)
        self._channel = parent
        asyncio.get_running_loop().add_reader(parent.fileno(), self._on_message)
        self._spawn(self._watch_container())
        for port in self.internet_ports:
            self._send({"op": "forward", "port": port})
        if self.definition.timeout_secs:
            self._later(self.definition.timeout_secs, self.end, Result.GENERIC_STATUS_TIMEOUT)
        if self.definition.entrypoint_args:
            args = list(self.definition.entrypoint_args)
            main = await self.exec("main", args, {}, self.workdir, counts=False)
            self._spawn(self._entrypoint_exit(main))
        self._spawn(self._probe())
        self._arm_idle()

    def _lay_out(self, store: Store) -> None:
        self.dir.mkdir(parents=True)
        copy_tree(self.image.files, self.fs)
        for mount_id in self.definition.mount_ids:
            store.materialize_mount(mount_id, self.fs)
        for name in DEFAULT_DIRS:
            (self.fs / name).mkdir(parents=True, exist_ok=True)
        os.chmod(self.fs / "tmp", 0o1777)
        for name, uid in self.users.items():
            home = self.fs / "home" / name
            if not home.exists():
                home.mkdir(parents=True)
                os.chown(home, uid, uid)
        workdir = self.workdir.strip("/").split("/")[0]
        if workdir and workdir not in SYSTEM_TOP:
            (self.fs / self.workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)

    def _bwrap_argv(self, fd: int) -> list[str]:
        bwrap = isolation.bwrap_path()
        if bwrap is None:
            raise RuntimeError("the modal stand-in needs bubblewrap (Debian package 'bubblewrap')")
        return [
            bwrap,
            "--die-with-parent",
            "--new-session",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-net",
            "--unshare-cgroup-try",
            "--hostname",
            "modal",
            "--cap-drop",
            "ALL",
            *[arg for cap in (ROOT_CAPS if self.users else ()) for arg in ("--cap-add", cap)],
            "--bind",
            str(self.fs),
            "/",
            *self._system_args(),
            "--bind",
            str(self.fs / IMAGE_USR),
            "/usr/local",
            *[arg for path, host in self.installed.items() for arg in ("--ro-bind", host, path)],
            "--ro-bind",
            str(AGENT),
            AGENT_IN_SANDBOX,
            "--chdir",
            self.workdir,
            "--",
            SANDBOX_PYTHON,
            "-I",
            AGENT_IN_SANDBOX,
            str(fd),
        ]

    def _system_args(self) -> list[str]:
        """The host's system read-only over the root folder. The root folder keeps the mount
        points bubblewrap made on an earlier start (a snapshot copies them), so links that
        already exist are not made again, and ``/tmp`` stays the sandbox's own."""
        args = isolation.system_args()
        kept: list[str] = []
        i = 0
        while i < len(args):
            op = args[i]
            width = 3 if op in ("--symlink", "--ro-bind", "--bind") else 2
            item = args[i : i + width]
            i += width
            if op == "--tmpfs" and item[1] == "/tmp":
                continue
            if op == "--symlink" and os.path.lexists(self.fs / item[2].lstrip("/")):
                continue
            if op == "--ro-bind" and item[2] in self._etc:
                item = [op, self._etc[item[2]], item[2]]
            kept += item
        return kept

    def _container_env(self) -> dict[str, str]:
        """What the entrypoint and every exec start from: a container's usual variables, the
        image's ``ENV``, then the secrets and ``env`` of the create call (later ones win)."""
        return {
            "PATH": BASE_PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "MODAL_TASK_ID": self.task_id,
            "MODAL_SANDBOX_ID": self.sandbox_id,
            "MODAL_IMAGE_ID": self.image.image_id,
            "MODAL_ENVIRONMENT": "main",
            **self.image.env,
            **self.env,
        }

    # -- the agent's channel ----------------------------------------------------------------------

    def _send(self, message: dict) -> None:
        if self._channel is None:
            raise SandboxGone(self.sandbox_id)
        try:
            self._channel.send(json.dumps(message).encode())
        except OSError as exc:
            raise SandboxGone(self.sandbox_id) from exc

    def _on_message(self) -> None:
        assert self._channel is not None
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._channel, 1 << 20, 4)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self._close_channel()
                return
            self._dispatch(json.loads(data), fds)

    def _dispatch(self, message: dict, fds: list[int]) -> None:
        op = message["op"]
        if op == "exit":
            process = self.processes.get(message["id"])
            if process is not None:
                process.finish(message["returncode"])
                if process.counts:
                    self._activity(-1)
        elif op == "inbound":
            self._spawn(self._outbound(message["port"], fds[0]))
        else:
            future = self._pending.pop(message["id"], None)
            if future is None or future.done():
                for fd in fds:
                    os.close(fd)
            elif op == "error":
                future.set_exception(OSError(message["message"]))
            else:
                future.set_result((message, fds))

    async def _ask(self, message: dict) -> tuple[dict, list[int]]:
        future = asyncio.get_running_loop().create_future()
        self._pending[message["id"]] = future
        self._send(message)
        return await future

    def _close_channel(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._channel.fileno())
            self._channel.close()
            self._channel = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(SandboxGone(self.sandbox_id))
        self._pending.clear()

    # -- processes --------------------------------------------------------------------------------

    async def exec(
        self,
        exec_id: str,
        argv: list[str],
        env: dict[str, str],
        workdir: str,
        *,
        stdin: bool = True,
        stdout: bool = True,
        stderr: bool = True,
        timeout: int = 0,
        counts: bool = True,
    ) -> Process:
        """Start a process in the container. ``counts``: whether it keeps the sandbox from being
        idle (execs do; the entrypoint and readiness probes do not)."""
        if not self.running:
            raise SandboxGone(self.sandbox_id)
        process = Process(exec_id, argv, counts=counts)
        self.processes[exec_id] = process
        if counts:
            self._activity(+1)
        request = {
            "op": "exec",
            "id": exec_id,
            "argv": argv,
            "env": env,
            "cwd": workdir,
            "stdin": "pipe" if stdin else "null",
            "stdout": "pipe" if stdout else "null",
            "stderr": "pipe" if stderr else "null",
        }
        try:
            reply, fds = await self._ask(request)
        except OSError as exc:  # the program could not be started: as a shell reports it
            process.stderr.append(f"{exc}\n".encode())
            process.stdout.close()
            process.stderr.close()
            process.finish(127)
            if counts:
                self._activity(-1)
            return process
        named = dict(zip(reply["fds"], fds, strict=True))
        if "stdin" in named:
            process.stdin = await _pipe_writer(named["stdin"])
        for name in ("stdout", "stderr"):
            output: Output = getattr(process, name)
            if name in named:
                process.pumps.append(self._spawn(output.pump(named[name])))
            else:
                output.close()
        if timeout:
            self._later(timeout, self._kill, exec_id)
        return process

    def _kill(self, exec_id: str) -> None:
        with contextlib.suppress(SandboxGone):
            self._send({"op": "kill", "id": exec_id, "signal": 9})

    def process(self, exec_id: str) -> Process:
        process = self.processes.get(exec_id)
        if process is None:
            raise KeyError(exec_id)
        return process

    async def write_stdin(self, process: Process, offset: int, data: bytes, eof: bool) -> None:
        """Write at ``offset``; bytes before the current offset were already written (a retry)."""
        self.touch()
        if process.stdin_closed:
            return
        skip = process.stdin_offset - offset
        if skip < 0:
            raise ValueError(f"stdin offset {offset} is past what was written ({process.stdin_offset})")
        data = data[skip:]
        if data and process.stdin is not None:
            process.stdin.write(data)
            with contextlib.suppress(ConnectionError):
                await process.stdin.drain()
            process.stdin_offset += len(data)
        if eof:
            process.stdin_closed = True
            if process.stdin is not None:
                process.stdin.close()

    async def _entrypoint_exit(self, main: Process) -> None:
        await main.done.wait()
        code = main.returncode or 0
        if code < 0:
            code = 128 - code
        status = Result.GENERIC_STATUS_SUCCESS if code == 0 else Result.GENERIC_STATUS_FAILURE
        await self.end(status, exitcode=code)

    # -- network ----------------------------------------------------------------------------------

    async def connect(self, port: int) -> socket.socket:
        """A TCP connection to ``127.0.0.1:port`` inside the sandbox (opened by the agent)."""
        _, fds = await self._ask({"op": "connect", "id": f"c{next(self._ids)}", "port": port})
        return socket.socket(fileno=fds[0])

    async def _outbound(self, port: int, fd: int) -> None:
        """A sandbox process connected to a forwarded port: carry it to the host's port."""
        inside = socket.socket(fileno=fd)
        try:
            reader, writer = await asyncio.open_connection(sock=inside)
            host_reader, host_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            inside.close()
            return
        await splice(reader, writer, host_reader, host_writer)

    async def serve_tunnel(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int
    ) -> None:
        """One connection to a tunnel: carried to the sandbox's port while it stays open."""
        if not self.running:
            writer.close()
            return
        self._activity(+1)
        try:
            try:
                inside = await self.connect(port)
                in_reader, in_writer = await asyncio.open_connection(sock=inside)
            except (OSError, SandboxGone):
                writer.close()
                return
            await splice(reader, writer, in_reader, in_writer)
        finally:
            self._activity(-1)

    async def _probe(self) -> None:
        """Run the readiness probe until it passes (Modal's TCP or exec probe)."""
        probe = self.definition.readiness_probe
        if not self.definition.HasField("readiness_probe"):
            self.ready.set()
            return
        interval = (probe.interval_ms or 100) / 1000
        while self.running:
            try:
                if probe.tcp_port:
                    (await self.connect(probe.tcp_port)).close()
                    break
                argv = list(probe.exec_command.argv)
                probe_id = f"probe-{next(self._ids)}"
                process = await self.exec(probe_id, argv, {}, self.workdir, stdin=False, counts=False)
                await process.done.wait()
                if process.returncode == 0:
                    break
            except OSError:
                pass
            except SandboxGone:
                return
            await asyncio.sleep(interval)
        self.ready.set()

    # -- idle and timeouts ------------------------------------------------------------------------

    def touch(self) -> None:
        self.last_active = time.monotonic()
        self._arm_idle()

    def _activity(self, delta: int) -> None:
        self._active += delta
        self.touch()

    def _arm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        idle = self.definition.idle_timeout_secs
        if idle and self._active <= 0 and self.running:
            self._idle_timer = asyncio.get_running_loop().call_later(
                idle, lambda: self._spawn(self.end(Result.GENERIC_STATUS_TIMEOUT))
            )

    def _later(self, delay: float, fn: Callable, *args) -> None:
        def fire() -> None:
            outcome = fn(*args)
            if asyncio.iscoroutine(outcome):
                self._spawn(outcome)

        self._timers.append(asyncio.get_running_loop().call_later(delay, fire))

    # -- end --------------------------------------------------------------------------------------

    async def end(self, status: int, *, exitcode: int = 0, message: str = "") -> None:
        """End the sandbox (idempotent): kill the container, settle every process."""
        if not self.running:
            return
        self.result = Result(status=status, exitcode=exitcode, exception=message)
        for timer in self._timers:
            timer.cancel()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        await self._kill_container()
        self._close_channel()
        for process in self.processes.values():
            process.finish(-9)
        self.ended.set()
        self.ready.set()
        self._on_end(self)

    async def _kill_container(self) -> None:
        if self._bwrap is not None and self._bwrap.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._bwrap.kill()
            await self._bwrap.wait()

    async def _watch_container(self) -> None:
        assert self._bwrap is not None
        code = await self._bwrap.wait()
        if self.running:  # the container died under us (not a terminate): say so
            detail = (self.dir / "bwrap.log").read_text(errors="replace")[-2000:]
            message = f"container exited: {detail}"
            await self.end(Result.GENERIC_STATUS_FAILURE, exitcode=code, message=message)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def snapshot(self, folder: Path) -> None:
        """Copy the writable file tree (everything but the host's system) into ``folder``."""
        async with self._files:
            if not self.running:
                raise SandboxGone(self.sandbox_id)
            await asyncio.to_thread(copy_tree, self.fs, folder)

    async def remove(self) -> None:
        """Forget the sandbox's files (after it ended; not while they are being copied)."""
        async with self._files:
            await asyncio.to_thread(shutil.rmtree, self.dir, True)


async def _pipe_writer(fd: int) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.streams.FlowControlMixin(loop=loop), os.fdopen(fd, "wb", buffering=0)
    )
    return asyncio.StreamWriter(transport, protocol, None, loop)


async def splice(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
) -> None:
    """Carry bytes both ways until both sides are done."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(CHUNK):
                writer.write(chunk)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, asyncio.IncompleteReadError):
            pass

    try:
        await asyncio.gather(pipe(a_reader, b_writer), pipe(b_reader, a_writer))
    finally:
        for writer in (a_writer, b_writer):
            writer.close()
