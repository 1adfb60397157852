"""Telling Jupyter that tabbi is working, so that idle culling does not stop a server mid-turn.

A turn can run for many minutes with no request reaching the server (the agent works in its
sandbox; nobody watches, or a WebSocket that Jupyter does not count is open). Jupyter's own
``shutdown_no_activity_timeout`` asks every extension's ``current_activity()``; JupyterHub's
singleuser server reports ``web_app.last_activity()`` to the hub, whose idle culler reads it. That
value is the latest of the server's activity sources, among them
``settings["last_activity_times"]``, the hook extensions stamp. So while any session is starting
or running a turn, tabbi answers ``current_activity()`` with those sessions and stamps
``last_activity_times["tabbi"]`` every ``interval`` seconds. An idle session (a sandbox waiting
for its next prompt) is not activity: tabbi's own ``idle_timeout`` pauses it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from typing import Any

from jupyter_server._tz import utcnow

from . import states
from .agent import SessionAgent

SOURCE = "tabbi"


class ActivityReporter:
    def __init__(
        self, agents: Callable[[], Iterable[SessionAgent]], settings: dict[str, Any], interval: float
    ):
        self._agents = agents
        self._settings = settings
        self.interval = interval
        self._task: asyncio.Task | None = None

    def working(self) -> list[str]:
        """Ids of the sessions doing something now: starting, or running a turn."""
        return sorted(a.id for a in self._agents() if a.busy or a.state == states.STARTING)

    def report(self) -> bool:
        """Stamp Jupyter's activity clock if a session is working; whether it did."""
        if not self.working():
            return False
        self._settings.setdefault("last_activity_times", {})[SOURCE] = utcnow()
        return True

    def start(self) -> None:
        if self._task is None and self.interval > 0:
            self._task = asyncio.ensure_future(self._beat())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _beat(self) -> None:
        while True:
            self.report()
            await asyncio.sleep(self.interval)
