"""What the benchmarks share: a real Jupyter server with tabbi (subprocess), the scripted model,
and a bare ``opencode serve`` started the way the sandbox bootstrap starts it (the baseline)."""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tabbi_extension.model_config import ModelSettings, build  # noqa: E402
from tabbi_sandbox import bootstrap  # noqa: E402  (the in-sandbox bootstrap: its env and seeding)
from tabbi_sandbox.binary import find_opencode  # noqa: E402
from tests.support.llm import ScriptedLLM  # noqa: E402
from tests.support.server import JupyterProcess  # noqa: E402

__all__ = ["BareOpenCode", "JupyterProcess", "ScriptedLLM", "machine", "percentile", "sample_repo", "summary"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> str:
    return (f"median {statistics.median(values) * 1000:.1f} ms, "
            f"p99 {percentile(values, 99) * 1000:.1f} ms (n={len(values)})")


class BareOpenCode:
    """``opencode serve`` with the same isolated home, seeding and config as a sandbox's."""

    def __init__(self, llm: ScriptedLLM, workspace: Path):
        self.home = Path(tempfile.mkdtemp(prefix="bench-oc-home-"))
        self.port = bootstrap.free_port()
        self.password = secrets.token_urlsafe(16)
        setup = build(ModelSettings(model="scripted", llm_base_url=llm.url))
        self.model_ref = setup.model_ref
        env = bootstrap.opencode_env(bootstrap.prepare_home(str(self.home)), self.password, setup.config,
                                     str(workspace))
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [find_opencode(), "serve", "--hostname", "127.0.0.1", "--port", str(self.port)],
            cwd=workspace, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.auth = "Basic " + base64.b64encode(f"opencode:{self.password}".encode()).decode()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self) -> float:
        """Seconds from the start until healthy, probed exactly as the sandbox bootstrap does."""
        bootstrap.wait_healthy(self.port, self.password, self.proc, 60)
        return time.monotonic() - self.started

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.home, ignore_errors=True)


def sample_repo(parent: Path) -> Path:
    repo = parent / "sample"
    repo.mkdir(parents=True)
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@x"}
    (repo / "README.md").write_text("# bench\n")
    for args in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-qm", "init"]):
        subprocess.run(["git", *args], cwd=repo, env=env, check=True)
    return repo


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {cpu}, Python {sys.version.split()[0]}"
