"""Backends are configured as their own traitlets classes (``c.LocalProvider.*``,
``c.SQLiteStore.*``), the way a JupyterHub ``Spawner`` is; tabbi's older ``TabbiExtension``
traits and ``*_options`` dicts keep working, and a class's own section wins over them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tabbi_extension.store import SQLiteStore
from tabbi_sandbox import binary
from tabbi_sandbox.local import LocalProvider


@pytest.fixture
def jp_server_config(jp_server_config: dict, tmp_path: Path) -> dict:
    return {
        **jp_server_config,
        # The class's own section beats the legacy trait set below (start_timeout 120 in conftest).
        "LocalProvider": {"start_timeout": 42.0, "stop_grace": 1.5},
        "SQLiteStore": {"busy_timeout": 0.75, "path": str(tmp_path / "elsewhere.sqlite3")},
        "TabbiExtension": {
            **jp_server_config["TabbiExtension"],
            "isolation": "none",  # legacy trait, not set in the class section: it applies
            "sandbox_provider_options": {"snapshot_timeout": 33.0},
        },
    }


async def test_backends_take_their_own_config_sections_and_the_legacy_traits(tabbi_app, data_dir, tmp_path):
    provider, store = tabbi_app.provider, tabbi_app.store
    assert isinstance(provider, LocalProvider) and isinstance(store, SQLiteStore)
    assert provider.parent is tabbi_app and store.parent is tabbi_app
    assert provider.start_timeout == 42.0  # c.LocalProvider wins over c.TabbiExtension.start_timeout
    assert provider.stop_grace == 1.5
    assert provider.isolation == "none"  # c.TabbiExtension.isolation still reaches it
    assert provider.snapshot_timeout == 33.0  # sandbox_provider_options still reach it
    assert provider.root == data_dir / "sandboxes"  # tabbi's defaults fill the rest
    assert provider.log_root == data_dir / "logs"
    assert store.busy_timeout == 0.75
    assert store.path == tmp_path / "elsewhere.sqlite3"


async def test_health_reports_the_providers_own_checks(api, tabbi_app, monkeypatch):
    """The OpenCode binary is the local provider's business (a Modal sandbox brings its own):
    a missing one makes the provider, and so the server, unusable."""
    health = await api.ok("GET", "tabbi/api/health")
    assert health["opencode"]["found"] is True and health["sandbox"]["provider"] == "local"
    monkeypatch.setattr(tabbi_app.provider, "opencode_bin", "/nonexistent/opencode")
    monkeypatch.setenv("TABBI_OPENCODE_BIN", "/nonexistent/opencode")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(binary, "PROJECT_INSTALL", Path("/nonexistent/opencode"))
    health = await api.ok("GET", "tabbi/api/health")
    assert health["status"] == "degraded"
    assert health["sandbox"]["usable"] is False and health["opencode"]["found"] is False
