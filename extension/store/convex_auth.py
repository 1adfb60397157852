"""Short-lived JWTs the tabbi server signs for Convex's custom-JWT auth (``convex/API.md``).

Why signed here rather than a deploy key: the deploy key is an admin credential of the whole
deployment; a per-user JWT reaches one person's rows for a few minutes, and Convex checks it next
to the data. Two roles, told apart by the verified issuer: a user (``iss`` = the issuer, ``sub`` =
the Jupyter user name) and the server (``iss`` = issuer + ``/server``) for leases, claims and the
start-up listing of every session.

ES256 (ECDSA P-256, SHA-256) is signed with ``cryptography`` directly: a JWT is three base64url
parts, and the one subtle step, JOSE's fixed-width ``r || s`` signature instead of DER, is
``_jose_signature``. ``python -m tabbi_extension.store.convex_auth jwks KEY.pem [KID] --uri``
prints the public key set for the deployment's ``TABBI_JWT_JWKS`` (``docs/deploy-convex.md``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

#: Seconds a token is valid, and how long before its expiry a fresh one replaces it. Convex
#: refuses tokens valid longer than 10 minutes (``convex/API.md``).
LIFETIME = 300.0
RENEW_BEFORE = 60.0


class SigningKeyError(ValueError):
    """The configured signing key is missing or not an ES256 (P-256) private key."""


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def load_private_key(value: str) -> ec.EllipticCurvePrivateKey:
    """The P-256 private key in ``value``: PEM text, or the path of a PEM file."""
    text = value.strip()
    if not text:
        raise SigningKeyError("no signing key is configured")
    if not text.startswith("-----BEGIN"):
        try:
            text = Path(text).expanduser().read_text()
        except OSError as exc:
            raise SigningKeyError(f"the signing key file cannot be read: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"the signing key is not a PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SigningKeyError("the signing key must be an EC P-256 key (ES256)")
    return key


def _public_members(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    return {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64url(numbers.x.to_bytes(32, "big")),
        "y": _b64url(numbers.y.to_bytes(32, "big")),
    }


def thumbprint(key: ec.EllipticCurvePrivateKey) -> str:
    """RFC 7638 thumbprint of the public key: a key id both sides can compute from the key."""
    canonical = json.dumps(_public_members(key), separators=(",", ":"), sort_keys=True).encode()
    return _b64url(hashlib.sha256(canonical).digest())


def public_jwk(key: ec.EllipticCurvePrivateKey, kid: str | None = None) -> dict[str, str]:
    """The public half as a JWK, ``kid`` defaulting to its RFC 7638 thumbprint."""
    return {**_public_members(key), "kid": kid or thumbprint(key), "alg": "ES256", "use": "sig"}


def _jose_signature(der: bytes) -> bytes:
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def sign(claims: dict[str, object], key: ec.EllipticCurvePrivateKey, kid: str) -> str:
    """A compact ES256 JWS of ``claims``."""
    header = {"alg": "ES256", "typ": "JWT", "kid": kid}
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    der = key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    return f"{signing_input}.{_b64url(_jose_signature(der))}"


@dataclass
class TokenSigner:
    """Signs one role's tokens (one issuer, one key) and keeps each subject's token until shortly
    before it expires: a busy session costs one signature per four minutes, not one per call."""

    key: ec.EllipticCurvePrivateKey
    issuer: str
    audience: str
    kid: str
    lifetime: float = LIFETIME
    renew_before: float = RENEW_BEFORE
    _cache: dict[str, tuple[str, float]] = field(default_factory=dict, repr=False)

    def token(self, subject: str) -> str:
        now = time.time()
        cached = self._cache.get(subject)
        if cached is not None and cached[1] - self.renew_before > now:
            return cached[0]
        issued = int(now)
        expires = issued + int(self.lifetime)
        claims = {"iss": self.issuer, "sub": subject, "aud": self.audience, "iat": issued,
                  "exp": expires}
        token = sign(claims, self.key, self.kid)
        if len(self._cache) > 1000:  # many people over a long run: drop the expired ones
            self._cache = {s: c for s, c in self._cache.items() if c[1] > now}
        self._cache[subject] = (token, expires)
        return token

    def forget(self, subject: str) -> None:
        """Drop the cached token (Convex refused it: a rotated key, a skewed clock)."""
        self._cache.pop(subject, None)


def jwks_data_uri(jwks: dict[str, object]) -> str:
    """A key set as the ``data:`` URI a deployment's ``TABBI_JWT_JWKS`` holds."""
    return "data:text/plain;charset=utf-8;base64," + base64.b64encode(json.dumps(jwks).encode()).decode()


def main(argv: list[str]) -> int:
    """``jwks KEY [KID] [--uri]``: print the public JWKS of a private key file for the
    deployment (``--uri``: as the data URI ``npx convex env set TABBI_JWT_JWKS`` takes)."""
    uri = "--uri" in argv
    args = [a for a in argv if a != "--uri"]
    if len(args) not in (2, 3) or args[0] != "jwks":
        print("usage: python -m tabbi_extension.store.convex_auth jwks KEY.pem [KID] [--uri]",
              file=sys.stderr)
        return 2
    try:
        key = load_private_key(args[1])
    except SigningKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    jwks = {"keys": [public_jwk(key, args[2] if len(args) == 3 else None)]}
    print(jwks_data_uri(jwks) if uri else json.dumps(jwks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
