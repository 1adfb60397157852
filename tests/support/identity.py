"""A second and third user for ownership tests: JupyterHub-like token identities.

Requests with ``Authorization: token alice-token`` are user ``alice``, ``bob-token`` is ``bob``,
and the server's own token is user ``owner``: stable names, as under JupyterHub.
"""

from __future__ import annotations

from jupyter_server.auth.identity import IdentityProvider, User

USERS = {"alice-token": "alice", "bob-token": "bob"}


class TokenUsers(IdentityProvider):
    def get_user(self, handler):
        auth = handler.request.headers.get("Authorization", "")
        token = auth[len("token ") :] if auth.startswith("token ") else None
        name = USERS.get(token or "") or ("owner" if token and token == self.token else None)
        if name is None:
            return None
        handler._token_authenticated = True  # as Jupyter's own token auth: no XSRF for API clients
        return User(name)


def headers(user: str) -> dict[str, str]:
    token = {v: k for k, v in USERS.items()}[user]
    return {"Authorization": f"token {token}"}
