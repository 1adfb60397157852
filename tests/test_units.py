"""Small pure pieces: input validation, the OpenCode binary lookup, model configuration."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tabbi_extension.model_config import GatewayAccess, ModelConfigError, ModelSettings, build, resolve
from tabbi_extension.states import InvalidTransition, check_transition
from tabbi_extension.validation import ValidationError, parse_repo, validate_branch
from tabbi_sandbox import binary


def test_repo_forms(tmp_path):
    (tmp_path / "r" / ".git").mkdir(parents=True)
    assert parse_repo("octo/hello-world").url == "https://github.com/octo/hello-world.git"
    assert parse_repo("octo/hello", "https://ghe.example").url == "https://ghe.example/octo/hello.git"
    local = parse_repo(str(tmp_path / "r"))
    assert local.kind == "local" and local.local_path == str(tmp_path / "r")
    assert parse_repo(f"file://{tmp_path / 'r'}").local_path == str(tmp_path / "r")
    url = parse_repo("https://git.example.com/team/repo.git")
    assert url.kind == "url" and url.url == "https://git.example.com/team/repo.git"


@pytest.mark.parametrize("bad", ["", "-x", "ext::sh", "ssh://h/r", "git://h/r", "https://u:p@h/r",
                                 "a/b/c", "https:///nohost", "x\ny/z", "a" * 600])
def test_bad_repos(bad):
    with pytest.raises(ValidationError):
        parse_repo(bad)


@pytest.mark.parametrize("name", ["main", "feature/x-1", "release_2.0", None, ""])
def test_good_branches(name):
    assert validate_branch(name) == (name or None)


@pytest.mark.parametrize("name", ["../x", "-f", "a..b", "a//b", "a/", "a.lock", ".hidden", "a@{1}",
                                  "with space", "x" * 300, 5])
def test_bad_branches(name):
    with pytest.raises(ValidationError):
        validate_branch(name)


def test_state_machine_allows_only_the_documented_transitions():
    check_transition("idle", "starting")
    check_transition("starting", "running")
    check_transition("running", "paused")
    check_transition("paused", "starting")
    for state in ("idle", "starting", "running", "paused", "error"):
        check_transition(state, "error")
    for current, new in [("idle", "running"), ("running", "starting"), ("deleted", "starting"),
                         ("paused", "running")]:
        with pytest.raises(InvalidTransition):
            check_transition(current, new)


def make_exe(path):
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_opencode_lookup_order_and_message(tmp_path, monkeypatch):
    configured, from_env = make_exe(tmp_path / "a"), make_exe(tmp_path / "b")
    monkeypatch.setenv("TABBI_OPENCODE_BIN", str(from_env))
    assert binary.find_opencode(str(configured)) == str(configured)
    assert binary.find_opencode(None) == str(from_env)
    monkeypatch.delenv("TABBI_OPENCODE_BIN")
    monkeypatch.setenv("PATH", str(tmp_path))
    make_exe(tmp_path / "opencode")
    assert binary.find_opencode(None) == str(tmp_path / "opencode")
    os.remove(tmp_path / "opencode")
    monkeypatch.setattr(binary, "PROJECT_INSTALL", tmp_path / "missing" / "opencode")
    with pytest.raises(binary.OpenCodeNotFound) as err:
        binary.find_opencode(str(tmp_path / "nothing-here"))
    message = str(err.value)
    for tried in ("config TabbiExtension.opencode_bin", "env TABBI_OPENCODE_BIN: not set",
                  "'opencode' on PATH: not set", "project install", "npm install opencode-ai@"):
        assert tried in message


def test_model_config_for_an_openai_compatible_server_carries_only_the_gateway_token():
    settings = ModelSettings(model="llama3.1", llm_base_url="http://127.0.0.1:9/v1",
                             llm_api_key="sk-secret-value")
    access = GatewayAccess("http://127.0.0.1:8888/tabbi/gateway/ses-0123456789ab/v1", "gw-token")
    setup = build(settings, access=access)
    assert setup.model_ref == {"providerID": "tabbi", "modelID": "llama3.1"}
    provider = setup.config["provider"]["tabbi"]
    assert provider["options"] == {"baseURL": access.base_url, "apiKey": "gw-token"}
    assert "sk-secret-value" not in repr(setup)
    # Without a gateway (OpenCode driven directly, as the benchmarks do) there is no key at all.
    direct = build(settings)
    assert direct.config["provider"]["tabbi"]["options"] == {"baseURL": "http://127.0.0.1:9/v1",
                                                             "apiKey": "none"}
    assert "sk-secret-value" not in repr(direct)


def test_model_config_for_builtin_providers():
    settings = ModelSettings(model="anthropic/claude-x",
                             provider_keys={"ANTHROPIC_API_KEY": "k-anthropic", "OTHER": "no"})
    access = GatewayAccess("http://gw/v1", "gw-token")
    setup = build(settings, access=access)
    assert setup.model_ref == {"providerID": "anthropic", "modelID": "claude-x"}
    assert setup.config["provider"] == {"anthropic": {"options": {"baseURL": "http://gw/v1",
                                                                  "apiKey": "gw-token"}}}
    assert "k-anthropic" not in repr(setup)
    _, upstream = resolve(settings)
    assert upstream.base_url == "https://api.anthropic.com/v1"
    assert upstream.auth_headers() == {"x-api-key": "k-anthropic"}
    _, openai = resolve(ModelSettings(model="openai/gpt-x", provider_keys={"OPENAI_API_KEY": "k-o"}))
    assert openai.auth_headers() == {"Authorization": "Bearer k-o"}
    with pytest.raises(ModelConfigError, match="not supported"):
        build(ModelSettings(model="google/gemini"))
    with pytest.raises(ModelConfigError, match="TABBI_MODEL"):
        build(ModelSettings())
    with pytest.raises(ModelConfigError, match="TABBI_MODEL"):
        build(ModelSettings(llm_base_url="http://x/v1"))


def test_isolation_falls_back_to_a_plain_subprocess_and_says_so_once(monkeypatch, caplog):
    from tabbi_sandbox import isolation

    monkeypatch.setattr(isolation, "bwrap_path", lambda: None)
    isolation.bwrap_works.cache_clear()
    monkeypatch.setattr(isolation, "_warned", False)
    try:
        with caplog.at_level("WARNING"):
            assert isolation.choose("auto") is False
            assert isolation.choose("auto") is False
        warnings = [r for r in caplog.records if "without isolation" in r.getMessage()]
        assert len(warnings) == 1 and "bubblewrap" in warnings[0].getMessage()
        assert isolation.choose("none") is False
        with pytest.raises(RuntimeError, match="isolation='bwrap'"):
            isolation.choose("bwrap")
    finally:
        isolation.bwrap_works.cache_clear()


def test_importing_the_kernel_side_stays_light():
    """Threat to the notebook experience: a heavy import chain in every kernel. Loading the magics
    must not pull in the server, the store, cloud SDKs or the widget stack."""
    import subprocess
    import sys

    code = (
        "import sys, tabbi_kernel\n"
        "from IPython.testing.globalipapp import get_ipython\n"
        "tabbi_kernel.load_ipython_extension(get_ipython())\n"
        "heavy = ['modal', 'authlib', 'tabbi_extension', 'tabbi_sandbox', 'jupyter_server',\n"
        "         'anywidget', 'httpx', 'convex']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


def test_local_sandboxes_run_the_bootstrap_from_its_cached_bytecode(tmp_path):
    """A script is compiled at every start (~15 ms of each exec on a 2-core VM, a pooled start's
    clone included): the local provider refreshes the bootstrap's bytecode cache and its
    sandboxes import the bootstrap, so Python loads that cache (``python -v`` says where from)."""
    import subprocess
    import sys

    from tabbi_sandbox.local import BOOTSTRAP_LAUNCHER, LocalProvider
    from tabbi_sandbox.provider import BOOTSTRAP_SCRIPT

    LocalProvider(root=tmp_path / "sandboxes")
    done = subprocess.run([sys.executable, "-I", "-S", "-v", "-c", BOOTSTRAP_LAUNCHER, "none"],
                          input=b"", capture_output=True, timeout=60)
    cached = f"code object from '{BOOTSTRAP_SCRIPT.parent}/__pycache__/bootstrap."
    assert cached in done.stderr.decode(), done.stderr.decode()[-2000:]


def test_a_sandbox_keeps_the_credential_out_unless_its_provider_says_its_execs_are_private():
    """Threat: a new provider whose execs share the agent's container (as Modal's do) would,
    with a default of "private", hand the person's token to an exec the agent can race for
    (``/proc/<pid>/environ``, /tmp). The default is the safe side: pushes and syncs go through
    the server with bundles; only bubblewrap's sandboxes, each exec a namespace of its own, opt in."""
    from tabbi_sandbox.local import LocalSandbox
    from tabbi_sandbox.modal import ModalSandbox
    from tabbi_sandbox.provider import Sandbox

    class NewSandbox(Sandbox):
        def bootstrap_argv(self, *args: str) -> list[str]:
            return list(args)

    assert NewSandbox.private_exec is False and NewSandbox.pushes_from_bundle.fget(NewSandbox) is True
    assert ModalSandbox.private_exec is False
    assert LocalSandbox.private_exec is True


def test_a_clone_into_a_warm_workspace_is_a_cold_clone_and_a_cut_one_is_never_reused(tmp_path):
    """A warm sandbox's clone is made inside the workspace its OpenCode opened and then takes its
    place (``bootstrap.take_place``). Threats: the repository is the attacker's and names its
    files as it likes (``.tabbi-clone``, ``.tabbi-clone-<anything>``: the clone's own folder must
    not collide with them); and a warm workspace whose clone was cut short (the server died) must
    not be reused on the next start as if it were the session's work (an empty repository, or
    half of one): it is cloned afresh."""
    import subprocess

    from tabbi_sandbox import bootstrap
    from tests.conftest import git

    source = tmp_path / "source"
    (source / ".tabbi-clone-0a1b2c3d4e5f").mkdir(parents=True)
    (source / ".tabbi-clone-0a1b2c3d4e5f" / "inside.txt").write_text("the repository's\n")
    (source / ".tabbi-clone").write_text("a file of that name\n")
    (source / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    git("init", "--quiet", "--initial-branch=main", cwd=source)
    git("add", "-A", cwd=source)
    git("commit", "--quiet", "-m", "initial", cwd=source)
    git("branch", "other", cwd=source)
    home = tmp_path / "home"
    (home / "tmp").mkdir(parents=True)
    env = bootstrap.base_env(str(home))

    def spec(workspace: Path) -> dict:
        return {"workspace": str(workspace), "branch": "tabbi/t", "repo_url": str(source),
                "repo_display": "o/r", "base_branch": None}

    def state(workspace: Path) -> tuple:
        def run(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True,
                                  env={**env, "GIT_CONFIG_GLOBAL": "/dev/null"}, check=True).stdout
        files = sorted((str(p.relative_to(workspace)), p.read_bytes() if p.is_file() else b"")
                       for p in workspace.rglob("*") if ".git" not in p.relative_to(workspace).parts)
        return (files, run("status", "--porcelain", "--ignored"), run("config", "--local", "--list"),
                run("branch", "-a", "-vv"), run("rev-parse", "HEAD"))

    cold = tmp_path / "cold" / "workspace"
    assert bootstrap.clone_or_reuse(spec(cold), env) is True
    warm = tmp_path / "warm" / "workspace"
    project_id = bootstrap.prepare_warm_workspace(str(warm), env)
    assert bootstrap.clone_or_reuse(spec(warm), env, opened=True) is True
    assert state(warm) == state(cold)
    assert (warm / ".git" / "opencode").read_text() == project_id  # the id OpenCode opened it with
    assert not (warm / ".git" / bootstrap.WAITING_FILE).exists()
    assert bootstrap.clone_or_reuse(spec(warm), env) is False  # taken to the end: the session's now

    cut = tmp_path / "cut" / "workspace"
    bootstrap.prepare_warm_workspace(str(cut), env)
    (cut / (bootstrap.CLONE_PREFIX + "5eed")).mkdir()  # a clone the dead server left half-made
    assert bootstrap.clone_or_reuse(spec(cut), env) is True  # cloned afresh, not reused
    assert state(cut) == state(cold)

