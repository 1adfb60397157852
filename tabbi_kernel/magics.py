"""``%tabbi`` and ``%%tabbi``: a thin layer over the Python API (``client.py``).

Errors come back as one readable line (``UsageError``: red, no traceback of tabbi's internals).
"""

from __future__ import annotations

import argparse
import contextlib
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
from .snippets import cell_source, earlier_note, latest_code

HELP = """\
%tabbi: AI coding-agent sessions in this notebook.

  %tabbi start REPO [--model PROVIDER/MODEL] [--branch BASE] [--fresh] [--no-wait]
        Start a session on REPO: a local path (relative to this notebook's folder, or
        absolute, or ~/...), a git URL, or owner/name on GitHub. The agent works on a new
        branch tabbi/<id> of a clone, never in your files. The new session becomes current.
  %tabbi sessions            List your sessions (* marks the current one).
  %tabbi use ID              Make ID the current session (only start and use change it).
  %tabbi status [ID]         State, repository, branch and model of a session.
  %tabbi panel [ID]          Show the chat panel (live; several panels stay in sync).

  %%tabbi [ID] [--no-wait]   The cell body is the prompt. Output streams into the cell and the
                             cell returns when the turn ends. The stop button aborts the turn.
  %tabbi ask TEXT            The same, one line.
      --with A,B,...         Attach context you choose (shown before it is sent): a variable
                             (data frames as schema + a few rows), @cell:3, @cell:2-4, @cells,
                             @error (last traceback + its cell), @file:PATH (docs/notebook-context.md).
  %tabbi abort [ID]          Abort the running turn.
  %tabbi fix [WORDS]         Send the last error, its cell and the variables it uses; the agent
                             fixes the repository's code (not the notebook).

  %tabbi diff [--outputs]    The branch's changes against where it started; notebooks by cell
                             (--outputs: their outputs' changes too).
  %tabbi insert              The Python code of the last turn -> one new cell below (percent
                             format: split it at the '# %%' markers with Ctrl+Shift+-).
  %tabbi checkout [DIR] [--off] [--no-follow]
                             A working copy of the session's files (its uncommitted changes
                             too) in DIR (tabbi-checkouts/<id>), on sys.path so you can import
                             the agent's code; it follows each turn. --off stops following.
  %tabbi pause | stop [ID]   Snapshot the session, then stop its sandbox (not during a turn).
  %tabbi resume [ID]         Start it again from the snapshot; a prompt resumes it too.
  %tabbi delete [ID]         End a session: its sandbox, workspace and snapshots are removed.

  %tabbi push [-m MSG] [--pr] [--cells SEL [--to PATH] [--cells-only]] [--author "N <e>"]
             [--keep-outputs]
        Commit the agent's changes on the session branch as you and push it; --pr opens a pull
        request (or shows the open one). --cells adds the saved notebook's cells SEL (a tag,
        numbers like 2,4-6, or id:CELLID) as one percent-format .py file (notebooks/<name>.py
        unless --to; a --to ending in .ipynb makes a notebook); --cells-only pushes them without
        the agent's changes. Notebooks are checked with nbformat and pushed without outputs
        unless --keep-outputs.

  %tabbi login [--device]    Sign in to GitHub: a link (or a code) to approve; finishes by itself.
  %tabbi logout              Sign out: the token is deleted here and revoked at GitHub.
  %tabbi whoami              Who you are (server and GitHub).
  %tabbi models [ID]         The models this server can use; the default and the current
                             session's are marked.
  %tabbi model [PROVIDER/MODEL] [ID]  The session's model; with a name, switch to it from the
                             next turn on (a turn running now keeps its model).
  %tabbi repos [QUERY]       Your GitHub repositories, newest push first, filtered by QUERY.
  %tabbi admin [pause|stop ID]  Admins: everyone's sessions (owner, state, age, use); pause one,
                             or stop it at once, mid-turn too (its workspace is kept).

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


#: Seconds a wait lasts before the cell says so (quick answers leave no trace).
ACTIVITY_SHOWN_AFTER = 1.0

NOT_CONFIGURED = (
    "GitHub sign-in is not configured on this server. An administrator enables it by setting "
    "TABBI_GITHUB_CLIENT_ID and TABBI_GITHUB_CLIENT_SECRET (a GitHub OAuth App or GitHub App) for "
    "the Jupyter server and restarting it. Meanwhile, start sessions from a git URL or a local path."
)


def elapsed(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


class StatusLine:
    """One line at the end of the cell's output that changes in place ("waiting for the model...
    12 s"), the way progress bars do: rewritten after a carriage return at most once a second,
    and blanked when done. Front ends (and nbval) fold carriage returns, so a saved notebook
    keeps no trace of it and gets no extra output, whether a wait showed or not."""

    def __init__(self, out: Any = None):
        self.out = out or sys.stdout
        self.text = ""

    @property
    def shown(self) -> bool:
        return bool(self.text)

    def show(self, text: str) -> None:
        if text == self.text:
            return
        self.out.write("\r" + text + " " * max(0, len(self.text) - len(text)))
        self.out.flush()
        self.text = text

    def clear(self) -> None:
        """Blank the line; what is written next starts where it began."""
        if self.text:
            self.out.write("\r" + " " * len(self.text) + "\r")
            self.out.flush()
            self.text = ""


class TurnPrinter:
    """Streams one turn into the cell: the agent's text as it arrives, one line per tool call,
    and a status line while nothing else shows ("waiting for the model... 12 s", "running bash
    pytest... 40 s") so that a slow model or a long command never looks like a stuck cell."""

    def __init__(self, out: Any = None, err: Any = None):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.line_open = False
        self.message: str | None = None
        self.status = StatusLine(self.out)
        #: What the turn is doing while nothing shows, and since when (monotonic); or None.
        self.activity: tuple[str, float] | None = None
        self.retry = ""

    def _newline(self) -> None:
        if self.line_open:
            self.out.write("\n")
            self.line_open = False

    def _line(self, text: str, error: bool = False) -> None:
        self._newline()
        if not error:
            self.status.clear()  # the line takes the status line's place; a tick shows it again
        stream = self.err if error else self.out
        stream.write(text + "\n")
        stream.flush()

    def _follow(self, kind: str, data: dict[str, Any]) -> None:
        """Keep the activity up to date. The server says when the turn waits for the model
        (``turn.waiting``); the model's output and the agent's tool calls say the rest."""
        if kind == "turn.waiting":
            self._set_activity("waiting for the model" if data.get("waiting") else None)
        elif kind == "agent.status" and data.get("status") == "retry":
            self.retry = f" (the model server failed; retrying, attempt {data.get('attempt')})"
        elif kind == "text.delta":
            self._set_activity("the model is thinking" if data.get("field") == "reasoning" else None)
        elif kind == "tool":
            running = data.get("status") == "running"
            self._set_activity(f"running {render.tool_summary(data)}" if running else None)
        elif kind == "turn.finished":
            self._set_activity(None)
        self.tick()

    def _set_activity(self, what: str | None) -> None:
        if what is None:
            self.activity, self.retry = None, ""
            self.status.clear()
        elif self.activity is None or self.activity[0] != what:
            self.activity = (what, time.monotonic())

    def tick(self) -> None:
        """Show (or refresh) the activity with the time it has taken; called about once a
        second. A quick one never shows."""
        if self.activity is None:
            return
        what, since = self.activity
        taken = time.monotonic() - since
        if taken >= ACTIVITY_SHOWN_AFTER:
            if not self.status.shown:
                self._newline()
            self.status.show(f"[tabbi] {what}... {elapsed(taken)}{self.retry}")

    def __call__(self, event: Event) -> None:
        kind, data = event["type"], event["data"]
        self._follow(kind, data)
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
        elif kind == "environment":
            what = ("running the changed .tabbi/setup.sh" if data.get("status") == "setup"
                    else render.environment(data))
            self._line(f"[tabbi] environment {data.get('status')}: {what}")
        elif kind == "turn.finished":
            self._newline()
            if data.get("outcome") == "aborted":
                self._line("[tabbi] the turn was aborted")
            tokens = data.get("tokens") or {}
            if data.get("cost") or tokens.get("input") or tokens.get("output"):  # nothing used: nothing said
                self._line(f"[tabbi] {render.usage(tokens, data.get('cost'), data.get('session'))}")


def describe_phase(data: dict[str, Any]) -> str:
    phase = data.get("phase")
    return {
        "creating": "creating the sandbox",
        "cloning": f"cloning {data.get('repo', 'the repository')}",
        "reusing_workspace": "reusing the workspace",
        "branch": f"working on branch {data.get('branch')}",
        "starting_agent": "starting the agent",
        "restoring": "restoring the last snapshot",
        "setup": f"setup: {data['line']}" if "line" in data else "running .tabbi/setup.sh",
        "setup_done": f".tabbi/setup.sh done in {data.get('seconds')} s",
        "saving_environment": "saving the environment for the next sessions (warm snapshot)",
        "warm_snapshot": f"starting from your warm snapshot {data.get('snapshot')} (%tabbi start --fresh: "
                         "build it anew)",
        "ready": "ready",
        "reattached": "re-attached to the running sandbox",
    }.get(phase or "", phase or "starting")


@magics_class
class TabbiMagics(Magics):
    def __init__(self, shell: Any, client_factory: Callable[[], Client] = connect):
        super().__init__(shell)
        self._client_factory = client_factory
        self._client: Client | None = None
        self.current: str | None = None
        # Loading tabbi is a sign a session will start: the server warms a sandbox meanwhile
        # (off this thread, so %load_ext stays instant; no server, no harm).
        threading.Thread(target=self._warm, daemon=True, name="tabbi-warm").start()

    def _warm(self) -> None:
        with contextlib.suppress(Exception):
            self._client_factory().warm()

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
        """The session a command acts on: ``session_id`` when given (the current session stays
        what it is: only ``start`` and ``use`` change it), else the current one, else your only
        session (which then becomes current)."""
        chosen = session_id or self.current
        if chosen is None:
            mine = self.client.sessions()
            if len(mine) != 1:
                raise UsageError("no current session: start one with %tabbi start REPO, or pick "
                                 "one with %tabbi use ID (see %tabbi sessions)")
            chosen = mine[0]["id"]
        try:
            session = self.client.session(chosen)
        except TabbiError as exc:
            if exc.status != 404:
                raise
            if chosen == self.current:
                self.current = None
                raise UsageError(f"the current session {chosen} no longer exists (deleted?); "
                                 "%tabbi sessions lists yours") from None
            raise UsageError(f"no session {chosen}; %tabbi sessions lists yours") from None
        if self.current is None:
            self.current = session.id
        return session

    def _wait_running(self, session: Session) -> dict[str, Any] | None:
        """Show the phases of a start (or resume) until the session runs; None if interrupted
        (it goes on starting in the background). Raises ``TabbiError`` if it fails."""
        try:
            return session.wait_until_running(
                on_event=lambda e: print(f"[tabbi] {describe_phase(e['data'])}")
                if e["data"].get("state") == "starting" else None
            )
        except KeyboardInterrupt:
            print("[tabbi] still starting in the background; see %tabbi status")
            return None

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
        except (UsageError, KeyboardInterrupt):
            raise
        except TabbiError as exc:
            raise UsageError(str(exc)) from None
        except ValueError as exc:  # shlex: unbalanced quotes
            raise UsageError(f"cannot read the command: {exc}") from None
        except Exception as exc:  # a defect of tabbi's: still one readable line, not a traceback
            raise UsageError(f"tabbi failed unexpectedly ({type(exc).__name__}: {exc}); "
                             "please report it") from None

    # -- sessions -------------------------------------------------------------------------------
    def cmd_start(self, argv: list[str]) -> None:
        args = _parser(
            "%tabbi start", (("repo",), {}), (("--model",), {}), (("--branch",), {}),
            (("--fresh",), {"action": "store_true"}), (("--no-wait",), {"action": "store_true"}),
        ).parse_args(argv)
        session = self.client.start(args.repo, model=args.model, branch=args.branch, fresh=args.fresh)
        print(f"[tabbi] session {session.id} for {session.info['repo']}")
        if args.no_wait:
            self.current = session.id
            print("[tabbi] starting in the background; see %tabbi status")
            return
        try:
            info = self._wait_running(session)
        except TabbiError as exc:
            if session.info.get("state") == "error":  # not a start still under way
                self._discard_failed_start(session, str(exc))
            self.current = session.id
            raise
        self.current = session.id
        if info is not None:
            print(f"[tabbi] ready: the agent works on branch {info['work_branch']}. "
                  "Ask with %%tabbi, or open the chat with %tabbi panel")

    def _discard_failed_start(self, session: Session, reason: str) -> None:
        """A session that failed to start is of no use (it has no workspace to keep): delete it,
        leave the current session as it was, and say what to do."""
        try:
            session.delete()
            gone = "It was deleted"
        except TabbiError as exc:
            gone = f"Deleting it failed too ({exc}): %tabbi delete {session.id} removes it"
        raise UsageError(f"session {session.id} could not start: {reason}\n{gone}; fix the cause, "
                         "then run %tabbi start again.")

    def cmd_sessions(self, argv: list[str]) -> None:
        display(render.sessions(self.client.sessions(), self.current), raw=True)

    def cmd_use(self, argv: list[str]) -> None:
        args = _parser("%tabbi use", (("id",), {})).parse_args(argv)
        session = self.session(args.id)
        self.current = session.id
        print(f"[tabbi] current session: {session.id} ({session.info['state']}, {session.info['repo']})")

    def cmd_status(self, argv: list[str]) -> None:
        info = self.session(argv[0] if argv else None).info
        busy = ""
        if info.get("busy"):
            busy = ", working on a turn"
            if info.get("waiting_since"):
                busy += f": waiting for the model for {elapsed(time.time() - info['waiting_since'])}"
        print(f"{info['id']}: {info['state']}{busy}\n  repo:   {info['repo']}\n"
              f"  branch: {info['work_branch']}\n  model:  {render.model_name(info.get('model'))}")
        if info.get("usage"):
            print(f"  usage:  {render.usage(info['usage'].get('tokens'), info['usage'].get('cost'))} "
                  "(session total)")
        if info.get("environment"):
            print(f"  environment: {render.environment(info['environment'])}")
        if info.get("error"):
            print(f"  error:  {info['error']}", file=sys.stderr)
        if info["state"] == "error":
            print(f"  next:   %tabbi resume {info['id']} tries again; %tabbi delete {info['id']} "
                  "removes it", file=sys.stderr)

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
        print(f"[tabbi] resuming {session.id}...")
        session.resume()
        info = self._wait_running(session)
        if info is not None:
            print(f"[tabbi] {info['id']} is running again on branch {info['work_branch']}")

    def cmd_admin(self, argv: list[str]) -> None:
        """Every person's sessions (``%tabbi admin``), or pause/stop one of them (admins only)."""
        args = _parser("%tabbi admin", (("action",), {"nargs": "?", "choices": ["pause", "stop"]}),
                       (("id",), {"nargs": "?"})).parse_args(argv)
        try:
            if args.action is None:
                display(render.admin_sessions(self.client.admin_sessions()), raw=True)
                return
            if not args.id:
                raise UsageError(f"%tabbi admin {args.action} ID: which session? (%tabbi admin lists them)")
            act = self.client.admin_pause if args.action == "pause" else self.client.admin_stop
            info = act(args.id)
        except TabbiError as exc:
            if (exc.status == 404 and args.action is None) or "no such resource" in str(exc):
                raise UsageError("%tabbi admin is for tabbi's admins, and you are not one on this "
                                 "server (hub admins are; see docs/deploy-jupyterhub.md)") from None
            raise
        print(f"[tabbi] {info['id']} of {info['owner']} is {info['state']} "
              f"({'paused' if args.action == 'pause' else 'stopped'} by you)")

    # -- prompts --------------------------------------------------------------------------------
    def _prompt_cell(self, line: str, cell: str) -> None:
        args = _parser("%%tabbi", (("id",), {"nargs": "?"}), (("--with",), {"dest": "attach"}),
                       (("--no-wait",), {"action": "store_true"})).parse_args(shlex.split(line))
        self._ask(self.session(args.id), cell, wait=not args.no_wait, attach=args.attach)

    def cmd_ask(self, argv: list[str]) -> None:
        attach = None
        if argv and argv[0] == "--with":
            if len(argv) < 2:
                raise UsageError("%tabbi ask --with A,B TEXT: say what to attach")
            attach, argv = argv[1], argv[2:]
        if not argv:
            raise UsageError("%tabbi ask TEXT: say what the agent should do")
        self._ask(self.session(), " ".join(argv), wait=True, attach=attach)

    def _attachments(self, attach: Any) -> list[Any]:
        """Gather what ``--with`` names and show it before anything is sent."""
        from .context import ContextError, gather

        try:
            attachments = gather(attach, self.shell)
        except ContextError as exc:
            raise UsageError(f"{exc}; nothing was sent") from None
        if attachments:
            print("[tabbi] attached: " + ", ".join(a.describe() for a in attachments))
        return attachments

    def _ask(self, session: Session, text: str, wait: bool, attach: Any = None) -> None:
        if not text.strip():
            raise UsageError("the prompt is empty: write it in the cell body")
        attachments = self._attachments(attach) if attach else None
        if not wait:
            session.prompt(text, attachments)
            print("[tabbi] queued; it streams into the chat panel (%tabbi panel)")
            return
        printer = TurnPrinter()
        result = session.ask(text, on_event=printer, on_tick=printer.tick, attach=attachments)
        if result.outcome == "error":
            print(f"[tabbi] the turn ended with an error: {result.error}", file=sys.stderr)

    def cmd_abort(self, argv: list[str]) -> None:
        self.session(argv[0] if argv else None).abort()
        print("[tabbi] abort sent")

    def cmd_fix(self, argv: list[str]) -> None:
        """The last error, its cell and the variables the cell names go to the agent, which is asked
        to fix the repository's code; the turn streams here like ``%%tabbi``."""
        from .context import ContextError, fix_request

        try:
            text, attachments = fix_request(self.shell, " ".join(argv))
        except ContextError as exc:
            raise UsageError(f"%tabbi fix: {exc}") from None
        self._ask(self.session(), text, wait=True, attach=attachments)

    # -- the workspace --------------------------------------------------------------------------
    def cmd_diff(self, argv: list[str]) -> None:
        args = _parser("%tabbi diff", (("--outputs",), {"action": "store_true"})).parse_args(argv)
        display(render.diff(self.session().diff(outputs=args.outputs)), raw=True)

    def cmd_insert(self, argv: list[str]) -> None:
        session = self.session()
        conversation = Conversation().apply_all(session.all_events())
        if conversation.last_finished_turn() is None:
            print("[tabbi] no finished turn yet: nothing to insert")
            return
        reader = session.read_file if session.info.get("state") == "running" else None
        found = latest_code(conversation, reader)
        if found is None:
            print("[tabbi] no turn has produced Python code yet: nothing to insert")
            return
        turn, snippets = found
        self.shell.set_next_input(cell_source(snippets), replace=False)
        origins = "; ".join(s.origin for s in snippets)
        where = earlier_note(conversation, turn)
        print(f"[tabbi] inserted {len(snippets)} snippet(s) into a new cell below{where}: {origins}")

    def cmd_checkout(self, argv: list[str]) -> None:
        from . import checkout  # deferred: importing tabbi_kernel must stay cheap

        args = _parser(
            "%tabbi checkout", (("dir",), {"nargs": "?"}), (("--session",), {}),
            (("--off",), {"action": "store_true"}), (("--no-follow",), {"action": "store_true"}),
        ).parse_args(argv)
        if args.off:
            stopped = checkout.stop(args.session)
            print(f"[tabbi] stopped following {', '.join(stopped)}" if stopped
                  else "[tabbi] no working copy was following a session")
            return
        session = self.session(args.session)
        try:
            follower = checkout.checkout(session, args.dir, follow=not args.no_follow)
        except checkout.CheckoutError as exc:
            raise UsageError(str(exc)) from None
        root = follower.copy.import_root()
        where = " (the src/ layout's folder)" if root != follower.copy.path else ""
        print(f"[tabbi] {root}{where} is on sys.path: import the agent's modules as usual")
        if not args.no_follow:
            print("[tabbi] it follows the session after each turn (%tabbi checkout --off stops).\n"
                  "        To pick up changed modules without restarting the kernel, run once:\n"
                  "            %load_ext autoreload\n            %autoreload 2\n"
                  "        (or importlib.reload(module) after a turn)")

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
        session_id = argv[0] if argv else self.current
        try:
            answer = self.client.models(session_id)
        except TabbiError as exc:
            if argv or exc.status not in (400, 404):
                raise
            session_id, answer = None, self.client.models()  # the current session is gone
        if not answer["models"]:
            print("no model is configured on this server: set TABBI_MODEL (see %tabbi --help)")
            return
        width = max(len(m["id"]) for m in answer["models"])
        whose = f" (> {session_id}'s)" if answer.get("current") else ""
        print(f"models this server can use{whose}:")
        for m in answer["models"]:
            notes = [n for n, on in (("default", m["default"]), ("demo: canned answers", m["id"] == "demo"))
                     if on]
            mark = ">" if m["current"] else " "
            print(f"{mark} {m['id']:<{width}}  {'(' + ', '.join(notes) + ')' if notes else ''}".rstrip())
        print("switch a session's model (from its next turn on): %tabbi model PROVIDER/MODEL")

    def cmd_model(self, argv: list[str]) -> None:
        args = _parser("%tabbi model", (("model",), {"nargs": "?"}),
                       (("id",), {"nargs": "?"})).parse_args(argv)
        session = self.session(args.id)
        before = self.client.models(session.id).get("current") or render.model_name(session.info.get("model"))
        if not args.model:
            print(f"{session.id} uses {before} (%tabbi models lists the others)")
            return
        info = session.set_model(args.model)
        busy = f"; the running turn keeps {before}" if info.get("busy") else ""
        print(f"[tabbi] {session.id} uses {info['model']} from its next turn on{busy}")

    # -- GitHub ---------------------------------------------------------------------------------
    def cmd_login(self, argv: list[str]) -> None:
        args = _parser("%tabbi login", (("--device",), {"action": "store_true"}),
                       (("--force",), {"action": "store_true"})).parse_args(argv)
        current = self.client.github_user()
        if not current.get("configured", True):
            raise UsageError(NOT_CONFIGURED)
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
        try:
            repos = self.client.repos(" ".join(argv))
        except TabbiError as exc:
            if exc.status in (401, 403, 501) and not self.client.github_user().get("configured", True):
                raise UsageError(NOT_CONFIGURED) from None
            raise
        display(render.repos(repos, " ".join(argv)), raw=True)

    def _pushable(self, session: Session, pr: bool) -> Session:
        """Refuse what the server would refuse, before any progress is printed: a pull request
        of a repository not on GitHub, a session not running, GitHub without a sign-in."""
        repo, state = session.info.get("repo", ""), session.info.get("state")
        on_github = not (repo.startswith("/") or "://" in repo)  # what the server names owner/name
        if pr and not on_github:
            raise UsageError(f"%tabbi push --pr: pull requests need a GitHub repository (owner/name), "
                             f"and {session.id} works on {repo}; push without --pr")
        if state != "running":
            raise UsageError(f"%tabbi push: {session.id} is {state}; %tabbi resume, then push")
        if on_github:
            github = self.client.github_user()
            if not github.get("configured", True):
                raise UsageError(NOT_CONFIGURED)
            if not github.get("signed_in"):
                raise UsageError("%tabbi push: pushing to GitHub needs you signed in: %tabbi login")
        return session

    def cmd_push(self, argv: list[str]) -> None:
        args = _parser(
            "%tabbi push", (("-m", "--message"), {}), (("--pr",), {"action": "store_true"}),
            (("--title",), {}), (("--cells",), {}), (("--to",), {}),
            (("--cells-only",), {"action": "store_true"}), (("--notebook",), {}), (("--author",), {}),
            (("--keep-outputs",), {"action": "store_true"}), (("id",), {"nargs": "?"}),
        ).parse_args(argv)
        notebook = args.notebook or os.environ.get("JPY_SESSION_NAME")
        if args.cells and not notebook:
            raise UsageError("%tabbi push --cells: this kernel does not know its notebook; "
                             "give it with --notebook PATH.ipynb")
        if (args.to or args.cells_only) and not args.cells:
            raise UsageError("%tabbi push: --to and --cells-only go with --cells")
        session = self._pushable(self.session(args.id), args.pr)
        if args.cells:
            print("[tabbi] reading the cells from the saved notebook (save it first to include edits)")
        print(f"[tabbi] committing and pushing {session.info.get('work_branch', '')}...")
        result = session.push(args.message, cells=args.cells, notebook=notebook, to=args.to,
                              cells_only=args.cells_only, pr=args.pr, title=args.title, author=args.author,
                              keep_outputs=args.keep_outputs)
        display(render.push(result), raw=True)
