"""Prompts sent over a session's event stream WebSocket (``/tabbi/api/sessions/<id>/stream``).

A client that holds the stream open may queue a prompt on it instead of a ``POST .../prompt``:
it sends ``{"type": "prompt", "text": ..., "ref"?: ...}`` and gets back, as a frame without a
``seq`` (event frames always have one), ``{"type": "prompt.accepted", "ref", "prompt_id",
"position"}`` or ``{"type": "prompt.refused", "ref", "status", "message", ...}`` with the status
and JSON body the REST route would have answered (a 429 names the limit and ``retry_after``).

Why here and not only REST: it is the same prompt, so it goes through the same door
(``TabbiLimits.prompt``): the same validation, the same ownership (the socket was opened on
the person's own session), the same per-person rate limit, and it needs the permission to
write, not only to read. Messages are handled one at a time, in order (tornado waits for one
to be handled before it reads the next), so a flood over one socket is refused like a flood
over REST.
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_core.utils import ensure_async

from .agent import AgentError
from .limits import LimitExceeded
from .validation import ValidationError, validate_prompt

MAX_MESSAGE_BYTES = 512 * 1024
MAX_REF_CHARS = 100


async def receive(socket: Any, message: str | bytes) -> None:
    """Handle one message of ``socket`` (an ``EventsSocket``), answering with one frame."""
    ref = None
    try:
        if len(message) > MAX_MESSAGE_BYTES:
            raise AgentError(f"the message is larger than {MAX_MESSAGE_BYTES} bytes", 413)
        try:
            data = json.loads(message)
        except (ValueError, RecursionError):
            raise ValidationError("the message is not valid JSON") from None
        if not isinstance(data, dict) or data.get("type") != "prompt":
            raise ValidationError('send {"type": "prompt", "text": ...}; nothing else is understood')
        ref = data.get("ref")
        if ref is not None and (not isinstance(ref, str) or len(ref) > MAX_REF_CHARS):
            ref = None
            raise ValidationError(f"'ref' must be a string of at most {MAX_REF_CHARS} characters")
        allowed = await ensure_async(
            socket.authorizer.is_authorized(socket, socket.current_user, "write", socket.auth_resource)
        )
        if not allowed:
            raise AgentError("you may not send prompts on this server", 403)
        text = validate_prompt(data.get("text"), socket.settings["tabbi_max_prompt_chars"])
        prompt = await socket.settings["tabbi_limits"].prompt(socket.owner, socket.agent, text)
    except LimitExceeded as exc:
        await _reply(socket, {"type": "prompt.refused", "ref": ref, "status": exc.status, **exc.public()})
    except ValidationError as exc:
        await _reply(socket, {"type": "prompt.refused", "ref": ref, "status": 400, "message": str(exc)})
    except AgentError as exc:
        await _reply(socket, {"type": "prompt.refused", "ref": ref, "status": exc.status,
                              "message": str(exc)})
    else:
        await _reply(socket, {"type": "prompt.accepted", "ref": ref, "prompt_id": prompt.id,
                              "position": prompt.position})


async def _reply(socket: Any, frame: dict[str, Any]) -> None:
    if socket.ws_connection is not None and not socket.ws_connection.is_closing():
        await socket.write_message(json.dumps(frame))
