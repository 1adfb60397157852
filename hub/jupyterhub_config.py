"""A local JupyterHub with tabbi in hub mode, for administrators to try it: `make hub`.

Two demo users (alice and bob, any password: JupyterHub's dummy authenticator) whose servers run
as this machine's current user (SimpleLocalProcessSpawner: no OS users needed), and tabbi's
session service at /services/tabbi/ on the embedded defaults (SQLite and local sandboxes under
hub/.data/). Open http://127.0.0.1:8000/ and sign in as alice.

This is a demo, not a deployment: everything runs as one OS user here, so the service's secrets
are not separated from the users' code. A real hub runs the service as its own user or pod; see
docs/deploy-jupyterhub.md.
"""

import os
import sys
from pathlib import Path

from tabbi_extension.hub import configure_hub

c = get_config()  # noqa: F821 (JupyterHub's config loader provides it)
HERE = Path(__file__).resolve().parent
DATA = HERE / ".data"
DATA.mkdir(mode=0o700, exist_ok=True)
PORT = int(os.environ.get("TABBI_HUB_PORT", "8000"))
PROJECT_BIN = HERE.parent / "node_modules" / ".bin"

c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = PORT
c.JupyterHub.db_url = f"sqlite:///{DATA}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = str(DATA / "jupyterhub_cookie_secret")
PROXY = PROJECT_BIN / "configurable-http-proxy"  # pinned in package.json
c.ConfigurableHTTPProxy.command = [str(PROXY) if PROXY.exists() else "configurable-http-proxy"]
c.ConfigurableHTTPProxy.pid_file = str(DATA / "jupyterhub-proxy.pid")
c.JupyterHub.pid_file = str(DATA / "jupyterhub.pid")

c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allowed_users = {"alice", "bob"}
c.Authenticator.admin_users = {"alice"}
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = str(DATA / "users" / "{username}")
AS_ROOT = ["--allow-root"] if os.geteuid() == 0 else []  # a root shell (a container) runs it all as root
c.Spawner.cmd = [sys.executable, "-m", "jupyterhub.singleuser"]
c.Spawner.args = [*AS_ROOT]
c.Spawner.default_url = "/lab"

environment = {
    "TABBI_DATA_DIR": str(DATA / "tabbi"),
    # The service's Jupyter config (hub/service/jupyter_server_config.py): tabbi's own settings.
    "JUPYTER_CONFIG_PATH": str(HERE / "service"),
    "JUPYTER_CONFIG_DIR": str(DATA / "service-jupyter"),
    "TABBI_HUB_USERS_DIR": str(DATA / "users"),
}
for name in ("TABBI_MODEL", "TABBI_LLM_BASE_URL", "TABBI_LLM_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY",
             "TABBI_GITHUB_CLIENT_ID", "TABBI_GITHUB_CLIENT_SECRET", "TABBI_ENCRYPTION_KEY"):
    if os.environ.get(name):  # the team's settings and secrets: given to the service alone
        environment[name] = os.environ[name]

configure_hub(
    c,
    service_url=f"http://127.0.0.1:{PORT}/services/tabbi/",
    bind_url="http://127.0.0.1:8765",
    command=[sys.executable, "-m", "tabbi_extension.hub", *AS_ROOT],
    environment=environment,
)
