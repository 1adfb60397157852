"""The Modal provider's own overhead: create -> running and resume -> running on ModalProvider (the
real ``modal`` client, the loopback stand-in of Modal's API, its bubblewrap sandboxes) against the
local provider (bubblewrap) in the same run, same repository, same OpenCode.

Both run the same bootstrap and the same OpenCode on the same machine, so the ratio isolates what
the Modal path adds: the client's gRPC calls (app and image lookup, create, exec streams, tunnels),
the bundle upload of a local repository, the TLS tunnel's health check, and a snapshot that is a
filesystem image (the stand-in copies the sandbox's files) instead of a tar.gz. It says nothing
about Modal's cloud: container scheduling, image pulls and the network to *.modal.host are not in
it (real Modal adds seconds of those; see docs/benchmarks.md).

Run: ``.venv/bin/python bench/bench_modal.py [N]``.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import machine, sample_repo

from tabbi_sandbox.local import LocalProvider
from tabbi_sandbox.provider import SandboxProvider, SandboxSpec
from tests.test_provider_contract import ModalWorld, modal_environment, modal_standin


async def quiet(_: dict) -> None:
    return None


async def cycle(provider: SandboxProvider, repo: Path) -> tuple[float, float]:
    """(create -> running, resume -> running) of one session: start, snapshot, stop, resume."""
    spec = SandboxSpec(
        sandbox_id=f"ses-{secrets.token_hex(6)}",
        repo_url=str(repo),
        repo_display=str(repo),
        work_branch="tabbi/bench",
        read_only_paths=[str(repo)],
    )
    started = time.monotonic()
    sandbox = await provider.create(spec, quiet)
    created = time.monotonic() - started
    ref, _ = await provider.snapshot(sandbox, "bench")
    await sandbox.terminate()
    await provider.destroy(spec.sandbox_id)
    started = time.monotonic()
    resumed = await provider.create(spec, quiet, restore=ref)
    resume = time.monotonic() - started
    await resumed.terminate()
    await provider.destroy(spec.sandbox_id)
    await provider.delete_snapshot(ref)
    return created, resume


def main(n: int = 3) -> None:
    import modal

    work = Path(tempfile.mkdtemp(prefix="tabbi-bench-modal-"))
    repo = sample_repo(work)
    local = LocalProvider(work / "sandboxes", isolation="bwrap", start_timeout=180)
    results: dict[str, list[tuple[float, float]]] = {"local": [], "modal": []}
    with modal_standin() as standin, modal_environment(standin) as env:
        client = modal.Client.from_credentials(env["MODAL_TOKEN_ID"], env["MODAL_TOKEN_SECRET"])
        remote = ModalWorld(standin, client).provider(start_timeout=180.0)
        asyncio.run(remote.image(quiet))  # built once per recipe, as in production: not measured
        for _ in range(n):  # interleaved, so that load on the machine hits both alike
            results["local"].append(asyncio.run(cycle(local, repo)))
            results["modal"].append(asyncio.run(cycle(remote, repo)))
    print(f"machine: {machine()}")
    for index, what in enumerate(("create -> running", "resume -> running")):
        base = statistics.median(r[index] for r in results["local"])
        modal_ = statistics.median(r[index] for r in results["modal"])
        print(
            f"{what}: local median {base:.2f} s, modal (stand-in) median {modal_:.2f} s, "
            f"ratio {modal_ / base:.2f} (n={n})"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
