"""The GitHub stand-in refuses what GitHub refuses.

Tests of sign-in, repository listing, clone/push and pull requests run against
``tests.support.github.FakeGitHub``; if it accepted a wrong PKCE verifier, a reused code, a rotated
refresh token or a revoked token, those tests would prove nothing.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from tests.conftest import GIT_ENV, git
from tests.support.github import DEVICE_GRANT, FakeGitHub

JSON = {"Accept": "application/json"}


@pytest.fixture
def github(tmp_path: Path):
    server = FakeGitHub(tmp_path / "github", device_interval=0).start()
    server.add_user("octo", 42, "Octo Cat", "octo@example.com")
    yield server
    server.stop()


@pytest.fixture
def github_app(tmp_path: Path):
    server = FakeGitHub(tmp_path / "github-app", kind="app").start()
    server.add_user("octo", 42, "Octo Cat")
    yield server
    server.stop()


def authorize(gh: FakeGitHub, verifier: str, **extra: str) -> httpx.Response:
    params = {"client_id": gh.client_id, "redirect_uri": "http://app.test/cb?next=%2Fx", "state": "st4te",
              "scope": "repo", "code_challenge": create_s256_code_challenge(verifier),
              "code_challenge_method": "S256", **extra}
    return httpx.get(f"{gh.base_url}/login/oauth/authorize", params=params)


def code_from(response: httpx.Response) -> str:
    assert response.status_code == 302, response.text
    return parse_qs(urlsplit(response.headers["Location"]).query)["code"][0]


def exchange(gh: FakeGitHub, code: str, verifier: str, headers: dict | None = None) -> httpx.Response:
    form = {"client_id": gh.client_id, "client_secret": gh.client_secret, "code": code,
            "redirect_uri": "http://app.test/cb?next=%2Fx", "code_verifier": verifier}
    return httpx.post(f"{gh.base_url}/login/oauth/access_token", data=form,
                      headers=JSON if headers is None else headers)


def api(gh: FakeGitHub, path: str, token: str, scheme: str = "Bearer", **params: str) -> httpx.Response:
    return httpx.get(f"{gh.api_url}{path}", params=params, headers={"Authorization": f"{scheme} {token}"})


def web_token(gh: FakeGitHub) -> dict:
    verifier = secrets.token_urlsafe(48)
    return exchange(gh, code_from(authorize(gh, verifier)), verifier).json()


def test_authorize_redirects_with_code_and_state_and_checks_its_inputs(github):
    response = authorize(github, "v" * 43)
    assert response.status_code == 302
    location = urlsplit(response.headers["Location"])
    query = parse_qs(location.query)
    assert (location.netloc, location.path) == ("app.test", "/cb")
    assert query["next"] == ["/x"] and query["state"] == ["st4te"] and query["code"]
    assert authorize(github, "v" * 43, client_id="Iv1.other").status_code == 404
    assert authorize(github, "v" * 43, code_challenge_method="plain").status_code == 400
    no_state = authorize(github, "v" * 43, state="")
    assert no_state.status_code == 302  # GitHub allows it; the request log shows it
    github.deny = True
    denied = parse_qs(urlsplit(authorize(github, "v" * 43).headers["Location"]).query)
    assert denied["error"] == ["access_denied"] and denied["state"] == ["st4te"]


def test_code_needs_the_right_verifier_and_is_single_use(github):
    verifier = secrets.token_urlsafe(48)
    code = code_from(authorize(github, verifier))
    wrong = exchange(github, code, secrets.token_urlsafe(48))
    assert wrong.status_code == 200 and wrong.json()["error"] == "bad_verification_code"
    assert exchange(github, code, "").json()["error"] == "bad_verification_code"
    # without Accept: application/json GitHub answers form-encoded
    ok = exchange(github, code, verifier, headers={})
    assert ok.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    token = parse_qs(ok.text)
    assert token["access_token"][0].startswith("gho_") and token["token_type"] == ["bearer"]
    assert exchange(github, code, verifier).json()["error"] == "bad_verification_code"
    user = api(github, "/user", token["access_token"][0], scheme="token")
    assert user.status_code == 200 and user.json()["login"] == "octo"
    assert github.issued[-1]["expires_at"] is None
    # a secret that is wrong, or a redirect_uri that differs from the authorize one, fails too
    code = code_from(authorize(github, verifier))
    bad_client = httpx.post(f"{github.base_url}/login/oauth/access_token", headers=JSON, data={
        "client_id": github.client_id, "client_secret": "nope", "code": code, "code_verifier": verifier})
    assert bad_client.json()["error"] == "incorrect_client_credentials"
    other_redirect = httpx.post(f"{github.base_url}/login/oauth/access_token", headers=JSON, data={
        "client_id": github.client_id, "client_secret": github.client_secret, "code": code,
        "code_verifier": verifier, "redirect_uri": "http://evil.test/cb"})
    assert other_redirect.json()["error"] == "bad_verification_code"


def test_device_flow_is_pending_until_approved(github):
    start = httpx.post(f"{github.base_url}/login/device/code", headers=JSON,
                       data={"client_id": github.client_id, "scope": "repo"}).json()
    assert start["verification_uri"] == f"{github.base_url}/login/device" and start["interval"] == 0
    poll = {"client_id": github.client_id, "device_code": start["device_code"], "grant_type": DEVICE_GRANT}
    url = f"{github.base_url}/login/oauth/access_token"
    assert httpx.post(url, data=poll, headers=JSON).json()["error"] == "authorization_pending"
    github.approve_device(start["user_code"])
    token = httpx.post(url, data=poll, headers=JSON).json()
    assert token["access_token"].startswith("gho_")
    assert api(github, "/user/emails", token["access_token"]).json() == [
        {"email": "octo@example.com", "primary": True, "verified": True, "visibility": "private"}]
    assert httpx.post(url, data=poll, headers=JSON).json()["error"] == "incorrect_device_code"  # consumed


def test_device_flow_polling_too_fast_is_told_to_slow_down(tmp_path):
    gh = FakeGitHub(tmp_path, device_interval=1).start()
    try:
        start = httpx.post(f"{gh.base_url}/login/device/code", headers=JSON,
                           data={"client_id": gh.client_id}).json()
        poll = {"client_id": gh.client_id, "device_code": start["device_code"], "grant_type": DEVICE_GRANT}
        url = f"{gh.base_url}/login/oauth/access_token"
        assert httpx.post(url, data=poll, headers=JSON).json()["error"] == "authorization_pending"
        slow = httpx.post(url, data=poll, headers=JSON).json()
        assert slow["error"] == "slow_down" and slow["interval"] == 6
    finally:
        gh.stop()


def test_app_tokens_expire_and_refresh_tokens_rotate(github_app):
    gh = github_app
    first = web_token(gh)
    assert first["access_token"].startswith("ghu_") and first["refresh_token"].startswith("ghr_")
    assert first["expires_in"] == 28800 and first["refresh_token_expires_in"] == 15897600
    url = f"{gh.base_url}/login/oauth/access_token"
    refresh = {"client_id": gh.client_id, "client_secret": gh.client_secret,
               "grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    second = httpx.post(url, data=refresh, headers=JSON).json()
    assert second["access_token"] not in (first["access_token"], None)
    assert first["access_token"] in gh.revoked
    assert api(gh, "/user", first["access_token"]).status_code == 401
    assert api(gh, "/user", second["access_token"]).status_code == 200
    assert httpx.post(url, data=refresh, headers=JSON).json()["error"] == "bad_refresh_token"  # rotated
    gh.fail_refresh = True
    again = httpx.post(url, data={**refresh, "refresh_token": second["refresh_token"]}, headers=JSON)
    assert again.json()["error"] == "bad_refresh_token"
    gh.expire(second["access_token"])
    assert api(gh, "/user", second["access_token"]).json() == {
        "message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"}


def test_repo_listing_paginates_with_link_headers(github):
    for n in range(250):
        github.add_repo(f"octo/repo-{n:03d}", pushed_at=f"2026-01-01T00:{n // 60:02d}:{n % 60:02d}Z")
    token = web_token(github)["access_token"]
    url, seen, pages = f"{github.api_url}/user/repos?per_page=100&sort=pushed&affiliation=owner", [], 0
    while url:
        response = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
        seen += [r["full_name"] for r in response.json()]
        pages += 1
        url = response.links.get("next", {}).get("url")
        if pages == 1:
            assert set(response.links) == {"next", "last"}
            assert "affiliation=owner" in response.links["last"]["url"]
            assert response.links["last"]["url"].endswith("page=3")
    assert pages == 3 and len(seen) == len(set(seen)) == 250
    assert seen[0] == "octo/repo-249"  # sort=pushed is newest first
    assert set(response.links) == {"prev", "first"}
    assert api(github, "/repos/octo/repo-007", token).json()["default_branch"] == "main"
    assert api(github, "/repos/octo/missing", token).status_code == 404


def git_env(home: Path) -> dict:
    return {**os.environ, **GIT_ENV, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_GLOBAL": os.devnull,
            "HOME": str(home)}


def test_git_needs_a_token_and_protected_branches_refuse_pushes(github, source_repo, tmp_path):
    github.add_repo("octo/sample", source_repo)
    github.protect_branch("octo/sample", "main")
    token = web_token(github)["access_token"]
    env = git_env(tmp_path)
    anon = subprocess.run(["git", "clone", "-q", f"{github.base_url}/octo/sample.git", str(tmp_path / "a")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert anon.returncode != 0
    host = github.base_url.removeprefix("http://")
    url = f"http://x-access-token:{token}@{host}/octo/sample.git"
    work = tmp_path / "work"
    clone = subprocess.run(["git", "clone", "-q", url, str(work)], env=env, capture_output=True, text=True,
                           timeout=60)
    assert clone.returncode == 0, clone.stderr
    (work / "new.txt").write_text("new\n")
    git("add", "new.txt", cwd=work)
    git("commit", "-qm", "new", cwd=work)
    refused = subprocess.run(["git", "push", "origin", "HEAD:main"], cwd=work, env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "GH006: Protected branch update failed" in refused.stderr
    assert "protected branch hook declined" in refused.stderr
    pushed = subprocess.run(["git", "push", "-q", "origin", "HEAD:feature"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=60)
    assert pushed.returncode == 0, pushed.stderr
    assert git("log", "-1", "--format=%s", "feature", cwd=github.root / "octo" / "sample.git") == "new"

    pulls = f"{github.api_url}/repos/octo/sample/pulls"
    auth = {"Authorization": f"Bearer {token}"}
    request = {"title": "New", "body": "adds new.txt", "head": "feature", "base": "main"}
    created = httpx.post(pulls, json=request, headers=auth)
    assert created.status_code == 201, created.text
    assert created.json()["html_url"] == f"{github.base_url}/octo/sample/pull/1"
    duplicate = httpx.post(pulls, json=request, headers=auth)
    assert duplicate.status_code == 422
    assert duplicate.json()["errors"][0]["message"] == "A pull request already exists for octo:feature."
    missing = httpx.post(pulls, json={**request, "head": "nope"}, headers=auth)
    assert missing.status_code == 422 and missing.json()["errors"][0]["field"] == "head"
    listed = httpx.get(pulls, params={"head": "octo:feature", "state": "open"}, headers=auth).json()
    assert [p["number"] for p in listed] == [1] and len(github.pulls["octo/sample"]) == 1


def test_revoked_grant_kills_the_token(github):
    token = web_token(github)["access_token"]
    other = web_token(github)["access_token"]
    assert api(github, "/user", token).status_code == 200
    url = f"{github.api_url}/applications/{github.client_id}/grant"
    wrong = httpx.request("DELETE", url, json={"access_token": token}, auth=(github.client_id, "nope"))
    assert wrong.status_code == 401
    done = httpx.request("DELETE", url, json={"access_token": token},
                         auth=(github.client_id, github.client_secret))
    assert done.status_code == 204
    assert {token, other} <= github.revoked  # the whole grant goes
    assert api(github, "/user", token).status_code == 401
    again = httpx.request("DELETE", url, json={"access_token": token},
                          auth=(github.client_id, github.client_secret))
    assert again.status_code == 404
    assert {"bearer", "basic"} <= {r["auth"] for r in github.requests}


def test_unknown_paths_are_json_404s(github):
    response = httpx.get(f"{github.base_url}/nowhere")
    assert response.status_code == 404 and response.json()["message"] == "Not Found"
    assert httpx.get(f"{github.api_url}/user").status_code == 401
