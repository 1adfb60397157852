"""Local snapshots: a sandbox's state as one compressed archive, and back.

What a snapshot holds is what a resumed session needs, nothing more: the workspace (the clone with
its branch and uncommitted work) and OpenCode's data (its conversation database and its own
undo snapshots), so the resumed agent continues the same conversation. What it never holds: logs,
caches, temporary files, the generated config folder, or anything from the process environment
(the OpenCode password and model keys live only there).

Threats handled here:
- the sandbox's files are written by the agent: archiving never follows symlinks, the database copy
  refuses a symlinked file, and extraction uses tarfile's "data" filter (no absolute paths, no
  ``..``, no links pointing out, no device files);
- a crash mid-snapshot: the archive is written under a temporary name and renamed when complete, so
  the last good snapshot is never replaced by a partial one.
"""

from __future__ import annotations

import os
import sqlite3
import tarfile
import tempfile
from contextlib import closing
from pathlib import Path

WORKSPACE = "workspace"
AGENT_DATA = "home/.local/share/opencode"
AGENT_STATE = "home/.local/state/opencode"
DATABASE = "opencode.db"

#: Names never archived, wherever they appear under the agent's data.
SKIPPED = {"log", f"{DATABASE}-wal", f"{DATABASE}-shm", f"{DATABASE}-journal"}


class SnapshotError(Exception):
    """The snapshot could not be made or restored; the message says why."""


def _skip(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    name = Path(info.name)
    if str(name).startswith(AGENT_DATA) and (name.name in SKIPPED or name.name == DATABASE):
        return None  # the database goes in as a consistent copy, see _copy_database
    if info.isdev() or info.isfifo():
        return None
    return info


def _copy_database(source: Path, folder: str) -> Path | None:
    """A consistent copy of OpenCode's SQLite database, even while OpenCode writes to it (the
    backup API reads through SQLite's own locking and WAL, unlike copying the files)."""
    if not source.exists() and not source.is_symlink():
        return None
    if source.is_symlink() or not source.is_file():
        raise SnapshotError(f"{source.name} is not a regular file; refusing to read it")
    copy = Path(folder) / DATABASE
    with closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=10)) as src, \
            closing(sqlite3.connect(copy)) as dst:
        src.backup(dst)
    return copy


def make_archive(root: Path, destination: Path, compresslevel: int = 3) -> int:
    """Write the snapshot of the sandbox at ``root`` to ``destination``; return its size."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".partial")
    try:
        with tempfile.TemporaryDirectory(prefix="tabbi-snap-") as scratch:
            database = _copy_database(root / AGENT_DATA / DATABASE, scratch)
            with tarfile.open(partial, "w:gz", compresslevel=compresslevel) as tar:
                for part in (WORKSPACE, AGENT_DATA, AGENT_STATE):
                    if (root / part).is_dir() and not (root / part).is_symlink():
                        tar.add(root / part, arcname=part, filter=_skip)
                if database is not None:
                    tar.add(database, arcname=f"{AGENT_DATA}/{DATABASE}")
        os.replace(partial, destination)
    except (OSError, sqlite3.Error, tarfile.TarError) as exc:
        partial.unlink(missing_ok=True)
        raise SnapshotError(f"the snapshot could not be written: {exc}") from exc
    return destination.stat().st_size


def restore_archive(archive: Path, root: Path) -> None:
    """Unpack a snapshot into an empty sandbox folder."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(root, filter="data")
    except (OSError, tarfile.TarError) as exc:
        raise SnapshotError(f"the snapshot {archive.name} could not be restored: {exc}") from exc
