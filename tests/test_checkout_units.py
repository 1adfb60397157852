"""The two halves of ``%tabbi checkout`` with real git and no server: the program that makes the
checkout bundle (``tabbi_extension.bundle.CHECKOUT_PROGRAM``, run here in a repository standing
for the sandbox's workspace, as ``Sandbox.exec`` runs it there) and the kernel's working copy
(``tabbi_kernel.checkout.WorkingCopy``) that applies it.

Threat throughout: everything in a bundle is the agent's. It can forge objects and trees (a
``.git`` path, refs it was not asked for), plant links, attributes and config, make files huge
(or tiny in the bundle and huge once inflated), and race the person's own edits in the working
copy. The kernel must write nothing outside the folder, run nothing, and lose nothing of the
person's.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tabbi_extension import bundle
from tabbi_kernel import checkout
from tabbi_kernel.checkout import CheckoutError, WorkingCopy
from tests.conftest import git

SID = "ses-00000000c0de"


def make(workspace: Path, since: str | None, max_file: int = bundle.MAX_FILE_BYTES) -> tuple[dict, bytes]:
    """What the server answers: the program run in ``workspace``, its output checked."""
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", bundle.CHECKOUT_PROGRAM, since or "-", str(max_file),
         str(bundle.MAX_BUNDLE_BYTES)], cwd=workspace, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return bundle._decode(done.stdout, bundle.MAX_BUNDLE_BYTES)


def follow(copy: WorkingCopy, workspace: Path, tmp_path: Path, **options) -> checkout.Update:
    meta, data = make(workspace, copy.current(), **options)
    path = None
    if data:
        path = tmp_path / "b.bundle"
        path.write_bytes(data)
    return copy.apply(str(path) if path else None, meta)


@pytest.fixture
def workspace(source_repo: Path) -> Path:
    git("checkout", "--quiet", "-b", "tabbi/s", cwd=source_repo)
    return source_repo


@pytest.fixture
def copy(tmp_path: Path) -> WorkingCopy:
    made = WorkingCopy(str(tmp_path / "copy"), SID)
    made.prepare()
    return made


def state_of(repo: Path) -> tuple[str, str, bytes]:
    return (git("rev-parse", "HEAD", cwd=repo), git("status", "--porcelain", cwd=repo),
            (repo / ".git" / "index").read_bytes())


def test_follow_ups_carry_only_the_change_and_the_workspace_is_left_as_it_was(workspace, copy, tmp_path):
    (workspace / "data.txt").write_text(os.urandom(1800).hex())  # unchanged, incompressible
    (workspace / "mod.py").write_text("V = 1\n")
    (workspace / "huge.bin").write_bytes(b"\0" * 5000)
    before = state_of(workspace)
    first = follow(copy, workspace, tmp_path, max_file=4000)
    assert first.snapshot and first.skipped == ["huge.bin"]
    assert sorted(first.files) == ["README.md", "calc.py", "data.txt", "mod.py"]
    assert state_of(workspace) == before  # the agent's branch, index and files untouched
    first_size = (tmp_path / "b.bundle").stat().st_size

    (workspace / "mod.py").write_text("V = 2\n")
    second = follow(copy, workspace, tmp_path, max_file=4000)
    assert second.files == ["mod.py"] and Path(copy.path, "mod.py").read_text() == "V = 2\n"
    assert (tmp_path / "b.bundle").stat().st_size < first_size / 2  # only what changed travels

    (tmp_path / "b.bundle").unlink()
    again = follow(copy, workspace, tmp_path, max_file=4000)
    assert not again.changed and not (tmp_path / "b.bundle").exists()  # nothing sent at all


def test_the_persons_edits_are_kept_and_never_overwritten(workspace, copy, tmp_path):
    """Threat: the agent's next turn rewrites a file the person edited in the working copy (or
    creates one where the person made their own): the person's work must not vanish."""
    follow(copy, workspace, tmp_path)
    mine = Path(copy.path, "calc.py")
    mine.write_text("# my edit\n")
    (workspace / "README.md").write_text("# agent\n")  # a file the person did not touch
    follow(copy, workspace, tmp_path)
    assert mine.read_text() == "# my edit\n" and Path(copy.path, "README.md").read_text() == "# agent\n"

    (workspace / "calc.py").write_text("# agent's calc\n")
    with pytest.raises(CheckoutError, match="to keep your changes") as refused:
        follow(copy, workspace, tmp_path)
    assert "calc.py" in str(refused.value)
    assert mine.read_text() == "# my edit\n"

    Path(copy.path, "notes.py").write_text("mine\n")  # untracked, the agent then adds the same name
    mine.write_text("def add(a, b):\n    return a + b\n")  # the person gave up the edit
    (workspace / "notes.py").write_text("agent\n")
    with pytest.raises(CheckoutError, match="to keep your changes"):
        follow(copy, workspace, tmp_path)
    assert Path(copy.path, "notes.py").read_text() == "mine\n"


def test_links_become_plain_files_and_nothing_is_written_outside(workspace, copy, tmp_path):
    """Threat: a link to the person's file (read, or written through by a later update or by the
    person's code), then a later tree putting a file under the link's name as a folder."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("mine\n")
    os.symlink(outside / "secret", workspace / "leak")
    os.symlink(outside, workspace / "into")
    follow(copy, workspace, tmp_path)
    for name in ("leak", "into"):
        path = Path(copy.path, name)
        assert path.is_file() and not path.is_symlink(), name
    assert Path(copy.path, "leak").read_text() == str(outside / "secret")

    (workspace / "into").unlink()
    (workspace / "into").mkdir()
    (workspace / "into" / "planted.py").write_text("X = 1\n")
    follow(copy, workspace, tmp_path)
    assert Path(copy.path, "into", "planted.py").read_text() == "X = 1\n"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_the_persons_git_config_never_meets_the_agents_attributes(workspace, copy, tmp_path, monkeypatch):
    """Threat: the person's own git config defines a filter (git-lfs, or any tool), and the
    agent's ``.gitattributes`` names it for every file: the kernel's git would run it on the
    agent's content. It runs with no config but the working copy's."""
    home = tmp_path / "home"
    home.mkdir()
    ran = tmp_path / "filter-ran"
    (home / ".gitconfig").write_text(f"[filter \"lfs\"]\n\tsmudge = touch {ran}; cat\n"
                                     f"\trequired = true\n[core]\n\thooksPath = {home}\n")
    (home / "post-checkout").write_text(f"#!/bin/sh\ntouch {ran}-hook\n")
    (home / "post-checkout").chmod(0o755)
    (workspace / ".gitattributes").write_text("* filter=lfs\n")
    meta, data = make(workspace, None)  # in the sandbox, with the sandbox's own home
    (tmp_path / "b.bundle").write_bytes(data)
    monkeypatch.setenv("HOME", str(home))  # the kernel: the person's home and config
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    copy.apply(str(tmp_path / "b.bundle"), meta)
    assert Path(copy.path, "calc.py").read_text() == "def add(a, b):\n    return a + b\n"
    assert not list(tmp_path.glob("filter-ran*"))


def forged(workspace: Path, tree_entries: bytes) -> tuple[dict, bytes]:
    """A bundle of a checkout commit whose tree the agent wrote byte by byte."""
    def hashed(kind: str, content: bytes) -> str:
        return subprocess.run(["git", "hash-object", "-t", kind, "-w", "--literally", "--stdin"],
                              cwd=workspace, input=content, capture_output=True,
                              check=True).stdout.decode().strip()

    blob = hashed("blob", b"#!/bin/sh\necho pwned\n")
    hooks = hashed("tree", b"100755 post-checkout\0" + bytes.fromhex(blob))
    tree = hashed("tree", tree_entries.replace(b"HOOKS", bytes.fromhex(hooks)))
    tip = git("commit-tree", tree, "-m", "forged", cwd=workspace)
    git("update-ref", bundle.REF, tip, cwd=workspace)
    data = subprocess.run(["git", "bundle", "create", "--quiet", "-", bundle.REF], cwd=workspace,
                          capture_output=True, check=True).stdout
    return {"tip": tip, "head": tip}, data


@pytest.mark.parametrize("name", [b".git", b".GIT", b"git~1"])
def test_a_forged_tree_with_a_git_folder_is_refused_before_anything_is_written(workspace, copy, tmp_path,
                                                                               name):
    """Threat: the agent hands over a tree holding ``.git/hooks/post-checkout`` (or a look-alike
    on case-insensitive or 8.3-name filesystems): written into the working copy, it would be
    this folder's git hook. ``index-pack --strict`` refuses the object before any checkout."""
    meta, data = forged(workspace, b"40000 " + name + b"\0" + b"HOOKS")
    path = tmp_path / "forged.bundle"
    path.write_bytes(data)
    with pytest.raises(CheckoutError, match="bundle was refused"):
        copy.apply(str(path), meta)
    assert sorted(os.listdir(copy.path)) == [".git"] and copy.current() is None
    assert not (Path(copy.git_dir) / "hooks").exists()


def test_bundles_naming_other_refs_or_another_tip_are_refused(workspace, copy, tmp_path):
    meta, data = make(workspace, None)
    path = tmp_path / "b.bundle"
    extra = subprocess.run(["git", "bundle", "create", "--quiet", "-", bundle.REF, "main"], cwd=workspace,
                           capture_output=True, check=True).stdout
    path.write_bytes(extra)
    with pytest.raises(CheckoutError, match="other refs"):
        copy.apply(str(path), meta)
    path.write_bytes(data)
    with pytest.raises(CheckoutError, match="other refs"):
        copy.apply(str(path), {**meta, "tip": git("rev-parse", "main", cwd=workspace)})
    with pytest.raises(bundle.BundleError, match="other refs"):
        bundle.check_header(extra, meta["tip"])
    assert copy.current() is None


def test_files_too_large_once_unpacked_are_refused(workspace, copy, tmp_path, monkeypatch):
    """Threat: a file of zeros is a few kB in the bundle and as large as the agent likes on disk."""
    monkeypatch.setattr(checkout, "MAX_FILE_BYTES", 1 << 20)
    (workspace / "zeros.bin").write_bytes(b"\0" * (2 << 20))
    git("add", "zeros.bin", cwd=workspace)
    git("commit", "--quiet", "-m", "zeros", cwd=workspace)
    meta, data = make(workspace, None)
    assert len(data) < 100_000
    path = tmp_path / "b.bundle"
    path.write_bytes(data)
    with pytest.raises(CheckoutError, match=r"zeros\.bin is larger than 1 MB"):
        copy.apply(str(path), meta)
    assert sorted(os.listdir(copy.path)) == [".git"]


def test_the_folder_must_be_empty_or_this_sessions_and_stay_where_it_was(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(CheckoutError, match="not empty"):
        WorkingCopy(str(full), SID).prepare()
    WorkingCopy(str(tmp_path / "a"), SID).prepare()
    with pytest.raises(CheckoutError, match="not the working copy of ses-00000000beef"):
        WorkingCopy(str(tmp_path / "a"), "ses-00000000beef").prepare()
    # Threat: the folder swapped for a link (to the person's home, say) between two updates.
    copy = WorkingCopy(str(tmp_path / "a"), SID)
    (tmp_path / "a").rename(tmp_path / "moved")
    (tmp_path / "a").symlink_to(tmp_path / "full")
    with pytest.raises(CheckoutError, match="no longer leads to"):
        copy.apply(None, {"tip": hashlib.sha1(b"x").hexdigest()})
    assert sorted(os.listdir(full)) == ["x"]


def test_the_workspace_as_it_is_mid_merge_and_with_a_folder_turned_file(workspace, copy, tmp_path):
    """The agent leaves its repository in any state: a conflicted merge (an index git cannot
    write a tree from), a tracked folder replaced by a file. The checkout still shows the files."""
    (workspace / "pkg").mkdir()
    (workspace / "pkg" / "a.py").write_text("A = 1\n")
    git("add", "pkg", cwd=workspace)
    git("commit", "--quiet", "-m", "pkg", cwd=workspace)
    git("checkout", "--quiet", "-b", "other", cwd=workspace)
    (workspace / "calc.py").write_text("other\n")
    git("commit", "--quiet", "-am", "other", cwd=workspace)
    git("checkout", "--quiet", "tabbi/s", cwd=workspace)
    (workspace / "calc.py").write_text("mine\n")
    git("commit", "--quiet", "-am", "mine", cwd=workspace)
    subprocess.run(["git", "merge", "--quiet", "other"], cwd=workspace, capture_output=True)
    assert "UU calc.py" in git("status", "--porcelain", cwd=workspace)
    subprocess.run(["rm", "-r", str(workspace / "pkg")], check=True)
    (workspace / "pkg").write_text("now a file\n")
    follow(copy, workspace, tmp_path)
    assert Path(copy.path, "pkg").read_text() == "now a file\n"
    assert "<<<<<<<" in Path(copy.path, "calc.py").read_text()


def test_the_header_stays_small_whatever_the_agent_names_its_files():
    """Threat: the agent names twenty skipped files with 300 emoji each. Escaped for the ASCII
    header that was 72 KB, past the 64 KB line HTTP clients accept, and ``%tabbi checkout`` failed
    with a traceback. The names are dropped from the end until the header fits."""
    import json

    tip = "a" * 40
    meta = {"tip": tip, "head": tip, "branch": "\U0001f600" * 300, "snapshot": False,
            "skipped": ["\U0001f600" * 300] * 20}
    clean, data = bundle._decode(json.dumps(meta) + "\n", bundle.MAX_BUNDLE_BYTES)
    header = json.dumps(clean, ensure_ascii=True)
    assert data == b"" and len(header) <= bundle.MAX_HEADER_BYTES
    assert 0 < len(clean["skipped"]) < 20 and clean["tip"] == tip
