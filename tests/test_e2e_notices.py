"""Notices end to end: a real API, worker and scheduler post signed notices to a receiver.

The receiver runs in this process on loopback and verifies every signature with the
secret the stack was given. Runs on the embedded default everywhere, and on Postgres with
RabbitMQ and with Redis when those services are named (see conftest).
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from kombu.connection import Connection
from sqlalchemy import select

from tests.conftest import fresh_postgres_database, service_url
from tests.smtp import Delivered, MailServer
from tests.stack import LiveStack, check_broker, event, stack_env
from tests.test_delivery import SECRET, Received, Receiver
from tests.test_secrecy import dump_tables, secrets_of
from tokenwarden.config.settings import Settings
from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.issuing import IssuedToken
from tokenwarden.worker.domain.members import add_member
from tokenwarden.worker.domain.models import Notice, NoticeEmail, NoticeStatus, TokenKind
from tokenwarden.worker.domain.notices import LEAKED, OFFBOARDED
from tokenwarden.worker.ops.demo_peers import KEY_ID, Peers
from tokenwarden.worker.ops.supervisor import free_port

pytestmark = pytest.mark.slow

STACKS = [
    "embedded",
    pytest.param("rabbitmq", marks=[pytest.mark.postgres, pytest.mark.rabbitmq]),
    pytest.param("redis", marks=[pytest.mark.postgres, pytest.mark.redis]),
]


# A wait for the worker's reaction; assert_published_at_once, not this, shows it was at once.
AT_ONCE_S = 15.0
GITLAB_SECRET = "gitlab-revocation-test-secret"
# The receiver's own secrets in the webhook URL, as many services hand them out: in the user
# information and in the query. No log line may show them.
HOOK_USER_SECRET = "h00kus3rs3cret"
HOOK_QUERY_SECRET = "h00kqu3rys3cret"
MAIL_FROM = "tokenwarden@example.com"


@dataclass
class NoticeStack:
    live: LiveStack
    receiver: Receiver
    # Stands in for GitHub: serves the public key that checks its signed reports.
    github: Peers
    # Every token issued on this stack: none may show up in a notice, a row or a log line.
    issued: list[str] = field(default_factory=list)
    # The SMTP server the stack emails notices through.
    smtp: MailServer | None = None

    def mails_about(self, token_id: str) -> list[Delivered]:
        """Mails that reached the SMTP server about the notice naming ``token_id``."""
        notice = self.notice_row(token_id)
        assert self.smtp is not None
        if notice is None:
            return []
        return [d for d in self.smtp.delivered if d.message["X-Tokenwarden-Notice"] == notice.id]

    def member(self, org_id: str, user_id: str, role: str = "user") -> str:
        email = f"{user_id}@{org_id}.example"
        now = datetime.now(UTC)
        with self.live.session() as session:
            add_member(
                session,
                org_id=org_id,
                user_id=user_id,
                role=role,
                email=email,
                at=now,
                now=now,
                source="test",
            )
        return email

    def token(self, kind: TokenKind, org_id: str, owner: str) -> IssuedToken:
        issued = self.live.token(kind, org_id, owner)
        self.issued.append(issued.token)
        return issued

    def notices_naming(self, token_id: str) -> list[Received]:
        """Requests that reached the receiver about ``token_id``."""
        return [
            got
            for got in list(self.receiver.received)
            if token_id in {t["id"] for t in json.loads(got.body)["data"]["tokens"]}
        ]

    def notice_row(self, token_id: str) -> Notice | None:
        with self.live.session() as session:
            for notice in session.scalars(select(Notice)):
                if token_id in {t["id"] for t in json.loads(notice.body)["data"]["tokens"]}:
                    return notice
        return None


@pytest.fixture(scope="module", params=STACKS)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NoticeStack]:
    home = tmp_path_factory.mktemp(f"notices-{request.param}")
    github = Peers()
    github.start()
    try:
        yield from _stacks(request.param, home, github)
    finally:
        github.stop()


def _stacks(param: str, home: Path, github: Peers) -> Iterator[NoticeStack]:
    with Receiver() as receiver, MailServer() as smtp:
        mail = {"TOKENWARDEN_SMTP_URL": smtp.url(), "TOKENWARDEN_MAIL_FROM": MAIL_FROM}
        if param == "embedded":
            yield from _run(home, receiver, github, mail, smtp)
            return
        broker = service_url(param)
        assert broker is not None
        with fresh_postgres_database() as url:
            extra = {"TOKENWARDEN_DATABASE_URL": url, "TOKENWARDEN_BROKER_URL": broker, **mail}
            try:
                check_broker(Settings(home=home, database_url=url, broker_url=broker))
            except Exception as error:  # a named service that is down fails the run
                pytest.fail(f"{param} at {broker} is unreachable: {error}", pytrace=False)
            yield from _run(home, receiver, github, extra, smtp)


def _run(
    home: Path, receiver: Receiver, github: Peers, extra: dict[str, str], smtp: MailServer
) -> Iterator[NoticeStack]:
    env = stack_env(
        home,
        {
            **extra,
            "TOKENWARDEN_NOTICE_WEBHOOK_URL": receiver.url.replace(
                "http://", f"http://{HOOK_USER_SECRET}@"
            )
            + f"?key={HOOK_QUERY_SECRET}",
            "TOKENWARDEN_NOTICE_SIGNING_SECRET": SECRET,
            "TOKENWARDEN_GITHUB_KEYS_URL": f"{github.base}/keys",
            "TOKENWARDEN_GITLAB_REVOCATION_TOKEN": GITLAB_SECRET,
        },
    )
    settings = Settings(home=home, database_url=extra.get("TOKENWARDEN_DATABASE_URL"))
    live = LiveStack(
        home=home, env=env, database_url=settings.resolved_database_url, port=free_port()
    )
    db.upgrade(live.database_url)
    live.start("api", "worker", "beat")
    try:
        yield NoticeStack(live, receiver, github, smtp=smtp)
    finally:
        live.stop()
        broker = extra.get("TOKENWARDEN_BROKER_URL")
        if broker is not None:
            with Connection(broker) as connection:  # type: ignore[no-untyped-call]
                connection.default_channel.queue_delete(live.queue)
    assert receiver.forged == [], "a notice arrived with a signature that does not verify"


def ids() -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return f"org-{suffix}", f"user-{suffix}"


def data_of(got: Received) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(got.body)["data"]
    return data


def test_a_reported_leak_is_refused_at_once_and_its_owners_are_told(stack: NoticeStack) -> None:
    live = stack.live
    org, user = ids()
    owner_email = stack.member(org, user)
    admin_email = stack.member(org, "admin-" + user, role="admin")
    stack.member(org, "other-" + user)
    pat = stack.token(TokenKind.PERSONAL, org, user)
    aat = stack.token(TokenKind.APPLICATION, org, "deployer")
    leaks = [
        event(
            "token.leak_suspected",
            {"token": text, "source_url": "https://paste.example/1", "reporter": "scanner"},
        )
        for text in (pat.token, aat.token)
    ]

    logged = len(live.log("api"))
    live.send(*leaks)

    live.wait_for(
        lambda: live.verify(pat.token).reason == live.verify(aat.token).reason == "revoked",
        timeout=AT_ONCE_S,
        message="both leaked tokens to be refused",
    )
    (pat_notice,) = live.wait_for(
        lambda: stack.notices_naming(pat.id), timeout=AT_ONCE_S, message="the PAT's notice"
    )
    (aat_notice,) = live.wait_for(
        lambda: stack.notices_naming(aat.id), timeout=AT_ONCE_S, message="the AAT's notice"
    )
    assert_published_at_once(live, logged)

    assert data_of(pat_notice)["recipients"] == [{"user_id": user, "email": owner_email}]
    assert data_of(aat_notice)["recipients"] == [{"user_id": "admin-" + user, "email": admin_email}]
    for got, issued in ((pat_notice, pat), (aat_notice, aat)):
        body = json.loads(got.body)
        assert body["type"] == LEAKED
        assert body["data"]["reason"] == "leaked"
        assert body["data"]["source_url"] == "https://paste.example/1"
        assert body["data"]["tokens"][0]["last4"] == issued.token[-4:]
        assert got.webhook_id == wait_until_sent(stack, issued.id, timeout=5).id


@pytest.mark.parametrize("way", ["github", "gitlab"])
def test_leaks_reported_by_github_and_gitlab_are_refused_at_once_and_told(
    stack: NoticeStack, way: str
) -> None:
    live = stack.live
    org, user = ids()
    stack.member(org, user)
    stack.member(org, "admin-" + user, role="admin")
    pat = stack.token(TokenKind.PERSONAL, org, user)
    aat = stack.token(TokenKind.APPLICATION, org, "deployer")
    where = f"https://{way}.example/acme/site/blob/main/.env"

    logged = len(live.log("api"))
    if way == "github":
        body = json.dumps(
            [
                {"token": text, "type": "tokenwarden", "url": where, "source": "content"}
                for text in (pat.token, aat.token)
            ]
        ).encode()
        response = httpx.post(
            f"{live.api_url}/v1/secret-scanning/github",
            content=body,
            timeout=10,
            headers={
                "Content-Type": "application/json",
                "Github-Public-Key-Identifier": KEY_ID,
                "Github-Public-Key-Signature": stack.github.sign(body),
            },
        )
        assert response.status_code == 200, response.text
        assert [r["label"] for r in response.json()] == ["true_positive", "true_positive"]
    else:
        response = httpx.post(
            f"{live.api_url}/v1/revoke_tokens",
            json=[
                {
                    "type": "gitleaks_rule_id_tokenwarden_personal_access_token",
                    "token": pat.token,
                    "location": where,
                },
                {
                    "type": "gitleaks_rule_id_tokenwarden_application_access_token",
                    "token": aat.token,
                    "location": where,
                },
            ],
            headers={"Authorization": GITLAB_SECRET},
            timeout=10,
        )
        assert response.status_code == 204, response.text

    live.wait_for(
        lambda: live.verify(pat.token).reason == live.verify(aat.token).reason == "revoked",
        timeout=AT_ONCE_S,
        message="both leaked tokens to be refused",
    )
    live.wait_for(
        lambda: stack.notices_naming(pat.id) and stack.notices_naming(aat.id),
        timeout=AT_ONCE_S,
        message="both notices",
    )
    assert_published_at_once(live, logged)
    [pat_notice] = stack.notices_naming(pat.id)
    [aat_notice] = stack.notices_naming(aat.id)
    assert data_of(pat_notice)["recipients"][0]["user_id"] == user
    assert [r["user_id"] for r in data_of(aat_notice)["recipients"]] == ["admin-" + user]
    for got in (pat_notice, aat_notice):
        assert (data_of(got)["source"], data_of(got)["source_url"]) == (way, where)


def test_a_leaver_is_reported_to_the_admins_in_one_notice(stack: NoticeStack) -> None:
    live = stack.live
    org, user = ids()
    admin_email = stack.member(org, "admin-" + user, role="admin")
    stack.member(org, user)
    laptop = stack.token(TokenKind.PERSONAL, org, user)
    ci = stack.token(TokenKind.PERSONAL, org, user)
    app_token = stack.token(TokenKind.APPLICATION, org, "deployer")

    [removal] = live.send(event("membership.removed", {"org_id": org, "user_id": user}))

    (got,) = live.wait_for(
        lambda: stack.notices_naming(laptop.id), timeout=5, message="the offboarding notice"
    )
    body = json.loads(got.body)
    assert body["type"] == OFFBOARDED
    data = body["data"]
    assert data["recipients"] == [{"user_id": "admin-" + user, "email": admin_email}]
    assert (data["user_id"], data["reason"], data["event_id"]) == (user, "member_removed", removal)
    assert sorted(t["id"] for t in data["tokens"]) == sorted([laptop.id, ci.id])
    assert live.verify(app_token.token).usable
    wait_until_sent(stack, laptop.id, timeout=5)
    with live.session() as session:
        rows = session.scalars(select(Notice).where(Notice.event_id == removal)).all()
    assert len(rows) == 1
    assert stack.notices_naming(ci.id) == [got]


def test_the_worker_keeps_its_connections_to_the_receiver_between_notices(
    stack: NoticeStack,
) -> None:
    live = stack.live
    org, user = ids()
    stack.member(org, user)
    pats = [stack.token(TokenKind.PERSONAL, org, user) for _ in range(6)]

    for pat in pats:  # one leak at a time: each notice is its own message
        live.send(event("token.leak_suspected", {"token": pat.token}))
        wait_until_sent(stack, pat.id, timeout=5)

    ports = {got.peer_port for pat in pats for got in stack.notices_naming(pat.id)}
    # At most one connection per pool process (the stack's worker runs two), not one each.
    assert 1 <= len(ports) <= 2, ports


def test_a_worker_killed_mid_delivery_delivers_after_restart_with_the_same_id(
    stack: NoticeStack,
) -> None:
    live = stack.live
    org, user = ids()
    stack.member(org, user)
    pat = stack.token(TokenKind.PERSONAL, org, user)
    arrived = stack.receiver.hold_next()

    live.send(event("token.leak_suspected", {"token": pat.token}))
    assert arrived.wait(timeout=10), live.logs()[-4000:]
    live.kill("worker", signal.SIGKILL)

    held = stack.notice_row(pat.id)
    assert held is not None
    assert (held.status, held.attempts) == (NoticeStatus.PENDING, 0)  # died before recording
    stack.receiver.release()  # its answer goes to a dead socket
    live.start("worker")

    sent = wait_until_sent(stack, pat.id, timeout=30)
    attempts = stack.notices_naming(pat.id)
    assert len(attempts) >= 2
    assert {got.webhook_id for got in attempts} == {held.id}
    assert (sent.id, sent.attempts) == (held.id, 1)


def test_a_leaks_owner_and_a_leavers_admins_each_get_one_email_and_one_webhook(
    stack: NoticeStack,
) -> None:
    live = stack.live
    org, user = ids()
    owner_email = stack.member(org, user)
    admin_email = stack.member(org, "admin-" + user, role="admin")
    stack.member(org, "leaver-" + user)
    leaked = stack.token(TokenKind.PERSONAL, org, user)
    kept = stack.token(TokenKind.PERSONAL, org, "leaver-" + user)

    live.send(
        event("token.leak_suspected", {"token": leaked.token}),
        event("membership.removed", {"org_id": org, "user_id": "leaver-" + user}),
    )

    for token_id in (leaked.id, kept.id):

        def both(token_id: str = token_id) -> bool:
            return bool(stack.mails_about(token_id) and stack.notices_naming(token_id))

        live.wait_for(both, timeout=AT_ONCE_S, message=f"the email and webhook on {token_id}")
        wait_until_sent(stack, token_id, timeout=5)
    time.sleep(2.5)  # past a re-drive: a second copy of either would have arrived by now
    [to_owner] = stack.mails_about(leaked.id)
    [to_admins] = stack.mails_about(kept.id)
    assert len(stack.notices_naming(leaked.id)) == len(stack.notices_naming(kept.id)) == 1
    assert to_owner.envelope_to == [owner_email]
    assert to_admins.envelope_to == [admin_email]
    text = to_owner.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert f"…{leaked.token[-4:]}" in text
    assert leaked.token not in text
    assert "reported as leaked" in text
    admins_text = to_admins.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert f"The personal access tokens of leaver-{user} were revoked" in admins_text


def test_a_mail_server_that_answers_421_then_250_gets_the_mail_on_retry(
    stack: NoticeStack,
) -> None:
    live = stack.live
    assert stack.smtp is not None
    org, user = ids()
    owner_email = stack.member(org, user)
    pat = stack.token(TokenKind.PERSONAL, org, user)
    stack.smtp.handler.script = ["421 4.3.2 Service busy, try later"]

    live.send(event("token.leak_suspected", {"token": pat.token}))

    [got] = live.wait_for(
        lambda: stack.mails_about(pat.id), timeout=AT_ONCE_S, message="the retried email"
    )
    assert got.envelope_to == [owner_email]
    tries = [reply for to, reply in stack.smtp.handler.attempts if to == [owner_email]]
    assert tries == ["421 4.3.2 Service busy, try later", "250"]


def test_a_worker_killed_mid_send_loses_no_mail_and_sends_it_at_most_twice(
    stack: NoticeStack,
) -> None:
    live = stack.live
    assert stack.smtp is not None
    org, user = ids()
    owner_email = stack.member(org, user)
    pat = stack.token(TokenKind.PERSONAL, org, user)
    handler = stack.smtp.handler
    handler.arrived.clear()
    handler.release.clear()
    handler.script = ["hold"]

    live.send(event("token.leak_suspected", {"token": pat.token}))
    assert handler.arrived.wait(timeout=AT_ONCE_S), live.logs()[-4000:]
    live.kill("worker", signal.SIGKILL)
    handler.release.set()  # its answer goes to a dead socket
    live.start("worker")

    def sent() -> bool:
        with live.session() as session:
            rows = session.scalars(select(NoticeEmail).where(NoticeEmail.address == owner_email))
            return [row.status for row in rows] == [NoticeStatus.SENT]

    live.wait_for(sent, timeout=30, message="the email recorded as sent")
    copies = stack.mails_about(pat.id)
    assert 1 <= len(copies) <= 2
    assert len({copy.message_id for copy in copies}) == 1


def test_no_token_text_nor_webhook_secret_reached_a_notice_a_row_or_a_log(
    stack: NoticeStack,
) -> None:
    assert stack.issued, "run after the tests that issue tokens"
    received = b"".join(got.body for got in stack.receiver.received)
    assert stack.smtp is not None
    received += b"".join(got.message.as_bytes() for got in stack.smtp.delivered)
    with stack.live.engine.connect() as connection:
        rows = dump_tables(connection)
    logs = stack.live.logs()
    assert HOOK_USER_SECRET not in logs
    assert HOOK_QUERY_SECRET not in logs
    for token in stack.issued:
        for secret in secrets_of(token):
            assert secret.encode() not in received
            assert secret not in rows
            assert secret not in logs


def assert_published_at_once(live: LiveStack, logged: int) -> None:
    """The API published what it accepted after offset ``logged`` of its log itself.

    So the worker was handed the events at once, not by the re-drive a few seconds later.
    """
    lines = [json.loads(line) for line in live.log("api")[logged:].splitlines() if line]
    accepted = [line for line in lines if line.get("event") == "events.accepted"]
    assert accepted, lines
    for line in accepted:
        assert (line["published"], line["publish_error"]) == (line["count"], None), line


def wait_until_sent(stack: NoticeStack, token_id: str, *, timeout: float) -> Notice:
    """The notice about ``token_id`` once the worker has recorded it as sent."""

    def sent() -> Notice | None:
        notice = stack.notice_row(token_id)
        return notice if notice is not None and notice.status == NoticeStatus.SENT else None

    found = stack.live.wait_for(sent, timeout=timeout, message=f"the notice about {token_id}")
    assert found is not None
    return found
