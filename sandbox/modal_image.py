"""The image every Modal sandbox of tabbi starts from: one recipe, built once per tabbi version.

The recipe is Debian slim with git, Node and ``opencode-ai`` at the version tabbi pins, the sandbox
side of tabbi (``bootstrap.py``, ``snapshots.py``, ``setup_script.py``, ``forget_secrets.js``) in
``/opt/tabbi``, an execute-only copy of the OpenCode binary (so that OpenCode runs non-dumpable,
see ``sealed.py``) and an unprivileged user for the agent. A team adds apt and pip packages for its
repositories (``c.ModalProvider.apt_packages`` / ``pip_packages``); they are part of the recipe.

tabbi's files are copied into the image's last layer (they change most often), so an upgrade
rebuilds only that layer; Modal's layer cache makes a rebuild of an unchanged recipe free. On top
of that cache, the built image is published under a name derived from the tabbi version and the
recipe's hash (:func:`image_tag`), so that every server process finds it with one lookup instead
of re-resolving (and re-uploading) each layer.

Nothing here imports ``modal`` at module import: the provider hands its ``modal`` module in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from .binary import PINNED_VERSION
from .provider import BOOTSTRAP_SCRIPT

#: Where tabbi's sandbox files live in the image (root-owned, read-only to the agent).
TABBI_DIR = "/opt/tabbi"
#: The execute-only OpenCode binary in the image.
OPENCODE_BIN = f"{TABBI_DIR}/bin/opencode"
#: The unprivileged user the agent (the bootstrap, OpenCode and its tools) runs as.
AGENT_USER = "tabbi"
AGENT_UID = 1000
#: The clone and the agent's home, as paths inside the sandbox.
WORKSPACE = "/workspace"
HOME = f"/home/{AGENT_USER}"

#: The files of the sandbox side that every sandbox needs, beside one another.
SANDBOX_FILES = ("bootstrap.py", "snapshots.py", "setup_script.py", "forget_secrets.js")
#: Debian packages of the base recipe: git for the clone and push, Node and npm to install
#: OpenCode, certificates for HTTPS remotes, util-linux for ``setpriv`` (dropping to the agent).
BASE_APT = ("git", "ca-certificates", "nodejs", "npm", "util-linux", "procps")
PYTHON_VERSION = "3.11"


def tabbi_version() -> str:
    try:
        return metadata.version("tabbi")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class Recipe:
    """What goes into the image; its hash names the built image."""

    apt_packages: tuple[str, ...] = ()
    pip_packages: tuple[str, ...] = ()
    opencode_version: str = PINNED_VERSION
    files: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def default(
        cls, apt_packages: list[str] | tuple[str, ...] = (), pip_packages: list[str] | tuple[str, ...] = ()
    ) -> Recipe:
        folder = BOOTSTRAP_SCRIPT.parent
        files = {name: (folder / name).read_bytes() for name in SANDBOX_FILES}
        return cls(tuple(apt_packages), tuple(pip_packages), PINNED_VERSION, files)

    def setup_commands(self) -> list[str]:
        """The ``RUN`` steps after the apt packages: OpenCode and the agent's user."""
        return [
            f"npm install --global --no-audit --no-fund --loglevel=error opencode-ai@{self.opencode_version}",
            # The real binary (npm's bin entry links to it), execute-only: OpenCode then runs
            # non-dumpable, so the agent (another user) cannot read its environment or memory.
            f"install -d -m 0755 {TABBI_DIR}/bin"
            f' && cp "$(readlink -f "$(command -v opencode)")" {OPENCODE_BIN} && chmod 0111 {OPENCODE_BIN}',
            f"useradd --create-home --uid {AGENT_UID} --shell /bin/bash {AGENT_USER}"
            f" && install -d -o {AGENT_USER} -g {AGENT_USER} -m 0755 {WORKSPACE}",
        ]

    def digest(self) -> str:
        """A hash of everything the image is made of (packages, versions, tabbi's files)."""
        h = hashlib.sha256()
        h.update(
            json.dumps(
                [PYTHON_VERSION, BASE_APT, self.apt_packages, self.pip_packages, self.opencode_version]
            ).encode()
        )
        for step in self.setup_commands():
            h.update(step.encode() + b"\0")
        for name in SANDBOX_FILES:
            h.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        return h.hexdigest()


def image_tag(recipe: Recipe) -> str:
    """The name the built image is published under: tabbi's version plus the recipe's hash."""
    version = "".join(c if c.isalnum() or c in "._-" else "-" for c in tabbi_version())
    return f"tabbi-sandbox:{version}-{recipe.digest()[:16]}"


def build_definition(modal: Any, recipe: Recipe) -> Any:
    """The ``modal.Image`` of ``recipe`` (lazy: nothing is built until it is used)."""
    image = modal.Image.debian_slim(python_version=PYTHON_VERSION).apt_install(
        *BASE_APT, *recipe.apt_packages
    )
    image = image.run_commands(*recipe.setup_commands())
    if recipe.pip_packages:
        image = image.pip_install(*recipe.pip_packages)
    # tabbi's own files last (they change most often), copied into a layer of the image.
    for name in SANDBOX_FILES:
        image = image.add_local_file(BOOTSTRAP_SCRIPT.parent / name, f"{TABBI_DIR}/{name}", copy=True)
    return image.workdir(WORKSPACE)
