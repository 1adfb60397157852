"""The chat panel: an anywidget (Python traitlets + one ES module, no build step).

The kernel side follows the session's events over tabbi's WebSocket in a background asyncio task
(the kernel stays free), folds them with the same ``Conversation`` reducer the magics use, and
tells the browser what changed:

- **Deltas are messages, not state.** Each batch of events becomes one custom widget message of
  small operations (append this text to that part, this tool part now reads..., this turn ended
  aborted), so the cost of a streamed token is the token, not the conversation. The browser
  applies them to its copy and updates the DOM in place.
- **Coarse state is traits** (status, busy, permissions, notices, the push line): they change a few
  times per turn.
- **A late-joining view gets the whole state once**: a new front-end model (a reload, another
  browser tab) asks with a ``sync`` message and gets one ``snapshot``; a second view of a model
  the page already has renders from the page's copy.
- **One follower per session per kernel**: every panel of a session in this kernel shares one
  WebSocket and one ``Conversation`` (``Follower``), so running ``%tabbi panel`` again adds a view,
  not another stream.
- **Actions never block the kernel**: a button press (pause, diff, push, insert...) runs its HTTP
  call in a worker thread; its outcome comes back on the kernel's event loop.
- **A saved notebook keeps a transcript**: the panel displays a second output, the conversation as
  escaped HTML and plain text, refreshed when a turn starts or ends (never per delta). While the
  panel is live the transcript hides itself; reopened without the kernel, it stands in for the
  widget (which can then only say "model not found": ipywidgets' renderer has no fallback).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import html
import json
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import anywidget
import traitlets

from . import render
from .client import Session, TabbiError
from .conversation import Conversation, transcript_html, transcript_text
from .snippets import cell_source, earlier_note, latest_code

log = logging.getLogger(__name__)
HERE = Path(__file__).parent

#: Coalesce bursts of events (streamed text) into one message to the browser.
FLUSH_SECONDS = 0.05

Op = dict[str, Any]


class Follower:
    """The one event stream of a session in this kernel, shared by all of its panels.

    It folds events into one ``Conversation``, turns each event into a small operation for the
    browser, and hands each batch to every attached panel."""

    live: ClassVar[dict[tuple[str, str], Follower]] = {}

    def __init__(self, session: Session):
        self.session = session
        self.key = (session.client.url, session.id)
        self.conversation = Conversation()
        self.panels: list[ChatPanel] = []
        self.connected = False
        self.gone = False  # the server said the session is not there (or not ours)
        self.ws: Any = None  # the live connection, while there is one
        self._ops: list[Op] = []
        self._coarse = False  # a batch holds an event that changes traits
        self._turn_edge = False  # a batch holds a turn start or end (the transcript changes)
        self._flush_handle: asyncio.TimerHandle | None = None
        self._task = asyncio.ensure_future(self._follow())

    @classmethod
    def attach(cls, panel: ChatPanel, session: Session) -> Follower:
        follower = cls.live.get((session.client.url, session.id))
        if follower is None or follower._task.done():
            follower = cls.live[(session.client.url, session.id)] = cls(session)
        follower.panels.append(panel)
        return follower

    def detach(self, panel: ChatPanel) -> None:
        if panel in self.panels:
            self.panels.remove(panel)
        if not self.panels:
            self._task.cancel()
            if self.live.get(self.key) is self:
                del self.live[self.key]

    # -- the stream -----------------------------------------------------------------------------
    async def _follow(self) -> None:
        """Stream events over the WebSocket; on any break, reconnect from the last seq."""
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        client = self.session.client
        base = client.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        delay = 0.2
        while True:
            url = f"{base}tabbi/api/sessions/{self.session.id}/stream?after={self.conversation.last_seq}"
            try:
                self.ws = ws = await websocket_connect(
                    HTTPRequest(url, headers={"Authorization": f"token {client.token}"},
                                connect_timeout=20, request_timeout=20)
                )
                self._set_connected(True)
                delay = 0.2
                while (message := await ws.read_message()) is not None:
                    self.receive(json.loads(message))
                self.ws = None
                self._set_connected(False)
                ws.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reported in the panel, then retried
                self._set_connected(False)
                if getattr(exc, "code", None) in (403, 404):
                    self.gone = True
                    for panel in self.panels:
                        panel.notice = "This session is gone (deleted, or not yours)."
                    return
                log.debug("tabbi panel: stream broke", exc_info=True)
            await asyncio.sleep(delay)  # reconnect backoff
            delay = min(delay * 2, 5)

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        for panel in self.panels:
            panel.connected = connected

    def receive(self, event: dict[str, Any]) -> None:
        """Fold one event and queue what the browser must change (no copy of the conversation)."""
        conv = self.conversation
        if event["seq"] <= conv.last_seq:
            return  # already seen
        conv.apply(event)
        kind, data = event["type"], event["data"]
        if kind == "text.delta":
            last = self._ops[-1] if self._ops else None
            if last and last["op"] == "append" and last["part"] == data["part_id"] \
                    and last["message"] == data["message_id"]:
                last["text"] += data["delta"]  # a burst of tokens is one operation
            else:
                part = conv.find_part(data["message_id"], data["part_id"]) or {}
                self._ops.append({"op": "append", "message": data["message_id"], "part": data["part_id"],
                                  "kind": part.get("type", "text"), "text": data["delta"]})
        elif kind == "message":
            message = conv.messages[-1] if conv.messages and conv.messages[-1]["id"] == data["message_id"] \
                else None
            if message is not None:
                self._ops.append({"op": "message", "message": {**message, "parts": []}})
        elif kind in ("part.updated", "tool"):
            part = conv.find_part(data["message_id"], data["part_id"])
            if part is not None:  # copied now: later deltas of this batch are their own operations
                self._ops.append({"op": "part", "message": data["message_id"], "part": copy.deepcopy(part)})
        elif kind in ("turn.started", "turn.finished"):
            turn = next((t for t in reversed(conv.turns) if t.prompt_id == data.get("prompt_id")), None)
            if turn is not None:
                self._ops.append({"op": "turn", "turn": turn.to_dict(), "seq": event["seq"]})
            self._coarse = self._turn_edge = True
        else:
            self._coarse = True
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_event_loop().call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Send the queued operations to every panel: one custom message per panel per batch."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        ops, coarse, edge = self._ops, self._coarse, self._turn_edge
        self._ops, self._coarse, self._turn_edge = [], False, False
        for panel in list(self.panels):
            panel.publish(ops, coarse, edge)

    def snapshot(self) -> dict[str, Any]:
        """The whole state, once, for a view that joins late (sent only on its request)."""
        self.flush()  # what is queued goes first, so the snapshot's seq covers exactly what it holds
        conv = self.conversation
        return {"type": "snapshot", "seq": conv.last_seq, "messages": conv.messages,
                "turns": [t.to_dict() for t in conv.turns]}


class ChatPanel(anywidget.AnyWidget):
    _esm = HERE / "panel.js"
    _css = HERE / "panel.css"

    #: Identifies this widget's model to the page-wide store in panel.js.
    key = traitlets.Unicode("").tag(sync=True)
    session_id = traitlets.Unicode("").tag(sync=True)
    repo = traitlets.Unicode("").tag(sync=True)
    branch = traitlets.Unicode("").tag(sync=True)
    state = traitlets.Unicode("idle").tag(sync=True)
    phase = traitlets.Unicode("", allow_none=True).tag(sync=True)
    error = traitlets.Unicode("", allow_none=True).tag(sync=True)
    busy = traitlets.Bool(False).tag(sync=True)
    #: The model provider's retry notice while the agent retries.
    retry = traitlets.Unicode("").tag(sync=True)
    #: Since when (server epoch seconds) the turn waits for the model, when the server says so
    #: (``waiting_signal``); without the signal the front end infers it (no reply yet).
    waiting_since = traitlets.Float(None, allow_none=True).tag(sync=True)
    waiting_signal = traitlets.Bool(False).tag(sync=True)
    connected = traitlets.Bool(False).tag(sync=True)
    #: The last seq of a batch that changed coarse state (deltas carry their own seq).
    last_seq = traitlets.Int(0).tag(sync=True)
    permissions = traitlets.List().tag(sync=True)
    notice = traitlets.Unicode("").tag(sync=True)
    diff_html = traitlets.Unicode("").tag(sync=True)
    code = traitlets.Unicode("").tag(sync=True)
    turn_error = traitlets.Unicode("").tag(sync=True)
    #: The last push (one line in the panel) until the next turn starts.
    pushed = traitlets.Dict().tag(sync=True)
    pushing = traitlets.Bool(False).tag(sync=True)

    def __init__(self, session: Session, **kwargs: Any):
        info = session.info or session.refresh()
        super().__init__(
            key=uuid.uuid4().hex,
            session_id=session.id,
            repo=info.get("repo", ""),
            branch=info.get("work_branch", ""),
            state=info.get("state", "idle"),
            **kwargs,
        )
        self._session = session
        self._loop = asyncio.get_event_loop()
        self._transcript_id = f"tabbi-transcript-{self.key}"
        self._displayed = False
        self._committed: dict[str, bool] = {}  # commit -> whether the push made it (from its answer)
        self.on_msg(self._on_frontend_message)
        self._follower = Follower.attach(self, session)
        self.connected = self._follower.connected
        self._sync_traits()

    @property
    def _conversation(self) -> Conversation:
        return self._follower.conversation

    @property
    def _ws(self) -> Any:
        return self._follower.ws

    def close(self) -> None:
        self._follower.detach(self)
        super().close()

    # -- what the notebook keeps ----------------------------------------------------------------
    def _title(self) -> str:
        return f"tabbi chat: {self.repo} · {self.branch} (session {self.session_id})"

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The live view, with text that says what it is (the transcript is the output below)."""
        bundle = super()._repr_mimebundle_(**kwargs) or {}
        bundle = bundle[0] if isinstance(bundle, tuple) else bundle
        label = f"{self._title()} — live panel; the transcript is saved below it"
        return {**bundle, "text/plain": label, "text/html": f"<i>{html.escape(label)}</i>"}

    def transcript_bundle(self) -> dict[str, str]:
        return {"text/plain": transcript_text(self._conversation, self._title()),
                "text/html": transcript_html(self._conversation, self._title())}

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self._repr_mimebundle_(), raw=True)
        display(self.transcript_bundle(), raw=True, display_id=self._transcript_id,
                metadata={"tabbi": {"transcript": self.key}})
        self._displayed = True

    def _refresh_transcript(self) -> None:
        """Once per turn edge. JupyterLab and Notebook 7 drop display updates once the displaying
        cell has finished, so the page's panel (panel.js) writes the transcript into the notebook's
        output itself; front ends that route display updates get one too."""
        if not self._displayed:
            return
        from IPython.display import update_display

        bundle = self.transcript_bundle()
        self.send({"type": "transcript", "key": self.key, "bundle": bundle})
        update_display(bundle, raw=True, display_id=self._transcript_id,
                       metadata={"tabbi": {"transcript": self.key}})

    # -- batches from the follower --------------------------------------------------------------
    def publish(self, ops: list[Op], coarse: bool, turn_edge: bool) -> None:
        if ops:
            self.send({"type": "ops", "seq": self._conversation.last_seq, "ops": ops})
        if turn_edge and any(op["op"] == "turn" and op["turn"]["outcome"] is None for op in ops):
            self.notice = ""  # a new turn: earlier notices are old news
        if coarse:
            self._sync_traits()
        if turn_edge:
            self._refresh_transcript()

    def _sync_traits(self) -> None:
        conv = self._conversation
        push = conv.current_push
        pushed = {}
        if push:
            pushed = {k: push.get(k) for k in ("branch", "commit", "links")}
            pushed["committed"] = self._committed.get(str(push.get("commit")), False)
        with self.hold_sync():
            self.state = conv.state
            self.phase = conv.phase or ""
            self.error = conv.error or ""
            self.busy = conv.busy
            self.retry = conv.retry or ""
            self.waiting_since = conv.waiting_since
            self.waiting_signal = conv.waiting_signal
            self.last_seq = conv.last_seq
            self.permissions = list(conv.permissions.values())
            self.turn_error = conv.turn_error or ""
            self.pushed = pushed

    # -- actions from the browser ---------------------------------------------------------------
    def _on_frontend_message(self, widget: Any, content: dict[str, Any], buffers: Any) -> None:
        """Runs on the kernel's message loop: answer at once, put every HTTP call on a thread."""
        action = content.get("type")
        session = self._session
        if action == "sync":
            self.send({**self._follower.snapshot(), "nonce": str(content.get("nonce", ""))})
        elif action == "send":
            text = str(content.get("text", ""))
            if text.strip():
                self._prompt_with(text, content.get("attach"))
        elif action in ("context_options", "context_preview"):
            self._context(action, content)
        elif action == "abort":
            self._background(session.abort)
        elif action in ("pause", "resume"):
            self.notice = "Saving a snapshot, then stopping…" if action == "pause" else "Resuming…"
            self._background(getattr(session, action), lambda _: setattr(self, "notice", ""))
        elif action == "permission":
            path, body = f"sessions/{self.session_id}/permissions/{content.get('id')}", {
                "reply": content.get("reply")}
            self._background(lambda: session.client.request("POST", path, body))
        elif action == "diff":
            self._background(lambda: render.diff(session.diff())["text/html"],
                             lambda html: setattr(self, "diff_html", html))
        elif action == "insert":
            self._show_code()
        elif action == "insert_cell":
            self._insert_cell_fallback(content.get("code"))
        elif action == "push":
            self._push(str(content.get("message") or "").strip() or None, bool(content.get("pr")))

    # -- context chips (tabbi_kernel/context.py) ----------------------------------------------
    def _context(self, action: str, content: dict[str, Any]) -> None:
        """What "+ context" offers, or one chip's preview (kind, size, the text that would be
        sent), gathered now, in the kernel: the same path as ``--with``."""
        from IPython import get_ipython

        from .context import ContextError, gather, offers

        shell = get_ipython()
        if action == "context_options":
            self.send({"type": "context_options", "options": offers(shell) if shell else []})
            return
        spec = str(content.get("spec", ""))
        try:
            [found] = gather([spec], shell)
        except (ContextError, ValueError) as exc:
            self.send({"type": "context_preview", "spec": spec, "error": str(exc)})
            return
        self.send({"type": "context_preview", "spec": spec, "kind": found.kind, "label": found.label,
                   "bytes": found.size, "truncated": found.truncated, "preview": found.content[:4000]})

    def _prompt_with(self, text: str, attach: Any) -> None:
        """A prompt with the chips' attachments, gathered at the moment it is sent (the chips'
        previews showed what; a variable changed since is sent as it is now)."""
        from .context import ContextError, gather

        specs = [str(s) for s in attach] if isinstance(attach, list) else []
        try:
            attachments = gather(specs)
        except ContextError as exc:
            self.notice = f"Not sent: {exc}"
            return
        self._background(lambda: self._session.prompt(text, attachments))

    def _background(self, work: Callable[[], Any], done: Callable[[Any], None] | None = None,
                    failed: str = "Error") -> asyncio.Future:
        """Run ``work`` in a worker thread; ``done`` (or the error notice) runs on the kernel's loop."""
        future = self._loop.run_in_executor(None, work)

        def finish(f: asyncio.Future) -> None:
            error = f.exception()
            if error is not None:
                self.notice = f"{failed}: {error}"
                if not isinstance(error, TabbiError):
                    log.warning("tabbi panel: action failed", exc_info=error)
            elif done is not None:
                done(f.result())

        future.add_done_callback(finish)
        return future

    def _push(self, message: str | None, pr: bool) -> None:
        """Push in a worker thread (it can take a while; the kernel stays free). Success shows as
        one line, the push line (links arrive with the ``push.completed`` event); failure shows
        in the notice line."""
        if self.pushing:
            return
        self.pushing, self.notice = True, "Pushing…"

        def done(result: dict[str, Any]) -> None:
            self.pushing, self.notice = False, ""
            self._committed[str(result.get("commit"))] = bool(result.get("committed"))
            self._sync_traits()

        future = self._background(lambda: self._session.push(message, pr=pr), done, failed="Push failed")
        future.add_done_callback(lambda f: setattr(self, "pushing", False) if f.exception() else None)

    def _insert_cell_fallback(self, code: Any) -> None:
        """A code block's "Insert as cell" where the page has no notebook to add a cell to (the
        browser adds it itself in JupyterLab and Notebook 7, see ``insertCell`` in panel.js): a
        kernel cannot add a cell from a widget message, so show the code to copy."""
        if not isinstance(code, str) or not code.strip():
            return
        with self.hold_sync():
            self.code = code
            self.notice = "This page has no notebook to add a cell to: copy the code below."

    def _show_code(self) -> None:
        """Show the last turn's code as a code block (its Copy and Insert as cell buttons).

        The code is that of the last finished turn that produced any (an aborted or chatty turn
        after it does not hide it); the files are read back off the loop."""
        conv = self._conversation
        found = latest_code(conv)
        if found is None:
            self.notice = "No turn has produced Python code yet."
            return
        turn, snippets = found
        reader = self._session.read_file if conv.state == "running" else None

        def read_back() -> str:
            for snippet in snippets:
                if snippet.path and reader is not None:
                    with contextlib.suppress(TabbiError):  # keep what the tool call carried
                        snippet.code = reader(snippet.path)
            return cell_source(snippets)

        def show(code: str) -> None:
            older = earlier_note(conv, turn)
            with self.hold_sync():
                self.code = code
                self.notice = ("The agent's latest code is below" + older +
                               ": copy it, or insert it as a new cell.")

        self._background(read_back, show)
