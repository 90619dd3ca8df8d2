"""The Shared Signals push receiver (RFC 8935) as a transmitter sees it.

SETs are signed with real keys served from a loopback JWKS endpoint. The API's own checks run
on the test store; the mapped events are applied end to end by a real worker (see the last
section), on the embedded default and on Postgres with RabbitMQ.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc.jwk import RSAKey
from sqlalchemy import func, select
from starlette.exceptions import StarletteDeprecationWarning

from tests.conftest import Store
from tests.ssf_transmitter import (
    CAEP,
    MEDIA_TYPE,
    RISC,
    Transmitter,
    account_disabled,
    credential_compromise,
    credential_revoked,
)
from tests.stack import LIVE_STACKS, LiveStack, run_live
from tokenwarden.config.settings import Settings, SsfTransmitter
from tokenwarden.producer.api import create_app
from tokenwarden.worker.domain import clock
from tokenwarden.worker.domain.db import transaction
from tokenwarden.worker.domain.handlers import apply_pending
from tokenwarden.worker.domain.issuing import create_token
from tokenwarden.worker.domain.members import add_member
from tokenwarden.worker.domain.models import AuditEntry, InboxEvent, Token, TokenKind
from tokenwarden.worker.runtime.celery_app import make_celery

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

PATH = "/v1/ssf/events"


@pytest.fixture(autouse=True)
def _own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("TOKENWARDEN_")]:
        if not name.startswith("TOKENWARDEN_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def transmitter() -> Iterator[Transmitter]:
    sender = Transmitter()
    yield sender
    sender.close()


@pytest.fixture
def api(store: Store, transmitter: Transmitter, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        home=tmp_path / "home",
        database_url=store.url,
        ssf_transmitters=(SsfTransmitter(**transmitter.config()),),
    )
    celery_app = make_celery(settings)
    with TestClient(create_app(settings, celery_app=celery_app)) as client:
        yield client
    celery_app.close()
    store.truncate()


def push(api: TestClient | str, token: bytes, media_type: str = MEDIA_TYPE) -> httpx.Response:
    headers = {"Content-Type": media_type, "Accept": "application/json"}
    if isinstance(api, str):
        return httpx.post(f"{api}{PATH}", content=token, headers=headers, timeout=30)
    response: httpx.Response = api.post(PATH, content=token, headers=headers)
    return response


def inbox(store: Store) -> dict[str, InboxEvent]:
    with transaction(store.engine) as session:
        return {row.id: row for row in session.scalars(select(InboxEvent))}


def ssf_audit(store: Store) -> list[AuditEntry]:
    with transaction(store.engine) as session:
        return list(session.scalars(select(AuditEntry).where(AuditEntry.action.like("ssf%"))))


def member_with_pat(store: Store, *, email: str | None = None) -> tuple[str, str]:
    """A member of acme with a PAT: (user id, token id)."""
    user = f"u-{uuid.uuid4().hex[:8]}"
    now = clock.now()
    with transaction(store.engine) as session:
        add_member(
            session,
            org_id="acme",
            user_id=user,
            role="user",
            email=email,
            at=now - timedelta(days=1),
            now=now,
            source="test",
        )
        issued = create_token(
            session,
            kind=TokenKind.PERSONAL,
            org_id="acme",
            name="ci",
            expires_at=now + timedelta(days=30),
            now=now,
            user_id=user,
        )
    return user, issued.id


def apply_all(store: Store) -> None:
    with transaction(store.engine) as session:
        apply_pending(session, list(inbox(store)), now=clock.now(), retryable=lambda _: False)


def token_state(store: Store, token_id: str) -> tuple[str, str | None]:
    with transaction(store.engine) as session:
        token = session.get(Token, token_id)
        assert token is not None
        return token.state, token.revoke_reason


# --- mapping -------------------------------------------------------------------------------


def test_account_disabled_by_email_becomes_user_deactivated(
    api: TestClient, store: Store, transmitter: Transmitter
) -> None:
    user, token_id = member_with_pat(store, email="Ada@Example.test")
    claims = transmitter.claims(*account_disabled("ada@example.test"))

    response = push(api, transmitter.sign(claims))

    assert response.status_code == 202, response.text
    (row,) = inbox(store).values()
    assert (row.id, row.type, row.source) == (
        claims["jti"],
        "user.deactivated",
        "ssf:" + claims["iss"],
    )
    assert row.data == {"user_id": user}
    assert row.time == datetime.fromtimestamp(claims["iat"], UTC)
    apply_all(store)
    assert token_state(store, token_id) == ("revoked", "user_deactivated")


@pytest.mark.parametrize(
    "subject",
    [
        {"format": "iss_sub", "iss": "https://idp", "sub": "USER"},
        {"format": "opaque", "id": "USER"},
    ],
)
def test_account_purged_by_id_becomes_user_deactivated(
    api: TestClient, store: Store, transmitter: Transmitter, subject: dict[str, str]
) -> None:
    user, _ = member_with_pat(store)
    named = {k: (user if v == "USER" else v) for k, v in subject.items()}
    claims = transmitter.claims(RISC + "account-purged", {}, sub_id=named)
    assert push(api, transmitter.sign(claims, key=transmitter.ec_key)).status_code == 202
    assert [row.data for row in inbox(store).values()] == [{"user_id": user}]


def test_credential_compromise_of_our_token_becomes_a_leak(
    api: TestClient, store: Store, transmitter: Transmitter
) -> None:
    _, token_id = member_with_pat(store)
    assert (
        push(
            api, transmitter.sign(transmitter.claims(*credential_compromise(token_id)))
        ).status_code
        == 202
    )
    (row,) = inbox(store).values()
    assert (row.type, row.data) == (
        "token.leak_suspected",
        {"token_id": token_id, "reporter": "ssf"},
    )
    apply_all(store)
    assert token_state(store, token_id) == ("revoked", "leaked")


def test_a_credential_named_by_its_hash_is_found(
    api: TestClient, store: Store, transmitter: Transmitter
) -> None:
    _, token_id = member_with_pat(store)
    with transaction(store.engine) as session:
        token_hash = session.get(Token, token_id).token_hash  # type: ignore[union-attr]
    claims = transmitter.claims(*credential_compromise(token_hash))
    assert push(api, transmitter.sign(claims)).status_code == 202
    assert [row.data["token_id"] for row in inbox(store).values()] == [token_id]


def test_credential_change_revoke_becomes_a_revoke_request(
    api: TestClient, store: Store, transmitter: Transmitter
) -> None:
    _, token_id = member_with_pat(store)
    assert (
        push(api, transmitter.sign(transmitter.claims(*credential_revoked(token_id)))).status_code
        == 202
    )
    (row,) = inbox(store).values()
    assert (row.type, row.data) == (
        "token.revoke_requested",
        {"token_id": token_id, "actor": "ssf"},
    )
    apply_all(store)
    assert token_state(store, token_id) == ("revoked", "deleted")


def test_other_events_are_acknowledged_audited_and_counted_as_ignored(
    api: TestClient, store: Store, transmitter: Transmitter
) -> None:
    _, token_id = member_with_pat(store)
    sent = [
        transmitter.claims(CAEP + "session-revoked", {"subject": {"format": "opaque", "id": "x"}}),
        transmitter.claims(
            CAEP + "credential-change",
            {"subject": {"format": "opaque", "id": token_id}, "change_type": "create"},
        ),
    ]
    for claims in sent:
        assert push(api, transmitter.sign(claims)).status_code == 202
    assert inbox(store) == {}
    assert sorted((e.action, e.event_id) for e in ssf_audit(store)) == sorted(
        ("ssf_ignored", c["jti"]) for c in sent
    )
    assert token_state(store, token_id) == ("active", None)
    assert 'tokenwarden_ssf_events_total{outcome="ignored"} 2.0' in api.get("/metrics").text


def test_an_unknown_subject_is_acknowledged_and_audited_once(
    api: TestClient, store: Store, transmitter: Transmitter
) -> None:
    claims = transmitter.claims(*account_disabled("nobody@example.test"))
    token = transmitter.sign(claims)
    assert [push(api, token).status_code for _ in range(2)] == [202, 202]
    assert inbox(store) == {}
    (entry,) = ssf_audit(store)
    assert (entry.action, entry.event_id, entry.source) == (
        "ssf_unknown_subject",
        claims["jti"],
        "ssf:" + claims["iss"],
    )
    assert entry.detail == {"event_type": RISC + "account-disabled", "subject_format": "email"}


def test_a_replayed_jti_changes_nothing(
    api: TestClient, store: Store, transmitter: Transmitter
) -> None:
    _, token_id = member_with_pat(store)
    token = transmitter.sign(transmitter.claims(*credential_compromise(token_id)))
    assert push(api, token).status_code == 202
    apply_all(store)
    with transaction(store.engine) as session:
        audit_before = session.scalar(select(func.count()).select_from(AuditEntry))

    replays = [push(api, token).status_code for _ in range(3)]
    apply_all(store)

    assert replays == [202, 202, 202]
    (row,) = inbox(store).values()
    assert row.status == "done"
    with transaction(store.engine) as session:
        assert session.scalar(select(func.count()).select_from(AuditEntry)) == audit_before


# --- refusals ------------------------------------------------------------------------------


def _refusals(transmitter: Transmitter, token_id: str) -> dict[str, tuple[bytes, str]]:
    event = credential_compromise(token_id)
    good = transmitter.claims(*event)
    stranger = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
    rogue = RSAKey.generate_key(2048, parameters={"kid": "not-published"})
    now = int(time.time())
    return {
        "expired": (transmitter.sign(good | {"exp": now - 3600}), "invalid_request"),
        "issued in the future": (transmitter.sign(good | {"iat": now + 3600}), "invalid_request"),
        "wrong audience": (transmitter.sign(good | {"aud": "https://other"}), "invalid_audience"),
        "wrong issuer": (transmitter.sign(good | {"iss": "https://evil"}), "invalid_issuer"),
        "unknown kid": (transmitter.sign(good, key=rogue), "invalid_key"),
        "alg none": (transmitter.unsigned(good), "authentication_failed"),
        "HS256 with the public key": (
            transmitter.hs256_with_public_key(good),
            "authentication_failed",
        ),
        "another key under a published kid": (
            transmitter.sign(good, key=stranger),
            "authentication_failed",
        ),
        "RSA key named for ES256": (
            transmitter.sign(good, alg="ES256", kid="rsa-1", key=transmitter.ec_key),
            "invalid_key",
        ),
        "no jti": (
            transmitter.sign({k: v for k, v in good.items() if k != "jti"}),
            "invalid_request",
        ),
        "two events": (
            transmitter.sign(good | {"events": dict([event, credential_revoked(token_id)])}),
            "invalid_request",
        ),
        "not a JWS": (b"hello", "invalid_request"),
    }


def test_every_forged_or_misaddressed_set_is_refused_with_its_code_and_nothing_stored(
    api: TestClient, store: Store, transmitter: Transmitter
) -> None:
    _, token_id = member_with_pat(store)
    for name, (token, err) in _refusals(transmitter, token_id).items():
        response = push(api, token)
        assert response.status_code == 400, (name, response.text)
        assert response.json()["err"] == err, name
        assert set(response.json()) == {"err", "description"}
    assert inbox(store) == {}
    assert ssf_audit(store) == []
    assert token_state(store, token_id) == ("active", None)


def test_a_set_sent_as_another_media_type_or_too_large_is_invalid_request(
    api: TestClient, store: Store, transmitter: Transmitter
) -> None:
    token = transmitter.sign(transmitter.claims(*account_disabled("a@example.test")))
    assert push(api, token, "application/json").json()["err"] == "invalid_request"
    padded = transmitter.sign(
        transmitter.claims(*account_disabled("a@example.test"), pad="x" * 70_000)
    )
    assert push(api, padded).json()["err"] == "invalid_request"
    assert inbox(store) == {}


def test_unknown_kids_fetch_the_jwks_at_most_once_a_minute(
    api: TestClient, store: Store, transmitter: Transmitter
) -> None:
    before = transmitter.server.fetches
    claims = transmitter.claims(*account_disabled("a@example.test"))
    for number in range(20):
        rogue = (
            RSAKey.generate_key(2048, parameters={"kid": f"rotated-{number}"})
            if number < 2
            else None
        )
        token = (
            transmitter.sign(claims, key=rogue)
            if rogue
            else transmitter.sign(claims, kid=f"k{number}")
        )
        assert push(api, token).json()["err"] == "invalid_key"
    assert transmitter.server.fetches - before <= 1


def test_keys_found_through_the_ssf_configuration(
    store: Store, transmitter: Transmitter, tmp_path: Path
) -> None:
    settings = Settings(
        home=tmp_path / "home",
        database_url=store.url,
        ssf_transmitters=(SsfTransmitter(**transmitter.config(via_configuration=True)),),
    )
    celery_app = make_celery(settings)
    user, _ = member_with_pat(store, email="grace@example.test")
    try:
        with TestClient(create_app(settings, celery_app=celery_app)) as client:
            claims = transmitter.claims(*account_disabled("grace@example.test"))
            assert push(client, transmitter.sign(claims)).status_code == 202
    finally:
        celery_app.close()
    assert [row.data for row in inbox(store).values()] == [{"user_id": user}]
    store.truncate()


def test_transmitters_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenwarden.config.settings import ConfigError, load_settings

    for value, message in [
        ("nope", "must be a JSON list"),
        ('[{"issuer": "x", "audience": "a"}]', "give jwks_uri or configuration_url"),
        ('[{"issuer": "x", "jwks_uri": "https://k"}]', "0.audience"),
        # Entries that are not objects: one line naming the variable, never a traceback.
        *((entry, "TOKENWARDEN_SSF_TRANSMITTERS") for entry in ("[1]", '["x"]', "[null]", "[[]]")),
    ]:
        monkeypatch.setenv("TOKENWARDEN_SSF_TRANSMITTERS", value)
        with pytest.raises(ConfigError, match="TOKENWARDEN_SSF_TRANSMITTERS") as raised:
            load_settings()
        assert message in str(raised.value)
    monkeypatch.setenv(
        "TOKENWARDEN_SSF_TRANSMITTERS",
        json.dumps([{"issuer": "x", "audience": "a", "jwks_uri": "https://k"}]),
    )
    assert load_settings().ssf_transmitters[0].issuer == "x"


# --- end to end: a real API, worker and broker -----------------------------------------------


@pytest.fixture(
    scope="module",
    params=LIVE_STACKS,
)
def live(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    transmitter: Transmitter,
) -> Iterator[LiveStack]:
    extra = {"TOKENWARDEN_SSF_TRANSMITTERS": json.dumps([transmitter.config()])}
    yield from run_live(request.param, tmp_path_factory.mktemp(f"ssf-{request.param}"), extra)


def live_member(live: LiveStack, email: str) -> tuple[str, Any, Any]:
    """A user in two orgs with a PAT in each and an application token: (user, pat, aat)."""
    suffix = uuid.uuid4().hex[:8]
    org, user = f"org-{suffix}", f"user-{suffix}"
    now = datetime.now(UTC) - timedelta(seconds=5)
    with live.session() as session:
        for where in (org, org + "-b"):
            add_member(
                session,
                org_id=where,
                user_id=user,
                role="user",
                email=email,
                at=now,
                now=now,
                source="test",
            )
    pat = live.token(TokenKind.PERSONAL, org, user, at=now)
    aat = live.token(TokenKind.APPLICATION, org, "deployer", created_by=user, at=now)
    return user, pat, aat


pytest_slow = pytest.mark.slow


@pytest_slow
@pytest.mark.parametrize("risc_event", ["account-disabled", "account-purged"])
def test_a_disabled_or_purged_account_loses_its_pats_end_to_end(
    live: LiveStack, transmitter: Transmitter, risc_event: str
) -> None:
    email = f"{uuid.uuid4().hex[:8]}@example.test"
    user, pat, aat = live_member(live, email)
    other = live.token(TokenKind.PERSONAL, pat.org_id + "-b", user)
    event, fields = account_disabled(email)
    claims = transmitter.claims(event.replace("account-disabled", risc_event), fields)
    assert push(live.api_url, transmitter.sign(claims)).status_code == 202
    live.wait_for(lambda: live.verify(pat.token).reason == "revoked", message="the PAT revoked")
    assert live.verify(other.token).reason == "revoked"
    assert live.verify(aat.token).usable
    (row,) = live.events(claims["jti"])
    assert (row["type"], row["source"]) == ("user.deactivated", "ssf:" + transmitter.issuer)


@pytest_slow
@pytest.mark.parametrize(
    ("signal", "reason"),
    [(credential_compromise, "leaked"), (credential_revoked, "deleted")],
)
def test_a_compromised_or_revoked_credential_is_revoked_end_to_end(
    live: LiveStack, transmitter: Transmitter, signal: Any, reason: str
) -> None:
    _, pat, aat = live_member(live, f"{uuid.uuid4().hex[:8]}@example.test")
    token = transmitter.sign(transmitter.claims(*signal(aat.id)))
    assert push(live.api_url, token).status_code == 202
    live.wait_for(lambda: live.verify(aat.token).reason == "revoked", message="the AAT revoked")
    assert live.verify(pat.token).usable
    with live.session() as session:
        assert session.get(Token, aat.id).revoke_reason == reason  # type: ignore[union-attr]
    # Delivered again (the transmitter did not hear our 202): nothing more happens.
    assert push(live.api_url, token).status_code == 202
    with live.session() as session:
        entries = session.scalars(select(AuditEntry).where(AuditEntry.token_id == aat.id))
        assert [e.action for e in entries if e.action == "revoke"] == ["revoke"]


def test_a_jti_shaped_like_one_of_our_tokens_is_refused_not_stored(
    api: TestClient, store: Store, transmitter: Transmitter
) -> None:
    from tokenwarden.worker.domain.tokens import generate

    member_with_pat(store, email="jti@example.test")
    claims = transmitter.claims(
        *account_disabled("jti@example.test"), jti=generate(TokenKind.PERSONAL)
    )
    response = push(api, transmitter.sign(claims))
    assert response.status_code == 400
    assert response.json()["err"] == "invalid_request"
    assert claims["jti"] not in response.text
    assert inbox(store) == {}


def test_openapi_describes_the_ssf_endpoint(api: TestClient) -> None:
    operation = api.get("/openapi.json").json()["paths"][PATH]["post"]
    assert set(operation["responses"]) == {"202", "400", "409", "503"}
    assert list(operation["requestBody"]["content"]) == [MEDIA_TYPE]


@pytest_slow
def test_a_flood_of_forged_sets_fetches_no_more_keys_and_stores_nothing(
    live: LiveStack, transmitter: Transmitter
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    email = f"{uuid.uuid4().hex[:8]}@example.test"
    _, pat, _ = live_member(live, email)
    claims = transmitter.claims(*account_disabled(email))
    forged = [
        transmitter.sign(claims | {"jti": f"forged-{n}"}, kid=f"made-up-{n}") for n in range(100)
    ] + [transmitter.hs256_with_public_key(claims | {"jti": f"hs-{n}"}) for n in range(100)]
    # The keys once fetched (a subject nobody has): while the very first fetch runs, SETs
    # naming other kids are answered 503, to be sent again.
    warm_up = transmitter.claims(*account_disabled("nobody@example.test"))
    assert push(live.api_url, transmitter.sign(warm_up)).status_code == 202
    before = transmitter.server.fetches
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda token: push(live.api_url, token), forged))
    assert {a.status_code for a in answers} == {400}
    assert {a.json()["err"] for a in answers} == {"invalid_key", "authentication_failed"}
    assert transmitter.server.fetches - before <= 1
    assert live.events(*[f"forged-{n}" for n in range(100)], *[f"hs-{n}" for n in range(100)]) == []
    assert live.verify(pat.token).usable
    # The transmitter's own SET still goes through.
    assert push(live.api_url, transmitter.sign(claims)).status_code == 202
    live.wait_for(lambda: live.verify(pat.token).reason == "revoked", message="the PAT revoked")


def test_a_rotated_key_is_picked_up_on_its_first_use_once_a_minute_has_passed(
    transmitter: Transmitter,
) -> None:
    import asyncio

    from tokenwarden.producer.key_cache import UnknownKey
    from tokenwarden.producer.ssf.keys import TransmitterKeys

    now = [1000.0]
    keys = TransmitterKeys(SsfTransmitter(**transmitter.config()), clock=lambda: now[0])
    rotated = RSAKey.generate_key(2048, parameters={"kid": "rsa-2"})
    try:
        assert asyncio.run(keys.key("rsa-1")).kid == "rsa-1"
        transmitter.publish(transmitter.key, transmitter.ec_key, rotated)
        now[0] += 30  # too soon to fetch again: the new kid is unknown for now
        with pytest.raises(UnknownKey):
            asyncio.run(keys.key("rsa-2"))
        now[0] += 31
        assert asyncio.run(keys.key("rsa-2")).kid == "rsa-2"
        assert asyncio.run(keys.key("ec-1")).kid == "ec-1"  # cached, no fetch
    finally:
        transmitter.publish(transmitter.key, transmitter.ec_key)
