"""Images, mounts and secrets of the stand-in: what the client builds and uploads.

An image here is a recipe plus a folder of files. ``ImageGetOrCreate`` records each layer's
Dockerfile commands exactly as the client sent them (tests read them back: apt packages, pip
packages, commands) but runs none of them: no apt, no pip, no ``RUN``. What a sandbox of the
image sees is the host's own system (``/usr``, ``/bin``, ``/lib``, the ``/etc`` subset of
``tabbi_sandbox.isolation``) read-only, plus the image's file tree: files added by the recipe
(``add_local_file``/``add_local_dir``, with ``copy=True`` as a layer or ``copy=False`` as a mount
added at start) and, for an image made by ``snapshot_filesystem``, everything the sandbox had
written. ``ENV`` and ``WORKDIR`` commands are honoured, because they change what a process sees.
Files aimed under the system folders (``/usr/...``, ``/etc/...``) are refused at build time: they
would be hidden by the host's read-only system. ``/usr/local`` is the exception: it belongs to the
image, as on a Debian image where ``npm install -g`` and ``pip`` install there.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from modal_proto import api_pb2

from .ids import new_id
from .rpc import invalid, not_found

#: Folders of a sandbox that come from the host read-only, never from an image or a snapshot,
#: except ``/usr/local``: it is the image's (where ``npm install -g`` or ``pip`` put things).
SYSTEM_TOP = frozenset(
    {"usr", "bin", "sbin", "lib", "lib32", "lib64", "etc", "proc", "dev", "sys", "__modal"}
)
IMAGE_USR = "usr/local"
#: Folders every sandbox has, writable (a container's home, scratch space and the usual roots).
DEFAULT_DIRS = ("root", "tmp", "home", "opt", "srv", "var/tmp", "mnt", "usr/local/bin")
BUILDER_VERSION = "2025.06"
PYTHON_VERSION = "3.11"


@dataclass
class Image:
    image_id: str
    layers: list[api_pb2.Image]
    files: Path  # this image's file tree (shared with the parent when the layer adds no files)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    snapshot_of: str = ""  # the sandbox a snapshot image was taken from

    @property
    def commands(self) -> list[str]:
        """Every Dockerfile command of every layer, oldest first (what tests assert on)."""
        return [c for layer in self.layers for c in layer.dockerfile_commands]

    def metadata(self) -> api_pb2.ImageMetadata:
        return api_pb2.ImageMetadata(
            image_builder_version=BUILDER_VERSION, python_version_info=PYTHON_VERSION, workdir=self.workdir
        )


@dataclass
class Mount:
    mount_id: str
    files: dict[str, api_pb2.MountFile]  # absolute remote path -> file


class Store:
    """Images, mounts, uploaded file contents and named secrets, under one data folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self.images: dict[str, Image] = {}
        self._by_recipe: dict[bytes, str] = {}
        self.mounts: dict[str, Mount] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 hex -> content
        self.secrets: dict[str, dict[str, str]] = {}  # secret id -> env
        self.secret_names: dict[tuple[str, str], str] = {}  # (environment, name) -> secret id
        (root / "images").mkdir(parents=True, exist_ok=True)
        self._empty = root / "images" / "empty"
        self._empty.mkdir(exist_ok=True)

    # -- images -----------------------------------------------------------------------------------

    def get(self, image_id: str) -> Image:
        image = self.images.get(image_id)
        if image is None:
            raise not_found(f"Image {image_id}")
        return image

    def get_or_create(self, layer: api_pb2.Image) -> Image:
        """One layer on top of its base image; the same recipe gives the same image id."""
        key = layer.SerializeToString(deterministic=True)
        with self._lock:
            if key in self._by_recipe:
                return self.images[self._by_recipe[key]]
        if len(layer.base_images) > 1:
            raise invalid("the modal stand-in builds images with at most one base image")
        base = self.get(layer.base_images[0].image_id) if layer.base_images else None
        image_id = new_id("im")
        env = dict(base.env) if base else {}
        workdir = base.workdir if base else ""
        copies: list[tuple[str, str]] = []
        for command in layer.dockerfile_commands:
            word, _, rest = command.strip().partition(" ")
            word = word.upper()
            if word == "ENV":
                env.update(parse_env(rest))
            elif word == "WORKDIR":
                workdir = str(PurePosixPath(workdir or "/", rest.strip()))
            elif word == "COPY" and not rest.startswith("--from"):
                parts = shlex.split(rest)
                if len(parts) == 2:
                    copies.append((parts[0], parts[1]))
        files = base.files if base else self._empty
        context = self._context(layer)
        if context or (copies and layer.context_mount_id):
            files = self.root / "images" / image_id
            copy_tree(base.files if base else self._empty, files)
            for source, dest in copies:
                self._copy_in(context, source, dest, files)
        image = Image(image_id, [*(base.layers if base else []), layer], files, env, workdir)
        with self._lock:
            if key in self._by_recipe:  # a concurrent identical build won
                return self.images[self._by_recipe[key]]
            self.images[image_id] = image
            self._by_recipe[key] = image_id
        return image

    def _context(self, layer: api_pb2.Image) -> dict[str, bytes]:
        """The build context: inline context files and the context mount's files."""
        context = {f.filename.lstrip("/"): f.data for f in layer.context_files}
        if layer.context_mount_id:
            mount = self.mounts.get(layer.context_mount_id)
            if mount is None:
                raise not_found(f"Mount {layer.context_mount_id}")
            for name, entry in mount.files.items():
                context[name.lstrip("/")] = self.blob(entry.sha256_hex)
        return context

    def _copy_in(self, context: dict[str, bytes], source: str, dest: str, root: Path) -> None:
        """``COPY source dest`` from the build context into an image's file tree."""
        prefix = "" if source in (".", "./", "/") else source.strip("/")
        picked = {
            name: data
            for name, data in context.items()
            if not prefix or name == prefix or name.startswith(prefix + "/")
        }
        if not picked:
            raise invalid(f"COPY {source}: no such file in the build context")
        for name, data in picked.items():
            relative = name[len(prefix) :].lstrip("/") if prefix else name
            target = PurePosixPath(dest) / relative if relative else PurePosixPath(dest)
            write_file(root, str(target), data, 0o644)

    def from_files(self, files: Path, *, base: Image, snapshot_of: str) -> Image:
        image = Image(new_id("im"), list(base.layers), files, dict(base.env), base.workdir, snapshot_of)
        with self._lock:
            self.images[image.image_id] = image
        return image

    def new_image_dir(self) -> Path:
        return self.root / "images" / new_id("snap")

    # -- mounts -----------------------------------------------------------------------------------

    def put_blob(self, sha256_hex: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != sha256_hex:
            raise invalid("MountPutFile: sha256_hex does not match the data")
        with self._lock:
            self.blobs[sha256_hex] = data

    def blob(self, sha256_hex: str) -> bytes:
        data = self.blobs.get(sha256_hex)
        if data is None:
            raise invalid(f"file {sha256_hex} was never uploaded (MountPutFile)")
        return data

    def create_mount(self, files: list[api_pb2.MountFile]) -> Mount:
        for entry in files:
            self.blob(entry.sha256_hex)
            check_target(entry.filename)
        mount = Mount(new_id("mo"), {f.filename: f for f in files})
        with self._lock:
            self.mounts[mount.mount_id] = mount
        return mount

    def materialize_mount(self, mount_id: str, root: Path) -> None:
        mount = self.mounts.get(mount_id)
        if mount is None:
            raise not_found(f"Mount {mount_id}")
        for name, entry in mount.files.items():
            write_file(root, name, self.blob(entry.sha256_hex), entry.mode & 0o7777 or 0o644)

    # -- secrets ----------------------------------------------------------------------------------

    def add_secret(self, env: dict[str, str], name: str = "", environment: str = "main") -> str:
        secret_id = new_id("st")
        with self._lock:
            self.secrets[secret_id] = dict(env)
            if name:
                self.secret_names[(environment, name)] = secret_id
        return secret_id

    def secret(self, secret_id: str) -> dict[str, str]:
        env = self.secrets.get(secret_id)
        if env is None:
            raise not_found(f"Secret {secret_id}")
        return env

    def resolve(self, sources: list[api_pb2.SecretSource], secret_ids: list[str]) -> dict[str, str]:
        """The environment secrets give, in the order given (later ones win)."""
        env: dict[str, str] = {}
        if sources:
            for source in sources:
                if source.secret_id:
                    env.update(self.secret(source.secret_id))
                else:
                    env.update(source.env.contents)
        else:
            for secret_id in secret_ids:
                env.update(self.secret(secret_id))
        for key in env:
            if not key or not (key[0].isalpha() or key[0] == "_") or not key.replace("_", "a").isalnum():
                raise invalid(f"invalid environment variable name {key!r}")
        return env


def parse_env(rest: str) -> dict[str, str]:
    """``ENV A=1 B="two"`` or the legacy ``ENV A 1``."""
    words = shlex.split(rest)
    if len(words) >= 2 and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words if "=" in w)


def check_target(path: str) -> PurePosixPath:
    target = PurePosixPath(path)
    if not target.is_absolute() or ".." in target.parts:
        raise invalid(f"{path!r}: files in an image need an absolute path without '..'")
    under_usr_local = target.parts[1:3] == ("usr", "local") and len(target.parts) > 3
    if len(target.parts) < 2 or (target.parts[1] in SYSTEM_TOP and not under_usr_local):
        top = target.parts[1] if len(target.parts) > 1 else ""
        raise invalid(
            f"{path!r}: the modal stand-in cannot add files under /{top} (its sandboxes see the host's"
            " system there read-only); use /usr/local, /opt, /root or another folder"
        )
    return target


def write_file(root: Path, path: str, data: bytes, mode: int) -> None:
    target = check_target(path)
    local = root.joinpath(*target.parts[1:])
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(data)
    os.chmod(local, mode)


def copy_tree(source: Path, dest: Path) -> None:
    """A copy of a file tree as ``cp -a`` makes it (modes, links, FIFOs stay what they are; nothing
    is followed or opened), skipping the system folders. Blocking: call it off the event loop."""
    dest.mkdir(parents=True, exist_ok=True)
    entries = [e.path for e in os.scandir(source) if e.name not in SYSTEM_TOP]
    if os.path.isdir(source / IMAGE_USR):
        (dest / IMAGE_USR).parent.mkdir(parents=True, exist_ok=True)
        command = ["cp", "-a", "--reflink=auto", "--", str(source / IMAGE_USR), str(dest / "usr")]
        subprocess.run(command, check=True, capture_output=True)
    if entries:
        command = ["cp", "-a", "--reflink=auto", "--", *entries, str(dest)]
        subprocess.run(command, check=True, capture_output=True)
