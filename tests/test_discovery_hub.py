"""How a kernel under JupyterHub finds tabbi without ``TABBI_SERVICE_URL``: its own server first
(personal mode inside a hub), else the hub's tabbi service, probed where JupyterHub's environment
says the hub is. Real HTTP servers on 127.0.0.1 stand in for the single-user server and the hub's
proxy (tests/test_hub_browser.py checks the same on a real hub).

Threat: the kernel's token (the person's server token) sent somewhere other than the hub's own
address, e.g. followed through a redirect."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tabbi_kernel.discovery import ServerNotFound, find_server, hub_service_urls


@contextmanager
def answering(routes: dict[str, int]) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """An HTTP server answering each path in ``routes`` with its status (else 404); yields its
    origin and the (path, Authorization) of every request it got."""
    seen: list[tuple[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("Authorization", "")))
            status = routes.get(self.path, 404)
            self.send_response(status)
            if status in (301, 302):
                self.send_header("Location", "http://127.0.0.1:9/elsewhere")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()


def hub_env(origin: str, token: str, **extra: str) -> dict[str, str]:
    return {"JUPYTERHUB_SERVICE_URL": f"{origin}/user/alice/", "JUPYTERHUB_API_TOKEN": token,
            "JUPYTERHUB_BASE_URL": "/", "JUPYTER_RUNTIME_DIR": "/nonexistent", **extra}


def test_a_server_without_tabbi_leads_to_the_hubs_service():
    with answering({"/services/tabbi/tabbi/api/health": 200}) as (origin, seen):
        info = find_server(hub_env(origin, "tok-a", JUPYTERHUB_PUBLIC_HUB_URL=f"{origin}/hub/"))
    assert (info.url, info.token, info.route) == (
        f"{origin}/services/tabbi/", "tok-a", "JupyterHub service (probed)")
    assert seen == [("/user/alice/tabbi/api/health", "token tok-a"),
                    ("/services/tabbi/tabbi/api/health", "token tok-a")]


def test_a_server_running_tabbi_is_used_as_before_and_asked_once():
    with answering({"/user/alice/tabbi/api/health": 200}) as (origin, seen):
        env = hub_env(origin, "tok-b", JUPYTERHUB_PUBLIC_HUB_URL=f"{origin}/hub/")
        assert find_server(env).route == "JupyterHub"
        assert find_server(env).url == f"{origin}/user/alice/"
    assert seen == [("/user/alice/tabbi/api/health", "token tok-b")]  # remembered: one probe


def test_no_service_on_the_hub_says_where_it_looked_and_what_to_do():
    with answering({}) as (origin, _), pytest.raises(ServerNotFound) as err:
        find_server(hub_env(origin, "tok-c", JUPYTERHUB_PUBLIC_HUB_URL=f"{origin}/hub/"))
    message = str(err.value)
    assert f"this server ({origin}/user/alice/) runs no tabbi (404)" in message
    assert f"{origin}/services/tabbi/: 404" in message and "hub's administrator" in message
    # ... and without a public hub address, that it is unknown and how to set it.
    with answering({}) as (origin, _), pytest.raises(ServerNotFound, match=r"c\.JupyterHub\.public_url"):
        find_server(hub_env(origin, "tok-d"))


def test_the_token_does_not_follow_a_redirect():
    """The service's address answering with a redirect (say, to a login page elsewhere): the
    probe stops there; the token went to the hub's address alone."""
    with answering({"/services/tabbi/tabbi/api/health": 302}) as (origin, seen), \
            pytest.raises(ServerNotFound, match="302"):
        find_server(hub_env(origin, "tok-e", JUPYTERHUB_PUBLIC_HUB_URL=f"{origin}/hub/"))
    assert [path for path, _ in seen] == ["/user/alice/tabbi/api/health", "/services/tabbi/tabbi/api/health"]


def test_service_urls_follow_the_hubs_base_url_and_public_address():
    env = {"JUPYTERHUB_BASE_URL": "/jhub/", "JUPYTERHUB_PUBLIC_HUB_URL": "https://hub.example.org/jhub/hub/"}
    assert hub_service_urls(env) == ["https://hub.example.org/jhub/services/tabbi/"]
    assert hub_service_urls({"JUPYTERHUB_HOST": "https://hub.example.org"}) == [
        "https://hub.example.org/services/tabbi/"]
    assert hub_service_urls({"JUPYTERHUB_PUBLIC_HUB_URL": "javascript:alert(1)"}) == []


def test_a_hub_configured_without_a_service_url_leaves_kernels_to_probe():
    from traitlets.config import Config

    from tabbi_extension.hub import SERVICE_URL_ENV, configure_hub

    c = Config()
    c.Spawner.environment = {}
    configure_hub(c, service_url=None, bind_url="http://127.0.0.1:8765", command=["python"])
    assert SERVICE_URL_ENV not in c.Spawner.environment
    [service] = c.JupyterHub.services.get_value([])
    assert service["url"] == "http://127.0.0.1:8765" and service["timeout"] >= 60
