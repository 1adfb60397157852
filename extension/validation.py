"""Validation of everything that arrives from clients, at the edge, with messages people can act on.

The threats: option injection into git (a "repo" of ``--upload-pack=...``), transports that run
commands (``ext::``), credentials pasted into URLs (they would end up in logs and process lists),
path tricks in branch names (``../``, ``.lock``), oversized prompts that would bloat the log, a
local "repo" that is someone else's folder (another user's files, another session's live workspace
under the data dir), and input that is well-formed JSON yet breaks what comes after: numbers past
SQLite's 64-bit integers, lone surrogates that no UTF-8 encoder accepts, NUL bytes in paths.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_PROMPT_CHARS = 100_000
MAX_REPO_CHARS = 500
MAX_BRANCH_CHARS = 200
#: The largest integer SQLite stores (a signed 64-bit integer): the bound of every seq and limit.
MAX_SEQ = 2**63 - 1

_OWNER_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}$")
_BRANCH_CHARS = re.compile(r"^[A-Za-z0-9._/-]+$")
_MODEL = re.compile(r"^[A-Za-z0-9._:@-]+(?:/[A-Za-z0-9._:@/-]+)?$")
_SCHEMES = {"https", "http", "file"}


class ValidationError(ValueError):
    """Bad input; the message goes back to the client with a 400."""


@dataclass(frozen=True)
class RepoSpec:
    kind: str  # "local" | "url" | "github"
    url: str  # what git clones
    display: str  # what people see (never carries credentials)
    local_path: str | None = None


#: The one answer for every local path a person may not use, whether it exists or not.
LOCAL_REFUSED = (
    "'repo' as a local path must be a git repository inside your Jupyter root directory "
    "({roots}); other local paths cannot be used"
)


@dataclass(frozen=True)
class LocalRepoPolicy:
    """Which local folders a person may start a session from (and push back into).

    Without a fence, ``repo`` could name any folder the server user can read: another person's
    files on a shared server, or another session's live workspace under tabbi's data dir (which
    the session would then clone and push a branch into). Only folders inside ``roots`` (the
    person's Jupyter root dir: what they can already read through Jupyter) and under none of
    ``forbidden`` are allowed, both compared after resolving symlinks. Every other path gets the
    same message, and a path outside the roots is refused before anything looks at it, so the
    answer says nothing about whether it exists.
    """

    roots: tuple[str, ...]
    forbidden: tuple[str, ...] = ()

    @classmethod
    def for_person(cls, roots: Iterable[str], forbidden: Iterable[str], username: str) -> LocalRepoPolicy:
        """``roots`` may name ``{username}`` (``/home/{username}``): one folder per person."""
        return cls(tuple(r.replace("{username}", username) for r in roots if r), tuple(forbidden))

    def refuse(self) -> ValidationError:
        return ValidationError(LOCAL_REFUSED.format(roots=", ".join(self.roots) or "none configured"))

    def admit(self, path: str) -> str:
        """The real path of ``path`` (absolute, normalized) if it is allowed; else the refusal.
        Touches the file system (resolving links), so run it off the event loop."""
        roots = [(os.path.normpath(root), _real(root)) for root in self.roots]
        if not any(_inside(path, spelled) or _inside(path, real) for spelled, real in roots):
            raise self.refuse()  # before any lookup of the path: nothing to learn from timing
        real = _real(path)
        forbidden = [_real(folder) for folder in self.forbidden]
        if (
            real is None
            or not any(_inside(real, root) for _, root in roots)
            or any(_inside(real, folder) for folder in forbidden)
        ):
            raise self.refuse()
        return real


def _real(path: str) -> str | None:
    """``realpath``, or None where a link cannot be read (``/proc/1/root`` for a non-root
    server user raises there)."""
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return None


def _inside(path: str | None, folder: str | None) -> bool:
    if path is None or folder is None:
        return False
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def parse_repo(
    spec: object, github_url: str = "https://github.com", local: LocalRepoPolicy | None = None
) -> RepoSpec:
    """What git clones for ``spec``. A local path must pass ``local`` (the requesting person's
    policy); ``local=None`` is only for specs admitted when their session was created (stored
    records, which hold the resolved path)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValidationError("'repo' is required: owner/name, a git URL, or an absolute local path")
    spec = spec.strip()
    if len(spec) > MAX_REPO_CHARS or any(ch in spec for ch in "\0\n\r\t"):
        raise ValidationError("'repo' is too long or contains control characters")
    if not _encodable(spec):
        raise ValidationError("'repo' contains characters that are not valid Unicode")
    if spec.startswith("-"):
        raise ValidationError("'repo' must not start with '-'")
    if spec.startswith(("/", "~")):
        path = os.path.normpath(os.path.expanduser(spec))
        if not os.path.isabs(path):  # ~name of no such user: refused like any other path
            if local is not None:
                raise local.refuse()
            raise ValidationError(f"cannot read {spec!r} as a repository: give an absolute path")
        real = local.admit(path) if local is not None else _real(path)
        if real is None or not os.path.isdir(real):
            raise ValidationError(f"no such directory: {spec}")
        git_dir = os.path.join(real, ".git")
        if not (os.path.isdir(git_dir) or os.path.isfile(os.path.join(real, "HEAD"))):
            raise ValidationError(f"{spec} is not a git repository")
        if local is not None and not _has_commits(git_dir if os.path.isdir(git_dir) else real):
            raise ValidationError(f"{spec} has no commits yet: make a first commit, then start again")
        return RepoSpec("local", real, real, local_path=real)
    if "://" in spec:
        parts = urlsplit(spec)
        if parts.scheme not in _SCHEMES:
            raise ValidationError(
                f"unsupported repository URL scheme {parts.scheme!r}; use https://, http:// or file://"
            )
        if parts.username or parts.password:
            raise ValidationError("put no credentials in the repository URL; tabbi signs in for you")
        if parts.scheme == "file":
            return parse_repo(parts.path, github_url, local)
        if not parts.hostname:
            raise ValidationError("the repository URL has no host")
        return RepoSpec("url", spec, spec)
    if "::" in spec:
        raise ValidationError("git transport syntax ('transport::address') is not allowed")
    if _OWNER_NAME.match(spec):
        name = spec.removesuffix(".git")
        return RepoSpec("github", f"{github_url.rstrip('/')}/{name}.git", name)
    raise ValidationError(
        f"cannot read {spec!r} as a repository: use owner/name, https://host/path.git, "
        "file:///path, or an absolute path"
    )


def _has_commits(git_dir: str) -> bool:
    """Whether the repository has a commit: a detached HEAD, a branch, or a repository whose
    refs are not plain files (reftable). Read from its files: running git in it would obey its
    config. A new repository with no commit yet would fail the clone's first step with git's
    own cryptic message. What cannot be told (an unreadable HEAD) counts as a commit: git
    then says what is wrong."""
    head, packed = os.path.join(git_dir, "HEAD"), os.path.join(git_dir, "packed-refs")
    try:
        if not os.path.isfile(head):  # not a FIFO either: opening one would wait for a writer
            return True
        with open(head) as f:
            if not f.read(100).startswith("ref:"):
                return True
    except (OSError, UnicodeDecodeError):
        return True
    if os.path.isdir(os.path.join(git_dir, "reftable")):
        return True
    for _, _, files in os.walk(os.path.join(git_dir, "refs", "heads")):
        if files:
            return True
    try:
        if os.path.isfile(packed):
            with open(packed) as f:
                return any(" refs/heads/" in line for line in f)
    except (OSError, UnicodeDecodeError):
        return True
    return False


def validate_branch(name: object, field: str = "branch") -> str | None:
    """Git's ref-name rules, plus no leading '-' (it would read as an option)."""
    if name is None or name == "":
        return None
    if not isinstance(name, str) or len(name) > MAX_BRANCH_CHARS:
        raise ValidationError(f"'{field}' must be a string of at most {MAX_BRANCH_CHARS} characters")
    bad = (
        not _BRANCH_CHARS.match(name)
        or name.startswith(("-", "/", "."))
        or name.endswith(("/", ".", ".lock"))
        or ".." in name
        or "//" in name
        or "/." in name
        or "@{" in name
    )
    if bad:
        raise ValidationError(
            f"'{field}' {name!r} is not a valid branch name (letters, digits, '.', '_', '-', '/'; "
            "no '..', no leading '-' or '.', no trailing '/' or '.lock')"
        )
    return name


def validate_prompt(text: object, limit: int = MAX_PROMPT_CHARS) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValidationError("'text' is required and must be a non-empty string")
    if len(text) > limit:
        raise ValidationError(f"the prompt is {len(text)} characters; the limit is {limit}")
    if "\0" in text:
        raise ValidationError("the prompt contains a NUL character")
    if not _encodable(text):
        raise ValidationError("the prompt contains a lone surrogate (text that is not valid Unicode)")
    return text


def validate_model(model: object) -> str | None:
    if model is None or model == "":
        return None
    if not isinstance(model, str) or len(model) > 200 or not _MODEL.match(model):
        raise ValidationError(
            "'model' must look like provider/model (or a bare model id with TABBI_LLM_BASE_URL)"
        )
    return model


def validate_seq(value: object, field: str = "after") -> int:
    """A seq (or count) as stored: 0 to ``MAX_SEQ``; larger ones would overflow SQLite."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (
        isinstance(value, str) and len(value) > 30
    ):
        raise ValidationError(f"'{field}' must be a whole number")
    try:
        seq = int(value)
    except ValueError:
        raise ValidationError(f"'{field}' must be a whole number") from None
    if seq < 0:
        raise ValidationError(f"'{field}' must not be negative")
    if seq > MAX_SEQ:
        raise ValidationError(f"'{field}' must be at most {MAX_SEQ}")
    return seq


def validate_wait(value: object, maximum: float, field: str = "wait") -> float:
    """Seconds to long-poll: a finite number, clamped to 0..``maximum``."""
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise ValidationError(f"'{field}' must be a number of seconds") from None
    if math.isnan(seconds):
        raise ValidationError(f"'{field}' must be a number of seconds")
    return min(max(seconds, 0.0), maximum)


def validate_flag(value: object, field: str) -> bool:
    """An optional JSON boolean (absent or null: false). ``"false"`` is refused, not true."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValidationError(f"'{field}' must be true or false")
    return value


def check_json_text(data: object) -> None:
    """Refuse a decoded JSON body holding a lone surrogate anywhere (``"\\ud800"`` is valid JSON
    but no UTF-8 encoder, SQLite included, accepts it)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("the request body contains text that is not valid Unicode "
                              "(a lone surrogate)") from None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: What a prompt may carry besides its text (tabbi_kernel/context.py makes them): the kinds, and
#: bounds per piece, in all and in number, so that one prompt cannot bloat the store or the model's
#: context beyond what a person could mean to attach.
ATTACHMENT_KINDS = frozenset({"variable", "cells", "error", "file"})
MAX_ATTACHMENTS = 20
MAX_ATTACHMENT_BYTES = 64 * 1024
MAX_ATTACHMENTS_BYTES = 256 * 1024
MAX_LABEL_CHARS = 300


def validate_attachments(value: object) -> list[dict]:
    """``attachments``: absent or a list of ``{kind, label, content, truncated?}``; returned as clean
    dicts (no other keys). Sizes are UTF-8 bytes of ``content``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValidationError("'attachments' must be a list of {kind, label, content, truncated}")
    if len(value) > MAX_ATTACHMENTS:
        raise ValidationError(f"{len(value)} attachments; at most {MAX_ATTACHMENTS} go with one prompt")
    clean, total = [], 0
    for n, item in enumerate(value, 1):
        if not isinstance(item, dict):
            raise ValidationError(f"attachment {n} must be an object {{kind, label, content, truncated}}")
        kind, label, content = item.get("kind"), item.get("label"), item.get("content")
        truncated = validate_flag(item.get("truncated"), f"attachments[{n}].truncated")
        if kind not in ATTACHMENT_KINDS:
            kinds = ", ".join(sorted(ATTACHMENT_KINDS))
            raise ValidationError(f"attachment {n}: 'kind' must be one of {kinds}")
        if not isinstance(label, str) or not label.strip() or len(label) > MAX_LABEL_CHARS \
                or any(ch in label for ch in "\0\n\r"):
            raise ValidationError(f"attachment {n}: 'label' must be one line of at most {MAX_LABEL_CHARS} "
                                  "characters")
        if not isinstance(content, str):
            raise ValidationError(f"attachment {n} ({label}): 'content' must be a string")
        if "\0" in content or not _encodable(content) or not _encodable(label):
            raise ValidationError(f"attachment {n} ({label}): NUL or text that is not valid Unicode")
        size = len(content.encode("utf-8"))
        if size > MAX_ATTACHMENT_BYTES:
            raise ValidationError(f"attachment {n} ({label}) is {size:,} bytes; the limit per attachment "
                                  f"is {MAX_ATTACHMENT_BYTES:,}")
        total += size
        if total > MAX_ATTACHMENTS_BYTES:
            raise ValidationError(f"the attachments are over {MAX_ATTACHMENTS_BYTES:,} bytes in all; "
                                  "attach less")
        clean.append({"kind": kind, "label": label, "content": content, "truncated": truncated})
    return clean
