"""OpenCode as tabbi's agent runtime: a small async client for one ``opencode serve`` (HTTP calls
and the SSE feed) and ``OpenCodeRuntime``, which speaks ``runtime.AgentRuntime`` on top of it.

Every call has a timeout: a request sent while OpenCode is busy starting can hang with no answer.
"""

from __future__ import annotations

import functools
import json
import ssl
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from tabbi_sandbox.provider import Endpoint

from .normalize import EventNormalizer
from .runtime import AgentRuntime, AgentRuntimeError, Update


class OpenCodeError(AgentRuntimeError):
    """OpenCode answered with an error or not at all; the message is readable."""


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every OpenCode client of the process. Building one reads the whole CA
    bundle: 35-260 ms of CPU on the server's event loop (measured on 2 cores, idle to loaded),
    which stalled every session's stream each time a sandbox was connected."""
    return httpx.create_ssl_context()


class OpenCodeClient:
    def __init__(self, endpoint: Endpoint, timeout: float = 30):
        self._client = httpx.AsyncClient(
            base_url=endpoint.url,
            auth=("opencode", endpoint.password),
            timeout=httpx.Timeout(timeout, connect=5),
            verify=_tls(),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise OpenCodeError(f"OpenCode did not answer {method} {path}: {exc!r}") from exc
        if response.status_code >= 400:
            raise OpenCodeError(
                f"OpenCode answered {method} {path} with {response.status_code}: "
                f"{response.text[:300]}"
            )
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.text

    async def health(self) -> dict[str, Any]:
        return await self._call("GET", "/global/health", timeout=3)

    async def create_session(self) -> str:
        return (await self._call("POST", "/session", json={}))["id"]

    async def session_exists(self, session_id: str) -> bool:
        try:
            await self._call("GET", f"/session/{session_id}")
        except OpenCodeError:
            return False
        return True

    async def prompt(self, session_id: str, text: str, model: dict[str, str] | None,
                     attachments: Sequence[str] = ()) -> None:
        # Attachments are text parts of their own, marked synthetic: the model reads them, and
        # the normalizer keeps them out of the user's message (what was attached shows as badges).
        parts = [{"type": "text", "text": text}] + [
            {"type": "text", "text": block, "synthetic": True} for block in attachments]
        body: dict[str, Any] = {"parts": parts}
        if model:
            body["model"] = model
        await self._call("POST", f"/session/{session_id}/prompt_async", json=body)

    async def abort(self, session_id: str) -> None:
        await self._call("POST", f"/session/{session_id}/abort", timeout=10)

    async def messages(self, session_id: str) -> list[dict[str, Any]]:
        """The session's messages, each ``{info, parts}``: OpenCode's current truth, for
        catching up after events were missed."""
        return await self._call("GET", f"/session/{session_id}/message") or []

    async def statuses(self) -> dict[str, Any]:
        return await self._call("GET", "/session/status", timeout=5) or {}

    async def reply_permission(self, permission_id: str, reply: str) -> None:
        await self._call("POST", f"/permission/{permission_id}/reply", json={"reply": reply})

    async def events(self, idle_timeout: float = 30) -> AsyncIterator[dict[str, Any]]:
        """Yield OpenCode's events until the stream ends. OpenCode sends a heartbeat every 10 s,
        so ``idle_timeout`` of silence means the connection is dead."""
        timeout = httpx.Timeout(10, read=idle_timeout)
        async with self._client.stream("GET", "/event", timeout=timeout) as response:
            if response.status_code != 200:
                raise OpenCodeError(f"OpenCode's event stream answered {response.status_code}")
            data: list[str] = []
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    data.append(line[5:].lstrip())
                elif not line and data:
                    event = _parse(data)
                    data = []
                    if event is not None:
                        yield event


def _parse(lines: list[str]) -> dict[str, Any] | None:
    try:
        event = json.loads("\n".join(lines))
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


class OpenCodeRuntime(AgentRuntime):
    """One OpenCode server and one of its sessions (tabbi's "conversation")."""

    def __init__(self, endpoint: Endpoint):
        self.client = OpenCodeClient(endpoint)
        self.conversation = ""
        self.normalizer = EventNormalizer("")

    async def open(self, conversation: str | None, *, must_exist: bool = False) -> str:
        if not conversation or not await self.client.session_exists(conversation):
            if must_exist:
                raise OpenCodeError("the sandbox's agent no longer has this session")
            conversation = await self.client.create_session()
        self.conversation = conversation
        self.normalizer = EventNormalizer(conversation)
        return conversation

    async def updates(self) -> AsyncIterator[Update | None]:
        async for raw in self.client.events():
            if raw.get("type") == "server.connected":
                yield None
                continue
            events, signals = self.normalizer.feed(raw)
            if events or signals:
                yield Update(events, signals)

    async def replay(self, persisted: list[dict[str, Any]]) -> list[Update]:
        """OpenCode's messages as complete ``message.updated`` / ``message.part.updated`` events,
        where they differ from what ``persisted`` holds."""
        known = {m["id"]: {p["id"]: p for p in m["parts"]} for m in persisted}
        for m in persisted:  # a normalizer new to this session still knows whose parts are whose
            self.normalizer.roles.setdefault(m["id"], m["role"])
        out = []
        for message in await self.client.messages(self.conversation):
            info = message.get("info") or {}
            if info.get("id") not in known:
                out.append(Update(*self.normalizer.feed(
                    {"type": "message.updated", "properties": {"info": info}})))
            stored = known.get(info.get("id"), {})
            for part in message.get("parts") or []:
                events, signals = self.normalizer.feed(
                    {"type": "message.part.updated", "properties": {"part": part}})
                if signals.part is not None:
                    _, part_id, normalized = signals.part
                    if {k: v for k, v in (stored.get(part_id) or {}).items() if k != "id"} == normalized:
                        continue
                out.append(Update(events, signals))
        return out

    async def busy(self) -> bool:
        return self.conversation in await self.client.statuses()

    async def received_prompt_since(self, when: float) -> bool:
        # OpenCode stamps messages in milliseconds; a second of slack covers clock rounding.
        for message in await self.client.messages(self.conversation):
            info = message.get("info") or {}
            created = (info.get("time") or {}).get("created") or 0
            if info.get("role") == "user" and created / 1000 >= when - 1.0:
                return True
        return False

    async def prompt(self, text: str, model: dict[str, str] | None, attachments: Sequence[str] = ()) -> None:
        await self.client.prompt(self.conversation, text, model, attachments)

    async def abort(self) -> None:
        await self.client.abort(self.conversation)

    async def reply_permission(self, permission_id: str, reply: str) -> None:
        await self.client.reply_permission(permission_id, reply)

    async def aclose(self) -> None:
        await self.client.aclose()
