"""A real JupyterHub on 127.0.0.1 with tabbi in hub mode, for tests/test_hub.py.

JupyterHub (from PyPI) and configurable-http-proxy (from npm) on free ports; the users' servers
are spawned by ``LocalProcessSpawner`` as distinct OS users created here (the tests run as root),
and tabbi's service runs as yet another OS user, holding the planted team secrets in its
environment only (the hub's config file, which names them, is root's, mode 0600). On teardown
the hub is stopped, then every process of those users, then the proxy (by its pid file), and
the users are removed.

Code runs in a person's kernel the way a notebook runs it: a kernel started through the hub's
proxy on their own server, driven over the kernel's WebSocket (``HubKernel``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from tabbi_sandbox.bootstrap import free_port
from tests.support.server import OutputWatch
from tests.support.waiting import wait_exited

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SERVICE_USER = "tabbisvc"


def find_proxy() -> str | None:
    """configurable-http-proxy: the project's pinned one (package.json), else TABBI_TEST_CHP."""
    for candidate in (ROOT / "node_modules/.bin/configurable-http-proxy", os.environ.get("TABBI_TEST_CHP")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


class HubOutput(OutputWatch):
    def wait_new_line(self, timeout: float) -> None:
        """Until the hub logs its next line (it logs as it changes a server's state)."""
        with self._changed:
            seen = len(self._seen)
            self._changed.wait_for(lambda: self._ended or len(self._seen) > seen, timeout)


def create_user(name: str) -> pwd.struct_passwd:
    """A fresh OS user with a home only its owner writes (0711: others may pass through to the
    folders it shares, such as a repository the tabbi service reads)."""
    remove_user(name)
    subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True)
    entry = pwd.getpwnam(name)
    os.chmod(entry.pw_dir, 0o711)
    return entry


def remove_user(name: str) -> None:
    with contextlib.suppress(KeyError):
        pwd.getpwnam(name)
        subprocess.run(["userdel", "-r", "-f", name], check=False, capture_output=True)


def pids_of_user(uid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    found.append(int(entry))
    return found


def as_user(name: str, *cmd: str, cwd: str | None = None, input: str | None = None) -> str:
    """Run ``cmd`` as the OS user ``name`` (``input`` on its stdin); its output."""
    entry = pwd.getpwnam(name)
    return subprocess.run(["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups",
                           *cmd], check=True, cwd=cwd, capture_output=True, text=True, input=input,
                          env={"HOME": entry.pw_dir, "PATH": "/usr/bin:/bin"}).stdout


def shared_python(folder: Path) -> str:
    """A Python the hub's OS users can run, with this project's packages.

    The project's virtualenv may be built on an interpreter only root reaches (pyenv under
    /root): then a virtualenv of the system's Python of the same minor version is made in
    ``folder`` (readable by everyone), whose site-packages adds the project's (``.pth`` with
    ``site.addsitedir``, so the editable install's own ``.pth`` files are read too)."""
    if not os.path.realpath(sys.executable).startswith(os.path.expanduser("~root") + "/"):
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(version, path="/usr/local/bin:/usr/bin")
    assert system, f"no {version} outside /root for the hub's users"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    subprocess.run([system, "-m", "venv", "--without-pip", str(folder)], check=True)
    for shared in ("etc", "share"):  # Jupyter's config (enabled extensions) and data (kernelspecs)
        if (Path(sys.prefix) / shared).is_dir():
            (folder / shared).symlink_to(Path(sys.prefix) / shared)
    own = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    (folder / "lib" / version / "site-packages" / "tabbi-project.pth").write_text(
        f"import site; site.addsitedir({own!r})\n")
    return str(folder / "bin" / "python")


class Hub:
    """``users``: the people (OS users created here; each module uses its own names, as test
    modules may run at once in parallel workers); ``service_user``: the service's OS user;
    ``public_url``: the service's (``TABBI_PUBLIC_URL``); ``lab``: users' servers open
    JupyterLab; ``probe``: the hub's config gives users' servers no ``TABBI_SERVICE_URL`` and sets
    the hub's public URL (the proxy's), so kernels find the service by probing."""

    def __init__(self, workdir: Path, users: list[str], service_env: dict[str, str],
                 tabbi_config: dict[str, Any], public_url: str | None = None,
                 sections: dict[str, dict[str, Any]] | None = None, admins: tuple[str, ...] = (),
                 service_user: str = SERVICE_USER, lab: bool = False, probe: bool = False):
        self.workdir = workdir
        self.users = users
        self.admins = admins  # hub admins (c.Authenticator.admin_users)
        self.service_user = service_user
        self.lab, self.probe = lab, probe
        self.proxy_port, self.hub_port, self.api_port, self.service_port = (free_port() for _ in range(4))
        self.admin_token = secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self.accounts = {name: create_user(name) for name in [*users, service_user]}
        service = self.accounts[service_user]
        workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o700)
        config_dir = Path(service.pw_dir) / "jupyter-config"
        config_dir.mkdir()
        (config_dir / "jupyter_server_config.json").write_text(
            json.dumps({"TabbiExtension": tabbi_config, **(sections or {})}))
        shutil.chown(config_dir, service.pw_uid, service.pw_gid)
        env = {
            **service_env,
            "JUPYTER_CONFIG_DIR": str(config_dir),
            "TABBI_DATA_DIR": str(Path(service.pw_dir) / "tabbi-data"),
            **({"TABBI_PUBLIC_URL": public_url} if public_url else {}),
        }
        self.python = shared_python(Path(tempfile.mkdtemp(prefix="tabbi-hub-python-")))
        config = workdir / "jupyterhub_config.py"
        config.write_text(self._config(env))
        os.chmod(config, 0o600)
        proxy = find_proxy()
        assert proxy, "configurable-http-proxy is not installed (npm install, see package.json)"
        hub_env = {"PATH": f"{VENV_BIN}:{Path(proxy).parent}:/usr/local/bin:/usr/bin:/bin",
                   "HOME": str(workdir), "LANG": "C.UTF-8"}
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "jupyterhub"), "-f", str(config)], cwd=workdir, env=hub_env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.log_path = workdir / "hub.log"
        self.output = HubOutput(self.proc, self.log_path)
        # The service logs through the hub's output (a managed service inherits it).
        for line in ("JupyterHub is now running", "tabbi: data in"):
            if not self.output.wait_for(line, 120):
                self.stop()
                raise RuntimeError(f"the hub did not start ({line!r}); see {self.log_path}:\n"
                                   f"{self.log_path.read_text()[-3000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}/"

    @property
    def service_url(self) -> str:
        return f"{self.url}services/tabbi/"

    def _config(self, service_env: dict[str, str]) -> str:
        return textwrap.dedent(f"""
            c = get_config()  # noqa
            c.JupyterHub.ip = "127.0.0.1"
            c.JupyterHub.port = {self.proxy_port}
            c.JupyterHub.hub_ip = "127.0.0.1"
            c.JupyterHub.hub_port = {self.hub_port}
            c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{self.api_port}"
            c.JupyterHub.db_url = "sqlite:///{self.workdir}/jupyterhub.sqlite"
            c.JupyterHub.cookie_secret_file = "{self.workdir}/cookie_secret"
            c.JupyterHub.authenticator_class = "dummy"
            c.Authenticator.allow_all = True
            c.Authenticator.admin_users = {set(self.admins)!r}
            c.JupyterHub.spawner_class = "localprocess"
            c.Spawner.cmd = ["{self.python}", "-m", "jupyterhub.singleuser"]
            c.Spawner.start_timeout = 120
            c.Spawner.http_timeout = 120
            c.Spawner.default_url = "{'/lab' if self.lab else ''}"
            if {self.probe!r}:
                c.JupyterHub.public_url = "{self.url}"
            from tabbi_extension.hub import configure_hub
            configure_hub(c, service_url=None if {self.probe!r} else "{self.service_url}",
                          bind_url="http://127.0.0.1:{self.service_port}",
                          command=["{self.python}", "-m", "tabbi_extension.hub"],
                          user="{self.service_user}", environment={service_env!r})
            c.JupyterHub.services.append({{"name": "test-admin", "api_token": "{self.admin_token}"}})
            c.JupyterHub.load_roles.append({{
                "name": "test-admin", "services": ["test-admin"],
                "scopes": ["admin:users", "admin:servers", "access:servers", "tokens"],
            }})
        """)

    # -- the hub's REST API, as its administrator ------------------------------------------------

    def api(self, method: str, path: str, body: Any = None, token: str | None = None,
            base: str | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            (base or f"{self.url}hub/api/") + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {token or self.admin_token}",
                     "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                raw, status = response.read(), response.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def start_server(self, name: str, timeout: float = 120) -> None:
        """Spawn ``name``'s server; return once the hub's progress stream says it is ready (then
        the proxy routes to it)."""
        if self.api("GET", f"users/{name}")[0] == 404:
            status, body = self.api("POST", f"users/{name}")
            assert status == 201, (status, body)
        status, body = self.api("POST", f"users/{name}/server")
        assert status in (201, 202), (status, body)
        request = urllib.request.Request(f"{self.url}hub/api/users/{name}/server/progress",
                                         headers={"Authorization": f"token {self.admin_token}"})
        with urllib.request.urlopen(request, timeout=timeout) as stream:  # server-sent events
            for raw in stream:
                if raw.startswith(b"data:"):
                    event = json.loads(raw[5:])
                    if event.get("ready"):
                        return
                    assert not event.get("failed"), event
        raise AssertionError(f"{name}'s server did not start; see {self.log_path}")

    def stop_server(self, name: str, timeout: float = 60) -> None:
        """Stop ``name``'s server (as the hub's culler would): until its processes ended and the
        hub no longer counts it as running or stopping."""
        status, body = self.api("DELETE", f"users/{name}/server")
        assert status in (202, 204), (status, body)
        uid = self.accounts[name].pw_uid
        wait_exited(lambda: pids_of_user(uid), timeout, f"{name}'s server stopped")
        deadline = time.monotonic() + timeout
        while self.api("GET", f"users/{name}")[1].get("servers"):  # the hub's own bookkeeping
            assert time.monotonic() < deadline, f"the hub still lists {name}'s server"
            self.output.wait_new_line(deadline - time.monotonic())

    def shared_repo(self, root: str, user: str) -> str:
        """A git repository for ``user`` at ``root/user/repo``, owned by the service's user and
        readable by all (git refuses to clone a repository another OS user owns: see
        docs/deploy-jupyterhub.md); ``root/{username}`` is then a ``local_repo_roots`` entry."""
        repo = f"{root}/{user}/repo"
        git = ["git", "-c", "user.name=T", "-c", "user.email=t@example.test"]
        as_user(self.service_user, "mkdir", "-p", "-m", "755", repo)
        as_user(self.service_user, "chmod", "755", root, f"{root}/{user}")
        as_user(self.service_user, "git", "init", "-q", "-b", "main", cwd=repo)
        as_user(self.service_user, "sh", "-c", f"echo '# {user}' > README.md", cwd=repo)
        as_user(self.service_user, *git, "add", ".", cwd=repo)
        as_user(self.service_user, *git, "commit", "-qm", "init", cwd=repo)
        return repo

    async def kernel(self, name: str) -> HubKernel:
        """A new kernel on ``name``'s server, reached through the hub's proxy."""
        status, body = self.api("POST", "kernels", {"name": "python3"},
                                base=f"{self.url}user/{name}/api/")
        assert status == 201, (status, body)
        ws_url = f"ws://127.0.0.1:{self.proxy_port}/user/{name}/api/kernels/{body['id']}/channels"
        socket = await websocket_connect(HTTPRequest(
            ws_url, headers={"Authorization": f"token {self.admin_token}"}))
        return HubKernel(socket)

    def stop(self) -> None:
        """Stop the hub (it stops the servers, the service and the proxy), then end whatever of
        ours is left, by pid: the users' processes, the proxy (its pid file); remove the users."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for account in self.accounts.values():
            for pid in pids_of_user(account.pw_uid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                wait_exited(lambda uid=account.pw_uid: pids_of_user(uid), 30, "the user's processes")
        pid_file = self.workdir / "jupyterhub-proxy.pid"
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        for name in self.accounts:
            remove_user(name)
        if self.python != sys.executable:
            shutil.rmtree(Path(self.python).parents[1], ignore_errors=True)


class HubKernel:
    """Runs code in a kernel over its WebSocket (the legacy JSON protocol, as a notebook does)."""

    def __init__(self, socket: Any):
        self.socket = socket
        self.session = uuid.uuid4().hex

    async def run(self, code: str, timeout: float = 180) -> str:
        """The cell's output (stdout and stderr); raises with the traceback if it failed."""
        msg_id = uuid.uuid4().hex
        self.socket.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                       "session": self.session, "date": "", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        }))
        out: list[str] = []
        error = None
        replied = idle = False
        deadline = time.monotonic() + timeout
        import asyncio

        while not (replied and idle):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the cell did not finish within {timeout} s: {''.join(out)}")
            raw = await asyncio.wait_for(self.socket.read_message(), remaining)
            if raw is None:
                raise AssertionError(f"the kernel's WebSocket closed: {''.join(out)}")
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.append(content["text"])
            elif kind == "error":
                error = "\n".join(content.get("traceback", [])) or content.get("evalue")
            elif kind == "execute_reply":
                replied = True
            elif kind == "status" and content["execution_state"] == "idle":
                idle = True
        if error:
            raise AssertionError(f"the cell failed:\n{error}\noutput:\n{''.join(out)}")
        return "".join(out)

    def close(self) -> None:
        self.socket.close()
