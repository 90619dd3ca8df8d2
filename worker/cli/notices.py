"""``tokenwarden notices``: the notice outbox, and whether each notice was delivered.

Must not import ``tasks`` or ``producer``.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Final

import click

from tokenwarden.config.settings import Settings
from tokenwarden.worker.cli.common import (
    cut,
    echo_json,
    echo_table,
    fail,
    json_option,
    limit_option,
    parse_instant,
    settings,
    short_time,
    status_option,
    transaction,
)
from tokenwarden.worker.domain.models import Notice, NoticeEmail, NoticeStatus

# Table cells are cut here; --json has the full text.
CELL = 48


@click.group(invoke_without_command=True)
@status_option(NoticeStatus, "notices")
@limit_option("Rows to list.", default=100)
@json_option
@click.pass_context
def notices(ctx: click.Context, status: str | None, limit: int, as_json: bool) -> None:
    """The notice outbox, newest first: who hears what, and whether each channel delivered it.

    The webhook column is the notice's status; each email recipient has a status of its own.
    --json adds each notice's body, the exact JSON posted to the webhook (it names tokens by
    id, name and last four characters, never the token itself), and its emails.
    """
    if ctx.invoked_subcommand is not None:
        return
    from tokenwarden.worker.domain import endpoints
    from tokenwarden.worker.domain.mail_outbox import emails_of
    from tokenwarden.worker.domain.notices import list_notices

    current = settings()
    with transaction(current) as session:
        rows = list_notices(session, status=status, limit=limit)
        mails = emails_of(session, [row.id for row in rows])
        endpoint = (
            endpoints.endpoint_of(session, current.notice_webhook_url)
            if current.notice_webhook_url
            else None
        )
        disabled = endpoint is not None and endpoint.disabled_at is not None
        failing_since = endpoint.failing_since if endpoint is not None else None
    if as_json:
        echo_json([_as_json(row, mails[row.id]) for row in rows])
        return
    if rows:
        echo_table([_as_row(n, mails[n.id]) for n in rows], _HEADERS)
    else:
        click.echo("no notices" + (f" with status {status}" if status else ""))
    _say_channels(current, rows, disabled=disabled, failing_since=failing_since)


def _say_channels(
    current: Settings, rows: list[Notice], *, disabled: bool, failing_since: datetime | None
) -> None:
    pending = any(n.status == NoticeStatus.PENDING for n in rows)
    if current.notice_webhook_url is None and pending:
        click.echo()
        click.echo(
            "TOKENWARDEN_NOTICE_WEBHOOK_URL is not set: pending notices stay in the outbox "
            "until it is" + (" (their emails go out meanwhile)." if current.smtp_url else ".")
        )
    if disabled:
        click.echo()
        click.echo(
            f"The webhook endpoint is disabled: it kept failing since {short_time(failing_since)}"
            ". Nothing is posted until `tokenwarden notices resume`."
        )
    elif failing_since is not None:
        click.echo()
        click.echo(f"The webhook endpoint has been failing since {short_time(failing_since)}.")


@notices.command()
@json_option
def resume(as_json: bool) -> None:
    """Enable the webhook endpoint again after it was disabled for failing too long.

    The notices that waited are posted again within TOKENWARDEN_REDRIVE_AFTER_S.
    """
    from tokenwarden.worker.domain import clock, endpoints

    current = settings()
    if not current.notice_webhook_url:
        fail("TOKENWARDEN_NOTICE_WEBHOOK_URL is not set: there is no endpoint to resume")
    with transaction(current) as session:
        resumed = endpoints.resume(session, url=current.notice_webhook_url, now=clock.now())
    if as_json:
        echo_json({"resumed": resumed})
    elif resumed:
        click.echo("webhook endpoint enabled again; the notices that waited go out shortly")
    else:
        click.echo("the webhook endpoint is not disabled: nothing to do")


@notices.command()
@click.option("--since", required=True, help="Notices created at or after this ISO 8601 time.")
@click.option(
    "--status",
    type=click.Choice([NoticeStatus.FAILED.value, NoticeStatus.SENT.value]),
    default=None,
    help="Only notices in this state (default: failed and sent).",
)
@click.option("--actor", default=None, help="Who asks, for the audit trail (default: $USER).")
@json_option
def replay(since: str, status: str | None, actor: str | None, as_json: bool) -> None:
    """Send notices again, with the same id (webhook-id), to the webhook; audited."""
    from tokenwarden.worker.domain import clock
    from tokenwarden.worker.domain.notices import remember_notice
    from tokenwarden.worker.domain.outbox_delivery import replay as replay_notices

    start = parse_instant(since, option="--since")
    who = actor or os.environ.get("USER") or "cli"
    current = settings()
    with transaction(current) as session:
        notice_ids = replay_notices(session, since=start, status=status, now=clock.now(), actor=who)
        for notice_id in notice_ids:
            remember_notice(session, notice_id)  # published once this commits
    if as_json:
        echo_json({"replayed": notice_ids})
    else:
        click.echo(f"{len(notice_ids)} notice(s) queued to be sent again")


_HEADERS: Final = (
    "id",
    "kind",
    "org",
    "recipients",
    "webhook",
    "attempts",
    "emails",
    "last error",
    "created",
    "sent",
)


def _as_row(notice: Notice, mails: list[NoticeEmail]) -> tuple[Any, ...]:
    return (
        notice.id,
        notice.kind,
        notice.org_id,
        cut(_recipients(notice.recipients), CELL),
        notice.status,
        notice.attempts,
        cut(", ".join(f"{m.address} {m.status}" for m in mails) or "-", CELL),
        cut(notice.last_error or next((m.last_error for m in mails if m.last_error), None), CELL),
        short_time(notice.created_at),
        short_time(notice.sent_at),
    )


def _as_json(notice: Notice, mails: list[NoticeEmail]) -> dict[str, Any]:
    pending = notice.status == NoticeStatus.PENDING
    return {
        "id": notice.id,
        "kind": notice.kind,
        "org_id": notice.org_id,
        "recipients": notice.recipients,
        "status": notice.status,
        "attempts": notice.attempts,
        "last_error": notice.last_error,
        "created_at": notice.created_at,
        "next_attempt_at": notice.next_attempt_at if pending else None,
        "sent_at": notice.sent_at,
        "event_id": notice.event_id,
        "channels": {
            "webhook": {"status": notice.status, "attempts": notice.attempts},
            "email": [
                {
                    "address": m.address,
                    "user_id": m.user_id,
                    "status": m.status,
                    "attempts": m.attempts,
                    "last_error": m.last_error,
                    "sent_at": m.sent_at,
                }
                for m in mails
            ],
        },
        "body": json.loads(notice.body),
    }


def _recipients(recipients: list[dict[str, Any]]) -> str:
    if not recipients:
        return "(no one)"
    return ", ".join(str(r.get("email") or r.get("user_id") or "?") for r in recipients)


def register(group: click.Group) -> None:
    group.add_command(notices)
