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
- the floor: a confined ``python3 -c pass`` (bubblewrap and interpreter start, which every
  snapshot pays);
then the restore of the last incremental snapshot against the restore of the full archive (as
a format-1 snapshot, through the same restore process).

Run: ``.venv/bin/python bench/bench_snapshots.py [--sizes 1,10,100] [-n 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from harness import machine, sample_repo

from tabbi_sandbox import sealed
from tabbi_sandbox.binary import find_opencode
from tabbi_sandbox.local import LocalProvider, LocalSandbox
from tabbi_sandbox.provider import SandboxSpec
from tabbi_sandbox.snapshot_store import SnapshotStore

GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@x"}


def repository(parent: Path, megabytes: int) -> Path:
    """A repository whose clone (checkout plus .git) is about ``megabytes``: half of it one
    incompressible file (its git object is as large), and 50 small source files."""
    repo = sample_repo(parent / f"repo-{megabytes}mb")
    (repo / "data.bin").write_bytes(os.urandom(megabytes * 1024 * 1024 // 2))
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


async def measure(provider: LocalProvider, work: Path, megabytes: int, n: int) -> dict[str, float]:
    repo = repository(work, megabytes)
    spec = SandboxSpec(sandbox_id=f"bench-{megabytes}mb", repo_url=str(repo), repo_display=str(repo),
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
    finally:
        await sandbox.terminate()
    for key, values in samples.items():
        result[key] = statistics.median(values)
    result["one_file_change_max"] = max(samples["one_file_change"])

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
    await provider.destroy(spec.sandbox_id)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1,10,100")
    parser.add_argument("-n", type=int, default=5)
    args = parser.parse_args()
    print(machine())
    print(f"loadavg before: {loadavg()}")
    with tempfile.TemporaryDirectory(prefix="bench-snap-") as scratch:
        work = Path(scratch)
        provider = LocalProvider(work / "data" / "sandboxes", start_timeout=300)
        print(f"isolation: {'bwrap' if await provider.confines() else 'none'}")
        for megabytes in (int(s) for s in args.sizes.split(",")):
            r = await measure(provider, work, megabytes, args.n)
            print(f"{megabytes:>4} MB workspace ({r['workspace_mb']:.0f} MB measured), medians of {args.n}: "
                  f"one-file change {r['one_file_change']:.3f} s (max {r['one_file_change_max']:.3f}); "
                  f"full snapshot {r['full_snapshot']:.2f} s; full archive (tar | gzip -3) "
                  f"{r['full_archive']:.2f} s; ratio change/full archive "
                  f"{r['one_file_change'] / r['full_archive']:.3f}, change/full snapshot "
                  f"{r['one_file_change'] / r['full_snapshot']:.3f}; floor (confined python3 -c pass) "
                  f"{r['floor']:.3f} s; restore {r['restore']:.2f} s vs. the full archive's "
                  f"{r['restore_full_archive']:.2f} s", flush=True)
    print(f"loadavg after: {loadavg()}")


if __name__ == "__main__":
    asyncio.run(main())
