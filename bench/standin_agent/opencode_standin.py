#!/usr/bin/python3
"""A light stand-in for ``opencode serve``, for the fan-out benchmark at 50 sessions, where 50
real OpenCode processes (300-700 MB each) do not fit a 2-core, 23 GB machine.

What it stands in for: OpenCode's server API and event stream as far as tabbi's session core
uses them for a text-only turn, and nothing more. tabbi starts it exactly as it starts OpenCode
(``TabbiExtension.opencode_bin`` points at this file; the sandbox bootstrap runs
``<bin> serve --hostname H --port P`` under bubblewrap with ``OPENCODE_SERVER_PASSWORD`` and
``OPENCODE_CONFIG_CONTENT``), and tabbi's own OpenCode client and normalizer talk to it.
On a prompt it makes one streaming ``chat/completions`` call to the configured provider (through
tabbi's model gateway, with the gateway token as its key) and turns every content chunk into one
``message.part.delta`` event, the way OpenCode does, framed by the same ``message.updated``,
``message.part.updated``, ``session.status`` and ``session.idle`` events (shapes as in
``shared/reference/opencode-events.json``).

What it does not do: tools, permissions, title requests, diffs, files, agents, plugins,
persistence, retries. A model reply with tool calls, or any endpoint not listed in ``ROUTES``,
is refused (HTTP 501 / a ``session.error``) and logged to stderr, so a benchmark that needed
more than this would fail rather than measure something else. Its own cost per event is far
below OpenCode's (no database, no bus), which the benchmark says next to its numbers.

Standard library only: it runs inside the sandbox with the system's ``/usr/bin/python3``.
"""

from __future__ import annotations

import base64
import hmac
import http.client
import itertools
import json
import os
import queue
import re
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

VERSION = "standin-1"
HEARTBEAT = 10.0

_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    return f"{prefix}_{time.time_ns():x}{next(_ids):06d}"


def now_ms() -> int:
    return int(time.time() * 1000)


def log(message: str) -> None:
    print(f"opencode-standin: {message}", file=sys.stderr, flush=True)


class Agent:
    """Sessions, their messages, and the subscribers of the event stream."""

    def __init__(self, config: dict[str, Any], directory: str):
        self.directory = directory
        provider_id, _, self.model_id = str(config.get("model", "")).partition("/")
        options = ((config.get("provider") or {}).get(provider_id) or {}).get("options") or {}
        self.provider_id = provider_id
        self.base_url = str(options.get("baseURL", "")).rstrip("/")
        self.api_key = str(options.get("apiKey", ""))
        self.sessions: dict[str, dict[str, Any]] = {}
        self.messages: dict[str, list[dict[str, Any]]] = {}
        self.busy: set[str] = set()
        self.aborted: set[str] = set()
        self.subscribers: set[queue.Queue[bytes]] = set()
        self.lock = threading.Lock()

    def publish(self, kind: str, properties: dict[str, Any]) -> None:
        data = json.dumps({"id": new_id("evt"), "type": kind, "properties": properties})
        frame = f"data: {data}\n\n".encode()
        with self.lock:
            for subscriber in self.subscribers:
                subscriber.put(frame)

    def create_session(self) -> dict[str, Any]:
        sid = new_id("ses")
        info = {"id": sid, "slug": "standin", "version": VERSION, "directory": self.directory,
                "title": "New session", "time": {"created": now_ms(), "updated": now_ms()}}
        with self.lock:
            self.sessions[sid] = info
            self.messages[sid] = []
        self.publish("session.created", {"sessionID": sid, "info": info})
        return info

    def run_turn(self, sid: str, text: str) -> None:
        """One turn: the user's message, one model call streamed as deltas, the idle."""
        user = {"id": new_id("msg"), "sessionID": sid, "role": "user", "time": {"created": now_ms()}}
        prompt_part = {"id": new_id("prt"), "sessionID": sid, "messageID": user["id"], "type": "text",
                       "text": text}
        self.messages[sid].append({"info": user, "parts": [prompt_part]})
        self.publish("message.updated", {"sessionID": sid, "info": user})
        self.publish("message.part.updated", {"sessionID": sid, "part": prompt_part})
        self.publish("session.status", {"sessionID": sid, "status": {"type": "busy"}})
        assistant = {"id": new_id("msg"), "sessionID": sid, "role": "assistant", "parentID": user["id"],
                     "modelID": self.model_id, "providerID": self.provider_id,
                     "path": {"cwd": self.directory, "root": self.directory},
                     "time": {"created": now_ms()}}
        part = {"id": new_id("prt"), "sessionID": sid, "messageID": assistant["id"], "type": "text",
                "text": ""}
        self.messages[sid].append({"info": assistant, "parts": [part]})
        self.publish("message.updated", {"sessionID": sid, "info": assistant})
        try:
            for delta in self.model_stream(text):
                if sid in self.aborted:
                    raise Aborted
                part["text"] += delta
                self.publish("message.part.delta", {"sessionID": sid, "messageID": assistant["id"],
                                                    "partID": part["id"], "field": "text", "delta": delta})
            self.publish("message.part.updated", {"sessionID": sid, "part": part})
        except Aborted:
            self.publish("session.error", {"sessionID": sid, "error": {
                "name": "MessageAbortedError", "data": {"message": "The operation was aborted."}}})
        except (OSError, ValueError, ModelError) as exc:
            log(f"model call failed: {exc}")
            error = {"name": "APIError", "data": {"message": str(exc)}}
            assistant["error"] = error
            self.publish("session.error", {"sessionID": sid, "error": error})
        assistant["time"]["completed"] = now_ms()
        self.publish("message.updated", {"sessionID": sid, "info": assistant})
        with self.lock:
            self.busy.discard(sid)
            self.aborted.discard(sid)
        self.publish("session.status", {"sessionID": sid, "status": {"type": "idle"}})
        self.publish("session.idle", {"sessionID": sid})

    def model_stream(self, text: str):
        """The content deltas of one streaming chat-completions call."""
        url = urllib.parse.urlsplit(self.base_url + "/chat/completions")
        body = json.dumps({
            "model": self.model_id, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": text}],
            # One tool declared, as OpenCode declares its tools: the scripted model tells agent
            # calls (with tools) from title calls (without) this way.
            "tools": [{"type": "function", "function": {
                "name": "read", "description": "unused", "parameters": {"type": "object"}}}],
        })
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        try:
            connection.request("POST", url.path, body, {
                "Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
            response = connection.getresponse()
            if response.status != 200:
                raise ModelError(f"the model answered HTTP {response.status}: {response.read()[:200]!r}")
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("tool_calls"):
                        raise ModelError("tool calls are not implemented by the stand-in agent")
                    if delta.get("content"):
                        yield delta["content"]
        finally:
            connection.close()


class Aborted(Exception):
    pass


class ModelError(Exception):
    pass


ROUTES = [
    ("GET", re.compile(r"/global/health"), "health"),
    ("GET", re.compile(r"/event"), "events"),
    ("GET", re.compile(r"/session/status"), "statuses"),
    ("POST", re.compile(r"/session"), "create"),
    ("GET", re.compile(r"/session/(?P<sid>ses_\w+)"), "get_session"),
    ("GET", re.compile(r"/session/(?P<sid>ses_\w+)/message"), "messages"),
    ("POST", re.compile(r"/session/(?P<sid>ses_\w+)/prompt_async"), "prompt"),
    ("POST", re.compile(r"/session/(?P<sid>ses_\w+)/abort"), "abort"),
]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    agent: Agent
    password: str

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.route("GET")

    def do_POST(self) -> None:
        self.route("POST")

    def route(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        expected = "Basic " + base64.b64encode(f"opencode:{self.password}".encode()).decode()
        if not hmac.compare_digest(self.headers.get("Authorization", "").encode(), expected.encode()):
            self.send_json(401, {"error": "unauthorized"})
            return
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        for verb, pattern, name in ROUTES:
            match = pattern.fullmatch(path)
            if verb == method and match:
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    self.send_json(400, {"error": "the body is not JSON"})
                    return
                getattr(self, "on_" + name)(body, **match.groupdict())
                return
        log(f"not implemented: {method} {path}")
        self.send_json(501, {"error": f"the stand-in agent does not implement {method} {path}"})

    def send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def known(self, sid: str) -> bool:
        if sid in self.agent.sessions:
            return True
        self.send_json(404, {"error": f"no session {sid}"})
        return False

    def on_health(self, body: dict) -> None:
        self.send_json(200, {"healthy": True, "version": VERSION})

    def on_statuses(self, body: dict) -> None:
        with self.agent.lock:
            self.send_json(200, {sid: {"type": "busy"} for sid in self.agent.busy})

    def on_create(self, body: dict) -> None:
        self.send_json(200, self.agent.create_session())

    def on_get_session(self, body: dict, sid: str) -> None:
        if self.known(sid):
            self.send_json(200, self.agent.sessions[sid])

    def on_messages(self, body: dict, sid: str) -> None:
        if self.known(sid):
            self.send_json(200, self.agent.messages[sid])

    def on_prompt(self, body: dict, sid: str) -> None:
        if not self.known(sid):
            return
        parts = body.get("parts") or []
        text = "".join(p.get("text", "") for p in parts if p.get("type") == "text")
        with self.agent.lock:
            if sid in self.agent.busy:
                self.send_json(409, {"error": "the session is busy"})
                return
            self.agent.busy.add(sid)
        threading.Thread(target=self.agent.run_turn, args=(sid, text), daemon=True).start()
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def on_abort(self, body: dict, sid: str) -> None:
        if self.known(sid):
            with self.agent.lock:
                if sid in self.agent.busy:
                    self.agent.aborted.add(sid)
            self.send_json(200, True)

    def on_events(self, body: dict) -> None:
        """The SSE feed, one chunk per event, a heartbeat every 10 s, until the client leaves."""
        frames: queue.Queue[bytes] = queue.Queue()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with self.agent.lock:
            self.agent.subscribers.add(frames)
        try:
            self.write_chunk(b'data: {"type": "server.connected", "properties": {}}\n\n')
            while True:
                try:
                    frame = frames.get(timeout=HEARTBEAT)
                except queue.Empty:
                    frame = b'data: {"type": "server.heartbeat", "properties": {}}\n\n'
                self.write_chunk(frame)
        except OSError:
            pass
        finally:
            with self.agent.lock:
                self.agent.subscribers.discard(frames)
            self.close_connection = True

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] != "serve":
        log(f"only `serve --hostname H --port P` is implemented, not {argv}")
        return 2
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    host, port = options.get("--hostname", "127.0.0.1"), int(options.get("--port", "4096"))
    config = json.loads(os.environ.get("OPENCODE_CONFIG_CONTENT") or "{}")
    Handler.agent = Agent(config, os.getcwd())
    Handler.password = os.environ.get("OPENCODE_SERVER_PASSWORD", "")
    if not Handler.password:
        log("OPENCODE_SERVER_PASSWORD is not set; refusing to serve without a password")
        return 2
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
