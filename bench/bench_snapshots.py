"""Snapshot cost in proportion to the change (issue 15, item 4): the snapshot after a one-file
change in 1, 10 and 100 MB workspaces against a full archive of the same sandbox in the same
run, and restore times.

Through the local provider with real sandboxes (bubblewrap where it works): the snapshot process
runs confined in the sandbox and streams into the server's store, as after every turn. For each
size, a repository whose workspace (checkout plus ``.git``) is about that size, with an
incompressible file and a few dozen source files, is cloned into a sandbox (OpenCode running).
Interleaved n times, so that the load of this shared machine weighs on each alike (medians):
- one source file changed in the sandbox, then a snapshot (the figure: it reuses the rest);
- a full snapshot of the same sandbox into an empty store (reads and stores everything);
- the baseline: a full archive of the same parts (``tar | gzip -3``: what a snapshot was
  before, a tar.gz of the workspace and OpenCode's folders at level 3);
- the floor: a confined ``python3 -c pass`` (bubblewrap and interpreter start, which a
  snapshot paid before the sandbox's snapshot worker served them all);
then the restore of the last incremental snapshot against the restore of the full archive (as
a format-1 snapshot, through the same restore process), and the first snapshot after that
restore (the worker is started with the restored sandbox, before OpenCode's start and the first
turn, so that is not timed; the restore said which files it wrote, so they are not read).

``--breakdown`` also times the steps of one incremental snapshot apart (medians): starting a
worker (bubblewrap, the interpreter, its imports), the server's cache, the walk (a ``stat`` of
every file), the database's copy and its hashing, the manifest, the server's receive (checks)
and commit (fsyncs).

Run: ``.venv/bin/python bench/bench_snapshots.py [--sizes 1,10,100] [-n 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import machine, sample_repo

from tabbi_sandbox import sealed, snapshots
from tabbi_sandbox.binary import find_opencode
from tabbi_sandbox.local import LocalProvider, LocalSandbox
from tabbi_sandbox.provider import SandboxSpec
from tabbi_sandbox.snapshot_store import SnapshotStore

GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@x"}


def repository(parent: Path, megabytes: int, files: int) -> Path:
    """A repository whose clone (checkout plus .git) is about ``megabytes``: half of it
    incompressible data (its git objects are as large), in one file or in ``files`` files (100
    a folder), and 50 small source files."""
    repo = sample_repo(parent / f"repo-{megabytes}mb-{files}")
    data = megabytes * 1024 * 1024 // 2
    if files <= 1:
        (repo / "data.bin").write_bytes(os.urandom(data))
    for index in range(files if files > 1 else 0):
        folder = repo / "data" / f"d{index // 100}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{index}.bin").write_bytes(os.urandom(data // files))
    (repo / "src").mkdir()
    for index in range(50):
        (repo / "src" / f"module_{index}.py").write_text(f"def f{index}():\n    return {index}\n" * 20)
    subprocess.run(["git", "add", "."], cwd=repo, check=True, env=GIT_ENV)
    subprocess.run(["git", "commit", "-qm", "data"], cwd=repo, check=True, env=GIT_ENV)
    return repo


def folder_bytes(folder: Path) -> int:
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def full_archive(root: Path, destination: Path) -> None:
    """What a snapshot was before: one tar.gz (level 3) of the workspace and OpenCode's folders."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with destination.open("wb") as out:
        parts = ["workspace", "home/.local/share/opencode", "home/.local/state/opencode"]
        tar = subprocess.Popen(["tar", "-C", str(root), "-cf", "-", *parts], stdout=subprocess.PIPE)
        subprocess.run(["gzip", "-3"], stdin=tar.stdout, stdout=out, check=True)
        tar.wait()


async def progress(_: dict) -> None:
    pass


async def measure(provider: LocalProvider, work: Path, megabytes: int, files: int, n: int,
                  steps: bool) -> tuple[dict[str, float], dict[str, float]]:
    repo = repository(work, megabytes, files)
    spec = SandboxSpec(sandbox_id=f"bench-{megabytes}mb-{files}", repo_url=str(repo), repo_display=str(repo),
                       work_branch="tabbi/bench", read_only_paths=[str(repo)])
    sandbox = await provider.create(spec, progress)
    assert isinstance(sandbox, LocalSandbox)
    root = provider.sandbox_root(spec.sandbox_id)
    store = provider._store({"sandbox_id": spec.sandbox_id})
    result: dict[str, float] = {"workspace_mb": folder_bytes(root / "workspace") / 1e6}
    scratch = SnapshotStore(work / "scratch-store")  # for full snapshots: emptied after each
    baseline = store.archive_path("baseline")
    samples: dict[str, list[float]] = {"one_file_change": [], "full_snapshot": [], "full_archive": [],
                                       "floor": []}
    try:
        await provider.snapshot(sandbox, "first")  # the session's first snapshot: everything
        for index in range(n):
            done = await sandbox.exec(["bash", "-c", f"echo 'x = {index}' >> src/module_7.py"], timeout=60)
            assert done.returncode == 0, done.stderr
            t0 = time.monotonic()
            await provider.snapshot(sandbox, f"turn-{index}")
            samples["one_file_change"].append(time.monotonic() - t0)

            t0 = time.monotonic()
            await sandbox.write_snapshot(scratch, "full", provider.snapshot_timeout)
            samples["full_snapshot"].append(time.monotonic() - t0)
            await asyncio.to_thread(scratch.delete, "full")

            t0 = time.monotonic()
            full_archive(root, baseline)
            samples["full_archive"].append(time.monotonic() - t0)

            t0 = time.monotonic()  # the floor: a confined python3 that does nothing
            await sandbox.exec(["python3", "-I", "-S", "-c", "pass"], timeout=60)
            samples["floor"].append(time.monotonic() - t0)
        parts = await breakdown(sandbox, store, n) if steps else {}
    finally:
        await sandbox.terminate()
    for key, values in samples.items():
        result[key] = statistics.median(values)
    result["one_file_change_max"] = max(samples["one_file_change"])
    result["files"] = sum(1 for p in (root / "workspace").rglob("*") if p.is_file())

    # Restores into the stopped sandbox, its files removed as a pause leaves it; timed alone.
    opencode = sealed.execute_only(find_opencode())
    for name, key in ((f"turn-{n - 1}", "restore"), ("baseline", "restore_full_archive")):
        await provider.destroy(spec.sandbox_id)
        root.mkdir(mode=0o700)
        stopped = LocalSandbox(provider, spec.sandbox_id, root, sandbox.confined)
        stopped.prepare(spec, opencode)
        if name == "baseline":
            store.manifest_path(name).unlink(missing_ok=True)
        t0 = time.monotonic()
        await stopped.restore(store, name, provider.snapshot_timeout)
        result[key] = time.monotonic() - t0
        if name != "baseline":  # the resumed session's first snapshot: little to read
            assert stopped._snapshot_worker is not None  # started with the sandbox: not timed
            await stopped._snapshot_worker
            t0 = time.monotonic()
            await stopped.write_snapshot(store, "after-restore", provider.snapshot_timeout)
            result["first_after_restore"] = time.monotonic() - t0
            await stopped.terminate()
    await provider.destroy(spec.sandbox_id)
    return result, parts


def timed(samples: dict[str, list[float]], key: str, step, *args):
    t0 = time.monotonic()
    value = step(*args)
    samples.setdefault(key, []).append(time.monotonic() - t0)
    return value


class Null:
    def write(self, data: bytes) -> int:
        return len(data)


async def breakdown(sandbox: LocalSandbox, store: SnapshotStore, n: int) -> dict[str, float]:
    """The steps of one incremental snapshot timed apart: a worker's start (confined, as the
    provider starts it), then the worker's and the server's steps in this process (unconfined,
    the same code)."""
    samples: dict[str, list[float]] = {}
    script = (f"import sys; sys.path.insert(0, {str(Path(snapshots.__file__).parent)!r}); import bootstrap; "
              "bootstrap._archive_module(); import socket")
    for index in range(n):
        await sandbox.exec(["bash", "-c", f"echo 'y = {index}' >> src/module_8.py"], timeout=60)
        t0 = time.monotonic()
        await sandbox.exec(["python3", "-I", "-S", "-c", "pass"], timeout=60)
        samples.setdefault("spawn: bwrap + python3 -I -S -c pass", []).append(time.monotonic() - t0)
        t0 = time.monotonic()
        await sandbox.exec([os.path.realpath(sys.executable), "-I", "-S", "-c", script], timeout=60)
        samples.setdefault("worker start: spawn + imports", []).append(time.monotonic() - t0)
        with store.locked():
            cache = timed(samples, "server: cache of the previous manifest", store.cache)
            walker = snapshots._Walker(Null(), json.loads(cache)["files"])
            for arcname, anchor, components in snapshots.parts(str(sandbox.workspace), str(sandbox.home)):
                anchor_fd = os.open(anchor, os.O_RDONLY | os.O_DIRECTORY)
                fd = snapshots.open_dirs(anchor_fd, components)
                os.close(anchor_fd)
                if fd is None:
                    continue
                timed(samples, f"worker: walk {arcname} (stat each, hash changed)", walker.add_tree,
                      fd, arcname)
                if arcname == snapshots.AGENT_DATA:
                    copy = timed(samples, "worker: database copy (backup API)", snapshots._database_copy, fd)
                    if copy is not None:
                        timed(samples, "worker: database hash", walker.add_copy,
                              f"{snapshots.AGENT_DATA}/{snapshots.DATABASE}", *copy, 0)
                        samples.setdefault("database bytes (count)", []).append(len(copy[0]))
                os.close(fd)
            samples.setdefault("files read (count)", []).append(walker.sent)
            samples.setdefault("entries (count)", []).append(len(walker.entries))
            timed(samples, "worker: manifest (JSON)", json.dumps, {"entries": walker.entries})
            with tempfile.TemporaryFile() as stream:
                timed(samples, "worker: whole stream (the steps above)", snapshots.write_snapshot,
                      str(sandbox.workspace), str(sandbox.home), io.BytesIO(cache), stream)
                stream.seek(0)
                pending = timed(samples, "server: receive (store blobs, check manifest)", store.receive,
                                stream.fileno())
            timed(samples, "server: commit (fsync blobs, manifest, folder)", store.commit,
                  f"breakdown-{index}", pending)
        await asyncio.to_thread(store.delete, f"breakdown-{index}")
    return {key: statistics.median(values) for key, values in samples.items()}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1,10,100",
                        help="workspace sizes in MB; MB/N for a workspace of N data files (many small ones)")
    parser.add_argument("-n", type=int, default=5)
    parser.add_argument("--breakdown", action="store_true", help="time the steps of a snapshot apart too")
    args = parser.parse_args()
    print(machine())
    print(f"loadavg before: {loadavg()}")
    with tempfile.TemporaryDirectory(prefix="bench-snap-") as scratch:
        work = Path(scratch)
        provider = LocalProvider(work / "data" / "sandboxes", start_timeout=300)
        print(f"isolation: {'bwrap' if await provider.confines() else 'none'}")
        for size in args.sizes.split(","):
            megabytes, _, files = size.partition("/")
            print(f"loadavg: {loadavg()}", flush=True)
            r, steps = await measure(provider, work, int(megabytes), int(files or 1), args.n, args.breakdown)
            print(f"{size:>4} MB workspace ({r['workspace_mb']:.0f} MB measured), medians of {args.n}: "
                  f"one-file change {r['one_file_change']:.3f} s (max {r['one_file_change_max']:.3f}); "
                  f"full snapshot {r['full_snapshot']:.2f} s; full archive (tar | gzip -3) "
                  f"{r['full_archive']:.2f} s; ratio change/full archive "
                  f"{r['one_file_change'] / r['full_archive']:.3f}, change/full snapshot "
                  f"{r['one_file_change'] / r['full_snapshot']:.3f}; floor (confined python3 -c pass) "
                  f"{r['floor']:.3f} s; restore {r['restore']:.2f} s vs. the full archive's "
                  f"{r['restore_full_archive']:.2f} s; first snapshot after the restore "
                  f"{r['first_after_restore']:.3f} s; {r['files']:.0f} files in the workspace", flush=True)
            for step, value in steps.items():
                shown = f"{value:.0f}" if "count" in step else f"{value * 1000:.1f} ms"
                print(f"      {step}: {shown}", flush=True)
    print(f"loadavg after: {loadavg()}")


if __name__ == "__main__":
    asyncio.run(main())
