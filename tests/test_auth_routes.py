"""Every route tabbi serves refuses whoever Jupyter does not let in, and a GitHub sign-in
completes only for the person who started it.

Threats: a route added (or refactored) without ``@web.authenticated`` and the authorization
check is served to anyone who can reach the port, because jupyter_server's default
``allow_unauthenticated_access=True`` lets undecorated handlers through; a WebSocket whose
handshake skips the check streams a session's events to anyone; a deployment's authorizer
(JupyterHub scopes, a read-only role) that says no to ``tabbi`` is ignored. And on a shared
server, a second person's browser completing the first person's OAuth callback (a forwarded or
shared link, opened while signed in to GitHub as someone else) would attach the wrong GitHub
account to a tabbi user: pushes as someone else, into someone else's repositories.

The route walk reads the live server's route table, so a new route is covered by construction.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import tornado.websocket
from jupyter_server.auth import Authorizer
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.routing import Router
from tornado.web import RequestHandler

from tests.support.api import Api
from tests.support.identity import headers
from tests.test_github import github, tabbi_config  # noqa: F401  (fixtures used here)

#: A value for every named group of tabbi's URL patterns. A route with a new group fails the
#: walk until it gets a sample here (so it cannot be skipped silently).
SAMPLES = {
    "session_id": "ses-0123456789ab",
    "permission_id": "per_sample",
    "action": "pause",
    "login_id": "login_sample_0123",
    # The model gateway is for sandboxes, which have no Jupyter token: it lets in only the
    # gateway token of that session's sandbox (tests/test_gateway.py), so every caller here,
    # Jupyter-authenticated or not, must get 403 from it as well.
    "path": "chat/completions",
}
#: Routes public by design: none. The OAuth callback is a browser page that needs the person's
#: Jupyter login too (the sign-in state is tied to that person), so it is walked like the rest.
PUBLIC: set[str] = set()

#: Who knocks: nobody, a stranger, and "owner" (the server token's user: authenticated, but the
#: deployment's authorizer denies them the tabbi resource).
CALLERS = ["no token", "wrong token", "authorizer denies tabbi"]


class DenyTabbiToOwner(Authorizer):
    """A deployment's authorizer: "owner" may use Jupyter, but not tabbi."""

    def is_authorized(self, handler, user, action, resource) -> bool:
        return not (user is not None and user.username == "owner" and resource == "tabbi")


@pytest.fixture
def jp_server_config(jp_server_config: dict) -> dict:
    server = {**jp_server_config["ServerApp"], "authorizer_class": DenyTabbiToOwner}
    return {**jp_server_config, "ServerApp": server}


def tabbi_routes(app) -> list[tuple[str, type]]:
    """``(regex, handler)`` of every rule the running web app routes to a tabbi handler."""
    found: list[tuple[str, type]] = []

    def walk(router: Router) -> None:
        for rule in getattr(router, "rules", []):
            target = rule.target
            if isinstance(target, Router):
                walk(target)
            elif isinstance(target, type) and target.__module__.startswith("tabbi_extension"):
                found.append((rule.matcher.regex.pattern, target))

    walk(app.default_router)
    walk(app.wildcard_router)
    return found


def concrete(pattern: str) -> str:
    """A path the pattern matches, with each named group filled from ``SAMPLES``."""

    def sample(match: re.Match) -> str:
        assert match[1] in SAMPLES, f"add a sample value for the URL group {match[1]!r}"
        return SAMPLES[match[1]]

    path = re.sub(r"\(\?P<(\w+)>[^)]*\)", sample, pattern.removesuffix("$"))
    assert re.fullmatch(pattern, path), (pattern, path)
    return path


def methods(handler: type) -> list[str]:
    if issubclass(handler, tornado.websocket.WebSocketHandler):
        return ["WS"]
    return [m for m in ("GET", "POST", "PUT", "PATCH", "DELETE")
            if getattr(handler, m.lower()) is not getattr(RequestHandler, m.lower())]


def refused(code: int, location: str | None, method: str, handler: type) -> bool:
    """403, or for a browser page (not an API handler) a GET redirected to the login page."""
    from jupyter_server.base.handlers import APIHandler

    if code == 403:
        return True
    page = not issubclass(handler, APIHandler)
    return page and method == "GET" and code == 302 and "/login" in (location or "")


@pytest.mark.parametrize("caller", CALLERS)
async def test_every_route_refuses_callers_jupyter_does_not_let_in(
    caller, jp_serverapp, http_server_client, jp_http_port, jp_auth_header, tabbi_app
):
    sent = {"no token": {}, "wrong token": {"Authorization": "token not-a-token-of-this-server"},
            "authorizer denies tabbi": jp_auth_header}[caller]
    routes = tabbi_routes(jp_serverapp.web_app)
    declared = {cls for _, cls in tabbi_app.handlers}
    assert declared and declared <= {cls for _, cls in routes}, "the walk missed tabbi routes"
    served: list[tuple[str, str, int]] = []
    for pattern, handler in routes:
        path = concrete(pattern)
        if path in PUBLIC:
            continue
        for method in methods(handler):
            if method == "WS":
                request = HTTPRequest(f"ws://127.0.0.1:{jp_http_port}{path}", headers=sent)
                try:
                    ws = await tornado.websocket.websocket_connect(request)
                except HTTPClientError as exc:
                    code, location = exc.code, None
                else:
                    ws.close()
                    code, location = 101, None
            else:
                response = await http_server_client.fetch(
                    path, method=method, headers=sent, raise_error=False,
                    follow_redirects=False, allow_nonstandard_methods=True,
                    body=b"{}" if method in ("POST", "PUT", "PATCH") else None,
                )
                code, location = response.code, response.headers.get("Location")
            if not refused(code, location, method, handler):
                served.append((method, path, code))
    assert served == [], f"served to a caller with {caller}: {served}"


async def test_a_second_person_cannot_complete_the_first_persons_sign_in(jp_fetch, github):  # noqa: F811
    """Alice starts a web sign-in. The GitHub link reaches Bob, who opens it signed in to GitHub
    (as himself, or as Alice's account in a shared browser) and is sent back to tabbi's callback
    with Alice's state and a fresh code, authenticated to Jupyter as Bob. Nobody may be signed in
    by that: not Bob (it is not his sign-in), not Alice (through someone else's browser)."""
    alice, bob = Api(jp_fetch, headers("alice")), Api(jp_fetch, headers("bob"))
    attempt = await alice.ok("POST", "tabbi/api/github/login", {"flow": "web"}, expect=201)
    async with httpx.AsyncClient() as browser:
        consent = await browser.get(attempt["url"])  # GitHub approves, redirects to the callback
    assert consent.status_code == 302, consent.text
    params = {k: v[0] for k, v in parse_qs(urlsplit(consent.headers["location"]).query).items()}

    page = await jp_fetch("tabbi", "github", "callback", params=params, headers=headers("bob"),
                          raise_error=False)
    assert page.code == 400 and b"not valid" in page.body
    assert not [r for r in github.requests if r["path"] == "/login/oauth/access_token"], \
        "the code was exchanged for a token on Bob's request"
    for person in (alice, bob):
        assert (await person.ok("GET", "tabbi/api/github/user"))["signed_in"] is False
    assert (await alice.ok("GET", f"tabbi/api/github/login/{attempt['login_id']}"))["status"] == "pending"

    # Alice's own browser still completes her sign-in; Bob stays signed out.
    page = await jp_fetch("tabbi", "github", "callback", params=params, headers=headers("alice"),
                          raise_error=False)
    assert page.code == 200, page.body
    assert (await alice.ok("GET", "tabbi/api/github/user"))["signed_in"] is True
    assert (await bob.ok("GET", "tabbi/api/github/user"))["signed_in"] is False
