"""What happens inside every sandbox, whatever runs it (local subprocess, bubblewrap, Modal).

This file is the one bootstrap that every provider runs inside its sandbox, so the local tests
exercise exactly the code Modal runs. It must therefore stay standard-library only and runnable as
a plain script (``python3 -I -S bootstrap.py``): it is copied into images and bind-mounted into
bubblewrap, where no site-packages exist.

Protocol:
- The spec arrives as one JSON object on stdin, never in argv or the environment, because it
  carries the OpenCode password and provider keys (argv and environ of this process are readable
  by anything that can list processes).
- Progress goes to stdout as one JSON object per line: ``{"phase": "cloning"}``,
  ``{"phase": "branch", ...}``, ``{"phase": "starting_agent"}``, then either
  ``{"phase": "ready", "port": N, "version": "..."}`` or ``{"phase": "failed", "error": "..."}``.
- After ``ready`` the bootstrap stays as OpenCode's parent, forwards SIGTERM/SIGINT, and exits with
  OpenCode's exit status, so the provider sees the agent die as this process ending.
- ``bootstrap.py commit`` and ``bootstrap.py push`` (each run through its own ``Sandbox.exec``, the
  request JSON on stdin) commit the workspace and push the session branch; see ``commit_work``
  and ``push_branch``.
- ``bootstrap.py snapshot REQUEST`` and ``bootstrap.py restore REQUEST`` (each run confined in its
  own process, the request JSON in argv: paths only) write snapshot streams into pipes the
  server hands over (a worker serving every snapshot of the sandbox, ``snapshot_sandbox``) and
  unpack an archive from stdin, so the server never touches the sandbox's files; see ``snapshots.py``.

Git credentials (a GitHub token) arrive only on stdin and reach only the one git process that
needs them, through its environment and a credential helper defined on its command line that
answers only for the expected host (so neither the token nor a file holding it ever exists in
the workspace, the home or an argv). This process makes itself non-dumpable, so the agent it
starts cannot read the spec out of its memory.
"""

from __future__ import annotations

# Every exec of this script (a clone into a warm sandbox, a commit, a push) starts a new
# interpreter and pays for its imports (on a 2-core VM ``import subprocess`` alone is ~40 ms):
# what only one command needs (socket, base64, tempfile) is imported in that command.
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from urllib.parse import urlsplit

#: The plugin package OpenCode would otherwise install in the background at every start (and wait
#: for on shutdown). Pre-seeding its folder turns that install into a no-op.
PLUGIN_PACKAGE = "@opencode-ai/plugin"

#: Environment given to every git command: no prompts, no system or user config of the host.
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1"}


class BootstrapError(Exception):
    """A step failed in a way the person can act on; the message says which and why."""


def emit(phase: str, **fields: object) -> None:
    try:
        print(json.dumps({"phase": phase, **fields}), flush=True)
    except BrokenPipeError:
        # The server that asked for this sandbox died before it was ready: nobody will ever use
        # it. Ending here also ends OpenCode, if started (it dies with this process).
        raise SystemExit(3) from None


def base_env(home: str) -> dict[str, str]:
    """An environment confined to the sandbox's own home: nothing from the host leaks in."""
    return {
        "HOME": home,
        "XDG_CONFIG_HOME": os.path.join(home, ".config"),
        "XDG_DATA_HOME": os.path.join(home, ".local", "share"),
        "XDG_CACHE_HOME": os.path.join(home, ".cache"),
        "XDG_STATE_HOME": os.path.join(home, ".local", "state"),
        "TMPDIR": os.path.join(home, "tmp"),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
    }


#: A credential helper that answers git's ``get`` from this one process's environment, and only
#: for the expected protocol and host (a rewritten URL pointing elsewhere gets nothing). It is
#: defined on git's command line after an empty value that drops every helper configured
#: anywhere else, so no helper of the repository's config ever sees the secret.
CREDENTIAL_HELPER = (
    '!f() { test "$1" = get || exit 0; p=; h=; while IFS= read -r l; do case "$l" in '
    '"protocol=$TABBI_GIT_PROTOCOL") p=1;; "host=$TABBI_GIT_HOST") h=1;; esac; done; '
    'test "$p$h" = 11 && printf "username=%s\\npassword=%s\\n" '
    '"$TABBI_GIT_USERNAME" "$TABBI_GIT_PASSWORD"; }; f'
)

#: Options that keep git from running anything the agent may have configured in a repository it
#: wrote: hooks, the fsmonitor, commit signing.
SAFE_GIT = ["-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "commit.gpgsign=false"]


def transport(url: str) -> tuple[str, str]:
    """``(protocol, host)`` as git's credential protocol names them; a path is ``file``."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        return parts.scheme, parts.netloc.rpartition("@")[2]
    return "file", ""


def remote_args(url: str, credential: dict | None) -> tuple[list[str], dict[str, str]]:
    """git options and environment for talking to ``url``: only its own protocol allowed, and
    ``credential`` (if any) handed to that one git process for that one host."""
    protocol, host = transport(url)
    args = ["-c", "protocol.allow=never", "-c", f"protocol.{protocol}.allow=always"]
    if not credential:
        return args, {}
    args += ["-c", "credential.helper=", "-c", f"credential.helper={CREDENTIAL_HELPER}"]
    env = {
        "TABBI_GIT_PROTOCOL": protocol,
        "TABBI_GIT_HOST": host,
        "TABBI_GIT_USERNAME": credential.get("username") or "x-access-token",
        "TABBI_GIT_PASSWORD": credential["password"],
    }
    return args, env


def run_git(
    args: list[str], cwd: str, env: dict[str, str], timeout: float = 300, remote: tuple | None = None
) -> subprocess.CompletedProcess:
    """Run git; ``remote`` is ``(url, credential)`` when it talks to a remote."""
    options, secret_env = remote_args(*remote) if remote else ([], {})
    try:
        return subprocess.run(
            ["git", *options, *args],
            cwd=cwd,
            env={**env, **GIT_ENV, **secret_env},
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise BootstrapError(f"git {subcommand(args)} timed out after {timeout:.0f} s") from exc


def subcommand(args: list[str]) -> str:
    """``clone`` of ``[-c, x=y, clone, ...]``: what to name in a message."""
    rest = iter(args)
    for arg in rest:
        if arg in ("-c", "--git-dir"):
            next(rest, None)
        elif not arg.startswith("-"):
            return arg
    return "command"


def git(
    args: list[str], cwd: str, env: dict[str, str], timeout: float = 300, remote: tuple | None = None
) -> str:
    done = run_git(args, cwd, env, timeout, remote)
    if done.returncode != 0:
        raise BootstrapError(f"git {subcommand(args)} failed: {last_line(done)}")
    return done.stdout.strip()


def last_line(done: subprocess.CompletedProcess) -> str:
    detail = (done.stderr or done.stdout).strip().splitlines()
    return detail[-1] if detail else str(done.returncode)


def prepare_home(home: str) -> dict[str, str]:
    """The sandbox home's folders, with OpenCode's global config put back to what tabbi seeds.

    OpenCode imports plugins and custom tools from its config folders into its own process at
    start, and runs what their ``package.json`` asks; the agent can write there between two starts
    (and can cause a start by killing OpenCode). Nothing of the agent runs while this bootstrap
    prepares the home, so removing those folders here leaves nothing planted to load."""
    env = base_env(home)
    for key in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "TMPDIR"):
        if os.path.islink(env[key]):
            os.unlink(env[key])
        os.makedirs(env[key], exist_ok=True)
    plugin_dir = os.path.join(env["XDG_CONFIG_HOME"], "opencode")
    for planted in (plugin_dir, os.path.join(home, ".opencode")):
        remove_any(planted)
    os.makedirs(os.path.join(plugin_dir, "node_modules", PLUGIN_PACKAGE))
    deps = {PLUGIN_PACKAGE: "*"}
    files = {
        "package.json": {"dependencies": deps},
        "package-lock.json": {
            "lockfileVersion": 3,
            "packages": {
                "": {"dependencies": deps},
                f"node_modules/{PLUGIN_PACKAGE}": {"version": "0.0.0"},
            },
        },
    }
    for name, content in files.items():
        with open(os.path.join(plugin_dir, name), "w") as f:
            json.dump(content, f)
    return env


#: Where OpenCode imports plugins from in the workspace, ``OPENCODE_DISABLE_PROJECT_CONFIG`` or
#: not (1.18's second config loader ignores that switch): plugin folders, and the config files
#: whose ``plugin``/``plugins`` name modules. The agent writes them at will.
PLUGIN_FOLDERS = (".opencode/plugin", ".opencode/plugins")
CONFIG_FILES = ("opencode.json", "opencode.jsonc", ".opencode/opencode.json", ".opencode/opencode.jsonc")
DISABLED_SUFFIX = ".disabled-by-tabbi"


def disable_workspace_plugins(workspace: str) -> list[str]:
    """Rename what would load code into OpenCode from the workspace, so it does not; return the
    renamed paths (relative), which the person sees in the session and in the diff.

    A plugin runs inside OpenCode: it holds OpenCode's password and an authenticated client of its
    API, and can answer the agent's own permission requests. Renaming (not deleting) loses nothing
    and shows in the diff; nothing of the agent runs while the bootstrap does this."""
    renamed: list[str] = []

    def disable(relative: str) -> None:
        path = os.path.join(workspace, relative)
        os.rename(path, path + DISABLED_SUFFIX)
        renamed.append(relative)

    if os.path.islink(os.path.join(workspace, ".opencode")):
        disable(".opencode")  # a link could lead anywhere the agent prepared
    for folder in PLUGIN_FOLDERS:
        path = os.path.join(workspace, folder)
        if os.path.islink(path):
            disable(folder)
        elif os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                if name.endswith((".js", ".ts")):
                    disable(os.path.join(folder, name))
    for relative in CONFIG_FILES:
        path = os.path.join(workspace, relative)
        if os.path.islink(path) or (os.path.lexists(path) and _mentions_plugins(path)):
            disable(relative)
    return renamed


def _mentions_plugins(path: str) -> bool:
    """Whether a config file names plugins (read without blocking on a FIFO planted there)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return True
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return True
        return b"plugin" in f.read(1 << 20)


def remove_any(path: str) -> None:
    """Remove whatever is at ``path`` (a folder tree, a file, a link: never what a link points to)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def clone_or_reuse(spec: dict, env: dict[str, str], opened: bool = False) -> bool:
    """Clone into the workspace on the session branch (True), or reuse a workspace a previous run
    left (or a snapshot restored) exactly as it is (False). ``opened``: the workspace is a warm
    sandbox's, which its OpenCode already opened as an empty repository (``prepare_warm_workspace``);
    the clone is made inside it and then takes its place (``take_place``). A warm workspace whose
    clone never finished (the server died meanwhile) is never reused: it is cloned afresh.

    The clone ignores the sandbox home's git config and runs no hooks: a home the agent wrote in
    an earlier run could otherwise redirect the credentialed clone or run code beside it. A
    reused workspace runs no git at all: a checkout would run the filters and settings the agent
    wrote into its ``.git/config`` and attributes (and the branch it is on is the agent's to
    choose; ``commit`` refuses any but the session branch)."""
    workspace = spec["workspace"]
    branch = spec["branch"]
    credential = spec.pop("git_credential", None)
    safe_env = {**env, "GIT_CONFIG_GLOBAL": "/dev/null"}
    git_dir = os.path.join(workspace, ".git")
    if not opened and os.path.isdir(git_dir):
        if not os.path.lexists(os.path.join(git_dir, WAITING_FILE)):
            emit("reusing_workspace")
            return False
        shutil.rmtree(workspace)  # a warm sandbox's, never taken to the end: nobody's work
    emit("cloning", repo=spec["repo_display"])
    if opened:
        target = os.path.join(workspace, CLONE_PREFIX + os.urandom(6).hex())
        os.mkdir(target, 0o700)
    else:
        os.makedirs(os.path.dirname(workspace), exist_ok=True)
        target = workspace
    identity = spec.get("git_identity") or {}
    # The identity is written into the new repository's config by the clone itself (``-c``).
    args = [*SAFE_GIT, "clone", "--quiet", "--no-hardlinks", "--template=",
            "-c", f"user.name={identity.get('name') or 'tabbi'}",
            "-c", f"user.email={identity.get('email') or 'tabbi@localhost'}"]
    if spec.get("base_branch"):
        args += ["--branch", spec["base_branch"]]
    url = spec["repo_url"]
    git([*args, "--", url, target], os.path.dirname(target), safe_env, remote=(url, credential))
    del credential
    head = run_git(["rev-parse", "--verify", "--quiet", "HEAD"], target, safe_env)
    if head.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)  # a later start clones again
        raise BootstrapError(f"{spec['repo_display']} has no commits yet: make a first commit "
                             "(and push it), then start again")
    git([*SAFE_GIT, "checkout", "--quiet", "-b", branch], target, safe_env)
    if opened:
        take_place(target, workspace)
    else:
        remember_project_id(workspace, url, safe_env)
    emit("branch", branch=branch, base_commit=head.stdout.strip())
    return True


#: The folder (inside the workspace, so that moving the clone in is a rename on one file system)
#: a warm sandbox's clone is made in: a fresh random name, which no repository's files can hold.
CLONE_PREFIX = ".tabbi-clone-"

#: OpenCode's project id cache in a repository's git folder (see ``remember_project_id``).
PROJECT_ID_FILE = "opencode"

#: In a warm sandbox's git folder until its clone has taken the workspace's place: a start that
#: finds it (the server died half-way) clones afresh instead of reusing what is there.
WAITING_FILE = "tabbi-waiting"


def prepare_warm_workspace(workspace: str, env: dict[str, str]) -> str:
    """A warm sandbox's workspace before any repository: an empty git repository with a random
    project id (returned), marked as waiting (``WAITING_FILE``). Nothing of a person or
    repository is in it.

    OpenCode reads a folder once, when it first serves a request for it: its git root, project,
    config and plugins, about 80 ms of its own work and git processes bare, 200-300 ms in a busy
    sandbox (``docs/benchmarks.md``). ``open_warm_workspace`` has it read this one while the
    sandbox waits, so that is off a session's start: the clone later takes the folder's place
    under the same git folder (``take_place``), and OpenCode goes on with what it read. What it
    read of an empty folder loads nothing of the repository (its plugins, which the fence renames
    anyway), and ``forget_secrets.js`` removes OpenCode's password and config from its
    environment at that read, before any person's data arrives."""
    os.makedirs(workspace, exist_ok=True)
    git([*SAFE_GIT, "init", "--quiet", "--template=", workspace], workspace,
        {**env, "GIT_CONFIG_GLOBAL": "/dev/null"})
    project_id = os.urandom(20).hex()
    for name, content in ((PROJECT_ID_FILE, project_id), (WAITING_FILE, "")):
        with open(os.path.join(workspace, ".git", name), "x") as f:
            f.write(content)
    return project_id


def opencode_call(port: int, password: str, method: str, path: str, body: dict | None = None,
                  timeout: float = 60) -> object:
    """One request to this sandbox's OpenCode (in its working folder, the workspace), its JSON
    answer (None when empty)."""
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Authorization": basic_auth(password),
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = response.read()
    return json.loads(answer) if answer.strip() else None


def open_warm_workspace(port: int, password: str, project_id: str) -> None:
    """Have OpenCode read its workspace (``prepare_warm_workspace``) now, and check that it took
    it as that git project: an OpenCode that read it earlier or otherwise would load the
    repository's own files after the clone, and is not used."""
    try:
        # No ``directory``: OpenCode's working folder, the workspace, as for the server's requests.
        project = opencode_call(port, password, "GET", "/project/current")
    except (OSError, ValueError) as exc:
        raise BootstrapError(f"OpenCode did not open the workspace: {exc}") from None
    if not isinstance(project, dict) or (project.get("id"), project.get("vcs")) != (project_id, "git"):
        raise BootstrapError(f"OpenCode opened the warm workspace as another project: {project!r:.200}")


#: How long a warm sandbox's rehearsal turn may take, at most.
REHEARSAL_SECONDS = 45.0
#: What that turn asks. No model ever answers it (see ``rehearse_turn``).
REHEARSAL_PROMPT = "tabbi: a warm sandbox's rehearsal turn (no model answers it)"


def rehearse_turn(port: int, password: str, seconds: float) -> None:
    """Have a warm sandbox's OpenCode start one turn and stop it at its first model call, so that
    what OpenCode does once per process at its first turn (2.7-7.3 s on a 2-core VM, against
    0.4-1.0 s for later turns: ``docs/benchmarks.md``) is done before a person's first prompt.

    The model call goes to the gateway with the sandbox's token, which unlocks nothing before a
    session has taken the sandbox: it is refused (403), so no tool runs and nothing is spent, and
    the turn ends (OpenCode 1.18.33 does not retry a 403). OpenCode does retry, for minutes, a
    call that looks transient (a gateway it cannot reach, a 5xx), and a retry after the sandbox
    was taken would reach the model on the person's grant: so the turn is aborted at OpenCode's
    first ``retry`` status, and its conversation, a child one (OpenCode asks no title for those,
    which would be a call of its own), is deleted. Then OpenCode must be idle, else
    ``BootstrapError`` (the sandbox is not used). A rehearsal that fails or runs out of
    ``seconds`` (checked at each event; OpenCode's heartbeat comes every 10 s) is only a slower
    first turn later."""
    import http.client
    import urllib.request

    stream = None
    made: list[str] = []
    try:
        stream = urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/event", headers={"Authorization": basic_auth(password)}),
            timeout=max(seconds, 1.0))
        made.append(opencode_call(port, password, "POST", "/session", {})["id"])
        made.append(opencode_call(port, password, "POST", "/session", {"parentID": made[0]})["id"])
        opencode_call(port, password, "POST", f"/session/{made[1]}/prompt_async",
                      {"parts": [{"type": "text", "text": REHEARSAL_PROMPT}]})
        deadline = time.monotonic() + seconds
        for line in stream:  # OpenCode's heartbeat (every 10 s) brings the deadline round
            if time.monotonic() > deadline or _rehearsal_stopped(line, made[1]):
                break
    except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException):
        pass  # not rehearsed: the first turn pays for it
    finally:
        if stream is not None:
            stream.close()
        with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
            for session in reversed(made):
                opencode_call(port, password, "POST", f"/session/{session}/abort", timeout=5)
                opencode_call(port, password, "DELETE", f"/session/{session}", timeout=5)
    try:
        busy = opencode_call(port, password, "GET", "/session/status", timeout=5)
    except (OSError, ValueError) as exc:
        raise BootstrapError(f"OpenCode did not say it is idle after its rehearsal: {exc}") from None
    if busy:
        raise BootstrapError("OpenCode was still busy after its rehearsal turn")


def _rehearsal_stopped(line: bytes, session: str) -> bool:
    """Whether an event line of OpenCode's says the rehearsal turn reached its model call (a
    retry after the refusal) or ended otherwise."""
    if not line.startswith(b"data:"):
        return False
    try:
        event = json.loads(line[5:])
    except ValueError:
        return False
    properties = event.get("properties") if isinstance(event, dict) else None
    if not isinstance(properties, dict) or properties.get("sessionID") != session:
        return False
    if event.get("type") == "session.error":
        return True
    status = properties.get("status") if event.get("type") == "session.status" else None
    return isinstance(status, dict) and status.get("type") in ("retry", "idle")


def take_place(clone: str, workspace: str) -> None:
    """Move ``clone`` (a fresh clone inside ``workspace``) into the place of the empty
    repository OpenCode opened (``prepare_warm_workspace``).

    The git folder stays the one OpenCode opened (its contents are replaced, not the folder, so
    that OpenCode's file watcher, where it runs, follows the branch; in bubblewrap it does not,
    and OpenCode's own branch display, ``GET /vcs``, which tabbi does not read, keeps the empty
    repository's), and keeps the project id OpenCode gave the folder, so that a later start of
    the restored workspace finds the same project (for a clone from a URL, OpenCode then names
    the project by that URL and moves its sessions to the new name). The waiting mark goes
    last: until then a new start clones afresh."""
    git_dir, cloned_git = os.path.join(workspace, ".git"), os.path.join(clone, ".git")
    kept = (PROJECT_ID_FILE, WAITING_FILE)
    for name in os.listdir(workspace):
        if name not in (".git", os.path.basename(clone)):
            remove_any(os.path.join(workspace, name))
    for name in os.listdir(git_dir):
        if name not in kept:
            remove_any(os.path.join(git_dir, name))
    for name in os.listdir(cloned_git):
        if name not in kept:
            os.rename(os.path.join(cloned_git, name), os.path.join(git_dir, name))
    shutil.rmtree(cloned_git)
    for name in os.listdir(clone):
        os.rename(os.path.join(clone, name), os.path.join(workspace, name))
    os.rmdir(clone)
    os.unlink(os.path.join(git_dir, WAITING_FILE))


def remember_project_id(workspace: str, url: str, env: dict[str, str]) -> None:
    """Write OpenCode's project id cache (``.git/opencode``) for a fresh clone of a local
    repository (``url`` a path), as OpenCode would: the smallest root commit of ``HEAD``.

    OpenCode (1.18.33, read from its binary) names a project by its remote when the remote is a
    URL, else by this file, else by ``git rev-list --max-parents=0 HEAD``, which it spawns when
    it first opens the workspace: on a cold start, on the critical path (OpenCode spends
    30-50 ms around each git process; ``docs/benchmarks.md``). Here it costs one git process of
    a few ms. A clone from a URL gets no file: OpenCode does not need it, and the walk of a long
    history would cost the start instead. The file is the workspace's like the rest of
    ``.git``: nothing trusts it."""
    if "://" in url and not url.startswith("file://"):
        return
    roots = run_git(["rev-list", "--max-parents=0", "HEAD"], workspace, env).stdout.split()
    if roots:
        cache = os.path.join(workspace, ".git", PROJECT_ID_FILE)
        with contextlib.suppress(FileExistsError), open(cache, "x") as f:
            f.write(sorted(roots)[0])


def free_port() -> int:
    import socket  # imported where used: see the note above the imports

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def basic_auth(password: str) -> str:
    """The ``Authorization`` header OpenCode's server password asks for."""
    import base64

    return "Basic " + base64.b64encode(f"opencode:{password}".encode()).decode()


def wait_healthy(port: int, password: str, proc: subprocess.Popen, timeout: float) -> str:
    """Poll OpenCode's health endpoint with short per-request timeouts until it answers.

    A request sent while OpenCode is starting can hang without an answer, so each probe has its
    own small timeout and the loop has an overall deadline.
    """
    import urllib.error  # here, not at the top: every snapshot and restore runs this file
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/global/health", headers={"Authorization": basic_auth(password)}
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BootstrapError(f"OpenCode exited during start-up with status {proc.returncode}")
        try:
            with urllib.request.urlopen(request, timeout=1.0) as response:
                body = json.loads(response.read() or b"{}")
                if body.get("healthy"):
                    return str(body.get("version", ""))
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.1)  # poll interval between probes, bounded by the deadline above
    raise BootstrapError(f"OpenCode did not become healthy within {timeout:.0f} s")


#: Switches that keep OpenCode offline and quiet: no model catalogue fetch, no updates, no sharing,
#: no LSP downloads, no Claude Code or external skill discovery, no built-in provider plugins.
OFFLINE_SWITCHES = {
    "OPENCODE_DISABLE_MODELS_FETCH": "1",
    "OPENCODE_DISABLE_AUTOUPDATE": "1",
    "OPENCODE_DISABLE_SHARE": "1",
    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
    "OPENCODE_DISABLE_CLAUDE_CODE": "1",
    "OPENCODE_DISABLE_EXTERNAL_SKILLS": "1",
    # OpenCode's built-in plugins sign in to providers tabbi never enables (Copilot, Codex,
    # Azure, Cloudflare, Snowflake, ...: tabbi's config enables one provider, through its
    # gateway); each folder OpenCode opens would load all twelve (Azure's looks for ``az``).
    "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1",
    # Nothing in the workspace configures OpenCode: its ``.opencode/`` plugins and tools and its
    # ``opencode.json`` are the agent's to write, and would be imported into OpenCode at the next
    # start. The workspace's AGENTS.md is named as an instruction file instead (``opencode_env``).
    "OPENCODE_DISABLE_PROJECT_CONFIG": "1",
}


#: OpenCode plugin that keeps OpenCode's own secrets out of every process it starts; it sits
#: beside this script, in a folder every sandbox binds read-only.
FORGET_SECRETS_PLUGIN = "file://" + os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "forget_secrets.js")


def opencode_env(env: dict[str, str], password: str, config: dict, workspace: str) -> dict[str, str]:
    """OpenCode's environment: the sandbox home (``env``), its password, its config, offline.

    No model key: the config points OpenCode at the server's model gateway with a gateway
    token. The password and the config are OpenCode's alone: a plugin removes them from the
    environment of every process OpenCode starts (``forget_secrets.js``), and OpenCode runs
    non-dumpable (an execute-only binary, see ``sealed.py``), so its own /proc files stay closed."""
    config = {
        **config,
        "plugin": [*config.get("plugin", []), FORGET_SECRETS_PLUGIN],
        "instructions": [*config.get("instructions", []), os.path.join(workspace, "AGENTS.md")],
    }
    return {
        **env,
        "OPENCODE_SERVER_PASSWORD": password,
        "OPENCODE_CONFIG_CONTENT": json.dumps(config),
        **OFFLINE_SWITCHES,
    }


def start_opencode(spec: dict, env: dict[str, str]) -> tuple[subprocess.Popen, int, str]:
    """Start OpenCode in the workspace and wait until it is healthy."""
    emit("starting_agent")
    oc = spec["opencode"]
    oc_env = opencode_env(env, oc["password"], oc["config"], spec["workspace"])
    if spec.get("marker"):
        oc_env["TABBI_SANDBOX_ID"] = spec["marker"]
    log_path = os.path.join(spec["home"], "opencode.log")
    attempts, attempt = 1 if spec.get("port") else PORT_ATTEMPTS, 1
    while True:
        port = int(spec.get("port") or free_port())
        with open(log_path, "ab") as log:
            logged = log.tell()
            proc = subprocess.Popen(
                [oc["bin"], "serve", "--hostname", spec.get("hostname") or "127.0.0.1", "--port", str(port)],
                cwd=spec["workspace"],
                env=oc_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        try:
            version = wait_healthy(port, oc["password"], proc, float(spec.get("health_timeout", 60)))
            return proc, port, version
        except BootstrapError:
            if attempt == attempts or proc.poll() is None or not _could_not_listen(log_path, logged):
                raise
        attempt += 1


#: Ports tried when OpenCode cannot listen on the one chosen. ``free_port`` finds a free port and
#: lets it go before OpenCode binds it (a second or more later, under load); sandboxes share the
#: machine's network, so any process may take it meanwhile, and OpenCode then exits at once.
PORT_ATTEMPTS = 3


def _could_not_listen(log_path: str, since: int) -> bool:
    """Did OpenCode's start, logged from offset ``since``, fail to open its server (Bun's
    ``ServeError``: the port was taken)? Only such a start is tried again on another port."""
    with open(log_path, "rb") as log:
        log.seek(since)
        return b"ServeError" in log.read(64 << 10)


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL OpenCode if this bootstrap dies, so no orphan survives."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


#: How git says a push was refused, mapped to what the person can do about it.
PUSH_REFUSALS = (
    (("protected branch", "gh006"), "protected",
     "the remote refused the push: the branch is protected"),
    (("non-fast-forward", "fetch first", "stale info"), "non_fast_forward",
     "the remote branch has commits this session does not have (non-fast-forward)"),
    (("403", "permission", "denied", "authentication failed", "could not read username",
      "unauthorized", "401"), "permission",
     "the remote refused the credentials: no permission to push there"),
)


def push_refusal(done: subprocess.CompletedProcess) -> tuple[str, str]:
    """``(reason, message)`` of a failed ``git push``."""
    text = f"{done.stdout}\n{done.stderr}".lower()
    for needles, reason, message in PUSH_REFUSALS:
        if any(n in text for n in needles):
            return reason, message
    return "failed", f"git push failed: {last_line(done)}"


def write_files(workspace: str, files: dict[str, str]) -> list[str]:
    """Write ``files`` (relative path -> text) into the workspace, refusing any path that would
    land outside it (``..``, absolute, or through a symlink the agent planted)."""
    root = os.path.realpath(workspace)
    written = []
    for rel, content in sorted(files.items()):
        target = os.path.realpath(os.path.join(root, rel))
        if os.path.isabs(rel) or not target.startswith(root + os.sep) or "/.git/" in target + "/":
            raise BootstrapError(f"refusing to write {rel!r}: it is outside the repository")
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.write(content)
        except OSError as exc:
            raise BootstrapError(f"cannot write {rel!r}: {exc.strerror}") from None
        written.append(os.path.relpath(target, root))
    return written


def commit_work(request: dict) -> int:
    """``bootstrap.py commit``: commit the workspace (or only ``files``) on the session branch as
    the person; print ``{"commit", "committed", "files"}`` or ``{"error"}``.

    No credential is anywhere near this step: the workspace is the agent's, and git may run what
    the agent configured (a filter of its .gitattributes, say) while adding files. Hooks, the
    fsmonitor and signing are off all the same."""
    workspace, branch = request["workspace"], request["branch"]
    env = {**base_env(request["home"]), "GIT_CONFIG_GLOBAL": "/dev/null"}
    result: dict = {"committed": False}
    try:
        head = run_git(["symbolic-ref", "--quiet", "--short", "HEAD"], workspace, env).stdout.strip()
        if head != branch:
            raise BootstrapError(
                f"the workspace is on {repr(head) if head else 'a detached HEAD'}, "
                f"not on the session branch {branch!r}: "
                f"ask the agent to switch back (git checkout {branch})"
            )
        written = write_files(workspace, request.get("files") or {})
        result["files"] = written
        only = ["--", *written] if request.get("only_files") else []
        git([*SAFE_GIT, "add", *(only or ["-A"])], workspace, env)
        for rel in written if not only else []:
            # Staged as the exact bytes tabbi wrote (a stripped notebook, say): a clean filter
            # the agent configured in .gitattributes does not get to rewrite them.
            blob = git(["hash-object", "-w", "--no-filters", "--", rel], workspace, env)
            git(["update-index", "--cacheinfo", f"100644,{blob},{rel}"], workspace, env)
        staged = run_git([*SAFE_GIT, "diff", "--cached", "--quiet", *only], workspace, env)
        if staged.returncode == 1:
            author = request.get("author") or {}
            name, email = author.get("name") or "tabbi", author.get("email") or "tabbi@localhost"
            who = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email,
                   "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email}
            message = request.get("message") or "Changes from tabbi"
            # With paths, ``--only`` commits just those, not whatever else the agent staged.
            paths = ["--only", *only] if only else []
            commit = [*SAFE_GIT, "commit", "--quiet", "--no-verify", "-m", message, *paths]
            git(commit, workspace, {**env, **who})
            result["committed"] = True
        result["commit"] = git(["rev-parse", "HEAD"], workspace, env)
    except BootstrapError as exc:
        result["error"] = str(exc)
    print(json.dumps(result), flush=True)
    return 0 if "error" not in result else 3


def push_branch(request: dict) -> int:
    """``bootstrap.py push``: push the session branch to ``remote_url``; print ``{"pushed"}`` or
    ``{"error", "reason"}``.

    Run in its own sandbox process (a PID namespace and a /tmp of its own under bubblewrap), the
    branch is first fetched into a fresh bare repository in that private /tmp (no credential
    exists yet at that point), and pushed from there with a config that is only ours, so
    nothing the agent wrote (into the workspace's .git/config, or anywhere it can reach) can
    see, receive or redirect the credential."""
    branch, url = request["branch"], request["remote_url"]
    import tempfile

    scratch = tempfile.mkdtemp(prefix="tabbi-push-", dir="/tmp")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": scratch,
           "GIT_CONFIG_GLOBAL": "/dev/null"}
    bare, ref = os.path.join(scratch, "push.git"), f"refs/heads/{branch}"
    result: dict = {"pushed": False}
    try:
        git(["init", "--quiet", "--bare", "--template=", bare], scratch, env)
        git(["--git-dir", bare, "fetch", "--quiet", "--no-tags", "--", request["workspace"], f"+{ref}:{ref}"],
            scratch, env, remote=(request["workspace"], None))
        done = run_git([*SAFE_GIT, "--git-dir", bare, "push", "--porcelain", "--", url, f"{ref}:{ref}"],
                       scratch, env, timeout=600, remote=(url, request.pop("credential", None)))
        if done.returncode == 0:
            result["pushed"] = True
        else:
            result["reason"], result["error"] = push_refusal(done)
    except BootstrapError as exc:
        result["error"] = str(exc)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return 0 if result["pushed"] else 3


def fence_workspace(workspace: str) -> None:
    """``disable_workspace_plugins``, said to the person when it renamed anything."""
    disabled = disable_workspace_plugins(workspace)
    if disabled:
        emit("plugins_disabled", files=disabled)


def clone_into(request: dict) -> int:
    """``bootstrap.py clone``: clone into a warm sandbox's workspace (its OpenCode already runs
    there, and opened it while it was empty: ``prepare_warm_workspace``), then fence it like a cold
    start does; progress lines as ``main``'s, ``{"phase": "cloned"}`` or ``{"phase": "failed"}``
    last.

    The credential (on stdin) reaches only the clone's git process, as in a cold start; no
    agent has run in this sandbox yet, and OpenCode loaded its plugins and config while the
    workspace was empty, so nothing the repository carries loads into it."""
    try:
        cloned = clone_or_reuse(request, base_env(request["home"]), opened=True)
        if prepare_environment(request, base_env(request["home"]), cloned):
            prepare_home(request["home"])  # the setup script may have written OpenCode's config
        fence_workspace(request["workspace"])
    except Exception as exc:
        message = str(exc) if isinstance(exc, BootstrapError) else f"{type(exc).__name__}: {exc}"
        emit("failed", error=message)
        return 3
    emit("cloned")
    return 0


# -- per-repository environments (see setup_script.py and extension/environments.py) ------------
#: git without the sandbox home's config (the agent's and the setup script's to write).
NO_HOME_CONFIG = {"GIT_CONFIG_GLOBAL": "/dev/null"}


def setup_hash(workspace: str, env: dict[str, str], commit: str = "HEAD") -> str | None:
    """The git blob id of the setup script at ``commit`` (None: there is none). Read from git's
    objects, not the working tree: the same for every clone, and nothing of the tree is run."""
    done = run_git(["rev-parse", "--verify", "--quiet", f"{commit}:.tabbi/setup.sh"], workspace,
                   {**env, **NO_HOME_CONFIG})
    return done.stdout.strip() if done.returncode == 0 else None


def prepare_environment(spec: dict, env: dict[str, str], cloned: bool) -> bool:
    """The repository's environment, before OpenCode starts; True when the setup script ran.

    ``spec["environment"]``: ``{"setup": true, "setup_timeout": S}`` runs ``.tabbi/setup.sh`` of a
    fresh clone (its output streamed as ``{"phase": "setup", "line"}``, then ``{"phase":
    "setup_done", "setup_hash", "seconds"}``); ``{"warm": true}`` takes a workspace restored from
    a warm snapshot onto this session's branch (``{"phase": "branch"}``). A failed script
    removes the clone, so that the next start clones and runs it again."""
    environment = spec.get("environment") or {}
    workspace = spec["workspace"]
    if environment.get("warm") and not cloned:
        start_warm_branch(workspace, spec["branch"], env)
        return False
    if not (cloned and environment.get("setup")):
        return False
    digest = setup_hash(workspace, env)
    script = _sibling_module("setup_script.py", "tabbi_setup_script")
    if digest is None or not script.present(workspace):
        return False  # no setup script: nothing to say
    emit("setup", setup_hash=digest)
    try:
        seconds = script.run(workspace, {**env, "TABBI_SANDBOX_ID": spec.get("marker") or ""},
                             float(environment.get("setup_timeout") or 600),
                             lambda line: emit("setup", line=line))
    except script.SetupError as exc:
        shutil.rmtree(workspace, ignore_errors=True)
        raise BootstrapError(str(exc)) from None
    emit("setup_done", setup_hash=digest, seconds=seconds)
    return True


def start_warm_branch(workspace: str, branch: str, env: dict[str, str]) -> None:
    """Put a workspace restored from a warm snapshot on this session's branch, at the commit the
    snapshot was made from (the sync brings it up to date once OpenCode runs). Only a ref is
    written: no file of the tree is checked out, so no filter of the workspace's config runs."""
    safe_env = {**env, **NO_HOME_CONFIG}
    current = run_git(["symbolic-ref", "--quiet", "--short", "HEAD"], workspace, safe_env).stdout.strip()
    if current == branch:
        return
    git([*SAFE_GIT, "checkout", "--quiet", "-b", branch], workspace, safe_env)
    if current.startswith("tabbi/"):  # the branch of the session that built the snapshot
        run_git(["branch", "--quiet", "-D", current], workspace, safe_env)
    emit("branch", branch=branch, base_commit=git(["rev-parse", "HEAD"], workspace, safe_env))


#: Where a sync puts the base branch's tip, in the scratch repository and in the workspace.
SYNC_REF = "refs/heads/tabbi-sync"


def sync_workspace(request: dict) -> int:
    """``bootstrap.py sync``: bring a workspace restored from a warm snapshot up to date with the
    base branch of ``remote_url``; print ``{"base_commit", "previous", "setup_hash"}`` or
    ``{"error"}``. For a sandbox whose execs are private (the local provider's bubblewrap: own PID
    namespace and /tmp); on others the server fetches (``sync_from_bundle``).

    Like ``push_branch`` in reverse: the credential (if any) goes only to a fetch into a fresh
    bare repository in this process's private /tmp, whose config is ours; the workspace then
    fetches from that bare repository with no credential anywhere near, and fast-forwards."""
    url, base = request["remote_url"], request.get("base_branch")
    credential = request.pop("credential", None)

    def fetch(scratch: str, env: dict[str, str]) -> str:
        bare = os.path.join(scratch, "sync.git")
        git(["init", "--quiet", "--bare", "--template=", bare], scratch, env)
        source = f"refs/heads/{base}" if base else "HEAD"
        git([*SAFE_GIT, "--git-dir", bare, "fetch", "--quiet", "--no-tags", "--", url,
             f"+{source}:{SYNC_REF}"], scratch, env, timeout=600, remote=(url, credential))
        return bare

    return _sync(request, fetch)


def sync_from_bundle(request: dict) -> int:
    """``bootstrap.py sync-bundle REQUEST`` with a git bundle of the base branch's tip (its ref
    ``SYNC_REF``) on stdin, made by the server from its own fetch (``modal_push.fetch_base``):
    the same fast-forward as ``sync_workspace``, with no credential and no network. The bundle
    is the repository's content, nothing secret: the agent may read it, and whatever it does to
    it changes only its own workspace (the server records the commit it fetched itself)."""

    def fetch(scratch: str, env: dict[str, str]) -> str:
        source = os.path.join(scratch, "base.bundle")
        with open(source, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f)
        return source

    return _sync(request, fetch)


def _sync(request: dict, fetch) -> int:
    """A sync: ``fetch(scratch, env)`` makes a local source of ``SYNC_REF`` (a bare repository,
    a bundle) in a fresh scratch folder, then the workspace fetches it and fast-forwards."""
    import tempfile

    scratch = tempfile.mkdtemp(prefix="tabbi-sync-", dir="/tmp")
    env = {**base_env(scratch), **NO_HOME_CONFIG}
    try:
        result = fast_forward(request["workspace"], request["branch"], fetch(scratch, env), env)
    except BootstrapError as exc:
        result = {"error": str(exc)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return 0 if "error" not in result else 3


def fast_forward(workspace: str, branch: str, source: str, env: dict[str, str]) -> dict:
    """Fetch ``SYNC_REF`` of ``source`` (local: no credential, no network) into the workspace and
    fast-forward the session branch to it; refused when the workspace left that branch."""
    ref = SYNC_REF
    git([*SAFE_GIT, "fetch", "--quiet", "--no-tags", "--", source, f"+{ref}:{ref}"], workspace, env,
        remote=(source, None))
    new = git(["rev-parse", ref], workspace, env)
    previous = git(["rev-parse", "HEAD"], workspace, env)
    head = run_git(["symbolic-ref", "--quiet", "--short", "HEAD"], workspace, env).stdout.strip()
    if new != previous:
        if head != branch:
            raise BootstrapError(f"the workspace left the session branch {branch!r}")
        git([*SAFE_GIT, "merge", "--quiet", "--ff-only", new], workspace, env)
    run_git(["update-ref", "-d", ref], workspace, env)
    return {"base_commit": new, "previous": previous, "setup_hash": setup_hash(workspace, env, new)}


def run_setup(request: dict) -> int:
    """``bootstrap.py setup``: run the workspace's setup script again (its content changed when a
    warm workspace was synced); print ``{"seconds", "output"}`` or ``{"error"}``."""
    script = _sibling_module("setup_script.py", "tabbi_setup_script")
    lines: list[str] = []
    try:
        seconds = script.run(request["workspace"], base_env(request["home"]),
                             float(request.get("timeout") or 600), lines.append)
        result: dict = {"seconds": seconds, "output": lines[-script.TAIL_LINES:]}
    except script.SetupError as exc:
        result = {"error": str(exc)}
    print(json.dumps(result), flush=True)
    return 0 if "error" not in result else 3


COMMANDS = {"commit": commit_work, "push": push_branch, "clone": clone_into, "sync": sync_workspace,
            "setup": run_setup}


def _archive_module():
    """``snapshots.py``, the snapshot archive format, loaded from beside this file (this runs as
    a plain script, without its package; images must carry both files)."""
    return _sibling_module("snapshots.py", "tabbi_snapshot_archive")


def _sibling_module(filename: str, name: str):
    """A module of this folder loaded by path (this runs as a plain script, without its package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), filename)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snapshot_sandbox(request: dict) -> int:
    """``bootstrap.py snapshot REQUEST``: the sandbox's snapshot worker, started at its first
    snapshot and serving every later one (a snapshot after a turn then pays no process, sandbox
    or interpreter start). Its stdin is a socket of the server's; each message carries two
    descriptors, the previous snapshot's cache (read) and a pipe into the server's snapshot
    store (which this sandbox cannot see); the worker writes the snapshot stream of
    ``request["workspace"]`` and ``request["home"]`` into the pipe, closes it (the stream's end)
    and answers ``{"entries": N}`` or ``{"error": ...}``. It ends when the server closes its end.
    Nothing it says is trusted: the server checks the stream as it stores it."""
    import socket

    archive = _archive_module()
    channel = socket.socket(fileno=0)
    channel.sendall(b'{"ready": true}')  # imports done: the server may hand over snapshots
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(channel, 1024, 2)
        except OSError:
            return 0
        if not fds:
            return 0  # the server closed its end: the sandbox is stopping
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            answer: dict = {"error": "a snapshot request carries two descriptors"}
        else:
            answer = _snapshot_once(archive, request, *fds)
        channel.sendall(json.dumps(answer).encode())


def _snapshot_once(archive, request: dict, cache_fd: int, stream_fd: int) -> dict:
    """One snapshot of the worker's loop: the stream into ``stream_fd``, closed when done."""
    try:
        with os.fdopen(cache_fd, "rb") as previous, \
                os.fdopen(stream_fd, "wb", buffering=archive.CHUNK) as out:
            entries = archive.write_snapshot(request["workspace"], request["home"], previous, out)
    except (archive.SnapshotError, OSError) as exc:  # OSError: the server stopped reading
        return {"error": str(exc)}
    return {"entries": entries}


def restore_sandbox(request: dict) -> int:
    """``bootstrap.py restore REQUEST``: unpack the tar.gz read from stdin into the workspace and
    home, all or nothing; print ``{"restored": N, "files": {path: identity}}`` (what the next
    snapshot may reuse without reading, see ``restore_archive``) or ``{"error"}``."""
    archive = _archive_module()
    identities: dict = {}
    try:
        count = archive.restore_archive(sys.stdin.buffer, request["workspace"], request["home"], identities)
    except archive.SnapshotError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 3
    print(json.dumps({"restored": count, "files": identities}, separators=(",", ":")), flush=True)
    return 0


#: Subcommands whose stdin or stdout is an archive or a bundle: their request (paths, no secret)
#: is argv[2].
ARCHIVE_COMMANDS = {"snapshot": snapshot_sandbox, "restore": restore_sandbox, "sync-bundle": sync_from_bundle}


def _not_dumpable() -> None:
    """Make this process's memory (which held the spec's secrets) unreadable through /proc and
    ptrace for the agent it starts, which runs as the same user."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0)  # PR_SET_DUMPABLE
    except (OSError, AttributeError):
        pass


def main() -> int:
    _not_dumpable()
    if len(sys.argv) == 2 and sys.argv[1] in COMMANDS:
        return COMMANDS[sys.argv[1]](json.loads(sys.stdin.read()))
    if len(sys.argv) == 3 and sys.argv[1] in ARCHIVE_COMMANDS:
        return ARCHIVE_COMMANDS[sys.argv[1]](json.loads(sys.argv[2]))
    spec = json.loads(sys.stdin.read())
    os.makedirs(spec["home"], exist_ok=True)
    proc = None
    try:
        env = prepare_home(spec["home"])
        if spec.get("repo_url"):
            cloned = clone_or_reuse(spec, env)
            if prepare_environment(spec, env, cloned):
                env = prepare_home(spec["home"])  # the setup script may have written OpenCode's config
            fence_workspace(spec["workspace"])
            proc, port, version = start_opencode(spec, env)
        else:  # a warm sandbox: the repository comes later (``clone_into``)
            started = time.monotonic()
            project_id = prepare_warm_workspace(spec["workspace"], env)
            proc, port, version = start_opencode(spec, env)
            password = spec["opencode"]["password"]
            open_warm_workspace(port, password, project_id)
            # What is left of the start's time (the server waits health_timeout at most), less
            # what the rehearsal may overrun (an event's wait, its clean-up) and the exec's start.
            left = float(spec.get("health_timeout", 60)) - (time.monotonic() - started) - 30
            if left > 5:
                rehearse_turn(port, password, min(REHEARSAL_SECONDS, left))
    except Exception as exc:
        if proc is not None:
            proc.kill()
        message = str(exc) if isinstance(exc, BootstrapError) else f"{type(exc).__name__}: {exc}"
        emit("failed", error=message)
        return 2

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    emit("ready", port=port, version=version, pid=proc.pid)
    try:
        return proc.wait(timeout=spec.get("max_seconds"))
    except subprocess.TimeoutExpired:  # no server came back to stop this sandbox: stop it here
        proc.terminate()
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
