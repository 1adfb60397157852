"""Validation of everything that arrives from clients, at the edge, with messages people can act on.

The threats: option injection into git (a "repo" of ``--upload-pack=...``), transports that run
commands (``ext::``), credentials pasted into URLs (they would end up in logs and process lists),
path tricks in branch names (``../``, ``.lock``), and oversized prompts that would bloat the log.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_PROMPT_CHARS = 100_000
MAX_REPO_CHARS = 500
MAX_BRANCH_CHARS = 200

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


def parse_repo(spec: object, github_url: str = "https://github.com") -> RepoSpec:
    if not isinstance(spec, str) or not spec.strip():
        raise ValidationError("'repo' is required: owner/name, a git URL, or an absolute local path")
    spec = spec.strip()
    if len(spec) > MAX_REPO_CHARS or any(ch in spec for ch in "\0\n\r\t"):
        raise ValidationError("'repo' is too long or contains control characters")
    if spec.startswith("-"):
        raise ValidationError("'repo' must not start with '-'")
    if spec.startswith(("/", "~")):
        path = os.path.realpath(os.path.expanduser(spec))
        if not os.path.isdir(path):
            raise ValidationError(f"no such directory: {spec}")
        if not (os.path.isdir(os.path.join(path, ".git")) or os.path.isfile(os.path.join(path, "HEAD"))):
            raise ValidationError(f"{spec} is not a git repository")
        return RepoSpec("local", path, path, local_path=path)
    if "://" in spec:
        parts = urlsplit(spec)
        if parts.scheme not in _SCHEMES:
            raise ValidationError(
                f"unsupported repository URL scheme {parts.scheme!r}; use https://, http:// or file://"
            )
        if parts.username or parts.password:
            raise ValidationError("put no credentials in the repository URL; tabbi signs in for you")
        if parts.scheme == "file":
            return parse_repo(parts.path, github_url)
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
    try:
        seq = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValidationError(f"'{field}' must be a whole number") from None
    if seq < 0:
        raise ValidationError(f"'{field}' must not be negative")
    return seq
