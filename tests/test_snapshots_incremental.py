"""Snapshots in proportion to the change (issue 15, item 4): a content-addressed store per sandbox
(``sandbox/snapshot_store.py``) fed by the snapshot stream made inside the sandbox
(``sandbox/snapshots.py``).

Most tests drive the two halves in this process (the snapshot process's code writing into a pipe,
the store reading it), which is what ``bootstrap.py snapshot`` and the local provider do across a
bubblewrap boundary; the last ones go through the local provider with real sandboxes. Costs are
counted (files read, blobs written), never timed: the timings are in bench/bench_snapshots.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tabbi_sandbox import processes, snapshot_store, snapshots
from tabbi_sandbox.provider import RestoreError
from tabbi_sandbox.snapshot_store import SnapshotStore, StoreError
from tests.support.waiting import wait_exited
from tests.test_provider_contract import (
    MANIFEST_SCRIPT,
    WORKSPACE_SCRIPT,
    comparable,
    local_kit,
    make_spec,
    shell,
    start,
)

pytestmark = pytest.mark.timeout(300)

FORMAT_1 = Path(__file__).parent / "data" / "snapshot-format-1.tar.gz"
LEFT_OUT = {"./a-fifo", "./.git/index.lock"}


# -- the two halves, in this process ------------------------------------------------------------
class Sandbox:
    """A sandbox's two parts as the snapshot process sees them: ``root/workspace`` and ``root/home``."""

    def __init__(self, root: Path):
        self.root = root
        self.workspace = root / "workspace"
        self.home = root / "home"
        self.workspace.mkdir(parents=True, exist_ok=True)
        (self.home / ".local" / "share" / "opencode").mkdir(parents=True, exist_ok=True)

    def run(self, script: str) -> None:
        subprocess.run(["bash", "-ec", script], cwd=self.workspace, check=True, capture_output=True)

    def tree(self, part: str = "workspace") -> dict[str, dict]:
        return tree(self.root / part)


def tree(folder: Path) -> dict[str, dict]:
    done = subprocess.run([sys.executable, "-c", MANIFEST_SCRIPT], cwd=folder, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def produce(sandbox: Sandbox, cache: bytes, out_fd: int) -> None:
    with os.fdopen(out_fd, "wb") as out:
        snapshots.write_snapshot(str(sandbox.workspace), str(sandbox.home), io.BytesIO(cache), out)


def take(store: SnapshotStore, sandbox: Sandbox, name: str) -> snapshot_store.Pending:
    """One snapshot as the local provider takes it: the cache out, the stream in, then commit."""
    with store.locked():
        cache = store.cache()
        read_end, write_end = os.pipe()
        result: dict = {}

        def receive() -> None:
            try:
                result["pending"] = store.receive(read_end)
            except BaseException as exc:  # handed to the test below
                result["error"] = exc

        receiver = threading.Thread(target=receive)
        receiver.start()
        produce(sandbox, cache, write_end)
        receiver.join()
        os.close(read_end)
        if "error" in result:
            raise result["error"]
        store.commit(name, result["pending"])
        return result["pending"]


def restore(store: SnapshotStore, name: str, destination: Path) -> None:
    """Restore ``name`` into ``destination`` as the provider does: checked, rendered, unpacked,
    the identities of the files written kept for the next snapshot."""
    destination.mkdir(parents=True, exist_ok=True)
    identities: dict[str, list[int]] = {}
    with store.locked():
        manifest = store.check(name)
        read_end, write_end = os.pipe()
        errors: list[BaseException] = []

        def render() -> None:
            try:
                store.render(manifest, write_end)
            except BaseException as exc:
                errors.append(exc)

        renderer = threading.Thread(target=render)
        renderer.start()
        try:
            with os.fdopen(read_end, "rb") as source:
                snapshots.restore_archive(source, str(destination / "workspace"), str(destination / "home"),
                                          identities)
        except snapshots.SnapshotError:
            if not errors:
                raise
        finally:
            renderer.join()
        if errors:  # the store's reason, as the provider reports it (the restore failed too)
            raise errors[0]
        store.remember_restore(name, identities)


def blobs(store: SnapshotStore) -> set[str]:
    return {p.name for p in store.objects.glob("*/*")} if store.objects.is_dir() else set()


def digests_of(pending: snapshot_store.Pending, paths: set[str]) -> set[str]:
    return {e[5] for e in pending.manifest["entries"] if e[1] == snapshots.REG and e[0] in paths}


@pytest.fixture
def trusted_cache(monkeypatch):
    """Files are trusted to the cache at once (the racy window has its own test below): the
    snapshot right after a workspace is made may then already reuse its files."""
    monkeypatch.setattr(snapshot_store, "RACY_NS", 0)


BASE = r"""
git init -q --template= -b main .
mkdir -p src data empty
for i in $(seq 1 40); do echo "line $i" > src/f$i.py; done
head -c 2000000 /dev/urandom > data/big.bin
# Older than the index git writes next: otherwise they are "racily clean" to git, whose next
# commit -a hashes them all again and freshens (re-stamps) every one of their objects.
find src data -type f -exec touch -d '2 minutes ago' {} +
git -c user.name=t -c user.email=t@x add -A && git -c user.name=t -c user.email=t@x commit -qm base
"""


def test_unchanged_files_are_neither_read_nor_stored_again(tmp_path, trusted_cache):
    sandbox, store = Sandbox(tmp_path / "sb"), SnapshotStore(tmp_path / "store")
    sandbox.run(BASE)
    first = take(store, sandbox, "s1")
    files = [e for e in first.manifest["entries"] if e[1] == snapshots.REG]
    assert len(first.received) == len(files) > 40  # the first snapshot reads everything, .git too
    assert blobs(store) == {e[5] for e in files}

    again = take(store, sandbox, "s2")
    assert again.received == [] and again.new_blobs == []  # nothing changed: nothing read

    sandbox.run("echo changed > src/f7.py; git -c user.name=t -c user.email=t@x commit -qam one")
    third = take(store, sandbox, "s3")
    before = {e[0]: e for e in files}
    touched = {e[0] for e in third.manifest["entries"] if e[1] == snapshots.REG
               and [e[4], *e[6:]] != [before.get(e[0], [None] * 10)[4], *before.get(e[0], [None] * 10)[6:]]}
    assert "workspace/src/f7.py" in touched and "workspace/data/big.bin" not in touched
    assert any(path.startswith("workspace/.git/objects/") for path in touched)  # git objects too
    assert set(third.received) == digests_of(third, touched)  # read: what changed, nothing else
    assert len(touched) < 15 and len(third.new_blobs) <= len(set(third.received))
    assert blobs(store) == {e[5] for p in (first, third) for e in p.manifest["entries"] if e[1] == "f"}


def test_files_changed_within_the_racy_window_are_read_again(tmp_path, monkeypatch):
    """A file written twice within one timestamp tick keeps its size, mtime and ctime: one that
    changed that close to the snapshot that read it must not be trusted to the cache."""
    sandbox, store = Sandbox(tmp_path / "sb"), SnapshotStore(tmp_path / "store")
    sandbox.run("echo one > a.txt; echo two > b.txt")
    monkeypatch.setattr(snapshot_store, "RACY_NS", 3600 * 10**9)  # everything counts as just changed
    take(store, sandbox, "s1")
    again = take(store, sandbox, "s2")
    assert len(again.received) == 2 and again.new_blobs == []  # read again, stored once


def test_the_first_snapshot_after_a_restore_reads_only_what_changed(tmp_path, trusted_cache):
    """A restore writes every file anew (new inodes and ctimes): the manifest's identities match
    none of them. The restore's own identities do, so a resumed session's first snapshot reads
    only the file changed since, and stores nothing new but it."""
    sandbox, store = Sandbox(tmp_path / "sb"), SnapshotStore(tmp_path / "store")
    sandbox.run(BASE)
    take(store, sandbox, "s1")
    resumed = Sandbox(tmp_path / "resumed")
    restore(store, "s1", resumed.root)
    unchanged = take(store, resumed, "s2")
    assert unchanged.received == [] and unchanged.new_blobs == []
    resumed.run("echo changed > src/f3.py")
    changed = take(store, resumed, "s3")
    assert set(changed.received) == digests_of(changed, {"workspace/src/f3.py"})


def test_a_restored_file_rewritten_at_once_as_a_lookalike_is_read_again(tmp_path, trusted_cache):
    """Threat: the agent knows the first snapshot after a resume reuses what the restore wrote.
    As soon as it runs it rewrites a restored file with other bytes of the same size and sets
    its mtime back, hoping the snapshot keeps the restored content. Its ctime moved on (the
    restore returns only once the clock has passed the files' ctimes): it is read again."""
    sandbox, store = Sandbox(tmp_path / "sb"), SnapshotStore(tmp_path / "store")
    sandbox.run("echo aaaaaaaaaa > a.txt; echo bbbbbbbbbb > b.txt")
    take(store, sandbox, "s1")
    resumed = Sandbox(tmp_path / "resumed")
    restore(store, "s1", resumed.root)
    target = resumed.workspace / "a.txt"
    before = target.stat()
    with target.open("r+b") as f:
        f.write(b"AAAAAAAAAA\n")
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = take(store, resumed, "s2")
    assert len(after.received) == 1
    restore(store, "s2", tmp_path / "again")
    assert (tmp_path / "again" / "workspace" / "a.txt").read_text() == "AAAAAAAAAA\n"


def test_identities_a_restore_process_forges_are_not_trusted(tmp_path, trusted_cache):
    """Threat: the restore process runs in the agent's sandbox, so the identities it reports
    are the agent's to forge: for paths the snapshot does not hold (to make a later file look
    cached), with another size, or not numbers at all. Only identities of files the snapshot
    holds, of that size, reach the cache; and only for the snapshot that was restored."""
    sandbox, store = Sandbox(tmp_path / "sb"), SnapshotStore(tmp_path / "store")
    sandbox.run("echo aaaaaaaaaa > a.txt; echo bbbbbbbbbb > b.txt; echo cccccccccc > c.txt")
    first = take(store, sandbox, "s1")
    sizes = {e[0]: e[4] for e in first.manifest["entries"] if e[1] == snapshots.REG}
    store.remember_restore("s1", {
        "workspace/a.txt": [sizes["workspace/a.txt"], 1, 2, 3, 4],
        "workspace/b.txt": [sizes["workspace/b.txt"] + 1, 1, 2, 3, 4],
        "workspace/new.txt": [5, 1, 2, 3, 4],
        "workspace/c.txt": [sizes["workspace/c.txt"], "1", 2, 3, 4],
    })
    cached = json.loads(store.cache())["files"]
    assert set(cached) == {"workspace/a.txt"} and cached["workspace/a.txt"][:5] == [11, 1, 2, 3, 4]
    store.remember_restore("s0", {"workspace/a.txt": [11, 1, 2, 3, 4]})  # of another snapshot
    assert json.loads(store.cache())["files"]["workspace/a.txt"][:5] != [11, 1, 2, 3, 4]


def test_an_incremental_chain_restores_each_snapshot_exactly(tmp_path, trusted_cache):
    """Every snapshot of a chain (each reusing the previous one's blobs) restores byte for byte,
    link for link, mode for mode, empty folders included, less the FIFO and the git lock."""
    sandbox, store = Sandbox(tmp_path / "sb"), SnapshotStore(tmp_path / "store")
    sandbox.run("git init -q --template= -b main .\n" + WORKSPACE_SCRIPT)
    (sandbox.home / ".local" / "state" / "opencode").mkdir(parents=True)
    (sandbox.home / ".local" / "state" / "opencode" / "kv.json").write_text("{}")
    steps = [
        "",
        "echo more >> data/small.csv; rm run.sh; mkdir -p new/empty; chmod 600 readonly.txt",
        "rm data/hardlink.csv; rm -r nested/deeper; ln -s data nested/deeper; printf 'a\\nb' > $'new\\nline'",
        "rm absolute-link.csv; echo now-a-file > absolute-link.csv; chmod 700 locked",
        "",
    ]
    expected = []
    for index, step in enumerate(steps):
        sandbox.run(step or "true")
        expected.append((sandbox.tree(), sandbox.tree("home")))
        take(store, sandbox, f"s{index}")
    for index, (workspace, home) in enumerate(expected):
        destination = tmp_path / f"restored-{index}"
        restore(store, f"s{index}", destination)
        wanted = {p: e for p, e in workspace.items() if p not in LEFT_OUT}
        assert comparable(tree(destination / "workspace")) == comparable(wanted), index
        assert tree(destination / "home") == home, index


SECRET = "server-only-7d1f0c"


def test_a_cached_file_swapped_for_a_link_a_fifo_or_a_lookalike(tmp_path, trusted_cache):
    """Threat: the agent knows the next snapshot reuses what the previous manifest says of each
    path. Between two snapshots it swaps cached files for a link to a server file, for a FIFO
    (a reader that opens it blocks), and for another file with the same size and mtime (touch
    -d) hoping the stale content is kept. The link must be kept as a link (its target's bytes
    never read), the FIFO left out without blocking, and the lookalike read again."""
    secret = tmp_path / "server" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text(SECRET * 10)
    sandbox, store = Sandbox(tmp_path / "sb"), SnapshotStore(tmp_path / "store")
    sandbox.run("echo aaaaaaaaaa > a.txt; echo bbbbbbbbbb > b.txt; echo cccccccccc > c.txt; "
                "touch -d '2001-02-03 04:05:06' c.txt")
    take(store, sandbox, "s1")
    sandbox.run(f"rm a.txt; ln -s {secret} a.txt; rm b.txt; mkfifo b.txt; "
                "rm c.txt; echo CCCCCCCCCC > c.txt; touch -d '2001-02-03 04:05:06' c.txt")

    second = take(store, sandbox, "s2")  # a blocked FIFO would hang here (the module's timeout)
    entries = {e[0]: e for e in second.manifest["entries"]}
    assert entries["workspace/a.txt"][1:2] == [snapshots.SYMLINK]
    assert entries["workspace/a.txt"][4] == str(secret)
    assert "workspace/b.txt" not in entries
    for blob in store.objects.glob("*/*"):
        assert SECRET.encode() not in blob.read_bytes()
    restore(store, "s2", tmp_path / "restored")
    restored = tmp_path / "restored" / "workspace"
    assert os.readlink(restored / "a.txt") == str(secret)
    assert not os.path.lexists(restored / "b.txt")
    assert (restored / "c.txt").read_text() == "CCCCCCCCCC\n"  # not the cached "cccccccccc"


def test_a_file_flipped_to_a_link_during_snapshots_never_stores_its_target(tmp_path, trusted_cache):
    """Threat (TOCTOU): the agent flips a file between itself and a link to a server file while
    snapshots run, so that a check by path and a read by path see different things. Every read
    goes through the descriptor opened with O_NOFOLLOW: the target's bytes are never stored. And
    the race never fails a snapshot (a link read back as a file once did: EINVAL from readlink)."""
    secret = tmp_path / "server" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text(SECRET * 10)
    sandbox, store = Sandbox(tmp_path / "sb"), SnapshotStore(tmp_path / "store")
    data, link, spare = (sandbox.workspace / n for n in ("data.txt", "link.tmp", "spare.tmp"))
    data.write_text("mine " * 10)
    os.link(data, sandbox.workspace / "keep")
    stop = threading.Event()
    flips = [0]

    def flip() -> None:
        while not stop.is_set():
            os.symlink(secret, link)
            os.rename(link, data)
            os.link(sandbox.workspace / "keep", spare)
            os.rename(spare, data)
            flips[0] += 1

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        for index in range(40):
            take(store, sandbox, f"s{index}")
    finally:
        stop.set()
        flipper.join()
    assert flips[0] > 0
    for blob in store.objects.glob("*/*"):
        assert SECRET.encode() not in blob.read_bytes()


def test_a_sparse_file_costs_the_server_no_disk(tmp_path):
    """Threat: the agent makes a huge sparse file (``truncate -s``: no disk in the sandbox) so
    that each snapshot writes that many zeros into the server's data folder. The store writes
    runs of zeros as holes: the blob takes what the file takes, and restores at its size."""
    sandbox, store = Sandbox(tmp_path / "sb"), SnapshotStore(tmp_path / "store")
    sandbox.run("truncate -s 16M sparse.bin; echo tail >> sparse.bin")
    first = take(store, sandbox, "s1")
    blob = store.blob_path(digests_of(first, {"workspace/sparse.bin"}).pop())
    assert blob.stat().st_size == 16 * 2**20 + 5
    assert blob.stat().st_blocks * 512 < 2**20  # a hole, and the last block
    restore(store, "s1", tmp_path / "restored")
    restored = tmp_path / "restored" / "workspace" / "sparse.bin"
    assert restored.stat().st_size == 16 * 2**20 + 5
    with restored.open("rb") as f:
        f.seek(16 * 2**20)
        assert f.read() == b"tail\n"


def test_deleting_snapshots_reclaims_the_blobs_no_snapshot_uses(tmp_path, trusted_cache):
    sandbox, store = Sandbox(tmp_path / "sb"), SnapshotStore(tmp_path / "store")
    sandbox.run(BASE)
    first = take(store, sandbox, "s1")
    sandbox.run("head -c 100000 /dev/urandom > data/big.bin")
    second = take(store, sandbox, "s2")
    old_big, new_big = (digests_of(p, {"workspace/data/big.bin"}) for p in (first, second))
    assert old_big != new_big and old_big | new_big <= blobs(store)

    assert store.delete("s1") == 1  # only the old big file was s1's alone
    assert blobs(store) == {e[5] for e in second.manifest["entries"] if e[1] == snapshots.REG}
    restore(store, "s2", tmp_path / "restored")
    assert (tmp_path / "restored/workspace/data/big.bin").read_bytes() == (
        sandbox.workspace / "data/big.bin").read_bytes()

    store.delete("s2")  # the last one: the session's store is empty again
    assert not store.objects.exists() and store.names() == []


def test_a_sweep_waits_for_a_snapshot_being_written(tmp_path, trusted_cache):
    """Two snapshots of one session at once (a turn's and a warm one, or a delete racing a
    take): a sweep that ran between a snapshot's blobs and its manifest would remove blobs the
    manifest is about to name. It waits for the shared lock the writer holds."""
    sandbox, store = Sandbox(tmp_path / "sb"), SnapshotStore(tmp_path / "store")
    sandbox.run(BASE)
    take(store, sandbox, "s1")
    sandbox.run("echo new > src/new.py")
    sweeper = threading.Thread(target=store.delete, args=("s1",))
    with store.locked():
        read_end, write_end = os.pipe()
        writer = threading.Thread(target=produce, args=(sandbox, store.cache(), write_end))
        writer.start()
        pending = store.receive(read_end)
        writer.join()
        os.close(read_end)
        sweeper.start()  # s1 goes, and with it every blob nothing names yet ...
        sweeper.join(timeout=2)  # ... unless it waits (without the lock it is done by now)
        store.commit("s2", pending)
    sweeper.join()
    restore(store, "s2", tmp_path / "restored")
    assert (tmp_path / "restored/workspace/src/new.py").read_text() == "new\n"


def test_a_damaged_or_missing_blob_is_a_clear_error_and_is_never_used(tmp_path, trusted_cache):
    sandbox, store = Sandbox(tmp_path / "sb"), SnapshotStore(tmp_path / "store")
    sandbox.run(BASE)
    first = take(store, sandbox, "s1")
    big = store.blob_path(digests_of(first, {"workspace/data/big.bin"}).pop())
    good = big.read_bytes()
    big.write_bytes(good[:1000] + bytes([good[1000] ^ 1]) + good[1001:])  # same size, one bit off

    destination = tmp_path / "restored"
    with pytest.raises(StoreError, match=r"workspace/data/big\.bin.*damaged"):
        restore(store, "s1", destination)
    assert not (destination / "workspace").exists() and not (destination / ".tabbi-restore").exists()

    big.unlink()
    with pytest.raises(StoreError, match=r"damaged: the content of 'workspace/data/big\.bin'.*missing"):
        store.check("s1")
    # The next snapshot does not reuse what is missing: it reads the file again.
    second = take(store, sandbox, "s2")
    assert digests_of(second, {"workspace/data/big.bin"}) <= set(second.received)
    restore(store, "s2", tmp_path / "restored-again")
    assert (tmp_path / "restored-again/workspace/data/big.bin").read_bytes() == good

    manifest = store.manifest_path("s2")
    text = manifest.read_bytes()
    manifest.write_bytes(text.replace(b'"format":2', b'"format":3'))
    with pytest.raises(StoreError, match="s2 is damaged: its manifest does not match"):
        store.check("s2")
    # Nothing is reclaimed while a manifest cannot be read (its blobs cannot be told apart) ...
    held = blobs(store)
    assert store.delete("s1") == 0 and blobs(store) == held
    # ... and it is no cache either: with no intact manifest left, the next snapshot reads all.
    third = take(store, sandbox, "s3")
    assert len(third.received) == len([e for e in third.manifest["entries"] if e[1] == "f"])


def stream(manifest: dict, files: list[bytes] = ()) -> bytes:
    import hashlib

    out = io.BytesIO()
    out.write(snapshots.STREAM_MAGIC)
    for data in files:
        out.write(snapshots.RECORD.pack(snapshots.FILE, len(data)) + data + hashlib.sha256(data).digest())
    body = json.dumps(manifest).encode()
    out.write(snapshots.RECORD.pack(snapshots.MANIFEST, len(body)) + body)
    return out.getvalue()


def feed(store: SnapshotStore, data: bytes) -> snapshot_store.Pending:
    read_end, write_end = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(write_end, data), os.close(write_end)))
    writer.start()
    try:
        return store.receive(read_end)
    finally:
        writer.join()
        os.close(read_end)


@pytest.mark.parametrize("entry, why", [
    (["workspace/x", "f", 0o644, 0, 3, "../../../../etc/passwd" + "0" * 42, None, None, None, None],
     "malformed"),
    (["workspace/x", "f", 0o644, 0, 3, "ab" * 32, None, None, None, None], "does not hold"),
    (["home/.config/x", "d", 0o755, 0], "outside the sandbox's parts"),
    (["workspace/../x", "d", 0o755, 0], "not allowed"),
    (["workspace/x", "h", 0o644, 0, "/etc/passwd"], "not allowed"),
    (["workspace/x", "f", 0o644, 0, 3], "malformed"),
])
def test_a_stream_naming_what_it_may_not_is_refused(tmp_path, entry, why):
    """Threat: the stream comes from a process inside the agent's sandbox. A digest is a file
    name in the server's store (one like ``../../x`` would name any file), a path is where the
    restore writes, and a file the stream did not send must not be taken from elsewhere."""
    store = SnapshotStore(tmp_path / "store")
    manifest = {"format": 2, "taken_ns": 1, "entries": [["workspace", "d", 0o755, 0], entry]}
    with pytest.raises(StoreError, match=why):
        feed(store, stream(manifest, [b"abc"]))
    assert not list(store.folder.glob("*.snapshot"))


def test_a_stream_naming_an_offered_blob_at_another_size_is_refused(tmp_path, trusted_cache):
    """Threat: the snapshot worker (in the agent's sandbox) is handed the cache, so it knows the
    digests the store holds, and the store does not look again at a blob the cache offered. A
    lying worker names an offered digest with a larger size, so that a restore would read past
    the blob's end: the size must be the one offered, or the blob is looked at (and refused)."""
    sandbox, store = Sandbox(tmp_path / "sb"), SnapshotStore(tmp_path / "store")
    sandbox.run("echo aaaaaaaaaa > a.txt")
    take(store, sandbox, "s1")
    with store.locked():
        cached = json.loads(store.cache())["files"]["workspace/a.txt"]
        lie = ["workspace/a.txt", "f", 0o644, 0, cached[0] + 100, cached[5], None, None, None, None]
        with pytest.raises(StoreError, match="does not hold"):
            feed(store, stream({"format": 2, "taken_ns": 1, "entries": [["workspace", "d", 0o755, 0], lie]}))
        honest = [*lie[:4], cached[0], *lie[5:]]
        feed(store, stream({"format": 2, "taken_ns": 1, "entries": [["workspace", "d", 0o755, 0], honest]}))


def test_a_stream_whose_bytes_do_not_match_their_digest_is_refused(tmp_path):
    store = SnapshotStore(tmp_path / "store")
    data = stream({"format": 2, "taken_ns": 1, "entries": []}, [b"abc"])
    spoiled = data.replace(b"abc", b"abd", 1)
    with pytest.raises(StoreError, match="do not match their digest"):
        feed(store, spoiled)
    assert blobs(store) == set()


def test_a_format_1_archive_still_restores_exactly(tmp_path):
    """Snapshots taken before this store are one tar.gz each (tests/data holds one written by the
    previous code): they restore as they did."""
    destination = tmp_path / "sb"
    destination.mkdir()
    with FORMAT_1.open("rb") as source:
        snapshots.restore_archive(source, str(destination / "workspace"), str(destination / "home"))
    workspace = destination / "workspace"
    assert (workspace / "hello.txt").read_text() == "hello\n"
    assert int((workspace / "hello.txt").stat().st_mtime) == 981173106  # 2001-02-03 04:05:06 UTC
    assert (workspace / "new\nline.txt").read_text() == "name with\nnewline\n"
    assert os.stat(workspace / "ro.txt").st_mode & 0o777 == 0o444
    assert os.readlink(workspace / "sub" / "link") == "../hello.txt"
    assert os.readlink(workspace / "dangling") == "/nowhere"
    assert os.stat(workspace / "sub" / "hard.csv").st_ino == os.stat(workspace / "sub" / "data.csv").st_ino
    assert (workspace / "sub" / "empty").is_dir() and not list((workspace / "sub" / "empty").iterdir())
    assert json.loads((destination / "home/.local/share/opencode/storage/fixture.json").read_text())["kept"]
    assert (destination / "home/.local/state/opencode/fixture.txt").read_text() == "kept\n"


# -- through the local provider, in real sandboxes ---------------------------------------------------
async def test_local_provider_incremental_snapshots_damage_and_format_1(request, tmp_path, source_repo):
    """The provider end to end: a second snapshot stores only what changed, a corrupt blob fails
    the restore with the file named and nothing in place, deleting every snapshot leaves no
    blob, and a format-1 archive left by the previous code restores and is snapshotted on in the
    new format. (The exact round trip and a retry after damage through the provider are
    test_provider_contract.py's, which run on this store.)"""
    kit = local_kit(request, tmp_path / "tabbi-data")
    provider = kit.provider
    spec = make_spec(source_repo)
    sandbox, _ = await start(kit, spec)
    store = provider._store({"sandbox_id": spec.sandbox_id})
    try:
        await shell(sandbox, "head -c 3000000 /dev/urandom > noise.bin; echo one > mine.txt")
        first, _ = await provider.snapshot(sandbox, "first")
        held = blobs(store)
        await shell(sandbox, "echo two > mine.txt")
        second, size = await provider.snapshot(sandbox, "second")
    finally:
        await sandbox.terminate()
    # New: mine.txt, the database's copy if it changed, and OpenCode's own files it rewrote.
    assert size > 3_000_000 and len(blobs(store) - held) < 12
    await provider.destroy(spec.sandbox_id)

    entries = store.load("second")["entries"]
    mine = store.blob_path(next(e[5] for e in entries if e[0] == "workspace/mine.txt"))
    mine.write_bytes(b"TWO\n")
    with pytest.raises(RestoreError, match=r"could not be restored: .*workspace/mine\.txt.*damaged"):
        await start(kit, spec, restore=second)
    root = provider.sandbox_root(spec.sandbox_id)
    assert not (root / "workspace").exists() and not (root / ".tabbi-restore").exists()
    for ref in (first, second):
        await provider.delete_snapshot(ref)
    assert blobs(store) == set() and store.names() == []

    old_spec = make_spec(source_repo)
    old = {"provider": "local", "sandbox_id": old_spec.sandbox_id, "name": "1700000000000-abcdef"}
    old_store = provider._store(old)
    old_store.folder.mkdir(parents=True)
    shutil.copyfile(FORMAT_1, old_store.archive_path(old["name"]))
    restored, phases = await start(kit, old_spec, restore=old)
    try:
        assert "restoring" in phases
        looked = await shell(restored, "cat hello.txt; readlink sub/link")
        assert looked.split() == ["hello", "../hello.txt"]
        await provider.snapshot(restored, "newer")
    finally:
        await restored.terminate()
    await provider.delete_snapshot(old)
    assert old_store.names() == ["newer"]
    assert any(e[0] == "workspace/new\nline.txt" for e in old_store.load("newer")["entries"])


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


async def test_the_snapshot_worker_serves_every_snapshot_out_of_the_agents_reach(request, tmp_path, caplog,
                                                                                 source_repo):
    """Threat: the snapshot worker lives as long as the sandbox and runs as the agent's user
    among the agent's files. The agent must not reach it: it runs in a PID namespace of its own
    (neither the agent's nor the server's; what it shares it with is its own bubblewrap), so no
    process of the agent can list, signal or trace it. It is the same process from one snapshot
    to the next (no start paid again); one that has died (killed, or ended at a snapshot's
    timeout) is replaced at the next snapshot, which still succeeds; none is left once the
    sandbox stops. After a resume, the worker is started with the sandbox and the first
    snapshot reads only what changed (the restore said what it wrote)."""
    kit = local_kit(request, tmp_path / "tabbi-data")
    provider = kit.provider
    spec = make_spec(source_repo)
    sandbox, _ = await start(kit, spec)
    caplog.set_level(logging.INFO, logger="tabbi_sandbox.local")
    try:
        await shell(sandbox, "mkdir many; for i in $(seq 1 60); do echo $i > many/$i; done")
        await provider.snapshot(sandbox, "first")
        worker = sandbox._snapshot_worker.result()
        assert worker.alive
        await shell(sandbox, "echo two > mine.txt")
        await provider.snapshot(sandbox, "second")
        assert sandbox._snapshot_worker.result() is worker and worker.alive

        marked = processes.sandbox_pids(sandbox.id)
        serving = [pid for pid in marked if b"bootstrap.py\0snapshot\0" in _cmdline(pid)]
        agents = [pid for pid in marked if b"opencode" in _cmdline(pid) and b"snapshot" not in _cmdline(pid)]
        assert serving and agents
        if sandbox.confined:
            inner = [pid for pid in serving if _pid_namespace(pid) != _pid_namespace(os.getpid())]
            assert inner, "the worker runs in the server's PID namespace"
            space = _pid_namespace(inner[0])
            assert space not in {_pid_namespace(pid) for pid in agents}
            together = [pid for pid in marked if _pid_namespace(pid) == space]
            assert all(b"bootstrap.py\0snapshot\0" in _cmdline(pid) or b"bwrap" in _cmdline(pid)
                       for pid in together), [_cmdline(pid) for pid in together]

        os.killpg(worker.proc.pid, signal.SIGKILL)
        await worker.proc.wait()
        await shell(sandbox, "echo three > mine.txt")
        third, _ = await provider.snapshot(sandbox, "third")
        assert sandbox._snapshot_worker.result() is not worker and sandbox._snapshot_worker.result().alive
        store = provider._store(third)
        mine = next(e for e in store.load("third")["entries"] if e[0] == "workspace/mine.txt")
        assert store.blob_path(mine[5]).read_bytes() == b"three\n"
    finally:
        last = sandbox._snapshot_worker.result()
        await sandbox.terminate()
    assert not last.alive
    # SIGKILLed processes are listed until they are reaped: wait for them, with a deadline
    await asyncio.to_thread(wait_exited, lambda: processes.sandbox_pids(sandbox.id), 30,
                            "the sandbox's processes ending")
    await provider.destroy(spec.sandbox_id)

    resumed, _ = await start(kit, spec, restore=third)
    try:
        assert resumed._snapshot_worker is not None  # started with the sandbox
        await shell(resumed, "echo four > mine.txt")
        await provider.snapshot(resumed, "fourth")
    finally:
        await resumed.terminate()
    read = [int(m) for r in caplog.records for m in re.findall(r"(\d+) files read", r.getMessage())]
    # mine.txt, the database's copy, what OpenCode and its start rewrote; not the whole clone.
    assert len(read) == 4 and read[0] > 60 and read[-1] < 10, read
    await provider.destroy(spec.sandbox_id)
