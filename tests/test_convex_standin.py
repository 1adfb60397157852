"""Self-test of the loopback Convex stand-in (tests/support/convex_standin): it answers in Convex's
HTTP API shapes, refuses what a Convex deployment with tabbi's auth config refuses, keeps one
user's rows from another through the real functions, and its fault switches do what they say.

The attacker here holds a valid JWT of their own (or none) and crafts requests by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

import tests.support.convex_standin as standin_module
from tests.support.convex_standin import ConvexStandin, SigningKey, convex_standin  # noqa: F401

pytestmark = pytest.mark.usefixtures("convex_standin")


def call(standin: ConvexStandin, kind: str, path: str, args: dict, token: str | None = None,
         **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    payload = {"path": path, "args": args, "format": "json", **body}
    return httpx.post(f"{standin.url}/api/{kind}", json=payload, headers=headers, timeout=30)


def new_session(session_id: str, owner: str) -> dict:
    return {"session": {"id": session_id, "owner": owner, "repo": "/r", "work_branch": "tabbi/x",
                        "state": "idle", "sandbox_state": "{}", "created_at": 0}}


@pytest.fixture
def standin(convex_standin: ConvexStandin) -> ConvexStandin:  # noqa: F811
    convex_standin.reset()
    return convex_standin


def test_success_and_function_error_shapes(standin):
    alice = standin.user_token("alice")
    created = call(standin, "mutation", "sessions:create", new_session("ses-1", "alice"), alice)
    assert created.status_code == 200
    body = created.json()
    assert body["status"] == "success" and body["value"]["owner"] == "alice"
    # Convex's own JS client sends this format, with the args in a list.
    listed = call(standin, "query", "sessions:list", [{}], alice, format="convex_encoded_json")  # type: ignore[arg-type]
    assert [s["id"] for s in listed.json()["value"]] == ["ses-1"]

    refused = call(standin, "mutation", "sessions:update", {"id": "nope", "fields": {}}, alice)
    assert refused.status_code == 560
    error = refused.json()
    assert error["status"] == "error" and error["errorData"]["code"] == "not_found"
    assert isinstance(error["errorMessage"], str)
    # A value the function's own checks refuse, and one Convex's validator refuses (no data).
    bad = call(standin, "query", "events:list", {"session_id": "ses-1", "after": 2**64, "limit": 5}, alice)
    assert (bad.status_code, bad.json()["errorData"]["code"]) == (560, "invalid")
    not_a_number = {"session_id": "ses-1", "after": "x", "limit": 5}
    wrong_type = call(standin, "query", "events:list", not_a_number, alice)
    assert wrong_type.status_code == 560 and "errorData" not in wrong_type.json()


def test_unknown_internal_and_wrong_kind_functions_are_refused_like_convex(standin):
    """Internal functions (the session purge) are not reachable over HTTP without the deploy
    key; a caller cannot tell them from missing ones."""
    alice = standin.user_token("alice")
    for path in ("sessions:purge", "sessions:nope", "nope:list", "_generated/api:api", "sessions"):
        reply = call(standin, "mutation", path, {}, alice)
        assert reply.status_code == 560, path
        assert reply.json()["errorMessage"].startswith(f"Could not find public function for '{path}'")
    as_query = call(standin, "query", "sessions:create", new_session("ses-1", "alice"), alice)
    assert as_query.status_code == 560 and "defined as Mutation" in as_query.json()["errorMessage"]
    assert standin.stats()["calls"].get("sessions:create") is None  # nothing ran


def test_malformed_requests_are_400(standin):
    url = f"{standin.url}/api/query"
    assert httpx.post(url, content=b"{not json", timeout=30).status_code == 400
    for body in ({"args": {}}, {"path": "health:ping", "args": {}, "format": "xml"},
                 {"path": "health:ping", "args": {"$bad": 1}}):
        assert httpx.post(url, json=body, timeout=30).status_code == 400, body
    assert httpx.get(f"{standin.url}/api/query", timeout=30).status_code == 404


def test_jwts_are_checked_as_the_auth_config_says(standin):
    """Forged, expired, misaddressed and confused tokens are refused before any function runs."""
    now = int(time.time())
    keys = standin.keys
    claims = {"iss": keys.issuer, "sub": "alice", "aud": keys.audience, "iat": now, "exp": now + 300}
    assert call(standin, "query", "sessions:list", {}, keys.user.sign(claims)).status_code == 200

    def refused(token: str) -> str:
        reply = call(standin, "query", "sessions:list", {}, token)
        assert reply.status_code == 401, reply.text
        return reply.json()["code"]

    mallory = SigningKey.generate()
    assert refused(mallory.sign(claims, {"kid": keys.user.kid})) == "Unauthenticated"  # not the key
    assert refused(keys.user.sign({**claims, "exp": now - 1})) == "Unauthenticated"  # expired
    assert refused(keys.user.sign({k: v for k, v in claims.items() if k != "exp"})) == "Unauthenticated"
    assert refused(keys.user.sign({**claims, "aud": "other-app"})) == "NoAuthProvider"
    assert refused(keys.user.sign({**claims, "aud": [keys.audience, "other"]})) == "Unauthenticated"
    assert refused(keys.user.sign({**claims, "iss": "https://evil.test"})) == "NoAuthProvider"
    # A user key cannot mint a server token: the server issuer has its own key set.
    assert refused(keys.user.sign({**claims, "iss": keys.server_issuer})) == "Unauthenticated"
    # alg confusion: "none", and an HMAC "signed" with the public key set's text.
    head, payload, _ = keys.user.sign(claims).split(".")
    assert refused(f"{head}.{payload}.") == "Unauthenticated"
    assert refused(keys.user.sign(claims, {"alg": "HS256"})) == "Unauthenticated"
    assert refused("not-a-jwt") == "InvalidAuthHeader"
    assert refused(f"bnVsbA.{payload}.") == "InvalidAuthHeader"  # a header of JSON null
    assert refused(keys.user.sign(claims, {"kid": None})) == "Unauthenticated"  # no kid: refused
    # Deploy keys are not implemented (and must never reach a tabbi server): refused.
    reply = httpx.post(f"{standin.url}/api/query", json={"path": "sessions:list", "args": {}},
                       headers={"Authorization": "Convex prod:abc|xyz"}, timeout=30)
    assert reply.status_code == 401
    # No token at all reaches the function as anonymous, which refuses.
    anonymous = call(standin, "query", "sessions:list", {})
    assert (anonymous.status_code, anonymous.json()["errorData"]["code"]) == (560, "unauthenticated")


def test_another_users_data_is_refused_through_http(standin):
    """Bob, with a valid token of his own, tries every way at Alice's session and token."""
    alice, bob = standin.user_token("alice"), standin.user_token("bob")
    call(standin, "mutation", "sessions:create", new_session("ses-a", "alice"), alice)
    call(standin, "mutation", "events:append",
         {"session_id": "ses-a", "key": "k1", "events": [{"type": "t", "data": "{}", "ts": 1}]}, alice)
    call(standin, "mutation", "tokens:put", {"provider": "github", "ciphertext": "c2VjcmV0"}, alice)

    assert call(standin, "query", "sessions:get", {"id": "ses-a"}, bob).json()["value"] is None
    assert call(standin, "query", "events:list", {"session_id": "ses-a", "after": 0, "limit": 10},
                bob).json()["value"] == []
    assert call(standin, "query", "tokens:get", {"provider": "github"}, bob).json()["value"] is None
    into_alices = {"session_id": "ses-a", "key": "k2", "events": [{"type": "x", "data": "{}", "ts": 1}]}
    appended = call(standin, "mutation", "events:append", into_alices, bob)
    assert appended.json()["errorData"]["code"] == "not_found"
    as_alice = call(standin, "mutation", "sessions:create", new_session("ses-b", "alice"), bob)
    assert as_alice.json()["errorData"]["code"] == "forbidden"
    # A server token may do server work, never read a user's events.
    server = standin.server_token("srv-a")
    assert call(standin, "query", "leases:list", {}, server).status_code == 200
    events = call(standin, "query", "events:list", {"session_id": "ses-a", "after": 0, "limit": 10}, server)
    assert events.json()["errorData"]["code"] == "forbidden"
    assert call(standin, "query", "leases:list", {}, alice).json()["errorData"]["code"] == "forbidden"
    assert call(standin, "query", "events:lastSeq", {"session_id": "ses-a"}, alice).json()["value"] == 1


def test_fault_switches(standin):
    alice = standin.user_token("alice")
    call(standin, "mutation", "sessions:create", new_session("ses-1", "alice"), alice)
    batch = {"session_id": "ses-1", "key": "b1", "events": [{"type": "t", "data": "{}", "ts": 1}]}

    # Before: the call is answered with the status and nothing runs.
    standin.faults(fail_next=1, status=502)
    assert call(standin, "mutation", "events:append", batch, alice).status_code == 502
    assert call(standin, "query", "events:lastSeq", {"session_id": "ses-1"}, alice).json()["value"] == 0

    # After: the function ran, the answer is lost; the retry with the same key returns the first
    # result and appends nothing.
    standin.faults(fail_next=1, error_phase="after")
    assert call(standin, "mutation", "events:append", batch, alice).status_code == 503
    retried = call(standin, "mutation", "events:append", batch, alice)
    assert [e["seq"] for e in retried.json()["value"]] == [1]
    assert call(standin, "query", "events:lastSeq", {"session_id": "ses-1"}, alice).json()["value"] == 1

    standin.faults(error_rate=1.0, status=500)
    assert call(standin, "query", "health:ping", {}).status_code == 500

    standin.faults(outage=True)
    with pytest.raises(httpx.TransportError):
        call(standin, "query", "health:ping", {})

    # No answer: the write happens, the client times out; the retry returns the first result.
    standin.faults(no_answer=True)
    second = {**batch, "key": "b2"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{standin.url}/api/mutation", json={"path": "events:append", "args": second},
                   headers={"Authorization": f"Bearer {alice}"}, timeout=httpx.Timeout(30, read=1))
    standin.faults()
    retried = call(standin, "mutation", "events:append", second, alice).json()["value"]
    assert [e["seq"] for e in retried] == [2]
    assert call(standin, "query", "events:lastSeq", {"session_id": "ses-1"}, alice).json()["value"] == 2

    standin.faults(latency_ms=300)
    started = time.monotonic()
    assert call(standin, "query", "health:ping", {}).status_code == 200
    assert time.monotonic() - started >= 0.3  # a lower bound: the switch delays, however loaded

    standin.faults()
    stats = standin.stats()
    assert (stats["faulted"], stats["reset_connections"], stats["unanswered"]) == (3, 1, 1)
    with pytest.raises(httpx.HTTPStatusError):
        standin.faults(error_rate=2)
    assert httpx.post(f"{standin.url}/_standin/reset", timeout=30).status_code == 403  # admin only


def test_convexs_own_http_client_accepts_the_answers(standin):
    """The reference client (ConvexHttpClient of the pinned `convex` package, which sends the
    `convex_encoded_json` format) reads the stand-in's success and error answers as Convex's."""
    env = {**os.environ, "STANDIN_URL": standin.url, "STANDIN_TOKEN": standin.user_token("alice")}
    script = Path(standin_module.__file__).parent / "official_client.mts"
    done = subprocess.run([str(standin_module.TSX), str(script)], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["ping"] == {"value": True}
    assert got["created"]["value"]["owner"] == "alice"
    assert got["appended"]["value"] == [{"seq": 1, "type": "t", "data": "{}", "ts": 1}]
    assert got["refused"]["error"] == "ConvexError" and got["refused"]["data"]["code"] == "not_found"
    assert "Could not find public function" in got["missing"]["message"]
