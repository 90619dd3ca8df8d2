"""GitLab's Token Revocation API, as a GitLab instance calls it."""

from __future__ import annotations

import base64
import json
import os
import secrets
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from sqlalchemy import select
from starlette.exceptions import StarletteDeprecationWarning

from tests.conftest import Store
from tokenwarden.config.settings import Settings
from tokenwarden.producer.api import create_app
from tokenwarden.worker.domain import clock
from tokenwarden.worker.domain.db import transaction
from tokenwarden.worker.domain.handlers import apply_pending
from tokenwarden.worker.domain.models import AuditEntry, Base, InboxEvent, Token, TokenKind
from tokenwarden.worker.domain.tokens import generate, hash_token
from tokenwarden.worker.runtime.celery_app import make_celery

with warnings.catch_warnings():
    # Starlette 1.x would rather its test client ran on httpx2, and says so on import.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

SECRET = "gl-revocation-" + "s3cr3t"
AUTH = {"Authorization": SECRET}
PAT_TYPE = "gitleaks_rule_id_tokenwarden_personal_access_token"
AAT_TYPE = "gitleaks_rule_id_tokenwarden_application_access_token"
LOCATION = "https://gitlab.example/acme/app/-/blob/5f1c0e2/.env"


@pytest.fixture(autouse=True)
def _own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the settings each test builds count, not the developer's environment."""
    for name in [n for n in os.environ if n.startswith("TOKENWARDEN_")]:
        if not name.startswith("TOKENWARDEN_TEST_"):
            monkeypatch.delenv(name)


Start = Callable[..., TestClient]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def start(store: Store, home: Path) -> Iterator[Start]:
    """Start the API on the test store with the revocation token given (SECRET by default)."""
    opened: list[tuple[TestClient, Any]] = []

    def run(**options: Any) -> TestClient:
        defaults: dict[str, Any] = {
            "home": home,
            "database_url": store.url,
            "gitlab_revocation_token": SECRET,
        }
        settings = Settings(**(defaults | options))
        celery_app = make_celery(settings)
        client = TestClient(create_app(settings, celery_app=celery_app))
        client.__enter__()
        opened.append((client, celery_app))
        return client

    yield run
    for client, celery_app in opened:
        client.__exit__(None, None, None)
        celery_app.close()
    store.truncate()


@pytest.fixture
def api(start: Start) -> TestClient:
    return start()


def revoke(api: TestClient, tokens: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    body = tokens if isinstance(tokens, bytes) else json.dumps(tokens).encode()
    response: httpx.Response = api.post(
        "/v1/revoke_tokens",
        content=body,
        headers=(AUTH if headers is None else headers) | {"Content-Type": "application/json"},
    )
    return response


def finding(token: str, kind: str = PAT_TYPE, location: str | None = LOCATION) -> dict[str, Any]:
    return {"type": kind, "token": token, "location": location}


def add_token(store: Store, kind: TokenKind = TokenKind.PERSONAL) -> str:
    text = generate(kind)
    now = clock.now()
    with transaction(store.engine) as session:
        session.add(
            Token(
                id="tok_" + secrets.token_hex(8),
                kind=kind.value,
                org_id="acme",
                user_id="u-1" if kind is TokenKind.PERSONAL else None,
                app_id="app-1" if kind is TokenKind.APPLICATION else None,
                created_by="u-1",
                name="ci",
                token_hash=hash_token(text),
                last4=text[-4:],
                created_at=now - timedelta(days=1),
                expires_at=now + timedelta(days=30),
            )
        )
    return text


def stored(store: Store) -> dict[str, InboxEvent]:
    with transaction(store.engine) as session:
        return {row.id: row for row in session.scalars(select(InboxEvent))}


def queue_files(home: Path) -> list[str]:
    return [path.read_text() for path in sorted((home / "broker" / "queue").glob("*.msg"))]


def queued_ids(home: Path) -> list[str]:
    ids = []
    for raw in queue_files(home):
        ids += json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]
    return ids


def test_lists_the_revocable_token_types(api: TestClient) -> None:
    response = api.get("/v1/revocable_token_types", headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"types": [PAT_TYPE, AAT_TYPE]}
    assert api.get("/v1/revocable_token_types").status_code == 401


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": ""}, 401),
        ({"Authorization": "wrong"}, 401),
        ({"Authorization": SECRET + "x"}, 401),
        ({"Authorization": SECRET[:-1]}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": "Basic " + SECRET}, 401),
        ({"Authorization": SECRET}, 204),
        ({"Authorization": "Bearer " + SECRET}, 204),
        ({"Authorization": "bearer " + SECRET}, 204),
    ],
    ids=[
        "none",
        "empty",
        "wrong",
        "longer",
        "shorter",
        "wrong-bearer",
        "basic",
        "raw",
        "bearer",
        "lowercase-bearer",
    ],
)
def test_only_the_shared_secret_is_accepted(
    api: TestClient, store: Store, headers: dict[str, str], status: int
) -> None:
    token = generate(TokenKind.PERSONAL)
    response = revoke(api, [finding(token)], headers=headers)
    assert response.status_code == status
    types = api.get("/v1/revocable_token_types", headers=headers)
    assert types.status_code == (200 if status == 204 else 401)
    if status == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert stored(store) == {}


@pytest.mark.parametrize("configured", [None, "", "   "])
def test_without_a_configured_secret_every_call_is_refused(
    start: Start, store: Store, configured: str | None
) -> None:
    api = start(gitlab_revocation_token=configured)
    for headers in ({}, {"Authorization": ""}, {"Authorization": "Bearer "}, AUTH):
        response = revoke(api, [finding(generate(TokenKind.PERSONAL))], headers=headers)
        assert response.status_code == 401
        assert "TOKENWARDEN_GITLAB_REVOCATION_TOKEN" in response.json()["detail"]
        assert api.get("/v1/revocable_token_types", headers=headers).status_code == 401
    assert stored(store) == {}


def test_the_secret_is_checked_before_the_body(api: TestClient) -> None:
    assert revoke(api, b"not json", headers={}).status_code == 401
    assert revoke(api, b"x" * (1024 * 1024 + 1), headers={}).status_code == 401


def test_every_well_formed_token_of_a_listed_type_is_stored(
    api: TestClient, store: Store, home: Path
) -> None:
    ours, app_token = add_token(store), add_token(store, TokenKind.APPLICATION)
    stranger = generate(TokenKind.APPLICATION)
    typo = ours[:-1] + ("A" if ours[-1] != "A" else "B")
    response = revoke(
        api,
        [
            finding(ours),
            finding(app_token, AAT_TYPE),
            # Either type names either kind: the token's prefix says which it is.
            finding(stranger, PAT_TYPE, location=None),
            finding(typo),
            finding("glpat-" + "x" * 20),
        ],
    )
    assert response.status_code == 204
    assert response.content == b""
    rows = stored(store)
    by_hash = {row.data["token_hash"]: row for row in rows.values()}
    assert set(by_hash) == {hash_token(t) for t in (ours, app_token, stranger)}
    for row in rows.values():
        assert row.id.startswith("leak-gitlab-")
        assert (row.type, row.source, row.status) == ("token.leak_suspected", "gitlab", "pending")
    assert by_hash[hash_token(ours)].data == {
        "token_hash": hash_token(ours),
        "source_url": LOCATION,
        "reporter": "gitlab",
    }
    assert by_hash[hash_token(stranger)].data == {
        "token_hash": hash_token(stranger),
        "reporter": "gitlab",
    }
    assert sorted(queued_ids(home)) == sorted(rows)


def test_the_worker_revokes_what_gitlab_reported(api: TestClient, store: Store) -> None:
    ours = add_token(store, TokenKind.APPLICATION)
    assert revoke(api, [finding(ours, AAT_TYPE)]).status_code == 204
    with transaction(store.engine) as session:
        outcome = apply_pending(
            session, list(stored(store)), now=clock.now(), retryable=lambda _: False
        )
    assert len(outcome.done) == 1
    with transaction(store.engine) as session:
        token = session.scalars(select(Token).where(Token.token_hash == hash_token(ours))).one()
        entry = session.scalars(select(AuditEntry).where(AuditEntry.token_id == token.id)).one()
    assert (token.state, token.revoke_reason) == ("revoked", "leaked")
    assert (entry.source, entry.actor) == ("gitlab", "gitlab")
    assert entry.detail == {"source_url": LOCATION, "reporter": "gitlab"}


def test_a_request_with_nothing_revocable_is_still_204(api: TestClient, store: Store) -> None:
    for body in ([], [finding("nope")], [finding("glpat-" + "x" * 20)]):
        assert revoke(api, body).status_code == 204
    assert stored(store) == {}


def test_a_token_type_we_do_not_list_is_400_and_nothing_of_the_request_is_stored(
    api: TestClient, store: Store
) -> None:
    ours = add_token(store)
    response = revoke(
        api, [finding(ours), finding(generate(TokenKind.PERSONAL), "gitleaks_rule_id_aws")]
    )
    assert response.status_code == 400
    assert response.json()["detail"] == (
        "report 1: the token type 'gitleaks_rule_id_aws' is not supported; "
        "GET /v1/revocable_token_types lists those that are"
    )
    assert stored(store) == {}


def test_a_resend_is_stored_once_under_the_same_ids(api: TestClient, store: Store) -> None:
    ours = add_token(store)
    batch = [finding(ours), finding(ours, location=LOCATION + "#L9"), finding(ours)]
    assert revoke(api, batch).status_code == 204
    ids = set(stored(store))
    assert len(ids) == 2
    assert revoke(api, batch).status_code == 204
    assert set(stored(store)) == ids


def test_fields_gitlab_adds_are_ignored(api: TestClient, store: Store) -> None:
    sent = finding(generate(TokenKind.PERSONAL)) | {"vulnerability": {"id": 7, "state": "new"}}
    assert revoke(api, [sent]).status_code == 204
    assert len(stored(store)) == 1


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"type": "t", "token": "x"}',
        b'"text"',
        b"[null]",
        b'[{"type": "t"}]',
        b'[{"token": "x"}]',
        b'[{"type": 1, "token": "x"}]',
        b'[{"type": "t", "token": "x", "location": 5}]',
        b"[Infinity]",
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_a_body_that_is_not_an_array_of_the_documented_objects_is_400_and_stores_nothing(
    api: TestClient, store: Store, body: bytes
) -> None:
    response = revoke(api, body)
    assert response.status_code == 400
    assert response.json()["detail"]
    assert stored(store) == {}


def test_a_store_that_is_down_answers_503(start: Start) -> None:
    api = start(database_url="postgresql+psycopg://postgres@127.0.0.1:1/none")
    response = revoke(api, [finding(generate(TokenKind.PERSONAL))])
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"


def test_no_token_text_is_stored_logged_queued_or_echoed(
    api: TestClient, store: Store, home: Path
) -> None:
    ours, stranger = add_token(store), generate(TokenKind.PERSONAL)
    with structlog.testing.capture_logs() as logs:
        responses = [
            revoke(api, [finding(t, location=f"{LOCATION}?t={t}") for t in (ours, stranger)]),
            revoke(api, [{"type": PAT_TYPE, "token": ours}, {"token": stranger}]),
        ]
    assert [r.status_code for r in responses] == [204, 400]
    with store.engine.connect() as connection:
        rows = "\n".join(
            repr(row)
            for table in Base.metadata.sorted_tables
            for row in connection.execute(table.select())
        )
    assert "sm_pat_***" in rows  # the token in the location, masked
    [line] = [line for line in logs if line["event"] == "leaks.reported"]
    assert (line["reports"], line["dropped"]) == (2, 0)
    for text in (rows, repr(logs), "\n".join(queue_files(home)), *(r.text for r in responses)):
        for token in (ours, stranger):
            assert token not in text
            assert token[7:39] not in text


def test_openapi_describes_the_gitlab_endpoints(api: TestClient) -> None:
    schema = api.get("/openapi.json").json()
    types = schema["paths"]["/v1/revocable_token_types"]["get"]
    assert set(types["responses"]) == {"200", "401", "429"}
    post = schema["paths"]["/v1/revoke_tokens"]["post"]
    assert set(post["responses"]) == {"204", "400", "401", "413", "429", "503"}
    items = post["requestBody"]["content"]["application/json"]["schema"]["items"]
    assert set(items["required"]) == {"type", "token"}
    assert post["security"] == [{"gitlabRevocationToken": []}]
    scheme = schema["components"]["securitySchemes"]["gitlabRevocationToken"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "Authorization")


def test_past_the_rate_limit_each_call_is_429_with_retry_after(start: Start, store: Store) -> None:
    api = start(leak_rate_per_minute=6, leak_rate_burst=3)
    statuses = [revoke(api, [finding(generate(TokenKind.PERSONAL))]) for _ in range(3)]
    assert [r.status_code for r in statuses] == [204, 204, 204]

    refused = revoke(api, [finding(generate(TokenKind.PERSONAL))])
    types = api.get("/v1/revocable_token_types", headers=AUTH)

    for response in (refused, types):
        assert response.status_code == 429
        # One request every ten seconds refills the budget.
        assert 1 <= int(response.headers["Retry-After"]) <= 10
    assert len(stored(store)) == 3


def test_callers_without_the_secret_use_up_their_budget_too(start: Start, store: Store) -> None:
    api = start(leak_rate_per_minute=1, leak_rate_burst=5)
    flood = [revoke(api, [], headers={"Authorization": "guess"}) for _ in range(50)]
    assert [r.status_code for r in flood[:5]] == [401] * 5
    assert {r.status_code for r in flood[5:]} == {429}
    assert stored(store) == {}
