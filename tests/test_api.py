"""The producer API as a producer sees it: what it accepts, stores, publishes and refuses."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import secrets
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import structlog
from hypothesis import strategies as st
from sqlalchemy import select
from starlette.exceptions import StarletteDeprecationWarning

from tests.conftest import Store, service_url
from tokenwarden.config.settings import Settings
from tokenwarden.producer import intake
from tokenwarden.producer.api import create_app
from tokenwarden.producer.inbox_writer import InboxWriter, Outcome
from tokenwarden.worker.domain import clock
from tokenwarden.worker.domain.db import transaction
from tokenwarden.worker.domain.events import DATA_MODELS
from tokenwarden.worker.domain.inbox import dead_letter
from tokenwarden.worker.domain.models import Base, InboxEvent, Token, TokenKind
from tokenwarden.worker.domain.tokens import generate, hash_token
from tokenwarden.worker.runtime.celery_app import make_celery

with warnings.catch_warnings():
    # Starlette 1.x would rather its test client ran on httpx2, and says so on import.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

K1, K2 = "twp_api_test_key_one", "twp_api_test_key_two"
AUTH = {"Authorization": f"Bearer {K2}"}
MIB = 1024 * 1024
UNREACHABLE_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:1/none"
UNREACHABLE_BROKER = "amqp://guest:guest@127.0.0.1:1//"


def event(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "specversion": "1.0",
        "id": "evt-" + secrets.token_hex(4),
        "source": "hr://workday",
        "type": "membership.removed",
        "time": "2026-11-27T19:00:00Z",
        "data": {"org_id": "acme", "user_id": "u-42"},
    }
    return base | overrides


@pytest.fixture(autouse=True)
def _own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the settings each test builds count, not the developer's environment."""
    for name in [n for n in os.environ if n.startswith("TOKENWARDEN_")]:
        if not name.startswith("TOKENWARDEN_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


Serve = Callable[..., TestClient]


@pytest.fixture
def serve(home: Path) -> Iterator[Serve]:
    """Start the API on settings made from keyword arguments; everything is closed after."""
    opened: list[tuple[TestClient, Any]] = []

    def start(*, broker_retries: int | None = None, **options: Any) -> TestClient:
        defaults: dict[str, Any] = {"home": home, "producer_keys": (K1, K2)}
        settings = Settings(**(defaults | options))
        celery_app = make_celery(settings)
        if broker_retries is not None:
            # Kombu retries a refused connection for its connect timeout before a publish
            # fails; tests of a broker that is down need not wait that long.
            celery_app.conf.broker_transport_options = {"max_retries": broker_retries}
        client = TestClient(create_app(settings, celery_app=celery_app))
        client.__enter__()
        opened.append((client, celery_app))
        return client

    yield start
    for client, celery_app in opened:
        client.__exit__(None, None, None)
        celery_app.close()


@pytest.fixture
def api(store: Store, serve: Serve) -> Iterator[TestClient]:
    """The API on the test store, with the embedded file broker in the test's home."""
    yield serve(database_url=store.url)
    store.truncate()


def stored(store: Store) -> dict[str, InboxEvent]:
    with transaction(store.engine) as session:
        return {row.id: row for row in session.scalars(select(InboxEvent))}


def queued(home: Path) -> list[tuple[str, list[str]]]:
    """Each message file of the embedded broker: its raw text and the event ids it carries."""
    messages = []
    for path in sorted((home / "broker" / "queue").glob("*.msg")):
        raw = path.read_text()
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        messages.append((raw + json.dumps(body), body[0][0]))
    return messages


def queued_ids(home: Path) -> list[str]:
    return [i for _, ids in queued(home) for i in ids]


def all_rows(store: Store) -> str:
    with store.engine.connect() as connection:
        return "\n".join(
            repr(row)
            for table in Base.metadata.sorted_tables
            for row in connection.execute(table.select())
        )


def test_accepts_one_event_stores_it_then_publishes_its_id(
    api: TestClient, store: Store, home: Path
) -> None:
    sent = event()
    response = api.post("/v1/events", json=sent, headers=AUTH)
    assert response.status_code == 202
    assert response.json() == {"accepted": [sent["id"]]}
    row = stored(store)[sent["id"]]
    assert (row.type, row.status, row.data) == ("membership.removed", "pending", sent["data"])
    assert queued_ids(home) == [sent["id"]]


def test_a_batch_is_stored_and_published_together(
    api: TestClient, store: Store, home: Path
) -> None:
    batch = [event(), event(type="user.deactivated", data={"user_id": "u-7"}), event()]
    response = api.post(
        "/v1/events",
        content=json.dumps(batch),
        headers=AUTH | {"Content-Type": "application/cloudevents-batch+json"},
    )
    assert response.status_code == 202
    ids = [e["id"] for e in batch]
    assert response.json() == {"accepted": ids}
    assert set(stored(store)) == set(ids)
    assert queued_ids(home) == ids


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {K1}x"},
        {"Authorization": "Basic azE6"},
        {"Authorization": "Bearer"},
        {"Authorization": K1},
    ],
    ids=["none", "wrong", "longer", "basic", "empty", "no-scheme"],
)
def test_refuses_without_a_valid_key(
    api: TestClient, store: Store, home: Path, headers: dict[str, str]
) -> None:
    response = api.post("/v1/events", json=event(), headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer" in response.json()["detail"]
    assert stored(store) == {}
    assert queued(home) == []


def test_the_key_is_checked_before_anything_else(api: TestClient) -> None:
    oversized = api.post(
        "/v1/events", content=b"x" * (MIB + 1), headers={"Content-Type": "text/plain"}
    )
    assert oversized.status_code == 401


def test_every_key_is_compared_in_constant_time(
    api: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert (
        api.post("/v1/events", json=event(), headers={"Authorization": "Bearer no"}).status_code
        == 401
    )
    assert len(calls) == 2
    calls.clear()
    # The first key matches, and the second is compared all the same: no early exit.
    assert (
        api.post("/v1/events", json=event(), headers={"Authorization": f"Bearer {K1}"}).status_code
        == 202
    )
    assert [b for _, b in calls] == [K1.encode(), K2.encode()]


def test_refuses_every_event_until_a_key_is_configured(
    serve: Serve, store: Store, home: Path
) -> None:
    api = serve(database_url=store.url, producer_keys=())
    try:
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer anything"}):
            response = api.post("/v1/events", json=event(), headers=headers)
            assert response.status_code == 401
            assert "TOKENWARDEN_PRODUCER_KEYS" in response.json()["detail"]
        # The key `tokenwarden run` generates into the home is accepted from then on.
        key = Settings(home=home).generated_producer_key()
        response = api.post("/v1/events", json=event(), headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 202
    finally:
        store.truncate()


def test_refuses_an_oversized_body(api: TestClient, store: Store) -> None:
    declared = api.post(
        "/v1/events",
        content=b" " * (MIB + 1),
        headers=AUTH | {"Content-Type": "application/json"},
    )
    assert declared.status_code == 413

    def chunks() -> Iterator[bytes]:
        # No Content-Length at all: the cap on the bytes read must catch it.
        yield b'[{"padding": "'
        for _ in range(20):
            yield b"x" * 64 * 1024
        yield b'"}]'

    streamed = api.post(
        "/v1/events", content=chunks(), headers=AUTH | {"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413
    assert "1048576 bytes" in streamed.json()["detail"]
    just_fits = json.dumps(event(padding="x" * (MIB - 400))).encode()
    assert len(just_fits) <= MIB
    response = api.post(
        "/v1/events", content=just_fits, headers=AUTH | {"Content-Type": "application/json"}
    )
    assert response.status_code == 202
    assert len(stored(store)) == 1


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", 202),
        ("application/json; charset=utf-8", 202),
        ("Application/CloudEvents+JSON", 202),
        ("application/cloudevents-batch+json", 202),
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=x", 415),
        (None, 415),
    ],
)
def test_takes_json_content_types_only(
    api: TestClient, content_type: str | None, status: int
) -> None:
    headers = AUTH | ({"Content-Type": content_type} if content_type else {})
    response = api.post("/v1/events", content=json.dumps(event()), headers=headers)
    assert response.status_code == status, response.text
    if status == 415:
        assert "application/cloudevents+json" in response.json()["detail"]


def _without(key: str) -> dict[str, Any]:
    body = event()
    del body[key]
    return body


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not JSON"),
        (b'"an event"', "one CloudEvent object or a JSON array"),
        (b"[]", "batch is empty"),
        (b"[1]", "must be a JSON object"),
        (json.dumps(event(specversion="0.3")).encode(), "specversion"),
        (json.dumps(event(type="membership.exploded")).encode(), "unknown event type"),
        (json.dumps(event(type="x" * 100_000)).encode(), "unknown event type 'xxx"),
        (json.dumps(_without("data")).encode(), "data: Field required"),
        (json.dumps(_without("id")).encode(), "id: Field required"),
        (json.dumps(event(data={"org_id": "acme"})).encode(), "data.user_id: Field required"),
        (
            json.dumps(
                event(type="membership.added", data={"org_id": "a", "user_id": "u", "role": "root"})
            ).encode(),
            "data.role",
        ),
        (json.dumps(event(time="2026-11-27T19:00:00")).encode(), "time zone"),
        (json.dumps(event(time="9999-12-31T23:59:59-14:00")).encode(), "time: out of range"),
        (json.dumps(event(id="evt\x00")).encode(), "NUL"),
        (json.dumps(event(id="evt\ud800")).encode(), "lone surrogate"),
        (
            json.dumps(event(type="token.leak_suspected", data={"token": "\ud800"})).encode(),
            "lone surrogate",
        ),
        (b'{"id": "e", "time": NaN}', "NaN is not JSON"),
        (b"[" * 40 + b"]" * 40, "nested more than"),
    ],
    ids=[
        "bad-json",
        "string",
        "empty-batch",
        "number",
        "specversion",
        "unknown-type",
        "long-type",
        "no-data",
        "no-id",
        "missing-field",
        "bad-role",
        "naive-time",
        "time-overflow",
        "nul",
        "surrogate",
        "surrogate-token",
        "nan",
        "deep",
    ],
)
def test_refuses_invalid_events_with_the_reason(
    api: TestClient, store: Store, home: Path, body: bytes, reason: str
) -> None:
    response = api.post(
        "/v1/events", content=body, headers=AUTH | {"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    answer = response.json()
    assert reason in answer["detail"] + json.dumps(answer["errors"])
    assert isinstance(answer["errors"], list)
    assert len(response.content) < 2000  # a reason never quotes a long input in full
    assert stored(store) == {}
    assert queued(home) == []


def test_one_bad_event_refuses_the_whole_batch_naming_each(
    api: TestClient, store: Store, home: Path
) -> None:
    good, bad, worse = event(), event(data={"org_id": "acme"}), event(type="nope")
    response = api.post("/v1/events", json=[good, bad, good | {"id": "x"}, worse], headers=AUTH)
    assert response.status_code == 422
    answer = response.json()
    assert answer["detail"] == "2 of 4 events are invalid; none was accepted"
    assert [(e["index"], e["id"]) for e in answer["errors"]] == [(1, bad["id"]), (3, worse["id"])]
    assert "data.user_id" in answer["errors"][0]["reason"]
    assert stored(store) == {}
    assert queued(home) == []


def test_an_id_reused_for_other_content_conflicts(api: TestClient, store: Store) -> None:
    first = event()
    assert api.post("/v1/events", json=first, headers=AUTH).status_code == 202
    other = first | {"data": {"org_id": "acme", "user_id": "u-43"}}
    response = api.post("/v1/events", json=[event(), other], headers=AUTH)
    assert response.status_code == 409
    assert response.json()["ids"] == [first["id"]]
    rows = stored(store)
    assert list(rows) == [first["id"]]
    assert rows[first["id"]].data == first["data"]


def test_the_same_event_twice_is_stored_once(api: TestClient, store: Store, home: Path) -> None:
    sent = event()
    for _ in range(2):
        response = api.post("/v1/events", json=sent, headers=AUTH)
        assert response.status_code == 202
        assert response.json() == {"accepted": [sent["id"]]}
    assert list(stored(store)) == [sent["id"]]
    # A resend of a pending event puts it on the queue again; the worker applies it once.
    assert queued_ids(home) == [sent["id"], sent["id"]]


def test_a_batch_holds_up_to_1000_events(api: TestClient, store: Store, home: Path) -> None:
    batch = [event(id=f"evt-{i:04}") for i in range(1000)]
    response = api.post("/v1/events", json=batch, headers=AUTH)
    assert response.status_code == 202
    assert len(response.json()["accepted"]) == 1000
    assert len(stored(store)) == 1000
    assert len(queued(home)) == 10  # a hundred ids a message
    assert sorted(queued_ids(home)) == [e["id"] for e in batch]
    store.truncate()
    too_many = api.post("/v1/events", json=[*batch, event()], headers=AUTH)
    assert too_many.status_code == 422
    assert "at most 1000" in too_many.json()["detail"]
    assert stored(store) == {}


@pytest.mark.parametrize("where", ["postgres", "sqlite"])
def test_a_store_that_is_down_answers_503_with_retry_after(
    serve: Serve, tmp_path: Path, where: str
) -> None:
    if where == "postgres":
        url = UNREACHABLE_POSTGRES
    else:
        (tmp_path / "a-file").write_text("")
        url = f"sqlite:///{tmp_path / 'a-file' / 'tokenwarden.db'}"
    api = serve(database_url=url)
    with structlog.testing.capture_logs() as logs:
        response = api.post("/v1/events", json=event(), headers=AUTH)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    detail = response.json()["detail"]
    assert "token store is unavailable" in detail
    assert "\n" not in detail
    [line] = [line for line in logs if line["event"] == "events.refused"]
    assert line["log_level"] == "error"
    assert line["status"] == 503
    assert line["cause"].startswith(("OperationalError", "FileExistsError", "NotADirectoryError"))


def test_a_broker_that_is_down_still_accepts_what_is_stored(serve: Serve, store: Store) -> None:
    api = serve(database_url=store.url, broker_url=UNREACHABLE_BROKER, broker_retries=0)
    sent = event()
    try:
        with structlog.testing.capture_logs() as logs:
            response = api.post("/v1/events", json=sent, headers=AUTH)
        assert response.status_code == 202
        assert response.json() == {"accepted": [sent["id"]]}
        assert stored(store)[sent["id"]].status == "pending"
        [line] = [line for line in logs if line["event"] == "events.accepted"]
        assert line["log_level"] == "warning"
        assert line["published"] == 0
        assert "Connection refused" in line["publish_error"]
    finally:
        store.truncate()


def test_a_leaked_token_is_never_stored_logged_echoed_or_queued(
    api: TestClient, store: Store, home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    leaked = generate(TokenKind.PERSONAL)
    report = event(
        type="token.leak_suspected",
        data={"token": leaked, "source_url": f"https://paste.example/{leaked}", "reporter": "x"},
    )
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logs:
        accepted = api.post("/v1/events", json=report, headers=AUTH)
        # Refused reports carrying the text: beside a token id, as a field name, as the type,
        # as the id.
        refused = [
            api.post("/v1/events", json=body, headers=AUTH)
            for body in (
                event(type="token.leak_suspected", data={"token": leaked, "token_id": "t-1"}),
                event(type="token.leak_suspected", data={"token_id": "t-1", leaked: 1}),
                event(type=leaked),
                event(id=leaked),
                # The same id with other content: a conflict, still without the text.
                report | {"data": {"token": leaked, "reporter": "y"}},
            )
        ]
    assert accepted.status_code == 202
    assert [r.status_code for r in refused] == [422, 422, 422, 422, 409]
    row = stored(store)[report["id"]]
    assert row.data["token_hash"] == hash_token(leaked)
    assert "token" not in row.data
    assert row.data["source_url"] == "https://paste.example/sm_pat_***"
    for place in (
        all_rows(store),
        repr(logs),
        caplog.text,
        *(r.text for r in refused),
        *(text for text, _ in queued(home)),
    ):
        assert leaked not in place
        assert leaked[7:20] not in place
    assert queued_ids(home) == [report["id"]]


def test_healthz(api: TestClient) -> None:
    response = api.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_readyz_when_store_and_broker_answer(api: TestClient) -> None:
    response = api.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "database": "ok", "broker": "ok"}


def test_readyz_names_what_is_down(serve: Serve, store: Store) -> None:
    no_store = serve(database_url=UNREACHABLE_POSTGRES).get("/readyz")
    assert no_store.status_code == 503
    assert no_store.json()["status"] == "unavailable"
    assert no_store.json()["database"].startswith("unreachable")
    assert no_store.json()["broker"] == "ok"
    no_broker = serve(database_url=store.url, broker_url=UNREACHABLE_BROKER).get("/readyz")
    assert no_broker.status_code == 503
    assert no_broker.json()["database"] == "ok"
    assert no_broker.json()["broker"].startswith("unreachable")


@pytest.mark.rabbitmq
def test_readyz_and_publishing_on_rabbitmq(store: Store, home: Path) -> None:
    settings = Settings(
        home=home,
        database_url=store.url,
        broker_url=service_url("rabbitmq"),
        producer_keys=("twp_test_producer_key",),
    )
    celery_app = make_celery(settings)
    # A queue of this test's own, so that no worker of another test takes the message.
    queue = "tw-test-" + secrets.token_hex(4)
    celery_app.conf.task_default_queue = queue
    sent = event()
    try:
        with TestClient(create_app(settings, celery_app=celery_app)) as api:
            assert api.get("/readyz").json() == {
                "status": "ready",
                "database": "ok",
                "broker": "ok",
            }
            response = api.post(
                "/v1/events", json=sent, headers={"Authorization": "Bearer twp_test_producer_key"}
            )
            assert response.status_code == 202
        with celery_app.connection_for_write() as connection:
            channel = connection.default_channel
            message = channel.basic_get(queue, no_ack=True)
            channel.queue_delete(queue)
        assert message is not None
        assert json.loads(message.body)[0] == [[sent["id"]]]
    finally:
        celery_app.close()
        store.truncate()


def test_metrics_read_the_store_at_scrape_time(api: TestClient, store: Store) -> None:
    now = clock.now()
    with transaction(store.engine) as session:
        for number, reason in enumerate(["leaked", "leaked", "member_removed", None]):
            text = generate(TokenKind.PERSONAL)
            session.add(
                Token(
                    id=f"tok-{number}",
                    kind="personal",
                    org_id="acme",
                    user_id="u-1",
                    created_by="u-1",
                    name="ci",
                    token_hash=hash_token(text),
                    last4=text[-4:],
                    created_at=now,
                    expires_at=now + timedelta(days=30),
                    revoked_at=now if reason else None,
                    revoke_reason=reason,
                )
            )
        dead_letter(session, reason="not JSON", now=now)
    api.post("/v1/events", json=[event(), event()], headers=AUTH)
    api.post("/v1/events", json=event(), headers={})
    api.get("/no/such/page")
    text = api.get("/metrics").text
    assert "tokenwarden_store_up 1.0" in text
    assert 'tokenwarden_events{status="pending",type="membership.removed"} 2.0' in text
    assert 'tokenwarden_revoked_tokens{reason="leaked"} 2.0' in text
    assert 'tokenwarden_revoked_tokens{reason="member_removed"} 1.0' in text
    assert "tokenwarden_dead_letters 1.0" in text
    assert 'tokenwarden_events_accepted_total{type="membership.removed"} 2.0' in text
    assert 'tokenwarden_api_requests_total{path="/v1/events",status="202"} 1.0' in text
    assert 'tokenwarden_api_requests_total{path="/v1/events",status="401"} 1.0' in text
    assert 'tokenwarden_api_requests_total{path="unmatched",status="404"} 1.0' in text
    assert "tokenwarden_api_request_duration_seconds_bucket" in text
    assert "process_" in text or "python_gc_" in text


def test_metrics_still_answer_when_the_store_is_down(serve: Serve) -> None:
    response = serve(database_url=UNREACHABLE_POSTGRES).get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "tokenwarden_store_up 0.0" in response.text


def test_openapi_describes_every_endpoint(api: TestClient) -> None:
    schema = api.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    assert {"/v1/events", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    post = schema["paths"]["/v1/events"]["post"]
    assert set(post["responses"]) == {"202", "401", "409", "413", "415", "422", "503"}
    assert "Retry-After" in post["responses"]["503"]["headers"]
    assert set(post["requestBody"]["content"]) == {
        "application/json",
        "application/cloudevents+json",
        "application/cloudevents-batch+json",
    }
    batch = post["requestBody"]["content"]["application/cloudevents-batch+json"]["schema"]
    assert (batch["minItems"], batch["maxItems"]) == (1, 1000)
    kinds = [
        variant["properties"]["type"]["enum"][0]
        for variant in post["requestBody"]["content"]["application/cloudevents+json"]["schema"][
            "oneOf"
        ]
    ]
    assert "token.leak_suspected" in kinds
    assert post["security"] == [{"producerKey": []}]
    assert schema["components"]["securitySchemes"]["producerKey"]["scheme"] == "bearer"
    for name in ("Accepted", "Problem", "InvalidEvents", "Conflicting", "Readiness"):
        assert name in schema["components"]["schemas"]
    assert "503" in schema["paths"]["/readyz"]["get"]["responses"]
    docs = api.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


ODD_TEXT = st.text(max_size=40) | st.sampled_from(
    ["", " ", "\x00", "a\x00b", "\ud800", "\u2028", "é" * 201, "sm_aat_" + "A" * 38]
)


@st.composite
def odd_events(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(sorted(DATA_MODELS)))
    names = {
        "membership.added": ["org_id", "user_id", "role", "email"],
        "membership.role_changed": ["org_id", "user_id", "role"],
        "membership.removed": ["org_id", "user_id"],
        "user.deactivated": ["user_id"],
        "token.leak_suspected": ["token", "token_id", "token_hash", "source_url", "reporter"],
        "token.revoke_requested": ["token_id", "actor"],
        "tokens.bulk_revoke_requested": ["org_id", "user_id", "kind", "created_before", "reason"],
    }[kind]
    data = {name: draw(ODD_TEXT) for name in draw(st.lists(st.sampled_from(names), unique=True))}
    body = event(type=kind, id=draw(ODD_TEXT), source=draw(ODD_TEXT), data=data)
    if draw(st.booleans()):
        body["time"] = draw(st.datetimes(timezones=st.timezones()).map(lambda t: t.isoformat()))
    if draw(st.booleans()):
        body[draw(st.text(max_size=8))] = draw(ODD_TEXT)
    return body


@hypothesis.settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
)
@hypothesis.given(body=odd_events() | st.lists(odd_events(), min_size=1, max_size=3))
def test_no_event_makes_the_api_fail(api: TestClient, body: Any) -> None:
    """Odd text anywhere (NUL, lone surrogates, blanks, tokens): refused or stored, never 500."""
    response = api.post(
        "/v1/events", content=json.dumps(body), headers=AUTH | {"Content-Type": "application/json"}
    )
    assert response.status_code in {202, 409, 422}, response.text
    assert "sm_aat_" + "A" * 38 not in response.text


def _escaped(body: bytes) -> bytes:
    """The same JSON with one key spelled with an escape: the same events, another encoding."""
    assert b'"specversion"' in body
    return body.replace(b'"specversion"', b'"specversio\\u006e"')


def test_an_event_is_the_same_content_however_it_is_encoded(
    api: TestClient, store: Store, home: Path
) -> None:
    sent = event(source="hr://wörkday", time="2026-11-27T21:00:00+02:00")
    sent["data"] = {"org_id": "acme", "user_id": " u-42 "}
    plain = json.dumps(sent, ensure_ascii=False).encode()
    headers = AUTH | {"Content-Type": "application/json"}
    for body in (plain, _escaped(json.dumps(sent).encode()), plain):
        response = api.post("/v1/events", content=body, headers=headers)
        assert response.status_code == 202, response.text
        assert response.json() == {"accepted": [sent["id"]]}
    other = json.dumps(sent | {"source": "hr://workday"}).encode()
    assert api.post("/v1/events", content=other, headers=headers).status_code == 409
    row = stored(store)[sent["id"]]
    assert (row.source, row.data) == ("hr://wörkday", {"org_id": "acme", "user_id": " u-42 "})
    assert row.time.isoformat() == "2026-11-27T19:00:00+00:00"


ZONES = st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(-timedelta(hours=9.5))])
# Text that JSON writes as is (no escapes), so that a body of it is plain.
ID_TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"], exclude_characters='"\\'),
    min_size=1,
    max_size=12,
)


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(sorted(DATA_MODELS)))
    text = ID_TEXT.filter(lambda s: s.strip() != "")
    by_kind: dict[str, dict[str, Any]] = {
        "membership.added": {"org_id": draw(text), "user_id": draw(text), "role": "admin"},
        "membership.role_changed": {"org_id": draw(text), "user_id": draw(text), "role": "user"},
        "membership.removed": {"org_id": draw(text), "user_id": draw(text)},
        "user.deactivated": {"user_id": draw(text)},
        "token.leak_suspected": {"token_id": draw(text), "reporter": draw(st.none() | text)},
        "token.revoke_requested": {"token_id": draw(text)},
        "tokens.bulk_revoke_requested": {"org_id": draw(text), "reason": draw(st.none() | text)},
    }
    data = by_kind[kind]
    if kind == "membership.added" and draw(st.booleans()):
        data["email"] = draw(st.none() | ID_TEXT)
    body = event(type=kind, id=draw(text), source=draw(text), data=data)
    when = draw(st.none() | st.datetimes(min_value=datetime(1900, 1, 1), timezones=ZONES))
    if when is None:
        del body["time"]
    else:
        body["time"] = when.isoformat() if draw(st.booleans()) else None
    return body


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(events=st.lists(valid_events(), min_size=1, max_size=4))
def test_plain_bodies_are_read_as_the_full_checks_read_them(events: list[dict[str, Any]]) -> None:
    """The quick reading of a plain body refuses what the full one refuses (leaving it the
    reasons) and otherwise makes the very rows, fingerprints included."""
    body = json.dumps(events if len(events) > 1 else events[0], ensure_ascii=False).encode()
    assert b"\\" not in body
    try:
        full = intake.prepare(_escaped(body))
    except intake.Refused:
        assert intake._prepare_plain(body) is None
        return
    assert intake._prepare_plain(body) == full


def test_a_plain_batch_takes_the_quick_reading() -> None:
    body = json.dumps([event(), event(type="user.deactivated", data={"user_id": "u"})]).encode()
    assert intake._prepare_plain(body) == intake.prepare(_escaped(body))
    assert intake._prepare_plain(_escaped(body)) is None


def _prepared(*events: dict[str, Any]) -> list[intake.Prepared]:
    return intake.prepare(json.dumps(list(events)).encode())


def test_requests_committed_together_keep_their_own_outcomes(store: Store) -> None:
    published: list[list[str]] = []
    writer = InboxWriter(store.url, lambda ids: published.append(list(ids)))
    old = event()
    new = [event() for _ in range(4)]
    requests = [
        [new[0], new[1]],
        # Refused: its old id with other content; its new id stays free for the next request.
        [old | {"source": "hr://other"}, new[2] | {"source": "hr://first"}],
        [new[2]],
        [new[0] | {"source": "hr://other"}],  # taken earlier in the same group
        [new[1], old],  # the same content again
        [new[3], new[3] | {"source": "hr://other"}],  # one id, two contents, one request
    ]

    async def send_together() -> list[Any]:
        await writer.store(_prepared(old))
        return await asyncio.gather(
            *(writer.store(_prepared(*sent)) for sent in requests), return_exceptions=True
        )

    try:
        outcomes = asyncio.run(send_together())
        assert [o.accepted if isinstance(o, Outcome) else o.ids for o in outcomes] == [
            [new[0]["id"], new[1]["id"]],
            [old["id"]],
            [new[2]["id"]],
            [new[0]["id"]],
            [new[1]["id"], old["id"]],
            [new[3]["id"]],
        ]
        assert [type(o).__name__ for o in outcomes] == [
            "Outcome", "Conflict", "Outcome", "Conflict", "Outcome", "Conflict",
        ]  # fmt: skip
        rows = stored(store)
        assert set(rows) == {old["id"], new[0]["id"], new[1]["id"], new[2]["id"]}
        assert rows[new[2]["id"]].source == new[2]["source"]
        assert rows[old["id"]].source == old["source"]
        # One commit for the group, so one message: new ids and the pending old one, once.
        assert published == [
            [old["id"]],
            [new[0]["id"], new[1]["id"], new[2]["id"], old["id"]],
        ]
    finally:
        store.truncate()


def test_every_character_a_plain_reading_would_not_take_is_stored_as_sent(store: Store) -> None:
    writer = InboxWriter(store.url, lambda ids: None)
    awkward = 'tab\there\nnew line\r\\back slash\\N "quoted" é ☃ 𝄞'
    sent = [
        event(id="evt-tab\tin-id", source="hr://a\\b", data={"org_id": awkward, "user_id": "\\N"}),
        event(data={"org_id": "acme", "user_id": "x" * 200 + "\n"}),
    ]
    try:
        outcome = asyncio.run(writer.store(_prepared(*sent)))
        assert outcome.accepted == [e["id"] for e in sent]
        rows = stored(store)
        for e in sent:
            row = rows[e["id"]]
            assert (row.source, row.data) == (e["source"], e["data"])
            assert row.digest == intake.prepare(json.dumps(e).encode())[0].digest
    finally:
        store.truncate()


def test_two_writers_taking_the_same_new_ids_in_opposite_orders_both_settle(store: Store) -> None:
    # Two API processes (or two groups of one) inserting the same ids at once: one stores
    # them, the other finds them there with the same content; neither waits on the other
    # for good, whatever order each request named them in.
    published: list[str] = []
    first = InboxWriter(store.url, published.extend)
    second = InboxWriter(store.url, published.extend)
    try:
        for _ in range(5):
            shared = [event(id=f"evt-{secrets.token_hex(6)}") for _ in range(1000)]

            async def race(ours: list[dict[str, Any]] = shared) -> list[Outcome]:
                return list(
                    await asyncio.gather(
                        first.store(_prepared(*ours)), second.store(_prepared(*reversed(ours)))
                    )
                )

            outcomes = asyncio.run(race())
            assert [sorted(o.accepted) for o in outcomes] == [sorted(e["id"] for e in shared)] * 2
        assert len(stored(store)) == 5000
        # Each id went on the queue at least once (the second writer may find it still
        # pending and send it again: the worker applies an event once).
        assert set(published) == set(stored(store))
    finally:
        store.truncate()
