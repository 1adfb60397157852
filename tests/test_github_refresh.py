"""GitHub token refresh across server processes sharing one store (named servers on one data
dir, or several servers on one Convex deployment).

A GitHub App's refresh tokens are single-use: a refresh rotates them and GitHub refuses the spent
one. Two processes refreshing the same person at once used to both spend it; the loser got
``bad_refresh_token`` and deleted the token, signing the person out. Each process here is a
``GitHubAccounts`` on its own ``SQLiteStore`` instance (its own connection and thread) over one
database file; GitHub is the loopback stand-in, which refuses a spent refresh token as GitHub does.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from tabbi_extension.encryption import SecretBox
from tabbi_extension.github.accounts import PROVIDER, GitHubAccounts, LoginRequired
from tabbi_extension.github.oauth import OAuthApp, TokenSet
from tabbi_extension.github.rest import GitHubHosts
from tabbi_extension.store import SQLiteStore
from tests.support.github import FakeGitHub

OWNER = "alice"


class WatchedStore(SQLiteStore):
    """Tells when this process has read the token ``reads_wanted`` times."""

    reads = 0
    reads_wanted = 2

    def __init__(self, path: Path):
        super().__init__(path)
        self.read_enough = asyncio.Event()

    async def get_token(self, username: str, provider: str) -> bytes | None:
        token = await super().get_token(username, provider)
        self.reads += 1
        if self.reads >= self.reads_wanted:
            self.read_enough.set()
        return token


class HeldRefresh:
    """The OAuth app, with refreshes held at the door until ``release`` is set: a process caught
    in the middle of its refresh."""

    def __init__(self, app: OAuthApp):
        self.app = app
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def refresh(self, refresh_token: str) -> TokenSet:
        self.entered.set()
        await self.release.wait()
        return await self.app.refresh(refresh_token)


@pytest.fixture
def github(tmp_path: Path):
    server = FakeGitHub(tmp_path / "github", kind="app").start()
    server.add_user("octo", 4242, "Octo Cat")
    yield server
    server.stop()


@pytest.fixture
def processes(tmp_path: Path, github: FakeGitHub, jp_asyncio_loop):
    """Two server processes' accounts over one database, the person signed in (device flow)."""
    run = jp_asyncio_loop.run_until_complete
    box = SecretBox([Fernet.generate_key()])
    hosts = GitHubHosts(github.base_url)
    app = OAuthApp(github.client_id, github.client_secret, hosts)
    stores = [SQLiteStore(tmp_path / "tabbi.sqlite3"), WatchedStore(tmp_path / "tabbi.sqlite3")]
    for store in stores:
        run(store.open())
    first, second = (GitHubAccounts(store, box, app, hosts) for store in stores)

    async def sign_in() -> None:
        device = await app.start_device()
        github.approve_device(device["user_code"])
        tokens = TokenSet.from_response(await app.poll_device(device["device_code"]))
        tokens.user = {"login": "octo", "id": 4242, "name": "Octo Cat", "email": None}
        await first._save(OWNER, tokens)
        await expiring(first)

    run(sign_in())
    yield first, second
    for store in stores:
        run(store.close())


async def expiring(accounts: GitHubAccounts) -> TokenSet:
    """Time passes: the stored token now expires within the refresh margin."""
    tokens = await accounts._load(OWNER)
    tokens.expires_at = time.time() + 60
    await accounts._save(OWNER, tokens)
    return tokens


def refreshes(github: FakeGitHub) -> list[dict]:
    return [t for t in github.issued if t["grant_type"] == "refresh_token"]


async def test_two_processes_refreshing_at_once_spend_the_refresh_token_once(processes, github):
    first, second = processes
    held = first.app = HeldRefresh(first.app)
    # The first process is in the middle of its refresh ...
    refreshing = asyncio.ensure_future(first.tokens(OWNER))
    await asyncio.wait_for(held.entered.wait(), 30)
    # ... when the second one needs the token too, sees it expiring, and looks at the store.
    other = asyncio.ensure_future(second.tokens(OWNER))
    looked = asyncio.ensure_future(second.store.read_enough.wait())
    await asyncio.wait({other, looked}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    looked.cancel()
    held.release.set()
    results = await asyncio.gather(refreshing, other, return_exceptions=True)

    assert not [r for r in results if isinstance(r, BaseException)], results  # nobody signed out
    assert results[0].access_token == results[1].access_token  # the loser used the winner's token
    assert len(refreshes(github)) == 1
    assert github.login_for(results[0].access_token) == "octo"
    # The stored refresh token is the live one: the next refresh (from either process) works.
    await expiring(first)
    again = await second.tokens(OWNER)
    assert again.access_token != results[0].access_token and len(refreshes(github)) == 2
    assert github.login_for(again.access_token) == "octo"


async def test_many_callers_in_two_processes_refresh_once(processes, github):
    first, second = processes
    results = await asyncio.gather(*(p.tokens(OWNER) for p in (first, second) * 5))
    assert len(refreshes(github)) == 1
    assert len({r.access_token for r in results}) == 1
    assert github.login_for(results[0].access_token) == "octo"


async def test_a_refused_refresh_signs_out_in_every_process(processes, github):
    first, second = processes
    github.fail_refresh = True
    with pytest.raises(LoginRequired):
        await first.tokens(OWNER)
    assert await second.tokens(OWNER) is None
    assert await second.store.get_token(OWNER, PROVIDER) is None


async def test_the_claim_of_a_process_that_died_mid_refresh_expires(processes, github):
    """A process claimed the refresh and died before GitHub answered: once its claim is past,
    another process refreshes (its refresh token was never spent)."""
    first, second = processes
    tokens = await first._load(OWNER)
    await first.store.put_token(OWNER, PROVIDER, first._seal(tokens, refresh_claim=time.time() - 1))
    fresh = await second.tokens(OWNER)
    assert fresh.access_token != tokens.access_token and len(refreshes(github)) == 1
    assert (await first._read(OWNER))[2] is None  # the new token carries no claim
