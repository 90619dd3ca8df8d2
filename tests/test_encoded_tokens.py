"""A token percent-encoded in a leak's public URL is masked like a plain one, on every door.

GitHub's ``url``, GitLab's ``location`` and ``source_url`` of ``POST /v1/events`` are stored,
audited and sent in notices; a token in them may be percent-encoded, in part or whole, once or
twice. None of these places, nor a log line, may hold it in any encoding.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
import structlog
from sqlalchemy import insert, select
from starlette.exceptions import StarletteDeprecationWarning

from tests.conftest import Store
from tests.test_github import KeysServer, Signer
from tokenwarden.config.settings import Settings
from tokenwarden.producer.api import create_app
from tokenwarden.producer.github import GitHubKeys
from tokenwarden.worker.domain import clock
from tokenwarden.worker.domain.db import transaction
from tokenwarden.worker.domain.handlers import apply_pending
from tokenwarden.worker.domain.members import add_member
from tokenwarden.worker.domain.models import (
    AuditEntry,
    Base,
    EventStatus,
    InboxEvent,
    Notice,
    Token,
    TokenKind,
)
from tokenwarden.worker.domain.tokens import WITHHELD, generate, hash_token, mask_encoded_tokens
from tokenwarden.worker.runtime.celery_app import make_celery

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

PRODUCER = {"Authorization": "Bearer twp_encoded_test_key"}
GITLAB_SECRET = "gl-" + "revocation-secret"
PAT_TYPE = "gitleaks_rule_id_tokenwarden_personal_access_token"


def _every_byte(text: str) -> str:
    return "".join(f"%{byte:02X}" for byte in text.encode())


# How a token may sit in a URL: each form is one a browser, a proxy or a scanner produces.
ENCODINGS: dict[str, Callable[[str], str]] = {
    "underscores": lambda t: t.replace("_", "%5F"),
    "lowercase-hex": lambda t: t.replace("_", "%5f"),
    "one-underscore": lambda t: t[:6] + "%5F" + t[7:],
    "double": lambda t: t.replace("_", "%255F"),
    "double-lowercase": lambda t: t.replace("_", "%255f"),
    "every-byte": _every_byte,
    "every-byte-double": lambda t: quote(_every_byte(t), safe=""),
    "triple": lambda t: t.replace("_", "%25255F"),
    "plain-beside-escapes": lambda t: t + "%20",
}


def exposed(text: str, token: str) -> bool:
    """Whether ``text`` holds the secret part of ``token``, percent-encoded or not."""
    secret = token[7:20]
    for _ in range(8):
        if secret in text:
            return True
        text = unquote(text)
    return secret in text


def gist_url(encoded: str) -> str:
    return f"https://gist.example/x?lang=en&t={encoded}&page=2"


@pytest.fixture(autouse=True)
def _own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("TOKENWARDEN_")]:
        if not name.startswith("TOKENWARDEN_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture
def keys_server() -> Iterator[KeysServer]:
    server = KeysServer()
    yield server
    server.close()


@pytest.fixture
def signer(keys_server: KeysServer) -> Signer:
    made = Signer()
    keys_server.publish(made.entry())
    return made


@pytest.fixture
def api(store: Store, keys_server: KeysServer, tmp_path: Path) -> Iterator[TestClient]:
    """The API on the test store, every door open: producer key, GitLab secret, GitHub keys."""
    settings = Settings(
        home=tmp_path / "home",
        database_url=store.url,
        producer_keys=("twp_encoded_test_key",),
        gitlab_revocation_token=GITLAB_SECRET,
        github_keys_url=keys_server.url,
    )
    celery_app = make_celery(settings)
    keys = GitHubKeys(settings.github_keys_url, deadline_s=2.0)
    with TestClient(create_app(settings, celery_app=celery_app, github_keys=keys)) as client:
        yield client
    celery_app.close()
    store.truncate()


def issue(store: Store) -> tuple[str, str]:
    """A PAT of a member with an email (so a notice goes out): its id and its text."""
    text = generate(TokenKind.PERSONAL)
    token_id = "tok_" + secrets.token_hex(8)
    now = clock.now()
    with transaction(store.engine) as session:
        add_member(
            session,
            org_id="acme",
            user_id="bob",
            role="user",
            email="bob@acme.example",
            at=now - timedelta(days=2),
            now=now - timedelta(days=2),
            source="test",
        )
        session.add(
            Token(
                id=token_id,
                kind=TokenKind.PERSONAL.value,
                org_id="acme",
                user_id="bob",
                created_by="bob",
                name="laptop",
                token_hash=hash_token(text),
                last4=text[-4:],
                created_at=now - timedelta(days=1),
                expires_at=now + timedelta(days=30),
            )
        )
    return token_id, text


def apply_all(store: Store) -> None:
    with transaction(store.engine) as session:
        ids = list(session.scalars(select(InboxEvent.id)))
    with transaction(store.engine) as session:
        outcome = apply_pending(session, ids, now=clock.now(), retryable=lambda _: False)
    assert outcome.dead == []


def table_text(store: Store, *models: type[Base]) -> str:
    tables = [m.__table__ for m in models] if models else Base.metadata.sorted_tables
    with store.engine.connect() as connection:
        return "\n".join(
            repr(row) for table in tables for row in connection.execute(table.select())
        )


def revoked_and_told(store: Store, token_id: str) -> tuple[AuditEntry, Notice]:
    with transaction(store.engine) as session:
        token = session.get_one(Token, token_id)
        assert (token.state, token.revoke_reason) == ("revoked", "leaked")
        entry = session.scalars(
            select(AuditEntry).where(AuditEntry.token_id == token_id, AuditEntry.action == "revoke")
        ).one()
        notice = session.scalars(select(Notice)).one()
        session.expunge_all()
    return entry, notice


# -- the masking itself ----------------------------------------------------------------------


@pytest.mark.parametrize("form", list(ENCODINGS))
def test_a_percent_encoded_token_is_masked_however_it_is_encoded(form: str) -> None:
    token = generate(TokenKind.PERSONAL)
    url = gist_url(ENCODINGS[form](token))
    assert exposed(url, token)

    masked = mask_encoded_tokens(url)

    assert not exposed(masked, token)
    # Decoded once a token shows: the mask cannot be put back inside the encoding.
    assert masked == gist_url("sm_pat_***" + (" " if form == "plain-beside-escapes" else ""))


@pytest.mark.parametrize(
    "text",
    [
        "https://gitlab.example/acme/app/-/blob/5f1c0e2/my%20file.env#L3",
        "https://x.example/?q=%2541&discount=100%",
        "https://x.example/?broken=%zz%4",
        "https://x.example/?bytes=%FF%FE",
        "sm%5Fpat%5Ftooshort",
        "https://x.example/caf%C3%A9",
    ],
)
def test_text_without_a_token_is_kept_as_it_came(text: str) -> None:
    assert mask_encoded_tokens(text) == text


def test_text_encoded_more_often_than_is_checked_is_withheld() -> None:
    token = generate(TokenKind.APPLICATION)
    four = token.replace("_", "%2525255F")
    five = token.replace("_", "%252525255F")
    assert mask_encoded_tokens(gist_url(four)).endswith("t=sm_aat_***&page=2")
    assert mask_encoded_tokens(gist_url(five)) == WITHHELD
    # Harmless text is withheld as well when encoded that deeply: it cannot be told apart.
    assert mask_encoded_tokens("a%252525252541") == WITHHELD


# -- every door ------------------------------------------------------------------------------


@pytest.mark.parametrize("form", list(ENCODINGS))
def test_an_encoded_token_in_a_source_url_is_never_stored_sent_or_logged(
    api: TestClient, store: Store, form: str, caplog: pytest.LogCaptureFixture
) -> None:
    token_id, text = issue(store)
    url = gist_url(ENCODINGS[form](text))
    report = {
        "specversion": "1.0",
        "id": "evt-" + secrets.token_hex(4),
        "source": "scanner://pastes",
        "type": "token.leak_suspected",
        "data": {"token_id": token_id, "source_url": url, "reporter": "scanner"},
    }
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logs:
        response = api.post("/v1/events", json=report, headers=PRODUCER)
        assert response.status_code == 202
        apply_all(store)

    entry, notice = revoked_and_told(store, token_id)
    masked = gist_url("sm_pat_***" + (" " if form == "plain-beside-escapes" else ""))
    assert entry.detail == {"source_url": masked, "reporter": "scanner"}
    assert json.loads(notice.body)["data"]["source_url"] == masked
    for place in (table_text(store), repr(logs), caplog.text, response.text):
        assert not exposed(place, text)


def test_an_encoded_token_in_gitlabs_location_is_never_stored_or_sent(
    api: TestClient, store: Store
) -> None:
    token_id, text = issue(store)
    location = "https://gitlab.example/acme/app/-/blob/5f1c0e2/.env?t=" + ENCODINGS["double"](text)
    response = api.post(
        "/v1/revoke_tokens",
        json=[{"type": PAT_TYPE, "token": text, "location": location}],
        headers={"Authorization": GITLAB_SECRET},
    )
    assert response.status_code == 204
    with transaction(store.engine) as session:
        (row,) = session.scalars(select(InboxEvent))
        assert row.data["source_url"].endswith("?t=sm_pat_***")
    apply_all(store)

    entry, notice = revoked_and_told(store, token_id)
    assert entry.detail == {"source_url": row.data["source_url"], "reporter": "gitlab"}
    assert json.loads(notice.body)["data"]["source_url"] == row.data["source_url"]
    assert not exposed(table_text(store), text)


def test_an_encoded_token_in_githubs_url_is_never_stored_or_sent(
    api: TestClient, store: Store, signer: Signer
) -> None:
    token_id, text = issue(store)
    where = "https://github.com/octo/app/blob/main/.env?t=" + ENCODINGS["every-byte"](text)
    body = json.dumps([{"token": text, "type": "tokenwarden_pat", "url": where}]).encode()
    response = api.post("/v1/secret-scanning/github", content=body, headers=signer.headers(body))
    assert response.status_code == 200
    apply_all(store)

    entry, notice = revoked_and_told(store, token_id)
    assert entry.detail is not None
    assert entry.detail["source_url"] == "https://github.com/octo/app/blob/main/.env?t=sm_pat_***"
    assert json.loads(notice.body)["data"]["source_url"] == entry.detail["source_url"]
    assert not exposed(table_text(store) + response.text, text)


def test_the_worker_masks_an_encoded_token_in_an_inbox_row_it_is_handed(store: Store) -> None:
    """A row written before this masking existed, or by a door that forgot it."""
    token_id, text = issue(store)
    url = gist_url(ENCODINGS["lowercase-hex"](text))
    now = clock.now()
    try:
        with transaction(store.engine) as session:
            session.execute(
                insert(InboxEvent).values(
                    id="evt-old-row",
                    type="token.leak_suspected",
                    source="scanner://pastes",
                    time=now,
                    data={"token_id": token_id, "source_url": url},
                    digest="0" * 64,
                    status=EventStatus.PENDING.value,
                    attempts=0,
                    received_at=now,
                    published_at=now,
                )
            )
        apply_all(store)

        entry, notice = revoked_and_told(store, token_id)
        assert entry.detail == {"source_url": gist_url("sm_pat_***")}
        assert json.loads(notice.body)["data"]["source_url"] == gist_url("sm_pat_***")
        assert not exposed(table_text(store, AuditEntry, Notice), text)
    finally:
        store.truncate()
