"""Reading a session's workspace from the server: the branch's diff and single files.

Both run inside the sandbox (``Sandbox.exec``), confined like the agent, so a symlink the agent
planted cannot make the server read outside the workspace.
"""

from __future__ import annotations

import re
from typing import Any

from tabbi_sandbox.provider import Sandbox

from .validation import ValidationError

MAX_FILE_BYTES = 1_000_000
MAX_DIFF_CHARS = 2_000_000

#: Tracked changes against the base commit, then every untracked (not ignored) file as an addition.
DIFF_SCRIPT = r"""
base="$1"
git -c core.quotepath=off diff --no-color --no-ext-diff "$base" -- || exit $?
git -c core.quotepath=off ls-files --others --exclude-standard | while IFS= read -r f; do
  git -c core.quotepath=off diff --no-color --no-ext-diff --no-index -- /dev/null "$f"
done
exit 0
"""

#: Print a file only if its real path lies inside the workspace (the current directory).
READ_SCRIPT = r"""
f=$(readlink -f -- "$1") || exit 4
case "$f" in
  "$PWD"/*) [ -f "$f" ] || exit 4; head -c "$2" -- "$f" ;;
  *) exit 3 ;;
esac
"""

_FILE_HEADER = re.compile(r"^diff --git a/(.*?) b/(.*)$")


class WorkspaceError(Exception):
    pass


def check_relative_path(path: object) -> str:
    if not isinstance(path, str) or not path or len(path) > 1000:
        raise ValidationError("'path' is required: a path relative to the repository root")
    if path.startswith(("/", "-")) or "\0" in path or ".." in path.split("/"):
        raise ValidationError("'path' must be relative to the repository root, without '..'")
    return path


async def diff(sandbox: Sandbox, base_commit: str) -> dict[str, Any]:
    result = await sandbox.exec(["bash", "-c", DIFF_SCRIPT, "diff", base_commit], timeout=60)
    if result.returncode != 0:
        raise WorkspaceError(f"git diff failed: {result.stderr.strip()[:300]}")
    text = result.stdout
    truncated = len(text) > MAX_DIFF_CHARS
    return {"diff": text[:MAX_DIFF_CHARS], "files": summarize(text), "truncated": truncated}


def summarize(diff_text: str) -> list[dict[str, Any]]:
    """Per-file additions/deletions and status from a unified git diff."""
    files: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for line in diff_text.splitlines():
        header = _FILE_HEADER.match(line)
        if header:
            current = {"path": header.group(2), "status": "modified", "additions": 0, "deletions": 0}
            files.append(current)
        elif current is None:
            continue
        elif line.startswith("new file mode"):
            current["status"] = "added"
        elif line.startswith("deleted file mode"):
            current["status"] = "deleted"
        elif line.startswith("+") and not line.startswith("+++"):
            current["additions"] += 1
        elif line.startswith("-") and not line.startswith("---"):
            current["deletions"] += 1
    return files


async def read_file(sandbox: Sandbox, path: str) -> str:
    path = check_relative_path(path)
    result = await sandbox.exec(["sh", "-c", READ_SCRIPT, "read", path, str(MAX_FILE_BYTES)], timeout=30)
    if result.returncode == 3:
        raise ValidationError(f"{path} points outside the repository")
    if result.returncode != 0:
        raise WorkspaceError(f"no such file in the workspace: {path}")
    return result.stdout
