"""OpenCode's port: the bootstrap picks a free one, lets it go, and OpenCode binds it a moment
later. On a busy machine another process can take it in between (sandboxes share the machine's
network), and OpenCode then exits at once ("OpenCode exited during start-up with status 1", seen
under load in the suite). The bootstrap tries another port instead of failing the start."""

from __future__ import annotations

import secrets
import socket

import pytest

from tabbi_sandbox import bootstrap
from tabbi_sandbox.binary import find_opencode


def _spec(tmp_path) -> tuple[dict, dict]:
    home, workspace = tmp_path / "home", tmp_path / "workspace"
    home.mkdir()
    workspace.mkdir()
    spec = {"opencode": {"bin": find_opencode(), "password": secrets.token_urlsafe(16), "config": {}},
            "workspace": str(workspace), "home": str(home), "health_timeout": 120}
    return spec, bootstrap.prepare_home(str(home))


def test_a_port_taken_before_opencode_binds_it_is_replaced(tmp_path, monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    offered = [taken.getsockname()[1]]  # what a racing process took: the first port offered
    real_free_port = bootstrap.free_port
    monkeypatch.setattr(bootstrap, "free_port", lambda: offered.pop() if offered else real_free_port())
    spec, env = _spec(tmp_path)
    proc = None
    try:
        proc, port, version = bootstrap.start_opencode(spec, env)
        assert port != taken.getsockname()[1] and version
        assert b"ServeError" in (tmp_path / "home" / "opencode.log").read_bytes()  # it did hit the race
    finally:
        taken.close()
        if proc is not None:
            proc.kill()
            proc.wait()


def test_a_port_the_caller_chose_is_not_swapped(tmp_path):
    """A provider that names the port (a tunnel points at it) gets that port or an error."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    spec, env = _spec(tmp_path)
    spec["port"] = taken.getsockname()[1]
    try:
        with pytest.raises(bootstrap.BootstrapError, match="exited during start-up"):
            bootstrap.start_opencode(spec, env)
    finally:
        taken.close()
