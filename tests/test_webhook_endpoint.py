"""The webhook as the best webhook services run it: secret rotation, a failing endpoint paused
and resumed, replay, and the outbox's gauges.

Delivery runs in this process against the real store and a real receiver on loopback (see
``test_delivery``); the command line is the real console script on the same store.
"""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook

from tests.conftest import Cli, clean_env
from tests.test_delivery import (
    SECRET,
    Harness,
    Receiver,
    Reply,
    harness,
    logged_lines,
    use_settings,
)
from tokenwarden.config.settings import Settings
from tokenwarden.producer.app_state import AppState
from tokenwarden.producer.metrics import StoreCollector
from tokenwarden.worker.domain import clock, db, mail_outbox
from tokenwarden.worker.domain.models import AuditEntry, NoticeStatus, WebhookEndpoint

__all__ = ["harness"]  # the fixture, used by name

NEW_SECRET = "whsec_" + base64.b64encode(b"n" * 32).decode()


def webhook_settings(url: str, **more: object) -> Settings:
    values: dict[str, object] = {
        "notice_webhook_url": url,
        "notice_signing_secret": SECRET,
        "redrive_after_s": 2.0,
    }
    values.update(more)
    return Settings(**values)  # type: ignore[arg-type]


def cli_on(harness: Harness, tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(
        TOKENWARDEN_HOME=str(home),
        TOKENWARDEN_DATABASE_URL=harness.store.url,
        TOKENWARDEN_NOTICE_WEBHOOK_URL=harness.receiver.url,
        TOKENWARDEN_NOTICE_SIGNING_SECRET=SECRET,
    )
    return Cli(home, env)


def test_during_rotation_a_receiver_verifies_with_the_old_secret_or_the_new(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    rotating = webhook_settings(
        harness.receiver.url, notice_signing_secret=f"{NEW_SECRET},{SECRET}"
    )
    use_settings(monkeypatch, harness, rotating)
    notice_id = harness.queue()

    harness.deliver(notice_id)  # the harness's receiver knows the old secret only

    [got] = harness.receiver.received
    signatures = got.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2
    assert all(s.startswith("v1,") for s in signatures)
    Webhook(SECRET).verify(got.body, got.headers)
    Webhook(NEW_SECRET).verify(got.body, got.headers)  # a receiver that already switched
    with Receiver(NEW_SECRET) as switched:
        use_settings(
            monkeypatch,
            harness,
            webhook_settings(switched.url, notice_signing_secret=f"{NEW_SECRET},{SECRET}"),
        )
        second = harness.queue()
        harness.deliver(second)
        assert switched.ids == [second]
        assert switched.forged == []


def test_a_signing_secret_list_with_one_bad_secret_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tokenwarden.config.settings import ConfigError, load_settings

    monkeypatch.setenv("TOKENWARDEN_NOTICE_SIGNING_SECRET", f"{NEW_SECRET},whsec_short")
    with pytest.raises(ConfigError, match=r"^TOKENWARDEN_NOTICE_SIGNING_SECRET: must be"):
        load_settings()


def test_an_endpoint_failing_too_long_is_disabled_until_resumed(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_settings(
        monkeypatch, harness, webhook_settings(harness.receiver.url, webhook_disable_after_s=60)
    )
    harness.receiver.script = [Reply(503)] * 2
    first = harness.queue()
    harness.deliver(first)
    assert harness.row(first).status == NoticeStatus.PENDING
    harness.clock.advance(61)

    with logged_lines("WARNING") as lines:
        harness.deliver(first)  # still failing, a minute after the first failure
    [disabled] = [json.loads(line) for line in lines.getvalue().splitlines()]
    assert disabled["event"] == "webhook.endpoint_disabled"
    assert disabled["receiver"] == harness.receiver.url.rsplit("/hooks", 1)[0]

    posted = len(harness.receiver.received)
    scheduled = len(harness.scheduled)
    second = harness.queue()
    harness.deliver(second)
    harness.clock.advance(3)  # past the re-drive delay
    assert harness.redrive() == []
    assert len(harness.receiver.received) == posted  # paused, not hammered
    assert len(harness.scheduled) == scheduled
    assert harness.row(second).status == NoticeStatus.PENDING
    assert "tokenwarden_webhook_endpoints_disabled 1.0" in scrape(harness)

    cli = cli_on(harness, tmp_path)
    shown = cli("notices", check=True).stdout
    assert "The webhook endpoint is disabled" in shown
    assert cli("notices", "resume", "--json", check=True).json() == {"resumed": True}
    assert cli("notices", "resume", "--json", check=True).json() == {"resumed": False}

    assert sorted(harness.redrive()) == sorted([first, second])
    harness.deliver(first, second)
    assert harness.row(first).status == harness.row(second).status == NoticeStatus.SENT
    with db.transaction(harness.store.engine) as session:
        [endpoint] = session.scalars(select(WebhookEndpoint)).all()
        assert (endpoint.failing_since, endpoint.disabled_at) == (None, None)


def test_replay_sends_the_same_notices_again_with_their_ids_and_is_audited(
    harness: Harness, tmp_path: Path
) -> None:
    harness.receiver.script = [Reply(200), Reply(400)]
    sent, refused = harness.queue(), harness.queue()
    harness.deliver(sent, refused)
    assert harness.row(refused).status == NoticeStatus.FAILED
    cli = cli_on(harness, tmp_path)
    since = (clock.now() - timedelta(minutes=5)).isoformat()

    only_failed = cli("notices", "replay", "--since", since, "--status", "failed", "--json")
    assert only_failed.json() == {"replayed": [refused]}, only_failed.stderr
    harness.deliver(sent, refused)
    assert harness.receiver.ids == [sent, refused, refused]
    assert harness.row(refused).status == NoticeStatus.SENT

    everything = cli("notices", "replay", "--since", since, "--actor", "ops@acme", "--json")
    assert sorted(everything.json()["replayed"]) == sorted([sent, refused])
    harness.deliver(sent, refused)
    assert sorted(harness.receiver.ids[3:]) == sorted([sent, refused])
    with db.transaction(harness.store.engine) as session:
        audited = session.scalars(
            select(AuditEntry).where(AuditEntry.action == "notice_replay").order_by(AuditEntry.id)
        ).all()
        assert [(a.reason, a.actor, a.detail["count"]) for a in audited if a.detail] == [
            ("failed", audited[0].actor, 1),
            ("sent_or_failed", "ops@acme", 2),
        ]
    bad = cli("notices", "replay", "--since", "yesterday")
    assert bad.code == 2
    assert "--since: not an ISO 8601 date or time" in bad.stderr


def test_metrics_show_pending_failed_and_the_oldest_pending_age_per_channel(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Emails are queued for a server that is not there (port 9 discards): they stay pending.
    mailing = webhook_settings(
        harness.receiver.url, smtp_url="smtp://127.0.0.1:9", mail_from="tw@example.com"
    )
    monkeypatch.setattr(mail_outbox, "get_settings", lambda: mailing)
    harness.receiver.script = [Reply(400)]
    failed = harness.queue()
    harness.deliver(failed)  # the webhook refuses it; its email is not sent (no SMTP target)
    harness.queue()
    harness.clock.advance(30)

    text = scrape(harness)
    assert 'tokenwarden_notices_pending{channel="webhook"} 1.0' in text
    assert 'tokenwarden_notices_failed{channel="webhook"} 1.0' in text
    assert 'tokenwarden_notices_pending{channel="email"} 2.0' in text
    assert 'tokenwarden_notices_failed{channel="email"} 0.0' in text
    ages = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tokenwarden_notices_oldest_pending_age_seconds{")
    ]
    assert len(ages) == 2
    assert all(30 <= age < 60 for age in ages)
    assert "tokenwarden_webhook_endpoints_disabled 0.0" in text


def test_with_email_only_the_webhook_backlog_is_not_shown(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With no webhook set a notice's webhook delivery waits for one, and would only ever grow:
    # an alert on it would fire for good. The API shows the channels that are set.
    mailing = webhook_settings(
        harness.receiver.url, smtp_url="smtp://127.0.0.1:9", mail_from="tw@example.com"
    )
    monkeypatch.setattr(mail_outbox, "get_settings", lambda: mailing)
    harness.queue()
    email_only = Settings(smtp_url="smtp://127.0.0.1:9", mail_from="tw@example.com")

    text = scrape(harness, channels=AppState(email_only, celery_app=None).metrics_channels)

    assert 'tokenwarden_notices_pending{channel="email"} 1.0' in text
    assert 'channel="webhook"' not in text


def scrape(harness: Harness, channels: tuple[str, ...] = ("webhook", "email")) -> str:
    registry = CollectorRegistry()
    registry.register(StoreCollector(lambda: harness.store.engine, channels))
    return generate_latest(registry).decode()
