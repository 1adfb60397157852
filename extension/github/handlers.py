"""GitHub routes: sign-in (start, status, the OAuth callback), sign-out, the person's account and
repositories. Thin: authenticate, validate, delegate to ``GitHubAccounts``.

The callback is a browser page under the server's base URL (so it works behind JupyterHub's
``/user/<name>/`` prefix) and needs the same Jupyter login as the rest: a code only signs in the
person who started that sign-in (the state is tied to them).
"""

from __future__ import annotations

import html
import logging
import re

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.utils import url_path_join
from tornado import web

from .. import logs
from ..handlers import AUTH_RESOURCE, TabbiHandler, owner_of
from ..validation import ValidationError, validate_wait
from .accounts import GitHubAccounts, GitHubError

log = logging.getLogger(__name__)

LOGIN_ID = r"(?P<login_id>[A-Za-z0-9_-]{10,64})"
CALLBACK_PATH = "tabbi/github/callback"
MAX_QUERY_CHARS = 200
#: What GitHub sends back: ``state`` is ours (URL-safe base64), ``code`` and ``error`` are short
#: ASCII words. Anything else is not a callback from GitHub.
_CALLBACK_VALUE = re.compile(r"^[A-Za-z0-9_.~-]{0,512}$")


class GitHubHandler(TabbiHandler):
    @property
    def accounts(self) -> GitHubAccounts:
        return self.settings["tabbi_github"]


class GitHubUserHandler(GitHubHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.write_json(await self.accounts.whoami(self.username))


class LoginHandler(GitHubHandler):
    """``POST {"flow": "web" | "device"}`` starts a sign-in; the answer says where to go."""

    @web.authenticated
    @authorized
    async def post(self) -> None:
        flow = self.body().get("flow") or self.settings["tabbi_github_login_flow"]
        if flow not in ("web", "device"):
            raise ValidationError("'flow' must be 'web' or 'device'")
        redirect_uri = ""  # the device flow has no callback
        if flow == "web":
            redirect_uri = self.settings["tabbi_github_callback_url"] or self._callback_url()
        attempt = await self.accounts.begin_login(self.username, flow, redirect_uri)
        self.write_json(attempt.public(), 201)


    def _callback_url(self) -> str:
        """The callback under this server's public URL. From the request's Host only outside
        JupyterHub: there a kernel reaches the server by an internal address (the single-user
        server's port, the service behind the proxy) that GitHub cannot send a browser to."""
        public = self.settings["tabbi_public_url"]
        if public:
            return url_path_join(public, CALLBACK_PATH)
        if not self.settings["tabbi_urls_from_requests"]:
            raise GitHubError(
                "GitHub web sign-in needs this server's public URL under JupyterHub: set "
                "c.JupyterHub.public_url (or TabbiExtension.public_url); or sign in with flow='device'",
                409,
            )
        return f"{self.request.protocol}://{self.request.host}{url_path_join(self.base_url, CALLBACK_PATH)}"


class LoginStatusHandler(GitHubHandler):
    """``GET .../login/<id>?wait=S``: long-polls up to S seconds while the sign-in is pending."""

    @web.authenticated
    @authorized
    async def get(self, login_id: str) -> None:
        wait = validate_wait(self.get_argument("wait", "0"), 60.0)
        attempt = await self.accounts.login_status(self.username, login_id, wait)
        self.write_json(attempt.public())


class LogoutHandler(GitHubHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        self.write_json(await self.accounts.logout(self.username))


class ReposHandler(GitHubHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        query = self.get_argument("q", "")
        if len(query) > MAX_QUERY_CHARS:
            raise ValidationError(f"'q' is longer than {MAX_QUERY_CHARS} characters")
        repos = await self.accounts.repos(self.username, query)
        self.write_json({"repos": repos, "count": len(repos)})


class CallbackHandler(JupyterHandler):
    """Where GitHub sends the person's browser back to: a small page saying what happened."""

    auth_resource = AUTH_RESOURCE

    @web.authenticated
    @authorized
    async def get(self) -> None:
        await self.settings["tabbi_ready"]()
        accounts: GitHubAccounts = self.settings["tabbi_github"]
        state, code, error = (self.get_argument(name, "") for name in ("state", "code", "error"))
        if not all(_CALLBACK_VALUE.match(value) for value in (state, code, error)):
            self._page(400, "GitHub sign-in failed", "this is not a sign-in link from GitHub")
            return
        try:
            attempt = await accounts.finish_web(
                owner_of(self, self.current_user), state, code, error or None
            )
        except GitHubError as exc:
            self._page(exc.status, "GitHub sign-in failed", str(exc))
            return
        if attempt.status == "done":
            self._page(
                200,
                "Signed in to GitHub",
                f"Signed in as {attempt.login}. You can close this tab and go back to the notebook.",
            )
        else:
            self._page(400, "GitHub sign-in failed", attempt.error or "unknown error")

    def _page(self, status: int, title: str, text: str) -> None:
        logs.event(log, logging.INFO if status == 200 else logging.WARNING,
                   "auth.github_signin" if status == 200 else "auth.github_signin_failed",
                   f"{title}: {text}", owner=owner_of(self, self.current_user), status=status)
        self.set_status(status)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(
            f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<body style='font-family:sans-serif;margin:3em'><h2>{html.escape(title)}</h2>"
            f"<p>{html.escape(text)}</p></body>"
        )


def routes() -> list[tuple[str, type]]:
    prefix = "/tabbi/api/github"
    return [
        (prefix + "/user", GitHubUserHandler),
        (prefix + "/login", LoginHandler),
        (prefix + f"/login/{LOGIN_ID}", LoginStatusHandler),
        (prefix + "/logout", LogoutHandler),
        (prefix + "/repos", ReposHandler),
        ("/" + CALLBACK_PATH, CallbackHandler),
    ]
