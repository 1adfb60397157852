"""The task command router: where a V2 sandbox's execs, stdio, readiness and snapshots go.

On Modal it runs on the worker beside the container and the client reaches it directly with the
URL and JWT from ``SandboxCreateV2``/``SandboxGetCommandRouterAccess``. Here it shares the
stand-in's port. Every call must carry ``authorization: Bearer <jwt>`` signed by the stand-in,
unexpired and for the task in the request (UNAUTHENTICATED otherwise: the client refreshes its
JWT once and retries). A task whose sandbox has ended answers NOT_FOUND, which is what the real
client expects once "the task shuts down" (its ``TaskExecWait`` stops retrying on it).
"""

from __future__ import annotations

import asyncio
import time

from grpclib import GRPCError, Status
from modal_proto import task_command_router_grpc
from modal_proto import task_command_router_pb2 as pb

from .rpc import invalid, not_found, server_stream, strict, unary
from .sandboxes import Process, Sandbox, SandboxGone
from .state import State

STDOUT = pb.TaskExecStdoutConfig
STDERR = pb.TaskExecStderrConfig


@strict(task_command_router_grpc.TaskCommandRouterBase)
class CommandRouter(task_command_router_grpc.TaskCommandRouterBase):
    def __init__(self, state: State) -> None:
        self.state = state
        self.recorder = state.recorder

    def _task(self, stream, task_id: str, *, ended_too: bool = False) -> Sandbox:
        header = stream.metadata.get("authorization", "")
        claims = self.state.claims(header.removeprefix("Bearer ")) if header.startswith("Bearer ") else None
        if claims is None or claims.get("task_id") != task_id:
            raise GRPCError(Status.UNAUTHENTICATED, "invalid or expired command router token")
        return self.state.task(task_id, ended_too=ended_too)

    def _process(self, stream, task_id: str, exec_id: str) -> tuple[Sandbox, Process]:
        sandbox = self._task(stream, task_id)
        try:
            return sandbox, sandbox.process(exec_id)
        except KeyError:
            raise not_found(f"Exec {exec_id}") from None

    # -- execs ------------------------------------------------------------------------------------

    @unary
    async def TaskExecStart(self, request, stream):
        sandbox = self._task(stream, request.task_id)
        if not request.exec_id or not request.command_args:
            raise invalid("exec_id and command_args are required")
        if any("\0" in arg for arg in request.command_args):
            raise invalid("command arguments cannot contain NUL bytes")
        if request.HasField("pty_info") or request.container_id:
            self.recorder.missing("TaskExecStart.pty_info/container_id")
            raise GRPCError(Status.UNIMPLEMENTED, "the modal stand-in does not implement PTYs or sidecars")
        if request.exec_id in sandbox.processes:  # the exec id is the client's idempotency key
            return pb.TaskExecStartResponse()
        if request.workdir and not request.workdir.startswith("/"):
            raise invalid("workdir must be an absolute path")
        env = self.state.store.resolve(list(request.secret_sources), list(request.secret_ids))
        env.update(request.env)
        try:
            await sandbox.exec(
                request.exec_id,
                list(request.command_args),
                env,
                request.workdir or sandbox.workdir,
                stdout=request.stdout_config != STDOUT.TASK_EXEC_STDOUT_CONFIG_DEVNULL,
                stderr=request.stderr_config != STDERR.TASK_EXEC_STDERR_CONFIG_DEVNULL,
                timeout=request.timeout_secs,
            )
        except SandboxGone:
            raise not_found(f"Task {request.task_id}") from None
        return pb.TaskExecStartResponse()

    @server_stream
    async def TaskExecStdioRead(self, request, stream):
        _, process = self._process(stream, request.task_id, request.exec_id)
        if request.file_descriptor == pb.TASK_EXEC_STDIO_FILE_DESCRIPTOR_STDOUT:
            output = process.stdout
        elif request.file_descriptor == pb.TASK_EXEC_STDIO_FILE_DESCRIPTOR_STDERR:
            output = process.stderr
        else:
            raise invalid("file_descriptor must be stdout or stderr")
        async for _, chunk in output.read_from(request.offset):
            yield pb.TaskExecStdioReadResponse(data=chunk)

    @unary
    async def TaskExecWait(self, request, stream):
        _, process = self._process(stream, request.task_id, request.exec_id)
        await process.done.wait()
        return exit_status(pb.TaskExecWaitResponse, process)

    @unary
    async def TaskExecPoll(self, request, stream):
        _, process = self._process(stream, request.task_id, request.exec_id)
        if process.returncode is None:
            return pb.TaskExecPollResponse()
        return exit_status(pb.TaskExecPollResponse, process)

    @unary
    async def TaskExecStdinWrite(self, request, stream):
        sandbox, process = self._process(stream, request.task_id, request.exec_id)
        try:
            await sandbox.write_stdin(process, request.offset, request.data, request.eof)
        except ValueError as exc:
            raise GRPCError(Status.FAILED_PRECONDITION, str(exc)) from None
        return pb.TaskExecStdinWriteResponse()

    @unary
    async def TaskExecStdinStatus(self, request, stream):
        _, process = self._process(stream, request.task_id, request.exec_id)
        return pb.TaskExecStdinStatusResponse(
            num_bytes_written=process.stdin_offset, closed=process.stdin_closed
        )

    async def TaskExecStdinWriteStream(self, stream) -> None:
        """Client streaming: a start message, data messages, an end message (EOF)."""
        self.recorder.call("TaskExecStdinWriteStream")
        first = await stream.recv_message()
        if first is None or first.WhichOneof("payload") != "start":
            raise invalid("the first message must be start")
        start = first.start
        sandbox, process = self._process(stream, start.task_id, start.exec_id)
        if start.offset != process.stdin_offset:
            raise GRPCError(Status.FAILED_PRECONDITION, "stdin offset mismatch")
        offset = start.offset
        async for message in stream:
            kind = message.WhichOneof("payload")
            if kind == "data":
                await sandbox.write_stdin(process, offset, message.data, eof=False)
                offset += len(message.data)
            elif kind == "end":
                await sandbox.write_stdin(process, offset, b"", eof=True)
                break
            else:
                raise invalid("stdin stream messages after start must be data or end")
        await stream.send_message(pb.TaskExecStdinWriteStreamResponse())

    # -- the entrypoint's stdio -------------------------------------------------------------------

    @server_stream
    async def SandboxStdioReadV2(self, request, stream):
        """The entrypoint's output, live or after the sandbox ended (the client reads it then)."""
        sandbox = self._task(stream, request.task_id, ended_too=True)
        main = sandbox.processes.get("main")
        if main is None:
            return
        if request.file_descriptor == pb.SANDBOX_STDIO_FILE_DESCRIPTOR_STDOUT:
            output = main.stdout
        elif request.file_descriptor == pb.SANDBOX_STDIO_FILE_DESCRIPTOR_STDERR:
            output = main.stderr
        else:
            raise invalid("file_descriptor must be stdout or stderr")
        async for offset, chunk in output.read_from(request.offset):
            yield pb.SandboxStdioReadV2Response(data=chunk, starting_offset=offset)

    @unary
    async def SandboxStdinWriteV2(self, request, stream):
        sandbox = self._task(stream, request.task_id)
        main = sandbox.processes.get("main")
        if main is None:
            raise GRPCError(Status.FAILED_PRECONDITION, "the sandbox has no entrypoint")
        try:
            await sandbox.write_stdin(main, request.offset, request.data, request.eof)
        except ValueError as exc:
            raise GRPCError(Status.FAILED_PRECONDITION, str(exc)) from None
        return pb.SandboxStdinWriteV2Response()

    # -- readiness and snapshots ------------------------------------------------------------------

    @unary
    async def SandboxWaitUntilReady(self, request, stream):
        sandbox = self._task(stream, request.task_id)
        try:
            await asyncio.wait_for(sandbox.ready.wait(), timeout=max(request.timeout, 0.01))
        except asyncio.TimeoutError:
            raise GRPCError(Status.DEADLINE_EXCEEDED, "the sandbox did not become ready in time") from None
        if not sandbox.running:
            raise not_found(f"Task {request.task_id}")
        return pb.SandboxWaitUntilReadyTcrResponse(ready_at=time.time())

    @unary
    async def TaskSnapshotFilesystem(self, request, stream):
        """A copy of the sandbox's whole writable file tree, as a new image."""
        sandbox = self._task(stream, request.task_id)
        if request.container_id:
            raise invalid("the modal stand-in has no sidecar containers")
        folder = self.state.store.new_image_dir()
        try:
            await sandbox.snapshot(folder)
        except SandboxGone:
            raise not_found(f"Task {request.task_id}") from None
        image = self.state.store.from_files(folder, base=sandbox.image, snapshot_of=sandbox.sandbox_id)
        return pb.TaskSnapshotFilesystemResponse(image_id=image.image_id)


def exit_status(response_type, process: Process):
    code = process.returncode
    assert code is not None
    return response_type(signal=-code) if code < 0 else response_type(code=code)
