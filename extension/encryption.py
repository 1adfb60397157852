"""Encryption at rest for secrets in the store (GitHub tokens).

The store only ever sees ciphertext: a stolen database file (or a Convex export) holds no usable
token without the key. The key comes from configuration (``TABBI_ENCRYPTION_KEY``); a single-user
install that sets none gets one generated into its data dir, readable by the owner only. Several
comma-separated keys may be given: the first encrypts, all decrypt, so a key can be rotated.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

KEY_FILE = "encryption.key"


class EncryptionKeyError(RuntimeError):
    """The deployment's key is missing or malformed; the message says what to set."""


class SecretBox:
    """Symmetric, authenticated encryption (Fernet: AES-128-CBC + HMAC-SHA256)."""

    def __init__(self, keys: list[bytes]):
        if not keys:
            raise EncryptionKeyError("no encryption key given")
        try:
            self._fernet = MultiFernet([Fernet(k) for k in keys])
        except (ValueError, TypeError) as exc:
            raise EncryptionKeyError(
                "TABBI_ENCRYPTION_KEY must be a Fernet key (32 url-safe base64-encoded bytes), "
                "for example the output of: python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())'"
            ) from exc

    def encrypt(self, plaintext: bytes) -> bytes:
        return self._fernet.encrypt(plaintext)

    def decrypt(self, ciphertext: bytes) -> bytes | None:
        """The plaintext, or None when no key of ours made this ciphertext (key rotated away)."""
        try:
            return self._fernet.decrypt(ciphertext)
        except InvalidToken:
            return None


def load(configured: str | None, data_dir: Path, generate: bool) -> SecretBox:
    """The box for ``configured`` keys, else the data dir's key file, else (when ``generate``,
    i.e. single-user) a new key written there with mode 0600. A multi-user deployment must set
    a key: a generated one would live next to the database it protects."""
    if configured:
        return SecretBox([k.strip().encode() for k in configured.split(",") if k.strip()])
    path = data_dir / KEY_FILE
    if path.exists():
        return SecretBox([path.read_bytes().strip()])
    if not generate:
        raise EncryptionKeyError(
            "tabbi needs an encryption key for GitHub tokens on a multi-user server: set "
            "TABBI_ENCRYPTION_KEY (or c.TabbiExtension.encryption_key) from your secrets"
        )
    key = Fernet.generate_key()
    # Written whole under a temporary name, then linked into place: a concurrent server process
    # either wins (and we use its key) or loses, but never reads a half-written file.
    partial = data_dir / f".{KEY_FILE}.{os.getpid()}.partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
    try:
        os.link(partial, path)
    except FileExistsError:
        return SecretBox([path.read_bytes().strip()])
    finally:
        partial.unlink()
    return SecretBox([key])
