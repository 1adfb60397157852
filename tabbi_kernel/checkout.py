"""``%tabbi checkout``: a working copy of the session's workspace in this kernel's filesystem,
importable, kept in step with the session after each turn.

The server makes a bundle of the workspace (``GET .../bundle?since=COMMIT``: the agent's commits
and uncommitted changes as one checkout commit, see ``tabbi_extension.bundle``) with nothing but
this kernel's Jupyter token; no GitHub token, no sandbox password reaches the kernel. The kernel
applies it with git into ``DIR`` (default ``tabbi-checkouts/<session id>`` next to the notebook).

Every byte of the bundle is the agent's, and the agent is an attacker with a shell. So the kernel's
git runs with no configuration but ours (no system or global config: none of the person's filters
or helpers meets the agent's ``.gitattributes``; no hooks; no fsmonitor; ``core.symlinks=false``:
a link is checked out as a small file holding its target, so nothing is ever written or read
through one; NTFS/HFS ``.git`` look-alikes refused). The bundle's header must name the one checkout
ref; its objects go through ``git index-pack --strict`` (git's fsck checks on every object: a
``.git`` or ``..`` path in a tree, malformed objects; git 2.39 skips these on a plain fetch from a
bundle) and a connectivity check, and the new tree is checked against size limits, all before a
file is written. The working copy's folder is resolved once: if it becomes a link later, updates
stop.

The person's own edits in the working copy are never lost: the update is git's two-way checkout,
which keeps local changes to files the update leaves alone and refuses (changing nothing) when it
would overwrite one, or an untracked file; the follower then says so and tries again after the
next turn. Python's caches (``__pycache__``) are ignored, so they never block an update.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .client import Session, TabbiError

#: Largest bundle the kernel downloads.
MAX_BUNDLE_BYTES = 200 << 20
#: Largest single file, all files together, and how many files, a checkout writes.
MAX_FILE_BYTES = 50 << 20
MAX_TREE_BYTES = 1 << 30
MAX_FILES = 100_000
#: The ref the working copy's commit is kept on, and the one the bundle must name.
REF = "refs/tabbi/session"
BUNDLE_REF = b"refs/tabbi/checkout"
SIGNATURE = b"# v2 git bundle\n"
#: The working copy's own config, and options of every git the kernel runs on the agent's files.
SAFE_CONFIG = (
    ("core.symlinks", "false"), ("core.hooksPath", "/dev/null"), ("core.fsmonitor", "false"),
    ("core.protectNTFS", "true"), ("core.protectHFS", "true"), ("protocol.allow", "never"),
    ("submodule.recurse", "false"),
)
SAFE_GIT = [arg for key, value in SAFE_CONFIG for arg in ("-c", f"{key}={value}")] + [
    "-c", "core.quotepath=off", "-c", "advice.detachedHead=false"]
#: Written in the working copy's ``.git``: which session it follows.
MARKER = "tabbi-checkout"
IGNORED = "__pycache__/\n*.py[co]\n.ipynb_checkpoints/\n"


class CheckoutError(Exception):
    """An update was refused or failed; the message says why and what to do."""


@dataclass
class Update:
    """One update of the working copy."""

    commit: str
    head: str
    branch: str = ""
    snapshot: bool = False  # the agent's uncommitted changes are in it
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    changed: bool = True

    def line(self) -> str:
        what = f"{self.branch or 'the branch'} at {self.head[:10]}"
        if self.snapshot:
            what += " + uncommitted changes"
        if not self.changed:
            return f"[tabbi] working copy up to date ({what})"
        count = len(self.files)
        names = ", ".join(self.files[:5]) + (", ..." if count > 5 else "")
        text = f"[tabbi] working copy updated to {what}: {count} file(s) changed"
        text += f" ({names})" if names else ""
        if self.skipped:
            text += f"; left out (too large): {', '.join(self.skipped[:5])}"
        return text


def git_env() -> dict[str, str]:
    """This process's environment without git's variables, and with no git config but the repo's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, GIT_TERMINAL_PROMPT="0",
               LC_ALL="C")
    return env


def read_header(path: str) -> tuple[list[str], list[tuple[str, bytes]], int]:
    """``(prerequisites, refs, offset of the pack)`` of a v2 bundle file."""
    with open(path, "rb") as f:
        head = f.read(65536)
    end = head.find(b"\n\n")
    if not head.startswith(SIGNATURE) or end < 0:
        raise CheckoutError("the server's bundle is not a git bundle")
    prerequisites, refs = [], []
    for line in head[len(SIGNATURE):end].split(b"\n"):
        oid, _, rest = line.partition(b" ")
        if oid.startswith(b"-"):
            prerequisites.append(_commit_id(oid[1:]))
        else:
            refs.append((_commit_id(oid), rest))
    return prerequisites, refs, end + 2


def _commit_id(raw: bytes) -> str:
    text = raw.decode(errors="replace")
    if len(text) != 40 or any(c not in "0123456789abcdef" for c in text):
        raise CheckoutError("the server's bundle names a malformed object id")
    return text


#: Resolved folder -> the lock its updates take (see ``WorkingCopy``).
_FOLDER_LOCKS: dict[str, threading.Lock] = {}


class WorkingCopy:
    """The folder ``path`` as a working copy of session ``session_id``."""

    def __init__(self, path: str, session_id: str):
        self.requested = os.path.abspath(os.path.expanduser(path))
        #: Resolved once: a link planted later in its place is refused, never followed.
        self.path = os.path.realpath(self.requested)
        self.session_id = session_id
        self.git_dir = os.path.join(self.path, ".git")
        # One lock per folder, shared by every WorkingCopy of it: a follower replaced by a new
        # %tabbi checkout may still be in an update, and two git checkouts must not interleave.
        self._lock = _FOLDER_LOCKS.setdefault(self.path, threading.Lock())

    def git(self, *args: str, input: bytes | None = None, stdin: Any = None,
            check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["git", *SAFE_GIT, "--git-dir", self.git_dir, "--work-tree", self.path, *args],
            input=input, stdin=stdin, capture_output=True, env=git_env(), cwd=self.path, timeout=600,
        )
        if check and done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip().splitlines()
            raise CheckoutError(f"git {args[0]} failed: {detail[-1] if detail else done.returncode}")
        return done

    def prepare(self) -> None:
        """Make the folder a working copy of this session, or check that it is one."""
        marker = os.path.join(self.git_dir, MARKER)
        if os.path.lexists(self.git_dir):
            try:
                with open(marker, encoding="utf-8") as f:
                    owner = f.read().strip()
            except OSError:
                owner = None
            if owner != self.session_id:
                raise CheckoutError(
                    f"{self.path} is a git repository that is not the working copy of {self.session_id}: "
                    "choose another folder (%tabbi checkout DIR)")
            return
        if os.path.isdir(self.path) and os.listdir(self.path):
            raise CheckoutError(f"{self.path} is not empty: choose an empty or new folder "
                                "(%tabbi checkout DIR)")
        os.makedirs(self.path, exist_ok=True)
        done = subprocess.run(["git", "init", "--quiet", "--template=", self.path], capture_output=True,
                              env=git_env(), timeout=60)
        if done.returncode != 0:
            raise CheckoutError(f"cannot make a working copy in {self.path}: {done.stderr.decode().strip()}")
        for key, value in SAFE_CONFIG:  # also for the person's own git commands in there
            self.git("config", key, value)
        os.makedirs(os.path.join(self.git_dir, "info"), exist_ok=True)
        with open(os.path.join(self.git_dir, "info", "exclude"), "w", encoding="utf-8") as f:
            f.write(IGNORED)
        with open(marker, "w", encoding="utf-8") as f:
            f.write(self.session_id + "\n")

    def current(self) -> str | None:
        done = self.git("rev-parse", "--verify", "--quiet", REF + "^{commit}", check=False)
        return done.stdout.decode().strip() or None

    def import_root(self) -> str:
        """Where Python imports from: ``src/`` in a src layout, else the working copy itself."""
        src = os.path.join(self.path, "src")
        return src if os.path.isdir(src) and not os.path.islink(src) else self.path

    def apply(self, bundle: str | None, meta: dict[str, Any]) -> Update:
        """Bring the working tree to the commit ``meta["tip"]`` of ``bundle`` (a file, None when
        the server sent none: the tip is then the current commit)."""
        with self._lock:
            if os.path.realpath(self.requested) != self.path or os.path.islink(self.git_dir):
                raise CheckoutError(f"{self.requested} no longer leads to {self.path}: updates stopped")
            tip = _commit_id(str(meta.get("tip", "")).encode())
            update = Update(tip, str(meta.get("head", "")), str(meta.get("branch", "")),
                            meta.get("snapshot") is True,
                            skipped=[str(p) for p in meta.get("skipped") or []][:20])
            old = self.current()
            if bundle is not None:
                self._take(bundle, tip)
            elif tip != old:
                raise CheckoutError("the server sent no bundle for a commit this working copy lacks")
            if tip == old:
                update.changed = False
                return update
            self._check_tree(tip)
            done = self.git("checkout", "--quiet", "--detach", tip, check=False)
            if done.returncode != 0:
                detail = done.stderr.decode(errors="replace").strip()
                raise CheckoutError(
                    f"the working copy {self.path} was not updated, to keep your changes there:\n"
                    f"{detail}\nMove or commit your edits (git -C {self.path} stash), then run "
                    "%tabbi checkout again; it also retries after the next turn.")
            self.git("update-ref", REF, tip)
            update.files = self._changed(old, tip)
            importlib.invalidate_caches()
            return update

    def _take(self, bundle: str, tip: str) -> None:
        """Every object of ``bundle`` checked by git's fsck, and ``tip`` complete, or nothing."""
        prerequisites, refs, offset = read_header(bundle)
        if refs != [(tip, BUNDLE_REF)]:
            raise CheckoutError("the server's bundle holds other refs than the session's checkout commit")
        for oid in prerequisites:
            if self.git("cat-file", "-e", oid + "^{commit}", check=False).returncode != 0:
                raise CheckoutError("the bundle builds on a commit this working copy lacks: "
                                    "run %tabbi checkout again (it fetches everything)")
        with open(bundle, "rb") as f:
            f.seek(offset)
            done = self.git("index-pack", "--stdin", "--fix-thin", "--strict", stdin=f, check=False)
        if done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip().splitlines()
            why = detail[-1] if detail else "index-pack failed"
            raise CheckoutError(f"the session's bundle was refused: {why}")
        kind = self.git("cat-file", "-t", tip, check=False).stdout.decode().strip()
        if kind != "commit":
            raise CheckoutError("the session's bundle does not hold its checkout commit")
        if self.git("rev-list", "--objects", "--quiet", tip, "--not", "--all", check=False).returncode:
            raise CheckoutError("the session's bundle is missing objects of its checkout commit")

    def _check_tree(self, tip: str) -> None:
        listing = self.git("ls-tree", "-r", "-l", "-z", "--full-tree", tip).stdout.split(b"\0")
        files = total = 0
        for entry in filter(None, listing):
            meta, _, name = entry.partition(b"\t")
            size = meta.split()[-1]
            files += 1
            if size.isdigit():
                total += int(size)
                if int(size) > MAX_FILE_BYTES:
                    raise CheckoutError(f"{name.decode(errors='replace')} is larger than "
                                        f"{MAX_FILE_BYTES >> 20} MB: the working copy was not updated")
        if files > MAX_FILES or total > MAX_TREE_BYTES:
            raise CheckoutError(f"the session's files ({files} files, {total >> 20} MB) exceed the "
                                "working copy's limits: it was not updated")

    def _changed(self, old: str | None, new: str) -> list[str]:
        if old is None:
            listed = self.git("ls-tree", "-r", "-z", "--name-only", "--full-tree", new).stdout
        else:
            listed = self.git("diff", "--no-ext-diff", "--no-textconv", "--no-renames", "--name-only",
                              "-z", old, new).stdout
        return [p.decode(errors="replace") for p in listed.split(b"\0") if p]


class Follower:
    """Keeps a ``WorkingCopy`` in step with its session: once now, then after every turn (a
    background thread long-polling the session's events; the notebook never waits for it)."""

    def __init__(self, session: Session, copy: WorkingCopy, report: Callable[[str], None] = print,
                 wait: float = 20):
        self.session = session
        self.copy = copy
        self.report = report
        self.wait = wait
        self.last: Update | None = None
        self.error: str | None = None
        self.updates = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done = threading.Condition()

    def update(self) -> Update:
        """Fetch the workspace's state and apply it. Raises ``CheckoutError`` or ``TabbiError``."""
        since = self.copy.current()
        fd, scratch = tempfile.mkstemp(prefix="tabbi-bundle-", suffix=".bundle")
        try:
            with os.fdopen(fd, "wb") as out:
                meta = self.session.bundle(out, since, MAX_BUNDLE_BYTES)
            bundle = scratch if os.path.getsize(scratch) else None
            update = self.copy.apply(bundle, meta)
        finally:
            os.unlink(scratch)
        with self._done:
            self.last, self.error = update, None
            self.updates += 1
            self._done.notify_all()
        return update

    def wait_for(self, updates: int, timeout: float) -> bool:
        """Wait until ``updates`` updates have been applied (the first, by ``checkout``, is 1);
        whether they were within ``timeout`` seconds."""
        with self._done:
            return self._done.wait_for(lambda: self.updates >= updates, timeout)

    def start(self, after: int) -> None:
        """Follow from event ``after`` on."""
        self._thread = threading.Thread(target=self._run, args=(after,), daemon=True,
                                        name=f"tabbi-checkout-{self.session.id}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, after: int) -> None:
        while not self._stop.is_set():
            try:
                events = self.session.events(after, wait=self.wait)
            except TabbiError as exc:
                if exc.status == 404:
                    self.report(f"[tabbi] checkout of {self.session.id} stopped: the session is gone")
                    return
                self._stop.wait(5)
                continue
            if events:
                after = events[-1]["seq"]
            if self._stop.is_set() or not any(e["type"] == "turn.finished" for e in events):
                continue
            try:
                update = self.update()
            except Exception as exc:  # a thread: nobody else would hear of it
                message = str(exc) if isinstance(exc, (CheckoutError, TabbiError)) else \
                    f"the update failed ({type(exc).__name__}: {exc})"
                if message != self.error:  # said once, not after every turn
                    self.report(f"[tabbi] checkout: {message}")
                self.error = message
                continue
            if update.changed:
                self.report(update.line())


#: Session id -> its follower in this kernel.
_followers: dict[str, Follower] = {}


def default_folder(session_id: str) -> str:
    return os.path.join(os.getcwd(), "tabbi-checkouts", session_id)


def checkout(session: Session, folder: str | None = None, follow: bool = True,
             report: Callable[[str], None] = print) -> Follower:
    """Make (or update) the working copy of ``session`` in ``folder``, put it on ``sys.path``,
    and (``follow``) keep it in step after each turn. Returns the follower."""
    stop(session.id)
    copy = WorkingCopy(folder or default_folder(session.id), session.id)
    copy.prepare()
    after = session.refresh().get("last_seq", 0)
    follower = Follower(session, copy, report)
    report(follower.update().line())
    root = copy.import_root()
    if root not in sys.path:
        sys.path.insert(0, root)
    if follow:
        follower.start(after)
        _followers[session.id] = follower
    return follower


def stop(session_id: str | None = None) -> list[str]:
    """Stop following ``session_id`` (every session: None); the ids that were followed."""
    ids = [session_id] if session_id else list(_followers)
    stopped = []
    for sid in ids:
        follower = _followers.pop(sid, None)
        if follower is not None:
            follower.stop()
            stopped.append(sid)
    return stopped
