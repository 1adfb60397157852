"""The few GitHub REST calls tabbi makes, and where GitHub lives (github.com or Enterprise)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

#: ``<https://api.github.com/user/repos?page=2>; rel="next"`` in a Link header.
_LINK = re.compile(r'<([^>]+)>\s*;\s*rel="([^"]+)"')
#: Never follow more pages than this (100 per page: 20,000 repositories).
MAX_PAGES = 200


class GitHubAPIError(Exception):
    """GitHub answered with an error; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class GitHubHosts:
    """github.com, or a GitHub Enterprise Server at ``https://HOST`` with its API at ``/api/v3``."""

    web_url: str = "https://github.com"
    api_url: str | None = None

    @property
    def api(self) -> str:
        if self.api_url:
            return self.api_url.rstrip("/")
        web = self.web_url.rstrip("/")
        return "https://api.github.com" if web == "https://github.com" else web + "/api/v3"

    @property
    def web(self) -> str:
        return self.web_url.rstrip("/")

    @property
    def noreply_domain(self) -> str:
        host = urlsplit(self.web).hostname or "github.com"
        return "users.noreply.github.com" if host == "github.com" else f"users.noreply.{host}"

    def noreply_email(self, user: dict[str, Any]) -> str:
        return f"{user['id']}+{user['login']}@{self.noreply_domain}"


class GitHubREST:
    """An authenticated REST client for one person's token."""

    def __init__(self, hosts: GitHubHosts, token: str, timeout: float = 30.0):
        self.hosts = hosts
        self._client = httpx.AsyncClient(
            base_url=hosts.api,
            timeout=timeout,
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28",
                "User-Agent": "tabbi",
            },
        )

    async def __aenter__(self) -> GitHubREST:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise GitHubAPIError(f"GitHub could not be reached ({type(exc).__name__})", 502) from exc
        if response.status_code >= 400:
            raise GitHubAPIError(_message(response), response.status_code)
        return response

    async def user(self) -> dict[str, Any]:
        return (await self.request("GET", "/user")).json()

    async def repos(self) -> list[dict[str, Any]]:
        """Every repository the person can reach, following the Link header across all pages."""
        repos: list[dict[str, Any]] = []
        url: str | None = "/user/repos"
        params: dict[str, Any] | None = {
            "per_page": 100,
            "sort": "pushed",
            "direction": "desc",
            "affiliation": "owner,collaborator,organization_member",
        }
        for _ in range(MAX_PAGES):
            if url is None:
                break
            response = await self.request("GET", url, params=params)
            repos.extend(response.json())
            url, params = next_page(response.headers.get("link")), None
            if url is not None and not url.startswith(self.hosts.api + "/"):
                raise GitHubAPIError("GitHub's next page points to another host", 502)  # keep the token
        return repos

    async def repo(self, full_name: str) -> dict[str, Any]:
        return (await self.request("GET", f"/repos/{full_name}")).json()

    async def open_pull(self, full_name: str, head_owner: str, branch: str) -> dict[str, Any] | None:
        response = await self.request(
            "GET", f"/repos/{full_name}/pulls", params={"state": "open", "head": f"{head_owner}:{branch}"}
        )
        pulls = response.json()
        return pulls[0] if pulls else None

    async def create_pull(self, full_name: str, **fields: Any) -> dict[str, Any]:
        return (await self.request("POST", f"/repos/{full_name}/pulls", json=fields)).json()


def next_page(link_header: str | None) -> str | None:
    for url, rel in _LINK.findall(link_header or ""):
        if rel == "next":
            return url
    return None


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"GitHub answered {response.status_code}"
    message = str(body.get("message") or f"GitHub answered {response.status_code}")
    details = [e.get("message") for e in body.get("errors") or [] if isinstance(e, dict) and e.get("message")]
    return f"{message}: {'; '.join(details)}" if details else message
