"""tabbi's log lines: one per event worth an operator's attention, as text or as JSON.

Why a module of its own: the operator's first question when something breaks is "which session,
whose, since when, why", so every line about a session carries its id and owner as fields, and
a log pipeline can parse them (``c.TabbiExtension.log_style = "json"``, the default of the hub
service) instead of grepping sentences.

What is logged where (see docs/operations.md for the event names):

- ``INFO``: lifecycle (session created, state changes, deleted), turns begun and finished (with
  their duration), snapshots, pushes.
- ``WARNING``: faults, failed turns, snapshots and pushes, store retries, refused requests.
- ``DEBUG``: the prompt's text and the model's text. **Prompts and model output never go to
  INFO or above, and no secret goes anywhere**: lines carry ids, counts, durations and tabbi's
  own error messages, never a token, key or password (``tests/test_logs.py`` plants them and
  looks).

``tabbi_extension`` and ``tabbi_sandbox`` log through the standard ``logging`` module; ``install``
gives those two loggers one handler (on stderr, where Jupyter logs) with the chosen format, and in
JSON mode gives Jupyter's own log the same format, so that the service's whole output is JSON.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

#: The loggers tabbi's code logs to (their children included).
TABBI_LOGGERS = ("tabbi_extension", "tabbi_sandbox")
#: Attribute of a ``LogRecord`` holding an event's fields (``event``, ``session``, ``owner``, ...).
FIELDS = "tabbi"
#: Longest message a line carries (a longer one is cut, saying by how much).
_TEXT_LIMIT = 2000


def event(logger: logging.Logger, level: int, name: str, message: str = "", **fields: Any) -> None:
    """Log event ``name`` with ``fields`` (JSON-able values: ids, counts, durations, states).
    ``message`` is the human sentence (default: the event name); in text format the fields
    follow it as ``key=value``."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", message or name, extra={FIELDS: {"event": name, **fields}})


class SessionLog:
    """Events about one session: every line carries its ``session`` id and ``owner``."""

    def __init__(self, logger: logging.Logger, session_id: str, owner: str):
        self.logger = logger
        self.context = {"session": session_id, "owner": owner}

    def event(self, level: int, name: str, message: str = "", **fields: Any) -> None:
        event(self.logger, level, name, message, **self.context, **fields)

    def debug(self, name: str, message: str = "", **fields: Any) -> None:
        self.event(logging.DEBUG, name, message, **fields)

    def info(self, name: str, message: str = "", **fields: Any) -> None:
        self.event(logging.INFO, name, message, **fields)

    def warning(self, name: str, message: str = "", **fields: Any) -> None:
        self.event(logging.WARNING, name, message, **fields)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, the
    event's fields (``event``, ``session``, ``owner``, ...) and ``exception`` (a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _clip(record.getMessage()),
        }
        for key, value in (getattr(record, FIELDS, None) or {}).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Jupyter's layout (``[I 2026-11-27 08:00:00.000 tabbi_extension.agent] ...``), the event's
    fields appended as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("[%(levelname)1.1s %(asctime)s.%(msecs)03d %(name)s] %(message)s",
                         "%Y-%m-%d %H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = {k: v for k, v in (getattr(record, FIELDS, None) or {}).items() if k != "event"}
        if fields:
            text += " " + " ".join(f"{k}={_plain(v)}" for k, v in fields.items())
        return text


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (as logging's last-resort handler does), so
    a replaced stderr (a test's capture, a daemon's redirect) never gets a closed stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


_handler = _Stderr()
#: Jupyter's own handlers whose formatter JSON mode replaced, with the formatter they had.
_replaced: list[tuple[logging.Handler, logging.Formatter | None]] = []


def install(fmt: str, level: int, app_logs: Sequence[logging.Logger] = ()) -> None:
    """Log tabbi's lines at ``level`` and above in format ``fmt`` (``text`` or ``json``); with
    ``json``, the lines of Jupyter's own loggers (``app_logs``: the server's, the extension
    app's) too. Idempotent: the last call's settings hold (one process may host several servers
    in tests)."""
    uninstall()
    _handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for name in TABBI_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.addHandler(_handler)
    for handler in {h for log in app_logs for h in log.handlers} if fmt == "json" else ():
        _replaced.append((handler, handler.formatter))
        handler.setFormatter(JsonFormatter())


def uninstall() -> None:
    """Undo ``install`` (a server stopping)."""
    for name in TABBI_LOGGERS:
        logging.getLogger(name).removeHandler(_handler)
    while _replaced:
        handler, formatter = _replaced.pop()
        handler.setFormatter(formatter)  # type: ignore[arg-type]


def _plain(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (not text or any(c in text for c in " \"=\n")) else text


def _clip(text: str) -> str:
    return text if len(text) <= _TEXT_LIMIT else text[:_TEXT_LIMIT] + f"... [{len(text) - _TEXT_LIMIT} more]"
