"""``tokenwarden notices``: the notice outbox, and whether each notice was delivered.

Must not import ``tasks`` or ``producer``.
"""

from __future__ import annotations

import json
from typing import Any, Final

import click

from tokenwarden.worker.cli.common import (
    cut,
    echo_json,
    echo_table,
    json_option,
    limit_option,
    settings,
    short_time,
    status_option,
    transaction,
)
from tokenwarden.worker.domain.models import Notice, NoticeStatus

# Table cells are cut here; --json has the full text.
CELL = 48


@click.command()
@status_option(NoticeStatus, "notices")
@limit_option("Rows to list.", default=100)
@json_option
def notices(status: str | None, limit: int, as_json: bool) -> None:
    """The notice outbox, newest first: who hears what, and whether it was delivered.

    --json adds each notice's body, the exact JSON posted to the webhook (it names tokens by
    id, name and last four characters, never the token itself).
    """
    from tokenwarden.worker.domain.notices import list_notices

    current = settings()
    with transaction(current) as session:
        rows = list_notices(session, status=status, limit=limit)
    if as_json:
        echo_json([_as_json(row) for row in rows])
        return
    if rows:
        echo_table([_as_row(n) for n in rows], _HEADERS)
    else:
        click.echo("no notices" + (f" with status {status}" if status else ""))
    if current.notice_webhook_url is None and any(n.status == NoticeStatus.PENDING for n in rows):
        click.echo()
        click.echo(
            "TOKENWARDEN_NOTICE_WEBHOOK_URL is not set: pending notices stay in the outbox "
            "until it is."
        )


_HEADERS: Final = (
    "id",
    "kind",
    "org",
    "recipients",
    "status",
    "attempts",
    "last error",
    "created",
    "sent",
)


def _as_row(notice: Notice) -> tuple[Any, ...]:
    return (
        notice.id,
        notice.kind,
        notice.org_id,
        cut(_recipients(notice.recipients), CELL),
        notice.status,
        notice.attempts,
        cut(notice.last_error, CELL),
        short_time(notice.created_at),
        short_time(notice.sent_at),
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


def register(group: click.Group) -> None:
    group.add_command(notices)
