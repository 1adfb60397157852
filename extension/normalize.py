"""Turning OpenCode's SSE events into tabbi's own small event vocabulary.

Clients (the widget, ``%%tabbi``, the Python API) never see OpenCode payloads: those change between
OpenCode versions and carry paths and internals. They see these types, each with a small ``data``:

=====================  ===========================================================================
``session.status``     tabbi's lifecycle: ``{state, phase?, error?}`` (starting, running, error...)
``prompt.queued``      ``{prompt_id, text}`` a prompt waits for its turn
``turn.started``       ``{prompt_id, text}``
``message``            ``{message_id, role}`` a user or assistant message began
``text.delta``         ``{message_id, part_id, field, delta}`` streamed text (``field``: text, reasoning)
``part.updated``       ``{message_id, part_id, part_type, role, text?, files?}`` a text/reasoning/patch part
``tool``               ``{message_id, part_id, call_id, tool, status, title, input, output, error}``
``permission.asked``   ``{permission_id, permission, patterns, metadata}``
``permission.replied`` ``{permission_id, reply}``
``agent.status``       ``{status: busy|idle|retry, message?, attempt?}``
``error``              ``{name, message}`` (model errors, tool-independent agent errors, faults)
``turn.finished``      ``{prompt_id, outcome: completed|aborted|error, error?}``
``turn.waiting``       ``{prompt_id, waiting}`` the turn starts/stops waiting for the model (emitted by
                       the agent: from its start, and after its tool calls, until the model answers)
``snapshot.saved``     ``{snapshot_id, size, reason, seconds}`` (emitted by the agent, not OpenCode)
``snapshot.failed``    ``{reason, message}``: the sandbox keeps running; the next turn retries
``push.completed``     ``{branch, commit, files, links}`` the work was pushed (emitted by the push)
``environment``        ``{status: syncing|setup|synced, ...}`` a warm start's sync (``environments.py``)
``admin.action``       ``{action, by, was}`` an admin paused or stopped the session (``admin.py``)
=====================  ===========================================================================

The normalizer is pure bookkeeping (no I/O), so it is unit-tested against recorded payloads. It is
OpenCode's half of the agent runtime (``runtime.py``): everything that knows OpenCode's event
envelopes and error names is here or in ``opencode.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .runtime import Normalized, Signals

#: Keys of tool inputs and permission metadata that hold paths.
PATH_KEYS = {"filepath", "path", "parentdir"}

#: Tool output can be large (a whole file read); events keep the head of it.
MAX_TOOL_TEXT = 20_000


#: OpenCode's name for "the turn was aborted because someone asked".
ABORTED = "MessageAbortedError"


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_TOOL_TEXT:
        return value[:MAX_TOOL_TEXT] + f"\n... [{len(value) - MAX_TOOL_TEXT} more characters]"
    return value


def error_message(error: dict[str, Any] | None) -> str:
    """A readable one-line message from OpenCode's error objects (``{name, data: {message}}``)."""
    if not error:
        return "unknown error"
    data = error.get("data") or {}
    message = data.get("message") or error.get("message") or ""
    name = error.get("name") or "Error"
    if name == ABORTED:
        return "The turn was aborted."
    status = data.get("statusCode")
    prefix = f"{name} (HTTP {status})" if status else name
    return f"{prefix}: {message}" if message else prefix


@dataclass
class EventNormalizer:
    """Normalizes the events of one OpenCode session; remembers message roles across events."""

    opencode_session_id: str
    roles: dict[str, str] = field(default_factory=dict)
    last_status: str | None = None
    #: The workspace as OpenCode sees it; paths under it are reported relative to it, so clients
    #: see ``src/x.py`` rather than a sandbox's internal layout.
    root: str | None = None

    def relative(self, value: Any) -> Any:
        if isinstance(value, str) and self.root and value.startswith(self.root + "/"):
            return value[len(self.root) + 1 :]
        return value

    def _relative_input(self, data: dict[str, Any]) -> dict[str, Any]:
        return {k: self.relative(v) if k.lower() in PATH_KEYS else v for k, v in data.items()}

    def session_of(self, event: dict[str, Any]) -> str | None:
        props = event.get("properties") or {}
        if "sessionID" in props:
            return props["sessionID"]
        for key in ("part", "info"):
            inner = props.get(key)
            if isinstance(inner, dict) and "sessionID" in inner:
                return inner["sessionID"]
        return None

    def feed(self, event: dict[str, Any]) -> tuple[list[Normalized], Signals]:
        signals = Signals()
        if self.session_of(event) != self.opencode_session_id:
            return [], signals
        kind = event.get("type", "")
        props = event.get("properties") or {}
        handler = getattr(self, "_on_" + kind.replace(".", "_"), None)
        if handler is None:
            return [], signals
        return handler(props, signals), signals

    # -- one method per OpenCode event type ---------------------------------------------------
    def _on_message_updated(self, props: dict, signals: Signals) -> list[Normalized]:
        info = props.get("info") or {}
        message_id, role = info.get("id"), info.get("role")
        if not message_id or not role:
            return []
        out = []
        root = (info.get("path") or {}).get("root")
        if root:
            self.root = root.rstrip("/")
        if message_id not in self.roles:
            out.append(Normalized("message", {"message_id": message_id, "role": role}))
        self.roles[message_id] = role
        kept = ("time", "modelID", "providerID", "cost", "tokens")  # usage: metrics and budgets
        signals.message = (message_id, role, {k: info[k] for k in kept if k in info})
        if info.get("error") and info["error"].get("name") != ABORTED:
            _signal_error(signals, info["error"])
        return out

    def _on_message_part_delta(self, props: dict, signals: Signals) -> list[Normalized]:
        if not props.get("delta"):
            return []
        return [
            Normalized(
                "text.delta",
                {
                    "message_id": props.get("messageID"),
                    "part_id": props.get("partID"),
                    "field": props.get("field", "text"),
                    "delta": props["delta"],
                },
            )
        ]

    def _on_message_part_updated(self, props: dict, signals: Signals) -> list[Normalized]:
        part = props.get("part") or {}
        ptype = part.get("type")
        message_id, part_id = part.get("messageID"), part.get("id")
        role = self.roles.get(message_id, "assistant")
        if ptype == "tool":
            state = part.get("state") or {}
            data = {
                "message_id": message_id,
                "part_id": part_id,
                "call_id": part.get("callID"),
                "tool": part.get("tool"),
                "status": state.get("status"),
                "title": state.get("title"),
                "input": self._relative_input(state.get("input") or {}),
                "output": _clip(state.get("output")),
                "error": _clip(state.get("error")),
            }
            signals.part = (message_id, part_id, {"type": "tool", **data})
            return [Normalized("tool", data)]
        if ptype == "text" and role == "user" and part.get("synthetic"):
            return []  # text added to the person's message for the model (attachments): not theirs
        if ptype in ("text", "reasoning"):
            data = {
                "message_id": message_id,
                "part_id": part_id,
                "part_type": ptype,
                "role": role,
                "text": part.get("text", ""),
            }
            signals.part = (message_id, part_id, {"type": ptype, "text": data["text"]})
            return [Normalized("part.updated", data)]
        if ptype == "patch":
            data = {
                "message_id": message_id,
                "part_id": part_id,
                "part_type": "patch",
                "role": role,
                "files": [self.relative(f) for f in part.get("files") or []],
            }
            signals.part = (message_id, part_id, {"type": "patch", "files": data["files"]})
            return [Normalized("part.updated", data)]
        return []  # step-start, step-finish, snapshot...: bookkeeping of OpenCode's

    def _on_permission_asked(self, props: dict, signals: Signals) -> list[Normalized]:
        return [
            Normalized(
                "permission.asked",
                {
                    "permission_id": props.get("id"),
                    "permission": props.get("permission"),
                    "patterns": props.get("patterns") or [],
                    "metadata": self._relative_input(props.get("metadata") or {}),
                },
            )
        ]

    def _on_permission_replied(self, props: dict, signals: Signals) -> list[Normalized]:
        return [
            Normalized(
                "permission.replied",
                {"permission_id": props.get("requestID"), "reply": props.get("reply")},
            )
        ]

    def _on_session_status(self, props: dict, signals: Signals) -> list[Normalized]:
        status = props.get("status") or {}
        kind = status.get("type")
        if kind not in ("busy", "idle", "retry"):
            return []
        if kind == self.last_status and kind != "retry":
            return []  # OpenCode repeats "busy" at every step; clients need the changes
        self.last_status = kind
        data: dict[str, Any] = {"status": kind}
        if kind == "retry":
            data["attempt"] = status.get("attempt")
            data["message"] = status.get("message")
        return [Normalized("agent.status", data)]

    def _on_session_idle(self, props: dict, signals: Signals) -> list[Normalized]:
        signals.idle = True
        return []

    def _on_session_error(self, props: dict, signals: Signals) -> list[Normalized]:
        _signal_error(signals, props.get("error") or {})
        return []


def _signal_error(signals: Signals, error: dict[str, Any]) -> None:
    if error.get("name") == ABORTED:
        signals.aborted = True
    else:
        signals.error = (error.get("name") or "Error", error_message(error))
