"""A scripted OpenAI-compatible streaming model server on 127.0.0.1, the stand-in for the LLM.

Tests program it per test with a queue of replies, one per model call that carries tools (the
agent's steps). Calls without tools are OpenCode's title requests and get a fixed title without
using the script. When the script runs out, the reply is plain text ("OK.").

It speaks the real protocol (``POST /v1/chat/completions`` with ``stream: true``, SSE chunks,
``[DONE]``), records every request, and can drip slowly (abort tests), stall until the client
hangs up (deadline tests), fail with an HTTP status, or send a malformed chunk. It counts the
streams a client closed before their end (``wait_closed``): that is how a test sees that an abort
or a deadline really cut the model off, rather than letting it stream (and bill) on.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from tabbi_extension import chat_completions
from tabbi_extension.chat_completions import (  # noqa: F401 - the tests' script vocabulary
    StreamHandler,
    bash,
    edit,
    read,
    write,
)

TITLE = "Scripted session"


@dataclass
class Reply(chat_completions.Reply):
    """One model call's answer: text (streamed in ``chunks`` pieces), then tool calls, and the
    faults a test wants in it."""

    drip: float = 0.0  # seconds between chunks
    status: int = 200  # != 200: answer with this HTTP error instead
    malformed: bool = False  # send a broken chunk mid-stream
    stall: bool = False  # after the first chunk, send nothing more until the client hangs up


@dataclass
class Recorded:
    body: dict[str, Any]
    is_title: bool
    received_at: float


class ScriptedLLM(chat_completions.ChatCompletionsServer):
    model_ids = ("scripted",)

    def __init__(self) -> None:
        self.script: deque[Reply] = deque()
        self.requests: list[Recorded] = []
        #: (time.time(), text) of every content chunk written, for latency measurements.
        self.emitted: list[tuple[float, str]] = []
        #: Replies streamed to their end (``wait_completed`` waits for a number of them).
        self.completed = 0
        #: Streams the client closed before their end (an abort, a deadline).
        self.closed = 0
        self._completion = threading.Condition()
        # Written once on stop: wakes every stream waiting in ``select``.
        self._stop_read, self._stop_write = os.pipe()
        self._lock = threading.Lock()
        super().__init__()

    def start(self) -> ScriptedLLM:
        super().start()
        return self

    def stop(self) -> None:
        os.write(self._stop_write, b"x")
        super().stop()
        os.close(self._stop_write)  # the read end stays open for streams still winding down

    def wait_closed(self, count: int, timeout: float) -> None:
        """Until the client has hung up on ``count`` streams before their end."""
        with self._completion:
            if not self._completion.wait_for(lambda: self.closed >= count, timeout):
                raise TimeoutError(f"{count} streams not closed by the client within {timeout} s "
                                   f"(closed: {self.closed})")

    def _count_closed(self) -> None:
        with self._completion:
            self.closed += 1
            self._completion.notify_all()

    def _count_completed(self) -> None:
        with self._completion:
            self.completed += 1
            self._completion.notify_all()

    def wait_completed(self, count: int, timeout: float) -> None:
        """Until ``count`` replies have been streamed to their end."""
        with self._completion:
            if not self._completion.wait_for(lambda: self.completed >= count, timeout):
                raise TimeoutError(f"{count} complete replies not within {timeout} s")

    def enqueue(self, *replies: Reply) -> None:
        with self._lock:
            self.script.extend(replies)

    def agent_requests(self) -> list[dict[str, Any]]:
        return [r.body for r in self.requests if not r.is_title]

    def answer(self, body: dict[str, Any]) -> Reply:
        is_title = not body.get("tools")
        with self._lock:
            self.requests.append(Recorded(body, is_title, time.time()))
            if is_title:
                return Reply(text=TITLE, chunks=1)
            return self.script.popleft() if self.script else Reply(text="OK.")

    def _handler_class(self) -> type[StreamHandler]:
        llm = self

        class Handler(StreamHandler):
            server_owner = llm

            def respond(self, body: dict[str, Any]) -> None:
                reply = llm.answer(body)
                if reply.status != 200:
                    self.send_json(
                        reply.status,
                        {"error": {"message": f"scripted failure {reply.status}", "type": "server_error"}},
                    )
                    return
                # The client may go away mid-stream (an abort): that is the point of such tests.
                try:
                    self.stream(reply, body.get("model", "scripted"))
                except (BrokenPipeError, ConnectionResetError):
                    llm._count_closed()

            def _hold(self, seconds: float | None) -> bool:
                """Send nothing for ``seconds`` (None: until the client hangs up or the server
                stops). True: the stream is over (the client closed it, or the server stops)."""
                waiting = [self.connection, llm._stop_read]
                while True:
                    ready, _, _ = select.select(waiting, [], [], seconds)
                    if llm._stop_read in ready:
                        return True
                    if not ready:
                        return False
                    try:
                        peeked = self.connection.recv(1, socket.MSG_PEEK)
                    except OSError:
                        peeked = b""
                    if not peeked:  # end of file: the client hung up
                        llm._count_closed()
                        return True
                    waiting = [llm._stop_read]  # unexpected bytes: only a stop ends the wait now

            def before_piece(self, index: int, reply: Reply) -> bool:
                return not (index and reply.drip and self._hold(reply.drip))

            def after_piece(self, index: int, piece: str, reply: Reply) -> None:
                llm.emitted.append((time.time(), piece))
                if reply.malformed and index == 0:
                    self.send_event('{"choices": [{"index": 0, "delta": {"content": ')

            def before_tools(self, reply: Reply) -> bool:
                if reply.stall:
                    self._hold(None)
                    return False
                return True

            def completed(self, reply: Reply) -> None:
                llm._count_completed()

        return Handler
