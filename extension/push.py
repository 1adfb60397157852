"""Pushing a session's work: commit the agent's changes (and chosen notebook cells) on the session
branch as the person, push the branch, optionally open a pull request.

The commit and the push run inside the sandbox as two processes (``bootstrap.py commit``, then
``bootstrap.py push``, each through its own ``Sandbox.exec``), so the same code serves local and
Modal sandboxes. Only the push process gets the GitHub token, on stdin, and pushes from a private
bare repository, so nothing the agent configured can see or redirect it. A refused push leaves the
commit in the workspace, so the person can fix the cause and push again.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from tabbi_sandbox.modal_push import push_from_bundle
from tabbi_sandbox.provider import Sandbox

from . import metrics, notebook_files, states
from .agent import AgentError, SessionAgent
from .github.accounts import GitHubAccounts, GitHubError, LoginRequired
from .validation import RepoSpec, ValidationError, parse_repo

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 10_000
_AUTHOR = re.compile(r"^\s*([^<>\n]{1,200}?)\s*<([^<>\s@]+@[^<>\s@]+)>\s*$")


class PushRejected(AgentError):
    """The remote refused the push; the commit stays in the workspace."""


@dataclass(frozen=True)
class PushRequest:
    message: str | None = None
    files: dict[str, str] | None = None  # path in the repository -> content (the cells)
    only_files: bool = False
    pull_request: bool = False
    title: str | None = None
    author: tuple[str, str] | None = None
    keep_outputs: bool = False  # notebooks keep their outputs (stripped by default)


def parse_author(value: object) -> tuple[str, str] | None:
    if value in (None, ""):
        return None
    clean = isinstance(value, str) and not any(ord(ch) < 32 for ch in value)
    match = _AUTHOR.match(value) if clean else None
    if not match:
        raise ValidationError("'author' must look like: Your Name <you@example.com>")
    return match.group(1), match.group(2)


def validate_message(value: object) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or len(value) > MAX_MESSAGE_CHARS or "\0" in value:
        raise ValidationError(f"'message' must be text of at most {MAX_MESSAGE_CHARS} characters")
    return value.strip() or None


def host_identity(owner: str) -> tuple[str, str]:
    """Whom to commit as without GitHub: the server user's git identity, else the owner name."""
    found = []
    for key in ("user.name", "user.email"):
        try:
            done = subprocess.run(
                ["git", "config", "--global", key], capture_output=True, text=True, timeout=5
            )
            found.append(done.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            found.append("")
    name = found[0] or owner or getpass.getuser()
    return name, found[1] or f"{name.replace(' ', '.').lower()}@localhost"


class Publisher:
    def __init__(self, github: GitHubAccounts):
        self.github = github

    async def push(self, agent: SessionAgent, request: PushRequest) -> dict[str, Any]:
        """Commit and push (see ``_push``), counted and logged by outcome: pushed, rejected (by
        the remote), refused (by tabbi: not running, not signed in, busy) or failed."""
        started = time.monotonic()
        try:
            out = await self._push(agent, request)
        except Exception as exc:
            outcome = ("rejected" if isinstance(exc, PushRejected) else
                       "refused" if isinstance(exc, (AgentError, GitHubError, ValidationError)) else "failed")
            metrics.PUSHES.labels(outcome).inc()
            agent.log.warning("push", f"push {outcome}: {exc}", outcome=outcome,
                              seconds=round(time.monotonic() - started, 3))
            raise
        metrics.PUSHES.labels("pushed").inc()
        agent.log.info("push", f"pushed {out['commit'] or 'nothing new'}", outcome="pushed",
                       commit=out["commit"], committed=out["committed"], files=len(out["files"]),
                       pull_request="pull_request" in out, seconds=round(time.monotonic() - started, 3))
        return out

    async def _push(self, agent: SessionAgent, request: PushRequest) -> dict[str, Any]:
        record = agent.record
        repo = parse_repo(record.repo, self.github.hosts.web)
        if request.pull_request and repo.kind != "github":
            raise ValidationError("pull requests need a GitHub repository (owner/name)")
        if agent.state != states.RUNNING:
            raise AgentError(f"the session is {agent.state}: resume it (%tabbi resume), then push")
        access = await self.github.git_access(record.owner) if repo.kind == "github" else None
        if repo.kind == "github" and access is None:
            raise LoginRequired("Pushing to GitHub needs you signed in: %tabbi login")
        if request.author:
            name, email = request.author
        elif access is not None:
            name, email = access.name, access.email
        else:
            name, email = await asyncio.to_thread(host_identity, record.owner)
        message = request.message or self._default_message(request)
        async with agent.between_turns("push") as sandbox:
            if access is not None and not sandbox.confined:
                raise AgentError(
                    "Pushing to GitHub needs a sandbox confined by bubblewrap: without it the agent "
                    "runs as you and could read your token. Install bubblewrap (apt install "
                    "bubblewrap), or push the branch from a terminal."
                )
            stripped = {} if request.only_files else await self._notebooks(
                sandbox, record.base_commit or "HEAD", request)
            files = {**stripped, **(request.files or {})}
            result = await run_bootstrap(sandbox, "commit", {
                "branch": record.work_branch,
                "message": message,
                "author": {"name": name, "email": email},
                "files": files,
                "only_files": request.only_files,
            })
            credential = access.credential if access else None
            if "error" not in result and sandbox.pushes_from_bundle:
                # Its execs share the agent's container: the branch leaves as a bundle and is
                # pushed from here, so the token never enters the sandbox.
                result.update(await push_from_bundle(sandbox, record.work_branch, repo.url, credential))
            elif "error" not in result:
                # A second process, in a fresh sandbox exec: whatever the commit step let the
                # agent's configuration start ended with that step.
                result.update(await run_bootstrap(sandbox, "push", {
                    "branch": record.work_branch,
                    "remote_url": repo.url,
                    "credential": credential,
                }, write_remote=repo.kind == "local"))
        commit = result.get("commit")
        if not result.get("pushed"):
            kept = (
                f" Your commit {commit[:10]} is kept in the session; push again once fixed." if commit else ""
            )
            raise PushRejected(f"Push failed: {result.get('error') or 'unknown error'}.{kept}", 409)
        out: dict[str, Any] = {
            "branch": record.work_branch,
            "commit": commit,
            "committed": result.get("committed", False),
            "files": [f for f in result.get("files", []) if f not in stripped or f in (request.files or {})],
            "outputs_stripped": sorted(stripped),
            "author": {"name": name, "email": email},
            "remote": repo.display,
            "links": self._links(repo, record.work_branch, commit),
        }
        if request.pull_request:
            prompts = [e.data.get("text", "") for e in await agent.store.list_events(agent.id, 0, 1000)
                       if e.type == "turn.started"]
            first = request.message or (prompts[0] if prompts else message)
            title = request.title or _one_line(first.splitlines()[0] if first.strip() else message, 120)
            body = await self._pull_body(agent, prompts, commit)
            out["pull_request"] = await self.github.pull_request(
                record.owner, repo.display, record.work_branch, record.base_branch, title, body
            )
            out["links"]["pull_request"] = out["pull_request"]["url"]
        await agent.announce("push.completed", {k: out[k] for k in ("branch", "commit", "links", "files")})
        return out

    @staticmethod
    async def _notebooks(sandbox: Sandbox, base: str, request: PushRequest) -> dict[str, str]:
        """The agent's changed notebooks, validated (an invalid one refuses the whole push) and,
        unless ``keep_outputs``, stripped: ``{path: content}`` of those to rewrite."""
        try:
            return await notebook_files.stripped_for_push(sandbox, base, request.keep_outputs)
        except notebook_files.NotebookError as exc:
            raise ValidationError(str(exc)) from None

    @staticmethod
    def _default_message(request: PushRequest) -> str:
        if request.files and request.only_files:
            return "Add notebook cells (pushed from tabbi)"
        return "Changes from a tabbi session"

    def _links(self, repo: RepoSpec, branch: str, commit: str | None) -> dict[str, str]:
        if repo.kind != "github":
            return {"remote": repo.display}
        base = f"{self.github.hosts.web}/{repo.display}"
        links = {"branch": f"{base}/tree/{branch}"}
        if commit:
            links["commit"] = f"{base}/commit/{commit}"
        return links

    @staticmethod
    async def _pull_body(agent: SessionAgent, prompts: list[str], commit: str | None) -> str:
        """What the session did: the prompts in order and the files the branch changes."""
        try:
            files = (await agent.diff())["files"]
        except AgentError:
            files = []
        lines = [f"Work from tabbi session `{agent.id}` on branch `{agent.record.work_branch}`.", ""]
        if prompts:
            lines += ["### Prompts", *[f"{i}. {_one_line(p)}" for i, p in enumerate(prompts[:20], 1)], ""]
        if files:
            lines += [
                "### Files",
                *[
                    f"- `{f['path']}` ({f['status']}, +{f['additions']} -{f['deletions']})"
                    for f in files[:100]
                ],
                "",
            ]
        if commit:
            lines.append(f"Head commit: {commit}")
        return "\n".join(lines)


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


async def run_bootstrap(
    sandbox: Sandbox, command: str, payload: dict[str, Any], write_remote: bool = False
) -> dict[str, Any]:
    """Run ``bootstrap.py COMMAND`` in the sandbox; its last stdout line is the JSON result."""
    request = {"workspace": sandbox.workspace_path, "home": sandbox.home_path, **payload}
    done = await sandbox.exec(
        sandbox.bootstrap_argv(command), timeout=900, input=json.dumps(request).encode(),
        write_remote=write_remote,
    )
    for line in reversed(done.stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {"error": done.stderr.strip()[-300:] or f"the {command} step printed no result"}
