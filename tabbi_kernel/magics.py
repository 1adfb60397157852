"""``%tabbi`` and ``%%tabbi``: a thin layer over the Python API (``client.py``).

Errors come back as one readable line (``UsageError``: red, no traceback of tabbi's internals).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display

from . import render
from .client import Client, Event, Session, TabbiError, connect
from .conversation import Conversation
from .discovery import ServerNotFound
from .snippets import cell_source, turn_snippets

HELP = """\
%tabbi: AI coding-agent sessions in this notebook.

  %tabbi start REPO [--model PROVIDER/MODEL] [--branch BASE] [--no-wait]
        Start a session on REPO: an absolute path, a git URL, or owner/name on GitHub.
        The agent works on a new branch tabbi/<id> of a clone, never in your files.
  %tabbi sessions            List your sessions (* marks the current one).
  %tabbi use ID              Make ID the current session.
  %tabbi status              State, repository and branch of the current session.
  %tabbi panel               Show the chat panel (live; several panels stay in sync).

  %%tabbi [ID] [--no-wait]   The cell body is the prompt. Output streams into the cell and the
                             cell returns when the turn ends. The stop button aborts the turn.
  %tabbi ask TEXT            The same, one line.
  %tabbi abort               Abort the running turn.

  %tabbi diff                The branch's changes against where it started.
  %tabbi insert              The Python code of the last turn -> one new cell below (percent
                             format: split it at the '# %%' markers with Ctrl+Shift+-).
  %tabbi pause | stop        Snapshot the session, then stop its sandbox (not during a turn).
  %tabbi resume              Start it again from the snapshot; a prompt resumes it too.
  %tabbi delete              End the current session: sandbox, workspace and snapshots are removed.

  %tabbi push [-m MSG] [--pr] [--cells SEL [--to PATH] [--cells-only]] [--author "N <e>"]
        Commit the agent's changes on the session branch as you and push it; --pr opens a pull
        request (or shows the open one). --cells adds the saved notebook's cells SEL (a tag,
        numbers like 2,4-6, or id:CELLID) as one percent-format .py file (notebooks/<name>.py
        unless --to); --cells-only pushes them without the agent's changes.

  %tabbi login [--device]    Sign in to GitHub: a link (or a code) to approve; finishes by itself.
  %tabbi logout              Sign out: the token is deleted here and revoked at GitHub.
  %tabbi whoami | models     Who you are (server and GitHub); the configured model.
  %tabbi repos [QUERY]       Your GitHub repositories, newest push first, filtered by QUERY.

Python API: client = tabbi_kernel.connect(); session = client.start(REPO); session.ask(TEXT)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see %tabbi --help)")


def _parser(prog: str, *args: tuple[Any, ...]) -> _Parser:
    parser = _Parser(prog=prog, add_help=False)
    for names, options in args:
        parser.add_argument(*names, **options)
    return parser


class TurnPrinter:
    """Streams one turn into the cell: the agent's text as it arrives, one line per tool call."""

    def __init__(self, out: Any = None, err: Any = None):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.line_open = False
        self.message: str | None = None

    def _newline(self) -> None:
        if self.line_open:
            self.out.write("\n")
            self.line_open = False

    def _line(self, text: str, error: bool = False) -> None:
        self._newline()
        stream = self.err if error else self.out
        stream.write(text + "\n")
        stream.flush()

    def __call__(self, event: Event) -> None:
        kind, data = event["type"], event["data"]
        if kind == "text.delta" and data.get("field", "text") == "text":
            if self.message not in (None, data["message_id"]):
                self._newline()
            self.message = data["message_id"]
            self.out.write(data["delta"])
            self.out.flush()
            self.line_open = not data["delta"].endswith("\n")
        elif kind == "tool" and data.get("status") in ("completed", "error"):
            self._line(render.tool_line(data))
        elif kind == "permission.asked":
            what = ", ".join(data.get("patterns") or []) or data.get("permission")
            self._line(f"[permission] the agent asks to {data.get('permission')} {what}: "
                       "answer it in the chat panel (%tabbi panel)")
        elif kind == "error":
            self._line(f"[error] {data.get('message')}", error=True)
        elif kind == "session.status" and data.get("state") == "starting":
            self._line(f"[tabbi] {describe_phase(data)}")
        elif kind == "turn.finished":
            self._newline()
            if data.get("outcome") == "aborted":
                self._line("[tabbi] the turn was aborted")


def describe_phase(data: dict[str, Any]) -> str:
    phase = data.get("phase")
    return {
        "creating": "creating the sandbox",
        "cloning": f"cloning {data.get('repo', 'the repository')}",
        "reusing_workspace": "reusing the workspace",
        "branch": f"working on branch {data.get('branch')}",
        "starting_agent": "starting the agent",
        "restoring": "restoring the last snapshot",
        "ready": "ready",
    }.get(phase or "", phase or "starting")


@magics_class
class TabbiMagics(Magics):
    def __init__(self, shell: Any, client_factory: Callable[[], Client] = connect):
        super().__init__(shell)
        self._client_factory = client_factory
        self._client: Client | None = None
        self.current: str | None = None

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def client(self) -> Client:
        if self._client is None:
            try:
                self._client = self._client_factory()
            except ServerNotFound as exc:
                raise UsageError(str(exc)) from None
        return self._client

    def session(self, session_id: str | None = None) -> Session:
        chosen = session_id or self.current
        if chosen is None:
            mine = self.client.sessions()
            if len(mine) != 1:
                raise UsageError("no current session: start one with %tabbi start REPO, or pick "
                                 "one with %tabbi use ID (see %tabbi sessions)")
            chosen = mine[0]["id"]
        session = self.client.session(chosen)
        self.current = session.id
        return session

    @line_cell_magic
    def tabbi(self, line: str, cell: str | None = None) -> Any:
        try:
            if cell is not None:
                return self._prompt_cell(line, cell)
            words = shlex.split(line)
            if not words or words[0] in ("-h", "--help", "help"):
                print(HELP)
                return None
            command = getattr(self, "cmd_" + words[0].replace("-", "_"), None)
            if command is None:
                raise UsageError(f"unknown command {words[0]!r}; see %tabbi --help")
            return command(words[1:])
        except TabbiError as exc:
            raise UsageError(str(exc)) from None
        except ValueError as exc:  # shlex: unbalanced quotes
            raise UsageError(f"cannot read the command: {exc}") from None

    # -- sessions -------------------------------------------------------------------------------
    def cmd_start(self, argv: list[str]) -> None:
        args = _parser(
            "%tabbi start", (("repo",), {}), (("--model",), {}), (("--branch",), {}),
            (("--no-wait",), {"action": "store_true"}),
        ).parse_args(argv)
        session = self.client.start(args.repo, model=args.model, branch=args.branch)
        self.current = session.id
        print(f"[tabbi] session {session.id} for {session.info['repo']}")
        if args.no_wait:
            print("[tabbi] starting in the background; see %tabbi status")
            return
        try:
            info = session.wait_until_running(
                on_event=lambda e: print(f"[tabbi] {describe_phase(e['data'])}")
                if e["data"].get("state") == "starting" else None
            )
        except KeyboardInterrupt:
            print("[tabbi] still starting in the background; see %tabbi status")
            return
        print(f"[tabbi] ready: the agent works on branch {info['work_branch']}. "
              "Ask with %%tabbi, or open the chat with %tabbi panel")

    def cmd_sessions(self, argv: list[str]) -> None:
        display(render.sessions(self.client.sessions(), self.current), raw=True)

    def cmd_use(self, argv: list[str]) -> None:
        args = _parser("%tabbi use", (("id",), {})).parse_args(argv)
        session = self.session(args.id)
        print(f"[tabbi] current session: {session.id} ({session.info['state']}, {session.info['repo']})")

    def cmd_status(self, argv: list[str]) -> None:
        info = self.session(argv[0] if argv else None).info
        busy = ", working on a turn" if info.get("busy") else ""
        print(f"{info['id']}: {info['state']}{busy}\n  repo:   {info['repo']}\n"
              f"  branch: {info['work_branch']}\n  model:  {info.get('model') or '(server default)'}")
        if info.get("error"):
            print(f"  error:  {info['error']}", file=sys.stderr)

    def cmd_panel(self, argv: list[str]) -> Any:
        from .panel import ChatPanel  # anywidget is imported only when a panel is shown

        return ChatPanel(self.session(argv[0] if argv else None))

    def cmd_delete(self, argv: list[str]) -> None:
        session = self.session(argv[0] if argv else None)
        session.delete()
        if self.current == session.id:
            self.current = None
        print(f"[tabbi] deleted {session.id}")

    def cmd_pause(self, argv: list[str]) -> None:
        session = self.session(argv[0] if argv else None)
        print("[tabbi] saving a snapshot, then stopping the sandbox...")
        session.pause()
        print(f"[tabbi] {session.id} is paused; a prompt or %tabbi resume brings it back")

    cmd_stop = cmd_pause

    def cmd_resume(self, argv: list[str]) -> None:
        session = self.session(argv[0] if argv else None)
        session.resume()
        info = session.wait_until_running(
            on_event=lambda e: print(f"[tabbi] {describe_phase(e['data'])}")
            if e["data"].get("state") == "starting" else None
        )
        print(f"[tabbi] {info['id']} is running again on branch {info['work_branch']}")

    # -- prompts --------------------------------------------------------------------------------
    def _prompt_cell(self, line: str, cell: str) -> None:
        args = _parser("%%tabbi", (("id",), {"nargs": "?"}),
                       (("--no-wait",), {"action": "store_true"})).parse_args(shlex.split(line))
        self._ask(self.session(args.id), cell, wait=not args.no_wait)

    def cmd_ask(self, argv: list[str]) -> None:
        if not argv:
            raise UsageError("%tabbi ask TEXT: say what the agent should do")
        self._ask(self.session(), " ".join(argv), wait=True)

    def _ask(self, session: Session, text: str, wait: bool) -> None:
        if not text.strip():
            raise UsageError("the prompt is empty: write it in the cell body")
        if not wait:
            session.prompt(text)
            print("[tabbi] queued; it streams into the chat panel (%tabbi panel)")
            return
        result = session.ask(text, on_event=TurnPrinter())
        if result.outcome == "error":
            print(f"[tabbi] the turn ended with an error: {result.error}", file=sys.stderr)

    def cmd_abort(self, argv: list[str]) -> None:
        self.session().abort()
        print("[tabbi] abort sent")

    # -- the workspace --------------------------------------------------------------------------
    def cmd_diff(self, argv: list[str]) -> None:
        display(render.diff(self.session().diff()), raw=True)

    def cmd_insert(self, argv: list[str]) -> None:
        session = self.session()
        conversation = Conversation().apply_all(session.all_events())
        turn = conversation.last_finished_turn()
        if turn is None:
            print("[tabbi] no finished turn yet: nothing to insert")
            return
        reader = session.read_file if session.info.get("state") == "running" else None
        snippets = turn_snippets(conversation, turn, reader)
        if not snippets:
            print("[tabbi] the last turn produced no Python code to insert")
            return
        self.shell.set_next_input(cell_source(snippets), replace=False)
        origins = "; ".join(s.origin for s in snippets)
        print(f"[tabbi] inserted {len(snippets)} snippet(s) into a new cell below: {origins}")

    # -- who and what ---------------------------------------------------------------------------
    def cmd_whoami(self, argv: list[str]) -> None:
        me = self.client.request("GET", "whoami")
        github = self.client.github_user()
        if github.get("signed_in"):
            where = f"signed in to GitHub as {github['login']}"
        elif github.get("configured"):
            where = "not signed in to GitHub (%tabbi login)"
        else:
            where = "GitHub sign-in is not configured on this server"
        print(f"{me['owner']} on {self.client.url}: {where}")

    def cmd_models(self, argv: list[str]) -> None:
        model = self.client.health().get("model", {})
        where = "an OpenAI-compatible server (TABBI_LLM_BASE_URL)" if model.get("custom_endpoint") \
            else "OpenCode's providers"
        print(f"default model: {model.get('default') or '(none: set TABBI_MODEL)'} via {where}\n"
              "choose another per session: %tabbi start REPO --model PROVIDER/MODEL")

    # -- GitHub ---------------------------------------------------------------------------------
    def cmd_login(self, argv: list[str]) -> None:
        args = _parser("%tabbi login", (("--device",), {"action": "store_true"}),
                       (("--force",), {"action": "store_true"})).parse_args(argv)
        current = self.client.github_user()
        if current.get("signed_in") and not args.force:
            print(f"[tabbi] already signed in to GitHub as {current['login']} "
                  "(%tabbi logout, or %tabbi login --force to sign in again)")
            return
        attempt = self.client.login("device" if args.device else None)
        handle = display(render.login(attempt), raw=True, display_id=True)
        # Nothing blocks the notebook: the sign-in finishes in the background and the output
        # above turns into "signed in" once the person has approved at GitHub.
        threading.Thread(target=self._finish_login, args=(attempt, handle), daemon=True).start()

    def _finish_login(self, attempt: dict[str, Any], handle: Any) -> None:
        deadline = time.monotonic() + float(attempt.get("expires_in") or 900) + 30
        status = attempt
        while status.get("status") == "pending" and time.monotonic() < deadline:
            try:
                status = self.client.wait_for_login(attempt["login_id"], wait=25)
            except TabbiError as exc:
                status = {"status": "failed", "error": str(exc)}
        if status.get("status") == "pending":
            status = {"status": "failed", "error": "the sign-in expired; run %tabbi login again"}
        if handle is not None:
            handle.update(render.login({**attempt, **status}), raw=True)

    def cmd_logout(self, argv: list[str]) -> None:
        result = self.client.logout()
        if not result.get("was"):
            print("[tabbi] not signed in to GitHub")
            return
        revoked = "and revoked at GitHub" if result.get("revoked") else \
            "(GitHub did not confirm the revocation: remove the app under GitHub > Settings > Applications)"
        print(f"[tabbi] signed out of GitHub ({result['was']}): the token is deleted here {revoked}")

    def cmd_repos(self, argv: list[str]) -> None:
        repos = self.client.repos(" ".join(argv))
        display(render.repos(repos, " ".join(argv)), raw=True)

    def cmd_push(self, argv: list[str]) -> None:
        args = _parser(
            "%tabbi push", (("-m", "--message"), {}), (("--pr",), {"action": "store_true"}),
            (("--title",), {}), (("--cells",), {}), (("--to",), {}),
            (("--cells-only",), {"action": "store_true"}), (("--notebook",), {}), (("--author",), {}),
            (("id",), {"nargs": "?"}),
        ).parse_args(argv)
        notebook = args.notebook or os.environ.get("JPY_SESSION_NAME")
        if args.cells and not notebook:
            raise UsageError("%tabbi push --cells: this kernel does not know its notebook; "
                             "give it with --notebook PATH.ipynb")
        if (args.to or args.cells_only) and not args.cells:
            raise UsageError("%tabbi push: --to and --cells-only go with --cells")
        session = self.session(args.id)
        if args.cells:
            print("[tabbi] reading the cells from the saved notebook (save it first to include edits)")
        print(f"[tabbi] committing and pushing {session.info.get('work_branch', '')}...")
        result = session.push(args.message, cells=args.cells, notebook=notebook, to=args.to,
                              cells_only=args.cells_only, pr=args.pr, title=args.title, author=args.author)
        display(render.push(result), raw=True)
