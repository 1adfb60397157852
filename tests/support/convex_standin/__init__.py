"""The loopback Convex stand-in, from Python: start it, sign JWTs it accepts, flip its faults.

``server.mts`` (next to this file) runs tabbi's real Convex functions (``convex/functions``)
through convex-test and serves Convex's HTTP API on 127.0.0.1. This module starts it with tsx on
a free port (the server picks it and prints it), waits until it answers, and stops it. Every
start makes fresh ES256 key pairs, one for user tokens and one for server tokens, and hands the
stand-in their public key sets as the deployment's ``TABBI_JWT_JWKS`` / ``TABBI_SERVER_JWT_JWKS``
(``data:`` URIs), exactly as a real deployment is configured (docs/deploy-convex.md). The private
keys stay here: ``user_token``/``server_token`` sign with them, and ``keys`` gives them to a
``ConvexStore`` under test.

Use the ``convex_standin`` fixture (import it into a test module) or ``ConvexStandin.start()``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.support.server import OutputWatch

HERE = Path(__file__).resolve().parent
CONVEX_DIR = HERE.parents[2] / "convex"
TSX = CONVEX_DIR / "node_modules" / ".bin" / "tsx"
ISSUER = "https://tabbi.standin.test"
AUDIENCE = "tabbi"
TOKEN_SECONDS = 300


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class SigningKey:
    """An ES256 key: the private half signs, the public half goes into the deployment's JWKS."""

    kid: str
    private_pem: str

    @classmethod
    def generate(cls) -> SigningKey:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        return cls(kid=uuid.uuid4().hex[:16], private_pem=pem)

    def _key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.private_pem.encode(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def jwks_data_uri(self) -> str:
        numbers = self._key().public_key().public_numbers()
        jwk = {
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
            "x": _b64url(numbers.x.to_bytes(32, "big")),
            "y": _b64url(numbers.y.to_bytes(32, "big")),
        }
        key_set = json.dumps({"keys": [jwk]}).encode()
        # The form Convex's own Better Auth integration hands a customJwt provider.
        return "data:text/plain;charset=utf-8;base64," + base64.b64encode(key_set).decode()

    def sign(self, claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
        head = {"alg": "ES256", "typ": "JWT", "kid": self.kid, **(header or {})}
        signing_input = f"{_b64url(json.dumps(head).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self._key().sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


@dataclass(frozen=True)
class StandinKeys:
    """What a tabbi server needs to talk to this deployment (docs/deploy-convex.md)."""

    issuer: str
    audience: str
    user: SigningKey
    server: SigningKey

    @property
    def server_issuer(self) -> str:
        return self.issuer + "/server"


class ConvexStandin:
    """A running stand-in. ``url`` is its deployment URL (``http://127.0.0.1:PORT``)."""

    def __init__(self, proc: subprocess.Popen, url: str, keys: StandinKeys, admin_token: str, log_path: Path):
        self._proc = proc
        self.url = url
        self.keys = keys
        self._admin = {"X-Standin-Admin": admin_token}
        self.log_path = log_path
        self._http = httpx.Client(base_url=url, timeout=30)

    @classmethod
    def start(cls, timeout: float = 60.0) -> ConvexStandin:
        if not TSX.exists():
            raise RuntimeError(f"{TSX} is missing: run scripts/setup.sh (npm ci in convex/)")
        keys = StandinKeys(ISSUER, AUDIENCE, SigningKey.generate(), SigningKey.generate())
        admin_token = secrets.token_hex(16)
        env = {
            **os.environ,
            "STANDIN_PORT": "0",
            "STANDIN_ADMIN_TOKEN": admin_token,
            "TABBI_JWT_ISSUER": keys.issuer,
            "TABBI_JWT_APPLICATION_ID": keys.audience,
            "TABBI_JWT_JWKS": keys.user.jwks_data_uri(),
            "TABBI_SERVER_JWT_JWKS": keys.server.jwks_data_uri(),
        }
        fd, log_name = tempfile.mkstemp(prefix="convex-standin-", suffix=".log")
        os.close(fd)
        log_path = Path(log_name)
        proc = subprocess.Popen(
            [str(TSX), str(HERE / "server.mts")], cwd=CONVEX_DIR, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        watch = OutputWatch(proc, log_path)
        if not watch.wait_for("listening ", timeout):
            proc.kill()
            proc.wait()
            raise RuntimeError(f"the Convex stand-in did not start:\n{log_path.read_text()}")
        lines = log_path.read_text().splitlines()
        port = next(int(line.split()[1]) for line in lines if line.startswith("listening "))
        standin = cls(proc, f"http://127.0.0.1:{port}", keys, admin_token, log_path)
        standin._wait_answering(timeout)
        return standin

    def _wait_answering(self, timeout: float) -> None:
        """Until a function call answers (the port is open once it listens; this checks the
        functions load)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ping = {"path": "health:ping", "args": {}, "format": "json"}
                reply = self._http.post("/api/query", json=ping)
                if reply.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Convex stand-in does not answer:\n{self.log_path.read_text()}")
            self._wait_exit(0.05)  # a poll interval, not synchronization: exits early if it died

    def _wait_exit(self, seconds: float) -> None:
        try:
            self._proc.wait(seconds)
        except subprocess.TimeoutExpired:
            return
        raise RuntimeError(f"the Convex stand-in exited:\n{self.log_path.read_text()}")

    # -- tokens ---------------------------------------------------------------------------------
    def user_token(self, username: str, seconds: int = TOKEN_SECONDS, **claims: Any) -> str:
        """A user JWT the deployment accepts (``claims`` override or add any claim)."""
        now = int(time.time())
        return self.keys.user.sign({
            "iss": self.keys.issuer, "sub": username, "aud": self.keys.audience,
            "iat": now, "exp": now + seconds, **claims,
        })

    def server_token(self, server_id: str, seconds: int = TOKEN_SECONDS, **claims: Any) -> str:
        """A server JWT (role: leases, claims, recovery) the deployment accepts."""
        now = int(time.time())
        return self.keys.server.sign({
            "iss": self.keys.server_issuer, "sub": server_id, "aud": self.keys.audience,
            "iat": now, "exp": now + seconds, **claims,
        })

    # -- switches -------------------------------------------------------------------------------
    def faults(self, **switches: Any) -> dict[str, Any]:
        """Set the fault switches (all others off): ``latency_ms``, ``error_rate`` (0..1),
        ``fail_next`` (the next N calls), ``status`` (default 503), ``error_phase``
        ("before": nothing runs; "after": the function ran, the answer is lost), ``outage``
        (connections reset), ``no_answer`` (the function runs, no answer ever comes: the client
        times out). ``faults()`` turns everything off."""
        reply = self._http.post("/_standin/faults", json=switches, headers=self._admin)
        reply.raise_for_status()
        return reply.json()

    def stats(self) -> dict[str, Any]:
        """``{"calls": {"events:append": n, ...}, "faulted", "reset_connections", "unanswered",
        "faults"}``: calls counts the functions that ran."""
        reply = self._http.get("/_standin/stats", headers=self._admin)
        reply.raise_for_status()
        return reply.json()

    def reset(self) -> None:
        """An empty deployment, no faults, zeroed stats."""
        self._http.post("/_standin/reset", headers=self._admin).raise_for_status()

    def stop(self) -> None:
        self._http.close()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> ConvexStandin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def convex_standin() -> Iterator[ConvexStandin]:
    """One stand-in per test module (import this fixture into the module); ``reset()`` it
    between tests that need an empty deployment."""
    with ConvexStandin.start() as standin:
        yield standin
