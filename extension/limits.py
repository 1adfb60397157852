"""Quotas and rate limits: how much of the service one person (and everyone together) may use.

Why: on a hub, one service runs every person's sessions on the team's machines (or Modal plan)
and model keys, so one person's script must not take all of it. Limits are checked where work
is *accepted* (a new session, a prompt, a resume), never where accepted work runs: a prompt
already queued runs whatever the limits say now, and a session that restarts by itself to run
its queued prompts (after a pause, a fault or a server restart) is not refused.

- ``sessions_per_user``: sessions a person keeps (not deleted);
- ``running_per_user`` and ``running_total``: sandboxes running at once (sessions starting or
  running), per person and for the whole service; starting a session, resuming one, and a prompt
  to a session that is not running (it starts it) all count;
- ``prompts_per_minute``: prompts a person sends, over REST and the WebSocket together (one
  counter per person, so one route cannot be used to get round the other).

Going over raises ``LimitExceeded``: an HTTP 429 with ``Retry-After`` (when waiting helps) and a
JSON body naming the limit, or an error frame on the WebSocket with the same content. The counts
of running sandboxes come from the store and are checked and acted on under one lock, so two
starts at once cannot both take the last place (within this service process; several processes
sharing one store may overshoot by the starts they make at the same instant).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from traitlets import Float, Int
from traitlets.config import LoggingConfigurable

from . import states
from .store import Prompt, Store

#: What a person is told to wait before trying to start a sandbox again: sandboxes stop when
#: their sessions pause (by hand, or idle), which no clock predicts.
RUNNING_RETRY_SECONDS = 60


class LimitExceeded(Exception):
    """A quota or rate limit refused a request. ``limit`` is the trait's name, ``allowed`` its
    value, ``retry_after`` seconds after which trying again may succeed (None: waiting alone
    does not help; the message says what does)."""

    status = 429

    def __init__(self, limit: str, allowed: int, message: str, retry_after: int | None):
        super().__init__(message)
        self.limit, self.allowed, self.retry_after = limit, allowed, retry_after

    def public(self) -> dict[str, Any]:
        """The JSON body of the 429 (and of the WebSocket's error frame)."""
        return {"message": str(self), "reason": "limit", "limit": self.limit,
                "allowed": self.allowed, "retry_after": self.retry_after}


class SlidingWindow:
    """At most ``allowed`` events per key in any ``window`` seconds: the times of the accepted
    ones are kept (no more than ``allowed`` per key), so the answer is exact, and the wait until
    the oldest leaves the window is the honest ``Retry-After``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._seen: dict[str, deque[float]] = {}

    def take(self, key: str, allowed: int, window: float) -> float | None:
        """Record one event for ``key`` and return None, or return the seconds to wait (and
        record nothing) when ``allowed`` were already seen in the last ``window`` seconds."""
        now = self.clock()
        seen = self._seen.setdefault(key, deque())
        while seen and seen[0] <= now - window:
            seen.popleft()
        if len(seen) >= allowed:
            return seen[0] + window - now
        seen.append(now)
        return None

    def forget_idle(self, window: float) -> None:
        """Drop the keys with nothing in the window (memory stays bounded by active people)."""
        now = self.clock()
        for key in [k for k, seen in self._seen.items() if not seen or seen[-1] <= now - window]:
            del self._seen[key]


class TabbiLimits(LoggingConfigurable):
    """Per-person quotas and rate limits, and the service-wide cap on running sandboxes
    (``c.TabbiLimits.*``). 0 turns a limit off."""

    sessions_per_user = Int(
        50, min=0,
        help="Sessions one person may keep (created and not deleted); starting one more is "
        "refused with 429 until they delete one. 0: unlimited.",
    ).tag(config=True)
    running_per_user = Int(
        10, min=0,
        help="Sandboxes one person may have running (starting or running) at once; starting, "
        "resuming, or prompting a paused session beyond it is refused with 429. 0: unlimited.",
    ).tag(config=True)
    running_total = Int(
        0, min=0,
        help="Sandboxes the whole service may have running at once (all people together): set "
        "it to what the machine or the Modal plan holds. 0: unlimited.",
    ).tag(config=True)
    prompts_per_minute = Int(
        60, min=0,
        help="Prompts one person may send per rate_window seconds, over REST and the WebSocket "
        "together; more are refused with 429 and Retry-After. Prompts already accepted are never "
        "dropped. 0: unlimited.",
    ).tag(config=True)
    rate_window = Float(
        60.0, min=0.001,
        help="The length in seconds of the window prompts_per_minute counts over (60: a minute).",
    ).tag(config=True)

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic, **kwargs: Any):
        super().__init__(**kwargs)
        self.store = store
        self.prompts = SlidingWindow(clock)
        self._starting = asyncio.Lock()

    # -- prompts ----------------------------------------------------------------------------------
    def take_prompt(self, owner: str) -> None:
        """Count one prompt of ``owner``, or raise ``LimitExceeded`` (and count nothing)."""
        if not self.prompts_per_minute:
            return
        self.prompts.forget_idle(self.rate_window)
        wait = self.prompts.take(owner, self.prompts_per_minute, self.rate_window)
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            raise LimitExceeded(
                "prompts_per_minute", self.prompts_per_minute,
                f"too many prompts: at most {self.prompts_per_minute} per {_span(self.rate_window)} "
                f"per person; this one was not queued (the ones already queued still run); "
                f"send it again in {seconds} s",
                seconds,
            )

    async def prompt(self, owner: str, agent: Any, text: str,
                     attachments: list[dict] | None = None) -> Prompt:
        """Queue ``text`` on ``agent`` for ``owner`` within the limits: the one way prompts are
        accepted, over REST and the WebSocket alike. A prompt to a session that is not running
        starts its sandbox, so it also counts against the running limits."""
        self.take_prompt(owner)
        if agent.state in states.LIVE:
            return await agent.prompt(text, attachments)
        async with self.starting(owner):
            return await agent.prompt(text, attachments)

    # -- sandboxes and sessions ----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def starting(self, owner: str, new_session: bool = False) -> AsyncIterator[None]:
        """Around something that starts a sandbox for ``owner`` (``new_session``: and creates a
        session): raise ``LimitExceeded`` when that would go over a limit; else run the body
        under the lock, so the body's start is counted before anyone else's check."""
        if not (self.running_total or self.running_per_user
                or (new_session and self.sessions_per_user)):
            yield
            return
        async with self._starting:
            records = await self.store.list_sessions()
            mine = [r for r in records if r.owner == owner]
            if new_session and self.sessions_per_user and len(mine) >= self.sessions_per_user:
                raise LimitExceeded(
                    "sessions_per_user", self.sessions_per_user,
                    f"you have {len(mine)} sessions, the most one person may keep here is "
                    f"{self.sessions_per_user}: delete one you no longer need (%tabbi delete ID), "
                    "then start again",
                    None,
                )
            running = sum(r.state in states.LIVE for r in mine)
            if self.running_per_user and running >= self.running_per_user:
                raise LimitExceeded(
                    "running_per_user", self.running_per_user,
                    f"you have {running} sandboxes running, the most one person may run at once "
                    f"is {self.running_per_user}: pause one (%tabbi pause ID) or try again later",
                    RUNNING_RETRY_SECONDS,
                )
            total = sum(r.state in states.LIVE for r in records)
            if self.running_total and total >= self.running_total:
                raise LimitExceeded(
                    "running_total", self.running_total,
                    f"this tabbi service runs {total} sandboxes, as many as it may run at once "
                    f"({self.running_total}, for everyone together): try again later",
                    RUNNING_RETRY_SECONDS,
                )
            yield


def _span(seconds: float) -> str:
    return "minute" if seconds == 60 else f"{seconds:g} s"
