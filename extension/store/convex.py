"""The Convex store: sessions kept in a Convex deployment, for teams and servers that come and go.

It calls the functions in ``convex/`` (their contract: ``convex/API.md``) through Convex's HTTP
API (``POST /api/query|mutation``) with one ``httpx.AsyncClient``: async, pooled HTTP/1.1
keep-alive connections, a timeout on every call. Convex's own Python client is not used: it
blocks while holding the GIL, which would freeze the whole Jupyter server when Convex is slow.

**Who is calling.** Every call carries a short-lived JWT this server signs (``convex_auth.py``):
the owner's for everything of a session (so Convex itself keeps one person out of another's
rows), the person's for users and tokens, and the server's for leases, claims and the start-up
listing of all sessions. The store learns a session's owner from creating or listing it, or
asks Convex once with the server's identity.

**Failures.** A network error, a timeout, a 5xx other than 560 or a 429 is retried inside the
store, with backoff, for up to ``retry_for`` seconds, and only then raised as
``StoreUnavailable``. That is safe because every write is idempotent: an event batch carries a
key derived from its content, a prompt its id, a session a key derived from its record, and the
other writes are upserts, compare-and-swaps or deletes (``convex/API.md``, "Idempotency"). So a
write whose answer was lost is retried without ever being applied twice, by this store or by a
caller's retry. A function that refuses (HTTP 560, a ``ConvexError`` code) raises
``ConvexRefused``, a permanent ``StoreError``. While calls are failing, ``trouble()`` says why,
and the health endpoint reports the server degraded.

**Limits** (``convex/API.md``). A JSON value over 900 kB (a Convex document holds 1 MiB) is
stored with its longest strings shortened. An event batch over 500 events or 8 MB is written in
parts, each one transaction with its own key: if a later part fails, the earlier ones stay, and
repeating the call completes it without writing any part twice. (``EventLog`` batches stay far
below both limits.)
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import httpx
from traitlets import Float, Int, Unicode, default

from .. import metrics
from .base import (
    SESSION_FIELDS,
    Event,
    Lease,
    NewEvent,
    Prompt,
    SessionRecord,
    Snapshot,
    Store,
    StoreError,
    StoreUnavailable,
    spend_amount,
)
from .convex_auth import SigningKeyError, TokenSigner, load_private_key, thumbprint

log = logging.getLogger(__name__)

#: The most events, and bytes of their data, one ``events:append`` takes (``convex/API.md``,
#: "Limits"); a bigger batch is written in parts, each with its own key.
MAX_BATCH = 500
MAX_BATCH_BYTES = 8_000_000
#: The longest JSON text a function takes, in bytes (a Convex document holds 1 MiB).
MAX_TEXT = 900_000
#: Page size of ``sessions:listAll``.
PAGE = 200

#: The two identities a call can carry (``convex/API.md``, "Identities").
USER, SERVER = "user", "server"


class ConvexRefused(StoreError):
    """A Convex function refused the call (HTTP 560): permanent. ``code`` is the function's
    ``ConvexError`` code (``not_found``, ``conflict``, ``forbidden``, ``invalid``,
    ``unauthenticated``), or None when Convex refused without one (a failed argument check)."""

    def __init__(self, path: str, message: str, code: str | None = None):
        super().__init__(f"Convex {path}: {code + ': ' if code else ''}{message}")
        self.code = code


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _json(value: Any) -> str:
    """An opaque dict as the JSON text the functions store byte-exact (ASCII: ``json.dumps``
    escapes the rest), shortened if Convex could not hold it (see ``_shortened``)."""
    text = json.dumps(value)
    if len(text) > MAX_TEXT:
        log.warning("tabbi: a value of %d bytes is shortened to fit Convex's %d", len(text), MAX_TEXT)
        text = json.dumps(_shortened(value))
    return text


def _shortened(value: Any) -> Any:
    """A copy of ``value`` whose JSON fits in ``MAX_TEXT``: its longest strings are cut, each with a
    note of how much is missing, as the event normalizer clips tool output. (SQLite would hold it
    whole; a Convex document cannot: a file of a megabyte the agent wrote, in a tool's input.)"""
    value = copy.deepcopy(value)
    for _ in range(100):
        excess = len(json.dumps(value)) - MAX_TEXT
        if excess <= 0:
            return value
        found = _longest(value)
        if found is None or len(found[2]) < 1000:
            break
        holder, key, text = found
        keep = max(0, len(text) - excess - 100)
        holder[key] = text[:keep] + f"\n... [{len(text) - keep} more characters]"
    raise StoreError(f"a value too large for Convex (over {MAX_TEXT} bytes of JSON)")


def _longest(value: Any) -> tuple[Any, Any, str] | None:
    """(container, key, string) of the longest string inside ``value``."""
    best: tuple[Any, Any, str] | None = None
    stack = [value]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, item in items:
            if isinstance(item, str):
                if best is None or len(item) > len(best[2]):
                    best = (node, key, item)
            else:
                stack.append(item)
    return best


def _parts(batch: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """A batch of events in parts one ``events:append`` takes (by count and by bytes)."""
    parts: list[list[dict[str, Any]]] = [[]]
    size = 0
    for event in batch:
        length = len(event["data"]) + len(event["type"])
        if parts[-1] and (len(parts[-1]) == MAX_BATCH or size + length > MAX_BATCH_BYTES):
            parts.append([])
            size = 0
        parts[-1].append(event)
        size += length
    return parts


def _key(*parts: Any) -> str:
    """An idempotency key derived from what is written: every retry of the same write (by this
    store or by a caller) carries the same key, whatever process or attempt sends it."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _session(value: dict[str, Any]) -> SessionRecord:
    fields = {name: value.get(name) for name in SessionRecord.__dataclass_fields__}
    fields["sandbox_state"] = json.loads(value.get("sandbox_state") or "{}")
    fields["state"] = fields["state"] or "idle"
    return SessionRecord(**fields)


def _event(session_id: str, value: dict[str, Any]) -> Event:
    return Event(session_id, int(value["seq"]), value["type"], json.loads(value["data"]), value["ts"])


def _prompt(value: dict[str, Any]) -> Prompt:
    return Prompt(value["id"], value["session_id"], value["text"], value["status"],
                  value["created_at"], int(value["position"]),
                  json.loads(value["attachments"]) if value.get("attachments") else [])


def _snapshot(value: dict[str, Any]) -> Snapshot:
    return Snapshot(value["session_id"], value["id"], json.loads(value["ref"]), int(value["size"]),
                    value["created_at"])


class ConvexStore(Store):
    """Sessions, events, prompts, snapshots and sealed tokens in a Convex deployment."""

    url = Unicode(
        help="The deployment's URL (https://NAME.convex.cloud, or a self-hosted backend's). "
        "Env: TABBI_CONVEX_URL."
    ).tag(config=True)

    @default("url")
    def _url_default(self) -> str:
        return _env("TABBI_CONVEX_URL") or ""

    jwt_key = Unicode(
        help="The ES256 (EC P-256) private key this server signs people's JWTs with: PEM text, "
        "or the path of a PEM file. Its public half is in the deployment's TABBI_JWT_JWKS. "
        "Env: TABBI_CONVEX_JWT_KEY."
    ).tag(config=True)

    @default("jwt_key")
    def _jwt_key_default(self) -> str:
        return _env("TABBI_CONVEX_JWT_KEY") or ""

    server_jwt_key = Unicode(
        None,
        allow_none=True,
        help="The private key of the server role's JWTs (leases, claims, listing every session), "
        "when it differs from jwt_key (its public half in TABBI_SERVER_JWT_JWKS). Unset: "
        "jwt_key. Env: TABBI_CONVEX_SERVER_JWT_KEY.",
    ).tag(config=True)

    @default("server_jwt_key")
    def _server_jwt_key_default(self) -> str | None:
        return _env("TABBI_CONVEX_SERVER_JWT_KEY")

    jwt_key_id = Unicode(
        None,
        allow_none=True,
        help="The 'kid' of jwt_key in the deployment's JWKS. Unset: the key's RFC 7638 "
        "thumbprint (what `python -m tabbi_extension.store.convex_auth jwks KEY` prints). "
        "Env: TABBI_CONVEX_JWT_KID.",
    ).tag(config=True)

    @default("jwt_key_id")
    def _jwt_key_id_default(self) -> str | None:
        return _env("TABBI_CONVEX_JWT_KID")

    server_jwt_key_id = Unicode(
        None,
        allow_none=True,
        help="The 'kid' of server_jwt_key. Unset: jwt_key_id when the keys are the same, else "
        "the key's thumbprint. Env: TABBI_CONVEX_SERVER_JWT_KID.",
    ).tag(config=True)

    @default("server_jwt_key_id")
    def _server_jwt_key_id_default(self) -> str | None:
        return _env("TABBI_CONVEX_SERVER_JWT_KID")

    jwt_issuer = Unicode(
        help="The 'iss' of people's JWTs, as in the deployment's TABBI_JWT_ISSUER (the server "
        "role's is this + '/server'). Env: TABBI_CONVEX_JWT_ISSUER."
    ).tag(config=True)

    @default("jwt_issuer")
    def _jwt_issuer_default(self) -> str:
        return _env("TABBI_CONVEX_JWT_ISSUER") or ""

    application_id = Unicode(
        help="The JWTs' audience ('aud'), as in the deployment's TABBI_JWT_APPLICATION_ID. "
        "Env: TABBI_CONVEX_APPLICATION_ID."
    ).tag(config=True)

    @default("application_id")
    def _application_id_default(self) -> str:
        return _env("TABBI_CONVEX_APPLICATION_ID") or "tabbi"

    timeout = Float(10.0, help="Seconds one HTTP call to Convex may take.").tag(config=True)
    ping_timeout = Float(
        3.0, help="Seconds the health check waits for Convex before calling it unreachable."
    ).tag(config=True)
    retry_for = Float(
        30.0,
        help="Seconds a call keeps retrying while Convex is unreachable, too slow or failing "
        "(5xx) before it gives up with StoreUnavailable. Every write is idempotent, so a retry "
        "never applies one twice.",
    ).tag(config=True)
    max_connections = Int(20, help="Most HTTP connections kept open to Convex.").tag(config=True)
    batch_window = Float(
        0.03,
        help="Seconds a streamed text delta may wait for others to share its write to Convex "
        "(one mutation per window instead of one per delta). What a person sees is delayed by "
        "at most this much more than the write itself takes.",
    ).tag(config=True)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._client: httpx.AsyncClient | None = None
        self._signers: dict[str, TokenSigner] = {}
        #: session id -> owner, learnt from creating, listing or reading sessions.
        self._owners: dict[str, str] = {}
        #: prompt id -> session id, learnt from enqueueing and listing prompts.
        self._prompts: dict[str, str] = {}
        self._server_subject = f"{socket.gethostname()}:{os.getpid()}"
        #: (since when, the latest failure) while calls fail; None once one works again.
        self._failing: tuple[float, str] | None = None
        #: Calls waiting to try again.
        self._retrying = 0
        #: Why the last health check failed (None: it worked).
        self._ping_failure: str | None = None

    # -- the connection -----------------------------------------------------------------------
    async def open(self) -> None:
        if not self.url:
            raise StoreError("ConvexStore needs the deployment's URL (c.ConvexStore.url or "
                             "TABBI_CONVEX_URL)")
        if not self.jwt_issuer:
            raise StoreError("ConvexStore needs the JWT issuer (c.ConvexStore.jwt_issuer or "
                             "TABBI_CONVEX_JWT_ISSUER)")
        try:
            user_key = load_private_key(self.jwt_key)
            server_key = load_private_key(self.server_jwt_key) if self.server_jwt_key else user_key
        except SigningKeyError as exc:
            raise StoreError(f"ConvexStore: {exc} (c.ConvexStore.jwt_key / TABBI_CONVEX_JWT_KEY)") from None
        user_kid = self.jwt_key_id or thumbprint(user_key)
        server_kid = self.server_jwt_key_id or (
            user_kid if server_key is user_key else thumbprint(server_key))
        self._signers = {
            USER: TokenSigner(user_key, self.jwt_issuer, self.application_id, user_kid),
            SERVER: TokenSigner(server_key, self.jwt_issuer + "/server", self.application_id,
                                server_kid),
        }
        self._client = httpx.AsyncClient(
            base_url=self.url.rstrip("/"),
            timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 5.0)),
            limits=httpx.Limits(max_connections=self.max_connections,
                                max_keepalive_connections=self.max_connections),
            headers={"Content-Type": "application/json"},
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def ping(self) -> bool:
        try:
            await self._post("query", "health:ping", {}, SERVER, self._server_subject,
                             timeout=self.ping_timeout)
        except StoreError as exc:
            self._ping_failure = str(exc)
            return False
        self._ping_failure = None
        if not self._retrying:  # Convex is back, and no call is still waiting for it
            self._failing = None
        return True

    def trouble(self) -> str | None:
        if self._failing is not None:
            since, why = self._failing
            return f"Convex calls failing for {time.time() - since:.0f} s, retried: {why}"
        return self._ping_failure

    async def _call(self, kind: str, path: str, args: dict[str, Any], role: str, subject: str) -> Any:
        """One function call, retried with backoff while Convex cannot answer (see the module
        docstring); its value, or the store's error."""
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        while True:
            try:
                value = await self._post(kind, path, args, role, subject)
                break
            except StoreUnavailable as exc:
                if self._failing is None:
                    log.warning("tabbi: %s; retrying for up to %.0f s", exc, self.retry_for)
                self._failing = (self._failing or (time.time(), ""))[0], str(exc)
                if time.monotonic() + delay > deadline:
                    metrics.store_error("convex", exc)
                    raise
            except StoreError as exc:
                metrics.store_error("convex", exc)
                raise
            metrics.STORE_RETRIES.labels("store").inc()
            self._retrying += 1
            try:
                await asyncio.sleep(delay)  # backoff between attempts, not synchronization
            finally:
                self._retrying -= 1
            delay = min(delay * 2, 2.0)
        if self._failing is not None:
            log.info("tabbi: Convex answers again")
        self._failing = self._ping_failure = None
        return value

    async def _post(self, kind: str, path: str, args: dict[str, Any], role: str, subject: str,
                    timeout: float | None = None) -> Any:
        """One HTTP attempt. A refused JWT is signed afresh once (a rotated key, a clock that
        jumped); Convex's answers become values or the store's errors."""
        client = self._client
        if client is None:
            raise StoreError("the store is closed")
        try:
            body = json.dumps({"path": path, "args": args, "format": "json"}, ensure_ascii=False,
                              allow_nan=False).encode()
        except (ValueError, TypeError, UnicodeError) as exc:  # a lone surrogate, NaN, bytes...
            raise StoreError(f"the store cannot hold this value: {exc}") from None
        signer = self._signers[role]
        for fresh in (False, True):
            headers = {"Authorization": f"Bearer {signer.token(subject)}"}
            try:
                response = await client.post(f"/api/{kind}", content=body, headers=headers,
                                             timeout=timeout or httpx.USE_CLIENT_DEFAULT)
            except httpx.TimeoutException as exc:
                raise StoreUnavailable(f"Convex {path}: no answer in time ({type(exc).__name__})") from None
            except httpx.TransportError as exc:
                raise StoreUnavailable(f"Convex {path}: unreachable ({type(exc).__name__}: {exc})") from None
            if response.status_code == 401 and not fresh:
                signer.forget(subject)
                continue
            return _answer(path, response)
        raise AssertionError("unreachable")

    # -- identities ---------------------------------------------------------------------------
    async def _as_user(self, kind: str, path: str, username: str, args: dict[str, Any]) -> Any:
        return await self._call(kind, path, args, USER, username)

    async def _as_server(self, kind: str, path: str, args: dict[str, Any]) -> Any:
        return await self._call(kind, path, args, SERVER, self._server_subject)

    async def _owner(self, session_id: str) -> str | None:
        """The session's owner (whose identity its calls carry), or None: no such session."""
        owner = self._owners.get(session_id)
        if owner is None:
            self._remember(await self._as_server("query", "sessions:get", {"id": session_id}))
            owner = self._owners.get(session_id)
        return owner

    def _remember(self, value: dict[str, Any] | None) -> SessionRecord | None:
        if value is None:
            return None
        record = _session(value)
        self._owners[record.id] = record.owner
        return record

    async def _of_session(self, kind: str, path: str, session_id: str, args: dict[str, Any],
                          missing: Any) -> Any:
        """A call about one session, as its owner; ``missing`` when there is no such session
        (reads answer empty for it, as SQLite's do)."""
        owner = await self._owner(session_id)
        if owner is None:
            return missing
        return await self._as_user(kind, path, owner, {"session_id": session_id, **args})

    async def _write_of_session(self, path: str, session_id: str, args: dict[str, Any]) -> Any:
        owner = await self._owner(session_id)
        if owner is None:
            raise ConvexRefused(path, f"no session {session_id}", "not_found")
        return await self._as_user("mutation", path, owner, {"session_id": session_id, **args})

    # users ----------------------------------------------------------------------------------
    async def upsert_user(self, username: str, profile: dict[str, Any]) -> None:
        await self._as_user("mutation", "users:upsert", username, {"profile": _json(profile)})

    async def get_user(self, username: str) -> dict[str, Any] | None:
        value = await self._as_user("query", "users:get", username, {})
        return json.loads(value) if value is not None else None

    # sessions -------------------------------------------------------------------------------
    async def create_session(self, record: SessionRecord) -> SessionRecord:
        record.created_at = record.created_at or time.time()
        session = {
            "id": record.id, "owner": record.owner, "repo": record.repo,
            "work_branch": record.work_branch, "base_branch": record.base_branch,
            "base_commit": record.base_commit, "model": record.model, "state": record.state,
            "error": record.error, "opencode_session_id": record.opencode_session_id,
            "sandbox_state": _json(record.sandbox_state), "created_at": record.created_at,
            "server_id": record.server_id,
        }
        session = {k: v for k, v in session.items() if v is not None}
        value = await self._as_user("mutation", "sessions:create", record.owner,
                                    {"session": session, "key": _key("session", session)})
        self._owners[record.id] = record.owner
        record.updated_at = value["updated_at"]
        return record

    async def get_session(self, session_id: str) -> SessionRecord | None:
        owner = self._owners.get(session_id)
        if owner is None:
            value = await self._as_server("query", "sessions:get", {"id": session_id})
        else:
            value = await self._as_user("query", "sessions:get", owner, {"id": session_id})
        return self._remember(value)

    async def list_sessions(self, owner: str | None = None) -> list[SessionRecord]:
        if owner is not None:
            values = await self._as_user("query", "sessions:list", owner, {})
        else:
            values, cursor = [], None
            while True:
                page = await self._as_server("query", "sessions:listAll",
                                             {"cursor": cursor, "num_items": PAGE})
                values.extend(page["page"])
                if page["is_done"]:
                    break
                cursor = page["continue_cursor"]
        return [r for r in [self._remember(v) for v in values] if r is not None]

    async def update_session(self, session_id: str, **fields: Any) -> None:
        unknown = set(fields) - SESSION_FIELDS
        if unknown:
            raise StoreError(f"unknown session fields: {sorted(unknown)}")
        if "sandbox_state" in fields:
            fields["sandbox_state"] = _json(fields["sandbox_state"])
        owner = await self._owner(session_id)
        if owner is None:
            return  # as SQLite: updating nothing changes nothing
        await self._as_user("mutation", "sessions:update", owner, {"id": session_id, "fields": fields})

    async def delete_session(self, session_id: str) -> None:
        owner = await self._owner(session_id)
        if owner is not None:
            await self._as_user("mutation", "sessions:remove", owner, {"id": session_id})
            self._owners.pop(session_id, None)

    async def claim_session(self, session_id: str, server_id: str, expected: str | None) -> bool:
        return bool(await self._as_server("mutation", "sessions:claim",
                                          {"id": session_id, "server_id": server_id,
                                           "expected": expected}))

    # leases ---------------------------------------------------------------------------------
    async def put_lease(self, lease: Lease) -> None:
        lease.heartbeat_at = lease.heartbeat_at or time.time()
        self._server_subject = lease.server_id
        await self._as_server("mutation", "leases:put", {
            "server_id": lease.server_id, "expires_at": lease.expires_at,
            "heartbeat_at": lease.heartbeat_at, "info": _json(lease.info)})

    async def list_leases(self) -> list[Lease]:
        return [Lease(v["server_id"], v["expires_at"], json.loads(v["info"]), v["heartbeat_at"])
                for v in await self._as_server("query", "leases:list", {})]

    async def release_lease(self, server_id: str) -> None:
        await self._as_server("mutation", "leases:release", {"server_id": server_id})

    # events ---------------------------------------------------------------------------------
    async def append_events(self, session_id: str, events: Sequence[NewEvent]) -> list[Event]:
        if not events:
            return []
        batch = [{"type": e.type, "data": _json(e.data), "ts": e.ts} for e in events]
        stored = []
        for part in _parts(batch):  # one part, unless the batch is huge
            stored += await self._write_of_session(
                "events:append", session_id, {"key": _key("events", session_id, part), "events": part})
        return [_event(session_id, v) for v in stored]

    async def list_events(self, session_id: str, after: int = 0, limit: int = 1000) -> list[Event]:
        values = await self._of_session("query", "events:list", session_id,
                                        {"after": after, "limit": limit}, [])
        return [_event(session_id, v) for v in values]

    async def last_seq(self, session_id: str) -> int:
        return int(await self._of_session("query", "events:lastSeq", session_id, {}, 0))

    # prompts --------------------------------------------------------------------------------
    async def enqueue_prompt(self, prompt: Prompt) -> Prompt:
        args = {"id": prompt.id, "text": prompt.text, "status": prompt.status,
                "created_at": prompt.created_at}
        if prompt.attachments:  # optional: a deployment without the field still takes the rest
            args["attachments"] = json.dumps(prompt.attachments)
        owner = await self._owner(prompt.session_id)
        if owner is None:
            raise ConvexRefused("prompts:enqueue", f"no session {prompt.session_id}", "not_found")
        value = await self._as_user("mutation", "prompts:enqueue", owner,
                                    {"prompt": {"session_id": prompt.session_id, **args}})
        self._prompts[prompt.id] = prompt.session_id
        prompt.position = int(value["position"])
        return prompt

    async def pending_prompts(self, session_id: str) -> list[Prompt]:
        prompts = [_prompt(v) for v in await self._of_session("query", "prompts:pending", session_id,
                                                              {}, [])]
        self._prompts.update((p.id, p.session_id) for p in prompts)
        return prompts

    async def set_prompt_status(self, prompt_id: str, status: str) -> None:
        session_id = self._prompts.get(prompt_id)
        owner = await self._owner(session_id) if session_id is not None else None
        if owner is None:  # tabbi sets the status of prompts it enqueued or listed
            raise ConvexRefused("prompts:setStatus", f"unknown prompt {prompt_id}", "not_found")
        await self._as_user("mutation", "prompts:setStatus", owner, {"id": prompt_id, "status": status})

    # messages and parts ---------------------------------------------------------------------
    async def upsert_message(
        self, session_id: str, message_id: str, role: str, info: dict[str, Any]
    ) -> None:
        await self._write_of_session("messages:upsert", session_id,
                                     {"message_id": message_id, "role": role, "info": _json(info)})

    async def upsert_part(
        self, session_id: str, message_id: str, part_id: str, part: dict[str, Any]
    ) -> None:
        await self._write_of_session("messages:upsertPart", session_id,
                                     {"message_id": message_id, "part_id": part_id, "part": _json(part)})

    async def list_messages(self, session_id: str) -> list[dict[str, Any]]:
        values = await self._of_session("query", "messages:list", session_id, {}, [])
        return [
            {"id": m["id"], "role": m["role"], "info": json.loads(m["info"]),
             "parts": [{"id": p["id"], **json.loads(p["part"])} for p in m["parts"]]}
            for m in values
        ]

    # snapshots ------------------------------------------------------------------------------
    async def add_snapshot(self, snapshot: Snapshot) -> None:
        owner = await self._owner(snapshot.session_id)
        if owner is None:
            raise ConvexRefused("snapshots:add", f"no session {snapshot.session_id}", "not_found")
        await self._as_user("mutation", "snapshots:add", owner, {"snapshot": {
            "session_id": snapshot.session_id, "id": snapshot.id, "ref": _json(snapshot.ref),
            "size": snapshot.size, "created_at": snapshot.created_at}})

    async def list_snapshots(self, session_id: str) -> list[Snapshot]:
        return [_snapshot(v) for v in await self._of_session("query", "snapshots:list", session_id,
                                                             {}, [])]

    async def delete_snapshot(self, session_id: str, snapshot_id: str) -> None:
        owner = await self._owner(session_id)
        if owner is not None:
            await self._as_user("mutation", "snapshots:remove", owner,
                                {"session_id": session_id, "id": snapshot_id})

    # spend of deleted sessions --------------------------------------------------------------
    async def retire_spend(self, user_id: str, session_id: str, cost: float, seconds: float) -> None:
        # Idempotent (the larger amount wins), so a retry after a lost answer cannot add twice.
        await self._as_user("mutation", "spend:retire", user_id,
                            {"session_id": session_id, "cost": spend_amount(cost),
                             "seconds": spend_amount(seconds)})

    async def retired_spend(self, user_id: str) -> tuple[float, float]:
        value = await self._as_user("query", "spend:total", user_id, {})
        return float(value["cost"]), float(value["seconds"])

    # tokens ---------------------------------------------------------------------------------
    async def put_token(self, username: str, provider: str, ciphertext: bytes) -> None:
        await self._as_user("mutation", "tokens:put", username,
                            {"provider": provider, "ciphertext": _b64(ciphertext)})

    async def swap_token(
        self, username: str, provider: str, expected: bytes, ciphertext: bytes | None
    ) -> bool:
        return bool(await self._as_user("mutation", "tokens:swap", username, {
            "provider": provider, "expected": _b64(expected),
            "ciphertext": _b64(ciphertext) if ciphertext is not None else None}))

    async def get_token(self, username: str, provider: str) -> bytes | None:
        value = await self._as_user("query", "tokens:get", username, {"provider": provider})
        return base64.b64decode(value) if value is not None else None

    async def delete_token(self, username: str, provider: str) -> None:
        await self._as_user("mutation", "tokens:remove", username, {"provider": provider})


def _answer(path: str, response: httpx.Response) -> Any:
    """Convex's answer as a value, or the store's error: 5xx (but 560) and 429 say "not now";
    560 is the function refusing; anything else is a request Convex will never accept."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if status == 200 and isinstance(body, dict) and body.get("status") == "success":
        return body.get("value")
    if status == 560 and isinstance(body, dict):
        data = body.get("errorData")
        if isinstance(data, dict) and data.get("code"):
            raise ConvexRefused(path, str(data.get("message") or body.get("errorMessage")), data["code"])
        raise ConvexRefused(path, str(body.get("errorMessage") or "the function failed"))
    detail = body.get("message") or body.get("code") if isinstance(body, dict) else None
    if status >= 500 or status == 429:
        raise StoreUnavailable(f"Convex {path}: HTTP {status}{f' ({detail})' if detail else ''}")
    if status == 401:
        raise StoreError(f"Convex {path}: the JWT was refused ({detail or 'HTTP 401'}); check the "
                         "key, its kid, the issuer and the application id against the deployment")
    raise StoreError(f"Convex {path}: HTTP {status}{f' ({detail})' if detail else ''}")
