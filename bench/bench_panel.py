"""What one streamed delta costs the chat panel's kernel side as the conversation grows: time and
bytes sent to the front end per delta with 10, 100 and 1,000 messages already in the conversation.

Baseline, measured in the same run: the old way, the whole conversation as a synced trait
(``messages``: deep-copied and re-sent on every flush). New: ``ChatPanel`` as shipped, the delta
as one custom widget message. Both go through the real ipywidgets/anywidget send path into a comm
that counts the bytes of each message as JSON (what the kernel would put on the wire), one delta
per flush (the worst case: tokens slower than the 50 ms coalescing window).

Run: ``.venv/bin/python bench/bench_panel.py [DELTAS]``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import statistics
import sys
import time

import anywidget
import comm
import traitlets
from comm.base_comm import BaseComm
from harness import machine

from tabbi_kernel.client import Client, Session
from tabbi_kernel.conversation import Conversation
from tabbi_kernel.panel import ChatPanel


class CountingComm(BaseComm):
    """A comm that sends nothing and counts the JSON bytes of what it would send."""

    sent: list[int] = []

    def publish_msg(self, msg_type: str, data=None, metadata=None, buffers=None, **keys) -> None:
        CountingComm.sent.append(len(json.dumps(data, separators=(",", ":"), default=str)))


comm.create_comm = CountingComm


class WholeStatePanel(anywidget.AnyWidget):
    """The baseline: the panel before deltas, the conversation as one synced trait."""

    _esm = "export default { render() {} }"
    messages = traitlets.List().tag(sync=True)
    busy = traitlets.Bool(False).tag(sync=True)
    last_seq = traitlets.Int(0).tag(sync=True)

    def __init__(self) -> None:
        super().__init__()
        self.conversation = Conversation()

    def receive(self, event: dict) -> None:
        self.conversation.apply(event)

    def flush(self) -> None:
        conv = self.conversation
        with self.hold_sync():
            self.busy = conv.busy
            self.last_seq = conv.last_seq
            self.messages = copy.deepcopy(conv.messages)


def history(n_messages: int) -> list[dict]:
    """A conversation of ``n_messages``: prompts, and replies with text and a tool call each."""
    events, seq = [], 0

    def event(kind: str, **data) -> None:
        nonlocal seq
        seq += 1
        events.append({"seq": seq, "type": kind, "data": data, "ts": 0})

    for i in range(n_messages):
        mid = f"m{i}"
        if i % 2 == 0:
            event("turn.started", prompt_id=f"p{i}", text="do the next thing")
            event("message", message_id=mid, role="user")
            event("part.updated", message_id=mid, part_id="t", part_type="text", role="user",
                  text="Please change the loader so that it reads the CSV lazily. " * 3)
        else:
            event("message", message_id=mid, role="assistant")
            event("part.updated", message_id=mid, part_id="t", part_type="text", role="assistant",
                  text="I read the loader and changed it to stream rows instead of loading all. " * 4)
            event("tool", message_id=mid, part_id="k", call_id="c", tool="edit", status="completed",
                  title="loader.py",
                  input={"filePath": "loader.py", "oldString": "a" * 120, "newString": "b" * 120},
                  output="Edit applied successfully.", error=None)
            event("turn.finished", prompt_id=f"p{i - 1}", outcome="completed")
    event("turn.started", prompt_id="live", text="one more")
    event("message", message_id="live", role="assistant")
    return events


def measure(panel, feed, flush, events: list[dict], deltas: int) -> tuple[float, float, int]:
    """Seconds per delta (median), bytes per delta (median), messages in the conversation."""
    for event in events:
        feed(event)
    flush()
    seq = events[-1]["seq"]
    times, sizes = [], []
    for i in range(deltas):
        seq += 1
        before = len(CountingComm.sent)
        start = time.perf_counter()
        feed({"seq": seq, "type": "text.delta", "ts": 0,
              "data": {"message_id": "live", "part_id": "t", "field": "text", "delta": f"tok{i} "}})
        flush()
        times.append(time.perf_counter() - start)
        sizes.append(sum(CountingComm.sent[before:]))
    return statistics.median(times), statistics.median(sizes), len(panel_messages(panel))


def panel_messages(panel) -> list:
    return panel.conversation.messages if isinstance(panel, WholeStatePanel) else panel._conversation.messages


async def run(deltas: int) -> list[tuple[int, tuple, tuple]]:
    rows = []
    for n in (10, 100, 1000):
        events = history(n)
        old = WholeStatePanel()
        before = measure(old, old.receive, old.flush, events, deltas)
        session = Session(Client("http://127.0.0.1:9/"), f"ses-bench{n}", {"repo": "r", "work_branch": "b"})
        new = ChatPanel(session)
        new._follower._task.cancel()  # no server here: the bench feeds the events itself
        after = measure(new, new._follower.receive, new._follower.flush, events, deltas)
        new.close()
        old.close()
        rows.append((n, before, after))
    return rows


def main(deltas: int = 200) -> None:
    rows = asyncio.run(run(deltas))
    print(f"# chat panel, cost of one streamed delta ({deltas} deltas per size, one per flush)")
    print(f"# machine: {machine()}")
    print("| messages | old: time/delta | old: bytes/delta | new: time/delta | new: bytes/delta "
          "| time ratio old/new | bytes ratio old/new |")
    print("|---|---|---|---|---|---|---|")
    for _, (t_old, b_old, m_old), (t_new, b_new, m_new) in rows:
        assert m_old == m_new, (m_old, m_new)
        print(f"| {m_new - 1:,} | {t_old * 1e6:,.0f} µs | {b_old:,.0f} B | {t_new * 1e6:,.0f} µs | "
              f"{b_new:,.0f} B | {t_old / t_new:,.1f} | {b_old / b_new:,.0f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
