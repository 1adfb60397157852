"""Each person's GitHub account: sign-ins in progress, the token (encrypted in the store and
refreshed before it expires), and the calls made on the person's behalf.

The token stays in this server process. Everything handed out (to the kernel, the browser, a
sandbox's clone or push) is either public (login, name, links) or a one-shot credential for one
git process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from ..encryption import SecretBox
from ..store import Store
from .oauth import OAuthApp, OAuthFailure, TokenSet
from .rest import GitHubAPIError, GitHubHosts, GitHubREST

log = logging.getLogger(__name__)

PROVIDER = "github"
#: Refresh an expiring token this long before it expires.
REFRESH_MARGIN = 300.0
#: How long a claim to refresh a token holds before another process may take over (a refresh
#: takes one OAuth call; a claim outliving this means its process died mid-refresh).
REFRESH_CLAIM_SECONDS = 90.0
#: How long a web sign-in may take from link to callback.
WEB_LOGIN_SECONDS = 600.0


class GitHubError(Exception):
    """Something the person can act on; ``status`` is the HTTP status to answer with."""

    reason = "github_error"

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status


class LoginRequired(GitHubError):
    reason = "login_required"

    def __init__(self, message: str = "Sign in to GitHub first: %tabbi login"):
        super().__init__(message, 403)


@dataclass
class LoginAttempt:
    id: str
    owner: str
    flow: str  # "web" | "device"
    expires_at: float
    status: str = "pending"  # "pending" | "done" | "failed"
    error: str | None = None
    login: str | None = None
    url: str | None = None  # where the person goes: the authorize URL or the device page
    user_code: str | None = None
    state: str | None = field(default=None, repr=False)
    verifier: str | None = field(default=None, repr=False)
    redirect_uri: str | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    def public(self) -> dict[str, Any]:
        return {
            "login_id": self.id,
            "flow": self.flow,
            "status": self.status,
            "error": self.error,
            "login": self.login,
            "url": self.url,
            "user_code": self.user_code,
            "expires_in": max(0, round(self.expires_at - time.time())),
        }


@dataclass(frozen=True)
class GitAccess:
    """What a clone or push needs: a credential for one git process, and whom to commit as."""

    credential: dict[str, str] = field(repr=False)
    name: str
    email: str


class GitHubAccounts:
    def __init__(self, store: Store, box: SecretBox | None, app: OAuthApp | None, hosts: GitHubHosts):
        self.store = store
        self.box = box
        self.app = app
        self.hosts = hosts
        self._attempts: dict[str, LoginAttempt] = {}
        self._refresh_locks: dict[str, asyncio.Lock] = {}

    @property
    def configured(self) -> bool:
        return self.app is not None and self.box is not None

    def _require_app(self) -> OAuthApp:
        if self.app is None or self.box is None:
            raise GitHubError(
                "GitHub sign-in is not configured on this server: set TABBI_GITHUB_CLIENT_ID and "
                "TABBI_GITHUB_CLIENT_SECRET (an OAuth App or a GitHub App)",
                501,
            )
        return self.app

    # -- sign-in -----------------------------------------------------------------------------
    async def begin_login(self, owner: str, flow: str, redirect_uri: str) -> LoginAttempt:
        app = self._require_app()
        self._forget_expired()
        attempt_id = secrets.token_urlsafe(16)
        if flow == "web":
            url, state, verifier = await app.authorization_url(redirect_uri)
            attempt = LoginAttempt(
                attempt_id,
                owner,
                "web",
                time.time() + WEB_LOGIN_SECONDS,
                url=url,
                state=state,
                verifier=verifier,
                redirect_uri=redirect_uri,
            )
        else:
            try:
                device = await app.start_device()
            except OAuthFailure as exc:
                raise GitHubError(f"GitHub refused the device sign-in: {exc}", 502) from None
            attempt = LoginAttempt(
                attempt_id,
                owner,
                "device",
                time.time() + float(device.get("expires_in") or 900),
                url=str(device.get("verification_uri") or self.hosts.web + "/login/device"),
                user_code=str(device.get("user_code") or ""),
            )
            interval = max(float(device.get("interval", 5)), 0.5)
            poll = self._poll_device(attempt, str(device["device_code"]), interval)
            attempt.task = asyncio.ensure_future(poll)
        self._attempts[attempt.id] = attempt
        return attempt

    async def finish_web(self, owner: str, state: str, code: str, error: str | None) -> LoginAttempt:
        """The OAuth callback. Only a state this server issued, to this same person, still
        pending, is accepted (CSRF: a callback with someone else's code must not sign anyone in)."""
        attempt = next(
            (
                a
                for a in self._attempts.values()
                if a.flow == "web" and a.state and secrets.compare_digest(a.state, state)
            ),
            None,
        )
        if attempt is None or attempt.owner != owner or attempt.status != "pending":
            raise GitHubError(
                "this sign-in link is not valid or was already used; run %tabbi login again", 400
            )
        if attempt.expires_at < time.time():
            self._fail(attempt, "the sign-in took too long; run %tabbi login again")
            raise GitHubError(attempt.error or "", 400)
        if error:
            self._fail(attempt, f"GitHub did not sign you in ({error})")
            return attempt
        if not code:
            raise GitHubError("the callback carries no code", 400)
        verifier, attempt.state, attempt.verifier = attempt.verifier, None, None  # used once
        try:
            assert verifier and attempt.redirect_uri
            tokens = await self._require_app().exchange_code(code, verifier, attempt.redirect_uri)
            await self._complete(attempt, tokens)
        except (OAuthFailure, GitHubAPIError) as exc:
            self._fail(attempt, f"GitHub refused the sign-in: {exc}")
        return attempt

    async def _poll_device(self, attempt: LoginAttempt, device_code: str, interval: float) -> None:
        app = self._require_app()
        try:
            while time.time() < attempt.expires_at:
                # The protocol's own rate limit (RFC 8628 §3.5), not synchronization.
                await asyncio.sleep(interval)
                answer = await app.poll_device(device_code)
                error = answer.get("error")
                if error == "authorization_pending":
                    continue
                if error == "slow_down":
                    interval = float(answer.get("interval") or interval + 5)
                    continue
                if error:
                    reason = {"expired_token": "the code expired", "access_denied": "access was denied"}
                    self._fail(attempt, f"GitHub did not sign you in: {reason.get(error, error)}")
                    return
                await self._complete(attempt, TokenSet.from_response(answer))
                return
            self._fail(attempt, "the device code expired; run %tabbi login again")
        except (OAuthFailure, GitHubAPIError) as exc:
            self._fail(attempt, f"GitHub sign-in failed: {exc}")
        except asyncio.CancelledError:
            self._fail(attempt, "the sign-in was cancelled")
            raise
        except Exception as exc:  # anything else still ends the sign-in, never leaves it pending
            log.warning("tabbi: device sign-in of %s failed", attempt.owner, exc_info=True)
            self._fail(attempt, f"GitHub sign-in failed ({type(exc).__name__})")

    async def _complete(self, attempt: LoginAttempt, tokens: TokenSet) -> None:
        async with GitHubREST(self.hosts, tokens.access_token) as api:
            user = await api.user()
        tokens.user = {k: user.get(k) for k in ("login", "id", "name", "email")}
        await self._save(attempt.owner, tokens)
        attempt.status, attempt.login = "done", tokens.user["login"]
        attempt.state = attempt.verifier = None
        attempt.finished.set()
        log.info("tabbi: %s signed in to GitHub as %s", attempt.owner, attempt.login)

    def _fail(self, attempt: LoginAttempt, message: str) -> None:
        attempt.status, attempt.error = "failed", message
        attempt.state = attempt.verifier = None
        attempt.finished.set()

    async def login_status(self, owner: str, attempt_id: str, wait: float = 0) -> LoginAttempt:
        attempt = self._attempts.get(attempt_id)
        if attempt is None or attempt.owner != owner:
            raise GitHubError("no such sign-in in progress", 404)
        if attempt.status == "pending" and wait > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(attempt.finished.wait(), wait)
        return attempt

    def _forget_expired(self) -> None:
        now = time.time()
        for key, attempt in list(self._attempts.items()):
            if attempt.expires_at + 300 < now:
                if attempt.task is not None:
                    attempt.task.cancel()
                del self._attempts[key]

    async def logout(self, owner: str) -> dict[str, Any]:
        for attempt in self._attempts.values():
            if attempt.owner == owner and attempt.status == "pending":
                if attempt.task is not None:
                    attempt.task.cancel()
                self._fail(attempt, "signed out")
        async with self._refresh_lock(owner):  # a refresh in flight must not bring it back
            tokens = await self._load(owner)
            await self.store.delete_token(owner, PROVIDER)
        revoked = bool(tokens and self.app and await self.app.revoke(tokens.access_token))
        return {"signed_in": False, "revoked": revoked, "was": tokens.user.get("login") if tokens else None}

    async def close(self) -> None:
        tasks = [a.task for a in self._attempts.values() if a.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _refresh_lock(self, owner: str) -> asyncio.Lock:
        return self._refresh_locks.setdefault(owner, asyncio.Lock())

    # -- the token ---------------------------------------------------------------------------
    def _seal(self, tokens: TokenSet, refresh_claim: float | None = None) -> bytes:
        """The stored form: encrypted JSON, with the deadline of a refresh in progress, if any."""
        assert self.box is not None
        data = tokens.to_dict()
        if refresh_claim is not None:
            data["refresh_claim"] = refresh_claim
        return self.box.encrypt(json.dumps(data).encode())

    async def _save(self, owner: str, tokens: TokenSet) -> None:
        await self.store.put_token(owner, PROVIDER, self._seal(tokens))

    async def _read(self, owner: str) -> tuple[bytes, TokenSet, float | None] | None:
        """The stored ciphertext (for compare-and-swap), the tokens, and until when a refresh
        claimed by some server process holds (None: no refresh in progress)."""
        if self.box is None:
            return None
        ciphertext = await self.store.get_token(owner, PROVIDER)
        if ciphertext is None:
            return None
        plaintext = self.box.decrypt(ciphertext)
        if plaintext is None:
            log.warning("tabbi: %s's GitHub token was encrypted with another key; sign-in needed", owner)
            return None
        data = json.loads(plaintext)
        claim = data.pop("refresh_claim", None)
        return ciphertext, TokenSet(**data), claim

    async def _load(self, owner: str) -> TokenSet | None:
        stored = await self._read(owner)
        return stored[1] if stored else None

    async def tokens(self, owner: str) -> TokenSet | None:
        """The person's tokens, refreshed first when they expire within ``REFRESH_MARGIN``.
        A refresh GitHub refuses deletes them and raises ``LoginRequired``.

        GitHub's refresh tokens are single-use (each refresh rotates them), so of several server
        processes sharing the store only one may refresh: it claims the refresh with a
        compare-and-swap on the stored token, the others wait for its result and use the new
        token (a second refresh with the spent refresh token would fail and sign the person
        out). The lock only keeps this process's own callers from queueing up on the store."""
        tokens = await self._load(owner)
        if tokens is None or not tokens.expires_within(REFRESH_MARGIN):
            return tokens
        expiring = tokens.access_token
        async with self._refresh_lock(owner):
            delay = 0.05
            while True:
                stored = await self._read(owner)
                if stored is None:
                    return None
                ciphertext, tokens, claim = stored
                if tokens.access_token != expiring or not tokens.expires_within(REFRESH_MARGIN):
                    return tokens  # refreshed meanwhile (here or by another process)
                if claim is None or claim < time.time():
                    claimed = self._seal(tokens, refresh_claim=time.time() + REFRESH_CLAIM_SECONDS)
                    if await self.store.swap_token(owner, PROVIDER, ciphertext, claimed):
                        return await self._refresh(owner, tokens, claimed)
                    continue  # it changed under us: look again
                # Another process is refreshing: poll the store for its result (the store has no
                # notifications); its claim expires if that process died.
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _refresh(self, owner: str, tokens: TokenSet, claimed: bytes) -> TokenSet:
        """Spend the refresh token; this process holds the claim (the stored ``claimed``)."""
        expired = tokens.refresh_expires_at is not None and tokens.refresh_expires_at < time.time()
        if not tokens.refresh_token or expired:
            await self.store.swap_token(owner, PROVIDER, claimed, None)
            raise LoginRequired("Your GitHub sign-in expired: run %tabbi login again")
        try:
            fresh = await self._require_app().refresh(tokens.refresh_token)
        except OAuthFailure as exc:
            if exc.error == "unreachable":  # the refresh token was not spent: give the claim back
                await self.store.swap_token(owner, PROVIDER, claimed, self._seal(tokens))
                raise GitHubError(str(exc), 502) from None
            await self.store.swap_token(owner, PROVIDER, claimed, None)
            log.info("tabbi: %s's GitHub token could not be refreshed (%s)", owner, exc.error)
            raise LoginRequired(
                "Your GitHub sign-in expired and could not be renewed: run %tabbi login again"
            ) from None
        except BaseException:  # cancelled mid-call: others need not wait for the claim to expire
            with contextlib.suppress(Exception):
                await self.store.swap_token(owner, PROVIDER, claimed, self._seal(tokens))
            raise
        fresh.user = tokens.user
        # The refresh token rotated: keep the new one, unless the person signed out meanwhile.
        if not await self.store.swap_token(owner, PROVIDER, claimed, self._seal(fresh)):
            log.info("tabbi: %s's GitHub token changed during its refresh; the new one is not kept", owner)
        return fresh

    async def _require_tokens(self, owner: str) -> TokenSet:
        tokens = await self.tokens(owner)
        if tokens is None:
            raise LoginRequired()
        return tokens

    async def whoami(self, owner: str) -> dict[str, Any]:
        tokens = await self.tokens(owner)
        if tokens is None:
            return {"signed_in": False, "configured": self.configured}
        return {
            "signed_in": True,
            "configured": self.configured,
            "login": tokens.user.get("login"),
            "name": tokens.user.get("name"),
            "expires_at": tokens.expires_at,
            "host": self.hosts.web,
        }

    async def git_access(self, owner: str) -> GitAccess | None:
        """A credential for one clone or push, or None when the person is not signed in."""
        tokens = await self.tokens(owner)
        if tokens is None:
            return None
        user = tokens.user
        return GitAccess(
            credential={"username": "x-access-token", "password": tokens.access_token},
            name=user.get("name") or user.get("login") or owner,
            email=self.hosts.noreply_email(user),
        )

    # -- calls on the person's behalf --------------------------------------------------------
    async def api(self, owner: str) -> GitHubREST:
        tokens = await self._require_tokens(owner)
        return GitHubREST(self.hosts, tokens.access_token)

    async def repos(self, owner: str, query: str = "") -> list[dict[str, Any]]:
        """Every reachable repository, newest push first, filtered by ``query`` (a substring of
        the name or description, case-insensitive)."""
        async with await self.api(owner) as api:
            repos = await self._call(api.repos())
        needle = query.strip().lower()
        rows = [
            {
                "full_name": r.get("full_name"),
                "private": bool(r.get("private")),
                "description": r.get("description") or "",
                "pushed_at": r.get("pushed_at") or r.get("updated_at") or "",
                "default_branch": r.get("default_branch"),
                "html_url": r.get("html_url"),
            }
            for r in repos
        ]
        if needle:
            rows = [r for r in rows if needle in f"{r['full_name']} {r['description']}".lower()]
        rows.sort(key=lambda r: r["pushed_at"], reverse=True)
        return rows

    async def pull_request(
        self, owner: str, full_name: str, branch: str, base: str | None, title: str, body: str
    ) -> dict[str, Any]:
        """Open a pull request for ``branch``, or report the one already open."""
        async with await self.api(owner) as api:
            head_owner = full_name.split("/")[0]
            existing = await self._call(api.open_pull(full_name, head_owner, branch))
            if existing:
                return {"number": existing["number"], "url": existing["html_url"], "created": False}
            if not base:
                base = (await self._call(api.repo(full_name))).get("default_branch") or "main"
            pull = await self._call(
                api.create_pull(full_name, title=title, body=body, head=branch, base=base)
            )
        return {"number": pull["number"], "url": pull["html_url"], "created": True}

    @staticmethod
    async def _call(awaitable: Any) -> Any:
        try:
            return await awaitable
        except GitHubAPIError as exc:
            if exc.status == 401:
                raise LoginRequired("GitHub no longer accepts your sign-in: run %tabbi login again") from None
            raise GitHubError(f"GitHub: {exc}", 502 if exc.status >= 500 else 409) from None
