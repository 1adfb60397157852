"""How a kernel finds the Jupyter server (and so tabbi) it belongs to, without any set-up.

Routes, in order:
1. ``TABBI_SERVER_URL`` + ``TABBI_SERVER_TOKEN``: an explicit override (a kernel started elsewhere).
2. JupyterHub in hub mode: ``TABBI_SERVICE_URL`` (set for users' servers by the hub's config: the
   tabbi service's base URL, e.g. ``http://proxy/services/tabbi/``) + ``JUPYTERHUB_API_TOKEN`` (the
   person's own server token, which the hub grants ``access:services!service=tabbi``).
3. JupyterHub, found by asking: ``JUPYTERHUB_SERVICE_URL`` + ``JUPYTERHUB_API_TOKEN`` (the kernel's
   own single-user server). If that server runs tabbi (personal mode inside a hub), it is the one.
   If it answers that it has no tabbi (404: hub mode, whose users' servers run only the kernel
   side), the hub's tabbi service is probed at ``<hub>/<JUPYTERHUB_BASE_URL>services/tabbi/``,
   the hub's address being its public one (``JUPYTERHUB_PUBLIC_HUB_URL``, or ``JUPYTERHUB_HOST``
   with subdomains), with the same token; so a hub whose config did not set ``TABBI_SERVICE_URL``
   still works. Each answer is remembered for the kernel's life (one probe, not one per magic).
4. The server's runtime file ``jpserver-<pid>.json`` whose pid is the kernel's ``JPY_PARENT_PID``
   (stale files of dead servers exist; matching on the pid filters them out).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

#: The hub service's name (tabbi_extension.hub.SERVICE_NAME; not imported: the kernel side stays light).
SERVICE_NAME = "tabbi"
PROBE_TIMEOUT = 10.0


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
        found = _under_hub(env, tried)
        if found:
            return found
    else:
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


_probed: dict[tuple[str, ...], ServerInfo | str] = {}


def _under_hub(env: Mapping[str, str], tried: list[str]) -> ServerInfo | None:
    """The kernel's own server if it runs tabbi (or cannot be asked), else the hub's tabbi
    service; ``None`` (with why in ``tried``) when neither has tabbi."""
    own, token = env["JUPYTERHUB_SERVICE_URL"], env["JUPYTERHUB_API_TOKEN"]
    services = hub_service_urls(env)
    key = (own, token, *services)
    if key not in _probed:
        _probed[key] = _probe_hub(own, token, services)
    found = _probed[key]
    if isinstance(found, ServerInfo):
        return found
    tried.append(found)
    return None


def hub_service_urls(env: Mapping[str, str]) -> list[str]:
    """Where the hub's tabbi service would be, from what JupyterHub tells a single-user server
    (and so its kernels): the hub's public address and its base URL."""
    from urllib.parse import urlsplit

    base = "/" + env.get("JUPYTERHUB_BASE_URL", "/").strip("/")
    base = base.rstrip("/") + f"/services/{SERVICE_NAME}/"
    origins = []
    public = urlsplit(env.get("JUPYTERHUB_PUBLIC_HUB_URL") or "")
    if public.scheme in ("http", "https") and public.netloc:
        origins.append(f"{public.scheme}://{public.netloc}")
    host = env.get("JUPYTERHUB_HOST") or ""  # with subdomains: the hub's public origin
    if "://" in host:
        origins.append(host.rstrip("/"))
    return [origin + base for origin in dict.fromkeys(origins)]


def _probe_hub(own: str, token: str, services: list[str]) -> ServerInfo | str:
    status = _health(own, token)
    if status != 404:  # tabbi answers there (personal mode), or the server cannot be asked now:
        return ServerInfo(own, token, "JupyterHub")  # its own errors then say more than a guess
    answers = []
    for url in services:
        found = _health(url, token)
        if found == 200:
            return ServerInfo(url, token, "JupyterHub service (probed)")
        answers.append(f"{url}: {found}")
    where = "; ".join(answers) if answers else (
        "the hub's public address is unknown (JUPYTERHUB_PUBLIC_HUB_URL is not set: set "
        "c.JupyterHub.public_url)")
    return (f"JupyterHub: this server ({own}) runs no tabbi (404), and no tabbi service answered "
            f"({where}); ask the hub's administrator to enable tabbi's hub service (its config "
            f"sets TABBI_SERVICE_URL for users' servers: docs/deploy-jupyterhub.md)")


def _health(url: str, token: str) -> int | str:
    """The status of ``GET <url>tabbi/api/health`` with ``token`` (200: a tabbi server), or why
    there was none. Redirects are not followed: the token goes to this address alone."""
    import urllib.error  # deferred: importing tabbi_kernel must stay cheap
    import urllib.request

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    request = urllib.request.Request(url.rstrip("/") + "/tabbi/api/health",
                                     headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=PROBE_TIMEOUT) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"unreachable ({getattr(exc, 'reason', exc)})"
