"""Driving a real IPython kernel started by the real Jupyter server under test.

The server runs in the test's event loop, so the kernel's requests to tabbi are answered while the
test awaits the kernel's messages (``AsyncKernelClient``), never while it blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Execution:
    stdout: str = ""
    stderr: str = ""
    displays: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    payloads: list[dict[str, Any]] = field(default_factory=list)
    status: str = ""

    @property
    def text(self) -> str:
        return self.stdout + self.stderr

    def next_input(self) -> str | None:
        found = [p["text"] for p in self.payloads if p.get("source") == "set_next_input"]
        return found[-1] if found else None


class Kernel:
    def __init__(self, manager: Any, kernel_id: str, client: Any):
        self.manager = manager
        self.id = kernel_id
        self.client = client
        #: Every comm message (widget state sync) seen on iopub, in order.
        self.comm_messages: list[dict[str, Any]] = []

    async def run(self, code: str, timeout: float = 180,
                  on_output: Callable[[Execution], None] | None = None) -> Execution:
        msg_id = self.client.execute(code)
        result = Execution()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the cell did not finish within {timeout} s: {result}")
            try:
                msg = await self.client.get_iopub_msg(timeout=min(remaining, 5))
            except Exception:  # queue.Empty: nothing yet
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind.startswith("comm_"):
                self.comm_messages.append(msg)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if kind == "stream":
                if content["name"] == "stdout":
                    result.stdout += content["text"]
                else:
                    result.stderr += content["text"]
            elif kind in ("display_data", "execute_result"):
                result.displays.append(content["data"])
            elif kind == "error":
                result.error = content
            elif kind == "status" and content["execution_state"] == "idle":
                break
            if on_output is not None:
                on_output(result)
        reply = await self.client.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = await self.client.get_shell_msg(timeout=30)
        result.status = reply["content"]["status"]
        result.payloads = reply["content"].get("payload", [])
        return result

    async def drain_comms(self, until: Callable[[], bool], timeout: float = 60) -> None:
        """Read iopub (widget syncs from background tasks) until ``until()`` holds."""
        deadline = time.monotonic() + timeout
        while not until():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("widget state did not arrive in time")
            try:
                msg = await self.client.get_iopub_msg(timeout=min(remaining, 2))
            except Exception:
                continue
            if msg["msg_type"].startswith("comm_"):
                self.comm_messages.append(msg)

    def widget_state(self, model_id: str | None = None) -> dict[str, Any]:
        """The state the front end would hold, folded from comm_open + comm_msg updates."""
        state: dict[str, Any] = {}
        for msg in self.comm_messages:
            content = msg["content"]
            if model_id and content.get("comm_id") != model_id:
                continue
            data = content.get("data", {})
            if msg["msg_type"] == "comm_open" or data.get("method") == "update":
                state.update(data.get("state", {}))
        return state


async def start_kernel(serverapp: Any) -> Kernel:
    manager = serverapp.kernel_manager
    kernel_id = await manager.start_kernel(kernel_name="python3")
    client = manager.get_kernel(kernel_id).client()
    client.start_channels()
    await client.wait_for_ready(timeout=60)
    return Kernel(manager, kernel_id, client)


async def stop_kernel(kernel: Kernel) -> None:
    kernel.client.stop_channels()
    await kernel.manager.shutdown_kernel(kernel.id, now=True)
