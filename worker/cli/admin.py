"""``tokenwarden db`` and ``tokenwarden audit``. Must not import ``tasks`` or ``producer``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import click

from tokenwarden.worker.cli.common import (
    echo_json,
    echo_listing,
    json_option,
    limit_option,
    reading,
    record,
    settings,
    store_failed,
)
from tokenwarden.worker.domain import audit as audit_trail
from tokenwarden.worker.domain import db
from tokenwarden.worker.domain.models import AuditEntry


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
@limit_option("At most this many.")
@json_option
def audit(
    token_id: str | None,
    user_id: str | None,
    org_id: str | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """The audit trail: every revocation, refusal and change, with reason and source."""
    with reading() as session:
        entries = list(
            audit_trail.trail(
                session, token_id=token_id, user_id=user_id, org_id=org_id, limit=limit
            )
        )
    echo_listing([_entry_json(e) for e in entries], _AUDIT_COLUMNS, as_json=as_json)


def _entry_json(e: AuditEntry) -> dict[str, Any]:
    return record(e, "id at action reason token_id org_id user_id source actor event_id detail")


# The table's columns: header, and the key of the JSON record it shows.
_AUDIT_COLUMNS: Final[dict[str, str | Callable[[dict[str, Any]], Any]]] = {
    "at": "at",
    "action": "action",
    "reason": "reason",
    "token": "token_id",
    "org": "org_id",
    "user": "user_id",
    "source": "source",
    "actor": "actor",
    "event": "event_id",
}


def register(group: click.Group) -> None:
    group.add_command(database)
    group.add_command(audit)
