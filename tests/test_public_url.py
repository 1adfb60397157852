"""Personal mode behind a proxy: GitHub's callback is built from the public URL when one is set,
whichever route the request came by (here a kernel's, on 127.0.0.1), and never from forwarding
headers a client can send. Hub mode's counterpart, from a kernel on a real hub:
tests/test_hub.py::test_github_callback_uses_the_public_url_from_a_kernel.

Threat: whoever can put headers on a request (a hostile page's fetch through a misconfigured
proxy, or the agent's own requests) sets ``X-Forwarded-Host: attacker.example`` so that GitHub
sends the person's sign-in code to the attacker's host."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from tabbi_extension.github.handlers import CALLBACK_PATH
from tests.support.api import Api
from tests.test_github import github, tabbi_config  # noqa: F401  (fixtures used here)

PUBLIC = "https://proxy.example.test/jupyter/"
FORWARDED = {"X-Forwarded-Host": "attacker.example", "X-Forwarded-Proto": "https",
             "X-Forwarded-Port": "443", "X-Forwarded-Prefix": "/evil", "Forwarded": "host=attacker.example"}
LOGIN = """
from urllib.parse import parse_qs, urlsplit
from tabbi_kernel import client
print("REDIRECT", parse_qs(urlsplit(client.connect().login("web")["url"]).query)["redirect_uri"][0])
"""


def redirect_of(attempt: dict) -> str:
    return parse_qs(urlsplit(attempt["url"]).query)["redirect_uri"][0]


@pytest.mark.tabbi(public_url=PUBLIC)
async def test_behind_a_proxy_a_kernels_sign_in_link_uses_the_public_url(kernel, jp_fetch):
    done = await kernel.run(LOGIN)
    assert done.error is None, done
    assert done.stdout.split("REDIRECT ", 1)[1].strip() == PUBLIC + CALLBACK_PATH
    # Forwarding headers change nothing once the public URL is known.
    attempt = await Api(jp_fetch, FORWARDED).ok("POST", "tabbi/api/github/login", {"flow": "web"}, expect=201)
    assert redirect_of(attempt) == PUBLIC + CALLBACK_PATH


async def test_without_a_public_url_forwarding_headers_are_not_trusted(jp_fetch, jp_http_port):
    """No public URL: the callback is the address the request reached (Jupyter's
    ``trust_xheaders`` is off by default), not one a client names in headers."""
    attempt = await Api(jp_fetch, FORWARDED).ok("POST", "tabbi/api/github/login", {"flow": "web"}, expect=201)
    redirect = redirect_of(attempt)
    assert "attacker.example" not in redirect and "/evil" not in redirect
    assert urlsplit(redirect).scheme == "http" and urlsplit(redirect).port == jp_http_port, redirect
