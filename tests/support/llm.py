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

import json
import os
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TITLE = "Scripted session"


@dataclass
class Reply:
    """One model call's answer: text (streamed in ``chunks`` pieces), then tool calls."""

    text: str = ""
    tools: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    chunks: int = 3
    drip: float = 0.0  # seconds between chunks
    status: int = 200  # != 200: answer with this HTTP error instead
    malformed: bool = False  # send a broken chunk mid-stream
    stall: bool = False  # after the first chunk, send nothing more until the client hangs up


def write(path: str, content: str) -> tuple[str, dict[str, Any]]:
    return ("write", {"filePath": path, "content": content})


def read(path: str) -> tuple[str, dict[str, Any]]:
    return ("read", {"filePath": path})


def edit(path: str, old: str, new: str) -> tuple[str, dict[str, Any]]:
    return ("edit", {"filePath": path, "oldString": old, "newString": new})


def bash(command: str, description: str = "run a command") -> tuple[str, dict[str, Any]]:
    return ("bash", {"command": command, "description": description})


@dataclass
class Recorded:
    body: dict[str, Any]
    is_title: bool
    received_at: float


class ScriptedLLM:
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
        self._calls = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> ScriptedLLM:
        self._thread.start()
        return self

    def stop(self) -> None:
        os.write(self._stop_write, b"x")
        self._server.shutdown()
        self._server.server_close()
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

    def _next(self, body: dict[str, Any]) -> tuple[Reply, bool]:
        is_title = not body.get("tools")
        with self._lock:
            self.requests.append(Recorded(body, is_title, time.time()))
            if is_title:
                return Reply(text=TITLE, chunks=1), True
            self._calls += 1
            return (self.script.popleft() if self.script else Reply(text="OK.")), False

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        llm = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._json(200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.endswith("/chat/completions"):
                    self._json(404, {"error": {"message": "not found"}})
                    return
                reply, _ = llm._next(body)
                if reply.status != 200:
                    self._json(
                        reply.status,
                        {"error": {"message": f"scripted failure {reply.status}", "type": "server_error"}},
                    )
                    return
                # The client may go away mid-stream (an abort): that is the point of such tests.
                try:
                    self._stream(reply, body.get("model", "scripted"))
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

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _chunk(self, payload: str) -> None:
                data = f"data: {payload}\n\n".encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _delta(self, model: str, delta: dict[str, Any], finish: str | None = None) -> None:
                self._chunk(
                    json.dumps(
                        {
                            "id": "chatcmpl-scripted",
                            "object": "chat.completion.chunk",
                            "created": int(time.time()),
                            "model": model,
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                        }
                    )
                )

            def _stream(self, reply: Reply, model: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self._delta(model, {"role": "assistant", "content": ""})
                text, n = reply.text, max(1, reply.chunks)
                size = max(1, -(-len(text) // n)) if text else 0
                pieces = [text[i : i + size] for i in range(0, len(text), size)] if text else []
                for i, piece in enumerate(pieces):
                    if i and reply.drip and self._hold(reply.drip):
                        return
                    llm.emitted.append((time.time(), piece))
                    self._delta(model, {"content": piece})
                    if reply.malformed and i == 0:
                        self._chunk('{"choices": [{"index": 0, "delta": {"content": ')
                if reply.stall:
                    self._hold(None)
                    return
                for index, (name, args) in enumerate(reply.tools):
                    call = {
                        "index": index,
                        "id": f"call_{llm._calls}_{index}",
                        "type": "function",
                        "function": {"name": name, "arguments": json.dumps(args)},
                    }
                    self._delta(model, {"tool_calls": [call]})
                finish = "tool_calls" if reply.tools else "stop"
                self._delta(model, {}, finish)
                usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
                self._chunk(json.dumps({"id": "chatcmpl-scripted", "object": "chat.completion.chunk",
                                        "created": int(time.time()), "model": model,
                                        "choices": [], "usage": usage}))
                self._chunk("[DONE]")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                with llm._completion:
                    llm.completed += 1
                    llm._completion.notify_all()

        return Handler
