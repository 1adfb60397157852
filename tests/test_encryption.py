"""The encryption key for tokens at rest: where it comes from, and refusing to run without one.

Threat: a database file (or backup) read by someone else. Tokens in it are ciphertext; the key
lives in config/env, or (single-user) in a 0600 file only the owner can read. A multi-user server
with no key must not quietly generate one next to the database it protects.
"""

from __future__ import annotations

import stat

import pytest
from cryptography.fernet import Fernet

from tabbi_extension import encryption
from tests.support.server import JupyterProcess


def test_single_user_key_is_generated_once_with_owner_only_permissions(tmp_path):
    box = encryption.load(None, tmp_path, generate=True)
    key_file = tmp_path / encryption.KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    sealed = box.encrypt(b"gho_secret")
    assert b"gho_secret" not in sealed
    assert encryption.load(None, tmp_path, generate=True).decrypt(sealed) == b"gho_secret"
    assert key_file.read_bytes().count(b"\n") == 1


def test_keys_rotate_and_bad_keys_are_explained(tmp_path):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    sealed = encryption.load(old, tmp_path, generate=False).encrypt(b"token")
    rotated = encryption.load(f"{new},{old}", tmp_path, generate=False)
    assert rotated.decrypt(sealed) == b"token"
    assert encryption.load(new, tmp_path, generate=False).decrypt(sealed) is None  # old key gone
    with pytest.raises(encryption.EncryptionKeyError, match="Fernet key"):
        encryption.load("not-a-key", tmp_path, generate=False)
    with pytest.raises(encryption.EncryptionKeyError, match="TABBI_ENCRYPTION_KEY"):
        encryption.load(None, tmp_path / "empty", generate=False)


@pytest.mark.tabbi(single_user=True, github_client_id="Iv1.x", github_client_secret="s")
async def test_single_user_server_makes_its_key_in_the_data_dir(api, data_dir):
    assert (await api.ok("GET", "tabbi/api/github/user"))["configured"] is True
    assert stat.S_IMODE((data_dir / encryption.KEY_FILE).stat().st_mode) == 0o600


def test_multi_user_server_without_a_key_refuses_to_start(llm, tmp_path):
    with pytest.raises(RuntimeError) as failed:
        JupyterProcess(llm.url, tmp_path, extra=[
            "--TabbiExtension.single_user=False", "--TabbiExtension.github_client_id=Iv1.x",
        ])
    assert "set TABBI_ENCRYPTION_KEY" in str(failed.value)
    assert "jupyter exited" in str(failed.value)
