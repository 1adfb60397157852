"""The agent runtime: what a session needs from the coding agent inside its sandbox.

``SessionAgent`` drives turns through this interface and nothing else. OpenCode is the one
implementation (``opencode.py``, with its event normalizer in ``normalize.py``): its session ids,
event envelopes, millisecond timestamps and error names stay behind it. The types here are
tabbi's own vocabulary, the same whatever agent runs.
"""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any


class AgentRuntimeError(Exception):
    """The agent answered with an error or not at all; the message is readable."""


@dataclass
class Normalized:
    """One event for tabbi's log (see ``normalize.py`` for the vocabulary)."""

    type: str
    data: dict[str, Any]


@dataclass
class Signals:
    """What the session must act on, besides logging the events."""

    #: The agent has finished what it was doing (a turn ends on it, once its prompt arrived).
    idle: bool = False
    #: The agent stopped the current turn because it was asked to.
    aborted: bool = False
    #: ``(name, readable message)`` of an error the agent reported.
    error: tuple[str, str] | None = None
    message: tuple[str, str, dict[str, Any]] | None = None  # (message_id, role, info)
    part: tuple[str, str, dict[str, Any]] | None = None  # (message_id, part_id, part)

    def __bool__(self) -> bool:
        return bool(self.idle or self.aborted or self.error or self.message or self.part)


@dataclass
class Update:
    """What one agent event means for the session: events to log, signals to act on."""

    events: list[Normalized] = field(default_factory=list)
    signals: Signals = field(default_factory=Signals)
    #: When it was received (``time.monotonic()``): where the delta latency metric starts.
    received: float = field(default_factory=time.monotonic)


class AgentRuntime(abc.ABC):
    """The agent server of one running sandbox."""

    @abc.abstractmethod
    async def open(self, conversation: str | None, *, must_exist: bool = False) -> str:
        """Continue ``conversation`` (the id ``open`` returned before), or start a new one when it
        is None or gone, unless ``must_exist``: then raise. Return the conversation's id."""

    @abc.abstractmethod
    def updates(self) -> AsyncIterator[Update | None]:
        """The agent's live events, as updates, until the connection ends (returns or raises).
        ``None`` marks the moment the feed is connected: events before it were not seen."""

    @abc.abstractmethod
    async def replay(self, persisted: list[dict[str, Any]]) -> list[Update]:
        """Updates that bring ``persisted`` (the store's messages, with their parts) up to the
        agent's current truth: what changed while nobody listened."""

    @abc.abstractmethod
    async def busy(self) -> bool:
        """Whether the agent is working on the conversation now."""

    @abc.abstractmethod
    async def received_prompt_since(self, when: float) -> bool:
        """Whether the agent holds a prompt of the person that arrived after ``when`` (epoch s)."""

    @abc.abstractmethod
    async def prompt(self, text: str, model: dict[str, str] | None, attachments: Sequence[str] = ()) -> None:
        """Hand the agent a prompt (and the attachments' blocks of text that go with it); returns
        once it accepted it (the turn runs on)."""

    @abc.abstractmethod
    async def abort(self) -> None: ...

    @abc.abstractmethod
    async def reply_permission(self, permission_id: str, reply: str) -> None: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...
