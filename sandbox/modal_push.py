"""Git bundles across the sandbox's edge: a local repository uploaded into a remote sandbox, a
session branch pushed from the server, and a warm workspace's base branch fetched by the server,
all without the token ever entering the sandbox.

Why a push leaves the sandbox: the local provider pushes from inside (``bootstrap.py push``),
where bubblewrap gives the push its own PID namespace and /tmp. A Modal ``exec`` has neither: it
shares the container with the agent, so a token handed to any process in there is a token the
agent can race for. So the sandbox only exports the branch as a git bundle (no secret involved;
the agent's git config may run there, it is the agent's own container), and the server:
- writes the bundle into a fresh private folder (mode 0700) of its own,
- fetches the one session branch from it into a fresh bare repository with ``transfer.fsckObjects``
  (a hostile bundle with malformed objects is refused), with no config but ours (no system or
  global config, no hooks, no templates), and
- pushes that branch to the remote with the one-shot credential given only to that git process
  (``bootstrap.remote_args``: a credential helper on its command line that answers only for the
  remote's own protocol and host).
Nothing the agent wrote is configuration for those git processes: a bundle carries objects and
refs only.

A sync (a workspace restored from a warm snapshot brought up to date, see
``extension/environments.py``) is the same in reverse (``fetch_base``): the server fetches the
base branch with the one-shot credential into a fresh private bare repository, computes the new
base commit and the setup script's blob id from it, and hands the sandbox a bundle of the tip
(thin against the warm snapshot's commit) for ``bootstrap.py sync-bundle``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import os
import shutil
import subprocess
import tempfile
from typing import Any

from . import bootstrap
from .provider import Sandbox, SandboxError

#: Environment of the server's own git processes: nothing of the server user's git config.
GIT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "GIT_CONFIG_GLOBAL": "/dev/null"}
#: Checks every object fetched from a bundle the agent made.
FSCK = ["-c", "transfer.fsckObjects=true", "-c", "fetch.fsckObjects=true"]
#: Largest branch bundle a push exports.
MAX_PUSH_BUNDLE = 1 << 30
#: Largest base-branch bundle a sync sends into a sandbox.
MAX_SYNC_BUNDLE = 1 << 30


def bundle_local_repository(path: str, limit: int) -> bytes:
    """The branches and tags of the repository at ``path`` (the person's, on this server) as a git
    bundle, to clone in a sandbox that cannot see this server's files. Blocking."""
    scratch = tempfile.mkdtemp(prefix="tabbi-bundle-")
    try:
        target = os.path.join(scratch, "source.bundle")
        env = {**GIT_ENV, "HOME": scratch}
        done = bootstrap.run_git(
            [
                *bootstrap.SAFE_GIT,
                "-C",
                path,
                "bundle",
                "create",
                "--quiet",
                target,
                "HEAD",
                "--branches",
                "--tags",
            ],
            scratch,
            env,
            timeout=600,
        )
        if done.returncode != 0:
            raise SandboxError(
                f"the local repository {path} could not be bundled for upload: {bootstrap.last_line(done)}"
            )
        if os.path.getsize(target) > limit:
            raise SandboxError(
                f"the local repository {path} is larger than {limit >> 20} MB as a bundle: push it to a "
                "git host and start the session from its URL instead"
            )
        with open(target, "rb") as f:
            return f.read()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


async def export_branch(sandbox: Sandbox, branch: str) -> bytes:
    """The session branch as a git bundle, made inside the sandbox (confined like the agent)."""
    run = getattr(sandbox, "run", None)
    if run is None:
        raise SandboxError("this sandbox cannot export a bundle")
    code, out, err = await run(
        ["git", *bootstrap.SAFE_GIT, "bundle", "create", "--quiet", "-", f"refs/heads/{branch}"],
        600,
        max_output=MAX_PUSH_BUNDLE + 1,
    )
    if code != 0 or not out:
        why = err.decode(errors="replace").strip().splitlines()[-1:] or [f"status {code}"]
        raise SandboxError(f"the branch could not be exported from the sandbox: {why[0]}")
    if len(out) > MAX_PUSH_BUNDLE:
        raise SandboxError(
            f"the branch is larger than {MAX_PUSH_BUNDLE >> 20} MB as a bundle: push it "
            "from the sandbox's terminal instead"
        )
    return out


def push_bundle(
    bundle: bytes, branch: str, remote_url: str, credential: dict[str, str] | None
) -> dict[str, Any]:
    """Push ``branch`` of ``bundle`` to ``remote_url`` from a private bare repository on this
    server; ``{"pushed": True}`` or ``{"pushed": False, "error", "reason"}`` like
    ``bootstrap.py push``. Blocking (run it off the event loop)."""
    scratch = tempfile.mkdtemp(prefix="tabbi-push-")  # 0700, the server's own
    env = {**GIT_ENV, "HOME": scratch}
    bare, source, ref = (
        os.path.join(scratch, "push.git"),
        os.path.join(scratch, "branch.bundle"),
        f"refs/heads/{branch}",
    )
    result: dict[str, Any] = {"pushed": False}
    try:
        fd = os.open(source, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(bundle)
        bootstrap.git(["init", "--quiet", "--bare", "--template=", bare], scratch, env)
        bootstrap.git(
            [*FSCK, "--git-dir", bare, "fetch", "--quiet", "--no-tags", "--", source, f"+{ref}:{ref}"],
            scratch,
            env,
            remote=(source, None),
        )
        # git (2.39 at least) does not apply fsckObjects to a fetch from a bundle: check every
        # object that came in, before anything is pushed.
        checked = bootstrap.run_git(
            ["--git-dir", bare, "fsck", "--strict", "--no-progress", "--no-dangling"], scratch, env
        )
        if checked.returncode != 0:
            errors = [line for line in checked.stderr.splitlines() if line.startswith("error")]
            raise bootstrap.BootstrapError(
                "the branch exported from the sandbox holds malformed git objects, so it was not "
                f"pushed: {(errors or [bootstrap.last_line(checked)])[0]}"
            )
        done = bootstrap.run_git(
            [*bootstrap.SAFE_GIT, "--git-dir", bare, "push", "--porcelain", "--", remote_url, f"{ref}:{ref}"],
            scratch,
            env,
            timeout=600,
            remote=(remote_url, credential),
        )
        if done.returncode == 0:
            result["pushed"] = True
        else:
            result["reason"], result["error"] = bootstrap.push_refusal(done)
    except bootstrap.BootstrapError as exc:
        result["reason"], result["error"] = "failed", str(exc)
    except (OSError, subprocess.SubprocessError) as exc:
        result["reason"], result["error"] = "failed", f"the push could not run: {exc}"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


#: Threads for this server's git work with a remote (a bundle's push, a base branch's fetch).
#: Each may take minutes; on the event loop's default executor (a handful of threads on a small
#: machine) a few at once would hold up every other blocking call of the server.
_REMOTE_GIT = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="tabbi-remote-git")


async def with_remote(call: Any, *args: Any) -> Any:
    """``call(*args)`` (blocking git work with a remote) in a thread of its own pool, never the
    event loop's default executor."""
    return await asyncio.get_running_loop().run_in_executor(_REMOTE_GIT, functools.partial(call, *args))


async def push_from_bundle(
    sandbox: Sandbox, branch: str, remote_url: str, credential: dict[str, str] | None
) -> dict[str, Any]:
    """Export the session branch from ``sandbox`` and push it from this server."""
    try:
        bundle = await export_branch(sandbox, branch)
    except SandboxError as exc:
        return {"pushed": False, "reason": "failed", "error": str(exc)}
    return await with_remote(push_bundle, bundle, branch, remote_url, credential)


@dataclasses.dataclass(frozen=True)
class BaseTip:
    """The base branch as this server fetched it: what the session's base commit becomes."""

    #: The branch's tip (the new base commit) and its ``.tabbi/setup.sh`` blob id (None: none).
    commit: str
    setup_hash: str | None
    #: A bundle of ``bootstrap.SYNC_REF`` at ``commit`` for the sandbox; empty when ``commit`` is
    #: the one it already has.
    bundle: bytes
    #: Whether the bundle holds only what the sandbox lacks (``have`` is an ancestor).
    thin: bool


def fetch_base(remote_url: str, base_branch: str | None, credential: dict[str, str] | None,
               have: str) -> BaseTip:
    """Fetch ``base_branch`` (None: the remote's HEAD) of ``remote_url`` into a private bare
    repository on this server and bundle its tip, thin against ``have`` (the commit the sandbox's
    workspace is at) when that is an ancestor. Blocking (run it off the event loop).

    A fresh scratch repository per sync, not a cache per person and repository: nothing of one
    sync (or one person) survives into the next, there is no cache to lock, bound or clean up, and
    a cache's config or objects never become a thing to trust. The cost is a full fetch of the
    base branch per warm start, over the server's network; only the (thin) bundle crosses into
    the sandbox."""
    scratch = tempfile.mkdtemp(prefix="tabbi-sync-")  # 0700, the server's own
    env = {**GIT_ENV, "HOME": scratch}
    bare, ref = os.path.join(scratch, "sync.git"), bootstrap.SYNC_REF
    try:
        bootstrap.git(["init", "--quiet", "--bare", "--template=", bare], scratch, env)
        source = f"refs/heads/{base_branch}" if base_branch else "HEAD"
        bootstrap.git(
            [*bootstrap.SAFE_GIT, "--git-dir", bare, "fetch", "--quiet", "--no-tags", "--",
             remote_url, f"+{source}:{ref}"],
            scratch, env, timeout=600, remote=(remote_url, credential),
        )
        commit = bootstrap.git(["--git-dir", bare, "rev-parse", "--verify", f"{ref}^{{commit}}"],
                               scratch, env)
        setup_hash = bootstrap.setup_hash(bare, env, commit)
        if commit == have:
            return BaseTip(commit, setup_hash, b"", thin=True)
        thin = bootstrap.run_git(["--git-dir", bare, "merge-base", "--is-ancestor", have, commit],
                                 scratch, env).returncode == 0
        target = os.path.join(scratch, "base.bundle")
        bootstrap.git(["--git-dir", bare, "bundle", "create", "--quiet", target, ref,
                       *([f"^{have}"] if thin else [])], scratch, env, timeout=600)
        if os.path.getsize(target) > MAX_SYNC_BUNDLE:
            raise SandboxError(f"the base branch is larger than {MAX_SYNC_BUNDLE >> 20} MB as a bundle")
        with open(target, "rb") as f:
            return BaseTip(commit, setup_hash, f.read(), thin)
    except bootstrap.BootstrapError as exc:
        raise SandboxError(f"the base branch could not be fetched: {exc}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
