"""Folding a session's event log into what people see: messages with parts, turns, status.

One reducer serves the chat panel (which replays the log and then follows it live) and
``%tabbi insert`` (which needs the last turn's code), so both always agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Event = dict[str, Any]


@dataclass
class Turn:
    prompt_id: str
    text: str
    start_seq: int
    end_seq: int | None = None
    outcome: str | None = None
    error: str | None = None
    message_ids: list[str] = field(default_factory=list)


@dataclass
class Conversation:
    state: str = "idle"
    phase: str | None = None
    error: str | None = None
    busy: bool = False
    last_seq: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    permissions: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``push.completed`` data, oldest first.
    pushes: list[dict[str, Any]] = field(default_factory=list)
    _by_id: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    def apply(self, event: Event) -> None:
        if event["seq"] <= self.last_seq:
            return  # already seen (a replay overlapping the live stream)
        self.last_seq = event["seq"]
        handler = getattr(self, "_on_" + event["type"].replace(".", "_"), None)
        if handler is not None:
            handler(event["data"], event["seq"])

    def apply_all(self, events: list[Event]) -> Conversation:
        for event in events:
            self.apply(event)
        return self

    @property
    def current_turn(self) -> Turn | None:
        return self.turns[-1] if self.turns and self.turns[-1].end_seq is None else None

    def last_finished_turn(self) -> Turn | None:
        done = [t for t in self.turns if t.end_seq is not None]
        return done[-1] if done else None

    @property
    def turn_error(self) -> str | None:
        """The error of the latest turn, if it failed (a later turn clears it)."""
        turn = self.turns[-1] if self.turns else None
        return turn.error or "the turn failed" if turn and turn.outcome == "error" else None

    def turn_messages(self, turn: Turn) -> list[dict[str, Any]]:
        return [self._by_id[m] for m in turn.message_ids if m in self._by_id]

    # -- events ---------------------------------------------------------------------------------
    def _on_session_status(self, data: dict, seq: int) -> None:
        self.state = data.get("state", self.state)
        self.phase = data.get("phase")
        self.error = data.get("error") if self.state == "error" else None

    def _on_turn_started(self, data: dict, seq: int) -> None:
        self.turns.append(Turn(data["prompt_id"], data.get("text", ""), seq))
        self.busy = True

    def _on_turn_finished(self, data: dict, seq: int) -> None:
        turn = self.current_turn
        if turn is not None and turn.prompt_id == data.get("prompt_id"):
            turn.end_seq, turn.outcome, turn.error = seq, data.get("outcome"), data.get("error")
        self.busy = False
        self.permissions.clear()

    def _on_message(self, data: dict, seq: int) -> None:
        message_id = data["message_id"]
        if message_id in self._by_id:
            return
        message = {"id": message_id, "role": data["role"], "parts": []}
        self._by_id[message_id] = message
        self.messages.append(message)
        if self.current_turn is not None:
            self.current_turn.message_ids.append(message_id)

    def _part(self, message_id: str, part_id: str, kind: str) -> dict[str, Any]:
        message = self._by_id.get(message_id)
        if message is None:  # a part before its message: keep it rather than lose it
            self._on_message({"message_id": message_id, "role": "assistant"}, 0)
            message = self._by_id[message_id]
        for part in message["parts"]:
            if part["id"] == part_id:
                return part
        part = {"id": part_id, "type": kind}
        message["parts"].append(part)
        return part

    def _on_text_delta(self, data: dict, seq: int) -> None:
        kind = "reasoning" if data.get("field") == "reasoning" else "text"
        part = self._part(data["message_id"], data["part_id"], kind)
        part["text"] = part.get("text", "") + data["delta"]

    def _on_part_updated(self, data: dict, seq: int) -> None:
        part = self._part(data["message_id"], data["part_id"], data["part_type"])
        if data["part_type"] in ("text", "reasoning"):
            # The final text replaces the streamed one; an empty "started" update keeps the deltas.
            if data.get("text") or not part.get("text"):
                part["text"] = data.get("text", "")
        elif data["part_type"] == "patch":
            part["files"] = data.get("files", [])

    def _on_tool(self, data: dict, seq: int) -> None:
        part = self._part(data["message_id"], data["part_id"], "tool")
        part.update({k: data.get(k) for k in ("tool", "status", "title", "input", "output", "error")})

    def _on_permission_asked(self, data: dict, seq: int) -> None:
        self.permissions[data["permission_id"]] = data

    def _on_permission_replied(self, data: dict, seq: int) -> None:
        self.permissions.pop(data.get("permission_id"), None)

    def _on_push_completed(self, data: dict, seq: int) -> None:
        self.pushes.append(data)
