"""Snapshots: what a sandbox's snapshot holds, read and unpacked INSIDE the sandbox.

What a snapshot holds is what a resumed session needs, nothing more: the workspace (the clone with
its branch and uncommitted work), OpenCode's data and state folders (its conversation and its own
undo snapshots) and a consistent copy of its database, so the resumed agent continues the same
conversation. What it never holds: logs, the database's -wal/-shm/-journal files (the copy is
consistent), git lock files (a lock captured mid-operation would come back as a torn lock that
blocks git), devices, FIFOs and sockets, or anything from the process environment (the OpenCode
password and model keys live only there).

Where it runs: this module is standard-library only and is loaded by ``bootstrap.py snapshot`` (a
worker started at the sandbox's first snapshot that serves every later one, ``snapshot_worker.py``)
and ``bootstrap.py restore``, which the provider runs confined like the agent (bubblewrap, a PID
namespace of their own, non-dumpable). The server only streams bytes: the snapshot process writes
a stream (``write_snapshot``: the bytes of the files the previous snapshot does not hold, then a
manifest of every path) into the server's store (``snapshot_store.py``), and the restore process
reads back a tar.gz the store renders (``restore_archive``, which also reads the one-archive
snapshots of the earlier format). So the server never opens, follows or archives a path the
agent can write. (Unconfined sandboxes, isolation "none", run the same code as a separate process; there the
agent has the server user's rights anyway, and the guards below are all that stands in its way.)

Threats handled here (the agent writes these files, and may change them while we read):
- links and special files: every path is walked from an anchor folder the provider made (the
  sandbox root, a mount point the agent cannot replace) one component at a time with
  ``O_NOFOLLOW``; a symlinked folder anywhere below is archived as the link it is, never
  followed; a part whose own path crosses a link is left out; files are read through the
  descriptor that was checked (``fstat``), so a file swapped for a link or a FIFO mid-walk is
  never read through and never blocks (``O_NONBLOCK``);
- the database: read with SQLite's backup API (consistent while OpenCode writes), only after the
  same component walk; a race that swaps it for a link can only reach what the sandbox can see;
- restore: members are written relative to directory descriptors, created with ``O_EXCL |
  O_NOFOLLOW`` (never through a link, never outside the destination; ``..``, absolute names,
  devices and unknown types are refused), links may point anywhere (they are only links in the
  sandbox's view, which is what venvs need), hard links must name an already restored file;
- the cache of the previous snapshot (path -> size, mtime, ctime, inode, device, digest): a file
  is reused only when ``lstat`` shows all five unchanged, and is then not even opened (a swap
  after the look makes it read nothing); anything else (a link, a FIFO, a lookalike with the same
  size and mtime but a new inode or ctime) is looked at anew as above, and the bytes sent are
  exactly those hashed (``_Exactly``), whatever the file does meanwhile;
- what a restore reports of the files it wrote (``identities``, so that the next snapshot need
  not read them): said by a process in the sandbox, so the store checks it and uses it only for
  files of the restored snapshot, of their size (``SnapshotStore.remember_restore``);
- a torn or corrupt archive: gzip's CRC and length are checked to the end of the stream before
  anything is moved into place;
- half-restored workspaces: extraction goes into a staging folder; only a complete, verified
  archive is moved into place, the workspace last (its presence is what makes the next start
  reuse it); any failure removes the staging folder and leaves nothing new in place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import sqlite3
import stat
import struct
import time
from typing import IO, TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    import tarfile

WORKSPACE = "workspace"
AGENT_DATA = "home/.local/share/opencode"
AGENT_STATE = "home/.local/state/opencode"
DATABASE = "opencode.db"

#: Names never archived under the agent's data (the database goes in as a consistent copy).
SKIPPED_DATA = {"log", DATABASE, f"{DATABASE}-wal", f"{DATABASE}-shm", f"{DATABASE}-journal"}

#: Folder beside the workspace where a restore is unpacked before it is moved into place.
STAGING = ".tabbi-restore"

CHUNK = 1 << 20
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SnapshotError(Exception):
    """The snapshot could not be made or restored; the message says why."""


def parts(workspace: str, home: str) -> list[tuple[str, str, list[str]]]:
    """``(archive name, anchor folder, components below it)`` of each part, the workspace LAST
    (restore moves it last). The anchor is made by the provider and is not the agent's to
    replace; every component below it is."""
    home_anchor, home_name = os.path.split(os.path.normpath(home))
    ws_anchor, ws_name = os.path.split(os.path.normpath(workspace))
    return [
        (AGENT_DATA, home_anchor, [home_name, ".local", "share", "opencode"]),
        (AGENT_STATE, home_anchor, [home_name, ".local", "state", "opencode"]),
        (WORKSPACE, ws_anchor, [ws_name]),
    ]


# -- walking without following links ------------------------------------------------------------
def open_dirs(anchor_fd: int, components: list[str], create: bool = False) -> int | None:
    """A descriptor of the folder ``components`` below ``anchor_fd``, every step opened with
    ``O_NOFOLLOW`` (a link, a non-folder or a missing folder on the way gives None); ``create``
    makes missing folders. The caller closes it."""
    fd = os.dup(anchor_fd)
    try:
        for name in components:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=fd)
            following = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = following
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
            return None
        raise
    return fd


def remove_tree(parent_fd: int, name: str) -> None:
    """Remove ``name`` below ``parent_fd`` and everything in it, never following a link, making
    read-only folders writable on the way (their owner may always do that)."""
    try:
        info = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(name, dir_fd=parent_fd)
        return
    fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    try:
        os.fchmod(fd, 0o700)
        for entry in os.listdir(fd):
            remove_tree(fd, entry)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def _is_git_lock(arcname: str) -> bool:
    return arcname.endswith(".lock") and "/.git/" in f"/{arcname}"


class _Exactly:
    """Reads exactly ``size`` bytes of a file that may change meanwhile: what is missing (it
    shrank) reads as zeros, so the stream stays well formed."""

    def __init__(self, fd: int, size: int):
        self.fd, self.left = fd, size

    def read(self, n: int) -> bytes:
        n = min(n, self.left)
        data = os.read(self.fd, n) if n else b""
        data += b"\0" * (n - len(data))
        self.left -= n
        return data


# -- writing -------------------------------------------------------------------------------------
#: The snapshot stream (format 2): ``STREAM_MAGIC``, then records of ``RECORD`` (a tag and a
#: length): ``FILE`` records carry a file's bytes followed by their SHA-256 digest (32 bytes, not
#: counted in the length); the one ``MANIFEST`` record, last, carries the manifest (JSON).
STREAM_MAGIC = b"tabbi-snapshot-stream 2\n"
RECORD = struct.Struct(">cQ")
FILE, MANIFEST = b"F", b"M"
FORMAT = 2

#: The manifest's kinds of entry: ``[path, kind, mode, mtime, ...]`` with, after those four, a
#: folder nothing; a file ``size, sha256, mtime_ns, ctime_ns, inode, device`` (the last four None
#: for the database's copy); a link its target; a hard link the path of the file it shares.
DIR, REG, SYMLINK, HARDLINK = "d", "f", "l", "h"


class _Walker:
    """Walks the parts and writes the stream: a file's bytes are sent only when the previous
    snapshot's manifest (``cache``: path -> ``[size, mtime_ns, ctime_ns, inode, device, sha256]``,
    as the server has it) does not describe the very same file; otherwise its digest is reused."""

    def __init__(self, out: IO[bytes], cache: dict[str, list]):
        self.out = out
        self.cache = cache
        self.entries: list[list] = []
        self.seen: dict[tuple[int, int], str] = {}  # hard links: (dev, inode) -> first name
        self.sent = 0

    def add_tree(self, dir_fd: int, arcname: str) -> None:
        st = os.fstat(dir_fd)
        self.entries.append([arcname, DIR, stat.S_IMODE(st.st_mode), int(st.st_mtime)])
        agent_data = arcname.startswith(AGENT_DATA)
        for name in sorted(os.listdir(dir_fd)):
            child = f"{arcname}/{name}"
            if (agent_data and name in SKIPPED_DATA) or _is_git_lock(child):
                continue
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile: nothing to keep
                self.add_entry(dir_fd, name, child)

    def add_entry(self, dir_fd: int, name: str, arcname: str) -> None:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(name, dir_fd=dir_fd)
            except OSError:
                return  # swapped for a file (EINVAL) or removed meanwhile
            self.entries.append([arcname, SYMLINK, stat.S_IMODE(st.st_mode), int(st.st_mtime), target])
        elif stat.S_ISDIR(st.st_mode):
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
            except OSError:
                return  # swapped for something else meanwhile
            try:
                self.add_tree(fd, arcname)
            finally:
                os.close(fd)
        elif stat.S_ISREG(st.st_mode):
            if self.listed(arcname, st, cacheable=True):
                return  # known from the cache or a hard link: nothing to read, so not even opened
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError:
                return  # swapped for a link (ELOOP) or removed meanwhile
            try:
                self.add_file(fd, arcname, cacheable=True)
            finally:
                os.close(fd)
        # devices, FIFOs and sockets are never archived

    def listed(self, arcname: str, st: os.stat_result, cacheable: bool) -> bool:
        """List a file without reading it if it is a hard link to one listed already, or the
        very file the cache describes (same size, mtime, ctime, inode and device); False if its
        bytes must be read."""
        mode, mtime, key = stat.S_IMODE(st.st_mode), int(st.st_mtime), (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.seen:
            self.entries.append([arcname, HARDLINK, mode, mtime, self.seen[key]])
            return True
        identity = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
        cached = self.cache.get(arcname) if cacheable else None
        if cached is None or cached[:5] != identity:
            return False
        if st.st_nlink > 1:
            self.seen[key] = arcname
        self.entries.append([arcname, REG, mode, mtime, st.st_size, cached[5], *identity[1:]])
        return True

    def add_file(self, fd: int, arcname: str, cacheable: bool) -> None:
        """Send the bytes of the file open at ``fd`` (checked again: what was opened, not what
        was looked at) and list it."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or self.listed(arcname, st, cacheable):
            return
        if st.st_nlink > 1:
            self.seen[(st.st_dev, st.st_ino)] = arcname
        digest = self.send(_Exactly(fd, st.st_size), st.st_size)
        identity = [st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev] if cacheable else [None] * 4
        self.entries.append([arcname, REG, stat.S_IMODE(st.st_mode), int(st.st_mtime), st.st_size, digest,
                             *identity])

    def add_copy(self, arcname: str, data: bytes, mode: int, mtime: int) -> None:
        """Send and list a copy made here (the database's): nothing the cache can describe."""
        digest = self.send(io.BytesIO(data), len(data))
        self.entries.append([arcname, REG, mode, mtime, len(data), digest, None, None, None, None])

    def send(self, source: _Exactly | io.BytesIO, size: int) -> str:
        """Stream ``size`` bytes read from ``source`` (which gives exactly that many) as a
        ``FILE`` record; their SHA-256 (of exactly what was sent, whatever the file did meanwhile)."""
        self.out.write(RECORD.pack(FILE, size))
        digest, left = hashlib.sha256(), size
        while left:
            data = source.read(min(CHUNK, left))
            if not data:
                raise SnapshotError("a copy ended before its size")
            digest.update(data)
            self.out.write(data)
            left -= len(data)
        self.out.write(digest.digest())
        self.sent += 1
        return digest.hexdigest()


def _database_copy(data_fd: int) -> tuple[bytes, int] | None:
    """A consistent copy of OpenCode's database (the backup API reads through SQLite's own
    locking and WAL, unlike copying the files) and the database's mode, or None when there is
    none. The copy is made in memory and taken as the image of a database file: a copy on disk
    cost a journal and an fsync at every snapshot. The folder was reached without following a
    link; the database itself must be a regular file."""
    try:
        st = os.stat(DATABASE, dir_fd=data_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise SnapshotError(f"{DATABASE} is not a regular file; refusing to read it")
    source = f"/proc/self/fd/{data_fd}/{DATABASE}"
    with contextlib.closing(sqlite3.connect(f"file:{quote(source)}?mode=ro", uri=True, timeout=10)) as src, \
            contextlib.closing(sqlite3.connect(":memory:")) as dst:
        src.backup(dst)
        return dst.serialize(), stat.S_IMODE(st.st_mode)


def write_snapshot(workspace: str, home: str, previous: IO[bytes], out: IO[bytes]) -> int:
    """Write the snapshot stream of the sandbox (its ``workspace`` and ``home``) to ``out``,
    sending the bytes of only the files that ``previous`` (the server's cache of the previous
    snapshot, JSON; empty for none) does not describe; return the number of entries. Raises
    ``SnapshotError``."""
    try:
        text = previous.read()
        cache = json.loads(text)["files"] if text.strip() else {}
        if not isinstance(cache, dict):
            raise ValueError("the cache is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"the previous snapshot's cache is unreadable: {exc}") from exc
    taken = time.time_ns()
    try:
        out.write(STREAM_MAGIC)
        walker = _Walker(out, cache)
        for arcname, anchor, components in parts(workspace, home):
            anchor_fd = os.open(anchor, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fd = open_dirs(anchor_fd, components)
            finally:
                os.close(anchor_fd)
            if fd is None:
                continue  # missing, or reached only through a link: not archived
            try:
                walker.add_tree(fd, arcname)
                database = _database_copy(fd) if arcname == AGENT_DATA else None
            finally:
                os.close(fd)
            if database is not None:
                walker.add_copy(f"{AGENT_DATA}/{DATABASE}", database[0], database[1], taken // 10**9)
        manifest = json.dumps({"format": FORMAT, "taken_ns": taken, "entries": walker.entries},
                              separators=(",", ":")).encode()
        out.write(RECORD.pack(MANIFEST, len(manifest)))
        out.write(manifest)
        out.flush()
    except (OSError, sqlite3.Error) as exc:
        raise SnapshotError(f"the snapshot could not be written: {exc}") from exc
    return len(walker.entries)


# -- restoring -----------------------------------------------------------------------------------
def checked_name(name: str) -> list[str]:
    pieces = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in pieces):
        raise SnapshotError(f"the archive holds a path that is not allowed: {name!r}")
    if not any(name == part or name.startswith(part + "/") or part.startswith(name + "/")
               for part in (WORKSPACE, AGENT_DATA, AGENT_STATE)):
        raise SnapshotError(f"the archive holds a path outside the sandbox's parts: {name!r}")
    return pieces


class _Unpacker:
    """Writes members below a staging folder, through directory descriptors only."""

    def __init__(self, staging_fd: int):
        self.staging_fd = staging_fd
        #: path -> [size, mtime_ns, ctime_ns, inode, device] of each file as written.
        self.identities: dict[str, list[int]] = {}
        self.dirs: list[tuple[list[str], int, int]] = []  # folder, mode, mtime: applied at the end
        self._parent: tuple[tuple[str, ...], int] | None = None

    def parent(self, pieces: list[str]) -> int:
        key = tuple(pieces)
        if self._parent is not None and self._parent[0] == key:
            return self._parent[1]
        self.close()
        fd = open_dirs(self.staging_fd, pieces, create=True)
        if fd is None:
            raise SnapshotError(f"the archive writes through a link or a file: {'/'.join(pieces)}")
        self._parent = (key, fd)
        return fd

    def close(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        pieces = checked_name(member.name)
        parent, name = self.parent(pieces[:-1]), pieces[-1]
        mode = member.mode & 0o777
        if member.isdir():
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent)
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)  # a folder, not a link
            os.close(fd)
            self.dirs.append((pieces, mode, member.mtime))
        elif member.isreg():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=parent)
            try:
                source = tar.extractfile(member)
                assert source is not None
                left = member.size
                while left:
                    data = source.read(min(CHUNK, left))
                    if not data:
                        raise SnapshotError(f"the archive ends inside {member.name}")
                    os.write(fd, data)
                    left -= len(data)
                os.fchmod(fd, mode)
                os.utime(fd, (member.mtime, member.mtime))
                st = os.fstat(fd)
                self.identities[member.name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                                                st.st_dev]
            finally:
                os.close(fd)
        elif member.issym():
            os.symlink(member.linkname, name, dir_fd=parent)
            with contextlib.suppress(OSError):
                os.utime(name, (member.mtime, member.mtime), dir_fd=parent, follow_symlinks=False)
        elif member.islnk():
            target = checked_name(member.linkname)
            source_dir = open_dirs(self.staging_fd, target[:-1])
            if source_dir is None:
                raise SnapshotError(f"the hard link {member.name} names no restored file")
            try:
                st = os.stat(target[-1], dir_fd=source_dir, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    raise SnapshotError(f"the hard link {member.name} names no restored file")
                os.link(target[-1], name, src_dir_fd=source_dir, dst_dir_fd=parent, follow_symlinks=False)
                self.identities.pop(member.linkname, None)  # a new link changed its ctime
            finally:
                os.close(source_dir)
        else:
            raise SnapshotError(f"the archive holds an unsupported member: {member.name}")

    def apply_modes(self, part_roots: set[tuple[str, ...]]) -> None:
        """Folder modes and times, deepest first (a read-only folder is filled before it is
        closed), except for the parts' own roots, which are set once moved into place."""
        for pieces, mode, mtime in sorted(self.dirs, key=lambda d: -len(d[0])):
            if tuple(pieces) in part_roots:
                continue
            fd = open_dirs(self.staging_fd, pieces)
            if fd is None:
                raise SnapshotError(f"{'/'.join(pieces)} changed during the restore")
            try:
                os.fchmod(fd, mode)
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)


def restore_archive(source: IO[bytes], workspace: str, home: str,
                    identities: dict[str, list[int]] | None = None) -> int:
    """Unpack the archive read from ``source`` into the sandbox; return the number of members.
    ``identities`` (if given) receives each restored file's ``[size, mtime_ns, ctime_ns, inode,
    device]`` as it is in place, so that the next snapshot need not read it again; it returns
    only once the file system's clock has moved past them (``_past``).

    All or nothing: unpacked into ``<beside the workspace>/.tabbi-restore``, verified to the end
    of the stream, then each part replaces what is in place (the workspace last). On failure
    the staging folder is removed and the parts in place are left as they were (a failure while
    moving, which needs a failing disk, leaves no workspace, so the next start restores again).
    Raises ``SnapshotError``."""
    import gzip  # here, not at the top: a snapshot (run at every turn) needs neither
    import tarfile

    layout = parts(workspace, home)
    anchor = layout[-1][1]
    anchor_fd = os.open(anchor, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    count = 0
    try:
        remove_tree(anchor_fd, STAGING)  # left by a restore that was killed
        os.mkdir(STAGING, 0o700, dir_fd=anchor_fd)
        staging_fd = os.open(STAGING, DIR_FLAGS, dir_fd=anchor_fd)
        try:
            unpacker = _Unpacker(staging_fd)
            try:
                with gzip.GzipFile(fileobj=source, mode="rb") as gz:
                    with tarfile.open(fileobj=gz, mode="r|") as tar:
                        for member in tar:
                            unpacker.add(tar, member)
                            count += 1
                    while gz.read(CHUNK):  # to the end: gzip checks its CRC and length there
                        pass
            finally:
                unpacker.close()
            roots = {tuple(arcname.split("/")) for arcname, _, _ in layout}
            unpacker.apply_modes(roots)
            _move_into_place(staging_fd, layout, {tuple(p): (m, t) for p, m, t in unpacker.dirs})
        finally:
            os.close(staging_fd)
        remove_tree(anchor_fd, STAGING)
        if identities is not None and _past(max((i[2] for i in unpacker.identities.values()), default=0)):
            identities.update(unpacker.identities)
    except (OSError, EOFError, tarfile.TarError, SnapshotError, ValueError) as exc:
        with contextlib.suppress(OSError):
            remove_tree(anchor_fd, STAGING)
        if isinstance(exc, SnapshotError):
            raise
        raise SnapshotError(f"the snapshot could not be restored: {exc}") from exc
    finally:
        os.close(anchor_fd)
    return count


#: The clock file systems stamp files with (``CLOCK_REALTIME_COARSE`` on Linux).
COARSE_CLOCK = getattr(time, "CLOCK_REALTIME_COARSE", 5)


def _past(ctime_ns: int) -> bool:
    """Wait (one clock tick, a few ms) until a file changed from now on gets a ctime later than
    ``ctime_ns``: then a restored file the agent changes, even at once and to the same size and
    mtime, never looks like the one restored. False if the clock does not get there soon (a
    file system stamping from another clock): its identities are then not to be trusted."""
    deadline = time.monotonic() + 0.2
    while time.clock_gettime_ns(COARSE_CLOCK) <= ctime_ns:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def _move_into_place(staging_fd: int, layout: list[tuple[str, str, list[str]]],
                     modes: dict[tuple[str, ...], tuple[int, int]]) -> None:
    """Replace each part in place by its staged copy (what is in place goes into the staging
    folder, removed with it), the workspace last."""
    for index, (arcname, anchor, components) in enumerate(layout):
        pieces = arcname.split("/")
        staged_parent = open_dirs(staging_fd, pieces[:-1])
        anchor_fd = os.open(anchor, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            target_parent = open_dirs(anchor_fd, components[:-1], create=True)
        finally:
            os.close(anchor_fd)
        if target_parent is None:
            raise SnapshotError(f"cannot restore {arcname}: its folder is a link or a file")
        try:
            name = components[-1]
            with contextlib.suppress(OSError):  # a read-only folder moves only once writable
                fd = os.open(name, DIR_FLAGS, dir_fd=target_parent)
                os.fchmod(fd, 0o700)
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.rename(name, f"replaced-{index}", src_dir_fd=target_parent, dst_dir_fd=staging_fd)
            if staged_parent is None:
                continue  # not in the snapshot: nothing in place either
            try:
                os.rename(pieces[-1], name, src_dir_fd=staged_parent, dst_dir_fd=target_parent)
            except FileNotFoundError:
                continue
            if tuple(pieces) in modes:
                mode, mtime = modes[tuple(pieces)]
                fd = os.open(name, DIR_FLAGS, dir_fd=target_parent)
                try:
                    os.fchmod(fd, mode)
                    os.utime(fd, (mtime, mtime))
                finally:
                    os.close(fd)
        finally:
            os.close(target_parent)
            if staged_parent is not None:
                os.close(staged_parent)
