"""Hub mode's parts without a hub: how kernels find the service, the service's arguments and
authorizer, the hub config it sets, and the public URL in GitHub's callback (personal mode's
server here; tests/test_hub.py checks the same from a kernel on a real hub)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from traitlets.config import Config

from tabbi_extension import handlers
from tabbi_extension.github import handlers as github_handlers
from tabbi_extension.hub import TabbiServiceAuthorizer, configure_hub, server_argv
from tabbi_kernel.discovery import ServerNotFound, find_server
from tests.test_github import github, tabbi_config  # noqa: F401  (fixtures used here)

HUB_ENV = {"JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:9999/user/alice/", "JUPYTERHUB_API_TOKEN": "t0k"}


def test_a_kernel_under_hub_mode_finds_the_service_with_its_servers_token():
    info = find_server({**HUB_ENV, "TABBI_SERVICE_URL": "http://proxy/services/tabbi/"})
    assert (info.url, info.token, info.route) == ("http://proxy/services/tabbi/", "t0k", "JupyterHub service")
    # Without the marker, a kernel under a hub talks to its own server (personal mode).
    assert find_server(HUB_ENV).route == "JupyterHub"


def test_hub_mode_without_a_token_says_so():
    env = {"TABBI_SERVICE_URL": "http://proxy/services/tabbi/", "JUPYTER_RUNTIME_DIR": "/nonexistent"}
    with pytest.raises(ServerNotFound, match=r"\(TABBI_SERVICE_URL\): JUPYTERHUB_API_TOKEN is not set"):
        find_server(env)


def test_the_service_listens_where_the_hub_says_and_serves_tabbi_alone():
    argv = server_argv({"JUPYTERHUB_SERVICE_URL": "http://10.0.0.5:8765", "JUPYTERHUB_API_TOKEN": "x",
                        "JUPYTERHUB_SERVICE_PREFIX": "/services/tabbi/"})
    assert {"--ServerApp.ip=10.0.0.5", "--ServerApp.port=8765", "--ServerApp.base_url=/services/tabbi/",
            "--ServerApp.terminals_enabled=False", "--TabbiExtension.single_user=False",
            "--ServerApp.authorizer_class=tabbi_extension.hub.TabbiServiceAuthorizer"} <= set(argv)
    with pytest.raises(SystemExit, match="managed service"):
        server_argv({})


def test_the_service_authorizer_lets_in_tabbi_and_nothing_else():
    """Threat: a hub user starting a kernel or reading files in the service's own Jupyter server,
    next to the team's secrets; or naming one of its notebooks to push as cells."""
    allow = TabbiServiceAuthorizer().is_authorized
    sessions = handlers.SessionsHandler.__new__(handlers.SessionsHandler)
    push = handlers.PushHandler.__new__(handlers.PushHandler)
    assert allow(push, None, "write", "tabbi") and allow(sessions, None, "read", "tabbi")
    assert allow(sessions, None, "read", "contents")  # may name local repositories (roots apply)
    assert not allow(push, None, "read", "contents")
    for action, resource in [("execute", "kernels"), ("write", "kernels"), ("read", "contents"),
                             ("write", "contents"), ("execute", "terminals"), ("read", "sessions")]:
        assert not allow(object(), None, action, resource), (action, resource)


def test_configure_hub_grants_the_scope_and_keeps_the_session_service_out_of_users_servers():
    c = Config()
    c.Spawner.environment = {"KEEP": "1"}
    configure_hub(c, service_url="http://proxy/services/tabbi/", bind_url="http://127.0.0.1:8765",
                  command=["python", "-m", "tabbi_extension.hub"], environment={"TABBI_LLM_API_KEY": "k"})
    [service] = c.JupyterHub.services.get_value([])
    assert service["name"] == "tabbi" and service["environment"] == {"TABBI_LLM_API_KEY": "k"}
    [role] = c.JupyterHub.load_roles.get_value([])
    assert role == {"name": "user", "scopes": ["self", "access:services!service=tabbi"]}
    assert "access:services!service=tabbi" in c.Spawner.server_token_scopes
    assert c.Spawner.environment == {"KEEP": "1", "TABBI_SERVICE_URL": "http://proxy/services/tabbi/"}
    assert "--ServerApp.jpserver_extensions=tabbi_extension=False" in c.Spawner.args.get_value([])
    assert "TABBI_LLM_API_KEY" not in str(c.Spawner)  # the users' servers get no secret


@pytest.mark.tabbi(public_url="https://hub.example.test/user/alice/")
async def test_github_callback_is_built_from_the_public_url(api):
    """The server is reached here on 127.0.0.1 (as a kernel reaches it); GitHub must be told the
    public address instead."""
    attempt = await api.ok("POST", "tabbi/api/github/login", {"flow": "web"}, expect=201)
    redirect = parse_qs(urlsplit(attempt["url"]).query)["redirect_uri"][0]
    assert redirect == "https://hub.example.test/user/alice/" + github_handlers.CALLBACK_PATH
