"""The model gateway: the only way a sandbox reaches a model, and the only holder of model keys.

Threat: anything OpenCode can read, the agent's shell can read too (its environment, its config,
its files), and a prompt-injected agent would walk off with a team's model key. So no key enters
a sandbox. OpenCode is configured with ``<server>/tabbi/gateway/<session id>/v1`` as its
provider's base URL and a gateway token as its API key. The token is derived from the sandbox's
OpenCode password (random per sandbox start), so it is good for one session's current sandbox
only, is never stored, and a server that re-attaches to a detached sandbox derives it again from
the password it already keeps sealed. This server checks it in constant time, swaps it for the
real key, and forwards only the model API paths the provider needs (not an open proxy), streaming
the answer back chunk by chunk. Jupyter's own auth plays no part: OpenCode has no Jupyter token,
and a Jupyter token would be worth far more than a model call.

Usage the streams report (``usage`` of OpenAI's final chunk, Anthropic's ``message_start`` /
``message_delta``) is counted per session in memory: what budgets will build on.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from tornado import iostream, web

from . import logs, model_config
from .encryption import SecretBox
from .model_config import GatewayAccess, ModelSettings, Upstream
from .store import SessionRecord

log = logging.getLogger(__name__)

PREFIX = "/tabbi/gateway"
SESSION_ID = r"(?P<session_id>ses-[0-9a-f]{12})"

#: Model API paths (after ``/v1/``) forwarded per upstream kind, with their methods.
ALLOWED = {
    "openai-compatible": {"chat/completions": "POST", "responses": "POST", "models": "GET"},
    "openai": {"chat/completions": "POST", "responses": "POST", "models": "GET"},
    "anthropic": {"messages": "POST", "messages/count_tokens": "POST", "models": "GET"},
}

#: Request headers never forwarded: the caller's credential, cookies, hop-by-hop headers, and
#: what httpx sets itself. Everything else (content-type, anthropic-version, ...) goes through.
DROP_REQUEST = {
    "authorization", "x-api-key", "api-key", "cookie", "host", "content-length", "connection",
    "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "accept-encoding",
    "proxy-authorization", "proxy-connection", "x-xsrftoken", "x-forwarded-for",
}
#: Response headers not passed back (tornado frames the body itself).
DROP_RESPONSE = {"content-length", "transfer-encoding", "connection", "keep-alive", "set-cookie",
                 "content-encoding"}

TIMEOUT = httpx.Timeout(connect=15.0, read=600.0, write=60.0, pool=15.0)


def derive_token(password: str) -> str:
    """The gateway token of the sandbox whose OpenCode password is ``password``: knowing the
    token tells nothing about the password."""
    return hmac.new(password.encode(), b"tabbi-model-gateway-v1", hashlib.sha256).hexdigest()


@dataclass
class Grant:
    token: str
    upstream: Upstream


@dataclass
class Usage:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


class ModelGateway:
    """Tokens per session (in memory), the upstream they unlock, one HTTP client, usage counts."""

    def __init__(
        self,
        settings: Callable[[], ModelSettings],
        server_url: Callable[[], str],
        lookup: Callable[[str], Awaitable[SessionRecord | None]],
        secrets: SecretBox | None,
        warm: Callable[[str], bool] = lambda session_id: False,
    ):
        self._settings = settings
        #: Whether an id is a warm sandbox's that no session has taken yet: its OpenCode's
        #: rehearsal turn calls here and is refused, as expected (``bootstrap.rehearse_turn``).
        self.warm = warm
        self._server_url = server_url
        self._lookup = lookup
        self._secrets = secrets
        self._grants: dict[str, Grant] = {}
        self._client: httpx.AsyncClient | None = None
        self.usage: dict[str, Usage] = defaultdict(Usage)

    def base_url(self, session_id: str) -> str:
        return f"{self._server_url().rstrip('/')}{PREFIX}/{session_id}/v1"

    def issue(self, session_id: str, password: str, model: str | None) -> GatewayAccess:
        """A new sandbox of ``session_id`` starts with OpenCode password ``password``: its token
        replaces the previous sandbox's."""
        _, upstream = model_config.resolve(self._settings(), model)
        token = derive_token(password)
        self._grants[session_id] = Grant(token, upstream)
        return GatewayAccess(self.base_url(session_id), token)

    async def authorize(self, session_id: str, presented: str | None) -> Upstream | None:
        """The upstream ``presented`` unlocks for ``session_id``, or None."""
        grant = self._grants.get(session_id) or await self._recover(session_id)
        if grant is None or not presented:
            return None
        if not hmac.compare_digest(presented.encode(), grant.token.encode()):
            return None
        return grant.upstream

    async def _recover(self, session_id: str) -> Grant | None:
        """A sandbox started by an earlier server process and re-attached by this one: its token
        follows from the OpenCode password kept sealed with the session."""
        if self._secrets is None:
            return None
        record = await self._lookup(session_id)
        sealed = (record.sandbox_state or {}).get("password_sealed") if record else None
        password = self._secrets.decrypt(sealed.encode()) if sealed else None
        if record is None or password is None:
            return None
        try:
            _, upstream = model_config.resolve(self._settings(), record.model)
        except model_config.ModelConfigError:
            return None
        grant = Grant(derive_token(password.decode()), upstream)
        self._grants.setdefault(session_id, grant)
        return self._grants[session_id]

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=False, trust_env=False)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class UsageMeter:
    """Reads token counts out of a response as it streams past, without holding it."""

    def __init__(self) -> None:
        self.input = self.output = 0
        self._partial = b""
        self._body = bytearray()
        self._sse: bool | None = None

    def feed(self, chunk: bytes, content_type: str) -> None:
        if self._sse is None:
            self._sse = "text/event-stream" in content_type
        if not self._sse:
            if len(self._body) < 1_000_000:
                self._body += chunk
            return
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.startswith(b"data:") and b'"usage"' in line:
                self._count(line[5:])

    def finish(self) -> None:
        if not self._sse and self._body:
            self._count(bytes(self._body))

    def _count(self, data: bytes) -> None:
        try:
            payload = json.loads(data)
        except ValueError:
            return
        if not isinstance(payload, dict):
            return
        usage = payload.get("usage") or (payload.get("message") or {}).get("usage") or {}
        if not isinstance(usage, dict):
            return
        # OpenAI: prompt/completion tokens (chat) or input/output tokens (responses), in the
        # final chunk; Anthropic: input in message_start, the output total in message_delta.
        self.input = max(self.input, int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0))
        self.output = max(self.output, int(usage.get("completion_tokens") or usage.get("output_tokens") or 0))


class GatewayHandler(web.RequestHandler):
    """``/tabbi/gateway/<session>/v1/<path>``: check the gateway token, forward with the key.

    A plain tornado handler, not a Jupyter one: the caller is a sandbox, authenticated by its
    gateway token alone (never by Jupyter's cookies or tokens), so there is no XSRF to check.
    """

    _upstream: httpx.Response | None = None
    _closing: asyncio.Future | None = None
    _gone = False

    def check_xsrf_cookie(self) -> None:
        return None

    def on_connection_close(self) -> None:
        """OpenCode hung up (an abort, a dying sandbox): stop the upstream call at once, even
        while it is silent, so the model stops generating and billing."""
        self._gone = True
        if self._upstream is not None:
            self._closing = asyncio.ensure_future(self._upstream.aclose())

    @property
    def gateway(self) -> ModelGateway:
        return self.settings["tabbi_gateway"]

    async def prepare(self) -> None:
        ready = self.settings.get("tabbi_ready")
        if ready is not None:
            await ready()

    def _presented(self) -> str | None:
        header = self.request.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            return header[7:].strip()
        return self.request.headers.get("x-api-key") or None

    def _refuse(self, status: int, message: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": {"message": message, "type": "tabbi_gateway"}}))

    async def get(self, session_id: str, path: str) -> None:
        await self._forward(session_id, path)

    async def post(self, session_id: str, path: str) -> None:
        await self._forward(session_id, path)

    async def _forward(self, session_id: str, path: str) -> None:
        upstream = await self.gateway.authorize(session_id, self._presented())
        if upstream is None:
            if self.gateway.warm(session_id):  # not a warning: expected, once per warm sandbox
                logs.event(log, logging.INFO, "gateway.warm_refused",
                           f"model gateway: warm sandbox {session_id} refused", session=session_id)
            else:
                logs.event(log, logging.WARNING, "auth.gateway_refused",
                           f"model gateway: a call for {session_id} without its token", session=session_id)
            self._refuse(403, "invalid gateway token for this session")
            return
        if ALLOWED.get(upstream.kind, {}).get(path) != self.request.method:
            self._refuse(404, f"{self.request.method} /v1/{path} is not a model API path tabbi forwards")
            return
        headers = {k: v for k, v in self.request.headers.get_all() if k.lower() not in DROP_REQUEST}
        headers.update(upstream.auth_headers())
        headers["Accept-Encoding"] = "identity"  # chunks pass through as the upstream sends them
        url = f"{upstream.base_url}/{path}"
        query = self.request.query
        request = self.gateway.client.build_request(
            self.request.method, url + (f"?{query}" if query else ""), headers=headers,
            content=self.request.body if self.request.method == "POST" else None,
        )
        meter = UsageMeter()
        try:
            response = await self.gateway.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            log.warning("tabbi: gateway %s: upstream unreachable: %s", session_id, type(exc).__name__)
            self._refuse(502, "the model API could not be reached")
            return
        status = response.status_code
        self._upstream = response
        try:
            self.set_status(status)
            self.clear_header("Content-Type")  # tornado's default; the upstream's is added below
            for name, value in response.headers.multi_items():
                if name.lower() not in DROP_RESPONSE:
                    self.add_header(name, value)
            content_type = response.headers.get("content-type", "")
            async for chunk in response.aiter_raw():
                meter.feed(chunk, content_type)
                self.write(chunk)
                await self.flush()
            meter.finish()
            self.finish()
        except iostream.StreamClosedError:
            pass  # OpenCode went away (an abort): leaving the block closes the upstream stream
        except (httpx.HTTPError, httpx.StreamError) as exc:
            if not self._gone:
                log.warning("tabbi: gateway %s: upstream stream broke: %s", session_id, type(exc).__name__)
            if not self._gone and not self._finished:
                self.finish()
        finally:
            await response.aclose()
        self._account(session_id, status, meter)

    def _account(self, session_id: str, status: int, meter: UsageMeter) -> None:
        usage = self.gateway.usage[session_id]
        usage.requests += 1
        usage.input_tokens += meter.input
        usage.output_tokens += meter.output
        log.info("tabbi: gateway %s: %s %s -> %s, tokens in %d out %d", session_id,
                 self.request.method, self.request.path.rsplit("/v1/", 1)[-1], status,
                 meter.input, meter.output)


def routes() -> list[tuple[str, Any]]:
    """URL patterns relative to the server's base URL (the ExtensionApp prepends it)."""
    return [(PREFIX + f"/{SESSION_ID}/v1/(?P<path>[a-z_/]+)", GatewayHandler)]
