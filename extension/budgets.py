"""Cost controls: per-session and per-user budgets on model cost and on sandbox running time.

What is counted, and where it comes from (all of it in the store, so budgets survive restarts and
work the same on SQLite and Convex):

- **Model cost** is what OpenCode reports on each assistant message (``cost``, in dollars, with
  its ``tokens``), computed from the model's prices: OpenCode's own catalogue for its providers,
  ``c.TabbiExtension.llm_pricing`` for an OpenAI-compatible server. The message info is persisted
  with the message (``Store.upsert_message``), so a session's spend is the sum over its messages.
- **Sandbox running time** is read from the session's event log: the time between a
  ``session.status`` of state ``running`` and the next status that leaves it (a pause, an error),
  plus the time since, if it runs now.

The same spend is what people see: each turn's and the session's tokens and cost
(``model_usage``; ``turn.finished`` and a session's info carry them, docs/models-and-cost.md).

A session's spend is loaded from the store once per server process and then kept up to date from
the live feed (messages) and the log (new events, read incrementally); a user's spend is the sum
over the sessions they own plus their **retired spend**: deleting a session deletes its messages
and events, so ``retire`` first keeps its cost and running seconds in the store
(``Store.retire_spend``, a row per owner and session). Otherwise a person who used up their budget
would delete sessions and spend again. The delete records before it deletes, so a crash between
loses nothing; a retired row counts only once its session is gone from the store
(``Store.retired_spend``), so a delete that failed half-way counts nothing twice. The record is
idempotent (the larger amount wins): a retried delete does not add twice. It is written again
after the delete with the spend as it ended (a failure then is logged: the delete is done).

Enforcement: a prompt is refused (HTTP 429, naming the budget, spent and limit) when a budget is
already used up; a turn is stopped when it crosses one (on the message that reports the cost,
or by a timer for running time), with an ``error`` event ``BudgetExceeded`` and the turn ending as
an error with the same message, which the magics and the panel show.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from traitlets import Float
from traitlets.config import LoggingConfigurable

from .agent import AgentError
from .store import SessionRecord, Store

if TYPE_CHECKING:
    from .agent import SessionAgent

#: The status an exhausted budget answers a prompt with: "too many requests" for this quota.
REFUSED = 429

#: Longest a running-time watch sleeps before it counts again (other sessions of the same user
#: spend from the same budget meanwhile).
WATCH_INTERVAL = 5.0


class BudgetExceeded(AgentError):
    """A budget is used up; the message names it, with what was spent and the limit."""

    def __init__(self, message: str):
        super().__init__(message, REFUSED)


@dataclass
class Spend:
    """One session's spend as far as this process has read it."""

    #: Cost per assistant message id (OpenCode updates a message's cost as its steps finish).
    costs: dict[str, float] = field(default_factory=dict)
    #: Tokens per assistant message id, as OpenCode reports them (``tokens_of``).
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Seconds of closed running intervals, and the start (epoch s) of an open one.
    closed_seconds: float = 0.0
    running_since: float | None = None
    #: The last event seq folded into the running time.
    seq: int = 0

    @property
    def cost(self) -> float:
        return sum(self.costs.values())

    def record(self, message_id: str, info: dict[str, Any] | None) -> None:
        """An assistant message's latest info (its cost and tokens so far)."""
        self.costs[message_id] = _cost(info)
        self.tokens[message_id] = tokens_of(info)

    def usage(self, message_ids: Collection[str] | None = None) -> dict[str, Any]:
        """``{"tokens": {input, output, reasoning, cache: {read, write}}, "cost"}`` summed over
        ``message_ids`` (None: every message of the session)."""
        ids = self.costs.keys() if message_ids is None else [m for m in message_ids if m in self.costs]
        total = tokens_of(None)
        for message_id in ids:
            add_tokens(total, self.tokens.get(message_id) or {})
        return {"tokens": total, "cost": round(sum(self.costs[m] for m in ids), 10)}

    def seconds(self, now: float) -> float:
        return self.closed_seconds + (max(0.0, now - self.running_since) if self.running_since else 0.0)

    def fold(self, state: str | None, ts: float) -> None:
        """One ``session.status`` of the log: running starts or ends an interval."""
        if state == "running":
            if self.running_since is None:
                self.running_since = ts
        elif state and self.running_since is not None:
            self.closed_seconds += max(0.0, ts - self.running_since)
            self.running_since = None


class Budgets(LoggingConfigurable):
    """The limits (``c.Budgets.*``; 0 means no limit) and the spend they are checked against."""

    session_cost = Float(
        0.0,
        help="Dollars of model cost one session may spend, as OpenCode reports it per message "
        "(from the model's prices; see TabbiExtension.llm_pricing for an OpenAI-compatible "
        "server). A prompt past it is refused with HTTP 429; a turn that crosses it is stopped. "
        "0: no limit.",
    ).tag(config=True)
    user_cost = Float(
        0.0,
        help="Dollars of model cost all sessions of one user may spend together, deleted sessions "
        "included (their spend is kept when they are deleted). 0: no limit.",
    ).tag(config=True)
    session_sandbox_seconds = Float(
        0.0,
        help="Seconds one session's sandbox may run in total, over all its starts (idle time "
        "counts until idle_timeout pauses it). A prompt past it is refused with HTTP 429; a turn "
        "that crosses it is stopped. 0: no limit.",
    ).tag(config=True)
    user_sandbox_seconds = Float(
        0.0,
        help="Seconds the sandboxes of all sessions of one user may run in total, deleted sessions "
        "included. 0: no limit.",
    ).tag(config=True)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._spend: dict[str, Spend] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def active(self) -> bool:
        return any((self.session_cost, self.user_cost, self.session_sandbox_seconds,
                    self.user_sandbox_seconds))

    # -- reading spend ------------------------------------------------------------------------
    async def retire(self, store: Store, record: SessionRecord) -> None:
        """Keep the session's spend as its owner's retired spend (``Store.retire_spend``): called
        before the session is deleted, and again after with what it spent until it stopped
        (read from memory then: the store no longer has its messages and log)."""
        spend = await self.spend(store, record.id)
        # Finite however large the agent's reported costs add up to: a store refuses infinity,
        # and a session whose spend could not be kept could never be deleted.
        cost, seconds = (min(x, sys.float_info.max) for x in (spend.cost, spend.seconds(time.time())))
        await store.retire_spend(record.owner, record.id, cost, seconds)

    def forget(self, session_id: str) -> None:
        """Drop what was read of a deleted session (its spend was retired, ``retire``)."""
        self._spend.pop(session_id, None)
        self._locks.pop(session_id, None)

    async def model_usage_or_none(self, store: Store, session_id: str) -> dict[str, Any] | None:
        """``model_usage`` of the whole session, or None when the store cannot say now: what
        shows a session is worth more than its usage."""
        try:
            return await self.model_usage(store, session_id)
        except Exception:
            self.log.debug("tabbi: usage of session %s unknown", session_id, exc_info=True)
            return None

    async def spend(self, store: Store, session_id: str, times: bool = True) -> Spend:
        """The session's spend, loaded on first use and brought up to date with its log
        (``times=False``: its model use only, without reading the log for running times)."""
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        async with lock:
            spend = self._spend.get(session_id)
            if spend is None:
                spend = Spend()
                for message in await store.message_infos(session_id):
                    if message["role"] == "assistant":
                        spend.record(message["id"], message.get("info"))
                self._spend[session_id] = spend
            while times:
                events = await store.list_events(session_id, after=spend.seq, limit=1000)
                for event in events:
                    if event.type == "session.status":
                        spend.fold(event.data.get("state"), event.ts)
                    spend.seq = event.seq
                if len(events) < 1000:
                    break
            return spend

    async def usage(self, store: Store, record: SessionRecord) -> dict[str, float]:
        """What the session and its owner have spent: ``{session_cost, user_cost,
        session_seconds, user_seconds}``."""
        now = time.time()
        mine = await self.spend(store, record.id)
        user_cost, user_seconds = 0.0, 0.0
        if self.user_cost or self.user_sandbox_seconds:
            user_cost, user_seconds = await store.retired_spend(record.owner)
            for other in await store.list_sessions(record.owner):
                spend = mine if other.id == record.id else await self.spend(store, other.id)
                user_cost += spend.cost
                user_seconds += spend.seconds(now)
        return {"session_cost": mine.cost, "user_cost": user_cost,
                "session_seconds": mine.seconds(now), "user_seconds": user_seconds}

    async def model_usage(self, store: Store, session_id: str,
                          message_ids: Collection[str] | None = None) -> dict[str, Any]:
        """Tokens and cost of the session's model calls, as OpenCode reported them: of the
        messages ``message_ids`` (a turn's), or of the whole session. The same spend the
        budgets count: what people see is what is enforced."""
        return (await self.spend(store, session_id, times=False)).usage(message_ids)

    async def exceeded(self, store: Store, record: SessionRecord) -> str | None:
        """Which budget is used up, said with its spend and limit; None while all have room."""
        if not self.active:
            return None
        used = await self.usage(store, record)
        for key, limit, what in (
            ("session_cost", self.session_cost, "this session's model cost budget"),
            ("user_cost", self.user_cost,
             f"{record.owner}'s model cost budget (all sessions, deleted ones included)"),
            ("session_seconds", self.session_sandbox_seconds, "this session's sandbox time budget"),
            ("user_seconds", self.user_sandbox_seconds,
             f"{record.owner}'s sandbox time budget (all sessions, deleted ones included)"),
        ):
            if limit and used[key] >= limit:
                spent = (f"${used[key]:.4f} of ${limit:.4f}" if key.endswith("cost")
                         else f"{used[key]:.0f} s of {limit:.0f} s")
                return f"{what} is used up: {spent} (c.Budgets.{_trait(key)})"
        return None

    async def seconds_left(self, store: Store, record: SessionRecord) -> float:
        """Running time left before a time budget is used up (inf: no time budget)."""
        if not (self.session_sandbox_seconds or self.user_sandbox_seconds):
            return math.inf
        used = await self.usage(store, record)
        left = [limit - used[key] for key, limit in (("session_seconds", self.session_sandbox_seconds),
                                                     ("user_seconds", self.user_sandbox_seconds)) if limit]
        return min(left)

    # -- hooks of SessionAgent ----------------------------------------------------------------
    async def admit(self, agent: SessionAgent) -> None:
        """Before a prompt is queued: refuse it when a budget is used up."""
        why = await self.exceeded(agent.store, agent.record)
        if why is not None:
            raise BudgetExceeded(f"The prompt was refused: {why}.")

    async def on_message(self, agent: SessionAgent, message_id: str, role: str,
                         info: dict[str, Any]) -> None:
        """An assistant message reported its cost so far: count it, and stop the turn it
        belongs to if that crossed a budget. Without budgets it is still counted (what turns
        and sessions show), without reading the log for running times."""
        if role != "assistant":
            return
        spend = await self.spend(agent.store, agent.id, times=self.active)
        spend.record(message_id, info)
        if self.active:
            await self._stop_if_exceeded(agent)

    async def watch(self, agent: SessionAgent) -> None:
        """Once the agent has a turn's prompt: stop the turn at once if a budget was used up since
        the prompt was admitted (it waited in the queue), else when a time budget runs out."""
        turn = agent.current_turn
        if turn is None or not self.active:
            return
        await self._stop_if_exceeded(agent)
        while agent.current_turn is turn:
            left = await self.seconds_left(agent.store, agent.record)
            if left == math.inf:
                return
            if left <= 0:
                await self._stop_if_exceeded(agent)
                return
            await asyncio.sleep(min(left, WATCH_INTERVAL))  # a timer: the budget's deadline

    async def _stop_if_exceeded(self, agent: SessionAgent) -> None:
        turn = agent.current_turn
        if turn is None:
            return
        why = await self.exceeded(agent.store, agent.record)
        if why is not None:
            self.log.info("tabbi: session %s: turn stopped: %s", agent.id, why)
            await agent.stop_turn(turn, "BudgetExceeded", f"The turn was stopped: {why}.")


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def tokens_of(info: dict[str, Any] | None) -> dict[str, Any]:
    """A message's ``tokens`` as OpenCode reports them, with every count present (0 when
    missing or not a count): ``{input, output, reasoning, cache: {read, write}}``."""
    raw = (info or {}).get("tokens")
    raw = raw if isinstance(raw, dict) else {}
    cache = raw.get("cache") if isinstance(raw.get("cache"), dict) else {}
    return {"input": _count(raw.get("input")), "output": _count(raw.get("output")),
            "reasoning": _count(raw.get("reasoning")),
            "cache": {"read": _count(cache.get("read")), "write": _count(cache.get("write"))}}


def add_tokens(total: dict[str, Any], more: dict[str, Any]) -> None:
    """Add ``more`` (a ``tokens_of``) into ``total``."""
    for key in ("input", "output", "reasoning"):
        total[key] += more.get(key, 0)
    for key in ("read", "write"):
        total["cache"][key] += (more.get("cache") or {}).get(key, 0)


def _cost(info: dict[str, Any] | None) -> float:
    try:
        value = float((info or {}).get("cost") or 0.0)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


def _trait(key: str) -> str:
    return {"session_cost": "session_cost", "user_cost": "user_cost",
            "session_seconds": "session_sandbox_seconds", "user_seconds": "user_sandbox_seconds"}[key]
