"""The server's snapshot store: file contents kept once, by their SHA-256, and one manifest per
snapshot, so that a snapshot costs in proportion to what changed since the previous one.

Why this shape: a snapshot after every turn used to archive the whole workspace (seconds for a
100 MB one), though a turn changes a few files. Here each sandbox's folder
(``<snapshot_root>/<sandbox id>/``) holds ``objects/<ab>/<sha256>`` (a file's bytes, as they
are) and ``<name>.snapshot`` (the manifest: every path with its kind, mode, mtime and, for a
file, its size and digest). The snapshot process in the sandbox is given the previous manifest's
cache and sends only files whose (size, mtime, ctime, inode, device) differ from it; everything
else is reused by digest. Restores stream the manifest back as the archive format the restore
process has always unpacked (tar in gzip, stored uncompressed), so every guard of the restore
side (``snapshots.py``) applies unchanged. Snapshots of the earlier format (``<name>.tar.gz``)
are still restored as they are.

What the store trusts and checks (the stream comes from a process in the agent's sandbox):
- a blob is named by the digest the server computes of the bytes it received, and must match the
  digest the stream sends after them; a manifest is committed only when it is well formed (kinds,
  modes, sizes, names the restore would accept, digests of 64 hex digits, so a digest never
  names a path) and every file it names is in the store with its size;
- a manifest is stored with the digest of its own text on its first line: a damaged one is never
  used, not to restore and not as the cache of the next snapshot (which then reads everything);
- a restore checks every blob is there before it starts, and the digest of each blob as it
  streams it: a corrupt blob ends the stream without gzip's trailer, so the restore process puts
  nothing in place, and the error names the file;
- a file changed within ``RACY_NS`` of the snapshot that read it is not trusted to the cache (its
  timestamps may not have moved on a second change within the same clock tick): read again;
- after a restore, the identities the restore process reports of the files it wrote stand in
  for the manifest's (whose inodes are gone) for that snapshot only, and only for paths it holds
  as files of that size (``remember_restore``);
- blobs are written sparse (runs of zeros are holes), so a huge sparse file costs no disk here;
- reclaiming is mark and sweep under an exclusive ``flock`` of ``.lock``; a snapshot being
  written or restored holds it shared, so no blob it relies on goes away under it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gzip
import hashlib
import json
import os
import re
import secrets
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import snapshots
from .snapshots import DIR, FORMAT, HARDLINK, MANIFEST, RECORD, REG, STREAM_MAGIC, SYMLINK

MANIFEST_SUFFIX = ".snapshot"
ARCHIVE_SUFFIX = ".tar.gz"  # format 1: one archive per snapshot
OBJECTS = "objects"
LOCK = ".lock"
PARTIAL = ".partial"
#: The identities of the files the last restore wrote (``remember_restore``).
RESTORED = "restored.json"
HEADER_PREFIX = b"tabbi-snapshot 2 "
#: A file whose ctime is this close to the start of the snapshot that read it is read again next time.
RACY_NS = 1_000_000_000
#: The largest manifest accepted from a snapshot process (about a million paths).
MAX_MANIFEST = 256 << 20
#: Blobs of a snapshot flushed one by one up to this many; more are flushed with one syncfs.
FSYNC_EACH = 32
CHUNK = snapshots.CHUNK
DIGEST = re.compile(r"[0-9a-f]{64}")
ZEROS = bytes(CHUNK)
NAME = re.compile(r"[A-Za-z0-9-]+")


class StoreError(Exception):
    """The store refused a stream, or holds a damaged snapshot; the message says which and why."""


def _int(value: Any, low: int = 0, high: int = 1 << 63) -> bool:
    return type(value) is int and low <= value < high


def check_entry(entry: Any) -> None:
    """Refuse a manifest entry that is not what ``snapshots.write_snapshot`` writes (the restore
    checks names again, but a digest is a file name here: it must be 64 hex digits)."""
    if not (isinstance(entry, list) and len(entry) >= 4 and isinstance(entry[0], str)
            and entry[1] in (DIR, REG, SYMLINK, HARDLINK) and _int(entry[2], 0, 0o10000)
            and _int(entry[3], -(1 << 62), 1 << 62)):
        raise StoreError(f"a manifest entry is malformed: {str(entry)[:200]!r}")
    try:
        snapshots.checked_name(entry[0])
        kind = entry[1]
        if kind == REG:
            size, digest, *identity = entry[4:] if len(entry) == 10 else (None, None)
            ok = (_int(size) and isinstance(digest, str) and DIGEST.fullmatch(digest) is not None
                  and len(identity) == 4 and all(v is None or _int(v, -(1 << 63)) for v in identity))
        elif kind in (SYMLINK, HARDLINK):
            ok = len(entry) == 5 and isinstance(entry[4], str) and "\0" not in entry[4]
            if ok and kind == HARDLINK:
                snapshots.checked_name(entry[4])
        else:
            ok = len(entry) == 4
    except snapshots.SnapshotError as exc:
        raise StoreError(str(exc)) from None
    if not ok:
        raise StoreError(f"a manifest entry is malformed: {str(entry)[:200]!r}")


def _read_exactly(fd: int, size: int) -> bytes:
    parts, left = [], size
    while left:
        data = os.read(fd, min(left, CHUNK))
        if not data:
            raise StoreError("the snapshot stream ended early")
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


def _read_signed(path: Path, what: str) -> Any:
    """The JSON of a file ``_write_signed`` wrote, its digest checked. Raises ``StoreError``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise StoreError(f"{what} cannot be read: {exc.strerror}") from None
    header, _, body = data.partition(b"\n")
    if not header.startswith(HEADER_PREFIX) or \
            header[len(HEADER_PREFIX):].decode(errors="replace") != hashlib.sha256(body).hexdigest():
        raise StoreError(f"{what} is damaged: its manifest does not match its digest")
    try:
        return json.loads(body)
    except ValueError:
        raise StoreError(f"{what} is damaged: its manifest is not JSON") from None


def _write_signed(path: Path, value: Any, durable: bool) -> int:
    """Write ``value`` as JSON under the digest of its text (a torn or damaged file is never
    used), atomically; flushed to disk and its folder too if ``durable``. Its size."""
    body = json.dumps(value, separators=(",", ":")).encode()
    data = HEADER_PREFIX + hashlib.sha256(body).hexdigest().encode() + b"\n" + body
    partial = path.with_name(path.name + PARTIAL)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)
    if durable:
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return len(data)


def _syncfs(fd: int) -> None:
    """Flush the file system holding ``fd`` (one call for many new blobs, where an fsync each
    costs milliseconds apiece)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        os.sync()


class StoreLock:
    """An ``flock`` of the store's ``.lock`` (blocking; take it in a thread off the event loop)."""

    def __init__(self, folder: Path, exclusive: bool):
        self.folder, self.exclusive = folder, exclusive
        self.fd: int | None = None

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Pending:
    """A received snapshot not yet committed: its manifest, the digests of the files the stream
    carried (the others were reused) and the blobs that were new to the store."""

    def __init__(self, manifest: dict[str, Any], received: list[str], new_blobs: list[Path],
                 bytes_written: int):
        self.manifest = manifest
        self.received = received
        self.new_blobs = new_blobs
        self.bytes_written = bytes_written


class SnapshotStore:
    """The snapshots of one sandbox: ``folder`` is server-only (never bound into a sandbox)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.objects = folder / OBJECTS
        self._objects_prefix = f"{self.objects}/"  # blob paths as text: pathlib per blob was most of a cache
        #: The blobs ``cache`` offered (digest -> size), checked there: under the same hold of the
        #: lock, the stream's manifest naming them needs no second look.
        self._offered: dict[str, int] = {}

    # -- names and locking -----------------------------------------------------------------------
    def manifest_path(self, name: str) -> Path:
        if not NAME.fullmatch(name):
            raise StoreError(f"invalid snapshot name {name!r}")
        return self.folder / f"{name}{MANIFEST_SUFFIX}"

    def archive_path(self, name: str) -> Path:
        """Where a format-1 snapshot (one tar.gz) of this name is."""
        self.manifest_path(name)  # the same names
        return self.folder / f"{name}{ARCHIVE_SUFFIX}"

    def blob_path(self, digest: str) -> Path:
        if not DIGEST.fullmatch(digest):
            raise StoreError(f"invalid digest {digest!r}")
        return self.objects / digest[:2] / digest

    def lock(self, exclusive: bool = False) -> StoreLock:
        """Shared while a snapshot is written or restored, exclusive while blobs are reclaimed."""
        return StoreLock(self.folder, exclusive)

    @contextlib.contextmanager
    def locked(self, exclusive: bool = False) -> Iterator[None]:
        lock = self.lock(exclusive)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def names(self) -> list[str]:
        """The snapshots held, of either format."""
        if not self.folder.is_dir():
            return []
        return sorted(p.name[: -len(suffix)] for p in self.folder.iterdir()
                      for suffix in (MANIFEST_SUFFIX, ARCHIVE_SUFFIX) if p.name.endswith(suffix))

    # -- manifests -------------------------------------------------------------------------------
    def load(self, name: str) -> dict[str, Any]:
        """The manifest of ``name``, its digest checked. Raises ``StoreError``."""
        return _read_signed(self.manifest_path(name), f"the snapshot {name}")

    def _write_manifest(self, name: str, manifest: dict[str, Any]) -> int:
        return _write_signed(self.manifest_path(name), manifest, durable=True)

    def _latest(self) -> tuple[str, dict[str, Any]] | None:
        """The newest readable manifest (by when it was stored) and its name, or None."""
        if not self.folder.is_dir():
            return None
        found = []
        for path in self.folder.iterdir():
            if path.name.endswith(MANIFEST_SUFFIX):
                with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                    found.append((path.stat().st_mtime_ns, path.name))
        found.sort()
        for _, file_name in reversed(found):
            name = file_name[: -len(MANIFEST_SUFFIX)]
            with contextlib.suppress(StoreError):
                return name, self.load(name)
        return None

    def cache(self) -> bytes:
        """What the snapshot process may reuse: the newest manifest's files (path -> size,
        mtime_ns, ctime_ns, inode, device, digest) whose blob is here with its size and which
        had not changed within ``RACY_NS`` of that snapshot; if that snapshot was restored since
        (``remember_restore``), its files as restored instead. Call with the lock held."""
        latest = self._latest()
        files: dict[str, list] = {}
        if latest is not None:
            name, manifest = latest
            restored = self._restored(name)
            limit = manifest.get("taken_ns", 0) - RACY_NS
            for entry in manifest.get("entries", []):
                if entry[1] != REG:
                    continue
                identity = restored.get(entry[0]) if restored is not None else entry[4:5] + entry[6:10]
                if identity is None or identity[0] != entry[4] or identity[2] is None or \
                        (restored is None and identity[2] >= limit) or not self._has_blob(entry[5], entry[4]):
                    continue
                files[entry[0]] = [*identity, entry[5]]
        self._offered = {f[5]: f[0] for f in files.values()}
        return json.dumps({"files": files}, separators=(",", ":")).encode()

    # -- restores: what the next snapshot need not read ----------------------------------------------
    def remember_restore(self, name: str, identities: Any) -> int:
        """Keep the identities (path -> ``[size, mtime_ns, ctime_ns, inode, device]``) of the
        files the restore process wrote for snapshot ``name``, so that the first snapshot after
        a resume reads only what changed since, not every file (a restore makes new inodes, so
        the manifest's identities never match). Said by the restore process, so checked (ints
        only) and used only for paths the snapshot holds as files of that size; a lie can only
        misstate the sandbox's own files, as a snapshot process can. No racy window: nothing
        else wrote while the sandbox was stopped, and the restore returns only once the clock
        has moved past the files' ctimes. The number of identities kept."""
        if not isinstance(identities, dict):
            raise StoreError("the restore's file identities are malformed")
        kept = {path: identity for path, identity in identities.items()
                if isinstance(path, str) and isinstance(identity, list) and len(identity) == 5
                and all(_int(v, -(1 << 63)) for v in identity)}
        _write_signed(self.folder / RESTORED, {"name": name, "files": kept}, durable=False)
        return len(kept)

    def _restored(self, name: str) -> dict[str, list] | None:
        """The identities remembered of the restore of ``name``, or None (none, or another's)."""
        try:
            restored = _read_signed(self.folder / RESTORED, "the restored identities")
        except StoreError:
            return None
        if not (isinstance(restored, dict) and restored.get("name") == name
                and isinstance(restored.get("files"), dict)):
            return None
        return restored["files"]

    def _has_blob(self, digest: str, size: int) -> bool:
        if not DIGEST.fullmatch(digest):
            return False
        try:
            st = os.stat(f"{self._objects_prefix}{digest[:2]}/{digest}", follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == size

    # -- receiving a snapshot ----------------------------------------------------------------------
    def receive(self, fd: int) -> Pending:
        """Read a snapshot stream from ``fd`` (to its end): store the blobs it sends and return
        its manifest, checked, to ``commit``. Call with the lock held (since ``cache``, if the
        stream was made from it). Raises ``StoreError``."""
        if _read_exactly(fd, len(STREAM_MAGIC)) != STREAM_MAGIC:
            raise StoreError("the snapshot stream does not start as one")
        self.objects.mkdir(parents=True, exist_ok=True, mode=0o700)
        received: list[str] = []
        new_blobs: list[Path] = []
        written = 0
        while True:
            tag, length = RECORD.unpack(_read_exactly(fd, RECORD.size))
            if tag == MANIFEST:
                if length > MAX_MANIFEST:
                    raise StoreError(f"the snapshot's manifest is too large ({length} bytes)")
                body = _read_exactly(fd, length)
                if os.read(fd, 1):
                    raise StoreError("the snapshot stream goes on after its manifest")
                break
            if tag != snapshots.FILE:
                raise StoreError(f"the snapshot stream holds an unknown record {tag!r}")
            digest, blob = self._receive_blob(fd, length)
            received.append(digest)
            if blob is not None:
                new_blobs.append(blob)
                written += length
        try:
            manifest = json.loads(body)
        except ValueError:
            raise StoreError("the snapshot's manifest is not JSON") from None
        if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
                and _int(manifest.get("taken_ns")) and isinstance(manifest.get("entries"), list)):
            raise StoreError("the snapshot's manifest is not of format 2")
        for entry in manifest["entries"]:
            check_entry(entry)
            if entry[1] == REG and self._offered.get(entry[5]) != entry[4] and \
                    not self._has_blob(entry[5], entry[4]):
                raise StoreError(f"the snapshot names content the store does not hold: {entry[0]!r}")
        return Pending(manifest, received, new_blobs, written)

    def _receive_blob(self, fd: int, length: int) -> tuple[str, Path | None]:
        """One ``FILE`` record into a blob (sparse: zero chunks are holes): its digest, and its
        path if it is new (None if the store held it already)."""
        temporary = self.objects / f".tmp-{secrets.token_hex(8)}"
        out = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        digest = hashlib.sha256()
        try:
            left = length
            while left:
                data = os.read(fd, min(left, CHUNK))
                if not data:
                    raise StoreError("the snapshot stream ended inside a file")
                digest.update(data)
                if data == ZEROS[: len(data)]:
                    os.lseek(out, len(data), os.SEEK_CUR)
                else:
                    os.write(out, data)
                left -= len(data)
            os.ftruncate(out, length)
        except BaseException:
            os.close(out)
            temporary.unlink(missing_ok=True)
            raise
        os.close(out)
        sent = _read_exactly(fd, digest.digest_size)
        if sent != digest.digest():
            temporary.unlink(missing_ok=True)
            raise StoreError("a file's bytes in the snapshot stream do not match their digest")
        path = self.blob_path(digest.hexdigest())
        if self._has_blob(path.name, length):
            temporary.unlink()
            return path.name, None
        path.parent.mkdir(exist_ok=True, mode=0o700)
        os.replace(temporary, path)
        return path.name, path

    def commit(self, name: str, pending: Pending) -> int:
        """Make the received snapshot ``name`` durable and visible; its size (the bytes of the
        files it holds, and of its manifest). Its new blobs reach the disk before the manifest
        naming them: once it is stored the session deletes its older snapshots, so a manifest
        that outlived a crash without its blobs would leave it nothing to resume from. After a
        one-file change that is two or three blobs (the file, the database's copy): a few ms."""
        if len(pending.new_blobs) <= FSYNC_EACH:
            for path in pending.new_blobs:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        else:
            fd = os.open(self.objects, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _syncfs(fd)
            finally:
                os.close(fd)
        size = self._write_manifest(name, pending.manifest)
        return size + sum(e[4] for e in pending.manifest["entries"] if e[1] == REG)

    # -- restoring ---------------------------------------------------------------------------------
    def check(self, name: str) -> dict[str, Any]:
        """The manifest of ``name`` if it is whole and every blob it names is here with its
        size. Raises ``StoreError`` naming what is damaged or missing."""
        manifest = self.load(name)
        try:
            for entry in manifest["entries"]:
                check_entry(entry)
                if entry[1] == REG and not self._has_blob(entry[5], entry[4]):
                    raise StoreError(f"the snapshot {name} is damaged: the content of {entry[0]!r} "
                                     f"(sha256 {entry[5][:12]}...) is missing")
        except (KeyError, TypeError):
            raise StoreError(f"the snapshot {name} is damaged: its manifest is malformed") from None
        return manifest

    def render(self, manifest: dict[str, Any], out_fd: int) -> None:
        """Write ``manifest`` to ``out_fd`` as the archive the restore process unpacks (tar in
        gzip, stored uncompressed), checking each blob's digest as it goes: on a mismatch the
        stream stops without gzip's trailer (the restore then puts nothing in place) and
        ``StoreError`` names the file. Closes ``out_fd``. Call with the lock held."""
        out = _Gate(out_fd)
        try:
            gz = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=0, mtime=0)
            # "w", not the stream mode "w|": its buffer re-slices every chunk (quadratic in it).
            tar = tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT,  # noqa: SIM115 (closed below)
                               copybufsize=CHUNK)
            try:
                for entry in manifest["entries"]:
                    tar.addfile(*self._member(entry))
            except BaseException:
                out.shut = True  # nothing more reaches the restore: no end of tar, no gzip trailer
                raise
            finally:
                with contextlib.suppress(Exception):
                    tar.close()
                gz.close()
        finally:
            os.close(out_fd)

    def _member(self, entry: list) -> tuple[tarfile.TarInfo, Any]:
        path, kind, mode, mtime = entry[:4]
        info = tarfile.TarInfo(path)
        info.mode, info.mtime = mode, mtime
        if kind == DIR:
            info.type = tarfile.DIRTYPE
            return info, None
        if kind in (SYMLINK, HARDLINK):
            info.type = tarfile.SYMTYPE if kind == SYMLINK else tarfile.LNKTYPE
            info.linkname = entry[4]
            return info, None
        info.size = entry[4]
        return info, _VerifiedBlob(self.blob_path(entry[5]), path, entry[5], entry[4])

    # -- reclaiming --------------------------------------------------------------------------------
    def delete(self, name: str) -> int:
        """Remove snapshot ``name`` (either format) and every blob no remaining snapshot names;
        the number of blobs removed."""
        self.manifest_path(name).unlink(missing_ok=True)
        self.archive_path(name).unlink(missing_ok=True)
        return self.sweep()

    def sweep(self) -> int:
        """Mark the blobs the remaining manifests name, remove the others (and what a killed
        snapshot left half written). Nothing is removed while a manifest is unreadable: its
        blobs cannot be told apart."""
        if not self.folder.is_dir():
            return 0
        with self.locked(exclusive=True):
            live: set[str] = set()
            for file_name in os.listdir(self.folder):
                if file_name.endswith(PARTIAL):
                    (self.folder / file_name).unlink(missing_ok=True)
                elif file_name.endswith(MANIFEST_SUFFIX):
                    try:
                        entries = self.load(file_name[: -len(MANIFEST_SUFFIX)])["entries"]
                        live.update(e[5] for e in entries if e[1] == REG)
                    except (StoreError, KeyError, TypeError, IndexError):
                        return 0
            removed = 0
            if not self.objects.is_dir():
                return 0
            for shard in os.listdir(self.objects):
                folder = self.objects / shard
                if shard.startswith(".tmp-"):
                    folder.unlink(missing_ok=True)
                    continue
                for blob in os.listdir(folder):
                    if blob not in live:
                        (folder / blob).unlink(missing_ok=True)
                        removed += 1
                with contextlib.suppress(OSError):
                    folder.rmdir()  # empty now
            with contextlib.suppress(OSError):
                self.objects.rmdir()
            return removed


class _Gate:
    """The restore's end of the pipe; once ``shut``, whatever is still written is dropped."""

    def __init__(self, fd: int):
        self.fd, self.shut = fd, False

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view and not self.shut:
            view = view[os.write(self.fd, view):]
        return len(data)

    def flush(self) -> None:
        pass


class _VerifiedBlob:
    """A blob read for a restore (opened at its first read, closed at its end); raises
    ``StoreError`` before handing over its last bytes if they do not hash to its name, or if it
    ends early."""

    def __init__(self, path: Path, member: str, digest: str, size: int):
        self.path, self.member, self.expected, self.left = path, member, digest, size
        self.digest = hashlib.sha256()
        self.fd: int | None = None

    def read(self, n: int) -> bytes:
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                raise StoreError(f"the content of {self.member!r} is missing: {exc.strerror}") from None
        try:
            data = os.read(self.fd, min(n, self.left)) if self.left else b""
        except BaseException:
            self._close()
            raise
        self.left -= len(data)
        self.digest.update(data)
        if not self.left or not data:
            self._close()
            if self.digest.hexdigest() != self.expected:
                raise StoreError(f"the content of {self.member!r} is damaged (sha256 "
                                 f"{self.expected[:12]}... does not match)")
        return data

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
