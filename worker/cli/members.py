"""``tokenwarden member``: memberships of users in organizations."""

from __future__ import annotations

import click

from tokenwarden.worker.cli.common import NO_TOKEN, echo_json, json_option, transaction
from tokenwarden.worker.domain import clock
from tokenwarden.worker.domain.members import add_member


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


def register(group: click.Group) -> None:
    group.add_command(member)
