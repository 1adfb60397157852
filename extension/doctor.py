"""``jupyter tabbi doctor``: is this installation able to run sessions, and if not, what to fix.

The checks build the same store, provider and model configuration the server builds (through
``TabbiExtension``'s own ``make_store``/``make_provider``/``model_settings``, from the same config
files) and ask them what the health endpoint asks (``Store.ping``/``trouble``,
``SandboxProvider.check``, ``model_config.problem``), then go further where a request must not:
run the OpenCode binary for its version, call the model endpoint with its key, ask Modal for the
app and image, decrypt what the store holds, measure free disk.

Secrets are never printed: a check says which setting is wrong, never its value.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import httpx

from tabbi_sandbox.binary import PINNED_VERSION
from tabbi_sandbox.provider import SandboxError, SandboxProvider

from . import encryption, model_config
from .github.accounts import PROVIDER as GITHUB_TOKENS
from .store import SQLiteStore, Store, StoreError

if TYPE_CHECKING:
    from .app import TabbiExtension

OK, PROBLEM, SKIPPED = "ok", "problem", "skipped"

#: Seconds a network check (model endpoint, Modal, Convex) may take before it counts as down.
NETWORK_TIMEOUT = 10.0

#: How many users' stored tokens the encryption check tries to decrypt.
TOKEN_SAMPLE = 20


@dataclass
class Check:
    """One line of the report: what was checked, how it went, and how to fix it."""

    name: str
    status: str
    detail: str
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.status != PROBLEM

    def line(self) -> str:
        text = f"[{self.status.upper():>7}] {self.name}: {self.detail}"
        return text + (f"\n          fix: {self.fix}" if self.fix else "")

    def public(self) -> dict[str, Any]:
        return asdict(self)


def ok(name: str, detail: str) -> Check:
    return Check(name, OK, detail)


def problem(name: str, detail: str, fix: str | None = None) -> Check:
    return Check(name, PROBLEM, detail, fix)


def skipped(name: str, detail: str) -> Check:
    return Check(name, SKIPPED, detail)


class Doctor:
    """Runs every check against one configured ``TabbiExtension`` (not started: no server)."""

    def __init__(self, ext: TabbiExtension, min_free_disk_gb: float, single_user: bool):
        self.ext = ext
        self.min_free_disk_gb = min_free_disk_gb
        self.single_user = single_user
        self.data = Path(ext.data_dir)
        self.store: Store | None = None
        self.provider: SandboxProvider | None = None

    async def run(self) -> list[Check]:
        checks: list[Check] = []
        steps: list[Callable[[], Awaitable[list[Check]]]] = [
            self.check_store, self.check_sandboxes, self.check_model, self.check_github,
            self.check_encryption, self.check_disk,
        ]
        try:
            for step in steps:
                try:
                    checks += await step()
                except Exception as exc:  # a check that breaks is a finding, not a crash
                    name = step.__name__.removeprefix("check_")
                    checks.append(problem(name, f"the check itself failed: {type(exc).__name__}: {exc}"))
        finally:
            if self.store is not None:
                with contextlib.suppress(Exception):
                    await self.store.close()
        return checks

    # -- the store ------------------------------------------------------------------------------
    async def check_store(self) -> list[Check]:
        name = "store"
        try:
            store = self.ext.make_store(self.data)
        except Exception as exc:
            return [problem(name, f"{type(exc).__name__}: {exc}", "check c.TabbiExtension.store_class "
                            "and the store's own settings (c.SQLiteStore.*, c.ConvexStore.*)")]
        backend = type(store).__name__
        if isinstance(store, SQLiteStore) and not Path(store.path).exists():
            return [ok(name, f"SQLite: no database yet at {store.path} (made at the first start)")]
        try:
            await asyncio.wait_for(store.open(), NETWORK_TIMEOUT)
        except (StoreError, asyncio.TimeoutError) as exc:
            return [problem(name, f"{backend} could not be opened: {exc or 'timed out'}",
                            _store_fix(backend))]
        self.store = store
        reachable = await store.ping()  # what GET /tabbi/api/health asks
        trouble = store.trouble()
        if not reachable or trouble:
            return [problem(name, f"{backend} does not answer: {trouble or 'no answer'}",
                            _store_fix(backend))]
        return [ok(name, f"{backend} answers")]

    # -- sandboxes: provider, bubblewrap, OpenCode, Modal ---------------------------------------
    async def check_sandboxes(self) -> list[Check]:
        try:
            provider = self.provider = self.ext.make_provider(self.data)
        except Exception as exc:
            return [problem("sandboxes", f"the sandbox provider could not be made: {exc}",
                            "check c.TabbiExtension.sandbox_provider_class and its settings")]
        found = await asyncio.to_thread(provider.check)  # what GET /tabbi/api/health asks
        if provider.name == "modal":
            return await self.check_modal(provider, found)
        return [self.bubblewrap(provider, found), *await self.opencode(found.get("opencode"))]

    def bubblewrap(self, provider: SandboxProvider, found: dict[str, Any]) -> Check:
        name, wanted = "bubblewrap", getattr(provider, "isolation", "auto")
        if wanted == "none":
            return ok(name, "off by configuration (isolation = 'none'): sandboxes are plain processes")
        if found.get("isolation") == "bwrap":
            return ok(name, "a trial sandbox ran")
        consequence = ("no session can start" if wanted == "bwrap" else
                       "sandboxes run unconfined and get no GitHub credentials")
        return problem(name, f"{found.get('detail') or 'bubblewrap does not work'}: {consequence}",
                       "install bubblewrap (Debian: apt-get install bubblewrap) and allow "
                       "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1; "
                       "on Ubuntu 24.04 also kernel.apparmor_restrict_unprivileged_userns=0), or "
                       "set c.TabbiExtension.isolation = 'none' to run sandboxes unconfined knowingly")

    async def opencode(self, found: dict[str, Any] | None) -> list[Check]:
        name = "opencode"
        if not found:
            return []
        if not found.get("found"):
            return [problem(name, str(found.get("detail", "not found")).splitlines()[0],
                            f"npm install opencode-ai@{PINNED_VERSION} in the tabbi folder, or set "
                            "c.TabbiExtension.opencode_bin / TABBI_OPENCODE_BIN to its path")]
        path = found["path"]
        try:
            done = await asyncio.to_thread(
                subprocess.run, [path, "--version"], capture_output=True, text=True, timeout=60)
            version = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        except (OSError, subprocess.TimeoutExpired) as exc:
            return [problem(name, f"{path} did not run: {exc}", "check that it is OpenCode's binary")]
        if done.returncode != 0 or version != PINNED_VERSION:
            said = f"version {version!r}" if version else f"exit status {done.returncode}, no version"
            return [problem(name, f"{path} says {said}; tabbi is tested with {PINNED_VERSION}",
                            f"npm install opencode-ai@{PINNED_VERSION}, or point "
                            "c.TabbiExtension.opencode_bin / TABBI_OPENCODE_BIN at that version")]
        return [ok(name, f"{path} is version {version}")]

    async def check_modal(self, provider: Any, found: dict[str, Any]) -> list[Check]:
        fix = ("set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET in the server's environment "
               "(or run `modal token new` as the server's user)")
        if not found.get("usable"):
            return [problem("modal", found.get("detail") or "not usable", fix)]
        try:
            await provider.app()  # an authenticated call: refused credentials show here
        except SandboxError as exc:
            return [problem("modal", str(exc).split(": set MODAL_TOKEN_ID")[0], fix)]
        checks = [ok("modal", f"credentials accepted; app {provider.app_name!r} found")]
        return [*checks, await self.modal_image(provider)]

    async def modal_image(self, provider: Any) -> Check:
        from tabbi_sandbox import modal_image

        name = "modal image"
        try:
            if provider.image_id:
                image = provider.modal.Image.from_id(provider.image_id, client=provider.client)
                await provider.call(image.build.aio(await provider.app()), NETWORK_TIMEOUT,
                                    f"looking up the image {provider.image_id}")
                return ok(name, f"{provider.image_id} exists")
            if not provider.publish_image:
                return skipped(name, "built from tabbi's recipe at the first start of the server")
            recipe = modal_image.Recipe.default(provider.apt_packages, provider.pip_packages)
            tag = modal_image.image_tag(recipe)
            if await provider.published(tag) is None:
                return ok(name, f"{tag} is not built yet: the first session builds it (minutes)")
            return ok(name, f"{tag} is published")
        except SandboxError as exc:
            return problem(name, str(exc), "check c.ModalProvider.image_id (an 'im-...' id of this "
                           "Modal workspace), or unset it to use tabbi's recipe")

    # -- the model ------------------------------------------------------------------------------
    async def check_model(self) -> list[Check]:
        name = "model"
        settings = self.ext.model_settings()
        trouble = model_config.problem(settings)  # what the server logs at start
        if trouble:
            return [problem(name, trouble, "set c.TabbiExtension.model (TABBI_MODEL) and its key")]
        ref, upstream = model_config.resolve(settings)
        if ref["modelID"] == model_config.DEMO_MODEL:
            return [ok(name, "the demo model (canned answers) needs no endpoint")]
        headers = upstream.auth_headers()
        if upstream.kind == "anthropic":
            headers["anthropic-version"] = "2023-06-01"
        url = f"{upstream.base_url}/models"
        parsed = urlparse(url)  # credentials in the URL (user:password@) are never printed
        shown = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl()
        try:
            async with httpx.AsyncClient(timeout=NETWORK_TIMEOUT, trust_env=True) as client:
                response = await client.get(url, headers=headers)
        except httpx.HTTPError as exc:
            return [problem(name, f"{shown} cannot be reached ({type(exc).__name__})",
                            "check c.TabbiExtension.llm_base_url (TABBI_LLM_BASE_URL) and that the "
                            "model server runs and is reachable from this machine")]
        if response.status_code in (401, 403):
            return [problem(name, f"{shown} refused the key (HTTP {response.status_code})",
                            "set the right key: c.TabbiExtension.llm_api_key (TABBI_LLM_API_KEY), "
                            "OPENAI_API_KEY or ANTHROPIC_API_KEY")]
        if response.status_code >= 400:
            return [problem(name, f"{shown} answered HTTP {response.status_code}",
                            "check the base URL (it ends in /v1) and the model server's logs")]
        return [ok(name, f"{ref['providerID']}/{ref['modelID']}: {shown} answers")]

    # -- GitHub ---------------------------------------------------------------------------------
    async def check_github(self) -> list[Check]:
        name, ext = "github", self.ext
        if not ext.github_client_id and not ext.github_client_secret:
            return [skipped(name, "GitHub sign-in is not configured (no client id)")]
        if not ext.github_client_id or not ext.github_client_secret:
            given, missing = (("client id", "github_client_secret (TABBI_GITHUB_CLIENT_SECRET)")
                              if ext.github_client_id else
                              ("client secret", "github_client_id (TABBI_GITHUB_CLIENT_ID)"))
            return [problem(name, f"a {given} is set without its pair: sign-in cannot work",
                            f"set c.TabbiExtension.{missing} from the GitHub app's settings")]
        problems = [
            trouble for setting, value in (("github_url", ext.github_url),
                                           ("github_api_url", ext.github_api_url),
                                           ("public_url", ext.public_url),
                                           ("github_callback_url", ext.github_callback_url))
            if value and (trouble := _url_problem(setting, value))
        ]
        callback = ext.github_callback_url
        if callback and not urlparse(callback).path.rstrip("/").endswith("tabbi/github/callback"):
            problems.append(f"github_callback_url {callback} does not end in /tabbi/github/callback")
        if problems:
            return [problem(name, "; ".join(problems), "fix these URLs (the callback URL must be the "
                            "one registered with the GitHub app)")]
        flow = ext.github_login_flow
        where = callback or (f"{ext.public_url.rstrip('/')}/tabbi/github/callback" if ext.public_url
                             else "derived from each request")
        return [ok(name, f"client id and secret set; login flow {flow}; callback {where}")]

    # -- the encryption key ---------------------------------------------------------------------
    async def check_encryption(self) -> list[Check]:
        name, ext = "encryption key", self.ext
        needed = bool(ext.github_client_id) or bool(getattr(self.provider, "survives_restart", False))
        key_file = self.data / encryption.KEY_FILE
        try:
            if ext.encryption_key:
                box, source = encryption.load(ext.encryption_key, self.data, False), "configured"
            elif key_file.exists():
                box, source = encryption.load(None, self.data, False), str(key_file)
            elif needed and not self.single_user:
                return [problem(name, "none is set, and this multi-user server needs one",
                                "set TABBI_ENCRYPTION_KEY (or c.TabbiExtension.encryption_key) from "
                                "your secrets")]
            else:
                return [ok(name, "none yet: a single-user server generates one when it needs it")]
        except encryption.EncryptionKeyError as exc:
            return [problem(name, str(exc).split(", for example")[0], "a Fernet key: python -c 'from "
                            "cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'")]
        sealed = await self._sealed_sample()
        if sealed is None:
            return [ok(name, f"{source} key decodes (the store was not read)")]
        unreadable = sum(1 for value in sealed if box.decrypt(value) is None)
        if unreadable:
            return [problem(name, f"{unreadable} of {len(sealed)} secrets in the store cannot be "
                            "decrypted with this key (it changed?)",
                            "put the key they were sealed with back, after the new one: "
                            "TABBI_ENCRYPTION_KEY=new,old (the first encrypts, all decrypt)")]
        return [ok(name, f"{source} key decodes and decrypts the {len(sealed)} secrets sampled")]

    async def _sealed_sample(self) -> list[bytes] | None:
        """Ciphertexts the store holds: sandboxes' sealed passwords and users' GitHub tokens."""
        if self.store is None:
            return None
        records = await self.store.list_sessions()
        sealed = [str(r.sandbox_state["password_sealed"]).encode() for r in records
                  if (r.sandbox_state or {}).get("password_sealed")]
        for owner in sorted({r.owner for r in records})[:TOKEN_SAMPLE]:
            token = await self.store.get_token(owner, GITHUB_TOKENS)
            if token is not None:
                sealed.append(token)
        return sealed

    # -- disk -----------------------------------------------------------------------------------
    async def check_disk(self) -> list[Check]:
        name = "disk"
        where = self.data
        while not where.exists() and where != where.parent:
            where = where.parent
        free = shutil.disk_usage(where).free / 1e9
        if free < self.min_free_disk_gb:
            return [problem(name, f"{free:.1f} GB free for snapshots and sandboxes under {self.data} "
                            f"(below {self.min_free_disk_gb:g} GB)",
                            "free space there, move c.TabbiExtension.data_dir (TABBI_DATA_DIR) to a "
                            "larger disk, or lower c.TabbiExtension.snapshots_keep")]
        return [ok(name, f"{free:.1f} GB free under {self.data}")]


def _url_problem(setting: str, value: str) -> str | None:
    """What is wrong with an absolute URL setting, or None."""
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return f"{setting} {value!r} is not an http(s) URL"
    if parsed.scheme == "http" and parsed.hostname not in ("localhost", "127.0.0.1", "::1"):
        return (f"{setting} {value} is plain http on a non-local host (GitHub's codes would travel "
                "unencrypted)")
    return None


def _store_fix(backend: str) -> str:
    if backend == "ConvexStore":
        return ("check c.ConvexStore.url (TABBI_CONVEX_URL), that the deployment runs tabbi's "
                "functions (docs/deploy-convex.md), and that its keys and issuer match the "
                "deployment's auth config")
    return "check that data_dir is writable and on a local disk; see the server log for the error"
