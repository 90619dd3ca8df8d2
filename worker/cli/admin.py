"""``tokenwarden db`` and ``tokenwarden audit``."""

from __future__ import annotations

import click

from worker.cli.common import (
    echo_json,
    echo_table,
    json_option,
    settings,
    short_time,
    store_failed,
    transaction,
)
from worker.domain import audit as audit_trail
from worker.domain import db


@click.group(name="db")
def database() -> None:
    """The token store's schema."""


@database.command()
@json_option
def upgrade(as_json: bool) -> None:
    """Create or migrate the schema to the newest revision."""
    current = settings()
    url = current.resolved_database_url
    try:
        db.upgrade(url)
        revision = db.current_revision(db.engine_for(url))
    except Exception as error:
        store_failed(current, "migrate", error)
    if as_json:
        echo_json({"database": db.describe_url(url), "revision": revision})
    else:
        click.echo(f"{db.describe_url(url)} is at revision {revision}")


@click.command()
@click.option("--token", "token_id", default=None, help="Only this token id.")
@click.option("--user", "user_id", default=None, help="Only this user.")
@click.option("--org", "org_id", default=None, help="Only this organization.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="At most this many.")
@json_option
def audit(
    token_id: str | None,
    user_id: str | None,
    org_id: str | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """The audit trail: every revocation, refusal and change, with reason and source."""
    with transaction() as session:
        entries = list(
            audit_trail.trail(
                session, token_id=token_id, user_id=user_id, org_id=org_id, limit=limit
            )
        )
    if as_json:
        echo_json(
            [
                {
                    "id": e.id,
                    "at": e.at,
                    "action": e.action,
                    "reason": e.reason,
                    "token_id": e.token_id,
                    "org_id": e.org_id,
                    "user_id": e.user_id,
                    "source": e.source,
                    "actor": e.actor,
                    "event_id": e.event_id,
                    "detail": e.detail,
                }
                for e in entries
            ]
        )
        return
    echo_table(
        [
            (
                short_time(e.at),
                e.action,
                e.reason,
                e.token_id,
                e.org_id,
                e.user_id,
                e.source,
                e.actor,
                e.event_id,
            )
            for e in entries
        ],
        ["at", "action", "reason", "token", "org", "user", "source", "actor", "event"],
    )


def register(group: click.Group) -> None:
    group.add_command(database)
    group.add_command(audit)
