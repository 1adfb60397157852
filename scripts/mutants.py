"""Guarantee mutants: break one guarantee at a time, check that its tests notice.

Each entry of ``tests/mutants.toml`` names a guarantee, the smallest code change that breaks it
(replace one exact, unique snippet of one file) and the tests that must then fail. For each
entry this copies the working tree to a scratch folder, applies the breakage there, and runs
those tests against the copy with the project's own ``.venv``:

- caught:    the tests failed (or timed out), as they must;
- SURVIVED:  every test still passed: the guarantee is unguarded;
- STALE:     the snippet is not in the file exactly once (the code moved on: re-anchor the entry);
- ERROR:     the copy could not be set up, the mutated file does not compile, or pytest could not
             run the tests (a missing test file, a collection error).

Anything but ``caught`` makes the exit status non-zero, so the list stays true as code changes.

The copy's code is what gets imported: tabbi is installed editable with a package-dir mapping
(``tabbi_extension`` -> ``extension/``, ``tabbi_sandbox`` -> ``sandbox/``), so the scratch copy
gets a folder of links under those import names, first on ``PYTHONPATH`` (before the editable
finder, which Python consults only after the path), and the runner checks, before running the
tests, that every tabbi module resolves into the copy.

Usage: ``scripts/mutants.py [NAME ...] [-j N] [--list] [--check] [--baseline] [--keep]``
(``--check``: only that every snippet is found once and the result compiles, in seconds).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "tests" / "mutants.toml"
PYTHON = ROOT / ".venv" / "bin" / "python"
#: Import name -> folder of the copy (the package-dir mapping of pyproject.toml, plus the
#: top-level packages, for processes started elsewhere than the copy's root: kernels, servers).
PACKAGES = {"tabbi_extension": "extension", "tabbi_sandbox": "sandbox",
            "tabbi_kernel": "tabbi_kernel", "tests": "tests"}
SKIP = shutil.ignore_patterns(".git", ".venv", "node_modules", "test-artifacts", "__pycache__",
                              ".pytest_cache", ".ruff_cache", "*.egg-info")
PYTEST = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]


@dataclass
class Mutant:
    name: str
    guarantee: str
    file: str
    find: str
    replace: str
    tests: list[str]
    timeout: float = 900.0

    @classmethod
    def load(cls, path: Path = LIST) -> list[Mutant]:
        with open(path, "rb") as f:
            entries = tomllib.load(f)["mutant"]
        mutants = [cls(**entry) for entry in entries]
        names = [m.name for m in mutants]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise SystemExit(f"duplicate mutant names in {path}: {sorted(duplicates)}")
        return mutants


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # caught | SURVIVED | STALE | ERROR
    seconds: float
    detail: str = ""
    output: list[str] = field(default_factory=list)


def prepare(scratch: Path) -> dict[str, str]:
    """Copy the working tree into ``scratch`` and return the environment that imports from it."""
    copy = scratch / "repo"
    shutil.copytree(ROOT, copy, ignore=SKIP, symlinks=True)
    (copy / "node_modules").symlink_to(ROOT / "node_modules")
    if (ROOT / "convex" / "node_modules").exists():  # the Convex functions' npm project
        (copy / "convex" / "node_modules").symlink_to(ROOT / "convex" / "node_modules")
    links = scratch / "imports"
    links.mkdir()
    for name, folder in PACKAGES.items():
        (links / name).symlink_to(copy / folder)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = f"{links}{os.pathsep}{copy}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports(copy: Path, env: dict[str, str]) -> str | None:
    """None if every tabbi package imports from the copy, else what does not. Found the way
    ``import`` finds them, without running them (importing the server takes seconds)."""
    probe = ("import importlib.util, os\n"
             f"for name in {sorted(PACKAGES)!r}:\n"
             "    print(name, os.path.realpath(importlib.util.find_spec(name).origin))\n")
    done = subprocess.run([str(PYTHON), "-c", probe], cwd=copy, env=env, capture_output=True,
                          text=True, timeout=120)
    if done.returncode != 0:
        return f"importing the copy failed: {done.stderr.strip()[-500:]}"
    wrong = [line for line in done.stdout.splitlines()
             if not line.split(" ", 1)[1].startswith(str(copy) + os.sep)]
    return f"imported from outside the copy: {wrong}" if wrong else None


def mutated(root: Path, mutant: Mutant) -> tuple[str | None, str]:
    """The broken text of ``mutant.file`` under ``root``, or None and why the entry is stale."""
    target = root / mutant.file
    if not target.is_file():
        return None, f"{mutant.file} does not exist"
    text = target.read_text()
    found = text.count(mutant.find)
    if found != 1:
        return None, f"the snippet occurs {found} times in {mutant.file} (must be exactly once)"
    return text.replace(mutant.find, mutant.replace), ""


def compiles(mutant: Mutant, text: str) -> str | None:
    """None if the broken file is still valid Python (or not Python), else the syntax error."""
    if not mutant.file.endswith(".py"):
        return None
    try:
        compile(text, mutant.file, "exec")
    except SyntaxError as exc:
        return f"the mutated file does not compile: {exc.msg} (line {exc.lineno})"
    return None


def check(mutant: Mutant) -> Outcome:
    """Only whether the entry still applies, in the working tree itself (nothing is written)."""
    text, stale = mutated(ROOT, mutant)
    if text is None:
        return Outcome(mutant, "STALE", 0.0, stale)
    broken = compiles(mutant, text)
    return Outcome(mutant, "ERROR" if broken else "applies", 0.0, broken or "")


def kill_leftovers(scratch: Path) -> None:
    """End what a broken run left behind (a server or a sandbox the mutant kept from stopping):
    processes of the run inherit the copy's PYTHONPATH, and a sandbox runs the copy's bootstrap,
    so the copy's path is in their environment or argv. Nothing else names it."""
    needle = str(scratch).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as argv, open(f"/proc/{entry}/environ", "rb") as env:
                if needle not in argv.read() and needle not in env.read():
                    continue
            os.kill(int(entry), signal.SIGKILL)
        except OSError:  # ProcessLookupError included: it ended meanwhile
            continue


def run(mutant: Mutant, keep: bool = False, baseline: bool = False) -> Outcome:
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix=f"tabbi-mutant-{mutant.name}-"))

    def outcome(status: str, detail: str = "", output: list[str] | None = None) -> Outcome:
        return Outcome(mutant, status, time.monotonic() - started, detail, output or [])

    try:
        env = prepare(scratch)
        copy = scratch / "repo"
        if not baseline:
            text, stale = mutated(copy, mutant)
            if text is None:
                return outcome("STALE", stale)
            broken = compiles(mutant, text)
            if broken:
                return outcome("ERROR", broken)
            (copy / mutant.file).write_text(text)
        wrong = check_imports(copy, env)
        if wrong:
            return outcome("ERROR", wrong)
        missing = [t for t in mutant.tests if not (copy / t.split("::")[0]).exists()]
        if missing:
            return outcome("ERROR", f"no such test file: {missing}")
        try:
            done = subprocess.run([str(PYTHON), *PYTEST, *mutant.tests], cwd=copy, env=env,
                                  capture_output=True, text=True, timeout=mutant.timeout)
        except subprocess.TimeoutExpired:
            return outcome("caught", f"the tests ran past {mutant.timeout:.0f} s")
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        summary = tail[-1] if tail else ""
        if baseline:
            return outcome("passed" if done.returncode == 0 else "FAILED", summary, tail)
        if done.returncode == 0:
            return outcome("SURVIVED", summary, tail)
        if done.returncode == 1:
            return outcome("caught", summary, tail)
        return outcome("ERROR", f"pytest exit status {done.returncode}: {summary}", tail)
    except (OSError, subprocess.SubprocessError) as exc:
        return outcome("ERROR", f"{type(exc).__name__}: {exc}")
    finally:
        kill_leftovers(scratch)
        if keep:
            print(f"  kept {scratch}", flush=True)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only these entries (default: all)")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="entries run at once (default 1)")
    parser.add_argument("--list", action="store_true", help="print the entries and exit")
    parser.add_argument("--check", action="store_true",
                        help="only check that every entry applies (no tests run)")
    parser.add_argument("--baseline", action="store_true",
                        help="run each entry's tests WITHOUT its breakage (they must pass)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies")
    args = parser.parse_args(argv)

    mutants = Mutant.load()
    if args.names:
        unknown = set(args.names) - {m.name for m in mutants}
        if unknown:
            parser.error(f"no such entries: {sorted(unknown)}")
        mutants = [m for m in mutants if m.name in args.names]
    if args.list:
        for m in mutants:
            print(f"{m.name:32} {m.file:28} {m.guarantee}")
        return 0
    if not PYTHON.exists():
        parser.error(f"{PYTHON} is missing: run scripts/setup.sh first")

    began = time.monotonic()
    print(f"{len(mutants)} mutant(s), {args.jobs} at a time", flush=True)
    outcomes = []

    def one(mutant: Mutant) -> Outcome:
        if args.check:
            return check(mutant)
        result = run(mutant, keep=args.keep, baseline=args.baseline)
        print(f"  {result.status:8} {mutant.name} ({result.seconds:.0f} s) {result.detail}", flush=True)
        if result.status in ("SURVIVED", "ERROR", "FAILED"):
            for line in result.output:
                print(f"      | {line}", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        outcomes = list(pool.map(one, mutants))

    good = "applies" if args.check else "passed" if args.baseline else "caught"
    print(f"\n{'status':9} {'seconds':>7}  {'mutant':32} guarantee")
    for o in outcomes:
        print(f"{o.status:9} {o.seconds:7.0f}  {o.mutant.name:32} {o.mutant.guarantee}")
    counts = {status: sum(o.status == status for o in outcomes) for status in
              dict.fromkeys(o.status for o in outcomes)}
    wall = time.monotonic() - began
    print(f"\n{len(outcomes)} mutants: " + ", ".join(f"{n} {s}" for s, n in counts.items())
          + f"; wall time {wall:.0f} s")
    return 0 if all(o.status == good for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
