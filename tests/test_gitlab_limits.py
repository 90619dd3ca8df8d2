"""GitLab's revocation endpoint takes at most as many tokens a request as a batch of events."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from starlette.exceptions import StarletteDeprecationWarning

from tests.conftest import Store
from tokenwarden.config.settings import Settings
from tokenwarden.producer.api import create_app
from tokenwarden.producer.schemas import MAX_BATCH
from tokenwarden.worker.domain.db import transaction
from tokenwarden.worker.domain.models import InboxEvent, TokenKind
from tokenwarden.worker.domain.tokens import generate
from tokenwarden.worker.runtime.celery_app import make_celery

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

SECRET = "gl-" + "limits-secret"
PAT_TYPE = "gitleaks_rule_id_tokenwarden_personal_access_token"


@pytest.fixture(autouse=True)
def _own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("TOKENWARDEN_")]:
        if not name.startswith("TOKENWARDEN_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def api(store: Store, home: Path) -> Iterator[TestClient]:
    settings = Settings(home=home, database_url=store.url, gitlab_revocation_token=SECRET)
    celery_app = make_celery(settings)
    with TestClient(create_app(settings, celery_app=celery_app)) as client:
        yield client
    celery_app.close()
    store.truncate()


def findings(count: int) -> bytes:
    body = [
        {"type": PAT_TYPE, "token": generate(TokenKind.PERSONAL), "location": None}
        for _ in range(count)
    ]
    return json.dumps(body).encode()


def post(api: TestClient, body: bytes) -> tuple[int, str]:
    response = api.post(
        "/v1/revoke_tokens",
        content=body,
        headers={"Authorization": SECRET, "Content-Type": "application/json"},
    )
    return response.status_code, response.text


def stored_count(store: Store) -> int:
    with transaction(store.engine) as session:
        return int(session.scalar(select(func.count()).select_from(InboxEvent)) or 0)


def queued_messages(home: Path) -> int:
    return len(list((home / "broker" / "queue").glob("*.msg")))


@pytest.mark.parametrize("count", [MAX_BATCH + 1, 7000])
def test_more_tokens_than_a_batch_is_refused_whole_and_stores_nothing(
    api: TestClient, store: Store, home: Path, count: int
) -> None:
    body = findings(count)
    assert len(body) < 1024 * 1024  # under the body cap: the count alone refuses it

    status, text = post(api, body)

    assert status == 413
    assert json.loads(text) == {
        "detail": f"the request has {count} tokens; at most {MAX_BATCH} per request: "
        "send them in several requests"
    }
    assert stored_count(store) == 0
    assert queued_messages(home) == 0


def test_a_full_batch_of_tokens_is_taken(api: TestClient, store: Store) -> None:
    assert post(api, findings(MAX_BATCH))[0] == 204
    assert stored_count(store) == MAX_BATCH


def test_openapi_says_why_a_request_is_too_large(api: TestClient) -> None:
    post_ = api.get("/openapi.json").json()["paths"]["/v1/revoke_tokens"]["post"]
    assert f"more than {MAX_BATCH} tokens" in post_["responses"]["413"]["description"]
