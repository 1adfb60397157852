"""``jupyter tabbi doctor``, run as the operator runs it: the real console script in a subprocess,
configured through a ``jupyter_server_config.json`` in its Jupyter config dir (the file the server
reads), against real bubblewrap and OpenCode, the scripted model, and the Convex and Modal
stand-ins. Each planted misconfiguration must be found by its own check (and nothing else
flagged), a healthy installation must pass with exit status 0, and no secret may be printed.

Several independent misconfigurations share one run (each check reports on its own), so the
module starts the command four times, not once per mistake.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from tabbi_extension.encryption import SecretBox
from tabbi_extension.github.accounts import PROVIDER as GITHUB_TOKENS
from tabbi_extension.store import SessionRecord, SQLiteStore
from tabbi_sandbox.binary import PINNED_VERSION
from tests.support.convex_standin import ConvexStandin, SigningKey
from tests.support.convex_store import STORE_CLASS, store_traits
from tests.support.llm import ScriptedLLM
from tests.support.modal_standin import ModalStandIn

pytestmark = pytest.mark.timeout(240)

BIN = Path(sys.executable).parent
GOOD_LLM_KEY = "sk-doctor-right-key-7d1c"
WRONG_LLM_KEY = "sk-doctor-wrong-key-93ab"
GITHUB_SECRET = "gh-secret-doctor-5e2f"
MALFORMED_KEY = "not-a-fernet-key-c0ffee"
URL_PASSWORD = "url-password-doctor-41aa"


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_doctor(tmp_path: Path, config: dict[str, Any], *args: str, env: dict[str, str] | None = None,
               command: tuple[str, ...] = (str(BIN / "jupyter-tabbi"), "doctor")) -> tuple[int, str]:
    """Run the doctor with ``config`` as the Jupyter server config; its exit status and output."""
    config_dir = tmp_path / "jupyter-config"
    config_dir.mkdir(exist_ok=True)
    (config_dir / "jupyter_server_config.json").write_text(json.dumps(config))
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("TABBI_", "MODAL_", "JUPYTER_")) and k not in ("OPENAI_API_KEY",
                                                                                  "ANTHROPIC_API_KEY")}
    full_env = {**clean, "JUPYTER_CONFIG_DIR": str(config_dir), "JUPYTER_PLATFORM_DIRS": "1",
                "JUPYTER_DATA_DIR": str(tmp_path / "jupyter-data"), **(env or {})}
    done = subprocess.run([*command, *args], capture_output=True, text=True, env=full_env, timeout=200)
    return done.returncode, done.stdout + done.stderr


def problems(output: str) -> dict[str, dict[str, Any]]:
    """The failed checks of a ``--json`` report, by name."""
    report = json.loads(output[output.index("{"):output.rindex("}") + 1])
    return {c["name"]: c for c in report["checks"] if c["status"] == "problem"}


def assert_no_secret(output: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in output, "the doctor printed a secret"


def plant_token(database: Path, key: bytes) -> None:
    """A session and its owner's GitHub token sealed with ``key``, as the server stores them."""

    async def plant() -> None:
        store = SQLiteStore(path=database)
        await store.open()
        await store.create_session(SessionRecord(id="ses-0123456789ab", owner="ada", repo="r",
                                                 work_branch="tabbi/x"))
        await store.put_token("ada", GITHUB_TOKENS, SecretBox([key]).encrypt(b'{"access_token": "t"}'))
        await store.close()

    database.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(plant())


@pytest.fixture(scope="module")
def keyed_llm():
    server = ScriptedLLM()
    server.key = GOOD_LLM_KEY  # answers 401 to any other key, as a real model API does
    server.start()
    yield server
    server.stop()


def test_planted_local_mistakes_are_each_found(tmp_path: Path):
    """A wrong OpenCode binary, a model endpoint that is down (its URL carrying a password, which
    must not be printed), a GitHub client id without its secret, an encryption key that does not
    decode, too little disk: five problems, exit 1."""
    fake = tmp_path / "opencode"
    fake.write_text("#!/bin/sh\necho 0.0.1\n")
    fake.chmod(0o755)
    config = {
        "TabbiExtension": {
            "data_dir": str(tmp_path / "data"), "opencode_bin": str(fake), "isolation": "none",
            "llm_base_url": f"http://proxy:{URL_PASSWORD}@127.0.0.1:{free_port()}/v1",
            "model": "scripted",
            "github_client_id": "Iv1.doctor", "encryption_key": MALFORMED_KEY,
        },
        "TabbiDoctor": {"min_free_disk_gb": 1e9},
    }
    code, output = run_doctor(tmp_path, config, "--json")
    assert code == 1, output
    found = problems(output)
    assert set(found) == {"opencode", "model", "github", "encryption key", "disk"}, output
    assert "0.0.1" in found["opencode"]["detail"] and PINNED_VERSION in found["opencode"]["detail"]
    assert "cannot be reached" in found["model"]["detail"]
    assert "github_client_secret" in found["github"]["fix"]
    assert "Fernet key" in found["encryption key"]["detail"]
    assert "GB free" in found["disk"]["detail"]
    assert_no_secret(output, MALFORMED_KEY, URL_PASSWORD)


def test_no_bubblewrap_a_refused_model_key_and_a_changed_encryption_key(tmp_path: Path, keyed_llm):
    """PATH without bwrap (isolation 'auto'), a model key the endpoint answers 401 to, and an
    encryption key that decodes but did not seal the token the store holds."""
    data = tmp_path / "data"
    plant_token(data / "tabbi.sqlite3", Fernet.generate_key())
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    other_key = Fernet.generate_key().decode()
    config = {
        "TabbiExtension": {
            "data_dir": str(data), "isolation": "auto", "llm_base_url": keyed_llm.url,
            "model": "scripted", "llm_api_key": WRONG_LLM_KEY, "encryption_key": other_key,
        },
        "TabbiDoctor": {"min_free_disk_gb": 0},
    }
    code, output = run_doctor(tmp_path, config, "--json", env={"PATH": str(empty_bin)})
    assert code == 1, output
    found = problems(output)
    assert set(found) == {"bubblewrap", "model", "encryption key"}, output
    assert "not installed" in found["bubblewrap"]["detail"]
    assert "refused the key (HTTP 401)" in found["model"]["detail"]
    assert "1 of 1 secrets" in found["encryption key"]["detail"]
    assert_no_secret(output, WRONG_LLM_KEY, other_key)


def test_convex_and_modal_down_or_refusing_then_answering(tmp_path: Path):
    """Convex (its stand-in) resetting every connection, and Modal (its stand-in) refusing the
    token secret the server has: the store and Modal checks fail, saying what to set. Then Convex
    answers but refuses a server key it does not know, while Modal takes the right token."""
    with ConvexStandin.start(timeout=180) as convex, ModalStandIn() as modal_api:
        convex.faults(outage=True)
        wrong_secret = "as-" + "0" * 32
        env = {**modal_api.env, "MODAL_TOKEN_SECRET": wrong_secret,
               "SSL_CERT_FILE": str(modal_api.ca_file)}
        config: dict[str, Any] = {
            "TabbiExtension": {
                "data_dir": str(tmp_path / "data"), "model": "demo",
                "store_class": STORE_CLASS,
                "sandbox_provider_class": "tabbi_sandbox.modal.ModalProvider",
            },
            "ConvexStore": store_traits(convex),
            "ModalProvider": {"publish_image": False},
            "TabbiDoctor": {"min_free_disk_gb": 0},
        }
        code, output = run_doctor(tmp_path, config, "--json", env=env)
        assert convex.stats()["reset_connections"] > 0
        assert code == 1, output
        found = problems(output)
        assert set(found) == {"store", "modal"}, output
        assert "ConvexStore does not answer" in found["store"]["detail"]
        assert "TABBI_CONVEX_URL" in found["store"]["fix"]
        assert "refused this server's credentials" in found["modal"]["detail"]
        assert "MODAL_TOKEN_SECRET" in found["modal"]["fix"]
        assert_no_secret(output, wrong_secret, convex.keys.server.private_pem.splitlines()[1])

        convex.faults()
        stranger = SigningKey.generate()
        config["ConvexStore"].update(server_jwt_key=stranger.private_pem, server_jwt_key_id=stranger.kid)
        code, output = run_doctor(tmp_path, config, "--json", env={**env, **modal_api.env})
    assert code == 1, output
    found = problems(output)
    assert set(found) == {"store"}, output  # Modal: the right token, the app found
    assert "the JWT was refused" in found["store"]["detail"], found
    assert_no_secret(output, stranger.private_pem.splitlines()[1], modal_api.env["MODAL_TOKEN_SECRET"])


def test_a_healthy_installation_passes(tmp_path: Path, keyed_llm):
    """Everything right (bubblewrap, the pinned OpenCode, the model answering with its key,
    GitHub id and secret, a key that decrypts the stored token): ``jupyter tabbi doctor`` says so
    line by line and exits 0."""
    key = Fernet.generate_key()
    data = tmp_path / "data"
    plant_token(data / "tabbi.sqlite3", key)
    config = {
        "TabbiExtension": {
            "data_dir": str(data), "isolation": "auto", "llm_base_url": keyed_llm.url,
            "model": "scripted", "llm_api_key": GOOD_LLM_KEY,
            "github_client_id": "Iv1.doctor", "github_client_secret": GITHUB_SECRET,
            "public_url": "https://jupyter.example.org/", "encryption_key": key.decode(),
        },
        "TabbiDoctor": {"min_free_disk_gb": 0},
    }
    code, output = run_doctor(tmp_path, config, command=(str(BIN / "jupyter"), "tabbi", "doctor"))
    assert code == 0, output
    for line in ("store: SQLiteStore answers", "bubblewrap: a trial sandbox ran",
                 f"is version {PINNED_VERSION}", "model: tabbi/scripted", "github: client id and secret",
                 "decrypts the 1 secrets sampled", "Everything checked is fine."):
        assert line in output, output
    assert_no_secret(output, GOOD_LLM_KEY, GITHUB_SECRET, key.decode())
