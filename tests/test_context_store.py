"""What a prompt carries besides its text is kept by every store (the contract's ``store``
fixture: SQLite and Convex through its real HTTP API), until the prompt is delivered: a server
restarted in between still hands the model the attachments the person chose."""

from __future__ import annotations

import time

from tabbi_extension.store import Prompt
from tests.support.convex_standin import convex_standin  # noqa: F401 (a fixture)
from tests.test_store_contract import backend, record, store  # noqa: F401 (fixtures and a helper)


async def test_attachments_are_kept_with_the_prompt(store):  # noqa: F811
    await store.create_session(record("ses-1"))
    items = [{"kind": "variable", "label": "df", "content": "df: schema é\n" * 50, "truncated": True},
             {"kind": "error", "label": "@error", "content": "KeyError", "truncated": False}]
    await store.enqueue_prompt(Prompt("p1", "ses-1", "with", "queued", time.time(), attachments=items))
    await store.enqueue_prompt(Prompt("p2", "ses-1", "without", "queued", time.time()))
    pending = await store.pending_prompts("ses-1")
    assert [(p.id, p.attachments) for p in pending] == [("p1", items), ("p2", [])]
