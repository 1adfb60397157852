"""A smoke test against real Modal: runs only when MODAL_TOKEN_ID (and MODAL_TOKEN_SECRET) are set,
skipped otherwise (as in CI, which has no Modal account). It builds tabbi's real image (once per
recipe: the first run takes minutes), starts a sandbox with a public repository, checks OpenCode
through the tunnel, runs a command as the agent, snapshots, restores from the snapshot, and cleans
up everything it made. What it checks that the stand-in cannot: the recipe's RUN steps really
install OpenCode and the agent's user, the tunnel reaches OpenCode bound to 0.0.0.0, and real
Modal's snapshot/restore keeps the workspace.

    MODAL_TOKEN_ID=... MODAL_TOKEN_SECRET=... .venv/bin/python -m pytest -q tests/test_modal_live.py
"""

from __future__ import annotations

import os
import secrets

import pytest

from tabbi_sandbox.provider import SandboxSpec

pytestmark = [
    pytest.mark.skipif(
        not os.environ.get("MODAL_TOKEN_ID"), reason="needs Modal credentials (MODAL_TOKEN_ID)"
    ),
    pytest.mark.timeout(1800),
]

PUBLIC_REPO = os.environ.get("TABBI_LIVE_REPO", "https://github.com/octocat/Hello-World.git")


async def test_a_real_modal_sandbox_starts_snapshots_and_restores():
    from tabbi_sandbox.modal import ModalProvider

    provider = ModalProvider(
        app_name=os.environ.get("TABBI_LIVE_APP", "tabbi-live-test"),
        server_tag="live-" + secrets.token_hex(4),
        build_timeout=1800,
        start_timeout=600,
    )
    phases: list[str] = []

    async def progress(message: dict) -> None:
        phases.append(message["phase"])

    spec = SandboxSpec(
        sandbox_id=f"ses-{secrets.token_hex(6)}",
        repo_url=PUBLIC_REPO,
        repo_display=PUBLIC_REPO,
        work_branch="tabbi/live",
        owner="live-test",
    )
    sandbox = await provider.create(spec, progress)
    snapshot = None
    try:
        assert phases.index("cloning") < phases.index("branch") and phases[-1] == "ready"
        assert sandbox.endpoint().url.startswith("https://")
        whoami = await sandbox.exec(["sh", "-c", "id -un; git branch --show-current"])
        assert whoami.stdout.split() == ["tabbi", "tabbi/live"], whoami
        # OpenCode's environment is closed to the agent (execute-only binary, another process).
        peek = await sandbox.exec(["sh", "-c", "cat /proc/$(pgrep -f 'opencode serve' | head -1)/environ"])
        assert spec.password not in peek.stdout
        await sandbox.exec(["sh", "-c", "echo kept > kept.txt"])
        snapshot, size = await provider.snapshot(sandbox, "live")
        assert size > 0
    finally:
        await sandbox.terminate()
    restored = await provider.create(spec, progress, restore=snapshot)
    try:
        assert (await restored.exec(["cat", "kept.txt"])).stdout.strip() == "kept"
    finally:
        await restored.terminate()
        await provider.delete_snapshot(snapshot)
        await provider.reconcile({}, force=True)
