"""POST /v1/introspect as a resource server sees it: claims of usable tokens, one and the same
refusal for everything else, revocations seen at once, uses and refusals recorded sparingly."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from sqlalchemy import event, select, text

from tests.conftest import Cli, Store, within_lifetime
from tests.stack import LiveStack, stack_env
from tests.test_client import running_server
from tokenwarden.config.settings import ConfigError, Settings, load_settings
from tokenwarden.producer.api import create_app
from tokenwarden.producer.client import ProducerClient
from tokenwarden.producer.revocation_feed import APPLICATION_NAME, LEASE_S
from tokenwarden.producer.usage_recorder import UsageRecorder
from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.introspection import Introspection
from tokenwarden.worker.domain.issuing import IssuedToken, create_token
from tokenwarden.worker.domain.members import add_member, change_role
from tokenwarden.worker.domain.models import AuditEntry, TokenKind
from tokenwarden.worker.domain.removals import remove_member
from tokenwarden.worker.domain.revocation import revoke_token
from tokenwarden.worker.domain.tokens import generate
from tokenwarden.worker.ops.supervisor import free_port
from tokenwarden.worker.runtime.celery_app import make_celery

with warnings.catch_warnings():
    from starlette.exceptions import StarletteDeprecationWarning

    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

PRODUCER = "twp_introspection_test_producer"
KEY = "twi_introspection_test_key_1"
AUTH = {"Authorization": f"Bearer {KEY}"}
INACTIVE = b'{"active":false}'

FAR_DATE = within_lifetime()


@pytest.fixture(autouse=True)
def _own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("TOKENWARDEN_")]:
        if not name.startswith("TOKENWARDEN_TEST_"):
            monkeypatch.delenv(name)


class Door:
    """The API on the test store, and what a test does to the store around it."""

    def __init__(
        self, store: Store, home: Path, *, peer: str = "testclient", **settings: Any
    ) -> None:
        self.store = store
        self.url = store.url
        configured = Settings(
            home=home,
            database_url=store.url,
            producer_keys=(PRODUCER,),
            **{"introspection_keys": (KEY,), **settings},
        )
        self.celery_app = make_celery(configured)
        self.client = TestClient(
            create_app(configured, celery_app=self.celery_app), client=(peer, 50000)
        )
        self.client.__enter__()
        self.open = True

    def close(self) -> None:
        """Stop the app: its recorder writes what it noted."""
        if self.open:
            self.client.__exit__(None, None, None)
            self.celery_app.close()
            self.open = False

    def ask(self, token: str, *, json: bool = False, **headers: str) -> httpx.Response:
        sent = AUTH | headers
        body: dict[str, Any] = {"json": {"token": token}} if json else {"data": {"token": token}}
        answer: httpx.Response = self.client.post("/v1/introspect", headers=sent, **body)
        return answer

    def active(self, token: str) -> bool:
        answer = self.ask(token)
        assert answer.status_code == 200, answer.text
        return bool(answer.json()["active"])

    def member(self, user: str, role: str = "user", org: str = "acme") -> None:
        now = datetime.now(UTC)
        with db.transaction(self.store.engine) as session:
            add_member(
                session,
                org_id=org,
                user_id=user,
                role=role,
                email=None,
                at=now - timedelta(seconds=1),
                now=now,
                source="test",
            )

    def pat(self, user: str, *, days: float = 30, org: str = "acme") -> IssuedToken:
        now = datetime.now(UTC)
        with db.transaction(self.store.engine) as session:
            return create_token(
                session,
                kind=TokenKind.PERSONAL,
                org_id=org,
                name="svc",
                expires_at=now + timedelta(days=days),
                now=now - timedelta(seconds=2),
                user_id=user,
            )

    def aat(self, app: str, created_by: str) -> IssuedToken:
        now = datetime.now(UTC)
        with db.transaction(self.store.engine) as session:
            return create_token(
                session,
                kind=TokenKind.APPLICATION,
                org_id="acme",
                name="deploys",
                expires_at=now + timedelta(days=30),
                now=now,
                app_id=app,
                created_by=created_by,
            )

    def revoke(self, token_id: str) -> None:
        with db.transaction(self.store.engine) as session:
            revoke_token(
                session, token_id=token_id, reason="deleted", source="test", now=datetime.now(UTC)
            )

    def remove(self, user: str) -> None:
        now = datetime.now(UTC)
        with db.transaction(self.store.engine) as session:
            remove_member(
                session, org_id="acme", user_id=user, at=now, now=now, source="test", event_id=None
            )

    def refusals(self) -> list[AuditEntry]:
        with db.transaction(self.store.engine) as session:
            return list(
                session.scalars(
                    select(AuditEntry)
                    .where(AuditEntry.source == "introspect")
                    .order_by(AuditEntry.id)
                )
            )


@pytest.fixture
def door(store: Store, tmp_path: Path) -> Iterator[Door]:
    opened = Door(store, tmp_path / "home")
    yield opened
    opened.close()
    store.truncate()


def hits(door: Door) -> float:
    page = door.client.get("/metrics").text
    prefix = 'tokenwarden_token_checks_total{cache="hit",result="active"} '
    return sum(float(line[len(prefix) :]) for line in page.splitlines() if line.startswith(prefix))


def cached(door: Door, token: str) -> None:
    """Wait until answers about ``token`` come from the cache (the feed is up)."""
    before = hits(door)
    eventually(lambda: door.active(token) and hits(door) > before, within=5.0)


def eventually(condition: Callable[[], bool], *, within: float = 2.0) -> float:
    """Seconds until ``condition`` held (polled), or fail after ``within``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            raise AssertionError(f"not seen within {within} s")
        time.sleep(0.005)
    return time.monotonic() - started


# --- answers -----------------------------------------------------------------------------


def test_an_active_pat_answers_its_owner_role_and_times(door: Door) -> None:
    door.member("bob", "admin")
    pat = door.pat("bob")
    for as_json in (False, True):
        answer = door.ask(pat.token, json=as_json)
        assert answer.status_code == 200
        assert answer.headers["cache-control"] == "no-store"
        claims = answer.json()
        assert claims == {
            "active": True,
            "token_type": "personal_access_token",
            "sub": "bob",
            "org_id": "acme",
            "role": "admin",
            "exp": int(pat.expires_at.timestamp()),
            "iat": claims["iat"],
            "jti": pat.id,
        }
        assert abs(claims["iat"] - time.time()) < 60


def test_an_active_aat_answers_its_application_and_creator(door: Door) -> None:
    door.member("alice")
    aat = door.aat("deployer", "alice")
    claims = door.ask(aat.token, token_type_hint="x").json()
    assert claims["token_type"] == "application_access_token"
    assert (claims["sub"], claims["app_id"], claims["created_by"]) == (
        "deployer",
        "deployer",
        "alice",
    )
    assert (claims["jti"], claims["org_id"]) == (aat.id, "acme")
    assert "role" not in claims
    door.remove("alice")  # an AAT outlives its creator's leave
    assert door.active(aat.token)


def test_every_refusal_is_the_same_two_words(door: Door) -> None:
    door.member("bob")
    door.member("carol")
    revoked, expired, leaver = door.pat("bob"), door.pat("bob", days=1 / 86400), door.pat("carol")
    door.revoke(revoked.id)
    with door.store.engine.begin() as connection:  # inactive, nothing revoked yet
        connection.execute(text("UPDATE memberships SET active = false WHERE user_id = 'carol'"))
    time.sleep(1.1)
    typo = revoked.token[:-1] + ("A" if revoked.token[-1] != "A" else "B")
    for token in (
        revoked.token,
        expired.token,
        leaver.token,
        generate(TokenKind.PERSONAL),
        typo,
        "x",
    ):
        for as_json in (False, True):
            answer = door.ask(token, json=as_json)
            assert (answer.status_code, answer.content) == (200, INACTIVE)
    door.close()
    assert {(row.reason, row.token_id) for row in door.refusals()} == {
        ("revoked", revoked.id),
        ("expired", expired.id),
        ("not_member", leaver.id),
    }


def test_a_malformed_token_costs_no_look_up(door: Door) -> None:
    statements: list[str] = []

    def note(*args: Any) -> None:
        statements.append(str(args[2]))

    engine = db.engine_for(door.url)
    event.listen(engine, "before_cursor_execute", note)
    try:
        for token in ("sm_pat_short", "sm_pat_" + "a" * 38, "", "x" * 100):
            answer = door.client.post(
                "/v1/introspect", data={"token": token} if token else {"a": "b"}, headers=AUTH
            )
            assert answer.status_code in (200, 400)
            if answer.status_code == 200:
                assert answer.content == INACTIVE
    finally:
        event.remove(engine, "before_cursor_execute", note)
    assert [s for s in statements if "tokens" in s] == []


def test_callers_without_a_key_learn_nothing(door: Door) -> None:
    door.member("bob")
    pat = door.pat("bob")
    for headers in (
        {},
        {"Authorization": "Bearer wrong-key-wrong-key"},
        {"Authorization": f"Bearer {PRODUCER}"},
        {"Authorization": KEY},
    ):
        answer = door.client.post("/v1/introspect", data={"token": pat.token}, headers=headers)
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == "Bearer"
        assert pat.id not in answer.text
        assert "active" not in answer.text


def test_a_large_body_or_another_shape_is_refused(door: Door) -> None:
    big = door.client.post(
        "/v1/introspect",
        content=b"token=" + b"a" * (16 * 1024),
        headers=AUTH | {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert big.status_code == 413
    other = door.client.post(
        "/v1/introspect", content=b"token", headers=AUTH | {"Content-Type": "text/plain"}
    )
    assert other.status_code == 415
    empty = door.client.post("/v1/introspect", json={"tok": 1}, headers=AUTH)
    assert (empty.status_code, empty.json()["error"]) == (400, "invalid_request")


# --- revocations, role changes, uses --------------------------------------------------------


def test_a_revocation_or_a_leave_is_seen_at_once_despite_the_cache(door: Door) -> None:
    door.member("bob")
    door.member("carol")
    pat, leaver = door.pat("bob"), door.pat("carol")
    cached(door, pat.token)
    cached(door, leaver.token)
    door.revoke(pat.id)
    door.remove("carol")
    if door.store.backend == "postgres":
        # The notice empties the cache at once; whatever the listener's thread is doing, the
        # cache is never trusted later than the lease after the commit.
        time.sleep(LEASE_S)
    # On SQLite the next check sees the other connection's commit itself.
    assert not door.active(pat.token)
    assert not door.active(leaver.token)


def test_a_role_change_shows_in_the_next_answers(door: Door) -> None:
    door.member("bob", "user")
    pat = door.pat("bob")
    cached(door, pat.token)
    assert door.ask(pat.token).json()["role"] == "user"
    now = datetime.now(UTC)
    with db.transaction(door.store.engine) as session:
        change_role(
            session,
            org_id="acme",
            user_id="bob",
            role="admin",
            at=now,
            now=now,
            source="test",
            event_id=None,
        )
    eventually(lambda: door.ask(pat.token).json()["role"] == "admin", within=1.0)


def test_refusals_are_audited_once_a_minute_per_token_and_counted(door: Door) -> None:
    door.member("bob")
    pat = door.pat("bob")
    door.revoke(pat.id)
    for _ in range(20):
        assert door.ask(pat.token).content == INACTIVE
    page = door.client.get("/metrics").text
    assert 'tokenwarden_token_checks_total{cache="bypass",result="revoked"}' in page or (
        'result="revoked"' in page
    )
    counted = [
        line
        for line in page.splitlines()
        if line.startswith("tokenwarden_token_checks_total") and 'result="revoked"' in line
    ]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in counted) == 20
    door.close()
    assert [(row.action, row.reason, row.token_id) for row in door.refusals()] == [
        ("refuse", "revoked", pat.id)
    ]


def test_another_api_process_adds_no_second_refusal_row_within_the_minute(door: Door) -> None:
    door.member("bob")
    pat = door.pat("bob")
    door.revoke(pat.id)
    assert door.ask(pat.token).content == INACTIVE
    door.close()  # its refusal row is written
    # Another process (or this one restarted) refusing the same token for the same reason.
    answer = Introspection(False, "revoked", token_id=pat.id, org_id="acme", user_id="bob")
    for _ in range(2):
        other = UsageRecorder(lambda: door.store.engine)
        other.refused(answer)
        other.flush()
    assert [(row.reason, row.token_id) for row in door.refusals()] == [("revoked", pat.id)]


def test_no_token_text_in_the_log_or_the_audit(door: Door) -> None:
    door.member("bob")
    door.member("carol")
    tokens = [door.pat("bob"), door.pat("carol"), door.aat("ci", "bob")]
    door.revoke(tokens[0].id)
    door.remove("carol")
    with structlog.testing.capture_logs() as logs:
        for issued in tokens:
            door.ask(issued.token)
            door.ask(issued.token[:-2])
        door.close()
    written = repr(logs) + repr([vars(row) for row in door.refusals()])
    for issued in tokens:
        assert issued.token not in written
        assert issued.token[7:39] not in written


def test_token_list_shows_the_last_use(cli: Cli, store: Store) -> None:
    cli("member", "add", "--org", "acme", "--user", "bob", "--role", "user", check=True)
    made = cli(
        "token", "create", "--kind", "personal", "--org", "acme", "--user", "bob",
        "--name", "svc", "--expires-at", FAR_DATE, "--json", check=True,
    ).json()  # fmt: skip
    unused = cli(
        "token", "create", "--kind", "personal", "--org", "acme", "--user", "bob",
        "--name", "idle", "--expires-at", FAR_DATE, "--json", check=True,
    ).json()  # fmt: skip
    url = store.url if store.backend == "postgres" else None
    settings = Settings(home=cli.home, database_url=url, introspection_keys=(KEY,))
    celery_app = make_celery(settings)
    before = datetime.now(UTC).replace(microsecond=0)
    with TestClient(create_app(settings, celery_app=celery_app)) as client:
        for _ in range(3):
            answer = client.post("/v1/introspect", data={"token": made["token"]}, headers=AUTH)
            assert answer.json()["active"] is True
    celery_app.close()
    listed = {row["id"]: row for row in cli("token", "list", "--json", check=True).json()}
    assert listed[unused["id"]]["last_used_at"] is None
    used = datetime.fromisoformat(listed[made["id"]]["last_used_at"])
    assert before - timedelta(seconds=1) <= used <= datetime.now(UTC)
    assert "last used" in cli("token", "list", check=True).stdout


def test_the_client_reads_the_answer(door: Door) -> None:
    door.member("bob", "admin")
    pat = door.pat("bob")
    app = door.client.app
    with running_server(app) as url:
        with ProducerClient(url, PRODUCER, introspection_key=KEY) as client:
            info = client.introspect(pat.token)
            assert (info.active, info.sub, info.role, info.jti) == (True, "bob", "admin", pat.id)
            assert info.token_type == "personal_access_token"
            assert info.exp is not None
            assert abs((info.exp - pat.expires_at).total_seconds()) < 1
            door.revoke(pat.id)
            eventually(lambda: not client.introspect(pat.token).active, within=1.0)
        with pytest.raises(ValueError, match="introspection_key"):
            ProducerClient(url, PRODUCER).introspect(pat.token)


def test_keys_of_the_two_doors_must_differ() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(producer_keys=KEY, introspection_keys=f"{KEY},twi_other_key_00000000")
    message = str(refused.value)
    assert message.startswith("TOKENWARDEN_INTROSPECTION_KEYS")
    assert KEY not in message
    assert "\n" not in message
    # A SCIM token is a key of its own too, apart from the admin keys as from the others.
    with pytest.raises(ConfigError) as refused:
        load_settings(admin_keys=f"console:{KEY}", scim_tokens=KEY)
    assert str(refused.value).startswith("TOKENWARDEN_SCIM_TOKENS")
    assert KEY not in str(refused.value)


# --- Postgres: the feed, and two real API processes ------------------------------------------


@pytest.mark.postgres
def test_a_lost_feed_bypasses_the_cache_until_it_is_back(door: Door) -> None:
    if door.store.backend != "postgres":
        pytest.skip("the LISTEN feed is Postgres's")
    door.member("bob")
    pat = door.pat("bob")
    cached(door, pat.token)

    def terminated() -> bool:
        with door.store.engine.connect() as connection:
            killed = connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = :name AND datname = current_database()"
                ),
                {"name": APPLICATION_NAME},
            ).all()
            connection.commit()
        return bool(killed)

    eventually(terminated, within=5.0)
    # Revoked while the feed may be down: never answered active from the cache past the lease
    # after the commit, however late the listener's thread learns that its connection died.
    door.revoke(pat.id)
    time.sleep(LEASE_S)
    assert not door.active(pat.token)
    # Back after a moment: answers are cached (and dropped on a revocation) again.
    other = door.pat("bob")
    cached(door, other.token)
    door.revoke(other.id)
    eventually(lambda: not door.active(other.token), within=1.0)


def _api(home: Path, env: dict[str, str], port: int) -> LiveStack:
    stack = LiveStack(home, env, env["TOKENWARDEN_DATABASE_URL"], port)
    stack.start("api")
    return stack


@pytest.mark.postgres
def test_two_api_processes_both_see_a_revocation_within_a_moment(
    store: Store, tmp_path: Path
) -> None:
    if store.backend != "postgres":
        pytest.skip("replicas share a Postgres store")
    stacks = []
    try:
        for name in ("one", "two"):
            home = tmp_path / name
            home.mkdir()
            env = stack_env(
                home,
                {"TOKENWARDEN_DATABASE_URL": store.url, "TOKENWARDEN_INTROSPECTION_KEYS": KEY},
            )
            stacks.append(_api(home, env, free_port()))
        door = Door.__new__(Door)
        door.store = store
        door.member("bob")
        door.member("carol")
        pat, leaver = door.pat("bob"), door.pat("carol")

        def refused(stack: LiveStack, token: str) -> bool:
            return not active(stack, token)

        def active(stack: LiveStack, token: str) -> bool:
            answer = httpx.post(
                f"{stack.api_url}/v1/introspect", data={"token": token}, headers=AUTH
            )
            assert answer.status_code == 200, answer.text
            return bool(answer.json()["active"])

        for stack in stacks:
            for token in (pat.token, leaver.token):
                assert active(stack, token)
                assert active(stack, token)  # from the cache, if the feed is up yet
        door.revoke(pat.id)
        door.remove("carol")
        for stack in stacks:
            # 100 ms is the bench's bound (bench/introspect.py); CI machines get a margin.
            for token in (pat.token, leaver.token):
                assert eventually(partial(refused, stack, token), within=1.0) < 1.0
            for issued in (pat, leaver):
                assert issued.token[7:39] not in stack.log("api")
    finally:
        for stack in stacks:
            stack.stop()
        store.truncate()
