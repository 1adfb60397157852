"""Finding the OpenCode binary, and saying what was tried when it cannot be found."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: The version the project pins in package.json and tests against.
PINNED_VERSION = "1.18.33"

#: Where ``npm install`` in the project folder puts it (the set-up of the README does that).
PROJECT_INSTALL = Path(__file__).resolve().parent.parent / "node_modules" / ".bin" / "opencode"


class OpenCodeNotFound(RuntimeError):
    """No usable OpenCode binary; the message lists every place looked at."""


def find_opencode(configured: str | None = None) -> str:
    """Resolve the binary from, in order: config, ``TABBI_OPENCODE_BIN``, PATH, the project install.

    Returns the real path (symlinks resolved) so bubblewrap can bind its folder.
    """
    tried: list[str] = []
    candidates = [
        ("config TabbiExtension.opencode_bin", configured),
        ("env TABBI_OPENCODE_BIN", os.environ.get("TABBI_OPENCODE_BIN")),
        ("'opencode' on PATH", shutil.which("opencode")),
        (f"project install {PROJECT_INSTALL}", str(PROJECT_INSTALL)),
    ]
    for label, value in candidates:
        if not value:
            tried.append(f"{label}: not set")
            continue
        path = os.path.realpath(value)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
        tried.append(f"{label}: {value} is not an executable file")
    raise OpenCodeNotFound(
        "OpenCode was not found. Tried:\n  - "
        + "\n  - ".join(tried)
        + f"\nInstall it with `npm install opencode-ai@{PINNED_VERSION}` in the tabbi folder "
        "(the README's set-up does this) or set TABBI_OPENCODE_BIN."
    )
