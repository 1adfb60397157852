"""An execute-only copy of the OpenCode binary, so that OpenCode runs non-dumpable.

Threat: the agent's tools run as OpenCode's own user, so they could read
``/proc/<opencode>/environ`` (its server password, its gateway token) or its memory. Linux marks
a process non-dumpable when it executes a file its user may not read, and then refuses its
``environ``, ``mem``, ``maps``, ``fd`` and ptrace to every process without ``CAP_SYS_PTRACE`` --
which is every process in a bubblewrap sandbox (``--cap-drop ALL``), the agent's included.
OpenCode's standalone (Bun) binary runs execute-only (measured with 1.18.33).

The copy is made once per binary version, beside the install (``node_modules/opencode-ai/``,
the server user's own) or else in the server user's cache, never inside a sandbox; sandboxes
bind its folder read-only. A binary that is a script (its interpreter must read it) is used as
it is, and so is the binary when no copy can be written (said once in the log).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

EXECUTE_ONLY = 0o111

_warned = False


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tabbi" / "opencode"


def execute_only(binary: str, roots: list[Path] | None = None) -> str:
    """The path of an execute-only copy of ``binary`` (made once per version), or ``binary``
    itself when it is a script or no copy can be made. Blocking (a copy of ~185 MB the first
    time): run it off the event loop."""
    global _warned
    with open(binary, "rb") as f:
        if f.read(2) == b"#!":
            return binary
    stat = os.stat(binary)
    key = hashlib.sha256(f"{os.path.realpath(binary)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    name = f".tabbi-execute-only-{key.hexdigest()[:16]}"
    for root in roots or [Path(binary).parent.parent, cache_root()]:
        target = root / name / os.path.basename(binary)
        try:
            return _copy(binary, target, stat.st_size)
        except OSError as exc:
            reason = exc
    if not _warned:
        log.warning("tabbi: no execute-only copy of %s could be made (%s): OpenCode's environment "
                    "is readable by its tools", binary, reason)
        _warned = True
    return binary


def _copy(binary: str, target: Path, size: int) -> str:
    try:
        done = os.stat(target, follow_symlinks=False)
        if done.st_size == size and done.st_mode & 0o7777 == EXECUTE_ONLY:
            return str(target)
    except FileNotFoundError:
        pass
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as out, open(binary, "rb") as source:
            shutil.copyfileobj(source, out, 1 << 20)
        os.chmod(partial, EXECUTE_ONLY)
        os.replace(partial, target)  # whole or not at all, also against a concurrent server
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return str(target)
