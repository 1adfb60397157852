"""GitHub for tabbi: sign-in (OAuth web and device flows), tokens kept encrypted, the REST calls
tabbi needs (user, repositories, pull requests).

``oauth`` speaks the OAuth protocol, ``rest`` the REST API, ``accounts`` keeps each person's
token (encrypted, refreshed before it expires) and the sign-ins in progress; ``handlers`` are the
HTTP routes. Nothing here is imported by the kernel side.
"""

from .accounts import GitHubAccounts, GitHubError, LoginRequired
from .rest import GitHubHosts

__all__ = ["GitHubAccounts", "GitHubError", "GitHubHosts", "LoginRequired"]
