"""GitHub's OAuth protocol: the web flow (state + PKCE S256), the device flow, refresh and revoke.

Works for OAuth Apps (tokens that never expire) and GitHub Apps (user tokens that expire after
8 h with a rotating refresh token): whatever GitHub returns is normalized into a ``TokenSet``.
The web flow and refresh go through authlib; the device flow (which authlib's client does not
implement) and revocation are plain HTTP.
"""

from __future__ import annotations

import secrets
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from authlib.integrations.base_client.errors import OAuthError

with warnings.catch_warnings():  # authlib 1.9 announces its httpx integration's move to httpx2
    warnings.simplefilter("ignore")
    from authlib.integrations.httpx_client import AsyncOAuth2Client

from .rest import GitHubHosts

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_SCOPE = "repo read:user user:email"


class OAuthFailure(Exception):
    """GitHub refused (``error`` is its OAuth error code) or could not be reached."""

    def __init__(self, error: str, description: str = ""):
        super().__init__(description or error)
        self.error = error


@dataclass
class TokenSet:
    """One person's GitHub credentials, as stored (encrypted) in the store."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    expires_at: float | None = None
    refresh_expires_at: float | None = None
    scope: str = ""
    user: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_response(cls, data: dict[str, Any], now: float | None = None) -> TokenSet:
        now = time.time() if now is None else now
        if not data.get("access_token"):
            raise OAuthFailure("invalid_response", "GitHub's answer carried no access token")

        def at(seconds: object) -> float | None:
            return now + float(seconds) if seconds else None  # type: ignore[arg-type]

        return cls(
            access_token=str(data["access_token"]),
            refresh_token=data.get("refresh_token") or None,
            expires_at=at(data.get("expires_in")),
            refresh_expires_at=at(data.get("refresh_token_expires_in")),
            scope=str(data.get("scope") or ""),
        )

    def expires_within(self, seconds: float) -> bool:
        return self.expires_at is not None and self.expires_at - time.time() < seconds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class OAuthApp:
    client_id: str
    client_secret: str = field(repr=False)
    hosts: GitHubHosts = field(default_factory=GitHubHosts)
    scope: str = DEFAULT_SCOPE
    timeout: float = 30.0

    @property
    def authorize_url(self) -> str:
        return self.hosts.web + "/login/oauth/authorize"

    @property
    def token_url(self) -> str:
        return self.hosts.web + "/login/oauth/access_token"

    @property
    def device_url(self) -> str:
        return self.hosts.web + "/login/device/code"

    def _client(self, redirect_uri: str | None = None) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=self.client_id,
            client_secret=self.client_secret,
            scope=self.scope,
            redirect_uri=redirect_uri,
            code_challenge_method="S256",
            token_endpoint_auth_method="client_secret_post",
            timeout=self.timeout,
        )

    # -- web flow ----------------------------------------------------------------------------
    async def authorization_url(self, redirect_uri: str) -> tuple[str, str, str]:
        """``(url, state, code_verifier)``: send the person to ``url``; keep the rest secret."""
        verifier = secrets.token_urlsafe(64)
        async with self._client(redirect_uri) as client:
            url, state = client.create_authorization_url(self.authorize_url, code_verifier=verifier)
        return url, state, verifier

    async def exchange_code(self, code: str, verifier: str, redirect_uri: str) -> TokenSet:
        async with self._client(redirect_uri) as client:
            return TokenSet.from_response(
                await self._call(client.fetch_token(self.token_url, code=code, code_verifier=verifier))
            )

    async def refresh(self, refresh_token: str) -> TokenSet:
        async with self._client() as client:
            return TokenSet.from_response(
                await self._call(client.refresh_token(self.token_url, refresh_token=refresh_token))
            )

    @staticmethod
    async def _call(awaitable: Any) -> dict[str, Any]:
        try:
            return dict(await awaitable)
        except OAuthError as exc:
            raise OAuthFailure(exc.error or "oauth_error", exc.description or "") from None
        except httpx.HTTPError as exc:
            raise OAuthFailure("unreachable", f"GitHub could not be reached ({type(exc).__name__})") from None

    # -- device flow -------------------------------------------------------------------------
    async def start_device(self) -> dict[str, Any]:
        """``{device_code, user_code, verification_uri, expires_in, interval}``."""
        data = await self._post_form(self.device_url, {"client_id": self.client_id, "scope": self.scope})
        if data.get("error") or not data.get("device_code"):
            raise OAuthFailure(
                str(data.get("error") or "invalid_response"),
                str(data.get("error_description") or "no device code in GitHub's answer"),
            )
        return data

    async def poll_device(self, device_code: str) -> dict[str, Any]:
        """One poll: GitHub's answer, an ``error`` of ``authorization_pending`` / ``slow_down`` /
        ``expired_token`` / ``access_denied`` or a token."""
        return await self._post_form(
            self.token_url,
            {"client_id": self.client_id, "device_code": device_code, "grant_type": DEVICE_GRANT},
        )

    # -- revocation --------------------------------------------------------------------------
    async def revoke(self, access_token: str) -> bool:
        """Delete the app's grant for this token (GitHub's ``DELETE /applications/{id}/grant``)."""
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.request(
                    "DELETE",
                    f"{self.hosts.api}/applications/{self.client_id}/grant",
                    auth=(self.client_id, self.client_secret),
                    json={"access_token": access_token},
                    headers={"Accept": "application/vnd.github+json"},
                )
        except httpx.HTTPError:
            return False
        return response.status_code in (204, 404)  # 404: already gone

    async def _post_form(self, url: str, form: dict[str, str]) -> dict[str, Any]:
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.post(url, data=form, headers={"Accept": "application/json"})
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise OAuthFailure("unreachable", f"GitHub could not be reached ({type(exc).__name__})") from None
