"""``tokenwarden notices``: the notice outbox, and whether each notice was delivered."""

from __future__ import annotations

import json
from typing import Any

import click

from worker.cli.common import echo_json, echo_table, json_option, settings, short_time, transaction
from worker.domain.models import Notice, NoticeStatus

# Table cells are cut here; --json has the full text.
CELL = 48


@click.command()
@click.option(
    "--status",
    type=click.Choice([status.value for status in NoticeStatus]),
    default=None,
    help="Only notices in this state.",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=100, show_default=True, help="Rows to list."
)
@json_option
def notices(status: str | None, limit: int, as_json: bool) -> None:
    """The notice outbox, newest first: who hears what, and whether it was delivered.

    --json adds each notice's body, the exact JSON posted to the webhook (it names tokens by
    id, name and last four characters, never the token itself).
    """
    from worker.domain.notices import list_notices

    current = settings()
    with transaction(current) as session:
        rows = list_notices(session, status=status, limit=limit)
    if as_json:
        echo_json([_as_json(row) for row in rows])
        return
    if rows:
        echo_table(
            [
                (
                    n.id,
                    n.kind,
                    n.org_id,
                    _cut(_recipients(n.recipients)),
                    n.status,
                    n.attempts,
                    _cut(n.last_error),
                    short_time(n.created_at),
                    short_time(n.sent_at),
                )
                for n in rows
            ],
            [
                "id",
                "kind",
                "org",
                "recipients",
                "status",
                "attempts",
                "last error",
                "created",
                "sent",
            ],
        )
    else:
        click.echo("no notices" + (f" with status {status}" if status else ""))
    if current.notice_webhook_url is None and any(n.status == NoticeStatus.PENDING for n in rows):
        click.echo()
        click.echo(
            "TOKENWARDEN_NOTICE_WEBHOOK_URL is not set: pending notices stay in the outbox "
            "until it is."
        )


def _as_json(notice: Notice) -> dict[str, Any]:
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
        "body": json.loads(notice.body),
    }


def _recipients(recipients: list[dict[str, Any]]) -> str:
    if not recipients:
        return "(no one)"
    return ", ".join(str(r.get("email") or r.get("user_id") or "?") for r in recipients)


def _cut(text: str | None) -> str:
    if not text:
        return ""
    line = " ".join(text.split())
    return line if len(line) <= CELL else line[: CELL - 1] + "…"


def register(group: click.Group) -> None:
    group.add_command(notices)
