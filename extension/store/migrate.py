"""Copy a SQLite store into another store (Convex), so that a person who started locally keeps
their sessions, history and GitHub sign-in when their server moves to a shared deployment.

    python -m tabbi_extension.store.migrate --from ~/.local/share/jupyter/tabbi/tabbi.sqlite3 \\
        --to https://NAME.convex.cloud [--config jupyter_config.py] [--ConvexStore.jwt_issuer=...]

The target is configured like the server's (``c.ConvexStore.*`` in ``--config``, or the
``TABBI_CONVEX_*`` environment variables). Stop the Jupyter server that uses the SQLite file
first, and give the new server the same ``encryption_key``: tokens are copied still sealed.

**Idempotent and resumable.** Every step can be repeated, so an interrupted copy is finished by
running the command again: sessions are created once and then updated to the source's fields;
events continue after the last one the target holds, in the source's order, so their ``seq``s
are the source's (checked), each batch with a key derived from its content (a batch whose answer
was lost is not written twice); prompts are keyed by their id (status set afterwards); messages,
parts, users and tokens are upserts; snapshots are added once; the retired spend of deleted
sessions (budgets) is idempotent by owner and session. Leases are not copied: the new
server takes its own. A final check compares the counts on both sides.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from traitlets import Unicode
from traitlets.config import Application

from .base import NewEvent, Prompt, SessionRecord, Store, StoreError
from .convex import ConvexStore
from .sqlite import SQLiteStore

USAGE = __doc__

#: Events read and written per call (within Convex's 500 per mutation).
BATCH = 200


class MigrationError(Exception):
    """The copy cannot go on (the target holds something that contradicts the source)."""


@dataclass
class Report:
    """What the target holds of the source's data after a copy (counted on both sides)."""

    sessions: int = 0
    events: int = 0
    events_copied: int = 0
    prompts: int = 0
    messages: int = 0
    parts: int = 0
    snapshots: int = 0
    users: int = 0
    tokens: int = 0
    retired_spend: int = 0
    mismatches: list[str] = field(default_factory=list)


def _enumerate(path: Path) -> tuple[list[str], list[tuple[str, str]], list[Prompt], list[tuple]]:
    """What the store interface cannot list: every user, token and prompt (also finished ones),
    and the spend of deleted sessions, read from the SQLite file itself (read-only)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        users = [r[0] for r in conn.execute("SELECT username FROM users ORDER BY username")]
        tokens = [(r[0], r[1]) for r in conn.execute(
            "SELECT username, provider FROM tokens ORDER BY username, provider")]
        prompts = [Prompt(*r) for r in conn.execute(
            "SELECT id, session_id, text, status, created_at, position FROM prompts "
            "ORDER BY session_id, position")]
        retired = list(conn.execute(
            "SELECT user_id, session_id, cost, seconds FROM retired_spend ORDER BY user_id, session_id"))
    finally:
        conn.close()
    return users, tokens, prompts, retired


async def copy_store(source: SQLiteStore, target: Store,
                     say: Callable[[str], None] = lambda _: None) -> Report:
    """Copy everything of ``source`` into ``target`` (both open), resuming a copy cut short."""
    report = Report()
    users, tokens, prompts, retired = await asyncio.to_thread(_enumerate, source.path)
    for username in users:
        profile = await source.get_user(username)
        await target.upsert_user(username, profile or {})
        report.users += 1
    for username, provider in tokens:
        ciphertext = await source.get_token(username, provider)
        if ciphertext is not None:
            await target.put_token(username, provider, ciphertext)
            report.tokens += 1
    for username, session_id, cost, seconds in retired:  # deleted sessions still count (budgets)
        await target.retire_spend(username, session_id, cost, seconds)
        report.retired_spend += 1
    by_session: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        by_session.setdefault(prompt.session_id, []).append(prompt)
    sessions = sorted(await source.list_sessions(), key=lambda r: r.created_at)
    for number, record in enumerate(sessions, 1):
        say(f"[{number}/{len(sessions)}] {record.id} ({record.owner}, {record.repo})")
        await _copy_session(source, target, record, by_session.get(record.id, []), report)
    await _check(source, target, sessions, by_session, report)
    return report


async def _copy_session(source: SQLiteStore, target: Store, record: SessionRecord,
                        prompts: list[Prompt], report: Report) -> None:
    fields = {name: getattr(record, name) for name in
              ("state", "base_commit", "error", "opencode_session_id", "sandbox_state", "model")}
    if await target.get_session(record.id) is None:
        # No server runs it in the target yet: the next server there claims it.
        await target.create_session(dataclasses.replace(record, server_id=None))
    else:
        await target.update_session(record.id, **fields)
    report.sessions += 1
    # Events: after the last the target holds, in order, so the seqs come out the same.
    last = await target.last_seq(record.id)
    while True:
        batch = await source.list_events(record.id, after=last, limit=BATCH)
        if not batch:
            break
        if batch[0].seq != last + 1:
            raise MigrationError(f"{record.id}: the source's log has a gap after seq {last}")
        stored = await target.append_events(record.id, [NewEvent(e.type, e.data, e.ts) for e in batch])
        if [e.seq for e in stored] != [e.seq for e in batch]:
            raise MigrationError(f"{record.id}: the target numbered events {stored[0].seq}.. where "
                                 f"the source has {batch[0].seq}.. (did something else write it?)")
        last = batch[-1].seq
        report.events_copied += len(batch)
    for prompt in prompts:  # in position order: the target gives the same positions
        copy = Prompt(prompt.id, prompt.session_id, prompt.text, prompt.status, prompt.created_at)
        await target.enqueue_prompt(copy)
        await target.set_prompt_status(prompt.id, prompt.status)
        report.prompts += 1
    for message in await source.list_messages(record.id):
        await target.upsert_message(record.id, message["id"], message["role"], message["info"])
        report.messages += 1
        for part in message["parts"]:
            body = {k: v for k, v in part.items() if k != "id"}
            await target.upsert_part(record.id, message["id"], part["id"], body)
            report.parts += 1
    have = {s.id for s in await target.list_snapshots(record.id)}
    for snapshot in reversed(await source.list_snapshots(record.id)):  # oldest first
        if snapshot.id not in have:
            await target.add_snapshot(snapshot)
        report.snapshots += 1


async def _check(source: SQLiteStore, target: Store, sessions: list[SessionRecord],
                 prompts: dict[str, list[Prompt]], report: Report) -> None:
    """Compare both sides: per session its last seq, its unfinished prompts, its messages and
    parts, its snapshots."""
    for record in sessions:
        sid = record.id
        checks = {
            "last seq": (await source.last_seq(sid), await target.last_seq(sid)),
            "pending prompts": ([(p.id, p.position) for p in await source.pending_prompts(sid)],
                                [(p.id, p.position) for p in await target.pending_prompts(sid)]),
            "messages": (await source.list_messages(sid), await target.list_messages(sid)),
            "snapshots": ([s.id for s in await source.list_snapshots(sid)],
                          [s.id for s in await target.list_snapshots(sid)]),
        }
        report.events += checks["last seq"][1]
        for what, (here, there) in checks.items():
            if here != there:
                report.mismatches.append(f"{sid}: {what} differ")


class MigrateStore(Application):
    """``python -m tabbi_extension.store.migrate``: copy a SQLite store into Convex."""

    name = "tabbi-migrate-store"
    description = USAGE
    classes = [ConvexStore]
    source = Unicode(help="The SQLite database file to copy (tabbi.sqlite3 in the data dir).").tag(
        config=True)
    jupyter_config = Unicode(
        help="A Jupyter config file whose c.ConvexStore settings the target uses.").tag(config=True)
    aliases = {"from": "MigrateStore.source", "to": "ConvexStore.url",
               "config": "MigrateStore.jupyter_config"}

    def start(self) -> None:
        if not self.source or not Path(self.source).is_file():
            self.exit_with(f"--from must name an existing SQLite file (got {self.source!r})")
        if self.jupyter_config:
            path = Path(self.jupyter_config).expanduser()
            self.load_config_file(path.name, path=str(path.parent))
            self.update_config(self.cli_config)  # the command line wins over the file
        try:
            report = asyncio.run(self._run())
        except (StoreError, MigrationError) as exc:
            self.exit_with(f"{exc}\nNothing copied so far is lost: run the command again to go on.")
        print(f"copied: {report.sessions} sessions, {report.events} events "
              f"({report.events_copied} new), {report.prompts} prompts, {report.messages} messages, "
              f"{report.parts} parts, {report.snapshots} snapshots, {report.users} users, "
              f"{report.tokens} tokens")
        if report.mismatches:
            self.exit_with("the target differs from the source:\n  " + "\n  ".join(report.mismatches))

    def exit_with(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        self.exit(1)

    async def _run(self) -> Report:
        source = SQLiteStore(Path(self.source).expanduser())
        target = ConvexStore(parent=self)
        await source.open()
        try:
            await target.open()
            try:
                return await copy_store(source, target, lambda line: print(line, flush=True))
            finally:
                await target.close()
        finally:
            await source.close()


main = MigrateStore.launch_instance

if __name__ == "__main__":
    main()
