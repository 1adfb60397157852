"""How the stand-in's gRPC handlers are written: strict by construction.

The real client retries UNKNOWN, INTERNAL, UNAVAILABLE, CANCELLED and DEADLINE_EXCEEDED (some calls,
such as ``TaskExecWait``, forever), so an exception escaping a handler would turn a stand-in bug
into a test that hangs. Every handler therefore goes through ``unary``/``server_stream``: a
``GRPCError`` it raises reaches the client as is; anything else is recorded in
``Recorder.errors`` (the fixture fails the test on teardown) and answered UNIMPLEMENTED, which the
client does not retry. ``strict(Base)`` answers every RPC of the generated base the stand-in does
not implement with UNIMPLEMENTED and records its name in ``Recorder.unimplemented``.
"""

from __future__ import annotations

import functools
import logging
import threading
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from grpclib import GRPCError, Status

log = logging.getLogger("modal_standin")


class Recorder:
    """What the stand-in saw: every call by name, the unimplemented ones, and its own failures."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[str] = []
        self.unimplemented: list[str] = []
        self.errors: list[str] = []

    def call(self, name: str) -> None:
        with self._lock:
            self.calls.append(name)

    def missing(self, name: str) -> None:
        log.warning("modal stand-in: unimplemented RPC %s", name)
        with self._lock:
            self.unimplemented.append(name)

    def failed(self, name: str, exc: BaseException) -> None:
        text = "".join(traceback.format_exception(exc))
        log.error("modal stand-in: %s failed:\n%s", name, text)
        with self._lock:
            self.errors.append(f"{name}: {text}")


def unary(handler: Callable[[Any, Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[None]]:
    """``async def Rpc(self, request, stream) -> response`` as a grpclib handler."""

    @functools.wraps(handler)
    async def serve(self: Any, stream: Any) -> None:
        name = handler.__name__
        self.recorder.call(name)
        try:
            request = await stream.recv_message()
            response = await handler(self, request, stream)
        except GRPCError:
            raise
        except Exception as exc:
            self.recorder.failed(name, exc)
            raise GRPCError(Status.UNIMPLEMENTED, f"modal stand-in failed in {name}: {exc!r}") from exc
        await stream.send_message(response)

    return serve


def server_stream(
    handler: Callable[[Any, Any, Any], AsyncIterator[Any]],
) -> Callable[[Any, Any], Awaitable[None]]:
    """``async def Rpc(self, request, stream)`` yielding responses, as a grpclib handler."""

    @functools.wraps(handler)
    async def serve(self: Any, stream: Any) -> None:
        name = handler.__name__
        self.recorder.call(name)
        try:
            request = await stream.recv_message()
            async for response in handler(self, request, stream):
                await stream.send_message(response)
        except GRPCError:
            raise
        except Exception as exc:
            self.recorder.failed(name, exc)
            raise GRPCError(Status.UNIMPLEMENTED, f"modal stand-in failed in {name}: {exc!r}") from exc

    return serve


def strict(base: type) -> Callable[[type], type]:
    """Complete a servicer class: every abstract RPC of ``base`` it lacks answers UNIMPLEMENTED."""

    def complete(cls: type) -> type:
        def refusal(name: str) -> Callable[[Any, Any], Awaitable[None]]:
            async def refuse(self: Any, stream: Any) -> None:
                self.recorder.missing(name)
                raise GRPCError(Status.UNIMPLEMENTED, f"the modal stand-in does not implement {name}")

            refuse.__name__ = name
            return refuse

        missing = {
            name: refusal(name)
            for name in base.__abstractmethods__
            if getattr(getattr(cls, name), "__isabstractmethod__", False)
        }
        return type(cls.__name__, (cls,), {**missing, "__doc__": cls.__doc__, "__module__": cls.__module__})

    return complete


def not_found(what: str) -> GRPCError:
    return GRPCError(Status.NOT_FOUND, f"{what} not found")


def invalid(message: str) -> GRPCError:
    return GRPCError(Status.INVALID_ARGUMENT, message)
