"""The agent's notebooks, read from the sandbox and parsed away from the server: for cell-level
diffs (``notebook_diff``) and for the checks and stripping of a push (``notebook_strip``).

An ``.ipynb`` in the workspace is the agent's, so hostile: 2 GB of JSON, nesting ten thousand
levels deep, invalid UTF-8, a symlink to somewhere else, a FIFO. So:

* a small program reads them **in the sandbox** (``Sandbox.exec``, confined like the agent; run by
  the bootstrap's own Python in isolated mode, so nothing of the workspace is imported). It reads
  a notebook's new content only when its real path is a regular file inside the workspace, and
  the old content with ``git cat-file`` (no filter, no textconv of the agent's runs); it skips a
  notebook over ``MAX_NOTEBOOK_BYTES`` and stops adding content past ``MAX_TOTAL_BYTES``;
* the server never parses that output itself: it is piped into a long-lived **worker process**
  (this file run by ``python -I``) with a memory limit, and a deadline per request, which
  parses, checks nesting depth and cell count, and runs nbformat and nbdime. A notebook it cannot
  read comes back as a reason, never as an exception; a worker that runs out of memory or time is
  killed and every notebook falls back the same way (the next request starts a new one). The
  server's event loop only waits.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tabbi_sandbox.provider import Sandbox

#: A notebook larger than this (old or new) is not read: its diff stays git's, its push is refused.
MAX_NOTEBOOK_BYTES = 10_000_000
#: Content of all notebooks of one request, at most.
MAX_TOTAL_BYTES = 20_000_000
#: Notebooks looked at per request, at most.
MAX_NOTEBOOKS = 50
#: A notebook nested deeper than this, or with more cells, is not one the worker reads.
MAX_DEPTH = 64
MAX_CELLS = 5_000
#: The worker's limits: address space and wall time.
WORKER_MEMORY_BYTES = 2_000_000_000
WORKER_SECONDS = 60.0

#: Runs in the sandbox as ``python -I -S -c NOTEBOOKS_PROGRAM`` with a JSON request on stdin:
#: ``{base, paths (null: every changed .ipynb), old (bool), max_bytes, max_total, max_count}``.
#: Prints ``{"notebooks": [{path, status, old?, new?, skipped?}]}``.
NOTEBOOKS_PROGRAM = r"""
import json, os, stat, subprocess, sys

req = json.load(sys.stdin)
base, max_bytes, max_total = req["base"], req["max_bytes"], req["max_total"]
GIT = ["git", "-c", "core.quotepath=off", "--literal-pathspecs"]
root = os.path.realpath(".")
used = 0


def git(args, limit=None):
    proc = subprocess.Popen(GIT + args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    out = proc.stdout.read(-1 if limit is None else limit + 1)
    if limit is not None and len(out) > limit:
        proc.kill()
    proc.stdout.close()
    return proc.wait(), out


def must(done):
    # A git that failed (a base commit the agent pruned) must not pass for "no notebook changed":
    # a push would then neither check nor strip them.
    code, out = done
    if code != 0:
        sys.stderr.write("git could not list the changed notebooks")
        sys.exit(2)
    return out


def changed():
    out = must(git(["diff", "--name-status", "-z", "--no-renames", "--no-ext-diff", base, "--"]))
    fields, found = out.split(b"\0"), []
    for status, path in zip(fields[0::2], fields[1::2]):
        found.append((path.decode(errors="replace"),
                      {"A": "added", "D": "deleted"}.get(status.decode()[:1], "modified")))
    out = must(git(["ls-files", "-z", "--others", "--exclude-standard"]))
    found += [(p.decode(errors="replace"), "added") for p in out.split(b"\0") if p]
    return [(p, s) for p, s in found if p.endswith(".ipynb")]


def text(data, path):
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "not UTF-8 text"


def old_content(path):
    code, out = git(["ls-tree", "-z", base, "--", path])
    parts = out.split(b"\t", 1)[0].split()
    if code != 0 or len(parts) != 3 or parts[1] != b"blob":
        return None, None
    blob = parts[2].decode()
    code, size = git(["cat-file", "-s", blob])
    if code != 0:
        return None, "cannot be read"
    if int(size or 0) > max_bytes:
        return None, f"{int(size or 0)} bytes, over {max_bytes}"
    code, out = git(["cat-file", "blob", blob], max_bytes)
    return text(out, path)


def new_content(path):
    real = os.path.realpath(path)
    if not real.startswith(root + os.sep):
        return None, "points outside the repository"
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None, "cannot be read"
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            return None, "not a regular file"
        if info.st_size > max_bytes:
            return None, f"{info.st_size} bytes, over {max_bytes}"
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        return None, f"over {max_bytes} bytes"
    return text(data, path)


listed = [(p, None) for p in req["paths"]] if req["paths"] is not None else changed()
notebooks = []
for path, status in listed[:req["max_count"]]:
    entry = {"path": path, "status": status}
    sides = [("old", old_content)] if req["old"] else []
    sides.append(("new", new_content))
    for side, read in sides:
        if side == "new" and status == "deleted":
            continue
        if side == "new" and not os.path.lexists(path):
            continue
        content, why = read(path)
        if content is not None and used + len(content) > max_total:
            content, why = None, f"notebooks over {max_total} bytes in all"
        if why:
            entry["skipped"] = f"{side} content: {why}"
            break
        if content is not None:
            used += len(content)
            entry[side] = content
    notebooks.append(entry)
json.dump({"notebooks": notebooks, "omitted": max(0, len(listed) - req["max_count"])},
          sys.stdout, ensure_ascii=False)
"""


class NotebookError(Exception):
    """The notebooks could not be read or worked on (the caller falls back or refuses)."""


async def read(sandbox: Sandbox, base: str, paths: list[str] | None, old: bool) -> bytes:
    """The sandbox program's JSON output, unparsed (the worker parses it)."""
    interpreter = sandbox.bootstrap_argv()[0]
    request = {"base": base, "paths": paths, "old": old, "max_bytes": MAX_NOTEBOOK_BYTES,
               "max_total": MAX_TOTAL_BYTES, "max_count": MAX_NOTEBOOKS}
    # JSON escaping doubles quotes and newlines (control characters take six): output cut at the
    # bound does not parse in the worker, and the caller falls back.
    result = await sandbox.exec([interpreter, "-I", "-S", "-c", NOTEBOOKS_PROGRAM], timeout=60,
                                input=json.dumps(request).encode(), max_output=2 * MAX_TOTAL_BYTES + 65536)
    if result.returncode != 0:
        raise NotebookError(f"the notebooks could not be read: {result.stderr.strip()[-300:]}")
    return await asyncio.to_thread(result.stdout.encode)  # up to 40 MB: off the event loop


class _Worker:
    """One long-lived worker process (nbformat and nbdime take seconds to import: paid once),
    serving one request at a time over length-prefixed frames. A request that fails, overruns
    ``WORKER_SECONDS`` or kills the worker (its memory cap) ends that process; the next request
    starts a fresh one."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()

    async def call(self, payload: bytes) -> bytes:
        async with self.lock:
            try:
                return await asyncio.wait_for(self._exchange(payload), WORKER_SECONDS)
            except asyncio.TimeoutError:
                await self.end()
                raise NotebookError(f"reading the notebooks took over {WORKER_SECONDS:.0f} s") from None
            except (OSError, asyncio.IncompleteReadError, ValueError):
                await self.end()
                raise NotebookError("the notebook worker stopped (a notebook too large to read?)") from None
            except BaseException:
                # Cancelled mid-exchange: the worker may still answer this request, and the next
                # caller (another session's) would read that answer as its own. It goes.
                self.kill()
                raise

    async def _exchange(self, payload: bytes) -> bytes:
        if self.proc is None or self.proc.returncode is not None:
            # This file run as a script (``-m`` would import the package: the whole server), in
            # isolated mode, with none of the server's environment.
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", os.path.abspath(__file__),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
            )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(len(payload).to_bytes(8, "big") + payload)
        await self.proc.stdin.drain()
        size = int.from_bytes(await self.proc.stdout.readexactly(8), "big")
        return await self.proc.stdout.readexactly(size)

    def kill(self) -> asyncio.subprocess.Process | None:
        """Kill the worker process at once (the next request starts another); the process."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
        return proc

    async def end(self) -> None:
        """Stop the worker process and wait for it to be gone."""
        proc = self.kill()
        if proc is not None:
            await proc.wait()


_workers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Worker] = weakref.WeakKeyDictionary()


async def work(task: str, options: dict[str, Any], notebooks: bytes) -> dict[str, Any]:
    """Run ``task`` (``diff`` or ``strip``) of the worker on the sandbox program's output."""
    worker = _workers.setdefault(asyncio.get_running_loop(), _Worker())
    header = json.dumps({"task": task, **options}).encode() + b"\n"
    out = await worker.call(header + notebooks)
    return await asyncio.to_thread(json.loads, out)


async def annotate_diff(sandbox: Sandbox, base: str, data: dict[str, Any], outputs: bool) -> dict[str, Any]:
    """Add to each ``.ipynb`` of a workspace diff its cell-level diff (``notebook``: text and
    cells; additions and deletions become the cells' source lines), or a ``notebook_note``
    saying why it stays JSON."""
    entries = [f for f in data.get("files", []) if str(f.get("path", "")).endswith(".ipynb")]
    if not entries:
        return data
    try:
        raw = await read(sandbox, base, [f["path"] for f in entries[:MAX_NOTEBOOKS]], old=True)
        results = await work("diff", {"outputs": outputs}, raw)
    except NotebookError as exc:
        results = {f["path"]: {"error": str(exc)} for f in entries}
    for entry in entries:
        found = results.get(entry["path"]) or {"error": results.get("", {}).get("error")
                                               or f"more than {MAX_NOTEBOOKS} notebooks changed"}
        if "error" in found:
            entry["notebook_note"] = f"shown as JSON, not by cell: {found['error']}"
            continue
        entry["notebook"] = {"text": found["text"], "cells": found["cells"]}
        entry["additions"], entry["deletions"] = found["additions"], found["deletions"]
    return data


async def stripped_for_push(sandbox: Sandbox, base: str, keep_outputs: bool) -> dict[str, str]:
    """The agent's changed notebooks, validated, as a push commits them: ``{path: content}`` of
    those stripping changes. Raises ``NotebookError`` naming the first one that cannot be pushed."""
    raw = await read(sandbox, base, None, old=False)
    if raw.startswith(b'{"notebooks": [], "omitted": 0}'):
        return {}  # no notebook changed: no worker needed
    result = await work("strip", {"keep_outputs": keep_outputs}, raw)
    if "error" in result:
        raise NotebookError(f"Nothing was pushed: {result['error']}")
    return result["files"]


# -- the worker (its own process) ------------------------------------------------------------------
def depth_within(value: Any, limit: int) -> bool:
    """Whether ``value`` nests at most ``limit`` levels (iteratively: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            if level > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return True


def parse(text: str) -> tuple[Any, str | None]:
    """``(notebook as a plain dict, None)`` or ``(None, why it is not read)``; nbformat checks
    are the caller's (a diff shows an invalid notebook by cell; a push refuses it)."""
    try:
        data = json.loads(text)
    except RecursionError:
        return None, f"nested deeper than {MAX_DEPTH} levels"
    except ValueError as exc:
        return None, f"not valid JSON ({exc})"
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        return None, "not a notebook (no list of cells)"
    if not depth_within(data, MAX_DEPTH):
        return None, f"nested deeper than {MAX_DEPTH} levels"
    if len(data["cells"]) > MAX_CELLS:
        return None, f"more than {MAX_CELLS} cells"
    if not all(isinstance(cell, dict) for cell in data["cells"]):
        return None, "not a notebook (a cell is not an object)"
    return data, None


def _sibling(name: str) -> Any:
    """A module beside this file, loaded by path (the worker runs outside the package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _worker() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    sys.setrecursionlimit(4 * MAX_DEPTH + 400)
    # jsonschema (under nbformat) imports this optional IRI checker if present, and it builds a
    # grammar at import: 2.5 of the 3 s of CPU the worker's imports take. Notebook schemas do
    # not check IRIs, so the worker goes without it.
    sys.modules["rfc3987_syntax"] = None  # type: ignore[assignment]
    tasks = {"diff": _sibling("notebook_diff").diff_all, "strip": _sibling("notebook_strip").strip_all}
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = stdin.read(8)
        if len(head) < 8:
            return  # the server closed the pipe
        request = stdin.read(int.from_bytes(head, "big"))
        header, _, body = request.partition(b"\n")
        options = json.loads(header)
        try:
            listing = json.loads(body)
        except (ValueError, RecursionError):  # cut at the exec's max_output: too much in all
            listing = {"notebooks": [], "error": "the notebooks are too large to read"}
        listing = listing if isinstance(listing, dict) else {"notebooks": []}
        answer = json.dumps(tasks[options["task"]](listing, options, parse), ensure_ascii=False).encode()
        stdout.write(len(answer).to_bytes(8, "big") + answer)
        stdout.flush()
        del listing, body, request


if __name__ == "__main__":
    _worker()
