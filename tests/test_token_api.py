"""/v1/tokens as a console drives it: issue, list by page, read, delete with confirmation,
rotate; and who may call it."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.conftest import Store
from tokenwarden.config.settings import ConfigError, Settings, load_settings
from tokenwarden.producer.api import create_app
from tokenwarden.worker.domain import clock, db
from tokenwarden.worker.domain.members import add_member
from tokenwarden.worker.domain.models import AuditEntry, Token
from tokenwarden.worker.runtime.celery_app import make_celery

with warnings.catch_warnings():
    from starlette.exceptions import StarletteDeprecationWarning

    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

ADMIN = "twa_console_admin_key_0001"
PRODUCER = "twp_token_api_producer_key"
INTROSPECTION = "twi_token_api_introspect_key"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
START = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("TOKENWARDEN_")]:
        if not name.startswith("TOKENWARDEN_TEST_"):
            monkeypatch.delenv(name)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def moment() -> Iterator[Clock]:
    current = Clock()
    clock.set_clock(current)
    yield current
    clock.set_clock(None)


@pytest.fixture
def api(store: Store, tmp_path: Path, moment: Clock) -> Iterator[TestClient]:
    store.truncate()
    with db.transaction(store.engine) as session:
        for user, role in (("alice", "user"), ("root", "admin")):
            add_member(
                session,
                org_id="acme",
                user_id=user,
                role=role,
                email=f"{user}@acme.test",
                at=START - timedelta(days=1),
                now=START - timedelta(days=1),
                source="test",
            )
    configured = Settings(
        home=tmp_path,
        database_url=store.url,
        producer_keys=(PRODUCER,),
        introspection_keys=(INTROSPECTION,),
        admin_keys=(("console", ADMIN),),
    )
    with TestClient(create_app(configured, celery_app=make_celery(configured))) as client:
        yield client
    store.truncate()


def pat(**overrides: Any) -> dict[str, Any]:
    return {
        "kind": "personal",
        "org_id": "acme",
        "user_id": "alice",
        "name": "ci deploys",
        "expires_at": (START + timedelta(days=30)).isoformat(),
        "actor": "alice@console",
        **overrides,
    }


def token_count(store: Store) -> int:
    with db.transaction(store.engine) as session:
        return session.scalar(select(func.count()).select_from(Token)) or 0


def test_only_admin_keys_open_the_door(api: TestClient, store: Store) -> None:
    assert api.get("/v1/tokens").status_code == 401
    assert api.get("/v1/tokens", headers={"Authorization": "Bearer nope"}).status_code == 401
    for other in (PRODUCER, INTROSPECTION):
        answer = api.post("/v1/tokens", json=pat(), headers={"Authorization": f"Bearer {other}"})
        assert answer.status_code == 403
    assert api.post("/v1/tokens", json=pat()).status_code == 401
    # The key is checked before the body is read: a caller without one learns nothing of
    # what the door thinks of a body, malformed or not.
    broken = {"Content-Type": "application/json"}
    for path in ("/v1/tokens", "/v1/tokens/tok_any/rotate"):
        assert api.post(path, content=b"{not json", headers=broken).status_code == 401
        foreign = {**broken, "Authorization": f"Bearer {PRODUCER}"}
        assert api.post(path, content=b"{not json", headers=foreign).status_code == 403
    assert token_count(store) == 0


def test_issue_follows_the_cli_rules_and_shows_the_token_once(
    api: TestClient, store: Store
) -> None:
    made = api.post("/v1/tokens", json=pat(), headers=AUTH)
    assert made.status_code == 201, made.text
    issued = made.json()
    assert issued["token"].startswith("sm_pat_")
    assert issued["kind"] == "personal"
    shown = api.get(f"/v1/tokens/{issued['id']}", headers=AUTH).json()
    assert "state" in shown, shown
    assert shown["state"] == "active"
    assert shown["last4"] == issued["token"][-4:]
    assert issued["token"] not in api.get(f"/v1/tokens/{issued['id']}", headers=AUTH).text
    refusals = [
        (pat(user_id="mallory"), "not_member"),
        (pat(expires_at=(START - timedelta(days=1)).isoformat()), "expiry_in_past"),
        ({**pat(kind="application", user_id=None), "app_id": "ci"}, "no_creator"),
    ]
    for body, reason in refusals:
        answer = api.post("/v1/tokens", json=body, headers=AUTH)
        assert answer.status_code == 422, answer.text
        assert answer.json()["reason"] == reason
    for bad in (pat(kind="magic"), pat(expires_at="tomorrow"), pat(actor=""), {"x": 1}):
        assert api.post("/v1/tokens", json=bad, headers=AUTH).status_code == 422
    assert token_count(store) == 1
    with db.transaction(store.engine) as session:
        row = session.scalars(select(AuditEntry).where(AuditEntry.action == "create")).one()
    assert (row.source, row.actor) == ("api:console", "alice@console")


def test_list_by_pages_never_shows_a_secret(api: TestClient) -> None:
    texts = [api.post("/v1/tokens", json=pat(name=f"t{i}"), headers=AUTH).json() for i in range(5)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = {"limit": 2, "org_id": "acme", **({"cursor": cursor} if cursor else {})}
        answer = api.get("/v1/tokens", params=query, headers=AUTH)
        assert answer.status_code == 200
        for made in texts:
            assert made["token"] not in answer.text
        seen += [item["id"] for item in answer.json()["items"]]
        pages += 1
        cursor = answer.json()["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert sorted(seen) == sorted(made["id"] for made in texts)
    other = api.get("/v1/tokens", params={"org_id": "globex"}, headers=AUTH).json()
    assert other == {"items": [], "next_cursor": None}
    assert api.get("/v1/tokens", params={"limit": 0}, headers=AUTH).status_code == 422
    assert api.get("/v1/tokens", params={"state": "odd"}, headers=AUTH).status_code == 422


def test_delete_needs_confirmation_and_twice_changes_nothing(api: TestClient, store: Store) -> None:
    made = api.post("/v1/tokens", json=pat(), headers=AUTH).json()
    path = f"/v1/tokens/{made['id']}"
    refused = api.delete(path, headers=AUTH)
    assert refused.status_code == 400
    assert "confirm=DELETE" in refused.json()["detail"]
    wrong = api.request("DELETE", path, json={"confirm": "yes"}, headers=AUTH)
    assert wrong.status_code == 400
    nobody = api.delete(path, params={"confirm": "DELETE"}, headers=AUTH)
    assert nobody.status_code == 400
    assert "actor" in nobody.json()["detail"]
    assert api.get(path, headers=AUTH).json()["state"] == "active"
    first = api.request(
        "DELETE", path, json={"confirm": "DELETE", "actor": "bob@console"}, headers=AUTH
    )
    assert first.status_code == 200
    assert first.json()["changed"] is True
    again = api.delete(path, params={"confirm": "DELETE", "actor": "bob"}, headers=AUTH)
    assert again.status_code == 200
    assert again.json() == {
        "id": made["id"],
        "changed": False,
        "state": "revoked",
    }
    assert (
        api.delete(
            "/v1/tokens/tok_nothing", params={"confirm": "DELETE", "actor": "bob"}, headers=AUTH
        ).status_code
        == 404
    )
    with db.transaction(store.engine) as session:
        rows = session.scalars(
            select(AuditEntry).where(
                AuditEntry.token_id == made["id"], AuditEntry.action == "revoke"
            )
        ).all()
    assert [(row.reason, row.source, row.actor) for row in rows] == [
        ("deleted", "api:console", "bob@console")
    ]


def test_admin_keys_are_named_and_kept_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENWARDEN_ADMIN_KEYS", "console:" + ADMIN)
    assert load_settings().admin_keys == (("console", ADMIN),)
    for bad in (ADMIN, "console:short", f"a:{ADMIN},a:{ADMIN}x"):
        monkeypatch.setenv("TOKENWARDEN_ADMIN_KEYS", bad)
        with pytest.raises(ConfigError, match="TOKENWARDEN_ADMIN_KEYS"):
            load_settings()
    monkeypatch.setenv("TOKENWARDEN_ADMIN_KEYS", f"console:{PRODUCER}")
    monkeypatch.setenv("TOKENWARDEN_PRODUCER_KEYS", PRODUCER)
    with pytest.raises(ConfigError, match="TOKENWARDEN_ADMIN_KEYS"):
        load_settings()


def test_hostile_callers_are_refused_cheaply(api: TestClient, store: Store) -> None:
    huge = b'{"name": "' + b"x" * (64 * 1024) + b'"}'
    for headers, status in (({}, 401), (AUTH, 413)):
        answer = api.post(
            "/v1/tokens", content=huge, headers={**headers, "Content-Type": "application/json"}
        )
        assert answer.status_code == status

    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield b" " * 1024

    streamed = api.post("/v1/tokens", content=chunks(), headers=AUTH)
    assert streamed.status_code == 413
    guesses = [
        api.get("/v1/tokens", headers={"Authorization": f"Bearer {ADMIN[:-1]}x{n}"})
        for n in range(200)
    ]
    assert {guess.status_code for guess in guesses} == {401}
    future = pat(expires_at="9999-12-31T23:59:59+00:00", org_id="\\u0000")
    assert api.post("/v1/tokens", json=future, headers=AUTH).status_code == 422
    assert token_count(store) == 0
