"""The session's work as a git bundle, for ``%tabbi checkout`` (the kernel keeps a working copy of
it): ``GET /tabbi/api/sessions/<id>/bundle[?since=COMMIT]``.

What the bundle holds: a *checkout commit* of the workspace as it is now, the agent's uncommitted
changes and untracked files included (what ``GET /diff`` shows), made inside the sandbox on the
throwaway ref ``refs/tabbi/checkout``: the workspace's index is copied to a private index file,
the changed files are added to it, and its tree is committed with the kernel's last commit
(``since``) as parent, or none (the first checkout carries no history, only the tree). So a
follow-up bundle holds only what changed since the kernel's copy, and the session branch, the
agent's index and its working tree are left as they were. A file larger than
``MAX_FILE_BYTES`` is left out of the tree (its previous version, if any, stays) and named in
``skipped``.

Like the diff, the work runs in the sandbox (``Sandbox.exec``: confined like the agent, local and
Modal alike), so no git process of the server ever reads the agent's repository or its config;
the server only bounds, decodes and checks the bytes (``check_header``: a v2 bundle naming the
one ref, whose tip is the commit the program reported). What the bundle's objects hold is the
agent's: the kernel checks every object it takes (``tabbi_kernel.checkout``).

The answer is the bundle's bytes (empty when the kernel's commit is already the workspace's
state) with a header ``X-Tabbi-Checkout``: JSON ``{tip, head, branch, snapshot, skipped, bytes}``,
ASCII only (``ensure_ascii``: no line break can end the header early).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from typing import Any

from jupyter_server.auth.decorator import authorized
from tornado import web

from tabbi_sandbox.provider import Sandbox

from .agent import AgentError
from .handlers import SESSION_ID, TabbiHandler
from .validation import ValidationError

#: The ref the checkout commit is kept on in the sandbox (not a branch: a push never takes it).
REF = "refs/tabbi/checkout"
#: Largest bundle served (and read from the sandbox); a larger one is refused with a message.
MAX_BUNDLE_BYTES = 200 << 20
#: A file larger than this is left out of the checkout commit (listed in ``skipped``).
MAX_FILE_BYTES = 50 << 20
#: Names listed in ``skipped`` at most, and the header's largest size (the agent names the files:
#: an emoji is 12 ASCII characters once escaped, and HTTP clients refuse lines over 64 KB).
MAX_SKIPPED = 20
MAX_HEADER_BYTES = 8192
COMMIT = re.compile(r"[0-9a-f]{40}")
SIGNATURE = b"# v2 git bundle\n"

#: Runs in the sandbox as ``python -I -S -c CHECKOUT_PROGRAM since max_file max_bundle``: one JSON
#: line, then (unless ``bundle`` is false) the bundle in base64. Isolated mode: nothing the agent
#: put in the workspace or the environment is imported. Exit 3: too large.
CHECKOUT_PROGRAM = r"""
import base64, json, os, shutil, stat, subprocess, sys, tempfile

since, max_file, max_bundle = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
REF = "refs/tabbi/checkout"
GIT = ["git", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false",
       "-c", "core.quotepath=off", "-c", "commit.gpgsign=false"]
scratch = tempfile.mkdtemp(prefix="tabbi-checkout-")
ENV = {**os.environ, "GIT_INDEX_FILE": os.path.join(scratch, "index"),
       "GIT_AUTHOR_NAME": "tabbi", "GIT_AUTHOR_EMAIL": "tabbi@localhost",
       "GIT_COMMITTER_NAME": "tabbi", "GIT_COMMITTER_EMAIL": "tabbi@localhost"}


class Failed(Exception):
    pass


def git(args, data=None, check=True):
    done = subprocess.run(GIT + args, input=data, capture_output=True, env=ENV)
    if check and done.returncode != 0:
        raise Failed(done.stderr.decode(errors="replace")[-300:])
    return done


def out(args):
    return git(args).stdout.decode().strip()


def build_tree(agent_index, index, max_file):
    # The workspace's tree (and the names left out), through a private index: a copy of the
    # agent's (its stat data spares hashing every file again) or, failing that, HEAD's.
    if agent_index:
        shutil.copyfile(index, ENV["GIT_INDEX_FILE"], follow_symlinks=False)
    else:
        git(["read-tree", "HEAD"])
    changed = git(["diff-files", "-z", "--name-only"]).stdout.split(b"\0")
    changed += git(["ls-files", "-z", "--others", "--exclude-standard"]).stdout.split(b"\0")
    add, skipped = [], []
    for raw in filter(None, changed):
        try:
            info = os.lstat(os.fsdecode(raw))
        except OSError:
            add.append(raw)  # deleted: update-index --remove drops it
            continue
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
            continue  # folders (an embedded repository), FIFOs, devices
        if info.st_size > max_file:
            skipped.append(raw.decode(errors="replace"))
            continue
        add.append(raw)
    if add:
        git(["update-index", "--add", "--remove", "--replace", "-z", "--stdin"],
            b"\0".join(add) + b"\0")
    # Files committed (by the agent) or staged over the limit are dropped from the tree too.
    listed = [line for line in git(["ls-files", "-z", "-s"]).stdout.split(b"\0") if line]
    ids = b"".join(line.split(b" ")[1] + b"\n" for line in listed)
    big = set()
    if ids:
        checked = git(["cat-file", "--batch-check=%(objectname) %(objectsize)"], ids).stdout
        for row in checked.decode().splitlines():
            parts = row.split()
            if len(parts) == 2 and parts[1].isdigit() and int(parts[1]) > max_file:
                big.add(parts[0])
    drop = [line.split(b"\t", 1)[1] for line in listed if line.split(b" ")[1].decode() in big]
    if drop:
        skipped += [p.decode(errors="replace") for p in drop]
        git(["update-index", "--force-remove", "-z", "--stdin"], b"\0".join(drop) + b"\0")
    return out(["write-tree"]), skipped


def main():
    head = out(["rev-parse", "--verify", "HEAD^{commit}"])
    branch = git(["symbolic-ref", "--short", "-q", "HEAD"], check=False).stdout.decode().strip()
    index = os.path.join(out(["rev-parse", "--absolute-git-dir"]), "index")
    try:
        tree, skipped = build_tree(True, index, max_file)
    except (OSError, Failed):  # no index, or one write-tree refuses (a merge in progress)
        tree, skipped = build_tree(False, index, max_file)
    base = since if since != "-" and git(["cat-file", "-e", since + "^{commit}"],
                                          check=False).returncode == 0 else None
    if base is not None and out(["rev-parse", base + "^{tree}"]) == tree:
        tip = base
    else:
        date = out(["log", "-1", "--format=%ct +0000", head])
        env = {**ENV, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}
        message = f"tabbi checkout of {branch or 'HEAD'} at {head[:12]}\n\nHead: {head}\n"
        parents = ["-p", base] if base else []
        tip = subprocess.run(GIT + ["commit-tree", tree, *parents, "-m", message],
                             capture_output=True, env=env, check=True).stdout.decode().strip()
        git(["update-ref", REF, tip])
    meta = {"tip": tip, "head": head, "branch": branch,
            "snapshot": tree != out(["rev-parse", head + "^{tree}"]),
            "skipped": skipped[:20], "bundle": tip != base}
    data = b""
    if meta["bundle"]:
        args = ["bundle", "create", "--quiet", "-", REF] + (["^" + base] if base else [])
        proc = subprocess.Popen(GIT + args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, env=ENV)
        data = proc.stdout.read(max_bundle + 1)
        if len(data) > max_bundle:
            proc.kill()
            proc.wait()
            sys.stderr.write(f"the checkout bundle is larger than {max_bundle >> 20} MB")
            sys.exit(3)
        if proc.wait() != 0:
            sys.stderr.write("git bundle create failed")
            sys.exit(2)
    meta["bytes"] = len(data)
    sys.stdout.write(json.dumps(meta) + "\n")
    sys.stdout.write(base64.b64encode(data).decode())


try:
    main()
except Failed as exc:
    sys.stderr.write(str(exc))
    sys.exit(2)
finally:
    shutil.rmtree(scratch, ignore_errors=True)
"""


class BundleError(AgentError):
    """The checkout bundle could not be made or was refused."""


def check_since(value: object) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or not COMMIT.fullmatch(value):
        raise ValidationError("'since' must be a commit id (40 hex digits)")
    return value


def check_header(data: bytes, tip: str) -> None:
    """A bundle of the one ``REF`` at ``tip`` (git bundle v2), else ``BundleError``."""
    end = data.find(b"\n\n")
    if not data.startswith(SIGNATURE) or end < 0:
        raise BundleError("the sandbox sent something that is not a git bundle", 502)
    refs = []
    for line in data[len(SIGNATURE):end].split(b"\n"):
        if line.startswith(b"-"):
            if not COMMIT.fullmatch(line[1:41].decode(errors="replace")):
                raise BundleError("the sandbox's bundle names a malformed prerequisite", 502)
        else:
            refs.append(line)
    if refs != [f"{tip} {REF}".encode()]:
        raise BundleError("the sandbox's bundle holds other refs than the checkout commit", 502)


def _decode(output: str, limit: int) -> tuple[dict[str, Any], bytes]:
    first, _, rest = output.partition("\n")
    try:
        meta = json.loads(first)
        data = base64.b64decode(rest, validate=True)
    except (ValueError, binascii.Error):
        raise BundleError("the sandbox's checkout answer could not be read", 502) from None
    if not isinstance(meta, dict) or not COMMIT.fullmatch(str(meta.get("tip"))) or \
            not COMMIT.fullmatch(str(meta.get("head"))):
        raise BundleError("the sandbox's checkout answer could not be read", 502)
    if len(data) > limit:
        raise BundleError(f"the checkout bundle is larger than {limit >> 20} MB", 413)
    if data:
        check_header(data, meta["tip"])
    skipped = meta.get("skipped")
    skipped = [str(p)[:300] for p in skipped[:MAX_SKIPPED]] if isinstance(skipped, list) else []
    clean = {"tip": meta["tip"], "head": meta["head"], "branch": str(meta.get("branch") or "")[:300],
             "snapshot": meta.get("snapshot") is True, "skipped": skipped, "bytes": len(data)}
    while len(json.dumps(clean, ensure_ascii=True)) > MAX_HEADER_BYTES and (skipped or clean["branch"]):
        if skipped:
            skipped.pop()
        else:
            clean["branch"] = ""
    return clean, data


async def make_bundle(sandbox: Sandbox, since: str | None) -> tuple[dict[str, Any], bytes]:
    """``(meta, bundle bytes)`` of the workspace now, as the module says; empty bytes when
    ``since`` already is that state."""
    max_bytes, max_file = MAX_BUNDLE_BYTES, MAX_FILE_BYTES
    interpreter = sandbox.bootstrap_argv()[0]
    argv = [interpreter, "-I", "-S", "-c", CHECKOUT_PROGRAM, since or "-", str(max_file), str(max_bytes)]
    result = await sandbox.exec(argv, timeout=600, max_output=(max_bytes * 4) // 3 + 65536)
    if result.returncode == 3:
        raise BundleError(f"the session's files are larger than {max_bytes >> 20} MB as a bundle: "
                          "checkout cannot take them", 413)
    if result.returncode != 0:
        raise BundleError(f"the checkout bundle could not be made: {result.stderr.strip()[-300:]}", 500)
    return await asyncio.to_thread(_decode, result.stdout, max_bytes)


class BundleHandler(TabbiHandler):
    @web.authenticated
    @authorized
    async def get(self, session_id: str) -> None:
        since = check_since(self.get_query_argument("since", None))
        agent = await self.session(session_id)  # 404 for anyone else's
        meta, data = await make_bundle(agent.running_sandbox(), since)
        self.set_header("Content-Type", "application/x-git-bundle")
        self.set_header("X-Tabbi-Checkout", json.dumps(meta, ensure_ascii=True))
        self.finish(data)


def routes() -> list[tuple[str, type]]:
    return [(f"/tabbi/api/sessions/{SESSION_ID}/bundle", BundleHandler)]
