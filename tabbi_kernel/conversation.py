"""Folding a session's event log into what people see: messages with parts, turns, status.

One reducer serves the chat panel (which replays the log and then follows it live) and
``%tabbi insert`` (which needs the last turn's code), so both always agree. The transcript
(``transcript_text``/``transcript_html``) is what a saved notebook keeps of a panel: readable
without a kernel, a widget manager or any script.
"""

from __future__ import annotations

import html
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
    #: When the turn started (the event's server time, epoch seconds).
    started_at: float | None = None
    #: Since when the turn waits for the model (``turn.waiting``; None: it does not).
    waiting_since: float | None = None
    #: What the person attached to the prompt: ``{kind, label, bytes, truncated}`` each.
    attachments: list[dict[str, Any]] = field(default_factory=list)
    #: The turn's model use as OpenCode reported it (``turn.finished``): ``{tokens, cost,
    #: session}``; None before it ends (or from a server that does not report it).
    usage: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """What the panel's front end needs to label the turn (not its message list)."""
        return {"prompt_id": self.prompt_id, "text": self.text, "outcome": self.outcome,
                "error": self.error, "started_at": self.started_at, "attachments": self.attachments,
                "usage": self.usage}


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
    #: ``push.completed`` data (plus the event's ``seq``), oldest first.
    pushes: list[dict[str, Any]] = field(default_factory=list)
    #: The model provider's retry notice while the agent retries (``agent.status`` retry).
    retry: str | None = None
    #: The server says when a turn waits for the model (``turn.waiting``); older servers do not.
    waiting_signal: bool = False
    _by_id: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    _ts: float | None = field(default=None, repr=False)

    def apply(self, event: Event) -> None:
        if event["seq"] <= self.last_seq:
            return  # already seen (a replay overlapping the live stream)
        self.last_seq = event["seq"]
        handler = getattr(self, "_on_" + event["type"].replace(".", "_"), None)
        if handler is not None:
            self._ts = event.get("ts")
            handler(event["data"], event["seq"])

    def apply_all(self, events: list[Event]) -> Conversation:
        for event in events:
            self.apply(event)
        return self

    @property
    def current_turn(self) -> Turn | None:
        return self.turns[-1] if self.turns and self.turns[-1].end_seq is None else None

    def last_finished_turn(self) -> Turn | None:
        done = self.finished_turns()
        return done[0] if done else None

    def finished_turns(self) -> list[Turn]:
        """Finished turns, newest first (``insert`` looks back past turns without code)."""
        return [t for t in reversed(self.turns) if t.end_seq is not None]

    @property
    def current_push(self) -> dict[str, Any] | None:
        """The last push, unless a turn started after it (then it is old news)."""
        if not self.pushes:
            return None
        push = self.pushes[-1]
        return None if self.turns and self.turns[-1].start_seq > push["seq"] else push

    def find_part(self, message_id: str, part_id: str) -> dict[str, Any] | None:
        for part in self._by_id.get(message_id, {}).get("parts", []):
            if part["id"] == part_id:
                return part
        return None

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
        self.turns.append(Turn(data["prompt_id"], data.get("text", ""), seq, started_at=self._ts,
                               attachments=list(data.get("attachments") or [])))
        self.busy, self.retry = True, None

    def _on_turn_finished(self, data: dict, seq: int) -> None:
        turn = self.current_turn
        if turn is not None and turn.prompt_id == data.get("prompt_id"):
            turn.end_seq, turn.outcome, turn.error = seq, data.get("outcome"), data.get("error")
            if "tokens" in data:
                turn.usage = {k: data.get(k) for k in ("tokens", "cost", "session")}
        self.busy, self.retry = False, None
        self.permissions.clear()

    def _on_turn_waiting(self, data: dict, seq: int) -> None:
        self.waiting_signal = True
        turn = self.current_turn
        if turn is not None and turn.prompt_id == data.get("prompt_id"):
            turn.waiting_since = (self._ts or 0.0) if data.get("waiting") else None

    @property
    def waiting_since(self) -> float | None:
        """Since when the current turn waits for the model, as the server said (see
        ``waiting_signal``)."""
        turn = self.current_turn
        return turn.waiting_since if turn is not None else None

    def _on_agent_status(self, data: dict, seq: int) -> None:
        self.retry = (data.get("message") or "the model provider asked to retry") \
            if data.get("status") == "retry" else None

    def _on_message(self, data: dict, seq: int) -> None:
        message_id = data["message_id"]
        if message_id in self._by_id:
            return
        turn = self.current_turn
        message = {"id": message_id, "role": data["role"], "parts": [],
                   "turn": turn.prompt_id if turn else None}
        if data["role"] == "user" and turn is not None and turn.attachments \
                and not any(m["role"] == "user" for m in self.turn_messages(turn)):
            message["attachments"] = turn.attachments  # the prompt's message shows what went with it
        self._by_id[message_id] = message
        self.messages.append(message)
        if turn is not None:
            turn.message_ids.append(message_id)

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
        self.pushes.append({**data, "seq": seq})


# -- the transcript a saved notebook keeps ----------------------------------------------------
OUTCOME_LABELS = {"aborted": "turn aborted", "error": "turn ended with an error"}


def _lines(conversation: Conversation) -> list[tuple[str, str, str | None]]:
    """(kind, text, turn id) rows in order: prompts, replies, tool one-liners, turn labels."""
    rows: list[tuple[str, str, str | None]] = []
    outcomes = {t.prompt_id: t for t in conversation.turns}
    last_of_turn = {m["turn"]: m["id"] for m in conversation.messages if m.get("turn")}
    labelled: set[str] = set()
    for message in conversation.messages:
        for part in message["parts"]:
            if part["type"] == "text" and part.get("text"):
                rows.append((message["role"], part["text"], message.get("turn")))
            elif part["type"] == "tool":
                title = part.get("title") or (part.get("input") or {}).get("filePath") or ""
                rows.append(("tool", f"{part.get('tool', 'tool')} {title}".strip()
                             + f" ({part.get('status', 'pending')})", message.get("turn")))
        if message.get("attachments"):
            rows.append(("attached", attached_line(message["attachments"]), message.get("turn")))
        turn = outcomes.get(message.get("turn") or "")
        if turn and last_of_turn.get(turn.prompt_id) == message["id"] and turn.outcome in OUTCOME_LABELS:
            labelled.add(turn.prompt_id)
            rows.append(("label", OUTCOME_LABELS[turn.outcome] + (f": {turn.error}" if turn.error else ""),
                         turn.prompt_id))
    for turn in conversation.turns:  # a turn that ended before any message
        if turn.outcome in OUTCOME_LABELS and turn.prompt_id not in labelled:
            rows.append(("user", turn.text, turn.prompt_id))
            if turn.attachments:
                rows.append(("attached", attached_line(turn.attachments), turn.prompt_id))
            rows.append(("label", OUTCOME_LABELS[turn.outcome], turn.prompt_id))
    return rows


def attached_line(attachments: list[dict[str, Any]]) -> str:
    """``attached: df (variable, 1.2 KB), @error (error, 3.0 KB, truncated)``."""
    from .context import human_bytes  # a light module; imported here to keep this one standalone

    return "attached: " + ", ".join(
        f"{a.get('label')} ({a.get('kind')}, {human_bytes(int(a.get('bytes') or 0))}"
        f"{', truncated' if a.get('truncated') else ''})" for a in attachments)


def transcript_text(conversation: Conversation, title: str) -> str:
    who = {"user": "you", "assistant": "agent", "tool": "  tool", "label": "  --", "attached": "  +"}
    out = [title]
    for kind, text, _ in _lines(conversation):
        out.append(f"{who.get(kind, kind)}: {text}" if kind != "label" else f"  -- {text} --")
    return "\n".join(out)


TRANSCRIPT_STYLE = """<style>
/* Live: the panel is rendered in this cell's output, so the saved transcript steps aside. */
.jp-OutputArea:has(.tabbi-panel) > .jp-OutputArea-child:has(.tabbi-transcript) { display: none; }
/* Saved, kernel gone: the widget output can only say "model not found" (text, no element inside);
   the transcript stands in. (:has() cannot nest, so the output itself hides, not its row.) */
.jp-OutputArea:has(.tabbi-transcript) .jp-OutputArea-output.jupyter-widgets:not(:has(*)) { display: none; }
.tabbi-transcript { font-family: var(--jp-ui-font-family, sans-serif); border-left: 3px solid #8c959f;
  padding: 2px 10px; }
.tabbi-transcript .tt-row { white-space: pre-wrap; margin: 3px 0; }
.tabbi-transcript .tt-user { font-weight: 600; }
.tabbi-transcript .tt-tool, .tabbi-transcript .tt-label, .tabbi-transcript .tt-attached { color: #656d76;
  font-size: 90%; }
</style>"""


def transcript_html(conversation: Conversation, title: str) -> str:
    """Escaped throughout: model and repository text is shown, never interpreted."""
    rows = [f'<div class="tt-row tt-{kind}" data-turn="{html.escape(turn or "")}">'
            f'{"&#9656; " if kind == "user" else ""}{html.escape(text)}</div>'
            for kind, text, turn in _lines(conversation)]
    return (f'{TRANSCRIPT_STYLE}<div class="tabbi-transcript"><div class="tt-title">'
            f"<b>{html.escape(title)}</b></div>{''.join(rows)}</div>")
