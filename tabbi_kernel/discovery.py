"""How a kernel finds the Jupyter server (and so tabbi) it belongs to, without any set-up.

Routes, in order:
1. ``TABBI_SERVER_URL`` + ``TABBI_SERVER_TOKEN``: an explicit override (a kernel started elsewhere).
2. JupyterHub in hub mode: ``TABBI_SERVICE_URL`` (set for users' servers by the hub's config: the
   tabbi service's base URL, e.g. ``http://proxy/services/tabbi/``) + ``JUPYTERHUB_API_TOKEN`` (the
   person's own server token, which the hub grants ``access:services!service=tabbi``).
3. JupyterHub in personal mode: ``JUPYTERHUB_SERVICE_URL`` + ``JUPYTERHUB_API_TOKEN`` (tabbi inside
   the single-user server).
4. The server's runtime file ``jpserver-<pid>.json`` whose pid is the kernel's ``JPY_PARENT_PID``
   (stale files of dead servers exist; matching on the pid filters them out).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field


class ServerNotFound(RuntimeError):
    """No route to the server worked; the message lists each route tried and what to do."""


@dataclass(frozen=True)
class ServerInfo:
    url: str
    token: str = field(repr=False)
    route: str


def _runtime_dir(environ: Mapping[str, str]) -> str:
    if environ.get("JUPYTER_RUNTIME_DIR"):
        return environ["JUPYTER_RUNTIME_DIR"]
    from jupyter_core.paths import jupyter_runtime_dir  # light, and already loaded by ipykernel

    return jupyter_runtime_dir()


def find_server(environ: Mapping[str, str] | None = None) -> ServerInfo:
    env = os.environ if environ is None else environ
    tried: list[str] = []

    if env.get("TABBI_SERVER_URL"):
        return ServerInfo(env["TABBI_SERVER_URL"], env.get("TABBI_SERVER_TOKEN", ""), "TABBI_SERVER_URL")
    tried.append("TABBI_SERVER_URL + TABBI_SERVER_TOKEN: not set")

    if env.get("TABBI_SERVICE_URL"):
        if env.get("JUPYTERHUB_API_TOKEN"):
            return ServerInfo(env["TABBI_SERVICE_URL"], env["JUPYTERHUB_API_TOKEN"], "JupyterHub service")
        tried.append("JupyterHub service (TABBI_SERVICE_URL): JUPYTERHUB_API_TOKEN is not set")
    else:
        tried.append("JupyterHub service (TABBI_SERVICE_URL + JUPYTERHUB_API_TOKEN): not set")

    if env.get("JUPYTERHUB_SERVICE_URL") and env.get("JUPYTERHUB_API_TOKEN"):
        return ServerInfo(env["JUPYTERHUB_SERVICE_URL"], env["JUPYTERHUB_API_TOKEN"], "JupyterHub")
    tried.append("JupyterHub (JUPYTERHUB_SERVICE_URL + JUPYTERHUB_API_TOKEN): not set")

    parent = env.get("JPY_PARENT_PID")
    runtime = _runtime_dir(env)
    if not parent:
        tried.append("the server's runtime file: JPY_PARENT_PID is not set (kernel not started by a server)")
    else:
        for path in sorted(glob.glob(os.path.join(runtime, "jpserver-*.json"))):
            try:
                with open(path) as f:
                    info = json.load(f)
            except (OSError, ValueError):
                continue
            if str(info.get("pid")) == str(parent) and info.get("url"):
                return ServerInfo(info["url"], info.get("token", ""), f"runtime file {path}")
        tried.append(f"the server's runtime file: no jpserver-{parent}.json in {runtime}")

    raise ServerNotFound(
        "tabbi could not find its Jupyter server. Tried:\n  - "
        + "\n  - ".join(tried)
        + "\nRun this notebook in JupyterLab/Notebook with tabbi installed, or set TABBI_SERVER_URL "
        "(e.g. http://127.0.0.1:8888/) and TABBI_SERVER_TOKEN (the server's token)."
    )
