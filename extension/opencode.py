"""A small async client for one OpenCode server (``opencode serve``): HTTP calls and the SSE feed.

Every call has a timeout: a request sent while OpenCode is busy starting can hang with no answer.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from tabbi_sandbox.provider import Endpoint


class OpenCodeError(Exception):
    """OpenCode answered with an error or not at all; the message is readable."""


class OpenCodeClient:
    def __init__(self, endpoint: Endpoint, timeout: float = 30):
        self._client = httpx.AsyncClient(
            base_url=endpoint.url,
            auth=("opencode", endpoint.password),
            timeout=httpx.Timeout(timeout, connect=5),
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

    async def prompt(self, session_id: str, text: str, model: dict[str, str] | None) -> None:
        body: dict[str, Any] = {"parts": [{"type": "text", "text": text}]}
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
