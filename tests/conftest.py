"""Shared fixtures: a real Jupyter server with tabbi on, the scripted model, real git repos."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.api import Api
from tests.support.llm import ScriptedLLM

pytest_plugins = ["pytest_jupyter.jupyter_server"]

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(*args: str, cwd: Path | str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True,
        env={**os.environ, **GIT_ENV},
    )
    return done.stdout.strip()


@pytest.fixture(autouse=True)
def _clean_tabbi_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests configure tabbi explicitly; nothing from the developer's shell leaks in."""
    for name in list(os.environ):
        if name.startswith("TABBI_") or name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
            monkeypatch.delenv(name)


@pytest.fixture
def llm():
    server = ScriptedLLM().start()
    yield server
    server.stop()


@pytest.fixture
def source_repo(tmp_path: Path) -> Path:
    """A small git repository on branch main: the repository sessions clone."""
    repo = tmp_path / "source"
    repo.mkdir()
    git("init", "--quiet", "--initial-branch=main", cwd=repo)
    (repo / "README.md").write_text("# sample\n")
    (repo / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    git("add", ".", cwd=repo)
    git("commit", "--quiet", "-m", "initial", cwd=repo)
    return repo


@pytest.fixture
def isolation() -> str:
    """Override (or parametrize) to run sandboxes under 'bwrap' or as plain 'none'."""
    return "auto"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "tabbi-data"


@pytest.fixture
def tabbi_config(request: pytest.FixtureRequest, data_dir: Path, llm: ScriptedLLM,
                 isolation: str, tmp_path: Path) -> dict:
    """TabbiExtension config; a test adds traits with ``@pytest.mark.tabbi(name=value)``."""
    config = {
        "data_dir": str(data_dir),
        "local_repo_roots": [str(tmp_path)],  # the test's repositories (data_dir stays refused)
        "llm_base_url": llm.url,
        "model": "scripted",
        "isolation": isolation,
        "start_timeout": 120.0,
    }
    for marker in request.node.iter_markers("tabbi"):
        config.update(marker.kwargs)
    return config


@pytest.fixture
def jp_server_config(request: pytest.FixtureRequest, tabbi_config: dict) -> dict:
    # No warm pool unless a test asks for one (``@pytest.mark.warm_pool(size=1)``): every kernel
    # that loads tabbi would otherwise start one more OpenCode, for nothing in most tests.
    pool = {"size": 0}
    for marker in request.node.iter_markers("warm_pool"):
        pool.update(marker.kwargs)
    return {
        "ServerApp": {
            "jpserver_extensions": {"tabbi_extension": True},
            "identity_provider_class": "tests.support.identity.TokenUsers",
        },
        "TabbiExtension": tabbi_config,
        "WarmPool": pool,
    }


@pytest.fixture
def api(jp_fetch) -> Api:
    return Api(jp_fetch)


@pytest.fixture
def tabbi_app(jp_serverapp):
    """The running TabbiExtension instance."""
    return next(iter(jp_serverapp.extension_manager.extension_apps["tabbi_extension"]))


@pytest.fixture
def workspace(data_dir: Path):
    def path(session_id: str) -> Path:
        return data_dir / "sandboxes" / session_id / "workspace"

    return path


@pytest.fixture
def kernel(jp_serverapp, http_server, jp_asyncio_loop):
    """A real IPython kernel started by the server under test (``http_server`` makes that server
    listen on its port, where the kernel finds it through the runtime file)."""
    from tests.support.kernel import start_kernel, stop_kernel

    started = jp_asyncio_loop.run_until_complete(start_kernel(jp_serverapp))
    yield started
    jp_asyncio_loop.run_until_complete(stop_kernel(started))
