"""``tokenwarden member``: memberships of users in organizations."""

from __future__ import annotations

import getpass
from collections.abc import Callable
from typing import Any

import click
from sqlalchemy import select

from tokenwarden.worker.cli.common import (
    NO_TOKEN,
    echo_json,
    echo_listing,
    json_option,
    reading,
    record,
    transaction,
)
from tokenwarden.worker.domain import clock
from tokenwarden.worker.domain.members import add_member
from tokenwarden.worker.domain.models import Membership
from tokenwarden.worker.domain.removals import remove_member


@click.group()
def member() -> None:
    """Memberships of users in organizations."""


@member.command("add")
@click.option("--org", "org_id", required=True, type=NO_TOKEN, help="Organization id.")
@click.option("--user", "user_id", required=True, type=NO_TOKEN, help="User id.")
@click.option("--role", required=True, type=click.Choice(["admin", "user"]))
@click.option("--email", default=None, type=NO_TOKEN, help="Where the user's notices go.")
@json_option
def add(org_id: str, user_id: str, role: str, email: str | None, as_json: bool) -> None:
    """Record USER as an active member of ORG with ROLE."""
    now = clock.now()
    with transaction() as session:
        add_member(
            session,
            org_id=org_id,
            user_id=user_id,
            role=role,
            email=email,
            at=now,
            now=now,
            source="cli",
        )
    data = {"org_id": org_id, "user_id": user_id, "role": role, "email": email, "active": True}
    if as_json:
        echo_json(data)
    else:
        click.echo(f"{user_id} is now a member of {org_id} with role {role}")


@member.command("list")
@click.option("--org", "org_id", default=None, type=NO_TOKEN, help="Only this organization.")
@click.option("--user", "user_id", default=None, type=NO_TOKEN, help="Only this user.")
@json_option
def list_(org_id: str | None, user_id: str | None, as_json: bool) -> None:
    """Memberships, active and ended, by organization and user."""
    query = select(Membership).order_by(Membership.org_id, Membership.user_id)
    if org_id is not None:
        query = query.where(Membership.org_id == org_id)
    if user_id is not None:
        query = query.where(Membership.user_id == user_id)
    with reading() as session:
        records = [
            record(m, "org_id user_id role email active active_since updated_at")
            for m in session.scalars(query)
        ]
    columns: dict[str, str | Callable[[dict[str, Any]], Any]] = {
        "ORG": "org_id",
        "USER": "user_id",
        "ROLE": "role",
        "EMAIL": "email",
        "STATE": lambda r: "active" if r["active"] else "ended",
        "SINCE": "active_since",
    }
    echo_listing(records, columns, as_json=as_json)


@member.command("remove")
@click.option("--org", "org_id", required=True, type=NO_TOKEN, help="Organization id.")
@click.option("--user", "user_id", required=True, type=NO_TOKEN, help="User id.")
@click.option("--actor", default=None, type=NO_TOKEN, help="Who asks (default: the login name).")
@json_option
def remove(org_id: str, user_id: str, actor: str | None, as_json: bool) -> None:
    """USER leaves ORG: their PATs there are revoked (AATs kept) and the admins told, as a
    membership.removed event would."""
    now = clock.now()
    with transaction() as session:
        revoked = remove_member(
            session,
            org_id=org_id,
            user_id=user_id,
            at=now,
            now=now,
            source="cli",
            event_id=None,
            actor=actor or getpass.getuser(),
        )
    if as_json:
        echo_json({"org_id": org_id, "user_id": user_id, "active": False, "revoked": revoked})
    else:
        click.echo(
            f"{user_id} is no longer a member of {org_id}; {len(revoked)} personal token(s) revoked"
        )


def register(group: click.Group) -> None:
    group.add_command(member)
