"""A thin test client for tabbi's REST API on top of pytest-jupyter's ``jp_fetch``.

Waiting is always on a condition with a deadline: ``wait_for`` long-polls the events endpoint
(the server answers as soon as a newer event exists) until a predicate holds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any


class ApiError(AssertionError):
    def __init__(self, code: int, body: dict[str, Any]):
        super().__init__(f"HTTP {code}: {body}")
        self.code = code
        self.body = body


class Api:
    def __init__(self, fetch: Callable[..., Any], headers: dict[str, str] | None = None):
        self.fetch = fetch
        self.headers = headers or {}

    async def call(self, method: str, path: str, body: Any = None, params: dict | None = None,
                   timeout: float = 60) -> tuple[int, dict[str, Any]]:
        kwargs: dict[str, Any] = {"method": method, "raise_error": False,
                                  "request_timeout": timeout, "headers": dict(self.headers)}
        if body is not None:
            kwargs["body"] = body if isinstance(body, (str, bytes)) else json.dumps(body)
        elif method in ("POST", "PUT", "PATCH"):
            kwargs["body"] = "{}"
        response = await self.fetch(*path.split("/"), params=params, **kwargs)
        text = response.body.decode() if response.body else ""
        try:
            data = json.loads(text) if text else {}
        except ValueError:
            data = {"raw": text}
        return response.code, data

    async def ok(self, method: str, path: str, body: Any = None, params: dict | None = None,
                 expect: int = 200) -> dict[str, Any]:
        code, data = await self.call(method, path, body, params)
        if code != expect:
            raise ApiError(code, data)
        return data

    async def create(self, repo: str, **extra: Any) -> dict[str, Any]:
        return await self.ok("POST", "tabbi/api/sessions", {"repo": repo, **extra}, expect=201)

    async def prompt(self, sid: str, text: str) -> dict[str, Any]:
        return await self.ok("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": text}, expect=202)

    async def events(self, sid: str, after: int = 0, wait: float = 0) -> dict[str, Any]:
        return await self.ok("GET", f"tabbi/api/sessions/{sid}/events",
                             params={"after": after, "wait": wait})

    async def wait_for(self, sid: str, predicate: Callable[[dict], bool], after: int = 0,
                       timeout: float = 90) -> list[dict[str, Any]]:
        """Collect events after ``after`` until one satisfies ``predicate``; return them all."""
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail = [(e["seq"], e["type"], e["data"]) for e in seen[-15:]]
                raise AssertionError(f"condition not met within {timeout} s; last events: {tail}")
            page = await self.events(sid, after, wait=min(remaining, 10))
            for event in page["events"]:
                seen.append(event)
                after = event["seq"]
                if predicate(event):
                    return seen

    async def wait_turn(self, sid: str, after: int = 0, timeout: float = 90) -> list[dict[str, Any]]:
        return await self.wait_for(sid, lambda e: e["type"] == "turn.finished", after, timeout)

    async def wait_state(self, sid: str, state: str, after: int = 0,
                         timeout: float = 90) -> list[dict[str, Any]]:
        """Wait for ``session.status`` with ``state``; reaching ``error`` instead fails the test."""

        def reached(event: dict[str, Any]) -> bool:
            if event["type"] != "session.status":
                return False
            current = event["data"]["state"]
            if current == "error" and state != "error":
                raise AssertionError(f"session went to error: {event['data']}")
            return current == state

        return await self.wait_for(sid, reached, after, timeout)
