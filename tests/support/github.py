"""A loopback stand-in for GitHub (github.com or GitHub Enterprise Server) on 127.0.0.1.

It speaks GitHub's real protocols, laid out like GHES (``https://HOST`` for web, OAuth and git;
``https://HOST/api/v3`` for REST), so tests of sign-in, repository listing, clone/push through a
token and pull requests exercise the same requests a real deployment sees:

* OAuth web flow with PKCE (``/login/oauth/authorize`` -> ``/login/oauth/access_token``), the
  device flow (``/login/device/code``), and for ``kind="app"`` (a GitHub App) expiring ``ghu_``
  user tokens with rotating ``ghr_`` refresh tokens;
* the REST endpoints tabbi uses (``/user``, ``/user/emails``, ``/user/repos`` with ``Link``
  pagination, ``/repos/{o}/{r}``, pulls, grant revocation);
* git smart HTTP through ``git http-backend`` with the token as the Basic password, and branch
  protection enforced by a real pre-receive hook.

It refuses what GitHub refuses (bad verifier, reused code, revoked or expired token, duplicate
pull request ...) and answers errors in GitHub's shapes, or tests built on it would prove nothing.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
import secrets
import string
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from authlib.oauth2.rfc7636 import create_s256_code_challenge

from tests.support.git_remote import QuietHandler, read_request_body, run_http_backend

DOCS = "https://docs.github.com/rest"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
OAUTH_SCOPE = "repo,read:user,user:email"
REFRESH_TOKEN_LIFETIME = 15897600  # what GitHub answers as refresh_token_expires_in (~6 months)
_ALNUM = string.ascii_letters + string.digits
_GIT_PATH = re.compile(r"^/([^/]+)/([^/]+?)(?:\.git)?/(info/refs|git-upload-pack|git-receive-pack)$")
_SAFE_GLOB = re.compile(r"^[A-Za-z0-9._/*?\[\]-]+$")


class _Reply(Exception):
    """Raised by a route to end the request with this status, body and headers."""

    def __init__(self, status: int, body: Any = None, headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def _not_found() -> _Reply:
    return _Reply(404, {"message": "Not Found", "documentation_url": DOCS})


def _validation_failed(*errors: dict) -> _Reply:
    return _Reply(422, {"message": "Validation Failed", "errors": list(errors), "documentation_url": DOCS})


def _random(prefix: str, length: int) -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(length))


class FakeGitHub:
    """GitHub on loopback. ``kind="oauth"`` is an OAuth App (``gho_`` tokens that never expire);
    ``kind="app"`` is a GitHub App (``ghu_`` tokens expiring after ``token_lifetime`` seconds, with
    single-use ``ghr_`` refresh tokens)."""

    def __init__(self, root: Path, *, kind: str = "oauth", client_id: str = "Iv1.tabbitestclient",
                 client_secret: str = "tabbi-test-secret", token_lifetime: int = 28800,
                 device_interval: int = 1):
        if kind not in ("oauth", "app"):
            raise ValueError(f"kind must be 'oauth' or 'app', not {kind!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.kind = kind
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_lifetime = token_lifetime
        self.device_interval = device_interval
        # Switches a test may flip.
        self.authorize_as: str | None = None  # who clicks "Authorize" (default: first user added)
        self.fail_refresh = False  # refresh grants answer bad_refresh_token
        self.deny = False  # the person clicks "Cancel": authorize and device polls get access_denied
        self.callback_url: str | None = None  # the app's registered callback; None accepts any
        self.code_lifetime = 600.0  # seconds an authorization code stays valid (GitHub: 10 min)
        self.device_lifetime = 900.0  # seconds a device code stays valid (GitHub: 15 min)
        # What happened, for assertions.
        self.requests: list[dict] = []
        self.issued: list[dict] = []
        self.revoked: set[str] = set()
        self.pulls: dict[str, list[dict]] = {}
        # State.
        self._lock = threading.RLock()
        self._users: dict[str, dict] = {}
        self._repos: dict[str, dict] = {}  # lower-case full_name -> repo (GitHub is case-insensitive)
        self._codes: dict[str, dict] = {}
        self._devices: dict[str, dict] = {}
        self._tokens: dict[str, dict] = {}  # access token -> {login, client_id, expires_at, refresh_token}
        self._refresh: dict[str, str] = {}  # current refresh token -> its access token
        self._next_id = 1000
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    # -- lifecycle and setup -------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/v3"

    def start(self) -> FakeGitHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_user(self, login: str, id: int, name: str | None, email: str | None = None) -> dict:
        user = {"login": login, "id": id, "name": name, "email": email}
        with self._lock:
            self._users[login] = user
            if self.authorize_as is None:
                self.authorize_as = login
        return dict(user)

    def add_repo(self, full_name: str, source: Path | None = None, *, private: bool = True,
                 pushed_at: str = "2026-01-01T00:00:00Z", default_branch: str = "main",
                 description: str = "") -> Path | None:
        """Register a repository; with ``source`` (a working git repository) also publish a bare
        clone at ``root/<owner>/<name>.git`` that accepts pushes over smart HTTP."""
        owner, _, name = full_name.partition("/")
        if not owner or not name or "/" in name:
            raise ValueError(f"full_name must be OWNER/NAME, not {full_name!r}")
        bare: Path | None = None
        if source is not None:
            bare = self.root / owner / f"{name}.git"
            bare.parent.mkdir(parents=True, exist_ok=True)
            _git("clone", "--quiet", "--bare", str(source), str(bare), cwd=self.root)
            _git("config", "http.receivepack", "true", cwd=bare)
            _git("symbolic-ref", "HEAD", f"refs/heads/{default_branch}", cwd=bare)
        with self._lock:
            self._next_id += 1
            self._repos[full_name.lower()] = {
                "id": self._next_id, "owner": owner, "name": name, "private": private,
                "description": description, "default_branch": default_branch,
                "pushed_at": pushed_at, "bare": bare, "protected": [],
            }
            self.pulls.setdefault(full_name, [])
        return bare

    def protect_branch(self, full_name: str, branch_glob: str) -> None:
        """Reject pushes to branches matching ``branch_glob`` with a pre-receive hook, as GitHub's
        branch protection does (GH006)."""
        if not _SAFE_GLOB.match(branch_glob):
            raise ValueError(f"unsupported branch glob {branch_glob!r}")
        with self._lock:
            repo = self._repos[full_name.lower()]
            repo["protected"].append(branch_glob)
            if repo["bare"] is not None:
                _write_protection_hook(repo["bare"], repo["protected"])

    def approve_device(self, user_code: str | None = None, login: str | None = None) -> None:
        """The person enters ``user_code`` (the latest pending one if None) and approves."""
        with self._lock:
            pending = [d for d in self._devices.values() if not d["consumed"] and d["approved"] is None]
            if user_code is not None:
                pending = [d for d in pending if d["user_code"] == user_code.upper()]
            if not pending:
                raise KeyError(f"no pending device code {user_code or ''}".strip())
            who = login or self.authorize_as
            if who not in self._users:
                raise KeyError(f"unknown user {who!r}")
            pending[-1]["approved"] = who

    def expire(self, access_token: str) -> None:
        """Make ``access_token`` expired now (as if ``token_lifetime`` had passed)."""
        with self._lock:
            self._tokens[access_token]["expires_at"] = time.time() - 1

    # -- tokens --------------------------------------------------------------------------------

    def _issue(self, login: str, grant_type: str) -> dict:
        """Mint a token pair for ``login`` and answer it as GitHub's token endpoint does."""
        if self.kind == "oauth":
            access, refresh, expires_at = _random("gho_", 36), None, None
            answer: dict[str, Any] = {"access_token": access, "token_type": "bearer", "scope": OAUTH_SCOPE}
        else:
            access, refresh = _random("ghu_", 36), _random("ghr_", 76)
            expires_at = time.time() + self.token_lifetime
            answer = {"access_token": access, "expires_in": self.token_lifetime, "refresh_token": refresh,
                      "refresh_token_expires_in": REFRESH_TOKEN_LIFETIME, "token_type": "bearer",
                      "scope": ""}
            self._refresh[refresh] = access
        self._tokens[access] = {"login": login, "client_id": self.client_id, "expires_at": expires_at,
                                "refresh_token": refresh}
        self.issued.append({"access_token": access, "refresh_token": refresh, "expires_at": expires_at,
                            "login": login, "grant_type": grant_type})
        return answer

    def _revoke(self, access: str) -> None:
        record = self._tokens.pop(access, None)
        if record and record["refresh_token"]:
            self._refresh.pop(record["refresh_token"], None)
        self.revoked.add(access)

    def login_for(self, token: str | None) -> str | None:
        """The user a (valid: known, unrevoked, unexpired) access token acts for, else None."""
        if not token:
            return None
        with self._lock:
            record = self._tokens.get(token)
            if record is None or token in self.revoked:
                return None
            if record["expires_at"] is not None and record["expires_at"] <= time.time():
                return None
            return record["login"]

    # -- OAuth endpoints -----------------------------------------------------------------------

    def _authorize(self, query: dict[str, str]) -> _Reply:
        if query.get("client_id") != self.client_id:
            raise _Reply(404, "<html><body><h1>404</h1>Page not found</body></html>")
        redirect_uri = query.get("redirect_uri")
        if not redirect_uri:
            raise _Reply(400, "redirect_uri is required (this stand-in has no registered callback)")
        if self.callback_url and not redirect_uri.startswith(self.callback_url):
            raise _Reply(400, "The redirect_uri is not associated with this application.")
        if query.get("response_type", "code") != "code":
            raise _Reply(400, "response_type must be code")
        if not query.get("code_challenge") or query.get("code_challenge_method") != "S256":
            raise _Reply(400, "code_challenge with code_challenge_method=S256 is required")
        params: dict[str, str]
        with self._lock:
            login = self.authorize_as
            if self.deny:
                params = {"error": "access_denied",
                          "error_description": "The user has denied your application access.",
                          "error_uri": "https://docs.github.com/apps/troubleshooting-authorization-request-errors/#access-denied"}
            elif login not in self._users:
                raise _Reply(400, f"no user to authorize as ({login!r})")
            else:
                code = secrets.token_hex(10)
                self._codes[code] = {
                    "client_id": self.client_id, "redirect_uri": redirect_uri, "login": login,
                    "challenge": query["code_challenge"], "state": query.get("state"),
                    "expires": time.monotonic() + self.code_lifetime, "used": False,
                }
                params = {"code": code}
        if "state" in query:
            params["state"] = query["state"]
        parts = urlsplit(redirect_uri)
        merged = urlencode(parse_qsl(parts.query, keep_blank_values=True) + list(params.items()))
        return _Reply(302, "", {"Location": urlunsplit(parts._replace(query=merged))})

    def _client_ok(self, form: dict[str, str], basic: tuple[str, str] | None, secret_required: bool) -> bool:
        client_id, secret = basic if basic else (form.get("client_id"), form.get("client_secret"))
        if client_id != self.client_id:
            return False
        if secret is None:
            return not secret_required
        return _same(secret, self.client_secret)

    def _access_token(self, form: dict[str, str], basic: tuple[str, str] | None) -> dict:
        grant = form.get("grant_type") or "authorization_code"
        if basic:
            form = {**form, "client_id": basic[0]}
        with self._lock:
            if grant == "authorization_code":
                if not self._client_ok(form, basic, secret_required=True):
                    return _oauth_error("incorrect_client_credentials",
                                        "The client_id and/or client_secret passed are incorrect.")
                return self._grant_code(form)
            if grant == "refresh_token":
                if not self._client_ok(form, basic, secret_required=True):
                    return _oauth_error("incorrect_client_credentials",
                                        "The client_id and/or client_secret passed are incorrect.")
                return self._grant_refresh(form)
            if grant == DEVICE_GRANT:
                if not self._client_ok(form, basic, secret_required=False):
                    return _oauth_error("incorrect_client_credentials",
                                        "The client_id and/or client_secret passed are incorrect.")
                return self._grant_device(form)
        return _oauth_error("unsupported_grant_type", "The grant type is not supported.")

    def _grant_code(self, form: dict[str, str]) -> dict:
        bad = _oauth_error("bad_verification_code", "The code passed is incorrect or expired.")
        code = self._codes.get(form.get("code", ""))
        if code is None or code["used"] or code["expires"] <= time.monotonic():
            return bad
        if code["client_id"] != form.get("client_id", self.client_id):
            return bad
        if code["redirect_uri"] is not None and form.get("redirect_uri") != code["redirect_uri"]:
            return bad
        verifier = form.get("code_verifier") or ""
        if not verifier or not _same(create_s256_code_challenge(verifier), code["challenge"]):
            return bad
        code["used"] = True
        return self._issue(code["login"], "authorization_code")

    def _grant_refresh(self, form: dict[str, str]) -> dict:
        old_access = self._refresh.get(form.get("refresh_token") or "")
        if self.fail_refresh or old_access is None:
            return _oauth_error("bad_refresh_token", "The refresh token passed is incorrect or expired.")
        login = self._tokens[old_access]["login"]
        self._revoke(old_access)  # rotation: the old refresh token and its access token die
        return self._issue(login, "refresh_token")

    def _grant_device(self, form: dict[str, str]) -> dict:
        device = self._devices.get(form.get("device_code") or "")
        if device is None or device["consumed"] or device["client_id"] != form.get("client_id"):
            return _oauth_error("incorrect_device_code", "The device_code provided is not valid.")
        now = time.monotonic()
        if now >= device["expires"]:
            return _oauth_error("expired_token", "The `device_code` has expired.")
        previous, device["last_poll"] = device["last_poll"], now
        if previous is not None and now - previous < device["interval"] * 0.5:
            device["interval"] += 5  # GitHub raises the interval for good
            return {**_oauth_error("slow_down", "Too many requests have been made in the same timeframe."),
                    "interval": device["interval"]}
        if self.deny:
            device["consumed"] = True
            return _oauth_error("access_denied", "The authorization request was denied.")
        if device["approved"] is None:
            return _oauth_error("authorization_pending", "The authorization request is still pending.")
        device["consumed"] = True
        return self._issue(device["approved"], DEVICE_GRANT)

    def _device_code(self, form: dict[str, str]) -> dict:
        if form.get("client_id") != self.client_id:
            return _oauth_error("incorrect_client_credentials", "The client_id passed is incorrect.")
        with self._lock:
            device_code = secrets.token_hex(20)
            letters = "".join(secrets.choice("BCDFGHJKLMNPQRSTVWXZ") for _ in range(4))
            user_code = f"{letters}-{secrets.randbelow(10000):04d}"
            self._devices[device_code] = {
                "user_code": user_code, "client_id": self.client_id, "scope": form.get("scope", ""),
                "expires": time.monotonic() + self.device_lifetime, "interval": self.device_interval,
                "last_poll": None, "approved": None, "consumed": False,
            }
        return {"device_code": device_code, "user_code": user_code,
                "verification_uri": f"{self.base_url}/login/device",
                "expires_in": int(self.device_lifetime), "interval": self.device_interval}

    # -- REST API ------------------------------------------------------------------------------

    def _user_json(self, login: str) -> dict:
        user = self._users[login]
        return {"login": login, "id": user["id"], "name": user["name"], "email": user["email"],
                "type": "User", "html_url": f"{self.base_url}/{login}",
                "avatar_url": f"{self.base_url}/avatars/u/{user['id']}"}

    def _repo_json(self, repo: dict) -> dict:
        full_name = f"{repo['owner']}/{repo['name']}"
        return {
            "id": repo["id"], "name": repo["name"], "full_name": full_name,
            "owner": {"login": repo["owner"], "type": "User"}, "private": repo["private"],
            "visibility": "private" if repo["private"] else "public", "fork": False, "archived": False,
            "description": repo["description"], "default_branch": repo["default_branch"],
            "created_at": repo["pushed_at"], "pushed_at": repo["pushed_at"], "updated_at": repo["pushed_at"],
            "html_url": f"{self.base_url}/{full_name}", "clone_url": f"{self.base_url}/{full_name}.git",
            "url": f"{self.api_url}/repos/{full_name}",
            "permissions": {"admin": True, "maintain": True, "push": True, "triage": True, "pull": True},
        }

    def _pull_json(self, pull: dict) -> dict:
        return {k: v for k, v in pull.items() if not k.startswith("_")}

    def _api(self, method: str, path: str, query: dict[str, str], body: Any, auth: tuple[str, str] | None,
             token: str | None) -> _Reply:
        route = path[len("/api/v3"):].rstrip("/") or "/"
        grant = re.fullmatch(r"/applications/([^/]+)/(grant|token)", route)
        if grant and method == "DELETE":
            return self._delete_grant(grant.group(1), grant.group(2), body, auth)
        if token is None:
            raise _Reply(401, {"message": "Requires authentication", "documentation_url": DOCS})
        login = self.login_for(token)
        if login is None:
            raise _Reply(401, {"message": "Bad credentials", "documentation_url": DOCS})
        with self._lock:
            headers = {"X-OAuth-Scopes": OAUTH_SCOPE.replace(",", ", ")} if self.kind == "oauth" else {}
            if route == "/user" and method == "GET":
                return _Reply(200, self._user_json(login), headers)
            if route == "/user/emails" and method == "GET":
                user = self._users[login]
                email = user["email"] or f"{user['id']}+{login}@users.noreply.github.com"
                return _Reply(200, [{"email": email, "primary": True, "verified": True,
                                     "visibility": "private"}], headers)
            if route == "/user/repos" and method == "GET":
                return self._list_repos(path, query, headers)
            match = re.fullmatch(r"/repos/([^/]+)/([^/]+)(/pulls)?", route)
            if match:
                repo = self._repos.get(f"{match.group(1)}/{match.group(2)}".lower())
                if repo is None:
                    raise _not_found()
                if not match.group(3) and method == "GET":
                    return _Reply(200, self._repo_json(repo), headers)
                if match.group(3) and method == "GET":
                    return self._list_pulls(path, repo, query, headers)
                if match.group(3) and method == "POST":
                    return self._create_pull(repo, body, login)
        raise _not_found()

    def _list_repos(self, path: str, query: dict[str, str], headers: dict[str, str]) -> _Reply:
        sort = query.get("sort", "full_name")
        if sort not in ("created", "updated", "pushed", "full_name"):
            sort = "full_name"
        key = "full_name" if sort == "full_name" else "pushed_at"
        direction = query.get("direction") or ("asc" if sort == "full_name" else "desc")
        repos = [self._repo_json(r) for r in self._repos.values()]
        visibility = query.get("visibility", "all")
        if visibility in ("public", "private"):
            repos = [r for r in repos if r["visibility"] == visibility]
        repos.sort(key=lambda r: (r[key].lower() if key == "full_name" else r[key], r["full_name"].lower()),
                   reverse=direction == "desc")
        return self._paginate(path, query, repos, headers)

    def _list_pulls(self, path: str, repo: dict, query: dict[str, str], headers: dict[str, str]) -> _Reply:
        pulls = self.pulls.get(f"{repo['owner']}/{repo['name']}", [])
        state = query.get("state", "open")
        chosen = [p for p in pulls if state == "all" or p["state"] == state]
        if query.get("head"):
            head_owner, _, head_ref = query["head"].rpartition(":")
            chosen = [p for p in chosen if p["head"]["ref"] == head_ref
                      and (not head_owner or p["head"]["label"].split(":")[0].lower() == head_owner.lower())]
        if query.get("base"):
            chosen = [p for p in chosen if p["base"]["ref"] == query["base"]]
        chosen.sort(key=lambda p: p["number"], reverse=query.get("direction", "desc") == "desc")
        return self._paginate(path, query, [self._pull_json(p) for p in chosen], headers)

    def _paginate(self, path: str, query: dict[str, str], items: list, headers: dict[str, str]) -> _Reply:
        """One page of ``items`` with GitHub's ``Link`` header (prev, next, last, first)."""
        per_page = min(max(_int(query.get("per_page"), 30), 1), 100)
        page = max(_int(query.get("page"), 1), 1)
        last = max((len(items) + per_page - 1) // per_page, 1)
        links = []

        def url(number: int) -> str:
            params = dict(query)
            params["page"] = str(number)
            return f"{self.base_url}{path}?{urlencode(params)}"

        if page > 1:
            links.append(f'<{url(min(page - 1, last))}>; rel="prev"')
        if page < last:
            links += [f'<{url(page + 1)}>; rel="next"', f'<{url(last)}>; rel="last"']
        if page > 1:
            links.append(f'<{url(1)}>; rel="first"')
        if links:
            headers = {**headers, "Link": ", ".join(links)}
        return _Reply(200, items[(page - 1) * per_page:page * per_page], headers)

    def _create_pull(self, repo: dict, body: Any, login: str) -> _Reply:
        if not isinstance(body, dict):
            raise _Reply(400, {"message": "Problems parsing JSON", "documentation_url": DOCS})
        full_name = f"{repo['owner']}/{repo['name']}"
        for field in ("title", "head", "base"):
            if not isinstance(body.get(field), str) or not body[field]:
                raise _validation_failed({"resource": "PullRequest", "field": field, "code": "missing_field"})
        head_owner, _, head_ref = body["head"].rpartition(":")
        head_owner = head_owner or repo["owner"]
        base = body["base"]
        head_sha = self._branch_sha(repo, head_ref) if head_owner.lower() == repo["owner"].lower() else None
        if head_sha is None:
            raise _validation_failed({"resource": "PullRequest", "field": "head", "code": "invalid"})
        base_sha = self._branch_sha(repo, base)
        if base_sha is None:
            raise _validation_failed({"resource": "PullRequest", "field": "base", "code": "invalid"})
        label = f"{repo['owner']}:{head_ref}"
        pulls = self.pulls.setdefault(full_name, [])
        if any(p["state"] == "open" and (p["head"]["ref"], p["base"]["ref"]) == (head_ref, base)
               for p in pulls):
            raise _validation_failed({"resource": "PullRequest", "code": "custom",
                                      "message": f"A pull request already exists for {label}."})
        ahead = _git("rev-list", "--count", f"{base_sha}..{head_sha}", cwd=repo["bare"])
        if ahead == "0":
            raise _validation_failed({"resource": "PullRequest", "code": "custom",
                                      "message": f"No commits between {base} and {head_ref}"})
        number = len(pulls) + 1
        pull = {
            "id": 5000 + sum(len(v) for v in self.pulls.values()), "number": number, "state": "open",
            "title": body["title"], "body": body.get("body"), "draft": bool(body.get("draft", False)),
            "html_url": f"{self.base_url}/{full_name}/pull/{number}",
            "url": f"{self.api_url}/repos/{full_name}/pulls/{number}",
            "head": {"ref": head_ref, "sha": head_sha, "label": label, "repo": {"full_name": full_name}},
            "base": {"ref": base, "sha": base_sha, "label": f"{repo['owner']}:{base}",
                     "repo": {"full_name": full_name}},
            "user": {"login": login}, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        pulls.append(pull)
        return _Reply(201, self._pull_json(pull), {"Location": pull["url"]})

    def _branch_sha(self, repo: dict, branch: str) -> str | None:
        if repo["bare"] is None:
            return None
        done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"],
                              cwd=repo["bare"], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    def _delete_grant(self, client_id: str, what: str, body: Any, auth: tuple[str, str] | None) -> _Reply:
        """``DELETE /applications/{client_id}/grant`` (every token of that user for this app) or
        ``.../token`` (just that token); the app authenticates with Basic client_id:client_secret."""
        if (auth is None or client_id != self.client_id or auth[0] != self.client_id
                or not _same(auth[1], self.client_secret)):
            raise _Reply(401, {"message": "Bad credentials", "documentation_url": DOCS})
        access = body.get("access_token") if isinstance(body, dict) else None
        with self._lock:
            record = self._tokens.get(access or "")
            if record is None:
                raise _not_found()
            if what == "token":
                self._revoke(access)
            else:
                for other, rec in list(self._tokens.items()):
                    if rec["login"] == record["login"] and rec["client_id"] == record["client_id"]:
                        self._revoke(other)
        return _Reply(204)

    # -- HTTP ----------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        github = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                self._serve()

            do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                query = dict(parse_qsl(parts.query, keep_blank_values=True))
                scheme, token, basic = _credentials(self.headers.get("Authorization"))
                record: dict[str, Any] = {"method": self.command, "path": parts.path, "query": query,
                                          "auth": scheme}
                with github._lock:
                    github.requests.append(record)
                git = _GIT_PATH.match(parts.path)
                if git:
                    self._git(git, parts.query, token)
                    return
                try:
                    body = self._body(record)
                    reply = github._route(self.command, parts.path, query, body, basic, token,
                                          self.headers.get("Accept", ""))
                except _Reply as raised:
                    reply = raised
                except Exception as error:  # a stand-in bug: say so rather than drop the connection
                    reply = _Reply(500, {"message": f"FakeGitHub error: {error!r}"})
                self._reply(reply)

            def _body(self, record: dict) -> Any:
                raw = read_request_body(self)
                if not raw:
                    return None
                if "json" in self.headers.get("Content-Type", "") or raw.lstrip()[:1] in (b"{", b"["):
                    try:
                        record["json"] = json.loads(raw)
                    except ValueError:
                        problem = {"message": "Problems parsing JSON", "documentation_url": DOCS}
                        raise _Reply(400, problem) from None
                    return record["json"]
                record["form"] = dict(parse_qsl(raw.decode(errors="replace"), keep_blank_values=True))
                return record["form"]

            def _git(self, match: re.Match, query: str, token: str | None) -> None:
                login = github.login_for(token)
                if login is None:
                    self._reply(_Reply(401, "", {"WWW-Authenticate": 'Basic realm="GitHub"'}))
                    return
                owner, name, rest = match.groups()
                with github._lock:
                    repo = github._repos.get(f"{owner}/{name}".lower())
                if repo is None or repo["bare"] is None:
                    self._reply(_Reply(404, "Repository not found.\n"))
                    return
                path = f"/{repo['owner']}/{repo['name']}.git/{rest}"
                run_http_backend(self, github.root, path, query, login)

            def _reply(self, reply: _Reply) -> None:
                if isinstance(reply.body, (dict, list)):
                    payload = json.dumps(reply.body).encode()
                    content_type = "application/json; charset=utf-8"
                elif isinstance(reply.body, bytes):
                    payload, content_type = reply.body, "application/x-www-form-urlencoded"
                else:
                    payload = (reply.body or "").encode()
                    content_type = "text/html; charset=utf-8"
                self.send_response(reply.status)
                if reply.status != 204:
                    self.send_header("Content-Type", content_type)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler

    def _route(self, method: str, path: str, query: dict[str, str], body: Any,
               basic: tuple[str, str] | None, token: str | None, accept: str) -> _Reply:
        if path.startswith("/api/v3/") or path == "/api/v3":
            return self._api(method, path, query, body, basic, token)
        form = {**query, **(body if isinstance(body, dict) else {})}
        form = {k: str(v) for k, v in form.items()}
        if path == "/login/oauth/authorize" and method == "GET":
            return self._authorize(query)
        if path == "/login/oauth/access_token" and method == "POST":
            return _oauth_reply(self._access_token(form, basic), accept)
        if path == "/login/device/code" and method == "POST":
            return _oauth_reply(self._device_code(form), accept)
        if path == "/login/device" and method == "GET":
            return _Reply(200, "<html><body><h1>Device Activation</h1>Enter the code</body></html>")
        raise _not_found()


def _oauth_error(error: str, description: str) -> dict:
    return {"error": error, "error_description": description,
            "error_uri": "https://docs.github.com/developers/apps/troubleshooting-oauth-app-access-token-request-errors"}


def _oauth_reply(answer: dict, accept: str) -> _Reply:
    """GitHub's token endpoints answer 200 even for errors; JSON only when asked for it."""
    if "application/json" in accept:
        return _Reply(200, answer)
    return _Reply(200, urlencode({k: v for k, v in answer.items() if v is not None}).encode())


def _credentials(header: str | None) -> tuple[str | None, str | None, tuple[str, str] | None]:
    """(scheme, token, basic user/password) from an Authorization header. With Basic, the token is
    the password, or the user name when the password is empty (both work on GitHub)."""
    if not header:
        return None, None, None
    scheme, _, value = header.strip().partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme in ("bearer", "token"):
        return scheme, value or None, None
    if scheme == "basic":
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return "basic", None, None
        return "basic", password or user or None, (user, password)
    return scheme, None, None


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison that tolerates non-ASCII input (compare_digest on str does not)."""
    return hmac.compare_digest(given.encode(), expected.encode())


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _git(*args: str, cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _write_protection_hook(bare: Path, globs: list[str]) -> None:
    """A pre-receive hook refusing updates of protected branches, worded like GitHub's GH006."""
    patterns = "|".join(f"refs/heads/{glob}" for glob in globs)
    hook = bare / "hooks" / "pre-receive"
    hook.parent.mkdir(exist_ok=True)
    hook.write_text(
        "#!/bin/sh\n"
        "# Written by FakeGitHub.protect_branch: GitHub-style branch protection.\n"
        "status=0\n"
        "while read old new ref; do\n"
        '  case "$ref" in\n'
        f"    {patterns})\n"
        '      echo "error: GH006: Protected branch update failed for $ref." >&2\n'
        '      echo "error: Changes must be made through a pull request." >&2\n'
        '      echo "error: protected branch hook declined" >&2\n'
        "      status=1;;\n"
        "  esac\n"
        "done\n"
        "exit $status\n"
    )
    hook.chmod(0o755)
