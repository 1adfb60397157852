"""A real Jupyter process (``jupyter server`` or ``jupyter lab``) with tabbi on, as people run it,
for the browser test, the notebook test and the benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tabbi_sandbox.bootstrap import free_port
from tests.support.waiting import poll_until


class JupyterProcess:
    def __init__(self, llm_url: str, workdir: Path, app: str = "server", extra: list[str] | None = None,
                 env: dict[str, str] | None = None):
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.workdir = workdir
        home = workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "HOME": str(home),
            "JUPYTER_RUNTIME_DIR": str(workdir / "runtime"),
            "JUPYTER_CONFIG_DIR": str(workdir / "config"),
            **(env or {}),
        }
        module = {"lab": "jupyterlab", "notebook": "notebook", "server": "jupyter_server"}[app]
        self.log_path = workdir / f"{app}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--no-browser", f"--port={self.port}", "--ServerApp.ip=127.0.0.1",
             "--allow-root", f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={workdir}",
             "--ServerApp.jpserver_extensions=tabbi_extension=True",
             f"--TabbiExtension.data_dir={workdir / 'tabbi-data'}",
             f"--TabbiExtension.llm_base_url={llm_url}",
             "--TabbiExtension.model=scripted", *(extra or [])],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        poll_until(self._up, 90, f"jupyter answering (see {self.log_path})")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"jupyter exited; see {self.log_path}:\n{self.log_path.read_text()[-2000:]}")
        try:
            self.call("GET", "tabbi/api/health", timeout=2)
            return True
        except OSError:
            return False

    def call(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        request = urllib.request.Request(
            self.url + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def wait_kernel_connected(self, timeout: float = 90) -> None:
        """Until a kernel is idle with a front end connected to it (a browser can run cells)."""
        poll_until(lambda: any(k["execution_state"] == "idle" and k["connections"] > 0
                               for k in self.call("GET", "api/kernels")),
                   timeout, "a kernel with a connected front end", interval=0.2)

    def wait_event(self, sid: str, predicate, after: int = 0, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            page = self.call("GET", f"tabbi/api/sessions/{sid}/events?after={after}&wait=10", timeout=20)
            for event in page["events"]:
                after = event["seq"]
                if predicate(event):
                    return event
        raise TimeoutError("event not seen")

    def kill(self) -> None:
        """SIGKILL the server process alone, as a crash would."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()
