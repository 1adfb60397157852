"""A stored snapshot as the archive a restore unpacks, for tests that look inside snapshots.

A snapshot is a manifest (``<name>.snapshot``) naming blobs in its sandbox's store; the restore
is fed the tar.gz the store renders of it. Tests that check what a snapshot holds read that
archive, the same bytes a restore reads. A format-1 snapshot (``<name>.tar.gz``) is its own
archive.
"""

from __future__ import annotations

import io
import os
import tarfile
import threading
from pathlib import Path

from tabbi_sandbox.snapshot_store import ARCHIVE_SUFFIX, MANIFEST_SUFFIX, SnapshotStore


def archive_bytes(path: Path) -> bytes:
    """The tar.gz bytes of the snapshot stored at ``path`` (a manifest or a format-1 archive)."""
    if path.name.endswith(ARCHIVE_SUFFIX):
        return path.read_bytes()
    store = SnapshotStore(path.parent)
    manifest = store.check(path.name[: -len(MANIFEST_SUFFIX)])
    read_end, write_end = os.pipe()
    renderer = threading.Thread(target=store.render, args=(manifest, write_end))
    renderer.start()
    with os.fdopen(read_end, "rb") as source:
        data = source.read()
    renderer.join()
    return data


def open_archive(path: Path) -> tarfile.TarFile:
    return tarfile.open(fileobj=io.BytesIO(archive_bytes(path)))
