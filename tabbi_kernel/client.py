"""The Python API: ``tabbi_kernel.connect()`` -> ``Client`` -> ``Session``. The magics are a thin
layer over it.

It speaks tabbi's REST API with the standard library only (the kernel must stay light), and follows
events by long-polling ``GET .../events?after=N&wait=S``: a blocking cell (``ask``) reads them in the
foreground; the chat panel streams them over the WebSocket in a background task instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .discovery import ServerInfo, find_server

Event = dict[str, Any]

#: What a session id looks like (``ses-`` and 12 hex digits).
SESSION_ID = re.compile(r"ses-[0-9a-f]{12}")


class TabbiError(Exception):
    """The server said no (the message is its own, readable) or could not be reached. A quota
    or rate limit (status 429) names the ``limit`` and, when waiting helps, ``retry_after``
    seconds."""

    def __init__(self, message: str, status: int | None = None, limit: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.limit = limit
        self.retry_after = retry_after


@dataclass
class TurnResult:
    """What one prompt produced."""

    prompt_id: str
    outcome: str = "unknown"  # completed | aborted | error
    error: str | None = None
    text: str = ""
    tools: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    #: The turn's tokens ``{input, output, reasoning, cache: {read, write}}`` and cost in
    #: dollars, as OpenCode reported them; ``session``: the session's totals ``{tokens, cost}``
    #: at the turn's end. None from a server that does not report them.
    tokens: dict[str, Any] | None = None
    cost: float | None = None
    session: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "completed"


#: Added to the service's refusal of a local path under hub mode: what to use instead.
HUB_LOCAL_HINT = (
    "Under JupyterHub, sessions run in the hub's tabbi service, as another user that cannot read "
    "your server's files. Start from a git URL (https://...) or a GitHub owner/name instead "
    "(push your local repository there first); local paths work only in folders your hub's "
    "administrator shares with the service (docs/deploy-jupyterhub.md)."
)


class Client:
    def __init__(self, url: str, token: str = "", timeout: float = 30, hub_service: bool = False):
        self.url = url.rstrip("/") + "/"
        self.token = token
        self.timeout = timeout
        #: Whether this is the hub's tabbi service (hub mode), which cannot read people's files.
        self.hub_service = hub_service

    @classmethod
    def from_server(cls, info: ServerInfo) -> Client:
        return cls(info.url, info.token, hub_service=info.route.startswith("JupyterHub service"))

    def __repr__(self) -> str:
        return f"<tabbi Client {self.url}>"

    # -- transport ----------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, params: dict | None = None,
                timeout: float | None = None) -> Any:
        import urllib.error  # deferred: importing tabbi_kernel must stay cheap
        import urllib.parse
        import urllib.request

        url = self.url + "tabbi/api/" + path.lstrip("/")
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = json.dumps(body).encode() if body is not None else (b"{}" if method == "POST" else None)
        request = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"token {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise _refusal(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TabbiError(f"cannot reach the tabbi server at {self.url}: {reason}") from None
        return json.loads(raw) if raw else None

    def download(self, path: str, out: BinaryIO, max_bytes: int, params: dict | None = None,
                 timeout: float = 600) -> dict[str, str]:
        """``GET`` raw bytes into ``out`` (at most ``max_bytes``: more raises ``TabbiError``);
        the answer's headers."""
        import urllib.error  # deferred: importing tabbi_kernel must stay cheap
        import urllib.parse
        import urllib.request

        url = self.url + "tabbi/api/" + path.lstrip("/")
        if params:
            url += "?" + urllib.parse.urlencode(params)
        request = urllib.request.Request(url, headers={"Authorization": f"token {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                total = 0
                while chunk := response.read(1 << 20):
                    total += len(chunk)
                    if total > max_bytes:
                        raise TabbiError(f"the answer is larger than {max_bytes >> 20} MB", 413)
                    out.write(chunk)
                return dict(response.headers.items())
        except urllib.error.HTTPError as exc:
            raise _refusal(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TabbiError(f"cannot reach the tabbi server at {self.url}: {reason}") from None

    # -- server-wide ----------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self.request("GET", "health")

    def warm(self) -> bool:
        """Tell the server a session may start soon, so it readies a warm sandbox (nothing of
        yours goes into it until a session of yours takes it). False if it could not be told."""
        try:
            self.request("POST", "warm", timeout=5)
        except TabbiError:
            return False
        return True

    def sessions(self) -> list[dict[str, Any]]:
        return self.request("GET", "sessions")["sessions"]

    def models(self, session_id: str | None = None) -> dict[str, Any]:
        """The models this server can use: ``{"models": [{id, provider, model, default,
        current}], "default", "current"}``; ``current``: the model of ``session_id``."""
        return self.request("GET", "models", params={"session": session_id} if session_id else None)

    def start(self, repo: str, model: str | None = None, branch: str | None = None,
              fresh: bool = False) -> Session:
        """Create a session; it starts in the background (``Session.wait_until_running``).
        ``repo``: owner/name on GitHub, a git URL, or a local path (a relative one is taken
        from this process's working directory: in a kernel, the notebook's folder). ``fresh``:
        build the repository's environment anew instead of starting from its warm snapshot."""
        path = local_path(repo)
        body = {"repo": path, "model": model, "branch": branch, "fresh": fresh}
        try:
            info = self.request("POST", "sessions", {k: v for k, v in body.items() if v})
        except TabbiError as exc:
            if self.hub_service and exc.status == 400 and path.startswith("/"):
                raise TabbiError(f"{exc} {HUB_LOCAL_HINT}", exc.status) from None
            raise
        return Session(self, info["id"], info)

    def session(self, session_id: str) -> Session:
        """The session ``session_id``; ``TabbiError`` (status 404) if there is none of yours."""
        if not SESSION_ID.fullmatch(session_id):
            raise TabbiError(f"no session {session_id}", 404)
        return Session(self, session_id, self.request("GET", f"sessions/{session_id}"))

    # -- admins (404 for everyone else) ---------------------------------------------------------
    def admin_sessions(self) -> list[dict[str, Any]]:
        """Every person's sessions, each with its ``owner`` and ``usage`` (admins only)."""
        return self.request("GET", "admin/sessions")["sessions"]

    def admin_pause(self, session_id: str) -> dict[str, Any]:
        """Pause anyone's session as the owner would (admins only)."""
        return self.request("POST", f"admin/sessions/{session_id}/pause", timeout=300)

    def admin_stop(self, session_id: str) -> dict[str, Any]:
        """Stop anyone's session now, mid-turn too; its workspace is kept (admins only)."""
        return self.request("POST", f"admin/sessions/{session_id}/stop", timeout=300)

    # -- GitHub ---------------------------------------------------------------------------------
    def github_user(self) -> dict[str, Any]:
        """``{signed_in, login?, name?, configured}``; never a token."""
        return self.request("GET", "github/user")

    def login(self, flow: str | None = None) -> dict[str, Any]:
        """Start a GitHub sign-in: ``{login_id, flow, url, user_code?}``. The person opens
        ``url`` (and types ``user_code`` for the device flow); see ``wait_for_login``."""
        return self.request("POST", "github/login", {"flow": flow} if flow else {})

    def wait_for_login(self, login_id: str, wait: float = 25) -> dict[str, Any]:
        """The sign-in's status, waiting up to ``wait`` seconds while it is pending."""
        return self.request("GET", f"github/login/{login_id}", params={"wait": wait}, timeout=wait + 30)

    def logout(self) -> dict[str, Any]:
        return self.request("POST", "github/logout")

    def repos(self, query: str = "") -> list[dict[str, Any]]:
        """Every GitHub repository the person can reach, newest push first."""
        return self.request("GET", "github/repos", params={"q": query} if query else None,
                            timeout=120)["repos"]


class Session:
    def __init__(self, client: Client, session_id: str, info: dict[str, Any] | None = None):
        self.client = client
        self.id = session_id
        self.info = info or {}

    def __repr__(self) -> str:
        return f"<tabbi Session {self.id} {self.info.get('state', '?')} {self.info.get('repo', '')}>"

    def _path(self, suffix: str = "") -> str:
        return f"sessions/{self.id}" + (f"/{suffix}" if suffix else "")

    def refresh(self) -> dict[str, Any]:
        self.info = self.client.request("GET", self._path())
        return self.info

    @property
    def state(self) -> str:
        return self.refresh()["state"]

    def usage(self) -> dict[str, Any] | None:
        """The session's model use so far, ``{tokens, cost}``, as OpenCode reported it."""
        return self.refresh().get("usage")

    def set_model(self, model: str) -> dict[str, Any]:
        """Use ``model`` (one of ``Client.models()``) from the next turn on; a turn running now
        keeps its model. Returns the session's info."""
        self.info = self.client.request("PATCH", self._path(), {"model": model})
        return self.info

    # -- events ---------------------------------------------------------------------------------
    def events(self, after: int = 0, wait: float = 0, limit: int = 1000) -> list[Event]:
        """Events with seq > ``after``; ``wait`` long-polls up to that many seconds for new ones."""
        page = self.client.request("GET", self._path("events"),
                                   params={"after": after, "wait": wait, "limit": limit},
                                   timeout=wait + self.client.timeout)
        return page["events"]

    def all_events(self) -> list[Event]:
        """The whole log, page by page."""
        events: list[Event] = []
        while True:
            page = self.events(events[-1]["seq"] if events else 0, limit=1000)
            events += page
            if len(page) < 1000:
                return events

    def follow(self, after: int = 0, until: Callable[[Event], bool] | None = None,
               timeout: float | None = None) -> Iterator[Event]:
        """Yield events as they happen, from ``after`` on, until ``until(event)`` is true."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            for event in self.events(after, wait=5):
                after = event["seq"]
                yield event
                if until is not None and until(event):
                    return
        raise TabbiError(f"no end of the stream within {timeout} s")

    def wait_until_running(self, on_event: Callable[[Event], None] | None = None,
                           timeout: float = 300) -> dict[str, Any]:
        """Block until the sandbox is up; ``on_event`` sees each status change. Raises on error.

        Status changes are read from just before the last known one (the answer of ``start`` or
        ``resume``), so every phase of this start is shown and none of an earlier one counts."""
        after = max(self.info.get("last_seq", 0) - 1, 0)
        settled = False
        for event in self.events(after):
            after = event["seq"]
            settled = self._status(event, on_event) or settled
        if not settled and self.refresh()["state"] not in ("running", "error"):
            for event in self.follow(after, until=_settled, timeout=timeout):
                self._status(event, on_event)
        info = self.refresh()
        if info["state"] == "error":
            raise TabbiError(info.get("error") or "the session failed to start")
        return info

    @staticmethod
    def _status(event: Event, on_event: Callable[[Event], None] | None) -> bool:
        if event["type"] == "session.status" and on_event is not None:
            on_event(event)
        return _settled(event)

    # -- prompts --------------------------------------------------------------------------------
    def prompt(self, text: str, attach: Any = None) -> str:
        r"""Queue a prompt and return its id at once. ``attach``: what goes with it, chosen by you
        (``["df_sales", "@cell:3", "@error", "@file:PATH"]`` or ``"df_sales,@error"``, or
        ``context.Attachment``\ s; see ``tabbi_kernel.context``); nothing else is sent."""
        body: dict[str, Any] = {"text": text}
        if attach:
            from .context import gather

            body["attachments"] = [a.to_dict() for a in gather(attach)]
        return self.client.request("POST", self._path("prompt"), body)["prompt_id"]

    def fix(self, extra: str = "", on_event: Callable[[Event], None] | None = None,
            timeout: float | None = None, on_tick: Callable[[], None] | None = None) -> TurnResult:
        """Ask the agent to fix, in the repository's code, the last error of this kernel: the
        traceback, the failing cell and the variables it names go as attachments (``ask``)."""
        from .context import fix_request

        text, attachments = fix_request(None, extra)
        return self.ask(text, on_event=on_event, timeout=timeout, on_tick=on_tick, attach=attachments)

    def ask(self, text: str, on_event: Callable[[Event], None] | None = None,
            timeout: float | None = None, on_tick: Callable[[], None] | None = None,
            attach: Any = None) -> TurnResult:
        """Send a prompt and follow its turn to the end. ``on_event`` sees each of the turn's
        events; ``on_tick`` is called after every read of the log (at least every second or so,
        events or not), e.g. to show how long the turn has been waiting for the model.
        ``attach``: as for ``prompt``.

        Interrupting (the kernel's stop button, SIGINT) aborts the turn; the result then has
        outcome "aborted". The interrupt only sets a flag that the loop checks between reads (at
        least every second), so it never lands in the middle of printing or a request."""
        after = self.refresh().get("last_seq", 0)
        prompt_id = self.prompt(text, attach)
        result = TurnResult(prompt_id)
        is_end, mine = _turn_end(prompt_id), _own_turn(prompt_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        with _interrupt_flag() as interrupted:
            aborted = False
            while deadline is None or time.monotonic() < deadline:
                if interrupted() and not aborted:
                    self.abort(quiet=True)
                    aborted = True
                for event in self.events(after, wait=1):
                    after = event["seq"]
                    if mine(event):
                        _collect(result, event)
                        if on_event is not None:
                            on_event(event)
                    if is_end(event):
                        return result
                if on_tick is not None:
                    on_tick()
        raise TabbiError(f"the turn did not end within {timeout} s")

    def abort(self, quiet: bool = False) -> None:
        try:
            self.client.request("POST", self._path("abort"))
        except TabbiError:
            if not quiet:
                raise

    # -- the workspace --------------------------------------------------------------------------
    def diff(self, outputs: bool = False) -> dict[str, Any]:
        """``{"diff": unified diff text, "files": [{path, status, additions, deletions}]}``; a
        notebook's file also has ``notebook``: its cell-level diff (``text``, ``cells``), with
        the outputs' changes shown when ``outputs``."""
        params = {"outputs": "1"} if outputs else None
        return self.client.request("GET", self._path("diff"), params=params, timeout=90)

    def read_file(self, path: str) -> str:
        return self.client.request("GET", self._path("file"), params={"path": path})["content"]

    def bundle(self, out: BinaryIO, since: str | None = None, max_bytes: int = 200 << 20) -> dict[str, Any]:
        """The workspace as a git bundle for ``%tabbi checkout`` (``tabbi_kernel.checkout``),
        written into ``out`` (empty when ``since`` already is the workspace's state); what the
        server says of it: ``{tip, head, branch, snapshot, skipped, bytes}``."""
        headers = self.client.download(self._path("bundle"), out, max_bytes,
                                       params={"since": since} if since else None)
        found = {k.lower(): v for k, v in headers.items()}.get("x-tabbi-checkout", "{}")
        try:
            return json.loads(found)
        except ValueError:
            raise TabbiError("the server's checkout answer could not be read") from None

    def messages(self) -> list[dict[str, Any]]:
        return self.client.request("GET", self._path("messages"))["messages"]

    # -- lifecycle ------------------------------------------------------------------------------
    def delete(self) -> None:
        self.client.request("DELETE", self._path())

    def pause(self) -> dict[str, Any]:
        """Snapshot the sandbox, then stop it. A prompt (or ``resume``) brings it back with the
        same conversation and workspace."""
        self.info = self.client.request("POST", self._path("pause"), timeout=300)
        return self.info

    def resume(self) -> dict[str, Any]:
        """Start the sandbox again from its last snapshot; returns at once (it starts in the
        background, see ``wait_until_running``)."""
        self.info = self.client.request("POST", self._path("resume"))
        return self.info

    #: Stopping keeps the work: the same as pausing.
    stop = pause

    def push(self, message: str | None = None, *, cells: str | None = None, notebook: str | None = None,
             to: str | None = None, cells_only: bool = False, pr: bool = False, title: str | None = None,
             author: str | None = None, keep_outputs: bool = False) -> dict[str, Any]:
        """Commit the agent's changes (and the ``cells`` of the saved ``notebook``: a tag, numbers
        like ``2,4-6`` or ``id:CELLID``) on the session branch and push it; ``pr`` opens a pull
        request (or reports the open one). Returns the branch, commit and links. The notebook is
        read here, as this kernel's person (``notebook_cells``), and its cells' sources are sent.
        Notebooks are pushed without outputs unless ``keep_outputs`` (then the cells' outputs are
        sent too, for a ``to`` ending in ``.ipynb``)."""
        body: dict[str, Any] = {"message": message, "pr": pr, "title": title, "author": author,
                                "keep_outputs": keep_outputs}
        if cells:
            if not notebook:
                raise TabbiError("pushing cells needs the notebook's path (notebook=...)")
            with_outputs = keep_outputs and bool(to) and to.endswith(".ipynb")
            body["cells"] = {"notebook": os.path.basename(notebook),
                             "cells": notebook_cells(notebook, outputs=with_outputs),
                             "select": cells, "to": to, "only": cells_only}
        body = {k: v for k, v in body.items() if v not in (None, False)}
        return self.client.request("POST", self._path("push"), body, timeout=900)


#: What a push of cells may carry of their outputs (the server takes 512 KB of request in all).
MAX_OUTPUTS_BYTES = 384 * 1024


def notebook_cells(path: str, outputs: bool = False) -> list[dict[str, Any]]:
    """The saved notebook's cells as a push sends them: type, source, id and tags; with
    ``outputs``, code cells' outputs and execution counts too (at most ``MAX_OUTPUTS_BYTES``).

    Read by the kernel, which runs as the person, rather than by the server: under a hub, tabbi's
    service is another OS user that cannot read (and must not be told to read) people's files. A
    relative ``path`` is taken from this process's working directory (a kernel's: its notebook's
    folder)."""
    full = os.path.abspath(os.path.expanduser(path))
    try:
        with open(full, encoding="utf-8") as f:
            notebook = json.load(f)
    except FileNotFoundError:
        raise TabbiError(f"no saved notebook at {full} (save it first)") from None
    except (OSError, ValueError) as exc:
        raise TabbiError(f"cannot read the notebook {full}: {exc}") from None
    cells = notebook.get("cells") if isinstance(notebook, dict) else None
    if not isinstance(cells, list):
        raise TabbiError(f"{full} is not a notebook (it has no list of cells)")
    sent = [{"cell_type": cell.get("cell_type"), "source": cell.get("source", ""), "id": cell.get("id"),
             "tags": (cell.get("metadata") or {}).get("tags"),
             **({"outputs": cell.get("outputs") or [], "execution_count": cell.get("execution_count")}
                if outputs and cell.get("cell_type") == "code" else {})}
            for cell in cells if isinstance(cell, dict)]
    if outputs:
        size = len(json.dumps([cell.get("outputs", []) for cell in sent]))
        if size > MAX_OUTPUTS_BYTES:
            raise TabbiError(f"the cells' outputs are {size // 1024} KB, more than a push carries "
                             f"({MAX_OUTPUTS_BYTES // 1024} KB): clear the large ones, or push without "
                             "--keep-outputs")
    return sent


def connect(url: str | None = None, token: str | None = None) -> Client:
    """A client for this kernel's own server (found automatically), or for ``url`` + ``token``."""
    if url:
        return Client(url, token or "")
    return Client.from_server(find_server())


@contextlib.contextmanager
def _interrupt_flag() -> Iterator[Callable[[], bool]]:
    """While active, SIGINT sets a flag instead of raising KeyboardInterrupt (main thread only;
    elsewhere signals cannot be caught and the flag stays false)."""
    hit = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal hit
        hit = True

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: hit
    finally:
        signal.signal(signal.SIGINT, previous)


def local_path(repo: str, cwd: str | None = None) -> str:
    """``repo`` as the server must see it: a local path made absolute against ``cwd`` (the
    working directory: a kernel's is its notebook's folder), ``~`` expanded here (the person's
    home, which may not be the server's). A path is what starts with ``.``, ``/`` or ``~``, has
    no slash (owner/name has one), or names an existing folder; the rest (owner/name, URLs)
    goes as it is."""
    text = repo.strip()
    if not text or "://" in text or text.startswith("-"):
        return repo
    if text.startswith("~"):
        return os.path.expanduser(text)
    here = cwd or os.getcwd()
    if text.startswith("/"):
        return text
    if text.startswith(".") or "/" not in text or os.path.isdir(os.path.join(here, text)):
        return os.path.normpath(os.path.join(here, text))
    return repo


#: What a status means, for an error whose answer carries no message of the server's own.
_STATUS_MEANING = {
    400: "the tabbi server refused the request as malformed",
    401: "the tabbi server did not accept this kernel's credentials (is the server token right?)",
    403: "not authorized (is the server token right?)",
    404: "the tabbi server has no such resource (is the tabbi extension enabled on this server?)",
    409: "the tabbi server refused the request in the session's current state",
    413: "the request is too large for the tabbi server",
    429: "the tabbi server refused the request: a quota or rate limit was reached",
}


def _refusal(exc: Any) -> TabbiError:
    """The ``TabbiError`` for an ``HTTPError``: the server's own message, and for a quota or
    rate limit (429) its name and when to retry, as one sentence."""
    try:
        body = json.loads(exc.read() or b"{}")
    except (ValueError, OSError):
        body = None
    body = body if isinstance(body, dict) else {}
    message = _server_message(exc.code, body.get("message"))
    if exc.code != 429:
        return TabbiError(message, exc.code)
    limit = body.get("limit") if isinstance(body.get("limit"), str) else None
    retry = body.get("retry_after")
    retry = retry if isinstance(retry, int) and not isinstance(retry, bool) else None
    if limit:
        message = f"over the limit {limit}: {message}"
    return TabbiError(message, 429, limit, retry)


def _server_message(code: int, message: Any) -> str:
    """The server's own ``{"message": ...}``, else a sentence saying what the status means
    (never a bare "HTTP 500")."""
    message = message if isinstance(message, str) else None
    if message and not message.startswith(("HTTP ", "Not Found", "Internal Server Error")):
        return str(message)
    if code in _STATUS_MEANING:
        return _STATUS_MEANING[code]
    if code >= 500:
        return (f"the tabbi server failed on this request (status {code}); "
                "the Jupyter server's log says why")
    return f"the tabbi server refused the request (status {code})"


def _settled(event: Event) -> bool:
    return event["type"] == "session.status" and event["data"].get("state") in ("running", "error")


def _turn_end(prompt_id: str) -> Callable[[Event], bool]:
    def is_end(event: Event) -> bool:
        return event["type"] == "turn.finished" and event["data"].get("prompt_id") == prompt_id

    return is_end


def _own_turn(prompt_id: str) -> Callable[[Event], bool]:
    """Accept a turn's events (and status changes): a prompt queued behind another turn must not
    show that turn's output."""
    inside = False

    def accept(event: Event) -> bool:
        nonlocal inside
        if event["type"] == "turn.started":
            inside = event["data"].get("prompt_id") == prompt_id
        return inside or event["type"] == "session.status"

    return accept


def _collect(result: TurnResult, event: Event) -> None:
    result.events.append(event)
    data = event["data"]
    if event["type"] == "text.delta" and data.get("field", "text") == "text":
        result.text += data["delta"]
    elif event["type"] == "tool" and data.get("status") in ("completed", "error"):
        result.tools.append(data)
    elif event["type"] == "turn.finished" and data.get("prompt_id") == result.prompt_id:
        result.outcome = data.get("outcome", "unknown")
        result.error = data.get("error")
        result.tokens, result.cost, result.session = data.get("tokens"), data.get("cost"), data.get("session")
