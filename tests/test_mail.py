"""Emailing notices through a real SMTP server on loopback (aiosmtpd).

The delivery task runs in this process against the real store, as in ``test_delivery``; the
SMTP server is real, and answers from a script: refusals, a temporary failure, a connection
dropped mid-DATA, STARTTLS with a certificate made here.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.conftest import Cli, clean_env
from tests.smtp import MailServer, self_signed
from tests.test_delivery import Harness, Reply, harness, settings_for, use_settings
from tokenwarden.config.settings import ConfigError, Settings, load_settings
from tokenwarden.worker.domain import clock, db, mail_outbox, notices
from tokenwarden.worker.domain.models import NoticeEmail, NoticeStatus
from tokenwarden.worker.runtime import mail, smtp_connections

__all__ = ["harness"]  # the fixture, used by name

SENDER = "tokenwarden@example.com"
TOKEN = {
    "id": "tok_1",
    "name": "deploy <script>alert(1)</script>",
    "kind": "personal",
    "org_id": "acme",
    "last4": "Ab12",
    "expires_at": "2027-03-01T00:00:00+00:00",
    "user_id": "bob",
}


@pytest.fixture
def server() -> Iterator[MailServer]:
    with MailServer() as running:
        yield running


def mail_only(monkeypatch: pytest.MonkeyPatch, harness: Harness, url: str) -> None:
    use_mail_settings(monkeypatch, harness, settings_for(None, smtp_url=url, mail_from=SENDER))


def both_channels(monkeypatch: pytest.MonkeyPatch, harness: Harness, server: MailServer) -> None:
    """The webhook at the harness's receiver, and email through ``server``."""
    use_mail_settings(
        monkeypatch,
        harness,
        settings_for(harness.receiver.url, smtp_url=server.url(), mail_from=SENDER),
    )


def use_mail_settings(
    monkeypatch: pytest.MonkeyPatch, harness: Harness, settings: Settings
) -> None:
    """The worker's settings, and the domain's: email rows are written when SMTP is set."""
    use_settings(monkeypatch, harness, settings)
    monkeypatch.setattr(mail_outbox, "get_settings", lambda: settings)


def queue(recipients: list[dict[str, Any]], harness: Harness) -> str:
    with db.transaction(harness.store.engine) as session:
        notice_id = notices.queue(
            session,
            kind=notices.LEAKED,
            org_id="acme",
            recipients=recipients,
            data={
                "reason": "leaked",
                "source": "github",
                "source_url": "https://github.example/acme/site/blob/main/.env",
                "tokens": [TOKEN],
            },
            now=clock.now(),
        )
    assert notice_id is not None
    return notice_id


def emails(harness: Harness, notice_id: str) -> dict[str, NoticeEmail]:
    with db.transaction(harness.store.engine) as session:
        rows = session.scalars(select(NoticeEmail).where(NoticeEmail.notice_id == notice_id))
        found = {row.address: row for row in rows}
        session.expunge_all()
    return found


def server_tls(folder: Path) -> tuple[ssl.SSLContext, Path]:
    """The server's TLS context, with a certificate made here; and that certificate."""
    cert, key = self_signed(folder)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    return tls, cert


BOB = {"user_id": "bob", "email": "bob@acme.example"}
ANN = {"user_id": "ann", "email": "ann@acme.example"}


def test_each_recipient_with_an_address_gets_one_email_saying_what_to_do(
    harness: Harness, server: MailServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    mail_only(monkeypatch, harness, server.url())
    notice_id = queue([BOB, ANN, {"user_id": "cy", "email": None}, dict(BOB)], harness)

    harness.deliver(notice_id)
    harness.deliver(notice_id)  # a second message for the same notice sends nothing

    delivered = {d.envelope_to[0]: d for d in server.delivered}
    assert sorted(delivered) == ["ann@acme.example", "bob@acme.example"]
    got = delivered["bob@acme.example"].message
    assert got["Message-ID"] == mail.message_id(notice_id, "bob@acme.example", SENDER)
    assert got["Message-ID"] != delivered["ann@acme.example"].message["Message-ID"]
    assert got["From"] == SENDER
    assert got["To"] == "bob@acme.example"
    assert got["Subject"] == "A leaked token was revoked (acme)"
    text = got.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = got.get_body(("html",)).get_content()  # type: ignore[union-attr]
    for shown in ("…Ab12", "personal", "acme", "2027-03-01", "github.example/acme/site"):
        assert shown in text
        assert shown in html
    assert "reported as leaked" in text
    assert "Create a new token" in text
    assert TOKEN["name"] in text  # plain text as is ...
    assert "<script>" not in html
    assert "&lt;script&gt;" in html
    rows = emails(harness, notice_id)
    assert {a: (r.status, r.attempts) for a, r in rows.items()} == {
        "bob@acme.example": (NoticeStatus.SENT, 1),
        "ann@acme.example": (NoticeStatus.SENT, 1),
    }
    assert harness.scheduled == []


def test_one_connection_carries_consecutive_notices_and_one_gone_dead_is_replaced(
    harness: Harness, server: MailServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    mail_only(monkeypatch, harness, server.url())
    first, second = queue([BOB], harness), queue([ANN], harness)
    harness.deliver(first)
    harness.deliver(second)
    assert len({got.peer_port for got in server.delivered}) == 1

    # The kept connection dies while idle (a server restart, an idle timeout) ...
    monkeypatch.setattr(smtp_connections, "CHECK_AFTER_S", 0.0)
    kept = smtp_connections._KEPT._idle
    assert kept is not None
    assert kept[1].sock is not None
    kept[1].sock.shutdown(socket.SHUT_RDWR)
    third = queue([BOB], harness)
    harness.deliver(third)

    # ... and the next notice goes out over a new one, at its first attempt.
    assert len(server.delivered) == 3
    assert server.delivered[2].peer_port != server.delivered[0].peer_port
    assert emails(harness, third)["bob@acme.example"].attempts == 1


def test_a_permanent_refusal_fails_that_recipient_with_the_reason_only(
    harness: Harness, server: MailServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    mail_only(monkeypatch, harness, server.url())
    server.handler.refuse = {"ann@acme.example"}
    notice_id = queue([BOB, ANN], harness)

    harness.deliver(notice_id)

    assert [d.envelope_to for d in server.delivered] == [["bob@acme.example"]]
    rows = emails(harness, notice_id)
    assert rows["bob@acme.example"].status == NoticeStatus.SENT
    refused = rows["ann@acme.example"]
    assert refused.status == NoticeStatus.FAILED
    assert refused.last_error is not None
    assert refused.last_error.startswith("SMTP 550 5.1.1")
    assert harness.scheduled == []  # nothing left to retry


def test_a_message_refused_for_good_fails_with_the_servers_reason(
    harness: Harness, server: MailServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The recipient was taken, but the server refuses the message itself with a 5xx.
    mail_only(monkeypatch, harness, server.url())
    server.handler.script = ["554 5.7.1 Message rejected as spam"]
    notice_id = queue([BOB], harness)

    harness.deliver(notice_id)

    assert server.delivered == []
    refused = emails(harness, notice_id)["bob@acme.example"]
    assert refused.status == NoticeStatus.FAILED
    assert refused.last_error is not None
    assert refused.last_error.startswith("SMTP 554 5.7.1")
    assert harness.scheduled == []


@pytest.mark.parametrize(
    ("first", "error"),
    [("421 4.3.2 Service busy, try later", "SMTP 421"), ("drop", "SMTPServerDisconnected")],
)
def test_a_temporary_failure_is_retried_and_the_same_mail_arrives(
    harness: Harness,
    server: MailServer,
    monkeypatch: pytest.MonkeyPatch,
    first: str,
    error: str,
) -> None:
    mail_only(monkeypatch, harness, server.url())
    server.handler.script = [first]
    notice_id = queue([BOB], harness)

    harness.deliver(notice_id)

    assert server.delivered == []
    waiting = emails(harness, notice_id)["bob@acme.example"]
    assert waiting.status == NoticeStatus.PENDING
    assert waiting.attempts == 1
    assert waiting.last_error is not None
    assert waiting.last_error.startswith(error)
    [(ids, delay)] = harness.scheduled
    assert ids == [notice_id]
    assert 0 < delay <= 1.0

    harness.deliver(notice_id)  # not due yet: nothing is sent
    assert len(server.handler.attempts) == 1
    harness.clock.until(waiting.next_attempt_at)
    harness.deliver(notice_id)

    [got] = server.delivered
    assert got.message_id == mail.message_id(notice_id, "bob@acme.example", SENDER)
    done = emails(harness, notice_id)["bob@acme.example"]
    assert (done.status, done.attempts, done.last_error) == (NoticeStatus.SENT, 2, None)


def test_starttls_and_login_carry_the_mail_and_the_password_is_never_shown(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tls, cert = server_tls(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the client trusts this certificate only
    with MailServer(tls=tls, login=("notices", "s3cret-pa55")) as server:
        mail_only(monkeypatch, harness, server.url("notices:s3cret-pa55"))
        notice_id = queue([BOB], harness)
        harness.deliver(notice_id)
        [got] = server.delivered
        assert got.envelope_to == ["bob@acme.example"]
        assert "s3cret-pa55" not in repr(harness.settings)
        target = mail.target_from(harness.settings)
        assert target is not None
        assert "s3cret-pa55" not in repr(target)
        # A server that quotes the password back in its refusal: retried, never shown.
        refused = mail.outcome_of(
            smtplib.SMTPAuthenticationError(535, b"5.7.8 bad password s3cret-pa55"), target
        )
    assert refused.status == NoticeStatus.PENDING  # a login refused is the operator's to fix
    assert refused.error == "SMTP 535 5.7.8 bad password ***"


def test_smtps_speaks_tls_from_the_first_byte(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tls, cert = server_tls(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    with MailServer(tls=tls, implicit=True) as server:
        mail_only(monkeypatch, harness, server.url())
        notice_id = queue([BOB], harness)
        harness.deliver(notice_id)
        [got] = server.delivered
    assert server.url().startswith("smtps://")
    assert got.envelope_to == ["bob@acme.example"]
    assert emails(harness, notice_id)["bob@acme.example"].status == NoticeStatus.SENT


def test_a_server_whose_certificate_is_not_trusted_gets_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tls, _ = server_tls(tmp_path)
    with MailServer(tls=tls) as server:
        mail_only(monkeypatch, harness, server.url())
        notice_id = queue([BOB], harness)
        harness.deliver(notice_id)
        assert server.delivered == []
    row = emails(harness, notice_id)["bob@acme.example"]
    assert row.status == NoticeStatus.PENDING
    assert row.last_error is not None
    assert "CERTIFICATE_VERIFY_FAILED" in row.last_error


def test_both_channels_deliver_each_notice_once(
    harness: Harness, server: MailServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    both_channels(monkeypatch, harness, server)
    notice_id = queue([BOB], harness)

    harness.deliver(notice_id)
    harness.deliver(notice_id)

    assert harness.receiver.ids == [notice_id]
    assert [d.envelope_to for d in server.delivered] == [["bob@acme.example"]]


def test_each_channel_that_must_wait_gets_a_retry_of_its_own(
    harness: Harness, server: MailServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    both_channels(monkeypatch, harness, server)
    harness.receiver.script = [Reply(503)]
    server.handler.script = ["421 4.3.2 Service busy, try later"]
    notice_id = queue([BOB], harness)

    harness.deliver(notice_id)

    webhook_due = harness.row(notice_id).next_attempt_at
    email_due = emails(harness, notice_id)["bob@acme.example"].next_attempt_at
    assert [ids for ids, _ in harness.scheduled] == [[notice_id], [notice_id]]
    wanted = sorted((due - clock.now()).total_seconds() for due in (webhook_due, email_due))
    delays = sorted(delay for _, delay in harness.scheduled)
    assert delays == pytest.approx(wanted, abs=0.5)
    for due in sorted([webhook_due, email_due]):
        harness.clock.until(due)
        harness.deliver(notice_id)
    assert harness.receiver.ids == [notice_id, notice_id]
    assert len(server.delivered) == 1


def test_an_email_left_behind_is_re_driven_without_a_webhook(
    harness: Harness, server: MailServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    mail_only(monkeypatch, harness, server.url())
    notice_id = queue([BOB], harness)  # its message never reached a worker

    assert harness.redrive() == []  # not due for a re-drive yet
    harness.clock.advance(harness.settings.redrive_after_s + 1)
    assert harness.redrive() == [notice_id]
    assert harness.redrive() == []  # once per interval


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TOKENWARDEN_SMTP_URL": "http://mail.example"}, "TOKENWARDEN_SMTP_URL: must be smtp"),
        (
            {"TOKENWARDEN_SMTP_URL": "smtp://u:hunter22@mail.example:99999"},
            "TOKENWARDEN_SMTP_URL: has a port",
        ),
        ({"TOKENWARDEN_SMTP_URL": "smtp://mail.example"}, "TOKENWARDEN_MAIL_FROM: must be set"),
        (
            {"TOKENWARDEN_SMTP_URL": "smtp://mail.example", "TOKENWARDEN_MAIL_FROM": "nobody"},
            "TOKENWARDEN_MAIL_FROM: must be an email address",
        ),
    ],
)
def test_a_bad_mail_setting_is_refused_naming_the_variable_never_the_password(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert str(refused.value).startswith(message)
    assert "hunter22" not in str(refused.value)


def test_the_command_line_shows_each_recipients_email_status(
    harness: Harness, server: MailServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mail_only(monkeypatch, harness, server.url())
    server.handler.refuse = {"ann@acme.example"}
    notice_id = queue([BOB, ANN], harness)
    harness.deliver(notice_id)
    home = tmp_path / "home"
    home.mkdir()
    cli = Cli(
        home,
        clean_env(
            TOKENWARDEN_HOME=str(home),
            TOKENWARDEN_DATABASE_URL=harness.store.url,
            TOKENWARDEN_SMTP_URL=server.url("notices:hunter2-pa55"),
            TOKENWARDEN_MAIL_FROM=SENDER,
        ),
    )

    [shown] = cli("notices", "--json", check=True).json()
    table = cli("notices", check=True).stdout

    assert shown["status"] == "pending"  # no webhook: that channel waits for a URL
    assert [(m["address"], m["status"]) for m in shown["channels"]["email"]] == [
        ("ann@acme.example", "failed"),
        ("bob@acme.example", "sent"),
    ]
    assert shown["channels"]["email"][0]["last_error"].startswith("SMTP 550")
    assert "ann@acme.example failed, bob@acme.example sent" in table
    assert "hunter2-pa55" not in table


def test_without_an_smtp_server_no_email_is_kept_for_later(
    harness: Harness, server: MailServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = queue([BOB], harness)  # webhook only: no email row
    mail_only(monkeypatch, harness, server.url())
    after = queue([BOB], harness)

    harness.deliver(before, after)
    harness.clock.advance(harness.settings.redrive_after_s + 1)
    assert harness.redrive() == []

    assert emails(harness, before) == {}
    assert [d.message["X-Tokenwarden-Notice"] for d in server.delivered] == [after]


def test_an_address_that_would_inject_headers_or_cannot_be_mailed_fails_alone(
    harness: Harness, server: MailServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    mail_only(monkeypatch, harness, server.url())
    hostile = [
        "eve@acme.example\r\nBcc: all@acme.example",
        "eve@acme.example>, all@acme.example",
        "a@b@c",
        "not an address",
    ]
    notice_id = queue([{"user_id": "eve", "email": a} for a in hostile] + [BOB], harness)

    harness.deliver(notice_id)

    assert [d.envelope_to for d in server.delivered] == [["bob@acme.example"]]
    assert "Bcc" not in server.delivered[0].message
    rows = emails(harness, notice_id)
    for address in hostile:
        assert rows[address].status == NoticeStatus.FAILED
        assert (rows[address].last_error or "").startswith("not an address a mail can go to")


def test_a_notice_kind_the_templates_do_not_know_still_makes_a_complete_mail() -> None:
    target = mail.MailTarget(host="mail.example", port=25, implicit_tls=False, sender=SENDER)
    body = {
        "type": "token.idle",
        "data": {"tokens": [TOKEN], "next_steps": "Delete it if nothing uses it."},
    }

    built = mail.build(
        target, notice_id="ntc_1", body=body, address="bob@acme.example", now=clock.now()
    )

    assert built["Subject"] == "tokenwarden notice: token.idle (acme)"
    text = built.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "…Ab12" in text
    assert "Delete it if nothing uses it." in text


@pytest.mark.parametrize(
    ("kind", "data", "says"),
    [
        (
            notices.ORPHANED,
            {"reason": "creator_left", "user_id": "bob"},
            ["bob left and created these application tokens", "nobody in the organization"],
        ),
        (
            notices.BULK_REVOKED,
            {"reason": "bulk", "stated_reason": "laptop stolen", "actor": "ana"},
            ["break-glass revocation", "Reason given: laptop stolen", "Asked by: ana"],
        ),
        (
            notices.REUSED,
            {"reason": "reuse_detected"},
            ["was used again", "every live token of its rotation chain"],
        ),
        (
            notices.IDLE_REVOKED,
            {"reason": "idle", "idle_days": 90},
            ["not used for a long time", "Days without use that make a token idle: 90"],
        ),
        (
            notices.IDLE_WARNING,
            {"idle_days": 90, "revoked_from": "2027-01-01T00:00:00+00:00"},
            ["will be revoked", "Revoked as idle from: 2027-01-01"],
        ),
    ],
)
def test_each_kind_of_notice_says_what_happened_and_why_in_words(
    kind: str, data: dict[str, Any], says: list[str]
) -> None:
    target = mail.MailTarget(host="mail.example", port=25, implicit_tls=False, sender=SENDER)
    body = {
        "type": kind,
        "data": {**data, "tokens": [TOKEN], "next_steps": notices.NEXT_STEPS[kind]},
    }

    built = mail.build(
        target, notice_id="ntc_1", body=body, address="bob@acme.example", now=clock.now()
    )

    assert not built["Subject"].startswith("tokenwarden notice:")
    text = built.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    for expected in says:
        assert expected in text
    # No reason is shown as its code.
    assert f"Why: {data.get('reason')}." not in text
