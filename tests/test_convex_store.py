"""What ``ConvexStore`` adds to the store contract (``test_store_contract.py`` runs that against it):
the JWTs it signs, how it reads Convex's answers, retries that never duplicate a write, its
behaviour while Convex is away, and per-user authorization as the store meets it. All against the
loopback stand-in serving the real functions through Convex's HTTP API."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tabbi_extension.store import (
    ConvexStore,
    NewEvent,
    Prompt,
    SessionRecord,
    StoreError,
    StoreUnavailable,
    convex_auth,
)
from tabbi_extension.store.convex import ConvexRefused
from tests.support.convex_standin import (  # noqa: F401 (convex_standin: a fixture)
    ConvexStandin,
    SigningKey,
    convex_standin,
)
from tests.support.convex_store import make_store, store_env, wait_until


def record(session_id: str, owner: str = "alice") -> SessionRecord:
    return SessionRecord(id=session_id, owner=owner, repo="/r", work_branch="tabbi/x")


@pytest.fixture
def standin(convex_standin: ConvexStandin) -> ConvexStandin:  # noqa: F811
    convex_standin.reset()
    yield convex_standin
    convex_standin.faults()


@pytest.fixture
def store(standin, jp_asyncio_loop):
    instance = make_store(standin)
    jp_asyncio_loop.run_until_complete(instance.open())
    yield instance
    jp_asyncio_loop.run_until_complete(instance.close())


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


# -- the JWTs ------------------------------------------------------------------------------------
def test_tokens_are_es256_jwts_with_the_claims_convex_checks_and_reused_until_near_expiry(monkeypatch):
    key = ec.generate_private_key(ec.SECP256R1())
    now = [1_800_000_000.0]
    monkeypatch.setattr(convex_auth.time, "time", lambda: now[0])
    signer = convex_auth.TokenSigner(key, "https://tabbi.example", "tabbi", "kid-1")
    token = signer.token("alice")
    header, claims, signature = token.split(".")
    assert json.loads(_b64decode(header)) == {"alg": "ES256", "typ": "JWT", "kid": "kid-1"}
    assert json.loads(_b64decode(claims)) == {
        "iss": "https://tabbi.example", "sub": "alice", "aud": "tabbi",
        "iat": 1_800_000_000, "exp": 1_800_000_300}
    raw = _b64decode(signature)  # JOSE: r || s, 32 bytes each (not DER)
    assert len(raw) == 64
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    key.public_key().verify(der, f"{header}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))
    assert signer.token("bob") != token  # one per subject
    now[0] += 239
    assert signer.token("alice") == token  # cached while more than a minute is left
    now[0] += 2
    assert signer.token("alice") != token  # then signed afresh


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_the_key_is_checked_and_its_jwks_printed_for_the_deployment(tmp_path, capsys):
    with pytest.raises(convex_auth.SigningKeyError, match="P-256"):
        convex_auth.load_private_key(_pem(ec.generate_private_key(ec.SECP384R1())).decode())
    with pytest.raises(convex_auth.SigningKeyError, match="cannot be read"):
        convex_auth.load_private_key(str(tmp_path / "missing.pem"))
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "key.pem"
    path.write_bytes(_pem(key))
    assert convex_auth.main(["jwks", str(path)]) == 0
    [jwk] = json.loads(capsys.readouterr().out)["keys"]
    assert jwk["kid"] == convex_auth.thumbprint(key) and jwk["alg"] == "ES256"
    assert "d" not in jwk  # the public half only
    numbers = key.public_key().public_numbers()
    assert _b64decode(jwk["x"]) == numbers.x.to_bytes(32, "big")
    assert convex_auth.main(["jwks", str(path), "kid-7", "--uri"]) == 0
    uri = capsys.readouterr().out.strip()
    assert uri.startswith("data:text/plain;charset=utf-8;base64,")
    [named] = json.loads(base64.b64decode(uri.split(",", 1)[1]))["keys"]
    assert named == {**jwk, "kid": "kid-7"}


async def test_a_deployment_given_the_printed_key_set_accepts_a_store_naming_only_the_key_file(
        tmp_path, capsys, monkeypatch):
    """The documented set-up end to end: the key set the command prints goes to the deployment,
    and a store given only the key file (its kid: the key's thumbprint, as printed) is accepted."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "user-key.pem"
    path.write_bytes(_pem(key))
    assert convex_auth.main(["jwks", str(path), "--uri"]) == 0
    [printed] = json.loads(base64.b64decode(capsys.readouterr().out.split(",", 1)[1]))["keys"]
    # The stand-in makes its deployment's key sets from its keys: give it this one.
    server_key = SigningKey.generate()
    keys = iter([SigningKey(printed["kid"], _pem(key).decode()), server_key])
    monkeypatch.setattr(SigningKey, "generate", classmethod(lambda cls: next(keys)))
    with ConvexStandin.start() as standin:
        [deployed] = json.loads(base64.b64decode(standin.keys.user.jwks_data_uri().split(",", 1)[1]))["keys"]
        assert deployed == printed
        store = ConvexStore(url=standin.url, jwt_key=str(path), jwt_issuer=standin.keys.issuer,
                            server_jwt_key=server_key.private_pem, server_jwt_key_id=server_key.kid)
        await store.open()
        try:
            await store.create_session(record("ses-1"))
            assert [s.id for s in await store.list_sessions("alice")] == ["ses-1"]
        finally:
            await store.close()


async def test_configured_from_the_environment(standin, monkeypatch):
    """A deployment sets the URL and keys from its secrets, as environment variables."""
    for name, value in store_env(standin).items():
        monkeypatch.setenv(name, value)
    store = ConvexStore()
    await store.open()
    try:
        assert store.url == standin.url
        await store.create_session(record("ses-env"))
        assert (await store.get_session("ses-env")).owner == "alice"
    finally:
        await store.close()


async def test_a_jwt_the_deployment_refuses_is_signed_again_once_then_a_permanent_error(standin):
    """A kid the deployment does not know (a rotated key not yet published): the store signs
    afresh once (Convex may have refused an expired one), then says what to check."""
    store = make_store(standin, jwt_key_id="unknown-kid", retry_for=5.0)
    await store.open()
    try:
        with pytest.raises(StoreError, match="JWT was refused") as refused:
            await store.upsert_user("alice", {})
        assert not isinstance(refused.value, StoreUnavailable)
        assert standin.stats()["calls"].get("users:upsert", 0) == 0  # no function ran
    finally:
        await store.close()


# -- answers and errors ----------------------------------------------------------------------------
async def test_refusals_are_permanent_errors_with_the_functions_codes(store):
    await store.create_session(record("ses-1"))
    await store.enqueue_prompt(Prompt("p1", "ses-1", "one", "queued", 1.0))
    with pytest.raises(ConvexRefused) as conflict:
        await store.enqueue_prompt(Prompt("p1", "ses-1", "another text", "queued", 1.0))
    assert conflict.value.code == "conflict" and not isinstance(conflict.value, StoreUnavailable)
    with pytest.raises(ConvexRefused) as missing:
        await store.append_events("ses-nope", [NewEvent("x", {})])
    assert missing.value.code == "not_found"
    with pytest.raises(ConvexRefused) as invalid:
        await store.list_events("ses-1", after=-1)
    assert invalid.value.code == "invalid"


async def test_a_store_asking_with_the_wrong_persons_identity_gets_nothing(store, standin):
    """Threat: a bug (or an attacker steering the server) makes the store call about Alice's
    session with Mallory's identity. Convex authorizes by the JWT's subject: Mallory's token
    reads nothing of Alice's and writes nothing into her log, whatever session id it names."""
    await store.create_session(record("ses-a", owner="alice"))
    await store.append_events("ses-a", [NewEvent("secret", {"t": "alice's"})])
    await store.put_token("alice", "github", b"sealed")
    mallory = make_store(standin)
    await mallory.open()
    try:
        mallory._owners["ses-a"] = "mallory"  # the wrong owner, as a confused server would use
        assert await mallory.list_events("ses-a") == []
        assert await mallory.last_seq("ses-a") == 0
        assert await mallory.list_messages("ses-a") == []
        with pytest.raises(ConvexRefused) as refused:
            await mallory.append_events("ses-a", [NewEvent("forged", {})])
        assert refused.value.code == "not_found"  # indistinguishable from a missing session
        assert await mallory.get_token("mallory", "github") is None
        assert [s.id for s in await mallory.list_sessions("mallory")] == []
    finally:
        await mallory.close()
    assert [e.type for e in await store.list_events("ses-a")] == ["secret"]


# -- retries never duplicate -------------------------------------------------------------------
async def test_writes_whose_answer_was_lost_are_retried_and_applied_once(store, standin):
    """The function ran, but its answer never arrived (a 503 after the commit): the store
    retries with the same idempotency key and gets the first result, never a second write."""
    await store.put_token("alice", "github", b"v1")

    async def lose_one_answer(call):
        standin.faults(fail_next=1, status=503, error_phase="after")
        faulted = standin.stats()["faulted"]
        result = await call()
        assert standin.stats()["faulted"] == faulted + 1  # the answer really was lost once
        return result

    await lose_one_answer(lambda: store.create_session(record("ses-1")))
    assert len(await store.list_sessions("alice")) == 1
    events = await lose_one_answer(
        lambda: store.append_events("ses-1", [NewEvent("a", {"n": 1}), NewEvent("b", {"n": 2})]))
    assert [e.seq for e in events] == [1, 2]
    assert [(e.seq, e.type) for e in await store.list_events("ses-1")] == [(1, "a"), (2, "b")]
    prompt = await lose_one_answer(lambda: store.enqueue_prompt(Prompt("p1", "ses-1", "t", "queued", 5.0)))
    assert prompt.position == 1
    assert [p.position for p in await store.pending_prompts("ses-1")] == [1]
    assert await lose_one_answer(lambda: store.swap_token("alice", "github", b"v1", b"v2")) is True
    assert await store.get_token("alice", "github") == b"v2"
    assert await lose_one_answer(lambda: store.claim_session("ses-1", "srv-a", None)) is True
    # A caller's own retry of a batch the store gave up on carries the same key as well.
    batch = [NewEvent("c", {"n": 3})]
    quick = make_store(standin, retry_for=0.0)
    await quick.open()
    try:
        await quick.get_session("ses-1")  # knows the owner, as a running server does
        standin.faults(error_rate=1.0, status=503, error_phase="after")
        with pytest.raises(StoreUnavailable):
            await quick.append_events("ses-1", batch)
        standin.faults()
        assert [e.seq for e in await quick.append_events("ses-1", batch)] == [3]
    finally:
        await quick.close()
    assert await store.last_seq("ses-1") == 3


async def test_convex_away_then_back(store, standin):
    """An outage: calls are retried while Convex is away, health (``trouble``) says why, and the
    waiting write lands once, when Convex is back."""
    await store.create_session(record("ses-1"))
    assert await store.ping() is True and store.trouble() is None
    standin.faults(outage=True)
    write = asyncio.ensure_future(store.append_events("ses-1", [NewEvent("x", {})]))
    await wait_until(lambda: store.trouble() is not None, "the store notices the outage")
    assert "unreachable" in store.trouble()
    assert await store.ping() is False
    assert not write.done()
    standin.faults()
    assert [e.seq for e in await write] == [1]
    assert store.trouble() is None
    assert [e.seq for e in await store.list_events("ses-1")] == [1]


async def test_a_long_outage_ends_in_store_unavailable_and_health_recovers(standin):
    store = make_store(standin, retry_for=0.5)
    await store.open()
    try:
        await store.create_session(record("ses-1"))
        standin.faults(status=502, error_rate=1.0)
        with pytest.raises(StoreUnavailable, match="HTTP 502"):
            await store.append_events("ses-1", [NewEvent("x", {})])
        assert "HTTP 502" in store.trouble()
        standin.faults()
        assert await store.ping() is True
        assert store.trouble() is None  # nothing is waiting any more: healthy again
        assert await store.last_seq("ses-1") == 0  # "before": nothing of it ran
    finally:
        await store.close()


async def test_what_convex_cannot_hold_in_one_piece(store, standin):
    """A value over a Convex document's size (a megabyte file the agent wrote, in a tool's input)
    is stored with its longest strings shortened, instead of failing the batch it is in; a batch
    over one mutation's limits is written in parts, still numbered in order."""
    await store.create_session(record("ses-1"))
    huge = {"tool": "write", "input": {"content": "x" * 1_500_000, "filePath": "big.txt"}}
    assert [e.seq for e in await store.append_events("ses-1", [NewEvent("tool", huge)])] == [1]
    stored = (await store.list_events("ses-1"))[0].data
    assert stored["input"]["filePath"] == "big.txt" and stored["tool"] == "write"
    assert stored["input"]["content"].startswith("x" * 1000)
    assert stored["input"]["content"].endswith("more characters]")
    assert len(json.dumps(stored)) <= 900_000
    before = standin.stats()["calls"]["events:append"]
    many = await store.append_events("ses-1", [NewEvent("n", {"i": i}) for i in range(700)])
    assert [e.seq for e in many] == list(range(2, 702))
    assert standin.stats()["calls"]["events:append"] == before + 2
    assert [e.data["i"] for e in await store.list_events("ses-1", after=1)] == list(range(700))
