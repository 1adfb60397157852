"""Reading a session's workspace from the server: the branch's diff and single files.

Both run inside the sandbox (``Sandbox.exec``), confined like the agent, so a symlink the agent
planted cannot make the server read outside the workspace.

The diff is bounded where it is made. The agent can fill the workspace with files of any size
(4 x 400 MB untracked files once made the server read 1.6 GB of ``git diff`` and summarize it on
the event loop: 6.7 GB of memory, 27 s without answering anyone). So a small program in the
sandbox lists the changed files, shows no content of a file larger than
``MAX_DIFF_SOURCE_BYTES`` (listed with its size) nor of a special file, keeps at most
``MAX_FILE_DIFF_CHARS`` of each file's diff and ``MAX_DIFF_CHARS`` in all, marks every cut (per
file and overall), and counts additions and deletions as it reads. The server reads at most
``MAX_OUTPUT_BYTES`` of what it prints and parses that off the event loop.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tabbi_sandbox.provider import Sandbox

from .validation import ValidationError

MAX_FILE_BYTES = 1_000_000
#: A file whose old or new content is larger than this is listed with its size, no content.
MAX_DIFF_SOURCE_BYTES = 1_000_000
MAX_FILE_DIFF_CHARS = 200_000
MAX_DIFF_CHARS = 2_000_000
#: Files listed at most (the rest are counted in ``omitted_files``).
MAX_DIFF_FILES = 1000
#: What the server reads of the program's output at most (text, metadata, JSON escaping).
MAX_OUTPUT_BYTES = 16_000_000

#: Runs in the sandbox as ``python -I -S -c DIFF_PROGRAM base max_source max_file max_total
#: max_files`` and prints one JSON object. Isolated mode: nothing the agent put in the workspace
#: (a ``json.py``) or in the environment is imported. Untracked files count as added.
DIFF_PROGRAM = r"""
import json, os, stat, subprocess, sys

base = sys.argv[1]
max_source, max_file, max_total, max_files = (int(a) for a in sys.argv[2:6])
GIT = ["git", "-c", "core.quotepath=off", "--literal-pathspecs"]
DIFF = ["diff", "--no-color", "--no-ext-diff", "--no-renames"]
STATUS = {"A": "added", "D": "deleted"}


def run(args):
    return subprocess.run(GIT + args, stdin=subprocess.DEVNULL, capture_output=True)


def bounded(args, limit):
    # At most ``limit`` bytes of a git command's output, and whether that was all of it.
    proc = subprocess.Popen(GIT + args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    out = proc.stdout.read(limit + 1)
    if len(out) > limit:
        proc.kill()
    proc.stdout.close()
    proc.wait()
    return out[:limit], len(out) <= limit


def changed():
    listed = run(["diff", "--raw", "-z", "--no-renames", "--no-ext-diff", base, "--"])
    if listed.returncode != 0:
        sys.stderr.write(listed.stderr.decode(errors="replace")[-300:])
        sys.exit(2)
    fields = listed.stdout.split(b"\0")
    tracked = []
    for meta, path in zip(fields[0::2], fields[1::2]):
        parts = meta.decode(errors="replace").split()
        if len(parts) == 5:
            tracked.append((STATUS.get(parts[4][:1], "modified"), path, parts[2]))
    others = run(["ls-files", "-z", "--others", "--exclude-standard"]).stdout
    return tracked + [("added", path, None) for path in others.split(b"\0") if path]


def blob_sizes(ids):
    ids = sorted({i for i in ids if i and i.strip("0")})
    if not ids:
        return {}
    out = subprocess.run(GIT + ["cat-file", "--batch-check"], capture_output=True,
                         input=("\n".join(ids) + "\n").encode())
    sizes = {}
    for line in out.stdout.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].isdigit():
            sizes[parts[0]] = int(parts[2])
    return sizes


def count(out):
    additions = deletions = 0
    binary = in_hunks = False
    for line in out.split(b"\n"):
        if in_hunks:
            additions += line.startswith(b"+")
            deletions += line.startswith(b"-")
        elif line.startswith(b"@@"):
            in_hunks = True
        elif line.startswith(b"Binary files "):
            binary = True
    return additions, deletions, binary


def main():
    listed = changed()
    sizes = blob_sizes([old for _, _, old in listed[:max_files]])
    files, texts, used, truncated = [], [], 0, len(listed) > max_files
    for status, raw, old in listed[:max_files]:
        path, name = raw.decode(errors="replace"), os.fsdecode(raw)
        try:
            info = os.lstat(name)
        except OSError:
            info = None
        size = info.st_size if info is not None else 0
        entry = {"path": path, "status": status, "additions": 0, "deletions": 0, "binary": False,
                 "size": size, "truncated": False}
        special = info is not None and not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode))
        if special or max(size, sizes.get(old or "", 0)) > max_source:
            why = "not a regular file" if special else f"{size} bytes, over {max_source}"
            entry.update(additions=None, deletions=None, truncated=True, skipped=why)
            texts.append(f"diff --git a/{path} b/{path}\n# tabbi: content not shown ({why})\n")
            entry["diff_chars"] = len(texts[-1])
            files.append(entry)
            truncated = True
            continue
        if old is None:
            args = DIFF + ["--no-index", "--", "/dev/null", name]
        else:
            args = DIFF + [base, "--", name]
        out, complete = bounded(args, 4 * max_source + 65536)
        entry["additions"], entry["deletions"], entry["binary"] = count(out)
        room = max(0, min(max_file, max_total - used))
        text = out[:room].decode(errors="replace")
        if len(out) > room or not complete:
            entry["truncated"] = truncated = True
            text += f"\n# tabbi: the diff of {path} is cut here\n"
        used += len(json.dumps(text, ensure_ascii=False))
        texts.append(text)
        entry["diff_chars"] = len(text)
        files.append(entry)
    result = {"diff": "".join(texts), "files": files, "truncated": truncated,
              "omitted_files": max(0, len(listed) - max_files)}
    json.dump(result, sys.stdout, ensure_ascii=False)


main()
"""

#: Print a file only if its real path lies inside the workspace (the current directory).
READ_SCRIPT = r"""
f=$(readlink -f -- "$1") || exit 4
case "$f" in
  "$PWD"/*) [ -f "$f" ] || exit 4; head -c "$2" -- "$f" ;;
  *) exit 3 ;;
esac
"""


class WorkspaceError(Exception):
    pass


def check_relative_path(path: object) -> str:
    if not isinstance(path, str) or not path or len(path) > 1000:
        raise ValidationError("'path' is required: a path relative to the repository root")
    if path.startswith(("/", "-")) or "\0" in path or ".." in path.split("/"):
        raise ValidationError("'path' must be relative to the repository root, without '..'")
    return path


async def diff(sandbox: Sandbox, base_commit: str) -> dict[str, Any]:
    """``{diff, files: [{path, status, additions, deletions, binary, size, truncated,
    skipped?, diff_chars}], truncated, omitted_files}``, bounded as the module says.
    ``diff_chars``: the length of the file's part of ``diff`` (the parts are in the order of
    ``files``), so a reader can cut it exactly: a file whose diff the total budget left no room
    for has only a note, no ``diff --git`` line of its own."""
    interpreter = sandbox.bootstrap_argv()[0]  # the bootstrap's own Python: in every sandbox
    argv = [interpreter, "-I", "-S", "-c", DIFF_PROGRAM, base_commit, str(MAX_DIFF_SOURCE_BYTES),
            str(MAX_FILE_DIFF_CHARS), str(MAX_DIFF_CHARS), str(MAX_DIFF_FILES)]
    result = await sandbox.exec(argv, timeout=60, max_output=MAX_OUTPUT_BYTES)
    if result.returncode != 0:
        raise WorkspaceError(f"git diff failed: {result.stderr.strip()[:300]}")
    return await asyncio.to_thread(_parse, result.stdout)


def _parse(output: str) -> dict[str, Any]:
    try:
        data = json.loads(output)
    except (ValueError, RecursionError):  # cut off at MAX_OUTPUT_BYTES
        raise WorkspaceError("the diff is too large to show") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise WorkspaceError("the diff could not be read")
    return data


async def read_file(sandbox: Sandbox, path: str) -> str:
    path = check_relative_path(path)
    result = await sandbox.exec(["sh", "-c", READ_SCRIPT, "read", path, str(MAX_FILE_BYTES)],
                                timeout=30, max_output=MAX_FILE_BYTES)
    if result.returncode == 3:
        raise ValidationError(f"{path} points outside the repository")
    if result.returncode != 0:
        raise WorkspaceError(f"no such file in the workspace: {path}")
    return result.stdout
