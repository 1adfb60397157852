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
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from tabbi_sandbox.bootstrap import free_port


class JupyterProcess:
    def __init__(self, llm_url: str, workdir: Path, app: str = "server", extra: list[str] | None = None,
                 env: dict[str, str] | None = None, port: int | None = None):
        self.port = port or free_port()
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
        # The tests' repositories live in temporary folders, outside the root dir (in tabbi's
        # own config file: traitlets reads a list given on the command line for an extension
        # as None).
        (workdir / "config").mkdir(parents=True, exist_ok=True)
        (workdir / "config" / "jupyter_tabbi_config.json").write_text(
            json.dumps({"TabbiExtension": {"local_repo_roots": [tempfile.gettempdir()]}})
        )
        module = {"lab": "jupyterlab", "notebook": "notebook", "server": "jupyter_server"}[app]
        self.log_path = workdir / f"{app}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--no-browser", f"--port={self.port}", "--ServerApp.ip=127.0.0.1",
             "--allow-root", f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={workdir}",
             "--ServerApp.jpserver_extensions=tabbi_extension=True",
             f"--TabbiExtension.data_dir={workdir / 'tabbi-data'}",
             f"--TabbiExtension.llm_base_url={llm_url}",
             "--TabbiExtension.model=scripted",
             # no warm pool unless asked (``extra``): one OpenCode less (traitlets refuses a
             # trait given twice on the command line)
             *([] if any(a.startswith("--WarmPool.size=") for a in extra or []) else ["--WarmPool.size=0"]),
             *(extra or [])],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.output = OutputWatch(self.proc, self.log_path)
        # tabbi says this once it serves: after the server bound its port (which happens after
        # Jupyter's own "is running at" line) and tabbi opened its store and reconciled sessions.
        if not self.output.wait_for("tabbi: data in", 90):
            raise RuntimeError(f"jupyter exited or did not start; see {self.log_path}:\n"
                               f"{self.log_path.read_text()[-2000:]}")
        self.call("GET", "tabbi/api/health", timeout=60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

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
        """Until a front end has connected to a kernel (the server says so in its log)."""
        if not self.output.wait_for("Connecting to kernel", timeout):
            raise TimeoutError(f"no front end connected to a kernel within {timeout} s")

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
        self.output.join()

    def stop(self) -> None:
        stop_group(self.proc, self.output)


def stop_group(proc: subprocess.Popen, output: OutputWatch) -> None:
    """SIGTERM a process started in its own session with its whole group, SIGKILL after 30 s, then
    collect the rest of its output."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    output.join()


class OutputWatch:
    """Copies a process's output into its log file, line by line, and lets a caller wait for a
    line containing some text: woken by each line as it arrives, or by the process's end."""

    def __init__(self, proc: subprocess.Popen, log_path: Path):
        self._seen: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._copy, args=(proc, log_path), daemon=True)
        self._thread.start()

    def _copy(self, proc: subprocess.Popen, log_path: Path) -> None:
        assert proc.stdout is not None
        with open(log_path, "ab") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                with self._changed:
                    self._seen.append(line.decode(errors="replace"))
                    self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> bool:
        """Whether a line containing ``text`` arrived (before the process ended) within ``timeout``."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self._ended or any(text in line for line in self._seen), timeout
            ) and any(text in line for line in self._seen)

    def join(self) -> None:
        self._thread.join(timeout=30)
