"""A small OpenAI-compatible chat-completions server on 127.0.0.1 for the models tabbi runs itself:
the demo model (``demo_model.py``) and the tests' scripted stand-in (``tests/support/llm.py``).

It speaks the protocol OpenCode's ``@ai-sdk/openai-compatible`` provider uses: ``GET /v1/models``,
``POST /v1/chat/completions`` with ``stream: true``, answered as server-sent events
(``chat.completion.chunk`` deltas: text, then tool calls, a finish reason, a usage chunk,
``[DONE]``). A subclass decides what to answer (``answer``); the stream has hooks where the test
stand-in injects its faults (slow drips, stalls, broken chunks). Plain threads and blocking
sockets: it never runs on the Jupyter server's event loop.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ToolCall = tuple[str, dict[str, Any]]


@dataclass
class Reply:
    """One model call's answer: text (streamed in ``chunks`` pieces), then tool calls."""

    text: str = ""
    tools: list[ToolCall] = field(default_factory=list)
    chunks: int = 3


def write(path: str, content: str) -> ToolCall:
    return ("write", {"filePath": path, "content": content})


def read(path: str) -> ToolCall:
    return ("read", {"filePath": path})


def edit(path: str, old: str, new: str) -> ToolCall:
    return ("edit", {"filePath": path, "oldString": old, "newString": new})


def bash(command: str, description: str = "run a command") -> ToolCall:
    return ("bash", {"command": command, "description": description})


def glob(pattern: str) -> ToolCall:
    return ("glob", {"pattern": pattern})


def pieces(text: str, chunks: int) -> list[str]:
    """``text`` cut into at most ``chunks`` pieces of (nearly) equal size."""
    if not text:
        return []
    size = max(1, -(-len(text) // max(1, chunks)))
    return [text[i : i + size] for i in range(0, len(text), size)]


def completion_chunk(model: str, delta: dict[str, Any] | None, finish: str | None = None,
                     usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``: a delta (with its finish reason), or the final usage."""
    chunk: dict[str, Any] = {"id": "chatcmpl-tabbi", "object": "chat.completion.chunk",
                             "created": int(time.time()), "model": model}
    if usage is not None:
        chunk.update(choices=[], usage=usage)
    else:
        chunk["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    return chunk


class _ListeningServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` with room for many connections at once: its default listen backlog
    of 5 made the kernel drop the connections of 50 agents calling at the same instant."""

    request_queue_size = 128
    daemon_threads = True


class ChatCompletionsServer:
    """A threaded HTTP server on a free loopback port. ``key``: the API key callers must send as
    ``Authorization: Bearer`` (401 otherwise, as a real model API answers)."""

    #: The model ids ``GET /v1/models`` lists.
    model_ids: tuple[str, ...] = ("model",)

    def __init__(self, key: str | None = None) -> None:
        self.key = key
        self.calls = 0
        self._calls_lock = threading.Lock()
        self._server = _ListeningServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name=f"{type(self).__name__}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> ChatCompletionsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, body: dict[str, Any]) -> Reply:
        """The reply to one ``chat/completions`` request."""
        raise NotImplementedError

    def next_call(self) -> int:
        """A number for this call, so that tool call ids never repeat."""
        with self._calls_lock:
            self.calls += 1
            return self.calls

    def _handler_class(self) -> type[StreamHandler]:
        owner = self

        class Handler(StreamHandler):
            server_owner = owner

        return Handler


class StreamHandler(BaseHTTPRequestHandler):
    """The HTTP side; the ``before_*``/``after_*`` hooks let a subclass bend the stream."""

    protocol_version = "HTTP/1.1"
    server_owner: ChatCompletionsServer

    def log_message(self, *args: Any) -> None:
        pass

    def _authorized(self) -> bool:
        key = self.server_owner.key
        if key is None:
            return True
        presented = self.headers.get("Authorization", "")
        if hmac.compare_digest(presented.encode(), f"Bearer {key}".encode()):
            return True
        self.send_json(401, {"error": {"message": "invalid API key", "type": "invalid_request_error"}})
        return False

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path.rstrip("/").endswith("/models"):
            models = [{"id": m, "object": "model"} for m in self.server_owner.model_ids]
            self.send_json(200, {"object": "list", "data": models})
        else:
            self.send_json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if not self._authorized():
            return
        if not self.path.endswith("/chat/completions"):
            self.send_json(404, {"error": {"message": "not found"}})
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            error = {"message": "the body is not JSON", "type": "invalid_request_error"}
            self.send_json(400, {"error": error})
            return
        self.respond(body)

    def respond(self, body: dict[str, Any]) -> None:
        """Answer one request (the stand-in overrides this to fail on purpose)."""
        reply = self.server_owner.answer(body)
        self.stream(reply, str(body.get("model") or "model"))

    def send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_event(self, payload: str | dict[str, Any]) -> None:
        """One server-sent event, as one chunk of the chunked response."""
        text = payload if isinstance(payload, str) else json.dumps(payload)
        data = f"data: {text}\n\n".encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    # Hooks: return False from a ``before_*`` to end the stream there (the client hung up).
    def before_piece(self, index: int, reply: Reply) -> bool:
        return True

    def after_piece(self, index: int, piece: str, reply: Reply) -> None:
        pass

    def before_tools(self, reply: Reply) -> bool:
        return True

    def completed(self, reply: Reply) -> None:
        pass

    def stream(self, reply: Reply, model: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.send_event(completion_chunk(model, {"role": "assistant", "content": ""}))
        for index, piece in enumerate(pieces(reply.text, reply.chunks)):
            if not self.before_piece(index, reply):
                return
            self.send_event(completion_chunk(model, {"content": piece}))
            self.after_piece(index, piece, reply)
        if not self.before_tools(reply):
            return
        call = self.server_owner.next_call()
        for index, (name, args) in enumerate(reply.tools):
            tool_call = {"index": index, "id": f"call_{call}_{index}", "type": "function",
                         "function": {"name": name, "arguments": json.dumps(args)}}
            self.send_event(completion_chunk(model, {"tool_calls": [tool_call]}))
        self.send_event(completion_chunk(model, {}, "tool_calls" if reply.tools else "stop"))
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        self.send_event(completion_chunk(model, None, usage=usage))
        self.send_event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        self.completed(reply)
