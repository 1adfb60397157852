"""Keeping a session's snapshots: save one, keep the newest few, report what happened.

When a snapshot is taken is the session's business (``SessionAgent``: after each turn, before a
pause, at a clean stop; always of a quiet workspace). How it is made is the provider's. This
module is the bookkeeping between them: one snapshot at a time, stored before it is announced,
older ones deleted only once a newer one is stored, and a failure reported as an event that
leaves the sandbox running.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable

from tabbi_sandbox.provider import Sandbox, SandboxProvider

from . import metrics
from .eventlog import EventLog, with_retries
from .store import Snapshot, Store

log = logging.getLogger(__name__)


class SnapshotKeeper:
    def __init__(self, session_id: str, store: Store, provider: SandboxProvider, events: EventLog,
                 keep: int = 3, retries: int = 3):
        self.session_id = session_id
        self.store = store
        self.provider = provider
        self.events = events
        self.keep = keep
        self.retries = retries
        self._lock = asyncio.Lock()

    async def take(self, sandbox: Sandbox, reason: str,
                   readable: Callable[[BaseException, str], str]) -> Snapshot | None:
        """Save ``sandbox`` now. None (and a ``snapshot.failed`` event) when that failed."""
        async with self._lock:
            name = f"{int(time.time() * 1000)}-{secrets.token_hex(3)}"
            started = time.monotonic()
            try:
                ref, size = await self.provider.snapshot(sandbox, name)
            except Exception as exc:  # any failure: report, keep running, retry next time
                metrics.SNAPSHOT_SECONDS.labels("failed").observe(time.monotonic() - started)
                log.warning("tabbi: snapshot of %s failed", self.session_id, exc_info=True)
                await self.events.append("snapshot.failed", {
                    "reason": reason, "message": readable(exc, "The snapshot failed")})
                return None
            snapshot = Snapshot(self.session_id, name, ref, size, time.time())
            await with_retries(lambda: self.store.add_snapshot(snapshot), self.retries)
            seconds = round(time.monotonic() - started, 3)
            metrics.SNAPSHOT_SECONDS.labels("saved").observe(seconds)
            metrics.SNAPSHOT_BYTES.observe(size)
            # Older ones go once this one is stored, and before it is announced, so that a client
            # seeing ``snapshot.saved`` sees the kept set as it stays.
            for old in (await self.store.list_snapshots(self.session_id))[self.keep:]:
                await self.provider.delete_snapshot(old.ref)
                await self.store.delete_snapshot(self.session_id, old.id)
            await self.events.append("snapshot.saved", {
                "snapshot_id": name, "size": size, "reason": reason, "seconds": seconds})
            return snapshot

    async def latest(self) -> Snapshot | None:
        snapshots = await self.store.list_snapshots(self.session_id)
        return snapshots[0] if snapshots else None

    async def delete_all(self) -> None:
        for snapshot in await self.store.list_snapshots(self.session_id):
            await self.provider.delete_snapshot(snapshot.ref)
