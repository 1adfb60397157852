"""The session state machine, in one place.

``idle -> starting -> running <-> paused``; ``error`` is reachable from every state and a session
leaves it by starting again (a prompt to an errored session restarts its sandbox). ``starting ->
paused`` happens when a server restart finds a session that was starting and has a snapshot.
``deleted`` is final. Anything else is a bug, and ``check_transition`` says so.
"""

from __future__ import annotations

IDLE, STARTING, RUNNING, PAUSED, ERROR, DELETED = (
    "idle",
    "starting",
    "running",
    "paused",
    "error",
    "deleted",
)

TRANSITIONS: dict[str, set[str]] = {
    IDLE: {STARTING, ERROR, DELETED},
    STARTING: {RUNNING, PAUSED, ERROR, DELETED},
    RUNNING: {PAUSED, ERROR, DELETED},
    PAUSED: {STARTING, ERROR, DELETED},
    ERROR: {STARTING, ERROR, DELETED},
    DELETED: set(),
}

#: States in which a sandbox is (or should be) alive.
LIVE = {STARTING, RUNNING}


class InvalidTransition(RuntimeError):
    pass


def check_transition(current: str, new: str) -> None:
    if new not in TRANSITIONS.get(current, set()):
        raise InvalidTransition(f"a session cannot go from {current!r} to {new!r}")
