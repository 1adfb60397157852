"""Confinement of local sandboxes with bubblewrap.

The threat: the agent runs model-chosen shell commands as the person's own user. Without a fence
it could read their home (SSH keys, cloud credentials), Jupyter's runtime dir (server tokens),
tabbi's data folder (the server's database, other sessions' workspaces and snapshots) or system
configuration holding secrets (``/etc/shadow`` when the server runs as root, ``/etc/jupyter``
with a deployment's tokens, package-manager credentials in ``/etc/pip.conf`` or ``npmrc``).
Under bubblewrap it sees only the system's programs and libraries read-only, from ``/etc`` only
what tools need to run (``ETC_ENTRIES``), its own sandbox folder writable, and the few host paths
it needs (the Python runtime, the bootstrap, the OpenCode binary, a local source repository)
read-only. It gets its own PID namespace, no capabilities, and dies with its parent.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
import sys
from functools import lru_cache

log = logging.getLogger(__name__)

#: System folders exposed read-only (symlinks such as /bin -> usr/bin are recreated as symlinks).
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64")

#: What of ``/etc`` the sandbox sees (read-only; missing ones are skipped), measured with strace
#: of git, bash, python3 (ssl, venv, mimetypes), node, OpenCode, ripgrep and curl: name lookups
#: and the network, users and groups (no passwords: those are in ``shadow``), TLS certificates,
#: the dynamic loader, time, Debian's alternatives and Python's per-version config, fonts for
#: plotting, R's config. Everything else (``shadow``, ``jupyter``, ``pip.conf``, ``npmrc``,
#: ``ssh``, ...) does not exist inside. No ``gitconfig``: git runs with ``GIT_CONFIG_NOSYSTEM``.
ETC_ENTRIES = (
    "resolv.conf", "hosts", "host.conf", "nsswitch.conf", "gai.conf", "services", "protocols",
    "passwd", "group", "ssl", "ca-certificates", "ca-certificates.conf", "pki", "crypto-policies",
    "gnutls", "alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone",
    "os-release", "debian_version", "mime.types", "python3*",
    "fonts", "matplotlibrc", "R", "shells", "inputrc", "terminfo", "mtab",
)


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


@lru_cache(maxsize=1)
def bwrap_works() -> tuple[bool, str]:
    """Whether bubblewrap can make a sandbox here (it may be installed yet refused by the kernel)."""
    path = bwrap_path()
    if path is None:
        return False, "bwrap is not installed (Debian package 'bubblewrap')"
    try:
        done = subprocess.run(
            [path, *system_args(), "--unshare-pid", "--die-with-parent", "true"],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"bwrap could not run: {exc}"
    if done.returncode != 0:
        return False, f"bwrap refused: {done.stderr.strip() or done.returncode}"
    return True, "bwrap works"


def system_args() -> list[str]:
    args: list[str] = []
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return [*args, *etc_args(), "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]


def etc_args() -> list[str]:
    """``/etc`` as a fresh folder holding only ``ETC_ENTRIES``. A link whose target is visible
    inside anyway (``localtime`` -> ``/usr/share/zoneinfo/...``, ``mtab`` -> ``/proc/...``) stays a
    link; any other entry is bound read-only as what it resolves to."""
    args = ["--dir", "/etc"]
    for path in sorted({p for name in ETC_ENTRIES for p in glob.glob(os.path.join("/etc", name))}):
        if os.path.islink(path):
            target = os.readlink(path)
            absolute = os.path.normpath(os.path.join("/etc", target))
            if absolute.split("/")[1] in ("usr", "proc", "lib"):
                args += ["--symlink", target, path]
                continue
        args += ["--ro-bind", path, path]
    return args


def runtime_paths() -> list[str]:
    """Host paths a sandbox needs to run this Python's standard library."""
    paths = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
    return sorted(p for p in paths if not p.startswith("/usr/"))


def wrap(
    argv: list[str],
    *,
    writable: list[str],
    read_only: list[str],
    cwd: str,
    die_with_parent: bool = True,
) -> list[str]:
    """The bwrap command line that runs ``argv`` confined. Paths are bound at the same place."""
    path = bwrap_path()
    assert path is not None, "wrap() called without bwrap"
    args = [
        path,
        *(["--die-with-parent"] if die_with_parent else []),
        "--new-session",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--cap-drop",
        "ALL",
        *system_args(),
    ]
    for ro in dict.fromkeys([*runtime_paths(), *read_only]):
        args += ["--ro-bind", ro, ro]
    for rw in dict.fromkeys(writable):
        args += ["--bind", rw, rw]
    return [*args, "--chdir", cwd, "--", *argv]


_warned = False


def choose(mode: str) -> bool:
    """Decide whether to use bubblewrap for ``mode`` in {"auto", "bwrap", "none"}.

    "auto" falls back to a plain subprocess and says so once in the log; "bwrap" insists.
    """
    global _warned
    if mode == "none":
        return False
    ok, why = bwrap_works()
    if ok:
        return True
    if mode == "bwrap":
        raise RuntimeError(f"isolation='bwrap' was asked for but {why}")
    if not _warned:
        log.warning("tabbi: sandboxes run as plain subprocesses without isolation: %s", why)
        _warned = True
    return False
