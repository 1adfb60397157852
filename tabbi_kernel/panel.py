"""The chat panel: an anywidget (Python traitlets + one ES module, no build step).

The kernel side follows the session's events over tabbi's WebSocket in a background asyncio task
(the kernel stays free), folds them with the same ``Conversation`` reducer the magics use, and syncs
the result to the browser as traitlets. Every panel replays the log from seq 0 when it opens and
resumes from its last seq after a reconnect, so several panels on one session agree.

The browser side never talks to the server or OpenCode: it renders traitlets and sends the
person's actions (prompt, abort, permission answers, ...) back as widget messages.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from pathlib import Path
from typing import Any

import anywidget
import traitlets

from . import render
from .client import Session, TabbiError
from .conversation import Conversation
from .snippets import cell_source, turn_snippets

log = logging.getLogger(__name__)
HERE = Path(__file__).parent

#: Coalesce bursts of events (streamed text) into one sync to the browser.
FLUSH_SECONDS = 0.05


class ChatPanel(anywidget.AnyWidget):
    _esm = HERE / "panel.js"
    _css = HERE / "panel.css"

    session_id = traitlets.Unicode("").tag(sync=True)
    repo = traitlets.Unicode("").tag(sync=True)
    branch = traitlets.Unicode("").tag(sync=True)
    state = traitlets.Unicode("idle").tag(sync=True)
    phase = traitlets.Unicode("", allow_none=True).tag(sync=True)
    error = traitlets.Unicode("", allow_none=True).tag(sync=True)
    busy = traitlets.Bool(False).tag(sync=True)
    connected = traitlets.Bool(False).tag(sync=True)
    last_seq = traitlets.Int(0).tag(sync=True)
    messages = traitlets.List().tag(sync=True)
    permissions = traitlets.List().tag(sync=True)
    notice = traitlets.Unicode("").tag(sync=True)
    diff_html = traitlets.Unicode("").tag(sync=True)
    code = traitlets.Unicode("").tag(sync=True)
    turn_error = traitlets.Unicode("").tag(sync=True)
    pushed = traitlets.Dict().tag(sync=True)
    pushing = traitlets.Bool(False).tag(sync=True)

    def __init__(self, session: Session, **kwargs: Any):
        info = session.info or session.refresh()
        super().__init__(
            session_id=session.id,
            repo=info.get("repo", ""),
            branch=info.get("work_branch", ""),
            state=info.get("state", "idle"),
            **kwargs,
        )
        self._session = session
        self._conversation = Conversation()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._ws: Any = None  # the live connection, while there is one
        self.on_msg(self._on_frontend_message)
        self._task = asyncio.ensure_future(self._follow())

    def close(self) -> None:
        self._task.cancel()
        super().close()

    # -- events from the server -----------------------------------------------------------------
    async def _follow(self) -> None:
        """Stream events over the WebSocket; on any break, reconnect from the last seq."""
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        client = self._session.client
        base = client.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        delay = 0.2
        while True:
            url = f"{base}tabbi/api/sessions/{self.session_id}/stream?after={self._conversation.last_seq}"
            try:
                self._ws = ws = await websocket_connect(
                    HTTPRequest(url, headers={"Authorization": f"token {client.token}"},
                                connect_timeout=20, request_timeout=20)
                )
                self.connected, delay = True, 0.2
                while (message := await ws.read_message()) is not None:
                    self._conversation.apply(json.loads(message))
                    self._schedule_flush()
                self.connected, self._ws = False, None
                ws.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reported in the panel, then retried
                self.connected = False
                if getattr(exc, "code", None) in (403, 404):
                    self.notice = "This session is gone (deleted, or not yours)."
                    return
                log.debug("tabbi panel: stream broke", exc_info=True)
            await asyncio.sleep(delay)  # reconnect backoff
            delay = min(delay * 2, 5)

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_event_loop().call_later(FLUSH_SECONDS, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        conv = self._conversation
        with self.hold_sync():
            self.state = conv.state
            self.phase = conv.phase or ""
            self.error = conv.error or ""
            self.busy = conv.busy
            self.last_seq = conv.last_seq
            self.messages = copy.deepcopy(conv.messages)
            self.permissions = list(conv.permissions.values())
            self.turn_error = conv.turn_error or ""
            self.pushed = dict(conv.pushes[-1]) if conv.pushes else {}

    # -- actions from the browser ---------------------------------------------------------------
    def _on_frontend_message(self, widget: Any, content: dict[str, Any], buffers: Any) -> None:
        action = content.get("type")
        try:
            if action == "send":
                text = str(content.get("text", ""))
                if text.strip():
                    self._session.prompt(text)
                    self.notice = ""
            elif action == "abort":
                self._session.abort()
            elif action in ("pause", "resume"):
                getattr(self._session, action)()
            elif action == "permission":
                self._session.client.request(
                    "POST", f"sessions/{self.session_id}/permissions/{content.get('id')}",
                    {"reply": content.get("reply")})
            elif action == "diff":
                self.diff_html = render.diff(self._session.diff())["text/html"]
            elif action == "insert":
                self._show_code()
            elif action == "push":
                self._push(str(content.get("message") or "").strip() or None, bool(content.get("pr")))
        except TabbiError as exc:
            self.notice = f"Error: {exc}"

    def _push(self, message: str | None, pr: bool) -> None:
        """Push in a worker thread (it can take a while; the kernel stays free); the outcome
        shows in the notice line, the links arrive with the ``push.completed`` event."""
        if self.pushing:
            return
        self.pushing, self.notice = True, "Pushing…"
        loop = asyncio.get_event_loop()
        future = loop.run_in_executor(None, lambda: self._session.push(message, pr=pr))

        def done(f: asyncio.Future) -> None:
            self.pushing = False
            error = f.exception()
            if error is None:
                result = f.result()
                what = "Committed and pushed" if result.get("committed") else "Pushed"
                self.notice = f"{what} {str(result.get('commit', ''))[:10]} to {result.get('branch')}."
            else:
                self.notice = f"Push failed: {error}"

        future.add_done_callback(done)

    def _show_code(self) -> None:
        """The browser cannot add notebook cells; show the code to copy, and say how to insert."""
        turn = self._conversation.last_finished_turn()
        snippets = turn_snippets(self._conversation, turn, self._session.read_file) if turn else []
        if not snippets:
            self.notice = "The last turn produced no Python code."
            return
        self.code = cell_source(snippets)
        self.notice = "Copy the code below, or run %tabbi insert in a cell to get it as a new cell."
