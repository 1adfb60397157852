"""A git remote the tests own: bare repositories served by ``git http-backend`` (smart HTTP) on
127.0.0.1, with token auth like GitHub's (``x-access-token:<token>`` as Basic credentials).

``anonymous_read=True`` lets clones through without a token (a public repository); pushes always
need the token.
"""

from __future__ import annotations

import base64
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class GitHTTPRemote:
    def __init__(self, root: Path, token: str, anonymous_read: bool = False):
        self.root = root
        self.token = token
        self.anonymous_read = anonymous_read
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, authorized)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}.git"

    def start(self) -> GitHTTPRemote:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_bare(self, name: str, source: Path) -> Path:
        """Publish ``source`` (a working repository) as ``<name>.git``."""
        bare = self.root / f"{name}.git"
        subprocess.run(["git", "clone", "--quiet", "--bare", str(source), str(bare)], check=True)
        subprocess.run(["git", "config", "http.receivepack", "true"], cwd=bare, check=True)
        return bare

    def _authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return password == self.token and user in ("x-access-token", "oauth2", self.token)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        remote = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                authorized = remote._authorized(self.headers.get("Authorization"))
                writing = "git-receive-pack" in parts.path or "service=git-receive-pack" in parts.query
                remote.requests.append((self.command, self.path, authorized))
                if not authorized and (writing or not remote.anonymous_read):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="tabbi-test"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                run_http_backend(self, remote.root, parts.path, parts.query,
                                 "x-access-token" if authorized else "")

        return Handler


class QuietHandler(BaseHTTPRequestHandler):
    """A stand-in's request handler: HTTP/1.0 (one request per connection), no access log."""

    protocol_version = "HTTP/1.0"

    def log_message(self, *args: Any) -> None:
        pass


def read_request_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The request body, by Content-Length or chunked (git sends big pushes chunked)."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def run_http_backend(handler: BaseHTTPRequestHandler, project_root: Path, path: str, query: str,
                     authorized_user: str) -> None:
    """Answer ``handler``'s request through ``git http-backend`` (CGI) over ``project_root``.

    The one bridge both loopback remotes use, so clone/push behave as with a real smart-HTTP host;
    ``authorized_user`` becomes REMOTE_USER (empty when anonymous). Hooks in the bare repositories
    (e.g. a pre-receive hook) run as they would on the server.
    """
    body = read_request_body(handler)
    env = {
        "GIT_PROJECT_ROOT": str(project_root),
        "GIT_HTTP_EXPORT_ALL": "1",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "REQUEST_METHOD": handler.command,
        "CONTENT_TYPE": handler.headers.get("Content-Type", ""),
        "CONTENT_LENGTH": str(len(body)),
        "REMOTE_USER": authorized_user,
        "REMOTE_ADDR": "127.0.0.1",
        "PATH": "/usr/bin:/bin",
    }
    if handler.headers.get("Content-Encoding"):
        env["HTTP_CONTENT_ENCODING"] = handler.headers["Content-Encoding"]
    if handler.headers.get("Git-Protocol"):
        env["GIT_PROTOCOL"] = handler.headers["Git-Protocol"]
    done = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, timeout=60)
    head, _, payload = done.stdout.partition(b"\r\n\r\n")
    status = 200
    headers = []
    for line in head.decode(errors="replace").split("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "status":
            status = int(value.strip().split()[0])
        elif name:
            headers.append((name, value.strip()))
    handler.send_response(status)
    for name, value in headers:
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)
