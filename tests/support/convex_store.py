"""A ``ConvexStore`` pointed at the loopback Convex stand-in: its traits, its environment (what a
deployment sets: ``TABBI_CONVEX_*``) and the Jupyter config that selects it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from tabbi_extension.store import ConvexStore
from tests.support.convex_standin import ConvexStandin

STORE_CLASS = "tabbi_extension.store.ConvexStore"


def store_traits(standin: ConvexStandin) -> dict[str, Any]:
    """``c.ConvexStore.*`` for the stand-in (its two keys, their kids, issuer, audience)."""
    keys = standin.keys
    return {
        "url": standin.url,
        "jwt_key": keys.user.private_pem,
        "jwt_key_id": keys.user.kid,
        "server_jwt_key": keys.server.private_pem,
        "server_jwt_key_id": keys.server.kid,
        "jwt_issuer": keys.issuer,
        "application_id": keys.audience,
    }


def store_env(standin: ConvexStandin) -> dict[str, str]:
    """The same as environment variables, as a deployment sets them from its secrets."""
    names = {
        "url": "TABBI_CONVEX_URL",
        "jwt_key": "TABBI_CONVEX_JWT_KEY",
        "jwt_key_id": "TABBI_CONVEX_JWT_KID",
        "server_jwt_key": "TABBI_CONVEX_SERVER_JWT_KEY",
        "server_jwt_key_id": "TABBI_CONVEX_SERVER_JWT_KID",
        "jwt_issuer": "TABBI_CONVEX_JWT_ISSUER",
        "application_id": "TABBI_CONVEX_APPLICATION_ID",
    }
    return {names[k]: v for k, v in store_traits(standin).items()}


def make_store(standin: ConvexStandin, **traits: Any) -> ConvexStore:
    return ConvexStore(**{**store_traits(standin), **traits})


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` (cheap and local: a store's state, the stand-in's counters) until it
    holds, failing after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)  # a poll interval; the condition is what is waited for
