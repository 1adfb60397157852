"""docs/deploy-jupyterhub.md's production YAML and settings, checked against the code so the docs
cannot rot silently: the blocks parse, the service's environment names what tabbi_extension.hub
and JupyterHub's identity provider read, every documented ``c.Class.trait`` exists, the Secret
feeds the environment variables tabbi reads, and no secret reaches the users' pods."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from traitlets.config import Config

from tabbi_extension.app import TabbiExtension
from tabbi_extension.hub import SERVICE_NAME, SERVICE_URL_ENV, server_argv
from tabbi_extension.store.convex import ConvexStore

DOC = Path(__file__).resolve().parents[1] / "docs" / "deploy-jupyterhub.md"
ACCESS = f"access:services!service={SERVICE_NAME}"


def block(name: str) -> str:
    """The fenced block whose first line is ``# <name>``."""
    for body in re.findall(r"```[a-z]*\n(.*?)```", DOC.read_text(), re.S):
        if body.startswith(f"# {name}"):
            return body
    raise AssertionError(f"no block '# {name}' in {DOC}")


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(block("tabbi-service.yaml")) if doc}


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load(block("tabbi-values.yaml"))


def test_the_service_pod_gets_what_the_hub_gives_a_managed_service(manifests):
    [container] = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value", "<secret>") for e in container["env"]}
    # tabbi_extension.hub starts from these (it refuses to start without them).
    argv = server_argv(env)
    assert "--ServerApp.port=8765" in argv and "--ServerApp.base_url=/services/tabbi/" in argv
    # JupyterHub's identity provider (HubOAuth) reads these.
    assert {"JUPYTERHUB_API_URL", "JUPYTERHUB_CLIENT_ID", "JUPYTERHUB_OAUTH_CALLBACK_URL",
            "JUPYTERHUB_SERVICE_NAME", "JUPYTERHUB_BASE_URL"} <= set(env)
    assert env["JUPYTERHUB_OAUTH_CALLBACK_URL"] == "/services/tabbi/oauth_callback"
    assert env["JUPYTERHUB_API_TOKEN"] == "<secret>"  # from a Secret, never a literal
    assert [ref["secretRef"]["name"] for ref in container["envFrom"]] == ["tabbi-secrets"]
    assert manifests["Service"]["spec"]["ports"][0]["port"] == 8765


def test_every_documented_setting_exists(manifests, tmp_path):
    """The ConfigMap's Python config loads, and each ``c.Class.trait`` it sets is a configurable
    trait of that class."""
    from tabbi_sandbox.modal import ModalProvider

    source = manifests["ConfigMap"]["data"]["jupyter_server_config.py"]
    (tmp_path / "jupyter_server_config.py").write_text(source)
    from traitlets.config.loader import PyFileConfigLoader

    config: Config = PyFileConfigLoader("jupyter_server_config.py", str(tmp_path)).load_config()
    classes = {cls.__name__: cls for cls in (TabbiExtension, ModalProvider, ConvexStore)}
    assert set(config) <= set(classes), set(config) - set(classes)
    for name, settings in config.items():
        traits = classes[name].class_traits(config=True)
        assert set(settings) <= set(traits), (name, set(settings) - set(traits))
    assert config.TabbiExtension.local_repo_roots == []


def test_the_secret_feeds_what_tabbi_reads_and_only_the_service():
    """The documented ``kubectl create secret`` keys are the environment variables tabbi's
    settings read (a typo would leave a secret unset, silently); the users' pods get none."""
    command = next(b for b in re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.S) if "tabbi-secrets" in b)
    keys = set(re.findall(r"--from-(?:literal|file)=([A-Z_]+)=", command))
    read = {"TABBI_LLM_API_KEY", "TABBI_ENCRYPTION_KEY", "TABBI_GITHUB_CLIENT_SECRET", "MODAL_TOKEN_ID",
            "MODAL_TOKEN_SECRET", "TABBI_CONVEX_JWT_KEY", "TABBI_CONVEX_SERVER_JWT_KEY"}
    assert keys == read
    sources = "".join(Path(m.__file__).read_text() for m in _modules())
    for key in keys - {"MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"}:
        assert f'"{key}"' in sources, f"{key} is read nowhere in tabbi"
    from modal.config import _SETTINGS  # Modal's client reads MODAL_<SETTING> itself

    assert {"token_id", "token_secret"} <= set(_SETTINGS)


def test_the_hub_values_grant_the_scope_route_the_service_and_keep_secrets_out(values):
    hub = values["hub"]
    service = hub["services"][SERVICE_NAME]
    assert service["url"] == "http://tabbi:8765" and service["oauth_client_id"] == "service-tabbi"
    assert service["oauth_redirect_uri"].endswith("/services/tabbi/oauth_callback")
    assert ACCESS in hub["loadRoles"]["user"]["scopes"]
    assert ACCESS in hub["extraConfig"]["tabbi"] and "tabbi_extension=False" in hub["extraConfig"]["tabbi"]
    assert hub["config"]["JupyterHub"]["public_url"].startswith("https://")
    singleuser = values["singleuser"]
    assert set(singleuser["extraEnv"]) == {SERVICE_URL_ENV}
    assert "tabbi-secrets" not in yaml.safe_dump(values)  # the team's Secret: the service's pod alone
    # The hub pod holds the service's hub token only.
    assert [e["valueFrom"]["secretKeyRef"]["name"] for e in hub["extraEnv"].values()] == ["tabbi-hub-token"]


def _modules():
    import tabbi_extension.app
    import tabbi_extension.store.convex
    import tabbi_sandbox.modal

    return tabbi_extension.app, tabbi_extension.store.convex, tabbi_sandbox.modal
