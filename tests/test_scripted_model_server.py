"""The HTTP server under the scripted model and the demo model (``extension/chat_completions.py``)."""

from __future__ import annotations

import select
import socket
import time

from tabbi_extension.chat_completions import ChatCompletionsServer


def test_sixty_agents_connecting_at_once_are_all_queued():
    """Fifty sessions' agents call the model at the same instant (bench/bench_fanout.py). With
    the default listen backlog of 5 the kernel dropped most of their connections. Here the server
    is not accepting yet, so every connection that completes was queued by the kernel."""
    server = ChatCompletionsServer()
    port = server._server.server_address[1]
    pending = []
    try:
        for _ in range(60):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            pending.append(sock)
        connected: set[socket.socket] = set()
        deadline = time.monotonic() + 10
        while len(connected) < len(pending) and time.monotonic() < deadline:
            _, writable, _ = select.select([], [s for s in pending if s not in connected], [],
                                           deadline - time.monotonic())
            connected.update(s for s in writable if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0)
        assert len(connected) == 60
    finally:
        for sock in pending:
            sock.close()
        server._server.server_close()
