"""Hub mode: tabbi's session service as a JupyterHub service, apart from the users' servers.

Why a service: everything in a single-user server is within reach of its person's code (kernels
inherit its environment; the same OS user reads its ``/proc/<pid>/environ`` and its files), so the
team's secrets (model API key, GitHub client secret, encryption key) cannot live there. Here the
same server extension, with the same API, store and providers, runs in its own Jupyter server
process, started and routed by the hub at ``/services/tabbi/`` and run as its own OS user; the
users' servers run only the kernel side, which finds the service through ``TABBI_SERVICE_URL``,
else by asking the hub's public address (tabbi_kernel/discovery.py). Only identity and URLs
differ from personal mode:

- people are authenticated by the hub: OAuth cookies for browsers and hub API tokens for kernels
  (a single-user server's ``JUPYTERHUB_API_TOKEN``), both accepted only when they carry the
  service's access scope, ``access:services!service=tabbi`` (JupyterHub's own
  ``JupyterHubIdentityProvider``, which reads its settings from the environment the hub gives a
  managed service); sessions are filed under the hub user name;
- the service's Jupyter server serves tabbi and nothing else (``TabbiServiceAuthorizer``): every
  hub user can reach it, so its kernels, terminals and files, which run as the service's user
  next to the secrets, must be out of anyone's reach;
- links and the GitHub callback are built from the public URL (``TabbiExtension.public_url``,
  from ``JUPYTERHUB_PUBLIC_URL``), never from the Host of a request.

Run it as the hub's managed service: ``python -m tabbi_extension.hub`` (see hub/jupyterhub_config.py
and docs/deploy-jupyterhub.md); extra arguments are passed to the Jupyter server.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jupyter_server.auth import Authorizer

#: The environment variable the hub's config sets for users' servers: the service's base URL as
#: their kernels reach it. Its presence is what tells the kernel side it runs under hub mode.
SERVICE_URL_ENV = "TABBI_SERVICE_URL"
SERVICE_NAME = "tabbi"
#: Seconds the hub waits for the service to answer after starting it.
SERVICE_START_TIMEOUT = 120


class TabbiServiceAuthorizer(Authorizer):
    """Lets people use tabbi's routes and nothing else of the service's Jupyter server.

    Threat: any hub user with access to the service could otherwise start a kernel or a terminal
    in it (``POST /services/tabbi/api/kernels``) or read its files through the contents API, as
    the service's OS user, whose environment holds the team's secrets. (Pushed notebook cells
    are sent by the kernel: no route reads a notebook of the server's.) Starting a session asks
    for ``read contents`` to decide whether a person may name local repositories at all (their
    folders are ``local_repo_roots``: none by default in hub mode); that question alone is
    answered yes.
    """

    def is_authorized(self, handler: Any, user: Any, action: str, resource: str) -> bool:
        from .handlers import AUTH_RESOURCE, SessionsHandler  # here: handlers imports the app's modules

        if resource == AUTH_RESOURCE:
            return True
        return (action, resource) == ("read", "contents") and isinstance(handler, SessionsHandler)


def server_argv(environ: Mapping[str, str]) -> list[str]:
    """Jupyter server arguments for the service, from what the hub tells a managed service:
    ``JUPYTERHUB_SERVICE_URL`` (where to listen) and ``JUPYTERHUB_SERVICE_PREFIX`` (its base
    URL). Raises ``SystemExit`` when not started by a hub."""
    url, prefix = environ.get("JUPYTERHUB_SERVICE_URL"), environ.get("JUPYTERHUB_SERVICE_PREFIX")
    if not url or not prefix or not environ.get("JUPYTERHUB_API_TOKEN"):
        raise SystemExit(
            "tabbi hub service: JUPYTERHUB_SERVICE_URL, JUPYTERHUB_SERVICE_PREFIX and "
            "JUPYTERHUB_API_TOKEN are not set; run it as a JupyterHub managed service with a 'url' "
            "(see docs/deploy-jupyterhub.md)"
        )
    bind = urlsplit(url)
    return [
        f"--ServerApp.ip={bind.hostname or '127.0.0.1'}",
        f"--ServerApp.port={bind.port or (443 if bind.scheme == 'https' else 80)}",
        f"--ServerApp.base_url={prefix}",
        "--ServerApp.open_browser=False",
        # Requests arrive through the hub's proxy with the hub's public Host.
        "--ServerApp.allow_remote_access=True",
        "--ServerApp.terminals_enabled=False",
        "--ServerApp.identity_provider_class=jupyterhub.singleuser.extension.JupyterHubIdentityProvider",
        f"--ServerApp.authorizer_class={__name__}.TabbiServiceAuthorizer",
        "--ServerApp.jpserver_extensions=tabbi_extension=True",
        # Sessions are filed under the hub user names, never under one local owner.
        "--TabbiExtension.single_user=False",
        # A service's output goes to a log pipeline: JSON lines, unless TABBI_LOG_STYLE says.
        *([] if environ.get("TABBI_LOG_STYLE") else ["--TabbiExtension.log_style=json"]),
    ]


def configure_hub(c: Any, *, service_url: str | None, bind_url: str, command: list[str],
                  user: str | None = None, environment: Mapping[str, str] | None = None) -> None:
    """Hub mode in a ``jupyterhub_config.py``: tabbi as a managed service, the access scope for
    every user and their servers' tokens, and users' servers that only run the kernel side.

    ``service_url``: the service's base URL as users' kernels reach it (through the proxy);
    ``None``: kernels find it themselves at ``<the hub's public URL>/services/tabbi/`` (needs
    ``c.JupyterHub.public_url``, reachable from users' servers; tabbi_kernel/discovery.py);
    ``bind_url``: where the service listens; ``user``: the OS user it runs as (its own: the
    users' servers must not be able to read its environment or files); ``environment``: its
    configuration and the team's secrets, given to this process only.
    """
    import pwd

    from jupyterhub.services.service import Service

    service: dict[str, Any] = {"name": SERVICE_NAME, "url": bind_url, "command": command,
                               "environment": dict(environment or {}), "oauth_no_confirm": True,
                               "display": True}
    if user:
        service.update(user=user, cwd=pwd.getpwnam(user).pw_dir)
    if "timeout" in Service.class_trait_names():  # JupyterHub >= 6: its 30 s default is short for
        service["timeout"] = SERVICE_START_TIMEOUT  # a loaded machine, and the hub exits after it
    c.JupyterHub.services.append(service)
    scope = f"access:services!service={SERVICE_NAME}"
    # Every user may use the service; their servers' API tokens (which their kernels hold) carry
    # the scope too (a token gets the subset of these scopes its user holds).
    c.JupyterHub.load_roles.append({"name": "user", "scopes": ["self", scope]})
    c.Spawner.server_token_scopes = ["users:activity!user", "access:servers!server", scope]
    if service_url:
        c.Spawner.environment.update({SERVICE_URL_ENV: service_url})
    c.Spawner.args.append("--ServerApp.jpserver_extensions=tabbi_extension=False")


def main(argv: list[str] | None = None) -> None:
    """Start the service's Jupyter server (the hub's ``command`` for the service)."""
    from jupyter_server.serverapp import ServerApp
    from traitlets.config import Config

    class TabbiServiceApp(ServerApp):
        """A Jupyter server that loads tabbi alone: the extensions that Jupyter's config files
        enable (JupyterLab, ...) would only slow its start and widen what people can reach."""

        def find_server_extensions(self) -> None:
            return None

    config = Config()
    # As in JupyterHub's single-user servers: tornado's own XSRF check runs before the request
    # is authenticated, so it would refuse token-authenticated POSTs from kernels; Jupyter's
    # check, after authentication (JupyterHub's, patched in by its identity provider), still
    # guards cookie-authenticated requests.
    config.ServerApp.tornado_settings = {"xsrf_cookies": False}
    # The server's root is an empty folder: nothing of the service's own files (its data, its
    # runtime files) is under it, and local repositories are off unless the deployment names
    # their folders (local_repo_roots defaults to the root).
    root = Path.home() / ".tabbi-service-root"
    root.mkdir(mode=0o700, exist_ok=True)
    TabbiServiceApp.launch_instance(
        argv=[*server_argv(os.environ), f"--ServerApp.root_dir={root}",
              *(sys.argv[1:] if argv is None else argv)],
        config=config,
    )


if __name__ == "__main__":
    main()
