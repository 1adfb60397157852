"""tabbi's OpenCode client (``extension/opencode.py``): what it costs the server to make one."""

from __future__ import annotations

import ssl

import pytest

from tabbi_extension import opencode
from tabbi_sandbox.provider import Endpoint


def test_clients_share_one_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client is made on the server's event loop for every sandbox connection (start, resume,
    reconnect); building a TLS context there reads the whole CA bundle (35-260 ms of CPU), which
    stalled every other session's stream. One context must serve every client."""
    built = []
    real = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: built.append(1) or real(*a, **k))
    clients = [opencode.OpenCodeClient(Endpoint(f"http://127.0.0.1:{port}", "pw")) for port in (1, 2, 3)]
    assert len(clients) == 3 and len(built) <= 1  # none if an earlier client built it
